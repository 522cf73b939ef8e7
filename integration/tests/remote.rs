//! The remote path end to end: containerd pulls with the labels CRI and
//! nerdctl send, hyperbox fetches each layer from the real registry,
//! verifies it, converts it to EROFS and mounts it, and containerd skips
//! download and unpack. What the container sees must equal overlayfs.

use std::time::Duration;

use hyperbox_integration::client::{ContainerOptions, Image, PullOptions};
use hyperbox_integration::corpus;
use hyperbox_integration::cri::{ContainerSpec, PodNetwork};
use hyperbox_integration::image::{Compression, ImageSpec, Layer};
use hyperbox_integration::lazy::{erofs_mounts, lazy_files_left, metric, wait_complete};
use hyperbox_integration::proxy::{Fault, FaultRule};
use hyperbox_integration::require_containers;
use hyperbox_integration::snapshotter::NAME;
use hyperbox_integration::testbed::Testbed;

/// `hb image pull` with `config` against containerd at `address`:
/// success, stdout, stderr.
fn hb_pull(config: &str, address: &str, reference: &str, extra: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(hyperbox_integration::binaries::path("hb"))
        .args(["--config", config, "image", "pull", "--address", address])
        .args(extra)
        .arg(reference)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The layer digests of `reference`, read from the registry.
async fn registry_layers(reference: &str) -> Vec<String> {
    let empty = tempfile::tempdir().unwrap();
    let cfg = hyperbox_config::Registry {
        config_path: empty.path().into(),
        docker_config: empty.path().join("none.json"),
        ..Default::default()
    };
    let reg = hyperbox_registry::Registry::new(&cfg).unwrap();
    let r = hyperbox_registry::Reference::parse(reference).unwrap();
    let resolved = reg.resolve(&r).await.unwrap();
    resolved.layers.into_iter().map(|l| l.digest).collect()
}

fn remote() -> PullOptions {
    PullOptions {
        snapshotter: NAME.into(),
        remote_labels: true,
    }
}

/// containerd downloaded no layer of `image`: hyperbox served each one
/// (layers already present from an earlier pull are not Prepared again).
async fn all_layers_remote(tb: &Testbed, image: &Image) {
    assert!(
        !image.layers_skipped.is_empty(),
        "hyperbox answered AlreadyExists"
    );
    let client = tb.containerd.client().await.unwrap();
    for d in &image.layer_digests {
        assert!(
            !client.content_exists(d).await.unwrap(),
            "containerd never downloaded layer {d}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_layers_are_erofs_and_the_rootfs_equals_overlayfs() {
    require_containers!();
    let mut tb = Testbed::start_hyperbox(|b| b.without_cri()).await;
    let reference = tb.push(&corpus::tricky(), "test/tricky", "v1").await;
    let client = tb.containerd.client().await.unwrap();
    let script = corpus::tree_script("/");
    let args = ContainerOptions::args(&["sh", "-c", &script]);

    let ours = client.pull(&reference, &remote()).await.unwrap();
    assert_eq!(
        ours.layers_skipped,
        [0, 1, 2],
        "every Prepare answered AlreadyExists"
    );
    all_layers_remote(&tb, &ours).await;
    let mounts = erofs_mounts(&mut tb);
    assert_eq!(mounts.len(), 3, "one EROFS mount per layer: {mounts:#?}");
    assert!(
        mounts
            .iter()
            .all(|(_, _, src)| src.ends_with("layer.erofs")),
        "file-backed mounts of the layer images: {mounts:#?}"
    );

    // The same image through containerd's own path, for comparison.
    let theirs_ref = tb.via_proxy(&reference);
    let theirs = client
        .pull(&theirs_ref, &PullOptions::local("overlayfs"))
        .await
        .unwrap();
    let ours_out = client.run("on-hyperbox", &ours, &args).await.unwrap();
    let theirs_out = client.run("on-overlayfs", &theirs, &args).await.unwrap();
    assert_eq!(ours_out.stderr_str(), "");
    assert_eq!(ours_out.status, 0);
    let ours_tree = ours_out.stdout_str();
    assert!(ours_tree.contains("./data/suid regular file 4755 1000:1001 2 10 "));
    assert!(!ours_tree.contains("./data/gone") && !ours_tree.contains("./data/opq/old"));
    corpus::assert_same_tree(&ours_tree, &theirs_out.stdout_str(), "EROFS vs overlayfs");

    // Removing the image removes the layers and their mounts (both names:
    // they share the config blob, whose gc labels reference the layers).
    client.delete_image(&reference).await.unwrap();
    client.delete_image(&theirs_ref).await.unwrap();
    client.gc().await.unwrap();
    let left = tb
        .hyperbox()
        .wait_for_count(&[], 0, Duration::from_secs(30))
        .await;
    assert!(left.is_empty(), "{left:#?}");
    assert_eq!(erofs_mounts(&mut tb), [], "Remove unmounts the layer");
    tb.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pulls_go_through_the_remote_path() {
    require_containers!();
    let mut tb = Testbed::start_hyperbox(|b| b).await;
    let reference = tb.push_sleeper().await;
    let cri = tb.containerd.cri().await.unwrap();
    cri.pull_image(&reference).await.unwrap();
    // CRI pulls (with disable_snapshot_annotations = false) label every
    // Prepare; containerd then never stores the layer blob.
    let client = tb
        .containerd
        .client()
        .await
        .unwrap()
        .with_namespace("k8s.io");
    let layers = registry_layers(&reference).await;
    assert!(!layers.is_empty());
    for d in &layers {
        assert!(
            !client.content_exists(d).await.unwrap(),
            "{d} not in containerd"
        );
    }
    assert_eq!(erofs_mounts(&mut tb).len(), layers.len());
    let pod = cri.run_pod("remote", PodNetwork::Host).await.unwrap();
    let spec = ContainerSpec::new(
        "c",
        &reference,
        &["sh", "-c", "grep ' / ' /proc/mounts; echo done"],
    );
    let c = cri.create_container(&pod, &spec).await.unwrap();
    cri.start_container(&c).await.unwrap();
    assert_eq!(
        cri.wait_exited(&c, Duration::from_secs(30)).await.unwrap(),
        0
    );
    let logs = cri.logs(&pod, "c").await.unwrap();
    assert!(logs.contains("done"), "{logs}");
    assert!(logs.contains("overlay"), "{logs}");
    cri.remove_pod(&pod).await.unwrap();
    tb.finish();
}

/// Two images sharing their two bottom layers, pulled at once: each shared
/// layer is downloaded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_fetch_shared_layers_once() {
    require_containers!();
    let tb = Testbed::start_hyperbox(|b| b.without_cri()).await;
    let base = |top: &str| {
        let mut s = ImageSpec::busybox(&["cat", "/top"]).unwrap();
        s.layers
            .push(Layer::new(Compression::Gzip).large_file("shared/big", 8 << 20, 3));
        s.layers
            .push(Layer::new(Compression::Zstd).file("top", top, 0o644));
        s
    };
    let a = tb.via_proxy(&tb.push(&base("a"), "test/a", "v1").await);
    let b = tb.via_proxy(&tb.push(&base("b"), "test/b", "v1").await);
    // Slow enough that both pulls overlap.
    tb.proxy.set_shaping(hyperbox_integration::proxy::Shaping {
        latency: Duration::from_millis(20),
        bits_per_sec: Some(200_000_000),
    });
    let client = tb.containerd.client().await.unwrap();
    let opts = remote();
    let (ia, ib) = tokio::join!(client.pull(&a, &opts), client.pull(&b, &opts));
    let (ia, ib) = (ia.unwrap(), ib.unwrap());
    assert_eq!(ia.chain_ids[..2], ib.chain_ids[..2]);
    let gets: Vec<String> = tb
        .proxy
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("GET") && r.contains("/blobs/"))
        .collect();
    for d in &ia.layer_digests[..2] {
        let n = gets.iter().filter(|r| r.contains(d.as_str())).count();
        assert_eq!(n, 1, "shared layer {d} fetched once: {gets:#?}");
    }
    let oa = client
        .run("a", &ia, &ContainerOptions::default())
        .await
        .unwrap();
    let ob = client
        .run("b", &ib, &ContainerOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (oa.stdout_str().as_str(), ob.stdout_str().as_str()),
        ("a", "b")
    );
    tb.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malicious_layers_are_refused_and_leave_nothing() {
    require_containers!();
    // Device nodes are kept by default (as overlayfs keeps them; the CRI
    // test pulls a debootstrap base carrying them); a node may refuse them.
    let mut tb =
        Testbed::start_hyperbox_configured("allow_device_nodes = false", |b| b.without_cri()).await;
    let client = tb.containerd.client().await.unwrap();
    let cases: Vec<(&str, Layer, &str)> = vec![
        (
            "dotdot",
            Layer::new(Compression::Gzip).raw_entry_path("../escape", "x"),
            "escape",
        ),
        (
            "absolute",
            Layer::new(Compression::Gzip).raw_entry_path("/etc/evil", "x"),
            "evil",
        ),
        (
            "through-symlink",
            Layer::new(Compression::None)
                .symlink("up", "/etc")
                .raw_entry_path("up/passwd", "x"),
            "passwd",
        ),
        (
            "hardlink-outside",
            Layer::new(Compression::Zstd).raw_hardlink("h", "/etc/shadow"),
            "shadow",
        ),
        (
            "device-node",
            Layer::new(Compression::Gzip).device("dev/sda", true, 8, 0),
            "device node 8:0",
        ),
    ];
    for (repo, layer, names) in cases {
        let mut spec = ImageSpec::busybox(&["true"]).unwrap();
        spec.layers.push(layer);
        let reference = tb.push(&spec, &format!("bad/{repo}"), "v1").await;
        let e = client
            .pull(&reference, &remote())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layer entry") && e.contains(names),
            "{repo}: a clear error naming the entry: {e}"
        );
        assert!(!client.image_exists(&reference).await.unwrap());
    }
    // The busybox base layer was served; nothing of the bad layers was.
    client.gc().await.unwrap();
    let snaps = tb.hyperbox().list(&[]).await.unwrap();
    assert!(
        snaps.len() <= 1,
        "only the shared base layer may remain: {snaps:#?}"
    );
    let root = tb.hyperbox().root();
    let staging: Vec<_> = std::fs::read_dir(root.join("staging")).unwrap().collect();
    assert!(staging.is_empty(), "no partial files: {staging:?}");
    tb.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_faults_are_retried_resumed_or_reported_never_served() {
    require_containers!();
    let mut tb =
        Testbed::start_hyperbox_configured("fallback_to_local = false", |b| b.without_cri()).await;
    let mut spec = ImageSpec::busybox(&["sh", "-c", "md5sum /big"]).unwrap();
    spec.layers
        .push(Layer::new(Compression::None).large_file("big", 6 << 20, 5));
    let reference = tb.via_proxy(&tb.push(&spec, "test/faults", "v1").await);
    let client = tb.containerd.client().await.unwrap();
    // Faults hit the big layer only: the harness's own manifest and config
    // fetches (containerd's side) are not under test.
    let big = registry_layers(&reference).await.pop().unwrap();
    let rule = |fault| FaultRule {
        path_contains: big.clone(),
        ..FaultRule::blobs(fault)
    };

    // A corrupt byte: the digest check refuses it, every time.
    tb.proxy.inject(rule(Fault::CorruptAt(4096)));
    let e = client
        .pull(&reference, &remote())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not match its digest"), "{e}");
    let served = tb.hyperbox().list(&[]).await.unwrap();
    assert_eq!(
        served.len(),
        1,
        "only the intact base layer is served: {served:#?}"
    );
    tb.proxy.clear_faults();

    // A 503, a reset and a truncation: retried, the broken downloads
    // resumed with Range requests, and the image runs.
    for fault in [
        Fault::Status(503),
        Fault::ResetAfter(1 << 20),
        Fault::TruncateAfter(3 << 20),
    ] {
        let mut r = rule(fault);
        r.times = Some(1);
        tb.proxy.inject(r);
    }
    let image = client.pull(&reference, &remote()).await.unwrap();
    all_layers_remote(&tb, &image).await;
    let ranged = tb
        .proxy
        .requests()
        .into_iter()
        .filter(|r| r.contains("range=bytes="))
        .count();
    assert!(
        ranged >= 1,
        "an interrupted download resumed: {:#?}",
        tb.proxy.requests()
    );
    let out = client
        .run("faults", &image, &ContainerOptions::default())
        .await
        .unwrap();
    assert_eq!(out.status, 0, "{}", out.stderr_str());
    tb.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_again_and_again_but_getting_further_is_not_given_up() {
    require_containers!();
    // The harness's snapshotter retries 3 times: five cuts in a row would
    // have ended the pull, but each resumed request brings 2 MiB more. One
    // download of the layer only (no prefetch beside the base layer's
    // Prepare), so a second one cannot resume the first's bytes and hide
    // a given-up download.
    let tb =
        Testbed::start_hyperbox_configured("fallback_to_local = false\nprefetch = false", |b| {
            b.without_cri()
        })
        .await;
    let mut spec = ImageSpec::busybox(&["sh", "-c", "md5sum /big"]).unwrap();
    spec.layers
        .push(Layer::new(Compression::None).large_file("big", 12 << 20, 7));
    let reference = tb.via_proxy(&tb.push(&spec, "test/cuts", "v1").await);
    let big = registry_layers(&reference).await.pop().unwrap();
    tb.proxy.inject(FaultRule {
        path_contains: big,
        times: Some(5),
        ..FaultRule::blobs(Fault::TruncateAfter(2 << 20))
    });
    let client = tb.containerd.client().await.unwrap();
    let image = client.pull(&reference, &remote()).await.unwrap();
    assert_eq!(tb.proxy.faults_fired(), 5, "every cut happened");
    all_layers_remote(&tb, &image).await;
    let out = client
        .run("cuts", &image, &ContainerOptions::default())
        .await
        .unwrap();
    assert_eq!(out.status, 0, "{}", out.stderr_str());
    tb.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_registry_falls_back_to_containerd_or_fails_clearly() {
    require_containers!();
    for fallback in [true, false] {
        let mut tb =
            Testbed::start_hyperbox_configured(&format!("fallback_to_local = {fallback}"), |b| {
                b.without_cri()
            })
            .await;
        let reference = tb.push_sleeper().await;
        // hyperbox's hosts.toml sends it to a port where nothing listens;
        // containerd itself still reaches the registry.
        let host = reference.split('/').next().unwrap().to_string();
        let dir = tb.hyperbox().dir().join("certs.d").join(&host);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts.toml"), "server = \"http://127.0.0.1:9\"\n").unwrap();
        let client = tb.containerd.client().await.unwrap();
        let got = client.pull(&reference, &remote()).await;
        if fallback {
            let image = got.unwrap();
            assert!(
                image.layers_skipped.is_empty(),
                "containerd unpacked every layer"
            );
            let out = client
                .run("fb", &image, &ContainerOptions::args(&["true"]))
                .await
                .unwrap();
            assert_eq!(out.status, 0);
        } else {
            let e = got.unwrap_err().to_string();
            assert!(
                e.contains("127.0.0.1:9"),
                "the error names the endpoint: {e}"
            );
        }
        tb.finish();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_stay_served_across_restarts_and_are_mounted_again() {
    require_containers!();
    let mut tb = Testbed::start_hyperbox(|b| b.without_cri()).await;
    let reference = tb.push_sleeper().await;
    let client = tb.containerd.client().await.unwrap();
    let image = client.pull(&reference, &remote()).await.unwrap();
    let c = client
        .create_container("long", &image, &ContainerOptions::default())
        .await
        .unwrap();
    let task = c.start().await.unwrap();
    let before = erofs_mounts(&mut tb).len();
    assert_eq!(before, image.chain_ids.len());

    // kill -9: the mounts are the kernel's, the container keeps running.
    tb.hyperbox().kill(nix::sys::signal::Signal::SIGKILL);
    tb.hyperbox().start_again().await;
    // containerd reconnects to a restarted proxy plugin after about 1 s.
    client
        .wait_snapshotter(NAME, image.top_chain_id(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(erofs_mounts(&mut tb).len(), before);
    let out = task.exec(&["cat", "/bin/busybox"]).await.unwrap();
    assert_eq!(out.status, 0);

    // As after a reboot: the layer mounts are gone; a restart mounts them.
    tb.hyperbox().kill(nix::sys::signal::Signal::SIGTERM);
    for (p, _, _) in erofs_mounts(&mut tb) {
        nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH).unwrap();
    }
    assert!(erofs_mounts(&mut tb).is_empty());
    tb.hyperbox().start_again().await;
    // containerd reconnects to a restarted proxy plugin after about 1 s.
    client
        .wait_snapshotter(NAME, image.top_chain_id(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(erofs_mounts(&mut tb).len(), before);
    let out = client
        .run("after", &image, &ContainerOptions::args(&["ls", "/bin/sh"]))
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), "/bin/sh\n");
    task.kill(9).await.unwrap();
    c.delete().await.unwrap();
    tb.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_backend_serves_the_same_rootfs() {
    require_containers!();
    let mut tb =
        Testbed::start_hyperbox_configured("erofs_backend = \"loop\"", |b| b.without_cri()).await;
    let reference = tb.push(&corpus::tricky(), "test/tricky", "v1").await;
    let client = tb.containerd.client().await.unwrap();
    let image = client.pull(&reference, &remote()).await.unwrap();
    all_layers_remote(&tb, &image).await;
    let mounts = erofs_mounts(&mut tb);
    assert_eq!(mounts.len(), 3);
    assert!(
        mounts
            .iter()
            .all(|(_, _, src)| src.starts_with("/dev/loop")),
        "{mounts:#?}"
    );
    let out = client
        .run(
            "loop",
            &image,
            &ContainerOptions::args(&["cat", "/data/opq/new"]),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), "only me");
    client.delete_image(&reference).await.unwrap();
    client.gc().await.unwrap();
    let left = tb
        .hyperbox()
        .wait_for_count(&[], 0, Duration::from_secs(30))
        .await;
    assert!(left.is_empty(), "{left:#?}");
    assert!(erofs_mounts(&mut tb).is_empty());
    tb.finish();
}

/// HTTPS with a private CA from hosts.toml, basic auth with credentials
/// from docker's config.json, and what goes wrong without either: `hb
/// image pull` resolves, the snapshotter fetches, both with the same files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_registry_with_private_ca_and_basic_auth() {
    require_containers!();
    hyperbox_integration::require!(hyperbox_integration::prereq::Prereq::TlsTools);
    let mut tb =
        Testbed::start_hyperbox_configured("fallback_to_local = false", |b| b.without_cri()).await;
    let plain_ref = tb.push_sleeper().await;
    let tls = tempfile::tempdir().unwrap();
    let (ca, cert, key) = hyperbox_integration::registry::make_tls_files(tls.path()).unwrap();
    let htpasswd = tls.path().join("htpasswd");
    let out = std::process::Command::new("htpasswd")
        .args(["-Bbc", htpasswd.to_str().unwrap(), "puller", "s3cret"])
        .output()
        .expect("htpasswd (apache2-utils)");
    assert!(out.status.success());
    let secure = hyperbox_integration::registry::Registry::start_secure_view(
        &tb.registry,
        &cert,
        &key,
        Some(&htpasswd),
    )
    .unwrap();
    let reference = plain_ref.replacen(&tb.registry.host(), &secure.host(), 1);
    let sn_dir = tb.hyperbox().dir().to_path_buf();
    let cfg = tb.hyperbox().config_path().display().to_string();
    let address = tb.containerd.address().display().to_string();
    let hb = |args: &[&str]| hb_pull(&cfg, &address, &reference, args);

    // The registry's certificate is unknown: refused, and the error says so.
    let (ok, _, err) = hb(&[]);
    assert!(!ok);
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // hosts.toml names the CA; now the registry wants credentials.
    let host_dir = sn_dir.join("certs.d").join(secure.host());
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"https://{}\"\nca = \"{}\"\n",
            secure.host(),
            ca.display()
        ),
    )
    .unwrap();
    let (ok, _, err) = hb(&[]);
    assert!(!ok);
    assert!(
        err.contains("unauthorized") && err.contains("credentials"),
        "{err}"
    );

    // Wrong password: the registry's refusal is passed on.
    let auth = |pass: &str| {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("puller:{pass}"));
        std::fs::write(
            sn_dir.join("docker-config.json"),
            format!(
                "{{\"auths\":{{\"{}\":{{\"auth\":\"{token}\"}}}}}}",
                secure.host()
            ),
        )
        .unwrap();
    };
    auth("wrong");
    let (ok, _, err) = hb(&[]);
    assert!(!ok && err.contains("unauthorized"), "{err}");

    // Right password (picked up without restarting the snapshotter): every
    // layer fetched by the snapshotter over HTTPS.
    auth("s3cret");
    let (ok, out, err) = hb(&["--json"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("\"how\":\"remote\"") && out.contains("\"remote\":1"),
        "{out}"
    );
    let client = tb.containerd.client().await.unwrap();
    let image = client
        .pull(&plain_ref, &PullOptions::local(NAME))
        .await
        .unwrap();
    let run = client
        .run(
            "tls",
            &image,
            &ContainerOptions::args(&["echo", "over tls"]),
        )
        .await
        .unwrap();
    assert_eq!(run.stdout_str(), "over tls\n");

    // skip_verify instead of the CA also works.
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"https://{}\"\nskip_verify = true\n",
            secure.host()
        ),
    )
    .unwrap();
    let (ok, _, err) = hb(&[]);
    assert!(ok, "{err}");
    drop(secure);
    tb.finish();
}

fn hb_index(tb: &mut Testbed, reference: &str) -> serde_json::Value {
    tb.hyperbox().hb_index(reference)
}

/// An image with a hyperbox index is mounted at once: the container runs
/// after fetching a fraction of the image, reads of unfetched bytes are
/// served correctly, a kill -9 in the middle loses nothing, and in the end
/// every layer is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexed_images_are_pulled_lazily() {
    require_containers!();
    hyperbox_integration::lazy::pull_serve_restart_complete("").await;
}

/// Indexes of version 2 (`hb image index --erofs-blobs`: each layer's EROFS
/// image pushed as a blob, as before layer maps, and what nodes older than
/// version 3 read) are still served lazily, chunks fetched from the EROFS
/// blobs; a layer map's version 3 index of the same image needs none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_with_erofs_blobs_are_still_served() {
    require_containers!();
    let mut tb = Testbed::start_hyperbox(|b| b.without_cri()).await;
    let mut spec = ImageSpec::busybox(&["cat", "/data/x"]).unwrap();
    spec.layers.push(
        Layer::new(Compression::Gzip)
            .file("data/x", "from the EROFS blob", 0o644)
            .large_file("data/big", 8 << 20, 7),
    );
    let reference = tb.via_proxy(&tb.push(&spec, "test/v2", "v1").await);
    let indexed = tb
        .hyperbox()
        .hb_json(&["image", "index", "--json", "--erofs-blobs", &reference]);
    let layers = indexed["layers"].as_array().unwrap();
    assert!(layers.iter().all(|l| l["source"] == "erofs"), "{indexed}");
    assert!(
        indexed["index_bytes"].as_u64().unwrap() > indexed["image_bytes"].as_u64().unwrap(),
        "EROFS images duplicate the image: {indexed}"
    );
    let client = tb.containerd.client().await.unwrap();
    let image = client.pull(&reference, &remote()).await.unwrap();
    assert_eq!(image.layers_skipped, [0, 1], "served by hyperbox");
    let out = client
        .run("v2", &image, &ContainerOptions::default())
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), "from the EROFS blob");
    // Mounted before its bytes were all in: at least the metadata came
    // with Range requests on the EROFS blobs.
    let requests = tb.proxy.requests();
    assert!(
        requests.iter().any(|r| r.contains("range=bytes=")
            && layers
                .iter()
                .any(|l| r.contains(l["erofs"].as_str().unwrap()))),
        "chunks come from the EROFS blobs: {requests:#?}"
    );
    wait_complete(&mut tb).await;
    client.delete_image(&reference).await.unwrap();
    client.gc().await.unwrap();
    tb.finish();
}

