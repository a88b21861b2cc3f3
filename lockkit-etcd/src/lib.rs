#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod admin;
mod error;
mod group;
mod lease;
mod lock;
mod options;

/// The raw etcd client crate this backend is built on, for inspection and tests.
pub use etcd_client;

pub use lock::EtcdLock;
pub use options::EtcdOptions;
