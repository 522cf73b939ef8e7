//! `hyperbox-snapshotter` as a test runs it: its own root, socket and config
//! in a temporary directory; killed with any signal and restarted with the
//! same state, as a service manager would.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use containerd_client::services::v1::snapshots::ListSnapshotsRequest;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use futures::StreamExt;
use nix::sys::signal::Signal;
use tonic::transport::Channel;

use crate::containerd::ProxyPlugin;
use crate::registry::tail;

/// The name containerd knows the snapshotter by in these tests.
pub const NAME: &str = "hyperbox";

/// A running snapshotter; killed and its directory removed on drop.
#[derive(Debug)]
pub struct SnapshotterDaemon {
    dir: PathBuf,
    child: Option<Child>,
    bin: PathBuf,
    /// A service manager's fd store the daemon hands fds to, if enabled.
    fd_store: Option<crate::fdstore::FdStore>,
}

impl SnapshotterDaemon {
    /// Starts a snapshotter with a fresh root and waits until it answers.
    pub async fn start() -> SnapshotterDaemon {
        Self::start_configured("", "").await
    }

    /// Like [`SnapshotterDaemon::start`] with extra keys for the
    /// `[snapshotter]` section and extra TOML after it. Registry settings
    /// point into the daemon's own directory (`certs.d/`,
    /// `docker-config.json`) so tests never read the host's.
    pub async fn start_configured(snapshotter_keys: &str, rest: &str) -> SnapshotterDaemon {
        let dir = crate::footprint::owned_temp_dir("hb-snap-").expect("instance dir");
        fs::write(
            dir.join("config.toml"),
            format!(
                "[snapshotter]\nroot = \"{}\"\naddress = \"{}\"\ncontrol_address = \"{}\"\n\
                 {snapshotter_keys}\n\
                 [registry]\nconfig_path = \"{}\"\ndocker_config = \"{}\"\nretries = 3\n\
                 timeout_secs = 10\n{rest}\n",
                dir.join("root").display(),
                dir.join("snapshotter.sock").display(),
                dir.join("control.sock").display(),
                dir.join("certs.d").display(),
                dir.join("docker-config.json").display(),
            ),
        )
        .expect("write config");
        let mut d = SnapshotterDaemon {
            bin: crate::binaries::path("hyperbox-snapshotter"),
            dir,
            child: None,
            fd_store: None,
        };
        d.spawn().await;
        d
    }

    /// Its snapshot root.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Its gRPC socket.
    pub fn address(&self) -> PathBuf {
        self.dir.join("snapshotter.sock")
    }

