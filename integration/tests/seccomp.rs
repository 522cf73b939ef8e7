//! Learned seccomp profiles end to end, against real containerd, runc,
//! the kernel's seccomp and audit, and the agent: real programs of three
//! kinds learned over runs and then enforced with no false denial, a
//! syscall never learned denied with EPERM and reported, complain mode
//! reporting without denying, `auto` switching after the stability
//! threshold on a CRI pod, a profile libseccomp refuses never installed,
//! and the agent away at create leaving the runtime's profile in place.
//!
//! Containers run on hyperbox's shim (the path that reaches every client
//! and both containerd lines); the CRI test also exercises NRI's seccomp
//! adjustment where containerd has it (2.2 and later).

use std::collections::BTreeSet;
use std::time::Duration;

use hyperbox_api::types::{ProfileDetail, ProfileDiff, ProfileSummary};
use hyperbox_integration::agent::AgentDaemon;
use hyperbox_integration::client::{Client, ContainerOptions, Image};
use hyperbox_integration::containerd::Line;
use hyperbox_integration::cri::{ContainerSpec, PodNetwork};
use hyperbox_integration::prereq::Prereq;
use hyperbox_integration::shim::{HYPERBOX_HANDLER, HYPERBOX_RUNTIME};
use hyperbox_integration::testbed::Testbed;
use hyperbox_integration::workload::{PYTHON_IO, SHELL_PIPELINE, WEB_SERVER};
use hyperbox_integration::{distro, require, require_containers};

/// Agent config: `auto` enforces after 2 stable runs, at once.
const SECCOMP: &str = "[memory]\ndefault_policy = \"observe\"\n\n[seccomp]\nauto_stable_runs = 2\nauto_min_learn_secs = 0\n";

const MODE: &str = "seccomp.hyperbox.dev/mode";
const WORKLOAD: &str = "hyperbox.dev/workload";

fn api(agent: &AgentDaemon) -> hyperbox_api::client::Client {
    hyperbox_api::client::Client::new(agent.address())
}

async fn detail(agent: &AgentDaemon, workload: &str) -> ProfileDetail {
    api(agent)
        .get(&format!("/v1/profiles?workload={workload}"))
        .await
        .unwrap_or_else(|e| panic!("profile of {workload}: {e}\nagent log:\n{}", agent.log()))
}

/// A container on hyperbox's shim running `sh -c script` (or `args`), in
/// seccomp `mode`, keyed as workload `name`.
fn opts(name: &str, mode: &str, args: &[&str]) -> ContainerOptions {
    let mut o = ContainerOptions {
        runtime: Some(HYPERBOX_RUNTIME.into()),
        ..ContainerOptions::args(args)
    };
    o.annotations.insert(MODE.into(), mode.into());
    o.annotations.insert(WORKLOAD.into(), name.into());
    o
}

/// Runs a container to its end; returns (exit status, stdout, stderr).
async fn run(
    client: &Client,
    image: &Image,
    id: &str,
    o: &ContainerOptions,
) -> (u32, String, String) {
    let out = client.run(id, image, o).await.unwrap();
    (out.status, out.stdout_str(), out.stderr_str())
}

async fn busybox(tb: &Testbed) -> (Client, Image) {
    tb.sleeper_image().await
}

/// The agent, with the shim pointed at it.
async fn agent_for(tb: &Testbed, extra: &str) -> AgentDaemon {
    let agent = AgentDaemon::start(&tb.containerd.nri_socket(), extra).await;
    tb.containerd.use_agent(&agent.config_path()).unwrap();
    agent
}

