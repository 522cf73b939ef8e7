//! hyperbox-snapshotter plugged into real containerd 1.7 as a proxy
//! snapshotter: images pulled and run through it via the containerd API and
//! CRI, its mounts applied by the real kernel, its answers and error codes
//! as containerd expects, and its behaviour across kills and restarts.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use containerd_client::services::v1::snapshots::*;
use hyperbox_integration::client::{ContainerOptions, PullOptions};
use hyperbox_integration::cri::{ContainerSpec, PodNetwork};
use hyperbox_integration::image::ImageSpec;
use hyperbox_integration::prereq::Prereq;
use hyperbox_integration::snapshotter::{NAME, SnapshotterDaemon};
use hyperbox_integration::testbed::Testbed;
use hyperbox_integration::{corpus, mount, require, require_containers};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rootfs_through_hyperbox_equals_overlayfs() {
    require_containers!();
    let mut tb = Testbed::start_hyperbox(|b| b.without_cri()).await;
    let reference = tb.push(&corpus::tricky(), "test/tricky", "v1").await;
    let client = tb.containerd.client().await.unwrap();
    let script = format!("{}; grep ' / ' /proc/mounts", corpus::tree_script("/"));
    let args = ContainerOptions::args(&["sh", "-c", &script]);

    let ours = client
        .pull(&reference, &PullOptions::local(NAME))
        .await
        .unwrap();
    let theirs = client
        .pull(&reference, &PullOptions::local("overlayfs"))
        .await
        .unwrap();
    let ours_out = client.run("on-hyperbox", &ours, &args).await.unwrap();
    let theirs_out = client.run("on-overlayfs", &theirs, &args).await.unwrap();
    assert_eq!(ours_out.stderr_str(), "");

    let ours_text = ours_out.stdout_str();
    let (ours_tree, ours_mount) = split_mount(&ours_text);
    let (theirs_tree, _) = split_mount(&theirs_out.stdout_str());
    for listed in [
        "./bin/busybox regular file 755 0:0 1 ",
        "./data/small/f000499 regular file 644 0:0 1 64 ",
    ] {
        assert!(
            ours_tree.lines().any(|l| l.starts_with(listed)),
            "the whole rootfs is listed, {listed:?} missing"
        );
    }
    corpus::assert_same_tree(&ours_tree, &theirs_tree, "hyperbox vs overlayfs");
    for line in [
        "./data/suid regular file 4755 1000:1001 2 10 ",
        "./data/suid-link regular file 4755 1000:1001 2 10 ",
        "./data/sticky regular file 1777 0:0 1 1 ",
        "./data/link symbolic link 777 0:0 -> keep",
        "./data/pipe fifo 644 0:0",
    ] {
        assert!(
            ours_text.lines().any(|l| l.starts_with(line)),
            "missing {line:?}"
        );
    }
    assert!(!ours_text.contains("./data/gone") && !ours_text.contains("./data/opq/old"));
    let root = tb.hyperbox().root();
    assert!(
        ours_mount.starts_with("overlay / overlay")
            && ours_mount.contains(&root.display().to_string()),
        "rootfs is an overlay over hyperbox's layers: {ours_mount}"
    );

    // The image's layers are committed in hyperbox; containers' snapshots go
    // at the next collection.
    client.gc().await.unwrap();
    let snaps = tb
        .hyperbox()
        .wait_for_count(&[], 3, Duration::from_secs(30))
        .await;
    assert_eq!(snaps.len(), 3, "{snaps:#?}");
    assert!(snaps.iter().all(|s| s.kind == Kind::Committed as i32));

    tb.finish();
}

