//! Read-ahead within a lazy layer: the window doubles while reads follow
//! each other and falls back on a jump, and stays off while what it
//! fetched goes unread.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use super::blob::{Blob, next_missing_run};
use super::fill::Download;
use super::lock;

/// Read-ahead after a read that is not in the wake of the last one: a
/// program reading one small file often reads its neighbours next (EROFS
/// keeps a directory's files together, in tar order), a Python import for
/// one. Only while that pays ([`Ahead::pays`]): a program reading files
/// scattered over the layer would fetch several times what it reads.
pub(super) const READAHEAD_MIN: u64 = 128 << 10;

/// Chunks read ahead after jumps before judging whether reads use them.
pub(super) const READAHEAD_TRIAL: u64 = 64;

/// While read-ahead after jumps does not pay, one jump in this many still
/// reads ahead, so a workload whose reads turn local again is noticed.
pub(super) const READAHEAD_PROBE: u64 = 16;

/// Read-ahead while reads follow each other (a library mapped, a large
/// file read through).
pub(super) const READAHEAD_MAX: u64 = 1 << 20;

/// The read-ahead window for a read at `offset`, given where the last read
/// ended and the window then, and whether the read follows the last one:
/// doubled (up to [`READAHEAD_MAX`]) when the read starts within a chunk
/// before that end or inside the window after it, else back to
/// [`READAHEAD_MIN`].
pub(super) fn readahead_window(
    (last_end, window): (u64, u64),
    offset: u64,
    chunk: u64,
) -> (u64, bool) {
    if offset + chunk >= last_end && offset <= last_end + window {
        ((window * 2).min(READAHEAD_MAX), true)
    } else {
        (READAHEAD_MIN, false)
    }
}

/// A layer's read-ahead, judged by its use.
#[derive(Debug, Default)]
pub(super) struct Ahead {
    /// Chunks read ahead that no read has touched yet.
    pub(super) pending: HashSet<usize>,
    /// Chunks read ahead (halved with `used` as it grows: recent use
    /// counts most).
    pub(super) fetched: u64,
    /// Of those, chunks a read then touched.
    pub(super) used: u64,
    /// Reads that jumped.
    pub(super) jumps: u64,
}

impl Ahead {
    /// Whether read-ahead after a jump is worth its bytes: during a trial,
    /// then while reads use at least a quarter of what it fetched. Reads
    /// that follow each other always read ahead, and while it does not pay
    /// one jump in [`READAHEAD_PROBE`] still does, so use can come back.
    pub(super) fn pays(&self) -> bool {
        self.fetched < READAHEAD_TRIAL || self.used * 4 >= self.fetched
    }
}

impl Blob {
    /// The chunks to fetch ahead of a read of `offset..offset+count`
    /// (those missing, after the read's last chunk), the window doubling
    /// while reads follow each other and shrinking back on a jump, as the
    /// kernel's own read-ahead does for the page cache.
    pub(super) fn ahead_of(&self, offset: u64, count: u64) -> Option<(usize, usize, u64)> {
        let size = self.state.entry.size;
        let cs = self.state.unit();
        // Not while the whole layer comes at once: read-ahead would only
        // take the link from that download, which brings every chunk anyway
        // (Python image's first run: 6.13 s with it, 5.20 s without, full
        // fetch 5.76 s). Queued, between attempts or given up for Range
        // requests, it reads ahead as ever.
        if self.download == Download::AtOnce && self.downloading.load(Ordering::Relaxed) {
            return None;
        }
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
        // A read the learned list predicted: the list says what comes next,
        // and its prefetch is bringing it. Reading ahead beside such reads
        // fetched 1,557 chunks no read wanted on the many-files image's
        // later runs (about a third of their Range bytes).
        if self.planned_all(offset, count) {
            return None;
        }
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
}
