//! hyperbox's one configuration file, `/etc/hyperbox/config.toml`.
//!
//! Every binary takes `--config PATH` and loads it through [`Config::load`].
//! Unknown keys and bad values are errors that name the key; a missing file
//! means "all defaults" only when it is the default path, since a path the
//! operator gave must exist.
//!
//! Sections are added as the parts that read them land; see `hyperbox.toml`
//! beside this crate for every key with its default.

#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where binaries look when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/hyperbox/config.toml";
/// The config format version this build reads.
pub const VERSION: u32 = 1;
/// Larger files are refused: a config is a few hundred bytes, and a huge one
/// is a mistake (or an attack on a daemon that reloads it).
const MAX_SIZE: u64 = 1 << 20;

/// Errors of loading the config.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than any sane config.
    #[error("config {path} is {size} bytes, more than the {MAX_SIZE} allowed")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type
    /// (the message names the key and the line).
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("config {path}: {key}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The dotted key, e.g. `snapshotter.root`.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

type Result<T> = std::result::Result<T, Error>;

/// The whole file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Format version; 1 (the default) is the only one so far.
    pub version: u32,
    /// `[snapshotter]`.
    pub snapshotter: Snapshotter,
    /// `[registry]`: how the snapshotter and `hb image pull` reach registries.
    pub registry: Registry,
    /// `[agent]`: the node agent `hyperbox-nri`.
    pub agent: Agent,
    /// `[memory]`: the agent's PSI-driven memory policy.
    pub memory: Memory,
    /// `[tracing]`: the agent's per-container eBPF tracer.
    pub tracing: Tracing,
    /// `[shim]`: the containerd shim `containerd-shim-hyperbox-v1`.
    pub shim: Shim,
    /// `[seccomp]`: learned seccomp profiles.
    pub seccomp: Seccomp,
}

/// A container's seccomp mode (annotation `seccomp.hyperbox.dev/mode`, or
/// `seccomp.default_mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// Leave the container's profile alone and learn nothing.
    #[default]
    Off,
    /// Keep the runtime's profile; record the workload's syscalls.
    Learn,
    /// Install the learned profile, but only report what it would deny.
    Complain,
    /// Install the learned profile: syscalls outside it fail.
    Enforce,
    /// Learn until the profile is stable, then enforce.
    Auto,
}

impl SeccompMode {
    /// The annotation or config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SeccompMode::Off => "off",
            SeccompMode::Learn => "learn",
            SeccompMode::Complain => "complain",
            SeccompMode::Enforce => "enforce",
            SeccompMode::Auto => "auto",
        }
    }

    /// Parses the annotation value (the same words as the config).
    pub fn parse(s: &str) -> Option<SeccompMode> {
        match s.trim() {
            "off" => Some(SeccompMode::Off),
            "learn" => Some(SeccompMode::Learn),
            "complain" => Some(SeccompMode::Complain),
            "enforce" => Some(SeccompMode::Enforce),
            "auto" => Some(SeccompMode::Auto),
            _ => None,
        }
    }
}

/// `[seccomp]`: profiles learned per workload from the tracer's syscall
/// counts, installed at creation by the shim (every client) or NRI.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Seccomp {
    /// Mode of containers without the annotation.
    pub default_mode: SeccompMode,
    /// `auto`: enforce once this many runs in a row added no syscall.
    pub auto_stable_runs: u32,
    /// `auto`: and once the workload has been learned for at least this
    /// many seconds (a rare branch may need a day to show up).
    pub auto_min_learn_secs: u64,
    /// Replace a profile the user set (a Localhost profile, or none at
    /// all: Unconfined) in `complain`, `enforce` and `auto`. `false`: only
    /// the runtime's default profile is replaced, and a container the user
    /// gave its own profile is left as it is.
    pub override_user_profiles: bool,
    /// Never install a learned profile smaller than this many syscalls (a
    /// run that exited at once teaches nothing worth enforcing).
    pub min_syscalls: u32,
}

impl Default for Seccomp {
    fn default() -> Self {
        Seccomp {
            default_mode: SeccompMode::Off,
            auto_stable_runs: 5,
            auto_min_learn_secs: 3600,
            override_user_profiles: false,
            min_syscalls: 8,
        }
    }
}

/// `[shim]`: the containerd shim, which asks the agent for a container's
/// memory settings before `runc create` and registers it after, so its
/// limit and tracing are in place before the workload runs.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Shim {
    /// Time allowed for each call to the agent (`agent.address`), ms;
    /// 1 to 10000. Every container creation waits for it when the agent
    /// hangs.
    pub agent_timeout_ms: u64,
    /// When the agent cannot be reached or does not answer in time, fail
    /// the container's creation. `false`: create it without the agent
    /// (no sizing, no tracing), so the agent being away never blocks a
    /// container.
    pub fail_closed: bool,
    /// Ask the agent for each container's memory settings before
    /// `runc create` (`POST /v1/policies`). `false`: only register it
    /// after (the agent then writes its limit to the cgroup).
    pub policies: bool,
    /// The runc binary, a name looked up in `PATH` or an absolute path,
    /// when containerd's runtime options give no `BinaryName`.
    pub runc: String,
    /// runc's state directory (`runc --root`) before the containerd
    /// namespace is appended, as containerd's runc shim does:
    /// `/run/containerd/runc/<namespace>`.
    pub root: PathBuf,
}

