//! What differs between the databases: the SQL text of each step, the URL parameters passed
//! to sqlx, which error codes mean a lost connection or a lost race, and the few mechanisms
//! only one database has (PostgreSQL's `LISTEN`, MySQL's hashed `GET_LOCK` names, SQLite's
//! pragmas and fence triggers). The strategies (`advisory.rs`, `table.rs`, `lease.rs`) run
//! these statements and never name a database.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lockkit_core::backend::LockName;
use lockkit_core::url::ServiceUrl;
use lockkit_core::Result;
use sqlx::any::AnyQueryResult;
use sqlx::database::Database;
use sqlx::error::DatabaseError;
use sqlx::pool::{Pool, PoolConnection, PoolOptions};
use sqlx::{ColumnIndex, Connection, Decode, Encode, Executor, IntoArguments, Row, Type};

use crate::lock::Shared;
use crate::options::Settings;
use crate::wait::millis;
use crate::warm::Warm;

#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "mysql")]
pub use mysql::MySql;
#[cfg(feature = "postgres")]
pub use postgres::Postgres;
#[cfg(feature = "sqlite")]
pub use sqlite::Sqlite;

/// A database lockkit-sql locks on: [`Postgres`], [`MySql`] (MySQL and MariaDB) or
/// [`Sqlite`]. Sealed: the crate's own three are all there are.
pub trait Dialect: hooks::Hooks {}

impl<T: hooks::Hooks> Dialect for T {}

/// A value bound to a statement, named by what it stands for; each statement lists the ones
/// it takes in the order its placeholders want them.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    /// The lock name.
    Name,
    /// The lease row's owner id.
    Owner,
    /// The TTL in milliseconds.
    TtlMs,
    /// The local clock in milliseconds since the epoch (SQLite; servers use their own).
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    NowMs,
    /// The advisory key (PostgreSQL: a number, MySQL: a `GET_LOCK` name).
    #[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
    Key,
    /// The server-side wait in milliseconds.
    #[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
    SliceMs,
    /// A fencing token: presented to a fence table, or the holder's, stored with its value.
    Token,
    /// The value a holder stores with its lock (`Lease::set_value`).
    Value,
    /// Many lease rows at once, as a JSON array of `{"name", "owner", "ttl"}` objects.
    Rows,
}

/// What a statement yields, read as one optional number.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Out {
    /// The rows it changed.
    Count,
    /// The first column of its first row (`None`: no row, or NULL).
    Scalar,
    /// The `LAST_INSERT_ID()` it set (MySQL).
    #[cfg_attr(not(feature = "mysql"), allow(dead_code))]
    InsertId,
}

/// One statement of a dialect.
#[derive(Debug, Clone)]
pub(crate) struct Sql {
    text: String,
    args: &'static [Arg],
    out: Out,
}

impl Sql {
    /// A statement whose result is the number of rows it changed.
    pub(crate) fn count(text: String, args: &'static [Arg]) -> Self {
        Sql {
            text,
            args,
            out: Out::Count,
        }
    }

    /// A statement whose result is one number (or none).
    pub(crate) fn scalar(text: impl Into<String>, args: &'static [Arg]) -> Self {
        Sql {
            text: text.into(),
            args,
            out: Out::Scalar,
        }
    }

    /// A statement whose result is the insert id it set.
    #[cfg(feature = "mysql")]
    pub(crate) fn insert_id(text: String, args: &'static [Arg]) -> Self {
        Sql {
            text,
            args,
            out: Out::InsertId,
        }
    }
}

/// The advisory-lock statements of a database that has them. A session may hold many locks,
/// and is armed (made to end once silent for as long as the longest TTL of its locks) before
/// or in the statement that takes one, so there is no moment it holds a lock unarmed.
#[derive(Debug)]
pub(crate) struct AdvisorySql {
    /// Makes the server end this session once it has been silent for [`Arg::TtlMs`]
    /// (PostgreSQL `idle_session_timeout`, MySQL `wait_timeout`), so a frozen holder's locks
    /// end at their TTL. Also the renewal of every lock of the session: it restarts the
    /// clock, and the session being alive is what keeps its locks.
    pub(crate) arm: Sql,
    /// Takes the lock without waiting. With `fence` `None` (PostgreSQL) it also arms the
    /// session for [`Arg::TtlMs`] and bumps the fence counter, in one statement: the token,
    /// or 0 if held elsewhere. Otherwise 1 if taken, 0 if held elsewhere.
    pub(crate) take: Sql,
    /// Waits for the lock on the server for at most [`Arg::SliceMs`]; as `take` with or
    /// without `fence`, except that a wait that ran out is 0 or a
    /// [`hooks::Hooks::lost_race`] error (which changed nothing).
    pub(crate) wait: Sql,
    /// Run on the session that has just taken a lock with `take` or `wait`, armed before
    /// them with `arm`: its fencing token (MySQL). `None`: they return the token themselves.
    pub(crate) fence: Option<Sql>,
    /// 1 if this session held the lock and has let it go.
    pub(crate) unlock: Sql,
    /// Lets go of the lock if this session holds it: after a statement that failed, and
    /// may have taken it first (a session lock outlives the failed statement).
    pub(crate) unlock_if_held: Sql,
    /// Stores [`Arg::Value`] in `<prefix>lock_values` with the name, our token and this
    /// session's id as the owner (as inspect shows it) if this session holds the lock
    /// ([`Arg::Key`]), never over a later holder's value: more than 0 if stored.
    /// PostgreSQL also `NOTIFY`s the observers.
    pub(crate) set_value: Sql,
    /// Run on the session right after it let go of a lock it had stored a value with:
    /// deletes that value (name, token), so a later lock of the name on the same session
    /// (the same owner id) never shows it. PostgreSQL also `NOTIFY`s the observers.
    pub(crate) clear_value: Sql,
}

