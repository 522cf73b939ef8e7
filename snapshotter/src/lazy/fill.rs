//! The background fill of a lazy layer: learned prefetch first, then the
//! layer fetched whole and converted (or Range requests), giving way to
//! reads, and when that download starts.

use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyperbox_registry::Pace;

use super::blob::{Blob, next_missing_run};
use super::index::Found;
use super::verify::{Judged, WholeError};
use super::{Lazy, MAX_BACKOFF, Phase, lock};

/// Bytes per Range request of the background fill: adjacent missing
/// chunks go together, so small chunks (what reads fetch) do not make the
/// fill pay a round trip each.
pub const FILL_REQUEST: u64 = 1 << 20;

/// Downloads of the whole layer tried before filling from the EROFS blob.
pub(super) const WHOLE_ATTEMPTS: u32 = 3;

/// Layers downloaded whole for fills at once (containerd's default
/// `max_concurrent_downloads`).
pub(super) const LAYER_FILLS: usize = 3;

/// A fill from the layer starts once reads have been quiet this long: a
/// paused download still receives what its server sent and the sockets
/// hold (hundreds of KiB), which a start-up burst of reads would queue
/// behind. Measured on the Python image: started at once, the container's
/// exit came about 7 % later.
pub(super) const LAYER_QUIET: Duration = Duration::from_millis(500);

/// ... but at the latest this long after the prefetch, so a container
/// that never stops reading still gets its layer local.
pub(super) const LAYER_QUIET_MAX: Duration = Duration::from_secs(10);

/// A layer downloaded at once ([`Download::AtOnce`]) keeps recording the
/// reads of its first run after it is complete, until none came for this
/// long (at most [`LAYER_QUIET_MAX`]): the list learned then is what the
/// next nodes prefetch, and a run that outlasts the download reads more.
/// Longer under test, where a loaded machine may pause between reads.
pub(super) const LEARN_QUIET: Duration = Duration::from_secs(if cfg!(test) { 3 } else { 1 });

/// Fill requests dropped in a row for reads before one is finished anyway.
pub(super) const MAX_DROPS: u32 = 3;

/// When a lazy layer's whole download starts (with
/// `snapshotter.lazy_fill_from_layer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Download {
    /// After the learned prefetch, once reads settle, and giving way to
    /// reads: runs of its image taught which bytes come first.
    AfterReads,
    /// At mount, at the link's speed, giving way only to I/O pressure: no
    /// run of its image taught anything, here or shared, so nothing says
    /// which bytes matter and the workload's reads come one round trip at
    /// a time. Waiting for them to settle made the first run slower than
    /// a full fetch (Python image: 8.99 s against 6.12 s; at once, 6.12 s
    /// against 5.93 s).
    AtOnce,
}

/// How a fill from the layer itself ended.
pub(super) enum FromLayer {
    /// Filled and accepted, rejected, or the layer went away meanwhile.
    Done,
    /// The layer could not be had: fill with Range requests instead.
    Unavailable,
}

impl Lazy {
    /// [`Download::AtOnce`] for the layers of an image no run taught a
    /// prefetch list: none of its layers has one that fits on this node,
    /// and none was shared beside its index. One layer that has a list (a
    /// base layer another image's runs taught) is enough to wait for
    /// reads. Without fills from the layer there is no download to start.
    pub(super) fn download_for(&self, found: &Found) -> Download {
        let chunk_size = found.index.chunk_size;
        let taught = found.shared.values().any(|l| !l.chunks.is_empty())
            || found.index.layers.iter().any(|l| {
                self.prefetch
                    .has(&l.erofs, l.unit(chunk_size), l.units(chunk_size))
            });
        if taught || !self.fill_from_layer || self.layers.is_none() {
            Download::AfterReads
        } else {
            Download::AtOnce
        }
    }

