//! A shaping, fault-injecting HTTP proxy in front of the registry.
//!
//! It adds latency per request, caps bandwidth (one shared link, as a node's
//! uplink is), injects faults (an HTTP error status, a connection reset or a
//! clean close partway through a body, corrupted bytes) and counts the body
//! bytes it serves — the measure of what lazy loading saves.
//!
//! Written on raw TCP rather than on an HTTP server library because the faults
//! need byte-level control of the response that such libraries hide on
//! purpose: an RST versus a clean FIN after exactly N body bytes. Requests
//! are forwarded upstream with reqwest.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Largest request head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Bytes written per shaped write.
const CHUNK: usize = 16 * 1024;

/// Latency and bandwidth of the simulated link.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shaping {
    /// Added before each request is forwarded (one round trip).
    pub latency: Duration,
    /// Cap on body bytes per second over all connections, in bits per second.
    pub bits_per_sec: Option<u64>,
}

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status instead of forwarding the response.
    Status(u16),
    /// Send this many body bytes, then reset the connection (RST).
    ResetAfter(u64),
    /// Send this many body bytes, then close cleanly (FIN) short of the
    /// announced Content-Length.
    TruncateAfter(u64),
    /// Flip every bit of the body byte at this offset.
    CorruptAt(u64),
    /// Answer 401 with a Basic challenge (a registry that wants its own
    /// credentials), whatever the request carries.
    Challenge,
    /// Answer with this status and a chunked body that never ends (until
    /// the client hangs up).
    Endless(u16),
    /// Forward the upstream body chunked (no Content-Length), with this
    /// many more bytes after it: a blob longer than its descriptor says.
    Longer(u64),
}

/// A fault for requests whose path contains `path_contains`.
#[derive(Debug, Clone)]
pub struct FaultRule {
    /// Substring of the request path, e.g. `/blobs/` or a digest.
    pub path_contains: String,
    /// Only for this method (`GET`, `HEAD`), or any.
    pub method: Option<String>,
    /// The fault.
    pub fault: Fault,
    /// How many requests it hits; `None` for all.
    pub times: Option<u32>,
}

impl FaultRule {
    /// A fault on every GET of a blob.
    pub fn blobs(fault: Fault) -> Self {
        FaultRule {
            path_contains: "/blobs/".into(),
            method: Some("GET".into()),
            fault,
            times: None,
        }
    }
}

#[derive(Debug)]
struct State {
    upstream: String,
    http: reqwest::Client,
    shaping: Mutex<Shaping>,
    rules: Mutex<Vec<FaultRule>>,
    link_free_at: Mutex<Instant>,
    bytes_served: AtomicU64,
    faults_fired: AtomicU64,
    log: Mutex<Vec<String>>,
    headers: Mutex<Vec<SeenHeaders>>,
}

/// `METHOD path` of a request and its headers (lower-case names).
pub type SeenHeaders = (String, Vec<(String, String)>);

/// The running proxy; stops on drop.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(std::io::Error::other)?;
        let state = Arc::new(State {
            upstream: format!("http://{upstream}"),
            http,
            shaping: Mutex::new(Shaping::default()),
            rules: Mutex::new(Vec::new()),
            link_free_at: Mutex::new(Instant::now()),
            bytes_served: AtomicU64::new(0),
            faults_fired: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            headers: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(conn, &st).await {
                        tracing::debug!(error = %e, "proxy connection ended");
                    }
                });
            }
        });
        Ok(FaultProxy { addr, state, task })
    }

    /// `127.0.0.1:<port>`: use as the registry host of image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Sets latency and bandwidth for new requests.
    pub fn set_shaping(&self, s: Shaping) {
        *self.state.shaping.lock().unwrap() = s;
    }

    /// Adds a fault rule; rules are tried in the order added.
    pub fn inject(&self, rule: FaultRule) {
        self.state.rules.lock().unwrap().push(rule);
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        self.state.rules.lock().unwrap().clear();
    }

    /// Body bytes sent to clients so far.
    pub fn bytes_served(&self) -> u64 {
        self.state.bytes_served.load(Ordering::Relaxed)
    }

    /// How many requests a fault rule hit.
    pub fn faults_fired(&self) -> u64 {
        self.state.faults_fired.load(Ordering::Relaxed)
    }

    /// `METHOD path` and the headers (lower-case names) of every request so
    /// far: what a client disclosed to this host.
    pub fn request_headers(&self) -> Vec<SeenHeaders> {
        self.state.headers.lock().unwrap().clone()
    }

    /// `METHOD path [range=…] -> status` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.state.log.lock().unwrap().clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// Reads one request; `None` at a clean end of the connection.
