//! An OTLP/HTTP trace receiver for tests: accepts what a collector's
//! `otlp` receiver accepts on `/v1/traces` (protobuf
//! `ExportTraceServiceRequest`, `Content-Type: application/x-protobuf`),
//! decodes it with the OpenTelemetry project's own message definitions
//! (opentelemetry-proto), and keeps every span for the test to inspect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;

/// A received span, flattened with its resource.
#[derive(Debug, Clone)]
pub struct Span {
    /// Resource attributes (`service.name`, `host.name`).
    pub resource: HashMap<String, String>,
    /// Span name.
    pub name: String,
    /// Its id, hex.
    pub span_id: String,
    /// Its parent's id, hex (empty for a root span).
    pub parent_span_id: String,
    /// Its trace id, hex.
    pub trace_id: String,
    /// Start, ns since the epoch.
    pub start_ns: u64,
    /// End, ns since the epoch.
    pub end_ns: u64,
    /// Attributes, rendered as strings (arrays joined with spaces).
    pub attributes: HashMap<String, String>,
    /// Events: name, time (ns since the epoch), attributes.
    pub events: Vec<(String, u64, HashMap<String, String>)>,
    /// Status code (0 unset, 1 ok, 2 error) and message.
    pub status: (i32, String),
}

#[derive(Debug, Default)]
struct Received {
    spans: Vec<Span>,
    bad_requests: Vec<String>,
}

/// The running receiver; stops when dropped.
#[derive(Debug)]
pub struct Receiver {
    /// Its base URL, `http://127.0.0.1:port`.
    pub url: String,
    received: Arc<Mutex<Received>>,
    task: tokio::task::JoinHandle<()>,
}

fn render(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::ArrayValue(a)) => a
            .values
            .iter()
            .map(|v| render(&Some(v.clone())))
            .collect::<Vec<_>>()
            .join(" "),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kv: &[KeyValue]) -> HashMap<String, String> {
    kv.iter()
        .map(|kv| (kv.key.clone(), render(&kv.value)))
        .collect()
}

async fn traces(
    State(rx): State<Arc<Mutex<Received>>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>) {
    let ct = [(header::CONTENT_TYPE, "application/x-protobuf")];
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type != "application/x-protobuf" {
        rx.lock()
            .unwrap()
            .bad_requests
            .push(format!("content-type {content_type:?}"));
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, ct, vec![]);
    }
    let req = match ExportTraceServiceRequest::decode(body) {
        Ok(r) => r,
        Err(e) => {
            rx.lock().unwrap().bad_requests.push(e.to_string());
            return (StatusCode::BAD_REQUEST, ct, vec![]);
        }
    };
    let mut got = rx.lock().unwrap();
    for rs in req.resource_spans {
        let resource = rs
            .resource
            .as_ref()
            .map(|r| attrs(&r.attributes))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                got.spans.push(Span {
                    resource: resource.clone(),
                    name: s.name,
                    span_id: hex::encode(&s.span_id),
                    parent_span_id: hex::encode(&s.parent_span_id),
                    trace_id: hex::encode(&s.trace_id),
                    start_ns: s.start_time_unix_nano,
                    end_ns: s.end_time_unix_nano,
                    attributes: attrs(&s.attributes),
                    events: s
                        .events
                        .iter()
                        .map(|e| (e.name.clone(), e.time_unix_nano, attrs(&e.attributes)))
                        .collect(),
                    status: s.status.map(|st| (st.code, st.message)).unwrap_or_default(),
                });
            }
        }
    }
    (
        StatusCode::OK,
        ct,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

impl Receiver {
    /// Listens on a free loopback port.
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind OTLP receiver");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let received = Arc::new(Mutex::new(Received::default()));
        let app = Router::new()
            .route("/v1/traces", post(traces))
            .with_state(received.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url,
            received,
            task,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.received.lock().unwrap().spans.clone()
    }

    /// Requests refused (wrong content type, undecodable body).
    pub fn bad_requests(&self) -> Vec<String> {
        self.received.lock().unwrap().bad_requests.clone()
    }

    /// Waits until `done` holds for the spans received, or `timeout`.
    pub async fn wait_for(&self, timeout: Duration, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let start = Instant::now();
        loop {
            let spans = self.spans();
            if done(&spans) || start.elapsed() > timeout {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
