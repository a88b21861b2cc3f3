#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod admin;
mod error;
pub mod fence;
mod lease;
mod lock;
mod options;
mod renewals;
mod scripts;
mod subscriptions;

pub use fence::{FenceError, RedisFence};
pub use lock::RedisLock;
pub use options::RedisOptions;
/// The Redis client crate lockkit uses: its connections run [`RedisFence`]'s operations.
pub use redis;
