//! The lazy path: layers of images that carry a hyperbox index are mounted
//! at once from a sparse EROFS image file, and the kernel's reads of bytes
//! not yet fetched are held by fanotify pre-content events
//! (`FAN_PRE_ACCESS`, kernel 6.14+) until the chunk holding them has been
//! fetched with a Range request, checked against its SHA-256 from the index
//! and written into the file. A background task fills the rest (retrying
//! with backoff when the registry fails); once a file is complete its mark
//! is removed and the kernel reads it at native speed.
//!
//! The writes themselves raise no events: each file is opened for writing
//! before its mark is placed, and the kernel decides at open time whether
//! an open file reports pre-content events. (A group kept across a restart
//! keeps its marks, so a file reopened then does raise events for our own
//! writes: those are recognised by pid and allowed at once.)
//!
//! A chunk that cannot be fetched or does not verify is denied with EIO:
//! the reading process gets an I/O error, never unverified or missing
//! bytes. docs/security.md states what an index can make a container read.
//!
//! **Binding to the image.** An index is found by a mutable tag, so it is
//! trusted only as far as it is checked:
//! - its entry is used only when the diff_id it names gives the chain id
//!   containerd asked for (computed from the image config);
//! - lazy files live apart from the whole-fetch cache, in
//!   `<root>/lazy/<layer>.<erofs>.erofs`, keyed by the layer *and* the EROFS
//!   image the index names: another index never writes, replaces or serves
//!   a file made from a different one, and a file a snapshot links is never
//!   rewritten;
//! - the layer is fetched whole (verified against its compressed digest)
//!   and converted, and must give the index's diff_id and the same EROFS
//!   bytes, chunk by chunk ([`Verifier`]): by default that download is the
//!   fill (`fill_from_layer`); with the Range fill it follows completion
//!   (`verify`). On mismatch the file is marked
//!   again and every further read of it fails with EIO, new mounts on it
//!   are refused, and its index entry is never used again on this node (the
//!   next pull fetches the layer whole). Until then its bytes are served:
//!   containerd reuses a committed chain without asking us, so that window
//!   is bounded by the fill and the check, not closed. When containerd does
//!   ask (a Prepare for the existing target), a pull whose own index does
//!   not name the same bytes waits for the verdict ([`Lazy::wait_trusted`]).
//!
//! **Restarts.** State is written durably (fsync, rename, fsync of the
//! directory). While the daemon is down its fanotify group survives only if
//! a service manager holds its fd (see `crate::fdstore`); otherwise the
//! marks are gone and unfetched ranges of mounted layers read as zeros until
//! the next start, which marks every incomplete file again before anything
//! is mounted and drops the page cache once. A state file that cannot be
//! read is set aside (`.corrupt`), and its file refused, not a crash loop.
//!
//! fanotify is reached through hyperbox-kernel's [`PreContent`] seam, so
//! the policy here (which reads wait for what, and what they are answered)
//! is unit-tested with its fake.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hyperbox_kernel::fanotify::{AccessEvent, FileId, PreContent, Verdict};
use hyperbox_registry::digest::{Digest, chain_id};
use hyperbox_registry::index::{Index, IndexLayer};
use hyperbox_registry::{Pace, Reference, Registry};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::{Semaphore, watch};

use crate::demand::Demand;
use crate::prefetch;

/// Unlinked lazy layers younger than this survive Cleanup.
const PRUNE_GRACE: Duration = Duration::from_secs(60);
/// How long a looked-up index is trusted.
const INDEX_TTL: Duration = Duration::from_secs(60);
/// How long its absence is: short, so an index pushed after a first pull
/// is picked up soon, long enough to spare the registry one lookup per
/// layer of every pull.
const NO_INDEX_TTL: Duration = Duration::from_secs(10);
/// Why a lazy file an older hyperbox left in the whole-fetch cache is
/// refused.
const LEGACY: &str =
    "its lazy layer was left incomplete by an older hyperbox; remove the image and pull it again";
/// The longest pause between retries of a failed background fetch.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Bytes per Range request of the background fill: adjacent missing
/// chunks go together, so small chunks (what reads fetch) do not make the
/// fill pay a round trip each.
pub const FILL_REQUEST: u64 = 1 << 20;
/// The most bytes one Range request asks for (a large read or the
/// metadata of a big layer is split, the pieces fetched at once).
const MAX_REQUEST: u64 = 4 << 20;
/// Read-ahead after a read that is not in the wake of the last one: a
/// program reading one small file often reads its neighbours next (EROFS
/// keeps a directory's files together, in tar order), a Python import for
/// one. Only while that pays ([`Ahead::pays`]): a program reading files
/// scattered over the layer would fetch several times what it reads.
const READAHEAD_MIN: u64 = 128 << 10;
/// Chunks read ahead after jumps before judging whether reads use them.
const READAHEAD_TRIAL: u64 = 64;
/// While read-ahead after jumps does not pay, one jump in this many still
/// reads ahead, so a workload whose reads turn local again is noticed.
const READAHEAD_PROBE: u64 = 16;
/// Read-ahead while reads follow each other (a library mapped, a large
/// file read through).
const READAHEAD_MAX: u64 = 1 << 20;
/// Range requests of a learned prefetch in flight at once, per layer:
/// enough small runs of a scattered list (a few 16 KiB chunks each) to keep
/// a 100 Mbit/s link with 20 ms round trips busy. The fetch semaphore
/// (`snapshotter.lazy_max_chunk_fetches`) still bounds all requests.
const PREFETCH_PARALLEL: usize = 16;
/// How long an index lookup waits for the shared prefetch lists once the
/// index is in: they only speed a pull up, so they never hold one back for
/// long.
const SHARED_GRACE: Duration = Duration::from_millis(250);
/// Downloads of the whole layer tried before filling from the EROFS blob.
const WHOLE_ATTEMPTS: u32 = 3;
/// Layers downloaded whole for fills at once (containerd's default
/// `max_concurrent_downloads`).
const LAYER_FILLS: usize = 3;
/// A fill from the layer starts once reads have been quiet this long: a
/// paused download still receives what its server sent and the sockets
/// hold (hundreds of KiB), which a start-up burst of reads would queue
/// behind. Measured on the Python image: started at once, the container's
/// exit came about 7 % later.
const LAYER_QUIET: Duration = Duration::from_millis(500);
/// ... but at the latest this long after the prefetch, so a container
/// that never stops reading still gets its layer local.
const LAYER_QUIET_MAX: Duration = Duration::from_secs(10);
/// A layer downloaded at once ([`Download::AtOnce`]) keeps recording the
/// reads of its first run after it is complete, until none came for this
/// long (at most [`LAYER_QUIET_MAX`]): the list learned then is what the
/// next nodes prefetch, and a run that outlasts the download reads more.
/// Longer under test, where a loaded machine may pause between reads.
const LEARN_QUIET: Duration = Duration::from_secs(if cfg!(test) { 3 } else { 1 });
/// Fill requests dropped in a row for reads before one is finished anyway.
const MAX_DROPS: u32 = 3;

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
    /// A file snapshots still link would have been rewritten.
    #[error("{path} is linked by snapshots; it is never rewritten")]
    Linked {
        /// The file.
        path: PathBuf,
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

/// Where whole layers come from: the source of a fill from the layer and
/// the check of a layer filled otherwise.
pub trait Verifier: fmt::Debug + Send + Sync {
    /// Layer `layer` of `image`, fetched whole (verified against its
    /// compressed digest) and converted: the EROFS image's path and the
    /// diff_id its decompressed bytes give. The download reads only as
    /// `pace` lets it.
    fn whole<'a>(
        &'a self,
        image: &'a str,
        layer: &'a str,
        pace: Option<Pace>,
    ) -> BoxFuture<'a, Result<(PathBuf, String), WholeError>>;
}

/// Why a layer could not be had whole.
#[derive(Debug, Clone)]
pub struct WholeError {
    /// The cause, for logs.
    pub why: String,
    /// The layer's own bytes were refused (policy, a malformed tar): no
    /// retry will do better, and the lazy copy made from its index cannot
    /// be checked, so it is refused. Otherwise the registry failed.
    pub bad_content: bool,
    /// The download was stopped for a lazy layer no longer wanted: if the
    /// caller's own layer is, it was another one of the same layer blob,
    /// which shared the download.
    pub stopped: bool,
}

/// `[snapshotter]` settings of the lazy path.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Range requests in flight at once, demand and background together
    /// (`snapshotter.lazy_max_chunk_fetches`).
    pub max_chunk_fetches: usize,
    /// Verify completed layers against the image (`snapshotter.lazy_verify`).
    pub verify: bool,
    /// The node's I/O `some avg10` (%) at which background fills pause,
    /// 0 for never (`snapshotter.lazy_fill_pause_io_pressure`).
    pub fill_pause_io_pressure: f64,
    /// Bytes per Range request of the background fill ([`FILL_REQUEST`]).
    pub fill_request: u64,
    /// Look up the prefetch lists shared beside an image's index
    /// (`snapshotter.lazy_shared_prefetch`).
    pub shared_prefetch: bool,
    /// Fill from the layer fetched whole rather than with Range requests
    /// to the EROFS blob (`snapshotter.lazy_fill_from_layer`).
    pub fill_from_layer: bool,
}

/// What the lazy path has done, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Completed layers that matched the image.
    pub verified: AtomicU64,
    /// Completed layers that did not: no longer served.
    pub rejected: AtomicU64,
    /// Index entries not used because their diff_id does not give the
    /// chain id containerd asked for.
    pub chain_mismatch: AtomicU64,
    /// Chunk fetches that failed (or did not verify).
    pub chunk_failures: AtomicU64,
    /// Chunks fetched ahead from learned prefetch lists.
    pub prefetched_chunks: AtomicU64,
    /// Lazy layers whose prefetch used a list shared through the registry.
    pub shared_prefetch_lists: AtomicU64,
    /// Reads answered with EIO.
    pub denied_reads: AtomicU64,
    /// Chunks fetched ahead of reads.
    pub readahead_chunks: AtomicU64,
    /// Of those, chunks a read then touched.
    pub readahead_used: AtomicU64,
    /// Chunks filled from the layer itself, converted on the node.
    pub layer_filled_chunks: AtomicU64,
    /// Lazy layers of images no run taught a prefetch list, downloaded
    /// whole at once ([`Download::AtOnce`]).
    pub untried_layers: AtomicU64,
}

/// What survives a restart about a lazy file (`<key>.lazy`): present until
/// the file is complete and verified; with `rejected`, why it is refused.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    image: String,
    chunk_size: u64,
    entry: IndexLayer,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rejected: Option<String>,
}

/// Where a lazy file is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Chunks are missing; reads are held until theirs are in.
    Filling,
    /// Complete, being checked against the image.
    Verifying,
    /// Complete and checked (or checks are off).
    Verified,
    /// Did not match the image: reads fail with EIO.
    Rejected(String),
    /// Removed (its snapshots were removed, or its mount failed).
    Discarded,
}

/// When a lazy layer's whole download starts (with
/// `snapshotter.lazy_fill_from_layer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Download {
    /// After the learned prefetch, once reads settle, and giving way to
    /// reads: runs of its image taught which bytes come first.
    AfterReads,
    /// At mount, at the link's speed, giving way only to I/O pressure: no
    /// run of its image taught anything, here or shared, so nothing says
    /// which bytes matter and the workload's reads come one round trip at
    /// a time. Waiting for them to settle made the first run slower than
    /// a full fetch (Python image: 8.99 s against 6.12 s; at once, 6.12 s
    /// against 5.93 s).
    AtOnce,
}

/// One sparse EROFS image being filled.
#[derive(Debug)]
struct Blob {
    key: String,
    /// The prefetch list shared beside the index this layer was pulled
    /// through, fitted to it (none after a restart).
    shared: Option<SharedList>,
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
    /// Per chunk, the reads in flight waiting for it: the background fill
    /// finishes such a chunk when a read arrives instead of giving it up.
    wanted: Vec<Arc<AtomicU32>>,
    phase: watch::Sender<Phase>,
    /// The last failure to serve a read, for error messages.
    last_error: Mutex<Option<String>>,
    /// Where the last read ended and the read-ahead window now.
    readahead: Mutex<(u64, u64)>,
    /// What read-ahead fetched and what reads used of it.
    ahead: Mutex<Ahead>,
    /// The chunks reads waited for, in first-read order: the layer's
    /// learned prefetch list.
    reads: Mutex<prefetch::Recorder>,
    /// How many of `reads` are in the saved list.
    saved: AtomicUsize,
    /// When a read of it was last seen.
    last_read: Mutex<Option<Instant>>,
    /// When its whole download starts.
    download: Download,
    /// When it was registered: a Prepare may still be about to link it.
    registered: Instant,
    /// The file, as events identify it.
    inode: FileId,
}

impl Blob {
    /// Whether its path still names its file (not one a later pull put
    /// there after a discard).
    fn still_at_its_path(&self) -> bool {
        file_id(&self.path).is_some_and(|(id, _)| id == self.inode)
    }

