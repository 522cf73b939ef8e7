//! OCI images built from a description and pushed to a registry through the
//! distribution API (blob upload, manifest, index).
//!
//! Tests describe layers entry by entry ([`Layer`]) so that every case the
//! snapshotter must get right — whiteouts, opaque dirs, hard links, symlinks,
//! xattrs, setuid bits, devices, long names, large and many small files — can
//! be produced from local files, with no image from the internet. Each layer
//! is written once, streaming: tar → diff-id hash → compressor → blob hash →
//! file, so large layers never sit in memory.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::write::GzEncoder;
use serde_json::json;

use crate::digest::{HashingWriter, sha256};

/// The static busybox that test rootfs are made of.
pub const BUSYBOX: &str = "/bin/busybox";

/// OCI media types used here.
pub mod media {
    /// Image index.
    pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// Image manifest.
    pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// Image config.
    pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// Uncompressed layer.
    pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    /// gzip layer.
    pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// zstd layer.
    pub const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
}

/// Errors of building or pushing an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing a layer or blob failed.
    #[error("image build: {action}")]
    Io {
        /// What was being done.
        action: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The registry answered a push request with an error.
    #[error("registry push: {action}: HTTP {status}: {body}")]
    Registry {
        /// The request.
        action: String,
        /// HTTP status.
        status: u16,
        /// Response body (truncated).
        body: String,
    },
    /// The HTTP request itself failed.
    #[error("registry push: {action}")]
    Http {
        /// The request.
        action: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
}

type Result<T> = std::result::Result<T, Error>;

fn io_err(action: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let action = action.into();
    move |source| Error::Io { action, source }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip at level 1 (quick to build; tests do not care about ratio).
    Gzip,
    /// gzip at level 6, as `docker build` and most registries' images are
    /// compressed: for benchmarks on realistic images.
    GzipDefault,
    /// zstd.
    Zstd,
}

impl Compression {
    /// The OCI media type of a layer so compressed.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => media::LAYER_TAR,
            Compression::Gzip | Compression::GzipDefault => media::LAYER_GZIP,
            Compression::Zstd => media::LAYER_ZSTD,
        }
    }
}

/// File content: literal bytes or a deterministic pseudo-random stream (large
/// files without holding them in memory; incompressible, like real binaries).
#[derive(Debug, Clone)]
pub enum Data {
    /// Literal content.
    Bytes(Vec<u8>),
    /// `len` bytes of a xorshift stream seeded with `seed`.
    Pattern {
        /// Length in bytes.
        len: u64,
        /// Seed of the stream.
        seed: u64,
    },
}

impl Data {
    fn len(&self) -> u64 {
        match self {
            Data::Bytes(b) => b.len() as u64,
            Data::Pattern { len, .. } => *len,
        }
    }

    fn reader(&self) -> Box<dyn Read + '_> {
        match self {
            Data::Bytes(b) => Box::new(&b[..]),
            Data::Pattern { len, seed } => Box::new(PatternReader::new(*seed).take(*len)),
        }
    }
}

/// Endless deterministic bytes.
#[derive(Debug)]
pub struct PatternReader {
    state: u64,
}

impl PatternReader {
    /// A stream seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }
}

impl Read for PatternReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let bytes = self.state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        Ok(buf.len())
    }
}

/// Owner, mode, mtime and xattrs of an entry.
#[derive(Debug, Clone)]
pub struct Meta {
    /// Permission bits including setuid/setgid/sticky.
    pub mode: u32,
    /// Owner uid.
    pub uid: u64,
    /// Owner gid.
    pub gid: u64,
    /// Modification time (seconds since the epoch).
    pub mtime: u64,
    /// Extended attributes, written as PAX `SCHILY.xattr.*` records.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Meta {
    /// Root-owned with `mode`, a fixed mtime, no xattrs.
    pub fn mode(mode: u32) -> Self {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            xattrs: Vec::new(),
        }
    }
}

