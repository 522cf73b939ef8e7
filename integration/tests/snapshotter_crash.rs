//! kill -9 of hyperbox-snapshotter at random points while containerd pulls
//! (Prepare, Diff.Apply, Commit, or the remote path: fetch, convert, mount,
//! commit), deletes images (garbage collection calls Remove) and runs
//! containers. After every restart the snapshotter must be
//! consistent: one directory per record and no leftovers, every parent
//! present, Usage answered for everything, everything containerd knows still
//! there, every remote layer mounted and nothing else, and a container
//! started before the first kill still running.
//!
//! `HYPERBOX_CRASH_SEED` replays a run; `HYPERBOX_CRASH_POINTS` sets how many
//! kills (default 100).

use std::time::Duration;

use hyperbox_integration::client::{Client, ContainerOptions, PullOptions};
use hyperbox_integration::image::{Compression, ImageSpec, Layer};
use hyperbox_integration::require_containers;
use hyperbox_integration::snapshotter::{NAME, SnapshotterDaemon};
use hyperbox_integration::testbed::Testbed;
use nix::sys::signal::Signal;
use rand::{Rng, SeedableRng};

const IMAGES: usize = 4;

fn image(i: usize) -> ImageSpec {
    let mut spec = ImageSpec::busybox(&["cat", "/etc/which"]).unwrap();
    spec.layers[0] = spec.layers[0]
        .clone()
        .file("etc/which", format!("image {i}\n"), 0o644);
    spec.layers
        .push(Layer::new(Compression::Gzip).many_small_files("data/a", 200, 512));
    spec.layers.push(
        Layer::new(Compression::Zstd)
            .large_file("data/big", 2 << 20, i as u64)
            .whiteout("data/a/f000007"),
    );
    spec
}

