//! The floor of each backend: the least a lock costs through the plain client crate on the
//! same server, with nothing of lockkit on top.
//!
//! The **fenced** floor is the least a lock *with a fencing token* needs, the one lockkit's
//! ratio is taken against: a write that takes the key only if it is free, the token, and the
//! release. The token comes with the write where the server numbers its writes (etcd's
//! revision, ZooKeeper's `czxid`, Consul's `ModifyIndex`); elsewhere it is a counter bumped
//! once the key is taken (Redis and PostgreSQL in the same script or statement, MySQL in the
//! next statement). The **unfenced** floor, shown beside it where it differs, is the same lock
//! without the token, or for etcd and Consul a plain write and delete of the key, which is no
//! lock at all (it takes the key whether or not it is free) and the cheapest pair of round
//! trips there is.
//!
//! | scheme | fenced round | unfenced round |
//! |---|---|---|
//! | `redis`, `rediss` | one script: `SET key NX PX`, then `INCR` of a counter if it was set; `DEL key` | `SET key NX PX` + `DEL key` |
//! | `redlock`, `redlocks` | the same on every instance, instances in parallel | the same |
//! | `etcd` | a transaction putting the key, with a lease, if its create revision is 0 (its revision is the token) + delete | put + delete |
//! | `zk`, `zookeeper` | create + delete of an ephemeral node (its `czxid`) | the same |
//! | `consul` | a transaction taking the key with a session (`lock`; its `ModifyIndex`) + `?release`, on one keep-alive connection | KV `PUT` + `DELETE` |
//! | `postgres` advisory | one statement taking `pg_try_advisory_lock` and bumping a committed counter (a CTE) + `pg_advisory_unlock` | `pg_try_advisory_lock` + `pg_advisory_unlock` |
//! | `mysql`, `mariadb` advisory | `GET_LOCK` + the counter bump + `RELEASE_LOCK` | `GET_LOCK` + `RELEASE_LOCK` |
//! | PostgreSQL `strategy=table` | one statement inserting a row and bumping the counter (a CTE) + DELETE | INSERT + DELETE of the row |
//! | MySQL `strategy=table` | INSERT of a row + the counter bump + DELETE | INSERT + DELETE of the row |
//! | `sqlite` | INSERT + DELETE of a row (WAL, `synchronous=FULL`, as lockkit opens it): no token, a stricter floor | the same |
//!
//! The rows have no expiry, so nobody takes one over between its INSERT and the bump. A lease
//! row can be: lockkit's MySQL lease table takes its row and token in one transaction, so
//! that a holder delayed in between, its lease run out, never gets a token above the next
//! holder's. That transaction's `BEGIN` and `COMMIT` are counted as lockkit's cost.

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
use std::str::FromStr;

use lockkit_core::url::ServiceUrl;
use lockkit_core::BoxError;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

#[cfg(feature = "mysql")]
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection};
#[cfg(feature = "postgres")]
use sqlx::postgres::{PgConnectOptions, PgConnection};
#[cfg(feature = "sqlite")]
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
use sqlx::ConnectOptions;

#[cfg(feature = "etcd")]
use lockkit_etcd::etcd_client;
#[cfg(feature = "zk")]
use lockkit_zk::zookeeper_client as zk;

/// The table of the INSERT + DELETE floors and of the fenced floors' counters (valid SQL
/// for PostgreSQL, MySQL and SQLite).
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
const CREATE_ROWS: &str =
    "CREATE TABLE IF NOT EXISTS lockkit_bench_floor_rows (name VARCHAR(64) PRIMARY KEY)";
#[cfg(any(feature = "postgres", feature = "mysql"))]
const CREATE_COUNTER: &str = "CREATE TABLE IF NOT EXISTS lockkit_bench_floor_fences \
     (name VARCHAR(64) PRIMARY KEY, n BIGINT NOT NULL)";

/// DELETE of the round's row on a sqlx connection; `$p` is the database's placeholder (`$1`
/// or `?`).
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
macro_rules! delete_row {
    ($conn:expr, $key:expr, $p:literal) => {{
        sqlx::query(concat!(
            "DELETE FROM lockkit_bench_floor_rows WHERE name = ",
            $p
        ))
        .bind($key)
        .execute($conn)
        .await?;
    }};
}

