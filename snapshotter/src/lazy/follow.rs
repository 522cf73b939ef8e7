//! A mapped layer made from its own download as the bytes arrive.
//!
//! While a lazy layer's whole download lands in the staging file
//! ([`super::staged`]), one thread inflates it front to back (a plain tar
//! is read as it is) and writes every chunk the tar bytes so far make,
//! each checked against its digest like any other. The image's file data
//! is in tar order ([`hyperbox_erofs::map`]), so the chunks come in index
//! order and a few MiB of tar are all it keeps.
//!
//! Without it a run's reads behind the download's front each inflated
//! their checkpoint's span from the staging file, and a first run whose
//! reads are scattered (1,000 small files over 272 MiB) did most of that
//! after the download ended, beside the layer's conversion: its tail was
//! the image inflated twice on two cores. With it the chunks are in by
//! the time the download ends, made while the link, not the CPU, was the
//! limit, and reads of them cost an event: that first run went from
//! 10.56 s to 9.26 s (full fetch 9.55 s), the Python image's from 4.45 s
//! to 4.25 s (docs/benchmarks.md). It runs at nice 10, so the reads the
//! snapshotter serves come first.
//!
//! It stops when the download does (the fill says so), when the layer
//! leaves filling, or at bytes that do not inflate; whatever it did not
//! make comes from the conversion's copy as before.

use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyperbox_erofs::map::Source;

use super::blob::Blob;
use super::mapped::Mapped;
use super::{Lazy, Phase, lock};

/// How often the reader looks for more of the download.
const POLL: Duration = Duration::from_millis(20);

/// Tar bytes inflated per step.
const STEP: usize = 1 << 20;

/// The most tar bytes one chunk may need from the follower.
const MAX_WINDOW: u64 = 8 << 20;