async fn workload(
    client: Client,
    refs: Vec<String>,
    op: u32,
    k: usize,
    n: u32,
    remote: bool,
) -> Result<(), String> {
    let r = &refs[k];
    let opts = PullOptions {
        snapshotter: NAME.into(),
        remote_labels: remote,
    };
    match op {
        // Pull from scratch: the image's snapshots are removed by GC first.
        0 => {
            client.delete_image(r).await.map_err(|e| e.to_string())?;
            client.gc().await.map_err(|e| e.to_string())?;
            client.pull(r, &opts).await.map_err(|e| e.to_string())?;
        }
        // Run a container: Prepare, mount, Remove.
        _ => {
            let image = client.pull(r, &opts).await.map_err(|e| e.to_string())?;
            client
                .run(&format!("run-{n}"), &image, &ContainerOptions::default())
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// The invariants, checked with the snapshotter idle.
async fn check(sn: &SnapshotterDaemon, client: &Client, point: u32) {
    // containerd's collector removes orphans of the interrupted operation once
    // it reaches the snapshotter again; let it finish so nothing moves below.
    client.gc().await.unwrap();
    let ours = sn.list(&[]).await.expect("walk after restart");
    let names: std::collections::HashSet<&str> = ours.iter().map(|i| i.name.as_str()).collect();
    let mut dirs = Vec::new();
    for e in std::fs::read_dir(sn.root().join("snapshots")).unwrap() {
        dirs.push(e.unwrap().file_name().to_string_lossy().into_owned());
    }
    assert!(
        dirs.iter().all(|d| d.parse::<u64>().is_ok()),
        "point {point}: leftovers after restart: {dirs:?}"
    );
    assert_eq!(
        dirs.len(),
        ours.len(),
        "point {point}: one directory per snapshot"
    );
    let mut c = sn.client().await.unwrap();
    for i in &ours {
        assert!(
            i.parent.is_empty() || names.contains(i.parent.as_str()),
            "point {point}: {} has a missing parent {}",
            i.name,
            i.parent
        );
        let usage = c
            .usage(containerd_client::services::v1::snapshots::UsageRequest {
                snapshotter: NAME.into(),
                key: i.name.clone(),
            })
            .await;
        if let Err(e) = usage {
            // Only acceptable if it was removed meanwhile (a late collection).
            let now = sn.list(&[]).await.unwrap();
            assert!(
                e.code() == tonic::Code::NotFound && now.iter().all(|n| n.name != i.name),
                "point {point}: usage of {}: {e}",
                i.name
            );
        }
    }
    // Remote layers (committed with the CRI labels) are mounted, each once,
    // and no EROFS mount is left under anything else.
    let remote = ours
        .iter()
        .filter(|i| {
            i.labels
                .contains_key(hyperbox_api::labels::CRI_LAYER_DIGEST)
                && i.kind == containerd_client::services::v1::snapshots::Kind::Committed as i32
        })
        .count();
    let snaps_dir = sn.root().join("snapshots");
    let erofs: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(" - erofs "))
        .filter_map(|l| l.split(' ').nth(4).map(String::from))
        .filter(|p| p.starts_with(&snaps_dir.display().to_string()))
        .collect();
    assert_eq!(
        erofs.len(),
        remote,
        "point {point}: one EROFS mount per remote layer: {erofs:#?}"
    );
    for key in client.snapshot_keys(NAME).await.unwrap() {
        client.snapshot_usage(NAME, &key).await.unwrap_or_else(|e| {
            panic!("point {point}: containerd knows {key} but hyperbox does not: {e}")
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_leaves_a_consistent_snapshotter() {
    require_containers!();
    let seed: u64 = std::env::var("HYPERBOX_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let points: u32 = std::env::var("HYPERBOX_CRASH_POINTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    eprintln!(
        "crash test seed {seed} (HYPERBOX_CRASH_SEED={seed} replays it), {points} kill points"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut tb = Testbed::start_hyperbox(|b| b.without_cri()).await;
    let mut refs = Vec::new();
    for i in 0..IMAGES {
        refs.push(tb.push(&image(i), &format!("crash/img{i}"), "v1").await);
    }
    let client = tb.containerd.client().await.unwrap();
    let keeper_image = client
        .pull(&refs[0], &PullOptions::local(NAME))
        .await
        .unwrap();
    let keeper = client
        .create_container(
            "keeper",
            &keeper_image,
            &ContainerOptions::args(&["sleep", "3600"]),
        )
        .await
        .unwrap();
    let keeper_task = keeper.start().await.unwrap();

    let mut outcomes = [0u32; 2];
    for point in 0..points {
        let op = rng.random_range(0..2u32);
        let k = rng.random_range(0..IMAGES);
        let remote = rng.random_bool(0.5);
        let delay = Duration::from_millis(rng.random_range(0..120));
        let work = tokio::spawn(workload(client.clone(), refs.clone(), op, k, point, remote));
        tokio::time::sleep(delay).await;
        tb.hyperbox().kill(Signal::SIGKILL);
        let result = tokio::time::timeout(Duration::from_secs(60), work)
            .await
            .unwrap_or_else(|_| panic!("point {point}: containerd call hung after the kill"))
            .unwrap();
        outcomes[result.is_ok() as usize] += 1;
        tb.hyperbox().start_again().await;
        client
            .wait_snapshotter(NAME, "keeper", Duration::from_secs(60))
            .await
            .unwrap();
        check(tb.hyperbox(), &client, point).await;
        assert!(
            hyperbox_integration::procs::alive(keeper_task.pid() as i32),
            "point {point}: the running container died"
        );
    }
    eprintln!(
        "{points} kills: {} operations interrupted, {} finished first",
        outcomes[0], outcomes[1]
    );
    assert!(outcomes[0] > 0, "some kills must land mid-operation");

    // Nothing was lost: every image pulls and runs, the keeper still works.
    for (i, r) in refs.iter().enumerate() {
        let image = client.pull(r, &PullOptions::local(NAME)).await.unwrap();
        let out = client
            .run(&format!("final-{i}"), &image, &ContainerOptions::default())
            .await
            .unwrap();
        assert_eq!(out.stdout_str(), format!("image {i}\n"));
    }
    assert_eq!(
        keeper_task
            .exec(&["cat", "/etc/which"])
            .await
            .unwrap()
            .stdout_str(),
        "image 0\n"
    );
    keeper.delete().await.unwrap();

    // Once containerd has collected garbage, hyperbox holds exactly what
    // containerd references: orphans of interrupted commits are gone too.
    for r in &refs {
        client.delete_image(r).await.unwrap();
    }
    client.gc().await.unwrap();
    let left = tb
        .hyperbox()
        .wait_for_count(&[], 0, Duration::from_secs(30))
        .await;
    assert!(
        left.is_empty(),
        "snapshots left after deleting everything: {left:#?}"
    );

    tb.finish();
}
