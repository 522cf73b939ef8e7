//! `hyperbox-erofs`: EROFS images built from OCI layer tars.
//!
//! - [`layout`]: the on-disk structures (superblock, inodes, directory
//!   entries, xattrs) as little-endian `#[repr(C)]` structs with their sizes
//!   asserted at compile time.
//! - [`writer`]: a streaming tar → EROFS writer ([`writer::convert_with`])
//!   that turns OCI whiteouts into overlayfs' on-disk form and refuses
//!   hostile entries with a typed [`writer::Error`].
//! - [`convert`]: a compressed layer blob on disk (gzip, zstd or plain tar)
//!   to a published image file, crash-safe (fsync, then rename).
//! - [`map`], [`zran`], [`deflate`], [`learned`], [`trim`]: layer maps, the
//!   checkpoints that let a node inflate any part of a gzip layer, and the
//!   windows they carry, trimmed to what is referred to.
//!
//! This crate makes no mounts and no kernel calls beyond file I/O: it is the
//! parser of untrusted layer bytes, shared by the snapshotter and `hb`, and
//! the natural fuzz target. Mounting images is the snapshotter's business.

#![deny(missing_docs)]

pub mod convert;
pub mod deflate;
pub mod layout;
pub mod learned;
pub mod map;
pub mod trim;
pub mod writer;
pub mod zran;
