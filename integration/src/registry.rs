//! Debian's docker-registry (the CNCF distribution registry) on a free
//! loopback port with its storage in a temporary directory.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The registry binary from the docker-registry package.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// Errors of starting a registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or process operation failed.
    #[error("registry: {action}")]
    Io {
        /// What was being done.
        action: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The registry did not answer `/v2/` in time.
    #[error("registry on {addr} not ready after {waited:?}; its log:\n{log}")]
    NotReady {
        /// Where it should listen.
        addr: SocketAddr,
        /// How long we waited.
        waited: Duration,
        /// The tail of its log.
        log: String,
    },
}

type Result<T> = std::result::Result<T, Error>;

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let action = action.into();
    move |source| Error::Io { action, source }
}

/// A running registry; stopped and its storage removed on drop.
#[derive(Debug)]
pub struct Registry {
    dir: TempDir,
    addr: SocketAddr,
    child: Child,
}

impl Registry {
    /// Starts a registry and waits until it serves `/v2/`.
    pub fn start() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("hb-registry-")
            .tempdir()
            .map_err(io("create temp dir"))?;
        fs::write(
            dir.path().join(crate::footprint::OWNER_FILE),
            std::process::id().to_string(),
        )
        .map_err(io("record owner"))?;
        let addr = free_loopback_port()?;
        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage).map_err(io("create storage dir"))?;
        let config = dir.path().join("config.yml");
        fs::write(&config, config_yaml(&storage, addr)).map_err(io("write config"))?;
        let log_path = dir.path().join("registry.log");
        let log = fs::File::create(&log_path).map_err(io("create log"))?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("dup log"))?)
            .stderr(log)
            .spawn()
            .map_err(io(format!("spawn {REGISTRY_BIN}")))?;
        let mut reg = Registry { dir, addr, child };
        reg.wait_ready(Duration::from_secs(20))?;
        Ok(reg)
    }

    /// `127.0.0.1:<port>`, the host part of image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The socket address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The registry process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The registry's private directory (config, storage, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            if http_get_status(self.addr, "/v2/") == Some(200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        Err(Error::NotReady {
            addr: self.addr,
            waited: start.elapsed(),
            log: tail(&log, 2000),
        })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_yaml(storage: &Path, addr: SocketAddr) -> String {
    format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n",
        storage.display()
    )
}

/// Reserves a free port on 127.0.0.1 by binding port 0 and releasing it.
pub fn free_loopback_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("bind 127.0.0.1:0"))?;
    l.local_addr().map_err(io("local_addr"))
}

/// A plain HTTP/1.0 GET, for readiness probes before any client exists.
fn http_get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let line = std::str::from_utf8(&buf[..n]).ok()?;
    line.split(' ').nth(1)?.parse().ok()
}

/// The last `max` bytes of `s`, cut at a character boundary.
pub fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}
