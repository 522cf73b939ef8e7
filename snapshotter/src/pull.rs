//! The remote path's policy for a Prepare that unpacks a layer: when the
//! labels CRI and nerdctl send name the layer's image, serve the layer
//! ourselves instead of letting containerd download and apply it.
//!
//! In order: a target that already exists is done; an image with a
//! hyperbox index is mounted at once and fetched lazily ([`Lazy`]); any
//! other layer (or a lazy attempt that failed before anything was served)
//! is fetched whole, verified and converted ([`Remote`]), while the image's
//! other layers are prefetched. When the registry cannot be reached and
//! `fallback_to_local` is on, containerd gets the layer to unpack itself.
//! A layer served either way is committed as the target snapshot, and the
//! answer tells containerd to skip download and unpack.
//!
//! A wholly fetched layer is committed only if the chain id containerd
//! asked for (`snapshot.ref`, computed from the image config's diff_ids) is
//! the one the layer's verified diff_id gives on the Prepare's parent
//! snapshot (whose name is the parent's chain id): `diff_id` without a
//! parent, else `sha256(parent + " " + diff_id)`. Otherwise an image whose
//! config claims another image's diff_id would get its own bytes committed
//! under the other image's chain id, and containerd would hand them to
//! every later pull of that image.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyperbox_api::error_chain;
use hyperbox_api::labels::{
    CRI_IMAGE_LAYERS, CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST, SNAPSHOT_REF,
};
use hyperbox_registry::digest::chain_id;

use crate::lazy::Lazy;
use crate::remote::{self, Remote};
use crate::snapshots::{self, Snapshotter};

/// How long a pull waits for the verification of a lazily served layer
/// another image's index made before it may share it.
const SHARE_WAIT: Duration = Duration::from_secs(300);
/// Converted layers younger than this survive Cleanup: a prefetch may have
/// made one for a Prepare still on its way.
const PREFETCH_GRACE: Duration = Duration::from_secs(600);

/// Errors of serving a layer from its registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Recording the served layer as a snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] snapshots::Error),
    /// A lazily served layer could not be mounted because reads of it
    /// failed (the kernel saw EIO); `why` is the failure the reads met.
    #[error("mount layer {layer} lazily, whose reads failed: {why}")]
    LazyRead {
        /// Layer digest.
        layer: String,
        /// Why the reads failed.
        why: String,
        /// The failed mount.
        #[source]
        source: snapshots::Error,
    },
    /// The layer could not be fetched and converted; its message is the
    /// containerd user's only clue, so it is passed on whole.
    #[error(transparent)]
    Fetch(Arc<remote::Error>),
    /// The target exists but was served lazily from another image's index
    /// and did not pass (or has not yet passed) verification.
    #[error("snapshot {target} cannot be shared with this pull: {why}")]
    Unverified {
        /// The target snapshot.
        target: String,
        /// Why.
        why: String,
    },
    /// Removing unused layer images failed.
    #[error("remove unused layer images")]
    Prune {
        /// The cause.
        #[source]
        source: remote::Error,
    },
    /// A blocking task died.
    #[error("{what} did not finish")]
    Task {
        /// The task.
        what: &'static str,
        /// The cause (a panic).
        #[source]
        source: tokio::task::JoinError,
    },
}

type Result<T> = std::result::Result<T, Error>;

/// The remote labels of a Prepare that unpacks a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerLabels {
    /// The committed snapshot the unpack would produce (`snapshot.ref`).
    pub target: String,
    /// The image reference (`cri.image-ref`).
    pub image: String,
    /// The layer's blob digest (`cri.layer-digest`).
    pub layer: String,
    /// The image manifest's digest, which finds its hyperbox index.
    pub manifest: Option<String>,
    /// The image's layers after this one (`cri.image-layers`, without
    /// this layer), to prefetch.
    pub following: Vec<String>,
}

impl LayerLabels {
    /// The remote labels in `labels`; `None` unless the target, image and
    /// layer are all named (then the Prepare is a plain local one).
    pub fn parse(labels: &BTreeMap<String, String>) -> Option<LayerLabels> {
        let target = labels.get(SNAPSHOT_REF)?;
        let image = labels.get(CRI_IMAGE_REF)?;
        let layer = labels.get(CRI_LAYER_DIGEST)?;
        let following = labels
            .get(CRI_IMAGE_LAYERS)
            .map(|all| {
                all.split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty() && d != layer)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        Some(LayerLabels {
            target: target.clone(),
            image: image.clone(),
            layer: layer.clone(),
            manifest: labels.get(CRI_MANIFEST_DIGEST).cloned(),
            following,
        })
    }
}

/// What a labelled Prepare came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pulled {
    /// The target snapshot exists now: containerd is told it already
    /// exists and skips download and unpack.
    Target(String),
    /// containerd fetches and unpacks the layer itself.
    Local,
}

/// `[snapshotter]` settings of the remote path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Hand unreachable registries back to containerd (local unpack).
    pub fallback_to_local: bool,
    /// Fetch the image's following layers ahead.
    pub prefetch: bool,
    /// Whether new layers may take the lazy path (`snapshotter.lazy`);
    /// layers already on it are served either way.
    pub lazy_new: bool,
}

