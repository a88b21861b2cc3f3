//! [`SqlLock`]: connecting, the schema, and the acquire path of both strategies.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lockkit_core::backend::{
    run_detached, Acquired, Admin, Attempt, Backend, Capabilities, Connect, FencingToken, LockName,
    LockOptions, Outcome,
};
use lockkit_core::{Error, Result};
use sqlx::pool::{Pool, PoolOptions};
use tokio::time::Instant;

use crate::dialect::{Bind, Db, Dialect, On, Sql, Statements, Target};
use crate::options::{Settings, SqlOptions, Strategy};
use crate::renew::Renewals;
use crate::session::Sessions;
use crate::wait::{self, WakeSlots};
use crate::warm::Warm;
use crate::{advisory, error, table};

/// A lock service on a SQL database of dialect `D`: use the aliases [`PgLock`](crate::PgLock),
/// [`MySqlLock`](crate::MySqlLock) and [`SqliteLock`](crate::SqliteLock). See the
/// [crate docs](crate) for the strategies.
#[derive(Debug)]
pub struct SqlLock<D: Dialect> {
    inner: Arc<Shared<D>>,
}

/// What every clone of a client, and every lease it hands out, shares.
pub(crate) struct Shared<D: Dialect> {
    pub(crate) pool: Pool<D::Db>,
    /// The lease-table statements' connections, kept between statements.
    pub(crate) warm: Warm<D::Db>,
    pub(crate) sql: Statements,
    pub(crate) settings: Settings,
    /// Wake-ups of lease-table waiters, shared by every client of the database in this
    /// process.
    pub(crate) wake: Arc<WakeSlots>,
    /// The advisory sessions (advisory strategy).
    pub(crate) sessions: Sessions<D>,
    /// Lease-row renewals waiting for their batch (table strategy).
    pub(crate) renewals: Renewals,
    /// Turns of the lease-row takes at the pool: all of its connections but one (the only
    /// one, for a pool of one). A burst of takes larger than the pool queues here, so the
    /// renewals and releases, which skip this line, wait for at most one statement instead
    /// of every take queued before them, and are not lost to a burst.
    takes: tokio::sync::Semaphore,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) state: D::State,
}

impl<D: Dialect> Shared<D> {
    /// Where a lease-table statement runs: a kept connection, else the pool's.
    pub(crate) fn warm(&self) -> On<'_, D::Db> {
        On::Warm(&self.warm, &self.pool)
    }

    /// A lease-row take's turn at the pool (see `takes`), waited for no longer than the pool
    /// would make it wait for a connection.
    pub(crate) async fn take_turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>> {
        let timeout = self.settings.acquire_timeout;
        match tokio::time::timeout(timeout, self.takes.acquire()).await {
            Ok(Ok(turn)) => Ok(turn),
            // Never closed; and a wait past the timeout is the pool's own error.
            _ => Err(error::map::<D>(sqlx::Error::PoolTimedOut)),
        }
    }
}

impl<D: Dialect> Clone for SqlLock<D> {
    fn clone(&self) -> Self {
        SqlLock {
            inner: self.inner.clone(),
        }
    }
}

impl<D: Dialect> fmt::Debug for Shared<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("backend", &D::NAME)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<D: Dialect> SqlLock<D> {
    /// Connects to `url` with default options (URL parameters apply).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, SqlOptions::default()).await
    }

    /// Connects to `url` with `options`. An option set in `options` overrides the URL
    /// parameter of the same name. Creates the tables unless auto-migration is off.
    pub async fn connect_with(url: &str, options: SqlOptions) -> Result<Self> {
        let (settings, mut url) = Settings::resolve::<D>(url, options)?;
        let target = D::target(&mut url, &settings)?;
        Settings::finish::<D>(&url)?;
        let pool = PoolOptions::<D::Db>::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout)
            .idle_timeout(Some(Duration::from_secs(60)))
            // No ping before every use: a broken connection fails its statement, which
            // counts as a retryable connection error.
            .test_before_acquire(false);
        let pool = match D::pool(pool, &target)
            .connect_with(target.options.clone())
            .await
        {
            Ok(pool) => pool,
            Err(e) => return Err(cause::<D>(e, &target, settings.acquire_timeout).await),
        };
        D::check_server(&pool, &settings).await?;
        let database = target
            .database
            .map(|db| format!("{}:{db}:{}", D::NAME, settings.table_prefix));
        let takes = match pool.options().get_max_connections() {
            0 | 1 => 1,
            more => more as usize - 1,
        };
        let lock = SqlLock {
            inner: Arc::new(Shared {
                pool,
                warm: Warm::new(),
                sql: D::statements(&settings.table_prefix),
                state: D::state(&settings.table_prefix),
                wake: wait::wake_slots(database),
                sessions: Sessions::default(),
                renewals: Renewals::default(),
                takes: tokio::sync::Semaphore::new(takes),
                settings,
            }),
        };
        if lock.inner.settings.auto_migrate {
            lock.migrate().await?;
        }
        Ok(lock)
    }

    /// Creates lockkit's tables if they are missing. Idempotent, and safe from many clients
    /// at once. [`SqlLock::connect`] runs it unless auto-migration is off.
    pub async fn migrate(&self) -> Result<()> {
        D::Db::script(&self.inner.pool, &self.inner.sql.schema)
            .await
            .map_err(error::map::<D>)
    }

    /// The shared state, for the dialects' own inspection methods.
    pub(crate) fn shared(&self) -> &Shared<D> {
        &self.inner
    }
}

