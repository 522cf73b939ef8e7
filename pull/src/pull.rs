//! The pull sequence: content bottom up under a lease, each layer prepared
//! (and, unless the snapshotter fetched it itself, downloaded, applied and
//! committed), the garbage-collection references, then the image record.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use containerd_client::services::v1::ApplyRequest;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use containerd_client::types::{Descriptor as PbDescriptor, Mount};
use hyperbox_api::labels;
use hyperbox_registry::digest::chain_ids;
use hyperbox_registry::{Descriptor, Resolved};
use tonic::Code;

use crate::{Error, Result, Session, rpc};

/// How long the pull's lease outlives a client that died mid-pull.
const LEASE_EXPIRY: Duration = Duration::from_secs(3600);

/// How to pull.
#[derive(Debug, Clone)]
pub struct Options {
    /// The snapshotter to unpack into (`overlayfs`, `hyperbox`, …).
    pub snapshotter: String,
    /// Send the `containerd.io/snapshot/cri.*` labels with each Prepare, as
    /// nerdctl and CRI do for remote snapshotters.
    pub remote_labels: bool,
}

/// A layer blob, as a [`LayerSource`] hands it over.
#[derive(Debug)]
pub enum Blob {
    /// In memory.
    Bytes(Vec<u8>),
    /// In a file; `keep` is dropped (removing a temporary file, say) once
    /// the blob has been written into containerd.
    File {
        /// The file.
        path: PathBuf,
        /// What keeps the file alive.
        keep: Box<dyn std::fmt::Debug + Send>,
    },
}

/// Where layer blobs come from when a layer must be unpacked by the client.
/// The blob must be verified against `layer.digest` (containerd checks it
/// again when it is written).
#[async_trait::async_trait]
pub trait LayerSource: Send + Sync {
    /// The compressed blob of `layer`.
    async fn fetch(
        &self,
        layer: &Descriptor,
    ) -> std::result::Result<Blob, Box<dyn std::error::Error + Send + Sync>>;
}

/// How a layer reached the snapshotter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerOutcome {
    /// Its snapshot already existed.
    Present,
    /// The snapshotter fetched it itself (it answered `AlreadyExists`).
    Remote,
    /// The client downloaded it and containerd applied it.
    Unpacked,
}

impl LayerOutcome {
    /// The word `hb image pull` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerOutcome::Present => "present",
            LayerOutcome::Remote => "remote",
            LayerOutcome::Unpacked => "unpacked",
        }
    }
}

/// One layer's outcome, reported as soon as it is known.
#[derive(Debug, Clone)]
pub struct LayerReport {
    /// Position, bottom first.
    pub index: usize,
    /// Compressed digest.
    pub digest: String,
    /// Compressed size.
    pub size: i64,
    /// What happened.
    pub outcome: LayerOutcome,
    /// How long it took.
    pub elapsed: Duration,
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullReport {
    /// The layers' chain ids, bottom first (the top one is the image's
    /// rootfs parent).
    pub chain_ids: Vec<String>,
    /// Every layer's outcome, bottom first.
    pub layers: Vec<LayerReport>,
}

impl PullReport {
    /// The indexes of layers the snapshotter fetched itself.
    pub fn remote(&self) -> Vec<usize> {
        self.layers
            .iter()
            .filter(|l| l.outcome == LayerOutcome::Remote)
            .map(|l| l.index)
            .collect()
    }
}

fn pb(d: &Descriptor) -> PbDescriptor {
    PbDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        annotations: d.annotations.clone(),
    }
}

/// Pulls the resolved image `img` into containerd as `name` (see the crate
/// docs), calling `on_layer` as each layer is done.
pub async fn pull(
    session: &Session,
    img: &Resolved,
    name: &str,
    opts: &Options,
    source: &dyn LayerSource,
    on_layer: &mut (dyn FnMut(&LayerReport) + Send),
) -> Result<PullReport> {
    if img.diff_ids.len() != img.layers.len() {
        return Err(Error::Image {
            reference: name.into(),
            detail: format!(
                "{} layers but {} diff_ids",
                img.layers.len(),
                img.diff_ids.len()
            ),
        });
    }
    let lease = session.create_lease("hb-pull", LEASE_EXPIRY).await?;
    let result = pull_leased(session, img, name, opts, source, on_layer, &lease).await;
    // Everything the image needs is referenced by then; the lease only
    // protected the pull itself, and lets a failed pull's leftovers go at
    // the next collection.
    let _ = session.delete_lease(&lease).await;
    result
}

