//! The mapped path against a registry that holds only the gzip layer and
//! its map (as `hb image index` pushes them): reads are answered with the
//! image's bytes, the fill completes it, and it costs about one layer
//! request per checkpoint span, not one per chunk.

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyperbox_erofs::map::LayerMap;
use hyperbox_erofs::{convert, learned, writer, zran};
use hyperbox_kernel::fanotify::Verdict;
use hyperbox_kernel::testing::FakeFanotify;
use hyperbox_registry::digest::Digest;
use hyperbox_registry::index::{BLOCK, BlockTable, IndexLayer, MapRef, chunk_of_blocks};
use hyperbox_registry::prefetch::{Fitted, PointsRef};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use futures::future::BoxFuture;
use hyperbox_registry::Pace;

use super::blob::State;
use super::fill::Download;
use super::tests::registry;
use super::verify::{Verifier, WholeError};
use super::{Lazy, Options, lock};

const CHUNK: u64 = 4096;
const SPAN: u64 = 256 << 10;
const WAIT: Duration = Duration::from_secs(30);

/// The requests a test registry answered: digest, first byte, length.
type Asked = Arc<Mutex<Vec<(String, u64, u64)>>>;

/// Serves blobs by digest with Range requests; records each request as
/// (digest, first byte, length).
async fn serve(blobs: HashMap<String, Vec<u8>>) -> (std::net::SocketAddr, Asked) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let (blobs, log) = (Arc::new(blobs), asked.clone());
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let (blobs, log) = (blobs.clone(), log.clone());
            tokio::spawn(async move {
                let Some(head) = crate::test_http::read_head(&mut conn).await else {
                    return;
                };
                let text = head.to_lowercase();
                let found = blobs.iter().find(|(d, _)| text.contains(d.as_str()));
                let range = text
                    .lines()
                    .find_map(|l| l.strip_prefix("range: bytes="))
                    .and_then(|r| r.trim().split_once('-'))
                    .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
                let (Some((digest, blob)), Some((a, b))) = (found, range) else {
                    let _ = conn
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                };
                lock(&log).push((digest.clone(), a as u64, (b + 1 - a) as u64));
                let body = &blob[a..=b];
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\ncontent-range: bytes {a}-{b}/{}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    blob.len(),
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(body).await;
            });
        }
    });
    (addr, asked)
}

/// A layer of 300 files (text and random bytes, small and large), gzip.
fn layer() -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);
    let words: Vec<String> = (0..2000)
        .map(|_| {
            (0..rng.random_range(2..10))
                .map(|_| rng.random_range(b'a'..=b'z') as char)
                .collect()
        })
        .collect();
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..300usize {
        let n = match i % 5 {
            0 => rng.random_range(20_000..90_000),
            _ => rng.random_range(10..6000),
        };
        // Random bytes (stored blocks) or words (about 3:1, blocks of
        // tens of KiB as in real source files).
        let data: Vec<u8> = if i % 4 == 0 {
            (0..n).map(|_| rng.random()).collect()
        } else {
            let mut t = Vec::with_capacity(n);
            while t.len() < n {
                t.extend_from_slice(words[rng.random_range(0..words.len())].as_bytes());
                t.push(if rng.random_range(0..8) == 0 {
                    b'\n'
                } else {
                    b' '
                });
            }
            t.truncate(n);
            t
        };
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, format!("lib/m{}/f{i}.py", i % 7), &data[..])
            .unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

struct Mapped {
    _dir: tempfile::TempDir,
    lazy: Arc<Lazy>,
    fan: Arc<FakeFanotify>,
    image: Vec<u8>,
    path: std::path::PathBuf,
    asked: Asked,
    gz_len: u64,
    layer: String,
    points: usize,
    blob: Arc<super::blob::Blob>,
}

impl Drop for Mapped {
    fn drop(&mut self) {
        self.fan.close();
    }
}

/// The layer converted and mapped as `hb image index` does, served with
/// its map (changed by `mangle` first), registered as a lazy file.
async fn setup(mangle: impl FnOnce(&mut hyperbox_erofs::map::LayerMap)) -> Mapped {
    setup_learned(mangle, None).await
}

/// Checkpoints learned for a layer, from its map and gzip bytes.
type Learn<'a> = &'a dyn Fn(&LayerMap, &[u8]) -> Vec<learned::Learned>;

/// [`setup`], with checkpoints `learn` makes shared beside the index as
/// `hb image prefetch push` shares them.
async fn setup_learned(
    mangle: impl FnOnce(&mut hyperbox_erofs::map::LayerMap),
    learn: Option<Learn<'_>>,
) -> Mapped {
    setup_downloading(mangle, learn, None).await
}

/// The layer's whole download as the remote path makes it: it lands in
/// `staged` (the test writes it there) and never ends.
#[derive(Debug)]
struct Downloading {
    staged: std::path::PathBuf,
}

impl Verifier for Downloading {
    fn whole<'a>(
        &'a self,
        _image: &'a str,
        _layer: &'a str,
        pace: Option<Pace>,
    ) -> BoxFuture<'a, Result<(std::path::PathBuf, String), WholeError>> {
        Box::pin(async move {
            // Its first piece asks the pace, as a real download's does.
            if let Some(p) = pace {
                p(0).await;
            }
            std::future::pending().await
        })
    }

    fn staged(&self, _layer: &str) -> Option<std::path::PathBuf> {
        Some(self.staged.clone())
    }
}

