//! The files in `config/` are what operators copy: they must be accepted by
//! the real programs that read them.

use std::path::PathBuf;
use std::process::Command;

use hyperbox_integration::prereq::Prereq;
use hyperbox_integration::require;

fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config")
}

#[test]
fn containerd_1_7_accepts_the_snapshotter_snippet() {
    require!(Prereq::Containerd);
    let snippet = config_dir().join("containerd/1.7/hyperbox-snapshotter.toml");
    let out = Command::new("containerd")
        .arg("--config")
        .arg(&snippet)
        .args(["config", "dump"])
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dump.contains("[proxy_plugins.hyperbox]"), "{dump}");
    assert!(dump.contains("address = \"/run/hyperbox/snapshotter.sock\""));
    assert!(dump.contains("root = \"/var/lib/hyperbox/snapshotter\""));
    assert!(dump.contains("snapshotter = \"hyperbox\""));
    assert!(dump.contains("disable_snapshot_annotations = false"));
}

#[test]
fn shipped_hyperbox_toml_states_exactly_the_built_in_defaults() {
    let path = config_dir().join("hyperbox.toml");
    let loaded = hyperbox_config::Config::load(Some(&path)).unwrap();
    assert_eq!(loaded, hyperbox_config::Config::default());
}

#[test]
fn containerd_1_7_accepts_the_nri_snippet() {
    require!(Prereq::Containerd);
    let snippet = config_dir().join("containerd/1.7/hyperbox-nri.toml");
    let out = Command::new("containerd")
        .arg("--config")
        .arg(&snippet)
        .args(["config", "dump"])
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nri = dump
        .split("[plugins.\"io.containerd.nri.v1.nri\"]")
        .nth(1)
        .unwrap_or_else(|| panic!("no NRI section in:\n{dump}"));
    let section: String = nri
        .lines()
        .take_while(|l| !l.trim_start().starts_with("[plugins"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(section.contains("disable = false"), "{section}");
    assert!(
        section.contains("socket_path = \"/var/run/nri/nri.sock\""),
        "{section}"
    );
}
