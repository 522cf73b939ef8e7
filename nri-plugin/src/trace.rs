//! Per-container tracing in the agent: which containers the eBPF tracer
//! watches, what it saw for each (syscall counts, execs, opens, TCP flows,
//! OOM kills), the reader that drains the tracer's ring buffer, and the
//! hand-off to the OTLP exporter.
//!
//! A container is watched from NRI StartContainer (the task exists, the
//! workload has not run its first instruction), or from the local API call
//! the shim makes after `runc create`, until it stops. Its results stay in
//! the agent after it stops, for the policies that consume them (seccomp
//! learning reads the syscall set), until the container is removed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use hyperbox_api::annotations::TRACE_SYSCALL_WINDOW;
use hyperbox_api::types::{ContainerEvent, ContainerInfo, Exec, Flow, TopRow, Trace, TraceEvent};
use hyperbox_bpf::{Event, Lost, Tracer};
use hyperbox_config::CgroupHierarchy;
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;

use crate::cgroup::Layout;
use crate::otlp;
use crate::seccomp::names;
/// Execs, and closed connections, kept per container (the newest).
const KEPT: usize = 1024;
/// Distinct paths kept per container in first-access order.
const OPENED: usize = 4096;
/// Opens do not wake the reader one by one (see the tracer's
/// `hb_wakeup_above`); it drains the ring at least this often.
const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(50);
/// Events recorded per taking of the results' locks: enough to amortise
/// them at a million events a second, few enough that `hb top`, a watch
/// or a stop never waits long behind the reader.
const DRAIN_BATCH: usize = 1024;

/// What the tracer saw of one container.
#[derive(Debug, Clone)]
pub struct Traced {
    /// Container id.
    pub id: String,
    /// Container name.
    pub name: String,
    /// Its v2 cgroup id.
    pub cgroup: u64,
    /// Still watched (running).
    pub live: bool,
    /// Syscall counts frozen when it stopped or its counting window
    /// closed (live ones come from the kernel).
    pub final_syscalls: Option<BTreeMap<u32, u64>>,
    /// Syscalls were counted only for the window
    /// (`tracing.syscall_window_secs`) and counting has stopped (but in
    /// samples, which add to the counts).
    pub syscall_window_closed: bool,
    /// Syscalls per second: over the window so far while it is open,
    /// then over the last sample (or the window, before the first).
    pub syscall_rate: Option<f64>,
    /// Samples counted after the window.
    pub syscall_samples: u64,
    /// Execs, oldest first.
    pub execs: VecDeque<Exec>,
    /// Execs seen in total (also those no longer kept).
    pub exec_count: u64,
    /// Distinct paths opened, in the order of first access (what the
    /// snapshotter's prefetch wants).
    pub opened: Vec<String>,
    /// Opens seen in total.
    pub open_count: u64,
    /// OOM kills of its processes (pids).
    pub oom_killed: Vec<u32>,
    /// Closed TCP connections, oldest first (the last 1024).
    pub flows: VecDeque<Flow>,
    /// TCP connections closed in total.
    pub flow_count: u64,
    /// Bytes received over them.
    pub bytes_in: u64,
    /// Bytes sent (acknowledged) over them.
    pub bytes_out: u64,
    /// Its events the kernel could not send (full ring, sampled opens),
    /// frozen when it stopped (live ones come from the kernel).
    pub lost: Lost,
    seen: std::collections::HashSet<String>,
    /// Its cgroup directory (to count it again in samples).
    dir: std::path::PathBuf,
    /// When counting started: the watch, or the sample in progress.
    counting_since: Option<std::time::Instant>,
}

impl Traced {
    /// The rate to show: over the window so far while it is open (from
    /// `live`, the kernel's count), else the last one measured.
    fn rate_now(&self, live: u64) -> Option<f64> {
        match (self.syscall_window_closed, self.counting_since) {
            (false, Some(since)) => Some(live as f64 / since.elapsed().as_secs_f64().max(1e-3)),
            _ => self.syscall_rate,
        }
    }

    /// Adds counts taken in the kernel since `counting_since` to the frozen
    /// ones, and sets the rate they show.
    fn add_counted(&mut self, counts: BTreeMap<u32, u64>) {
        let n: u64 = counts.values().sum();
        if let Some(since) = self.counting_since.take() {
            self.syscall_rate = Some(n as f64 / since.elapsed().as_secs_f64().max(1e-3));
        }
        add_counts(self.final_syscalls.get_or_insert_default(), counts);
    }
}

