//! A client of containerd's gRPC API that does what `ctr` and nerdctl do:
//! pull (fetch into the content store, record the image, unpack each layer
//! into a snapshotter), create containers, run tasks with their output
//! captured, exec, kill and delete.
//!
//! Pulling is client-side in containerd 1.7, as in its Go client. The
//! harness resolves images with its own registry client (plain HTTP,
//! every digest verified: an independent reference to test
//! hyperbox-registry against) and then runs the containerd side of the pull
//! shared with `hb image pull` (`hyperbox-pull`): content under a lease,
//! layers unpacked with Snapshots.Prepare, Diff.Apply and Snapshots.Commit.
//! With [`PullOptions::remote_labels`] every Prepare carries the
//! `containerd.io/snapshot/cri.*` labels nerdctl and CRI send, and a
//! snapshotter that answers `AlreadyExists` (a remote snapshotter that
//! fetched the layer itself) makes the client skip that layer's download and
//! unpack.

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest};
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateRequest as CreateLeaseRequest, CreateTaskRequest,
    DeleteContainerRequest, DeleteProcessRequest, DeleteRequest as DeleteLeaseRequest,
    DeleteTaskRequest, ExecProcessRequest, GetImageRequest, KillRequest, StartRequest, WaitRequest,
    container::Runtime, containers_client::ContainersClient, images_client::ImagesClient,
    leases_client::LeasesClient, tasks_client::TasksClient, version_client::VersionClient,
};
use containerd_client::types::Descriptor;
use futures::StreamExt;
use prost_types::Any;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;
use tonic::{Code, Request};

use hyperbox_registry::Resolved;

use crate::digest::sha256;
use crate::image::media;

const SPEC_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
const PROCESS_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
/// The runtime containerd uses for runc.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";

/// Errors of the containerd client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// containerd answered a call with an error.
    #[error("containerd {call} ({what}): {code:?}: {message}")]
    Rpc {
        /// The RPC.
        call: &'static str,
        /// Its subject (image, container, snapshot key).
        what: String,
        /// gRPC code.
        code: Code,
        /// containerd's message.
        message: String,
    },
    /// Connecting to containerd failed.
    #[error("connect to containerd at {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The registry refused or failed a request.
    #[error("registry: GET {url}: {detail}")]
    Registry {
        /// The URL.
        url: String,
        /// Status or transport error.
        detail: String,
    },
    /// A fetched blob did not match its digest.
    #[error("registry: {url}: content digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The URL.
        url: String,
        /// Descriptor digest.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// An image manifest or config could not be understood.
    #[error("image {reference}: {detail}")]
    Image {
        /// The image.
        reference: String,
        /// What is wrong.
        detail: String,
    },
    /// A container, task or runtime is not in the state the call needs.
    #[error("{subject}: {detail}")]
    State {
        /// The container, task or runtime.
        subject: String,
        /// What is wrong.
        detail: String,
    },
    /// A pull failed (containerd's calls, or a blob from the registry).
    #[error(transparent)]
    Pull(#[from] hyperbox_pull::Error),
    /// Local I/O (FIFOs) failed.
    #[error("{action}")]
    Io {
        /// What was being done.
        action: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The gRPC code when containerd answered with an error.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Rpc { code, .. } => Some(*code),
            Error::Pull(e) => e.code(),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, Error>;

fn rpc(call: &'static str, what: impl Into<String>) -> impl FnOnce(tonic::Status) -> Error {
    let what = what.into();
    move |s| Error::Rpc {
        call,
        what,
        code: s.code(),
        message: s.message().to_string(),
    }
}

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let action = action.into();
    move |source| Error::Io { action, source }
}

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Snapshotter to unpack into (`overlayfs`, `hyperbox`, …).
    pub snapshotter: String,
    /// Send the `containerd.io/snapshot/cri.*` labels with each Prepare, as
    /// nerdctl and CRI do for remote snapshotters.
    pub remote_labels: bool,
}

impl PullOptions {
    /// Unpack into `snapshotter` without remote labels.
    pub fn local(snapshotter: &str) -> Self {
        PullOptions {
            snapshotter: snapshotter.into(),
            remote_labels: false,
        }
    }
}

