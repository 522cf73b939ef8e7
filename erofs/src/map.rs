//! A layer map: how to make any byte range of a layer's EROFS image from
//! the layer's own blob, so a registry needs to keep nothing but the image
//! and this small table beside it.
//!
//! An image the writer made is three kinds of bytes: metadata (the
//! superblock block and everything from `data_end` on), file data copied
//! from the tar ([`Extent`]s, in tar order), and zeros (block padding,
//! holes). The map keeps the metadata itself, the extents, and for a gzip
//! blob [`zran`](crate::zran) checkpoints; a range of the image is then the
//! metadata it overlaps, plus the tar bytes its extents name (inflated from
//! the nearest checkpoint before them), on zeros. Nothing in the map is
//! trusted: every chunk made from it is checked against the index's chunk
//! digest before a read sees it, so a lying map can only fail reads.
//!
//! The blob is two parts. The eager part (fetched whole when a layer is
//! prepared, its length in the index) is the magic, then one zstd frame
//! holding the numbers (LEB128, offsets as deltas from the previous entry's
//! end, which keeps a 30,000-file layer's extents near 100 KiB) and the
//! metadata. The windows follow, one zstd frame each, fetched by Range the
//! first time a read starts from their checkpoint. The format is our own:
//! SOCI's zTOC carries the same facts for a different purpose (file
//! offsets, not a block image) and in flatbuffers.

use std::io::Read;

use crate::writer::Extent;
use crate::zran::{Checkpoint, WINDOW};

/// Media type of a layer map blob.
pub const MEDIA_TYPE: &str = "application/vnd.hyperbox.layer-map.v1";
/// The blob's first bytes.
pub const MAGIC: &[u8; 8] = b"HBLMAP\x00\x01";
/// The most bytes an eager part may have, compressed or not. An image's
/// metadata is about 100 bytes per inode; 256 MiB is several million.
pub const MAX_EAGER: u64 = 256 << 20;
/// The default checkpoint span of `hb image index`: a read costs at most
/// this much inflated output before its bytes, about a third of it
/// fetched compressed.
pub const DEFAULT_SPAN: u64 = 1 << 20;
/// The largest span `hb image index` makes: nodes inflate at most 32 MiB
/// for one request, a span plus the request plus a deflate block's
/// overshoot.
pub const MAX_SPAN: u64 = 16 << 20;
/// The largest blob, tar and image a map may describe (1 TiB, far above
/// the 64 GiB a node converts by default): every sum of two offsets then
/// fits in 64 bits.
pub const MAX_SIZE: u64 = 1 << 40;
/// The most extents a map may list: one per file (or sparse segment);
/// nodes convert layers of at most a million entries by default.
pub const MAX_EXTENTS: usize = 4 << 20;
/// The most checkpoints a map may list: a 1 TiB tar at the default span.
pub const MAX_POINTS: usize = 1 << 20;
/// The most bytes of block header a learned checkpoint carries.
const MAX_HEADER_BYTES: usize = (crate::deflate::MAX_HEADER_BITS / 8) as usize;

/// Errors of reading a map.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The map is not one this build reads, or is inconsistent.
    #[error("layer map: {0}")]
    Malformed(String),
}

pub(crate) fn bad(why: impl Into<String>) -> Error {
    Error::Malformed(why.into())
}

/// What the layer blob is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// gzip: tar bytes come from checkpoints.
    Gzip,
    /// A plain tar: tar offsets are blob offsets.
    Tar,
}

/// A checkpoint as the map keeps it: its window is in the blob's lazy
/// part, compressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    /// Offset in the layer blob of the first byte not taken.
    pub input: u64,
    /// Unread bits of the byte before `input`.
    pub bits: u8,
    /// Offset in the tar.
    pub output: u64,
    /// Length of the window once decompressed.
    pub window_len: u32,
    /// Where the compressed window is in the map blob.
    pub window_at: u64,
    /// Its compressed length (0 for an empty window).
    pub window_zlen: u32,
    /// For a checkpoint inside a deflate block (learned ones only,
    /// [`crate::deflate::Splice`]): the bits of the block's header, which
    /// come first in the window's frame, before the window. 0 at a block
    /// boundary.
    pub header_bits: u32,
    /// Learned from runs ([`crate::learned`]), not the map's own: its
    /// window is in the learned blob, and it only ever starts a request.
    pub learned: bool,
    /// For a learned checkpoint: where the cluster of reads it was learned
    /// for ends ([`crate::learned::trim`]), so a request for the cluster
    /// fetches exactly its bytes.
    pub stretch: Option<Stretch>,
}

