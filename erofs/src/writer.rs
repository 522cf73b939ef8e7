//! tar → EROFS, streaming: file data is copied from the tar into the image
//! as it arrives, block-aligned, so memory grows with the number of entries,
//! never with their size. Metadata (inodes, directories, symlinks) is laid
//! out at the end, when the whole tree is known.
//!
//! Image layout: block 0 holds the superblock (at byte 1024); then file data
//! in tar order (each file `FLAT_PLAIN` from its start block); then the full
//! blocks of large directories and symlinks; then the metadata area: one
//! 64-byte extended inode per inode (exact 32-bit owners and mtimes), its
//! inline xattrs, and the last partial block of its directory or symlink
//! data (`FLAT_INLINE`). The root inode comes first, so its nid is 0.
//!
//! OCI whiteouts become what overlayfs reads from a lower layer: `.wh.NAME`
//! a character device 0/0 named NAME, `.wh..wh..opq` the
//! `trusted.overlay.opaque=y` xattr on its directory.
//!
//! The tar stream is framed here, not by the `tar` crate's iterator (whose
//! header types and field parsers are used): that iterator reads GNU long
//! names and PAX headers whole into memory at whatever size the tar claims,
//! and it knows no PAX sparse format. Here every extension record is bounded
//! ([`MAX_HEADER_BYTES`], Go's `archive/tar` limit) before it is read, xattrs
//! are bounded per inode and per layer, file bytes count against
//! [`Options::max_layer_bytes`] before they are written, and sparse files
//! (old GNU, PAX 0.0, 0.1 and 1.0, as containerd's unpacker reads them)
//! become the real file under its real name, holes seeked over so they stay
//! holes in the image file.
//!
//! Written by hand because no crate writes EROFS; the format facts come from
//! the kernel's `fs/erofs/erofs_fs.h`, the tar facts from POSIX pax and GNU
//! tar's documentation of its sparse formats.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Seek, SeekFrom, Write};

use zerocopy::IntoBytes;

use crate::layout::{
    self, BLKSZ, BLKSZ_BITS, Dirent, InodeExtended, MAGIC, NID_SLOT, SUPER_OFFSET, SuperBlock,
    XattrEntry, XattrIbodyHeader, datalayout, ft, xattr_index,
};

/// The longest name EROFS stores.
const NAME_MAX: usize = 255;

/// Errors of converting a layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the tar or writing the image failed.
    #[error("{action}")]
    Io {
        /// What was being done.
        action: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An entry's path would land outside the layer or is malformed.
    #[error("layer entry {path:?}: {why}")]
    UnsafePath {
        /// The path as stored in the tar.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A device node in a layer whose policy refuses them.
    #[error(
        "layer entry {path:?}: device node {major}:{minor}; device nodes in image layers are refused (snapshotter.allow_device_nodes = false)"
    )]
    Device {
        /// The path as stored in the tar.
        path: String,
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A hard link names a target that is not an earlier file of this layer.
    #[error(
        "layer entry {path:?}: hard link to {target:?}, which is not an earlier file of this layer"
    )]
    HardLinkOutside {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
    /// An xattr whose namespace EROFS cannot store.
    #[error("layer entry {path:?}: xattr {name:?} is in a namespace EROFS cannot store")]
    UnsupportedXattr {
        /// The entry.
        path: String,
        /// The xattr name.
        name: String,
    },
    /// A value that does not fit the on-disk field that must hold it.
    #[error("layer entry {path:?}: {what}")]
    OutOfRange {
        /// The entry.
        path: String,
        /// Which value, and its limit.
        what: &'static str,
    },
    /// An entry type with no filesystem meaning.
    #[error("layer entry {path:?}: unsupported tar entry type {kind:?}")]
    UnsupportedEntry {
        /// The entry.
        path: String,
        /// Its type byte.
        kind: char,
    },
    /// A tar header is malformed.
    #[error("layer entry after {after:?}: {why}")]
    Malformed {
        /// The path of the entry before it.
        after: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A long name, long link or PAX record larger than any real image
    /// needs: refused before it is read, so memory stays bounded.
    #[error("layer entry after {after:?}: {what} of {size} bytes; at most {limit} are accepted")]
    HeaderTooLarge {
        /// The path of the entry before it.
        after: String,
        /// Which record.
        what: &'static str,
        /// Its size as the tar states it.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The layer's files exceed `max_layer_bytes` once expanded.
    #[error(
        "layer entry {path:?}: the layer's files exceed {limit} bytes expanded (snapshotter.max_layer_bytes)"
    )]
    LayerTooLarge {
        /// The entry that crossed the limit.
        path: String,
        /// [`Options::max_layer_bytes`].
        limit: u64,
    },
    /// The layer has more entries than the writer keeps in memory.
    #[error(
        "layer entry {path:?}: the layer has more than {limit} entries (snapshotter.max_layer_entries)"
    )]
    TooManyEntries {
        /// The entry that crossed the limit.
        path: String,
        /// [`Options::max_layer_entries`].
        limit: u64,
    },
    /// More bytes follow the tar's end-of-archive blocks than any tar
    /// writer pads with.
    #[error(
        "layer tar: more than {limit} bytes after its end-of-archive blocks; real tars pad to a record (10 KiB by default), so the rest is refused unread"
    )]
    TrailingData {
        /// The most accepted ([`MAX_TRAILING_BYTES`], or less under a
        /// smaller `max_layer_bytes`).
        limit: u64,
    },
    /// A sparse entry whose map is malformed.
    #[error("layer entry {path:?}: sparse file: {why}")]
    Sparse {
        /// The file's path.
        path: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The image would exceed what 32-bit block addresses reach.
    #[error("image too large: {what}")]
    TooLarge {
        /// What overflowed.
        what: &'static str,
    },
}

type Result<T> = std::result::Result<T, Error>;

/// A tar block.
const TAR_BLOCK: u64 = 512;

/// The largest GNU long name, GNU long link or PAX header accepted. Go's
/// `archive/tar`, which containerd's unpacker uses, refuses these records
/// past 1 MiB too (`maxSpecialFileSize`); no path or xattr set needs more.
pub const MAX_HEADER_BYTES: u64 = 1 << 20;

/// The largest PAX sparse 1.0 map (the decimal list at the start of the
/// data): the same bound as a header, since it is one in all but name.
pub const MAX_SPARSE_MAP_BYTES: u64 = 1 << 20;

/// The most data segments in one sparse file (GNU tar writes one per run
/// of data; 65536 runs is far beyond any database or disk image in a
/// layer, and keeps the map at 1 MiB of memory).
pub const MAX_SPARSE_SEGMENTS: usize = 1 << 16;

/// xattr bytes (names and values) a layer may carry in all: held in memory
/// until the image is laid out. Real layers carry capabilities and
/// security labels, well under a MiB even with a label on every file.
pub const MAX_LAYER_XATTR_BYTES: u64 = 32 << 20;

/// [`Options::max_layer_bytes`] by default: 64 GiB, above the largest real
/// layers (CUDA and model images reach 10–30 GiB expanded) and far below
/// the 16 TiB the image's 32-bit block addresses reach.
pub const DEFAULT_MAX_LAYER_BYTES: u64 = 64 << 30;

/// [`Options::max_layer_entries`] by default. Each entry costs the writer
/// about 200 bytes until the image is laid out (`examples/entry_memory.rs`
/// measures it), so this bounds a conversion near 200 MiB; the largest
/// real layers hold a few hundred thousand entries.
pub const DEFAULT_MAX_LAYER_ENTRIES: u64 = 1 << 20;

/// The most bytes accepted after a tar's end-of-archive blocks. They are
/// part of the diff_id, so they are read and hashed, but a few KiB of gzip
/// can carry gigabytes of zeros there. Tar writers pad the archive to a
/// whole record: 10 KiB for GNU tar and bsdtar by default, nothing for Go's
/// `archive/tar`; 64 MiB leaves room for any blocking factor in use.
pub const MAX_TRAILING_BYTES: u64 = 64 << 20;

fn pad512(n: u64) -> u64 {
    (TAR_BLOCK - n % TAR_BLOCK) % TAR_BLOCK
}

/// A name from a GNU long name or link record: up to the first NUL.
fn trim_nul(mut bytes: Vec<u8>) -> Vec<u8> {
    if let Some(end) = bytes.iter().position(|b| *b == 0) {
        bytes.truncate(end);
    }
    bytes
}

fn truncated(path: &str, what: &str) -> Error {
    Error::Io {
        action: format!("layer tar is truncated in the {what} of {path:?}"),
        source: io::ErrorKind::UnexpectedEof.into(),
    }
}

/// Sets an xattr on an inode, replacing one of the same name (as
/// `setxattr` does when a layer states a directory twice), and refuses
/// what `i_xattr_icount` (16 bits of 4-byte units) cannot count.
fn set_xattr(
    xattrs: &mut Vec<(u8, Vec<u8>, Vec<u8>)>,
    x: (u8, Vec<u8>, Vec<u8>),
    path: &[u8],
) -> Result<()> {
    let out_of_range = |what| Error::OutOfRange {
        path: path_text(path),
        what,
    };
    if x.1.len() > u8::MAX as usize {
        return Err(out_of_range("xattr name longer than 255 bytes"));
    }
    if x.2.len() > u16::MAX as usize {
        return Err(out_of_range("xattr value larger than 64 KiB"));
    }
    match xattrs.iter_mut().find(|o| o.0 == x.0 && o.1 == x.1) {
        Some(old) => *old = x,
        None => xattrs.push(x),
    }
    if xattr_size(xattrs) > MAX_INLINE_XATTR_BYTES {
        return Err(out_of_range("xattrs larger than 256 KiB in total"));
    }
    Ok(())
}

/// The most inline xattr bytes an inode can have: `i_xattr_icount` counts
/// 4-byte units beyond the 12-byte header, plus one, in 16 bits.
const MAX_INLINE_XATTR_BYTES: u64 = 12 + 4 * (u16::MAX as u64 - 1);

