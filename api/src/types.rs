//! The node agent's local API: what `GET /v1/…` answers and `POST` takes.
//!
//! The agent serializes these and `hb` (through [`crate::Client`]) reads
//! them, so a renamed field fails to compile on both sides instead of
//! showing up as a blank column. Field names and enum spellings are the
//! wire format scripts read (`hb … --json`): add fields, never rename.
//!
//! | endpoint | answer or body |
//! |---|---|
//! | `GET /healthz` | [`Health`] |
//! | `GET /v1/psi` (and `/metrics/memory/psi`) | [`Psi`] |
//! | `GET /v1/containers` | `Vec<`[`Container`]`>` |
//! | `POST /v1/policies` | body [`ContainerInfo`], answer [`Policy`] |
//! | `POST /v1/containers` | body [`ContainerInfo`], answer [`Registered`] |
//! | `GET /v1/containers/{id}` | [`Explain`] |
//! | `DELETE /v1/containers/{id}` | no body (204, or 404) |
//! | `GET /v1/containers/{id}/trace` | [`Trace`] |
//! | `GET /v1/containers/{id}/events` | lines of [`EventLine`] |
//! | `GET /v1/top` | [`Top`] |
//! | `GET /v1/profiles` | `Vec<`[`ProfileSummary`]`>` |
//! | `GET /v1/profiles?workload=W&format=oci\|localhost\|spo` | [`ProfileDetail`] |
//! | `PUT /v1/profiles` | body [`SetMode`] (204) |
//! | `DELETE /v1/profiles?workload=W` | no body (204, or 404) |
//! | `GET /v1/profiles/diff?a=A&b=B` | [`ProfileDiff`] |

use std::collections::{BTreeMap, HashMap};

use hyperbox_config::{MemoryPolicy, SeccompMode};
use serde::{Deserialize, Serialize};

/// `GET /healthz`: the agent is up, and what it runs with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Always `ok` (an agent that answers is alive).
    pub status: String,
    /// The eBPF tracer is loaded.
    pub tracing: bool,
    /// Where syscalls are counted (empty without the tracer).
    pub tracing_syscall_hook: String,
    /// The syscall hook is attached now (it detaches when nothing counts).
    pub tracing_syscall_hook_attached: bool,
    /// Where seccomp denials are seen: `fexit/__seccomp_filter` (only
    /// filtered tasks pay for it) or the `tp_btf/sys_exit` fallback (every
    /// task on the node pays while it is attached); empty when they are not
    /// reported (no tracer, pure cgroup v1).
    #[serde(default)]
    pub tracing_refusal_hook: String,
    /// The hook that sees seccomp denials is attached now (only while a
    /// container under an enforced profile is watched).
    #[serde(default)]
    pub tracing_refusal_hook_attached: bool,
    /// Why the tracer is not loaded (empty when it is).
    pub tracing_unavailable: String,
    /// How the tracer tells containers apart: `v2` or `v1 memory`.
    pub tracing_cgroup: String,
    /// Where container spans are exported, if anywhere.
    pub tracing_otlp_endpoint: Option<String>,
    /// Registered with an NRI runtime now.
    pub nri_connected: bool,
    /// That runtime's name and version (`containerd 1.7.24`).
    pub runtime: Option<String>,
    /// Containers the memory policy tracks.
    pub containers: u64,
    /// The node's cgroup layout (`unified`, `hybrid`, `legacy`).
    pub cgroup_layout: String,
}

/// One line of a PSI file (`some` or `full`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PsiLine {
    /// Share of the last 10 s some (or all) tasks stalled, in %.
    pub avg10: f64,
    /// Over 60 s.
    pub avg60: f64,
    /// Over 300 s.
    pub avg300: f64,
    /// Total stall time in µs since boot (or cgroup creation).
    pub total_us: u64,
}

/// A whole PSI file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Pressure {
    /// Some tasks stalled.
    pub some: PsiLine,
    /// All non-idle tasks stalled (absent for system-wide cpu on old kernels).
    pub full: Option<PsiLine>,
}

