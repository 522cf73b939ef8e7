//! Random access into a gzip layer blob, as zlib's `examples/zran.c`
//! describes it: while the blob is inflated once (at `hb image index`),
//! the inflater's position is recorded at deflate block boundaries about
//! every `span` bytes of output, each with the 32 KiB of output before it
//! (the window back-references may reach into). Any byte of the tar can
//! then be produced from the nearest checkpoint before it: fetch the blob
//! from the checkpoint's input offset, prime the inflater with the bits of
//! the byte the boundary falls inside, give it the window, inflate.
//!
//! Written against zlib's C interface (`libz-rs-sys`, the C ABI of the
//! zlib-rs that flate2 already uses here) because no Rust inflate API
//! exposes what this needs: `Z_BLOCK` stops with the boundary's bit
//! position in `data_type`, and `inflatePrime`. Every unsafe call is in
//! [`Inflater`], which owns its `z_stream` in a `Box` (zlib's state points
//! back at the stream, so it must not move) and hands zlib pointers into
//! borrowed slices only for the length of one call.
//!
//! Multi-member blobs (concatenated gzip files, as `MultiGzDecoder` reads
//! them) are followed across members: a checkpoint in one member resumes
//! raw, and at its end the trailer is skipped and the next member's header
//! read, as the indexing pass did.

use std::ffi::c_int;
use std::io::{self, BufRead, Read};

use libz_rs_sys as z;

/// The most output a deflate back-reference reaches back.
pub const WINDOW: usize = 32 << 10;

/// Errors of producing bytes from a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The compressed bytes do not inflate.
    #[error("inflate at compressed byte {at}: {why}")]
    Corrupt {
        /// Offset in the blob where it failed.
        at: u64,
        /// zlib's message.
        why: String,
    },
    /// The compressed bytes given ended before the output asked for.
    #[error("the compressed bytes given end at {at} before the output asked for")]
    ShortInput {
        /// Offset in the blob where they ended.
        at: u64,
    },
    /// A request the checkpoint cannot serve.
    #[error("{0}")]
    Request(&'static str),
}

/// A place to start inflating from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Offset in the blob of the first byte the inflater has not taken.
    pub input: u64,
    /// How many bits of the byte before `input` are still to be read
    /// (0–7; 0 when the boundary is byte-aligned).
    pub bits: u8,
    /// Offset in the uncompressed stream.
    pub output: u64,
    /// The output before `output` that back-references may reach: up to
    /// [`WINDOW`] bytes, fewer near the start of a gzip member.
    pub window: Vec<u8>,
}

impl Checkpoint {
    /// Where the compressed bytes a resume needs start: the byte holding
    /// the unread bits, if any.
    pub fn fetch_from(&self) -> u64 {
        self.input - u64::from(self.bits > 0)
    }
}

/// zlib's `inflate` over borrowed slices.
struct Inflater {
    strm: Box<z::z_stream>,
}

/// What one [`Inflater::inflate`] call did.
struct Step {
    consumed: usize,
    produced: usize,
    code: c_int,
}

/// Raw deflate, no header.
const RAW: c_int = -15;
/// A gzip header and trailer around the deflate stream.
const GZIP: c_int = 16 + 15;

impl Inflater {
    fn new(window_bits: c_int) -> io::Result<Inflater> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: `strm` is a fully initialised z_stream (zalloc/zfree set
        // by `Default`) that lives in a Box, so the state zlib allocates
        // may keep pointing at it; the version string is zlib's own,
        // NUL-terminated and 'static.
        let code = unsafe {
            z::inflateInit2_(
                &mut *strm,
                window_bits,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as c_int,
            )
        };
        if code != z::Z_OK {
            return Err(io::Error::other(format!("inflateInit2: {code}")));
        }
        Ok(Inflater { strm })
    }

    fn reset(&mut self, window_bits: c_int) -> io::Result<()> {
        // SAFETY: the stream was initialised by `new` and not ended.
        let code = unsafe { z::inflateReset2(&mut *self.strm, window_bits) };
        ok(code, "inflateReset2")
    }

    fn prime(&mut self, bits: u8, value: u8) -> io::Result<()> {
        // SAFETY: as in `reset`; bits is at most 7, value fits in it.
        let code =
            unsafe { z::inflatePrime(&mut *self.strm, c_int::from(bits), c_int::from(value)) };
        ok(code, "inflatePrime")
    }

