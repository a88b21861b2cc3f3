#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod admin;
mod error;
mod lease;
mod lock;
mod options;
mod scripts;
mod subscriptions;

pub use lock::RedisLock;
pub use options::RedisOptions;
