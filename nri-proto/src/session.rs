//! One NRI connection: the multiplexed trunk, a ttrpc server on connection 1
//! (the runtime calls the plugin) and a ttrpc client on connection 2 (the
//! plugin calls the runtime).
//!
//! A reader task owns the read half: it reassembles each connection's byte
//! stream, answers requests by spawning the handler (so a slow handler never
//! stalls the trunk, and replies may go out of order as ttrpc allows), and
//! completes pending client calls. A writer task owns the write half and
//! sends one frame per ttrpc message.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::mux;
use crate::ttrpc::{self, Decoded, Decoder, Status};

/// Errors of a session.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The trunk failed or carried garbage.
    #[error(transparent)]
    Mux(#[from] mux::Error),
    /// A ttrpc message on the trunk was not a valid Request/Response.
    #[error("malformed ttrpc {what} on NRI connection {conn}: {source}")]
    Decode {
        /// Request or response.
        what: &'static str,
        /// Connection id.
        conn: u32,
        /// The protobuf error.
        #[source]
        source: prost::DecodeError,
    },
    /// Writing to the trunk failed.
    #[error("NRI socket write")]
    Write(#[source] std::io::Error),
    /// The session ended before the call was answered.
    #[error("NRI connection closed")]
    Closed,
    /// The runtime did not answer in time.
    #[error("NRI runtime did not answer {method} within {0:?}", .timeout)]
    Timeout {
        /// The method.
        method: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The runtime answered with an error status.
    #[error("NRI runtime refused {method}: {} (code {})", .status.message, .status.code)]
    Refused {
        /// The method.
        method: String,
        /// Its status.
        status: Status,
    },
}

/// Serves the plugin's methods.
pub trait Handler: Send + Sync + 'static {
    /// Answers `service`/`method` with an encoded reply, or an error status.
    fn call(
        &self,
        service: String,
        method: String,
        payload: bytes::Bytes,
    ) -> impl Future<Output = Result<Vec<u8>, Status>> + Send;
}

type Pending = Arc<Mutex<HashMap<u32, oneshot::Sender<ttrpc::Response>>>>;

/// The calling side of a session (cheap to clone).
#[derive(Debug, Clone)]
pub struct Client {
    out: mpsc::Sender<Vec<u8>>,
    pending: Pending,
    next_stream: Arc<AtomicU32>,
}

impl Client {
    /// Calls `method` of the runtime's service.
    pub async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, Error> {
        // Client streams are odd: 1, 3, 5, ...
        let stream = self.next_stream.fetch_add(2, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending").insert(stream, tx);
        let msg = ttrpc::Request {
            service: crate::api::RUNTIME_SERVICE.into(),
            method: method.into(),
            payload: req.encode_to_vec(),
            timeout_nano: timeout.as_nanos() as i64,
        };
        let frame = mux::encode_frame(
            mux::RUNTIME_CONN,
            &ttrpc::encode(stream, ttrpc::TYPE_REQUEST, &msg),
        );
        if self.out.send(frame).await.is_err() {
            self.pending.lock().expect("pending").remove(&stream);
            return Err(Error::Closed);
        }
        let resp = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return Err(Error::Closed),
            Err(_) => {
                self.pending.lock().expect("pending").remove(&stream);
                return Err(Error::Timeout {
                    method: method.into(),
                    timeout,
                });
            }
        };
        if let Some(status) = resp.status.filter(|s| s.code != 0) {
            return Err(Error::Refused {
                method: method.into(),
                status,
            });
        }
        Resp::decode(resp.payload.as_slice()).map_err(|source| Error::Decode {
            what: "reply payload",
            conn: mux::RUNTIME_CONN,
            source,
        })
    }
}

/// A running session.
#[derive(Debug)]
pub struct Session {
    /// Calls into the runtime.
    pub client: Client,
    done: tokio::task::JoinHandle<Result<(), Error>>,
}

impl Session {
    /// Starts serving `handler` over `conn`.
    pub fn start<S, H>(conn: S, handler: Arc<H>) -> Session
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
        H: Handler,
    {
        let (rd, mut wr) = tokio::io::split(conn);
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(64);
        let pending: Pending = Arc::default();
        let client = Client {
            out: out_tx.clone(),
            pending: pending.clone(),
            next_stream: Arc::new(AtomicU32::new(1)),
        };
        let writer = tokio::spawn(async move {
            while let Some(frame) = out_rx.recv().await {
                wr.write_all(&frame).await?;
            }
            wr.shutdown().await
        });
        let done = tokio::spawn(async move {
            let result = read_loop(rd, handler, out_tx, pending.clone()).await;
            // Fail the calls still waiting; the writer ends with the senders.
            pending.lock().expect("pending").clear();
            writer.abort();
            result
        });
        Session { client, done }
    }

    /// Waits until the runtime closes the connection or breaks the protocol.
    pub async fn wait(self) -> Result<(), Error> {
        match self.done.await {
            Ok(r) => r,
            Err(_) => Err(Error::Closed),
        }
    }
}

async fn read_loop<R, H>(
    mut rd: R,
    handler: Arc<H>,
    out: mpsc::Sender<Vec<u8>>,
    pending: Pending,
) -> Result<(), Error>
where
    R: AsyncRead + Unpin,
    H: Handler,
{
    let mut plugin = Decoder::default();
    let mut runtime = Decoder::default();
    while let Some(frame) = mux::read_frame(&mut rd).await? {
        match frame.conn {
            mux::PLUGIN_CONN => {
                plugin.push(&frame.payload);
                while let Some(d) = plugin.next_message() {
                    serve(d, &handler, &out).await?;
                }
            }
            mux::RUNTIME_CONN => {
                runtime.push(&frame.payload);
                while let Some(d) = runtime.next_message() {
                    complete(d, &pending)?;
                }
            }
            other => {
                tracing::warn!(
                    conn = other,
                    len = frame.payload.len(),
                    "dropped NRI frame on a connection nobody serves"
                );
            }
        }
    }
    Ok(())
}

/// Answers one message on the plugin connection.
async fn serve<H: Handler>(
    d: Decoded,
    handler: &Arc<H>,
    out: &mpsc::Sender<Vec<u8>>,
) -> Result<(), Error> {
    let reply = |stream: u32, resp: ttrpc::Response| {
        mux::encode_frame(
            mux::PLUGIN_CONN,
            &ttrpc::encode(stream, ttrpc::TYPE_RESPONSE, &resp),
        )
    };
    let failure = |status| ttrpc::Response {
        status: Some(status),
        payload: Vec::new(),
    };
    let frame = match d {
        Decoded::TooLarge(h) => {
            tracing::warn!(
                stream = h.stream,
                len = h.length,
                "refused an oversized NRI request"
            );
            let status = Status::new(
                ttrpc::code::RESOURCE_EXHAUSTED,
                format!(
                    "message of {} bytes exceeds the {} limit",
                    h.length,
                    ttrpc::MAX_MESSAGE
                ),
            );
            let _ = out.send(reply(h.stream, failure(status))).await;
            return Ok(());
        }
        Decoded::Frame(f) => f,
    };
    if frame.header.kind != ttrpc::TYPE_REQUEST {
        tracing::warn!(
            kind = frame.header.kind,
            "ignored a non-request message on the plugin connection"
        );
        return Ok(());
    }
    let stream = frame.header.stream;
    let req = match ttrpc::Request::decode(frame.body) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(stream, error = %e, "malformed ttrpc request");
            let status = Status::new(
                ttrpc::code::INVALID_ARGUMENT,
                format!("malformed request: {e}"),
            );
            let _ = out.send(reply(stream, failure(status))).await;
            return Ok(());
        }
    };
    let handler = handler.clone();
    let out = out.clone();
    tokio::spawn(async move {
        let resp = match handler
            .call(req.service, req.method, bytes::Bytes::from(req.payload))
            .await
        {
            Ok(payload) => ttrpc::Response {
                status: None,
                payload,
            },
            Err(status) => failure(status),
        };
        let _ = out.send(reply(stream, resp)).await;
    });
    Ok(())
}

