//! MySQL and MariaDB: `GET_LOCK` (default) or the lease table.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lockkit_core::backend::{
    run_detached, Acquired, Backend, Capabilities, Connect, FencingToken, Lease, LockName,
    LockOptions,
};
use lockkit_core::{Error, LostReason, Result};
use sha2::{Digest, Sha256};
use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError, MySqlPool, MySqlPoolOptions};
use sqlx::pool::PoolConnection;
use sqlx::MySql;
use tokio::time::Instant;

use crate::options::{SqlOptions, Strategy};
use crate::wait::{self, millis, WakeSlots, CLOCK_MARGIN};

const BACKEND: &str = "mysql";

/// The server's clock in milliseconds since the epoch.
const NOW_MS: &str = "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)";

/// A lock service on MySQL or MariaDB.
///
/// **Advisory** (the default, `?strategy=advisory`): `GET_LOCK` on a connection held for the
/// guard's life. `GET_LOCK` names are limited to 64 characters and compared without regard
/// to case on some servers, so every lock name is mapped to `lockkit_` followed by 56
/// lowercase hex digits of the SHA-256 of the table prefix and the name: 224 bits, so two
/// names never meet in practice, whatever their length, case or trailing spaces. Waiting
/// blocks on the server (`GET_LOCK(name, timeout)` in slices of at most
/// [`SqlOptions::wait_slice`], each run to completion and undone if its caller went away), so
/// a release hands the lock over at once. Renewal checks `IS_USED_LOCK(name) =
/// CONNECTION_ID()` on the held connection; a dead connection means the lock is gone.
///
/// **Table** (`?strategy=table`): the lease-row strategy, on the server's clock, with names
/// stored as `VARBINARY(255)` (compared byte for byte). MySQL has no notifications: waiters
/// in this process wake on release, others re-check with a jittered backoff (at most 100 ms).
///
/// Both take fencing tokens from a per-name counter row (`<prefix>fences`) incremented in its
/// own committed statement right after the lock is taken.
#[derive(Debug, Clone)]
pub struct MySqlLock {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: MySqlPool,
    options: SqlOptions,
    sql: Statements,
    wake: Arc<WakeSlots>,
}

#[derive(Debug)]
struct Statements {
    schema: [String; 2],
    fence: String,
    insert: String,
    take_over: String,
    time_left: String,
    extend: String,
    release_in_time: String,
    release_late: String,
}

impl Statements {
    fn new(p: &str) -> Self {
        Statements {
            schema: [
                format!(
                    "CREATE TABLE IF NOT EXISTS {p}fences (name VARBINARY(255) PRIMARY KEY,
                     value BIGINT NOT NULL) ENGINE=InnoDB"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {p}locks (name VARBINARY(255) PRIMARY KEY,
                     owner CHAR(32) NOT NULL, expires_at BIGINT NOT NULL) ENGINE=InnoDB"
                ),
            ],
            fence: format!(
                "INSERT INTO {p}fences (name, value) VALUES (?, LAST_INSERT_ID(1))
                 ON DUPLICATE KEY UPDATE value = LAST_INSERT_ID(value + 1)"
            ),
            insert: format!(
                "INSERT IGNORE INTO {p}locks (name, owner, expires_at) VALUES (?, ?, {NOW_MS} + ?)"
            ),
            take_over: format!(
                "UPDATE {p}locks SET owner = ?, expires_at = {NOW_MS} + ?
                 WHERE name = ? AND expires_at < {NOW_MS}"
            ),
            time_left: format!("SELECT expires_at - {NOW_MS} FROM {p}locks WHERE name = ?"),
            extend: format!(
                "UPDATE {p}locks SET expires_at = {NOW_MS} + ?
                 WHERE name = ? AND owner = ? AND expires_at >= {NOW_MS}"
            ),
            release_in_time: format!(
                "DELETE FROM {p}locks WHERE name = ? AND owner = ? AND expires_at >= {NOW_MS}"
            ),
            release_late: format!("DELETE FROM {p}locks WHERE name = ? AND owner = ?"),
        }
    }
}

