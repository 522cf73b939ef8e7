//! The daemon's life cycle: open the snapshotter, remove crash leftovers,
//! bind the unix socket with its mode, serve until SIGTERM or SIGINT.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;

use hyperbox_api::daemon::{self, bind_unix, ensure_free};
use hyperbox_kernel::features::{self, LazyServe, choose_backend};
use hyperbox_kernel::fuse::FuseReads;
use hyperbox_registry::Registry;

use crate::fdstore;
use crate::lazy::{self, Lazy};
use crate::proto::snapshots_server::SnapshotsServer;
use crate::pull::{self, Puller};
use crate::remote::{Remote, WholeLayers};
use crate::service::Service;
use crate::snapshots::Snapshotter;

/// Runs the snapshotter described by `full` until a termination signal.
pub async fn run(full: &hyperbox_config::Config) -> Result<()> {
    let config = &full.snapshotter;
    // Checked before the store is opened, so a second daemon says why.
    ensure_free(&config.address).map_err(|e| match e {
        // Said as before the check moved to hyperbox-api: operators and
        // scripts know this line.
        daemon::Error::InUse { path } => {
            anyhow::anyhow!("{} is in use by a running snapshotter", path.display())
        }
        e => e.into(),
    })?;
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
    let features = features::detect(&config.root);
    for f in &features {
        tracing::info!(feature = f.name, available = f.available, value = %f.value, how = %f.how, "kernel feature");
    }
    let remote = if config.remote {
        match choose_backend(config.erofs_backend, &features)? {
            Some(b) => {
                sn.set_erofs_backend(b);
                let registry =
                    Arc::new(Registry::new(&full.registry).context("registry settings")?);
                let options = hyperbox_erofs::writer::Options {
                    allow_devices: config.allow_device_nodes,
                    max_layer_bytes: config.max_layer_bytes,
                    max_layer_entries: config.max_layer_entries,
                };
                let remote = Arc::new(
                    Remote::open(&config.root, registry.clone(), options)
                        .context("prepare the layer cache")?,
                );
                let serve = features::lazy_serve(config.lazy_backend, b, &features);
                let options = lazy::Options {
                    max_chunk_fetches: config.lazy_max_chunk_fetches as usize,
                    verify: config.lazy_verify,
                    fill_pause_io_pressure: f64::from(config.lazy_fill_pause_io_pressure),
                    fill_request: lazy::FILL_REQUEST,
                    shared_prefetch: config.lazy_shared_prefetch,
                    fill_from_layer: config.lazy_fill_from_layer,
                };
                let whole = Some(Arc::new(WholeLayers(remote.clone())) as Arc<dyn lazy::Verifier>);
                // Opened whenever the kernel allows, even with lazy = false:
                // incomplete layers from before must still be served.
                let lazy = match serve {
                    Ok(LazyServe::Fanotify) => {
                        let group = fdstore::fanotify_group()
                            .context("create the fanotify group (FAN_CLASS_PRE_CONTENT)")?;
                        let (lazy, resumed) = Lazy::open(
                            &config.root,
                            registry,
                            Arc::new(group.group),
                            whole,
                            options,
                        )
                        .context("start the lazy path")?;
                        sn.set_layer_gate(lazy.clone());
                        if resumed > 0 && !group.kept {
                            // While we were down, unfetched ranges of these
                            // layers read as zeros; do not let cached zeros
                            // outlive the outage.
                            tracing::warn!(
                                resumed,
                                "incomplete lazy layers taken back; dropping the page cache once"
                            );
                            let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
                        }
                        release_earlier_fuse(&config.root, lazy.settled(layer_files(&config.root)));
                        tracing::info!(
                            "lazy path enabled (fanotify): layers of indexed images are fetched on first access"
                        );
                        Some(lazy)
                    }
                    Ok(LazyServe::Fuse) => {
                        let fuse = Arc::new(
                            FuseReads::mount(&config.root.join("fuse"))
                                .context("mount the FUSE filesystem of the lazy path")?,
                        );
                        let (lazy, resumed) =
                            Lazy::open(&config.root, registry, fuse.clone(), whole, options)
                                .context("start the lazy path")?;
                        sn.set_layer_gate(lazy.clone());
                        // Loop devices of layers mounted by an earlier run
                        // read through its dead connection (EIO, never
                        // zeros); point them at this one.
                        let complete = lazy.settled(layer_files(&config.root));
                        let (switched, failing) =
                            tokio::task::block_in_place(|| fuse.adopt(complete));
                        tracing::info!(
                            dir = %fuse.dir().display(),
                            resumed,
                            switched,
                            failing,
                            "lazy path enabled (FUSE): layers of indexed images are fetched on first access through a loop device over FUSE, switched to the local file once complete"
                        );
                        Some(lazy)
                    }
                    Err(why) => {
                        // Lazy files from before cannot be served now: their
                        // snapshots are not mounted and nothing is built on them.
                        let unservable = lazy::Unservable::scan(&config.root);
                        if !unservable.is_empty() {
                            tracing::error!(
                                files = unservable.len(),
                                "incomplete lazy layers cannot be served without the lazy path; images using them must be pulled again"
                            );
                        }
                        release_earlier_fuse(
                            &config.root,
                            unservable.servable(layer_files(&config.root)),
                        );
                        sn.set_layer_gate(Arc::new(unservable));
                        if config.lazy {
                            tracing::info!(backend = b.as_str(), why, "lazy path off");
                        }
                        None
                    }
                };
                tracing::info!(
                    backend = b.as_str(),
                    "remote path enabled: labelled layers are fetched and served as EROFS"
                );
                Some((
                    remote,
                    lazy,
                    pull::Options {
                        fallback_to_local: config.fallback_to_local,
                        prefetch: config.prefetch,
                        lazy_new: config.lazy,
                    },
                ))
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
    let sn = Arc::new(sn);
    if !config.metrics_address.is_empty() {
        let lazy = remote.as_ref().and_then(|(_, lazy, _)| lazy.clone());
        crate::metrics::serve(&config.metrics_address, lazy).await?;
    }
    if !config.control_address.as_os_str().is_empty() {
        let lazy = remote
            .as_ref()
            .filter(|_| config.lazy)
            .and_then(|(remote, lazy, _)| lazy.clone().map(|l| (l, remote.clone())));
        crate::control::serve(&config.control_address, lazy, sn.clone())?;
    }
    let puller = remote
        .map(|(remote, lazy, options)| Arc::new(Puller::new(sn.clone(), remote, lazy, options)));
    let listener = bind_unix(&config.address, config.socket_mode)?;
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    tracing::info!(
        root = %config.root.display(),
        address = %config.address.display(),
        "hyperbox-snapshotter serving"
    );
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(Service::new(sn, puller)))
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
    if !config.control_address.as_os_str().is_empty() {
        let _ = std::fs::remove_file(&config.control_address);
    }
    Ok(())
}

/// Loop devices of an earlier instance that served through FUSE, with a
/// configuration that no longer does: complete layers go on reading their
/// local files, the others keep failing (hyperbox_kernel::fuse).
fn release_earlier_fuse(root: &Path, complete: Vec<PathBuf>) {
    // Switching waits for the devices' reads in flight.
    let (switched, failing) =
        tokio::task::block_in_place(|| hyperbox_kernel::fuse::release_earlier(root, complete));
    if switched + failing > 0 {
        tracing::warn!(
            switched,
            failing,
            "layers mounted through FUSE by an earlier instance taken over without FUSE; the failing ones need their images pulled again"
        );
    }
}

/// Every layer image file under `root` a loop device may read: lazy files
/// and the snapshots' links.
fn layer_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root.join("lazy"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "erofs") {
            out.push(p);
        }
    }
    for e in std::fs::read_dir(root.join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = e.path().join("layer.erofs");
        if p.exists() {
            out.push(p);
        }
    }
    out
}
