//! runc, as one container's shim calls it, and runc's failures as the
//! client sees them.
//!
//! runc writes why it failed to its log, not to its stderr: during
//! `create` and `exec` its stderr is the container's own (a fifo nobody
//! reads under `ctr run -d`, or a pty), so the error would be lost and the
//! user left with "runc create: : unknown". Like containerd's
//! `io.containerd.runc.v2`, each container's runc logs JSON lines to
//! `<bundle>/log.json`, and a failure is reported with the last error line
//! found there, worded as runc-v2 words it ("OCI runtime create failed:
//! ..."), which is what users and their alerting already search for.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use containerd_shim::protos::ttrpc::{self, Code};
use runc::Spawner;

use crate::reaper::ReaperSpawner;

/// The runc log's name in a bundle.
pub const LOG: &str = "log.json";
/// How much of the log's end is read for the last error: runc appends
/// for the container's whole life.
const TAIL: u64 = 64 * 1024;

/// runc with its global options for one container.
#[derive(Debug, Clone)]
pub struct RuncCli {
    cli: runc::Runc,
    log: PathBuf,
    /// The binary and global options `cli` runs with, for `exec`.
    binary: PathBuf,
    globals: Vec<String>,
}

/// How one `runc exec` is started.
#[derive(Debug)]
pub struct Exec<'a> {
    pub id: &'a str,
    /// The process as containerd sent it (JSON of an OCI `Process`).
    pub process: &'a [u8],
    /// Where the bundle is: the process file is written there.
    pub bundle: &'a Path,
    pub pid_file: &'a Path,
    pub io: Option<&'a dyn runc::Io>,
    pub console_socket: Option<&'a Path>,
}

impl std::ops::Deref for RuncCli {
    type Target = runc::Runc;

    fn deref(&self) -> &runc::Runc {
        &self.cli
    }
}

impl RuncCli {
    /// runc `binary` with its state in `root`, logging JSON to `log`.
    pub fn new(binary: &str, root: &Path, systemd: bool, log: PathBuf) -> Result<RuncCli, String> {
        // Resolved once, as the crate would, so exec runs the runc that
        // create runs.
        let binary = runc::utils::binary_path(binary)
            .ok_or_else(|| format!("runc {binary:?}: not found"))?;
        let mut g = runc::options::GlobalOpts::new()
            .command(&binary)
            .root(root)
            .systemd_cgroup(systemd)
            .log(&log)
            .log_json();
        g.custom_spawner(std::sync::Arc::new(ReaperSpawner));
        let cli = g
            .build()
            .map_err(|e| format!("runc {}: {e}", binary.display()))?;
        // The same global options the crate passes, in its order.
        let abs = |p: &Path| -> Result<String, String> {
            std::path::absolute(p)
                .map(|p| p.to_string_lossy().into_owned())
                .map_err(|e| format!("{}: {e}", p.display()))
        };
        let mut globals = vec![
            "--root".to_string(),
            abs(root)?,
            "--log".to_string(),
            abs(&log)?,
            "--log-format".to_string(),
            "json".to_string(),
        ];
        if systemd {
            globals.push("--systemd-cgroup".to_string());
        }
        Ok(RuncCli {
            cli,
            log,
            binary,
            globals,
        })
    }

    /// `runc exec --detach` of the process containerd sent, passed to runc
    /// as sent. Written here rather than through the runc crate's `exec`,
    /// which takes oci-spec's `Process`: deserializing one links every
    /// field's deserializer and, for `execCPUAffinity`, a regex engine,
    /// about 0.7 MiB of code that every shim on a node would map; and it
    /// would drop any field oci-spec does not know yet.
    pub async fn exec(&self, e: Exec<'_>) -> Result<(), runc::error::Error> {
        let mut file = tempfile::Builder::new()
            .prefix(".exec-")
            .suffix(".json")
            .tempfile_in(e.bundle)
            .map_err(runc::error::Error::SpecFileCreationFailed)?;
        file.write_all(e.process)
            .and_then(|()| file.flush())
            .map_err(runc::error::Error::SpecFileCreationFailed)?;
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .args(&self.globals)
            .arg("exec")
            .arg("--process")
            .arg(file.path())
            .arg("--pid-file")
            .arg(e.pid_file);
        if let Some(sock) = e.console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        cmd.arg("--detach").arg(e.id).env_remove("NOTIFY_SOCKET");
        if let Some(io) = e.io {
            io.set(&mut cmd)
                .await
                .map_err(|err| runc::error::Error::IoSet(err.to_string()))?;
        }
        let res = ReaperSpawner.execute(cmd).await;
        if let Some(io) = e.io {
            io.close_after_start().await;
        }
        let (status, _pid, stdout, stderr) = res?;
        if !status.success() {
            return Err(runc::error::Error::CommandFailed {
                status,
                stdout,
                stderr,
            });
        }
        Ok(())
    }

