//! `hb image prewarm REF`: asks the snapshotter (its control socket,
//! `snapshotter.control_address`) to fetch the learned prefetch lists of
//! the image's lazy layers now, so its next pull starts from local bytes.
//! The agent makes the same call for images that start often
//! (`agent.prewarm`); this is the operator's way to do it by hand.

use anyhow::{Context, Result, bail};
use hyperbox_api::client::Client;
use hyperbox_api::types::{PrewarmRequest, WarmOutcome};

use crate::table;

/// Prewarms `reference` and prints what happened to each layer.
pub async fn run(
    config: &hyperbox_config::Config,
    reference: &str,
    max_io_pressure: f64,
    json: bool,
) -> Result<()> {
    let socket = &config.snapshotter.control_address;
    if socket.as_os_str().is_empty() {
        bail!(
            "snapshotter.control_address is empty in the config: the snapshotter takes no prewarm calls"
        );
    }
    // A large list on a slow link takes a while: the call waits for it.
    let client = Client::snapshotter(socket).with_timeout(std::time::Duration::from_secs(1800));
    let request = PrewarmRequest {
        image: reference.to_string(),
        max_io_pressure,
    };
    let p = client
        .prewarm(&request)
        .await
        .with_context(|| format!("prewarm {reference}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    if !p.indexed {
        println!(
            "{reference} ({}) has no hyperbox index: its layers are fetched whole when pulled, nothing to prewarm",
            p.manifest
        );
        return Ok(());
    }
    let rows: Vec<Vec<String>> = p
        .layers
        .iter()
        .map(|l| {
            let outcome = match &l.outcome {
                WarmOutcome::Failed(why) => format!("failed: {why}"),
                o => o.as_str().to_string(),
            };
            vec![
                l.layer.clone(),
                outcome,
                l.listed.to_string(),
                l.fetched.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(&["LAYER", "OUTCOME", "LISTED", "FETCHED"], &rows)
    );
    let fetched: usize = p.layers.iter().map(|l| l.fetched).sum();
    println!("{fetched} chunks fetched in {} ms", p.ms);
    Ok(())
}