/// Serves labelled Prepares; see the module comment.
#[derive(Debug)]
pub struct Puller {
    sn: Arc<Snapshotter>,
    remote: Arc<Remote>,
    /// The lazy path, where the kernel allows it.
    lazy: Option<Arc<Lazy>>,
    options: Options,
}

impl Puller {
    /// Commits served layers into `sn`.
    pub fn new(
        sn: Arc<Snapshotter>,
        remote: Arc<Remote>,
        lazy: Option<Arc<Lazy>>,
        options: Options,
    ) -> Puller {
        Puller {
            sn,
            remote,
            lazy,
            options,
        }
    }

    /// Serves the layer `l` names as committed snapshot `l.target` on
    /// `parent`, with `labels` (the Prepare's, remote ones included).
    pub async fn prepare(
        &self,
        l: &LayerLabels,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Pulled> {
        let target = l.target.clone();
        let exists = self
            .blocking("stat", move |s| match s.stat(&target) {
                Ok(_) => Ok(true),
                Err(snapshots::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(e),
            })
            .await?;
        if exists {
            self.check_shared(l).await?;
            return Ok(Pulled::Target(l.target.clone()));
        }
        let started = Instant::now();
        if let Some(p) = self.prepare_lazy(l, parent, &labels).await? {
            tracing::info!(
                target = %l.target,
                layer = %l.layer,
                ms = started.elapsed().as_millis() as u64,
                "layer mounted lazily from the image's hyperbox index"
            );
            return Ok(p);
        }
        if self.options.prefetch && !l.following.is_empty() {
            self.remote.prefetch(&l.image, &l.following);
        }
        let layer = match self.remote.ensure(&l.image, &l.layer).await {
            Ok(c) => c,
            Err(e) if self.options.fallback_to_local && e.may_fall_back() => {
                tracing::warn!(
                    layer = %l.layer, image = %l.image, error = %error_chain(&*e),
                    "cannot fetch the layer; containerd will fetch and unpack it"
                );
                return Ok(Pulled::Local);
            }
            Err(e) => {
                tracing::error!(layer = %l.layer, image = %l.image, error = %error_chain(&*e), "layer refused");
                return Err(Error::Fetch(e));
            }
        };
        if chain_id(parent, &layer.diff_id) != l.target {
            let promised = if parent.is_empty() {
                Some(l.target.clone())
            } else {
                // Only a diff_id that gives the asked chain id is the one
                // containerd computed it from.
                self.remote
                    .promised_diff_id(&l.image, &l.layer)
                    .await
                    .filter(|p| chain_id(parent, p) == l.target)
            };
            let e = remote::Error::DiffId(Box::new(remote::Mismatch {
                layer: l.layer.clone(),
                image: l.image.clone(),
                promised,
                diff_id: layer.diff_id,
                target: l.target.clone(),
                parent: parent.to_string(),
            }));
            tracing::error!(error = %e, "layer refused");
            return Err(Error::Fetch(Arc::new(e)));
        }
        self.commit(l, parent, labels, layer.path).await?;
        tracing::info!(
            target = %l.target,
            layer = %l.layer,
            ms = started.elapsed().as_millis() as u64,
            "layer served from the registry as EROFS"
        );
        Ok(Pulled::Target(l.target.clone()))
    }

    /// The lazy attempt: `None` sends the caller to the whole fetch (no
    /// index, lazy pulls off, or a failure before anything was served).
    async fn prepare_lazy(
        &self,
        l: &LayerLabels,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<Pulled>> {
        let (Some(lazy), Some(manifest)) = (&self.lazy, &l.manifest) else {
            return Ok(None);
        };
        if !self.options.lazy_new && !lazy.knows(&l.layer) {
            return Ok(None);
        }
        let path = match lazy
            .prepare(&l.image, manifest, &l.layer, parent, &l.target)
            .await
        {
            Ok(Some(path)) => path,
            Ok(None) => return Ok(None),
            Err(e) => {
                // Nothing of it was served; the whole layer, verified
                // against the image's own digest, replaces it.
                tracing::warn!(layer = %l.layer, error = %error_chain(&e), "lazy path failed; fetching the layer whole");
                return Ok(None);
            }
        };
        match self.commit(l, parent, labels.clone(), path.clone()).await {
            Ok(()) => Ok(Some(Pulled::Target(l.target.clone()))),
            Err(e) if let Some(why) = lazy.refused_why(&path) => {
                // Checked and refused before this pull committed it (a
                // small layer downloaded whole at once): nothing was
                // served, and the whole fetch, held to the image's own
                // digests, says what is wrong with it, or serves it.
                tracing::warn!(
                    layer = %l.layer,
                    why,
                    error = %error_chain(&e),
                    "lazy copy refused before it was committed; fetching the layer whole"
                );
                Ok(None)
            }
            Err(Error::Snapshot(source)) => {
                // The mount read through the lazy path and got EIO: say why.
                let why = lazy.last_error(&path);
                lazy.forget(&path);
                Err(match why {
                    Some(why) => Error::LazyRead {
                        layer: l.layer.clone(),
                        why,
                        source,
                    },
                    None => Error::Snapshot(source),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// A target that exists may have been served lazily from another
    /// image's index and not be verified yet: it is shared with this pull
    /// only once it is (see [`Lazy::wait_trusted`]).
    async fn check_shared(&self, l: &LayerLabels) -> Result<()> {
        let Some(lazy) = &self.lazy else {
            return Ok(());
        };
        let target = l.target.clone();
        let file = match self.blocking("stat", move |s| s.layer_file(&target)).await {
            Ok(Some(f)) => f,
            Ok(None) | Err(Error::Snapshot(snapshots::Error::NotFound { .. })) => return Ok(()),
            Err(e) => return Err(e),
        };
        lazy.wait_trusted(&file, &l.image, l.manifest.as_deref(), &l.layer, SHARE_WAIT)
            .await
            .map_err(|why| Error::Unverified {
                target: l.target.clone(),
                why,
            })
    }

    /// Commits the image at `path` as the target; a target committed by
    /// another pull of an image sharing the layer is as good.
    async fn commit(
        &self,
        l: &LayerLabels,
        parent: &str,
        labels: BTreeMap<String, String>,
        path: std::path::PathBuf,
    ) -> Result<()> {
        let (target, parent, digest) = (l.target.clone(), parent.to_string(), l.layer.clone());
        match self
            .blocking("commit layer", move |s| {
                s.commit_layer(&target, &parent, labels, &path, &digest)
            })
            .await
        {
            Ok(()) | Err(Error::Snapshot(snapshots::Error::AlreadyExists { .. })) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes lazy layers and converted images no snapshot uses any more.
    pub async fn cleanup(&self) -> Result<()> {
        if let Some(lazy) = &self.lazy {
            let lazy = lazy.clone();
            let pruned = tokio::task::spawn_blocking(move || lazy.prune())
                .await
                .map_err(|source| Error::Task {
                    what: "lazy layer prune",
                    source,
                })?;
            if !pruned.is_empty() {
                tracing::info!(removed = pruned.len(), "cleanup removed unused lazy layers");
            }
        }
        let remote = self.remote.clone();
        let pruned = tokio::task::spawn_blocking(move || remote.prune(PREFETCH_GRACE))
            .await
            .map_err(|source| Error::Task {
                what: "layer image prune",
                source,
            })?
            .map_err(|source| Error::Prune { source })?;
        if !pruned.is_empty() {
            tracing::info!(
                removed = pruned.len(),
                "cleanup removed unused layer images"
            );
        }
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&Snapshotter) -> std::result::Result<T, snapshots::Error> + Send + 'static,
    ) -> Result<T> {
        let sn = self.sn.clone();
        Ok(tokio::task::spawn_blocking(move || f(&sn))
            .await
            .map_err(|source| Error::Task { what, source })??)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyperbox_registry::digest::Digest;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn chain_ids_of_served_layers_follow_containerds_rule() {
        let a = Digest::of(b"a").to_string();
        let b = Digest::of(b"b").to_string();
        let c = Digest::of(b"c").to_string();
        let want = hyperbox_registry::digest::chain_ids(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(chain_id("", &a), want[0]);
        assert_eq!(chain_id(&want[0], &b), want[1]);
        assert_eq!(chain_id(&want[1], &c), want[2]);
        // Another diff_id on the same parent never gives the same chain.
        assert_ne!(chain_id(&want[0], &c), want[1]);
    }

    #[test]
    fn remote_labels_need_target_image_and_layer() {
        let full = labels(&[
            (SNAPSHOT_REF, "sha256:chain"),
            (CRI_IMAGE_REF, "127.0.0.1:5000/x:1"),
            (CRI_LAYER_DIGEST, "sha256:a"),
            (CRI_MANIFEST_DIGEST, "sha256:m"),
            (CRI_IMAGE_LAYERS, "sha256:a, sha256:b,,sha256:c"),
        ]);
        let l = LayerLabels::parse(&full).unwrap();
        assert_eq!(l.target, "sha256:chain");
        assert_eq!(l.image, "127.0.0.1:5000/x:1");
        assert_eq!(l.layer, "sha256:a");
        assert_eq!(l.manifest.as_deref(), Some("sha256:m"));
        assert_eq!(
            l.following,
            ["sha256:b", "sha256:c"],
            "this layer is not prefetched"
        );
        for missing in [SNAPSHOT_REF, CRI_IMAGE_REF, CRI_LAYER_DIGEST] {
            let mut partial = full.clone();
            partial.remove(missing);
            assert_eq!(LayerLabels::parse(&partial), None, "without {missing}");
        }
        let mut bare = full.clone();
        bare.remove(CRI_MANIFEST_DIGEST);
        bare.remove(CRI_IMAGE_LAYERS);
        let l = LayerLabels::parse(&bare).unwrap();
        assert_eq!((l.manifest, l.following.len()), (None, 0));
    }
}
