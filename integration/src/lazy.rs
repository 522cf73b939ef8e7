//! The lazy path end to end, as a scenario the tests of each serving path
//! (fanotify on the host, FUSE on the host and in guests booting older
//! kernels) run, and the helpers that look at what it left.

use std::path::Path;
use std::time::Duration;

use crate::client::{ContainerOptions, PullOptions};
use crate::image::{Compression, ImageSpec, Layer};
use crate::snapshotter::NAME;
use crate::testbed::Testbed;

/// Lazy layers not complete yet (their `.lazy` state files).
pub fn lazy_files_left(tb: &mut Testbed) -> usize {
    let layers = tb.hyperbox().root().join("lazy");
    std::fs::read_dir(layers)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".lazy"))
        .count()
}

/// Waits (up to 2 minutes) until every lazy layer is complete.
pub async fn wait_complete(tb: &mut Testbed) {
    let start = std::time::Instant::now();
    while lazy_files_left(tb) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "lazy layers never completed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An image whose container reads 1 MiB near the end of a 48 MiB file
/// (`/data/big`, gzip): a fill in file order reaches it long after the
/// container asked for it, and a learned list names exactly it.
pub fn read_near_the_end() -> crate::image::ImageSpec {
    use crate::image::{Compression, ImageSpec, Layer};
    let read = [
        "dd",
        "if=/data/big",
        "of=/dev/null",
        "bs=65536",
        "skip=700",
        "count=16",
    ];
    let mut spec = ImageSpec::busybox(&read).expect("busybox");
    spec.layers
        .push(Layer::new(Compression::Gzip).large_file("data/big", 48 << 20, 9));
    spec
}

/// The value of the unlabelled metric `name` on a `/metrics` page.
pub fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {page}"))
}

/// The total seconds reads of lazy layers waited for their answers, and
/// how many reads (`hyperbox_snapshotter_lazy_read_wait_seconds`).
pub fn read_wait(page: &str) -> (f64, u64) {
    let name = "hyperbox_snapshotter_lazy_read_wait_seconds_sum";
    let sum = page
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {page}"));
    (
        sum,
        metric(page, "hyperbox_snapshotter_lazy_read_wait_seconds_count"),
    )
}

/// The sizes reads of lazy layers asked for
/// (`hyperbox_snapshotter_lazy_read_bytes`): each bucket's upper bound
/// and how many reads were at most that, in order; the last is `+Inf`.
pub fn read_sizes(page: &str) -> Vec<(f64, u64)> {
    let prefix = "hyperbox_snapshotter_lazy_read_bytes_bucket{le=\"";
    let out: Vec<(f64, u64)> = page
        .lines()
        .filter_map(|l| {
            let (le, n) = l.strip_prefix(prefix)?.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, n.trim().parse().ok()?))
        })
        .collect();
    assert!(
        out.last().is_some_and(|(le, _)| le.is_infinite()),
        "no hyperbox_snapshotter_lazy_read_bytes in {page}"
    );
    out
}

/// `(mount point, fstype, source)` of every mount under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<(String, String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some((
                f[4].to_string(),
                f[sep + 1].to_string(),
                f[sep + 2].to_string(),
            ))
        })
        .filter(|(p, _, _)| p.starts_with(&dir.display().to_string()))
        .collect()
}

/// The EROFS mounts of the testbed's snapshotter.
pub fn erofs_mounts(tb: &mut Testbed) -> Vec<(String, String, String)> {
    let root = tb.hyperbox().root();
    mounts_under(&root)
        .into_iter()
        .filter(|(_, t, _)| t == "erofs")
        .collect()
}

/// Loop devices reading a file below `dir`.
pub fn loops_reading_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file"))
            && Path::new(b.trim_end()).starts_with(dir)
        {
            out.push(format!(
                "{}: {}",
                e.file_name().to_string_lossy(),
                b.trim_end()
            ));
        }
    }
    out
}