/// The end of a learned checkpoint's cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stretch {
    /// Its last tar byte's end (or a little past: the symbol's end).
    pub output: u64,
    /// The layer blob's bytes from the checkpoint up to here make it.
    pub input: u64,
    /// The checkpoint's window keeps only what the stretch refers to
    /// ([`crate::trim::trim_exact`]): output after the stretch and less
    /// than a window past the checkpoint may refer to bytes it zeroed.
    pub exact: bool,
}

impl Point {
    /// Whether a request for tar bytes up to `tar_end` may start here:
    /// not from a checkpoint whose window is exact to a shorter stretch,
    /// unless the stretch runs a whole window past it (then nothing later
    /// refers to the window).
    pub fn serves(&self, tar_end: u64) -> bool {
        match self.stretch {
            Some(s) if s.exact => tar_end <= s.output || s.output >= self.output + WINDOW as u64,
            _ => true,
        }
    }

    /// How far a request from here may inflate: to the end of an exact
    /// window's stretch, when that is less than a window past it.
    pub fn makes_up_to(&self) -> u64 {
        match self.stretch {
            Some(s) if s.exact && s.output < self.output + WINDOW as u64 => s.output,
            _ => u64::MAX,
        }
    }
}

impl Point {
    /// A checkpoint's place, its window not yet placed in a map blob
    /// ([`LayerMap::encode`] places it).
    pub fn of(c: &Checkpoint) -> Point {
        Point {
            input: c.input,
            bits: c.bits,
            output: c.output,
            window_len: 0,
            window_at: 0,
            window_zlen: 0,
            header_bits: 0,
            learned: false,
            stretch: None,
        }
    }

    /// The checkpoint, given its window.
    pub fn checkpoint(&self, window: Vec<u8>) -> Checkpoint {
        Checkpoint {
            input: self.input,
            bits: self.bits,
            output: self.output,
            window,
        }
    }

    /// The bytes of its block header at the start of its window's frame.
    pub fn header_bytes(&self) -> usize {
        self.header_bits.div_ceil(8) as usize
    }

    /// The window, from its compressed bytes in the map blob; checked to
    /// be as long as the map says (for a point inside a block, its
    /// block's header bytes, then the window).
    pub fn decode_window(&self, compressed: &[u8]) -> Result<Vec<u8>, Error> {
        if self.window_zlen == 0 {
            return Ok(Vec::new());
        }
        let mut w = Vec::with_capacity(self.window_len as usize);
        zstd::stream::read::Decoder::new(compressed)
            .and_then(|d| {
                d.take((WINDOW + MAX_HEADER_BYTES) as u64 + 1)
                    .read_to_end(&mut w)
            })
            .map_err(|e| bad(format!("window: {e}")))?;
        if w.len() != self.window_len as usize {
            return Err(bad(format!("window is not {} bytes", self.window_len)));
        }
        Ok(w)
    }

    /// Where the layer bytes a resume needs start.
    pub fn fetch_from(&self) -> u64 {
        self.input - u64::from(self.bits > 0)
    }
}

/// The map of one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMap {
    /// The layer blob's kind.
    pub source: Source,
    /// The layer blob's size.
    pub blob_size: u64,
    /// The uncompressed tar's size.
    pub tar_size: u64,
    /// The EROFS image's size.
    pub image_size: u64,
    /// Where file data ends in the image.
    pub data_end: u64,
    /// Runs of file data, in order.
    pub extents: Vec<Extent>,
    /// Checkpoints, in order (gzip only).
    pub points: Vec<Point>,
    /// The image's bytes `[0, 4096)` followed by `[data_end, image_size)`.
    pub metadata: Vec<u8>,
}

