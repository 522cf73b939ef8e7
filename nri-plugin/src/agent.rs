//! The agent: its [`State`], the node's cgroup layout, the NRI link, the
//! metrics and the tracer, and the NRI event handlers that feed them.
//!
//! NRI handlers only read and write the state in memory (plus a few cgroup
//! files at stop); everything slow (sampling, PSI triggers, applying
//! changes, saving what was learned) happens in [`crate::memory::controller`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hyperbox_api::annotations::{
    MEMORY_DECISION, MEMORY_POLICY, MEMORY_USER_LIMIT, SECCOMP_DECISION, TRACE_ENABLED, WORKLOAD,
};
use hyperbox_api::time::unix_now;
use hyperbox_api::types::{
    Action, ContainerInfo, DecidedBy, Decision, Policy, PolicyOrigin, Route, SeccompAction,
    SeccompDecision, Source,
};
use hyperbox_config::{Memory, MemoryPolicy, SeccompMode};
use hyperbox_nri_proto::api::{self, Event};
use hyperbox_nri_proto::plugin::{Events, Link};
use tokio::sync::mpsc;

use crate::cgroup::Layout;
use crate::memory::policy::{self, Bounds};
use crate::memory::store::Store;
use crate::metrics::{Metrics, Snapshot, Snapshots, TraceCounters};
use crate::psi::history::History;
use crate::seccomp::names;
use crate::seccomp::profile::SpecKind;
use crate::seccomp::runs::{Run, Seccomp};
use crate::state::{HISTORY, Job, State, Tracked};
use crate::trace::Tracing;

/// The agent.
#[derive(Debug)]
pub struct Agent {
    /// What it tracks and knows.
    pub state: State,
    /// The node's cgroup layout.
    pub layout: Layout,
    /// Node memory, bytes.
    pub mem_total: u64,
    /// The NRI connection.
    pub link: Arc<Link>,
    /// Metrics families.
    pub metrics: Metrics,
    /// Per-container eBPF tracing.
    pub tracing: Arc<Tracing>,
    /// The shim's journal of skipped policies (`shim-skipped.log` beside
    /// the agent's socket), counted at each scrape.
    pub shim_journal: std::sync::OnceLock<std::path::PathBuf>,
    /// Learned seccomp profiles and the containers they apply to.
    pub seccomp: Seccomp,
    /// The NRI runtime applies seccomp adjustments (NRI 0.10+, containerd
    /// 2.2+).
    nri_seccomp: AtomicBool,
    /// Which images start here and how often, with `agent.prewarm`.
    pub starts: std::sync::OnceLock<Arc<crate::prewarm::Starts>>,
}

impl Agent {
    /// A new agent; the receiver feeds the controller.
    pub fn new(
        memory: Memory,
        layout: Layout,
        store: Store,
        link: Arc<Link>,
        tracing: Arc<Tracing>,
        seccomp: Seccomp,
    ) -> (Arc<Agent>, mpsc::UnboundedReceiver<Job>) {
        let (state, jobs) = State::new(memory, store);
        let agent = Agent {
            state,
            layout,
            mem_total: crate::cgroup::mem_total(),
            link,
            metrics: Metrics::default(),
            tracing,
            shim_journal: std::sync::OnceLock::new(),
            seccomp,
            nri_seccomp: AtomicBool::new(false),
            starts: std::sync::OnceLock::new(),
        };
        (Arc::new(agent), jobs)
    }

    /// Counts a container start of `image` for prewarming.
    pub fn note_start(&self, image: &str) {
        if let Some(s) = self.starts.get() {
            s.note(image, hyperbox_api::time::unix_now());
        }
    }

    /// A container's policy and where it came from.
    fn policy_of(&self, annotations: &HashMap<String, String>) -> (MemoryPolicy, PolicyOrigin) {
        let default = || {
            (
                self.state.memory_config().default_policy,
                PolicyOrigin::Default,
            )
        };
        match annotations.get(MEMORY_POLICY) {
            Some(v) => match MemoryPolicy::parse(v) {
                Some(p) => (p, PolicyOrigin::Annotation),
                None => {
                    tracing::warn!(value = %v, "unknown {MEMORY_POLICY} value; using the default");
                    default()
                }
            },
            None => default(),
        }
    }

