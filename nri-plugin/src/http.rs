//! The agent's HTTP surfaces: `/metrics`, `/metrics/memory/psi` and
//! `/healthz` on the loopback metrics address, and the local API on the
//! agent's unix socket (`hb psi`, `hb policy explain`, the shim's container
//! registration).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::agent::{Agent, ContainerInfo, Decision, Source, Tracked};
use crate::metrics::StateCollector;
use crate::psi::history::Sample;

#[derive(Clone)]
struct App {
    agent: Arc<Agent>,
    registry: Arc<Registry>,
}

/// The router of the metrics address.
pub fn metrics_router(agent: Arc<Agent>) -> Router {
    let mut registry = Registry::default();
    agent.metrics.register(&mut registry);
    registry.register_collector(Box::new(StateCollector(agent.clone())));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/metrics/memory/psi", get(psi))
        .route("/healthz", get(health))
        .with_state(App {
            agent,
            registry: Arc::new(registry),
        })
}

/// The router of the local API socket.
pub fn api_router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/healthz", get(health))
        .route("/v1/psi", get(psi))
        .route("/v1/containers", get(list).post(register))
        .route("/v1/containers/{id}", get(explain).delete(unregister))
        .route("/v1/containers/{id}/trace", get(trace))
        .route("/v1/containers/{id}/events", get(events))
        .route("/v1/top", get(top))
        .with_state(App {
            agent,
            registry: Arc::new(Registry::default()),
        })
}

async fn metrics(State(app): State<App>) -> Response {
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &app.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("encode: {e}")).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    tracing: bool,
    tracing_syscall_hook: &'static str,
    tracing_syscall_hook_attached: bool,
    tracing_unavailable: String,
    tracing_cgroup: &'static str,
    tracing_otlp_endpoint: Option<String>,
    nri_connected: bool,
    runtime: Option<String>,
    containers: usize,
    cgroup_layout: &'static str,
}

async fn health(State(app): State<App>) -> Json<Health> {
    let a = &app.agent;
    Json(Health {
        status: "ok",
        tracing: a.tracing.available(),
        tracing_syscall_hook: a.tracing.syscall_hook(),
        tracing_syscall_hook_attached: a.tracing.syscall_hook_attached(),
        tracing_unavailable: a.tracing.unavailable_reason().to_string(),
        tracing_cgroup: if a.tracing.uses_v1() {
            "v1 memory"
        } else {
            "v2"
        },
        tracing_otlp_endpoint: a.tracing.otlp_target().map(str::to_string),
        nri_connected: a.link.is_connected(),
        runtime: a.runtime.lock().expect("runtime").clone(),
        containers: a.containers.lock().expect("containers").len(),
        cgroup_layout: a.layout.name(),
    })
}

/// `/metrics/memory/psi` and `hb psi`.
#[derive(Serialize)]
struct Psi {
    cgroup_layout: &'static str,
    mem_total: u64,
    node: crate::agent::Node,
    node_history: Vec<Sample>,
    containers: Vec<ContainerPsi>,
}

#[derive(Serialize)]
struct ContainerPsi {
    id: String,
    name: String,
    namespace: String,
    pod: String,
    workload: String,
    policy: &'static str,
    limit: Option<u64>,
    working_set: Option<u64>,
    peak_working_set: u64,
    memory_some_avg10: Option<f64>,
    memory_full_avg10: Option<f64>,
    oom_kills: u64,
    history: Vec<Sample>,
}

fn container_psi(t: &Tracked) -> ContainerPsi {
    let last = t.last_sample();
    ContainerPsi {
        id: t.id.clone(),
        name: t.name.clone(),
        namespace: t.pod_namespace.clone(),
        pod: t.pod.clone(),
        workload: t.workload.clone(),
        policy: t.policy.as_str(),
        limit: t.limit,
        working_set: last.map(|s| s.usage),
        peak_working_set: t.peak_working_set,
        memory_some_avg10: last.map(|s| s.memory_some),
        memory_full_avg10: last.map(|s| s.memory_full),
        oom_kills: t.oom_kills,
        history: t.history.iter().copied().collect(),
    }
}

