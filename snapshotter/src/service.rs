//! containerd's `Snapshots` gRPC service over [`Snapshotter`]: request and
//! reply conversion, blocking work moved off the async threads, and the one
//! mapping from domain errors to gRPC codes containerd turns back into its
//! errdefs (NotFound, AlreadyExists, FailedPrecondition, InvalidArgument).

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use containerd_client::services::v1::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info as PbInfo, Kind as PbKind, ListSnapshotsRequest,
    ListSnapshotsResponse, MountsRequest, MountsResponse, PrepareSnapshotRequest,
    PrepareSnapshotResponse, RemoveSnapshotRequest, StatSnapshotRequest, StatSnapshotResponse,
    UpdateSnapshotRequest, UpdateSnapshotResponse, UsageRequest, UsageResponse,
    ViewSnapshotRequest, ViewSnapshotResponse,
};
use containerd_client::types::Mount as PbMount;
use futures::Stream;
use tonic::{Code, Request, Response, Status};

use crate::lazy::Lazy;
use crate::mounts::Mount;
use crate::proto::snapshots_server::Snapshots;
use crate::remote::{Error as RemoteError, Remote};
use crate::snapshots::{Error, Info, Snapshotter};
use crate::store::Kind;

/// Infos per List reply message (containerd streams them in batches).
const LIST_BATCH: usize = 100;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match &e {
            Error::NotFound { .. } => Code::NotFound,
            Error::AlreadyExists { .. } => Code::AlreadyExists,
            Error::FailedPrecondition { .. } => Code::FailedPrecondition,
            Error::InvalidArgument { .. } | Error::Filter(_) => Code::InvalidArgument,
            Error::Store { .. } | Error::Io { .. } => Code::Internal,
        };
        // The whole chain: containerd shows only this message to the user.
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        if code == Code::Internal {
            tracing::error!(error = %msg, "snapshot operation failed");
        }
        Status::new(code, msg)
    }
}

/// The target name of a Prepare made to unpack a layer.
const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// The image a layer belongs to (CRI and nerdctl send these).
const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The layer's blob digest.
const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// The image's manifest digest (finds its hyperbox index).
const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// This and the image's upper layers, comma-separated (capped at 4 KiB).
const CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// Converted layers younger than this survive Cleanup: a prefetch may have
/// made one for a Prepare still on its way.
const PREFETCH_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// How the remote path behaves.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// The fetcher.
    pub remote: Arc<Remote>,
    /// Hand registry failures back to containerd (local unpack).
    pub fallback_to_local: bool,
    /// Fetch `cri.image-layers` ahead.
    pub prefetch: bool,
    /// The lazy path, where the kernel allows it.
    pub lazy: Option<Arc<Lazy>>,
    /// Whether new layers may take the lazy path (`snapshotter.lazy`);
    /// layers already on it are served either way.
    pub lazy_new: bool,
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct Service {
    sn: Arc<Snapshotter>,
    remote: Option<RemoteOptions>,
}

/// What the remote path made of a labelled Prepare.
enum Served {
    /// The target exists now: answer AlreadyExists.
    Target(String),
    /// Let containerd fetch and unpack (registry trouble, fallback on).
    Local,
}

impl Service {
    /// Serves `sn`; labelled Prepares go through `remote` when given.
    pub fn new(sn: Arc<Snapshotter>, remote: Option<RemoteOptions>) -> Self {
        Service { sn, remote }
    }