impl Default for Shim {
    fn default() -> Self {
        Shim {
            agent_timeout_ms: 200,
            fail_closed: false,
            policies: true,
            runc: "runc".into(),
            root: PathBuf::from("/run/containerd/runc"),
        }
    }
}

/// `[tracing]`: per-container eBPF tracing in the agent.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Tracing {
    /// Load the tracer. When it cannot load (no BTF, no privileges) the
    /// agent logs why and runs without it. Containers opt out with the
    /// annotation `trace.hyperbox.dev/enabled: "false"`.
    pub enabled: bool,
    /// Size of the event ring buffer shared by all CPUs, bytes (a power of
    /// two, 4 KiB to 256 MiB). Events that do not fit are counted as drops.
    pub ring_buffer_bytes: u32,
    /// Fill of the ring buffer (0 to 1) above which open events are
    /// sampled; 1 never samples.
    pub sample_above: f64,
    /// Under sampling, one open in this many is sent (the rest are counted
    /// in `hyperbox_trace_sampled_total`).
    pub sample_one_in: u32,
    /// Which cgroup identifies a container: `auto` (v2 where the host has a
    /// v2 hierarchy, else the v1 memory cgroup), `v2` or `v1`.
    pub cgroup_hierarchy: CgroupHierarchy,
    /// Count a container's syscalls (and see its opens) only for its first
    /// this many seconds: its start, when it opens the files it needs first
    /// and makes most of its syscall set. After that it pays nothing per
    /// syscall (but in samples, below), while execs, connections and OOM
    /// kills stay traced. 0: for its whole life. A container's annotation
    /// `trace.hyperbox.dev/syscall-window-secs` overrides it (learning a
    /// workload's full syscall set for seccomp wants its whole life).
    pub syscall_window_secs: u64,
    /// After their window, the syscalls of every running container are
    /// counted again for `syscall_sample_ms` once in this many seconds, all
    /// at once (the hook is attached node-wide, so samples are aligned):
    /// this keeps syscall rates and newly used syscalls visible at a
    /// fraction of the cost. 0: no samples after the window.
    pub syscall_sample_every_secs: u64,
    /// Length of one sample, milliseconds.
    pub syscall_sample_ms: u64,
    /// Seconds the syscall hook stays attached after the last counted
    /// container stops (attaching and detaching it walks every thread on
    /// the node, which would otherwise slow each start of short-lived
    /// containers run one after another).
    pub hook_linger_secs: u64,
    /// OTLP/HTTP (protobuf) collector for container spans, e.g.
    /// `http://127.0.0.1:4318` (`/v1/traces` is added when the URL has no
    /// path). Empty: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` from the environment, else no export.
    pub otlp_endpoint: String,
    /// Extra headers sent with each export (authentication, tenant).
    pub otlp_headers: BTreeMap<String, String>,
    /// Timeout of one export, seconds.
    pub otlp_timeout_secs: u64,
    /// `service.name` of the exported resource.
    pub otlp_service_name: String,
}

impl Default for Tracing {
    fn default() -> Self {
        Tracing {
            enabled: true,
            ring_buffer_bytes: 256 << 10,
            sample_above: 0.5,
            sample_one_in: 16,
            cgroup_hierarchy: CgroupHierarchy::Auto,
            syscall_window_secs: 10,
            syscall_sample_every_secs: 60,
            syscall_sample_ms: 1000,
            hook_linger_secs: 10,
            otlp_endpoint: String::new(),
            otlp_headers: BTreeMap::new(),
            otlp_timeout_secs: 10,
            otlp_service_name: "hyperbox-agent".into(),
        }
    }
}

/// `tracing.cgroup_hierarchy`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CgroupHierarchy {
    /// v2 when the host mounts a v2 hierarchy (unified or hybrid), else v1.
    Auto,
    /// The v2 cgroup id (`bpf_get_current_cgroup_id`).
    V2,
    /// The container's v1 memory cgroup, read from the task.
    V1,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            version: VERSION,
            snapshotter: Snapshotter::default(),
            registry: Registry::default(),
            agent: Agent::default(),
            memory: Memory::default(),
            tracing: Tracing::default(),
            shim: Shim::default(),
            seccomp: Seccomp::default(),
        }
    }
}

