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
//! fanotify is reached through hyperbox-kernel's [`PreContent`] seam, so
//! the policy here (which reads wait for what, and what they are answered)
//! is unit-tested with its fake.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyperbox_kernel::fanotify::{AccessEvent, FileId, PreContent, Verdict};
use hyperbox_registry::digest::Digest;
use hyperbox_registry::index::{Index, IndexLayer};
use hyperbox_registry::{Reference, Registry};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

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
    /// The file, as events identify it.
    inode: FileId,
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
    fan: Arc<dyn PreContent>,
    registry: Arc<Registry>,
    layers: PathBuf,
    blobs: Mutex<HashMap<FileId, Arc<Blob>>>,
    by_layer: Mutex<HashMap<String, Arc<Blob>>>,
    /// Looked-up indexes (or their absence) by image manifest digest.
    indexes: Mutex<HashMap<String, CachedIndex>>,
    rt: tokio::runtime::Handle,
}

impl Lazy {
    /// Starts the event loop on `fan` (a pre-content fanotify group) and
    /// takes back every incomplete file under `<root>/layers` (marked
    /// again, filling resumed); returns how many were found, which the
    /// caller uses to decide on dropping caches.
    pub fn open(
        root: &Path,
        registry: Arc<Registry>,
        fan: Arc<dyn PreContent>,
    ) -> Result<(Arc<Lazy>, usize), Error> {
        let layers = root.join("layers");
        fs::create_dir_all(&layers).map_err(io("create", &layers))?;
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
                tracing::warn!(image, error = %hyperbox_api::error_chain(&e), "cannot read the image's hyperbox index; fetching layers in full");
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
        self.fan
            .mark(&path)
            .map_err(io("fanotify_mark(FAN_PRE_ACCESS)", &path))?;
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

    /// Fetches every missing chunk, in order, then lifts the mark.
    async fn fill(self: Arc<Self>, blob: Arc<Blob>) {
        let started = Instant::now();
        for i in 0..blob.locks.len() {
            // Forgotten (its snapshots were removed): stop fetching.
            if blob.complete.load(Ordering::SeqCst) {
                return;
            }
            if let Err(e) = self.ensure_chunk(&blob, i).await {
                tracing::warn!(layer = %blob.state.entry.layer, chunk = i, error = %hyperbox_api::error_chain(&e), "background fill stopped; reads still fetch on demand");
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
        if let Err(e) = self.fan.unmark(&blob.path) {
            tracing::warn!(file = %blob.path.display(), error = %e, "cannot remove the mark of a complete layer");
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

    fn respond(&self, event: AccessEvent, verdict: Verdict) {
        if let Err(e) = self.fan.respond(event, verdict) {
            // The reader stays blocked only if the group itself broke,
            // which the event loop reports.
            tracing::warn!(?verdict, error = %e, "cannot answer a held read");
        }
    }

    fn event_loop(self: Arc<Self>) {
        let mut events = Vec::new();
        loop {
            if let Err(e) = self.fan.read_events(&mut events) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "fanotify read failed; lazy reads are no longer served");
                return;
            }
            for event in events.drain(..) {
                self.dispatch(event);
            }
        }
    }

    /// Answers a held read of a lazy file once its range is in; reads of
    /// anything else (complete files, files this daemon does not know)
    /// go on at once.
    fn dispatch(self: &Arc<Self>, event: AccessEvent) {
        let blob = event.file.and_then(|f| {
            self.blobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&f)
                .cloned()
        });
        let Some(blob) = blob else {
            self.respond(event, Verdict::Allow);
            return;
        };
        if blob.complete.load(Ordering::SeqCst) {
            self.respond(event, Verdict::Allow);
            return;
        }
        let me = self.clone();
        self.rt.spawn(async move {
            let (offset, count) = (event.offset, event.count);
            match me.ensure_range(&blob, offset, count).await {
                Ok(()) => me.respond(event, Verdict::Allow),
                Err(e) => {
                    let msg = hyperbox_api::error_chain(&e);
                    tracing::error!(layer = %blob.state.entry.layer, offset, count, error = %msg, "lazy read failed; the reader gets EIO");
                    *blob.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
                    me.respond(event, Verdict::DenyEio);
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use hyperbox_kernel::testing::FakeFanotify;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const CHUNK: u64 = 4096;
    const WAIT: Duration = Duration::from_secs(20);

    /// A registry that serves one blob over plain HTTP with Range
    /// requests; with `corrupt`, every byte it sends is wrong.
    struct Blobs {
        addr: std::net::SocketAddr,
        ranges: Arc<AtomicUsize>,
    }

    async fn serve(blob: Vec<u8>, corrupt: bool) -> Blobs {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ranges = Arc::new(AtomicUsize::new(0));
        let (blob, counted) = (Arc::new(blob), ranges.clone());
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let (blob, counted) = (blob.clone(), counted.clone());
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            // A TLS hello (0x16): the client tries HTTP next.
                            Ok(n) if n > 0 && buf[0] != 0x16 => req.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    let text = String::from_utf8_lossy(&req).to_lowercase();
                    let range = text
                        .lines()
                        .find_map(|l| l.strip_prefix("range: bytes="))
                        .and_then(|r| r.trim().split_once('-'))
                        .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
                    let Some((a, b)) = range else {
                        let _ = conn
                            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                            .await;
                        return;
                    };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let mut body = blob[a..=b].to_vec();
                    if corrupt {
                        body.iter_mut().for_each(|x| *x = !*x);
                    }
                    let head = format!(
                        "HTTP/1.1 206 Partial Content\r\ncontent-range: bytes {a}-{b}/{}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        blob.len(),
                        body.len()
                    );
                    let _ = conn.write_all(head.as_bytes()).await;
                    let _ = conn.write_all(&body).await;
                });
            }
        });
        Blobs { addr, ranges }
    }

    struct Setup {
        _dir: tempfile::TempDir,
        lazy: Arc<Lazy>,
        fan: Arc<FakeFanotify>,
        blob: Vec<u8>,
        path: PathBuf,
        file: FileId,
        layer: String,
        server: Blobs,
    }

    impl Drop for Setup {
        fn drop(&mut self) {
            // Ends the event thread.
            self.fan.close();
        }
    }

    /// A lazy layer of four chunks, registered and marked, whose bytes
    /// come from a local registry.
    async fn setup(corrupt: bool) -> Setup {
        let blob: Vec<u8> = (0..4 * CHUNK).map(|i| (i % 251) as u8).collect();
        let server = serve(blob.clone(), corrupt).await;
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::new(&hyperbox_config::Registry {
            config_path: dir.path().join("certs.d"),
            docker_config: dir.path().join("config.json"),
            max_concurrent_downloads: 1,
            retries: 0,
            timeout_secs: 5,
        })
        .unwrap();
        let fan = Arc::new(FakeFanotify::new());
        let (lazy, resumed) = Lazy::open(dir.path(), Arc::new(registry), fan.clone()).unwrap();
        assert_eq!(resumed, 0);
        let layer = format!("sha256:{}", "1".repeat(64));
        let state = State {
            image: format!("{}/test/lazy:v1", server.addr),
            chunk_size: CHUNK,
            entry: IndexLayer {
                layer: layer.clone(),
                erofs: Digest::of(&blob).to_string(),
                size: blob.len() as u64,
                data_end: 3 * CHUNK,
                chunks: blob
                    .chunks(CHUNK as usize)
                    .map(|c| hex::encode(Sha256::digest(c)))
                    .collect(),
            },
        };
        let me = lazy.clone();
        let path = tokio::task::spawn_blocking(move || me.register(state, true))
            .await
            .unwrap()
            .unwrap();
        let m = fs::metadata(&path).unwrap();
        Setup {
            _dir: dir,
            lazy,
            fan,
            blob,
            path,
            file: (m.dev(), m.ino()),
            layer,
            server,
        }
    }

    fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        File::open(path)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_read_is_allowed_once_its_range_is_in_and_verified() {
        let s = setup(false).await;
        assert_eq!(
            s.fan.marked(),
            std::slice::from_ref(&s.path),
            "marked before any mount"
        );
        assert!(s.lazy.knows(&s.layer));
        let offset = CHUNK + 100;
        let id = s.fan.push(Some(s.file), offset, 16);
        let answer = tokio::task::spawn_blocking({
            let fan = s.fan.clone();
            move || fan.answer(id, WAIT)
        })
        .await
        .unwrap();
        assert_eq!(answer, Some(Verdict::Allow));
        assert_eq!(
            read_at(&s.path, CHUNK, CHUNK as usize),
            s.blob[CHUNK as usize..2 * CHUNK as usize],
            "the chunk holding the range was written before the answer"
        );
        assert!(s.server.ranges.load(Ordering::SeqCst) >= 1);
        // The background fill completes the file and lifts its mark.
        let fan = s.fan.clone();
        let unmarked = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + WAIT;
            while !fan.marked().is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            fan.marked().is_empty()
        })
        .await
        .unwrap();
        assert!(unmarked, "a complete layer is no longer marked");
        assert_eq!(fs::read(&s.path).unwrap(), s.blob);
        assert!(!s.lazy.knows(&s.layer));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_that_cannot_be_verified_fails_with_eio_and_says_why() {
        let s = setup(true).await;
        let id = s.fan.push(Some(s.file), 2 * CHUNK, CHUNK);
        let fan = s.fan.clone();
        let answer = tokio::task::spawn_blocking(move || fan.answer(id, WAIT))
            .await
            .unwrap();
        assert_eq!(answer, Some(Verdict::DenyEio));
        assert_eq!(
            read_at(&s.path, 2 * CHUNK, CHUNK as usize),
            vec![0u8; CHUNK as usize],
            "nothing unverified was written"
        );
        let why = s.lazy.last_error(&s.layer).unwrap();
        assert!(why.contains("does not match the index"), "{why}");
        assert_eq!(s.fan.marked(), std::slice::from_ref(&s.path), "still held");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_of_files_it_does_not_serve_go_on_at_once() {
        let s = setup(false).await;
        let other = s.fan.push(Some((0, 1)), 0, 4096);
        let unknown = s.fan.push(None, 0, 4096);
        let fan = s.fan.clone();
        let answers = tokio::task::spawn_blocking(move || {
            (fan.answer(other, WAIT), fan.answer(unknown, WAIT))
        })
        .await
        .unwrap();
        assert_eq!(answers, (Some(Verdict::Allow), Some(Verdict::Allow)));
    }
}