/// The count of a metric family's series matching every `labels` pair.
async fn metric_sum(agent: &AgentDaemon, family: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, body) = agent.http_get("/metrics").await.unwrap();
    body.lines()
        .filter(|l| l.starts_with(family))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_real_programs_are_learned_then_enforced_with_no_false_denial() {
    require_containers!();
    require!(Prereq::Psi, Prereq::Bpftool);
    let tb = Testbed::start_with(|b| b.without_cri()).await;
    let agent = agent_for(&tb, SECCOMP).await;
    let (client, bb) = busybox(&tb).await;
    let trees = distro::python_trees().expect("the Debian + Python image");
    let py_ref = tb.push(&trees.image(), "test/python", "v1").await;
    let (_, py) = tb.image_in_overlayfs(&py_ref).await;

    let programs: [(&str, &Image, Vec<&str>); 3] = [
        ("sc-web", &bb, vec!["sh", "-c", WEB_SERVER]),
        ("sc-pipe", &bb, vec!["sh", "-c", SHELL_PIPELINE]),
        ("sc-python", &py, vec!["python3", "-c", PYTHON_IO]),
    ];
    const LEARN_RUNS: usize = 3;
    const ENFORCED_RUNS: usize = 5;
    let mut expected = Vec::new();
    for (name, image, args) in &programs {
        let mut first = None;
        for i in 0..LEARN_RUNS {
            let (status, out, err) = run(
                &client,
                image,
                &format!("{name}-l{i}"),
                &opts(name, "learn", args),
            )
            .await;
            assert_eq!(status, 0, "{name} learning run {i}: {out}{err}");
            first.get_or_insert(out.clone());
            assert_eq!(
                first.as_deref(),
                Some(out.as_str()),
                "{name} is deterministic"
            );
        }
        expected.push(first.unwrap());
    }
    let default_allowed = 300; // containerd's default profile allows about this many
    for (name, _, _) in &programs {
        let key = format!("containerd:default/{name}");
        let d = detail(&agent, &key).await;
        assert_eq!(d.summary.runs, LEARN_RUNS as u32, "{name}: {:?}", d.summary);
        assert!(
            d.summary.syscalls >= 20 && d.summary.syscalls < default_allowed / 2,
            "{name}: {} syscalls learned",
            d.summary.syscalls
        );
        // Learned from the workload's first exec on: runc's own setup
        // (pivot_root, mount, sethostname…) is not in the profile.
        for runc_only in ["pivot_root", "mount", "sethostname", "unshare"] {
            assert!(
                !d.syscalls.iter().any(|s| s == runc_only),
                "{name} learned {runc_only}"
            );
        }
    }
    let web = detail(&agent, "containerd:default/sc-web").await;
    for s in ["bind", "listen", "accept", "connect"] {
        assert!(
            web.syscalls.iter().any(|x| x == s),
            "web lacks {s}: {:?}",
            web.syscalls
        );
    }
    let python = detail(&agent, "containerd:default/sc-python").await;
    assert!(
        python.syscalls.iter().any(|x| x == "socket"),
        "{:?}",
        python.syscalls
    );

    let installs_before = metric_sum(
        &agent,
        "hyperbox_seccomp_decisions_total",
        &[("mode", "enforce"), ("action", "install")],
    )
    .await;
    for ((name, image, args), want) in programs.iter().zip(&expected) {
        for i in 0..ENFORCED_RUNS {
            let id = format!("{name}-e{i}");
            let (status, out, err) = run(&client, image, &id, &opts(name, "enforce", args)).await;
            assert_eq!(
                status,
                0,
                "{name} enforced run {i} failed: {out}{err}\nagent log:\n{}",
                agent.log()
            );
            assert_eq!(&out, want, "{name} enforced run {i}");
        }
        let d = detail(&agent, &format!("containerd:default/{name}")).await;
        assert!(
            d.reports.is_empty(),
            "{name} false denials: {:?}",
            d.reports
        );
        assert!(d.review.is_empty(), "{name}: {:?}", d.review);
    }
    let installs = metric_sum(
        &agent,
        "hyperbox_seccomp_decisions_total",
        &[("mode", "enforce"), ("action", "install")],
    )
    .await;
    assert_eq!(
        installs - installs_before,
        (3 * ENFORCED_RUNS) as f64,
        "every enforced run got its profile"
    );
    assert_eq!(
        metric_sum(&agent, "hyperbox_seccomp_reports_total", &[]).await,
        0.0
    );

    // Each profile is far smaller than the runtime's default.
    let diff: ProfileDiff = api(&agent)
        .get("/v1/profiles/diff?a=containerd:default/sc-pipe&b=containerd:default/sc-web")
        .await
        .unwrap();
    assert!(diff.both > 0);
    assert!(agent.shutdown().is_empty());
    tb.finish();
}

