//! The SOCI snapshotter as the benchmarks run it next to hyperbox: an image
//! in the test registry converted to a SOCI-enabled one with the `soci` CLI,
//! pulled through the `soci` proxy snapshotter with the labels CRI sends,
//! and run. SOCI must really be lazy here, or comparing with it means
//! nothing: the big layer is mounted over FUSE instead of being downloaded,
//! and reading one file of it fetches far less than the layer.

use hyperbox_integration::client::{ContainerOptions, PullOptions};
use hyperbox_integration::image::{Compression, ImageSpec, Layer};
use hyperbox_integration::require_containers;
use hyperbox_integration::soci::{self, ConvertOptions, Soci};
use hyperbox_integration::testbed::Testbed;

/// The lazily loaded layer's big file: incompressible, so its blob is as big.
const BIG: u64 = 8 << 20;
/// What the container prints from the lazily loaded layer.
const HELLO: &str = "hello from a lazy layer\n";

fn soci_pull() -> PullOptions {
    PullOptions {
        snapshotter: soci::NAME.into(),
        remote_labels: true,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn soci_loads_a_converted_image_lazily_and_runs_it() {
    require_containers!();
    if !soci::require(module_path!()) {
        return;
    }
    // Without the background fetcher the bytes fetched depend only on what
    // the container reads, not on how long the test takes.
    let mut soci = Soci::start_with(soci::Options {
        background_fetch: false,
        ..Default::default()
    })
    .await
    .expect("start soci-snapshotter-grpc");
    let tb = Testbed::start_with(|b| b.proxy_plugin(soci.proxy_plugin())).await;
    soci.attach(&tb.containerd)
        .expect("point soci at containerd");

    // busybox (about 1 MiB gzipped, under the zTOC threshold: SOCI
    // downloads and unpacks it whole at pull) and an 8 MiB layer (lazy),
    // both gzip.
    let mut spec =
        ImageSpec::busybox(&["sh", "-c", "cat /data/hello.txt; stat -c %s /data/big.bin"])
            .expect("busybox image");
    spec.layers.push(
        Layer::new(Compression::Gzip)
            .dir("data", 0o755)
            .large_file("data/big.bin", BIG, 7)
            .file("data/hello.txt", HELLO, 0o644),
    );
    let built = spec
        .build(&tb.work_dir().join("soci-source"))
        .expect("build image");
    let source = built
        .push(&tb.registry.host(), "test/soci", "v1")
        .await
        .expect("push image");
    let small = built.layers[0].blob.clone();
    let big = built.layers[1].blob.clone();
    assert!(
        small.size < 4 << 20 && big.size > 4 << 20,
        "layer sizes {} and {} do not straddle the 4 MiB zTOC threshold",
        small.size,
        big.size
    );

    let target = format!("{}/test/soci:v1-soci", tb.registry.host());
    let converted = soci::convert(
        &tb.containerd,
        &source,
        &target,
        &ConvertOptions {
            min_layer_size: 4 << 20,
            span_size: Some(1 << 20),
        },
    )
    .await
    .expect("soci convert and push");
    assert_eq!(
        converted
            .ztocs
            .iter()
            .map(|(layer, _)| layer.as_str())
            .collect::<Vec<_>>(),
        [big.digest.as_str()],
        "only the big layer gets a zTOC; soci convert said:\n{}",
        converted.output
    );

    // Pulled through the counting proxy, as a node would from a registry.
    let reference = tb.via_proxy(&converted.reference);
    let client = tb.containerd.client().await.expect("client");
    let before = tb.proxy.bytes_served();
    let image = client
        .pull(&reference, &soci_pull())
        .await
        .expect("pull through soci");
    assert_eq!(
        image.layers_skipped,
        [0, 1],
        "SOCI takes both layers itself (Prepare answers AlreadyExists): the big one \
         mounted lazily, busybox (no zTOC) downloaded and unpacked by SOCI; soci log:\n{}",
        soci.log()
    );
    assert_eq!(
        soci.fuse_mounts().len(),
        1,
        "one FUSE mount, for the lazy layer: {:?}",
        soci.fuse_mounts()
    );
    let (remote, not_remote) = soci.remote_prepares();
    assert_eq!(
        (remote, not_remote),
        (1, 1),
        "SOCI's log: layers prepared remotely, and not"
    );
    eprintln!("soci: {remote} layer prepared remotely, {not_remote} not");

    let out = client
        .run(
            "soci-run",
            &image,
            &ContainerOptions {
                snapshotter: Some(soci::NAME.into()),
                ..Default::default()
            },
        )
        .await
        .expect("run a container from the SOCI image");
    assert_eq!(out.status, 0, "stderr: {}", out.stderr_str());
    assert_eq!(out.stdout_str(), format!("{HELLO}{BIG}\n"));

    // Index, manifests, config, zTOC, busybox whole, and of the big layer
    // only the span holding hello.txt (1 MiB spans): far below the layer.
    let fetched = tb.proxy.bytes_served() - before;
    assert!(
        fetched > small.size,
        "the proxy served {fetched} bytes, less than the busybox layer ({}): \
         was the image pulled through it?",
        small.size
    );
    assert!(
        fetched < small.size + big.size / 2,
        "SOCI fetched {fetched} bytes for a {} byte lazy layer and a {} byte \
         eager one: not lazy",
        big.size,
        small.size
    );
    eprintln!(
        "soci: fetched {fetched} bytes of {} (busybox {} + big layer {})",
        small.size + big.size,
        small.size,
        big.size
    );

    // Cold again: everything fetched is forgotten, so the same run fetches
    // the same again, and SOCI mounts the layer over FUSE again.
    soci.forget_image(&tb.containerd, &reference)
        .await
        .expect("forget the image");
    assert!(soci.fuse_mounts().is_empty(), "{:?}", soci.fuse_mounts());
    let before = tb.proxy.bytes_served();
    let image = client
        .pull(&reference, &soci_pull())
        .await
        .expect("pull through soci after forgetting");
    assert_eq!(image.layers_skipped, [0, 1]);
    assert_eq!(soci.fuse_mounts().len(), 1);
    assert_eq!(soci.remote_prepares(), (2, 2), "the log spans both runs");
    let out = client
        .run(
            "soci-run-cold",
            &image,
            &ContainerOptions {
                snapshotter: Some(soci::NAME.into()),
                ..Default::default()
            },
        )
        .await
        .expect("run again");
    assert_eq!(out.stdout_str(), format!("{HELLO}{BIG}\n"));
    let refetched = tb.proxy.bytes_served() - before;
    assert!(
        refetched > small.size && refetched < small.size + big.size / 2,
        "a cold run after forgetting fetched {refetched} bytes, the first {fetched}"
    );

    tb.finish();
    let left = soci.shutdown();
    assert!(left.is_empty(), "soci left behind: {left:#?}");
}
