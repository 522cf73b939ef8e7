//! Chunks made from the image's own layer blob (index version 3): the
//! layer map says which tar bytes each range of the EROFS image holds, and
//! for gzip where inflating may start ([`hyperbox_erofs::map`]). No EROFS
//! blob is in the registry; a run of chunks costs one Range request on the
//! layer (its compressed bytes from the checkpoint before it to the one
//! after it) and, the first time that checkpoint is used, one for its
//! window.
//!
//! A checkpoint's whole span is inflated whatever part a read asked for:
//! its bytes were fetched anyway, so every chunk they fully make is
//! written too (checked against its digest like any other). A program
//! reading the files of one directory one by one, as an interpreter's
//! imports do, then costs one request per span instead of one per file
//! each re-fetching the span's start. Requests starting from the same
//! checkpoint wait for each other for the same reason.
//!
//! The map is fetched at the layer's first fetch (the metadata, at
//! Prepare) and checked against the index entry; nothing in it is trusted
//! beyond that: a chunk it makes wrongly fails its digest.
//!
//! When the prefetch lists shared beside the index came with checkpoints
//! learned for this layer blob (`hyperbox_erofs::learned`: one before each
//! cluster of what earlier runs read), they are merged into the map's, so
//! a small file between two of the map's checkpoints is inflated from
//! near its own bytes. They are trusted even less: a request that fails
//! from a learned checkpoint (bytes that do not inflate or do not verify)
//! is made again from the map's checkpoint before it, and that learned
//! checkpoint is not used again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hyperbox_erofs::map::{LayerMap, Need, Point};
use hyperbox_erofs::zran;
use hyperbox_registry::digest::Digest;

use super::blob::Blob;
use super::fill::Download;
use super::staged::{self, Staged, WAIT_AT_MOST};
use super::{Error, Lazy, Phase, lock};

/// The most tar bytes one request inflates, and the most compressed bytes
/// it fetches: a span `hb image index` makes is about 1 MiB, a request at
/// most 4 MiB; a map whose checkpoints are further apart than this is not
/// one hb made, and its reads fail rather than fetch a whole layer.
const MAX_REGION: u64 = 32 << 20;
/// The most compressed bytes a resume point keeps.
const MAX_TAIL: u64 = 1 << 20;
/// Windows, and resume points, kept in memory per layer (each at most 32
/// KiB).
const WINDOWS_KEPT: usize = 64;

/// A layer's map, once fetched.
#[derive(Debug)]
pub(super) struct Mapped {
    pub(super) map: LayerMap,
    layer: Digest,
    /// The map blob and its size.
    map_blob: (Digest, u64),
    windows: std::sync::Mutex<HashMap<usize, Arc<Vec<u8>>>>,
    /// The learned checkpoints' blob and its size: the windows of the
    /// map's points marked `learned` are there.
    learned_blob: Option<(Digest, u64)>,
    /// Learned checkpoints a request failed from.
    dead: std::sync::Mutex<HashSet<usize>>,
    /// Per checkpoint in use: requests from the same one take turns.
    spans: std::sync::Mutex<HashMap<usize, Arc<tokio::sync::Mutex<()>>>>,
    /// Per checkpoint, where the last request from it stopped (a block
    /// boundary with its window), at most [`WINDOWS_KEPT`] at once.
    resumes: std::sync::Mutex<HashMap<usize, Arc<Resume>>>,
    /// The layer's own download on this node, which reads take their
    /// bytes from when it has them.
    pub(super) staged: Staged,
}

impl Mapped {
    /// The checkpoint a request for tar bytes up to `tar_end` starts from:
    /// `i` (the last at or before its bytes that serves them) or, when `i`
    /// is a learned checkpoint a request failed from, the last one before
    /// it that is not and serves them.
    fn start_for(&self, i: usize, tar_end: u64) -> usize {
        let dead = lock(&self.dead);
        (0..=i)
            .rev()
            .find(|&j| {
                let p = &self.map.points[j];
                (!p.learned || !dead.contains(&j)) && p.serves(tar_end)
            })
            .expect("the map's first checkpoint is its own")
    }
}

fn bad(blob: &Blob, why: impl std::fmt::Display) -> Error {
    Error::Map {
        erofs: blob.erofs.to_string(),
        why: why.to_string(),
    }
}

