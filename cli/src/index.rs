//! `hb image index REF`: makes and pushes the hyperbox index of an image
//! (see `hyperbox_registry::index`), so nodes can mount its layers at once
//! and fetch bytes on first access. The image itself is not touched.
//!
//! Each layer is downloaded and verified, converted by the snapshotter's
//! own writer (so the node serves exactly what it would have built), and
//! pushed as an EROFS blob with per-chunk digests; then the index manifest
//! goes under the tag derived from the image's manifest digest.

use std::io::Read;

use anyhow::{Context, Result};
use hyperbox_registry::digest::Digest;
use hyperbox_registry::index::{self, Index, IndexLayer};
use hyperbox_registry::{BlobSize, Descriptor, Reference, Registry, Resolved};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

#[derive(Debug, Serialize)]
struct Row {
    layer: String,
    erofs: String,
    size: u64,
    chunks: usize,
}

/// Builds and pushes the index of `reference`, in chunks of `chunk_size`
/// bytes (by the image's largest layer when not given).
pub async fn run(
    config: &hyperbox_config::Config,
    reference: &str,
    chunk_size: Option<u64>,
    json: bool,
) -> Result<()> {
    let (r, registry, img) = resolve(config, reference).await?;
    if let Some(cs) = chunk_size
        && (!(4096..=64 << 20).contains(&cs) || !cs.is_multiple_of(4096))
    {
        anyhow::bail!("--chunk-size {cs}: a multiple of 4 KiB up to 64 MiB");
    }
    let work = tempfile::Builder::new()
        .prefix("hb-index-")
        .tempdir()
        .context("temporary directory")?;
    // Every layer converted first: the chunk size depends on the EROFS
    // images' total size.
    let mut converted_layers = Vec::new();
    for (i, l) in img.layers.iter().enumerate() {
        let d = Digest::parse(&l.digest)?;
        let blob = work.path().join(format!("{i}.blob"));
        registry
            .fetch_blob_to_file(&r, &d, BlobSize::Exact(l.size as u64), &blob, &|_, _| {})
            .await
            .with_context(|| format!("download layer {}", l.digest))?;
        let out = work.path().join(format!("{i}.erofs"));
        let tmp = work.path().join(format!("{i}.erofs.tmp"));
        let (b2, t2, o2) = (blob.clone(), tmp.clone(), out.clone());
        let devices = config.snapshotter.allow_device_nodes;
        let max_layer_bytes = config.snapshotter.max_layer_bytes;
        let max_layer_entries = config.snapshotter.max_layer_entries;
        let converted = tokio::task::spawn_blocking(move || {
            // The same policy as the node's own conversion.
            let options = hyperbox_erofs::writer::Options {
                allow_devices: devices,
                max_layer_bytes,
                max_layer_entries,
            };
            hyperbox_erofs::convert::convert_hashed(&b2, &t2, &o2, options)
        })
        .await?
        .with_context(|| format!("convert layer {} to EROFS", l.digest))?;
        // The node serves the EROFS image only under the chain id of this
        // diff_id and checks it again once complete: an index of bytes
        // other than the config's would be refused there anyway.
        let promised = img
            .diff_ids
            .get(i)
            .with_context(|| format!("no diff_id for layer {} in the image config", l.digest))?;
        if &converted.diff_id != promised {
            anyhow::bail!(
                "layer {} decompresses to {} but the image config says {promised}; not indexing a mismatched image",
                l.digest,
                converted.diff_id
            );
        }
        let _ = std::fs::remove_file(&blob);
        converted_layers.push((l, promised, converted.summary, out));
    }
    let total: u64 = converted_layers
        .iter()
        .map(|(_, _, _, out)| std::fs::metadata(out).map(|m| m.len()).unwrap_or_default())
        .sum();
    let chunk_size = chunk_size.unwrap_or_else(|| index::chunk_size_for(total));
    let mut layers = Vec::new();
    let mut rows = Vec::new();
    for (l, promised, summary, out) in converted_layers {
        let (chunks, whole, size) = chunk_digests(&out, chunk_size)?;
        let data = bytes::Bytes::from(std::fs::read(&out).context("read EROFS image")?);
        registry
            .push_blob(&r, &whole, data)
            .await
            .with_context(|| format!("push EROFS image of layer {}", l.digest))?;
        let _ = std::fs::remove_file(&out);
        rows.push(Row {
            layer: l.digest.clone(),
            erofs: whole.to_string(),
            size,
            chunks: chunks.len(),
        });
        layers.push(IndexLayer {
            layer: l.digest.clone(),
            diff_id: promised.clone(),
            erofs: whole.to_string(),
            size,
            data_end: summary.data_end,
            chunks,
        });
    }
    let doc = Index {
        version: index::VERSION,
        chunk_size,
        layers,
    };
    let doc_bytes = serde_json::to_vec(&doc)?;
    if doc_bytes.len() as u64 > index::MAX_DOCUMENT {
        anyhow::bail!(
            "the index of {r} in {chunk_size}-byte chunks is {} bytes, more than the {} nodes read; \
             pass a larger --chunk-size",
            doc_bytes.len(),
            index::MAX_DOCUMENT
        );
    }
    let manifest_digest = Digest::parse(&img.manifest.digest)?;
    let tag = index::tag_for(&manifest_digest);
    let erofs_layers: Vec<Descriptor> = rows
        .iter()
        .map(|row| Descriptor {
            media_type: index::EROFS_TYPE.into(),
            digest: row.erofs.clone(),
            size: row.size as i64,
            annotations: Default::default(),
        })
        .collect();
    registry
        .push_artifact(
            &r,
            &tag,
            index::CONFIG_TYPE,
            doc_bytes,
            &erofs_layers,
            &img.manifest,
        )
        .await
        .context("push the index")?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({
                "image": r.to_string(),
                "index": format!("{}/{}:{tag}", r.host, r.repository),
                "layers": rows,
            }))?
        );
    } else {
        for row in &rows {
            println!(
                "  {}  ->  {}  {:>10} bytes  {} chunks",
                &row.layer[..19],
                &row.erofs[..19],
                row.size,
                row.chunks
            );
        }
        println!(
            "{r}: hyperbox index pushed as {}/{}:{tag}",
            r.host, r.repository
        );
    }
    Ok(())
}

/// `reference` parsed, the registry client of `config`, and the image
/// resolved to this machine's platform.
pub async fn resolve(
    config: &hyperbox_config::Config,
    reference: &str,
) -> Result<(Reference, Registry, Resolved)> {
    let r = Reference::parse(reference)?;
    let registry = Registry::new(&config.registry).context("registry settings")?;
    let img = registry
        .resolve(&r)
        .await
        .with_context(|| format!("resolve {r}"))?;
    Ok((r, registry, img))
}

/// Hex SHA-256 of each chunk, the digest of the whole file, its size.
fn chunk_digests(path: &std::path::Path, chunk_size: u64) -> Result<(Vec<String>, Digest, u64)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut whole = Sha256::new();
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; chunk_size as usize];
    let mut size = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = f.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        whole.update(&buf[..filled]);
        chunks.push(hex::encode(Sha256::digest(&buf[..filled])));
        size += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    let d = Digest::parse(&format!("sha256:{}", hex::encode(whole.finalize())))?;
    Ok((chunks, d, size))
}