/// Every statement of a dialect, with the configured table prefix.
#[derive(Debug)]
pub(crate) struct Statements {
    /// Creates the tables (one script, idempotent).
    pub(crate) schema: String,
    /// Takes the lease row if it is free or expired: its fencing token if taken, in the
    /// same statement (PostgreSQL, SQLite), or 1 when `table_fence` takes the token.
    pub(crate) acquire: Sql,
    /// MySQL: the token of a row `acquire` or `take_over` took, in one transaction with
    /// them, so the row stays locked until its token is taken.
    pub(crate) table_fence: Option<Sql>,
    /// Tried when `acquire` took nothing (MySQL: the expired row, after `INSERT IGNORE`).
    pub(crate) take_over: Option<Sql>,
    /// Milliseconds left on the holder's lease.
    pub(crate) time_left: Sql,
    /// Extends our lease row if it is ours and in time: 1 if extended.
    pub(crate) extend: Sql,
    /// Extends many lease rows ([`Arg::Rows`]) each if ours and in time, in one statement:
    /// the number extended. `None`: one `extend` per row.
    pub(crate) extend_many: Option<Sql>,
    /// Deletes our row if in time; then, failing that, if ours at all (late).
    pub(crate) release: [Sql; 2],
    /// Stores [`Arg::Value`] in `<prefix>lock_values` with our row's name, owner and token
    /// ([`Arg::Token`]) if the row is ours and in time, never over a later holder's (higher
    /// token) value: more than 0 if stored. PostgreSQL also `NOTIFY`s the observers.
    pub(crate) set_value: Sql,
    /// `None`: the database has no advisory locks (SQLite).
    pub(crate) advisory: Option<AdvisorySql>,
}

/// The statements of a fence table (`crate::fence`), with its name.
#[derive(Debug, Clone)]
pub(crate) struct FenceSql {
    /// Creates the table (one script, idempotent).
    pub(crate) create: String,
    /// Raises the resource's ([`Arg::Name`]) recorded token to [`Arg::Token`] if that is
    /// higher, locking its row to the end of the caller's transaction; a scalar statement
    /// returns the highest token after it.
    pub(crate) record: Sql,
    /// Read after `record` when it returns no value (MySQL has no `RETURNING`): the highest
    /// token, by a locking read, so the latest committed row is read, not a snapshot.
    pub(crate) highest: Option<Sql>,
}

/// An advisory-lock key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    /// PostgreSQL's 64-bit key.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Int(i64),
    /// MySQL's `GET_LOCK` name.
    #[cfg_attr(not(feature = "mysql"), allow(dead_code))]
    Text(String),
}

/// The values a statement may bind.
#[derive(Debug)]
pub(crate) struct Bind<'a> {
    name: &'a str,
    owner: &'a str,
    ttl_ms: i64,
    now_ms: i64,
    key: Option<&'a Key>,
    slice_ms: i64,
    token: i64,
    rows: &'a str,
    value: &'a str,
}

impl<'a> Bind<'a> {
    /// The values of `name`, read on the local clock now.
    pub(crate) fn new(name: &'a LockName) -> Self {
        Bind {
            name: name.as_str(),
            owner: "",
            ttl_ms: 0,
            now_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            key: None,
            slice_ms: 0,
            token: 0,
            rows: "",
            value: "",
        }
    }

    /// The values of a fence check: the resource (bound as [`Arg::Name`]) and the token.
    pub(crate) fn fence(resource: &'a str, token: i64) -> Self {
        Bind {
            name: resource,
            owner: "",
            ttl_ms: 0,
            now_ms: 0,
            key: None,
            slice_ms: 0,
            token,
            rows: "",
            value: "",
        }
    }

