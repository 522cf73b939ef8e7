//! Holding a lazy copy against its layer fetched whole: accepted when
//! every chunk and the whole EROFS image match, refused for good otherwise.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::{fmt, fs};

use futures::future::BoxFuture;
use hyperbox_registry::Pace;
use sha2::{Digest as _, Sha256};

use super::blob::{Blob, sync_dir, write_durably};
use super::{Lazy, MAX_BACKOFF, Phase, lock};

/// Where whole layers come from: the source of a fill from the layer and
/// the check of a layer filled otherwise.
pub trait Verifier: fmt::Debug + Send + Sync {
    /// Layer `layer` of `image`, fetched whole (verified against its
    /// compressed digest) and converted: the EROFS image's path and the
    /// diff_id its decompressed bytes give. The download reads only as
    /// `pace` lets it.
    fn whole<'a>(
        &'a self,
        image: &'a str,
        layer: &'a str,
        pace: Option<Pace>,
    ) -> BoxFuture<'a, Result<(PathBuf, String), WholeError>>;

    /// Where a download of layer `layer` lands while it comes: the blob's
    /// bytes from its start, as many as arrived. `None` when this source
    /// keeps none.
    fn staged(&self, _layer: &str) -> Option<PathBuf> {
        None
    }
}

/// Why a layer could not be had whole.
#[derive(Debug, Clone)]
pub struct WholeError {
    /// The cause, for logs.
    pub why: String,
    /// The layer's own bytes were refused (policy, a malformed tar): no
    /// retry will do better, and the lazy copy made from its index cannot
    /// be checked, so it is refused. Otherwise the registry failed.
    pub bad_content: bool,
    /// The download was stopped for a lazy layer no longer wanted: if the
    /// caller's own layer is, it was another one of the same layer blob,
    /// which shared the download.
    pub stopped: bool,
}

/// What the layer fetched whole made of a lazy copy.
pub(super) enum Judged {
    /// It matched: this many chunks were filled from it.
    Matched(usize),
    /// It did not match, or was refused for its content: the copy is
    /// refused.
    Refused,
    /// The conversion could not be read (why).
    Unreadable(String),
}

/// Why the converted layer could not fill a lazy copy.
pub(super) enum FillError {
    /// It is not the index's EROFS image (how it differs).
    Mismatch(String),
    Io(String),
}

/// Checks the converted layer at `converted` against the index (for a
/// fill and for the check of a layer the Range fill completed), every
/// chunk against its digest and the whole against the EROFS digest (so the
/// chunks reads fetched from the registry, checked against the same chunk
/// digests, are the image's own bytes too), writing each chunk `blob`
/// still lacks as it goes; how many. Nothing reaches the file that its
/// chunk digest does not vouch for, and a mismatch anywhere refuses the
/// layer. Chunks written meanwhile by reads hold the same bytes, so no
/// chunk lock is taken: a read waiting for one is answered by its own
/// fetch.
pub(super) fn copy_missing(blob: &Blob, converted: &Path) -> Result<usize, FillError> {
    let io = |what: &str, e: std::io::Error| {
        FillError::Io(format!("{what} {}: {e}", converted.display()))
    };
    let src = File::open(converted).map_err(|e| io("open", e))?;
    let e = &blob.state.entry;
    let size = src.metadata().map_err(|err| io("stat", err))?.len();
    if size != e.size {
        return Err(FillError::Mismatch(format!("{size} bytes, not {}", e.size)));
    }
    let mut whole = Sha256::new();
    let mut buf = vec![0u8; blob.state.chunk_size as usize];
    let mut copied = 0;
    for i in 0..e.chunks.len() {
        let (start, len) = blob.whole_chunk_range(i);
        let piece = &mut buf[..len as usize];
        src.read_exact_at(piece, start)
            .map_err(|err| io("read", err))?;
        whole.update(&*piece);
        if !blob.chunk_matches(i, piece) {
            return Err(FillError::Mismatch(format!("chunk {i} differs")));
        }
        if blob.phase() != Phase::Filling {
            continue;
        }
        copied += blob
            .fill_chunk(i, piece)
            .map_err(|err| FillError::Io(hyperbox_api::error_chain(&err)))?;
    }
    let digest = format!("sha256:{}", hex::encode(whole.finalize()));
    if digest != e.erofs {
        return Err(FillError::Mismatch(digest));
    }
    Ok(copied)
}

