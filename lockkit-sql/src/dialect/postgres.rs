//! PostgreSQL: advisory keys from a name → key table, `lock_timeout` slices, the server's
//! clock, and `NOTIFY` on release heard by a `LISTEN` task.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use lockkit_core::backend::LockName;
use lockkit_core::{Error, Result};
use sqlx::error::DatabaseError;
use sqlx::pool::Pool;
use sqlx::postgres::PgListener;
use tokio::task::JoinHandle;

use super::hooks::Hooks;
use super::{AdvisorySql, Arg, Bind, Db, FenceSql, Key, Names, On, Sql, Statements};
use crate::lock::Shared;
use crate::options::Settings;
use crate::{error, SqlLock, Strategy};

/// PostgreSQL (feature `postgres`): session advisory locks by default, or the lease table.
#[derive(Debug)]
pub struct Postgres;

/// The server's clock in milliseconds since the epoch (all clients share it).
const NOW: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// This session holds the advisory lock of key `$1` (a condition on `pg_locks`).
const HELD_HERE: &str = "locktype = 'advisory' AND pid = pg_backend_pid() AND granted
     AND objsubid = 1 AND classid = (($1 >> 32) & 4294967295)::oid
     AND objid = ($1 & 4294967295)::oid";

/// Arms the session for the milliseconds of parameter `ttl` (`$n`): the server ends it once
/// silent that long. Renewals restart the clock at least every TTL/3.
fn arm(ttl: &str) -> String {
    format!(
        "set_config('idle_session_timeout', LEAST(GREATEST({ttl}, 1), 2147483647)::text, false)"
    )
}