    async fn prepare_remote(
        &self,
        opts: &RemoteOptions,
        r: &PrepareSnapshotRequest,
        target: &str,
        image: &str,
        layer: &str,
    ) -> Result<Served, Status> {
        let t = target.to_string();
        if self
            .run(move |s| match s.stat(&t) {
                Ok(_) => Ok(true),
                Err(Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(e),
            })
            .await?
        {
            return Ok(Served::Target(target.into()));
        }
        let started = std::time::Instant::now();
        if let (Some(lazy), Some(manifest)) = (&opts.lazy, r.labels.get(CRI_MANIFEST_DIGEST))
            && (opts.lazy_new || lazy.knows(layer))
        {
            match lazy.prepare(image, manifest, layer).await {
                Ok(Some(path)) => {
                    let (t, parent, digest) =
                        (target.to_string(), r.parent.clone(), layer.to_string());
                    let labels = labels(r.labels.clone());
                    match self
                        .run(move |s| s.commit_layer(&t, &parent, labels, &path, &digest))
                        .await
                    {
                        Ok(()) => {}
                        Err(s) if s.code() == Code::AlreadyExists => {}
                        Err(s) => {
                            // The kernel saw EIO; say why.
                            let why = lazy.last_error(layer);
                            lazy.forget(layer);
                            return Err(match why {
                                Some(w) => Status::new(
                                    Code::FailedPrecondition,
                                    format!("{}: lazy fetch: {w}", s.message()),
                                ),
                                None => s,
                            });
                        }
                    }
                    tracing::info!(
                        target,
                        layer,
                        ms = started.elapsed().as_millis() as u64,
                        "layer mounted lazily from the image's hyperbox index"
                    );
                    return Ok(Served::Target(target.into()));
                }
                Ok(None) => {}
                Err(e) => {
                    // Nothing of it was served; the whole layer, verified
                    // against the image's own digest, replaces it.
                    tracing::warn!(layer, error = %crate::error_chain(&e), "lazy path failed; fetching the layer whole");
                    lazy.forget(layer);
                }
            }
        }
        if opts.prefetch
            && let Some(all) = r.labels.get(CRI_IMAGE_LAYERS)
        {
            let others: Vec<String> = all
                .split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty() && *d != layer)
                .map(String::from)
                .collect();
            opts.remote.prefetch(image, &others);
        }
        let path = match opts.remote.ensure(image, layer).await {
            Ok(p) => p,
            Err(e) if opts.fallback_to_local && e.may_fall_back() => {
                tracing::warn!(
                    layer, image, error = %crate::error_chain(&*e),
                    "cannot fetch the layer; containerd will fetch and unpack it"
                );
                return Ok(Served::Local);
            }
            Err(e) => {
                let code = match &*e {
                    RemoteError::Registry { source, .. } if source.is_unreachable() => {
                        Code::Unavailable
                    }
                    RemoteError::Io { .. } => Code::Internal,
                    _ => Code::FailedPrecondition,
                };
                let msg = crate::error_chain(&*e);
                tracing::error!(layer, image, error = %msg, "layer refused");
                return Err(Status::new(code, msg));
            }
        };
        let (t, parent, digest) = (target.to_string(), r.parent.clone(), layer.to_string());
        let labels = labels(r.labels.clone());
        let committed = self
            .run(move |s| s.commit_layer(&t, &parent, labels, &path, &digest))
            .await;
        match committed {
            Ok(()) => {}
            // Another pull of an image with this layer got there first.
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => return Err(s),
        }
        tracing::info!(
            target,
            layer,
            ms = started.elapsed().as_millis() as u64,
            "layer served from the registry as EROFS"
        );
        Ok(Served::Target(target.into()))
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Snapshotter) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Status> {
        let sn = self.sn.clone();
        tokio::task::spawn_blocking(move || f(&sn))
            .await
            .map_err(|e| Status::internal(format!("snapshot operation panicked: {e}")))?
            .map_err(Status::from)
    }
}

