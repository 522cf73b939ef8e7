//! Snapshot semantics as containerd defines them (Prepare, View, Mounts,
//! Commit, Remove, Stat, Update, Walk, Usage, Cleanup) over the metadata
//! store and the snapshot directories.
//!
//! On disk: `<root>/metadata.redb` and `<root>/snapshots/<id>/{fs,work}`.
//! Directory and metadata changes are ordered so that a crash at any point
//! leaves only directories that no record owns, never a record without its
//! directory:
//!
//! - create: make `snapshots/new-<random>` → in one transaction insert the
//!   record and rename the directory to `snapshots/<id>` → commit. Before the
//!   commit returns, the new directory is an orphan.
//! - commit: one transaction moves the record from its key to its name
//!   (same id, same directory).
//! - remove: commit the record's removal first, then rename the directory to
//!   `snapshots/rm-<id>` and delete it. A crash leaves an orphan.
//!
//! Orphans are removed by [`Snapshotter::cleanup`] (run at start-up by
//! default), so a restart rolls back unfinished work.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hyperbox_kernel::mount::{Backend, HostMounter, Mounter};

use crate::filter::{self, Fields, Filters};
use crate::mounts::{self, Mount};
use crate::store::{self, Kind, Reader, Record, Store, Usage, Writer};
use crate::usage::disk_usage;

/// containerd's limit on one label (key plus value), in bytes.
const MAX_LABEL: usize = 4096;

/// Errors of snapshot operations; each maps to one gRPC code in `service`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The snapshot (or its parent) does not exist.
    #[error("snapshot {key} not found")]
    NotFound {
        /// Key or name.
        key: String,
    },
    /// The key or name is taken.
    #[error("snapshot {key} already exists")]
    AlreadyExists {
        /// Key or name.
        key: String,
    },
    /// The snapshot is not in a state that allows the call.
    #[error("snapshot {key}: {why}")]
    FailedPrecondition {
        /// Key or name.
        key: String,
        /// Why not.
        why: String,
    },
    /// The request itself is wrong.
    #[error("{what}")]
    InvalidArgument {
        /// What is wrong.
        what: String,
    },
    /// A filter could not be parsed.
    #[error(transparent)]
    Filter(#[from] filter::ParseError),
    /// The metadata store failed.
    #[error("snapshot {key}: metadata")]
    Store {
        /// Key or name.
        key: String,
        /// The cause.
        #[source]
        source: store::Error,
    },
    /// A file operation failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// Path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, Error>;

fn st(key: &str) -> impl FnOnce(store::Error) -> Error + '_ {
    move |source| Error::Store {
        key: key.into(),
        source,
    }
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.into(),
        source,
    }
}

/// A snapshot as Stat and Walk report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Key (active, view) or name (committed).
    pub name: String,
    /// Parent's name, empty if none.
    pub parent: String,
    /// Kind.
    pub kind: Kind,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Created, nanoseconds since the epoch.
    pub created: i128,
    /// Updated, nanoseconds since the epoch.
    pub updated: i128,
}

impl Info {
    fn of(name: &str, r: &Record) -> Info {
        Info {
            name: name.into(),
            parent: r.parent.clone().unwrap_or_default(),
            kind: r.kind,
            labels: r.labels.clone(),
            created: r.created,
            updated: r.updated,
        }
    }
}

/// What Cleanup removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// Directories removed (no record owned them).
    pub removed: Vec<PathBuf>,
}

/// The snapshotter over one root directory.
#[derive(Debug)]
pub struct Snapshotter {
    root: PathBuf,
    store: Store,
    /// How fetched layer images are mounted; `None` until the remote path
    /// is enabled.
    erofs: Option<Backend>,
    /// Every mount and unmount goes through here.
    mounter: Arc<dyn Mounter>,
    /// Layer images that must not be mounted or built on.
    gate: Option<Arc<dyn LayerGate>>,
}

/// Says which fetched layer images must not be served: a lazy layer that
/// did not match its image, or one this node cannot serve now. Snapshots
/// on them are not mounted at start, and no new snapshot is made on them.
pub trait LayerGate: std::fmt::Debug + Send + Sync {
    /// Why the layer image at `layer_file` is refused, if it is.
    fn refuse(&self, layer_file: &Path) -> Option<String>;
    /// The file to mount for `layer_file` through a loop device instead
    /// of `layer_file` itself: an incomplete lazy layer served through
    /// FUSE (`hyperbox_kernel::fuse`).
    fn source(&self, _layer_file: &Path) -> Option<PathBuf> {
        None
    }
}

fn now() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in labels {
        if k.is_empty() {
            return Err(Error::InvalidArgument {
                what: "label key must not be empty".into(),
            });
        }
        if k.len() + v.len() > MAX_LABEL {
            return Err(Error::InvalidArgument {
                what: format!("label {k:?}: key and value exceed {MAX_LABEL} bytes"),
            });
        }
    }
    Ok(())
}

impl Snapshotter {
    /// Opens the snapshotter rooted at `root`, creating it if needed.
    pub fn open(root: &Path) -> Result<Snapshotter> {
        Snapshotter::open_with(root, Arc::new(HostMounter))
    }

