use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hyperbox_kernel::fanotify::{FileId, Verdict};
use hyperbox_kernel::testing::FakeFanotify;
use hyperbox_registry::digest::Digest;
use hyperbox_registry::index::{Index, IndexLayer};
use hyperbox_registry::{Pace, Reference, Registry};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use super::blob::{State, missing_runs};
use super::fill::{Download, FILL_REQUEST, WHOLE_ATTEMPTS};
use super::index::{Found, index_key};
use super::readahead::{Ahead, READAHEAD_MAX, READAHEAD_MIN, READAHEAD_TRIAL, readahead_window};
use super::verify::{Verifier, WholeError};
use super::{Error, Lazy, Options, lock};
use crate::prefetch;

const CHUNK: u64 = 4096;
const WAIT: Duration = Duration::from_secs(20);

/// A registry that serves one blob over plain HTTP with Range
/// requests; with `corrupt`, every byte it sends is wrong.
struct Blobs {
    addr: std::net::SocketAddr,
    ranges: Arc<AtomicUsize>,
    /// The first byte of each range asked for, in arrival order
    /// (failed ones too).
    asked: Arc<Mutex<Vec<u64>>>,
}

async fn serve(blob: Vec<u8>, case: &Case) -> Blobs {
    let (corrupt, delay) = (case.corrupt, case.delay);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ranges = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(case.fail_first));
    let asked = Arc::new(Mutex::new(Vec::new()));
    let (blob, counted, asked_log) = (Arc::new(blob), ranges.clone(), asked.clone());
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let (blob, counted, failures) = (blob.clone(), counted.clone(), failures.clone());
            let asked = asked_log.clone();
            tokio::spawn(async move {
                let Some(head) = crate::test_http::read_head(&mut conn).await else {
                    return;
                };
                let text = head.to_lowercase();
                let range = text
                    .lines()
                    .find_map(|l| l.strip_prefix("range: bytes="))
                    .and_then(|r| r.trim().split_once('-'))
                    .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
                let Some((a, b)) = range else {
                    let _ = conn
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                };
                lock(&asked).push(a as u64);
                // A slow link: the client may give the request up.
                tokio::time::sleep(delay).await;
                if failures
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let _ = conn
                        .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                }
                counted.fetch_add(1, Ordering::SeqCst);
                let mut body = blob[a..=b].to_vec();
                if corrupt {
                    body.iter_mut().for_each(|x| *x = !*x);
                }
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\ncontent-range: bytes {a}-{b}/{}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    blob.len(),
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(&body).await;
            });
        }
    });
    Blobs {
        addr,
        ranges,
        asked,
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    lazy: Arc<Lazy>,
    fan: Arc<FakeFanotify>,
    blob: Vec<u8>,
    path: PathBuf,
    file: FileId,
    layer: String,
    server: Blobs,
    whole: Arc<Whole>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Ends the event thread.
        self.fan.close();
    }
}

/// Gives back, as "the layer fetched whole", `bytes` with `diff_id`.
#[derive(Debug)]
struct Whole {
    path: PathBuf,
    diff_id: String,
    /// Fails this many downloads first.
    fails: AtomicUsize,
    /// Downloads asked for.
    calls: AtomicUsize,
    /// When set, a download waits for it before its first piece.
    gate: Option<Arc<tokio::sync::Notify>>,
    /// The reply's headers are in when it waits for `gate`: its pace has
    /// been asked once, as a real download's is before its first piece.
    started: bool,
    /// Every download is refused for its content.
    bad_content: bool,
    /// Downloads never wait for reads.
    unpaced: bool,
    /// A download was told it is no longer wanted.
    stopped: AtomicBool,
}

impl Verifier for Whole {
    fn whole<'a>(
        &'a self,
        _image: &'a str,
        _layer: &'a str,
        pace: Option<Pace>,
    ) -> BoxFuture<'a, Result<(PathBuf, String), WholeError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.started
                && let Some(p) = &pace
            {
                p(0).await;
            }
            if let Some(gate) = &self.gate {
                gate.notified().await;
            }
            if let Some(p) = pace.filter(|_| !self.unpaced) {
                // The body's first piece and one past the budget, read
                // as the download would.
                if !p(0).await || !p(FILL_REQUEST).await {
                    self.stopped.store(true, Ordering::SeqCst);
                    return Err(WholeError {
                        why: "download stopped: no longer wanted".into(),
                        bad_content: false,
                        stopped: true,
                    });
                }
            }
            if self.bad_content {
                return Err(WholeError {
                    why: "layer refused: device node".into(),
                    bad_content: true,
                    stopped: false,
                });
            }
            if self
                .fails
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(WholeError {
                    why: "registry unavailable".into(),
                    bad_content: false,
                    stopped: false,
                });
            }
            Ok((self.path.clone(), self.diff_id.clone()))
        })
    }
}

const DIFF_ID: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

/// A registry client with no hosts configured, keeping its files in `dir`.
pub(super) fn registry(dir: &Path) -> Arc<Registry> {
    Arc::new(
        Registry::new(&hyperbox_config::Registry {
            config_path: dir.join("certs.d"),
            docker_config: dir.join("config.json"),
            max_concurrent_downloads: 1,
            retries: 0,
            timeout_secs: 5,
        })
        .unwrap(),
    )
}

/// How a test's layer is set up.
#[derive(Default)]
struct Case {
    /// The registry flips every byte it sends.
    corrupt: bool,
    /// The registry fails this many range requests first (each after
    /// `delay`).
    fail_first: usize,
    /// What "the layer fetched whole" converts to, if not the blob.
    whole: Option<Vec<u8>>,
    /// How long the registry takes before answering a range.
    delay: Duration,
    /// Chunks an earlier run read, in order (a learned prefetch list).
    learned: Vec<usize>,
    /// A list shared through the registry, fitted to the layer as an
    /// index lookup leaves it.
    shared: Vec<usize>,
    /// Fill from the layer fetched whole (`fill_from_layer`).
    from_layer: bool,
    /// Downloads of the whole layer that fail first.
    whole_fails: usize,
    /// The whole layer comes once this is notified.
    whole_gate: Option<Arc<tokio::sync::Notify>>,
    /// The whole layer is refused for its content.
    whole_bad_content: bool,
    /// The whole layer's download does not wait for reads: its bytes
    /// were on their way before they came.
    whole_unpaced: bool,
    /// The whole layer's reply has begun when it waits for `whole_gate`.
    whole_started: bool,
    /// Registered as a prewarm does: parked until a pull takes it.
    prewarmed: bool,
}

