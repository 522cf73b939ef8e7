//! hyperbox-snapshotter (local-unpack path) against containerd's overlayfs
//! snapshotter, in the same run on the same machine:
//!
//! 1. pull + unpack + first start of a multi-layer image, cold each time
//!    (image, content and snapshots collected first), order alternating;
//! 2. Prepare, Commit and Remove latency through containerd's Snapshots API
//!    with 32 concurrent clients.
//!
//! `cargo bench -p hyperbox-integration --bench snapshotter` (as root) runs
//! it and rewrites its section of docs/benchmarks.md; under `cargo test` it
//! runs one small iteration as a smoke test.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use hyperbox_integration::bench::{full_run, machine, ms, percentile, write_section};
use hyperbox_integration::client::{Client, ContainerOptions, PullOptions};
use hyperbox_integration::image::{Compression, ImageSpec, Layer};
use hyperbox_integration::prereq::{self, Prereq};
use hyperbox_integration::snapshotter::NAME;
use hyperbox_integration::testbed::Testbed;
use tonic::Request;

const SNAPSHOTTERS: [&str; 2] = ["overlayfs", NAME];

fn image(full: bool) -> ImageSpec {
    let mut spec = ImageSpec::busybox(&["sh", "-c", "cat /etc/ready"]).unwrap();
    let (small, big) = if full {
        (4000, 96 << 20)
    } else {
        (100, 1 << 20)
    };
    spec.layers[0] = spec.layers[0].clone().file("etc/ready", "ready\n", 0o644);
    spec.layers
        .push(Layer::new(Compression::Gzip).many_small_files("usr/share/a", small, 4096));
    spec.layers
        .push(Layer::new(Compression::Gzip).many_small_files("usr/share/b", small, 1024));
    spec.layers
        .push(Layer::new(Compression::Zstd).large_file("opt/blob", big, 1));
    spec.layers
        .push(Layer::new(Compression::None).dir("var/cache", 0o755).file(
            "var/cache/x",
            "x",
            0o644,
        ));
    spec
}

async fn cold_pull_and_start(
    client: &Client,
    reference: &str,
    snapshotter: &str,
    n: usize,
) -> Duration {
    client.delete_image(reference).await.unwrap();
    client.gc().await.unwrap();
    let start = Instant::now();
    let img = client
        .pull(reference, &PullOptions::local(snapshotter))
        .await
        .unwrap();
    let out = client
        .run(
            &format!("bench-{snapshotter}-{n}"),
            &img,
            &ContainerOptions::default(),
        )
        .await
        .unwrap();
    let took = start.elapsed();
    assert_eq!(out.stdout_str(), "ready\n");
    took
}

/// A request in namespace `ns` under lease `lease`: as real clients do, so
/// containerd's collector leaves the unreferenced committed snapshots alone.
fn in_ns<T>(ns: &str, lease: &str, m: T) -> Request<T> {
    let mut r = Request::new(m);
    r.metadata_mut()
        .insert("containerd-namespace", ns.parse().unwrap());
    r.metadata_mut()
        .insert("containerd-lease", lease.parse().unwrap());
    r
}

