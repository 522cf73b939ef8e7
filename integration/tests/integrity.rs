//! Integrity of the full-fetch remote path against an attacker who can push
//! to one repository: an image whose config claims another image's
//! diff_id over different content must not get its bytes committed under
//! the other image's chain id, whether the layer is fetched fresh or
//! reused from hyperbox's layer cache, and a later pull of the genuine
//! image must see genuine bytes.

use std::time::Duration;

use hyperbox_integration::client::{ContainerOptions, PullOptions};
use hyperbox_integration::cri::{ContainerSpec, PodNetwork};
use hyperbox_integration::image::{BuiltImage, Compression, ImageSpec, Layer};
use hyperbox_integration::require_containers;
use hyperbox_integration::snapshotter::NAME;
use hyperbox_integration::testbed::Testbed;

fn remote() -> PullOptions {
    PullOptions {
        snapshotter: NAME.into(),
        remote_labels: true,
    }
}

/// busybox with `/msg` holding `msg` in a layer of its own.
fn with_msg(msg: &str) -> ImageSpec {
    let mut s = ImageSpec::busybox(&["cat", "/msg"]).unwrap();
    s.layers
        .push(Layer::new(Compression::Gzip).file("msg", msg, 0o644));
    s
}

/// Builds `spec` with its config claiming `claims` and pushes it as
/// `repo:v1`; returns the reference and the built image (whose diff_ids
/// are the claimed ones).
async fn push_claiming(
    tb: &Testbed,
    spec: &ImageSpec,
    claims: &[Option<String>],
    repo: &str,
) -> (String, BuiltImage) {
    let dir = tb.work_dir().join(repo.replace('/', "_"));
    let built = spec.build_claiming(&dir, claims).unwrap();
    let reference = built.push(&tb.registry.host(), repo, "v1").await.unwrap();
    (reference, built)
}

/// The true diff_id of `spec`'s layer `i`.
fn true_diff_id(tb: &Testbed, spec: &ImageSpec, i: usize) -> String {
    let dir = tb.work_dir().join(format!("truth-{}", rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    spec.layers[i].write_blob(&dir).unwrap().diff_id
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A container of `image` reads the genuine `/msg` and sees no `/evil`.
async fn assert_reads_genuine(
    client: &hyperbox_integration::client::Client,
    image: &hyperbox_integration::client::Image,
) {
    let out = client
        .run(
            "genuine",
            image,
            &ContainerOptions::args(&["sh", "-c", "cat /msg; [ -e /evil ] && echo EVIL; true"]),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), "genuine");
}

/// A registry client with no credentials or mirrors.
fn registry_client(tb: &Testbed) -> hyperbox_registry::Registry {
    hyperbox_registry::Registry::new(&hyperbox_config::Registry {
        config_path: tb.work_dir().join("no-certs.d"),
        docker_config: tb.work_dir().join("no-docker.json"),
        max_concurrent_downloads: 1,
        retries: 0,
        timeout_secs: 10,
    })
    .unwrap()
}

/// Pushes `index` into repository `r` as the hyperbox index of `image`
/// (found by the tag its manifest digest gives), naming the maps (or
/// EROFS images) an honest `hb image index` pushed there.
async fn push_index(
    registry: &hyperbox_registry::Registry,
    r: &hyperbox_registry::Reference,
    index: &hyperbox_registry::index::Index,
    image: &BuiltImage,
) {
    let doc = serde_json::to_vec(index).unwrap();
    let doc_digest = hyperbox_registry::digest::Digest::of(&doc);
    registry
        .push_blob(r, &doc_digest, bytes::Bytes::from(doc.clone()))
        .await
        .unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": hyperbox_registry::index::CONFIG_TYPE,
        "config": {
            "mediaType": hyperbox_registry::index::CONFIG_TYPE,
            "digest": doc_digest.to_string(),
            "size": doc.len(),
        },
        "layers": index.layers.iter().map(|l| match &l.map {
            Some(m) => serde_json::json!({
                "mediaType": hyperbox_registry::index::MAP_TYPE,
                "digest": m.digest,
                "size": m.size,
            }),
            None => serde_json::json!({
                "mediaType": hyperbox_registry::index::EROFS_TYPE,
                "digest": l.erofs,
                "size": l.size,
            }),
        }).collect::<Vec<_>>(),
        "subject": {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": image.manifest.digest,
            "size": image.manifest.size,
        },
    });
    let subject = hyperbox_registry::digest::Digest::parse(&image.manifest.digest).unwrap();
    registry
        .push_manifest(
            r,
            &hyperbox_registry::index::tag_for(&subject),
            "application/vnd.oci.image.manifest.v1+json",
            bytes::Bytes::from(serde_json::to_vec(&manifest).unwrap()),
        )
        .await
        .unwrap();
}