/// What making `[start, start+len)` of the image takes from the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// The tar bytes: `[tar_start, tar_end)`.
    pub tar_start: u64,
    /// End of the tar bytes.
    pub tar_end: u64,
    /// For gzip, the checkpoint to start from (an index into
    /// [`LayerMap::points`]) and the layer blob's bytes that give the tar
    /// bytes from it: `[blob_start, blob_end)`. For a plain tar, the tar
    /// range itself.
    pub point: Option<usize>,
    /// First layer blob byte needed.
    pub blob_start: u64,
    /// End of the layer blob bytes needed: for gzip, the input of the
    /// first of the map's own checkpoints at or past `tar_end` (or the
    /// blob's end).
    pub blob_end: u64,
    /// The tar offset the bytes up to `blob_end` inflate to: that
    /// checkpoint's output (or the tar's end); `tar_end` for a plain tar.
    pub end_output: u64,
}

/// zstd's level for the map's frames (and learned windows'): made once,
/// read by every node. Each is compressed knowing its size, in one reused
/// context: a streaming frame at this level sizes its tables for
/// megabytes of input, and zeroing them for each 32 KiB window was most
/// of what `hb image prefetch push` spent (50 s for 795 windows).
pub const ZSTD_LEVEL: i32 = 19;

/// A blob laid out as a map is: `magic`, the length of the zstd frame of
/// `body` that follows, then `lazy` (window offsets count from its
/// start). Returns the blob and the length of its eager part.
pub(crate) fn write_blob(
    magic: &[u8; 8],
    body: &[u8],
    lazy: &[u8],
) -> std::io::Result<(Vec<u8>, u64)> {
    let frame = zstd::bulk::compress(body, ZSTD_LEVEL)?;
    let mut blob = Vec::with_capacity(16 + frame.len() + lazy.len());
    blob.extend_from_slice(magic);
    blob.extend_from_slice(&(frame.len() as u64).to_le_bytes());
    blob.extend_from_slice(&frame);
    let eager = blob.len() as u64;
    blob.extend_from_slice(lazy);
    Ok((blob, eager))
}

/// The numbers of a blob laid out as a map is (`magic`, a frame length,
/// a zstd frame of at most `max` bytes compressed or not), and where the
/// lazy part after it begins; `what` names the blob in errors.
pub(crate) fn read_eager(
    eager: &[u8],
    magic: &[u8; 8],
    max: u64,
    what: &str,
) -> Result<(Vec<u8>, u64), Error> {
    if eager.len() < 16 || &eager[..8] != magic {
        return Err(bad(format!("not a hyperbox {what} (wrong magic)")));
    }
    let flen = u64::from_le_bytes(eager[8..16].try_into().expect("8 bytes"));
    if flen > max || 16 + flen > eager.len() as u64 {
        return Err(bad(format!(
            "{what}: eager part shorter than its header says"
        )));
    }
    let mut body = Vec::new();
    zstd::stream::read::Decoder::new(&eager[16..16 + flen as usize])
        .map_err(|e| bad(e.to_string()))?
        .take(max + 1)
        .read_to_end(&mut body)
        .map_err(|e| bad(format!("{what}: eager part: {e}")))?;
    if body.len() as u64 > max {
        return Err(bad(format!("{what}: eager part too large")));
    }
    Ok((body, 16 + flen))
}

/// `points` with their windows (compressed, one zstd frame each) placed
/// one after the other from offset 0; and those frames.
pub(crate) fn place_windows(
    points: &[Point],
    windows: &[Vec<u8>],
) -> std::io::Result<(Vec<Point>, Vec<u8>)> {
    let mut lazy = Vec::new();
    let mut placed = Vec::with_capacity(points.len());
    let mut zstd = zstd::bulk::Compressor::new(ZSTD_LEVEL)?;
    for (p, w) in points.iter().zip(windows) {
        let z = if w.is_empty() {
            Vec::new()
        } else {
            zstd.compress(w)?
        };
        placed.push(Point {
            window_len: w.len() as u32,
            window_at: lazy.len() as u64,
            window_zlen: z.len() as u32,
            ..p.clone()
        });
        lazy.extend_from_slice(&z);
    }
    Ok((placed, lazy))
}