/// Errors of watching a container.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tracer is not loaded on this node.
    #[error("tracing is unavailable: {0}")]
    Unavailable(String),
    /// The container has no cgroup directory to watch.
    #[error("cgroup of container {id} ({path}) has no directory to watch")]
    NoCgroup {
        /// Container id.
        id: String,
        /// Its cgroups path.
        path: String,
    },
    /// Reading the cgroup's id failed.
    #[error("cgroup id of {0}")]
    CgroupId(String, #[source] std::io::Error),
    /// The tracer refused.
    #[error(transparent)]
    Bpf(#[from] hyperbox_bpf::Error),
}

/// The agent's tracing state. Its locks are taken even when poisoned (as
/// the state's): NRI handlers start and stop tracing, and a panic in a
/// local API handler must not stop container creation.
#[derive(Debug)]
pub struct Tracing {
    tracer: Option<Mutex<Tracer>>,
    unavailable: String,
    v1: bool,
    window: Option<std::time::Duration>,
    linger: std::time::Duration,
    me: std::sync::Weak<Tracing>,
    otlp: Option<otlp::Exporter>,
    containers: Mutex<HashMap<String, Traced>>,
    by_cgroup: Mutex<HashMap<u64, String>>,
    /// Live events for `hb trace --follow`.
    stream: broadcast::Sender<ContainerEvent>,
    /// Syscalls refused to containers under a seccomp profile, for the
    /// agent to judge (see [`Tracing::refusals`]).
    refused: tokio::sync::mpsc::UnboundedSender<Refusal>,
    refused_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Refusal>>>,
}

/// A syscall of a reporting container that returned EPERM or ENOSYS (the
/// first time for its number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Container id.
    pub container: String,
    /// Syscall number (`hyperbox_bpf::COMPAT` set for the 32-bit entry).
    pub nr: u32,
    /// The caller's pid.
    pub pid: u32,
    /// Its command name.
    pub comm: String,
}

