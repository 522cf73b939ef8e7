//! Which containerd shim runs the harness's containers.
//!
//! Every test that starts containers runs with containerd's own
//! `io.containerd.runc.v2` by default and with hyperbox's shim
//! (`io.containerd.hyperbox.v1`) when `HYPERBOX_TEST_SHIM=hyperbox`:
//! containers created through the API get that runtime, and CRI's default
//! runtime handler becomes `hyperbox`. `scripts/test.sh` runs the suites
//! that start containers in both ways.

use std::path::PathBuf;

/// The variable that picks the shim.
pub const SHIM_ENV: &str = "HYPERBOX_TEST_SHIM";
/// hyperbox's runtime type.
pub const HYPERBOX_RUNTIME: &str = "io.containerd.hyperbox.v1";
/// The CRI runtime handler the harness configures for it.
pub const HYPERBOX_HANDLER: &str = "hyperbox";
/// The shim's binary.
pub const HYPERBOX_SHIM_BINARY: &str = "containerd-shim-hyperbox-v1";

/// A shim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shim {
    /// containerd's `containerd-shim-runc-v2`.
    RuncV2,
    /// `containerd-shim-hyperbox-v1`.
    Hyperbox,
}

impl Shim {
    /// The shim `HYPERBOX_TEST_SHIM` selects (`runc`, the default, or
    /// `hyperbox`); panics on anything else, so a typo never silently
    /// tests the other shim.
    pub fn selected() -> Shim {
        match std::env::var(SHIM_ENV).as_deref() {
            Err(_) | Ok("") | Ok("runc") | Ok("runc-v2") => Shim::RuncV2,
            Ok("hyperbox") => Shim::Hyperbox,
            Ok(other) => panic!("{SHIM_ENV}={other:?}: expected runc or hyperbox"),
        }
    }

    /// Its runtime type, for containers created through the API.
    pub fn runtime_type(self) -> &'static str {
        match self {
            Shim::RuncV2 => crate::client::RUNC_RUNTIME,
            Shim::Hyperbox => HYPERBOX_RUNTIME,
        }
    }

    /// Its CRI runtime handler.
    pub fn handler(self) -> &'static str {
        match self {
            Shim::RuncV2 => "runc",
            Shim::Hyperbox => HYPERBOX_HANDLER,
        }
    }
}

impl std::fmt::Display for Shim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Shim::RuncV2 => "containerd-shim-runc-v2",
            Shim::Hyperbox => HYPERBOX_SHIM_BINARY,
        })
    }
}

/// The directory holding the freshly built hyperbox shim, for containerd's
/// `PATH` (containerd finds `io.containerd.hyperbox.v1` as
/// `containerd-shim-hyperbox-v1` there, as on a node). It is the node
/// build (`cargo build-shim`), so the tests run what nodes run.
pub fn hyperbox_shim_dir() -> PathBuf {
    let bin = crate::binaries::shim_for_nodes(HYPERBOX_SHIM_BINARY);
    bin.parent()
        .expect("a binary has a directory")
        .to_path_buf()
}