/// Indexes of version 3 (`hb image index --no-block-digests`: maps but no
/// block digest tables, what nodes older than version 4 read) are still
/// served lazily, each chunk checked against its own digest: no block
/// table is asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_without_block_digests_are_still_served() {
    require_containers!();
    let mut tb = Testbed::start_hyperbox_configured("metrics_address = \"127.0.0.1:0\"", |b| {
        b.without_cri()
    })
    .await;
    let mut spec = ImageSpec::busybox(&["cat", "/data/x"]).unwrap();
    spec.layers.push(
        Layer::new(Compression::Gzip)
            .file("data/x", "checked by chunks", 0o644)
            .large_file("data/big", 8 << 20, 9),
    );
    let reference = tb.via_proxy(&tb.push(&spec, "test/v3", "v1").await);
    let indexed =
        tb.hyperbox()
            .hb_json(&["image", "index", "--json", "--no-block-digests", &reference]);
    assert_eq!(indexed["version"], 3, "{indexed}");
    assert_eq!(indexed["chunk_size"], 16384, "{indexed}");
    let layers = indexed["layers"].as_array().unwrap();
    assert!(
        layers
            .iter()
            .all(|l| l["source"] == "map" && l["blocks"] == 0),
        "{indexed}"
    );
    let client = tb.containerd.client().await.unwrap();
    let image = client.pull(&reference, &remote()).await.unwrap();
    assert_eq!(image.layers_skipped, [0, 1], "served by hyperbox");
    let out = client
        .run("v3", &image, &ContainerOptions::default())
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), "checked by chunks");
    wait_complete(&mut tb).await;
    let page = tb.hyperbox().metrics().await;
    assert_eq!(
        metric(&page, "hyperbox_snapshotter_lazy_block_table_bytes_total"),
        0,
        "{page}"
    );
    assert_eq!(
        metric(&page, "hyperbox_snapshotter_lazy_chunk_failures_total"),
        0,
        "{page}"
    );
    client.delete_image(&reference).await.unwrap();
    client.gc().await.unwrap();
    tb.finish();
}

