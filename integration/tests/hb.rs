//! `hb` against a real hyperbox-snapshotter and the real kernel.

use std::collections::HashMap;
use std::process::Command;

use containerd_client::services::v1::snapshots::{CommitSnapshotRequest, PrepareSnapshotRequest};
use hyperbox_integration::prereq::Prereq;
use hyperbox_integration::require;
use hyperbox_integration::snapshotter::{NAME, SnapshotterDaemon};
use serde_json::Value;

fn hb(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(hyperbox_integration::binaries::path("hb"))
        .args(args)
        .output()
        .expect("run hb");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_ls_shows_what_the_snapshotter_holds() {
    require!(Prereq::Root);
    let sn = SnapshotterDaemon::start().await;
    let mut c = sn.client().await.unwrap();
    let m = c
        .prepare(PrepareSnapshotRequest {
            snapshotter: NAME.into(),
            key: "extract".into(),
            parent: String::new(),
            labels: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    std::fs::write(
        std::path::Path::new(&m[0].source).join("f"),
        vec![1u8; 100_000],
    )
    .unwrap();
    c.commit(CommitSnapshotRequest {
        snapshotter: NAME.into(),
        name: "layer".into(),
        key: "extract".into(),
        labels: [("team".to_string(), "storage".to_string())].into(),
    })
    .await
    .unwrap();
    c.prepare(PrepareSnapshotRequest {
        snapshotter: NAME.into(),
        key: "ctr".into(),
        parent: "layer".into(),
        labels: HashMap::new(),
    })
    .await
    .unwrap();
    let config = sn.config_path();
    let config = config.to_str().unwrap();

    let (ok, table, err) = hb(&["--config", config, "snapshots", "ls"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NAME") && lines[0].contains("KIND") && lines[0].contains("SIZE"));
    assert!(
        lines[1].starts_with("ctr ") && lines[1].contains("active") && lines[1].ends_with("layer")
    );
    assert!(
        lines[2].starts_with("layer ")
            && lines[2].contains("committed")
            && lines[2].contains("KiB")
    );

    let (ok, json, err) = hb(&[
        "--config",
        config,
        "snapshots",
        "ls",
        "--json",
        "--filter",
        "kind==committed",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&json).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["name"], "layer");
    assert_eq!(rows[0]["labels"]["team"], "storage");
    assert!(rows[0]["size"].as_i64().unwrap() >= 100_000);
    assert_eq!(rows[0]["inodes"], 2);

    let (ok, _, err) = hb(&["--config", config, "snapshots", "ls", "--filter", "kind=="]);
    assert!(!ok);
    assert!(err.contains("invalid filter"), "{err}");

    sn.finish();
}

#[test]
fn snapshots_ls_without_a_snapshotter_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[snapshotter]\naddress = \"{}/none.sock\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let (ok, _, err) = hb(&["--config", config.to_str().unwrap(), "snapshots", "ls"]);
    assert!(!ok);
    assert!(
        err.contains("is it running?") && err.contains("none.sock"),
        "{err}"
    );
}

#[test]
fn doctor_reports_every_feature_with_how_it_was_found() {
    require!(Prereq::Root);
    let (ok, json, err) = hb(&["doctor", "--json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&json).unwrap();
    let features: HashMap<String, Value> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["name"].as_str().unwrap().to_string(), f.clone()))
        .collect();
    for name in [
        "erofs",
        "erofs_file_backed",
        "fanotify_pre_content",
        "erofs_fscache_ondemand",
        "fuse",
        "overlayfs",
        "loop",
        "btf",
        "psi",
        "cgroup",
        "erofs_backend",
        "lazy_backend",
    ] {
        let f = &features[name];
        assert!(
            !f["how"].as_str().unwrap().is_empty(),
            "{name} says how it was detected"
        );
    }
    // What the other tests of this suite rely on must be reported present.
    assert_eq!(features["overlayfs"]["available"], true);
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap();
    assert_eq!(
        features["erofs"]["available"],
        filesystems.contains("\terofs")
    );
    let hybrid = std::path::Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists();
    if hybrid {
        assert_eq!(features["cgroup"]["value"], "hybrid");
    }
    // The probes mount and create files in a scratch directory of their own
    // (`.hb-doctor-<pid>`); neither a mount nor the directory is left.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains("/.hb-doctor-"),
        "doctor left a probe mounted"
    );
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".hb-doctor-"))
        .collect();
    assert!(left.is_empty(), "doctor left {left:?}");

    let (ok, table, _) = hb(&["doctor"]);
    assert!(ok);
    assert!(table.starts_with("FEATURE"));
    // A header and one row per feature, the chosen EROFS backend and what
    // it means for lazy pulls last.
    assert_eq!(table.lines().count(), 13);
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[11].starts_with("erofs_backend"), "{table}");
    assert!(rows[12].starts_with("lazy_backend"), "{table}");
    if features["erofs_file_backed"]["available"] == true {
        assert_eq!(features["erofs_backend"]["value"], "file-backed");
    }
    // Lazy exactly when the snapshotter would start its lazy path (the
    // default config: remote and lazy on).
    let lazy = features["erofs_backend"]["value"] == "file-backed"
        && features["fanotify_pre_content"]["available"] == true;
    let backend = features["erofs_backend"]["value"].as_str().unwrap();
    let want = match backend {
        _ if lazy => "fanotify",
        "file-backed" | "loop" => "whole",
        _ => "off",
    };
    let l = &features["lazy_backend"];
    assert_eq!(l["available"], lazy, "{l}");
    assert_eq!(l["value"], want, "{l}");
}