    fn chunk_range(&self, i: usize) -> (u64, u64) {
        let cs = self.state.chunk_size;
        let start = i as u64 * cs;
        (start, cs.min(self.state.entry.size - start))
    }

    /// The first and last chunk holding `offset..offset+count`, if any
    /// byte of it is in the file.
    fn chunks_of(&self, offset: u64, count: u64) -> Option<(usize, usize)> {
        let size = self.state.entry.size;
        if count == 0 || offset >= size {
            return None;
        }
        let cs = self.state.chunk_size;
        let last = ((offset + count).min(size) - 1) / cs;
        Some(((offset / cs) as usize, last as usize))
    }

    /// How many chunks `bytes` is (at least one): a request's bound.
    fn chunks_in(&self, bytes: u64) -> usize {
        (bytes / self.state.chunk_size).max(1) as usize
    }

    /// The chunks to fetch ahead of a read of `offset..offset+count`
    /// (those missing, after the read's last chunk), the window doubling
    /// while reads follow each other and shrinking back on a jump, as the
    /// kernel's own read-ahead does for the page cache.
    fn ahead_of(&self, offset: u64, count: u64) -> Option<(usize, usize, u64)> {
        let size = self.state.entry.size;
        let cs = self.state.chunk_size;
        if cs >= READAHEAD_MAX {
            // Indexes with large chunks (1 MiB, before 64 KiB): a chunk is
            // read-ahead enough, the fill does the rest.
            return None;
        }
        let end = (offset + count).min(size);
        let (window, follows) = {
            let mut ra = lock(&self.readahead);
            let (next, follows) = readahead_window(*ra, offset, cs);
            *ra = (end, next);
            (next, follows)
        };
        let mut ahead = lock(&self.ahead);
        if !follows {
            ahead.jumps += 1;
            if !ahead.pays() && !ahead.jumps.is_multiple_of(READAHEAD_PROBE) {
                return None;
            }
        }
        let first = end.div_ceil(cs) as usize;
        let last = ((end + window).min(size).div_ceil(cs) as usize).min(self.locks.len());
        let (a, b) = next_missing_run(&lock(&self.present)[..last], first, last)?;
        // Chunks an earlier read-ahead is still fetching count once.
        let new = (a..=b).filter(|c| ahead.pending.insert(*c)).count() as u64;
        ahead.fetched += new;
        if ahead.fetched >= 8 * READAHEAD_TRIAL {
            // Recent use counts most: a scattered phase long past does not
            // keep read-ahead off.
            ahead.fetched /= 2;
            ahead.used /= 2;
        }
        Some((a, b, new))
    }

    /// Records a read for the layer's learned prefetch list; returns how
    /// many chunks read ahead it used.
    fn note_read(&self, offset: u64, count: u64) -> u64 {
        let Some((first, last)) = self.chunks_of(offset, count) else {
            return 0;
        };
        lock(&self.reads).note(first, last);
        *lock(&self.last_read) = Some(Instant::now());
        let mut ahead = lock(&self.ahead);
        let used = (first..=last).filter(|c| ahead.pending.remove(c)).count() as u64;
        ahead.used += used;
        used
    }

    fn missing(&self) -> usize {
        lock(&self.present).iter().filter(|p| !**p).count()
    }

    fn phase(&self) -> Phase {
        self.phase.borrow().clone()
    }
}

/// A file whose reads fail and on which nothing new is mounted.
#[derive(Debug, Clone)]
struct Refusal {
    path: PathBuf,
    why: String,
}

/// When an index was looked up, what was found, and the prefetch lists
/// shared beside it that fit it, by EROFS image: a list is only ever used
/// for a layer pulled through the very index it was found with, so one
/// repository's lists never reach another's pulls.
#[derive(Debug)]
struct CachedIndex {
    at: Instant,
    found: Option<Found>,
}

/// An index as one lookup found it, with its shared lists: a pull takes
/// both from the same lookup.
#[derive(Debug, Clone)]
struct Found {
    index: Arc<Index>,
    shared: Arc<HashMap<String, SharedList>>,
}

/// A prefetch list shared through the registry, fitted to one layer.
type SharedList = Arc<Vec<usize>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a fill from the layer itself ended.
enum FromLayer {
    /// Filled and accepted, rejected, or the layer went away meanwhile.
    Done,
    /// The layer could not be had: fill with Range requests instead.
    Unavailable,
}

/// What the layer fetched whole made of a lazy copy.
enum Judged {
    /// It matched: this many chunks were filled from it.
    Matched(usize),
    /// It did not match, or was refused for its content: the copy is
    /// refused.
    Refused,
    /// The conversion could not be read (why).
    Unreadable(String),
}

/// Why the converted layer could not fill a lazy copy.
enum FillError {
    /// It is not the index's EROFS image (how it differs).
    Mismatch(String),
    Io(String),
}

/// Checks the converted layer at `converted` against the index (for a
/// fill and for the check of a layer the Range fill completed), every
/// chunk against its digest and the whole against the EROFS digest (so the
/// chunks reads fetched from the registry, checked against the same chunk
/// digests, are the image's own bytes too), writing each chunk `blob`
/// still lacks as it goes; how many. Nothing reaches the file that its
/// chunk digest does not vouch for, and a mismatch anywhere refuses the
/// layer. Chunks written meanwhile by reads hold the same bytes, so no
/// chunk lock is taken: a read waiting for one is answered by its own
/// fetch.
fn copy_missing(blob: &Blob, converted: &Path) -> Result<usize, FillError> {
    let io = |what: &str, e: std::io::Error| {
        FillError::Io(format!("{what} {}: {e}", converted.display()))
    };
    let src = File::open(converted).map_err(|e| io("open", e))?;
    let e = &blob.state.entry;
    let size = src.metadata().map_err(|err| io("stat", err))?.len();
    if size != e.size {
        return Err(FillError::Mismatch(format!("{size} bytes, not {}", e.size)));
    }
    let mut whole = Sha256::new();
    let mut buf = vec![0u8; blob.state.chunk_size as usize];
    let mut copied = 0;
    for i in 0..e.chunks.len() {
        let (start, len) = blob.chunk_range(i);
        let piece = &mut buf[..len as usize];
        src.read_exact_at(piece, start)
            .map_err(|err| io("read", err))?;
        whole.update(&*piece);
        if hex::encode(Sha256::digest(&*piece)) != e.chunks[i] {
            return Err(FillError::Mismatch(format!("chunk {i} differs")));
        }
        if blob.phase() != Phase::Filling || lock(&blob.present)[i] {
            continue;
        }
        blob.file
            .write_all_at(piece, start)
            .map_err(|err| FillError::Io(format!("write {}: {err}", blob.path.display())))?;
        blob.have_file
            .write_all_at(&[1], i as u64)
            .map_err(|err| FillError::Io(format!("write {}: {err}", blob.have_path.display())))?;
        lock(&blob.present)[i] = true;
        copied += 1;
    }
    let digest = format!("sha256:{}", hex::encode(whole.finalize()));
    if digest != e.erofs {
        return Err(FillError::Mismatch(digest));
    }
    Ok(copied)
}

/// The runs of `false` in `present` as inclusive index pairs, none longer
/// than `most`: what one Range request each fetches.
fn missing_runs(present: &[bool], most: usize) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut from = 0;
    while let Some((a, b)) = next_missing_run(present, from, most) {
        runs.push((a, b));
        from = b + 1;
    }
    runs
}

/// The first run of `false` in `present` at or after `from`, at most
/// `most` long, as an inclusive index pair.
fn next_missing_run(present: &[bool], from: usize, most: usize) -> Option<(usize, usize)> {
    let a = from + present.get(from..)?.iter().position(|p| !*p)?;
    let len = present[a..]
        .iter()
        .take(most.max(1))
        .take_while(|p| !**p)
        .count();
    Some((a, a + len - 1))
}

/// The read-ahead window for a read at `offset`, given where the last read
/// ended and the window then, and whether the read follows the last one:
/// doubled (up to [`READAHEAD_MAX`]) when the read starts within a chunk
/// before that end or inside the window after it, else back to
/// [`READAHEAD_MIN`].
fn readahead_window((last_end, window): (u64, u64), offset: u64, chunk: u64) -> (u64, bool) {
    if offset + chunk >= last_end && offset <= last_end + window {
        ((window * 2).min(READAHEAD_MAX), true)
    } else {
        (READAHEAD_MIN, false)
    }
}

/// A layer's read-ahead, judged by its use.
#[derive(Debug, Default)]
struct Ahead {
    /// Chunks read ahead that no read has touched yet.
    pending: HashSet<usize>,
    /// Chunks read ahead (halved with `used` as it grows: recent use
    /// counts most).
    fetched: u64,
    /// Of those, chunks a read then touched.
    used: u64,
    /// Reads that jumped.
    jumps: u64,
}

impl Ahead {
    /// Whether read-ahead after a jump is worth its bytes: during a trial,
    /// then while reads use at least a quarter of what it fetched. Reads
    /// that follow each other always read ahead, and while it does not pay
    /// one jump in [`READAHEAD_PROBE`] still does, so use can come back.
    fn pays(&self) -> bool {
        self.fetched < READAHEAD_TRIAL || self.used * 4 >= self.fetched
    }
}

/// Where an index is looked up: the image's repository (the index is
/// found there by a tag made from the manifest digest) and the manifest.
fn index_key(image: &Reference, manifest: &str) -> String {
    format!("{}/{}@{manifest}", image.host, image.repository)
}

/// The file name stem of an index entry: layer and EROFS image together,
/// so files made from different indexes never meet.
fn key_of(entry: &IndexLayer) -> Result<String, Error> {
    let parse = |d: &str| {
        Digest::parse(d).map_err(|source| Error::Registry {
            what: d.to_string(),
            source,
        })
    };
    Ok(format!(
        "{}.{}",
        parse(&entry.layer)?.hex(),
        parse(&entry.erofs)?.hex()
    ))
}

/// Writes `state` to `path` so a crash leaves the old or the new one:
/// temporary file, fsync, rename, fsync of the directory.
fn write_durably(path: &Path, state: &State) -> Result<(), Error> {
    let tmp = path.with_extension("lazy.tmp");
    let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(&serde_json::to_vec(state).expect("state serializes"))
        .map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    fs::rename(&tmp, path).map_err(io("rename", path))?;
    sync_dir(path);
    Ok(())
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
}

fn file_id(path: &Path) -> Option<(FileId, u64)> {
    fs::metadata(path)
        .ok()
        .map(|m| ((m.dev(), m.ino()), m.nlink()))
}

/// Lazy files a node cannot serve without the lazy path (another EROFS
/// backend, no pre-content events, a failed probe): every file that is not
/// complete and verified. Snapshots on them are not mounted and no new
/// mount is made on them.
#[derive(Debug, Default)]
pub struct Unservable {
    files: HashMap<FileId, String>,
}

impl Unservable {
    /// The lazy files under `root` that are incomplete, unverified or
    /// refused.
    pub fn scan(root: &Path) -> Unservable {
        let mut files = HashMap::new();
        for (dir, why) in [
            (
                root.join("lazy"),
                "its lazy layer is incomplete or unverified and this node cannot serve lazy layers now (erofs_backend or kernel); remove the image and pull it again to fetch it whole",
            ),
            (root.join("layers"), LEGACY),
        ] {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(stem) = name
                    .strip_suffix(".lazy")
                    .or_else(|| name.strip_suffix(".lazy.corrupt"))
                else {
                    continue;
                };
                if let Some((id, _)) = file_id(&dir.join(format!("{stem}.erofs"))) {
                    files.insert(id, why.to_string());
                }
            }
        }
        Unservable { files }
    }

    /// How many files are refused.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

impl crate::snapshots::LayerGate for Unservable {
    fn refuse(&self, layer_file: &Path) -> Option<String> {
        let (id, _) = file_id(layer_file)?;
        self.files.get(&id).cloned()
    }
}

/// The lazy path's state; see the module comment.
#[derive(Debug)]
pub struct Lazy {
    fan: Arc<dyn PreContent>,
    registry: Arc<Registry>,
    /// Where whole layers come from: the fill's source
    /// (`fill_from_layer`) and the check of a layer filled otherwise.
    layers: Option<Arc<dyn Verifier>>,
    verify: bool,
    fill_from_layer: bool,
    dir: PathBuf,
    blobs: Mutex<HashMap<FileId, Arc<Blob>>>,
    by_key: Mutex<HashMap<String, Arc<Blob>>>,
    refused: Mutex<HashMap<FileId, Refusal>>,
    /// Index entries (by key) whose bytes did not match their image.
    rejected: Mutex<HashMap<String, String>>,
    /// Looked-up indexes (or their absence) by repository and manifest
    /// digest ([`index_key`]): the same manifest pushed to two repositories
    /// has two indexes, or one and none.
    indexes: Mutex<HashMap<String, CachedIndex>>,
    fetches: Semaphore,
    /// Whole-layer downloads of fills at once: paced, they hold no
    /// registry download slot ([`hyperbox_registry::Pace`]).
    layer_fills: Semaphore,
    fill_request: u64,
    /// Learned access orders of lazy layers.
    prefetch: prefetch::Store,
    /// Look up the prefetch lists shared beside indexes.
    shared_prefetch: bool,
    /// Reads in flight, which the background fill gives way to.
    demand: Arc<Demand>,
    counters: Counters,
    /// Reads of files not (yet) known, held while `open` takes back the
    /// files of an earlier run: with a group kept across a restart, reads
    /// made during the outage are queued and arrive before the files they
    /// are for are registered again.
    starting: Mutex<Option<Vec<AccessEvent>>>,
    rt: tokio::runtime::Handle,
}

