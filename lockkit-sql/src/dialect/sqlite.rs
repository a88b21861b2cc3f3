//! SQLite: the lease table only, on the local clock, in one database file shared by every
//! process that opens it (WAL, a busy timeout); the fence counter is kept by triggers.

use std::str::FromStr;

use lockkit_core::backend::LockName;
use lockkit_core::url::ServiceUrl;
use lockkit_core::{Error, Result};
use sqlx::error::DatabaseError;
use sqlx::pool::PoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};

use super::hooks::Hooks;
use super::{Arg, FenceSql, Key, Names, Sql, Statements, Target};
use crate::lock::Shared;
use crate::options::Settings;

/// SQLite (feature `sqlite`, the default): the lease table.
#[derive(Debug)]
pub struct Sqlite;

// The hooks speak the crate's own types: the trait is sealed.
#[allow(private_interfaces)]
impl Hooks for Sqlite {
    type Db = sqlx::Sqlite;
    type State = ();

    const SCHEMES: Names = &["sqlite"];
    const SERVER: bool = false;
    const PASS_THROUGH: &'static str = "mode";

    fn statements(p: &str) -> Statements {
        use Arg::*;
        Statements {
            // The lease table, the fence counter, and the triggers that keep the counter at
            // the highest token ever handed out, so tokens never go back, even when rows
            // are deleted.
            schema: format!(
                "CREATE TABLE IF NOT EXISTS {p}locks (
                    name TEXT PRIMARY KEY NOT NULL,
                    owner TEXT NOT NULL,
                    token INTEGER NOT NULL,
                    expires_at INTEGER NOT NULL
                ) WITHOUT ROWID;
                CREATE TABLE IF NOT EXISTS {p}fence (
                    id INTEGER PRIMARY KEY CHECK (id = 1),
                    value INTEGER NOT NULL
                );
                INSERT OR IGNORE INTO {p}fence (id, value) VALUES (1, 0);
                CREATE TABLE IF NOT EXISTS {p}lock_values (
                    name TEXT PRIMARY KEY NOT NULL,
                    token INTEGER NOT NULL,
                    owner TEXT NOT NULL,
                    value TEXT NOT NULL
                ) WITHOUT ROWID;
                CREATE TRIGGER IF NOT EXISTS {p}fence_insert AFTER INSERT ON {p}locks
                BEGIN
                    UPDATE {p}fence SET value = NEW.token WHERE id = 1 AND value < NEW.token;
                END;
                CREATE TRIGGER IF NOT EXISTS {p}fence_update AFTER UPDATE OF token ON {p}locks
                BEGIN
                    UPDATE {p}fence SET value = NEW.token WHERE id = 1 AND value < NEW.token;
                END;"
            ),
            // A lease stored as ending at millisecond `e` is held through all of `e` (taken
            // over only once `now > e`), so it never ends before the holder's
            // `valid_until`, which is measured from before the statement. The token, one
            // above the counter, is set with the row and returned by the same statement.
            acquire: Sql::scalar(
                format!(
                    "INSERT INTO {p}locks (name, owner, token, expires_at)
                     VALUES (?1, ?2, (SELECT value + 1 FROM {p}fence WHERE id = 1), ?3 + ?4)
                     ON CONFLICT (name) DO UPDATE
                         SET owner = excluded.owner, token = excluded.token,
                             expires_at = excluded.expires_at
                         WHERE {p}locks.expires_at < ?3
                     RETURNING token"
                ),
                &[Name, Owner, NowMs, TtlMs],
            ),
            table_fence: None,
            take_over: None,
            time_left: Sql::scalar(
                format!("SELECT expires_at - ?2 FROM {p}locks WHERE name = ?1"),
                &[Name, NowMs],
            ),
            extend: Sql::count(
                format!(
                    "UPDATE {p}locks SET expires_at = ?3 + ?4
                     WHERE name = ?1 AND owner = ?2 AND expires_at >= ?3"
                ),
                &[Name, Owner, NowMs, TtlMs],
            ),
            // One statement, one commit for the batch (UPDATE ... FROM: SQLite 3.33+, JSON
            // functions built in since 3.38; an older SQLite fails it, and the rows are
            // extended one by one). The same checks as `extend`, per row.
            extend_many: Some(Sql::count(
                format!(
                    "UPDATE {p}locks SET expires_at = ?1 + b.ttl
                     FROM (SELECT json_extract(value, '$.name') AS name,
                                  json_extract(value, '$.owner') AS owner,
                                  json_extract(value, '$.ttl') AS ttl
                           FROM json_each(?2)) AS b
                     WHERE {p}locks.name = b.name AND {p}locks.owner = b.owner
                       AND {p}locks.expires_at >= ?1"
                ),
                &[NowMs, Rows],
            )),
            release: [
                Sql::count(
                    format!(
                        "DELETE FROM {p}locks WHERE name = ?1 AND owner = ?2 AND expires_at >= ?3"
                    ),
                    &[Name, Owner, NowMs],
                ),
                Sql::count(
                    format!("DELETE FROM {p}locks WHERE name = ?1 AND owner = ?2"),
                    &[Name, Owner],
                ),
            ],
            // The row's own token; never over a later holder's value. (The `WHERE` of the
            // `SELECT` keeps SQLite from reading `ON CONFLICT` as a join's `ON`.)
            set_value: Sql::count(
                format!(
                    "INSERT INTO {p}lock_values (name, token, owner, value)
                     SELECT name, token, owner, ?4 FROM {p}locks
                     WHERE name = ?1 AND owner = ?2 AND expires_at >= ?3
                     ON CONFLICT (name) DO UPDATE SET token = excluded.token,
                         owner = excluded.owner, value = excluded.value
                     WHERE {p}lock_values.token <= excluded.token"
                ),
                &[Name, Owner, NowMs, Value],
            ),
            advisory: None,
        }
    }

    fn fence(t: &str) -> FenceSql {
        FenceSql {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {t} (resource TEXT PRIMARY KEY NOT NULL,
                 token INTEGER NOT NULL) WITHOUT ROWID"
            ),
            // A write: it takes the database's write lock, to the caller's commit.
            record: Sql::scalar(
                format!(
                    "INSERT INTO {t} (resource, token) VALUES (?1, ?2)
                     ON CONFLICT (resource) DO UPDATE SET token = MAX(token, excluded.token)
                     RETURNING token"
                ),
                &[Arg::Name, Arg::Token],
            ),
            highest: None,
        }
    }

    /// `sqlite://path/to/file.db` (`sqlite:///abs/path.db`), `sqlite:relative.db`,
    /// `sqlite::memory:` (one database per client), with `?mode=ro|rw|rwc|memory`.
    fn target(url: &mut ServiceUrl, settings: &Settings) -> Result<Target<Self>> {
        let hosts: Vec<String> = url.hosts().iter().map(ToString::to_string).collect();
        let file = format!("{}{}", hosts.join(","), url.path());
        let mode = url.take("mode");
        let in_memory = file == ":memory:" || mode.as_deref() == Some("memory");
        let options = match file.as_str() {
            // A private in-memory database of a unique name, as sqlx names it.
            ":memory:" => SqliteConnectOptions::from_str("sqlite::memory:"),
            _ => Ok(SqliteConnectOptions::new().filename(&file)),
        };
        let mut options = options
            .map_err(|e| url.error(format_args!("SQLite: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(settings.busy_timeout)
            .synchronous(match settings.durable {
                true => SqliteSynchronous::Full,
                false => SqliteSynchronous::Normal,
            });
        options = match mode.as_deref() {
            None | Some("rwc") => options,
            Some("rw") => options.create_if_missing(false),
            Some("ro") => options.read_only(true),
            Some("memory") => options.in_memory(true).shared_cache(true),
            Some(other) => {
                return Err(url.error(format_args!(
                    "the parameter `mode={other}`: use ro, rw, rwc or memory"
                )))
            }
        };
        // Canonical once the file exists, so every client of one file shares wake-ups.
        let database = (!in_memory).then(|| {
            let path = std::fs::canonicalize(&file).unwrap_or_else(|_| file.clone().into());
            path.display().to_string()
        });
        Ok(Target {
            options,
            address: None,
            database,
        })
    }

    fn pool(pool: PoolOptions<sqlx::Sqlite>, target: &Target<Self>) -> PoolOptions<sqlx::Sqlite> {
        if target.database.is_some() {
            return pool;
        }
        // The database lives as long as its one connection stays open.
        pool.max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
    }

    fn state(_: &str) {}

    fn connection_lost(e: &dyn DatabaseError) -> bool {
        // BUSY, LOCKED, IOERR, CANTOPEN (and their extended codes).
        e.code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 14))
    }

    async fn advisory_key(_: &Shared<Self>, _: &LockName) -> Result<Key> {
        Err(Error::Unsupported("SQLite has no advisory locks".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SqlOptions, SqliteLock};

    fn file_of(url: &str) -> String {
        let (settings, mut url) = Settings::resolve::<Sqlite>(url, SqlOptions::new()).unwrap();
        let target = Sqlite::target(&mut url, &settings).unwrap();
        target.options.get_filename().display().to_string()
    }

    #[test]
    fn every_url_form_names_its_file() {
        assert_eq!(file_of("sqlite:///abs/locks.db"), "/abs/locks.db");
        assert_eq!(file_of("sqlite://dir/locks.db"), "dir/locks.db");
        assert_eq!(file_of("sqlite:relative.db"), "relative.db");
        assert_eq!(file_of("sqlite:dir/with%3Fmark.db"), "dir/with?mark.db");
    }

    #[tokio::test]
    async fn memory_and_files_open_and_parameters_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("locks.db");
        for url in [
            "sqlite::memory:".to_string(),
            format!("sqlite://{}?busy_timeout=1s&durable=false", file.display()),
            format!("sqlite:{}?mode=rw", file.display()),
        ] {
            SqliteLock::connect(&url).await.expect(&url);
        }
        let err = SqliteLock::connect("sqlite::memory:?colour=red&wait_slice=1s")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`colour`") && err.contains("`wait_slice`"),
            "{err}"
        );
        let advisory = SqliteLock::connect("sqlite::memory:?strategy=advisory").await;
        assert!(advisory.is_err());
        // Code wins over the URL.
        let explicit = SqlOptions::new().strategy(crate::Strategy::Table);
        SqliteLock::connect_with("sqlite::memory:?strategy=advisory", explicit)
            .await
            .unwrap();
    }
}
