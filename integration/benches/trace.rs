//! The eBPF tracer's cost and throughput, in one run on one containerd
//! 1.7.24.
//!
//! Overhead: two syscall-heavy workloads in a container
//! (`integration/workloads/syscalls.c`, built static and bind-mounted in): a loop of getpid, 1-byte
//! read and 1-byte write; and small-file copies (open, read, write, close)
//! on tmpfs. Each is run
//!
//! - with the agent's tracer not loaded (`tracing.enabled = false`),
//! - with it loaded but the container not watched (annotation opt-out; no
//!   container is watched then, so the syscall hook is detached),
//! - traced,
//!
//! wall time is the container's own (CRI `started_at` to `finished_at`).
//! Untraced and traced runs are paired back to back in one agent and the
//! overhead is the median of the pairs' ratios (with its 95 % interval):
//! run times here wander by ±15 % between runs, far more than the effect.
//! The not-loaded runs come in batches around the pairs.
//!
//! Steady state: both workloads in containers past their counting window
//! (`tracing.syscall_window_secs`), counted only in the aligned samples
//! that follow it, at the defaults' duty scaled to seconds; and from both
//! figures, the average over a container's life with the defaults.
//!
//! Throughput: a traced container makes N `openat("")` calls (or opens of
//! a library-length path) as fast as it can, each an open event through
//! the ring buffer; the figure is N over
//! the time from its start until the agent has processed all N, with drops
//! and samples counted. Run with a ring big enough for the burst and no
//! sampling, then with the defaults (sampling engages).
//!
//! `cargo bench -p hyperbox-integration --bench trace` (as root) runs it and
//! rewrites its section of docs/benchmarks.md; under `cargo test` it runs a
//! small smoke.

use std::path::Path;
use std::time::{Duration, Instant};

use hyperbox_integration::agent::{AgentDaemon, metric};
use hyperbox_integration::bench::{
    full_run, machine, median_with_ci, percentile, rss_bytes, write_section,
};
use hyperbox_integration::cri::{ContainerSpec, Cri, Pod, PodNetwork};
use hyperbox_integration::prereq::{self, Prereq};
use hyperbox_integration::testbed::Testbed;

const IN_CONTAINER: &str = "/hb/syscalls";

struct Bench<'a> {
    cri: &'a Cri,
    pod: &'a Pod,
    image: &'a str,
    binary: &'a Path,
    n: u32,
}

impl Bench<'_> {
    fn spec(&mut self, args: &[&str], traced: bool) -> ContainerSpec {
        self.n += 1;
        let mut command = vec![IN_CONTAINER];
        command.extend_from_slice(args);
        let mut spec = ContainerSpec::new(&format!("w{}", self.n), self.image, &command);
        spec.mounts
            .push((self.binary.to_path_buf(), IN_CONTAINER.into()));
        if !traced {
            spec.annotations
                .insert("trace.hyperbox.dev/enabled".into(), "false".into());
        }
        spec
    }

    /// Runs the workload once; returns its wall time and container id
    /// (still present, for the caller to read its trace, then remove).
    async fn run(&mut self, args: &[&str], traced: bool) -> (Duration, String) {
        let spec = self.spec(args, traced);
        let id = self.cri.create_container(self.pod, &spec).await.unwrap();
        self.cri.start_container(&id).await.unwrap();
        assert_eq!(
            self.cri
                .wait_exited(&id, Duration::from_secs(600))
                .await
                .unwrap(),
            0
        );
        let st = self.cri.container_status(&id).await.unwrap();
        let wall = Duration::from_nanos((st.finished_at - st.started_at).max(0) as u64);
        (wall, id)
    }

    /// A burst of `n` open events: the time from start until the agent has
    /// processed them all (or stopped getting more), with what it counted.
    async fn burst(&mut self, agent: &AgentDaemon, mode: &str, n: u64) -> Burst {
        let spec = self.spec(&[mode, &n.to_string()], true);
        let id = self.cri.create_container(self.pod, &spec).await.unwrap();
        let (drops0, sampled0) = counters(agent).await;
        let start = Instant::now();
        self.cri.start_container(&id).await.unwrap();
        let (mut last, mut last_change) = (0.0, Instant::now());
        let processed = loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (_, body) = agent.http_get("/metrics").await.unwrap();
            let opens = metric(&body, "hyperbox_container_opens_total", &id).unwrap_or(0.0);
            let (drops, sampled) = counters(agent).await;
            if opens + (drops - drops0) + (sampled - sampled0) >= n as f64 {
                break opens;
            }
            if opens > last {
                (last, last_change) = (opens, Instant::now());
            } else if last_change.elapsed() > Duration::from_secs(5) {
                break opens;
            }
        };
        let elapsed = start.elapsed();
        self.cri
            .wait_exited(&id, Duration::from_secs(600))
            .await
            .unwrap();
        let st = self.cri.container_status(&id).await.unwrap();
        let (drops, sampled) = counters(agent).await;
        self.cri.remove_container(&id).await.unwrap();
        Burst {
            n,
            processed: processed as u64,
            dropped: (drops - drops0) as u64,
            sampled: (sampled - sampled0) as u64,
            elapsed,
            produced_in: Duration::from_nanos((st.finished_at - st.started_at).max(0) as u64),
        }
    }
}