/// A running follower; dropping it ends it at its next look at the
/// download.
pub(super) struct Follower {
    stop: Arc<AtomicBool>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The staging file read as it grows: a read at its end waits for more
/// until the download is over.
struct Growing {
    file: File,
    /// Where it is: another file there (a download started over from
    /// nothing) ends the reading.
    path: PathBuf,
    at: u64,
    /// The whole blob's size, from the map.
    size: u64,
    stop: Arc<AtomicBool>,
    blob: Arc<Blob>,
}

impl Read for Growing {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.at >= self.size {
                return Ok(0);
            }
            if self.stop.load(Ordering::Relaxed) || self.blob.phase() != Phase::Filling {
                return Err(std::io::Error::other("the download ended"));
            }
            let want = buf.len().min((self.size - self.at) as usize);
            let n = self.file.read_at(&mut buf[..want], self.at)?;
            if n > 0 {
                self.at += n as u64;
                return Ok(n);
            }
            let same = |m: std::fs::Metadata| {
                self.file
                    .metadata()
                    .is_ok_and(|f| (f.dev(), f.ino()) == (m.dev(), m.ino()))
            };
            if !std::fs::metadata(&self.path).is_ok_and(same) {
                return Err(std::io::Error::other("the download started over"));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Lazy {
    /// Starts making `blob`'s chunks from its download at `staged`, if it
    /// is a mapped layer whose map is in.
    pub(super) fn follow(self: &Arc<Self>, blob: &Arc<Blob>, staged: PathBuf) -> Option<Follower> {
        let m = blob.mapped.get()?.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let (me, b, halt) = (self.clone(), blob.clone(), stop.clone());
        crate::remote::spawn_named("hb-follow", true, move || {
            match me.follow_download(&b, &m, &staged, halt) {
                Ok(made) => {
                    tracing::debug!(erofs = %b.erofs, chunks = made, "chunks made from the layer's download")
                }
                Err(why) => {
                    tracing::debug!(erofs = %b.erofs, why, "stopped making chunks from the layer's download")
                }
            }
        })
        .ok()?;
        Some(Follower { stop })
    }

    /// The loop of [`Lazy::follow`]: how many chunks it made.
    fn follow_download(
        &self,
        blob: &Arc<Blob>,
        m: &Mapped,
        staged: &std::path::Path,
        stop: Arc<AtomicBool>,
    ) -> Result<u64, String> {
        // The download creates the file when its first bytes come.
        let file = loop {
            if stop.load(Ordering::Relaxed) || blob.phase() != Phase::Filling {
                return Err("the download ended before it began".into());
            }
            match File::open(staged) {
                Ok(f) => break f,
                Err(_) => std::thread::sleep(POLL),
            }
        };
        let map = &m.map;
        let growing = Growing {
            file,
            path: staged.to_path_buf(),
            at: 0,
            size: map.blob_size,
            stop: stop.clone(),
            blob: blob.clone(),
        };
        let mut tar: Box<dyn Read> = match map.source {
            Source::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(
                256 << 10,
                growing,
            ))),
            Source::Tar => Box::new(growing),
        };
        let mut window = TarWindow::default();
        let mut made = 0u64;
        // Whole chunks, so blocks under a block table are checked by
        // their own digests, without the table.
        let chunks = blob.state.entry.chunks.len();
        for i in 0..chunks {
            if blob.units_of(i).all(|u| lock(&blob.present)[u]) {
                continue;
            }
            let (s, len) = blob.whole_chunk_range(i);
            if stop.load(Ordering::Relaxed) || blob.phase() != Phase::Filling {
                return Err("the download ended".into());
            }
            if let Some(n) = map.need(s, len) {
                // A chunk whose bytes lie far apart in the tar (a map no
                // hb makes, or a file written twice) is left to reads,
                // which bound what one request inflates too: the window
                // stays a few MiB whatever the map says.
                if n.tar_end - n.tar_start > MAX_WINDOW {
                    continue;
                }
                window.span(&mut tar, n.tar_start, n.tar_end)?;
            }
            let mut piece = vec![0u8; len as usize];
            if map
                .assemble(s, &mut piece, window.base, window.bytes())
                .is_ok()
                && blob.put_chunk_whole(i, &piece).map_err(|e| e.to_string())?
            {
                made += 1;
                self.counters
                    .download_chunks
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(made)
    }
}

/// The tar bytes from `base` on that a chunk may still need, read from the
/// stream as chunks ask.
#[derive(Default)]
struct TarWindow {
    buf: Vec<u8>,
    /// Where `base` is in `buf`.
    lo: usize,
    base: u64,
}

impl TarWindow {
    fn bytes(&self) -> &[u8] {
        &self.buf[self.lo..]
    }

    /// Makes the window start at `start` and reach `end` (`start` at or
    /// past `base`), reading `tar` as far as needed.
    fn span(&mut self, tar: &mut dyn Read, start: u64, end: u64) -> Result<(), String> {
        let have_end = self.base + self.bytes().len() as u64;
        if start >= have_end {
            // Nothing kept is needed: skip to `start`.
            self.buf.clear();
            self.lo = 0;
            let skip = start - have_end;
            let copied = std::io::copy(&mut tar.take(skip), &mut std::io::sink())
                .map_err(|e| e.to_string())?;
            if copied < skip {
                return Err("the layer ended before the map says".into());
            }
        } else {
            self.lo += (start - self.base) as usize;
        }
        self.base = start;
        // Move what is kept to the front now and then, not per chunk.
        if self.lo >= STEP * 4 {
            self.buf.drain(..self.lo);
            self.lo = 0;
        }
        while self.base + (self.bytes().len() as u64) < end {
            let have = self.buf.len();
            self.buf.resize(have + STEP, 0);
            let got = tar.read(&mut self.buf[have..]);
            self.buf.truncate(have + got.as_ref().map_or(0, |n| *n));
            match got.map_err(|e| e.to_string())? {
                0 => return Err("the layer ended before the map says".into()),
                _ => continue,
            }
        }
        Ok(())
    }
}
