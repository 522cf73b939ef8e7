//! The real `crictl` (cri-tools, built from its Go module) against a
//! containerd whose CRI uses hyperbox as its snapshotter, with the node
//! agent registered over NRI: the commands an operator types on a
//! Kubernetes node, checked by what they print and by what hyperbox and
//! the agent saw. The harness's own CRI client stays the independent
//! reference (`tests/cri.rs`); this proves the product with the tool users
//! have.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::time::Duration;

use hyperbox_integration::agent::AgentDaemon;
use hyperbox_integration::containerd::CRI_NAMESPACE;
use hyperbox_integration::distro;
use hyperbox_integration::image::{Compression, ImageSpec, Layer};
use hyperbox_integration::prereq::{self, Prereq};
use hyperbox_integration::snapshotter::NAME;
use hyperbox_integration::testbed::Testbed;
use hyperbox_integration::tools::{self, Crictl};
use hyperbox_integration::{require, require_containers};
use serde_json::{Value, json};

/// Skips (or fails with `HYPERBOX_REQUIRE_ALL=1`) without crictl.
macro_rules! require_crictl {
    () => {
        require_containers!();
        require!(Prereq::Psi);
        if let Some(why) = tools::missing(&[tools::crictl_bin()]) {
            if prereq::require_all() {
                panic!("{}: {why}", module_path!());
            }
            eprintln!("SKIPPED {}: {why}", module_path!());
            return;
        }
    };
}

/// Builds `spec`, pushes it as `repo:tag`; the reference and the layers'
/// compressed digests, bottom first.
async fn push(tb: &Testbed, spec: &ImageSpec, repo: &str, tag: &str) -> (String, Vec<String>) {
    let built = spec
        .build(
            &tb.work_dir()
                .join(format!("{repo}-{tag}").replace('/', "_")),
        )
        .unwrap();
    let reference = built.push(&tb.registry.host(), repo, tag).await.unwrap();
    let layers = built.layers.iter().map(|l| l.blob.digest.clone()).collect();
    (reference, layers)
}

/// Every layer of the image came through hyperbox's remote path: containerd
/// never stored the blob, and hyperbox holds a committed snapshot made from
/// exactly that layer, labelled by the Prepare that CRI sent.
async fn assert_served_remotely(tb: &mut Testbed, layers: &[String]) {
    let client = tb
        .containerd
        .client()
        .await
        .unwrap()
        .with_namespace(CRI_NAMESPACE);
    let snapshots = tb.hyperbox().list(&[]).await.unwrap();
    for d in layers {
        assert!(
            !client.content_exists(d).await.unwrap(),
            "containerd downloaded layer {d} itself"
        );
        assert!(
            snapshots.iter().any(|s| {
                s.kind == 3 // committed
                    && s.labels.get(hyperbox_api::labels::CRI_LAYER_DIGEST) == Some(d)
            }),
            "no committed hyperbox snapshot of layer {d}: {snapshots:#?}"
        );
    }
}

/// A pod config as `crictl runp` reads it: host network (no CNI needed),
/// logs and cgroups inside the instance so teardown finds them.
fn pod_config(tb: &Testbed, name: &str) -> std::path::PathBuf {
    let dir = tb.containerd.dir().join("crictl").join(name);
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let pod = json!({
        "metadata": {
            "name": name,
            "namespace": "crictl-test",
            "uid": format!("{:016x}", rand::random::<u64>()),
            "attempt": 1
        },
        "log_directory": dir.join("logs"),
        "linux": {
            "cgroup_parent": format!("{}/pod-{name}", tb.containerd.cgroup_prefix()),
            "security_context": { "namespace_options": { "network": 2 } }
        }
    });
    let path = dir.join("pod.json");
    std::fs::write(&path, pod.to_string()).unwrap();
    path
}

