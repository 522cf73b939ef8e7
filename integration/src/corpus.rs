//! Images whose rootfs is easy to get wrong, and a way to compare what a
//! container sees: every snapshotter must show exactly what containerd's
//! overlayfs snapshotter shows for them.

use crate::image::{Compression, Data, ImageSpec, Layer, Meta, RunConfig};

/// A three-layer image exercising what overlay semantics must get right:
/// whiteouts, an opaque directory, a setuid file owned by a non-root user
/// with a hard link, a symlink, a 200-byte name, a 24 MiB file, 500 small
/// files and a fifo, across gzip, uncompressed and zstd layers.
pub fn tricky() -> ImageSpec {
    let mut suid = Meta::mode(0o4755);
    suid.uid = 1000;
    suid.gid = 1001;
    let mut sticky = Meta::mode(0o1777);
    sticky
        .xattrs
        .push(("user.hyperbox".into(), b"kept".to_vec()));
    ImageSpec {
        layers: vec![
            Layer::busybox(Compression::Gzip).expect("busybox"),
            Layer::new(Compression::None)
                .dir("data", 0o755)
                .file("data/keep", "kept", 0o644)
                .file("data/gone", "deleted above", 0o644)
                .dir("data/opq", 0o755)
                .file("data/opq/old", "hidden by opaque", 0o644)
                .many_small_files("data/small", 500, 64),
            Layer::new(Compression::Zstd)
                .whiteout("data/gone")
                .opaque("data/opq")
                .file("data/opq/new", "only me", 0o644)
                .file_with("data/suid", Data::Bytes(b"#!/bin/sh\n".to_vec()), suid)
                .hardlink("data/suid-link", "data/suid")
                .symlink("data/link", "keep")
                .file(&format!("data/{}", long_name()), "long", 0o644)
                .large_file("data/big", 24 << 20, 9)
                .file_with("data/sticky", Data::Bytes(b"s".to_vec()), sticky)
                .fifo("data/pipe"),
        ],
        run: RunConfig {
            cmd: vec!["sh".into(), "-c".into(), "true".into()],
            ..Default::default()
        },
        with_index: false,
    }
}

/// The 200-character file name in [`tricky`].
pub fn long_name() -> String {
    "n".repeat(200)
}

/// A busybox shell script printing one line per entry under `dir` on its
/// filesystem: path, type, mode, owner, then the link count, size and MD5 of
/// regular files, or the target of symlinks. Directory sizes and link counts
/// are left out: they depend on the filesystem and on what is mounted below,
/// not on what the image says.
pub fn tree_script(dir: &str) -> String {
    format!(
        "cd {dir} && find . -xdev | sort | while read -r f; do \
           printf '%s %s %s %s' \"$f\" \"$(stat -c %F \"$f\")\" \"$(stat -c %a \"$f\")\" \"$(stat -c %u:%g \"$f\")\"; \
           if [ -L \"$f\" ]; then printf ' -> %s' \"$(readlink \"$f\")\"; \
           elif [ -f \"$f\" ]; then printf ' %s %s %s' \"$(stat -c %h \"$f\")\" \"$(stat -c %s \"$f\")\" \"$(md5sum < \"$f\" | cut -d' ' -f1)\"; fi; \
           echo; done"
    )
}

/// Panics with the first line where two tree listings differ.
pub fn assert_same_tree(ours: &str, theirs: &str, what: &str) {
    let (a, b): (Vec<&str>, Vec<&str>) = (ours.lines().collect(), theirs.lines().collect());
    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
        assert_eq!(x, y, "{what}: listings differ at line {i}");
    }
    assert_eq!(a.len(), b.len(), "{what}: listings differ in length");
}
