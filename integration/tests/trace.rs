//! The agent's eBPF tracer against real containers: attached at NRI
//! StartContainer (before the workload's first instruction), attributing
//! syscalls, execs, opens, TCP flows and OOM kills to the right container
//! and nothing else, exporting a span per container over OTLP, and leaving
//! no BPF program or link behind when the agent stops.
//!
//! They run on the containerd line `HYPERBOX_CONTAINERD_LINE` selects: 1.7
//! announces the start through `StateChange`, 2.x through the dedicated
//! `StartContainer` call; both before `runc start`, so the same
//! expectations hold on both.

use std::process::Command;
use std::time::{Duration, Instant};

use hyperbox_integration::agent::AgentDaemon;
use hyperbox_integration::cri::{ContainerSpec, Cri, Pod, PodNetwork};
use hyperbox_integration::otlp::Receiver;
use hyperbox_integration::prereq::Prereq;
use hyperbox_integration::require;
use hyperbox_integration::testbed::Testbed;
use serde_json::Value;

/// x86_64 syscall numbers the busybox script below must make.
const EXECVE: &str = "59";
const WRITE: &str = "1";
const OPENAT: &str = "257";

/// What `bpftool <object> show --json` lists (object: prog, map, link).
fn bpftool_list(object: &str) -> Vec<Value> {
    let out = Command::new("bpftool")
        .args([object, "show", "--json"])
        .output()
        .expect("run bpftool");
    match serde_json::from_slice(&out.stdout) {
        Ok(Value::Array(v)) => v,
        _ => Vec::new(),
    }
}

/// Ids and names of every loaded BPF program.
fn loaded_programs() -> Vec<(u64, String)> {
    bpftool_list("prog")
        .iter()
        .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_string())))
        .collect()
}

/// Ids of the BPF objects process `pid` holds: its fds' `prog_id` or
/// `map_id` (`key`).
fn bpf_ids_of(pid: u32, key: &str) -> Vec<u64> {
    let mut ids = Vec::new();
    let dir = std::fs::read_dir(format!("/proc/{pid}/fdinfo"));
    for e in dir.into_iter().flatten().flatten() {
        let info = std::fs::read_to_string(e.path()).unwrap_or_default();
        if let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
        {
            ids.push(id);
        }
    }
    ids.sort();
    ids.dedup();
    ids
}

/// Ids of the BPF programs process `pid` holds.
fn programs_of(pid: u32) -> Vec<u64> {
    bpf_ids_of(pid, "prog_id:")
}

/// Ids of every BPF map loaded.
fn loaded_maps() -> Vec<u64> {
    bpftool_list("map")
        .iter()
        .filter_map(|m| m["id"].as_u64())
        .collect()
}

/// BPF links attached to any of the programs `progs`.
fn links_of(progs: &[u64]) -> usize {
    bpftool_list("link")
        .iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|p| progs.contains(&p)))
        .count()
}

macro_rules! require_tracer {
    () => {
        require!(
            Prereq::Root,
            Prereq::Containerd,
            Prereq::Runc,
            Prereq::Registry,
            Prereq::Busybox,
            Prereq::Psi,
            Prereq::Bpftool
        )
    };
}

/// The sleeper image pulled, a host-network pod, and a running neighbour
/// that sleeps (nothing of the others may be attributed to it).
async fn pod_with_quiet_neighbour(tb: &Testbed, pod: &str) -> (String, Cri, Pod, String) {
    let image = tb.push_sleeper().await;
    let cri = tb.containerd.cri().await.unwrap();
    cri.pull_image(&image).await.unwrap();
    let pod = cri.run_pod(pod, PodNetwork::Host).await.unwrap();
    let quiet = cri
        .create_container(
            &pod,
            &ContainerSpec::new("quiet", &image, &["sleep", "3600"]),
        )
        .await
        .unwrap();
    cri.start_container(&quiet).await.unwrap();
    (image, cri, pod, quiet)
}