async fn pull_leased(
    session: &Session,
    img: &Resolved,
    name: &str,
    opts: &Options,
    source: &dyn LayerSource,
    on_layer: &mut (dyn FnMut(&LayerReport) + Send),
    lease: &str,
) -> Result<PullReport> {
    let chains = chain_ids(&img.diff_ids);
    // Content bottom up, so a gc reference always points at content that
    // exists.
    write(
        session,
        lease,
        &img.config.digest,
        &img.config_bytes,
        HashMap::new(),
    )
    .await?;
    let mut manifest_labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_string(),
        img.config.digest.clone(),
    )]);
    for (i, l) in img.layers.iter().enumerate() {
        manifest_labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.clone(),
        );
    }
    write(
        session,
        lease,
        &img.manifest.digest,
        &img.manifest_bytes,
        manifest_labels,
    )
    .await?;
    if img.top.digest != img.manifest.digest {
        let l = HashMap::from([(
            "containerd.io/gc.ref.content.m.0".to_string(),
            img.manifest.digest.clone(),
        )]);
        write(session, lease, &img.top.digest, &img.top_bytes, l).await?;
    }

    let digests: Vec<String> = img.layers.iter().map(|l| l.digest.clone()).collect();
    let mut reports = Vec::with_capacity(img.layers.len());
    let mut parent = String::new();
    for (i, layer) in img.layers.iter().enumerate() {
        let started = Instant::now();
        let chain = &chains[i];
        session
            .lease_resource(lease, chain, &format!("snapshots/{}", opts.snapshotter))
            .await?;
        let outcome = if session.snapshot_exists(&opts.snapshotter, chain).await? {
            LayerOutcome::Present
        } else {
            let mut prepare_labels =
                HashMap::from([(labels::SNAPSHOT_REF.to_string(), chain.clone())]);
            if opts.remote_labels {
                prepare_labels.extend(labels::remote_snapshot_labels(
                    name,
                    &img.manifest.digest,
                    &digests[i..],
                ));
            }
            let key = format!("extract-{:016x}-{chain}", rand::random::<u64>());
            let mut snaps = SnapshotsClient::new(session.channel());
            let prepared = snaps
                .prepare(session.request(
                    PrepareSnapshotRequest {
                        snapshotter: opts.snapshotter.clone(),
                        key: key.clone(),
                        parent: parent.clone(),
                        labels: prepare_labels,
                    },
                    Some(lease),
                ))
                .await;
            match prepared {
                Err(s) if s.code() == Code::AlreadyExists => LayerOutcome::Remote,
                Err(s) => {
                    return Err(Error::Refused {
                        index: i,
                        digest: layer.digest.clone(),
                        message: s.message().to_string(),
                    });
                }
                Ok(resp) => {
                    let mounts = resp.into_inner().mounts;
                    let applied =
                        apply(session, source, layer, &mounts, &img.diff_ids[i], lease).await;
                    let committed = match applied {
                        Ok(()) => snaps
                            .commit(session.request(
                                CommitSnapshotRequest {
                                    snapshotter: opts.snapshotter.clone(),
                                    name: chain.clone(),
                                    key: key.clone(),
                                    labels: HashMap::new(),
                                },
                                Some(lease),
                            ))
                            .await
                            .map(drop)
                            .or_else(|s| match s.code() {
                                Code::AlreadyExists => Ok(()),
                                _ => Err(rpc("Snapshots.Commit", chain)(s)),
                            }),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = committed {
                        let _ = snaps
                            .remove(session.request(
                                RemoveSnapshotRequest {
                                    snapshotter: opts.snapshotter.clone(),
                                    key,
                                },
                                None,
                            ))
                            .await;
                        return Err(e);
                    }
                    LayerOutcome::Unpacked
                }
            }
        };
        let report = LayerReport {
            index: i,
            digest: layer.digest.clone(),
            size: layer.size,
            outcome,
            elapsed: started.elapsed(),
        };
        on_layer(&report);
        reports.push(report);
        parent = chain.clone();
    }
    // The config references the top snapshot, so the collector keeps the
    // chain while the image exists; labelled last, once it exists.
    if let Some(top) = chains.last() {
        let l = HashMap::from([(
            format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter),
            top.clone(),
        )]);
        session.label_content(&img.config.digest, l).await?;
    }
    session.put_image(name, &pb(&img.top)).await?;
    Ok(PullReport {
        chain_ids: chains,
        layers: reports,
    })
}

async fn write(
    session: &Session,
    lease: &str,
    digest: &str,
    data: &[u8],
    labels: HashMap<String, String>,
) -> Result<()> {
    session.lease_resource(lease, digest, "content").await?;
    session
        .write_content(digest, data, labels, Some(lease))
        .await
}

/// The ordinary path for one layer: its blob into the content store, then
/// applied onto `mounts` by containerd's Diff service, whose digest of what
/// it unpacked must be the config's diff id.
async fn apply(
    session: &Session,
    source: &dyn LayerSource,
    layer: &Descriptor,
    mounts: &[Mount],
    diff_id: &str,
    lease: &str,
) -> Result<()> {
    session
        .lease_resource(lease, &layer.digest, "content")
        .await?;
    if !session.content_exists(&layer.digest).await? {
        let labels = HashMap::from([(
            "containerd.io/uncompressed".to_string(),
            diff_id.to_string(),
        )]);
        match source.fetch(layer).await.map_err(Error::Fetch)? {
            Blob::Bytes(b) => {
                session
                    .write_content(&layer.digest, &b, labels, Some(lease))
                    .await?
            }
            Blob::File { path, keep } => {
                let written = session
                    .write_content_file(&layer.digest, &path, labels, Some(lease))
                    .await;
                drop(keep);
                written?
            }
        }
    }
    let applied = DiffClient::new(session.channel())
        .apply(session.request(
            ApplyRequest {
                diff: Some(pb(layer)),
                mounts: mounts.to_vec(),
                payloads: HashMap::new(),
                sync_fs: false,
            },
            Some(lease),
        ))
        .await
        .map_err(rpc("Diff.Apply", &layer.digest))?
        .into_inner()
        .applied
        .map(|d| d.digest)
        .unwrap_or_default();
    if applied != diff_id {
        return Err(Error::DiffIdMismatch {
            digest: layer.digest.clone(),
            applied,
            diff_id: diff_id.into(),
        });
    }
    Ok(())
}
