//! Running `runc` while the shim reaps every child.
//!
//! The shim is a subreaper: containers' init processes are re-parented to
//! it when `runc create` exits, and containerd-shim's SIGCHLD handler calls
//! `waitpid(-1)` for all of them. That handler also reaps the `runc` CLI
//! processes, so tokio's own `wait` on them would race it and lose. Every
//! `runc` invocation therefore subscribes to the exit monitor *before* it
//! spawns and takes its status from there.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use async_trait::async_trait;
use containerd_shim::monitor::{ExitEvent, Subject, Topic, monitor_subscribe, monitor_unsubscribe};
use tokio::io::AsyncReadExt;

/// A subscription to the reaper's exits, taken before a child is spawned
/// so that its exit cannot come first.
#[derive(Debug)]
pub struct ExitWatch {
    id: i64,
    rx: tokio::sync::mpsc::UnboundedReceiver<ExitEvent>,
}

impl ExitWatch {
    /// Starts listening.
    pub async fn new() -> std::io::Result<ExitWatch> {
        let sub = monitor_subscribe(Topic::Pid)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(ExitWatch {
            id: sub.id,
            rx: sub.rx,
        })
    }

    /// The exit code of `pid` (128 + n when killed by signal n).
    pub async fn wait(mut self, pid: u32) -> i32 {
        let mut code = None;
        while let Some(ExitEvent { subject, exit_code }) = self.rx.recv().await {
            if matches!(subject, Subject::Pid(p) if p as u32 == pid) {
                code = Some(exit_code);
                break;
            }
        }
        // The monitor dropped us: report what a killed process reports,
        // rather than success.
        code.unwrap_or(128 + libc::SIGKILL)
    }
}

impl Drop for ExitWatch {
    // A subscriber nobody reads makes the monitor log every later exit as
    // undeliverable.
    fn drop(&mut self) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(monitor_unsubscribe(self.id));
        }
    }
}

/// A [`runc::Spawner`] that learns exits from the shim's reaper.
#[derive(Debug, Default)]
pub struct ReaperSpawner;

#[async_trait]
impl runc::Spawner for ReaperSpawner {
    async fn execute(
        &self,
        mut cmd: tokio::process::Command,
    ) -> Result<(ExitStatus, u32, String, String), runc::error::Error> {
        let watch = ExitWatch::new()
            .await
            .map_err(runc::error::Error::InvalidCommand)?;
        let mut child = cmd
            .spawn()
            .map_err(runc::error::Error::ProcessSpawnFailed)?;
        let pid = child.id().unwrap_or_default();
        let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
        // Drain both pipes while waiting: runc blocks on a full pipe.
        let read_out = async {
            let mut s = String::new();
            if let Some(o) = stdout.as_mut() {
                let _ = o.read_to_string(&mut s).await;
            }
            s
        };
        let read_err = async {
            let mut s = String::new();
            if let Some(e) = stderr.as_mut() {
                let _ = e.read_to_string(&mut s).await;
            }
            s
        };
        let (out, err, code) = tokio::join!(read_out, read_err, watch.wait(pid));
        // Only now: a dropped tokio child joins tokio's own orphan reaping,
        // which could take the exit before the shim's reaper reports it.
        drop(child);
        Ok((exit_status(code), pid, out, err))
    }
}

/// A wait status as `waitpid` would give it, from the reaper's exit code
/// (128 + n for a process killed by signal n).
pub fn exit_status(code: i32) -> ExitStatus {
    if code > 128 && code < 128 + 65 {
        ExitStatus::from_raw(code - 128)
    } else {
        ExitStatus::from_raw((code & 0xff) << 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_map_to_statuses_as_waitpid_gives_them() {
        assert_eq!(exit_status(0).code(), Some(0));
        assert_eq!(exit_status(3).code(), Some(3));
        assert_eq!(exit_status(137).signal(), Some(9));
        assert_eq!(exit_status(128).code(), Some(128));
    }
}
