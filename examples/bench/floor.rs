//! The floor of each backend: the least one take-and-free round costs through the plain
//! client crate on the same server, with no lock semantics on top. Kept apart from the
//! benchmark's measuring and printing so a `lockkit bench` command can reuse it.
//!
//! | scheme | one round |
//! |---|---|
//! | `redis`, `rediss` | `SET key NX PX` + `DEL key` |
//! | `redlock`, `redlocks` | the same on every instance, instances in parallel |
//! | `etcd` | put + delete of one key |
//! | `zk`, `zookeeper` | create + delete of an ephemeral node |
//! | `consul` | KV `PUT` + `DELETE` of one key, on one keep-alive HTTP connection |
//! | `postgres` | `pg_try_advisory_lock` + `pg_advisory_unlock` (`strategy=table`: INSERT + DELETE of a row) |
//! | `mysql`, `mariadb` | `GET_LOCK` + `RELEASE_LOCK` (`strategy=table`: INSERT + DELETE of a row) |
//! | `sqlite` | INSERT + DELETE of a row, WAL and `synchronous=FULL` as lockkit opens it |

use std::str::FromStr;

use futures_util::future::try_join_all;
use lockkit::etcd::etcd_client;
use lockkit::url::ServiceUrl;
use lockkit::zk::zookeeper_client as zk;
use lockkit::BoxError;
use sqlx::mysql::MySqlConnection;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// The table of the INSERT + DELETE floors (valid SQL for PostgreSQL, MySQL and SQLite;
/// not the old benchmarks' `lockkit_bench_floor`, whose MySQL column was too short).
const CREATE_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS lockkit_bench_floor_rows (name VARCHAR(64) PRIMARY KEY)";

/// INSERT + DELETE of the round's row, on a `Mutex` of any sqlx connection; `$p` is the
/// database's placeholder (`$1` or `?`).
macro_rules! insert_delete {
    ($conn:expr, $key:expr, $p:literal) => {{
        let mut conn = $conn.lock().await;
        sqlx::query(concat!(
            "INSERT INTO lockkit_bench_floor_rows VALUES (",
            $p,
            ")"
        ))
        .bind($key)
        .execute(&mut *conn)
        .await?;
        sqlx::query(concat!(
            "DELETE FROM lockkit_bench_floor_rows WHERE name = ",
            $p
        ))
        .bind($key)
        .execute(&mut *conn)
        .await?;
    }};
}

/// A connection to a backend's server through its plain client crate, ready to run floor
/// rounds.
pub(crate) struct Floor {
    what: &'static str,
    client: Client,
    /// The key, node, advisory lock or row one round takes and frees; this process's own.
    key: String,
}

enum Client {
    Redis(Vec<redis::aio::ConnectionManager>),
    Etcd(Box<etcd_client::Client>),
    Zk(zk::Client),
    Consul(Mutex<Http>),
    PgAdvisory(Mutex<PgConnection>),
    MySqlAdvisory(Mutex<MySqlConnection>),
    PgTable(Mutex<PgConnection>),
    MySqlTable(Mutex<MySqlConnection>),
    Sqlite(Mutex<SqliteConnection>),
}

impl Floor {
    /// Connects to the server of a lockkit URL, the way lockkit's backend for its scheme
    /// would reach it.
    pub(crate) async fn connect(url: &str) -> Result<Floor, BoxError> {
        let mut parsed = ServiceUrl::parse(url)?;
        let key = format!("lockkit-bench-floor-{}", std::process::id());
        let scheme = parsed.scheme().to_string();
        let table = match parsed.take("strategy").as_deref() {
            None | Some("advisory") => false,
            Some("table") => true,
            Some(other) => return Err(parsed.error(format!("unknown strategy {other}")).into()),
        };
        // The URL without lockkit's parameters, for the database drivers.
        let bare = url.split('?').next().unwrap_or(url);
        let (what, client) = match scheme.as_str() {
            "redis" | "rediss" => ("SET NX PX + DEL", Client::Redis(vec![redis(bare).await?])),
            "redlock" | "redlocks" => {
                let scheme = if scheme == "redlocks" {
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
                let mut instances = Vec::new();
                for host in parsed.expect_hosts()? {
                    let host = host.with_default_port(6379);
                    instances.push(redis(&format!("{scheme}://{auth}{host}")).await?);
                }
                ("SET NX PX + DEL on each", Client::Redis(instances))
            }
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
                let client = etcd_client::Client::connect(endpoints, options).await?;
                ("put + delete", Client::Etcd(Box::new(client)))
            }
            "zk" | "zookeeper" => {
                let cluster: Vec<String> = parsed
                    .expect_hosts()?
                    .iter()
                    .map(|h| h.with_default_port(2181))
                    .collect();
                let client = zk::Client::connect(&cluster.join(",")).await?;
                ("create + delete ephemeral", Client::Zk(client))
            }
            "consul" => {
                let host = parsed.expect_hosts()?[0].with_default_port(8500);
                let token = parsed.take("token");
                let http = Http::connect(&host, token).await?;
                ("KV PUT + DELETE", Client::Consul(Mutex::new(http)))
            }
            "postgres" | "postgresql" => {
                let mut conn = PgConnection::connect(bare).await?;
                match table {
                    false => ("pg_try_advisory_lock + unlock", {
                        Client::PgAdvisory(Mutex::new(conn))
                    }),
                    true => {
                        sqlx::query(CREATE_TABLE).execute(&mut conn).await?;
                        ("INSERT + DELETE", Client::PgTable(Mutex::new(conn)))
                    }
                }
            }
            "mysql" | "mariadb" => {
                let mut conn =
                    MySqlConnection::connect(&bare.replacen("mariadb:", "mysql:", 1)).await?;
                match table {
                    false => ("GET_LOCK + RELEASE_LOCK", {
                        Client::MySqlAdvisory(Mutex::new(conn))
                    }),
                    true => {
                        sqlx::query(CREATE_TABLE).execute(&mut conn).await?;
                        ("INSERT + DELETE", Client::MySqlTable(Mutex::new(conn)))
                    }
                }
            }
            "sqlite" => {
                let mut conn = SqliteConnectOptions::from_str(bare)?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(std::time::Duration::from_secs(5))
                    .connect()
                    .await?;
                sqlx::query(CREATE_TABLE).execute(&mut conn).await?;
                ("INSERT + DELETE", Client::Sqlite(Mutex::new(conn)))
            }
            other => return Err(parsed.error(format!("no floor for scheme {other}")).into()),
        };
        Ok(Floor { what, client, key })
    }

