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
//!
//! Where things are: `blob` one lazy file and its chunk record,
//! `index` finding an image's index, `events` the held reads,
//! `fetch` Range requests, `readahead`, `fill` the background fill
//! and when its download starts, `learned` the learned prefetch,
//! `verify` holding a copy against its layer, `prune` removal,
//! `unservable` files a node without the lazy path refuses.

mod blob;
mod blocks;
mod events;
mod fetch;
mod fill;
mod follow;
mod index;
mod learned;
mod mapped;
#[cfg(test)]
mod mapped_tests;
mod prewarm;
mod prune;
mod readahead;
mod staged;
#[cfg(test)]
mod tests;
mod unservable;
mod verify;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyperbox_kernel::fanotify::{AccessEvent, FileId, PreContent};
use hyperbox_registry::Registry;
use hyperbox_registry::digest::chain_id;
use tokio::sync::Semaphore;

use crate::demand::Demand;
use crate::prefetch;

use blob::{Blob, State, file_id, key_of};
pub use fill::FILL_REQUEST;
use fill::{Download, LAYER_FILLS};
use index::CachedIndex;
pub use prewarm::{Outcome, Prewarm, Warmed};
use unservable::LEGACY;
pub use unservable::Unservable;
pub use verify::{Verifier, WholeError};

/// The longest pause between retries of a failed background fetch.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

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
    /// Block table entries that do not match their chunk's digest.
    #[error("block digests of chunk {chunk} of {erofs} do not match the index")]
    Blocks {
        /// The EROFS blob.
        erofs: String,
        /// Chunk number.
        chunk: usize,
    },
    /// A layer map that cannot be used.
    #[error("layer map of {erofs}: {why}")]
    Map {
        /// The EROFS image it maps.
        erofs: String,
        /// What is wrong.
        why: String,
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
    /// Reads that found a chunk of their range missing and waited for it
    /// (the rest were answered from local bytes).
    pub waited_reads: AtomicU64,
    /// Chunks fetched ahead of reads.
    pub readahead_chunks: AtomicU64,
    /// Of those, chunks a read then touched.
    pub readahead_used: AtomicU64,
    /// Chunks filled from the layer itself, converted on the node.
    pub layer_filled_chunks: AtomicU64,
    /// Lazy layers of images no run taught a prefetch list, downloaded
    /// whole at once ([`Download::AtOnce`]).
    pub untried_layers: AtomicU64,
    /// Chunks made from layer bytes a request inflated for other chunks
    /// of the same span (index v3), before any read asked for them.
    pub span_chunks: AtomicU64,
    /// Further requests on a layer blob after a first fetch ended short of
    /// the data (the span compressed worse than its average).
    pub map_refetches: AtomicU64,
    /// Layer-blob requests that started from a checkpoint learned from
    /// earlier runs (shared beside the prefetch lists).
    pub learned_point_requests: AtomicU64,
    /// Learned checkpoints a request failed from (then made again from the
    /// map's own checkpoint).
    pub learned_point_failures: AtomicU64,
    /// Layer-blob bytes mapped reads took from the layer's own download
    /// on this node rather than the registry.
    pub download_read_bytes: AtomicU64,
    /// Of those reads, the ones that waited for the download to bring
    /// their bytes.
    pub download_waits: AtomicU64,
    /// Layer-blob bytes of mapped layers fetched with Range requests
    /// (reads, prefetch, a Range fill), not whole downloads.
    pub layer_range_bytes: AtomicU64,
    /// Checkpoint windows' bytes fetched (compressed, with the block
    /// headers of learned checkpoints).
    pub window_bytes: AtomicU64,
    /// Block digest table bytes fetched (index v4, [`blocks`]).
    pub block_table_bytes: AtomicU64,
    /// Block table requests whose entries did not match the index (reads
    /// then fetch and check whole chunks).
    pub block_table_failures: AtomicU64,
    /// Chunks of mapped layers made from the layer's download as it
    /// arrived ([`follow`]).
    pub download_chunks: AtomicU64,
    /// Lazy layers prewarmed ahead of a pull ([`prewarm`]).
    pub prewarmed_layers: AtomicU64,
    /// Chunks those prewarms fetched.
    pub prewarmed_chunks: AtomicU64,
    /// Prewarms stopped because the node's I/O came under pressure.
    pub prewarm_stops: AtomicU64,
    /// Prewarmed layers a pull then took.
    pub prewarm_used: AtomicU64,
    /// Prewarmed layers removed unused after [`prewarm::PREWARM_KEEP`].
    pub prewarm_expired: AtomicU64,
    /// How long reads of layers still filling waited for their answer.
    pub read_wait: ReadWait,
    /// How many bytes those reads asked for.
    pub read_size: ReadSize,
}

