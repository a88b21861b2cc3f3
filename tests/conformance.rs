//! The conformance suite, run unchanged against every backend compiled in. Tests are named
//! `<backend>::<case>`: `cargo test --all-features --test conformance -- sqlite::` runs one
//! backend. Networked backends read their server URLs from `target/services.env`, written by
//! `scripts/services up`.

mod common;

#[cfg(feature = "sqlite")]
mod sqlite {
    use std::sync::Arc;

    use lockkit::{DistributedLock, SqliteLock};
    use lockkit_core::conformance::Harness;

    /// Every client of one harness opens the same database file, as separate processes
    /// would; each test gets its own file.
    struct SqliteHarness {
        dir: tempfile::TempDir,
    }

    impl SqliteHarness {
        fn new() -> Self {
            SqliteHarness {
                dir: tempfile::tempdir().expect("temp dir"),
            }
        }
    }

    #[lockkit::async_trait]
    impl Harness for SqliteHarness {
        async fn client(&self) -> Arc<dyn DistributedLock> {
            let url = format!("sqlite://{}", self.dir.path().join("locks.db").display());
            Arc::new(SqliteLock::connect(&url).await.expect("open SQLite"))
        }

        async fn unreachable(&self) -> lockkit::Result<Arc<dyn DistributedLock>> {
            // A database in a directory that does not exist cannot be opened.
            let url = format!(
                "sqlite://{}",
                self.dir.path().join("missing/dir/locks.db").display()
            );
            Ok(Arc::new(SqliteLock::connect(&url).await?))
        }
    }

    lockkit_core::conformance_suite!(SqliteHarness::new());
}

#[cfg(feature = "redis")]
mod redis {
    use std::sync::Arc;

    use lockkit::{DistributedLock, RedisLock};
    use lockkit_core::conformance::Harness;

    use crate::common::service_url;

    /// Clients of the single Redis instance that `scripts/services` starts.
    pub(crate) struct RedisHarness {
        pub(crate) url_key: &'static str,
        pub(crate) closed: &'static str,
    }

    #[lockkit::async_trait]
    impl Harness for RedisHarness {
        async fn client(&self) -> Arc<dyn DistributedLock> {
            let url = service_url(self.url_key);
            Arc::new(RedisLock::connect(&url).await.expect("connect to Redis"))
        }

        async fn unreachable(&self) -> lockkit::Result<Arc<dyn DistributedLock>> {
            Ok(Arc::new(RedisLock::connect(self.closed).await?))
        }
    }

    lockkit_core::conformance_suite!(RedisHarness {
        url_key: "LOCKKIT_REDIS_URL",
        closed: "redis://127.0.0.1:1",
    });
}

#[cfg(feature = "redis")]
mod redlock {
    lockkit_core::conformance_suite!(crate::redis::RedisHarness {
        url_key: "LOCKKIT_REDLOCK_URL",
        closed: "redlock://127.0.0.1:1,127.0.0.1:2,127.0.0.1:3",
    });
}

#[cfg(feature = "consul")]
mod consul {
    use std::sync::Arc;

    use lockkit::{ConsulLock, DistributedLock};
    use lockkit_core::conformance::Harness;

    use crate::common::service_url;

    /// Clients of the Consul agent at `LOCKKIT_CONSUL_URL`.
    struct ConsulHarness;

    #[lockkit::async_trait]
    impl Harness for ConsulHarness {
        async fn client(&self) -> Arc<dyn DistributedLock> {
            let url = service_url("LOCKKIT_CONSUL_URL");
            Arc::new(ConsulLock::connect(&url).await.expect("connect to Consul"))
        }

        async fn unreachable(&self) -> lockkit::Result<Arc<dyn DistributedLock>> {
            Ok(Arc::new(ConsulLock::connect("consul://127.0.0.1:1").await?))
        }
    }

    lockkit_core::conformance_suite!(ConsulHarness);
}

