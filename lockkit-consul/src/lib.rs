#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod admin;
mod error;
mod http;
mod lease;
mod lock;
mod options;
mod queue;
mod shared;
mod watcher;

pub use error::RequestError;
pub use lock::{ConsulLock, MAX_TTL, MIN_TTL};
pub use options::{Behavior, ConsulOptions};

/// The raw Consul client crate this backend is built on, for inspection and benchmarks.
pub use rs_consul;
