//! One lazy layer file: its state on disk (`<key>.lazy`), which chunks
//! are in (`<key>.have`), and its registration with the fanotify group.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hyperbox_kernel::fanotify::FileId;
use hyperbox_registry::Reference;
use hyperbox_registry::digest::Digest;
use hyperbox_registry::index::IndexLayer;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::fill::Download;
use super::readahead::{Ahead, READAHEAD_MIN};
use super::{Error, Lazy, Phase, io, lock};
use crate::prefetch;

/// What survives a restart about a lazy file (`<key>.lazy`): present until
/// the file is complete and verified; with `rejected`, why it is refused.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct State {
    pub(super) image: String,
    pub(super) chunk_size: u64,
    pub(super) entry: IndexLayer,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) rejected: Option<String>,
    /// When (Unix seconds) it was prewarmed ahead of a pull, while no
    /// pull has taken it yet ([`super::prewarm`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) prewarmed: Option<u64>,
    /// The list (and learned checkpoints) shared beside the index it was
    /// pulled or prewarmed through, fitted to it: kept here so a restart
    /// neither forgets the checkpoints reads start from nor what to fetch
    /// first. Older builds ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) shared: Option<hyperbox_registry::prefetch::Fitted>,
}

impl State {
    /// Whether `entry`, from an index of `chunk_size`-byte chunks, vouches
    /// for the same bytes as this copy's own entry. Until a lazy copy is
    /// verified whole, what it serves is only as good as the chunk digests
    /// it is checked against, so two indexes naming one layer and EROFS
    /// digest with other chunks (or sizes) are other copies: one
    /// repository's index must never vouch for bytes another's pull reads.
    /// The layer map may differ: it only says how to make bytes those
    /// digests check.
    pub(super) fn vouches_alike(&self, entry: &IndexLayer, chunk_size: u64) -> bool {
        let own = &self.entry;
        self.chunk_size == chunk_size
            && own.layer == entry.layer
            && own.diff_id == entry.diff_id
            && own.erofs == entry.erofs
            && own.size == entry.size
            && own.data_end == entry.data_end
            && own.chunks == entry.chunks
            && own.blocks == entry.blocks
    }

    /// Bytes per unit: what is tracked, fetched at least and checked.
    pub(super) fn unit(&self) -> u64 {
        self.entry.unit(self.chunk_size)
    }

    /// How many units the image is.
    pub(super) fn units(&self) -> usize {
        self.entry.units(self.chunk_size)
    }
}

/// One sparse EROFS image being filled.
#[derive(Debug)]
pub(super) struct Blob {
    pub(super) key: String,
    pub(super) path: PathBuf,
    pub(super) state_path: PathBuf,
    pub(super) have_path: PathBuf,
    /// Opened before the mark: writes through it raise no events.
    pub(super) file: File,
    pub(super) have_file: File,
    pub(super) reference: Reference,
    pub(super) erofs: Digest,
    pub(super) state: State,
    pub(super) present: Mutex<Vec<bool>>,
    pub(super) locks: Vec<tokio::sync::Mutex<()>>,
    /// Per chunk, the reads in flight waiting for it: the background fill
    /// finishes such a chunk when a read arrives instead of giving it up.
    pub(super) wanted: Vec<Arc<AtomicU32>>,
    pub(super) phase: watch::Sender<Phase>,
    /// The last failure to serve a read, for error messages.
    pub(super) last_error: Mutex<Option<String>>,
    /// Where the last read ended and the read-ahead window now.
    pub(super) readahead: Mutex<(u64, u64)>,
    /// What read-ahead fetched and what reads used of it.
    pub(super) ahead: Mutex<Ahead>,
    /// Per chunk, whether a learned prefetch of this pull lists it (empty
    /// before one starts): reads of those are not read ahead of.
    pub(super) planned: Mutex<Vec<bool>>,
    /// The chunks reads waited for, in first-read order: the layer's
    /// learned prefetch list.
    pub(super) reads: Mutex<prefetch::Recorder>,
    /// How many of `reads` are in the saved list.
    pub(super) saved: AtomicUsize,
    /// When a read of it was last seen.
    pub(super) last_read: Mutex<Option<Instant>>,
    /// Its whole layer's bytes are coming now (not queued, not between
    /// attempts, not given up for Range requests).
    pub(super) downloading: AtomicBool,
    /// When its whole download starts.
    pub(super) download: Download,
    /// When it was registered, or taken by a Prepare after a prewarm: a
    /// Prepare may still be about to link it.
    pub(super) taken: Mutex<Instant>,
    /// The file, as events identify it.
    pub(super) inode: FileId,
    /// Its block table (index v4): units are then blocks.
    pub(super) blocks: Option<super::blocks::Blocks>,
    /// Its layer map (index v3), once fetched.
    pub(super) mapped: tokio::sync::OnceCell<Arc<super::mapped::Mapped>>,
    /// Prewarmed and not yet pulled: nothing is mounted on it and it
    /// does not fill ([`super::prewarm`]).
    pub(super) parked: watch::Sender<bool>,
    /// When (Unix seconds) it was last prewarmed, while parked.
    pub(super) parked_at: std::sync::atomic::AtomicU64,
}