/// A chunk that does not match the index is never served: the lazy path
/// gives the layer up and the whole layer, verified against the image's own
/// digest, is fetched instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_chunks_that_do_not_verify_are_never_served() {
    require_containers!();
    let mut tb = Testbed::start_hyperbox(|b| b.without_cri()).await;
    let mut spec = ImageSpec::busybox(&["true"]).unwrap();
    // 2 MiB more, on a 20 Mbit/s link: the layer's whole download (an
    // untaught image's starts at mount) cannot bring the chunks before the
    // mount's own Range request for them asks.
    spec.layers.push(
        Layer::new(Compression::Zstd)
            .file("data/x", "the real bytes", 0o644)
            .large_file("data/pad", 2 << 20, 5),
    );
    let reference = tb.via_proxy(&tb.push(&spec, "test/lazybad", "v1").await);
    let indexed = hb_index(&mut tb, &reference);
    tb.proxy.set_shaping(hyperbox_integration::proxy::Shaping {
        latency: Duration::from_millis(5),
        bits_per_sec: Some(20_000_000),
    });
    // The zstd layer's EROFS image is corrupted where a chunk is; the
    // gzip layer's map (its bytes come from the layer itself) at its
    // first compressed byte.
    let layers = indexed["layers"].as_array().unwrap();
    assert_eq!(
        layers
            .iter()
            .map(|l| l["source"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["map", "erofs"]
    );
    for l in layers {
        let at = if l["source"] == "map" { 16 } else { 1100 };
        tb.proxy.inject(FaultRule {
            path_contains: l["blob"].as_str().unwrap().to_string(),
            ..FaultRule::blobs(Fault::CorruptAt(at))
        });
    }
    let client = tb.containerd.client().await.unwrap();
    let image = client.pull(&reference, &remote()).await.unwrap();
    tb.proxy
        .set_shaping(hyperbox_integration::proxy::Shaping::default());
    assert_eq!(image.layers_skipped, [0, 1], "served by hyperbox, whole");
    assert_eq!(lazy_files_left(&mut tb), 0, "the lazy attempt left nothing");
    let out = client
        .run("x", &image, &ContainerOptions::args(&["cat", "/data/x"]))
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), "the real bytes");
    let log = tb.hyperbox().log();
    assert!(
        log.contains("does not match the index") && log.contains("layer map of"),
        "both refusals are logged:\n{log}"
    );
    tb.finish();
}

