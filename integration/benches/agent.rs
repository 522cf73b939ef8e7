//! The node agent against no agent, in one run on one containerd 1.7.24:
//!
//! 1. the agent's answer to CreateContainer, timed at the runtime's end of
//!    the NRI socket (the bench plays containerd, sending CreateContainer
//!    for a workload with a learned history, so the full sizing path runs);
//! 2. CRI CreateContainer and StartContainer through containerd with the
//!    agent registered vs with no NRI plugin, batches alternating;
//! 3. density: N containers whose memory swings between 16 and 48 MiB
//!    under a pod cgroup limited to 320 MiB, with static limits (the
//!    parent split evenly) vs the adaptive policy after one learning run:
//!    OOM kills, memory stall time, containers packed.
//!
//! `cargo bench -p hyperbox-integration --bench agent` (as root) runs it and
//! rewrites its section of docs/benchmarks.md; under `cargo test` it runs a
//! small smoke of each part.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyperbox_integration::agent::AgentDaemon;
use hyperbox_integration::bench::{full_run, machine, ms, percentile, rss_bytes, write_section};
use hyperbox_integration::cri::{ContainerSpec, Cri, Pod, PodNetwork};
use hyperbox_integration::prereq::{self, Prereq};
use hyperbox_integration::testbed::Testbed;
use hyperbox_nri_proto::api;
use hyperbox_nri_proto::mux::{self, encode_frame, read_frame};
use hyperbox_nri_proto::ttrpc::{self, Decoded, Decoder};
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

const MIB: u64 = 1 << 20;

fn med(v: &[Duration]) -> Duration {
    percentile(v, 50.0)
}

// ---------------------------------------------------------------- part 1

async fn read_message(s: &mut UnixStream, conn: u32) -> ttrpc::Frame {
    let mut d = Decoder::default();
    loop {
        let f = read_frame(s).await.unwrap().unwrap();
        assert_eq!(f.conn, conn);
        d.push(&f.payload);
        if let Some(Decoded::Frame(m)) = d.next_message() {
            return m;
        }
    }
}

