//! Prewarming: the learned prefetch of an image's lazy layers fetched
//! before its next pull, so that a start the node expects (the agent
//! counts which images start here, see `hyperbox-nri`'s `prewarm`) finds
//! the bytes its first reads wait for already local.
//!
//! A prewarmed layer is an ordinary lazy file, registered and marked, but
//! *parked*: its fill does not start and nothing mounts it. Only the
//! chunks of its learned list (this node's, or the one shared beside the
//! index) are fetched, each checked against the index as any other. The
//! next Prepare of that layer through an index naming the same EROFS
//! image takes the file as it is ([`Lazy::adopt`]) and fills the rest as a
//! taught pull does; a parked file no pull takes is removed by Cleanup
//! after [`PREWARM_KEEP`].
//!
//! A prewarm is background work: it gives way to reads, fetches a quarter
//! as many runs at once as a pull's prefetch, and ends when the node's
//! I/O `some avg10` reaches the caller's limit (what it fetched is kept;
//! the next calm moment goes on from there). Layers already on the node,
//! whole or lazily, are left alone.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hyperbox_api::time::unix_now;
use hyperbox_registry::Reference;
use hyperbox_registry::digest::chain_ids;

use super::blob::{State, file_id, key_of, write_durably};
use super::fill::Download;
use super::{Error, Lazy, Phase, lock};

/// How long a prewarmed layer no pull took is kept.
pub const PREWARM_KEEP: Duration = Duration::from_secs(24 * 3600);

/// The most bytes parked layers may hold on the node: a prewarm past it
/// leaves the layer alone (`no_room`). Each layer's list is at most
/// 64 MiB ([`crate::prefetch::MAX_AHEAD`]), and whoever can push to an
/// image's repository chooses its shared lists.
pub const MAX_PARKED_BYTES: u64 = 4 << 30;

/// How long an image's resolved manifest is reused: the agent asks for
/// the same images every round, most of them on the node, and registries
/// count manifest requests against pull limits. A tag moved meanwhile
/// prewarms its earlier layers at worst.
pub const RESOLVED_TTL: Duration = Duration::from_secs(3600);

/// An image resolved for this platform: its manifest digest and its
/// layers with their diff_ids, bottom first.
#[derive(Debug, Clone)]
pub(super) struct Resolved {
    at: Instant,
    manifest: String,
    layers: Vec<(String, String)>,
}

pub use hyperbox_api::types::{Prewarm, WarmOutcome as Outcome, Warmed};

