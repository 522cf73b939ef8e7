//! The daemon's life cycle: open the snapshotter, remove crash leftovers,
//! bind the unix socket with its mode, serve until SIGTERM or SIGINT.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;

use hyperbox_config::ErofsBackend;
use hyperbox_registry::Registry;

use crate::erofs::mount::Backend;
use crate::lazy::Lazy;
use crate::proto::snapshots_server::SnapshotsServer;
use crate::remote::Remote;
use crate::service::{RemoteOptions, Service};
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

/// The EROFS backend `wanted` resolves to on this kernel, given the
/// detected features; `None` when no backend can work.
pub fn choose_backend(
    wanted: ErofsBackend,
    features: &[crate::features::Feature],
) -> Result<Option<Backend>> {
    let has = |n: &str| features.iter().any(|f| f.name == n && f.available);
    let file = has("erofs_file_backed");
    let lo = has("erofs") && has("loop");
    Ok(match wanted {
        ErofsBackend::Auto if file => Some(Backend::File),
        ErofsBackend::Auto if lo => Some(Backend::Loop),
        ErofsBackend::Auto => None,
        ErofsBackend::File if file => Some(Backend::File),
        ErofsBackend::File => bail!(
            "snapshotter.erofs_backend = \"file\" but this kernel cannot mount EROFS from a file \
             (needs 6.12+ with EROFS_FS_BACKED_BY_FILE); use \"auto\" or \"loop\""
        ),
        ErofsBackend::Loop if lo => Some(Backend::Loop),
        ErofsBackend::Loop => {
            bail!("snapshotter.erofs_backend = \"loop\" but EROFS or /dev/loop-control is missing")
        }
    })
}

/// Runs the snapshotter described by `full` until a termination signal.
pub async fn run(full: &hyperbox_config::Config) -> Result<()> {
    let config = &full.snapshotter;
    // Checked before the store is opened, so a second daemon says why.
    ensure_free(&config.address)?;
    let mut sn = Snapshotter::open(&config.root)
        .with_context(|| format!("open snapshotter root {}", config.root.display()))?;
    if config.cleanup_on_start {
        let report = sn
            .cleanup_on_start()
            .context("remove leftovers of an earlier crash")?;
        if !report.removed.is_empty() {
            tracing::info!(removed = ?report.removed, "removed leftovers of unfinished operations");
        }
    }
    let features = crate::features::detect(&config.root);
    for f in &features {
        tracing::info!(feature = f.name, available = f.available, value = %f.value, how = %f.how, "kernel feature");
    }
    let remote = if config.remote {
        match choose_backend(config.erofs_backend, &features)? {
            Some(b) => {
                sn.set_erofs_backend(b);
                let registry =
                    Arc::new(Registry::new(&full.registry).context("registry settings")?);
                let options = crate::erofs::writer::Options {
                    allow_devices: config.allow_device_nodes,
                };
                let remote = Remote::open(&config.root, registry.clone(), options)
                    .context("prepare the layer cache")?;
                let pre_content = features
                    .iter()
                    .any(|f| f.name == "fanotify_pre_content" && f.available);
                // Opened whenever the kernel allows, even with lazy = false:
                // incomplete layers from before must still be served.
                let lazy = if b == Backend::File && pre_content {
                    let (lazy, resumed) =
                        Lazy::open(&config.root, registry).context("start the lazy path")?;
                    if resumed > 0 {
                        // While we were down, unfetched ranges of these
                        // layers read as zeros; do not let cached zeros
                        // outlive the outage.
                        tracing::warn!(
                            resumed,
                            "incomplete lazy layers taken back; dropping the page cache once"
                        );
                        let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
                    }
                    tracing::info!(
                        "lazy path enabled: layers of indexed images are fetched on first access"
                    );
                    Some(lazy)
                } else {
                    if config.lazy {
                        tracing::info!(
                            pre_content,
                            backend = b.as_str(),
                            "lazy path off: needs file-backed EROFS and fanotify pre-content events"
                        );
                    }
                    None
                };
                tracing::info!(
                    backend = b.as_str(),
                    "remote path enabled: labelled layers are fetched and served as EROFS"
                );
                Some(RemoteOptions {
                    remote: Arc::new(remote),
                    fallback_to_local: config.fallback_to_local,
                    prefetch: config.prefetch,
                    lazy,
                    lazy_new: config.lazy,
                })
            }
            None => {
                tracing::warn!(
                    "remote path disabled: this kernel cannot mount EROFS (no file-backed mounts, no loop devices)"
                );
                None
            }
        }
    } else {
        None
    };
    // Layers stay mounted across a daemon restart (same mount namespace);
    // after a reboot they are mounted again here.
    // Mounting an incomplete lazy layer reads through the lazy path, whose
    // tasks need the runtime: let them run elsewhere while this thread waits.
    let mounted =
        tokio::task::block_in_place(|| sn.mount_layers()).context("mount fetched layers")?;
    if mounted > 0 {
        tracing::info!(mounted, "mounted fetched layers");
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
        .add_service(SnapshotsServer::new(Service::new(Arc::new(sn), remote)))
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
