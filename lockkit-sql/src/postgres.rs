//! PostgreSQL: session advisory locks (default) or the lease table woken by LISTEN/NOTIFY.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lockkit_core::backend::{
    run_detached, Acquired, Backend, Capabilities, Connect, FencingToken, Lease, LockName,
    LockOptions,
};
use lockkit_core::{Error, LostReason, Result};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::Postgres;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::options::{SqlOptions, Strategy};
use crate::wait::{self, millis, WakeSlots, CLOCK_MARGIN};

const BACKEND: &str = "postgres";

/// The server's clock in milliseconds since the epoch (all clients share it).
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// A lock service on PostgreSQL.
///
/// **Advisory** (the default, `?strategy=advisory`): `pg_try_advisory_lock` /
/// `pg_advisory_lock` on a connection held for the guard's life. Names map to 64-bit keys
/// through a table (`<prefix>advisory_keys`: name → key, the key starting at the name's
/// FNV-1a hash and probing upwards on a collision), so two names never share a key. Waiting
/// blocks on the server (`lock_timeout` slices of at most [`SqlOptions::wait_slice`], each
/// run to completion and undone if its caller went away), so a release hands the lock to the
/// next waiter at once. Renewal is a query on the held connection checking `pg_locks`; a
/// dead connection means the lock is gone and the guard says so.
///
/// **Table** (`?strategy=table`): the lease-row strategy of the SQLite backend, on the
/// server's clock; release sends `NOTIFY <prefix>released` and waiters `LISTEN`, with a
/// bounded fallback re-check.
///
/// Both take fencing tokens from a per-name counter row (`<prefix>fences`) incremented in its
/// own committed statement right after the lock is taken, so a token is never handed out
/// twice, not even a crashed holder's.
#[derive(Debug, Clone)]
pub struct PgLock {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    options: SqlOptions,
    sql: Statements,
    /// Advisory keys already resolved (a name's key never changes).
    keys: Mutex<HashMap<LockName, i64>>,
    wake: Arc<WakeSlots>,
    listener: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.listener.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

/// The statements, with the configured table prefix.
#[derive(Debug)]
struct Statements {
    schema: String,
    fence: String,
    key: String,
    acquire: String,
    time_left: String,
    extend: String,
    release: String,
    channel: String,
}

impl Statements {
    fn new(p: &str) -> Self {
        Statements {
            schema: format!(
                "CREATE TABLE IF NOT EXISTS {p}fences (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
                 CREATE TABLE IF NOT EXISTS {p}advisory_keys (name TEXT PRIMARY KEY, key BIGINT NOT NULL UNIQUE);
                 CREATE TABLE IF NOT EXISTS {p}locks (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at BIGINT NOT NULL);"
            ),
            fence: format!(
                "INSERT INTO {p}fences (name, value) VALUES ($1, 1)
                 ON CONFLICT (name) DO UPDATE SET value = {p}fences.value + 1 RETURNING value"
            ),
            key: format!(
                "WITH ins AS (INSERT INTO {p}advisory_keys (name, key) VALUES ($1, $2)
                              ON CONFLICT DO NOTHING RETURNING key)
                 SELECT key FROM ins UNION ALL
                 SELECT key FROM {p}advisory_keys WHERE name = $1 LIMIT 1"
            ),
            acquire: format!(
                "INSERT INTO {p}locks (name, owner, expires_at) VALUES ($1, $2, {NOW_MS} + $3)
                 ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
                 WHERE {p}locks.expires_at < {NOW_MS}
                 RETURNING 1"
            ),
            time_left: format!("SELECT expires_at - {NOW_MS} FROM {p}locks WHERE name = $1"),
            extend: format!(
                "UPDATE {p}locks SET expires_at = {NOW_MS} + $3
                 WHERE name = $1 AND owner = $2 AND expires_at >= {NOW_MS}"
            ),
            release: format!(
                "WITH d AS (DELETE FROM {p}locks WHERE name = $1 AND owner = $2 RETURNING expires_at)
                 SELECT d.expires_at >= {NOW_MS} FROM d, pg_notify('{p}released', $1)"
            ),
            channel: format!("{p}released"),
        }
    }
}

