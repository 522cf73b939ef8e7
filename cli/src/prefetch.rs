//! `hb image prefetch push|show REF`: the prefetch lists this node learned
//! for an image's lazy layers (what its containers first read, in order),
//! shared through the registry beside the image's hyperbox index so that
//! nodes that never ran the image fetch the same bytes first
//! (`hyperbox_registry::prefetch`).
//!
//! `push` merges: what the registry already holds keeps its place and this
//! node's chunks go after it, so pushing from several nodes accumulates
//! their lists; `--replace` pushes this node's alone.
//!
//! For a layer served through a layer map from gzip, `push` also inflates
//! the layer once and pushes, as a layer of the artifact, a checkpoint
//! before each cluster of the listed reads (`hyperbox_erofs::learned`):
//! the map's own checkpoints are about 1 MiB of tar apart, and a small
//! file between two costs the compressed bytes from the one before it.

use anyhow::{Context, Result, bail};
use hyperbox_erofs::{deflate, learned, map, trim, zran};
use hyperbox_registry::digest::Digest;
use hyperbox_registry::index::{Index, IndexLayer};
use hyperbox_registry::prefetch::{self, PointsRef, Shared, Store};
use hyperbox_registry::{BlobSize, Descriptor, Reference, Registry, Resolved};
use serde::Serialize;

use crate::table;

/// One layer's lists, as shown.
#[derive(Debug, Serialize)]
struct Row {
    layer: String,
    erofs: String,
    chunk_size: u64,
    /// Chunks listed in the registry (after a push: what was pushed).
    registry: usize,
    /// Chunks listed on this node.
    node: usize,
    /// Checkpoints learned for the layer blob, in the registry (after a
    /// push: what was pushed).
    points: usize,
    /// The size of their blob in the registry.
    points_bytes: u64,
}

/// The image, its index and the shared document, if any.
struct Found {
    r: Reference,
    registry: Registry,
    img: Resolved,
    index: Index,
    shared: Option<Shared>,
    manifest: Digest,
}

/// With `replace`, a shared document that cannot be read is no error: it
/// is about to be replaced.
async fn find(config: &hyperbox_config::Config, reference: &str, replace: bool) -> Result<Found> {
    let (r, registry, img) = crate::index::resolve(config, reference).await?;
    let manifest = Digest::parse(&img.manifest.digest)?;
    let (index, shared) = tokio::join!(
        registry.fetch_index(&r, &manifest),
        registry.fetch_prefetch(&r, &manifest)
    );
    let Some(index) = index.with_context(|| format!("read the hyperbox index of {r}"))? else {
        bail!("{r} has no hyperbox index: run `hb image index {reference}` first");
    };
    let shared = match shared {
        Ok(doc) => doc,
        Err(e) if replace => {
            eprintln!("ignoring the shared prefetch lists of {r}, which are replaced: {e}");
            None
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "read the shared prefetch lists of {r} (`hb image prefetch push --replace` replaces them)"
                )
            });
        }
    };
    Ok(Found {
        r,
        registry,
        img,
        index,
        shared,
        manifest,
    })
}

/// The lists of `found`'s layers: in `doc` and on this node.
fn rows(
    found: &Found,
    doc: Option<&Shared>,
    store: &Store,
    points: &std::collections::HashMap<String, (usize, u64)>,
) -> Vec<Row> {
    found
        .index
        .layers
        .iter()
        .map(|l| {
            // Lists count units: blocks under a block table.
            let cs = l.unit(found.index.chunk_size);
            (l, cs)
        })
        .map(|(l, cs)| Row {
            layer: l.layer.clone(),
            erofs: l.erofs.clone(),
            chunk_size: cs,
            registry: doc
                .and_then(|d| d.list(&l.erofs, cs))
                .map_or(0, <[usize]>::len),
            node: store
                .load(&l.erofs, cs, l.units(found.index.chunk_size))
                .len(),
            points: points.get(&l.layer).map_or(0, |p| p.0),
            points_bytes: points.get(&l.layer).map_or(0, |p| p.1),
        })
        .collect()
}