/// One sample of a source (the node or a container).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Unix time, seconds.
    pub at: u64,
    /// Memory `some avg10`, %.
    pub memory_some: f64,
    /// Memory `full avg10`, %.
    pub memory_full: f64,
    /// Memory in use, bytes (working set for containers; 0 for the node).
    pub usage: u64,
}

/// The node's pressure at one reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct NodePressure {
    /// `/proc/pressure/memory`.
    pub memory: Pressure,
    /// `/proc/pressure/cpu`.
    pub cpu: Pressure,
    /// `/proc/pressure/io`.
    pub io: Pressure,
    /// Unix time of the reading.
    pub at: u64,
}

/// `GET /v1/psi` (`hb psi`): the node's and each tracked container's
/// memory pressure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Psi {
    /// The node's cgroup layout.
    pub cgroup_layout: String,
    /// Node memory, bytes.
    pub mem_total: u64,
    /// The node's pressure now.
    pub node: NodePressure,
    /// Its recent samples, oldest first.
    pub node_history: Vec<Sample>,
    /// Tracked containers, by namespace, pod and name.
    pub containers: Vec<ContainerPsi>,
}

/// One container's line of [`Psi`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerPsi {
    /// Container id.
    pub id: String,
    /// Container name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Workload key.
    pub workload: String,
    /// Its memory policy.
    pub policy: MemoryPolicy,
    /// The limit in force, bytes (`None`: unlimited).
    pub limit: Option<u64>,
    /// Working set at the last sample.
    pub working_set: Option<u64>,
    /// Peak working set this run.
    pub peak_working_set: u64,
    /// Its memory `some avg10` at the last sample, %.
    pub memory_some_avg10: Option<f64>,
    /// Its memory `full avg10` at the last sample, %.
    pub memory_full_avg10: Option<f64>,
    /// OOM kills in its cgroup.
    pub oom_kills: u64,
    /// Its recent samples, oldest first.
    pub history: Vec<Sample>,
}

/// How a container reached the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Through NRI (CRI containers): changes go through the runtime.
    Nri,
    /// Through the local API (the shim): changes are written to the cgroup.
    Local,
}

impl Source {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Nri => "nri",
            Source::Local => "local",
        }
    }
}

/// Where a container's memory policy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyOrigin {
    /// The `memory.hyperbox.dev/policy` annotation.
    Annotation,
    /// `memory.default_policy`.
    Default,
}

impl PolicyOrigin {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyOrigin::Annotation => "annotation",
            PolicyOrigin::Default => "default",
        }
    }
}

/// The limits a container's memory decisions stay within.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bounds {
    /// Never below: `memory.floor_bytes`, or the container's request.
    pub floor: u64,
    /// Never above: the limit the user set (`None`: only the node's memory).
    pub ceiling: Option<u64>,
}

/// What a memory decision did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    /// Sized at creation from what was learned.
    #[serde(rename = "create")]
    Create,
    /// Raised while running (the container stalled).
    #[serde(rename = "raise")]
    Raise,
    /// Lowered while running (the container was calm).
    #[serde(rename = "lower")]
    Lower,
    /// Adaptive, but nothing learned yet: left as requested.
    #[serde(rename = "learn")]
    Learn,
    /// Policy `observe`: learning only.
    #[serde(rename = "observe")]
    Observe,
    /// A raise the runtime and the cgroup both refused.
    #[serde(rename = "raise-failed")]
    RaiseFailed,
    /// A lower the runtime and the cgroup both refused.
    #[serde(rename = "lower-failed")]
    LowerFailed,
}

impl Action {
    /// The wire spelling (also the metrics label).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Raise => "raise",
            Action::Lower => "lower",
            Action::Learn => "learn",
            Action::Observe => "observe",
            Action::RaiseFailed => "raise-failed",
            Action::LowerFailed => "lower-failed",
        }
    }

    /// A change that could not be applied.
    pub fn is_failed(self) -> bool {
        matches!(self, Action::RaiseFailed | Action::LowerFailed)
    }

    /// The same change, not applied.
    pub fn failed(self) -> Action {
        match self {
            Action::Raise => Action::RaiseFailed,
            Action::Lower => Action::LowerFailed,
            other => other,
        }
    }
}

