//! The real clients operators run against containerd — `crictl`, `nerdctl`
//! and the CRI validation suite `critest` — as tests drive them: each bound
//! to one private containerd instance, with every path (endpoints, config,
//! data root, hosts dir) inside that instance's directory so nothing is read
//! from or written to the host's defaults.
//!
//! The binaries are built from their Go modules at pinned versions by
//! `scripts/install-deps.sh` into [`crate::gobin::root`], outside the
//! clone, the way users install them. These wrappers are deliberately thin: a test states
//! the command line a user would type, so what is proven is the tool's
//! behaviour, not ours.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::containerd::Containerd;

/// The cri-tools release (crictl and critest).
pub const CRI_TOOLS_VERSION: &str = "v1.37.0";
/// The nerdctl release.
pub const NERDCTL_VERSION: &str = "v2.2.1";

/// `crictl` of [`CRI_TOOLS_VERSION`].
pub fn crictl_bin() -> PathBuf {
    crate::gobin::root()
        .join(format!("cri-tools-{CRI_TOOLS_VERSION}"))
        .join("crictl")
}

/// `critest` of [`CRI_TOOLS_VERSION`].
pub fn critest_bin() -> PathBuf {
    crate::gobin::root()
        .join(format!("cri-tools-{CRI_TOOLS_VERSION}"))
        .join("critest")
}

/// `nerdctl` of [`NERDCTL_VERSION`].
pub fn nerdctl_bin() -> PathBuf {
    crate::gobin::root()
        .join(format!("nerdctl-{NERDCTL_VERSION}"))
        .join("nerdctl")
}

/// Why one of `bins` cannot be run, or `None` when all are there.
pub fn missing(bins: &[PathBuf]) -> Option<String> {
    let gone: Vec<String> = bins
        .iter()
        .filter(|b| !b.is_file())
        .map(|b| b.display().to_string())
        .collect();
    (!gone.is_empty()).then(|| format!("{} not built (scripts/install-deps.sh)", gone.join(", ")))
}

/// Errors of running a tool.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tool could not be started or a file for it not written.
    #[error("{action}")]
    Io {
        /// What was being done.
        action: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The tool ran and failed.
    #[error("`{command}` exited with {status}: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its standard error.
        stderr: String,
    },
    /// The tool printed something that is not the JSON it promises.
    #[error("`{command}` printed no JSON: {output}")]
    NotJson {
        /// The command line.
        command: String,
        /// What it printed.
        output: String,
    },
}

type Result<T> = std::result::Result<T, Error>;

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let action = action.into();
    move |source| Error::Io { action, source }
}

/// A command line as a user would type it, for errors.
pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion; its stdout when it succeeds.
fn run(mut cmd: Command) -> Result<String> {
    let command = describe(&cmd);
    tracing::debug!(%command, "running");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("run {command}")))?;
    check(command, out)
}

fn check(command: String, out: Output) -> Result<String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

fn json(command: String, text: String) -> Result<serde_json::Value> {
    serde_json::from_str(&text).map_err(|_| Error::NotJson {
        command,
        output: text,
    })
}

/// `crictl` talking to one containerd's CRI through a config file of its
/// own (both endpoints set, so crictl never probes the host's sockets).
#[derive(Debug, Clone)]
pub struct Crictl {
    bin: PathBuf,
    config: PathBuf,
}

impl Crictl {
    /// Writes `crictl.yaml` into the instance's directory.
    pub fn new(containerd: &Containerd) -> Result<Crictl> {
        let config = containerd.dir().join("crictl.yaml");
        let endpoint = format!("unix://{}", containerd.address().display());
        std::fs::write(
            &config,
            format!(
                "runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\ntimeout: 60\n\
                 debug: false\npull-image-on-create: false\n"
            ),
        )
        .map_err(io(format!("write {}", config.display())))?;
        Ok(Crictl {
            bin: crictl_bin(),
            config,
        })
    }

    /// `crictl --config <ours> args...`, not started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--config").arg(&self.config).args(args);
        c
    }

    /// Runs `crictl args...`; its stdout, or an error with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        run(self.command(args))
    }

    /// Runs `crictl args...` and its raw output, failed or not.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        let mut c = self.command(args);
        c.stdin(Stdio::null())
            .output()
            .map_err(io(format!("run {}", describe(&c))))
    }

    /// Runs `crictl args...` (which must ask for JSON output) and parses it.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let text = self.run(args)?;
        json(describe(&self.command(args)), text)
    }

    /// The id `crictl args...` prints (runp, create, pull print one line).
    pub fn id(&self, args: &[&str]) -> Result<String> {
        Ok(self
            .run(args)?
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string())
    }
}

/// `nerdctl` bound to one containerd: its address, a namespace, a data
/// root and CNI config dir inside the instance's directory, and the
/// instance's `certs.d` as hosts dir (where the harness made the test
/// registries plain HTTP).
#[derive(Debug, Clone)]
pub struct Nerdctl {
    bin: PathBuf,
    address: PathBuf,
    namespace: String,
    data_root: PathBuf,
    hosts_dir: PathBuf,
    cni_conf: PathBuf,
}

impl Nerdctl {
    /// nerdctl for `containerd`, namespace `default`.
    pub fn new(containerd: &Containerd) -> Result<Nerdctl> {
        let data_root = containerd.dir().join("nerdctl");
        let cni_conf = data_root.join("cni-conf");
        std::fs::create_dir_all(&cni_conf).map_err(io(format!("create {}", cni_conf.display())))?;
        Ok(Nerdctl {
            bin: nerdctl_bin(),
            address: containerd.address().into(),
            namespace: crate::containerd::API_NAMESPACE.into(),
            data_root,
            hosts_dir: containerd.dir().join("certs.d"),
            cni_conf,
        })
    }

    /// `nerdctl <global flags> args...`, not started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.namespace)
            .arg("--data-root")
            .arg(&self.data_root)
            .arg("--hosts-dir")
            .arg(&self.hosts_dir)
            .arg("--cni-path")
            .arg("/usr/lib/cni")
            .arg("--cni-netconfpath")
            .arg(&self.cni_conf)
            .args(args)
            // No host config file (/etc/nerdctl/nerdctl.toml) may change
            // what the test asked for.
            .env("NERDCTL_TOML", self.data_root.join("nerdctl.toml"));
        c
    }

    /// Runs `nerdctl args...`; its stdout, or an error with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        run(self.command(args))
    }

    /// Runs `nerdctl args...` and its raw output, failed or not.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        let mut c = self.command(args);
        c.stdin(Stdio::null())
            .output()
            .map_err(io(format!("run {}", describe(&c))))
    }
}

/// Polls `f` every 200 ms until it returns `Some` or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
