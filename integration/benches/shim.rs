//! hyperbox's shim (`containerd-shim-hyperbox-v1`) against containerd's
//! Go `containerd-shim-runc-v2` and the Rust runc shim of rust-extensions
//! (`containerd-shim-runc-v2-rs`, crate `containerd-runc-shim`), in one run
//! on one containerd (1.7, or 2.x with `HYPERBOX_CONTAINERD_LINE=2`; each
//! line's own Go shim):
//!
//! 1. create + start latency of N containers (busybox `sleep 3600`) made
//!    one after another through the containerd API and kept running;
//! 2. the shims' resident memory once all N run: the sum over the
//!    instance's shim processes divided by the running containers, and per
//!    shim process (RSS and PSS);
//! 3. the shim binaries' size.
//!
//! Each side runs without the agent (the shim's agent socket does not
//! exist) and with `hyperbox-nri` running and the shim pointed at it. The
//! sides take turns within every round, in a rotated order, so that a
//! machine that gets busier or quieter during the run shifts every side
//! alike.
//!
//! A shim that cannot run a container on this containerd (the Rust runc
//! shim 0.2 speaks only containerd 2.x's task API v3) is left out, with
//! containerd's error in the report.
//!
//! `cargo bench -p hyperbox-integration --bench shim` (as root) runs it and
//! rewrites its section of docs/benchmarks.md (`shim` on 1.7,
//! `shim-containerd2` on 2.x); under `cargo test` it runs a smoke of three
//! containers per side and writes nothing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyperbox_integration::agent::AgentDaemon;
use hyperbox_integration::bench::{full_run, machine, ms, percentile, rss_bytes, write_section};
use hyperbox_integration::client::{Client, ContainerOptions, Image, PullOptions, RUNC_RUNTIME};
use hyperbox_integration::containerd::Line;
use hyperbox_integration::prereq::{self, Prereq};
use hyperbox_integration::procs;
use hyperbox_integration::shim::HYPERBOX_SHIM_BINARY;
use hyperbox_integration::testbed::Testbed;

const MIB: f64 = (1u64 << 20) as f64;

/// The agent's memory policy in the "agent" mode.
const ADAPTIVE: &str = "[memory]\ndefault_policy = \"adaptive\"\n";
/// Every container is one run of this workload (its annotation), which the
/// agent has a history of in the "agent" mode.
const WORKLOAD_ANNOTATION: &str = "hyperbox.dev/workload";
const WORKLOAD: &str = "shim-bench";
/// The agent keys a ctr/nerdctl container's workload by containerd
/// namespace.
const WORKLOAD_KEY: &str = "containerd:default/shim-bench";

/// The Rust runc shim release this line can run: 0.2 answers containerd's
/// `start` with task API v3, which containerd 1.7 refuses ("unsupported
/// shim version (3)"); 0.1.1 is the newest that 1.7 starts.
fn rust_shim_version(line: Line) -> &'static str {
    match line {
        Line::V1_7 => "0.1.1",
        Line::V2 => "0.2.0",
    }
}

/// Where `scripts/install-deps.sh` installs that release
/// (`$HYPERBOX_TOOLS_ROOT/containerd-runc-shim-<version>`, the tools root
/// being `/var/cache/hyperbox/tools` by default).
fn rust_shim_path(line: Line) -> PathBuf {
    let root = std::env::var_os("HYPERBOX_TOOLS_ROOT")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/hyperbox/tools"));
    root.join(format!(
        "containerd-runc-shim-{}/bin/containerd-shim-runc-v2-rs",
        rust_shim_version(line)
    ))
}

