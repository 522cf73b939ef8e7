//! The snapshotter's own calls, HTTP with JSON bodies on a unix socket
//! (`snapshotter.control_address`, mode 0600): `POST /v1/prewarm` fetches
//! the learned prefetch lists of an image's lazy layers ahead of its next
//! pull (`crate::lazy`'s `prewarm`). containerd's snapshots API has no
//! room for it, and it is root's to call: it makes the node fetch.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use hyperbox_api::daemon::bind_unix;
use hyperbox_api::types::{Prewarm, PrewarmRequest};
use hyperbox_registry::digest::Digest;

use crate::lazy::Lazy;
use crate::remote::Remote;
use crate::snapshots::Snapshotter;

/// What the calls reach.
#[derive(Clone)]
struct App {
    /// Both absent on a node without the lazy path.
    lazy: Option<(Arc<Lazy>, Arc<Remote>)>,
    snapshots: Arc<Snapshotter>,
}

/// Serves the control socket at `path` in the background.
pub fn serve(
    path: &Path,
    lazy: Option<(Arc<Lazy>, Arc<Remote>)>,
    snapshots: Arc<Snapshotter>,
) -> Result<()> {
    let listener = bind_unix(path, 0o600)?;
    let router = Router::new()
        .route("/v1/prewarm", post(prewarm))
        .with_state(App { lazy, snapshots });
    tracing::info!(address = %path.display(), "control socket served");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "control socket stopped");
        }
    });
    Ok(())
}

async fn prewarm(
    State(app): State<App>,
    Json(req): Json<PrewarmRequest>,
) -> Result<Json<Prewarm>, (StatusCode, String)> {
    if !(0.0..=100.0).contains(&req.max_io_pressure) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!(
                "max_io_pressure {} is not a percentage (0-100)",
                req.max_io_pressure
            ),
        ));
    }
    if let Err(e) = hyperbox_registry::Reference::parse(&req.image) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("image {:?}: {e}", req.image),
        ));
    }
    let Some((lazy, remote)) = app.lazy else {
        return Err((
            StatusCode::CONFLICT,
            "this snapshotter has no lazy path (snapshotter.lazy off, or the kernel cannot serve it: see hb doctor); nothing to prewarm".into(),
        ));
    };
    // Committed snapshots are named `<namespace>/<n>/<chain id>` by
    // containerd: a chain committed in any namespace is not prepared
    // again while it stays. A layer fetched whole is on the node too.
    let snapshots = app.snapshots.clone();
    let walked =
        tokio::task::spawn_blocking(move || snapshots.walk(&["kind==committed".into()])).await;
    let committed: HashSet<String> = match walked
        .map_err(anyhow::Error::from)
        .and_then(|r| r.map_err(anyhow::Error::from))
    {
        Ok(all) => all
            .into_iter()
            .filter_map(|i| i.name.rsplit('/').next().map(str::to_string))
            .collect(),
        Err(e) => {
            return Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("list committed snapshots: {e:#}"),
            ));
        }
    };
    let on_node = move |layer: &str, chain: &str| {
        committed.contains(chain)
            || Digest::parse(layer).is_ok_and(|d| remote.layer_path(&d).exists())
    };
    match lazy.prewarm(&req.image, req.max_io_pressure, on_node).await {
        Ok(p) => Ok(Json(p)),
        Err(e) => {
            let why = hyperbox_api::error_chain(&e);
            tracing::warn!(image = %req.image, error = %why, "prewarm failed");
            Err((
                StatusCode::BAD_GATEWAY,
                format!("prewarm {}: {why}", req.image),
            ))
        }
    }
}
