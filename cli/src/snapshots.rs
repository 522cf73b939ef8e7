//! `hb snapshots ls`: what hyperbox-snapshotter holds, asked over its socket.

use anyhow::{Context, Result};
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{Kind, ListSnapshotsRequest, UsageRequest};
use futures::StreamExt;
use serde::Serialize;

use crate::table;

/// One snapshot as `hb snapshots ls --json` prints it.
#[derive(Debug, Serialize)]
struct Row {
    name: String,
    kind: &'static str,
    parent: String,
    size: i64,
    inodes: i64,
    created: i64,
    labels: std::collections::BTreeMap<String, String>,
}

fn kind(k: i32) -> &'static str {
    match Kind::try_from(k) {
        Ok(Kind::View) => "view",
        Ok(Kind::Active) => "active",
        Ok(Kind::Committed) => "committed",
        _ => "unknown",
    }
}

/// Lists snapshots matching `filters` (containerd filter syntax).
pub async fn ls(config: &hyperbox_config::Config, filters: Vec<String>, json: bool) -> Result<()> {
    let address = &config.snapshotter.address;
    let channel = containerd_client::connect(address).await.with_context(|| {
        format!(
            "connect to hyperbox-snapshotter at {} (is it running?)",
            address.display()
        )
    })?;
    let mut client = SnapshotsClient::new(channel);
    let mut stream = client
        .list(ListSnapshotsRequest {
            snapshotter: "hyperbox".into(),
            filters,
        })
        .await
        .context("list snapshots")?
        .into_inner();
    let mut rows = Vec::new();
    while let Some(batch) = stream.next().await {
        for info in batch.context("list snapshots")?.info {
            let usage = client
                .usage(UsageRequest {
                    snapshotter: "hyperbox".into(),
                    key: info.name.clone(),
                })
                .await
                .map(|u| u.into_inner())
                .unwrap_or_default();
            rows.push(Row {
                kind: kind(info.kind),
                parent: info.parent,
                size: usage.size,
                inodes: usage.inodes,
                created: info.created_at.map(|t| t.seconds).unwrap_or(0),
                labels: info.labels.into_iter().collect(),
                name: info.name,
            });
        }
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.kind.to_string(),
                table::bytes(r.size),
                r.inodes.to_string(),
                if r.parent.is_empty() {
                    "-".into()
                } else {
                    r.parent.clone()
                },
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(&["NAME", "KIND", "SIZE", "INODES", "PARENT"], &cells)
    );
    Ok(())
}