/// `HYPERBOX_SHIM_BENCH_BINARY`: another build of hyperbox's shim to run
/// instead of the workspace's (a build-profile experiment), by absolute path.
fn hyperbox_override() -> Option<PathBuf> {
    std::env::var_os("HYPERBOX_SHIM_BENCH_BINARY")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The Go shim `line` starts for `io.containerd.runc.v2`: Debian's for
/// 1.7, the one built with 2.x beside it.
fn go_shim(line: Line) -> PathBuf {
    line.bin_dir()
        .unwrap_or_else(|| PathBuf::from("/usr/bin"))
        .join("containerd-shim-runc-v2")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    RuncV2,
    RustRunc,
    Hyperbox,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::RuncV2 => "containerd-shim-runc-v2 (Go)",
            Side::RustRunc => "containerd-shim-runc-v2-rs (Rust runc shim)",
            Side::Hyperbox => "containerd-shim-hyperbox-v1",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Side::RuncV2 => "go",
            Side::RustRunc => "rs",
            Side::Hyperbox => "hb",
        }
    }

    /// The runtime name containers of this side get. containerd takes an
    /// absolute path to a shim binary as the runtime name, so the Rust shim
    /// needs nothing on containerd's `PATH`.
    fn runtime(self, line: Line) -> String {
        match self {
            Side::RuncV2 => RUNC_RUNTIME.into(),
            Side::RustRunc => rust_shim_path(line).to_string_lossy().into_owned(),
            Side::Hyperbox => Side::Hyperbox.binary(line).to_string_lossy().into_owned(),
        }
    }

    fn binary(self, line: Line) -> PathBuf {
        match self {
            Side::RuncV2 => go_shim(line),
            Side::RustRunc => rust_shim_path(line),
            Side::Hyperbox => hyperbox_override().unwrap_or_else(|| {
                hyperbox_integration::binaries::shim_for_nodes(HYPERBOX_SHIM_BINARY)
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    NoAgent,
    Agent,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::NoAgent => "no agent",
            Mode::Agent => "agent",
        }
    }
}

/// One process's memory.
#[derive(Debug, Clone, Copy, Default)]
struct Mem {
    rss: u64,
    pss: u64,
    /// `RssAnon`: heap, stacks, the process's own data.
    anon: u64,
    /// `RssFile`: mapped binary and libraries, shared between the shims.
    file: u64,
    threads: u64,
}

/// `Pss` of `/proc/<pid>/smaps_rollup` and `Threads` of its status.
fn mem(pid: u32) -> Mem {
    let kb = |text: &str, key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    Mem {
        rss: rss_bytes(pid),
        pss: kb(&rollup, "Pss:") * 1024,
        anon: kb(&status, "RssAnon:") * 1024,
        file: kb(&status, "RssFile:") * 1024,
        threads: kb(&status, "Threads:"),
    }
}

/// The `n` mappings of `pid` with the most resident memory: (kB, mapping).
fn largest_mappings(pid: u32, n: usize) -> Vec<(u64, String)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut out = Vec::new();
    let mut current = String::new();
    for l in smaps.lines() {
        if let Some(v) = l.strip_prefix("Rss:") {
            let kb = v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
            out.push((kb, current.clone()));
        } else if l
            .split_whitespace()
            .next()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            // A mapping's header: range perms offset dev inode [path].
            let f: Vec<&str> = l.split_whitespace().collect();
            current = format!(
                "{} {}",
                f.get(1).unwrap_or(&""),
                f.get(5).unwrap_or(&"[anon]")
            );
        }
    }
    out.sort_by_key(|m| std::cmp::Reverse(m.0));
    out.truncate(n);
    out
}

/// The live shim processes of the instance whose gRPC socket is `address`
/// (every shim carries it as its `-address` argument).
fn shims(address: &Path) -> Vec<u32> {
    procs::with_arg(&address.to_string_lossy())
        .into_iter()
        .filter(|p| p.state != 'Z')
        .filter(|p| {
            p.cmdline
                .first()
                .is_some_and(|c| c.contains("containerd-shim"))
        })
        .map(|p| p.pid as u32)
        .collect()
}

/// What one batch of N containers measured.
#[derive(Debug, Clone, Default)]
struct Batch {
    /// Containers.Create with its snapshot (the shim is not involved yet).
    create: Vec<Duration>,
    /// Tasks.Create + Tasks.Start: the shim's part.
    start: Vec<Duration>,
    /// Per shim process, after all N run.
    shims: Vec<Mem>,
    running: usize,
}