/// One entry of a layer. Paths are relative to the rootfs (no leading `/`).
#[derive(Debug, Clone)]
pub enum Entry {
    /// A directory.
    Dir {
        /// Path.
        path: String,
        /// Metadata.
        meta: Meta,
    },
    /// A regular file.
    File {
        /// Path.
        path: String,
        /// Metadata.
        meta: Meta,
        /// Content.
        data: Data,
    },
    /// A symbolic link.
    Symlink {
        /// Path.
        path: String,
        /// Link target, as stored.
        target: String,
    },
    /// A hard link to an earlier entry of the same layer. Its header carries
    /// the target's metadata, as docker's and containerd's tar writers do:
    /// appliers set the header's mode and owner on the shared inode.
    HardLink {
        /// Path.
        path: String,
        /// The existing entry's path.
        target: String,
        /// The target's metadata.
        meta: Meta,
    },
    /// A character or block device node.
    Device {
        /// Path.
        path: String,
        /// Metadata.
        meta: Meta,
        /// Block (true) or character device.
        block: bool,
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo {
        /// Path.
        path: String,
        /// Metadata.
        meta: Meta,
    },
    /// Deletes `path` of a lower layer (`.wh.<name>`).
    Whiteout {
        /// The path removed.
        path: String,
    },
    /// Hides everything of lower layers in `dir` (`<dir>/.wh..wh..opq`).
    Opaque {
        /// The directory made opaque.
        dir: String,
    },
    /// Tar bytes (headers and data, whole 512-byte blocks) written as they
    /// are: records the tar crate does not write, or a hostile layer's.
    Verbatim {
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// A whole archive written by GNU tar with `--blocking-factor=1`,
    /// streamed from disk without its two end blocks: a real root file
    /// system (hard links, xattrs, devices as tar records them).
    TarFile {
        /// The archive.
        path: PathBuf,
    },
    /// A header written byte for byte, past the tar crate's own path checks,
    /// as a hostile layer would carry it.
    Raw {
        /// Name field.
        path: String,
        /// Entry type.
        kind: tar::EntryType,
        /// Link name field.
        link: String,
        /// Content.
        data: Vec<u8>,
    },
}

/// A layer: entries in tar order and a compression.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Entries, written in this order.
    pub entries: Vec<Entry>,
    /// Compression of the blob.
    pub compression: Compression,
}

impl Layer {
    /// An empty layer.
    pub fn new(compression: Compression) -> Self {
        Layer {
            entries: Vec::new(),
            compression,
        }
    }

    /// A rootfs with static busybox: `/bin/busybox`, a symlink per applet,
    /// `/etc/passwd`, `/etc/group` and the usual empty directories.
    pub fn busybox(compression: Compression) -> io::Result<Self> {
        let binary = std::fs::read(BUSYBOX)?;
        let out = Command::new(BUSYBOX).arg("--list").output()?;
        let mut layer = Layer::new(compression);
        for d in ["bin", "dev", "etc", "proc", "sys", "root", "var", "usr"] {
            layer = layer.dir(d, 0o755);
        }
        layer = layer.dir("tmp", 0o1777).file_with(
            "bin/busybox",
            Data::Bytes(binary),
            Meta::mode(0o755),
        );
        for applet in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if applet != "busybox" {
                layer = layer.symlink(&format!("bin/{applet}"), "busybox");
            }
        }
        Ok(layer
            .file(
                "etc/passwd",
                "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
                0o644,
            )
            .file("etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644))
    }

    /// Adds a directory.
    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        self.entries.push(Entry::Dir {
            path: path.into(),
            meta: Meta::mode(mode),
        });
        self
    }

    /// Adds a root-owned file with literal content.
    pub fn file(self, path: &str, content: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.file_with(path, Data::Bytes(content.into()), Meta::mode(mode))
    }

    /// Adds a file with full control of content and metadata.
    pub fn file_with(mut self, path: &str, data: Data, meta: Meta) -> Self {
        self.entries.push(Entry::File {
            path: path.into(),
            meta,
            data,
        });
        self
    }

    /// Adds a file of `len` deterministic pseudo-random bytes.
    pub fn large_file(self, path: &str, len: u64, seed: u64) -> Self {
        self.file_with(path, Data::Pattern { len, seed }, Meta::mode(0o644))
    }

