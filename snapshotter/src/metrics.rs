//! `/metrics` in Prometheus' text format, on `snapshotter.metrics_address`
//! (off when empty): what the lazy path has done, so an operator can graph
//! and alert on layers that did not match their image.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use axum::Router;
use axum::routing::get;

use crate::lazy::Lazy;

/// Renders the counters of `lazy` (none when the lazy path is off).
pub fn render(lazy: Option<&Lazy>) -> String {
    let mut s = String::new();
    let Some(lazy) = lazy else {
        return s;
    };
    let c = lazy.counters();
    let d = lazy.demand_counters();
    for (name, help, v) in [
        (
            "hyperbox_snapshotter_lazy_verified_total",
            "Lazily served layers that matched their image once complete.",
            &c.verified,
        ),
        (
            "hyperbox_snapshotter_lazy_rejected_total",
            "Lazily served layers that did not match their image and are no longer served.",
            &c.rejected,
        ),
        (
            "hyperbox_snapshotter_lazy_chain_mismatch_total",
            "Index entries not used because their diff_id does not give the chain id containerd asked for.",
            &c.chain_mismatch,
        ),
        (
            "hyperbox_snapshotter_lazy_chunk_failures_total",
            "Chunk fetches that failed or did not match the index.",
            &c.chunk_failures,
        ),
        (
            "hyperbox_snapshotter_lazy_denied_reads_total",
            "Reads of lazy layers answered with EIO.",
            &c.denied_reads,
        ),
        (
            "hyperbox_snapshotter_lazy_waited_reads_total",
            "Reads of lazy layers that found bytes missing and waited for them (from the registry or the layer's download); the others were answered from local bytes.",
            &c.waited_reads,
        ),
        (
            "hyperbox_snapshotter_lazy_prefetched_chunks_total",
            "Chunks of lazy layers fetched ahead from learned prefetch lists (what earlier runs read).",
            &c.prefetched_chunks,
        ),
        (
            "hyperbox_snapshotter_lazy_prewarmed_layers_total",
            "Lazy layers prewarmed ahead of a pull: their learned prefetch lists fetched while the node was calm.",
            &c.prewarmed_layers,
        ),
        (
            "hyperbox_snapshotter_lazy_prewarmed_chunks_total",
            "Chunks fetched by prewarms.",
            &c.prewarmed_chunks,
        ),
        (
            "hyperbox_snapshotter_lazy_prewarm_stops_total",
            "Prewarms stopped because the node's I/O came under pressure.",
            &c.prewarm_stops,
        ),
        (
            "hyperbox_snapshotter_lazy_prewarm_used_total",
            "Prewarmed lazy layers a pull then took.",
            &c.prewarm_used,
        ),
        (
            "hyperbox_snapshotter_lazy_prewarm_expired_total",
            "Prewarmed lazy layers removed unused.",
            &c.prewarm_expired,
        ),
        (
            "hyperbox_snapshotter_lazy_shared_prefetch_lists_total",
            "Lazy layers whose prefetch used a list shared through the registry (`hb image prefetch push`).",
            &c.shared_prefetch_lists,
        ),
        (
            "hyperbox_snapshotter_lazy_readahead_chunks_total",
            "Chunks of lazy layers fetched ahead of reads (read-ahead after a jump stops while reads use less than a quarter of it).",
            &c.readahead_chunks,
        ),
        (
            "hyperbox_snapshotter_lazy_readahead_used_chunks_total",
            "Chunks fetched ahead of reads that a read then touched.",
            &c.readahead_used,
        ),
        (
            "hyperbox_snapshotter_lazy_layer_filled_chunks_total",
            "Chunks of lazy layers filled from the image's own layer blob, fetched whole and converted on the node (snapshotter.lazy_fill_from_layer).",
            &c.layer_filled_chunks,
        ),
        (
            "hyperbox_snapshotter_lazy_untried_layers_total",
            "Lazy layers of images no run had taught a prefetch list (none on this node, none shared beside the index): downloaded whole at mount without giving way to reads.",
            &c.untried_layers,
        ),
        (
            "hyperbox_snapshotter_lazy_span_chunks_total",
            "Chunks of lazy layers with a layer map (index v3) made from gzip bytes a request had inflated for other chunks of the same span, before any read asked for them.",
            &c.span_chunks,
        ),
        (
            "hyperbox_snapshotter_lazy_map_refetches_total",
            "Further layer-blob requests of mapped lazy layers whose first fetch, sized from the span's compression ratio, ended short of the data (each fetches as much again, up to the span's end).",
            &c.map_refetches,
        ),
        (
            "hyperbox_snapshotter_lazy_learned_checkpoint_requests_total",
            "Layer-blob requests of mapped lazy layers that started from a checkpoint learned from earlier runs (pushed with `hb image prefetch push`) rather than the map's own.",
            &c.learned_point_requests,
        ),
        (
            "hyperbox_snapshotter_lazy_learned_checkpoint_failures_total",
            "Learned checkpoints a request failed from (bytes that did not inflate or verify); the request was made again from the map's checkpoint and that learned one is not used again.",
            &c.learned_point_failures,
        ),
        (
            "hyperbox_snapshotter_lazy_download_read_bytes_total",
            "Layer-blob bytes that reads of mapped lazy layers took from the layer's own download on this node (its staging file) instead of fetching them from the registry.",
            &c.download_read_bytes,
        ),
        (
            "hyperbox_snapshotter_lazy_download_waits_total",
            "Reads of mapped lazy layers that waited for the layer's download at once (an image no run taught) to bring their bytes, rather than fetching them from the registry.",
            &c.download_waits,
        ),
        (
            "hyperbox_snapshotter_lazy_layer_range_bytes_total",
            "Layer-blob bytes of mapped lazy layers fetched from the registry with Range requests (reads, learned prefetch, a Range fill); whole downloads of the layer are not counted here.",
            &c.layer_range_bytes,
        ),
        (
            "hyperbox_snapshotter_lazy_window_bytes_total",
            "Compressed checkpoint-window bytes fetched for mapped lazy layers (from the layer map's blob and the learned checkpoints' blob).",
            &c.window_bytes,
        ),
        (
            "hyperbox_snapshotter_lazy_block_table_bytes_total",
            "Block digest table bytes fetched for lazy layers indexed with block digests (index version 4): the entries beside the blocks reads fetched.",
            &c.block_table_bytes,
        ),
        (
            "hyperbox_snapshotter_lazy_block_table_failures_total",
            "Block digest table requests whose entries did not match the index's chunk digests; those reads fetched and checked whole chunks instead.",
            &c.block_table_failures,
        ),
        (
            "hyperbox_snapshotter_lazy_download_chunks_total",
            "Chunks of mapped lazy layers made from the layer's whole download on this node as its bytes arrived, before any read asked for them.",
            &c.download_chunks,
        ),
        (
            "hyperbox_snapshotter_lazy_fill_yields_total",
            "Times the background fill waited for pending reads to settle before its next chunk or, filling from the layer, its next 1 MiB of the layer download.",
            &d.fill_yields,
        ),
        (
            "hyperbox_snapshotter_lazy_fill_preempted_total",
            "Background chunk fetches given up because a read arrived that did not need them.",
            &d.fill_preempted,
        ),
        (
            "hyperbox_snapshotter_lazy_fill_pressure_pauses_total",
            "Times the background fill paused for the node's I/O pressure (snapshotter.lazy_fill_pause_io_pressure).",
            &d.fill_pressure_pauses,
        ),
    ] {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
        let _ = writeln!(s, "{name} {}", v.load(Ordering::Relaxed));
    }
    let name = "hyperbox_snapshotter_lazy_layers";
    let _ = writeln!(
        s,
        "# HELP {name} Lazy layers by phase.\n# TYPE {name} gauge"
    );
    for (phase, n) in lazy.phases() {
        let _ = writeln!(s, "{name}{{phase=\"{phase}\"}} {n}");
    }
    // The histogram's buckets come from prometheus-client, encoded
    // without OpenMetrics' closing `# EOF` (the page goes on being
    // Prometheus text).
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register(
        "hyperbox_snapshotter_lazy_read_wait_seconds",
        "Time reads of lazy layers still filling waited for their answer, from the kernel's event (local bytes answer in microseconds, missing ones after a fetch)",
        c.read_wait.0.clone(),
    );
    registry.register(
        "hyperbox_snapshotter_lazy_read_bytes",
        "Bytes each read of a lazy layer still filling asked for, as the kernel sent it (a block, or a readahead window of the EROFS file)",
        c.read_size.0.clone(),
    );
    let _ = prometheus_client::encoding::text::encode_registry(&mut s, &registry);
    s
}

/// Serves `/metrics` on `address` in the background.
pub async fn serve(address: &str, lazy: Option<Arc<Lazy>>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("bind snapshotter.metrics_address {address}"))?;
    let bound = listener.local_addr().context("metrics address")?;
    tracing::info!(address = %bound, "metrics served");
    let router = Router::new().route(
        "/metrics",
        get(move || {
            let lazy = lazy.clone();
            async move { render(lazy.as_deref()) }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}
