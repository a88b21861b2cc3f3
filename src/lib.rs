#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

use std::future::Future;
use std::pin::Pin;

pub use lockkit_core::{
    telemetry, url, BoxError, Capabilities, Error, FencingToken, Leader, Leadership, LockGuard,
    LockInfo, LockName, LockOptions, Locks, LostReason, Permit, Result, RetryPolicy, DEFAULT_TTL,
    MAX_NAME_LEN, MAX_PERMITS,
};

/// The backend SPI, for writing a backend of your own (see its contract). Not needed to
/// use locks.
pub use lockkit_core::backend;

/// The SQL backends (SQLite, the embedded default; PostgreSQL; MySQL/MariaDB).
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub use lockkit_sql as sql;

#[cfg(feature = "sqlite")]
pub use lockkit_sql::SqliteLock;

/// The Redis backend (single instance and RedLock).
#[cfg(feature = "redis")]
pub use lockkit_redis as redis;

#[cfg(feature = "redis")]
pub use lockkit_redis::RedisLock;

/// The etcd backend.
#[cfg(feature = "etcd")]
pub use lockkit_etcd as etcd;

#[cfg(feature = "etcd")]
pub use lockkit_etcd::EtcdLock;

/// The ZooKeeper backend.
#[cfg(feature = "zk")]
pub use lockkit_zk as zk;

#[cfg(feature = "zk")]
pub use lockkit_zk::ZkLock;

/// The Consul backend (KV locks on sessions).
#[cfg(feature = "consul")]
pub use lockkit_consul as consul;

#[cfg(feature = "consul")]
pub use lockkit_consul::ConsulLock;

#[cfg(feature = "bench")]
pub mod bench;

type Connecting<'a> = Pin<Box<dyn Future<Output = Result<Locks>> + Send + 'a>>;

/// A compiled-in backend: its schemes (its own [`backend::Connect::SCHEMES`]) and how to
/// connect to it.
struct Compiled {
    schemes: &'static [&'static str],
    connect: fn(&str) -> Connecting<'_>,
}

#[cfg(any(
    feature = "sqlite",
    feature = "postgres",
    feature = "mysql",
    feature = "redis",
    feature = "etcd",
    feature = "zk",
    feature = "consul"
))]
fn entry<B: backend::Connect>() -> Compiled {
    Compiled {
        schemes: B::SCHEMES,
        connect: |url| Box::pin(async move { B::connect(url).await.map(Locks::new) }),
    }
}

/// The backends compiled into this build, each with the schemes it declares.
fn compiled() -> Vec<Compiled> {
    vec![
        #[cfg(feature = "sqlite")]
        entry::<lockkit_sql::SqliteLock>(),
        #[cfg(feature = "postgres")]
        entry::<lockkit_sql::PgLock>(),
        #[cfg(feature = "mysql")]
        entry::<lockkit_sql::MySqlLock>(),
        #[cfg(feature = "redis")]
        entry::<lockkit_redis::RedisLock>(),
        #[cfg(feature = "etcd")]
        entry::<lockkit_etcd::EtcdLock>(),
        #[cfg(feature = "zk")]
        entry::<lockkit_zk::ZkLock>(),
        #[cfg(feature = "consul")]
        entry::<lockkit_consul::ConsulLock>(),
    ]
}

/// For a scheme no compiled-in backend accepts: the cargo feature that brings the backend
/// that does. A test with every feature on checks this list against the backends' own
/// declarations, so it cannot drift from them.
const FEATURE_OF_SCHEME: &[(&str, &[&str])] = &[
    ("sqlite", &["sqlite"]),
    ("postgres", &["postgres", "postgresql"]),
    ("mysql", &["mysql", "mariadb"]),
    ("redis", &["redis", "rediss", "redlock", "redlocks"]),
    ("etcd", &["etcd", "etcds"]),
    ("zk", &["zk", "zookeeper"]),
    ("consul", &["consul"]),
];

