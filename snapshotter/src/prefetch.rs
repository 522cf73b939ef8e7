//! Prefetch learned from real runs: the order in which containers first
//! read a lazy layer's chunks, kept per EROFS image on the node and fetched
//! first, in parallel, the next time that layer is pulled lazily.
//!
//! The lazy path sees every read a container waits for (a held read names
//! its file range, mmapped pages included), so it records chunks, not
//! paths: no mapping from paths back to extents, and exactly the bytes the
//! workload touched. A list is bound to one EROFS image (its digest names
//! the file) and one chunk size, so it can never point into other bytes;
//! it only changes the order of fetches, every chunk is still checked
//! against the index.
//!
//! Lists live in `<root>/prefetch/<erofs hex>-<chunk size>.json` (two
//! indexes of one EROFS image with different chunk sizes keep a list each
//! instead of overwriting each other's), written whole to a temporary file
//! and renamed. A list that cannot be read is ignored (and
//! replaced at the next save), never fatal: without it the layer is filled
//! in file order as before.

use std::collections::HashSet;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Lists larger than this are not read (a list holds one number per chunk
/// read; 4 MiB is far above any real one).
const MAX_FILE: u64 = 4 << 20;
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    chunk_size: u64,
    /// Chunk numbers in first-read order, merged over runs.
    chunks: Vec<usize>,
}

/// The node's learned lists.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The lists under `<root>/prefetch`, created if missing.
    pub fn open(root: &Path) -> std::io::Result<Store> {
        let dir = root.join("prefetch");
        fs::create_dir_all(&dir)?;
        // Temporary files of saves a crash cut short.
        for e in fs::read_dir(&dir)?.flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(Store { dir })
    }

    fn path(&self, erofs: &str, chunk_size: u64) -> PathBuf {
        let hex = erofs.strip_prefix("sha256:").unwrap_or(erofs);
        self.dir.join(format!("{hex}-{chunk_size}.json"))
    }

    /// The learned order for the EROFS image `erofs` read in chunks of
    /// `chunk_size`, of which it has `chunks`; empty when none was learned
    /// or the list does not fit this layer.
    pub fn load(&self, erofs: &str, chunk_size: u64, chunks: usize) -> Vec<usize> {
        let path = self.path(erofs, chunk_size);
        let read = || -> Result<Vec<usize>, String> {
            let meta = match fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e.to_string()),
            };
            if meta.len() > MAX_FILE {
                return Err(format!("{} bytes, more than {MAX_FILE}", meta.len()));
            }
            let text = fs::read(&path).map_err(|e| e.to_string())?;
            let f: File = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
            if f.version != VERSION || f.chunk_size != chunk_size {
                return Ok(Vec::new());
            }
            if let Some(bad) = f.chunks.iter().find(|c| **c >= chunks) {
                return Err(format!("chunk {bad} of a layer of {chunks}"));
            }
            Ok(f.chunks)
        };
        read().unwrap_or_else(|why| {
            tracing::warn!(file = %path.display(), why, "learned prefetch list ignored");
            Vec::new()
        })
    }

    /// Merges `learned` (chunk numbers in first-read order) into the list
    /// of `erofs`: what was learned before keeps its place, new chunks go
    /// after it.
    pub fn save(
        &self,
        erofs: &str,
        chunk_size: u64,
        chunks: usize,
        learned: &[usize],
    ) -> std::io::Result<usize> {
        let mut order = self.load(erofs, chunk_size, chunks);
        let mut seen: HashSet<usize> = order.iter().copied().collect();
        order.extend(
            learned
                .iter()
                .copied()
                .filter(|c| *c < chunks && seen.insert(*c)),
        );
        let path = self.path(erofs, chunk_size);
        // Two layers may share one EROFS image (the same tar, compressed
        // twice): their saves never write the same temporary file.
        let tmp = path.with_extension(format!("{:016x}.tmp", rand::random::<u64>()));
        let mut f = fs::File::create(&tmp)?;
        serde_json::to_writer(
            &mut f,
            &File {
                version: VERSION,
                chunk_size,
                chunks: order.clone(),
            },
        )?;
        f.flush()?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        if let Ok(d) = fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(order.len())
    }
}

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

    const E: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn lists_merge_over_runs_keeping_first_reads_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert!(s.load(E, 4096, 10).is_empty(), "nothing learned yet");
        let mut r = Recorder::default();
        r.note(5, 6);
        r.note(0, 0);
        r.note(6, 7);
        assert_eq!(r.order(), [5, 6, 0, 7]);
        assert_eq!(s.save(E, 4096, 10, r.order()).unwrap(), 4);
        assert_eq!(s.save(E, 4096, 10, &[9, 0, 3]).unwrap(), 6);
        assert_eq!(s.load(E, 4096, 10), [5, 6, 0, 7, 9, 3]);
        // Another chunk size: not this list, and a list of its own.
        assert!(s.load(E, 8192, 10).is_empty());
        s.save(E, 8192, 10, &[1]).unwrap();
        assert_eq!(s.load(E, 4096, 10), [5, 6, 0, 7, 9, 3]);
        assert_eq!(s.load(E, 8192, 10), [1]);
    }

    #[test]
    fn a_list_that_does_not_fit_the_layer_is_ignored_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.save(E, 4096, 10, &[1, 9]).unwrap();
        assert!(s.load(E, 4096, 5).is_empty(), "chunk 9 of 5");
        fs::write(s.path(E, 4096), b"{not json").unwrap();
        assert!(s.load(E, 4096, 10).is_empty());
        // Saving over it starts a fresh list.
        assert_eq!(s.save(E, 4096, 10, &[2]).unwrap(), 1);
        assert_eq!(s.load(E, 4096, 10), [2]);
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