    /// With a lease row's owner and TTL.
    pub(crate) fn lease(mut self, owner: &'a str, ttl: Duration) -> Self {
        self.owner = owner;
        self.ttl(ttl)
    }

    /// With a TTL.
    pub(crate) fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl_ms = millis(ttl);
        self
    }

    /// With the holder's fencing token.
    pub(crate) fn token(mut self, token: i64) -> Self {
        self.token = token;
        self
    }

    /// With a value to store.
    pub(crate) fn value(mut self, value: &'a str) -> Self {
        self.value = value;
        self
    }

    /// With many lease rows, as JSON.
    pub(crate) fn rows(mut self, rows: &'a str) -> Self {
        self.rows = rows;
        self
    }

    /// With an advisory key and, for a wait, its slice.
    pub(crate) fn key(mut self, key: &'a Key, slice: Option<Duration>) -> Self {
        self.key = Some(key);
        self.slice_ms = slice.map_or(0, |s| millis(s).max(1));
        self
    }
}

/// A list of names (URL schemes).
pub(crate) type Names = &'static [&'static str];

/// Where a statement runs: on the pool, on a connection kept warm for the lease table
/// (else the pool's), or on one connection (one that holds a session lock, or is in a
/// transaction).
pub(crate) enum On<'a, DB: Database> {
    /// PostgreSQL's advisory keys only.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Pool(&'a Pool<DB>),
    Warm(&'a Warm<DB>, &'a Pool<DB>),
    Conn(&'a mut DB::Connection),
}

/// A sqlx database the strategies can run [`Sql`] on. Implemented for every driver that
/// binds and reads 64-bit integers and text; the bounds live here once.
pub(crate) trait Db: Database {
    /// Runs `sql` with its arguments from `bind`, and reads its [`Out`].
    fn run<'a>(
        on: On<'a, Self>,
        sql: &'a Sql,
        bind: &'a Bind<'a>,
    ) -> impl Future<Output = Result<Option<i64>, sqlx::Error>> + Send + 'a;

    /// Runs a script of several statements (the schema).
    fn script<'a>(
        pool: &'a Pool<Self>,
        text: &'a str,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'a;

    /// Runs a script of several statements on one connection.
    fn script_on<'a>(
        conn: &'a mut Self::Connection,
        text: &'a str,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'a;
}

impl<DB> Db for DB
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    i64: Type<DB> + for<'q> Encode<'q, DB> + for<'r> Decode<'r, DB>,
    for<'q> &'q str: Type<DB> + Encode<'q, DB>,
    usize: ColumnIndex<DB::Row>,
    DB::QueryResult: Into<AnyQueryResult>,
{
    async fn run<'a>(
        on: On<'a, Self>,
        sql: &'a Sql,
        bind: &'a Bind<'a>,
    ) -> Result<Option<i64>, sqlx::Error> {
        let (mut pooled, mut warm): (Option<PoolConnection<DB>>, _) = (None, None);
        let conn: &mut DB::Connection = match on {
            On::Conn(conn) => conn,
            On::Pool(pool) => pooled.insert(pool.acquire().await?),
            On::Warm(kept, pool) => warm.insert(kept.acquire(pool).await?).conn(),
        };
        let result = async move {
            let mut query = sqlx::query::<DB>(&sql.text);
            for arg in sql.args {
                query = match (arg, bind.key) {
                    // Text borrowed from the caller for the statement: not copied.
                    (Arg::Name, _) => query.bind(bind.name),
                    (Arg::Owner, _) => query.bind(bind.owner),
                    (Arg::TtlMs, _) => query.bind(bind.ttl_ms),
                    (Arg::NowMs, _) => query.bind(bind.now_ms),
                    (Arg::SliceMs, _) => query.bind(bind.slice_ms),
                    (Arg::Token, _) => query.bind(bind.token),
                    (Arg::Rows, _) => query.bind(bind.rows),
                    (Arg::Value, _) => query.bind(bind.value),
                    (Arg::Key, Some(Key::Int(key))) => query.bind(*key),
                    (Arg::Key, Some(Key::Text(key))) => query.bind(key.as_str()),
                    (Arg::Key, None) => unreachable!("a key statement without a key"),
                };
            }
            Ok(match sql.out {
                Out::Scalar => match query.fetch_optional(&mut *conn).await? {
                    Some(row) => row.try_get::<Option<i64>, _>(0)?,
                    None => None,
                },
                Out::Count => {
                    let done: AnyQueryResult = query.execute(&mut *conn).await?.into();
                    Some(done.rows_affected() as i64)
                }
                Out::InsertId => {
                    let done: AnyQueryResult = query.execute(&mut *conn).await?.into();
                    done.last_insert_id()
                }
            })
        }
        .await;
        if let Some(warm) = &mut warm {
            warm.settle(&result);
        }
        result
    }

    async fn script<'a>(pool: &'a Pool<Self>, text: &'a str) -> Result<(), sqlx::Error> {
        let mut conn = pool.acquire().await?;
        Self::script_on(&mut conn, text).await
    }

    async fn script_on<'a>(conn: &'a mut DB::Connection, text: &'a str) -> Result<(), sqlx::Error> {
        // Unprepared text: one round trip that may hold several statements.
        conn.execute(text).await.map(drop)
    }
}

