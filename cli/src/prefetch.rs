//! `hb image prefetch push|show REF`: the prefetch lists this node learned
//! for an image's lazy layers (what its containers first read, in order),
//! shared through the registry beside the image's hyperbox index so that
//! nodes that never ran the image fetch the same bytes first
//! (`hyperbox_registry::prefetch`).
//!
//! `push` merges: what the registry already holds keeps its place and this
//! node's chunks go after it, so pushing from several nodes accumulates
//! their lists; `--replace` pushes this node's alone.

use anyhow::{Context, Result, bail};
use hyperbox_registry::digest::Digest;
use hyperbox_registry::index::Index;
use hyperbox_registry::prefetch::{self, Shared, Store};
use hyperbox_registry::{Reference, Registry, Resolved};
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
fn rows(found: &Found, doc: Option<&Shared>, store: &Store) -> Vec<Row> {
    let cs = found.index.chunk_size;
    found
        .index
        .layers
        .iter()
        .map(|l| Row {
            layer: l.layer.clone(),
            erofs: l.erofs.clone(),
            chunk_size: cs,
            registry: doc
                .and_then(|d| d.list(&l.erofs, cs))
                .map_or(0, <[usize]>::len),
            node: store.load(&l.erofs, cs, l.chunks.len()).len(),
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
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &["LAYER", "EROFS", "REGISTRY CHUNKS", "NODE CHUNKS"],
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
    let rows = rows(&found, found.shared.as_ref(), &store);
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
        l.chunk_size == cs
            && found.index.layers.iter().any(|e| {
                e.erofs == l.erofs && prefetch::misfit(&l.chunks, e.chunks.len()).is_none()
            })
    });
    let mut learned = 0;
    for l in &found.index.layers {
        let here = store.load(&l.erofs, cs, l.chunks.len());
        learned += here.len();
        doc.merge(&l.erofs, cs, &here);
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
    let tag = prefetch::tag_for(&found.manifest);
    found
        .registry
        .push_artifact(
            &found.r,
            &tag,
            prefetch::CONFIG_TYPE,
            bytes,
            &[],
            &found.img.manifest,
        )
        .await
        .context("push the prefetch lists")?;
    let rows = rows(&found, Some(&doc), &store);
    let headline = format!(
        "{}: prefetch lists pushed as {}/{}:{tag}",
        found.r, found.r.host, found.r.repository
    );
    print(&found, &tag, &rows, json, &headline)
}
