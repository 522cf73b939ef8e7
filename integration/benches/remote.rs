//! The remote path against containerd's overlayfs snapshotter, in one run:
//!
//! 1. pull to container exit for a multi-layer image of more than 300 MB
//!    through the harness proxy shaped to 100 Mbit/s with 20 ms latency,
//!    cold each time (image, content, snapshots and hyperbox's converted
//!    layers removed first), order alternating;
//! 2. reading the whole rootfs inside a container with the page cache
//!    dropped first: EROFS layers under overlay vs overlayfs directories.
//!
//! containerd 2.4.2's own erofs snapshotter (with its erofs differ) runs
//! beside them on a containerd of its own, pulling through CRI from its own
//! registry behind the same shaping.
//!
//! `cargo bench -p hyperbox-integration --bench remote` (as root) runs it and
//! rewrites its section of docs/benchmarks.md; under `cargo test` it runs
//! one small iteration as a smoke test.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hyperbox_integration::bench::{LINK, full_run, machine, percentile, write_section};
use hyperbox_integration::client::{Client, ContainerOptions, Image, PullOptions};
use hyperbox_integration::containerd::{self, Line};
use hyperbox_integration::cri::Cri;
use hyperbox_integration::image::{Compression, ImageSpec, Layer};
use hyperbox_integration::prereq::{self, Prereq};
use hyperbox_integration::proxy::Shaping;
use hyperbox_integration::snapshotter::NAME;
use hyperbox_integration::testbed::Testbed;

const MODES: [&str; 2] = ["overlayfs", "hyperbox"];
/// overlayfs through CRI: containerd's own pull (three downloads at once,
/// each layer unpacked as soon as it and the ones below are in).
const CRI: &str = "overlayfs-cri";
/// hyperbox with the image's hyperbox index pushed: layers mounted at once,
/// bytes fetched on first access.
const LAZY: &str = "hyperbox-lazy";
/// containerd 2.4.2's erofs snapshotter through CRI.
const EROFS: &str = "erofs";

fn image(full: bool) -> ImageSpec {
    let mut spec = ImageSpec::busybox(&["sh", "-c", "cat /etc/ready"]).unwrap();
    let (big, small) = if full {
        (100 << 20, 6000)
    } else {
        (1 << 20, 50)
    };
    spec.layers[0] = spec.layers[0].clone().file("etc/ready", "ready\n", 0o644);
    for i in 0..3u64 {
        spec.layers.push(Layer::new(Compression::Gzip).large_file(
            &format!("opt/data{i}"),
            big,
            10 + i,
        ));
    }
    spec.layers
        .push(Layer::new(Compression::Zstd).many_small_files("usr/share/app", small, 4096));
    spec
}

fn opts(mode: &str) -> PullOptions {
    match mode {
        "hyperbox" | "hyperbox-lazy" => PullOptions {
            snapshotter: NAME.into(),
            remote_labels: true,
        },
        _ => PullOptions::local("overlayfs"),
    }
}

/// Pulls `reference` (through CRI first when `cri` is given, as the
/// kubelet does) and runs the image's command to exit; how long that took.
async fn pull_to_exit(
    client: &Client,
    cri: Option<&Cri>,
    reference: &str,
    opts: &PullOptions,
    id: &str,
) -> (Duration, Image) {
    let start = Instant::now();
    if let Some(cri) = cri {
        cri.pull_image(reference).await.unwrap();
    }
    let img = client.pull(reference, opts).await.unwrap();
    let out = client
        .run(id, &img, &ContainerOptions::default())
        .await
        .unwrap();
    let took = start.elapsed();
    assert_eq!(out.stdout_str(), "ready\n");
    eprintln!("pull to exit {id}: {took:?}");
    (took, img)
}