    /// Starts tracking a container (from NRI or the local API). A CRI
    /// container that reaches the local API (`info.cri`) is keyed as NRI
    /// keys it, so both paths learn into one workload.
    pub fn track(&self, info: ContainerInfo, source: Source) -> Option<Tracked> {
        let (policy, policy_from) = self.policy_of(&info.annotations);
        if policy == MemoryPolicy::Off {
            return None;
        }
        let cfg = self.state.memory_config();
        let t = Tracked {
            workload: workload_of(&info, source),
            id: info.id,
            name: info.name,
            pod_namespace: info.pod_namespace,
            pod: info.pod,
            policy,
            policy_from,
            source,
            cgroup: self.layout.locate(&info.cgroups_path),
            cgroups_path: info.cgroups_path,
            bounds: Bounds::new(&cfg, info.request, info.user_limit.unwrap_or(info.limit)),
            limit: info.limit,
            had_swap: info.had_swap,
            started: info.running,
            history: History::new(HISTORY),
            peak_working_set: 0,
            samples: 0,
            oom_kills: 0,
            last_change: None,
            triggered: false,
            trigger_armed: false,
            decisions: Default::default(),
        };
        self.state.insert(t.clone());
        self.state.wake();
        Some(t)
    }

    /// Sizes a new container: the limit to set at creation, if any, to be
    /// applied `via` (recorded in the decision).
    pub fn size_new(&self, t: &mut Tracked, via: Route) -> Option<u64> {
        let cfg = self.state.memory_config();
        let learned = self.state.learned(&t.workload);
        let (ws, runs) = learned
            .map(|w| (w.working_set(), w.runs.len()))
            .unwrap_or((None, 0));
        if t.policy != MemoryPolicy::Adaptive {
            t.record(Decision {
                at: unix_now(),
                action: Action::Observe,
                from: t.limit,
                to: t.limit,
                reason: match ws {
                    Some(ws) => format!(
                        "policy observe: learning only (working set p95 {} over {runs} run(s))",
                        policy::bytes(ws)
                    ),
                    None => "policy observe: learning only (no history yet)".into(),
                },
                via: Route::None,
            });
            return None;
        }
        let init = policy::initial(&cfg, ws, runs, self.state.node_memory_some(), t.bounds);
        let (action, via) = match init.limit {
            Some(_) => (Action::Create, via),
            None => (Action::Learn, Route::None),
        };
        t.record(Decision {
            at: unix_now(),
            action,
            from: t.limit,
            to: init.limit.or(t.limit),
            reason: init.reason,
            via,
        });
        if let Some(l) = init.limit {
            t.limit = Some(l);
            t.last_change = Some(Instant::now());
        }
        init.limit
    }

    /// `memory.high` for a hard limit of `limit`, where the memory
    /// controller is v2 and `memory.high_ratio` is set.
    pub fn high_for(&self, limit: u64, v2: bool) -> Option<u64> {
        let ratio = self.state.memory_config().high_ratio;
        (v2 && ratio > 0.0).then_some((limit as f64 * ratio) as u64)
    }

    /// NRI resources setting the limit to `limit` (with `memory.high` on
    /// v2, and swap kept equal to the limit when the container had it).
    pub fn resources_for(&self, limit: u64, had_swap: bool) -> api::LinuxResources {
        let high = self.high_for(limit, self.layout.memory_is_v2());
        let mut r = api::LinuxResources::memory(limit as i64, high.map(|h| h as i64));
        if had_swap && let Some(m) = r.memory.as_mut() {
            m.swap = Some(api::OptionalInt64 {
                value: limit as i64,
            });
        }
        r
    }

    /// Forgets what is tracked under `info.id` when it belongs to an
    /// earlier run of that id (another cgroup, or started while `info`
    /// is not: a run never unregistered, the shim killed), ending that run
    /// as a stop would. `true` when something is tracked under the id now.
    pub fn forget_stale(&self, info: &ContainerInfo) -> bool {
        let Some(c) = self.state.get(&info.id) else {
            return false;
        };
        if c.cgroups_path == info.cgroups_path && (info.running || !c.started) {
            return true;
        }
        tracing::warn!(container = %info.id, "an earlier run under this id was never unregistered; ending it");
        self.tracing.forget(&info.id);
        self.state.finish(&info.id, true);
        false
    }

    /// `POST /v1/policies`: the memory settings of a container about to be
    /// created (the shim asks before `runc create`). What NRI's
    /// CreateContainer does, answered for the shim to write into the spec:
    /// the container is tracked (not started) and sized from what was
    /// learned. A container NRI already decided for (CRI with NRI) is left
    /// alone; asked again (a retry), the same answer is given and nothing is
    /// decided twice.
    pub fn policy_at_create(&self, mut info: ContainerInfo) -> Policy {
        // Not created yet, whatever the caller says: nothing is sampled
        // before its registration checks the real cgroup.
        info.running = false;
        let seccomp = self.seccomp_for_shim(&info);
        let mut answer = self.memory_at_create(info);
        answer.seccomp = seccomp;
        answer
    }