/// A container config as `crictl create` reads it.
fn container_config(
    pod_json: &std::path::Path,
    name: &str,
    image: &str,
    cmd: &[&str],
) -> std::path::PathBuf {
    let c = json!({
        "metadata": { "name": name },
        "image": { "image": image },
        "command": cmd,
        "log_path": format!("{name}.log"),
        "linux": {}
    });
    let path = pod_json.with_file_name(format!("{name}.json"));
    std::fs::write(&path, c.to_string()).unwrap();
    path
}

/// `crictl runp`, `create` and `start` of a container running `image`'s
/// own command in a new pod; the pod's and the container's ids.
fn start_in_pod(
    crictl: &Crictl,
    tb: &Testbed,
    pod: &str,
    name: &str,
    image: &str,
) -> (String, String) {
    let pod_json = pod_config(tb, pod);
    let pod = crictl.id(&["runp", pod_json.to_str().unwrap()]).unwrap();
    let c_json = container_config(&pod_json, name, image, &[]);
    let id = crictl
        .id(&[
            "create",
            &pod,
            c_json.to_str().unwrap(),
            pod_json.to_str().unwrap(),
        ])
        .unwrap();
    crictl.run(&["start", &id]).unwrap();
    (pod, id)
}

fn inspect(crictl: &Crictl, id: &str) -> Value {
    crictl.json(&["inspect", "-o", "json", id]).unwrap()
}

fn wait_state(crictl: &Crictl, id: &str, state: &str) -> Value {
    tools::poll(Duration::from_secs(30), || {
        let v = inspect(crictl, id);
        (v["status"]["state"] == state).then_some(v)
    })
    .unwrap_or_else(|| panic!("{id} never {state}: {:#}", inspect(crictl, id)))
}