/// INSERT of the round's row on a sqlx connection; `$p` as for [`delete_row`].
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
macro_rules! insert_row {
    ($conn:expr, $key:expr, $p:literal) => {{
        sqlx::query(concat!(
            "INSERT INTO lockkit_bench_floor_rows VALUES (",
            $p,
            ")"
        ))
        .bind($key)
        .execute($conn)
        .await?;
    }};
}

/// DELETE of the key's counter row on a `Mutex` of a sqlx connection, as a `Result`.
#[cfg(any(feature = "postgres", feature = "mysql"))]
macro_rules! delete_counter {
    ($conn:expr, $key:expr, $p:literal) => {
        sqlx::query(concat!(
            "DELETE FROM lockkit_bench_floor_fences WHERE name = ",
            $p
        ))
        .bind($key)
        .execute(&mut *$conn.lock().await)
        .await
        .map(drop)
        .map_err(BoxError::from)
    };
}

/// The fenced Redis round's take: the key if free, and then the counter's next value (0: the
/// key was taken).
#[cfg(feature = "redis")]
static TAKE_AND_COUNT: std::sync::LazyLock<::redis::Script> = std::sync::LazyLock::new(|| {
    ::redis::Script::new(
        "if redis.call('SET', KEYS[1], 'owner', 'NX', 'PX', ARGV[1]) then
             return redis.call('INCR', KEYS[2])
         end
         return 0",
    )
});

/// A connection to a backend's server through its plain client crate, ready to run floor
/// rounds.
pub struct Floor {
    fenced: &'static str,
    unfenced: Option<&'static str>,
    client: Client,
    /// The key, node, advisory lock or row one round takes and frees; this process's own.
    key: String,
}

enum Client {
    #[cfg(feature = "redis")]
    Redis(Vec<::redis::aio::ConnectionManager>),
    /// With the lease its fenced rounds put the key with.
    #[cfg(feature = "etcd")]
    Etcd(Box<etcd_client::Client>, i64),
    #[cfg(feature = "zk")]
    Zk(zk::Client, String),
    /// With the session its fenced rounds take the key with.
    Consul(Mutex<Http>, String),
    #[cfg(feature = "postgres")]
    PgAdvisory(Mutex<PgConnection>),
    #[cfg(feature = "mysql")]
    MySqlAdvisory(Mutex<MySqlConnection>),
    #[cfg(feature = "postgres")]
    PgTable(Mutex<PgConnection>),
    #[cfg(feature = "mysql")]
    MySqlTable(Mutex<MySqlConnection>),
    #[cfg(feature = "sqlite")]
    Sqlite(Mutex<SqliteConnection>),
}

