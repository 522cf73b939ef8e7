//! Measures what each tar entry costs the writer in memory: converts a
//! generated tar of N empty files (in directories of 1000, names like real
//! ones) and prints the process's peak resident memory per entry. The tar
//! is generated as it is read and the image goes to a file, so the peak is
//! the writer's own.
//!
//! `cargo run --release -p hyperbox-erofs --example entry_memory -- 1000000`

use std::io::{self, Read};

/// A tar of `n` empty files `dNNN/file-NNNNNNNN`, made as it is read.
struct Entries {
    n: u64,
    next: u64,
    block: Vec<u8>,
    at: usize,
    ended: bool,
}

impl Read for Entries {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at == self.block.len() {
            if self.ended {
                return Ok(0);
            }
            if self.next == self.n {
                self.block = vec![0; 1024];
                self.ended = true;
            } else {
                let mut h = tar::Header::new_ustar();
                h.set_path(format!("d{:03}/file-{:08}", self.next / 1000, self.next))
                    .map_err(io::Error::other)?;
                h.set_mode(0o644);
                h.set_uid(0);
                h.set_gid(0);
                h.set_size(0);
                h.set_mtime(1_700_000_000);
                h.set_cksum();
                self.block = h.as_bytes().to_vec();
                self.next += 1;
            }
            self.at = 0;
        }
        let k = buf.len().min(self.block.len() - self.at);
        buf[..k].copy_from_slice(&self.block[self.at..self.at + k]);
        self.at += k;
        Ok(k)
    }
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let before = status_kib("VmRSS:");
    // Removed on drop, also when the conversion panics.
    let out = tempfile::NamedTempFile::new().expect("create the image file");
    let file = out.reopen().expect("open the image file");
    let tar = Entries {
        n,
        next: 0,
        block: Vec::new(),
        at: 0,
        ended: false,
    };
    let options = hyperbox_erofs::writer::Options {
        max_layer_entries: u64::MAX,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let summary = hyperbox_erofs::writer::convert_with(tar, io::BufWriter::new(file), options)
        .expect("convert");
    let peak = status_kib("VmHWM:");
    drop(out);
    println!(
        "{n} entries, {} inodes, image {} bytes, {:.2} s: peak RSS {} KiB (start {} KiB), {:.0} bytes per entry",
        summary.inodes,
        summary.image_bytes,
        started.elapsed().as_secs_f64(),
        peak,
        before,
        (peak.saturating_sub(before) * 1024) as f64 / n as f64
    );
}
