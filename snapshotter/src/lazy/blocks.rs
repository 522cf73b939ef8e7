//! Block digests (index version 4): a layer whose index entry names a
//! block table is tracked, fetched and verified per 4 KiB block, not per
//! chunk. A chunk's digest in the index is the digest of its blocks'
//! digests ([`chunk_of_blocks`]), so:
//!
//! - a read's blocks are checked against the table entries of their
//!   chunks, fetched by Range beside the read's layer bytes and checked
//!   against the chunk digests first ([`Lazy::ensure_digests`]): a read of
//!   a small file costs its own compressed bytes, not those of the 16 KiB
//!   or more of neighbours a chunk holds, which on a gzip layer may be
//!   scattered far apart;
//! - bytes that make a whole chunk are checked by their own blocks'
//!   digests, without the table ([`Blob::put_chunk_whole`]): the fill from
//!   the layer's download, the check of a complete copy, a restart, and a
//!   read whose table entries could not be had.
//!
//! Entries are kept in memory only; after a restart the blocks of a chunk
//! not wholly present are fetched again.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use hyperbox_registry::digest::Digest;
use hyperbox_registry::index::{BLOCK, BlockTable, block_digests, chunk_of_blocks};
use sha2::{Digest as _, Sha256};

use super::blob::Blob;
use super::{Error, Lazy, io, lock};

/// One chunk's blocks' digests.
type Entries = Arc<[[u8; 32]]>;

/// A layer's block table as far as it is known here.
#[derive(Debug)]
pub(super) struct Blocks {
    table: Digest,
    /// Blocks per chunk.
    pub(super) per_chunk: usize,
    /// Per chunk, its blocks' digests once checked.
    known: Mutex<Vec<Option<Entries>>>,
    /// Per chunk: one fetch of its entries at a time, and a write of its
    /// blocks waits for a fetch in flight.
    locks: Vec<tokio::sync::Mutex<()>>,
}

impl Blocks {
    pub(super) fn new(t: &BlockTable, chunk_size: u64, chunks: usize) -> Result<Blocks, Error> {
        let table = Digest::parse(&t.digest).map_err(|source| Error::Registry {
            what: t.digest.clone(),
            source,
        })?;
        Ok(Blocks {
            table,
            per_chunk: (chunk_size / BLOCK) as usize,
            known: Mutex::new(vec![None; chunks]),
            locks: (0..chunks).map(|_| tokio::sync::Mutex::new(())).collect(),
        })
    }

    fn known(&self, chunk: usize) -> Option<Entries> {
        lock(&self.known)[chunk].clone()
    }
}

impl Blob {
    /// The chunk (in the index's sense) unit `i` belongs to.
    pub(super) fn chunk_of(&self, i: usize) -> usize {
        self.blocks.as_ref().map_or(i, |b| i / b.per_chunk)
    }

    /// The units of chunk `c`.
    pub(super) fn units_of(&self, c: usize) -> std::ops::Range<usize> {
        let per = self.blocks.as_ref().map_or(1, |b| b.per_chunk);
        c * per..((c + 1) * per).min(self.locks.len())
    }

    /// The bytes of chunk `c`: offset and length.
    pub(super) fn whole_chunk_range(&self, c: usize) -> (u64, u64) {
        let cs = self.state.chunk_size;
        let start = c as u64 * cs;
        (start, cs.min(self.state.entry.size - start))
    }

    /// Whether unit `i` can be checked now: always, but for a block whose
    /// chunk's table entries are not here.
    pub(super) fn can_check(&self, i: usize) -> bool {
        self.blocks
            .as_ref()
            .is_none_or(|b| b.known(i / b.per_chunk).is_some())
    }

    /// Whether `piece` is unit `i`'s bytes; `None` when its digest is not
    /// known here yet.
    pub(super) fn check(&self, i: usize, piece: &[u8]) -> Option<bool> {
        match &self.blocks {
            None => Some(hex::encode(Sha256::digest(piece)) == self.state.entry.chunks[i]),
            Some(b) => {
                let known = b.known(i / b.per_chunk)?;
                Some(<[u8; 32]>::from(Sha256::digest(piece)) == known[i % b.per_chunk])
            }
        }
    }

    /// Whether `bytes` are chunk `c`'s, by its own bytes or its blocks'.
    /// Under a block table its blocks' digests are known from then on.
    pub(super) fn chunk_matches(&self, c: usize, bytes: &[u8]) -> bool {
        let want = &self.state.entry.chunks[c];
        match &self.blocks {
            None => &hex::encode(Sha256::digest(bytes)) == want,
            Some(b) => {
                let digests = block_digests(bytes);
                let ok = &chunk_of_blocks(&digests) == want;
                if ok {
                    lock(&b.known)[c] = Some(digests.into());
                }
                ok
            }
        }
    }

    /// Writes the units of chunk `c` still missing from `bytes`, the
    /// whole chunk, checked by the caller; how many.
    pub(super) fn fill_chunk(&self, c: usize, bytes: &[u8]) -> Result<usize, Error> {
        let (start, _) = self.whole_chunk_range(c);
        let mut written = 0;
        for i in self.units_of(c) {
            if lock(&self.present)[i] {
                continue;
            }
            let (s, len) = self.chunk_range(i);
            let at = (s - start) as usize;
            self.write_unit(i, &bytes[at..at + len as usize])?;
            written += 1;
        }
        Ok(written)
    }

