//! Teardown leaves nothing behind even when a test never cleans up: the
//! harness's drop path (the one a panicking test takes) and a crashed
//! containerd.

use hyperbox_integration::client::{ContainerOptions, PullOptions};
use hyperbox_integration::cri::{ContainerSpec, PodNetwork};
use hyperbox_integration::prereq::Prereq;
use hyperbox_integration::testbed::Testbed;
use hyperbox_integration::{require, require_containers};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_containers_and_pods_are_removed_with_the_instance() {
    require_containers!();
    let tb = Testbed::start().await;
    let reference = tb.push_sleeper().await;
    let client = tb.containerd.client().await.unwrap();
    let image = client
        .pull(&reference, &PullOptions::local("overlayfs"))
        .await
        .unwrap();
    let c = client
        .create_container("abandoned", &image, &ContainerOptions::default())
        .await
        .unwrap();
    let task = c.start().await.unwrap();
    let cri = tb.containerd.cri().await.unwrap();
    cri.pull_image(&reference).await.unwrap();
    let pod = cri.run_pod("abandoned", PodNetwork::Cni).await.unwrap();
    let id = cri
        .create_container(&pod, &ContainerSpec::new("app", &reference, &[]))
        .await
        .unwrap();
    cri.start_container(&id).await.unwrap();

    let fp = tb.containerd.footprint();
    let workload = task.pid() as i32;
    assert!(hyperbox_integration::procs::alive(workload));
    assert!(
        !fp.mounts_left().is_empty(),
        "rootfs mounts exist while running"
    );
    assert!(
        !fp.extra.lock().unwrap().netns.is_empty(),
        "CNI pod has a netns"
    );

    // No API clean-up at all: containerd is killed as a crash would, and the
    // instance is dropped the way a panicking test drops it.
    let mut tb = tb;
    tb.containerd.kill_daemon(nix::sys::signal::Signal::SIGKILL);
    drop(tb);

    assert!(!hyperbox_integration::procs::alive(workload));
    let leaks = fp.leaks();
    assert!(leaks.is_empty(), "left behind: {leaks:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_survive_a_containerd_restart() {
    require_containers!();
    let mut tb = Testbed::start_with(|b| b.without_cri()).await;
    let reference = tb.push_sleeper().await;
    let client = tb.containerd.client().await.unwrap();
    let image = client
        .pull(&reference, &PullOptions::local("overlayfs"))
        .await
        .unwrap();
    let c = client
        .create_container("survivor", &image, &ContainerOptions::default())
        .await
        .unwrap();
    let task = c.start().await.unwrap();
    let before = tb.containerd.pid();

    tb.containerd.restart().await.unwrap();
    assert_ne!(tb.containerd.pid(), before);
    assert!(
        hyperbox_integration::procs::alive(task.pid() as i32),
        "workload kept running"
    );

    // The new daemon reconnects to the running shim: exec still works.
    let out = task.exec(&["echo", "still here"]).await.unwrap();
    assert_eq!(out.stdout_str(), "still here\n");
    c.delete().await.unwrap();

    tb.finish();
}

#[test]
fn instances_of_dead_test_processes_are_swept_and_live_ones_kept() {
    require!(Prereq::Root, Prereq::Registry);
    let orphan = hyperbox_integration::registry::Registry::start().unwrap();
    let live = hyperbox_integration::registry::Registry::start().unwrap();
    // Make `orphan` look like the instance of a test process that was killed.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    std::fs::write(
        orphan
            .dir()
            .join(hyperbox_integration::footprint::OWNER_FILE),
        dead_pid.to_string(),
    )
    .unwrap();
    let (orphan_dir, orphan_pid) = (orphan.dir().to_path_buf(), orphan.pid());

    let swept = hyperbox_integration::footprint::sweep_dead_owners("hb-registry-");
    assert_eq!(swept, std::slice::from_ref(&orphan_dir));
    assert!(!orphan_dir.exists());
    assert!(
        !hyperbox_integration::procs::alive(orphan_pid as i32),
        "its daemon is gone too"
    );
    assert!(live.dir().exists());
    assert!(
        hyperbox_integration::procs::alive(live.pid() as i32),
        "a live owner's instance is kept"
    );
    drop(orphan);
}
