//! What only containerd 2.x does, checked on the real 2.x release whatever
//! `HYPERBOX_CONTAINERD_LINE` says.
//!
//! `ctr image pull` in 2.x goes through the transfer service, which unpacks
//! only into the snapshotters its `unpack_config` lists and sends a
//! snapshotter the remote-snapshot labels only when the snapshotter's
//! exports say `enable_remote_snapshot_annotations = "true"`; the harness
//! configures both, as `config/containerd/2.x/hyperbox-snapshotter.toml`
//! tells operators to.

use std::path::Path;
use std::process::{Command, Output};

use hyperbox_integration::containerd::Line;
use hyperbox_integration::gobin;
use hyperbox_integration::image::{Compression, ImageSpec, Layer};
use hyperbox_integration::prereq::Prereq;
use hyperbox_integration::require;
use hyperbox_integration::testbed::Testbed;

/// containerd 2.x's own `ctr`, as an operator runs it against the instance.
fn ctr(address: &Path, args: &[&str]) -> Output {
    let out = Command::new(gobin::ctr())
        .arg("--address")
        .arg(address)
        .args(["--namespace", "default"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctr {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// How many EROFS filesystems are mounted under `dir`.
fn erofs_mounts_under(dir: &Path) -> usize {
    let dir = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let fstype = f
                .iter()
                .position(|x| *x == "-")
                .and_then(|sep| f.get(sep + 1));
            f.get(4).is_some_and(|p| p.starts_with(&dir)) && fstype == Some(&"erofs")
        })
        .count()
}

/// The layer digests of `reference`, read from the registry.
async fn registry_layers(reference: &str) -> Vec<String> {
    let empty = tempfile::tempdir().unwrap();
    let cfg = hyperbox_config::Registry {
        config_path: empty.path().into(),
        docker_config: empty.path().join("none.json"),
        ..Default::default()
    };
    let reg = hyperbox_registry::Registry::new(&cfg).unwrap();
    let r = hyperbox_registry::Reference::parse(reference).unwrap();
    let resolved = reg.resolve(&r).await.unwrap();
    resolved.layers.into_iter().map(|l| l.digest).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctr_pull_through_the_transfer_service_takes_the_remote_path() {
    require!(
        Prereq::Root,
        Prereq::Containerd2,
        Prereq::Runc,
        Prereq::Registry,
        Prereq::Busybox
    );
    let mut tb = Testbed::start_hyperbox(|b| b.line(Line::V2).without_cri()).await;
    let mut spec = ImageSpec::busybox(&["cat", "/etc/motd"]).unwrap();
    spec.layers
        .push(Layer::new(Compression::Zstd).file("etc/motd", "served by hyperbox\n", 0o644));
    let reference = tb.push(&spec, "test/ctr", "v1").await;
    let address = tb.containerd.address().to_path_buf();
    ctr(
        &address,
        &[
            "image",
            "pull",
            "--snapshotter",
            "hyperbox",
            "--plain-http",
            &reference,
        ],
    );

    // hyperbox fetched every layer itself: containerd stored none of them,
    // and each is an EROFS mount of the snapshotter.
    let client = tb.containerd.client().await.unwrap();
    let layers = registry_layers(&reference).await;
    assert_eq!(layers.len(), 2);
    for d in &layers {
        assert!(
            !client.content_exists(d).await.unwrap(),
            "{d} was downloaded by containerd"
        );
    }
    assert_eq!(erofs_mounts_under(&tb.hyperbox().root()), layers.len());

    // And the image runs from it, with ctr as well.
    let runc_root = tb.containerd.dir().join("runc");
    let cgroup = format!("{}/ctr-run", tb.containerd.cgroup_prefix());
    let out = ctr(
        &address,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "hyperbox",
            "--runc-root",
            &runc_root.to_string_lossy(),
            "--cgroup",
            &cgroup,
            &reference,
            "ctr-run",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "served by hyperbox\n");
    ctr(&address, &["image", "rm", "--sync", &reference]);
    tb.finish();
}
