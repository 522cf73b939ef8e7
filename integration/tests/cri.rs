//! The harness against real containerd (1.7 or 2.x, `HYPERBOX_CONTAINERD_LINE`)
//! through CRI, driven the way the kubelet drives it: pull, pod sandbox with
//! the locally built pause image, containers, exec, logs, stop and remove.

use std::time::Duration;

use hyperbox_integration::cri::{ContainerSpec, PodNetwork};
use hyperbox_integration::image::ImageSpec;
use hyperbox_integration::prereq::Prereq;
use hyperbox_integration::testbed::Testbed;
use hyperbox_integration::{require, require_containers};

async fn pod_lifecycle(network: PodNetwork) {
    let tb = Testbed::start().await;
    let reference = tb
        .push(
            &ImageSpec::busybox(&["sh", "-c", "echo started; sleep 3600"]).unwrap(),
            "test/app",
            "v1",
        )
        .await;
    let cri = tb.containerd.cri().await.unwrap();
    let version = cri.version().await.unwrap();
    let line = tb.containerd.line();
    assert!(
        version.starts_with("containerd ") && version.contains(line.release()),
        "{line} reports {version}"
    );
    let image_id = cri.pull_image(&reference).await.unwrap();
    assert!(image_id.starts_with("sha256:"), "image id {image_id}");
    assert!(cri.image_present(&reference).await.unwrap());

    let pod = cri.run_pod("web", network).await.unwrap();
    // The sandbox ran the locally built pause image, pulled by CRI itself.
    assert!(cri.image_present(&tb.pause_image).await.unwrap());

    // A container that runs to completion: exit code and logs.
    let once = cri
        .create_container(
            &pod,
            &ContainerSpec::new(
                "once",
                &reference,
                &["sh", "-c", "echo out; echo err >&2; exit 4"],
            ),
        )
        .await
        .unwrap();
    cri.start_container(&once).await.unwrap();
    assert_eq!(
        cri.wait_exited(&once, Duration::from_secs(30))
            .await
            .unwrap(),
        4
    );
    let logs = cri.logs(&pod, "once").await.unwrap();
    let mut lines: Vec<&str> = logs.lines().collect();
    lines.sort();
    assert_eq!(lines, ["err", "out"]);

    // A long-running one, with the image's default command, and an exec.
    let app = cri
        .create_container(&pod, &ContainerSpec::new("app", &reference, &[]))
        .await
        .unwrap();
    cri.start_container(&app).await.unwrap();
    let out = cri
        .exec_sync(
            &app,
            &[
                "sh",
                "-c",
                "cat /proc/1/cmdline | tr '\\0' ' '; ls /sys/class/net | sort | tr '\\n' ' '",
            ],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(out.status, 0);
    let text = out.stdout_str();
    // busybox sh execs its last command, so PID 1 is the sleep.
    let (pid1, interfaces) = text.split_at("sleep 3600 ".len());
    assert_eq!(pid1, "sleep 3600 ");
    match network {
        // Its own network namespace: the CNI interface and loopback.
        PodNetwork::Cni => assert_eq!(interfaces, "eth0 lo "),
        // The host's namespace has the host's interfaces.
        PodNetwork::Host => assert!(
            interfaces.contains("eth0 ") && interfaces.len() > "eth0 lo ".len(),
            "{interfaces}"
        ),
    }
    let failed = cri
        .exec_sync(&app, &["sh", "-c", "exit 9"], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(failed.status, 9);
    assert_eq!(cri.logs(&pod, "app").await.unwrap(), "started\n");

    cri.remove_container(&once).await.unwrap();
    cri.remove_container(&app).await.unwrap();
    cri.remove_pod(&pod).await.unwrap();

    tb.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_network_pod_runs_containers_like_the_kubelet() {
    require_containers!();
    pod_lifecycle(PodNetwork::Host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cni_pod_gets_its_own_network_namespace() {
    require!(
        Prereq::Root,
        Prereq::Containerd,
        Prereq::Runc,
        Prereq::Registry,
        Prereq::Busybox,
        Prereq::CniPlugins
    );
    pod_lifecycle(PodNetwork::Cni).await;
}
