//! A private containerd per test: its own root, state, gRPC and NRI sockets,
//! runc root and cgroup prefix, with a config generated for the test.
//!
//! Two release lines are supported ([`Line`]): 1.7 (Debian's
//! `/usr/bin/containerd`, config version 2) and 2.x (built by
//! `scripts/install-deps.sh` into [`crate::gobin`], config version 3, where
//! CRI is split into the `io.containerd.cri.v1.images`,
//! `io.containerd.cri.v1.runtime` and `io.containerd.grpc.v1.cri` plugins).
//! `HYPERBOX_CONTAINERD_LINE` (`1.7`, the default, or `2`) picks the line for
//! every instance of a test run, so the same tests run on both. On 2.x the
//! transfer service (`ctr image pull`) is also told to unpack into the proxy
//! snapshotters, with their remote-snapshot labels.
//!
//! The config enables NRI on the instance's own socket and plugin dirs, and
//! CRI with `disable_snapshot_annotations = false` (so CRI sends the snapshot
//! labels a remote snapshotter needs) and `restrict_oom_score_adj = true` (the
//! machines lack CAP_SYS_RESOURCE). Hooks add proxy snapshotters, runtimes and
//! plain-HTTP registries.
//!
//! Dropping the instance tears everything down from the host's view (see
//! [`crate::footprint`]), so a panicking test leaves nothing behind either.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::client::Client;
use crate::cri::Cri;
use crate::footprint::{Extra, Footprint};
use crate::registry::tail;

/// The namespace API-path containers use (`ctr`'s default).
pub const API_NAMESPACE: &str = "default";
/// The namespace CRI uses.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// Selects the containerd line of a test run: `1.7` (default) or `2`.
pub const LINE_ENV: &str = "HYPERBOX_CONTAINERD_LINE";

/// Debian's containerd 1.7 (package `containerd`, see `scripts/install-deps.sh`).
pub const CONTAINERD_1_7: &str = "/usr/bin/containerd";

/// A containerd release line, with what differs between them: the binary, its
/// shim, and the config schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Line {
    /// containerd 1.7.x: config version 2, CRI in one plugin.
    V1_7,
    /// containerd 2.x: config version 3, CRI split in three plugins.
    V2,
}

impl Line {
    /// Both lines, oldest first.
    pub const ALL: [Line; 2] = [Line::V1_7, Line::V2];

    /// The line `HYPERBOX_CONTAINERD_LINE` names, or why its value is not one.
    pub fn from_env() -> std::result::Result<Line, String> {
        match std::env::var(LINE_ENV) {
            Err(std::env::VarError::NotPresent) => Ok(Line::V1_7),
            Ok(v) => match v.trim() {
                "" | "1.7" => Ok(Line::V1_7),
                "2" | "2.x" => Ok(Line::V2),
                other => Err(format!("{LINE_ENV}={other:?}: expected \"1.7\" or \"2\"")),
            },
            Err(e) => Err(format!("{LINE_ENV}: {e}")),
        }
    }

    /// The line of this test run. A value of `HYPERBOX_CONTAINERD_LINE` that
    /// names no line panics: a typo must not quietly test the other line.
    pub fn selected() -> Line {
        Line::from_env().unwrap_or_else(|e| panic!("{e}"))
    }

    /// The containerd daemon of this line.
    pub fn binary(self) -> PathBuf {
        match self {
            Line::V1_7 => PathBuf::from(CONTAINERD_1_7),
            Line::V2 => crate::gobin::containerd(),
        }
    }

    /// A directory to put first on the daemon's `PATH` so that it starts its
    /// own line's `containerd-shim-runc-v2`, not the one in `/usr/bin`.
    pub fn bin_dir(self) -> Option<PathBuf> {
        match self {
            Line::V1_7 => None,
            Line::V2 => Some(crate::gobin::containerd_dir()),
        }
    }

    /// The config `version` the harness writes for this line.
    pub fn config_version(self) -> u32 {
        match self {
            Line::V1_7 => 2,
            Line::V2 => 3,
        }
    }