/// Bearer-token auth as Docker Hub does it: the registry (docker-registry
/// with `auth.token`) challenges, hyperbox asks the token service with the
/// credentials from docker's config.json, and the snapshotter and `hb`
/// both pull with the token; without credentials the refusal is clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_auth_with_docker_credentials() {
    require_containers!();
    hyperbox_integration::require!(hyperbox_integration::prereq::Prereq::TlsTools);
    let mut tb =
        Testbed::start_hyperbox_configured("fallback_to_local = false", |b| b.without_cri()).await;
    let plain_ref = tb.push_sleeper().await;
    let keys = tempfile::tempdir().unwrap();
    let tokens =
        hyperbox_integration::token::TokenService::start(keys.path(), Some(("puller", "t0ken")))
            .await
            .unwrap();
    let guarded =
        hyperbox_integration::registry::Registry::start_view(&tb.registry, tokens.registry_yaml())
            .unwrap();
    let reference = plain_ref.replacen(&tb.registry.host(), &guarded.host(), 1);
    let sn_dir = tb.hyperbox().dir().to_path_buf();
    let cfg = tb.hyperbox().config_path().display().to_string();
    let address = tb.containerd.address().display().to_string();
    let hb = || hb_pull(&cfg, &address, &reference, &["--json"]);

    let (ok, _, err) = hb();
    assert!(!ok);
    assert!(err.contains("refused anonymous"), "{err}");

    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD.encode("puller:t0ken");
    std::fs::write(
        sn_dir.join("docker-config.json"),
        format!(
            "{{\"auths\":{{\"{}\":{{\"auth\":\"{token}\"}}}}}}",
            guarded.host()
        ),
    )
    .unwrap();
    let (ok, out, err) = hb();
    assert!(ok, "{err}");
    assert!(
        out.contains("\"how\":\"remote\""),
        "the snapshotter fetched with a token: {out}"
    );
    drop(guarded);
    drop(tokens);
    tb.finish();
}

