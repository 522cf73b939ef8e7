//! Learned prefetch: the chunks earlier runs read first, fetched at
//! mount, and the reads of this run saved for the next (`crate::prefetch`).

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::blob::Blob;
use super::{Lazy, Phase, lock};
use crate::prefetch;

/// Range requests of a learned prefetch in flight at once, per layer:
/// enough small runs of a scattered list (a few 16 KiB chunks each) to keep
/// a 100 Mbit/s link with 20 ms round trips busy. The fetch semaphore
/// (`snapshotter.lazy_max_chunk_fetches`) still bounds all requests.
pub(super) const PREFETCH_PARALLEL: usize = 16;

/// What a fetch of a learned list did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Learned {
    /// Chunks listed (at most [`prefetch::MAX_AHEAD`]'s worth).
    pub(super) listed: usize,
    /// Chunks that came in meanwhile.
    pub(super) fetched: usize,
    /// Listed chunks still missing after it.
    pub(super) missing: usize,
    /// `stop` ended it.
    pub(super) stopped: bool,
}

/// The same for a prewarm: background work on a node that may be running
/// other containers, so a quarter of a pull's.
pub(super) const PREWARM_PARALLEL: usize = 4;

impl Lazy {
    /// The chunks to fetch first: what this node learned, then what the
    /// list shared through the registry adds; and whether a shared list
    /// was used.
    pub(super) fn prefetch_plan(&self, blob: &Blob) -> (Vec<usize>, bool) {
        let e = &blob.state.entry;
        let mut plan = self
            .prefetch
            .load(&e.erofs, blob.state.unit(), blob.locks.len());
        let Some(shared) = blob.shared() else {
            return (plan, false);
        };
        let before = plan.len();
        prefetch::merge(&mut plan, &shared.chunks);
        let added = plan.len() - before;
        tracing::info!(layer = %e.layer, learned_here = before, added_from_registry = added, "prefetch list shared through the registry used");
        (plan, added > 0)
    }

    /// Fetches first, in parallel, the chunks earlier runs of this EROFS
    /// image read, here or on the nodes that shared their lists, in the
    /// order they read them (`crate::prefetch`), counted as demand so
    /// other layers' fills give way.
    pub(super) async fn prefetch_learned(&self, blob: &Blob, per_request: usize) {
        self.fetch_learned(blob, per_request, true, &|| false).await;
    }

    /// [`Lazy::prefetch_learned`] at a pull (`urgent`), or for a prewarm
    /// ([`super::prewarm`]), which gives way to reads itself and ends when
    /// `stop` says so.
    pub(super) async fn fetch_learned(
        &self,
        blob: &Blob,
        per_request: usize,
        urgent: bool,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Learned {
        use futures::StreamExt as _;
        let e = &blob.state.entry;
        let (mut plan, shared) = self.prefetch_plan(blob);
        if plan.is_empty() {
            return Learned::default();
        }
        // Once stopped, the runs left are skipped without another look.
        let stopped = std::sync::atomic::AtomicBool::new(false);
        let stopped = &stopped;
        if shared {
            self.counters
                .shared_prefetch_lists
                .fetch_add(1, Ordering::Relaxed);
        }
        plan.truncate(blob.chunks_in(prefetch::MAX_AHEAD));
        if urgent {
            blob.plan(&plan);
        }
        let started = Instant::now();
        let before = blob.missing();
        let _predicted = urgent.then(|| self.demand.begin(Vec::new()));
        let parallel = if urgent {
            PREFETCH_PARALLEL
        } else {
            PREWARM_PARALLEL
        };
        let groups = match e.map {
            Some(_) => self.span_groups(blob, &plan).await,
            None => None,
        };
        let mapped = groups.is_some();
        let runs = groups.unwrap_or_else(|| prefetch::runs(&plan, per_request));
        futures::stream::iter(runs)
            .for_each_concurrent(parallel, |(a, b)| async move {
                if blob.phase() != Phase::Filling {
                    return;
                }
                if !urgent {
                    // Before waiting for reads (and pressure) to settle,
                    // and after.
                    if stopped.load(Ordering::Relaxed) || stop() {
                        stopped.store(true, Ordering::Relaxed);
                        return;
                    }
                    self.demand.settle().await;
                    if stop() {
                        stopped.store(true, Ordering::Relaxed);
                        return;
                    }
                }
                let fetched = if mapped {
                    self.fetch_mapped(blob, a, b).await
                } else {
                    self.ensure_chunks(blob, a, b).await
                };
                if let Err(err) = fetched {
                    tracing::debug!(layer = %e.layer, error = %hyperbox_api::error_chain(&err), "learned prefetch failed; the fill and reads fetch it");
                    // Reads of these go on with read-ahead at once, not
                    // once the whole list is through.
                    if urgent {
                        blob.unplan_missing(a..=b);
                    }
                }
            })
            .await;
        // Chunks left out (the layer left filling meanwhile) are taken
        // back too.
        if urgent {
            blob.unplan_missing(plan.iter().copied());
        }
        let fetched = before.saturating_sub(blob.missing());
        let counter = if urgent {
            &self.counters.prefetched_chunks
        } else {
            &self.counters.prewarmed_chunks
        };
        counter.fetch_add(fetched as u64, Ordering::Relaxed);
        tracing::info!(layer = %e.layer, listed = plan.len(), fetched, urgent, ms = started.elapsed().as_millis() as u64, "learned prefetch done");
        let missing = {
            let present = lock(&blob.present);
            plan.iter()
                .filter(|&&c| !present.get(c).copied().unwrap_or(true))
                .count()
        };
        Learned {
            listed: plan.len(),
            fetched,
            missing,
            stopped: stopped.load(Ordering::Relaxed),
        }
    }

    /// Merges what this layer's reads waited for into its learned list,
    /// if they waited for more since the last time.
    pub(super) fn save_learned(&self, blob: &Blob) {
        let order = lock(&blob.reads).order().to_vec();
        if order.len() <= blob.saved.swap(order.len(), Ordering::AcqRel) {
            return;
        }
        let e = &blob.state.entry;
        match self
            .prefetch
            .save(&e.erofs, blob.state.unit(), blob.locks.len(), &order)
        {
            Ok(n) => {
                tracing::info!(layer = %e.layer, erofs = %e.erofs, read = order.len(), listed = n, "prefetch list learned")
            }
            Err(err) => {
                tracing::warn!(layer = %e.layer, error = %err, "cannot save the learned prefetch list")
            }
        }
    }
}
