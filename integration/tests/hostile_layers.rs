//! Layers that play the attacker against the tar → EROFS writer, pulled
//! through hyperbox's remote path with real containerd and a real registry:
//! a sparse file must read as it does on containerd's overlayfs (GNU tar's
//! PAX sparse format, which a naive reader turns into a `GNUSparseFile.0/`
//! directory), and a header bomb of a few KiB must fail the pull with an
//! error naming the entry, leave nothing behind, and keep the daemon small.
//! So must a flood of empty entries past `snapshotter.max_layer_entries`
//! and a small blob carrying hundreds of MiB after its tar's end.

use std::process::Command;

use hyperbox_integration::client::{ContainerOptions, PullOptions};
use hyperbox_integration::image::{Compression, ImageSpec, Layer};
use hyperbox_integration::require_containers;
use hyperbox_integration::snapshotter::NAME;
use hyperbox_integration::testbed::Testbed;

fn remote() -> PullOptions {
    PullOptions {
        snapshotter: NAME.into(),
        remote_labels: true,
    }
}

/// GNU tar's `--sparse --format=posix` archive of one sparse file
/// `data/sparse` (3 MiB: two runs of data, holes around them), without its
/// end-of-archive blocks.
fn gnu_tar_sparse() -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let f = std::fs::File::create(dir.path().join("data/sparse")).unwrap();
    f.set_len(3 << 20).unwrap();
    f.write_all_at(b"start of the file\n", 0).unwrap();
    f.write_all_at(&[b'x'; 10_000], 1 << 20).unwrap();
    f.write_all_at(b"end\n", (3 << 20) - 4).unwrap();
    let out = Command::new("tar")
        .args(["--sparse", "--format=posix", "--owner=0", "--group=0", "-C"])
        .arg(dir.path())
        .args(["-cf", "-", "data/sparse"])
        .output()
        .expect("run GNU tar");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut tar = out.stdout;
    assert!(
        tar.windows(16).any(|w| w == b"GNU.sparse.major"),
        "GNU tar wrote a PAX sparse entry"
    );
    // Drop the trailing zero blocks: the layer's own end follows.
    while tar.len() >= 512 && tar[tar.len() - 512..].iter().all(|b| *b == 0) {
        tar.truncate(tar.len() - 512);
    }
    tar
}

/// A PAX extended header announcing `size` bytes (all `a`), then a file:
/// a few KiB once compressed with zstd.
fn pax_bomb(size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_path("PaxHeaders/bomb").unwrap();
    h.set_mode(0o644);
    h.set_size(size);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.resize(out.len() + size.div_ceil(512) as usize * 512, b'a');
    let mut f = tar::Header::new_ustar();
    f.set_path("bomb").unwrap();
    f.set_mode(0o644);
    f.set_size(0);
    f.set_cksum();
    out.extend_from_slice(f.as_bytes());
    out
}

/// Peak resident memory (`VmHWM`) of `pid`, bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_files_read_as_on_overlayfs_and_header_bombs_fail_cleanly() {
    require_containers!();
    let mut tb = Testbed::start_hyperbox(|b| b.without_cri()).await;
    let client = tb.containerd.client().await.unwrap();

    // A sparse file from GNU tar: the real file, its name, size and bytes.
    let mut spec = ImageSpec::busybox(&["true"]).unwrap();
    spec.layers
        .push(Layer::new(Compression::Gzip).raw_tar(gnu_tar_sparse()));
    let sparse_ref = tb.push(&spec, "hostile/sparse", "v1").await;
    let ours = client.pull(&sparse_ref, &remote()).await.unwrap();
    assert!(
        !ours.layers_skipped.is_empty(),
        "hyperbox served the layers (AlreadyExists)"
    );
    let theirs_ref = tb.via_proxy(&sparse_ref);
    let theirs = client
        .pull(&theirs_ref, &PullOptions::local("overlayfs"))
        .await
        .unwrap();
    let script = "ls -A /data; stat -c '%n %s %a' /data/sparse; md5sum /data/sparse; \
                  head -c 18 /data/sparse; tail -c 4 /data/sparse";
    let args = ContainerOptions::args(&["sh", "-c", script]);
    let ours_out = client.run("sparse-hyperbox", &ours, &args).await.unwrap();
    let theirs_out = client
        .run("sparse-overlayfs", &theirs, &args)
        .await
        .unwrap();
    assert_eq!(ours_out.stderr_str(), "");
    assert_eq!(ours_out.status, 0);
    let seen = ours_out.stdout_str();
    assert!(
        seen.starts_with("sparse\n/data/sparse 3145728 644\n"),
        "the real file under its real name: {seen}"
    );
    assert!(!seen.contains("GNUSparseFile"), "{seen}");
    assert_eq!(seen, theirs_out.stdout_str(), "EROFS vs overlayfs");

    // A zstd layer of a few KiB whose PAX header announces 256 MiB.
    let pid = tb.hyperbox().pid().expect("the snapshotter runs");
    let mut spec = ImageSpec::busybox(&["true"]).unwrap();
    let mut bomb = Layer::new(Compression::Zstd).file("before", "x", 0o644);
    bomb = bomb.raw_tar(pax_bomb(256 << 20));
    spec.layers.push(bomb);
    let scratch = tempfile::tempdir().unwrap();
    let built = spec.build(scratch.path()).expect("build the bomb");
    let top = built.top();
    assert!(top.size < 64 << 10, "a small blob: {} bytes", top.size);
    let reference = tb.push(&spec, "hostile/bomb", "v1").await;
    let e = client
        .pull(&reference, &remote())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer entry after \"before\"")
            && e.contains("PAX extended header of 268435456 bytes"),
        "a clear error naming the entry: {e}"
    );
    assert!(!client.image_exists(&reference).await.unwrap());
    let peak = peak_rss(pid);
    assert!(
        peak < 100 << 20,
        "the snapshotter peaked at {} MiB",
        peak >> 20
    );
    let staging: Vec<_> = std::fs::read_dir(tb.hyperbox().root().join("staging"))
        .unwrap()
        .collect();
    assert!(staging.is_empty(), "no partial files: {staging:?}");
    client.delete_image(&theirs_ref).await.unwrap();
    client.delete_image(&sparse_ref).await.unwrap();
    client.gc().await.unwrap();
    tb.finish();
}

