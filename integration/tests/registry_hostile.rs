//! The registry client against hostile registries, end to end: `hb image
//! pull` resolves and the snapshotter fetches with the same hosts.toml
//! and docker config.json, against the real registry behind fault proxies
//! that play the attacker (a mirror that asks for credentials and records
//! what it is sent; replies whose bodies never end).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hyperbox_integration::proxy::{Fault, FaultProxy, FaultRule};
use hyperbox_integration::require_containers;
use hyperbox_integration::testbed::Testbed;

/// Longest a pull may take before the test calls it hung.
const HUNG: Duration = Duration::from_secs(120);

/// `hb image pull` of `reference` with the snapshotter's config: success
/// and stderr. Killed (and the test failed) if it hangs.
fn hb_pull(tb: &mut Testbed, reference: &str) -> (bool, String) {
    let cfg = tb.hyperbox().config_path();
    let mut child = Command::new(hyperbox_integration::binaries::path("hb"))
        .arg("--config")
        .arg(&cfg)
        .args(["image", "pull", "--address"])
        .arg(tb.containerd.address())
        .arg(reference)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > HUNG {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("hb image pull {reference} still running after {HUNG:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.success(), err)
}

/// The digest of the bottom layer of `reference`, read from the registry.
async fn first_layer(reference: &str) -> String {
    let empty = tempfile::tempdir().unwrap();
    let cfg = hyperbox_config::Registry {
        config_path: empty.path().into(),
        docker_config: empty.path().join("none.json"),
        ..Default::default()
    };
    let reg = hyperbox_registry::Registry::new(&cfg).unwrap();
    let r = hyperbox_registry::Reference::parse(reference).unwrap();
    reg.resolve(&r).await.unwrap().layers[0].digest.clone()
}

fn write_hosts_toml(tb: &mut Testbed, host: &str, text: &str) {
    let dir = tb.hyperbox().dir().join("certs.d").join(host);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hosts.toml"), text).unwrap();
}

/// containerd's behaviour for hosts.toml mirrors: credentials are looked up
/// by the host a request goes to, so a mirror that asks for credentials
/// gets its own or none, never those of the registry it mirrors. Both the
/// resolve (`hb`) and the snapshotter's first request (the manifest read
/// that bounds its layer downloads by their sizes) go to the mirror first;
/// once the upstream answered, the snapshotter's blob fetches go there
/// directly (the endpoint that last worked is tried first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_never_sees_the_upstream_credentials() {
    require_containers!();
    let mut tb =
        Testbed::start_hyperbox_configured("fallback_to_local = false", |b| b.without_cri()).await;
    let plain_ref = tb.push_sleeper().await;
    let upstream = FaultProxy::start(tb.registry.addr()).await.unwrap();
    let mirror = FaultProxy::start(tb.registry.addr()).await.unwrap();
    mirror.inject(FaultRule {
        path_contains: "/v2/".into(),
        method: None,
        fault: Fault::Challenge,
        times: None,
    });
    let reference = plain_ref.replacen(&tb.registry.host(), &upstream.host(), 1);
    write_hosts_toml(
        &mut tb,
        &upstream.host(),
        &format!(
            "server = \"http://{}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            upstream.host(),
            mirror.host()
        ),
    );
    let secret = "upstream-s3cret";
    let token = base64::engine::general_purpose::STANDARD.encode(format!("puller:{secret}"));
    std::fs::write(
        tb.hyperbox().dir().join("docker-config.json"),
        format!(
            "{{\"auths\":{{\"{}\":{{\"auth\":\"{token}\"}}}}}}",
            upstream.host()
        ),
    )
    .unwrap();

    let (ok, err) = hb_pull(&mut tb, &reference);
    assert!(ok, "the pull falls through to the upstream: {err}");
    let seen = mirror.request_headers();
    assert!(
        seen.iter().any(|(r, _)| r.contains("/manifests/")),
        "hb tried the mirror first: {seen:?}"
    );
    let manifest_reads = seen
        .iter()
        .filter(|(r, _)| r.ends_with("/manifests/v1"))
        .count();
    assert!(
        manifest_reads >= 2 || seen.iter().any(|(r, _)| r.contains("/blobs/")),
        "the snapshotter tried the mirror first: {seen:?}"
    );
    for (request, headers) in &seen {
        for (name, value) in headers {
            assert!(
                name != "authorization" && !value.contains(&token) && !value.contains(secret),
                "the mirror was sent {name}: {value} with {request}"
            );
        }
    }
    tb.finish();
}

/// Replies that never end: a manifest, an error reply to the manifest and
/// an error reply to a layer blob. Each pull fails with an error that says
/// what went wrong, and the client stops reading soon (bytes the proxy
/// managed to send stay small), so memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_replies_fail_the_pull_with_a_clear_error() {
    require_containers!();
    let mut tb =
        Testbed::start_hyperbox_configured("fallback_to_local = false", |b| b.without_cri()).await;
    let plain_ref = tb.push_sleeper().await;
    let layer = first_layer(&plain_ref).await;
    let cases = [
        ("/manifests/", 200, "manifest longer than 4194304 bytes"),
        ("/manifests/", 503, "HTTP 503"),
        // Fetched by the snapshotter.
        (layer.as_str(), 503, "HTTP 503"),
    ];
    for (path, status, expected) in cases {
        let proxy = FaultProxy::start(tb.registry.addr()).await.unwrap();
        proxy.inject(FaultRule {
            path_contains: path.into(),
            method: Some("GET".into()),
            fault: Fault::Endless(status),
            times: None,
        });
        write_hosts_toml(
            &mut tb,
            &proxy.host(),
            &format!("server = \"http://{}\"\n", proxy.host()),
        );
        let reference = plain_ref.replacen(&tb.registry.host(), &proxy.host(), 1);
        let (ok, err) = hb_pull(&mut tb, &reference);
        assert!(!ok, "{path} {status}: the pull must fail");
        assert!(err.contains(expected), "{path} {status}: {err}");
        assert!(proxy.faults_fired() > 0, "{path} {status}");
        // The manifest cap plus what socket buffers held when the client
        // hung up; an unbounded reader takes far more in the same time.
        assert!(
            proxy.bytes_served() < 64 << 20,
            "{path} {status}: {} bytes read",
            proxy.bytes_served()
        );
    }
    tb.finish();
}