fn labels(m: HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn pb_mounts(ms: Vec<Mount>) -> Vec<PbMount> {
    ms.into_iter()
        .map(|m| PbMount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn timestamp(nanos: i128) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: nanos.div_euclid(1_000_000_000) as i64,
        nanos: nanos.rem_euclid(1_000_000_000) as i32,
    }
}

fn pb_info(i: Info) -> PbInfo {
    PbInfo {
        name: i.name,
        parent: i.parent,
        kind: match i.kind {
            Kind::View => PbKind::View,
            Kind::Active => PbKind::Active,
            Kind::Committed => PbKind::Committed,
        } as i32,
        created_at: Some(timestamp(i.created)),
        updated_at: Some(timestamp(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Service {
    #[tracing::instrument(skip_all, fields(key = %req.get_ref().key, parent = %req.get_ref().parent))]
    async fn prepare(
        &self,
        req: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        if let Some(opts) = &self.remote
            && let (Some(target), Some(image), Some(layer)) = (
                r.labels.get(SNAPSHOT_REF),
                r.labels.get(CRI_IMAGE_REF),
                r.labels.get(CRI_LAYER_DIGEST),
            )
        {
            match self.prepare_remote(opts, &r, target, image, layer).await? {
                // containerd's metadata layer then Stats the target and
                // records it; its unpacker skips download and apply.
                Served::Target(t) => {
                    return Err(Status::already_exists(format!(
                        "target snapshot {t:?} already exists"
                    )));
                }
                Served::Local => {}
            }
        }
        let mounts = self
            .run(move |s| s.prepare(&r.key, &r.parent, labels(r.labels)))
            .await?;
        Ok(Response::new(PrepareSnapshotResponse {
            mounts: pb_mounts(mounts),
        }))
    }

    #[tracing::instrument(skip_all, fields(key = %req.get_ref().key, parent = %req.get_ref().parent))]
    async fn view(
        &self,
        req: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let mounts = self
            .run(move |s| s.view(&r.key, &r.parent, labels(r.labels)))
            .await?;
        Ok(Response::new(ViewSnapshotResponse {
            mounts: pb_mounts(mounts),
        }))
    }

    async fn mounts(
        &self,
        req: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        let r = req.into_inner();
        let mounts = self.run(move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(MountsResponse {
            mounts: pb_mounts(mounts),
        }))
    }

    #[tracing::instrument(skip_all, fields(key = %req.get_ref().key, name = %req.get_ref().name))]
    async fn commit(&self, req: Request<CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.run(move |s| s.commit(&r.name, &r.key, labels(r.labels)))
            .await?;
        Ok(Response::new(()))
    }

    #[tracing::instrument(skip_all, fields(key = %req.get_ref().key))]
    async fn remove(&self, req: Request<RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.run(move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        let info = self.run(move |s| s.stat(&r.key)).await?;
        Ok(Response::new(StatSnapshotResponse {
            info: Some(pb_info(info)),
        }))
    }

    async fn update(
        &self,
        req: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let wanted = Info {
            name: info.name,
            parent: info.parent,
            kind: Kind::Active,
            labels: labels(info.labels),
            created: 0,
            updated: 0,
        };
        let updated = self.run(move |s| s.update(&wanted, &paths)).await?;
        Ok(Response::new(UpdateSnapshotResponse {
            info: Some(pb_info(updated)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = req.into_inner();
        let infos = self.run(move |s| s.walk(&r.filters)).await?;
        let batches: Vec<Result<ListSnapshotsResponse, Status>> = infos
            .chunks(LIST_BATCH)
            .map(|c| {
                Ok(ListSnapshotsResponse {
                    info: c.iter().cloned().map(pb_info).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(&self, req: Request<UsageRequest>) -> Result<Response<UsageResponse>, Status> {
        let r = req.into_inner();
        let u = self.run(move |s| s.usage(&r.key)).await?;
        Ok(Response::new(UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn cleanup(&self, _req: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        let report = self.run(|s| s.cleanup()).await?;
        if let Some(opts) = &self.remote {
            if let Some(lazy) = &opts.lazy {
                let lazy = lazy.clone();
                let pruned = tokio::task::spawn_blocking(move || lazy.prune())
                    .await
                    .map_err(|e| Status::internal(format!("prune panicked: {e}")))?;
                if !pruned.is_empty() {
                    tracing::info!(removed = pruned.len(), "cleanup removed unused lazy layers");
                }
            }
            let remote = opts.remote.clone();
            let pruned = tokio::task::spawn_blocking(move || remote.prune(PREFETCH_GRACE))
                .await
                .map_err(|e| Status::internal(format!("prune panicked: {e}")))?
                .map_err(|e| Status::internal(crate::error_chain(&e)))?;
            if !pruned.is_empty() {
                tracing::info!(
                    removed = pruned.len(),
                    "cleanup removed unused layer images"
                );
            }
        }
        if !report.removed.is_empty() {
            tracing::info!(
                removed = report.removed.len(),
                "cleanup removed orphaned directories"
            );
        }
        Ok(Response::new(()))
    }
}
