//! Prometheus metrics: counters and histograms the agent updates as things
//! happen ([`Metrics`]), and a collector that reads node and container
//! pressure from the agent's state at scrape time ([`StateCollector`]).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::agent::Agent;

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
    pub fn decision(&self, action: &str) {
        self.decisions
            .get_or_create(&vec![("action".to_string(), action.to_string())])
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
            "hyperbox_read_errors",
            "Errors reading cgroup or PSI files",
            self.read_errors.clone(),
        );
    }
}

/// Reads pressure and usage from the agent at scrape time.
#[derive(Debug)]
pub struct StateCollector(pub Arc<Agent>);

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
        let node = self.0.node.lock().expect("node").0.clone();
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

        let containers: Vec<_> = self
            .0
            .containers
            .lock()
            .expect("containers")
            .values()
            .cloned()
            .collect();
        let (mut ws, mut limit, mut stall, mut stall_total, mut ooms, mut info) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for t in &containers {
            let base = l(&[
                ("container_id", &t.id),
                ("namespace", &t.pod_namespace),
                ("pod", &t.pod),
                ("container", &t.name),
            ]);
            let mut i = base.clone();
            i.push(("workload".into(), t.workload.clone()));
            i.push(("policy".into(), t.policy.as_str().into()));
            info.push((i, 1.0));
            if let Some(s) = t.last_sample() {
                ws.push((base.clone(), s.usage as f64));
                stall.push((base.clone(), s.memory_some));
            }
            if let Some(v) = t.limit {
                limit.push((base.clone(), v as f64));
            }
            if let Some(p) = t
                .cgroup
                .as_ref()
                .and_then(|c| c.pressure())
                .and_then(Result::ok)
            {
                stall_total.push((base.clone(), p.some.total_us as f64 / 1e6));
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
        let tr = &self.0.tracing;
        if tr.available() {
            let (mut sys, mut execs, mut opens, mut ooms) = (vec![], vec![], vec![], vec![]);
            let mut rates = vec![];
            let (mut flows, mut open_flows, mut bytes) = (vec![], vec![], vec![]);
            let (mut drops, mut sampled) = (vec![], vec![]);
            // One pass over the kernel map for every container (as hb top).
            for row in tr.top() {
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
                &[(Labels::new(), tr.drops() as f64)],
            )?;
            counter(
                &mut enc,
                "hyperbox_trace_sampled",
                "Open events left out by in-kernel sampling while the ring buffer was filling",
                &[(Labels::new(), tr.sampled() as f64)],
            )?;
        }
        Ok(())
    }
}
