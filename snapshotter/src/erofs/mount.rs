//! Mounting EROFS layer images read-only, and finding and removing mounts
//! under a directory (crash leftovers).

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use super::loopdev;

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

/// Mounts EROFS `image` read-only at `target`.
pub fn mount(image: &Path, target: &Path, backend: Backend) -> std::io::Result<()> {
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    match backend {
        Backend::File => nix::mount::mount(Some(image), target, Some("erofs"), flags, None::<&str>)
            .map_err(std::io::Error::from),
        Backend::Loop => {
            let dev = loopdev::attach(image)?;
            // The device auto-clears once unmounted; `dev` closes on return.
            nix::mount::mount(Some(dev.path()), target, Some("erofs"), flags, None::<&str>)
                .map_err(std::io::Error::from)
        }
    }
}

/// Whether `path` is the root of a mount (its device differs from its
/// parent's).
pub fn is_mountpoint(path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::symlink_metadata(path)?;
    let parent = std::fs::symlink_metadata(path.join(".."))?;
    Ok(me.dev() != parent.dev() || me.ino() == parent.ino())
}

/// Detaches the mount at `target` (lazily: a container still reading from
/// it keeps it alive until it lets go).
pub fn unmount(target: &Path) -> std::io::Result<()> {
    match nix::mount::umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Mount points at or below `dir`, deepest first (the order to unmount).
pub fn mounts_under(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
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

/// Unmounts everything at or below `dir`.
pub fn unmount_all_under(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let ms = mounts_under(dir)?;
    for m in &ms {
        unmount(m)?;
    }
    Ok(ms)
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