impl Blob {
    /// Whether its path still names its file (not one a later pull put
    /// there after a discard).
    pub(super) fn still_at_its_path(&self) -> bool {
        file_id(&self.path).is_some_and(|(id, _)| id == self.inode)
    }

    /// Lets go of its layer's download ([`super::staged`]): it no longer
    /// fills, and a kept handle would hold a removed file's space.
    pub(super) fn release_download(&self) {
        if let Some(m) = self.mapped.get() {
            m.staged.release();
        }
    }

    /// Unit `i`'s offset and length.
    pub(super) fn chunk_range(&self, i: usize) -> (u64, u64) {
        let cs = self.state.unit();
        let start = i as u64 * cs;
        (start, cs.min(self.state.entry.size - start))
    }

    /// The first and last chunk holding `offset..offset+count`, if any
    /// byte of it is in the file.
    pub(super) fn chunks_of(&self, offset: u64, count: u64) -> Option<(usize, usize)> {
        let size = self.state.entry.size;
        if count == 0 || offset >= size {
            return None;
        }
        let cs = self.state.unit();
        let last = ((offset + count).min(size) - 1) / cs;
        Some(((offset / cs) as usize, last as usize))
    }

    /// Marks `chunks` as listed by this pull's learned prefetch.
    pub(super) fn plan(&self, chunks: &[usize]) {
        let mut planned = lock(&self.planned);
        if planned.is_empty() {
            planned.resize(self.locks.len(), false);
        }
        for &c in chunks {
            if let Some(p) = planned.get_mut(c) {
                *p = true;
            }
        }
    }

    /// The prefetch list shared beside the index this layer was pulled
    /// through, fitted to it (after a restart, as its state kept it).
    pub(super) fn shared(&self) -> Option<&hyperbox_registry::prefetch::Fitted> {
        self.state.shared.as_ref()
    }

    /// Takes back the plan for those of `chunks` still missing: the
    /// prefetch that listed them failed or stopped, so reads of them are
    /// read ahead of again.
    pub(super) fn unplan_missing(&self, chunks: impl IntoIterator<Item = usize>) {
        let present = lock(&self.present);
        let mut planned = lock(&self.planned);
        for c in chunks {
            if !present.get(c).copied().unwrap_or(true)
                && let Some(p) = planned.get_mut(c)
            {
                *p = false;
            }
        }
    }

    /// Whether every chunk of a read of `offset..offset+count` is listed by
    /// this pull's learned prefetch.
    pub(super) fn planned_all(&self, offset: u64, count: u64) -> bool {
        let Some((a, b)) = self.chunks_of(offset, count) else {
            return false;
        };
        let planned = lock(&self.planned);
        planned.get(a..=b).is_some_and(|p| p.iter().all(|x| *x))
    }

    /// How many chunks `bytes` is (at least one): a request's bound.
    pub(super) fn chunks_in(&self, bytes: u64) -> usize {
        (bytes / self.state.unit()).max(1) as usize
    }

