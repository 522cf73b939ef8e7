//! Read-only loop devices for kernels without file-backed EROFS (< 6.12).
//!
//! Written by hand: it is three ioctls (`LOOP_CTL_GET_FREE`,
//! `LOOP_CONFIGURE`, and the open of `/dev/loopN`), and the crates that wrap
//! them generate their bindings with bindgen at build time, which would put
//! libclang into every build of the snapshotter for these few lines.
//!
//! Devices are configured with `LO_FLAGS_AUTOCLEAR`: the kernel detaches
//! one when its last user goes, so unmounting the filesystem frees the
//! device and a crash between configure and mount leaks nothing once our
//! descriptor closes.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
/// How often to try again when another process takes the free device first.
const ATTEMPTS: usize = 16;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

/// A configured loop device; the device stays attached while this is open
/// or while something (a mount) uses it.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    _file: File,
}

impl LoopDevice {
    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Attaches `image` read-only to a free loop device.
pub fn attach(image: &Path) -> std::io::Result<LoopDevice> {
    let backing = File::open(image)?;
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")?;
    let mut last = None;
    for _ in 0..ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns an index.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)?;
        let mut cfg = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: 4096,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO,
                lo_file_name: [0; 64],
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        let name = image.as_os_str().as_encoded_bytes();
        let len = name.len().min(63);
        cfg.info.lo_file_name[..len].copy_from_slice(&name[..len]);
        // SAFETY: `cfg` is a properly laid out `struct loop_config` that
        // lives across the call; the kernel only reads it.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
        if r == 0 {
            return Ok(LoopDevice { path, _file: dev });
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // Taken between GET_FREE and CONFIGURE by someone else.
            Some(libc::EBUSY) => last = Some(e),
            // Direct I/O needs the backing file's block size to match.
            Some(libc::EINVAL) if cfg.info.lo_flags & LO_FLAGS_DIRECT_IO != 0 => {
                cfg.info.lo_flags &= !LO_FLAGS_DIRECT_IO;
                // SAFETY: as above.
                let r = unsafe {
                    libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig)
                };
                if r == 0 {
                    return Ok(LoopDevice { path, _file: dev });
                }
                last = Some(std::io::Error::last_os_error());
            }
            _ => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free loop device")))
}

/// `LOOP_CHANGE_FD`: swaps the backing file of a read-only device.
const LOOP_CHANGE_FD: libc::c_ulong = 0x4C06;

/// Every attached loop device with the path of its backing file, as the
/// kernel shows it (`/sys/block/loopN/loop/backing_file`).
pub fn backing_files() -> Vec<(PathBuf, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read(e.path().join("loop/backing_file")) else {
            continue;
        };
        let mut backing = backing;
        while backing.last() == Some(&b'\n') {
            backing.pop();
        }
        use std::os::unix::ffi::OsStringExt;
        out.push((
            Path::new("/dev").join(name),
            PathBuf::from(std::ffi::OsString::from_vec(backing)),
        ));
    }
    out
}

/// Makes the read-only loop device `device` read from `file` instead of
/// its current backing file, which must be the same size (the kernel
/// checks): in-flight reads finish first, later ones go to `file`.
///
/// The ioctl runs in a short-lived child process. It waits, without
/// being interruptible, for the device's reads in flight; when those are
/// reads of our own FUSE files, a thread of ours stuck in it would keep
/// the process (and with it the FUSE connection those reads wait for)
/// from ever ending on a kill. The child holds nothing but the two
/// descriptors, so a killed daemon ends, its connection aborts, the
/// reads fail and the child finishes on its own.
pub fn change_backing(device: &Path, file: &File) -> std::io::Result<()> {
    let dev = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(device)?;
    let (d, f) = (dev.as_raw_fd(), file.as_raw_fd());
    // SAFETY: after fork the child makes only async-signal-safe system
    // calls (close_range, ioctl, _exit) on descriptors opened before it,
    // touching no lock or allocation of the parent's threads.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        // SAFETY: in the child, as above; the ioctl reads the descriptor
        // by value and nothing returns from this arm.
        0 => unsafe {
            let (lo, hi) = (d.min(f) as libc::c_uint, d.max(f) as libc::c_uint);
            // Every other descriptor goes, `/dev/fuse` above all: held
            // here, it would keep a killed daemon's connection alive.
            let close = |a: libc::c_uint, b: libc::c_uint| {
                a > b || libc::syscall(libc::SYS_close_range, a, b, 0) == 0
            };
            let closed = (lo == 0 || close(0, lo - 1))
                && close(lo + 1, hi.saturating_sub(1))
                && close(hi + 1, libc::c_uint::MAX);
            if !closed {
                // Before 5.9, or a filter refusing close_range: one by one.
                let mut limit = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                    limit.rlim_cur.min(1 << 20) as libc::c_int
                } else {
                    1 << 16
                };
                for fd in 0..top {
                    if fd != d && fd != f {
                        libc::close(fd);
                    }
                }
            }
            // LOOP_CHANGE_FD takes the descriptor by value; the kernel
            // takes its own reference to the file.
            let r = libc::ioctl(d, LOOP_CHANGE_FD, f as libc::c_ulong);
            let code = if r == 0 {
                0
            } else {
                (*libc::__errno_location()).clamp(1, 255)
            };
            libc::_exit(code)
        },
        child => {
            let mut status = 0;
            loop {
                // SAFETY: waits for our own child; `status` outlives the call.
                let r = unsafe { libc::waitpid(child, &mut status, 0) };
                if r == child {
                    break;
                }
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
                (true, 0) => Ok(()),
                (true, errno) => Err(std::io::Error::from_raw_os_error(errno)),
                _ => Err(std::io::Error::other(
                    "the process switching the loop device was killed",
                )),
            }
        }
    }
}