impl Tracing {
    /// Loads the tracer and starts the OTLP exporter, as `cfg` says; when
    /// the tracer cannot load, tracing is reported unavailable and the
    /// agent goes on without it. Runs inside the agent's runtime.
    pub fn load(cfg: &hyperbox_config::Tracing, layout: &Layout) -> Arc<Tracing> {
        let v1 = match cfg.cgroup_hierarchy {
            CgroupHierarchy::V1 => true,
            CgroupHierarchy::V2 => false,
            CgroupHierarchy::Auto => matches!(layout, Layout::Legacy { .. }),
        };
        let opts = hyperbox_bpf::Options {
            ring_bytes: cfg.ring_buffer_bytes,
            v1_subsys: None,
            sample_above: (f64::from(cfg.ring_buffer_bytes) * cfg.sample_above) as u64,
            sample_one_in: cfg.sample_one_in,
            // A sixteenth of the ring, drained at least every DRAIN_EVERY.
            wakeup_above: u64::from(cfg.ring_buffer_bytes / 16),
        };
        let subsys = if v1 {
            v1_subsys_index("memory")
        } else {
            Ok(None)
        };
        let (tracer, unavailable) = if !cfg.enabled {
            (None, "tracing.enabled = false".to_string())
        } else if let Err(why) = &subsys {
            tracing::error!(error = %why, "eBPF tracer did not load; tracing is off");
            (None, why.clone())
        } else {
            let opts = hyperbox_bpf::Options {
                v1_subsys: subsys.clone().ok().flatten(),
                ..opts
            };
            match Tracer::load(&opts) {
                Ok(t) => {
                    tracing::info!(
                        syscall_hook = t.syscall_hook(),
                        refusal_hook = t.refusal_hook().unwrap_or("none"),
                        "eBPF tracer loaded"
                    );
                    (Some(t), String::new())
                }
                Err(e) => {
                    let why = hyperbox_api::error_chain(&e);
                    tracing::error!(error = %why, "eBPF tracer did not load; tracing is off");
                    (None, why)
                }
            }
        };
        let (stream, _) = broadcast::channel(1024);
        let (refused, refused_rx) = tokio::sync::mpsc::unbounded_channel();
        let otlp = if tracer.is_some() {
            otlp::Exporter::start(cfg).unwrap_or_else(|e| {
                tracing::error!(error = %hyperbox_api::error_chain(&e), "no OTLP export");
                None
            })
        } else {
            None
        };
        let sample = (cfg.syscall_sample_every_secs > 0).then(|| {
            (
                std::time::Duration::from_secs(cfg.syscall_sample_every_secs),
                std::time::Duration::from_millis(cfg.syscall_sample_ms),
            )
        });
        let tracing = Arc::new_cyclic(|me| Tracing {
            tracer: tracer.map(Mutex::new),
            unavailable,
            v1,
            window: (cfg.syscall_window_secs > 0)
                .then(|| std::time::Duration::from_secs(cfg.syscall_window_secs)),
            linger: std::time::Duration::from_secs(cfg.hook_linger_secs),
            me: me.clone(),
            otlp,
            containers: Mutex::default(),
            by_cgroup: Mutex::default(),
            stream,
            refused,
            refused_rx: Mutex::new(Some(refused_rx)),
        });
        if let (Some((every, length)), true, Ok(rt)) = (
            sample,
            tracing.available(),
            tokio::runtime::Handle::try_current(),
        ) {
            let me = Arc::downgrade(&tracing);
            rt.spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(t) = me.upgrade() else { return };
                    let sampled = t.start_sample();
                    drop(t);
                    if sampled == 0 {
                        continue;
                    }
                    tokio::time::sleep(length).await;
                    let Some(t) = me.upgrade() else { return };
                    t.end_sample();
                }
            });
        }
        tracing
    }

    /// Tracing that is off for `reason`: no tracer, no exporter (and no
    /// root needed, as in unit tests).
    pub fn unavailable(reason: &str) -> Arc<Tracing> {
        let (stream, _) = broadcast::channel(1);
        let (refused, refused_rx) = tokio::sync::mpsc::unbounded_channel();
        Arc::new_cyclic(|me| Tracing {
            tracer: None,
            unavailable: reason.to_string(),
            v1: false,
            window: None,
            linger: std::time::Duration::ZERO,
            me: me.clone(),
            otlp: None,
            containers: Mutex::default(),
            by_cgroup: Mutex::default(),
            stream,
            refused,
            refused_rx: Mutex::new(Some(refused_rx)),
        })
    }

    /// Test hook: a thread panics while holding every lock of the tracing
    /// state, as a panicking request handler would.
    #[cfg(test)]
    pub(crate) fn poison(&self) {
        std::thread::scope(|s| {
            let _ = s
                .spawn(|| {
                    let _c = self.containers.lock();
                    let _b = self.by_cgroup.lock();
                    panic!("a handler panics holding the tracing locks");
                })
                .join();
        });
        assert!(self.containers.is_poisoned() && self.by_cgroup.is_poisoned());
    }

    /// Live events of every watched container, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ContainerEvent> {
        self.stream.subscribe()
    }

    /// What `hb trace` shows of container `id`.
    pub fn report(&self, id: &str) -> Option<Trace> {
        let (t, syscalls) = self.get(id)?;
        let syscall_names = syscalls
            .iter()
            .map(|(key, n)| {
                let (arch, nr) = names::split(*key);
                (names::label(arch, &names::display(arch, nr)), *n)
            })
            .collect();
        Some(Trace {
            syscall_total: syscalls.values().sum(),
            syscall_names,
            id: t.id,
            name: t.name,
            cgroup: t.cgroup,
            live: t.live,
            syscalls,
            syscall_window_closed: t.syscall_window_closed,
            syscall_rate: t.syscall_rate,
            syscall_samples: t.syscall_samples,
            execs: t.execs.into_iter().collect(),
            exec_count: t.exec_count,
            opened: t.opened,
            open_count: t.open_count,
            oom_killed: t.oom_killed,
            flows: t.flows.into_iter().collect(),
            flow_count: t.flow_count,
            bytes_in: t.bytes_in,
            bytes_out: t.bytes_out,
            ring_drops: t.lost.dropped,
            sampled_out: t.lost.sampled,
        })
    }

    /// Whether the tracer is loaded.
    pub fn available(&self) -> bool {
        self.tracer.is_some()
    }

    /// Where syscalls are counted (`fentry/x64_sys_call` or the
    /// tracepoint fallback); empty when the tracer is not loaded.
    pub fn syscall_hook(&self) -> &'static str {
        self.tracer.as_ref().map_or("", |t| {
            t.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .syscall_hook()
        })
    }

    /// Why it is not, when it is not.
    pub fn unavailable_reason(&self) -> &str {
        &self.unavailable
    }

    /// Whether containers are told apart by their v1 memory cgroup (pure
    /// v1 hosts, or `tracing.cgroup_hierarchy = "v1"`) rather than v2.
    pub fn uses_v1(&self) -> bool {
        self.v1
    }

    /// Where spans are exported, if anywhere.
    pub fn otlp_target(&self) -> Option<&str> {
        self.otlp.as_ref().map(|o| o.target.as_str())
    }

    /// Starts watching a container whose cgroup directory (v2, or its v1
    /// memory cgroup when [`Tracing::uses_v1`]) is `dir`. Its syscalls are
    /// counted from its first exec, for the counting window, or for its
    /// whole life with `whole_life` (seccomp learning needs every syscall).
    pub fn watch(
        &self,
        info: &ContainerInfo,
        dir: &Path,
        whole_life: bool,
        report: bool,
    ) -> Result<(), Error> {
        let (id, name) = (info.id.as_str(), info.name.as_str());
        let Some(tracer) = &self.tracer else {
            return Err(Error::Unavailable(self.unavailable.clone()));
        };
        let cgroup = hyperbox_bpf::cgroup_id(dir)
            .map_err(|e| Error::CgroupId(dir.display().to_string(), e))?;
        tracer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .watch(cgroup, dir, true, report && !self.v1)?;
        if let Some(o) = &self.otlp {
            o.started(&otlp::Container {
                id: id.into(),
                name: name.into(),
                pod: info.pod.clone(),
                namespace: info.pod_namespace.clone(),
                image: info.image.clone(),
                cgroup,
            });
        }
        self.by_cgroup
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(cgroup, id.to_string());
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id.to_string(),
                Traced {
                    id: id.into(),
                    name: name.into(),
                    cgroup,
                    live: true,
                    final_syscalls: None,
                    syscall_window_closed: false,
                    syscall_rate: None,
                    syscall_samples: 0,
                    execs: VecDeque::new(),
                    exec_count: 0,
                    opened: Vec::new(),
                    open_count: 0,
                    oom_killed: Vec::new(),
                    flows: VecDeque::new(),
                    flow_count: 0,
                    bytes_in: 0,
                    bytes_out: 0,
                    lost: Lost::default(),
                    seen: Default::default(),
                    dir: dir.to_path_buf(),
                    counting_since: Some(std::time::Instant::now()),
                },
            );
        if let (false, Some(window), Ok(rt)) = (
            whole_life,
            window_of(info, self.window),
            tokio::runtime::Handle::try_current(),
        ) {
            let (me, id) = (self.me.clone(), id.to_string());
            rt.spawn(async move {
                tokio::time::sleep(window).await;
                if let Some(me) = me.upgrade() {
                    me.close_window(&id, cgroup);
                }
            });
        }
        Ok(())
    }

    /// The container's counting window is over: freeze its syscall counts
    /// and stop counting (the hook detaches if nobody else is counted).
    fn close_window(&self, id: &str, cgroup: u64) {
        let Some(tracer) = &self.tracer else { return };
        let mut map = self
            .containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Same container, still running (an id can be reused after removal).
        let Some(t) = map.get_mut(id).filter(|t| t.live && t.cgroup == cgroup) else {
            return;
        };
        match tracer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stop_counting(cgroup)
        {
            Ok(counts) => {
                t.add_counted(counts);
                t.syscall_window_closed = true;
            }
            Err(e) => {
                tracing::warn!(container = id, error = %hyperbox_api::error_chain(&e), "stop counting")
            }
        }
        drop(map);
        self.detach_later();
    }

    /// Detaches the syscall hook once nothing has been counted for
    /// `tracing.hook_linger_secs`.
    fn detach_later(&self) {
        let Some(tracer) = &self.tracer else { return };
        if tracer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_counting()
        {
            return;
        }
        let detach = |t: &Mutex<Tracer>| {
            if let Err(e) = t
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .detach_if_idle()
            {
                tracing::warn!(error = %hyperbox_api::error_chain(&e), "detach the syscall hook");
            }
        };
        match (self.linger.is_zero(), tokio::runtime::Handle::try_current()) {
            (false, Ok(rt)) => {
                let (me, linger) = (self.me.clone(), self.linger);
                rt.spawn(async move {
                    tokio::time::sleep(linger).await;
                    if let Some(me) = me.upgrade()
                        && let Some(t) = &me.tracer
                    {
                        detach(t);
                    }
                });
            }
            _ => detach(tracer),
        }
    }

    /// The refusals the tracer reports, once (the agent's reader takes it).
    pub fn refusals(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Refusal>> {
        self.refused_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Publishes a seccomp report of container `id`: on its span, and to
    /// `hb trace --follow` readers.
    pub fn seccomp_report(&self, r: &hyperbox_api::types::SeccompReport) {
        if let Some(o) = &self.otlp {
            o.seccomp(r);
        }
        let _ = self.stream.send(ContainerEvent {
            container: r.container.clone(),
            event: TraceEvent::Seccomp(r.clone()),
        });
    }

    /// The traced container that exec'd `pid` (among the execs kept): who
    /// a short-lived process belonged to once its /proc entry is gone.
    pub fn container_of_pid(&self, pid: u32) -> Option<String> {
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .find(|t| t.execs.iter().any(|e| e.pid == pid))
            .map(|t| t.id.clone())
    }

    /// Whether container `id` is watched now.
    pub fn is_watching(&self, id: &str) -> bool {
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .is_some_and(|t| t.live)
    }

    /// Stops watching; the results stay until [`Tracing::forget`].
    pub fn stop(&self, id: &str) {
        let Some(tracer) = &self.tracer else { return };
        let mut map = self
            .containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(t) = map.get_mut(id).filter(|t| t.live) else {
            return;
        };
        let mut tracer = tracer.lock().unwrap_or_else(PoisonError::into_inner);
        t.lost = tracer.lost(t.cgroup);
        match tracer.unwatch(t.cgroup) {
            // Counted until now (window or sample): added to what was
            // frozen; after the window and between samples, nothing.
            Ok(counts) => {
                if t.counting_since.is_some() {
                    t.add_counted(counts)
                }
            }
            Err(e) => {
                tracing::warn!(container = id, error = %hyperbox_api::error_chain(&e), "unwatch")
            }
        }
        drop(tracer);
        t.live = false;
        if let Some(o) = &self.otlp {
            o.stopped(id, &summary(t, t.final_syscalls.as_ref()));
        }
        drop(map);
        self.detach_later();
    }

    /// Drops a removed container's results, and the kernel's record of
    /// its connections still open.
    pub fn forget(&self, id: &str) {
        self.stop(id);
        if let Some(t) = self
            .containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id)
        {
            self.by_cgroup
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&t.cgroup);
            if let Some(tracer) = &self.tracer {
                let open = tracer
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .forget_flows(t.cgroup);
                if open > 0 {
                    tracing::debug!(container = id, open, "connections open at removal");
                }
            }
        }
        if let Some(o) = &self.otlp {
            o.forget(id);
        }
    }

    /// Ends the spans of containers still running and flushes the OTLP
    /// exporter (the agent is exiting).
    pub fn shutdown(&self) {
        let Some(o) = &self.otlp else { return };
        o.shutdown(|id| {
            self.get(id)
                .map(|(t, counts)| summary(&t, Some(&counts)))
                .unwrap_or_default()
        });
    }

    /// A container's results, with live syscall counts while it runs.
    pub fn get(&self, id: &str) -> Option<(Traced, BTreeMap<u32, u64>)> {
        let mut t = self
            .containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()?;
        let mut counts = t.final_syscalls.clone().unwrap_or_default();
        if let (true, Some(tr)) = (t.live, &self.tracer) {
            let tr = tr.lock().unwrap_or_else(PoisonError::into_inner);
            t.lost = tr.lost(t.cgroup);
            if t.counting_since.is_some() {
                let live = tr.syscalls(t.cgroup).unwrap_or_default();
                t.syscall_rate = t.rate_now(live.values().sum());
                add_counts(&mut counts, live);
            }
        }
        Some((t, counts))
    }

    /// Container `id`'s syscall counts so far, as [`Tracing::get`] gives
    /// them, without copying the rest of its results.
    pub fn syscalls(&self, id: &str) -> Option<BTreeMap<u32, u64>> {
        let (mut counts, live) = {
            let map = self
                .containers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let t = map.get(id)?;
            let live = (t.live && t.counting_since.is_some()).then_some(t.cgroup);
            (t.final_syscalls.clone().unwrap_or_default(), live)
        };
        if let (Some(cgroup), Some(tr)) = (live, &self.tracer) {
            let now = tr
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .syscalls(cgroup)
                .unwrap_or_default();
            add_counts(&mut counts, now);
        }
        Some(counts)
    }

    /// A sample after the window: counts every running container whose
    /// window has closed again; returns how many.
    fn start_sample(&self) -> usize {
        let Some(tracer) = &self.tracer else { return 0 };
        let mut map = self
            .containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut tracer = tracer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut n = 0;
        for t in map
            .values_mut()
            .filter(|t| t.live && t.syscall_window_closed && t.counting_since.is_none())
        {
            match tracer.watch(t.cgroup, &t.dir, false, false) {
                Ok(()) => {
                    t.counting_since = Some(std::time::Instant::now());
                    n += 1;
                }
                Err(e) => {
                    tracing::warn!(container = %t.id, error = %hyperbox_api::error_chain(&e), "sample syscalls")
                }
            }
        }
        n
    }

    /// Ends the sample: adds what it counted, sets the rates, and detaches
    /// the hook at once if no window is open (lingering would multiply
    /// the cost of every sample).
    fn end_sample(&self) {
        let Some(tracer) = &self.tracer else { return };
        let mut map = self
            .containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut tracer = tracer.lock().unwrap_or_else(PoisonError::into_inner);
        for t in map
            .values_mut()
            .filter(|t| t.live && t.syscall_window_closed && t.counting_since.is_some())
        {
            match tracer.stop_counting(t.cgroup) {
                Ok(counts) => {
                    t.add_counted(counts);
                    t.syscall_samples += 1;
                }
                Err(e) => {
                    tracing::warn!(container = %t.id, error = %hyperbox_api::error_chain(&e), "end syscall sample")
                }
            }
        }
        if let Err(e) = tracer.detach_if_idle() {
            tracing::warn!(error = %hyperbox_api::error_chain(&e), "detach the syscall hook");
        }
    }

    /// One line per traced container for `hb top`, with syscall totals
    /// read from the kernel in one pass.
    pub fn top(&self) -> Vec<TopRow> {
        let (totals, open, lost) = self
            .tracer
            .as_ref()
            .map(|t| {
                let t = t.lock().unwrap_or_else(PoisonError::into_inner);
                (t.totals().unwrap_or_default(), t.open_flows(), t.all_lost())
            })
            .unwrap_or_default();
        let live = |t: &Traced| {
            if t.live && t.counting_since.is_some() {
                totals.get(&t.cgroup).copied().unwrap_or(0)
            } else {
                0
            }
        };
        let mut rows: Vec<TopRow> = self
            .containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|t| {
                // Frozen at stop; the kernel's entry while it runs.
                let lost = if t.live {
                    lost.get(&t.cgroup).copied().unwrap_or_default()
                } else {
                    t.lost
                };
                TopRow {
                    id: t.id.clone(),
                    name: t.name.clone(),
                    live: t.live,
                    cgroup: t.cgroup,
                    syscalls: t
                        .final_syscalls
                        .as_ref()
                        .map_or(0, |f| f.values().sum::<u64>())
                        + live(t),
                    counting: t.live && t.counting_since.is_some(),
                    syscall_rate: if t.live && t.counting_since.is_some() {
                        t.rate_now(live(t))
                    } else {
                        t.syscall_rate
                    },
                    execs: t.exec_count,
                    opens: t.open_count,
                    oom_kills: t.oom_killed.len() as u64,
                    flows: t.flow_count,
                    bytes_in: t.bytes_in,
                    bytes_out: t.bytes_out,
                    open_flows: open.get(&t.cgroup).copied().unwrap_or(0),
                    ring_drops: lost.dropped,
                    sampled_out: lost.sampled,
                }
            })
            .collect();
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        rows
    }

    /// Ids of the containers with results.
    pub fn ids(&self) -> Vec<String> {
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Events lost to a full ring buffer.
    pub fn drops(&self) -> u64 {
        self.tracer.as_ref().map_or(0, |t| {
            t.lock().unwrap_or_else(PoisonError::into_inner).drops()
        })
    }

    /// Opens left out by in-kernel sampling under pressure.
    pub fn sampled(&self) -> u64 {
        self.tracer.as_ref().map_or(0, |t| {
            t.lock().unwrap_or_else(PoisonError::into_inner).sampled()
        })
    }

    /// Whether the syscall hook is attached now.
    pub fn syscall_hook_attached(&self) -> bool {
        self.tracer.as_ref().is_some_and(|t| {
            t.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .syscall_hook_attached()
        })
    }

    /// Where seccomp refusals are seen (`fexit/__seccomp_filter` or the
    /// `tp_btf/sys_exit` fallback); empty when they are not (no tracer,
    /// or pure v1 hosts).
    pub fn refusal_hook(&self) -> &'static str {
        self.tracer.as_ref().map_or("", |t| {
            t.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .refusal_hook()
                .unwrap_or("")
        })
    }

    /// Whether the refusal hook is attached now.
    pub fn refusal_hook_attached(&self) -> bool {
        self.tracer.as_ref().is_some_and(|t| {
            t.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .refusal_hook_attached()
        })
    }

    /// Records one event of a watched container into its results, and
    /// returns what `hb trace --follow` readers get when there are any.
    fn record(
        &self,
        map: &mut HashMap<String, Traced>,
        by_cgroup: &HashMap<u64, String>,
        streaming: bool,
        e: Event,
    ) -> Option<ContainerEvent> {
        let cgroup = match &e {
            Event::Exec { cgroup, .. }
            | Event::Open { cgroup, .. }
            | Event::Flow { cgroup, .. }
            | Event::OomKill { cgroup, .. }
            | Event::Refused { cgroup, .. } => *cgroup,
        };
        let id = by_cgroup.get(&cgroup)?;
        let t = map.get_mut(id)?;
        let event = match e {
            Event::Exec {
                pid,
                time_ns,
                path,
                args,
                ..
            } => {
                let exec = Exec {
                    pid,
                    time_ns,
                    path,
                    args,
                };
                if let Some(o) = &self.otlp {
                    o.exec(id, &exec);
                }
                keep_last(&mut t.execs, exec.clone());
                t.exec_count += 1;
                TraceEvent::Exec(exec)
            }
            Event::Open {
                pid, path, flags, ..
            } => {
                t.open_count += 1;
                if t.opened.len() < OPENED && !path.is_empty() && !t.seen.contains(&path) {
                    t.seen.insert(path.clone());
                    t.opened.push(path.clone());
                }
                TraceEvent::Open { pid, path, flags }
            }
            Event::Flow {
                outbound,
                local,
                remote,
                bytes_in,
                bytes_out,
                duration_ns,
                time_ns,
                ..
            } => {
                let flow = Flow {
                    outbound,
                    local: local.to_string(),
                    remote: remote.to_string(),
                    bytes_in,
                    bytes_out,
                    duration_ms: duration_ns as f64 / 1e6,
                    closed_ns: time_ns,
                };
                if let Some(o) = &self.otlp {
                    o.flow(id, &flow);
                }
                keep_last(&mut t.flows, flow.clone());
                t.flow_count += 1;
                t.bytes_in += bytes_in;
                t.bytes_out += bytes_out;
                TraceEvent::Flow(flow)
            }
            Event::Refused { pid, nr, comm, .. } => {
                // Judged by the agent against the container's profile; it
                // publishes the denials.
                let _ = self.refused.send(Refusal {
                    container: id.clone(),
                    nr,
                    pid,
                    comm,
                });
                return None;
            }
            Event::OomKill { pid, time_ns, .. } => {
                if let Some(o) = &self.otlp {
                    o.oom_kill(id, pid, time_ns);
                }
                t.oom_killed.push(pid);
                TraceEvent::OomKill { pid }
            }
        };
        streaming.then(|| ContainerEvent {
            container: id.clone(),
            event,
        })
    }

    /// Drains the ring buffer forever, waking when the kernel posts.
    pub async fn read_events(self: Arc<Self>) {
        let Some(ring) = self.tracer.as_ref().and_then(|t| {
            t.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take_events()
        }) else {
            return;
        };
        // SAFETY: the ring buffer owns its map fd and keeps it open for as
        // long as the AsyncFd (which owns the ring buffer) lives.
        let mut fd = match unsafe { AsyncFd::register(ring) } {
            Ok(fd) => fd,
            Err(e) => {
                tracing::error!(error = %e, "cannot poll the tracer's ring buffer");
                return;
            }
        };
        loop {
            match tokio::time::timeout(DRAIN_EVERY, fd.readable_mut()).await {
                Ok(Ok(mut guard)) => {
                    self.drain(guard.get_inner_mut());
                    guard.clear_ready();
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "tracer ring buffer poll failed");
                    return;
                }
                // Opens below the wake-up threshold are waiting.
                Err(_) => self.drain(fd.get_mut()),
            }
        }
    }

    /// Records what the ring holds, taking the results' locks once per
    /// [`DRAIN_BATCH`] events rather than per event.
    fn drain(&self, ring: &mut hyperbox_bpf::EventRing) {
        let mut more = true;
        while more {
            let mut streamed = Vec::new();
            {
                // The order `forget` takes them in.
                let mut map = self
                    .containers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let by_cgroup = self
                    .by_cgroup
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let streaming = self.stream.receiver_count() > 0;
                let mut n = 0;
                while n < DRAIN_BATCH {
                    let Some(item) = ring.next() else { break };
                    n += 1;
                    if let Some(tagged) = hyperbox_bpf::parse_event(&item)
                        .and_then(|e| self.record(&mut map, &by_cgroup, streaming, e))
                    {
                        streamed.push(tagged);
                    }
                }
                // A full batch: the ring may hold more.
                more = n == DRAIN_BATCH;
            }
            for tagged in streamed {
                let _ = self.stream.send(tagged);
            }
        }
    }
}

