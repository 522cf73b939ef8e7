//! The agent's state: the containers it tracks, their policy and decisions,
//! the node's pressure, and the NRI event handlers that feed it.
//!
//! NRI handlers only read and write this state in memory (plus a few cgroup
//! files at stop); everything slow (sampling, PSI triggers, applying
//! changes, saving what was learned) happens in [`crate::memory::controller`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyperbox_config::{Memory, MemoryPolicy};
use serde::Serialize;
use tokio::sync::{Notify, mpsc};

use crate::cgroup::{Cgroup, Layout};
use crate::memory::policy::{self, Bounds};
use crate::memory::store::Store;
use crate::metrics::Metrics;
use crate::nri::api::{self, Event};
use crate::nri::plugin::{Events, Link};
use crate::psi::history::{History, Sample};

/// The annotation that picks a container's memory policy.
pub const POLICY_ANNOTATION: &str = "memory.hyperbox.dev/policy";
/// The annotation that overrides a container's workload key.
pub const WORKLOAD_ANNOTATION: &str = "hyperbox.dev/workload";
/// The annotation the agent adds to containers it sized.
pub const DECISION_ANNOTATION: &str = "memory.hyperbox.dev/decision";
/// The limit the user asked for (bytes, or `none`), recorded beside a limit
/// the agent set, so an agent restarted later knows its ceiling.
pub const USER_LIMIT_ANNOTATION: &str = "memory.hyperbox.dev/user-limit";
/// Samples kept per container and for the node.
const HISTORY: usize = 120;
/// Decisions kept per container.
const DECISIONS: usize = 32;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How a container reached the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Through NRI (CRI containers): changes go through the runtime.
    Nri,
    /// Through the local API (the shim): changes are written to the cgroup.
    Local,
}

/// One decision, for `hb policy explain`.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// Unix time.
    pub at: u64,
    /// `create`, `raise`, `lower`, `learn`, `observe`, `failed`.
    pub action: String,
    /// The limit before (bytes; `None`: unlimited).
    pub from: Option<u64>,
    /// The limit after.
    pub to: Option<u64>,
    /// Why.
    pub reason: String,
    /// How it was applied: `nri-create`, `nri-update`, `cgroup`, or empty.
    pub via: String,
}

/// A tracked container.
#[derive(Debug, Clone, Serialize)]
pub struct Tracked {
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
    /// Where the policy came from (`annotation` or `default`).
    pub policy_from: &'static str,
    /// How it reached us.
    pub source: Source,
    /// Its cgroup, once located.
    #[serde(skip)]
    pub cgroup: Option<Cgroup>,
    /// OCI cgroupsPath as the runtime gave it.
    pub cgroups_path: String,
    /// Floor and ceiling.
    pub bounds: Bounds,
    /// The limit the agent believes is in force.
    pub limit: Option<u64>,
    /// The container asked for swap = limit (kept equal when we change it).
    #[serde(skip)]
    pub had_swap: bool,
    /// Started (the workload runs).
    pub started: bool,
    /// Samples of usage and pressure.
    #[serde(skip)]
    pub history: History,
    /// Peak working set seen this run.
    pub peak_working_set: u64,
    /// Samples taken.
    pub samples: usize,
    /// OOM kills seen (cgroup counter).
    pub oom_kills: u64,
    /// The last raise, or the creation-time size.
    #[serde(skip)]
    pub last_change: Option<Instant>,
    /// A PSI trigger fired since the last decision.
    #[serde(skip)]
    pub triggered: bool,
    /// A PSI trigger is armed on its cgroup.
    #[serde(skip)]
    pub trigger_armed: bool,
    /// Decisions, oldest first.
    pub decisions: VecDeque<Decision>,
}

impl Tracked {
    /// Appends a decision, keeping the last few.
    pub fn decide(&mut self, d: Decision) {
        if self.decisions.len() == DECISIONS {
            self.decisions.pop_front();
        }
        self.decisions.push_back(d);
    }

    /// The newest sample.
    pub fn last_sample(&self) -> Option<Sample> {
        self.history.last().copied()
    }
}

/// Work handed to the controller.
#[derive(Debug)]
pub enum Job {
    /// A run ended: record its peak under the workload key.
    Finished {
        /// Workload key.
        workload: String,
        /// Peak working set.
        peak: u64,
    },
}