    /// Adds `count` files of `size` bytes each under `dir` (created too).
    pub fn many_small_files(mut self, dir: &str, count: usize, size: usize) -> Self {
        self = self.dir(dir, 0o755);
        for i in 0..count {
            let content: Vec<u8> = (0..size).map(|j| (i * 31 + j) as u8).collect();
            self = self.file(&format!("{dir}/f{i:06}"), content, 0o644);
        }
        self
    }

    /// Adds a symbolic link.
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        self.entries.push(Entry::Symlink {
            path: path.into(),
            target: target.into(),
        });
        self
    }

    /// Adds a hard link to an earlier entry of this layer.
    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let meta = self
            .entries
            .iter()
            .rev()
            .find_map(|e| match e {
                Entry::File { path: p, meta, .. } if p == target => Some(meta.clone()),
                _ => None,
            })
            .unwrap_or_else(|| Meta::mode(0o644));
        self.entries.push(Entry::HardLink {
            path: path.into(),
            target: target.into(),
            meta,
        });
        self
    }

    /// Adds a device node.
    pub fn device(mut self, path: &str, block: bool, major: u32, minor: u32) -> Self {
        self.entries.push(Entry::Device {
            path: path.into(),
            meta: Meta::mode(0o600),
            block,
            major,
            minor,
        });
        self
    }

    /// Adds a named pipe.
    pub fn fifo(mut self, path: &str) -> Self {
        self.entries.push(Entry::Fifo {
            path: path.into(),
            meta: Meta::mode(0o644),
        });
        self
    }

    /// Deletes `path` from the layers below.
    pub fn whiteout(mut self, path: &str) -> Self {
        self.entries.push(Entry::Whiteout { path: path.into() });
        self
    }

    /// Makes `dir` opaque: nothing of the layers below shows through.
    pub fn opaque(mut self, dir: &str) -> Self {
        self.entries.push(Entry::Opaque { dir: dir.into() });
        self
    }

    /// A regular file with `path` stored as given (`../x`, `/etc/x`): for
    /// tests of hostile layers.
    pub fn raw_entry_path(mut self, path: &str, content: &str) -> Self {
        self.entries.push(Entry::Raw {
            path: path.into(),
            kind: tar::EntryType::Regular,
            link: String::new(),
            data: content.as_bytes().to_vec(),
        });
        self
    }

    /// A hard link to `target` stored as given: for tests of hostile layers.
    pub fn raw_hardlink(mut self, path: &str, target: &str) -> Self {
        self.entries.push(Entry::Raw {
            path: path.into(),
            kind: tar::EntryType::Link,
            link: target.into(),
            data: Vec::new(),
        });
        self
    }

    /// Appends `bytes` to the layer's tar as they are (whole 512-byte
    /// blocks, e.g. GNU tar's output without its end blocks): PAX sparse
    /// files, header bombs, anything the tar crate will not write.
    pub fn raw_tar(mut self, bytes: Vec<u8>) -> Self {
        self.entries.push(Entry::Verbatim { bytes });
        self
    }

    /// Appends the entries of an archive GNU tar wrote with
    /// `--blocking-factor=1` (see [`Entry::TarFile`]).
    pub fn tar_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.entries.push(Entry::TarFile { path: path.into() });
        self
    }

    /// Writes the layer blob into `dir` and returns its descriptor.
    pub fn write_blob(&self, dir: &Path) -> Result<LayerBlob> {
        let tmp = dir.join(format!("layer-{}.tmp", rand::random::<u64>()));
        let file = File::create(&tmp).map_err(io_err(format!("create {}", tmp.display())))?;
        let blob = HashingWriter::new(BufWriter::new(file));
        let encoder = match self.compression {
            Compression::None => Encoder::None(blob),
            Compression::Gzip => Encoder::Gzip(GzEncoder::new(blob, flate2::Compression::fast())),
            Compression::GzipDefault => {
                Encoder::Gzip(GzEncoder::new(blob, flate2::Compression::default()))
            }
            Compression::Zstd => {
                Encoder::Zstd(zstd::Encoder::new(blob, 3).map_err(io_err("start zstd encoder"))?)
            }
        };
        let mut tar = tar::Builder::new(HashingWriter::new(encoder));
        for entry in &self.entries {
            append_entry(&mut tar, entry)?;
        }
        let diff = tar.into_inner().map_err(io_err("finish tar"))?;
        let (encoder, diff_id, _) = diff.finish();
        let blob = encoder.finish().map_err(io_err("finish compression"))?;
        let (mut file, digest, size) = blob.finish();
        file.flush().map_err(io_err("flush layer"))?;
        let path = dir.join(digest.replace(':', "-"));
        std::fs::rename(&tmp, &path).map_err(io_err("rename layer blob"))?;
        Ok(LayerBlob {
            blob: Blob {
                media_type: self.compression.media_type().into(),
                digest,
                size,
                path,
            },
            diff_id,
        })
    }
}

