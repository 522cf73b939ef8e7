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

/// A [`runc::Spawner`] that learns exits from the shim's reaper.
#[derive(Debug, Default)]
pub struct ReaperSpawner;

#[async_trait]
impl runc::Spawner for ReaperSpawner {
    async fn execute(
        &self,
        mut cmd: tokio::process::Command,
    ) -> Result<(ExitStatus, u32, String, String), runc::error::Error> {
        let sub = monitor_subscribe(Topic::Pid).await.map_err(|e| {
            runc::error::Error::InvalidCommand(std::io::Error::other(e.to_string()))
        })?;
        let sub_id = sub.id;
        let mut rx = sub.rx;
        let outcome = async {
            let mut child = cmd
                .spawn()
                .map_err(runc::error::Error::ProcessSpawnFailed)?;
            let pid = child.id().unwrap_or_default();
            let mut stdout = child.stdout.take();
            let mut stderr = child.stderr.take();
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
            let exited = async {
                while let Some(ExitEvent { subject, exit_code }) = rx.recv().await {
                    if matches!(subject, Subject::Pid(p) if p as u32 == pid) {
                        return exit_code;
                    }
                }
                // The monitor dropped us: report what runc reports when it
                // is killed, rather than success.
                128 + libc::SIGKILL
            };
            let (out, err, code) = tokio::join!(read_out, read_err, exited);
            // The reaper already collected it; let tokio forget the child.
            drop(child);
            Ok((exit_status(code), pid, out, err))
        }
        .await;
        let _ = monitor_unsubscribe(sub_id).await;
        outcome
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