/// `[agent]`: the node agent (`hyperbox-nri`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Agent {
    /// The local API socket (`hb psi`, `hb policy explain`, the shim).
    pub address: PathBuf,
    /// Permission bits of that socket.
    pub socket_mode: u32,
    /// containerd's NRI socket, dialled when the agent runs as an external
    /// plugin. Ignored when containerd launched the agent (socket on fd 3).
    pub nri_socket: PathBuf,
    /// The name the plugin registers under (shown in containerd's log).
    pub plugin_name: String,
    /// The plugin index (two digits): where the agent sits in containerd's
    /// plugin order.
    pub plugin_index: String,
    /// Loopback address of `/metrics`, `/metrics/memory/psi` and `/healthz`;
    /// empty disables the HTTP endpoints.
    pub metrics_address: String,
    /// Where the agent keeps what it learned (workloads' working sets).
    pub state_dir: PathBuf,
    /// A group whose members may use the local API besides root (checked
    /// on each connection's peer credentials); empty: root only.
    pub api_group: String,
    /// The cgroup parents container runtimes put containers under (the
    /// cgroupfs form `/kubepods`, `/default`, or a systemd slice such as
    /// `kubepods.slice`): a local API registration is accepted only for a
    /// cgroup below one of them. Empty: below any parent that passes the
    /// other checks (two levels deep, none of the host's units).
    pub cgroup_parents: Vec<String>,
    /// Prewarm images likely to start again: those started at least
    /// `prewarm_min_starts` times within `prewarm_window_secs` get their
    /// learned prefetch lists fetched by the snapshotter
    /// (`snapshotter.control_address`) while the node is calm.
    pub prewarm: bool,
    /// Seconds between prewarm rounds.
    pub prewarm_interval_secs: u64,
    /// Starts within the window that make an image worth prewarming.
    pub prewarm_min_starts: u32,
    /// How far back starts count, seconds.
    pub prewarm_window_secs: u64,
    /// CPU, I/O or memory `some avg10` (%) at which no prewarm starts and
    /// a running one stops.
    pub prewarm_max_pressure: u32,
}

impl Default for Agent {
    fn default() -> Self {
        Agent {
            address: PathBuf::from("/run/hyperbox/agent.sock"),
            socket_mode: 0o660,
            nri_socket: PathBuf::from("/var/run/nri/nri.sock"),
            plugin_name: "hyperbox".into(),
            plugin_index: "10".into(),
            metrics_address: "127.0.0.1:9464".into(),
            state_dir: PathBuf::from("/var/lib/hyperbox/agent"),
            api_group: String::new(),
            cgroup_parents: Vec::new(),
            prewarm: true,
            prewarm_interval_secs: 600,
            prewarm_min_starts: 2,
            prewarm_window_secs: 7 * 24 * 3600,
            prewarm_max_pressure: 10,
        }
    }
}

/// `memory.default_policy` and the `memory.hyperbox.dev/policy` annotation.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum MemoryPolicy {
    /// Leave the container alone; not even learned.
    Off,
    /// Learn the workload's working set; change nothing.
    Observe,
    /// Learn, size the limit at creation, and adjust it while running.
    Adaptive,
}

impl MemoryPolicy {
    /// The annotation or config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryPolicy::Off => "off",
            MemoryPolicy::Observe => "observe",
            MemoryPolicy::Adaptive => "adaptive",
        }
    }

    /// Parses the annotation value (the same words as the config).
    pub fn parse(s: &str) -> Option<MemoryPolicy> {
        match s.trim() {
            "off" => Some(MemoryPolicy::Off),
            "observe" => Some(MemoryPolicy::Observe),
            "adaptive" => Some(MemoryPolicy::Adaptive),
            _ => None,
        }
    }
}

/// `[memory]`: sizing and adjusting container memory from PSI.
///
/// Ratios are plain numbers (1.5 = 150 %); percentages are PSI's (share of
/// wall time some task stalled, 0–100).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Memory {
    /// Policy of containers without the annotation.
    pub default_policy: MemoryPolicy,
    /// Limit = working set × headroom when the node is calm.
    pub headroom: f64,
    /// The headroom when the node is under `node_pressure_high` or more.
    pub min_headroom: f64,
    /// Node memory pressure (`some avg10`, %) at which headroom reaches
    /// `min_headroom`; between 0 and this the headroom shrinks linearly.
    pub node_pressure_high: f64,
    /// Never set a limit below this many bytes (nor below the container's
    /// own memory request, when the runtime passes one).
    pub floor_bytes: u64,
    /// Keep each adaptive container's own memory stall (`some avg10`, %)
    /// under this; above it the limit is raised.
    pub stall_target: f64,
    /// How much a raise adds, as a share of the current limit.
    pub raise_step: f64,
    /// Lower a limit only when the new one is at least this share smaller
    /// (hysteresis against flapping).
    pub lower_min_change: f64,
    /// Seconds after a raise (or the size set at creation) during which
    /// the limit is not lowered.
    pub cooldown_secs: u64,
    /// Seconds between samples of each container's usage and pressure.
    pub sample_interval_secs: u64,
    /// PSI trigger: stall (ms) within `trigger_window_ms` that wakes the
    /// agent at once. Without CAP_SYS_RESOURCE the kernel only accepts
    /// windows that are multiples of 2 s.
    pub trigger_stall_ms: u64,
    /// The PSI trigger window (ms).
    pub trigger_window_ms: u64,
    /// Past runs remembered per workload (peak working set of each).
    pub history_runs: usize,
    /// With cgroup v2, `memory.high` = limit × this (reclaim starts before
    /// the hard limit); 0 leaves `memory.high` alone.
    pub high_ratio: f64,
}

impl Default for Memory {
    fn default() -> Self {
        Memory {
            default_policy: MemoryPolicy::Observe,
            headroom: 1.5,
            min_headroom: 1.15,
            node_pressure_high: 20.0,
            floor_bytes: 16 << 20,
            stall_target: 1.0,
            raise_step: 0.25,
            lower_min_change: 0.1,
            cooldown_secs: 60,
            sample_interval_secs: 5,
            trigger_stall_ms: 20,
            trigger_window_ms: 2000,
            history_runs: 20,
            high_ratio: 0.9,
        }
    }
}