/// The compressor stage, kept as an enum so one pipeline serves all three.
enum Encoder<W: Write> {
    None(W),
    Gzip(GzEncoder<W>),
    Zstd(zstd::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
    }
}

fn header(kind: tar::EntryType, meta: &Meta, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode);
    h.set_uid(meta.uid);
    h.set_gid(meta.gid);
    h.set_mtime(meta.mtime);
    h.set_size(size);
    h
}

fn append_entry<W: Write>(tar: &mut tar::Builder<W>, entry: &Entry) -> Result<()> {
    let what = |p: &str| io_err(format!("append {p}"));
    match entry {
        Entry::Dir { path, meta } => {
            pax_xattrs(tar, meta)?;
            let mut h = header(tar::EntryType::Directory, meta, 0);
            tar.append_data(&mut h, format!("{path}/"), io::empty())
                .map_err(what(path))
        }
        Entry::File { path, meta, data } => {
            pax_xattrs(tar, meta)?;
            let mut h = header(tar::EntryType::Regular, meta, data.len());
            tar.append_data(&mut h, path, data.reader())
                .map_err(what(path))
        }
        Entry::Symlink { path, target } => {
            let mut h = header(tar::EntryType::Symlink, &Meta::mode(0o777), 0);
            tar.append_link(&mut h, path, target).map_err(what(path))
        }
        Entry::HardLink { path, target, meta } => {
            let mut h = header(tar::EntryType::Link, meta, 0);
            tar.append_link(&mut h, path, target).map_err(what(path))
        }
        Entry::Device {
            path,
            meta,
            block,
            major,
            minor,
        } => {
            let kind = if *block {
                tar::EntryType::Block
            } else {
                tar::EntryType::Char
            };
            let mut h = header(kind, meta, 0);
            h.set_device_major(*major).map_err(what(path))?;
            h.set_device_minor(*minor).map_err(what(path))?;
            tar.append_data(&mut h, path, io::empty())
                .map_err(what(path))
        }
        Entry::Fifo { path, meta } => {
            let mut h = header(tar::EntryType::Fifo, meta, 0);
            tar.append_data(&mut h, path, io::empty())
                .map_err(what(path))
        }
        Entry::Whiteout { path } => {
            let p = Path::new(path);
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            let wh = p.with_file_name(format!(".wh.{name}"));
            let mut h = header(tar::EntryType::Regular, &Meta::mode(0o644), 0);
            tar.append_data(&mut h, &wh, io::empty())
                .map_err(what(path))
        }
        Entry::Raw {
            path,
            kind,
            link,
            data,
        } => {
            let mut h = tar::Header::new_old();
            let (p, l) = (path.as_bytes(), link.as_bytes());
            h.as_old_mut().name[..p.len().min(99)].copy_from_slice(&p[..p.len().min(99)]);
            h.as_old_mut().linkname[..l.len().min(99)].copy_from_slice(&l[..l.len().min(99)]);
            h.set_entry_type(*kind);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            h.set_cksum();
            tar.append(&h, &data[..]).map_err(what(path))
        }
        Entry::Opaque { dir } => {
            let mut h = header(tar::EntryType::Regular, &Meta::mode(0o644), 0);
            tar.append_data(&mut h, format!("{dir}/.wh..wh..opq"), io::empty())
                .map_err(what(dir))
        }
        Entry::Verbatim { bytes } => tar
            .get_mut()
            .write_all(bytes)
            .map_err(what("verbatim tar bytes")),
        Entry::TarFile { path } => {
            let name = path.display().to_string();
            let mut file = File::open(path).map_err(what(&name))?;
            let len = file.metadata().map_err(what(&name))?.len();
            // With one 512-byte block per record, GNU tar ends the archive
            // with exactly two zero blocks; anything else is not such a file.
            let not_such = |why: &str| Error::Io {
                action: format!("{name}: {why}"),
                source: io::Error::from(io::ErrorKind::InvalidData),
            };
            if len < 1024 || len % 512 != 0 {
                return Err(not_such("not a tar written with --blocking-factor=1"));
            }
            let mut end = [0u8; 1024];
            file.seek(io::SeekFrom::Start(len - 1024))
                .and_then(|_| file.read_exact(&mut end))
                .and_then(|_| file.rewind())
                .map_err(what(&name))?;
            if end.iter().any(|b| *b != 0) {
                return Err(not_such("does not end with two zero blocks"));
            }
            io::copy(&mut file.take(len - 1024), tar.get_mut())
                .map(drop)
                .map_err(what(&name))
        }
    }
}

