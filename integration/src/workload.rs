//! Workload programs for tests and benchmarks that busybox cannot play:
//! `workloads/syscalls.c` (a getpid/read/write loop, small-file copies, a
//! burst of opens), built static with the host's gcc once per process and
//! bind-mounted into busybox containers, which have no libc to link
//! against.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

static SYSCALLS: OnceLock<PathBuf> = OnceLock::new();

/// The static `syscalls` binary (`syscalls loop|copy|opens N`).
pub fn syscalls_binary() -> PathBuf {
    SYSCALLS
        .get_or_init(|| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads/syscalls.c");
            // A build product: kept beside the binaries in the target dir.
            let exe = std::env::current_exe().expect("test executable path");
            let dir = exe
                .parent()
                .and_then(|deps| deps.parent())
                .expect("target/<profile> directory")
                .join("workloads");
            std::fs::create_dir_all(&dir).expect("workload dir");
            // Built under a private name, then renamed: test processes
            // running in parallel each build it, and none sees it half
            // written.
            let tmp = dir.join(format!("syscalls.{}", std::process::id()));
            let status = Command::new("gcc")
                .args(["-static", "-O2", "-Wall", "-Werror", "-o"])
                .arg(&tmp)
                .arg(&src)
                .status()
                .expect("run gcc (install gcc and libc6-dev)");
            assert!(status.success(), "gcc failed on {}", src.display());
            let out = dir.join("syscalls");
            std::fs::rename(&tmp, &out).expect("install the workload binary");
            out
        })
        .clone()
}
