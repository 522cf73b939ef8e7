//! The SOCI snapshotter (awslabs/soci-snapshotter) as a lazy-loading peer
//! of hyperbox in tests and benchmarks: `soci-snapshotter-grpc` run as the
//! proxy snapshotter `soci` with its own root, socket, config and log in a
//! temporary directory, and the `soci` CLI to turn an image in the test
//! registry into a SOCI-enabled one ([`convert`]).
//!
//! Both binaries are built from their Go module at a pinned release by
//! `scripts/install-deps.sh` into [`bin_dir`], next to containerd 2.x and
//! cri-tools (see [`crate::gobin`]). `HYPERBOX_SOCI_BIN` names another
//! directory holding both.
//!
//! What SOCI needs to load an image lazily, learnt by running it:
//! - a SOCI index in the registry. [`convert`] makes a "SOCI index manifest
//!   v2" image (`soci convert`): an OCI index holding the image manifest,
//!   annotated with the SOCI index digest, and the SOCI index manifest whose
//!   layers are the zTOCs. The daemon finds it from the
//!   `containerd.io/snapshot/cri.manifest-digest` label (`pull_modes.soci_v2`,
//!   on by default); no Referrers API is needed, so Debian's registry serves.
//! - the labels CRI sends with each Prepare (`cri.image-ref`,
//!   `cri.manifest-digest`, `cri.layer-digest`, `cri.image-layers`), which
//!   [`crate::client::Client::pull`] sends with `remote_labels`. A layer with
//!   a zTOC is then mounted over FUSE (`fuse.rawBridge` under the root); a
//!   layer without one SOCI downloads and unpacks itself ("local
//!   snapshot"). Either way Prepare answers `AlreadyExists`.
//! - containerd's socket ([`Soci::attach`]): SOCI reads each image's
//!   manifest from containerd's content store. Without it the first layer
//!   without a zTOC waits 10 s for a dial of the host's default socket to
//!   time out, and is then left to the client.
//! - the namespace of each call: SOCI refuses a remote Prepare without one,
//!   and Debian's containerd 1.7 does not pass it to proxy plugins; see
//!   [`NamespaceForwarder`], put in between on 1.7.
//! - only layers at least `--min-layer-size` big get a zTOC at conversion
//!   (10 MiB unless told), and the daemon's `[snapshotter] min_layer_size`
//!   (0 by default, left so) could raise that bar again at pull.
//! - plain HTTP: the daemon speaks HTTP to `127.0.0.1`/`localhost` hosts on
//!   its own (as containerd's resolver does), so the test registry and the
//!   harness's proxy need no config; the CLI is not involved in pulls.
//!
//! Usage: `Soci::start()`, then containerd with [`Soci::proxy_plugin`]
//! (`Testbed::start_with(|b| b.proxy_plugin(soci.proxy_plugin()))`), then
//! [`Soci::attach`]; [`convert`] an image; pull it with snapshotter
//! [`NAME`] and remote labels; [`Soci::forget_image`] between cold runs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use containerd_client::services::v1::snapshots::ListSnapshotsRequest;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use futures::StreamExt;
use nix::sys::signal::Signal;

use crate::client::PullOptions;
use crate::containerd::{Containerd, Line, ProxyPlugin};
use crate::registry::tail;

/// The soci-snapshotter release the benchmarks compare with.
pub const VERSION: &str = "0.16.1";

/// The name containerd knows the SOCI snapshotter by (`[proxy_plugins.soci]`).
pub const NAME: &str = "soci";

/// Names a directory holding `soci-snapshotter-grpc` and `soci` to use
/// instead of the pinned build.
pub const BIN_ENV: &str = "HYPERBOX_SOCI_BIN";

/// The directory of the pinned build (`<go-bin>/soci-snapshotter-v0.16.1`),
/// or [`BIN_ENV`]'s.
pub fn bin_dir() -> PathBuf {
    std::env::var_os(BIN_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::gobin::root().join(format!("soci-snapshotter-v{VERSION}")))
}