/// A harness that connects through `lockkit::connect` to a URL from `target/services.env`,
/// with extra URL parameters.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) struct UrlHarness {
    pub(crate) url_key: &'static str,
    pub(crate) params: &'static str,
    pub(crate) closed: &'static str,
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
#[lockkit::async_trait]
impl lockkit_core::conformance::Harness for UrlHarness {
    async fn client(&self) -> std::sync::Arc<dyn lockkit::DistributedLock> {
        let url = format!("{}?{}", common::service_url(self.url_key), self.params);
        lockkit::connect(&url).await.expect("connect")
    }

    async fn unreachable(&self) -> lockkit::Result<std::sync::Arc<dyn lockkit::DistributedLock>> {
        lockkit::connect(&format!("{}?{}", self.closed, self.params)).await
    }
}

#[cfg(feature = "postgres")]
mod postgres_advisory {
    lockkit_core::conformance_suite!(crate::UrlHarness {
        url_key: "LOCKKIT_POSTGRES_URL",
        params: "strategy=advisory",
        closed: "postgres://lockkit:lockkit@127.0.0.1:1/lockkit",
    });
}

#[cfg(feature = "postgres")]
mod postgres_table {
    lockkit_core::conformance_suite!(crate::UrlHarness {
        url_key: "LOCKKIT_POSTGRES_URL",
        params: "strategy=table",
        closed: "postgres://lockkit:lockkit@127.0.0.1:1/lockkit",
    });
}

#[cfg(feature = "mysql")]
mod mysql_advisory {
    lockkit_core::conformance_suite!(crate::UrlHarness {
        url_key: "LOCKKIT_MYSQL_URL",
        params: "strategy=advisory",
        closed: "mysql://lockkit:lockkit@127.0.0.1:1/lockkit",
    });
}

#[cfg(feature = "mysql")]
mod mysql_table {
    lockkit_core::conformance_suite!(crate::UrlHarness {
        url_key: "LOCKKIT_MYSQL_URL",
        params: "strategy=table",
        closed: "mysql://lockkit:lockkit@127.0.0.1:1/lockkit",
    });
}

#[cfg(feature = "zk")]
mod zk {
    use std::sync::Arc;

    use lockkit::{DistributedLock, ZkLock};
    use lockkit_core::conformance::Harness;

    use crate::common::service_url;

    /// Clients of the ZooKeeper server, each with its own sessions.
    struct ZkHarness;

    #[lockkit::async_trait]
    impl Harness for ZkHarness {
        async fn client(&self) -> Arc<dyn DistributedLock> {
            let url = service_url("LOCKKIT_ZK_URL");
            Arc::new(ZkLock::connect(&url).await.expect("connect to ZooKeeper"))
        }

        async fn unreachable(&self) -> lockkit::Result<Arc<dyn DistributedLock>> {
            Ok(Arc::new(ZkLock::connect("zk://127.0.0.1:1").await?))
        }
    }

    lockkit_core::conformance_suite!(ZkHarness);
}

#[cfg(feature = "etcd")]
mod etcd {
    use std::sync::Arc;

    use lockkit::{DistributedLock, EtcdLock};
    use lockkit_core::conformance::Harness;

    use crate::common::service_url;

    /// Clients of the etcd server that `scripts/services` starts; each client has its own
    /// connection, as a separate process would.
    struct EtcdHarness;

    #[lockkit::async_trait]
    impl Harness for EtcdHarness {
        async fn client(&self) -> Arc<dyn DistributedLock> {
            let url = service_url("LOCKKIT_ETCD_URL");
            Arc::new(EtcdLock::connect(&url).await.expect("connect to etcd"))
        }

        async fn unreachable(&self) -> lockkit::Result<Arc<dyn DistributedLock>> {
            Ok(Arc::new(EtcdLock::connect("etcd://127.0.0.1:1").await?))
        }
    }

    lockkit_core::conformance_suite!(EtcdHarness);
}
