//! The main job, end to end, for a person to watch: a local registry with a
//! sample image, a private containerd, the image pulled and run through the
//! containerd API (as `ctr`/nerdctl do) and through CRI (as the kubelet does),
//! and what happened shown step by step. Everything it starts is torn down
//! at the end and checked for leftovers.
//!
//! Run it with `scripts/demo.sh` (as root).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hyperbox_integration::client::{ContainerOptions, PullOptions};
use hyperbox_integration::cri::{ContainerSpec, PodNetwork};
use hyperbox_integration::image::{Compression, ImageSpec, Layer};
use hyperbox_integration::prereq::Prereq;
use hyperbox_integration::testbed::Testbed;

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn done(start: Instant, text: &str) {
    println!("    ok ({:.0?}): {text}", start.elapsed());
}

#[tokio::main]
async fn main() -> Result<()> {
    let missing: Vec<String> = Prereq::CONTAINERS
        .iter()
        .chain([Prereq::CniPlugins].iter())
        .filter_map(|p| p.missing())
        .collect();
    if !missing.is_empty() {
        bail!("cannot run the demo: {}", missing.join("; "));
    }
    println!("hyperbox demo: a private containerd, a local registry and real containers");

    step(
        1,
        "start a local registry and a private containerd (NRI and CRI enabled)",
    );
    let t = Instant::now();
    let tb = Testbed::start().await;
    let client = tb.containerd.client().await?;
    done(
        t,
        &format!(
            "registry {} | containerd {} at {}",
            tb.registry.host(),
            client.version().await?,
            tb.containerd.address().display()
        ),
    );

    step(2, "build a two-layer sample image from busybox and push it");
    let t = Instant::now();
    let mut spec = ImageSpec::busybox(&[
        "sh",
        "-c",
        "echo \"hello from $(hostname): $(cat /etc/greeting)\"; echo \"rootfs: $(grep ' / ' /proc/mounts | cut -d' ' -f1,3)\"",
    ])?;
    spec.layers.push(Layer::new(Compression::Zstd).file(
        "etc/greeting",
        "served by hyperbox's harness",
        0o644,
    ));
    let reference = tb.push(&spec, "demo/hello", "v1").await;
    done(t, &reference);

    step(
        3,
        "pull and unpack it through the containerd API (snapshotter: overlayfs)",
    );
    let t = Instant::now();
    let image = client
        .pull(&reference, &PullOptions::local("overlayfs"))
        .await
        .context("pull")?;
    done(t, &format!("{} layers unpacked", image.chain_ids.len()));

    step(
        4,
        "run it as a container (runc via containerd-shim-runc-v2)",
    );
    let t = Instant::now();
    let out = client
        .run("demo-hello", &image, &ContainerOptions::default())
        .await
        .context("run")?;
    done(t, &format!("exit status {}", out.status));
    for line in out.stdout_str().lines() {
        println!("    | {line}");
    }

    step(
        5,
        "run it again as a Kubernetes pod through CRI, as the kubelet would",
    );
    let t = Instant::now();
    let cri = tb.containerd.cri().await?;
    cri.pull_image(&reference).await.context("CRI pull")?;
    let pod = cri
        .run_pod("demo", PodNetwork::Cni)
        .await
        .context("run pod")?;
    let id = cri
        .create_container(&pod, &ContainerSpec::new("hello", &reference, &[]))
        .await?;
    cri.start_container(&id).await?;
    let code = cri.wait_exited(&id, Duration::from_secs(30)).await?;
    done(
        t,
        &format!("pod {} container exit code {code}", &pod.id[..12]),
    );
    for line in cri.logs(&pod, "hello").await?.lines() {
        println!("    | {line}");
    }
    cri.remove_container(&id).await?;
    cri.remove_pod(&pod).await?;

    step(6, "tear everything down and check nothing is left behind");
    let t = Instant::now();
    let leaks = tb.shutdown();
    if !leaks.is_empty() {
        bail!("left behind: {leaks:#?}");
    }
    done(
        t,
        "no mounts, processes, cgroups, network namespaces or files left",
    );
    println!(
        "\nnext: the hyperbox snapshotter, node agent and shim plug into this same setup (see README, Status)."
    );
    Ok(())
}
