//! Realistic images through every snapshotter we compete with, in one run
//! per image:
//!
//! - `python`: Debian 12 slim with Python 3, requests, Jinja2 and PyYAML
//!   from Debian's packages and a small app that imports them (thousands
//!   of small files, gzip layers; see `hyperbox_integration::distro`);
//! - `files`: busybox and 20,000 text files of mixed size in two gzip
//!   layers, of which the workload reads 1,000 chosen at random
//!   (`hyperbox_integration::corpus::many_files`).
//!
//! Each side is a private containerd 2.4.2 pulling through CRI, as the
//! kubelet does, from its own registry behind the harness proxy shaped to
//! 100 Mbit/s with 20 ms per request:
//!
//! - overlayfs (the baseline);
//! - containerd's own erofs snapshotter, with its erofs differ (erofs-utils
//!   1.8.6, see scripts/install-deps.sh);
//! - the SOCI snapshotter v0.16.1, the image converted by `soci convert`
//!   with its defaults (lazy);
//! - hyperbox, full fetch, and with the image's hyperbox index pushed
//!   (lazy).
//!
//! containerd 2.x, because that is what new nodes run and because Debian's
//! containerd 1.7.24 does not pass the namespace to proxy snapshotters,
//! which SOCI needs (see `hyperbox_integration::soci`).
//!
//! Measured: pull to container exit, cold (image, content, snapshots and
//! every snapshotter's cache removed first; sides in rotating order), with
//! the bytes each side fetched; then, with every image complete and local
//! (each read through once first, so lazy sides hold every byte), the app's
//! start and a read of the whole rootfs with the page cache dropped.
//!
//! `cargo bench -p hyperbox-integration --bench realistic` (as root) runs
//! both images and rewrites their sections of docs/benchmarks.md
//! (`HYPERBOX_BENCH_IMAGES=files` runs one;
//! `HYPERBOX_BENCH_ONLY=hyperbox-lazy,hyperbox` times those sides only and
//! writes nothing, and with it `HYPERBOX_BENCH_LAZY=first` makes every lazy
//! run a first run, `HYPERBOX_BENCH_LAZY=prewarm` alternates cold and
//! prewarmed lazy runs on a node that ran the image before, and
//! `HYPERBOX_BENCH_LAZY_BACKEND=fuse` serves the lazy
//! side through the FUSE fallback); under `cargo test` it runs every side once on a small
//! busybox image as a smoke test.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hyperbox_integration::bench::{LINK, full_run, machine, percentile, write_section};
use hyperbox_integration::client::{Client, ContainerOptions, PullOptions};
use hyperbox_integration::containerd::{self, Line};
use hyperbox_integration::distro;
use hyperbox_integration::image::{BuiltImage, Compression, ImageSpec, Layer};
use hyperbox_integration::prereq::{self, Prereq};
use hyperbox_integration::proxy::Shaping;
use hyperbox_integration::reads;
use hyperbox_integration::snapshotter::NAME;
use hyperbox_integration::soci::{self, ConvertOptions, Soci};
use hyperbox_integration::testbed::Testbed;

/// One image of the bench.
struct Case {
    /// The docs/benchmarks.md section it rewrites.
    section: &'static str,
    /// That section's heading.
    title: &'static str,
    /// What the image holds and what its workload does.
    about: String,
    spec: ImageSpec,
    /// What the workload prints.
    expected: String,
    /// Repository name in the registries.
    repo: &'static str,
}

/// One way of running the image.
struct Side {
    name: &'static str,
    what: &'static str,
    /// Index into the testbeds.
    bed: usize,
    reference: String,
    pull: PullOptions,
}

/// Reads every file of the rootfs, printing the bytes read.
const SCRIPT: &str = "find / -xdev -type f -exec cat {} + | wc -c";

/// A small stand-in for the smoke run: busybox, a few hundred small files
/// and a file of 2 MiB, gzip'd.
fn small_image() -> ImageSpec {
    let mut spec = ImageSpec::busybox(&["sh", "-c", "cat /app/ready"]).unwrap();
    spec.layers.push(
        Layer::new(Compression::GzipDefault)
            .many_small_files("usr/lib/app", 300, 2048)
            .large_file("usr/lib/app/blob", 2 << 20, 7),
    );
    spec.layers
        .push(Layer::new(Compression::GzipDefault).dir("app", 0o755).file(
            "app/ready",
            "ready\n",
            0o644,
        ));
    spec
}

/// Everything of earlier pulls on `side`'s testbed gone, SOCI's cache too:
/// images of the same layers share snapshots, so all of the testbed's
/// images go together.
async fn forget(beds: &mut [Testbed], sides: &[Side], side: &Side, soci: &mut Soci) {
    let on_bed: Vec<&str> = sides
        .iter()
        .filter(|s| s.bed == side.bed)
        .map(|s| s.reference.as_str())
        .collect();
    let tb = &mut beds[side.bed];
    tb.forget_images(&on_bed).await;
    if side.name == "soci" {
        soci.forget_image(&tb.containerd, &side.reference)
            .await
            .expect("forget the SOCI image");
    }
}

