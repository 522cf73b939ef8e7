//! `hb image pull REF`: pull through containerd with the labels nerdctl and
//! CRI send, so hyperbox-snapshotter fetches each layer itself (the remote
//! path) and containerd only records the image.
//!
//! The steps are containerd's client-side pull: resolve with our registry
//! client (same hosts.toml and credentials as the snapshotter), write the
//! manifest and config into containerd's content store under a lease,
//! Prepare each layer with `containerd.io/snapshot.ref` and the
//! `cri.*` labels, and record the image. A snapshotter that answers a
//! Prepare with mounts instead of AlreadyExists (overlayfs, or hyperbox
//! falling back) gets the layer the ordinary way: downloaded, verified,
//! applied through containerd's Diff service, committed.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, CreateRequest as CreateLeaseRequest,
    DeleteRequest as DeleteLeaseRequest, Image, InfoRequest, UpdateImageRequest,
    UpdateRequest as UpdateContentRequest, WriteAction, WriteContentRequest,
    content_client::ContentClient, diff_client::DiffClient, images_client::ImagesClient,
    leases_client::LeasesClient,
};
use containerd_client::types::Descriptor as PbDescriptor;
use futures::StreamExt;
use hyperbox_registry::digest::Digest;
use hyperbox_registry::{Descriptor, Reference, Registry};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;
use tonic::{Code, Request};

/// Bytes per Content.Write message.
const WRITE_CHUNK: usize = 1 << 20;
/// containerd's limit for one label; `cri.image-layers` is cut to fit.
const MAX_LABEL: usize = 4096;

/// Options of `hb image pull`.
#[derive(Debug, Clone)]
pub struct PullArgs {
    /// Image reference.
    pub reference: String,
    /// containerd's socket.
    pub address: PathBuf,
    /// containerd namespace.
    pub namespace: String,
    /// Snapshotter to unpack into.
    pub snapshotter: String,
    /// JSON lines instead of a table.
    pub json: bool,
}

/// One layer's outcome.
#[derive(Debug, Serialize)]
struct LayerEvent<'a> {
    event: &'static str,
    index: usize,
    digest: &'a str,
    size: i64,
    /// `remote` (fetched by the snapshotter), `present` (already there) or
    /// `unpacked` (downloaded and applied by hb through containerd).
    how: &'static str,
    ms: u64,
}

#[derive(Debug, Serialize)]
struct Done<'a> {
    event: &'static str,
    image: &'a str,
    digest: &'a str,
    snapshotter: &'a str,
    layers: usize,
    remote: usize,
    ms: u64,
}

struct Ctd {
    channel: Channel,
    namespace: String,
    lease: Option<String>,
}

impl Ctd {
    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        if let Ok(v) = self.namespace.parse() {
            md.insert("containerd-namespace", v);
        }
        if let Some(l) = &self.lease
            && let Ok(v) = l.parse()
        {
            md.insert("containerd-lease", v);
        }
        r
    }
}

fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to a civil date (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// containerd's chain ids: `chain[0] = diff[0]`,
/// `chain[i] = sha256(chain[i-1] + " " + diff[i])`.
fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(p) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{p} {d}").as_bytes()))
            ),
        };
        out.push(next);
    }
    out
}

fn remote_labels(name: &str, manifest: &str, from_here: &[Descriptor]) -> HashMap<String, String> {
    let mut l = HashMap::new();
    l.insert("containerd.io/snapshot/cri.image-ref".into(), name.into());
    l.insert(
        "containerd.io/snapshot/cri.manifest-digest".into(),
        manifest.into(),
    );
    l.insert(
        "containerd.io/snapshot/cri.layer-digest".into(),
        from_here[0].digest.clone(),
    );
    let key = "containerd.io/snapshot/cri.image-layers";
    let mut all = String::new();
    for d in from_here {
        if key.len() + all.len() + d.digest.len() + 1 > MAX_LABEL {
            break;
        }
        if !all.is_empty() {
            all.push(',');
        }
        all.push_str(&d.digest);
    }
    l.insert(key.into(), all);
    l
}

fn pb_desc(d: &Descriptor) -> PbDescriptor {
    PbDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        annotations: HashMap::new(),
    }
}

