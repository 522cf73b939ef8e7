//! Prometheus metrics: counters and histograms the agent updates as things
//! happen ([`Metrics`]), and a collector that renders a [`Snapshot`] of
//! node and container pressure and tracer counters, taken from whatever
//! implements [`Snapshots`] at scrape time ([`StateCollector`]).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use hyperbox_api::types::{Action, NodePressure, Sample, TopRow};
use hyperbox_config::MemoryPolicy;

type Labels = Vec<(String, String)>;

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.1, 1.0,
    ])
}

/// Event-driven metrics.
#[derive(Debug)]
pub struct Metrics {
    nri_latency: Family<Labels, Histogram, fn() -> Histogram>,
    nri_errors: Family<Labels, Counter>,
    decisions: Family<Labels, Counter>,
    /// Changes that could not be applied.
    pub apply_errors: Counter,
    /// 1 while registered with a runtime.
    pub nri_connected: Gauge,
    /// PSI trigger wake-ups.
    pub trigger_wakeups: Counter,
    /// Errors reading cgroup or PSI files.
    pub read_errors: Counter,
    seccomp_decisions: Family<Labels, Counter>,
    seccomp_reports: Family<Labels, Counter>,
    /// Learned profiles libseccomp refused (never installed).
    pub seccomp_rejected: Counter,
    /// Seccomp audit records no container could be found for.
    pub seccomp_unattributed: Counter,
    /// Syscalls added to learned profiles.
    pub seccomp_learned: Counter,
    /// Prewarm asks the snapshotter answered.
    pub prewarm_asked: Counter,
    /// Prewarm asks that failed.
    pub prewarm_failed: Counter,
    /// Candidates left for a later round because the node was not calm.
    pub prewarm_deferred: Counter,
    /// Chunks prewarms fetched.
    pub prewarm_chunks: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            nri_latency: Family::new_with_constructor(latency_histogram),
            nri_errors: Family::default(),
            decisions: Family::default(),
            apply_errors: Counter::default(),
            nri_connected: Gauge::default(),
            trigger_wakeups: Counter::default(),
            read_errors: Counter::default(),
            seccomp_decisions: Family::default(),
            seccomp_reports: Family::default(),
            seccomp_rejected: Counter::default(),
            seccomp_unattributed: Counter::default(),
            seccomp_learned: Counter::default(),
            prewarm_asked: Counter::default(),
            prewarm_failed: Counter::default(),
            prewarm_deferred: Counter::default(),
            prewarm_chunks: Counter::default(),
        }
    }
}

impl Metrics {
    /// Records an NRI request's handling time.
    pub fn nri_request(&self, method: &str, elapsed: Duration, ok: bool) {
        let labels = vec![("method".to_string(), method.to_string())];
        self.nri_latency
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        if !ok {
            self.nri_errors.get_or_create(&labels).inc();
        }
    }

    /// Counts a policy decision.
    pub fn decision(&self, action: Action) {
        self.decisions
            .get_or_create(&vec![("action".to_string(), action.as_str().to_string())])
            .inc();
    }

    /// Counts a seccomp decision at creation.
    pub fn seccomp_decision(&self, mode: &str, action: &str) {
        self.seccomp_decisions
            .get_or_create(&vec![
                ("mode".to_string(), mode.to_string()),
                ("action".to_string(), action.to_string()),
            ])
            .inc();
    }

    /// Counts a syscall reported outside a container's profile.
    pub fn seccomp_report(&self, r: &hyperbox_api::types::SeccompReport) {
        self.seccomp_reports
            .get_or_create(&vec![
                ("workload".to_string(), r.workload.clone()),
                ("mode".to_string(), r.mode.as_str().to_string()),
                ("syscall".to_string(), r.syscall.clone()),
                ("outcome".to_string(), r.outcome.clone()),
            ])
            .inc();
    }

