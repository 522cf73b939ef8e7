//! Who gets the link first: reads a workload is waiting for, then the
//! background fill of lazy layers.
//!
//! A lazily started program reads in bursts a few milliseconds apart (the
//! next shared library, the next import), each held by the kernel until
//! its range is fetched. A background chunk started in such a gap holds the
//! link when the next read arrives (1 MiB is 84 ms at 100 Mbit/s), and a
//! few layers filling at once take most of it. So the fill waits until no
//! read has been pending for [`QUIET`], gives up a chunk it is fetching
//! when a read arrives that does not need that chunk, and pauses while the
//! node's I/O is under pressure (PSI `some avg10`), where its writes would
//! slow everyone's.
//!
//! Written here rather than with a priority queue crate: the policy needs
//! to see both the requests in flight and what each read waits for, which
//! a generic scheduler does not expose.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
// tokio's clock, so tests can pause it.
use tokio::time::Instant;

/// How long the fill stays off the link after the last read ended.
pub const QUIET: Duration = Duration::from_millis(50);
/// The longest the fill waits for reads before its next request: a
/// container reading without pause must slow the fill, not stop it (an
/// incomplete layer keeps every read on the fanotify path and is never
/// verified).
pub const MAX_YIELD: Duration = Duration::from_secs(2);
/// How often the fill looks at the node's I/O pressure again while paused.
const PRESSURE_RECHECK: Duration = Duration::from_secs(1);
/// The longest one pause for pressure lasts: a node under steady pressure
/// gets one fill request per this, not none.
pub const MAX_PRESSURE_PAUSE: Duration = Duration::from_secs(30);

/// What the scheduling did, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Times the fill waited for reads to settle before its next chunk
    /// (or the next piece of its layer download).
    pub fill_yields: AtomicU64,
    /// Chunk fetches of the fill given up because a read arrived.
    pub fill_preempted: AtomicU64,
    /// Times the fill paused for the node's I/O pressure.
    pub fill_pressure_pauses: AtomicU64,
}

/// The reads in flight and when the last one ended.
#[derive(Debug)]
pub struct Demand {
    pending: watch::Sender<usize>,
    last_end: Mutex<Option<Instant>>,
    /// When pressure was last read for [`Demand::pace`], and what it was.
    pressure_seen: Mutex<Option<(Instant, bool)>>,
    /// `/proc/pressure/io`, or a test's file.
    pressure_file: PathBuf,
    /// Pause at or above this `some avg10` (%); 0 never pauses.
    pause_at: f64,
    counters: Counters,
}

/// A read in flight; dropping it ends the read.
#[derive(Debug)]
pub struct Read {
    demand: Arc<Demand>,
    wanted: Vec<Arc<AtomicU32>>,
}

