//! Layer bytes taken from the layer's own download on this node.
//!
//! A lazy layer's fill downloads the whole layer blob into the remote
//! path's staging file, front to back, while reads of a mapped layer
//! (index v3) fetch ranges of that same blob from the registry. Without
//! this, a first run on an image with scattered reads fetched about
//! 170 KiB per small file from the registry on top of a download that
//! was bringing those very bytes, and both shared one link: the files
//! image's first run ended 1.31× later than its full fetch.
//!
//! So a read takes its compressed bytes from the staging file when the
//! download has them, and when the layer is downloading at once
//! ([`super::fill::Download::AtOnce`]: an image no run taught, whose
//! layers come whole at the link's speed and never pause for reads) and
//! will have them within [`WAIT_AT_MOST`] at its measured rate, waits for
//! them rather than asking the registry. Every byte a read asks of the
//! registry meanwhile is a byte the download waits behind, and one read's
//! wait also serves every later read of bytes the download passes. Measured on
//! first runs (100 Mbit/s, 20 ms; docs/benchmarks.md): the image of
//! 1,000 scattered small files 10.56 s against 11.37 s when only reads
//! whose bytes came within 250 ms waited, the Python image 4.45 s; their
//! full fetches 9.49 s and 5.82 s. A read whose
//! bytes lie further ahead (a large layer) is fetched as before.
//! Nothing is trusted for it: what the bytes inflate to is checked
//! against the index's chunk digests like any registry bytes, and a
//! staging file cut short or started over reads short, which sends the
//! request to the registry. A request that fails on bad bytes after
//! taking some from here is made once more from the registry, and when
//! that succeeds the staging file is not read again for the layer (a
//! download the registry corrupted, which its digest will refuse).
//!
//! The staging file is removed once the layer is converted; the handle
//! kept here still reads it until the lazy copy leaves filling
//! ([`Staged::release`]), so reads between the download's end and the
//! copy's are local too.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::lock;

/// The longest a read waits for a download at once to bring its bytes:
/// a layer of about 120 MB at 100 Mbit/s. Waits end sooner when the
/// download slows or stops (then the read is fetched).
pub(super) const WAIT_AT_MOST: Duration = Duration::from_secs(10);

/// How often a waiting read looks at the staging file again.
pub(super) const POLL: Duration = Duration::from_millis(10);

/// The download's rate is measured over at least this long.
const RATE_WINDOW: Duration = Duration::from_millis(500);

/// The staging file of one layer, as mapped reads see it.
#[derive(Debug, Default)]
pub(super) struct Staged {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The staging file open, with its (device, inode).
    file: Option<(std::sync::Arc<File>, (u64, u64))>,
    /// Two sightings of its length: (when, length), the older one at
    /// least [`RATE_WINDOW`] before the newer.
    older: Option<(Instant, u64)>,
    newer: Option<(Instant, u64)>,
    /// Released: the lazy copy is no longer filling, or its bytes failed.
    released: bool,
}

/// What the staging file holds now.
pub(super) struct Sight {
    pub(super) file: std::sync::Arc<File>,
    /// Bytes of the blob it holds, from the start.
    pub(super) len: u64,
    /// The download's bytes per second, when measured.
    pub(super) rate: Option<f64>,
}

impl Staged {
    /// The staging file at `path` (of a blob of `size` bytes), opened
    /// again if another file is there now (a download started over); the
    /// file already open when nothing is and it was complete (removed once
    /// converted). `None` when there is neither or it was released.
    pub(super) fn look(&self, path: &Path, size: u64) -> Option<Sight> {
        let mut inner = lock(&self.inner);
        if inner.released {
            return None;
        }
        let Ok(meta) = std::fs::metadata(path) else {
            // Removed: kept only if complete (converted), not a download
            // given up, whose space the handle would hold.
            if let Some((f, _)) = &inner.file
                && f.metadata().is_ok_and(|m| m.len() < size)
            {
                inner.file = None;
            }
            return Self::sight(&mut inner);
        };
        let id = (meta.dev(), meta.ino());
        if inner.file.as_ref().is_none_or(|(_, kept)| *kept != id)
            && let Ok(f) = File::open(path)
            && let Ok(m) = f.metadata()
        {
            inner.file = Some((std::sync::Arc::new(f), (m.dev(), m.ino())));
            inner.older = None;
            inner.newer = None;
        }
        Self::sight(&mut inner)
    }

    /// The kept file's length now, with the download's rate.
    fn sight(inner: &mut Inner) -> Option<Sight> {
        let file = inner.file.as_ref()?.0.clone();
        let len = file.metadata().ok()?.len();
        let now = Instant::now();
        // Sightings move on once the newer one is a window old.
        match inner.newer {
            Some((t, _)) if now.duration_since(t) < RATE_WINDOW => {}
            _ => {
                inner.older = inner.newer;
                inner.newer = Some((now, len));
            }
        }
        let rate = inner.older.and_then(|(t, l)| {
            let secs = now.duration_since(t).as_secs_f64();
            (secs > 0.0 && len > l).then(|| (len - l) as f64 / secs)
        });
        Some(Sight { file, len, rate })
    }

    /// Closes the file for good: the lazy copy no longer fills, and an
    /// open handle would keep a removed staging file's disk space.
    /// True the first time.
    pub(super) fn release(&self) -> bool {
        let mut inner = lock(&self.inner);
        let first = !inner.released;
        inner.released = true;
        inner.file = None;
        first
    }
}

impl Sight {
    /// How long until the download holds `end`, at its measured rate.
    pub(super) fn until(&self, end: u64) -> Option<Duration> {
        if self.len >= end {
            return Some(Duration::ZERO);
        }
        let rate = self.rate?;
        Some(Duration::from_secs_f64((end - self.len) as f64 / rate))
    }

    /// The bytes `[start, end)`, `None` if the file holds fewer (cut
    /// short meanwhile).
    pub(super) fn read(&self, start: u64, end: u64) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; (end - start) as usize];
        self.file.read_exact_at(&mut buf, start).ok()?;
        Some(buf)
    }
}