fn print(found: &Found, tag: &str, rows: &[Row], json: bool, headline: &str) -> Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({
                "image": found.r.to_string(),
                "manifest": found.manifest.to_string(),
                "artifact": format!("{}/{}:{tag}", found.r.host, found.r.repository),
                "layers": rows,
            }))?
        );
        return Ok(());
    }
    let mib =
        |chunks: usize, cs: u64| format!("{:.1} MiB", (chunks as u64 * cs) as f64 / 1048576.0);
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.layer[..19].to_string(),
                r.erofs[..19].to_string(),
                format!("{} ({})", r.registry, mib(r.registry, r.chunk_size)),
                format!("{} ({})", r.node, mib(r.node, r.chunk_size)),
                r.points.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                "LAYER",
                "EROFS",
                "REGISTRY CHUNKS",
                "NODE CHUNKS",
                "CHECKPOINTS",
            ],
            &table_rows
        )
    );
    println!("{headline}");
    Ok(())
}

/// Shows the lists the registry holds for `reference` and those this node
/// learned.
pub async fn show(config: &hyperbox_config::Config, reference: &str, json: bool) -> Result<()> {
    let found = find(config, reference, false).await?;
    let tag = prefetch::tag_for(&found.manifest);
    let store = Store::reader(&config.snapshotter.root);
    let points = match &found.shared {
        Some(doc) => shown_points(&found, doc).await,
        None => Default::default(),
    };
    let rows = rows(&found, found.shared.as_ref(), &store, &points);
    let headline = match &found.shared {
        Some(_) => format!(
            "{}: shared prefetch lists in {}/{}:{tag}",
            found.r, found.r.host, found.r.repository
        ),
        None => format!(
            "{}: no shared prefetch lists yet (`hb image prefetch push` shares this node's)",
            found.r
        ),
    };
    print(&found, &tag, &rows, json, &headline)
}

/// Pushes this node's lists for `reference`, merged after the registry's
/// unless `replace`.
pub async fn push(
    config: &hyperbox_config::Config,
    reference: &str,
    replace: bool,
    json: bool,
) -> Result<()> {
    let found = find(config, reference, replace).await?;
    let store = Store::reader(&config.snapshotter.root);
    let cs = found.index.chunk_size;
    let mut doc = match (&found.shared, replace) {
        (Some(d), false) => d.clone(),
        _ => Shared::new(),
    };
    // Lists that do not fit this index (other EROFS images, another chunk
    // size, chunks past their layer) are dropped: nodes would ignore them.
    doc.lists.retain(|l| {
        found.index.layers.iter().any(|e| {
            e.erofs == l.erofs
                && l.chunk_size == e.unit(cs)
                && prefetch::misfit(&l.chunks, e.units(cs)).is_none()
        })
    });
    let mut learned = 0;
    for l in &found.index.layers {
        let here = store.load(&l.erofs, l.unit(cs), l.units(cs));
        learned += here.len();
        doc.merge(&l.erofs, l.unit(cs), &here);
    }
    if learned == 0 {
        bail!(
            "this node has learned nothing for {}: run it here through a lazy pull first (lists are kept in {})",
            found.r,
            config.snapshotter.root.join("prefetch").display()
        );
    }
    // Nodes fetch only the start of each list ahead; the rest would only
    // grow the document past what they read.
    doc.cut();
    let bytes = serde_json::to_vec(&doc)?;
    if bytes.len() as u64 > prefetch::MAX_DOCUMENT {
        bail!(
            "the prefetch lists of {} come to {} bytes, more than the {} nodes read",
            found.r,
            bytes.len(),
            prefetch::MAX_DOCUMENT
        );
    }
    let mut layers = Vec::new();
    let mut counts = std::collections::HashMap::new();
    for l in &found.index.layers {
        let Some(list) = doc.list(&l.erofs, l.unit(cs)) else {
            continue;
        };
        // Checkpoints only speed reads up: a layer whose checkpoints cannot be made
        // is pushed with its list alone.
        let (p, n) = match learn_points(&found, l, list).await {
            Ok(Some(learned)) => learned,
            Ok(None) => continue,
            Err(e) => {
                // Those the registry has for it, if any, are kept.
                let kept = found
                    .shared
                    .as_ref()
                    .and_then(|d| d.points.iter().find(|p| p.layer == l.layer));
                eprintln!(
                    "layer {}: no checkpoints learned ({}): {e:#}",
                    l.layer,
                    if kept.is_some() {
                        "the registry's are kept"
                    } else {
                        "its list is pushed alone"
                    }
                );
                if let Some(p) = kept {
                    layers.push(Descriptor {
                        media_type: prefetch::POINTS_TYPE.into(),
                        digest: p.digest.clone(),
                        size: p.size as i64,
                        annotations: p.annotations(),
                    });
                }
                continue;
            }
        };
        counts.insert(l.layer.clone(), (n, p.size));
        layers.push(Descriptor {
            media_type: prefetch::POINTS_TYPE.into(),
            digest: p.digest.clone(),
            size: p.size as i64,
            annotations: p.annotations(),
        });
    }
    let tag = prefetch::tag_for(&found.manifest);
    found
        .registry
        .push_artifact(
            &found.r,
            &tag,
            prefetch::CONFIG_TYPE,
            bytes,
            &layers,
            &found.img.manifest,
        )
        .await
        .context("push the prefetch lists")?;
    let rows = rows(&found, Some(&doc), &store, &counts);
    let headline = format!(
        "{}: prefetch lists pushed as {}/{}:{tag}",
        found.r, found.r.host, found.r.repository
    );
    print(&found, &tag, &rows, json, &headline)
}

