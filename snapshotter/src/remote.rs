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
//! The download never reads past the size the image's manifest gives the
//! layer (looked up once per image and kept a minute, for the layers of
//! one pull), or, when no manifest of the image names it, past
//! `max_layer_bytes` and a margin: a blob sent without a length
//! (chunked) would otherwise be read until the disk is full.
//!
//! Conversion hashes the decompressed stream: the layer's diff_id as its
//! bytes give it. It is recorded next to the image, in `<hex>.diffid`
//! (written, fsynced, then renamed in), together with the identity of the
//! image file it vouches for (inode, size, mtime), so a file replaced or
//! rewritten since is never taken for verified. Every Prepare served from
//! the file checks its chain id against that diff_id ([`crate::pull`]);
//! a file without a valid record (one converted before records existed,
//! or left by the lazy path) is fetched and converted again.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use hyperbox_registry::digest::Digest;
use hyperbox_registry::{BlobSize, Pace, Reference, Registry};

use hyperbox_erofs::convert::{self, convert_hashed};
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
    /// The layer's content is not what the image promises: the chain id
    /// containerd asked for is not the one its verified diff_id gives.
    #[error("layer {} of {} does not have the content its image promises: {}", .0.layer, .0.image, .0)]
    DiffId(Box<Mismatch>),
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

/// A layer whose verified diff_id does not give the chain id asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Layer digest.
    pub layer: String,
    /// Image reference.
    pub image: String,
    /// The diff_id the image config gives the layer, when known.
    pub promised: Option<String>,
    /// The diff_id the layer's bytes have.
    pub diff_id: String,
    /// The chain id containerd asked for.
    pub target: String,
    /// The parent snapshot (its chain id), empty for a bottom layer.
    pub parent: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Mismatch {
            promised,
            diff_id,
            target,
            parent,
            ..
        } = self;
        let on = if parent.is_empty() {
            String::new()
        } else {
            format!(" on parent {parent}")
        };
        match promised {
            Some(p) => write!(
                f,
                "the image config says diff_id {p}, its uncompressed content has diff_id {diff_id} (chain id {target} asked for{on})"
            ),
            None => write!(
                f,
                "its uncompressed content has diff_id {diff_id}, which does not give the chain id {target} asked for{on}"
            ),
        }
    }
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

    /// Whether the download was stopped because the lazy layer it was for
    /// is no longer wanted ([`Pace`]).
    pub fn is_stopped(&self) -> bool {
        matches!(
            self,
            Error::Registry {
                source: hyperbox_registry::Error::Stopped { .. },
                ..
            }
        )
    }
}

/// A converted layer image and the diff_id its content was verified to
/// have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    /// The EROFS image file.
    pub path: PathBuf,
    /// The digest of the layer's decompressed tar (`sha256:<hex>`).
    pub diff_id: String,
}