/// A pulled and unpacked image.
#[derive(Debug, Clone)]
pub struct Image {
    /// The reference it was pulled by (`host:port/repo:tag`).
    pub name: String,
    /// The descriptor the name points at (index or manifest).
    pub target: Descriptor,
    /// The manifest used for this platform.
    pub manifest_digest: String,
    /// The parsed OCI image config.
    pub config: Value,
    /// Layer snapshot names (chain ids), bottom first.
    pub chain_ids: Vec<String>,
    /// The snapshotter it was unpacked into.
    pub snapshotter: String,
    /// Layers whose Prepare was answered `AlreadyExists` (fetched by the
    /// snapshotter itself), by index.
    pub layers_skipped: Vec<usize>,
    /// Layer blob digests from the manifest, bottom first.
    pub layer_digests: Vec<String>,
}

impl Image {
    /// The topmost layer's snapshot name: the parent of container snapshots.
    pub fn top_chain_id(&self) -> &str {
        self.chain_ids.last().map(String::as_str).unwrap_or("")
    }

    fn config_list(&self, key: &str) -> Vec<String> {
        self.config["config"][key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Entrypoint followed by Cmd, as a container runs it by default.
    pub fn default_args(&self) -> Vec<String> {
        let mut args = self.config_list("Entrypoint");
        args.extend(self.config_list("Cmd"));
        args
    }

    /// The image's `Env`.
    pub fn env(&self) -> Vec<String> {
        self.config_list("Env")
    }
}

/// A parsed `host/repo:tag` or `host/repo@digest` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host:port`.
    pub host: String,
    /// Repository path.
    pub repo: String,
    /// Tag or digest.
    pub object: String,
}

impl Reference {
    /// Parses a reference with an explicit registry host.
    pub fn parse(s: &str) -> Option<Reference> {
        let (host, rest) = s.split_once('/')?;
        let (repo, object) = if let Some((r, d)) = rest.split_once('@') {
            (r, d)
        } else {
            match rest.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r, t),
                _ => (rest, "latest"),
            }
        };
        Some(Reference {
            host: host.into(),
            repo: repo.into(),
            object: object.into(),
        })
    }
}

/// Output of a finished process.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit status.
    pub status: u32,
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// Everything written to stderr.
    pub stderr: Vec<u8>,
}

impl Output {
    /// stdout as text.
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr as text.
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A containerd API client bound to one namespace.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    namespace: String,
    cgroup_prefix: String,
    io_dir: PathBuf,
    runc_root: PathBuf,
    http: reqwest::Client,
}

/// The runc shim's options (`containerd.runc.v1.Options`); only `root` is
/// set, so runc keeps its state in the instance's directory rather than in
/// the host-wide `/run/containerd/runc`.
#[derive(Clone, PartialEq, prost::Message)]
struct RuncOptions {
    #[prost(string, tag = "7")]
    root: String,
}
const RUNC_OPTIONS_TYPE: &str = "containerd.runc.v1.Options";

impl Client {
    /// Connects to containerd's socket. Containers get cgroups under
    /// `cgroup_prefix`; FIFOs for their output are made under `io_dir`; runc
    /// keeps its state under `runc_root`.
    pub async fn connect(
        socket: &Path,
        namespace: &str,
        cgroup_prefix: &str,
        io_dir: &Path,
        runc_root: &Path,
    ) -> Result<Self> {
        let channel =
            containerd_client::connect(socket)
                .await
                .map_err(|source| Error::Connect {
                    path: socket.into(),
                    source,
                })?;
        std::fs::create_dir_all(io_dir).map_err(io(format!("create {}", io_dir.display())))?;
        Ok(Client {
            channel,
            namespace: namespace.into(),
            cgroup_prefix: cgroup_prefix.into(),
            io_dir: io_dir.into(),
            runc_root: runc_root.into(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::limited(5))
                .timeout(Duration::from_secs(120))
                .build()
                .expect("reqwest client without TLS builds"),
        })
    }

    /// The same connection in another namespace.
    pub fn with_namespace(&self, namespace: &str) -> Self {
        Client {
            namespace: namespace.into(),
            ..self.clone()
        }
    }

