#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]
// Without a database feature there is nothing to run the statements on.
#![cfg_attr(
    not(any(feature = "sqlite", feature = "postgres", feature = "mysql")),
    allow(dead_code)
)]

mod admin;
mod advisory;
pub mod dialect;
mod error;
pub mod fence;
mod lease;
mod lock;
mod options;
mod renew;
mod session;
mod table;
mod wait;
mod warm;

pub use fence::{FenceError, SqlFence};
pub use lock::SqlLock;
pub use options::{SqlOptions, SqliteOptions, Strategy};

/// A lock service on PostgreSQL: advisory locks (default) or the lease table.
#[cfg(feature = "postgres")]
pub type PgLock = SqlLock<dialect::Postgres>;

/// A lock service on MySQL or MariaDB: `GET_LOCK` (default) or the lease table.
#[cfg(feature = "mysql")]
pub type MySqlLock = SqlLock<dialect::MySql>;

/// A lock service on one SQLite database file: the lease table.
#[cfg(feature = "sqlite")]
pub type SqliteLock = SqlLock<dialect::Sqlite>;

#[cfg(feature = "mysql")]
pub use fence::MySqlFence;
#[cfg(feature = "postgres")]
pub use fence::PgFence;
#[cfg(feature = "sqlite")]
pub use fence::SqliteFence;