/// Delivers one message on the runtime connection to its waiting call.
fn complete(d: Decoded, pending: &Pending) -> Result<(), Error> {
    let frame = match d {
        Decoded::TooLarge(h) => {
            tracing::warn!(
                stream = h.stream,
                len = h.length,
                "dropped an oversized NRI reply"
            );
            pending.lock().expect("pending").remove(&h.stream);
            return Ok(());
        }
        Decoded::Frame(f) => f,
    };
    if frame.header.kind != ttrpc::TYPE_RESPONSE {
        return Ok(());
    }
    let resp = ttrpc::Response::decode(frame.body).map_err(|source| Error::Decode {
        what: "response",
        conn: mux::RUNTIME_CONN,
        source,
    })?;
    if let Some(tx) = pending
        .lock()
        .expect("pending")
        .remove(&frame.header.stream)
    {
        let _ = tx.send(resp);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mux::{encode_frame, read_frame};
    use tokio::io::AsyncWriteExt;

    struct Echo;
    impl Handler for Echo {
        async fn call(
            &self,
            _service: String,
            method: String,
            payload: bytes::Bytes,
        ) -> Result<Vec<u8>, Status> {
            if method == "Echo" {
                Ok(payload.to_vec())
            } else {
                Err(Status::new(ttrpc::code::UNIMPLEMENTED, method))
            }
        }
    }

    fn request(stream: u32, method: &str, payload: &[u8]) -> Vec<u8> {
        encode_frame(
            mux::PLUGIN_CONN,
            &ttrpc::encode(
                stream,
                ttrpc::TYPE_REQUEST,
                &ttrpc::Request {
                    service: "svc".into(),
                    method: method.into(),
                    payload: payload.to_vec(),
                    timeout_nano: 0,
                },
            ),
        )
    }

    async fn response(peer: &mut tokio::net::UnixStream) -> (u32, ttrpc::Response) {
        let f = read_frame(peer).await.unwrap().unwrap();
        let mut d = Decoder::default();
        d.push(&f.payload);
        let Some(Decoded::Frame(m)) = d.next_message() else {
            panic!("no message")
        };
        (m.header.stream, ttrpc::Response::decode(m.body).unwrap())
    }

    #[tokio::test]
    async fn requests_are_answered_and_garbage_gets_an_error_reply() {
        let (ours, mut peer) = tokio::net::UnixStream::pair().unwrap();
        let session = Session::start(ours, Arc::new(Echo));
        peer.write_all(&request(1, "Echo", b"abc")).await.unwrap();
        let (stream, r) = response(&mut peer).await;
        assert_eq!((stream, r.payload.as_slice()), (1, &b"abc"[..]));
        assert!(r.status.is_none());

        peer.write_all(&request(3, "Nope", b"")).await.unwrap();
        let (stream, r) = response(&mut peer).await;
        assert_eq!(stream, 3);
        assert_eq!(r.status.unwrap().code, ttrpc::code::UNIMPLEMENTED);

        // A request body that is not a protobuf Request.
        let mut junk = Vec::new();
        junk.extend_from_slice(&4u32.to_be_bytes());
        junk.extend_from_slice(&5u32.to_be_bytes());
        junk.extend_from_slice(&[ttrpc::TYPE_REQUEST, 0, 0xff, 0xff, 0xff, 0xff]);
        peer.write_all(&encode_frame(mux::PLUGIN_CONN, &junk))
            .await
            .unwrap();
        let (stream, r) = response(&mut peer).await;
        assert_eq!(stream, 5);
        assert_eq!(r.status.unwrap().code, ttrpc::code::INVALID_ARGUMENT);

        // Still serving afterwards.
        peer.write_all(&request(7, "Echo", b"ok")).await.unwrap();
        assert_eq!(response(&mut peer).await.1.payload, b"ok");

        drop(peer);
        assert!(session.wait().await.is_ok());
    }

    #[tokio::test]
    async fn an_oversized_frame_ends_the_session_with_an_error() {
        let (ours, mut peer) = tokio::net::UnixStream::pair().unwrap();
        let session = Session::start(ours, Arc::new(Echo));
        peer.write_all(&[0, 0, 0, 1, 0x7f, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        let err = session.wait().await.unwrap_err();
        assert!(
            matches!(err, Error::Mux(mux::Error::TooLarge { .. })),
            "{err}"
        );
    }

    #[tokio::test]
    async fn client_calls_complete_with_the_runtime_reply_or_time_out() {
        let (ours, mut peer) = tokio::net::UnixStream::pair().unwrap();
        let session = Session::start(ours, Arc::new(Echo));
        let client = session.client.clone();
        let call = tokio::spawn(async move {
            client
                .call::<_, ttrpc::Status>(
                    "RegisterPlugin",
                    &ttrpc::Status::new(0, "x"),
                    Duration::from_secs(5),
                )
                .await
        });
        let f = read_frame(&mut peer).await.unwrap().unwrap();
        assert_eq!(f.conn, mux::RUNTIME_CONN);
        let mut d = Decoder::default();
        d.push(&f.payload);
        let Some(Decoded::Frame(m)) = d.next_message() else {
            panic!()
        };
        assert_eq!(m.header.stream % 2, 1, "client streams are odd");
        let req = ttrpc::Request::decode(m.body).unwrap();
        assert_eq!(req.method, "RegisterPlugin");
        let resp = ttrpc::Response {
            status: None,
            payload: ttrpc::Status::new(0, "reply").encode_to_vec(),
        };
        peer.write_all(&encode_frame(
            mux::RUNTIME_CONN,
            &ttrpc::encode(m.header.stream, ttrpc::TYPE_RESPONSE, &resp),
        ))
        .await
        .unwrap();
        assert_eq!(call.await.unwrap().unwrap().message, "reply");

        let e = session
            .client
            .call::<_, ttrpc::Status>("Slow", &ttrpc::Status::default(), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
    }
}