impl Lazy {
    /// Prewarms the lazy layers of `image` that are not on the node
    /// (`on_node(layer digest, chain id)` says which the whole-fetch cache
    /// or a committed snapshot holds),
    /// stopping when the node's I/O `some avg10` reaches `max_io_pressure`
    /// (0: never).
    pub async fn prewarm(
        self: &Arc<Self>,
        image: &str,
        max_io_pressure: f64,
        on_node: impl Fn(&str, &str) -> bool,
    ) -> Result<Prewarm, Error> {
        let started = Instant::now();
        let registry_error = |source| Error::Registry {
            what: format!("image {image}"),
            source,
        };
        let r = Reference::parse(image).map_err(registry_error)?;
        let cached = lock(&self.resolved)
            .get(image)
            .filter(|c| c.at.elapsed() < RESOLVED_TTL)
            .cloned();
        let resolved = match cached {
            Some(c) => c,
            None => {
                let got = self.registry.resolve(&r).await.map_err(registry_error)?;
                let c = Resolved {
                    at: Instant::now(),
                    manifest: got.manifest.digest.clone(),
                    layers: got
                        .layers
                        .iter()
                        .map(|l| l.digest.clone())
                        .zip(got.diff_ids.iter().cloned())
                        .collect(),
                };
                let mut all = lock(&self.resolved);
                all.retain(|_, c| c.at.elapsed() < RESOLVED_TTL);
                all.insert(image.to_string(), c.clone());
                c
            }
        };
        let manifest = resolved.manifest.clone();
        let mut out = Prewarm {
            image: image.into(),
            manifest: manifest.clone(),
            indexed: false,
            layers: Vec::new(),
            ms: 0,
        };
        // Which layers are on the node, before the index is asked for: an
        // image that is here costs the registry nothing.
        let diff_ids: Vec<String> = resolved.layers.iter().map(|(_, d)| d.clone()).collect();
        let here: Vec<bool> = resolved
            .layers
            .iter()
            .zip(chain_ids(&diff_ids))
            .map(|((layer, _), chain)| on_node(layer, &chain))
            .collect();
        if here.iter().all(|h| *h) {
            out.indexed = true;
            out.layers = resolved
                .layers
                .iter()
                .map(|(layer, _)| Warmed {
                    layer: layer.clone(),
                    outcome: Outcome::OnNode,
                    listed: 0,
                    fetched: 0,
                })
                .collect();
            out.ms = started.elapsed().as_millis() as u64;
            return Ok(out);
        }
        let Some(found) = self.index(image, &manifest).await else {
            out.ms = started.elapsed().as_millis() as u64;
            return Ok(out);
        };
        out.indexed = true;
        let stop = || {
            max_io_pressure > 0.0
                && self
                    .demand
                    .io_pressure()
                    .is_some_and(|p| p >= max_io_pressure)
        };
        for ((layer, diff_id), here) in resolved.layers.iter().zip(here) {
            let warmed = |outcome, listed, fetched| Warmed {
                layer: layer.clone(),
                outcome,
                listed,
                fetched,
            };
            let entry = match found.index.layer(layer) {
                Some(e) if &e.diff_id == diff_id => e.clone(),
                _ => {
                    out.layers.push(warmed(Outcome::NotIndexed, 0, 0));
                    continue;
                }
            };
            let key = key_of(&entry)?;
            if lock(&self.rejected).contains_key(&key) {
                out.layers.push(warmed(Outcome::Refused, 0, 0));
                continue;
            }
            let path = self.dir.join(format!("{key}.erofs"));
            // Looked up and registered under the lock Prepares take, so a
            // pull's file is never replaced by a parked one, nor the
            // reverse.
            let registering = self.registering.lock().await;
            let known = lock(&self.by_key).get(&key).cloned();
            let blob = match known.filter(|b| b.phase() != Phase::Discarded) {
                // Another index's copy, other chunk digests: a pull of this
                // image will not share it, so there is nothing to warm.
                Some(b) if !b.state.vouches_alike(&entry, found.index.chunk_size) => {
                    out.layers.push(warmed(
                        Outcome::Failed(format!(
                            "a lazy copy of this layer made from the index of {} with other chunk digests is on the node",
                            b.state.image
                        )),
                        0,
                        0,
                    ));
                    continue;
                }
                // Prewarmed before: it goes on where it ended, and is kept
                // for another PREWARM_KEEP.
                Some(b) if b.is_parked() => {
                    self.refresh_parked(&b);
                    drop(registering);
                    b
                }
                Some(_) => {
                    out.layers.push(warmed(Outcome::OnNode, 0, 0));
                    continue;
                }
                None => {
                    // A complete lazy copy a snapshot links, the layer
                    // fetched whole, or its chain committed (another
                    // image of the same base layers): no Prepare will
                    // come for it.
                    if here || file_id(&path).is_some_and(|(_, nlink)| nlink > 1) {
                        out.layers.push(warmed(Outcome::OnNode, 0, 0));
                        continue;
                    }
                    let shared = found.shared.get(&entry.erofs).cloned();
                    let taught = shared.as_ref().is_some_and(|l| !l.chunks.is_empty())
                        || self.prefetch.has(
                            &entry.erofs,
                            entry.unit(found.index.chunk_size),
                            entry.units(found.index.chunk_size),
                        );
                    if !taught {
                        out.layers.push(warmed(Outcome::NoList, 0, 0));
                        continue;
                    }
                    let parked = self.parked_bytes();
                    if parked >= MAX_PARKED_BYTES {
                        tracing::info!(image, layer = %layer, parked, limit = MAX_PARKED_BYTES, "prewarm: parked layers hold as much as they may; not prewarmed");
                        out.layers.push(warmed(Outcome::NoRoom, 0, 0));
                        continue;
                    }
                    let state = State {
                        image: image.into(),
                        chunk_size: found.index.chunk_size,
                        entry,
                        rejected: None,
                        prewarmed: Some(unix_now()),
                        shared: shared.map(|l| (*l).clone()),
                    };
                    let me = self.clone();
                    let blob = tokio::task::spawn_blocking(move || {
                        me.register(state, true, Download::AfterReads)
                    })
                    .await
                    .map_err(|e| Error::Io {
                        action: "register",
                        path: PathBuf::from(layer),
                        source: std::io::Error::other(e.to_string()),
                    })??;
                    drop(registering);
                    if let Err(e) = self.fetch_metadata(&blob).await {
                        let why = hyperbox_api::error_chain(&e);
                        tracing::warn!(image, layer = %layer, error = %why, "prewarm: cannot fetch the layer's metadata; nothing kept");
                        // Unless a pull took it meanwhile: its own
                        // Prepare fetches the metadata again.
                        let _registering = self.registering.lock().await;
                        if blob.is_parked() {
                            self.discard(&blob);
                        }
                        out.layers.push(warmed(Outcome::Failed(why), 0, 0));
                        continue;
                    }
                    self.counters
                        .prewarmed_layers
                        .fetch_add(1, Ordering::Relaxed);
                    blob
                }
            };
            let super::learned::Learned {
                listed,
                fetched,
                missing,
                stopped,
            } = self
                .fetch_learned(&blob, blob.chunks_in(self.fill_request), false, &stop)
                .await;
            let outcome = if stopped {
                self.counters.prewarm_stops.fetch_add(1, Ordering::Relaxed);
                Outcome::Stopped
            } else if missing > 0 {
                Outcome::Failed(format!(
                    "{missing} listed chunks could not be fetched (the snapshotter's log says why); a later prewarm or the pull fetches them"
                ))
            } else {
                Outcome::Prewarmed
            };
            tracing::info!(image, layer = %layer, listed, fetched, ?outcome, "layer prewarmed");
            out.layers.push(warmed(outcome, listed, fetched));
        }
        out.ms = started.elapsed().as_millis() as u64;
        Ok(out)
    }

