#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod error;
mod lease;
mod lock;
mod options;
mod renewals;
mod scripts;
mod subscriptions;

pub use lock::RedisLock;
pub use options::RedisOptions;