/// Where the compressed bytes `need` asks for likely end, reading from
/// tar offset `from` (compressed at `from_in`: the checkpoint `p`, or where
/// the last request stopped): the span's own compression ratio, plus a
/// margin (a span is rarely uniform: text, then a shared library). From
/// one of the map's checkpoints the margin is an eighth of the span and
/// 32 KiB: what it brings past the data is made too, and a neighbour's
/// read often wants it. From a `learned` one it is an eighth of the data
/// and 8 KiB: the checkpoint starts a cluster of known reads, the next
/// cluster has its own, and a margin per cluster as wide as the span's
/// fetched most of the layer on an image whose runs read 1,000 scattered
/// small files (73 MiB by the workload's exit for 24 MiB of files).
///
/// A learned checkpoint with a [`Stretch`](hyperbox_erofs::map::Stretch)
/// says exactly where its
/// cluster's compressed bytes end: a request for the cluster fetches that
/// far and no margin, one for part of it is estimated from the cluster's
/// own ratio and never goes past it, and one running past it (read-ahead)
/// adds an estimate for the rest from there.
fn estimate_end(p: &Point, need: &Need, (from, from_in): (u64, u64), learned: bool) -> u64 {
    let estimate = |(from, from_in): (u64, u64), (span_in, span_out): (u64, u64)| {
        let ratio = span_in as f64 / span_out.max(1) as f64;
        let want = (need.tar_end.saturating_sub(from) as f64 * ratio) as u64;
        let wide = (span_in / 8).saturating_add(32 << 10);
        let margin = if learned {
            wide.min((want / 8).saturating_add(8 << 10))
        } else {
            wide
        };
        // Saturating: a map's numbers are bounded, but its ratio is not.
        from_in
            .saturating_add(want)
            .saturating_add(margin)
            .min(need.blob_end)
    };
    match p.stretch {
        Some(s) if from <= s.output && need.tar_end <= s.output => {
            estimate((from, from_in), (s.input - p.input, s.output - p.output)).min(s.input)
        }
        // Never past the map's next own checkpoint (`estimate` bounds it),
        // whatever a stretch says.
        Some(s) if from <= s.output => estimate(
            (s.output, s.input),
            (
                need.blob_end.saturating_sub(s.input),
                need.end_output.saturating_sub(s.output),
            ),
        ),
        _ => estimate(
            (from, from_in),
            (
                need.blob_end.saturating_sub(p.input),
                need.end_output.saturating_sub(p.output),
            ),
        ),
    }
}

/// Where a request stopped: the last block boundary before the first chunk
/// it did not make, and the compressed bytes it had fetched from there on
/// (the next request fetches only what follows them).
#[derive(Debug)]
struct Resume {
    point: zran::Checkpoint,
    tail: Vec<u8>,
}

/// Where one attempt of a request may take layer bytes, and whether it
/// took any from the download on the node.
struct Via {
    registry_only: bool,
    used: std::sync::atomic::AtomicBool,
    /// It went on from a resume point (not its checkpoint).
    resumed: std::sync::atomic::AtomicBool,
}

impl Via {
    fn new(registry_only: bool) -> Via {
        Via {
            registry_only,
            used: Default::default(),
            resumed: Default::default(),
        }
    }

    fn used_download(&self) -> bool {
        self.used.load(Ordering::Relaxed)
    }
}

/// A block's header bits and their count, for a learned checkpoint inside
/// a deflate block.
type Header = Arc<(Vec<u8>, u32)>;

/// What one inflate made: the tar bytes from where it started, and the
/// block boundaries it passed.
struct Made {
    tar: Vec<u8>,
    extracted: zran::Extracted,
}

