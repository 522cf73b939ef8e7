//! Places to start inflating inside a deflate block, not only at its
//! start.
//!
//! zlib reports where blocks begin (`Z_BLOCK`), and a checkpoint there is
//! all [`zran`](crate::zran) needs. But a block of text at level 6 holds
//! about 16,000 symbols, often a few hundred KiB of output: a read in the
//! middle of one fetches everything from the block's start. A decoder can
//! instead start at any symbol boundary if it is first given the block's
//! header (its Huffman tables): the header's bits, then the stream's bits
//! from that symbol on, are a valid deflate stream that makes the same
//! output. [`splice_before`] finds, for a target offset, the last symbol
//! boundary at or before it and the header to prepend; [`spliced`] builds
//! the input a decoder then reads.
//!
//! Written by hand because no inflate API reports the bit position of a
//! symbol inside a block (zlib's `data_type` flags block boundaries only).
//! It decodes one block from a block-boundary checkpoint, slowly and
//! simply (canonical Huffman codes decoded bit by bit, as zlib's
//! `contrib/puff` describes the format), at `hb image prefetch push`: never
//! on a node's read path, where zlib inflates the spliced stream.

use crate::zran::{Checkpoint, WINDOW};

/// A symbol boundary to start from, with what a decoder needs there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splice {
    /// The block's header bits (BFINAL, BTYPE, and for a dynamic block its
    /// code lengths), packed from bit 0 of byte 0.
    pub header: Vec<u8>,
    /// How many bits of `header` are the header.
    pub header_bits: u32,
    /// The symbol boundary, as a checkpoint: its position in the blob, its
    /// offset in the output, and the output before it.
    pub at: Checkpoint,
}

/// The most output between a block boundary and a target this decodes.
pub const MAX_REACH: u64 = 32 << 20;

/// The most header bits a block may have (code length codes and 316 code
/// lengths of at most 7 bits each, well under this).
pub const MAX_HEADER_BITS: u32 = 4096;

struct Bits<'a> {
    data: &'a [u8],
    /// Bit position from the start of `data`.
    pos: u64,
}

impl Bits<'_> {
    fn bit(&mut self) -> Option<u32> {
        let byte = *self.data.get((self.pos / 8) as usize)?;
        let b = (byte >> (self.pos % 8)) & 1;
        self.pos += 1;
        Some(b.into())
    }

    fn get(&mut self, n: u32) -> Option<u32> {
        let mut v = 0;
        for i in 0..n {
            v |= self.bit()? << i;
        }
        Some(v)
    }
}

/// A canonical Huffman code: how many codes of each length, and the
/// symbols in code order.
struct Huffman {
    count: [u16; 16],
    symbol: Vec<u16>,
}

impl Huffman {
    fn new(lengths: &[u8]) -> Option<Huffman> {
        let mut count = [0u16; 16];
        for &l in lengths {
            count[l as usize] += 1;
        }
        // Over-subscribed codes are invalid; incomplete ones are allowed
        // (a single distance code), as zlib allows them.
        let mut left: i32 = 1;
        for &c in &count[1..] {
            left = (left << 1) - i32::from(c);
            if left < 0 {
                return None;
            }
        }
        let mut offs = [0u16; 16];
        for len in 1..15 {
            offs[len + 1] = offs[len] + count[len];
        }
        let mut symbol = vec![0u16; lengths.len()];
        for (s, &l) in lengths.iter().enumerate() {
            if l != 0 {
                symbol[offs[l as usize] as usize] = s as u16;
                offs[l as usize] += 1;
            }
        }
        Some(Huffman { count, symbol })
    }