    /// Its control socket (`snapshotter.control_address`).
    pub fn control_address(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// Its config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    /// The `[proxy_plugins]` entry for containerd.
    pub fn proxy_plugin(&self) -> ProxyPlugin {
        ProxyPlugin::snapshotter(NAME, self.address(), self.root())
    }

    /// Runs `hb image index --json REFERENCE` with this daemon's config
    /// (its registry settings) and returns what it printed.
    pub fn hb_index(&self, reference: &str) -> serde_json::Value {
        self.hb_json(&["image", "index", "--json", reference])
    }

    /// Runs `hb ARGS` (which must ask for JSON) with this daemon's config,
    /// asserts it succeeded and returns what it printed.
    pub fn hb_json(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new(crate::binaries::path("hb"))
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .output()
            .expect("run hb");
        assert!(
            out.status.success(),
            "hb {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "hb {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Its `/metrics` page, from the address it logged last (a restart
    /// binds a new one).
    pub async fn metrics(&self) -> String {
        let log = self.log();
        let address = log
            .lines()
            .rev()
            .find(|l| l.contains("metrics served"))
            .and_then(|l| l.split("address=").nth(1))
            .map(|a| a.split_whitespace().next().unwrap_or_default().to_string())
            .unwrap_or_else(|| panic!("no metrics address logged: {log}"));
        reqwest::get(format!("http://{address}/metrics"))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("/metrics body")
    }

    /// What it has logged.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("snapshotter.log")).unwrap_or_default()
    }

    /// The daemon's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// From the next start on, runs the daemon as systemd runs a unit with
    /// `FileDescriptorStoreMax=`: with a `NOTIFY_SOCKET` whose fd store
    /// keeps what it hands over, passed back at each start (`LISTEN_FDS`).
    pub fn use_fd_store(&mut self) {
        self.fd_store = Some(
            crate::fdstore::FdStore::bind(&self.dir.join("notify.sock")).expect("notify socket"),
        );
    }

    /// The names of the fds the daemon has handed to the fd store.
    pub fn stored_fds(&mut self) -> Vec<String> {
        match &mut self.fd_store {
            Some(s) => {
                s.receive();
                s.names()
            }
            None => Vec::new(),
        }
    }

    async fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("snapshotter.log"))
            .expect("open log");
        let mut cmd = Command::new(&self.bin);
        if let Some(store) = &mut self.fd_store {
            store.receive();
            let fds = store.fds();
            let names = store.names().join(":");
            cmd = Command::new("/bin/sh");
            // LISTEN_PID must be the daemon's own pid: the shell's, which
            // exec keeps.
            cmd.arg("-c")
                .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
                .arg(&self.bin)
                .env("NOTIFY_SOCKET", store.notify_socket());
            if !fds.is_empty() {
                cmd.env("LISTEN_FDS", fds.len().to_string())
                    .env("LISTEN_FDNAMES", names);
                // SAFETY: between fork and exec only dup2 and fcntl run, which are
                // async-signal-safe; the source fds stay open in the parent
                // (the store) for the whole spawn.
                unsafe {
                    use std::os::unix::process::CommandExt as _;
                    cmd.pre_exec(move || {
                        for (i, fd) in fds.iter().enumerate() {
                            let to = 3 + i as i32;
                            if libc::dup2(*fd, to) < 0 || libc::fcntl(to, libc::F_SETFD, 0) < 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                        }
                        Ok(())
                    });
                }
            }
        }
        let child = cmd
            .arg("--config")
            .arg(self.config_path())
            .arg("--log-level")
            .arg("info")
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
                    "hyperbox-snapshotter exited: {status}; log:\n{}",
                    tail(&self.log(), 3000)
                );
            }
            if self.address().exists() && self.list(&[]).await.is_ok() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "hyperbox-snapshotter not ready; log:\n{}",
                tail(&self.log(), 3000)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A gRPC client straight to the snapshotter (not through containerd).
    pub async fn client(&self) -> Result<SnapshotsClient<Channel>, tonic::transport::Error> {
        Ok(SnapshotsClient::new(
            containerd_client::connect(self.address()).await?,
        ))
    }

    /// Walk with `filters`, straight to the snapshotter.
    pub async fn list(
        &self,
        filters: &[&str],
    ) -> Result<Vec<containerd_client::services::v1::snapshots::Info>, String> {
        let mut c = self.client().await.map_err(|e| e.to_string())?;
        let mut s = c
            .list(ListSnapshotsRequest {
                snapshotter: NAME.into(),
                filters: filters.iter().map(|f| f.to_string()).collect(),
            })
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        let mut out = Vec::new();
        while let Some(batch) = s.next().await {
            out.extend(batch.map_err(|e| e.to_string())?.info);
        }
        Ok(out)
    }

    /// Polls Walk with `filters` until exactly `count` snapshots match:
    /// containerd removes backend snapshots in its garbage collector, after
    /// the call that deleted them has returned.
    pub async fn wait_for_count(
        &self,
        filters: &[&str],
        count: usize,
        timeout: Duration,
    ) -> Vec<containerd_client::services::v1::snapshots::Info> {
        let start = Instant::now();
        loop {
            let got = self.list(filters).await.expect("list snapshots");
            if got.len() == count || start.elapsed() > timeout {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until no lazily served layer is still filling or being
    /// verified (no `<root>/lazy/*.lazy` state file), so reads after it
    /// touch only local bytes; false after `timeout`.
    pub async fn wait_lazy_complete(&self, timeout: Duration) -> bool {
        let dir = self.root().join("lazy");
        let start = Instant::now();
        loop {
            let pending = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".lazy"));
            if !pending {
                return true;
            }
            if start.elapsed() > timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sends `signal` and waits for the daemon to exit (killed after 15 s;
    /// see [`crate::procs::stop_child`]).
    pub fn kill(&mut self, signal: Signal) {
        crate::procs::stop_child(&mut self.child, signal, "hyperbox-snapshotter");
    }

    /// Starts the daemon again over the same root and socket.
    pub async fn restart(&mut self) {
        self.kill(Signal::SIGTERM);
        self.spawn().await;
    }

    /// Starts the daemon after a [`SnapshotterDaemon::kill`].
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn().await;
    }

    /// Stops it and removes everything; returns what was left (should be nothing).
    pub fn shutdown(mut self) -> Vec<String> {
        self.teardown();
        let mut left = Vec::new();
        for m in crate::footprint::mounts_under(&self.dir) {
            left.push(format!("mount {}", m.display()));
        }
        if self.dir.exists() {
            left.push(format!("directory {}", self.dir.display()));
        }
        left
    }

    /// Stops it and panics if anything was left behind.
    pub fn finish(self) {
        let leaks = self.shutdown();
        assert!(leaks.is_empty(), "left behind: {leaks:#?}");
    }

    fn teardown(&mut self) {
        self.kill(Signal::SIGTERM);
        for m in crate::footprint::mounts_under(&self.dir) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }

    /// The directory holding root, socket, config and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for SnapshotterDaemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "hyperbox-snapshotter log tail:\n{}",
                tail(&self.log(), 3000)
            );
        }
        self.teardown();
    }
}
