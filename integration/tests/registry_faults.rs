//! Registry faults injected by the harness proxy surface as clear errors,
//! through our client's pull and through containerd's own fetcher (CRI), and
//! lose nothing: no image is recorded, and once the fault clears the same
//! pull succeeds. Also checks what the proxy reports: bytes served, and that
//! its bandwidth cap holds.

use std::time::{Duration, Instant};

use hyperbox_integration::client::{ContainerOptions, PullOptions};
use hyperbox_integration::image::{Compression, ImageSpec, Layer};
use hyperbox_integration::proxy::{Fault, FaultRule, Shaping};
use hyperbox_integration::require_containers;
use hyperbox_integration::testbed::Testbed;

/// What containerd's own fetcher (CRI) does with a fault.
enum Cri {
    /// Fails, with an error that mentions these words.
    Fails(&'static [&'static str]),
    /// Recovers by resuming the blob with Range requests and pulls the image.
    Resumes,
}

/// A fault, what our client's error must say, and what CRI does.
struct Case {
    fault: Fault,
    api_says: &'static [&'static str],
    cri: Cri,
}

const CASES: &[Case] = &[
    Case {
        fault: Fault::Status(503),
        api_says: &["/blobs/sha256:", "HTTP 503"],
        cri: Cri::Fails(&["503 Service Unavailable"]),
    },
    // Cut before any body byte: no progress, so no retry can help.
    Case {
        fault: Fault::ResetAfter(0),
        api_says: &["/blobs/sha256:", "reading body"],
        cri: Cri::Fails(&["connection reset by peer"]),
    },
    Case {
        fault: Fault::TruncateAfter(0),
        api_says: &["/blobs/sha256:", "reading body"],
        cri: Cri::Fails(&["EOF"]),
    },
    // Reset mid-blob: containerd 1.7 does not resume after a reset.
    Case {
        fault: Fault::ResetAfter(64 * 1024),
        api_says: &["/blobs/sha256:", "reading body"],
        cri: Cri::Fails(&["connection reset by peer"]),
    },
    Case {
        fault: Fault::TruncateAfter(64 * 1024),
        api_says: &["/blobs/sha256:", "reading body"],
        cri: Cri::Resumes,
    },
    Case {
        fault: Fault::CorruptAt(1000),
        api_says: &["/blobs/sha256:", "digest mismatch"],
        cri: Cri::Fails(&["unexpected commit digest"]),
    },
];

fn assert_mentions(err: &str, words: &[&str], what: &str) {
    for w in words {
        assert!(
            err.contains(w),
            "{what}: error does not mention {w:?}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_is_a_clear_error_and_a_clean_retry_succeeds() {
    require_containers!();
    let tb = Testbed::start().await;
    let client = tb.containerd.client().await.unwrap();
    let cri = tb.containerd.cri().await.unwrap();

    for (i, case) in CASES.iter().enumerate() {
        // A fresh layer per case, so nothing is already in containerd.
        let mut spec = ImageSpec::busybox(&["echo", &format!("case {i}")]).unwrap();
        spec.layers[0] = spec.layers[0]
            .clone()
            .file("etc/case", format!("{i}"), 0o644);
        let direct = tb.push(&spec, &format!("faults/case{i}"), "v1").await;
        let reference = tb.via_proxy(&direct);
        let what = format!("{:?}", case.fault);

        tb.proxy.clear_faults();
        tb.proxy.inject(FaultRule::blobs(case.fault));
        let fired = tb.proxy.faults_fired();
        let err = client
            .pull(&reference, &PullOptions::local("overlayfs"))
            .await
            .expect_err("pull through a faulty registry must fail");
        assert!(tb.proxy.faults_fired() > fired, "{what}: the fault was hit");
        assert_mentions(
            &err.to_string(),
            case.api_says,
            &format!("API pull, {what}"),
        );
        assert!(
            !client.image_exists(&reference).await.unwrap(),
            "{what}: no image recorded"
        );

        match case.cri {
            Cri::Fails(words) => {
                let err = cri
                    .pull_image(&reference)
                    .await
                    .expect_err("CRI pull through a faulty registry must fail");
                assert_mentions(&err.to_string(), words, &format!("CRI pull, {what}"));
                assert!(
                    !cri.image_present(&reference).await.unwrap(),
                    "{what}: CRI has no image"
                );
            }
            Cri::Resumes => {
                cri.pull_image(&reference)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: containerd should resume: {e}"));
                let ranged = tb
                    .proxy
                    .requests()
                    .iter()
                    .filter(|r| r.contains("range"))
                    .count();
                assert!(ranged > 0, "{what}: resumed with Range requests");
            }
        }

        tb.proxy.clear_faults();
        let image = client
            .pull(&reference, &PullOptions::local("overlayfs"))
            .await
            .unwrap_or_else(|e| panic!("{what}: retry after the fault cleared: {e}"));
        let out = client
            .run(&format!("case{i}"), &image, &ContainerOptions::default())
            .await
            .unwrap();
        assert_eq!(out.stdout_str(), format!("case {i}\n"));
        cri.pull_image(&reference)
            .await
            .unwrap_or_else(|e| panic!("{what}: CRI retry after the fault cleared: {e}"));
    }

    tb.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_counts_bytes_and_holds_its_bandwidth_cap() {
    require_containers!();
    let tb = Testbed::start_with(|b| b.without_cri()).await;
    let mut spec = ImageSpec::busybox(&["true"]).unwrap();
    spec.layers
        .push(Layer::new(Compression::None).large_file("blob", 2 << 20, 3));
    let dir = tb.work_dir().join("shaped");
    let built = spec.build(&dir).unwrap();
    let direct = built
        .push(&tb.registry.host(), "shaped/app", "v1")
        .await
        .unwrap();
    let reference = tb.via_proxy(&direct);

    let bits_per_sec = 16_000_000;
    tb.proxy.set_shaping(Shaping {
        latency: Duration::from_millis(20),
        bits_per_sec: Some(bits_per_sec),
    });
    let client = tb.containerd.client().await.unwrap();
    let start = Instant::now();
    client
        .pull(&reference, &PullOptions::local("overlayfs"))
        .await
        .unwrap();
    let took = start.elapsed();

    // Every byte of the image crossed the proxy: manifests, config, layers.
    let blobs: u64 = built.layers.iter().map(|l| l.blob.size).sum::<u64>() + built.config.size;
    let manifests = built.manifest.size + built.index.as_ref().map_or(0, |i| i.size);
    assert_eq!(tb.proxy.bytes_served(), blobs + manifests);
    // The cap is a floor on the time: the bytes cannot arrive faster.
    let floor = Duration::from_secs_f64((blobs + manifests) as f64 * 8.0 / bits_per_sec as f64);
    assert!(
        took >= floor,
        "pulled {} bytes in {took:?}, faster than the cap allows ({floor:?})",
        blobs + manifests
    );
    let requests = tb.proxy.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /v2/shaped/app/blobs/")),
        "{requests:#?}"
    );

    tb.finish();
}