impl Lazy {
    /// Starts the event loop on `fan` (a pre-content fanotify group) and
    /// takes back every lazy file under `<root>/lazy` (marked again,
    /// filling or verification resumed; refused ones marked to fail);
    /// returns how many incomplete ones were found, which the caller uses to
    /// decide on dropping caches. Unreadable state never stops the start.
    pub fn open(
        root: &Path,
        registry: Arc<Registry>,
        fan: Arc<dyn PreContent>,
        verifier: Option<Arc<dyn Verifier>>,
        options: Options,
    ) -> Result<(Arc<Lazy>, usize), Error> {
        let dir = root.join("lazy");
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let lazy = Arc::new(Lazy {
            fan,
            registry,
            layers: verifier,
            verify: options.verify,
            fill_from_layer: options.fill_from_layer,
            dir: dir.clone(),
            blobs: Mutex::new(HashMap::new()),
            by_key: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            rejected: Mutex::new(HashMap::new()),
            indexes: Mutex::new(HashMap::new()),
            fetches: Semaphore::new(options.max_chunk_fetches.max(1)),
            layer_fills: Semaphore::new(LAYER_FILLS),
            fill_request: options.fill_request,
            prefetch: prefetch::Store::open(root).map_err(io("create", &root.join("prefetch")))?,
            shared_prefetch: options.shared_prefetch,
            demand: Demand::new(options.fill_pause_io_pressure),
            counters: Counters::default(),
            starting: Mutex::new(Some(Vec::new())),
            rt: tokio::runtime::Handle::current(),
        });
        let me = lazy.clone();
        std::thread::Builder::new()
            .name("lazy-events".into())
            .spawn(move || me.event_loop())
            .map_err(io("spawn event thread for", &dir))?;
        // Files an older hyperbox left in the whole-fetch cache: never
        // served again.
        let layers = root.join("layers");
        for (stem, _) in lazy.states(&layers) {
            let _ = fs::rename(
                layers.join(format!("{stem}.lazy")),
                layers.join(format!("{stem}.lazy.corrupt")),
            );
            lazy.refuse_file(&layers.join(format!("{stem}.erofs")), LEGACY.into());
        }
        let mut resumed = 0;
        for (stem, state) in lazy.states(&dir) {
            let file = dir.join(format!("{stem}.erofs"));
            let state_path = dir.join(format!("{stem}.lazy"));
            let state = match state {
                Ok(s) => s,
                Err(why) => {
                    tracing::error!(file = %state_path.display(), error = %why, "unreadable lazy state set aside; its layer is refused and will be fetched again");
                    let _ = fs::rename(&state_path, dir.join(format!("{stem}.lazy.corrupt")));
                    lazy.refuse_file(&file, format!("its lazy state was unreadable ({why})"));
                    continue;
                }
            };
            if let Some(why) = state.rejected.clone() {
                lock(&lazy.rejected).insert(stem.clone(), why.clone());
                lazy.refuse_file(&file, why);
                continue;
            }
            // After a restart nothing says whether runs taught a list:
            // reads go first.
            match lazy.register(state, false, None, Download::AfterReads) {
                Ok(_) => resumed += 1,
                Err(e) => {
                    let why = hyperbox_api::error_chain(&e);
                    tracing::error!(file = %file.display(), error = %why, "cannot take back a lazy layer; it is refused");
                    let _ = fs::rename(&state_path, dir.join(format!("{stem}.lazy.corrupt")));
                    lazy.refuse_file(
                        &file,
                        format!("it could not be taken back after a restart ({why})"),
                    );
                }
            }
        }
        let held = lock(&lazy.starting).take().unwrap_or_default();
        for event in held {
            lazy.dispatch(event);
        }
        Ok((lazy, resumed))
    }