impl MySqlLock {
    /// Connects with default options to `mysql://user:password@host:port/db`
    /// (`?strategy=advisory|table`, `?table_prefix=`).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, SqlOptions::default()).await
    }

    /// Connects with `options` (URL parameters override them). Creates the tables unless
    /// [`SqlOptions::auto_migrate`] is off.
    pub async fn connect_with(url: &str, mut options: SqlOptions) -> Result<Self> {
        let url = options.apply_url(url)?;
        options.check()?;
        let connect = MySqlConnectOptions::from_str(&url)
            .map_err(|e| Error::InvalidOptions(format!("bad MySQL URL: {e}")))?;
        let database = format!(
            "mysql:{}:{}/{}:{}",
            connect.get_host(),
            connect.get_port(),
            connect.get_database().unwrap_or_default(),
            options.table_prefix
        );
        let pool = MySqlPoolOptions::new()
            // Fewer gap locks between concurrent lease-row statements.
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        .execute(conn)
                        .await
                        .map(drop)
                })
            })
            .max_connections(options.pool_size())
            .acquire_timeout(options.acquire_timeout)
            .idle_timeout(Some(Duration::from_secs(60)))
            // No ping before every use: a broken connection fails its statement, which
            // counts as a retryable connection error.
            .test_before_acquire(false)
            .connect_with(connect)
            .await
            .map_err(map_err)?;
        let lock = MySqlLock {
            inner: Arc::new(Inner {
                pool,
                sql: Statements::new(&options.table_prefix),
                options,
                wake: wait::wake_slots(Some(database)),
            }),
        };
        if lock.inner.options.auto_migrate {
            lock.migrate().await?;
        }
        Ok(lock)
    }

    /// Creates lockkit's tables if they are missing. Idempotent.
    pub async fn migrate(&self) -> Result<()> {
        for statement in &self.inner.sql.schema {
            sqlx::query(statement)
                .execute(&self.inner.pool)
                .await
                .map_err(map_err)?;
        }
        Ok(())
    }

    /// The `GET_LOCK` name that stands for `name`.
    pub fn lock_name(&self, name: &LockName) -> String {
        self.inner.lock_name(name)
    }
}

impl Inner {
    fn lock_name(&self, name: &LockName) -> String {
        let mut hash = Sha256::new();
        hash.update(self.options.table_prefix.as_bytes());
        hash.update([0]);
        hash.update(name.as_str().as_bytes());
        let digest = hash.finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("lockkit_{}", &hex[..56])
    }

    async fn fence(&self, conn: &mut PoolConnection<MySql>, name: &LockName) -> Result<u64> {
        let done = sqlx::query(&self.sql.fence)
            .bind(name.as_str().as_bytes())
            .execute(&mut **conn)
            .await
            .map_err(map_err)?;
        Ok(done.last_insert_id())
    }

    /// One advisory attempt: `GET_LOCK` with a timeout of zero (a try) or `slice`.
    async fn advisory(
        self: Arc<Self>,
        name: LockName,
        ttl: Duration,
        slice: Duration,
    ) -> Result<Option<Acquired>> {
        let lock_name = self.lock_name(&name);
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        let started = Instant::now();
        let got: std::result::Result<Option<i64>, _> = sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
            .bind(&lock_name)
            .bind(slice.as_secs_f64())
            .fetch_one(&mut *conn)
            .await;
        match got {
            Ok(Some(1)) => {}
            Ok(Some(_)) => return Ok(None),
            Ok(None) => {
                conn.close_on_drop();
                return Err(Error::backend(BACKEND, "GET_LOCK failed"));
            }
            Err(e) => {
                // Whatever the session holds goes with it.
                conn.close_on_drop();
                return Err(map_err(e));
            }
        }
        match self.fence(&mut conn, &name).await {
            Ok(token) => {
                let lease = AdvisoryLease {
                    name,
                    lock_name,
                    conn: tokio::sync::Mutex::new(Some(conn)),
                };
                Ok(Some(Acquired::new(
                    FencingToken(token),
                    started + ttl - CLOCK_MARGIN,
                    Box::new(lease),
                )))
            }
            Err(e) => {
                conn.close_on_drop();
                Err(e)
            }
        }
    }

    /// One lease-table attempt. InnoDB may pick it as a deadlock victim against another
    /// client's statement on the same row: it changed nothing then, and counts as busy.
    async fn table(self: Arc<Self>, name: LockName, ttl: Duration) -> Result<Option<Acquired>> {
        match self.table_once(name, ttl).await {
            Err(Error::Backend { source, .. }) if is_deadlock(source.as_ref()) => Ok(None),
            other => other,
        }
    }