impl Batch {
    fn total(&self) -> Vec<Duration> {
        self.create
            .iter()
            .zip(&self.start)
            .map(|(a, b)| *a + *b)
            .collect()
    }

    fn rss_per_container(&self) -> f64 {
        self.shims.iter().map(|m| m.rss).sum::<u64>() as f64 / self.running.max(1) as f64
    }

    fn pss_per_container(&self) -> f64 {
        self.shims.iter().map(|m| m.pss).sum::<u64>() as f64 / self.running.max(1) as f64
    }
}

/// What every batch runs against.
struct Env<'a> {
    client: &'a Client,
    /// containerd's gRPC socket, which finds its shims.
    address: &'a Path,
    image: &'a Image,
    line: Line,
}

/// Creates and starts `n` sleeping containers on `side` one after another,
/// measures the shims once all run, then deletes every container and waits
/// for their shims to exit.
async fn batch(
    env: &Env<'_>,
    side: Side,
    n: usize,
    tag: &str,
    agent: Option<&AgentDaemon>,
    decisions: &mut Vec<String>,
) -> Batch {
    let opts = ContainerOptions {
        runtime: Some(side.runtime(env.line)),
        annotations: [(WORKLOAD_ANNOTATION.to_string(), WORKLOAD.to_string())].into(),
        ..ContainerOptions::args(&["sleep", "3600"])
    };
    let mut b = Batch::default();
    let mut running = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{tag}-{}-{i}", side.tag());
        let t = Instant::now();
        let c = env
            .client
            .create_container(&id, env.image, &opts)
            .await
            .unwrap_or_else(|e| panic!("create {id} on {}: {e}", side.name()));
        b.create.push(t.elapsed());
        let t = Instant::now();
        let task = c
            .start()
            .await
            .unwrap_or_else(|e| panic!("start {id} on {}: {e}", side.name()));
        b.start.push(t.elapsed());
        running.push((c, task));
    }
    // A moment for each shim to finish what follows a start (the Go
    // shim's collector, the agent registration) before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.running = running
        .iter()
        .filter(|(_, t)| procs::alive(t.pid() as i32))
        .count();
    let pids = shims(env.address);
    if let Some(&pid) = pids.first() {
        println!("{}: largest mappings of shim {pid} by RSS:", side.name());
        for (kb, what) in largest_mappings(pid, 6) {
            println!("  {kb:>6} kB  {what}");
        }
    }
    b.shims = pids.into_iter().map(mem).collect();
    // What the agent made of the last container hyperbox's shim asked about.
    if let (Some(a), Side::Hyperbox, Some((c, _))) = (agent, side, running.last()) {
        let e = a.explain(c.id());
        decisions.push(format!(
            "{}: {}",
            c.id(),
            serde_json::to_string(&e["decisions"]).unwrap_or_default()
        ));
    }
    for (c, task) in running {
        c.delete()
            .await
            .unwrap_or_else(|e| panic!("delete {} on {}: {e}", c.id(), side.name()));
        drop(task);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !shims(env.address).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{}: shims still running 30 s after every container was deleted: {:?}",
            side.name(),
            shims(env.address)
        );
        procs::reap_zombie_children("containerd-shim");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b
}

/// Runs one container on `side` and deletes it: whether this containerd
/// can use that shim at all, with containerd's error when not.
async fn probe(env: &Env<'_>, side: Side) -> Result<(), String> {
    let opts = ContainerOptions {
        runtime: Some(side.runtime(env.line)),
        ..ContainerOptions::args(&["true"])
    };
    let id = format!("probe-{}", side.tag());
    let c = env
        .client
        .create_container(&id, env.image, &opts)
        .await
        .map_err(|e| e.to_string())?;
    let started = c.start().await.map(drop).map_err(|e| e.to_string());
    c.delete()
        .await
        .unwrap_or_else(|e| panic!("delete {id} on {}: {e}", side.name()));
    if started.is_err() {
        // A shim whose start answer containerd refused keeps running, and
        // containerd no longer knows it.
        let bin = side.runtime(env.line);
        let orphans: Vec<i32> = procs::with_arg(&env.address.to_string_lossy())
            .into_iter()
            .filter(|p| p.cmdline.first() == Some(&bin))
            .map(|p| p.pid)
            .collect();
        procs::kill_and_wait(&orphans, Duration::from_secs(10));
        procs::reap_zombie_children("containerd-shim");
    }
    started
}

