//! The client against hostile or careless registries (a local test server
//! plays them): credentials stay with their host, private headers are not
//! forwarded across redirects, and no reply body is read past its bound.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::client::Registry;
use crate::digest::Digest;
use crate::error::Error;
use crate::reference::Reference;
use crate::test_server::{Reply, Seen, Server};

/// Any test here that takes longer hangs on an endless body.
const DEADLINE: Duration = Duration::from_secs(30);

fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{pass}")))
}

/// A client reading `dir/certs.d` and `dir/config.json`, without retries.
fn registry(dir: &Path) -> Registry {
    Registry::new(&hyperbox_config::Registry {
        config_path: dir.join("certs.d"),
        docker_config: dir.join("config.json"),
        retries: 0,
        timeout_secs: 5,
        ..Default::default()
    })
    .unwrap()
}

fn hosts_toml(dir: &Path, host: &str, text: &str) {
    let d = dir.join("certs.d").join(host);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("hosts.toml"), text).unwrap();
}

fn docker_login(dir: &Path, host: &str, user: &str, pass: &str) {
    let auth = STANDARD.encode(format!("{user}:{pass}"));
    std::fs::write(
        dir.join("config.json"),
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
}

const MANIFEST: &[u8] =
    br#"{"schemaVersion":2,"config":{"digest":"sha256:00","size":0},"layers":[]}"#;

/// Serves `MANIFEST` to requests carrying `authorization`, else asks for
/// basic credentials.
fn guarded(authorization: String) -> impl Fn(&Seen) -> Reply + Send + Sync + 'static {
    move |req: &Seen| {
        if req.header("authorization") == Some(authorization.as_str()) {
            Reply::ok(MANIFEST)
        } else {
            Reply::status(401, &[("www-authenticate", r#"Basic realm="registry""#)])
        }
    }
}

async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("the client kept reading a reply that never ends")
}

#[tokio::test]
async fn a_mirror_never_gets_the_upstream_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Server::start(guarded(basic("puller", "upstream-secret"))).await;
    // A mirror that wants credentials: it must not be given the upstream's.
    let mirror = Server::start(guarded(basic("mirror-user", "mirror-secret"))).await;
    hosts_toml(
        dir.path(),
        &upstream.host(),
        &format!(
            "server = \"http://{}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            upstream.host(),
            mirror.host()
        ),
    );
    docker_login(dir.path(), &upstream.host(), "puller", "upstream-secret");
    let reg = registry(dir.path());
    let r = Reference::parse(&format!("{}/app:v1", upstream.host())).unwrap();
    let (bytes, _, _) = within(reg.fetch_manifest(&r, "v1")).await.unwrap();
    assert_eq!(bytes, MANIFEST);
    let to_mirror = mirror.seen();
    assert!(!to_mirror.is_empty(), "the mirror is tried first");
    for req in &to_mirror {
        assert_eq!(req.header("authorization"), None, "{req:?}");
    }
    assert!(
        upstream
            .seen()
            .iter()
            .any(|q| q.header("authorization") == Some(&basic("puller", "upstream-secret"))),
        "the upstream gets its own credentials"
    );
}

#[tokio::test]
async fn a_mirror_gets_its_own_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Server::start(guarded(basic("puller", "upstream-secret"))).await;
    let mirror = Server::start(guarded(basic("mirror-user", "mirror-secret"))).await;
    hosts_toml(
        dir.path(),
        &upstream.host(),
        &format!(
            "server = \"http://{}\"\n[host.\"http://{}\"]\n",
            upstream.host(),
            mirror.host()
        ),
    );
    docker_login(dir.path(), &mirror.host(), "mirror-user", "mirror-secret");
    let reg = registry(dir.path());
    let r = Reference::parse(&format!("{}/app:v1", upstream.host())).unwrap();
    within(reg.fetch_manifest(&r, "v1")).await.unwrap();
    assert!(upstream.seen().is_empty(), "served by the mirror");
}

