//! Fencing the protected resource: a fence table that makes the caller's own transaction
//! conditional on its fencing token.
//!
//! A lease lock alone does not give exclusion: a holder paused past its lease (a GC pause,
//! `SIGSTOP`, a slow disk) wakes up still acting on the lock while the next holder acts too.
//! The resource must reject the paused holder itself, by its [`FencingToken`]: every
//! operation under the lock, reads included, runs in a transaction that first presents the
//! token to [`SqlFence::check`]. The check records the token as the resource's highest when
//! it is at least the highest seen, and locks the resource's fence row until the
//! transaction ends; a lower token is [`FenceError::Stale`], and the caller rolls the
//! transaction back (dropping it does), so nothing it did is committed.
//!
//! The fence table holds one row per resource: `(resource, token)`, created by
//! [`SqlFence::create`]. It can live in the database of the resource, which is the point: the
//! check and the operation commit together or not at all.

use std::fmt;
use std::marker::PhantomData;

use lockkit_core::FencingToken;
use sqlx::{Acquire, Database};

use crate::dialect::{Bind, Db, Dialect, FenceSql, On};
use crate::options::identifier;

/// The fence table's name unless another is given: `lockkit_resource_fence` (apart from
/// the lock tables' own `<prefix>fence`/`<prefix>fences` token counters, so the lock
/// service and the resource can share one database).
pub const DEFAULT_FENCE_TABLE: &str = "lockkit_resource_fence";

/// The longest resource name, in bytes (MySQL keys it as `VARBINARY(255)`).
pub const MAX_RESOURCE_LEN: usize = 255;

/// The highest token a SQL fence stores: `i64::MAX` (the tables' `BIGINT`). Every backend's
/// tokens stay far below it (Redis's, the largest, are about 2^51).
pub const MAX_SQL_TOKEN: u64 = i64::MAX as u64;

/// The sqlx connection of dialect `D`: `PgConnection`, `MySqlConnection` or
/// `SqliteConnection`. A `sqlx::Transaction` of that database dereferences to it.
pub type Conn<D> = <<D as crate::dialect::hooks::Hooks>::Db as Database>::Connection;

/// Why a fence refused an operation, or could not check it.
#[derive(Debug)]
#[non_exhaustive]
pub enum FenceError {
    /// A newer holder's token was already recorded for `resource`: the presented token is
    /// stale, the holder lost the lock. Roll the transaction back; do not retry with the
    /// same token.
    Stale {
        /// The fenced resource.
        resource: String,
        /// The token that was presented.
        presented: u64,
        /// The highest token recorded for the resource.
        highest: u64,
    },
    /// The token is above what the fence can store (`max`: [`MAX_SQL_TOKEN`]); it is
    /// refused, never wrapped.
    TokenOutOfRange {
        /// The token that was presented.
        token: u64,
        /// The highest token the fence takes.
        max: u64,
    },
    /// The fence table's name is not 1 to 63 ASCII letters, digits and `_` (not starting
    /// with a digit).
    InvalidTable(String),
    /// The resource name is empty, longer than [`MAX_RESOURCE_LEN`] bytes, or holds a NUL.
    InvalidResource {
        /// The resource name, with any NUL shown escaped.
        resource: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The database failed the check. Roll the transaction back; if `retryable` (a lost
    /// connection, a deadlock victim, a lock wait that timed out), the whole transaction may
    /// be run again with the same token.
    Database {
        /// The sqlx error.
        source: sqlx::Error,
        /// Whether running the transaction again may succeed.
        retryable: bool,
    },
}

impl FenceError {
    /// Whether the token was stale: a newer holder got there first.
    pub fn is_stale(&self) -> bool {
        matches!(self, FenceError::Stale { .. })
    }

    /// Whether running the whole transaction again, with the same token, may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            FenceError::Database {
                retryable: true,
                ..
            }
        )
    }
}

