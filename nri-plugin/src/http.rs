//! The agent's HTTP surfaces: `/metrics`, `/metrics/memory/psi` and
//! `/healthz` on the loopback metrics address, and the local API on the
//! agent's unix socket (`hb psi`, `hb policy explain`, the shim's policy
//! request and container registration).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Extension, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyperbox_api::types::{
    Action, ContainerInfo, EventLine, Explain, Health, Policy, Psi, Registered, Route, Source,
    StreamNote, Top,
};
use hyperbox_config::MemoryPolicy;
use prometheus_client::registry::Registry;

use crate::access::Access;
use crate::agent::Agent;
use crate::cgroup::Refused;
use crate::metrics::StateCollector;
use crate::state::Lookup;

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

/// The router of the local API socket; `access` says which peers it
/// serves (serve it with [`Router::into_make_service_with_connect_info`]
/// over [`crate::access::Peer`], or every request is refused).
pub fn api_router(agent: Arc<Agent>, access: Arc<Access>) -> Router {
    Router::new()
        .route("/healthz", get(health))
        .route("/v1/psi", get(psi))
        .route("/v1/policies", post(policy))
        .route("/v1/containers", get(list).post(register))
        .route("/v1/containers/{id}", get(explain).delete(unregister))
        .route("/v1/containers/{id}/trace", get(trace))
        .route("/v1/containers/{id}/events", get(events))
        .route("/v1/top", get(top))
        .route(
            "/v1/profiles",
            get(profiles).put(set_profile_mode).delete(forget_profile),
        )
        .route("/v1/profiles/diff", get(diff_profiles))
        .with_state(App {
            agent,
            registry: Arc::new(Registry::default()),
        })
        .layer(axum::middleware::from_fn_with_state(
            access,
            crate::access::check,
        ))
}

