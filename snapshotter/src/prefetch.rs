//! Prefetch learned from real runs: the order in which containers first
//! read a lazy layer's chunks, kept per EROFS image on the node
//! ([`Store`], from `hyperbox_registry::prefetch`, which `hb` reads too)
//! and shared through the registry by `hb image prefetch push`; fetched
//! first, in parallel, the next time that layer is pulled lazily.
//!
//! The lazy path sees every read a container waits for (a held read names
//! its file range, mmapped pages included), so it records chunks, not
//! paths: no mapping from paths back to extents, and exactly the bytes the
//! workload touched. A list only changes the order of fetches: every chunk
//! is still checked against the index.

use std::collections::HashSet;

pub use hyperbox_registry::prefetch::{MAX_AHEAD, Store, merge};

/// The order as fetches: runs of chunks adjacent in both the order and the
/// file (at most `most` each), in order of first read.
pub fn runs(order: &[usize], most: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &c in order {
        match runs.last_mut() {
            Some((a, b)) if c == *b + 1 && c - *a < most.max(1) => *b = c,
            _ => runs.push((c, c)),
        }
    }
    runs
}

/// The chunks a layer's reads waited for, in first-read order.
#[derive(Debug, Default)]
pub struct Recorder {
    seen: HashSet<usize>,
    order: Vec<usize>,
}

impl Recorder {
    /// Notes a read of chunks `first..=last`.
    pub fn note(&mut self, first: usize, last: usize) {
        for c in first..=last {
            if self.seen.insert(c) {
                self.order.push(c);
            }
        }
    }

    /// What was noted, in order.
    pub fn order(&self) -> &[usize] {
        &self.order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_recorded_in_first_read_order() {
        let mut r = Recorder::default();
        r.note(5, 6);
        r.note(0, 0);
        r.note(6, 7);
        assert_eq!(r.order(), [5, 6, 0, 7]);
    }

    #[test]
    fn adjacent_chunks_in_read_order_are_one_fetch() {
        assert_eq!(runs(&[], 4), vec![]);
        assert_eq!(
            runs(&[5, 6, 7, 0, 1, 9, 8], 4),
            vec![(5, 7), (0, 1), (9, 9), (8, 8)]
        );
        assert_eq!(runs(&[0, 1, 2, 3, 4], 2), vec![(0, 1), (2, 3), (4, 4)]);
    }
}
