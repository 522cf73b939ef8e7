//! Windows trimmed to the bytes back-references reach.
//!
//! A checkpoint's window is the 32 KiB of output before it, about 11 KiB
//! once compressed for text: most of what a layer map or a learned
//! checkpoint costs. But a back-reference reaches at most 32 KiB back, so
//! only the first 32 KiB of output after a checkpoint can refer to the
//! window, and [`crate::deflate::reach`] decoding that far shows which of
//! its bytes are ever used. The others are set to zero, which costs
//! nothing in the window's zstd frame, and the trimmed window serves every
//! read from the checkpoint exactly as the whole one does (a reader that
//! predates trimming reads it the same way).
//!
//! The decoder that finds the used bytes is the hand-written one of
//! [`crate::deflate`]; before a trimmed window is kept, zlib inflates the
//! same 32 KiB (or up to a later target) from both windows and the outputs
//! must agree.

use crate::deflate::{self, Reach};
use crate::zran::{self, Checkpoint, WINDOW};

/// How many blob bytes from a checkpoint's [`Checkpoint::fetch_from`]
/// [`trim`] needs to decode `reach` bytes of output past it: at least a
/// window's worth, and deflate never takes much more than it makes
/// (stored blocks add 5 bytes per 64 KiB, a block header a few hundred).
pub fn read_for(reach: u64) -> usize {
    (reach.clamp(WINDOW as u64, deflate::MAX_REACH) + (64 << 10)) as usize
}

/// Up to `len` bytes of `file` from offset `from`: as many as it has
/// (a checkpoint near the blob's end reads to the end).
pub fn read_blob(file: &std::fs::File, from: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt as _;
    let mut buf = vec![0u8; len];
    let mut n = 0;
    while n < len {
        match file.read_at(&mut buf[n..], from + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    buf.truncate(n);
    Ok(buf)
}

/// Decodes from `at` (with `header`, its block's header bits when it lies
/// inside a block; empty at a block boundary) to `to`, as
/// [`deflate::reach`] does, and checks the trimmed window against zlib:
/// from it and from the whole window, the output agrees as far as the
/// window may be referred to (or to `to`, if later); and the blob bytes
/// up to [`Reach::input`] make the output up to [`Reach::output`].
/// `compressed` holds the blob from `at.fetch_from()` on ([`read_for`]
/// bytes, or to its end). `None` when any of that fails: keep the whole
/// window.
pub fn trim(
    (header, header_bits): (&[u8], u32),
    at: &Checkpoint,
    compressed: &[u8],
    to: u64,
) -> Option<Reach> {
    checked((header, header_bits), at, compressed, to, false)
}

/// As [`trim`], but the window keeps only what the output up to `to`
/// refers to ([`deflate::reach_exact`]), checked that far: it serves reads
/// that end by `to`, or that start a window's worth past the checkpoint,
/// and no others. A learned checkpoint's cluster is often shorter than a
/// window, and its reads then need a part of what a 32 KiB trim keeps
/// (on text, about two thirds).
pub fn trim_exact(
    header: (&[u8], u32),
    at: &Checkpoint,
    compressed: &[u8],
    to: u64,
) -> Option<Reach> {
    checked(header, at, compressed, to, true)
}

fn checked(
    (header, header_bits): (&[u8], u32),
    at: &Checkpoint,
    compressed: &[u8],
    to: u64,
    exact: bool,
) -> Option<Reach> {
    let r = if exact {
        deflate::reach_exact((header, header_bits), at, compressed, to)?
    } else {
        deflate::reach((header, header_bits), at, compressed, to)?
    };
    let cut = Checkpoint {
        window: r.window.clone(),
        ..at.clone()
    };
    let make = |from: &Checkpoint, data: &[u8], upto: u64| {
        let mut out = vec![0u8; upto.saturating_sub(at.output) as usize];
        let made = if header_bits == 0 {
            zran::extract_some(from, data, at.output, &mut out)
        } else {
            zran::extract_spliced((header, header_bits), from, data, at.output, &mut out)
        };
        made.ok().map(|m| {
            out.truncate(m.filled);
            out
        })
    };
    let far = if exact {
        r.output
    } else {
        r.output.max(at.output + WINDOW as u64)
    };
    let exact = &compressed[..((r.input - at.fetch_from()) as usize).min(compressed.len())];
    match (
        make(&cut, compressed, far),
        make(at, compressed, far),
        make(&cut, exact, r.output),
    ) {
        (Some(a), Some(b), Some(c))
            if a == b && c.len() as u64 == r.output - at.output && b.starts_with(&c) =>
        {
            Some(r)
        }
        _ => None,
    }
}
