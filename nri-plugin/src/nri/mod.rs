//! The NRI protocol, from the wire up: [`mux`] frames, [`ttrpc`] messages,
//! a [`session`] serving and calling over them, NRI's [`api`] messages and
//! the [`plugin`] life cycle (register, dispatch, reconnect).

pub mod api;
pub mod mux;
pub mod plugin;
pub mod session;
pub mod ttrpc;
