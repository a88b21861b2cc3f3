#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod admin;
mod error;
mod lease;
mod lock;
mod options;
mod session;

/// The raw ZooKeeper client crate this backend is built on, for inspection and tests.
pub use zookeeper_client;

pub use lock::ZkLock;
pub use options::ZkOptions;