    /// The bytes parked layers hold (their chunks in, metadata included).
    fn parked_bytes(&self) -> u64 {
        lock(&self.blobs)
            .values()
            .filter(|b| b.is_parked())
            .map(|b| {
                let n = lock(&b.present).iter().filter(|p| **p).count() as u64;
                n * b.state.unit()
            })
            .sum()
    }

    /// A parked layer prewarmed again: kept for another [`PREWARM_KEEP`].
    fn refresh_parked(&self, blob: &super::blob::Blob) {
        let now = unix_now();
        let mut state = blob.state.clone();
        state.prewarmed = Some(now);
        match write_durably(&blob.state_path, &state) {
            Ok(()) => blob.parked_at.store(now, Ordering::Relaxed),
            Err(e) => {
                tracing::warn!(layer = %blob.state.entry.layer, error = %e, "cannot record a prewarm again; the layer expires as first recorded")
            }
        }
    }

    /// A Prepare takes `blob` (under the registering lock): if it was
    /// prewarmed, that is recorded durably, so a restart does not park it
    /// again, and then its fill starts. When the record cannot be written
    /// the Prepare fails and the pull fetches the layer whole.
    pub(super) fn adopt(&self, blob: &super::blob::Blob) -> Result<(), Error> {
        if !blob.is_parked() {
            return Ok(());
        }
        let mut state = blob.state.clone();
        state.prewarmed = None;
        write_durably(&blob.state_path, &state)?;
        *lock(&blob.taken) = Instant::now();
        blob.parked.send_replace(false);
        self.counters.prewarm_used.fetch_add(1, Ordering::Relaxed);
        tracing::info!(layer = %blob.state.entry.layer, missing = blob.missing(), "prewarmed lazy layer taken by a pull");
        Ok(())
    }

    /// Waits while `blob` is parked; false when it left filling meanwhile.
    pub(super) async fn until_pulled(&self, blob: &super::blob::Blob) -> bool {
        let mut parked = blob.parked.subscribe();
        let mut phase = blob.phase.subscribe();
        tokio::select! {
            r = parked.wait_for(|p| !*p) => r.is_ok() && blob.phase() == Phase::Filling,
            _ = phase.wait_for(|p| *p != Phase::Filling) => false,
        }
    }

    /// Whether a parked layer has stayed unused past [`PREWARM_KEEP`].
    pub(super) fn prewarm_expired(blob: &super::blob::Blob) -> bool {
        blob.is_parked()
            && unix_now().saturating_sub(blob.parked_at.load(Ordering::Relaxed))
                > PREWARM_KEEP.as_secs()
    }
}