/// How a decision reached the container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Route {
    /// In the NRI CreateContainer answer.
    #[serde(rename = "nri-create")]
    NriCreate,
    /// By an NRI UpdateContainers request.
    #[serde(rename = "nri-update")]
    NriUpdate,
    /// Written to the container's cgroup.
    #[serde(rename = "cgroup")]
    Cgroup,
    /// Written into the OCI spec before `runc create`, by the shim
    /// (`POST /v1/policies`).
    #[serde(rename = "spec")]
    Spec,
    /// Nothing was applied (learning, observing, or a failed change).
    #[default]
    #[serde(rename = "")]
    None,
}

impl Route {
    /// The wire spelling (empty for [`Route::None`]).
    pub fn as_str(self) -> &'static str {
        match self {
            Route::NriCreate => "nri-create",
            Route::NriUpdate => "nri-update",
            Route::Cgroup => "cgroup",
            Route::Spec => "spec",
            Route::None => "",
        }
    }
}

/// One memory decision, for `hb policy explain`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Unix time.
    pub at: u64,
    /// What it did.
    pub action: Action,
    /// The limit before (bytes; `None`: unlimited).
    pub from: Option<u64>,
    /// The limit after.
    pub to: Option<u64>,
    /// Why, for people.
    pub reason: String,
    /// How it was applied.
    pub via: Route,
}

/// A container the memory policy tracks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Container {
    /// Container id.
    pub id: String,
    /// Container name.
    pub name: String,
    /// Pod namespace.
    pub pod_namespace: String,
    /// Pod name.
    pub pod: String,
    /// Workload key (learning is per key).
    pub workload: String,
    /// Its memory policy.
    pub policy: MemoryPolicy,
    /// Where the policy came from.
    pub policy_from: PolicyOrigin,
    /// How it reached the agent.
    pub source: Source,
    /// OCI cgroupsPath as the runtime gave it.
    pub cgroups_path: String,
    /// Floor and ceiling.
    pub bounds: Bounds,
    /// The limit the agent believes is in force.
    pub limit: Option<u64>,
    /// Started (the workload runs).
    pub started: bool,
    /// Peak working set seen this run.
    pub peak_working_set: u64,
    /// Samples taken.
    pub samples: u64,
    /// OOM kills seen (cgroup counter).
    pub oom_kills: u64,
    /// Decisions, oldest first (the last few).
    pub decisions: Vec<Decision>,
}

/// `POST /v1/policies` (the shim, before `runc create`, from the bundle's
/// `config.json`) and `POST /v1/containers` (the shim, after `runc create`
/// and again after `runc start`): a container as its runtime sees it. Also
/// what the agent knows of a container it saw through NRI.
///
/// `pod_namespace` is the containerd namespace for containers created
/// through containerd's API (`ctr`, nerdctl), and the pod's namespace for
/// CRI containers (`cri`), whose `pod`, `name` and `image` come from the
/// CRI annotations (`io.kubernetes.cri.sandbox-namespace`,
/// `…sandbox-name`, `…container-name`, `…image-name`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerInfo {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Pod namespace.
    #[serde(default)]
    pub pod_namespace: String,
    /// Pod name.
    #[serde(default)]
    pub pod: String,
    /// Image reference.
    #[serde(default)]
    pub image: String,
    /// Annotations.
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// OCI cgroupsPath.
    pub cgroups_path: String,
    /// The memory limit in force.
    #[serde(default)]
    pub limit: Option<u64>,
    /// When the agent set the limit in force: what the user had asked for
    /// (`Some(None)`: no limit).
    #[serde(default)]
    pub user_limit: Option<Option<u64>>,
    /// The user's memory request.
    #[serde(default)]
    pub request: Option<u64>,
    /// Swap was set alongside the limit.
    #[serde(default)]
    pub had_swap: bool,
    /// Already running (the workload was started). The shim registers
    /// with `false` after `runc create` and `true` after `runc start`:
    /// only a started container is sampled, adjusted and learned from.
    #[serde(default)]
    pub running: bool,
    /// A CRI (Kubernetes) container, created by containerd's CRI in
    /// namespace `k8s.io`: its workload key is the one NRI gives it
    /// (`<pod namespace>/…`), so the shim and NRI learn into the same
    /// workload. `false`: keyed `containerd:<namespace>/…`.
    #[serde(default)]
    pub cri: bool,
    /// The spec's `linux.seccomp` as the runtime filled it in (`None`: no
    /// profile, Unconfined). The shim sends it with `POST /v1/policies`,
    /// so the agent can tell the runtime's default profile from one the
    /// user set.
    #[serde(default)]
    pub seccomp: Option<serde_json::Value>,
}

