//! Learned seccomp profiles against containerd's default profile and no
//! filter, in one run on one containerd (`HYPERBOX_CONTAINERD_LINE`, 1.7
//! by default), every container on hyperbox's shim:
//!
//! - **Size**: the allowed syscalls of each learned profile (a busybox
//!   httpd serving loopback requests, a shell pipeline, Python doing file
//!   and socket I/O) against containerd's default profile, read from the
//!   spec of a `ctr run --seccomp` container.
//! - **False denials**: each program learned over 3 runs, then replayed
//!   enforced (20 times each in a full run); every replay must exit 0 with
//!   the learning runs' output, and the denials reported are counted.
//! - **Cost**: the tracer bench's syscall loop (`syscalls loop N`:
//!   getpid, 1-byte read, 1-byte write) timed inside the container
//!   (`work_ns`), with no filter, containerd's default profile, the loop's
//!   learned profile untraced (the filter alone), and learned with denial
//!   reporting on (the tracer's refusal hook watching: fexit on
//!   `__seccomp_filter` where the kernel allows it, else the `sys_exit`
//!   tracepoint; the section names the one measured), each past its 1 s
//!   counting window (the steady state of a container's life). Rounds run
//!   the four back to back, each round starting with the next variant (the
//!   tracer's hooks detach at once, so none taxes the next); each
//!   variant's ratio to no filter is the median over rounds.
//!
//! `cargo bench -p hyperbox-integration --bench seccomp` (as root) runs it
//! and rewrites its section of docs/benchmarks.md; under `cargo test` it
//! runs a small smoke.

use std::collections::BTreeSet;
use std::time::Duration;

use hyperbox_api::types::ProfileDetail;
use hyperbox_integration::agent::AgentDaemon;
use hyperbox_integration::bench::{full_run, machine, median_with_ci, write_section};
use hyperbox_integration::client::ContainerOptions;
use hyperbox_integration::containerd::Line;
use hyperbox_integration::prereq::{self, Prereq};
use hyperbox_integration::shim::HYPERBOX_RUNTIME;
use hyperbox_integration::testbed::Testbed;
use hyperbox_integration::workload::{PYTHON_IO, SHELL_PIPELINE, WEB_SERVER, syscalls_binary};
use hyperbox_integration::{ctr, distro};

/// The syscall hook detaches as soon as nothing is watched (a lingering
/// hook would tax whichever variant runs next), and the counting window is
/// 1 s: every loop waits [`PAST_WINDOW_MS`] before its work, so the figure
/// is the steady state of a container past its window (the window's own
/// cost is the tracer bench's).
const CONFIG: &str = "[seccomp]\nauto_stable_runs = 2\nauto_min_learn_secs = 0\n\n\
    [tracing]\nhook_linger_secs = 0\nsyscall_window_secs = 1\n";
/// Ms each loop waits before its work (past the counting window).
const PAST_WINDOW_MS: &str = "1500";
const IN_CONTAINER: &str = "/hb/syscalls";

fn opts(name: &str, mode: &str, args: &[&str]) -> ContainerOptions {
    let mut o = ContainerOptions {
        runtime: Some(HYPERBOX_RUNTIME.into()),
        ..ContainerOptions::args(args)
    };
    o.annotations
        .insert("seccomp.hyperbox.dev/mode".into(), mode.into());
    o.annotations
        .insert("hyperbox.dev/workload".into(), name.into());
    o
}

/// One filter variant of the cost measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Filter {
    None,
    Default,
    Learned,
    LearnedReporting,
}

impl Filter {
    fn name(self) -> &'static str {
        match self {
            Filter::None => "no filter",
            Filter::Default => "containerd's default profile",
            Filter::Learned => "learned profile (reporting off: trace.hyperbox.dev/enabled=false)",
            Filter::LearnedReporting => {
                "learned profile, denials reported (the default: tracer on)"
            }
        }
    }
}