/// The snapshotter daemon.
pub fn daemon_bin() -> PathBuf {
    bin_dir().join("soci-snapshotter-grpc")
}

/// The CLI (`soci convert`, `soci index list`, …).
pub fn cli_bin() -> PathBuf {
    bin_dir().join("soci")
}

/// What is missing to run SOCI here, or `Ok` when both binaries run and are
/// the pinned release (a binary from [`BIN_ENV`] may be any release). FUSE
/// is checked too: the daemon mounts every lazy layer through `/dev/fuse`.
pub fn check() -> std::result::Result<(), String> {
    let mut why = Vec::new();
    let pinned = std::env::var_os(BIN_ENV).is_none_or(|v| v.is_empty());
    for bin in [daemon_bin(), cli_bin()] {
        match Command::new(&bin).arg("--version").output() {
            Err(e) => why.push(format!(
                "{} cannot run ({e}); scripts/install-deps.sh builds it",
                bin.display()
            )),
            Ok(o) if !o.status.success() => why.push(format!(
                "{} --version failed: {}",
                bin.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Ok(o) => {
                let v = String::from_utf8_lossy(&o.stdout);
                let want = format!("v{VERSION}");
                if pinned && !v.split_whitespace().any(|w| w == want) {
                    why.push(format!("{} is not {want}: {}", bin.display(), v.trim()));
                }
            }
        }
    }
    if !Path::new("/dev/fuse").exists() {
        why.push("/dev/fuse is missing (SOCI mounts lazy layers over FUSE)".into());
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why.join("; "))
    }
}

/// [`check`] in the harness's prerequisite style: true when SOCI can run;
/// otherwise prints why `test` is skipped and returns false, or panics when
/// `HYPERBOX_REQUIRE_ALL=1`.
pub fn require(test: &str) -> bool {
    match check() {
        Ok(()) => true,
        Err(why) if crate::prereq::require_all() => {
            panic!("{test}: prerequisite missing with HYPERBOX_REQUIRE_ALL=1: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// Errors of running SOCI.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or process operation failed.
    #[error("soci harness: {action}")]
    Io {
        /// What was being done.
        action: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` exited with {status}:\n{output}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its stdout and stderr.
        output: String,
    },
    /// The daemon did not answer on its socket in time.
    #[error("soci-snapshotter-grpc at {socket} not ready after {waited:?}: {why}; its log:\n{log}")]
    NotReady {
        /// Its socket.
        socket: PathBuf,
        /// How long we waited.
        waited: Duration,
        /// The last failure.
        why: String,
        /// The tail of its log.
        log: String,
    },
    /// Talking to containerd failed.
    #[error("soci harness: {action}")]
    Containerd {
        /// What was being done.
        action: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Something SOCI did not do as expected.
    #[error("soci harness: {0}")]
    Unexpected(String),
}

type Result<T> = std::result::Result<T, Error>;

/// `e` and its causes, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let action = action.into();
    move |source| Error::Io { action, source }
}

fn ctd<E: std::error::Error + Send + Sync + 'static>(
    action: impl Into<String>,
) -> impl FnOnce(E) -> Error {
    let action = action.into();
    move |e| Error::Containerd {
        action,
        source: Box::new(e),
    }
}

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct Options {
    /// SOCI's background fetcher: after `silence_period_msec` (30 s) without
    /// new mounts it downloads the rest of every lazy layer. On by default,
    /// as SOCI ships; a test that counts fetched bytes turns it off so the
    /// count cannot depend on timing.
    pub background_fetch: bool,
    /// Puts a [`NamespaceForwarder`] between containerd and the daemon that
    /// adds this containerd namespace to every call which lacks one. SOCI
    /// refuses a remote Prepare without a namespace, and Debian's
    /// containerd 1.7 does not pass it on to proxy plugins (see the module
    /// docs). By default set (to `default`, the API path's namespace) when
    /// the run's line ([`Line::selected`]) is 1.7. SOCI also reads the
    /// image's manifest from containerd's content store in that namespace,
    /// so pulls through CRI on 1.7 need `k8s.io` here (one namespace per
    /// daemon: the hop cannot tell which namespace a call came from).
    pub inject_namespace: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            background_fetch: true,
            inject_namespace: (Line::selected() == Line::V1_7)
                .then(|| crate::containerd::API_NAMESPACE.to_string()),
        }
    }
}

/// A running soci-snapshotter-grpc with its own directory: `config.toml`,
/// `root/`, `soci.sock`, `soci.log`. Stopped, unmounted and removed on drop.
#[derive(Debug)]
pub struct Soci {
    dir: PathBuf,
    child: Option<Child>,
    options: Options,
    forwarder: Option<NamespaceForwarder>,
}

/// Whether a mount is FUSE, the type SOCI mounts lazy layers with
/// (`fuse.rawBridge`).
fn is_fuse(fstype: &str) -> bool {
    fstype == "fuse" || fstype.starts_with("fuse.")
}

impl Soci {
    /// Starts the daemon with [`Options::default`] and waits for its socket.
    pub async fn start() -> Result<Soci> {
        Self::start_with(Options::default()).await
    }

    /// Starts the daemon with `options` and waits until it answers.
    pub async fn start_with(options: Options) -> Result<Soci> {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        // Instances of test processes that died without teardown (their
        // FUSE mounts, their daemon) must not pile up across runs.
        SWEPT.call_once(|| {
            crate::footprint::sweep_dead_owners("hb-soci-");
        });
        let dir =
            crate::footprint::owned_temp_dir("hb-soci-").map_err(io("create instance dir"))?;
        let mut soci = Soci {
            dir,
            child: None,
            options,
            forwarder: None,
        };
        fs::write(soci.config_path(), soci.config_toml()).map_err(io("write config.toml"))?;
        soci.spawn()?;
        soci.wait_ready(Duration::from_secs(30)).await?;
        if let Some(ns) = soci.options.inject_namespace.clone() {
            soci.forwarder = Some(
                NamespaceForwarder::start(
                    &soci.dir.join("containerd-facing.sock"),
                    &soci.daemon_address(),
                    &ns,
                )
                .await?,
            );
        }
        Ok(soci)
    }

    fn config_toml(&self) -> String {
        // metrics_address stays empty (no listener, so instances never
        // clash on a port); the content store is SOCI's own under the
        // root, so a restart with an empty root forgets every index and
        // zTOC it fetched. SOCI still reads image manifests from
        // containerd's content store, through `containerd_address`: a link
        // in our directory, pointed at the instance by `attach` (containerd
        // is started after us, with our socket in its config).
        format!(
            "metrics_address = \"\"\n\n\
             [content_store]\n  type = \"soci\"\n  containerd_address = \"{containerd}\"\n\n\
             [pull_modes.soci_v2]\n  enable = true\n\n\
             [background_fetch]\n  disable = {no_bg}\n\n\
             [snapshotter]\n  min_layer_size = 0\n",
            no_bg = !self.options.background_fetch,
            containerd = self.containerd_link().display(),
        )
    }

    /// The directory holding config, root, socket and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The daemon's root: snapshots, span cache, content store, metadata.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The socket containerd dials: the [`NamespaceForwarder`]'s when there
    /// is one, else the daemon's.
    pub fn address(&self) -> PathBuf {
        match &self.forwarder {
            Some(f) => f.address.clone(),
            None => self.daemon_address(),
        }
    }

    /// Where the daemon dials containerd: a symlink [`Soci::attach`] makes.
    fn containerd_link(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// Points the daemon at `containerd`'s socket (a symlink in our
    /// directory that its config names). SOCI reads the image manifest of
    /// each pull from containerd's content store; without this the link
    /// dangles and each image's first layer without a zTOC waits 10 s for
    /// the dial to time out, then is left to the client. Call it once
    /// containerd runs, before pulling.
    pub fn attach(&self, containerd: &Containerd) -> Result<()> {
        let link = self.containerd_link();
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(containerd.address(), &link)
            .map_err(io(format!("link {} to containerd", link.display())))
    }

    /// The daemon's own gRPC socket.
    pub fn daemon_address(&self) -> PathBuf {
        self.dir.join("soci.sock")
    }

    /// Its config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    /// Everything it logged (JSON lines).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("soci.log")).unwrap_or_default()
    }

    /// How many Prepares the daemon logged as served remotely (the layer
    /// mounted lazily over FUSE) and how many as not (the layer left to the
    /// client to download), over its whole log, restarts included. SOCI
    /// logs each remote attempt with `remote-snapshot-prepared`; a run whose
    /// second number grows where the first should is SOCI silently falling
    /// back to a full download.
    pub fn remote_prepares(&self) -> (usize, usize) {
        let log = self.log();
        let count = |v: &str| {
            let needle = format!("\"remote-snapshot-prepared\":\"{v}\"");
            log.lines().filter(|l| l.contains(&needle)).count()
        };
        (count("true"), count("false"))
    }

    /// The daemon's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The `[proxy_plugins.soci]` entry for containerd.
    pub fn proxy_plugin(&self) -> ProxyPlugin {
        ProxyPlugin::snapshotter(NAME, self.address(), self.root())
    }

    /// FUSE mounts under the root: one per layer SOCI serves lazily.
    pub fn fuse_mounts(&self) -> Vec<PathBuf> {
        let root = self.root();
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        info.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let sep = f.iter().position(|x| *x == "-")?;
                let point = PathBuf::from(f.get(4)?);
                (point.starts_with(&root) && is_fuse(f.get(sep + 1)?)).then_some(point)
            })
            .collect()
    }

    fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("soci.log"))
            .map_err(io("open soci.log"))?;
        let bin = daemon_bin();
        let child = Command::new(&bin)
            .arg("--config")
            .arg(self.config_path())
            .arg("--root")
            .arg(self.root())
            .arg("--address")
            .arg(self.daemon_address())
            // Each layer's lazy-or-not decision is logged at debug, which
            // `remote_prepares` reads.
            .args(["--log-level", "debug"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("dup log"))?)
            .stderr(log)
            .spawn()
            .map_err(io(format!("spawn {}", bin.display())))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the daemon answers a Walk on its socket (it creates the
    /// socket only once its snapshotter is set up).
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut why = String::from("socket not created");
        while start.elapsed() < timeout {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                why = format!("soci-snapshotter-grpc exited: {status}");
                break;
            }
            if self.daemon_address().exists() {
                match self.snapshots().await {
                    Ok(_) => return Ok(()),
                    Err(e) => why = chain(&e),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(Error::NotReady {
            socket: self.daemon_address(),
            waited: start.elapsed(),
            why,
            log: tail(&self.log(), 3000),
        })
    }

    /// Names of the snapshots the daemon holds, asked straight (not through
    /// containerd).
    pub async fn snapshots(&self) -> Result<Vec<String>> {
        let channel = containerd_client::connect(self.daemon_address())
            .await
            .map_err(ctd(format!("connect {}", self.daemon_address().display())))?;
        let listed = SnapshotsClient::new(channel)
            .list(ListSnapshotsRequest {
                snapshotter: NAME.into(),
                filters: Vec::new(),
            })
            .await;
        let mut stream = match listed {
            Ok(s) => s.into_inner(),
            // A daemon that has never held a snapshot has no bucket for
            // them yet, and says so instead of listing nothing.
            Err(s) if s.message().contains("bucket does not exist") => return Ok(Vec::new()),
            Err(s) => return Err(ctd("Snapshots.List")(s)),
        };
        let mut out = Vec::new();
        while let Some(batch) = stream.next().await {
            out.extend(
                batch
                    .map_err(ctd("Snapshots.List"))?
                    .info
                    .into_iter()
                    .map(|i| i.name),
            );
        }
        Ok(out)
    }

    /// Stops the daemon (SIGTERM; SIGKILL after 15 s) and unmounts what it
    /// left mounted under its root.
    pub fn stop(&mut self) {
        crate::procs::stop_child(&mut self.child, Signal::SIGTERM, "soci-snapshotter-grpc");
        // The daemon unmounts its FUSE layers on a clean exit, not when
        // killed; a detached unmount also frees mounts a dead daemon left
        // unreachable (ENOTCONN).
        for m in crate::footprint::mounts_under(&self.dir) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    /// Makes the next pull of `reference` cold, as far as containerd and
    /// SOCI go: deletes the image (default and `k8s.io` namespaces, CRI's
    /// record is the `k8s.io` one) and collects garbage, which removes
    /// SOCI's snapshots through containerd; then, since SOCI keeps fetched
    /// spans, the SOCI index and zTOCs under its root beyond the snapshots,
    /// stops the daemon, empties the root and starts it again. Containers
    /// using the image must be gone first.
    pub async fn forget_image(&mut self, containerd: &Containerd, reference: &str) -> Result<()> {
        let client = containerd.client().await.map_err(ctd("client"))?;
        for ns in [
            crate::containerd::API_NAMESPACE,
            crate::containerd::CRI_NAMESPACE,
        ] {
            let c = client.with_namespace(ns);
            c.delete_image(reference)
                .await
                .map_err(ctd(format!("delete {reference} in {ns}")))?;
            c.gc().await.map_err(ctd(format!("gc {ns}")))?;
        }
        // containerd removes backend snapshots in its collector, after the
        // call that asked for it has returned.
        let start = Instant::now();
        loop {
            let left = self.snapshots().await?;
            if left.is_empty() {
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                return Err(Error::Unexpected(format!(
                    "snapshots left in soci after gc: {left:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.restart_empty().await
    }

    /// Stops the daemon, removes its whole root (span cache, content store,
    /// metadata) and starts it again; containerd reconnects to it.
    async fn restart_empty(&mut self) -> Result<()> {
        self.stop();
        let root = self.root();
        if root.exists() {
            fs::remove_dir_all(&root).map_err(io(format!("remove {}", root.display())))?;
        }
        let _ = fs::remove_file(self.daemon_address());
        self.spawn()?;
        self.wait_ready(Duration::from_secs(30)).await?;
        // containerd redials a proxy plugin whose connection broke after
        // about a second of backoff.
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(())
    }

    /// Stops it and removes everything; returns what was left behind
    /// (should be nothing): mounts under its directory, the directory.
    pub fn shutdown(mut self) -> Vec<String> {
        self.teardown();
        let mut left: Vec<String> = crate::footprint::mounts_under(&self.dir)
            .into_iter()
            .map(|m| format!("mount {}", m.display()))
            .collect();
        if self.dir.exists() {
            left.push(format!("directory {}", self.dir.display()));
        }
        left
    }

    fn teardown(&mut self) {
        self.forwarder = None;
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A gRPC hop between containerd and soci-snapshotter-grpc that adds the
/// `containerd-namespace` header to calls which lack it, and passes
/// everything else through untouched (frames, trailers, errors).
///
/// Why: containerd sends a proxy plugin the namespace of each call only
/// through the gRPC server interceptor that upstream 1.7 chains with
/// go-grpc-middleware; Debian's 1.7.24 is built without that library and
/// that interceptor, so its calls reach a proxy plugin without namespace.
/// SOCI v0.16 takes the namespace from the call (earlier releases read it
/// from their config) and refuses a remote Prepare without one ("context
/// has no namespace attached"), so it cannot load lazily behind Debian's
/// containerd. containerd 2.x passes the namespace on; no hop is needed
/// there. The hop costs one local socket round trip per snapshotter call.
#[derive(Debug)]
pub struct NamespaceForwarder {
    address: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct AddNamespace {
    upstream: tonic::transport::Channel,
    namespace: tonic::codegen::http::HeaderValue,
}

impl tonic::server::NamedService for AddNamespace {
    const NAME: &'static str = "containerd.services.snapshots.v1.Snapshots";
}

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for AddNamespace {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        if !req.headers().contains_key("containerd-namespace") {
            req.headers_mut()
                .insert("containerd-namespace", self.namespace.clone());
        }
        let mut upstream = self.upstream.clone();
        Box::pin(async move {
            let ready = std::future::poll_fn(|cx| upstream.poll_ready(cx)).await;
            let answer = match ready {
                Ok(()) => upstream.call(req).await,
                Err(e) => Err(e),
            };
            Ok(match answer {
                Ok(resp) => resp,
                Err(e) => {
                    tonic::Status::unavailable(format!("soci-snapshotter-grpc: {e}")).into_http()
                }
            })
        })
    }
}

impl NamespaceForwarder {
    /// Listens on `address` and forwards to the daemon at `upstream`,
    /// adding `namespace` where a call has none.
    pub async fn start(address: &Path, upstream: &Path, namespace: &str) -> Result<Self> {
        let channel = containerd_client::connect(upstream)
            .await
            .map_err(ctd(format!("connect {}", upstream.display())))?;
        let namespace = namespace.parse().map_err(|_| {
            Error::Unexpected(format!("namespace {namespace:?} is no header value"))
        })?;
        let _ = fs::remove_file(address);
        let listener = tokio::net::UnixListener::bind(address)
            .map_err(io(format!("listen on {}", address.display())))?;
        let incoming = futures::stream::unfold(listener, |l| async move {
            let conn = l.accept().await.map(|(s, _)| s);
            Some((conn, l))
        });
        let service = AddNamespace {
            upstream: channel,
            namespace,
        };
        let task = tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
            {
                tracing::warn!(error = %e, "soci namespace forwarder stopped");
            }
        });
        Ok(NamespaceForwarder {
            address: address.into(),
            task,
        })
    }

    /// The socket containerd dials.
    pub fn address(&self) -> &Path {
        &self.address
    }
}

impl Drop for NamespaceForwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Drop for Soci {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "soci-snapshotter-grpc log tail ({}):\n{}",
                self.dir.display(),
                tail(&self.log(), 3000)
            );
        }
        self.teardown();
    }
}

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Layers smaller than this (compressed bytes) get no zTOC and are
    /// downloaded whole at pull (`--min-layer-size`, 10 MiB in SOCI).
    pub min_layer_size: u64,
    /// Bytes of uncompressed layer per span, SOCI's unit of fetching
    /// (`--span-size`); SOCI's default (4 MiB) when `None`.
    pub span_size: Option<u64>,
}

impl ConvertOptions {
    /// SOCI's defaults except `min_layer_size`.
    pub fn min_layer_size(min_layer_size: u64) -> Self {
        ConvertOptions {
            min_layer_size,
            span_size: None,
        }
    }
}

/// What [`convert`] made.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The SOCI-enabled image in the registry (`host:port/repo:tag`).
    pub reference: String,
    /// `(layer digest, zTOC digest)` of every layer that got a zTOC, as
    /// `soci convert` printed them: the layers SOCI can load lazily.
    pub ztocs: Vec<(String, String)>,
    /// What `soci convert` printed, skipped layers included.
    pub output: String,
}

/// `ctr` of `line`, for pushing.
fn ctr_bin(line: Line) -> PathBuf {
    match line {
        Line::V1_7 => PathBuf::from("/usr/bin/ctr"),
        Line::V2 => crate::gobin::ctr(),
    }
}

/// Runs `cmd` to completion off the async runtime; its stdout.
async fn run(mut cmd: Command) -> Result<String> {
    let command = crate::tools::describe(&cmd);
    tracing::debug!(%command, "running");
    cmd.stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .map_err(|e| Error::Unexpected(format!("{command}: {e}")))?
        .map_err(io(format!("run {command}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Failed {
            command,
            status: out.status,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }
}

/// Turns `source` (an image in a plain-HTTP registry, `host:port/repo:tag`)
/// into a SOCI-enabled image pushed as `target` (same form), the way a user
/// does with `nerdctl pull`, `soci convert` and `nerdctl push`:
///
/// 1. the harness's client pulls `source` into `containerd`'s content store
///    (and unpacks it into overlayfs; `soci convert` reads the layer blobs
///    from containerd's content store, through its image record);
/// 2. `soci --address <containerd> --root <scratch> convert --min-layer-size
///    N [--span-size S] source target` builds a zTOC per layer of at least N
///    bytes and stores the SOCI index manifest v2 image in containerd as
///    `target`; its artifacts database goes to a scratch root, not the
///    host's `/var/lib/soci-snapshotter-grpc`;
/// 3. `ctr images push --plain-http target` pushes the index, both
///    manifests, the zTOCs and the layers;
/// 4. both images are deleted from containerd and garbage is collected, so
///    the next pull of `target` starts from nothing.
///
/// Fails when no layer got a zTOC (`soci convert` refuses then anyway).
pub async fn convert(
    containerd: &Containerd,
    source: &str,
    target: &str,
    options: &ConvertOptions,
) -> Result<Converted> {
    let client = containerd.client().await.map_err(ctd("client"))?;
    client
        .pull(source, &PullOptions::local("overlayfs"))
        .await
        .map_err(ctd(format!("pull {source} for soci convert")))?;
    let scratch = tempfile::Builder::new()
        .prefix("soci-cli-")
        .tempdir_in(containerd.dir())
        .map_err(io("create a root for the soci CLI"))?;
    let mut cmd = Command::new(cli_bin());
    cmd.arg("--address")
        .arg(containerd.address())
        .arg("--namespace")
        .arg(crate::containerd::API_NAMESPACE)
        .arg("--root")
        .arg(scratch.path())
        .arg("convert")
        .arg("--min-layer-size")
        .arg(options.min_layer_size.to_string());
    if let Some(span) = options.span_size {
        cmd.arg("--span-size").arg(span.to_string());
    }
    cmd.arg(source).arg(target);
    let converted = run(cmd).await;
    let pushed = match &converted {
        Ok(_) => {
            let mut push = Command::new(ctr_bin(containerd.line()));
            push.arg("--address")
                .arg(containerd.address())
                .arg("--namespace")
                .arg(crate::containerd::API_NAMESPACE)
                .args(["images", "push", "--plain-http"])
                .arg(target);
            run(push).await.map(drop)
        }
        Err(_) => Ok(()),
    };
    // Whatever happened, containerd is left without either image.
    for name in [source, target] {
        client
            .delete_image(name)
            .await
            .map_err(ctd(format!("delete {name}")))?;
    }
    client.gc().await.map_err(ctd("gc"))?;
    let output = converted?;
    pushed?;
    let ztocs: Vec<(String, String)> = output
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("layer ")?;
            let (layer, ztoc) = rest.split_once(" -> ztoc ")?;
            let ztoc = ztoc.split_whitespace().next()?;
            Some((layer.to_string(), ztoc.to_string()))
        })
        .collect();
    if ztocs.is_empty() {
        return Err(Error::Unexpected(format!(
            "soci convert made no zTOC for {source}:\n{output}"
        )));
    }
    Ok(Converted {
        reference: target.into(),
        ztocs,
        output,
    })
}
