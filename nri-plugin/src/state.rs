//! The agent's state — the containers it tracks, the node's pressure, the
//! memory knobs, what was learned, the runtime's name — and the only place
//! its locks are taken.
//!
//! Lock discipline: every method takes at most one lock, holds it only
//! for memory work (plus the last cgroup read of [`State::finish`]), and
//! never calls back into other code while holding it, so no two locks are
//! ever nested and no lock is held across an `.await`. A poisoned lock is
//! taken anyway: a panicking handler must not take the whole agent (and
//! every container's policy) down with it, and each update here leaves
//! the table consistent between statements.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Instant;

use hyperbox_api::types::{self, Decision, NodePressure, PolicyOrigin, Sample, Source};
use hyperbox_config::{Memory, MemoryPolicy};
use tokio::sync::{Notify, mpsc};

use crate::cgroup::Cgroup;
use crate::memory::decide::{Candidate, Change};
use crate::memory::policy::Bounds;
use crate::memory::store::{SaveError, Store, Workload};
use crate::metrics::ContainerGauges;
use crate::psi::history::History;

/// Samples kept per container and for the node.
pub const HISTORY: usize = 120;
/// Decisions kept per container.
const DECISIONS: usize = 32;

/// A tracked container.
#[derive(Debug, Clone)]
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
    /// Where the policy came from.
    pub policy_from: PolicyOrigin,
    /// How it reached us.
    pub source: Source,
    /// Its cgroup, once located.
    pub cgroup: Option<Cgroup>,
    /// OCI cgroupsPath as the runtime gave it.
    pub cgroups_path: String,
    /// Floor and ceiling.
    pub bounds: Bounds,
    /// The limit the agent believes is in force.
    pub limit: Option<u64>,
    /// The container asked for swap = limit (kept equal when we change it).
    pub had_swap: bool,
    /// Started (the workload runs).
    pub started: bool,
    /// Samples of usage and pressure.
    pub history: History,
    /// Peak working set seen this run.
    pub peak_working_set: u64,
    /// Samples taken.
    pub samples: usize,
    /// OOM kills seen (cgroup counter).
    pub oom_kills: u64,
    /// The last raise, or the creation-time size.
    pub last_change: Option<Instant>,
    /// A PSI trigger fired since the last decision.
    pub triggered: bool,
    /// A PSI trigger is armed on its cgroup.
    pub trigger_armed: bool,
    /// Decisions, oldest first.
    pub decisions: VecDeque<Decision>,
}

impl Tracked {
    /// Appends a decision, keeping the last few.
    pub fn record(&mut self, d: Decision) {
        if self.decisions.len() == DECISIONS {
            self.decisions.pop_front();
        }
        self.decisions.push_back(d);
    }

    /// The newest sample.
    pub fn last_sample(&self) -> Option<Sample> {
        self.history.last().copied()
    }

    /// What the local API shows of it.
    pub fn view(&self) -> types::Container {
        types::Container {
            id: self.id.clone(),
            name: self.name.clone(),
            pod_namespace: self.pod_namespace.clone(),
            pod: self.pod.clone(),
            workload: self.workload.clone(),
            policy: self.policy,
            policy_from: self.policy_from,
            source: self.source,
            cgroups_path: self.cgroups_path.clone(),
            bounds: self.bounds.into(),
            limit: self.limit,
            started: self.started,
            peak_working_set: self.peak_working_set,
            samples: self.samples as u64,
            oom_kills: self.oom_kills,
            decisions: self.decisions.iter().cloned().collect(),
        }
    }

    fn psi_view(&self) -> types::ContainerPsi {
        let last = self.last_sample();
        types::ContainerPsi {
            id: self.id.clone(),
            name: self.name.clone(),
            namespace: self.pod_namespace.clone(),
            pod: self.pod.clone(),
            workload: self.workload.clone(),
            policy: self.policy,
            limit: self.limit,
            working_set: last.map(|s| s.usage),
            peak_working_set: self.peak_working_set,
            memory_some_avg10: last.map(|s| s.memory_some),
            memory_full_avg10: last.map(|s| s.memory_full),
            oom_kills: self.oom_kills,
            history: self.history.iter().copied().collect(),
        }
    }

