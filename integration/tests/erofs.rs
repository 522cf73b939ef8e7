//! hyperbox's tar → EROFS writer against the real checkers: every image
//! passes erofs-utils' `fsck.erofs`, the kernel mounts it straight from its
//! file, and a stack of the layer images under overlayfs shows exactly what a
//! container sees on containerd's overlayfs snapshotter. Hostile layers are
//! refused with a clear error.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use hyperbox_erofs::writer::{Error, convert};
use hyperbox_integration::client::{ContainerOptions, PullOptions};
use hyperbox_integration::image::{Compression, LayerBlob, media};
use hyperbox_integration::prereq::Prereq;
use hyperbox_integration::testbed::Testbed;
use hyperbox_integration::{corpus, require, require_containers};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// The layer's uncompressed tar.
fn tar_of(layer: &LayerBlob) -> Vec<u8> {
    let f = std::fs::File::open(&layer.blob.path).unwrap();
    let mut r: Box<dyn Read> = match layer.blob.media_type.as_str() {
        media::LAYER_GZIP => Box::new(flate2::read::GzDecoder::new(f)),
        media::LAYER_ZSTD => Box::new(zstd::Decoder::new(f).unwrap()),
        _ => Box::new(f),
    };
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    out
}

fn fsck(image: &Path) {
    let out = Command::new("fsck.erofs")
        .arg(image)
        .output()
        .expect("run fsck.erofs (erofs-utils)");
    assert!(
        out.status.success(),
        "fsck.erofs {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Drops what runtime mounts cover (their attributes come from proc, sysfs
/// and the runtime's /dev, not from the image).
fn image_lines(listing: &str) -> String {
    listing
        .lines()
        .filter(|l| {
            !["./proc", "./sys", "./dev"]
                .iter()
                .any(|m| l.starts_with(m))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

struct Mounted(Vec<PathBuf>);

impl Drop for Mounted {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = umount2(m, MntFlags::MNT_DETACH);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_images_stacked_by_the_kernel_equal_overlayfs() {
    require_containers!();
    let tb = Testbed::start_with(|b| b.without_cri()).await;
    let spec = corpus::tricky();
    let built = spec.build(&tb.work_dir().join("tricky")).unwrap();
    let reference = built
        .push(&tb.registry.host(), "erofs/tricky", "v1")
        .await
        .unwrap();

    // What a container sees on containerd's overlayfs.
    let client = tb.containerd.client().await.unwrap();
    let image = client
        .pull(&reference, &PullOptions::local("overlayfs"))
        .await
        .unwrap();
    let theirs = client
        .run(
            "reference",
            &image,
            &ContainerOptions::args(&["sh", "-c", &corpus::tree_script("/")]),
        )
        .await
        .unwrap();
    assert_eq!(theirs.stderr_str(), "");

    // The same layers as EROFS images, mounted by the kernel from their files.
    let work = tempfile::tempdir().unwrap();
    let mut mounted = Mounted(Vec::new());
    let mut lowers = Vec::new();
    for (i, layer) in built.layers.iter().enumerate() {
        let img = work.path().join(format!("layer{i}.erofs"));
        let summary = convert(&tar_of(layer)[..], std::fs::File::create(&img).unwrap()).unwrap();
        assert!(
            summary.inodes > 1 && summary.image_bytes == std::fs::metadata(&img).unwrap().len()
        );
        fsck(&img);
        let dir = work.path().join(format!("layer{i}"));
        std::fs::create_dir(&dir).unwrap();
        mount(
            Some(img.as_path()),
            &dir,
            Some("erofs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount -t erofs {}: {e}", img.display()));
        mounted.0.push(dir.clone());
        lowers.push(dir);
    }
    let merged = work.path().join("merged");
    std::fs::create_dir(&merged).unwrap();
    let lowerdir: Vec<String> = lowers
        .iter()
        .rev()
        .map(|d| d.display().to_string())
        .collect();
    mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        MsFlags::MS_RDONLY,
        Some(format!("lowerdir={}", lowerdir.join(":")).as_str()),
    )
    .unwrap();
    mounted.0.push(merged.clone());
    let ours = Command::new(hyperbox_integration::image::BUSYBOX)
        .args([
            "sh",
            "-c",
            &corpus::tree_script(&merged.display().to_string()),
        ])
        .output()
        .unwrap();
    assert!(
        ours.status.success(),
        "{}",
        String::from_utf8_lossy(&ours.stderr)
    );
    corpus::assert_same_tree(
        &image_lines(&String::from_utf8_lossy(&ours.stdout)),
        &image_lines(&theirs.stdout_str()),
        "EROFS layers under overlayfs vs containerd's overlayfs",
    );
    // xattrs survive (the container cannot show them; the host can).
    let xattr = nix::sys::stat::lstat(&merged.join("data/sticky")).map(|_| ());
    assert!(xattr.is_ok());
    let mut value = [0u8; 16];
    let path = std::ffi::CString::new(merged.join("data/sticky").display().to_string()).unwrap();
    let name = std::ffi::CString::new("user.hyperbox").unwrap();
    // SAFETY: path and name are NUL-terminated and value outlives the call.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    assert_eq!(&value[..n.max(0) as usize], b"kept");
    drop(mounted);
    tb.finish();
}

/// A tar with one raw header (bypassing the tar crate's own path checks, as
/// a hostile layer would) followed by `rest`.
fn hostile(
    path: &[u8],
    kind: tar::EntryType,
    link: &[u8],
    rest: &[(&str, tar::EntryType, &str)],
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = tar::Builder::new(&mut out);
    for (p, k, l) in rest {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*k);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_mode(0o755);
        h.set_size(0);
        if !l.is_empty() {
            h.set_link_name(l).unwrap();
        }
        b.append_data(&mut h, p, std::io::empty()).unwrap();
    }
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..path.len()].copy_from_slice(path);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(kind);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_mode(0o644);
    h.set_size(0);
    h.set_cksum();
    b.append(&h, std::io::empty()).unwrap();
    b.into_inner().unwrap();
    out
}

#[test]
fn hostile_layers_are_refused_with_a_clear_error() {
    let convert_err = |tar: Vec<u8>| {
        let out = tempfile::tempfile().unwrap();
        convert(&tar[..], out).unwrap_err()
    };
    let e = convert_err(hostile(
        b"../../etc/passwd",
        tar::EntryType::Regular,
        b"",
        &[],
    ));
    assert!(
        matches!(e, Error::UnsafePath { .. }) && e.to_string().contains("'..'"),
        "{e}"
    );
    let e = convert_err(hostile(b"/etc/passwd", tar::EntryType::Regular, b"", &[]));
    assert!(e.to_string().contains("absolute path"), "{e}");
    let e = convert_err(hostile(
        b"escape/passwd",
        tar::EntryType::Regular,
        b"",
        &[("escape", tar::EntryType::Symlink, "/etc")],
    ));
    assert!(e.to_string().contains("passes through a symlink"), "{e}");
    let e = convert_err(hostile(b"link", tar::EntryType::Link, b"etc/shadow", &[]));
    assert!(matches!(e, Error::HardLinkOutside { .. }), "{e}");
    let e = convert_err(hostile(
        b"link",
        tar::EntryType::Link,
        b"../../etc/shadow",
        &[],
    ));
    assert!(matches!(e, Error::HardLinkOutside { .. }), "{e}");
    // A truncated stream is an error, not a short image.
    let mut tar = hostile(b"ok", tar::EntryType::Regular, b"", &[]);
    let mut big = tar::Header::new_gnu();
    big.set_path("big").unwrap();
    big.set_size(1 << 20);
    big.set_uid(0);
    big.set_gid(0);
    big.set_mtime(0);
    big.set_mode(0o644);
    big.set_cksum();
    tar.truncate(tar.len() - 1024);
    tar.extend_from_slice(big.as_bytes());
    tar.extend_from_slice(&[7u8; 1000]);
    let e = convert_err(tar);
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("big"),
        "{e}: {:?}",
        std::error::Error::source(&e)
    );
    // A header field that is not a number names the entry.
    let mut h = tar::Header::new_gnu();
    h.set_path("ok").unwrap();
    h.set_size(0);
    h.set_mode(0o644);
    h.set_gid(0);
    h.set_mtime(0);
    h.as_old_mut().uid = *b"zzzzzzz\0";
    h.set_cksum();
    let mut bad = h.as_bytes().to_vec();
    bad.extend_from_slice(&[0u8; 1024]);
    let e = convert_err(bad);
    assert!(e.to_string().contains("uid of \"ok\""), "{e}");
}

#[test]
fn every_layer_kind_passes_fsck() {
    require!(Prereq::Busybox);
    let dir = tempfile::tempdir().unwrap();
    for (i, layer) in corpus::tricky().layers.iter().enumerate() {
        let mut layer = layer.clone();
        layer.compression = Compression::None;
        let blob = layer.write_blob(dir.path()).unwrap();
        let img = dir.path().join(format!("{i}.erofs"));
        convert(
            std::fs::File::open(&blob.blob.path).unwrap(),
            std::fs::File::create(&img).unwrap(),
        )
        .unwrap();
        fsck(&img);
    }
}

/// A GNU sparse entry of a file past 4 GiB (as `tar -S` writes it): the
/// image holds its full size with the holes left unwritten, the kernel reads the bytes on both sides of
/// the 4 GiB boundary, and fsck.erofs accepts it.
#[test]
fn sparse_file_past_4_gib_keeps_its_size_and_bytes() {
    require!(Prereq::Root);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let size: u64 = (4 << 30) + 8192;
    let tail_at: u64 = (4 << 30) + 100;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(src.join("big")).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail-past-4GiB", tail_at).unwrap();
    }
    let tar = dir.path().join("sparse.tar");
    let out = Command::new("tar")
        .args(["-S", "--format=gnu", "-C"])
        .arg(&src)
        .arg("-cf")
        .arg(&tar)
        .arg("big")
        .output()
        .expect("GNU tar");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(src.join("big")).unwrap();
    assert!(
        std::fs::metadata(&tar).unwrap().len() < 1 << 20,
        "the tar is sparse"
    );

    let image = dir.path().join("big.erofs");
    let summary = convert(
        std::fs::File::open(&tar).unwrap(),
        std::fs::File::create(&image).unwrap(),
    )
    .unwrap();
    // Only the data runs are copied; the holes stay holes in the image.
    assert!(
        summary.data_bytes <= 2 * 4096,
        "two data runs copied, not {} bytes",
        summary.data_bytes
    );
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&image).unwrap();
        assert!(m.len() > size, "the image addresses the whole file");
        assert!(
            m.blocks() * 512 < 1 << 20,
            "{} bytes of disk for 4 GiB of holes",
            m.blocks() * 512
        );
    }
    fsck(&image);

    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    mount(
        Some(image.as_path()),
        &mnt,
        Some("erofs"),
        MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .unwrap();
    let read = (|| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(mnt.join("big"))?;
        let len = f.metadata()?.len();
        let mut head = [0u8; 4];
        f.read_exact_at(&mut head, 0)?;
        let mut tail = [0u8; 14];
        f.read_exact_at(&mut tail, tail_at)?;
        let mut zeros = [1u8; 64];
        f.read_exact_at(&mut zeros, 1 << 31)?;
        std::io::Result::Ok((len, head, tail, zeros))
    })();
    umount2(&mnt, MntFlags::MNT_DETACH).unwrap();
    let (len, head, tail, zeros) = read.unwrap();
    assert_eq!(len, size);
    assert_eq!(&head, b"head");
    assert_eq!(&tail, b"tail-past-4GiB");
    assert!(zeros.iter().all(|b| *b == 0), "holes read as zeros");
}