/// `[snapshotter]`: the containerd proxy snapshotter.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Snapshotter {
    /// Where snapshots and metadata live (also `exports.root` for the kubelet).
    pub root: PathBuf,
    /// The gRPC unix socket containerd connects to.
    pub address: PathBuf,
    /// Permission bits of the socket (containerd runs as root; 0660 lets an
    /// operator group use `hb`).
    pub socket_mode: u32,
    /// Remove directories that no snapshot owns when the daemon starts
    /// (leftovers of a crash), as `Cleanup` would.
    pub cleanup_on_start: bool,
    /// Serve layers that containerd labels with their image reference
    /// (CRI, nerdctl, `hb image pull`) by fetching them ourselves as EROFS.
    pub remote: bool,
    /// When the registry cannot be reached (after retries) or refuses our
    /// credentials, hand the layer back to containerd to fetch and unpack.
    /// Bad content (digest mismatch, a malicious tar) is never handed back.
    pub fallback_to_local: bool,
    /// Fetch the image's other layers (`cri.image-layers`) in parallel,
    /// ahead of containerd's one-by-one Prepares.
    pub prefetch: bool,
    /// How EROFS layer images reach the kernel.
    pub erofs_backend: ErofsBackend,
    /// For images with a hyperbox index (`hb image index`), mount layers at
    /// once and fetch their bytes on first access (`lazy_backend` says
    /// how the kernel's reads reach us).
    pub lazy: bool,
    /// How reads of unfetched bytes of lazily served layers reach the
    /// snapshotter.
    pub lazy_backend: LazyBackend,
    /// Once a lazily served layer is complete, fetch the layer whole and
    /// check that it gives the index's diff_id and EROFS bytes; a layer
    /// that does not is no longer served (docs/security.md). With
    /// `lazy_fill_from_layer` (the default) the fill is that download and
    /// checks the layer anyway; this applies to layers the Range fill
    /// completed (that option off, or the layer could not be downloaded),
    /// at the cost of one more download of each.
    pub lazy_verify: bool,
    /// Range requests of lazy layers in flight at once, on-demand reads and
    /// background fills together.
    pub lazy_max_chunk_fetches: u32,
    /// Pause background fills of lazy layers while the node's I/O pressure
    /// (`/proc/pressure/io`, `some avg10`, in %) is at or above this; 0
    /// never pauses. Reads a container waits for are never paused.
    pub lazy_fill_pause_io_pressure: u32,
    /// Fill lazily served layers, once what was learned is fetched, from
    /// the image's own layer blob (compressed, usually a third of the
    /// EROFS bytes), converted here and checked against the index, instead
    /// of Range requests to the index's EROFS blob: the download that
    /// verification makes anyway is the fill. The download gives way to
    /// reads a container waits for; reads still fetch on demand from the
    /// EROFS blob.
    pub lazy_fill_from_layer: bool,
    /// Look up the prefetch lists other nodes shared beside an image's
    /// index (`hb image prefetch push`) and fetch what they list first,
    /// after what this node learned itself. One more manifest request per
    /// image, made beside the index's.
    pub lazy_shared_prefetch: bool,
    /// `host:port` to serve `/metrics` on (Prometheus text format); empty
    /// for none.
    pub metrics_address: String,
    /// Unix socket of the snapshotter's own calls (`POST /v1/prewarm`,
    /// which the agent and `hb image prewarm` make), owner-only (0600):
    /// a call makes the node fetch from registries. Empty for none.
    pub control_address: PathBuf,
    /// Accept character and block device nodes in fetched layers, as
    /// containerd's overlayfs does (debootstrap-made base images carry
    /// `/dev/console`, `/dev/null` and more). A node in an image is inert
    /// unless the container's device cgroup allows its number, exactly as
    /// on overlayfs. Off: a layer carrying one is refused, naming it.
    pub allow_device_nodes: bool,
    /// The most bytes a fetched layer's files may hold once expanded
    /// (sparse files at their full size); a layer past it is refused. A few
    /// KiB of gzip or zstd can expand to fill a node's disk.
    pub max_layer_bytes: u64,
    /// The most entries (files, directories, links, whiteouts) a fetched
    /// layer may hold; a layer past it is refused. Each costs about 200
    /// bytes of memory while the layer is converted, and a tar of a million
    /// empty files is a few MiB of gzip.
    pub max_layer_entries: u64,
}

/// `snapshotter.erofs_backend`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ErofsBackend {
    /// File-backed where the kernel can (6.12+), else a loop device.
    Auto,
    /// File-backed EROFS mounts only.
    File,
    /// A read-only loop device per layer.
    Loop,
}

/// `snapshotter.lazy_backend`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LazyBackend {
    /// fanotify where the kernel has pre-content events and file-backed
    /// EROFS (6.14+), else FUSE.
    Auto,
    /// File-backed EROFS held by fanotify pre-content events only.
    Fanotify,
    /// A loop device over a file the snapshotter serves through FUSE,
    /// switched to the local file once it is complete (any kernel with
    /// FUSE and loop devices).
    Fuse,
}