impl Lazy {
    /// The layer map of `blob`, fetched the first time.
    pub(super) async fn mapped(&self, blob: &Blob) -> Result<Arc<Mapped>, Error> {
        blob.mapped
            .get_or_try_init(|| async {
                let e = &blob.state.entry;
                let m = e.map.as_ref().expect("only mapped layers come here");
                let digest = Digest::parse(&m.digest).map_err(|e| bad(blob, e))?;
                let layer = Digest::parse(&e.layer).map_err(|e| bad(blob, e))?;
                let eager = {
                    let _permit = self.fetches.acquire().await.expect("never closed");
                    self.registry
                        .fetch_range(&blob.reference, &digest, 0, m.eager)
                        .await
                }
                .map_err(|source| Error::Registry {
                    what: format!("{} layer map {digest}", blob.erofs),
                    source,
                })?;
                // Decoding is CPU work on untrusted bytes (a zstd frame of
                // up to 256 MiB): off the runtime's workers.
                let map = tokio::task::spawn_blocking(move || LayerMap::decode(&eager))
                    .await
                    .expect("decode does not panic")
                    .map_err(|e| bad(blob, e))?;
                if map.image_size != e.size || map.data_end != e.data_end {
                    return Err(bad(
                        blob,
                        format!(
                            "map describes an image of {} bytes (data end {}), the index {} ({})",
                            map.image_size, map.data_end, e.size, e.data_end
                        ),
                    ));
                }
                let mut map = map;
                let own = map.points.len();
                let learned_blob = match self.learned_points(blob, &map).await {
                    Some((points, d)) => {
                        map.merge_learned(points);
                        Some(d)
                    }
                    None => None,
                };
                tracing::debug!(erofs = %blob.erofs, points = own, learned = map.points.len() - own, extents = map.extents.len(), "layer map fetched");
                Ok(Arc::new(Mapped {
                    spans: Default::default(),
                    map,
                    layer,
                    map_blob: (digest, m.size),
                    windows: Default::default(),
                    resumes: Default::default(),
                    learned_blob,
                    dead: Default::default(),
                    staged: Default::default(),
                }))
            })
            .await
            .cloned()
    }

    /// The checkpoints learned for `blob`'s layer, shared beside the index
    /// it was pulled through, and the blob holding their windows; `None`
    /// when none were shared or they cannot be read (they only speed reads
    /// up).
    async fn learned_points(
        &self,
        blob: &Blob,
        map: &LayerMap,
    ) -> Option<(Vec<Point>, (Digest, u64))> {
        let p = blob.shared()?.points.as_ref()?;
        if p.layer != blob.state.entry.layer || map.source != hyperbox_erofs::map::Source::Gzip {
            return None;
        }
        let read = async {
            let digest = Digest::parse(&p.digest).map_err(|e| e.to_string())?;
            if p.eager > hyperbox_erofs::learned::MAX_EAGER + 16 {
                return Err(format!("eager part of {} bytes", p.eager));
            }
            let eager = {
                let _permit = self.fetches.acquire().await.expect("never closed");
                self.registry
                    .fetch_range(&blob.reference, &digest, 0, p.eager)
                    .await
            }
            .map_err(|e| hyperbox_api::error_chain(&e))?;
            let bounds = map.bounds();
            let points = tokio::task::spawn_blocking(move || {
                hyperbox_erofs::learned::decode(&eager, bounds)
            })
            .await
            .expect("decode does not panic")
            .map_err(|e| e.to_string())?;
            Ok::<_, String>((points, (digest, p.size)))
        };
        match read.await {
            Ok(r) => Some(r),
            Err(why) => {
                tracing::warn!(erofs = %blob.erofs, points = p.digest, why, "learned checkpoints not used; reads start from the map's");
                None
            }
        }
    }

    /// The window of checkpoint `i`.
    async fn window(&self, blob: &Blob, m: &Mapped, i: usize) -> Result<Arc<Vec<u8>>, Error> {
        if let Some(w) = lock(&m.windows).get(&i) {
            return Ok(w.clone());
        }
        let p = &m.map.points[i];
        if p.window_zlen == 0 {
            return Ok(Arc::new(Vec::new()));
        }
        let (from, size) = match (&m.learned_blob, p.learned) {
            (Some(d), true) => d,
            _ => &m.map_blob,
        };
        if p.window_at.saturating_add(p.window_zlen.into()) > *size {
            return Err(bad(blob, format!("checkpoint {i}: window past its blob")));
        }
        let z = {
            let _permit = self.fetches.acquire().await.expect("never closed");
            self.registry
                .fetch_range(&blob.reference, from, p.window_at, p.window_zlen.into())
                .await
        }
        .map_err(|source| {
            if p.learned {
                // Not the registry's failure to serve the layer: the
                // request falls back to the map's own checkpoint.
                bad(blob, format!("learned window {i}: {source}"))
            } else {
                Error::Registry {
                    what: format!("{} window {i}", blob.erofs),
                    source,
                }
            }
        })?;
        self.counters
            .window_bytes
            .fetch_add(z.len() as u64, Ordering::Relaxed);
        let w = Arc::new(
            p.decode_window(&z)
                .map_err(|e| bad(blob, format!("checkpoint {i}: {e}")))?,
        );
        let mut kept = lock(&m.windows);
        if kept.len() >= WINDOWS_KEPT {
            kept.clear();
        }
        kept.insert(i, w.clone());
        Ok(w)
    }