/// A lazy layer of four chunks, registered and marked, whose bytes
/// come from a local registry; verified against a whole copy.
async fn setup(case: Case) -> Setup {
    let blob: Vec<u8> = (0..4 * CHUNK).map(|i| (i % 251) as u8).collect();
    let server = serve(blob.clone(), &case).await;
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole.erofs");
    fs::write(&whole, case.whole.as_deref().unwrap_or(&blob)).unwrap();
    let whole = Arc::new(Whole {
        path: whole,
        diff_id: DIFF_ID.into(),
        fails: AtomicUsize::new(case.whole_fails),
        calls: AtomicUsize::new(0),
        gate: case.whole_gate.clone(),
        bad_content: case.whole_bad_content,
        unpaced: case.whole_unpaced,
        started: case.whole_started,
        stopped: AtomicBool::new(false),
    });
    let verifier: Arc<dyn Verifier> = whole.clone();
    if !case.learned.is_empty() {
        prefetch::Store::open(dir.path())
            .unwrap()
            .save(&Digest::of(&blob).to_string(), CHUNK, 4, &case.learned)
            .unwrap();
    }
    let fan = Arc::new(FakeFanotify::new());
    let (lazy, resumed) = Lazy::open(
        dir.path(),
        registry(dir.path()),
        fan.clone(),
        Some(verifier),
        Options {
            fill_from_layer: case.from_layer,
            ..OPTIONS
        },
    )
    .unwrap();
    assert_eq!(resumed, 0);
    let layer = format!("sha256:{}", "1".repeat(64));
    let state = State {
        image: format!("{}/test/lazy:v1", server.addr),
        chunk_size: CHUNK,
        entry: IndexLayer {
            layer: layer.clone(),
            diff_id: DIFF_ID.into(),
            erofs: Digest::of(&blob).to_string(),
            size: blob.len() as u64,
            data_end: 3 * CHUNK,
            chunks: blob
                .chunks(CHUNK as usize)
                .map(|c| hex::encode(Sha256::digest(c)))
                .collect(),
            map: None,
            blocks: None,
        },
        rejected: None,
        prewarmed: case.prewarmed.then(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        }),
        shared: (!case.shared.is_empty()).then_some(hyperbox_registry::prefetch::Fitted {
            chunks: case.shared,
            points: None,
        }),
    };
    let me = lazy.clone();
    // Decided as a Prepare decides it, from this node's lists and the
    // shared ones.
    let download = lazy.download_for(&Found {
        index: Arc::new(Index {
            version: 2,
            chunk_size: CHUNK,
            layers: vec![state.entry.clone()],
        }),
        shared: Arc::new(
            state
                .shared
                .iter()
                .map(|l| (state.entry.erofs.clone(), Arc::new(l.clone())))
                .collect(),
        ),
    });
    let path = tokio::task::spawn_blocking(move || me.register(state, true, download))
        .await
        .unwrap()
        .unwrap()
        .path
        .clone();
    let m = fs::metadata(&path).unwrap();
    Setup {
        _dir: dir,
        lazy,
        fan,
        blob,
        path,
        file: (m.dev(), m.ino()),
        layer,
        server,
        whole,
    }
}

/// [`setup`] filling from the layer fetched whole, whose download holds
/// until the returned gate is notified.
async fn held_download() -> (Setup, Arc<tokio::sync::Notify>) {
    let gate = Arc::new(tokio::sync::Notify::new());
    let s = setup(Case {
        from_layer: true,
        whole_gate: Some(gate.clone()),
        ..Case::default()
    })
    .await;
    (s, gate)
}

const OPTIONS: Options = Options {
    max_chunk_fetches: 4,
    verify: true,
    fill_pause_io_pressure: 0.0,
    // One chunk per request, so the tests see each chunk's request.
    fill_request: CHUNK,
    shared_prefetch: true,
    fill_from_layer: false,
};

/// Polls `f` until it holds or WAIT passes.
async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// A read of `offset` as the kernel would hold it, and its answer.
async fn read_event(s: &Setup, offset: u64) -> Option<Verdict> {
    let id = s.fan.push(Some(s.file), offset, 16);
    let fan = s.fan.clone();
    tokio::task::spawn_blocking(move || fan.answer(id, WAIT))
        .await
        .unwrap()
}