fn assert_names(e: &str, layer: &str, promised: &str, actual: &str) {
    assert!(
        e.contains(layer) && e.contains(promised) && e.contains(actual),
        "the error names the layer {layer}, the promised diff_id {promised} and the content's {actual}: {e}"
    );
}

/// Through the containerd API with the remote labels: a top layer (with a
/// parent) and a bottom layer (without one) that claim the genuine image's
/// diff_ids are refused, and the genuine image then runs genuine bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_diff_ids_fail_the_pull_and_the_genuine_image_stays_genuine() {
    require_containers!();
    let tb = Testbed::start_hyperbox(|b| b.without_cri()).await;
    let client = tb.containerd.client().await.unwrap();
    let genuine_spec = with_msg("genuine");
    let genuine = tb.push(&genuine_spec, "test/genuine", "v1").await;
    let base_diff = true_diff_id(&tb, &genuine_spec, 0);
    let top_diff = true_diff_id(&tb, &genuine_spec, 1);

    // A one-layer image whose only layer claims the genuine base's diff_id
    // (first: once the base's chain is committed, containerd would not
    // Prepare it again).
    let mut bottom = ImageSpec::busybox(&["true"]).unwrap();
    bottom.layers[0] = bottom.layers[0].clone().file("evil", "evil", 0o644);
    let bottom_diff = true_diff_id(&tb, &bottom, 0);
    let (reference, built) =
        push_claiming(&tb, &bottom, &[Some(base_diff.clone())], "evil/bottom").await;
    let e = client
        .pull(&reference, &remote())
        .await
        .unwrap_err()
        .to_string();
    assert_names(&e, &built.layers[0].blob.digest, &base_diff, &bottom_diff);
    assert!(!client.image_exists(&reference).await.unwrap());

    // The top layer claims the genuine top layer's diff_id.
    let evil = with_msg("evil");
    let evil_diff = true_diff_id(&tb, &evil, 1);
    let (reference, built) =
        push_claiming(&tb, &evil, &[None, Some(top_diff.clone())], "evil/top").await;
    let e = client
        .pull(&reference, &remote())
        .await
        .unwrap_err()
        .to_string();
    assert_names(&e, &built.layers[1].blob.digest, &top_diff, &evil_diff);
    assert!(!client.image_exists(&reference).await.unwrap());

    let image = client.pull(&genuine, &remote()).await.unwrap();
    assert!(image.layers_skipped.contains(&1), "served by hyperbox");
    assert_reads_genuine(&client, &image).await;
    tb.finish();
}

/// The attack through CRI: the hostile image is pulled first and
/// fails; a container of the genuine image then reads the genuine file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pull_claiming_another_images_diff_id_fails_and_the_genuine_container_reads_genuine_bytes()
 {
    require_containers!();
    let tb = Testbed::start_hyperbox(|b| b).await;
    let genuine_spec = with_msg("genuine");
    let genuine = tb.push(&genuine_spec, "test/genuine", "v1").await;
    let top_diff = true_diff_id(&tb, &genuine_spec, 1);
    let evil = with_msg("evil");
    let evil_diff = true_diff_id(&tb, &evil, 1);
    let (reference, built) =
        push_claiming(&tb, &evil, &[None, Some(top_diff.clone())], "evil/top").await;

    let cri = tb.containerd.cri().await.unwrap();
    let e = cri.pull_image(&reference).await.unwrap_err();
    let e = hyperbox_api::error_chain(&e);
    assert_names(&e, &built.layers[1].blob.digest, &top_diff, &evil_diff);
    assert!(!cri.image_present(&reference).await.unwrap());

    cri.pull_image(&genuine).await.unwrap();
    let pod = cri.run_pod("genuine", PodNetwork::Host).await.unwrap();
    let spec = ContainerSpec::new("c", &genuine, &["cat", "/msg"]);
    let c = cri.create_container(&pod, &spec).await.unwrap();
    cri.start_container(&c).await.unwrap();
    assert_eq!(
        cri.wait_exited(&c, Duration::from_secs(30)).await.unwrap(),
        0
    );
    let logs = cri.logs(&pod, "c").await.unwrap();
    assert!(logs.contains("genuine") && !logs.contains("evil"), "{logs}");
    cri.remove_pod(&pod).await.unwrap();
    tb.finish();
}

