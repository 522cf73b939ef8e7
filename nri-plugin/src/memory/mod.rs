//! The PSI-driven memory policy: the arithmetic ([`policy`]), what was
//! learned per workload ([`store`]) and the loop that samples, decides and
//! applies ([`controller`]).

pub mod controller;
pub mod policy;
pub mod store;