/// A layer blob sent without a length (chunked) and longer than the size
/// its manifest gives it, as a registry that wants to fill the node's
/// disk would send it: the snapshotter stops reading at the promised size
/// and the pull fails saying so; once the registry behaves, the same
/// image pulls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_blob_longer_than_its_manifest_says_is_not_read_past_it() {
    require_containers!();
    let mut tb =
        Testbed::start_hyperbox_configured("fallback_to_local = false", |b| b.without_cri()).await;
    let plain_ref = tb.push_sleeper().await;
    let (layer, size) = {
        let empty = tempfile::tempdir().unwrap();
        let cfg = hyperbox_config::Registry {
            config_path: empty.path().into(),
            docker_config: empty.path().join("none.json"),
            ..Default::default()
        };
        let reg = hyperbox_registry::Registry::new(&cfg).unwrap();
        let r = hyperbox_registry::Reference::parse(&plain_ref).unwrap();
        let l = reg.resolve(&r).await.unwrap().layers[0].clone();
        (l.digest, l.size as u64)
    };
    let proxy = FaultProxy::start(tb.registry.addr()).await.unwrap();
    let extra = 512u64 << 20;
    proxy.inject(FaultRule {
        path_contains: layer.clone(),
        method: Some("GET".into()),
        fault: Fault::Longer(extra),
        times: None,
    });
    write_hosts_toml(
        &mut tb,
        &proxy.host(),
        &format!("server = \"http://{}\"\n", proxy.host()),
    );
    let reference = plain_ref.replacen(&tb.registry.host(), &proxy.host(), 1);
    let (ok, err) = hb_pull(&mut tb, &reference);
    assert!(!ok, "the pull must fail");
    assert!(
        err.contains(&format!(
            "blob longer than {size} bytes, the size its manifest gives it"
        )),
        "{err}"
    );
    assert!(proxy.faults_fired() > 0);
    // The blob plus what socket buffers held when the snapshotter hung up.
    assert!(
        proxy.bytes_served() < size + (64 << 20),
        "{} bytes read of a {size}-byte blob sent with {extra} more",
        proxy.bytes_served()
    );
    let staging = tb.hyperbox().root().join("staging");
    for e in std::fs::read_dir(&staging).unwrap() {
        let len = e.unwrap().metadata().unwrap().len();
        assert!(len <= size, "{len} bytes of a {size}-byte blob on disk");
    }

    proxy.clear_faults();
    let (ok, err) = hb_pull(&mut tb, &reference);
    assert!(ok, "the genuine blob pulls: {err}");
    tb.finish();
}