    async fn table_once(
        self: Arc<Self>,
        name: LockName,
        ttl: Duration,
    ) -> Result<Option<Acquired>> {
        let owner = uuid::Uuid::new_v4().simple().to_string();
        let key = name.as_str().as_bytes();
        let started = Instant::now();
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        let inserted = sqlx::query(&self.sql.insert)
            .bind(key)
            .bind(&owner)
            .bind(millis(ttl))
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        let taken = inserted.rows_affected() == 1
            || sqlx::query(&self.sql.take_over)
                .bind(&owner)
                .bind(millis(ttl))
                .bind(key)
                .execute(&mut *conn)
                .await
                .map_err(map_err)?
                .rows_affected()
                == 1;
        if !taken {
            return Ok(None);
        }
        let lease = TableLease {
            inner: self.clone(),
            name: name.clone(),
            owner,
        };
        match self.fence(&mut conn, &name).await {
            Ok(token) => Ok(Some(Acquired::new(
                FencingToken(token),
                started + ttl - CLOCK_MARGIN,
                Box::new(lease),
            ))),
            Err(e) => {
                drop(conn);
                let _ = lease.release().await;
                Err(e)
            }
        }
    }

    async fn time_left(&self, name: &LockName) -> Result<Option<Duration>> {
        let left: Option<i64> = sqlx::query_scalar(&self.sql.time_left)
            .bind(name.as_str().as_bytes())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(left.map(|ms| Duration::from_millis(ms.max(0) as u64)))
    }
}

#[async_trait]
impl Backend for MySqlLock {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(Duration::from_millis(100))
            .fencing(true)
            .lease_expiry(true)
            .renewal(true)
            .networked(true)
    }

    async fn try_lock(&self, name: &LockName, opts: &LockOptions) -> Result<Option<Acquired>> {
        let inner = self.inner.clone();
        match inner.options.strategy {
            Strategy::Advisory => {
                run_detached(inner.advisory(name.clone(), opts.ttl, Duration::ZERO)).await
            }
            Strategy::Table => run_detached(inner.table(name.clone(), opts.ttl)).await,
        }
    }

    async fn lock(
        &self,
        name: &LockName,
        opts: &LockOptions,
        deadline: Option<Instant>,
    ) -> Result<Acquired> {
        let inner = &self.inner;
        match inner.options.strategy {
            Strategy::Advisory => loop {
                let slice = wait::next_slice(deadline, inner.options.wait_slice);
                let attempt = inner.clone().advisory(name.clone(), opts.ttl, slice);
                if let Some(acquired) = run_detached(attempt).await? {
                    return Ok(acquired);
                }
            },
            Strategy::Table => {
                let max_poll = inner.options.max_poll.unwrap_or(Duration::from_millis(100));
                wait::until_acquired(inner.wake.slot(name), max_poll, || async {
                    let attempt = inner.clone().table(name.clone(), opts.ttl);
                    match run_detached(attempt).await? {
                        Some(acquired) => Ok(Ok(acquired)),
                        None => Ok(Err(inner.time_left(name).await?)),
                    }
                })
                .await
            }
        }
    }
}

/// A `GET_LOCK` lock, held by the session of `conn`.
#[derive(Debug)]
struct AdvisoryLease {
    name: LockName,
    lock_name: String,
    conn: tokio::sync::Mutex<Option<PoolConnection<MySql>>>,
}

impl AdvisoryLease {
    fn gone(&self, e: &Error) -> Error {
        Error::lost(self.name.as_str(), LostReason::SessionLost(e.to_string()))
    }
}

#[async_trait]
impl Lease for AdvisoryLease {
    async fn extend(&self, ttl: Duration) -> Result<Instant> {
        let started = Instant::now();
        let mut slot = self.conn.lock().await;
        let Some(conn) = slot.as_mut() else {
            return Err(Error::lost(self.name.as_str(), LostReason::NotOwner));
        };
        let held: std::result::Result<Option<i64>, _> =
            sqlx::query_scalar("SELECT IS_USED_LOCK(?) = CONNECTION_ID()")
                .bind(&self.lock_name)
                .fetch_one(&mut **conn)
                .await;
        match held {
            Ok(Some(1)) => Ok(started + ttl - CLOCK_MARGIN),
            Ok(_) => Err(Error::lost(self.name.as_str(), LostReason::NotOwner)),
            Err(e) => {
                let e = map_err(e);
                if let Some(mut conn) = slot.take() {
                    conn.close_on_drop();
                }
                Err(self.gone(&e))
            }
        }
    }

