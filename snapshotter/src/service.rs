//! containerd's `Snapshots` gRPC service over [`Snapshotter`] and the
//! remote path ([`Puller`]): request and reply conversion, blocking work
//! moved off the async threads, and the one mapping from domain errors to
//! the gRPC codes containerd turns back into its errdefs (NotFound,
//! AlreadyExists, FailedPrecondition, InvalidArgument, Unavailable).

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

use crate::mounts::Mount;
use crate::proto::snapshots_server::Snapshots;
use crate::pull::{self, LayerLabels, Pulled, Puller};
use crate::remote;
use crate::snapshots::{self, Info, Snapshotter};
use crate::store::Kind;

/// Infos per List reply message (containerd streams them in batches).
const LIST_BATCH: usize = 100;

/// What a call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A snapshot operation failed (or the request was malformed).
    #[error(transparent)]
    Snapshot(#[from] snapshots::Error),
    /// Serving a layer from its registry failed.
    #[error(transparent)]
    Pull(#[from] pull::Error),
    /// A blocking snapshot operation died.
    #[error("snapshot operation did not finish")]
    Task {
        /// The cause (a panic).
        #[source]
        source: tokio::task::JoinError,
    },
}

/// The one mapping from domain errors to gRPC codes.
impl From<Error> for Status {
    fn from(e: Error) -> Status {
        use snapshots::Error as S;
        let snapshot = |s: &S| match s {
            S::NotFound { .. } => Code::NotFound,
            S::AlreadyExists { .. } => Code::AlreadyExists,
            S::FailedPrecondition { .. } => Code::FailedPrecondition,
            S::InvalidArgument { .. } | S::Filter(_) => Code::InvalidArgument,
            S::Store { .. } | S::Io { .. } => Code::Internal,
        };
        let code = match &e {
            Error::Snapshot(s) | Error::Pull(pull::Error::Snapshot(s)) => snapshot(s),
            // The kernel could not read the layer: the layer, not the call,
            // is at fault, and a retry after the cause is fixed can work.
            Error::Pull(pull::Error::LazyRead { .. } | pull::Error::Unverified { .. }) => {
                Code::FailedPrecondition
            }
            Error::Pull(pull::Error::Fetch(f)) => match &**f {
                remote::Error::Registry { source, .. } if source.is_unreachable() => {
                    Code::Unavailable
                }
                remote::Error::Io { .. } => Code::Internal,
                // Bad content, refused credentials, malformed labels.
                _ => Code::FailedPrecondition,
            },
            Error::Pull(pull::Error::Prune { .. } | pull::Error::Task { .. })
            | Error::Task { .. } => Code::Internal,
        };
        // The whole chain: containerd shows only this message to the user.
        let msg = hyperbox_api::error_chain(&e);
        if code == Code::Internal {
            tracing::error!(error = %msg, "snapshot operation failed");
        }
        Status::new(code, msg)
    }
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct Service {
    sn: Arc<Snapshotter>,
    puller: Option<Arc<Puller>>,
}

impl Service {
    /// Serves `sn`; labelled Prepares go through `puller` when given.
    pub fn new(sn: Arc<Snapshotter>, puller: Option<Arc<Puller>>) -> Self {
        Service { sn, puller }
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Snapshotter) -> Result<T, snapshots::Error> + Send + 'static,
    ) -> Result<T, Status> {
        let sn = self.sn.clone();
        let r = tokio::task::spawn_blocking(move || f(&sn))
            .await
            .map_err(|source| Error::Task { source })?;
        Ok(r.map_err(Error::from)?)
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
        let labels = labels(r.labels);
        if let Some(puller) = &self.puller
            && let Some(layer) = LayerLabels::parse(&labels)
        {
            match puller
                .prepare(&layer, &r.parent, labels.clone())
                .await
                .map_err(Error::from)?
            {
                // containerd's metadata layer then Stats the target and
                // records it; its unpacker skips download and apply.
                Pulled::Target(key) => {
                    return Err(Error::from(snapshots::Error::AlreadyExists { key }).into());
                }
                Pulled::Local => {}
            }
        }
        let mounts = self
            .run(move |s| s.prepare(&r.key, &r.parent, labels))
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
        let info = r.info.ok_or_else(|| {
            Error::from(snapshots::Error::InvalidArgument {
                what: "update without info".into(),
            })
        })?;
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
        if let Some(puller) = &self.puller {
            puller.cleanup().await.map_err(Error::from)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> (tempfile::TempDir, Service) {
        let d = tempfile::tempdir().unwrap();
        let sn = Snapshotter::open(d.path()).unwrap();
        (d, Service::new(Arc::new(sn), None))
    }

    async fn stat(svc: &Service, key: &str) -> PbInfo {
        svc.stat(Request::new(StatSnapshotRequest {
            snapshotter: "hyperbox".into(),
            key: key.into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap()
    }

    #[tokio::test]
    async fn update_reply_is_what_stat_returns_on_the_wire() {
        let (_d, svc) = service();
        svc.prepare(Request::new(PrepareSnapshotRequest {
            snapshotter: "hyperbox".into(),
            key: "k".into(),
            parent: String::new(),
            labels: HashMap::from([("a".into(), "1".into())]),
        }))
        .await
        .unwrap();
        let before = stat(&svc, "k").await;
        let replied = svc
            .update(Request::new(UpdateSnapshotRequest {
                snapshotter: "hyperbox".into(),
                info: Some(PbInfo {
                    name: "k".into(),
                    labels: HashMap::from([("b".into(), "2".into())]),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["labels.b".into()],
                }),
            }))
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(replied, stat(&svc, "k").await);
        assert_eq!(replied.labels.len(), 2, "{replied:?}");
        assert_eq!(replied.created_at, before.created_at);
        let missing = svc
            .update(Request::new(UpdateSnapshotRequest {
                snapshotter: "hyperbox".into(),
                info: None,
                update_mask: None,
            }))
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::InvalidArgument);
    }

    #[test]
    fn domain_errors_map_to_containerd_codes_with_their_whole_chain() {
        let io = || std::io::Error::from_raw_os_error(libc::EIO);
        let status = |e: Error| Status::from(e);
        let s = status(Error::Snapshot(snapshots::Error::AlreadyExists {
            key: "sha256:chain".into(),
        }));
        assert_eq!(s.code(), Code::AlreadyExists);
        let s = status(Error::Pull(pull::Error::Snapshot(
            snapshots::Error::NotFound {
                key: "parent".into(),
            },
        )));
        assert_eq!(s.code(), Code::NotFound);
        let s = status(Error::Pull(pull::Error::LazyRead {
            layer: "sha256:l".into(),
            why: "chunk 3 of sha256:e: content does not match the index".into(),
            source: snapshots::Error::Io {
                action: "mount EROFS image",
                path: "/x/layer.erofs".into(),
                source: io(),
            },
        }));
        assert_eq!(s.code(), Code::FailedPrecondition);
        for part in [
            "sha256:l",
            "does not match the index",
            "/x/layer.erofs",
            "Input/output error",
        ] {
            assert!(s.message().contains(part), "{part}: {}", s.message());
        }
        let fetch = |e: remote::Error| status(Error::Pull(pull::Error::Fetch(Arc::new(e))));
        let unreachable = fetch(remote::Error::Registry {
            digest: "sha256:l".into(),
            image: "127.0.0.1:9/x:1".into(),
            source: hyperbox_registry::Error::Transport {
                url: "http://127.0.0.1:9/v2/x/blobs/sha256:l".into(),
                detail: "connection refused".into(),
            },
        });
        assert_eq!(unreachable.code(), Code::Unavailable);
        assert!(
            unreachable
                .message()
                .starts_with("fetch layer sha256:l of 127.0.0.1:9/x:1: ")
                && unreachable.message().contains("connection refused"),
            "the fetch error is passed on whole: {}",
            unreachable.message()
        );
        let disk = fetch(remote::Error::Io {
            action: "create",
            path: "/root/layers".into(),
            source: io(),
        });
        assert_eq!(disk.code(), Code::Internal);
        let label = fetch(remote::Error::Label {
            what: "label cri.layer-digest: bad".into(),
        });
        assert_eq!(label.code(), Code::FailedPrecondition);
    }
}