/// Who decided a [`Policy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecidedBy {
    /// The agent, for this answer: the caller writes it into the spec.
    Agent,
    /// NRI's CreateContainer already did (CRI with NRI): the spec holds the
    /// decision; change nothing.
    Nri,
    /// The container's memory policy is `off`: change nothing.
    Off,
}

impl DecidedBy {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DecidedBy::Agent => "agent",
            DecidedBy::Nri => "nri",
            DecidedBy::Off => "off",
        }
    }
}

/// The answer to `POST /v1/policies`: what to write into a container's OCI
/// spec before `runc create`. Each `None` leaves the spec's value alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// `linux.resources.memory.limit`, bytes.
    pub memory_limit: Option<u64>,
    /// `linux.resources.unified["memory.high"]`, bytes (cgroup v2 nodes
    /// only; runc refuses `unified` on v1).
    pub memory_high: Option<u64>,
    /// `linux.resources.memory.swap`, bytes: the new limit, when the spec
    /// had swap set (memory + swap stays equal to the limit, no swap).
    pub memory_swap: Option<u64>,
    /// Annotations to add to the spec (`memory.hyperbox.dev/decision`,
    /// `memory.hyperbox.dev/user-limit`), as NRI's CreateContainer answer
    /// adds them.
    pub annotations: BTreeMap<String, String>,
    /// Who decided.
    pub decided_by: DecidedBy,
    /// Why, for people and logs.
    pub reason: String,
    /// The seccomp decision (`None`: the container's mode is `off`, or an
    /// older agent).
    #[serde(default)]
    pub seccomp: Option<SeccompDecision>,
}

/// Whether a [`SeccompDecision`] changes the spec's profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompAction {
    /// Leave `linux.seccomp` as the runtime set it (learning, a user's own
    /// profile, nothing learned yet, or a profile that failed to compile).
    Keep,
    /// Replace `linux.seccomp` with [`SeccompDecision::profile`].
    Install,
}

/// The seccomp half of a container's creation: the mode in force and the
/// profile to write into the spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeccompDecision {
    /// The mode asked for (annotation, `hb profile set-mode`, or the
    /// default).
    pub configured: SeccompMode,
    /// The mode in force for this run: `auto` resolves to `learn` or
    /// `enforce`; `complain` and `enforce` fall back to `learn` while
    /// nothing is learned.
    pub mode: SeccompMode,
    /// What to do with the spec.
    pub action: SeccompAction,
    /// The OCI `LinuxSeccomp` to install when `action` is `install`.
    pub profile: Option<serde_json::Value>,
    /// The workload whose profile this is.
    pub workload: String,
    /// Allowed syscalls in the installed profile.
    pub allowed: usize,
    /// Why, for people and logs.
    pub reason: String,
}

impl SeccompDecision {
    /// The `seccomp.hyperbox.dev/decision` annotation's value.
    pub fn annotation(&self) -> String {
        format!("{}: {}", self.mode.as_str(), self.reason)
    }
}

/// A syscall outside a container's profile, seen once per container
/// (complain: allowed and logged; enforce: denied).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeccompReport {
    /// Unix time.
    pub at: u64,
    /// Container id.
    pub container: String,
    /// Its workload.
    pub workload: String,
    /// The container's mode.
    pub mode: SeccompMode,
    /// Syscall name (`nr:<n>` when libseccomp does not know it).
    pub syscall: String,
    /// Its number.
    pub nr: u32,
    /// `x86_64` or `x86` (32-bit entry).
    pub arch: String,
    /// `denied` (enforce) or `allowed` (complain).
    pub outcome: String,
    /// Host pid of the caller.
    pub pid: u32,
    /// Its command name.
    pub comm: String,
}

