//! A typed client of the node agent's local API: HTTP/1.1 with JSON bodies
//! on the agent's unix socket (`agent.address`), one connection per
//! request. `hb` and the shim use it; the agent serves the same
//! [`crate::types`].
//!
//! hyper does the HTTP (chunked bodies, framing errors) so that a malformed
//! answer is an error here, never a silently truncated value.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Errors of [`Client`] calls. Each names the call, so a message alone
/// tells an operator what failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The agent's socket could not be reached.
    #[error(
        "connect to the {peer} at {} (is {} running? {} in the config)",
        socket.display(), peer.daemon(), peer.setting()
    )]
    Connect {
        /// Who was dialled.
        peer: Peer,
        /// The socket dialled.
        socket: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed (connection reset, malformed answer).
    #[error("{method} {path} on the {peer}")]
    Http {
        /// Who was asked.
        peer: Peer,
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// What hyper saw.
        #[source]
        source: hyper::Error,
    },
    /// The agent did not answer in time.
    #[error("{method} {path} on the {peer}: no answer within {timeout:?}")]
    Timeout {
        /// Who was asked.
        peer: Peer,
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// The time allowed.
        timeout: Duration,
    },
    /// The agent answered with an error status.
    #[error("{method} {path} on the {peer}: {status}: {message}")]
    Status {
        /// Who answered.
        peer: Peer,
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// The status.
        status: StatusCode,
        /// The agent's explanation (its answer's body).
        message: String,
    },
    /// The answer is not the JSON the call expects.
    #[error("{method} {path} on the {peer}: unexpected answer")]
    Decode {
        /// Who answered.
        peer: Peer,
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// What serde saw.
        #[source]
        source: serde_json::Error,
    },
    /// A request body could not be encoded.
    #[error("encode the body of {method} {path}")]
    Encode {
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// What serde saw.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// The agent answered 404: what was asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Status { status, .. } if *status == StatusCode::NOT_FOUND)
    }

    /// The agent could not be reached or did not answer: callers that fail
    /// open (the shim) go on without it.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. } | Error::Timeout { .. } | Error::Http { .. }
        )
    }
}

type Result<T> = std::result::Result<T, Error>;

/// The default time allowed for one call (connect, request, whole answer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of the agent's local API on a unix socket.
#[derive(Debug, Clone)]
pub struct Client {
    peer: Peer,
    socket: PathBuf,
    timeout: Duration,
}

/// Which daemon a [`Client`] talks to, for its error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The node agent (`agent.address`).
    Agent,
    /// The snapshotter's control socket (`snapshotter.control_address`).
    Snapshotter,
}

impl Peer {
    fn daemon(self) -> &'static str {
        match self {
            Peer::Agent => "hyperbox-nri",
            Peer::Snapshotter => "hyperbox-snapshotter",
        }
    }

    fn setting(self) -> &'static str {
        match self {
            Peer::Agent => "agent.address",
            Peer::Snapshotter => "snapshotter.control_address",
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Peer::Agent => "agent",
            Peer::Snapshotter => "snapshotter",
        })
    }
}

impl Client {
    /// A client of the agent listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            peer: Peer::Agent,
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// A client of the snapshotter's control socket.
    pub fn snapshotter(socket: impl Into<PathBuf>) -> Client {
        Client {
            peer: Peer::Snapshotter,
            ..Client::new(socket)
        }
    }

    /// Sets the time allowed for each call.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The socket this client dials.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET path`, decoded as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let body = self.call(Method::GET, path, None).await?;
        decode(self.peer, Method::GET, path, &body)
    }

    /// `POST path` with `body` as JSON, the answer decoded as `T`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send_json(Method::POST, path, body).await
    }

    /// `PUT path` with `body` as JSON, the answer decoded as `T`.
    pub async fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send_json(Method::PUT, path, body).await
    }

    /// `method path` with `body` as JSON, the answer decoded as `T`. An
    /// empty answer (`204 No Content`) decodes as JSON `null`, so `T = ()`
    /// (or an `Option`) reads it.
    async fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let encoded = serde_json::to_vec(body).map_err(|source| Error::Encode {
            method: method.clone(),
            path: path.into(),
            source,
        })?;
        let answer = self.call(method.clone(), path, Some(encoded)).await?;
        let answer: &[u8] = if answer.is_empty() { b"null" } else { &answer };
        decode(self.peer, method, path, answer)
    }

    /// `DELETE path`; the answer's body is ignored.
    pub async fn delete(&self, path: &str) -> Result<()> {
        self.call(Method::DELETE, path, None).await.map(drop)
    }

    /// `GET path` of a stream of JSON lines (`application/x-ndjson`). Only
    /// the answer's head is bound by the timeout; lines arrive as long as
    /// the agent sends them.
    pub async fn lines(&self, path: &str) -> Result<Lines> {
        let method = Method::GET;
        let head = tokio::time::timeout(self.timeout, self.send(method.clone(), path, None));
        let answer = head.await.map_err(|_| Error::Timeout {
            peer: self.peer,
            method: method.clone(),
            path: path.into(),
            timeout: self.timeout,
        })??;
        let status = answer.status();
        let body = answer.into_body();
        if !status.is_success() {
            let bytes = tokio::time::timeout(self.timeout, body.collect())
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            return Err(status_error(self.peer, method, path, status, &bytes));
        }
        Ok(Lines {
            peer: self.peer,
            method,
            path: path.into(),
            body,
            buf: BytesMut::new(),
            done: false,
        })
    }

    async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Bytes> {
        let exchange = async {
            let answer = self.send(method.clone(), path, body).await?;
            let status = answer.status();
            let bytes = answer
                .into_body()
                .collect()
                .await
                .map_err(|source| Error::Http {
                    peer: self.peer,
                    method: method.clone(),
                    path: path.into(),
                    source,
                })?
                .to_bytes();
            if !status.is_success() {
                return Err(status_error(
                    self.peer,
                    method.clone(),
                    path,
                    status,
                    &bytes,
                ));
            }
            Ok(bytes)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| Error::Timeout {
                peer: self.peer,
                method: method.clone(),
                path: path.into(),
                timeout: self.timeout,
            })?
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| Error::Connect {
                peer: self.peer,
                socket: self.socket.clone(),
                source,
            })?;
        let http = |source| Error::Http {
            peer: self.peer,
            method: method.clone(),
            path: path.into(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        // The connection task ends when the answer has been read or the
        // request is dropped.
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, "hyperbox-agent");
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("a request of a method, a path and two headers is valid");
        sender.send_request(req).await.map_err(http)
    }
}