/// The node's pressure.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Node {
    /// `/proc/pressure/memory`.
    pub memory: crate::psi::Pressure,
    /// `/proc/pressure/cpu`.
    pub cpu: crate::psi::Pressure,
    /// `/proc/pressure/io`.
    pub io: crate::psi::Pressure,
    /// Unix time of the reading.
    pub at: u64,
}

/// The agent.
#[derive(Debug)]
pub struct Agent {
    /// The memory policy's knobs (Configure may replace them).
    pub memory: RwLock<Memory>,
    /// The node's cgroup layout.
    pub layout: Layout,
    /// Node memory, bytes.
    pub mem_total: u64,
    /// Tracked containers by id.
    pub containers: Mutex<HashMap<String, Tracked>>,
    /// What was learned.
    pub store: Mutex<Store>,
    /// The NRI connection.
    pub link: Arc<Link>,
    /// Metrics families.
    pub metrics: Metrics,
    /// Node pressure now and its history.
    pub node: Mutex<(Node, History)>,
    /// The runtime we are connected to (`containerd 1.7.24`).
    pub runtime: Mutex<Option<String>>,
    /// Wakes the controller (new container, trigger fired).
    pub wake: Notify,
    /// Per-container eBPF tracing.
    pub tracing: Arc<crate::trace::Tracing>,
    jobs: mpsc::UnboundedSender<Job>,
}

impl Agent {
    /// A new agent; the receiver feeds the controller.
    pub fn new(
        memory: Memory,
        layout: Layout,
        store: Store,
        link: Arc<Link>,
        tracing: Arc<crate::trace::Tracing>,
    ) -> (Arc<Agent>, mpsc::UnboundedReceiver<Job>) {
        let (jobs, rx) = mpsc::unbounded_channel();
        let agent = Agent {
            memory: RwLock::new(memory),
            layout,
            mem_total: crate::cgroup::mem_total(),
            containers: Mutex::default(),
            store: Mutex::new(store),
            link,
            metrics: Metrics::default(),
            node: Mutex::new((Node::default(), History::new(HISTORY))),
            runtime: Mutex::default(),
            wake: Notify::new(),
            tracing,
            jobs,
        };
        (Arc::new(agent), rx)
    }

    /// The memory knobs now.
    pub fn memory_config(&self) -> Memory {
        self.memory.read().expect("memory config").clone()
    }

    /// Node memory `some avg10` now.
    pub fn node_memory_some(&self) -> f64 {
        self.node.lock().expect("node").0.memory.some.avg10
    }

    /// A container's policy and where it came from.
    fn policy_of(&self, annotations: &HashMap<String, String>) -> (MemoryPolicy, &'static str) {
        match annotations.get(POLICY_ANNOTATION) {
            Some(v) => match MemoryPolicy::parse(v) {
                Some(p) => (p, "annotation"),
                None => {
                    tracing::warn!(value = %v, "unknown {POLICY_ANNOTATION} value; using the default");
                    (self.memory_config().default_policy, "default")
                }
            },
            None => (self.memory_config().default_policy, "default"),
        }
    }

    /// Starts tracking a container (from NRI or the local API).
    pub fn track(&self, info: ContainerInfo, source: Source) -> Option<Tracked> {
        let (policy, policy_from) = self.policy_of(&info.annotations);
        if policy == MemoryPolicy::Off {
            return None;
        }
        let cfg = self.memory_config();
        let t = Tracked {
            workload: workload_key(&info),
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
            decisions: VecDeque::new(),
        };
        self.containers
            .lock()
            .expect("containers")
            .insert(t.id.clone(), t.clone());
        self.wake.notify_one();
        Some(t)
    }

    /// Sizes a new container: the limit to set at creation, if any.
    pub fn size_new(&self, t: &mut Tracked) -> Option<u64> {
        let cfg = self.memory_config();
        let learned = self.store.lock().expect("store").get(&t.workload);
        let (ws, runs) = learned
            .map(|w| (w.working_set(), w.runs.len()))
            .unwrap_or((None, 0));
        if t.policy != MemoryPolicy::Adaptive {
            t.decide(Decision {
                at: unix_now(),
                action: "observe".into(),
                from: t.limit,
                to: t.limit,
                reason: match ws {
                    Some(ws) => format!(
                        "policy observe: learning only (working set p95 {} over {runs} run(s))",
                        policy::bytes(ws)
                    ),
                    None => "policy observe: learning only (no history yet)".into(),
                },
                via: String::new(),
            });
            return None;
        }
        let init = policy::initial(&cfg, ws, runs, self.node_memory_some(), t.bounds);
        t.decide(Decision {
            at: unix_now(),
            action: if init.limit.is_some() {
                "create"
            } else {
                "learn"
            }
            .into(),
            from: t.limit,
            to: init.limit.or(t.limit),
            reason: init.reason,
            via: if init.limit.is_some() {
                "nri-create".into()
            } else {
                String::new()
            },
        });
        if let Some(l) = init.limit {
            t.limit = Some(l);
            t.last_change = Some(Instant::now());
        }
        init.limit
    }

