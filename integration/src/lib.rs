//! The harness behind hyperbox's end-to-end tests and benchmarks.
//!
//! Every test here runs against the real parts a node runs: a private
//! containerd 1.7 or 2.x ([`containerd::Containerd`], the line chosen by
//! `HYPERBOX_CONTAINERD_LINE`, see [`containerd::Line`]) with its own root,
//! state, gRPC socket, NRI socket and cgroup prefix; Debian's docker-registry
//! on a loopback port ([`registry::Registry`]); OCI images built from a
//! description and pushed through the distribution API ([`image`]); a
//! fault-injecting, shaping proxy in
//! front of the registry ([`proxy::FaultProxy`]); and two clients, one for
//! containerd's own API the way `ctr`/nerdctl use it ([`client::Client`]) and
//! one for CRI the way the kubelet uses it ([`cri::Cri`]).
//!
//! Teardown is part of the contract: dropping a [`containerd::Containerd`]
//! (also while a test panics) kills what it started, unmounts what it mounted,
//! removes its cgroups and files, and [`footprint::Footprint::leaks`] checks
//! that nothing is left.
//!
//! Tests need root and the packages that `scripts/install-deps.sh` installs.
//! [`prereq::require`] skips with a printed reason where they are missing, and
//! fails instead when `HYPERBOX_REQUIRE_ALL=1` (CI).

#![deny(missing_docs)]

pub mod agent;
pub mod bench;
pub mod binaries;
pub mod client;
pub mod containerd;
pub mod corpus;
pub mod cri;
pub mod critest;
pub mod ctr;
pub mod digest;
pub mod distro;
pub mod fdstore;
pub mod footprint;
pub mod gobin;
pub mod image;
pub mod lazy;
pub mod mount;
pub mod otlp;
pub mod prereq;
pub mod procs;
pub mod prometheus;
pub mod proxy;
pub mod reads;
pub mod registry;
pub mod shim;
pub mod snapshotter;
pub mod soci;
pub mod testbed;
pub mod token;
pub mod tools;
pub mod vm;
pub mod workload;

/// Installs a `tracing` subscriber for test output once; `RUST_LOG` filters it.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}
