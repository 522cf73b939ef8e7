//! Finding an image's hyperbox index and the prefetch lists shared beside
//! it, cached per repository and manifest.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyperbox_registry::Reference;
use hyperbox_registry::digest::Digest;
use hyperbox_registry::index::Index;

use super::{Lazy, lock};

/// How long a looked-up index is trusted.
pub(super) const INDEX_TTL: Duration = Duration::from_secs(60);

/// How long its absence is: short, so an index pushed after a first pull
/// is picked up soon, long enough to spare the registry one lookup per
/// layer of every pull.
pub(super) const NO_INDEX_TTL: Duration = Duration::from_secs(10);

/// How long an index lookup waits for the shared prefetch lists once the
/// index is in: they only speed a pull up, so they never hold one back for
/// long.
pub(super) const SHARED_GRACE: Duration = Duration::from_millis(250);

/// When an index was looked up, what was found, and the prefetch lists
/// shared beside it that fit it, by EROFS image: a list is only ever used
/// for a layer pulled through the very index it was found with, so one
/// repository's lists never reach another's pulls.
#[derive(Debug)]
pub(super) struct CachedIndex {
    pub(super) at: Instant,
    pub(super) found: Option<Found>,
}

/// An index as one lookup found it, with its shared lists: a pull takes
/// both from the same lookup.
#[derive(Debug, Clone)]
pub(super) struct Found {
    pub(super) index: Arc<Index>,
    pub(super) shared: Arc<HashMap<String, SharedList>>,
}

/// A prefetch list shared through the registry, fitted to one layer, with
/// the checkpoints learned for its layer blob.
pub(super) type SharedList = Arc<hyperbox_registry::prefetch::Fitted>;

/// Where an index is looked up: the image's repository (the index is
/// found there by a tag made from the manifest digest) and the manifest.
pub(super) fn index_key(image: &Reference, manifest: &str) -> String {
    format!("{}/{}@{manifest}", image.host, image.repository)
}

impl Lazy {
    /// The hyperbox index of `image` (manifest `manifest`) and the lists
    /// shared beside it, looked up or from the cache.
    pub(super) async fn index(&self, image: &str, manifest: &str) -> Option<Found> {
        let r = Reference::parse(image).ok()?;
        let cache_key = index_key(&r, manifest);
        if let Some(c) = lock(&self.indexes).get(&cache_key)
            && c.at.elapsed()
                < if c.found.is_some() {
                    INDEX_TTL
                } else {
                    NO_INDEX_TTL
                }
        {
            return c.found.clone();
        }
        let d = Digest::parse(manifest).ok()?;
        // The shared lists are asked for beside the index, not after it,
        // and waited for at most SHARED_GRACE once the index is in.
        let lists = async {
            if !self.shared_prefetch {
                return None;
            }
            match self.registry.fetch_prefetch(&r, &d).await {
                Ok(doc) => doc,
                Err(e) => {
                    tracing::warn!(image, error = %hyperbox_api::error_chain(&e), "cannot read the image's shared prefetch lists; prefetching what this node learned only");
                    None
                }
            }
        };
        let index = self.registry.fetch_index(&r, &d);
        tokio::pin!(lists, index);
        let (found, lists) = tokio::select! {
            found = &mut index => {
                let lists = match &found {
                    Ok(Some(_)) => tokio::time::timeout(SHARED_GRACE, &mut lists).await.unwrap_or_else(|_| {
                        tracing::info!(image, "shared prefetch lists not in time; prefetching what this node learned only");
                        None
                    }),
                    _ => None,
                };
                (found, lists)
            }
            lists = &mut lists => ((&mut index).await, lists),
        };
        let index = match found {
            Ok(ix) => ix,
            Err(e) => {
                tracing::warn!(image, error = %hyperbox_api::error_chain(&e), "cannot read the image's hyperbox index; fetching layers in full");
                None
            }
        };
        let found = index.map(|ix| Found {
            shared: Arc::new(
                lists
                    .map(|doc| doc.for_index(&ix, image))
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(erofs, fitted)| (erofs, Arc::new(fitted)))
                    .collect(),
            ),
            index: Arc::new(ix),
        });
        lock(&self.indexes).insert(
            cache_key,
            CachedIndex {
                at: Instant::now(),
                found: found.clone(),
            },
        );
        found
    }
}
