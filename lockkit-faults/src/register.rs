//! The protected resource: a counter in an SQLite file (embedded, independent of the lock
//! backend under test), read and written only with a fencing token through the public fence
//! helper (`lockkit::sql::SqliteFence`). Every operation is one transaction: the fence check,
//! the read or write, and a line in the `history` table that the checkers read afterwards.
//! With fencing off (the negative control) the check is skipped and everything else is the
//! same.

use std::path::Path;
use std::time::Duration;

use lockkit::sql::{FenceError, SqliteFence};
use lockkit::FencingToken;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

/// The register's one resource name (one lock name per run).
pub const RESOURCE: &str = "register";

/// What an operation on the register came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted; the value read or written.
    Accepted(i64),
    /// Rejected: a higher token was already seen.
    Stale,
}

/// A handle on the register file.
#[derive(Clone)]
pub struct Register {
    pool: SqlitePool,
    fence: Option<SqliteFence>,
}

/// One accepted operation, in the order the register accepted them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Order of acceptance.
    pub seq: i64,
    /// `read` or `write`.
    pub op: String,
    /// The token it carried.
    pub token: u64,
    /// The value read or written.
    pub value: i64,
}

impl Register {
    /// Opens (and creates) the register at `path`; `fenced = false` is the negative control.
    pub async fn open(path: &Path, fenced: bool) -> Result<Register, sqlx::Error> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await?;
        let register = Register {
            pool,
            fence: fenced.then(SqliteFence::new),
        };
        register.setup().await?;
        Ok(register)
    }

    async fn setup(&self) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS register (resource TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS history (seq INTEGER PRIMARY KEY AUTOINCREMENT, \
             op TEXT NOT NULL, token INTEGER NOT NULL, value INTEGER NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT OR IGNORE INTO register (resource, value) VALUES (?1, 0)")
            .bind(RESOURCE)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        SqliteFence::new()
            .create(&self.pool)
            .await
            .map_err(|e| sqlx::Error::Protocol(e.to_string()))
    }

    /// The fence check (when fenced): `Ok(false)` = stale, the transaction must roll back.
    async fn check(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        token: u64,
    ) -> Result<bool, sqlx::Error> {
        let Some(fence) = &self.fence else {
            // Unfenced, the transaction still writes first, as the fence check does: SQLite
            // then waits for the write lock instead of failing a read-then-write upgrade.
            sqlx::query("UPDATE register SET value = value WHERE resource = ?1")
                .bind(RESOURCE)
                .execute(&mut **tx)
                .await?;
            return Ok(true);
        };
        match fence.check(tx, RESOURCE, FencingToken(token)).await {
            Ok(()) => Ok(true),
            Err(FenceError::Stale { .. }) => Ok(false),
            Err(FenceError::Database { source, .. }) => Err(source),
            Err(e) => Err(sqlx::Error::Protocol(e.to_string())),
        }
    }

    /// Reads the value with `token`.
    pub async fn read(&self, token: u64) -> Result<Outcome, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        if !self.check(&mut tx, token).await? {
            tx.rollback().await?;
            return Ok(Outcome::Stale);
        }
        let value: i64 = sqlx::query_scalar("SELECT value FROM register WHERE resource = ?1")
            .bind(RESOURCE)
            .fetch_one(&mut *tx)
            .await?;
        record(&mut tx, "read", token, value).await?;
        tx.commit().await?;
        Ok(Outcome::Accepted(value))
    }

    /// Writes `value` with `token`.
    pub async fn write(&self, token: u64, value: i64) -> Result<Outcome, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        if !self.check(&mut tx, token).await? {
            tx.rollback().await?;
            return Ok(Outcome::Stale);
        }
        sqlx::query("UPDATE register SET value = ?1 WHERE resource = ?2")
            .bind(value)
            .bind(RESOURCE)
            .execute(&mut *tx)
            .await?;
        record(&mut tx, "write", token, value).await?;
        tx.commit().await?;
        Ok(Outcome::Accepted(value))
    }

    /// The final value.
    pub async fn value(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT value FROM register WHERE resource = ?1")
            .bind(RESOURCE)
            .fetch_one(&self.pool)
            .await
    }

    /// Every accepted operation, in acceptance order.
    pub async fn history(&self) -> Result<Vec<Accepted>, sqlx::Error> {
        let rows = sqlx::query("SELECT seq, op, token, value FROM history ORDER BY seq")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| Accepted {
                seq: r.get(0),
                op: r.get(1),
                token: r.get::<i64, _>(2) as u64,
                value: r.get(3),
            })
            .collect())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

async fn record(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    op: &str,
    token: u64,
    value: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO history (op, token, value) VALUES (?1, ?2, ?3)")
        .bind(op)
        .bind(token as i64)
        .bind(value)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