/// Appends `item`, dropping the oldest once [`KEPT`] are held.
fn add_counts(into: &mut BTreeMap<u32, u64>, more: BTreeMap<u32, u64>) {
    for (nr, c) in more {
        *into.entry(nr).or_default() += c;
    }
}

fn keep_last<T>(q: &mut VecDeque<T>, item: T) {
    if q.len() == KEPT {
        q.pop_front();
    }
    q.push_back(item);
}

fn summary(t: &Traced, counts: Option<&BTreeMap<u32, u64>>) -> otlp::Summary {
    otlp::Summary {
        syscalls: counts.map_or(0, |c| c.values().sum()),
        distinct_syscalls: counts.map_or(0, |c| c.len() as u64),
        execs: t.exec_count,
        opens: t.open_count,
        connections: t.flow_count,
        bytes_in: t.bytes_in,
        bytes_out: t.bytes_out,
        oom_kills: t.oom_killed.len() as u64,
    }
}

/// The index of v1 controller `name` in the kernel's subsystem array: its
/// line in `/proc/cgroups`, which lists every controller in that order.
fn v1_subsys_index(name: &str) -> Result<Option<u32>, String> {
    let text = std::fs::read_to_string("/proc/cgroups")
        .map_err(|e| format!("read /proc/cgroups for the v1 {name} controller: {e}"))?;
    subsys_index(&text, name)
        .map(Some)
        .ok_or_else(|| format!("/proc/cgroups lists no {name} controller"))
}

