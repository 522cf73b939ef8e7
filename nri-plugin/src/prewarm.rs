//! Prewarming: the agent sees every container start on the node (NRI's
//! CreateContainer, the shim's registration), so it knows which images
//! start here and how often. Images that started at least
//! `agent.prewarm_min_starts` times within `agent.prewarm_window_secs`
//! are likely to start again; while the node is calm (CPU, I/O and memory
//! `some avg10` all under `agent.prewarm_max_pressure`), the agent asks
//! the snapshotter (`snapshotter.control_address`) to fetch their learned
//! prefetch lists into its local cache. The snapshotter leaves layers
//! already on the node alone and stops a prewarm when I/O pressure
//! reaches the same limit; the agent checks again before each image.
//!
//! An image with a layer on the node is asked about every round (it may
//! be removed, by the kubelet's image GC say, and is then worth warming):
//! the snapshotter answers from its cache of resolved manifests, so that
//! costs the registry one manifest request an hour. An image whose layers
//! are all prewarmed (or have nothing to warm) is asked again only after
//! [`SETTLED_RECHECK`] or its next start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyperbox_api::client::Client;
use hyperbox_api::time::unix_now;
use hyperbox_api::types::{PrewarmRequest, WarmOutcome};
use serde::{Deserialize, Serialize};

use crate::state_file;

/// How long an image whose layers were all settled is not asked again.
pub const SETTLED_RECHECK: Duration = Duration::from_secs(6 * 3600);

/// The longest one prewarm call may take (a large list on a slow link).
const CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// The most images remembered: the least recently started go first.
const MAX_IMAGES: usize = 1024;

/// `[agent]`'s prewarm settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Time between rounds.
    pub interval: Duration,
    /// Starts within the window that make an image a candidate.
    pub min_starts: u32,
    /// `some avg10` (%) of CPU, I/O or memory at which no prewarm starts
    /// and a running one stops.
    pub max_pressure: f64,
    /// The snapshotter's control socket.
    pub snapshotter: PathBuf,
    /// Where PSI is read (`/proc/pressure`).
    pub pressure_dir: PathBuf,
}

/// How often starts noted since are written to `starts.json`.
const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// Writes the record of starts every [`FLUSH_EVERY`] while it changes.
pub async fn keep_saved(starts: std::sync::Arc<Starts>) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    loop {
        tick.tick().await;
        let s = starts.clone();
        let _ = tokio::task::spawn_blocking(move || s.flush()).await;
    }
}

/// Rounds every `settings.interval`, for as long as the agent runs,
/// counted in `metrics`.
pub async fn run(
    starts: std::sync::Arc<Starts>,
    settings: Settings,
    agent: std::sync::Arc<crate::agent::Agent>,
) {
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: not at the agent's own start.
    tick.tick().await;
    loop {
        tick.tick().await;
        let r = round(&starts, &settings).await;
        let m = &agent.metrics;
        m.prewarm_asked.inc_by(r.asked as u64);
        m.prewarm_failed.inc_by(r.failed as u64);
        m.prewarm_deferred.inc_by(r.deferred as u64);
        m.prewarm_chunks.inc_by(r.chunks);
        if r != Round::default() {
            tracing::info!(
                asked = r.asked,
                deferred = r.deferred,
                failed = r.failed,
                chunks = r.chunks,
                "prewarm round"
            );
        }
    }
}

/// One image's starts on this node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Record {
    /// Start times (Unix seconds) within the window, oldest first.
    starts: Vec<u64>,
    /// When it was last prewarmed with every layer settled.
    #[serde(default)]
    settled_at: Option<u64>,
}

/// The starts of each image, kept in `<state_dir>/starts.json`.
#[derive(Debug)]
pub struct Starts {
    path: PathBuf,
    window: Duration,
    images: Mutex<HashMap<String, Record>>,
    /// Changed since the last write.
    dirty: AtomicBool,
    /// Held while writing.
    writer: Mutex<()>,
}

