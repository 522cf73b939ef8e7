//! The harness against real containerd (1.7 or 2.x, `HYPERBOX_CONTAINERD_LINE`)
//! through its gRPC API, with the built-in overlayfs snapshotter: pull from a
//! real registry, run, exec, and read back what a multi-layer image looks like
//! inside a container.

use hyperbox_integration::client::{ContainerOptions, PullOptions};
use hyperbox_integration::corpus;
use hyperbox_integration::image::{Compression, ImageSpec, Layer};
use hyperbox_integration::require_containers;
use hyperbox_integration::testbed::Testbed;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_and_run_prints_the_containers_output() {
    require_containers!();
    let tb = Testbed::start_with(|b| b.without_cri()).await;
    let spec =
        ImageSpec::busybox(&["sh", "-c", "echo hello from $(cat /etc/motd) && exit 7"]).unwrap();
    let mut spec = spec;
    spec.layers
        .push(Layer::new(Compression::Zstd).file("etc/motd", "layer two", 0o644));
    let reference = tb.push(&spec, "test/hello", "v1").await;

    let client = tb.containerd.client().await.unwrap();
    let version = client.version().await.unwrap();
    let line = tb.containerd.line();
    assert!(
        version.starts_with(line.release()),
        "{line} reports version {version}"
    );
    let image = client
        .pull(&reference, &PullOptions::local("overlayfs"))
        .await
        .unwrap();
    assert_eq!(image.chain_ids.len(), 2);
    assert!(client.image_exists(&reference).await.unwrap());

    let out = client
        .run("hello", &image, &ContainerOptions::default())
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), "hello from layer two\n");
    assert_eq!(out.status, 7, "exit status is passed through");

    tb.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_in_the_running_container() {
    require_containers!();
    let tb = Testbed::start_with(|b| b.without_cri()).await;
    let reference = tb.push_sleeper().await;
    let client = tb.containerd.client().await.unwrap();
    let image = client
        .pull(&reference, &PullOptions::local("overlayfs"))
        .await
        .unwrap();
    let c = client
        .create_container("sleeper", &image, &ContainerOptions::default())
        .await
        .unwrap();
    let task = c.start().await.unwrap();

    // The workload is really in the instance's cgroup and runc root.
    let fp = tb.containerd.footprint();
    assert!(
        !fp.cgroups_left().is_empty(),
        "container cgroup under {} exists while it runs",
        fp.cgroup_prefix
    );
    assert!(
        tb.containerd
            .dir()
            .join("runc/default/sleeper/state.json")
            .exists()
    );
    fp.note_shim_sockets();
    let sockets = fp.extra.lock().unwrap().shim_sockets.clone();
    assert_eq!(sockets.len(), 1);
    assert!(
        sockets[0].exists(),
        "shim socket {} exists",
        sockets[0].display()
    );

    let out = task
        .exec(&[
            "sh",
            "-c",
            "echo $((6*7)); hostname; cat /proc/1/cmdline | tr '\\0' ' '",
        ])
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), "42\nsleeper\nsleep 3600 ");
    assert_eq!(out.status, 0);
    let failed = task
        .exec(&["sh", "-c", "echo oops >&2; exit 3"])
        .await
        .unwrap();
    assert_eq!(failed.status, 3);
    assert_eq!(failed.stderr_str(), "oops\n");

    task.kill(9).await.unwrap();
    let out = task.wait_output().await.unwrap();
    assert_eq!(out.status, 137);
    c.delete().await.unwrap();

    tb.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layered_image_shows_the_overlay_union() {
    require_containers!();
    let tb = Testbed::start_with(|b| b.without_cri()).await;
    let reference = tb.push(&corpus::tricky(), "test/layers", "v1").await;
    let client = tb.containerd.client().await.unwrap();
    let image = client
        .pull(&reference, &PullOptions::local("overlayfs"))
        .await
        .unwrap();
    assert_eq!(image.chain_ids.len(), 3);

    let long_name = corpus::long_name();
    let script = format!(
        "cd /data; ls; echo --; ls opq; cat opq/new; echo; \
         stat -c '%a %u %g %h' suid; [ $(stat -c %i suid) = $(stat -c %i suid-link) ] && echo same-inode; \
         readlink link; cat link; echo; stat -c %s big; ls small | wc -l; stat -c %F pipe; stat -c %a sticky; cat {long_name}"
    );
    let out = client
        .run(
            "layers",
            &image,
            &ContainerOptions::args(&["sh", "-c", &script]),
        )
        .await
        .unwrap();
    assert_eq!(out.stderr_str(), "");
    let expected = format!(
        "big\nkeep\nlink\n{long_name}\nopq\npipe\nsmall\nsticky\nsuid\nsuid-link\n--\nnew\nonly me\n\
         4755 1000 1001 2\nsame-inode\nkeep\nkept\n{}\n500\nfifo\n1777\nlong",
        24 << 20
    );
    assert_eq!(out.stdout_str(), expected);

    tb.finish();
}