/// The time from a read's event to its answer, for every read of a lazy
/// layer still filling: what a workload's first accesses cost, local
/// bytes answering in microseconds and missing ones a round trip or more.
#[derive(Debug, Clone)]
pub struct ReadWait(pub prometheus_client::metrics::histogram::Histogram);

impl Default for ReadWait {
    fn default() -> ReadWait {
        ReadWait(prometheus_client::metrics::histogram::Histogram::new([
            0.000_5, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]))
    }
}

/// The bytes each read of a lazy layer still filling asks for, as the
/// kernel sends it (a page cache fill of the EROFS file: a block, or a
/// readahead window): the least a read can make a node fetch, whatever the
/// chunks' size.
#[derive(Debug, Clone)]
pub struct ReadSize(pub prometheus_client::metrics::histogram::Histogram);

impl Default for ReadSize {
    fn default() -> ReadSize {
        ReadSize(prometheus_client::metrics::histogram::Histogram::new(
            (12..=22).map(|k| f64::from(1u32 << k)),
        ))
    }
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

/// A file whose reads fail and on which nothing new is mounted.
#[derive(Debug, Clone)]
struct Refusal {
    path: PathBuf,
    why: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    /// digest ([`index::index_key`]): the same manifest pushed to two repositories
    /// has two indexes, or one and none.
    indexes: Mutex<HashMap<String, CachedIndex>>,
    /// Held from looking a key up to registering it (Prepares and
    /// prewarms), and while a parked layer is taken or expired, so a
    /// prewarm never replaces a pull's file nor a pull a parked one.
    registering: tokio::sync::Mutex<()>,
    /// Images a prewarm resolved, by reference ([`prewarm::RESOLVED_TTL`]).
    resolved: Mutex<HashMap<String, prewarm::Resolved>>,
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
            resolved: Mutex::new(HashMap::new()),
            registering: tokio::sync::Mutex::new(()),
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
        // States an earlier start set aside as unreadable: their files
        // stay refused, not mounted as if complete.
        for stem in corrupt_stems(&dir) {
            lazy.refuse_file(
                &dir.join(format!("{stem}.erofs")),
                "its lazy state was set aside as unreadable by an earlier start".into(),
            );
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
            // Prewarmed, then linked by a snapshot before the record of
            // its pull was written: a pull took it.
            let mut state = state;
            if state.prewarmed.is_some() && file_id(&file).is_some_and(|(_, n)| n > 1) {
                state.prewarmed = None;
                if let Err(e) = blob::write_durably(&state_path, &state) {
                    tracing::warn!(file = %state_path.display(), error = %e, "cannot record that a prewarmed layer was pulled");
                }
            }
            // The shared list and learned checkpoints the state kept come
            // back unless shared lists were turned off since.
            if !lazy.shared_prefetch {
                state.shared = None;
            }
            // After a restart the layer's download is not started at once:
            // reads go first.
            match lazy.register(state, false, Download::AfterReads) {
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
            let _ = self.remove_lazy_file(path);
            let _ = fs::remove_file(path.with_extension("have"));
            return;
        }
        // Refused for new mounts first, so none attaches between the mark
        // (and the switch it waits for) and the refusal.
        lock(&self.refused).insert(
            id,
            Refusal {
                path: path.into(),
                why: why.clone(),
            },
        );
        // Re-marking a complete file through FUSE waits for its loop
        // devices to be switched: not on a runtime worker's time.
        let mark = || self.fan.mark(path);
        let marked = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(mark)
            }
            _ => mark(),
        };
        if let Err(e) = marked {
            tracing::error!(file = %path.display(), error = %e, "cannot hold reads of a refused lazy layer");
        }
        tracing::warn!(file = %path.display(), why, "lazy layer refused: its reads fail with EIO and nothing new is mounted on it");
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
    /// `refused`, and `prewarmed`: waiting for a pull).
    pub fn phases(&self) -> [(&'static str, usize); 4] {
        let (mut filling, mut verifying, mut prewarmed) = (0, 0, 0);
        for b in lock(&self.blobs).values() {
            match b.phase() {
                Phase::Filling if b.is_parked() => prewarmed += 1,
                Phase::Filling => filling += 1,
                Phase::Verifying => verifying += 1,
                _ => {}
            }
        }
        [
            ("filling", filling),
            ("verifying", verifying),
            ("refused", lock(&self.refused).len()),
            ("prewarmed", prewarmed),
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
        let registering = self.registering.lock().await;
        let known = lock(&self.by_key).get(&key).cloned();
        let blob = match known.filter(|b| b.phase() != Phase::Discarded) {
            Some(b) if !b.state.vouches_alike(&entry, found.index.chunk_size) => {
                tracing::warn!(
                    image, layer, from = %b.state.image,
                    "a lazy copy of this layer made from another index with other chunk digests is on the node; fetching the layer whole rather than sharing it"
                );
                return Ok(None);
            }
            Some(b) => {
                self.adopt(&b)?;
                b
            }
            None => {
                let download = self.download_for(&found);
                let state = State {
                    image: image.into(),
                    chunk_size: found.index.chunk_size,
                    shared: found.shared.get(&entry.erofs).map(|l| (**l).clone()),
                    entry,
                    rejected: None,
                    prewarmed: None,
                };
                let me = self.clone();
                tokio::task::spawn_blocking(move || me.register(state, true, download))
                    .await
                    .map_err(|e| Error::Io {
                        action: "register",
                        path: PathBuf::from(layer),
                        source: std::io::Error::other(e.to_string()),
                    })??
            }
        };
        drop(registering);
        if let Err(e) = self.fetch_metadata(&blob).await {
            // Nothing was mounted from it yet: start over next time.
            self.discard(&blob);
            return Err(e);
        }
        Ok(Some(blob.path.clone()))
    }

    /// Whether layer `layer` is being filled lazily (from any index).
    pub fn knows(&self, layer: &str) -> bool {
        lock(&self.by_key)
            .values()
            .any(|b| b.state.entry.layer == layer && b.phase() == Phase::Filling)
    }

    /// Why the lazy copy at `path` was refused for good, if it was: also
    /// once its file is gone (refused before any snapshot linked it).
    pub fn refused_why(&self, path: &Path) -> Option<String> {
        let key = path.file_stem()?.to_str()?;
        lock(&self.rejected).get(key).cloned()
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
            Some(m) => self.index(image, m).await,
            None => None,
        };
        if own.is_some_and(|f| {
            f.index
                .layer(layer)
                .is_some_and(|o| blob.state.vouches_alike(o, f.index.chunk_size))
        }) {
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

    /// Removes the lazy file at `path` (absent is fine): first from the
    /// lazy path's marks, whose inode number may come back as another
    /// file, then with any verdict on it (`.lazy.corrupt`), which the next
    /// file at this path must not inherit.
    fn remove_lazy_file(&self, path: &Path) -> std::io::Result<()> {
        let _ = self.fan.forget(path);
        let _ = fs::remove_file(path.with_extension("lazy.corrupt"));
        match fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether reads of the file `id` may still be held or refused: it is
    /// filling, being verified or refused.
    fn serves(&self, id: FileId) -> bool {
        lock(&self.blobs).contains_key(&id) || lock(&self.refused).contains_key(&id)
    }

    /// Of `files`, those whose reads are never held or refused again.
    pub fn settled(&self, files: Vec<PathBuf>) -> Vec<PathBuf> {
        files
            .into_iter()
            .filter(|p| file_id(p).is_some_and(|(id, _)| !self.serves(id)))
            .collect()
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
}

/// The stems of the `.lazy.corrupt` states in `dir`.
fn corrupt_stems(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".lazy.corrupt"))
                .map(str::to_string)
        })
        .collect()
}

impl crate::snapshots::LayerGate for Lazy {
    fn refuse(&self, layer_file: &Path) -> Option<String> {
        let (id, _) = file_id(layer_file)?;
        lock(&self.refused).get(&id).map(|r| r.why.clone())
    }

    /// Only files still filling, being verified or refused: a verified
    /// layer never changes again and mounts the node's usual way.
    fn source(&self, layer_file: &Path) -> Option<PathBuf> {
        let (id, _) = file_id(layer_file)?;
        if !self.serves(id) {
            return None;
        }
        self.fan.serve_path(layer_file)
    }
}