    /// What one round does, for the table.
    pub(crate) fn what(&self) -> &'static str {
        self.what
    }

    /// One round: take and free this process's key.
    pub(crate) async fn round(&self) -> Result<(), BoxError> {
        let key = self.key.as_str();
        match &self.client {
            Client::Redis(instances) => {
                try_join_all(instances.iter().map(|conn| {
                    let mut conn = conn.clone();
                    async move {
                        let set: Option<String> = redis::cmd("SET")
                            .arg(key)
                            .arg("owner")
                            .arg("NX")
                            .arg("PX")
                            .arg(30_000)
                            .query_async(&mut conn)
                            .await?;
                        expect(set.is_some(), "SET NX found the key taken")?;
                        let _: i64 = redis::cmd("DEL").arg(key).query_async(&mut conn).await?;
                        Ok::<_, BoxError>(())
                    }
                }))
                .await?;
            }
            Client::Etcd(client) => {
                let mut client = etcd_client::Client::clone(client);
                client.put(key, "x", None).await?;
                client.delete(key, None).await?;
            }
            Client::Zk(client) => {
                let path = format!("/{key}");
                let mode = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
                client.create(&path, b"", &mode).await?;
                client.delete(&path, None).await?;
            }
            Client::Consul(http) => {
                let mut http = http.lock().await;
                let path = format!("/v1/kv/{key}");
                expect(http.call("PUT", &path).await? == "true", "KV PUT failed")?;
                expect(
                    http.call("DELETE", &path).await? == "true",
                    "KV DELETE failed",
                )?;
            }
            Client::PgAdvisory(conn) => {
                let mut conn = conn.lock().await;
                let id = i64::from(std::process::id());
                let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(id)
                    .fetch_one(&mut *conn)
                    .await?;
                expect(taken, "pg_try_advisory_lock found the lock taken")?;
                sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
            }
            Client::MySqlAdvisory(conn) => {
                let mut conn = conn.lock().await;
                let taken: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 0)")
                    .bind(key)
                    .fetch_one(&mut *conn)
                    .await?;
                expect(taken == Some(1), "GET_LOCK found the lock taken")?;
                sqlx::query("SELECT RELEASE_LOCK(?)")
                    .bind(key)
                    .execute(&mut *conn)
                    .await?;
            }
            Client::PgTable(conn) => insert_delete!(conn, key, "$1"),
            Client::MySqlTable(conn) => insert_delete!(conn, key, "?"),
            Client::Sqlite(conn) => insert_delete!(conn, key, "?"),
        }
        Ok(())
    }
}

fn expect(ok: bool, why: &str) -> Result<(), BoxError> {
    match ok {
        true => Ok(()),
        false => Err(why.into()),
    }
}

async fn redis(url: &str) -> Result<redis::aio::ConnectionManager, BoxError> {
    Ok(redis::Client::open(url)?.get_connection_manager().await?)
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

    /// Sends a body-less request; returns the response body, trimmed.
    async fn call(&mut self, method: &str, path: &str) -> Result<String, BoxError> {
        let token = match &self.token {
            Some(token) => format!("X-Consul-Token: {token}\r\n"),
            None => String::new(),
        };
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{token}Content-Length: 0\r\n\r\n",
            self.host
        );
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let mut length = 0;
        loop {
            let mut line = String::new();
            if self.stream.read_line(&mut line).await? == 0 {
                return Err("Consul closed the connection".into());
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse()?;
                }
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await?;
        Ok(String::from_utf8(body)?.trim().to_string())
    }
}
