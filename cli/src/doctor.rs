//! `hb doctor`: the kernel features hyperbox depends on, each with how it
//! was detected.

use anyhow::{Context, Result};

use crate::table;

/// Probes the machine and prints the results.
pub fn run(config: &hyperbox_config::Config, json: bool) -> Result<()> {
    // Probe on the snapshotter's filesystem when it exists: that is where
    // images will be mounted from; else a temporary directory.
    let root = &config.snapshotter.root;
    let scratch = if root.is_dir() {
        root.clone()
    } else {
        std::env::temp_dir()
    };
    let scratch = tempfile_in(&scratch)?;
    let mut features = hyperbox_kernel::features::detect(&scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    // What the snapshotter will mount fetched layers with, by the same rule
    // it applies at start-up.
    let wanted = config.snapshotter.erofs_backend;
    let backend = hyperbox_kernel::features::choose_backend(wanted, &features);
    let (available, value, how) = match (&backend, config.snapshotter.remote) {
        (_, false) => (
            false,
            "off".to_string(),
            "snapshotter.remote = false".to_string(),
        ),
        (Ok(Some(b)), true) => (
            true,
            b.as_str().to_string(),
            format!(
                "snapshotter.erofs_backend = {}, chosen from the probes above",
                format!("{wanted:?}").to_lowercase()
            ),
        ),
        (Ok(None), true) => (
            false,
            "none".to_string(),
            "no file-backed EROFS and no loop devices: the remote path stays off".to_string(),
        ),
        (Err(e), true) => (false, "error".to_string(), format!("{e:#}")),
    };
    features.push(hyperbox_kernel::features::Feature {
        name: "erofs_backend",
        available,
        value,
        how,
    });
    features.push(lazy_backend(config, backend.ok().flatten(), &features));
    if json {
        println!("{}", serde_json::to_string_pretty(&features)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = features
        .iter()
        .map(|f| vec![f.name.to_string(), f.value.clone(), f.how.clone()])
        .collect();
    print!(
        "{}",
        table::render(&["FEATURE", "AVAILABLE", "HOW DETECTED"], &rows)
    );
    Ok(())
}

/// How layers of indexed images reach this node, by the snapshotter's own
/// rule (`hyperbox_kernel::features::lazy_serve`).
fn lazy_backend(
    config: &hyperbox_config::Config,
    backend: Option<hyperbox_kernel::mount::Backend>,
    features: &[hyperbox_kernel::features::Feature],
) -> hyperbox_kernel::features::Feature {
    use hyperbox_kernel::features::{LazyServe, lazy_serve};
    let (available, value, how) = match backend {
        _ if !config.snapshotter.remote => (false, "off", "snapshotter.remote = false".to_string()),
        None => (false, "off", "no EROFS backend (above)".to_string()),
        Some(b) => match lazy_serve(config.snapshotter.lazy_backend, b, features) {
            Err(why) => (false, "whole", why.to_string()),
            Ok(_) if !config.snapshotter.lazy => (
                false,
                "whole",
                "snapshotter.lazy = false: indexed images are fetched whole".to_string(),
            ),
            Ok(LazyServe::Fanotify) => (
                true,
                "fanotify",
                "file-backed EROFS + fanotify pre-content events: indexed images are mounted \
                 at once and fetched on first access"
                    .to_string(),
            ),
            Ok(LazyServe::Fuse) => (
                true,
                "fuse",
                format!(
                    "{}: indexed images are mounted at once on a loop device over a file served \
                     through FUSE, fetched on first access, and switched to the local file once \
                     complete",
                    if config.snapshotter.lazy_backend == hyperbox_config::LazyBackend::Fuse {
                        "snapshotter.lazy_backend = \"fuse\""
                    } else {
                        "no fanotify pre-content events with file-backed EROFS (6.14+)"
                    }
                ),
            ),
        },
    };
    hyperbox_kernel::features::Feature {
        name: "lazy_backend",
        available,
        value: value.to_string(),
        how,
    }
}

fn tempfile_in(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let p = dir.join(format!(".hb-doctor-{}", std::process::id()));
    std::fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
    Ok(p)
}