impl fmt::Display for FenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FenceError::Stale {
                resource,
                presented,
                highest,
            } => write!(
                f,
                "stale fencing token {presented} for `{resource}`: token {highest} was already \
                 seen (the lock was lost)"
            ),
            FenceError::TokenOutOfRange { token, max } => {
                write!(
                    f,
                    "fencing token {token} is above the fence's limit of {max}"
                )
            }
            FenceError::InvalidTable(table) => write!(
                f,
                "fence table `{table}`: use 1 to 63 ASCII letters, digits and `_`, not \
                 starting with a digit"
            ),
            FenceError::InvalidResource { resource, reason } => {
                write!(f, "fenced resource `{resource}`: {reason}")
            }
            FenceError::Database { source, .. } => write!(f, "fence check failed: {source}"),
        }
    }
}

impl std::error::Error for FenceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FenceError::Database { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Checks a resource name: the same rules on every database.
pub(crate) fn check_resource(resource: &str) -> Result<(), FenceError> {
    let reason = match resource {
        "" => "empty",
        r if r.len() > MAX_RESOURCE_LEN => "longer than 255 bytes",
        r if r.contains('\0') => "holds a NUL character",
        _ => return Ok(()),
    };
    Err(FenceError::InvalidResource {
        resource: resource.escape_default().to_string(),
        reason,
    })
}

/// A fence table on database `D` ([`PgFence`], [`MySqlFence`], [`SqliteFence`]): checks
/// fencing tokens inside the caller's own transaction.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use lockkit_sql::fence::{FenceError, SqliteFence};
/// use lockkit_core::FencingToken;
///
/// let pool = sqlx::SqlitePool::connect("sqlite::memory:").await?;
/// sqlx::query("CREATE TABLE stock (sku TEXT PRIMARY KEY, units INTEGER)")
///     .execute(&pool)
///     .await?;
/// sqlx::query("INSERT INTO stock VALUES ('sku-42', 10)").execute(&pool).await?;
/// let fence = SqliteFence::new();
/// fence.create(&pool).await?;
///
/// // Under the lock, with the guard's token: the check, then the operation, one transaction.
/// let sell = async |token: u64| -> Result<(), Box<dyn std::error::Error>> {
///     let mut tx = pool.begin().await?;
///     fence.check(&mut tx, "stock/sku-42", FencingToken(token)).await?;
///     sqlx::query("UPDATE stock SET units = units - 1 WHERE sku = 'sku-42'")
///         .execute(&mut *tx)
///         .await?;
///     tx.commit().await?;
///     Ok(())
/// };
/// sell(8).await?; // the current holder
/// sell(8).await?; // again: the same holder, accepted
/// // A holder paused past its lease, woken after token 8 was seen: rejected, and its
/// // transaction, dropped, commits nothing.
/// let stale = sell(7).await.unwrap_err();
/// assert!(matches!(
///     stale.downcast_ref::<FenceError>(),
///     Some(FenceError::Stale { presented: 7, highest: 8, .. })
/// ));
/// let units: i64 = sqlx::query_scalar("SELECT units FROM stock").fetch_one(&pool).await?;
/// assert_eq!(units, 8);
/// # Ok(()) }
/// ```
pub struct SqlFence<D: Dialect> {
    table: String,
    sql: FenceSql,
    dialect: PhantomData<fn() -> D>,
}

/// A fence table on PostgreSQL.
#[cfg(feature = "postgres")]
pub type PgFence = SqlFence<crate::dialect::Postgres>;

/// A fence table on MySQL or MariaDB (InnoDB).
#[cfg(feature = "mysql")]
pub type MySqlFence = SqlFence<crate::dialect::MySql>;

/// A fence table on SQLite.
#[cfg(feature = "sqlite")]
pub type SqliteFence = SqlFence<crate::dialect::Sqlite>;

impl<D: Dialect> fmt::Debug for SqlFence<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlFence")
            .field("dialect", &D::NAME)
            .field("table", &self.table)
            .finish()
    }
}

impl<D: Dialect> Clone for SqlFence<D> {
    fn clone(&self) -> Self {
        SqlFence {
            table: self.table.clone(),
            sql: self.sql.clone(),
            dialect: PhantomData,
        }
    }
}

impl<D: Dialect> Default for SqlFence<D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D: Dialect> SqlFence<D> {
    /// The fence table [`DEFAULT_FENCE_TABLE`].
    pub fn new() -> Self {
        Self::build(DEFAULT_FENCE_TABLE.to_string())
    }

