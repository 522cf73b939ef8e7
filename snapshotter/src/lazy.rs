//! The lazy path: layers of images that carry a hyperbox index are mounted
//! at once from a sparse EROFS image file, and the kernel's reads of bytes
//! not yet fetched are held by fanotify pre-content events
//! (`FAN_PRE_ACCESS`, kernel 6.14+) until the chunk holding them has been
//! fetched with a Range request, checked against its SHA-256 from the index
//! and written into the file. A background task fills the rest; once a file
//! is complete its mark is removed and the kernel reads it at native speed.
//!
//! The writes themselves raise no events: each file is opened for writing
//! before its mark is placed, and the kernel decides at open time whether
//! an open file reports pre-content events.
//!
//! A chunk that cannot be fetched or does not verify is denied with EIO:
//! the reading process gets an I/O error, never unverified or missing
//! bytes. While the daemon is down the marks are gone and unfetched ranges
//! read as zeros; at start-up every incomplete file is marked again before
//! anything is mounted, and the page cache is dropped once if such a file
//! was mounted during the outage. docs/snapshotter.md explains the window.
//!
//! fanotify is used through libc: the nix and fanotify crates know neither
//! `FAN_PRE_ACCESS` nor the range info record these events carry.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyperbox_registry::digest::Digest;
use hyperbox_registry::index::{Index, IndexLayer};
use hyperbox_registry::{Reference, Registry};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

const FAN_PRE_ACCESS: u64 = 0x0010_0000;
const FAN_EVENT_INFO_TYPE_RANGE: u8 = 6;
const FAN_ALLOW: u32 = 0x01;
const FAN_DENY: u32 = 0x02;
/// `FAN_DENY_ERRNO(EIO)`: the reader gets EIO (kernel 6.14+).
const FAN_DENY_EIO: u32 = FAN_DENY | ((libc::EIO as u32) << 24);
/// Unlinked lazy layers younger than this survive Cleanup.
const PRUNE_GRACE: Duration = Duration::from_secs(60);
/// How long a looked-up index is trusted.
const INDEX_TTL: Duration = Duration::from_secs(60);
/// How long its absence is: short, so an index pushed after a first pull
/// is picked up soon, long enough to spare the registry one lookup per
/// layer of every pull.
const NO_INDEX_TTL: Duration = Duration::from_secs(10);

/// Errors of the lazy path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry failed.
    #[error("lazy layer {what}")]
    Registry {
        /// Which layer or chunk.
        what: String,
        /// The cause.
        #[source]
        source: hyperbox_registry::Error,
    },
    /// A chunk did not match its digest.
    #[error("chunk {chunk} of {erofs}: content does not match the index")]
    Chunk {
        /// The EROFS blob.
        erofs: String,
        /// Chunk number.
        chunk: usize,
    },
    /// A file or fanotify operation failed.
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

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.into(),
        source,
    }
}

/// What survives a restart about an incomplete file (`<hex>.lazy`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    image: String,
    chunk_size: u64,
    entry: IndexLayer,
}

/// One sparse EROFS image being filled.
#[derive(Debug)]
struct Blob {
    path: PathBuf,
    state_path: PathBuf,
    have_path: PathBuf,
    /// Opened before the mark: writes through it raise no events.
    file: File,
    have_file: File,
    reference: Reference,
    erofs: Digest,
    state: State,
    present: Mutex<Vec<bool>>,
    locks: Vec<tokio::sync::Mutex<()>>,
    complete: AtomicBool,
    /// The last failure to serve a read, for error messages.
    last_error: Mutex<Option<String>>,
    /// When it was registered: a Prepare may still be about to link it.
    registered: Instant,
    /// `(st_dev, st_ino)` of the file, as events identify it.
    inode: (u64, u64),
}

impl Blob {
    fn chunk_range(&self, i: usize) -> (u64, u64) {
        let cs = self.state.chunk_size;
        let start = i as u64 * cs;
        (start, cs.min(self.state.entry.size - start))
    }

    fn missing(&self) -> usize {
        self.present
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|p| !**p)
            .count()
    }
}

/// When an index was looked up, and what was found.
type CachedIndex = (Instant, Option<Arc<Index>>);

/// The lazy path's state; see the module comment.
#[derive(Debug)]
pub struct Lazy {
    fan: Arc<OwnedFd>,
    registry: Arc<Registry>,
    layers: PathBuf,
    blobs: Mutex<HashMap<(u64, u64), Arc<Blob>>>,
    by_layer: Mutex<HashMap<String, Arc<Blob>>>,
    /// Looked-up indexes (or their absence) by image manifest digest.
    indexes: Mutex<HashMap<String, CachedIndex>>,
    rt: tokio::runtime::Handle,
}

