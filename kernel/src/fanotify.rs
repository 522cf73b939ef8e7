//! fanotify pre-content events (`FAN_PRE_ACCESS`, kernel 6.14+): a read of
//! a marked file's data is held by the kernel until userspace answers it,
//! which is how the snapshotter fetches a lazily pulled layer's bytes on
//! first access.
//!
//! [`PreContent`] is the seam: [`Fanotify`] makes the real calls, and
//! `testing::FakeFanotify` (feature `fake`) records marks and lets a test
//! feed events and read the answers.
//!
//! Written against libc: the nix and fanotify crates know neither
//! `FAN_PRE_ACCESS` nor the range info record these events carry.

use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use zerocopy::{FromBytes, Immutable, KnownLayout};

const FAN_PRE_ACCESS: u64 = 0x0010_0000;
const FAN_EVENT_INFO_TYPE_RANGE: u8 = 6;
const FAN_ALLOW: u32 = 0x01;
const FAN_DENY: u32 = 0x02;
/// `FAN_DENY_ERRNO(EIO)`: the reader gets EIO (kernel 6.14+).
const FAN_DENY_EIO: u32 = FAN_DENY | ((libc::EIO as u32) << 24);
/// Bytes read from the fanotify fd at once (many events per read).
const READ_BUF: usize = 64 * 1024;

/// A file as events name it: `(st_dev, st_ino)`.
pub type FileId = (u64, u64);

/// How a held read is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The bytes are in: let the read go on.
    Allow,
    /// The read fails with EIO (EPERM on kernels without
    /// `FAN_DENY_ERRNO`): the reader never sees missing bytes.
    DenyEio,
}

/// A read the kernel holds until [`PreContent::respond`] answers it.
#[derive(Debug)]
pub struct AccessEvent {
    /// The file read, when it could be identified.
    pub file: Option<FileId>,
    /// First byte of the range read.
    pub offset: u64,
    /// Length of the range (0 when the event carried no range record).
    pub count: u64,
    /// The process that read (or wrote), when known.
    pub pid: Option<u32>,
    pub(crate) held: Held,
}

/// What the answer to an event is written against.
#[derive(Debug)]
pub(crate) enum Held {
    /// The event's own fd: the kernel identifies the held read by it, and
    /// it closes once answered.
    Fd(OwnedFd),
    /// A read through [`crate::fuse`], answered with its bytes.
    Fuse(crate::fuse::FuseRead),
    /// A fake event, by number.
    #[cfg(any(test, feature = "fake"))]
    Fake(u64),
}

/// fanotify pre-content marks and events; see the module comment.
pub trait PreContent: fmt::Debug + Send + Sync {
    /// Holds reads of `path`'s data until they are answered. Files already
    /// open keep reading without events (the kernel decides at open time),
    /// so a writer opens the file before marking it.
    fn mark(&self, path: &Path) -> io::Result<()>;
    /// Stops holding reads of `path`.
    fn unmark(&self, path: &Path) -> io::Result<()>;
    /// Stops holding reads of `path` for good: it is about to be removed,
    /// and its inode number may come back as another file.
    fn forget(&self, path: &Path) -> io::Result<()> {
        self.unmark(path)
    }
    /// Blocks until events arrive and appends them to `out`.
    fn read_events(&self, out: &mut Vec<AccessEvent>) -> io::Result<()>;
    /// Answers `event`, releasing its reader.
    fn respond(&self, event: AccessEvent, verdict: Verdict) -> io::Result<()>;
    /// The path to mount instead of the marked file `path`, when reads
    /// reach us through another file ([`crate::fuse`]); `None` mounts
    /// `path` itself.
    fn serve_path(&self, _path: &Path) -> Option<PathBuf> {
        None
    }
}

/// The real fanotify group (`FAN_CLASS_PRE_CONTENT`; needs CAP_SYS_ADMIN).
#[derive(Debug)]
pub struct Fanotify {
    /// Read for events, written for responses: `&File` does both.
    group: File,
    buf: Mutex<Vec<u8>>,
}

/// `struct fanotify_event_metadata` from `<linux/fanotify.h>`.
#[derive(Debug, FromBytes, KnownLayout, Immutable)]
#[repr(C)]
struct EventMetadata {
    event_len: u32,
    _vers: u8,
    _reserved: u8,
    metadata_len: u16,
    _mask: u64,
    fd: i32,
    pid: i32,
}

const _: () = assert!(std::mem::size_of::<EventMetadata>() == 24);
const _: () = assert!(
    std::mem::size_of::<EventMetadata>() == std::mem::size_of::<libc::fanotify_event_metadata>()
);