    /// The seccomp half of `POST /v1/policies`. A container NRI decided
    /// for keeps that decision: installed through NRI already (containerd
    /// 2.2+), or handed to the shim to install (containerd 1.7, whose NRI
    /// cannot set seccomp). A retry gets the same answer.
    fn seccomp_for_shim(&self, info: &ContainerInfo) -> Option<SeccompDecision> {
        if let Some(run) = self.seccomp.run(&info.id) {
            let mut d = run.decision;
            if run.via_nri {
                d.action = SeccompAction::Keep;
                d.profile = None;
                d.reason = format!("{} (installed through NRI)", d.reason);
            }
            return Some(d);
        }
        let kind = SpecKind::of_spec(info.seccomp.as_ref());
        let d = self.seccomp_at_create(info, Source::Local, kind, false);
        (d.configured != SeccompMode::Off).then_some(d)
    }

    /// The seccomp half of NRI's CreateContainer. Where the runtime cannot
    /// apply a seccomp adjustment (containerd before 2.2), an installing
    /// decision waits for hyperbox's shim, if it runs the container.
    fn seccomp_from_nri(
        &self,
        info: &ContainerInfo,
        c: &api::Container,
    ) -> Option<SeccompDecision> {
        let kind = crate::seccomp::nri::kind(c, info.seccomp.as_ref());
        let nri = self.nri_seccomp.load(Ordering::Relaxed);
        let mut d = self.seccomp_at_create(info, Source::Nri, kind, nri);
        if d.configured == SeccompMode::Off {
            return None;
        }
        if d.action == SeccompAction::Install && !nri {
            d.reason = format!(
                "{} (containerd's NRI here cannot set seccomp: installed only when hyperbox's shim runs the container)",
                d.reason
            );
        }
        Some(d)
    }

    /// Decides container `info`'s seccomp profile at creation (see
    /// [`Seccomp::at_create`]), counting the decision.
    pub fn seccomp_at_create(
        &self,
        info: &ContainerInfo,
        source: Source,
        kind: SpecKind,
        nri: bool,
    ) -> SeccompDecision {
        let workload = workload_of(info, source);
        let (d, refused) = self.seccomp.at_create(
            &info.id,
            &workload,
            &info.annotations,
            kind,
            info.seccomp.as_ref(),
            self.traced_dir(&info.cgroups_path),
            nri,
        );
        if let Some(r) = refused {
            self.metrics.seccomp_rejected.inc();
            tracing::error!(container = %info.id, workload = %workload, error = %r.0,
                "learned seccomp profile refused by libseccomp; not installed");
        }
        if d.configured != SeccompMode::Off {
            let action = match d.action {
                SeccompAction::Install => "install",
                SeccompAction::Keep => "keep",
            };
            self.metrics.seccomp_decision(d.mode.as_str(), action);
            tracing::info!(container = %info.id, workload = %workload, mode = d.mode.as_str(),
                action, allowed = d.allowed, reason = %d.reason, "seccomp decision");
        }
        d
    }

