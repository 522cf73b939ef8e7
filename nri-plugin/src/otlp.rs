//! OpenTelemetry export: one span per traced container's lifetime, sent to
//! a collector over OTLP/HTTP (protobuf) by opentelemetry-otlp.
//!
//! The span opens when the container is watched (before its first
//! instruction) and ends when it stops, carrying what the tracer counted.
//! Execs and OOM kills are events on it; each TCP connection is a child
//! span from connect/accept to close. Times are the kernel's: events reach
//! the agent from the ring buffer after the fact, so spans are built with
//! explicit timestamps through the opentelemetry API. tracing-opentelemetry
//! maps the agent's own `tracing` spans, which start when code enters them;
//! it cannot place a span at a time taken in the kernel, so it is not used.
//!
//! The exporter's HTTP client is the workspace's reqwest (rustls with the
//! system roots, as the registry client), run on the agent's tokio runtime:
//! the SDK's batch processor calls it from a thread of its own.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracerProvider, Span, Tracer};

use hyperbox_api::types::{Exec, Flow};

/// Events kept on one container span (the SDK's default is 128).
const EVENTS_PER_SPAN: u32 = 4096;

/// Errors of starting the exporter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The HTTP client could not be built (TLS roots).
    #[error("build the OTLP HTTP client")]
    Client(#[source] reqwest::Error),
    /// The exporter refused its configuration.
    #[error("build the OTLP exporter for {endpoint}")]
    Build {
        /// Where it would have exported.
        endpoint: String,
        /// The cause.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Where spans go: the config's endpoint (`/v1/traces` added to a URL
/// without a path), else the standard environment variables (resolved by
/// the exporter itself), else nowhere.
pub fn endpoint(cfg: &hyperbox_config::Tracing) -> Option<Option<String>> {
    let e = cfg.otlp_endpoint.trim().trim_end_matches('/');
    if !e.is_empty() {
        let after_scheme = e.split_once("://").map_or(e, |(_, r)| r);
        return Some(Some(if after_scheme.contains('/') {
            e.to_string()
        } else {
            format!("{e}/v1/traces")
        }));
    }
    let set = |k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    (set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || set("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .then_some(None)
}

/// reqwest on the agent's runtime, for the SDK's export thread.
#[derive(Debug)]
struct Client {
    http: reqwest::Client,
    rt: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Client {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let http = self.http.clone();
        let (status, headers, body) = self
            .rt
            .spawn(async move {
                let r = http.execute(request).await?;
                let status = r.status();
                let headers = r.headers().clone();
                let body = r.bytes().await?;
                Ok::<_, reqwest::Error>((status, headers, body))
            })
            .await??;
        let mut response = http::Response::builder().status(status).body(body)?;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

/// Who a container span is about.
#[derive(Debug, Clone, Default)]
pub struct Container {
    /// Container id.
    pub id: String,
    /// Container name.
    pub name: String,
    /// Pod name (empty outside Kubernetes).
    pub pod: String,
    /// Pod namespace.
    pub namespace: String,
    /// Image reference.
    pub image: String,
    /// The cgroup id the tracer watches.
    pub cgroup: u64,
}

/// What the tracer counted over a container's life, set on its span.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Syscalls entered.
    pub syscalls: u64,
    /// Distinct syscall numbers.
    pub distinct_syscalls: u64,
    /// Execs.
    pub execs: u64,
    /// Opens.
    pub opens: u64,
    /// TCP connections closed.
    pub connections: u64,
    /// Bytes received over them.
    pub bytes_in: u64,
    /// Bytes sent over them.
    pub bytes_out: u64,
    /// Processes OOM-killed.
    pub oom_kills: u64,
}

/// The span exporter and the spans of the containers being traced.
#[derive(Debug)]
pub struct Exporter {
    provider: SdkTracerProvider,
    tracer: Tracer,
    live: Mutex<HashMap<String, Span>>,
    // Stopped containers' span contexts: a connection can close after its
    // container stopped, and is still its child.
    ended: Mutex<HashMap<String, SpanContext>>,
    /// Where it exports (for `/healthz` and logs).
    pub target: String,
}

/// `url` without user info, query or fragment (`https://user:token@h/p?k=v`
/// → `https://h/p`).
fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if scheme.is_empty() {
        format!("{host}{path}")
    } else {
        format!("{scheme}://{host}{path}")
    }
}

/// Kernel monotonic ns (what `bpf_ktime_get_ns` reports) to wall time.
fn wall(mono_ns: u64) -> SystemTime {
    let now = SystemTime::now();
    let mono_now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(mono_ns);
    now.checked_sub(Duration::from_nanos(mono_now.saturating_sub(mono_ns)))
        .unwrap_or(now)
}

impl Exporter {
    /// Starts exporting when an endpoint is configured; `None` otherwise.
    /// Must run inside the agent's tokio runtime.
    pub fn start(cfg: &hyperbox_config::Tracing) -> Result<Option<Exporter>, Error> {
        let Some(endpoint) = endpoint(cfg) else {
            return Ok(None);
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(cfg.otlp_timeout_secs))
            .build()
            .map_err(Error::Client)?;
        let client = Client {
            http,
            rt: tokio::runtime::Handle::current(),
        };
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_timeout(Duration::from_secs(cfg.otlp_timeout_secs));
        if let Some(e) = &endpoint {
            builder = builder.with_endpoint(e.clone());
        }
        if !cfg.otlp_headers.is_empty() {
            builder = builder.with_headers(cfg.otlp_headers.clone().into_iter().collect());
        }
        // Shown in /healthz and logs: never the endpoint's user info or
        // query, where collectors' credentials sometimes travel.
        let target = endpoint
            .as_deref()
            .map(redact)
            .unwrap_or_else(|| "OTEL_EXPORTER_OTLP_* from the environment".into());
        let exporter = builder.build().map_err(|source| Error::Build {
            endpoint: target.clone(),
            source,
        })?;
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let resource = Resource::builder_empty()
            .with_service_name(cfg.otlp_service_name.clone())
            .with_attributes([
                KeyValue::new("host.name", host),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_max_events_per_span(EVENTS_PER_SPAN)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("hyperbox-agent");
        tracing::info!(endpoint = %target, "exporting container spans over OTLP");
        Ok(Some(Exporter {
            provider,
            tracer,
            live: Mutex::default(),
            ended: Mutex::default(),
            target,
        }))
    }

    /// Opens the container's lifetime span, now.
    pub fn started(&self, c: &Container) {
        let mut attrs = vec![
            KeyValue::new("container.id", c.id.clone()),
            KeyValue::new("container.name", c.name.clone()),
            KeyValue::new("hyperbox.cgroup.id", c.cgroup as i64),
        ];
        for (k, v) in [
            ("k8s.pod.name", &c.pod),
            ("k8s.namespace.name", &c.namespace),
            ("container.image.name", &c.image),
        ] {
            if !v.is_empty() {
                attrs.push(KeyValue::new(k, v.clone()));
            }
        }
        let span = self
            .tracer
            .span_builder(format!("container {}", c.name))
            .with_kind(SpanKind::Internal)
            .with_attributes(attrs)
            .start(&self.tracer);
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(c.id.clone(), span);
    }

    /// An exec, as an event on the container's span.
    pub fn exec(&self, id: &str, e: &Exec) {
        let attrs = vec![
            KeyValue::new("process.pid", i64::from(e.pid)),
            KeyValue::new("process.executable.path", e.path.clone()),
            KeyValue::new(
                "process.command_args",
                opentelemetry::Value::Array(
                    e.args
                        .iter()
                        .map(|a| opentelemetry::StringValue::from(a.clone()))
                        .collect::<Vec<_>>()
                        .into(),
                ),
            ),
        ];
        self.event(id, "exec", e.time_ns, attrs);
    }

    /// An OOM kill, as an event on the container's span.
    pub fn oom_kill(&self, id: &str, pid: u32, time_ns: u64) {
        self.event(
            id,
            "oom_kill",
            time_ns,
            vec![KeyValue::new("process.pid", i64::from(pid))],
        );
    }

    /// A syscall outside the container's seccomp profile, as an event on
    /// its span (`seccomp.denied` or `seccomp.logged`).
    pub fn seccomp(&self, r: &hyperbox_api::types::SeccompReport) {
        let name = if r.outcome == "denied" {
            "seccomp.denied"
        } else {
            "seccomp.logged"
        };
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
            .unwrap_or(0);
        self.event(
            &r.container,
            name,
            now,
            vec![
                KeyValue::new("syscall.name", r.syscall.clone()),
                KeyValue::new("syscall.arch", r.arch.clone()),
                KeyValue::new("seccomp.mode", r.mode.as_str()),
                KeyValue::new("process.pid", i64::from(r.pid)),
                KeyValue::new("process.command", r.comm.clone()),
            ],
        );
    }

    fn event(&self, id: &str, name: &'static str, time_ns: u64, attrs: Vec<KeyValue>) {
        if let Some(span) = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(id)
        {
            span.add_event_with_timestamp(Cow::Borrowed(name), wall(time_ns), attrs);
        }
    }

    /// A closed TCP connection, as a child span of the container's.
    pub fn flow(&self, id: &str, f: &Flow) {
        let parent = {
            let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            match live.get(id) {
                Some(s) => s.span_context().clone(),
                None => match self
                    .ended
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(id)
                {
                    Some(c) => c.clone(),
                    None => return,
                },
            }
        };
        let cx = Context::new().with_remote_span_context(parent);
        let closed = wall(f.closed_ns);
        let opened = closed
            .checked_sub(Duration::from_nanos((f.duration_ms * 1e6) as u64))
            .unwrap_or(closed);
        let mut attrs = vec![
            KeyValue::new("network.transport", "tcp"),
            KeyValue::new("hyperbox.tcp.bytes_in", f.bytes_in as i64),
            KeyValue::new("hyperbox.tcp.bytes_out", f.bytes_out as i64),
        ];
        for (prefix, addr) in [("network.local", &f.local), ("network.peer", &f.remote)] {
            if let Ok(a) = addr.parse::<std::net::SocketAddr>() {
                attrs.push(KeyValue::new(
                    format!("{prefix}.address"),
                    a.ip().to_string(),
                ));
                attrs.push(KeyValue::new(format!("{prefix}.port"), i64::from(a.port())));
            }
        }
        let (name, kind) = if f.outbound {
            ("tcp connect", SpanKind::Client)
        } else {
            ("tcp accept", SpanKind::Server)
        };
        let mut span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_start_time(opened)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &cx);
        span.end_with_timestamp(closed);
    }

    /// Ends the container's span with what the tracer counted.
    pub fn stopped(&self, id: &str, s: &Summary) {
        let Some(mut span) = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id)
        else {
            return;
        };
        summarize(&mut span, s);
        self.ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_string(), span.span_context().clone());
        span.end();
    }

    /// The container was removed: late connections are no longer its.
    pub fn forget(&self, id: &str) {
        self.ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Ends the spans of containers still running (marked as cut short by
    /// the agent's exit) and sends everything buffered.
    pub fn shutdown(&self, summaries: impl Fn(&str) -> Summary) {
        let live: Vec<(String, Span)> = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect();
        for (id, mut span) in live {
            summarize(&mut span, &summaries(&id));
            span.set_attribute(KeyValue::new("hyperbox.agent_stopped", true));
            span.end();
        }
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "OTLP exporter shutdown");
        }
    }
}

fn summarize(span: &mut Span, s: &Summary) {
    span.set_attributes([
        KeyValue::new("hyperbox.syscalls", s.syscalls as i64),
        KeyValue::new("hyperbox.syscalls.distinct", s.distinct_syscalls as i64),
        KeyValue::new("hyperbox.execs", s.execs as i64),
        KeyValue::new("hyperbox.opens", s.opens as i64),
        KeyValue::new("hyperbox.tcp.connections", s.connections as i64),
        KeyValue::new("hyperbox.tcp.bytes_in", s.bytes_in as i64),
        KeyValue::new("hyperbox.tcp.bytes_out", s.bytes_out as i64),
        KeyValue::new("hyperbox.oom_kills", s.oom_kills as i64),
    ]);
    if s.oom_kills > 0 {
        span.set_status(Status::error(format!(
            "{} process(es) OOM-killed",
            s.oom_kills
        )));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_shown_never_carries_credentials() {
        assert_eq!(
            redact("https://user:s3cret@collector.example:4318/v1/traces?api-key=k#x"),
            "https://collector.example:4318/v1/traces"
        );
        assert_eq!(redact("http://127.0.0.1:4318"), "http://127.0.0.1:4318");
        assert_eq!(
            redact("collector:4318/v1/traces"),
            "collector:4318/v1/traces"
        );
    }

    #[test]
    fn endpoint_gets_the_traces_path_only_when_it_has_none() {
        let mut cfg = hyperbox_config::Tracing::default();
        if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
            && std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
        {
            assert_eq!(endpoint(&cfg), None);
        }
        cfg.otlp_endpoint = "http://collector:4318".into();
        assert_eq!(
            endpoint(&cfg),
            Some(Some("http://collector:4318/v1/traces".into()))
        );
        cfg.otlp_endpoint = "https://otel.example/".into();
        assert_eq!(
            endpoint(&cfg),
            Some(Some("https://otel.example/v1/traces".into()))
        );
        cfg.otlp_endpoint = "http://collector:4318/custom/traces".into();
        assert_eq!(
            endpoint(&cfg),
            Some(Some("http://collector:4318/custom/traces".into()))
        );
    }

    #[test]
    fn kernel_times_map_to_wall_times_in_the_past() {
        let mono_now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
        let ns = mono_now.tv_sec() as u64 * 1_000_000_000 + mono_now.tv_nsec() as u64;
        let t = wall(ns - 2_000_000_000);
        let ago = SystemTime::now().duration_since(t).unwrap();
        assert!(
            ago >= Duration::from_millis(1990) && ago < Duration::from_millis(2500),
            "{ago:?}"
        );
    }
}
