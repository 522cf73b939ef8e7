//! `hyperbox-nri`, the node agent: an NRI plugin for containerd that sizes
//! container memory from pressure stall information, with Prometheus
//! metrics and a local API for `hb` and the shim.
//!
//! Rooms: the NRI protocol (`hyperbox-nri-proto`), [`psi`] (pressure files and triggers),
//! [`cgroup`] (where containers' memory lives), [`memory`] (the policy:
//! pure decisions and their applier), [`state`] (what the agent tracks,
//! behind the only locks), [`agent`] (the NRI event handlers), [`trace`]
//! (the eBPF tracer's per-container results), [`otlp`] (their
//! OpenTelemetry export, fed by [`trace`]), [`metrics`] (rendered from a
//! snapshot), [`http`] (the local API, whose types are
//! `hyperbox_api::types`), and [`daemon`] (the life cycle).

#![deny(missing_docs)]

pub mod access;
pub mod agent;
pub mod cgroup;
pub mod daemon;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod otlp;
pub mod prewarm;
pub mod psi;
pub mod seccomp;
pub mod state;
pub mod state_file;
pub mod trace;
