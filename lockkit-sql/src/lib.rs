#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

#[cfg(feature = "sqlite")]
mod sqlite;
mod wait;

#[cfg(any(feature = "postgres", feature = "mysql"))]
mod options;
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub use options::{SqlOptions, Strategy};

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "postgres")]
pub use postgres::PgLock;

#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "mysql")]
pub use mysql::MySqlLock;
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteLock, SqliteOptions};