    /// The namespace requests go to.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The gRPC channel, for services this client does not wrap.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        self.req_leased(msg, None)
    }

    fn req_leased<T>(&self, msg: T, lease: Option<&str>) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        md.insert(
            "containerd-namespace",
            self.namespace.parse().expect("namespace is ASCII"),
        );
        if let Some(l) = lease {
            md.insert("containerd-lease", l.parse().expect("lease id is ASCII"));
        }
        r
    }

    /// containerd's version string.
    pub async fn version(&self) -> Result<String> {
        let v = VersionClient::new(self.channel.clone())
            .version(())
            .await
            .map_err(rpc("Version", ""))?;
        Ok(v.into_inner().version)
    }

    /// Pulls `reference` (plain HTTP registry) and unpacks it.
    pub async fn pull(&self, reference: &str, opts: &PullOptions) -> Result<Image> {
        let r = Reference::parse(reference).ok_or_else(|| Error::Image {
            reference: reference.into(),
            detail: "not of the form host[:port]/repo[:tag|@digest]".into(),
        })?;
        let (resolved, config) = self.resolve(reference, &r).await?;
        let source = RegistrySource {
            client: self,
            r: &r,
        };
        let pull_opts = hyperbox_pull::Options {
            snapshotter: opts.snapshotter.clone(),
            remote_labels: opts.remote_labels,
        };
        let report = hyperbox_pull::pull(
            &self.session(),
            &resolved,
            reference,
            &pull_opts,
            &source,
            &mut |_| {},
        )
        .await?;
        Ok(Image {
            name: reference.into(),
            target: pb_descriptor(&resolved.top),
            manifest_digest: resolved.manifest.digest.clone(),
            config,
            layers_skipped: report.remote(),
            chain_ids: report.chain_ids,
            snapshotter: opts.snapshotter.clone(),
            layer_digests: resolved.layers.iter().map(|l| l.digest.clone()).collect(),
        })
    }

    /// Resolves `r` to linux/amd64's manifest and config with the harness's
    /// own registry client, verifying every digest.
    async fn resolve(&self, name: &str, r: &Reference) -> Result<(Resolved, Value)> {
        let (top_bytes, top_type, top_digest) = self.fetch_manifest(r, &r.object).await?;
        let top_desc = registry_descriptor(&top_type, &top_digest, top_bytes.len());
        let top: Value = serde_json::from_slice(&top_bytes).map_err(|e| Error::Image {
            reference: name.into(),
            detail: format!("manifest is not JSON: {e}"),
        })?;
        let (manifest_bytes, manifest_desc) = if is_index(&top_type, &top) {
            let chosen = top["manifests"]
                .as_array()
                .and_then(|ms| {
                    ms.iter().find(|m| {
                        m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64"
                    })
                })
                .ok_or_else(|| Error::Image {
                    reference: name.into(),
                    detail: "index has no linux/amd64 manifest".into(),
                })?;
            let d = chosen["digest"].as_str().unwrap_or_default().to_string();
            let (bytes, ctype, _) = self.fetch_manifest(r, &d).await?;
            verify(&bytes, &d, name)?;
            let desc = registry_descriptor(&ctype, &d, bytes.len());
            (bytes, desc)
        } else {
            (top_bytes.clone(), top_desc.clone())
        };
        let manifest: Value =
            serde_json::from_slice(&manifest_bytes).map_err(|e| Error::Image {
                reference: name.into(),
                detail: format!("manifest is not JSON: {e}"),
            })?;
        let config_desc = descriptor(&manifest["config"]).ok_or_else(|| Error::Image {
            reference: name.into(),
            detail: "manifest has no config".into(),
        })?;
        let layers: Vec<hyperbox_registry::Descriptor> = manifest["layers"]
            .as_array()
            .map(|a| a.iter().filter_map(descriptor).collect())
            .unwrap_or_default();
        let config_bytes = self.fetch_blob(r, &config_desc.digest).await?;
        let config: Value = serde_json::from_slice(&config_bytes).map_err(|e| Error::Image {
            reference: name.into(),
            detail: format!("config is not JSON: {e}"),
        })?;
        let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let reference = hyperbox_registry::Reference::parse(name).map_err(|e| Error::Image {
            reference: name.into(),
            detail: e.to_string(),
        })?;
        let resolved = Resolved {
            reference,
            top: top_desc,
            top_bytes,
            manifest: manifest_desc,
            manifest_bytes,
            config: config_desc,
            config_bytes,
            layers,
            diff_ids,
        };
        Ok((resolved, config))
    }

    fn session(&self) -> hyperbox_pull::Session {
        hyperbox_pull::Session::new(self.channel.clone(), &self.namespace)
    }

    /// Whether containerd's content store holds `digest`.
    pub async fn content_exists(&self, digest: &str) -> Result<bool> {
        Ok(self.session().content_exists(digest).await?)
    }

    /// Creates a lease (expiring in an hour) for requests that must keep
    /// what they create from the garbage collector; returns its id.
    pub async fn create_lease(&self) -> Result<String> {
        Ok(self
            .session()
            .create_lease("hb-lease", Duration::from_secs(3600))
            .await?)
    }

    /// Deletes lease `id`; what only it referenced goes at the next collection.
    pub async fn delete_lease(&self, id: &str) -> Result<()> {
        Ok(self.session().delete_lease(id).await?)
    }

    /// Runs containerd's garbage collector now and waits for it (deleting a
    /// lease with `sync` does that), so snapshots and content no longer
    /// referenced are removed from their backends before this returns.
    pub async fn gc(&self) -> Result<()> {
        let id = format!("hb-gc-{:016x}", rand::random::<u64>());
        let mut leases = LeasesClient::new(self.channel.clone());
        leases
            .create(self.req(CreateLeaseRequest {
                id: id.clone(),
                labels: HashMap::new(),
            }))
            .await
            .map_err(rpc("Leases.Create", &id))?;
        leases
            .delete(self.req(DeleteLeaseRequest {
                id: id.clone(),
                sync: true,
            }))
            .await
            .map_err(rpc("Leases.Delete", &id))?;
        Ok(())
    }

    /// Waits until containerd reaches `snapshotter` again (a proxy plugin may
    /// have restarted while containerd's connection to it backs off). `key`
    /// must exist: containerd answers for unknown keys from its own metadata
    /// without asking the plugin.
    pub async fn wait_snapshotter(
        &self,
        snapshotter: &str,
        key: &str,
        timeout: Duration,
    ) -> Result<()> {
        let start = std::time::Instant::now();
        loop {
            let probe = SnapshotsClient::new(self.channel.clone())
                .usage(
                    self.req(containerd_client::services::v1::snapshots::UsageRequest {
                        snapshotter: snapshotter.into(),
                        key: key.into(),
                    }),
                )
                .await;
            match probe {
                Ok(_) => return Ok(()),
                Err(s) if start.elapsed() > timeout => return Err(rpc("Snapshots.Usage", key)(s)),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Deletes the image record `name` (its content and snapshots go at the
    /// next garbage collection; see [`Client::gc`]).
    pub async fn delete_image(&self, name: &str) -> Result<()> {
        match ImagesClient::new(self.channel.clone())
            .delete(
                self.req(containerd_client::services::v1::DeleteImageRequest {
                    name: name.into(),
                    sync: false,
                    target: None,
                }),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(rpc("Images.Delete", name)(s)),
        }
    }

    /// Snapshot keys containerd records for `snapshotter` in this namespace.
    pub async fn snapshot_keys(&self, snapshotter: &str) -> Result<Vec<String>> {
        let mut stream = SnapshotsClient::new(self.channel.clone())
            .list(self.req(
                containerd_client::services::v1::snapshots::ListSnapshotsRequest {
                    snapshotter: snapshotter.into(),
                    filters: Vec::new(),
                },
            ))
            .await
            .map_err(rpc("Snapshots.List", snapshotter))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(batch) = stream.next().await {
            out.extend(
                batch
                    .map_err(rpc("Snapshots.List", snapshotter))?
                    .info
                    .into_iter()
                    .map(|i| i.name),
            );
        }
        Ok(out)
    }

    /// Usage of `key` as containerd reports it (it asks the snapshotter).
    pub async fn snapshot_usage(&self, snapshotter: &str, key: &str) -> Result<(i64, i64)> {
        let u = SnapshotsClient::new(self.channel.clone())
            .usage(
                self.req(containerd_client::services::v1::snapshots::UsageRequest {
                    snapshotter: snapshotter.into(),
                    key: key.into(),
                }),
            )
            .await
            .map_err(rpc("Snapshots.Usage", key))?
            .into_inner();
        Ok((u.size, u.inodes))
    }

    /// True when containerd has an image record named `name`.
    pub async fn image_exists(&self, name: &str) -> Result<bool> {
        match ImagesClient::new(self.channel.clone())
            .get(self.req(GetImageRequest { name: name.into() }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(rpc("Images.Get", name)(s)),
        }
    }

    async fn registry_get(&self, url: &str, accept: &str) -> Result<(Vec<u8>, String)> {
        let resp = self
            .http
            .get(url)
            .header("accept", accept)
            .send()
            .await
            .map_err(|e| Error::Registry {
                url: url.into(),
                detail: hyperbox_api::error_chain(&e),
            })?;
        let status = resp.status();
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(Error::Registry {
                url: url.into(),
                detail: format!("HTTP {status}: {}", crate::registry::tail(&body, 300)),
            });
        }
        let bytes = resp.bytes().await.map_err(|e| Error::Registry {
            url: url.into(),
            detail: format!("reading body: {}", hyperbox_api::error_chain(&e)),
        })?;
        Ok((bytes.to_vec(), ctype))
    }

    async fn fetch_manifest(
        &self,
        r: &Reference,
        object: &str,
    ) -> Result<(Vec<u8>, String, String)> {
        let url = format!("http://{}/v2/{}/manifests/{object}", r.host, r.repo);
        let accept = [
            media::INDEX,
            media::MANIFEST,
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.docker.distribution.manifest.v2+json",
        ]
        .join(", ");
        let (bytes, ctype) = self.registry_get(&url, &accept).await?;
        let digest = sha256(&bytes);
        if object.starts_with("sha256:") && object != digest {
            return Err(Error::DigestMismatch {
                url,
                expected: object.into(),
                actual: digest,
            });
        }
        Ok((bytes, ctype, digest))
    }

    async fn fetch_blob(&self, r: &Reference, digest: &str) -> Result<Vec<u8>> {
        let url = format!("http://{}/v2/{}/blobs/{digest}", r.host, r.repo);
        let (bytes, _) = self.registry_get(&url, "*/*").await?;
        verify(&bytes, digest, &url)?;
        Ok(bytes)
    }

    /// Creates a container from `image` with its own snapshot; does not start it.
    pub async fn create_container(
        &self,
        id: &str,
        image: &Image,
        opts: &ContainerOptions,
    ) -> Result<ContainerHandle> {
        let args = opts.args.clone().unwrap_or_else(|| image.default_args());
        let mut env = image.env();
        env.extend(opts.env.iter().cloned());
        let spec = runtime_spec(
            id,
            &args,
            &env,
            &format!("{}/{id}", self.cgroup_prefix),
            opts,
        );
        let snapshotter = opts
            .snapshotter
            .clone()
            .unwrap_or_else(|| image.snapshotter.clone());
        // Between Prepare and Containers.Create nothing references the new
        // snapshot; a lease keeps containerd's collector off it, as
        // containerd's own clients do.
        let lease = self.create_lease().await?;
        let created: Result<()> = async {
            SnapshotsClient::new(self.channel.clone())
                .prepare(self.req_leased(
                    PrepareSnapshotRequest {
                        snapshotter: snapshotter.clone(),
                        key: id.into(),
                        parent: image.top_chain_id().into(),
                        labels: HashMap::new(),
                    },
                    Some(&lease),
                ))
                .await
                .map_err(rpc("Snapshots.Prepare", id))?;
            let container = Container {
                id: id.into(),
                image: image.name.clone(),
                runtime: Some(Runtime {
                    name: opts
                        .runtime
                        .clone()
                        .unwrap_or_else(|| crate::shim::Shim::selected().runtime_type().into()),
                    options: Some(Any {
                        type_url: RUNC_OPTIONS_TYPE.into(),
                        value: prost::Message::encode_to_vec(&RuncOptions {
                            root: self.runc_root.to_string_lossy().into_owned(),
                        }),
                    }),
                }),
                spec: Some(Any {
                    type_url: SPEC_TYPE.into(),
                    value: serde_json::to_vec(&spec).expect("spec serializes"),
                }),
                snapshotter: snapshotter.clone(),
                snapshot_key: id.into(),
                labels: opts.labels.clone(),
                ..Default::default()
            };
            if let Err(e) = ContainersClient::new(self.channel.clone())
                .create(self.req_leased(
                    CreateContainerRequest {
                        container: Some(container),
                    },
                    Some(&lease),
                ))
                .await
            {
                let _ = self.remove_snapshot(&snapshotter, id).await;
                return Err(rpc("Containers.Create", id)(e));
            }
            Ok(())
        }
        .await;
        self.delete_lease(&lease).await?;
        created?;
        Ok(ContainerHandle {
            client: self.clone(),
            id: id.into(),
            snapshotter,
            process: spec["process"].clone(),
        })
    }

    /// Creates, starts and waits for a container, then deletes it; returns
    /// what it printed and its exit status.
    pub async fn run(&self, id: &str, image: &Image, opts: &ContainerOptions) -> Result<Output> {
        let c = self.create_container(id, image, opts).await?;
        let result = async {
            let task = c.start().await?;
            task.wait_output().await
        }
        .await;
        let deleted = c.delete().await;
        let out = result?;
        deleted?;
        Ok(out)
    }

    async fn remove_snapshot(&self, snapshotter: &str, key: &str) -> Result<()> {
        SnapshotsClient::new(self.channel.clone())
            .remove(self.req(RemoveSnapshotRequest {
                snapshotter: snapshotter.into(),
                key: key.into(),
            }))
            .await
            .map(|_| ())
            .map_err(rpc("Snapshots.Remove", key))
    }

    async fn make_io(&self, name: &str) -> Result<ProcessIo> {
        ProcessIo::new(&self.io_dir.join(name))
    }
}

/// Options of a container made by [`Client::create_container`].
#[derive(Debug, Clone, Default)]
pub struct ContainerOptions {
    /// Arguments; the image's entrypoint and cmd when `None`.
    pub args: Option<Vec<String>>,
    /// Extra environment, `KEY=value`.
    pub env: Vec<String>,
    /// Snapshotter; the image's when `None`.
    pub snapshotter: Option<String>,
    /// Runtime type; the shim `HYPERBOX_TEST_SHIM` selects when `None`
    /// (`io.containerd.runc.v2` by default).
    pub runtime: Option<String>,
    /// Share the host's network namespace.
    pub host_network: bool,
    /// Container labels.
    pub labels: HashMap<String, String>,
    /// OCI spec annotations.
    pub annotations: HashMap<String, String>,
}

impl ContainerOptions {
    /// Runs `args` instead of the image's default.
    pub fn args(args: &[&str]) -> Self {
        ContainerOptions {
            args: Some(args.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }
    }
}

fn runtime_spec(
    id: &str,
    args: &[String],
    env: &[String],
    cgroups_path: &str,
    opts: &ContainerOptions,
) -> Value {
    let spec = oci_spec::runtime::Spec::default();
    let mut v = serde_json::to_value(&spec).expect("default spec serializes");
    v["hostname"] = Value::String(id.chars().take(63).collect());
    v["process"]["args"] = serde_json::json!(args);
    let mut all_env =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
    all_env.extend(env.iter().cloned());
    v["process"]["env"] = serde_json::json!(all_env);
    v["process"]["cwd"] = Value::String("/".into());
    v["process"]["terminal"] = Value::Bool(false);
    v["root"] = serde_json::json!({"path": "rootfs", "readonly": false});
    v["linux"]["cgroupsPath"] = Value::String(cgroups_path.into());
    if opts.host_network
        && let Some(ns) = v["linux"]["namespaces"].as_array_mut()
    {
        ns.retain(|n| n["type"] != "network");
    }
    v["annotations"] = serde_json::json!(opts.annotations);
    v
}

fn is_index(media_type: &str, v: &Value) -> bool {
    media_type.contains("index")
        || media_type.contains("manifest.list")
        || v.get("manifests").is_some()
}

fn descriptor(v: &Value) -> Option<hyperbox_registry::Descriptor> {
    Some(hyperbox_registry::Descriptor {
        media_type: v["mediaType"].as_str().unwrap_or_default().into(),
        digest: v["digest"].as_str()?.into(),
        size: v["size"].as_i64()?,
        annotations: HashMap::new(),
    })
}

fn registry_descriptor(
    media_type: &str,
    digest: &str,
    size: usize,
) -> hyperbox_registry::Descriptor {
    hyperbox_registry::Descriptor {
        media_type: media_type.into(),
        digest: digest.into(),
        size: size as i64,
        annotations: HashMap::new(),
    }
}

fn pb_descriptor(d: &hyperbox_registry::Descriptor) -> Descriptor {
    Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        annotations: d.annotations.clone(),
    }
}

/// Layer blobs for layers the snapshotter leaves to containerd, fetched
/// and verified by the harness's own registry client.
struct RegistrySource<'a> {
    client: &'a Client,
    r: &'a Reference,
}

#[async_trait::async_trait]
impl hyperbox_pull::LayerSource for RegistrySource<'_> {
    async fn fetch(
        &self,
        layer: &hyperbox_registry::Descriptor,
    ) -> std::result::Result<hyperbox_pull::Blob, Box<dyn std::error::Error + Send + Sync>> {
        Ok(hyperbox_pull::Blob::Bytes(
            self.client.fetch_blob(self.r, &layer.digest).await?,
        ))
    }
}

fn verify(bytes: &[u8], expected: &str, url: &str) -> Result<()> {
    let actual = sha256(bytes);
    if actual != expected {
        return Err(Error::DigestMismatch {
            url: url.into(),
            expected: expected.into(),
            actual,
        });
    }
    Ok(())
}

/// A created container.
#[derive(Debug)]
pub struct ContainerHandle {
    client: Client,
    id: String,
    snapshotter: String,
    process: Value,
}

impl ContainerHandle {
    /// The container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Creates and starts its task with stdout and stderr captured.
    pub async fn start(&self) -> Result<Task> {
        let c = &self.client;
        let mounts =
            containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient::new(
                c.channel.clone(),
            )
            .mounts(
                c.req(containerd_client::services::v1::snapshots::MountsRequest {
                    snapshotter: self.snapshotter.clone(),
                    key: self.id.clone(),
                }),
            )
            .await
            .map_err(rpc("Snapshots.Mounts", &self.id))?
            .into_inner()
            .mounts;
        let mut pio = c.make_io(&self.id).await?;
        let created = TasksClient::new(c.channel.clone())
            .create(c.req(CreateTaskRequest {
                container_id: self.id.clone(),
                rootfs: mounts,
                stdout: pio.stdout_path(),
                stderr: pio.stderr_path(),
                terminal: false,
                ..Default::default()
            }))
            .await
            .map_err(rpc("Tasks.Create", &self.id))?
            .into_inner();
        pio.writers_opened();
        TasksClient::new(c.channel.clone())
            .start(c.req(StartRequest {
                container_id: self.id.clone(),
                exec_id: String::new(),
            }))
            .await
            .map_err(rpc("Tasks.Start", &self.id))?;
        Ok(Task {
            client: c.clone(),
            id: self.id.clone(),
            pid: created.pid,
            io: pio,
            process: self.process.clone(),
        })
    }

    /// Kills the task if it runs, deletes task, container and snapshot.
    pub async fn delete(&self) -> Result<()> {
        let c = &self.client;
        let mut tasks = TasksClient::new(c.channel.clone());
        let _ = tasks
            .kill(c.req(KillRequest {
                container_id: self.id.clone(),
                exec_id: String::new(),
                signal: 9,
                all: true,
            }))
            .await;
        // Wait for the kill to land; a task that is gone answers NotFound.
        let waited = tokio::time::timeout(Duration::from_secs(30), wait(c, &self.id, "")).await;
        if waited.is_err() {
            return Err(Error::State {
                subject: self.id.clone(),
                detail: "task did not exit within 30s of SIGKILL".into(),
            });
        }
        match tasks
            .delete(c.req(DeleteTaskRequest {
                container_id: self.id.clone(),
            }))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(rpc("Tasks.Delete", &self.id)(s)),
        }
        match ContainersClient::new(c.channel.clone())
            .delete(c.req(DeleteContainerRequest {
                id: self.id.clone(),
            }))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(rpc("Containers.Delete", &self.id)(s)),
        }
        match c.remove_snapshot(&self.snapshotter, &self.id).await {
            Err(e) if e.code() == Some(Code::NotFound) => Ok(()),
            other => other,
        }
    }
}