/// Learns `sh -c LEARNED` as workload `name` twice, then runs `sh -c
/// RUN` in `mode`; returns the run's output and the workload's reports.
async fn learn_then(
    tb: &Testbed,
    agent: &AgentDaemon,
    name: &str,
    mode: &str,
    run_script: &str,
) -> ((u32, String, String), ProfileDetail) {
    let (client, image) = busybox(tb).await;
    const LEARNED: &str =
        "echo start; unshare --help >/dev/null 2>&1; uname --help >/dev/null 2>&1; echo done";
    for i in 0..2 {
        let (status, out, err) = run(
            &client,
            &image,
            &format!("{name}-l{i}"),
            &opts(name, "learn", &["sh", "-c", LEARNED]),
        )
        .await;
        assert_eq!((status, out.as_str()), (0, "start\ndone\n"), "{err}");
    }
    let out = run(
        &client,
        &image,
        &format!("{name}-x"),
        &opts(name, mode, &["sh", "-c", run_script]),
    )
    .await;
    // Reports come from the kernel's audit, asynchronously.
    let key = format!("containerd:default/{name}");
    let mut d = detail(agent, &key).await;
    for _ in 0..50 {
        if !d.reports.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        d = detail(agent, &key).await;
    }
    (out, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syscall_never_learned_fails_with_eperm_under_enforce_and_is_reported() {
    require_containers!();
    require!(Prereq::Psi, Prereq::Bpftool);
    let tb = Testbed::start_with(|b| b.without_cri()).await;
    // A 1 s counting window: the denial comes after it, when only the
    // exit hook still watches the container.
    let agent = agent_for(
        &tb,
        &format!("{SECCOMP}\n[tracing]\nsyscall_window_secs = 1\n"),
    )
    .await;
    let ((status, out, err), d) = learn_then(
        &tb,
        &agent,
        "sc-deny",
        "enforce",
        "echo start; sleep 2; unshare -U true; echo rc=$?; echo done",
    )
    .await;
    assert_eq!(status, 0, "{out}{err}");
    assert_eq!(out, "start\nrc=1\ndone\n", "{err}");
    assert!(
        err.contains("Operation not permitted"),
        "unshare must fail with EPERM: {err}"
    );
    let r = d
        .reports
        .iter()
        .find(|r| r.syscall == "unshare")
        .unwrap_or_else(|| panic!("unshare not reported: {:?}\n{}", d.reports, agent.log()));
    assert_eq!(
        (r.outcome.as_str(), r.arch.as_str(), r.comm.as_str()),
        ("denied", "x86_64", "unshare")
    );
    assert_eq!(d.review.get("unshare"), Some(&1), "counted for review");
    assert!(
        !d.syscalls.iter().any(|s| s == "unshare"),
        "never learned from an enforced run"
    );
    assert!(agent.log().contains("syscall outside the seccomp profile"));
    // The exit hook is attached only while an enforced container runs.
    let health = agent.health().await.unwrap();
    assert_eq!(health["tracing_refusal_hook_attached"], false, "{health}");
    assert_eq!(
        metric_sum(
            &agent,
            "hyperbox_seccomp_reports_total",
            &[("syscall", "unshare"), ("outcome", "denied")]
        )
        .await,
        1.0
    );
    assert!(agent.shutdown().is_empty());
    tb.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complain_reports_what_enforce_would_deny_without_denying_it() {
    require_containers!();
    require!(Prereq::Psi, Prereq::Bpftool);
    let tb = Testbed::start_with(|b| b.without_cri()).await;
    let agent = agent_for(&tb, SECCOMP).await;
    // nproc(1) asks sched_getaffinity, which the learned runs never did.
    let ((status, out, err), d) = learn_then(
        &tb,
        &agent,
        "sc-complain",
        "complain",
        "echo start; nproc >/dev/null && echo ok; echo done",
    )
    .await;
    assert_eq!((status, out.as_str()), (0, "start\nok\ndone\n"), "{err}");
    let r = d
        .reports
        .iter()
        .find(|r| r.syscall == "sched_getaffinity")
        .unwrap_or_else(|| {
            panic!(
                "sched_getaffinity not reported: {:?}\n{}",
                d.reports,
                agent.log()
            )
        });
    // From the kernel's audit record (with the caller), or from the
    // tracer's count when the container ended first (without).
    assert_eq!(r.outcome, "allowed");
    assert!(r.comm == "nproc" || r.comm.is_empty(), "{r:?}");
    assert!(
        !d.syscalls.iter().any(|s| s == "sched_getaffinity"),
        "reported, not learned"
    );
    assert!(agent.shutdown().is_empty());
    tb.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_libseccomp_refuses_is_never_installed_and_the_agent_away_changes_nothing() {
    require_containers!();
    require!(Prereq::Psi, Prereq::Bpftool);
    let tb = Testbed::start_with(|b| b.without_cri()).await;
    let mut agent = agent_for(&tb, SECCOMP).await;
    let (client, image) = busybox(&tb).await;
    let o = opts(
        "sc-bad",
        "enforce",
        &["sh", "-c", "grep Seccomp: /proc/self/status"],
    );
    for i in 0..2 {
        let (status, out, _) = run(
            &client,
            &image,
            &format!("sc-bad-l{i}"),
            &opts(
                "sc-bad",
                "learn",
                &["sh", "-c", "grep Seccomp: /proc/self/status"],
            ),
        )
        .await;
        assert_eq!(
            (status, out.as_str()),
            (0, "Seccomp:\t0\n"),
            "ctr gives no profile; learning adds none"
        );
    }
    // A store edited by hand (or by a bug) with a name libseccomp does
    // not know: the profile must not reach runc.
    agent.kill(nix::sys::signal::Signal::SIGTERM);
    let store = agent.state_dir().join("seccomp.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&store).unwrap()).unwrap();
    v["profiles"]["containerd:default/sc-bad"]["syscalls"]
        .as_array_mut()
        .unwrap()
        .push("not_a_syscall".into());
    std::fs::write(&store, serde_json::to_vec(&v).unwrap()).unwrap();
    agent.start_again().await;
    let (status, out, err) = run(&client, &image, "sc-bad-e", &o).await;
    assert_eq!(
        (status, out.as_str()),
        (0, "Seccomp:\t0\n"),
        "not installed: {err}"
    );
    assert!(
        agent.log().contains("refused by libseccomp"),
        "{}",
        agent.log()
    );
    assert_eq!(
        metric_sum(&agent, "hyperbox_seccomp_profile_rejected_total", &[]).await,
        1.0
    );

    // The agent away: the container runs with the spec it was given.
    agent.kill(nix::sys::signal::Signal::SIGKILL);
    let (status, out, err) = run(
        &client,
        &image,
        "sc-bad-away",
        &opts(
            "sc-bad",
            "enforce",
            &["sh", "-c", "grep Seccomp: /proc/self/status"],
        ),
    )
    .await;
    assert_eq!((status, out.as_str()), (0, "Seccomp:\t0\n"), "{err}");
    tb.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_annotated_auto_learns_then_enforces() {
    require_containers!();
    require!(Prereq::Psi, Prereq::Bpftool);
    let tb = Testbed::start().await;
    let agent = agent_for(&tb, SECCOMP).await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    let reference = tb.push_sleeper().await;
    let cri = tb.containerd.cri().await.unwrap();
    cri.pull_image(&reference).await.unwrap();
    // containerd 2.2+ takes the profile through NRI with runc's shim;
    // 1.7's NRI cannot set seccomp, so its pods run on hyperbox's.
    let handler = match tb.containerd.line() {
        Line::V1_7 => HYPERBOX_HANDLER,
        _ => "",
    };
    let script = "seq 1 300 | sort -rn | md5sum | cut -c1-8; grep -c . /etc/passwd; grep Seccomp: /proc/self/status";
    let mut modes = Vec::new();
    let mut outputs = BTreeSet::new();
    for i in 0..8 {
        let pod = cri
            .run_pod_on(&format!("auto-{i}"), PodNetwork::Host, handler)
            .await
            .unwrap();
        let mut spec = ContainerSpec::new("app", &reference, &["sh", "-c", script]);
        spec.annotations.insert(MODE.into(), "auto".into());
        spec.annotations.insert(WORKLOAD.into(), "auto-app".into());
        let id = cri.create_container(&pod, &spec).await.unwrap();
        cri.start_container(&id).await.unwrap();
        let code = cri.wait_exited(&id, Duration::from_secs(30)).await.unwrap();
        let logs = cri.logs(&pod, "app").await.unwrap();
        assert_eq!(code, 0, "run {i}: {logs}");
        let seccomp = logs.lines().last().unwrap_or_default().to_string();
        outputs.insert(logs.lines().take(2).collect::<Vec<_>>().join("\n"));
        modes.push(seccomp);
        cri.remove_container(&id).await.unwrap();
        cri.remove_pod(&pod).await.unwrap();
    }
    assert_eq!(
        outputs.len(),
        1,
        "the same output under every mode: {outputs:?}"
    );
    // Learning (no filter: the pod is Unconfined), then enforcing (filter)
    // once stable for 2 runs, and never back.
    let first_enforced = modes
        .iter()
        .position(|m| m.ends_with("2"))
        .unwrap_or_else(|| panic!("never enforced: {modes:?}\n{}", agent.log()));
    assert!((2..=6).contains(&first_enforced), "{modes:?}");
    assert!(
        modes[..first_enforced].iter().all(|m| m.ends_with("0")),
        "{modes:?}"
    );
    assert!(
        modes[first_enforced..].iter().all(|m| m.ends_with("2")),
        "{modes:?}"
    );
    let list: Vec<ProfileSummary> = api(&agent).get("/v1/profiles").await.unwrap();
    let p = list
        .iter()
        .find(|p| p.workload.ends_with("/auto-app"))
        .unwrap_or_else(|| panic!("{list:?}"));
    assert!(p.enforcing_since.is_some(), "{p:?}");
    let d = detail(&agent, &p.workload).await;
    assert!(d.reports.is_empty(), "{:?}", d.reports);
    // What an operator sees.
    let shown = agent.hb(&["profile", "show", &p.workload]);
    assert!(shown.contains("SCMP_ACT_ERRNO"), "{shown}");
    // Against containerd's default profile (the second side when none is
    // named), which the agent knows once a container with it has passed
    // (this pod was Unconfined): everything the workload needs is in the
    // default, which allows some hundreds more.
    let unseen = agent.hb_output(&["profile", "diff", &p.workload]);
    assert!(
        !unseen.status.success()
            && String::from_utf8_lossy(&unseen.stderr).contains("has not been seen yet"),
        "{unseen:?}"
    );
    hyperbox_integration::ctr::pull(&tb.containerd, &reference);
    // The agent takes a container whose cgroup ends in its id.
    let cgroup = format!("{}/with-default", tb.containerd.cgroup_prefix());
    hyperbox_integration::ctr::run(
        &tb.containerd,
        &[
            "run",
            "--rm",
            "--cgroup",
            &cgroup,
            "--seccomp",
            "--runtime",
            HYPERBOX_RUNTIME,
            &reference,
            "with-default",
            "true",
        ],
    );
    let diff: ProfileDiff =
        serde_json::from_str(&agent.hb(&["profile", "diff", &p.workload, "--json"])).unwrap();
    assert_eq!(diff.b, "default", "{diff:?}");
    assert!(diff.only_a.is_empty(), "{diff:?}");
    assert!(diff.both >= 8 && diff.only_b.len() >= 200, "{diff:?}");
    let text = agent.hb(&["profile", "diff", &p.workload]);
    assert!(text.contains("default"), "{text}");
    assert!(agent.shutdown().is_empty());
    tb.finish();
}
