//! A layer blob on disk to an EROFS image file: detect the compression,
//! stream the tar through [`crate::writer`], fsync and publish by rename, so
//! a crash leaves either the old state or the whole image, never a torn one.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::writer;

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

/// Decompresses `blob` into an EROFS image at `tmp`, then publishes it as
/// `out` (rename, then fsync of the directory).
pub fn convert(
    blob: &Path,
    tmp: &Path,
    out: &Path,
    options: writer::Options,
) -> Result<writer::Summary, Error> {
    let mut f = BufReader::with_capacity(1 << 20, fs::File::open(blob).map_err(io("open", blob))?);
    let compression = Compression::sniff(f.fill_buf().map_err(io("read", blob))?);
    let tar: Box<dyn Read> = match compression {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(f)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(f).map_err(io("read zstd", blob))?)
        }
        Compression::None => Box::new(f),
    };
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(io("create", tmp))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let summary = writer::convert_with(tar, &mut w, options).map_err(Error::Content)?;
    let file = w
        .into_inner()
        .map_err(|e| io("write", tmp)(e.into_error()))?;
    file.sync_all().map_err(io("sync", tmp))?;
    fs::rename(tmp, out).map_err(io("rename", out))?;
    if let Some(dir) = out.parent() {
        let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

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
