//! Pressure stall information: the kernel's files parsed ([`parse`], in
//! `hyperbox-api`), waking on PSI triggers ([`trigger`]) and keeping a
//! rolling history per source ([`history`]).

pub mod history;
pub mod trigger;

// The types and their parser are the local API's: `hb psi` reads what
// the agent parses, and the snapshotter parses the node's I/O pressure too.
pub use hyperbox_api::psi::{ParseError, parse, read};
pub use hyperbox_api::types::{Pressure, PsiLine as Line};