    /// What `containerd --version` prints for this line's release.
    pub fn release(self) -> &'static str {
        match self {
            Line::V1_7 => "1.7",
            Line::V2 => crate::gobin::CONTAINERD_VERSION,
        }
    }
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Line::V1_7 => "containerd 1.7",
            Line::V2 => "containerd 2.x",
        })
    }
}

/// Errors of starting or stopping containerd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or process operation failed.
    #[error("containerd harness: {action}")]
    Io {
        /// What was being done.
        action: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// containerd did not become ready.
    #[error("containerd at {socket} not ready after {waited:?}: {why}; its log:\n{log}")]
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
    /// A client could not be made.
    #[error("containerd harness: client")]
    Client(#[source] Box<crate::client::Error>),
}

type Result<T> = std::result::Result<T, Error>;

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let action = action.into();
    move |source| Error::Io { action, source }
}

/// Once per test process: tear down instances of test processes that died
/// without their teardown, so an aborted run does not leak into the next.
fn sweep_once() {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        for dir in crate::footprint::sweep_dead_owners("hb-ctd-") {
            tracing::warn!(dir = %dir.display(), "removed an instance left by a dead test process");
        }
        for prefix in ["hb-snap-", "hb-registry-", "hb-images-", "hb-agent-"] {
            crate::footprint::sweep_dead_owners(prefix);
        }
    });
}

/// A `[proxy_plugins]` entry.
#[derive(Debug, Clone)]
pub struct ProxyPlugin {
    /// Plugin name (`hyperbox`), used as the snapshotter name.
    pub name: String,
    /// Plugin type: `snapshot` or `content`.
    pub kind: String,
    /// Its gRPC socket.
    pub address: PathBuf,
    /// `exports.root`, so the kubelet can account the plugin's disk.
    pub root: Option<PathBuf>,
}

impl ProxyPlugin {
    /// A proxy snapshotter `name` at `address`, exporting `root`.
    pub fn snapshotter(name: &str, address: PathBuf, root: PathBuf) -> Self {
        ProxyPlugin {
            name: name.into(),
            kind: "snapshot".into(),
            address,
            root: Some(root),
        }
    }
}

/// An extra runtime, for the API path and as a CRI runtime handler.
#[derive(Debug, Clone)]
pub struct RuntimeEntry {
    /// CRI runtime handler name.
    pub name: String,
    /// Runtime type, e.g. `io.containerd.hyperbox.v1`.
    pub runtime_type: String,
    /// Explicit shim binary; containerd looks it up on `PATH` otherwise.
    pub path: Option<PathBuf>,
}

/// How to configure the instance.
#[derive(Debug, Clone, Default)]
pub struct Builder {
    proxy_plugins: Vec<ProxyPlugin>,
    runtimes: Vec<RuntimeEntry>,
    registries: Vec<String>,
    sandbox_image: Option<String>,
    cri_snapshotter: Option<String>,
    no_cri: bool,
    no_nri: bool,
    nri_plugins: Vec<NriPlugin>,
    line: Option<Line>,
    erofs: bool,
}

/// A pre-registered NRI plugin: an executable containerd launches from its
/// plugin dir at start, with an optional conf.d file it passes in Configure.
#[derive(Debug, Clone)]
pub struct NriPlugin {
    /// `NN-name`, the file name in the plugin dir (index and name).
    pub file_name: String,
    /// The executable's content (a script that execs the real binary).
    pub script: String,
    /// The `NN-name.conf` content, if any.
    pub config: Option<String>,
}

impl Builder {
    /// Adds a proxy plugin.
    pub fn proxy_plugin(mut self, p: ProxyPlugin) -> Self {
        self.proxy_plugins.push(p);
        self
    }

    /// Adds a runtime.
    pub fn runtime(mut self, r: RuntimeEntry) -> Self {
        self.runtimes.push(r);
        self
    }

    /// Lets CRI pull from `host:port` over plain HTTP.
    pub fn plain_http_registry(mut self, host: &str) -> Self {
        self.registries.push(host.into());
        self
    }

