//! The SQLite backend: a lease table in one database file.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use lockkit_core::backend::{
    run_detached, Acquired, Backend, Capabilities, Connect, FencingToken, Lease, LockName,
    LockOptions,
};
use lockkit_core::{Error, LostReason, Result};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::time::Instant;

use crate::wait::{self, millis, wake_slots, WakeSlots, CLOCK_MARGIN};

const BACKEND: &str = "sqlite";

/// The schema: the lease table, the fence counter, and the triggers that keep the counter at
/// the highest token ever handed out, so tokens never go back, even when rows are deleted.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS lockkit_locks (
    name TEXT PRIMARY KEY NOT NULL,
    owner TEXT NOT NULL,
    token INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lockkit_fence (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO lockkit_fence (id, value) VALUES (1, 0);
CREATE TRIGGER IF NOT EXISTS lockkit_fence_insert AFTER INSERT ON lockkit_locks
BEGIN
    UPDATE lockkit_fence SET value = NEW.token WHERE id = 1 AND value < NEW.token;
END;
CREATE TRIGGER IF NOT EXISTS lockkit_fence_update AFTER UPDATE OF token ON lockkit_locks
BEGIN
    UPDATE lockkit_fence SET value = NEW.token WHERE id = 1 AND value < NEW.token;
END;
";

/// Takes the lock if it is free or its lease has expired, in one statement; the new token is
/// one above the fence counter. A lease stored as ending at millisecond `e` is held through
/// all of `e` (taken over only once `now > e`), so it never ends before the holder's
/// `valid_until`, which is measured from before the statement.
const ACQUIRE: &str = "
INSERT INTO lockkit_locks (name, owner, token, expires_at)
VALUES (?1, ?2, (SELECT value + 1 FROM lockkit_fence WHERE id = 1), ?3 + ?4)
ON CONFLICT (name) DO UPDATE
    SET owner = excluded.owner, token = excluded.token, expires_at = excluded.expires_at
    WHERE lockkit_locks.expires_at < ?3
RETURNING token";

const EXTEND: &str = "
UPDATE lockkit_locks SET expires_at = ?3 + ?4
WHERE name = ?1 AND owner = ?2 AND expires_at >= ?3";

const RELEASE: &str =
    "DELETE FROM lockkit_locks WHERE name = ?1 AND owner = ?2 RETURNING expires_at";

const EXPIRY: &str = "SELECT expires_at FROM lockkit_locks WHERE name = ?1";

/// Tuning of the SQLite backend.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SqliteOptions {
    /// How long a statement waits for another connection's write lock (SQLite's busy
    /// timeout). Default 5 s.
    pub busy_timeout: Duration,
    /// Connections in the pool. Default 4 (1 for in-memory databases).
    pub max_connections: u32,
    /// `PRAGMA synchronous=FULL` (the default) makes every acquisition durable across power
    /// loss, so a fencing token is never handed out twice; `false` uses `NORMAL`, faster
    /// but a power cut may lose the last acquisitions.
    pub durable: bool,
    /// Longest pause between re-checks while waiting for a lock held by another process
    /// (waiters in this process are woken on release at once). Default 100 ms.
    pub max_poll: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            busy_timeout: Duration::from_secs(5),
            max_connections: 4,
            durable: true,
            max_poll: Duration::from_millis(100),
        }
    }
}

/// A lock service on one SQLite database file.
///
/// Every process that opens the same file shares the locks. The file holds a lease table
/// (`lockkit_locks`: name, owner, token, expiry) changed only by single atomic statements,
/// and a fence counter that only grows. WAL mode and a busy timeout let many processes use
/// it at once. Waiters in this process wake as soon as a lock is released; waiters in other
/// processes re-check with a jittered backoff up to [`SqliteOptions::max_poll`] (SQLite has
/// no cross-process notification).
///
/// URLs: `sqlite://path/to/file.db`, `sqlite:relative.db`, `sqlite::memory:` (one database
/// per client, for tests).
#[derive(Debug, Clone)]
pub struct SqliteLock {
    pool: SqlitePool,
    wake: Arc<WakeSlots>,
    max_poll: Duration,
}