    async fn release(&self) -> Result<()> {
        let Some(mut conn) = self.conn.lock().await.take() else {
            return Err(Error::lost(self.name.as_str(), LostReason::NotOwner));
        };
        let released: std::result::Result<Option<i64>, _> =
            sqlx::query_scalar("SELECT RELEASE_LOCK(?)")
                .bind(&self.lock_name)
                .fetch_one(&mut *conn)
                .await;
        match released {
            Ok(Some(1)) => Ok(()),
            Ok(_) => {
                conn.close_on_drop();
                Err(Error::lost(self.name.as_str(), LostReason::NotOwner))
            }
            Err(e) => {
                conn.close_on_drop();
                Err(self.gone(&map_err(e)))
            }
        }
    }
}

/// A lease row.
#[derive(Debug)]
struct TableLease {
    inner: Arc<Inner>,
    name: LockName,
    owner: String,
}

#[async_trait]
impl Lease for TableLease {
    async fn extend(&self, ttl: Duration) -> Result<Instant> {
        let started = Instant::now();
        let done = retry_deadlocks(|| {
            sqlx::query(&self.inner.sql.extend)
                .bind(millis(ttl))
                .bind(self.name.as_str().as_bytes())
                .bind(&self.owner)
                .execute(&self.inner.pool)
        })
        .await?;
        if done.rows_affected() == 0 {
            return Err(Error::lost(self.name.as_str(), LostReason::NotOwner));
        }
        Ok(started + ttl - CLOCK_MARGIN)
    }

    async fn release(&self) -> Result<()> {
        let sql = &self.inner.sql;
        let mut expired = false;
        for statement in [&sql.release_in_time, &sql.release_late] {
            let done = retry_deadlocks(|| {
                sqlx::query(statement)
                    .bind(self.name.as_str().as_bytes())
                    .bind(&self.owner)
                    .execute(&self.inner.pool)
            })
            .await?;
            if done.rows_affected() == 1 {
                self.inner.wake.slot(&self.name).notify_waiters();
                return match expired {
                    false => Ok(()),
                    // Ours, but past its lease: another client may have taken it meanwhile.
                    true => Err(Error::lost(self.name.as_str(), LostReason::Expired)),
                };
            }
            expired = true;
        }
        Err(Error::lost(self.name.as_str(), LostReason::NotOwner))
    }
}

/// Runs a statement again when InnoDB chose it as a deadlock victim (it changed nothing).
async fn retry_deadlocks<F, Fut, T>(mut statement: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, sqlx::Error>>,
{
    let mut tries = 0;
    loop {
        match statement().await {
            Err(e) if tries < 10 && is_deadlock(&e) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(fastrand::u64(1..=5 * tries))).await;
            }
            other => return other.map_err(map_err),
        }
    }
}

/// InnoDB deadlock (1213) or lock wait timeout (1205).
fn is_deadlock(e: &(dyn std::error::Error + 'static)) -> bool {
    let Some(sqlx::Error::Database(db)) = e.downcast_ref::<sqlx::Error>() else {
        return false;
    };
    db.try_downcast_ref::<MySqlDatabaseError>()
        .is_some_and(|e| matches!(e.number(), 1205 | 1213))
}

/// Sorts sqlx errors into connection errors (retryable) and backend errors.
fn map_err(e: sqlx::Error) -> Error {
    let connection = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // Too many connections, server shutdown, aborted or killed connections.
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .is_some_and(|e| {
                matches!(
                    e.number(),
                    1040 | 1053 | 1152 | 1153 | 1158..=1161 | 1927 | 2002 | 2003 | 2006 | 2013
                )
            }),
        _ => false,
    };
    if connection {
        Error::connection(BACKEND, e)
    } else {
        Error::backend(BACKEND, e)
    }
}

impl Connect for MySqlLock {
    const SCHEMES: &'static [&'static str] = &["mysql", "mariadb"];

    async fn connect(url: &str) -> Result<Self> {
        MySqlLock::connect(url).await
    }
}