    /// Checks `bytes`, the whole of chunk `c`, against its digest and
    /// writes the units of it still missing; `false` when they are not its
    /// bytes.
    pub(super) fn put_chunk_whole(&self, c: usize, bytes: &[u8]) -> Result<bool, Error> {
        if !self.chunk_matches(c, bytes) {
            return Ok(false);
        }
        self.fill_chunk(c, bytes)?;
        Ok(true)
    }

    /// Writes unit `i`, checked by the caller.
    pub(super) fn write_unit(&self, i: usize, piece: &[u8]) -> Result<(), Error> {
        let (s, _) = self.chunk_range(i);
        self.file
            .write_all_at(piece, s)
            .map_err(io("write", &self.path))?;
        self.have_file
            .write_all_at(&[1], i as u64)
            .map_err(io("write", &self.have_path))?;
        lock(&self.present)[i] = true;
        Ok(())
    }

    /// After a restart: which units recorded in `have` hold their bytes.
    /// Under a block table only chunks wholly recorded are kept (checked by
    /// their blocks' digests); entries of the others were not kept.
    pub(super) fn recheck(&self, have: &[u8]) -> Result<Vec<bool>, Error> {
        let n = self.locks.len();
        let mut present = vec![false; n];
        let chunks = self.state.entry.chunks.len();
        let mut buf = vec![0u8; self.state.chunk_size as usize];
        for c in 0..chunks {
            let units = self.units_of(c);
            if !have[units.clone()].iter().all(|h| *h == 1) {
                continue;
            }
            let (start, len) = self.whole_chunk_range(c);
            let piece = &mut buf[..len as usize];
            self.file
                .read_exact_at(piece, start)
                .map_err(io("read", &self.path))?;
            if self.chunk_matches(c, piece) {
                present[units].fill(true);
            }
        }
        Ok(present)
    }
}

impl Lazy {
    /// Makes the block digests of units `a..=b` known where they are
    /// needed: in the chunks at either end of the run that it covers only
    /// in part (a chunk it covers whole is checked by its own blocks). The
    /// entries of each come in a Range request, checked against the
    /// chunk's digest. Nothing to do without a block table.
    pub(super) async fn ensure_digests(
        &self,
        blob: &Blob,
        a: usize,
        b: usize,
    ) -> Result<(), Error> {
        let Some(t) = &blob.blocks else {
            return Ok(());
        };
        let mut ends = vec![a / t.per_chunk, b / t.per_chunk];
        ends.dedup();
        let mut guards = Vec::new();
        for c in ends {
            let units = blob.units_of(c);
            let covered = units.start >= a && units.end - 1 <= b;
            if !covered && t.known(c).is_none() {
                guards.push((c, t.locks[c].lock().await));
            }
        }
        let fetched = futures::future::join_all(
            guards
                .iter()
                // Fetched meanwhile by the request we waited for.
                .filter(|(c, _)| t.known(*c).is_none())
                .map(|(c, _)| self.fetch_digests(blob, t, *c)),
        )
        .await;
        drop(guards);
        fetched.into_iter().collect()
    }

    /// The table entries of chunk `c`, checked against its digest.
    async fn fetch_digests(&self, blob: &Blob, t: &Blocks, c: usize) -> Result<(), Error> {
        let units = blob.units_of(c);
        let from = units.start as u64 * 32;
        let len = units.len() as u64 * 32;
        let mismatch = || {
            self.counters
                .block_table_failures
                .fetch_add(1, Ordering::Relaxed);
            Error::Blocks {
                erofs: blob.erofs.to_string(),
                chunk: c,
            }
        };
        // No fetch permit: the entries go with a request for the blocks'
        // bytes, which holds one, and waiting for a second would put a
        // round trip of the link's latency behind every read.
        let bytes = self
            .registry
            .fetch_range(&blob.reference, &t.table, from, len)
            .await
            .map_err(|source| Error::Registry {
                what: format!("{} block digests of chunk {c}", blob.erofs),
                source,
            })?;
        self.counters
            .block_table_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if bytes.len() as u64 != len {
            return Err(mismatch());
        }
        let digests: Vec<[u8; 32]> = bytes
            .chunks_exact(32)
            .map(|d| d.try_into().expect("32 bytes"))
            .collect();
        if chunk_of_blocks(&digests) != blob.state.entry.chunks[c] {
            return Err(mismatch());
        }
        lock(&t.known)[c] = Some(digests.into());
        Ok(())
    }

    /// Waits for a fetch of the table entries of units `a..=b` in flight.
    pub(super) async fn digests_settled(&self, blob: &Blob, a: usize, b: usize) {
        if let Some(t) = &blob.blocks {
            for c in [a / t.per_chunk, b / t.per_chunk] {
                if t.known(c).is_none() {
                    drop(t.locks[c].lock().await);
                }
            }
        }
    }
}
