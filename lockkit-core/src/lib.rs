#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod admin;
pub mod backend;
mod capabilities;
mod election;
mod error;
mod guard;
mod locks;
mod name;
mod nursery;
mod options;
mod semaphore;
pub mod telemetry;
mod token;
pub mod url;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use admin::LockInfo;
pub use capabilities::Capabilities;
pub use election::{Leader, Leadership};
pub use error::{BoxError, Error, LostReason, Result};
pub use guard::LockGuard;
pub use locks::Locks;
pub use name::{LockName, MAX_NAME_LEN};
pub use options::{LockOptions, RetryPolicy, DEFAULT_TTL};
pub use semaphore::{Permit, MAX_PERMITS};
pub use token::FencingToken;
