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
    let features = hyperbox_snapshotter::features::detect(&scratch);
    let _ = std::fs::remove_dir_all(&scratch);
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

fn tempfile_in(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let p = dir.join(format!(".hb-doctor-{}", std::process::id()));
    std::fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
    Ok(p)
}
