#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

#[cfg(feature = "sqlite")]
mod sqlite;
mod wait;
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteLock, SqliteOptions};