    fn candidate(&mut self) -> Candidate {
        Candidate {
            id: self.id.clone(),
            policy: self.policy,
            started: self.started,
            source: self.source,
            bounds: self.bounds,
            limit: self.limit,
            last: self.last_sample(),
            recent_peak: self.history.peak_usage(),
            // A trigger counts once, whatever the decision.
            triggered: std::mem::take(&mut self.triggered),
            since_change: self.last_change.map(|c| c.elapsed()),
            samples: self.samples,
        }
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

/// Why [`State::find`] found no single container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Nothing matches.
    None,
    /// Several match: their ids.
    Many(Vec<String>),
}

/// What a change in progress needs from the container to be applied.
#[derive(Debug, Clone)]
pub struct Target {
    /// Swap is kept equal to the limit.
    pub had_swap: bool,
    /// Its cgroup, for the direct write.
    pub cgroup: Option<Cgroup>,
}

#[derive(Debug)]
struct NodeState {
    now: NodePressure,
    history: History,
}

/// The agent's state behind its locks.
#[derive(Debug)]
pub struct State {
    memory: RwLock<Memory>,
    containers: Mutex<HashMap<String, Tracked>>,
    store: Mutex<Store>,
    node: Mutex<NodeState>,
    runtime: Mutex<Option<String>>,
    wake: Notify,
    jobs: mpsc::UnboundedSender<Job>,
}

fn take<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    /// A new state; the receiver feeds the controller.
    pub fn new(memory: Memory, store: Store) -> (State, mpsc::UnboundedReceiver<Job>) {
        let (jobs, rx) = mpsc::unbounded_channel();
        let state = State {
            memory: RwLock::new(memory),
            containers: Mutex::default(),
            store: Mutex::new(store),
            node: Mutex::new(NodeState {
                now: NodePressure::default(),
                history: History::new(HISTORY),
            }),
            runtime: Mutex::default(),
            wake: Notify::new(),
            jobs,
        };
        (state, rx)
    }

    /// Test hook: a thread panics while holding every lock of the state,
    /// as a panicking request handler would.
    #[cfg(test)]
    pub(crate) fn poison(&self) {
        std::thread::scope(|s| {
            let _ = s
                .spawn(|| {
                    let _m = self.memory.write();
                    let _c = self.containers.lock();
                    let _s = self.store.lock();
                    let _n = self.node.lock();
                    let _r = self.runtime.lock();
                    panic!("a handler panics holding the state locks");
                })
                .join();
        });
        assert!(self.containers.is_poisoned() && self.store.is_poisoned());
    }

