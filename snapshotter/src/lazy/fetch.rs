//! Range requests for chunks: every run of adjacent missing chunks in
//! one request, each chunk checked against its digest before it is written.
//! Layers whose index names a layer map make their chunks from the layer
//! blob instead (`mapped`).

use std::sync::atomic::Ordering;

use super::blob::{Blob, missing_runs};
use super::{Error, Lazy, lock};

impl Blob {
    /// Writes unit `i` if `piece` matches its digest; `false` if not, or
    /// if its digest is not known here (a block whose table entries were
    /// not fetched).
    pub(super) fn put_chunk(&self, i: usize, piece: &[u8]) -> Result<bool, Error> {
        if self.check(i, piece) != Some(true) {
            return Ok(false);
        }
        self.write_unit(i, piece)?;
        Ok(true)
    }
}

/// The most bytes one Range request asks for (a large read or the
/// metadata of a big layer is split, the pieces fetched at once).
pub(super) const MAX_REQUEST: u64 = 4 << 20;

impl Lazy {
    /// The ranges the kernel reads without events (superblock block,
    /// directories, inodes, xattrs): they must be in before the mount.
    pub(super) async fn fetch_metadata(&self, blob: &Blob) -> Result<(), Error> {
        let e = &blob.state.entry;
        // At once: each may need a request of its own (block table entries
        // of a chunk the range covers in part), and the pull waits for them.
        let (first, rest) = futures::future::join(
            self.ensure_range(blob, 0, 4096),
            self.ensure_range(blob, e.data_end, e.size - e.data_end),
        )
        .await;
        first.and(rest)
    }

    /// Fetches the missing chunks of `first..=last`: each run of adjacent
    /// missing chunks in one Range request (at most [`MAX_REQUEST`]
    /// bytes), every chunk checked against its digest before it is
    /// written. Chunk locks are taken in ascending order by every caller,
    /// so two overlapping calls never wait on each other in a cycle.
    pub(super) async fn ensure_chunks(
        &self,
        blob: &Blob,
        first: usize,
        last: usize,
    ) -> Result<(), Error> {
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
    pub(super) async fn fetch_run(&self, blob: &Blob, a: usize, b: usize) -> Result<(), Error> {
        if blob.state.entry.map.is_some() {
            return self.fetch_mapped(blob, a, b).await;
        }
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
            if !blob.put_chunk(i, &data[at..at + len as usize])? {
                self.counters.chunk_failures.fetch_add(1, Ordering::Relaxed);
                failed.get_or_insert(Error::Chunk {
                    erofs: blob.erofs.to_string(),
                    chunk: i,
                });
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Fetches what a held read needs, counted as demand while it runs.
    pub(super) async fn ensure_range(
        &self,
        blob: &Blob,
        offset: u64,
        count: u64,
    ) -> Result<(), Error> {
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
}
