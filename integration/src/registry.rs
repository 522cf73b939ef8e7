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
        Self::start_inner(None, None)
    }

    /// A second registry serving `plain`'s storage over HTTPS with
    /// `cert`/`key` and, if given, basic auth from an htpasswd file: images
    /// are pushed to `plain` and pulled from this one.
    pub fn start_secure_view(
        plain: &Registry,
        cert: &Path,
        key: &Path,
        htpasswd: Option<&Path>,
    ) -> Result<Self> {
        let security = format!(
            "  tls:\n    certificate: {}\n    key: {}\n{}",
            cert.display(),
            key.display(),
            htpasswd
                .map(|p| format!(
                    "auth:\n  htpasswd:\n    realm: hyperbox-test\n    path: {}\n",
                    p.display()
                ))
                .unwrap_or_default()
        );
        Self::start_inner(Some(plain.dir().join("storage")), Some(security))
    }

    /// A second registry serving `plain`'s storage over plain HTTP with
    /// extra config (`yaml`, e.g. a token `auth:` section).
    pub fn start_view(plain: &Registry, yaml: String) -> Result<Self> {
        Self::start_inner(Some(plain.dir().join("storage")), Some(yaml))
    }

    fn start_inner(
        shared_storage: Option<std::path::PathBuf>,
        security: Option<String>,
    ) -> Result<Self> {
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
        let storage = shared_storage.unwrap_or_else(|| dir.path().join("storage"));
        fs::create_dir_all(&storage).map_err(io("create storage dir"))?;
        let config = dir.path().join("config.yml");
        let mut yaml = config_yaml(&storage, addr);
        if let Some(s) = &security {
            yaml.push_str(s);
        }
        fs::write(&config, yaml).map_err(io("write config"))?;
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
            // 200 in plain HTTP; 401 with auth on; over TLS, Go answers a
            // plain request with 400. Each says the server is up.
            if matches!(http_get_status(self.addr, "/v2/"), Some(200 | 400 | 401)) {
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

/// A throwaway CA and a certificate for 127.0.0.1 signed by it, made with
/// the openssl command in `dir`: `(ca.pem, cert.pem, key.pem)`.
pub fn make_tls_files(
    dir: &Path,
) -> Result<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(io("run openssl"))?;
        if !out.status.success() {
            return Err(Error::Io {
                action: format!("openssl {}", args.join(" ")),
                source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()),
            });
        }
        Ok(())
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=hyperbox test CA",
    ])?;
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "key.pem",
        "-out",
        "cert.csr",
        "-subj",
        "/CN=127.0.0.1",
    ])?;
    fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .map_err(io("write ext.cnf"))?;
    run(&[
        "x509",
        "-req",
        "-in",
        "cert.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ])?;
    Ok((
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    ))
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