    fn decode(&self, bits: &mut Bits<'_>) -> Option<u16> {
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for len in 1..16 {
            code |= bits.bit()? as i32;
            let count = i32::from(self.count[len]);
            if code - count < first {
                return self.symbol.get((index + code - first) as usize).copied();
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
        None
    }
}

const LEN_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LEN_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
/// The order code length code lengths come in.
const ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

/// The length and distance of the back-reference length symbol `sym`
/// (257–285) starts, read from `bits` with the block's distance code.
fn back_reference(sym: u16, dist: &Huffman, bits: &mut Bits<'_>) -> Option<(usize, usize)> {
    let k = usize::from(sym - 257);
    let len = usize::from(LEN_BASE[k]) + bits.get(LEN_EXTRA[k].into())? as usize;
    let d = usize::from(dist.decode(bits)?);
    if d >= 30 {
        return None;
    }
    let back = usize::from(DIST_BASE[d]) + bits.get(DIST_EXTRA[d].into())? as usize;
    Some((len, back))
}

/// The literal/length and distance codes of a block whose header `bits`
/// is at (after BFINAL and BTYPE).
fn tables(btype: u32, bits: &mut Bits<'_>) -> Option<(Huffman, Huffman)> {
    if btype == 1 {
        let mut l = [0u8; 288];
        l[..144].fill(8);
        l[144..256].fill(9);
        l[256..280].fill(7);
        l[280..].fill(8);
        return Some((Huffman::new(&l)?, Huffman::new(&[5u8; 30])?));
    }
    let nlen = bits.get(5)? as usize + 257;
    let ndist = bits.get(5)? as usize + 1;
    let ncode = bits.get(4)? as usize + 4;
    if nlen > 286 || ndist > 30 {
        return None;
    }
    let mut cl = [0u8; 19];
    for &o in &ORDER[..ncode] {
        cl[o] = bits.get(3)? as u8;
    }
    let clh = Huffman::new(&cl)?;
    let mut lengths = vec![0u8; nlen + ndist];
    let mut i = 0;
    while i < lengths.len() {
        let sym = clh.decode(bits)?;
        let (value, times) = match sym {
            0..=15 => (sym as u8, 1),
            16 => (*lengths.get(i.checked_sub(1)?)?, 3 + bits.get(2)? as usize),
            17 => (0, 3 + bits.get(3)? as usize),
            18 => (0, 11 + bits.get(7)? as usize),
            _ => return None,
        };
        if i + times > lengths.len() {
            return None;
        }
        lengths[i..i + times].fill(value);
        i += times;
    }
    if lengths[256] == 0 {
        return None;
    }
    Some((
        Huffman::new(&lengths[..nlen])?,
        Huffman::new(&lengths[nlen..])?,
    ))
}

/// The last symbol boundary at or before output offset `target` in the
/// block that starts at `point` (a block boundary), with the block's
/// header. `compressed` holds the blob's bytes from
/// [`Checkpoint::fetch_from`] on, at least to the block's end.
///
/// `None` when starting at `point` itself is as good (the target is at or
/// before the block's first symbol, or the block is stored, whose bytes
/// cost what they are), or when the bytes do not decode as a block that
/// reaches the target (past its end, truncated, corrupt): then `point`
/// serves.
pub fn splice_before(point: &Checkpoint, compressed: &[u8], target: u64) -> Option<Splice> {
    let start = if point.bits > 0 {
        8 - u64::from(point.bits)
    } else {
        0
    };
    let mut bits = Bits {
        data: compressed,
        pos: start,
    };
    // A node inflates at most 32 MiB for one request: a checkpoint
    // further from its target is no use, and the block's output is held
    // here whole.
    if target.saturating_sub(point.output) > MAX_REACH {
        return None;
    }
    let _last = bits.get(1)?;
    let btype = bits.get(2)?;
    if btype == 0 || btype == 3 {
        return None;
    }
    let (lit, dist) = tables(btype, &mut bits)?;
    let header_bits = u32::try_from(bits.pos - start).ok()?;
    if header_bits > MAX_HEADER_BITS {
        return None;
    }
    // The output before the point, then the block's: references reach
    // back into both.
    let mut out = point.window.clone();
    let base = point.output - out.len() as u64;
    let mut best = None;
    loop {
        let here = base + out.len() as u64;
        if here > target {
            break;
        }
        if bits.pos > start + u64::from(header_bits) {
            best = Some((bits.pos, here));
        }
        let sym = lit.decode(&mut bits)?;
        match sym {
            0..=255 => out.push(sym as u8),
            256 => break,
            257..=285 => {
                let (len, back) = back_reference(sym, &dist, &mut bits)?;
                let from = out.len().checked_sub(back)?;
                for j in 0..len {
                    out.push(out[from + j]);
                }
            }
            _ => return None,
        }
    }
    let (pos, output) = best?;
    let mut header = Vec::new();
    let mut h = Bits {
        data: compressed,
        pos: start,
    };
    pack(&mut header, header_bits, || h.bit().expect("decoded above"));
    // The point's window holds only its gzip member's output: so does
    // this one.
    let before = (output - base) as usize;
    let window = out[before.saturating_sub(WINDOW)..before].to_vec();
    let abs = point.fetch_from() * 8 + pos;
    Some(Splice {
        header,
        header_bits,
        at: Checkpoint {
            input: abs.div_ceil(8),
            bits: ((8 - abs % 8) % 8) as u8,
            output,
            window,
        },
    })
}

/// What inflating from a checkpoint takes: the window bytes
/// back-references reach, and the blob bytes up to a target.
///
/// A back-reference reaches at most 32 KiB back, so only the first 32 KiB
/// of output after a checkpoint can refer to its window. Decoding that far
/// shows which window bytes are ever used; the others can be zeros, which
/// cost nothing in the window's zstd frame (a 32 KiB window of text is
/// about 11 KiB compressed, and the part a stretch of text refers to is
/// often a fraction of it). The trimmed window then serves every read from
/// the checkpoint, as the whole one does. Decoding on to the target (the
/// end of the reads the checkpoint was learned for) tells a node exactly
/// which bytes to fetch for them instead of an estimate with a margin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    /// The checkpoint's window with every byte no reference reaches set
    /// to 0.
    pub window: Vec<u8>,
    /// Where the symbol that reaches the target ends in the output (at or
    /// past the target), or the end of the gzip member if that comes
    /// first.
    pub output: u64,
    /// Offset in the blob up to which a node fetches to inflate that far:
    /// one past the last byte whose bits it read, and one more, for the
    /// bits [`spliced`] leaves out of a stream's last byte.
    pub input: u64,
}

/// Decodes from checkpoint `at` (with `header`, the bits of its block's
/// header when it lies inside a block, as a [`Splice`] has them; empty
/// at a block boundary) to output `to` and at least 32 KiB past the
/// checkpoint, noting which window bytes back-references reach.
/// `compressed` holds the blob from [`Checkpoint::fetch_from`] on, as far
/// as that goes.
///
/// `None` when the bytes do not decode that far (truncated, corrupt) or
/// the target is further than a node would inflate ([`MAX_REACH`]).
pub fn reach(header: (&[u8], u32), at: &Checkpoint, compressed: &[u8], to: u64) -> Option<Reach> {
    reach_until(
        header,
        at,
        compressed,
        to,
        to.max(at.output + WINDOW as u64),
    )
}

/// As [`reach`], but decoding only to `to`: the window keeps just the
/// bytes the output up to `to` refers to. Such a window serves reads that
/// end by `to` and no others (a later byte may refer to one it zeroed),
/// so nodes never get one; it prices what a reader of exactly those bytes
/// needs from the window (the bench's floor, `hyperbox_integration::reads`).
pub fn reach_exact(
    header: (&[u8], u32),
    at: &Checkpoint,
    compressed: &[u8],
    to: u64,
) -> Option<Reach> {
    reach_until(header, at, compressed, to, to)
}

fn reach_until(
    (header, header_bits): (&[u8], u32),
    at: &Checkpoint,
    compressed: &[u8],
    to: u64,
    until: u64,
) -> Option<Reach> {
    if to.saturating_sub(at.output) > MAX_REACH || header_bits > MAX_HEADER_BITS {
        return None;
    }
    // The stream a node's inflater reads from this checkpoint: the
    // header's bits, then the blob's from the checkpoint's bit on.
    let stream = spliced(header, header_bits, at, compressed);
    let mut bits = Bits {
        data: &stream,
        pos: 0,
    };
    let wlen = at.window.len();
    let mut used = vec![false; wlen];
    let mut out = at.window.clone();
    let base = at.output - wlen as u64;
    // The stream's bit `header_bits + k` is the blob's bit `first + k`
    // counted from `fetch_from`'s first bit.
    let first = if at.bits > 0 {
        8 - u64::from(at.bits)
    } else {
        0
    };
    // Where the target was reached: output, and the stream's bit.
    let mut target: Option<(u64, u64)> = None;
    let note = |out: &Vec<u8>, pos: u64, target: &mut Option<(u64, u64)>| {
        let here = base + out.len() as u64;
        if target.is_none() && here >= to {
            *target = Some((here, pos));
        }
        here >= until
    };
    'blocks: while !note(&out, bits.pos, &mut target) {
        let last = bits.get(1)?;
        let btype = bits.get(2)?;
        if btype == 3 {
            return None;
        }
        if btype == 0 {
            // A stored block starts at the blob's next byte boundary, which
            // in the stream is offset by the header and the first bits.
            let blob_bit = (first + bits.pos).checked_sub(header_bits.into())?;
            bits.pos = blob_bit.div_ceil(8) * 8 + u64::from(header_bits) - first;
            let len = bits.get(16)?;
            if bits.get(16)? != !len & 0xffff {
                return None;
            }
            for _ in 0..len {
                out.push(bits.get(8)? as u8);
                if note(&out, bits.pos, &mut target) {
                    break 'blocks;
                }
            }
        } else {
            let (lit, dist) = tables(btype, &mut bits)?;
            loop {
                if note(&out, bits.pos, &mut target) {
                    break 'blocks;
                }
                match lit.decode(&mut bits)? {
                    sym @ 0..=255 => out.push(sym as u8),
                    256 => break,
                    sym @ 257..=285 => {
                        let (len, back) = back_reference(sym, &dist, &mut bits)?;
                        let from = out.len().checked_sub(back)?;
                        for j in from..from + len {
                            if j < wlen {
                                used[j] = true;
                            }
                            out.push(out[j]);
                        }
                    }
                    _ => return None,
                }
            }
        }
        if last == 1 {
            // The member's end: nothing after it refers to this window.
            break;
        }
    }
    let (output, pos) = target.unwrap_or((base + out.len() as u64, bits.pos));
    let mut window = at.window.clone();
    for (b, u) in window.iter_mut().zip(&used) {
        if !u {
            *b = 0;
        }
    }
    let read = (first + pos).checked_sub(header_bits.into())?;
    Some(Reach {
        window,
        output,
        input: at.fetch_from() + read.div_ceil(8) + 1,
    })
}

