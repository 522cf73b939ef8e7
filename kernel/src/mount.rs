//! Mounting EROFS layer images read-only, and finding and removing mounts
//! under a directory (crash leftovers).
//!
//! [`Mounter`] is the seam: [`HostMounter`] makes the real calls (and
//! attaches loop devices for [`Backend::Loop`]), `testing::FakeMounts`
//! (feature `fake`) records them so snapshot logic is testable without
//! root.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use crate::loopdev;

/// How a layer image reaches the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `mount -t erofs <file>`: the kernel reads the file directly (6.12+).
    File,
    /// A read-only loop device per image.
    Loop,
}

impl Backend {
    /// Name for logs and `hb doctor`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::File => "file-backed",
            Backend::Loop => "loop",
        }
    }
}

/// The mounts the snapshotter makes and removes.
pub trait Mounter: fmt::Debug + Send + Sync {
    /// Mounts EROFS `image` read-only (nodev, nosuid) at `target`.
    fn mount_erofs(&self, image: &Path, target: &Path, backend: Backend) -> io::Result<()>;
    /// Detaches the mount at `target` (lazily: a container still reading
    /// from it keeps it alive until it lets go); nothing mounted there is
    /// not an error.
    fn unmount(&self, target: &Path) -> io::Result<()>;
    /// Whether `path` is the root of a mount.
    fn is_mountpoint(&self, path: &Path) -> io::Result<bool>;
    /// Mount points at or below `dir`, deepest first (the order to unmount).
    fn mounts_under(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    /// Unmounts everything at or below `dir`; returns what was mounted.
    fn unmount_all_under(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let ms = self.mounts_under(dir)?;
        for m in &ms {
            self.unmount(m)?;
        }
        Ok(ms)
    }
}

/// The real mounts of this mount namespace.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostMounter;

impl Mounter for HostMounter {
    fn mount_erofs(&self, image: &Path, target: &Path, backend: Backend) -> io::Result<()> {
        mount(image, target, backend)
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        unmount(target)
    }

    fn is_mountpoint(&self, path: &Path) -> io::Result<bool> {
        is_mountpoint(path)
    }

    fn mounts_under(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        mounts_under(dir)
    }
}

/// Mounts EROFS `image` read-only at `target`.
fn mount(image: &Path, target: &Path, backend: Backend) -> io::Result<()> {
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    match backend {
        Backend::File => nix::mount::mount(Some(image), target, Some("erofs"), flags, None::<&str>)
            .map_err(io::Error::from),
        Backend::Loop => {
            let dev = loopdev::attach(image)?;
            // The device auto-clears once unmounted; `dev` closes on return.
            nix::mount::mount(Some(dev.path()), target, Some("erofs"), flags, None::<&str>)
                .map_err(io::Error::from)
        }
    }
}

/// Whether `path` is the root of a mount (its device differs from its
/// parent's).
fn is_mountpoint(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::symlink_metadata(path)?;
    let parent = std::fs::symlink_metadata(path.join(".."))?;
    Ok(me.dev() != parent.dev() || me.ino() == parent.ino())
}

/// Detaches the mount at `target` (lazily: a container still reading from
/// it keeps it alive until it lets go).
fn unmount(target: &Path) -> io::Result<()> {
    match nix::mount::umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Mount points at or below `dir`, deepest first (the order to unmount).
fn mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    Ok(out)
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b/c\134d"), "/a b/c\\d");
        assert_eq!(unescape(r"/x\04"), r"/x\04");
    }
}