/// [`setup_learned`]; with `staged`, the layer is downloading at once
/// into that file ([`Downloading`]) instead of being filled with Range
/// requests.
async fn setup_downloading(
    mangle: impl FnOnce(&mut hyperbox_erofs::map::LayerMap),
    learn: Option<Learn<'_>>,
    staged: Option<std::path::PathBuf>,
) -> Mapped {
    setup_with(mangle, learn, staged, Table::None).await
}

/// Whether the index entry has a block digest table (index v4).
#[derive(Clone, Copy, PartialEq)]
enum Table {
    /// No: 4 KiB chunks checked by their own digests.
    None,
    /// Yes, with [`TABLED_CHUNK`] chunks.
    Good,
    /// Yes, but the registry serves other bytes for it than the index
    /// names.
    Forged,
}

/// Chunks of an index with a block table: four blocks each.
const TABLED_CHUNK: u64 = 4 * CHUNK;

async fn setup_with(
    mangle: impl FnOnce(&mut hyperbox_erofs::map::LayerMap),
    learn: Option<Learn<'_>>,
    staged: Option<std::path::PathBuf>,
    table: Table,
) -> Mapped {
    let dir = tempfile::tempdir().unwrap();
    let gz = layer();
    let blob_path = dir.path().join("layer.gz");
    fs::write(&blob_path, &gz).unwrap();
    let out = dir.path().join("image.erofs");
    let (_, mapped) = convert::convert_mapped(
        &blob_path,
        &dir.path().join("image.tmp"),
        &out,
        writer::Options::default(),
        SPAN,
    )
    .unwrap();
    let mut mapped = mapped.expect("gzip is mapped");
    let points = mapped.map.points.len();
    let data_end = mapped.map.data_end;
    mangle(&mut mapped.map);
    let (map_blob, eager) = mapped.map.encode(&mapped.windows).unwrap();
    let image = fs::read(&out).unwrap();
    let layer = Digest::of(&gz).to_string();
    let map_digest = Digest::of(&map_blob).to_string();
    let mut blobs = HashMap::from([
        (layer.clone(), gz.clone()),
        (map_digest.clone(), map_blob.clone()),
    ]);
    let shared = learn.map(|learn| {
        let (bytes, eager) = learned::encode(&learn(&mapped.map, &gz)).unwrap();
        let digest = Digest::of(&bytes).to_string();
        let size = bytes.len() as u64;
        blobs.insert(digest.clone(), bytes);
        Fitted {
            chunks: Vec::new(),
            points: Some(PointsRef {
                layer: layer.clone(),
                digest,
                size,
                eager,
            }),
        }
    });
    let (chunk_size, chunks, blocks) = if table == Table::None {
        let chunks = image
            .chunks(CHUNK as usize)
            .map(|c| hex::encode(Sha256::digest(c)))
            .collect();
        (CHUNK, chunks, None)
    } else {
        let digests: Vec<[u8; 32]> = image
            .chunks(BLOCK as usize)
            .map(|b| Sha256::digest(b).into())
            .collect();
        let chunks = digests
            .chunks((TABLED_CHUNK / BLOCK) as usize)
            .map(chunk_of_blocks)
            .collect();
        let bytes = digests.concat();
        let digest = Digest::of(&bytes).to_string();
        let size = bytes.len() as u64;
        let served = match table {
            Table::Forged => bytes.iter().map(|b| b ^ 1).collect(),
            _ => bytes,
        };
        blobs.insert(digest.clone(), served);
        (TABLED_CHUNK, chunks, Some(BlockTable { digest, size }))
    };
    let (addr, asked) = serve(blobs).await;
    let registry = registry(dir.path());
    let fan = Arc::new(FakeFanotify::new());
    let (download, verifier) = match staged {
        Some(staged) => (
            Download::AtOnce,
            Some(Arc::new(Downloading { staged }) as Arc<dyn Verifier>),
        ),
        None => (Download::AfterReads, None),
    };
    let (lazy, _) = Lazy::open(
        dir.path(),
        registry,
        fan.clone(),
        verifier.clone(),
        Options {
            max_chunk_fetches: 4,
            verify: false,
            fill_pause_io_pressure: 0.0,
            fill_request: CHUNK,
            shared_prefetch: false,
            fill_from_layer: verifier.is_some(),
        },
    )
    .unwrap();
    let state = State {
        image: format!("{addr}/test/mapped:v1"),
        chunk_size,
        entry: IndexLayer {
            layer: layer.clone(),
            diff_id: format!("sha256:{}", "2".repeat(64)),
            erofs: Digest::of(&image).to_string(),
            size: image.len() as u64,
            data_end,
            chunks,
            map: Some(MapRef {
                digest: map_digest,
                size: map_blob.len() as u64,
                eager,
            }),
            blocks,
        },
        rejected: None,
        prewarmed: None,
        shared,
    };
    let me = lazy.clone();
    let blob = tokio::task::spawn_blocking(move || me.register(state, true, download))
        .await
        .unwrap()
        .unwrap();
    let path = blob.path.clone();
    Mapped {
        _dir: dir,
        lazy,
        fan,
        image,
        path,
        asked,
        gz_len: gz.len() as u64,
        layer,
        points,
        blob,
    }
}

