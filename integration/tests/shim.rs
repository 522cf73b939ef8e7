//! hyperbox's shim (`io.containerd.hyperbox.v1`) against real containerd,
//! runc, the kernel and the real clients: what only this shim does (the
//! agent's policies at create, tracing from the first exec, failing open)
//! and the behaviours users notice when they swap runtimes (ctr's tty,
//! pause, update, metrics; OOM kills reported to CRI; containerd restarts;
//! a shim killed with -9). The conformance of everything else comes from
//! running the containerd-API, CRI, crictl and critest suites with
//! `HYPERBOX_TEST_SHIM=hyperbox` (scripts/test.sh).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hyperbox_integration::agent::{ADAPTIVE, AgentDaemon, memory_limit};
use hyperbox_integration::client::{Client, ContainerOptions, Image, RUNC_RUNTIME};
use hyperbox_integration::cri::{ContainerSpec, PodNetwork};
use hyperbox_integration::image::ImageSpec;
use hyperbox_integration::prereq::Prereq;
use hyperbox_integration::shim::{HYPERBOX_HANDLER, HYPERBOX_RUNTIME, HYPERBOX_SHIM_BINARY};
use hyperbox_integration::testbed::Testbed;
use hyperbox_integration::{gobin, procs, require, require_containers};
use nix::sys::signal::Signal;

const MIB: u64 = 1 << 20;

/// The guest of `the_shims_tests_pass_on_a_pure_cgroup_v2_node` keeps both
/// cores busy for minutes: it runs alone (write), the other tests of this
/// file beside each other (read), so their timeouts stay honest.
static HOST: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn hyperbox(args: &[&str]) -> ContainerOptions {
    ContainerOptions {
        runtime: Some(HYPERBOX_RUNTIME.into()),
        ..ContainerOptions::args(args)
    }
}

/// The pid of the shim serving a container's init (its parent).
fn shim_of(pid: u32) -> i32 {
    procs::read(pid as i32)
        .expect("the container's init runs")
        .ppid
}