fn drop_caches() {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches (root)");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !prereq::require(
        "bench remote",
        &[Prereq::CONTAINERS, &[Prereq::Containerd2]].concat(),
    ) {
        return;
    }
    if !containerd::erofs_differ_available() {
        assert!(
            !prereq::require_all(),
            "bench remote: no mkfs.erofs with --tar for containerd's erofs differ \
             (scripts/install-deps.sh builds it)"
        );
        eprintln!("skipping bench remote: no mkfs.erofs with --tar");
        return;
    }
    let full = full_run();
    let (iterations, reads) = if full { (3, 5) } else { (1, 1) };
    // CRI on overlayfs: the baseline of containerd's own pull.
    let mut tb = Testbed::start_hyperbox(|b| b.cri_snapshotter("overlayfs")).await;
    let reference = tb.via_proxy(&tb.push(&image(full), "bench/remote", "v1").await);
    let client = tb.containerd.client().await.unwrap();
    let blob_bytes: u64 = std::fs::read_dir(tb.work_dir())
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter_map(|f| f.metadata().ok())
        .filter(|m| m.len() > 4096)
        .map(|m| m.len())
        .sum();
    tb.proxy.set_shaping(LINK);

    // 1. Pull to exit, cold.
    let mut pull: HashMap<&str, Vec<Duration>> = HashMap::new();
    for n in 0..iterations {
        let order = if n % 2 == 0 {
            MODES
        } else {
            [MODES[1], MODES[0]]
        };
        for mode in order {
            tb.forget_image(&reference).await;
            let id = format!("pull-{mode}-{n}");
            let (took, img) = pull_to_exit(&client, None, &reference, &opts(mode), &id).await;
            if mode == "hyperbox" {
                assert_eq!(img.layers_skipped.len(), img.chain_ids.len());
            }
            pull.entry(mode).or_default().push(took);
        }
    }

    // 1a. containerd's own pull through CRI into overlayfs, then the same
    // container run to exit.
    let cri = tb.containerd.cri().await.unwrap();
    let k8s = client.with_namespace("k8s.io");
    for n in 0..iterations {
        tb.forget_image(&reference).await;
        let local = PullOptions::local("overlayfs");
        let id = format!("pull-cri-{n}");
        let (took, _) = pull_to_exit(&k8s, Some(&cri), &reference, &local, &id).await;
        pull.entry(CRI).or_default().push(took);
    }

    // 1c. containerd 2.4.2's erofs snapshotter, through CRI as well.
    let mut etb =
        Testbed::start_with(|b| b.line(Line::V2).erofs_snapshotter().cri_snapshotter(EROFS)).await;
    let eref = etb.via_proxy(&etb.push(&image(full), "bench/remote", "v1").await);
    etb.proxy.set_shaping(LINK);
    let ecri = etb.containerd.cri().await.unwrap();
    let ek8s = etb
        .containerd
        .client()
        .await
        .unwrap()
        .with_namespace("k8s.io");
    for n in 0..iterations {
        etb.forget_image(&eref).await;
        let local = PullOptions::local(EROFS);
        let id = format!("pull-erofs-{n}");
        let (took, _) = pull_to_exit(&ek8s, Some(&ecri), &eref, &local, &id).await;
        pull.entry(EROFS).or_default().push(took);
    }
    etb.proxy.set_shaping(Shaping::default());
    let erofs_image = ek8s.pull(&eref, &PullOptions::local(EROFS)).await.unwrap();

    // 1b. The same with the hyperbox index pushed (made outside the timing,
    // as a registry-side step like eStargz or SOCI conversion).
    tb.proxy.set_shaping(Shaping::default());
    tb.hyperbox().hb_index(&reference);
    // The snapshotter remembers for 10 s that the image had no index.
    tokio::time::sleep(Duration::from_secs(11)).await;
    tb.proxy.set_shaping(LINK);
    for n in 0..iterations {
        tb.forget_image(&reference).await;
        let id = format!("pull-lazy-{n}");
        let (took, _) = pull_to_exit(&client, None, &reference, &opts(LAZY), &id).await;
        pull.entry(LAZY).or_default().push(took);
    }

    // 2. Whole-rootfs read, page cache dropped, both images present (the
    // hyperbox one complete: fetched whole, no index involved).
    tb.proxy.set_shaping(Shaping::default());
    tb.forget_image(&reference).await;
    let mut images: HashMap<&str, Image> = HashMap::new();
    for mode in MODES {
        // One image record, but each snapshotter holds its own layers.
        images.insert(mode, client.pull(&reference, &opts(mode)).await.unwrap());
    }
    // The index makes hyperbox's pull lazy: read once every layer is in
    // and its mark is gone, so both sides read local files.
    assert!(
        tb.hyperbox()
            .wait_lazy_complete(Duration::from_secs(300))
            .await,
        "lazy fill never finished"
    );
    let script = "find / -xdev -type f -exec cat {} + | wc -c";
    let mut read: HashMap<&str, Vec<Duration>> = HashMap::new();
    let mut bytes = 0u64;
    for n in 0..reads {
        let order = if n % 2 == 0 {
            MODES
        } else {
            [MODES[1], MODES[0]]
        };
        for mode in order.into_iter().chain([EROFS]) {
            let (c, img) = if mode == EROFS {
                (&ek8s, &erofs_image)
            } else {
                (&client, &images[mode])
            };
            drop_caches();
            let start = Instant::now();
            let out = c
                .run(
                    &format!("read-{mode}-{n}"),
                    img,
                    &ContainerOptions::args(&["sh", "-c", script]),
                )
                .await
                .unwrap();
            let took = start.elapsed();
            assert_eq!(out.status, 0, "{}", out.stderr_str());
            let b: u64 = out.stdout_str().trim().parse().unwrap();
            assert!(bytes == 0 || b == bytes, "both read the same bytes");
            bytes = b;
            read.entry(mode).or_default().push(took);
            eprintln!("read rootfs {mode} #{n}: {took:?}");
        }
    }
    let mut left = tb.shutdown();
    left.extend(etb.shutdown());
    assert!(left.is_empty(), "left behind: {left:#?}");
    if !full {
        return;
    }

    let med = |m: &HashMap<&str, Vec<Duration>>, k: &str| percentile(&m[k], 50.0);
    let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    let mbps = |d: Duration| bytes as f64 / 1048576.0 / d.as_secs_f64();
    let mut body = String::new();
    body.push_str("## Remote path: registry to EROFS vs containerd's overlayfs\n\n");
    body.push_str(&format!(
        "Command: `cargo bench -p hyperbox-integration --bench remote` (as root). Machine: {}. \
         containerd 1.7.24 (the erofs side: containerd 2.4.2); image of {} layers, {:.0} MiB of blobs (3 × 100 MiB incompressible \
         files gzip'd, 6000 × 4 KiB files zstd'd, busybox), pulled through the harness proxy \
         shaped to 100 Mbit/s with 20 ms per request. hyperbox: every Prepare carries the CRI labels, hyperbox fetches all layers at once \
         (`max_concurrent_downloads` = 3), converts them to EROFS and mounts them \
         file-backed. Lazy: `hb image index` pushed the image's hyperbox index beforehand \
         (not timed); layers are mounted at once and bytes fetched in verified 1 MiB chunks \
         on first access while the rest fills in the background.\n\n",
        machine(),
        images["hyperbox"].chain_ids.len(),
        blob_bytes as f64 / 1048576.0
    ));
    body.push_str("Pull to container exit, median of cold runs:\n\n");
    body.push_str(
        "| how | median | runs | speed-up over containerd's own pull (CRI, overlayfs) |\n|---|---|---|---|\n",
    );
    let base = med(&pull, CRI);
    for (mode, what) in [
        (
            CRI,
            "overlayfs, containerd's own pull through CRI (3 parallel downloads, streaming unpack)",
        ),
        (
            "overlayfs",
            "overlayfs, client-side pull one layer after another (the harness's ctr-like client)",
        ),
        (
            "hyperbox",
            "hyperbox, full fetch: all layers fetched by hyperbox in parallel, served as EROFS",
        ),
        (LAZY, "hyperbox, lazy: the image has a hyperbox index"),
        (
            EROFS,
            "containerd 2.4.2's erofs snapshotter through CRI (erofs differ, mkfs.erofs 1.8.6)",
        ),
    ] {
        let m = med(&pull, mode);
        body.push_str(&format!(
            "| {what} | {} | {} | {:.2}× |\n",
            secs(m),
            pull[mode].len(),
            base.as_secs_f64() / m.as_secs_f64()
        ));
    }
    body.push_str(&format!(
        "\nRead the whole rootfs ({:.0} MiB) in a container, caches dropped, median of {reads}:\n\n\
         | side | time | throughput | vs overlayfs |\n|---|---|---|---|\n",
        bytes as f64 / 1048576.0
    ));
    let ro = med(&read, "overlayfs");
    for (mode, what) in [
        ("overlayfs", "overlayfs"),
        ("hyperbox", "hyperbox (EROFS, file-backed)"),
        (EROFS, "containerd 2.4.2's erofs snapshotter"),
    ] {
        let r = med(&read, mode);
        body.push_str(&format!(
            "| {what} | {} | {:.0} MiB/s | {:.2}× the throughput |\n",
            secs(r),
            mbps(r),
            ro.as_secs_f64() / r.as_secs_f64()
        ));
    }
    body.push_str(&format!(
        "\nAll pull samples (s): CRI {:?}; overlayfs {:?}; hyperbox {:?}; hyperbox lazy {:?}; erofs {:?}. Read samples (s): overlayfs {:?}; hyperbox {:?}; erofs {:?}.\n",
        pull[CRI].iter().map(|d| (d.as_secs_f64() * 100.0).round() / 100.0).collect::<Vec<_>>(),
        pull["overlayfs"].iter().map(|d| (d.as_secs_f64() * 100.0).round() / 100.0).collect::<Vec<_>>(),
        pull["hyperbox"].iter().map(|d| (d.as_secs_f64() * 100.0).round() / 100.0).collect::<Vec<_>>(),
        pull[LAZY].iter().map(|d| (d.as_secs_f64() * 100.0).round() / 100.0).collect::<Vec<_>>(),
        pull[EROFS].iter().map(|d| (d.as_secs_f64() * 100.0).round() / 100.0).collect::<Vec<_>>(),
        read["overlayfs"].iter().map(|d| (d.as_secs_f64() * 100.0).round() / 100.0).collect::<Vec<_>>(),
        read["hyperbox"].iter().map(|d| (d.as_secs_f64() * 100.0).round() / 100.0).collect::<Vec<_>>(),
        read[EROFS].iter().map(|d| (d.as_secs_f64() * 100.0).round() / 100.0).collect::<Vec<_>>(),
    ));
    let path = write_section("remote", &body).unwrap();
    println!("{body}\nwritten to {}", path.display());
}