    /// `op` (`create`, `exec`, ...) failed: the error to answer with.
    pub fn failed(&self, op: &str, e: runc::error::Error) -> ttrpc::Error {
        let output = match &e {
            runc::error::Error::CommandFailed { stdout, stderr, .. } => {
                format!("{} {}", stdout.trim(), stderr.trim())
                    .trim()
                    .to_string()
            }
            other => other.to_string(),
        };
        let text = match last_error(&self.log) {
            Some(logged) => format!("OCI runtime {op} failed: {logged}"),
            None if output.is_empty() => {
                format!("OCI runtime {op} failed: runc {op}: {e}")
            }
            None => format!("OCI runtime {op} failed: {output}"),
        };
        // As runc-v2 maps them: a container runc does not know, or a
        // process that is gone, is not found.
        let code = if text.contains("not running")
            || text.contains("does not exist")
            || text.contains("process already finished")
        {
            Code::NOT_FOUND
        } else {
            Code::UNKNOWN
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, text))
    }
}

/// The message of the last `"level":"error"` line in runc's JSON log.
pub fn last_error(log: &Path) -> Option<String> {
    let mut f = std::fs::File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    if len > TAIL {
        f.seek(SeekFrom::Start(len - TAIL)).ok()?;
    }
    let mut buf = Vec::new();
    f.take(TAIL).read_to_end(&mut buf).ok()?;
    last_error_in(&String::from_utf8_lossy(&buf))
}

fn last_error_in(text: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Line {
        level: String,
        msg: String,
    }
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Line>(l).ok())
        .find(|l| l.level == "error" && !l.msg.trim().is_empty())
        .map(|l| l.msg.trim().to_string())
}

/// Where a bundle's runc log is.
pub fn log_of(bundle: &Path) -> PathBuf {
    bundle.join(LOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_error_line_wins_and_other_levels_are_ignored() {
        let log = concat!(
            "{\"level\":\"error\",\"msg\":\"old failure\",\"time\":\"t\"}\n",
            "{\"level\":\"warning\",\"msg\":\"cgroup warning\",\"time\":\"t\"}\n",
            "{\"level\":\"error\",\"msg\":\"runc create failed: unable to start container process: exec: \\\"sh\\\": executable file not found in $PATH\",\"time\":\"t\"}\n",
            "{\"level\":\"info\",\"msg\":\"after\",\"time\":\"t\"}\n",
            "not json, a torn line {\"level\":\n",
        );
        assert_eq!(
            last_error_in(log).as_deref(),
            Some(
                "runc create failed: unable to start container process: exec: \"sh\": executable file not found in $PATH"
            )
        );
        assert_eq!(last_error_in("{\"level\":\"info\",\"msg\":\"x\"}\n"), None);
    }

    #[test]
    fn only_the_end_of_a_long_log_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG);
        let mut text = String::new();
        text.push_str("{\"level\":\"error\",\"msg\":\"first\"}\n");
        while (text.len() as u64) < 3 * TAIL {
            text.push_str("{\"level\":\"info\",\"msg\":\"padding padding padding\"}\n");
        }
        text.push_str("{\"level\":\"error\",\"msg\":\"latest\"}\n");
        std::fs::write(&path, text).unwrap();
        assert_eq!(last_error(&path).as_deref(), Some("latest"));
        assert_eq!(last_error(&dir.path().join("absent")), None);
    }
}
