//! The fanotify event loop: which held reads wait for which chunks, and
//! what they are answered.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hyperbox_kernel::fanotify::{AccessEvent, Verdict};

use super::{Lazy, Phase, lock};

impl Lazy {
    pub(super) fn respond(&self, event: AccessEvent, verdict: Verdict) {
        if verdict == Verdict::DenyEio {
            self.counters.denied_reads.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = self.fan.respond(event, verdict) {
            // The reader stays blocked only if the group itself broke,
            // which the event loop reports.
            tracing::warn!(?verdict, error = %e, "cannot answer a held read");
        }
    }

    pub(super) fn event_loop(self: Arc<Self>) {
        let mut events = Vec::new();
        loop {
            if let Err(e) = self.fan.read_events(&mut events) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "fanotify read failed; lazy reads are no longer served");
                return;
            }
            for event in events.drain(..) {
                self.dispatch(event);
            }
        }
    }

    /// Answers a held read of a lazy file once its range is in; reads of
    /// refused files fail; reads of anything else (complete files, files
    /// this daemon does not know) go on at once.
    pub(super) fn dispatch(self: &Arc<Self>, event: AccessEvent) {
        // Our own writes and re-checks: a file opened while it was marked
        // (a group kept across a restart keeps its marks) raises events
        // for them too, and holding them would wait on ourselves.
        if event.pid == Some(std::process::id()) {
            self.respond(event, Verdict::Allow);
            return;
        }
        if event
            .file
            .is_some_and(|f| lock(&self.refused).contains_key(&f))
        {
            self.respond(event, Verdict::DenyEio);
            return;
        }
        let find = || event.file.and_then(|f| lock(&self.blobs).get(&f).cloned());
        let blob = match find() {
            Some(b) => b,
            None => {
                let mut starting = lock(&self.starting);
                if let Some(held) = starting.as_mut() {
                    held.push(event);
                    return;
                }
                drop(starting);
                // Registration is over: a second look is the final word.
                match find() {
                    Some(b) => b,
                    None => {
                        self.respond(event, Verdict::Allow);
                        return;
                    }
                }
            }
        };
        match blob.phase() {
            Phase::Filling => {}
            Phase::Rejected(_) => return self.respond(event, Verdict::DenyEio),
            _ => return self.respond(event, Verdict::Allow),
        }
        let me = self.clone();
        let asked = std::time::Instant::now();
        self.rt.spawn(async move {
            let (offset, count) = (event.offset, event.count);
            me.counters.read_size.0.observe(count as f64);
            let used = blob.note_read(offset, count);
            if !blob.has_range(offset, count) {
                me.counters.waited_reads.fetch_add(1, Ordering::Relaxed);
            }
            me.counters.readahead_used.fetch_add(used, Ordering::Relaxed);
            if let Some((a, b, new)) = blob.ahead_of(offset, count) {
                me.counters
                    .readahead_chunks
                    .fetch_add(new, Ordering::Relaxed);
                // Fetched beside the read, not before its answer; counted
                // as demand, so the fill gives way to it too.
                let (me, blob) = (me.clone(), blob.clone());
                me.rt.clone().spawn(async move {
                    let _ahead = me.demand.begin(Vec::new());
                    if let Err(e) = me.ensure_chunks(&blob, a, b).await {
                        tracing::debug!(layer = %blob.state.entry.layer, error = %hyperbox_api::error_chain(&e), "read-ahead failed; reads fetch on their own");
                    }
                });
            }
            let made = me.ensure_range(&blob, offset, count).await;
            me.counters
                .read_wait
                .0
                .observe(asked.elapsed().as_secs_f64());
            match made {
                // Refused while this read waited: the rest of the file may
                // be holes, and every read of it fails from now on.
                Ok(()) if matches!(blob.phase(), Phase::Rejected(_)) => {
                    me.respond(event, Verdict::DenyEio)
                }
                Ok(()) => me.respond(event, Verdict::Allow),
                Err(e) => {
                    let msg = hyperbox_api::error_chain(&e);
                    tracing::error!(layer = %blob.state.entry.layer, offset, count, error = %msg, "lazy read failed; the reader gets EIO");
                    *lock(&blob.last_error) = Some(msg);
                    me.respond(event, Verdict::DenyEio);
                }
            }
        });
    }
}
