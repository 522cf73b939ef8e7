//! Learned seccomp profiles: syscall names through libseccomp ([`names`]),
//! the OCI profile built from what a workload was seen to call and
//! compiled before use ([`profile`]), what was learned per workload, kept
//! on disk ([`store`]), the decision at a container's creation
//! ([`decide`]), the reports of syscalls outside a profile read from the
//! kernel's audit log ([`audit`]), and the per-container runs that tie
//! them together ([`runs`]).

pub mod audit;
pub mod decide;
pub mod names;
pub mod nri;
pub mod profile;
pub mod runs;
pub mod store;