    /// [`Snapshotter::open`] with the mounts made through `mounter`.
    pub fn open_with(root: &Path, mounter: Arc<dyn Mounter>) -> Result<Snapshotter> {
        let snaps = root.join("snapshots");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&snaps)
            .map_err(io("create", &snaps))?;
        let store = Store::open(&root.join("metadata.redb")).map_err(st("(store)"))?;
        Ok(Snapshotter {
            root: root.into(),
            store,
            erofs: None,
            mounter,
            gate: None,
        })
    }

    /// Refuses layers `gate` refuses (see [`LayerGate`]).
    pub fn set_layer_gate(&mut self, gate: Arc<dyn LayerGate>) {
        self.gate = Some(gate);
    }

    /// The layer image of committed snapshot `name`, if the remote path
    /// made it.
    pub fn layer_file(&self, name: &str) -> Result<Option<PathBuf>> {
        let tx = self.store.read().map_err(st(name))?;
        let r = tx
            .get(name)
            .map_err(st(name))?
            .ok_or_else(|| Error::NotFound { key: name.into() })?;
        Ok(r.layer
            .is_some()
            .then(|| self.dir(r.id).join("layer.erofs")))
    }

    /// Refuses building on `parent`'s chain when one of its layer images is
    /// refused.
    fn check_chain<R: Reader>(&self, tx: &R, key: &str, parent: &str) -> Result<()> {
        let Some(gate) = &self.gate else {
            return Ok(());
        };
        let mut cur = (!parent.is_empty()).then(|| parent.to_string());
        while let Some(n) = cur {
            let r = tx
                .get(&n)
                .map_err(st(&n))?
                .ok_or_else(|| Error::NotFound { key: n.clone() })?;
            if r.layer.is_some()
                && let Some(why) = gate.refuse(&self.dir(r.id).join("layer.erofs"))
            {
                return Err(Error::FailedPrecondition {
                    key: key.into(),
                    why: format!("layer snapshot {n} is refused: {why}"),
                });
            }
            cur = r.parent;
        }
        Ok(())
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Enables layers fetched by the remote path, mounted with `backend`.
    pub fn set_erofs_backend(&mut self, backend: Backend) {
        self.erofs = Some(backend);
    }

    /// How fetched layers are mounted, if the remote path is enabled.
    pub fn erofs_backend(&self) -> Option<Backend> {
        self.erofs
    }

    /// Records the EROFS image `image` of layer `digest` as committed
    /// snapshot `name` on `parent` and mounts it read-only, so children get
    /// it as an overlay lower dir like any unpacked layer.
    ///
    /// The image is hard-linked into the snapshot's directory and mounted
    /// there before the record is written: a crash leaves an orphan
    /// directory (whose mount cleanup removes), never a record without its
    /// mount source.
    pub fn commit_layer(
        &self,
        name: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        image: &Path,
        digest: &str,
    ) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let backend = self.erofs.ok_or_else(|| Error::FailedPrecondition {
            key: name.into(),
            why: "the remote path is disabled".into(),
        })?;
        if name.is_empty() {
            return Err(Error::InvalidArgument {
                what: "snapshot name must not be empty".into(),
            });
        }
        check_labels(&labels)?;
        let snaps = self.root.join("snapshots");
        let tmp = snaps.join(format!("new-{:016x}", rand::random::<u64>()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io("create", &tmp))?;
        let made = (|| -> Result<()> {
            let fs_dir = tmp.join("fs");
            fs::DirBuilder::new()
                .mode(0o755)
                .create(&fs_dir)
                .map_err(io("create", &fs_dir))?;
            let link = tmp.join("layer.erofs");
            fs::hard_link(image, &link).map_err(io("link", image))?;
            let meta = fs::metadata(&link).map_err(io("stat", &link))?;
            self.mount_layer(&link, &fs_dir, backend)
                .map_err(io("mount EROFS image", &link))?;
            let tx = self.store.write().map_err(st(name))?;
            if tx.get(name).map_err(st(name))?.is_some() {
                return Err(Error::AlreadyExists { key: name.into() });
            }
            if !parent.is_empty() {
                let p = tx
                    .get(parent)
                    .map_err(st(parent))?
                    .ok_or_else(|| Error::NotFound { key: parent.into() })?;
                if p.kind != Kind::Committed {
                    return Err(Error::InvalidArgument {
                        what: format!("parent {parent} is not a committed snapshot"),
                    });
                }
                self.check_chain(&tx, name, parent)?;
            }
            let id = tx.next_id().map_err(st(name))?;
            let t = now();
            let record = Record {
                id,
                kind: Kind::Committed,
                parent: (!parent.is_empty()).then(|| parent.to_string()),
                labels,
                created: t,
                updated: t,
                usage: Some(Usage {
                    size: (meta.blocks() * 512) as i64,
                    inodes: 1,
                }),
                layer: Some(digest.to_string()),
            };
            tx.put(name, &record).map_err(st(name))?;
            if !parent.is_empty() {
                tx.link(parent, name).map_err(st(name))?;
            }
            let dir = self.dir(id);
            fs::rename(&tmp, &dir).map_err(io("rename", &dir))?;
            if let Err(e) = tx.commit() {
                let _ = fs::rename(&dir, &tmp);
                return Err(st(name)(store::Error::Db {
                    action: "commit",
                    source: Box::new(e.into()),
                }));
            }
            Ok(())
        })();
        if made.is_err() {
            let _ = self.mounter.unmount_all_under(&tmp);
            let _ = fs::remove_dir_all(&tmp);
        }
        made
    }

    /// Mounts every fetched layer that is not mounted (after a reboot, or
    /// an unmount by hand); returns how many were mounted.
    pub fn mount_layers(&self) -> Result<usize> {
        let Some(backend) = self.erofs else {
            return Ok(0);
        };
        let tx = self.store.read().map_err(st("(mount)"))?;
        let all = tx.all().map_err(st("(mount)"))?;
        drop(tx);
        let mut n = 0;
        for (name, r) in all {
            if r.layer.is_none() {
                continue;
            }
            let fs_dir = self.fs_dir(r.id);
            if self
                .mounter
                .is_mountpoint(&fs_dir)
                .map_err(io("stat", &fs_dir))?
            {
                continue;
            }
            let image = self.dir(r.id).join("layer.erofs");
            if let Some(why) = self.gate.as_ref().and_then(|g| g.refuse(&image)) {
                tracing::error!(snapshot = %name, why, "layer not mounted");
                continue;
            }
            self.mount_layer(&image, &fs_dir, backend)
                .map_err(|source| Error::Io {
                    action: "mount EROFS image of",
                    path: PathBuf::from(&name),
                    source,
                })?;
            n += 1;
        }
        Ok(n)
    }

    /// Mounts a layer image, through the file the gate names for it when
    /// it names one (always on a loop device: it can be switched to the
    /// local file later).
    fn mount_layer(&self, image: &Path, target: &Path, backend: Backend) -> std::io::Result<()> {
        match self.gate.as_ref().and_then(|g| g.source(image)) {
            Some(source) => self.mounter.mount_erofs(&source, target, Backend::Loop),
            None => self.mounter.mount_erofs(image, target, backend),
        }
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    /// Creates a writable snapshot `key` on `parent` ("" for none).
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }

    /// Creates a read-only view `key` of `parent`.
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument {
                what: "snapshot key must not be empty".into(),
            });
        }
        check_labels(&labels)?;
        let snaps = self.root.join("snapshots");
        let tmp = snaps.join(format!("new-{:016x}", rand::random::<u64>()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io("create", &tmp))?;
        let made = (|| -> Result<Vec<Mount>> {
            fs::DirBuilder::new()
                .mode(0o755)
                .create(tmp.join("fs"))
                .map_err(io("create", &tmp))?;
            if kind == Kind::Active {
                fs::DirBuilder::new()
                    .mode(0o711)
                    .create(tmp.join("work"))
                    .map_err(io("create", &tmp))?;
            }
            let tx = self.store.write().map_err(st(key))?;
            if tx.get(key).map_err(st(key))?.is_some() {
                return Err(Error::AlreadyExists { key: key.into() });
            }
            let lowers = if parent.is_empty() {
                Vec::new()
            } else {
                let p = tx
                    .get(parent)
                    .map_err(st(parent))?
                    .ok_or_else(|| Error::NotFound { key: parent.into() })?;
                if p.kind != Kind::Committed {
                    return Err(Error::InvalidArgument {
                        what: format!("parent {parent} is not a committed snapshot"),
                    });
                }
                self.check_chain(&tx, key, parent)?;
                self.lower_ids(&tx, parent)?
            };
            let id = tx.next_id().map_err(st(key))?;
            let t = now();
            let record = Record {
                id,
                kind,
                parent: (!parent.is_empty()).then(|| parent.to_string()),
                labels,
                created: t,
                updated: t,
                usage: None,
                layer: None,
            };
            tx.put(key, &record).map_err(st(key))?;
            if !parent.is_empty() {
                tx.link(parent, key).map_err(st(key))?;
            }
            let dir = self.dir(id);
            fs::rename(&tmp, &dir).map_err(io("rename", &dir))?;
            if let Err(e) = tx.commit() {
                // Back to an orphan; nothing points at it.
                let _ = fs::rename(&dir, &tmp);
                return Err(st(key)(store::Error::Db {
                    action: "commit",
                    source: Box::new(e.into()),
                }));
            }
            Ok(self.mounts_of(&record, &lowers))
        })();
        if made.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        made
    }

    /// Directory ids of `name` and its ancestors, nearest first.
    fn lower_ids<R: Reader>(&self, tx: &R, name: &str) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        let mut cur = Some(name.to_string());
        while let Some(n) = cur {
            let r = tx
                .get(&n)
                .map_err(st(&n))?
                .ok_or_else(|| Error::NotFound { key: n.clone() })?;
            out.push(r.id);
            cur = r.parent;
        }
        Ok(out)
    }

    fn mounts_of(&self, r: &Record, lower_ids: &[u64]) -> Vec<Mount> {
        let lowers: Vec<PathBuf> = lower_ids.iter().map(|id| self.fs_dir(*id)).collect();
        let lowers: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
        match r.kind {
            Kind::Active => {
                mounts::active(&self.fs_dir(r.id), &self.dir(r.id).join("work"), &lowers)
            }
            _ => mounts::view(&self.fs_dir(r.id), &lowers),
        }
    }

    /// The mounts of an active snapshot or view.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let tx = self.store.read().map_err(st(key))?;
        let r = tx
            .get(key)
            .map_err(st(key))?
            .ok_or_else(|| Error::NotFound { key: key.into() })?;
        if r.kind == Kind::Committed {
            return Err(Error::FailedPrecondition {
                key: key.into(),
                why: "a committed snapshot has no mounts".into(),
            });
        }
        let lowers = match &r.parent {
            Some(p) => {
                self.check_chain(&tx, key, p)?;
                self.lower_ids(&tx, p)?
            }
            None => Vec::new(),
        };
        Ok(self.mounts_of(&r, &lowers))
    }

    /// Seals active snapshot `key` as committed snapshot `name`.
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument {
                what: "commit name must not be empty".into(),
            });
        }
        check_labels(&labels)?;
        let pre = self.store.read().map_err(st(key))?;
        let r = pre
            .get(key)
            .map_err(st(key))?
            .ok_or_else(|| Error::NotFound { key: key.into() })?;
        drop(pre);
        if r.kind != Kind::Active {
            return Err(Error::FailedPrecondition {
                key: key.into(),
                why: format!(
                    "is a {} snapshot, only active snapshots can be committed",
                    r.kind.as_str()
                ),
            });
        }
        // Measured before the transaction: walking a large layer must not
        // hold the single writer.
        let fs_dir = self.fs_dir(r.id);
        let usage = disk_usage(&fs_dir).map_err(io("measure", &fs_dir))?;
        let tx = self.store.write().map_err(st(key))?;
        let current = tx
            .get(key)
            .map_err(st(key))?
            .ok_or_else(|| Error::NotFound { key: key.into() })?;
        if current.id != r.id || current.kind != Kind::Active {
            return Err(Error::FailedPrecondition {
                key: key.into(),
                why: "changed while committing".into(),
            });
        }
        if tx.get(name).map_err(st(name))?.is_some() {
            return Err(Error::AlreadyExists { key: name.into() });
        }
        // A committed snapshot is a new object to containerd: its Created
        // and Updated are both the commit's time, as containerd's own
        // snapshotters record them (its snapshotter test suite checks).
        let t = now();
        let committed = Record {
            kind: Kind::Committed,
            labels,
            created: t,
            updated: t,
            usage: Some(usage),
            ..current
        };
        tx.delete(key).map_err(st(key))?;
        tx.put(name, &committed).map_err(st(name))?;
        if let Some(p) = &committed.parent {
            tx.unlink(p, key).map_err(st(key))?;
            tx.link(p, name).map_err(st(name))?;
        }
        tx.commit().map_err(|e| {
            st(key)(store::Error::Db {
                action: "commit",
                source: Box::new(e.into()),
            })
        })?;
        // Overlay's work dir is scratch space; a committed layer has no use for it.
        let _ = fs::remove_dir_all(self.dir(committed.id).join("work"));
        Ok(())
    }

    /// Removes a snapshot that has no children.
    pub fn remove(&self, key: &str) -> Result<()> {
        let tx = self.store.write().map_err(st(key))?;
        let r = tx
            .get(key)
            .map_err(st(key))?
            .ok_or_else(|| Error::NotFound { key: key.into() })?;
        if tx.has_children(key).map_err(st(key))? {
            return Err(Error::FailedPrecondition {
                key: key.into(),
                why: "has children; remove them first".into(),
            });
        }
        tx.delete(key).map_err(st(key))?;
        if let Some(p) = &r.parent {
            tx.unlink(p, key).map_err(st(key))?;
        }
        tx.commit().map_err(|e| {
            st(key)(store::Error::Db {
                action: "commit",
                source: Box::new(e.into()),
            })
        })?;
        let dir = self.dir(r.id);
        if r.layer.is_some() {
            let fs_dir = self.fs_dir(r.id);
            self.mounter
                .unmount(&fs_dir)
                .map_err(io("unmount", &fs_dir))?;
        }
        let doomed = self.root.join("snapshots").join(format!("rm-{}", r.id));
        match fs::rename(&dir, &doomed) {
            Ok(()) => fs::remove_dir_all(&doomed).map_err(io("remove", &doomed)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("rename", &dir)(e)),
        }
    }

    /// The snapshot's info.
    pub fn stat(&self, key: &str) -> Result<Info> {
        let tx = self.store.read().map_err(st(key))?;
        let r = tx
            .get(key)
            .map_err(st(key))?
            .ok_or_else(|| Error::NotFound { key: key.into() })?;
        Ok(Info::of(key, &r))
    }

    /// Updates labels: `paths` empty or `labels` replaces them all;
    /// `labels.<k>` sets `k` from `info` or deletes it when absent there.
    pub fn update(&self, info: &Info, paths: &[String]) -> Result<Info> {
        let key = info.name.as_str();
        let tx = self.store.write().map_err(st(key))?;
        let mut r = tx
            .get(key)
            .map_err(st(key))?
            .ok_or_else(|| Error::NotFound { key: key.into() })?;
        if paths.is_empty() {
            r.labels = info.labels.clone();
        }
        for p in paths {
            if p == "labels" {
                r.labels = info.labels.clone();
            } else if let Some(k) = p.strip_prefix("labels.") {
                match info.labels.get(k) {
                    Some(v) => {
                        r.labels.insert(k.to_string(), v.clone());
                    }
                    None => {
                        r.labels.remove(k);
                    }
                }
            } else {
                return Err(Error::InvalidArgument {
                    what: format!(
                        "cannot update field {p:?} of snapshot {key}: only labels can change"
                    ),
                });
            }
        }
        check_labels(&r.labels)?;
        r.updated = now();
        tx.put(key, &r).map_err(st(key))?;
        tx.commit().map_err(|e| {
            st(key)(store::Error::Db {
                action: "commit",
                source: Box::new(e.into()),
            })
        })?;
        Ok(Info::of(key, &r))
    }

    /// Every snapshot matching `filters` (containerd filter syntax).
    pub fn walk(&self, filters: &[String]) -> Result<Vec<Info>> {
        let f = Filters::parse(filters)?;
        let tx = self.store.read().map_err(st("(walk)"))?;
        Ok(tx
            .all()
            .map_err(st("(walk)"))?
            .into_iter()
            .filter(|(name, r)| {
                f.matches(&Fields {
                    name,
                    parent: r.parent.as_deref().unwrap_or(""),
                    kind: r.kind.as_str(),
                    labels: &r.labels,
                })
            })
            .map(|(name, r)| Info::of(&name, &r))
            .collect())
    }

    /// Disk usage of the snapshot's own layer: recorded at commit for
    /// committed snapshots, measured now for active ones.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let tx = self.store.read().map_err(st(key))?;
        let r = tx
            .get(key)
            .map_err(st(key))?
            .ok_or_else(|| Error::NotFound { key: key.into() })?;
        drop(tx);
        match r.usage {
            Some(u) => Ok(u),
            None => {
                let d = self.fs_dir(r.id);
                disk_usage(&d).map_err(io("measure", &d))
            }
        }
    }

    /// Removes directories that no snapshot owns: crash leftovers of a
    /// removal (`rm-*`), or of a create whose transaction never committed.
    pub fn cleanup(&self) -> Result<CleanupReport> {
        let snaps = self.root.join("snapshots");
        // Holding the single write transaction while scanning serializes
        // with creates, which rename their directory into place inside theirs:
        // no directory can appear between reading the owners and the scan.
        let tx = self.store.write().map_err(st("(cleanup)"))?;
        let owned: HashSet<u64> = tx
            .all()
            .map_err(st("(cleanup)"))?
            .into_iter()
            .map(|(_, r)| r.id)
            .collect();
        let mut report = CleanupReport::default();
        for e in fs::read_dir(&snaps).map_err(io("read", &snaps))? {
            let e = e.map_err(io("read", &snaps))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let orphan = match name.parse::<u64>() {
                Ok(id) => !owned.contains(&id),
                Err(_) => name.starts_with("rm-"),
            };
            if orphan {
                let p = e.path();
                self.mounter
                    .unmount_all_under(&p)
                    .map_err(io("unmount", &p))?;
                fs::remove_dir_all(&p).map_err(io("remove", &p))?;
                report.removed.push(p);
            }
        }
        drop(tx);
        Ok(report)
    }

    /// [`Snapshotter::cleanup`] plus leftovers of creates interrupted by a
    /// crash (`new-*`), which exist only while a create runs: safe only
    /// before the service accepts calls.
    pub fn cleanup_on_start(&self) -> Result<CleanupReport> {
        let mut report = self.cleanup()?;
        let snaps = self.root.join("snapshots");
        for e in fs::read_dir(&snaps).map_err(io("read", &snaps))? {
            let e = e.map_err(io("read", &snaps))?;
            if e.file_name().to_string_lossy().starts_with("new-") {
                let p = e.path();
                self.mounter
                    .unmount_all_under(&p)
                    .map_err(io("unmount", &p))?;
                fs::remove_dir_all(&p).map_err(io("remove", &p))?;
                report.removed.push(p);
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use hyperbox_kernel::testing::{FakeMounts, MountCall};

    use super::*;

    fn sn() -> (tempfile::TempDir, Snapshotter) {
        let d = tempfile::tempdir().unwrap();
        let s = Snapshotter::open(d.path()).unwrap();
        (d, s)
    }

    fn l(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn upper(m: &[Mount]) -> PathBuf {
        let m = &m[0];
        if m.kind == "bind" {
            return PathBuf::from(&m.source);
        }
        let o = m
            .options
            .iter()
            .find_map(|o| o.strip_prefix("upperdir="))
            .unwrap();
        PathBuf::from(o)
    }

    /// Prepare + write + commit, as unpacking a layer does.
    fn layer(s: &Snapshotter, name: &str, parent: &str, file: &str) {
        let key = format!("extract-{name}");
        let m = s.prepare(&key, parent, BTreeMap::new()).unwrap();
        fs::write(upper(&m).join(file), name).unwrap();
        s.commit(name, &key, BTreeMap::new()).unwrap();
    }

    fn code(e: Error) -> &'static str {
        match e {
            Error::NotFound { .. } => "NotFound",
            Error::AlreadyExists { .. } => "AlreadyExists",
            Error::FailedPrecondition { .. } => "FailedPrecondition",
            Error::InvalidArgument { .. } | Error::Filter(_) => "InvalidArgument",
            Error::Store { .. } | Error::Io { .. } => "Internal",
        }
    }

    #[test]
    fn chain_of_layers_gives_overlay_over_all_parents_nearest_first() {
        let (_d, s) = sn();
        layer(&s, "l1", "", "a");
        layer(&s, "l2", "l1", "b");
        let m = s.prepare("ctr", "l2", BTreeMap::new()).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].kind, "overlay");
        let lower = m[0]
            .options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
            .unwrap();
        let dirs: Vec<&str> = lower.split(':').collect();
        assert_eq!(dirs.len(), 2);
        assert_eq!(
            fs::read_to_string(Path::new(dirs[0]).join("b")).unwrap(),
            "l2"
        );
        assert_eq!(
            fs::read_to_string(Path::new(dirs[1]).join("a")).unwrap(),
            "l1"
        );
        assert_eq!(
            s.mounts("ctr").unwrap(),
            m,
            "Mounts repeats Prepare's answer"
        );
        let i = s.stat("ctr").unwrap();
        assert_eq!((i.kind, i.parent.as_str()), (Kind::Active, "l2"));
        assert_eq!(s.stat("l1").unwrap().kind, Kind::Committed);
    }

    #[test]
    fn error_codes_follow_containerd() {
        let (_d, s) = sn();
        layer(&s, "base", "", "f");
        s.prepare("a", "base", BTreeMap::new()).unwrap();
        s.view("v", "base", BTreeMap::new()).unwrap();
        assert_eq!(
            code(s.prepare("a", "", BTreeMap::new()).unwrap_err()),
            "AlreadyExists"
        );
        assert_eq!(
            code(s.prepare("b", "missing", BTreeMap::new()).unwrap_err()),
            "NotFound"
        );
        assert_eq!(
            code(s.prepare("b", "a", BTreeMap::new()).unwrap_err()),
            "InvalidArgument"
        );
        assert_eq!(
            code(s.prepare("", "", BTreeMap::new()).unwrap_err()),
            "InvalidArgument"
        );
        assert_eq!(
            code(s.commit("x", "v", BTreeMap::new()).unwrap_err()),
            "FailedPrecondition"
        );
        assert_eq!(
            code(s.commit("x", "nope", BTreeMap::new()).unwrap_err()),
            "NotFound"
        );
        assert_eq!(
            code(s.commit("base", "a", BTreeMap::new()).unwrap_err()),
            "AlreadyExists"
        );
        assert_eq!(code(s.mounts("base").unwrap_err()), "FailedPrecondition");
        assert_eq!(code(s.mounts("nope").unwrap_err()), "NotFound");
        assert_eq!(code(s.remove("base").unwrap_err()), "FailedPrecondition");
        assert_eq!(code(s.remove("nope").unwrap_err()), "NotFound");
        assert_eq!(code(s.stat("nope").unwrap_err()), "NotFound");
        assert_eq!(code(s.usage("nope").unwrap_err()), "NotFound");
        let big = l(&[("k", &"v".repeat(MAX_LABEL))]);
        assert_eq!(
            code(s.prepare("big", "", big).unwrap_err()),
            "InvalidArgument"
        );
        // A failed create leaves no trace.
        assert!(s.stat("big").is_err());
        assert_eq!(s.cleanup_on_start().unwrap().removed, Vec::<PathBuf>::new());
    }

    #[test]
    fn remove_needs_children_gone_first_and_deletes_the_directory() {
        let (_d, s) = sn();
        layer(&s, "base", "", "f");
        let m = s.prepare("a", "base", BTreeMap::new()).unwrap();
        let dir = upper(&m).parent().unwrap().to_path_buf();
        assert!(dir.exists());
        s.remove("a").unwrap();
        assert!(!dir.exists());
        s.remove("base").unwrap();
        assert!(s.walk(&[]).unwrap().is_empty());
    }

    #[test]
    fn commit_keeps_contents_and_records_usage() {
        let (_d, s) = sn();
        let m = s.prepare("k", "", l(&[("a", "1")])).unwrap();
        fs::write(upper(&m).join("data"), vec![7u8; 50_000]).unwrap();
        let active = s.usage("k").unwrap();
        assert!(active.size >= 50_000 && active.inodes == 2, "{active:?}");
        s.commit("n", "k", l(&[("b", "2")])).unwrap();
        assert_eq!(code(s.stat("k").unwrap_err()), "NotFound");
        let i = s.stat("n").unwrap();
        assert_eq!(
            i.labels,
            l(&[("b", "2")]),
            "commit takes the labels given to it"
        );
        assert_eq!(s.usage("n").unwrap(), active);
        let v = s.view("v", "n", BTreeMap::new()).unwrap();
        assert_eq!(v[0].options, ["ro", "rbind"]);
        assert_eq!(
            fs::read(Path::new(&v[0].source).join("data"))
                .unwrap()
                .len(),
            50_000
        );
    }

    #[test]
    fn a_committed_snapshot_is_created_and_updated_at_its_commit() {
        let (_d, s) = sn();
        s.prepare("k", "", l(&[])).unwrap();
        let active = s.stat("k").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        s.commit("c", "k", l(&[])).unwrap();
        let c = s.stat("c").unwrap();
        assert_eq!(c.created, c.updated, "{c:?}");
        assert!(c.created > active.created, "{c:?} vs {active:?}");
    }

    #[test]
    fn update_changes_only_labels_as_the_mask_says() {
        let (_d, s) = sn();
        s.prepare("k", "", l(&[("a", "1"), ("b", "2")])).unwrap();
        let mut want = s.stat("k").unwrap();
        want.labels = l(&[("a", "9"), ("c", "3")]);
        let got = s
            .update(&want, &["labels.a".into(), "labels.b".into()])
            .unwrap();
        assert_eq!(
            got.labels,
            l(&[("a", "9")]),
            "b absent from info: deleted; c not in mask"
        );
        let got = s.update(&want, &[]).unwrap();
        assert_eq!(got.labels, l(&[("a", "9"), ("c", "3")]));
        assert!(got.updated >= got.created);
        assert_eq!(
            code(s.update(&want, &["parent".into()]).unwrap_err()),
            "InvalidArgument"
        );
        want.name = "nope".into();
        assert_eq!(code(s.update(&want, &[]).unwrap_err()), "NotFound");
        assert_eq!(s.stat("k").unwrap().labels, l(&[("a", "9"), ("c", "3")]));
    }

    #[test]
    fn walk_filters_by_kind_parent_and_labels() {
        let (_d, s) = sn();
        layer(&s, "base", "", "f");
        s.prepare("a", "base", l(&[("containerd.io/gc.root", "x")]))
            .unwrap();
        s.view("v", "base", BTreeMap::new()).unwrap();
        let names = |f: &[&str]| {
            let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
            let mut n: Vec<String> = s.walk(&f).unwrap().into_iter().map(|i| i.name).collect();
            n.sort();
            n
        };
        assert_eq!(names(&[]), ["a", "base", "v"]);
        assert_eq!(names(&["kind==committed"]), ["base"]);
        assert_eq!(names(&["parent==base"]), ["a", "v"]);
        assert_eq!(names(&["labels.\"containerd.io/gc.root\""]), ["a"]);
        assert_eq!(names(&["kind==view", "kind==committed"]), ["base", "v"]);
        assert_eq!(
            code(s.walk(&["kind=="].map(String::from)).unwrap_err()),
            "InvalidArgument"
        );
    }

    #[test]
    fn state_survives_reopen_and_cleanup_removes_only_orphans() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = Snapshotter::open(d.path()).unwrap();
            layer(&s, "base", "", "f");
            s.prepare("a", "base", BTreeMap::new()).unwrap();
        }
        let snaps = d.path().join("snapshots");
        // What a crash at each step can leave behind.
        for orphan in ["new-00ff", "rm-7", "999"] {
            fs::create_dir_all(snaps.join(orphan).join("fs")).unwrap();
        }
        let s = Snapshotter::open(d.path()).unwrap();
        let mut names: Vec<String> = s.walk(&[]).unwrap().into_iter().map(|i| i.name).collect();
        names.sort();
        assert_eq!(names, ["a", "base"]);
        let runtime = s.cleanup().unwrap();
        assert_eq!(
            runtime.removed.len(),
            2,
            "runtime cleanup leaves new-* to in-flight creates"
        );
        assert!(snaps.join("new-00ff").exists());
        let start = s.cleanup_on_start().unwrap();
        assert_eq!(start.removed, [snaps.join("new-00ff")]);
        let mut left: Vec<String> = fs::read_dir(&snaps)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(
            fs::read_to_string(
                upper(&s.mounts("a").unwrap())
                    .parent()
                    .unwrap()
                    .parent()
                    .unwrap()
                    .join(&left[0])
                    .join("fs/f")
            )
            .unwrap(),
            "base"
        );
    }

    #[test]
    fn stat_equals_walk_and_update_moves_only_updated() {
        let (_d, s) = sn();
        layer(&s, "base", "", "f");
        s.prepare("a", "base", l(&[("k", "v")])).unwrap();
        for name in ["a", "base"] {
            let walked = s.walk(&[format!("name=={name}")]).unwrap();
            assert_eq!(walked, [s.stat(name).unwrap()]);
        }
        let before = s.stat("a").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let after = s.update(&before, &[]).unwrap();
        assert_eq!(after.created, before.created);
        assert!(after.updated > before.updated);
        assert_eq!((after.kind, after.parent.as_str()), (Kind::Active, "base"));
    }

    #[test]
    fn update_replies_exactly_what_stat_then_returns() {
        let (d, s) = sn();
        layer(&s, "base", "", "f");
        s.prepare("a", "base", l(&[("x", "1"), ("y", "2")]))
            .unwrap();
        let mut want = s.stat("a").unwrap();
        for (labels, mask) in [
            (
                l(&[("x", "9")]),
                vec!["labels.x".to_string(), "labels.y".into()],
            ),
            (l(&[("z", "3")]), vec!["labels".into()]),
            (l(&[("w", "4")]), vec![]),
        ] {
            want.labels = labels;
            let replied = s.update(&want, &mask).unwrap();
            assert_eq!(replied, s.stat("a").unwrap(), "mask {mask:?}");
            assert_eq!(replied, s.walk(&["name==a".into()]).unwrap()[0]);
        }
        let committed = s.update(&s.stat("base").unwrap(), &[]).unwrap();
        assert_eq!(committed, s.stat("base").unwrap());
        // What was replied is what is on disk, not a copy kept in memory.
        let replied = s.update(&want, &[]).unwrap();
        drop(s);
        let reopened = Snapshotter::open(d.path()).unwrap();
        assert_eq!(reopened.stat("a").unwrap(), replied);
    }

    /// A snapshotter on the fake mounter with the remote path on, and an
    /// image file to commit as a layer.
    fn sn_fake() -> (tempfile::TempDir, Snapshotter, Arc<FakeMounts>, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let fake = Arc::new(FakeMounts::new());
        let mut s = Snapshotter::open_with(d.path(), fake.clone()).unwrap();
        s.set_erofs_backend(Backend::File);
        let image = d.path().join("layer.img");
        fs::write(&image, b"not really erofs").unwrap();
        (d, s, fake, image)
    }

    fn snapshot_dirs(s: &Snapshotter) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(s.root().join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn fetched_layer_is_mounted_once_at_commit_and_unmounted_at_remove() {
        let (_d, s, fake, image) = sn_fake();
        s.commit_layer("l1", "", l(&[("k", "v")]), &image, "sha256:aa")
            .unwrap();
        let calls = fake.take_calls();
        let [
            MountCall::Mount {
                image: linked,
                target,
                backend,
            },
        ] = calls.as_slice()
        else {
            panic!("one mount: {calls:?}");
        };
        // Mounted in the new directory before its record exists.
        assert_eq!(*backend, Backend::File);
        assert_eq!(linked.file_name().unwrap(), "layer.erofs");
        assert_eq!(linked.parent(), target.parent());
        assert!(
            target
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("new-"),
            "{target:?}"
        );
        let info = s.stat("l1").unwrap();
        assert_eq!(
            (info.kind, info.labels),
            (Kind::Committed, l(&[("k", "v")]))
        );
        let id = snapshot_dirs(&s);
        assert_eq!(id.len(), 1);
        let fs_dir = s.root().join("snapshots").join(&id[0]).join("fs");

        // Children see it as an ordinary lower dir; containerd mounts them.
        let m = s.prepare("ctr", "l1", BTreeMap::new()).unwrap();
        assert_eq!(m[0].kind, "overlay");
        assert!(
            m[0].options
                .contains(&format!("lowerdir={}", fs_dir.display())),
            "{m:?}"
        );
        s.remove("ctr").unwrap();
        assert_eq!(fake.take_calls(), [], "local snapshots mount nothing");

        s.remove("l1").unwrap();
        assert_eq!(fake.take_calls(), [MountCall::Unmount(fs_dir)]);
        assert_eq!(snapshot_dirs(&s), Vec::<String>::new());
    }

    #[test]
    fn failed_layer_commit_unmounts_and_leaves_nothing() {
        let (_d, s, fake, image) = sn_fake();
        let e = s
            .commit_layer("l2", "missing", BTreeMap::new(), &image, "sha256:bb")
            .unwrap_err();
        assert_eq!(code(e), "NotFound");
        let calls = fake.take_calls();
        let [
            MountCall::Mount { target, .. },
            MountCall::Unmount(unmounted),
        ] = calls.as_slice()
        else {
            panic!("mount then unmount: {calls:?}");
        };
        assert_eq!(unmounted, target);
        assert_eq!(fake.mounted(), Vec::<PathBuf>::new());
        assert_eq!(snapshot_dirs(&s), Vec::<String>::new());

        fake.fail_mounts(true);
        let e = s
            .commit_layer("l3", "", BTreeMap::new(), &image, "sha256:cc")
            .unwrap_err();
        assert!(
            matches!(&e, Error::Io { action, .. } if action.contains("mount")),
            "{e:?}"
        );
        assert_eq!(code(s.stat("l3").unwrap_err()), "NotFound");
        assert_eq!(snapshot_dirs(&s), Vec::<String>::new());
    }

    #[test]
    fn layers_are_mounted_again_after_a_reboot_and_only_then() {
        let (_d, s, fake, image) = sn_fake();
        s.commit_layer("l1", "", BTreeMap::new(), &image, "sha256:aa")
            .unwrap();
        layer(&s, "local", "", "f");
        fake.take_calls();
        fake.reboot();
        assert_eq!(s.mount_layers().unwrap(), 1);
        let dir = s.root().join("snapshots").join(&snapshot_dirs(&s)[0]);
        assert_eq!(
            fake.take_calls(),
            [MountCall::Mount {
                image: dir.join("layer.erofs"),
                target: dir.join("fs"),
                backend: Backend::File,
            }],
            "the fetched layer only, from its own link"
        );
        assert_eq!(s.mount_layers().unwrap(), 0, "mounted already");
        assert_eq!(fake.take_calls(), []);
    }

    #[test]
    fn cleanup_unmounts_what_orphans_left_mounted() {
        let (_d, s, fake, _image) = sn_fake();
        let snaps = s.root().join("snapshots");
        for orphan in ["999", "new-00ff"] {
            fs::create_dir_all(snaps.join(orphan).join("fs")).unwrap();
            fake.add_mounted(&snaps.join(orphan).join("fs"));
        }
        s.cleanup().unwrap();
        assert_eq!(
            fake.take_calls(),
            [MountCall::Unmount(snaps.join("999/fs"))],
            "a create in flight keeps its new-* mount"
        );
        s.cleanup_on_start().unwrap();
        assert_eq!(
            fake.take_calls(),
            [MountCall::Unmount(snaps.join("new-00ff/fs"))]
        );
        assert_eq!(fake.mounted(), Vec::<PathBuf>::new());
        assert_eq!(snapshot_dirs(&s), Vec::<String>::new());
    }

    #[test]
    fn layer_commits_need_the_remote_path() {
        let (_d, s) = sn();
        let e = s
            .commit_layer(
                "l",
                "",
                BTreeMap::new(),
                Path::new("/nonexistent"),
                "sha256:aa",
            )
            .unwrap_err();
        assert_eq!(code(e), "FailedPrecondition");
    }

    #[test]
    fn deep_chains_list_every_layer() {
        let (_d, s) = sn();
        let mut parent = String::new();
        for i in 0..128 {
            let name = format!("l{i}");
            layer(&s, &name, &parent, &format!("f{i}"));
            parent = name;
        }
        let m = s.prepare("top", &parent, BTreeMap::new()).unwrap();
        let lower = m[0]
            .options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
            .unwrap();
        assert_eq!(lower.split(':').count(), 128);
    }
}