async fn read_request(conn: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<Request>> {
    loop {
        // A TLS handshake (or other non-HTTP bytes): answer as Go's HTTP
        // servers (the registry among them) do, so a client trying HTTPS
        // first learns at once that this is plain HTTP.
        if buf.first().is_some_and(|b| !b.is_ascii_uppercase()) {
            conn.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
                .await?;
            return Ok(None);
        }
        if let Some(end) = find_head_end(buf) {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            req.parse(&buf[..end])
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            let method = req.method.unwrap_or("GET").to_string();
            let path = req.path.unwrap_or("/").to_string();
            let headers: Vec<(String, Vec<u8>)> = req
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                .collect();
            let len = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| std::str::from_utf8(v).ok()?.trim().parse::<usize>().ok())
                .unwrap_or(0);
            buf.drain(..end);
            while buf.len() < len {
                let mut tmp = vec![0u8; (len - buf.len()).min(1 << 20)];
                let n = conn.read(&mut tmp).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            let body = buf.drain(..len).collect();
            return Ok(Some(Request {
                method,
                path,
                headers,
                body,
            }));
        }
        if buf.len() > MAX_HEAD {
            conn.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await?;
            return Ok(None);
        }
        let mut tmp = [0u8; 8192];
        let n = conn.read(&mut tmp).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn take_fault(state: &State, req: &Request) -> Option<Fault> {
    let mut rules = state.rules.lock().unwrap();
    let i = rules.iter().position(|r| {
        req.path.contains(&r.path_contains)
            && r.method.as_deref().is_none_or(|m| m == req.method)
            && r.times != Some(0)
    })?;
    if let Some(t) = rules[i].times.as_mut() {
        *t -= 1;
    }
    state.faults_fired.fetch_add(1, Ordering::Relaxed);
    Some(rules[i].fault)
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "host",
    "proxy-connection",
    "te",
    "upgrade",
];

async fn serve(mut conn: TcpStream, state: &State) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut conn, &mut buf).await? {
        let shaping = *state.shaping.lock().unwrap();
        if !shaping.latency.is_zero() {
            tokio::time::sleep(shaping.latency).await;
        }
        state.headers.lock().unwrap().push((
            format!("{} {}", req.method, req.path),
            req.headers
                .iter()
                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                .collect(),
        ));
        let fault = take_fault(state, &req);
        if let Some(Fault::Challenge) = fault {
            log(state, &req, 401, "injected challenge");
            let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"injected challenge"}]}"#;
            let head = format!(
                "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n\
                 www-authenticate: Basic realm=\"fault-proxy\"\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            conn.write_all(head.as_bytes()).await?;
            conn.write_all(body.as_bytes()).await?;
            continue;
        }
        if let Some(Fault::Endless(code)) = fault {
            log(state, &req, code, "injected endless body");
            let head = format!(
                "HTTP/1.1 {code} {}\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\n\
                 transfer-encoding: chunked\r\n\r\n",
                reason(code)
            );
            conn.write_all(head.as_bytes()).await?;
            let chunk = vec![b' '; CHUNK];
            let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
            frame.extend_from_slice(&chunk);
            frame.extend_from_slice(b"\r\n");
            // Until the client hangs up: the write fails then.
            loop {
                conn.write_all(&frame).await?;
                state
                    .bytes_served
                    .fetch_add(CHUNK as u64, Ordering::Relaxed);
            }
        }
        if let Some(Fault::Status(code)) = fault {
            log(state, &req, code, "injected");
            let body = format!(
                "{{\"errors\":[{{\"code\":\"UNAVAILABLE\",\"message\":\"injected fault {code}\"}}]}}"
            );
            let head = format!(
                "HTTP/1.1 {code} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                reason(code),
                body.len()
            );
            conn.write_all(head.as_bytes()).await?;
            conn.write_all(body.as_bytes()).await?;
            continue;
        }
        let method = reqwest::Method::from_bytes(req.method.as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let mut up = state
            .http
            .request(method, format!("{}{}", state.upstream, req.path));
        for (k, v) in &req.headers {
            if !HOP_BY_HOP.contains(&k.as_str()) {
                up = up.header(k.as_str(), v.as_slice());
            }
        }
        let resp = match up.body(req.body.clone()).send().await {
            Ok(r) => r,
            Err(e) => {
                log(state, &req, 502, "upstream error");
                let msg = format!("upstream: {e}");
                let head = format!(
                    "HTTP/1.1 502 Bad Gateway\r\ncontent-length: {}\r\n\r\n",
                    msg.len()
                );
                conn.write_all(head.as_bytes()).await?;
                conn.write_all(msg.as_bytes()).await?;
                continue;
            }
        };
        let status = resp.status().as_u16();
        log(state, &req, status, "");
        let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
        for (k, v) in resp.headers() {
            if !HOP_BY_HOP.contains(&k.as_str()) {
                head.push_str(&format!(
                    "{}: {}\r\n",
                    k,
                    String::from_utf8_lossy(v.as_bytes())
                ));
            }
        }
        let announced = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if req.method == "HEAD" {
            head.push_str(&format!(
                "content-length: {}\r\n\r\n",
                announced.unwrap_or(0)
            ));
            conn.write_all(head.as_bytes()).await?;
            continue;
        }
        // Without a length from upstream, buffer the body to announce one.
        let (len, mut body): (
            u64,
            futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
        ) = match announced {
            Some(n) => (n, resp.bytes_stream().boxed()),
            None => {
                let all = resp.bytes().await.map_err(std::io::Error::other)?;
                (
                    all.len() as u64,
                    futures::stream::once(async move { Ok(all) }).boxed(),
                )
            }
        };
        if let Some(Fault::Longer(extra)) = fault {
            head.push_str("transfer-encoding: chunked\r\n\r\n");
            conn.write_all(head.as_bytes()).await?;
            let frame = |piece: &[u8]| {
                let mut f = format!("{:x}\r\n", piece.len()).into_bytes();
                f.extend_from_slice(piece);
                f.extend_from_slice(b"\r\n");
                f
            };
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(std::io::Error::other)?;
                conn.write_all(&frame(&chunk)).await?;
                state
                    .bytes_served
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            let junk = vec![b'x'; CHUNK];
            let mut left = extra;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                // Fails once the client hangs up.
                conn.write_all(&frame(&junk[..n])).await?;
                state.bytes_served.fetch_add(n as u64, Ordering::Relaxed);
                left -= n as u64;
            }
            conn.write_all(b"0\r\n\r\n").await?;
            continue;
        }
        head.push_str(&format!("content-length: {len}\r\n\r\n"));
        conn.write_all(head.as_bytes()).await?;
        let mut offset = 0u64;
        while let Some(chunk) = body.next().await {
            let mut chunk = chunk.map_err(std::io::Error::other)?.to_vec();
            if let Some(Fault::CorruptAt(at)) = fault
                && at >= offset
                && at < offset + chunk.len() as u64
            {
                chunk[(at - offset) as usize] ^= 0xff;
            }
            let stop_at = match fault {
                Some(Fault::ResetAfter(n)) | Some(Fault::TruncateAfter(n)) => Some(n),
                _ => None,
            };
            let mut piece_start = 0usize;
            while piece_start < chunk.len() {
                let mut piece_end = (piece_start + CHUNK).min(chunk.len());
                if let Some(n) = stop_at {
                    let room = n.saturating_sub(offset) as usize;
                    piece_end = piece_end.min(piece_start + room);
                    if piece_end == piece_start {
                        return end_early(conn, fault.unwrap()).await;
                    }
                }
                let piece = &chunk[piece_start..piece_end];
                pace(state, shaping, piece.len()).await;
                conn.write_all(piece).await?;
                state
                    .bytes_served
                    .fetch_add(piece.len() as u64, Ordering::Relaxed);
                offset += piece.len() as u64;
                piece_start = piece_end;
            }
        }
        if let Some(f @ (Fault::ResetAfter(_) | Fault::TruncateAfter(_))) = fault {
            // The body was shorter than the cut-off: still end the connection
            // the way the fault says, so the client sees it.
            return end_early(conn, f).await;
        }
    }
    Ok(())
}

