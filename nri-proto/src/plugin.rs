//! The NRI plugin's life: connect (dial the runtime's socket, or take the
//! socket containerd handed us on a file descriptor), register, answer the
//! runtime's calls through [`Events`], and reconnect with backoff when the
//! runtime goes away.
//!
//! Both generations of the API are served: containerd 1.7 (NRI v0.6.1)
//! delivers start, remove and pod events through `StateChange`; containerd
//! 2.x (NRI v0.12.3 in 2.4) calls `StartContainer`, `RemoveContainer`, ...
//! directly, and would fall back to `StateChange` (with a deprecation
//! warning per event) only if we answered those `UNIMPLEMENTED`. Either way
//! [`Events::container_event`] sees the same thing. An `UNIMPLEMENTED`
//! answer never costs the connection; a missed deadline does (v0.12.3
//! closes the plugin), which is why every answer comes from memory.

use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;

use crate::api::{self, Event};
use crate::session::{self, Client, Handler, Session};
use crate::ttrpc::{Status, code};

/// How long registration may take before we give up on this connection.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Unsolicited updates: the runtime applies them with runc, which can take
/// a while on a busy node.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What the plugin does with the runtime's calls. Every method runs on the
/// runtime's clock (2 s per request in containerd), so implementations
/// answer from memory and defer slow work.
pub trait Events: Send + Sync + 'static {
    /// The runtime configures us; `config` is the plugin's config text
    /// (pre-registered plugins: their conf.d file). Returns the event mask.
    fn configure(&self, req: &api::ConfigureRequest) -> Result<i32, String>;
    /// The runtime's current pods and containers (after every (re)connect).
    fn synchronize(&self, req: &api::SynchronizeRequest) -> Vec<api::ContainerUpdate>;
    /// A container is being created; the reply adjusts it.
    fn create_container(
        &self,
        pod: &api::PodSandbox,
        container: &api::Container,
    ) -> api::CreateContainerResponse;
    /// Someone (the kubelet) updates a container's resources.
    fn update_container(
        &self,
        pod: &api::PodSandbox,
        container: &api::Container,
        resources: Option<&api::LinuxResources>,
    ) -> api::UpdateContainerResponse;
    /// Start, stop, remove and the post-events of a container.
    fn container_event(&self, event: Event, pod: &api::PodSandbox, container: &api::Container);
    /// How long answering `method` took, and whether it succeeded.
    fn observe(&self, method: &str, elapsed: Duration, ok: bool);
    /// The connection to the runtime is up (`Some`, after registering) or
    /// gone (`None`).
    fn connected(&self, runtime: Option<String>);
}

/// Where the runtime is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// Dial this socket (external plugin); reconnect when it goes away.
    Dial(PathBuf),
    /// containerd launched us with the connection on this fd
    /// (`NRI_PLUGIN_SOCKET`); when it closes, containerd is gone and will
    /// launch a fresh instance.
    Preconnected(i32),
}

impl Endpoint {
    /// The endpoint containerd's environment describes, if it launched us.
    pub fn from_env() -> Option<Endpoint> {
        let fd = std::env::var("NRI_PLUGIN_SOCKET").ok()?;
        fd.trim().parse().ok().map(Endpoint::Preconnected)
    }
}

/// The plugin's identity.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Name.
    pub name: String,
    /// Two-digit index.
    pub index: String,
}

impl Identity {
    /// containerd passes the name and index of a plugin it launches in
    /// `NRI_PLUGIN_NAME` and `NRI_PLUGIN_IDX` (from the file name `NN-name`);
    /// those win over the config.
    pub fn from_env_or(name: &str, index: &str) -> Identity {
        Identity {
            name: std::env::var("NRI_PLUGIN_NAME").unwrap_or_else(|_| name.into()),
            index: std::env::var("NRI_PLUGIN_IDX").unwrap_or_else(|_| index.into()),
        }
    }
}

/// The current connection's client, for unsolicited updates.
#[derive(Debug, Default)]
pub struct Link {
    client: Mutex<Option<Client>>,
}

/// Errors of an unsolicited update.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// No runtime is connected.
    #[error("no NRI connection")]
    NotConnected,
    /// The call failed.
    #[error(transparent)]
    Call(#[from] session::Error),
}

impl Link {
    /// Whether a runtime is connected.
    pub fn is_connected(&self) -> bool {
        self.client.lock().expect("link").is_some()
    }

    /// Asks the runtime to apply `updates`; returns the ones it could not.
    pub async fn update_containers(
        &self,
        updates: Vec<api::ContainerUpdate>,
    ) -> Result<Vec<api::ContainerUpdate>, UpdateError> {
        let client = self
            .client
            .lock()
            .expect("link")
            .clone()
            .ok_or(UpdateError::NotConnected)?;
        let resp: api::UpdateContainersResponse = client
            .call(
                "UpdateContainers",
                &api::UpdateContainersRequest {
                    update: updates,
                    evict: Vec::new(),
                },
                UPDATE_TIMEOUT,
            )
            .await?;
        Ok(resp.failed)
    }
}

