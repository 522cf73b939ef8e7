//! Conversion throughput of hyperbox's tar → EROFS writer against raw disk
//! write speed (copying the same tar) and against erofs-utils' `mkfs.erofs`
//! of the same tree, in the same run. Each output is fsynced inside the
//! timing; inputs are warm in the page cache for all three; throughput is
//! the tar's size over the time, so the figures compare directly.
//!
//! `cargo bench -p hyperbox-integration --bench erofs` runs it and rewrites
//! its section of docs/benchmarks.md; under `cargo test` it runs a small
//! smoke iteration.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hyperbox_erofs::writer::convert;
use hyperbox_integration::bench::{full_run, machine, percentile, write_section};
use hyperbox_integration::image::{Compression, Layer};

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn fsync(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

fn main() {
    let mkfs_present = Command::new("mkfs.erofs").arg("--help").output().is_ok();
    if !mkfs_present {
        assert!(
            !hyperbox_integration::prereq::require_all(),
            "mkfs.erofs (erofs-utils) missing with HYPERBOX_REQUIRE_ALL=1"
        );
        eprintln!("SKIPPED bench erofs: mkfs.erofs (erofs-utils) not installed");
        return;
    }
    let full = full_run();
    let (small, big, runs) = if full {
        (20_000, 3 * 96, 5)
    } else {
        (200, 1, 1)
    };
    let work = tempfile::Builder::new()
        .prefix("hb-bench-erofs-")
        .tempdir()
        .unwrap();
    let mut layer = Layer::new(Compression::None).many_small_files("usr/share/small", small, 4096);
    for i in 0..3 {
        layer = layer.large_file(&format!("opt/big{i}"), (big / 3).max(1) << 20, i);
    }
    let blob = layer.write_blob(work.path()).unwrap();
    let tar = blob.blob.path.clone();
    let tar_bytes = blob.blob.size;
    let tree = work.path().join("tree");
    tar::Archive::new(File::open(&tar).unwrap())
        .unpack(&tree)
        .unwrap();
    // Warm the inputs once.
    std::io::copy(&mut File::open(&tar).unwrap(), &mut std::io::sink()).unwrap();

    let (mut raw, mut ours, mut mkfs) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..runs {
        let out = work.path().join(format!("out{n}"));
        raw.push(timed(|| {
            let mut w = BufWriter::new(File::create(&out).unwrap());
            std::io::copy(&mut BufReader::new(File::open(&tar).unwrap()), &mut w).unwrap();
            w.flush().unwrap();
            drop(w);
            fsync(&out);
        }));
        std::fs::remove_file(&out).unwrap();
        ours.push(timed(|| {
            let img = BufWriter::new(File::create(&out).unwrap());
            convert(BufReader::new(File::open(&tar).unwrap()), img).unwrap();
            fsync(&out);
        }));
        std::fs::remove_file(&out).unwrap();
        mkfs.push(timed(|| {
            let st = Command::new("mkfs.erofs")
                .arg("--quiet")
                .arg(&out)
                .arg(&tree)
                .status()
                .unwrap();
            assert!(st.success());
            fsync(&out);
        }));
        std::fs::remove_file(&out).unwrap();
    }
    let mbps = |d: Duration| tar_bytes as f64 / (1 << 20) as f64 / d.as_secs_f64();
    let (r, o, m) = (
        percentile(&raw, 50.0),
        percentile(&ours, 50.0),
        percentile(&mkfs, 50.0),
    );
    let mut body = String::new();
    body.push_str("## EROFS conversion throughput\n\n");
    body.push_str(&format!(
        "Command: `cargo bench -p hyperbox-integration --bench erofs` (as root). Machine: {}. Release build, \
         erofs-utils 1.5 from Debian 12.\n\n",
        machine()
    ));
    body.push_str(&format!(
        "Input: an uncompressed layer tar of {:.0} MiB ({small} files of 4 KiB and three files of {} MiB). \
         Medians of {runs} runs; every output fsynced inside the timing; throughput = tar size / time.\n\n",
        tar_bytes as f64 / (1 << 20) as f64,
        (big / 3).max(1)
    ));
    body.push_str("| what | median time | throughput |\n|---|---|---|\n");
    for (what, d) in [
        ("raw disk write (copy the tar)", r),
        ("hyperbox writer (tar → EROFS, streaming)", o),
        ("mkfs.erofs of the extracted tree", m),
    ] {
        body.push_str(&format!(
            "| {what} | {:.0} ms | {:.0} MiB/s |\n",
            d.as_secs_f64() * 1000.0,
            mbps(d)
        ));
    }
    body.push_str(&format!(
        "\nhyperbox writer throughput: **{:.2}×** raw disk write, **{:.2}×** mkfs.erofs (above 1 is faster).\n",
        mbps(o) / mbps(r),
        mbps(o) / mbps(m)
    ));
    println!("{body}");
    if full {
        let path = write_section("erofs-convert", &body).unwrap();
        println!("written to {}", path.display());
    }
}