async fn read(s: &Mapped, offset: u64) -> Option<Verdict> {
    let ino = fs::metadata(&s.path).unwrap();
    let id = s.fan.push(Some((ino.dev(), ino.ino())), offset, 16);
    let fan = s.fan.clone();
    tokio::task::spawn_blocking(move || fan.answer(id, WAIT))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_made_from_the_layer_blob_and_its_map() {
    let s = setup(|_| {}).await;
    assert!(s.points > 8, "{} checkpoints", s.points);
    // A read in the middle of the file data.
    let offset = s.image.len() as u64 / 3;
    assert_eq!(read(&s, offset).await, Some(Verdict::Allow));
    let at = (offset / CHUNK * CHUNK) as usize;
    let mut got = vec![0u8; CHUNK as usize];
    use std::os::unix::fs::FileExt;
    fs::File::open(&s.path)
        .unwrap()
        .read_exact_at(&mut got, at as u64)
        .unwrap();
    assert!(got[..] == s.image[at..at + CHUNK as usize]);

    // The fill completes it from the layer: every chunk made, verified,
    // written; the mark lifted.
    let deadline = Instant::now() + WAIT;
    while !s.fan.marked().is_empty() {
        assert!(Instant::now() < deadline, "never completed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        fs::read(&s.path).unwrap() == s.image,
        "the image, byte for byte"
    );
    // Every compressed byte about once: a request goes on from where the
    // one before it in the same span stopped (each chunk of the fill
    // asked for alone here), not from the span's checkpoint.
    let asked = lock(&s.asked).clone();
    let layer_bytes: u64 = asked
        .iter()
        .filter(|(d, ..)| *d == s.layer)
        .map(|r| r.2)
        .sum();
    let requests = asked.iter().filter(|(d, ..)| *d == s.layer).count();
    let chunks = s.image.len().div_ceil(CHUNK as usize);
    assert!(
        layer_bytes < s.gz_len * 3 / 2,
        "{layer_bytes} bytes fetched for a {}-byte layer in {requests} requests",
        s.gz_len
    );
    assert!(
        requests < chunks / 8,
        "{requests} requests for {chunks} chunks"
    );
    assert!(s.lazy.counters().span_chunks.load(Ordering::Relaxed) > chunks as u64 / 2);
    assert_eq!(s.lazy.counters().chunk_failures.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_that_lies_fails_reads_and_serves_nothing() {
    // Every extent one byte off in the tar: the map decodes, the numbers
    // are plausible, and no chunk of file data it makes is the image's.
    let s = setup(|map| {
        for e in &mut map.extents {
            e.tar += 1;
        }
    })
    .await;
    let offset = s.image.len() as u64 / 3;
    assert_eq!(read(&s, offset).await, Some(Verdict::DenyEio));
    use std::os::unix::fs::FileExt;
    let mut got = vec![0u8; CHUNK as usize];
    let at = offset / CHUNK * CHUNK;
    fs::File::open(&s.path)
        .unwrap()
        .read_exact_at(&mut got, at)
        .unwrap();
    assert!(
        got.iter().all(|b| *b == 0),
        "nothing written for a chunk that does not verify"
    );
    assert!(s.lazy.counters().chunk_failures.load(Ordering::Relaxed) > 0);
    assert!(!s.fan.marked().is_empty(), "still marked: never complete");
    // The metadata is the map's own, and verifies: a read there is served.
    assert_eq!(read(&s, 1024).await, Some(Verdict::Allow));
}

/// The image offset of a chunk whose tar bytes lie late in a middle span
/// of `map` (three quarters in or more), and those bytes' tar offset.
fn late_in_a_span(map: &LayerMap, chunks: usize) -> (u64, u64) {
    let k = map.points.len() / 2;
    let (from, to) = (map.points[k].output, map.points[k + 1].output);
    (0..chunks as u64)
        .filter_map(|c| map.need(c * CHUNK, CHUNK).map(|n| (c * CHUNK, n.tar_start)))
        .find(|(_, t)| *t >= from + (to - from) * 3 / 4 && *t < to)
        .expect("a chunk late in the span")
}

/// Checkpoints before `targets` (tar offsets), as `hb image prefetch push`
/// records them: inside the block before each, with its header.
fn before(gz: &[u8], targets: Vec<u64>) -> Vec<learned::Learned> {
    let mut ix = zran::Indexer::before(gz, targets.clone()).unwrap();
    std::io::copy(&mut ix, &mut std::io::sink()).unwrap();
    let boundaries = ix.into_points();
    targets
        .iter()
        .map(|&t| {
            let b = boundaries.iter().rev().find(|b| b.output <= t).unwrap();
            hyperbox_erofs::deflate::splice_before(b, &gz[b.fetch_from() as usize..], t)
                .expect("text blocks are spliced")
                .into()
        })
        .collect()
}

/// A checkpoint before the chunk at image offset `offset` (tar offset
/// `tar`) as `hb image prefetch push` makes it: trimmed, with the stretch
/// of a cluster that is that chunk.
fn trimmed_before(map: &LayerMap, gz: &[u8], offset: u64, tar: u64) -> Vec<learned::Learned> {
    let end = map.need(offset, CHUNK).unwrap().tar_end;
    before(gz, vec![tar])
        .into_iter()
        .map(|p| {
            let from = p.at.fetch_from() as usize;
            learned::trim(p, &gz[from..], end, gz.len() as u64)
        })
        .collect()
}

/// A layer set up with a trimmed learned checkpoint before a chunk late
/// in a middle span (placed by the map's own checkpoints); that chunk's
/// image offset and its bytes' tar offset.
async fn taught_late_chunk() -> (Mapped, u64, u64) {
    let probe = setup(|_| {}).await;
    let chunks = probe.image.len().div_ceil(CHUNK as usize);
    let (offset, tar) = late_in_a_span(&probe.lazy.mapped(&probe.blob).await.unwrap().map, chunks);
    drop(probe);
    let learn = |map: &LayerMap, gz: &[u8]| trimmed_before(map, gz, offset, tar);
    (setup_learned(|_| {}, Some(&learn)).await, offset, tar)
}

/// The one lazy file of `s`.
fn the_blob(s: &Mapped) -> Arc<super::blob::Blob> {
    s.blob.clone()
}

fn chunk_at(s: &Mapped, at: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut got = vec![0u8; CHUNK as usize];
    fs::File::open(&s.path)
        .unwrap()
        .read_exact_at(&mut got, at)
        .unwrap();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learned_checkpoints_start_reads_near_their_bytes() {
    let chunks = setup(|_| {}).await.image.len().div_ceil(CHUNK as usize);
    let learn = |map: &LayerMap, gz: &[u8]| {
        let (_, tar) = late_in_a_span(map, chunks);
        before(gz, vec![tar])
    };
    // The background fill starts at once too (from the layer's start):
    // each file is read as soon as it is registered, and the read's own
    // request is the first to start where its checkpoint is.
    let mut fetched = Vec::new();
    let mut sides = Vec::new();
    for learn in [None, Some(&learn as Learn<'_>)] {
        let s = setup_learned(|_| {}, learn).await;
        let map = s.lazy.mapped(&the_blob(&s)).await.unwrap();
        let (offset, tar) = late_in_a_span(&map.map, chunks);
        assert_eq!(read(&s, offset).await, Some(Verdict::Allow));
        let k = map.map.points.partition_point(|p| p.output <= tar) - 1;
        let from = map.map.points[k].fetch_from();
        let asked = lock(&s.asked).clone();
        let first = asked
            .iter()
            .find(|(d, start, _)| *d == s.layer && *start == from)
            .unwrap_or_else(|| panic!("no request from checkpoint {k} at {from}: {asked:?}"));
        fetched.push(first.2);
        assert!(chunk_at(&s, offset)[..] == s.image[offset as usize..(offset + CHUNK) as usize]);
        sides.push(s);
    }
    let (plain, taught) = (&sides[0], &sides[1]);
    let c = taught.lazy.counters();
    assert!(c.learned_point_requests.load(Ordering::Relaxed) >= 1);
    assert_eq!(c.learned_point_failures.load(Ordering::Relaxed), 0);
    assert_eq!(
        plain
            .lazy
            .counters()
            .learned_point_requests
            .load(Ordering::Relaxed),
        0
    );
    // From the map's checkpoint, three quarters of a span and more; from
    // the learned one, what lies between the last block boundary and the
    // bytes.
    eprintln!("layer bytes for one late read: {fetched:?}");
    assert!(
        fetched[1] * 2 < fetched[0],
        "layer bytes for one late read: {} from the map's checkpoint, {} from the learned one",
        fetched[0],
        fetched[1]
    );
}

/// A learned checkpoint as `hb image prefetch push` makes them: its window
/// keeps only the bytes its cluster refers to, and the cluster's end is
/// known. A read of the cluster is made from it with exactly the cluster's
/// compressed bytes; a read past the cluster, which may refer to bytes the
/// window left out, from the map's checkpoint before it, bytes right and
/// the learned one not failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trimmed_learned_checkpoint_fetches_its_cluster_exactly() {
    let (s, offset, tar) = taught_late_chunk().await;
    let map = s.lazy.mapped(&the_blob(&s)).await.unwrap();
    let k = map.map.points.partition_point(|p| p.output <= tar) - 1;
    let point = &map.map.points[k];
    let stretch = point
        .stretch
        .expect("the learned checkpoint knows its cluster");
    // It ends at the symbol that reaches the cluster's end.
    let end = map.map.need(offset, CHUNK).unwrap().tar_end;
    assert!(
        point.learned && stretch.exact && stretch.output >= end && stretch.output < end + 300,
        "{point:?}, cluster end {end}"
    );
    assert_eq!(read(&s, offset).await, Some(Verdict::Allow));
    assert!(chunk_at(&s, offset)[..] == s.image[offset as usize..(offset + CHUNK) as usize]);
    // One request, from the checkpoint to the cluster's end: no margin.
    let from = point.fetch_from();
    assert!(
        layer_requests(&s).contains(&(from, stretch.input - from)),
        "{:?}, stretch {stretch:?}",
        layer_requests(&s)
    );
    // Past the cluster, a few chunks on: bytes right, nothing failed, and
    // not from the learned checkpoint.
    let own = map.map.points[..k]
        .iter()
        .rev()
        .find(|p| !p.learned)
        .unwrap()
        .fetch_from();
    for next in [offset + CHUNK, offset + 3 * CHUNK] {
        let before = layer_requests(&s).len();
        assert_eq!(read(&s, next).await, Some(Verdict::Allow));
        assert!(chunk_at(&s, next)[..] == s.image[next as usize..(next + CHUNK) as usize]);
        let asked = layer_requests(&s);
        assert!(
            asked[before..].iter().all(|(at, _)| *at != from),
            "{asked:?}: a read past the cluster from the learned checkpoint at {from}"
        );
        // From the map's checkpoint, or from where a request from it
        // stopped past the cluster (a resume point, with a whole window).
        assert!(
            asked[before..]
                .iter()
                .any(|(at, _)| *at <= own || *at >= stretch.input)
                || asked.len() == before,
            "{asked:?}: from the map's checkpoint at {own}"
        );
    }
    let c = s.lazy.counters();
    assert_eq!(c.learned_point_requests.load(Ordering::Relaxed), 1);
    assert_eq!(c.learned_point_failures.load(Ordering::Relaxed), 0);
    assert_eq!(c.chunk_failures.load(Ordering::Relaxed), 0);
}

/// A snapshotter restarted before any read still starts reads from the
/// checkpoints shared beside the index it pulled through: the layer's
/// state keeps the shared list, not only the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learned_checkpoints_survive_a_restart() {
    let (s, offset, _) = taught_late_chunk().await;
    // The process dies: its lazy file is left as it is.
    s.blob.phase.send_replace(super::Phase::Discarded);
    let state: State = serde_json::from_slice(&fs::read(&s.blob.state_path).unwrap()).unwrap();
    assert!(
        state.shared.as_ref() == s.blob.shared() && state.shared.is_some(),
        "the state keeps the shared list: {:?}",
        state.shared
    );
    let fan = Arc::new(FakeFanotify::new());
    let (again, resumed) = Lazy::open(
        s._dir.path(),
        registry(s._dir.path()),
        fan.clone(),
        None,
        Options {
            max_chunk_fetches: 4,
            verify: false,
            fill_pause_io_pressure: 0.0,
            fill_request: CHUNK,
            shared_prefetch: true,
            fill_from_layer: false,
        },
    )
    .unwrap();
    assert_eq!(resumed, 1);
    let blob = lock(&again.by_key).values().next().unwrap().clone();
    assert!(
        blob.shared().and_then(|l| l.points.as_ref()).is_some(),
        "the restarted layer lost its learned checkpoints"
    );
    let ino = fs::metadata(&s.path).unwrap();
    let id = fan.push(Some((ino.dev(), ino.ino())), offset, 16);
    let answered = fan.clone();
    let verdict = tokio::task::spawn_blocking(move || answered.answer(id, WAIT))
        .await
        .unwrap();
    assert_eq!(verdict, Some(Verdict::Allow));
    assert!(chunk_at(&s, offset)[..] == s.image[offset as usize..(offset + CHUNK) as usize]);
    let c = again.counters();
    assert!(
        c.learned_point_requests.load(Ordering::Relaxed) >= 1,
        "the read after the restart did not start from the learned checkpoint"
    );
    assert_eq!(c.learned_point_failures.load(Ordering::Relaxed), 0);
    fan.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_checkpoint_that_lies_is_passed_over() {
    let probe = setup(|_| {}).await;
    let chunks = probe.image.len().div_ceil(CHUNK as usize);
    drop(probe);
    // A checkpoint one byte off in the blob: it inflates to garbage, or
    // not at all.
    let learn = |map: &LayerMap, gz: &[u8]| {
        let (_, tar) = late_in_a_span(map, chunks);
        let mut points = before(gz, vec![tar]);
        for p in &mut points {
            p.at.input += 1;
        }
        points
    };
    let s = setup_learned(|_| {}, Some(&learn)).await;
    let map = s.lazy.mapped(&the_blob(&s)).await.unwrap();
    let (offset, _) = late_in_a_span(&map.map, chunks);
    // Served all the same, from the map's checkpoint.
    assert_eq!(read(&s, offset).await, Some(Verdict::Allow));
    assert!(chunk_at(&s, offset)[..] == s.image[offset as usize..(offset + CHUNK) as usize]);
    let c = s.lazy.counters();
    assert_eq!(c.learned_point_failures.load(Ordering::Relaxed), 1);
    // And never tried again: the next read there goes to the map's. (The
    // fill may have tried it too, before the read's failure was known.)
    let tried = c.learned_point_requests.load(Ordering::Relaxed);
    assert!((1..=2).contains(&tried), "{tried}");
    let next = offset + CHUNK * 2;
    assert_eq!(read(&s, next).await, Some(Verdict::Allow));
    assert_eq!(c.learned_point_requests.load(Ordering::Relaxed), tried);
    assert_eq!(c.learned_point_failures.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_checkpoint_never_cuts_short_a_read_from_the_maps_own() {
    let probe = setup(|_| {}).await;
    let chunks = probe.image.len().div_ceil(CHUNK as usize);
    drop(probe);
    // Its place in the blob right after the map's checkpoint before it:
    // a read between the two starts from the map's and must not stop
    // where the learned one claims to be.
    let learn = |map: &LayerMap, gz: &[u8]| {
        let (_, tar) = late_in_a_span(map, chunks);
        let k = map.points.partition_point(|p| p.output <= tar) - 1;
        let mut points = before(gz, vec![tar]);
        points[0].at.input = map.points[k].input + 1;
        points[0].at.bits = 0;
        points
    };
    let s = setup_learned(|_| {}, Some(&learn)).await;
    let map = s.lazy.mapped(&the_blob(&s)).await.unwrap();
    let (late, tar) = late_in_a_span(&map.map, chunks);
    let k = map.map.points.partition_point(|p| p.output <= tar) - 2;
    assert!(
        !map.map.points[k].learned && map.map.points[k + 1].learned,
        "merged after the map's"
    );
    let early = (0..chunks as u64)
        .map(|c| c * CHUNK)
        .find(|&o| {
            map.map
                .need(o, CHUNK)
                .is_some_and(|n| n.tar_start > map.map.points[k].output + 8192 && n.tar_end < tar)
        })
        .expect("a chunk early in the span");
    for offset in [early, late] {
        assert_eq!(read(&s, offset).await, Some(Verdict::Allow));
        assert!(chunk_at(&s, offset)[..] == s.image[offset as usize..(offset + CHUNK) as usize]);
    }
}

/// Layer bytes requested from the registry in `s`.
fn layer_requests(s: &Mapped) -> Vec<(u64, u64)> {
    lock(&s.asked)
        .iter()
        .filter(|(d, ..)| *d == s.layer)
        .map(|(_, a, n)| (*a, *n))
        .collect()
}

/// A first run's reads while its layer downloads at once on the node:
/// bytes the download already brought are read from it, bytes it is
/// about to bring are waited for, and only bytes far ahead of it are
/// asked of the registry. Each read is the image's own bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_take_layer_bytes_from_the_download_on_the_node() {
    let gz = layer();
    let staging = tempfile::tempdir().unwrap();
    let staged = staging.path().join("layer.blob");
    // A quarter of the layer is in, and nothing more comes for now.
    let quarter = gz.len() / 4;
    fs::write(&staged, &gz[..quarter]).unwrap();
    let s = setup_downloading(|_| {}, None, Some(staged.clone())).await;
    let blob = the_blob(&s);
    let map = s.lazy.mapped(&blob).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while !blob.downloading.load(Ordering::Relaxed) {
        assert!(Instant::now() < deadline, "the download never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Chunks whose compressed bytes (from their checkpoint to the span's
    // end) lie inside `[0, upto)`, or all past `from`.
    let chunks = s.image.len().div_ceil(CHUNK as usize) as u64;
    let lm = &map.map;
    let inside = |upto: u64| {
        (0..chunks).map(|c| c * CHUNK).filter(move |&o| {
            lm.need(o, CHUNK)
                .is_some_and(|n| n.point.is_some() && n.blob_end <= upto)
        })
    };
    let beyond = |from: u64| {
        (0..chunks).map(|c| c * CHUNK).filter(move |&o| {
            lm.need(o, CHUNK).is_some_and(|n| {
                n.point
                    .is_some_and(|p| lm.points[p].fetch_from() > from + (256 << 10))
            })
        })
    };
    let c = s.lazy.counters();

    // In the download: made from it (by the read, or before it by the
    // thread that follows the download), nothing asked of the registry.
    let here = inside(quarter as u64)
        .next()
        .expect("a chunk in the first quarter");
    assert_eq!(read(&s, here).await, Some(Verdict::Allow));
    assert!(chunk_at(&s, here)[..] == s.image[here as usize..(here + CHUNK) as usize]);
    assert_eq!(layer_requests(&s), vec![], "served from the download");

    // Far ahead of a download that does not move: asked of the registry.
    let far = beyond(quarter as u64).next().expect("a chunk far ahead");
    assert_eq!(read(&s, far).await, Some(Verdict::Allow));
    assert!(chunk_at(&s, far)[..] == s.image[far as usize..(far + CHUNK) as usize]);
    assert!(!layer_requests(&s).is_empty(), "fetched from the registry");
    let asked_before = layer_requests(&s).len();

    // The download moves on: up to the start of a later span, which
    // gives its rate (measured over half a second) ...
    let far_point = map.map.need(far, CHUNK).and_then(|n| n.point).unwrap();
    let (soon, k) = (0..chunks)
        .map(|c| c * CHUNK)
        .find_map(|o| {
            let k = map.map.need(o, CHUNK)?.point?;
            let from = map.map.points[k].fetch_from();
            (k != far_point && from >= gz.len() as u64 * 3 / 4).then_some((o, k))
        })
        .expect("a chunk in the last quarter");
    let upto = map.map.points[k].fetch_from() as usize;
    fs::OpenOptions::new()
        .append(true)
        .open(&staged)
        .unwrap()
        .write_all(&gz[quarter..upto])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    // ... and a moment after a read of that span waits, the rest (well
    // within the half second after which a download that does not grow
    // is given up).
    let rest = {
        let (gz, staged) = (gz.clone(), staged.clone());
        let wanted = blob.wanted[(soon / CHUNK) as usize].clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + WAIT;
            while wanted.load(Ordering::Acquire) == 0 {
                assert!(Instant::now() < deadline, "the read never came");
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(Duration::from_millis(200));
            fs::OpenOptions::new()
                .append(true)
                .open(&staged)
                .unwrap()
                .write_all(&gz[upto..])
                .unwrap();
        })
    };
    assert_eq!(read(&s, soon).await, Some(Verdict::Allow));
    assert!(chunk_at(&s, soon)[..] == s.image[soon as usize..(soon + CHUNK) as usize]);
    assert_eq!(
        layer_requests(&s).len(),
        asked_before,
        "waited for the download rather than asking the registry"
    );
    assert_eq!(c.download_waits.load(Ordering::Relaxed), 1);
    assert!(c.download_read_bytes.load(Ordering::Relaxed) > 0);
    rest.join().unwrap();
}

/// Waits until every chunk of `s` is in, or fails the test.
async fn all_present(s: &Mapped) {
    let blob = the_blob(s);
    let deadline = Instant::now() + WAIT;
    while !lock(&blob.present).iter().all(|p| *p) {
        assert!(Instant::now() < deadline, "never complete");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The layer's chunks are made from its download as the bytes arrive,
/// with nothing read and nothing asked of the registry but the map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_is_made_from_its_download_as_it_arrives() {
    let gz = layer();
    let staging = tempfile::tempdir().unwrap();
    let staged = staging.path().join("layer.blob");
    let s = setup_downloading(|_| {}, None, Some(staged.clone())).await;
    // The download begins after the fill asked for it, and comes in
    // pieces.
    let mut f = fs::File::create(&staged).unwrap();
    for piece in gz.chunks(64 << 10) {
        f.write_all(piece).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    all_present(&s).await;
    assert!(
        fs::read(&s.path).unwrap() == s.image,
        "the image, byte for byte"
    );
    assert_eq!(layer_requests(&s), vec![], "nothing fetched by Range");
    let made = s.lazy.counters().download_chunks.load(Ordering::Relaxed);
    let chunks = s.image.len().div_ceil(CHUNK as usize) as u64;
    assert!(
        made > chunks / 2,
        "{made} of {chunks} chunks from the download"
    );
}

/// Bytes on the node that are not the layer's (a download the registry
/// corrupted, which will fail its digest) make no chunk: a read of their
/// span is answered from the registry, with the image's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bytes_in_the_download_send_reads_to_the_registry() {
    let probe = setup(|_| {}).await;
    let map = probe.lazy.mapped(&the_blob(&probe)).await.unwrap();
    let chunks = probe.image.len().div_ceil(CHUNK as usize) as u64;
    let (offset, need) = (0..chunks)
        .map(|c| c * CHUNK)
        .find_map(|o| {
            let n = map.map.need(o, CHUNK)?;
            (n.point? > 2).then_some((o, n))
        })
        .expect("a chunk past the third checkpoint");
    drop(map);
    drop(probe);
    let mut gz = layer();
    let from = need.blob_start as usize;
    for b in &mut gz[from..need.blob_end as usize] {
        *b ^= 0x55;
    }
    let staging = tempfile::tempdir().unwrap();
    let staged = staging.path().join("layer.blob");
    fs::write(&staged, &gz).unwrap();
    let s = setup_downloading(|_| {}, None, Some(staged.clone())).await;
    assert_eq!(read(&s, offset).await, Some(Verdict::Allow));
    assert!(chunk_at(&s, offset)[..] == s.image[offset as usize..(offset + CHUNK) as usize]);
    assert!(!layer_requests(&s).is_empty(), "asked of the registry");
    // Whatever is in is the image's (what was in before the file is read:
    // the download's chunks may still be coming).
    let blob = the_blob(&s);
    let present = lock(&blob.present).clone();
    let file = fs::read(&s.path).unwrap();
    for (i, present) in present.iter().enumerate() {
        let (a, n) = blob.chunk_range(i);
        let (a, b) = (a as usize, (a + n) as usize);
        assert!(!present || file[a..b] == s.image[a..b], "chunk {i}");
    }
}

/// The requests for `s`'s block table: first byte and length.
fn table_requests(s: &Mapped) -> Vec<(u64, u64)> {
    let table = s.blob.state.entry.blocks.as_ref().unwrap().digest.clone();
    lock(&s.asked)
        .iter()
        .filter(|(d, ..)| *d == table)
        .map(|r| (r.1, r.2))
        .collect()
}

/// Under a block table a read is checked block by block: the table
/// entries of its chunk come beside its bytes (128 bytes for a chunk of
/// four blocks), checked against the chunk's digest, and the blocks they
/// vouch for are the image's. The fill completes the image with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_is_checked_by_its_blocks_table_entries() {
    let s = setup_with(|_| {}, None, None, Table::Good).await;
    // Inside the second block of a chunk in the file data.
    let offset = (s.image.len() as u64 / 3) / TABLED_CHUNK * TABLED_CHUNK + BLOCK + 100;
    assert_eq!(read(&s, offset).await, Some(Verdict::Allow));
    let block = offset / BLOCK * BLOCK;
    assert!(chunk_at(&s, block)[..] == s.image[block as usize..(block + BLOCK) as usize]);
    let chunk = offset / TABLED_CHUNK;
    let entries = (chunk * TABLED_CHUNK / BLOCK * 32, TABLED_CHUNK / BLOCK * 32);
    let asked = table_requests(&s);
    assert!(
        asked.contains(&entries),
        "the read's chunk's entries {entries:?} in {asked:?}"
    );
    assert!(asked.iter().all(|(_, len)| *len == 128), "{asked:?}");
    all_present(&s).await;
    assert!(
        fs::read(&s.path).unwrap() == s.image,
        "the image, byte for byte"
    );
    let c = s.lazy.counters();
    assert_eq!(c.chunk_failures.load(Ordering::Relaxed), 0);
    assert_eq!(c.block_table_failures.load(Ordering::Relaxed), 0);
    assert!(c.block_table_bytes.load(Ordering::Relaxed) >= 128);
}

/// Table entries that are not the index's (a registry, or someone with
/// push rights, serving other bytes for the table) vouch for nothing:
/// reads are answered from whole chunks checked by their own blocks, with
/// the image's bytes, and the layer still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_lies_leaves_reads_to_whole_chunks() {
    let s = setup_with(|_| {}, None, None, Table::Forged).await;
    let offset = (s.image.len() as u64 / 2) / TABLED_CHUNK * TABLED_CHUNK + 2 * BLOCK + 7;
    assert_eq!(read(&s, offset).await, Some(Verdict::Allow));
    let chunk = offset / TABLED_CHUNK * TABLED_CHUNK;
    let file = fs::read(&s.path).unwrap();
    assert!(
        file[chunk as usize..(chunk + TABLED_CHUNK) as usize]
            == s.image[chunk as usize..(chunk + TABLED_CHUNK) as usize],
        "the read's whole chunk, the image's bytes"
    );
    assert!(!table_requests(&s).is_empty());
    assert!(
        s.lazy
            .counters()
            .block_table_failures
            .load(Ordering::Relaxed)
            >= 1
    );
    all_present(&s).await;
    assert!(fs::read(&s.path).unwrap() == s.image);
}

/// After a restart, a unit recorded as present counts only if its bytes
/// check: under a block table a chunk wholly recorded is checked by its
/// own blocks; blocks of a chunk recorded in part are fetched again (their
/// table entries were not kept), and so is a chunk whose bytes changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_whole_chunks_checked_by_their_blocks() {
    let s = setup_with(|_| {}, None, None, Table::Good).await;
    all_present(&s).await;
    let per = (TABLED_CHUNK / BLOCK) as usize;
    let n = s.blob.locks.len();
    let mut have = vec![0u8; n];
    have[per..2 * per].fill(1); // chunk 1, whole
    have[2 * per] = 1; // one block of chunk 2
    have[3 * per..4 * per].fill(1); // chunk 3, whole but changed below
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(&s.path).unwrap();
    f.write_all_at(b"!", 3 * TABLED_CHUNK + 5).unwrap();
    let present = s.blob.recheck(&have).unwrap();
    let kept: Vec<usize> = (0..n).filter(|&i| present[i]).collect();
    assert_eq!(kept, (per..2 * per).collect::<Vec<_>>());
}

/// Under block digests a learned prefetch's request covers whole chunks,
/// which are checked by their own blocks: bytes from a learned checkpoint
/// that lies are bad bytes there too, and the request is made again from
/// the map's checkpoint, not failed for want of table entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_checkpoint_that_lies_is_passed_over_for_whole_chunks() {
    let probe = setup_with(|_| {}, None, None, Table::Good).await;
    let units = probe.image.len().div_ceil(CHUNK as usize);
    let (offset, _) = late_in_a_span(&probe.lazy.mapped(&probe.blob).await.unwrap().map, units);
    drop(probe);
    // A whole chunk late in a span: the one after the block found there.
    let chunk = offset.div_ceil(TABLED_CHUNK);
    let learn = |map: &LayerMap, gz: &[u8]| {
        let tar = map
            .need(chunk * TABLED_CHUNK, TABLED_CHUNK)
            .unwrap()
            .tar_start;
        let mut points = before(gz, vec![tar]);
        for p in &mut points {
            p.at.input += 1;
        }
        points
    };
    let s = setup_with(|_| {}, Some(&learn), None, Table::Good).await;
    let blob = the_blob(&s);
    let per = (TABLED_CHUNK / BLOCK) as usize;
    let (a, b) = (chunk as usize * per, chunk as usize * per + per - 1);
    s.lazy.fetch_mapped(&blob, a, b).await.unwrap();
    let at = (chunk * TABLED_CHUNK) as usize;
    let file = fs::read(&s.path).unwrap();
    assert!(file[at..at + TABLED_CHUNK as usize] == s.image[at..at + TABLED_CHUNK as usize]);
    let c = s.lazy.counters();
    // The fill may have tried it too, before this request's failure.
    let tried = c.learned_point_requests.load(Ordering::Relaxed);
    assert!((1..=2).contains(&tried), "{tried}");
    assert_eq!(c.learned_point_failures.load(Ordering::Relaxed), 1);
}
