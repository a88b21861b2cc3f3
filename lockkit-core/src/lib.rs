//! # lockkit-core
//!
//! The backend-independent heart of [lockkit](https://docs.rs/lockkit): the
//! [`DistributedLock`] trait every backend implements, [`LockOptions`], the RAII
//! [`LockGuard`] with its fencing token and lost-lock signal, the one lease keeper that renews
//! leases for every backend, the [`Error`] type, and (feature `conformance`) the conformance
//! suite every backend must pass.
//!
//! Users normally depend on the `lockkit` facade crate; backend authors depend on this one.
//!
//! ## Writing a backend
//! Implement [`DistributedLock::try_lock`] and [`DistributedLock::lock`], returning an
//! [`Acquired`] whose [`Lease`] extends and releases only if the lock is still the owner's.
//! Wrap each request that may take the lock in [`run_detached`] so a cancelled caller never
//! leaves a lock behind, then run the suite with
//! [`conformance_suite!`](crate::conformance_suite) (feature `conformance`).
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod acquire;
mod backend;
mod capabilities;
mod error;
mod guard;
mod name;
mod options;
pub mod telemetry;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use backend::{run_detached, with_lock, Acquired, DistributedLock, FencingToken, Lease};
pub use capabilities::Capabilities;
pub use error::{BoxError, Error, LostReason, Result};
pub use guard::LockGuard;
pub use name::{LockName, MAX_NAME_LEN};
pub use options::{LockOptions, RetryPolicy, DEFAULT_TTL};

/// Re-exported so backends and the conformance macro use the same version.
pub use async_trait::async_trait;