/// For a layer served through a gzip layer map: a checkpoint at the last
/// deflate block boundary before each cluster of the tar bytes `list`'s
/// chunks come from, pushed as a blob. Returns its reference and how many
/// checkpoints it holds; `None` for other layers, or when the map's own
/// checkpoints already start every cluster.
async fn learn_points(
    found: &Found,
    l: &IndexLayer,
    list: &[usize],
) -> Result<Option<(PointsRef, usize)>> {
    let Some(m) = &l.map else {
        return Ok(None);
    };
    let map_digest = Digest::parse(&m.digest)?;
    let eager = found
        .registry
        .fetch_range(&found.r, &map_digest, 0, m.eager)
        .await
        .context("fetch the layer map")?;
    let lmap = map::LayerMap::decode(&eager).context("read the layer map")?;
    if lmap.source != map::Source::Gzip {
        return Ok(None);
    }
    let cs = l.unit(found.index.chunk_size);
    let ranges: Vec<(u64, u64)> = list
        .iter()
        .filter_map(|&c| lmap.need(c as u64 * cs, cs))
        .map(|n| (n.tar_start, n.tar_end))
        .collect();
    // A cluster that starts at one of the map's checkpoints needs none.
    let targets: Vec<(u64, u64)> = learned::clusters(ranges)
        .into_iter()
        .filter(|(t, _)| lmap.points.binary_search_by_key(t, |p| p.output).is_err())
        .collect();
    let blob_size = lmap.blob_size;
    if targets.is_empty() {
        return Ok(None);
    }
    let layer = Digest::parse(&l.layer)?;
    let work = tempfile::Builder::new()
        .prefix("hb-prefetch-")
        .tempdir()
        .context("temporary directory")?;
    let blob = work.path().join("layer");
    found
        .registry
        .fetch_blob_to_file(
            &found.r,
            &layer,
            BlobSize::Exact(lmap.blob_size),
            &blob,
            &|_, _| {},
        )
        .await
        .context("download the layer")?;
    let points = tokio::task::spawn_blocking(move || -> Result<Vec<learned::Learned>> {
        let file = std::fs::File::open(&blob)?;
        let starts = targets.iter().map(|(t, _)| *t).collect();
        let mut ix = zran::Indexer::before(std::io::BufReader::new(&file), starts)?;
        std::io::copy(&mut ix, &mut std::io::sink()).context("inflate the layer")?;
        let boundaries = ix.into_points();
        // Then, inside the block before each target, the symbol just
        // before it (its block's header kept): blocks of text are often
        // hundreds of KiB.
        let mut out: Vec<learned::Learned> = Vec::new();
        // Targets in one block (sorted, they come together) read it once.
        let mut block: (Option<u64>, Vec<u8>) = (None, Vec::new());
        for (t, end) in targets {
            let Some(b) = boundaries.iter().rev().find(|b| b.output <= t) else {
                continue;
            };
            if block.0 != Some(b.output) {
                block = (
                    Some(b.output),
                    trim::read_blob(&file, b.fetch_from(), BLOCK_READ)?,
                );
            }
            let block = &block.1;
            let spliced = match deflate::splice_before(b, block, t) {
                Some(s) if splice_checks(b, &s, block) => {
                    Some(trimmed(&file, s.into(), end, blob_size)?)
                }
                _ => None,
            };
            // A splice whose trim the check refutes is left for its block's
            // boundary: a stored block after it would start at another
            // byte boundary in the spliced stream than in the blob, and
            // zlib would fail on it at a node.
            let point = match spliced {
                Some(p) if p.stretch.is_some() => p,
                _ => trimmed(&file, b.clone().into(), end, blob_size)?,
            };
            out.push(point);
        }
        // In order by both offsets, as nodes require (a splice near a
        // block's end may share its input byte with the next boundary).
        out.sort_by_key(|l| l.at.output);
        let mut last: Option<(u64, u64)> = None;
        out.retain(|l| {
            let keep = last.is_none_or(|(i, o)| l.at.input > i && l.at.output > o);
            if keep {
                last = Some((l.at.input, l.at.output));
            }
            keep
        });
        Ok(out)
    })
    .await??;
    // Boundaries the map already has are left to it.
    let points: Vec<learned::Learned> = points
        .into_iter()
        .filter(|l| {
            lmap.points
                .binary_search_by_key(&l.at.output, |p| p.output)
                .is_err()
        })
        .collect();
    if points.is_empty() {
        return Ok(None);
    }
    let (bytes, eager) = learned::encode(&points).context("encode the checkpoints")?;
    // What every node will check, checked here first.
    learned::decode(&bytes[..eager as usize], lmap.bounds())
        .context("the learned checkpoints do not read back")?;
    let digest = Digest::of(&bytes);
    let size = bytes.len() as u64;
    found
        .registry
        .push_blob(&found.r, &digest, bytes::Bytes::from(bytes))
        .await
        .context("push the learned checkpoints")?;
    Ok(Some((
        PointsRef {
            layer: l.layer.clone(),
            digest: digest.to_string(),
            size,
            eager,
        },
        points.len(),
    )))
}

