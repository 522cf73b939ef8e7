//! Kernel features hyperbox depends on, detected on the running machine.
//!
//! Each probe tries the real thing where it can (mounting a file-backed
//! EROFS image, putting a pre-content fanotify mark on a file) and says how it
//! decided, so `hb doctor` can tell an operator why a backend is not used.
//! The snapshotter logs the same results at start-up; the image backends
//! choose from them.

use std::fs;
use std::path::Path;

use hyperbox_config::{ErofsBackend, LazyBackend};
use serde::Serialize;

use crate::fanotify::{Fanotify, PreContent};
use crate::mount::{Backend, HostMounter, Mounter};

/// One detected feature.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Feature {
    /// Short name, stable for scripts.
    pub name: &'static str,
    /// Whether it is available.
    pub available: bool,
    /// What was found, e.g. the value of a cgroup mode.
    pub value: String,
    /// How it was detected.
    pub how: String,
}

fn feature(
    name: &'static str,
    available: bool,
    value: impl Into<String>,
    how: impl Into<String>,
) -> Feature {
    Feature {
        name,
        available,
        value: value.into(),
        how: how.into(),
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Every probe, in the order `hb doctor` shows them. `scratch` is a
/// directory on the filesystem the snapshotter will use (probe images and
/// marks are made there and removed).
pub fn detect(scratch: &Path) -> Vec<Feature> {
    // Distribution kernels build these as modules, loaded on first use:
    // a node that never mounted EROFS does not list it yet.
    load_modules();
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let has_fs = |name: &str| {
        filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some(name))
    };
    let mut out = Vec::new();

    let erofs = has_fs("erofs");
    out.push(feature(
        "erofs",
        erofs,
        yes_no(erofs),
        if erofs {
            "erofs in /proc/filesystems"
        } else {
            "erofs not in /proc/filesystems (modprobe erofs did not add it)"
        },
    ));
    out.push(erofs_file_backed(scratch, erofs));
    out.push(fanotify_pre_content(scratch));
    let cachefiles = Path::new("/dev/cachefiles").exists();
    out.push(feature(
        "erofs_fscache_ondemand",
        cachefiles && erofs,
        yes_no(cachefiles && erofs),
        if cachefiles {
            "/dev/cachefiles present (cachefiles on-demand device)"
        } else {
            "/dev/cachefiles absent: kernel without cachefiles on-demand"
        },
    ));
    let fuse = Path::new("/dev/fuse").exists() && has_fs("fuse");
    out.push(feature(
        "fuse",
        fuse,
        yes_no(fuse),
        if fuse {
            "/dev/fuse present and fuse in /proc/filesystems"
        } else {
            "/dev/fuse or fuse filesystem missing"
        },
    ));
    let overlay = has_fs("overlay");
    out.push(feature(
        "overlayfs",
        overlay,
        yes_no(overlay),
        "overlay in /proc/filesystems",
    ));
    let lo = Path::new("/dev/loop-control").exists();
    out.push(feature(
        "loop",
        lo,
        yes_no(lo),
        if lo {
            "/dev/loop-control present"
        } else {
            "/dev/loop-control absent (modprobe loop did not add it)"
        },
    ));
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    out.push(feature(
        "btf",
        btf,
        yes_no(btf),
        "/sys/kernel/btf/vmlinux present",
    ));
    let psi = fs::read_to_string("/proc/pressure/memory").is_ok();
    out.push(feature(
        "psi",
        psi,
        yes_no(psi),
        "/proc/pressure/memory readable (boot with psi=1 if not)",
    ));
    let (mode, how) = cgroup_mode();
    out.push(feature("cgroup", true, mode, how));
    out
}

/// Loads the modules of EROFS, loop devices and FUSE where they are
/// missing, as the kernel would on their first use (`modprobe`, best
/// effort: built in, or no modprobe, is fine).
fn load_modules() {
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let missing = |fs: &str| {
        !filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some(fs))
    };
    let mut wanted = Vec::new();
    if missing("erofs") {
        wanted.push("erofs");
    }
    if !Path::new("/dev/loop-control").exists() {
        wanted.push("loop");
    }
    if missing("fuse") || !Path::new("/dev/fuse").exists() {
        wanted.push("fuse");
    }
    for m in wanted {
        let _ = std::process::Command::new("modprobe")
            .args(["-q", m])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Mounts a one-directory EROFS image straight from its file (no loop
/// device), which kernels from 6.12 on accept.
fn erofs_file_backed(scratch: &Path, erofs: bool) -> Feature {
    const NAME: &str = "erofs_file_backed";
    if !erofs {
        return feature(NAME, false, "no", "erofs is not registered");
    }
    let dir = scratch.join(format!("probe-{:08x}", rand::random::<u32>()));
    let result = (|| -> Result<(), String> {
        fs::create_dir_all(dir.join("mnt")).map_err(|e| e.to_string())?;
        // The probe image comes from our own writer, so the answer does not
        // depend on erofs-utils being installed.
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(8);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, "probe", &b"hyperbox"[..])
            .map_err(|e| e.to_string())?;
        let tar = tar.into_inner().map_err(|e| e.to_string())?;
        let img = dir.join("probe.erofs");
        let out = fs::File::create(&img).map_err(|e| e.to_string())?;
        hyperbox_erofs::writer::convert(&tar[..], out).map_err(|e| e.to_string())?;
        let mnt = dir.join("mnt");
        HostMounter
            .mount_erofs(&img, &mnt, Backend::File)
            .map_err(|e| format!("mount -t erofs <file>: {e}"))?;
        let read = fs::read(mnt.join("probe"));
        let _ = HostMounter.unmount(&mnt);
        match read {
            Ok(b) if b == b"hyperbox" => Ok(()),
            Ok(_) => Err("mounted image read back wrong".into()),
            Err(e) => Err(format!("read from the mounted image: {e}")),
        }
    })();
    let _ = fs::remove_dir_all(&dir);
    match result {
        Ok(()) => feature(
            NAME,
            true,
            "yes",
            "mounted an image file with -t erofs and read it back",
        ),
        Err(e) => feature(NAME, false, "no", e),
    }
}

/// Puts a FAN_PRE_ACCESS mark (kernel 6.14+) on a file on the snapshotter's
/// filesystem.
fn fanotify_pre_content(scratch: &Path) -> Feature {
    const NAME: &str = "fanotify_pre_content";
    let file = scratch.join(format!("probe-{:08x}", rand::random::<u32>()));
    if let Err(e) = fs::write(&file, b"x") {
        return feature(
            NAME,
            false,
            "no",
            format!("cannot create a probe file: {e}"),
        );
    }
    let result = Fanotify::open()
        .map_err(|e| format!("fanotify_init(FAN_CLASS_PRE_CONTENT): {e}"))
        .and_then(|group| {
            group
                .mark(&file)
                .map_err(|e| format!("fanotify_mark(FAN_PRE_ACCESS): {e}"))
        });
    let _ = fs::remove_file(&file);
    match result {
        Ok(()) => feature(
            NAME,
            true,
            "yes",
            "fanotify_mark(FAN_PRE_ACCESS) accepted on a file",
        ),
        Err(e) => feature(NAME, false, "no", e),
    }
}

fn cgroup_mode() -> (String, String) {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let magic = |p: &str| {
        nix::sys::statfs::statfs(p)
            .ok()
            .map(|s| s.filesystem_type().0)
    };
    if magic("/sys/fs/cgroup") == Some(CGROUP2_SUPER_MAGIC) {
        return ("v2".into(), "/sys/fs/cgroup is cgroup2".into());
    }
    if magic("/sys/fs/cgroup/unified") == Some(CGROUP2_SUPER_MAGIC) {
        return (
            "hybrid".into(),
            "v1 controllers under /sys/fs/cgroup, cgroup2 at /sys/fs/cgroup/unified".into(),
        );
    }
    ("v1".into(), "no cgroup2 hierarchy mounted".into())
}

/// Why [`choose_backend`] cannot honour the configured backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// `erofs_backend = "file"` on a kernel without file-backed EROFS.
    #[error(
        "snapshotter.erofs_backend = \"file\" but this kernel cannot mount EROFS from a file \
         (needs 6.12+ with EROFS_FS_BACKED_BY_FILE); use \"auto\" or \"loop\""
    )]
    NoFileBacked,
    /// `erofs_backend = "loop"` without EROFS or loop devices.
    #[error("snapshotter.erofs_backend = \"loop\" but EROFS or /dev/loop-control is missing")]
    NoLoop,
}