    /// Ends container `id`'s run: tracing stops, a learning run's
    /// syscalls join its workload's profile, its peak is learned; with
    /// `remove`, everything about it is dropped.
    pub fn end_run(&self, id: &str, remove: bool) {
        self.tracing.stop(id);
        let counts = self.tracing.syscalls(id);
        if let Some(c) = &counts {
            self.complaints(id, c);
        }
        match self.seccomp.finish(id, counts.as_ref()) {
            Ok(Some((workload, added))) => {
                self.metrics.seccomp_learned.inc_by(added.len() as u64);
                if !added.is_empty() {
                    tracing::info!(container = id, workload = %workload, added = ?added, "seccomp profile grew");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(container = id, error = %hyperbox_api::error_chain(&e), "save the learned syscalls")
            }
        }
        if remove {
            self.tracing.forget(id);
        }
        self.state.finish(id, remove);
    }

    /// The cgroup directory the tracer identifies a container by: its v1
    /// memory cgroup on pure v1 hosts, its v2 cgroup otherwise.
    fn traced_dir(&self, cgroups_path: &str) -> Option<std::path::PathBuf> {
        let cgroup = self.layout.locate(cgroups_path)?;
        if self.tracing.uses_v1() {
            Some(cgroup.memory)
        } else {
            cgroup.psi
        }
    }

    /// A seccomp audit record: reported once per container when it is a
    /// syscall outside a container's installed profile. `false` when no
    /// container could be found for it (yet: a process that exited at
    /// once is found through its exec, which the tracer may deliver a
    /// little after the audit record; the caller retries once).
    pub fn seccomp_audit(&self, rec: &crate::seccomp::audit::Record, last_try: bool) -> bool {
        let id = self
            .seccomp
            .container_of_pid(rec.pid)
            .or_else(|| self.tracing.container_of_pid(rec.pid));
        let Some(id) = id else {
            if last_try {
                self.metrics.seccomp_unattributed.inc();
                tracing::debug!(pid = rec.pid, comm = %rec.comm, nr = rec.nr, "seccomp audit record of no known container");
            }
            return false;
        };
        self.publish_report(&id, rec.arch, rec.nr, rec.pid, &rec.comm);
        true
    }

    /// A syscall the tracer saw refused (EPERM or ENOSYS) in a container
    /// under an installed profile: a denial when the profile does not
    /// allow it (a refusal of an allowed syscall is the kernel's own).
    pub fn seccomp_refused(&self, r: &crate::trace::Refusal) {
        let Some(run) = self.seccomp.run(&r.container) else {
            return;
        };
        let (arch, nr) = names::split(r.nr);
        if !run.allows(arch, nr) {
            self.publish_report(&r.container, arch, nr, r.pid, &r.comm);
        }
    }

    /// A complaining container's syscalls outside its profile, from what
    /// the tracer counted (a complaining profile allows them, so they
    /// reach the tracer): reported once each, with no pid (the kernel's
    /// audit record, when it arrives first, carries one).
    fn complaints(&self, id: &str, counts: &std::collections::BTreeMap<u32, u64>) {
        let Some(run) = self.seccomp.run(id).filter(|r| r.complains()) else {
            return;
        };
        for key in counts.keys() {
            let (arch, nr) = names::split(*key);
            if !run.allows(arch, nr) {
                self.publish_report(id, arch, nr, 0, "");
            }
        }
    }

    /// Checks every complaining container's counts so far (the agent's
    /// periodic sweep).
    pub fn sweep_complaints(&self) {
        for id in self.seccomp.complaining() {
            if let Some(counts) = self.tracing.syscalls(&id) {
                self.complaints(&id, &counts);
            }
        }
    }

    fn publish_report(&self, id: &str, arch: names::Arch, nr: u32, pid: u32, comm: &str) {
        if let Some(r) = self.seccomp.report(id, arch, nr, pid, comm) {
            tracing::warn!(container = %r.container, workload = %r.workload, mode = r.mode.as_str(),
                syscall = %r.syscall, arch = %r.arch, outcome = %r.outcome, pid = r.pid, comm = %r.comm,
                "syscall outside the seccomp profile");
            self.metrics.seccomp_report(&r);
            self.tracing.seccomp_report(&r);
        }
    }

    /// The memory half of `POST /v1/policies`.
    fn memory_at_create(&self, info: ContainerInfo) -> Policy {
        if self.forget_stale(&info)
            && let Some(c) = self.state.get(&info.id)
        {
            if c.source == Source::Nri {
                return Policy::unchanged(
                    DecidedBy::Nri,
                    "decided through NRI CreateContainer; the spec holds it",
                );
            }
            let created = c
                .decisions
                .iter()
                .rev()
                .find(|d| d.action == Action::Create);
            let limit = created.and(c.limit);
            let reason = created
                .or(c.decisions.last())
                .map(|d| d.reason.clone())
                .unwrap_or_default();
            return self.policy_answer(limit, info.had_swap, c.bounds.ceiling, reason);
        }
        let by_annotation = info
            .annotations
            .get(MEMORY_POLICY)
            .and_then(|v| MemoryPolicy::parse(v))
            .is_some();
        let Some(mut t) = self.track(info, Source::Local) else {
            return Policy::unchanged(
                DecidedBy::Off,
                if by_annotation {
                    format!("memory policy off ({MEMORY_POLICY})")
                } else {
                    "memory policy off (memory.default_policy)".into()
                },
            );
        };
        let limit = self.size_new(&mut t, Route::Spec);
        let reason = t
            .decisions
            .back()
            .map(|d| d.reason.clone())
            .unwrap_or_default();
        let (had_swap, ceiling) = (t.had_swap, t.bounds.ceiling);
        self.state.insert(t);
        if limit.is_some() {
            self.metrics.decision(Action::Create);
        }
        self.policy_answer(limit, had_swap, ceiling, reason)
    }

    /// The agent's answer for a container sized to `limit` (`None`: left
    /// as asked), with the annotations NRI's CreateContainer would add.
    fn policy_answer(
        &self,
        limit: Option<u64>,
        had_swap: bool,
        ceiling: Option<u64>,
        reason: String,
    ) -> Policy {
        let mut annotations = std::collections::BTreeMap::new();
        if limit.is_some() {
            annotations.insert(MEMORY_DECISION.to_string(), reason.clone());
            annotations.insert(MEMORY_USER_LIMIT.to_string(), user_limit_value(ceiling));
        }
        Policy {
            memory_limit: limit,
            memory_high: limit.and_then(|l| self.high_for(l, self.layout.memory_is_v2())),
            memory_swap: limit.filter(|_| had_swap),
            annotations,
            decided_by: DecidedBy::Agent,
            reason,
            seccomp: None,
        }
    }

    /// Starts tracing a container before its workload runs, unless its
    /// annotations opt out or the tracer is not loaded.
    pub fn trace_start(&self, info: &ContainerInfo) {
        if !self.tracing.available() {
            return;
        }
        // A run decided nowhere yet (registered without asking for
        // policies) learns when its mode allows.
        if self.seccomp.run(&info.id).is_none() {
            self.seccomp.learn_only(
                &info.id,
                &workload_of(info, Source::Local),
                &info.annotations,
                SpecKind::of_spec(info.seccomp.as_ref()),
            );
        }
        let run = self.seccomp.run(&info.id);
        // A learning or complaining run is counted for its whole life,
        // whatever the window and the opt-out say: its profile, or its
        // complaints, need every syscall. An enforced run that opted out
        // goes without denial reports (and without their cost:
        // docs/seccomp.md); one that did not has its refusals reported for
        // its whole life (the exit hook) and its syscalls counted as any
        // container's are: for the window, then in samples.
        let whole_life = run.as_ref().is_some_and(Run::counts_whole_life);
        let enforced = run.as_ref().is_some_and(Run::enforces);
        let opted_out = info
            .annotations
            .get(TRACE_ENABLED)
            .is_some_and(|v| v.trim() == "false");
        if opted_out && !whole_life {
            return;
        }
        let Some(dir) = self.traced_dir(&info.cgroups_path) else {
            tracing::warn!(container = %info.id, path = %info.cgroups_path, "no cgroup to trace");
            return;
        };
        match self.tracing.watch(info, &dir, whole_life, enforced) {
            Ok(()) => tracing::debug!(container = %info.id, "tracing"),
            Err(e) => {
                tracing::warn!(container = %info.id, error = %hyperbox_api::error_chain(&e), "cannot trace")
            }
        }
    }
}

impl Snapshots for Agent {
    fn snapshot(&self) -> Snapshot {
        let tr = &self.tracing;
        Snapshot {
            node: self.state.node(),
            containers: self.state.gauges(),
            trace: tr.available().then(|| TraceCounters {
                // One pass over the kernel map for every container (as hb top).
                rows: tr.top(),
                ring_drops: tr.drops(),
                sampled: tr.sampled(),
            }),
            // One line per skip; the file only grows, as a counter does.
            shim_skipped: self.shim_journal.get().map(|p| {
                std::fs::read(p)
                    .map(|b| b.iter().filter(|c| **c == b'\n').count() as u64)
                    .unwrap_or(0)
            }),
        }
    }
}

/// What the agent needs to know about a container, from NRI's messages.
pub fn info_from_nri(pod: &api::PodSandbox, c: &api::Container) -> ContainerInfo {
    let res = c.linux.as_ref().and_then(|l| l.resources.as_ref());
    let mut annotations = pod.annotations.clone();
    annotations.extend(c.annotations.clone());
    ContainerInfo {
        id: c.id.clone(),
        name: c.name.clone(),
        pod_namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
        // CRI's annotation on both lines; NRI's own image field where the
        // runtime sends it (containerd 2.x) and the annotation is missing.
        image: c
            .annotations
            .get("io.kubernetes.cri.image-name")
            .cloned()
            .or_else(|| c.image.as_ref().map(|i| i.name.clone()))
            .unwrap_or_default(),
        annotations,
        cgroups_path: c
            .linux
            .as_ref()
            .map(|l| l.cgroups_path.clone())
            .unwrap_or_default(),
        limit: res.and_then(|r| r.memory_limit()).map(|v| v as u64),
        user_limit: c.annotations.get(MEMORY_USER_LIMIT).map(|v| v.parse().ok()),
        request: res.and_then(|r| r.memory_request()).map(|v| v as u64),
        had_swap: res
            .and_then(|r| r.memory.as_ref())
            .and_then(|m| m.swap.as_ref())
            .is_some_and(|s| s.value > 0),
        running: c.state == api::CONTAINER_RUNNING,
        cri: true,
        seccomp: c
            .linux
            .as_ref()
            .and_then(|l| l.seccomp_policy.as_ref())
            .map(crate::seccomp::nri::to_json),
    }
}

/// A container's workload key as `source` sees it; a CRI container is
/// keyed as NRI keys it, whichever path it reached the agent by, so the
/// shim and NRI learn into one workload.
fn workload_of(info: &ContainerInfo, source: Source) -> String {
    workload_key(info, if info.cri { Source::Nri } else { source })
}

/// Whether an NRI runtime speaking `nri_version` (`v0.12.3`; empty for
/// containerd 1.7) applies seccomp adjustments: NRI 0.10 and later.
fn nri_sets_seccomp(nri_version: &str) -> bool {
    let mut parts = nri_version.trim_start_matches('v').split('.');
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    major > 0 || minor >= 10
}

/// The `memory.hyperbox.dev/user-limit` value of a ceiling.
fn user_limit_value(ceiling: Option<u64>) -> String {
    ceiling.map_or("none".to_string(), |c| c.to_string())
}

/// The namespace part of a workload key: the pod namespace for CRI
/// containers (NRI), `containerd:<namespace>` for containers registered
/// through the local API (the shim sends the containerd namespace in
/// `pod_namespace`; `default` when absent). Neither a Kubernetes namespace
/// (a DNS label) nor a containerd namespace holds `/` or `:`, so no two
/// namespaces share a key prefix, and the NRI and local spaces never meet.
pub fn workload_namespace(info: &ContainerInfo, source: Source) -> String {
    match source {
        Source::Local => {
            let ns = info.pod_namespace.trim();
            format!("containerd:{}", if ns.is_empty() { "default" } else { ns })
        }
        _ => info.pod_namespace.clone(),
    }
}

/// The workload key, always prefixed by the container's namespace (see
/// [`workload_namespace`]): `<namespace>/<annotation>` when the
/// `hyperbox.dev/workload` annotation names the workload, else
/// `<namespace>/<container>@<repository>`. A tenant's annotation therefore
/// only ever names a workload of its own namespace: it cannot read or
/// poison another namespace's history.
pub fn workload_key(info: &ContainerInfo, source: Source) -> String {
    let ns = workload_namespace(info, source);
    if let Some(k) = info
        .annotations
        .get(WORKLOAD)
        .filter(|k| !k.trim().is_empty())
    {
        return format!("{ns}/{}", k.trim());
    }
    format!("{ns}/{}@{}", info.name, image_repository(&info.image))
}

/// `registry/repo:tag@sha256:...` → `registry/repo`.
pub fn image_repository(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    // A ':' after the last '/' is a tag; before it, a registry port.
    match no_digest.rfind(':') {
        Some(i) if !no_digest[i..].contains('/') => &no_digest[..i],
        _ => no_digest,
    }
}

impl Events for Agent {
    fn configure(&self, req: &api::ConfigureRequest) -> Result<i32, String> {
        tracing::info!(runtime = %req.runtime_name, version = %req.runtime_version, nri = %req.nri_version, "configured by the NRI runtime");
        if !req.config.trim().is_empty() {
            // A pre-registered plugin's conf.d file: a hyperbox config
            // whose [memory] section replaces ours.
            let c = hyperbox_config::Config::parse(
                &req.config,
                std::path::Path::new("<NRI plugin config>"),
            )
            .map_err(|e| e.to_string())?;
            self.state.set_memory_config(c.memory);
        }
        // containerd 1.7 does not say which NRI it speaks; 2.x does.
        let nri = if req.nri_version.is_empty() {
            String::new()
        } else {
            format!(" (NRI {})", req.nri_version)
        };
        self.state.set_runtime(Some(format!(
            "{} {}{nri}",
            req.runtime_name, req.runtime_version
        )));
        self.nri_seccomp
            .store(nri_sets_seccomp(&req.nri_version), Ordering::Relaxed);
        // Explicit, and only events NRI v0.6.1 knows: an empty mask would
        // subscribe a v0.12 runtime's validation call too (every creation
        // waiting on us), and a later bit makes 1.7 drop the plugin.
        Ok([
            Event::CreateContainer,
            Event::StartContainer,
            Event::UpdateContainer,
            Event::StopContainer,
            Event::RemoveContainer,
        ]
        .iter()
        .fold(0, |m, e| m | e.mask()))
    }