impl Lazy {
    /// Starts the event loop and takes back every incomplete file under
    /// `<root>/layers` (marked again, filling resumed); returns whether any
    /// was found, which the caller uses to decide on dropping caches.
    pub fn open(root: &Path, registry: Arc<Registry>) -> Result<(Arc<Lazy>, usize), Error> {
        let layers = root.join("layers");
        fs::create_dir_all(&layers).map_err(io("create", &layers))?;
        // SAFETY: fanotify_init takes flags only and returns a new fd or -1.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_PRE_CONTENT | libc::FAN_CLOEXEC | libc::FAN_UNLIMITED_QUEUE,
                (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as u32,
            )
        };
        if fd < 0 {
            return Err(io("fanotify_init(FAN_CLASS_PRE_CONTENT) for", &layers)(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `fd` was just returned by fanotify_init and is owned here.
        let fan = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let lazy = Arc::new(Lazy {
            fan,
            registry,
            layers: layers.clone(),
            blobs: Mutex::new(HashMap::new()),
            by_layer: Mutex::new(HashMap::new()),
            indexes: Mutex::new(HashMap::new()),
            rt: tokio::runtime::Handle::current(),
        });
        let me = lazy.clone();
        std::thread::Builder::new()
            .name("lazy-events".into())
            .spawn(move || me.event_loop())
            .map_err(io("spawn event thread for", &layers))?;
        let mut resumed = 0;
        for e in fs::read_dir(&layers).map_err(io("read", &layers))? {
            let e = e.map_err(io("read", &layers))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".lazy") else {
                continue;
            };
            let text = fs::read(e.path()).map_err(io("read", &e.path()))?;
            let state: State = match serde_json::from_slice(&text) {
                Ok(s) => s,
                Err(err) => {
                    tracing::error!(file = %e.path().display(), error = %err, "unreadable lazy state; the layer will be fetched again");
                    let _ = fs::remove_file(e.path());
                    let _ = fs::remove_file(layers.join(format!("{hex}.erofs")));
                    continue;
                }
            };
            lazy.register(state, false)?;
            resumed += 1;
        }
        Ok((lazy, resumed))
    }

    /// The sparse EROFS image of layer `layer` of `image` when the image
    /// (manifest `manifest`) has a hyperbox index listing it; `None` sends
    /// the caller to the full fetch.
    pub async fn prepare(
        self: &Arc<Self>,
        image: &str,
        manifest: &str,
        layer: &str,
    ) -> Result<Option<PathBuf>, Error> {
        let known = self
            .by_layer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(layer)
            .cloned();
        if let Some(b) = known {
            self.fetch_metadata(&b).await?;
            return Ok(Some(b.path.clone()));
        }
        let Some(index) = self.index(image, manifest).await else {
            return Ok(None);
        };
        let Some(entry) = index.layer(layer) else {
            return Ok(None);
        };
        let state = State {
            image: image.into(),
            chunk_size: index.chunk_size,
            entry: entry.clone(),
        };
        let me = self.clone();
        let path = tokio::task::spawn_blocking(move || me.register(state, true))
            .await
            .map_err(|e| Error::Io {
                action: "register",
                path: PathBuf::from(layer),
                source: std::io::Error::other(e.to_string()),
            })??;
        let blob = self
            .by_layer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(layer)
            .cloned();
        if let Some(b) = blob {
            self.fetch_metadata(&b).await?;
        }
        Ok(Some(path))
    }

    /// The ranges the kernel reads without events (superblock block,
    /// directories, inodes, xattrs): they must be in before the mount.
    async fn fetch_metadata(&self, blob: &Blob) -> Result<(), Error> {
        let e = &blob.state.entry;
        self.ensure_range(blob, 0, 4096).await?;
        self.ensure_range(blob, e.data_end, e.size - e.data_end)
            .await
    }

    async fn index(&self, image: &str, manifest: &str) -> Option<Arc<Index>> {
        if let Some((at, ix)) = self
            .indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(manifest)
            && at.elapsed()
                < if ix.is_some() {
                    INDEX_TTL
                } else {
                    NO_INDEX_TTL
                }
        {
            return ix.clone();
        }
        let r = Reference::parse(image).ok()?;
        let d = Digest::parse(manifest).ok()?;
        let found = match self.registry.fetch_index(&r, &d).await {
            Ok(ix) => ix.map(Arc::new),
            Err(e) => {
                tracing::warn!(image, error = %crate::error_chain(&e), "cannot read the image's hyperbox index; fetching layers in full");
                None
            }
        };
        self.indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(manifest.into(), (Instant::now(), found.clone()));
        found
    }

    /// Creates (or, after a restart, reopens) the sparse file of `state`,
    /// marks it and starts filling it.
    fn register(self: &Arc<Self>, state: State, fresh: bool) -> Result<PathBuf, Error> {
        let layer = Digest::parse(&state.entry.layer).map_err(|source| Error::Registry {
            what: state.entry.layer.clone(),
            source,
        })?;
        let erofs = Digest::parse(&state.entry.erofs).map_err(|source| Error::Registry {
            what: state.entry.erofs.clone(),
            source,
        })?;
        let reference = Reference::parse(&state.image).map_err(|source| Error::Registry {
            what: state.image.clone(),
            source,
        })?;
        let hex = layer.hex();
        let path = self.layers.join(format!("{hex}.erofs"));
        let state_path = self.layers.join(format!("{hex}.lazy"));
        let have_path = self.layers.join(format!("{hex}.have"));
        let n = state.entry.chunks.len();
        if fresh {
            // The state file first: a crash after it leaves a file the
            // next start takes back, never an unmarked sparse file.
            let tmp = self.layers.join(format!("{hex}.lazy.tmp"));
            fs::write(&tmp, serde_json::to_vec(&state).expect("state serializes"))
                .map_err(io("write", &tmp))?;
            fs::rename(&tmp, &state_path).map_err(io("rename", &state_path))?;
            let _ = fs::remove_file(&have_path);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("open", &path))?;
        file.set_len(state.entry.size).map_err(io("size", &path))?;
        let have_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&have_path)
            .map_err(io("open", &have_path))?;
        have_file
            .set_len(n as u64)
            .map_err(io("size", &have_path))?;
        // Chunks recorded as present are checked again: after a power loss
        // the record may be ahead of the data.
        let mut have = vec![0u8; n];
        have_file
            .read_exact_at(&mut have, 0)
            .map_err(io("read", &have_path))?;
        let mut present = vec![false; n];
        let cs = state.chunk_size;
        let mut buf = vec![0u8; cs as usize];
        for i in 0..n {
            if have[i] != 1 {
                continue;
            }
            let start = i as u64 * cs;
            let len = cs.min(state.entry.size - start) as usize;
            file.read_exact_at(&mut buf[..len], start)
                .map_err(io("read", &path))?;
            present[i] = hex::encode(Sha256::digest(&buf[..len])) == state.entry.chunks[i];
        }
        let meta = file.metadata().map_err(io("stat", &path))?;
        let blob = Arc::new(Blob {
            path: path.clone(),
            state_path,
            have_path,
            file,
            have_file,
            reference,
            erofs,
            state,
            present: Mutex::new(present),
            locks: (0..n).map(|_| tokio::sync::Mutex::new(())).collect(),
            complete: AtomicBool::new(false),
            last_error: Mutex::new(None),
            registered: Instant::now(),
            inode: (meta.dev(), meta.ino()),
        });
        self.mark(&path, libc::FAN_MARK_ADD)?;
        self.blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(blob.inode, blob.clone());
        self.by_layer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(blob.state.entry.layer.clone(), blob.clone());
        tracing::info!(layer = %blob.state.entry.layer, size = blob.state.entry.size, missing = blob.missing(), "lazy layer registered");
        let me = self.clone();
        self.rt.spawn(async move { me.fill(blob).await });
        Ok(path)
    }