impl Drop for Read {
    fn drop(&mut self) {
        // The end is stamped before the count drops, so a fill woken by
        // the count sees it; the chunks stay wanted until the count is
        // down, so a fill seeing this read never drops a request it needs.
        *self
            .demand
            .last_end
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.demand.pending.send_modify(|n| *n -= 1);
        for w in &self.wanted {
            w.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Demand {
    /// `pause_at`: the node's I/O `some avg10` (%) at which the fill
    /// pauses, 0 for never.
    pub fn new(pause_at: f64) -> Arc<Demand> {
        Self::with_pressure_file(pause_at, PathBuf::from("/proc/pressure/io"))
    }

    /// [`Demand::new`] reading pressure from `file` (tests).
    pub fn with_pressure_file(pause_at: f64, file: PathBuf) -> Arc<Demand> {
        Arc::new(Demand {
            pending: watch::Sender::new(0),
            last_end: Mutex::new(None),
            pressure_seen: Mutex::new(None),
            pressure_file: file,
            pause_at,
            counters: Counters::default(),
        })
    }

    /// What the scheduling did.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// A read begins that waits for the chunks behind `wanted` (one
    /// counter per chunk, kept by the layer): marked wanted before the read
    /// counts as pending, so a fill told of it sees what it needs.
    pub fn begin(self: &Arc<Self>, wanted: Vec<Arc<AtomicU32>>) -> Read {
        for w in &wanted {
            w.fetch_add(1, Ordering::AcqRel);
        }
        self.pending.send_modify(|n| *n += 1);
        Read {
            demand: self.clone(),
            wanted,
        }
    }

    /// Reads in flight now.
    pub fn pending(&self) -> usize {
        *self.pending.borrow()
    }

    /// Waits until no read is pending and none ended in the last
    /// [`QUIET`] (at most [`MAX_YIELD`]), then while the node's I/O is
    /// under pressure (at most [`MAX_PRESSURE_PAUSE`]); whether it waited
    /// at all.
    pub async fn settle(&self) -> bool {
        self.settle_within(MAX_PRESSURE_PAUSE).await
    }

    /// Waits until no read is pending and none ended in the last `quiet`,
    /// at most `most`. For work that cannot give the link back at once
    /// when a read arrives (a whole-layer download: the bytes a server has
    /// sent and the socket buffers hold still cross the link), started
    /// only once a container's start-up burst is over.
    pub async fn quiet_for(&self, quiet: Duration, most: Duration) {
        self.wait_quiet(quiet, most).await;
    }

    /// [`Demand::quiet_for`]; whether it waited at all.
    async fn wait_quiet(&self, quiet: Duration, most: Duration) -> bool {
        let mut waited = false;
        let mut rx = self.pending.subscribe();
        let deadline = Instant::now() + most;
        while Instant::now() < deadline {
            if *rx.borrow_and_update() > 0 {
                waited = true;
                let _ = tokio::time::timeout_at(deadline, rx.wait_for(|n| *n == 0)).await;
                continue;
            }
            let since = self
                .last_end
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .map(|t| t.elapsed());
            match since {
                Some(s) if s < quiet => {
                    waited = true;
                    tokio::time::sleep((quiet - s).min(deadline - Instant::now())).await;
                }
                _ => break,
            }
        }
        waited
    }

    /// For a background download read piece by piece (a layer fetched
    /// whole to fill its lazy copy): returns at once while no read is
    /// pending, none ended in the last [`QUIET`] and the node is calm
    /// (pressure looked at once per [`PRESSURE_RECHECK`]); otherwise
    /// [`Demand::settle`], its pause for pressure held under
    /// [`MAX_YIELD`] so the paused connection outlives it. Whether it
    /// waited.
    pub async fn pace(&self) -> bool {
        let quiet = self.pending() == 0
            && self
                .last_end
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none_or(|t| t.elapsed() >= QUIET);
        if quiet && !self.pressure_lately() {
            return false;
        }
        self.settle_within(MAX_YIELD).await
    }

    /// [`Demand::under_pressure`], read at most once per
    /// [`PRESSURE_RECHECK`].
    fn pressure_lately(&self) -> bool {
        let mut last = self.pressure_seen.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            Some((at, p)) if at.elapsed() < PRESSURE_RECHECK => p,
            _ => {
                let p = self.under_pressure();
                *last = Some((Instant::now(), p));
                p
            }
        }
    }

    /// For background work that does not give way to reads (the whole
    /// download of a layer no run has taught anything, see
    /// `crate::lazy`): waits only while the node's I/O is under pressure,
    /// at most [`MAX_YIELD`], as [`Demand::pace`] does, so the paused
    /// connection is not dropped as idle.
    pub async fn pressure_pace(&self) {
        if self.pressure_lately() {
            self.pressure_pause(MAX_YIELD).await;
        }
    }

    async fn settle_within(&self, max_pressure_pause: Duration) -> bool {
        let waited = self.wait_quiet(QUIET, MAX_YIELD).await;
        if waited {
            self.counters.fill_yields.fetch_add(1, Ordering::Relaxed);
        }
        let paused = self.pressure_pause(max_pressure_pause).await;
        waited || paused
    }

    /// Waits while the node's I/O is under pressure, at most
    /// `max_pressure_pause`; whether it did.
    async fn pressure_pause(&self, max_pressure_pause: Duration) -> bool {
        let mut paused = false;
        let resume_by = Instant::now() + max_pressure_pause;
        while Instant::now() < resume_by && self.under_pressure() {
            if !paused {
                paused = true;
                self.counters
                    .fill_pressure_pauses
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    pause_at = self.pause_at,
                    "node I/O under pressure; background fill paused"
                );
            }
            tokio::time::sleep(PRESSURE_RECHECK.min(resume_by - Instant::now())).await;
        }
        paused
    }

    /// Resolves when a read is pending (at once if one is).
    pub async fn arrives(&self) {
        let mut rx = self.pending.subscribe();
        let _ = rx.wait_for(|n| *n > 0).await;
    }

    /// Counts a background fetch given up for a read.
    pub fn preempted(&self) {
        self.counters.fill_preempted.fetch_add(1, Ordering::Relaxed);
    }

    /// The node's I/O `some avg10` (%), if PSI can be read.
    pub fn io_pressure(&self) -> Option<f64> {
        hyperbox_api::psi::read(&self.pressure_file)
            .ok()
            .map(|p| p.some.avg10)
    }

    fn under_pressure(&self) -> bool {
        if self.pause_at <= 0.0 {
            return false;
        }
        // A node without PSI (or an unreadable file) never pauses: the
        // fill is what completes layers, and silence is not pressure.
        hyperbox_api::psi::read(&self.pressure_file).is_ok_and(|p| p.some.avg10 >= self.pause_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk() -> Arc<AtomicU32> {
        Arc::new(AtomicU32::new(0))
    }

    #[tokio::test(start_paused = true)]
    async fn the_fill_waits_for_reads_and_a_quiet_gap_after_them() {
        let d = Demand::with_pressure_file(0.0, PathBuf::from("/nonexistent"));
        assert!(!d.settle().await, "nothing pending: no wait");
        let c = chunk();
        let read = d.begin(vec![c.clone()]);
        assert_eq!((d.pending(), c.load(Ordering::Relaxed)), (1, 1));
        let d2 = d.clone();
        let fill = tokio::spawn(async move {
            d2.settle().await;
            Instant::now()
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !fill.is_finished(),
            "the fill waits while a read is pending"
        );
        let ended = Instant::now();
        drop(read);
        assert_eq!((d.pending(), c.load(Ordering::Relaxed)), (0, 0));
        let resumed = fill.await.unwrap();
        assert!(resumed - ended >= QUIET, "{:?}", resumed - ended);
        assert_eq!(d.counters().fill_yields.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn reads_without_pause_slow_the_fill_but_never_stop_it() {
        let d = Demand::with_pressure_file(0.0, PathBuf::from("/nonexistent"));
        let reader = d.clone();
        // A read every 10 ms, each 5 ms long, for a minute.
        let reads = tokio::spawn(async move {
            for _ in 0..6000 {
                let r = reader.begin(vec![chunk()]);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(r);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        // The reads are under way.
        tokio::time::sleep(Duration::from_millis(1)).await;
        for _ in 0..3 {
            let started = Instant::now();
            assert!(d.settle().await);
            let waited = started.elapsed();
            assert!(
                (MAX_YIELD..MAX_YIELD + QUIET).contains(&waited),
                "{waited:?}"
            );
        }
        reads.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_paced_download_reads_on_while_calm_and_pauses_briefly_for_reads_and_pressure() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("io");
        let write = |avg10: f64| {
            std::fs::write(
                &file,
                format!("some avg10={avg10:.2} avg60=0.00 avg300=0.00 total=1\n"),
            )
            .unwrap()
        };
        write(1.0);
        let d = Demand::with_pressure_file(20.0, file.clone());
        let started = Instant::now();
        assert!(!d.pace().await, "calm: no wait");
        assert_eq!(started.elapsed(), Duration::ZERO);

        // A pending read holds the download until it ends and QUIET passes.
        let read = d.begin(vec![chunk()]);
        let d2 = d.clone();
        let paced = tokio::spawn(async move {
            assert!(d2.pace().await);
            Instant::now()
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!paced.is_finished());
        let ended = Instant::now();
        drop(read);
        assert!(paced.await.unwrap() - ended >= QUIET);

        // Pressure is read once per PRESSURE_RECHECK, and a pause for it
        // stays under MAX_YIELD (the connection must outlive it).
        tokio::time::sleep(PRESSURE_RECHECK).await;
        write(50.0);
        let started = Instant::now();
        assert!(d.pace().await);
        let waited = started.elapsed();
        assert!(waited > Duration::ZERO && waited <= MAX_YIELD, "{waited:?}");
        write(1.0);
        tokio::time::sleep(PRESSURE_RECHECK).await;
        assert!(!d.pace().await, "calm again once read again");
    }

    #[tokio::test(start_paused = true)]
    async fn work_that_cannot_yield_starts_after_a_quiet_spell_or_at_the_latest() {
        let d = Demand::with_pressure_file(0.0, PathBuf::from("/nonexistent"));
        let quiet = Duration::from_millis(500);
        let started = Instant::now();
        d.quiet_for(quiet, Duration::from_secs(10)).await;
        assert_eq!(started.elapsed(), Duration::ZERO, "nothing read yet");

        // A read ends: the work waits until 500 ms have passed since.
        drop(d.begin(vec![chunk()]));
        let ended = Instant::now();
        d.quiet_for(quiet, Duration::from_secs(10)).await;
        assert_eq!(ended.elapsed(), quiet);

        // Reads without a pause: at the latest after `most`.
        let reader = d.clone();
        let reads = tokio::spawn(async move {
            loop {
                let r = reader.begin(vec![chunk()]);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(r);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let started = Instant::now();
        d.quiet_for(quiet, Duration::from_secs(10)).await;
        let waited = started.elapsed();
        assert!(
            (Duration::from_secs(10)..Duration::from_secs(10) + quiet).contains(&waited),
            "{waited:?}"
        );
        reads.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_arriving_is_seen_by_a_fetching_fill() {
        let d = Demand::with_pressure_file(0.0, PathBuf::from("/nonexistent"));
        let d2 = d.clone();
        let waiter = tokio::spawn(async move { d2.arrives().await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        let _read = d.begin(vec![]);
        waiter.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn node_io_pressure_pauses_the_fill_until_it_falls() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("io");
        let write = |avg10: f64| {
            std::fs::write(
                &file,
                format!("some avg10={avg10:.2} avg60=0.00 avg300=0.00 total=1\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=1\n"),
            )
            .unwrap()
        };
        write(35.0);
        let d = Demand::with_pressure_file(20.0, file.clone());
        let d2 = d.clone();
        let fill = tokio::spawn(async move { d2.settle().await });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!fill.is_finished(), "paused at 35% >= 20%");
        write(3.0);
        assert!(fill.await.unwrap());
        assert_eq!(d.counters().fill_pressure_pauses.load(Ordering::Relaxed), 1);
        // Steady pressure slows the fill to a request per pause, not none.
        write(60.0);
        let started = Instant::now();
        assert!(d.settle().await);
        let paused = started.elapsed();
        assert!(
            (MAX_PRESSURE_PAUSE..MAX_PRESSURE_PAUSE + Duration::from_secs(2)).contains(&paused),
            "{paused:?}"
        );
        // Off (0): pressure never pauses.
        write(99.0);
        let off = Demand::with_pressure_file(0.0, file);
        assert!(!off.settle().await);
    }
}
