//! The operator's view: who holds a lock, which locks are held, and removing a stuck one.
//!
//! | | inspect / list | force release |
//! |---|---|---|
//! | lease table (every dialect) | the live rows of `<prefix>locks` (owner, time left) | deletes the row |
//! | PostgreSQL advisory | `pg_locks` joined with `<prefix>advisory_keys` (owner: the backend pid) | `pg_terminate_backend` of the holder's session |
//! | MySQL/MariaDB advisory | `IS_USED_LOCK` of each name of `<prefix>fences` (owner: the connection id) | `KILL` of the holder's connection |
//!
//! Tokens come from the fence counters (`<prefix>fences`; SQLite: the row's token), which
//! every acquisition raises: the next holder's token is higher than the removed one's.
//! Advisory locks have no server-side expiry to show (they end with their session).
//! Terminating a session needs the privilege to (the same user, or a superuser / the
//! `CONNECTION_ADMIN` privilege).

use std::any::Any;
use std::time::Duration;

use async_trait::async_trait;
use lockkit_core::backend::{Admin, LockInfo, LockName};
use lockkit_core::{Error, Result};

use crate::dialect::Dialect;
use crate::lock::SqlLock;
#[cfg(any(feature = "postgres", feature = "mysql"))]
use crate::options::Strategy;

/// Builds a [`LockInfo`] from a row's name, token, owner and milliseconds left.
fn info(name: &str, token: Option<i64>, owner: String, left_ms: Option<i64>) -> LockInfo {
    let mut info = LockInfo::new(name).owner(owner);
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
        let rows: Vec<(String, Option<i64>, String, Option<i64>)> =
            match shared.settings.strategy {
                Strategy::Table => {
                    let sql = format!(
                        "SELECT l.name, f.value, l.owner, l.expires_at - {NOW} FROM {p}locks l
                         LEFT JOIN {p}fences f ON f.name = l.name
                         WHERE l.name {m} AND l.expires_at >= {NOW}"
                    );
                    sqlx::query_as(&sql).bind(key).fetch_all(&shared.pool).await
                }
                Strategy::Advisory => {
                    let sql = format!(
                        "SELECT k.name, f.value, 'backend pid ' || h.pid, NULL::bigint
                         FROM {p}advisory_keys k JOIN ({HELD}) h ON h.key = k.key
                         LEFT JOIN {p}fences f ON f.name = k.name WHERE k.name {m}"
                    );
                    sqlx::query_as(&sql).bind(key).fetch_all(&shared.pool).await
                }
            }
            .map_err(map::<Postgres>)?;
        Ok(rows
            .into_iter()
            .map(|(n, token, owner, left)| info(&n, token, owner, left))
            .collect())
    }

    pub(super) async fn force_release(lock: &crate::PgLock, name: &LockName) -> Result<bool> {
        let shared = lock.shared();
        let p = &shared.settings.table_prefix;
        let done: Option<bool> = match shared.settings.strategy {
            Strategy::Table => {
                let sql = format!("DELETE FROM {p}locks WHERE name = $1 AND expires_at >= {NOW}");
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
        Ok(done.unwrap_or(false))
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
                let sql = format!(
                    "SELECT CAST(l.name AS CHAR), f.value, l.owner, l.expires_at - {NOW}
                     FROM {p}locks l LEFT JOIN {p}fences f ON f.name = l.name
                     WHERE {} AND l.expires_at >= {NOW}",
                    m("l.name")
                );
                let mut query = sqlx::query_as(&sql).bind(key);
                if !exact {
                    query = query.bind(key);
                }
                let rows: Vec<(String, Option<i64>, String, Option<i64>)> =
                    query.fetch_all(&shared.pool).await.map_err(map::<MySql>)?;
                for (n, token, owner, left) in rows {
                    held.push(info(&n, token, owner, left));
                }
            }
            Strategy::Advisory => {
                // Every name ever locked has a fence row; GET_LOCK names are hashes.
                let sql = format!(
                    "SELECT CAST(name AS CHAR), value FROM {p}fences WHERE {}",
                    m("name")
                );
                let mut query = sqlx::query_as(&sql).bind(key);
                if !exact {
                    query = query.bind(key);
                }
                let names: Vec<(String, i64)> =
                    query.fetch_all(&shared.pool).await.map_err(map::<MySql>)?;
                for (n, token) in names {
                    let Ok(name) = LockName::new(&n) else {
                        continue;
                    };
                    if let Some(id) = holder(lock, &name).await? {
                        held.push(info(&n, Some(token), format!("connection {id}"), None));
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
            true => "name = ?1",
            false => "substr(name, 1, length(?1)) = ?1",
        };
        let sql = format!(
            "SELECT name, token, owner, expires_at - ?2 FROM {p}locks
             WHERE {m} AND expires_at >= ?2"
        );
        let rows: Vec<(String, Option<i64>, String, Option<i64>)> = sqlx::query_as(&sql)
            .bind(key)
            .bind(now_ms())
            .fetch_all(&shared.pool)
            .await
            .map_err(map::<Sqlite>)?;
        Ok(rows
            .into_iter()
            .map(|(n, token, owner, left)| info(&n, token, owner, left))
            .collect())
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
