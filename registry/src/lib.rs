//! `hyperbox-registry`: the OCI distribution client of the snapshotter's
//! remote path and of `hb image pull`.
//!
//! It reads the same files an operator already keeps for containerd and
//! docker, so a node configured for containerd needs nothing new:
//!
//! - [`hosts`]: containerd's `hosts.toml` directory (mirrors, `server`, `ca`,
//!   `skip_verify`, `header`, `override_path`, capabilities);
//! - [`auth`]: docker's `config.json` credentials, `WWW-Authenticate`
//!   challenges, bearer tokens (anonymous or with credentials) and basic auth;
//! - [`client::Registry`]: manifests and blobs over HTTP or HTTPS with
//!   retries and backoff, resumable downloads (Range), a global limit on
//!   concurrent downloads, and every byte checked against its digest before
//!   a caller may use it;
//! - [`reference`]: image references as containerd normalizes them;
//! - [`index`]: the hyperbox index artifact that makes lazy pulls possible.
//! - [`prefetch`]: learned prefetch lists, kept on a node and shared as an
//!   artifact beside the index.
//!
//! Written on reqwest rather than an OCI client crate: the existing ones
//! (oci-client and friends) know neither hosts.toml nor resumable,
//! file-backed downloads, which are the parts that matter here.

#![deny(missing_docs)]

pub mod auth;
pub mod client;
pub mod digest;
pub mod error;
pub mod hosts;
pub mod index;
pub mod prefetch;
pub mod reference;

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod test_server;

pub use client::{BlobSize, Descriptor, Pace, Registry, Resolved};
pub use error::Error;
pub use reference::Reference;