    /// Registers the families in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "hyperbox_nri_request_duration_seconds",
            "Time the agent took to answer an NRI request, by method",
            self.nri_latency.clone(),
        );
        registry.register(
            "hyperbox_nri_request_errors",
            "NRI requests answered with an error, by method",
            self.nri_errors.clone(),
        );
        registry.register(
            "hyperbox_memory_decisions",
            "Memory policy decisions applied, by action (create, raise, lower)",
            self.decisions.clone(),
        );
        registry.register(
            "hyperbox_memory_apply_errors",
            "Memory changes the runtime or the cgroup refused",
            self.apply_errors.clone(),
        );
        registry.register(
            "hyperbox_nri_connected",
            "1 while the agent is registered with an NRI runtime",
            self.nri_connected.clone(),
        );
        registry.register(
            "hyperbox_psi_trigger_wakeups",
            "Times a PSI trigger woke the memory controller",
            self.trigger_wakeups.clone(),
        );
        registry.register(
            "hyperbox_seccomp_decisions",
            "Seccomp decisions at container creation, by mode in force and action (install, keep)",
            self.seccomp_decisions.clone(),
        );
        registry.register(
            "hyperbox_seccomp_reports",
            "Syscalls outside a container's installed profile (once per container), by workload, mode, syscall and outcome (denied, allowed)",
            self.seccomp_reports.clone(),
        );
        registry.register(
            "hyperbox_seccomp_profile_rejected",
            "Learned profiles libseccomp refused to compile (never installed)",
            self.seccomp_rejected.clone(),
        );
        registry.register(
            "hyperbox_seccomp_reports_unattributed",
            "Seccomp audit records of a process no container could be found for",
            self.seccomp_unattributed.clone(),
        );
        registry.register(
            "hyperbox_seccomp_learned_syscalls",
            "Syscalls added to learned profiles",
            self.seccomp_learned.clone(),
        );
        registry.register(
            "hyperbox_prewarm_asks",
            "Images the snapshotter was asked to prewarm and answered for (agent.prewarm)",
            self.prewarm_asked.clone(),
        );
        registry.register(
            "hyperbox_prewarm_failures",
            "Prewarm asks that failed",
            self.prewarm_failed.clone(),
        );
        registry.register(
            "hyperbox_prewarm_deferred",
            "Prewarm candidates left for a later round because CPU, I/O or memory pressure was at agent.prewarm_max_pressure",
            self.prewarm_deferred.clone(),
        );
        registry.register(
            "hyperbox_prewarm_chunks",
            "Chunks of learned prefetch lists the snapshotter fetched for prewarms",
            self.prewarm_chunks.clone(),
        );
        registry.register(
            "hyperbox_read_errors",
            "Errors reading cgroup or PSI files",
            self.read_errors.clone(),
        );
    }
}

/// One tracked container's memory, as scraped.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerGauges {
    /// Container id.
    pub id: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name.
    pub name: String,
    /// Workload key.
    pub workload: String,
    /// Memory policy.
    pub policy: MemoryPolicy,
    /// The newest sample.
    pub last: Option<Sample>,
    /// The limit in force.
    pub limit: Option<u64>,
    /// Its cgroup's memory `some` stall total, µs, read at scrape time.
    pub stall_total_us: Option<u64>,
    /// OOM kills in its cgroup.
    pub oom_kills: u64,
}

/// The tracer's counters, as scraped.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceCounters {
    /// One row per traced container.
    pub rows: Vec<TopRow>,
    /// Events lost to a full ring buffer, all containers.
    pub ring_drops: u64,
    /// Opens left out by sampling, all containers.
    pub sampled: u64,
}

/// What one scrape shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The node's pressure.
    pub node: NodePressure,
    /// Tracked containers.
    pub containers: Vec<ContainerGauges>,
    /// The tracer's counters (`None`: the tracer is not loaded).
    pub trace: Option<TraceCounters>,
    /// Policies hyperbox's shim skipped because the agent did not answer,
    /// from the shim's journal (`None`: no journal configured).
    pub shim_skipped: Option<u64>,
}