/// A started task.
#[derive(Debug)]
pub struct Task {
    client: Client,
    id: String,
    pid: u32,
    io: ProcessIo,
    process: Value,
}

impl Task {
    /// Host pid of the container's init process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the init process to exit; returns its status and output.
    pub async fn wait_output(self) -> Result<Output> {
        let status = wait(&self.client, &self.id, "").await?;
        let (stdout, stderr) = self.io.collect().await;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    /// Sends `signal` to the init process.
    pub async fn kill(&self, signal: u32) -> Result<()> {
        TasksClient::new(self.client.channel.clone())
            .kill(self.client.req(KillRequest {
                container_id: self.id.clone(),
                exec_id: String::new(),
                signal,
                all: false,
            }))
            .await
            .map(|_| ())
            .map_err(rpc("Tasks.Kill", &self.id))
    }

    /// Runs `args` in the container and waits for it (like `ctr task exec`).
    pub async fn exec(&self, args: &[&str]) -> Result<Output> {
        let c = &self.client;
        let exec_id = format!("exec-{:08x}", rand::random::<u32>());
        let mut process = self.process.clone();
        process["args"] = serde_json::json!(args);
        let mut pio = c.make_io(&format!("{}-{exec_id}", self.id)).await?;
        let mut tasks = TasksClient::new(c.channel.clone());
        tasks
            .exec(c.req(ExecProcessRequest {
                container_id: self.id.clone(),
                stdin: String::new(),
                stdout: pio.stdout_path(),
                stderr: pio.stderr_path(),
                terminal: false,
                spec: Some(Any {
                    type_url: PROCESS_TYPE.into(),
                    value: serde_json::to_vec(&process).expect("process serializes"),
                }),
                exec_id: exec_id.clone(),
            }))
            .await
            .map_err(rpc("Tasks.Exec", &self.id))?;
        let started = tasks
            .start(c.req(StartRequest {
                container_id: self.id.clone(),
                exec_id: exec_id.clone(),
            }))
            .await
            .map_err(rpc("Tasks.Start(exec)", &self.id));
        pio.writers_opened();
        let result = match started {
            Ok(_) => wait(c, &self.id, &exec_id).await,
            Err(e) => Err(e),
        };
        let _ = tasks
            .delete_process(c.req(DeleteProcessRequest {
                container_id: self.id.clone(),
                exec_id,
            }))
            .await;
        let status = result?;
        let (stdout, stderr) = pio.collect().await;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }
}

async fn wait(c: &Client, id: &str, exec_id: &str) -> Result<u32> {
    Ok(TasksClient::new(c.channel.clone())
        .wait(c.req(WaitRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
        }))
        .await
        .map_err(rpc("Tasks.Wait", id))?
        .into_inner()
        .exit_status)
}

