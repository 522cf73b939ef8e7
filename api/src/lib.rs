//! `hyperbox-api`: the contracts hyperbox's binaries share, in one place so
//! a change on one side fails to compile on the other instead of showing up
//! as a blank column in `hb`.
//!
//! - [`types`]: the node agent's local API, requests and answers, serialized
//!   by the agent and read by [`client::Client`] (`hb`, the shim).
//! - [`client`]: a typed HTTP/1.1 client of the agent's unix socket, and
//!   [`endpoints`]: its calls by name (`Client::psi`, `Client::explain`…).
//! - [`labels`] and [`annotations`]: the keys containerd, CRI, nerdctl and
//!   hyperbox's components put on snapshots and containers.
//! - [`error`]: one way to print an error with its sources.
//! - [`psi`]: pressure stall information parsed from the kernel's text.
//! - [`time`]: Unix seconds and RFC 3339 stamps as containerd writes them.
//! - [`daemon`]: what every hyperbox daemon does at start (log set-up, a
//!   unix socket bound without stealing a live one).
//!
//! Like containerd/rust-extensions' protocol crates, it holds no policy: the
//! daemons decide, this crate only names and carries.

#![deny(missing_docs)]

pub mod annotations;
pub mod client;
pub mod daemon;
pub mod endpoints;
pub mod error;
pub mod labels;
pub mod psi;
pub mod time;
pub mod types;

pub use client::Client;
pub use error::{ErrorChain, error_chain};