fn pax_xattrs<W: Write>(tar: &mut tar::Builder<W>, meta: &Meta) -> Result<()> {
    if meta.xattrs.is_empty() {
        return Ok(());
    }
    let records: Vec<(String, &[u8])> = meta
        .xattrs
        .iter()
        .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
        .collect();
    tar.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
        .map_err(io_err("append pax xattrs"))
}

/// A blob written to disk.
#[derive(Debug, Clone)]
pub struct Blob {
    /// OCI media type.
    pub media_type: String,
    /// `sha256:…` of the bytes.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// The file holding it.
    pub path: PathBuf,
}

impl Blob {
    fn from_bytes(dir: &Path, media_type: &str, bytes: &[u8]) -> Result<Blob> {
        let digest = sha256(bytes);
        let path = dir.join(digest.replace(':', "-"));
        std::fs::write(&path, bytes).map_err(io_err(format!("write {}", path.display())))?;
        Ok(Blob {
            media_type: media_type.into(),
            digest,
            size: bytes.len() as u64,
            path,
        })
    }

    /// The OCI descriptor of the blob.
    pub fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// A layer blob with the digest of its uncompressed tar.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    /// The (possibly compressed) blob.
    pub blob: Blob,
    /// Digest of the uncompressed tar.
    pub diff_id: String,
}

/// What a container built from the image runs.
#[derive(Debug, Clone, Default)]
pub struct RunConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, `KEY=value`.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: String,
    /// `User` (`uid`, `name`, `uid:gid`, `name:group`); root when empty.
    pub user: String,
}

/// A whole image: layers bottom first, run config, and whether to wrap the
/// manifest in an index (as multi-platform images are).
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
    /// Process config.
    pub run: RunConfig,
    /// Push an index pointing at the manifest.
    pub with_index: bool,
}

impl ImageSpec {
    /// A one-layer busybox image that runs `cmd`.
    pub fn busybox(cmd: &[&str]) -> io::Result<Self> {
        Ok(ImageSpec {
            layers: vec![Layer::busybox(Compression::Gzip)?],
            run: RunConfig {
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                env: vec!["PATH=/bin:/usr/bin".into()],
                working_dir: "/".into(),
                ..Default::default()
            },
            with_index: true,
        })
    }

    /// Writes every blob into `dir`.
    pub fn build(&self, dir: &Path) -> Result<BuiltImage> {
        self.build_claiming(dir, &[])
    }