    /// Records a read for the layer's learned prefetch list; returns how
    /// many chunks read ahead it used.
    pub(super) fn note_read(&self, offset: u64, count: u64) -> u64 {
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

    /// Whether every chunk holding `offset..offset+count` is in.
    pub(super) fn has_range(&self, offset: u64, count: u64) -> bool {
        let Some((first, last)) = self.chunks_of(offset, count) else {
            return true;
        };
        lock(&self.present)[first..=last].iter().all(|p| *p)
    }

    pub(super) fn missing(&self) -> usize {
        lock(&self.present).iter().filter(|p| !**p).count()
    }

    pub(super) fn phase(&self) -> Phase {
        self.phase.borrow().clone()
    }

    /// Prewarmed and not yet taken by a pull.
    pub(super) fn is_parked(&self) -> bool {
        *self.parked.borrow()
    }
}

/// The file name stem of an index entry: layer and EROFS image together,
/// so files made from different indexes never meet.
pub(super) fn key_of(entry: &IndexLayer) -> Result<String, Error> {
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

/// The runs of `false` in `present` as inclusive index pairs, none longer
/// than `most`: what one Range request each fetches.
pub(super) fn missing_runs(present: &[bool], most: usize) -> Vec<(usize, usize)> {
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
pub(super) fn next_missing_run(
    present: &[bool],
    from: usize,
    most: usize,
) -> Option<(usize, usize)> {
    let a = from + present.get(from..)?.iter().position(|p| !*p)?;
    let len = present[a..]
        .iter()
        .take(most.max(1))
        .take_while(|p| !**p)
        .count();
    Some((a, a + len - 1))
}

/// Writes `state` to `path` so a crash leaves the old or the new one:
/// temporary file, fsync, rename, fsync of the directory.
pub(super) fn write_durably(path: &Path, state: &State) -> Result<(), Error> {
    let tmp = path.with_extension("lazy.tmp");
    let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(&serde_json::to_vec(state).expect("state serializes"))
        .map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    fs::rename(&tmp, path).map_err(io("rename", path))?;
    sync_dir(path);
    Ok(())
}

pub(super) fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
}

pub(super) fn file_id(path: &Path) -> Option<(FileId, u64)> {
    fs::metadata(path)
        .ok()
        .map(|m| ((m.dev(), m.ino()), m.nlink()))
}

impl Lazy {
    /// Creates (or, after a restart, reopens) the sparse file of `state`,
    /// marks it and starts filling it.
    pub(super) fn register(
        self: &Arc<Self>,
        state: State,
        fresh: bool,
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
        let n = state.units();
        if fresh {
            // A file left behind is reused only if nothing links it; one a
            // snapshot links is never rewritten.
            if file_id(&path).is_some_and(|(_, nlink)| nlink > 1) {
                return Err(Error::Linked { path });
            }
            self.remove_lazy_file(&path).map_err(io("remove", &path))?;
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
        let mut have = vec![0u8; n];
        have_file
            .read_exact_at(&mut have, 0)
            .map_err(io("read", &have_path))?;
        let blocks = match &state.entry.blocks {
            Some(t) => Some(super::blocks::Blocks::new(
                t,
                state.chunk_size,
                state.entry.chunks.len(),
            )?),
            None => None,
        };
        let meta = file.metadata().map_err(io("stat", &path))?;
        let parked = state.prewarmed.is_some();
        let parked_at = state.prewarmed.unwrap_or(0);
        let mut blob = Blob {
            key: key.clone(),
            path: path.clone(),
            state_path,
            have_path,
            file,
            have_file,
            reference,
            erofs,
            state,
            present: Mutex::new(Vec::new()),
            locks: (0..n).map(|_| tokio::sync::Mutex::new(())).collect(),
            wanted: (0..n).map(|_| Arc::new(AtomicU32::new(0))).collect(),
            phase: watch::Sender::new(Phase::Filling),
            last_error: Mutex::new(None),
            readahead: Mutex::new((0, READAHEAD_MIN)),
            ahead: Mutex::new(Ahead::default()),
            planned: Mutex::new(Vec::new()),
            reads: Mutex::new(prefetch::Recorder::default()),
            saved: AtomicUsize::new(0),
            last_read: Mutex::new(None),
            downloading: AtomicBool::new(false),
            download,
            taken: Mutex::new(Instant::now()),
            inode: (meta.dev(), meta.ino()),
            mapped: tokio::sync::OnceCell::new(),
            blocks,
            parked: watch::Sender::new(parked),
            parked_at: std::sync::atomic::AtomicU64::new(parked_at),
        };
        // Units recorded as present are checked again: after a power loss
        // the record may be ahead of the data.
        let present = blob.recheck(&have)?;
        *blob.present.get_mut().expect("not shared yet") = present;
        let blob = Arc::new(blob);
        self.fan
            .mark(&path)
            .map_err(io("fanotify_mark(FAN_PRE_ACCESS)", &path))?;
        lock(&self.blobs).insert(blob.inode, blob.clone());
        lock(&self.by_key).insert(key, blob.clone());
        if download == Download::AtOnce {
            self.counters.untried_layers.fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(layer = %blob.state.entry.layer, erofs = %blob.erofs, size = blob.state.entry.size, missing = blob.missing(), ?download, parked, "lazy layer registered");
        let me = self.clone();
        let b = blob.clone();
        self.rt.spawn(async move { me.fill(b).await });
        Ok(blob)
    }
}
