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

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use hyperbox_pull::{Blob, LayerReport, LayerSource, Session};
use hyperbox_registry::digest::Digest;
use hyperbox_registry::{BlobSize, Descriptor, Reference, Registry, Resolved};
use serde::Serialize;

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

/// Layer blobs for layers the snapshotter leaves to containerd: downloaded
/// with hyperbox-registry (same hosts.toml and credentials as the
/// snapshotter) into a temporary file.
struct RegistrySource<'a> {
    registry: &'a Registry,
    reference: &'a Reference,
}

#[async_trait::async_trait]
impl LayerSource for RegistrySource<'_> {
    async fn fetch(
        &self,
        layer: &Descriptor,
    ) -> std::result::Result<Blob, Box<dyn std::error::Error + Send + Sync>> {
        let d = Digest::parse(&layer.digest)?;
        let tmp = tempfile::Builder::new().prefix("hb-layer-").tempdir()?;
        let path = tmp.path().join("blob");
        // The manifest's size for it: never read past what it promised.
        let size = BlobSize::Exact(u64::try_from(layer.size)?);
        self.registry
            .fetch_blob_to_file(self.reference, &d, size, &path, &|_, _| {})
            .await?;
        Ok(Blob::File {
            path,
            keep: Box::new(tmp),
        })
    }
}

/// Pulls `args.reference` into containerd; see the module comment.
pub async fn pull(config: &hyperbox_config::Config, args: &PullArgs) -> Result<()> {
    let started = Instant::now();
    let r = Reference::parse(&args.reference)?;
    let name = r.to_string();
    let registry = Registry::new(&config.registry).context("registry settings")?;
    let img: Resolved = registry
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
    let session = Session::new(channel, &args.namespace);
    if !args.json {
        println!(
            "{name}: {} layers, {:.1} MiB, into {}",
            img.layers.len(),
            img.layers.iter().map(|l| l.size).sum::<i64>() as f64 / 1048576.0,
            args.snapshotter
        );
    }
    let json = args.json;
    let mut print = |l: &LayerReport| {
        if json {
            let ev = LayerEvent {
                event: "layer",
                index: l.index,
                digest: &l.digest,
                size: l.size,
                how: l.outcome.as_str(),
                ms: l.elapsed.as_millis() as u64,
            };
            println!(
                "{}",
                serde_json::to_string(&ev).expect("plain struct serializes")
            );
        } else {
            println!(
                "  {:>3}  {}  {:>10}  {:<8}  {:>7.2}s",
                l.index,
                &l.digest[..19.min(l.digest.len())],
                human(l.size),
                l.outcome.as_str(),
                l.elapsed.as_secs_f64()
            );
        }
    };
    let source = RegistrySource {
        registry: &registry,
        reference: &img.reference,
    };
    let opts = hyperbox_pull::Options {
        snapshotter: args.snapshotter.clone(),
        remote_labels: true,
    };
    let report = hyperbox_pull::pull(&session, &img, &name, &opts, &source, &mut print).await?;
    let remote = report.remote().len();
    if args.json {
        let done = Done {
            event: "done",
            image: &name,
            digest: &img.top.digest,
            snapshotter: &args.snapshotter,
            layers: img.layers.len(),
            remote,
            ms: started.elapsed().as_millis() as u64,
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_shown_in_binary_units() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(2048), "2.0 KiB");
        assert_eq!(human(3 * 1048576 + 1048576 / 2), "3.5 MiB");
    }
}
