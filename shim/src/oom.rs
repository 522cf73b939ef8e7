//! OOM kills in a container's memory cgroup, as they happen: an eventfd
//! registered through `cgroup.event_control` on v1 (hybrid nodes
//! included), inotify on `memory.events` on v2. No polling.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::cgroup::Cgroups;

/// Sends one message per OOM kill in the cgroup until it goes away or
/// the receiver is dropped.
pub fn watch(cgroups: Cgroups) -> io::Result<mpsc::UnboundedReceiver<()>> {
    let file = cgroups
        .oom_file()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no memory cgroup"))?;
    let fd = match &cgroups {
        Cgroups::V1(_) => {
            // SAFETY: eventfd returns a new descriptor or -1.
            let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if efd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: efd is a fresh descriptor we own from here.
            let efd = unsafe { OwnedFd::from_raw_fd(efd) };
            let control = std::fs::File::open(&file)?;
            let dir = file.parent().expect("a cgroup file has a directory");
            std::fs::write(
                dir.join("cgroup.event_control"),
                format!("{} {}", efd.as_raw_fd(), control.as_raw_fd()),
            )?;
            // The kernel holds its own reference to oom_control now.
            drop(control);
            efd
        }
        Cgroups::V2(_) => {
            // SAFETY: inotify_init1 returns a new descriptor or -1.
            let ifd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
            if ifd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: ifd is a fresh descriptor we own from here.
            let ifd = unsafe { OwnedFd::from_raw_fd(ifd) };
            let path = std::ffi::CString::new(file.as_os_str().as_encoded_bytes())
                .map_err(io::Error::other)?;
            // SAFETY: a valid NUL-terminated path and our descriptor.
            let wd =
                unsafe { libc::inotify_add_watch(ifd.as_raw_fd(), path.as_ptr(), libc::IN_MODIFY) };
            if wd < 0 {
                return Err(io::Error::last_os_error());
            }
            ifd
        }
    };
    // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open
    // and unchanged until it is dropped.
    let afd = unsafe { AsyncFd::register(fd) }.map_err(|e| io::Error::other(e.to_string()))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut seen = cgroups.oom_kills();
    let dir = file.parent().map(|d| d.to_path_buf());
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        loop {
            let Ok(mut guard) = afd.readable().await else {
                return;
            };
            let r = guard.try_io(|fd| {
                // SAFETY: reads into a stack buffer of the given length.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n)
                }
            });
            if !matches!(r, Ok(Ok(_))) {
                continue;
            }
            // v1 also signals when the cgroup is removed.
            if dir.as_ref().is_some_and(|d| !d.exists()) {
                return;
            }
            let events = match &cgroups {
                // v1 signals the OOM before the kill is counted: each
                // notification is one OOM (runc-v2 reports them the same).
                Cgroups::V1(_) => 1,
                Cgroups::V2(_) => {
                    let now = cgroups.oom_kills();
                    let n = now.saturating_sub(seen);
                    seen = seen.max(now);
                    n
                }
            };
            for _ in 0..events {
                if tx.send(()).is_err() {
                    return;
                }
            }
        }
    });
    Ok(rx)
}