/// The decompressed layer, counting the bytes read so entry boundaries are
/// known without trusting a library's framing.
struct TarStream<R> {
    r: R,
    pos: u64,
}

impl<R: Read> Read for TarStream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read> TarStream<R> {
    /// Reads one 512-byte block; `false` at a clean end of the stream.
    fn block(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            match self.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        match got {
            0 => Ok(false),
            n if n == buf.len() => Ok(true),
            _ => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }

    /// Reads and drops `n` bytes.
    fn skip(&mut self, n: u64) -> io::Result<()> {
        if io::copy(&mut self.by_ref().take(n), &mut io::sink())? < n {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}

/// Extension records waiting for the entry they describe.
#[derive(Default)]
struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

impl Extensions {
    fn pending(&self) -> bool {
        self.long_name.is_some() || self.long_link.is_some() || self.pax.is_some()
    }
}

/// One tar entry with its extension records applied.
struct Member {
    header: tar::Header,
    path: Vec<u8>,
    link: Option<Vec<u8>>,
    /// Bytes stored in the tar after the header.
    stored: u64,
    uid: u32,
    gid: u32,
    mtime: u64,
    xattrs: Vec<(u8, Vec<u8>, Vec<u8>)>,
    sparse: Option<Sparse>,
}

/// Where a sparse file's data lies.
enum Sparse {
    /// The map is known: (offset, length) of each data segment, in order
    /// (old GNU headers, PAX 0.0 and 0.1).
    Map {
        real_size: u64,
        segments: Vec<(u64, u64)>,
    },
    /// PAX 1.0: the map opens the entry's data.
    InData { real_size: u64 },
}

/// The `GNU.sparse.*` PAX records of an entry.
#[derive(Default)]
struct PaxSparse {
    major: Option<Vec<u8>>,
    minor: Option<Vec<u8>>,
    name: Option<Vec<u8>>,
    real_size: Option<u64>,
    /// 0.1: `offset,length,offset,length…`.
    map: Option<Vec<u8>>,
    /// 0.0: repeated `GNU.sparse.offset` / `GNU.sparse.numbytes` records.
    pairs: Vec<u64>,
}

impl PaxSparse {
    /// The sparse layout these records describe, if any; the file's real
    /// name replaces the `GNUSparseFile.N/…` placeholder in `path`.
    fn resolve(self, path: &mut Vec<u8>) -> Result<Option<Sparse>> {
        if self.major.is_none()
            && self.minor.is_none()
            && self.real_size.is_none()
            && self.map.is_none()
            && self.pairs.is_empty()
        {
            return Ok(None);
        }
        if let Some(name) = self.name {
            *path = name;
        }
        let bad = |why| Error::Sparse {
            path: path_text(path),
            why,
        };
        let real_size = self
            .real_size
            .ok_or_else(|| bad("no GNU.sparse.realsize record"))?;
        match (self.major.as_deref(), self.minor.as_deref()) {
            (Some(b"1"), Some(b"0")) => return Ok(Some(Sparse::InData { real_size })),
            (None | Some(b"0"), _) => {}
            _ => return Err(bad("unknown PAX sparse format version")),
        }
        let numbers = match self.map {
            Some(map) if map.is_empty() => Vec::new(),
            Some(map) => map
                .split(|b| *b == b',')
                .map(|n| {
                    std::str::from_utf8(n)
                        .ok()
                        .and_then(|n| n.parse::<u64>().ok())
                        .ok_or_else(|| bad("GNU.sparse.map holds a non-number"))
                })
                .collect::<Result<Vec<u64>>>()?,
            None => self.pairs,
        };
        if numbers.len() % 2 != 0 {
            return Err(bad("the sparse map has an offset without a length"));
        }
        if numbers.len() / 2 > MAX_SPARSE_SEGMENTS {
            return Err(bad("more than 65536 data segments"));
        }
        let segments = numbers.chunks(2).map(|p| (p[0], p[1])).collect();
        Ok(Some(Sparse::Map {
            real_size,
            segments,
        }))
    }
}

/// Reads a PAX sparse 1.0 map from the start of an entry's data: the number
/// of segments, then offset and length of each, one decimal per line,
/// padded to a 512-byte block. Returns the segments and the bytes the map
/// took.
fn read_sparse_map<R: Read>(
    s: &mut TarStream<R>,
    stored: u64,
    path: &[u8],
) -> Result<(Vec<(u64, u64)>, u64)> {
    let bad = |why| Error::Sparse {
        path: path_text(path),
        why,
    };
    let mut text: Vec<u8> = Vec::new();
    let mut cursor = 0;
    let mut numbers: Vec<u64> = Vec::new();
    let mut count: Option<u64> = None;
    loop {
        if let Some(n) = count
            && numbers.len() as u64 == 2 * n
        {
            break;
        }
        if let Some(nl) = text[cursor..].iter().position(|b| *b == b'\n') {
            let n = std::str::from_utf8(&text[cursor..cursor + nl])
                .ok()
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| bad("the sparse map holds a non-number"))?;
            cursor += nl + 1;
            if count.is_none() {
                if n > MAX_SPARSE_SEGMENTS as u64 {
                    return Err(bad("more than 65536 data segments"));
                }
                count = Some(n);
            } else {
                numbers.push(n);
            }
            continue;
        }
        let len = text.len() as u64 + TAR_BLOCK;
        if len > MAX_SPARSE_MAP_BYTES {
            return Err(bad("sparse map larger than 1 MiB"));
        }
        if len > stored {
            return Err(bad("sparse map longer than the entry"));
        }
        let at = text.len();
        text.resize(at + TAR_BLOCK as usize, 0);
        if !s.block(&mut text[at..]).map_err(io_err(format!(
            "read the sparse map of {:?}",
            path_text(path)
        )))? {
            return Err(truncated(&path_text(path), "sparse map"));
        }
    }
    let segments = numbers.chunks(2).map(|p| (p[0], p[1])).collect();
    Ok((segments, text.len() as u64))
}

fn io_err(action: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let action = action.into();
    move |source| Error::Io { action, source }
}

#[derive(Debug)]
enum Kind {
    Dir(BTreeMap<Vec<u8>, usize>),
    File { start_block: u64, size: u64 },
    Symlink(Vec<u8>),
    Char(u32),
    Block(u32),
    Fifo,
}

#[derive(Debug)]
struct Node {
    kind: Kind,
    /// Permission bits with setuid, setgid and sticky.
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: u64,
    /// (name index, name suffix, value), in the order given.
    xattrs: Vec<(u8, Vec<u8>, Vec<u8>)>,
    links: u32,
}

impl Node {
    fn dir(perm: u16) -> Node {
        Node {
            kind: Kind::Dir(BTreeMap::new()),
            perm,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Vec::new(),
            links: 1,
        }
    }

    fn mode(&self) -> u16 {
        let fmt: u16 = match self.kind {
            Kind::Dir(_) => 0o040000,
            Kind::File { .. } => 0o100000,
            Kind::Symlink(_) => 0o120000,
            Kind::Char(_) => 0o020000,
            Kind::Block(_) => 0o060000,
            Kind::Fifo => 0o010000,
        };
        fmt | (self.perm & 0o7777)
    }

    fn file_type(&self) -> u8 {
        match self.kind {
            Kind::Dir(_) => ft::DIR,
            Kind::File { .. } => ft::REG,
            Kind::Symlink(_) => ft::LNK,
            Kind::Char(_) => ft::CHR,
            Kind::Block(_) => ft::BLK,
            Kind::Fifo => ft::FIFO,
        }
    }
}

/// What a conversion produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Inodes in the image.
    pub inodes: u64,
    /// Bytes of file data copied from the tar.
    pub data_bytes: u64,
    /// Size of the image file.
    pub image_bytes: u64,
    /// Where regular file data ends: `[4096, data_end)` is file contents
    /// only; the superblock block before it and everything after it
    /// (directory and symlink blocks, inodes, xattrs, inline tails) is what
    /// the kernel reads as metadata.
    pub data_end: u64,
}

/// What a conversion accepts beyond the format's own limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Keep character and block device nodes (other than whiteouts).
    /// containerd's overlayfs keeps them and debootstrap-made base images
    /// carry `/dev/console`, `/dev/null` and friends, so nodes keep them by
    /// default; a node that wants none sets this off and such a layer is
    /// refused naming the entry.
    pub allow_devices: bool,
    /// The most bytes the layer's regular files may hold once expanded
    /// (sparse files at their full size): a small compressed layer can
    /// expand to fill the node's disk, so conversion stops at the entry
    /// that crosses this.
    pub max_layer_bytes: u64,
    /// The most entries (directory entries: files, directories made
    /// explicitly or as parents, links, whiteouts) the layer may hold:
    /// each costs memory until the image is laid out, and a tar of empty
    /// files compresses to almost nothing.
    pub max_layer_entries: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            allow_devices: true,
            max_layer_bytes: DEFAULT_MAX_LAYER_BYTES,
            max_layer_entries: DEFAULT_MAX_LAYER_ENTRIES,
        }
    }
}

/// Converts the uncompressed tar `tar` into an EROFS image written to `out`.
pub fn convert<R: Read, W: Write + Seek>(tar: R, out: W) -> Result<Summary> {
    convert_with(tar, out, Options::default())
}

/// [`convert`] with `options`.
pub fn convert_with<R: Read, W: Write + Seek>(tar: R, out: W, options: Options) -> Result<Summary> {
    let mut w = Builder::new(out)?;
    w.options = options;
    w.add_tar(tar)?;
    w.finish()
}

/// [`convert_with`], which also says where in the tar each run of the
/// image's file data came from (for a [`crate::map::LayerMap`]).
pub fn convert_mapped<R: Read, W: Write + Seek>(
    tar: R,
    out: W,
    options: Options,
) -> Result<(Summary, Vec<Extent>)> {
    let mut w = Builder::new(out)?;
    w.options = options;
    w.extents = Some(Vec::new());
    w.add_tar(tar)?;
    let extents = w.extents.take().unwrap_or_default();
    Ok((w.finish()?, extents))
}

