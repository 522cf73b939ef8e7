//! The node agent (`hyperbox-nri`) against real containerd with NRI enabled,
//! on the line `HYPERBOX_CONTAINERD_LINE` selects (1.7.24, NRI v0.6.1; or
//! 2.4.2, NRI v0.12.3), driven through CRI as the kubelet drives it:
//! registration in both modes, limits read back from cgroupfs, learning
//! across runs, the adaptive raise under real memory pressure, restarts of
//! either side, a hung agent, hostile NRI peers, and a real Prometheus
//! scraping it. Where the lines differ (how the events arrive, what the
//! runtime says about itself) the tests assert each line's behaviour.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyperbox_integration::agent::{ADAPTIVE, AgentDaemon, memory_limit};
use hyperbox_integration::containerd::Line;
use hyperbox_integration::cri::{ContainerSpec, Cri, Pod, PodNetwork};
use hyperbox_integration::image::ImageSpec;
use hyperbox_integration::prereq::Prereq;
use hyperbox_integration::require;
use hyperbox_integration::testbed::Testbed;
use nix::sys::signal::Signal;

const MIB: u64 = 1 << 20;

/// Holds a 40 MiB buffer (dd's block, filled from /dev/zero) for 4 s.
const HOG: &[&str] = &[
    "sh",
    "-c",
    "dd if=/dev/zero bs=40M count=1 2>/dev/null | sleep 4",
];

macro_rules! require_agent {
    () => {
        require!(
            Prereq::Root,
            Prereq::Containerd,
            Prereq::Runc,
            Prereq::Registry,
            Prereq::Busybox,
            Prereq::Psi
        )
    };
}

fn spec(name: &str, image: &str, cmd: &[&str], policy: Option<&str>) -> ContainerSpec {
    let mut s = ContainerSpec::new(name, image, cmd);
    if let Some(p) = policy {
        s.annotations
            .insert("memory.hyperbox.dev/policy".into(), p.into());
    }
    s
}

/// Creates and starts a container; returns its id.
async fn run(cri: &Cri, pod: &Pod, spec: &ContainerSpec) -> String {
    let id = cri.create_container(pod, spec).await.unwrap();
    cri.start_container(&id).await.unwrap();
    id
}

