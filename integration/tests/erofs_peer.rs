//! containerd 2.x's own `erofs` snapshotter, the peer hyperbox is benchmarked
//! against, really runs in the harness: an image pulled through CRI and
//! through the containerd API unpacks into it, and containers run on an
//! overlay whose every lower layer is an EROFS mount.
//!
//! The peer runs as containerd's docs set it up: its `erofs` differ converts
//! each layer tar into an EROFS blob with `mkfs.erofs --tar`, which needs
//! erofs-utils 1.7 or newer (`scripts/install-deps.sh` builds Debian 13's
//! 1.8.6 for it; Debian 12 has 1.5). With 1.5 the snapshotter still works,
//! converting each unpacked directory at Commit, but that is not the peer
//! the benchmarks mean, so here it counts as a missing prerequisite.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyperbox_integration::client::{ContainerOptions, PullOptions};
use hyperbox_integration::containerd::{
    EROFS_UTILS_ENV, EROFS_UTILS_VERSION, Line, erofs_differ_available,
};
use hyperbox_integration::cri::{ContainerSpec, PodNetwork};
use hyperbox_integration::image::{Compression, ImageSpec, Layer};
use hyperbox_integration::prereq::{self, Prereq};
use hyperbox_integration::require;
use hyperbox_integration::testbed::Testbed;

const SNAPSHOTTER: &str = "erofs";
const MESSAGE: &str = "read from an EROFS layer\n";
/// Prints the upper layer's file, shows that its whiteout hid `/usr` of the
/// busybox layer, and stays up so its mounts can be inspected.
const SCRIPT: &str = "cat /etc/peer/message; ls -d /usr 2>/dev/null; echo done; exec sleep 3600";

/// What the erofs snapshotter and its differ need beyond a containerd 2.x:
/// the kernel's EROFS, and a `mkfs.erofs` that reads tars.
fn erofs_missing() -> Option<String> {
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems
        .lines()
        .any(|l| l.trim_end().ends_with("\terofs"))
    {
        return Some("the kernel has no EROFS (modprobe erofs)".into());
    }
    (!erofs_differ_available()).then(|| {
        format!(
            "no mkfs.erofs with --tar (erofs-utils 1.7+) for containerd's erofs differ: \
             scripts/install-deps.sh builds erofs-utils {EROFS_UTILS_VERSION} into \
             /var/cache/hyperbox/erofs-utils-{EROFS_UTILS_VERSION} (${EROFS_UTILS_ENV} moves it)"
        )
    })
}

/// The lower directories of the overlay mounted at `/` in `mountinfo` (a
/// process's own view): the layers its root filesystem is stacked from.
fn root_overlay_lowers(mountinfo: &str) -> Vec<PathBuf> {
    let root = mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let super_options = post.nth(1)?;
            (mount_point == "/" && fstype == "overlay").then_some(super_options)
        })
        .next_back()
        .unwrap_or_else(|| panic!("no overlay at / in:\n{mountinfo}"));
    // Options set with the new mount API show each layer as `lowerdir+=`,
    // the legacy string as one colon-separated `lowerdir=`.
    root.split(',')
        .flat_map(|o| {
            if let Some(one) = o.strip_prefix("lowerdir+=") {
                vec![PathBuf::from(one)]
            } else if let Some(all) = o.strip_prefix("lowerdir=") {
                all.split(':').map(PathBuf::from).collect()
            } else {
                Vec::new()
            }
        })
        .collect()
}

/// The filesystem type mounted at `path` on the host, if any.
fn host_fstype(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_string_lossy();
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            (mount_point == path).then(|| post.split(' ').next().unwrap_or("").to_string())
        })
        .next_back()
}

/// Asserts that the container whose mountinfo this is runs on `layers`
/// lower layers, each an EROFS mount on the host.
fn assert_erofs_layers(mountinfo: &str, layers: usize, what: &str) {
    let lowers = root_overlay_lowers(mountinfo);
    assert_eq!(lowers.len(), layers, "{what}: lowers {lowers:?}");
    for lower in &lowers {
        assert_eq!(
            host_fstype(lower).as_deref(),
            Some("erofs"),
            "{what}: lower layer {} is not an EROFS mount",
            lower.display()
        );
    }
}