/// One workload's learned profile, for `hb profile ls`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileSummary {
    /// Workload key.
    pub workload: String,
    /// `hb profile set-mode` override, if any.
    pub mode: Option<SeccompMode>,
    /// Enforcing under `auto` since (unix time).
    pub enforcing_since: Option<u64>,
    /// Learned syscalls (64-bit and 32-bit entries).
    pub syscalls: usize,
    /// Runs learned from.
    pub runs: u32,
    /// Runs in a row that added nothing.
    pub stable_runs: u32,
    /// First learned (unix time).
    pub first_learned: u64,
    /// Last grew (unix time).
    pub grown_at: u64,
    /// Syscalls reported outside the profile, for review.
    pub review: usize,
}

/// `GET /v1/profiles/{workload}`: one workload's profile in full.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileDetail {
    /// The summary.
    pub summary: ProfileSummary,
    /// Learned 64-bit syscalls by name.
    pub syscalls: Vec<String>,
    /// Learned 32-bit (`int 0x80`) syscalls by name.
    pub compat: Vec<String>,
    /// Syscalls reported outside the profile and how often (reported
    /// once per container), never learned silently.
    pub review: BTreeMap<String, u64>,
    /// Its latest reports, oldest first.
    pub reports: Vec<SeccompReport>,
    /// The profile as installed, in the format asked for (`oci`,
    /// `localhost`, `spo`).
    pub profile: serde_json::Value,
}

/// `PUT /v1/profiles` (`hb profile set-mode`): a workload's mode
/// override.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetMode {
    /// The workload key.
    pub workload: String,
    /// The mode; `None` clears the override.
    pub mode: Option<SeccompMode>,
}

impl Policy {
    /// An answer that leaves the spec as it is.
    pub fn unchanged(decided_by: DecidedBy, reason: impl Into<String>) -> Policy {
        Policy {
            memory_limit: None,
            memory_high: None,
            memory_swap: None,
            annotations: BTreeMap::new(),
            decided_by,
            reason: reason.into(),
            seccomp: None,
        }
    }
}

/// The answer to `POST /v1/containers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Registered {
    /// Tracked: 201 with the decision taken at registration, or 200 when
    /// it was tracked already (through `POST /v1/policies` or NRI; nothing
    /// was sized or written again).
    Tracked(Box<Container>),
    /// Not tracked (200): its policy is `off`.
    Untracked {
        /// Always [`MemoryPolicy::Off`].
        policy: MemoryPolicy,
    },
}

/// `GET /v1/containers/{id}` (`hb policy explain`): a container, what was
/// learned of its workload, and the decisions taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Explain {
    /// The container.
    pub container: Container,
    /// Peak working set of its workload's past runs, oldest first.
    pub learned_runs: Vec<u64>,
    /// Their p95: the working set the policy sizes from.
    pub learned_working_set: Option<u64>,
    /// Their largest.
    pub learned_peak: Option<u64>,
    /// The headroom a creation would use now.
    pub headroom_now: f64,
    /// The node's memory `some avg10` now, %.
    pub node_memory_some_avg10: f64,
    /// The container's decisions, oldest first.
    pub decisions: Vec<Decision>,
    /// Its seccomp decision at creation (`None`: mode off, or stopped).
    #[serde(default)]
    pub seccomp: Option<SeccompDecision>,
}

/// `GET /v1/profiles/diff`: what two profiles allow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileDiff {
    /// The first (a workload, or `default`).
    pub a: String,
    /// The second.
    pub b: String,
    /// Allowed by `a` only.
    pub only_a: Vec<String>,
    /// Allowed by `b` only.
    pub only_b: Vec<String>,
    /// Allowed by both.
    pub both: usize,
}

/// One exec in a container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exec {
    /// Host pid.
    pub pid: u32,
    /// Kernel monotonic ns.
    pub time_ns: u64,
    /// Executed path.
    pub path: String,
    /// First arguments.
    pub args: Vec<String>,
}