/// The layer cache (`layers/<hex>.erofs`) is keyed by the compressed
/// digest: a layer an honest image brought in is checked again when a
/// hostile image reuses it under a claimed diff_id, and a cache file
/// without a valid diff_id record (as left by a version before records,
/// or replaced behind hyperbox's back) is fetched and converted again,
/// never trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_layers_are_checked_on_every_reuse_and_unrecorded_ones_are_converted_again() {
    require_containers!();
    let mut tb = Testbed::start_hyperbox(|b| b.without_cri()).await;
    let client = tb.containerd.client().await.unwrap();
    let genuine_spec = with_msg("genuine");
    let genuine = tb.push(&genuine_spec, "test/genuine", "v1").await;
    let top_diff = true_diff_id(&tb, &genuine_spec, 1);
    let evil = with_msg("evil");
    let evil_diff = true_diff_id(&tb, &evil, 1);

    // An honest image brings the evil layer into the cache.
    let honest = tb.push(&evil, "evil/honest", "v1").await;
    client.pull(&honest, &remote()).await.unwrap();
    let (hostile, built) =
        push_claiming(&tb, &evil, &[None, Some(top_diff.clone())], "evil/claims").await;
    let layer = built.layers[1].blob.digest.clone();
    let hex = layer.strip_prefix("sha256:").unwrap().to_string();
    let root = tb.hyperbox().root();
    let cached = root.join("layers").join(format!("{hex}.erofs"));
    let record = root.join("layers").join(format!("{hex}.diffid"));
    assert!(cached.exists() && record.exists(), "cached with its record");

    // Reused from the cache: checked all the same, nothing fetched.
    let hostile = tb.via_proxy(&hostile);
    let e = client
        .pull(&hostile, &remote())
        .await
        .unwrap_err()
        .to_string();
    assert_names(&e, &layer, &top_diff, &evil_diff);
    let gets = |tb: &Testbed| {
        tb.proxy
            .requests()
            .into_iter()
            .filter(|r| r.starts_with("GET") && r.contains(&format!("/blobs/{layer}")))
            .count()
    };
    assert_eq!(gets(&tb), 0, "the cached layer was reused");

    // A cache file without a record is fetched and converted again (and
    // still refused), then recorded.
    std::fs::remove_file(&record).unwrap();
    let e = client
        .pull(&hostile, &remote())
        .await
        .unwrap_err()
        .to_string();
    assert_names(&e, &layer, &top_diff, &evil_diff);
    assert!(gets(&tb) >= 1, "the unrecorded layer was fetched again");
    assert!(record.exists(), "recorded once verified");

    // A file replaced under its record does not inherit it: put the evil
    // layer's image in place of the genuine top layer's, whose record stays.
    let genuine_built = genuine_spec
        .build(&tb.work_dir().join("genuine-again"))
        .unwrap();
    let ghex = genuine_built.layers[1]
        .blob
        .digest
        .strip_prefix("sha256:")
        .unwrap()
        .to_string();
    let gcached = root.join("layers").join(format!("{ghex}.erofs"));
    // Bring the genuine top layer into the cache through a pull under
    // another chain (an image whose base differs), then swap its file.
    let mut other_base = genuine_spec.clone();
    other_base.layers[0] = Layer::new(Compression::Gzip).file("base", "other", 0o644);
    let other = tb.push(&other_base, "test/other-base", "v1").await;
    client.pull(&other, &remote()).await.unwrap();
    assert!(gcached.exists());
    let swap = root.join("layers").join("swap.tmp");
    std::fs::copy(&cached, &swap).unwrap();
    std::fs::rename(&swap, &gcached).unwrap();

    // The genuine image, pulled now, reads genuine bytes.
    let image = client.pull(&genuine, &remote()).await.unwrap();
    assert!(image.layers_skipped.contains(&1), "served by hyperbox");
    let out = client
        .run("genuine", &image, &ContainerOptions::default())
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), "genuine");
    tb.finish();
}