async fn psi(State(app): State<App>) -> Json<Psi> {
    let a = &app.agent;
    let (node, hist) = a.node.lock().expect("node").clone();
    let mut containers: Vec<ContainerPsi> = a
        .containers
        .lock()
        .expect("containers")
        .values()
        .map(container_psi)
        .collect();
    containers
        .sort_by(|x, y| (&x.namespace, &x.pod, &x.name).cmp(&(&y.namespace, &y.pod, &y.name)));
    Json(Psi {
        cgroup_layout: a.layout.name(),
        mem_total: a.mem_total,
        node,
        node_history: hist.iter().copied().collect(),
        containers,
    })
}

async fn list(State(app): State<App>) -> Json<Vec<Tracked>> {
    let mut v: Vec<Tracked> = app
        .agent
        .containers
        .lock()
        .expect("containers")
        .values()
        .cloned()
        .collect();
    v.sort_by(|x, y| x.id.cmp(&y.id));
    Json(v)
}

/// `hb policy explain`.
#[derive(Serialize)]
struct Explain {
    container: Tracked,
    learned_runs: Vec<u64>,
    learned_working_set: Option<u64>,
    learned_peak: Option<u64>,
    headroom_now: f64,
    node_memory_some_avg10: f64,
    decisions: Vec<Decision>,
}