impl Starts {
    /// Opens (or starts) the record in `state_dir`.
    pub fn open(state_dir: &Path, window: Duration) -> std::io::Result<Starts> {
        std::fs::create_dir_all(state_dir)?;
        let path = state_dir.join("starts.json");
        let images = state_file::load(&path, "the record of image starts")?.unwrap_or_default();
        Ok(Starts {
            path,
            window,
            images: Mutex::new(images),
            dirty: AtomicBool::new(false),
            writer: Mutex::new(()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Record>> {
        self.images.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a start of `image` at `now` (Unix seconds). Kept in memory:
    /// [`Starts::flush`] writes it, off the container's creation path.
    pub fn note(&self, image: &str, now: u64) {
        if image.is_empty() {
            return;
        }
        let mut images = self.lock();
        let r = images.entry(image.to_string()).or_default();
        r.starts.push(now);
        // A start pulls the image: whatever was settled is moot.
        r.settled_at = None;
        let from = now.saturating_sub(self.window.as_secs());
        r.starts.retain(|&t| t >= from);
        if images.len() > MAX_IMAGES {
            let oldest = images
                .iter()
                .min_by_key(|(_, r)| r.starts.last().copied().unwrap_or(0))
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                images.remove(&k);
            }
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// Writes the record if it changed since the last write; one writer
    /// at a time.
    pub fn flush(&self) {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return;
        }
        let snapshot = self.lock().clone();
        if let Err(e) = state_file::save(&self.path, &snapshot) {
            self.dirty.store(true, Ordering::Release);
            tracing::warn!(error = %hyperbox_api::error_chain(&e), "cannot save the record of image starts");
        }
    }

    /// Images started at least `min_starts` times within the window
    /// before `now` and not settled within [`SETTLED_RECHECK`], most
    /// started first.
    pub fn candidates(&self, min_starts: u32, now: u64) -> Vec<String> {
        let from = now.saturating_sub(self.window.as_secs());
        let mut out: Vec<(usize, String)> = self
            .lock()
            .iter()
            .filter(|(_, r)| {
                r.settled_at
                    .is_none_or(|t| now.saturating_sub(t) >= SETTLED_RECHECK.as_secs())
            })
            .map(|(image, r)| (r.starts.iter().filter(|&&t| t >= from).count(), image))
            .filter(|(n, _)| *n >= min_starts as usize)
            .map(|(n, image)| (n, image.clone()))
            .collect();
        out.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        out.into_iter().map(|(_, image)| image).collect()
    }

    /// Records that `image` needs no asking until [`SETTLED_RECHECK`]
    /// after `now` (or its next start): every layer settled, or the ask
    /// failed (a registry refusing it is not asked every round).
    fn settled(&self, image: &str, now: u64) {
        if let Some(r) = self.lock().get_mut(image) {
            r.settled_at = Some(now);
            self.dirty.store(true, Ordering::Release);
        }
    }
}

/// The highest `some avg10` of CPU, I/O and memory under `dir`, if any
/// can be read.
pub fn node_pressure(dir: &Path) -> Option<f64> {
    ["cpu", "io", "memory"]
        .iter()
        .filter_map(|r| hyperbox_api::psi::read(&dir.join(r)).ok())
        .map(|p| p.some.avg10)
        .reduce(f64::max)
}

/// What one round did, for the log and `/metrics`.
#[derive(Debug, Default, PartialEq)]
pub struct Round {
    /// Images the snapshotter answered for.
    pub asked: usize,
    /// Images left for the next round because the node was not calm.
    pub deferred: usize,
    /// Calls that failed.
    pub failed: usize,
    /// Chunks fetched.
    pub chunks: u64,
}

/// One round: every candidate, while the node stays calm.
pub async fn round(starts: &Starts, s: &Settings) -> Round {
    let now = unix_now();
    let candidates = starts.candidates(s.min_starts, now);
    let client = Client::snapshotter(&s.snapshotter).with_timeout(CALL_TIMEOUT);
    let mut out = Round::default();
    for (i, image) in candidates.iter().enumerate() {
        if let Some(p) = node_pressure(&s.pressure_dir).filter(|p| *p >= s.max_pressure) {
            tracing::info!(
                pressure = p,
                limit = s.max_pressure,
                left = candidates.len() - i,
                "node not calm; prewarming waits for the next round"
            );
            out.deferred = candidates.len() - i;
            break;
        }
        let request = PrewarmRequest {
            image: image.clone(),
            max_io_pressure: s.max_pressure,
        };
        match client.prewarm(&request).await {
            Ok(p) => {
                out.asked += 1;
                let fetched: usize = p.layers.iter().map(|l| l.fetched).sum();
                out.chunks += fetched as u64;
                // Layers on the node may go with the image at any time
                // (the snapshotter answers for them from its cache); the
                // others are as warm as they get until the next start.
                let settled = p.layers.iter().all(|l| {
                    !matches!(
                        l.outcome,
                        WarmOutcome::Stopped | WarmOutcome::Failed(_) | WarmOutcome::OnNode
                    )
                });
                if settled {
                    starts.settled(image, now);
                }
                tracing::info!(
                    image,
                    indexed = p.indexed,
                    layers = p.layers.len(),
                    fetched,
                    settled,
                    ms = p.ms,
                    "image prewarmed"
                );
            }
            Err(e) if e.is_unavailable() => {
                // The snapshotter is away (restarting, say): the next
                // round asks again.
                out.failed += 1;
                tracing::warn!(image, error = %hyperbox_api::error_chain(&e), "prewarm failed; asking again next round");
            }
            Err(e) => {
                out.failed += 1;
                starts.settled(image, now);
                tracing::warn!(image, error = %hyperbox_api::error_chain(&e), recheck_secs = SETTLED_RECHECK.as_secs(), "prewarm failed; not asked again until the image starts or the recheck");
            }
        }
    }
    starts.flush();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 24 * 3600;

    #[test]
    fn images_that_start_often_are_candidates_most_started_first() {
        let dir = tempfile::tempdir().unwrap();
        let starts = Starts::open(dir.path(), Duration::from_secs(7 * DAY)).unwrap();
        let now = 100 * DAY;
        for t in [now - 3 * DAY, now - DAY, now - 60] {
            starts.note("reg/app:v1", t);
        }
        starts.note("reg/job:v1", now - 2 * DAY);
        starts.note("reg/job:v1", now - 1);
        starts.note("reg/once:v1", now - 10);
        // Started twice, but the first start is out of the window.
        starts.note("reg/old:v1", now - 30 * DAY);
        starts.note("reg/old:v1", now - 5);
        assert_eq!(
            starts.candidates(2, now),
            vec!["reg/app:v1".to_string(), "reg/job:v1".to_string()]
        );
    }

    #[test]
    fn a_settled_image_waits_and_a_new_start_makes_it_a_candidate_again() {
        let dir = tempfile::tempdir().unwrap();
        let starts = Starts::open(dir.path(), Duration::from_secs(7 * DAY)).unwrap();
        let now = 100 * DAY;
        starts.note("reg/app:v1", now - 100);
        starts.note("reg/app:v1", now - 50);
        starts.settled("reg/app:v1", now);
        assert!(starts.candidates(2, now + 60).is_empty());
        assert_eq!(
            starts.candidates(2, now + SETTLED_RECHECK.as_secs()).len(),
            1
        );
        starts.note("reg/app:v1", now + 120);
        assert_eq!(starts.candidates(2, now + 180).len(), 1);
    }

    #[test]
    fn starts_survive_a_restart_and_a_corrupt_record_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let window = Duration::from_secs(7 * DAY);
        let now = 100 * DAY;
        {
            let starts = Starts::open(dir.path(), window).unwrap();
            starts.note("reg/app:v1", now - 10);
            starts.note("reg/app:v1", now - 5);
            starts.flush();
        }
        let starts = Starts::open(dir.path(), window).unwrap();
        assert_eq!(starts.candidates(2, now).len(), 1);
        std::fs::write(dir.path().join("starts.json"), b"{not json").unwrap();
        let starts = Starts::open(dir.path(), window).unwrap();
        assert!(starts.candidates(1, now).is_empty());
    }

    #[test]
    fn the_highest_pressure_of_cpu_io_and_memory_decides() {
        let dir = tempfile::tempdir().unwrap();
        let line = |avg10: f64| {
            format!(
                "some avg10={avg10:.2} avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
            )
        };
        assert_eq!(node_pressure(dir.path()), None);
        std::fs::write(dir.path().join("cpu"), line(3.0)).unwrap();
        std::fs::write(dir.path().join("io"), line(12.5)).unwrap();
        std::fs::write(dir.path().join("memory"), line(0.5)).unwrap();
        assert_eq!(node_pressure(dir.path()), Some(12.5));
    }
}