/// A closed TCP connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flow {
    /// The container connected (`false`: it accepted).
    pub outbound: bool,
    /// Local `ip:port` (IPv4; empty for IPv6).
    pub local: String,
    /// Remote `ip:port`.
    pub remote: String,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes sent and acknowledged.
    pub bytes_out: u64,
    /// Lifetime, ms.
    pub duration_ms: f64,
    /// When it closed, kernel monotonic ns.
    pub closed_ns: u64,
}

/// `GET /v1/containers/{id}/trace` (`hb trace`): what the eBPF tracer saw
/// of a container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// Container id.
    pub id: String,
    /// Container name.
    pub name: String,
    /// Its cgroup id.
    pub cgroup: u64,
    /// Still watched (running).
    pub live: bool,
    /// Calls per syscall number (32-bit entries have bit 16 set).
    pub syscalls: BTreeMap<u32, u64>,
    /// Calls per syscall name (`x86:<name>` for 32-bit entries, `nr:<n>`
    /// for numbers libseccomp cannot name).
    #[serde(default)]
    pub syscall_names: BTreeMap<String, u64>,
    /// Their sum.
    pub syscall_total: u64,
    /// Counting was limited to `tracing.syscall_window_secs` and the
    /// window has closed (samples still add to the counts).
    pub syscall_window_closed: bool,
    /// Syscalls per second as last measured.
    pub syscall_rate: Option<f64>,
    /// Samples counted after the window.
    pub syscall_samples: u64,
    /// Execs, oldest first (the newest 1024).
    pub execs: Vec<Exec>,
    /// Execs in total.
    pub exec_count: u64,
    /// Distinct paths opened, in first-access order.
    pub opened: Vec<String>,
    /// Opens in total.
    pub open_count: u64,
    /// Pids the OOM killer chose.
    pub oom_killed: Vec<u32>,
    /// Closed TCP connections, oldest first (the newest 1024).
    pub flows: Vec<Flow>,
    /// TCP connections closed in total.
    pub flow_count: u64,
    /// Bytes received over them.
    pub bytes_in: u64,
    /// Bytes sent over them.
    pub bytes_out: u64,
    /// This container's events lost to a full ring buffer.
    pub ring_drops: u64,
    /// This container's opens left out by sampling under pressure.
    pub sampled_out: u64,
}

/// What happened in a traced container, as streamed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TraceEvent {
    /// An exec.
    Exec(Exec),
    /// An open.
    Open {
        /// Pid.
        pid: u32,
        /// Path as passed.
        path: String,
        /// Flags.
        flags: u32,
    },
    /// A TCP connection closed.
    Flow(Flow),
    /// An OOM kill.
    OomKill {
        /// The victim.
        pid: u32,
    },
    /// A syscall outside the container's seccomp profile (once per
    /// container and syscall).
    Seccomp(SeccompReport),
}

/// A streamed event with its container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerEvent {
    /// Container id.
    pub container: String,
    /// What happened.
    pub event: TraceEvent,
}

/// What the stream says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StreamNote {
    /// The reader was too slow: `missed` events were dropped for it.
    Lagged {
        /// How many.
        missed: u64,
    },
}

/// One line of `GET /v1/containers/{id}/events` (`hb trace --follow`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EventLine {
    /// An event of the container.
    Event(ContainerEvent),
    /// A note about the stream.
    Note(StreamNote),
}

/// A line of [`Top`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopRow {
    /// Container id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Still running.
    pub live: bool,
    /// Its cgroup id.
    pub cgroup: u64,
    /// Syscalls counted so far.
    pub syscalls: u64,
    /// Its syscalls are being counted now (its window is open, or a
    /// sample is in progress).
    pub counting: bool,
    /// Syscalls per second as last measured.
    pub syscall_rate: Option<f64>,
    /// Execs so far.
    pub execs: u64,
    /// Opens so far.
    pub opens: u64,
    /// OOM kills so far.
    pub oom_kills: u64,
    /// TCP connections closed so far.
    pub flows: u64,
    /// Bytes received over them.
    pub bytes_in: u64,
    /// Bytes sent over them.
    pub bytes_out: u64,
    /// TCP connections open now.
    pub open_flows: u64,
    /// Its events lost to a full ring buffer.
    pub ring_drops: u64,
    /// Its opens left out by sampling under pressure.
    pub sampled_out: u64,
}

