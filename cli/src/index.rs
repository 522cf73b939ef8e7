//! `hb image index REF`: makes and pushes the hyperbox index of an image
//! (see `hyperbox_registry::index`), so nodes can mount its layers at once
//! and fetch bytes on first access. The image itself is not touched.
//!
//! Each layer is downloaded and verified, converted by the snapshotter's
//! own writer (so the node serves exactly what it would have built), and
//! described by per-chunk digests of that EROFS image and a layer map
//! (`hyperbox_erofs::map`: its metadata, where its file data is in the
//! tar, gzip checkpoints), pushed as a small blob: the nodes make the image
//! from the layer blob itself, so the registry holds no second copy. zstd
//! layers (no checkpoints in a single frame) and `--erofs-blobs` push the
//! EROFS image instead. Each mapped layer also gets a table of its EROFS
//! image's 4 KiB block digests (index version 4), so nodes fetch and
//! check what reads need block by block; `--no-block-digests` leaves it
//! out (version 3, for nodes from before version 4). Then the index
//! manifest goes under the tag derived from the image's manifest digest.

use std::io::Read;

use anyhow::{Context, Result};
use hyperbox_erofs::{convert, map, zran};
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
    /// The blob pushed for it: its map or its EROFS image.
    blob: String,
    /// Its size.
    pushed: u64,
    /// `map` or `erofs`.
    source: &'static str,
    /// The size of its block digest table (0: none).
    blocks: u64,
}

/// How `hb image index` builds the index.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Bytes per chunk (by the image's size when not given).
    pub chunk_size: Option<u64>,
    /// Tar bytes between gzip checkpoints.
    pub span: u64,
    /// Push EROFS images, not maps (index version 2).
    pub erofs_blobs: bool,
    /// Give mapped layers block digest tables (index version 4).
    pub block_digests: bool,
}

/// The chunk size of an index whose layers all have block tables, unless
/// the image needs larger: a chunk's digest is then only what vouches for
/// its blocks' table entries, so a larger chunk costs a read only its
/// entries (32 bytes a block, 512 a chunk) and keeps the index document a
/// quarter of what 16 KiB chunks make it.
const TABLED_CHUNK_SIZE: u64 = 64 << 10;