    /// Units `a..=b` made from the layer blob; with them every other
    /// missing unit the inflated bytes make. Reads call it holding the
    /// units' locks; a learned prefetch group does not (what is written
    /// is verified, and a read holding one of them finds it present).
    /// Under a block table the table entries the units need come in a
    /// request of their own beside the layer bytes; when they cannot be
    /// had, the units' whole chunks are made and checked by their own
    /// blocks instead.
    pub(super) async fn fetch_mapped(&self, blob: &Blob, a: usize, b: usize) -> Result<(), Error> {
        if blob.blocks.is_none() {
            return self.fetch_units(blob, a, b).await;
        }
        let (digests, done) = futures::future::join(
            self.ensure_digests(blob, a, b),
            self.fetch_units(blob, a, b),
        )
        .await;
        match (digests, done) {
            (Err(e), Err(_)) => {
                tracing::warn!(erofs = %blob.erofs, error = %hyperbox_api::error_chain(&e), "block digests not had; reading whole chunks");
                let wa = blob.units_of(blob.chunk_of(a)).start;
                let wb = blob.units_of(blob.chunk_of(b)).end - 1;
                self.fetch_units(blob, wa, wb).await
            }
            (_, done) => done,
        }
    }

    async fn fetch_units(&self, blob: &Blob, a: usize, b: usize) -> Result<(), Error> {
        let m = self.mapped(blob).await?;
        let (start, _) = blob.chunk_range(a);
        let (last_start, last_len) = blob.chunk_range(b);
        let end = last_start + last_len;
        let Some(need) = m.map.need(start, end - start) else {
            // Metadata and zeros only: nothing to fetch.
            return self.put_chunks(blob, &m.map, a, b, 0, &[]).await;
        };
        let Some(i) = need.point else {
            if need.blob_end - need.blob_start > MAX_REGION {
                return Err(bad(blob, "a request beyond what one fetch may bring"));
            }
            // Bytes from the download on the node that do not verify: once
            // more from the registry.
            for registry_only in [false, true] {
                let via = Via::new(registry_only);
                let tar = self
                    .fetch_layer(blob, &m, need.blob_start, need.blob_end, &via)
                    .await?;
                let done = self
                    .put_chunks(blob, &m.map, a, b, need.tar_start, &tar)
                    .await;
                if done.is_err() && via.used_download() && !registry_only {
                    continue;
                }
                if done.is_ok() && registry_only {
                    self.distrust_download(blob, &m);
                }
                return done;
            }
            unreachable!("the registry's attempt returns");
        };
        let mut i = m.start_for(i, need.tar_end);
        // Bytes that do not inflate or verify: from a resume point (kept by
        // an earlier request, perhaps one from a learned checkpoint), the
        // request is made again from the checkpoint itself; from a learned
        // checkpoint, from the map's own before it. Other failures (the
        // registry, the disk) are the request's.
        let mut attempts = 0;
        let mut registry_only = false;
        loop {
            attempts += 1;
            let via = Via::new(registry_only);
            let done = self
                .fetch_from_point(blob, &m, &need, (a, b), i, &via)
                .await;
            let resumed = via.resumed.load(Ordering::Relaxed);
            let bad_bytes = matches!(done, Err(Error::Map { .. } | Error::Chunk { .. }));
            match done {
                // Bytes from the download on the node that did not inflate
                // or verify: made again from the registry's.
                Err(_) if bad_bytes && via.used_download() && !registry_only => {
                    registry_only = true;
                }
                Err(_) if bad_bytes && resumed && attempts < 3 => {}
                Err(e) if bad_bytes && m.map.points[i].learned => {
                    // Requests that waited for the failed one find it dead.
                    if lock(&m.dead).insert(i) {
                        self.counters
                            .learned_point_failures
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(erofs = %blob.erofs, checkpoint = i, error = %hyperbox_api::error_chain(&e), "a learned checkpoint failed; reading from the map's");
                    }
                    i = (0..i)
                        .rev()
                        .find(|j| !m.map.points[*j].learned)
                        .expect("the map's first checkpoint is its own");
                }
                done => {
                    if done.is_ok() && registry_only {
                        self.distrust_download(blob, &m);
                    }
                    return done;
                }
            }
        }
    }