/// `hb image pull` through a real containerd: with hyperbox every layer is
/// fetched by the snapshotter; with overlayfs hb downloads and applies them
/// itself. Either way the image runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_pull_uses_the_remote_path_and_the_image_runs() {
    use hyperbox_integration::client::{ContainerOptions, PullOptions};
    use hyperbox_integration::testbed::Testbed;
    hyperbox_integration::require_containers!();
    let mut tb = Testbed::start_hyperbox(|b| b.without_cri()).await;
    let mut spec = hyperbox_integration::image::ImageSpec::busybox(&["cat", "/motd"]).unwrap();
    spec.layers.push(
        hyperbox_integration::image::Layer::new(hyperbox_integration::image::Compression::Zstd)
            .file("motd", "pulled by hb", 0o644),
    );
    let reference = tb.push(&spec, "test/hbpull", "v1").await;
    let config = tb.hyperbox().config_path();
    let address = tb.containerd.address().display().to_string();
    let cfg = config.display().to_string();

    let (ok, out, err) = hb(&[
        "--config",
        &cfg,
        "image",
        "pull",
        "--address",
        &address,
        "--json",
        &reference,
    ]);
    assert!(ok, "{err}");
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let layers: Vec<&Value> = events.iter().filter(|e| e["event"] == "layer").collect();
    assert_eq!(layers.len(), 2, "{out}");
    assert!(layers.iter().all(|l| l["how"] == "remote"), "{out}");
    let done = events.last().unwrap();
    assert_eq!(
        (done["event"].as_str(), done["remote"].as_u64()),
        (Some("done"), Some(2))
    );

    let client = tb.containerd.client().await.unwrap();
    assert!(client.image_exists(&reference).await.unwrap());
    // The harness finds every layer present and only reads the image back.
    let image = client
        .pull(&reference, &PullOptions::local(NAME))
        .await
        .unwrap();
    let run = client
        .run("hbpull", &image, &ContainerOptions::default())
        .await
        .unwrap();
    assert_eq!(run.stdout_str(), "pulled by hb");

    // Into overlayfs, people's table: hb unpacks through containerd itself.
    let (ok, out, err) = hb(&[
        "--config",
        &cfg,
        "image",
        "pull",
        "--address",
        &address,
        "--snapshotter",
        "overlayfs",
        "-n",
        "other",
        &reference,
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.matches("unpacked").count(), 2, "{out}");
    assert!(
        out.contains("0 of 2 layers fetched by the snapshotter"),
        "{out}"
    );

    // A reference that does not exist: a clear error, nothing recorded.
    let missing = reference.replace("hbpull:v1", "hbpull:nope");
    let (ok, _, err) = hb(&[
        "--config",
        &cfg,
        "image",
        "pull",
        "--address",
        &address,
        &missing,
    ]);
    assert!(!ok);
    assert!(err.contains("not found") && err.contains("hbpull"), "{err}");
    assert!(!client.image_exists(&missing).await.unwrap());
    tb.finish();
}