/// Pulls `args.reference` into containerd; see the module comment.
pub async fn pull(config: &hyperbox_config::Config, args: &PullArgs) -> Result<()> {
    let started = Instant::now();
    let r = Reference::parse(&args.reference)?;
    let name = r.to_string();
    let registry = Registry::new(&config.registry).context("registry settings")?;
    let resolved = registry
        .resolve(&r)
        .await
        .with_context(|| format!("resolve {name}"))?;
    let channel = containerd_client::connect(&args.address)
        .await
        .with_context(|| {
            format!(
                "connect to containerd at {} (is it running?)",
                args.address.display()
            )
        })?;
    let mut ctd = Ctd {
        channel,
        namespace: args.namespace.clone(),
        lease: None,
    };
    let lease = format!("hb-pull-{:016x}", rand::random::<u64>());
    let mut labels = HashMap::new();
    labels.insert(
        "containerd.io/gc.expire".to_string(),
        rfc3339(SystemTime::now() + Duration::from_secs(3600)),
    );
    LeasesClient::new(ctd.channel.clone())
        .create(ctd.req(CreateLeaseRequest {
            id: lease.clone(),
            labels,
        }))
        .await
        .context("containerd Leases.Create")?;
    ctd.lease = Some(lease.clone());
    let result = pull_leased(&ctd, &registry, &resolved, &name, args, started).await;
    // The image references everything now; a failed pull's leftovers go
    // with the lease at the next collection.
    ctd.lease = None;
    let _ = LeasesClient::new(ctd.channel.clone())
        .delete(ctd.req(DeleteLeaseRequest {
            id: lease,
            sync: false,
        }))
        .await;
    result
}

async fn pull_leased(
    ctd: &Ctd,
    registry: &Registry,
    img: &hyperbox_registry::Resolved,
    name: &str,
    args: &PullArgs,
    started: Instant,
) -> Result<()> {
    let chains = chain_ids(&img.diff_ids);
    write_bytes(ctd, &img.config.digest, &img.config_bytes, HashMap::new()).await?;
    let mut m_labels = HashMap::new();
    m_labels.insert(
        "containerd.io/gc.ref.content.config".to_string(),
        img.config.digest.clone(),
    );
    for (i, l) in img.layers.iter().enumerate() {
        m_labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.clone(),
        );
    }
    write_bytes(ctd, &img.manifest.digest, &img.manifest_bytes, m_labels).await?;
    if img.top.digest != img.manifest.digest {
        let mut l = HashMap::new();
        l.insert(
            "containerd.io/gc.ref.content.m.0".to_string(),
            img.manifest.digest.clone(),
        );
        write_bytes(ctd, &img.top.digest, &img.top_bytes, l).await?;
    }
    if !args.json {
        println!(
            "{name}: {} layers, {:.1} MiB, into {}",
            img.layers.len(),
            img.layers.iter().map(|l| l.size).sum::<i64>() as f64 / 1048576.0,
            args.snapshotter
        );
    }
    let mut snaps = SnapshotsClient::new(ctd.channel.clone());
    let mut parent = String::new();
    let mut remote = 0;
    for (i, layer) in img.layers.iter().enumerate() {
        let t = Instant::now();
        let chain = &chains[i];
        let exists = match snaps
            .stat(ctd.req(StatSnapshotRequest {
                snapshotter: args.snapshotter.clone(),
                key: chain.clone(),
            }))
            .await
        {
            Ok(_) => true,
            Err(s) if s.code() == Code::NotFound => false,
            Err(s) => return Err(s).context(format!("Snapshots.Stat {chain}")),
        };
        let how = if exists {
            "present"
        } else {
            let key = format!("extract-{:016x}-{chain}", rand::random::<u64>());
            let mut labels = remote_labels(name, &img.manifest.digest, &img.layers[i..]);
            labels.insert("containerd.io/snapshot.ref".into(), chain.clone());
            let prepared = snaps
                .prepare(ctd.req(PrepareSnapshotRequest {
                    snapshotter: args.snapshotter.clone(),
                    key: key.clone(),
                    parent: parent.clone(),
                    labels,
                }))
                .await;
            match prepared {
                Err(s) if s.code() == Code::AlreadyExists => {
                    remote += 1;
                    "remote"
                }
                Err(s) => {
                    bail!(
                        "layer {} ({}): the snapshotter refused it: {}",
                        i,
                        layer.digest,
                        s.message()
                    )
                }
                Ok(resp) => {
                    let mounts = resp.into_inner().mounts;
                    let applied = unpack(ctd, registry, img, layer, &mounts).await;
                    let committed = match applied {
                        Ok(()) => snaps
                            .commit(ctd.req(CommitSnapshotRequest {
                                snapshotter: args.snapshotter.clone(),
                                name: chain.clone(),
                                key: key.clone(),
                                labels: HashMap::new(),
                            }))
                            .await
                            .map(|_| ())
                            .or_else(|s| {
                                if s.code() == Code::AlreadyExists {
                                    Ok(())
                                } else {
                                    Err(anyhow::anyhow!(
                                        "Snapshots.Commit {chain}: {}",
                                        s.message()
                                    ))
                                }
                            }),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = committed {
                        let _ = snaps
                            .remove(ctd.req(RemoveSnapshotRequest {
                                snapshotter: args.snapshotter.clone(),
                                key,
                            }))
                            .await;
                        return Err(e.context(format!("layer {i} ({})", layer.digest)));
                    }
                    "unpacked"
                }
            }
        };
        let ev = LayerEvent {
            event: "layer",
            index: i,
            digest: &layer.digest,
            size: layer.size,
            how,
            ms: t.elapsed().as_millis() as u64,
        };
        if args.json {
            println!("{}", serde_json::to_string(&ev)?);
        } else {
            println!(
                "  {:>3}  {}  {:>10}  {:<8}  {:>7.2}s",
                i,
                &layer.digest[..19.min(layer.digest.len())],
                human(layer.size),
                how,
                t.elapsed().as_secs_f64()
            );
        }
        parent = chain.clone();
    }
    // The config references the top snapshot, so the collector keeps the
    // chain while the image exists.
    if let Some(top) = chains.last() {
        let mut l = HashMap::new();
        l.insert(
            format!("containerd.io/gc.ref.snapshot.{}", args.snapshotter),
            top.clone(),
        );
        label_content(ctd, &img.config.digest, l).await?;
    }
    put_image(ctd, name, &pb_desc(&img.top)).await?;
    let done = Done {
        event: "done",
        image: name,
        digest: &img.top.digest,
        snapshotter: &args.snapshotter,
        layers: img.layers.len(),
        remote,
        ms: started.elapsed().as_millis() as u64,
    };
    if args.json {
        println!("{}", serde_json::to_string(&done)?);
    } else {
        println!(
            "{name}: pulled in {:.2}s, {} of {} layers fetched by the snapshotter ({})",
            started.elapsed().as_secs_f64(),
            remote,
            img.layers.len(),
            img.top.digest
        );
    }
    Ok(())
}