    /// The memory knobs now.
    pub fn memory_config(&self) -> Memory {
        self.memory
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the memory knobs (NRI Configure).
    pub fn set_memory_config(&self, memory: Memory) {
        *self.memory.write().unwrap_or_else(PoisonError::into_inner) = memory;
    }

    /// The runtime connected (`containerd 1.7.24`), if any.
    pub fn runtime(&self) -> Option<String> {
        take(&self.runtime).clone()
    }

    /// Records the runtime connected, or that none is.
    pub fn set_runtime(&self, runtime: Option<String>) {
        *take(&self.runtime) = runtime;
    }

    /// The node's pressure at the last reading.
    pub fn node(&self) -> NodePressure {
        take(&self.node).now
    }

    /// The node's recent samples, oldest first.
    pub fn node_history(&self) -> Vec<Sample> {
        take(&self.node).history.iter().copied().collect()
    }

    /// Node memory `some avg10` now.
    pub fn node_memory_some(&self) -> f64 {
        take(&self.node).now.memory.some.avg10
    }

    /// Records a reading of the node's pressure.
    pub fn record_node(&self, now: NodePressure) {
        let mut node = take(&self.node);
        node.now = now;
        node.history.push(Sample {
            at: now.at,
            memory_some: now.memory.some.avg10,
            memory_full: now.memory.full.map(|f| f.avg10).unwrap_or(0.0),
            usage: 0,
        });
    }

    /// What was learned of a workload.
    pub fn learned(&self, workload: &str) -> Option<Workload> {
        take(&self.store).get(workload)
    }

    /// Saves a finished run's peak under its workload key.
    pub fn record_run(&self, workload: &str, peak: u64) -> Result<(), SaveError> {
        take(&self.store).record_run(workload, peak)
    }

    /// Wakes the controller.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Waits for [`State::wake`].
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// How many containers are tracked.
    pub fn len(&self) -> usize {
        take(&self.containers).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether container `id` is tracked.
    pub fn contains(&self, id: &str) -> bool {
        take(&self.containers).contains_key(id)
    }

    /// Container `id` (exactly that id) as the local API shows it.
    pub fn get(&self, id: &str) -> Option<types::Container> {
        take(&self.containers).get(id).map(Tracked::view)
    }

    /// The tracked ids.
    pub fn ids(&self) -> Vec<String> {
        take(&self.containers).keys().cloned().collect()
    }

    /// Tracks `t`, replacing what was known under its id.
    pub fn insert(&self, t: Tracked) {
        take(&self.containers).insert(t.id.clone(), t);
    }

    /// Marks a container's workload as running.
    pub fn set_started(&self, id: &str) {
        if let Some(t) = take(&self.containers).get_mut(id) {
            t.started = true;
        }
    }

    /// A run ended: takes a last sample and hands the peak to the
    /// controller; `remove` also forgets the container.
    pub fn finish(&self, id: &str, remove: bool) {
        let mut map = take(&self.containers);
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

    /// The runtime changed a container's resources to `limit` and
    /// `request`: unless that limit is the agent's own (its updates come
    /// back through NRI too), the user's limit is the ceiling from now on.
    pub fn user_resized(&self, id: &str, limit: Option<u64>, request: Option<u64>) {
        let cfg = self.memory_config();
        if let Some(t) = take(&self.containers).get_mut(id)
            && limit != t.limit
        {
            t.bounds = Bounds::new(&cfg, request, limit);
            t.limit = limit;
        }
    }

    /// The containers as the local API shows them, by id.
    pub fn views(&self) -> Vec<types::Container> {
        let mut v: Vec<types::Container> =
            take(&self.containers).values().map(Tracked::view).collect();
        v.sort_by(|x, y| x.id.cmp(&y.id));
        v
    }

    /// Every container's pressure, by namespace, pod and name.
    pub fn psi_views(&self) -> Vec<types::ContainerPsi> {
        let mut v: Vec<types::ContainerPsi> = take(&self.containers)
            .values()
            .map(Tracked::psi_view)
            .collect();
        v.sort_by(|x, y| (&x.namespace, &x.pod, &x.name).cmp(&(&y.namespace, &y.pod, &y.name)));
        v
    }

    /// The one container whose id is `query`, starts with it, or whose
    /// name it is.
    pub fn find(&self, query: &str) -> Result<types::Container, Lookup> {
        let map = take(&self.containers);
        let matches: Vec<&Tracked> = map
            .values()
            .filter(|t| t.id == query || t.id.starts_with(query) || t.name == query)
            .collect();
        match matches.as_slice() {
            [one] => Ok(one.view()),
            [] => Err(Lookup::None),
            many => Err(Lookup::Many(many.iter().map(|t| t.id.clone()).collect())),
        }
    }

    /// What the metrics show of each container. Reads each cgroup's
    /// pressure file, outside the lock.
    pub fn gauges(&self) -> Vec<ContainerGauges> {
        let rows: Vec<(ContainerGauges, Option<Cgroup>)> = take(&self.containers)
            .values()
            .map(|t| {
                let g = ContainerGauges {
                    id: t.id.clone(),
                    namespace: t.pod_namespace.clone(),
                    pod: t.pod.clone(),
                    name: t.name.clone(),
                    workload: t.workload.clone(),
                    policy: t.policy,
                    last: t.last_sample(),
                    limit: t.limit,
                    stall_total_us: None,
                    oom_kills: t.oom_kills,
                };
                (g, t.cgroup.clone())
            })
            .collect();
        rows.into_iter()
            .map(|(mut g, cg)| {
                g.stall_total_us = cg
                    .as_ref()
                    .and_then(Cgroup::pressure)
                    .and_then(Result::ok)
                    .map(|p| p.some.total_us);
                g
            })
            .collect()
    }

    /// The cgroup to sample, when the container runs.
    pub fn sampling_target(&self, id: &str) -> Option<Cgroup> {
        match take(&self.containers).get(id) {
            Some(t) if t.started => t.cgroup.clone(),
            _ => None,
        }
    }

    /// Records a sample of a container; `Some(true)` when it wants a PSI
    /// trigger armed (adaptive, none armed yet), `None` when it is gone.
    pub fn record_sample(&self, id: &str, sample: Sample, oom_kills: u64) -> Option<bool> {
        let mut map = take(&self.containers);
        let t = map.get_mut(id)?;
        t.history.push(sample);
        t.samples += 1;
        t.peak_working_set = t.peak_working_set.max(sample.usage);
        t.oom_kills = oom_kills;
        Some(t.policy == MemoryPolicy::Adaptive && !t.trigger_armed)
    }

    /// Records whether a PSI trigger is armed on the container's cgroup.
    pub fn set_trigger_armed(&self, id: &str, armed: bool) {
        if let Some(t) = take(&self.containers).get_mut(id) {
            t.trigger_armed = armed;
        }
    }

    /// Records that the container's trigger fired; `false` when it is no
    /// longer tracked.
    pub fn mark_triggered(&self, id: &str) -> bool {
        match take(&self.containers).get_mut(id) {
            Some(t) => {
                t.triggered = true;
                true
            }
            None => false,
        }
    }

    /// What the controller decides from, one per container; the triggers
    /// that fired are consumed.
    pub fn candidates(&self) -> Vec<Candidate> {
        take(&self.containers)
            .values_mut()
            .map(Tracked::candidate)
            .collect()
    }

    /// Takes `change` as the limit in force before applying it (so the
    /// runtime's echo of it is known as the agent's own); `None` when the
    /// container is gone.
    pub fn begin_change(&self, change: &Change) -> Option<Target> {
        let mut map = take(&self.containers);
        let t = map.get_mut(&change.id)?;
        if change.action == types::Action::Raise {
            t.last_change = Some(Instant::now());
        }
        t.limit = Some(change.to);
        Some(Target {
            had_swap: t.had_swap,
            cgroup: t.cgroup.clone(),
        })
    }

    /// Records how a change ended: a failed one puts the limit back to
    /// `d.from`.
    pub fn settle_change(&self, id: &str, d: Decision) {
        let mut map = take(&self.containers);
        let Some(t) = map.get_mut(id) else { return };
        if d.action.is_failed() {
            t.limit = d.from;
        }
        t.record(d);
    }
}