/// With the fanotify group in a service manager's fd store (as the shipped
/// systemd unit keeps it), a read of unfetched lazy data made while the
/// snapshotter is down waits for the next instance and gets the real
/// bytes, instead of zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_reads_wait_across_a_restart_when_the_fd_store_keeps_the_group() {
    require_containers!();
    let mut tb = Testbed::start_hyperbox(|b| b.without_cri()).await;
    tb.hyperbox().use_fd_store();
    tb.hyperbox().restart().await;
    assert_eq!(
        tb.hyperbox().stored_fds(),
        ["hyperbox-fanotify"],
        "the group was handed to the store"
    );
    let big = 16u64 << 20;
    let mut spec = ImageSpec::busybox(&["true"]).unwrap();
    spec.layers
        .push(Layer::new(Compression::Gzip).large_file("data/big", big, 7));
    let reference = tb.via_proxy(&tb.push(&spec, "test/lazystore", "v1").await);
    hb_index(&mut tb, &reference);
    // 20 Mbit/s: the fill takes several seconds.
    tb.proxy.set_shaping(hyperbox_integration::proxy::Shaping {
        latency: Duration::from_millis(5),
        bits_per_sec: Some(20_000_000),
    });
    let client = tb.containerd.client().await.unwrap();
    let image = client.pull(&reference, &remote()).await.unwrap();
    assert_eq!(image.layers_skipped, [0, 1]);
    let file = std::fs::read_dir(tb.hyperbox().root().join("snapshots"))
        .unwrap()
        .flatten()
        .map(|d| d.path().join("fs/data/big"))
        .find(|p| p.exists())
        .expect("the lazy layer is mounted");
    assert!(lazy_files_left(&mut tb) > 0, "still filling");

    tb.hyperbox().kill(nix::sys::signal::Signal::SIGKILL);
    // The kernel reads the mounted layer as a container would.
    let reader = std::thread::spawn(move || std::fs::read(&file));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !reader.is_finished(),
        "with the daemon down, the read waits (it does not see zeros)"
    );
    tb.hyperbox().start_again().await;
    assert!(
        tb.hyperbox()
            .log()
            .contains("taken back from the service manager"),
        "{}",
        tb.hyperbox().log()
    );
    let got = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap()
        .expect("the held read completes after the restart");
    let mut want = vec![0u8; big as usize];
    std::io::Read::read_exact(
        &mut hyperbox_integration::image::PatternReader::new(7),
        &mut want,
    )
    .unwrap();
    if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
        let zeros = got[at..].iter().take_while(|b| **b == 0).count();
        panic!(
            "byte {at} of {} differs ({zeros} zero bytes from there); log:\n{}",
            got.len(),
            tb.hyperbox().log()
        );
    }
    assert_eq!(got.len(), want.len());
    tb.proxy
        .set_shaping(hyperbox_integration::proxy::Shaping::default());
    wait_complete(&mut tb).await;
    client.delete_image(&reference).await.unwrap();
    client.gc().await.unwrap();
    tb.finish();
}