impl Floor {
    /// Connects to the server of a lockkit URL, the way lockkit's backend for its scheme
    /// would reach it.
    pub async fn connect(url: &str) -> Result<Floor, BoxError> {
        let mut parsed = ServiceUrl::parse(url)?;
        let key = format!("lockkit-bench-floor-{}", std::process::id());
        let scheme = parsed.scheme().to_string();
        #[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(unused))]
        let table = match parsed.take("strategy").as_deref() {
            None | Some("advisory") => false,
            Some("table") => true,
            Some(other) => return Err(parsed.error(format!("unknown strategy {other}")).into()),
        };
        // The URL without lockkit's parameters, for the database drivers.
        #[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
        let bare = url.split('?').next().unwrap_or(url);
        let (fenced, unfenced, client) = match scheme.as_str() {
            #[cfg(feature = "redis")]
            "redis" | "rediss" | "redlock" | "redlocks" => {
                let redlock = scheme.starts_with("redlock");
                let scheme = if scheme == "rediss" || scheme == "redlocks" {
                    "rediss"
                } else {
                    "redis"
                };
                let auth = match (parsed.username(), parsed.password()) {
                    (_, None) => String::new(),
                    (user, Some(password)) => {
                        format!("{}:{password}@", user.unwrap_or_default())
                    }
                };
                let db = parsed.path().trim_matches('/').to_string();
                let mut instances = Vec::new();
                for host in parsed.expect_hosts()? {
                    let host = host.with_default_port(6379);
                    instances.push(redis(&format!("{scheme}://{auth}{host}/{db}")).await?);
                }
                let (fenced, unfenced) = match redlock {
                    true => (
                        "SET NX PX+INCR script + DEL on each",
                        "SET NX PX + DEL on each",
                    ),
                    false => ("SET NX PX+INCR script + DEL", "SET NX PX + DEL"),
                };
                (fenced, Some(unfenced), Client::Redis(instances))
            }
            #[cfg(feature = "etcd")]
            "etcd" => {
                let endpoints: Vec<String> = parsed
                    .expect_hosts()?
                    .iter()
                    .map(|h| h.with_default_port(2379))
                    .collect();
                let options = match (parsed.username(), parsed.password()) {
                    (Some(user), Some(password)) => {
                        Some(etcd_client::ConnectOptions::new().with_user(user, password))
                    }
                    _ => None,
                };
                let mut client = etcd_client::Client::connect(endpoints, options).await?;
                // Long enough for any run; the keys it carries are deleted every round.
                let lease = client.lease_grant(3600, None).await?.id();
                (
                    "txn put-if-absent + delete",
                    Some("put + delete (no lock)"),
                    Client::Etcd(Box::new(client), lease),
                )
            }
            #[cfg(feature = "zk")]
            "zk" | "zookeeper" => {
                let hosts: Vec<String> = parsed
                    .expect_hosts()?
                    .iter()
                    .map(|h| h.with_default_port(2181))
                    .collect();
                let client = zk::Client::connect(&hosts.join(",")).await?;
                let client = Client::Zk(client, hosts[0].clone());
                ("create + delete ephemeral", None, client)
            }
            "consul" => {
                let host = parsed.expect_hosts()?[0].with_default_port(8500);
                let token = parsed.take("token");
                let mut http = Http::connect(&host, token).await?;
                // Ends an hour after the run at the latest, with whatever it still holds.
                let body = r#"{"Name":"lockkit-bench-floor","TTL":"3600s","LockDelay":"0s","Behavior":"delete"}"#;
                let created = http.call("PUT", "/v1/session/create", body).await?;
                let session: serde_json::Value = serde_json::from_str(&created)?;
                let session = session["ID"].as_str().ok_or("no session id")?.to_string();
                (
                    "session lock (txn) + release",
                    Some("KV PUT + DELETE (no lock)"),
                    Client::Consul(Mutex::new(http), session),
                )
            }
            #[cfg(feature = "postgres")]
            "postgres" | "postgresql" => {
                let mut conn = PgConnectOptions::from_str(bare)?.connect().await?;
                sqlx::query(CREATE_ROWS).execute(&mut conn).await?;
                sqlx::query(CREATE_COUNTER).execute(&mut conn).await?;
                sqlx::query(
                    "INSERT INTO lockkit_bench_floor_fences VALUES ($1, 0) ON CONFLICT DO NOTHING",
                )
                .bind(&key)
                .execute(&mut conn)
                .await?;
                match table {
                    false => (
                        "try_advisory_lock+counter CTE + unlock",
                        Some("pg_try_advisory_lock + unlock"),
                        Client::PgAdvisory(Mutex::new(conn)),
                    ),
                    true => (
                        "INSERT+counter CTE + DELETE",
                        Some("INSERT + DELETE"),
                        Client::PgTable(Mutex::new(conn)),
                    ),
                }
            }
            #[cfg(feature = "mysql")]
            "mysql" | "mariadb" => {
                let bare = bare.replacen("mariadb:", "mysql:", 1);
                let mut conn = MySqlConnectOptions::from_str(&bare)?.connect().await?;
                sqlx::query(CREATE_ROWS).execute(&mut conn).await?;
                sqlx::query(CREATE_COUNTER).execute(&mut conn).await?;
                sqlx::query("INSERT IGNORE INTO lockkit_bench_floor_fences VALUES (?, 0)")
                    .bind(&key)
                    .execute(&mut conn)
                    .await?;
                match table {
                    false => (
                        "GET_LOCK + counter + RELEASE_LOCK",
                        Some("GET_LOCK + RELEASE_LOCK"),
                        Client::MySqlAdvisory(Mutex::new(conn)),
                    ),
                    true => (
                        "INSERT + counter + DELETE",
                        Some("INSERT + DELETE"),
                        Client::MySqlTable(Mutex::new(conn)),
                    ),
                }
            }
            #[cfg(feature = "sqlite")]
            "sqlite" => {
                let mut conn = SqliteConnectOptions::from_str(bare)?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(std::time::Duration::from_secs(5))
                    .connect()
                    .await?;
                sqlx::query(CREATE_ROWS).execute(&mut conn).await?;
                ("INSERT + DELETE", None, Client::Sqlite(Mutex::new(conn)))
            }
            other => {
                return Err(parsed
                    .error(format!("no floor for scheme {other} in this build"))
                    .into())
            }
        };
        Ok(Floor {
            fenced,
            unfenced,
            client,
            key,
        })
    }

