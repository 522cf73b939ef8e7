//! `hyperbox-nri` as a test runs it: its own config, sockets, state and
//! metrics port in a temporary directory; dialling a test containerd's NRI
//! socket (external plugin) or launched by containerd itself
//! ([`AgentDaemon::pre_registered`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::containerd::NriPlugin;
use crate::registry::tail;

/// Agent config for the memory policy tests: adaptive limits, PSI sampled
/// every second.
pub const ADAPTIVE: &str = "[memory]\ndefault_policy = \"adaptive\"\nsample_interval_secs = 1\n";

/// The sum of the samples in a `/metrics` body whose lines start with
/// `name` (end it with `{` or a space to match one metric exactly) and,
/// unless `id` is empty, name `id` (a container's); `None` when no line
/// matches.
pub fn metric(body: &str, name: &str, id: &str) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(name) && (id.is_empty() || l.contains(id)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A test agent; killed and its directory removed on drop.
#[derive(Debug)]
pub struct AgentDaemon {
    dir: PathBuf,
    child: Option<Child>,
    bin: PathBuf,
    hb: PathBuf,
    /// Its metrics address (`127.0.0.1:port`).
    pub metrics: String,
}

impl AgentDaemon {
    fn prepare(nri_socket: &Path, extra: &str) -> AgentDaemon {
        let dir = crate::footprint::owned_temp_dir("hb-agent-").expect("instance dir");
        let metrics = format!("127.0.0.1:{}", free_port());
        fs::write(
            dir.join("config.toml"),
            format!(
                "[agent]\naddress = \"{}\"\nnri_socket = \"{}\"\nmetrics_address = \"{metrics}\"\n\
                 state_dir = \"{}\"\n{extra}\n",
                dir.join("agent.sock").display(),
                nri_socket.display(),
                dir.join("state").display(),
            ),
        )
        .expect("write config");
        AgentDaemon {
            bin: crate::binaries::path("hyperbox-nri"),
            // Built now: a first build inside a timed step would stall it.
            hb: crate::binaries::path("hb"),
            dir,
            child: None,
            metrics,
        }
    }

    /// An external agent dialling `nri_socket`, configured but not started
    /// (seed its state dir, then [`AgentDaemon::start_again`]).
    pub fn new(nri_socket: &Path, extra: &str) -> AgentDaemon {
        let a = Self::prepare(nri_socket, extra);
        std::fs::create_dir_all(a.state_dir()).expect("state dir");
        a
    }

    /// Starts an external agent dialling `nri_socket`, with extra config
    /// TOML (e.g. a `[memory]` section); waits until its API answers.
    pub async fn start(nri_socket: &Path, extra: &str) -> AgentDaemon {
        let mut a = Self::prepare(nri_socket, extra);
        a.spawn().await;
        a
    }

    /// An agent for containerd to launch from its plugin dir: the returned
    /// plugin entry is a script that execs the agent with this config, and
    /// `conf` is the conf.d text containerd passes in Configure.
    pub fn pre_registered(conf: Option<&str>) -> (AgentDaemon, NriPlugin) {
        let a = Self::prepare(Path::new("/nonexistent/nri.sock"), "");
        let script = format!(
            "#!/bin/sh\nexec {} --config {} >>{} 2>&1\n",
            a.bin.display(),
            a.config_path().display(),
            a.dir.join("agent.log").display()
        );
        let plugin = NriPlugin {
            file_name: "10-hyperbox".into(),
            script,
            config: conf.map(str::to_string),
        };
        (a, plugin)
    }

    /// Its config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    /// Its local API socket.
    pub fn address(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// Its state dir (what it learned).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Writes a learned history for `workload` into its state dir, as an
    /// earlier run of the agent leaves it (start it afterwards).
    pub fn seed_history(&self, workload: &str, runs: &[u64]) {
        fs::create_dir_all(self.state_dir()).expect("create the agent's state dir");
        let body = serde_json::json!({
            "version": 1,
            "workloads": { workload: { "runs": runs, "updated": 0 } }
        });
        fs::write(
            self.state_dir().join("workloads.json"),
            serde_json::to_vec(&body).expect("history serializes"),
        )
        .expect("write the agent's history");
    }

    /// The runs it has learned for `workload` (from its state file).
    pub fn learned_runs(&self, workload: &str) -> Vec<u64> {
        let text = fs::read_to_string(self.state_dir().join("workloads.json")).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        v["workloads"][workload]["runs"]
            .as_array()
            .map(|a| a.iter().filter_map(|r| r.as_u64()).collect())
            .unwrap_or_default()
    }

    /// What it has logged.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Its pid while the test runs it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    async fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("open log");
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "hyperbox-nri exited: {status}; log:\n{}",
                    tail(&self.log(), 3000)
                );
            }
            if self.health().await.is_ok() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "hyperbox-nri not ready; log:\n{}",
                tail(&self.log(), 3000)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// GETs `path` on the metrics address: status and body.
    pub async fn http_get(&self, path: &str) -> Result<(u16, String), reqwest::Error> {
        let r = reqwest::Client::new()
            .get(format!("http://{}{path}", self.metrics))
            .timeout(Duration::from_secs(5))
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.text().await?))
    }

    /// `/healthz` as JSON.
    pub async fn health(&self) -> Result<serde_json::Value, String> {
        let (status, body) = self.http_get("/healthz").await.map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("healthz {status}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| e.to_string())
    }

    /// Waits until the agent reports an NRI connection (`true`) or none.
    pub async fn wait_connected(&self, connected: bool, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Ok(h) = self.health().await
                && h["nri_connected"] == connected
            {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "agent nri_connected != {connected} after {timeout:?}; log:\n{}",
                tail(&self.log(), 3000)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `hb --config <ours> args...`; returns stdout, panics on failure.
    pub fn hb(&self, args: &[&str]) -> String {
        let out = self.hb_output(args);
        assert!(
            out.status.success(),
            "hb {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `hb --config <ours> args...`.
    pub fn hb_output(&self, args: &[&str]) -> std::process::Output {
        self.hb_command(args).output().expect("run hb")
    }

    /// `hb --config <ours> args...`, not started (for streaming commands).
    pub fn hb_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.hb);
        c.arg("--config").arg(self.config_path()).args(args);
        c
    }

    /// `hb policy explain <id> --json`.
    pub fn explain(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.hb(&["policy", "explain", id, "--json"])).expect("explain JSON")
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn kill(&mut self, signal: Signal) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), signal);
            let _ = c.wait();
        }
    }

    /// Sends `signal` without waiting (SIGSTOP, SIGCONT).
    pub fn signal(&self, signal: Signal) {
        if let Some(c) = &self.child {
            let _ = kill(Pid::from_raw(c.id() as i32), signal);
        }
    }

    /// Starts it again with the same config and state.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn().await;
    }

    /// Stops it and removes its directory; returns what was left.
    pub fn shutdown(mut self) -> Vec<String> {
        self.teardown();
        let mut left = Vec::new();
        if self.dir.exists() {
            left.push(format!("directory {}", self.dir.display()));
        }
        left
    }

    fn teardown(&mut self) {
        self.kill(Signal::SIGTERM);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for AgentDaemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("hyperbox-nri log tail:\n{}", tail(&self.log(), 4000));
        }
        self.teardown();
    }
}

/// The v1 memory (hybrid nodes) or v2 directory of a cgroup path.
pub fn memory_dir(cgroups_path: &str) -> PathBuf {
    let rel = cgroups_path.trim_start_matches('/');
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        Path::new("/sys/fs/cgroup").join(rel)
    } else {
        Path::new("/sys/fs/cgroup/memory").join(rel)
    }
}

/// The hard memory limit in force in a cgroup, from cgroupfs (`None`:
/// unlimited).
pub fn memory_limit(cgroups_path: &str) -> Option<u64> {
    let d = memory_dir(cgroups_path);
    let (file, unlimited) = if d.join("memory.max").exists() {
        ("memory.max", u64::MAX)
    } else {
        ("memory.limit_in_bytes", 0x7fff_ffff_ffff_f000)
    };
    let s = fs::read_to_string(d.join(file))
        .unwrap_or_else(|e| panic!("read {}: {e}", d.join(file).display()));
    match s.trim() {
        "max" => None,
        v => Some(v.parse::<u64>().expect("a limit is a number")).filter(|v| *v < unlimited),
    }
}