    fn synchronize(&self, req: &api::SynchronizeRequest) -> Vec<api::ContainerUpdate> {
        let pods: HashMap<&str, &api::PodSandbox> =
            req.pods.iter().map(|p| (p.id.as_str(), p)).collect();
        let default_pod = api::PodSandbox::default();
        let mut adopted = 0;
        for c in &req.containers {
            if c.state == api::CONTAINER_STOPPED {
                continue;
            }
            let pod = pods
                .get(c.pod_sandbox_id.as_str())
                .copied()
                .unwrap_or(&default_pod);
            if !self.state.contains(&c.id)
                && self.track(info_from_nri(pod, c), Source::Nri).is_some()
            {
                adopted += 1;
            }
            // A restarted agent traces the running containers again, from
            // now on (what ran before the restart is gone with the old
            // agent's maps).
            if c.state == api::CONTAINER_RUNNING && !self.tracing.is_watching(&c.id) {
                self.trace_start(&info_from_nri(pod, c));
            }
        }
        tracing::info!(
            pods = req.pods.len(),
            containers = req.containers.len(),
            adopted,
            "synchronized with the runtime"
        );
        Vec::new()
    }

    fn create_container(
        &self,
        pod: &api::PodSandbox,
        container: &api::Container,
    ) -> api::CreateContainerResponse {
        let info = info_from_nri(pod, container);
        self.note_start(&info.image);
        let seccomp = self.seccomp_from_nri(&info, container);
        let mut annotations = HashMap::new();
        let mut linux = api::LinuxContainerAdjustment::default();
        if let Some(d) = &seccomp {
            annotations.insert(SECCOMP_DECISION.to_string(), d.annotation());
            if let (SeccompAction::Install, Some(p), true) = (
                d.action,
                &d.profile,
                self.nri_seccomp.load(Ordering::Relaxed),
            ) {
                linux.seccomp_policy = Some(crate::seccomp::nri::from_json(p));
            }
        }
        let limit = self.track(info, Source::Nri).and_then(|mut t| {
            let limit = self.size_new(&mut t, Route::NriCreate);
            let decision = t.decisions.back().map(|d| d.reason.clone());
            let (had_swap, ceiling) = (t.had_swap, t.bounds.ceiling);
            self.state.insert(t);
            limit.map(|l| (l, had_swap, ceiling, decision))
        });
        if let Some((limit, had_swap, ceiling, decision)) = limit {
            self.metrics.decision(Action::Create);
            linux.resources = Some(self.resources_for(limit, had_swap));
            if let Some(d) = decision {
                annotations.insert(MEMORY_DECISION.to_string(), d);
            }
            annotations.insert(MEMORY_USER_LIMIT.to_string(), user_limit_value(ceiling));
        }
        if annotations.is_empty() && linux == api::LinuxContainerAdjustment::default() {
            return api::CreateContainerResponse::default();
        }
        api::CreateContainerResponse {
            adjust: Some(api::ContainerAdjustment {
                annotations,
                linux: Some(linux),
            }),
            update: Vec::new(),
            evict: Vec::new(),
        }
    }