/// Runs the syscall loop once through `ctr run` on hyperbox's shim;
/// returns its in-container work time.
fn loop_once(tb: &Testbed, image: &str, filter: Filter, mode: &str, n: u64, k: u32) -> Duration {
    let bin = syscalls_binary();
    let mount = format!(
        "type=bind,src={},dst={IN_CONTAINER},options=rbind:ro",
        bin.display()
    );
    let id = format!("loop-{k}");
    // Named after the container: the agent takes only a cgroup that ends
    // in the container's id.
    let cgroup = format!("{}/{id}", tb.containerd.cgroup_prefix());
    let mut args = vec![
        "run".to_string(),
        "--cgroup".into(),
        cgroup,
        "--rm".into(),
        "--runtime".into(),
        HYPERBOX_RUNTIME.into(),
        "--mount".into(),
        mount,
        "--label".into(),
        format!("seccomp.hyperbox.dev/mode={mode}"),
        "--annotation".into(),
        format!("seccomp.hyperbox.dev/mode={mode}"),
        "--annotation".into(),
        "hyperbox.dev/workload=sc-loop".into(),
    ];
    if filter == Filter::Default {
        args.push("--seccomp".into());
    }
    if filter != Filter::LearnedReporting {
        args.push("--annotation".into());
        args.push("trace.hyperbox.dev/enabled=false".into());
    }
    args.extend([
        image.to_string(),
        id,
        IN_CONTAINER.into(),
        "loop".into(),
        n.to_string(),
        PAST_WINDOW_MS.into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ctr::run(&tb.containerd, &args);
    let ns: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("work_ns "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no work_ns in {out:?}"));
    Duration::from_nanos(ns)
}

/// The syscall names an OCI profile allows without conditions.
fn allowed_names(profile: &serde_json::Value) -> BTreeSet<String> {
    profile["syscalls"]
        .as_array()
        .expect("a seccomp profile")
        .iter()
        .filter(|r| {
            r["action"] == "SCMP_ACT_ALLOW" && r["args"].as_array().is_none_or(Vec::is_empty)
        })
        .flat_map(|r| r["names"].as_array().cloned().unwrap_or_default())
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect()
}

/// containerd's default profile for a container of `image`, as `ctr run
/// --seccomp` puts it in the spec: its allowed syscall names.
fn default_profile(tb: &Testbed, image: &str) -> BTreeSet<String> {
    ctr::run(
        &tb.containerd,
        &[
            "containers",
            "create",
            "--seccomp",
            image,
            "sc-default",
            "true",
        ],
    );
    let info = ctr::run(&tb.containerd, &["containers", "info", "sc-default"]);
    ctr::run(&tb.containerd, &["containers", "delete", "sc-default"]);
    let v: serde_json::Value = serde_json::from_str(&info).expect("ctr containers info JSON");
    allowed_names(&v["Spec"]["linux"]["seccomp"])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = full_run();
    if !prereq::require(
        "bench seccomp",
        &[Prereq::CONTAINERS, &[Prereq::Psi, Prereq::Bpftool]].concat(),
    ) {
        return;
    }
    let (replays, rounds, loops) = if full {
        (20, 16, 2_000_000)
    } else {
        (1, 1, 10_000)
    };
    let line = Line::selected();
    let tb = Testbed::start_with(|b| b.line(line).without_cri()).await;
    let agent = AgentDaemon::start(&tb.containerd.nri_socket(), CONFIG).await;
    tb.containerd.use_agent(&agent.config_path()).unwrap();
    let api = hyperbox_api::client::Client::new(agent.address());
    let health = agent.health().await.unwrap();
    let refusal_hook = health["tracing_refusal_hook"]
        .as_str()
        .filter(|h| !h.is_empty())
        .unwrap_or("none")
        .to_string();
    let (client, bb) = tb.sleeper_image().await;
    let trees = distro::python_trees().expect("the Debian + Python image");
    let py_ref = tb.push(&trees.image(), "bench/python", "v1").await;
    let (_, py) = tb.image_in_overlayfs(&py_ref).await;
    let version = client.version().await.unwrap();

    let default = default_profile(&tb, &bb.name);
    let programs = [
        (
            "web server (busybox httpd + wget)",
            "sc-web",
            &bb,
            vec!["sh", "-c", WEB_SERVER],
        ),
        (
            "shell pipeline (busybox)",
            "sc-pipe",
            &bb,
            vec!["sh", "-c", SHELL_PIPELINE],
        ),
        (
            "Python 3.11, file + socket I/O",
            "sc-python",
            &py,
            vec!["python3", "-c", PYTHON_IO],
        ),
    ];
    let mut size_rows = String::new();
    let mut denial_rows = String::new();
    let mut k = 0u32;
    for (label, name, image, args) in &programs {
        let mut want = None;
        for _ in 0..3 {
            k += 1;
            let out = client
                .run(&format!("{name}-{k}"), image, &opts(name, "learn", args))
                .await
                .unwrap();
            assert_eq!(out.status, 0, "{name}: {}", out.stderr_str());
            want.get_or_insert(out.stdout_str());
        }
        let (mut failed, mut differed) = (0, 0);
        for _ in 0..replays {
            k += 1;
            let out = client
                .run(&format!("{name}-{k}"), image, &opts(name, "enforce", args))
                .await
                .unwrap();
            failed += u32::from(out.status != 0);
            differed += u32::from(Some(out.stdout_str()) != want);
        }
        let key = format!("containerd:default/{name}");
        let d: ProfileDetail = api.profile(&key, "oci").await.unwrap();
        let allowed = allowed_names(&d.profile);
        size_rows.push_str(&format!(
            "| {label} | {} | {} | {:.0} % |\n",
            d.summary.syscalls,
            allowed.len(),
            100.0 * (1.0 - allowed.len() as f64 / default.len() as f64)
        ));
        denial_rows.push_str(&format!(
            "| {label} | {replays} | {failed} | {differed} | {} |\n",
            d.reports.len()
        ));
    }

    // The loop's own profile, then the four variants in rounds.
    for _ in 0..3 {
        k += 1;
        loop_once(&tb, &bb.name, Filter::None, "learn", 1000, k);
    }
    let filters = [
        Filter::None,
        Filter::Default,
        Filter::Learned,
        Filter::LearnedReporting,
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); filters.len()];
    for round in 0..rounds {
        // Each round starts with another variant, so no variant always
        // follows the same one.
        for j in 0..filters.len() {
            let i = (j + round) % filters.len();
            let f = &filters[i];
            k += 1;
            let mode = match f {
                Filter::None | Filter::Default => "off",
                Filter::Learned | Filter::LearnedReporting => "enforce",
            };
            times[i].push(loop_once(&tb, &bb.name, *f, mode, loops, k));
        }
    }
    let loop_denials = api
        .profile("containerd:default/sc-loop", "oci")
        .await
        .unwrap()
        .reports
        .len();
    let mut cost_rows = String::new();
    for (i, f) in filters.iter().enumerate() {
        let ratios: Vec<f64> = times[i]
            .iter()
            .zip(&times[0])
            .map(|(t, base)| t.as_secs_f64() / base.as_secs_f64())
            .collect();
        let (med, lo, hi) = median_with_ci(&ratios);
        let mut ms: Vec<f64> = times[i].iter().map(|t| t.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let per_call_ns = ms[ms.len() / 2] * 1e6 / (3 * loops) as f64;
        cost_rows.push_str(&format!(
            "| {} | {:.1} ms | {per_call_ns:.1} ns | {med:.3}× [{lo:.3}, {hi:.3}] |\n",
            f.name(),
            ms[ms.len() / 2]
        ));
    }
    let body = format!(
        "## Seccomp: learned profiles vs containerd's default and no filter\n\n\
         Command: `cargo bench -p hyperbox-integration --bench seccomp` (as root; \
         `HYPERBOX_CONTAINERD_LINE=2` for containerd 2.x). {} containerd {version}, runc, \
         every container on hyperbox's shim. {}\n\n\
         **Profile size** (allowed syscalls; containerd's default profile allows {} for these containers, read from a `ctr run --seccomp` spec; allowed is the learned set plus the syscalls runc makes under the filter):\n\n\
         | workload | learned | allowed | smaller than the default |\n|---|---|---|---|\n{size_rows}\n\
         **False denials** (learned over 3 runs, then replayed enforced):\n\n\
         | workload | replays | failed | output differed | denials reported |\n|---|---|---|---|---|\n{denial_rows}\n\
         **Filter cost** on the syscall loop ({loops} rounds of getpid + read + write, timed in the container after a 1.5 s wait past a 1 s counting window; {rounds} rounds of the four, ratio to no filter: median [95 % interval]; denials reported during the loop: {loop_denials}; refusal hook: `{refusal_hook}`):\n\n\
         | filter | median work | per syscall | ratio |\n|---|---|---|---|\n{cost_rows}",
        machine(),
        if full {
            ""
        } else {
            "(smoke run: figures not meaningful)"
        },
        default.len(),
    );
    if full {
        let section = match line {
            Line::V1_7 => "seccomp",
            Line::V2 => "seccomp-containerd2",
        };
        let path = write_section(section, &body).unwrap();
        eprintln!("wrote {}", path.display());
    }
    println!("{body}");
    agent.shutdown();
    tb.finish();
}