    /// The pause image CRI runs for sandboxes.
    pub fn sandbox_image(mut self, reference: &str) -> Self {
        self.sandbox_image = Some(reference.into());
        self
    }

    /// The snapshotter CRI uses (default `overlayfs`).
    pub fn cri_snapshotter(mut self, name: &str) -> Self {
        self.cri_snapshotter = Some(name.into());
        self
    }

    /// Disables the CRI plugin (starts faster when a test does not need it).
    pub fn without_cri(mut self) -> Self {
        self.no_cri = true;
        self
    }

    /// Installs a pre-registered NRI plugin before containerd starts.
    pub fn nri_plugin(mut self, p: NriPlugin) -> Self {
        self.nri_plugins.push(p);
        self
    }

    /// Disables NRI.
    pub fn without_nri(mut self) -> Self {
        self.no_nri = true;
        self
    }

    /// Runs this line instead of the one `HYPERBOX_CONTAINERD_LINE` selects.
    pub fn line(mut self, line: Line) -> Self {
        self.line = Some(line);
        self
    }

    /// Unpacks into containerd 2.x's own `erofs` snapshotter too, as a peer
    /// to compare hyperbox with: the transfer service (`ctr image pull`)
    /// may unpack into it, containerd runs [`erofs_utils_bin`]'s
    /// `mkfs.erofs` where installed, and where that can read a tar
    /// ([`erofs_differ_available`]) the `erofs` differ comes first in the
    /// diff service, so CRI's and the API's pulls convert each layer tar
    /// straight into an EROFS blob. Without it the walking differ unpacks
    /// into the snapshot's directory and the snapshotter converts that with
    /// `mkfs.erofs` at Commit. Combine with `cri_snapshotter("erofs")` for
    /// CRI. Starting 1.7 with it panics: 1.7 has no such snapshotter.
    pub fn erofs_snapshotter(mut self) -> Self {
        self.erofs = true;
        self
    }

    /// Starts containerd and waits until it answers.
    pub async fn start(mut self) -> Result<Containerd> {
        // Fixed once, so a restart runs the same line whatever the env says.
        self.line = Some(self.line.unwrap_or_else(Line::selected));
        assert!(
            !(self.erofs && self.line == Some(Line::V1_7)),
            "erofs_snapshotter needs containerd 2.x (Builder::line(Line::V2) or {LINE_ENV}=2): \
             containerd 1.7 has no erofs snapshotter"
        );
        crate::procs::become_subreaper();
        sweep_once();
        let dir = crate::footprint::owned_temp_dir("hb-ctd-").map_err(io("create instance dir"))?;
        let id = format!("{:08x}", rand::random::<u32>());
        let c = Containerd {
            footprint: Footprint {
                address: dir.join("containerd.sock"),
                cgroup_prefix: format!("/hyperbox-test-{id}"),
                bridge: format!("hb{id}"),
                extra: Arc::new(Mutex::new(Extra::default())),
                dir,
            },
            builder: self,
            child: None,
            torn_down: false,
        };
        c.write_config()?;
        let mut c = c;
        c.spawn()?;
        c.wait_ready(Duration::from_secs(60)).await?;
        Ok(c)
    }
}

/// A running private containerd; torn down on drop.
#[derive(Debug)]
pub struct Containerd {
    footprint: Footprint,
    builder: Builder,
    child: Option<Child>,
    torn_down: bool,
}

impl Containerd {
    /// A builder with NRI and CRI on and no extra plugins.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The release line this instance runs, so a test can state what differs.
    pub fn line(&self) -> Line {
        self.builder.line.unwrap_or_else(Line::selected)
    }

    /// The instance's private directory.
    pub fn dir(&self) -> &Path {
        &self.footprint.dir
    }

    /// containerd's gRPC socket.
    pub fn address(&self) -> &Path {
        &self.footprint.address
    }

    /// The NRI socket external plugins dial.
    pub fn nri_socket(&self) -> PathBuf {
        self.dir().join("nri/nri.sock")
    }

    /// Where pre-registered NRI plugins are installed (`NN-name`).
    pub fn nri_plugin_dir(&self) -> PathBuf {
        self.dir().join("nri/plugins")
    }