#[tokio::test]
async fn redirects_to_another_host_carry_no_credentials_or_hosts_toml_headers() {
    let dir = tempfile::tempdir().unwrap();
    let blob = b"layer bytes".to_vec();
    let digest = Digest::of(&blob);
    let served = blob.clone();
    let storage = Server::start(move |_: &Seen| Reply::ok(served.clone())).await;
    let storage_host = storage.host();
    let creds = basic("puller", "secret");
    let registry_server = Server::start(move |req: &Seen| {
        if req.header("authorization") != Some(creds.as_str()) {
            return Reply::status(401, &[("www-authenticate", r#"Basic realm="r""#)]);
        }
        // First a hop on the same origin, then off to the storage host.
        if req.path.contains("/blobs/") {
            let moved = req.path.replace("/blobs/", "/moved/");
            Reply::status(302, &[("location", &moved)])
        } else {
            let to = format!("http://{storage_host}/bucket/blob?signature=1");
            Reply::status(307, &[("location", &to)])
        }
    })
    .await;
    hosts_toml(
        dir.path(),
        &registry_server.host(),
        &format!(
            "server = \"http://{}\"\n[header]\n  x-registry-secret = \"hdr-secret\"\n",
            registry_server.host()
        ),
    );
    docker_login(dir.path(), &registry_server.host(), "puller", "secret");
    let reg = registry(dir.path());
    let r = Reference::parse(&format!("{}/app:v1", registry_server.host())).unwrap();
    let got = within(reg.fetch_blob_bytes(&r, &digest)).await.unwrap();
    assert_eq!(got, blob);
    let moved: Vec<_> = registry_server
        .seen()
        .into_iter()
        .filter(|q| q.path.contains("/moved/"))
        .collect();
    assert!(!moved.is_empty(), "the same-origin hop was followed");
    for q in &moved {
        assert_eq!(q.header("x-registry-secret"), Some("hdr-secret"));
        assert_eq!(
            q.header("authorization"),
            Some(basic("puller", "secret").as_str())
        );
    }
    let to_storage = storage.seen();
    assert_eq!(to_storage.len(), 1);
    assert_eq!(to_storage[0].header("x-registry-secret"), None);
    assert_eq!(to_storage[0].header("authorization"), None);
}

#[tokio::test]
async fn an_endless_error_body_is_not_read_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_: &Seen| Reply::Endless {
        status: 500,
        headers: vec![],
    })
    .await;
    hosts_toml(
        dir.path(),
        &server.host(),
        &format!("server = \"http://{}\"\n", server.host()),
    );
    let reg = registry(dir.path());
    let r = Reference::parse(&format!("{}/app:v1", server.host())).unwrap();
    let e = within(reg.fetch_manifest(&r, "v1")).await.unwrap_err();
    assert!(matches!(e, Error::Status { status: 500, .. }), "{e}");
    assert!(e.to_string().len() < 1024, "{e}");
}

#[tokio::test]
async fn an_endless_manifest_is_refused_past_4_mib() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_: &Seen| Reply::Endless {
        status: 200,
        headers: vec![(
            "content-type".into(),
            "application/vnd.oci.image.manifest.v1+json".into(),
        )],
    })
    .await;
    hosts_toml(
        dir.path(),
        &server.host(),
        &format!("server = \"http://{}\"\n", server.host()),
    );
    let reg = registry(dir.path());
    let r = Reference::parse(&format!("{}/app:v1", server.host())).unwrap();
    let e = within(reg.resolve(&r)).await.unwrap_err();
    assert!(
        matches!(e, Error::TooLarge { what: "manifest", limit, .. } if limit == 4 << 20),
        "{e}"
    );
    assert!(
        e.to_string().contains("manifest longer than 4194304 bytes"),
        "{e}"
    );
}

/// Serves `blob` as a registry should, or with `extra` more bytes than its
/// manifest gives it (`usize::MAX`: without end), with or without a
/// length.
fn blob_server(
    blob: Vec<u8>,
    extra: usize,
    chunked: bool,
) -> impl Fn(&Seen) -> Reply + Send + Sync + 'static {
    move |_: &Seen| {
        if extra == usize::MAX {
            return Reply::Endless {
                status: 200,
                headers: vec![],
            };
        }
        let mut body = blob.clone();
        body.resize(blob.len() + extra, b'x');
        if chunked {
            Reply::Chunked {
                status: 200,
                headers: vec![],
                body,
            }
        } else {
            Reply::ok(body)
        }
    }
}

#[tokio::test]
async fn a_blob_is_never_read_past_the_size_its_manifest_gives() {
    let blob: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let digest = Digest::of(&blob);
    let size = crate::BlobSize::Exact(blob.len() as u64);
    for (extra, chunked) in [
        (0, true),
        (0, false),
        (4096, true),
        (8 << 20, false),
        (usize::MAX, true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(blob_server(blob.clone(), extra, chunked)).await;
        hosts_toml(
            dir.path(),
            &server.host(),
            &format!("server = \"http://{}\"\n", server.host()),
        );
        let reg = registry(dir.path());
        let r = Reference::parse(&format!("{}/app:v1", server.host())).unwrap();
        let path = dir.path().join("blob");
        let got = within(reg.fetch_blob_to_file(&r, &digest, size, &path, &|_, _| {})).await;
        let case = format!("{extra} more bytes, chunked: {chunked}");
        if extra == 0 {
            assert_eq!(got.unwrap(), blob.len() as u64, "{case}");
            assert_eq!(std::fs::read(&path).unwrap(), blob, "{case}");
            continue;
        }
        let e = got.unwrap_err();
        assert!(
            matches!(e, Error::BlobTooLong { limit, .. } if limit == blob.len() as u64),
            "{case}: {e}"
        );
        assert!(
            e.to_string()
                .contains("blob longer than 1048576 bytes, the size its manifest gives it"),
            "{case}: {e}"
        );
        // Nothing past the promised size was written (a partial file
        // stays for a resumed download).
        let kept = std::fs::metadata(&path).map_or(0, |m| m.len());
        assert!(kept <= blob.len() as u64, "{case}: {kept} bytes kept");
    }

    // Without a manifest's size, the cap holds the same way.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(blob_server(blob.clone(), usize::MAX, true)).await;
    hosts_toml(
        dir.path(),
        &server.host(),
        &format!("server = \"http://{}\"\n", server.host()),
    );
    let reg = registry(dir.path());
    let r = Reference::parse(&format!("{}/app:v1", server.host())).unwrap();
    let path = dir.path().join("blob");
    let cap = crate::BlobSize::AtMost(4 << 20);
    let e = within(reg.fetch_blob_to_file(&r, &digest, cap, &path, &|_, _| {}))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("blob longer than 4194304 bytes, the most a layer may hold"),
        "{e}"
    );
}