/// The testbed's containerd client in CRI's namespace.
async fn k8s(tb: &Testbed) -> Client {
    tb.containerd
        .client()
        .await
        .expect("containerd client")
        .with_namespace("k8s.io")
}

fn drop_caches() {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches (root)");
}

fn secs(samples: &[Duration]) -> Vec<f64> {
    samples
        .iter()
        .map(|d| (d.as_secs_f64() * 100.0).round() / 100.0)
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !prereq::require(
        "bench realistic",
        &[Prereq::CONTAINERS, &[Prereq::Containerd2, Prereq::Strace]].concat(),
    ) || !soci::require("bench realistic")
    {
        return;
    }
    if !containerd::erofs_differ_available() {
        assert!(
            !prereq::require_all(),
            "bench realistic: no mkfs.erofs with --tar for containerd's erofs differ \
             (scripts/install-deps.sh builds it)"
        );
        eprintln!("skipping bench realistic: no mkfs.erofs with --tar");
        return;
    }
    let full = full_run();
    if !full {
        run(
            Case {
                section: "",
                title: "",
                about: String::new(),
                spec: small_image(),
                expected: "ready\n".into(),
                repo: "smoke",
            },
            false,
        )
        .await;
        return;
    }
    let wanted = std::env::var("HYPERBOX_BENCH_IMAGES").unwrap_or_else(|_| "python,files".into());
    for name in wanted.split(',').map(str::trim) {
        let case = match name {
            "python" => Case {
                section: "realistic",
                title: "A realistic image: Debian + Python, hyperbox against overlayfs, erofs and SOCI",
                about: format!(
                    "Debian 12 minbase slimmed as the `-slim` images are, with {} from Debian's \
                     packages, and an app that imports requests, Jinja2, PyYAML and a good part of \
                     the standard library, renders a template and prints `ready` \
                     (`integration/src/distro.rs`)",
                    distro::PACKAGES.join(", ")
                ),
                spec: distro::python_trees()
                    .expect("build the Debian + Python image (debootstrap, apt-get)")
                    .image(),
                expected: "ready\n".into(),
                repo: "python",
            },
            "files" => {
                let m = hyperbox_integration::corpus::many_files();
                Case {
                    section: "realistic-files",
                    title: "Many small files: 20,000 files, 1,000 read, hyperbox against overlayfs, erofs and SOCI",
                    about: format!(
                        "busybox and {} text files of 256 B to 80 KiB ({:.0} MiB) in two gzip \
                         layers; the workload reads 1,000 of them chosen at random ({:.1} MiB) \
                         and prints their SHA-256 (`integration/src/corpus.rs`, `many_files`)",
                        m.files,
                        m.bytes as f64 / 1048576.0,
                        m.read_bytes as f64 / 1048576.0
                    ),
                    spec: m.spec,
                    expected: m.expected,
                    repo: "files",
                }
            }
            other => panic!("HYPERBOX_BENCH_IMAGES: no image {other:?} (python, files)"),
        };
        run(case, true).await;
    }
}