async fn explain(State(app): State<App>, Path(id): Path<String>) -> Response {
    let a = &app.agent;
    let found = {
        let map = a.containers.lock().expect("containers");
        let matches: Vec<&Tracked> = map
            .values()
            .filter(|t| t.id == id || t.id.starts_with(&id) || t.name == id)
            .collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err((
                StatusCode::NOT_FOUND,
                format!("no tracked container matches {id:?} (policy off, or not seen)"),
            )),
            many => Err((
                StatusCode::CONFLICT,
                format!(
                    "{id:?} matches {} containers: {}",
                    many.len(),
                    many.iter()
                        .map(|t| &t.id[..t.id.len().min(12)])
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    };
    let t = match found {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let learned = a.store.lock().expect("store").get(&t.workload);
    let node_some = a.node_memory_some();
    let cfg = a.memory_config();
    Json(Explain {
        learned_runs: learned
            .as_ref()
            .map(|w| w.runs.iter().copied().collect())
            .unwrap_or_default(),
        learned_working_set: learned.as_ref().and_then(|w| w.working_set()),
        learned_peak: learned.as_ref().and_then(|w| w.peak()),
        headroom_now: crate::memory::policy::headroom(&cfg, node_some),
        node_memory_some_avg10: node_some,
        decisions: t.decisions.iter().cloned().collect(),
        container: t,
    })
    .into_response()
}

/// `hb trace`: what the tracer saw of a container.
#[derive(Serialize)]
struct TraceView {
    id: String,
    name: String,
    cgroup: u64,
    live: bool,
    syscalls: std::collections::BTreeMap<u32, u64>,
    syscall_total: u64,
    syscall_window_closed: bool,
    syscall_rate: Option<f64>,
    syscall_samples: u64,
    execs: Vec<crate::trace::Exec>,
    exec_count: u64,
    opened: Vec<String>,
    open_count: u64,
    oom_killed: Vec<u32>,
    flows: Vec<crate::trace::Flow>,
    flow_count: u64,
    bytes_in: u64,
    bytes_out: u64,
    /// This container's events lost to a full ring buffer.
    ring_drops: u64,
    /// This container's opens left out by sampling under pressure.
    sampled_out: u64,
}

async fn trace(State(app): State<App>, Path(id): Path<String>) -> Response {
    let tr = &app.agent.tracing;
    if !tr.available() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("tracing is unavailable: {}", tr.unavailable_reason()),
        )
            .into_response();
    }
    let ids: Vec<String> = tr
        .ids()
        .into_iter()
        .filter(|c| *c == id || c.starts_with(&id))
        .collect();
    let found = match ids.as_slice() {
        [one] => tr.get(one),
        [] => None,
        _ => {
            return (
                StatusCode::CONFLICT,
                format!("{id:?} matches several containers"),
            )
                .into_response();
        }
    };
    let Some((t, syscalls)) = found else {
        return (
            StatusCode::NOT_FOUND,
            format!("no traced container matches {id:?}"),
        )
            .into_response();
    };
    Json(TraceView {
        syscall_total: syscalls.values().sum(),
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
    .into_response()
}

/// `hb top`: every traced container's counters now.
async fn top(State(app): State<App>) -> Response {
    let tr = &app.agent.tracing;
    if !tr.available() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("tracing is unavailable: {}", tr.unavailable_reason()),
        )
            .into_response();
    }
    Json(serde_json::json!({
        "at_ms": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        "ring_drops": tr.drops(),
        "sampled": tr.sampled(),
        "containers": tr.top(),
    }))
    .into_response()
}

/// `hb trace --follow`: the container's events as they happen, one JSON
/// object per line, until the client goes away. A reader too slow for the
/// event rate gets a `{"kind":"lagged","missed":N}` line instead of the
/// events it missed.
async fn events(State(app): State<App>, Path(id): Path<String>) -> Response {
    let tr = app.agent.tracing.clone();
    let ids: Vec<String> = tr
        .ids()
        .into_iter()
        .filter(|c| *c == id || c.starts_with(&id))
        .collect();
    let [id] = ids.as_slice() else {
        return (
            StatusCode::NOT_FOUND,
            format!("no single traced container matches {id:?}"),
        )
            .into_response();
    };
    let id = id.clone();
    let rx = tr.stream.subscribe();
    let lines = futures::stream::unfold(rx, move |mut rx| {
        let id = id.clone();
        async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let line = match rx.recv().await {
                    Ok(ev) if ev.container == id => serde_json::to_string(&ev).ok()?,
                    Ok(_) => continue,
                    Err(RecvError::Lagged(n)) => format!("{{\"kind\":\"lagged\",\"missed\":{n}}}"),
                    Err(RecvError::Closed) => return None,
                };
                return Some((Ok::<_, std::convert::Infallible>(line + "\n"), rx));
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}

async fn register(State(app): State<App>, Json(info): Json<ContainerInfo>) -> Response {
    if info.id.is_empty() || info.cgroups_path.is_empty() {
        return (StatusCode::BAD_REQUEST, "id and cgroups_path are required").into_response();
    }
    if crate::cgroup::relative_path(&info.cgroups_path).is_none() {
        return (
            StatusCode::BAD_REQUEST,
            format!("cgroups_path {:?} is not a cgroup path", info.cgroups_path),
        )
            .into_response();
    }
    let a = &app.agent;
    a.trace_start(&info);
    let Some(mut t) = a.track(info, Source::Local) else {
        return (StatusCode::OK, Json(serde_json::json!({"policy": "off"}))).into_response();
    };
    let limit = a.size_new(&mut t);
    t.started = true;
    a.containers
        .lock()
        .expect("containers")
        .insert(t.id.clone(), t.clone());
    if let (Some(l), Some(cg)) = (limit, t.cgroup.as_ref()) {
        let high = a.high_for(l, cg.v2);
        if let Err(e) = cg.set_limit(l, high) {
            a.metrics.apply_errors.inc();
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("set the limit in {}: {e}", cg.memory.display()),
            )
                .into_response();
        }
        a.metrics.decision("create");
    }
    a.wake.notify_one();
    (StatusCode::CREATED, Json(t)).into_response()
}

async fn unregister(State(app): State<App>, Path(id): Path<String>) -> StatusCode {
    let known = app
        .agent
        .containers
        .lock()
        .expect("containers")
        .contains_key(&id);
    app.agent.finish(&id, true);
    if known {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
}