/// The busybox sleeper image, pushed and pulled into containerd's
/// overlayfs through the API.
async fn sleeper(tb: &Testbed) -> (Client, Image) {
    tb.sleeper_image().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_runs_through_the_hyperbox_shim() {
    let _host = HOST.read().await;
    require_containers!();
    let tb = Testbed::start_with(|b| b.without_cri()).await;
    let (client, image) = sleeper(&tb).await;
    let out = client
        .run(
            "via-hyperbox",
            &image,
            &hyperbox(&["sh", "-c", "echo out; echo err >&2; exit 5"]),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), "out\n");
    assert_eq!(out.stderr_str(), "err\n");
    assert_eq!(out.status, 5);

    // The container's init really is a child of hyperbox's shim.
    // A TERM handler: as PID 1 of its namespace the workload only dies of
    // the signals it handles (or SIGKILL).
    let c = client
        .create_container(
            "served",
            &image,
            &hyperbox(&["sh", "-c", "trap 'exit 143' TERM; sleep 3600 & wait"]),
        )
        .await
        .unwrap();
    let task = c.start().await.unwrap();
    let exe = std::fs::read_link(format!("/proc/{}/exe", shim_of(task.pid()))).unwrap();
    assert!(exe.ends_with(HYPERBOX_SHIM_BINARY), "{}", exe.display());
    let out = task.exec(&["sh", "-c", "echo $((6*7))"]).await.unwrap();
    assert_eq!(out.stdout_str(), "42\n");
    task.kill(15).await.unwrap();
    assert_eq!(task.wait_output().await.unwrap().status, 128 + 15);
    c.delete().await.unwrap();
    tb.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_limit_is_in_the_spec_and_tracing_sees_the_first_exec() {
    let _host = HOST.read().await;
    require_containers!();
    require!(Prereq::Psi);
    let tb = Testbed::start().await;
    let mut agent = AgentDaemon::new(&tb.containerd.nri_socket(), ADAPTIVE);
    // ctr/nerdctl containers are keyed by containerd namespace.
    agent.seed_history("containerd:default/shim-web", &[20 * MIB]);
    agent.start_again().await;
    tb.containerd.use_agent(&agent.config_path()).unwrap();

    let (client, image) = sleeper(&tb).await;
    let mut opts = hyperbox(&["sh", "-c", "echo started; exec sleep 3600"]);
    opts.annotations
        .insert("hyperbox.dev/workload".into(), "shim-web".into());
    let c = client
        .create_container("web-1", &image, &opts)
        .await
        .unwrap();
    let task = c.start().await.unwrap();

    // The limit was decided before runc create (via "spec") and is in
    // the container's cgroup: 1.15 to 1.5 times the learned 20 MiB.
    let e = agent.explain("web-1");
    assert_eq!(e["container"]["source"], "local", "{e}");
    let d = &e["decisions"][0];
    assert_eq!(d["action"], "create", "{e}");
    assert_eq!(d["via"], "spec", "{e}");
    let set = d["to"].as_u64().unwrap();
    assert!((23 * MIB..=30 * MIB).contains(&set), "{e}");
    let cgroups_path = format!("{}/web-1", tb.containerd.cgroup_prefix());
    let in_cgroup = memory_limit(&cgroups_path).expect("a limit in the cgroup");
    assert!(set - in_cgroup < 4096, "cgroup {in_cgroup}, agent {set}");

    // Tracing was in place before `runc start`: the workload's own first
    // exec (sh, then sleep) is in the trace.
    let api = hyperbox_api::client::Client::new(agent.address());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let trace = api.trace("web-1").await;
        let seen = trace.as_ref().is_ok_and(|t| {
            t.execs.iter().any(|x| x.path.ends_with("/sh"))
                && t.execs
                    .iter()
                    .any(|x| x.args.first().is_some_and(|a| a == "sleep"))
        });
        if seen {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no exec of sh and sleep traced: {trace:?}\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The run ends: delete tells the agent, which learns it.
    task.kill(9).await.unwrap();
    task.wait_output().await.unwrap();
    c.delete().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.learned_runs("containerd:default/shim-web").len() < 2 {
        assert!(
            Instant::now() < deadline,
            "run not learned:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(agent.shutdown().is_empty());
    tb.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_or_hung_agent_never_blocks_a_container_unless_configured_to() {
    let _host = HOST.read().await;
    require_containers!();
    let tb = Testbed::start_with(|b| b.without_cri()).await;
    let agent = AgentDaemon::start(&tb.containerd.nri_socket(), ADAPTIVE).await;
    tb.containerd.use_agent(&agent.config_path()).unwrap();
    let (client, image) = sleeper(&tb).await;
    let journal = agent.address().parent().unwrap().join("shim-skipped.log");

    // Hung: every call times out after shim.agent_timeout_ms (200 ms);
    // the container runs with the spec it had.
    agent.signal(Signal::SIGSTOP);
    let start = Instant::now();
    let out = client
        .run("while-hung", &image, &hyperbox(&["echo", "ran"]))
        .await
        .unwrap();
    let took = start.elapsed();
    agent.signal(Signal::SIGCONT);
    // The registration after start is not waited for: let its timeout pass.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(out.stdout_str(), "ran\n");
    assert_eq!(out.status, 0);
    eprintln!("run with a stopped agent took {took:?}");
    let skipped = std::fs::read_to_string(&journal).unwrap();
    assert!(skipped.contains("default/while-hung policy:"), "{skipped}");
    assert!(
        skipped.contains("default/while-hung register:"),
        "{skipped}"
    );
    // The agent counts them, once it answers again.
    let (_, metrics) = agent.http_get("/metrics").await.unwrap();
    let counted: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("hyperbox_shim_policy_skipped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no skip counter in:\n{metrics}"));
    assert_eq!(counted as usize, skipped.lines().count(), "{skipped}");
    assert!(counted >= 2.0, "{metrics}");

    // Fail closed: the same situation refuses the container, and says why.
    let mut cfg = std::fs::read_to_string(agent.config_path()).unwrap();
    cfg.push_str("\n[shim]\nfail_closed = true\nagent_timeout_ms = 100\n");
    let closed = tb.containerd.shim_config_path();
    std::fs::write(&closed, &cfg).unwrap();
    agent.signal(Signal::SIGSTOP);
    let refused = client
        .run("refused", &image, &hyperbox(&["echo", "never"]))
        .await;
    agent.signal(Signal::SIGCONT);
    let err = format!("{:?}", refused.expect_err("fail_closed refuses"));
    assert!(err.contains("fail_closed"), "{err}");

    // A broken config file is an error that names the key, not a guess.
    std::fs::write(&closed, "[shim]\nagent_timeot_ms = 5\n").unwrap();
    let bad = client
        .run("bad-config", &image, &hyperbox(&["echo", "never"]))
        .await;
    let err = format!("{:?}", bad.expect_err("a bad config refuses"));
    assert!(err.contains("agent_timeot_ms"), "{err}");
    assert!(agent.shutdown().is_empty());
    tb.finish();
}

/// The `ctr` of the instance's containerd line.
fn ctr_bin(tb: &Testbed) -> PathBuf {
    hyperbox_integration::ctr::bin(&tb.containerd)
}

fn ctr_pull(tb: &Testbed, reference: &str) {
    hyperbox_integration::ctr::pull(&tb.containerd, reference)
}

fn isolated(tb: &Testbed, args: &[&str]) -> Vec<String> {
    hyperbox_integration::ctr::isolated(&tb.containerd, args)
}

/// Runs the real `ctr` against the instance; stdout, or a panic with
/// stderr.
fn ctr(tb: &Testbed, args: &[&str]) -> String {
    hyperbox_integration::ctr::run(&tb.containerd, args)
}

/// `ctr args` under a pseudo-terminal (`script`), as a user at a shell
/// runs `ctr run -t`; returns what the terminal showed.
fn ctr_tty(tb: &Testbed, args: &[&str]) -> String {
    let mut line = format!(
        "{} --address {}",
        gobin::ctr().display(),
        tb.containerd.address().display()
    );
    for a in isolated(tb, args) {
        line.push_str(&format!(" '{a}'"));
    }
    let out = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{line}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctr_runs_pauses_updates_and_measures_through_the_shim() {
    let _host = HOST.read().await;
    require_containers!();
    let tb = Testbed::start_with(|b| b.without_cri()).await;
    let reference = tb.push_sleeper().await;
    ctr_pull(&tb, &reference);

    let out = ctr(
        &tb,
        &[
            "run",
            "--rm",
            "--runtime",
            HYPERBOX_RUNTIME,
            &reference,
            "once",
            "sh",
            "-c",
            "echo hi from ctr",
        ],
    );
    assert_eq!(out, "hi from ctr\n");
    // A terminal: the process sees a tty and its size.
    let out = ctr_tty(
        &tb,
        &[
            "run",
            "--rm",
            "-t",
            "--runtime",
            HYPERBOX_RUNTIME,
            &reference,
            "tty",
            "sh",
            "-c",
            "tty; stty size",
        ],
    );
    assert!(out.contains("/dev/pts/0"), "{out:?}");
    // A program that is not there: runc's reason reaches the user, worded
    // as runc-v2 words it, and nothing is left behind.
    for runtime in [RUNC_RUNTIME, HYPERBOX_RUNTIME] {
        let out = hyperbox_integration::ctr::output(
            &tb.containerd,
            &[
                "run",
                "--rm",
                "--runtime",
                runtime,
                &reference,
                "nope",
                "/no/such/program",
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{runtime}: {err}");
        assert!(
            err.contains("OCI runtime create failed: runc create failed")
                && err.contains("/no/such/program")
                && err.contains("no such file or directory"),
            "{runtime}: {err}"
        );
        let _ = hyperbox_integration::ctr::output(&tb.containerd, &["container", "rm", "nope"]);
    }

    ctr(
        &tb,
        &[
            "run",
            "-d",
            "--runtime",
            HYPERBOX_RUNTIME,
            &reference,
            "long",
            "sleep",
            "3600",
        ],
    );
    let ps = ctr(&tb, &["task", "ps", "long"]);
    assert_eq!(ps.lines().count(), 2, "one process: {ps}");
    ctr(&tb, &["task", "pause", "long"]);
    let ls = ctr(&tb, &["task", "ls"]);
    assert!(ls.contains("PAUSED"), "{ls}");
    ctr(&tb, &["task", "resume", "long"]);
    assert!(ctr(&tb, &["task", "ls"]).contains("RUNNING"));
    // Stats: the container's own cgroup, with its pids.
    let metrics = ctr(&tb, &["task", "metrics", "--format", "json", "long"]);
    let m: serde_json::Value = serde_json::from_str(&metrics).unwrap();
    assert_eq!(m["pids"]["current"], 1, "{metrics}");
    let usage = m["memory"]["usage"]["usage"]
        .as_u64()
        .or_else(|| m["memory"]["usage"].as_u64())
        .unwrap_or(0);
    assert!(usage > 0, "{metrics}");
    let out = ctr_tty(
        &tb,
        &[
            "task",
            "exec",
            "-t",
            "--exec-id",
            "t1",
            "long",
            "sh",
            "-c",
            "tty",
        ],
    );
    assert!(out.contains("/dev/pts/"), "{out:?}");
    // An exec of a program that is not there: runc's reason, worded as
    // runc-v2 words it, and the container runs on.
    let out = hyperbox_integration::ctr::output(
        &tb.containerd,
        &[
            "task",
            "exec",
            "--exec-id",
            "bad",
            "long",
            "/no/such/program",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("OCI runtime exec failed") && err.contains("/no/such/program"),
        "{err}"
    );
    assert!(ctr(&tb, &["task", "ls"]).contains("RUNNING"));
    let out = ctr(
        &tb,
        &[
            "task",
            "exec",
            "--exec-id",
            "good",
            "long",
            "echo",
            "still here",
        ],
    );
    assert_eq!(out, "still here\n");

    // Attach: a later client reads what the container writes now.
    ctr(
        &tb,
        &[
            "run",
            "-d",
            "--runtime",
            HYPERBOX_RUNTIME,
            &reference,
            "ticker",
            "sh",
            "-c",
            "while true; do echo tick; sleep 0.2; done",
        ],
    );
    // KILL: ctr forwards other signals to the container, whose PID 1
    // ignores them.
    let attach_for = hyperbox_integration::vm::stretched(Duration::from_secs(2));
    let attach = Command::new("timeout")
        .args(["-s", "KILL", &attach_for.as_secs().to_string()])
        .arg(ctr_bin(&tb))
        .arg("--address")
        .arg(tb.containerd.address())
        .args(["task", "attach", "ticker"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let seen = String::from_utf8_lossy(&attach.stdout);
    assert!(seen.contains("tick\n"), "attach saw {seen:?}");
    ctr(&tb, &["task", "kill", "-s", "SIGKILL", "ticker"]);
    ctr(&tb, &["task", "kill", "-s", "SIGKILL", "long"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ctr(&tb, &["task", "ls"]).contains("STOPPED") {
        assert!(Instant::now() < deadline, "not stopped");
        std::thread::sleep(Duration::from_millis(100));
    }
    for id in ["long", "ticker"] {
        ctr(&tb, &["task", "delete", "--force", id]);
        ctr(&tb, &["containers", "delete", id]);
    }
    tb.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_kill_reaches_cri_as_oomkilled() {
    let _host = HOST.read().await;
    require_containers!();
    let tb = Testbed::start().await;
    let hog = ImageSpec::busybox(&["sh", "-c", "tail /dev/zero"]).unwrap();
    let image = tb.push(&hog, "test/hog", "v1").await;
    let cri = tb.containerd.cri().await.unwrap();
    cri.pull_image(&image).await.unwrap();
    let pod = cri
        .run_pod_on("oom", PodNetwork::Host, HYPERBOX_HANDLER)
        .await
        .unwrap();
    // UpdateContainerResources reaches runc through the shim.
    let sized = cri
        .create_container(
            &pod,
            &ContainerSpec::new("sized", &image, &["sleep", "3600"]),
        )
        .await
        .unwrap();
    cri.start_container(&sized).await.unwrap();
    cri.update_memory_limit(&sized, 64 * MIB as i64)
        .await
        .unwrap();
    let state = tb
        .containerd
        .dir()
        .join("runc/k8s.io")
        .join(&sized)
        .join("state.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let pid = v["init_process_pid"].as_u64().unwrap();
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mem = cg
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
        .or_else(|| {
            cg.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        })
        .expect("the container's memory cgroup");
    assert_eq!(memory_limit(&mem), Some(64 * MIB));
    cri.remove_container(&sized).await.unwrap();

    let mut spec = ContainerSpec::new("hog", &image, &[]);
    spec.memory_limit = 32 * MIB as i64;
    let id = cri.create_container(&pod, &spec).await.unwrap();
    cri.start_container(&id).await.unwrap();
    let code = cri.wait_exited(&id, Duration::from_secs(60)).await.unwrap();
    let st = cri.container_status(&id).await.unwrap();
    assert_eq!(st.reason, "OOMKilled", "exit {code}: {st:?}");
    assert_eq!(code, 137);
    cri.remove_container(&id).await.unwrap();
    cri.remove_pod(&pod).await.unwrap();
    tb.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_survive_a_containerd_restart_and_a_killed_shim_is_cleaned_up() {
    let _host = HOST.read().await;
    require_containers!();
    let mut tb = Testbed::start_with(|b| b.without_cri()).await;
    let (client, image) = sleeper(&tb).await;
    let c = client
        .create_container("kept", &image, &hyperbox(&["sleep", "3600"]))
        .await
        .unwrap();
    let task = c.start().await.unwrap();
    let pid = task.pid();

    // containerd restarts; the shim and the container do not.
    tb.containerd.restart().await.unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let out = ctr(
        &tb,
        &[
            "task",
            "exec",
            "--exec-id",
            "after",
            "kept",
            "echo",
            "reattached",
        ],
    );
    assert_eq!(out, "reattached\n");
    let ls = ctr(&tb, &["task", "ls"]);
    assert!(
        ls.contains(&pid.to_string()) && ls.contains("RUNNING"),
        "{ls}"
    );

    // The shim is killed with -9: containerd runs `shim delete`, which
    // removes runc's state and the rootfs mount, and reports the exit.
    // The init's parent must be its shim: were the shim gone already, the
    // init would have been handed to this test (a subreaper), and the
    // kill would end the test itself without a word.
    let shim = shim_of(pid);
    let cmdline = std::fs::read(format!("/proc/{shim}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default();
    assert!(
        shim > 1 && shim != std::process::id() as i32 && cmdline.contains(HYPERBOX_SHIM_BINARY),
        "the container's init {pid} has parent {shim} ({cmdline:?}), not its shim\n{}",
        tb.containerd.log()
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), Signal::SIGKILL).unwrap();
    let state = tb.containerd.dir().join("runc/default/kept/state.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ls = ctr(&tb, &["task", "ls"]);
        if !state.exists() && !ls.contains("kept") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the shim died: {ls}\nrunc state left: {}\n{}",
            state.exists(),
            tb.containerd.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Gone, or a zombie of ours (the test is the subreaper the orphaned
    // init was handed to).
    assert!(
        !procs::alive(pid as i32),
        "the container died with its shim's cleanup"
    );
    procs::reap_zombie_children("");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains("/kept/rootfs"), "rootfs still mounted");
    // containerd hides a task whose shim is gone (`task ls`, Get) at once
    // but drops it only once its cleanup is over; a Delete in between
    // drops it and still answers with the closed connection, for runc-v2
    // as for any shim (seen on the slower guest). A user's second
    // `ctr task rm` is clean; so is ours.
    let mut deleted = c.delete().await;
    if deleted
        .as_ref()
        .is_err_and(|e| e.to_string().contains("ttrpc: closed"))
    {
        deleted = c.delete().await;
    }
    deleted.unwrap();
    tb.finish();
}

#[test]
fn info_reports_the_runtime_and_runcs_features_as_containerd_2_asks() {
    let _host = HOST.blocking_read();
    require!(Prereq::Runc);
    use containerd_shim::protos::protobuf::Message;
    use containerd_shim::protos::types::introspection::RuntimeInfo;
    let bin = hyperbox_integration::binaries::shim_for_nodes(HYPERBOX_SHIM_BINARY);
    let out = Command::new(bin)
        .arg("-info")
        .stdin(std::process::Stdio::null())
        .env_remove("HYPERBOX_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = RuntimeInfo::parse_from_bytes(&out.stdout).unwrap();
    assert_eq!(info.name, HYPERBOX_RUNTIME);
    let features: serde_json::Value = serde_json::from_slice(&info.features.value).unwrap();
    assert!(features["ociVersionMax"].is_string(), "{features}");
    assert!(
        features["mountOptions"]
            .as_array()
            .is_some_and(|m| !m.is_empty()),
        "{features}"
    );
}

/// The tests of this file that the pure cgroup v2 guest runs again.
const ON_PURE_CGROUP_V2: &[&str] = &[
    "a_container_runs_through_the_hyperbox_shim",
    "the_agents_limit_is_in_the_spec_and_tracing_sees_the_first_exec",
    "ctr_runs_pauses_updates_and_measures_through_the_shim",
    "an_oom_kill_reaches_cri_as_oomkilled",
    "containers_survive_a_containerd_restart_and_a_killed_shim_is_cleaned_up",
];

/// This host is cgroup v1 with an empty v2 hierarchy beside it (hybrid);
/// many nodes are pure cgroup v2, where limits, OOM events, the freezer
/// and stats all go through other files. The shim's own tests run again
/// on such a node: a guest booting Debian's 6.12 kernel, whose init
/// mounts only cgroup2 (see `hyperbox_integration::vm`).
#[test]
fn the_shims_tests_pass_on_a_pure_cgroup_v2_node() {
    if hyperbox_integration::vm::inside() {
        return; // the guest runs the tests above, not this one
    }
    require!(Prereq::Root, Prereq::Vm("6.12."));
    let _alone = HOST.blocking_write();
    let kernel = hyperbox_integration::vm::kernels("6.12.").remove(0);
    // The guest cannot build: everything the tests start is built now.
    for bin in ["hyperbox-snapshotter", "hyperbox-nri", "hb"] {
        hyperbox_integration::binaries::path(bin);
    }
    hyperbox_integration::binaries::shim_for_nodes(HYPERBOX_SHIM_BINARY);
    hyperbox_integration::vm::run_own_tests(
        &kernel,
        "shim",
        "test -f /sys/fs/cgroup/cgroup.controllers; \
         if grep -q ' cgroup ' /proc/mounts; then echo 'cgroup v1 mounted'; exit 90; fi; \
         echo PURE_CGROUP_V2 $(uname -r)",
        "PURE_CGROUP_V2",
        ON_PURE_CGROUP_V2,
        false,
    );
}

/// The node build packs its relocations (.cargo/config.toml): without it
/// every shim maps a 350 KiB relocation table for its whole life, and a
/// `RUSTFLAGS` in the environment would silently drop the flag.
#[test]
fn the_node_build_packs_its_relocations() {
    let _host = HOST.blocking_read();
    let bin = hyperbox_integration::binaries::shim_for_nodes(HYPERBOX_SHIM_BINARY);
    let out = Command::new("readelf")
        .arg("-d")
        .arg(&bin)
        .output()
        .unwrap();
    let dynamic = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "readelf -d {}", bin.display());
    assert!(
        dynamic.contains("(RELR)"),
        "{} has no packed relocations:\n{dynamic}",
        bin.display()
    );
}