/// Runs a container that allocates past its 16 MiB limit, and returns its
/// id and trace once the tracer has reported its OOM kill (or after 5 s).
async fn oom_hog(cri: &Cri, pod: &Pod, image: &str, agent: &AgentDaemon) -> (String, Value) {
    let mut hog = ContainerSpec::new(
        "hog",
        image,
        &[
            "sh",
            "-c",
            "dd if=/dev/zero bs=64M count=1 2>/dev/null | sleep 1",
        ],
    );
    hog.memory_limit = 16 << 20;
    let hog = cri.create_container(pod, &hog).await.unwrap();
    cri.start_container(&hog).await.unwrap();
    cri.wait_exited(&hog, Duration::from_secs(30))
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        let h = trace_of(agent, &hog).await;
        if h["oom_killed"].as_array().is_some_and(|k| !k.is_empty())
            || start.elapsed() > Duration::from_secs(5)
        {
            return (hog, h);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a trace lists `path` among the paths its container opened.
fn opened_path(t: &Value, path: &str) -> bool {
    t["opened"]
        .as_array()
        .is_some_and(|o| o.iter().any(|p| p == path))
}

/// A burst of opens overflows the agent's small ring: the kernel samples
/// (one in 16 past half full) and counts what it left out, for the node
/// and for the container. Every open is processed, sampled out or dropped
/// in the container's own figures, none unaccounted for; the `quiet`
/// neighbour lost nothing. Returns the burst container.
async fn opens_under_pressure_are_accounted_to_their_container(
    cri: &Cri,
    pod: &Pod,
    image: &str,
    agent: &AgentDaemon,
    quiet: &str,
) -> String {
    const OPENS: u64 = 200_000;
    let binary = hyperbox_integration::workload::syscalls_binary();
    let mut spec = ContainerSpec::new(
        "burst",
        image,
        &["/hb/syscalls", "opens", &OPENS.to_string()],
    );
    spec.mounts.push((binary, "/hb/syscalls".into()));
    let burst = cri.create_container(pod, &spec).await.unwrap();
    cri.start_container(&burst).await.unwrap();
    cri.wait_exited(&burst, Duration::from_secs(60))
        .await
        .unwrap();
    let start = Instant::now();
    let (opens, sampled, dropped) = loop {
        let b = trace_of(agent, &burst).await;
        let got = (
            b["open_count"].as_u64().unwrap(),
            b["sampled_out"].as_u64().unwrap(),
            b["ring_drops"].as_u64().unwrap(),
        );
        if got.0 + got.1 + got.2 >= OPENS || start.elapsed() > Duration::from_secs(10) {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        sampled > 0,
        "sampling never engaged: {opens} {sampled} {dropped}"
    );
    assert!(opens > 0 && opens < OPENS, "{opens} {sampled} {dropped}");
    assert!(
        opens + sampled + dropped >= OPENS,
        "unaccounted opens: {opens} processed, {sampled} sampled, {dropped} dropped"
    );
    // The same figures on /metrics, within the node's totals.
    let (_, metrics) = agent.http_get("/metrics").await.unwrap();
    let metric_of = |name: &str, id: &str| {
        hyperbox_integration::agent::metric(&metrics, name, id)
            .unwrap_or_else(|| panic!("no {name} for {id:?} in {metrics}")) as u64
    };
    assert_eq!(
        metric_of("hyperbox_container_trace_sampled_total{", &burst),
        sampled
    );
    assert_eq!(
        metric_of("hyperbox_container_trace_ring_drops_total{", &burst),
        dropped
    );
    assert!(metric_of("hyperbox_trace_sampled_total ", "") >= sampled);
    assert!(metric_of("hyperbox_trace_ring_drops_total ", "") >= dropped);
    let q = trace_of(agent, quiet).await;
    assert_eq!(
        (&q["sampled_out"], &q["ring_drops"]),
        (&0.into(), &0.into()),
        "{q}"
    );
    burst
}

async fn trace_of(agent: &AgentDaemon, id: &str) -> serde_json::Value {
    serde_json::from_str(&agent.hb(&["trace", id, "--json"])).expect("trace JSON")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tracer_sees_each_containers_syscalls_execs_opens_flows_and_oom_kills_from_the_first_instruction()
 {
    require_tracer!();
    let tb = Testbed::start().await;
    let otlp = Receiver::start().await;
    let agent = AgentDaemon::start(
        &tb.containerd.nri_socket(),
        &format!(
            "[tracing]\notlp_endpoint = \"{}\"\nhook_linger_secs = 2\nsyscall_window_secs = 0\n",
            otlp.url
        ),
    )
    .await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    let health = agent.health().await.unwrap();
    assert_eq!(health["tracing"], true, "{health}");
    assert_eq!(
        health["tracing_otlp_endpoint"],
        format!("{}/v1/traces", otlp.url),
        "{health}"
    );
    // Nothing watched yet: the syscall hook is loaded but not attached, so
    // the node's syscalls pay nothing.
    assert_eq!(health["tracing_syscall_hook_attached"], false, "{health}");
    // fentry where the kernel lets it attach; this machine refuses it
    // (EPERM), so the tracepoint fallback is what runs here.
    assert!(
        ["fentry/x64_sys_call", "tp_btf/sys_enter"]
            .contains(&health["tracing_syscall_hook"].as_str().unwrap_or("")),
        "{health}"
    );
    // Seccomp refusals are seen where the filter returns (fexit) where the
    // kernel allows it; this machine refuses every trampoline program
    // (fentry, fexit, lsm: EPERM at load), so the sys_exit tracepoint
    // fallback is what runs here.
    let refusal_hook = health["tracing_refusal_hook"].as_str().unwrap_or("");
    let refusal_prog = match refusal_hook {
        "fexit/__seccomp_filter" => "hb_seccomp_exit",
        "tp_btf/sys_exit" => "hb_sys_exit",
        _ => panic!("no refusal hook: {health}"),
    };
    assert_eq!(health["tracing_refusal_hook_attached"], false, "{health}");
    // A syscall hook, the refusal hook, exec, OOM, TCP and cgroup removal,
    // held by this agent (other agents may run on the machine at the same
    // time); the hook that did not load is not held.
    let ours = programs_of(agent.pid().expect("agent pid"));
    let our_maps = bpf_ids_of(agent.pid().expect("agent pid"), "map_id:");
    assert!(our_maps.len() >= 8, "agent holds maps {our_maps:?}");
    let loaded = loaded_programs();
    let names: Vec<&str> = ours
        .iter()
        .filter_map(|id| {
            loaded
                .iter()
                .find(|(l, _)| l == id)
                .map(|(_, n)| n.as_str())
        })
        .collect();
    assert_eq!(names.len(), 6, "agent holds {names:?}");
    assert!(
        ["hb_exec", "hb_oom", "hb_tcp", "hb_cgroup_rmd", refusal_prog]
            .iter()
            .all(|p| names.iter().any(|n| n.starts_with(p))),
        "{names:?}"
    );
    assert_eq!(
        links_of(&ours),
        4,
        "exec, OOM, TCP and cgroup removal attached; syscalls not"
    );

    // A quiet neighbour, to check nothing of the worker is attributed to it.
    let (image, cri, pod, quiet) = pod_with_quiet_neighbour(&tb, "traced").await;
    let health = agent.health().await.unwrap();
    assert_eq!(health["tracing_syscall_hook_attached"], true, "{health}");
    assert_eq!(
        links_of(&ours),
        5,
        "the syscall hook attaches with the first watch (no refusal hook: nothing enforced)"
    );
    // The worker: its very first instruction is the exec of sh; then an
    // exec of the marker binary, opens and writes.
    // Open events carry only the path's used bytes: a 100-byte path comes
    // whole, a 305-byte one cut at the kernel side's 255. They come as
    // arguments, past the 128 bytes of argv an exec event keeps.
    let (medium, long) = (
        format!("/tmp/{}", "m".repeat(95)),
        format!("/tmp/{}", "l".repeat(300)),
    );
    let script = "cat /etc/hostname >/dev/null; cat \"$1\" \"$2\" 2>/dev/null; \
                  /bin/busybox echo traced-marker; exec /bin/busybox sleep 2";
    let worker = cri
        .create_container(
            &pod,
            &ContainerSpec::new(
                "worker",
                &image,
                &["sh", "-c", script, "sh", &medium, &long],
            ),
        )
        .await
        .unwrap();
    cri.start_container(&worker).await.unwrap();
    assert_eq!(
        cri.wait_exited(&worker, Duration::from_secs(30))
            .await
            .unwrap(),
        0
    );

    // Results stay after the container stopped (StopContainer froze them).
    let start = Instant::now();
    let t = loop {
        let t = trace_of(&agent, &worker).await;
        if t["execs"].as_array().is_some_and(|e| e.len() >= 2)
            || start.elapsed() > Duration::from_secs(10)
        {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let execs: Vec<(String, Vec<String>)> = t["execs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().to_string(),
                e["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    // The first exec is the container's own entrypoint: traced from the
    // first instruction.
    assert_eq!(execs[0].1[..3], ["sh", "-c", script], "{t}");
    assert!(
        execs.iter().any(|(p, a)| p == "/bin/busybox"
            && a.first().is_some_and(|a| a == "/bin/busybox")
            && a.get(1).is_some_and(|a| a == "echo")),
        "no exec of the marker in {execs:?}"
    );
    for nr in [EXECVE, WRITE, OPENAT] {
        assert!(
            t["syscalls"][nr].as_u64().unwrap_or(0) > 0,
            "syscall {nr} missing: {t}"
        );
    }
    // Opens, in first-access order, each path once.
    let opened: Vec<&str> = t["opened"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(opened.contains(&"/etc/hostname"), "{t}");
    assert!(opened.contains(&medium.as_str()), "{t}");
    assert!(opened.contains(&&long[..255]), "{t}");
    let mut unique = opened.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), opened.len(), "{t}");
    assert!(t["open_count"].as_u64().unwrap() >= opened.len() as u64);

    // The neighbour saw none of it.
    let q = trace_of(&agent, &quiet).await;
    assert_eq!(q["live"], true, "{q}");
    let q_execs = q["execs"].as_array().unwrap();
    assert!(
        q_execs
            .iter()
            .all(|e| !e["args"].to_string().contains("traced-marker")
                && !e["args"].to_string().contains("hostname")),
        "{q}"
    );
    assert!(
        q["syscall_total"].as_u64().unwrap() < t["syscall_total"].as_u64().unwrap(),
        "{q}\n{t}"
    );
    assert!(!opened_path(&q, "/etc/hostname"), "{q}");

    // An OOM kill is attributed to the victim's container.
    let (hog, h) = oom_hog(&cri, &pod, &image, &agent).await;
    assert_eq!(h["oom_killed"].as_array().unwrap().len(), 1, "{h}");
    assert!(
        trace_of(&agent, &quiet).await["oom_killed"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // hb trace --follow streams the neighbour's events live: an exec into
    // it (CRI exec joins its cgroup) shows up as it happens.
    let mut follow = agent
        .hb_command(&["trace", &quiet, "--follow", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Give the stream a moment to subscribe before the exec.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = cri
        .exec_sync(
            &quiet,
            &["/bin/busybox", "cat", "/etc/hostname"],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(out.status, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let streamed = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                assert_eq!(v["container"], quiet.as_str(), "{line}");
                seen.push(line);
                if v["event"]["kind"] == "open" && v["event"]["path"] == "/etc/hostname" {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(streamed, "no live open of /etc/hostname; got {seen:#?}");
    assert!(
        seen.iter()
            .any(|l| l.contains("\"kind\":\"exec\"") && l.contains("/bin/busybox")),
        "{seen:#?}"
    );

    // hb top: rates over an interval in which the neighbour gets busy.
    let top = agent
        .hb_command(&["top", "--once", "--interval", "2", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = cri
        .exec_sync(
            &quiet,
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=20000"],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(out.status, 0);
    let out = top.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = |id: &str| {
        v["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} not in hb top: {v}"))
    };
    let q = row(&quiet);
    assert_eq!(q["live"], true, "{v}");
    // 40,000 syscalls within a 2 s interval.
    assert!(q["syscalls_per_sec"].as_f64().unwrap() > 10_000.0, "{v}");
    let w = row(&worker);
    assert_eq!(
        (w["live"].clone(), w["syscalls_per_sec"].as_f64()),
        (false.into(), Some(0.0)),
        "{v}"
    );
    // The table a person reads: one line per traced container, all columns.
    let out = agent.hb_output(&["top", "--once", "--interval", "1"]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    let header = table.lines().nth(1).unwrap_or("");
    for col in ["SYSCALLS/S", "TCP CLOSED", "TCP OPEN", "IN/OUT", "OOM"] {
        assert!(header.contains(col), "{table}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&quiet[..12]) && l.contains("running")),
        "{table}"
    );

    // A TCP client/server pair on loopback (host network), over IPv4 and
    // IPv6: each side sees its own connections, with the bytes, and
    // neither sees the other's. The servers' stdin stays open (sleep), so
    // busybox nc reads the whole stream instead of closing at stdin EOF
    // and resetting the client.
    let server = cri
        .create_container(
            &pod,
            &ContainerSpec::new(
                "server",
                &image,
                &[
                    "sh",
                    "-c",
                    "(sleep 5 | nc -l -p 17777 >/dev/null) & \
                     sleep 5 | nc -l -p 17778 >/dev/null; wait",
                ],
            ),
        )
        .await
        .unwrap();
    cri.start_container(&server).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = cri
        .create_container(
            &pod,
            &ContainerSpec::new(
                "client",
                &image,
                &[
                    "sh",
                    "-c",
                    "head -c 10000 /dev/zero | nc 127.0.0.1 17777; \
                     head -c 20000 /dev/zero | nc ::1 17778",
                ],
            ),
        )
        .await
        .unwrap();
    cri.start_container(&client).await.unwrap();
    cri.wait_exited(&client, Duration::from_secs(30))
        .await
        .unwrap();
    cri.wait_exited(&server, Duration::from_secs(30))
        .await
        .unwrap();
    let start = Instant::now();
    let (c, sv) = loop {
        let c = trace_of(&agent, &client).await;
        let sv = trace_of(&agent, &server).await;
        if (c["flow_count"] == 2 && sv["flow_count"] == 2)
            || start.elapsed() > Duration::from_secs(10)
        {
            break (c, sv);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(c["flow_count"], 2, "{c}");
    assert_eq!(sv["flow_count"], 2, "{sv}");
    let flow = |t: &serde_json::Value, port: &str, local: bool| {
        t["flows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| {
                f[if local { "local" } else { "remote" }]
                    .as_str()
                    .is_some_and(|a| a.ends_with(port))
            })
            .cloned()
            .unwrap_or_else(|| panic!("no flow on port {port}: {t}"))
    };
    let (cf, cf6) = (flow(&c, ":17777", false), flow(&c, ":17778", false));
    assert_eq!(cf["outbound"], true, "{c}");
    assert_eq!(cf["remote"], "127.0.0.1:17777", "{c}");
    assert!(cf["bytes_out"].as_u64().unwrap() >= 10_000, "{c}");
    assert_eq!(cf6["outbound"], true, "{c}");
    assert_eq!(cf6["remote"], "[::1]:17778", "{c}");
    assert!(cf6["bytes_out"].as_u64().unwrap() >= 20_000, "{c}");
    // busybox nc listens on [::] (dual stack): the IPv4 peer's accepted
    // socket is IPv6, v4-mapped, and is reported as the IPv4 it is.
    let (sf, sf6) = (flow(&sv, ":17777", true), flow(&sv, ":17778", true));
    assert_eq!(sf["outbound"], false, "{sv}");
    assert_eq!(sf["local"], "127.0.0.1:17777", "{sv}");
    assert!(
        sf["remote"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{sv}"
    );
    assert!(sf["bytes_in"].as_u64().unwrap() >= 10_000, "{sv}");
    assert_eq!(sf6["local"], "[::1]:17778", "{sv}");
    assert!(sf6["bytes_in"].as_u64().unwrap() >= 20_000, "{sv}");
    assert_eq!(trace_of(&agent, &quiet).await["flow_count"], 0);

    // Metrics per container.
    let (_, metrics) = agent.http_get("/metrics").await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("hyperbox_container_execs_total")
                && l.contains(&worker)
                && l.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
                    >= 2.0),
        "{metrics}"
    );
    let metric = |name: &str, id: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(id))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        metric("hyperbox_container_tcp_connections_total", &client),
        2.0
    );
    assert!(
        metric(
            "hyperbox_container_tcp_bytes_total{container_id=\"",
            &format!("{server}\",container=\"server\",direction=\"in\"")
        ) >= 30_000.0,
        "{metrics}"
    );
    let drops: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("hyperbox_trace_ring_drops_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no drop counter in {metrics}"));
    assert_eq!(drops, 0.0, "events dropped at this rate");

    // A container that opts out is not traced.
    let mut off = ContainerSpec::new("untraced", &image, &["sleep", "3600"]);
    off.annotations
        .insert("trace.hyperbox.dev/enabled".into(), "false".into());
    let untraced = cri.create_container(&pod, &off).await.unwrap();
    cri.start_container(&untraced).await.unwrap();
    let out = agent.hb_output(&["trace", &untraced]);
    assert!(!out.status.success());

    for id in [&worker, &quiet, &untraced, &hog, &server, &client] {
        cri.remove_container(id).await.unwrap();
    }
    // Removed: results dropped.
    assert!(!agent.hb_output(&["trace", &worker]).status.success());
    cri.remove_pod(&pod).await.unwrap();
    // Nothing watched any more: the syscall hook is detached again once it
    // has lingered (hook_linger_secs = 2) in case another container comes.
    let start = Instant::now();
    while agent.health().await.unwrap()["tracing_syscall_hook_attached"] == true {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "hook never detached"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(links_of(&ours), 4);
    assert!(agent.shutdown().is_empty());

    // OpenTelemetry: a span per container lifetime, received by an OTLP
    // receiver (everything was flushed when the agent stopped).
    assert!(otlp.bad_requests().is_empty(), "{:?}", otlp.bad_requests());
    let spans = otlp.spans();
    let span_of = |id: &str| {
        spans
            .iter()
            .find(|s| s.attributes.get("container.id").is_some_and(|c| c == id))
            .unwrap_or_else(|| panic!("no span for {id} in {spans:#?}"))
    };
    let w = span_of(&worker);
    assert_eq!(w.name, "container worker");
    assert_eq!(w.resource["service.name"], "hyperbox-agent");
    assert!(
        w.parent_span_id.is_empty() && w.end_ns > w.start_ns,
        "{w:?}"
    );
    assert!(
        w.attributes["hyperbox.syscalls"].parse::<u64>().unwrap() > 0,
        "{w:?}"
    );
    assert!(
        w.attributes["hyperbox.execs"].parse::<u64>().unwrap() >= 2,
        "{w:?}"
    );
    let first_exec = w.events.iter().find(|e| e.0 == "exec").expect("exec event");
    // argv as far as the event keeps it (128 bytes).
    assert!(
        first_exec.2["process.command_args"].starts_with(&format!("sh -c {script} sh /")),
        "{first_exec:?}"
    );
    assert!(
        first_exec.1 >= w.start_ns && first_exec.1 <= w.end_ns,
        "{w:?}"
    );
    let h = span_of(&hog);
    assert_eq!(h.status.0, 2, "OOM kill marks the span as an error: {h:?}");
    assert!(h.events.iter().any(|e| e.0 == "oom_kill"), "{h:?}");
    assert_eq!(span_of(&worker).status.0, 0);
    // Each connection is a child span of its container's.
    let c = span_of(&client);
    let children: Vec<_> = spans
        .iter()
        .filter(|s| s.parent_span_id == c.span_id)
        .collect();
    assert_eq!(children.len(), 2, "{children:#?}");
    for child in &children {
        assert_eq!(child.name, "tcp connect");
        assert_eq!(child.trace_id, c.trace_id);
        assert!(child.end_ns >= child.start_ns);
        assert!(
            child.attributes["hyperbox.tcp.bytes_out"]
                .parse::<u64>()
                .unwrap()
                >= 10_000
        );
    }
    let mut peers: Vec<_> = children
        .iter()
        .map(|s| {
            s.attributes["network.peer.address"].clone() + " " + &s.attributes["network.peer.port"]
        })
        .collect();
    peers.sort();
    assert_eq!(peers, ["127.0.0.1 17777", "::1 17778"]);
    let q = span_of(&quiet);
    assert!(
        !spans.iter().any(|s| s.parent_span_id == q.span_id),
        "the neighbour made no connection"
    );
    assert!(
        !spans
            .iter()
            .any(|s| s.attributes.get("container.id") == Some(&untraced))
    );
    // Nothing the agent loaded stays loaded: no program, no link, no map,
    // and nothing pinned.
    let start = Instant::now();
    loop {
        let mut left: Vec<u64> = loaded_programs()
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| ours.contains(id))
            .collect();
        left.extend(loaded_maps().into_iter().filter(|id| our_maps.contains(id)));
        if left.is_empty() && links_of(&ours) == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "BPF programs or maps left: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pinned: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("hb") || n.contains("hyperbox"))
        .collect();
    assert!(pinned.is_empty(), "pinned: {pinned:?}");
    tb.finish();
}

#[tokio::test(flavor = "multi_thread")]
async fn on_v1_the_tracer_tells_containers_apart_by_memory_cgroup_and_samples_opens_under_pressure()
{
    require_tracer!();
    // This host is hybrid; `cgroup_hierarchy = "v1"` makes the tracer
    // identify containers as it does on a pure v1 host: by the v1 memory
    // cgroup read from the task. A 16 KiB ring (about 400 open events of
    // an empty path) makes a burst of opens overflow it. Syscalls are counted for each
    // container's first 3 s only. The OTLP collector is down
    // (nothing listens on the discard port): export fails, is logged, and
    // nothing else is held up.
    let tb = Testbed::start().await;
    let agent = AgentDaemon::start(
        &tb.containerd.nri_socket(),
        "[tracing]\ncgroup_hierarchy = \"v1\"\nring_buffer_bytes = 16384\n\
         otlp_endpoint = \"http://127.0.0.1:9\"\nsyscall_window_secs = 3\n\
         syscall_sample_every_secs = 0\nhook_linger_secs = 0\n",
    )
    .await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    let health = agent.health().await.unwrap();
    assert_eq!(health["tracing"], true, "{health}");
    assert_eq!(health["tracing_cgroup"], "v1 memory", "{health}");
    // v1 cgroups are not reachable as trusted pointers for cgroup storage:
    // counting goes through the raw tracepoint and a hash there.
    assert_eq!(
        health["tracing_syscall_hook"], "raw_tracepoint/sys_enter",
        "{health}"
    );

    // A host-side listener for the worker's connect.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::Read;
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got.len()
    });

    let (image, cri, pod, quiet) = pod_with_quiet_neighbour(&tb, "traced-v1").await;
    let script = format!(
        "cat /etc/hostname >/dev/null; head -c 5000 /dev/zero | nc 127.0.0.1 {port}; \
         exec /bin/busybox true"
    );
    let worker = cri
        .create_container(
            &pod,
            &ContainerSpec::new("worker", &image, &["sh", "-c", &script]),
        )
        .await
        .unwrap();
    cri.start_container(&worker).await.unwrap();
    assert_eq!(
        cri.wait_exited(&worker, Duration::from_secs(30))
            .await
            .unwrap(),
        0
    );
    assert_eq!(server.join().unwrap(), 5000);
    let start = Instant::now();
    let t = loop {
        let t = trace_of(&agent, &worker).await;
        if t["flow_count"] == 1 || start.elapsed() > Duration::from_secs(10) {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(t["execs"][0]["args"][2], script.as_str(), "{t}");
    assert!(opened_path(&t, "/etc/hostname"), "{t}");
    assert!(t["syscalls"][EXECVE].as_u64().unwrap_or(0) >= 2, "{t}");
    assert_eq!(t["flow_count"], 1, "{t}");
    assert_eq!(t["flows"][0]["remote"], format!("127.0.0.1:{port}"), "{t}");
    assert!(t["flows"][0]["bytes_out"].as_u64().unwrap() >= 5000, "{t}");
    let q = trace_of(&agent, &quiet).await;
    assert_eq!(q["flow_count"], 0, "{q}");
    assert!(q["execs"].as_array().unwrap().len() <= 1, "{q}");
    assert!(!opened_path(&q, "/etc/hostname"), "{q}");

    // The counting window: a container that works for longer than 3 s has
    // its syscalls counted (and opens seen) only for the first 3 s; its
    // later exec is still traced. Meanwhile, with the neighbour's window
    // closed too, nothing is counted and the syscall hook is detached.
    let late = cri
        .create_container(
            &pod,
            &ContainerSpec::new(
                "late",
                &image,
                &["sh", "-c", "sleep 5; exec /bin/busybox cat /etc/hostname"],
            ),
        )
        .await
        .unwrap();
    cri.start_container(&late).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let health = agent.health().await.unwrap();
    assert_eq!(health["tracing_syscall_hook_attached"], false, "{health}");
    let before = trace_of(&agent, &late).await;
    assert_eq!(before["syscall_window_closed"], true, "{before}");
    assert_eq!(before["live"], true, "{before}");
    cri.wait_exited(&late, Duration::from_secs(30))
        .await
        .unwrap();
    let start = Instant::now();
    let after = loop {
        let t = trace_of(&agent, &late).await;
        if t["exec_count"].as_u64() >= Some(3) || start.elapsed() > Duration::from_secs(5) {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        after["syscalls"], before["syscalls"],
        "frozen at the window"
    );
    assert!(
        after["execs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["args"].to_string().contains("/etc/hostname")),
        "{after}"
    );
    assert!(
        !opened_path(&after, "/etc/hostname"),
        "an open after the window: {after}"
    );

    // OOM kills by the victim's v1 memory cgroup.
    let (hog, h) = oom_hog(&cri, &pod, &image, &agent).await;
    assert_eq!(h["oom_killed"].as_array().unwrap().len(), 1, "{h}");

    let burst =
        opens_under_pressure_are_accounted_to_their_container(&cri, &pod, &image, &agent, &quiet)
            .await;

    for id in [&worker, &quiet, &hog, &burst, &late] {
        cri.remove_container(id).await.unwrap();
    }
    cri.remove_pod(&pod).await.unwrap();
    // The batch exporter tried (every 5 s) and said why it failed.
    let start = Instant::now();
    while !agent.log().contains("ExportError") {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no export error logged: {}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(agent.health().await.unwrap()["status"], "ok");
    let ours = programs_of(agent.pid().expect("agent pid"));
    // Stopping does not hang on the unreachable collector.
    let start = Instant::now();
    assert!(agent.shutdown().is_empty());
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let start = Instant::now();
    while loaded_programs().iter().any(|(id, _)| ours.contains(id)) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "BPF programs left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    tb.finish();
}

#[tokio::test(flavor = "multi_thread")]
async fn after_its_window_a_container_is_counted_in_short_samples_that_keep_its_rate_current() {
    require_tracer!();
    // Windows of 1 s, then a 1 s sample every 3 s, all containers at once;
    // the hook is attached only while something is counted.
    let tb = Testbed::start().await;
    let agent = AgentDaemon::start(
        &tb.containerd.nri_socket(),
        "[tracing]\nsyscall_window_secs = 1\nsyscall_sample_every_secs = 3\n\
         syscall_sample_ms = 1000\nhook_linger_secs = 0\n",
    )
    .await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    let (image, cri, pod, quiet) = pod_with_quiet_neighbour(&tb, "sampled").await;
    let busy = cri
        .create_container(
            &pod,
            &ContainerSpec::new(
                "busy",
                &image,
                &[
                    "sh",
                    "-c",
                    "while true; do cat /etc/hostname >/dev/null; done",
                ],
            ),
        )
        .await
        .unwrap();
    cri.start_container(&busy).await.unwrap();
    let hook = async || agent.health().await.unwrap()["tracing_syscall_hook_attached"] == true;

    // Past both windows: counts frozen, the window's rate kept, hook off.
    let start = Instant::now();
    let closed = loop {
        let t = trace_of(&agent, &busy).await;
        if t["syscall_window_closed"] == true && !hook().await {
            break t;
        }
        assert!(start.elapsed() < Duration::from_secs(3), "{t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(closed["syscall_samples"], 0, "{closed}");
    let window_rate = closed["syscall_rate"].as_f64().unwrap();
    assert!(window_rate > 100.0, "{closed}");
    let q = trace_of(&agent, &quiet).await;
    assert_eq!(q["syscall_window_closed"], true, "{q}");

    // A sample comes: the hook is attached, then detached again, and the
    // busy container's counts and rate moved while the sleeper's barely did.
    let start = Instant::now();
    while !hook().await {
        assert!(start.elapsed() < Duration::from_secs(4), "no sample");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start = Instant::now();
    let sampled = loop {
        let t = trace_of(&agent, &busy).await;
        if t["syscall_samples"].as_u64() >= Some(1) {
            break t;
        }
        assert!(start.elapsed() < Duration::from_secs(3), "{t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!hook().await, "the hook lingered after a sample");
    let (before, after) = (
        closed["syscall_total"].as_u64().unwrap(),
        sampled["syscall_total"].as_u64().unwrap(),
    );
    assert!(after > before + 100, "{before} -> {after}");
    let rate = sampled["syscall_rate"].as_f64().unwrap();
    assert!(rate > 100.0 && rate != window_rate, "{sampled}");
    // The sleeper is sampled too (samples cover every past-window
    // container). Its count may differ from the busy one's by the sample
    // that was running when either window closed, and a loaded machine can
    // start the next sample between two reads: check its presence and the
    // spread, not equality.
    let b = trace_of(&agent, &busy).await["syscall_samples"]
        .as_u64()
        .unwrap();
    let q = trace_of(&agent, &quiet).await["syscall_samples"]
        .as_u64()
        .unwrap();
    assert!(q >= 1, "the sleeper was never sampled");
    assert!(q.abs_diff(b) <= 1, "sleeper {q} vs busy {b} samples");
    let (_, metrics) = agent.http_get("/metrics").await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("hyperbox_container_syscall_rate{") && l.contains(&busy)),
        "{metrics}"
    );
    // Between samples `hb top` shows the sampled rate, not zero.
    let top: Value =
        serde_json::from_str(&agent.hb(&["top", "--once", "--interval", "0.5", "--json"])).unwrap();
    let row = top["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == busy.as_str())
        .unwrap()
        .clone();
    assert!(row["syscalls_per_sec"].as_f64().unwrap() > 100.0, "{top}");

    // A workload to learn in full: its annotation keeps its window open
    // for its whole life, and the hook stays attached while it runs.
    let mut spec = ContainerSpec::new(
        "learner",
        &image,
        &["sh", "-c", "while true; do sleep 0.1; done"],
    );
    spec.annotations
        .insert("trace.hyperbox.dev/syscall-window-secs".into(), "0".into());
    let learner = cri.create_container(&pod, &spec).await.unwrap();
    cri.start_container(&learner).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let l = trace_of(&agent, &learner).await;
    assert_eq!(l["syscall_window_closed"], false, "{l}");
    assert!(hook().await);
    for id in [&learner, &busy, &quiet] {
        cri.remove_container(id).await.unwrap();
    }
    let start = Instant::now();
    while hook().await {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "hook left attached"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cri.remove_pod(&pod).await.unwrap();
    assert!(agent.shutdown().is_empty());
    tb.finish();
}

#[tokio::test(flavor = "multi_thread")]
async fn under_pressure_each_container_is_told_which_of_its_opens_were_sampled_out_or_lost() {
    require_tracer!();
    // v2 (the opens come from the cgroup-storage path): a 16 KiB ring.
    let tb = Testbed::start().await;
    let agent = AgentDaemon::start(
        &tb.containerd.nri_socket(),
        "[tracing]\nring_buffer_bytes = 16384\nhook_linger_secs = 0\n",
    )
    .await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    let (image, cri, pod, quiet) = pod_with_quiet_neighbour(&tb, "pressure").await;
    let burst =
        opens_under_pressure_are_accounted_to_their_container(&cri, &pod, &image, &agent, &quiet)
            .await;
    // Frozen at stop: the figures outlive the kernel's entry.
    let stopped = trace_of(&agent, &burst).await;
    assert_eq!(stopped["live"], false, "{stopped}");
    assert!(stopped["sampled_out"].as_u64().unwrap() > 0, "{stopped}");
    let text = agent.hb(&["trace", &burst]);
    assert!(text.contains("opens sampled out"), "{text}");
    for id in [&burst, &quiet] {
        cri.remove_container(id).await.unwrap();
    }
    cri.remove_pod(&pod).await.unwrap();
    assert!(agent.shutdown().is_empty());
    tb.finish();
}