fn human(n: i64) -> String {
    let n = n as f64;
    if n >= 1048576.0 {
        format!("{:.1} MiB", n / 1048576.0)
    } else if n >= 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{n} B")
    }
}

/// The ordinary path for one layer: blob into the content store, applied
/// onto `mounts` by containerd's Diff service.
async fn unpack(
    ctd: &Ctd,
    registry: &Registry,
    img: &hyperbox_registry::Resolved,
    layer: &Descriptor,
    mounts: &[containerd_client::types::Mount],
) -> Result<()> {
    if !content_exists(ctd, &layer.digest).await? {
        let d = Digest::parse(&layer.digest)?;
        let tmp = tempfile::Builder::new()
            .prefix("hb-layer-")
            .tempdir()
            .context("temporary directory for the layer")?;
        let path = tmp.path().join("blob");
        registry
            .fetch_blob_to_file(&img.reference, &d, &path, &|_, _| {})
            .await
            .with_context(|| format!("download layer {}", layer.digest))?;
        write_file(ctd, &layer.digest, &path).await?;
    }
    DiffClient::new(ctd.channel.clone())
        .apply(ctd.req(ApplyRequest {
            diff: Some(pb_desc(layer)),
            mounts: mounts.to_vec(),
            payloads: HashMap::new(),
            sync_fs: false,
        }))
        .await
        .map_err(|s| anyhow::anyhow!("Diff.Apply {}: {}", layer.digest, s.message()))?;
    Ok(())
}

async fn content_exists(ctd: &Ctd, digest: &str) -> Result<bool> {
    match ContentClient::new(ctd.channel.clone())
        .info(ctd.req(InfoRequest {
            digest: digest.into(),
        }))
        .await
    {
        Ok(_) => Ok(true),
        Err(s) if s.code() == Code::NotFound => Ok(false),
        Err(s) => Err(anyhow::anyhow!("Content.Info {digest}: {}", s.message())),
    }
}

async fn write_bytes(
    ctd: &Ctd,
    digest: &str,
    data: &[u8],
    labels: HashMap<String, String>,
) -> Result<()> {
    if content_exists(ctd, digest).await? {
        return label_content(ctd, digest, labels).await;
    }
    write_stream(
        ctd,
        digest,
        data.len() as i64,
        data.chunks(WRITE_CHUNK).map(<[u8]>::to_vec).collect(),
        labels,
    )
    .await
}

