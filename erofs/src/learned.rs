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

use crate::map::{self, Cursor, Error, LayerMap, Point, Source, Stretch, bad};
use crate::zran::{Checkpoint, WINDOW};

/// Media type of a learned checkpoints blob.
pub const MEDIA_TYPE: &str = "application/vnd.hyperbox.learned-points.v1";
/// The blob's first bytes: version 3's windows keep only what their
/// clusters refer to ([`crate::trim::trim_exact`]); a node that reads
/// version 2 at most would take them for windows that serve any read, so
/// it is refused there (reads start from the map's own checkpoints).
pub const MAGIC: &[u8; 8] = b"HBLPTS\x00\x03";
/// Version 2's, still read: after the checkpoints, where each one's
/// cluster ends ([`Stretch`]), and windows that keep the bytes references
/// reach from the first 32 KiB of output ([`crate::trim::trim`]).
pub const MAGIC_V2: &[u8; 8] = b"HBLPTS\x00\x02";
/// Version 1's, still read: every checkpoint with its whole window.
pub const MAGIC_V1: &[u8; 8] = b"HBLPTS\x00\x01";
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
    /// Where the cluster it was learned for ends, and the blob bytes that
    /// make it ([`trim`]).
    pub stretch: Option<Stretch>,
}

impl From<Checkpoint> for Learned {
    fn from(at: Checkpoint) -> Learned {
        Learned {
            at,
            header: Vec::new(),
            header_bits: 0,
            stretch: None,
        }
    }
}