/// A read of `offset` held as [`read_event`] does, returned once its
/// request has reached the registry; its answer comes from the handle.
async fn read_in_flight(s: &Setup, offset: u64) -> tokio::task::JoinHandle<Option<Verdict>> {
    let fan = s.fan.clone();
    let id = fan.push(Some(s.file), offset, 16);
    let read = tokio::task::spawn_blocking(move || fan.answer(id, WAIT));
    let server = s.server.asked.clone();
    assert!(eventually(|| !lock(&server).is_empty()).await);
    read
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_read_is_allowed_once_its_range_is_in_and_verified() {
    let s = setup(Case::default()).await;
    assert_eq!(
        s.fan.marked(),
        std::slice::from_ref(&s.path),
        "marked before any mount"
    );
    assert!(s.lazy.knows(&s.layer));
    let offset = CHUNK + 100;
    let id = s.fan.push(Some(s.file), offset, 16);
    let answer = tokio::task::spawn_blocking({
        let fan = s.fan.clone();
        move || fan.answer(id, WAIT)
    })
    .await
    .unwrap();
    assert_eq!(answer, Some(Verdict::Allow));
    assert_eq!(
        read_at(&s.path, CHUNK, CHUNK as usize),
        s.blob[CHUNK as usize..2 * CHUNK as usize],
        "the chunk holding the range was written before the answer"
    );
    assert!(s.server.ranges.load(Ordering::SeqCst) >= 1);
    // The background fill completes the file and lifts its mark.
    let fan = s.fan.clone();
    let unmarked = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + WAIT;
        while !fan.marked().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        fan.marked().is_empty()
    })
    .await
    .unwrap();
    assert!(unmarked, "a complete layer is no longer marked");
    assert_eq!(fs::read(&s.path).unwrap(), s.blob);
    assert!(!s.lazy.knows(&s.layer));
    // Checked against the whole layer: nothing more is kept about it.
    let lazy = s.lazy.clone();
    assert!(eventually(|| lazy.counters().verified.load(Ordering::SeqCst) == 1).await);
    assert!(!s.path.with_extension("lazy").exists());
    assert_eq!(s.lazy.counters().rejected.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_layer_that_does_not_match_its_image_is_refused_for_good() {
    let mut other: Vec<u8> = (0..4 * CHUNK).map(|i| (i % 251) as u8).collect();
    other[5000] ^= 0xff;
    let s = setup(Case {
        whole: Some(other),
        ..Case::default()
    })
    .await;
    // A snapshot links it, as commit_layer does.
    let link = s._dir.path().join("snapshot-layer.erofs");
    fs::hard_link(&s.path, &link).unwrap();
    let lazy = s.lazy.clone();
    assert!(eventually(|| lazy.counters().rejected.load(Ordering::SeqCst) == 1).await);
    let why =
        crate::snapshots::LayerGate::refuse(&*s.lazy, &link).expect("new mounts on it are refused");
    assert!(why.contains("is not what layer"), "{why}");
    assert_eq!(
        s.fan.marked(),
        std::slice::from_ref(&s.path),
        "marked again"
    );
    assert_eq!(read_event(&s, 0).await, Some(Verdict::DenyEio));
    let state = fs::read_to_string(s.path.with_extension("lazy")).unwrap();
    assert!(state.contains("rejected"), "{state}");
    // A restart keeps refusing it, and never fills it again.
    let fan = Arc::new(FakeFanotify::new());
    let (again, resumed) = Lazy::open(
        s._dir.path(),
        registry(s._dir.path()),
        fan.clone(),
        None,
        OPTIONS,
    )
    .unwrap();
    assert_eq!(resumed, 0);
    assert!(crate::snapshots::LayerGate::refuse(&*again, &link).is_some());
    assert_eq!(fan.marked(), std::slice::from_ref(&s.path));
    fan.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_fills_from_its_own_blob_without_range_requests_and_is_accepted() {
    let s = setup(Case {
        from_layer: true,
        ..Case::default()
    })
    .await;
    let lazy = s.lazy.clone();
    assert!(eventually(|| lazy.counters().verified.load(Ordering::SeqCst) == 1).await);
    assert_eq!(fs::read(&s.path).unwrap(), s.blob);
    assert!(s.fan.marked().is_empty(), "a complete layer is unmarked");
    assert_eq!(
        s.server.ranges.load(Ordering::SeqCst),
        0,
        "no byte came from the EROFS blob"
    );
    assert_eq!(
        s.lazy.counters().layer_filled_chunks.load(Ordering::SeqCst),
        4
    );
    assert_eq!(
        s.whole.calls.load(Ordering::SeqCst),
        1,
        "one download fills and verifies"
    );
    assert!(!s.path.with_extension("lazy").exists());
    assert!(!s.lazy.knows(&s.layer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_read_is_served_from_the_erofs_blob_while_the_layer_downloads() {
    let (s, gate) = held_download().await;
    // The read arrives while the layer downloads.
    let read = {
        let fan = s.fan.clone();
        let id = fan.push(Some(s.file), 2 * CHUNK + 10, 16);
        tokio::task::spawn_blocking(move || fan.answer(id, WAIT))
    };
    assert_eq!(read.await.unwrap(), Some(Verdict::Allow));
    assert!(
        s.server.ranges.load(Ordering::SeqCst) >= 1,
        "fetched on demand"
    );
    assert_eq!(s.lazy.counters().verified.load(Ordering::SeqCst), 0);
    gate.notify_one();
    let lazy = s.lazy.clone();
    assert!(eventually(|| lazy.counters().verified.load(Ordering::SeqCst) == 1).await);
    assert_eq!(fs::read(&s.path).unwrap(), s.blob);
    let from_layer = s.lazy.counters().layer_filled_chunks.load(Ordering::SeqCst);
    assert!(
        (1..=3).contains(&from_layer),
        "{from_layer}: the chunks the read did not fetch came from the layer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_request_fails_after_the_layer_filled_its_chunks_goes_on() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let s = setup(Case {
        from_layer: true,
        whole_gate: Some(gate.clone()),
        whole_unpaced: true,
        // Every Range request fails: the read's and any read-ahead's.
        fail_first: 100,
        delay: Duration::from_secs(2),
        ..Case::default()
    })
    .await;
    // The layer's download is under way when the read comes; the
    // layer arrives and fills every chunk while the read's own request
    // is still out, and that request then fails.
    let whole = s.whole.clone();
    assert!(eventually(|| whole.calls.load(Ordering::SeqCst) == 1).await);
    let read = read_in_flight(&s, 2 * CHUNK + 10).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.notify_one();
    let lazy = s.lazy.clone();
    assert!(eventually(|| lazy.counters().verified.load(Ordering::SeqCst) == 1).await);
    assert_eq!(read.await.unwrap(), Some(Verdict::Allow));
    assert!(
        s.lazy.counters().chunk_failures.load(Ordering::SeqCst) >= 1,
        "the read's request did fail"
    );
    assert_eq!(s.lazy.counters().denied_reads.load(Ordering::SeqCst), 0);
    assert_eq!(
        read_at(&s.path, 2 * CHUNK, CHUNK as usize),
        s.blob[2 * CHUNK as usize..3 * CHUNK as usize]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_of_an_image_no_run_taught_downloads_at_once_and_learns_the_whole_run() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let s = setup(Case {
        from_layer: true,
        delay: Duration::from_secs(3),
        whole_gate: Some(gate.clone()),
        ..Case::default()
    })
    .await;
    assert_eq!(s.lazy.counters().untried_layers.load(Ordering::SeqCst), 1);
    // A read waits for its slow request when the layer's first bytes
    // come: the download does not pause for it.
    let read = read_in_flight(&s, 2 * CHUNK + 10).await;
    gate.notify_one();
    let lazy = s.lazy.clone();
    let deadline = Instant::now() + Duration::from_secs(2);
    while lazy.counters().layer_filled_chunks.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline && !read.is_finished(),
            "the layer was not filled while the read waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Complete, and still learning: a read now costs no fetch, but is
    // in the list the next nodes prefetch.
    let asked = lock(&s.server.asked).len();
    assert_eq!(read_event(&s, CHUNK + 10).await, Some(Verdict::Allow));
    assert_eq!(
        lock(&s.server.asked).len(),
        asked,
        "no fetch for a complete layer"
    );
    assert_eq!(read.await.unwrap(), Some(Verdict::Allow));
    let lazy = s.lazy.clone();
    assert!(eventually(|| lazy.counters().verified.load(Ordering::SeqCst) == 1).await);
    assert!(s.fan.marked().is_empty(), "unmarked once reads stopped");
    let learned = prefetch::Store::open(s._dir.path()).unwrap().load(
        &Digest::of(&s.blob).to_string(),
        CHUNK,
        4,
    );
    assert_eq!(learned, vec![2, 1]);
    assert_eq!(fs::read(&s.path).unwrap(), s.blob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fetch_no_more_than_their_own_chunks_while_the_layer_comes_at_once() {
    // Untaught: the layer downloads at once (its bytes held here, its
    // reply begun), and a read fetches its own chunk only.
    let gate = Arc::new(tokio::sync::Notify::new());
    let s = setup(Case {
        from_layer: true,
        whole_gate: Some(gate.clone()),
        whole_started: true,
        ..Case::default()
    })
    .await;
    let lazy = s.lazy.clone();
    let downloading = move || {
        lock(&lazy.by_key)
            .values()
            .any(|b| b.downloading.load(Ordering::SeqCst))
    };
    assert!(eventually(downloading).await);
    assert_eq!(read_event(&s, 10).await, Some(Verdict::Allow));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*lock(&s.server.asked), vec![0], "only the read's chunk");
    assert_eq!(s.lazy.counters().readahead_chunks.load(Ordering::SeqCst), 0);
    gate.notify_one();

    // Taught (a list learned here): the download waits for reads (and is
    // held here, so it cannot fill the chunks first), and the same read
    // fetches the chunks after it too.
    let gate = Arc::new(tokio::sync::Notify::new());
    let s = setup(Case {
        from_layer: true,
        learned: vec![3],
        whole_gate: Some(gate.clone()),
        ..Case::default()
    })
    .await;
    let lazy = s.lazy.clone();
    assert!(eventually(|| lazy.counters().prefetched_chunks.load(Ordering::SeqCst) == 1).await);
    assert_eq!(read_event(&s, 10).await, Some(Verdict::Allow));
    let lazy = s.lazy.clone();
    assert!(
        eventually(|| lazy.counters().readahead_chunks.load(Ordering::SeqCst) == 2).await,
        "chunks 1 and 2 read ahead"
    );
    gate.notify_one();
}

/// A read the learned list predicted is not read ahead of: the list says
/// what comes next and its prefetch brings it. A read it did not predict
/// reads ahead as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_the_learned_list_predicted_are_not_read_ahead_of() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let s = setup(Case {
        from_layer: true,
        learned: vec![1],
        whole_gate: Some(gate.clone()),
        ..Case::default()
    })
    .await;
    let lazy = s.lazy.clone();
    assert!(eventually(|| lazy.counters().prefetched_chunks.load(Ordering::SeqCst) == 1).await);
    assert_eq!(read_event(&s, CHUNK + 10).await, Some(Verdict::Allow));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.lazy.counters().readahead_chunks.load(Ordering::SeqCst), 0);
    // Chunk 0 was not listed: chunks 2 and 3 are read ahead of it (1 is
    // here).
    assert_eq!(read_event(&s, 10).await, Some(Verdict::Allow));
    let lazy = s.lazy.clone();
    assert!(
        eventually(|| lazy.counters().readahead_chunks.load(Ordering::SeqCst) == 2).await,
        "chunks 2 and 3 read ahead"
    );
    gate.notify_one();
}

/// A learned prefetch that failed gives its chunks back to read-ahead: a
/// read of one is read ahead of as if no list had named it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_a_failed_prefetch_listed_are_read_ahead_of_again() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let s = setup(Case {
        from_layer: true,
        learned: vec![1],
        fail_first: 1,
        whole_gate: Some(gate.clone()),
        ..Case::default()
    })
    .await;
    let asked = s.server.asked.clone();
    assert!(eventually(|| !lock(&asked).is_empty()).await);
    // Planned before its first request; given back once it failed.
    let blob = lock(&s.lazy.by_key).values().next().unwrap().clone();
    assert!(eventually(|| !blob.planned_all(CHUNK + 10, 16)).await);
    assert_eq!(
        s.lazy.counters().prefetched_chunks.load(Ordering::SeqCst),
        0
    );
    assert_eq!(read_event(&s, CHUNK + 10).await, Some(Verdict::Allow));
    let lazy = s.lazy.clone();
    assert!(
        eventually(|| lazy.counters().readahead_chunks.load(Ordering::SeqCst) == 2).await,
        "chunks 2 and 3 read ahead of the chunk the failed prefetch listed"
    );
    gate.notify_one();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_taught_layer_or_a_shared_list_makes_an_image_wait_for_reads() {
    let s = setup(Case {
        from_layer: true,
        ..Case::default()
    })
    .await;
    let layer = |erofs: &str| IndexLayer {
        layer: format!("sha256:{}", "3".repeat(64)),
        diff_id: DIFF_ID.into(),
        erofs: erofs.into(),
        size: 4 * CHUNK,
        data_end: 3 * CHUNK,
        chunks: vec![String::new(); 4],
        map: None,
        blocks: None,
    };
    let (base, app) = (
        format!("sha256:{}", "a".repeat(64)),
        format!("sha256:{}", "b".repeat(64)),
    );
    let found = |shared: Vec<(String, Vec<usize>)>| Found {
        index: Arc::new(Index {
            version: 2,
            chunk_size: CHUNK,
            layers: vec![layer(&base), layer(&app)],
        }),
        shared: Arc::new(
            shared
                .into_iter()
                .map(|(e, chunks)| {
                    let fitted = hyperbox_registry::prefetch::Fitted {
                        chunks,
                        points: None,
                    };
                    (e, Arc::new(fitted))
                })
                .collect(),
        ),
    };
    assert_eq!(s.lazy.download_for(&found(vec![])), Download::AtOnce);
    assert_eq!(
        s.lazy.download_for(&found(vec![(app.clone(), vec![1])])),
        Download::AfterReads,
        "a list shared for one layer"
    );
    let store = prefetch::Store::open(s._dir.path()).unwrap();
    // A list that does not fit the layer teaches nothing.
    store.save(&base, CHUNK, 9, &[8]).unwrap();
    assert_eq!(s.lazy.download_for(&found(vec![])), Download::AtOnce);
    // Another image's runs taught the base layer.
    fs::remove_dir_all(s._dir.path().join("prefetch")).unwrap();
    store.save(&base, CHUNK, 4, &[0]).unwrap();
    assert_eq!(s.lazy.download_for(&found(vec![])), Download::AfterReads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fills_from_the_layer_nothing_downloads_at_once() {
    let s = setup(Case::default()).await;
    assert_eq!(s.lazy.counters().untried_layers.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_of_an_image_a_run_taught_downloads_once_reads_settle() {
    let s = setup(Case {
        from_layer: true,
        learned: vec![0],
        delay: Duration::from_millis(1500),
        ..Case::default()
    })
    .await;
    assert_eq!(s.lazy.counters().untried_layers.load(Ordering::SeqCst), 0);
    let lazy = s.lazy.clone();
    assert!(eventually(|| lazy.counters().prefetched_chunks.load(Ordering::SeqCst) == 1).await);
    let read = read_in_flight(&s, 2 * CHUNK + 10).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!read.is_finished());
    assert_eq!(
        s.whole.calls.load(Ordering::SeqCst),
        0,
        "the download waits for the read"
    );
    assert_eq!(read.await.unwrap(), Some(Verdict::Allow));
    let lazy = s.lazy.clone();
    assert!(eventually(|| lazy.counters().verified.load(Ordering::SeqCst) == 1).await);
    assert_eq!(s.whole.calls.load(Ordering::SeqCst), 1);
}

/// [`setup`], whose layer download is held until its image has been
/// deleted (the lazy file forgotten, nothing linking it).
async fn removed_while_downloading(case: Case) -> Setup {
    let gate = Arc::new(tokio::sync::Notify::new());
    let s = setup(Case {
        whole_gate: Some(gate.clone()),
        ..case
    })
    .await;
    let whole = s.whole.clone();
    assert!(eventually(|| whole.calls.load(Ordering::SeqCst) == 1).await);
    s.lazy.forget(&s.path);
    assert!(!s.path.exists());
    gate.notify_one();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_removed_while_it_downloads_stops_its_download() {
    let s = removed_while_downloading(Case {
        from_layer: true,
        ..Case::default()
    })
    .await;
    let whole = s.whole.clone();
    assert!(
        eventually(|| whole.stopped.load(Ordering::SeqCst)).await,
        "the download was told to stop"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(whole.calls.load(Ordering::SeqCst), 1, "not tried again");
    assert_eq!(
        s.server.ranges.load(Ordering::SeqCst),
        0,
        "and no fill from the EROFS blob instead"
    );
}

/// [`setup`] filling from the layer, which comes only once a snapshot
/// links the lazy file (as commit_layer does), so a refusal marks the
/// file instead of removing it.
async fn linked_from_layer(case: Case) -> Setup {
    let gate = Arc::new(tokio::sync::Notify::new());
    let s = setup(Case {
        from_layer: true,
        whole_gate: Some(gate.clone()),
        ..case
    })
    .await;
    fs::hard_link(&s.path, s._dir.path().join("snapshot-layer.erofs")).unwrap();
    gate.notify_one();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_that_converts_to_other_bytes_is_refused() {
    let mut other: Vec<u8> = (0..4 * CHUNK).map(|i| (i % 251) as u8).collect();
    other[5000] ^= 0xff;
    let s = linked_from_layer(Case {
        whole: Some(other),
        ..Case::default()
    })
    .await;
    let lazy = s.lazy.clone();
    assert!(eventually(|| lazy.counters().rejected.load(Ordering::SeqCst) == 1).await);
    assert_eq!(
        s.lazy.counters().layer_filled_chunks.load(Ordering::SeqCst),
        0
    );
    assert_eq!(read_event(&s, 0).await, Some(Verdict::DenyEio));
    let state = fs::read_to_string(s.path.with_extension("lazy")).unwrap();
    assert!(state.contains("is not what layer"), "{state}");
    assert!(state.contains("chunk 1 differs"), "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_waiting_when_its_layer_is_refused_fails() {
    let mut other: Vec<u8> = (0..4 * CHUNK).map(|i| (i % 251) as u8).collect();
    other[5000] ^= 0xff;
    let gate = Arc::new(tokio::sync::Notify::new());
    let s = setup(Case {
        from_layer: true,
        whole: Some(other),
        whole_gate: Some(gate.clone()),
        whole_unpaced: true,
        delay: Duration::from_secs(2),
        ..Case::default()
    })
    .await;
    fs::hard_link(&s.path, s._dir.path().join("snapshot-layer.erofs")).unwrap();
    let whole = s.whole.clone();
    assert!(eventually(|| whole.calls.load(Ordering::SeqCst) == 1).await);
    // The read's chunk is fine and on its way when the layer is
    // refused; the chunks around it may never be written.
    let read = read_in_flight(&s, 2 * CHUNK + 10).await;
    gate.notify_one();
    let lazy = s.lazy.clone();
    assert!(eventually(|| lazy.counters().rejected.load(Ordering::SeqCst) == 1).await);
    assert_eq!(read.await.unwrap(), Some(Verdict::DenyEio));
    assert_eq!(read_event(&s, 3 * CHUNK).await, Some(Verdict::DenyEio));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_removed_while_it_is_verified_is_not_counted_verified() {
    // Complete from the EROFS blob; its verification downloads the
    // layer.
    let s = removed_while_downloading(Case::default()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.lazy.counters().verified.load(Ordering::SeqCst), 0);
    assert_eq!(s.lazy.counters().rejected.load(Ordering::SeqCst), 0);
    assert!(!s.path.with_extension("lazy").exists(), "no state left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_refused_for_its_content_refuses_its_lazy_copy_at_once() {
    let s = linked_from_layer(Case {
        whole_bad_content: true,
        ..Case::default()
    })
    .await;
    let lazy = s.lazy.clone();
    assert!(eventually(|| lazy.counters().rejected.load(Ordering::SeqCst) == 1).await);
    assert_eq!(s.whole.calls.load(Ordering::SeqCst), 1, "not retried");
    assert_eq!(s.server.ranges.load(Ordering::SeqCst), 0, "no Range fill");
    let state = fs::read_to_string(s.path.with_extension("lazy")).unwrap();
    assert!(
        state.contains("refused whole: layer refused: device node"),
        "{state}"
    );
    assert_eq!(read_event(&s, 2 * CHUNK).await, Some(Verdict::DenyEio));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_layer_the_fill_falls_back_to_the_erofs_blob() {
    let s = setup(Case {
        from_layer: true,
        whole_fails: usize::MAX,
        ..Case::default()
    })
    .await;
    let fan = s.fan.clone();
    assert!(
        eventually(|| fan.marked().is_empty()).await,
        "complete anyway"
    );
    assert_eq!(fs::read(&s.path).unwrap(), s.blob);
    assert!(s.server.ranges.load(Ordering::SeqCst) >= 1);
    assert!(s.whole.calls.load(Ordering::SeqCst) >= WHOLE_ATTEMPTS as usize);
    assert_eq!(
        s.lazy.counters().verified.load(Ordering::SeqCst),
        0,
        "not verified without the layer"
    );
}

/// Someone who can push to one repository writes an index naming a
/// popular layer and its true EROFS digest, with chunk digests of their
/// own. Another repository's pull of the same layer never reads bytes that
/// index vouches for: the lazy copy made from it is not shared (the layer
/// is fetched whole) and a target it made waits for its verification.
/// An index vouching for the same chunks shares it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_copy_is_shared_only_with_pulls_whose_index_vouches_for_its_chunks() {
    let (s, gate) = held_download().await;
    let blob = lock(&s.lazy.by_key).values().next().unwrap().clone();
    let manifest = format!("sha256:{}", "4".repeat(64));
    let index_of = |image: &str, chunks: Vec<String>| {
        let mut entry = blob.state.entry.clone();
        entry.chunks = chunks;
        let found = Found {
            index: Arc::new(Index {
                version: 2,
                chunk_size: CHUNK,
                layers: vec![entry],
            }),
            shared: Default::default(),
        };
        let key = index_key(&Reference::parse(image).unwrap(), &manifest);
        let cached = super::index::CachedIndex {
            at: Instant::now(),
            found: Some(found),
        };
        lock(&s.lazy.indexes).insert(key, cached);
    };
    let same = format!("{}/team-b/app:v1", s.server.addr);
    let forged = format!("{}/team-c/app:v1", s.server.addr);
    index_of(&same, blob.state.entry.chunks.clone());
    let mut chunks = blob.state.entry.chunks.clone();
    chunks[1] = hex::encode(Sha256::digest(b"what team-c would have it read"));
    index_of(&forged, chunks);
    let target = hyperbox_registry::digest::chain_id("", DIFF_ID);
    let took = s
        .lazy
        .prepare(&same, &manifest, &s.layer, "", &target)
        .await
        .unwrap();
    assert_eq!(
        took.as_deref(),
        Some(s.path.as_path()),
        "the same chunks share it"
    );
    let took = s
        .lazy
        .prepare(&forged, &manifest, &s.layer, "", &target)
        .await
        .unwrap();
    assert_eq!(
        took, None,
        "other chunk digests: the layer is fetched whole"
    );
    // A target the copy made.
    let wait = Duration::from_millis(200);
    let trusted = |image: String| {
        let (lazy, path, layer, manifest) = (
            s.lazy.clone(),
            s.path.clone(),
            s.layer.clone(),
            manifest.clone(),
        );
        async move {
            lazy.wait_trusted(&path, &image, Some(&manifest), &layer, wait)
                .await
        }
    };
    assert_eq!(trusted(same.clone()).await, Ok(()));
    let why = trusted(forged.clone()).await.unwrap_err();
    assert!(why.contains("is not verified"), "{why}");
    gate.notify_one();
}

#[test]
fn an_index_is_looked_up_in_the_repository_of_the_image() {
    let m = "sha256:5b0bcabd1ed22e9fb1310cf6c2dec7cdef19f0ad69efa1f392e94a4333501270";
    let key = |image: &str| index_key(&Reference::parse(image).unwrap(), m);
    // Mirrored into another repository, the same manifest has none of
    // the first repository's index blobs: never reuse its index there.
    assert_ne!(
        key("127.0.0.1:5000/team-a/app:v1"),
        key("127.0.0.1:5000/team-b/app:v1")
    );
    assert_ne!(key("registry-a:5000/app:v1"), key("registry-b:5000/app:v1"));
    assert_eq!(
        key("127.0.0.1:5000/team-a/app:v1"),
        key("127.0.0.1:5000/team-a/app:latest")
    );
}

#[test]
fn read_ahead_grows_while_reads_follow_and_shrinks_on_a_jump() {
    let (min, c) = (READAHEAD_MIN, 64 << 10);
    let mut state = (0, min);
    let mut windows = Vec::new();
    for offset in [0, 4096, 64 << 10, 300 << 10, 900 << 10, 2 << 20] {
        let (w, _) = readahead_window(state, offset, c);
        windows.push(w);
        state = (offset + 4096, w);
    }
    // A read from the start follows "nothing read yet" at 0; 2 MiB is
    // past the 1 MiB window after the read at 900 KiB.
    assert_eq!(
        windows,
        [
            2 * min,
            4 * min,
            READAHEAD_MAX,
            READAHEAD_MAX,
            READAHEAD_MAX,
            min
        ]
    );
    // Far behind or far ahead: back to the minimum, a jump.
    assert_eq!(
        readahead_window((10 << 20, READAHEAD_MAX), 0, c),
        (min, false)
    );
    assert_eq!(readahead_window((0, min), 50 << 20, c), (min, false));
    assert_eq!(readahead_window((0, min), 4096, c), (2 * min, true));
}

#[test]
fn read_ahead_after_jumps_stops_while_reads_do_not_use_it() {
    let mut a = Ahead::default();
    assert!(a.pays(), "a trial first");
    a.fetched = READAHEAD_TRIAL;
    assert!(!a.pays(), "nothing of the trial used");
    a.used = READAHEAD_TRIAL / 4;
    assert!(a.pays(), "a quarter used");
    a.fetched = 10 * READAHEAD_TRIAL;
    assert!(!a.pays());
}

#[test]
fn adjacent_missing_chunks_are_one_request_up_to_a_bound() {
    let (t, f) = (true, false);
    assert_eq!(missing_runs(&[], 4), vec![]);
    assert_eq!(missing_runs(&[t, t], 4), vec![]);
    assert_eq!(missing_runs(&[f, f, t, f], 4), vec![(0, 1), (3, 3)]);
    assert_eq!(
        missing_runs(&[f, f, f, f, f, t, f], 2),
        vec![(0, 1), (2, 3), (4, 4), (6, 6)]
    );
    assert_eq!(missing_runs(&[f, f], 0), vec![(0, 0), (1, 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_read_goes_ahead_of_the_background_fill() {
    let delay = Duration::from_millis(400);
    let s = setup(Case {
        delay,
        ..Case::default()
    })
    .await;
    // The fill is fetching chunk 0 when a read of chunk 3 arrives.
    assert!(eventually(|| lock(&s.server.asked).first() == Some(&0)).await);
    let asked = std::time::Instant::now();
    assert_eq!(read_event(&s, 3 * CHUNK + 7).await, Some(Verdict::Allow));
    let waited = asked.elapsed();
    assert!(
        waited < 2 * delay,
        "the read waited {waited:?}, one request is {delay:?}"
    );
    // Had the fill kept chunk 0's request, chunk 0 would have been in
    // before the read's; it was given up and asked again after.
    assert_eq!(
        read_at(&s.path, 0, CHUNK as usize),
        vec![0u8; CHUNK as usize],
        "chunk 0 is not in yet"
    );
    let d = s.lazy.demand_counters();
    assert_eq!(d.fill_preempted.load(Ordering::Relaxed), 1);
    // Then the fill takes chunk 0 up again and completes the layer.
    assert!(eventually(|| s.fan.marked().is_empty()).await, "completed");
    assert_eq!(fs::read(&s.path).unwrap(), s.blob);
    assert!(d.fill_yields.load(Ordering::Relaxed) >= 1);
    // What the read waited for is the layer's learned prefetch list.
    let store = prefetch::Store::open(s._dir.path()).unwrap();
    assert_eq!(store.load(&Digest::of(&s.blob).to_string(), CHUNK, 4), [3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_list_is_fetched_first_in_its_order() {
    let s = setup(Case {
        delay: Duration::from_millis(200),
        learned: vec![3, 1],
        ..Case::default()
    })
    .await;
    assert!(eventually(|| lock(&s.server.asked).len() >= 3).await);
    let asked = lock(&s.server.asked).clone();
    let mut first_two = asked[..2].to_vec();
    first_two.sort();
    assert_eq!(
        first_two,
        [CHUNK, 3 * CHUNK],
        "listed chunks first: {asked:?}"
    );
    assert!(eventually(|| s.fan.marked().is_empty()).await, "completed");
    assert_eq!(fs::read(&s.path).unwrap(), s.blob);
    assert_eq!(
        s.lazy.counters().prefetched_chunks.load(Ordering::Relaxed),
        2
    );
    let asked = lock(&s.server.asked).clone();
    assert_eq!(asked.len(), 4, "each chunk once: {asked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_list_adds_to_what_the_node_learned() {
    let s = setup(Case {
        delay: Duration::from_millis(200),
        learned: vec![3],
        shared: vec![3, 1],
        ..Case::default()
    })
    .await;
    assert!(eventually(|| lock(&s.server.asked).len() >= 3).await);
    let mut first_two = lock(&s.server.asked)[..2].to_vec();
    first_two.sort();
    assert_eq!(first_two, [CHUNK, 3 * CHUNK], "listed chunks first");
    assert!(eventually(|| s.fan.marked().is_empty()).await, "completed");
    let c = s.lazy.counters();
    assert_eq!(c.prefetched_chunks.load(Ordering::Relaxed), 2);
    assert_eq!(c.shared_prefetch_lists.load(Ordering::Relaxed), 1);

    // A shared list that adds nothing to what the node learned is not
    // counted as used.
    let s = setup(Case {
        learned: vec![2, 1],
        shared: vec![1],
        ..Case::default()
    })
    .await;
    assert!(eventually(|| s.fan.marked().is_empty()).await, "completed");
    let c = s.lazy.counters();
    assert_eq!(c.prefetched_chunks.load(Ordering::Relaxed), 2);
    assert_eq!(c.shared_prefetch_lists.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_across_missing_chunks_is_one_request() {
    let s = setup(Case {
        delay: Duration::from_millis(200),
        ..Case::default()
    })
    .await;
    let id = s.fan.push(Some(s.file), CHUNK + 10, 2 * CHUNK);
    let fan = s.fan.clone();
    let answer = tokio::task::spawn_blocking(move || fan.answer(id, WAIT))
        .await
        .unwrap();
    assert_eq!(answer, Some(Verdict::Allow));
    assert_eq!(
        read_at(&s.path, CHUNK, 3 * CHUNK as usize),
        s.blob[CHUNK as usize..],
        "chunks 1 to 3 are in"
    );
    assert!(eventually(|| s.fan.marked().is_empty()).await, "completed");
    let asked = lock(&s.server.asked).clone();
    assert!(asked.contains(&CHUNK), "{asked:?}");
    assert!(
        !asked.contains(&(2 * CHUNK)) && !asked.contains(&(3 * CHUNK)),
        "chunks 2 and 3 came with chunk 1: {asked:?}"
    );
    // The read's wait is on /metrics: one read, at least the registry's
    // 200 ms, in the 250 ms-or-more buckets only.
    let page = crate::metrics::render(Some(&s.lazy));
    let line = |name: &str| {
        page.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in {page}"))
            .parse::<f64>()
            .unwrap()
    };
    let name = "hyperbox_snapshotter_lazy_read_wait_seconds";
    assert_eq!(line(&format!("{name}_count")), 1.0, "{page}");
    assert!(line(&format!("{name}_sum")) >= 0.2, "{page}");
    assert_eq!(line(&format!("{name}_bucket{{le=\"0.1\"}}")), 0.0, "{page}");
    assert_eq!(
        line(&format!("{name}_bucket{{le=\"+Inf\"}}")),
        1.0,
        "{page}"
    );
    // And its size as the event gave it: two chunks, in that bucket and
    // up, none below.
    let name = "hyperbox_snapshotter_lazy_read_bytes";
    assert_eq!(line(&format!("{name}_count")), 1.0, "{page}");
    assert_eq!(line(&format!("{name}_sum")), (2 * CHUNK) as f64, "{page}");
    let bucket = |le: u64| line(&format!("{name}_bucket{{le=\"{le}.0\"}}"));
    assert_eq!(bucket(CHUNK), 0.0, "{page}");
    assert_eq!(bucket(2 * CHUNK), 1.0, "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_the_chunk_being_filled_is_not_fetched_twice() {
    let delay = Duration::from_millis(300);
    let s = setup(Case {
        delay,
        ..Case::default()
    })
    .await;
    assert!(eventually(|| lock(&s.server.asked).first() == Some(&0)).await);
    assert_eq!(read_event(&s, 100).await, Some(Verdict::Allow));
    assert_eq!(
        s.lazy
            .demand_counters()
            .fill_preempted
            .load(Ordering::Relaxed),
        0,
        "the fill finished the chunk the read waits for"
    );
    assert!(eventually(|| s.fan.marked().is_empty()).await, "completed");
    let asked = lock(&s.server.asked).clone();
    assert_eq!(asked.iter().filter(|a| **a == 0).count(), 1, "{asked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_fill_retries_after_registry_errors() {
    let s = setup(Case {
        fail_first: 3,
        ..Case::default()
    })
    .await;
    let fan = s.fan.clone();
    assert!(
        eventually(|| fan.marked().is_empty()).await,
        "completed despite the first failures"
    );
    assert_eq!(fs::read(&s.path).unwrap(), s.blob);
    assert!(s.lazy.counters().chunk_failures.load(Ordering::SeqCst) >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_file_is_never_discarded_or_rewritten() {
    let s = setup(Case {
        corrupt: true,
        ..Case::default()
    })
    .await;
    let link = s._dir.path().join("snapshot-layer.erofs");
    fs::hard_link(&s.path, &link).unwrap();
    s.lazy.forget(&s.path);
    assert!(s.path.exists(), "a snapshot links it: kept");
    assert!(s.lazy.knows(&s.layer), "and still served");
    let state: State =
        serde_json::from_slice(&fs::read(s.path.with_extension("lazy")).unwrap()).unwrap();
    let me = s.lazy.clone();
    let again = tokio::task::spawn_blocking(move || me.register(state, true, Download::AfterReads))
        .await
        .unwrap();
    assert!(matches!(again, Err(Error::Linked { .. })), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_state_is_set_aside_and_its_file_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lazy_dir = dir.path().join("lazy");
    fs::create_dir_all(&lazy_dir).unwrap();
    let stem = format!("{}.{}", "1".repeat(64), "3".repeat(64));
    let file = lazy_dir.join(format!("{stem}.erofs"));
    fs::write(&file, vec![0u8; 8192]).unwrap();
    let link = dir.path().join("snapshot-layer.erofs");
    fs::hard_link(&file, &link).unwrap();
    fs::write(lazy_dir.join(format!("{stem}.lazy")), b"{\"image\": tru").unwrap();
    let fan = Arc::new(FakeFanotify::new());
    let (lazy, resumed) = Lazy::open(dir.path(), registry(dir.path()), fan.clone(), None, OPTIONS)
        .expect("a bad state file does not stop the start");
    assert_eq!(resumed, 0);
    assert!(lazy_dir.join(format!("{stem}.lazy.corrupt")).exists());
    assert!(crate::snapshots::LayerGate::refuse(&*lazy, &link).is_some());
    assert_eq!(fan.marked(), vec![file]);
    fan.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_cannot_be_verified_fails_with_eio_and_says_why() {
    let s = setup(Case {
        corrupt: true,
        ..Case::default()
    })
    .await;
    let id = s.fan.push(Some(s.file), 2 * CHUNK, CHUNK);
    let fan = s.fan.clone();
    let answer = tokio::task::spawn_blocking(move || fan.answer(id, WAIT))
        .await
        .unwrap();
    assert_eq!(answer, Some(Verdict::DenyEio));
    assert_eq!(
        read_at(&s.path, 2 * CHUNK, CHUNK as usize),
        vec![0u8; CHUNK as usize],
        "nothing unverified was written"
    );
    let why = s.lazy.last_error(&s.path).unwrap();
    assert!(why.contains("does not match the index"), "{why}");
    assert_eq!(s.fan.marked(), std::slice::from_ref(&s.path), "still held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_files_it_does_not_serve_go_on_at_once() {
    let s = setup(Case::default()).await;
    let other = s.fan.push(Some((0, 1)), 0, 4096);
    let unknown = s.fan.push(None, 0, 4096);
    let fan = s.fan.clone();
    let answers =
        tokio::task::spawn_blocking(move || (fan.answer(other, WAIT), fan.answer(unknown, WAIT)))
            .await
            .unwrap();
    assert_eq!(answers, (Some(Verdict::Allow), Some(Verdict::Allow)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prewarmed_layer_fetches_its_learned_chunks_only_and_fills_once_a_pull_takes_it() {
    let s = setup(Case {
        learned: vec![2, 0],
        from_layer: true,
        prewarmed: true,
        ..Default::default()
    })
    .await;
    let blob = lock(&s.lazy.by_key).values().next().cloned().unwrap();
    assert_eq!(s.lazy.phases()[3], ("prewarmed", 1));
    assert_eq!(s.lazy.phases()[0], ("filling", 0));
    // Parked: nothing is fetched on its own, not even the list.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.server.ranges.load(Ordering::SeqCst), 0);
    assert_eq!(s.whole.calls.load(Ordering::SeqCst), 0);
    // Pressure at once: the prewarm stops before its first request.
    let stopped = s.lazy.fetch_learned(&blob, 1, false, &|| true).await;
    assert_eq!(
        (stopped.listed, stopped.fetched, stopped.stopped),
        (2, 0, true)
    );
    assert_eq!(stopped.missing, 2);
    // Calm: exactly the listed chunks come, and the layer stays parked.
    let warmed = s.lazy.fetch_learned(&blob, 1, false, &|| false).await;
    assert_eq!(
        (warmed.listed, warmed.fetched, warmed.stopped),
        (2, 2, false)
    );
    assert_eq!(*lock(&blob.present), [true, false, true, false]);
    assert_eq!(warmed.missing, 0);
    assert_eq!(s.server.ranges.load(Ordering::SeqCst), 2);
    assert_eq!(s.lazy.counters.prewarmed_chunks.load(Ordering::SeqCst), 2);
    assert_eq!(s.lazy.counters.prefetched_chunks.load(Ordering::SeqCst), 0);
    // Cleanup keeps a parked layer no snapshot links, past the grace a
    // Prepare's file gets.
    *lock(&blob.taken) = Instant::now() - 2 * super::prune::PRUNE_GRACE;
    assert!(s.lazy.prune().is_empty());
    assert!(s.path.exists());

    // A restart takes it back parked.
    {
        let fan = Arc::new(FakeFanotify::new());
        let (again, resumed) = Lazy::open(
            s._dir.path(),
            registry(s._dir.path()),
            fan.clone(),
            Some(s.whole.clone() as Arc<dyn Verifier>),
            Options {
                fill_from_layer: true,
                ..OPTIONS
            },
        )
        .unwrap();
        assert_eq!(resumed, 1);
        assert_eq!(again.phases()[3], ("prewarmed", 1));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(s.whole.calls.load(Ordering::SeqCst), 0);
        fan.close();
    }

    // A pull takes it: the fill starts, from what is there.
    s.lazy.adopt(&blob).unwrap();
    assert!(!blob.is_parked());
    let state: State = serde_json::from_slice(&fs::read(&blob.state_path).unwrap()).unwrap();
    assert_eq!(state.prewarmed, None, "a restart must not park it again");
    assert_eq!(s.lazy.counters.prewarm_used.load(Ordering::SeqCst), 1);
    let fan = s.fan.clone();
    assert!(
        eventually(|| fan.marked().is_empty()).await,
        "filled and unmarked"
    );
    assert!(s.whole.calls.load(Ordering::SeqCst) >= 1);
    assert_eq!(read_at(&s.path, 0, s.blob.len()), s.blob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prewarmed_layer_no_pull_takes_is_removed_after_a_day() {
    let s = setup(Case {
        learned: vec![1],
        prewarmed: true,
        ..Default::default()
    })
    .await;
    let blob = lock(&s.lazy.by_key).values().next().cloned().unwrap();
    *lock(&blob.taken) = Instant::now() - 2 * super::prune::PRUNE_GRACE;
    let day_and_a_minute_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - super::prewarm::PREWARM_KEEP.as_secs()
        - 60;
    blob.parked_at.store(day_and_a_minute_ago, Ordering::SeqCst);
    assert_eq!(s.lazy.prune(), vec![s.path.clone()]);
    assert!(!s.path.exists());
    assert!(!blob.state_path.exists());
    assert_eq!(s.lazy.counters.prewarm_expired.load(Ordering::SeqCst), 1);
    assert_eq!(s.lazy.phases()[3], ("prewarmed", 0));
}