/// The first sample of `field` (`workingSetBytes`, `usageBytes`) in the
/// memory stats `crictl stats -o json` prints for `id`.
fn memory_stat(crictl: &Crictl, id: &str, field: &str) -> u64 {
    let v = crictl.json(&["stats", "-o", "json", "--id", id]).unwrap();
    let s = &v["stats"][0]["memory"][field]["value"];
    s.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| s.as_u64())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crictl_runs_a_pod_on_hyperbox_with_the_agent_watching() {
    require_crictl!();
    let mut tb = Testbed::start_hyperbox(|b| b).await;
    let agent = AgentDaemon::start(&tb.containerd.nri_socket(), "").await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    let crictl = Crictl::new(&tb.containerd).unwrap();

    let version = crictl.run(&["version"]).unwrap();
    assert!(version.contains("RuntimeName:  containerd"), "{version}");

    let spec = ImageSpec::busybox(&["sh", "-c", "echo hello from crictl; sleep 3600"]).unwrap();
    let (image, layers) = push(&tb, &spec, "test/crictl", "v1").await;
    let pulled = crictl.run(&["pull", &image]).unwrap();
    assert!(
        pulled.contains("Image is up to date for sha256:"),
        "{pulled}"
    );
    assert_served_remotely(&mut tb, &layers).await;
    let images = crictl.json(&["images", "-o", "json"]).unwrap();
    assert!(
        images["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["repoTags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| *t == image)),
        "{images:#}"
    );

    let (pod, id) = start_in_pod(&crictl, &tb, "web", "app", &image);
    let status = wait_state(&crictl, &id, "CONTAINER_RUNNING");
    // Its rootfs is a hyperbox snapshot: CRI says so, and hyperbox holds
    // the container's active snapshot on top of the image's layers.
    assert_eq!(status["info"]["snapshotter"], NAME, "{status:#}");
    let key = status["info"]["snapshotKey"].as_str().unwrap().to_string();
    assert_eq!(key, id);
    let snapshots = tb.hyperbox().list(&[]).await.unwrap();
    assert!(
        snapshots
            .iter()
            .any(|s| s.kind == 2 && s.name.ends_with(&format!("/{id}"))),
        "no active hyperbox snapshot for {id}: {snapshots:#?}"
    );

    // exec through the streaming server, and through ExecSync.
    let out = crictl
        .output(&[
            "exec",
            &id,
            "sh",
            "-c",
            "echo streamed $((6*7)); echo to-stderr >&2",
        ])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "streamed 42\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to-stderr\n");
    let out = crictl
        .run(&["exec", "-s", &id, "sh", "-c", "echo sync; ls /bin/busybox"])
        .unwrap();
    // crictl ends stdout and stderr with a line feed each.
    assert_eq!(out.trim_end(), "sync\n/bin/busybox");
    let failed = crictl
        .output(&["exec", "-s", &id, "sh", "-c", "exit 3"])
        .unwrap();
    // crictl reports the command's exit code and fails itself.
    assert!(!failed.status.success(), "{failed:?}");
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("exited with 3"),
        "{failed:?}"
    );

    let logs = crictl.run(&["logs", &id]).unwrap();
    assert_eq!(logs, "hello from crictl\n");

    // The kernel's memory accounting for the container, as kubelet reads it.
    let ws = tools::poll(Duration::from_secs(20), || {
        let v = memory_stat(&crictl, &id, "workingSetBytes");
        (v > 0).then_some(v)
    })
    .unwrap_or_else(|| {
        panic!(
            "no memory stats: {}",
            crictl.run(&["stats", "-o", "json", "--id", &id]).unwrap()
        )
    });
    assert!(ws < 64 << 20, "a sleeping busybox uses {ws} bytes");

    // The agent saw the container through NRI: it is in its metrics and
    // it explains its decision for it.
    let (_, metrics) = agent.http_get("/metrics").await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("hyperbox_container_info{")
                && l.contains(&id)
                && l.contains("container=\"app\"")),
        "agent does not track {id}:\n{metrics}"
    );
    let e = agent.explain(&id);
    assert_eq!(e["container"]["id"], id.as_str(), "{e}");
    assert_eq!(e["container"]["pod"], "web", "{e}");

    crictl.run(&["stop", &id]).unwrap();
    wait_state(&crictl, &id, "CONTAINER_EXITED");
    crictl.run(&["rm", &id]).unwrap();
    crictl.run(&["stopp", &pod]).unwrap();
    crictl.run(&["rmp", &pod]).unwrap();
    assert_eq!(crictl.run(&["ps", "-a", "-q"]).unwrap(), "");
    assert_eq!(crictl.run(&["pods", "-q"]).unwrap(), "");
    // The agent forgets a removed container.
    let start = std::time::Instant::now();
    while agent.http_get("/metrics").await.unwrap().1.contains(&id) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "agent still tracks {id}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Removing the image (and the pause image) lets containerd's garbage
    // collector remove every hyperbox snapshot.
    crictl.run(&["rmi", "--all"]).unwrap();
    let client = tb.containerd.client().await.unwrap();
    client.gc().await.unwrap();
    let left = tb
        .hyperbox()
        .wait_for_count(&[], 0, Duration::from_secs(30))
        .await;
    assert!(left.is_empty(), "{left:#?}");
    let leftover = agent.shutdown();
    assert!(leftover.is_empty(), "{leftover:?}");
    tb.finish();
}