    fn set_dictionary(&mut self, dict: &[u8]) -> io::Result<()> {
        if dict.is_empty() {
            return Ok(());
        }
        // SAFETY: as in `reset`; zlib copies the dictionary during the
        // call and keeps no pointer to `dict`.
        let code = unsafe {
            z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), dict.len() as z::uInt)
        };
        ok(code, "inflateSetDictionary")
    }

    /// One `inflate` call from `input` into `output`.
    fn inflate(&mut self, input: &[u8], output: &mut [u8], flush: c_int) -> Step {
        let avail_in = input.len().min(u32::MAX as usize) as z::uInt;
        let avail_out = output.len().min(u32::MAX as usize) as z::uInt;
        let s = &mut *self.strm;
        s.next_in = input.as_ptr();
        s.avail_in = avail_in;
        s.next_out = output.as_mut_ptr();
        s.avail_out = avail_out;
        // SAFETY: next_in/next_out point into live slices of at least
        // avail_in/avail_out bytes for the length of this call, and are
        // cleared before the borrows end; the stream is initialised.
        let code = unsafe { z::inflate(s, flush) };
        let step = Step {
            consumed: (avail_in - s.avail_in) as usize,
            produced: (avail_out - s.avail_out) as usize,
            code,
        };
        s.next_in = std::ptr::null();
        s.avail_in = 0;
        s.next_out = std::ptr::null_mut();
        s.avail_out = 0;
        step
    }

    fn data_type(&self) -> c_int {
        self.strm.data_type
    }

    fn message(&self, code: c_int) -> String {
        if self.strm.msg.is_null() {
            return format!("zlib error {code}");
        }
        // SAFETY: zlib sets msg to a 'static NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(self.strm.msg) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: initialised by `new`, ended only here.
        unsafe { z::inflateEnd(&mut *self.strm) };
    }
}

fn ok(code: c_int, what: &str) -> io::Result<()> {
    if code == z::Z_OK {
        Ok(())
    } else {
        Err(io::Error::other(format!("{what}: zlib error {code}")))
    }
}

/// `data_type` after `Z_BLOCK`: 128 once a block (or the header) ends,
/// 64 while in the last block, the low 3 bits unused in the last byte.
const AT_BOUNDARY: c_int = 128;
const LAST_BLOCK: c_int = 64;

/// The last [`WINDOW`] bytes of output.
#[derive(Debug)]
struct Ring {
    buf: Vec<u8>,
    /// Total bytes ever pushed.
    total: u64,
}

impl Ring {
    fn new() -> Ring {
        Ring {
            buf: vec![0; WINDOW],
            total: 0,
        }
    }

    fn push(&mut self, mut data: &[u8]) {
        if data.len() > WINDOW {
            self.total += (data.len() - WINDOW) as u64;
            data = &data[data.len() - WINDOW..];
        }
        let at = (self.total % WINDOW as u64) as usize;
        let first = data.len().min(WINDOW - at);
        self.buf[at..at + first].copy_from_slice(&data[..first]);
        self.buf[..data.len() - first].copy_from_slice(&data[first..]);
        self.total += data.len() as u64;
    }

    /// The last `n` (at most [`WINDOW`]) bytes, oldest first.
    fn last(&self, n: usize) -> Vec<u8> {
        let n = n.min(WINDOW).min(self.total as usize);
        let end = (self.total % WINDOW as u64) as usize;
        let mut out = Vec::with_capacity(n);
        if n <= end {
            out.extend_from_slice(&self.buf[end - n..end]);
        } else {
            out.extend_from_slice(&self.buf[WINDOW - (n - end)..]);
            out.extend_from_slice(&self.buf[..end]);
        }
        out
    }
}

/// Inflates a gzip blob like `MultiGzDecoder` and records a
/// [`Checkpoint`] at the first block boundary at least `span` bytes of
/// output after the last one (and one at the start), or, made with
/// [`Indexer::before`], at the last boundary at or before each of a list
/// of offsets.
#[derive(Debug)]
pub struct Indexer<R> {
    inner: R,
    inflater: InflaterBox,
    span: u64,
    targets: Option<Targets>,
    input: u64,
    output: u64,
    /// Output where the current member began: its window starts there.
    member_output: u64,
    ring: Ring,
    points: Vec<Checkpoint>,
    /// Between members: the last one ended, the next not begun.
    between: bool,
    done: bool,
}

/// [`Inflater`] without the raw pointers in `Debug`.
struct InflaterBox(Inflater);

impl std::fmt::Debug for InflaterBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inflater")
    }
}

/// Offsets checkpoints are wanted before, and the last boundary passed.
#[derive(Debug)]
struct Targets {
    /// Ascending; `next` is the first not yet given a checkpoint.
    list: Vec<u64>,
    next: usize,
    last: Option<Checkpoint>,
}

impl<R: BufRead> Indexer<R> {
    /// Reads the gzip blob from `inner`, a checkpoint about every `span`
    /// bytes of output (at least [`WINDOW`]).
    pub fn new(inner: R, span: u64) -> io::Result<Indexer<R>> {
        Self::make(inner, span.max(WINDOW as u64), None)
    }

    /// Reads the gzip blob from `inner`, a checkpoint at the last block
    /// boundary at or before each offset of `targets` (one checkpoint for
    /// the targets that share it), where reads are known to begin.
    pub fn before(inner: R, mut targets: Vec<u64>) -> io::Result<Indexer<R>> {
        targets.sort_unstable();
        targets.dedup();
        Self::make(
            inner,
            u64::MAX,
            Some(Targets {
                list: targets,
                next: 0,
                last: None,
            }),
        )
    }

    fn make(inner: R, span: u64, targets: Option<Targets>) -> io::Result<Indexer<R>> {
        Ok(Indexer {
            inner,
            inflater: InflaterBox(Inflater::new(GZIP)?),
            span,
            targets,
            input: 0,
            output: 0,
            member_output: 0,
            ring: Ring::new(),
            points: Vec::new(),
            between: false,
            done: false,
        })
    }