    /// The registry made what the download on the node could not: its
    /// bytes are not the layer's (it will fail its digest), and are not
    /// read again.
    fn distrust_download(&self, blob: &Blob, m: &Mapped) {
        if m.staged.release() {
            tracing::warn!(erofs = %blob.erofs, "layer bytes from the download on this node did not inflate or verify; reading from the registry");
        }
    }

    /// Chunks `a..=b` (with every other missing one the bytes make), the
    /// tar bytes `need` names inflated from checkpoint `i`, its layer
    /// bytes taken as `via` says.
    async fn fetch_from_point(
        &self,
        blob: &Blob,
        m: &Arc<Mapped>,
        need: &Need,
        (a, b): (usize, usize),
        i: usize,
        via: &Via,
    ) -> Result<(), Error> {
        let turn = lock(&m.spans).entry(i).or_default().clone();
        let _turn = turn.lock().await;
        if m.map.points[i].learned && lock(&m.dead).contains(&i) {
            return Err(bad(blob, "a learned checkpoint that failed"));
        }
        // The request before ours from this checkpoint may have made ours.
        if lock(&blob.present)[a..=b].iter().all(|p| *p) {
            return Ok(());
        }
        let p = &m.map.points[i];
        if need.tar_end - p.output > MAX_REGION || need.blob_end - p.fetch_from() > MAX_REGION {
            return Err(bad(blob, "checkpoints too far apart for one fetch"));
        }
        // Where the last request from this checkpoint stopped, if that is
        // before our bytes: nothing before it is fetched again.
        let resumed = lock(&m.resumes)
            .get(&i)
            .filter(|r| r.point.output <= need.tar_start)
            .cloned();
        let (start, start_at) = match &resumed {
            Some(r) => (r.point.output, r.point.fetch_from()),
            None => (p.output, p.fetch_from()),
        };
        via.resumed.store(resumed.is_some(), Ordering::Relaxed);
        // A resume point's place comes from the bytes of an earlier
        // request, perhaps one from a learned checkpoint: bounded again.
        if need.blob_end.saturating_sub(start_at) > MAX_REGION {
            lock(&m.resumes).remove(&i);
            return Err(bad(blob, "a resume point too far from the data"));
        }
        // The compressed bytes up to the data's end, estimated from the
        // span's ratio with a margin, rather than the whole span: a read
        // early in a span then costs little more than its own bytes. When
        // the estimate falls short, as much again follows until it does not.
        let guess = estimate_end(p, need, (start, start_at), m.map.points[i].learned);
        if resumed.is_none() && m.map.points[i].learned {
            self.counters
                .learned_point_requests
                .fetch_add(1, Ordering::Relaxed);
        }
        // A learned checkpoint inside a deflate block comes with its
        // block's header, first in its window's frame.
        let (checkpoint, header, mut data) = match &resumed {
            Some(r) => {
                let have = start_at + r.tail.len() as u64;
                let mut data = r.tail.clone();
                if guess > have {
                    data.extend_from_slice(&self.fetch_layer(blob, m, have, guess, via).await?);
                }
                (Arc::new(r.point.clone()), None, data)
            }
            None => {
                let (window, first) = futures::future::join(
                    self.window(blob, m, i),
                    self.fetch_layer(blob, m, start_at, guess, via),
                )
                .await;
                let window = window?;
                let (header, window) = window.split_at(p.header_bytes());
                let header =
                    (p.header_bits > 0).then(|| Arc::new((header.to_vec(), p.header_bits)));
                (
                    Arc::new(p.checkpoint(window.to_vec())),
                    header,
                    first?.to_vec(),
                )
            }
        };
        // Inflated as far as the bytes go (up to the next checkpoint):
        // what lies past the data asked for is made too, for free.
        // Not past what an exact learned window serves: later bytes may
        // refer to what it left out.
        let region_end = need
            .end_output
            .min(start + MAX_REGION)
            .min(p.makes_up_to())
            .max(need.tar_end);
        // A failure from here on may come from a resume point's bytes:
        // the next request starts from the map's checkpoint.
        let forget = |e: Error| {
            lock(&m.resumes).remove(&i);
            e
        };
        // Short: fetch as much again (at least 64 KiB), up to the span's
        // end, until the data is made.
        let mut have = start_at + data.len() as u64;
        let made = loop {
            let made = self
                .inflate(
                    blob,
                    (&checkpoint, header.as_ref()),
                    &data,
                    start,
                    region_end,
                )
                .await
                .map_err(&forget)?;
            if made.tar.len() as u64 >= need.tar_end - start || have >= need.blob_end {
                break made;
            }
            let end = have
                .saturating_add((have - start_at).max(64 << 10))
                .min(need.blob_end);
            let rest = self.fetch_layer(blob, m, have, end, via).await?;
            self.counters.map_refetches.fetch_add(1, Ordering::Relaxed);
            data.extend_from_slice(&rest);
            have = end;
        };
        if (made.tar.len() as u64) < need.tar_end - start {
            self.counters.chunk_failures.fetch_add(1, Ordering::Relaxed);
            return Err(forget(bad(blob, "the layer bytes end before the map says")));
        }
        let done = self.put_chunks(blob, &m.map, a, b, start, &made.tar).await;
        let next = self.put_extra(blob, &m.map, a, b, start, &made.tar);
        if let Err(e) = done {
            // Bytes that did not verify: the next request starts from the
            // map's checkpoint again, not from a point they gave.
            return Err(forget(e));
        }
        // The next request in this span starts at the last block boundary
        // before the first chunk these bytes did not make whole, with the
        // compressed bytes already here from there (at most 1 MiB kept).
        // None from an exact learned window's short stretch: the window
        // there holds the zeros it left out, which later bytes may need.
        if let Some(r) = made
            .extracted
            .resume_before(&checkpoint, start, &made.tar, next)
            .filter(|r| start_at + data.len() as u64 - r.fetch_from() <= MAX_TAIL)
            .filter(|_| p.makes_up_to() == u64::MAX)
        {
            let tail = data[(r.fetch_from() - start_at) as usize..].to_vec();
            let span = m.map.points.partition_point(|q| q.output <= r.output) - 1;
            let mut kept = lock(&m.resumes);
            if kept.len() >= WINDOWS_KEPT && !kept.contains_key(&span) {
                kept.clear();
            }
            kept.insert(span, Arc::new(Resume { point: r, tail }));
        }
        done
    }

