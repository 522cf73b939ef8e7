//! The real `nerdctl` against a containerd with hyperbox as a proxy
//! snapshotter: `nerdctl --snapshotter hyperbox image pull` and `nerdctl run`,
//! as a user without Kubernetes types them, with a private data root, the
//! instance's `certs.d` as hosts dir and no network (`--net none`), so
//! nothing reaches the host's nerdctl state or CNI.
//!
//! nerdctl is built from its Go module by `scripts/install-deps.sh`
//! (v2.2.1, without the in-repository test framework `mod/tigron` that the
//! Go module proxy does not serve; see docs/testing.md).
//!
//! What nerdctl sends decides the path a layer takes: its client-side pull
//! adds the `containerd.io/snapshot/cri.*` labels only for snapshotters it
//! knows by name (stargz, soci, nydus, overlaybd, cvmfs), and containerd
//! 2.x's transfer service adds them for any snapshotter exporting
//! `enable_remote_snapshot_annotations`. The test therefore checks where
//! each layer went from what hyperbox holds: a layer whose Prepare carried
//! the labels was served by the remote path (containerd never stored its
//! blob), any other was unpacked by containerd into hyperbox.

use std::time::Duration;

use hyperbox_api::labels::CRI_LAYER_DIGEST;
use hyperbox_integration::image::ImageSpec;
use hyperbox_integration::require_containers;
use hyperbox_integration::shim::Shim;
use hyperbox_integration::snapshotter::NAME;
use hyperbox_integration::testbed::Testbed;
use hyperbox_integration::tools::{self, Nerdctl};

macro_rules! require_nerdctl {
    () => {
        require_containers!();
        if let Some(why) = tools::missing(&[tools::nerdctl_bin()]) {
            panic!("{}: {why}", module_path!());
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nerdctl_pulls_and_runs_on_hyperbox() {
    require_nerdctl!();
    let mut tb = Testbed::start_hyperbox(|b| b.without_cri()).await;
    let spec = ImageSpec::busybox(&["echo", "hello from nerdctl"]).unwrap();
    let built = spec
        .build(&tb.work_dir().join("nerdctl-image"))
        .expect("build image");
    let image = built
        .push(&tb.registry.host(), "test/nerdctl", "v1")
        .await
        .unwrap();
    let layers: Vec<String> = built.layers.iter().map(|l| l.blob.digest.clone()).collect();
    let nerdctl = Nerdctl::new(&tb.containerd).unwrap();
    let sn = format!("--snapshotter={NAME}");

    let pulled = nerdctl.output(&[&sn, "image", "pull", &image]).unwrap();
    assert!(pulled.status.success(), "nerdctl pull: {pulled:?}");
    let listed = nerdctl
        .run(&[&sn, "images", "--format", "{{.Repository}}:{{.Tag}}"])
        .unwrap();
    assert!(
        listed.lines().any(|l| image.ends_with(l.trim())),
        "{listed}"
    );

    // Every layer is a committed hyperbox snapshot; those whose Prepare
    // carried nerdctl's (or the transfer service's) remote labels never
    // reached containerd's content store.
    let snapshots = tb.hyperbox().list(&[]).await.unwrap();
    let client = tb.containerd.client().await.unwrap();
    let mut remote = 0;
    for d in &layers {
        let labelled = snapshots
            .iter()
            .any(|s| s.kind == 3 && s.labels.get(CRI_LAYER_DIGEST) == Some(d));
        if labelled {
            remote += 1;
            assert!(
                !client.content_exists(d).await.unwrap(),
                "layer {d} was labelled, yet containerd downloaded it"
            );
        }
    }
    assert!(
        snapshots.iter().filter(|s| s.kind == 3).count() >= layers.len(),
        "{snapshots:#?}"
    );
    eprintln!(
        "nerdctl {}: {remote} of {} layers came with remote labels",
        tools::NERDCTL_VERSION,
        layers.len()
    );

    // The runtime the harness selects (HYPERBOX_TEST_SHIM): nerdctl's
    // `--runtime` with containerd's runc-v2 or hyperbox's shim.
    let runtime = format!("--runtime={}", Shim::selected().runtime_type());
    let out = nerdctl
        .output(&[&sn, "run", "--rm", &runtime, "--net", "none", &image])
        .unwrap();
    assert!(out.status.success(), "nerdctl run: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from nerdctl\n");
    let out = nerdctl
        .output(&[
            &sn,
            "run",
            "--rm",
            &runtime,
            "--net",
            "none",
            &image,
            "sh",
            "-c",
            "echo $((6*7)); exit 5",
        ])
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");
    // Detached: nerdctl's logging binary (a binary:// URI) takes the
    // output, and `nerdctl logs` reads it back.
    let out = nerdctl
        .output(&[
            &sn,
            "run",
            "-d",
            "--name",
            "bg",
            &runtime,
            "--net",
            "none",
            &image,
            "sh",
            "-c",
            "echo from-the-background; sleep 3600",
        ])
        .unwrap();
    assert!(out.status.success(), "nerdctl run -d: {out:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let logs = nerdctl.output(&["logs", "bg"]).unwrap();
        if String::from_utf8_lossy(&logs.stdout).contains("from-the-background") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nerdctl logs: {logs:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let out = nerdctl.output(&["rm", "-f", "bg"]).unwrap();
    assert!(out.status.success(), "nerdctl rm -f: {out:?}");
    // --rm removed the containers and their rootfs snapshots.
    assert_eq!(nerdctl.run(&["ps", "-a", "-q"]).unwrap(), "");

    nerdctl.run(&[&sn, "rmi", &image]).unwrap();
    client.gc().await.unwrap();
    let left = tb
        .hyperbox()
        .wait_for_count(&[], 0, Duration::from_secs(30))
        .await;
    assert!(left.is_empty(), "{left:#?}");
    tb.finish();
}