    fn mark(&self, path: &Path, op: libc::c_uint) -> Result<(), Error> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| Error::Io {
            action: "mark",
            path: path.into(),
            source: std::io::Error::other(e),
        })?;
        // SAFETY: the fanotify fd is open for the life of `self`; `c` is a
        // NUL-terminated path that outlives the call.
        let rc = unsafe {
            libc::fanotify_mark(
                self.fan.as_raw_fd(),
                op,
                FAN_PRE_ACCESS,
                libc::AT_FDCWD,
                c.as_ptr(),
            )
        };
        if rc != 0 {
            return Err(io("fanotify_mark(FAN_PRE_ACCESS)", path)(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Fetches every missing chunk, in order, then lifts the mark.
    async fn fill(self: Arc<Self>, blob: Arc<Blob>) {
        let started = Instant::now();
        for i in 0..blob.locks.len() {
            // Forgotten (its snapshots were removed): stop fetching.
            if blob.complete.load(Ordering::SeqCst) {
                return;
            }
            if let Err(e) = self.ensure_chunk(&blob, i).await {
                tracing::warn!(layer = %blob.state.entry.layer, chunk = i, error = %crate::error_chain(&e), "background fill stopped; reads still fetch on demand");
                return;
            }
        }
        self.finish(&blob);
        tracing::info!(layer = %blob.state.entry.layer, ms = started.elapsed().as_millis() as u64, "lazy layer complete");
    }

    /// Every chunk is in: no more events for this file.
    fn finish(&self, blob: &Blob) {
        if blob.complete.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = blob.file.sync_all();
        if let Err(e) = self.mark(&blob.path, libc::FAN_MARK_REMOVE) {
            tracing::warn!(error = %crate::error_chain(&e), "cannot remove the mark of a complete layer");
        }
        let _ = fs::remove_file(&blob.state_path);
        let _ = fs::remove_file(&blob.have_path);
        self.by_layer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&blob.state.entry.layer);
    }

    async fn ensure_chunk(&self, blob: &Blob, i: usize) -> Result<(), Error> {
        let _guard = blob.locks[i].lock().await;
        if blob.present.lock().unwrap_or_else(|p| p.into_inner())[i] {
            return Ok(());
        }
        let (start, len) = blob.chunk_range(i);
        let data = self
            .registry
            .fetch_range(&blob.reference, &blob.erofs, start, len)
            .await
            .map_err(|source| Error::Registry {
                what: format!("{} chunk {i}", blob.erofs),
                source,
            })?;
        if hex::encode(Sha256::digest(&data)) != blob.state.entry.chunks[i] {
            return Err(Error::Chunk {
                erofs: blob.erofs.to_string(),
                chunk: i,
            });
        }
        blob.file
            .write_all_at(&data, start)
            .map_err(io("write", &blob.path))?;
        blob.have_file
            .write_all_at(&[1], i as u64)
            .map_err(io("write", &blob.have_path))?;
        blob.present.lock().unwrap_or_else(|p| p.into_inner())[i] = true;
        Ok(())
    }

    async fn ensure_range(&self, blob: &Blob, offset: u64, count: u64) -> Result<(), Error> {
        let size = blob.state.entry.size;
        if count == 0 || offset >= size {
            return Ok(());
        }
        let cs = blob.state.chunk_size;
        let first = (offset / cs) as usize;
        let last = ((offset + count).min(size) - 1) / cs;
        let wanted = (first..=last as usize).map(|i| self.ensure_chunk(blob, i));
        for r in futures::future::join_all(wanted).await {
            r?;
        }
        Ok(())
    }

    fn respond(&self, fd: RawFd, response: u32) {
        let r = libc::fanotify_response { fd, response };
        // SAFETY: writes one fanotify_response to our fanotify fd.
        let n = unsafe {
            libc::write(
                self.fan.as_raw_fd(),
                (&r as *const libc::fanotify_response).cast(),
                std::mem::size_of::<libc::fanotify_response>(),
            )
        };
        if n < 0 && response != FAN_ALLOW {
            // Kernels without FAN_DENY_ERRNO: a plain deny (EPERM).
            let r = libc::fanotify_response {
                fd,
                response: FAN_DENY,
            };
            // SAFETY: as above.
            unsafe {
                libc::write(
                    self.fan.as_raw_fd(),
                    (&r as *const libc::fanotify_response).cast(),
                    std::mem::size_of::<libc::fanotify_response>(),
                )
            };
        }
        // SAFETY: the event's fd is ours to close, once.
        unsafe { libc::close(fd) };
    }

    fn event_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: reads into `buf`, which is valid for its length.
            let n = unsafe { libc::read(self.fan.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "fanotify read failed; lazy reads are no longer served");
                return;
            }
            let mut at = 0usize;
            let n = n as usize;
            while at + std::mem::size_of::<libc::fanotify_event_metadata>() <= n {
                // SAFETY: the kernel wrote whole events; the header fits in
                // the bytes read, and read_unaligned copes with alignment.
                let m: libc::fanotify_event_metadata =
                    unsafe { std::ptr::read_unaligned(buf.as_ptr().add(at).cast()) };
                let len = m.event_len as usize;
                if len < std::mem::size_of::<libc::fanotify_event_metadata>()
                    || at + len > n
                    || m.metadata_len as usize > len
                {
                    break;
                }
                let (offset, count) = range_of(&buf[at + m.metadata_len as usize..at + len]);
                at += len;
                if m.fd < 0 {
                    continue;
                }
                self.dispatch(m.fd, offset, count);
            }
        }
    }

    fn dispatch(self: &Arc<Self>, fd: RawFd, offset: u64, count: u64) {
        // SAFETY: `st` is plain data filled by fstat on the event's fd.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is an open fd from the event; `st` is writable.
        let blob = if unsafe { libc::fstat(fd, &mut st) } == 0 {
            self.blobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&(st.st_dev, st.st_ino))
                .cloned()
        } else {
            None
        };
        let Some(blob) = blob else {
            self.respond(fd, FAN_ALLOW);
            return;
        };
        if blob.complete.load(Ordering::SeqCst) {
            self.respond(fd, FAN_ALLOW);
            return;
        }
        let me = self.clone();
        self.rt.spawn(async move {
            let r = me.ensure_range(&blob, offset, count).await;
            match r {
                Ok(()) => me.respond(fd, FAN_ALLOW),
                Err(e) => {
                    let msg = crate::error_chain(&e);
                    tracing::error!(layer = %blob.state.entry.layer, offset, count, error = %msg, "lazy read failed; the reader gets EIO");
                    *blob.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
                    me.respond(fd, FAN_DENY_EIO);
                }
            }
        });
    }

    /// Whether layer `layer` is being filled lazily.
    pub fn knows(&self, layer: &str) -> bool {
        self.by_layer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(layer)
    }

    /// Why the last read of layer `layer` failed, if one did.
    pub fn last_error(&self, layer: &str) -> Option<String> {
        self.by_layer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(layer)
            .and_then(|b| {
                b.last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            })
    }

    /// Forgets a layer whose mount failed, and its files, so the next
    /// Prepare starts over (or fetches whole).
    pub fn forget(&self, layer: &str) {
        let b = self
            .by_layer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(layer)
            .cloned();
        if let Some(b) = b {
            self.discard(&b);
        }
    }

    /// Forgets lazy files no snapshot links to any more (and removes them).
    pub fn prune(&self) -> Vec<PathBuf> {
        let all: Vec<Arc<Blob>> = self
            .by_layer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut removed = Vec::new();
        for b in all {
            // Only our own link, none from a snapshot, and not a layer a
            // Prepare registered a moment ago and is about to link.
            let unlinked = fs::metadata(&b.path).is_ok_and(|m| m.nlink() == 1);
            if unlinked && b.registered.elapsed() > PRUNE_GRACE {
                self.discard(&b);
                removed.push(b.path.clone());
            }
        }
        removed
    }

    /// Stops serving and filling `b` and removes its files.
    fn discard(&self, b: &Blob) {
        self.by_layer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&b.state.entry.layer);
        self.blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&b.inode);
        b.complete.store(true, Ordering::SeqCst);
        let _ = fs::remove_file(&b.state_path);
        let _ = fs::remove_file(&b.have_path);
        let _ = fs::remove_file(&b.path);
    }
}