    /// A learned prefetch list as requests for a mapped layer: one per
    /// checkpoint span it touches, from its first listed chunk there to its
    /// last, spans in the order the list first reaches them. The compressed
    /// bytes between two listed chunks of a span are fetched whatever the
    /// requests, so one request each makes them once; chunks in between
    /// come with them.
    /// `None` for a plain tar (no spans: its runs are fetched as they
    /// come) or a map that cannot be had.
    pub(super) async fn span_groups(
        &self,
        blob: &Blob,
        plan: &[usize],
    ) -> Option<Vec<(usize, usize)>> {
        let m = self.mapped(blob).await.ok()?;
        if m.map.source != hyperbox_erofs::map::Source::Gzip {
            return None;
        }
        let mut order: Vec<usize> = Vec::new();
        let mut groups: HashMap<usize, (usize, usize)> = HashMap::new();
        for &c in plan {
            let (s, len) = blob.chunk_range(c);
            let Some(span) = m
                .map
                .need(s, len)
                .and_then(|n| Some(m.start_for(n.point?, n.tar_end)))
            else {
                continue;
            };
            groups
                .entry(span)
                .and_modify(|g| *g = (g.0.min(c), g.1.max(c)))
                .or_insert_with(|| {
                    order.push(span);
                    (c, c)
                });
        }
        Some(order.into_iter().map(|s| groups[&s]).collect())
    }

