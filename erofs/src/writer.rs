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
//! Written by hand because no crate writes EROFS; the format facts come from
//! the kernel's `fs/erofs/erofs_fs.h`.

use std::collections::{BTreeMap, HashSet, VecDeque};
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
    /// The image would exceed what 32-bit block addresses reach.
    #[error("image too large: {what}")]
    TooLarge {
        /// What overflowed.
        what: &'static str,
    },
}

type Result<T> = std::result::Result<T, Error>;

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
    /// Keep character and block device nodes (other than whiteouts). Images
    /// rarely need them, and a node in a layer is a way around `nodev`
    /// mounts, so the snapshotter refuses them unless told otherwise.
    pub allow_devices: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            allow_devices: true,
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

struct Builder<W> {
    out: W,
    options: Options,
    nodes: Vec<Node>,
    /// Next free block for data.
    next_block: u64,
    data_bytes: u64,
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
                    self.link(cur, p.clone(), i);
                    i
                }
            };
        }
        Ok(cur)
    }

    /// Points `name` in `dir` at node `child`, replacing what was there.
    fn link(&mut self, dir: usize, name: Vec<u8>, child: usize) {
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
        let mut archive = tar::Archive::new(tar);
        let entries = archive.entries().map_err(io_err("read layer tar"))?;
        let mut last = String::from("(start)");
        for entry in entries {
            let mut e = entry.map_err(io_err(format!("read layer tar entry after {last:?}")))?;
            let raw_path = e.path_bytes().into_owned();
            last = path_text(&raw_path);
            let kind = e.header().entry_type();
            if matches!(kind, tar::EntryType::XGlobalHeader) {
                continue;
            }
            let parts = components(&raw_path)?;
            let h = e.header().clone();
            let perm = (h
                .mode()
                .map_err(io_err(format!("mode of {:?}", path_text(&raw_path))))?
                & 0o7777) as u16;
            let uid = h
                .uid()
                .map_err(io_err(format!("uid of {:?}", path_text(&raw_path))))?
                as u32;
            let gid = h
                .gid()
                .map_err(io_err(format!("gid of {:?}", path_text(&raw_path))))?
                as u32;
            let mtime = h.mtime().unwrap_or(0);
            let mut xattrs = Vec::new();
            if let Some(exts) = e.pax_extensions().map_err(io_err("read pax headers"))? {
                for ext in exts {
                    let ext = ext.map_err(io_err("read pax header"))?;
                    let Ok(key) = ext.key() else { continue };
                    if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                        let (index, suffix) =
                            split_xattr(name).ok_or_else(|| Error::UnsupportedXattr {
                                path: path_text(&raw_path),
                                name: name.into(),
                            })?;
                        let out_of_range = |what| Error::OutOfRange {
                            path: path_text(&raw_path),
                            what,
                        };
                        if suffix.len() > u8::MAX as usize {
                            return Err(out_of_range("xattr name longer than 255 bytes"));
                        }
                        if ext.value_bytes().len() > u16::MAX as usize {
                            return Err(out_of_range("xattr value larger than 64 KiB"));
                        }
                        xattrs.push((
                            index,
                            suffix.as_bytes().to_vec(),
                            ext.value_bytes().to_vec(),
                        ));
                        // i_xattr_icount is 16 bits of 4-byte units.
                        if xattr_size(&xattrs) > 4 * u16::MAX as u64 {
                            return Err(out_of_range("xattrs larger than 256 KiB in total"));
                        }
                    }
                }
            }
            let Some((name, parents)) = parts.split_last() else {
                // The root itself ("./"): its metadata.
                let root = &mut self.nodes[0];
                (root.perm, root.uid, root.gid, root.mtime, root.xattrs) =
                    (perm, uid, gid, mtime, xattrs);
                continue;
            };
            let parent = self.dir_at(parents, &raw_path)?;
            if name == b".wh..wh..opq" {
                self.nodes[parent].xattrs.push((
                    xattr_index::TRUSTED,
                    b"overlay.opaque".to_vec(),
                    b"y".to_vec(),
                ));
                continue;
            }
            if let Some(hidden) = name.strip_prefix(b".wh.") {
                let i = self.push(Node {
                    kind: Kind::Char(0),
                    perm: 0,
                    uid: 0,
                    gid: 0,
                    mtime,
                    xattrs: Vec::new(),
                    links: 0,
                });
                self.link(parent, hidden.to_vec(), i);
                continue;
            }
            let kind = match kind {
                tar::EntryType::Directory => {
                    let existing = self.lookup(&parts);
                    if let Some(i) =
                        existing.filter(|i| matches!(self.nodes[*i].kind, Kind::Dir(_)))
                    {
                        let n = &mut self.nodes[i];
                        (n.perm, n.uid, n.gid, n.mtime) = (perm, uid, gid, mtime);
                        n.xattrs.extend(xattrs);
                        continue;
                    }
                    Kind::Dir(BTreeMap::new())
                }
                tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::GNUSparse => {
                    let expected = e.size();
                    self.copy_data(&mut e, expected, &raw_path)?
                }
                tar::EntryType::Symlink => {
                    let target = e
                        .link_name_bytes()
                        .ok_or_else(|| Error::UnsafePath {
                            path: path_text(&raw_path),
                            why: "symlink without a target",
                        })?
                        .into_owned();
                    Kind::Symlink(target)
                }
                tar::EntryType::Link => {
                    let target = e
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .unwrap_or_default();
                    let outside = || Error::HardLinkOutside {
                        path: path_text(&raw_path),
                        target: path_text(&target),
                    };
                    let tparts = components(&target).map_err(|_| outside())?;
                    let i = self
                        .lookup(&tparts)
                        .filter(|i| !matches!(self.nodes[*i].kind, Kind::Dir(_)))
                        .ok_or_else(outside)?;
                    self.nodes[i].links += 1;
                    self.link(parent, name.clone(), i);
                    continue;
                }
                tar::EntryType::Char | tar::EntryType::Block => {
                    let major = h.device_major().ok().flatten().unwrap_or(0);
                    let minor = h.device_minor().ok().flatten().unwrap_or(0);
                    // The kernel's encoding holds 12 bits of major, 20 of minor.
                    if major > 0xfff || minor > 0xf_ffff {
                        return Err(Error::OutOfRange {
                            path: path_text(&raw_path),
                            what: "device number beyond 12-bit major / 20-bit minor",
                        });
                    }
                    if !self.options.allow_devices {
                        return Err(Error::Device {
                            path: path_text(&raw_path),
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
                        path: path_text(&raw_path),
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
            self.link(parent, name.clone(), i);
        }
        Ok(())
    }

    fn push(&mut self, node: Node) -> usize {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Copies a file's data to the next free blocks. A stream that ends
    /// early is an error: the tar reader reports it as a short read.
    fn copy_data<R: Read>(&mut self, data: &mut R, expected: u64, path: &[u8]) -> Result<Kind> {
        let start_block = self.next_block;
        let size = io::copy(data, &mut self.out)
            .map_err(io_err(format!("copy data of {:?}", path_text(path))))?;
        if size != expected {
            return Err(Error::Io {
                action: format!(
                    "layer tar is truncated in {:?}: {size} of {expected} bytes",
                    path_text(path)
                ),
                source: io::ErrorKind::UnexpectedEof.into(),
            });
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

    fn finish(mut self) -> Result<Summary> {
        let data_end = self.next_block * BLKSZ;
        // Reachable inodes, root first, each once (hard links share).
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        let mut queue = VecDeque::from([0usize]);
        let mut parent_of = vec![0usize; self.nodes.len()];
        while let Some(i) = queue.pop_front() {
            if !seen.insert(i) {
                continue;
            }
            order.push(i);
            if let Kind::Dir(children) = &self.nodes[i].kind {
                for &c in children.values() {
                    if matches!(self.nodes[c].kind, Kind::Dir(_)) {
                        parent_of[c] = i;
                    }
                    queue.push_back(c);
                }
            }
        }

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
        let inline = |n: &Node, size: u64| {
            matches!(n.kind, Kind::Dir(_) | Kind::Symlink(_)) && !size.is_multiple_of(BLKSZ)
        };
        let mut offset = vec![0u64; self.nodes.len()];
        let mut cursor = 0u64;
        for &i in &order {
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
        let mut tails: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
        let mut start_block = vec![0u64; self.nodes.len()];
        for &i in &order {
            let bytes = match &self.nodes[i].kind {
                Kind::Dir(children) => {
                    let mut entries: Vec<(&[u8], u64, u8)> = children
                        .iter()
                        .map(|(name, &c)| (name.as_slice(), nid(c), self.nodes[c].file_type()))
                        .collect();
                    entries.push((b".", nid(i), ft::DIR));
                    entries.push((b"..", nid(parent_of[i]), ft::DIR));
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                    dir_blocks(&entries)
                }
                Kind::Symlink(t) => t.clone(),
                _ => continue,
            };
            debug_assert_eq!(bytes.len() as u64, data_size[i]);
            let full = bytes.len() as u64 / BLKSZ * BLKSZ;
            if full > 0 {
                start_block[i] = self.next_block;
                self.out
                    .write_all(&bytes[..full as usize])
                    .map_err(io_err("write directory blocks"))?;
                self.next_block += full / BLKSZ;
            }
            tails.insert(i, bytes[full as usize..].to_vec());
        }

        // The metadata area.
        let meta_blkaddr = self.next_block;
        let mut meta = vec![0u8; cursor as usize];
        for (ino, &i) in order.iter().enumerate() {
            let n = &self.nodes[i];
            let tail = tails.get(&i).map(Vec::as_slice).unwrap_or(&[]);
            let (layout, i_u) = match &n.kind {
                Kind::File { start_block, .. } => (datalayout::FLAT_PLAIN, *start_block),
                Kind::Dir(_) | Kind::Symlink(_) if !tail.is_empty() => {
                    (datalayout::FLAT_INLINE, start_block[i])
                }
                Kind::Dir(_) | Kind::Symlink(_) => (datalayout::FLAT_PLAIN, start_block[i]),
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
            let at = offset[i] as usize;
            meta[at..at + 64].copy_from_slice(inode.as_bytes());
            let x = xattr_bytes(&n.xattrs);
            meta[at + 64..at + 64 + x.len()].copy_from_slice(&x);
            meta[at + 64 + x.len()..at + 64 + x.len() + tail.len()].copy_from_slice(tail);
        }
        self.out
            .write_all(&meta)
            .map_err(io_err("write metadata"))?;
        let end = meta_blkaddr * BLKSZ + meta.len() as u64;
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
}
