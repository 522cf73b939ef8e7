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

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use containerd_shim::protos::ttrpc::{self, Code};

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
}

impl std::ops::Deref for RuncCli {
    type Target = runc::Runc;

    fn deref(&self) -> &runc::Runc {
        &self.cli
    }
}

impl RuncCli {
    /// `cli` must have been built with `--log <log> --log-format json`.
    pub fn new(cli: runc::Runc, log: PathBuf) -> RuncCli {
        RuncCli { cli, log }
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
