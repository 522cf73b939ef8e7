//! `hyperbox-nri`, the node agent: an NRI plugin for containerd that sizes
//! container memory from pressure stall information, with Prometheus
//! metrics and a local API for `hb` and the shim.
//!
//! Rooms: [`nri`] (the protocol), [`psi`] (pressure files and triggers),
//! [`cgroup`] (where containers' memory lives), [`memory`] (the policy),
//! [`agent`] (state and event handlers), [`trace`] (the eBPF tracer's
//! per-container results), [`otlp`] (their OpenTelemetry export),
//! [`metrics`], [`http`], and
//! [`daemon`] (the life cycle).

pub mod agent;
pub mod cgroup;
pub mod daemon;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod nri;
pub mod otlp;
pub mod psi;
pub mod trace;

/// `err: cause: cause` on one line, for logs.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
