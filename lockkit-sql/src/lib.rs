//! # lockkit-sql
//!
//! SQL backends of lockkit, on [sqlx](https://docs.rs/sqlx).
//!
//! - [`SqliteLock`] (feature `sqlite`, on by default): the embedded default. A lease table in
//!   one SQLite file, shared by every process that opens the file; no server needed.
//! - PostgreSQL and MySQL/MariaDB (features `postgres`, `mysql`) are planned and not yet
//!   available in this version.
//!
//! ```no_run
//! # async fn demo() -> lockkit_core::Result<()> {
//! use lockkit_core::{DistributedLock, LockOptions};
//! use lockkit_sql::SqliteLock;
//!
//! let locks = SqliteLock::connect("sqlite:///tmp/locks.db").await?;
//! let guard = locks.acquire("orders/42", &LockOptions::new()).await?;
//! println!("token {}", guard.fencing_token());
//! guard.release().await?;
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteLock, SqliteOptions};
