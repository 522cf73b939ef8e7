//! Checkpoints learned from runs: where in a gzip layer the reads of an
//! image's earlier runs began, each at the last deflate block boundary
//! before a run of read bytes, with its window.
//!
//! A layer map's checkpoints are evenly spaced (about every 1 MiB of tar),
//! so a small file in the middle of a span costs the compressed bytes from
//! the span's start to it. `hb image prefetch push` knows which bytes runs
//! read first (the learned prefetch list), inflates the layer once and
//! records a checkpoint before each cluster of them; shared beside the
//! list, they let the next node start each read near its own bytes. A
//! learned checkpoint is only a better place to start from: nodes merge
//! them into the map's ([`LayerMap::merge_learned`]), fall back to the
//! map's own when one fails, and check every chunk as always.
//!
//! The blob has the layer map's two parts: the magic, a zstd frame of the
//! numbers (as the map writes its checkpoints), then the windows, one zstd
//! frame each, fetched by Range when first used.

use crate::map::{self, Cursor, Error, LayerMap, Point, Source, bad};
use crate::zran::{Checkpoint, WINDOW};

/// Media type of a learned checkpoints blob.
pub const MEDIA_TYPE: &str = "application/vnd.hyperbox.learned-points.v1";
/// The blob's first bytes.
pub const MAGIC: &[u8; 8] = b"HBLPTS\x00\x01";
/// The largest eager part: 16 bytes a checkpoint is far above what the
/// numbers take, for the most checkpoints a layer may have learned.
pub const MAX_EAGER: u64 = 16 << 20;
/// Read bytes closer than this (tar bytes) share a learned checkpoint:
/// starting a second one costs a window, up to 32 KiB, which is about what
/// inflating the gap between them costs.
pub const CLUSTER_GAP: u64 = 32 << 10;

/// A learned checkpoint: at a block boundary, or inside a block with the
/// block's header ([`crate::deflate::Splice`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    /// Where, and the window there.
    pub at: Checkpoint,
    /// The block's header bits (empty at a block boundary).
    pub header: Vec<u8>,
    /// How many bits of `header` are the header (0 at a boundary).
    pub header_bits: u32,
}

impl From<Checkpoint> for Learned {
    fn from(at: Checkpoint) -> Learned {
        Learned {
            at,
            header: Vec::new(),
            header_bits: 0,
        }
    }
}

impl From<crate::deflate::Splice> for Learned {
    fn from(s: crate::deflate::Splice) -> Learned {
        Learned {
            at: s.at,
            header: s.header,
            header_bits: s.header_bits,
        }
    }
}

/// Encodes `points` (each with its window, and its block header when
/// inside a block: the header bytes come first in the window's frame).
/// Returns the blob and the length of its eager part.
pub fn encode(points: &[Learned]) -> std::io::Result<(Vec<u8>, u64)> {
    let bare: Vec<Point> = points
        .iter()
        .map(|l| Point {
            header_bits: l.header_bits,
            ..Point::of(&l.at)
        })
        .collect();
    let windows: Vec<Vec<u8>> = points
        .iter()
        .map(|l| [&l.header[..], &l.at.window[..]].concat())
        .collect();
    let (placed, lazy) = map::place_windows(&bare, &windows)?;
    let mut body = Vec::new();
    map::put_points(&mut body, &placed, true);
    map::write_blob(MAGIC, &body, &lazy)
}

/// What learned checkpoints are checked against: the layer map's kind of
/// blob and its sizes.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// The layer blob's kind.
    pub source: Source,
    /// The layer blob's size.
    pub blob_size: u64,
    /// The tar's size.
    pub tar_size: u64,
}

impl LayerMap {
    /// What learned checkpoints for this map's layer must lie within.
    pub fn bounds(&self) -> Bounds {
        Bounds {
            source: self.source,
            blob_size: self.blob_size,
            tar_size: self.tar_size,
        }
    }
}

