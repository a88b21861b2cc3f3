//! The operator's view: who holds a lock, which locks are held, and removing a stuck one.
//!
//! | | inspect / list | force release |
//! |---|---|---|
//! | lease table (every dialect) | the live rows of `<prefix>locks` (owner, time left) | deletes the row |
//! | PostgreSQL advisory | `pg_locks` joined with `<prefix>advisory_keys` (owner: the backend pid) | `pg_terminate_backend` of the holder's session |
//! | MySQL/MariaDB advisory | `IS_USED_LOCK` of each name of `<prefix>fences` (owner: the connection id) | `KILL` of the holder's connection |
//!
//! Values stored with `Lease::set_value` live in `<prefix>lock_values` (name, token, owner,
//! value) and are shown only with the holder that stored them: the same token and owner as
//! the row above shows. `changed`: PostgreSQL wakes on `NOTIFY` (and looks again every
//! [`POLL_INTERVAL`] for changes that send none); the others poll.
//!
//! Tokens come from the fence counters (`<prefix>fences`; SQLite: the row's token), which
//! every acquisition raises: the next holder's token is higher than the removed one's.
//! Advisory locks have no server-side expiry to show (they end with their session).
//! Terminating a session needs the privilege to (the same user, or a superuser / the
//! `CONNECTION_ADMIN` privilege).

use std::any::Any;
use std::time::Duration;

use async_trait::async_trait;
use lockkit_core::admin::POLL_INTERVAL;
use lockkit_core::backend::{Admin, LockInfo, LockName};
use lockkit_core::{Error, Result};
use tokio::time::Instant;

use crate::dialect::Dialect;
use crate::lock::SqlLock;
#[cfg(any(feature = "postgres", feature = "mysql"))]
use crate::options::Strategy;

/// A held lock as a row: name, token, owner, milliseconds left, value.
type Row = (String, Option<i64>, String, Option<i64>, Option<String>);

/// Builds a [`LockInfo`] from a row's name, token, owner, milliseconds left and value.
fn info((name, token, owner, left_ms, value): Row) -> LockInfo {
    let mut info = LockInfo::new(name).owner(owner);
    if let Some(value) = value {
        info = info.value(value);
    }
    if let Some(token) = token {
        info = info.token(token as u64);
    }
    if let Some(left) = left_ms {
        info = info.remaining(Duration::from_millis(left.max(0) as u64));
    }
    info
}