    /// The tar bytes `[from, to)`, or as many as `data` gives.
    /// From `checkpoint`, or when `header` is given, from a symbol inside
    /// a block whose header that is.
    async fn inflate(
        &self,
        blob: &Blob,
        (checkpoint, header): (&Arc<zran::Checkpoint>, Option<&Header>),
        data: &[u8],
        from: u64,
        to: u64,
    ) -> Result<Made, Error> {
        let (cp, header, data) = (checkpoint.clone(), header.cloned(), data.to_vec());
        tokio::task::spawn_blocking(move || {
            let mut tar = vec![0u8; (to - from) as usize];
            let extracted = match &header {
                Some(h) => zran::extract_spliced((&h.0, h.1), &cp, &data, from, &mut tar)?,
                None => zran::extract_some(&cp, &data, from, &mut tar)?,
            };
            tar.truncate(extracted.filled);
            Ok::<_, zran::Error>(Made { tar, extracted })
        })
        .await
        // Cancelled only as the runtime shuts down.
        .map_err(|e| bad(blob, e))?
        .map_err(|e| {
            self.counters.chunk_failures.fetch_add(1, Ordering::Relaxed);
            bad(blob, e)
        })
    }

    /// `[start, end)` of the layer blob.
    async fn fetch_layer(
        &self,
        blob: &Blob,
        m: &Mapped,
        start: u64,
        end: u64,
        via: &Via,
    ) -> Result<bytes::Bytes, Error> {
        if end <= start {
            return Ok(bytes::Bytes::new());
        }
        if !via.registry_only
            && let Some(local) = self.downloaded(blob, m, start, end).await
        {
            via.used.store(true, Ordering::Relaxed);
            return Ok(local);
        }
        let _permit = self.fetches.acquire().await.expect("never closed");
        self.registry
            .fetch_range(&blob.reference, &m.layer, start, end - start)
            .await
            .inspect(|got| {
                self.counters
                    .layer_range_bytes
                    .fetch_add(got.len() as u64, Ordering::Relaxed);
            })
            .map_err(|source| {
                self.counters.chunk_failures.fetch_add(1, Ordering::Relaxed);
                Error::Registry {
                    what: format!("{} layer bytes {start}-{end}", blob.erofs),
                    source,
                }
            })
    }

    /// `[start, end)` of the layer blob from its download on this node
    /// ([`super::staged`]): at once when the download has them, after a
    /// wait when a download at once brings them within [`WAIT_AT_MOST`];
    /// `None` when the registry is the quicker source.
    async fn downloaded(
        &self,
        blob: &Blob,
        m: &Mapped,
        start: u64,
        end: u64,
    ) -> Option<bytes::Bytes> {
        if blob.phase() != Phase::Filling {
            m.staged.release();
            return None;
        }
        let path = self.layers.as_ref()?.staged(&blob.state.entry.layer)?;
        let waited = std::time::Instant::now();
        let mut slept = false;
        loop {
            let sight = m.staged.look(&path, m.map.blob_size)?;
            if sight.len >= end {
                let bytes = tokio::task::spawn_blocking(move || sight.read(start, end))
                    .await
                    .ok()??;
                self.counters
                    .download_read_bytes
                    .fetch_add(end - start, Ordering::Relaxed);
                if slept {
                    self.counters.download_waits.fetch_add(1, Ordering::Relaxed);
                }
                return Some(bytes.into());
            }
            // A download that gives way to reads would wait for this one.
            if blob.download != Download::AtOnce || !blob.downloading.load(Ordering::Relaxed) {
                return None;
            }
            // A download slowed (I/O pressure) or stopped lets it go.
            let left = WAIT_AT_MOST.checked_sub(waited.elapsed())?;
            if sight.until(end).is_none_or(|t| t > left) {
                return None;
            }
            tokio::time::sleep(left.min(staged::POLL)).await;
            slept = true;
        }
    }