/// Runs every side on `case`'s image; with `full`, five runs each and its
/// section of docs/benchmarks.md rewritten.
async fn run(case: Case, full: bool) {
    let (iterations, reads) = if full { (5, 5) } else { (1, 1) };
    // While tuning (with `HYPERBOX_BENCH_ONLY`), `HYPERBOX_BENCH_RUNS=n`
    // times n pulls per side.
    let iterations = std::env::var("HYPERBOX_BENCH_RUNS")
        .ok()
        .filter(|_| std::env::var_os("HYPERBOX_BENCH_ONLY").is_some())
        .and_then(|n| n.parse().ok())
        .unwrap_or(iterations);
    let (spec, expected) = (&case.spec, case.expected.as_str());

    // The testbeds, all containerd 2.4.2: overlayfs, hyperbox, SOCI, erofs.
    let mut soci_daemon = Soci::start().await.expect("start soci-snapshotter-grpc");
    let soci_plugin = soci_daemon.proxy_plugin();
    // Metrics served: the lazy side's byte counts are read by exit.
    let lazy_backend = std::env::var("HYPERBOX_BENCH_LAZY_BACKEND")
        .map(|b| format!("lazy_backend = \"{b}\"\n"))
        .unwrap_or_default()
        + "metrics_address = \"127.0.0.1:0\"\n";
    let mut beds = vec![
        Testbed::start_with(|b| b.line(Line::V2)).await,
        Testbed::start_hyperbox_configured(&lazy_backend, |b| b.line(Line::V2)).await,
        Testbed::start_with(|b| {
            b.line(Line::V2)
                .proxy_plugin(soci_plugin)
                .cri_snapshotter(soci::NAME)
        })
        .await,
        Testbed::start_with(|b| {
            b.line(Line::V2)
                .erofs_snapshotter()
                .cri_snapshotter("erofs")
        })
        .await,
    ];
    soci_daemon
        .attach(&beds[2].containerd)
        .expect("point soci at containerd");
    let work = tempfile::tempdir().unwrap();
    let built: BuiltImage = spec.build(work.path()).expect("build image");
    let blob_bytes: u64 = built.layers.iter().map(|l| l.blob.size).sum();
    // What the workload reads, and its price in the gzip layers: #19's
    // bytes target is by exit ≤ 1.2 × that, plus the index.
    let workload = reads::measure(&built, &spec.run).expect("trace the workload's reads");
    eprintln!(
        "the workload reads {} files: {:.1} MiB, {:.2} MiB of them in the compressed layers",
        workload.files.len(),
        workload.bytes as f64 / 1048576.0,
        workload.compressed as f64 / 1048576.0
    );
    let floor = workload.floor;
    eprintln!(
        "read exactly, from the layers' own blobs: {:.2} MiB at the least ({:.2} MiB of layer bytes over {} clusters + {:.2} MiB of windows trimmed to each cluster's references), {:.2}x their compressed bytes",
        floor.total() as f64 / 1048576.0,
        floor.range as f64 / 1048576.0,
        floor.clusters,
        floor.windows as f64 / 1048576.0,
        floor.total() as f64 / workload.compressed.max(1) as f64
    );
    let mut refs = Vec::new();
    for tb in &beds {
        let r = built
            .push(&tb.registry.host(), &format!("bench/{}", case.repo), "v1")
            .await
            .expect("push image");
        refs.push(tb.via_proxy(&r));
    }
    // hyperbox lazy: the same image in another repository, with its index.
    let lazy = built
        .push(
            &beds[1].registry.host(),
            &format!("bench/{}-indexed", case.repo),
            "v1",
        )
        .await
        .unwrap();
    // `HYPERBOX_BENCH_SPAN=BYTES` tries another checkpoint span, and
    // `HYPERBOX_BENCH_CHUNK=BYTES` another chunk size.
    let mut index_args = vec!["image".to_string(), "index".into(), "--json".into()];
    for (var, flag) in [
        ("HYPERBOX_BENCH_SPAN", "--span"),
        ("HYPERBOX_BENCH_CHUNK", "--chunk-size"),
    ] {
        if let Ok(v) = std::env::var(var) {
            index_args.extend([flag.to_string(), v]);
        }
    }
    index_args.push(lazy.clone());
    let indexed = beds[1]
        .hyperbox()
        .hb_json(&index_args.iter().map(String::as_str).collect::<Vec<_>>());
    let index_bytes = indexed["index_bytes"].as_u64().expect("index size");
    let bytes_target = workload.compressed as f64 * 1.2 + index_bytes as f64;
    let lazy_direct = lazy.clone();
    let lazy = beds[1].via_proxy(&lazy);
    // SOCI: the converted image (the conversion is a registry-side step,
    // like hyperbox's index; not timed), with SOCI's default zTOC threshold
    // and span size; the smoke image's layers are smaller than 10 MiB.
    let convert = if full {
        ConvertOptions::min_layer_size(10 << 20)
    } else {
        ConvertOptions::min_layer_size(1 << 20)
    };
    let soci_ref = soci::convert(
        &beds[2].containerd,
        &refs[2].replacen(&beds[2].proxy.host(), &beds[2].registry.host(), 1),
        &format!("{}/bench/{}-soci:v1", beds[2].registry.host(), case.repo),
        &convert,
    )
    .await
    .expect("soci convert")
    .reference;
    let soci_ref = beds[2].via_proxy(&soci_ref);
    for tb in &beds {
        tb.proxy.set_shaping(LINK);
    }

    let labels = |s: &str| PullOptions {
        snapshotter: s.into(),
        remote_labels: true,
    };
    let sides = vec![
        Side {
            name: "overlayfs",
            what: "overlayfs",
            bed: 0,
            reference: refs[0].clone(),
            pull: PullOptions::local("overlayfs"),
        },
        Side {
            name: "erofs",
            what: "containerd's erofs snapshotter (erofs differ, mkfs.erofs 1.8.6)",
            bed: 3,
            reference: refs[3].clone(),
            pull: PullOptions::local("erofs"),
        },
        Side {
            name: "soci",
            what: "SOCI v0.16.1, lazy (`soci convert` defaults: zTOC for layers over 10 MiB, 4 MiB spans)",
            bed: 2,
            reference: soci_ref,
            pull: labels(soci::NAME),
        },
        Side {
            name: "hyperbox",
            what: "hyperbox, full fetch (EROFS, file-backed)",
            bed: 1,
            reference: refs[1].clone(),
            pull: labels(NAME),
        },
        Side {
            name: "hyperbox-lazy",
            what: "hyperbox, lazy (the image has a hyperbox index (version 4: layer maps onto its gzip layers, 4 KiB block digests); reads ahead of the fill, prefetch list learned on the first run and shared through the registry)",
            bed: 1,
            reference: lazy,
            pull: labels(NAME),
        },
    ];

    // While tuning one side: `HYPERBOX_BENCH_ONLY=hyperbox-lazy,hyperbox`
    // times the pulls of those sides only, prints them and writes nothing.
    let only: Option<Vec<String>> = std::env::var("HYPERBOX_BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let timed: Vec<&Side> = sides
        .iter()
        .filter(|s| only.as_ref().is_none_or(|o| o.iter().any(|n| n == s.name)))
        .collect();
    // With `HYPERBOX_BENCH_ONLY`, `HYPERBOX_BENCH_LAZY=first` makes every
    // lazy run the image's first anywhere (nothing shared, nothing learned
    // kept), for tuning that case on more than one sample.
    let first_runs_only =
        only.is_some() && std::env::var("HYPERBOX_BENCH_LAZY").is_ok_and(|v| v == "first");
    // ... and `HYPERBOX_BENCH_LAZY=prewarm` makes every later lazy run a
    // node that ran the image before and lost it (its learned lists kept),
    // every other one prewarmed first (`hb image prewarm`, its time and
    // bytes counted apart): prewarmed starts against cold ones.
    let prewarm_runs =
        only.is_some() && std::env::var("HYPERBOX_BENCH_LAZY").is_ok_and(|v| v == "prewarm");
    // (pull to exit, container start to exit) of cold and prewarmed
    // lazy runs, the seconds their reads waited in all, and each
    // prewarm's time and bytes.
    let mut cold: Vec<(Duration, Duration)> = Vec::new();
    let mut prewarmed: Vec<(Duration, Duration)> = Vec::new();
    let mut waits: (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    let mut prewarm_cost: Vec<(Duration, u64)> = Vec::new();

    // 1. Pull to exit, cold, through CRI.
    let mut pull: HashMap<&str, Vec<Duration>> = HashMap::new();
    let mut fetched: HashMap<&str, Vec<u64>> = HashMap::new();
    // The lazy side once every layer is complete and checked: when, and
    // the bytes it took in all (what the workload's exit leaves out).
    let mut complete: Vec<Duration> = Vec::new();
    let mut fetched_in_all: Vec<u64> = Vec::new();
    // Checkpoints the push learned, and their blobs' bytes.
    let mut learned_points = (0u64, 0u64);
    for n in 0..iterations {
        for k in 0..timed.len() {
            let side = timed[(n + k) % timed.len()];
            forget(&mut beds, &sides, side, &mut soci_daemon).await;
            if side.name == "hyperbox-lazy" && n > 0 {
                // Every later lazy run is a node that never ran the image:
                // what the first run learned reaches it through the
                // registry only (`hb image prefetch push`).
                if n == 1 && !first_runs_only {
                    let pushing = Instant::now();
                    let pushed = beds[1].hyperbox().hb_json(&[
                        "image",
                        "prefetch",
                        "push",
                        "--json",
                        &lazy_direct,
                    ]);
                    eprintln!("prefetch pushed in {:?}: {pushed}", pushing.elapsed());
                    for l in pushed["layers"].as_array().into_iter().flatten() {
                        learned_points.0 += l["points"].as_u64().unwrap_or_default();
                        learned_points.1 += l["points_bytes"].as_u64().unwrap_or_default();
                    }
                }
                let on_bed: Vec<&str> = sides
                    .iter()
                    .filter(|s| s.bed == 1)
                    .map(|s| s.reference.as_str())
                    .collect();
                if prewarm_runs {
                    beds[1].forget_images(&on_bed).await;
                    if n % 2 == 0 {
                        let tb = &mut beds[1];
                        let (began, before) = (Instant::now(), tb.proxy.bytes_served());
                        let warmed =
                            tb.hyperbox()
                                .hb_json(&["image", "prewarm", "--json", &side.reference]);
                        let cost = (began.elapsed(), tb.proxy.bytes_served() - before);
                        eprintln!(
                            "prewarmed in {:?}, {:.1} MiB: {warmed}",
                            cost.0,
                            cost.1 as f64 / 1048576.0
                        );
                        prewarm_cost.push(cost);
                    }
                } else {
                    beds[1].forget_images_and_learned(&on_bed).await;
                }
            }
            let tb = &beds[side.bed];
            let k8s = k8s(tb).await;
            let cri = tb.containerd.cri().await.unwrap();
            let counted = lazy_counts(tb, side.name).await;
            let waited_before = lazy_wait(tb, side.name).await;
            let sizes_before = lazy_sizes(tb, side.name).await;
            let before = tb.proxy.bytes_served();
            let start = Instant::now();
            cri.pull_image(&side.reference).await.unwrap();
            let img = k8s.pull(&side.reference, &side.pull).await.unwrap();
            let pulled = start.elapsed();
            let out = k8s
                .run(
                    &format!("pull-{}-{n}", side.name),
                    &img,
                    &ContainerOptions::default(),
                )
                .await
                .unwrap();
            let took = start.elapsed();
            let bytes = tb.proxy.bytes_served() - before;
            assert_eq!(out.stdout_str(), expected, "{}", out.stderr_str());
            eprintln!(
                "pull to exit {} #{n}: {took:?}, {:.1} MiB fetched",
                side.name,
                bytes as f64 / 1048576.0
            );
            if let Some(sn) = tb
                .snapshotter
                .as_ref()
                .filter(|_| side.name == "hyperbox-lazy")
            {
                // When each layer arrived, converted and filled, against
                // the pull's start (the log's clock is the wall clock).
                let began = unix_now() - took.as_secs_f64();
                for l in sn.log().lines().filter(|l| {
                    l.contains("layer fetched and converted") || l.contains("lazy layer complete")
                }) {
                    let at = l.split_whitespace().next().and_then(log_seconds);
                    if let Some(at) = at.filter(|t| *t >= began) {
                        eprintln!(
                            "  +{:.2} s {}",
                            at - began,
                            l.split("INFO").nth(1).unwrap_or(l).trim()
                        );
                    }
                }
            }
            if let (Some(a), Some(b)) = (counted, lazy_counts(tb, side.name).await) {
                let mib = |i: usize| b[i].saturating_sub(a[i]) as f64 / 1048576.0;
                eprintln!(
                    "  by exit: {:.1} MiB of layer Range requests, {:.1} MiB of windows, {:.2} MiB of block digests, {:.1} MiB read from layer downloads on the node ({} reads waited for one), {} chunks made from downloads as they came",
                    mib(0),
                    mib(1),
                    mib(11),
                    mib(2),
                    b[3].saturating_sub(a[3]),
                    b[4].saturating_sub(a[4])
                );
                let d = |i: usize| b[i].saturating_sub(a[i]);
                eprintln!(
                    "  by exit: {} reads waited, {} chunks prefetched, {} read ahead, {} made beside requests, {} requests from learned checkpoints, {} fetched again when short",
                    d(5),
                    d(6),
                    d(7),
                    d(8),
                    d(9),
                    d(10)
                );
            }
            if let (Some(a), Some(b)) = (sizes_before.as_ref(), lazy_sizes(tb, side.name).await) {
                // Reads per bucket by exit, as the kernel asked.
                let n: Vec<(f64, u64)> = b
                    .iter()
                    .zip(a)
                    .map(|((le, y), (_, x))| (*le, y.saturating_sub(*x)))
                    .collect();
                let all = n.last().map_or(0, |l| l.1).max(1);
                let share = |k: f64| {
                    n.iter()
                        .find(|(le, _)| *le >= k)
                        .map_or(0.0, |(_, c)| *c as f64 * 100.0 / all as f64)
                };
                eprintln!(
                    "  by exit: {} reads as the kernel asked them: {:.0} % of 4 KiB or less, {:.0} % of 16 KiB or less, {:.0} % of 128 KiB or less",
                    n.last().map_or(0, |l| l.1),
                    share(4096.0),
                    share(16384.0),
                    share(131072.0)
                );
            }
            let waited = match (waited_before, lazy_wait(tb, side.name).await) {
                (Some(a), Some(b)) => {
                    eprintln!(
                        "  by exit: reads waited {:.3} s in all ({} reads of layers still filling)",
                        b.0 - a.0,
                        b.1 - a.1
                    );
                    b.0 - a.0
                }
                _ => 0.0,
            };
            if prewarm_runs && side.name == "hyperbox-lazy" && n > 0 {
                let (runs, wait) = if n % 2 == 0 {
                    (&mut prewarmed, &mut waits.1)
                } else {
                    (&mut cold, &mut waits.0)
                };
                runs.push((took, took - pulled));
                wait.push(waited);
            }
            pull.entry(side.name).or_default().push(took);
            fetched.entry(side.name).or_default().push(bytes);
            if side.name == "hyperbox-lazy" {
                let lazy_dir = tb
                    .snapshotter
                    .as_ref()
                    .expect("the hyperbox bed")
                    .root()
                    .join("lazy");
                let deadline = Instant::now() + Duration::from_secs(600);
                while lazy_states(&lazy_dir) > 0 {
                    assert!(Instant::now() < deadline, "lazy layers never completed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let all = tb.proxy.bytes_served() - before;
                eprintln!(
                    "  complete after {:?}, {:.1} MiB fetched in all",
                    start.elapsed(),
                    all as f64 / 1048576.0,
                );
                complete.push(start.elapsed());
                fetched_in_all.push(all);
            }
        }
    }
    let lazy_all = |v: &[u64]| {
        let mut v = v.to_vec();
        v.sort();
        v.get(v.len() / 2).map_or(0.0, |b| *b as f64 / 1048576.0)
    };
    // The later lazy runs' bytes by exit (median, MiB), when there are any.
    let later_mib = fetched
        .get("hyperbox-lazy")
        .filter(|f| f.len() > 1)
        .map(|f| lazy_all(&f[1..]));

    if only.is_some() {
        for side in &timed {
            let mut f = fetched[side.name].clone();
            f.sort();
            eprintln!(
                "{}: pull to exit median {:.2} s, fetched median {:.1} MiB, samples {:?}",
                side.name,
                percentile(&pull[side.name], 50.0).as_secs_f64(),
                f[f.len() / 2] as f64 / 1048576.0,
                secs(&pull[side.name])
            );
        }
        if let Some(later) = later_mib {
            eprintln!(
                "hyperbox-lazy: later runs fetched {later:.1} MiB by exit (median), {:.2}x the bytes target ({:.1} MiB = 1.2 x {:.2} MiB read, compressed, + the index's {:.2} MiB)",
                later * 1048576.0 / bytes_target,
                bytes_target / 1048576.0,
                workload.compressed as f64 / 1048576.0,
                index_bytes as f64 / 1048576.0
            );
        }
        if !complete.is_empty() {
            eprintln!(
                "hyperbox-lazy: complete median {:.2} s, fetched in all median {:.1} MiB, samples {:?}",
                percentile(&complete, 50.0).as_secs_f64(),
                lazy_all(&fetched_in_all),
                secs(&complete)
            );
        }
        if prewarm_runs && !cold.is_empty() && !prewarmed.is_empty() {
            let median = |runs: &[(Duration, Duration)], run_only: bool| {
                let v: Vec<Duration> = runs
                    .iter()
                    .map(|r| if run_only { r.1 } else { r.0 })
                    .collect();
                percentile(&v, 50.0).as_secs_f64()
            };
            let wait_median = |v: &[f64]| {
                let mut v = v.to_vec();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            eprintln!(
                "prewarm: reads waited in all (first-access latency), cold median {:.3} s, prewarmed {:.3} s; samples cold {:?} prewarmed {:?}",
                wait_median(&waits.0),
                wait_median(&waits.1),
                waits.0,
                waits.1
            );
            let costs: Vec<Duration> = prewarm_cost.iter().map(|c| c.0).collect();
            let mut bytes: Vec<u64> = prewarm_cost.iter().map(|c| c.1).collect();
            bytes.sort();
            eprintln!(
                "prewarm: cold (learned here) pull to exit median {:.2} s, container start to exit {:.2} s; prewarmed {:.2} s and {:.2} s ({:.2}x, {:.2}x); prewarm itself median {:.2} s, {:.1} MiB; samples cold {:?} prewarmed {:?}",
                median(&cold, false),
                median(&cold, true),
                median(&prewarmed, false),
                median(&prewarmed, true),
                median(&prewarmed, false) / median(&cold, false),
                median(&prewarmed, true) / median(&cold, true),
                percentile(&costs, 50.0).as_secs_f64(),
                bytes
                    .get(bytes.len() / 2)
                    .map_or(0.0, |b| *b as f64 / 1048576.0),
                cold.iter().map(|r| r.0.as_secs_f64()).collect::<Vec<_>>(),
                prewarmed
                    .iter()
                    .map(|r| r.0.as_secs_f64())
                    .collect::<Vec<_>>(),
            );
        }
        let mut leaks = Vec::new();
        for tb in beds {
            leaks.extend(tb.shutdown());
        }
        leaks.extend(soci_daemon.shutdown());
        assert!(leaks.is_empty(), "left behind: {leaks:#?}");
        return;
    }

    // 2. Every image complete and local, page cache dropped: the app's
    // start, then the whole rootfs read.
    for tb in &beds {
        tb.proxy.set_shaping(Shaping::default());
    }
    let readers: Vec<&Side> = sides.iter().filter(|s| s.name != "hyperbox-lazy").collect();
    let mut images = HashMap::new();
    for side in &readers {
        forget(&mut beds, &sides, side, &mut soci_daemon).await;
        let tb = &beds[side.bed];
        let cri = tb.containerd.cri().await.unwrap();
        cri.pull_image(&side.reference).await.unwrap();
        let k8s = k8s(tb).await;
        let img = k8s.pull(&side.reference, &side.pull).await.unwrap();
        // Read through once, so lazy sides hold every byte before timing.
        let out = k8s
            .run(
                &format!("warm-{}", side.name),
                &img,
                &ContainerOptions::args(&["sh", "-c", SCRIPT]),
            )
            .await
            .unwrap();
        assert_eq!(out.status, 0, "{}", out.stderr_str());
        images.insert(side.name, img);
    }
    let mut app: HashMap<&str, Vec<Duration>> = HashMap::new();
    let mut read: HashMap<&str, Vec<Duration>> = HashMap::new();
    let mut rootfs_bytes = 0u64;
    for n in 0..reads {
        for k in 0..readers.len() {
            let side = readers[(n + k) % readers.len()];
            let k8s = k8s(&beds[side.bed]).await;
            drop_caches();
            let start = Instant::now();
            let out = k8s
                .run(
                    &format!("app-{}-{n}", side.name),
                    &images[side.name],
                    &ContainerOptions::default(),
                )
                .await
                .unwrap();
            let took = start.elapsed();
            assert_eq!(out.stdout_str(), expected, "{}", out.stderr_str());
            app.entry(side.name).or_default().push(took);
            drop_caches();
            let start = Instant::now();
            let out = k8s
                .run(
                    &format!("read-{}-{n}", side.name),
                    &images[side.name],
                    &ContainerOptions::args(&["sh", "-c", SCRIPT]),
                )
                .await
                .unwrap();
            let took = start.elapsed();
            assert_eq!(out.status, 0, "{}", out.stderr_str());
            let b: u64 = out.stdout_str().trim().parse().unwrap();
            assert!(
                rootfs_bytes == 0 || b == rootfs_bytes,
                "{} read {b} bytes, others {rootfs_bytes}",
                side.name
            );
            rootfs_bytes = b;
            read.entry(side.name).or_default().push(took);
            eprintln!(
                "{} #{n}: app {:?}, rootfs read {took:?}",
                side.name,
                app[side.name].last().unwrap()
            );
        }
    }
    let mut leaks = Vec::new();
    for tb in beds {
        leaks.extend(tb.shutdown());
    }
    leaks.extend(soci_daemon.shutdown());
    drop(work);
    assert!(leaks.is_empty(), "left behind: {leaks:#?}");
    if !full {
        return;
    }

    let med = |m: &HashMap<&str, Vec<Duration>>, k: &str| percentile(&m[k], 50.0);
    let s2 = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    let mut body = String::new();
    body.push_str(&format!("## {}\n\n", case.title));
    body.push_str(&format!(
        "Command: `HYPERBOX_BENCH_IMAGES={} cargo bench -p hyperbox-integration --bench realistic` \
         (as root; without the variable both images run). Machine: {}. \
         Image: {}; {} layers, {:.1} MiB of gzip blobs, {:.0} MiB of \
         files. Every side is a private containerd 2.4.2 and pulls through CRI from its own registry behind the harness proxy \
         shaped to 100 Mbit/s with 20 ms per request; image, content, snapshots and the \
         snapshotter's caches removed before each pull; sides in rotating order, {iterations} \
         runs each. The hyperbox index and the SOCI index were made and pushed beforehand \
         (not timed), as eStargz or SOCI conversion is. The hyperbox index adds {:.2} MiB to \
         the registry ({:.1} % of the image's compressed layers): chunk digests and, per layer, \
         a layer map and a table of 4 KiB block digests; file data comes from the image's own \
         layer blobs.\n\n",
        case.repo,
        machine(),
        case.about,
        built.layers.len(),
        blob_bytes as f64 / 1048576.0,
        rootfs_bytes as f64 / 1048576.0,
        index_bytes as f64 / 1048576.0,
        index_bytes as f64 * 100.0 / blob_bytes as f64,
    ));
    body.push_str(
        "| side | pull to exit, median | vs overlayfs | fetched from the registry, median |\n|---|---|---|---|\n",
    );
    let base = med(&pull, "overlayfs");
    for side in &sides {
        let m = med(&pull, side.name);
        let mut f = fetched[side.name].clone();
        f.sort();
        body.push_str(&format!(
            "| {} | {} | {:.2}× |  {:.1} MiB |\n",
            side.what,
            s2(m),
            base.as_secs_f64() / m.as_secs_f64(),
            f[f.len() / 2] as f64 / 1048576.0
        ));
    }
    let lazy_runs = secs(&pull["hyperbox-lazy"]);
    let later = percentile(&pull["hyperbox-lazy"][1..], 50.0);
    body.push_str(&format!(
        "\nThe lazy side's first pull is the image's first run anywhere: nothing learned yet, \
         {:.2} s. Its learned prefetch list is then pushed beside the index (`hb image prefetch \
         push`, which also pushes {} learned checkpoints: {:.2} MiB more in the registry), \
         and every later pull is on a node with no list of its own (image, caches and \
         lists removed, snapshotter restarted), which fetches what the first run read first: \
         {} for the later runs (the lower of their two middle samples; {:.2}× the full \
         fetch's median). Lazy samples in order: {lazy_runs:?}. Every lazy layer complete \
         and checked against its image {} after the pull began (median; samples {:?}), \
         {:.1} MiB fetched from the registry in all (median; the full fetch: {:.1} MiB).\n\n\
         The workload reads {} files, {:.1} MiB, which are {:.2} MiB of the compressed layers \
         (traced with strace in the unpacked image, each file priced from where its data \
         begins in its layer's deflate stream to where it ends: `hyperbox_integration::reads`). \
         The later lazy runs fetched {:.1} MiB by the workload's exit (median): {:.2}× #19's \
         bytes target of 1.2 × those {:.2} MiB plus the index's {:.2} MiB ({:.1} MiB). \
         The least any reader fetches to serve exactly those files from the layers' own blobs, \
         each cluster of them (reads less than 32 KiB apart) from the deflate symbol before it \
         to the one that ends it, with the window there trimmed to what the cluster refers to \
         (`hyperbox_integration::reads::Floor`): {:.2} MiB ({:.2} MiB of layer bytes over {} \
         clusters and {:.2} MiB of windows), {:.2}× the files' compressed bytes; with the \
         index, {:.2}× the bytes target.\n",
        lazy_runs[0],
        learned_points.0,
        learned_points.1 as f64 / 1048576.0,
        s2(later),
        med(&pull, "hyperbox").as_secs_f64() / later.as_secs_f64(),
        s2(percentile(&complete, 50.0)),
        secs(&complete),
        lazy_all(&fetched_in_all),
        {
            let mut f = fetched["hyperbox"].clone();
            f.sort();
            f[f.len() / 2] as f64 / 1048576.0
        },
        workload.files.len(),
        workload.bytes as f64 / 1048576.0,
        workload.compressed as f64 / 1048576.0,
        later_mib.unwrap_or_default(),
        later_mib.unwrap_or_default() * 1048576.0 / bytes_target,
        workload.compressed as f64 / 1048576.0,
        index_bytes as f64 / 1048576.0,
        bytes_target / 1048576.0,
        floor.total() as f64 / 1048576.0,
        floor.range as f64 / 1048576.0,
        floor.clusters,
        floor.windows as f64 / 1048576.0,
        floor.total() as f64 / workload.compressed.max(1) as f64,
        (floor.total() + index_bytes) as f64 / bytes_target,
    ));
    body.push_str(&format!(
        "\nWith the image complete and local, page cache dropped before each, median of {reads} \
         (the lazy hyperbox side, once filled, is the same EROFS files as the full fetch):\n\n\
         | side | workload, start to exit | vs overlayfs | read the whole rootfs ({:.0} MiB) | throughput | vs overlayfs |\n|---|---|---|---|---|---|\n",
        rootfs_bytes as f64 / 1048576.0
    ));
    let (app_base, read_base) = (med(&app, "overlayfs"), med(&read, "overlayfs"));
    for side in &readers {
        let (a, r) = (med(&app, side.name), med(&read, side.name));
        body.push_str(&format!(
            "| {} | {} | {:.2}× | {} | {:.0} MiB/s | {:.2}× |\n",
            side.what,
            s2(a),
            app_base.as_secs_f64() / a.as_secs_f64(),
            s2(r),
            rootfs_bytes as f64 / 1048576.0 / r.as_secs_f64(),
            read_base.as_secs_f64() / r.as_secs_f64(),
        ));
    }
    body.push_str("\nRatios above 1 are faster than overlayfs.\n\nAll samples (s):");
    for side in &sides {
        body.push_str(&format!(
            " {} pull {:?};",
            side.name,
            secs(&pull[side.name])
        ));
    }
    for side in &readers {
        body.push_str(&format!(
            " {} app {:?}, read {:?};",
            side.name,
            secs(&app[side.name]),
            secs(&read[side.name])
        ));
    }
    body.push('\n');
    let path = write_section(case.section, &body).unwrap();
    println!("{body}\nwritten to {}", path.display());
}

/// Lazy layers not yet complete and checked: their state files.
fn lazy_states(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".lazy"))
                .count()
        })
        .unwrap_or(0)
}

/// For the lazy side, the snapshotter's counts of layer Range bytes,
/// window bytes and bytes read from layer downloads on the node, of
/// reads that waited for a download, and of chunks made from downloads
/// as they arrived; then of reads that waited at all, chunks prefetched,
/// read ahead and made beside requests, requests from learned
/// checkpoints and requests made again when short; `None` for other
/// sides.
async fn lazy_counts(tb: &Testbed, side: &str) -> Option<[u64; 12]> {
    if side != "hyperbox-lazy" {
        return None;
    }
    let page = tb.snapshotter.as_ref()?.metrics().await;
    let m = |n: &str| hyperbox_integration::lazy::metric(&page, n);
    Some([
        m("hyperbox_snapshotter_lazy_layer_range_bytes_total"),
        m("hyperbox_snapshotter_lazy_window_bytes_total"),
        m("hyperbox_snapshotter_lazy_download_read_bytes_total"),
        m("hyperbox_snapshotter_lazy_download_waits_total"),
        m("hyperbox_snapshotter_lazy_download_chunks_total"),
        m("hyperbox_snapshotter_lazy_waited_reads_total"),
        m("hyperbox_snapshotter_lazy_prefetched_chunks_total"),
        m("hyperbox_snapshotter_lazy_readahead_chunks_total"),
        m("hyperbox_snapshotter_lazy_span_chunks_total"),
        m("hyperbox_snapshotter_lazy_learned_checkpoint_requests_total"),
        m("hyperbox_snapshotter_lazy_map_refetches_total"),
        m("hyperbox_snapshotter_lazy_block_table_bytes_total"),
    ])
}

/// The lazy side's reads by size ([`hyperbox_integration::lazy::read_sizes`]).
async fn lazy_sizes(tb: &Testbed, side: &str) -> Option<Vec<(f64, u64)>> {
    if side != "hyperbox-lazy" {
        return None;
    }
    let page = tb.snapshotter.as_ref()?.metrics().await;
    Some(hyperbox_integration::lazy::read_sizes(&page))
}

/// Seconds the lazy side's reads waited in all, and how many reads.
async fn lazy_wait(tb: &Testbed, side: &str) -> Option<(f64, u64)> {
    if side != "hyperbox-lazy" {
        return None;
    }
    let page = tb.snapshotter.as_ref()?.metrics().await;
    Some(hyperbox_integration::lazy::read_wait(&page))
}

/// Seconds since the epoch now.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Seconds since the epoch of a log line's RFC 3339 UTC timestamp
/// (`2026-12-05T00:44:46.227118Z`), taken to be of today (a run does not
/// cross midnight UTC).
fn log_seconds(stamp: &str) -> Option<f64> {
    let (_, time) = stamp.strip_suffix('Z')?.split_once('T')?;
    let mut t = time.split(':').map(|v| v.parse::<f64>().ok());
    let (h, m, sec) = (t.next()??, t.next()??, t.next()??);
    let day = (unix_now() / 86400.0).floor() * 86400.0;
    Some(day + h * 3600.0 + m * 60.0 + sec)
}