    /// The checkpoints, once the blob has been read to its end.
    pub fn into_points(mut self) -> Vec<Checkpoint> {
        // Targets past the last boundary start from it.
        if let Some(t) = self.targets.take()
            && t.next < t.list.len()
            && let Some(last) = t.last
        {
            self.points.push(last);
        }
        self.points
    }

    /// Compressed bytes read.
    pub fn input(&self) -> u64 {
        self.input
    }

    fn record(&mut self) {
        let dt = self.inflater.0.data_type();
        if dt & AT_BOUNDARY == 0 || dt & LAST_BLOCK != 0 {
            return;
        }
        if self.targets.is_some() {
            return self.record_targeted(dt);
        }
        if let Some(last) = self.points.last()
            && self.output - last.output < self.span
        {
            return;
        }
        let window = self
            .ring
            .last((self.output - self.member_output).min(WINDOW as u64) as usize);
        self.points.push(Checkpoint {
            input: self.input,
            bits: (dt & 7) as u8,
            output: self.output,
            window,
        });
    }
}

impl<R: BufRead> Indexer<R> {
    /// At a block boundary: the boundary before gives the targets this
    /// one passes; this one is kept for the targets still ahead.
    fn record_targeted(&mut self, dt: c_int) {
        let output = self.output;
        let t = self.targets.as_mut().expect("targeted");
        if t.next >= t.list.len() || t.last.as_ref().is_some_and(|l| l.output == output) {
            return;
        }
        if t.list[t.next] < output {
            while t.next < t.list.len() && t.list[t.next] < output {
                t.next += 1;
            }
            if let Some(last) = t.last.take() {
                self.points.push(last);
            }
        }
        if t.next >= t.list.len() {
            return;
        }
        let window = self
            .ring
            .last((output - self.member_output).min(WINDOW as u64) as usize);
        t.last = Some(Checkpoint {
            input: self.input,
            bits: (dt & 7) as u8,
            output,
            window,
        });
    }
}

impl<R: BufRead> Read for Indexer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.done {
                return Ok(0);
            }
            let input = self.inner.fill_buf()?;
            if input.is_empty() {
                if self.between {
                    self.done = true;
                    return Ok(0);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("gzip stream ends early at byte {}", self.input),
                ));
            }
            if self.between {
                self.inflater.0.reset(GZIP)?;
                self.member_output = self.output;
                self.between = false;
            }
            let step = self.inflater.0.inflate(input, buf, z::Z_BLOCK);
            self.inner.consume(step.consumed);
            self.input += step.consumed as u64;
            self.output += step.produced as u64;
            self.ring.push(&buf[..step.produced]);
            match step.code {
                z::Z_OK | z::Z_BUF_ERROR => self.record(),
                z::Z_STREAM_END => self.between = true,
                code => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "gzip at byte {}: {}",
                            self.input,
                            self.inflater.0.message(code)
                        ),
                    ));
                }
            }
            if step.produced > 0 {
                return Ok(step.produced);
            }
        }
    }
}

/// Fills `out` with the uncompressed bytes at `out_start..`, inflating
/// from `point`. `compressed` holds the blob's bytes from
/// [`Checkpoint::fetch_from`] on, as far as the output asked for needs
/// (more is fine; fewer is [`Error::ShortInput`]).
pub fn extract(
    point: &Checkpoint,
    compressed: &[u8],
    out_start: u64,
    out: &mut [u8],
) -> Result<(), Error> {
    let got = extract_some(point, compressed, out_start, out)?;
    if got.filled < out.len() {
        return Err(Error::ShortInput {
            at: point.fetch_from() + compressed.len() as u64,
        });
    }
    Ok(())
}

/// What [`extract_some`] made.
#[derive(Debug)]
pub struct Extracted {
    /// Bytes of `out` filled.
    pub filled: usize,
    /// The block boundaries it passed, in order: input, unused bits,
    /// output, and where that gzip member's output began if after `point`.
    boundaries: Vec<(u64, u8, u64, Option<u64>)>,
}

impl Extracted {
    /// The last block boundary at or before output `limit` (and after
    /// `point`) as a checkpoint, its window taken from `point`'s and
    /// `out` (what [`extract_some`] filled from `out_start`): a later
    /// request for bytes past it can start there instead of at `point`.
    pub fn resume_before(
        &self,
        point: &Checkpoint,
        out_start: u64,
        out: &[u8],
        limit: u64,
    ) -> Option<Checkpoint> {
        let &(input, bits, output, member) = self
            .boundaries
            .iter()
            .rev()
            .find(|b| b.2 <= limit && b.2 > point.output)?;
        // Up to 32 KiB before the boundary, not before its member's start
        // (or the point's own window's start); none if part of it was
        // skipped over rather than kept in `out`.
        let floor = member.unwrap_or(point.output - point.window.len() as u64);
        let lo = output.saturating_sub(WINDOW as u64).max(floor);
        if output < out_start
            || output - out_start > out.len() as u64
            || (lo < out_start && out_start != point.output)
        {
            return None;
        }
        let mut window = Vec::with_capacity((output - lo) as usize);
        if lo < point.output {
            let n = (point.output - lo) as usize;
            window.extend_from_slice(&point.window[point.window.len() - n..]);
        }
        let from = lo.max(out_start);
        window.extend_from_slice(&out[(from - out_start) as usize..(output - out_start) as usize]);
        Some(Checkpoint {
            input,
            bits,
            output,
            window,
        })
    }
}

