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
use hyperbox_integration::agent::{ADAPTIVE, AgentDaemon, memory_limit};
use hyperbox_integration::image::ImageSpec;
use hyperbox_integration::prereq::Prereq;
use hyperbox_integration::shim::{HYPERBOX_RUNTIME, Shim};
use hyperbox_integration::snapshotter::NAME;
use hyperbox_integration::testbed::Testbed;
use hyperbox_integration::tools::{self, Nerdctl};
use hyperbox_integration::{require, require_containers};

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

/// `nerdctl run --runtime io.containerd.hyperbox.v1`: nerdctl never goes
/// through CRI, so NRI's plugin never sees the container; the shim asks
/// the agent before `runc create`, and the learned limit is in the spec, in
/// the container's cgroup and visible from inside, with the workload's
/// first exec traced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nerdctl_run_with_the_hyperbox_runtime_gets_the_agents_policy() {
    require_nerdctl!();
    require!(Prereq::Psi);
    const MIB: u64 = 1 << 20;
    let tb = Testbed::start_with(|b| b.without_cri()).await;
    let mut agent = AgentDaemon::new(&tb.containerd.nri_socket(), ADAPTIVE);
    // nerdctl containers are keyed by containerd namespace, as ctr's.
    agent.seed_history("containerd:default/shim-nerd", &[20 * MIB]);
    agent.start_again().await;
    tb.containerd.use_agent(&agent.config_path()).unwrap();
    let image = tb.push_sleeper().await;
    let nerdctl = Nerdctl::new(&tb.containerd).unwrap();
    let parent = format!("--cgroup-parent={}", tb.containerd.cgroup_prefix());
    let out = nerdctl
        .output(&[
            "run",
            "-d",
            "--runtime",
            HYPERBOX_RUNTIME,
            "--annotation",
            "hyperbox.dev/workload=shim-nerd",
            &parent,
            "--net",
            "none",
            &image,
            "sh",
            "-c",
            "echo started; exec sleep 3600",
        ])
        .unwrap();
    assert!(out.status.success(), "nerdctl run -d: {out:?}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(id.len(), 64, "nerdctl prints the container id: {out:?}");

    let e = agent.explain(&id);
    assert_eq!(e["container"]["source"], "local", "{e}");
    let d = &e["decisions"][0];
    assert_eq!(
        (&d["action"], &d["via"]),
        (&"create".into(), &"spec".into()),
        "{e}"
    );
    let set = d["to"].as_u64().unwrap();
    assert!(
        (23 * MIB..=30 * MIB).contains(&set),
        "1.15-1.5x the learned 20 MiB: {e}"
    );
    let in_cgroup = memory_limit(&format!("{}/{id}", tb.containerd.cgroup_prefix()))
        .expect("a limit in the container's cgroup");
    assert!(set - in_cgroup < 4096, "cgroup {in_cgroup}, agent {set}");
    let seen = nerdctl
        .run(&[
            "exec",
            &id,
            "sh",
            "-c",
            "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
        ])
        .unwrap();
    assert_eq!(seen.trim().parse::<u64>().ok(), Some(in_cgroup), "{seen}");

    let api = hyperbox_api::client::Client::new(agent.address());
    let traced = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(t) = api.trace(&id).await
                && t.execs
                    .iter()
                    .any(|x| x.args.first().is_some_and(|a| a == "sleep"))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(traced.is_ok(), "the first exec traced:\n{}", agent.log());

    let out = nerdctl.output(&["rm", "-f", &id]).unwrap();
    assert!(out.status.success(), "nerdctl rm -f: {out:?}");
    assert!(agent.shutdown().is_empty());
    tb.finish();
}
