//! Removing lazy files no snapshot links any more.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyperbox_kernel::fanotify::FileId;

use super::blob::{Blob, file_id, sync_dir};
use super::{Lazy, Phase, Refusal, lock};

/// Unlinked lazy layers younger than this survive Cleanup.
pub(super) const PRUNE_GRACE: Duration = Duration::from_secs(60);

impl Lazy {
    /// Removes lazy files no snapshot links any more.
    pub fn prune(&self) -> Vec<PathBuf> {
        let all: Vec<Arc<Blob>> = lock(&self.blobs).values().cloned().collect();
        let mut removed = Vec::new();
        for b in all {
            // A prewarmed layer waits for its pull, for a while. Removed
            // only while no Prepare is taking one ([`Lazy::adopt`] runs
            // under the same lock); a busy lock leaves it to the next time.
            if b.is_parked() {
                if !Lazy::prewarm_expired(&b) {
                    continue;
                }
                let Ok(_registering) = self.registering.try_lock() else {
                    continue;
                };
                if b.is_parked() && self.discard(&b) {
                    self.counters
                        .prewarm_expired
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(layer = %b.state.entry.layer, "prewarmed lazy layer no pull took removed");
                    removed.push(b.path.clone());
                }
                continue;
            }
            // Not a layer a Prepare registered (or took) a moment ago and
            // is about to link.
            let taken = *lock(&b.taken);
            if taken.elapsed() > PRUNE_GRACE && self.discard(&b) {
                removed.push(b.path.clone());
            }
        }
        // Verified and refused files are no longer tracked by inode.
        let refused: Vec<(FileId, Refusal)> = lock(&self.refused)
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (id, r) in refused {
            if file_id(&r.path).is_some_and(|(_, n)| n <= 1) {
                let _ = self.remove_lazy_file(&r.path);
                lock(&self.refused).remove(&id);
                removed.push(r.path);
            }
        }
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_none_or(|x| x != "erofs")
                    || p.with_extension("lazy").exists()
                    || p.with_extension("lazy.corrupt").exists()
                {
                    continue;
                }
                let old = e
                    .metadata()
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > PRUNE_GRACE);
                if old && file_id(&p).is_some_and(|(_, n)| n <= 1) {
                    let _ = self.remove_lazy_file(&p);
                    removed.push(p);
                }
            }
        }
        removed
    }

    /// Stops serving and filling `b` and removes its files, unless a
    /// snapshot links the file (then nothing changes); returns whether it
    /// was removed.
    pub(super) fn discard(&self, b: &Blob) -> bool {
        if file_id(&b.path).is_some_and(|(_, n)| n > 1) {
            tracing::debug!(file = %b.path.display(), "lazy file still linked by a snapshot; kept");
            return false;
        }
        // Removed before it was complete (the image deleted soon after its
        // container ran): what its reads waited for is still worth keeping.
        if b.phase() == Phase::Filling {
            self.save_learned(b);
        }
        lock(&self.by_key).remove(&b.key);
        lock(&self.blobs).remove(&b.inode);
        b.phase.send_replace(Phase::Discarded);
        b.release_download();
        let _ = fs::remove_file(&b.state_path);
        let _ = fs::remove_file(&b.have_path);
        // Through FUSE the file is held open while marked: let it go
        // (forgotten first), so its space is freed once nothing reads it.
        let _ = self.remove_lazy_file(&b.path);
        sync_dir(&b.path);
        true
    }
}