    fn update_container(
        &self,
        _pod: &api::PodSandbox,
        container: &api::Container,
        resources: Option<&api::LinuxResources>,
    ) -> api::UpdateContainerResponse {
        // The kubelet (or an operator) changed the container's resources:
        // its new limit is the ceiling from now on.
        if let Some(r) = resources {
            self.state.user_resized(
                &container.id,
                r.memory_limit().map(|v| v as u64),
                r.memory_request().map(|v| v as u64),
            );
        }
        api::UpdateContainerResponse::default()
    }

    fn container_event(&self, event: Event, pod: &api::PodSandbox, container: &api::Container) {
        match event {
            Event::StartContainer => {
                // The shim's registration may have started tracing before
                // the workload ran; watching again would start it over.
                if !self.tracing.is_watching(&container.id) {
                    self.trace_start(&info_from_nri(pod, container));
                }
                self.state.set_started(&container.id);
                self.state.wake();
            }
            Event::PostStartContainer => {
                self.state.set_started(&container.id);
                self.state.wake();
            }
            Event::StopContainer => self.end_run(&container.id, false),
            Event::RemoveContainer => self.end_run(&container.id, true),
            _ => {}
        }
    }

    fn observe(&self, method: &str, elapsed: Duration, ok: bool) {
        self.metrics.nri_request(method, elapsed, ok);
    }