/// What `<hex>.diffid` holds: the diff_id, and which file it was measured
/// for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Record {
    diff_id: String,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl Record {
    fn of(path: &Path, diff_id: &str) -> std::io::Result<Record> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path)?;
        Ok(Record {
            diff_id: diff_id.into(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

type Fetch = Shared<BoxFuture<'static, Result<Converted, Arc<Error>>>>;

/// How long the layer sizes of an image's manifest are kept: the layers of
/// one pull (Prepares and prefetches) share one manifest request.
const SIZES_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// The layer sizes of one image's manifest, looked up once for all its
/// layers; `None` when the manifest could not be had.
#[derive(Debug)]
struct Sizes {
    at: std::time::Instant,
    sizes: tokio::sync::OnceCell<Option<HashMap<String, u64>>>,
}

/// Fetches and converts layers; see the module comment.
#[derive(Debug)]
pub struct Remote {
    registry: Arc<Registry>,
    layers: PathBuf,
    staging: PathBuf,
    /// Layer fetches under way, each with whether a caller that must not
    /// be paced (a Prepare, a prefetch) joined it.
    inflight: Mutex<HashMap<String, (Fetch, Arc<AtomicBool>)>>,
    options: writer::Options,
    /// Layer sizes by image reference.
    sizes: Mutex<HashMap<String, Arc<Sizes>>>,
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
            if name.ends_with(".erofs.tmp") || name.ends_with(".diffid.tmp") || converted {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(Remote {
            registry,
            layers,
            staging,
            inflight: Mutex::new(HashMap::new()),
            options,
            sizes: Mutex::new(HashMap::new()),
        })
    }

    /// Where the EROFS image of layer `d` lives once converted.
    pub fn layer_path(&self, d: &Digest) -> PathBuf {
        self.layers.join(format!("{}.erofs", d.hex()))
    }

    fn record_path(&self, d: &Digest) -> PathBuf {
        self.layers.join(format!("{}.diffid", d.hex()))
    }

    /// The diff_id recorded for the image file of layer `d`, if the record
    /// is valid and vouches for the file there now.
    fn recorded(&self, d: &Digest) -> Option<String> {
        let text = fs::read(self.record_path(d)).ok()?;
        let rec: Record = serde_json::from_slice(&text).ok()?;
        Digest::parse(&rec.diff_id).ok()?;
        let now = Record::of(&self.layer_path(d), &rec.diff_id).ok()?;
        (now == rec).then_some(rec.diff_id)
    }

    /// Records `diff_id` for the image file of layer `d` durably: written
    /// and fsynced aside, renamed in, the directory fsynced.
    fn record(&self, d: &Digest, diff_id: &str) -> Result<(), Error> {
        use std::io::Write;
        let out = self.layer_path(d);
        let rec = Record::of(&out, diff_id).map_err(io("stat", &out))?;
        let tmp = self.staging.join(format!("{}.diffid.tmp", d.hex()));
        let dst = self.record_path(d);
        let mut f = fs::File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(&serde_json::to_vec(&rec).expect("record serializes"))
            .map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
        fs::rename(&tmp, &dst).map_err(io("rename", &dst))?;
        let _ = fs::File::open(&self.layers).and_then(|d| d.sync_all());
        Ok(())
    }

    /// The EROFS image of layer `digest` of `image` and its verified
    /// diff_id, fetching and converting it unless it is on disk with a
    /// valid record or already on its way.
    pub async fn ensure(
        self: &Arc<Self>,
        image: &str,
        digest: &str,
    ) -> Result<Converted, Arc<Error>> {
        self.ensure_paced(image, digest, None).await
    }

    /// [`Remote::ensure`], the download reading only as `pace` lets it (a
    /// lazy layer's fill gives way to reads). A caller without a pace
    /// joining it (a Prepare or prefetch of the same layer) lifts the pace
    /// for the rest of the download: it must not wait on another image's
    /// reads.
    pub async fn ensure_paced(
        self: &Arc<Self>,
        image: &str,
        digest: &str,
        pace: Option<Pace>,
    ) -> Result<Converted, Arc<Error>> {
        loop {
            let got = self.ensure_once(image, digest, pace.clone()).await;
            match &got {
                // A download started for a lazy layer that was removed
                // meanwhile stopped under a caller that still needs the
                // layer: it starts its own.
                Err(e) if pace.is_none() && e.is_stopped() => {
                    tracing::debug!(
                        layer = digest,
                        "joined a download its lazy layer gave up; fetching again"
                    );
                }
                _ => return got,
            }
        }
    }

    async fn ensure_once(
        self: &Arc<Self>,
        image: &str,
        digest: &str,
        pace: Option<Pace>,
    ) -> Result<Converted, Arc<Error>> {
        let d = Digest::parse(digest).map_err(|e| {
            Arc::new(Error::Label {
                what: format!("label cri.layer-digest: {e}"),
            })
        })?;
        let done = self.layer_path(&d);
        // A sibling `.lazy` means the file there is sparse: fetch whole.
        let lazy = self.layers.join(format!("{}.lazy", d.hex()));
        if done.exists() && !lazy.exists() {
            match self.recorded(&d) {
                Some(diff_id) => {
                    return Ok(Converted {
                        path: done,
                        diff_id,
                    });
                }
                None => tracing::info!(
                    layer = %d,
                    "layer image without a valid diff_id record; fetching and converting it again"
                ),
            }
        }
        let fetch = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((f, urgent)) = inflight.get(d.hex()) {
                if pace.is_none() {
                    urgent.store(true, Ordering::Relaxed);
                }
                f.clone()
            } else {
                let me = self.clone();
                let image = image.to_string();
                let key = d.hex().to_string();
                let urgent = Arc::new(AtomicBool::new(false));
                let pace = pace.map(|p| -> Pace {
                    let urgent = urgent.clone();
                    Arc::new(move |n| {
                        if urgent.load(Ordering::Relaxed) {
                            return Box::pin(async { true });
                        }
                        // An unpaced caller may join while the pace waits.
                        let (wait, urgent) = (p(n), urgent.clone());
                        Box::pin(async move { wait.await || urgent.load(Ordering::Relaxed) })
                    })
                });
                let joined = urgent.clone();
                let task = tokio::spawn(async move {
                    let r = me.fetch(&image, &d, pace, &joined).await.map_err(Arc::new);
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
                inflight.insert(key, (f.clone(), urgent));
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

    /// `urgent` is set once a caller without a pace joined.
    async fn fetch(
        &self,
        image: &str,
        d: &Digest,
        pace: Option<Pace>,
        urgent: &AtomicBool,
    ) -> Result<Converted, Error> {
        let registry_err = |source| Error::Registry {
            digest: d.to_string(),
            image: image.into(),
            source,
        };
        let r = Reference::parse(image).map_err(registry_err)?;
        let blob = self.staging.join(format!("{}.blob", d.hex()));
        let started = std::time::Instant::now();
        let paced = pace.is_some();
        let bound = self.blob_size(image, &r, d).await;
        let size = self
            .registry
            .fetch_blob_to_file_paced(&r, d, bound, &blob, &|_, _| {}, pace)
            .await
            .map_err(registry_err)?;
        let fetched = started.elapsed();
        let out = self.layer_path(d);
        let tmp = self.staging.join(format!("{}.erofs.tmp", d.hex()));
        let (image_s, digest_s) = (image.to_string(), d.to_string());
        let (blob2, tmp2, out2) = (blob.clone(), tmp.clone(), out.clone());
        let options = self.options;
        // A paced download is a lazy layer's fill: its container is
        // already running and the snapshotter serving its reads, which
        // come first (demand first, as the download gives the link); nice
        // ranks threads within the snapshotter's own cgroup. Not once a
        // Prepare waits for it (joined before the conversion starts; one
        // joining later waits on the lower priority).
        let background = paced && !urgent.load(Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        spawn_named("hb-convert", background, move || {
            let _ = tx.send(convert_hashed(&blob2, &tmp2, &out2, options));
        })
        .map_err(|e| Error::Label {
            what: format!("cannot start the conversion thread: {e}"),
        })?;
        let converted = rx
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
        let c = converted?;
        self.record(d, &c.diff_id)?;
        let s = c.summary;
        tracing::info!(
            layer = %d, image, diff_id = %c.diff_id, compressed = size, inodes = s.inodes, image_bytes = s.image_bytes,
            fetch_ms = fetched.as_millis() as u64,
            convert_ms = (started.elapsed() - fetched).as_millis() as u64,
            "layer fetched and converted"
        );
        Ok(Converted {
            path: out,
            diff_id: c.diff_id,
        })
    }

    /// How long layer `d` of `image` may be: the size the image's manifest
    /// gives it, else (the manifest cannot be had, or names no such layer:
    /// its tag moved) `max_layer_bytes` plus 1/64 for tar headers and
    /// compression framing on incompressible files.
    async fn blob_size(&self, image: &str, r: &Reference, d: &Digest) -> BlobSize {
        let entry = {
            let mut all = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
            all.retain(|_, s| s.at.elapsed() < SIZES_TTL);
            all.entry(image.to_string())
                .or_insert_with(|| {
                    Arc::new(Sizes {
                        at: std::time::Instant::now(),
                        sizes: tokio::sync::OnceCell::new(),
                    })
                })
                .clone()
        };
        let sizes = entry
            .sizes
            .get_or_init(|| async {
                match self.registry.layer_descriptors(r).await {
                    Ok(layers) => Some(
                        layers
                            .into_iter()
                            .map(|l| (l.digest, l.size.max(0) as u64))
                            .collect(),
                    ),
                    Err(e) => {
                        tracing::warn!(image, error = %hyperbox_api::error_chain(&e), "cannot read the image's manifest for its layer sizes; downloads are bounded by max_layer_bytes");
                        None
                    }
                }
            })
            .await;
        match sizes.as_ref().and_then(|s| s.get(&d.to_string())) {
            Some(n) => BlobSize::Exact(*n),
            None => {
                let most = self.options.max_layer_bytes;
                BlobSize::AtMost(most.saturating_add(most / 64))
            }
        }
    }

    /// The diff_id the config of `image` (as the registry serves it now)
    /// gives layer `layer`, for error messages; `None` when it cannot be
    /// told.
    pub async fn promised_diff_id(&self, image: &str, layer: &str) -> Option<String> {
        let r = Reference::parse(image).ok()?;
        let resolved = self.registry.resolve(&r).await.ok()?;
        let i = resolved.layers.iter().position(|l| l.digest == layer)?;
        resolved.diff_ids.get(i).cloned()
    }

    /// Removes converted layers no snapshot links to any more and that are
    /// older than `min_age` (younger ones may be prefetched for a Prepare
    /// still to come), and partial downloads no fetch has touched for
    /// [`STAGING_KEEP`] (a lazy layer's fill given up or its layer removed
    /// between attempts: the next fetch of that layer would have resumed
    /// them by then).
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
                // The record first: a record without its file is harmless,
                // a file without its record is converted again.
                let _ = fs::remove_file(p.with_extension("diffid"));
                fs::remove_file(&p).map_err(io("remove", &p))?;
                removed.push(p);
            }
        }
        for e in fs::read_dir(&self.staging).map_err(io("read", &self.staging))? {
            let e = e.map_err(io("read", &self.staging))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".blob") else {
                continue;
            };
            if busy.iter().any(|b| b == hex) {
                continue;
            }
            let untouched = e
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|a| a >= STAGING_KEEP);
            if untouched {
                let p = e.path();
                fs::remove_file(&p).map_err(io("remove", &p))?;
                removed.push(p);
            }
        }
        Ok(removed)
    }
}

/// Nice value of background work for lazy layers' fills.
const BACKGROUND_NICE: libc::c_int = 10;

/// Runs `f` on a thread of its own named `name`, at [`BACKGROUND_NICE`]
/// when `background` (its own thread, so no pooled one keeps the nice).
pub(crate) fn spawn_named(
    name: &str,
    background: bool,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if background {
                lower_priority();
            }
            f()
        })
        .map(drop)
}

/// Lowers the calling thread's CPU priority to [`BACKGROUND_NICE`]
/// (Linux applies `setpriority` with a thread id to that thread alone).
/// Best effort: the work at normal priority is still correct.
fn lower_priority() {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: plain syscall on this thread's id; no memory is passed.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the conversion's priority");
    }
}