/// The lazy pull every serving path must pass: an indexed image is
/// mounted at once and its container runs after fetching a fraction of
/// it; reads of unfetched bytes are served correctly; the layers download
/// whole at once; a kill -9 in the middle loses nothing; in the end every
/// layer is complete, and removing the image removes everything. `extra`
/// goes into `[snapshotter]`. Through FUSE (`lazy_backend = "fuse"`, or
/// any guest of [`crate::vm`], whose kernels have no pre-content events)
/// it also checks the loop devices read through FUSE while filling, are
/// taken over after the restart, and read the local file once complete.
pub async fn pull_serve_restart_complete(extra: &str) {
    let fuse = extra.contains("fuse") || crate::vm::inside();
    let mut tb = Testbed::start_hyperbox_configured(
        &format!("{extra}metrics_address = \"127.0.0.1:0\""),
        |b| b.without_cri(),
    )
    .await;
    let log = tb.hyperbox().log();
    let enabled = if fuse {
        "lazy path enabled (FUSE)"
    } else {
        "lazy path enabled (fanotify)"
    };
    assert!(log.contains(enabled), "{log}");
    // `hb doctor` says the same for the same configuration.
    let doctor = tb.hyperbox().hb_json(&["doctor", "--json"]);
    let said = doctor
        .as_array()
        .and_then(|a| a.iter().find(|f| f["name"] == "lazy_backend"))
        .map(|f| f["value"].as_str().unwrap_or_default().to_string());
    let want = if fuse { "fuse" } else { "fanotify" };
    assert_eq!(said.as_deref(), Some(want), "{doctor:#}");
    let fuse_dir = tb.hyperbox().root().join("fuse");
    let big = 48u64 << 20;
    let mut spec = ImageSpec::busybox(&["cat", "/etc/motd"]).unwrap();
    spec.layers[0] = spec.layers[0]
        .clone()
        .file("etc/motd", "lazy hello\n", 0o644);
    spec.layers
        .push(Layer::new(Compression::Gzip).large_file("data/big", big, 42));
    let reference = tb.via_proxy(&tb.push(&spec, "test/lazy", "v1").await);
    let indexed = tb.hyperbox().hb_index(&reference);
    assert_eq!(indexed["layers"].as_array().unwrap().len(), 2, "{indexed}");
    // gzip layers get maps: the registry holds no EROFS copy of them; and
    // block digest tables (index version 4), 32 bytes per 4 KiB block.
    assert_eq!(indexed["version"], 4, "{indexed}");
    for l in indexed["layers"].as_array().unwrap() {
        assert_eq!(l["source"], "map", "{indexed}");
        let blocks = l["size"].as_u64().unwrap().div_ceil(4096) * 32;
        assert_eq!(l["blocks"].as_u64(), Some(blocks), "{indexed}");
    }
    let blobs_total: u64 = std::fs::read_dir(tb.work_dir())
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum();

    // 40 Mbit/s: the background fill of 48 MiB takes about ten seconds, so
    // the container runs long before it is done.
    tb.proxy.set_shaping(crate::proxy::Shaping {
        latency: Duration::from_millis(5),
        // Slower in a guest, whose emulated CPUs start containers slowly:
        // the fill must still be running when the first one has run.
        bits_per_sec: Some(if crate::vm::inside() {
            10_000_000
        } else {
            40_000_000
        }),
    });
    let before = tb.proxy.bytes_served();
    let client = tb.containerd.client().await.unwrap();
    let image = client
        .pull(
            &reference,
            &PullOptions {
                snapshotter: NAME.into(),
                remote_labels: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(image.layers_skipped, [0, 1]);
    let out = client
        .run("lazy", &image, &ContainerOptions::default())
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), "lazy hello\n");
    let fetched = tb.proxy.bytes_served() - before;
    assert!(
        fetched < blobs_total / 2,
        "ran after fetching {fetched} of {blobs_total} bytes"
    );
    assert!(
        lazy_files_left(&mut tb) > 0,
        "still filling in the background"
    );
    // The metadata fetched before the mount covers its first chunk only in
    // part: its blocks were checked against their table entries.
    let page = tb.hyperbox().metrics().await;
    assert!(
        metric(&page, "hyperbox_snapshotter_lazy_block_table_bytes_total") >= 512,
        "{page}"
    );
    if fuse {
        assert!(
            !loops_reading_under(&fuse_dir).is_empty(),
            "a filling layer is mounted through FUSE: {:?}",
            loops_reading_under(Path::new("/"))
        );
    }
    // No run taught this image anything, so both layers download whole at
    // once; the small one is filled from its own layer blob (its chunks
    // made as the download arrives, or copied from its conversion here),
    // not with Range requests, while the large one still comes.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let page = tb.hyperbox().metrics().await;
        assert_eq!(
            metric(&page, "hyperbox_snapshotter_lazy_untried_layers_total"),
            2,
            "{page}"
        );
        if metric(&page, "hyperbox_snapshotter_lazy_layer_filled_chunks_total")
            + metric(&page, "hyperbox_snapshotter_lazy_download_chunks_total")
            > 0
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no layer filled from its own blob: {page}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(lazy_files_left(&mut tb) > 0, "the large layer still comes");

    // kill -9 while filling; the restart takes the layers back.
    tb.hyperbox().kill(nix::sys::signal::Signal::SIGKILL);
    tb.hyperbox().start_again().await;
    // containerd reconnects to a restarted proxy plugin after about 1 s.
    client
        .wait_snapshotter(NAME, image.top_chain_id(), Duration::from_secs(60))
        .await
        .unwrap();
    if fuse {
        let log = tb.hyperbox().log();
        assert!(
            log.contains("loop device of an earlier instance switched"),
            "{log}"
        );
    }
    let want = {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        let mut r = crate::image::PatternReader::new(42);
        let mut left = big as usize;
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let n = left.min(buf.len());
            std::io::Read::read_exact(&mut r, &mut buf[..n]).unwrap();
            h.update(&buf[..n]);
            left -= n;
        }
        hex::encode(h.finalize())
    };
    let out = client
        .run(
            "lazy-read",
            &image,
            &ContainerOptions::args(&["sha256sum", "/data/big"]),
        )
        .await
        .unwrap();
    assert_eq!(out.status, 0, "{}", out.stderr_str());
    assert!(out.stdout_str().starts_with(&want), "{}", out.stdout_str());
    tb.proxy.set_shaping(crate::proxy::Shaping::default());
    wait_complete(&mut tb).await;
    if fuse {
        // Complete: the loop devices read the local file, FUSE is out of
        // the path.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !loops_reading_under(&fuse_dir).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "still reading through FUSE: {:?}",
                loops_reading_under(&fuse_dir)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(!loops_reading_under(&tb.hyperbox().root().join("lazy")).is_empty());
    }
    let out = client
        .run(
            "complete",
            &image,
            &ContainerOptions::args(&["sha256sum", "/data/big"]),
        )
        .await
        .unwrap();
    assert!(out.stdout_str().starts_with(&want));

    // Every byte came from the image's own layer blobs and the maps: the
    // EROFS images were never asked for (they are not in the registry),
    // and reads fetched layer ranges.
    let requests = tb.proxy.requests();
    for l in indexed["layers"].as_array().unwrap() {
        let erofs = l["erofs"].as_str().unwrap();
        assert!(
            !requests.iter().any(|r| r.contains(erofs)),
            "EROFS image {erofs} requested: {requests:#?}"
        );
    }
    assert!(
        requests.iter().any(|r| {
            r.contains("range=bytes=")
                && indexed["layers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|l| r.contains(l["layer"].as_str().unwrap()))
        }),
        "no Range request on a layer blob: {requests:#?}"
    );

    // Removing the image removes the lazy layers, mounts and files.
    client.delete_image(&reference).await.unwrap();
    client.gc().await.unwrap();
    let left = tb
        .hyperbox()
        .wait_for_count(&[], 0, Duration::from_secs(30))
        .await;
    assert!(left.is_empty(), "{left:#?}");
    assert_eq!(erofs_mounts(&mut tb), []);
    tb.finish();
}
