//! The remote path: layers that containerd labels with their image are
//! fetched from the registry by us, verified, and converted to EROFS images
//! in `<root>/layers/<hex>.erofs`, from which snapshots take a hard link.
//!
//! Each layer digest is fetched at most once at a time: callers of
//! [`Remote::ensure`] for the same digest (containerd's Prepare, a prefetch,
//! another image that shares the layer) join one task. The task is spawned,
//! so it finishes even when the caller that started it goes away, and a
//! later Prepare finds the result on disk.
//!
//! Download and conversion are separate steps: the compressed blob lands in
//! `<root>/staging/<hex>.blob` (kept across retries and restarts so a
//! download resumes with a Range request), is verified against its digest,
//! and only then is converted; nothing is served from unverified bytes.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use hyperbox_registry::digest::Digest;
use hyperbox_registry::{Reference, Registry};

use hyperbox_erofs::convert::{self, convert};
use hyperbox_erofs::writer;

/// Errors of fetching a layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry could not deliver the blob.
    #[error("fetch layer {digest} of {image}")]
    Registry {
        /// Layer digest.
        digest: String,
        /// Image reference.
        image: String,
        /// The cause.
        #[source]
        source: hyperbox_registry::Error,
    },
    /// The layer's content is unacceptable (a malicious or malformed tar).
    #[error("layer {digest} of {image} cannot be served")]
    Content {
        /// Layer digest.
        digest: String,
        /// Image reference.
        image: String,
        /// The cause.
        #[source]
        source: writer::Error,
    },
    /// A label is malformed.
    #[error("{what}")]
    Label {
        /// What is wrong.
        what: String,
    },
    /// A local file operation failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether containerd could do better itself (it has its own network
    /// path and, for CRI, the kubelet's pull secrets): registry failures,
    /// never bad content.
    pub fn may_fall_back(&self) -> bool {
        match self {
            Error::Registry { source, .. } => source.is_unreachable(),
            _ => false,
        }
    }
}

type Fetch = Shared<BoxFuture<'static, Result<PathBuf, Arc<Error>>>>;

/// Fetches and converts layers; see the module comment.
#[derive(Debug)]
pub struct Remote {
    registry: Arc<Registry>,
    layers: PathBuf,
    staging: PathBuf,
    inflight: Mutex<HashMap<String, Fetch>>,
    options: writer::Options,
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.into(),
        source,
    }
}