/// An image with a hyperbox index, pulled by crictl: the snapshotter mounts
/// it at once and fetches the rest in the background, and the container
/// reads bytes that were not fetched when it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crictl_pulls_an_indexed_image_lazily() {
    require_crictl!();
    let mut tb = Testbed::start_hyperbox(|b| b).await;
    let crictl = Crictl::new(&tb.containerd).unwrap();
    let big = 32u64 << 20;
    let mut spec = ImageSpec::busybox(&["sh", "-c", "sha256sum /data/big; sleep 3600"]).unwrap();
    spec.layers
        .push(Layer::new(Compression::Gzip).large_file("data/big", big, 7));
    let (reference, layers) = push(&tb, &spec, "test/crictl-lazy", "v1").await;
    let reference = tb.via_proxy(&reference);
    let out = std::process::Command::new(hyperbox_integration::binaries::path("hb"))
        .arg("--config")
        .arg(tb.hyperbox().config_path())
        .args(["image", "index", "--json", &reference])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hb image index: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = pattern_sha256(big, 7);

    // 40 Mbit/s: the whole image would take seconds, the pull does not.
    tb.proxy.set_shaping(hyperbox_integration::proxy::Shaping {
        latency: Duration::from_millis(5),
        bits_per_sec: Some(40_000_000),
    });
    let before = tb.proxy.bytes_served();
    crictl.run(&["pull", &reference]).unwrap();
    let fetched = tb.proxy.bytes_served() - before;
    assert!(
        fetched < big / 2,
        "the pull fetched {fetched} bytes of a {big}-byte layer"
    );
    assert_served_remotely(&mut tb, &layers).await;

    let (pod, id) = start_in_pod(&crictl, &tb, "lazy", "reader", &reference);
    let logs = tools::poll(Duration::from_secs(60), || {
        let l = crictl.run(&["logs", &id]).ok()?;
        l.contains("/data/big").then_some(l)
    })
    .expect("sha256sum finished");
    assert_eq!(logs, format!("{expected}  /data/big\n"));
    crictl.run(&["rmp", "-f", &pod]).unwrap();
    tb.finish();
}

/// A base image made with debootstrap (Debian's `/dev/console`, `/dev/null`,
/// `/dev/ptmx`... in its first layer, which containerd's overlayfs accepts)
/// with Python on top, pulled by crictl through both hyperbox paths: the
/// whole layers fetched and converted, then, after `hb image index`, the
/// same image mounted lazily. Python runs on each, and the image's device
/// nodes are in the container's rootfs as the layer has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crictl_runs_a_debootstrap_image_with_its_device_nodes_on_both_paths() {
    require_crictl!();
    let trees = distro::python_trees().expect("the Debian + Python image");
    let mut spec = trees.image();
    spec.run.cmd = ["sh", "-c", "python3 /app/main.py && sleep 3600"]
        .map(String::from)
        .to_vec();
    let lazy_layers = |tb: &mut Testbed| {
        std::fs::read_dir(tb.hyperbox().root().join("lazy"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".erofs"))
                    .count()
            })
            .unwrap_or(0)
    };

    // A node with the layers already local serves them from its cache,
    // not lazily: each path gets a node of its own.
    for path in ["full", "lazy"] {
        let mut tb = Testbed::start_hyperbox(|b| b).await;
        let crictl = Crictl::new(&tb.containerd).unwrap();
        let (reference, layers) = push(&tb, &spec, "test/debootstrap", "v1").await;
        if path == "lazy" {
            let indexed = tb.hyperbox().hb_index(&reference);
            assert_eq!(indexed["layers"].as_array().unwrap().len(), layers.len());
        }
        crictl.run(&["pull", &reference]).unwrap();
        assert_served_remotely(&mut tb, &layers).await;
        let expect_lazy = if path == "lazy" { layers.len() } else { 0 };
        assert_eq!(lazy_layers(&mut tb), expect_lazy, "{path}: lazy layers");

        let pod_name = format!("debootstrap-{path}");
        let (pod, id) = start_in_pod(&crictl, &tb, &pod_name, "python", &reference);
        let logs = tools::poll(Duration::from_secs(120), || {
            let l = crictl.run(&["logs", &id]).ok()?;
            l.contains("ready").then_some(l)
        })
        .unwrap_or_else(|| {
            panic!(
                "{path}: python never printed ready: {:#}",
                inspect(&crictl, &id)
            )
        });
        assert_eq!(
            logs.trim_end().lines().last(),
            Some("ready"),
            "{path}: {logs}"
        );
        // The runtime mounts its own /dev inside the container; the image's
        // nodes are in the rootfs containerd mounted from the snapshots.
        let rootfs = tb
            .containerd
            .dir()
            .join("state/io.containerd.runtime.v2.task")
            .join(CRI_NAMESPACE)
            .join(&id)
            .join("rootfs");
        for (node, major, minor) in [
            ("dev/console", 5, 1),
            ("dev/null", 1, 3),
            ("dev/ptmx", 5, 2),
        ] {
            let m = std::fs::symlink_metadata(rootfs.join(node))
                .unwrap_or_else(|e| panic!("{path}: {node} in the rootfs: {e}"));
            assert!(m.file_type().is_char_device(), "{path}: {node} is {m:?}");
            let rdev = m.rdev();
            assert_eq!(
                (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)),
                (major, minor),
                "{path}: {node}"
            );
        }
        crictl.run(&["rmp", "-f", &pod]).unwrap();
        crictl.run(&["rmi", &reference]).unwrap();
        tb.finish();
    }
}