    /// A run ended: take a last sample, hand the peak to the controller.
    pub fn finish(&self, id: &str, remove: bool) {
        let mut map = self.containers.lock().expect("containers");
        let Some(t) = map.get_mut(id) else {
            return;
        };
        if t.started {
            if let Some(stat) = t.cgroup.as_ref().and_then(|c| c.memory_stat().ok()) {
                t.peak_working_set = t.peak_working_set.max(stat.working_set);
            }
            if t.peak_working_set > 0 {
                let _ = self.jobs.send(Job::Finished {
                    workload: t.workload.clone(),
                    peak: t.peak_working_set,
                });
            }
            t.started = false;
        }
        if remove {
            map.remove(id);
        }
    }

    /// `memory.high` for a hard limit of `limit`, where the memory
    /// controller is v2 and `memory.high_ratio` is set.
    pub fn high_for(&self, limit: u64, v2: bool) -> Option<u64> {
        let ratio = self.memory_config().high_ratio;
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

    /// Starts tracing a container before its workload runs, unless its
    /// annotations opt out or the tracer is not loaded.
    pub fn trace_start(&self, info: &ContainerInfo) {
        if info
            .annotations
            .get(crate::trace::TRACE_ANNOTATION)
            .is_some_and(|v| v.trim() == "false")
            || !self.tracing.available()
        {
            return;
        }
        let cgroup = self.layout.locate(&info.cgroups_path);
        let dir = if self.tracing.uses_v1() {
            cgroup.map(|c| c.memory)
        } else {
            cgroup.and_then(|c| c.psi)
        };
        let Some(dir) = dir else {
            tracing::warn!(container = %info.id, path = %info.cgroups_path, "no cgroup to trace");
            return;
        };
        match self.tracing.watch(info, &dir) {
            Ok(()) => tracing::debug!(container = %info.id, "tracing"),
            Err(e) => {
                tracing::warn!(container = %info.id, error = %crate::error_chain(&e), "cannot trace")
            }
        }
    }

    /// Records the runtime's name after Configure.
    fn set_runtime(&self, name: &str, version: &str) {
        *self.runtime.lock().expect("runtime") = Some(format!("{name} {version}"));
    }
}

/// What the agent needs to know about a container, from NRI or the shim.
#[derive(Debug, Clone, Default, serde::Deserialize)]
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
    /// Already running.
    #[serde(default)]
    pub running: bool,
}

impl ContainerInfo {
    /// From NRI's messages.
    pub fn from_nri(pod: &api::PodSandbox, c: &api::Container) -> ContainerInfo {
        let res = c.linux.as_ref().and_then(|l| l.resources.as_ref());
        let mut annotations = pod.annotations.clone();
        annotations.extend(c.annotations.clone());
        ContainerInfo {
            id: c.id.clone(),
            name: c.name.clone(),
            pod_namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            image: c
                .annotations
                .get("io.kubernetes.cri.image-name")
                .cloned()
                .unwrap_or_default(),
            annotations,
            cgroups_path: c
                .linux
                .as_ref()
                .map(|l| l.cgroups_path.clone())
                .unwrap_or_default(),
            limit: res.and_then(|r| r.memory_limit()).map(|v| v as u64),
            user_limit: c
                .annotations
                .get(USER_LIMIT_ANNOTATION)
                .map(|v| v.parse().ok()),
            request: res.and_then(|r| r.memory_request()).map(|v| v as u64),
            had_swap: res
                .and_then(|r| r.memory.as_ref())
                .and_then(|m| m.swap.as_ref())
                .is_some_and(|s| s.value > 0),
            running: c.state == api::CONTAINER_RUNNING,
        }
    }
}