async fn wait_learned(agent: &AgentDaemon, workload: &str, runs: usize) -> Vec<u64> {
    let start = Instant::now();
    loop {
        let got = agent.learned_runs(workload);
        if got.len() >= runs {
            return got;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "agent learned {got:?} for {workload}, wanted {runs} run(s); log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn external_agent_learns_a_workload_and_sizes_its_next_run_in_the_cgroup() {
    require_agent!();
    let tb = Testbed::start().await;
    let agent = AgentDaemon::start(&tb.containerd.nri_socket(), ADAPTIVE).await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    let health = agent.health().await.unwrap();
    let runtime = health["runtime"].as_str().unwrap();
    // What the runtime tells the plugin in Configure: 1.7 names only
    // itself; 2.x also the NRI module it was built with.
    match tb.containerd.line() {
        Line::V1_7 => assert!(
            runtime.starts_with("containerd 1.7.24") && !runtime.contains("NRI"),
            "{health}"
        ),
        Line::V2 => assert!(
            runtime.starts_with(&format!(
                "containerd {}",
                hyperbox_integration::gobin::CONTAINERD_VERSION
            )) && runtime.ends_with("(NRI v0.12.3)"),
            "{health}"
        ),
    }
    let image = tb
        .push(
            &ImageSpec::busybox(&["sleep", "3600"]).unwrap(),
            "test/hog",
            "v1",
        )
        .await;
    let cri = tb.containerd.cri().await.unwrap();
    cri.pull_image(&image).await.unwrap();
    let pod = cri.run_pod("mem", PodNetwork::Host).await.unwrap();

    // First run: nothing learned, nothing set; the run is learned.
    let first = run(&cri, &pod, &spec("hog", &image, HOG, None)).await;
    let e = agent.explain(&first);
    let path = e["container"]["cgroups_path"].as_str().unwrap().to_string();
    assert_eq!(memory_limit(&path), None, "first run got a limit");
    assert_eq!(e["decisions"][0]["action"], "learn", "{e}");
    // The workload is keyed by pod namespace, container name and the image
    // repository the runtime reports (both lines name it).
    assert_eq!(
        workload_of(&e),
        format!("default/hog@{}/test/hog", tb.registry.host()),
        "{e}"
    );
    assert_eq!(
        cri.wait_exited(&first, Duration::from_secs(60))
            .await
            .unwrap(),
        0
    );
    cri.remove_container(&first).await.unwrap();
    let runs = wait_learned(&agent, &workload_of(&e), 1).await;
    assert!(
        runs[0] >= 40 * MIB && runs[0] < 64 * MIB,
        "learned peak {runs:?} for a 40 MiB buffer"
    );

    // Second run: limit = learned working set × 1.5, in the real cgroup,
    // and the workload runs fine under it.
    let second = run(&cri, &pod, &spec("hog", &image, HOG, None)).await;
    let e = agent.explain(&second);
    let path = e["container"]["cgroups_path"].as_str().unwrap().to_string();
    assert_sized(&e, runs[0], &path);
    assert_eq!(
        cri.wait_exited(&second, Duration::from_secs(60))
            .await
            .unwrap(),
        0
    );
    cri.remove_container(&second).await.unwrap();

    // A user limit is a ceiling.
    let mut capped = spec("hog", &image, HOG, None);
    capped.memory_limit = 48 * MIB as i64;
    let third = run(&cri, &pod, &capped).await;
    let e = agent.explain(&third);
    let path = e["container"]["cgroups_path"].as_str().unwrap().to_string();
    assert_eq!(memory_limit(&path), Some(48 * MIB));
    assert!(
        e["decisions"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("user's limit"),
        "{e}"
    );
    let text = agent.hb(&["policy", "explain", &third[..12]]);
    assert!(
        text.contains("ceiling 48.0 MiB") && text.contains("create"),
        "{text}"
    );
    cri.wait_exited(&third, Duration::from_secs(60))
        .await
        .unwrap();
    cri.remove_container(&third).await.unwrap();

    // observe: learned, never limited; off: not tracked at all.
    let observed = run(
        &cri,
        &pod,
        &spec("hog", &image, &["sleep", "30"], Some("observe")),
    )
    .await;
    let e = agent.explain(&observed);
    assert_eq!(e["decisions"][0]["action"], "observe", "{e}");
    assert_eq!(
        memory_limit(e["container"]["cgroups_path"].as_str().unwrap()),
        None
    );
    let off = run(
        &cri,
        &pod,
        &spec("other", &image, &["sleep", "30"], Some("off")),
    )
    .await;
    let out = agent.hb_output(&["policy", "explain", &off]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tracked container"));

    // hb psi lists the tracked container with its pressure and usage.
    let psi: serde_json::Value = serde_json::from_str(&agent.hb(&["psi", "--json"])).unwrap();
    assert!(psi["node"]["memory"]["some"]["avg10"].is_number(), "{psi}");
    let listed: Vec<&str> = psi["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert!(
        listed.contains(&observed.as_str()) && !listed.contains(&off.as_str()),
        "{psi}"
    );
    let table = agent.hb(&["psi"]);
    assert!(
        table.contains("MEM SOME10") && table.contains(&observed[..12]),
        "{table}"
    );

    // NRI answers are timed and exported.
    let (status, metrics) = agent.http_get("/metrics").await.unwrap();
    assert_eq!(status, 200);
    let creates = metric_value(
        &metrics,
        "hyperbox_nri_request_duration_seconds_count{method=\"CreateContainer\"}",
    );
    assert!(creates >= 5.0, "{metrics}");
    assert_eq!(metric_value(&metrics, "hyperbox_nri_connected"), 1.0);
    assert_event_delivery(&tb, &metrics);

    cri.remove_container(&observed).await.unwrap();
    cri.remove_container(&off).await.unwrap();
    cri.remove_pod(&pod).await.unwrap();
    assert!(agent.shutdown().is_empty());
    tb.finish();
}

/// Checks the creation-time decision: learned working set `ws` × a
/// headroom between `min_headroom` (1.15, a pressed node: tests run in
/// parallel) and `headroom` (1.5), and that limit in the real cgroup.
/// Returns the limit set.
fn assert_sized(e: &serde_json::Value, ws: u64, cgroups_path: &str) -> u64 {
    let d = &e["decisions"][0];
    assert_eq!(d["action"], "create", "{e}");
    let set = d["to"].as_u64().unwrap();
    let lo = (ws as f64 * 1.15) as u64;
    let hi = (ws as f64 * 1.5) as u64;
    assert!(set >= lo && set <= hi, "set {set}, learned {ws}: {e}");
    let in_cgroup = memory_limit(cgroups_path).expect("a limit in the cgroup");
    // The kernel rounds limits down to whole pages.
    assert!(
        set - in_cgroup < 4096,
        "cgroup has {in_cgroup}, agent set {set}"
    );
    set
}

/// How start and remove reached the agent: containerd 1.7 (NRI v0.6.1)
/// funnels them through `StateChange`; 2.x calls the dedicated methods,
/// and would fall back to `StateChange`, warning about it, only for a
/// plugin that did not implement them.
fn assert_event_delivery(tb: &Testbed, metrics: &str) {
    let count = |method: &str| {
        hyperbox_integration::agent::metric(
            metrics,
            &format!("hyperbox_nri_request_duration_seconds_count{{method=\"{method}\"}}"),
            "",
        )
        .unwrap_or(0.0)
    };
    let (dedicated, state_change) = (
        count("StartContainer") + count("RemoveContainer"),
        count("StateChange"),
    );
    match tb.containerd.line() {
        Line::V1_7 => assert!(
            state_change >= 2.0 && dedicated == 0.0,
            "1.7 should deliver start/remove through StateChange:\n{metrics}"
        ),
        Line::V2 => {
            assert!(
                dedicated >= 2.0 && state_change == 0.0,
                "2.x should call StartContainer/RemoveContainer:\n{metrics}"
            );
            let log = tb.containerd.log();
            assert!(!log.contains("deprecated StateChange"), "{log}");
            assert!(
                log.contains("with NRI version v0.12.3"),
                "2.x logs the plugin's NRI version at registration"
            );
        }
    }
}

fn workload_of(explain: &serde_json::Value) -> String {
    explain["container"]["workload"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The value of the first sample line starting with `series`.
fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(series)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

fn with_workload(mut s: ContainerSpec, workload: &str) -> ContainerSpec {
    s.annotations
        .insert("hyperbox.dev/workload".into(), workload.into());
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn pre_registered_agent_is_launched_by_containerd_and_configured_from_conf_d() {
    require_agent!();
    // The agent's own file says observe; the conf.d file containerd passes
    // in Configure says adaptive, and wins.
    let (agent, plugin) =
        AgentDaemon::pre_registered(Some("[memory]\ndefault_policy = \"adaptive\"\n"));
    let tb = Testbed::start_with(|b| b.nri_plugin(plugin)).await;
    let start = Instant::now();
    while agent.health().await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "containerd did not launch the agent; containerd log:\n{}",
            tb.containerd.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.wait_connected(true, Duration::from_secs(20)).await;
    let image = tb.push_sleeper().await;
    let cri = tb.containerd.cri().await.unwrap();
    cri.pull_image(&image).await.unwrap();
    let pod = cri.run_pod("pre", PodNetwork::Host).await.unwrap();
    let id = run(&cri, &pod, &ContainerSpec::new("app", &image, &[])).await;
    let e = agent.explain(&id);
    assert_eq!(e["container"]["policy"], "adaptive", "{e}");
    assert_eq!(e["container"]["policy_from"], "default", "{e}");
    assert_eq!(e["decisions"][0]["action"], "learn", "{e}");
    cri.remove_container(&id).await.unwrap();
    cri.remove_pod(&pod).await.unwrap();
    tb.finish();
    // containerd is gone, so is the plugin it launched.
    let start = Instant::now();
    while agent.health().await.is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "pre-registered agent outlived containerd"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(agent.shutdown().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_and_containerd_restarts_keep_what_was_learned_and_decided() {
    require_agent!();
    let mut tb = Testbed::start().await;
    let mut agent = AgentDaemon::start(&tb.containerd.nri_socket(), ADAPTIVE).await;
    agent.kill(Signal::SIGKILL);
    agent.seed_history("default/keep", &[24 * MIB]);
    agent.start_again().await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    let image = tb.push_sleeper().await;
    let cri = tb.containerd.cri().await.unwrap();
    cri.pull_image(&image).await.unwrap();
    let pod = cri.run_pod("restart", PodNetwork::Host).await.unwrap();
    let app = run(
        &cri,
        &pod,
        &with_workload(ContainerSpec::new("app", &image, &[]), "keep"),
    )
    .await;
    let e = agent.explain(&app);
    let path = e["container"]["cgroups_path"].as_str().unwrap().to_string();
    let set = assert_sized(&e, 24 * MIB, &path);

    // kill -9 and start again: the running container is adopted from
    // Synchronize with the limit in force and the user's (absent) ceiling.
    agent.kill(Signal::SIGKILL);
    agent.start_again().await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    let e = agent.explain(&app);
    assert_eq!(e["container"]["limit"], set, "{e}");
    assert!(e["container"]["bounds"]["ceiling"].is_null(), "{e}");
    // The tracer watches the adopted container again, and sees what it
    // does from now on.
    let traced = || {
        let out = agent.hb_output(&["trace", &app, "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()
    };
    let t = traced().expect("adopted container traced");
    assert_eq!(t["live"], true, "{t}");
    let out = cri
        .exec_sync(&app, &["/bin/busybox", "true"], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(out.status, 0);
    let start = std::time::Instant::now();
    while traced().is_none_or(|t| t["exec_count"].as_u64().unwrap_or(0) == 0) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "exec after adoption not traced: {:?}",
            traced()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(e["learned_runs"], serde_json::json!([24 * MIB]), "{e}");

    // containerd restarts: the agent reconnects and goes on deciding.
    tb.containerd.restart().await.unwrap();
    agent.wait_connected(true, Duration::from_secs(30)).await;
    let cri = tb.containerd.cri().await.unwrap();
    let start = Instant::now();
    let app2 = loop {
        match cri
            .create_container(
                &pod,
                &with_workload(ContainerSpec::new("app2", &image, &[]), "keep"),
            )
            .await
        {
            Ok(id) => break id,
            Err(e) if start.elapsed() < Duration::from_secs(20) => {
                tracing::info!(error = %e, "CRI not ready after restart yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    cri.start_container(&app2).await.unwrap();
    let e = agent.explain(&app2);
    let path2 = e["container"]["cgroups_path"].as_str().unwrap().to_string();
    assert_sized(&e, 24 * MIB, &path2);
    // The first container is still known, once.
    assert_eq!(agent.explain(&app)["container"]["id"], app.as_str());
    assert!(agent.log().contains("reconnecting"), "{}", agent.log());

    cri.remove_container(&app).await.unwrap();
    cri.remove_container(&app2).await.unwrap();
    cri.remove_pod(&pod).await.unwrap();
    assert!(agent.shutdown().is_empty());
    tb.finish();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_agent_does_not_block_container_creation() {
    require_agent!();
    let tb = Testbed::start().await;
    let agent = AgentDaemon::start(&tb.containerd.nri_socket(), ADAPTIVE).await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    let image = tb.push_sleeper().await;
    let cri = tb.containerd.cri().await.unwrap();
    cri.pull_image(&image).await.unwrap();
    let pod = cri.run_pod("hung", PodNetwork::Host).await.unwrap();

    agent.signal(Signal::SIGSTOP);
    let start = Instant::now();
    let id = run(&cri, &pod, &ContainerSpec::new("app", &image, &[])).await;
    let took = start.elapsed();
    let st = cri.container_status(&id).await.unwrap();
    assert_eq!(
        st.state, 1,
        "container not running while the agent hung: {st:?}"
    );
    eprintln!("create+start with a stopped agent took {took:?}");
    agent.signal(Signal::SIGCONT);
    // containerd dropped the plugin; the agent notices and registers again.
    agent.wait_connected(true, Duration::from_secs(30)).await;
    let later = run(&cri, &pod, &ContainerSpec::new("later", &image, &[])).await;
    assert_eq!(agent.explain(&later)["container"]["name"], "later");
    assert!(agent.log().contains("reconnecting"), "{}", agent.log());

    cri.remove_container(&id).await.unwrap();
    cri.remove_container(&later).await.unwrap();
    cri.remove_pod(&pod).await.unwrap();
    assert!(agent.shutdown().is_empty());
    tb.finish();
}

#[tokio::test(flavor = "multi_thread")]
async fn adaptive_limit_rises_under_real_memory_pressure() {
    require_agent!();
    let tb = Testbed::start().await;
    let mut agent = AgentDaemon::start(
        &tb.containerd.nri_socket(),
        "[memory]\ndefault_policy = \"adaptive\"\nsample_interval_secs = 1\ncooldown_secs = 600\n",
    )
    .await;
    // The workload was small before (20 MiB): it starts at 30 MiB.
    agent.kill(Signal::SIGKILL);
    agent.seed_history("default/grower", &[20 * MIB]);
    agent.start_again().await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    let image = tb.push_sleeper().await;
    let cri = tb.containerd.cri().await.unwrap();
    cri.pull_image(&image).await.unwrap();
    let pod = cri.run_pod("pressure", PodNetwork::Host).await.unwrap();
    // Now it rereads a 48 MiB file forever: under a 30 MiB limit its page
    // cache thrashes and it stalls in reclaim.
    let thrash = &[
        "sh",
        "-c",
        "dd if=/dev/zero of=/data bs=1M count=48 2>/dev/null; while true; do cat /data >/dev/null; done",
    ];
    let mut s = with_workload(ContainerSpec::new("grower", &image, thrash), "grower");
    s.memory_limit = 256 * MIB as i64;
    let id = run(&cri, &pod, &s).await;
    let e = agent.explain(&id);
    let path = e["container"]["cgroups_path"].as_str().unwrap().to_string();
    assert_sized(&e, 20 * MIB, &path);

    let start = Instant::now();
    loop {
        let limit = memory_limit(&path).unwrap();
        if limit > 48 * MIB {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "limit still {limit} under pressure; {}",
            agent.explain(&id)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let e = agent.explain(&id);
    let raises: Vec<&serde_json::Value> = e["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["action"] == "raise")
        .collect();
    assert!(!raises.is_empty(), "{e}");
    assert!(raises.iter().all(|d| d["via"] == "nri-update"), "{e}");
    let (_, metrics) = agent.http_get("/metrics").await.unwrap();
    assert!(
        metric_value(
            &metrics,
            "hyperbox_memory_decisions_total{action=\"raise\"}"
        ) >= 1.0,
        "{metrics}"
    );
    // The user's 256 MiB stays the ceiling.
    assert!(memory_limit(&path).unwrap() <= 256 * MIB);

    cri.remove_container(&id).await.unwrap();
    cri.remove_pod(&pod).await.unwrap();
    assert!(agent.shutdown().is_empty());
    tb.finish();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kubelet_resize_through_cri_becomes_the_agents_ceiling() {
    require_agent!();
    let tb = Testbed::start().await;
    let mut agent = AgentDaemon::new(
        &tb.containerd.nri_socket(),
        "[memory]\ndefault_policy = \"adaptive\"\nsample_interval_secs = 1\ncooldown_secs = 600\n",
    );
    agent.seed_history("default/resized", &[20 * MIB]);
    agent.start_again().await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    let image = tb.push_sleeper().await;
    let cri = tb.containerd.cri().await.unwrap();
    cri.pull_image(&image).await.unwrap();
    let pod = cri.run_pod("resize", PodNetwork::Host).await.unwrap();
    let id = run(
        &cri,
        &pod,
        &with_workload(ContainerSpec::new("app", &image, &[]), "resized"),
    )
    .await;
    let e = agent.explain(&id);
    let path = e["container"]["cgroups_path"].as_str().unwrap().to_string();
    assert_sized(&e, 20 * MIB, &path);
    assert!(e["container"]["bounds"]["ceiling"].is_null(), "{e}");

    // In-place resize: containerd asks the agent (NRI UpdateContainer)
    // before it writes the cgroup, so the agent knows when CRI returns.
    cri.update_memory_limit(&id, 96 * MIB as i64).await.unwrap();
    assert_eq!(memory_limit(&path), Some(96 * MIB));
    let e = agent.explain(&id);
    assert_eq!(e["container"]["bounds"]["ceiling"], 96 * MIB, "{e}");
    assert_eq!(e["container"]["limit"], 96 * MIB, "{e}");
    let (_, metrics) = agent.http_get("/metrics").await.unwrap();
    assert!(
        metric_value(
            &metrics,
            "hyperbox_nri_request_duration_seconds_count{method=\"UpdateContainer\"}"
        ) >= 1.0,
        "{metrics}"
    );

    cri.remove_container(&id).await.unwrap();
    cri.remove_pod(&pod).await.unwrap();
    assert!(agent.shutdown().is_empty());
    tb.finish();
}

mod hostile {
    //! The test plays containerd's side of the NRI socket and sends what a
    //! broken or hostile runtime might.

    use super::*;
    use hyperbox_nri_proto::api;
    use hyperbox_nri_proto::mux::{self, encode_frame, read_frame};
    use hyperbox_nri_proto::ttrpc::{self, Decoded, Decoder};
    use prost::Message;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{UnixListener, UnixStream};

    /// Accepts the agent's next connection and reads its RegisterPlugin.
    async fn accept_registration(l: &UnixListener) -> (UnixStream, api::RegisterPluginRequest) {
        let (mut s, _) = tokio::time::timeout(Duration::from_secs(20), l.accept())
            .await
            .expect("the agent dials again")
            .unwrap();
        let f = read_frame(&mut s).await.unwrap().unwrap();
        assert_eq!(f.conn, mux::RUNTIME_CONN);
        let mut d = Decoder::default();
        d.push(&f.payload);
        let Some(Decoded::Frame(m)) = d.next_message() else {
            panic!("no ttrpc message")
        };
        let req = ttrpc::Request::decode(m.body).unwrap();
        assert_eq!(
            (req.service.as_str(), req.method.as_str()),
            (api::RUNTIME_SERVICE, "RegisterPlugin")
        );
        // Accept the registration.
        let ok = ttrpc::Response {
            status: None,
            payload: api::Empty {}.encode_to_vec(),
        };
        s.write_all(&encode_frame(
            mux::RUNTIME_CONN,
            &ttrpc::encode(m.header.stream, ttrpc::TYPE_RESPONSE, &ok),
        ))
        .await
        .unwrap();
        (
            s,
            api::RegisterPluginRequest::decode(req.payload.as_slice()).unwrap(),
        )
    }

    async fn reply(s: &mut UnixStream) -> (u32, ttrpc::Response) {
        let f = tokio::time::timeout(Duration::from_secs(5), read_frame(s))
            .await
            .expect("a reply")
            .unwrap()
            .unwrap();
        assert_eq!(f.conn, mux::PLUGIN_CONN);
        let mut d = Decoder::default();
        d.push(&f.payload);
        let Some(Decoded::Frame(m)) = d.next_message() else {
            panic!("no ttrpc message")
        };
        (m.header.stream, ttrpc::Response::decode(m.body).unwrap())
    }

    fn request(stream: u32, method: &str, payload: Vec<u8>) -> Vec<u8> {
        encode_frame(
            mux::PLUGIN_CONN,
            &ttrpc::encode(
                stream,
                ttrpc::TYPE_REQUEST,
                &ttrpc::Request {
                    service: api::PLUGIN_SERVICE.into(),
                    method: method.into(),
                    payload,
                    timeout_nano: 2_000_000_000,
                },
            ),
        )
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn malformed_and_oversized_frames_are_refused_without_a_crash() {
        require!(Prereq::Root, Prereq::Psi);
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nri.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let agent = AgentDaemon::start(&sock, "").await;

        // A frame claiming 2 GiB: the trunk cannot be trusted after it, so
        // the agent drops the connection (without allocating it) and dials
        // again.
        let (mut s, reg) = accept_registration(&l).await;
        assert_eq!(
            (
                reg.plugin_name.as_str(),
                reg.plugin_idx.as_str(),
                reg.nri_version.as_str()
            ),
            ("hyperbox", "10", api::NRI_VERSION)
        );
        s.write_all(&[0, 0, 0, 1, 0x7f, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut s, &mut buf),
        )
        .await
        .expect("the agent closes the connection")
        .unwrap_or(0);
        assert_eq!(n, 0);

        // Next connection: damaged messages inside well-formed frames get
        // error replies and the session goes on.
        let (mut s, _) = accept_registration(&l).await;
        // A ttrpc message claiming 5 MiB (over ttrpc's 4 MiB).
        let mut big = Vec::new();
        big.extend_from_slice(&(5u32 << 20).to_be_bytes());
        big.extend_from_slice(&1u32.to_be_bytes());
        big.extend_from_slice(&[ttrpc::TYPE_REQUEST, 0]);
        s.write_all(&encode_frame(mux::PLUGIN_CONN, &big))
            .await
            .unwrap();
        let (stream, r) = reply(&mut s).await;
        assert_eq!(stream, 1);
        assert_eq!(r.status.unwrap().code, ttrpc::code::RESOURCE_EXHAUSTED);
        // Its body is skipped as it arrives, in frames of 1 MiB.
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..5 {
            s.write_all(&encode_frame(mux::PLUGIN_CONN, &chunk))
                .await
                .unwrap();
        }
        // A request that is not protobuf.
        let mut junk = Vec::new();
        junk.extend_from_slice(&4u32.to_be_bytes());
        junk.extend_from_slice(&3u32.to_be_bytes());
        junk.extend_from_slice(&[ttrpc::TYPE_REQUEST, 0, 0xff, 0xff, 0xff, 0xff]);
        s.write_all(&encode_frame(mux::PLUGIN_CONN, &junk))
            .await
            .unwrap();
        let (stream, r) = reply(&mut s).await;
        assert_eq!(stream, 3);
        assert_eq!(r.status.unwrap().code, ttrpc::code::INVALID_ARGUMENT);
        // A valid request whose payload is garbage for its method.
        s.write_all(&request(5, "CreateContainer", vec![0x0a, 0xff]))
            .await
            .unwrap();
        let (_, r) = reply(&mut s).await;
        assert_eq!(r.status.unwrap().code, ttrpc::code::INVALID_ARGUMENT);
        // An unknown method.
        s.write_all(&request(7, "Frobnicate", Vec::new()))
            .await
            .unwrap();
        let (_, r) = reply(&mut s).await;
        assert_eq!(r.status.unwrap().code, ttrpc::code::UNIMPLEMENTED);
        // And a real Configure is still answered, with the event mask.
        let cfg = api::ConfigureRequest {
            runtime_name: "fake".into(),
            runtime_version: "0".into(),
            ..Default::default()
        };
        s.write_all(&request(9, "Configure", cfg.encode_to_vec()))
            .await
            .unwrap();
        let (stream, r) = reply(&mut s).await;
        assert_eq!(stream, 9);
        assert!(r.status.is_none(), "{r:?}");
        let mask = api::ConfigureResponse::decode(r.payload.as_slice())
            .unwrap()
            .events;
        use api::Event::*;
        for e in [
            CreateContainer,
            StartContainer,
            UpdateContainer,
            StopContainer,
            RemoveContainer,
        ] {
            assert_ne!(mask & e.mask(), 0, "{e:?} not subscribed: {mask:#x}");
        }
        // A config the agent cannot accept is refused with the key named.
        let bad = api::ConfigureRequest {
            config: "[memory]\nheadroom = 0.2\n".into(),
            ..Default::default()
        };
        s.write_all(&request(11, "Configure", bad.encode_to_vec()))
            .await
            .unwrap();
        let (_, r) = reply(&mut s).await;
        assert!(r.status.unwrap().message.contains("memory.headroom"));

        let h = agent.health().await.unwrap();
        assert_eq!(h["status"], "ok");
        let (_, metrics) = agent.http_get("/metrics").await.unwrap();
        assert!(
            metric_value(
                &metrics,
                "hyperbox_nri_request_errors_total{method=\"CreateContainer\"}"
            ) >= 1.0
        );
        drop(s);
        assert!(agent.shutdown().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_agent() {
    require_agent!();
    require!(Prereq::Prometheus);
    let tb = Testbed::start().await;
    let agent = AgentDaemon::start(&tb.containerd.nri_socket(), ADAPTIVE).await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    let image = tb.push_sleeper().await;
    let cri = tb.containerd.cri().await.unwrap();
    cri.pull_image(&image).await.unwrap();
    let pod = cri.run_pod("scraped", PodNetwork::Host).await.unwrap();
    let id = run(&cri, &pod, &ContainerSpec::new("app", &image, &[])).await;

    let prom = hyperbox_integration::prometheus::Prometheus::start(&agent.metrics).await;
    let start = Instant::now();
    let (connected, info, stall) = loop {
        let connected = prom.query("hyperbox_nri_connected").await;
        let info = prom
            .query(&format!("hyperbox_container_info{{container_id=\"{id}\"}}"))
            .await;
        let stall = prom
            .query("hyperbox_node_pressure_stall_seconds_total{resource=\"memory\",kind=\"some\"}")
            .await;
        if !connected.is_empty() && !info.is_empty() && !stall.is_empty() {
            break (connected, info, stall);
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "prometheus has no hyperbox series yet; targets: {}",
            prom.targets().await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(connected[0]["value"][1], "1");
    assert_eq!(info[0]["metric"]["policy"], "adaptive");
    assert_eq!(info[0]["metric"]["container"], "app");
    assert!(
        stall[0]["value"][1]
            .as_str()
            .unwrap()
            .parse::<f64>()
            .is_ok()
    );
    let targets = prom.targets().await;
    assert_eq!(
        targets["data"]["activeTargets"][0]["health"], "up",
        "{targets}"
    );
    drop(prom);

    cri.remove_container(&id).await.unwrap();
    cri.remove_pod(&pod).await.unwrap();
    assert!(agent.shutdown().is_empty());
    tb.finish();
}

/// One HTTP/1.1 request on the agent's local API socket, as the shim makes
/// it; returns status and body.
fn api_call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_outside_nri_are_sized_through_the_local_api() {
    require_agent!();
    use hyperbox_integration::client::{ContainerOptions, PullOptions};
    let tb = Testbed::start().await;
    let mut agent = AgentDaemon::new(&tb.containerd.nri_socket(), ADAPTIVE);
    agent.seed_history("containerd:default/direct", &[20 * MIB]);
    agent.start_again().await;
    // A ctr/nerdctl-style container: containerd's API, no CRI, no NRI.
    let client = tb.containerd.client().await.unwrap();
    let reference = tb.push_sleeper().await;
    let image = client
        .pull(&reference, &PullOptions::local("overlayfs"))
        .await
        .unwrap();
    let c = client
        .create_container("api-app", &image, &ContainerOptions::default())
        .await
        .unwrap();
    let task = c.start().await.unwrap();
    let cgroups_path = format!("{}/api-app", tb.containerd.cgroup_prefix());
    assert_eq!(memory_limit(&cgroups_path), None);

    // What the shim sends after runc create.
    let info = serde_json::json!({
        "id": "api-app",
        "name": "api-app",
        "cgroups_path": cgroups_path,
        "annotations": {
            "memory.hyperbox.dev/policy": "adaptive",
            "hyperbox.dev/workload": "direct"
        },
        "running": true
    });
    let (status, body) = api_call(&agent.address(), "POST", "/v1/containers", Some(info));
    assert_eq!(status, 201, "{body}");
    let e = agent.explain("api-app");
    assert_eq!(e["container"]["source"], "local", "{e}");
    assert_sized(&e, 20 * MIB, &cgroups_path);

    // Bad registrations are refused with a reason, and change nothing.
    let (status, body) = api_call(
        &agent.address(),
        "POST",
        "/v1/containers",
        Some(serde_json::json!({"id": "x", "name": "x", "cgroups_path": "/a/../../etc"})),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a cgroup path"), "{body}");
    // Another container's cgroup under another id, the runtime's own
    // service, and the hierarchy's top: refused, the limit untouched.
    for (id, path, why) in [
        ("other", cgroups_path.as_str(), "does not end in"),
        (
            "containerd.service",
            "/system.slice/containerd.service",
            "the host's",
        ),
        ("x", "/x", "not under a runtime"),
    ] {
        let info = serde_json::json!({
            "id": id, "name": id, "cgroups_path": path,
            "annotations": {"memory.hyperbox.dev/policy": "adaptive"}, "running": true
        });
        let (status, body) = api_call(&agent.address(), "POST", "/v1/containers", Some(info));
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains(why), "{path}: {body}");
    }
    assert_sized(&agent.explain("api-app"), 20 * MIB, &cgroups_path);

    // The run ends: its peak joins the history.
    let (status, _) = api_call(&agent.address(), "DELETE", "/v1/containers/api-app", None);
    assert_eq!(status, 204);
    assert_eq!(
        wait_learned(&agent, "containerd:default/direct", 2)
            .await
            .len(),
        2
    );
    let (status, _) = api_call(&agent.address(), "DELETE", "/v1/containers/api-app", None);
    assert_eq!(status, 404);

    task.kill(9).await.unwrap();
    task.wait_output().await.unwrap();
    c.delete().await.unwrap();
    assert!(agent.shutdown().is_empty());
    tb.finish();
}

/// `hb psi` run as uid 65534 with primary group `gid` (no other groups).
fn hb_as(agent: &AgentDaemon, gid: u32) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    agent
        .hb_command(&["psi", "--json"])
        .uid(65534)
        .gid(gid)
        .output()
        .expect("run hb as nobody")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_local_api_serves_root_and_its_group_only() {
    require_agent!();
    let tb = Testbed::start().await;
    // The socket's mode lets anyone connect: the peer's credentials are
    // what is checked. Group 1 (daemon) stands for the operators' group.
    let group = nix::unistd::Group::from_gid(1.into())
        .unwrap()
        .expect("group 1");
    let conf = format!(
        "socket_mode = 0o666\napi_group = \"{}\"\n{ADAPTIVE}",
        group.name
    );
    let agent = AgentDaemon::start(&tb.containerd.nri_socket(), &conf).await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    // nobody reaches the config and the socket in the agent's directory.
    let dir = agent.address().parent().unwrap().to_path_buf();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    // Root is served.
    let root = agent.hb_output(&["psi", "--json"]);
    assert!(
        root.status.success(),
        "{}",
        String::from_utf8_lossy(&root.stderr)
    );
    // A member of the group (as its gid) is served.
    let member = hb_as(&agent, 1);
    assert!(
        member.status.success(),
        "{}",
        String::from_utf8_lossy(&member.stderr)
    );
    // nobody is refused, and told why.
    let nobody = hb_as(&agent, 65534);
    let err = String::from_utf8_lossy(&nobody.stderr);
    assert!(!nobody.status.success(), "nobody was served");
    assert!(err.contains("403") && err.contains("uid 65534"), "{err}");
    assert!(
        agent.log().contains("local API peer refused"),
        "{}",
        agent.log()
    );
    assert!(agent.shutdown().is_empty());
    tb.finish();
}

/// `agent.cgroup_parents` bounds what the local API registers: with the
/// runtime's parent configured, a real container under it is sized, and
/// a real cgroup outside it that passes every other rule (two levels deep,
/// no host unit, named after the container it claims to be) is refused,
/// its limit untouched.
#[tokio::test(flavor = "multi_thread")]
async fn registrations_outside_the_configured_cgroup_parents_are_refused() {
    require_agent!();
    use hyperbox_integration::client::{ContainerOptions, PullOptions};
    let tb = Testbed::start().await;
    let parent = tb.containerd.cgroup_prefix().to_string();
    let conf = format!("cgroup_parents = [{parent:?}]\n{ADAPTIVE}");
    let mut agent = AgentDaemon::new(&tb.containerd.nri_socket(), &conf);
    agent.seed_history("containerd:default/bounded", &[20 * MIB]);
    agent.start_again().await;
    let client = tb.containerd.client().await.unwrap();
    let reference = tb.push_sleeper().await;
    let image = client
        .pull(&reference, &PullOptions::local("overlayfs"))
        .await
        .unwrap();
    let c = client
        .create_container("parented-app", &image, &ContainerOptions::default())
        .await
        .unwrap();
    let task = c.start().await.unwrap();
    let inside = format!("{parent}/parented-app");
    let outside_top = format!("/hb-outside-{}", std::process::id());
    let outside = format!("{outside_top}/stray-app");
    /// Removes the stray cgroup, innermost first, however the test ends.
    struct Stray(Vec<PathBuf>);
    impl Drop for Stray {
        fn drop(&mut self) {
            for d in &self.0 {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
    std::fs::create_dir_all(hyperbox_integration::agent::memory_dir(&outside)).unwrap();
    let stray = Stray(vec![
        hyperbox_integration::agent::memory_dir(&outside),
        hyperbox_integration::agent::memory_dir(&outside_top),
    ]);
    let register = |id: &str, path: &str| {
        let info = serde_json::json!({
            "id": id, "name": id, "cgroups_path": path,
            "annotations": {
                "memory.hyperbox.dev/policy": "adaptive",
                "hyperbox.dev/workload": "bounded"
            },
            "running": true
        });
        api_call(&agent.address(), "POST", "/v1/containers", Some(info))
    };

    let (status, body) = register("stray-app", &outside);
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("under none of the runtimes' cgroup parents")
            && body.contains("agent.cgroup_parents")
            && body.contains(&parent),
        "{body}"
    );
    assert_eq!(
        memory_limit(&outside),
        None,
        "the stray cgroup is untouched"
    );
    let (status, _) = api_call(&agent.address(), "GET", "/v1/containers/stray-app", None);
    assert_eq!(status, 404, "nothing was registered");

    let (status, body) = register("parented-app", &inside);
    assert_eq!(status, 201, "{body}");
    assert_sized(&agent.explain("parented-app"), 20 * MIB, &inside);

    let (status, _) = api_call(
        &agent.address(),
        "DELETE",
        "/v1/containers/parented-app",
        None,
    );
    assert_eq!(status, 204);
    task.kill(9).await.unwrap();
    task.wait_output().await.unwrap();
    c.delete().await.unwrap();
    drop(stray);
    assert!(
        !hyperbox_integration::agent::memory_dir(&outside_top).exists(),
        "the stray cgroup is gone"
    );
    assert!(agent.shutdown().is_empty());
    tb.finish();
}