/// `GET /v1/top` (`hb top`): every traced container's counters now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Top {
    /// Unix time of the reading, ms.
    pub at_ms: u64,
    /// Events lost to a full ring buffer, all containers.
    pub ring_drops: u64,
    /// Opens left out by in-kernel sampling, all containers.
    pub sampled: u64,
    /// One row per traced container, by id.
    pub containers: Vec<TopRow>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_keep_their_wire_spellings() {
        let d = Decision {
            at: 1,
            action: Action::Raise.failed(),
            from: Some(1),
            to: None,
            reason: "r".into(),
            via: Route::None,
        };
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["action"], "raise-failed");
        assert_eq!(v["via"], "");
        assert_eq!(serde_json::from_value::<Decision>(v).unwrap(), d);
        for (r, s) in [
            (Route::NriCreate, "nri-create"),
            (Route::NriUpdate, "nri-update"),
            (Route::Cgroup, "cgroup"),
        ] {
            assert_eq!(serde_json::to_value(r).unwrap(), s);
            assert_eq!(r.as_str(), s);
        }
        for a in [
            Action::Create,
            Action::Lower,
            Action::Learn,
            Action::Observe,
        ] {
            assert_eq!(serde_json::to_value(a).unwrap(), a.as_str());
        }
    }

    #[test]
    fn a_registration_answer_is_a_container_or_policy_off() {
        let off: Registered = serde_json::from_str(r#"{"policy":"off"}"#).unwrap();
        assert_eq!(
            off,
            Registered::Untracked {
                policy: MemoryPolicy::Off
            }
        );
        let c = Container {
            id: "c1".into(),
            name: "app".into(),
            pod_namespace: String::new(),
            pod: String::new(),
            workload: "w".into(),
            policy: MemoryPolicy::Adaptive,
            policy_from: PolicyOrigin::Annotation,
            source: Source::Local,
            cgroups_path: "/x/c1".into(),
            bounds: Bounds {
                floor: 1,
                ceiling: None,
            },
            limit: Some(5),
            started: true,
            peak_working_set: 0,
            samples: 0,
            oom_kills: 0,
            decisions: Vec::new(),
        };
        let text = serde_json::to_string(&Registered::Tracked(Box::new(c.clone()))).unwrap();
        assert!(text.starts_with(r#"{"id":"c1""#), "{text}");
        assert_eq!(
            serde_json::from_str::<Registered>(&text).unwrap(),
            Registered::Tracked(Box::new(c))
        );
    }

    #[test]
    fn a_policy_answer_keeps_its_wire_shape() {
        let p = Policy {
            memory_limit: Some(30),
            memory_high: Some(27),
            memory_swap: None,
            annotations: BTreeMap::from([("k".to_string(), "v".to_string())]),
            decided_by: DecidedBy::Agent,
            reason: "r".into(),
            seccomp: None,
        };
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(
            text,
            r#"{"memory_limit":30,"memory_high":27,"memory_swap":null,"annotations":{"k":"v"},"decided_by":"agent","reason":"r","seccomp":null}"#
        );
        assert_eq!(serde_json::from_str::<Policy>(&text).unwrap(), p);
        // An agent from before seccomp answers without the field.
        let old = r#"{"memory_limit":30,"memory_high":27,"memory_swap":null,"annotations":{"k":"v"},"decided_by":"agent","reason":"r"}"#;
        assert_eq!(serde_json::from_str::<Policy>(old).unwrap(), p);
        for d in [DecidedBy::Agent, DecidedBy::Nri, DecidedBy::Off] {
            assert_eq!(serde_json::to_value(d).unwrap(), d.as_str());
        }
        // A registration from before `cri` existed is not a CRI one.
        let info: ContainerInfo =
            serde_json::from_str(r#"{"id":"c","name":"n","cgroups_path":"/d/c"}"#).unwrap();
        assert!(!info.cri && !info.running);
        assert_eq!(serde_json::to_value(Route::Spec).unwrap(), "spec");
    }

    #[test]
    fn event_lines_are_events_or_lag_notes() {
        let lagged: EventLine = serde_json::from_str(r#"{"kind":"lagged","missed":3}"#).unwrap();
        assert_eq!(lagged, EventLine::Note(StreamNote::Lagged { missed: 3 }));
        let line = r#"{"container":"c1","event":{"kind":"oom_kill","pid":7}}"#;
        let ev: EventLine = serde_json::from_str(line).unwrap();
        assert_eq!(
            ev,
            EventLine::Event(ContainerEvent {
                container: "c1".into(),
                event: TraceEvent::OomKill { pid: 7 }
            })
        );
        assert_eq!(serde_json::to_string(&ev).unwrap(), line);
        assert_eq!(
            serde_json::to_string(&lagged).unwrap(),
            r#"{"kind":"lagged","missed":3}"#
        );
    }

    #[test]
    fn syscall_numbers_are_object_keys() {
        let text = r#"{"id":"c","name":"n","cgroup":1,"live":true,"syscalls":{"0":5,"231":1},
            "syscall_total":6,"syscall_window_closed":false,"syscall_rate":null,"syscall_samples":0,
            "execs":[],"exec_count":0,"opened":[],"open_count":0,"oom_killed":[],"flows":[],
            "flow_count":0,"bytes_in":0,"bytes_out":0,"ring_drops":0,"sampled_out":0}"#;
        let t: Trace = serde_json::from_str(text).unwrap();
        assert_eq!(t.syscalls.get(&231), Some(&1));
        assert_eq!(serde_json::to_value(&t).unwrap()["syscalls"]["0"], 5);
    }
}

/// `POST /v1/prewarm` on the snapshotter's control socket: fetch the
/// learned prefetch lists of `image`'s lazy layers ahead of its next pull.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrewarmRequest {
    /// The image reference (a tag or a digest).
    pub image: String,
    /// Stop when the node's I/O `some avg10` (%) reaches this; 0 never.
    #[serde(default)]
    pub max_io_pressure: f64,
}

/// What a prewarm of one image did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prewarm {
    /// The image as asked.
    pub image: String,
    /// Its manifest for the node's platform.
    pub manifest: String,
    /// Whether it has a hyperbox index (without one nothing is lazy).
    pub indexed: bool,
    /// Per layer, bottom first.
    pub layers: Vec<Warmed>,
    /// How long it took, in milliseconds.
    pub ms: u64,
}

/// What a prewarm did with one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Warmed {
    /// The layer's digest.
    pub layer: String,
    /// What happened.
    pub outcome: WarmOutcome,
    /// Chunks in its learned list (0 when none fits).
    pub listed: usize,
    /// Chunks fetched by this prewarm.
    pub fetched: usize,
}