impl Lazy {
    /// Checks a complete layer against the image's own digests, retrying
    /// while the registry fails; see the module comment.
    pub(super) async fn verify(&self, blob: &Arc<Blob>) {
        let Some(verifier) = self.layers.as_ref().filter(|_| self.verify) else {
            self.accept(blob);
            return;
        };
        let e = &blob.state.entry;
        let mut delay = Duration::from_secs(1);
        let whole = loop {
            // The whole-layer download cannot be given up halfway like a
            // chunk; it starts only once reads have settled.
            self.demand.settle().await;
            if blob.phase() != Phase::Verifying {
                return;
            }
            match verifier.whole(&blob.state.image, &e.layer, None).await {
                Ok(got) => break Ok(got),
                Err(err) if err.bad_content => break Err(err),
                Err(WholeError { why, .. }) => {
                    tracing::warn!(layer = %e.layer, retry_in_s = delay.as_secs(), error = %why, "cannot fetch the layer whole to verify its lazy copy; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        };
        match self.judge(blob, whole).await {
            Judged::Matched(_) => self.accept(blob),
            Judged::Refused => {}
            Judged::Unreadable(why) => self.reject(
                blob,
                format!("cannot read the converted layer to compare: {why}"),
            ),
        }
    }

    /// Holds a lazy copy against its layer fetched whole (the layer's
    /// conversion and diff_id, or why the layer's own bytes were refused):
    /// the diff_id, every chunk and the whole EROFS digest must match the
    /// index, chunks still missing are filled from it (while filling), and
    /// a mismatch refuses the copy.
    pub(super) async fn judge(
        &self,
        blob: &Arc<Blob>,
        whole: Result<(PathBuf, String), WholeError>,
    ) -> Judged {
        let e = &blob.state.entry;
        let (path, diff_id) = match whole {
            Ok(got) => got,
            Err(err) => {
                self.reject(
                    blob,
                    format!("layer {} was refused whole: {}", e.layer, err.why),
                );
                return Judged::Refused;
            }
        };
        if diff_id != e.diff_id {
            self.reject(
                blob,
                format!(
                    "layer {} decompresses to {diff_id}, not the diff_id {} its index and image config claim",
                    e.layer, e.diff_id
                ),
            );
            return Judged::Refused;
        }
        let b = blob.clone();
        match tokio::task::spawn_blocking(move || copy_missing(&b, &path)).await {
            Ok(Ok(n)) => Judged::Matched(n),
            Ok(Err(FillError::Mismatch(what))) => {
                self.reject(
                    blob,
                    format!(
                        "the index's EROFS image {} is not what layer {} converts to ({what})",
                        e.erofs, e.layer
                    ),
                );
                Judged::Refused
            }
            Ok(Err(FillError::Io(why))) => Judged::Unreadable(why),
            Err(err) => Judged::Unreadable(format!("check task failed: {err}")),
        }
    }

    /// The layer matched its image: nothing more to keep about it.
    pub(super) fn accept(&self, blob: &Blob) {
        // Only a layer still in play: one discarded meanwhile (its image
        // deleted during a long download) has nothing left to accept, and
        // a new pull may own its path and key by now.
        if !blob.phase.send_if_modified(|p| {
            let live = matches!(p, Phase::Filling | Phase::Verifying);
            if live {
                *p = Phase::Verified;
            }
            live
        }) {
            return;
        }
        if blob.still_at_its_path() {
            let _ = fs::remove_file(&blob.state_path);
            sync_dir(&blob.state_path);
        }
        lock(&self.blobs).remove(&blob.inode);
        self.drop_key(blob);
        self.counters.verified.fetch_add(1, Ordering::Relaxed);
        tracing::info!(layer = %blob.state.entry.layer, erofs = %blob.erofs, "lazy layer verified against its image");
    }

    /// Removes `blob`'s key unless a pull after a discard registered it
    /// again.
    pub(super) fn drop_key(&self, blob: &Blob) {
        let mut by_key = lock(&self.by_key);
        if by_key
            .get(&blob.key)
            .is_some_and(|b| std::ptr::eq(&**b, blob))
        {
            by_key.remove(&blob.key);
        }
    }

    /// The layer did not match its image: no container reads it again.
    pub(super) fn reject(&self, blob: &Blob, why: String) {
        // First the phase, while the blob is still found: a read arriving
        // from here on is refused, never answered from a file whose holes
        // a fill from the layer left unwritten. A layer discarded meanwhile
        // is left alone (see accept).
        if !blob.phase.send_if_modified(|p| {
            let live = matches!(p, Phase::Filling | Phase::Verifying);
            if live {
                *p = Phase::Rejected(why.clone());
            }
            live
        }) {
            return;
        }
        blob.release_download();
        let mut state = blob.state.clone();
        state.rejected = Some(why.clone());
        if let Err(e) = write_durably(&blob.state_path, &state) {
            tracing::error!(error = %hyperbox_api::error_chain(&e), "cannot record the rejection; it holds until the next restart");
        }
        lock(&self.rejected).insert(blob.key.clone(), why.clone());
        // Refused by inode before the blob goes, so no read falls between.
        if blob.still_at_its_path() {
            self.refuse_file(&blob.path, why.clone());
        }
        self.drop_key(blob);
        lock(&self.blobs).remove(&blob.inode);
        // Pages read before the verdict must not outlive it.
        let _ = fs::write("/proc/sys/vm/drop_caches", "1");
        // Counted and logged last: whoever sees either (a scrape, an
        // operator, a test) finds the refusal already in force.
        self.counters.rejected.fetch_add(1, Ordering::Release);
        tracing::error!(layer = %blob.state.entry.layer, image = %blob.state.image, why, "lazily served layer does not match its image: its reads now fail, nothing new is mounted on it, and the next pull fetches it whole");
    }
}