/// Errors that end [`run`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The preconnected descriptor is unusable.
    #[error("NRI socket on fd {fd} (NRI_PLUGIN_SOCKET)")]
    Fd {
        /// The descriptor.
        fd: i32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The session of a preconnected plugin failed.
    #[error(transparent)]
    Session(#[from] session::Error),
}

/// Serves `events` over `endpoint` until the runtime closes a preconnected
/// socket; for a dialled socket, forever (reconnecting with backoff).
pub async fn run<E: Events>(
    endpoint: Endpoint,
    id: Identity,
    events: Arc<E>,
    link: Arc<Link>,
) -> Result<(), Error> {
    let handler = Arc::new(Dispatch {
        events: events.clone(),
        sync_updates: Mutex::default(),
    });
    match endpoint {
        Endpoint::Preconnected(fd) => {
            // SAFETY: containerd handed this descriptor to us and nothing
            // else in the process owns it; the stream takes ownership once.
            let std = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
            std.set_nonblocking(true)
                .map_err(|source| Error::Fd { fd, source })?;
            let stream =
                tokio::net::UnixStream::from_std(std).map_err(|source| Error::Fd { fd, source })?;
            let result = serve(stream, &id, &handler, &events, &link).await;
            events.connected(None);
            result.map_err(Error::Session)
        }
        Endpoint::Dial(path) => {
            let mut backoff = BACKOFF_MIN;
            let mut logged_down = false;
            loop {
                match tokio::net::UnixStream::connect(&path).await {
                    Ok(stream) => {
                        logged_down = false;
                        let started = Instant::now();
                        match serve(stream, &id, &handler, &events, &link).await {
                            Ok(()) => {
                                tracing::warn!(socket = %path.display(), "NRI runtime closed the connection; reconnecting")
                            }
                            Err(e) => {
                                tracing::warn!(socket = %path.display(), error = %hyperbox_api::ErrorChain(&e), "NRI connection failed; reconnecting")
                            }
                        }
                        events.connected(None);
                        // A connection that lived a while resets the backoff.
                        if started.elapsed() > BACKOFF_MAX {
                            backoff = BACKOFF_MIN;
                        }
                    }
                    Err(e) => {
                        if !logged_down {
                            tracing::info!(socket = %path.display(), error = %e, "NRI socket not available; retrying with backoff");
                            logged_down = true;
                        }
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

async fn serve<E: Events>(
    stream: tokio::net::UnixStream,
    id: &Identity,
    handler: &Arc<Dispatch<E>>,
    events: &Arc<E>,
    link: &Arc<Link>,
) -> Result<(), session::Error> {
    // A split Synchronize cut short by the last connection is void.
    handler.sync_updates.lock().expect("sync updates").clear();
    let session = Session::start(stream, handler.clone());
    let req = api::RegisterPluginRequest {
        plugin_name: id.name.clone(),
        plugin_idx: id.index.clone(),
        nri_version: api::NRI_VERSION.into(),
    };
    let _: api::Empty = session
        .client
        .call("RegisterPlugin", &req, REGISTER_TIMEOUT)
        .await?;
    tracing::info!(name = %id.name, index = %id.index, "registered with the NRI runtime");
    *link.client.lock().expect("link") = Some(session.client.clone());
    events.connected(Some(format!("{}-{}", id.index, id.name)));
    let result = session.wait().await;
    *link.client.lock().expect("link") = None;
    result
}

/// Routes ttrpc calls to [`Events`], timing each.
struct Dispatch<E> {
    events: Arc<E>,
    /// Updates asked for in the batches of a split Synchronize so far: the
    /// runtime accepts them only with the last batch.
    sync_updates: Mutex<Vec<api::ContainerUpdate>>,
}

fn decode<M: Message + Default>(payload: &[u8]) -> Result<M, Status> {
    M::decode(payload).map_err(|e| Status::new(code::INVALID_ARGUMENT, format!("decode: {e}")))
}

impl<E: Events> Dispatch<E> {
    fn answer(&self, method: &str, payload: &[u8]) -> Result<Vec<u8>, Status> {
        let ev = &self.events;
        let empty = || api::Empty {}.encode_to_vec();
        let container = |payload: &[u8], event: Event| -> Result<Vec<u8>, Status> {
            let req: api::ContainerRequest = decode(payload)?;
            let (pod, c) = (
                req.pod.unwrap_or_default(),
                req.container.unwrap_or_default(),
            );
            ev.container_event(event, &pod, &c);
            Ok(empty())
        };
        match method {
            "Configure" => {
                let req: api::ConfigureRequest = decode(payload)?;
                let events = ev
                    .configure(&req)
                    .map_err(|e| Status::new(code::INVALID_ARGUMENT, e))?;
                Ok(api::ConfigureResponse { events }.encode_to_vec())
            }
            "Synchronize" => {
                let req: api::SynchronizeRequest = decode(payload)?;
                let mut pending = self.sync_updates.lock().expect("sync updates");
                pending.extend(ev.synchronize(&req));
                // Echoing `more` tells the runtime we take split states.
                let update = if req.more {
                    Vec::new()
                } else {
                    std::mem::take(&mut *pending)
                };
                Ok(api::SynchronizeResponse {
                    update,
                    more: req.more,
                }
                .encode_to_vec())
            }
            "CreateContainer" => {
                let req: api::ContainerRequest = decode(payload)?;
                let (pod, c) = (
                    req.pod.unwrap_or_default(),
                    req.container.unwrap_or_default(),
                );
                Ok(ev.create_container(&pod, &c).encode_to_vec())
            }
            "UpdateContainer" => {
                let req: api::ContainerRequest = decode(payload)?;
                let (pod, c) = (
                    req.pod.unwrap_or_default(),
                    req.container.unwrap_or_default(),
                );
                Ok(ev
                    .update_container(&pod, &c, req.linux_resources.as_ref())
                    .encode_to_vec())
            }
            // Replies of these are empty messages or lists we leave empty.
            "StopContainer" => container(payload, Event::StopContainer),
            "StartContainer" => container(payload, Event::StartContainer),
            "RemoveContainer" => container(payload, Event::RemoveContainer),
            "PostCreateContainer" => container(payload, Event::PostCreateContainer),
            "PostStartContainer" => container(payload, Event::PostStartContainer),
            "PostUpdateContainer" => container(payload, Event::PostUpdateContainer),
            "StateChange" => {
                let req: api::StateChangeEvent = decode(payload)?;
                let event = Event::try_from(req.event).unwrap_or(Event::Unknown);
                if let Some(c) = &req.container {
                    ev.container_event(event, &req.pod.clone().unwrap_or_default(), c);
                }
                Ok(empty())
            }
            // We never subscribe to it (see `ConfigureResponse::events`),
            // but a runtime that asks anyway gets a valid "no objection".
            "ValidateContainerAdjustment" => {
                Ok(api::ValidateContainerAdjustmentResponse::default().encode_to_vec())
            }
            // Pod events: every *PodSandboxResponse is an empty message.
            "RunPodSandbox"
            | "StopPodSandbox"
            | "RemovePodSandbox"
            | "UpdatePodSandbox"
            | "PostUpdatePodSandbox"
            | "Shutdown" => Ok(empty()),
            other => Err(Status::new(
                code::UNIMPLEMENTED,
                format!("{other} is not implemented by this plugin"),
            )),
        }
    }
}

impl<E: Events> Handler for Dispatch<E> {
    async fn call(
        &self,
        service: String,
        method: String,
        payload: bytes::Bytes,
    ) -> Result<Vec<u8>, Status> {
        if service != api::PLUGIN_SERVICE {
            return Err(Status::new(
                code::UNIMPLEMENTED,
                format!("unknown service {service}"),
            ));
        }
        let started = Instant::now();
        // Answers come from memory; a panic in one must not take the
        // connection (and with it every later container) down.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.answer(&method, &payload)
        }))
        .unwrap_or_else(|_| {
            Err(Status::new(
                code::INTERNAL,
                format!("{method} handler panicked"),
            ))
        });
        self.events
            .observe(&method, started.elapsed(), result.is_ok());
        if let Err(s) = &result {
            tracing::warn!(method = %method, code = s.code, message = %s.message, "NRI call failed");
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what reached it.
    #[derive(Default)]
    struct Seen(Mutex<Vec<(Event, String)>>);

    impl Events for Seen {
        fn configure(&self, _: &api::ConfigureRequest) -> Result<i32, String> {
            Ok(Event::CreateContainer.mask())
        }
        /// Asks to update every container it is told about.
        fn synchronize(&self, req: &api::SynchronizeRequest) -> Vec<api::ContainerUpdate> {
            req.containers
                .iter()
                .map(|c| api::ContainerUpdate {
                    container_id: c.id.clone(),
                    ..Default::default()
                })
                .collect()
        }
        fn create_container(
            &self,
            _: &api::PodSandbox,
            c: &api::Container,
        ) -> api::CreateContainerResponse {
            self.0
                .lock()
                .unwrap()
                .push((Event::CreateContainer, c.id.clone()));
            api::CreateContainerResponse::default()
        }
        fn update_container(
            &self,
            _: &api::PodSandbox,
            _: &api::Container,
            _: Option<&api::LinuxResources>,
        ) -> api::UpdateContainerResponse {
            api::UpdateContainerResponse::default()
        }
        fn container_event(&self, e: Event, _: &api::PodSandbox, c: &api::Container) {
            self.0.lock().unwrap().push((e, c.id.clone()));
        }
        fn observe(&self, _: &str, _: Duration, _: bool) {}
        fn connected(&self, _: Option<String>) {}
    }

    fn container(id: &str) -> api::Container {
        api::Container {
            id: id.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn old_state_changes_and_new_dedicated_calls_reach_the_same_handler() {
        let seen = Arc::new(Seen::default());
        let d = Dispatch {
            events: seen.clone(),
            sync_updates: Mutex::default(),
        };
        let call = |method: &str, payload: Vec<u8>| {
            d.call(api::PLUGIN_SERVICE.into(), method.into(), payload.into())
        };
        // containerd 1.7 (NRI v0.6.1): StateChange carries the event.
        let old = api::StateChangeEvent {
            event: Event::StartContainer as i32,
            pod: None,
            container: Some(container("a")),
        };
        call("StateChange", old.encode_to_vec()).await.unwrap();
        // Newer runtimes: a call per event.
        let new = api::ContainerRequest {
            pod: None,
            container: Some(container("b")),
            linux_resources: None,
        };
        call("StartContainer", new.encode_to_vec()).await.unwrap();
        call("RemoveContainer", new.encode_to_vec()).await.unwrap();
        call("CreateContainer", new.encode_to_vec()).await.unwrap();
        // Pod events are answered, not dispatched.
        call("RunPodSandbox", Vec::new()).await.unwrap();
        assert_eq!(
            *seen.0.lock().unwrap(),
            vec![
                (Event::StartContainer, "a".to_string()),
                (Event::StartContainer, "b".to_string()),
                (Event::RemoveContainer, "b".to_string()),
                (Event::CreateContainer, "b".to_string()),
            ]
        );
        let e = d
            .call(
                "other.Service".into(),
                "Configure".into(),
                Vec::new().into(),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, code::UNIMPLEMENTED);
    }

    #[tokio::test]
    async fn a_split_synchronize_gets_its_updates_with_the_last_batch_only() {
        let d = Dispatch {
            events: Arc::new(Seen::default()),
            sync_updates: Mutex::default(),
        };
        let sync = |more: bool, ids: &[&str]| {
            let req = api::SynchronizeRequest {
                pods: Vec::new(),
                containers: ids.iter().map(|i| container(i)).collect(),
                more,
            };
            d.call(
                api::PLUGIN_SERVICE.into(),
                "Synchronize".into(),
                req.encode_to_vec().into(),
            )
        };
        let ids = |r: &api::SynchronizeResponse| -> Vec<String> {
            r.update.iter().map(|u| u.container_id.clone()).collect()
        };
        // NRI v0.12.3 closes a plugin that answers a non-final batch with
        // updates or with another `more`.
        let first =
            api::SynchronizeResponse::decode(sync(true, &["a", "b"]).await.unwrap().as_slice())
                .unwrap();
        assert!(first.more && first.update.is_empty(), "{first:?}");
        let last = api::SynchronizeResponse::decode(sync(false, &["c"]).await.unwrap().as_slice())
            .unwrap();
        assert!(!last.more);
        assert_eq!(ids(&last), ["a", "b", "c"]);
        // An unsplit state (containerd 1.7 always) answers at once.
        let whole = api::SynchronizeResponse::decode(sync(false, &["d"]).await.unwrap().as_slice())
            .unwrap();
        assert_eq!(ids(&whole), ["d"]);
    }

    #[tokio::test]
    async fn methods_newer_than_v0_6_are_answered_with_their_reply_types() {
        let d = Dispatch {
            events: Arc::new(Seen::default()),
            sync_updates: Mutex::default(),
        };
        let call = |method: &str| {
            d.call(
                api::PLUGIN_SERVICE.into(),
                method.into(),
                bytes::Bytes::new(),
            )
        };
        let v = call("ValidateContainerAdjustment").await.unwrap();
        let v = api::ValidateContainerAdjustmentResponse::decode(v.as_slice()).unwrap();
        assert!(!v.reject);
        for m in ["UpdatePodSandbox", "PostUpdatePodSandbox", "StopPodSandbox"] {
            assert!(call(m).await.unwrap().is_empty(), "{m}");
        }
        // Events v0.6.1 does not know must stay out of a 1.7 mask.
        assert!(Event::RemoveContainer.known_to_v0_6());
        assert!(!Event::UpdatePodSandbox.known_to_v0_6());
        assert_eq!(Event::ValidateContainerAdjustment.mask(), 1 << 13);
    }
}