impl SqliteLock {
    /// Opens (creating if needed) the database at `url` with default options.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, SqliteOptions::default()).await
    }

    /// Opens (creating if needed) the database at `url`.
    pub async fn connect_with(url: &str, options: SqliteOptions) -> Result<Self> {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::InvalidOptions(format!("bad SQLite URL `{url}`: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(options.busy_timeout)
            .synchronous(if options.durable {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            });
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let mut pool = SqlitePoolOptions::new()
            .max_connections(if in_memory {
                1
            } else {
                options.max_connections
            })
            .acquire_timeout(options.busy_timeout);
        if in_memory {
            // The database lives as long as one connection stays open.
            pool = pool
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
        }
        let path = connect.get_filename().to_path_buf();
        let pool = pool.connect_with(connect).await.map_err(map_err)?;
        // Canonical once the file exists, so every client of one file shares wake-ups.
        let file = (!in_memory).then(|| {
            let file = std::fs::canonicalize(&path).unwrap_or(path);
            format!("sqlite:{}", file.display())
        });
        let lock = SqliteLock {
            pool,
            wake: wake_slots(file),
            max_poll: options.max_poll.max(Duration::from_millis(1)),
        };
        lock.migrate().await?;
        Ok(lock)
    }

    /// Creates the lock table, the fence counter and its triggers if they are missing.
    /// [`SqliteLock::connect`] runs it; it is idempotent and safe from many processes.
    pub async fn migrate(&self) -> Result<()> {
        sqlx::raw_sql(SCHEMA)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    /// One acquisition attempt, run to completion even if the caller goes away.
    async fn attempt(&self, name: &LockName, ttl: Duration) -> Result<Option<Acquired>> {
        let lease = SqliteLease {
            pool: self.pool.clone(),
            name: name.clone(),
            owner: uuid::Uuid::new_v4().simple().to_string(),
            wake: self.wake.clone(),
        };
        run_detached(async move {
            let started = Instant::now();
            let token: Option<i64> = sqlx::query_scalar(ACQUIRE)
                .bind(lease.name.as_str())
                .bind(&lease.owner)
                .bind(now_ms())
                .bind(millis(ttl))
                .fetch_optional(&lease.pool)
                .await
                .map_err(map_err)?;
            Ok(token.map(|token| {
                Acquired::new(
                    FencingToken(token as u64),
                    started + ttl - CLOCK_MARGIN,
                    Box::new(lease) as Box<dyn Lease>,
                )
            }))
        })
        .await
    }

    /// How long until the current holder's lease runs out, if the lock is held.
    async fn time_left(&self, name: &LockName) -> Result<Option<Duration>> {
        let expires: Option<i64> = sqlx::query_scalar(EXPIRY)
            .bind(name.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(expires.map(|at| Duration::from_millis((at - now_ms()).max(0) as u64)))
    }
}

#[async_trait]
impl Backend for SqliteLock {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(Duration::from_millis(100))
            .fencing(true)
            .lease_expiry(true)
            .renewal(true)
    }

    async fn try_lock(&self, name: &LockName, opts: &LockOptions) -> Result<Option<Acquired>> {
        self.attempt(name, opts.ttl).await
    }

    async fn lock(
        &self,
        name: &LockName,
        opts: &LockOptions,
        _deadline: Option<Instant>,
    ) -> Result<Acquired> {
        wait::until_acquired(self.wake.slot(name), self.max_poll, || async {
            match self.attempt(name, opts.ttl).await? {
                Some(acquired) => Ok(Ok(acquired)),
                None => Ok(Err(self.time_left(name).await?)),
            }
        })
        .await
    }
}

#[derive(Debug)]
struct SqliteLease {
    pool: SqlitePool,
    name: LockName,
    owner: String,
    wake: Arc<WakeSlots>,
}

#[async_trait]
impl Lease for SqliteLease {
    async fn extend(&self, ttl: Duration) -> Result<Instant> {
        let started = Instant::now();
        let done = sqlx::query(EXTEND)
            .bind(self.name.as_str())
            .bind(&self.owner)
            .bind(now_ms())
            .bind(millis(ttl))
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        if done.rows_affected() == 0 {
            return Err(Error::lost(self.name.as_str(), LostReason::NotOwner));
        }
        Ok(started + ttl - CLOCK_MARGIN)
    }

    async fn release(&self) -> Result<()> {
        let expired_at: Option<i64> = sqlx::query_scalar(RELEASE)
            .bind(self.name.as_str())
            .bind(&self.owner)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        match expired_at {
            None => Err(Error::lost(self.name.as_str(), LostReason::NotOwner)),
            Some(at) => {
                self.wake.slot(&self.name).notify_waiters();
                if at < now_ms() {
                    // Ours, but past its lease: another process may have taken it meanwhile.
                    Err(Error::lost(self.name.as_str(), LostReason::Expired))
                } else {
                    Ok(())
                }
            }
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Sorts sqlx errors into connection errors (retryable) and backend errors.
fn map_err(e: sqlx::Error) -> Error {
    let connection = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // BUSY, LOCKED, IOERR, CANTOPEN (and their extended codes).
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 14)),
        _ => false,
    };
    if connection {
        Error::connection(BACKEND, e)
    } else {
        Error::backend(BACKEND, e)
    }
}

impl Connect for SqliteLock {
    const SCHEMES: &'static [&'static str] = &["sqlite"];

    async fn connect(url: &str) -> Result<Self> {
        SqliteLock::connect(url).await
    }
}
