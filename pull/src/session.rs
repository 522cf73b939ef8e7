//! A containerd connection in one namespace and the calls a pull makes.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::snapshots::StatSnapshotRequest;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::{
    AddResourceRequest, CreateImageRequest, CreateRequest as CreateLeaseRequest,
    DeleteRequest as DeleteLeaseRequest, Image, InfoRequest, Resource, UpdateImageRequest,
    UpdateRequest as UpdateContentRequest, WriteAction, WriteContentRequest,
    content_client::ContentClient, images_client::ImagesClient, leases_client::LeasesClient,
};
use containerd_client::types::Descriptor;
use futures::StreamExt;
use hyperbox_api::labels::GC_EXPIRE;
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::{Error, Result, rpc};

/// Bytes per `Content.Write` message.
const WRITE_CHUNK: usize = 1 << 20;

/// A containerd connection whose requests go to one namespace.
#[derive(Debug, Clone)]
pub struct Session {
    channel: Channel,
    namespace: String,
}

impl Session {
    /// Requests over `channel` in `namespace`.
    pub fn new(channel: Channel, namespace: &str) -> Session {
        Session {
            channel,
            namespace: namespace.into(),
        }
    }

    /// The gRPC channel.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The namespace requests go to.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// `msg` with containerd's namespace header and, when given, the lease
    /// that keeps what the request creates from the garbage collector.
    pub fn request<T>(&self, msg: T, lease: Option<&str>) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        if let Ok(v) = self.namespace.parse() {
            md.insert("containerd-namespace", v);
        }
        if let Some(l) = lease
            && let Ok(v) = l.parse()
        {
            md.insert("containerd-lease", v);
        }
        r
    }

    /// Creates a lease with id `prefix-<random>` that containerd expires
    /// after `expire_in`, so a crashed client leaves nothing for ever.
    pub async fn create_lease(&self, prefix: &str, expire_in: Duration) -> Result<String> {
        let id = format!("{prefix}-{:016x}", rand::random::<u64>());
        let expire = hyperbox_api::time::unix_secs(SystemTime::now() + expire_in);
        let labels = HashMap::from([(GC_EXPIRE.to_string(), hyperbox_api::time::rfc3339(expire))]);
        LeasesClient::new(self.channel())
            .create(self.request(
                CreateLeaseRequest {
                    id: id.clone(),
                    labels,
                },
                None,
            ))
            .await
            .map_err(rpc("Leases.Create", &id))?;
        Ok(id)
    }

    /// Deletes a lease; what only it referenced goes at the next collection.
    pub async fn delete_lease(&self, id: &str) -> Result<()> {
        LeasesClient::new(self.channel())
            .delete(self.request(
                DeleteLeaseRequest {
                    id: id.into(),
                    sync: false,
                },
                None,
            ))
            .await
            .map(drop)
            .map_err(rpc("Leases.Delete", id))
    }

    /// Puts an object that may already exist under `lease`, so the garbage
    /// collector cannot take it between a check and its use (it may be left
    /// over from a failed pull whose lease is gone).
    pub async fn lease_resource(&self, lease: &str, id: &str, kind: &str) -> Result<()> {
        LeasesClient::new(self.channel())
            .add_resource(self.request(
                AddResourceRequest {
                    id: lease.into(),
                    resource: Some(Resource {
                        id: id.into(),
                        r#type: kind.into(),
                    }),
                },
                None,
            ))
            .await
            .map(drop)
            .map_err(rpc("Leases.AddResource", id))
    }

    /// Whether the content store holds `digest`.
    pub async fn content_exists(&self, digest: &str) -> Result<bool> {
        match ContentClient::new(self.channel())
            .info(self.request(
                InfoRequest {
                    digest: digest.into(),
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(rpc("Content.Info", digest)(s)),
        }
    }

    /// Writes `data` as content `digest` with `labels` (containerd checks
    /// the digest itself); labels content that is already there.
    pub async fn write_content(
        &self,
        digest: &str,
        data: &[u8],
        labels: HashMap<String, String>,
        lease: Option<&str>,
    ) -> Result<()> {
        if self.content_exists(digest).await? {
            return self.label_content(digest, labels).await;
        }
        let r#ref = write_ref(digest);
        let total = data.len() as i64;
        let mut msgs: Vec<WriteContentRequest> = data
            .chunks(WRITE_CHUNK)
            .enumerate()
            .map(|(i, c)| write_msg(&r#ref, digest, total, (i * WRITE_CHUNK) as i64, c.to_vec()))
            .collect();
        msgs.push(commit_msg(&r#ref, digest, total, labels));
        self.send_write(digest, futures::stream::iter(msgs), lease)
            .await
    }

    /// Streams the file at `path` into content `digest` with `labels`,
    /// reading it in chunks on demand so a large layer is never in memory.
    pub async fn write_content_file(
        &self,
        digest: &str,
        path: &Path,
        labels: HashMap<String, String>,
        lease: Option<&str>,
    ) -> Result<()> {
        let io = |source| Error::Io {
            path: path.into(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(io)?;
        let total = f.metadata().map_err(io)?.len() as i64;
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
        let (r#ref, expected) = (write_ref(digest), digest.to_string());
        let mut labels = Some(labels);
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut offset = 0i64;
            let mut buf = vec![0u8; WRITE_CHUNK];
            loop {
                let n = f.read(&mut buf)?;
                let msg = if n == 0 {
                    commit_msg(&r#ref, &expected, total, labels.take().unwrap_or_default())
                } else {
                    write_msg(&r#ref, &expected, total, offset, buf[..n].to_vec())
                };
                offset += n as i64;
                // A closed channel means the write call failed: its error
                // is the one to report.
                if tx.blocking_send(msg).is_err() || n == 0 {
                    return Ok(());
                }
            }
        });
        let sent = self
            .send_write(
                digest,
                tokio_stream::wrappers::ReceiverStream::new(rx),
                lease,
            )
            .await;
        match reader.await {
            Ok(Err(e)) => return Err(io(e)),
            Err(e) => return Err(io(std::io::Error::other(e))),
            Ok(Ok(())) => {}
        }
        sent
    }

    async fn send_write<S>(&self, digest: &str, msgs: S, lease: Option<&str>) -> Result<()>
    where
        S: futures::Stream<Item = WriteContentRequest> + Send + 'static,
    {
        let resp = ContentClient::new(self.channel())
            .write(self.request(msgs, lease))
            .await;
        let mut stream = match resp {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == Code::AlreadyExists => return Ok(()),
            Err(s) => return Err(rpc("Content.Write", digest)(s)),
        };
        while let Some(m) = stream.next().await {
            match m {
                Ok(_) => {}
                Err(s) if s.code() == Code::AlreadyExists => return Ok(()),
                Err(s) => return Err(rpc("Content.Write", digest)(s)),
            }
        }
        Ok(())
    }

    /// Sets `labels` on content `digest` (others are kept).
    pub async fn label_content(&self, digest: &str, labels: HashMap<String, String>) -> Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        ContentClient::new(self.channel())
            .update(self.request(
                UpdateContentRequest {
                    info: Some(containerd_client::services::v1::Info {
                        digest: digest.into(),
                        labels,
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                },
                None,
            ))
            .await
            .map(drop)
            .map_err(rpc("Content.Update", digest))
    }

    /// Records image `name` pointing at `target`, replacing an older record.
    pub async fn put_image(&self, name: &str, target: &Descriptor) -> Result<()> {
        let image = Image {
            name: name.into(),
            target: Some(target.clone()),
            ..Default::default()
        };
        let mut images = ImagesClient::new(self.channel());
        match images
            .create(self.request(
                CreateImageRequest {
                    image: Some(image.clone()),
                    source_date_epoch: None,
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => images
                .update(self.request(
                    UpdateImageRequest {
                        image: Some(image),
                        update_mask: None,
                        source_date_epoch: None,
                    },
                    None,
                ))
                .await
                .map(drop)
                .map_err(rpc("Images.Update", name)),
            Err(s) => Err(rpc("Images.Create", name)(s)),
        }
    }

    /// Whether `snapshotter` has a snapshot named `key`.
    pub async fn snapshot_exists(&self, snapshotter: &str, key: &str) -> Result<bool> {
        match SnapshotsClient::new(self.channel())
            .stat(self.request(
                StatSnapshotRequest {
                    snapshotter: snapshotter.into(),
                    key: key.into(),
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(rpc("Snapshots.Stat", key)(s)),
        }
    }
}

/// A write reference unique to this attempt: containerd locks a ref while a
/// write is open, and two pulls of one blob must not collide.
fn write_ref(digest: &str) -> String {
    format!(
        "hb-{}-{:08x}",
        digest.replace(':', "-"),
        rand::random::<u32>()
    )
}

fn write_msg(
    r#ref: &str,
    digest: &str,
    total: i64,
    offset: i64,
    data: Vec<u8>,
) -> WriteContentRequest {
    WriteContentRequest {
        action: WriteAction::Write as i32,
        r#ref: r#ref.into(),
        total,
        expected: digest.into(),
        offset,
        data,
        labels: HashMap::new(),
    }
}

fn commit_msg(
    r#ref: &str,
    digest: &str,
    total: i64,
    labels: HashMap<String, String>,
) -> WriteContentRequest {
    WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: r#ref.into(),
        total,
        expected: digest.into(),
        offset: total,
        data: Vec::new(),
        labels,
    }
}