    /// Where pre-registered NRI plugins' configs are read from.
    pub fn nri_conf_dir(&self) -> PathBuf {
        self.dir().join("nri/conf.d")
    }

    /// The cgroup parent of this instance's containers.
    pub fn cgroup_prefix(&self) -> &str {
        &self.footprint.cgroup_prefix
    }

    /// The host bridge of this instance's CNI pods.
    pub fn bridge_name(&self) -> String {
        self.footprint.bridge.clone()
    }

    /// What the instance owns on the host, for leak checks.
    pub fn footprint(&self) -> Footprint {
        self.footprint.clone()
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir().join("containerd.log")).unwrap_or_default()
    }

    /// A client of the containerd API in the `default` namespace.
    pub async fn client(&self) -> Result<Client> {
        Client::connect(
            self.address(),
            API_NAMESPACE,
            self.cgroup_prefix(),
            &self.dir().join("io"),
            &self.dir().join("runc"),
        )
        .await
        .map_err(|e| Error::Client(Box::new(e)))
    }

    /// A CRI client, as the kubelet uses it.
    pub async fn cri(&self) -> Result<Cri> {
        Cri::connect(self)
            .await
            .map_err(|e| Error::Client(Box::new(e)))
    }

    fn write_config(&self) -> Result<()> {
        let d = self.dir();
        for sub in [
            "root",
            "state",
            "nri/plugins",
            "nri/conf.d",
            "cni/net.d",
            "certs.d",
            "opt",
            "io",
            "runc",
            "cdi",
        ] {
            fs::create_dir_all(d.join(sub)).map_err(io(format!("create {sub}")))?;
        }
        for p in &self.builder.nri_plugins {
            use std::os::unix::fs::PermissionsExt;
            let exe = d.join("nri/plugins").join(&p.file_name);
            fs::write(&exe, &p.script).map_err(io(format!("write {}", exe.display())))?;
            fs::set_permissions(&exe, fs::Permissions::from_mode(0o755))
                .map_err(io(format!("chmod {}", exe.display())))?;
            if let Some(conf) = &p.config {
                let f = d.join("nri/conf.d").join(format!("{}.conf", p.file_name));
                fs::write(&f, conf).map_err(io(format!("write {}", f.display())))?;
            }
        }
        // A pod network that reaches nothing beyond the machine: a bridge of
        // the instance's own with no gateway, no masquerading (so no host
        // forwarding sysctl is touched) and IPv6 unique-local addresses whose
        // allocations live in the instance directory.
        let cni = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "hyperbox-test",
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge_name(),
                "isGateway": false,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "fd68:6278:0:1::/64"}]],
                    "dataDir": d.join("cni/ipam").to_string_lossy(),
                },
            }],
        });
        fs::write(
            d.join("cni/net.d/10-hyperbox-test.conflist"),
            cni.to_string(),
        )
        .map_err(io("write CNI config"))?;
        for host in &self.builder.registries {
            let hd = d.join("certs.d").join(host);
            fs::create_dir_all(&hd).map_err(io("create certs.d host dir"))?;
            fs::write(
                hd.join("hosts.toml"),
                format!(
                    "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
                ),
            )
            .map_err(io("write hosts.toml"))?;
        }
        fs::write(
            self.shim_config_path(),
            format!(
                "[agent]\naddress = \"{}\"\n{}",
                d.join("no-agent.sock").display(),
                self.shim_section()
            ),
        )
        .map_err(io("write the shim's config"))?;
        fs::write(d.join("config.toml"), self.config_toml()).map_err(io("write config.toml"))
    }

    fn config_toml(&self) -> String {
        let d = self.dir().display().to_string();
        let b = &self.builder;
        let line = self.line();
        let mut disabled = vec![
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.tracing.processor.v1.otlp",
            "io.containerd.internal.v1.tracing",
        ];
        // 2.x has no aufs plugin; it would ignore the id silently, but the
        // config should name only what exists.
        if line == Line::V1_7 {
            disabled.push("io.containerd.snapshotter.v1.aufs");
        }
        if b.no_cri {
            disabled.push("io.containerd.grpc.v1.cri");
        }
        let mut s = String::new();
        let _ = writeln!(s, "version = {}", line.config_version());
        let _ = writeln!(s, "root = \"{d}/root\"\nstate = \"{d}/state\"");
        let _ = writeln!(s, "disabled_plugins = {disabled:?}");
        // 2.4 reads these from the server plugins of config version 4 and
        // migrates a version 3 file's top-level sections (with a warning).
        let _ = writeln!(s, "\n[grpc]\n  address = \"{d}/containerd.sock\"");
        let _ = writeln!(s, "\n[ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"");
        let _ = writeln!(s, "\n[debug]\n  level = \"info\"");
        let _ = writeln!(
            s,
            "\n[plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\""
        );
        let _ = writeln!(
            s,
            "\n[plugins.\"io.containerd.nri.v1.nri\"]\n  disable = {}\n  disable_connections = false\n  socket_path = \"{d}/nri/nri.sock\"\n  plugin_path = \"{d}/nri/plugins\"\n  plugin_config_path = \"{d}/nri/conf.d\"\n  plugin_registration_timeout = \"5s\"\n  plugin_request_timeout = \"2s\"",
            b.no_nri
        );
        match line {
            Line::V1_7 if !b.no_cri => self.cri_config_v2(&mut s),
            Line::V1_7 => {}
            // The images and runtime plugins load even with the CRI service
            // disabled, so they always get the instance's own paths.
            Line::V2 => self.cri_config_v3(&mut s),
        }
        for p in &b.proxy_plugins {
            let _ = writeln!(
                s,
                "\n[proxy_plugins.{}]\n  type = \"{}\"\n  address = \"{}\"",
                p.name,
                p.kind,
                p.address.display()
            );
            // 2.x's transfer service (`ctr image pull`) sends a snapshotter
            // the remote-snapshot labels only when its exports ask for them.
            let remote_labels = line == Line::V2 && p.kind == "snapshot";
            if p.root.is_some() || remote_labels {
                let _ = writeln!(s, "  [proxy_plugins.{}.exports]", p.name);
            }
            if let Some(root) = &p.root {
                let _ = writeln!(s, "    root = \"{}\"", root.display());
            }
            if remote_labels {
                let _ = writeln!(s, "    enable_remote_snapshot_annotations = \"true\"");
            }
        }
        if line == Line::V2 {
            self.transfer_unpack_config(&mut s);
            if b.erofs {
                erofs_config(&mut s);
            }
        }
        s
    }

    /// 2.x's transfer service unpacks only into the snapshotters listed in
    /// its `unpack_config` (overlayfs, and erofs where it loads, by
    /// default); `ctr image pull --snapshotter X` fails with "no unpack
    /// platforms defined" for any other. The list replaces the default, so
    /// overlayfs is listed again next to the proxy snapshotters (and erofs,
    /// see [`Builder::erofs_snapshotter`]).
    fn transfer_unpack_config(&self, s: &mut String) {
        let snapshotters = std::iter::once(("overlayfs", "walking")).chain(
            self.builder
                .proxy_plugins
                .iter()
                .filter(|p| p.kind == "snapshot")
                .map(|p| (p.name.as_str(), "walking")),
        );
        // Naming a differ that did not load fails the transfer plugin.
        let erofs = self.builder.erofs.then(|| {
            let differ = if erofs_differ_available() {
                "erofs"
            } else {
                "walking"
            };
            ("erofs", differ)
        });
        for (name, differ) in snapshotters.chain(erofs) {
            let _ = writeln!(
                s,
                "\n[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n  platform = \"linux\"\n  snapshotter = \"{name}\"\n  differ = \"{differ}\""
            );
        }
    }

    /// The extra runtimes, as entries under `{table}.runtimes`.
    fn runtime_entries(&self, s: &mut String, table: &str) {
        let d = self.dir().display().to_string();
        let _ = writeln!(
            s,
            "\n[{table}.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n  [{table}.runtimes.runc.options]\n    Root = \"{d}/runc\"\n    SystemdCgroup = false"
        );
        for r in &self.builder.runtimes {
            let _ = writeln!(
                s,
                "\n[{table}.runtimes.{}]\n  runtime_type = \"{}\"",
                r.name, r.runtime_type
            );
            if let Some(p) = &r.path {
                let _ = writeln!(s, "  runtime_path = \"{}\"", p.display());
            }
        }
        // hyperbox's shim, with its config passed as CRI passes it to a
        // runtime type it does not know (runtimeoptions' ConfigPath).
        let _ = writeln!(
            s,
            "\n[{table}.runtimes.{h}]\n  runtime_type = \"{t}\"\n  [{table}.runtimes.{h}.options]\n    ConfigPath = \"{c}\"",
            h = crate::shim::HYPERBOX_HANDLER,
            t = crate::shim::HYPERBOX_RUNTIME,
            c = self.shim_config_path().display()
        );
    }

    /// The hyperbox config the shim reads (`HYPERBOX_CONFIG` and the CRI
    /// runtime options point here). It starts out naming an agent socket
    /// in the instance directory that nobody serves, so the shim runs
    /// containers without policies; [`Containerd::use_agent`] points it at
    /// a test's agent.
    pub fn shim_config_path(&self) -> PathBuf {
        self.dir().join("hyperbox-shim.toml")
    }

    /// Points the shim at `agent_config` (a hyperbox config file, the
    /// agent's own): later containers get that agent's policies.
    pub fn use_agent(&self, agent_config: &Path) -> Result<()> {
        let mut text = fs::read_to_string(agent_config).map_err(io("read the agent's config"))?;
        text.push_str(&self.shim_section());
        fs::write(self.shim_config_path(), text).map_err(io("write the shim's config"))
    }

    /// The shim's `[shim]` section: runc's state in the instance directory
    /// for every namespace (CRI passes no runc root to a runtime type it
    /// does not know), as the harness's runc-v2 runtime has it.
    fn shim_section(&self) -> String {
        let mut s = format!(
            "\n[shim]\nroot = \"{}\"\n",
            self.dir().join("runc").display()
        );
        // An agent on a guest's emulated CPUs can take longer than the
        // default 200 ms to decide, and the tests check its decision.
        if crate::vm::inside() {
            s.push_str("agent_timeout_ms = 5000\n");
        }
        s
    }

    /// CRI in config version 2 (1.7): one plugin, `io.containerd.grpc.v1.cri`.
    fn cri_config_v2(&self, s: &mut String) {
        let d = self.dir().display().to_string();
        let b = &self.builder;
        let snap = b.cri_snapshotter.as_deref().unwrap_or("overlayfs");
        let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
        let _ = writeln!(s, "\n[{cri}]");
        if let Some(img) = &b.sandbox_image {
            let _ = writeln!(s, "  sandbox_image = \"{img}\"");
        }
        let _ = writeln!(
            s,
            "  restrict_oom_score_adj = true\n  stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n  enable_cdi = false"
        );
        let _ = writeln!(
            s,
            "\n[{cri}.containerd]\n  snapshotter = \"{snap}\"\n  default_runtime_name = \"{handler}\"\n  disable_snapshot_annotations = false",
            handler = crate::shim::Shim::selected().handler()
        );
        self.runtime_entries(s, &format!("{cri}.containerd"));
        let _ = writeln!(
            s,
            "\n[{cri}.cni]\n  bin_dir = \"/usr/lib/cni\"\n  conf_dir = \"{d}/cni/net.d\""
        );
        let _ = writeln!(s, "\n[{cri}.registry]\n  config_path = \"{d}/certs.d\"");
    }

    /// CRI in config version 3 (2.x): image service, runtime service and the
    /// gRPC/streaming server are separate plugins.
    fn cri_config_v3(&self, s: &mut String) {
        let d = self.dir().display().to_string();
        let b = &self.builder;
        let snap = b.cri_snapshotter.as_deref().unwrap_or("overlayfs");
        let images = "plugins.\"io.containerd.cri.v1.images\"";
        let _ = writeln!(
            s,
            "\n[{images}]\n  snapshotter = \"{snap}\"\n  disable_snapshot_annotations = false"
        );
        if let Some(img) = &b.sandbox_image {
            let _ = writeln!(s, "\n[{images}.pinned_images]\n  sandbox = \"{img}\"");
        }
        let _ = writeln!(s, "\n[{images}.registry]\n  config_path = \"{d}/certs.d\"");
        // CDI cannot be turned off in 2.x; point it at an empty dir of the
        // instance so host CDI specs do not leak into tests.
        let runtime = "plugins.\"io.containerd.cri.v1.runtime\"";
        let _ = writeln!(
            s,
            "\n[{runtime}]\n  restrict_oom_score_adj = true\n  cdi_spec_dirs = [\"{d}/cdi\"]"
        );
        let _ = writeln!(
            s,
            "\n[{runtime}.containerd]\n  default_runtime_name = \"{}\"",
            crate::shim::Shim::selected().handler()
        );
        self.runtime_entries(s, &format!("{runtime}.containerd"));
        let _ = writeln!(
            s,
            "\n[{runtime}.cni]\n  bin_dirs = [\"/usr/lib/cni\"]\n  conf_dir = \"{d}/cni/net.d\""
        );
        let _ = writeln!(
            s,
            "\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\""
        );
        // The transfer service (`ctr image pull`) reads registry hosts from
        // its own config_path in 2.x.
        let _ = writeln!(
            s,
            "\n[plugins.\"io.containerd.transfer.v1.local\"]\n  config_path = \"{d}/certs.d\""
        );
    }

    fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir().join("containerd.log"))
            .map_err(io("open containerd.log"))?;
        let line = self.line();
        let binary = line.binary();
        let mut cmd = Command::new(&binary);
        let first: Vec<PathBuf> = line
            .bin_dir()
            .into_iter()
            .chain(self.builder.erofs.then(erofs_utils_bin).flatten())
            .chain(std::iter::once(crate::shim::hyperbox_shim_dir()))
            .collect();
        if !first.is_empty() {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let path = std::env::join_paths(first.into_iter().chain(std::env::split_paths(&path)))
                .map_err(|e| Error::Io {
                    action: "build PATH for containerd".into(),
                    source: std::io::Error::other(e),
                })?;
            cmd.env("PATH", path);
        }
        // Shims inherit containerd's environment: hyperbox's reads its
        // config from here when the runtime options name none.
        cmd.env("HYPERBOX_CONFIG", self.shim_config_path());
        let child = cmd
            .arg("--config")
            .arg(self.dir().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("dup log"))?)
            .stderr(log)
            .spawn()
            .map_err(io(format!("spawn {} ({line})", binary.display())))?;
        self.child = Some(child);
        Ok(())
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut why = String::from("socket not created");
        while start.elapsed() < timeout {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                why = format!("containerd exited: {status}");
                break;
            }
            if self.address().exists() {
                match self.client().await {
                    Ok(c) => match c.version().await {
                        Ok(_) if self.builder.no_cri => return Ok(()),
                        Ok(_) => match self.cri().await {
                            Ok(cri) => match cri.ready().await {
                                Ok(()) => return Ok(()),
                                Err(e) => why = format!("CRI not ready: {e}"),
                            },
                            Err(e) => why = e.to_string(),
                        },
                        Err(e) => why = e.to_string(),
                    },
                    Err(e) => why = e.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(Error::NotReady {
            socket: self.address().into(),
            waited: start.elapsed(),
            why,
            log: tail(&self.log(), 4000),
        })
    }

    /// The containerd daemon's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills containerd with `signal` (shims and containers keep running, as
    /// in production), and waits for it to exit.
    pub fn kill_daemon(&mut self, signal: Signal) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }

    /// Stops containerd (SIGTERM) and starts it again with the same config
    /// and state, as a service manager would.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill_daemon(Signal::SIGTERM);
        let _ = fs::remove_file(self.address());
        self.spawn()?;
        self.wait_ready(Duration::from_secs(60)).await
    }

    /// Tears the instance down now and returns its footprint, so the caller
    /// can assert that [`Footprint::leaks`] is empty.
    pub fn shutdown(mut self) -> Footprint {
        self.teardown();
        self.footprint.clone()
    }

    fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        self.footprint.kill_shims();
        self.kill_daemon(Signal::SIGTERM);
        // containerd's own short-lived children (shim `delete` calls) are
        // orphaned to us when it exits.
        self.footprint.kill_shims();
        self.footprint.remove_all();
    }
}