    /// What one fenced round does, for the table.
    pub fn fenced_what(&self) -> &'static str {
        self.fenced
    }

    /// What one unfenced round does, where it differs from the fenced one.
    pub fn unfenced_what(&self) -> Option<&'static str> {
        self.unfenced
    }

    /// The server's version, as it reports it (`unknown` where it will not say).
    pub async fn version(&self) -> String {
        self.try_version()
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| "unknown".into())
    }

    async fn try_version(&self) -> Result<Option<String>, BoxError> {
        Ok(match &self.client {
            #[cfg(feature = "redis")]
            Client::Redis(instances) => {
                let mut conn = instances[0].clone();
                let info: String = ::redis::cmd("INFO")
                    .arg("server")
                    .query_async(&mut conn)
                    .await?;
                info.lines()
                    .find_map(|l| l.strip_prefix("redis_version:"))
                    .map(|v| v.trim().to_string())
            }
            #[cfg(feature = "etcd")]
            Client::Etcd(client, _) => {
                let status = etcd_client::Client::clone(client).status().await?;
                Some(status.version().to_string())
            }
            #[cfg(feature = "zk")]
            Client::Zk(_, host) => {
                let read = async {
                    let mut stream = TcpStream::connect(host.as_str()).await?;
                    stream.write_all(b"srvr").await?;
                    let mut text = String::new();
                    stream.read_to_string(&mut text).await?;
                    Ok::<_, std::io::Error>(text)
                };
                let text = tokio::time::timeout(std::time::Duration::from_secs(2), read).await??;
                text.lines()
                    .find_map(|l| l.strip_prefix("Zookeeper version:"))
                    .map(|v| v.split([',', '-']).next().unwrap_or(v).trim().to_string())
            }
            Client::Consul(http, _) => {
                let body = http.lock().await.call("GET", "/v1/agent/self", "").await?;
                let json: serde_json::Value = serde_json::from_str(&body)?;
                json["Config"]["Version"].as_str().map(str::to_string)
            }
            #[cfg(feature = "postgres")]
            Client::PgAdvisory(conn) | Client::PgTable(conn) => {
                let mut conn = conn.lock().await;
                Some(
                    sqlx::query_scalar("SHOW server_version")
                        .fetch_one(&mut *conn)
                        .await?,
                )
            }
            #[cfg(feature = "mysql")]
            Client::MySqlAdvisory(conn) | Client::MySqlTable(conn) => {
                let mut conn = conn.lock().await;
                Some(
                    sqlx::query_scalar("SELECT VERSION()")
                        .fetch_one(&mut *conn)
                        .await?,
                )
            }
            #[cfg(feature = "sqlite")]
            Client::Sqlite(conn) => {
                let mut conn = conn.lock().await;
                Some(
                    sqlx::query_scalar("SELECT sqlite_version()")
                        .fetch_one(&mut *conn)
                        .await?,
                )
            }
        })
    }

    /// The Redis key of the fenced rounds' counter (removed by [`Floor::close`]).
    #[cfg(feature = "redis")]
    fn redis_counter(&self) -> String {
        format!("{}:fence", self.key)
    }

    /// The key's Consul KV path.
    fn kv_path(&self) -> String {
        format!("/v1/kv/{}", self.key)
    }

    /// The key's ZooKeeper node.
    #[cfg(feature = "zk")]
    fn zk_node(&self) -> String {
        format!("/{}", self.key)
    }

    /// One round: take and free this process's key; `fenced` with the token where the
    /// backend's lock does not carry one by itself.
    pub async fn round(&self, fenced: bool) -> Result<(), BoxError> {
        self.take(fenced).await?;
        self.free(fenced).await
    }

    /// The first half of a round: takes this process's key (every `Floor` of a process and
    /// server has the same one), failing if it is taken. A fenced take also gets the token.
    pub async fn take(&self, fenced: bool) -> Result<(), BoxError> {
        let key = self.key.as_str();
        let _ = (key, fenced);
        match &self.client {
            #[cfg(feature = "redis")]
            Client::Redis(instances) => {
                let counter = self.redis_counter();
                futures_util::future::try_join_all(instances.iter().map(|conn| {
                    let (mut conn, counter) = (conn.clone(), counter.as_str());
                    async move {
                        let taken = match fenced {
                            true => {
                                let token: i64 = TAKE_AND_COUNT
                                    .key(key)
                                    .key(counter)
                                    .arg(30_000)
                                    .invoke_async(&mut conn)
                                    .await?;
                                token > 0
                            }
                            false => {
                                let set: Option<String> = ::redis::cmd("SET")
                                    .arg(key)
                                    .arg("owner")
                                    .arg("NX")
                                    .arg("PX")
                                    .arg(30_000)
                                    .query_async(&mut conn)
                                    .await?;
                                set.is_some()
                            }
                        };
                        expect(taken, "SET NX found the key taken")
                    }
                }))
                .await?;
            }
            #[cfg(feature = "etcd")]
            Client::Etcd(client, lease) => {
                let mut client = etcd_client::Client::clone(client);
                match fenced {
                    true => {
                        let put = etcd_client::PutOptions::new().with_lease(*lease);
                        let txn = etcd_client::Txn::new()
                            .when([etcd_client::Compare::create_revision(
                                key,
                                etcd_client::CompareOp::Equal,
                                0,
                            )])
                            .and_then([etcd_client::TxnOp::put(key, "", Some(put))]);
                        let done = client.txn(txn).await?;
                        expect(done.succeeded(), "the put-if-absent found the key taken")?;
                    }
                    false => drop(client.put(key, "x", None).await?),
                }
            }
            #[cfg(feature = "zk")]
            Client::Zk(client, _) => {
                let mode = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
                client.create(&self.zk_node(), b"", &mode).await?;
            }
            Client::Consul(http, session) => {
                let mut http = http.lock().await;
                match fenced {
                    true => {
                        let ops = serde_json::json!([
                            {"KV": {"Verb": "lock", "Key": key, "Value": "", "Session": session}}
                        ]);
                        let done = http.call("PUT", "/v1/txn", &ops.to_string()).await?;
                        expect(done.contains("ModifyIndex"), "the session lock was refused")?;
                    }
                    false => {
                        let put = http.call("PUT", &self.kv_path(), "").await?;
                        expect(put == "true", "KV PUT failed")?;
                    }
                }
            }
            #[cfg(feature = "postgres")]
            Client::PgAdvisory(conn) => {
                let mut conn = conn.lock().await;
                let id = i64::from(std::process::id());
                if fenced {
                    // The bump depends on the lock's row, so it happens only once taken.
                    let token: Option<i64> = sqlx::query_scalar(
                        "WITH l AS (SELECT pg_try_advisory_lock($1) AS ok)
                         UPDATE lockkit_bench_floor_fences SET n = n + 1 FROM l
                         WHERE name = $2 AND l.ok RETURNING n",
                    )
                    .bind(id)
                    .bind(key)
                    .fetch_optional(&mut *conn)
                    .await?;
                    expect(token.is_some(), "pg_try_advisory_lock found the lock taken")?;
                } else {
                    let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                        .bind(id)
                        .fetch_one(&mut *conn)
                        .await?;
                    expect(taken, "pg_try_advisory_lock found the lock taken")?;
                }
            }
            #[cfg(feature = "mysql")]
            Client::MySqlAdvisory(conn) => {
                let mut conn = conn.lock().await;
                let taken: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 0)")
                    .bind(key)
                    .fetch_one(&mut *conn)
                    .await?;
                expect(taken == Some(1), "GET_LOCK found the lock taken")?;
                if fenced {
                    bump_mysql(&mut conn, key).await?;
                }
            }
            #[cfg(feature = "postgres")]
            Client::PgTable(conn) => {
                let mut conn = conn.lock().await;
                // Inserted, or the statement fails: the bump depends on the inserted row.
                let bumped: Option<i64> = match fenced {
                    true => {
                        sqlx::query_scalar(
                            "WITH r AS (INSERT INTO lockkit_bench_floor_rows VALUES ($1)
                                RETURNING name)
                             UPDATE lockkit_bench_floor_fences f SET n = n + 1 FROM r
                             WHERE f.name = r.name RETURNING n",
                        )
                        .bind(key)
                        .fetch_optional(&mut *conn)
                        .await?
                    }
                    false => {
                        insert_row!(&mut *conn, key, "$1");
                        Some(0)
                    }
                };
                if bumped.is_none() {
                    delete_row!(&mut *conn, key, "$1");
                    return Err("no counter row".into());
                }
            }
            #[cfg(feature = "mysql")]
            Client::MySqlTable(conn) => {
                let mut conn = conn.lock().await;
                insert_row!(&mut *conn, key, "?");
                if fenced {
                    bump_mysql(&mut conn, key).await?;
                }
            }
            #[cfg(feature = "sqlite")]
            Client::Sqlite(conn) => insert_row!(&mut *conn.lock().await, key, "?"),
        }
        Ok(())
    }

    /// The second half of a round: frees the key [`Floor::take`] took.
    pub async fn free(&self, fenced: bool) -> Result<(), BoxError> {
        let key = self.key.as_str();
        let _ = (key, fenced);
        match &self.client {
            #[cfg(feature = "redis")]
            Client::Redis(instances) => {
                futures_util::future::try_join_all(instances.iter().map(|conn| {
                    let mut conn = conn.clone();
                    async move {
                        let _: i64 = ::redis::cmd("DEL").arg(key).query_async(&mut conn).await?;
                        Ok::<_, BoxError>(())
                    }
                }))
                .await?;
            }
            #[cfg(feature = "etcd")]
            Client::Etcd(client, _) => {
                etcd_client::Client::clone(client).delete(key, None).await?;
            }
            #[cfg(feature = "zk")]
            Client::Zk(client, _) => client.delete(&self.zk_node(), None).await?,
            Client::Consul(http, session) => {
                let mut http = http.lock().await;
                let (method, path) = match fenced {
                    true => ("PUT", format!("{}?release={session}", self.kv_path())),
                    false => ("DELETE", self.kv_path()),
                };
                expect(
                    http.call(method, &path, "").await? == "true",
                    "the release failed",
                )?;
            }
            #[cfg(feature = "postgres")]
            Client::PgAdvisory(conn) => {
                sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(i64::from(std::process::id()))
                    .execute(&mut *conn.lock().await)
                    .await?;
            }
            #[cfg(feature = "mysql")]
            Client::MySqlAdvisory(conn) => {
                sqlx::query("SELECT RELEASE_LOCK(?)")
                    .bind(key)
                    .execute(&mut *conn.lock().await)
                    .await?;
            }
            #[cfg(feature = "postgres")]
            Client::PgTable(conn) => delete_row!(&mut *conn.lock().await, key, "$1"),
            #[cfg(feature = "mysql")]
            Client::MySqlTable(conn) => delete_row!(&mut *conn.lock().await, key, "?"),
            #[cfg(feature = "sqlite")]
            Client::Sqlite(conn) => delete_row!(&mut *conn.lock().await, key, "?"),
        }
        Ok(())
    }

    /// Removes what the rounds left on the server: the key's counter, the etcd lease, the
    /// Consul session and whatever it still holds. Best effort: an error is returned, but
    /// everything is tried.
    pub async fn close(self) -> Result<(), BoxError> {
        let mut failed: Option<BoxError> = None;
        let mut note = |result: Result<(), BoxError>| {
            if let Err(e) = result {
                failed.get_or_insert(e);
            }
        };
        match &self.client {
            #[cfg(feature = "redis")]
            Client::Redis(instances) => {
                for conn in instances {
                    let mut conn = conn.clone();
                    let deleted: Result<i64, _> = ::redis::cmd("DEL")
                        .arg(self.redis_counter())
                        .query_async(&mut conn)
                        .await;
                    note(deleted.map(drop).map_err(Into::into));
                }
            }
            #[cfg(feature = "etcd")]
            Client::Etcd(client, lease) => {
                let revoked = etcd_client::Client::clone(client)
                    .lease_revoke(*lease)
                    .await;
                note(revoked.map(drop).map_err(Into::into));
            }
            Client::Consul(http, session) => {
                let mut http = http.lock().await;
                let path = format!("/v1/session/destroy/{session}");
                note(http.call("PUT", &path, "").await.map(drop));
                note(http.call("DELETE", &self.kv_path(), "").await.map(drop));
            }
            #[cfg(feature = "postgres")]
            Client::PgAdvisory(conn) | Client::PgTable(conn) => {
                note(delete_counter!(conn, self.key.as_str(), "$1"));
            }
            #[cfg(feature = "mysql")]
            Client::MySqlAdvisory(conn) | Client::MySqlTable(conn) => {
                note(delete_counter!(conn, self.key.as_str(), "?"));
            }
            #[allow(unreachable_patterns)]
            _ => {}
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Bumps the key's counter on MySQL; its new value comes back with the statement's result
/// (`LAST_INSERT_ID`).
#[cfg(feature = "mysql")]
async fn bump_mysql(conn: &mut MySqlConnection, key: &str) -> Result<(), BoxError> {
    let done = sqlx::query(
        "UPDATE lockkit_bench_floor_fences SET n = LAST_INSERT_ID(n + 1) WHERE name = ?",
    )
    .bind(key)
    .execute(conn)
    .await?;
    expect(done.last_insert_id() > 0, "no counter row")
}

fn expect(ok: bool, why: &str) -> Result<(), BoxError> {
    match ok {
        true => Ok(()),
        false => Err(why.into()),
    }
}

#[cfg(feature = "redis")]
async fn redis(url: &str) -> Result<::redis::aio::ConnectionManager, BoxError> {
    Ok(::redis::Client::open(url)?.get_connection_manager().await?)
}

/// A minimal HTTP/1.1 keep-alive client: one request at a time on one connection, with no
/// client library's overhead on top of the agent's.
struct Http {
    stream: BufReader<TcpStream>,
    host: String,
    token: Option<String>,
}

impl Http {
    async fn connect(host: &str, token: Option<String>) -> std::io::Result<Http> {
        let stream = TcpStream::connect(host).await?;
        stream.set_nodelay(true)?;
        Ok(Http {
            stream: BufReader::new(stream),
            host: host.to_string(),
            token,
        })
    }

    /// Sends a request with `body` (JSON, or empty); returns the response body, trimmed.
    async fn call(&mut self, method: &str, path: &str, body: &str) -> Result<String, BoxError> {
        let token = match &self.token {
            Some(token) => format!("X-Consul-Token: {token}\r\n"),
            None => String::new(),
        };
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{token}Content-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let (mut length, mut chunked) = (0, false);
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse()?;
                }
                if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.trim().eq_ignore_ascii_case("chunked");
                }
            }
        }
        let mut body = Vec::new();
        if !chunked {
            body.resize(length, 0);
            self.stream.read_exact(&mut body).await?;
        }
        // A chunked body (larger answers): chunks of a hexadecimal size, up to an empty one.
        if chunked {
            loop {
                let size =
                    usize::from_str_radix(self.line().await?.split(';').next().unwrap_or(""), 16)?;
                let mut chunk = vec![0; size + 2];
                if size == 0 {
                    // The (empty) trailer ends with an empty line.
                    while !self.line().await?.is_empty() {}
                    break;
                }
                self.stream.read_exact(&mut chunk).await?;
                body.extend_from_slice(&chunk[..size]);
            }
        }
        Ok(String::from_utf8(body)?.trim().to_string())
    }

    /// One header line, without its line end.
    async fn line(&mut self) -> Result<String, BoxError> {
        let mut line = String::new();
        if self.stream.read_line(&mut line).await? == 0 {
            return Err("Consul closed the connection".into());
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }
}