/// stdout and stderr FIFOs of one process and the readers draining them.
///
/// The read end is opened non-blocking first, then a write end of our own
/// keeps the FIFO from reading as EOF until the shim has opened its write
/// end; [`ProcessIo::writers_opened`] drops ours, so EOF then means the
/// process and the shim are done writing.
#[derive(Debug)]
struct ProcessIo {
    dir: PathBuf,
    readers: Vec<tokio::task::JoinHandle<Vec<u8>>>,
    keepalive: Vec<std::fs::File>,
}

impl ProcessIo {
    fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let mut readers = Vec::new();
        let mut keepalive = Vec::new();
        for name in ["stdout", "stderr"] {
            let p = dir.join(name);
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).map_err(
                |e| Error::Io {
                    action: format!("mkfifo {}", p.display()),
                    source: e.into(),
                },
            )?;
            let r = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&p)
                .map_err(io(format!("open {}", p.display())))?;
            let w = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(io(format!("open {}", p.display())))?;
            keepalive.push(w);
            let mut rx = tokio::net::unix::pipe::Receiver::from_file(r)
                .map_err(io(format!("register {}", p.display())))?;
            readers.push(tokio::spawn(async move {
                let mut out = Vec::new();
                let _ = rx.read_to_end(&mut out).await;
                out
            }));
        }
        Ok(ProcessIo {
            dir: dir.into(),
            readers,
            keepalive,
        })
    }

    fn stdout_path(&self) -> String {
        self.dir.join("stdout").to_string_lossy().into_owned()
    }

    fn stderr_path(&self) -> String {
        self.dir.join("stderr").to_string_lossy().into_owned()
    }

    fn writers_opened(&mut self) {
        self.keepalive.clear();
    }

    async fn collect(mut self) -> (Vec<u8>, Vec<u8>) {
        self.keepalive.clear();
        let mut outs = Vec::new();
        for r in self.readers.drain(..) {
            let got = tokio::time::timeout(Duration::from_secs(30), r).await;
            outs.push(got.ok().and_then(|j| j.ok()).unwrap_or_default());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let stderr = outs.pop().unwrap_or_default();
        let stdout = outs.pop().unwrap_or_default();
        (stdout, stderr)
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_with_port_tag_and_digest() {
        let r = Reference::parse("127.0.0.1:5000/a/b:v1").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repo.as_str(), r.object.as_str()),
            ("127.0.0.1:5000", "a/b", "v1")
        );
        let r = Reference::parse("127.0.0.1:5000/a@sha256:ab").unwrap();
        assert_eq!((r.repo.as_str(), r.object.as_str()), ("a", "sha256:ab"));
        let r = Reference::parse("localhost/a").unwrap();
        assert_eq!(r.object, "latest");
        assert!(Reference::parse("noslash").is_none());
    }

    #[test]
    fn spec_drops_network_namespace_only_for_host_network() {
        let mut o = ContainerOptions::default();
        let v = runtime_spec("c", &["true".into()], &[], "/p/c", &o);
        let has_net = |v: &Value| {
            v["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["type"] == "network")
        };
        assert!(has_net(&v));
        assert_eq!(v["linux"]["cgroupsPath"], "/p/c");
        o.host_network = true;
        assert!(!has_net(&runtime_spec(
            "c",
            &["true".into()],
            &[],
            "/p/c",
            &o
        )));
    }
}
