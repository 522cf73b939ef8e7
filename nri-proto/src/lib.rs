//! `hyperbox-nri-proto`: the NRI protocol in Rust, from the wire up.
//!
//! - [`mux`]: NRI's multiplexed unix socket (8-byte frame header: big-endian
//!   connection id, length; id 1 the plugin's service, id 2 the runtime's).
//! - [`ttrpc`]: ttrpc messages inside the frames.
//! - [`session`]: serving and calling over one muxed connection.
//! - [`api`]: NRI's messages (v0.6.1 as containerd 1.7 speaks it, with the
//!   newer dedicated events), as prost structs.
//! - [`plugin`]: the plugin's life cycle (register, configure, synchronize,
//!   dispatch to [`plugin::Events`], reconnect), external or pre-registered.
//!
//! Written by hand because no Rust NRI crate exists; the facts (field
//! numbers, event bits, framing) come from NRI's API definition. A daemon
//! (the node agent) implements [`plugin::Events`] and never sees a frame.

#![deny(missing_docs)]

pub mod api;
pub mod mux;
pub mod plugin;
pub mod session;
pub mod ttrpc;