/// The points' numbers: a count, then each as deltas from the last (with
/// `headers`, each point's header bits too: learned points only).
pub(crate) fn put_points(body: &mut Vec<u8>, points: &[Point], headers: bool) {
    put(body, points.len() as u64);
    let (mut input, mut output) = (0u64, 0u64);
    for p in points {
        put(body, p.input - input);
        put(body, p.bits.into());
        put(body, p.output - output);
        put(body, p.window_len.into());
        put(body, p.window_zlen.into());
        if headers {
            put(body, p.header_bits.into());
        }
        input = p.input;
        output = p.output;
    }
}

/// `n` points as [`put_points`] wrote them, their windows from `at` on,
/// checked to be in order and inside a blob and tar of `sizes`; with
/// `headers`, learned points (each with its header bits).
pub(crate) fn get_points(
    c: &mut Cursor<'_>,
    n: usize,
    mut at: u64,
    (blob_size, tar_size): (u64, u64),
    headers: bool,
) -> Result<Vec<Point>, Error> {
    let mut points = Vec::with_capacity(n);
    let (mut input, mut output) = (0u64, 0u64);
    for i in 0..n {
        let mut p = Point {
            input: add(input, c.get()?)?,
            bits: u8::try_from(c.get()?)
                .ok()
                .filter(|b| *b < 8)
                .ok_or_else(|| bad("checkpoint bits out of range"))?,
            output: add(output, c.get()?)?,
            window_len: u32::try_from(c.get()?)
                .ok()
                .filter(|l| *l as usize <= WINDOW + MAX_HEADER_BYTES)
                .ok_or_else(|| bad("window larger than 32 KiB"))?,
            window_zlen: u32::try_from(c.get()?)
                .ok()
                .filter(|z| *z as usize <= WINDOW + MAX_HEADER_BYTES + 4096)
                .ok_or_else(|| bad("compressed window out of range"))?,
            window_at: at,
            header_bits: 0,
            learned: headers,
            stretch: None,
        };
        if headers {
            p.header_bits = u32::try_from(c.get()?)
                .ok()
                .filter(|h| *h <= crate::deflate::MAX_HEADER_BITS && *h <= p.window_len * 8)
                .ok_or_else(|| bad("block header out of range"))?;
        }
        if p.window_len as usize - p.header_bytes() > WINDOW {
            return Err(bad("window larger than 32 KiB"));
        }
        if i > 0 && (p.input <= input || p.output <= output) {
            return Err(bad("checkpoints out of order"));
        }
        if p.input >= blob_size || p.output >= tar_size.max(1) || (p.bits > 0 && p.input == 0) {
            return Err(bad("a checkpoint lies outside the blob"));
        }
        if (p.window_len == 0) != (p.window_zlen == 0) {
            return Err(bad("window lengths disagree"));
        }
        at = add(at, p.window_zlen.into())?;
        input = p.input;
        output = p.output;
        points.push(p);
    }
    Ok(points)
}

pub(crate) fn put(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

pub(crate) struct Cursor<'a> {
    pub(crate) b: &'a [u8],
}

impl Cursor<'_> {
    pub(crate) fn get(&mut self) -> Result<u64, Error> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.b.split_first().ok_or_else(|| bad("truncated"))?;
            self.b = rest;
            v |= u64::from(byte & 0x7f)
                .checked_shl(shift)
                .filter(|x| x >> shift == u64::from(byte & 0x7f))
                .ok_or_else(|| bad("number out of range"))?;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("number out of range"))
    }

    pub(crate) fn count(&mut self, each: usize) -> Result<usize, Error> {
        let n = self.get()?;
        // Every entry takes at least `each` bytes: a count the rest cannot
        // hold is a lie, refused before anything is allocated for it.
        if n > (self.b.len() / each) as u64 {
            return Err(bad("count larger than the map"));
        }
        Ok(n as usize)
    }
}

pub(crate) fn add(a: u64, b: u64) -> Result<u64, Error> {
    a.checked_add(b).ok_or_else(|| bad("offset out of range"))
}

