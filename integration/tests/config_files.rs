//! The files in `config/` are what operators copy: they must be accepted by
//! the real programs that read them. The 1.7 snippets are loaded by Debian's
//! containerd 1.7, the 2.x snippets by the containerd 2.x release the tests
//! run (whatever `HYPERBOX_CONTAINERD_LINE` says: both are checked).

use std::path::{Path, PathBuf};
use std::process::Command;

use hyperbox_integration::containerd::CONTAINERD_1_7;
use hyperbox_integration::gobin;
use hyperbox_integration::prereq::Prereq;
use hyperbox_integration::require;

fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config")
}

/// `containerd --config <snippet> config dump`: the merged config as the
/// daemon would run it, with TOML quotes made uniform (1.7 prints `"`, 2.x
/// `'`).
fn dump(containerd: &Path, snippet: &str) -> String {
    let out = Command::new(containerd)
        .arg("--config")
        .arg(config_dir().join(snippet))
        .args(["config", "dump"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{} rejects {snippet}: {stderr}",
        containerd.display()
    );
    // containerd logs a key it does not know and goes on: that is a snippet
    // that silently does nothing.
    assert!(
        !stderr.contains("unknown key") && !stderr.contains("level=error"),
        "{snippet}: {stderr}"
    );
    String::from_utf8_lossy(&out.stdout).replace('\'', "\"")
}

/// The body of table `[header]` in a dump, up to the next table that is not
/// one of its own sub-tables (or arrays of tables).
fn section(dump: &str, header: &str) -> String {
    let open = format!("[{header}]");
    let start = dump
        .find(&open)
        .unwrap_or_else(|| panic!("no {open} in:\n{dump}"));
    let own = format!("{header}.");
    dump[start + open.len()..]
        .lines()
        .take_while(|l| {
            let t = l.trim_start();
            !t.starts_with('[') || t.trim_start_matches('[').starts_with(&own)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn containerd_1_7_accepts_the_snapshotter_snippet() {
    require!(Prereq::Containerd1_7);
    let dump = dump(
        Path::new(CONTAINERD_1_7),
        "containerd/1.7/hyperbox-snapshotter.toml",
    );
    let proxy = section(&dump, "proxy_plugins.hyperbox");
    assert!(proxy.contains("type = \"snapshot\""), "{proxy}");
    assert!(
        proxy.contains("address = \"/run/hyperbox/snapshotter.sock\""),
        "{proxy}"
    );
    assert!(
        proxy.contains("root = \"/var/lib/hyperbox/snapshotter\""),
        "{proxy}"
    );
    let cri = section(&dump, "plugins.\"io.containerd.grpc.v1.cri\".containerd");
    assert!(cri.contains("snapshotter = \"hyperbox\""), "{cri}");
    assert!(
        cri.contains("disable_snapshot_annotations = false"),
        "{cri}"
    );
}

#[test]
fn shipped_hyperbox_toml_states_exactly_the_built_in_defaults() {
    let path = config_dir().join("hyperbox.toml");
    let loaded = hyperbox_config::Config::load(Some(&path)).unwrap();
    assert_eq!(loaded, hyperbox_config::Config::default());
}

#[test]
fn containerd_1_7_accepts_the_nri_snippet() {
    require!(Prereq::Containerd1_7);
    let dump = dump(
        Path::new(CONTAINERD_1_7),
        "containerd/1.7/hyperbox-nri.toml",
    );
    let nri = section(&dump, "plugins.\"io.containerd.nri.v1.nri\"");
    assert!(nri.contains("disable = false"), "{nri}");
    assert!(
        nri.contains("socket_path = \"/var/run/nri/nri.sock\""),
        "{nri}"
    );
}

#[test]
fn containerd_2_accepts_the_snapshotter_snippet() {
    require!(Prereq::Containerd2);
    let dump = dump(
        &gobin::containerd(),
        "containerd/2.x/hyperbox-snapshotter.toml",
    );
    let proxy = section(&dump, "proxy_plugins.hyperbox");
    assert!(proxy.contains("type = \"snapshot\""), "{proxy}");
    assert!(
        proxy.contains("address = \"/run/hyperbox/snapshotter.sock\""),
        "{proxy}"
    );
    assert!(
        proxy.contains("root = \"/var/lib/hyperbox/snapshotter\""),
        "{proxy}"
    );
    // 2.x moved the CRI image settings to their own plugin; a 1.7-style
    // `grpc.v1.cri.containerd.snapshotter` would be dropped on the floor.
    let images = section(&dump, "plugins.\"io.containerd.cri.v1.images\"");
    assert!(images.contains("snapshotter = \"hyperbox\""), "{images}");
    assert!(
        images.contains("disable_snapshot_annotations = false"),
        "{images}"
    );
    // The transfer service (`ctr image pull`) unpacks into hyperbox, with
    // the remote-snapshot labels, and still into overlayfs.
    assert!(
        proxy.contains("enable_remote_snapshot_annotations = \"true\""),
        "{proxy}"
    );
    let transfer = section(&dump, "plugins.\"io.containerd.transfer.v1.local\"");
    let unpacks: Vec<&str> = transfer
        .split("[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]")
        .skip(1)
        .collect();
    for name in ["overlayfs", "hyperbox"] {
        assert!(
            unpacks
                .iter()
                .any(|u| u.contains(&format!("snapshotter = \"{name}\""))
                    && u.contains("platform = \"linux\"")),
            "no unpack_config for {name}: {transfer}"
        );
    }
}

#[test]
fn containerd_2_accepts_the_nri_snippet() {
    require!(Prereq::Containerd2);
    let dump = dump(&gobin::containerd(), "containerd/2.x/hyperbox-nri.toml");
    let nri = section(&dump, "plugins.\"io.containerd.nri.v1.nri\"");
    assert!(nri.contains("disable = false"), "{nri}");
    assert!(nri.contains("disable_connections = false"), "{nri}");
    assert!(
        nri.contains("socket_path = \"/var/run/nri/nri.sock\""),
        "{nri}"
    );
    assert!(nri.contains("plugin_path = \"/opt/nri/plugins\""), "{nri}");
}

/// The harness runs the containerd 2.x release the install script builds:
/// a bump in one place only would test a binary that is never installed.
#[test]
fn install_script_builds_the_containerd_2_release_the_harness_runs() {
    let script = std::fs::read_to_string(config_dir().join("../scripts/install-deps.sh")).unwrap();
    let pinned = script
        .lines()
        .find_map(|l| l.strip_prefix("CONTAINERD2_VERSION="))
        .and_then(|v| v.split_whitespace().next())
        .map(|v| v.trim_matches('"').to_string())
        .expect("CONTAINERD2_VERSION= in scripts/install-deps.sh");
    assert_eq!(pinned, gobin::CONTAINERD_VERSION);
}

/// The `hyperbox` runtime handler a shim snippet defines, under `table`.
fn assert_shim_handler(dump: &str, table: &str) {
    let rt = section(dump, &format!("{table}.containerd.runtimes.hyperbox"));
    assert!(
        rt.contains("runtime_type = \"io.containerd.hyperbox.v1\""),
        "{rt}"
    );
    assert!(
        rt.contains("ConfigPath = \"/etc/hyperbox/config.toml\""),
        "{rt}"
    );
}

#[test]
fn containerd_1_7_accepts_the_shim_snippet() {
    require!(Prereq::Containerd1_7);
    let dump = dump(
        Path::new(CONTAINERD_1_7),
        "containerd/1.7/hyperbox-shim.toml",
    );
    assert_shim_handler(&dump, "plugins.\"io.containerd.grpc.v1.cri\"");
}

#[test]
fn containerd_2_accepts_the_shim_snippet() {
    require!(Prereq::Containerd2);
    let dump = dump(&gobin::containerd(), "containerd/2.x/hyperbox-shim.toml");
    assert_shim_handler(&dump, "plugins.\"io.containerd.cri.v1.runtime\"");
}