struct Builder<W> {
    out: W,
    options: Options,
    nodes: Vec<Node>,
    /// Next free block for data.
    next_block: u64,
    data_bytes: u64,
    /// File bytes counted against `max_layer_bytes`.
    expanded: u64,
    /// xattr bytes read, against [`MAX_LAYER_XATTR_BYTES`].
    xattr_budget: u64,
    /// Directory entries made, against `max_layer_entries`.
    entries: u64,
    /// Where each run of file data came from, when asked for.
    extents: Option<Vec<Extent>>,
}

/// A run of file data: `len` bytes at `tar` in the uncompressed layer are
/// the image's bytes at `image`. Runs come in tar order, which is also
/// image order; the image is zeros wherever no run and no metadata is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the EROFS image.
    pub image: u64,
    /// Offset in the uncompressed tar.
    pub tar: u64,
    /// Length in bytes.
    pub len: u64,
}

fn path_text(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Splits a tar path into components; refuses `..` and absolute paths.
fn components(path: &[u8]) -> Result<Vec<Vec<u8>>> {
    let unsafe_path = |why| Error::UnsafePath {
        path: path_text(path),
        why,
    };
    if path.first() == Some(&b'/') {
        return Err(unsafe_path("absolute path"));
    }
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(unsafe_path("contains '..'")),
            c if c.len() > NAME_MAX => return Err(unsafe_path("a name is longer than 255 bytes")),
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

fn split_xattr(name: &str) -> Option<(u8, &str)> {
    match name {
        "system.posix_acl_access" => return Some((xattr_index::POSIX_ACL_ACCESS, "")),
        "system.posix_acl_default" => return Some((xattr_index::POSIX_ACL_DEFAULT, "")),
        _ => {}
    }
    for (prefix, index) in [
        ("user.", xattr_index::USER),
        ("trusted.", xattr_index::TRUSTED),
        ("security.", xattr_index::SECURITY),
    ] {
        if let Some(rest) = name.strip_prefix(prefix) {
            return Some((index, rest));
        }
    }
    None
}

impl<W: Write + Seek> Builder<W> {
    fn new(mut out: W) -> Result<Self> {
        // Block 0 is the superblock's; written last.
        out.write_all(&[0u8; BLKSZ as usize])
            .map_err(io_err("write image header"))?;
        Ok(Builder {
            out,
            options: Options::default(),
            nodes: vec![Node::dir(0o755)],
            next_block: 1,
            data_bytes: 0,
            expanded: 0,
            xattr_budget: 0,
            entries: 0,
            extents: None,
        })
    }

    /// The directory at `parts`, creating missing ones (as appliers do);
    /// refuses to pass through anything that is not a directory.
    fn dir_at(&mut self, parts: &[Vec<u8>], path: &[u8]) -> Result<usize> {
        let mut cur = 0;
        for p in parts {
            let next = match &self.nodes[cur].kind {
                Kind::Dir(children) => children.get(p).copied(),
                _ => unreachable!("cur is always a directory"),
            };
            cur = match next {
                Some(i) if matches!(self.nodes[i].kind, Kind::Dir(_)) => i,
                Some(i) if matches!(self.nodes[i].kind, Kind::Symlink(_)) => {
                    return Err(Error::UnsafePath {
                        path: path_text(path),
                        why: "passes through a symlink",
                    });
                }
                Some(_) => {
                    return Err(Error::UnsafePath {
                        path: path_text(path),
                        why: "a parent is not a directory",
                    });
                }
                None => {
                    let i = self.nodes.len();
                    self.nodes.push(Node::dir(0o755));
                    self.link(cur, p.clone(), i, path)?;
                    i
                }
            };
        }
        Ok(cur)
    }

    /// Points `name` in `dir` at node `child`, replacing what was there.
    /// Every entry the writer keeps passes here (parents made on the way
    /// too: one long path can make thousands), so this is where entries
    /// are counted against [`Options::max_layer_entries`].
    fn link(&mut self, dir: usize, name: Vec<u8>, child: usize, path: &[u8]) -> Result<()> {
        self.entries += 1;
        if self.entries > self.options.max_layer_entries {
            return Err(Error::TooManyEntries {
                path: path_text(path),
                limit: self.options.max_layer_entries,
            });
        }
        let old = match &mut self.nodes[dir].kind {
            Kind::Dir(children) => children.insert(name, child),
            _ => unreachable!("links are made in directories"),
        };
        if let Some(old) = old {
            self.nodes[old].links = self.nodes[old].links.saturating_sub(1);
        }
        if old != Some(child) {
            self.nodes[child].links = self.nodes[child].links.max(1);
        }
        Ok(())
    }

    fn lookup(&self, parts: &[Vec<u8>]) -> Option<usize> {
        let mut cur = 0;
        for p in parts {
            cur = match &self.nodes[cur].kind {
                Kind::Dir(children) => *children.get(p)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    fn add_tar<R: Read>(&mut self, tar: R) -> Result<()> {
        let mut s = TarStream { r: tar, pos: 0 };
        let mut ext = Extensions::default();
        let mut last = String::from("(start)");
        loop {
            let mut block = [0u8; TAR_BLOCK as usize];
            let got = s
                .block(&mut block)
                .map_err(io_err(format!("read layer tar header after {last:?}")))?;
            if !got || block.iter().all(|b| *b == 0) {
                if ext.pending() {
                    return Err(Error::Malformed {
                        after: last,
                        why: "extension headers with no entry after them",
                    });
                }
                return Ok(());
            }
            let h = tar::Header::from_byte_slice(&block).clone();
            // The checksum field counts as spaces; some old writers summed
            // signed bytes, which Go's reader accepts too.
            let bytes = || block[..148].iter().chain(&block[156..]);
            let unsigned = bytes().map(|b| *b as i64).sum::<i64>() + 8 * 32;
            let signed = bytes().map(|b| *b as i8 as i64).sum::<i64>() + 8 * 32;
            let stated = h.cksum().ok().map(i64::from);
            if stated != Some(unsigned) && stated != Some(signed) {
                return Err(Error::Malformed {
                    after: last,
                    why: "header checksum mismatch",
                });
            }
            let stored = h
                .entry_size()
                .map_err(io_err(format!("read the size of the entry after {last:?}")))?;
            let special = match h.entry_type() {
                tar::EntryType::GNULongName => Some("GNU long name"),
                tar::EntryType::GNULongLink => Some("GNU long link"),
                tar::EntryType::XHeader => Some("PAX extended header"),
                tar::EntryType::XGlobalHeader => Some("PAX global header"),
                _ => None,
            };
            if let Some(what) = special {
                if stored > MAX_HEADER_BYTES {
                    return Err(Error::HeaderTooLarge {
                        after: last,
                        what,
                        size: stored,
                        limit: MAX_HEADER_BYTES,
                    });
                }
                let mut bytes = Vec::with_capacity(stored as usize);
                (&mut s)
                    .take(stored)
                    .read_to_end(&mut bytes)
                    .map_err(io_err(format!("read the {what} after {last:?}")))?;
                if bytes.len() as u64 != stored {
                    return Err(truncated(&last, what));
                }
                s.skip(pad512(stored))
                    .map_err(io_err(format!("read the {what} after {last:?}")))?;
                // A later header of the same kind replaces an earlier one,
                // so memory stays bounded by one header of each kind.
                match h.entry_type() {
                    tar::EntryType::GNULongName => ext.long_name = Some(trim_nul(bytes)),
                    tar::EntryType::GNULongLink => ext.long_link = Some(trim_nul(bytes)),
                    tar::EntryType::XHeader => ext.pax = Some(bytes),
                    // Global headers set defaults that OCI layers do not
                    // use; containerd ignores them too.
                    _ => {}
                }
                continue;
            }
            let m = self.member(h, stored, std::mem::take(&mut ext), &mut s, &last)?;
            last = path_text(&m.path);
            let end = s
                .pos
                .checked_add(m.stored)
                .and_then(|e| e.checked_add(pad512(m.stored)))
                .ok_or_else(|| Error::Malformed {
                    after: last.clone(),
                    why: "entry size overflows",
                })?;
            self.add_member(m, &mut s)?;
            let rest = end.checked_sub(s.pos).ok_or_else(|| Error::Malformed {
                after: last.clone(),
                why: "entry data overruns its size",
            })?;
            s.skip(rest)
                .map_err(io_err(format!("read layer tar after {last:?}")))?;
        }
    }

    /// Applies the extension headers to `h`: the entry's real name, link,
    /// owners, xattrs and sparse map.
    fn member<R: Read>(
        &mut self,
        h: tar::Header,
        mut stored: u64,
        ext: Extensions,
        s: &mut TarStream<R>,
        last: &str,
    ) -> Result<Member> {
        let mut path = ext.long_name.unwrap_or_else(|| h.path_bytes().into_owned());
        let mut link = ext
            .long_link
            .or_else(|| h.link_name_bytes().map(|l| l.into_owned()));
        let mut uid = h
            .uid()
            .map_err(io_err(format!("uid of {:?}", path_text(&path))))?;
        let mut gid = h
            .gid()
            .map_err(io_err(format!("gid of {:?}", path_text(&path))))?;
        let mut mtime = h.mtime().unwrap_or(0);
        let mut xattrs = Vec::new();
        let mut sp = PaxSparse::default();
        if let Some(pax) = &ext.pax {
            let malformed = |why| Error::Malformed {
                after: last.to_string(),
                why,
            };
            for rec in tar::PaxExtensions::new(pax) {
                let rec = rec.map_err(|_| malformed("PAX record is malformed"))?;
                let Ok(key) = rec.key() else { continue };
                let value = rec.value_bytes();
                let num = || -> Result<u64> {
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| malformed("PAX numeric record is not a number"))
                };
                match key {
                    "path" => path = value.to_vec(),
                    "linkpath" => link = Some(value.to_vec()),
                    "size" => stored = num()?,
                    "uid" => uid = num()?,
                    "gid" => gid = num()?,
                    "mtime" => {
                        let whole = value.split(|b| *b == b'.').next().unwrap_or_default();
                        mtime = std::str::from_utf8(whole)
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                    }
                    "GNU.sparse.major" => sp.major = Some(value.to_vec()),
                    "GNU.sparse.minor" => sp.minor = Some(value.to_vec()),
                    "GNU.sparse.name" => sp.name = Some(value.to_vec()),
                    "GNU.sparse.realsize" | "GNU.sparse.size" => sp.real_size = Some(num()?),
                    "GNU.sparse.map" => sp.map = Some(value.to_vec()),
                    "GNU.sparse.offset" | "GNU.sparse.numbytes" => {
                        if sp.pairs.len() >= 2 * MAX_SPARSE_SEGMENTS {
                            return Err(Error::Sparse {
                                path: path_text(&path),
                                why: "more than 65536 data segments",
                            });
                        }
                        sp.pairs.push(num()?);
                    }
                    _ => {
                        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                            self.xattr_budget += (name.len() + value.len()) as u64;
                            if self.xattr_budget > MAX_LAYER_XATTR_BYTES {
                                return Err(Error::OutOfRange {
                                    path: path_text(&path),
                                    what: "xattrs of the layer larger than 32 MiB in total",
                                });
                            }
                            let (index, suffix) =
                                split_xattr(name).ok_or_else(|| Error::UnsupportedXattr {
                                    path: path_text(&path),
                                    name: name.into(),
                                })?;
                            set_xattr(
                                &mut xattrs,
                                (index, suffix.as_bytes().to_vec(), value.to_vec()),
                                &path,
                            )?;
                        }
                    }
                }
            }
        }
        let sparse = if h.entry_type() == tar::EntryType::GNUSparse {
            Some(self.old_gnu_sparse(&h, s, &path)?)
        } else {
            sp.resolve(&mut path)?
        };
        let uid = u32::try_from(uid).map_err(|_| Error::OutOfRange {
            path: path_text(&path),
            what: "uid beyond 32 bits",
        })?;
        let gid = u32::try_from(gid).map_err(|_| Error::OutOfRange {
            path: path_text(&path),
            what: "gid beyond 32 bits",
        })?;
        Ok(Member {
            header: h,
            path,
            link,
            stored,
            uid,
            gid,
            mtime,
            xattrs,
            sparse,
        })
    }

    /// The map of an old GNU sparse entry (type `S`): up to four segments
    /// in the header, more in extension blocks right after it.
    fn old_gnu_sparse<R: Read>(
        &mut self,
        h: &tar::Header,
        s: &mut TarStream<R>,
        path: &[u8],
    ) -> Result<Sparse> {
        let bad = |why| Error::Sparse {
            path: path_text(path),
            why,
        };
        let gnu = h
            .as_gnu()
            .ok_or_else(|| bad("sparse entry without a GNU header"))?;
        let real_size = gnu.real_size().map_err(|_| bad("real size is malformed"))?;
        let mut segments = Vec::new();
        let mut add = |block: &tar::GnuSparseHeader| -> Result<()> {
            if block.is_empty() {
                return Ok(());
            }
            let off = block.offset().map_err(|_| bad("offset is malformed"))?;
            let len = block.length().map_err(|_| bad("length is malformed"))?;
            if segments.len() >= MAX_SPARSE_SEGMENTS {
                return Err(bad("more than 65536 data segments"));
            }
            segments.push((off, len));
            Ok(())
        };
        for b in &gnu.sparse {
            add(b)?;
        }
        let mut extended = gnu.is_extended();
        while extended {
            let mut ext = tar::GnuExtSparseHeader::new();
            if !s.block(ext.as_mut_bytes()).map_err(io_err(format!(
                "read the sparse map of {:?}",
                path_text(path)
            )))? {
                return Err(truncated(&path_text(path), "sparse map"));
            }
            for b in ext.sparse() {
                add(b)?;
            }
            extended = ext.is_extended();
        }
        Ok(Sparse::Map {
            real_size,
            segments,
        })
    }

    fn add_member<R: Read>(&mut self, m: Member, s: &mut TarStream<R>) -> Result<()> {
        let raw_path = &m.path;
        let parts = components(raw_path)?;
        let h = &m.header;
        let kind = h.entry_type();
        let perm = (h
            .mode()
            .map_err(io_err(format!("mode of {:?}", path_text(raw_path))))?
            & 0o7777) as u16;
        let (uid, gid, mtime) = (m.uid, m.gid, m.mtime);
        let xattrs = m.xattrs;
        let Some((name, parents)) = parts.split_last() else {
            // The root itself ("./"): its metadata.
            let root = &mut self.nodes[0];
            (root.perm, root.uid, root.gid, root.mtime, root.xattrs) =
                (perm, uid, gid, mtime, xattrs);
            return Ok(());
        };
        let parent = self.dir_at(parents, raw_path)?;
        if name == b".wh..wh..opq" {
            set_xattr(
                &mut self.nodes[parent].xattrs,
                (
                    xattr_index::TRUSTED,
                    b"overlay.opaque".to_vec(),
                    b"y".to_vec(),
                ),
                raw_path,
            )?;
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            if matches!(hidden, b"" | b"." | b"..") {
                // An applier would delete the directory itself or its parent.
                return Err(Error::UnsafePath {
                    path: path_text(raw_path),
                    why: "whiteout of an empty name, '.' or '..'",
                });
            }
            let i = self.push(Node {
                kind: Kind::Char(0),
                perm: 0,
                uid: 0,
                gid: 0,
                mtime,
                xattrs: Vec::new(),
                links: 0,
            });
            self.link(parent, hidden.to_vec(), i, raw_path)?;
            return Ok(());
        }
        let kind = match kind {
            tar::EntryType::Directory => {
                let existing = self.lookup(&parts);
                if let Some(i) = existing.filter(|i| matches!(self.nodes[*i].kind, Kind::Dir(_))) {
                    let n = &mut self.nodes[i];
                    (n.perm, n.uid, n.gid, n.mtime) = (perm, uid, gid, mtime);
                    for x in xattrs {
                        set_xattr(&mut n.xattrs, x, raw_path)?;
                    }
                    return Ok(());
                }
                Kind::Dir(BTreeMap::new())
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                match m.sparse {
                    None => self.copy_data(s, m.stored, raw_path)?,
                    Some(sp) => self.copy_sparse(s, sp, m.stored, raw_path)?,
                }
            }
            tar::EntryType::Symlink => {
                let target = m.link.ok_or_else(|| Error::UnsafePath {
                    path: path_text(raw_path),
                    why: "symlink without a target",
                })?;
                Kind::Symlink(target)
            }
            tar::EntryType::Link => {
                let target = m.link.unwrap_or_default();
                let outside = || Error::HardLinkOutside {
                    path: path_text(raw_path),
                    target: path_text(&target),
                };
                let tparts = components(&target).map_err(|_| outside())?;
                let i = self
                    .lookup(&tparts)
                    .filter(|i| !matches!(self.nodes[*i].kind, Kind::Dir(_)))
                    .ok_or_else(outside)?;
                self.nodes[i].links += 1;
                self.link(parent, name.clone(), i, raw_path)?;
                return Ok(());
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                // The kernel's encoding holds 12 bits of major, 20 of minor.
                if major > 0xfff || minor > 0xf_ffff {
                    return Err(Error::OutOfRange {
                        path: path_text(raw_path),
                        what: "device number beyond 12-bit major / 20-bit minor",
                    });
                }
                if !self.options.allow_devices {
                    return Err(Error::Device {
                        path: path_text(raw_path),
                        major,
                        minor,
                    });
                }
                let rdev = layout::encode_dev(major, minor);
                if kind == tar::EntryType::Char {
                    Kind::Char(rdev)
                } else {
                    Kind::Block(rdev)
                }
            }
            tar::EntryType::Fifo => Kind::Fifo,
            other => {
                return Err(Error::UnsupportedEntry {
                    path: path_text(raw_path),
                    kind: other.as_byte() as char,
                });
            }
        };
        let i = self.push(Node {
            kind,
            perm,
            uid,
            gid,
            mtime,
            xattrs,
            links: 0,
        });
        self.link(parent, name.clone(), i, raw_path)?;
        Ok(())
    }

    fn push(&mut self, node: Node) -> usize {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Counts `size` more bytes of file contents against
    /// [`Options::max_layer_bytes`], before any of them is written.
    fn charge(&mut self, size: u64, path: &[u8]) -> Result<()> {
        self.expanded = self.expanded.saturating_add(size);
        if self.expanded > self.options.max_layer_bytes {
            return Err(Error::LayerTooLarge {
                path: path_text(path),
                limit: self.options.max_layer_bytes,
            });
        }
        Ok(())
    }

    fn note_extent(&mut self, image: u64, tar: u64, len: u64) {
        if let Some(x) = self.extents.as_mut()
            && len > 0
        {
            x.push(Extent { image, tar, len });
        }
    }

    /// Copies a file's data to the next free blocks. A stream that ends
    /// early is an error.
    fn copy_data<R: Read>(
        &mut self,
        s: &mut TarStream<R>,
        expected: u64,
        path: &[u8],
    ) -> Result<Kind> {
        self.charge(expected, path)?;
        let start_block = self.next_block;
        self.note_extent(start_block * BLKSZ, s.pos, expected);
        let size = io::copy(&mut s.by_ref().take(expected), &mut self.out)
            .map_err(io_err(format!("copy data of {:?}", path_text(path))))?;
        if size != expected {
            return Err(truncated(&path_text(path), "file data"));
        }
        let pad = (BLKSZ - size % BLKSZ) % BLKSZ;
        self.out
            .write_all(&vec![0u8; pad as usize])
            .map_err(io_err("pad data block"))?;
        self.next_block += size.div_ceil(BLKSZ);
        self.data_bytes += size;
        if self.next_block > u32::MAX as u64 {
            return Err(Error::TooLarge {
                what: "data beyond 16 TiB",
            });
        }
        Ok(Kind::File { start_block, size })
    }

    /// Writes a sparse file's data segments where they belong in its
    /// blocks and seeks over the holes: the image file keeps them as holes
    /// (never written, never allocated), and the file reads as zeros there.
    fn copy_sparse<R: Read>(
        &mut self,
        s: &mut TarStream<R>,
        sparse: Sparse,
        stored: u64,
        path: &[u8],
    ) -> Result<Kind> {
        let bad = |why| Error::Sparse {
            path: path_text(path),
            why,
        };
        let (real_size, segments, data_len) = match sparse {
            Sparse::Map {
                real_size,
                segments,
            } => (real_size, segments, stored),
            Sparse::InData { real_size } => {
                let (segments, map_bytes) = read_sparse_map(s, stored, path)?;
                (real_size, segments, stored - map_bytes)
            }
        };
        // Segments in order, inside the file, adding up to the stored data.
        let mut end = 0u64;
        let mut total = 0u64;
        for &(off, len) in &segments {
            if off < end {
                return Err(bad("data segments overlap or are out of order"));
            }
            end = off
                .checked_add(len)
                .filter(|e| *e <= real_size)
                .ok_or_else(|| bad("a data segment ends past the file's size"))?;
            total += len;
        }
        if total != data_len {
            return Err(bad("data segments do not add up to the stored data"));
        }
        // Holes count at their full size: whatever reads the image whole
        // (digests, an index push) reads them as zeros.
        self.charge(real_size, path)?;
        if self.next_block + real_size.div_ceil(BLKSZ) > u32::MAX as u64 {
            return Err(Error::TooLarge {
                what: "data beyond 16 TiB",
            });
        }
        let start_block = self.next_block;
        let base = start_block * BLKSZ;
        for (off, len) in segments {
            if len == 0 {
                continue;
            }
            self.out
                .seek(SeekFrom::Start(base + off))
                .map_err(io_err("seek over a hole"))?;
            self.note_extent(base + off, s.pos, len);
            let got = io::copy(&mut s.by_ref().take(len), &mut self.out)
                .map_err(io_err(format!("copy data of {:?}", path_text(path))))?;
            if got != len {
                return Err(truncated(&path_text(path), "file data"));
            }
        }
        self.next_block += real_size.div_ceil(BLKSZ);
        self.data_bytes += data_len;
        self.out
            .seek(SeekFrom::Start(self.next_block * BLKSZ))
            .map_err(io_err("seek over a hole"))?;
        Ok(Kind::File {
            start_block,
            size: real_size,
        })
    }
    /// Lays out the metadata. Per-inode tables here are as narrow as the
    /// format allows (32-bit node indexes and block addresses, a bit per
    /// node for "seen") and the metadata area is streamed out inode by
    /// inode, not built in memory: a layer of a million empty files is
    /// what the entry limit allows, and this is its peak.
    fn finish(mut self) -> Result<Summary> {
        let data_end = self.next_block * BLKSZ;
        let count = u32::try_from(self.nodes.len()).map_err(|_| Error::TooLarge {
            what: "more than 2^32 inodes",
        })?;
        // Reachable inodes, root first, each once (hard links share).
        let mut order: Vec<u32> = Vec::new();
        let mut seen = vec![false; count as usize];
        let mut queue = VecDeque::from([0u32]);
        let mut parent_of = vec![0u32; count as usize];
        while let Some(i) = queue.pop_front() {
            if std::mem::replace(&mut seen[i as usize], true) {
                continue;
            }
            order.push(i);
            if let Kind::Dir(children) = &self.nodes[i as usize].kind {
                for &c in children.values() {
                    if matches!(self.nodes[c].kind, Kind::Dir(_)) {
                        parent_of[c] = i;
                    }
                    queue.push_back(c as u32);
                }
            }
        }
        drop(seen);
        drop(queue);

        // Sizes first (they depend on names only), then positions, then bytes.
        let data_size: Vec<u64> = self
            .nodes
            .iter()
            .map(|n| match &n.kind {
                Kind::Dir(children) => dir_size(children.keys()),
                Kind::Symlink(t) => t.len() as u64,
                Kind::File { size, .. } => *size,
                _ => 0,
            })
            .collect();
        // The last partial block of a directory or symlink goes inline,
        // after its inode and xattrs, when all of them fit one block (the
        // kernel refuses inline data that crosses a block boundary: a
        // symlink of 4033..4095 bytes, or a directory whose last block is
        // almost full, never fits); otherwise it gets a block of its own.
        let inline = |n: &Node, size: u64| {
            matches!(n.kind, Kind::Dir(_) | Kind::Symlink(_))
                && !size.is_multiple_of(BLKSZ)
                && 64 + xattr_size(&n.xattrs) + size % BLKSZ <= BLKSZ
        };
        let mut offset = vec![0u64; self.nodes.len()];
        let mut cursor = 0u64;
        for &i in &order {
            let i = i as usize;
            let n = &self.nodes[i];
            let head = 64 + xattr_size(&n.xattrs);
            let tail = if inline(n, data_size[i]) {
                data_size[i] % BLKSZ
            } else {
                0
            };
            // Inline data may not cross a block boundary.
            if tail > 0 && (cursor + head) % BLKSZ + tail > BLKSZ {
                cursor = cursor.div_ceil(BLKSZ) * BLKSZ;
            }
            offset[i] = cursor;
            cursor = (cursor + head + tail).div_ceil(NID_SLOT) * NID_SLOT;
        }
        let nid = |i: usize| offset[i] / NID_SLOT;

        // Full blocks of directories and symlinks go to the data area.
        let zeros = [0u8; BLKSZ as usize];
        let mut tails: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        let mut start_block = vec![0u32; self.nodes.len()];
        for &i in &order {
            let (at, i) = (i, i as usize);
            let bytes = match &self.nodes[i].kind {
                Kind::Dir(children) => {
                    let mut entries: Vec<(&[u8], u64, u8)> = children
                        .iter()
                        .map(|(name, &c)| (name.as_slice(), nid(c), self.nodes[c].file_type()))
                        .collect();
                    entries.push((b".", nid(i), ft::DIR));
                    entries.push((b"..", nid(parent_of[i] as usize), ft::DIR));
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                    dir_blocks(&entries)
                }
                Kind::Symlink(t) => t.clone(),
                _ => continue,
            };
            debug_assert_eq!(bytes.len() as u64, data_size[i]);
            let size = bytes.len() as u64;
            let full = if inline(&self.nodes[i], size) {
                size / BLKSZ * BLKSZ
            } else {
                size
            };
            if full > 0 {
                // Checked against 32 bits as the data area grew.
                start_block[i] = self.next_block as u32;
                self.out
                    .write_all(&bytes[..full as usize])
                    .map_err(io_err("write directory blocks"))?;
                let pad = full.div_ceil(BLKSZ) * BLKSZ - full;
                self.out
                    .write_all(&zeros[..pad as usize])
                    .map_err(io_err("write directory blocks"))?;
                self.next_block += full.div_ceil(BLKSZ);
                if self.next_block > u32::MAX as u64 {
                    return Err(Error::TooLarge {
                        what: "directory blocks beyond 16 TiB",
                    });
                }
            }
            if full < size {
                tails.insert(at, bytes[full as usize..].to_vec());
            }
        }
        drop(parent_of);

        // The metadata area, in `order`, whose offsets only grow: each
        // inode is written after the zeros that pad up to it.
        let meta_blkaddr = self.next_block;
        let mut written = 0u64;
        for (ino, &at) in order.iter().enumerate() {
            let i = at as usize;
            let n = &self.nodes[i];
            let tail = tails.get(&at).map(Vec::as_slice).unwrap_or(&[]);
            let (layout, i_u) = match &n.kind {
                Kind::File { start_block, .. } => (datalayout::FLAT_PLAIN, *start_block),
                Kind::Dir(_) | Kind::Symlink(_) if !tail.is_empty() => {
                    (datalayout::FLAT_INLINE, start_block[i] as u64)
                }
                Kind::Dir(_) | Kind::Symlink(_) => (datalayout::FLAT_PLAIN, start_block[i] as u64),
                Kind::Char(rdev) | Kind::Block(rdev) => (datalayout::FLAT_PLAIN, *rdev as u64),
                Kind::Fifo => (datalayout::FLAT_PLAIN, 0),
            };
            let links = match &n.kind {
                Kind::Dir(children) => {
                    2 + children
                        .values()
                        .filter(|c| matches!(self.nodes[**c].kind, Kind::Dir(_)))
                        .count() as u32
                }
                _ => n.links.max(1),
            };
            let xsize = xattr_size(&n.xattrs);
            let inode = InodeExtended {
                i_format: (1 | (layout << 1)).into(),
                i_xattr_icount: (if xsize == 0 { 0 } else { (xsize - 12) / 4 + 1 } as u16).into(),
                i_mode: n.mode().into(),
                i_size: data_size[i].into(),
                i_u: u32::try_from(i_u)
                    .map_err(|_| Error::TooLarge {
                        what: "block address beyond 32 bits",
                    })?
                    .into(),
                i_ino: (ino as u32 + 1).into(),
                i_uid: n.uid.into(),
                i_gid: n.gid.into(),
                i_mtime: n.mtime.into(),
                i_nlink: links.into(),
                ..Default::default()
            };
            let gap = offset[i] - written;
            debug_assert!(gap < BLKSZ, "a gap is slot or block padding");
            let x = xattr_bytes(&n.xattrs);
            for part in [&zeros[..gap as usize], inode.as_bytes(), &x, tail] {
                self.out.write_all(part).map_err(io_err("write metadata"))?;
            }
            written = offset[i] + 64 + x.len() as u64 + tail.len() as u64;
        }
        let pad = cursor - written;
        self.out
            .write_all(&zeros[..pad as usize])
            .map_err(io_err("write metadata"))?;
        let end = meta_blkaddr * BLKSZ + cursor;
        let blocks = end.div_ceil(BLKSZ);
        let pad = blocks * BLKSZ - end;
        self.out
            .write_all(&vec![0u8; pad as usize])
            .map_err(io_err("pad metadata"))?;

        let sb = SuperBlock {
            magic: MAGIC.into(),
            blkszbits: BLKSZ_BITS,
            root_nid: 0.into(),
            inos: (order.len() as u64).into(),
            blocks: u32::try_from(blocks)
                .map_err(|_| Error::TooLarge {
                    what: "block count",
                })?
                .into(),
            meta_blkaddr: (meta_blkaddr as u32).into(),
            ..Default::default()
        };
        self.out
            .seek(SeekFrom::Start(SUPER_OFFSET))
            .map_err(io_err("seek to superblock"))?;
        self.out
            .write_all(sb.as_bytes())
            .map_err(io_err("write superblock"))?;
        self.out.flush().map_err(io_err("flush image"))?;
        Ok(Summary {
            inodes: order.len() as u64,
            data_bytes: self.data_bytes,
            image_bytes: blocks * BLKSZ,
            data_end,
        })
    }
}

fn xattr_entry_size(name: &[u8], value: &[u8]) -> u64 {
    (4 + name.len() as u64 + value.len() as u64).div_ceil(4) * 4
}

fn xattr_size(xattrs: &[(u8, Vec<u8>, Vec<u8>)]) -> u64 {
    if xattrs.is_empty() {
        return 0;
    }
    12 + xattrs
        .iter()
        .map(|(_, n, v)| xattr_entry_size(n, v))
        .sum::<u64>()
}

fn xattr_bytes(xattrs: &[(u8, Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    if xattrs.is_empty() {
        return Vec::new();
    }
    let mut out = XattrIbodyHeader::default().as_bytes().to_vec();
    for (index, name, value) in xattrs {
        let e = XattrEntry {
            e_name_len: name.len() as u8,
            e_name_index: *index,
            e_value_size: (value.len() as u16).into(),
        };
        let start = out.len();
        out.extend_from_slice(e.as_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(value);
        out.resize(start + xattr_entry_size(name, value) as usize, 0);
    }
    out
}

/// Bytes of a directory whose entries have these names (plus `.` and `..`).
fn dir_size<'a>(names: impl Iterator<Item = &'a Vec<u8>>) -> u64 {
    let mut lens: Vec<(&[u8], usize)> = names.map(|n| (n.as_slice(), n.len())).collect();
    lens.push((b".", 1));
    lens.push((b"..", 2));
    lens.sort_by(|a, b| a.0.cmp(b.0));
    let (mut full_blocks, mut used) = (0u64, 0u64);
    for (_, len) in lens {
        let need = 12 + len as u64;
        if used + need > BLKSZ {
            full_blocks += 1;
            used = 0;
        }
        used += need;
    }
    full_blocks * BLKSZ + used
}

/// Directory data: entries packed into blocks, each block its dirents then
/// their names; full blocks zero-padded, the last one cut at its end.
fn dir_blocks(entries: &[(&[u8], u64, u8)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut block: Vec<&(&[u8], u64, u8)> = Vec::new();
    let mut used = 0u64;
    let flush = |block: &mut Vec<&(&[u8], u64, u8)>, out: &mut Vec<u8>, pad: bool| {
        let start = out.len();
        let mut nameoff = 12 * block.len();
        for (name, nid, ft) in block.iter() {
            let d = Dirent {
                nid: (*nid).into(),
                nameoff: (nameoff as u16).into(),
                file_type: *ft,
                reserved: 0,
            };
            out.extend_from_slice(d.as_bytes());
            nameoff += name.len();
        }
        for (name, _, _) in block.iter() {
            out.extend_from_slice(name);
        }
        if pad {
            out.resize(start + BLKSZ as usize, 0);
        }
        block.clear();
    };
    for e in entries {
        let need = 12 + e.0.len() as u64;
        if used + need > BLKSZ {
            flush(&mut block, &mut out, true);
            used = 0;
        }
        block.push(e);
        used += need;
    }
    flush(&mut block, &mut out, false);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_leave_the_layer_are_refused() {
        assert!(matches!(
            components(b"/etc/passwd"),
            Err(Error::UnsafePath { .. })
        ));
        assert!(matches!(
            components(b"a/../../etc"),
            Err(Error::UnsafePath { .. })
        ));
        assert!(matches!(
            components(&[b'a'; 256]),
            Err(Error::UnsafePath { .. })
        ));
        assert_eq!(
            components(b"./a//b/").unwrap(),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
    }

    #[test]
    fn directory_size_matches_its_blocks() {
        for n in [0usize, 1, 10, 300, 1000] {
            let names: Vec<Vec<u8>> = (0..n)
                .map(|i| format!("file-{i:05}").into_bytes())
                .collect();
            let mut entries: Vec<(&[u8], u64, u8)> =
                names.iter().map(|n| (n.as_slice(), 1, ft::REG)).collect();
            entries.push((b".", 0, ft::DIR));
            entries.push((b"..", 0, ft::DIR));
            entries.sort_by(|a, b| a.0.cmp(b.0));
            assert_eq!(
                dir_blocks(&entries).len() as u64,
                dir_size(names.iter()),
                "{n} entries"
            );
        }
    }

    fn sample_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(0o644);
            h.set_uid(1);
            h.set_gid(2);
            h.set_mtime(3);
            h.set_size(data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            b.append_data(&mut h, path, data).unwrap();
        };
        add("d/", tar::EntryType::Directory, b"", None);
        add("d/f", tar::EntryType::Regular, &[5u8; 5000], None);
        add("d/l", tar::EntryType::Symlink, b"", Some("f"));
        add("d/h", tar::EntryType::Link, b"", Some("d/f"));
        add("d/.wh.x", tar::EntryType::Regular, b"", None);
        add("e/.wh..wh..opq", tar::EntryType::Regular, b"", None);
        b.into_inner().unwrap()
    }

    #[test]
    fn mutated_and_truncated_tars_never_panic() {
        use rand::{Rng, SeedableRng};
        let good = sample_tar();
        convert(&good[..], io::Cursor::new(Vec::new())).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x4879_7065_7262_6f78);
        for _ in 0..3000 {
            let mut t = good.clone();
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..t.len());
                t[i] = rng.random();
            }
            if rng.random_bool(0.3) {
                t.truncate(rng.random_range(0..t.len()));
            }
            // Any outcome but a panic: an error, or an image.
            let _ = convert(&t[..], io::Cursor::new(Vec::new()));
        }
    }

    #[test]
    fn values_beyond_their_on_disk_fields_are_errors() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Char);
        h.set_mode(0o600);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        h.set_device_major(0x1000).unwrap();
        h.set_device_minor(1).unwrap();
        b.append_data(&mut h, "dev", io::empty()).unwrap();
        let e = convert(&b.into_inner().unwrap()[..], io::Cursor::new(Vec::new())).unwrap_err();
        assert!(
            matches!(e, Error::OutOfRange { .. }) && e.to_string().contains("\"dev\""),
            "{e}"
        );

        let mut b = tar::Builder::new(Vec::new());
        let long = format!("user.{}", "x".repeat(300));
        b.append_pax_extensions([(format!("SCHILY.xattr.{long}").as_str(), &b"v"[..])])
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        b.append_data(&mut h, "f", io::empty()).unwrap();
        let e = convert(&b.into_inner().unwrap()[..], io::Cursor::new(Vec::new())).unwrap_err();
        assert!(e.to_string().contains("xattr name longer than 255"), "{e}");
    }

    #[test]
    fn xattr_names_map_to_kernel_prefix_indexes() {
        assert_eq!(split_xattr("user.a"), Some((xattr_index::USER, "a")));
        assert_eq!(
            split_xattr("security.capability"),
            Some((xattr_index::SECURITY, "capability"))
        );
        assert_eq!(
            split_xattr("trusted.overlay.opaque"),
            Some((xattr_index::TRUSTED, "overlay.opaque"))
        );
        assert_eq!(
            split_xattr("system.posix_acl_access"),
            Some((xattr_index::POSIX_ACL_ACCESS, ""))
        );
        assert_eq!(split_xattr("system.other"), None);
    }

    /// Reads back what the writer wrote: enough of EROFS to find a path and
    /// read its bytes (extended inodes, flat plain or inline data).
    mod read {
        use super::super::BLKSZ;

        fn u16_at(b: &[u8], at: usize) -> u64 {
            u16::from_le_bytes(b[at..at + 2].try_into().unwrap()) as u64
        }
        fn u32_at(b: &[u8], at: usize) -> u64 {
            u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as u64
        }
        fn u64_at(b: &[u8], at: usize) -> u64 {
            u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
        }

        /// (mode, size, xattr icount, data) of inode `nid`.
        pub fn inode(img: &[u8], nid: u64) -> (u16, u64, u16, Vec<u8>) {
            let meta = u32_at(img, 1024 + 40) * BLKSZ;
            let at = (meta + nid * 32) as usize;
            let format = u16_at(img, at);
            let icount = u16_at(img, at + 2);
            let mode = u16_at(img, at + 4) as u16;
            let size = u64_at(img, at + 8);
            let start = u32_at(img, at + 16) * BLKSZ;
            let xsize = if icount == 0 {
                0
            } else {
                12 + 4 * (icount - 1)
            };
            let mut data = Vec::new();
            match (format >> 1) & 7 {
                0 => data.extend_from_slice(&img[start as usize..(start + size) as usize]),
                2 => {
                    let full = size / BLKSZ * BLKSZ;
                    data.extend_from_slice(&img[start as usize..(start + full) as usize]);
                    let tail = at + 64 + xsize as usize;
                    data.extend_from_slice(&img[tail..tail + (size - full) as usize]);
                }
                l => panic!("layout {l}"),
            }
            (mode, size, icount as u16, data)
        }

        /// Names and nids in a directory's data.
        pub fn entries(dir: &[u8]) -> Vec<(Vec<u8>, u64)> {
            let mut out = Vec::new();
            for block in dir.chunks(BLKSZ as usize) {
                let n = u16_at(block, 8) as usize / 12;
                for i in 0..n {
                    let nid = u64_at(block, i * 12);
                    let off = u16_at(block, i * 12 + 8) as usize;
                    let end = if i + 1 < n {
                        u16_at(block, (i + 1) * 12 + 8) as usize
                    } else {
                        block.len()
                    };
                    let name = &block[off..end];
                    let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
                    out.push((name.to_vec(), nid));
                }
            }
            out
        }

        /// The nid at `path` (from the root, nid 0), if any.
        pub fn lookup(img: &[u8], path: &str) -> Option<u64> {
            let mut nid = 0;
            for part in path.split('/').filter(|p| !p.is_empty()) {
                let (_, _, _, data) = inode(img, nid);
                nid = entries(&data)
                    .into_iter()
                    .find(|(n, _)| n == part.as_bytes())?
                    .1;
            }
            Some(nid)
        }
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(size);
        h
    }

    /// A PAX sparse 1.0 entry as GNU tar `--sparse --format=posix` writes
    /// it: placeholder name, `GNU.sparse.*` records, the map in the data.
    fn pax_sparse_1_0(name: &str, real_size: u64, segments: &[(u64, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let real = real_size.to_string();
        b.append_pax_extensions([
            ("GNU.sparse.major", &b"1"[..]),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", name.as_bytes()),
            ("GNU.sparse.realsize", real.as_bytes()),
        ])
        .unwrap();
        let mut map = format!("{}\n", segments.len());
        for (off, data) in segments {
            map += &format!("{off}\n{}\n", data.len());
        }
        let mut body = map.into_bytes();
        body.resize(body.len().div_ceil(512) * 512, 0);
        for (_, data) in segments {
            body.extend_from_slice(data);
        }
        let mut h = header(tar::EntryType::Regular, body.len() as u64);
        b.append_data(&mut h, "GNUSparseFile.0/big", &body[..])
            .unwrap();
        b.into_inner().unwrap()
    }

    fn image(tar: &[u8]) -> Vec<u8> {
        let mut out = io::Cursor::new(Vec::new());
        convert(tar, &mut out).unwrap();
        out.into_inner()
    }

    fn expect_file(img: &[u8], path: &str, size: u64, data: &[(u64, &[u8])]) {
        let nid = read::lookup(img, path).unwrap_or_else(|| panic!("{path} is missing"));
        let (mode, got_size, _, bytes) = read::inode(img, nid);
        assert_eq!(mode & 0o170000, 0o100000, "{path} is a regular file");
        assert_eq!(got_size, size);
        let mut want = vec![0u8; size as usize];
        for (off, d) in data {
            want[*off as usize..*off as usize + d.len()].copy_from_slice(d);
        }
        assert!(bytes == want, "{path}: contents differ");
    }

    #[test]
    fn pax_sparse_1_0_is_the_real_file_under_its_real_name() {
        let segs: [(u64, &[u8]); 2] = [(4096, b"hello"), (100_000, &[7u8; 3000])];
        let img = image(&pax_sparse_1_0("dir/big", 200_000, &segs));
        expect_file(&img, "dir/big", 200_000, &segs);
        assert!(read::lookup(&img, "GNUSparseFile.0").is_none());
    }

    #[test]
    fn pax_sparse_0_x_and_old_gnu_sparse_are_read_too() {
        // 0.1: the map in one record.
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([
            ("GNU.sparse.major", &b"0"[..]),
            ("GNU.sparse.minor", b"1"),
            ("GNU.sparse.name", b"s01"),
            ("GNU.sparse.realsize", b"10000"),
            ("GNU.sparse.map", b"0,3,9000,2"),
        ])
        .unwrap();
        let mut h = header(tar::EntryType::Regular, 5);
        b.append_data(&mut h, "GNUSparseFile.1/s01", &b"abcde"[..])
            .unwrap();
        // 0.0: offset and numbytes records, repeated.
        b.append_pax_extensions([
            ("GNU.sparse.size", &b"8192"[..]),
            ("GNU.sparse.offset", b"4096"),
            ("GNU.sparse.numbytes", b"2"),
            ("GNU.sparse.offset", b"8190"),
            ("GNU.sparse.numbytes", b"2"),
        ])
        .unwrap();
        let mut h = header(tar::EntryType::Regular, 4);
        b.append_data(&mut h, "s00", &b"wxyz"[..]).unwrap();
        // Old GNU: type 'S', four segments in the header, one more in an
        // extension block.
        let mut h = header(tar::EntryType::GNUSparse, 5);
        let gnu = h.as_gnu_mut().unwrap();
        for (i, s) in gnu.sparse.iter_mut().enumerate() {
            s.set_offset(i as u64 * 4096);
            s.set_length(1);
        }
        gnu.set_real_size(5 * 4096);
        gnu.set_is_extended(true);
        h.set_path("old").unwrap();
        h.set_cksum();
        let mut ext = tar::GnuExtSparseHeader::new();
        ext.sparse_mut()[0].set_offset(4 * 4096);
        ext.sparse_mut()[0].set_length(1);
        let mut raw = b.into_inner().unwrap();
        raw.truncate(raw.len() - 1024); // the end-of-archive blocks
        raw.extend_from_slice(h.as_bytes());
        raw.extend_from_slice(ext.as_bytes());
        raw.extend_from_slice(b"12345");
        raw.resize(raw.len().div_ceil(512) * 512 + 1024, 0);

        let img = image(&raw);
        expect_file(&img, "s01", 10_000, &[(0, b"abc"), (9000, b"de")]);
        expect_file(&img, "s00", 8192, &[(4096, b"wx"), (8190, b"yz")]);
        expect_file(
            &img,
            "old",
            5 * 4096,
            &[
                (0, b"1"),
                (4096, b"2"),
                (8192, b"3"),
                (12288, b"4"),
                (16384, b"5"),
            ],
        );
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hb-erofs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn sparse_holes_stay_holes_in_the_image_file() {
        use std::os::unix::fs::MetadataExt;
        let real = 1u64 << 30;
        let segs: [(u64, &[u8]); 2] = [(0, b"head"), (real - 4, b"tail")];
        let tar = pax_sparse_1_0("big", real, &segs);
        let dir = scratch("holes");
        let path = dir.join("img");
        let f = std::fs::File::create(&path).unwrap();
        let s = convert(&tar[..], io::BufWriter::new(f)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.len() > real, "the image addresses the whole file");
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "1 GiB of holes took {} bytes of disk",
            meta.blocks() * 512
        );
        assert_eq!(s.data_bytes, 8);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn gnu_tar_posix_sparse_archives_convert_to_the_same_file() {
        use std::os::unix::fs::FileExt;
        let dir = scratch("gnutar");
        let f = std::fs::File::create(dir.join("sparse")).unwrap();
        f.set_len(3 << 20).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(&[9u8; 10_000], 1 << 20).unwrap();
        f.write_all_at(b"end", (3 << 20) - 3).unwrap();
        let tar = std::process::Command::new("tar")
            .args(["--sparse", "--format=posix", "-C"])
            .arg(&dir)
            .args(["-cf", "-", "sparse"])
            .output();
        let _ = std::fs::remove_dir_all(&dir);
        let Some(tar) = tar.ok().filter(|o| o.status.success()) else {
            eprintln!("SKIPPED: GNU tar is not available");
            return;
        };
        assert!(
            tar.stdout.windows(16).any(|w| w == b"GNU.sparse.major"),
            "GNU tar wrote a PAX sparse entry"
        );
        let img = image(&tar.stdout);
        expect_file(
            &img,
            "sparse",
            3 << 20,
            &[
                (0, b"start"),
                (1 << 20, &[9u8; 10_000]),
                ((3 << 20) - 3, b"end"),
            ],
        );
    }

    #[test]
    fn layers_past_max_layer_bytes_are_refused() {
        // A sparse file counts at its full size: 1 TiB of holes.
        let tar = pax_sparse_1_0("huge", 1 << 40, &[(0, b"x")]);
        let e = convert(&tar[..], io::Cursor::new(Vec::new())).unwrap_err();
        assert!(
            matches!(&e, Error::LayerTooLarge { path, .. } if path == "huge"),
            "{e}"
        );
        assert!(e.to_string().contains("snapshotter.max_layer_bytes"), "{e}");

        let mut b = tar::Builder::new(Vec::new());
        for name in ["a", "b"] {
            let mut h = header(tar::EntryType::Regular, 5000);
            b.append_data(&mut h, name, &[1u8; 5000][..]).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let small = Options {
            max_layer_bytes: 8000,
            ..Options::default()
        };
        let e = convert_with(&tar[..], io::Cursor::new(Vec::new()), small).unwrap_err();
        assert!(
            matches!(&e, Error::LayerTooLarge { path, limit: 8000 } if path == "b"),
            "{e}"
        );
    }

    /// A reader that counts what the writer took from it.
    struct Counting<R> {
        inner: R,
        read: std::rc::Rc<std::cell::Cell<u64>>,
    }

    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read.set(self.read.get() + n as u64);
            Ok(n)
        }
    }

    #[test]
    fn header_bombs_are_refused_before_they_are_read() {
        let mut prev = tar::Builder::new(Vec::new());
        let mut h = header(tar::EntryType::Regular, 0);
        prev.append_data(&mut h, "before", io::empty()).unwrap();
        let prev = prev.into_inner().unwrap();
        let prev = &prev[..prev.len() - 1024]; // no end-of-archive blocks
        for (kind, what) in [
            (tar::EntryType::GNULongName, "GNU long name"),
            (tar::EntryType::GNULongLink, "GNU long link"),
            (tar::EntryType::XHeader, "PAX extended header"),
        ] {
            // 1 GiB announced, an endless stream of 'a' behind it.
            let mut h = header(kind, 1 << 30);
            h.set_path("././@LongLink").unwrap();
            h.set_cksum();
            let read = std::rc::Rc::new(std::cell::Cell::new(0));
            let stream = Counting {
                inner: prev.chain(&h.as_bytes()[..]).chain(io::repeat(b'a')),
                read: read.clone(),
            };
            let e = convert(stream, io::Cursor::new(Vec::new())).unwrap_err();
            assert!(
                matches!(&e, Error::HeaderTooLarge { after, what: w, .. }
                    if after == "before" && *w == what),
                "{e}"
            );
            assert!(
                read.get() < 64 << 10,
                "{what}: {} bytes read before refusing",
                read.get()
            );
        }
        // At the limit it is still read (a real long name fits far below).
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("{}/f", "d".repeat(200)).repeat(8);
        let mut h = header(tar::EntryType::Regular, 1);
        b.append_data(&mut h, &long, &b"z"[..]).unwrap();
        let img = image(&b.into_inner().unwrap());
        assert!(read::lookup(&img, &long).is_some());
    }

    fn xattr_dir(b: &mut tar::Builder<Vec<u8>>, names: &[String], value: &[u8]) {
        let keys: Vec<String> = names.iter().map(|n| format!("SCHILY.xattr.{n}")).collect();
        b.append_pax_extensions(keys.iter().map(|k| (k.as_str(), value)))
            .unwrap();
        let mut h = header(tar::EntryType::Directory, 0);
        h.set_mode(0o755);
        b.append_data(&mut h, "d/", io::empty()).unwrap();
    }

    #[test]
    fn xattrs_beyond_what_an_inode_counts_are_refused_not_truncated() {
        // Each statement of "d" is within bounds; together they are not.
        let mut b = tar::Builder::new(Vec::new());
        let value = vec![b'v'; 60_000];
        for round in 0..3 {
            let names: Vec<String> = (0..3).map(|i| format!("user.r{round}x{i}")).collect();
            xattr_dir(&mut b, &names, &value);
        }
        let e = convert(&b.into_inner().unwrap()[..], io::Cursor::new(Vec::new())).unwrap_err();
        assert!(
            matches!(&e, Error::OutOfRange { path, .. } if path == "d/"),
            "{e}"
        );
        assert!(e.to_string().contains("256 KiB"), "{e}");

        // The same xattr stated again replaces the old value.
        let mut b = tar::Builder::new(Vec::new());
        for _ in 0..100 {
            xattr_dir(&mut b, &["user.same".to_string()], &value);
        }
        let img = image(&b.into_inner().unwrap());
        let (_, _, icount, _) = read::inode(&img, read::lookup(&img, "d").unwrap());
        assert_eq!(icount as u64, (60_000 + 4 + 4_u64).div_ceil(4) + 1);
    }

    #[test]
    fn xattrs_of_a_layer_are_bounded_in_memory() {
        // 200 files × 4 × 60 KB of distinct xattrs: 48 MB to hold.
        let mut b = tar::Builder::new(Vec::new());
        let value = vec![b'v'; 60_000];
        let names: Vec<String> = (0..4).map(|i| format!("user.x{i}")).collect();
        let keys: Vec<String> = names.iter().map(|n| format!("SCHILY.xattr.{n}")).collect();
        for f in 0..200 {
            b.append_pax_extensions(keys.iter().map(|k| (k.as_str(), &value[..])))
                .unwrap();
            let mut h = header(tar::EntryType::Regular, 0);
            b.append_data(&mut h, format!("f{f}"), io::empty()).unwrap();
        }
        let e = convert(&b.into_inner().unwrap()[..], io::Cursor::new(Vec::new())).unwrap_err();
        assert!(e.to_string().contains("32 MiB"), "{e}");
    }

    #[test]
    fn whiteouts_of_the_directory_itself_or_its_parent_are_refused() {
        for name in ["d/.wh.", "d/.wh..", "d/.wh..."] {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = header(tar::EntryType::Regular, 0);
            b.append_data(&mut h, name, io::empty()).unwrap();
            let e = convert(&b.into_inner().unwrap()[..], io::Cursor::new(Vec::new())).unwrap_err();
            assert!(
                matches!(&e, Error::UnsafePath { path, .. } if path == name),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn layers_past_max_layer_entries_are_refused() {
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..100 {
            let mut h = header(tar::EntryType::Regular, 0);
            b.append_data(&mut h, format!("f{i:03}"), io::empty())
                .unwrap();
        }
        let tar = b.into_inner().unwrap();
        let at = |max_layer_entries| Options {
            max_layer_entries,
            ..Options::default()
        };
        convert_with(&tar[..], io::Cursor::new(Vec::new()), at(100)).unwrap();
        let e = convert_with(&tar[..], io::Cursor::new(Vec::new()), at(50)).unwrap_err();
        assert!(
            matches!(&e, Error::TooManyEntries { path, limit: 50 } if path == "f050"),
            "{e}"
        );
        assert!(
            e.to_string().contains("snapshotter.max_layer_entries"),
            "{e}"
        );

        // Parents made on the way count: one entry 40 directories deep.
        let deep = vec!["d"; 40].join("/") + "/file";
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(tar::EntryType::Regular, 0);
        b.append_data(&mut h, &deep, io::empty()).unwrap();
        let tar = b.into_inner().unwrap();
        convert_with(&tar[..], io::Cursor::new(Vec::new()), at(41)).unwrap();
        let e = convert_with(&tar[..], io::Cursor::new(Vec::new()), at(40)).unwrap_err();
        assert!(
            matches!(&e, Error::TooManyEntries { path, .. } if *path == deep),
            "{e}"
        );
    }

    /// Directories and symlinks whose last partial block cannot follow
    /// their inode in one block (a symlink of 4063 bytes, a directory
    /// whose last block is almost full, with or without xattrs) get a
    /// block of their own; every inline tail ends in the block where its
    /// inode ends, and everything reads back. The kernel refuses inline
    /// data that crosses a block (`inline data across blocks`: EIO).
    #[test]
    fn inline_data_never_crosses_a_block_boundary() {
        let mut b = tar::Builder::new(Vec::new());
        let targets: Vec<String> = [1, 4000, 4031, 4032, 4033, 4063, 4095]
            .iter()
            .map(|n| "t/".repeat(n / 2) + &"x".repeat(n % 2))
            .collect();
        for (i, t) in targets.iter().enumerate() {
            let mut h = header(tar::EntryType::Symlink, 0);
            b.append_link(&mut h, format!("links/l{i}"), t).unwrap();
        }
        // 127 names of 20 bytes, plus "." and "..": 4091 bytes.
        let names: Vec<String> = (0..127).map(|i| format!("entry-{i:014}")).collect();
        // "labelled" carries an xattr, which moves its tail further on.
        b.append_pax_extensions([("SCHILY.xattr.user.label", &b"yes"[..])])
            .unwrap();
        let mut h = header(tar::EntryType::Directory, 0);
        h.set_mode(0o755);
        b.append_data(&mut h, "labelled/", io::empty()).unwrap();
        for dir in ["full", "labelled"] {
            for n in &names {
                let mut h = header(tar::EntryType::Regular, 0);
                b.append_data(&mut h, format!("{dir}/{n}"), io::empty())
                    .unwrap();
            }
        }
        let tar = b.into_inner().unwrap();
        let img = image(&tar);

        let meta = u32::from_le_bytes(img[1064..1068].try_into().unwrap()) as u64 * BLKSZ;
        let check = |path: &str| -> Vec<u8> {
            let nid = read::lookup(&img, path).unwrap_or_else(|| panic!("{path} is missing"));
            let at = (meta + nid * 32) as usize;
            let format = u16::from_le_bytes(img[at..at + 2].try_into().unwrap());
            let (_, size, icount, data) = read::inode(&img, nid);
            let xsize = if icount == 0 {
                0
            } else {
                12 + 4 * (icount as u64 - 1)
            };
            let inline = (format >> 1) & 7 == 2;
            let tail = size % BLKSZ;
            if inline {
                // Where the kernel looks for it: right after the inode
                // and its xattrs, in the block they end in.
                assert!(
                    (at as u64 + 64 + xsize) % BLKSZ + tail <= BLKSZ,
                    "{path}: inline tail of {tail} bytes crosses a block"
                );
            } else {
                assert!(
                    tail == 0 || 64 + xsize + tail > BLKSZ,
                    "{path}: a tail that fits is inline"
                );
            }
            assert_eq!(data.len() as u64, size, "{path}");
            data
        };
        for (i, t) in targets.iter().enumerate() {
            assert_eq!(check(&format!("links/l{i}")), t.as_bytes(), "symlink {i}");
        }
        for dir in ["full", "labelled"] {
            let data = check(dir);
            assert_eq!(data.len(), 4091, "{dir}");
            let got: Vec<Vec<u8>> = read::entries(&data).into_iter().map(|e| e.0).collect();
            assert_eq!(got.len(), 129, "{dir}");
            for n in &names {
                assert!(got.contains(&n.as_bytes().to_vec()), "{dir}/{n}");
            }
        }
        let dir = scratch("inline");
        std::fs::write(dir.join("img"), &img).unwrap();
        let out = std::process::Command::new("fsck.erofs")
            .arg(dir.join("img"))
            .output();
        let _ = std::fs::remove_dir_all(&dir);
        match out {
            Ok(out) => assert!(
                out.status.success(),
                "fsck.erofs: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(_) => eprintln!("SKIPPED: fsck.erofs (erofs-utils) is not installed"),
        }
    }

    #[test]
    fn images_with_sparse_files_pass_fsck_erofs() {
        let segs: [(u64, &[u8]); 2] = [(4096, b"hello"), (100_000, &[7u8; 3000])];
        let img = image(&pax_sparse_1_0("dir/big", 200_000, &segs));
        let dir = scratch("fsck");
        std::fs::write(dir.join("img"), &img).unwrap();
        let out = std::process::Command::new("fsck.erofs")
            .arg(format!("--extract={}", dir.join("x").display()))
            .arg(dir.join("img"))
            .output();
        let Ok(out) = out else {
            let _ = std::fs::remove_dir_all(&dir);
            eprintln!("SKIPPED: fsck.erofs (erofs-utils) is not installed");
            return;
        };
        assert!(
            out.status.success(),
            "fsck.erofs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = std::fs::read(dir.join("x/dir/big")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(got.len(), 200_000);
        assert_eq!(&got[4096..4101], b"hello");
        assert!(got[..4096].iter().all(|b| *b == 0));
    }
}