/// Where a scrape's [`Snapshot`] comes from (the agent).
pub trait Snapshots: Send + Sync + std::fmt::Debug {
    /// The state now.
    fn snapshot(&self) -> Snapshot;
}

/// Renders a [`Snapshot`] taken at scrape time.
#[derive(Debug)]
pub struct StateCollector(pub Arc<dyn Snapshots>);

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        if labels.is_empty() {
            // A family encoder would print an empty `{}`.
            return ConstCounter::new(*v).encode(m);
        }
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl prometheus_client::collector::Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.0.snapshot();
        let node = snapshot.node;
        let mut avg = Vec::new();
        let mut total = Vec::new();
        for (res, p) in [("memory", node.memory), ("cpu", node.cpu), ("io", node.io)] {
            let mut lines = vec![("some", p.some)];
            if let Some(f) = p.full {
                lines.push(("full", f));
            }
            for (kind, line) in lines {
                let labels = l(&[("resource", res), ("kind", kind)]);
                avg.push((labels.clone(), line.avg10));
                total.push((labels, line.total_us as f64 / 1e6));
            }
        }
        gauge(
            &mut enc,
            "hyperbox_node_pressure_avg10_percent",
            "Node PSI: share of the last 10 s tasks stalled on the resource",
            &avg,
        )?;
        counter(
            &mut enc,
            "hyperbox_node_pressure_stall_seconds",
            "Node PSI: total stall time",
            &total,
        )?;

        let (mut ws, mut limit, mut stall, mut stall_total, mut ooms, mut info) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for t in &snapshot.containers {
            let base = l(&[
                ("container_id", &t.id),
                ("namespace", &t.namespace),
                ("pod", &t.pod),
                ("container", &t.name),
            ]);
            let mut i = base.clone();
            i.push(("workload".into(), t.workload.clone()));
            i.push(("policy".into(), t.policy.as_str().into()));
            info.push((i, 1.0));
            if let Some(s) = t.last {
                ws.push((base.clone(), s.usage as f64));
                stall.push((base.clone(), s.memory_some));
            }
            if let Some(v) = t.limit {
                limit.push((base.clone(), v as f64));
            }
            if let Some(us) = t.stall_total_us {
                stall_total.push((base.clone(), us as f64 / 1e6));
            }
            ooms.push((base, t.oom_kills as f64));
        }
        gauge(
            &mut enc,
            "hyperbox_container_info",
            "Containers the agent tracks, with workload key and memory policy",
            &info,
        )?;
        gauge(
            &mut enc,
            "hyperbox_container_memory_working_set_bytes",
            "Container memory usage minus inactive file cache, last sample",
            &ws,
        )?;
        gauge(
            &mut enc,
            "hyperbox_container_memory_limit_bytes",
            "Container memory limit in force (as set by the user or the agent)",
            &limit,
        )?;
        gauge(
            &mut enc,
            "hyperbox_container_memory_pressure_avg10_percent",
            "Container memory PSI some avg10, last sample",
            &stall,
        )?;
        counter(
            &mut enc,
            "hyperbox_container_memory_stall_seconds",
            "Container memory PSI some total stall time",
            &stall_total,
        )?;
        counter(
            &mut enc,
            "hyperbox_container_oom_kills",
            "OOM kills in the container's cgroup",
            &ooms,
        )?;
        if let Some(n) = snapshot.shim_skipped {
            counter(
                &mut enc,
                "hyperbox_shim_policy_skipped",
                "Containers hyperbox's shim started without the agent's policy or registration (the agent did not answer in time)",
                &[(Labels::new(), n as f64)],
            )?;
        }
        if let Some(tr) = &snapshot.trace {
            let (mut sys, mut execs, mut opens, mut ooms) = (vec![], vec![], vec![], vec![]);
            let mut rates = vec![];
            let (mut flows, mut open_flows, mut bytes) = (vec![], vec![], vec![]);
            let (mut drops, mut sampled) = (vec![], vec![]);
            // One pass over the kernel map for every container (as hb top).
            for row in &tr.rows {
                let labels = l(&[("container_id", &row.id), ("container", &row.name)]);
                sys.push((labels.clone(), row.syscalls as f64));
                if let Some(r) = row.syscall_rate.filter(|_| row.live) {
                    rates.push((labels.clone(), r));
                }
                execs.push((labels.clone(), row.execs as f64));
                opens.push((labels.clone(), row.opens as f64));
                ooms.push((labels.clone(), row.oom_kills as f64));
                flows.push((labels.clone(), row.flows as f64));
                open_flows.push((labels.clone(), row.open_flows as f64));
                drops.push((labels.clone(), row.ring_drops as f64));
                sampled.push((labels.clone(), row.sampled_out as f64));
                for (dir, v) in [("in", row.bytes_in), ("out", row.bytes_out)] {
                    let mut b = labels.clone();
                    b.push(("direction".into(), dir.into()));
                    bytes.push((b, v as f64));
                }
            }
            counter(
                &mut enc,
                "hyperbox_container_syscalls",
                "Syscalls the container's tasks entered while counted (its window and samples)",
                &sys,
            )?;
            gauge(
                &mut enc,
                "hyperbox_container_syscall_rate",
                "Syscalls per second: over the counting window so far, then over the last sample",
                &rates,
            )?;
            counter(
                &mut enc,
                "hyperbox_container_execs",
                "Execs in the container while traced",
                &execs,
            )?;
            counter(
                &mut enc,
                "hyperbox_container_opens",
                "open/openat calls in the container while traced",
                &opens,
            )?;
            counter(
                &mut enc,
                "hyperbox_container_traced_oom_kills",
                "Processes of the container the OOM killer chose, seen by the tracer",
                &ooms,
            )?;
            counter(
                &mut enc,
                "hyperbox_container_tcp_connections",
                "TCP connections of the container closed while traced (connect or accept to close)",
                &flows,
            )?;
            gauge(
                &mut enc,
                "hyperbox_container_tcp_open_connections",
                "TCP connections of the container open now",
                &open_flows,
            )?;
            counter(
                &mut enc,
                "hyperbox_container_tcp_bytes",
                "Bytes over the container's closed TCP connections (in: received, out: sent and acknowledged)",
                &bytes,
            )?;
            counter(
                &mut enc,
                "hyperbox_container_trace_ring_drops",
                "The container's tracer events lost to a full ring buffer",
                &drops,
            )?;
            counter(
                &mut enc,
                "hyperbox_container_trace_sampled",
                "The container's open events left out by in-kernel sampling under pressure",
                &sampled,
            )?;
            counter(
                &mut enc,
                "hyperbox_trace_ring_drops",
                "Tracer events lost to a full ring buffer",
                &[(Labels::new(), tr.ring_drops as f64)],
            )?;
            counter(
                &mut enc,
                "hyperbox_trace_sampled",
                "Open events left out by in-kernel sampling while the ring buffer was filling",
                &[(Labels::new(), tr.sampled as f64)],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyperbox_api::types::{Pressure, PsiLine};

    #[derive(Debug)]
    struct Fixed(Snapshot);

    impl Snapshots for Fixed {
        fn snapshot(&self) -> Snapshot {
            self.0.clone()
        }
    }

    fn render(snapshot: Snapshot, metrics: &Metrics) -> String {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        registry.register_collector(Box::new(StateCollector(Arc::new(Fixed(snapshot)))));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    fn snapshot() -> Snapshot {
        let line = |avg10, total_us| PsiLine {
            avg10,
            avg60: 0.0,
            avg300: 0.0,
            total_us,
        };
        Snapshot {
            node: NodePressure {
                memory: Pressure {
                    some: line(2.5, 3_000_000),
                    full: Some(line(1.0, 1_000_000)),
                },
                cpu: Pressure {
                    some: line(0.5, 0),
                    full: None,
                },
                io: Pressure::default(),
                at: 1,
            },
            containers: vec![ContainerGauges {
                id: "c1".into(),
                namespace: "shop".into(),
                pod: "web-0".into(),
                name: "web".into(),
                workload: "shop/web@web".into(),
                policy: MemoryPolicy::Adaptive,
                last: Some(Sample {
                    at: 1,
                    memory_some: 4.0,
                    memory_full: 0.0,
                    usage: 1 << 20,
                }),
                limit: Some(2 << 20),
                stall_total_us: Some(500_000),
                oom_kills: 2,
            }],
            trace: None,
            shim_skipped: Some(2),
        }
    }

    #[test]
    fn node_and_container_pressure_are_rendered_with_their_labels() {
        let text = render(snapshot(), &Metrics::default());
        let labels = r#"container_id="c1",namespace="shop",pod="web-0",container="web""#;
        for want in [
            r#"hyperbox_node_pressure_avg10_percent{resource="memory",kind="some"} 2.5"#
                .to_string(),
            r#"hyperbox_node_pressure_stall_seconds_total{resource="memory",kind="full"} 1.0"#
                .into(),
            format!("hyperbox_container_memory_working_set_bytes{{{labels}}} 1048576"),
            format!("hyperbox_container_memory_limit_bytes{{{labels}}} 2097152"),
            format!("hyperbox_container_memory_pressure_avg10_percent{{{labels}}} 4.0"),
            format!("hyperbox_container_memory_stall_seconds_total{{{labels}}} 0.5"),
            format!("hyperbox_container_oom_kills_total{{{labels}}} 2"),
            "hyperbox_shim_policy_skipped_total 2".into(),
            format!(
                "hyperbox_container_info{{{labels},workload=\"shop/web@web\",policy=\"adaptive\"}} 1"
            ),
        ] {
            assert!(text.contains(&want), "no {want:?} in\n{text}");
        }
        // cpu has no `full` line on this node: no series for it.
        assert!(!text.contains(r#"resource="cpu",kind="full""#), "{text}");
        // No tracer, no tracer families.
        assert!(!text.contains("hyperbox_container_syscalls"), "{text}");
    }

    #[test]
    fn tracer_counters_appear_when_the_tracer_runs() {
        let mut s = snapshot();
        s.trace = Some(TraceCounters {
            rows: vec![TopRow {
                id: "c1".into(),
                name: "web".into(),
                live: true,
                cgroup: 9,
                syscalls: 1234,
                counting: true,
                syscall_rate: Some(10.0),
                execs: 3,
                opens: 4,
                oom_kills: 0,
                flows: 1,
                bytes_in: 100,
                bytes_out: 200,
                open_flows: 0,
                ring_drops: 5,
                sampled_out: 6,
            }],
            ring_drops: 7,
            sampled: 8,
        });
        let text = render(s, &Metrics::default());
        let labels = r#"container_id="c1",container="web""#;
        for want in [
            format!("hyperbox_container_syscalls_total{{{labels}}} 1234"),
            format!("hyperbox_container_syscall_rate{{{labels}}} 10.0"),
            format!("hyperbox_container_tcp_bytes_total{{{labels},direction=\"out\"}} 200"),
            format!("hyperbox_container_trace_ring_drops_total{{{labels}}} 5"),
            "hyperbox_trace_ring_drops_total 7".into(),
            "hyperbox_trace_sampled_total 8".into(),
        ] {
            assert!(text.contains(&want), "no {want:?} in\n{text}");
        }
    }

    #[test]
    fn decisions_are_counted_by_action() {
        let m = Metrics::default();
        m.decision(Action::Raise);
        m.decision(Action::Raise);
        m.decision(Action::Create);
        let text = render(snapshot(), &m);
        assert!(
            text.contains(r#"hyperbox_memory_decisions_total{action="raise"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"hyperbox_memory_decisions_total{action="create"} 1"#),
            "{text}"
        );
    }
}