fn decode<T: DeserializeOwned>(peer: Peer, method: Method, path: &str, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|source| Error::Decode {
        peer,
        method,
        path: path.into(),
        source,
    })
}

fn status_error(peer: Peer, method: Method, path: &str, status: StatusCode, body: &[u8]) -> Error {
    Error::Status {
        peer,
        method,
        path: path.into(),
        status,
        message: String::from_utf8_lossy(body).trim().to_string(),
    }
}

/// A stream of JSON lines from the agent ([`Client::lines`]).
#[derive(Debug)]
pub struct Lines {
    peer: Peer,
    method: Method,
    path: String,
    body: Incoming,
    buf: BytesMut,
    done: bool,
}

impl Lines {
    /// The next line decoded as `T`; `None` when the agent ends the stream.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(i + 1);
                let line = &line[..i];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return decode(self.peer, self.method.clone(), &self.path, line).map(Some);
            }
            if self.done {
                if self.buf.iter().all(u8::is_ascii_whitespace) {
                    return Ok(None);
                }
                let rest = self.buf.split();
                return decode(self.peer, self.method.clone(), &self.path, &rest).map(Some);
            }
            match self.body.frame().await {
                None => self.done = true,
                Some(Err(source)) => {
                    return Err(Error::Http {
                        peer: self.peer,
                        method: self.method.clone(),
                        path: self.path.clone(),
                        source,
                    });
                }
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            self.buf.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves one connection with `answer` (raw HTTP) and returns the socket.
    async fn serve_once(answer: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = vec![0u8; 4096];
            let _ = s.read(&mut req).await;
            s.write_all(answer).await.unwrap();
            s.shutdown().await.unwrap();
        });
        (dir, path)
    }

    #[tokio::test]
    async fn chunked_answers_are_decoded_whole() {
        let (_d, sock) = serve_once(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n4\r\n 12}\r\n0\r\n\r\n",
        )
        .await;
        let v: serde_json::Value = Client::new(&sock).get("/x").await.unwrap();
        assert_eq!(v["a"], 12);
    }

    #[tokio::test]
    async fn a_malformed_chunked_body_is_an_error_not_a_truncated_value() {
        // The chunk claims 0x50 bytes and the connection ends after 5.
        let (_d, sock) =
            serve_once(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n50\r\n{\"a\":").await;
        let err = Client::new(&sock)
            .get::<serde_json::Value>("/x")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Http { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn error_statuses_carry_the_agents_message() {
        let (_d, sock) = serve_once(
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 22\r\n\r\nno container matches x",
        )
        .await;
        let err = Client::new(&sock)
            .get::<serde_json::Value>("/v1/containers/x")
            .await
            .unwrap_err();
        assert!(err.is_not_found());
        assert!(err.to_string().ends_with("no container matches x"), "{err}");
    }

    #[tokio::test]
    async fn a_put_answered_with_no_content_reads_as_unit() {
        let (_d, sock) = serve_once(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        let body = serde_json::json!({"workload": "w", "mode": null});
        Client::new(&sock)
            .put::<_, ()>("/v1/profiles", &body)
            .await
            .unwrap();
        let (_d, sock) =
            serve_once(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 11\r\n\r\nno workload").await;
        let err = Client::new(&sock)
            .put::<_, ()>("/v1/profiles", &body)
            .await
            .unwrap_err();
        assert!(err.to_string().starts_with("PUT /v1/profiles"), "{err}");
        assert!(err.to_string().ends_with("no workload"), "{err}");
    }

    #[tokio::test]
    async fn a_missing_agent_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let err = Client::new(dir.path().join("none.sock"))
            .get::<serde_json::Value>("/healthz")
            .await
            .unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        assert!(err.to_string().contains("is hyperbox-nri running?"));
    }

    #[tokio::test]
    async fn lines_are_decoded_one_by_one() {
        let (_d, sock) = serve_once(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7\r\n{\"n\":1}\r\n9\r\n\n{\"n\":2}\n\r\n0\r\n\r\n",
        )
        .await;
        let mut lines = Client::new(&sock).lines("/events").await.unwrap();
        let a: serde_json::Value = lines.next().await.unwrap().unwrap();
        let b: serde_json::Value = lines.next().await.unwrap().unwrap();
        assert_eq!((a["n"].as_i64(), b["n"].as_i64()), (Some(1), Some(2)));
        assert!(lines.next::<serde_json::Value>().await.unwrap().is_none());
    }
}