/// `[registry]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Registry {
    /// containerd's registry host directory: `<dir>/<host>/hosts.toml`
    /// (mirrors, `ca`, `skip_verify`, `server`), `<dir>/_default/hosts.toml`.
    pub config_path: PathBuf,
    /// docker's credential file (`auths`), as `docker login` writes it.
    pub docker_config: PathBuf,
    /// Blob downloads at once, across all images.
    pub max_concurrent_downloads: u32,
    /// Retries of a request after a transient failure (connection errors,
    /// resets, 5xx, 429), with exponential backoff; a download resumes
    /// with a Range request where the registry allows it.
    pub retries: u32,
    /// Seconds to wait for a connection or for the next bytes of a reply.
    pub timeout_secs: u64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            config_path: PathBuf::from("/etc/containerd/certs.d"),
            docker_config: PathBuf::from("/root/.docker/config.json"),
            max_concurrent_downloads: 3,
            retries: 4,
            timeout_secs: 30,
        }
    }
}

impl Default for Snapshotter {
    fn default() -> Self {
        Snapshotter {
            root: PathBuf::from("/var/lib/hyperbox/snapshotter"),
            address: PathBuf::from("/run/hyperbox/snapshotter.sock"),
            socket_mode: 0o660,
            cleanup_on_start: true,
            remote: true,
            fallback_to_local: true,
            prefetch: true,
            erofs_backend: ErofsBackend::Auto,
            lazy_backend: LazyBackend::Auto,
            lazy: true,
            lazy_verify: true,
            lazy_max_chunk_fetches: 16,
            lazy_fill_pause_io_pressure: 20,
            lazy_fill_from_layer: true,
            lazy_shared_prefetch: true,
            metrics_address: String::new(),
            control_address: PathBuf::from("/run/hyperbox/snapshotter-control.sock"),
            allow_device_nodes: true,
            // Above the largest real layers (CUDA and model images reach
            // 10-30 GiB expanded), far below EROFS' 16 TiB.
            max_layer_bytes: 64 << 30,
            // 2-4x the largest real layers (a few hundred thousand
            // entries); about 200 MiB of memory while one converts.
            max_layer_entries: 1 << 20,
        }
    }
}