/// What a prewarm did with one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarmOutcome {
    /// Its learned chunks are local now.
    Prewarmed,
    /// Stopped part way: the node's I/O came under pressure.
    Stopped,
    /// Already on the node (pulled, filling, or whole).
    OnNode,
    /// No run taught a list for it: nothing to fetch ahead.
    NoList,
    /// The index does not list it, or lists it under another diff_id.
    NotIndexed,
    /// Its index entry did not match the image before on this node.
    Refused,
    /// Parked layers already hold as much as the node lets them.
    NoRoom,
    /// Fetching its metadata failed (nothing of it is kept), or some
    /// listed chunks could not be fetched.
    Failed(String),
}

impl WarmOutcome {
    /// Its name as `hb` prints it.
    pub fn as_str(&self) -> &str {
        match self {
            WarmOutcome::Prewarmed => "prewarmed",
            WarmOutcome::Stopped => "stopped (I/O pressure)",
            WarmOutcome::OnNode => "on the node",
            WarmOutcome::NoList => "no learned list",
            WarmOutcome::NotIndexed => "not in the index",
            WarmOutcome::Refused => "refused here before",
            WarmOutcome::NoRoom => "no room (parked layers at their limit)",
            WarmOutcome::Failed(_) => "failed",
        }
    }
}
