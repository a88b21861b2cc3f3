//! MySQL and MariaDB: `GET_LOCK` on hashed names, the server's clock, `VARBINARY` names
//! compared byte for byte, and InnoDB deadlock victims counted as lost races.

use lockkit_core::backend::LockName;
use lockkit_core::Result;
use sha2::{Digest, Sha256};
use sqlx::error::DatabaseError;
use sqlx::mysql::MySqlDatabaseError;
use sqlx::pool::PoolOptions;

use super::hooks::Hooks;
use super::{AdvisorySql, Arg, FenceSql, Key, Names, Sql, Statements, Target};
use crate::lock::Shared;
use crate::SqlLock;

/// MySQL and MariaDB (feature `mysql`): `GET_LOCK` by default, or the lease table.
#[derive(Debug)]
pub struct MySql;

/// The server's clock in milliseconds since the epoch.
const NOW: &str = "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)";

// The hooks speak the crate's own types: the trait is sealed.
#[allow(private_interfaces)]
impl Hooks for MySql {
    type Db = sqlx::MySql;
    type State = ();

    const SCHEMES: Names = &["mysql", "mariadb"];
    const PASS_THROUGH: &'static str = "ssl-mode sslmode ssl-ca ssl-cert ssl-key charset collation";

    fn statements(p: &str) -> Statements {
        use Arg::*;
        let fence = Sql::insert_id(
            format!(
                "INSERT INTO {p}fences (name, value) VALUES (?, LAST_INSERT_ID(1))
                 ON DUPLICATE KEY UPDATE value = LAST_INSERT_ID(value + 1)"
            ),
            &[Name],
        );
        // Stores the value of the row that follows unless a later holder (a higher token) has
        // stored one: the token is assigned last, after the columns compared with it.
        let store = |row: &str| {
            let t = format!("{p}lock_values");
            let newer = format!("VALUES(token) >= {t}.token");
            format!(
                "INSERT INTO {t} (name, token, owner, value) {row}
                 ON DUPLICATE KEY UPDATE owner = IF({newer}, VALUES(owner), {t}.owner),
                     value = IF({newer}, VALUES(value), {t}.value),
                     token = GREATEST({t}.token, VALUES(token))"
            )
        };
        Statements {
            schema: format!(
                "CREATE TABLE IF NOT EXISTS {p}fences (name VARBINARY(255) PRIMARY KEY,
                 value BIGINT NOT NULL) ENGINE=InnoDB;
                 CREATE TABLE IF NOT EXISTS {p}locks (name VARBINARY(255) PRIMARY KEY,
                 owner CHAR(32) NOT NULL, expires_at BIGINT NOT NULL) ENGINE=InnoDB;
                 CREATE TABLE IF NOT EXISTS {p}lock_values (name VARBINARY(255) PRIMARY KEY,
                 token BIGINT NOT NULL, owner VARCHAR(64) NOT NULL,
                 value TEXT CHARACTER SET utf8mb4 NOT NULL) ENGINE=InnoDB;"
            ),
            acquire: Sql::count(
                format!(
                    "INSERT IGNORE INTO {p}locks (name, owner, expires_at) VALUES (?, ?, {NOW} + ?)"
                ),
                &[Name, Owner, TtlMs],
            ),
            // Run in one transaction with `acquire` and `take_over`, whose row lock it keeps.
            table_fence: Some(fence.clone()),
            take_over: Some(Sql::count(
                format!(
                    "UPDATE {p}locks SET owner = ?, expires_at = {NOW} + ?
                     WHERE name = ? AND expires_at < {NOW}"
                ),
                &[Owner, TtlMs, Name],
            )),
            time_left: Sql::scalar(
                format!("SELECT expires_at - {NOW} FROM {p}locks WHERE name = ?"),
                &[Name],
            ),
            extend: Sql::count(
                format!(
                    "UPDATE {p}locks SET expires_at = {NOW} + ?
                     WHERE name = ? AND owner = ? AND expires_at >= {NOW}"
                ),
                &[TtlMs, Name, Owner],
            ),
            // JSON_TABLE: MySQL 8, MariaDB 10.6+ (elsewhere it fails, and rows are extended
            // one by one). Names compared as bytes, as stored.
            extend_many: Some(Sql::count(
                format!(
                    "UPDATE {p}locks AS l JOIN JSON_TABLE(?, '$[*]' COLUMNS (
                         name VARCHAR(255) CHARACTER SET utf8mb4 PATH '$.name',
                         owner CHAR(32) PATH '$.owner', ttl BIGINT PATH '$.ttl')) AS b
                       ON l.name = CAST(b.name AS BINARY) AND l.owner = b.owner
                     SET l.expires_at = {NOW} + b.ttl WHERE l.expires_at >= {NOW}"
                ),
                &[Rows],
            )),
            release: [format!("AND expires_at >= {NOW}"), String::new()].map(|in_time| {
                Sql::count(
                    format!("DELETE FROM {p}locks WHERE name = ? AND owner = ? {in_time}"),
                    &[Name, Owner],
                )
            }),
            set_value: Sql::count(
                store(&format!(
                    "SELECT name, ?, owner, ? FROM {p}locks
                     WHERE name = ? AND owner = ? AND expires_at >= {NOW}"
                )),
                &[Token, Value, Name, Owner],
            ),
            advisory: Some(AdvisorySql {
                // Whole seconds, rounded up; renewals run a statement at least every TTL/3,
                // which restarts the clock.
                arm: Sql::count(
                    "SET SESSION wait_timeout = LEAST(GREATEST(CEIL(? / 1000), 1), 31536000)"
                        .into(),
                    &[TtlMs],
                ),
                take: Sql::scalar("SELECT GET_LOCK(?, 0)", &[Key]),
                wait: Sql::scalar("SELECT GET_LOCK(?, ? / 1000)", &[Key, SliceMs]),
                fence: Some(fence),
                unlock: Sql::scalar("SELECT RELEASE_LOCK(?)", &[Key]),
                // NULL when nobody holds it, 0 when another session does.
                unlock_if_held: Sql::scalar("SELECT RELEASE_LOCK(?)", &[Key]),
                // The owner as inspect shows it: the connection holding the lock.
                set_value: Sql::count(
                    store(
                        "SELECT ?, ?, CONCAT('connection ', CONNECTION_ID()), ? FROM DUAL
                         WHERE IS_USED_LOCK(?) = CONNECTION_ID()",
                    ),
                    &[Name, Token, Value, Key],
                ),
                clear_value: Sql::count(
                    format!("DELETE FROM {p}lock_values WHERE name = ? AND token = ?"),
                    &[Name, Token],
                ),
            }),
        }
    }

    fn fence(t: &str) -> FenceSql {
        use Arg::*;
        FenceSql {
            // Byte-for-byte names, as the lock tables.
            create: format!(
                "CREATE TABLE IF NOT EXISTS {t} (resource VARBINARY(255) PRIMARY KEY,
                 token BIGINT NOT NULL) ENGINE=InnoDB"
            ),
            // Takes an exclusive lock on the row, inserted or not. Its affected-rows count
            // cannot tell "raised" from "already higher" (an unchanged row counts 0), so the
            // outcome is read by `highest`.
            record: Sql::count(
                format!(
                    "INSERT INTO {t} (resource, token) VALUES (?, ?)
                     ON DUPLICATE KEY UPDATE token = GREATEST(token, ?)"
                ),
                &[Name, Token, Token],
            ),
            // A locking read sees the latest committed row, where a plain one would see the
            // transaction's snapshot, older than a row this transaction did not change.
            highest: Some(Sql::scalar(
                format!("SELECT token FROM {t} WHERE resource = ? FOR UPDATE"),
                &[Name],
            )),
        }
    }

    fn pool(pool: PoolOptions<sqlx::MySql>, _: &Target<Self>) -> PoolOptions<sqlx::MySql> {
        // Fewer gap locks between concurrent lease-row statements.
        pool.after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    .execute(conn)
                    .await
                    .map(drop)
            })
        })
    }

    fn state(_: &str) {}

    fn connection_lost(e: &dyn DatabaseError) -> bool {
        // Too many connections, server shutdown, aborted or killed connections.
        e.try_downcast_ref::<MySqlDatabaseError>().is_some_and(|e| {
            matches!(
                e.number(),
                1040 | 1053 | 1152 | 1153 | 1158..=1161 | 1927 | 2002 | 2003 | 2006 | 2013
            )
        })
    }

    fn lost_race(e: &dyn DatabaseError) -> bool {
        // InnoDB deadlock (1213) or lock wait timeout (1205).
        e.try_downcast_ref::<MySqlDatabaseError>()
            .is_some_and(|e| matches!(e.number(), 1205 | 1213))
    }

    async fn advisory_key(lock: &Shared<Self>, name: &LockName) -> Result<Key> {
        Ok(Key::Text(lock_name(&lock.settings.table_prefix, name)))
    }
}

/// `GET_LOCK` names are limited to 64 characters and compared without regard to case on some
/// servers, so every lock name is mapped to `lockkit_` followed by 56 lowercase hex digits of
/// the SHA-256 of the table prefix and the name: 224 bits, so two names never meet in
/// practice, whatever their length, case or trailing spaces.
fn lock_name(prefix: &str, name: &LockName) -> String {
    let mut hash = Sha256::new();
    hash.update(prefix.as_bytes());
    hash.update([0]);
    hash.update(name.as_str().as_bytes());
    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("lockkit_{}", &hex[..56])
}

impl SqlLock<MySql> {
    /// The `GET_LOCK` name that stands for `name`.
    pub fn lock_name(&self, name: &LockName) -> String {
        lock_name(&self.shared().settings.table_prefix, name)
    }
}