    /// Units `a..=b` made from `tar` (the tar's bytes from `tar_start`),
    /// each written only if it matches its digest. A block whose table
    /// entries are not here is written only with its whole chunk, checked
    /// by its own blocks ([`Error::Blocks`] when `tar` does not make the
    /// whole chunk, [`Error::Chunk`] when what it makes is not the chunk:
    /// bad bytes, which a request from a learned checkpoint makes again
    /// from the map's).
    async fn put_chunks(
        &self,
        blob: &Blob,
        map: &LayerMap,
        a: usize,
        b: usize,
        tar_start: u64,
        tar: &[u8],
    ) -> Result<(), Error> {
        self.digests_settled(blob, a, b).await;
        let mut failed = None;
        let mut tried_whole = None;
        for i in a..=b {
            if !blob.can_check(i) {
                let c = blob.chunk_of(i);
                if tried_whole.is_none_or(|(t, _)| t != c) {
                    tried_whole = Some((c, put_whole(blob, map, c, tar_start, tar)?));
                }
                if !lock(&blob.present)[i] {
                    let made = tried_whole.and_then(|(_, made)| made);
                    if made == Some(false) {
                        self.counters.chunk_failures.fetch_add(1, Ordering::Relaxed);
                    }
                    failed.get_or_insert(match made {
                        Some(_) => Error::Chunk {
                            erofs: blob.erofs.to_string(),
                            chunk: i,
                        },
                        None => Error::Blocks {
                            erofs: blob.erofs.to_string(),
                            chunk: c,
                        },
                    });
                }
                continue;
            }
            let (s, len) = blob.chunk_range(i);
            let mut piece = vec![0u8; len as usize];
            let made = map.assemble(s, &mut piece, tar_start, tar).is_ok();
            if !made || !blob.put_chunk(i, &piece)? {
                self.counters.chunk_failures.fetch_add(1, Ordering::Relaxed);
                failed.get_or_insert(Error::Chunk {
                    erofs: blob.erofs.to_string(),
                    chunk: i,
                });
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Every missing chunk around `a..=b` that `tar` makes whole, written
    /// if it verifies (a chunk that does not is left for its own read).
    /// Returns where the first chunk after `b` it could not make begins in
    /// the tar (the tar's end when there is none).
    fn put_extra(
        &self,
        blob: &Blob,
        map: &LayerMap,
        a: usize,
        b: usize,
        tar_start: u64,
        tar: &[u8],
    ) -> u64 {
        let tar_end = tar_start + tar.len() as u64;
        let reach = |i: usize| {
            let (s, len) = blob.chunk_range(i);
            map.need(s, len)
        };
        let made = |n: &Option<hyperbox_erofs::map::Need>| match n {
            Some(n) => n.tar_start >= tar_start && n.tar_end <= tar_end,
            None => true,
        };
        let n = blob.locks.len();
        let before = (0..a).rev().take_while(|&i| made(&reach(i)));
        let mut next = map.tar_size;
        let after = (b + 1..n).take_while(|&i| {
            let r = reach(i);
            let ok = made(&r);
            if !ok && let Some(r) = r {
                next = r.tar_start;
            }
            ok
        });
        let mut extra = 0u64;
        let mut tried_whole = None;
        for i in before.chain(after) {
            if lock(&blob.present)[i] {
                continue;
            }
            if !blob.can_check(i) {
                // Blocks without their table entries: with their whole
                // chunk, if these bytes make it.
                let c = blob.chunk_of(i);
                if tried_whole != Some(c) {
                    tried_whole = Some(c);
                    let missing = blob
                        .units_of(c)
                        .filter(|u| !lock(&blob.present)[*u])
                        .count();
                    if put_whole(blob, map, c, tar_start, tar).is_ok_and(|m| m == Some(true)) {
                        extra += missing as u64;
                    }
                }
                continue;
            }
            let (s, len) = blob.chunk_range(i);
            let mut piece = vec![0u8; len as usize];
            if map.assemble(s, &mut piece, tar_start, tar).is_ok()
                && blob.put_chunk(i, &piece).unwrap_or(false)
            {
                extra += 1;
            }
        }
        self.counters
            .span_chunks
            .fetch_add(extra, Ordering::Relaxed);
        next
    }
}

/// Chunk `c` whole made from `tar` (the tar's bytes from `tar_start`) and
/// its missing units written if it verifies: whether it did, `None` when
/// `tar` does not make it.
fn put_whole(
    blob: &Blob,
    map: &LayerMap,
    c: usize,
    tar_start: u64,
    tar: &[u8],
) -> Result<Option<bool>, Error> {
    let (s, len) = blob.whole_chunk_range(c);
    let mut piece = vec![0u8; len as usize];
    if map.assemble(s, &mut piece, tar_start, tar).is_err() {
        return Ok(None);
    }
    blob.put_chunk_whole(c, &piece).map(Some)
}