    /// The fence table `table`: 1 to 63 ASCII letters, digits and `_`, not starting with a
    /// digit (it is spliced into the SQL, so nothing else is taken; no schema prefix).
    ///
    /// ```
    /// use lockkit_sql::fence::{FenceError, SqliteFence};
    ///
    /// assert_eq!(SqliteFence::with_table("shop_fence")?.table(), "shop_fence");
    /// assert!(matches!(
    ///     SqliteFence::with_table("fence; DROP TABLE stock"),
    ///     Err(FenceError::InvalidTable(_))
    /// ));
    /// # Ok::<(), FenceError>(())
    /// ```
    pub fn with_table(table: &str) -> Result<Self, FenceError> {
        match identifier(table, 63) {
            true => Ok(Self::build(table.to_string())),
            false => Err(FenceError::InvalidTable(table.escape_default().to_string())),
        }
    }

    fn build(table: String) -> Self {
        SqlFence {
            sql: D::fence(&table),
            table,
            dialect: PhantomData,
        }
    }

    /// The fence table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the fence table if it does not exist, on a pool (`&pool`), a connection or a
    /// transaction. Idempotent, and safe to run from many clients at once. On MySQL it is DDL,
    /// which commits any open transaction: run it on the pool.
    pub async fn create<'c, A>(&self, conn: A) -> Result<(), FenceError>
    where
        A: Acquire<'c, Database = D::Db>,
    {
        let mut conn = conn.acquire().await.map_err(database::<D>)?;
        D::Db::script_on(&mut conn, &self.sql.create)
            .await
            .map_err(database::<D>)
    }

    /// Presents `token` for `resource` inside the caller's transaction (`&mut tx`, or any
    /// connection in a transaction): `Ok` if it is at least the highest token recorded for
    /// `resource` (equal: the same holder again), which it becomes; [`FenceError::Stale`] if
    /// lower. Run it first in the transaction, then the operation (reads included), then
    /// commit; on any error roll back (drop the transaction).
    ///
    /// The resource's fence row stays locked until the transaction ends, so transactions
    /// that present tokens for one resource run one at a time, in an order whose tokens
    /// never go down: a stale holder either finished before the newer holder's check, or is
    /// rejected. Outside a transaction the check still records the token, but the
    /// operation after it is not fenced.
    ///
    /// SQLite: the check writes, so a transaction that read before it may get `SQLITE_BUSY`
    /// instead of waiting; check first, or `BEGIN IMMEDIATE`. A token above
    /// [`MAX_SQL_TOKEN`] is [`FenceError::TokenOutOfRange`].
    pub async fn check(
        &self,
        conn: &mut Conn<D>,
        resource: &str,
        token: FencingToken,
    ) -> Result<(), FenceError> {
        let presented = token.get();
        let stored = i64::try_from(presented).map_err(|_| FenceError::TokenOutOfRange {
            token: presented,
            max: MAX_SQL_TOKEN,
        })?;
        check_resource(resource)?;
        let bind = Bind::fence(resource, stored);
        let mut highest = D::Db::run(On::Conn(&mut *conn), &self.sql.record, &bind)
            .await
            .map_err(database::<D>)?;
        if let Some(read) = &self.sql.highest {
            highest = D::Db::run(On::Conn(conn), read, &bind)
                .await
                .map_err(database::<D>)?;
        }
        // The row holds the larger of its token and ours; no row would be a broken table.
        let highest = highest.map_or(u64::MAX, |h| u64::try_from(h).unwrap_or(u64::MAX));
        match highest <= presented {
            true => Ok(()),
            false => Err(FenceError::Stale {
                resource: resource.to_string(),
                presented,
                highest,
            }),
        }
    }
}

/// A database error of dialect `D`, with whether the transaction may be run again.
fn database<D: Dialect>(source: sqlx::Error) -> FenceError {
    let retryable = crate::error::is_connection::<D>(&source)
        || matches!(&source, sqlx::Error::Database(db) if D::lost_race(db.as_ref()));
    FenceError::Database { source, retryable }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_are_checked() {
        assert!(check_resource("stock/sku-42").is_ok());
        assert!(check_resource(&"x".repeat(255)).is_ok());
        for bad in ["", "a\0b", &"x".repeat(256)] {
            assert!(
                matches!(check_resource(bad), Err(FenceError::InvalidResource { .. })),
                "{bad:?}"
            );
        }
    }
}