/// Reads a learned blob's eager part for the layer `map` describes: the
/// checkpoints must lie inside its blob and tar, in order, and be no
/// denser than one per window of tar.
pub fn decode(eager: &[u8], map: Bounds) -> Result<Vec<Point>, Error> {
    if map.source != Source::Gzip {
        return Err(bad("learned checkpoints for a layer that is not gzip"));
    }
    let (body, lazy_base) = map::read_eager(eager, MAGIC, MAX_EAGER, "learned checkpoints")?;
    let mut c = Cursor { b: &body };
    let n = c.count(5)?;
    if n > map::MAX_POINTS || n as u64 > map.tar_size / WINDOW as u64 + 2 {
        return Err(bad(format!(
            "{n} learned checkpoints for a {}-byte tar",
            map.tar_size
        )));
    }
    let points = map::get_points(&mut c, n, lazy_base, (map.blob_size, map.tar_size), true)?;
    if !c.b.is_empty() {
        return Err(bad("bytes after the learned checkpoints"));
    }
    Ok(points)
}

/// Where reads of the tar begin, one per cluster of `ranges` (tar byte
/// ranges, in any order): ranges less than [`CLUSTER_GAP`] apart are one
/// cluster.
pub fn cluster_starts(mut ranges: Vec<(u64, u64)>) -> Vec<u64> {
    ranges.sort_unstable();
    let mut starts = Vec::new();
    let mut end = None;
    for (s, e) in ranges {
        match end {
            Some(last) if s <= last + CLUSTER_GAP => {}
            _ => starts.push(s),
        }
        end = Some(end.map_or(e, |last: u64| last.max(e)));
    }
    starts
}

