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

/// The many-small-files image of the lazy-pull benchmark: busybox and
/// 20,000 files of mixed size (256 B to 80 KiB, log-uniform, about 14 KiB
/// on average) in two gzip layers, with text-like contents that gzip
/// shrinks about as much as real files; `/app/list` names 1,000 of them
/// chosen at random. The workload reads every listed file, in list order,
/// and prints the SHA-256 of what it read.
#[derive(Debug)]
pub struct ManyFiles {
    /// The image; its command is the workload.
    pub spec: ImageSpec,
    /// What the workload prints.
    pub expected: String,
    /// Files in the image (busybox aside), and their bytes.
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Bytes of the files the workload reads.
    pub read_bytes: u64,
}

/// Builds [`ManyFiles`] (deterministic: the same bytes every run).
pub fn many_files() -> ManyFiles {
    const FILES: usize = 20_000;
    const READ: usize = 1_000;
    let numbers = |seed| {
        let mut rng = crate::image::PatternReader::new(seed);
        move || {
            let mut b = [0u8; 8];
            std::io::Read::read_exact(&mut rng, &mut b).expect("endless");
            u64::from_le_bytes(b)
        }
    };
    // The files read, in the order read, chosen first: only their texts are
    // kept beside the layers.
    let mut pick = numbers(1_000);
    let mut order = Vec::with_capacity(READ);
    let mut chosen = std::collections::HashMap::new();
    while order.len() < READ {
        let i = (pick() % FILES as u64) as usize;
        if chosen.insert(i, String::new()).is_none() {
            order.push(i);
        }
    }
    let mut next = numbers(20_000);
    // A vocabulary of 512 words of 2 to 9 letters: text gzip shrinks about
    // 3x, as it does source files, configs and docs.
    let words: Vec<String> = (0..512)
        .map(|_| {
            let len = 2 + (next() % 8) as usize;
            (0..len)
                .map(|_| (b'a' + (next() % 26) as u8) as char)
                .collect()
        })
        .collect();
    let mut layers = [
        Layer::new(Compression::GzipDefault).dir("data", 0o755),
        Layer::new(Compression::GzipDefault).dir("data", 0o755),
    ];
    let mut paths = Vec::with_capacity(FILES);
    let mut bytes = 0u64;
    for i in 0..FILES {
        // log-uniform between 2^8 and 2^16.32 (80 KiB)
        let exp = 8.0 + (next() % 10_000) as f64 / 10_000.0 * 8.32;
        let size = 2f64.powf(exp) as usize;
        let mut text = String::with_capacity(size + 16);
        while text.len() < size {
            text.push_str(&words[(next() % 512) as usize]);
            text.push(if next().is_multiple_of(12) { '\n' } else { ' ' });
        }
        text.truncate(size);
        let dir = format!("data/d{:03}", i / 100);
        let layer = &mut layers[i % 2];
        let mut l = std::mem::replace(layer, Layer::new(Compression::GzipDefault));
        if i % 100 < 2 {
            l = l.dir(&dir, 0o755);
        }
        let path = format!("{dir}/f{i:05}.txt");
        if let Some(kept) = chosen.get_mut(&i) {
            kept.clone_from(&text);
        }
        *layer = l.file(&path, text, 0o644);
        bytes += size as u64;
        paths.push(path);
    }
    let mut list = String::new();
    let mut read_bytes = 0u64;
    let mut digest = <sha2::Sha256 as sha2::Digest>::new();
    for i in order {
        list.push('/');
        list.push_str(&paths[i]);
        list.push('\n');
        read_bytes += chosen[&i].len() as u64;
        sha2::Digest::update(&mut digest, chosen[&i].as_bytes());
    }
    let [a, b] = layers;
    let mut spec =
        ImageSpec::busybox(&["sh", "-c", "cat $(cat /app/list) | sha256sum"]).expect("busybox");
    spec.layers.push(a);
    spec.layers
        .push(b.dir("app", 0o755).file("app/list", list, 0o644));
    ManyFiles {
        spec,
        expected: format!("{}  -\n", hex::encode(sha2::Digest::finalize(digest))),
        files: FILES,
        bytes,
        read_bytes,
    }
}