/// Latencies of Prepare, Commit and Remove from `clients` concurrent clients.
async fn churn(
    client: &Client,
    snapshotter: &str,
    parent: &str,
    clients: usize,
    rounds: usize,
) -> [Vec<Duration>; 3] {
    let ns = client.namespace().to_string();
    let lease = client.create_lease().await.unwrap();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let channel = client.channel();
        let (ns, snapshotter, parent) = (ns.clone(), snapshotter.to_string(), parent.to_string());
        let lease = lease.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = SnapshotsClient::new(channel);
            let mut lat = [Vec::new(), Vec::new(), Vec::new()];
            for i in 0..rounds {
                let key = format!("bench-{c}-{i}");
                let name = format!("bench-{c}-{i}-committed");
                let t = Instant::now();
                s.prepare(in_ns(
                    &ns,
                    &lease,
                    PrepareSnapshotRequest {
                        snapshotter: snapshotter.clone(),
                        key: key.clone(),
                        parent: parent.clone(),
                        labels: HashMap::new(),
                    },
                ))
                .await
                .unwrap();
                lat[0].push(t.elapsed());
                let t = Instant::now();
                s.commit(in_ns(
                    &ns,
                    &lease,
                    CommitSnapshotRequest {
                        snapshotter: snapshotter.clone(),
                        name: name.clone(),
                        key,
                        labels: HashMap::new(),
                    },
                ))
                .await
                .unwrap();
                lat[1].push(t.elapsed());
                let t = Instant::now();
                s.remove(in_ns(
                    &ns,
                    &lease,
                    RemoveSnapshotRequest {
                        snapshotter: snapshotter.clone(),
                        key: name,
                    },
                ))
                .await
                .unwrap();
                lat[2].push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = [Vec::new(), Vec::new(), Vec::new()];
    for t in tasks {
        let lat = t.await.unwrap();
        for (a, l) in all.iter_mut().zip(lat) {
            a.extend(l);
        }
    }
    client.delete_lease(&lease).await.unwrap();
    all
}

#[tokio::main]
async fn main() {
    if !prereq::require("bench snapshotter", Prereq::CONTAINERS) {
        return;
    }
    let full = full_run();
    let (iterations, clients, rounds) = if full { (7, 32, 20) } else { (1, 4, 2) };
    let mut tb = Testbed::start_hyperbox(|b| b.without_cri()).await;
    let spec = image(full);
    let reference = tb.push(&spec, "bench/multilayer", "v1").await;
    let client = tb.containerd.client().await.unwrap();
    let image_bytes: u64 = std::fs::read_dir(tb.work_dir())
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum();

    // 1. Cold pull + unpack + first start.
    let mut cold: HashMap<&str, Vec<Duration>> = HashMap::new();
    for n in 0..iterations {
        let order = if n % 2 == 0 {
            SNAPSHOTTERS
        } else {
            [SNAPSHOTTERS[1], SNAPSHOTTERS[0]]
        };
        for sn in order {
            let d = cold_pull_and_start(&client, &reference, sn, n).await;
            cold.entry(sn).or_default().push(d);
        }
    }

    // 2. Prepare/Commit/Remove under 32 concurrent clients, on the image's top layer.
    let mut churned: HashMap<&str, [Vec<Duration>; 3]> = HashMap::new();
    for sn in SNAPSHOTTERS {
        let img = client
            .pull(&reference, &PullOptions::local(sn))
            .await
            .unwrap();
        churned.insert(
            sn,
            churn(&client, sn, img.top_chain_id(), clients, rounds).await,
        );
    }

    // containerd removes backend snapshots in its collector, after the
    // calls that deleted them returned: collect, then wait for it.
    client.gc().await.unwrap();
    let leaks = tb
        .hyperbox()
        .wait_for_count(&["kind==active"], 0, Duration::from_secs(30))
        .await;
    assert!(
        leaks.is_empty(),
        "benchmark left active snapshots: {leaks:?}"
    );
    let left = tb.shutdown();
    assert!(left.is_empty(), "left behind: {left:#?}");

    let med = |sn: &str| percentile(&cold[sn], 50.0);
    let mut body = String::new();
    body.push_str("## Snapshotter: local-unpack path vs containerd's overlayfs\n\n");
    body.push_str(&format!(
        "Command: `cargo bench -p hyperbox-integration --bench snapshotter` (as root). Machine: {}. \
         containerd 1.7.24, release build, registry on loopback without shaping.\n\n",
        machine()
    ));
    body.push_str(&format!(
        "**Cold pull + unpack + first start** of a {}-layer image ({:.0} MiB of blobs: busybox, {} small files, a {} MiB file), \
         image, content and snapshots collected before each run, order alternating, {iterations} runs each:\n\n",
        spec.layers.len(),
        image_bytes as f64 / (1 << 20) as f64,
        2 * if full { 4000 } else { 100 },
        if full { 96 } else { 1 },
    ));
    body.push_str("| snapshotter | median | min | max |\n|---|---|---|---|\n");
    for sn in SNAPSHOTTERS {
        let s = &cold[sn];
        body.push_str(&format!(
            "| {sn} | {} | {} | {} |\n",
            ms(med(sn)),
            ms(*s.iter().min().unwrap()),
            ms(*s.iter().max().unwrap())
        ));
    }
    body.push_str(&format!(
        "\nhyperbox / overlayfs median time: **{:.2}×** (below 1 is faster).\n\n",
        med(NAME).as_secs_f64() / med("overlayfs").as_secs_f64()
    ));
    body.push_str(&format!(
        "**Snapshot operation latency** through containerd's Snapshots API, {clients} concurrent clients × {rounds} rounds \
         of Prepare → Commit → Remove on the image's top layer ({} of each operation per snapshotter):\n\n",
        clients * rounds
    ));
    body.push_str("| operation | overlayfs p50 | hyperbox p50 | ratio | overlayfs p99 | hyperbox p99 | ratio |\n|---|---|---|---|---|---|---|\n");
    for (i, op) in ["Prepare", "Commit", "Remove"].iter().enumerate() {
        let (o, h) = (&churned["overlayfs"][i], &churned[NAME][i]);
        let (o50, h50, o99, h99) = (
            percentile(o, 50.0),
            percentile(h, 50.0),
            percentile(o, 99.0),
            percentile(h, 99.0),
        );
        body.push_str(&format!(
            "| {op} | {} | {} | {:.2}× | {} | {} | {:.2}× |\n",
            ms(o50),
            ms(h50),
            h50.as_secs_f64() / o50.as_secs_f64(),
            ms(o99),
            ms(h99),
            h99.as_secs_f64() / o99.as_secs_f64()
        ));
    }
    println!("{body}");
    if full {
        let path = write_section("snapshotter-local", &body).unwrap();
        println!("written to {}", path.display());
    }
}