    fn connected(&self, runtime: Option<String>) {
        self.metrics.nri_connected.set(i64::from(runtime.is_some()));
        if runtime.is_none() {
            self.state.set_runtime(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_keys_use_the_repository_or_the_annotation() {
        let mut info = ContainerInfo {
            name: "web".into(),
            pod_namespace: "shop".into(),
            image: "reg.local:5000/team/web:v2@sha256:abcd".into(),
            ..Default::default()
        };
        // The default key is what it was before namespacing (old records
        // are still found).
        assert_eq!(
            workload_key(&info, Source::Nri),
            "shop/web@reg.local:5000/team/web"
        );
        info.annotations.insert(WORKLOAD.into(), "frontend".into());
        assert_eq!(workload_key(&info, Source::Nri), "shop/frontend");
        assert_eq!(image_repository("busybox"), "busybox");
        assert_eq!(image_repository("localhost:5000/x"), "localhost:5000/x");
    }

    #[test]
    fn a_tenant_cannot_name_another_namespaces_workload() {
        // The victim: namespace shop, its default key.
        let victim = ContainerInfo {
            name: "web".into(),
            pod_namespace: "shop".into(),
            image: "reg/team/web:v1".into(),
            ..Default::default()
        };
        let victim_key = workload_key(&victim, Source::Nri);
        // The attacker, in namespace evil, names the victim's key (and its
        // annotated form) in the workload annotation.
        for claimed in [victim_key.as_str(), "web@reg/team/web", "frontend"] {
            let mut evil = victim.clone();
            evil.pod_namespace = "evil".into();
            evil.annotations.insert(WORKLOAD.into(), claimed.into());
            let k = workload_key(&evil, Source::Nri);
            assert!(k.starts_with("evil/"), "{k}");
            assert_ne!(k, victim_key);
            let mut shop = victim.clone();
            shop.annotations.insert(WORKLOAD.into(), "frontend".into());
            assert_ne!(k, workload_key(&shop, Source::Nri));
        }
        // A container registered through the local API (containerd
        // namespace) never shares a key with a pod namespace of that name.
        assert_eq!(
            workload_key(&victim, Source::Local),
            "containerd:shop/web@reg/team/web"
        );
        let mut none = victim.clone();
        none.pod_namespace.clear();
        assert!(workload_key(&none, Source::Local).starts_with("containerd:default/"));
    }

    /// An agent over a fake cgroup v2 tree, without NRI or the tracer.
    fn test_agent(dir: &std::path::Path) -> Arc<Agent> {
        let cgroups = dir.join("cgroup");
        std::fs::create_dir_all(&cgroups).unwrap();
        std::fs::write(cgroups.join("cgroup.controllers"), "memory\n").unwrap();
        let mem = Memory {
            default_policy: MemoryPolicy::Adaptive,
            ..Memory::default()
        };
        let (agent, _jobs) = Agent::new(
            mem,
            Layout::detect(&cgroups),
            Store::open(&dir.join("state"), 20).unwrap(),
            Arc::new(Link::default()),
            Tracing::unavailable("tracing.enabled = false"),
            crate::seccomp::runs::Seccomp::open(Default::default(), &dir.join("state")).unwrap(),
        );
        agent
    }

    #[test]
    fn a_panicking_handler_leaves_container_creation_working() {
        let dir = tempfile::tempdir().unwrap();
        let a = test_agent(dir.path());
        let pod = api::PodSandbox {
            namespace: "shop".into(),
            name: "web-0".into(),
            ..Default::default()
        };
        let c = api::Container {
            id: "c1".into(),
            name: "web".into(),
            ..Default::default()
        };
        let key = workload_key(&info_from_nri(&pod, &c), Source::Nri);
        a.state.record_run(&key, 100 << 20).unwrap();
        // A request handler panicked while holding every lock.
        a.state.poison();
        a.tracing.poison();

        let r = a.create_container(&pod, &c);
        let res = r.adjust.and_then(|adj| adj.linux).and_then(|l| l.resources);
        let limit = res.and_then(|r| r.memory_limit());
        assert_eq!(limit, Some(150 << 20));
        a.container_event(Event::StartContainer, &pod, &c);
        a.container_event(Event::StopContainer, &pod, &c);
        a.container_event(Event::RemoveContainer, &pod, &c);
        assert!(a.state.is_empty());
        // The next container is sized too.
        let c2 = api::Container {
            id: "c2".into(),
            ..c.clone()
        };
        assert!(a.create_container(&pod, &c2).adjust.is_some());
    }
}