/// The lazy path against an attacker with push rights to one repository,
/// who pushes an image whose config claims the genuine image's diff_id over
/// their own layer, and an index for it (made from an honest twin, then
/// edited to claim the genuine diff_id too, which `hb` refuses to do).
///
/// The index is used (its diff_id gives the chain containerd asked for),
/// so the hostile image is served at once; once complete, the layer is
/// fetched whole, its true diff_id differs, and the layer is refused: it is
/// counted in /metrics, no new container starts on it (neither the hostile
/// image's nor the genuine image's, which containerd puts on the same
/// chain), and once both images are removed the genuine image pulls and
/// reads genuine bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_index_that_lies_about_diff_ids_is_caught_and_never_shared() {
    require_containers!();
    let mut tb = Testbed::start_hyperbox_configured("metrics_address = \"127.0.0.1:0\"", |b| {
        b.without_cri()
    })
    .await;
    let client = tb.containerd.client().await.unwrap();
    let genuine_spec = with_msg("genuine");
    let genuine = tb.push(&genuine_spec, "test/genuine", "v1").await;
    let top_diff = true_diff_id(&tb, &genuine_spec, 1);

    let evil = with_msg("evil");
    let evil_diff = true_diff_id(&tb, &evil, 1);
    let (hostile, built) =
        push_claiming(&tb, &evil, &[None, Some(top_diff.clone())], "evil/top").await;
    // The honest twin, same layers, in the same repository: its index
    // names the same layer blobs and their EROFS images.
    let twin_built = {
        let dir = tb.work_dir().join("twin");
        evil.build(&dir).unwrap()
    };
    let twin = twin_built
        .push(&tb.registry.host(), "evil/top", "twin")
        .await
        .unwrap();
    assert_eq!(
        twin_built.layers[1].blob.digest,
        built.layers[1].blob.digest
    );
    tb.hyperbox().hb_index(&twin);

    // The forged index: the twin's, claiming the genuine diff_id, found by
    // the hostile image's manifest digest.
    let registry = registry_client(&tb);
    let r = hyperbox_registry::Reference::parse(&twin).unwrap();
    let twin_manifest =
        hyperbox_registry::digest::Digest::parse(&twin_built.manifest.digest).unwrap();
    let mut forged = registry
        .fetch_index(&r, &twin_manifest)
        .await
        .unwrap()
        .expect("the twin's index");
    assert_eq!(forged.layers[1].diff_id, evil_diff);
    forged.layers[1].diff_id = top_diff.clone();
    push_index(&registry, &r, &forged, &built).await;

    // Served lazily under the claimed chain (the window), then caught. A
    // layer this small may also come whole and be caught before the pull
    // commits it: then nothing is served, and the whole fetch refuses it
    // for its diff_id, naming both.
    let served = match client.pull(&hostile, &remote()).await {
        Ok(image) => {
            assert_eq!(image.layers_skipped, [0, 1], "served by hyperbox");
            Some(image)
        }
        Err(e) => {
            let e = format!("{e:#}");
            assert!(e.contains(&evil_diff) && e.contains(&top_diff), "{e}");
            None
        }
    };
    let start = std::time::Instant::now();
    while !tb.hyperbox().log().contains("does not match its image") {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the lie was never caught:\n{}",
            tb.hyperbox().log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = tb.hyperbox().log();
    assert!(log.contains(&evil_diff) && log.contains(&top_diff), "{log}");
    // Counted where an operator graphs it.
    let metrics = tb.hyperbox().metrics().await;
    assert!(
        metrics.contains("hyperbox_snapshotter_lazy_rejected_total 1\n"),
        "{metrics}"
    );

    let was_served = served.is_some();
    if let Some(image) = served {
        assert!(
            metrics.contains("hyperbox_snapshotter_lazy_layers{phase=\"refused\"} 1\n"),
            "{metrics}"
        );
        // No new container starts on the refused layer.
        let e = client
            .run("hostile", &image, &ContainerOptions::args(&["cat", "/msg"]))
            .await
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("refused"), "{e}");

        // containerd reuses a committed chain without asking the snapshotter,
        // so the genuine image's pull succeeds on the refused snapshot; but no
        // container of it starts there either: nothing reads those bytes.
        let image = client.pull(&genuine, &remote()).await.unwrap();
        let e = client
            .run(
                "genuine-refused",
                &image,
                &ContainerOptions::args(&["cat", "/msg"]),
            )
            .await
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("refused"), "{e}");
    }

    // Once the images on it are gone, the genuine one pulls (whole: the
    // forged entry is never used again) and reads genuine bytes.
    if was_served {
        client.delete_image(&hostile).await.unwrap();
        client.delete_image(&genuine).await.unwrap();
    }
    client.delete_image(&twin).await.ok();
    client.gc().await.unwrap();
    let image = client.pull(&genuine, &remote()).await.unwrap();
    assert_reads_genuine(&client, &image).await;
    tb.finish();
}