fn subsys_index(proc_cgroups: &str, name: &str) -> Option<u32> {
    proc_cgroups
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .position(|l| l.split_whitespace().next() == Some(name))
        .map(|i| i as u32)
}

/// The counting window of one container: its annotation
/// ([`TRACE_SYSCALL_WINDOW`], `0` for its whole life) over the node's
/// `tracing.syscall_window_secs`.
fn window_of(
    info: &ContainerInfo,
    node: Option<std::time::Duration>,
) -> Option<std::time::Duration> {
    let Some(v) = info.annotations.get(TRACE_SYSCALL_WINDOW) else {
        return node;
    };
    match v.trim().parse::<u64>() {
        Ok(0) => None,
        Ok(secs) => Some(std::time::Duration::from_secs(secs)),
        Err(_) => {
            tracing::warn!(container = %info.id, value = %v, annotation = TRACE_SYSCALL_WINDOW,
                "not a number of seconds; the node's window applies");
            node
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_controllers_are_indexed_in_proc_cgroups_order() {
        let text = "#subsys_name\thierarchy\tnum_cgroups\tenabled\n\
                    cpuset\t3\t1\t1\ncpu\t5\t60\t1\ncpuacct\t5\t60\t1\n\
                    blkio\t9\t60\t1\nmemory\t2\t90\t1\n";
        assert_eq!(subsys_index(text, "memory"), Some(4));
        assert_eq!(subsys_index(text, "cpuset"), Some(0));
        assert_eq!(subsys_index(text, "pids"), None);
    }
}
