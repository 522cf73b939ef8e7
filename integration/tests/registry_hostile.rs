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
/// resolve (`hb`) and the layer fetches (the snapshotter) go to the mirror
/// first.
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
    assert!(
        seen.iter().any(|(r, _)| r.contains("/blobs/")),
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