impl From<crate::deflate::Splice> for Learned {
    fn from(s: crate::deflate::Splice) -> Learned {
        Learned {
            at: s.at,
            header: s.header,
            header_bits: s.header_bits,
            stretch: None,
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
    // Version 2 when no window is exact, for nodes that read no later.
    let exact = points.iter().any(|l| l.stretch.is_some_and(|s| s.exact));
    let mut body = Vec::new();
    map::put_points(&mut body, &placed, true);
    // Each stretch as its distances past the checkpoint, 0 for none.
    for l in points {
        match l
            .stretch
            .filter(|s| s.output > l.at.output && s.input > l.at.input)
        {
            Some(s) => {
                map::put(&mut body, s.output - l.at.output);
                map::put(&mut body, s.input - l.at.input);
            }
            None => map::put(&mut body, 0),
        }
    }
    map::write_blob(if exact { MAGIC } else { MAGIC_V2 }, &body, &lazy)
}

/// `point` with its window trimmed to the bytes its cluster, which ends
/// at `end` (its last read byte), refers to, and the cluster's
/// [`Stretch`], so a node fetches exactly that and starts only requests
/// the window serves there ([`crate::trim::trim_exact`]). `compressed`
/// holds the blob from the point's `fetch_from` on
/// ([`crate::trim::read_for`] the cluster's length, or to the blob's
/// end). Left whole, without a stretch, when the trim's check fails or
/// the bytes cannot be decoded.
pub fn trim(mut point: Learned, compressed: &[u8], end: u64, blob_size: u64) -> Learned {
    if end <= point.at.output {
        return point;
    }
    let header = (&point.header[..], point.header_bits);
    let Some(r) = crate::trim::trim_exact(header, &point.at, compressed, end) else {
        return point;
    };
    point.stretch = Some(Stretch {
        output: r.output,
        input: r.input.min(blob_size),
        exact: true,
    });
    point.at.window = r.window;
    point
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
    let v1 = eager.starts_with(MAGIC_V1);
    let exact = !v1 && !eager.starts_with(MAGIC_V2);
    let magic = match (v1, exact) {
        (true, _) => MAGIC_V1,
        (false, false) => MAGIC_V2,
        (false, true) => MAGIC,
    };
    let (body, lazy_base) = map::read_eager(eager, magic, MAX_EAGER, "learned checkpoints")?;
    let mut c = Cursor { b: &body };
    let n = c.count(5)?;
    if n > map::MAX_POINTS || n as u64 > map.tar_size / WINDOW as u64 + 2 {
        return Err(bad(format!(
            "{n} learned checkpoints for a {}-byte tar",
            map.tar_size
        )));
    }
    let mut points = map::get_points(&mut c, n, lazy_base, (map.blob_size, map.tar_size), true)?;
    if !v1 {
        for p in &mut points {
            let out = c.get()?;
            if out == 0 {
                continue;
            }
            let input = c.get()?;
            let s = Stretch {
                output: p.output.saturating_add(out),
                input: p.input.saturating_add(input),
                exact,
            };
            // Past the point, inside the tar and the blob, no longer than a
            // node inflates for one request, and no more compressed bytes
            // than deflate can take for that output (stored blocks add 5
            // bytes per 64 KiB, headers a few hundred): a node fetches
            // exactly this far.
            if s.output > map.tar_size
                || s.input > map.blob_size
                || input == 0
                || out > crate::deflate::MAX_REACH
                || input > out + out / 8 + (64 << 10)
            {
                return Err(bad("a learned checkpoint's stretch lies outside the layer"));
            }
            p.stretch = Some(s);
        }
    }
    if !c.b.is_empty() {
        return Err(bad("bytes after the learned checkpoints"));
    }
    Ok(points)
}

/// The clusters of `ranges` (tar byte ranges, in any order), each as
/// where its reads begin and end: ranges less than [`CLUSTER_GAP`] apart
/// are one cluster.
pub fn clusters(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 + CLUSTER_GAP => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
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
            stretch: None,
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
        let found = clusters(vec![
            (500_000, 510_000),
            (100, 4000),
            (4000 + CLUSTER_GAP, 70_000),
            (70_000 + CLUSTER_GAP + 1, 80_000 + CLUSTER_GAP),
            (2000, 3000),
        ]);
        assert_eq!(
            found,
            vec![
                (100, 70_000),
                (70_000 + CLUSTER_GAP + 1, 80_000 + CLUSTER_GAP),
                (500_000, 510_000)
            ]
        );
    }

    #[test]
    fn an_exact_window_starts_only_reads_its_stretch_serves() {
        let stretch = |to: u64, exact| {
            Some(Stretch {
                output: to,
                input: 7000,
                exact,
            })
        };
        let short = Point {
            stretch: stretch(90_000, true),
            ..learned_point(1000, 70_000)
        };
        assert!(short.serves(80_000) && short.serves(90_000));
        assert!(
            !short.serves(90_001),
            "past a stretch shorter than a window"
        );
        assert_eq!(short.makes_up_to(), 90_000);
        // A stretch a window long or more: later bytes refer to its own.
        let long = Point {
            stretch: stretch(70_000 + WINDOW as u64, true),
            ..learned_point(1000, 70_000)
        };
        assert!(long.serves(1 << 20));
        assert_eq!(long.makes_up_to(), u64::MAX);
        // Version 2's windows, and the map's own, serve any read.
        let whole = Point {
            stretch: stretch(90_000, false),
            ..learned_point(1000, 70_000)
        };
        assert!(whole.serves(1 << 20) && point(0, 0).serves(1 << 20));
        assert_eq!(whole.makes_up_to(), u64::MAX);
    }

    #[test]
    fn stretches_come_back_and_version_one_blobs_still_read() {
        let mut trimmed = checkpoint(1000, 3, 70_000, WINDOW);
        trimmed.stretch = Some(Stretch {
            output: 90_000,
            input: 7000,
            exact: true,
        });
        let mut points = vec![trimmed, checkpoint(5000, 0, 140_000, 100)];
        let (blob, eager) = encode(&points).unwrap();
        assert!(blob.starts_with(MAGIC));
        let got = decode(&blob[..eager as usize], bounds()).unwrap();
        assert_eq!(got[0].stretch, points[0].stretch);
        assert_eq!(got[1].stretch, None);
        // Version 2: windows that serve any read, which its stretches say.
        points[0].stretch.as_mut().unwrap().exact = false;
        let (blob, eager) = encode(&points).unwrap();
        assert!(blob.starts_with(MAGIC_V2));
        let got = decode(&blob[..eager as usize], bounds()).unwrap();
        assert_eq!(got[0].stretch, points[0].stretch);
        // Version 1: the same numbers without stretches.
        let bare: Vec<Point> = points.iter().map(|l| Point::of(&l.at)).collect();
        let windows: Vec<Vec<u8>> = points.iter().map(|l| l.at.window.clone()).collect();
        let (placed, lazy) = map::place_windows(&bare, &windows).unwrap();
        let mut body = Vec::new();
        map::put_points(&mut body, &placed, true);
        let (old, eager) = map::write_blob(MAGIC_V1, &body, &lazy).unwrap();
        let got = decode(&old[..eager as usize], bounds()).unwrap();
        assert!(got.len() == 2 && got.iter().all(|p| p.stretch.is_none()));
        // A stretch not past its checkpoint is written as none.
        let mut p = checkpoint(1000, 3, 70_000, WINDOW);
        p.stretch = Some(Stretch {
            output: 90_000,
            input: 1000,
            exact: true,
        });
        let (blob, eager) = encode(&[p]).unwrap();
        assert_eq!(
            decode(&blob[..eager as usize], bounds()).unwrap()[0].stretch,
            None
        );
        // Past the blob, past the tar, or more compressed bytes than
        // deflate takes for its output (a node would fetch them all): the
        // blob is refused.
        for bad in [
            Stretch {
                output: 90_000,
                input: 2 << 20,
                exact: true,
            },
            Stretch {
                output: 5 << 20,
                input: 7000,
                exact: true,
            },
            Stretch {
                output: 90_000,
                input: 1000 + 200_000,
                exact: true,
            },
        ] {
            let mut p = checkpoint(1000, 3, 70_000, WINDOW);
            p.stretch = Some(bad);
            let (blob, eager) = encode(&[p]).unwrap();
            assert!(
                decode(&blob[..eager as usize], bounds()).is_err(),
                "{bad:?}"
            );
        }
    }
}
