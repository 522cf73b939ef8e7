//! The main job, end to end, for a person to watch: a local registry with a
//! sample image, hyperbox-snapshotter plugged into a private containerd, the
//! image pulled into hyperbox and run through the containerd API (as
//! `ctr`/nerdctl do) and through CRI (as the kubelet does), with `hb` showing
//! what the node can do and what hyperbox holds; then the node agent
//! (`hyperbox-nri`, an NRI plugin) learning a workload's memory and sizing
//! its next run, through NRI for a CRI container and through hyperbox's
//! shim for a container NRI never sees. Everything it starts is torn down at the end and checked
//! for leftovers.
//!
//! Run it with `scripts/demo.sh` (as root).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hyperbox_integration::agent::AgentDaemon;
use hyperbox_integration::client::{ContainerOptions, PullOptions};
use hyperbox_integration::cri::{ContainerSpec, PodNetwork};
use hyperbox_integration::image::{Compression, ImageSpec, Layer};
use hyperbox_integration::prereq::Prereq;
use hyperbox_integration::shim::HYPERBOX_RUNTIME;
use hyperbox_integration::snapshotter::NAME;
use hyperbox_integration::testbed::Testbed;

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn done(start: Instant, text: &str) {
    println!("    ok ({:.0?}): {text}", start.elapsed());
}