/// Connects to the lock service at `url`, choosing the backend by the URL's scheme:
///
/// | scheme | backend | cargo feature |
/// |---|---|---|
/// | `sqlite://path`, `sqlite:path`, `sqlite::memory:` | SQLite lease table | `sqlite` (default) |
/// | `postgres://…?strategy=advisory\|table` | PostgreSQL advisory locks or lease table | `postgres` |
/// | `mysql://…?strategy=advisory\|table` | MySQL/MariaDB `GET_LOCK` or lease table | `mysql` |
/// | `redis://`, `rediss://`, `redlock://h1,h2,…`, `redlocks://…` | Redis, RedLock | `redis` |
/// | `etcd://h1:2379,h2:2379`, `etcds://…` | etcd leases and revisions | `etcd` |
/// | `zk://h1:2181,h2:2181[/chroot][?root=/lockkit]`, `zookeeper://…` | ZooKeeper | `zk` |
/// | `consul://host:port/prefix?token=…&dc=…` | Consul KV locks on sessions | `consul` |
///
/// The schemes come from the backends themselves. A scheme whose feature is off is an
/// [`Error::Unsupported`] that names the feature to enable.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> lockkit::Result<()> {
/// let locks = lockkit::connect("sqlite::memory:").await?;
/// let guard = locks.acquire("reports/daily").await?;
/// assert!(guard.is_held());
/// guard.release().await?;
/// # Ok(()) }
/// ```
pub async fn connect(url: &str) -> Result<Locks> {
    let scheme = url
        .split_once(':')
        .map(|(scheme, _)| scheme.to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            Error::InvalidOptions(format!(
                "`{}` is not a URL (no scheme)",
                lockkit_core::url::redact(url)
            ))
        })?;
    let backends = compiled();
    if let Some(found) = backends.iter().find(|b| b.schemes.contains(&&*scheme)) {
        return (found.connect)(url).await;
    }
    if let Some((feature, _)) = FEATURE_OF_SCHEME
        .iter()
        .find(|(_, schemes)| schemes.contains(&&*scheme))
    {
        return Err(Error::Unsupported(format!(
            "`{scheme}` URLs need lockkit's cargo feature `{feature}`: enable it in Cargo.toml"
        )));
    }
    let known: Vec<&str> = FEATURE_OF_SCHEME
        .iter()
        .flat_map(|(_, schemes)| schemes.iter().copied())
        .collect();
    Err(Error::Unsupported(format!(
        "unknown lock service scheme `{scheme}`; lockkit knows {}",
        known.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_scheme_is_unsupported() {
        let err = connect("ftp://x").await.unwrap_err();
        assert!(
            matches!(&err, Error::Unsupported(m) if m.contains("sqlite")),
            "{err}"
        );
        let err = connect("no-scheme").await.unwrap_err();
        assert!(matches!(err, Error::InvalidOptions(_)), "{err}");
    }

    #[tokio::test]
    async fn disabled_feature_is_named() {
        let err = connect("zk://127.0.0.1:1").await.unwrap_err();
        if cfg!(feature = "zk") {
            // Available: a closed port is a connection error.
            assert!(matches!(err, Error::Connection { .. }), "{err:?}");
            return;
        }
        let Error::Unsupported(message) = err else {
            panic!("{err:?}")
        };
        assert!(message.contains("feature `zk`"), "{message}");
    }

    /// With every backend compiled in, the feature hints are exactly the backends' own
    /// scheme declarations: no scheme can be accepted by a backend and unknown to
    /// `connect`, or the other way round.
    #[cfg(all(
        feature = "sqlite",
        feature = "postgres",
        feature = "mysql",
        feature = "redis",
        feature = "etcd",
        feature = "zk",
        feature = "consul"
    ))]
    #[test]
    fn feature_hints_match_the_backends_declarations() {
        let backends = compiled();
        let declared: Vec<&[&str]> = backends.iter().map(|b| b.schemes).collect();
        let hinted: Vec<&[&str]> = FEATURE_OF_SCHEME.iter().map(|(_, s)| *s).collect();
        assert_eq!(declared, hinted);
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn sqlite_memory_url_connects() {
        let locks = connect("sqlite::memory:").await.unwrap();
        assert_eq!(locks.backend_name(), "sqlite");
        let guard = locks.acquire("x").await.unwrap();
        assert!(guard.is_held());
        guard.release().await.unwrap();
    }
}