struct Burst {
    n: u64,
    processed: u64,
    dropped: u64,
    sampled: u64,
    elapsed: Duration,
    produced_in: Duration,
}

async fn counters(agent: &AgentDaemon) -> (f64, f64) {
    let (_, body) = agent.http_get("/metrics").await.unwrap();
    (
        metric(&body, "hyperbox_trace_ring_drops_total", "").unwrap_or(0.0),
        metric(&body, "hyperbox_trace_sampled_total", "").unwrap_or(0.0),
    )
}

#[tokio::main]
async fn main() {
    let full = full_run();
    if !prereq::require("bench trace", Prereq::CONTAINERS) {
        return;
    }
    // rounds: batches of the tracer not loaded, with the loaded agent's
    // pairs between them.
    let (loops, copies, bursts, rounds, batch, pairs) = if full {
        (1_000_000u64, 100_000u64, 4_000_000u64, 3, 4, 15)
    } else {
        (20_000, 2_000, 20_000, 2, 1, 2)
    };
    // Steady state: each workload sized to about 3 s of work.
    let (steady_loops, steady_copies, steady_pairs) = if full {
        (5_000_000u64, 500_000u64, 12)
    } else {
        (20_000, 2_000, 1)
    };
    let binary = hyperbox_integration::workload::syscalls_binary();
    let tb = Testbed::start().await;
    let image = tb.push_sleeper().await;
    let cri = tb.containerd.cri().await.unwrap();
    cri.pull_image(&image).await.unwrap();
    let pod = cri.run_pod("trace-bench", PodNetwork::Host).await.unwrap();
    let mut b = Bench {
        cri: &cri,
        pod: &pod,
        image: &image,
        binary: &binary,
        n: 0,
    };
    let workloads: [(&str, Vec<String>, u64); 2] = [
        (
            "getpid/read/write loop",
            vec!["loop".into(), loops.to_string()],
            3 * loops,
        ),
        (
            "small-file copy",
            vec!["copy".into(), copies.to_string()],
            // open, read, write, close, twice over: 6 per copy (plus setup)
            6 * copies,
        ),
    ];

    // wall[workload][mode]; ratios[workload]: traced / untraced, per pair.
    let mut wall: [[Vec<Duration>; 3]; 2] = Default::default();
    let mut ratios: [Vec<f64>; 2] = Default::default();
    let mut counted = [0u64; 2];
    let mut rss = 0u64;
    for round in 0..rounds {
        let agent =
            AgentDaemon::start(&tb.containerd.nri_socket(), "[tracing]\nenabled = false\n").await;
        agent.wait_connected(true, Duration::from_secs(20)).await;
        for _ in 0..batch {
            for (w, (_, args, _)) in workloads.iter().enumerate() {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let (t, id) = b.run(&args, true).await;
                wall[w][0].push(t);
                cri.remove_container(&id).await.unwrap();
            }
        }
        assert!(agent.shutdown().is_empty());
        if round == rounds - 1 {
            break;
        }
        // No lingering hook: the unwatched runs measure the idle state even
        // right after a traced one.
        let agent = AgentDaemon::start(
            &tb.containerd.nri_socket(),
            "[tracing]\nhook_linger_secs = 0\n",
        )
        .await;
        agent.wait_connected(true, Duration::from_secs(20)).await;
        for p in 0..pairs {
            for (w, (_, args, _)) in workloads.iter().enumerate() {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                // Back to back, in alternating order, so that drift in the
                // machine's speed falls on both halves of a pair alike.
                let mut pair = [Duration::ZERO; 2];
                for traced in if p % 2 == 0 {
                    [false, true]
                } else {
                    [true, false]
                } {
                    let (t, id) = b.run(&args, traced).await;
                    pair[traced as usize] = t;
                    if traced {
                        let tr: serde_json::Value =
                            serde_json::from_str(&agent.hb(&["trace", &id, "--json"])).unwrap();
                        counted[w] = counted[w].max(tr["syscall_total"].as_u64().unwrap());
                    }
                    cri.remove_container(&id).await.unwrap();
                }
                wall[w][1].push(pair[0]);
                wall[w][2].push(pair[1]);
                ratios[w].push(pair[1].as_secs_f64() / pair[0].as_secs_f64());
            }
        }
        rss = rss.max(agent.pid().map_or(0, rss_bytes));
        assert!(agent.shutdown().is_empty());
    }

    // Steady state: containers past their counting window, counted only
    // in the aligned samples. The defaults (60 s window, 1 s sample every
    // 60 s) scaled down to the same duty (1 s window, 50 ms every 3 s) so
    // that a run of a few seconds spans samples as a long-lived container
    // does. The loop starts 1.5 s in, after the window, and times itself.
    let agent = AgentDaemon::start(
        &tb.containerd.nri_socket(),
        "[tracing]\nhook_linger_secs = 0\nsyscall_window_secs = 1\n\
         syscall_sample_every_secs = 3\nsyscall_sample_ms = 50\n",
    )
    .await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    // Per workload: work times [untraced, traced], pair ratios, samples
    // per traced run, and syscalls counted (all in samples) per run.
    let steady_work: [(&str, String, u64); 2] = [
        ("loop", steady_loops.to_string(), 3 * steady_loops),
        ("copy", steady_copies.to_string(), 6 * steady_copies),
    ];
    let mut steady: [[Vec<f64>; 2]; 2] = Default::default();
    let mut steady_ratios: [Vec<f64>; 2] = Default::default();
    let mut samples: [Vec<u64>; 2] = Default::default();
    let mut steady_counted: [Vec<u64>; 2] = Default::default();
    for p in 0..steady_pairs {
        for (w, (mode, n, _)) in steady_work.iter().enumerate() {
            let args = [*mode, n.as_str(), "1500"];
            let mut pair = [0f64; 2];
            for traced in if p % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            } {
                let (_, id) = b.run(&args, traced).await;
                let log = cri.logs(&pod, &format!("w{}", b.n)).await.unwrap();
                let ns: f64 = log
                    .lines()
                    .find_map(|l| l.strip_prefix("work_ns "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or_else(|| panic!("no work_ns in {log:?}"));
                pair[traced as usize] = ns / 1e9;
                if traced {
                    let tr: serde_json::Value =
                        serde_json::from_str(&agent.hb(&["trace", &id, "--json"])).unwrap();
                    assert_eq!(tr["syscall_window_closed"], true, "{tr}");
                    samples[w].push(tr["syscall_samples"].as_u64().unwrap());
                    steady_counted[w].push(tr["syscall_total"].as_u64().unwrap());
                }
                cri.remove_container(&id).await.unwrap();
            }
            steady[w][0].push(pair[0]);
            steady[w][1].push(pair[1]);
            steady_ratios[w].push(pair[1] / pair[0]);
        }
    }
    assert!(agent.shutdown().is_empty());

    // Throughput: a ring that holds the burst's backlog, no sampling; then
    // the defaults, where sampling takes the pressure.
    let agent = AgentDaemon::start(
        &tb.containerd.nri_socket(),
        "[tracing]\nring_buffer_bytes = 67108864\nsample_above = 1.0\n",
    )
    .await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    let mut unsampled = Vec::new();
    for _ in 0..if full { 3 } else { 1 } {
        unsampled.push(b.burst(&agent, "opens", bursts).await);
    }
    let mut with_paths = Vec::new();
    for _ in 0..if full { 2 } else { 1 } {
        with_paths.push(b.burst(&agent, "open-paths", bursts).await);
    }
    let burst_rss = agent.pid().map_or(0, rss_bytes);
    assert!(agent.shutdown().is_empty());
    let agent = AgentDaemon::start(&tb.containerd.nri_socket(), "").await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    let sampled = b.burst(&agent, "opens", bursts).await;
    assert!(agent.shutdown().is_empty());
    cri.remove_pod(&pod).await.unwrap();
    tb.finish();

    let med = |v: &[Duration]| percentile(v, 50.0);
    let mut body = String::new();
    body.push_str("## Tracer: overhead on syscall-heavy containers, and event throughput\n\n");
    body.push_str(&format!(
        "`cargo bench -p hyperbox-integration --bench trace` (as root), {}.\n\n\
         Workloads (`integration/workloads/syscalls.c`, static, in a busybox container): \
         {loops} rounds of getpid + 1-byte read + 1-byte write; {copies} copies of a 4 KiB file on \
         tmpfs (open, read, write, close, twice). Wall time is the container's own (CRI started → \
         finished). Run times on this machine wander by ±15 % from one run to the next, so the \
         figure is paired: {} pairs of an untraced and a traced run back to back (alternating \
         which goes first), in the same agent; the overhead is the median of the pairs' ratios, \
         with its distribution-free 95 % interval. \"Untraced\" is the annotation opt-out: no \
         container is watched then, so the syscall hook is detached (`hook_linger_secs = 0`). \
         \"Tracer not loaded\" (`tracing.enabled = false`) runs in {} batches of {batch} around \
         the pairs, to show that loading alone costs nothing.\n\n\
         | workload | mode | runs | median | min | max | traced ÷ untraced, paired (95 % interval) |\n\
         |---|---|---|---|---|---|---|\n",
        machine(),
        (rounds - 1) * pairs,
        rounds,
    ));
    let labels = [
        "tracer not loaded",
        "untraced (loaded, not watched)",
        "traced",
    ];
    for (w, (name, _, _)) in workloads.iter().enumerate() {
        let (r, lo, hi) = median_with_ci(&ratios[w]);
        for (i, m) in labels.iter().enumerate() {
            let paired = match i {
                0 => format!(
                    "not loaded ÷ untraced, medians: {:.3}",
                    med(&wall[w][0]).as_secs_f64() / med(&wall[w][1]).as_secs_f64()
                ),
                1 => String::new(),
                _ => format!("**{r:.3}×** ({lo:.3}–{hi:.3})"),
            };
            body.push_str(&format!(
                "| {name} | {m} | {} | {:.3} s | {:.3} s | {:.3} s | {paired} |\n",
                wall[w][i].len(),
                med(&wall[w][i]).as_secs_f64(),
                wall[w][i].iter().min().unwrap().as_secs_f64(),
                wall[w][i].iter().max().unwrap().as_secs_f64(),
            ));
        }
    }
    for (w, (name, _, expected)) in workloads.iter().enumerate() {
        let (r, _, _) = median_with_ci(&ratios[w]);
        let per_call = (r - 1.0) * med(&wall[w][1]).as_secs_f64() / counted[w].max(1) as f64;
        body.push_str(&format!(
            "\n{name}: the kernel counted {} syscalls in a traced run (the loop makes {expected}); \
             added cost {:.1} ns per traced syscall (median ratio × untraced median).",
            counted[w],
            per_call * 1e9
        ));
    }
    let secs = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    body.push_str(&format!(
        "\n\nSteady state, the default trade-off: a container past its counting window is counted \
         only in samples, aligned for all containers (defaults: 10 s window, then 1 s every 60 s; \
         here the same 1/60 sample duty scaled to a 1 s window and 50 ms every 3 s, so a run of \
         seconds spans samples as a long-lived container does). The work ({steady_loops} loop rounds; \
         {steady_copies} copies) starts 1.5 s in, after the window, and times itself; \
         {steady_pairs} pairs per workload, as above. \"Derived\": the share of the work's \
         syscalls the samples counted (median), times the paired overhead of counting every \
         syscall (the rows above); the direct paired figure cannot resolve that, its interval \
         is this machine's run-to-run noise.\n\n\
         | workload | untraced, median work | traced past its window | traced ÷ untraced, paired (95 % interval) | samples per run | counted in samples | derived overhead |\n\
         |---|---|---|---|---|---|---|\n",
    ));
    let mut past_window = Vec::new();
    for (w, (name, _, _)) in workloads.iter().enumerate() {
        let (r, lo, hi) = median_with_ci(&steady_ratios[w]);
        let mut counted = steady_counted[w].clone();
        counted.sort();
        samples[w].sort();
        let share = counted[counted.len() / 2] as f64 / steady_work[w].2 as f64;
        let derived = share * (median_with_ci(&ratios[w]).0 - 1.0);
        past_window.push(derived);
        body.push_str(&format!(
            "| {name} | {:.3} s | {:.3} s | {r:.3}× ({lo:.3}–{hi:.3}) | {}–{} | {:.2} % | **{:.2} %** |\n",
            secs(&steady[w][0]),
            secs(&steady[w][1]),
            samples[w][0],
            samples[w][samples[w].len() - 1],
            share * 100.0,
            derived * 100.0,
        ));
    }
    let window = hyperbox_config::Tracing::default().syscall_window_secs as f64;
    body.push_str(&format!(
        "\nOver a whole life with the defaults (the first {window} s counted, then samples), a \
         container doing nothing but this work would pay on average:\n\n\
         | workload | over 1 min | over 10 min | over 1 h |\n|---|---|---|---|\n",
    ));
    for (w, (name, _, _)) in workloads.iter().enumerate() {
        let counted = median_with_ci(&ratios[w]).0 - 1.0;
        let life = |secs: f64| (window * counted + (secs - window) * past_window[w]) / secs * 100.0;
        body.push_str(&format!(
            "| {name} | {:.1} % | {:.2} % | {:.2} % |\n",
            life(60.0),
            life(600.0),
            life(3600.0)
        ));
    }
    body.push_str(&format!(
        "\n\nAgent resident memory while tracing: {:.1} MiB (and {:.1} MiB with a 64 MiB ring \
         after the bursts below).\n\n",
        rss as f64 / (1 << 20) as f64,
        burst_rss as f64 / (1 << 20) as f64
    ));
    body.push_str(
        "Event throughput: a traced container makes N `openat(\"\")` calls as fast as one CPU \
         allows (or, \"48-byte path\", opens of a missing `/usr/lib/x86_64-linux-gnu/…` path, \
         a library's length); each is an open event through the ring buffer (32 bytes and the \
         path with its NUL, in 8-byte units: 40 and 88 bytes here), decoded and recorded by the \
         agent on the other CPU. Rate = events processed / time from container start until the \
         agent had them all.\n\n\
         | ring, sampling | events | processed | dropped | sampled out | producer time | \
         processed/s |\n|---|---|---|---|---|---|---|\n",
    );
    let row = |label: &str, r: &Burst| {
        format!(
            "| {label} | {} | {} | {} | {} | {:.2} s | {:.2} M/s |\n",
            r.n,
            r.processed,
            r.dropped,
            r.sampled,
            r.produced_in.as_secs_f64(),
            r.processed as f64 / r.elapsed.as_secs_f64() / 1e6
        )
    };
    for r in &unsampled {
        body.push_str(&row("64 MiB, off", r));
    }
    for r in &with_paths {
        body.push_str(&row("64 MiB, off, 48-byte path", r));
    }
    body.push_str(&row("256 KiB (default), 1 in 16 above half", &sampled));
    println!("{body}");
    if full {
        let path = write_section("trace", &body).unwrap();
        println!("written to {}", path.display());
    }
}