    /// [`ImageSpec::build`] for a hostile image: the config's diff_ids say
    /// `claims` (bottom first; `None` or a missing entry keeps the layer's
    /// true diff_id), so the image promises other content than its layers
    /// hold. [`BuiltImage::diff_ids`] gives the claimed ones.
    pub fn build_claiming(&self, dir: &Path, claims: &[Option<String>]) -> Result<BuiltImage> {
        std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
        let layers = self
            .layers
            .iter()
            .map(|l| l.write_blob(dir))
            .collect::<Result<Vec<_>>>()?;
        let layers: Vec<LayerBlob> = layers
            .into_iter()
            .enumerate()
            .map(|(i, mut l)| {
                if let Some(Some(claim)) = claims.get(i) {
                    l.diff_id = claim.clone();
                }
                l
            })
            .collect();
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": self.run.env,
                "Entrypoint": if self.run.entrypoint.is_empty() { serde_json::Value::Null } else { json!(self.run.entrypoint) },
                "Cmd": self.run.cmd,
                "WorkingDir": self.run.working_dir,
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": layers.iter().map(|_| json!({"created_by": "hyperbox-integration"})).collect::<Vec<_>>(),
        });
        let mut config = config;
        if !self.run.user.is_empty() {
            config["config"]["User"] = json!(self.run.user);
        }
        let config = Blob::from_bytes(dir, media::CONFIG, &serde_json::to_vec(&config).unwrap())?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": media::MANIFEST,
            "config": config.descriptor(),
            "layers": layers.iter().map(|l| l.blob.descriptor()).collect::<Vec<_>>(),
        });
        let manifest = Blob::from_bytes(
            dir,
            media::MANIFEST,
            &serde_json::to_vec(&manifest).unwrap(),
        )?;
        let index = if self.with_index {
            let mut desc = manifest.descriptor();
            desc["platform"] = json!({"architecture": "amd64", "os": "linux"});
            let index = json!({"schemaVersion": 2, "mediaType": media::INDEX, "manifests": [desc]});
            Some(Blob::from_bytes(
                dir,
                media::INDEX,
                &serde_json::to_vec(&index).unwrap(),
            )?)
        } else {
            None
        };
        Ok(BuiltImage {
            layers,
            config,
            manifest,
            index,
        })
    }
}

/// The blobs of a built image.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// Layers, bottom first.
    pub layers: Vec<LayerBlob>,
    /// The config blob.
    pub config: Blob,
    /// The manifest.
    pub manifest: Blob,
    /// The index, if any.
    pub index: Option<Blob>,
}

impl BuiltImage {
    /// What a tag points at: the index if there is one, else the manifest.
    pub fn top(&self) -> &Blob {
        self.index.as_ref().unwrap_or(&self.manifest)
    }

    /// Diff ids of the layers, bottom first.
    pub fn diff_ids(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.diff_id.clone()).collect()
    }

    /// Pushes every blob, the manifest and the index to `registry`
    /// (`host:port`, plain HTTP) as `repo:tag`. Returns `host:port/repo:tag`.
    pub async fn push(&self, registry: &str, repo: &str, tag: &str) -> Result<String> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|source| Error::Http {
                action: "build client".into(),
                source,
            })?;
        let base = format!("http://{registry}/v2/{repo}");
        for blob in self
            .layers
            .iter()
            .map(|l| &l.blob)
            .chain(std::iter::once(&self.config))
        {
            push_blob(&http, &base, blob).await?;
        }
        if self.index.is_some() {
            push_manifest(&http, &base, &self.manifest.digest, &self.manifest).await?;
        }
        push_manifest(&http, &base, tag, self.top()).await?;
        Ok(format!("{registry}/{repo}:{tag}"))
    }
}

async fn send(req: reqwest::RequestBuilder, action: &str) -> Result<reqwest::Response> {
    req.send().await.map_err(|source| Error::Http {
        action: action.into(),
        source,
    })
}

async fn expect(resp: reqwest::Response, ok: &[u16], action: &str) -> Result<reqwest::Response> {
    let status = resp.status().as_u16();
    if ok.contains(&status) {
        return Ok(resp);
    }
    let body = resp.text().await.unwrap_or_default();
    Err(Error::Registry {
        action: action.into(),
        status,
        body: crate::registry::tail(&body, 500),
    })
}