    /// Fetches every missing chunk, in order and `Options::fill_request`
    /// bytes at a time, retrying with backoff, then lifts the mark and has the
    /// layer verified. Reads go first: each request waits for them to
    /// settle (and for the node's I/O to calm), and is given up when a
    /// read arrives that does not need it (`crate::demand`).
    pub(super) async fn fill(self: Arc<Self>, blob: Arc<Blob>) {
        if !self.until_pulled(&blob).await {
            return;
        }
        let started = Instant::now();
        let per_request = blob.chunks_in(self.fill_request);
        self.prefetch_learned(&blob, per_request).await;
        if self.fill_from_layer {
            match self.fill_from_layer(&blob).await {
                FromLayer::Done => return,
                FromLayer::Unavailable => {}
            }
        }
        let mut next = 0;
        let mut delay = Duration::from_secs(1);
        let mut dropped = 0;
        loop {
            if blob.phase() != Phase::Filling {
                return;
            }
            // The next run of missing chunks, in file order.
            let run = next_missing_run(&lock(&blob.present), next, per_request);
            let Some((a, b)) = run else { break };
            if self.demand.settle().await {
                // Reads just settled (a start-up burst is over): keep what
                // they waited for, in case the layer goes before it is full.
                self.save_learned(&blob);
            }
            let fetch = self.ensure_chunks(&blob, a, b);
            tokio::pin!(fetch);
            let done = tokio::select! {
                r = &mut fetch => Some(r),
                () = self.demand.arrives() => {
                    // On a slow link a request outlasts the gaps between
                    // reads: after a few drops in a row it is finished.
                    if dropped >= MAX_DROPS
                        || blob.wanted[a..=b].iter().any(|w| w.load(Ordering::Acquire) > 0)
                    {
                        // A read waits for these very chunks.
                        Some(fetch.await)
                    } else {
                        None
                    }
                }
            };
            let Some(result) = done else {
                // Dropped mid-request (chunks are written only once the
                // whole range is in): asked again once reads settle.
                self.demand.preempted();
                dropped += 1;
                continue;
            };
            dropped = 0;
            match result {
                Ok(()) => {
                    next = b + 1;
                    delay = Duration::from_secs(1);
                }
                Err(e) => {
                    tracing::warn!(layer = %blob.state.entry.layer, chunks = %format!("{a}-{b}"), retry_in_s = delay.as_secs(), error = %hyperbox_api::error_chain(&e), "background fill failed; retrying (reads still fetch on demand)");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        }
        if blob.phase() != Phase::Filling {
            return;
        }
        self.save_learned(&blob);
        if !self.finish_filling(&blob) {
            return;
        }
        tracing::info!(layer = %blob.state.entry.layer, ms = started.elapsed().as_millis() as u64, "lazy layer complete");
        self.verify(&blob).await;
    }

    /// A complete layer leaves Filling for Verifying, once, and its mark
    /// and chunk record go. False when it left Filling meanwhile
    /// (discarded, refused): then nothing of it is touched, since a new
    /// pull may have put another file at its path.
    pub(super) fn finish_filling(&self, blob: &Blob) -> bool {
        let _ = blob.file.sync_all();
        // Past filling before the mark goes: whoever sees it unmarked sees
        // the layer past filling.
        let moved = blob.phase.send_if_modified(|p| {
            let filling = *p == Phase::Filling;
            if filling {
                *p = Phase::Verifying;
            }
            filling
        });
        if moved {
            blob.release_download();
        }
        if !moved || !blob.still_at_its_path() {
            return false;
        }
        if let Err(e) = self.fan.unmark(&blob.path) {
            tracing::warn!(file = %blob.path.display(), error = %e, "cannot remove the mark of a complete layer");
        }
        let _ = fs::remove_file(&blob.have_path);
        true
    }

    /// Fills what is still missing from the layer itself: fetched whole
    /// (its compressed digest checked), converted, and accepted only if it
    /// gives the index's diff_id and EROFS digest, which makes the copy
    /// verified by construction. The download reads only while no read
    /// waits ([`crate::demand::Demand::pace`]); reads go on fetching their chunks from the
    /// EROFS blob meanwhile. After [`WHOLE_ATTEMPTS`] failed downloads the
    /// caller fills with Range requests instead, so a registry that serves
    /// the EROFS blob but not the layer still completes the file.
    pub(super) async fn fill_from_layer(self: &Arc<Self>, blob: &Arc<Blob>) -> FromLayer {
        let Some(layers) = self.layers.clone() else {
            return FromLayer::Unavailable;
        };
        let e = &blob.state.entry;
        let started = Instant::now();
        let pace: Pace = {
            let (me, b) = (self.clone(), blob.clone());
            // After each wait, a fill request's worth goes through before
            // the next: a body read frame by frame, each behind a wait of
            // up to MAX_YIELD, would all but stop under steady reads.
            let budget_from = Arc::new(AtomicU64::new(0));
            let budget = self.fill_request;
            Arc::new(move |read| {
                let (me, b, from) = (me.clone(), b.clone(), budget_from.clone());
                Box::pin(async move {
                    // A layer removed, refused or complete meanwhile needs
                    // no more of it.
                    if b.phase() != Phase::Filling {
                        return false;
                    }
                    b.downloading.store(true, Ordering::Relaxed);
                    if read < from.load(Ordering::Relaxed) + budget && read > 0 {
                        return true;
                    }
                    if b.download == Download::AtOnce {
                        me.demand.pressure_pace().await;
                        // Reads paused: keep what they read so far, in
                        // case the snapshotter stops before the end.
                        if lock(&b.last_read).is_some_and(|t| t.elapsed() >= LEARN_QUIET) {
                            me.save_learned(&b);
                        }
                    } else if me.demand.pace().await {
                        // Reads just settled: keep what they waited for.
                        me.save_learned(&b);
                    }
                    from.store(read, Ordering::Relaxed);
                    b.phase() == Phase::Filling
                })
            })
        };
        let mut delay = Duration::from_secs(1);
        let mut attempt = 1;
        let whole = loop {
            if blob.phase() != Phase::Filling {
                return FromLayer::Done;
            }
            // Once the start-up burst is over: pausing the download stops
            // new bytes, not those already on their way.
            if blob.download == Download::AfterReads {
                self.demand.quiet_for(LAYER_QUIET, LAYER_QUIET_MAX).await;
            }
            // Before a download slot is taken: it waits for the file.
            let follower = self.follow_whole(blob, layers.as_ref()).await;
            let whole = {
                let _slot = self.layer_fills.acquire().await.expect("never closed");
                let got = layers
                    .whole(&blob.state.image, &e.layer, Some(pace.clone()))
                    .await;
                blob.downloading.store(false, Ordering::Relaxed);
                got
            };
            drop(follower);
            if blob.phase() != Phase::Filling {
                // Removed meanwhile: its download stopped (see the pace).
                return FromLayer::Done;
            }
            match whole {
                Ok(got) => break Ok(got),
                Err(err) if err.bad_content => break Err(err),
                // Another lazy copy of this layer blob gave the shared
                // download up; this one starts its own.
                Err(err) if err.stopped => {}
                Err(WholeError { why, .. }) if attempt < WHOLE_ATTEMPTS => {
                    tracing::warn!(layer = %e.layer, attempt, retry_in_s = delay.as_secs(), error = %why, "cannot fetch the layer whole to fill its lazy copy; retrying (reads still fetch on demand)");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
                Err(WholeError { why, .. }) => {
                    tracing::warn!(layer = %e.layer, attempts = attempt, error = %why, "cannot fetch the layer whole; filling its lazy copy from the index's EROFS blob instead");
                    return FromLayer::Unavailable;
                }
            }
        };
        if blob.phase() != Phase::Filling {
            return FromLayer::Done;
        }
        let copied = match self.judge(blob, whole).await {
            Judged::Matched(n) => n,
            Judged::Refused => return FromLayer::Done,
            Judged::Unreadable(why) => {
                tracing::warn!(layer = %e.layer, error = %why, "cannot fill the lazy copy from the converted layer; filling from the index's EROFS blob instead");
                return FromLayer::Unavailable;
            }
        };
        self.counters
            .layer_filled_chunks
            .fetch_add(copied as u64, Ordering::Relaxed);
        if blob.download == Download::AtOnce {
            // Still marked: the run's later reads are noted (their chunks
            // are here, so each costs an event, not a fetch).
            self.reads_pause(blob).await;
        }
        if blob.phase() != Phase::Filling {
            return FromLayer::Done;
        }
        self.save_learned(blob);
        if !self.finish_filling(blob) {
            return FromLayer::Done;
        }
        tracing::info!(layer = %e.layer, chunks_from_layer = copied, ms = started.elapsed().as_millis() as u64, "lazy layer complete, filled from the layer itself");
        // Its bytes are the layer's own, converted here.
        self.accept(blob);
        FromLayer::Done
    }

    /// For a mapped layer, a [`super::follow`] thread making its chunks
    /// from the download about to start.
    async fn follow_whole(
        self: &Arc<Self>,
        blob: &Arc<Blob>,
        layers: &dyn super::verify::Verifier,
    ) -> Option<super::follow::Follower> {
        blob.state.entry.map.as_ref()?;
        let staged = layers.staged(&blob.state.entry.layer)?;
        // Fetched with the layer's metadata at its Prepare (this waits
        // for that fetch); one that fails leaves the layer to the
        // conversion.
        self.mapped(blob).await.ok()?;
        self.follow(blob, staged)
    }

    /// Waits until `blob` saw no read for [`LEARN_QUIET`], at most
    /// [`LAYER_QUIET_MAX`], or until it left Filling.
    pub(super) async fn reads_pause(&self, blob: &Blob) {
        self.save_learned(blob);
        let deadline = Instant::now() + LAYER_QUIET_MAX;
        loop {
            let since = lock(&blob.last_read).map_or(LEARN_QUIET, |t| t.elapsed());
            let now = Instant::now();
            if since >= LEARN_QUIET || now >= deadline || blob.phase() != Phase::Filling {
                return;
            }
            tokio::time::sleep((LEARN_QUIET - since).min(deadline - now)).await;
        }
    }
}
