//! PSI triggers: the kernel wakes a poller when stall time within a window
//! crosses a threshold, so reacting to pressure costs nothing while there
//! is none (no busy polling).
//!
//! A trigger is the write `"some <stall µs> <window µs>"` to a PSI file
//! opened read-write, followed by `poll(POLLPRI)`. Without
//! CAP_SYS_RESOURCE the kernel accepts only windows that are multiples of
//! 2 s. POLLERR means the cgroup is gone.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Errors of arming a trigger.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening or writing the PSI file failed.
    #[error("PSI trigger on {path} ({spec})")]
    Arm {
        /// The file.
        path: PathBuf,
        /// What was written.
        spec: String,
        /// The cause (EINVAL: a window the kernel refuses).
        #[source]
        source: std::io::Error,
    },
}

/// An armed trigger.
#[derive(Debug)]
pub struct Trigger {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
}

/// What waiting on a trigger found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fired {
    /// The threshold was crossed.
    Pressure,
    /// The file's cgroup was removed.
    Gone,
}

impl Trigger {
    /// Arms a `some` trigger: wake when `stall` of stall accumulates within
    /// `window`.
    pub fn arm(path: &Path, stall: Duration, window: Duration) -> Result<Trigger, Error> {
        let spec = format!("some {} {}", stall.as_micros(), window.as_micros());
        let arm_err = |source| Error::Arm {
            path: path.into(),
            spec: spec.clone(),
            source,
        };
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(arm_err)?;
        // The kernel wants the trailing NUL as part of the write.
        let mut buf = spec.clone().into_bytes();
        buf.push(0);
        f.write_all(&buf).map_err(arm_err)?;
        let owned: OwnedFd = f.into();
        // SAFETY: `owned` is an open descriptor the AsyncFd takes ownership
        // of; nothing else closes or replaces it while the AsyncFd lives.
        let fd =
            unsafe { AsyncFd::register_with_interest(owned, Interest::PRIORITY | Interest::ERROR) }
                .map_err(|e| arm_err(e.into()))?;
        Ok(Trigger {
            fd,
            path: path.into(),
        })
    }

    /// The PSI file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits until the trigger fires or its cgroup goes away.
    pub async fn wait(&self) -> Fired {
        loop {
            let mut guard = match self.fd.ready(Interest::PRIORITY | Interest::ERROR).await {
                Ok(g) => g,
                Err(_) => return Fired::Gone,
            };
            let ready = guard.ready();
            guard.clear_ready();
            if ready.is_error() {
                return Fired::Gone;
            }
            if ready.is_priority() {
                // Poll again to tell a real event from a stale readiness.
                let mut pfd = libc::pollfd {
                    fd: self.fd.get_ref().as_raw_fd(),
                    events: libc::POLLPRI,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, zero timeout.
                let n = unsafe { libc::poll(&mut pfd, 1, 0) };
                if n > 0 && pfd.revents & libc::POLLERR != 0 {
                    return Fired::Gone;
                }
                if n > 0 && pfd.revents & libc::POLLPRI != 0 {
                    return Fired::Pressure;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn arms_on_the_node_file_and_refuses_bad_windows() {
        let path = Path::new("/proc/pressure/memory");
        if !path.exists() && std::env::var_os("HYPERBOX_REQUIRE_ALL").is_none() {
            eprintln!("skipped: no PSI");
            return;
        }
        let t = Trigger::arm(path, Duration::from_millis(100), Duration::from_secs(2))
            .expect("a 2 s window is accepted even without CAP_SYS_RESOURCE");
        assert_eq!(t.path(), path);
        // Stall longer than the window is nonsense to the kernel.
        let e = Trigger::arm(path, Duration::from_secs(3), Duration::from_secs(2)).unwrap_err();
        assert!(e.to_string().contains("some 3000000 2000000"), "{e}");
    }
}
