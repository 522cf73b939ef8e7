//! The eBPF tracer's cost, in one run on one containerd 1.7.24: a
//! syscall-heavy container (a byte-at-a-time `dd`, 2 syscalls per byte,
//! then a loop of small-file copies by forked processes) run
//!
//! - with the agent's tracer not loaded (`tracing.enabled = false`),
//! - with it loaded but the container not watched (annotation opt-out:
//!   every syscall on the node still passes the cgroup filter),
//! - traced,
//!
//! in alternating batches; wall time is the container's own (CRI
//! `started_at` to `finished_at`). Also: syscalls counted per second in the
//! traced runs, ring buffer drops, and the agent's resident memory.
//!
//! `cargo bench -p hyperbox-integration --bench trace` (as root) runs it and
//! rewrites its section of docs/benchmarks.md; under `cargo test` it runs a
//! small smoke.

use std::time::Duration;

use hyperbox_integration::agent::AgentDaemon;
use hyperbox_integration::bench::{full_run, machine, percentile, rss_bytes, write_section};
use hyperbox_integration::cri::{ContainerSpec, Cri, Pod, PodNetwork};
use hyperbox_integration::prereq::{self, Prereq};
use hyperbox_integration::testbed::Testbed;

const MODES: [&str; 3] = ["tracer not loaded", "loaded, not watched", "traced"];

/// Runs the workload once; returns its wall time and container id (still
/// present, for the caller to read its trace before removing it).
async fn run_once(
    cri: &Cri,
    pod: &Pod,
    image: &str,
    name: &str,
    script: &str,
    traced: bool,
) -> (Duration, String) {
    let mut spec = ContainerSpec::new(name, image, &["sh", "-c", script]);
    if !traced {
        spec.annotations
            .insert("trace.hyperbox.dev/enabled".into(), "false".into());
    }
    let id = cri.create_container(pod, &spec).await.unwrap();
    cri.start_container(&id).await.unwrap();
    assert_eq!(
        cri.wait_exited(&id, Duration::from_secs(600))
            .await
            .unwrap(),
        0
    );
    let st = cri.container_status(&id).await.unwrap();
    let wall = Duration::from_nanos((st.finished_at - st.started_at).max(0) as u64);
    (wall, id)
}

#[tokio::main]
async fn main() {
    let full = full_run();
    if !prereq::require("bench trace", Prereq::CONTAINERS) {
        return;
    }
    let (bytes, copies, rounds, per) = if full {
        (2_000_000, 500, 3, 3)
    } else {
        (20_000, 10, 1, 1)
    };
    let script = format!(
        "dd if=/dev/zero of=/dev/null bs=1 count={bytes} 2>/dev/null; \
         i=0; while [ $i -lt {copies} ]; do cat /etc/hostname >/tmp/copy; i=$((i+1)); done"
    );
    let tb = Testbed::start().await;
    let image = tb.push_sleeper().await;
    let cri = tb.containerd.cri().await.unwrap();
    cri.pull_image(&image).await.unwrap();
    let pod = cri.run_pod("trace-bench", PodNetwork::Host).await.unwrap();

    let mut wall: [Vec<Duration>; 3] = Default::default();
    let (mut counted, mut counted_time) = (0u64, Duration::ZERO);
    let (mut execs, mut drops, mut rss) = (0u64, 0u64, 0u64);
    let mut n = 0;
    for _ in 0..rounds {
        // Tracer not loaded.
        let agent =
            AgentDaemon::start(&tb.containerd.nri_socket(), "[tracing]\nenabled = false\n").await;
        agent.wait_connected(true, Duration::from_secs(20)).await;
        for _ in 0..per {
            n += 1;
            let (w, id) = run_once(&cri, &pod, &image, &format!("w{n}"), &script, true).await;
            wall[0].push(w);
            cri.remove_container(&id).await.unwrap();
        }
        assert!(agent.shutdown().is_empty());
        // Loaded: unwatched and traced, interleaved.
        let agent = AgentDaemon::start(&tb.containerd.nri_socket(), "").await;
        agent.wait_connected(true, Duration::from_secs(20)).await;
        for _ in 0..per {
            n += 1;
            let (w, id) = run_once(&cri, &pod, &image, &format!("w{n}"), &script, false).await;
            wall[1].push(w);
            cri.remove_container(&id).await.unwrap();
            n += 1;
            let (w, id) = run_once(&cri, &pod, &image, &format!("w{n}"), &script, true).await;
            wall[2].push(w);
            let t: serde_json::Value =
                serde_json::from_str(&agent.hb(&["trace", &id, "--json"])).unwrap();
            counted += t["syscall_total"].as_u64().unwrap();
            counted_time += w;
            execs += t["exec_count"].as_u64().unwrap();
            drops = drops.max(t["ring_drops"].as_u64().unwrap());
            cri.remove_container(&id).await.unwrap();
        }
        rss = rss.max(agent.pid().map_or(0, rss_bytes));
        assert!(agent.shutdown().is_empty());
    }
    cri.remove_pod(&pod).await.unwrap();
    tb.finish();

    let med = |v: &[Duration]| percentile(v, 50.0);
    let mut body = String::new();
    body.push_str("## Tracer: overhead on a syscall-heavy container\n\n");
    body.push_str(&format!(
        "`cargo bench -p hyperbox-integration --bench trace` (as root), {}.\n\n\
         Workload: `dd if=/dev/zero of=/dev/null bs=1 count={bytes}` ({} syscalls), then {copies} \
         small-file copies by forked `cat` processes (one exec each). Wall time is the container's own \
         (CRI started → finished), {} runs per mode in {rounds} alternating batches.\n\n\
         | mode | median | min | max | vs not loaded |\n|---|---|---|---|---|\n",
        machine(),
        2 * bytes,
        rounds * per
    ));
    let base = med(&wall[0]).as_secs_f64();
    for (i, m) in MODES.iter().enumerate() {
        body.push_str(&format!(
            "| {m} | {:.3} s | {:.3} s | {:.3} s | {:.3}× |\n",
            med(&wall[i]).as_secs_f64(),
            wall[i].iter().min().unwrap().as_secs_f64(),
            wall[i].iter().max().unwrap().as_secs_f64(),
            med(&wall[i]).as_secs_f64() / base
        ));
    }
    body.push_str(&format!(
        "\nIn the traced runs the kernel counted {:.2} M syscalls/s per container (in-kernel \
         aggregation, no per-syscall event, so none can drop); {execs} exec events went through \
         the ring buffer with {drops} dropped. Agent resident memory while tracing: {:.1} MiB.\n",
        counted as f64 / counted_time.as_secs_f64() / 1e6,
        rss as f64 / (1 << 20) as f64
    ));
    println!("{body}");
    if full {
        let path = write_section("trace", &body).unwrap();
        println!("written to {}", path.display());
    }
}