/// A PostgreSQL client's advisory keys and `LISTEN` task.
#[derive(Debug)]
pub struct PgState {
    /// Advisory keys already resolved (a name's key never changes).
    keys: Mutex<HashMap<LockName, i64>>,
    /// Finds or assigns a name's key, starting at a candidate.
    key: Sql,
    /// The channels: releases of lease rows (which wake waiters and observers), and the
    /// other changes observers wake on (values stored and cleared, forced releases).
    channels: [String; 2],
    listener: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for PgState {
    fn drop(&mut self) {
        if let Some(task) = self.listener.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

// The hooks speak the crate's own types: the trait is sealed.
#[allow(private_interfaces)]
impl Hooks for Postgres {
    type Db = sqlx::Postgres;
    type State = PgState;

    const SCHEMES: Names = &["postgres", "postgresql"];
    const PASS_THROUGH: &'static str = "sslmode sslrootcert sslcert sslkey application_name";
    // `NOTIFY` wakes the waiters of every client: re-check seldom.
    const MAX_POLL: Duration = Duration::from_secs(1);
    const WATCH: bool = true;

    fn statements(p: &str) -> Statements {
        use Arg::*;
        // Bumps the fence counter of the names of the rows that follow; returns the value.
        let fence = format!("INSERT INTO {p}fences (name, value)");
        let bump =
            format!("ON CONFLICT (name) DO UPDATE SET value = {p}fences.value + 1 RETURNING value");
        // Stores the value of the rows that follow unless a later holder (a higher token)
        // has stored one, and tells the observers.
        let store = |rows: &str| {
            format!(
                "WITH s AS (INSERT INTO {p}lock_values (name, token, owner, value) {rows}
                    ON CONFLICT (name) DO UPDATE SET token = EXCLUDED.token,
                        owner = EXCLUDED.owner, value = EXCLUDED.value
                    WHERE {p}lock_values.token <= EXCLUDED.token RETURNING name)
                 SELECT pg_notify('{p}changed', name) FROM s"
            )
        };
        Statements {
            // One simple query is one implicit transaction: the migration lock is held to
            // its end, so concurrent clients do not race on the DDL.
            schema: format!(
                "SELECT pg_advisory_xact_lock(hashtext('lockkit migrate'));
                 CREATE TABLE IF NOT EXISTS {p}fences (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
                 CREATE TABLE IF NOT EXISTS {p}advisory_keys (name TEXT PRIMARY KEY, key BIGINT NOT NULL UNIQUE);
                 CREATE TABLE IF NOT EXISTS {p}locks (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at BIGINT NOT NULL);
                 CREATE TABLE IF NOT EXISTS {p}lock_values (name TEXT PRIMARY KEY, token BIGINT NOT NULL, owner TEXT NOT NULL, value TEXT NOT NULL);"
            ),
            // The row and its token in one statement: the row stays locked until the token
            // is taken, so a holder delayed in between never gets a token above the next
            // holder's.
            acquire: Sql::scalar(
                format!(
                    "WITH l AS (INSERT INTO {p}locks (name, owner, expires_at) VALUES ($1, $2, {NOW} + $3)
                        ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
                        WHERE {p}locks.expires_at < {NOW} RETURNING name)
                     , f AS ({fence} SELECT name, 1 FROM l {bump})
                     SELECT value FROM f"
                ),
                &[Name, Owner, TtlMs],
            ),
            table_fence: None,
            take_over: None,
            time_left: Sql::scalar(
                format!("SELECT expires_at - {NOW} FROM {p}locks WHERE name = $1"),
                &[Name],
            ),
            extend: Sql::count(
                format!(
                    "UPDATE {p}locks SET expires_at = {NOW} + $3
                     WHERE name = $1 AND owner = $2 AND expires_at >= {NOW}"
                ),
                &[Name, Owner, TtlMs],
            ),
            extend_many: Some(Sql::count(
                format!(
                    "UPDATE {p}locks AS l SET expires_at = {NOW} + b.ttl
                     FROM json_to_recordset($1::json) AS b(name text, owner text, ttl bigint)
                     WHERE l.name = b.name AND l.owner = b.owner AND l.expires_at >= {NOW}"
                ),
                &[Rows],
            )),
            // Each deletion notifies the waiters of every client (one row per deleted row:
            // its count is the rows deleted).
            release: [format!("AND expires_at >= {NOW}"), String::new()].map(|in_time| {
                Sql::count(
                    format!(
                        "WITH d AS (DELETE FROM {p}locks WHERE name = $1 AND owner = $2 {in_time} RETURNING name)
                         SELECT pg_notify('{p}released', name) FROM d"
                    ),
                    &[Name, Owner],
                )
            }),
            set_value: Sql::count(
                store(&format!(
                    "SELECT name, $3, owner, $4 FROM {p}locks
                     WHERE name = $1 AND owner = $2 AND expires_at >= {NOW}"
                )),
                &[Name, Owner, Token, Value],
            ),
            advisory: Some(AdvisorySql {
                arm: Sql::count(format!("SELECT {}", arm("$1")), &[TtlMs]),
                // Armed, locked and fenced in one statement (one implicit transaction): the
                // counter is bumped only if the lock was taken, and committed before the
                // answer is sent.
                take: Sql::scalar(
                    format!(
                        "WITH l AS (SELECT pg_try_advisory_lock($1) AS got FROM (SELECT {}) a),
                              f AS ({fence} SELECT $3, 1 FROM l WHERE got {bump})
                         SELECT COALESCE((SELECT value FROM f), 0) FROM l",
                        arm("$2")
                    ),
                    &[Key, TtlMs, Name],
                ),
                // A wait that runs out (`lock_timeout`, for this statement only) fails and
                // rolls back the arming with it: the session is as it was.
                wait: Sql::scalar(
                    format!(
                        "WITH l AS (SELECT 1 FROM (SELECT pg_advisory_lock($1) FROM (SELECT {},
                                    set_config('lock_timeout', $3::text || 'ms', true)) a) w),
                              f AS ({fence} SELECT $4, 1 FROM l {bump})
                         SELECT value FROM f",
                        arm("$2")
                    ),
                    &[Key, TtlMs, SliceMs, Name],
                ),
                fence: None,
                unlock: Sql::scalar("SELECT pg_advisory_unlock($1)::int::bigint", &[Key]),
                unlock_if_held: Sql::scalar(
                    format!("SELECT pg_advisory_unlock($1)::int::bigint FROM pg_locks WHERE {HELD_HERE}"),
                    &[Key],
                ),
                // The owner as inspect shows it: the backend pid holding the lock.
                set_value: Sql::count(
                    store(&format!(
                        "SELECT $2, $3, 'backend pid ' || pg_backend_pid(), $4 FROM pg_locks
                         WHERE {HELD_HERE}"
                    )),
                    &[Key, Name, Token, Value],
                ),
                clear_value: Sql::count(
                    format!(
                        "WITH d AS (DELETE FROM {p}lock_values WHERE name = $1 AND token = $2
                                    RETURNING name)
                         SELECT pg_notify('{p}changed', name) FROM d"
                    ),
                    &[Name, Token],
                ),
            }),
        }
    }

    fn fence(t: &str) -> FenceSql {
        FenceSql {
            // Under the migration lock, like the schema: concurrent `CREATE TABLE IF NOT
            // EXISTS` race on the catalog otherwise.
            create: format!(
                "SELECT pg_advisory_xact_lock(hashtext('lockkit migrate'));
                 CREATE TABLE IF NOT EXISTS {t} (resource TEXT PRIMARY KEY, token BIGINT NOT NULL);"
            ),
            // The conflicting row is locked even when its token stays: to the caller's commit.
            record: Sql::scalar(
                format!(
                    "INSERT INTO {t} (resource, token) VALUES ($1, $2)
                     ON CONFLICT (resource) DO UPDATE SET token = GREATEST({t}.token, EXCLUDED.token)
                     RETURNING token"
                ),
                &[Arg::Name, Arg::Token],
            ),
            highest: None,
        }
    }

    fn state(p: &str) -> PgState {
        PgState {
            keys: Mutex::default(),
            key: Sql::scalar(
                format!(
                    "WITH ins AS (INSERT INTO {p}advisory_keys (name, key) VALUES ($1, $2)
                                  ON CONFLICT DO NOTHING RETURNING key)
                     SELECT key FROM ins UNION ALL
                     SELECT key FROM {p}advisory_keys WHERE name = $1 LIMIT 1"
                ),
                &[Arg::Name, Arg::Key],
            ),
            channels: [format!("{p}released"), format!("{p}changed")],
            listener: Mutex::default(),
        }
    }

    fn connection_lost(e: &dyn DatabaseError) -> bool {
        // Class 08 (connection exception), 57P01-03 (admin shutdown, crash, cannot connect
        // now), 57P05 (idle session timeout).
        e.code().is_some_and(|c| {
            c.starts_with("08") || matches!(c.as_ref(), "57P01" | "57P02" | "57P03" | "57P05")
        })
    }

    fn lost_race(e: &dyn DatabaseError) -> bool {
        // lock_not_available: a wait slice ran out.
        e.code().as_deref() == Some("55P03")
    }

    /// Advisory locks end with a silent holder's session only where the server has
    /// `idle_session_timeout` (PostgreSQL 14+): older servers get the lease table.
    async fn check_server(pool: &Pool<Self::Db>, settings: &Settings) -> Result<()> {
        if settings.strategy != Strategy::Advisory {
            return Ok(());
        }
        let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
            .fetch_one(pool)
            .await
            .map_err(error::map::<Self>)?;
        if version < 140_000 {
            return Err(Error::Unsupported(format!(
                "PostgreSQL {version} has no idle_session_timeout (14+), so a frozen holder \
                 would keep an advisory lock past its TTL: use strategy=table"
            )));
        }
        Ok(())
    }

    /// The name's key from `<prefix>advisory_keys`: its FNV-1a hash, or the next free key
    /// above it when another name has that one, so two names never share a key.
    async fn advisory_key(lock: &Shared<Self>, name: &LockName) -> Result<Key> {
        let state = &lock.state;
        if let Some(key) = state
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(Key::Int(*key));
        }
        let mut candidate = name.hash64() as i64;
        for _ in 0..64 {
            let probe = Key::Int(candidate);
            let bind = Bind::new(name).key(&probe, None);
            let key = sqlx::Postgres::run(On::Pool(&lock.pool), &state.key, &bind)
                .await
                .map_err(error::map::<Self>)?;
            if let Some(key) = key {
                let mut keys = state.keys.lock().unwrap_or_else(|e| e.into_inner());
                keys.insert(name.clone(), key);
                return Ok(Key::Int(key));
            }
            // The candidate belongs to another name (or a concurrent insert of this name
            // is not visible yet): probe the next key.
            candidate = candidate.wrapping_add(1);
        }
        Err(Error::backend(
            Self::NAME,
            format!("no free advisory key for `{name}`"),
        ))
    }

    /// Starts the `LISTEN` task once: it wakes the waiters and observers of every name it
    /// hears released or changed.
    fn listen(lock: &Shared<Self>) {
        let mut task = lock
            .state
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if task.is_some() {
            return;
        }
        let (pool, channels, wake) = (
            lock.pool.clone(),
            lock.state.channels.clone(),
            lock.wake.clone(),
        );
        *task = Some(tokio::spawn(async move {
            loop {
                let listener = async {
                    let mut listener = PgListener::connect_with(&pool).await?;
                    listener
                        .listen_all(channels.iter().map(String::as_str))
                        .await?;
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

impl SqlLock<Postgres> {
    /// The advisory-lock key of `name` (for inspecting `pg_locks`), assigning one if the name
    /// has none yet.
    pub async fn advisory_key(&self, name: &LockName) -> Result<i64> {
        match Postgres::advisory_key(self.shared(), name).await? {
            Key::Int(key) => Ok(key),
            Key::Text(_) => unreachable!("PostgreSQL keys are numbers"),
        }
    }
}