impl PgLock {
    /// Connects with default options to `postgres://user:password@host:port/db`
    /// (`?strategy=advisory|table`, `?table_prefix=`).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, SqlOptions::default()).await
    }

    /// Connects with `options` (URL parameters override them). Creates the tables unless
    /// [`SqlOptions::auto_migrate`] is off.
    pub async fn connect_with(url: &str, mut options: SqlOptions) -> Result<Self> {
        let url = options.apply_url(url)?;
        options.check()?;
        let connect = PgConnectOptions::from_str(&url)
            .map_err(|e| Error::InvalidOptions(format!("bad PostgreSQL URL: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(options.pool_size())
            .acquire_timeout(options.acquire_timeout)
            .idle_timeout(Some(Duration::from_secs(60)))
            // No ping before every use: a broken connection fails its statement, which
            // counts as a retryable connection error.
            .test_before_acquire(false)
            .connect_with(connect)
            .await
            .map_err(map_err)?;
        let lock = PgLock {
            inner: Arc::new(Inner {
                pool,
                sql: Statements::new(&options.table_prefix),
                options,
                keys: Mutex::default(),
                wake: wait::wake_slots(None),
                listener: Mutex::default(),
            }),
        };
        if lock.inner.options.auto_migrate {
            lock.migrate().await?;
        }
        Ok(lock)
    }

    /// Creates lockkit's tables if they are missing. Idempotent, and safe from many clients
    /// at once (serialized by a transaction-level advisory lock).
    pub async fn migrate(&self) -> Result<()> {
        // One simple query is one implicit transaction: the lock is held to its end.
        let schema = format!(
            "SELECT pg_advisory_xact_lock(hashtext('lockkit migrate')); {}",
            self.inner.sql.schema
        );
        sqlx::raw_sql(&schema)
            .execute(&self.inner.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    /// The advisory-lock key of `name` (for inspecting `pg_locks`), assigning one if the name
    /// has none yet.
    pub async fn advisory_key(&self, name: &LockName) -> Result<i64> {
        self.inner.key_for(name).await
    }
}

impl Inner {
    async fn key_for(&self, name: &LockName) -> Result<i64> {
        if let Some(key) = self
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(*key);
        }
        let mut candidate = name.hash64() as i64;
        for _ in 0..64 {
            let key: Option<i64> = sqlx::query_scalar(&self.sql.key)
                .bind(name.as_str())
                .bind(candidate)
                .fetch_optional(&self.pool)
                .await
                .map_err(map_err)?;
            if let Some(key) = key {
                let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
                keys.insert(name.clone(), key);
                return Ok(key);
            }
            // The candidate belongs to another name (or a concurrent insert of this name
            // is not visible yet): probe the next key.
            candidate = candidate.wrapping_add(1);
        }
        Err(Error::backend(
            BACKEND,
            format!("no free advisory key for `{name}`"),
        ))
    }

    /// Increments the name's fence counter on `conn`, in its own committed statement.
    async fn fence(&self, conn: &mut PoolConnection<Postgres>, name: &LockName) -> Result<i64> {
        sqlx::query_scalar(&self.sql.fence)
            .bind(name.as_str())
            .fetch_one(&mut **conn)
            .await
            .map_err(map_err)
    }

    /// One advisory attempt: a try-lock, or a blocking wait of at most `slice`.
    async fn advisory(
        self: Arc<Self>,
        name: LockName,
        ttl: Duration,
        slice: Option<Duration>,
    ) -> Result<Option<Acquired>> {
        let key = self.key_for(&name).await?;
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        let started = Instant::now();
        let got = match slice {
            None => sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(key)
                .fetch_one(&mut *conn)
                .await
                .map_err(map_err),
            Some(slice) => {
                let timeout = format!("{}ms", slice.as_millis().max(1));
                let set = sqlx::query("SELECT set_config('lock_timeout', $1, false)")
                    .bind(timeout)
                    .execute(&mut *conn)
                    .await;
                match set {
                    Err(e) => Err(map_err(e)),
                    Ok(_) => match sqlx::query("SELECT pg_advisory_lock($1)")
                        .bind(key)
                        .execute(&mut *conn)
                        .await
                    {
                        Ok(_) => Ok(true),
                        Err(e) if is_lock_timeout(&e) => Ok(false),
                        Err(e) => Err(map_err(e)),
                    },
                }
            }
        };
        match got {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(e) => {
                // Whatever the session holds goes with it.
                conn.close_on_drop();
                return Err(e);
            }
        }
        match self.fence(&mut conn, &name).await {
            Ok(token) => {
                let lease = AdvisoryLease {
                    name,
                    key,
                    conn: tokio::sync::Mutex::new(Some(conn)),
                };
                let valid_until = started + ttl - CLOCK_MARGIN;
                Ok(Some(Acquired::new(
                    FencingToken(token as u64),
                    valid_until,
                    Box::new(lease),
                )))
            }
            Err(e) => {
                conn.close_on_drop();
                Err(e)
            }
        }
    }

    /// One lease-table attempt: the lease row, then its token, on one connection.
    async fn table(self: Arc<Self>, name: LockName, ttl: Duration) -> Result<Option<Acquired>> {
        let owner = uuid::Uuid::new_v4().simple().to_string();
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        let started = Instant::now();
        let taken: Option<i32> = sqlx::query_scalar(&self.sql.acquire)
            .bind(name.as_str())
            .bind(&owner)
            .bind(millis(ttl))
            .fetch_optional(&mut *conn)
            .await
            .map_err(map_err)?;
        if taken.is_none() {
            return Ok(None);
        }
        let lease = TableLease {
            inner: self.clone(),
            name: name.clone(),
            owner,
        };
        match self.fence(&mut conn, &name).await {
            Ok(token) => Ok(Some(Acquired::new(
                FencingToken(token as u64),
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
            .bind(name.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(left.map(|ms| Duration::from_millis(ms.max(0) as u64)))
    }

    /// Starts the LISTEN task once: it wakes the waiters of every name it hears released.
    fn listen(&self) {
        let mut task = self.listener.lock().unwrap_or_else(|e| e.into_inner());
        if task.is_some() {
            return;
        }
        let (pool, channel, wake) = (
            self.pool.clone(),
            self.sql.channel.clone(),
            self.wake.clone(),
        );
        *task = Some(tokio::spawn(async move {
            loop {
                let listener = async {
                    let mut listener = PgListener::connect_with(&pool).await?;
                    listener.listen(&channel).await?;
                    Ok::<_, sqlx::Error>(listener)
                };
                let mut listener = match listener.await {
                    Ok(listener) => listener,
                    Err(e) => {
                        tracing::debug!(error = %e, "LISTEN failed, retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                // Whatever was released before we listened is found by the waiters' re-check.
                wake.wake_all();
                loop {
                    match listener.try_recv().await {
                        Ok(Some(note)) => {
                            if let Ok(name) = LockName::new(note.payload()) {
                                wake.slot(&name).notify_waiters();
                            }
                        }
                        // The connection was lost (and is re-established by the next call):
                        // notifications may have been missed.
                        Ok(None) => wake.wake_all(),
                        Err(e) => {
                            tracing::debug!(error = %e, "LISTEN connection failed");
                            wake.wake_all();
                            break;
                        }
                    }
                }
            }
        }));
    }
}

#[async_trait]
impl Backend for PgLock {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        // Blocked advisory waiters are granted in queue order within a wait slice, but a
        // waiter whose slice ends queues again at the back: no FIFO promise.
        Capabilities::new(Duration::from_millis(100))
            .fencing(true)
            .lease_expiry(true)
            .renewal(true)
            .networked(true)
    }

    async fn try_lock(&self, name: &LockName, opts: &LockOptions) -> Result<Option<Acquired>> {
        let inner = self.inner.clone();
        match inner.options.strategy {
            Strategy::Advisory => run_detached(inner.advisory(name.clone(), opts.ttl, None)).await,
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
                let attempt = inner.clone().advisory(name.clone(), opts.ttl, Some(slice));
                if let Some(acquired) = run_detached(attempt).await? {
                    return Ok(acquired);
                }
            },
            Strategy::Table => {
                inner.listen();
                let max_poll = inner.options.max_poll.unwrap_or(Duration::from_secs(1));
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

/// An advisory lock, held by the session of `conn`.
#[derive(Debug)]
struct AdvisoryLease {
    name: LockName,
    key: i64,
    conn: tokio::sync::Mutex<Option<PoolConnection<Postgres>>>,
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
        let held: std::result::Result<bool, _> = sqlx::query_scalar(Statements::HELD)
            .bind(self.key)
            .fetch_one(&mut **conn)
            .await;
        match held {
            Ok(true) => Ok(started + ttl - CLOCK_MARGIN),
            Ok(false) => Err(Error::lost(self.name.as_str(), LostReason::NotOwner)),
            Err(e) => {
                // The session, and the lock with it, is gone (or unusable: close it).
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
        let unlocked: std::result::Result<bool, _> =
            sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
                .bind(self.key)
                .fetch_one(&mut *conn)
                .await;
        match unlocked {
            Ok(true) => Ok(()),
            Ok(false) => {
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

impl Statements {
    const HELD: &'static str = "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'
        AND pid = pg_backend_pid() AND granted AND objsubid = 1
        AND classid = (($1 >> 32) & 4294967295)::oid
        AND objid = ($1 & 4294967295)::oid)";
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
        let done = sqlx::query(&self.inner.sql.extend)
            .bind(self.name.as_str())
            .bind(&self.owner)
            .bind(millis(ttl))
            .execute(&self.inner.pool)
            .await
            .map_err(map_err)?;
        if done.rows_affected() == 0 {
            return Err(Error::lost(self.name.as_str(), LostReason::NotOwner));
        }
        Ok(started + ttl - CLOCK_MARGIN)
    }

    async fn release(&self) -> Result<()> {
        let in_time: Option<bool> = sqlx::query_scalar(&self.inner.sql.release)
            .bind(self.name.as_str())
            .bind(&self.owner)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(map_err)?;
        self.inner.wake.slot(&self.name).notify_waiters();
        match in_time {
            Some(true) => Ok(()),
            Some(false) => Err(Error::lost(self.name.as_str(), LostReason::Expired)),
            None => Err(Error::lost(self.name.as_str(), LostReason::NotOwner)),
        }
    }
}

fn is_lock_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

/// Sorts sqlx errors into connection errors (retryable) and backend errors.
fn map_err(e: sqlx::Error) -> Error {
    let connection = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // Class 08 (connection exception), 57P01-03 (admin shutdown, crash, cannot connect now).
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c.starts_with("08") || matches!(c.as_ref(), "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    };
    if connection {
        Error::connection(BACKEND, e)
    } else {
        Error::backend(BACKEND, e)
    }
}

impl Connect for PgLock {
    const SCHEMES: &'static [&'static str] = &["postgres", "postgresql"];

    async fn connect(url: &str) -> Result<Self> {
        PgLock::connect(url).await
    }
}