/// The EROFS backend `wanted` resolves to on this kernel, given the
/// detected features; `None` when `auto` finds no backend that can work.
pub fn choose_backend(
    wanted: ErofsBackend,
    features: &[Feature],
) -> Result<Option<Backend>, BackendError> {
    let has = |n: &str| features.iter().any(|f| f.name == n && f.available);
    let file = has("erofs_file_backed");
    let lo = has("erofs") && has("loop");
    Ok(match wanted {
        ErofsBackend::Auto if file => Some(Backend::File),
        ErofsBackend::Auto if lo => Some(Backend::Loop),
        ErofsBackend::Auto => None,
        ErofsBackend::File if file => Some(Backend::File),
        ErofsBackend::File => return Err(BackendError::NoFileBacked),
        ErofsBackend::Loop if lo => Some(Backend::Loop),
        ErofsBackend::Loop => return Err(BackendError::NoLoop),
    })
}
/// How the kernel's reads of a lazily served layer's unfetched bytes
/// reach the snapshotter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LazyServe {
    /// File-backed EROFS whose reads fanotify pre-content events hold
    /// ([`crate::fanotify`]).
    Fanotify,
    /// A loop device over a file the snapshotter serves through FUSE
    /// ([`crate::fuse`]), switched to the local file once complete.
    Fuse,
}

