//! EROFS images built from OCI layer tars, and their mounts.
//!
//! [`writer::convert`] turns a tar stream into an uncompressed EROFS image
//! that the kernel mounts directly from its file (kernel 6.12+) or through a
//! loop device ([`mount`], [`loopdev`]), with overlay whiteouts in
//! overlayfs' on-disk form so that a stack of layer images is an overlay
//! lowerdir list.

pub mod layout;
pub mod loopdev;
pub mod mount;
pub mod writer;