/// How many learned checkpoints the registry holds per layer (read from
/// each blob's eager part; a blob that cannot be read counts none).
async fn shown_points(
    found: &Found,
    doc: &Shared,
) -> std::collections::HashMap<String, (usize, u64)> {
    let mut out = std::collections::HashMap::new();
    for p in &doc.points {
        let Some(l) = found.index.layers.iter().find(|l| l.layer == p.layer) else {
            continue;
        };
        let read = async {
            let m = l.map.as_ref().context("no layer map")?;
            let eager = found
                .registry
                .fetch_range(&found.r, &Digest::parse(&m.digest)?, 0, m.eager)
                .await?;
            let lmap = map::LayerMap::decode(&eager)?;
            let pe = found
                .registry
                .fetch_range(&found.r, &Digest::parse(&p.digest)?, 0, p.eager)
                .await?;
            anyhow::Ok(learned::decode(&pe, lmap.bounds())?.len())
        };
        match read.await {
            Ok(n) => {
                out.insert(p.layer.clone(), (n, p.size));
            }
            Err(e) => eprintln!("learned checkpoints of {}: {e:#}", p.layer),
        }
    }
    out
}

/// The compressed bytes read to find a symbol inside a block: a deflate
/// block is rarely over a few hundred KiB of input; a larger one keeps its
/// boundary checkpoint.
const BLOCK_READ: usize = 1 << 20;

/// `point` trimmed to its cluster, which ends at `end`
/// ([`learned::trim`]), from the layer's bytes in `file`.
fn trimmed(
    file: &std::fs::File,
    point: learned::Learned,
    end: u64,
    blob_size: u64,
) -> std::io::Result<learned::Learned> {
    let reach = end.saturating_sub(point.at.output);
    if reach == 0 || reach > deflate::MAX_REACH {
        return Ok(point);
    }
    let bytes = trim::read_blob(file, point.at.fetch_from(), trim::read_for(reach))?;
    Ok(learned::trim(point, &bytes, end, blob_size))
}

/// Whether the bytes a node would make from splice `s` (zlib, from the
/// spliced input) are those zlib makes from its block's boundary `b`:
/// the hand-written decoder that found `s` is checked against zlib before
/// any node relies on it. `block` holds the blob from `b.fetch_from()`.
fn splice_checks(b: &zran::Checkpoint, s: &deflate::Splice, block: &[u8]) -> bool {
    let Some(from_s) =
        s.at.fetch_from()
            .checked_sub(b.fetch_from())
            .and_then(|o| block.get(o as usize..))
    else {
        return false;
    };
    let (mut via_s, mut via_b) = (vec![0u8; 4096], vec![0u8; 4096]);
    let spliced = zran::extract_spliced(
        (&s.header, s.header_bits),
        &s.at,
        from_s,
        s.at.output,
        &mut via_s,
    );
    let plain = zran::extract_some(b, block, s.at.output, &mut via_b);
    match (spliced, plain) {
        (Ok(x), Ok(y)) => {
            let n = x.filled.min(y.filled);
            n > 0 && via_s[..n] == via_b[..n]
        }
        _ => false,
    }
}