fn split_mount(out: &str) -> (String, String) {
    let (tree, mount) = out.trim_end().rsplit_once('\n').unwrap();
    (tree.to_string(), mount.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pod_runs_on_hyperbox() {
    require_containers!();
    let mut tb = Testbed::start_hyperbox(|b| b).await;
    let reference = tb
        .push(
            &ImageSpec::busybox(&["sh", "-c", "echo up; sleep 3600"]).unwrap(),
            "test/app",
            "v1",
        )
        .await;
    let cri = tb.containerd.cri().await.unwrap();
    cri.pull_image(&reference).await.unwrap();
    let pod = cri.run_pod("web", PodNetwork::Cni).await.unwrap();
    let id = cri
        .create_container(&pod, &ContainerSpec::new("app", &reference, &[]))
        .await
        .unwrap();
    cri.start_container(&id).await.unwrap();
    let out = cri
        .exec_sync(
            &id,
            &[
                "sh",
                "-c",
                "echo hi > /tmp/x && cat /tmp/x && grep ' / ' /proc/mounts",
            ],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let text = out.stdout_str();
    assert!(text.starts_with("hi\noverlay / overlay"), "{text}");
    assert!(
        text.contains(&tb.hyperbox().root().display().to_string()),
        "{text}"
    );
    assert_eq!(cri.logs(&pod, "app").await.unwrap(), "up\n");

    // Sandbox and container each have an active snapshot in hyperbox.
    let active = tb.hyperbox().list(&["kind==active"]).await.unwrap();
    assert_eq!(active.len(), 2, "{active:#?}");

    cri.remove_container(&id).await.unwrap();
    cri.remove_pod(&pod).await.unwrap();
    // containerd removes backend snapshots in its collector; run it now
    // rather than wait for its scheduler's thresholds.
    let client = tb.containerd.client().await.unwrap();
    client.with_namespace("k8s.io").gc().await.unwrap();
    let active = tb
        .hyperbox()
        .wait_for_count(&["kind==active"], 0, Duration::from_secs(30))
        .await;
    assert!(
        active.is_empty(),
        "containerd's GC removed the pod's snapshots: {active:#?}"
    );

    tb.finish();
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Option<Code> {
    r.err().map(|s| s.code())
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_work_in_the_kernel_and_errors_carry_containerds_codes() {
    require!(Prereq::Root);
    let sn = SnapshotterDaemon::start().await;
    let mut c = sn.client().await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("mnt");
    std::fs::create_dir(&target).unwrap();

    // Three layers, each written through its real mount, then committed.
    let mut parent = String::new();
    for i in 0..3 {
        let key = format!("extract-{i}");
        let mounts = c
            .prepare(PrepareSnapshotRequest {
                snapshotter: NAME.into(),
                key: key.clone(),
                parent: parent.clone(),
                labels: labels(&[(hyperbox_api::labels::SNAPSHOT_REF, &format!("layer{i}"))]),
            })
            .await
            .unwrap()
            .into_inner()
            .mounts;
        mount::apply(&mounts, &target).unwrap();
        std::fs::write(target.join(format!("f{i}")), format!("layer {i}")).unwrap();
        if i == 2 {
            std::fs::remove_file(target.join("f0")).unwrap();
        }
        mount::remove(&target).unwrap();
        c.commit(CommitSnapshotRequest {
            snapshotter: NAME.into(),
            name: format!("layer{i}"),
            key,
            labels: labels(&[("containerd.io/gc.root", "yes")]),
        })
        .await
        .unwrap();
        parent = format!("layer{i}");
    }
    // A read-only view of the top shows the union, with f0 deleted in layer 2.
    let mounts = c
        .view(ViewSnapshotRequest {
            snapshotter: NAME.into(),
            key: "view".into(),
            parent: "layer2".into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    mount::apply(&mounts, &target).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["f1", "f2"]);
    assert_eq!(
        std::fs::read_to_string(target.join("f1")).unwrap(),
        "layer 1"
    );
    let denied = std::fs::write(target.join("new"), "x").unwrap_err();
    assert_eq!(
        denied.raw_os_error(),
        Some(libc::EROFS),
        "views are read-only"
    );
    mount::remove(&target).unwrap();

    let again = c
        .prepare(PrepareSnapshotRequest {
            snapshotter: NAME.into(),
            key: "view".into(),
            parent: String::new(),
            labels: HashMap::new(),
        })
        .await;
    assert_eq!(code(again), Some(Code::AlreadyExists));
    let orphan = c
        .prepare(PrepareSnapshotRequest {
            snapshotter: NAME.into(),
            key: "x".into(),
            parent: "missing".into(),
            labels: HashMap::new(),
        })
        .await;
    assert_eq!(code(orphan), Some(Code::NotFound));
    let commit_view = c
        .commit(CommitSnapshotRequest {
            snapshotter: NAME.into(),
            name: "n".into(),
            key: "view".into(),
            labels: HashMap::new(),
        })
        .await;
    assert_eq!(code(commit_view), Some(Code::FailedPrecondition));
    let remove_parent = c
        .remove(RemoveSnapshotRequest {
            snapshotter: NAME.into(),
            key: "layer2".into(),
        })
        .await;
    assert_eq!(code(remove_parent), Some(Code::FailedPrecondition));
    let bad_filter = c
        .list(ListSnapshotsRequest {
            snapshotter: NAME.into(),
            filters: vec!["labels.\"unterminated".into()],
        })
        .await;
    assert_eq!(
        bad_filter.err().map(|s| s.code()),
        Some(Code::InvalidArgument)
    );
    let bad_update = c
        .update(UpdateSnapshotRequest {
            snapshotter: NAME.into(),
            info: Some(Info {
                name: "layer0".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["kind".into()],
            }),
        })
        .await;
    assert_eq!(code(bad_update), Some(Code::InvalidArgument));

    // Labels, filters, usage.
    let updated = c
        .update(UpdateSnapshotRequest {
            snapshotter: NAME.into(),
            info: Some(Info {
                name: "layer1".into(),
                labels: labels(&[("team", "storage")]),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels.team".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(
        updated.labels.get("team").map(String::as_str),
        Some("storage")
    );
    assert_eq!(
        updated
            .labels
            .get("containerd.io/gc.root")
            .map(String::as_str),
        Some("yes")
    );
    let stat = c
        .stat(StatSnapshotRequest {
            snapshotter: NAME.into(),
            key: "layer1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(updated, stat, "Update replies what a Stat then returns");
    let team = sn.list(&["labels.team==storage"]).await.unwrap();
    assert_eq!(
        team.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        ["layer1"]
    );
    let usage = c
        .usage(UsageRequest {
            snapshotter: NAME.into(),
            key: "layer1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usage.inodes, 2, "the layer's dir and f1");
    assert!(usage.size > 0);

    sn.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_mode_stale_socket_and_second_instance() {
    require!(Prereq::Root);
    let mut sn = SnapshotterDaemon::start().await;
    let mode = std::fs::metadata(sn.address())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);

    // A second daemon on the same socket refuses instead of stealing it.
    let out =
        std::process::Command::new(hyperbox_integration::binaries::path("hyperbox-snapshotter"))
            .arg("--config")
            .arg(sn.config_path())
            .output()
            .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by a running snapshotter"), "{err}");

    // After kill -9 the socket file is stale; a restart takes it over.
    sn.kill(nix::sys::signal::Signal::SIGKILL);
    assert!(sn.address().exists());
    sn.start_again().await;
    assert!(sn.list(&[]).await.unwrap().is_empty());

    // A bad config is a clear error naming the key.
    let bad = sn.dir().join("bad.toml");
    std::fs::write(&bad, "[snapshotter]\nroot = \"relative/path\"\n").unwrap();
    let out =
        std::process::Command::new(hyperbox_integration::binaries::path("hyperbox-snapshotter"))
            .arg("--config")
            .arg(&bad)
            .output()
            .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("snapshotter.root") && err.contains("absolute"),
        "{err}"
    );

    sn.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_keep_running_across_a_snapshotter_kill() {
    require_containers!();
    let mut tb = Testbed::start_hyperbox(|b| b.without_cri()).await;
    let reference = tb.push_sleeper().await;
    let client = tb.containerd.client().await.unwrap();
    let image = client
        .pull(&reference, &PullOptions::local(NAME))
        .await
        .unwrap();
    let c = client
        .create_container("survivor", &image, &ContainerOptions::default())
        .await
        .unwrap();
    let task = c.start().await.unwrap();
    let before = tb.hyperbox().list(&[]).await.unwrap().len();

    tb.hyperbox().kill(nix::sys::signal::Signal::SIGKILL);
    assert!(hyperbox_integration::procs::alive(task.pid() as i32));
    // While it is down, containerd reports it unavailable rather than hanging.
    let down = client
        .pull(&reference, &PullOptions::local(NAME))
        .await
        .expect_err("pull while the snapshotter is down");
    assert_eq!(down.code(), Some(Code::Unavailable), "{down}");
    tb.hyperbox().start_again().await;
    // containerd's gRPC connection may still be backing off from the failed
    // call: wait until containerd reaches the snapshotter again.
    client
        .wait_snapshotter(NAME, image.top_chain_id(), Duration::from_secs(30))
        .await
        .unwrap();

    assert_eq!(tb.hyperbox().list(&[]).await.unwrap().len(), before);
    let out = task
        .exec(&["sh", "-c", "echo ok > /tmp/f && cat /tmp/f"])
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), "ok\n");
    c.delete().await.unwrap();
    client.gc().await.unwrap();
    let active = tb
        .hyperbox()
        .wait_for_count(&["kind==active"], 0, Duration::from_secs(30))
        .await;
    assert!(active.is_empty(), "{active:#?}");

    tb.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_of_128_layers_runs() {
    require_containers!();
    // 128 lower directories make an overlay option longer than a page;
    // containerd's mount code shortens it, which must keep working with
    // hyperbox's directory layout.
    let mut tb = Testbed::start_hyperbox(|b| b.without_cri()).await;
    let mut spec =
        ImageSpec::busybox(&["sh", "-c", "cat /layers/* | wc -l; cat /layers/l127"]).unwrap();
    for i in 1..128 {
        spec.layers.push(
            hyperbox_integration::image::Layer::new(hyperbox_integration::image::Compression::None)
                .dir("layers", 0o755)
                .file(&format!("layers/l{i:03}"), format!("layer {i}\n"), 0o644),
        );
    }
    let reference = tb.push(&spec, "test/deep", "v1").await;
    let client = tb.containerd.client().await.unwrap();
    let image = client
        .pull(&reference, &PullOptions::local(NAME))
        .await
        .unwrap();
    assert_eq!(image.chain_ids.len(), 128);
    let out = client
        .run("deep", &image, &ContainerOptions::default())
        .await
        .unwrap();
    assert_eq!(out.stderr_str(), "");
    assert_eq!(out.stdout_str(), "127\nlayer 127\n");
    let committed = tb.hyperbox().list(&["kind==committed"]).await.unwrap();
    assert_eq!(committed.len(), 128);
    tb.finish();
}