/// How long a partial download is kept for a fetch to resume.
const STAGING_KEEP: std::time::Duration = std::time::Duration::from_secs(3600);

/// Checks completed lazy layers against the whole layer as this path
/// fetches it: verified compressed digest, diff_id hashed while converting.
/// Fetches join those of Prepares and prefetches of the same layer.
#[derive(Debug)]
pub struct WholeLayers(pub Arc<Remote>);

impl crate::lazy::Verifier for WholeLayers {
    fn whole<'a>(
        &'a self,
        image: &'a str,
        layer: &'a str,
        pace: Option<Pace>,
    ) -> BoxFuture<'a, Result<(PathBuf, String), crate::lazy::WholeError>> {
        async move {
            self.0
                .ensure_paced(image, layer, pace)
                .await
                .map(|c| (c.path, c.diff_id))
                .map_err(|e| crate::lazy::WholeError {
                    why: hyperbox_api::error_chain(&*e),
                    bad_content: matches!(*e, Error::Content { .. } | Error::DiffId(_)),
                    stopped: e.is_stopped(),
                })
        }
        .boxed()
    }

    fn staged(&self, layer: &str) -> Option<PathBuf> {
        let d = Digest::parse(layer).ok()?;
        Some(self.0.staging.join(format!("{}.blob", d.hex())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(root: &Path) -> Remote {
        let cfg = hyperbox_config::Registry {
            config_path: root.join("certs.d"),
            docker_config: root.join("none.json"),
            ..Default::default()
        };
        let registry = Arc::new(Registry::new(&cfg).unwrap());
        Remote::open(root, registry, writer::Options::default()).unwrap()
    }

    #[test]
    fn a_diff_id_record_vouches_only_for_the_file_it_was_made_for() {
        let dir = tempfile::tempdir().unwrap();
        let r = remote(dir.path());
        let d = Digest::of(b"layer blob");
        let diff_id = Digest::of(b"layer tar").to_string();
        let path = r.layer_path(&d);
        fs::write(&path, b"erofs image").unwrap();
        assert_eq!(r.recorded(&d), None, "a file from before records");
        r.record(&d, &diff_id).unwrap();
        assert_eq!(r.recorded(&d), Some(diff_id.clone()));
        assert!(
            fs::read_dir(dir.path().join("staging"))
                .unwrap()
                .next()
                .is_none(),
            "nothing left aside"
        );

        // Replaced (a new file renamed in): the record no longer holds.
        let other = dir.path().join("other");
        fs::write(&other, b"other image").unwrap();
        fs::rename(&other, &path).unwrap();
        assert_eq!(r.recorded(&d), None, "replaced file");

        // Rewritten in place, same inode and size.
        r.record(&d, &diff_id).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&path, b"evil  image").unwrap();
        assert_eq!(r.recorded(&d), None, "rewritten file");

        // Corrupt or malformed records are no records.
        r.record(&d, &diff_id).unwrap();
        fs::write(r.record_path(&d), b"{not json").unwrap();
        assert_eq!(r.recorded(&d), None, "corrupt record");
        r.record(&d, "sha256:nothex").unwrap();
        assert_eq!(r.recorded(&d), None, "malformed diff_id");
    }

    #[test]
    fn partial_downloads_untouched_for_an_hour_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let r = remote(dir.path());
        let staging = dir.path().join("staging");
        let (old, fresh) = (
            staging.join(format!("{}.blob", Digest::of(b"old").hex())),
            staging.join(format!("{}.blob", Digest::of(b"fresh").hex())),
        );
        fs::write(&old, b"half a layer").unwrap();
        fs::write(&fresh, b"half another").unwrap();
        fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - 2 * STAGING_KEEP)
            .unwrap();
        let removed = r.prune(std::time::Duration::ZERO).unwrap();
        assert_eq!(removed, vec![old.clone()]);
        assert!(!old.exists());
        assert!(fresh.exists(), "a fetch may still resume it");
    }

    /// Serves `blob` whole for every blob GET over plain HTTP; anything
    /// else is not found.
    async fn serve_blob(blob: Vec<u8>) -> std::net::SocketAddr {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let blob = Arc::new(blob);
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let blob = blob.clone();
                tokio::spawn(async move {
                    let Some(head) = crate::test_http::read_head(&mut conn).await else {
                        return;
                    };
                    let line = head.lines().next().unwrap_or("");
                    if !line.starts_with("GET ") || !line.contains("/blobs/") {
                        let _ = conn
                            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                        return;
                    }
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        blob.len()
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                    let _ = conn.write_all(&blob).await;
                });
            }
        });
        addr
    }

    /// A Prepare joining the paced download of a lazy layer's fill keeps
    /// it going when that lazy layer is removed (its image deleted while
    /// another image with the same layer is pulled): the Prepare gets the
    /// layer, not "no longer wanted".
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prepare_joining_a_paced_download_keeps_it_when_the_lazy_layer_goes() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..4u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, "big", &data[..]).unwrap();
        let layer = tar.into_inner().unwrap();
        let digest = Digest::of(&layer).to_string();
        let addr = serve_blob(layer).await;
        let remote = Arc::new(remote(dir.path()));
        let image = format!("{addr}/test/app:v1");

        // The lazy layer's pace: holds the download once it has begun,
        // until released, then says whether the layer is still wanted.
        let held = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Notify::new());
        let wanted = Arc::new(AtomicBool::new(true));
        let pace: Pace = {
            let (held, release, wanted) = (held.clone(), release.clone(), wanted.clone());
            let paused = Arc::new(AtomicBool::new(false));
            Arc::new(move |read| {
                let (held, release, wanted) = (held.clone(), release.clone(), wanted.clone());
                let first = read > 0 && !paused.swap(true, Ordering::SeqCst);
                Box::pin(async move {
                    if first {
                        held.notify_one();
                        release.notified().await;
                    }
                    wanted.load(Ordering::SeqCst)
                })
            })
        };
        let lazy = {
            let (r, image, digest) = (remote.clone(), image.clone(), digest.clone());
            tokio::spawn(async move { r.ensure_paced(&image, &digest, Some(pace)).await })
        };
        held.notified().await;
        let prepare = {
            let (r, image, digest) = (remote.clone(), image.clone(), digest.clone());
            tokio::spawn(async move { r.ensure_paced(&image, &digest, None).await })
        };
        // Joined while the pace waits; then the lazy layer goes.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        wanted.store(false, Ordering::SeqCst);
        release.notify_one();
        let got = prepare.await.unwrap().expect("the Prepare gets its layer");
        assert_eq!(got.diff_id, digest, "a plain tar's diff_id is its digest");
        assert!(got.path.is_file());
        let lazy = lazy.await.unwrap();
        assert!(
            lazy.is_ok(),
            "the download went on for the Prepare: {:?}",
            lazy.err()
        );
    }
}