impl LayerMap {
    /// Encodes the map, `windows` being each point's window in order.
    /// Returns the blob and the length of its eager part.
    pub fn encode(&self, windows: &[Vec<u8>]) -> std::io::Result<(Vec<u8>, u64)> {
        assert_eq!(windows.len(), self.points.len(), "one window per point");
        let (points, lazy) = place_windows(&self.points, windows)?;
        let mut body = Vec::new();
        put(
            &mut body,
            match self.source {
                Source::Gzip => 1,
                Source::Tar => 0,
            },
        );
        for v in [
            self.blob_size,
            self.tar_size,
            self.image_size,
            self.data_end,
        ] {
            put(&mut body, v);
        }
        put(&mut body, self.extents.len() as u64);
        let (mut image, mut tar) = (0u64, 0u64);
        for e in &self.extents {
            put(&mut body, e.image - image);
            put(&mut body, e.tar - tar);
            put(&mut body, e.len);
            image = e.image + e.len;
            tar = e.tar + e.len;
        }
        put_points(&mut body, &points, false);
        put(&mut body, self.metadata.len() as u64);
        body.extend_from_slice(&self.metadata);
        write_blob(MAGIC, &body, &lazy)
    }

    /// Reads a map's eager part, checking that it describes a consistent
    /// image (offsets inside it, in order, not overlapping metadata).
    pub fn decode(eager: &[u8]) -> Result<LayerMap, Error> {
        let (body, lazy_base) = read_eager(eager, MAGIC, MAX_EAGER, "layer map")?;
        let mut c = Cursor { b: &body };
        let source = match c.get()? {
            1 => Source::Gzip,
            0 => Source::Tar,
            n => return Err(bad(format!("unknown source kind {n}"))),
        };
        let blob_size = c.get()?;
        let tar_size = c.get()?;
        let image_size = c.get()?;
        let data_end = c.get()?;
        if [blob_size, tar_size, image_size]
            .iter()
            .any(|s| *s > MAX_SIZE)
        {
            return Err(bad("sizes beyond 1 TiB"));
        }
        if data_end < 4096 || data_end > image_size {
            return Err(bad("data_end outside the image"));
        }
        let n = c.count(3)?;
        if n > MAX_EXTENTS {
            return Err(bad(format!("{n} extents, more than {MAX_EXTENTS}")));
        }
        let mut extents = Vec::with_capacity(n);
        let (mut image, mut tar) = (0u64, 0u64);
        for _ in 0..n {
            let e = Extent {
                image: add(image, c.get()?)?,
                tar: add(tar, c.get()?)?,
                len: c.get()?,
            };
            image = add(e.image, e.len)?;
            tar = add(e.tar, e.len)?;
            if e.image < 4096 || image > data_end || tar > tar_size || e.len == 0 {
                return Err(bad("an extent lies outside the image's data or the tar"));
            }
            extents.push(e);
        }
        let n = c.count(5)?;
        if n > MAX_POINTS || n as u64 > tar_size / WINDOW as u64 + 2 {
            return Err(bad(format!("{n} checkpoints for a {tar_size}-byte tar")));
        }
        if source == Source::Tar && n > 0 {
            return Err(bad("checkpoints in a map of a plain tar"));
        }
        let points = get_points(&mut c, n, lazy_base, (blob_size, tar_size), false)?;
        if source == Source::Gzip && points.first().is_none_or(|p| p.output != 0) {
            return Err(bad("no checkpoint at the start of the tar"));
        }
        let mlen = c.get()?;
        if mlen != 4096 + image_size - data_end || mlen != c.b.len() as u64 {
            return Err(bad("metadata length does not match the image"));
        }
        Ok(LayerMap {
            source,
            blob_size,
            tar_size,
            image_size,
            data_end,
            extents,
            points,
            metadata: c.b.to_vec(),
        })
    }

    /// The extents overlapping `[start, end)` of the image.
    fn extents_in(&self, start: u64, end: u64) -> &[Extent] {
        let first = self.extents.partition_point(|e| e.image + e.len <= start);
        let last = self.extents.partition_point(|e| e.image < end);
        &self.extents[first..last.max(first)]
    }