/// The `(offset, count)` of a pre-content event's range record, if any.
fn range_of(info: &[u8]) -> (u64, u64) {
    let mut at = 0;
    while at + 4 <= info.len() {
        let kind = info[at];
        let len = u16::from_ne_bytes([info[at + 2], info[at + 3]]) as usize;
        if len < 4 || at + len > info.len() {
            break;
        }
        // header (4) + pad (4) + offset (8) + count (8)
        if kind == FAN_EVENT_INFO_TYPE_RANGE && len >= 24 {
            let off = u64::from_ne_bytes(info[at + 8..at + 16].try_into().expect("8 bytes"));
            let cnt = u64::from_ne_bytes(info[at + 16..at + 24].try_into().expect("8 bytes"));
            return (off, cnt);
        }
        at += len;
    }
    (0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_records_are_found_among_info_records() {
        let mut info = vec![1u8, 0, 8, 0, 0, 0, 0, 0]; // some other record
        info.extend_from_slice(&[FAN_EVENT_INFO_TYPE_RANGE, 0, 24, 0, 0, 0, 0, 0]);
        info.extend_from_slice(&4096u64.to_ne_bytes());
        info.extend_from_slice(&65536u64.to_ne_bytes());
        assert_eq!(range_of(&info), (4096, 65536));
        assert_eq!(
            range_of(&[6, 0, 2, 0]),
            (0, 0),
            "malformed length stops the scan"
        );
        assert_eq!(range_of(&[]), (0, 0));
    }
}