/// [`extract`] as far as `compressed` goes. Running out of input is not an
/// error here; corrupt input is.
pub fn extract_some(
    point: &Checkpoint,
    compressed: &[u8],
    out_start: u64,
    out: &mut [u8],
) -> Result<Extracted, Error> {
    extract_inner(point, compressed, out_start, out, false)
}

/// [`extract_some`] from a symbol boundary inside a block
/// ([`crate::deflate::Splice`]: `at`, with its block's header): the
/// header's bits are put before the blob's bits from `at` on. Stops at
/// the end of `at`'s gzip member (the bits after it are shifted, so the
/// next member's header cannot be found). Block boundaries are reported
/// at their places in the blob, not in the spliced input.
pub fn extract_spliced(
    (header, header_bits): (&[u8], u32),
    at: &Checkpoint,
    compressed: &[u8],
    out_start: u64,
    out: &mut [u8],
) -> Result<Extracted, Error> {
    if header_bits == 0 || header.len() as u64 * 8 < u64::from(header_bits) {
        return Err(Error::Request("malformed block header"));
    }
    let input = crate::deflate::spliced(header, header_bits, at, compressed);
    let start = Checkpoint {
        input: 0,
        bits: 0,
        output: at.output,
        window: at.window.clone(),
    };
    let mut got = extract_inner(&start, &input, out_start, out, true)?;
    let data_bit = at.fetch_from() * 8 + u64::from((8 - at.bits) % 8);
    // A boundary inside the header (none, for a header zlib read whole)
    // has no place in the blob.
    got.boundaries = got
        .boundaries
        .into_iter()
        .filter_map(|(input, bits, output, member)| {
            let spliced_bit = input * 8 - u64::from(bits);
            let orig = (spliced_bit + data_bit)
                .checked_sub(u64::from(header_bits))
                .filter(|o| *o >= data_bit)?;
            Some((orig.div_ceil(8), ((8 - orig % 8) % 8) as u8, output, member))
        })
        .collect();
    Ok(got)
}

