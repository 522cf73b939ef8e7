//! The PSI-driven memory policy: the arithmetic ([`policy`]), what was
//! learned per workload ([`store`]), the changes a tick makes, decided
//! from a snapshot ([`decide`]) and carried out ([`apply`]), and the loop
//! that samples and drives them ([`controller`]).

pub mod apply;
pub mod controller;
pub mod decide;
pub mod policy;
pub mod store;