/// Packs `n` bits from `next` into `out`, least significant first.
fn pack(out: &mut Vec<u8>, n: u32, mut next: impl FnMut() -> u32) {
    for i in 0..n {
        if i % 8 == 0 {
            out.push(0);
        }
        *out.last_mut().expect("pushed") |= (next() as u8) << (i % 8);
    }
}

/// The input a raw inflater reads to start at a [`Splice`]: the header's
/// bits, then the blob's bits from the splice point on, in whole bytes
/// (up to 7 of the last bits left out). `compressed` holds the blob from
/// `at.fetch_from()` on.
pub fn spliced(header: &[u8], header_bits: u32, at: &Checkpoint, compressed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header.len() + compressed.len() + 1);
    let mut acc: u64 = 0;
    let mut n: u32 = 0;
    let mut put = |v: u64, bits: u32, out: &mut Vec<u8>| {
        acc |= v << n;
        n += bits;
        while n >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            n -= 8;
        }
    };
    for i in 0..header_bits {
        let b = (header[(i / 8) as usize] >> (i % 8)) & 1;
        put(b.into(), 1, &mut out);
    }
    let mut data = compressed;
    if at.bits > 0
        && let Some((&first, rest)) = data.split_first()
    {
        put(
            u64::from(first >> (8 - at.bits)),
            u32::from(at.bits),
            &mut out,
        );
        data = rest;
    }
    for &b in data {
        put(b.into(), 8, &mut out);
    }
    // The last few bits are left out rather than padded: zlib would read
    // padding as stream bits (a literal, or an end of block, that the
    // blob does not have). Whoever fetched these bytes fetched a margin.
    out
}