impl Config {
    /// Loads `path`, or the defaults when `path` is `None` and the default
    /// file does not exist.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default());
            }
            Err(source) => return Err(Error::Read { path, source }),
        };
        if meta.len() > MAX_SIZE {
            return Err(Error::TooLarge {
                path,
                size: meta.len(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text, &path)
    }

    /// Parses and validates config text; `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| Error::Parse {
            path: path.into(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let invalid = |key, problem: &str| Error::Invalid {
            path: path.into(),
            key,
            problem: problem.into(),
        };
        if self.version != VERSION {
            return Err(invalid(
                "version",
                &format!(
                    "{} is not supported (this build reads {VERSION})",
                    self.version
                ),
            ));
        }
        let s = &self.snapshotter;
        if !s.root.is_absolute() {
            return Err(invalid("snapshotter.root", "must be an absolute path"));
        }
        if !s.address.is_absolute() {
            return Err(invalid("snapshotter.address", "must be an absolute path"));
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if s.address.as_os_str().len() > 107 {
            return Err(invalid(
                "snapshotter.address",
                "is longer than a unix socket path may be (107 bytes)",
            ));
        }
        if !s.control_address.as_os_str().is_empty() {
            if !s.control_address.is_absolute() {
                return Err(invalid(
                    "snapshotter.control_address",
                    "must be an absolute path (or empty for none)",
                ));
            }
            if s.control_address.as_os_str().len() > 107 {
                return Err(invalid(
                    "snapshotter.control_address",
                    "is longer than a unix socket path may be (107 bytes)",
                ));
            }
            if s.control_address == s.address {
                return Err(invalid(
                    "snapshotter.control_address",
                    "must differ from snapshotter.address",
                ));
            }
        }
        if s.socket_mode > 0o777 {
            return Err(invalid(
                "snapshotter.socket_mode",
                "must be permission bits (at most 0o777)",
            ));
        }
        if !(1 << 20..=16 << 40).contains(&s.max_layer_bytes) {
            return Err(invalid(
                "snapshotter.max_layer_bytes",
                "must be between 1 MiB and 16 TiB (what EROFS' 32-bit block addresses reach)",
            ));
        }
        if !(1024..=1 << 26).contains(&s.max_layer_entries) {
            return Err(invalid(
                "snapshotter.max_layer_entries",
                "must be between 1024 and 67108864",
            ));
        }
        if s.lazy_fill_pause_io_pressure > 100 {
            return Err(invalid(
                "snapshotter.lazy_fill_pause_io_pressure",
                "must be between 0 (never pause) and 100 (%)",
            ));
        }
        if !(1..=256).contains(&s.lazy_max_chunk_fetches) {
            return Err(invalid(
                "snapshotter.lazy_max_chunk_fetches",
                "must be between 1 and 256",
            ));
        }
        let r = &self.registry;
        if !r.config_path.is_absolute() {
            return Err(invalid("registry.config_path", "must be an absolute path"));
        }
        if !r.docker_config.is_absolute() {
            return Err(invalid(
                "registry.docker_config",
                "must be an absolute path",
            ));
        }
        if r.max_concurrent_downloads == 0 || r.max_concurrent_downloads > 64 {
            return Err(invalid(
                "registry.max_concurrent_downloads",
                "must be between 1 and 64",
            ));
        }
        if r.retries > 20 {
            return Err(invalid("registry.retries", "must be at most 20"));
        }
        if r.timeout_secs == 0 || r.timeout_secs > 3600 {
            return Err(invalid(
                "registry.timeout_secs",
                "must be between 1 and 3600",
            ));
        }
        self.validate_agent(path)?;
        self.validate_shim(path)?;
        self.memory.validate(path)?;
        let sc = &self.seccomp;
        if sc.auto_stable_runs == 0 || sc.auto_stable_runs > 1000 {
            return Err(invalid(
                "seccomp.auto_stable_runs",
                "must be between 1 and 1000",
            ));
        }
        if sc.min_syscalls > 400 {
            return Err(invalid(
                "seccomp.min_syscalls",
                "must be at most 400 (no workload needs more to be enforced)",
            ));
        }
        let t = &self.tracing;
        let rb = t.ring_buffer_bytes;
        if !rb.is_power_of_two() || !(4096..=256 << 20).contains(&rb) {
            return Err(invalid(
                "tracing.ring_buffer_bytes",
                "must be a power of two between 4096 and 268435456",
            ));
        }
        if !(t.sample_above > 0.0 && t.sample_above <= 1.0) {
            return Err(invalid(
                "tracing.sample_above",
                "must be above 0 and at most 1",
            ));
        }
        if t.sample_one_in == 0 {
            return Err(invalid("tracing.sample_one_in", "must be at least 1"));
        }
        let e = t.otlp_endpoint.trim();
        if !e.is_empty() {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"));
            if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
                return Err(invalid(
                    "tracing.otlp_endpoint",
                    "must be an http:// or https:// URL with a host",
                ));
            }
        }
        if t.otlp_timeout_secs == 0 {
            return Err(invalid("tracing.otlp_timeout_secs", "must be at least 1"));
        }
        // Samples only follow closed windows (with syscall_window_secs = 0
        // every syscall is counted anyway), but are checked regardless.
        if t.syscall_sample_every_secs > 0
            && (t.syscall_sample_ms == 0
                || t.syscall_sample_ms >= t.syscall_sample_every_secs.saturating_mul(1000))
        {
            return Err(invalid(
                "tracing.syscall_sample_ms",
                "must be above 0 and shorter than tracing.syscall_sample_every_secs",
            ));
        }
        Ok(())
    }

    fn validate_shim(&self, path: &Path) -> Result<()> {
        let invalid = |key, problem: &str| Error::Invalid {
            path: path.into(),
            key,
            problem: problem.into(),
        };
        let s = &self.shim;
        if !(1..=10_000).contains(&s.agent_timeout_ms) {
            return Err(invalid(
                "shim.agent_timeout_ms",
                "must be between 1 and 10000",
            ));
        }
        // A relative path with a '/' would depend on the shim's working
        // directory (the bundle), which is no place for a binary.
        let r = &s.runc;
        if r.trim().is_empty()
            || r.chars().any(char::is_control)
            || (r.contains('/') && !Path::new(r).is_absolute())
        {
            return Err(invalid(
                "shim.runc",
                "must be a binary name looked up in PATH (\"runc\") or an absolute path",
            ));
        }
        if !s.root.is_absolute() {
            return Err(invalid("shim.root", "must be an absolute path"));
        }
        Ok(())
    }

    fn validate_agent(&self, path: &Path) -> Result<()> {
        let invalid = |key, problem: &str| Error::Invalid {
            path: path.into(),
            key,
            problem: problem.into(),
        };
        let a = &self.agent;
        for (key, p) in [
            ("agent.address", &a.address),
            ("agent.nri_socket", &a.nri_socket),
        ] {
            if !p.is_absolute() {
                return Err(invalid(key, "must be an absolute path"));
            }
            if p.as_os_str().len() > 107 {
                return Err(invalid(
                    key,
                    "is longer than a unix socket path may be (107 bytes)",
                ));
            }
        }
        if !a.state_dir.is_absolute() {
            return Err(invalid("agent.state_dir", "must be an absolute path"));
        }
        if !a.api_group.is_empty()
            && (a.api_group.len() > 32
                || a.api_group.starts_with('-')
                || !a
                    .api_group
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(invalid(
                "agent.api_group",
                "must be a group name (letters, digits, '_', '-', '.'; at most 32) or empty",
            ));
        }
        for p in &a.cgroup_parents {
            let slice = !p.contains('/')
                && p.strip_suffix(".slice").is_some_and(|stem| {
                    !stem.is_empty() && stem.split('-').all(|part| !part.is_empty())
                });
            let absolute = p.len() > 1
                && p.starts_with('/')
                && p[1..]
                    .split('/')
                    .all(|c| !c.is_empty() && c != "." && c != "..");
            if !(slice || absolute) || p.chars().any(char::is_control) {
                return Err(invalid(
                    "agent.cgroup_parents",
                    &format!(
                        "{p:?} is neither a cgroup path below the root (\"/kubepods\") nor a systemd slice (\"kubepods.slice\")"
                    ),
                ));
            }
        }
        if a.address == self.snapshotter.control_address {
            return Err(invalid(
                "snapshotter.control_address",
                "must differ from agent.address",
            ));
        }
        if a.prewarm {
            if a.prewarm_interval_secs < 10 {
                return Err(invalid(
                    "agent.prewarm_interval_secs",
                    "must be at least 10 (each round asks registries for manifests)",
                ));
            }
            if a.prewarm_min_starts == 0 {
                return Err(invalid("agent.prewarm_min_starts", "must be at least 1"));
            }
            if a.prewarm_window_secs == 0 {
                return Err(invalid("agent.prewarm_window_secs", "must be at least 1"));
            }
            if !(1..=100).contains(&a.prewarm_max_pressure) {
                return Err(invalid(
                    "agent.prewarm_max_pressure",
                    "must be a percentage between 1 and 100",
                ));
            }
        }
        if a.socket_mode > 0o777 {
            return Err(invalid(
                "agent.socket_mode",
                "must be permission bits (at most 0o777)",
            ));
        }
        if a.plugin_name.is_empty()
            || !a
                .plugin_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "agent.plugin_name",
                "must be letters, digits, '-' or '_'",
            ));
        }
        if a.plugin_index.len() != 2 || !a.plugin_index.chars().all(|c| c.is_ascii_digit()) {
            return Err(invalid(
                "agent.plugin_index",
                "must be two digits, e.g. \"10\"",
            ));
        }
        if !a.metrics_address.is_empty() {
            match a.metrics_address.parse::<std::net::SocketAddr>() {
                Ok(addr) if addr.ip().is_loopback() => {}
                Ok(_) => {
                    return Err(invalid(
                        "agent.metrics_address",
                        "must be a loopback address (metrics name containers and workloads)",
                    ));
                }
                Err(_) => {
                    return Err(invalid(
                        "agent.metrics_address",
                        "must be IP:PORT, e.g. 127.0.0.1:9464 (empty disables it)",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Memory {
    /// Checks the knobs; `path` only labels errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let invalid = |key, problem: &str| Error::Invalid {
            path: path.into(),
            key,
            problem: problem.into(),
        };
        let ratio = |v: f64, lo: f64, hi: f64| v.is_finite() && v >= lo && v <= hi;
        if !ratio(self.headroom, 1.0, 10.0) {
            return Err(invalid("memory.headroom", "must be between 1.0 and 10.0"));
        }
        if !ratio(self.min_headroom, 1.0, self.headroom) {
            return Err(invalid(
                "memory.min_headroom",
                "must be between 1.0 and memory.headroom",
            ));
        }
        if !ratio(self.node_pressure_high, 0.1, 100.0) {
            return Err(invalid(
                "memory.node_pressure_high",
                "must be a percentage between 0.1 and 100",
            ));
        }
        if !ratio(self.stall_target, 0.1, 100.0) {
            return Err(invalid(
                "memory.stall_target",
                "must be a percentage between 0.1 and 100",
            ));
        }
        if !ratio(self.raise_step, 0.01, 4.0) {
            return Err(invalid("memory.raise_step", "must be between 0.01 and 4.0"));
        }
        if !ratio(self.lower_min_change, 0.0, 0.9) {
            return Err(invalid(
                "memory.lower_min_change",
                "must be between 0.0 and 0.9",
            ));
        }
        if !(self.high_ratio == 0.0 || ratio(self.high_ratio, 0.5, 1.0)) {
            return Err(invalid(
                "memory.high_ratio",
                "must be 0 (leave memory.high alone) or between 0.5 and 1.0",
            ));
        }
        if self.floor_bytes < 4 << 20 {
            return Err(invalid(
                "memory.floor_bytes",
                "must be at least 4 MiB (4194304): a smaller limit kills runc's init",
            ));
        }
        if self.sample_interval_secs == 0 || self.sample_interval_secs > 300 {
            return Err(invalid(
                "memory.sample_interval_secs",
                "must be between 1 and 300",
            ));
        }
        if self.trigger_window_ms < 500 || self.trigger_window_ms > 10_000 {
            return Err(invalid(
                "memory.trigger_window_ms",
                "must be between 500 and 10000 (the kernel's PSI trigger window)",
            ));
        }
        if self.trigger_stall_ms == 0 || self.trigger_stall_ms >= self.trigger_window_ms {
            return Err(invalid(
                "memory.trigger_stall_ms",
                "must be above 0 and below memory.trigger_window_ms",
            ));
        }
        if self.history_runs == 0 || self.history_runs > 1000 {
            return Err(invalid("memory.history_runs", "must be between 1 and 1000"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("/etc/hyperbox/config.toml"))
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
        assert_eq!(
            Config::default().snapshotter.address,
            PathBuf::from("/run/hyperbox/snapshotter.sock")
        );
    }

    #[test]
    fn keys_override_defaults() {
        let c = parse("[snapshotter]\nroot = \"/data/hb\"\nsocket_mode = 0o600\n").unwrap();
        assert_eq!(c.snapshotter.root, PathBuf::from("/data/hb"));
        assert_eq!(c.snapshotter.socket_mode, 0o600);
        assert_eq!(c.snapshotter.address, Snapshotter::default().address);
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let e = parse("[snapshotter]\nroots = \"/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("roots"), "{e}");
        let e = parse("[snapshoter]\n").unwrap_err().to_string();
        assert!(e.contains("snapshoter"), "{e}");
    }

    #[test]
    fn bad_values_are_errors_that_name_the_key() {
        let e = parse("[snapshotter]\nroot = \"relative\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("snapshotter.root") && e.contains("absolute"),
            "{e}"
        );
        let e = parse("[snapshotter]\nroot = 3\n").unwrap_err().to_string();
        assert!(e.contains("root"), "{e}");
        let e = parse(&format!(
            "[snapshotter]\naddress = \"/{}\"\n",
            "a".repeat(120)
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("snapshotter.address"), "{e}");
        let e = parse("[registry]\nmax_concurrent_downloads = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("registry.max_concurrent_downloads"), "{e}");
        let e = parse("[snapshotter]\nerofs_backend = \"fuse\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("erofs_backend") && e.contains("auto"), "{e}");
        let e = parse("[memory]\nheadroom = 0.5\n").unwrap_err().to_string();
        assert!(e.contains("memory.headroom"), "{e}");
        let e = parse("[memory]\ndefault_policy = \"eager\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("default_policy") && e.contains("adaptive"),
            "{e}"
        );
        let e = parse("[agent]\nmetrics_address = \"0.0.0.0:9464\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("agent.metrics_address") && e.contains("loopback"),
            "{e}"
        );
        let e = parse("[agent]\nplugin_index = \"7\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent.plugin_index"), "{e}");
        let e = parse("[snapshotter]\nmax_layer_bytes = 4096\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("snapshotter.max_layer_bytes"), "{e}");
        let c = parse("[snapshotter]\nmax_layer_bytes = 1099511627776\n").unwrap();
        assert_eq!(c.snapshotter.max_layer_bytes, 1 << 40);
        let e = parse("[agent]\napi_group = \"ops; rm\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent.api_group"), "{e}");
        let c = parse("[agent]\napi_group = \"hyperbox-ops\"\n").unwrap();
        assert_eq!(c.agent.api_group, "hyperbox-ops");
        for bad in [
            "/",
            "kubepods",
            "/a/../b",
            "a/b.slice",
            "-.slice",
            "a--b.slice",
            "",
        ] {
            let e = parse(&format!("[agent]\ncgroup_parents = [{bad:?}]\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("agent.cgroup_parents"), "{bad:?}: {e}");
        }
        let c = parse("[agent]\ncgroup_parents = [\"/kubepods\", \"kubepods-besteffort.slice\"]\n")
            .unwrap();
        assert_eq!(
            c.agent.cgroup_parents,
            ["/kubepods", "kubepods-besteffort.slice"]
        );
        for bad in [1000, 1 << 27] {
            let e = parse(&format!("[snapshotter]\nmax_layer_entries = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("snapshotter.max_layer_entries"), "{e}");
        }
        let e = parse("[tracing]\nsyscall_sample_every_secs = 2\nsyscall_sample_ms = 2000\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tracing.syscall_sample_ms") && e.contains("shorter"),
            "{e}"
        );
        // Off, any length goes; a whole-life window needs no samples.
        parse("[tracing]\nsyscall_sample_every_secs = 0\nsyscall_sample_ms = 0\n").unwrap();
        parse("[tracing]\nsyscall_window_secs = 0\n").unwrap();
        let e = parse("version = 2\n").unwrap_err().to_string();
        assert!(e.contains("version"), "{e}");
    }

    #[test]
    fn the_shim_section_is_checked_key_by_key() {
        let c = parse("").unwrap();
        assert_eq!(
            (c.shim.agent_timeout_ms, c.shim.fail_closed, c.shim.policies),
            (200, false, true)
        );
        assert_eq!(c.shim.runc, "runc");
        assert_eq!(c.shim.root, PathBuf::from("/run/containerd/runc"));
        let c = parse(
            "[shim]\nagent_timeout_ms = 1000\nfail_closed = true\npolicies = false\nrunc = \"/usr/sbin/runc\"\nroot = \"/run/runc\"\n",
        )
        .unwrap();
        assert_eq!(
            c.shim,
            Shim {
                agent_timeout_ms: 1000,
                fail_closed: true,
                policies: false,
                runc: "/usr/sbin/runc".into(),
                root: PathBuf::from("/run/runc"),
            }
        );
        for (text, key) in [
            ("agent_timeout_ms = 0", "shim.agent_timeout_ms"),
            ("agent_timeout_ms = 10001", "shim.agent_timeout_ms"),
            ("runc = \"\"", "shim.runc"),
            ("runc = \"bin/runc\"", "shim.runc"),
            ("root = \"run/runc\"", "shim.root"),
        ] {
            let e = parse(&format!("[shim]\n{text}\n")).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        let e = parse("[shim]\ntimeout_ms = 5\n").unwrap_err().to_string();
        assert!(e.contains("timeout_ms"), "{e}");
        let e = parse("[shim]\nfail_closed = \"yes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("fail_closed"), "{e}");
    }

    #[test]
    fn missing_default_file_is_defaults_but_missing_explicit_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        assert!(matches!(
            Config::load(Some(&missing)),
            Err(Error::Read { .. })
        ));
    }

    #[test]
    fn oversized_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, "#".repeat((MAX_SIZE + 1) as usize)).unwrap();
        assert!(matches!(
            Config::load(Some(&big)),
            Err(Error::TooLarge { .. })
        ));
    }
}