    /// The `.lazy` states in `dir`, by stem, parsed or with why not.
    fn states(&self, dir: &Path) -> Vec<(String, Result<State, String>)> {
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".lazy") else {
                continue;
            };
            let parsed = fs::read(e.path())
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_slice::<State>(&t).map_err(|e| e.to_string()));
            out.push((stem.to_string(), parsed));
        }
        out
    }

    /// Makes every read of `path` fail and refuses new mounts on it; a
    /// file no snapshot links is simply removed.
    fn refuse_file(&self, path: &Path, why: String) {
        let Some((id, nlink)) = file_id(path) else {
            return;
        };
        if nlink <= 1 {
            let _ = fs::remove_file(path);
            let _ = fs::remove_file(path.with_extension("have"));
            return;
        }
        if let Err(e) = self.fan.mark(path) {
            tracing::error!(file = %path.display(), error = %e, "cannot hold reads of a refused lazy layer");
        }
        tracing::warn!(file = %path.display(), why, "lazy layer refused: its reads fail with EIO and nothing new is mounted on it");
        lock(&self.refused).insert(
            id,
            Refusal {
                path: path.into(),
                why,
            },
        );
    }

    /// How the background fill gave way to reads.
    pub fn demand_counters(&self) -> &crate::demand::Counters {
        self.demand.counters()
    }

    /// What the lazy path has done.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// How many lazy layers are in each phase now (`filling`, `verifying`,
    /// `refused`).
    pub fn phases(&self) -> [(&'static str, usize); 3] {
        let (mut filling, mut verifying) = (0, 0);
        for b in lock(&self.blobs).values() {
            match b.phase() {
                Phase::Filling => filling += 1,
                Phase::Verifying => verifying += 1,
                _ => {}
            }
        }
        [
            ("filling", filling),
            ("verifying", verifying),
            ("refused", lock(&self.refused).len()),
        ]
    }

    /// The sparse EROFS image of layer `layer` of `image` when the image
    /// (manifest `manifest`) has a hyperbox index listing it under a
    /// diff_id that gives `target` on `parent`; `None` sends the caller to
    /// the full fetch.
    pub async fn prepare(
        self: &Arc<Self>,
        image: &str,
        manifest: &str,
        layer: &str,
        parent: &str,
        target: &str,
    ) -> Result<Option<PathBuf>, Error> {
        let Some(found) = self.index(image, manifest).await else {
            return Ok(None);
        };
        let Some(entry) = found.index.layer(layer).cloned() else {
            return Ok(None);
        };
        if chain_id(parent, &entry.diff_id) != target {
            self.counters.chain_mismatch.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                image, layer, diff_id = %entry.diff_id, target,
                "the index's diff_id for this layer does not give the chain id containerd asked for; fetching the layer whole"
            );
            return Ok(None);
        }
        let key = key_of(&entry)?;
        if let Some(why) = lock(&self.rejected).get(&key) {
            tracing::info!(
                image,
                layer,
                why,
                "this index entry did not match its image before; fetching the layer whole"
            );
            return Ok(None);
        }
        let known = lock(&self.by_key).get(&key).cloned();
        let blob = match known {
            Some(b) if b.phase() != Phase::Discarded => b,
            _ => {
                let shared = found.shared.get(&entry.erofs).cloned();
                let download = self.download_for(&found);
                let state = State {
                    image: image.into(),
                    chunk_size: found.index.chunk_size,
                    entry,
                    rejected: None,
                };
                let me = self.clone();
                tokio::task::spawn_blocking(move || me.register(state, true, shared, download))
                    .await
                    .map_err(|e| Error::Io {
                        action: "register",
                        path: PathBuf::from(layer),
                        source: std::io::Error::other(e.to_string()),
                    })??
            }
        };
        if let Err(e) = self.fetch_metadata(&blob).await {
            // Nothing was mounted from it yet: start over next time.
            self.discard(&blob);
            return Err(e);
        }
        Ok(Some(blob.path.clone()))
    }

    /// The index entry of `layer` in the index of `image`, if it has one.
    async fn entry(&self, image: &str, manifest: &str, layer: &str) -> Option<IndexLayer> {
        self.index(image, manifest)
            .await?
            .index
            .layer(layer)
            .cloned()
    }

    /// [`Download::AtOnce`] for the layers of an image no run taught a
    /// prefetch list: none of its layers has one that fits on this node,
    /// and none was shared beside its index. One layer that has a list (a
    /// base layer another image's runs taught) is enough to wait for
    /// reads. Without fills from the layer there is no download to start.
    fn download_for(&self, found: &Found) -> Download {
        let chunk_size = found.index.chunk_size;
        let taught = found.shared.values().any(|l| !l.is_empty())
            || found
                .index
                .layers
                .iter()
                .any(|l| self.prefetch.has(&l.erofs, chunk_size, l.chunks.len()));
        if taught || !self.fill_from_layer || self.layers.is_none() {
            Download::AfterReads
        } else {
            Download::AtOnce
        }
    }

    /// The ranges the kernel reads without events (superblock block,
    /// directories, inodes, xattrs): they must be in before the mount.
    async fn fetch_metadata(&self, blob: &Blob) -> Result<(), Error> {
        let e = &blob.state.entry;
        self.ensure_range(blob, 0, 4096).await?;
        self.ensure_range(blob, e.data_end, e.size - e.data_end)
            .await
    }

    /// The hyperbox index of `image` (manifest `manifest`) and the lists
    /// shared beside it, looked up or from the cache.
    async fn index(&self, image: &str, manifest: &str) -> Option<Found> {
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
                    .map(|(erofs, list)| (erofs, Arc::new(list)))
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

    /// Creates (or, after a restart, reopens) the sparse file of `state`,
    /// marks it and starts filling it.
    fn register(
        self: &Arc<Self>,
        state: State,
        fresh: bool,
        shared: Option<SharedList>,
        download: Download,
    ) -> Result<Arc<Blob>, Error> {
        let key = key_of(&state.entry)?;
        let erofs = Digest::parse(&state.entry.erofs).map_err(|source| Error::Registry {
            what: state.entry.erofs.clone(),
            source,
        })?;
        let reference = Reference::parse(&state.image).map_err(|source| Error::Registry {
            what: state.image.clone(),
            source,
        })?;
        let path = self.dir.join(format!("{key}.erofs"));
        let state_path = self.dir.join(format!("{key}.lazy"));
        let have_path = self.dir.join(format!("{key}.have"));
        let n = state.entry.chunks.len();
        if fresh {
            // A file left behind is reused only if nothing links it; one a
            // snapshot links is never rewritten.
            if let Some((_, nlink)) = file_id(&path) {
                if nlink > 1 {
                    return Err(Error::Linked { path });
                }
                fs::remove_file(&path).map_err(io("remove", &path))?;
            }
            let _ = fs::remove_file(&have_path);
            // The state file first: a crash after it leaves a file the
            // next start takes back, never an unmarked sparse file.
            write_durably(&state_path, &state)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(fresh)
            .truncate(false)
            .open(&path)
            .map_err(io("open", &path))?;
        if file.metadata().map_err(io("stat", &path))?.len() != state.entry.size {
            file.set_len(state.entry.size).map_err(io("size", &path))?;
        }
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
            key: key.clone(),
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
            wanted: (0..n).map(|_| Arc::new(AtomicU32::new(0))).collect(),
            phase: watch::Sender::new(Phase::Filling),
            last_error: Mutex::new(None),
            readahead: Mutex::new((0, READAHEAD_MIN)),
            ahead: Mutex::new(Ahead::default()),
            reads: Mutex::new(prefetch::Recorder::default()),
            shared,
            saved: AtomicUsize::new(0),
            last_read: Mutex::new(None),
            download,
            registered: Instant::now(),
            inode: (meta.dev(), meta.ino()),
        });
        self.fan
            .mark(&path)
            .map_err(io("fanotify_mark(FAN_PRE_ACCESS)", &path))?;
        lock(&self.blobs).insert(blob.inode, blob.clone());
        lock(&self.by_key).insert(key, blob.clone());
        if download == Download::AtOnce {
            self.counters.untried_layers.fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(layer = %blob.state.entry.layer, erofs = %blob.erofs, size = blob.state.entry.size, missing = blob.missing(), ?download, "lazy layer registered");
        let me = self.clone();
        let b = blob.clone();
        self.rt.spawn(async move { me.fill(b).await });
        Ok(blob)
    }

    /// Fetches every missing chunk, in order and `Options::fill_request`
    /// bytes at a time, retrying with backoff, then lifts the mark and has the
    /// layer verified. Reads go first: each request waits for them to
    /// settle (and for the node's I/O to calm), and is given up when a
    /// read arrives that does not need it (`crate::demand`).
    async fn fill(self: Arc<Self>, blob: Arc<Blob>) {
        let started = Instant::now();
        let per_request = blob.chunks_in(self.fill_request);
        self.prefetch_learned(&blob, per_request).await;
        if self.fill_from_layer {
            match self.fill_from_layer(&blob).await {
                FromLayer::Done => return,
                FromLayer::Unavailable => {}
            }
        }
        let mut next = 0;
        let mut delay = Duration::from_secs(1);
        let mut dropped = 0;
        loop {
            if blob.phase() != Phase::Filling {
                return;
            }
            // The next run of missing chunks, in file order.
            let run = next_missing_run(&lock(&blob.present), next, per_request);
            let Some((a, b)) = run else { break };
            if self.demand.settle().await {
                // Reads just settled (a start-up burst is over): keep what
                // they waited for, in case the layer goes before it is full.
                self.save_learned(&blob);
            }
            let fetch = self.ensure_chunks(&blob, a, b);
            tokio::pin!(fetch);
            let done = tokio::select! {
                r = &mut fetch => Some(r),
                () = self.demand.arrives() => {
                    // On a slow link a request outlasts the gaps between
                    // reads: after a few drops in a row it is finished.
                    if dropped >= MAX_DROPS
                        || blob.wanted[a..=b].iter().any(|w| w.load(Ordering::Acquire) > 0)
                    {
                        // A read waits for these very chunks.
                        Some(fetch.await)
                    } else {
                        None
                    }
                }
            };
            let Some(result) = done else {
                // Dropped mid-request (chunks are written only once the
                // whole range is in): asked again once reads settle.
                self.demand.preempted();
                dropped += 1;
                continue;
            };
            dropped = 0;
            match result {
                Ok(()) => {
                    next = b + 1;
                    delay = Duration::from_secs(1);
                }
                Err(e) => {
                    tracing::warn!(layer = %blob.state.entry.layer, chunks = %format!("{a}-{b}"), retry_in_s = delay.as_secs(), error = %hyperbox_api::error_chain(&e), "background fill failed; retrying (reads still fetch on demand)");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        }
        if blob.phase() != Phase::Filling {
            return;
        }
        self.save_learned(&blob);
        if !self.finish_filling(&blob) {
            return;
        }
        tracing::info!(layer = %blob.state.entry.layer, ms = started.elapsed().as_millis() as u64, "lazy layer complete");
        self.verify(&blob).await;
    }

    /// A complete layer leaves Filling for Verifying, once, and its mark
    /// and chunk record go. False when it left Filling meanwhile
    /// (discarded, refused): then nothing of it is touched, since a new
    /// pull may have put another file at its path.
    fn finish_filling(&self, blob: &Blob) -> bool {
        let _ = blob.file.sync_all();
        // Past filling before the mark goes: whoever sees it unmarked sees
        // the layer past filling.
        let moved = blob.phase.send_if_modified(|p| {
            let filling = *p == Phase::Filling;
            if filling {
                *p = Phase::Verifying;
            }
            filling
        });
        if !moved || !blob.still_at_its_path() {
            return false;
        }
        if let Err(e) = self.fan.unmark(&blob.path) {
            tracing::warn!(file = %blob.path.display(), error = %e, "cannot remove the mark of a complete layer");
        }
        let _ = fs::remove_file(&blob.have_path);
        true
    }

    /// Fills what is still missing from the layer itself: fetched whole
    /// (its compressed digest checked), converted, and accepted only if it
    /// gives the index's diff_id and EROFS digest, which makes the copy
    /// verified by construction. The download reads only while no read
    /// waits ([`Demand::pace`]); reads go on fetching their chunks from the
    /// EROFS blob meanwhile. After [`WHOLE_ATTEMPTS`] failed downloads the
    /// caller fills with Range requests instead, so a registry that serves
    /// the EROFS blob but not the layer still completes the file.
    async fn fill_from_layer(self: &Arc<Self>, blob: &Arc<Blob>) -> FromLayer {
        let Some(layers) = self.layers.clone() else {
            return FromLayer::Unavailable;
        };
        let e = &blob.state.entry;
        let started = Instant::now();
        let pace: Pace = {
            let (me, b) = (self.clone(), blob.clone());
            // After each wait, a fill request's worth goes through before
            // the next: a body read frame by frame, each behind a wait of
            // up to MAX_YIELD, would all but stop under steady reads.
            let budget_from = Arc::new(AtomicU64::new(0));
            let budget = self.fill_request;
            Arc::new(move |read| {
                let (me, b, from) = (me.clone(), b.clone(), budget_from.clone());
                Box::pin(async move {
                    // A layer removed, refused or complete meanwhile needs
                    // no more of it.
                    if b.phase() != Phase::Filling {
                        return false;
                    }
                    if read < from.load(Ordering::Relaxed) + budget && read > 0 {
                        return true;
                    }
                    if b.download == Download::AtOnce {
                        me.demand.pressure_pace().await;
                        // Reads paused: keep what they read so far, in
                        // case the snapshotter stops before the end.
                        if lock(&b.last_read).is_some_and(|t| t.elapsed() >= LEARN_QUIET) {
                            me.save_learned(&b);
                        }
                    } else if me.demand.pace().await {
                        // Reads just settled: keep what they waited for.
                        me.save_learned(&b);
                    }
                    from.store(read, Ordering::Relaxed);
                    b.phase() == Phase::Filling
                })
            })
        };
        let mut delay = Duration::from_secs(1);
        let mut attempt = 1;
        let whole = loop {
            if blob.phase() != Phase::Filling {
                return FromLayer::Done;
            }
            // Once the start-up burst is over: pausing the download stops
            // new bytes, not those already on their way.
            if blob.download == Download::AfterReads {
                self.demand.quiet_for(LAYER_QUIET, LAYER_QUIET_MAX).await;
            }
            let whole = {
                let _slot = self.layer_fills.acquire().await.expect("never closed");
                layers
                    .whole(&blob.state.image, &e.layer, Some(pace.clone()))
                    .await
            };
            if blob.phase() != Phase::Filling {
                // Removed meanwhile: its download stopped (see the pace).
                return FromLayer::Done;
            }
            match whole {
                Ok(got) => break Ok(got),
                Err(err) if err.bad_content => break Err(err),
                // Another lazy copy of this layer blob gave the shared
                // download up; this one starts its own.
                Err(err) if err.stopped => {}
                Err(WholeError { why, .. }) if attempt < WHOLE_ATTEMPTS => {
                    tracing::warn!(layer = %e.layer, attempt, retry_in_s = delay.as_secs(), error = %why, "cannot fetch the layer whole to fill its lazy copy; retrying (reads still fetch on demand)");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
                Err(WholeError { why, .. }) => {
                    tracing::warn!(layer = %e.layer, attempts = attempt, error = %why, "cannot fetch the layer whole; filling its lazy copy from the index's EROFS blob instead");
                    return FromLayer::Unavailable;
                }
            }
        };
        if blob.phase() != Phase::Filling {
            return FromLayer::Done;
        }
        let copied = match self.judge(blob, whole).await {
            Judged::Matched(n) => n,
            Judged::Refused => return FromLayer::Done,
            Judged::Unreadable(why) => {
                tracing::warn!(layer = %e.layer, error = %why, "cannot fill the lazy copy from the converted layer; filling from the index's EROFS blob instead");
                return FromLayer::Unavailable;
            }
        };
        self.counters
            .layer_filled_chunks
            .fetch_add(copied as u64, Ordering::Relaxed);
        if blob.download == Download::AtOnce {
            // Still marked: the run's later reads are noted (their chunks
            // are here, so each costs an event, not a fetch).
            self.reads_pause(blob).await;
        }
        if blob.phase() != Phase::Filling {
            return FromLayer::Done;
        }
        self.save_learned(blob);
        if !self.finish_filling(blob) {
            return FromLayer::Done;
        }
        tracing::info!(layer = %e.layer, chunks_from_layer = copied, ms = started.elapsed().as_millis() as u64, "lazy layer complete, filled from the layer itself");
        // Its bytes are the layer's own, converted here.
        self.accept(blob);
        FromLayer::Done
    }

    /// Waits until `blob` saw no read for [`LEARN_QUIET`], at most
    /// [`LAYER_QUIET_MAX`], or until it left Filling.
    async fn reads_pause(&self, blob: &Blob) {
        self.save_learned(blob);
        let deadline = Instant::now() + LAYER_QUIET_MAX;
        loop {
            let since = lock(&blob.last_read).map_or(LEARN_QUIET, |t| t.elapsed());
            let now = Instant::now();
            if since >= LEARN_QUIET || now >= deadline || blob.phase() != Phase::Filling {
                return;
            }
            tokio::time::sleep((LEARN_QUIET - since).min(deadline - now)).await;
        }
    }

    /// Checks a complete layer against the image's own digests, retrying
    /// while the registry fails; see the module comment.
    async fn verify(&self, blob: &Arc<Blob>) {
        let Some(verifier) = self.layers.as_ref().filter(|_| self.verify) else {
            self.accept(blob);
            return;
        };
        let e = &blob.state.entry;
        let mut delay = Duration::from_secs(1);
        let whole = loop {
            // The whole-layer download cannot be given up halfway like a
            // chunk; it starts only once reads have settled.
            self.demand.settle().await;
            if blob.phase() != Phase::Verifying {
                return;
            }
            match verifier.whole(&blob.state.image, &e.layer, None).await {
                Ok(got) => break Ok(got),
                Err(err) if err.bad_content => break Err(err),
                Err(WholeError { why, .. }) => {
                    tracing::warn!(layer = %e.layer, retry_in_s = delay.as_secs(), error = %why, "cannot fetch the layer whole to verify its lazy copy; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        };
        match self.judge(blob, whole).await {
            Judged::Matched(_) => self.accept(blob),
            Judged::Refused => {}
            Judged::Unreadable(why) => self.reject(
                blob,
                format!("cannot read the converted layer to compare: {why}"),
            ),
        }
    }

    /// Holds a lazy copy against its layer fetched whole (the layer's
    /// conversion and diff_id, or why the layer's own bytes were refused):
    /// the diff_id, every chunk and the whole EROFS digest must match the
    /// index, chunks still missing are filled from it (while filling), and
    /// a mismatch refuses the copy.
    async fn judge(
        &self,
        blob: &Arc<Blob>,
        whole: Result<(PathBuf, String), WholeError>,
    ) -> Judged {
        let e = &blob.state.entry;
        let (path, diff_id) = match whole {
            Ok(got) => got,
            Err(err) => {
                self.reject(
                    blob,
                    format!("layer {} was refused whole: {}", e.layer, err.why),
                );
                return Judged::Refused;
            }
        };
        if diff_id != e.diff_id {
            self.reject(
                blob,
                format!(
                    "layer {} decompresses to {diff_id}, not the diff_id {} its index and image config claim",
                    e.layer, e.diff_id
                ),
            );
            return Judged::Refused;
        }
        let b = blob.clone();
        match tokio::task::spawn_blocking(move || copy_missing(&b, &path)).await {
            Ok(Ok(n)) => Judged::Matched(n),
            Ok(Err(FillError::Mismatch(what))) => {
                self.reject(
                    blob,
                    format!(
                        "the index's EROFS image {} is not what layer {} converts to ({what})",
                        e.erofs, e.layer
                    ),
                );
                Judged::Refused
            }
            Ok(Err(FillError::Io(why))) => Judged::Unreadable(why),
            Err(err) => Judged::Unreadable(format!("check task failed: {err}")),
        }
    }

    /// The layer matched its image: nothing more to keep about it.
    fn accept(&self, blob: &Blob) {
        // Only a layer still in play: one discarded meanwhile (its image
        // deleted during a long download) has nothing left to accept, and
        // a new pull may own its path and key by now.
        if !blob.phase.send_if_modified(|p| {
            let live = matches!(p, Phase::Filling | Phase::Verifying);
            if live {
                *p = Phase::Verified;
            }
            live
        }) {
            return;
        }
        if blob.still_at_its_path() {
            let _ = fs::remove_file(&blob.state_path);
            sync_dir(&blob.state_path);
        }
        lock(&self.blobs).remove(&blob.inode);
        self.drop_key(blob);
        self.counters.verified.fetch_add(1, Ordering::Relaxed);
        tracing::info!(layer = %blob.state.entry.layer, erofs = %blob.erofs, "lazy layer verified against its image");
    }

    /// Removes `blob`'s key unless a pull after a discard registered it
    /// again.
    fn drop_key(&self, blob: &Blob) {
        let mut by_key = lock(&self.by_key);
        if by_key
            .get(&blob.key)
            .is_some_and(|b| std::ptr::eq(&**b, blob))
        {
            by_key.remove(&blob.key);
        }
    }

    /// The layer did not match its image: no container reads it again.
    fn reject(&self, blob: &Blob, why: String) {
        // First the phase, while the blob is still found: a read arriving
        // from here on is refused, never answered from a file whose holes
        // a fill from the layer left unwritten. A layer discarded meanwhile
        // is left alone (see accept).
        if !blob.phase.send_if_modified(|p| {
            let live = matches!(p, Phase::Filling | Phase::Verifying);
            if live {
                *p = Phase::Rejected(why.clone());
            }
            live
        }) {
            return;
        }
        let mut state = blob.state.clone();
        state.rejected = Some(why.clone());
        if let Err(e) = write_durably(&blob.state_path, &state) {
            tracing::error!(error = %hyperbox_api::error_chain(&e), "cannot record the rejection; it holds until the next restart");
        }
        lock(&self.rejected).insert(blob.key.clone(), why.clone());
        // Refused by inode before the blob goes, so no read falls between.
        if blob.still_at_its_path() {
            self.refuse_file(&blob.path, why.clone());
        }
        self.drop_key(blob);
        lock(&self.blobs).remove(&blob.inode);
        // Pages read before the verdict must not outlive it.
        let _ = fs::write("/proc/sys/vm/drop_caches", "1");
        // Counted and logged last: whoever sees either (a scrape, an
        // operator, a test) finds the refusal already in force.
        self.counters.rejected.fetch_add(1, Ordering::Release);
        tracing::error!(layer = %blob.state.entry.layer, image = %blob.state.image, why, "lazily served layer does not match its image: its reads now fail, nothing new is mounted on it, and the next pull fetches it whole");
    }

    /// The chunks to fetch first: what this node learned, then what the
    /// list shared through the registry adds; and whether a shared list
    /// was used.
    fn prefetch_plan(&self, blob: &Blob) -> (Vec<usize>, bool) {
        let e = &blob.state.entry;
        let mut plan = self
            .prefetch
            .load(&e.erofs, blob.state.chunk_size, blob.locks.len());
        let Some(shared) = &blob.shared else {
            return (plan, false);
        };
        let before = plan.len();
        prefetch::merge(&mut plan, shared);
        let added = plan.len() - before;
        tracing::info!(layer = %e.layer, learned_here = before, added_from_registry = added, "prefetch list shared through the registry used");
        (plan, added > 0)
    }

    /// Fetches first, in parallel, the chunks earlier runs of this EROFS
    /// image read, here or on the nodes that shared their lists, in the
    /// order they read them (`crate::prefetch`), counted as demand so
    /// other layers' fills give way.
    async fn prefetch_learned(&self, blob: &Blob, per_request: usize) {
        use futures::StreamExt as _;
        let e = &blob.state.entry;
        let (mut plan, shared) = self.prefetch_plan(blob);
        if plan.is_empty() {
            return;
        }
        if shared {
            self.counters
                .shared_prefetch_lists
                .fetch_add(1, Ordering::Relaxed);
        }
        plan.truncate(blob.chunks_in(prefetch::MAX_AHEAD));
        let started = Instant::now();
        let before = blob.missing();
        let _predicted = self.demand.begin(Vec::new());
        futures::stream::iter(prefetch::runs(&plan, per_request))
            .for_each_concurrent(PREFETCH_PARALLEL, |(a, b)| async move {
                if blob.phase() != Phase::Filling {
                    return;
                }
                if let Err(err) = self.ensure_chunks(blob, a, b).await {
                    tracing::debug!(layer = %e.layer, error = %hyperbox_api::error_chain(&err), "learned prefetch failed; the fill and reads fetch it");
                }
            })
            .await;
        let fetched = before.saturating_sub(blob.missing());
        self.counters
            .prefetched_chunks
            .fetch_add(fetched as u64, Ordering::Relaxed);
        tracing::info!(layer = %e.layer, listed = plan.len(), fetched, ms = started.elapsed().as_millis() as u64, "learned prefetch done");
    }

    /// Merges what this layer's reads waited for into its learned list,
    /// if they waited for more since the last time.
    fn save_learned(&self, blob: &Blob) {
        let order = lock(&blob.reads).order().to_vec();
        if order.len() <= blob.saved.swap(order.len(), Ordering::AcqRel) {
            return;
        }
        let e = &blob.state.entry;
        match self
            .prefetch
            .save(&e.erofs, blob.state.chunk_size, blob.locks.len(), &order)
        {
            Ok(n) => {
                tracing::info!(layer = %e.layer, erofs = %e.erofs, read = order.len(), listed = n, "prefetch list learned")
            }
            Err(err) => {
                tracing::warn!(layer = %e.layer, error = %err, "cannot save the learned prefetch list")
            }
        }
    }

    /// Fetches the missing chunks of `first..=last`: each run of adjacent
    /// missing chunks in one Range request (at most [`MAX_REQUEST`]
    /// bytes), every chunk checked against its digest before it is
    /// written. Chunk locks are taken in ascending order by every caller,
    /// so two overlapping calls never wait on each other in a cycle.
    async fn ensure_chunks(&self, blob: &Blob, first: usize, last: usize) -> Result<(), Error> {
        // Only the missing ones: a chunk once present stays so, and a read
        // of it must not wait for another read's request.
        let missing: Vec<usize> = {
            let present = lock(&blob.present);
            (first..=last).filter(|&i| !present[i]).collect()
        };
        let mut guards = Vec::with_capacity(missing.len());
        for i in missing {
            guards.push(blob.locks[i].lock().await);
        }
        let per_request = blob.chunks_in(MAX_REQUEST);
        let runs = {
            let present = lock(&blob.present);
            missing_runs(&present[first..=last], per_request)
        };
        let fetched = futures::future::join_all(
            runs.into_iter()
                .map(|(a, b)| self.fetch_run(blob, first + a, first + b)),
        )
        .await;
        drop(guards);
        fetched.into_iter().collect()
    }

    /// One Range request for chunks `a..=b` (their locks held by the
    /// caller); the chunks that verify are written even if another fails.
    async fn fetch_run(&self, blob: &Blob, a: usize, b: usize) -> Result<(), Error> {
        let (start, _) = blob.chunk_range(a);
        let (last_start, last_len) = blob.chunk_range(b);
        let data = {
            let _permit = self.fetches.acquire().await.expect("never closed");
            self.registry
                .fetch_range(
                    &blob.reference,
                    &blob.erofs,
                    start,
                    last_start + last_len - start,
                )
                .await
        };
        let data = data.map_err(|source| {
            self.counters.chunk_failures.fetch_add(1, Ordering::Relaxed);
            Error::Registry {
                what: format!("{} chunks {a}-{b}", blob.erofs),
                source,
            }
        })?;
        let mut failed = None;
        for i in a..=b {
            let (s, len) = blob.chunk_range(i);
            let at = (s - start) as usize;
            let piece = &data[at..at + len as usize];
            if hex::encode(Sha256::digest(piece)) != blob.state.entry.chunks[i] {
                self.counters.chunk_failures.fetch_add(1, Ordering::Relaxed);
                failed.get_or_insert(Error::Chunk {
                    erofs: blob.erofs.to_string(),
                    chunk: i,
                });
                continue;
            }
            blob.file
                .write_all_at(piece, s)
                .map_err(io("write", &blob.path))?;
            blob.have_file
                .write_all_at(&[1], i as u64)
                .map_err(io("write", &blob.have_path))?;
            lock(&blob.present)[i] = true;
        }
        failed.map_or(Ok(()), Err)
    }

    /// Fetches what a held read needs, counted as demand while it runs.
    async fn ensure_range(&self, blob: &Blob, offset: u64, count: u64) -> Result<(), Error> {
        let Some((first, last)) = blob.chunks_of(offset, count) else {
            return Ok(());
        };
        // A read of what is here already (a marked file raises an event
        // for every read) is not demand the fill should wait for.
        if lock(&blob.present)[first..=last].iter().all(|p| *p) {
            return Ok(());
        }
        let _read = self.demand.begin(blob.wanted[first..=last].to_vec());
        let fetched = self.ensure_chunks(blob, first, last).await;
        // The fill from the layer writes verified chunks without their
        // locks: a read whose own request failed meanwhile may find its
        // chunks here after all, and then it has nothing to fail for.
        if fetched.is_err() && lock(&blob.present)[first..=last].iter().all(|p| *p) {
            return Ok(());
        }
        fetched
    }

    fn respond(&self, event: AccessEvent, verdict: Verdict) {
        if verdict == Verdict::DenyEio {
            self.counters.denied_reads.fetch_add(1, Ordering::Relaxed);
        }
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
    /// refused files fail; reads of anything else (complete files, files
    /// this daemon does not know) go on at once.
    fn dispatch(self: &Arc<Self>, event: AccessEvent) {
        // Our own writes and re-checks: a file opened while it was marked
        // (a group kept across a restart keeps its marks) raises events
        // for them too, and holding them would wait on ourselves.
        if event.pid == Some(std::process::id()) {
            self.respond(event, Verdict::Allow);
            return;
        }
        if event
            .file
            .is_some_and(|f| lock(&self.refused).contains_key(&f))
        {
            self.respond(event, Verdict::DenyEio);
            return;
        }
        let find = || event.file.and_then(|f| lock(&self.blobs).get(&f).cloned());
        let blob = match find() {
            Some(b) => b,
            None => {
                let mut starting = lock(&self.starting);
                if let Some(held) = starting.as_mut() {
                    held.push(event);
                    return;
                }
                drop(starting);
                // Registration is over: a second look is the final word.
                match find() {
                    Some(b) => b,
                    None => {
                        self.respond(event, Verdict::Allow);
                        return;
                    }
                }
            }
        };
        match blob.phase() {
            Phase::Filling => {}
            Phase::Rejected(_) => return self.respond(event, Verdict::DenyEio),
            _ => return self.respond(event, Verdict::Allow),
        }
        let me = self.clone();
        self.rt.spawn(async move {
            let (offset, count) = (event.offset, event.count);
            let used = blob.note_read(offset, count);
            me.counters.readahead_used.fetch_add(used, Ordering::Relaxed);
            if let Some((a, b, new)) = blob.ahead_of(offset, count) {
                me.counters
                    .readahead_chunks
                    .fetch_add(new, Ordering::Relaxed);
                // Fetched beside the read, not before its answer; counted
                // as demand, so the fill gives way to it too.
                let (me, blob) = (me.clone(), blob.clone());
                me.rt.clone().spawn(async move {
                    let _ahead = me.demand.begin(Vec::new());
                    if let Err(e) = me.ensure_chunks(&blob, a, b).await {
                        tracing::debug!(layer = %blob.state.entry.layer, error = %hyperbox_api::error_chain(&e), "read-ahead failed; reads fetch on their own");
                    }
                });
            }
            match me.ensure_range(&blob, offset, count).await {
                // Refused while this read waited: the rest of the file may
                // be holes, and every read of it fails from now on.
                Ok(()) if matches!(blob.phase(), Phase::Rejected(_)) => {
                    me.respond(event, Verdict::DenyEio)
                }
                Ok(()) => me.respond(event, Verdict::Allow),
                Err(e) => {
                    let msg = hyperbox_api::error_chain(&e);
                    tracing::error!(layer = %blob.state.entry.layer, offset, count, error = %msg, "lazy read failed; the reader gets EIO");
                    *lock(&blob.last_error) = Some(msg);
                    me.respond(event, Verdict::DenyEio);
                }
            }
        });
    }

    /// Whether layer `layer` is being filled lazily (from any index).
    pub fn knows(&self, layer: &str) -> bool {
        lock(&self.by_key)
            .values()
            .any(|b| b.state.entry.layer == layer && b.phase() == Phase::Filling)
    }

    /// Why the last read of the lazy file at `path` failed, if one did.
    pub fn last_error(&self, path: &Path) -> Option<String> {
        let (id, _) = file_id(path)?;
        if let Some(r) = lock(&self.refused).get(&id) {
            return Some(r.why.clone());
        }
        let b = lock(&self.blobs).get(&id).cloned()?;
        lock(&b.last_error).clone()
    }

    /// Waits until the snapshot layer file `layer_file` may be shared with
    /// a pull of `layer` of `image` (manifest `manifest`): at once if it is
    /// not an unverified lazy file, or if the pull's own index names the
    /// same bytes; otherwise until its verification ends (up to `timeout`).
    pub async fn wait_trusted(
        &self,
        layer_file: &Path,
        image: &str,
        manifest: Option<&str>,
        layer: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let Some((id, _)) = file_id(layer_file) else {
            return Ok(());
        };
        if let Some(r) = lock(&self.refused).get(&id) {
            return Err(r.why.clone());
        }
        let Some(blob) = lock(&self.blobs).get(&id).cloned() else {
            return Ok(());
        };
        let own = match manifest {
            Some(m) => self.entry(image, m, layer).await,
            None => None,
        };
        if own
            .is_some_and(|o| o.layer == blob.state.entry.layer && o.erofs == blob.state.entry.erofs)
        {
            return Ok(());
        }
        tracing::info!(layer, image, from = %blob.state.image, "a lazily served layer made from another image's index is shared only once verified; waiting");
        let mut rx = blob.phase.subscribe();
        let wait =
            rx.wait_for(|p| matches!(p, Phase::Verified | Phase::Rejected(_) | Phase::Discarded));
        match tokio::time::timeout(timeout, wait).await {
            Err(_) => Err(format!(
                "layer {} was served lazily from the index of {} and is not verified after {timeout:?}",
                blob.state.entry.layer, blob.state.image
            )),
            Ok(Err(_)) => Err("the lazy layer went away".into()),
            Ok(Ok(p)) => match &*p {
                Phase::Verified => Ok(()),
                Phase::Rejected(why) => Err(why.clone()),
                _ => Err(format!(
                    "layer {} was served lazily and removed before it was verified",
                    blob.state.entry.layer
                )),
            },
        }
    }

    /// Forgets the lazy file at `path` after a mount of it failed, so the
    /// next Prepare starts over (or fetches whole); a file snapshots link
    /// is kept.
    pub fn forget(&self, path: &Path) {
        let Some((id, _)) = file_id(path) else {
            return;
        };
        let b = lock(&self.blobs).get(&id).cloned();
        if let Some(b) = b {
            self.discard(&b);
        }
    }

    /// Removes lazy files no snapshot links any more.
    pub fn prune(&self) -> Vec<PathBuf> {
        let all: Vec<Arc<Blob>> = lock(&self.blobs).values().cloned().collect();
        let mut removed = Vec::new();
        for b in all {
            // Not a layer a Prepare registered a moment ago and is about
            // to link.
            if b.registered.elapsed() > PRUNE_GRACE && self.discard(&b) {
                removed.push(b.path.clone());
            }
        }
        // Verified and refused files are no longer tracked by inode.
        let refused: Vec<(FileId, Refusal)> = lock(&self.refused)
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (id, r) in refused {
            if file_id(&r.path).is_some_and(|(_, n)| n <= 1) {
                let _ = fs::remove_file(&r.path);
                lock(&self.refused).remove(&id);
                removed.push(r.path);
            }
        }
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_none_or(|x| x != "erofs")
                    || p.with_extension("lazy").exists()
                    || p.with_extension("lazy.corrupt").exists()
                {
                    continue;
                }
                let old = e
                    .metadata()
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > PRUNE_GRACE);
                if old && file_id(&p).is_some_and(|(_, n)| n <= 1) {
                    let _ = fs::remove_file(&p);
                    removed.push(p);
                }
            }
        }
        removed
    }

    /// Stops serving and filling `b` and removes its files, unless a
    /// snapshot links the file (then nothing changes); returns whether it
    /// was removed.
    fn discard(&self, b: &Blob) -> bool {
        if file_id(&b.path).is_some_and(|(_, n)| n > 1) {
            tracing::debug!(file = %b.path.display(), "lazy file still linked by a snapshot; kept");
            return false;
        }
        // Removed before it was complete (the image deleted soon after its
        // container ran): what its reads waited for is still worth keeping.
        if b.phase() == Phase::Filling {
            self.save_learned(b);
        }
        lock(&self.by_key).remove(&b.key);
        lock(&self.blobs).remove(&b.inode);
        b.phase.send_replace(Phase::Discarded);
        let _ = fs::remove_file(&b.state_path);
        let _ = fs::remove_file(&b.have_path);
        let _ = fs::remove_file(&b.path);
        sync_dir(&b.path);
        true
    }
}

impl crate::snapshots::LayerGate for Lazy {
    fn refuse(&self, layer_file: &Path) -> Option<String> {
        let (id, _) = file_id(layer_file)?;
        lock(&self.refused).get(&id).map(|r| r.why.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::time::Duration;

    use hyperbox_kernel::testing::FakeFanotify;
    use tokio::io::AsyncWriteExt;

    use super::*;

    const CHUNK: u64 = 4096;
    const WAIT: Duration = Duration::from_secs(20);

    /// A registry that serves one blob over plain HTTP with Range
    /// requests; with `corrupt`, every byte it sends is wrong.
    struct Blobs {
        addr: std::net::SocketAddr,
        ranges: Arc<AtomicUsize>,
        /// The first byte of each range asked for, in arrival order
        /// (failed ones too).
        asked: Arc<Mutex<Vec<u64>>>,
    }

    async fn serve(blob: Vec<u8>, case: &Case) -> Blobs {
        let (corrupt, delay) = (case.corrupt, case.delay);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ranges = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(AtomicUsize::new(case.fail_first));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (blob, counted, asked_log) = (Arc::new(blob), ranges.clone(), asked.clone());
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let (blob, counted, failures) = (blob.clone(), counted.clone(), failures.clone());
                let asked = asked_log.clone();
                tokio::spawn(async move {
                    let Some(head) = crate::test_http::read_head(&mut conn).await else {
                        return;
                    };
                    let text = head.to_lowercase();
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
                    lock(&asked).push(a as u64);
                    // A slow link: the client may give the request up.
                    tokio::time::sleep(delay).await;
                    if failures
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        let _ = conn
                            .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                        return;
                    }
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
        Blobs {
            addr,
            ranges,
            asked,
        }
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
        whole: Arc<Whole>,
    }

    impl Drop for Setup {
        fn drop(&mut self) {
            // Ends the event thread.
            self.fan.close();
        }
    }

    /// Gives back, as "the layer fetched whole", `bytes` with `diff_id`.
    #[derive(Debug)]
    struct Whole {
        path: PathBuf,
        diff_id: String,
        /// Fails this many downloads first.
        fails: AtomicUsize,
        /// Downloads asked for.
        calls: AtomicUsize,
        /// When set, a download waits for it before its first piece.
        gate: Option<Arc<tokio::sync::Notify>>,
        /// Every download is refused for its content.
        bad_content: bool,
        /// Downloads never wait for reads.
        unpaced: bool,
        /// A download was told it is no longer wanted.
        stopped: AtomicBool,
    }

    impl Verifier for Whole {
        fn whole<'a>(
            &'a self,
            _image: &'a str,
            _layer: &'a str,
            pace: Option<Pace>,
        ) -> BoxFuture<'a, Result<(PathBuf, String), WholeError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if let Some(gate) = &self.gate {
                    gate.notified().await;
                }
                if let Some(p) = pace.filter(|_| !self.unpaced) {
                    // The body's first piece and one past the budget, read
                    // as the download would.
                    if !p(0).await || !p(FILL_REQUEST).await {
                        self.stopped.store(true, Ordering::SeqCst);
                        return Err(WholeError {
                            why: "download stopped: no longer wanted".into(),
                            bad_content: false,
                            stopped: true,
                        });
                    }
                }
                if self.bad_content {
                    return Err(WholeError {
                        why: "layer refused: device node".into(),
                        bad_content: true,
                        stopped: false,
                    });
                }
                if self
                    .fails
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Err(WholeError {
                        why: "registry unavailable".into(),
                        bad_content: false,
                        stopped: false,
                    });
                }
                Ok((self.path.clone(), self.diff_id.clone()))
            })
        }
    }

    const DIFF_ID: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn registry(dir: &Path) -> Arc<Registry> {
        Arc::new(
            Registry::new(&hyperbox_config::Registry {
                config_path: dir.join("certs.d"),
                docker_config: dir.join("config.json"),
                max_concurrent_downloads: 1,
                retries: 0,
                timeout_secs: 5,
            })
            .unwrap(),
        )
    }

    /// How a test's layer is set up.
    #[derive(Default)]
    struct Case {
        /// The registry flips every byte it sends.
        corrupt: bool,
        /// The registry fails this many range requests first (each after
        /// `delay`).
        fail_first: usize,
        /// What "the layer fetched whole" converts to, if not the blob.
        whole: Option<Vec<u8>>,
        /// How long the registry takes before answering a range.
        delay: Duration,
        /// Chunks an earlier run read, in order (a learned prefetch list).
        learned: Vec<usize>,
        /// A list shared through the registry, fitted to the layer as an
        /// index lookup leaves it.
        shared: Vec<usize>,
        /// Fill from the layer fetched whole (`fill_from_layer`).
        from_layer: bool,
        /// Downloads of the whole layer that fail first.
        whole_fails: usize,
        /// The whole layer comes once this is notified.
        whole_gate: Option<Arc<tokio::sync::Notify>>,
        /// The whole layer is refused for its content.
        whole_bad_content: bool,
        /// The whole layer's download does not wait for reads: its bytes
        /// were on their way before they came.
        whole_unpaced: bool,
    }

    /// A lazy layer of four chunks, registered and marked, whose bytes
    /// come from a local registry; verified against a whole copy.
    async fn setup(case: Case) -> Setup {
        let blob: Vec<u8> = (0..4 * CHUNK).map(|i| (i % 251) as u8).collect();
        let server = serve(blob.clone(), &case).await;
        let dir = tempfile::tempdir().unwrap();
        let whole = dir.path().join("whole.erofs");
        fs::write(&whole, case.whole.as_deref().unwrap_or(&blob)).unwrap();
        let whole = Arc::new(Whole {
            path: whole,
            diff_id: DIFF_ID.into(),
            fails: AtomicUsize::new(case.whole_fails),
            calls: AtomicUsize::new(0),
            gate: case.whole_gate.clone(),
            bad_content: case.whole_bad_content,
            unpaced: case.whole_unpaced,
            stopped: AtomicBool::new(false),
        });
        let verifier: Arc<dyn Verifier> = whole.clone();
        if !case.learned.is_empty() {
            prefetch::Store::open(dir.path())
                .unwrap()
                .save(&Digest::of(&blob).to_string(), CHUNK, 4, &case.learned)
                .unwrap();
        }
        let fan = Arc::new(FakeFanotify::new());
        let (lazy, resumed) = Lazy::open(
            dir.path(),
            registry(dir.path()),
            fan.clone(),
            Some(verifier),
            Options {
                fill_from_layer: case.from_layer,
                ..OPTIONS
            },
        )
        .unwrap();
        assert_eq!(resumed, 0);
        let layer = format!("sha256:{}", "1".repeat(64));
        let state = State {
            image: format!("{}/test/lazy:v1", server.addr),
            chunk_size: CHUNK,
            entry: IndexLayer {
                layer: layer.clone(),
                diff_id: DIFF_ID.into(),
                erofs: Digest::of(&blob).to_string(),
                size: blob.len() as u64,
                data_end: 3 * CHUNK,
                chunks: blob
                    .chunks(CHUNK as usize)
                    .map(|c| hex::encode(Sha256::digest(c)))
                    .collect(),
            },
            rejected: None,
        };
        let me = lazy.clone();
        let shared = (!case.shared.is_empty()).then(|| Arc::new(case.shared));
        // Decided as a Prepare decides it, from this node's lists and the
        // shared ones.
        let download = lazy.download_for(&Found {
            index: Arc::new(Index {
                version: 2,
                chunk_size: CHUNK,
                layers: vec![state.entry.clone()],
            }),
            shared: Arc::new(
                shared
                    .iter()
                    .map(|l| (state.entry.erofs.clone(), l.clone()))
                    .collect(),
            ),
        });
        let path = tokio::task::spawn_blocking(move || me.register(state, true, shared, download))
            .await
            .unwrap()
            .unwrap()
            .path
            .clone();
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
            whole,
        }
    }

    const OPTIONS: Options = Options {
        max_chunk_fetches: 4,
        verify: true,
        fill_pause_io_pressure: 0.0,
        // One chunk per request, so the tests see each chunk's request.
        fill_request: CHUNK,
        shared_prefetch: true,
        fill_from_layer: false,
    };

    /// Polls `f` until it holds or WAIT passes.
    async fn eventually(mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f()
    }

    /// A read of `offset` as the kernel would hold it, and its answer.
    async fn read_event(s: &Setup, offset: u64) -> Option<Verdict> {
        let id = s.fan.push(Some(s.file), offset, 16);
        let fan = s.fan.clone();
        tokio::task::spawn_blocking(move || fan.answer(id, WAIT))
            .await
            .unwrap()
    }

    /// A read of `offset` held as [`read_event`] does, returned once its
    /// request has reached the registry; its answer comes from the handle.
    async fn read_in_flight(s: &Setup, offset: u64) -> tokio::task::JoinHandle<Option<Verdict>> {
        let fan = s.fan.clone();
        let id = fan.push(Some(s.file), offset, 16);
        let read = tokio::task::spawn_blocking(move || fan.answer(id, WAIT));
        let server = s.server.asked.clone();
        assert!(eventually(|| !lock(&server).is_empty()).await);
        read
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
        let s = setup(Case::default()).await;
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
        // Checked against the whole layer: nothing more is kept about it.
        let lazy = s.lazy.clone();
        assert!(eventually(|| lazy.counters().verified.load(Ordering::SeqCst) == 1).await);
        assert!(!s.path.with_extension("lazy").exists());
        assert_eq!(s.lazy.counters().rejected.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_complete_layer_that_does_not_match_its_image_is_refused_for_good() {
        let mut other: Vec<u8> = (0..4 * CHUNK).map(|i| (i % 251) as u8).collect();
        other[5000] ^= 0xff;
        let s = setup(Case {
            whole: Some(other),
            ..Case::default()
        })
        .await;
        // A snapshot links it, as commit_layer does.
        let link = s._dir.path().join("snapshot-layer.erofs");
        fs::hard_link(&s.path, &link).unwrap();
        let lazy = s.lazy.clone();
        assert!(eventually(|| lazy.counters().rejected.load(Ordering::SeqCst) == 1).await);
        let why = crate::snapshots::LayerGate::refuse(&*s.lazy, &link)
            .expect("new mounts on it are refused");
        assert!(why.contains("is not what layer"), "{why}");
        assert_eq!(
            s.fan.marked(),
            std::slice::from_ref(&s.path),
            "marked again"
        );
        assert_eq!(read_event(&s, 0).await, Some(Verdict::DenyEio));
        let state = fs::read_to_string(s.path.with_extension("lazy")).unwrap();
        assert!(state.contains("rejected"), "{state}");
        // A restart keeps refusing it, and never fills it again.
        let fan = Arc::new(FakeFanotify::new());
        let (again, resumed) = Lazy::open(
            s._dir.path(),
            registry(s._dir.path()),
            fan.clone(),
            None,
            OPTIONS,
        )
        .unwrap();
        assert_eq!(resumed, 0);
        assert!(crate::snapshots::LayerGate::refuse(&*again, &link).is_some());
        assert_eq!(fan.marked(), std::slice::from_ref(&s.path));
        fan.close();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_layer_fills_from_its_own_blob_without_range_requests_and_is_accepted() {
        let s = setup(Case {
            from_layer: true,
            ..Case::default()
        })
        .await;
        let lazy = s.lazy.clone();
        assert!(eventually(|| lazy.counters().verified.load(Ordering::SeqCst) == 1).await);
        assert_eq!(fs::read(&s.path).unwrap(), s.blob);
        assert!(s.fan.marked().is_empty(), "a complete layer is unmarked");
        assert_eq!(
            s.server.ranges.load(Ordering::SeqCst),
            0,
            "no byte came from the EROFS blob"
        );
        assert_eq!(
            s.lazy.counters().layer_filled_chunks.load(Ordering::SeqCst),
            4
        );
        assert_eq!(
            s.whole.calls.load(Ordering::SeqCst),
            1,
            "one download fills and verifies"
        );
        assert!(!s.path.with_extension("lazy").exists());
        assert!(!s.lazy.knows(&s.layer));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_read_is_served_from_the_erofs_blob_while_the_layer_downloads() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let s = setup(Case {
            from_layer: true,
            whole_gate: Some(gate.clone()),
            ..Case::default()
        })
        .await;
        // The read arrives while the layer downloads.
        let read = {
            let fan = s.fan.clone();
            let id = fan.push(Some(s.file), 2 * CHUNK + 10, 16);
            tokio::task::spawn_blocking(move || fan.answer(id, WAIT))
        };
        assert_eq!(read.await.unwrap(), Some(Verdict::Allow));
        assert!(
            s.server.ranges.load(Ordering::SeqCst) >= 1,
            "fetched on demand"
        );
        assert_eq!(s.lazy.counters().verified.load(Ordering::SeqCst), 0);
        gate.notify_one();
        let lazy = s.lazy.clone();
        assert!(eventually(|| lazy.counters().verified.load(Ordering::SeqCst) == 1).await);
        assert_eq!(fs::read(&s.path).unwrap(), s.blob);
        let from_layer = s.lazy.counters().layer_filled_chunks.load(Ordering::SeqCst);
        assert!(
            (1..=3).contains(&from_layer),
            "{from_layer}: the chunks the read did not fetch came from the layer"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_whose_request_fails_after_the_layer_filled_its_chunks_goes_on() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let s = setup(Case {
            from_layer: true,
            whole_gate: Some(gate.clone()),
            whole_unpaced: true,
            // Every Range request fails: the read's and any read-ahead's.
            fail_first: 100,
            delay: Duration::from_secs(2),
            ..Case::default()
        })
        .await;
        // The layer's download is under way when the read comes; the
        // layer arrives and fills every chunk while the read's own request
        // is still out, and that request then fails.
        let whole = s.whole.clone();
        assert!(eventually(|| whole.calls.load(Ordering::SeqCst) == 1).await);
        let read = read_in_flight(&s, 2 * CHUNK + 10).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        gate.notify_one();
        let lazy = s.lazy.clone();
        assert!(eventually(|| lazy.counters().verified.load(Ordering::SeqCst) == 1).await);
        assert_eq!(read.await.unwrap(), Some(Verdict::Allow));
        assert!(
            s.lazy.counters().chunk_failures.load(Ordering::SeqCst) >= 1,
            "the read's request did fail"
        );
        assert_eq!(s.lazy.counters().denied_reads.load(Ordering::SeqCst), 0);
        assert_eq!(
            read_at(&s.path, 2 * CHUNK, CHUNK as usize),
            s.blob[2 * CHUNK as usize..3 * CHUNK as usize]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_layer_of_an_image_no_run_taught_downloads_at_once_and_learns_the_whole_run() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let s = setup(Case {
            from_layer: true,
            delay: Duration::from_secs(3),
            whole_gate: Some(gate.clone()),
            ..Case::default()
        })
        .await;
        assert_eq!(s.lazy.counters().untried_layers.load(Ordering::SeqCst), 1);
        // A read waits for its slow request when the layer's first bytes
        // come: the download does not pause for it.
        let read = read_in_flight(&s, 2 * CHUNK + 10).await;
        gate.notify_one();
        let lazy = s.lazy.clone();
        let deadline = Instant::now() + Duration::from_secs(2);
        while lazy.counters().layer_filled_chunks.load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < deadline && !read.is_finished(),
                "the layer was not filled while the read waited"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Complete, and still learning: a read now costs no fetch, but is
        // in the list the next nodes prefetch.
        let asked = lock(&s.server.asked).len();
        assert_eq!(read_event(&s, CHUNK + 10).await, Some(Verdict::Allow));
        assert_eq!(
            lock(&s.server.asked).len(),
            asked,
            "no fetch for a complete layer"
        );
        assert_eq!(read.await.unwrap(), Some(Verdict::Allow));
        let lazy = s.lazy.clone();
        assert!(eventually(|| lazy.counters().verified.load(Ordering::SeqCst) == 1).await);
        assert!(s.fan.marked().is_empty(), "unmarked once reads stopped");
        let learned = prefetch::Store::open(s._dir.path()).unwrap().load(
            &Digest::of(&s.blob).to_string(),
            CHUNK,
            4,
        );
        assert_eq!(learned, vec![2, 1]);
        assert_eq!(fs::read(&s.path).unwrap(), s.blob);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_taught_layer_or_a_shared_list_makes_an_image_wait_for_reads() {
        let s = setup(Case {
            from_layer: true,
            ..Case::default()
        })
        .await;
        let layer = |erofs: &str| IndexLayer {
            layer: format!("sha256:{}", "3".repeat(64)),
            diff_id: DIFF_ID.into(),
            erofs: erofs.into(),
            size: 4 * CHUNK,
            data_end: 3 * CHUNK,
            chunks: vec![String::new(); 4],
        };
        let (base, app) = (
            format!("sha256:{}", "a".repeat(64)),
            format!("sha256:{}", "b".repeat(64)),
        );
        let found = |shared: Vec<(String, Vec<usize>)>| Found {
            index: Arc::new(Index {
                version: 2,
                chunk_size: CHUNK,
                layers: vec![layer(&base), layer(&app)],
            }),
            shared: Arc::new(shared.into_iter().map(|(e, l)| (e, Arc::new(l))).collect()),
        };
        assert_eq!(s.lazy.download_for(&found(vec![])), Download::AtOnce);
        assert_eq!(
            s.lazy.download_for(&found(vec![(app.clone(), vec![1])])),
            Download::AfterReads,
            "a list shared for one layer"
        );
        let store = prefetch::Store::open(s._dir.path()).unwrap();
        // A list that does not fit the layer teaches nothing.
        store.save(&base, CHUNK, 9, &[8]).unwrap();
        assert_eq!(s.lazy.download_for(&found(vec![])), Download::AtOnce);
        // Another image's runs taught the base layer.
        fs::remove_dir_all(s._dir.path().join("prefetch")).unwrap();
        store.save(&base, CHUNK, 4, &[0]).unwrap();
        assert_eq!(s.lazy.download_for(&found(vec![])), Download::AfterReads);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_fills_from_the_layer_nothing_downloads_at_once() {
        let s = setup(Case::default()).await;
        assert_eq!(s.lazy.counters().untried_layers.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_layer_of_an_image_a_run_taught_downloads_once_reads_settle() {
        let s = setup(Case {
            from_layer: true,
            learned: vec![0],
            delay: Duration::from_millis(1500),
            ..Case::default()
        })
        .await;
        assert_eq!(s.lazy.counters().untried_layers.load(Ordering::SeqCst), 0);
        let lazy = s.lazy.clone();
        assert!(eventually(|| lazy.counters().prefetched_chunks.load(Ordering::SeqCst) == 1).await);
        let read = read_in_flight(&s, 2 * CHUNK + 10).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!read.is_finished());
        assert_eq!(
            s.whole.calls.load(Ordering::SeqCst),
            0,
            "the download waits for the read"
        );
        assert_eq!(read.await.unwrap(), Some(Verdict::Allow));
        let lazy = s.lazy.clone();
        assert!(eventually(|| lazy.counters().verified.load(Ordering::SeqCst) == 1).await);
        assert_eq!(s.whole.calls.load(Ordering::SeqCst), 1);
    }

    /// [`setup`], whose layer download is held until its image has been
    /// deleted (the lazy file forgotten, nothing linking it).
    async fn removed_while_downloading(case: Case) -> Setup {
        let gate = Arc::new(tokio::sync::Notify::new());
        let s = setup(Case {
            whole_gate: Some(gate.clone()),
            ..case
        })
        .await;
        let whole = s.whole.clone();
        assert!(eventually(|| whole.calls.load(Ordering::SeqCst) == 1).await);
        s.lazy.forget(&s.path);
        assert!(!s.path.exists());
        gate.notify_one();
        s
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_layer_removed_while_it_downloads_stops_its_download() {
        let s = removed_while_downloading(Case {
            from_layer: true,
            ..Case::default()
        })
        .await;
        let whole = s.whole.clone();
        assert!(
            eventually(|| whole.stopped.load(Ordering::SeqCst)).await,
            "the download was told to stop"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(whole.calls.load(Ordering::SeqCst), 1, "not tried again");
        assert_eq!(
            s.server.ranges.load(Ordering::SeqCst),
            0,
            "and no fill from the EROFS blob instead"
        );
    }

    /// [`setup`] filling from the layer, which comes only once a snapshot
    /// links the lazy file (as commit_layer does), so a refusal marks the
    /// file instead of removing it.
    async fn linked_from_layer(case: Case) -> Setup {
        let gate = Arc::new(tokio::sync::Notify::new());
        let s = setup(Case {
            from_layer: true,
            whole_gate: Some(gate.clone()),
            ..case
        })
        .await;
        fs::hard_link(&s.path, s._dir.path().join("snapshot-layer.erofs")).unwrap();
        gate.notify_one();
        s
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_layer_that_converts_to_other_bytes_is_refused() {
        let mut other: Vec<u8> = (0..4 * CHUNK).map(|i| (i % 251) as u8).collect();
        other[5000] ^= 0xff;
        let s = linked_from_layer(Case {
            whole: Some(other),
            ..Case::default()
        })
        .await;
        let lazy = s.lazy.clone();
        assert!(eventually(|| lazy.counters().rejected.load(Ordering::SeqCst) == 1).await);
        assert_eq!(
            s.lazy.counters().layer_filled_chunks.load(Ordering::SeqCst),
            0
        );
        assert_eq!(read_event(&s, 0).await, Some(Verdict::DenyEio));
        let state = fs::read_to_string(s.path.with_extension("lazy")).unwrap();
        assert!(state.contains("is not what layer"), "{state}");
        assert!(state.contains("chunk 1 differs"), "{state}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_waiting_when_its_layer_is_refused_fails() {
        let mut other: Vec<u8> = (0..4 * CHUNK).map(|i| (i % 251) as u8).collect();
        other[5000] ^= 0xff;
        let gate = Arc::new(tokio::sync::Notify::new());
        let s = setup(Case {
            from_layer: true,
            whole: Some(other),
            whole_gate: Some(gate.clone()),
            whole_unpaced: true,
            delay: Duration::from_secs(2),
            ..Case::default()
        })
        .await;
        fs::hard_link(&s.path, s._dir.path().join("snapshot-layer.erofs")).unwrap();
        let whole = s.whole.clone();
        assert!(eventually(|| whole.calls.load(Ordering::SeqCst) == 1).await);
        // The read's chunk is fine and on its way when the layer is
        // refused; the chunks around it may never be written.
        let read = read_in_flight(&s, 2 * CHUNK + 10).await;
        gate.notify_one();
        let lazy = s.lazy.clone();
        assert!(eventually(|| lazy.counters().rejected.load(Ordering::SeqCst) == 1).await);
        assert_eq!(read.await.unwrap(), Some(Verdict::DenyEio));
        assert_eq!(read_event(&s, 3 * CHUNK).await, Some(Verdict::DenyEio));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_layer_removed_while_it_is_verified_is_not_counted_verified() {
        // Complete from the EROFS blob; its verification downloads the
        // layer.
        let s = removed_while_downloading(Case::default()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(s.lazy.counters().verified.load(Ordering::SeqCst), 0);
        assert_eq!(s.lazy.counters().rejected.load(Ordering::SeqCst), 0);
        assert!(!s.path.with_extension("lazy").exists(), "no state left");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_layer_refused_for_its_content_refuses_its_lazy_copy_at_once() {
        let s = linked_from_layer(Case {
            whole_bad_content: true,
            ..Case::default()
        })
        .await;
        let lazy = s.lazy.clone();
        assert!(eventually(|| lazy.counters().rejected.load(Ordering::SeqCst) == 1).await);
        assert_eq!(s.whole.calls.load(Ordering::SeqCst), 1, "not retried");
        assert_eq!(s.server.ranges.load(Ordering::SeqCst), 0, "no Range fill");
        let state = fs::read_to_string(s.path.with_extension("lazy")).unwrap();
        assert!(
            state.contains("refused whole: layer refused: device node"),
            "{state}"
        );
        assert_eq!(read_event(&s, 2 * CHUNK).await, Some(Verdict::DenyEio));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_the_layer_the_fill_falls_back_to_the_erofs_blob() {
        let s = setup(Case {
            from_layer: true,
            whole_fails: usize::MAX,
            ..Case::default()
        })
        .await;
        let fan = s.fan.clone();
        assert!(
            eventually(|| fan.marked().is_empty()).await,
            "complete anyway"
        );
        assert_eq!(fs::read(&s.path).unwrap(), s.blob);
        assert!(s.server.ranges.load(Ordering::SeqCst) >= 1);
        assert!(s.whole.calls.load(Ordering::SeqCst) >= WHOLE_ATTEMPTS as usize);
        assert_eq!(
            s.lazy.counters().verified.load(Ordering::SeqCst),
            0,
            "not verified without the layer"
        );
    }

    #[test]
    fn an_index_is_looked_up_in_the_repository_of_the_image() {
        let m = "sha256:5b0bcabd1ed22e9fb1310cf6c2dec7cdef19f0ad69efa1f392e94a4333501270";
        let key = |image: &str| index_key(&Reference::parse(image).unwrap(), m);
        // Mirrored into another repository, the same manifest has none of
        // the first repository's index blobs: never reuse its index there.
        assert_ne!(
            key("127.0.0.1:5000/team-a/app:v1"),
            key("127.0.0.1:5000/team-b/app:v1")
        );
        assert_ne!(key("registry-a:5000/app:v1"), key("registry-b:5000/app:v1"));
        assert_eq!(
            key("127.0.0.1:5000/team-a/app:v1"),
            key("127.0.0.1:5000/team-a/app:latest")
        );
    }

    #[test]
    fn read_ahead_grows_while_reads_follow_and_shrinks_on_a_jump() {
        let (min, c) = (READAHEAD_MIN, 64 << 10);
        let mut state = (0, min);
        let mut windows = Vec::new();
        for offset in [0, 4096, 64 << 10, 300 << 10, 900 << 10, 2 << 20] {
            let (w, _) = readahead_window(state, offset, c);
            windows.push(w);
            state = (offset + 4096, w);
        }
        // A read from the start follows "nothing read yet" at 0; 2 MiB is
        // past the 1 MiB window after the read at 900 KiB.
        assert_eq!(
            windows,
            [
                2 * min,
                4 * min,
                READAHEAD_MAX,
                READAHEAD_MAX,
                READAHEAD_MAX,
                min
            ]
        );
        // Far behind or far ahead: back to the minimum, a jump.
        assert_eq!(
            readahead_window((10 << 20, READAHEAD_MAX), 0, c),
            (min, false)
        );
        assert_eq!(readahead_window((0, min), 50 << 20, c), (min, false));
        assert_eq!(readahead_window((0, min), 4096, c), (2 * min, true));
    }

    #[test]
    fn read_ahead_after_jumps_stops_while_reads_do_not_use_it() {
        let mut a = Ahead::default();
        assert!(a.pays(), "a trial first");
        a.fetched = READAHEAD_TRIAL;
        assert!(!a.pays(), "nothing of the trial used");
        a.used = READAHEAD_TRIAL / 4;
        assert!(a.pays(), "a quarter used");
        a.fetched = 10 * READAHEAD_TRIAL;
        assert!(!a.pays());
    }

    #[test]
    fn adjacent_missing_chunks_are_one_request_up_to_a_bound() {
        let (t, f) = (true, false);
        assert_eq!(missing_runs(&[], 4), vec![]);
        assert_eq!(missing_runs(&[t, t], 4), vec![]);
        assert_eq!(missing_runs(&[f, f, t, f], 4), vec![(0, 1), (3, 3)]);
        assert_eq!(
            missing_runs(&[f, f, f, f, f, t, f], 2),
            vec![(0, 1), (2, 3), (4, 4), (6, 6)]
        );
        assert_eq!(missing_runs(&[f, f], 0), vec![(0, 0), (1, 1)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_read_goes_ahead_of_the_background_fill() {
        let delay = Duration::from_millis(400);
        let s = setup(Case {
            delay,
            ..Case::default()
        })
        .await;
        // The fill is fetching chunk 0 when a read of chunk 3 arrives.
        assert!(eventually(|| lock(&s.server.asked).first() == Some(&0)).await);
        let asked = std::time::Instant::now();
        assert_eq!(read_event(&s, 3 * CHUNK + 7).await, Some(Verdict::Allow));
        let waited = asked.elapsed();
        assert!(
            waited < 2 * delay,
            "the read waited {waited:?}, one request is {delay:?}"
        );
        // Had the fill kept chunk 0's request, chunk 0 would have been in
        // before the read's; it was given up and asked again after.
        assert_eq!(
            read_at(&s.path, 0, CHUNK as usize),
            vec![0u8; CHUNK as usize],
            "chunk 0 is not in yet"
        );
        let d = s.lazy.demand_counters();
        assert_eq!(d.fill_preempted.load(Ordering::Relaxed), 1);
        // Then the fill takes chunk 0 up again and completes the layer.
        assert!(eventually(|| s.fan.marked().is_empty()).await, "completed");
        assert_eq!(fs::read(&s.path).unwrap(), s.blob);
        assert!(d.fill_yields.load(Ordering::Relaxed) >= 1);
        // What the read waited for is the layer's learned prefetch list.
        let store = prefetch::Store::open(s._dir.path()).unwrap();
        assert_eq!(store.load(&Digest::of(&s.blob).to_string(), CHUNK, 4), [3]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_learned_list_is_fetched_first_in_its_order() {
        let s = setup(Case {
            delay: Duration::from_millis(200),
            learned: vec![3, 1],
            ..Case::default()
        })
        .await;
        assert!(eventually(|| lock(&s.server.asked).len() >= 3).await);
        let asked = lock(&s.server.asked).clone();
        let mut first_two = asked[..2].to_vec();
        first_two.sort();
        assert_eq!(
            first_two,
            [CHUNK, 3 * CHUNK],
            "listed chunks first: {asked:?}"
        );
        assert!(eventually(|| s.fan.marked().is_empty()).await, "completed");
        assert_eq!(fs::read(&s.path).unwrap(), s.blob);
        assert_eq!(
            s.lazy.counters().prefetched_chunks.load(Ordering::Relaxed),
            2
        );
        let asked = lock(&s.server.asked).clone();
        assert_eq!(asked.len(), 4, "each chunk once: {asked:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shared_list_adds_to_what_the_node_learned() {
        let s = setup(Case {
            delay: Duration::from_millis(200),
            learned: vec![3],
            shared: vec![3, 1],
            ..Case::default()
        })
        .await;
        assert!(eventually(|| lock(&s.server.asked).len() >= 3).await);
        let mut first_two = lock(&s.server.asked)[..2].to_vec();
        first_two.sort();
        assert_eq!(first_two, [CHUNK, 3 * CHUNK], "listed chunks first");
        assert!(eventually(|| s.fan.marked().is_empty()).await, "completed");
        let c = s.lazy.counters();
        assert_eq!(c.prefetched_chunks.load(Ordering::Relaxed), 2);
        assert_eq!(c.shared_prefetch_lists.load(Ordering::Relaxed), 1);

        // A shared list that adds nothing to what the node learned is not
        // counted as used.
        let s = setup(Case {
            learned: vec![2, 1],
            shared: vec![1],
            ..Case::default()
        })
        .await;
        assert!(eventually(|| s.fan.marked().is_empty()).await, "completed");
        let c = s.lazy.counters();
        assert_eq!(c.prefetched_chunks.load(Ordering::Relaxed), 2);
        assert_eq!(c.shared_prefetch_lists.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_across_missing_chunks_is_one_request() {
        let s = setup(Case {
            delay: Duration::from_millis(200),
            ..Case::default()
        })
        .await;
        let id = s.fan.push(Some(s.file), CHUNK + 10, 2 * CHUNK);
        let fan = s.fan.clone();
        let answer = tokio::task::spawn_blocking(move || fan.answer(id, WAIT))
            .await
            .unwrap();
        assert_eq!(answer, Some(Verdict::Allow));
        assert_eq!(
            read_at(&s.path, CHUNK, 3 * CHUNK as usize),
            s.blob[CHUNK as usize..],
            "chunks 1 to 3 are in"
        );
        assert!(eventually(|| s.fan.marked().is_empty()).await, "completed");
        let asked = lock(&s.server.asked).clone();
        assert!(asked.contains(&CHUNK), "{asked:?}");
        assert!(
            !asked.contains(&(2 * CHUNK)) && !asked.contains(&(3 * CHUNK)),
            "chunks 2 and 3 came with chunk 1: {asked:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_of_the_chunk_being_filled_is_not_fetched_twice() {
        let delay = Duration::from_millis(300);
        let s = setup(Case {
            delay,
            ..Case::default()
        })
        .await;
        assert!(eventually(|| lock(&s.server.asked).first() == Some(&0)).await);
        assert_eq!(read_event(&s, 100).await, Some(Verdict::Allow));
        assert_eq!(
            s.lazy
                .demand_counters()
                .fill_preempted
                .load(Ordering::Relaxed),
            0,
            "the fill finished the chunk the read waits for"
        );
        assert!(eventually(|| s.fan.marked().is_empty()).await, "completed");
        let asked = lock(&s.server.asked).clone();
        assert_eq!(asked.iter().filter(|a| **a == 0).count(), 1, "{asked:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_background_fill_retries_after_registry_errors() {
        let s = setup(Case {
            fail_first: 3,
            ..Case::default()
        })
        .await;
        let fan = s.fan.clone();
        assert!(
            eventually(|| fan.marked().is_empty()).await,
            "completed despite the first failures"
        );
        assert_eq!(fs::read(&s.path).unwrap(), s.blob);
        assert!(s.lazy.counters().chunk_failures.load(Ordering::SeqCst) >= 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_linked_file_is_never_discarded_or_rewritten() {
        let s = setup(Case {
            corrupt: true,
            ..Case::default()
        })
        .await;
        let link = s._dir.path().join("snapshot-layer.erofs");
        fs::hard_link(&s.path, &link).unwrap();
        s.lazy.forget(&s.path);
        assert!(s.path.exists(), "a snapshot links it: kept");
        assert!(s.lazy.knows(&s.layer), "and still served");
        let state: State =
            serde_json::from_slice(&fs::read(s.path.with_extension("lazy")).unwrap()).unwrap();
        let me = s.lazy.clone();
        let again = tokio::task::spawn_blocking(move || {
            me.register(state, true, None, Download::AfterReads)
        })
        .await
        .unwrap();
        assert!(matches!(again, Err(Error::Linked { .. })), "{again:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreadable_state_is_set_aside_and_its_file_refused() {
        let dir = tempfile::tempdir().unwrap();
        let lazy_dir = dir.path().join("lazy");
        fs::create_dir_all(&lazy_dir).unwrap();
        let stem = format!("{}.{}", "1".repeat(64), "3".repeat(64));
        let file = lazy_dir.join(format!("{stem}.erofs"));
        fs::write(&file, vec![0u8; 8192]).unwrap();
        let link = dir.path().join("snapshot-layer.erofs");
        fs::hard_link(&file, &link).unwrap();
        fs::write(lazy_dir.join(format!("{stem}.lazy")), b"{\"image\": tru").unwrap();
        let fan = Arc::new(FakeFanotify::new());
        let (lazy, resumed) =
            Lazy::open(dir.path(), registry(dir.path()), fan.clone(), None, OPTIONS)
                .expect("a bad state file does not stop the start");
        assert_eq!(resumed, 0);
        assert!(lazy_dir.join(format!("{stem}.lazy.corrupt")).exists());
        assert!(crate::snapshots::LayerGate::refuse(&*lazy, &link).is_some());
        assert_eq!(fan.marked(), vec![file]);
        fan.close();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_that_cannot_be_verified_fails_with_eio_and_says_why() {
        let s = setup(Case {
            corrupt: true,
            ..Case::default()
        })
        .await;
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
        let why = s.lazy.last_error(&s.path).unwrap();
        assert!(why.contains("does not match the index"), "{why}");
        assert_eq!(s.fan.marked(), std::slice::from_ref(&s.path), "still held");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_of_files_it_does_not_serve_go_on_at_once() {
        let s = setup(Case::default()).await;
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
