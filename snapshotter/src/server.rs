//! The daemon's life cycle: open the snapshotter, remove crash leftovers,
//! bind the unix socket with its mode, serve until SIGTERM or SIGINT.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;

use crate::proto::snapshots_server::SnapshotsServer;
use crate::service::Service;
use crate::snapshots::Snapshotter;

/// Fails when a daemon still answers on `address`.
pub fn ensure_free(address: &Path) -> Result<()> {
    if std::os::unix::net::UnixStream::connect(address).is_ok() {
        bail!("{} is in use by a running snapshotter", address.display());
    }
    Ok(())
}

/// Binds `address`: removes a stale socket file left by a crash, but refuses
/// to steal the socket of a daemon that still answers on it.
pub fn bind(address: &Path, mode: u32) -> Result<UnixListener> {
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if address.exists() {
        ensure_free(address)?;
        std::fs::remove_file(address)
            .with_context(|| format!("remove stale socket {}", address.display()))?;
    }
    let listener =
        UnixListener::bind(address).with_context(|| format!("bind {}", address.display()))?;
    std::fs::set_permissions(address, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {:o} {}", mode, address.display()))?;
    Ok(listener)
}

/// Runs the snapshotter described by `config` until a termination signal.
pub async fn run(config: &hyperbox_config::Snapshotter) -> Result<()> {
    // Checked before the store is opened, so a second daemon says why.
    ensure_free(&config.address)?;
    let sn = Snapshotter::open(&config.root)
        .with_context(|| format!("open snapshotter root {}", config.root.display()))?;
    if config.cleanup_on_start {
        let report = sn
            .cleanup_on_start()
            .context("remove leftovers of an earlier crash")?;
        if !report.removed.is_empty() {
            tracing::info!(removed = ?report.removed, "removed leftovers of unfinished operations");
        }
    }
    for f in crate::features::detect(&config.root) {
        tracing::info!(feature = f.name, available = f.available, value = %f.value, how = %f.how, "kernel feature");
    }
    let listener = bind(&config.address, config.socket_mode)?;
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    tracing::info!(
        root = %config.root.display(),
        address = %config.address.display(),
        "hyperbox-snapshotter serving"
    );
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(Service::new(Arc::new(sn))))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("shutting down");
        })
        .await
        .context("serve gRPC")?;
    let _ = std::fs::remove_file(&config.address);
    Ok(())
}
