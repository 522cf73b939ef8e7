//! A layer blob on disk to an EROFS image file: detect the compression,
//! stream the tar through [`crate::writer`], fsync and publish by rename, so
//! a crash leaves either the old state or the whole image, never a torn one.
//!
//! The decompressed stream is hashed as it is converted (every byte, the
//! tar's trailing blocks included), giving the layer's diff_id: what the
//! image config promises for it, and what containerd names snapshots by.
//! What follows the end-of-archive blocks is hashed too, but only up to
//! [`writer::MAX_TRAILING_BYTES`] (and never past `max_layer_bytes`): a
//! few KiB of gzip can carry gigabytes of zeros there.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::map::{LayerMap, Point, Source};
use crate::{writer, zran};

/// Errors of [`convert`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The layer's content is unacceptable.
    #[error(transparent)]
    Content(writer::Error),
    /// A file operation failed.
    #[error("{action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file it was done to.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io {
        action,
        path,
        source,
    }
}

/// The compressions a layer blob can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip (`application/vnd.oci.image.layer.v1.tar+gzip`).
    Gzip,
    /// zstd (`…tar+zstd`).
    Zstd,
    /// A plain tar.
    None,
}

impl Compression {
    /// Tells the compression from the blob's first bytes: Prepare's labels
    /// carry no media type, and magic numbers cannot lie about the decoder
    /// the bytes need.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// What [`convert_hashed`] made of a blob.
#[derive(Debug)]
pub struct Converted {
    /// The writer's summary.
    pub summary: writer::Summary,
    /// The digest of the decompressed tar (`sha256:<hex>`), the layer's
    /// diff_id as the blob's bytes actually give it.
    pub diff_id: String,
}

/// Hashes what is read through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Decompresses `blob` into an EROFS image at `tmp`, then publishes it as
/// `out` (rename, then fsync of the directory).
pub fn convert(
    blob: &Path,
    tmp: &Path,
    out: &Path,
    options: writer::Options,
) -> Result<writer::Summary, Error> {
    convert_hashed(blob, tmp, out, options).map(|c| c.summary)
}

/// [`convert`], which also gives the diff_id of the blob's decompressed
/// stream, hashed while it was converted.
pub fn convert_hashed(
    blob: &Path,
    tmp: &Path,
    out: &Path,
    options: writer::Options,
) -> Result<Converted, Error> {
    run(blob, tmp, out, options, None).map(|(c, _)| c)
}

/// A [`LayerMap`] and each of its checkpoints' windows, as
/// [`LayerMap::encode`] takes them.
#[derive(Debug)]
pub struct Mapped {
    /// The map, windows not yet placed.
    pub map: LayerMap,
    /// One window per checkpoint.
    pub windows: Vec<Vec<u8>>,
}

/// [`convert_hashed`], which also maps the image onto the blob
/// (checkpoints about every `span` bytes of tar for gzip). A zstd blob
/// gets no map: a single zstd frame has no place to resume from.
pub fn convert_mapped(
    blob: &Path,
    tmp: &Path,
    out: &Path,
    options: writer::Options,
    span: u64,
) -> Result<(Converted, Option<Mapped>), Error> {
    run(blob, tmp, out, options, Some(span))
}

/// What the tar is read through.
enum Decoder<R: BufRead> {
    Gzip(flate2::bufread::MultiGzDecoder<R>),
    Indexed(zran::Indexer<R>),
    Zstd(zstd::stream::read::Decoder<'static, R>),
    Plain(R),
}

impl<R: BufRead> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Indexed(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
            Decoder::Plain(d) => d.read(buf),
        }
    }
}