impl LayerMap {
    /// Adds `learned` checkpoints (as [`decode`] reads them, marked
    /// [`Point::learned`]) to the map's own, in order. A learned checkpoint
    /// at the place of one of the map's, or out of order with the map's,
    /// is left out.
    pub fn merge_learned(&mut self, learned: Vec<Point>) {
        let own = std::mem::take(&mut self.points);
        let mut merged: Vec<Point> = Vec::with_capacity(own.len() + learned.len());
        let (mut a, mut b) = (own.into_iter().peekable(), learned.into_iter().peekable());
        let before = |l: &Point, next: &Point| l.input < next.input && l.output < next.output;
        loop {
            let next = match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(p), Some(q)) if p.output == q.output || p.input == q.input => {
                    b.next();
                    continue;
                }
                (Some(p), Some(q)) if q.output < p.output => b.next(),
                (Some(_), _) => a.next(),
                (None, Some(_)) => b.next(),
            }
            .expect("peeked");
            if next.learned {
                // Out of order with what precedes it: inconsistent with
                // the map, left out.
                if merged.last().is_none_or(|l| before(l, &next)) {
                    merged.push(next);
                }
                continue;
            }
            // The map's own point wins over learned ones taken before it
            // that it does not follow.
            while merged
                .last()
                .is_some_and(|l| l.learned && !before(l, &next))
            {
                merged.pop();
            }
            merged.push(next);
        }
        self.points = merged;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(input: u64, output: u64) -> Point {
        Point {
            input,
            bits: 0,
            output,
            window_len: 0,
            window_at: 0,
            window_zlen: 0,
            header_bits: 0,
            learned: false,
        }
    }

    fn learned_point(input: u64, output: u64) -> Point {
        Point {
            learned: true,
            ..point(input, output)
        }
    }

    fn checkpoint(input: u64, bits: u8, output: u64, window: usize) -> Learned {
        Checkpoint {
            input,
            bits,
            output,
            window: (0..window).map(|i| (i % 251) as u8).collect(),
        }
        .into()
    }

    fn bounds() -> Bounds {
        Bounds {
            source: Source::Gzip,
            blob_size: 1 << 20,
            tar_size: 4 << 20,
        }
    }

    #[test]
    fn checkpoints_and_their_windows_come_back() {
        let mut spliced = checkpoint(9000, 5, 200_000, WINDOW);
        spliced.header = vec![0xa5, 0x3c, 0x01];
        spliced.header_bits = 17;
        let points = vec![
            checkpoint(1000, 3, 70_000, WINDOW),
            checkpoint(5000, 0, 140_000, 100),
            spliced,
        ];
        let (blob, eager) = encode(&points).unwrap();
        let got = decode(&blob[..eager as usize], bounds()).unwrap();
        assert_eq!(got.len(), 3);
        for (g, p) in got.iter().zip(&points) {
            let p_at = &p.at;
            assert_eq!(
                (g.input, g.bits, g.output, g.header_bits),
                (p_at.input, p_at.bits, p_at.output, p.header_bits)
            );
            let at = g.window_at as usize;
            let w = g
                .decode_window(&blob[at..at + g.window_zlen as usize])
                .unwrap();
            assert_eq!(w[..g.header_bytes()], p.header[..]);
            assert_eq!(w[g.header_bytes()..], p_at.window[..]);
        }
    }

    #[test]
    fn checkpoints_outside_the_layer_or_too_many_are_refused() {
        let decoded = |points: &[Learned], b: Bounds| {
            let (blob, eager) = encode(points).unwrap();
            decode(&blob[..eager as usize], b)
        };
        // Past the blob, past the tar, denser than a window (order is
        // checked by the map's own reader, which these share).
        assert!(decoded(&[checkpoint(2 << 20, 0, 1000, 0)], bounds()).is_err());
        assert!(decoded(&[checkpoint(10, 0, 5 << 20, 0)], bounds()).is_err());
        assert!(decoded(&[checkpoint(10, 0, 1000, 0)], bounds()).is_ok());
        let dense: Vec<Learned> = (1..200)
            .map(|i| checkpoint(i * 10, 0, i * 100, 0))
            .collect();
        assert!(decoded(&dense, bounds()).is_err());
        // Not for a plain tar; not another blob.
        let tar = Bounds {
            source: Source::Tar,
            ..bounds()
        };
        assert!(decoded(&[checkpoint(10, 0, 1000, 0)], tar).is_err());
        assert!(decode(b"HBLMAP\x00\x01\0\0\0\0\0\0\0\0", bounds()).is_err());
        let (blob, eager) = encode(&[checkpoint(10, 0, 1000, 0)]).unwrap();
        assert!(decode(&blob[..eager as usize - 1], bounds()).is_err());
    }

    #[test]
    fn learned_checkpoints_go_between_the_maps_own() {
        let mut map = LayerMap {
            source: Source::Gzip,
            blob_size: 1 << 20,
            tar_size: 4 << 20,
            image_size: 8192,
            data_end: 4096,
            extents: Vec::new(),
            points: vec![
                point(0, 0),
                point(300_000, 1 << 20),
                point(600_000, 2 << 20),
            ],
            metadata: Vec::new(),
        };
        let learned = vec![
            // At a place the map has: left out.
            learned_point(300_000, 1 << 20),
            // Inconsistent with the map (input past the next point's).
            learned_point(400_000, 900_000),
            learned_point(450_000, 1_500_000),
            learned_point(700_000, 3 << 20),
        ];
        map.merge_learned(learned);
        let places: Vec<(u64, bool)> = map.points.iter().map(|p| (p.output, p.learned)).collect();
        assert_eq!(
            places,
            vec![
                (0, false),
                (1 << 20, false),
                (1_500_000, true),
                (2 << 20, false),
                (3 << 20, true)
            ]
        );
    }

    #[test]
    fn nearby_reads_share_a_checkpoint() {
        let starts = cluster_starts(vec![
            (500_000, 510_000),
            (100, 4000),
            (4000 + CLUSTER_GAP, 70_000),
            (70_000 + CLUSTER_GAP + 1, 80_000 + CLUSTER_GAP),
        ]);
        assert_eq!(starts, vec![100, 70_000 + CLUSTER_GAP + 1, 500_000]);
    }
}