/// Why a pool could not connect: the pool retries a refused connection until its timeout and
/// then reports only the timeout, so one direct connection finds the cause. Every error names
/// the server's address (never its password).
async fn cause<D: Dialect>(e: sqlx::Error, target: &Target<D>, timeout: Duration) -> Error {
    let Some(address) = &target.address else {
        return error::map::<D>(e);
    };
    if !matches!(e, sqlx::Error::PoolTimedOut) {
        return error::map_at::<D>(address, e);
    }
    match tokio::time::timeout(timeout, sqlx::ConnectOptions::connect(&target.options)).await {
        Ok(Err(e)) => error::map_at::<D>(address, e),
        Ok(Ok(conn)) => {
            let _ = sqlx::Connection::close(conn).await;
            error::map_at::<D>(address, e)
        }
        Err(_) => error::no_answer::<D>(address, timeout),
    }
}

/// The fencing token read by `fence` on `conn`, which has just taken its lock (or its row,
/// in the same transaction).
pub(crate) async fn fence<D: Dialect>(
    conn: &mut Conn<D>,
    fence: &Sql,
    bind: &Bind<'_>,
) -> Result<FencingToken> {
    let token = D::Db::run(On::Conn(conn), fence, bind)
        .await
        .map_err(error::map::<D>)?;
    let token = token.ok_or_else(|| error::no_value::<D>("the fence counter"))?;
    Ok(FencingToken(token as u64))
}

/// A connection of dialect `D`.
pub(crate) type Conn<D> = <<D as crate::dialect::hooks::Hooks>::Db as sqlx::Database>::Connection;

#[async_trait]
impl<D: Dialect> Backend for SqlLock<D> {
    fn name(&self) -> &'static str {
        D::NAME
    }

    fn capabilities(&self) -> Capabilities {
        // Blocked advisory waiters are granted in queue order within a wait slice, but a
        // waiter whose slice ends queues again at the back: no FIFO promise.
        Capabilities::new(Duration::from_millis(100))
            .fencing(true)
            .lease_expiry(true)
            .renewal(true)
            .networked(D::SERVER)
            .admin(true, true, true)
            .election(true)
            .watch(D::WATCH)
    }

    fn admin(&self) -> Option<&dyn Admin> {
        Some(self)
    }

    async fn try_lock(&self, name: &LockName, opts: &LockOptions) -> Result<Option<Acquired>> {
        let (lock, name) = (self.inner.clone(), name.clone());
        let outcome = match lock.settings.strategy {
            Strategy::Advisory => run_detached(advisory::attempt(lock, name, opts.ttl, None)).await,
            Strategy::Table => run_detached(table::attempt(lock, name, opts.ttl)).await,
        };
        Ok(outcome?.into_acquired())
    }

    async fn lock(
        &self,
        name: &LockName,
        opts: &LockOptions,
        deadline: Option<Instant>,
    ) -> Result<Acquired> {
        let lock = &self.inner;
        let settings = &lock.settings;
        match settings.strategy {
            Strategy::Advisory => {
                // First without waiting, on a session shared with other locks; then waits
                // on the server, each on a session of its own.
                let first = advisory::attempt(lock.clone(), name.clone(), opts.ttl, None);
                if let Outcome::Won(acquired) = run_detached(first).await? {
                    return Ok(acquired);
                }
                loop {
                    let slice = Some(wait::next_slice(deadline, settings.wait_slice));
                    let attempt = advisory::attempt(lock.clone(), name.clone(), opts.ttl, slice);
                    if let Outcome::Won(acquired) = run_detached(attempt).await? {
                        return Ok(acquired);
                    }
                }
            }
            Strategy::Table => {
                // This process's waiters for the name try one at a time, in order.
                let turn = lock.wake.turn(name);
                let _turn = turn.lock().await;
                D::listen(lock);
                wait::until_acquired(lock.wake.slot(name), settings.max_poll, || async {
                    let attempt = table::attempt(lock.clone(), name.clone(), opts.ttl);
                    Ok(match run_detached(attempt).await? {
                        Outcome::Won(acquired) => Outcome::Won(acquired),
                        Outcome::Busy(()) => Outcome::Busy(table::time_left(lock, name).await?),
                    })
                })
                .await
            }
        }
    }
}

impl<D: Dialect> Connect for SqlLock<D> {
    const SCHEMES: &'static [&'static str] = D::SCHEMES;

    async fn connect(url: &str) -> Result<Self> {
        SqlLock::connect(url).await
    }
}