async fn write_file(ctd: &Ctd, digest: &str, path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let total = f.metadata()?.len() as i64;
    // Streamed in chunks read on demand, so a large layer is never in memory.
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
    let r#ref = format!("hb-{}", digest.replace(':', "-"));
    let expected = digest.to_string();
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut offset = 0i64;
        let mut buf = vec![0u8; WRITE_CHUNK];
        loop {
            let n = f.read(&mut buf)?;
            let last = n == 0;
            let msg = WriteContentRequest {
                action: if last {
                    WriteAction::Commit
                } else {
                    WriteAction::Write
                } as i32,
                r#ref: r#ref.clone(),
                total,
                expected: expected.clone(),
                offset,
                data: buf[..n].to_vec(),
                labels: HashMap::new(),
            };
            offset += n as i64;
            if tx.blocking_send(msg).is_err() || last {
                return Ok(());
            }
        }
    });
    let sent = send_write(ctd, digest, tokio_stream::wrappers::ReceiverStream::new(rx)).await;
    reader.await??;
    sent
}

async fn write_stream(
    ctd: &Ctd,
    digest: &str,
    total: i64,
    chunks: Vec<Vec<u8>>,
    labels: HashMap<String, String>,
) -> Result<()> {
    let r#ref = format!(
        "hb-{}-{:08x}",
        digest.replace(':', "-"),
        rand::random::<u32>()
    );
    let mut offset = 0i64;
    let mut msgs = Vec::new();
    for c in chunks {
        let n = c.len() as i64;
        msgs.push(WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: r#ref.clone(),
            total,
            expected: digest.into(),
            offset,
            data: c,
            labels: HashMap::new(),
        });
        offset += n;
    }
    msgs.push(WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref,
        total,
        expected: digest.into(),
        offset,
        data: Vec::new(),
        labels,
    });
    send_write(ctd, digest, futures::stream::iter(msgs)).await
}

async fn send_write<S>(ctd: &Ctd, digest: &str, msgs: S) -> Result<()>
where
    S: futures::Stream<Item = WriteContentRequest> + Send + 'static,
{
    let resp = ContentClient::new(ctd.channel.clone())
        .write(ctd.req(msgs))
        .await;
    let mut stream = match resp {
        Ok(s) => s.into_inner(),
        Err(s) if s.code() == Code::AlreadyExists => return Ok(()),
        Err(s) => bail!("Content.Write {digest}: {}", s.message()),
    };
    while let Some(m) = stream.next().await {
        match m {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => return Ok(()),
            Err(s) => bail!("Content.Write {digest}: {}", s.message()),
        }
    }
    Ok(())
}

async fn label_content(ctd: &Ctd, digest: &str, labels: HashMap<String, String>) -> Result<()> {
    if labels.is_empty() {
        return Ok(());
    }
    let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
    ContentClient::new(ctd.channel.clone())
        .update(ctd.req(UpdateContentRequest {
            info: Some(containerd_client::services::v1::Info {
                digest: digest.into(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        }))
        .await
        .map_err(|s| anyhow::anyhow!("Content.Update {digest}: {}", s.message()))?;
    Ok(())
}

async fn put_image(ctd: &Ctd, name: &str, target: &PbDescriptor) -> Result<()> {
    let image = Image {
        name: name.into(),
        target: Some(target.clone()),
        ..Default::default()
    };
    let mut images = ImagesClient::new(ctd.channel.clone());
    match images
        .create(ctd.req(CreateImageRequest {
            image: Some(image.clone()),
            source_date_epoch: None,
        }))
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::AlreadyExists => {
            images
                .update(ctd.req(UpdateImageRequest {
                    image: Some(image),
                    update_mask: None,
                    source_date_epoch: None,
                }))
                .await
                .map_err(|s| anyhow::anyhow!("Images.Update {name}: {}", s.message()))?;
            Ok(())
        }
        Err(s) => bail!("Images.Create {name}: {}", s.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let c = chain_ids(&[d('a'), d('b')]);
        assert_eq!(c[0], d('a'));
        let want = hex::encode(Sha256::digest(format!("{} {}", d('a'), d('b')).as_bytes()));
        assert_eq!(c[1], format!("sha256:{want}"));
    }

    #[test]
    fn image_layers_label_fits_containerds_limit() {
        let layers: Vec<Descriptor> = (0..200)
            .map(|i| Descriptor {
                media_type: String::new(),
                digest: format!("sha256:{i:064x}"),
                size: 1,
                annotations: HashMap::new(),
            })
            .collect();
        let l = remote_labels("r", "m", &layers);
        let (k, v) = l
            .iter()
            .find(|(k, _)| k.ends_with("cri.image-layers"))
            .unwrap();
        assert!(k.len() + v.len() <= MAX_LABEL);
        assert!(v.starts_with(&layers[0].digest));
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }
}
