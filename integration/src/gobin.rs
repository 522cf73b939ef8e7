//! containerd 2.x as the tests run it: `scripts/install-deps.sh` builds
//! `containerd`, `containerd-shim-runc-v2` and `ctr` from the Go module
//! github.com/containerd/containerd/v2 at a pinned release into one directory
//! per module@version under a cache outside the clone (next to cri-tools, see
//! [`crate::tools`]). The pin here is the script's, so a test never runs
//! another release than the one installed.
//!
//! `HYPERBOX_GO_BIN` moves the cache (default `/var/cache/hyperbox/go-bin`).

use std::path::PathBuf;

/// Moves the directory holding the Go-built tools.
pub const ROOT_ENV: &str = "HYPERBOX_GO_BIN";
/// Where the Go-built tools live unless [`ROOT_ENV`] says otherwise.
pub const DEFAULT_ROOT: &str = "/var/cache/hyperbox/go-bin";

/// The containerd 2.x release the tests run (github.com/containerd/containerd/v2).
pub const CONTAINERD_VERSION: &str = "2.4.2";

/// The cache directory holding one directory per module@version
/// (`containerd-v2.4.2`, `cri-tools-v1.37.0`).
pub fn root() -> PathBuf {
    std::env::var_os(ROOT_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
}

/// containerd 2.x's directory: `containerd`, `containerd-shim-runc-v2`, `ctr`.
pub fn containerd_dir() -> PathBuf {
    root().join(format!("containerd-v{CONTAINERD_VERSION}"))
}

/// The containerd 2.x daemon.
pub fn containerd() -> PathBuf {
    containerd_dir().join("containerd")
}

/// containerd 2.x's runc shim; containerd finds it on `PATH`, so the harness
/// puts [`containerd_dir`] first there.
pub fn containerd_shim() -> PathBuf {
    containerd_dir().join("containerd-shim-runc-v2")
}

/// containerd 2.x's `ctr`.
pub fn ctr() -> PathBuf {
    containerd_dir().join("ctr")
}
