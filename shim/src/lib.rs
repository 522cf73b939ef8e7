//! `containerd-shim-hyperbox-v1`: a containerd shim v2 (runtime type
//! `io.containerd.hyperbox.v1`) that runs containers with runc, as
//! containerd's `io.containerd.runc.v2` does, and applies the hyperbox
//! agent's policies before the workload's first instruction.
//!
//! Built on rust-extensions' `containerd-shim` (process model, ttrpc
//! server, event publisher, reaper) and `runc` (the CLI) crates.

pub mod cgroup;
pub mod events;
pub mod info;
pub mod oom;
pub mod options;
pub mod policy;
pub mod reaper;
pub mod runc_cli;
pub mod service;
pub mod stdio;
pub mod task;