/// The workload key: the annotation, else `namespace/container@repository`.
pub fn workload_key(info: &ContainerInfo) -> String {
    if let Some(k) = info
        .annotations
        .get(WORKLOAD_ANNOTATION)
        .filter(|k| !k.trim().is_empty())
    {
        return k.trim().to_string();
    }
    format!(
        "{}/{}@{}",
        info.pod_namespace,
        info.name,
        image_repository(&info.image)
    )
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
        tracing::info!(runtime = %req.runtime_name, version = %req.runtime_version, "configured by the NRI runtime");
        if !req.config.trim().is_empty() {
            // A pre-registered plugin's conf.d file: a hyperbox config
            // whose [memory] section replaces ours.
            let c = hyperbox_config::Config::parse(
                &req.config,
                std::path::Path::new("<NRI plugin config>"),
            )
            .map_err(|e| e.to_string())?;
            *self.memory.write().expect("memory config") = c.memory;
        }
        self.set_runtime(&req.runtime_name, &req.runtime_version);
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
            let known = self
                .containers
                .lock()
                .expect("containers")
                .contains_key(&c.id);
            if !known
                && self
                    .track(ContainerInfo::from_nri(pod, c), Source::Nri)
                    .is_some()
            {
                adopted += 1;
            }
            // A restarted agent traces the running containers again, from
            // now on (what ran before the restart is gone with the old
            // agent's maps).
            if c.state == api::CONTAINER_RUNNING && !self.tracing.is_watching(&c.id) {
                self.trace_start(&ContainerInfo::from_nri(pod, c));
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
        let info = ContainerInfo::from_nri(pod, container);
        let Some(mut t) = self.track(info, Source::Nri) else {
            return api::CreateContainerResponse::default();
        };
        let limit = self.size_new(&mut t);
        let decision = t.decisions.back().map(|d| d.reason.clone());
        self.containers
            .lock()
            .expect("containers")
            .insert(t.id.clone(), t.clone());
        let Some(limit) = limit else {
            return api::CreateContainerResponse::default();
        };
        self.metrics.decision("create");
        let resources = self.resources_for(limit, t.had_swap);
        let mut annotations = HashMap::new();
        if let Some(d) = decision {
            annotations.insert(DECISION_ANNOTATION.to_string(), d);
        }
        annotations.insert(
            USER_LIMIT_ANNOTATION.to_string(),
            t.bounds
                .ceiling
                .map_or("none".to_string(), |c| c.to_string()),
        );
        api::CreateContainerResponse {
            adjust: Some(api::ContainerAdjustment {
                annotations,
                linux: Some(api::LinuxContainerAdjustment {
                    resources: Some(resources),
                }),
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
        let cfg = self.memory_config();
        if let Some(r) = resources
            && let Some(t) = self
                .containers
                .lock()
                .expect("containers")
                .get_mut(&container.id)
        {
            let limit = r.memory_limit().map(|v| v as u64);
            let request = r.memory_request().map(|v| v as u64);
            // Our own UpdateContainers come back through here too: only a
            // limit different from ours is the user's.
            if limit != t.limit {
                t.bounds = Bounds::new(&cfg, request, limit);
                t.limit = limit;
            }
        }
        api::UpdateContainerResponse::default()
    }

    fn container_event(&self, event: Event, pod: &api::PodSandbox, container: &api::Container) {
        match event {
            Event::StartContainer => {
                self.trace_start(&ContainerInfo::from_nri(pod, container));
                if let Some(t) = self
                    .containers
                    .lock()
                    .expect("containers")
                    .get_mut(&container.id)
                {
                    t.started = true;
                }
                self.wake.notify_one();
            }
            Event::PostStartContainer => {
                if let Some(t) = self
                    .containers
                    .lock()
                    .expect("containers")
                    .get_mut(&container.id)
                {
                    t.started = true;
                }
                self.wake.notify_one();
            }
            Event::StopContainer => {
                self.tracing.stop(&container.id);
                self.finish(&container.id, false);
            }
            Event::RemoveContainer => {
                self.tracing.forget(&container.id);
                self.finish(&container.id, true);
            }
            _ => {}
        }
    }

    fn observe(&self, method: &str, elapsed: Duration, ok: bool) {
        self.metrics.nri_request(method, elapsed, ok);
    }

    fn connected(&self, runtime: Option<String>) {
        self.metrics.nri_connected.set(i64::from(runtime.is_some()));
        if runtime.is_none() {
            *self.runtime.lock().expect("runtime") = None;
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
        assert_eq!(workload_key(&info), "shop/web@reg.local:5000/team/web");
        info.annotations
            .insert(WORKLOAD_ANNOTATION.into(), "frontend".into());
        assert_eq!(workload_key(&info), "frontend");
        assert_eq!(image_repository("busybox"), "busybox");
        assert_eq!(image_repository("localhost:5000/x"), "localhost:5000/x");
    }
}