impl Fanotify {
    /// Creates a pre-content fanotify group with an unlimited queue (a
    /// dropped event would leave its reader hanging).
    pub fn open() -> io::Result<Fanotify> {
        // SAFETY: fanotify_init takes two flag words and touches no memory
        // of ours; it returns a new fd or -1.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_PRE_CONTENT | libc::FAN_CLOEXEC | libc::FAN_UNLIMITED_QUEUE,
                (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as u32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by fanotify_init, is open, and
        // nothing else holds it: the OwnedFd becomes its only owner.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Fanotify {
            group: File::from(owned),
            buf: Mutex::new(vec![0; READ_BUF]),
        })
    }

    /// Takes over a group an earlier process made (kept by a service
    /// manager's fd store while it was down). Its marks are intact, and
    /// reads that waited meanwhile are queued for the new reader.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Fanotify> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        if link.as_os_str() != "anon_inode:[fanotify]" {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "fd {} is {}, not a fanotify group",
                    fd.as_raw_fd(),
                    link.display()
                ),
            ));
        }
        Ok(Fanotify {
            group: File::from(fd),
            buf: Mutex::new(vec![0; READ_BUF]),
        })
    }

    /// Fails, with EIO, reads the previous owner of a taken-over group had
    /// read but not answered when it died: the kernel finds a held read by
    /// the number of the fd its event carried, which died with that process,
    /// so each number it may have used is answered once. Returns how many
    /// were. Call before reading any event.
    pub fn deny_orphaned(&self, max_fd: i32) -> usize {
        (0..max_fd)
            .filter(|fd| self.write_response(*fd, FAN_DENY_EIO).is_ok())
            .count()
    }

    fn mark_op(&self, path: &Path, op: libc::c_uint) -> io::Result<()> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: the group fd is open for the life of `self`; `c` is a
        // NUL-terminated path that outlives the call, which only reads it.
        let rc = unsafe {
            libc::fanotify_mark(
                self.group.as_raw_fd(),
                op,
                FAN_PRE_ACCESS,
                libc::AT_FDCWD,
                c.as_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn write_response(&self, fd: i32, response: u32) -> io::Result<()> {
        // `struct fanotify_response { __s32 fd; __u32 response; }`
        let mut r = [0u8; 8];
        r[..4].copy_from_slice(&fd.to_ne_bytes());
        r[4..].copy_from_slice(&response.to_ne_bytes());
        (&self.group).write_all(&r)
    }
}

impl std::os::fd::AsFd for Fanotify {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.group.as_fd()
    }
}

impl PreContent for Fanotify {
    fn mark(&self, path: &Path) -> io::Result<()> {
        self.mark_op(path, libc::FAN_MARK_ADD)
    }

    fn unmark(&self, path: &Path) -> io::Result<()> {
        self.mark_op(path, libc::FAN_MARK_REMOVE)
    }

    fn read_events(&self, out: &mut Vec<AccessEvent>) -> io::Result<()> {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let n = (&self.group).read(&mut buf)?;
        let mut at = 0;
        while let Ok((m, _)) = EventMetadata::read_from_prefix(&buf[at..n]) {
            let len = m.event_len as usize;
            if len < std::mem::size_of::<EventMetadata>()
                || at + len > n
                || m.metadata_len as usize > len
            {
                break;
            }
            let (offset, count) = range_of(&buf[at + m.metadata_len as usize..at + len]);
            at += len;
            // Queue overflow carries no fd; with an unlimited queue it
            // does not happen.
            if m.fd < 0 {
                continue;
            }
            // SAFETY: the kernel installed this fd in our table for this
            // event alone; nothing else knows it, so the OwnedFd is its
            // only owner and closes it once, after the answer.
            let fd = unsafe { OwnedFd::from_raw_fd(m.fd) };
            let file = File::from(fd);
            let id = file.metadata().ok().map(|st| (st.dev(), st.ino()));
            out.push(AccessEvent {
                file: id,
                offset,
                count,
                pid: u32::try_from(m.pid).ok().filter(|p| *p > 0),
                held: Held::Fd(file.into()),
            });
        }
        Ok(())
    }

    fn respond(&self, event: AccessEvent, verdict: Verdict) -> io::Result<()> {
        let fd = match &event.held {
            Held::Fd(fd) => fd.as_raw_fd(),
            Held::Fuse(_) => return Err(io::Error::other("a FUSE read reached fanotify")),
            #[cfg(any(test, feature = "fake"))]
            Held::Fake(_) => return Err(io::Error::other("a fake event reached real fanotify")),
        };
        let r = match verdict {
            Verdict::Allow => self.write_response(fd, FAN_ALLOW),
            Verdict::DenyEio => self
                .write_response(fd, FAN_DENY_EIO)
                // Kernels without FAN_DENY_ERRNO: a plain deny (EPERM).
                .or_else(|_| self.write_response(fd, FAN_DENY)),
        };
        // The event's fd closes here, after the answer is written.
        drop(event);
        r
    }
}

/// The `(offset, count)` of a pre-content event's range info record,
/// `(0, 0)` if it has none.
fn range_of(info: &[u8]) -> (u64, u64) {
    let mut at = 0;
    while at + 4 <= info.len() {
        let kind = info[at];
        let len = u16::from_ne_bytes([info[at + 2], info[at + 3]]) as usize;
        if len < 4 || at + len > info.len() {
            break;
        }
        // header (4) + pad (4) + offset (8) + count (8)
        if kind == FAN_EVENT_INFO_TYPE_RANGE && len >= 24 {
            let off = u64::from_ne_bytes(info[at + 8..at + 16].try_into().expect("8 bytes"));
            let cnt = u64::from_ne_bytes(info[at + 16..at + 24].try_into().expect("8 bytes"));
            return (off, cnt);
        }
        at += len;
    }
    (0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_records_are_found_among_info_records() {
        let mut info = vec![1u8, 0, 8, 0, 0, 0, 0, 0]; // some other record
        info.extend_from_slice(&[FAN_EVENT_INFO_TYPE_RANGE, 0, 24, 0, 0, 0, 0, 0]);
        info.extend_from_slice(&4096u64.to_ne_bytes());
        info.extend_from_slice(&65536u64.to_ne_bytes());
        assert_eq!(range_of(&info), (4096, 65536));
        assert_eq!(
            range_of(&[6, 0, 2, 0]),
            (0, 0),
            "malformed length stops the scan"
        );
        assert_eq!(range_of(&[]), (0, 0));
    }
}