/// Someone who can push to one repository pushes an image on a popular
/// layer with an index giving that layer's true diff_id and EROFS digest
/// (anyone can compute both) but chunk digests of their own, and pulls it
/// on a shared node. Another repository's image on the same layer, pulled
/// in another namespace while that lazy copy fills, never reads bytes the
/// hostile index vouches for: the snapshot made from the copy is shared
/// with it only once verified (here: refused, so the pull fails saying
/// why), and once the hostile image is gone it pulls and reads the real
/// bytes. (Sharing at once because the layer and EROFS digests matched
/// would have served the hostile chunks.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_repositorys_index_never_vouches_for_a_pulls_bytes() {
    require_containers!();
    let mut tb = Testbed::start_hyperbox(|b| b.without_cri()).await;
    let mut spec = ImageSpec::busybox(&["cat", "/data/x"]).unwrap();
    // 4 MiB that does not compress, on a 5 Mbit/s link: the hostile copy's
    // whole download, which would catch the lie, takes seconds.
    spec.layers.push(
        Layer::new(Compression::Gzip)
            .file("data/x", "the real bytes", 0o644)
            .large_file("data/pad", 4 << 20, 5),
    );
    let built = spec.build(&tb.work_dir().join("popular")).unwrap();
    let theirs = built
        .push(&tb.registry.host(), "team-x/app", "v1")
        .await
        .unwrap();
    let ours = built
        .push(&tb.registry.host(), "team-y/app", "v1")
        .await
        .unwrap();
    tb.hyperbox().hb_index(&ours);
    tb.hyperbox().hb_index(&theirs);
    // Their index, with every data chunk of the top layer vouched for by a
    // digest of their own (the metadata chunks left true, so it mounts).
    let registry = registry_client(&tb);
    let r = hyperbox_registry::Reference::parse(&theirs).unwrap();
    let manifest = hyperbox_registry::digest::Digest::parse(&built.manifest.digest).unwrap();
    let mut forged = registry.fetch_index(&r, &manifest).await.unwrap().unwrap();
    let cs = forged.chunk_size;
    let top = &mut forged.layers[1];
    let data = 1..(top.data_end / cs) as usize;
    assert!(data.len() > 4, "the top layer has data chunks: {data:?}");
    for c in data {
        top.chunks[c] = format!("{:064x}", c);
    }
    push_index(&registry, &r, &forged, &built).await;

    let slow = hyperbox_integration::proxy::Shaping {
        latency: Duration::from_millis(5),
        bits_per_sec: Some(5_000_000),
    };
    let (theirs, ours) = (tb.via_proxy(&theirs), tb.via_proxy(&ours));
    tb.proxy.set_shaping(slow);
    let client = tb.containerd.client().await.unwrap();
    let hostile = client.pull(&theirs, &remote()).await.unwrap();
    assert_eq!(hostile.layers_skipped, [0, 1], "served by hyperbox");
    let team_y = client.with_namespace("team-y");
    let reads = |id: &'static str, image| {
        let team_y = team_y.clone();
        async move {
            let out = team_y
                .run(id, &image, &ContainerOptions::default())
                .await
                .unwrap();
            assert_eq!(out.stdout_str(), "the real bytes", "{}", out.stderr_str());
        }
    };
    match team_y.pull(&ours, &remote()).await {
        // Verified before the pull asked (a fast machine): real bytes.
        Ok(image) => reads("ours-first", image).await,
        Err(e) => {
            let e = format!("{e:#}");
            assert!(e.contains("cannot be shared with this pull"), "{e}");
        }
    }
    let log = tb.hyperbox().log();
    assert!(
        log.contains("shared only once verified"),
        "the copy was shared before its verdict:\n{log}"
    );
    tb.proxy
        .set_shaping(hyperbox_integration::proxy::Shaping::default());
    client.delete_image(&theirs).await.unwrap();
    client.gc().await.unwrap();
    let image = team_y.pull(&ours, &remote()).await.unwrap();
    reads("ours", image).await;
    team_y.delete_image(&ours).await.unwrap();
    team_y.gc().await.unwrap();
    tb.finish();
}