async fn push_blob(http: &reqwest::Client, base: &str, blob: &Blob) -> Result<()> {
    let head = send(
        http.head(format!("{base}/blobs/{}", blob.digest)),
        "HEAD blob",
    )
    .await?;
    if head.status().is_success() {
        return Ok(());
    }
    let action = format!("start upload of {}", blob.digest);
    let resp = send(http.post(format!("{base}/blobs/uploads/")), &action).await?;
    let resp = expect(resp, &[202], &action).await?;
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let url = if location.starts_with("http") {
        location
    } else {
        let origin = &base[..base.find("/v2/").unwrap_or(base.len())];
        format!("{origin}{location}")
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let file = tokio::fs::File::open(&blob.path)
        .await
        .map_err(io_err(format!("open {}", blob.path.display())))?;
    let action = format!("upload {}", blob.digest);
    let resp = send(
        http.put(format!("{url}{sep}digest={}", blob.digest))
            .header("content-type", "application/octet-stream")
            .header("content-length", blob.size)
            .body(reqwest::Body::from(file)),
        &action,
    )
    .await?;
    expect(resp, &[201], &action).await?;
    Ok(())
}

async fn push_manifest(
    http: &reqwest::Client,
    base: &str,
    reference: &str,
    blob: &Blob,
) -> Result<()> {
    let bytes =
        std::fs::read(&blob.path).map_err(io_err(format!("read {}", blob.path.display())))?;
    let action = format!("put manifest {reference}");
    let resp = send(
        http.put(format!("{base}/manifests/{reference}"))
            .header("content-type", &blob.media_type)
            .body(bytes),
        &action,
    )
    .await?;
    expect(resp, &[201], &action).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(layer: &LayerBlob) -> Vec<(String, tar::EntryType, u64)> {
        let f = File::open(&layer.blob.path).unwrap();
        let r: Box<dyn Read> = match layer.blob.media_type.as_str() {
            media::LAYER_GZIP => Box::new(flate2::read::GzDecoder::new(f)),
            media::LAYER_ZSTD => Box::new(zstd::Decoder::new(f).unwrap()),
            _ => Box::new(f),
        };
        let mut a = tar::Archive::new(r);
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    e.header().entry_type(),
                    e.header().size().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn layer_round_trips_every_entry_kind_in_each_compression() {
        let dir = tempfile::tempdir().unwrap();
        for c in [
            Compression::None,
            Compression::Gzip,
            Compression::GzipDefault,
            Compression::Zstd,
        ] {
            let mut meta = Meta::mode(0o4755);
            meta.xattrs.push(("user.k".into(), b"v".to_vec()));
            let long = format!("d/{}", "n".repeat(200));
            let layer = Layer::new(c)
                .dir("d", 0o755)
                .file_with("d/suid", Data::Bytes(b"x".to_vec()), meta)
                .file(&long, "long", 0o644)
                .symlink("d/l", "/etc/passwd")
                .hardlink("d/h", "d/suid")
                .device("d/null", false, 1, 3)
                .fifo("d/p")
                .whiteout("d/gone")
                .opaque("o")
                .large_file("big", 3 << 20, 7);
            let blob = layer.write_blob(dir.path()).unwrap();
            assert_eq!(blob.blob.media_type, c.media_type());
            assert_eq!(
                std::fs::metadata(&blob.blob.path).unwrap().len(),
                blob.blob.size
            );
            assert_eq!(
                sha256(&std::fs::read(&blob.blob.path).unwrap()),
                blob.blob.digest
            );
            let got = entries(&blob);
            let names: Vec<&str> = got.iter().map(|e| e.0.as_str()).collect();
            assert_eq!(
                names,
                [
                    "d/",
                    "d/suid",
                    long.as_str(),
                    "d/l",
                    "d/h",
                    "d/null",
                    "d/p",
                    "d/.wh.gone",
                    "o/.wh..wh..opq",
                    "big"
                ]
            );
            assert_eq!(got[9].2, 3 << 20);
            assert_eq!(got[5].1, tar::EntryType::Char);
        }
    }

    #[test]
    fn pattern_is_deterministic_and_seed_dependent() {
        let mut a = vec![0u8; 100];
        let mut b = vec![0u8; 100];
        let mut c = vec![0u8; 100];
        PatternReader::new(1).read_exact(&mut a).unwrap();
        PatternReader::new(1).read_exact(&mut b).unwrap();
        PatternReader::new(2).read_exact(&mut c).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