    /// What the layer must give for `[start, start+len)` of the image;
    /// `None` when the range is metadata and zeros only.
    pub fn need(&self, start: u64, len: u64) -> Option<Need> {
        let end = start.saturating_add(len).min(self.image_size);
        let xs = self.extents_in(start, end);
        let (first, last) = (xs.first()?, xs.last()?);
        let tar_start = first.tar + start.saturating_sub(first.image);
        let tar_end = last.tar + (end.min(last.image + last.len) - last.image);
        Some(match self.source {
            Source::Tar => Need {
                tar_start,
                tar_end,
                point: None,
                blob_start: tar_start,
                blob_end: tar_end,
                end_output: tar_end,
            },
            Source::Gzip => {
                // The last checkpoint at or before the bytes that can make
                // them all (the map's own always can).
                let last = self
                    .points
                    .partition_point(|p| p.output <= tar_start)
                    .saturating_sub(1);
                let i = (0..=last)
                    .rev()
                    .find(|&j| self.points[j].serves(tar_end))
                    .unwrap_or(0);
                // A learned checkpoint only starts a request: one that lies
                // about its place must not cut short a request from the
                // map's own, so the bytes end at the map's next own one.
                let (blob_end, end_output) = self.points
                    [self.points.partition_point(|p| p.output < tar_end)..]
                    .iter()
                    .find(|q| !q.learned)
                    .map_or((self.blob_size, self.tar_size), |q| (q.input, q.output));
                Need {
                    tar_start,
                    tar_end,
                    point: Some(i),
                    blob_start: self.points[i].fetch_from(),
                    blob_end,
                    end_output,
                }
            }
        })
    }