/// The first 12 bytes of `id` as `hb` shows ids, cut back to a character
/// boundary (an id is whatever the caller sent, not necessarily ASCII).
pub fn short_id(id: &str) -> &str {
    &id[..id.floor_char_boundary(12)]
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

async fn health(State(app): State<App>) -> Json<Health> {
    let a = &app.agent;
    Json(Health {
        status: "ok".into(),
        tracing: a.tracing.available(),
        tracing_syscall_hook: a.tracing.syscall_hook().into(),
        tracing_syscall_hook_attached: a.tracing.syscall_hook_attached(),
        tracing_refusal_hook: a.tracing.refusal_hook().into(),
        tracing_refusal_hook_attached: a.tracing.refusal_hook_attached(),
        tracing_unavailable: a.tracing.unavailable_reason().into(),
        tracing_cgroup: if a.tracing.uses_v1() {
            "v1 memory"
        } else {
            "v2"
        }
        .into(),
        tracing_otlp_endpoint: a.tracing.otlp_target().map(str::to_string),
        nri_connected: a.link.is_connected(),
        runtime: a.state.runtime(),
        containers: a.state.len() as u64,
        cgroup_layout: a.layout.name().into(),
    })
}

/// `/metrics/memory/psi` and `hb psi`.
async fn psi(State(app): State<App>) -> Json<Psi> {
    let a = &app.agent;
    Json(Psi {
        cgroup_layout: a.layout.name().into(),
        mem_total: a.mem_total,
        node: a.state.node(),
        node_history: a.state.node_history(),
        containers: a.state.psi_views(),
    })
}

async fn list(State(app): State<App>) -> Json<Vec<hyperbox_api::types::Container>> {
    Json(app.agent.state.views())
}

/// `hb policy explain`.
async fn explain(State(app): State<App>, Path(id): Path<String>) -> Response {
    let a = &app.agent;
    let container = match a.state.find(&id) {
        Ok(c) => c,
        Err(Lookup::None) => {
            return (
                StatusCode::NOT_FOUND,
                format!("no tracked container matches {id:?} (policy off, or not seen)"),
            )
                .into_response();
        }
        Err(Lookup::Many(ids)) => {
            return (
                StatusCode::CONFLICT,
                format!(
                    "{id:?} matches {} containers: {}",
                    ids.len(),
                    ids.iter()
                        .map(|i| short_id(i))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
                .into_response();
        }
    };
    let learned = a.state.learned(&container.workload);
    let node_some = a.state.node_memory_some();
    let cfg = a.state.memory_config();
    Json(Explain {
        learned_runs: learned
            .as_ref()
            .map(|w| w.runs.iter().copied().collect())
            .unwrap_or_default(),
        learned_working_set: learned.as_ref().and_then(|w| w.working_set()),
        learned_peak: learned.as_ref().and_then(|w| w.peak()),
        headroom_now: crate::memory::policy::headroom(&cfg, node_some),
        node_memory_some_avg10: node_some,
        decisions: container.decisions.clone(),
        seccomp: a.seccomp.run(&container.id).map(|r| r.decision),
        container,
    })
    .into_response()
}

fn no_profile(workload: &str) -> Response {
    let what = format!("no profile learned for workload {workload:?}");
    (StatusCode::NOT_FOUND, what).into_response()
}

/// The profile store could not be written.
fn not_saved(e: &crate::state_file::SaveError) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        hyperbox_api::error_chain(e),
    )
        .into_response()
}

/// `?workload=…&format=oci|localhost|spo`.
#[derive(Debug, serde::Deserialize)]
struct ProfileQuery {
    workload: Option<String>,
    #[serde(default)]
    format: Option<String>,
}

/// `hb profile ls` (no workload) and `hb profile show` (one workload, in
/// a format).
async fn profiles(
    State(app): State<App>,
    axum::extract::Query(q): axum::extract::Query<ProfileQuery>,
) -> Response {
    let s = &app.agent.seccomp;
    let Some(w) = q.workload else {
        return Json(s.summaries()).into_response();
    };
    let format = q.format.as_deref().unwrap_or("oci");
    if !matches!(format, "oci" | "localhost" | "spo") {
        return (
            StatusCode::BAD_REQUEST,
            format!("unknown format {format:?} (oci, localhost, spo)"),
        )
            .into_response();
    }
    match s.detail(&w, format) {
        Some(d) => Json(d).into_response(),
        None => no_profile(&w),
    }
}

/// `hb profile set-mode`: `{"workload": …, "mode": "enforce" | null}`.
async fn set_profile_mode(
    State(app): State<App>,
    Json(b): Json<hyperbox_api::types::SetMode>,
) -> Response {
    if b.workload.is_empty() {
        return (StatusCode::BAD_REQUEST, "no workload").into_response();
    }
    match app.agent.seccomp.set_mode(&b.workload, b.mode) {
        Ok(()) => {
            tracing::info!(workload = %b.workload, mode = ?b.mode.map(|m| m.as_str()), "seccomp mode override set");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => not_saved(&e),
    }
}

/// `hb profile forget`.
async fn forget_profile(
    State(app): State<App>,
    axum::extract::Query(q): axum::extract::Query<ProfileQuery>,
) -> Response {
    let Some(w) = q.workload else {
        return (StatusCode::BAD_REQUEST, "no workload").into_response();
    };
    match app.agent.seccomp.forget(&w) {
        Ok(true) => {
            tracing::info!(workload = %w, "seccomp profile forgotten");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => no_profile(&w),
        Err(e) => not_saved(&e),
    }
}

/// `?a=…&b=…`.
#[derive(Debug, serde::Deserialize)]
struct DiffQuery {
    a: String,
    b: String,
}

/// `hb profile diff A B`: a workload's profile against another's or
/// against the runtime's default (`default`).
async fn diff_profiles(
    State(app): State<App>,
    axum::extract::Query(q): axum::extract::Query<DiffQuery>,
) -> Response {
    let s = &app.agent.seccomp;
    let missing = |w: &str| {
        if w == "default" {
            let what =
                "the runtime's default profile has not been seen yet (run a container with it)";
            (StatusCode::NOT_FOUND, what).into_response()
        } else {
            no_profile(w)
        }
    };
    let Some(a) = s.allowed_of(&q.a) else {
        return missing(&q.a);
    };
    let Some(b) = s.allowed_of(&q.b) else {
        return missing(&q.b);
    };
    Json(hyperbox_api::types::ProfileDiff {
        only_a: a.difference(&b).cloned().collect(),
        only_b: b.difference(&a).cloned().collect(),
        both: a.intersection(&b).count(),
        a: q.a,
        b: q.b,
    })
    .into_response()
}

/// `hb trace`: what the tracer saw of a container.
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
        [one] => tr.report(one),
        [] => None,
        _ => {
            return (
                StatusCode::CONFLICT,
                format!("{id:?} matches several containers"),
            )
                .into_response();
        }
    };
    match found {
        Some(report) => Json(report).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("no traced container matches {id:?}"),
        )
            .into_response(),
    }
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
    Json(Top {
        at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        ring_drops: tr.drops(),
        sampled: tr.sampled(),
        containers: tr.top(),
    })
    .into_response()
}