#[tokio::test]
async fn an_endless_token_reply_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|req: &Seen| {
        if req.path.starts_with("/token") {
            Reply::Endless {
                status: 200,
                headers: vec![("content-type".into(), "application/json".into())],
            }
        } else {
            let host = req.header("host").unwrap_or_default().to_string();
            let challenge = format!(r#"Bearer realm="http://{host}/token",service="r""#);
            Reply::status(401, &[("www-authenticate", &challenge)])
        }
    })
    .await;
    hosts_toml(
        dir.path(),
        &server.host(),
        &format!("server = \"http://{}\"\n", server.host()),
    );
    let reg = registry(dir.path());
    let r = Reference::parse(&format!("{}/app:v1", server.host())).unwrap();
    let e = within(reg.fetch_manifest(&r, "v1")).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::TooLarge {
                what: "token reply",
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn a_range_reply_is_never_read_past_the_range_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let digest = Digest::of(b"blob");
    // Announces the range asked for, then streams on.
    let endless = Server::start(|_: &Seen| Reply::Endless {
        status: 206,
        headers: vec![("content-range".into(), "bytes 100-199/1000".into())],
    })
    .await;
    hosts_toml(
        dir.path(),
        &endless.host(),
        &format!("server = \"http://{}\"\n", endless.host()),
    );
    let reg = registry(dir.path());
    let r = Reference::parse(&format!("{}/app:v1", endless.host())).unwrap();
    let e = within(reg.fetch_range(&r, &digest, 100, 100))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::TooLarge {
                what: "range reply",
                limit: 100,
                ..
            }
        ),
        "{e}"
    );

    // Another range than asked for, or a longer announced length: refused
    // before any body byte is read.
    for (range, len) in [
        ("bytes 0-99/1000", 100usize),
        ("bytes 100-199/1000", 1 << 20),
    ] {
        let server = Server::start(move |_: &Seen| Reply::Full {
            status: 206,
            headers: vec![("content-range".into(), range.into())],
            body: vec![0; len],
        })
        .await;
        hosts_toml(
            dir.path(),
            &server.host(),
            &format!("server = \"http://{}\"\n", server.host()),
        );
        let r = Reference::parse(&format!("{}/app:v1", server.host())).unwrap();
        let e = within(reg.fetch_range(&r, &digest, 100, 100))
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::Status { status: 206, .. }),
            "{range} {len}: {e}"
        );
    }
}

#[tokio::test]
async fn neither_debug_output_nor_errors_show_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(guarded(basic("puller", "debug-secret"))).await;
    hosts_toml(
        dir.path(),
        &server.host(),
        &format!("server = \"http://{}\"\n", server.host()),
    );
    docker_login(dir.path(), &server.host(), "puller", "debug-secret");
    let reg = registry(dir.path());
    let r = Reference::parse(&format!("{}/app:v1", server.host())).unwrap();
    within(reg.fetch_manifest(&r, "v1")).await.unwrap();
    let shown = format!("{reg:?}");
    assert!(
        !shown.contains(&basic("puller", "debug-secret")[6..]),
        "{shown}"
    );

    // A redirect to a pre-signed URL that fails: its signature is not in
    // the error.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_host = dead.local_addr().unwrap().to_string();
    drop(dead);
    let to = format!("http://{dead_host}/bucket/blob?X-Amz-Signature=sig-secret");
    let redirecting =
        Server::start(move |_: &Seen| Reply::status(307, &[("location", to.as_str())])).await;
    hosts_toml(
        dir.path(),
        &redirecting.host(),
        &format!("server = \"http://{}\"\n", redirecting.host()),
    );
    let r = Reference::parse(&format!("{}/app:v1", redirecting.host())).unwrap();
    let e = within(reg.fetch_blob_bytes(&r, &Digest::of(b"x")))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Transport { .. }), "{e}");
    assert!(!e.to_string().contains("sig-secret"), "{e}");
}