/// The erofs-utils release `scripts/install-deps.sh` builds from Debian 13's
/// source package for containerd's erofs differ (Debian 12's 1.5 cannot read
/// a tar; Debian 13's binary needs its newer libc).
pub const EROFS_UTILS_VERSION: &str = "1.8.6";
/// Moves that build (default `/var/cache/hyperbox/erofs-utils-<version>`).
pub const EROFS_UTILS_ENV: &str = "HYPERBOX_EROFS_UTILS";

/// The directory holding that build's `mkfs.erofs`, when it is installed.
/// [`Builder::erofs_snapshotter`] puts it first on containerd's `PATH`; the
/// rest of the machine keeps the system's erofs-utils.
pub fn erofs_utils_bin() -> Option<PathBuf> {
    let root = std::env::var_os(EROFS_UTILS_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(format!(
                "/var/cache/hyperbox/erofs-utils-{EROFS_UTILS_VERSION}"
            ))
        });
    let bin = root.join("usr/bin");
    bin.join("mkfs.erofs").is_file().then_some(bin)
}

/// `mkfs.erofs --help` of the `mkfs.erofs` an erofs-enabled containerd runs:
/// [`erofs_utils_bin`]'s, else the system's. Empty when there is none. Asked
/// once per process: every config render needs it.
fn mkfs_erofs_help() -> &'static str {
    static HELP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HELP.get_or_init(|| {
        let mkfs =
            erofs_utils_bin().map_or_else(|| PathBuf::from("mkfs.erofs"), |d| d.join("mkfs.erofs"));
        Command::new(mkfs)
            .arg("--help")
            .output()
            .map(|o| String::from_utf8_lossy(&[o.stdout, o.stderr].concat()).into_owned())
            .unwrap_or_default()
    })
}