async fn end_early(mut conn: TcpStream, fault: Fault) -> std::io::Result<()> {
    conn.flush().await?;
    if let Fault::ResetAfter(_) = fault {
        // SO_LINGER 0 turns close into an RST.
        let sock = socket2::SockRef::from(&conn);
        sock.set_linger(Some(Duration::ZERO))?;
        drop(conn);
    } else {
        conn.shutdown().await?;
    }
    Ok(())
}

/// Waits for the shared link to carry `n` more bytes.
async fn pace(state: &State, shaping: Shaping, n: usize) {
    let Some(bps) = shaping.bits_per_sec.filter(|b| *b > 0) else {
        return;
    };
    let cost = Duration::from_secs_f64(n as f64 * 8.0 / bps as f64);
    let wake = {
        let mut free = state.link_free_at.lock().unwrap();
        let start = (*free).max(Instant::now());
        *free = start + cost;
        *free
    };
    tokio::time::sleep_until(wake).await;
}

fn log(state: &State, req: &Request, status: u16, note: &str) {
    let range = req
        .headers
        .iter()
        .find(|(k, _)| k == "range")
        .map(|(_, v)| format!(" range={}", String::from_utf8_lossy(v)))
        .unwrap_or_default();
    let line = format!("{} {}{range} -> {status} {note}", req.method, req.path);
    state.log.lock().unwrap().push(line.trim_end().to_string());
}

fn reason(code: u16) -> &'static str {
    reqwest::StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown")
}