/// The dialect this client speaks, by its concrete type.
enum Which<'a> {
    #[cfg(feature = "postgres")]
    Pg(&'a crate::PgLock),
    #[cfg(feature = "mysql")]
    My(&'a crate::MySqlLock),
    #[cfg(feature = "sqlite")]
    Lite(&'a crate::SqliteLock),
    #[allow(dead_code)]
    None(std::marker::PhantomData<&'a ()>),
}

fn which<D: Dialect>(lock: &SqlLock<D>) -> Which<'_> {
    let any: &dyn Any = lock;
    #[cfg(feature = "postgres")]
    if let Some(pg) = any.downcast_ref() {
        return Which::Pg(pg);
    }
    #[cfg(feature = "mysql")]
    if let Some(my) = any.downcast_ref() {
        return Which::My(my);
    }
    #[cfg(feature = "sqlite")]
    if let Some(lite) = any.downcast_ref() {
        return Which::Lite(lite);
    }
    let _ = any;
    Which::None(std::marker::PhantomData)
}

fn unsupported<T>() -> Result<T> {
    Err(Error::Unsupported(
        "no inspection for this SQL dialect".into(),
    ))
}

#[async_trait]
impl<D: Dialect> Admin for SqlLock<D> {
    async fn inspect(&self, name: &LockName) -> Result<Option<LockInfo>> {
        let found = self.select(name.as_str(), true).await?;
        Ok(found.into_iter().find(|i| i.name == name.as_str()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<LockInfo>> {
        let mut found = self.select(prefix, false).await?;
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// PostgreSQL: wakes on the `NOTIFY` of a stored value, a release and a forced release
    /// (the client's `LISTEN` task), and looks again every [`POLL_INTERVAL`] for what
    /// sends none (an acquisition, an expiry, a session the server ended); returns only once
    /// the lock differs from `seen` or at `deadline`. Elsewhere: the polling default.
    async fn changed(
        &self,
        name: &LockName,
        seen: Option<&LockInfo>,
        deadline: Instant,
    ) -> Result<()> {
        if !D::WATCH {
            tokio::time::sleep_until(deadline.min(Instant::now() + POLL_INTERVAL)).await;
            return Ok(());
        }
        let shared = self.shared();
        let slot = shared.wake.slot(name);
        let mut listening = false;
        loop {
            // Registered before looking, so a change after the look wakes it.
            let woken = slot.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if !std::mem::replace(&mut listening, true) {
                D::listen(shared);
            }
            let now = self.inspect(name).await?;
            if !lockkit_core::admin::same_state(seen, now.as_ref()) || Instant::now() >= deadline {
                return Ok(());
            }
            let look = deadline.min(Instant::now() + POLL_INTERVAL);
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep_until(look) => {}
            }
        }
    }

    async fn force_release(&self, name: &LockName) -> Result<bool> {
        match which(self) {
            #[cfg(feature = "postgres")]
            Which::Pg(pg) => pg::force_release(pg, name).await,
            #[cfg(feature = "mysql")]
            Which::My(my) => my::force_release(my, name).await,
            #[cfg(feature = "sqlite")]
            Which::Lite(lite) => lite::force_release(lite, name).await,
            Which::None(_) => unsupported(),
        }
    }
}

impl<D: Dialect> SqlLock<D> {
    /// The held locks named `key` (`exact`) or whose names start with it.
    async fn select(&self, key: &str, exact: bool) -> Result<Vec<LockInfo>> {
        match which(self) {
            #[cfg(feature = "postgres")]
            Which::Pg(pg) => pg::select(pg, key, exact).await,
            #[cfg(feature = "mysql")]
            Which::My(my) => my::select(my, key, exact).await,
            #[cfg(feature = "sqlite")]
            Which::Lite(lite) => lite::select(lite, key, exact).await,
            Which::None(_) => unsupported(),
        }
    }
}

#[cfg(feature = "postgres")]
mod pg {
    use super::*;
    use crate::dialect::Postgres;
    use crate::error::map;

    const NOW: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";
    /// The granted advisory locks of this database, by their 64-bit key.
    const HELD: &str = "SELECT ((classid::bigint << 32) | objid::bigint) AS key, pid FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND objsubid = 1
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";

    fn matches(exact: bool) -> &'static str {
        match exact {
            true => "= $1",
            false => {
                "LIKE replace(replace(replace($1, '\\', '\\\\'), '%', '\\%'), '_', '\\_') || '%'"
            }
        }
    }

    pub(super) async fn select(
        lock: &crate::PgLock,
        key: &str,
        exact: bool,
    ) -> Result<Vec<LockInfo>> {
        let shared = lock.shared();
        let p = &shared.settings.table_prefix;
        let m = matches(exact);
        // A value shows only with the holder that stored it: its owner and token.
        let rows: Vec<Row> = match shared.settings.strategy {
            Strategy::Table => {
                let sql = format!(
                    "SELECT l.name, f.value, l.owner, l.expires_at - {NOW}, v.value
                         FROM {p}locks l LEFT JOIN {p}fences f ON f.name = l.name
                         LEFT JOIN {p}lock_values v
                           ON v.name = l.name AND v.owner = l.owner AND v.token = f.value
                         WHERE l.name {m} AND l.expires_at >= {NOW}"
                );
                sqlx::query_as(&sql).bind(key).fetch_all(&shared.pool).await
            }
            Strategy::Advisory => {
                let sql = format!(
                    "SELECT k.name, f.value, 'backend pid ' || h.pid, NULL::bigint, v.value
                         FROM {p}advisory_keys k JOIN ({HELD}) h ON h.key = k.key
                         LEFT JOIN {p}fences f ON f.name = k.name
                         LEFT JOIN {p}lock_values v ON v.name = k.name AND v.token = f.value
                           AND v.owner = 'backend pid ' || h.pid
                         WHERE k.name {m}"
                );
                sqlx::query_as(&sql).bind(key).fetch_all(&shared.pool).await
            }
        }
        .map_err(map::<Postgres>)?;
        Ok(rows.into_iter().map(info).collect())
    }

    pub(super) async fn force_release(lock: &crate::PgLock, name: &LockName) -> Result<bool> {
        let shared = lock.shared();
        let p = &shared.settings.table_prefix;
        let done: Option<bool> = match shared.settings.strategy {
            // Observers (`changed`) hear of it.
            Strategy::Table => {
                let sql = format!(
                    "WITH d AS (DELETE FROM {p}locks WHERE name = $1 AND expires_at >= {NOW}
                                RETURNING name)
                     SELECT pg_notify('{p}released', name) FROM d"
                );
                let done = sqlx::query(&sql)
                    .bind(name.as_str())
                    .execute(&shared.pool)
                    .await;
                done.map(|d| Some(d.rows_affected() > 0))
            }
            Strategy::Advisory => {
                let sql = format!(
                    "SELECT bool_or(pg_terminate_backend(h.pid)) FROM {p}advisory_keys k
                     JOIN ({HELD}) h ON h.key = k.key WHERE k.name = $1"
                );
                sqlx::query_scalar(&sql)
                    .bind(name.as_str())
                    .fetch_one(&shared.pool)
                    .await
            }
        }
        .map_err(map::<Postgres>)?;
        let done = done.unwrap_or(false);
        if done && shared.settings.strategy == Strategy::Advisory {
            // Observers hear of it (the session may take a moment more to end).
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(format!("{p}changed"))
                .bind(name.as_str())
                .execute(&shared.pool)
                .await
                .map_err(map::<Postgres>)?;
        }
        Ok(done)
    }
}

#[cfg(feature = "mysql")]
mod my {
    use super::*;
    use crate::dialect::MySql;
    use crate::error::map;

    const NOW: &str = "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)";

    pub(super) async fn select(
        lock: &crate::MySqlLock,
        key: &str,
        exact: bool,
    ) -> Result<Vec<LockInfo>> {
        let shared = lock.shared();
        let p = &shared.settings.table_prefix;
        let m = |column: &str| match exact {
            true => format!("{column} = ?"),
            false => format!("LEFT({column}, LENGTH(?)) = ?"),
        };
        let mut held = Vec::new();
        match shared.settings.strategy {
            Strategy::Table => {
                // A value shows only with the holder that stored it: its owner and token.
                let sql = format!(
                    "SELECT CAST(l.name AS CHAR), f.value, l.owner, l.expires_at - {NOW}, v.value
                     FROM {p}locks l LEFT JOIN {p}fences f ON f.name = l.name
                     LEFT JOIN {p}lock_values v
                       ON v.name = l.name AND v.owner = l.owner AND v.token = f.value
                     WHERE {} AND l.expires_at >= {NOW}",
                    m("l.name")
                );
                let mut query = sqlx::query_as(&sql).bind(key);
                if !exact {
                    query = query.bind(key);
                }
                let rows: Vec<Row> = query.fetch_all(&shared.pool).await.map_err(map::<MySql>)?;
                held.extend(rows.into_iter().map(info));
            }
            Strategy::Advisory => {
                // Every name ever locked has a fence row; GET_LOCK names are hashes.
                let sql = format!(
                    "SELECT CAST(f.name AS CHAR), f.value, v.token, v.owner, v.value
                     FROM {p}fences f LEFT JOIN {p}lock_values v ON v.name = f.name WHERE {}",
                    m("f.name")
                );
                let mut query = sqlx::query_as(&sql).bind(key);
                if !exact {
                    query = query.bind(key);
                }
                type Named = (String, i64, Option<i64>, Option<String>, Option<String>);
                let names: Vec<Named> =
                    query.fetch_all(&shared.pool).await.map_err(map::<MySql>)?;
                for (n, token, v_token, v_owner, value) in names {
                    let Ok(name) = LockName::new(&n) else {
                        continue;
                    };
                    if let Some(id) = holder(lock, &name).await? {
                        let owner = format!("connection {id}");
                        // Only the holder's own: its connection and token.
                        let ours = v_token == Some(token) && v_owner.as_ref() == Some(&owner);
                        let value = value.filter(|_| ours);
                        held.push(info((n, Some(token), owner, None, value)));
                    }
                }
            }
        }
        Ok(held)
    }

    /// The connection id holding `name`'s `GET_LOCK` (an INT on MariaDB, a BIGINT on MySQL).
    async fn holder(lock: &crate::MySqlLock, name: &LockName) -> Result<Option<i64>> {
        sqlx::query_scalar("SELECT CAST(IS_USED_LOCK(?) AS SIGNED)")
            .bind(lock.lock_name(name))
            .fetch_one(&lock.shared().pool)
            .await
            .map_err(map::<MySql>)
    }

    pub(super) async fn force_release(lock: &crate::MySqlLock, name: &LockName) -> Result<bool> {
        let shared = lock.shared();
        let p = &shared.settings.table_prefix;
        match shared.settings.strategy {
            Strategy::Table => {
                let sql = format!("DELETE FROM {p}locks WHERE name = ? AND expires_at >= {NOW}");
                let done = sqlx::query(&sql)
                    .bind(name.as_str())
                    .execute(&shared.pool)
                    .await;
                Ok(done.map_err(map::<MySql>)?.rows_affected() > 0)
            }
            Strategy::Advisory => {
                let Some(id) = holder(lock, name).await? else {
                    return Ok(false);
                };
                // A number, not text: safe to put in the statement (KILL takes no parameter).
                let kill = format!("KILL CONNECTION {id}");
                sqlx::raw_sql(&kill)
                    .execute(&shared.pool)
                    .await
                    .map_err(map::<MySql>)?;
                Ok(true)
            }
        }
    }
}

#[cfg(feature = "sqlite")]
mod lite {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;
    use crate::dialect::Sqlite;
    use crate::error::map;

    fn now_ms() -> i64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH);
        now.map_or(0, |d| d.as_millis() as i64)
    }

    pub(super) async fn select(
        lock: &crate::SqliteLock,
        key: &str,
        exact: bool,
    ) -> Result<Vec<LockInfo>> {
        let shared = lock.shared();
        let p = &shared.settings.table_prefix;
        let m = match exact {
            true => "l.name = ?1",
            false => "substr(l.name, 1, length(?1)) = ?1",
        };
        // A value shows only with the holder that stored it: its owner and token.
        let sql = format!(
            "SELECT l.name, l.token, l.owner, l.expires_at - ?2, v.value FROM {p}locks l
             LEFT JOIN {p}lock_values v
               ON v.name = l.name AND v.owner = l.owner AND v.token = l.token
             WHERE {m} AND l.expires_at >= ?2"
        );
        let rows: Vec<Row> = sqlx::query_as(&sql)
            .bind(key)
            .bind(now_ms())
            .fetch_all(&shared.pool)
            .await
            .map_err(map::<Sqlite>)?;
        Ok(rows.into_iter().map(info).collect())
    }

    pub(super) async fn force_release(lock: &crate::SqliteLock, name: &LockName) -> Result<bool> {
        let shared = lock.shared();
        let p = &shared.settings.table_prefix;
        let sql = format!("DELETE FROM {p}locks WHERE name = ?1 AND expires_at >= ?2");
        let done = sqlx::query(&sql)
            .bind(name.as_str())
            .bind(now_ms())
            .execute(&shared.pool)
            .await
            .map_err(map::<Sqlite>)?;
        Ok(done.rows_affected() > 0)
    }
}