/// A node that can no longer serve lazy layers (here `erofs_backend =
/// "loop"` with `lazy_backend = "fanotify"` after a restart) never mounts an incomplete one unmarked: its
/// snapshots stay unmounted and no container starts on them, with an
/// error that says why, instead of reading zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_lazy_layers_are_refused_when_the_lazy_path_is_unavailable() {
    require_containers!();
    let mut tb = Testbed::start_hyperbox(|b| b.without_cri()).await;
    let mut spec = ImageSpec::busybox(&["true"]).unwrap();
    spec.layers
        .push(Layer::new(Compression::Gzip).large_file("data/big", 16 << 20, 9));
    let reference = tb.via_proxy(&tb.push(&spec, "test/lazyloop", "v1").await);
    hb_index(&mut tb, &reference);
    tb.proxy.set_shaping(hyperbox_integration::proxy::Shaping {
        latency: Duration::from_millis(5),
        bits_per_sec: Some(8_000_000),
    });
    let client = tb.containerd.client().await.unwrap();
    let image = client.pull(&reference, &remote()).await.unwrap();
    assert_eq!(image.layers_skipped, [0, 1]);
    assert!(lazy_files_left(&mut tb) > 0, "still filling");
    tb.hyperbox().kill(nix::sys::signal::Signal::SIGKILL);
    // Unmount what the dead daemon mounted, as a reboot would.
    for m in hyperbox_integration::footprint::mounts_under(&tb.hyperbox().root()) {
        nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH).unwrap();
    }
    let cfg = tb.hyperbox().config_path();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replacen(
            "[snapshotter]\n",
            "[snapshotter]\nerofs_backend = \"loop\"\nlazy_backend = \"fanotify\"\n",
            1,
        ),
    )
    .unwrap();
    tb.hyperbox().start_again().await;
    client
        .wait_snapshotter(NAME, image.top_chain_id(), Duration::from_secs(60))
        .await
        .unwrap();
    let log = tb.hyperbox().log();
    assert!(
        log.contains("cannot be served without the lazy path"),
        "{log}"
    );
    assert!(log.contains("layer not mounted"), "{log}");
    let e = client
        .run(
            "lazy-loop",
            &image,
            &ContainerOptions::args(&["cat", "/data/big"]),
        )
        .await
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("cannot serve lazy layers now"), "{e}");
    tb.proxy
        .set_shaping(hyperbox_integration::proxy::Shaping::default());
    client.delete_image(&reference).await.unwrap();
    client.gc().await.unwrap();
    tb.finish();
}