fn extract_inner(
    point: &Checkpoint,
    compressed: &[u8],
    out_start: u64,
    out: &mut [u8],
    one_member: bool,
) -> Result<Extracted, Error> {
    if out_start < point.output {
        return Err(Error::Request("output before the checkpoint"));
    }
    if point.window.len() > WINDOW || point.bits > 7 || point.window.len() as u64 > point.output {
        return Err(Error::Request("malformed checkpoint"));
    }
    let corrupt = |at: u64, why: String| Error::Corrupt { at, why };
    let mut inf = Inflater::new(RAW).map_err(|e| corrupt(point.input, e.to_string()))?;
    let mut input = compressed;
    let mut at = point.fetch_from();
    let mut filled = 0usize;
    let mut boundaries = Vec::new();
    'run: {
        if point.bits > 0 {
            let Some((&first, rest)) = input.split_first() else {
                break 'run;
            };
            inf.prime(point.bits, first >> (8 - point.bits))
                .map_err(|e| corrupt(at, e.to_string()))?;
            input = rest;
            at += 1;
        }
        inf.set_dictionary(&point.window)
            .map_err(|e| corrupt(at, e.to_string()))?;
        let mut pos = point.output;
        let mut member: Option<u64> = None;
        let mut scratch = vec![0u8; 64 << 10];
        // Inside a member's deflate stream, or skipping its 8-byte trailer
        // (`Some(left)`) before the next member's header.
        let mut trailer: Option<usize> = None;
        while filled < out.len() {
            if let Some(left) = trailer {
                let n = left.min(input.len());
                input = &input[n..];
                at += n as u64;
                if left > n || input.is_empty() {
                    break 'run;
                }
                inf.reset(GZIP).map_err(|e| corrupt(at, e.to_string()))?;
                member = Some(pos);
                trailer = None;
            }
            let skip = out_start.saturating_sub(pos);
            let target: &mut [u8] = if skip > 0 {
                let n = (skip as usize).min(scratch.len());
                &mut scratch[..n]
            } else {
                &mut out[filled..]
            };
            let step = inf.inflate(input, target, z::Z_BLOCK);
            input = &input[step.consumed..];
            at += step.consumed as u64;
            pos += step.produced as u64;
            if skip == 0 {
                filled += step.produced;
            }
            match step.code {
                z::Z_OK => {
                    let dt = inf.data_type();
                    if dt & AT_BOUNDARY != 0 && dt & LAST_BLOCK == 0 {
                        boundaries.push((at, (dt & 7) as u8, pos, member));
                    }
                }
                // The first member is inflated raw from the checkpoint, so
                // its 8-byte trailer is left to skip; later ones are read
                // as gzip, trailer included.
                z::Z_STREAM_END if one_member => break 'run,
                z::Z_STREAM_END => trailer = Some(if member.is_none() { 8 } else { 0 }),
                z::Z_BUF_ERROR if input.is_empty() => break 'run,
                z::Z_BUF_ERROR => {}
                code => return Err(corrupt(at, inf.message(code))),
            }
            if step.consumed == 0 && step.produced == 0 && step.code != z::Z_STREAM_END {
                break 'run;
            }
        }
    }
    Ok(Extracted { filled, boundaries })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::io::Write;

    /// Text-like data with long-range repeats (so back-references cross
    /// checkpoints) and incompressible stretches (stored blocks, odd bit
    /// positions).
    fn sample(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let words: Vec<Vec<u8>> = (0..300)
            .map(|_| {
                (0..rng.random_range(2..12))
                    .map(|_| rng.random_range(b'a'..=b'z'))
                    .collect()
            })
            .collect();
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            match rng.random_range(0..10) {
                0 => {
                    let n = rng.random_range(100..5000);
                    out.extend((0..n).map(|_| rng.random::<u8>()));
                }
                1 if out.len() > 40_000 => {
                    let from = out.len() - rng.random_range(1000..32_000);
                    let n = rng.random_range(100..3000);
                    for i in 0..n {
                        out.push(out[from + i]);
                    }
                }
                _ => {
                    for _ in 0..rng.random_range(10..200) {
                        out.extend_from_slice(&words[rng.random_range(0..words.len())]);
                        out.push(b' ');
                    }
                }
            }
        }
        out.truncate(len);
        out
    }

    fn gzip(data: &[u8], level: u32) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn index(gz: &[u8], span: u64) -> (Vec<u8>, Vec<Checkpoint>) {
        let mut ix = Indexer::new(io::BufReader::with_capacity(7000, gz), span).unwrap();
        let mut out = Vec::new();
        ix.read_to_end(&mut out).unwrap();
        assert_eq!(ix.input(), gz.len() as u64, "every byte read");
        (out, ix.into_points())
    }

    /// The bytes at `start..start+len` produced from the nearest
    /// checkpoint, given exactly the compressed bytes up to `upto`.
    fn produce(gz: &[u8], points: &[Checkpoint], start: u64, len: usize, upto: usize) -> Vec<u8> {
        let p = points.iter().rev().find(|p| p.output <= start).unwrap();
        let mut out = vec![0u8; len];
        extract(p, &gz[p.fetch_from() as usize..upto], start, &mut out).unwrap();
        out
    }

    #[test]
    fn any_range_comes_from_its_nearest_checkpoint() {
        let data = sample(3 << 20, 1);
        for level in [1, 6, 9] {
            let gz = gzip(&data, level);
            let (out, points) = index(&gz, 256 << 10);
            assert_eq!(out, data, "level {level}: inflates like gzip");
            assert!(
                points.len() >= 8,
                "level {level}: {} checkpoints",
                points.len()
            );
            assert!(
                points.iter().any(|p| p.bits != 0),
                "level {level}: some boundaries are not byte-aligned"
            );
            let mut rng = rand::rngs::StdRng::seed_from_u64(level.into());
            for _ in 0..40 {
                let start = rng.random_range(0..data.len() - 1);
                let len = rng.random_range(1..(data.len() - start).min(600_000));
                let got = produce(&gz, &points, start as u64, len, gz.len());
                assert!(
                    got == data[start..start + len],
                    "level {level}: {start}+{len}"
                );
            }
        }
    }

    #[test]
    fn the_next_checkpoint_bounds_the_bytes_a_range_needs() {
        let data = sample(2 << 20, 2);
        let gz = gzip(&data, 6);
        let (_, points) = index(&gz, 128 << 10);
        for w in points.windows(3) {
            // Everything before the checkpoint after next comes from the
            // compressed bytes up to (and including the partial byte of)
            // that checkpoint.
            let (a, c) = (&w[0], &w[2]);
            let len = (c.output - a.output) as usize;
            let got = produce(&gz, &points, a.output, len, c.input as usize);
            assert!(got == data[a.output as usize..c.output as usize]);
        }
    }

    #[test]
    fn a_request_can_go_on_from_where_the_last_one_stopped() {
        let data = sample(3 << 20, 6);
        let gz = gzip(&data, 6);
        let (_, points) = index(&gz, 1 << 20);
        // From the first checkpoint, with only part of the bytes: the
        // resume point lies inside what was made.
        let p = &points[0];
        let mut out = vec![0u8; 900_000];
        let got = extract_some(p, &gz[p.fetch_from() as usize..200_000], 0, &mut out).unwrap();
        assert!(
            got.filled > 100_000 && got.filled < 900_000,
            "{}",
            got.filled
        );
        assert!(out[..got.filled] == data[..got.filled]);
        let mut r = got
            .resume_before(p, 0, &out[..got.filled], u64::MAX)
            .expect("a block boundary was passed");
        assert!(r.output > 0 && r.output <= got.filled as u64);
        assert!(r.window.len() == WINDOW);
        // Resuming there, again and again, makes the rest of the blob.
        let mut made = data[..r.output as usize].to_vec();
        while (made.len() as u64) < data.len() as u64 {
            let from = r.fetch_from() as usize;
            let end = (from + 150_000).min(gz.len());
            let mut out = vec![0u8; data.len() - made.len()];
            let got = extract_some(&r, &gz[from..end], r.output, &mut out).unwrap();
            assert!(out[..got.filled] == data[made.len()..made.len() + got.filled]);
            match got.resume_before(&r, r.output, &out[..got.filled], u64::MAX) {
                Some(next) if next.output > r.output => {
                    made.truncate(r.output as usize);
                    made.extend_from_slice(&data[r.output as usize..next.output as usize]);
                    r = next;
                }
                _ => {
                    assert_eq!(end, gz.len(), "no progress before the end");
                    made.extend_from_slice(&out[..got.filled]);
                    break;
                }
            }
        }
        assert!(made == data);
    }

    #[test]
    fn ranges_across_many_members_come_out_whole() {
        // One member per "file", as eStargz layers are: a range from one
        // checkpoint crosses several member ends.
        let parts: Vec<Vec<u8>> = (0..6)
            .map(|i| sample(40_000 + i * 7_000, 10 + i as u64))
            .collect();
        let mut gz = Vec::new();
        let mut all = Vec::new();
        for p in &parts {
            gz.extend(gzip(p, 6));
            all.extend_from_slice(p);
        }
        let (out, points) = index(&gz, 32 << 10);
        assert_eq!(out, all);
        for start in [0u64, 1000, 39_999, 50_000, 120_000] {
            let len = all.len() - start as usize;
            let got = produce(&gz, &points, start, len, gz.len());
            assert!(got == all[start as usize..], "from {start}");
        }
    }

    #[test]
    fn members_are_followed_and_short_input_is_an_error() {
        let a = sample(300 << 10, 3);
        let b = sample(500 << 10, 4);
        let mut gz = gzip(&a, 6);
        let first_len = gz.len();
        gz.extend(gzip(&b, 1));
        let (out, points) = index(&gz, 64 << 10);
        let mut all = a.clone();
        all.extend_from_slice(&b);
        assert_eq!(out, all);
        // A range across the member boundary, from a checkpoint in the
        // first member.
        let start = a.len() as u64 - 100_000;
        let got = produce(&gz, &points, start, 300_000, gz.len());
        assert!(got == all[start as usize..start as usize + 300_000]);
        assert!(points.iter().any(|p| p.input > first_len as u64));

        // Too few compressed bytes: an error, not zeros.
        let p = &points[1];
        let mut out = vec![0u8; 200_000];
        let from = p.fetch_from() as usize;
        let e = extract(p, &gz[from..from + 1000], p.output, &mut out).unwrap_err();
        assert!(matches!(e, Error::ShortInput { .. }), "{e}");
        // Garbage where deflate data should be: an error.
        let mut bad = gz[from..].to_vec();
        for b in bad.iter_mut().skip(10).take(4000) {
            *b = 0xff;
        }
        let e = extract(p, &bad, p.output, &mut out).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    }

    #[test]
    fn targeted_checkpoints_are_the_last_boundary_before_each_target() {
        let data = sample(3 << 20, 5);
        let gz = gzip(&data, 6);
        // Every boundary, to check the choice against.
        let (_, all) = index(&gz, WINDOW as u64);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut targets: Vec<u64> = (0..60)
            .map(|_| rng.random_range(0..data.len() as u64))
            .collect();
        // Two targets in one block share a checkpoint; one past the last
        // boundary starts from it.
        targets.push(targets[0] + 1);
        targets.push(data.len() as u64 - 1);
        let mut ix =
            Indexer::before(io::BufReader::with_capacity(5000, &gz[..]), targets.clone()).unwrap();
        let mut out = Vec::new();
        ix.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        let points = ix.into_points();
        assert!(points.windows(2).all(|w| w[0].output < w[1].output));
        assert!(points.len() < targets.len(), "{} points", points.len());
        for &t in &targets {
            let p = points
                .iter()
                .rev()
                .find(|p| p.output <= t)
                .expect("a point before");
            // No boundary the span indexer saw lies between it and the
            // target (it recorded one at least every 32 KiB).
            let closer = all
                .iter()
                .filter(|q| q.output > p.output && q.output <= t)
                .count();
            assert_eq!(closer, 0, "target {t}: checkpoint at {}", p.output);
            let len = 5000.min(data.len() - t as usize);
            let got = produce(&gz, std::slice::from_ref(p), t, len, gz.len());
            assert!(got == data[t as usize..t as usize + len], "target {t}");
        }
        // A target exactly at a boundary gets that boundary.
        let b = all[all.len() / 2].output;
        let mut ix = Indexer::before(&gz[..], vec![b]).unwrap();
        io::copy(&mut ix, &mut io::sink()).unwrap();
        assert_eq!(ix.into_points()[0].output, b);
    }

    #[test]
    fn reads_start_inside_a_block_from_a_spliced_header() {
        let data = sample(3 << 20, 11);
        for level in [6, 9] {
            let gz = gzip(&data, level);
            let mut rng = rand::rngs::StdRng::seed_from_u64(level.into());
            let targets: Vec<u64> = (0..40)
                .map(|_| rng.random_range(40_000..data.len() as u64 - 400_000))
                .collect();
            let mut ix = Indexer::before(&gz[..], targets.clone()).unwrap();
            io::copy(&mut ix, &mut io::sink()).unwrap();
            let points = ix.into_points();
            let (mut spliced, mut from_block, mut from_symbol) = (0, 0u64, 0u64);
            for &t in &targets {
                let p = points.iter().rev().find(|p| p.output <= t).unwrap();
                let Some(s) = crate::deflate::splice_before(p, &gz[p.fetch_from() as usize..], t)
                else {
                    continue;
                };
                spliced += 1;
                assert!(s.at.output <= t && s.at.output > p.output, "{t}");
                assert!(s.at.input > p.input);
                from_block += t - p.output;
                from_symbol += t - s.at.output;
                // A read there, and one running far past the block.
                for len in [4096usize, 300_000] {
                    let mut out = vec![0u8; len];
                    let got = extract_spliced(
                        (&s.header, s.header_bits),
                        &s.at,
                        &gz[s.at.fetch_from() as usize..],
                        t,
                        &mut out,
                    )
                    .unwrap();
                    assert_eq!(got.filled, len);
                    assert!(
                        out == data[t as usize..t as usize + len],
                        "level {level}: {t}+{len}"
                    );
                    // The boundaries passed are places in the blob: a
                    // later request goes on from one.
                    if len > 4096 {
                        let r = got
                            .resume_before(&s.at, t, &out, t + 250_000)
                            .expect("a boundary passed");
                        assert!(r.output > s.at.output && r.output <= t + 250_000);
                        let mut more = vec![0u8; 2000];
                        extract(&r, &gz[r.fetch_from() as usize..], r.output, &mut more).unwrap();
                        assert!(more == data[r.output as usize..r.output as usize + 2000]);
                    }
                }
                // The bytes before the splice point are not needed.
                let mut out = vec![0u8; 100];
                let short = &gz[s.at.fetch_from() as usize..s.at.fetch_from() as usize + 50_000];
                extract_spliced((&s.header, s.header_bits), &s.at, short, t, &mut out).unwrap();
                assert!(out == data[t as usize..t as usize + 100]);
            }
            assert!(spliced >= 30, "level {level}: {spliced} of 40 spliced");
            // A symbol is a few bytes; a block is thousands of them.
            assert!(
                from_symbol * 20 < from_block,
                "level {level}: {from_symbol} bytes from symbols, {from_block} from blocks"
            );
        }
    }

    #[test]
    fn a_trimmed_window_and_the_exact_bytes_make_the_stretch_it_was_made_for() {
        let data = sample(3 << 20, 13);
        let gz = gzip(&data, 6);
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let targets: Vec<u64> = (0..30)
            .map(|_| rng.random_range(100_000..data.len() as u64 - 200_000))
            .collect();
        let mut ix = Indexer::before(&gz[..], targets.clone()).unwrap();
        io::copy(&mut ix, &mut io::sink()).unwrap();
        let points = ix.into_points();
        let (mut kept, mut whole, mut near_kept) = (0usize, 0usize, 0usize);
        for (n, &t) in targets.iter().enumerate() {
            let b = points.iter().rev().find(|p| p.output <= t).unwrap();
            let block = &gz[b.fetch_from() as usize..];
            // From a splice inside the block, and from the boundary.
            let starts: Vec<(Vec<u8>, u32, Checkpoint)> =
                match crate::deflate::splice_before(b, block, t) {
                    Some(s) if n % 2 == 0 => vec![(s.header, s.header_bits, s.at)],
                    _ => vec![(Vec::new(), 0, b.clone())],
                };
            for (header, header_bits, at) in starts {
                let len = 20_000 + (n as u64 * 7919) % 60_000;
                let to = t + len;
                let from = &gz[at.fetch_from() as usize..];
                let r = crate::deflate::reach((&header, header_bits), &at, from, to).unwrap();
                assert!(r.output >= to, "{t}");
                assert_eq!(r.window.len(), at.window.len());
                kept += r.window.iter().filter(|b| **b != 0).count();
                whole += at.window.len();
                // Only the bytes up to `input`, and the trimmed window:
                // the stretch comes out whole, from its start to `to`.
                let trimmed = Checkpoint {
                    window: r.window.clone(),
                    ..at.clone()
                };
                let exact = &gz[at.fetch_from() as usize..(r.input as usize).min(gz.len())];
                let make = |bytes: &[u8], out: &mut [u8]| {
                    if header_bits == 0 {
                        extract_some(&trimmed, bytes, at.output, out)
                    } else {
                        extract_spliced((&header, header_bits), &trimmed, bytes, at.output, out)
                    }
                };
                let mut out = vec![0u8; (to - at.output) as usize];
                let got = make(exact, &mut out).unwrap();
                assert_eq!(got.filled, out.len(), "{t}: the exact bytes fall short");
                assert!(out == data[at.output as usize..to as usize], "{t}");
                // The trimmed window serves on past the stretch, as far as
                // the layer goes.
                let far = (to + 300_000).min(data.len() as u64);
                let mut on = vec![0u8; (far - at.output) as usize];
                let got = make(from, &mut on).unwrap();
                assert_eq!(got.filled, on.len());
                assert!(
                    on == data[at.output as usize..far as usize],
                    "{t}: past the stretch"
                );
                // A few bytes fewer fall short: `input` is not a margin.
                let short = &exact[..exact.len() - 3];
                let got = make(short, &mut out);
                assert!(
                    got.is_err() || got.unwrap().filled < out.len(),
                    "{t}: needs its last byte"
                );
                // Decoding only to a nearer target keeps a part of that
                // window, which still makes the bytes up to the target.
                let near = t + 3_000;
                let e =
                    crate::deflate::reach_exact((&header, header_bits), &at, from, near).unwrap();
                assert!(
                    e.window
                        .iter()
                        .zip(&r.window)
                        .all(|(a, b)| *a == 0 || a == b),
                    "{t}: keeps only what the whole reach keeps"
                );
                near_kept += e.window.iter().filter(|b| **b != 0).count();
                let cut = Checkpoint {
                    window: e.window,
                    ..at.clone()
                };
                let mut out = vec![0u8; (near - at.output) as usize];
                let got = if header_bits == 0 {
                    extract_some(&cut, from, at.output, &mut out)
                } else {
                    extract_spliced((&header, header_bits), &cut, from, at.output, &mut out)
                }
                .unwrap();
                assert_eq!(got.filled, out.len());
                assert!(out == data[at.output as usize..near as usize], "{t}: near");
            }
        }
        // Part of a window is never reached, and less of it by less output.
        assert!(kept < whole * 9 / 10, "{kept} of {whole} window bytes kept");
        assert!(
            near_kept < kept,
            "{near_kept} kept for the near targets, {kept} for 32 KiB"
        );
        // A corrupt stream is not reached through.
        let b = points
            .iter()
            .rev()
            .find(|p| p.output <= targets[0])
            .unwrap();
        let mut bad = gz[b.fetch_from() as usize..].to_vec();
        bad.truncate(64);
        assert!(crate::deflate::reach((&[], 0), b, &bad, targets[0] + 100_000).is_none());
    }

    /// Stored blocks (incompressible bytes) start at the blob's byte
    /// boundaries, wherever a checkpoint's bit lies: windows before them
    /// are trimmed and serve reads across them.
    #[test]
    fn windows_are_trimmed_across_stored_blocks() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let mut data = sample(400_000, 21);
        let noise: Vec<u8> = (0..300_000).map(|_| rng.random()).collect();
        data.extend_from_slice(&noise);
        data.extend_from_slice(&sample(200_000, 22));
        let gz = gzip(&data, 6);
        let (_, points) = index(&gz, 64 << 10);
        let mut across = 0;
        for p in points.iter().filter(|p| !p.window.is_empty()) {
            let to = p.output + 120_000;
            if to > data.len() as u64 {
                continue;
            }
            let from = &gz[p.fetch_from() as usize..];
            let r = crate::trim::trim((&[], 0), p, from, to)
                .unwrap_or_else(|| panic!("checkpoint at {} (bits {})", p.output, p.bits));
            let cut = Checkpoint {
                window: r.window.clone(),
                ..p.clone()
            };
            let mut out = vec![0u8; (to - p.output) as usize];
            extract(&cut, from, p.output, &mut out).unwrap();
            assert!(out == data[p.output as usize..to as usize], "{}", p.output);
            if p.output < 400_000 && to > 400_000 {
                across += 1;
            }
        }
        assert!(across > 0, "no checkpoint before the stored blocks");
    }

    #[test]
    fn a_spliced_read_with_a_wrong_header_is_an_error_or_other_bytes() {
        let data = sample(1 << 20, 12);
        let gz = gzip(&data, 6);
        let t = 700_000;
        let mut ix = Indexer::before(&gz[..], vec![t]).unwrap();
        io::copy(&mut ix, &mut io::sink()).unwrap();
        let p = ix.into_points().pop().unwrap();
        let s = crate::deflate::splice_before(&p, &gz[p.fetch_from() as usize..], t).unwrap();
        let mut header = s.header.clone();
        header[3] ^= 0x5a;
        let mut out = vec![0u8; 4096];
        let got = extract_spliced(
            (&header, s.header_bits),
            &s.at,
            &gz[s.at.fetch_from() as usize..],
            t,
            &mut out,
        );
        assert!(got.is_err() || out[..] != data[t as usize..t as usize + 4096]);
        assert!(extract_spliced((&header, 0), &s.at, &gz, t, &mut out).is_err());
    }

    #[test]
    fn a_truncated_or_foreign_blob_does_not_index() {
        let gz = gzip(&sample(200 << 10, 5), 6);
        let mut out = Vec::new();
        let e = Indexer::new(&gz[..gz.len() / 2], 32 << 10)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = Indexer::new(&b"not gzip at all"[..], 32 << 10)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
