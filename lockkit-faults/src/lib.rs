//! The fault matrix of lockkit: worker processes that use only the public API, a TCP fault
//! proxy, a seeded fault driver and the checkers over their logs (see the README's "Fault
//! matrix" and `scripts/faults`).

pub mod check;
pub mod driver;
pub mod event;
pub mod matrix;
pub mod proxy;
pub mod register;
pub mod worker;