fn run(
    blob: &Path,
    tmp: &Path,
    out: &Path,
    options: writer::Options,
    span: Option<u64>,
) -> Result<(Converted, Option<Mapped>), Error> {
    let file = fs::File::open(blob).map_err(io("open", blob))?;
    let blob_size = file.metadata().map_err(io("stat", blob))?.len();
    let mut f = BufReader::with_capacity(1 << 20, file);
    let compression = Compression::sniff(f.fill_buf().map_err(io("read", blob))?);
    let tar = match (compression, span) {
        (Compression::Gzip, None) => Decoder::Gzip(flate2::bufread::MultiGzDecoder::new(f)),
        (Compression::Gzip, Some(span)) => {
            Decoder::Indexed(zran::Indexer::new(f, span).map_err(io("read gzip", blob))?)
        }
        (Compression::Zstd, _) => Decoder::Zstd(
            zstd::stream::read::Decoder::with_buffer(f).map_err(io("read zstd", blob))?,
        ),
        (Compression::None, _) => Decoder::Plain(f),
    };
    let mut tar = Hashing {
        inner: tar,
        hasher: Sha256::new(),
        bytes: 0,
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(io("create", tmp))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let (summary, extents) = if span.is_some() {
        writer::convert_mapped(&mut tar, &mut w, options).map_err(Error::Content)?
    } else {
        let s = writer::convert_with(&mut tar, &mut w, options).map_err(Error::Content)?;
        (s, Vec::new())
    };
    // The writer stops at the end-of-archive blocks; the diff_id covers
    // whatever follows them too, up to a bound.
    let limit = writer::MAX_TRAILING_BYTES.min(options.max_layer_bytes);
    let trailing = std::io::copy(&mut (&mut tar).take(limit + 1), &mut std::io::sink())
        .map_err(io("read", blob))?;
    if trailing > limit {
        return Err(Error::Content(writer::Error::TrailingData { limit }));
    }
    let diff_id = format!("sha256:{}", hex(&tar.hasher.finalize()));
    let tar_size = tar.bytes;
    let mut file = w
        .into_inner()
        .map_err(|e| io("write", tmp)(e.into_error()))?;
    file.sync_all().map_err(io("sync", tmp))?;
    let mapped = match (span, tar.inner) {
        (Some(_), Decoder::Indexed(ix)) => {
            let points = trimmed(blob, ix.into_points())?;
            Some(map_of(
                &mut file, tmp, &summary, extents, tar_size, blob_size, points,
            )?)
        }
        (Some(_), Decoder::Plain(_)) => Some(map_of(
            &mut file,
            tmp,
            &summary,
            extents,
            tar_size,
            blob_size,
            Vec::new(),
        )?),
        _ => None,
    };
    fs::rename(tmp, out).map_err(io("rename", out))?;
    if let Some(dir) = out.parent() {
        let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok((Converted { summary, diff_id }, mapped))
}

/// `points` of the gzip blob at `path` with their windows trimmed to the
/// bytes back-references reach ([`crate::trim`]): the map's windows are
/// most of its size, and half or more of a window of text is never
/// referred to. A window whose trim does not check stays whole.
fn trimmed(path: &Path, mut points: Vec<zran::Checkpoint>) -> Result<Vec<zran::Checkpoint>, Error> {
    let file = fs::File::open(path).map_err(io("open", path))?;
    for p in &mut points {
        if p.window.is_empty() {
            continue;
        }
        let bytes = crate::trim::read_blob(&file, p.fetch_from(), crate::trim::read_for(0))
            .map_err(io("read", path))?;
        if let Some(r) = crate::trim::trim((&[], 0), p, &bytes, p.output) {
            p.window = r.window;
        }
    }
    Ok(points)
}

/// The map of the image just written to `file`: its metadata read back.
fn map_of(
    file: &mut fs::File,
    path: &Path,
    summary: &writer::Summary,
    extents: Vec<writer::Extent>,
    tar_size: u64,
    blob_size: u64,
    points: Vec<zran::Checkpoint>,
) -> Result<Mapped, Error> {
    use std::os::unix::fs::FileExt;
    let meta_len = 4096 + summary.image_bytes - summary.data_end;
    let mut metadata = vec![0u8; meta_len as usize];
    file.read_exact_at(&mut metadata[..4096], 0)
        .map_err(io("read back", path))?;
    file.read_exact_at(&mut metadata[4096..], summary.data_end)
        .map_err(io("read back", path))?;
    let source = if points.is_empty() {
        Source::Tar
    } else {
        Source::Gzip
    };
    let (points, windows) = points
        .into_iter()
        .map(|c| (Point::of(&c), c.window))
        .unzip();
    Ok(Mapped {
        map: LayerMap {
            source,
            blob_size,
            tar_size,
            image_size: summary.image_bytes,
            data_end: summary.data_end,
            extents,
            points,
            metadata,
        },
        windows,
    })
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256(bytes: &[u8]) -> String {
        format!("sha256:{}", hex(&Sha256::digest(bytes)))
    }

    fn a_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, "msg", &b"hello"[..]).unwrap();
        let mut t = b.into_inner().unwrap();
        // Padding after the end-of-archive blocks, as some tools write.
        t.extend_from_slice(&[0u8; 4096]);
        t
    }

    #[test]
    fn diff_id_is_the_digest_of_the_whole_decompressed_stream() {
        let tar = a_tar();
        let want = sha256(&tar);
        let gz = {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&tar).unwrap();
            e.finish().unwrap()
        };
        let zst = zstd::encode_all(&tar[..], 1).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for (name, blob) in [("plain", tar.clone()), ("gzip", gz), ("zstd", zst)] {
            let (b, t, o) = (
                dir.join(format!("{name}.blob")),
                dir.join(format!("{name}.tmp")),
                dir.join(format!("{name}.erofs")),
            );
            fs::write(&b, &blob).unwrap();
            let c = convert_hashed(&b, &t, &o, writer::Options::default()).unwrap();
            assert_eq!(
                c.diff_id, want,
                "{name}: the digest of the tar, trailing blocks included"
            );
            assert!(o.exists() && !t.exists(), "{name}: published");
        }
        // Other content, other diff_id: one changed byte of the file.
        let mut other = tar.clone();
        let at = other.windows(5).position(|w| w == b"hello").unwrap();
        other[at] = b'j';
        let b = dir.join("other.blob");
        fs::write(&b, &other).unwrap();
        let c = convert_hashed(
            &b,
            &dir.join("o.tmp"),
            &dir.join("o.erofs"),
            writer::Options::default(),
        )
        .unwrap();
        assert_ne!(c.diff_id, want);
        assert_eq!(c.diff_id, sha256(&other));
    }

    /// gzip of `tar` followed by `trailing` zero bytes.
    fn gzip_with_trailing(tar: &[u8], trailing: u64) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(tar).unwrap();
        let zeros = vec![0u8; 1 << 20];
        let mut left = trailing;
        while left > 0 {
            let n = left.min(zeros.len() as u64);
            e.write_all(&zeros[..n as usize]).unwrap();
            left -= n;
        }
        e.finish().unwrap()
    }

    #[test]
    fn bytes_after_the_end_of_the_archive_are_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let run = |blob: &[u8], options: writer::Options| {
            let (b, t, o) = (dir.join("blob"), dir.join("tmp"), dir.join("out"));
            fs::write(&b, blob).unwrap();
            convert_hashed(&b, &t, &o, options)
        };
        // A record's padding, and then some, is part of the diff_id.
        let tar = a_tar();
        let padded = gzip_with_trailing(&tar, 1 << 20);
        let c = run(&padded, writer::Options::default()).unwrap();
        let mut whole = tar.clone();
        whole.resize(tar.len() + (1 << 20), 0);
        assert_eq!(c.diff_id, sha256(&whole));

        // Past the cap: a small gzip carrying 64 MiB and one block.
        let bomb = gzip_with_trailing(&tar, writer::MAX_TRAILING_BYTES + 512);
        assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
        let e = run(&bomb, writer::Options::default()).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Content(writer::Error::TrailingData {
                    limit: writer::MAX_TRAILING_BYTES
                })
            ),
            "{e}"
        );
        assert!(e.to_string().contains("after its end-of-archive"), "{e}");

        // Never past max_layer_bytes either.
        let small = writer::Options {
            max_layer_bytes: 1 << 20,
            ..Default::default()
        };
        let two = gzip_with_trailing(&tar, 2 << 20);
        let e = run(&two, small).unwrap_err();
        assert!(
            matches!(e, Error::Content(writer::Error::TrailingData { limit }) if limit == 1 << 20),
            "{e}"
        );
    }

    #[test]
    fn compression_is_told_by_magic_numbers() {
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(
            Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(Compression::sniff(b"usr/"), Compression::None);
        assert_eq!(Compression::sniff(&[0x1f]), Compression::None);
        assert_eq!(Compression::sniff(&[]), Compression::None);
    }
}