/// Merges batches of one side and mode.
fn merge(batches: &[Batch]) -> Batch {
    let mut out = Batch::default();
    for b in batches {
        out.create.extend(&b.create);
        out.start.extend(&b.start);
        out.shims.extend(&b.shims);
        out.running += b.running;
    }
    out
}

fn median_f(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn mib(bytes: f64) -> String {
    format!("{:.2} MiB", bytes / MIB)
}

/// The binary's size on disk and its size stripped of symbols (a copy is
/// stripped; the Go shim Debian ships is stripped already).
fn binary_sizes(bin: &Path) -> (u64, Option<u64>) {
    let size = std::fs::metadata(bin).map(|m| m.len()).unwrap_or(0);
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("shim");
    let stripped = std::process::Command::new("strip")
        .arg("-o")
        .arg(&copy)
        .arg(bin)
        .status()
        .ok()
        .filter(|s| s.success())
        .and_then(|_| std::fs::metadata(&copy).ok())
        .map(|m| m.len());
    (size, stripped)
}

/// Why the Rust runc shim is left out before trying it, or `None`.
fn rust_shim_missing(line: Line) -> Option<String> {
    let bin = rust_shim_path(line);
    (!bin.is_file()).then(|| {
        format!(
            "{} is not installed (scripts/install-deps.sh installs it)",
            bin.display()
        )
    })
}

#[tokio::main]
async fn main() {
    let full = full_run();
    if !prereq::require("bench shim", Prereq::CONTAINERS) {
        return;
    }
    let (rounds, n) = if full { (3, 50) } else { (1, 3) };
    let modes = [Mode::NoAgent, Mode::Agent];
    // Built before anything is timed.
    Side::Hyperbox.binary(Line::V1_7);

    // CRI stays on: the agent registers over NRI as on a node (the
    // containers here are made through the containerd API, which NRI does
    // not see in 1.7, so only hyperbox's shim asks the agent anything).
    let line = Line::selected();
    let tb = Testbed::start_with(|b| b.line(line)).await;
    let reference = tb.push_sleeper().await;
    let client = tb.containerd.client().await.unwrap();
    let image = client
        .pull(&reference, &PullOptions::local("overlayfs"))
        .await
        .unwrap();
    let address = tb.containerd.address().to_path_buf();
    let no_agent_config = std::fs::read(tb.containerd.shim_config_path()).unwrap();
    let version = client.version().await.unwrap();
    let env = Env {
        client: &client,
        address: &address,
        image: &image,
        line,
    };
    let mut rust_missing = rust_shim_missing(line);
    if rust_missing.is_none() {
        rust_missing = probe(&env, Side::RustRunc).await.err();
    }
    let mut sides = vec![Side::RuncV2, Side::Hyperbox];
    match &rust_missing {
        None => sides.insert(1, Side::RustRunc),
        Some(why) => eprintln!("bench shim: the Rust runc shim is left out: {why}"),
    }

    // Warm-up: one container per side, untimed (page cache of each shim
    // binary, runc, the snapshotter's first mounts).
    for &side in &sides {
        batch(&env, side, 1, "warm", None, &mut Vec::new()).await;
    }

    // results[side][mode] = batches, one per round.
    let mut results: Vec<Vec<Vec<Batch>>> = vec![vec![Vec::new(); modes.len()]; sides.len()];
    let mut agent_decisions = Vec::new();
    for round in 0..rounds {
        for (mi, &mode) in modes.iter().enumerate() {
            let agent = match mode {
                Mode::NoAgent => None,
                Mode::Agent => {
                    let mut a = AgentDaemon::new(&tb.containerd.nri_socket(), ADAPTIVE);
                    // A learned history of the bench's workload, so the
                    // agent sizes every container and hyperbox's shim
                    // writes the limit into its spec: the full path.
                    let history = serde_json::json!({
                        "version": 1,
                        "workloads": { WORKLOAD_KEY: { "runs": [64u64 << 20], "updated": 0 } }
                    });
                    std::fs::write(
                        a.state_dir().join("workloads.json"),
                        serde_json::to_vec(&history).unwrap(),
                    )
                    .unwrap();
                    a.start_again().await;
                    a.wait_connected(true, Duration::from_secs(20)).await;
                    tb.containerd.use_agent(&a.config_path()).unwrap();
                    Some(a)
                }
            };
            // Rotate the order every round and mode.
            let k = (round * modes.len() + mi) % sides.len();
            let order: Vec<usize> = (0..sides.len()).map(|i| (i + k) % sides.len()).collect();
            for si in order {
                let side = sides[si];
                let tag = format!("r{round}{}", if mode == Mode::Agent { "a" } else { "n" });
                eprintln!(
                    "bench shim: round {round}, {}, {}: {n} containers",
                    mode.name(),
                    side.name()
                );
                let b = batch(&env, side, n, &tag, agent.as_ref(), &mut agent_decisions).await;
                eprintln!(
                    "  create+start p50 {}, {:.2} MiB RSS per container over {} shims",
                    ms(percentile(&b.total(), 50.0)),
                    b.rss_per_container() / MIB,
                    b.shims.len()
                );
                results[si][mi].push(b);
            }
            if let Some(a) = agent {
                assert!(a.shutdown().is_empty());
                std::fs::write(tb.containerd.shim_config_path(), &no_agent_config).unwrap();
            }
        }
    }
    let log = tb.containerd.log();
    tb.finish();
    assert!(
        shims(&address).is_empty(),
        "shims left after teardown: {:?}",
        shims(&address)
    );

    // ---------------------------------------------------------------- report
    let merged: Vec<Vec<Batch>> = results
        .iter()
        .map(|per_mode| per_mode.iter().map(|b| merge(b)).collect())
        .collect();
    let idx = |s: Side| sides.iter().position(|x| *x == s);
    let mut body = String::new();
    body.push_str("## Shim: hyperbox's shim vs runc-v2 (Go) and the Rust runc shim\n\n");
    body.push_str(&format!(
        "`cargo bench -p hyperbox-integration --bench shim` (as root), {}, containerd {version} \
         (Go shim `{}`), runc {}. {n} containers (busybox `sleep 3600`) created and \
         started one after another through the containerd API and kept running, per side and \
         mode, in {rounds} rounds; within a round the sides take turns in an order rotated every \
         round and mode, so machine noise (2 shared cores) falls on every side alike. \
         Every container is killed and deleted and every shim has exited before the next batch.\n\n",
        machine(),
        go_shim(line).display(),
        runc_version(),
    ));
    match hyperbox_override() {
        Some(bin) => body.push_str(&format!(
            "hyperbox's shim is `{}` (HYPERBOX_SHIM_BENCH_BINARY), not the node build.\n\n",
            bin.display()
        )),
        None => body.push_str(
            "hyperbox's shim is the node build docs/shim.md gives, `cargo build-shim` \
             (profile `shim`: size-optimized, fat LTO, one codegen unit, stripped; static \
             musl).\n\n",
        ),
    }
    match &rust_missing {
        Some(why) => body.push_str(&format!(
            "The Rust runc shim is left out of this run: {why}.\n\n"
        )),
        None => body.push_str(&format!(
            "The Rust runc shim is containerd-runc-shim {} (`cargo install`, its own release \
             profile). {}\n\n",
            rust_shim_version(line),
            match line {
                Line::V1_7 => {
                    "It is the 2022 release (containerd-shim 0.3, threads rather than tokio): \
                     the newest, 0.2.0, answers containerd's `start` with task API v3, which \
                     1.7 refuses (\"unsupported shim version (3): not implemented\"); the \
                     containerd 2.x section compares with 0.2.0."
                }
                Line::V2 => "It is the newest release (containerd-shim 0.12, tokio).",
            }
        )),
    }
    body.push_str(
        "\"no agent\": the shim's agent socket does not exist (hyperbox's shim skips its policy \
         calls at once). \"agent\": `hyperbox-nri` runs (NRI plugin, policy adaptive, \
         a learned history of the containers' workload) and hyperbox's shim asks it for each \
         container's memory policy before `runc create`, writes the limit it decides into the \
         bundle's spec, and registers the container after create and start; the other shims \
         do not talk to it.\n\n",
    );
    body.push_str(
        "**Create + start latency**: Containers.Create (with its snapshot) + Tasks.Create + \
         Tasks.Start, as a client sees it; \"task\" is Tasks.Create + Tasks.Start alone, the \
         shim's part.\n\n\
         | shim | mode | create+start p50 | p99 | task p50 | task p99 | p50 vs runc-v2 | p50 vs Rust shim | per-round p50 vs runc-v2 |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for (mi, &mode) in modes.iter().enumerate() {
        for (si, &side) in sides.iter().enumerate() {
            let m = &merged[si][mi];
            let total = m.total();
            let p50 = percentile(&total, 50.0).as_secs_f64();
            let vs = |other: Option<usize>| -> String {
                other.map_or("–".into(), |o| {
                    let base = percentile(&merged[o][mi].total(), 50.0).as_secs_f64();
                    format!("{:.2}×", p50 / base)
                })
            };
            let per_round: Vec<String> = (0..rounds)
                .map(|r| {
                    let mine = percentile(&results[si][mi][r].total(), 50.0).as_secs_f64();
                    let go = percentile(&results[idx(Side::RuncV2).unwrap()][mi][r].total(), 50.0)
                        .as_secs_f64();
                    format!("{:.2}", mine / go)
                })
                .collect();
            body.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                side.name(),
                mode.name(),
                ms(percentile(&total, 50.0)),
                ms(percentile(&total, 99.0)),
                ms(percentile(&m.start, 50.0)),
                ms(percentile(&m.start, 99.0)),
                vs(idx(Side::RuncV2)),
                vs(idx(Side::RustRunc)),
                per_round.join(", "),
            ));
        }
    }
    body.push_str(&format!(
        "\n**Shim memory with {n} containers running**: the sum of the instance's shim \
         processes' memory divided by the running containers (median over the {rounds} rounds; \
         one shim process per container on every side), and per shim process (median, min–max \
         over all rounds). RSS counts the pages a process shares with the other shims (binary, \
         libraries) in full; PSS divides them among the sharers, which is what the node pays.\n\n\
         | shim | mode | shims | RSS per container | vs runc-v2 | vs Rust shim | PSS per container | RSS per shim (min–max) | of which anon / file | threads |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    ));
    let rss_pc = |si: usize, mi: usize| -> f64 {
        median_f(
            &results[si][mi]
                .iter()
                .map(Batch::rss_per_container)
                .collect::<Vec<_>>(),
        )
    };
    for (mi, &mode) in modes.iter().enumerate() {
        for (si, &side) in sides.iter().enumerate() {
            let m = &merged[si][mi];
            let rss = rss_pc(si, mi);
            let pss = median_f(
                &results[si][mi]
                    .iter()
                    .map(Batch::pss_per_container)
                    .collect::<Vec<_>>(),
            );
            let per: Vec<f64> = m.shims.iter().map(|s| s.rss as f64).collect();
            let lo = per.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = per.iter().copied().fold(0.0, f64::max);
            let med_of = |f: fn(&Mem) -> u64| {
                median_f(&m.shims.iter().map(|s| f(s) as f64).collect::<Vec<_>>())
            };
            let threads = med_of(|s| s.threads);
            let (anon, file) = (med_of(|s| s.anon), med_of(|s| s.file));
            let vs = |other: Option<usize>| -> String {
                other.map_or("–".into(), |o| format!("{:.2}×", rss / rss_pc(o, mi)))
            };
            body.push_str(&format!(
                "| {} | {} | {} / {} containers | {} | {} | {} | {} | {} ({}–{}) | {} / {} | {threads} |\n",
                side.name(),
                mode.name(),
                m.shims.len() / rounds,
                m.running / rounds,
                mib(rss),
                vs(idx(Side::RuncV2)),
                vs(idx(Side::RustRunc)),
                mib(pss),
                mib(median_f(&per)),
                mib(lo),
                mib(hi),
                mib(anon),
                mib(file),
            ));
        }
    }
    body.push_str("\n**Binary size**\n\n| shim | on disk | stripped |\n|---|---|---|\n");
    for &side in &sides {
        let bin = side.binary(line);
        let (size, stripped) = binary_sizes(&bin);
        body.push_str(&format!(
            "| {} (`{}`) | {} | {} |\n",
            side.name(),
            bin.display(),
            mib(size as f64),
            stripped.map_or("–".into(), |s| mib(s as f64)),
        ));
    }
    let targets = {
        let hb = idx(Side::Hyperbox).unwrap();
        let go = idx(Side::RuncV2).unwrap();
        let mut t = Vec::new();
        for (mi, &mode) in modes.iter().enumerate() {
            let rss = rss_pc(hb, mi);
            let lat = percentile(&merged[hb][mi].total(), 50.0).as_secs_f64()
                / percentile(&merged[go][mi].total(), 50.0).as_secs_f64();
            let rs = idx(Side::RustRunc).map_or(String::new(), |r| {
                format!(
                    ", {} the Rust runc shim's {}",
                    if rss <= rss_pc(r, mi) {
                        "at or below"
                    } else {
                        "above"
                    },
                    mib(rss_pc(r, mi))
                )
            });
            let pss = median_f(
                &results[hb][mi]
                    .iter()
                    .map(Batch::pss_per_container)
                    .collect::<Vec<_>>(),
            );
            let verdict = |met: bool| if met { "met" } else { "not met" };
            t.push(format!(
                "{}: {} RSS per container (target ≤ 3.5 MB = {:.2} MiB: {}{rs}; PSS {}); \
                 create+start p50 {lat:.2}× runc-v2's (target ≤ 1.0×: {}).",
                mode.name(),
                mib(rss),
                3.5e6 / MIB,
                verdict(rss <= 3.5e6),
                mib(pss),
                verdict(lat <= 1.0),
            ));
        }
        t
    };
    body.push_str("\n**Targets (issue #16)**, hyperbox's shim:\n\n");
    for t in targets {
        body.push_str(&format!("- {t}\n"));
    }
    println!("{body}");
    println!("agent decisions (last hyperbox container of each agent batch):");
    for d in &agent_decisions {
        println!("  {d}");
    }
    // The shims log into containerd's log; what they warned about, once
    // per kind, for the reader to judge.
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for l in log
        .lines()
        .filter(|l| l.contains("level=warn") || l.contains("level=error"))
    {
        let msg = l
            .split_once("msg=")
            .map_or(l, |(_, m)| m)
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(160)
            .collect::<String>();
        *seen.entry(msg).or_default() += 1;
    }
    println!("containerd.log warnings and errors (digits removed), by count:");
    for (msg, count) in &seen {
        println!("  {count} × {msg}");
    }
    if full && hyperbox_override().is_none() {
        let section = match line {
            Line::V1_7 => "shim",
            Line::V2 => "shim-containerd2",
        };
        let path = write_section(section, &body).unwrap();
        println!("written to {}", path.display());
    }
}

fn runc_version() -> String {
    std::process::Command::new("runc")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim_start_matches("runc version ").to_string())
        })
        .unwrap_or_else(|| "?".into())
}