/// A blob of `mib` MiB served whole by a local registry (plain HTTP), for
/// the paced-download tests: its bytes, digest and size, the directory the
/// client's configuration goes in, the server and the image reference.
async fn served_blob(
    mib: u32,
) -> (
    Vec<u8>,
    Digest,
    crate::BlobSize,
    tempfile::TempDir,
    Server,
    Reference,
) {
    let blob: Vec<u8> = (0..mib << 20).map(|i| (i % 251) as u8).collect();
    let digest = Digest::of(&blob);
    let size = crate::BlobSize::Exact(blob.len() as u64);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(blob_server(blob.clone(), 0, false)).await;
    hosts_toml(
        dir.path(),
        &server.host(),
        &format!("server = \"http://{}\"\n", server.host()),
    );
    let r = Reference::parse(&format!("{}/app:v1", server.host())).unwrap();
    (blob, digest, size, dir, server, r)
}

/// The lazy path's fill pauses its download while a container's reads
/// wait: a pause longer than the read timeout must not fail it (the
/// timeout runs only while the body is polled), and a paused download must
/// not hold the node's only download slot.
#[tokio::test]
async fn a_paced_download_outlasts_the_read_timeout_and_holds_no_download_slot() {
    use std::sync::{Arc, Mutex};
    let (blob, digest, size, dir, _server, r) = served_blob(4).await;
    let reg = Arc::new(
        Registry::new(&hyperbox_config::Registry {
            config_path: dir.path().join("certs.d"),
            docker_config: dir.path().join("config.json"),
            max_concurrent_downloads: 1,
            retries: 0,
            timeout_secs: 1,
        })
        .unwrap(),
    );
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let pace: crate::Pace = {
        let seen = seen.clone();
        Arc::new(move |read| {
            let first_pause = {
                let mut s = seen.lock().unwrap();
                s.push(read);
                read > 0 && s.iter().filter(|r| **r > 0).count() == 1
            };
            Box::pin(async move {
                if first_pause {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                true
            })
        })
    };
    let paced = {
        let (reg, r, path) = (reg.clone(), r.clone(), dir.path().join("paced"));
        let digest = digest.clone();
        tokio::spawn(async move {
            reg.fetch_blob_to_file_paced(&r, &digest, size, &path, &|_, _| {}, Some(pace))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other = dir.path().join("other");
    let got = within(reg.fetch_blob_to_file(&r, &digest, size, &other, &|_, _| {})).await;
    assert_eq!(got.unwrap(), blob.len() as u64);
    assert!(!paced.is_finished(), "the paced download is still paused");
    assert_eq!(
        within(paced).await.unwrap().unwrap(),
        blob.len() as u64,
        "a 3 s pause with a 1 s read timeout"
    );
    assert_eq!(std::fs::read(dir.path().join("paced")).unwrap(), blob);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.first(), Some(&0));
    assert!(seen.len() > 2, "asked before each piece: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
}

/// A paced download whose caller no longer wants it (its lazy layer was
/// removed) stops at the next piece: its bytes no longer cross the link,
/// and nothing of it is left on disk.
#[tokio::test]
async fn a_paced_download_no_longer_wanted_stops_and_leaves_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let (blob, digest, size, dir, _server, r) = served_blob(8).await;
    let reg = Registry::new(&hyperbox_config::Registry {
        config_path: dir.path().join("certs.d"),
        docker_config: dir.path().join("config.json"),
        retries: 3,
        ..Default::default()
    })
    .unwrap();
    let wanted = Arc::new(AtomicBool::new(true));
    let last = Arc::new(AtomicU64::new(0));
    let pace: crate::Pace = {
        let (wanted, last) = (wanted.clone(), last.clone());
        Arc::new(move |read| {
            last.store(read, Ordering::SeqCst);
            // Given up once a megabyte is in.
            if read >= 1 << 20 {
                wanted.store(false, Ordering::SeqCst);
            }
            let go_on = wanted.load(Ordering::SeqCst);
            Box::pin(async move { go_on })
        })
    };
    let path = dir.path().join("paced");
    let e = within(reg.fetch_blob_to_file_paced(&r, &digest, size, &path, &|_, _| {}, Some(pace)))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Stopped { .. }), "{e}");
    assert!(e.to_string().contains("no longer wanted"), "{e}");
    let stopped_at = last.load(Ordering::SeqCst);
    assert!(
        ((1 << 20)..blob.len() as u64 / 2).contains(&stopped_at),
        "stopped at {stopped_at} of {} bytes",
        blob.len()
    );
    assert!(!path.exists(), "the partial download is removed");
}