fn nri_request(stream: u32, method: &str, payload: Vec<u8>) -> Vec<u8> {
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

/// A CRI-shaped container: pod, annotations, cgroups path, a user limit.
fn container(i: usize) -> api::ContainerRequest {
    let mut annotations = std::collections::HashMap::new();
    for (k, v) in [
        ("io.kubernetes.cri.container-type", "container"),
        ("io.kubernetes.cri.container-name", "app"),
        ("io.kubernetes.cri.image-name", "registry.local/team/app:v1"),
        ("io.kubernetes.cri.sandbox-name", "web-0"),
        ("io.kubernetes.cri.sandbox-namespace", "shop"),
        ("hyperbox.dev/workload", "bench"),
    ] {
        annotations.insert(k.to_string(), v.to_string());
    }
    let id = format!("{i:064x}");
    api::ContainerRequest {
        pod: Some(api::PodSandbox {
            id: "pod".into(),
            name: "web-0".into(),
            uid: "uid".into(),
            namespace: "shop".into(),
            ..Default::default()
        }),
        container: Some(api::Container {
            id: id.clone(),
            pod_sandbox_id: "pod".into(),
            name: "app".into(),
            state: 1,
            annotations,
            args: vec!["/app".into(), "--serve".into()],
            linux: Some(api::LinuxContainer {
                resources: Some(api::LinuxResources::memory(512 * MIB as i64, None)),
                cgroups_path: format!("/kubepods/pod/{id}"),
                ..Default::default()
            }),
            ..Default::default()
        }),
        linux_resources: None,
    }
}

/// Round trips of CreateContainer (then RemoveContainer, untimed) through
/// the real agent binary.
async fn nri_round_trips(n: usize) -> Vec<Duration> {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nri.sock");
    let l = UnixListener::bind(&sock).unwrap();
    // A learned history, so each answer sizes the container.
    let mut agent = AgentDaemon::new(&sock, "[memory]\ndefault_policy = \"adaptive\"\n");
    std::fs::write(
        agent.state_dir().join("workloads.json"),
        br#"{"version":1,"workloads":{"shop/bench":{"runs":[104857600],"updated":0}}}"#,
    )
    .unwrap();
    agent.start_again().await;
    let (mut s, _) = l.accept().await.unwrap();
    let reg = read_message(&mut s, mux::RUNTIME_CONN).await;
    let ok = ttrpc::Response {
        status: None,
        payload: api::Empty {}.encode_to_vec(),
    };
    s.write_all(&encode_frame(
        mux::RUNTIME_CONN,
        &ttrpc::encode(reg.header.stream, ttrpc::TYPE_RESPONSE, &ok),
    ))
    .await
    .unwrap();
    let mut stream = 1u32;
    let mut call = async |s: &mut UnixStream, method: &str, payload: Vec<u8>| {
        let req = nri_request(stream, method, payload);
        stream += 2;
        let t = Instant::now();
        s.write_all(&req).await.unwrap();
        let m = read_message(s, mux::PLUGIN_CONN).await;
        let took = t.elapsed();
        let r = ttrpc::Response::decode(m.body).unwrap();
        assert!(r.status.is_none(), "{method}: {r:?}");
        (took, r.payload)
    };
    call(
        &mut s,
        "Configure",
        api::ConfigureRequest {
            runtime_name: "bench".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    )
    .await;
    let mut out = Vec::with_capacity(n);
    for i in 0..n + 20 {
        let req = container(i);
        let (took, payload) = call(&mut s, "CreateContainer", req.encode_to_vec()).await;
        let resp = api::CreateContainerResponse::decode(payload.as_slice()).unwrap();
        let limit = resp
            .adjust
            .and_then(|a| a.linux)
            .and_then(|l| l.resources)
            .and_then(|r| r.memory_limit());
        assert!(limit.is_some(), "no limit in the adjustment");
        call(&mut s, "RemoveContainer", req.encode_to_vec()).await;
        // The first 20 warm up the connection and the allocator.
        if i >= 20 {
            out.push(took);
        }
    }
    drop(s);
    assert!(agent.shutdown().is_empty());
    out
}

// ---------------------------------------------------------------- part 2

/// CreateContainer and StartContainer times of `n` containers.
async fn create_start(
    cri: &Cri,
    pod: &Pod,
    image: &str,
    n: usize,
    tag: &str,
) -> (Vec<Duration>, Vec<Duration>) {
    let (mut create, mut start) = (Vec::new(), Vec::new());
    for i in 0..n {
        let spec = ContainerSpec::new(&format!("{tag}-{i}"), image, &[]);
        let t = Instant::now();
        let id = cri.create_container(pod, &spec).await.unwrap();
        create.push(t.elapsed());
        let t = Instant::now();
        cri.start_container(&id).await.unwrap();
        start.push(t.elapsed());
        cri.remove_container(&id).await.unwrap();
    }
    (create, start)
}

// ---------------------------------------------------------------- part 3

/// Swings between 16 MiB (4 s) and 48 MiB (2 s), from a random phase.
const SWING: &str = "sleep $((RANDOM % 6)); while true; do \
    dd if=/dev/zero bs=16M count=1 2>/dev/null | sleep 4; \
    dd if=/dev/zero bs=48M count=1 2>/dev/null | sleep 2; done";

#[derive(Debug, Default, Clone)]
struct Density {
    containers: usize,
    oom_kills: u64,
    stall: Duration,
    running_at_end: usize,
    /// The agent's CPU time over the scenario, as a share of one core.
    agent_cpu: f64,
    /// The agent's resident memory at the end.
    agent_rss: u64,
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

fn v1_memory(rel: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup/memory").join(rel.trim_start_matches('/'))
}

fn oom_kills(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("memory.oom_control"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        .unwrap_or(0)
}

fn stall_total(rel: &str) -> Duration {
    let p = Path::new("/sys/fs/cgroup/unified")
        .join(rel.trim_start_matches('/'))
        .join("memory.pressure");
    // The bench reads the kernel's `some ... total=US` itself rather than
    // through the agent it measures.
    let text = std::fs::read_to_string(&p).unwrap_or_default();
    let us = text
        .lines()
        .find(|l| l.starts_with("some "))
        .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("total=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Duration::from_micros(us)
}

/// Runs `n` swinging containers in a fresh pod limited to `parent` bytes
/// for `secs`; `limit` is each container's static limit (0: none), and
/// `policy` the annotation.
#[allow(clippy::too_many_arguments)]
async fn density(
    tb: &Testbed,
    cri: &Cri,
    image: &str,
    name: &str,
    n: usize,
    parent: u64,
    limit: u64,
    policy: &str,
    secs: u64,
    agent_pid: u32,
) -> Density {
    let pod = cri.run_pod(name, PodNetwork::Host).await.unwrap();
    let rel = format!("{}/pod-{name}", tb.containerd.cgroup_prefix());
    std::fs::write(
        v1_memory(&rel).join("memory.limit_in_bytes"),
        parent.to_string(),
    )
    .unwrap();
    let before = (oom_kills(&v1_memory(&rel)), stall_total(&rel));
    let mut ids = Vec::new();
    for i in 0..n {
        let mut s = ContainerSpec::new(&format!("swing-{i}"), image, &["sh", "-c", SWING]);
        s.memory_limit = limit as i64;
        s.annotations
            .insert("memory.hyperbox.dev/policy".into(), policy.into());
        s.annotations
            .insert("hyperbox.dev/workload".into(), "swing".into());
        let id = cri.create_container(&pod, &s).await.unwrap();
        cri.start_container(&id).await.unwrap();
        ids.push(id);
    }
    let cpu_before = cpu_seconds(agent_pid);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let agent_cpu = (cpu_seconds(agent_pid) - cpu_before) / secs as f64;
    let agent_rss = rss_bytes(agent_pid);
    let mut running = 0;
    for id in &ids {
        if cri.container_status(id).await.unwrap().state == 1 {
            running += 1;
        }
    }
    // Kills are counted in the victim's cgroup; whether v1 also adds them
    // up the tree differs between kernels, so take the larger of the pod's
    // counter and the sum over its containers (read before removal).
    let in_containers: u64 = ids
        .iter()
        .map(|id| oom_kills(&v1_memory(&format!("{rel}/{id}"))))
        .sum();
    let pod_kills = oom_kills(&v1_memory(&rel)) - before.0;
    let after = (before.0 + pod_kills.max(in_containers), stall_total(&rel));
    for id in &ids {
        cri.remove_container(id).await.unwrap();
    }
    cri.remove_pod(&pod).await.unwrap();
    Density {
        containers: n,
        oom_kills: after.0 - before.0,
        stall: after.1.saturating_sub(before.1),
        running_at_end: running,
        agent_cpu,
        agent_rss,
    }
}

#[tokio::main]
async fn main() {
    let full = full_run();
    let needs: Vec<Prereq> = Prereq::CONTAINERS
        .iter()
        .copied()
        .chain([Prereq::Psi])
        .collect();
    if !prereq::require("bench agent", &needs) {
        return;
    }
    // A hybrid host: the density part sets v1 memory limits on the pod.
    let hybrid = Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists()
        && Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists();

    // Part 1.
    let n = if full { 2000 } else { 20 };
    let rt = nri_round_trips(n).await;

    // Part 2.
    let tb = Testbed::start().await;
    let image = tb.push_sleeper().await;
    let cri = tb.containerd.cri().await.unwrap();
    cri.pull_image(&image).await.unwrap();
    let pod = cri.run_pod("bench", PodNetwork::Host).await.unwrap();
    let (rounds, per) = if full { (4, 10) } else { (1, 2) };
    let (mut with, mut without) = ((vec![], vec![]), (vec![], vec![]));
    // Warm up containerd's paths once.
    create_start(&cri, &pod, &image, 2, "warm").await;
    for r in 0..rounds {
        let agent = AgentDaemon::start(
            &tb.containerd.nri_socket(),
            "[memory]\ndefault_policy = \"adaptive\"\n",
        )
        .await;
        agent.wait_connected(true, Duration::from_secs(20)).await;
        let (c, s) = create_start(&cri, &pod, &image, per, &format!("with{r}")).await;
        with.0.extend(c);
        with.1.extend(s);
        assert!(agent.shutdown().is_empty());
        // containerd notices the plugin is gone at its next request; give
        // it that request outside the measurement.
        create_start(&cri, &pod, &image, 1, &format!("drop{r}")).await;
        let (c, s) = create_start(&cri, &pod, &image, per, &format!("without{r}")).await;
        without.0.extend(c);
        without.1.extend(s);
    }
    cri.remove_pod(&pod).await.unwrap();

    // Part 3.
    let mut dens = Vec::new();
    if hybrid {
        let agent = AgentDaemon::start(
            &tb.containerd.nri_socket(),
            "[memory]\ndefault_policy = \"off\"\nsample_interval_secs = 1\n",
        )
        .await;
        agent.wait_connected(true, Duration::from_secs(20)).await;
        let (secs, learn) = if full { (90, 20) } else { (8, 8) };
        let pid = agent.pid().expect("agent runs");
        let parent = 320 * MIB;
        // Static: the parent split evenly, the usual way to pack safely.
        dens.push((
            "static limits (parent / 8 = 40 MiB each)",
            density(
                &tb,
                &cri,
                &image,
                "static8",
                8,
                parent,
                parent / 8,
                "off",
                secs,
                pid,
            )
            .await,
        ));
        // One learning run of the workload (observe), then adaptive.
        density(
            &tb, &cri, &image, "learn", 1, parent, 0, "observe", learn, pid,
        )
        .await;
        dens.push((
            "adaptive (learned), 8 containers",
            density(
                &tb,
                &cri,
                &image,
                "adaptive8",
                8,
                parent,
                0,
                "adaptive",
                secs,
                pid,
            )
            .await,
        ));
        dens.push((
            "adaptive (learned), 10 containers",
            density(
                &tb,
                &cri,
                &image,
                "adaptive10",
                10,
                parent,
                0,
                "adaptive",
                secs,
                pid,
            )
            .await,
        ));
        let learned = std::fs::read_to_string(agent.state_dir().join("workloads.json")).unwrap();
        println!("learned: {learned}");
        assert!(agent.shutdown().is_empty());
    }
    tb.finish();

    // Report.
    let mut body = String::new();
    body.push_str("## Node agent: NRI latency, container start, density\n\n");
    body.push_str(&format!(
        "`cargo bench -p hyperbox-integration --bench agent` (as root), {}.\n\n",
        machine()
    ));
    body.push_str(&format!(
        "**The agent's CreateContainer answer**, timed at the runtime's end of the NRI socket \
         (the bench plays containerd; {n} requests after 20 warm-up, each for a workload with a \
         learned history so the full sizing path runs, then RemoveContainer):\n\n\
         | p50 | p99 | max |\n|---|---|---|\n| {} | {} | {} |\n\n",
        ms(med(&rt)),
        ms(percentile(&rt, 99.0)),
        ms(*rt.iter().max().unwrap())
    ));
    body.push_str(&format!(
        "**Through containerd** (CRI, {} containers per mode in {rounds} alternating batches): \
         the agent registered (policy adaptive, no history: learning) vs no NRI plugin.\n\n\
         | call | no agent p50 | agent p50 | agent − none | no agent p99 | agent p99 |\n|---|---|---|---|---|---|\n",
        rounds * per
    ));
    for (i, call) in ["CreateContainer", "StartContainer"].iter().enumerate() {
        let (a, b) = if i == 0 {
            (&without.0, &with.0)
        } else {
            (&without.1, &with.1)
        };
        body.push_str(&format!(
            "| {call} | {} | {} | {:+.2} ms | {} | {} |\n",
            ms(med(a)),
            ms(med(b)),
            (med(b).as_secs_f64() - med(a).as_secs_f64()) * 1000.0,
            ms(percentile(a, 99.0)),
            ms(percentile(b, 99.0)),
        ));
    }
    let total = |v: &(Vec<Duration>, Vec<Duration>)| -> Vec<Duration> {
        v.0.iter().zip(&v.1).map(|(a, b)| *a + *b).collect()
    };
    let (tw, to) = (total(&with), total(&without));
    body.push_str(&format!(
        "\nCreate + start, median: {} with the agent vs {} without: **{:.3}×** (target below 1.05×).\n\n",
        ms(med(&tw)),
        ms(med(&to)),
        med(&tw).as_secs_f64() / med(&to).as_secs_f64()
    ));
    if !dens.is_empty() {
        body.push_str(
            "**Density**: containers swinging between 16 MiB (4 s) and 48 MiB (2 s) from random \
             phases, in one pod whose cgroup is limited to 320 MiB. Static: each container limited \
             to 40 MiB (the parent split evenly). Adaptive: no user limit; the agent sizes each from \
             one earlier learning run of the workload and adjusts by PSI. OOM kills and stall are \
             the pod cgroup's (all its containers).\n\n\
             | scenario | containers | running at end | OOM kills | memory stall | agent CPU | agent RSS |\n|---|---|---|---|---|---|---|\n",
        );
        for (name, d) in &dens {
            body.push_str(&format!(
                "| {name} | {} | {} | {} | {:.2} s | {:.2} % of a core | {:.1} MiB |\n",
                d.containers,
                d.running_at_end,
                d.oom_kills,
                d.stall.as_secs_f64(),
                d.agent_cpu * 100.0,
                d.agent_rss as f64 / MIB as f64
            ));
        }
    }
    println!("{body}");
    if full {
        let path = write_section("agent", &body).unwrap();
        println!("written to {}", path.display());
    }
}
