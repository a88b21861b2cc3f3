#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

use std::sync::Arc;

pub use lockkit_core::{
    async_trait, run_detached, telemetry, with_lock, Acquired, Attempt, BoxError, Capabilities,
    DistributedLock, Error, FencingToken, Lease, LockGuard, LockName, LockOptions, LostReason,
    Result, RetryPolicy, DEFAULT_TTL, MAX_NAME_LEN,
};

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

/// The backends a URL scheme selects, the cargo feature that enables each, and whether that
/// feature is compiled in.
const SCHEMES: &[(&[&str], &str, bool)] = &[
    (&["sqlite"], "sqlite", cfg!(feature = "sqlite")),
    (
        &["postgres", "postgresql"],
        "postgres",
        cfg!(feature = "postgres"),
    ),
    (&["mysql", "mariadb"], "mysql", cfg!(feature = "mysql")),
    (
        &["redis", "rediss", "redlock"],
        "redis",
        cfg!(feature = "redis"),
    ),
    (&["etcd", "etcds"], "etcd", cfg!(feature = "etcd")),
    (&["zk", "zookeeper"], "zk", cfg!(feature = "zk")),
    (&["consul"], "consul", cfg!(feature = "consul")),
];

/// Connects to the lock service at `url`, choosing the backend by the URL's scheme:
///
/// | scheme | backend | cargo feature |
/// |---|---|---|
/// | `sqlite://path`, `sqlite:path`, `sqlite::memory:` | SQLite lease table | `sqlite` (default) |
/// | `postgres://…?strategy=advisory\|table` | PostgreSQL advisory locks or lease table | `postgres` |
/// | `mysql://…?strategy=advisory\|table` | MySQL/MariaDB `GET_LOCK` or lease table | `mysql` |
/// | `redis://`, `rediss://`, `redlock://h1,h2,…` | Redis, RedLock | `redis` |
/// | `etcd://h1:2379,h2:2379`, `etcds://…` | etcd leases and revisions | `etcd` |
/// | `zk://h1:2181,h2:2181[/chroot][?root=/lockkit]`, `zookeeper://…` | ZooKeeper | `zk` |
/// | `consul://host:port/prefix?token=…&dc=…` | Consul KV locks on sessions | `consul` |
///
/// A scheme whose feature is off is an [`Error::Unsupported`] that names the feature to
/// enable.
pub async fn connect(url: &str) -> Result<Arc<dyn DistributedLock>> {
    let scheme = url
        .split_once(':')
        .map(|(scheme, _)| scheme.to_ascii_lowercase())
        .ok_or_else(|| Error::InvalidOptions(format!("`{url}` is not a URL (no scheme)")))?;
    let found = SCHEMES.iter().find(|(s, ..)| s.contains(&scheme.as_str()));
    let Some(&(_, feature, enabled)) = found else {
        let known: Vec<&str> = SCHEMES
            .iter()
            .flat_map(|(s, ..)| s.iter().copied())
            .collect();
        return Err(Error::Unsupported(format!(
            "unknown lock service scheme `{scheme}`; lockkit knows {}",
            known.join(", ")
        )));
    };
    match feature {
        #[cfg(feature = "sqlite")]
        "sqlite" => Ok(Arc::new(SqliteLock::connect(url).await?)),
        #[cfg(feature = "redis")]
        "redis" => Ok(Arc::new(lockkit_redis::RedisLock::connect(url).await?)),
        #[cfg(feature = "consul")]
        "consul" => Ok(Arc::new(lockkit_consul::ConsulLock::connect(url).await?)),
        #[cfg(feature = "postgres")]
        "postgres" => Ok(Arc::new(lockkit_sql::PgLock::connect(url).await?)),
        #[cfg(feature = "mysql")]
        "mysql" => Ok(Arc::new(lockkit_sql::MySqlLock::connect(url).await?)),
        #[cfg(feature = "zk")]
        "zk" => Ok(Arc::new(lockkit_zk::ZkLock::connect(url).await?)),
        #[cfg(feature = "etcd")]
        "etcd" => Ok(Arc::new(lockkit_etcd::EtcdLock::connect(url).await?)),
        _ if !enabled => Err(Error::Unsupported(format!(
            "`{scheme}` URLs need lockkit's cargo feature `{feature}`: enable it in Cargo.toml"
        ))),
        feature => Err(Error::Unsupported(format!(
            "the `{feature}` backend is not available in lockkit {} yet",
            env!("CARGO_PKG_VERSION")
        ))),
    }
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

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn sqlite_memory_url_connects() {
        let locks = connect("sqlite::memory:").await.unwrap();
        assert_eq!(locks.backend(), "sqlite");
        let guard = locks.acquire("x", &LockOptions::new()).await.unwrap();
        assert!(guard.is_held());
        guard.release().await.unwrap();
    }
}