fn hb(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(hyperbox_integration::binaries::path("hb"))
        .args(args)
        .output()
        .context("run hb")?;
    if !out.status.success() {
        bail!(
            "hb {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("    | {line}");
    }
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
    println!(
        "hyperbox demo: hyperbox-snapshotter in a private containerd, a local registry, real containers"
    );

    step(
        1,
        "start a local registry, hyperbox-snapshotter, and a private containerd using it",
    );
    let t = Instant::now();
    let mut tb = Testbed::start_hyperbox(|b| b).await;
    let client = tb.containerd.client().await?;
    done(
        t,
        &format!(
            "registry {} | containerd {} | [proxy_plugins.hyperbox] at {}",
            tb.registry.host(),
            client.version().await?,
            tb.hyperbox().address().display()
        ),
    );

    step(
        2,
        "hb doctor: the kernel features hyperbox can use on this machine",
    );
    print_indented(&hb(&["doctor"])?);

    step(3, "build a two-layer sample image from busybox and push it");
    let t = Instant::now();
    let mut spec = ImageSpec::busybox(&[
        "sh",
        "-c",
        "echo \"hello from $(hostname): $(cat /etc/greeting)\"; echo \"rootfs: $(grep ' / ' /proc/mounts | cut -d' ' -f1,3)\"",
    ])?;
    spec.layers.push(Layer::new(Compression::Zstd).file(
        "etc/greeting",
        "served by hyperbox-snapshotter",
        0o644,
    ));
    let reference = tb.push(&spec, "demo/hello", "v1").await;
    done(t, &reference);

    step(
        4,
        "hb image pull: containerd pulls with the CRI labels, hyperbox fetches each layer from the registry as EROFS",
    );
    let config = tb.hyperbox().config_path();
    let config = config.to_string_lossy().into_owned();
    let address = tb.containerd.address().to_string_lossy().into_owned();
    print_indented(&hb(&[
        "--config",
        &config,
        "image",
        "pull",
        "--address",
        &address,
        &reference,
    ])?);
    // The image record and its snapshots are in containerd now; read them back.
    let image = client
        .pull(&reference, &PullOptions::local(NAME))
        .await
        .context("read the pulled image back")?;
    print_indented(&hb(&["--config", &config, "snapshots", "ls"])?);

    step(
        5,
        "run it as a container on hyperbox (runc via containerd-shim-runc-v2)",
    );
    let t = Instant::now();
    let out = client
        .run("demo-hello", &image, &ContainerOptions::default())
        .await
        .context("run")?;
    done(t, &format!("exit status {}", out.status));
    print_indented(&out.stdout_str());

    step(
        6,
        "run it again as a Kubernetes pod through CRI (CRI snapshotter: hyperbox)",
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
    print_indented(&cri.logs(&pod, "hello").await?);
    print_indented(&hb(&[
        "--config",
        &config,
        "snapshots",
        "ls",
        "--filter",
        "kind==active",
    ])?);
    cri.remove_container(&id).await?;

    step(
        7,
        "node agent: hyperbox-nri registers with containerd's NRI, learns a workload's memory, sizes its next run, traces it",
    );
    let t = Instant::now();
    // An OTLP receiver stands in for an OpenTelemetry Collector.
    let otlp = hyperbox_integration::otlp::Receiver::start().await;
    let agent = AgentDaemon::start(
        &tb.containerd.nri_socket(),
        &format!(
            "[memory]\ndefault_policy = \"adaptive\"\nsample_interval_secs = 1\n\
             [tracing]\notlp_endpoint = \"{}\"\n",
            otlp.url
        ),
    )
    .await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    done(
        t,
        &format!(
            "registered with {} (metrics on http://{}/metrics)",
            agent.health().await.map_err(anyhow::Error::msg)?["runtime"],
            agent.metrics
        ),
    );
    let worker = ContainerSpec::new(
        "worker",
        &reference,
        &[
            "sh",
            "-c",
            "dd if=/dev/zero bs=24M count=1 2>/dev/null | sleep 3",
        ],
    );
    for run in [
        "first run: nothing learned yet",
        "second run: sized from the first",
    ] {
        let id = cri.create_container(&pod, &worker).await?;
        cri.start_container(&id).await?;
        println!("    {run}:");
        print_indented(&agent.hb(&["policy", "explain", &id]));
        if run.starts_with("second") {
            print_indented(&agent.hb(&["psi"]));
        }
        cri.wait_exited(&id, Duration::from_secs(30)).await?;
        if run.starts_with("second") {
            println!("    what the eBPF tracer saw of it, from its first instruction:");
            print_indented(&agent.hb(&["trace", &id]));
        }
        cri.remove_container(&id).await?;
        // The run's peak is recorded when the container is removed.
        let start = Instant::now();
        while !std::fs::read_to_string(agent.state_dir().join("workloads.json"))
            .unwrap_or_default()
            .contains("runs")
            && start.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The same agent through hyperbox's shim, for a container that never
    // reaches NRI (as `ctr run --runtime io.containerd.hyperbox.v1` or
    // `nerdctl run --runtime ...` make it).
    println!(
        "    through hyperbox's shim (runtime {HYPERBOX_RUNTIME}), for a ctr/nerdctl container NRI never sees:"
    );
    tb.containerd.use_agent(&agent.config_path())?;
    let mut opts = ContainerOptions::args(&[
        "sh",
        "-c",
        "dd if=/dev/zero bs=24M count=1 2>/dev/null | sleep 2",
    ]);
    opts.runtime = Some(HYPERBOX_RUNTIME.into());
    opts.annotations
        .insert("hyperbox.dev/workload".into(), "demo-worker".into());
    for (n, (run, seccomp)) in [
        ("first run: its syscalls learned", "learn"),
        (
            "second run: sized in its spec before runc create, under its learned seccomp profile",
            "enforce",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("shim-worker-{n}");
        opts.annotations
            .insert("seccomp.hyperbox.dev/mode".into(), seccomp.into());
        let c = client.create_container(&id, &image, &opts).await?;
        let task = c.start().await?;
        println!("    {run}:");
        print_indented(&agent.hb(&["policy", "explain", &id]));
        task.wait_output().await?;
        if n == 1 {
            println!("    what the tracer saw of it, from its first exec:");
            print_indented(&agent.hb(&["trace", &id]));
        }
        c.delete().await?;
        let start = Instant::now();
        while agent.learned_runs("containerd:default/demo-worker").len() <= n
            && start.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!("    the workload's learned seccomp profile:");
    print_indented(&agent.hb(&["profile", "ls"]));
    // A syscall the workload never made, under its profile: refused
    // (EPERM) and reported.
    let mut denied = opts.clone();
    denied.args = Some(vec![
        "sh".into(),
        "-c".into(),
        "unshare -U true; echo unshare exit status $?".into(),
    ]);
    let c = client
        .create_container("shim-worker-unshare", &image, &denied)
        .await?;
    let out = c.start().await?.wait_output().await?;
    c.delete().await?;
    println!("    a run that calls unshare, which it never did while learning:");
    print_indented(&out.stdout_str());
    print_indented(&out.stderr_str());
    let start = Instant::now();
    let mut shown = String::new();
    while start.elapsed() < Duration::from_secs(10) {
        shown = agent.hb(&["profile", "show", "containerd:default/demo-worker"]);
        if shown.contains("unshare") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    print_indented(
        &shown
            .lines()
            .take_while(|l| !l.starts_with("profile ("))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let (_, metrics) = agent.http_get("/metrics").await?;
    for line in metrics.lines().filter(|l| {
        l.starts_with("hyperbox_nri_request_duration_seconds_count")
            || l.starts_with("hyperbox_memory_decisions_total")
            || l.starts_with("hyperbox_seccomp_reports_total")
    }) {
        println!("    | {line}");
    }
    let leaks = agent.shutdown();
    if !leaks.is_empty() {
        bail!("agent left behind: {leaks:#?}");
    }
    println!("    spans the agent exported over OTLP (one per container lifetime):");
    for s in otlp.spans() {
        println!(
            "    | {} [{:.2} s] container.id={:.12} syscalls={} execs={} events={}",
            s.name,
            s.end_ns.saturating_sub(s.start_ns) as f64 / 1e9,
            s.attributes.get("container.id").map_or("", String::as_str),
            s.attributes
                .get("hyperbox.syscalls")
                .map_or("-", String::as_str),
            s.attributes
                .get("hyperbox.execs")
                .map_or("-", String::as_str),
            s.events.len()
        );
    }
    cri.remove_pod(&pod).await?;

    step(
        8,
        "lazy pull: push a hyperbox index for a 64 MiB image, then run it before most of it is fetched",
    );
    let t = Instant::now();
    let mut big = ImageSpec::busybox(&["sh", "-c", "cat /etc/greeting"])?;
    big.layers.push(
        Layer::new(Compression::Gzip)
            .file(
                "etc/greeting",
                "started before the image was all here",
                0o644,
            )
            .large_file("opt/model.bin", 64 << 20, 7),
    );
    let big_ref = tb.via_proxy(&tb.push(&big, "demo/big", "v1").await);
    print_indented(&hb(&["--config", &config, "image", "index", &big_ref])?);
    done(
        t,
        "index pushed beside the image (the image itself is unchanged)",
    );
    // A 100 Mbit/s link with 20 ms per request, as from a remote registry.
    tb.proxy.set_shaping(hyperbox_integration::proxy::Shaping {
        latency: Duration::from_millis(20),
        bits_per_sec: Some(100_000_000),
    });
    let t = Instant::now();
    let served = tb.proxy.bytes_served();
    print_indented(&hb(&[
        "--config",
        &config,
        "image",
        "pull",
        "--address",
        &address,
        &big_ref,
    ])?);
    let big_image = client
        .pull(&big_ref, &PullOptions::local(NAME))
        .await
        .context("read the pulled image back")?;
    let out = client
        .run("demo-lazy", &big_image, &ContainerOptions::default())
        .await
        .context("run")?;
    done(
        t,
        &format!(
            "pulled and ran to exit after fetching {:.1} MiB of {:.1} MiB; the rest fills in the background",
            (tb.proxy.bytes_served() - served) as f64 / 1048576.0,
            64.0
        ),
    );
    print_indented(&out.stdout_str());

    step(9, "tear everything down and check nothing is left behind");
    let t = Instant::now();
    let leaks = tb.shutdown();
    if !leaks.is_empty() {
        bail!("left behind: {leaks:#?}");
    }
    done(
        t,
        "no mounts, processes, cgroups, network namespaces or files left",
    );
    Ok(())
}