/// The sqlx connect options of a dialect's driver.
pub(crate) type ConnectOptions<D> =
    <<<D as hooks::Hooks>::Db as Database>::Connection as Connection>::Options;

/// Where a client connects, as its dialect read it from the URL.
pub(crate) struct Target<D: hooks::Hooks> {
    /// The driver's options.
    pub(crate) options: ConnectOptions<D>,
    /// The server's `host[:port]`, for errors (`None`: a file).
    pub(crate) address: Option<String>,
    /// Names the database for the wake-ups shared by its clients in this process (`None`:
    /// a database no other client can open, such as SQLite's `:memory:`).
    pub(crate) database: Option<String>,
}

pub(crate) mod hooks {
    //! The sealed part of [`Dialect`](super::Dialect).
    #![allow(unreachable_pub)]

    use super::*;

    /// Everything the generic code asks of a database. Public only in name, so that
    /// [`Dialect`](super::Dialect) can be public and sealed; its items speak the crate's
    /// own types.
    #[allow(private_interfaces, private_bounds)]
    pub trait Hooks: Sized + Send + Sync + Debug + 'static {
        /// The sqlx driver.
        type Db: Db;
        /// What a client of this database keeps besides the pool (advisory keys, a
        /// listener).
        type State: Send + Sync + Debug;

        /// The URL schemes.
        const SCHEMES: Names;
        /// The backend's name in errors and metrics: its first scheme.
        const NAME: &'static str = Self::SCHEMES[0];
        /// A server database (networked, with advisory locks, the default strategy then),
        /// as opposed to a local file with only the lease table.
        const SERVER: bool = true;
        /// URL parameters passed to sqlx as they are, separated by spaces.
        const PASS_THROUGH: &'static str;
        /// Longest pause between re-checks of a lease-table wait, by default: short, as
        /// only waiters in this process are woken on release.
        const MAX_POLL: Duration = Duration::from_millis(100);
        /// Whether the server tells observers of changes (PostgreSQL's `NOTIFY`, heard by
        /// the task [`Hooks::listen`] starts): `Admin::changed` then waits for them.
        const WATCH: bool = false;

        /// The statements, with the table prefix `p`.
        fn statements(p: &str) -> Statements;

        /// The statements of the fence table `table` (a checked identifier).
        fn fence(table: &str) -> FenceSql;

        /// Reads the connect options from `url` (its pass-through parameters taken). By
        /// default a server's: `scheme://user:password@host:port/database`.
        fn target(url: &mut ServiceUrl, _settings: &Settings) -> Result<Target<Self>> {
            crate::options::server_target(url)
        }

        /// Adjusts the pool (per-connection setup, in-memory lifetimes).
        fn pool(pool: PoolOptions<Self::Db>, _target: &Target<Self>) -> PoolOptions<Self::Db> {
            pool
        }

        /// Checks the server can keep the promises of `settings` (PostgreSQL: version 14+
        /// for advisory locks, which need `idle_session_timeout`).
        fn check_server(
            _pool: &Pool<Self::Db>,
            _settings: &Settings,
        ) -> impl Future<Output = Result<()>> + Send {
            async { Ok(()) }
        }

        /// Fresh client state.
        fn state(p: &str) -> Self::State;

        /// Whether a database error means the connection is lost or the server is not
        /// taking connections (retryable).
        fn connection_lost(e: &dyn DatabaseError) -> bool;

        /// Whether a database error means the statement lost a race and changed nothing
        /// (a deadlock victim, a lock wait that timed out).
        fn lost_race(_e: &dyn DatabaseError) -> bool {
            false
        }

        /// The advisory key of `name`.
        fn advisory_key(
            lock: &Shared<Self>,
            name: &LockName,
        ) -> impl Future<Output = Result<Key>> + Send;

        /// Starts whatever wakes lease-table waiters from other clients (PostgreSQL's
        /// `LISTEN`), once.
        fn listen(_lock: &Shared<Self>) {}
    }
}