impl Remote {
    /// Serves layers under `root` (`layers/`, `staging/`) from `registry`.
    pub fn open(
        root: &Path,
        registry: Arc<Registry>,
        options: writer::Options,
    ) -> Result<Remote, Error> {
        let layers = root.join("layers");
        let staging = root.join("staging");
        for d in [&layers, &staging] {
            fs::create_dir_all(d).map_err(io("create", d))?;
        }
        // Conversions interrupted by a crash; partial blobs stay to resume.
        for e in fs::read_dir(&staging).map_err(io("read", &staging))? {
            let e = e.map_err(io("read", &staging))?;
            let name = e.file_name().to_string_lossy().into_owned();
            // Blobs whose layer was converted before the crash are done.
            let converted = name
                .strip_suffix(".blob")
                .is_some_and(|hex| layers.join(format!("{hex}.erofs")).exists());
            if name.ends_with(".erofs.tmp") || converted {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(Remote {
            registry,
            layers,
            staging,
            inflight: Mutex::new(HashMap::new()),
            options,
        })
    }

    /// Where the EROFS image of layer `d` lives once converted.
    pub fn layer_path(&self, d: &Digest) -> PathBuf {
        self.layers.join(format!("{}.erofs", d.hex()))
    }

    /// The EROFS image of layer `digest` of `image`, fetching and
    /// converting it unless it is on disk or already on its way.
    pub async fn ensure(
        self: &Arc<Self>,
        image: &str,
        digest: &str,
    ) -> Result<PathBuf, Arc<Error>> {
        let d = Digest::parse(digest).map_err(|e| {
            Arc::new(Error::Label {
                what: format!("label cri.layer-digest: {e}"),
            })
        })?;
        let done = self.layer_path(&d);
        // A sibling `.lazy` means the file there is sparse: fetch whole.
        let lazy = self.layers.join(format!("{}.lazy", d.hex()));
        if done.exists() && !lazy.exists() {
            return Ok(done);
        }
        let fetch = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = inflight.get(d.hex()) {
                f.clone()
            } else {
                let me = self.clone();
                let image = image.to_string();
                let key = d.hex().to_string();
                let task = tokio::spawn(async move {
                    let r = me.fetch(&image, &d).await.map_err(Arc::new);
                    me.inflight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(d.hex());
                    r
                });
                let f: Fetch = async move {
                    task.await.unwrap_or_else(|e| {
                        Err(Arc::new(Error::Label {
                            what: format!("layer fetch task failed: {e}"),
                        }))
                    })
                }
                .boxed()
                .shared();
                inflight.insert(key, f.clone());
                f
            }
        };
        fetch.await
    }

    /// Starts fetching `digests` of `image` without waiting (the
    /// `cri.image-layers` label: the layers containerd will Prepare next).
    pub fn prefetch(self: &Arc<Self>, image: &str, digests: &[String]) {
        for d in digests {
            let me = self.clone();
            let image = image.to_string();
            let d = d.clone();
            tokio::spawn(async move {
                if let Err(e) = me.ensure(&image, &d).await {
                    tracing::warn!(layer = %d, error = %hyperbox_api::error_chain(&*e), "prefetch failed; the layer's Prepare will try again");
                }
            });
        }
    }

    async fn fetch(&self, image: &str, d: &Digest) -> Result<PathBuf, Error> {
        let registry_err = |source| Error::Registry {
            digest: d.to_string(),
            image: image.into(),
            source,
        };
        let r = Reference::parse(image).map_err(registry_err)?;
        let blob = self.staging.join(format!("{}.blob", d.hex()));
        let started = std::time::Instant::now();
        let size = self
            .registry
            .fetch_blob_to_file(&r, d, &blob, &|_, _| {})
            .await
            .map_err(registry_err)?;
        let fetched = started.elapsed();
        let out = self.layer_path(d);
        let tmp = self.staging.join(format!("{}.erofs.tmp", d.hex()));
        let (image_s, digest_s) = (image.to_string(), d.to_string());
        let (blob2, tmp2, out2) = (blob.clone(), tmp.clone(), out.clone());
        let options = self.options;
        let summary = tokio::task::spawn_blocking(move || convert(&blob2, &tmp2, &out2, options))
            .await
            .map_err(|e| Error::Label {
                what: format!("conversion task failed: {e}"),
            })?
            .map_err(|e| match e {
                convert::Error::Content(source) => Error::Content {
                    digest: digest_s,
                    image: image_s,
                    source,
                },
                convert::Error::Io {
                    action,
                    path,
                    source,
                } => Error::Io {
                    action,
                    path,
                    source,
                },
            });
        // The blob was verified; whether or not it converted, it is done.
        let _ = fs::remove_file(&blob);
        let _ = fs::remove_file(&tmp);
        let s = summary?;
        tracing::info!(
            layer = %d, image, compressed = size, inodes = s.inodes, image_bytes = s.image_bytes,
            fetch_ms = fetched.as_millis() as u64,
            convert_ms = (started.elapsed() - fetched).as_millis() as u64,
            "layer fetched and converted"
        );
        Ok(out)
    }

    /// Removes converted layers no snapshot links to any more and that are
    /// older than `min_age` (younger ones may be prefetched for a Prepare
    /// still to come).
    pub fn prune(&self, min_age: std::time::Duration) -> Result<Vec<PathBuf>, Error> {
        use std::os::unix::fs::MetadataExt;
        let mut removed = Vec::new();
        let busy: Vec<String> = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for e in fs::read_dir(&self.layers).map_err(io("read", &self.layers))? {
            let e = e.map_err(io("read", &self.layers))?;
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if busy.iter().any(|b| name.starts_with(b.as_str())) || !name.ends_with(".erofs") {
                continue;
            }
            // Incomplete lazy layers belong to the lazy path's own prune.
            if self.layers.join(name.replace(".erofs", ".lazy")).exists() {
                continue;
            }
            let Ok(m) = e.metadata() else { continue };
            let old = m
                .modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|a| a >= min_age);
            if m.nlink() == 1 && old {
                fs::remove_file(&p).map_err(io("remove", &p))?;
                removed.push(p);
            }
        }
        Ok(removed)
    }
}