/// What one node learned about a lazily pulled image (the chunks its
/// container first read) is pushed beside the image's index with `hb image
/// prefetch push`, as an artifact referring to the image; a node that never
/// ran the image then fetches those chunks first, at mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learned_prefetch_lists_are_shared_through_the_registry() {
    require_containers!();
    let mut tb = Testbed::start_hyperbox_configured("metrics_address = \"127.0.0.1:0\"", |b| {
        b.without_cri()
    })
    .await;
    let spec = hyperbox_integration::lazy::read_near_the_end();
    let pushed = tb.push(&spec, "test/prefetch", "v1").await;
    let reference = tb.via_proxy(&pushed);
    hb_index(&mut tb, &reference);
    let slow = hyperbox_integration::proxy::Shaping {
        latency: Duration::from_millis(5),
        bits_per_sec: Some(40_000_000),
    };
    let client = tb.containerd.client().await.unwrap();
    let run = |name: &'static str| {
        let client = client.clone();
        let reference = reference.clone();
        async move {
            let image = client.pull(&reference, &remote()).await.unwrap();
            assert_eq!(image.layers_skipped, [0, 1], "both layers lazy");
            let out = client
                .run(name, &image, &ContainerOptions::default())
                .await
                .unwrap();
            assert_eq!(out.status, 0, "{}", out.stderr_str());
        }
    };

    // Node A's first run: nothing learned, nothing shared.
    tb.proxy.set_shaping(slow);
    run("first").await;
    tb.proxy.set_shaping(Default::default());
    wait_complete(&mut tb).await;
    let page = tb.hyperbox().metrics().await;
    assert_eq!(
        metric(&page, "hyperbox_snapshotter_lazy_prefetched_chunks_total"),
        0
    );
    let shown = tb
        .hyperbox()
        .hb_json(&["image", "prefetch", "show", "--json", &reference]);
    let data = |v: &serde_json::Value, side: &str| v["layers"][1][side].as_u64().unwrap();
    assert!(
        data(&shown, "node") >= 16,
        "the 1 MiB read is learned: {shown}"
    );
    assert_eq!(data(&shown, "registry"), 0, "nothing pushed yet: {shown}");

    let pushed_lists = tb
        .hyperbox()
        .hb_json(&["image", "prefetch", "push", "--json", &reference]);
    assert_eq!(
        data(&pushed_lists, "registry"),
        data(&shown, "node"),
        "{pushed_lists}"
    );
    // An artifact that refers to the image, found by the tag every node
    // derives from the image's manifest digest.
    let manifest = shown["manifest"].as_str().unwrap();
    let tag = format!("sha256-{}.hyperbox-prefetch", &manifest[7..]);
    let artifact: serde_json::Value = reqwest::Client::new()
        .get(format!(
            "http://{}/v2/test/prefetch/manifests/{tag}",
            tb.registry.host()
        ))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(artifact["subject"]["digest"], manifest, "{artifact}");
    assert_eq!(
        artifact["artifactType"],
        hyperbox_registry::prefetch::CONFIG_TYPE
    );
    // The data layer's gzip map has a checkpoint about every 1 MiB; the
    // push learned one just before the read, as a layer of the artifact
    // naming the layer blob. (busybox's layer may have some too: block by
    // block, what its binary's reads touch is not one cluster from the
    // layer's start.)
    let data_layer = shown["layers"][1]["layer"].as_str().unwrap();
    assert!(
        data(&pushed_lists, "points") >= 1,
        "a checkpoint learned before the read: {pushed_lists}"
    );
    let points_layers: Vec<&serde_json::Value> = artifact["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| {
            l["mediaType"] == hyperbox_registry::prefetch::POINTS_TYPE
                && l["annotations"][hyperbox_registry::prefetch::POINTS_LAYER] == data_layer
        })
        .collect();
    assert_eq!(points_layers.len(), 1, "{artifact}");

    // Node B: the image, this node's own lists and the snapshotter's
    // memory of the index gone, as on a node that never ran it.
    tb.forget_images_and_learned(&[&reference]).await;
    tb.proxy.set_shaping(slow);
    run("second").await;
    tb.proxy.set_shaping(Default::default());
    let page = tb.hyperbox().metrics().await;
    assert!(
        metric(
            &page,
            "hyperbox_snapshotter_lazy_shared_prefetch_lists_total"
        ) >= 1,
        "{page}"
    );
    assert!(
        metric(&page, "hyperbox_snapshotter_lazy_prefetched_chunks_total") >= 16,
        "the shared list's chunks were fetched ahead: {page}"
    );
    // Its learned checkpoint started the fetch, from near the bytes read
    // rather than from the map's checkpoint up to 1 MiB before them.
    assert!(
        metric(
            &page,
            "hyperbox_snapshotter_lazy_learned_checkpoint_requests_total"
        ) >= 1,
        "{page}"
    );
    assert_eq!(
        metric(
            &page,
            "hyperbox_snapshotter_lazy_learned_checkpoint_failures_total"
        ),
        0,
        "{page}"
    );
    // The data layer's own list, not only busybox's: what node A learned
    // of it, all of it from the registry.
    let log = tb.hyperbox().log();
    let added: u64 = log
        .lines()
        .filter(|l| l.contains("shared through the registry used") && l.contains(data_layer))
        .find_map(|l| l.split("added_from_registry=").nth(1))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no shared list used for {data_layer}: {log}"));
    assert_eq!(added, data(&shown, "node"), "{log}");
    wait_complete(&mut tb).await;
    client.delete_image(&reference).await.unwrap();
    client.gc().await.unwrap();
    tb.finish();
}