/// `n` empty files in directories of 1000, as tar headers only (the
/// layer's own end follows).
fn empty_files(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 512);
    for i in 0..n {
        let mut h = tar::Header::new_ustar();
        h.set_path(format!("many/d{:03}/f{i:07}", i / 1000))
            .unwrap();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_floods_and_data_after_the_archive_fail_cleanly() {
    require_containers!();
    let mut tb =
        Testbed::start_hyperbox_configured("max_layer_entries = 20000", |b| b.without_cri()).await;
    let client = tb.containerd.client().await.unwrap();
    let pid = tb.hyperbox().pid().expect("the snapshotter runs");
    let scratch = tempfile::tempdir().unwrap();

    // Under the limit: 15000 files (and their 15 directories) are served.
    let mut spec = ImageSpec::busybox(&["true"]).unwrap();
    spec.layers
        .push(Layer::new(Compression::Gzip).raw_tar(empty_files(15_000)));
    let fine = tb.push(&spec, "hostile/entries-ok", "v1").await;
    let image = client.pull(&fine, &remote()).await.unwrap();
    assert!(
        !image.layers_skipped.is_empty(),
        "hyperbox served the layers"
    );
    let args = ContainerOptions::args(&["sh", "-c", "find /many -type f | wc -l"]);
    let out = client.run("entries-ok", &image, &args).await.unwrap();
    assert_eq!(out.stdout_str().trim(), "15000", "{}", out.stderr_str());

    // 200000 empty files: a few MiB of gzip, refused at the limit.
    let mut spec = ImageSpec::busybox(&["true"]).unwrap();
    spec.layers
        .push(Layer::new(Compression::Gzip).raw_tar(empty_files(200_000)));
    let built = spec.build(scratch.path()).expect("build the flood");
    assert!(
        built.top().size < 8 << 20,
        "a small blob: {} bytes",
        built.top().size
    );
    let flood = tb.push(&spec, "hostile/entries", "v1").await;
    let e = client
        .pull(&flood, &remote())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the layer has more than 20000 entries (snapshotter.max_layer_entries)"),
        "a clear error naming the key: {e}"
    );
    assert!(!client.image_exists(&flood).await.unwrap());

    // 512 MiB of zeros after the end-of-archive blocks, in a small blob.
    let mut spec = ImageSpec::busybox(&["true"]).unwrap();
    spec.layers.push(
        Layer::new(Compression::Zstd)
            .file("data/f", "x", 0o644)
            .raw_tar(vec![0u8; 512 << 20]),
    );
    let built = spec.build(scratch.path()).expect("build the padding");
    assert!(
        built.top().size < 1 << 20,
        "a small blob: {} bytes",
        built.top().size
    );
    let trailing = tb.push(&spec, "hostile/trailing", "v1").await;
    let started = std::time::Instant::now();
    let e = client
        .pull(&trailing, &remote())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("more than 67108864 bytes after its end-of-archive blocks"),
        "a clear error: {e}"
    );
    assert!(!client.image_exists(&trailing).await.unwrap());
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        "trailing data refused"
    );

    let peak = peak_rss(pid);
    assert!(
        peak < 100 << 20,
        "the snapshotter peaked at {} MiB",
        peak >> 20
    );
    let staging: Vec<_> = std::fs::read_dir(tb.hyperbox().root().join("staging"))
        .unwrap()
        .collect();
    assert!(staging.is_empty(), "no partial files: {staging:?}");
    client.delete_image(&fine).await.unwrap();
    client.gc().await.unwrap();
    tb.finish();
}