/// Whether containerd 2.x's `erofs` differ loads in an instance with
/// [`Builder::erofs_snapshotter`]: it needs `mkfs.erofs` with tar input
/// (erofs-utils 1.7 or newer; Debian 12 has 1.5), and containerd decides by
/// whether `mkfs.erofs --help` lists `--tar=`, as asked here.
pub fn erofs_differ_available() -> bool {
    mkfs_erofs_help().contains("--tar=")
}

/// The config of [`Builder::erofs_snapshotter`] beyond the transfer
/// service's unpack list. The snapshotter itself needs none: it is built into
/// 2.x, loads wherever the kernel has EROFS, and keeps its blobs under the
/// instance's root.
fn erofs_config(s: &mut String) {
    let help = mkfs_erofs_help();
    if !help.contains("--tar=") {
        return;
    }
    // The diff service tries its differs in this order; the erofs differ
    // answers "not implemented" for any snapshot the erofs snapshotter did
    // not prepare, so other snapshotters still get the walking differ.
    let _ = writeln!(
        s,
        "\n[plugins.\"io.containerd.service.v1.diff-service\"]\n  default = [\"erofs\", \"walking\"]"
    );
    // containerd's erofs docs recommend `--sort=none` (erofs-utils 1.8.2+):
    // it keeps the tar's data order instead of sorting it, which is faster.
    if help.contains("--sort=") {
        let _ = writeln!(
            s,
            "\n[plugins.\"io.containerd.differ.v1.erofs\"]\n  mkfs_options = [\"--sort=none\"]"
        );
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "containerd log tail ({}):\n{}",
                self.dir().display(),
                tail(&self.log(), 3000)
            );
        }
        self.teardown();
    }
}