/// `hb trace --follow`: the container's events as they happen, one JSON
/// object per line, until the client goes away. A reader too slow for the
/// event rate gets a [`StreamNote::Lagged`] line instead of the events it
/// missed.
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
    let rx = tr.subscribe();
    let lines = futures::stream::unfold(rx, move |mut rx| {
        let id = id.clone();
        async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let line = match rx.recv().await {
                    Ok(ev) if ev.container == id => EventLine::Event(ev),
                    Ok(_) => continue,
                    Err(RecvError::Lagged(missed)) => {
                        EventLine::Note(StreamNote::Lagged { missed })
                    }
                    Err(RecvError::Closed) => return None,
                };
                let line = serde_json::to_string(&line).ok()?;
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

/// The checks of `POST /v1/policies` and `POST /v1/containers`: an id, a
/// containerd namespace, and the container's own cgroup under the
/// runtime's hierarchy (the agent writes limits there as root). Before
/// `runc create` (`created` false) the cgroup may not exist yet; every
/// other rule holds, and the registration that follows checks it whole.
fn check(agent: &Agent, access: &Access, info: &ContainerInfo, created: bool) -> Option<Response> {
    if info.id.is_empty() || info.cgroups_path.is_empty() {
        return Some((StatusCode::BAD_REQUEST, "id and cgroups_path are required").into_response());
    }
    let ns = &info.pod_namespace;
    if info.cri && ns.trim().is_empty() {
        // Its workload key would belong to no namespace.
        return Some(
            (
                StatusCode::BAD_REQUEST,
                "a CRI container needs its pod namespace (io.kubernetes.cri.sandbox-namespace) in pod_namespace",
            )
                .into_response(),
        );
    }
    if ns.contains(['/', ':']) || ns.chars().any(char::is_control) {
        return Some(
            (
                StatusCode::BAD_REQUEST,
                format!("pod_namespace {ns:?} is not a containerd namespace"),
            )
                .into_response(),
        );
    }
    match agent
        .layout
        .container_cgroup(&info.cgroups_path, &info.id, access.cgroup_parents())
    {
        Ok(_) => None,
        Err(Refused::Missing(_, e)) if !created && e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some((StatusCode::BAD_REQUEST, hyperbox_api::error_chain(&e)).into_response()),
    }
}

/// The shim, before `runc create`: what to write into the container's
/// spec (see [`Agent::policy_at_create`]).
async fn policy(
    State(app): State<App>,
    Extension(access): Extension<Arc<Access>>,
    Json(info): Json<ContainerInfo>,
) -> Response {
    if let Some(refused) = check(&app.agent, &access, &info, false) {
        return refused;
    }
    let answer: Policy = app.agent.policy_at_create(info);
    tracing::debug!(decided_by = answer.decided_by.as_str(), limit = ?answer.memory_limit, reason = %answer.reason, "policy at create");
    Json(answer).into_response()
}

/// The shim, after `runc create` (and after `runc start`, `running`
/// true). A container tracked already (its policy asked for, or seen
/// through NRI) is not sized again: tracing starts if it has not, and
/// `running` marks it started (only started containers are sampled,
/// adjusted and learned from). Any other is tracked and sized here, the
/// limit written to its cgroup.
async fn register(
    State(app): State<App>,
    Extension(access): Extension<Arc<Access>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<crate::access::Peer>,
    Json(info): Json<ContainerInfo>,
) -> Response {
    if let Some(refused) = check(&app.agent, &access, &info, true) {
        return refused;
    }
    let a = &app.agent;
    let known = a.forget_stale(&info);
    // Not seen through NRI: a start only the shim sees (ctr, nerdctl).
    // Counted from root only (the shim runs as root): an `api_group`
    // member could otherwise name any image, and the snapshotter would
    // reach for it at its registry.
    if !known && !info.running && peer.cred.is_some_and(|(uid, _, _)| uid == 0) {
        a.note_start(&info.image);
    }
    if !info.running {
        // Nothing ran yet: whatever is watched under this id is an earlier
        // run's (its cgroup is gone) or this registration's, retried.
        a.tracing.forget(&info.id);
    }
    if !a.tracing.is_watching(&info.id) {
        a.trace_start(&info);
    }
    if known {
        if info.running {
            a.state.set_started(&info.id);
            a.state.wake();
        }
        if let Some(c) = a.state.get(&info.id) {
            return (StatusCode::OK, Json(Registered::Tracked(Box::new(c)))).into_response();
        }
        // Unregistered meanwhile: tracked afresh below.
    }
    let Some(mut t) = a.track(info, Source::Local) else {
        let off = Registered::Untracked {
            policy: MemoryPolicy::Off,
        };
        return (StatusCode::OK, Json(off)).into_response();
    };
    let limit = a.size_new(&mut t, Route::Cgroup);
    a.state.insert(t.clone());
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
        a.metrics.decision(Action::Create);
    }
    a.state.wake();
    let tracked = Registered::Tracked(Box::new(t.view()));
    (StatusCode::CREATED, Json(tracked)).into_response()
}

/// The shim, at delete: the run ended. Its peak is learned and its tracing
/// ends. A CRI container tracked through NRI stays known (as after NRI's
/// StopContainer) until NRI's RemoveContainer.
async fn unregister(State(app): State<App>, Path(id): Path<String>) -> StatusCode {
    let a = &app.agent;
    let tracked = a.state.get(&id);
    let traced = a.tracing.ids().contains(&id);
    let had_run = a.seccomp.run(&id).is_some();
    match &tracked {
        Some(c) if c.source == Source::Nri => a.end_run(&id, false),
        _ => a.end_run(&id, true),
    }
    if tracked.is_some() || traced || had_run {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path as FsPath;

    use axum::body::Body;
    use axum::http::Request;
    use hyperbox_api::types::{Container, Route};
    use hyperbox_config::Memory;
    use hyperbox_nri_proto::plugin::Link;
    use serde::de::DeserializeOwned;
    use tower::ServiceExt;

    use super::*;
    use crate::cgroup::Layout;
    use crate::memory::store::Store;
    use crate::trace::Tracing;

    const MIB: u64 = 1 << 20;
    /// Ids of 'a' then 2-byte characters: byte 12 falls inside one.
    const MB1: &str = "a\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}x1";
    const MB2: &str = "a\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}x2";

    /// An agent over a fake cgroup v2 tree and a store in `dir`, without
    /// NRI or the tracer.
    fn agent(dir: &FsPath) -> Arc<Agent> {
        let cgroups = dir.join("cgroup");
        for id in ["app-1", "app-2", MB1, MB2] {
            std::fs::create_dir_all(cgroups.join("hb").join(id)).unwrap();
        }
        std::fs::write(cgroups.join("cgroup.controllers"), "memory\n").unwrap();
        std::fs::write(cgroups.join("hb/app-1/memory.max"), "max\n").unwrap();
        let store = Store::open(&dir.join("state"), 20).unwrap();
        let (agent, _jobs) = Agent::new(
            Memory::default(),
            Layout::detect(&cgroups),
            store,
            Arc::new(Link::default()),
            Tracing::unavailable("tracing.enabled = false"),
            crate::seccomp::runs::Seccomp::open(Default::default(), &dir.join("state")).unwrap(),
        );
        agent
    }

    /// A request from root, as the shim makes it.
    async fn call(
        agent: &Arc<Agent>,
        method: &str,
        uri: &str,
        body: Option<serde_json::Value>,
    ) -> (StatusCode, Vec<u8>) {
        call_as(agent, (0, 0), method, uri, body).await
    }

    /// A request from a peer with `uid` and `gid`.
    async fn call_as(
        agent: &Arc<Agent>,
        (uid, gid): (u32, u32),
        method: &str,
        uri: &str,
        body: Option<serde_json::Value>,
    ) -> (StatusCode, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(uri);
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let mut req = req
            .body(body.map_or(Body::empty(), |b| Body::from(b.to_string())))
            .unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(crate::access::Peer {
                cred: Some((uid, gid, None)),
            }));
        let access = Arc::new(Access::with_gid("ops", nix::unistd::Gid::from_raw(4242)));
        let answer = api_router(agent.clone(), access)
            .oneshot(req)
            .await
            .unwrap();
        let status = answer.status();
        let bytes = axum::body::to_bytes(answer.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, bytes.to_vec())
    }

    async fn get<T: DeserializeOwned>(agent: &Arc<Agent>, uri: &str) -> T {
        let (status, body) = call(agent, "GET", uri, None).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    fn registration(id: &str, cgroups_path: &str, policy: &str) -> serde_json::Value {
        serde_json::json!({
            "id": id,
            "name": "app",
            "cgroups_path": cgroups_path,
            "annotations": {
                "memory.hyperbox.dev/policy": policy,
                "hyperbox.dev/workload": "direct"
            },
            "running": true
        })
    }

    #[tokio::test]
    async fn health_says_what_the_agent_runs_with() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        let h: Health = get(&a, "/healthz").await;
        assert_eq!(h.status, "ok");
        assert!(!h.tracing && !h.nri_connected);
        assert_eq!(h.tracing_unavailable, "tracing.enabled = false");
        assert_eq!((h.containers, h.cgroup_layout.as_str()), (0, "v2"));
    }

    #[tokio::test]
    async fn a_registered_container_is_sized_from_what_was_learned() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        a.state
            .record_run("containerd:default/direct", 20 * MIB)
            .unwrap();
        let (status, body) = call(
            &a,
            "POST",
            "/v1/containers",
            Some(registration("app-1", "/hb/app-1", "adaptive")),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        let Registered::Tracked(c) = serde_json::from_slice(&body).unwrap() else {
            panic!("not tracked: {}", String::from_utf8_lossy(&body));
        };
        assert_eq!((c.source, c.limit), (Source::Local, Some(30 * MIB)));
        // The limit is in the cgroup, memory.high below it.
        let cg = dir.path().join("cgroup/hb/app-1");
        let read = |f: &str| std::fs::read_to_string(cg.join(f)).unwrap();
        assert_eq!(read("memory.max"), (30 * MIB).to_string());
        assert_eq!(
            read("memory.high"),
            ((30 * MIB) as f64 * 0.9).floor().to_string()
        );

        // hb policy explain, by id prefix or by name.
        for query in ["app", "app-"] {
            let e: Explain = get(&a, &format!("/v1/containers/{query}")).await;
            assert_eq!(e.learned_runs, [20 * MIB]);
            assert_eq!(e.decisions.len(), 1);
            let d = &e.decisions[0];
            assert_eq!((d.action, d.via), (Action::Create, Route::Cgroup));
            assert_eq!((d.from, d.to), (None, Some(30 * MIB)));
        }
        let list: Vec<Container> = get(&a, "/v1/containers").await;
        assert_eq!(list.len(), 1);
        let psi: Psi = get(&a, "/v1/psi").await;
        assert_eq!(psi.containers[0].policy, MemoryPolicy::Adaptive);
        assert_eq!(psi.containers[0].limit, Some(30 * MIB));

        let (status, _) = call(&a, "DELETE", "/v1/containers/app-1", None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _) = call(&a, "DELETE", "/v1/containers/app-1", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = call(&a, "GET", "/v1/containers/app-1", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn without_history_a_container_is_learned_not_limited() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        let (status, _) = call(
            &a,
            "POST",
            "/v1/containers",
            Some(registration("app-1", "/hb/app-1", "adaptive")),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        let e: Explain = get(&a, "/v1/containers/app-1").await;
        assert_eq!(
            (e.decisions[0].action, e.decisions[0].via, e.container.limit),
            (Action::Learn, Route::None, None)
        );
        let max = std::fs::read_to_string(dir.path().join("cgroup/hb/app-1/memory.max"));
        assert_eq!(max.unwrap(), "max\n");
    }

    #[tokio::test]
    async fn bad_or_opted_out_registrations_track_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        let (status, body) = call(
            &a,
            "POST",
            "/v1/containers",
            Some(registration("x", "/a/../../etc", "adaptive")),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&body).contains("not a cgroup path"));
        let (status, _) = call(
            &a,
            "POST",
            "/v1/containers",
            Some(registration("", "/hb/app-1", "adaptive")),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, body) = call(
            &a,
            "POST",
            "/v1/containers",
            Some(registration("app-1", "/hb/app-1", "off")),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            serde_json::from_slice::<Registered>(&body).unwrap(),
            Registered::Untracked {
                policy: MemoryPolicy::Off
            }
        );
        assert!(a.state.is_empty());
    }

    #[tokio::test]
    async fn an_ambiguous_prefix_is_a_conflict_naming_the_candidates() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        for id in ["app-1", "app-2"] {
            let (status, _) = call(
                &a,
                "POST",
                "/v1/containers",
                Some(registration(id, &format!("/hb/{id}"), "observe")),
            )
            .await;
            assert_eq!(status, StatusCode::CREATED);
        }
        let (status, body) = call(&a, "GET", "/v1/containers/app-", None).await;
        assert_eq!(status, StatusCode::CONFLICT);
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("app-1") && text.contains("app-2"), "{text}");
        let e: Explain = get(&a, "/v1/containers/app-2").await;
        assert_eq!(e.decisions[0].action, Action::Observe);
    }

    #[tokio::test]
    async fn tracer_endpoints_say_why_tracing_is_off() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        for uri in ["/v1/top", "/v1/containers/app-1/trace"] {
            let (status, body) = call(&a, "GET", uri, None).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{uri}");
            let text = String::from_utf8_lossy(&body);
            assert!(text.contains("tracing.enabled = false"), "{uri}: {text}");
        }
        let (status, _) = call(&a, "GET", "/v1/containers/app-1/events", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn peers_other_than_root_or_the_group_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        let body = || Some(registration("app-1", "/hb/app-1", "adaptive"));
        let nobody = (65534, 65534);
        let (status, text) = call_as(&a, nobody, "POST", "/v1/containers", body()).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let text = String::from_utf8_lossy(&text);
        assert!(
            text.contains("uid 65534") && text.contains("\"ops\""),
            "{text}"
        );
        let (status, _) = call_as(&a, nobody, "GET", "/v1/containers", None).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(a.state.is_empty());
        // A member of the group (by its gid) is served.
        let (status, _) = call_as(&a, (65534, 4242), "POST", "/v1/containers", body()).await;
        assert_eq!(status, StatusCode::CREATED);
        // No credentials at all: refused.
        let req = Request::builder()
            .uri("/healthz")
            .body(Body::empty())
            .unwrap();
        let access = Arc::new(Access::root_only());
        let answer = api_router(a.clone(), access).oneshot(req).await.unwrap();
        assert_eq!(answer.status(), StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn registrations_reach_only_the_containers_own_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        let cases = [
            // Another container's cgroup, under this id.
            ("app-9", "/hb/app-1", "does not end in"),
            // The hierarchy's top.
            ("hb", "/hb", "not under a runtime"),
            ("x", "/hb/../x", "not a cgroup path"),
            ("sshd.service", "/system.slice/sshd.service", "the host's"),
            ("app-3", "/hb/app-3", "look up the cgroup"),
        ];
        for (id, path, why) in cases {
            let reg = registration(id, path, "adaptive");
            let (status, body) = call(&a, "POST", "/v1/containers", Some(reg)).await;
            let text = String::from_utf8_lossy(&body);
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {text}");
            assert!(text.contains(why), "{path}: {text}");
        }
        let mut bad_ns = registration("app-1", "/hb/app-1", "adaptive");
        bad_ns["pod_namespace"] = "a/b".into();
        let (status, _) = call(&a, "POST", "/v1/containers", Some(bad_ns)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(a.state.is_empty());
        let max = std::fs::read_to_string(dir.path().join("cgroup/hb/app-1/memory.max"));
        assert_eq!(max.unwrap(), "max\n");
    }

    #[tokio::test]
    async fn multibyte_ids_are_listed_whole_characters() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        for id in [MB1, MB2] {
            let reg = registration(id, &format!("/hb/{id}"), "observe");
            let (status, body) = call(&a, "POST", "/v1/containers", Some(reg)).await;
            let text = String::from_utf8_lossy(&body);
            assert_eq!(status, StatusCode::CREATED, "{text}");
        }
        let (status, body) = call(&a, "GET", "/v1/containers/a", None).await;
        assert_eq!(status, StatusCode::CONFLICT);
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains(&MB1[..11]), "{text}");
        assert_eq!(short_id(MB1), &MB1[..11]);
        assert_eq!(short_id("0123456789abcdef"), "0123456789ab");
        assert_eq!(short_id("abc"), "abc");
    }

    /// What the shim reads from config.json before `runc create`.
    fn before_create(id: &str, policy: &str) -> serde_json::Value {
        let mut info = registration(id, &format!("/hb/{id}"), policy);
        info["running"] = false.into();
        info
    }

    async fn ask_policy(agent: &Arc<Agent>, info: serde_json::Value) -> Policy {
        let (status, body) = call(agent, "POST", "/v1/policies", Some(info)).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn a_policy_sizes_a_container_before_it_is_created() {
        use hyperbox_api::annotations::{MEMORY_DECISION, MEMORY_USER_LIMIT};
        use hyperbox_api::types::DecidedBy;
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        a.state
            .record_run("containerd:default/direct", 20 * MIB)
            .unwrap();
        // Its cgroup does not exist yet: runc makes it.
        let cg = dir.path().join("cgroup/hb/app-3");
        assert!(!cg.exists());
        let mut info = before_create("app-3", "adaptive");
        info["limit"] = (100 * MIB).into();
        info["had_swap"] = true.into();
        let p = ask_policy(&a, info.clone()).await;
        assert_eq!(p.decided_by, DecidedBy::Agent);
        assert_eq!(p.memory_limit, Some(30 * MIB));
        assert_eq!(p.memory_high, Some(((30 * MIB) as f64 * 0.9) as u64));
        assert_eq!(p.memory_swap, Some(30 * MIB));
        assert_eq!(p.annotations[MEMORY_USER_LIMIT], (100 * MIB).to_string());
        assert_eq!(p.annotations[MEMORY_DECISION], p.reason);
        assert!(p.reason.contains("over 1 run(s)"), "{}", p.reason);
        let e: Explain = get(&a, "/v1/containers/app-3").await;
        assert_eq!(e.decisions.len(), 1);
        assert_eq!(
            (e.decisions[0].action, e.decisions[0].via),
            (Action::Create, Route::Spec)
        );
        let c = &e.container;
        assert_eq!((c.source, c.started), (Source::Local, false));
        assert_eq!(c.workload, "containerd:default/direct");
        assert_eq!(c.bounds.ceiling, Some(100 * MIB));

        // Asked again (a retry): the same answer, nothing decided twice.
        assert_eq!(ask_policy(&a, info).await, p);
        let e: Explain = get(&a, "/v1/containers/app-3").await;
        assert_eq!(e.decisions.len(), 1);

        // runc created it with the spec's limit; the registration that
        // follows does not size it again nor write its cgroup.
        std::fs::create_dir_all(&cg).unwrap();
        let mut reg = registration("app-3", "/hb/app-3", "adaptive");
        reg["running"] = false.into();
        reg["limit"] = (30 * MIB).into();
        let (status, body) = call(&a, "POST", "/v1/containers", Some(reg.clone())).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let Registered::Tracked(c) = serde_json::from_slice(&body).unwrap() else {
            panic!("not tracked: {}", String::from_utf8_lossy(&body));
        };
        assert_eq!(
            (c.limit, c.started, c.decisions.len()),
            (Some(30 * MIB), false, 1)
        );
        assert!(!cg.join("memory.max").exists(), "the cgroup was written");
        // After runc start: started, still not sized again.
        reg["running"] = true.into();
        let (status, body) = call(&a, "POST", "/v1/containers", Some(reg)).await;
        assert_eq!(status, StatusCode::OK);
        let Registered::Tracked(c) = serde_json::from_slice(&body).unwrap() else {
            panic!("not tracked");
        };
        assert_eq!((c.started, c.decisions.len()), (true, 1));
        assert!(!cg.join("memory.max").exists());
        assert_eq!(a.state.len(), 1);
    }

    #[tokio::test]
    async fn without_history_a_policy_sets_no_limit() {
        use hyperbox_api::types::DecidedBy;
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        let p = ask_policy(&a, before_create("app-3", "adaptive")).await;
        assert_eq!(p.decided_by, DecidedBy::Agent);
        assert_eq!(
            (p.memory_limit, p.memory_high, p.memory_swap),
            (None, None, None)
        );
        assert!(p.annotations.is_empty());
        let e: Explain = get(&a, "/v1/containers/app-3").await;
        assert_eq!(e.decisions[0].action, Action::Learn);
        // Policy observe: tracked and learned, never limited.
        let p = ask_policy(&a, before_create("app-4", "observe")).await;
        assert_eq!((p.decided_by, p.memory_limit), (DecidedBy::Agent, None));
        assert!(p.reason.contains("observe"), "{}", p.reason);
        // Policy off: untouched, untracked.
        let p = ask_policy(&a, before_create("app-5", "off")).await;
        assert_eq!((p.decided_by, p.memory_limit), (DecidedBy::Off, None));
        assert!(
            p.reason.contains("memory.hyperbox.dev/policy"),
            "{}",
            p.reason
        );
        assert_eq!(a.state.len(), 2);
    }

    #[tokio::test]
    async fn a_container_nri_decided_for_is_left_alone() {
        use hyperbox_api::types::DecidedBy;
        use hyperbox_nri_proto::api;
        use hyperbox_nri_proto::plugin::Events;
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        let pod = api::PodSandbox {
            namespace: "shop".into(),
            name: "web-0".into(),
            ..Default::default()
        };
        let mut c = api::Container {
            id: "app-3".into(),
            name: "web".into(),
            linux: Some(api::LinuxContainer {
                resources: None,
                cgroups_path: "/hb/app-3".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        c.annotations.insert(
            "io.kubernetes.cri.image-name".into(),
            "reg/team/web:v1".into(),
        );
        c.annotations
            .insert("memory.hyperbox.dev/policy".into(), "adaptive".into());
        a.state
            .record_run("shop/web@reg/team/web", 20 * MIB)
            .unwrap();
        let nri = a.create_container(&pod, &c);
        assert!(nri.adjust.is_some());
        // What the shim reads from the CRI annotations of the same
        // container, after NRI's CreateContainer adjusted its spec.
        let info = serde_json::json!({
            "id": "app-3",
            "name": "web",
            "pod_namespace": "shop",
            "pod": "web-0",
            "image": "reg/team/web:v1",
            "cgroups_path": "/hb/app-3",
            "annotations": {"memory.hyperbox.dev/policy": "adaptive"},
            "limit": 30 * MIB,
            "cri": true
        });
        for _ in 0..2 {
            let p = ask_policy(&a, info.clone()).await;
            assert_eq!((p.decided_by, p.memory_limit), (DecidedBy::Nri, None));
            assert!(p.annotations.is_empty());
        }
        let e: Explain = get(&a, "/v1/containers/app-3").await;
        assert_eq!(e.container.source, Source::Nri);
        assert_eq!(e.decisions.len(), 1);
        assert_eq!(e.decisions[0].via, Route::NriCreate);

        // Without NRI, a CRI container the shim asks for learns into the
        // workload NRI would have used.
        let mut other = info.clone();
        other["id"] = "app-4".into();
        other["cgroups_path"] = "/hb/app-4".into();
        other["limit"] = serde_json::Value::Null;
        let p = ask_policy(&a, other).await;
        assert_eq!(
            (p.decided_by, p.memory_limit),
            (DecidedBy::Agent, Some(30 * MIB))
        );
        let e: Explain = get(&a, "/v1/containers/app-4").await;
        assert_eq!(e.container.workload, "shop/web@reg/team/web");
        assert_eq!(e.container.source, Source::Local);

        // The shim's delete: NRI's container stays known until NRI removes
        // it (as after its StopContainer); the shim's own is forgotten.
        for id in ["app-3", "app-4"] {
            let (status, _) = call(&a, "DELETE", &format!("/v1/containers/{id}"), None).await;
            assert_eq!(status, StatusCode::NO_CONTENT, "{id}");
        }
        let e: Explain = get(&a, "/v1/containers/app-3").await;
        assert!(!e.container.started);
        let (status, _) = call(&a, "GET", "/v1/containers/app-4", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        a.container_event(hyperbox_nri_proto::api::Event::RemoveContainer, &pod, &c);
        assert!(a.state.is_empty());
    }

    #[tokio::test]
    async fn bad_policy_requests_track_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        let mut bad_ns = before_create("app-3", "adaptive");
        bad_ns["pod_namespace"] = "a/b".into();
        let mut cri_without_ns = before_create("app-3", "adaptive");
        cri_without_ns["cri"] = true.into();
        let cases = [
            (bad_ns, "not a containerd namespace"),
            (cri_without_ns, "needs its pod namespace"),
            (before_create("", "adaptive"), "required"),
            (
                registration("x", "/hb/../x", "adaptive"),
                "not a cgroup path",
            ),
            (
                registration("app-9", "/hb/app-1", "adaptive"),
                "does not end in",
            ),
            (registration("hb", "/hb", "adaptive"), "not under a runtime"),
            (
                registration("sshd.service", "/system.slice/sshd.service", "adaptive"),
                "the host's",
            ),
        ];
        for (info, why) in cases {
            let (status, body) = call(&a, "POST", "/v1/policies", Some(info.clone())).await;
            let text = String::from_utf8_lossy(&body);
            assert_eq!(status, StatusCode::BAD_REQUEST, "{info}: {text}");
            assert!(text.contains(why), "{info}: {text}");
        }
        assert!(a.state.is_empty());
    }

    #[tokio::test]
    async fn a_stale_run_under_a_reused_id_is_ended_not_replayed() {
        use hyperbox_api::types::DecidedBy;
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        a.state
            .record_run("containerd:default/direct", 20 * MIB)
            .unwrap();
        // A run registered and started, never unregistered (the shim was
        // killed), then the id is created again.
        let (status, _) = call(
            &a,
            "POST",
            "/v1/containers",
            Some(registration("app-1", "/hb/app-1", "adaptive")),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        let p = ask_policy(&a, before_create("app-1", "adaptive")).await;
        assert_eq!(
            (p.decided_by, p.memory_limit),
            (DecidedBy::Agent, Some(30 * MIB))
        );
        let e: Explain = get(&a, "/v1/containers/app-1").await;
        assert_eq!(e.decisions.len(), 1);
        assert_eq!(e.decisions[0].via, Route::Spec);
        assert!(!e.container.started);
    }
}
