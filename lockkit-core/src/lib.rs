#![doc = include_str!("../README.md")]
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

pub use backend::{
    run_detached, with_lock, Acquired, Attempt, DistributedLock, FencingToken, Lease,
};
pub use capabilities::Capabilities;
pub use error::{BoxError, Error, LostReason, Result};
pub use guard::LockGuard;
pub use name::{LockName, MAX_NAME_LEN};
pub use options::{LockOptions, RetryPolicy, DEFAULT_TTL};

/// Re-exported so backends and the conformance macro use the same version.
pub use async_trait::async_trait;
