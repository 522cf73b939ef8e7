//! Recording fakes of the syscall seams, for unit tests that must run
//! without root (feature `fake`).
//!
//! [`FakeMounts`] keeps a mount table of its own, so what a test mounted is
//! what `is_mountpoint` and `mounts_under` report. [`FakeFanotify`] keeps
//! the marked paths, queues events a test pushes, and records the answers.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::fanotify::{AccessEvent, FileId, Held, PreContent, Verdict};
use crate::mount::{Backend, Mounter};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One call a [`FakeMounts`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountCall {
    /// [`Mounter::mount_erofs`].
    Mount {
        /// The image.
        image: PathBuf,
        /// Where.
        target: PathBuf,
        /// How.
        backend: Backend,
    },
    /// [`Mounter::unmount`].
    Unmount(PathBuf),
}

#[derive(Debug, Default)]
struct MountState {
    calls: Vec<MountCall>,
    mounted: BTreeSet<PathBuf>,
    fail_mounts: bool,
}

/// A [`Mounter`] that records calls instead of making them.
#[derive(Debug, Default)]
pub struct FakeMounts {
    state: Mutex<MountState>,
}

impl FakeMounts {
    /// An empty mount table.
    pub fn new() -> FakeMounts {
        FakeMounts::default()
    }

    /// Every call so far, in order; clears the record.
    pub fn take_calls(&self) -> Vec<MountCall> {
        std::mem::take(&mut lock(&self.state).calls)
    }

    /// What is mounted now.
    pub fn mounted(&self) -> Vec<PathBuf> {
        lock(&self.state).mounted.iter().cloned().collect()
    }

    /// Marks `target` mounted without a call being recorded (a mount left
    /// by an earlier run).
    pub fn add_mounted(&self, target: &Path) {
        lock(&self.state).mounted.insert(target.into());
    }

    /// Forgets every mount, as a reboot does.
    pub fn reboot(&self) {
        lock(&self.state).mounted.clear();
    }

    /// Makes every later mount fail with EIO (or succeed again).
    pub fn fail_mounts(&self, fail: bool) {
        lock(&self.state).fail_mounts = fail;
    }
}

impl Mounter for FakeMounts {
    fn mount_erofs(&self, image: &Path, target: &Path, backend: Backend) -> io::Result<()> {
        let mut s = lock(&self.state);
        s.calls.push(MountCall::Mount {
            image: image.into(),
            target: target.into(),
            backend,
        });
        if s.fail_mounts {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        s.mounted.insert(target.into());
        Ok(())
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        let mut s = lock(&self.state);
        s.calls.push(MountCall::Unmount(target.into()));
        s.mounted.remove(target);
        Ok(())
    }

    fn is_mountpoint(&self, path: &Path) -> io::Result<bool> {
        Ok(lock(&self.state).mounted.contains(path))
    }

    fn mounts_under(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let mut out: Vec<PathBuf> = lock(&self.state)
            .mounted
            .iter()
            .filter(|p| p.starts_with(dir))
            .cloned()
            .collect();
        out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        Ok(out)
    }
}

#[derive(Debug, Default)]
struct FanState {
    marked: BTreeSet<PathBuf>,
    queue: VecDeque<AccessEvent>,
    answers: HashMap<u64, Verdict>,
    next: u64,
    closed: bool,
}

/// A [`PreContent`] whose events come from the test.
#[derive(Debug, Default)]
pub struct FakeFanotify {
    state: Mutex<FanState>,
    changed: Condvar,
}

impl FakeFanotify {
    /// No marks, no events.
    pub fn new() -> FakeFanotify {
        FakeFanotify::default()
    }

    /// The paths marked now.
    pub fn marked(&self) -> Vec<PathBuf> {
        lock(&self.state).marked.iter().cloned().collect()
    }

    /// Queues a read of `count` bytes at `offset` of `file`, as the kernel
    /// would report it; returns the event's number for [`Self::answer`].
    pub fn push(&self, file: Option<FileId>, offset: u64, count: u64) -> u64 {
        let mut s = lock(&self.state);
        s.next += 1;
        let id = s.next;
        s.queue.push_back(AccessEvent {
            file,
            offset,
            count,
            pid: None,
            held: Held::Fake(id),
        });
        self.changed.notify_all();
        id
    }

    /// The answer to event `id`, waiting up to `timeout` for it.
    pub fn answer(&self, id: u64, timeout: Duration) -> Option<Verdict> {
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.state);
        loop {
            if let Some(v) = s.answers.get(&id) {
                return Some(*v);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Ends the event stream: the reader gets an error (as when the fd
    /// breaks), so its loop stops.
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.changed.notify_all();
    }
}

impl PreContent for FakeFanotify {
    fn mark(&self, path: &Path) -> io::Result<()> {
        lock(&self.state).marked.insert(path.into());
        Ok(())
    }

    fn unmark(&self, path: &Path) -> io::Result<()> {
        if lock(&self.state).marked.remove(path) {
            Ok(())
        } else {
            // What fanotify_mark(FAN_MARK_REMOVE) says of an unmarked file.
            Err(io::Error::from_raw_os_error(libc::ENOENT))
        }
    }

    fn read_events(&self, out: &mut Vec<AccessEvent>) -> io::Result<()> {
        let mut s = lock(&self.state);
        loop {
            if s.closed {
                return Err(io::Error::from_raw_os_error(libc::EBADF));
            }
            if !s.queue.is_empty() {
                out.extend(s.queue.drain(..));
                return Ok(());
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn respond(&self, event: AccessEvent, verdict: Verdict) -> io::Result<()> {
        let Held::Fake(id) = event.held else {
            return Err(io::Error::other("a real event reached the fake"));
        };
        lock(&self.state).answers.insert(id, verdict);
        self.changed.notify_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmount_all_under_goes_deepest_first_and_leaves_the_rest() {
        let m = FakeMounts::new();
        m.add_mounted(Path::new("/r/a"));
        m.add_mounted(Path::new("/r/a/b/c"));
        m.add_mounted(Path::new("/other"));
        let gone = m.unmount_all_under(Path::new("/r")).unwrap();
        assert_eq!(gone, [PathBuf::from("/r/a/b/c"), PathBuf::from("/r/a")]);
        assert_eq!(
            m.take_calls(),
            [
                MountCall::Unmount("/r/a/b/c".into()),
                MountCall::Unmount("/r/a".into())
            ]
        );
        assert_eq!(m.mounted(), [PathBuf::from("/other")]);
    }
}