/// The SHA-256 of the pseudo-random file the image builder writes for
/// `large_file(_, len, seed)`.
fn pattern_sha256(len: u64, seed: u64) -> String {
    use sha2::Digest;
    use std::io::Read;
    let mut r = hyperbox_integration::image::PatternReader::new(seed).take(len);
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// Prewarming, as a node runs it: the agent counts the image's start
/// (NRI), the image is removed (as the kubelet's image GC does), and
/// while the node is calm the agent has the snapshotter fetch back the
/// chunks the container read, from the list learned on its first run. The
/// next pull through crictl takes those files as they are: the start
/// reads them locally instead of asking the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_prewarms_an_image_that_starts_again() {
    require_crictl!();
    let mut tb =
        Testbed::start_hyperbox_configured("metrics_address = \"127.0.0.1:0\"", |b| b).await;
    // Pressure at 100 % never comes: a loaded test machine must not keep
    // the round from running (pressure's part is unit-tested).
    let agent = AgentDaemon::start(
        &tb.containerd.nri_socket(),
        &format!(
            "prewarm_interval_secs = 10\nprewarm_min_starts = 1\nprewarm_max_pressure = 100\n\
             [snapshotter]\ncontrol_address = \"{}\"\n",
            tb.hyperbox().control_address().display()
        ),
    )
    .await;
    agent.wait_connected(true, Duration::from_secs(20)).await;
    let crictl = Crictl::new(&tb.containerd).unwrap();
    let spec = hyperbox_integration::lazy::read_near_the_end();
    let (reference, _) = push(&tb, &spec, "test/prewarm", "v1").await;
    let reference = tb.via_proxy(&reference);
    tb.hyperbox().hb_index(&reference);
    let slow = hyperbox_integration::proxy::Shaping {
        latency: Duration::from_millis(5),
        bits_per_sec: Some(40_000_000),
    };
    let waited = |page: &str| {
        hyperbox_integration::lazy::metric(page, "hyperbox_snapshotter_lazy_waited_reads_total")
    };
    let range_bytes = |page: &str| {
        hyperbox_integration::lazy::metric(
            page,
            "hyperbox_snapshotter_lazy_layer_range_bytes_total",
        )
    };
    fn start(crictl: &Crictl, tb: &Testbed, reference: &str, pod: &str) {
        crictl.run(&["pull", reference]).unwrap();
        let (pod, id) = start_in_pod(crictl, tb, pod, "reader", reference);
        let done = wait_state(crictl, &id, "CONTAINER_EXITED");
        assert_eq!(done["status"]["exitCode"], 0, "{done}");
        crictl.run(&["rmp", "-f", &pod]).unwrap();
    }

    // The pause image first, as on any node running pods: its snapshots
    // (busybox's layer, which the test image shares) stay throughout.
    let pod = crictl
        .id(&["runp", pod_config(&tb, "prewarm-pause").to_str().unwrap()])
        .unwrap();
    crictl.run(&["rmp", "-f", &pod]).unwrap();
    let pause = tb
        .hyperbox()
        .list(&["kind==committed"])
        .await
        .unwrap()
        .len();
    assert!(pause >= 1);

    // The first run: its reads are learned.
    tb.proxy.set_shaping(slow);
    start(&crictl, &tb, &reference, "prewarm-first");
    tb.proxy.set_shaping(Default::default());
    let page = tb.hyperbox().metrics().await;
    let first = waited(&page);
    assert!(first > 0, "the first run's reads waited for the registry");
    let first_wait = hyperbox_integration::lazy::read_wait(&page);
    // Every one of those reads has its size as the kernel asked it.
    let sizes = hyperbox_integration::lazy::read_sizes(&page);
    assert_eq!(sizes.last().unwrap().1, first_wait.1, "{page}");
    hyperbox_integration::lazy::wait_complete(&mut tb).await;

    // Removed from the node; the learned lists stay.
    tb.forget_images_leaving(&[&reference], pause).await;
    let warm = tools::poll(Duration::from_secs(90), || {
        let log = agent.log();
        log.lines()
            .any(|l| {
                l.contains("image prewarmed") && l.contains("fetched=") && !l.contains("fetched=0")
            })
            .then_some(log)
    });
    assert!(warm.is_some(), "the agent never prewarmed: {}", agent.log());
    let page = tb.hyperbox().metrics().await;
    let metric = |name: &str| hyperbox_integration::lazy::metric(&page, name);
    assert!(
        metric("hyperbox_snapshotter_lazy_prewarmed_chunks_total") >= 16,
        "{page}"
    );
    // The data layer; busybox's is the pause image's too, committed.
    assert!(
        page.contains("hyperbox_snapshotter_lazy_layers{phase=\"prewarmed\"} 1"),
        "the data layer waits for its pull: {page}"
    );
    let warmed = (waited(&page), range_bytes(&page));
    let warmed_wait = hyperbox_integration::lazy::read_wait(&page);

    // By hand, once more: nothing left to fetch.
    let again = tb
        .hyperbox()
        .hb_json(&["image", "prewarm", "--json", &reference]);
    assert_eq!(again["layers"][0]["outcome"], "on_node", "{again}");
    assert_eq!(again["layers"][1]["outcome"], "prewarmed", "{again}");
    assert_eq!(again["layers"][1]["fetched"], 0, "{again}");

    // The next start: the data layer taken as prewarmed, the read local.
    tb.proxy.set_shaping(slow);
    start(&crictl, &tb, &reference, "prewarm-again");
    tb.proxy.set_shaping(Default::default());
    let page = tb.hyperbox().metrics().await;
    assert_eq!(
        hyperbox_integration::lazy::metric(&page, "hyperbox_snapshotter_lazy_prewarm_used_total"),
        1,
        "{page}"
    );
    // Not one read waited: the data the container read was local, and the
    // Range requests since are read-ahead beside those reads.
    let log = tb.hyperbox().log();
    let lazy_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("hyperbox_snapshotter::lazy"))
        .collect();
    assert_eq!(
        waited(&page) - warmed.0,
        0,
        "reads of the prewarmed start waited ({} bytes by Range since the prewarm): {lazy_lines:#?}",
        range_bytes(&page) - warmed.1
    );
    // What the workload's first accesses cost in all: the seeds ask a
    // prewarm to take at least 40 % off.
    let wait = hyperbox_integration::lazy::read_wait(&page);
    let (cold, warm) = (first_wait.0, wait.0 - warmed_wait.0);
    eprintln!(
        "reads waited {cold:.4} s in all on the first start ({} reads), {warm:.4} s on the prewarmed one ({} reads)",
        first_wait.1,
        wait.1 - warmed_wait.1
    );
    assert!(
        first_wait.1 > 0 && warm < 0.6 * cold,
        "first access: {cold} s cold, {warm} s prewarmed"
    );
    hyperbox_integration::lazy::wait_complete(&mut tb).await;
    tb.forget_images_leaving(&[&reference], pause).await;
    drop(agent);
    tb.finish();
}