impl LazyServe {
    /// Name for logs, `hb doctor` and the config.
    pub fn as_str(self) -> &'static str {
        match self {
            LazyServe::Fanotify => "fanotify",
            LazyServe::Fuse => "fuse",
        }
    }
}

/// How the lazy path serves reads with EROFS `backend` on this kernel and
/// `snapshotter.lazy_backend = wanted`, or why it cannot (then indexed
/// images are fetched whole). One rule for the snapshotter's start and
/// `hb doctor`.
pub fn lazy_serve(
    wanted: LazyBackend,
    backend: Backend,
    features: &[Feature],
) -> Result<LazyServe, &'static str> {
    let has = |n: &str| features.iter().any(|f| f.name == n && f.available);
    let fanotify = backend == Backend::File && has("fanotify_pre_content");
    let fuse = has("fuse") && has("loop") && has("erofs");
    match wanted {
        LazyBackend::Auto | LazyBackend::Fanotify if fanotify => Ok(LazyServe::Fanotify),
        LazyBackend::Auto | LazyBackend::Fuse if fuse => Ok(LazyServe::Fuse),
        LazyBackend::Fanotify if backend != Backend::File => Err(
            "lazy_backend = \"fanotify\" needs file-backed EROFS mounts, and layers are mounted \
             through loop devices: indexed images are fetched whole",
        ),
        LazyBackend::Fanotify => Err(
            "lazy_backend = \"fanotify\" but the kernel has no fanotify pre-content events \
             (6.14+ with CONFIG_FANOTIFY_ACCESS_PERMISSIONS): indexed images are fetched whole",
        ),
        LazyBackend::Fuse => Err(
            "lazy_backend = \"fuse\" but /dev/fuse, the fuse filesystem or loop devices are \
             missing: indexed images are fetched whole",
        ),
        LazyBackend::Auto => Err(
            "no fanotify pre-content events with file-backed EROFS (6.14+), and no FUSE with \
             loop devices: indexed images are fetched whole",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(available: &[&'static str]) -> Vec<Feature> {
        [
            "erofs",
            "erofs_file_backed",
            "fanotify_pre_content",
            "fuse",
            "loop",
        ]
        .into_iter()
        .map(|n| feature(n, available.contains(&n), "", ""))
        .collect()
    }

    #[test]
    fn each_kernel_gets_the_lazy_backend_it_can_run() {
        let all = node(&[
            "erofs",
            "erofs_file_backed",
            "fanotify_pre_content",
            "fuse",
            "loop",
        ]);
        let k6_12 = node(&["erofs", "erofs_file_backed", "fuse", "loop"]);
        let k6_1 = node(&["erofs", "fuse", "loop"]);
        let no_fuse = node(&["erofs", "erofs_file_backed", "loop"]);
        use LazyBackend::*;
        assert_eq!(
            lazy_serve(Auto, Backend::File, &all),
            Ok(LazyServe::Fanotify)
        );
        // erofs_backend = "loop" on a 6.14+ kernel: pre-content events
        // hold reads of files, not of loop devices.
        assert_eq!(lazy_serve(Auto, Backend::Loop, &all), Ok(LazyServe::Fuse));
        assert_eq!(lazy_serve(Fuse, Backend::File, &all), Ok(LazyServe::Fuse));
        assert_eq!(lazy_serve(Auto, Backend::File, &k6_12), Ok(LazyServe::Fuse));
        assert_eq!(lazy_serve(Auto, Backend::Loop, &k6_1), Ok(LazyServe::Fuse));
        let why = lazy_serve(Fanotify, Backend::File, &k6_12).unwrap_err();
        assert!(why.contains("pre-content"), "{why}");
        let why = lazy_serve(Fanotify, Backend::Loop, &all).unwrap_err();
        assert!(why.contains("loop devices"), "{why}");
        let why = lazy_serve(Auto, Backend::File, &no_fuse).unwrap_err();
        assert!(why.contains("fetched whole"), "{why}");
        let why = lazy_serve(Fuse, Backend::File, &no_fuse).unwrap_err();
        assert!(why.contains("/dev/fuse"), "{why}");
    }
}