/// The EROFS layer blobs the snapshotter keeps under containerd's root.
fn layer_blobs(containerd_root: &Path) -> usize {
    let snapshots = containerd_root.join("io.containerd.snapshotter.v1.erofs/snapshots");
    std::fs::read_dir(&snapshots)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().join("layer.erofs").is_file())
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_unpack_into_containerds_erofs_snapshotter_and_run() {
    require!(
        Prereq::Root,
        Prereq::Containerd2,
        Prereq::Runc,
        Prereq::Registry,
        Prereq::Busybox
    );
    if let Some(why) = erofs_missing() {
        let test = module_path!();
        if prereq::require_all() {
            panic!("{test}: prerequisite missing with HYPERBOX_REQUIRE_ALL=1: {why}");
        }
        eprintln!("SKIPPED {test}: {why}");
        return;
    }
    let tb = Testbed::start_with(|b| {
        b.line(Line::V2)
            .erofs_snapshotter()
            .cri_snapshotter(SNAPSHOTTER)
    })
    .await;
    let mut spec = ImageSpec::busybox(&["sh", "-c", SCRIPT]).unwrap();
    spec.layers.push(
        Layer::new(Compression::Gzip)
            .dir("etc/peer", 0o755)
            .file("etc/peer/message", MESSAGE, 0o644)
            .file("etc/peer/other", "not printed\n", 0o600)
            .whiteout("usr"),
    );
    let reference = tb.push(&spec, "test/erofs-peer", "v1").await;
    let root = tb.containerd.dir().join("root");
    let expected = format!("{MESSAGE}done\n");

    // CRI, as the kubelet pulls and runs it.
    let cri = tb.containerd.cri().await.unwrap();
    cri.pull_image(&reference).await.unwrap();
    assert_eq!(
        layer_blobs(&root),
        spec.layers.len(),
        "EROFS blobs after the CRI pull"
    );
    // The sandbox's pause image is the busybox layer again: no new blob.
    let pod = cri.run_pod("erofs-peer", PodNetwork::Host).await.unwrap();
    let id = cri
        .create_container(&pod, &ContainerSpec::new("app", &reference, &[]))
        .await
        .unwrap();
    cri.start_container(&id).await.unwrap();
    let mountinfo = cri
        .exec_sync(
            &id,
            &["cat", "/proc/self/mountinfo"],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(mountinfo.status, 0, "{}", mountinfo.stderr_str());
    assert_erofs_layers(&mountinfo.stdout_str(), spec.layers.len(), "CRI");
    // The shim writes the log as the script prints; the script ends in sleep.
    let mut logs = String::new();
    for _ in 0..100 {
        logs = cri.logs(&pod, "app").await.unwrap_or_default();
        if logs.ends_with("done\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(logs, expected);
    cri.remove_container(&id).await.unwrap();
    cri.remove_pod(&pod).await.unwrap();

    // The containerd API (`default` namespace), as nerdctl pulls and runs it;
    // snapshots are per namespace, so it unpacks again.
    let client = tb.containerd.client().await.unwrap();
    let image = client
        .pull(&reference, &PullOptions::local(SNAPSHOTTER))
        .await
        .unwrap();
    assert_eq!(image.chain_ids.len(), spec.layers.len());
    assert_eq!(
        layer_blobs(&root),
        2 * spec.layers.len(),
        "EROFS blobs after the API pull"
    );
    let c = client
        .create_container("erofs-peer", &image, &ContainerOptions::default())
        .await
        .unwrap();
    let task = c.start().await.unwrap();
    // The script has printed everything once it has become `sleep`.
    let comm = format!("/proc/{}/comm", task.pid());
    for _ in 0..100 {
        if std::fs::read_to_string(&comm).is_ok_and(|c| c == "sleep\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mountinfo = std::fs::read_to_string(format!("/proc/{}/mountinfo", task.pid())).unwrap();
    assert_erofs_layers(&mountinfo, spec.layers.len(), "API");
    task.kill(libc::SIGKILL as u32).await.unwrap();
    let out = task.wait_output().await.unwrap();
    assert_eq!(out.stdout_str(), expected, "stderr: {}", out.stderr_str());
    c.delete().await.unwrap();
    client.delete_image(&image.name).await.unwrap();

    tb.finish();
}