    /// `[start, start+out.len())` of the image, from the metadata and
    /// `tar`, the tar's bytes from `tar_start` on (what [`LayerMap::need`]
    /// named, or more). Bytes the tar slice does not reach are an error,
    /// never zeros.
    pub fn assemble(
        &self,
        start: u64,
        out: &mut [u8],
        tar_start: u64,
        tar: &[u8],
    ) -> Result<(), Error> {
        out.fill(0);
        let end = start + out.len() as u64;
        // Metadata: the superblock block, then [data_end, image_size).
        if start < 4096 {
            let n = (4096 - start).min(out.len() as u64) as usize;
            out[..n].copy_from_slice(&self.metadata[start as usize..start as usize + n]);
        }
        if end > self.data_end {
            let from = start.max(self.data_end);
            let to = end.min(self.image_size);
            if to > from {
                let m = (4096 + from - self.data_end) as usize;
                let o = (from - start) as usize;
                let n = (to - from) as usize;
                out[o..o + n].copy_from_slice(&self.metadata[m..m + n]);
            }
        }
        for e in self.extents_in(start, end) {
            let from = start.max(e.image);
            let to = end.min(e.image + e.len);
            let t = e.tar + (from - e.image);
            let at = t
                .checked_sub(tar_start)
                .map(|a| a as usize)
                .filter(|a| a + (to - from) as usize <= tar.len())
                .ok_or_else(|| bad("tar bytes given do not cover the range"))?;
            let o = (from - start) as usize;
            out[o..o + (to - from) as usize].copy_from_slice(&tar[at..at + (to - from) as usize]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer;
    use std::io::Write;

    fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn files() -> Vec<(String, Vec<u8>)> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        (0..400)
            .map(|i| {
                let n = match i % 7 {
                    0 => 0,
                    1 => rng.random_range(1..100),
                    2 => rng.random_range(60_000..200_000),
                    _ => rng.random_range(100..9000),
                };
                let data: Vec<u8> = if i % 3 == 0 {
                    (0..n).map(|_| rng.random()).collect()
                } else {
                    (0..n)
                        .map(|j| b"lorem ipsum dolor sit amet "[(j + i) % 27])
                        .collect()
                };
                (format!("d{}/f{i}", i % 9), data)
            })
            .collect()
    }

    /// The map of `img` onto a blob of `sizes` (blob, tar): gzip when it
    /// has checkpoints.
    fn map_of(
        img: &[u8],
        summary: &writer::Summary,
        extents: Vec<Extent>,
        (blob, tar): (usize, usize),
        points: Vec<Point>,
    ) -> LayerMap {
        let mut metadata = img[..4096].to_vec();
        metadata.extend_from_slice(&img[summary.data_end as usize..]);
        LayerMap {
            source: if points.is_empty() {
                Source::Tar
            } else {
                Source::Gzip
            },
            blob_size: blob as u64,
            tar_size: tar as u64,
            image_size: img.len() as u64,
            data_end: summary.data_end,
            extents,
            points,
            metadata,
        }
    }

    /// The image, the map and the gzip blob of a sample layer.
    fn sample(span: u64) -> (Vec<u8>, LayerMap, Vec<u8>, Vec<u8>) {
        let tar = tar_of(&files());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let mut ix = crate::zran::Indexer::new(&gz[..], span).unwrap();
        let mut img = std::io::Cursor::new(Vec::new());
        let (summary, extents) =
            writer::convert_mapped(&mut ix, &mut img, writer::Options::default()).unwrap();
        std::io::copy(&mut ix, &mut std::io::sink()).unwrap();
        let img = img.into_inner();
        assert_eq!(img.len() as u64, summary.image_bytes);
        let cps = ix.into_points();
        let points = cps.iter().map(Point::of).collect();
        let map = map_of(&img, &summary, extents, (gz.len(), tar.len()), points);
        let windows: Vec<Vec<u8>> = cps.into_iter().map(|c| c.window).collect();
        let (blob, eager) = map.encode(&windows).unwrap();
        let map = LayerMap::decode(&blob[..eager as usize]).unwrap();
        (img, map, gz, blob)
    }

    fn window(map: &LayerMap, blob: &[u8], i: usize) -> Vec<u8> {
        let p = &map.points[i];
        if p.window_zlen == 0 {
            return Vec::new();
        }
        let z = &blob[p.window_at as usize..(p.window_at + u64::from(p.window_zlen)) as usize];
        p.decode_window(z).unwrap()
    }

    /// A range of the image made from the map and exactly the blob bytes
    /// it says it needs.
    fn make(map: &LayerMap, gz: &[u8], blob: &[u8], start: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        let Some(need) = map.need(start, len) else {
            map.assemble(start, &mut out, 0, &[]).unwrap();
            return out;
        };
        let i = need.point.unwrap();
        let cp = map.points[i].checkpoint(window(map, blob, i));
        let mut tar = vec![0u8; (need.tar_end - need.tar_start) as usize];
        crate::zran::extract(
            &cp,
            &gz[need.blob_start as usize..need.blob_end as usize],
            need.tar_start,
            &mut tar,
        )
        .unwrap();
        map.assemble(start, &mut out, need.tar_start, &tar).unwrap();
        out
    }

    #[test]
    fn every_chunk_of_the_image_comes_from_the_map_and_the_gzip_blob() {
        let (img, map, gz, blob) = sample(64 << 10);
        assert!(map.points.len() > 10, "{} checkpoints", map.points.len());
        for chunk in [4096u64, 16 << 10, 1 << 20] {
            for start in (0..img.len() as u64).step_by(chunk as usize) {
                let len = chunk.min(img.len() as u64 - start);
                let got = make(&map, &gz, &blob, start, len);
                assert!(
                    got[..] == img[start as usize..(start + len) as usize],
                    "chunk {chunk} at {start}"
                );
            }
        }
        // The eager part is small beside the blob: numbers and metadata.
        let eager = 16 + u64::from_le_bytes(blob[8..16].try_into().unwrap());
        assert!(
            eager < gz.len() as u64 / 20,
            "{eager} eager of {} gzip",
            gz.len()
        );
    }

    #[test]
    fn a_mangled_map_is_refused_or_fails_reads_never_panics() {
        let (_, map, _, blob) = sample(128 << 10);
        let eager = 16 + u64::from_le_bytes(blob[8..16].try_into().unwrap()) as usize;
        // Truncated anywhere: refused.
        for cut in [0, 7, 15, 16, eager / 2, eager - 1] {
            assert!(LayerMap::decode(&blob[..cut]).is_err(), "cut at {cut}");
        }
        // Numbers that lie, inside a well-formed frame.
        let windows = vec![Vec::new(); map.points.len()];
        let quiet = |m: &mut LayerMap| {
            for p in &mut m.points {
                p.window_len = 0;
                p.window_zlen = 0;
            }
        };
        let mut lies = map.clone();
        quiet(&mut lies);
        let last = lies.extents.len() - 1;
        lies.extents[last].len = lies.image_size;
        let (b, e) = lies.encode(&windows).unwrap();
        let err = LayerMap::decode(&b[..e as usize]).unwrap_err();
        assert!(err.to_string().contains("extent"), "{err}");
        let mut lies = map.clone();
        quiet(&mut lies);
        lies.points[2].output = lies.points[1].output;
        let (b, e) = lies.encode(&windows).unwrap();
        let err = LayerMap::decode(&b[..e as usize]).unwrap_err();
        assert!(err.to_string().contains("order"), "{err}");
        let mut lies = map.clone();
        quiet(&mut lies);
        lies.points[2].bits = 9;
        let (b, e) = lies.encode(&windows).unwrap();
        assert!(LayerMap::decode(&b[..e as usize]).is_err());
        let mut lies = map.clone();
        quiet(&mut lies);
        lies.metadata.pop();
        let (b, e) = lies.encode(&windows).unwrap();
        assert!(LayerMap::decode(&b[..e as usize]).is_err());
        // Sizes past 1 TiB, and more checkpoints than the tar has room
        // for (a small frame that would expand to gigabytes of entries).
        let mut lies = map.clone();
        quiet(&mut lies);
        lies.tar_size = MAX_SIZE + 1;
        let (b, e) = lies.encode(&windows).unwrap();
        assert!(LayerMap::decode(&b[..e as usize]).is_err());
        let mut lies = map.clone();
        lies.points = (0..lies.tar_size / WINDOW as u64 + 5)
            .map(|k| Point {
                input: k + 10,
                bits: 0,
                output: k,
                window_len: 0,
                window_at: 0,
                window_zlen: 0,
                header_bits: 0,
                learned: false,
                stretch: None,
            })
            .collect();
        let many = vec![Vec::new(); lies.points.len()];
        let (b, e) = lies.encode(&many).unwrap();
        let err = LayerMap::decode(&b[..e as usize]).unwrap_err();
        assert!(err.to_string().contains("checkpoints for"), "{err}");
        // Tar bytes that do not cover the range: an error, not zeros.
        let need = map.need(8192, 1 << 20).unwrap();
        let mut out = vec![0u8; 1 << 20];
        let short = vec![0u8; ((need.tar_end - need.tar_start) / 2) as usize];
        assert!(
            map.assemble(8192, &mut out, need.tar_start, &short)
                .is_err()
        );
    }

    #[test]
    fn plain_tar_ranges_are_the_blob_itself() {
        let tar = tar_of(&files());
        let mut img = std::io::Cursor::new(Vec::new());
        let (summary, extents) =
            writer::convert_mapped(&tar[..], &mut img, writer::Options::default()).unwrap();
        let img = img.into_inner();
        let map = map_of(&img, &summary, extents, (tar.len(), tar.len()), Vec::new());
        let (blob, eager) = map.encode(&[]).unwrap();
        assert_eq!(blob.len() as u64, eager);
        let map = LayerMap::decode(&blob).unwrap();
        for start in (0..img.len() as u64).step_by(16 << 10) {
            let len = (16u64 << 10).min(img.len() as u64 - start);
            let mut out = vec![0u8; len as usize];
            match map.need(start, len) {
                Some(n) => {
                    assert_eq!(n.point, None);
                    let t = &tar[n.blob_start as usize..n.blob_end as usize];
                    map.assemble(start, &mut out, n.tar_start, t).unwrap();
                }
                None => map.assemble(start, &mut out, 0, &[]).unwrap(),
            }
            assert!(out[..] == img[start as usize..(start + len) as usize]);
        }
    }
}