/// Builds and pushes the index of `reference`.
pub async fn run(
    config: &hyperbox_config::Config,
    reference: &str,
    opts: Options,
    json: bool,
) -> Result<()> {
    let (r, registry, img) = resolve(config, reference).await?;
    let chunk_size = opts.chunk_size;
    if !(zran::WINDOW as u64..=map::MAX_SPAN).contains(&opts.span) {
        anyhow::bail!(
            "--span {}: from {} to {} bytes",
            opts.span,
            zran::WINDOW,
            map::MAX_SPAN
        );
    }
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
        let span = (!opts.erofs_blobs).then_some(opts.span);
        let (converted, mapped) = tokio::task::spawn_blocking(move || {
            // The same policy as the node's own conversion.
            let options = hyperbox_erofs::writer::Options {
                allow_devices: devices,
                max_layer_bytes,
                max_layer_entries,
            };
            match span {
                Some(span) => convert::convert_mapped(&b2, &t2, &o2, options, span),
                None => convert::convert_hashed(&b2, &t2, &o2, options).map(|c| (c, None)),
            }
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
        converted_layers.push((l, promised, converted.summary, out, mapped));
    }
    let total: u64 = converted_layers
        .iter()
        .map(|(_, _, _, out, _)| std::fs::metadata(out).map(|m| m.len()).unwrap_or_default())
        .sum();
    // Block tables for mapped layers small enough to track per block; the
    // larger chunks only when every layer has one (a layer without a
    // table is still checked per chunk).
    let tabled = |mapped: bool, out: &std::path::Path| {
        opts.block_digests
            && mapped
            && std::fs::metadata(out)
                .is_ok_and(|m| m.len().div_ceil(index::BLOCK) <= index::MAX_BLOCKS)
    };
    let tables: Vec<bool> = converted_layers
        .iter()
        .map(|(_, _, _, out, mapped)| tabled(mapped.is_some(), out))
        .collect();
    let all_tabled = tables.iter().all(|t| *t);
    let chunk_size = chunk_size.unwrap_or_else(|| {
        let cs = index::chunk_size_for(total);
        if all_tabled {
            cs.max(TABLED_CHUNK_SIZE)
        } else {
            cs
        }
    });
    let mut layers = Vec::new();
    let mut rows = Vec::new();
    let mut pushed = Vec::new();
    for ((l, promised, summary, out, mapped), with_table) in
        converted_layers.into_iter().zip(tables)
    {
        let (chunks, whole, size, table) = chunk_digests(&out, chunk_size, with_table)?;
        let blocks = match table {
            Some(t) => {
                let (digest, size) = push_part(&registry, &r, t, index::BLOCKS_TYPE)
                    .await
                    .with_context(|| format!("push the block digests of {}", l.digest))?;
                pushed.push(digest.clone());
                Some(index::BlockTable {
                    digest: digest.digest,
                    size,
                })
            }
            None => None,
        };
        let map = match mapped {
            Some(m) => {
                let (bytes, eager) = m.map.encode(&m.windows).context("encode the layer map")?;
                let (digest, size) = push_part(&registry, &r, bytes, index::MAP_TYPE)
                    .await
                    .with_context(|| format!("push the layer map of {}", l.digest))?;
                pushed.push(digest.clone());
                Some(index::MapRef {
                    digest: digest.digest,
                    size,
                    eager,
                })
            }
            None => {
                let data = bytes::Bytes::from(std::fs::read(&out).context("read EROFS image")?);
                registry
                    .push_blob(&r, &whole, data)
                    .await
                    .with_context(|| format!("push EROFS image of layer {}", l.digest))?;
                pushed.push(Descriptor {
                    media_type: index::EROFS_TYPE.into(),
                    digest: whole.to_string(),
                    size: size as i64,
                    annotations: Default::default(),
                });
                None
            }
        };
        let _ = std::fs::remove_file(&out);
        rows.push(Row {
            layer: l.digest.clone(),
            erofs: whole.to_string(),
            size,
            chunks: chunks.len(),
            blob: map
                .as_ref()
                .map_or_else(|| whole.to_string(), |m| m.digest.clone()),
            pushed: map.as_ref().map_or(size, |m| m.size) + blocks.as_ref().map_or(0, |b| b.size),
            source: if map.is_some() { "map" } else { "erofs" },
            blocks: blocks.as_ref().map_or(0, |b| b.size),
        });
        layers.push(IndexLayer {
            layer: l.digest.clone(),
            diff_id: promised.clone(),
            erofs: whole.to_string(),
            size,
            data_end: summary.data_end,
            chunks,
            map,
            blocks,
        });
    }
    let doc = Index {
        // The oldest version that holds what it has: nodes from before
        // block tables read an index without them, and nodes from before
        // maps one without maps.
        version: if layers.iter().any(|l| l.blocks.is_some()) {
            index::VERSION
        } else if layers.iter().any(|l| l.map.is_some()) {
            index::VERSION_MAPS
        } else {
            2
        },
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
    registry
        .push_artifact(
            &r,
            &tag,
            index::CONFIG_TYPE,
            doc_bytes.clone(),
            &pushed,
            &img.manifest,
        )
        .await
        .context("push the index")?;
    // What the index adds to the registry, against the image's own
    // compressed layers.
    let added = doc_bytes.len() as u64 + rows.iter().map(|row| row.pushed).sum::<u64>();
    let compressed: u64 = img.layers.iter().map(|l| l.size as u64).sum();
    if json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({
                "image": r.to_string(),
                "index": format!("{}/{}:{tag}", r.host, r.repository),
                "version": doc.version,
                "chunk_size": chunk_size,
                "layers": rows,
                "index_bytes": added,
                "image_bytes": compressed,
            }))?
        );
    } else {
        for row in &rows {
            println!(
                "  {}  ->  {}  {:>10} bytes  {} chunks, {} of {} bytes{}",
                &row.layer[..19],
                &row.erofs[..19],
                row.size,
                row.chunks,
                row.source,
                row.pushed,
                if row.blocks > 0 {
                    format!(" (block digests: {})", row.blocks)
                } else {
                    String::new()
                }
            );
        }
        println!(
            "{r}: hyperbox index pushed as {}/{}:{tag}: {added} bytes, {:.1} % of the image's {compressed} compressed bytes",
            r.host,
            r.repository,
            added as f64 * 100.0 / compressed.max(1) as f64
        );
    }
    Ok(())
}

/// Pushes `bytes` as a blob of the index artifact: its descriptor and size.
async fn push_part(
    registry: &Registry,
    r: &Reference,
    bytes: Vec<u8>,
    media_type: &str,
) -> Result<(Descriptor, u64)> {
    let digest = Digest::of(&bytes);
    let len = bytes.len() as u64;
    registry
        .push_blob(r, &digest, bytes::Bytes::from(bytes))
        .await?;
    Ok((
        Descriptor {
            media_type: media_type.into(),
            digest: digest.to_string(),
            size: len as i64,
            annotations: Default::default(),
        },
        len,
    ))
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

/// A file's chunk digests, the digest of the whole file, its size, and
/// with `table` its block digest table: the SHA-256 of each chunk, or of
/// its blocks' digests when it has a table.
type Digests = (Vec<String>, Digest, u64, Option<Vec<u8>>);

fn chunk_digests(path: &std::path::Path, chunk_size: u64, table: bool) -> Result<Digests> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut whole = Sha256::new();
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; chunk_size as usize];
    let mut blocks = Vec::new();
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
        if table {
            let digests = index::block_digests(&buf[..filled]);
            chunks.push(index::chunk_of_blocks(&digests));
            blocks.extend(digests.concat());
        } else {
            chunks.push(hex::encode(Sha256::digest(&buf[..filled])));
        }
        size += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    let d = Digest::parse(&format!("sha256:{}", hex::encode(whole.finalize())))?;
    Ok((chunks, d, size, table.then_some(blocks)))
}
