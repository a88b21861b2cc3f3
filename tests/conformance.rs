//! The conformance suite, run unchanged against every backend compiled in. Tests are named
//! `<backend>::<case>`: `cargo test --all-features --test conformance -- sqlite::` runs one
//! backend. Networked backends read their server URLs from `target/services.env`, written by
//! `scripts/services up`. Each backend lists the guarantees it claims; only their cases are
//! stamped, and `<backend>::claimed_capabilities` checks the list against the backend.

use lockkit::backend::async_trait;
use lockkit::Locks;
use lockkit_core::conformance::Harness;
use lockkit_testkit::{service_url, with_params};

/// Every client of one harness opens the same database file, as separate processes would;
/// each test gets its own file.
#[cfg(feature = "sqlite")]
struct SqliteHarness {
    dir: tempfile::TempDir,
}

#[cfg(feature = "sqlite")]
impl SqliteHarness {
    fn new() -> Self {
        SqliteHarness {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }
}

#[cfg(feature = "sqlite")]
#[async_trait]
impl Harness for SqliteHarness {
    async fn client(&self) -> Locks {
        let url = format!("sqlite://{}", self.dir.path().join("locks.db").display());
        lockkit::connect(&url).await.expect("open SQLite")
    }

    async fn unreachable(&self) -> lockkit::Result<Locks> {
        // A database in a directory that does not exist cannot be opened.
        let url = format!(
            "sqlite://{}",
            self.dir.path().join("missing/dir/locks.db").display()
        );
        lockkit::connect(&url).await
    }
}

/// Clients of a test server from `target/services.env` (`url_key`), each with its own
/// connections as a separate process would have, through `lockkit::connect`, with extra URL
/// parameters; `closed` is the same kind of URL pointing at a closed port.
#[allow(dead_code)]
struct UrlHarness {
    url_key: &'static str,
    params: &'static str,
    closed: &'static str,
}

#[async_trait]
impl Harness for UrlHarness {
    async fn client(&self) -> Locks {
        let url = with_params(&service_url(self.url_key), self.params);
        lockkit::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url_key))
    }

    async fn unreachable(&self) -> lockkit::Result<Locks> {
        lockkit::connect(&with_params(self.closed, self.params)).await
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    lockkit_core::conformance_suite!(crate::SqliteHarness::new(); fencing, lease_expiry, renewal, semaphore, election);
}

#[cfg(feature = "redis")]
mod redis {
    lockkit_core::conformance_suite!(crate::UrlHarness {
        url_key: "LOCKKIT_REDIS_URL",
        params: "",
        closed: "redis://127.0.0.1:1",
    }; fencing, lease_expiry, renewal, fifo, semaphore, election);
}

#[cfg(feature = "redis")]
mod redlock {
    lockkit_core::conformance_suite!(crate::UrlHarness {
        url_key: "LOCKKIT_REDLOCK_URL",
        params: "",
        closed: "redlock://127.0.0.1:1,127.0.0.1:2,127.0.0.1:3",
    }; fencing, lease_expiry, renewal, semaphore, election);
}

#[cfg(feature = "consul")]
mod consul {
    lockkit_core::conformance_suite!(crate::UrlHarness {
        url_key: "LOCKKIT_CONSUL_URL",
        params: "",
        closed: "consul://127.0.0.1:1",
    }; fencing, lease_expiry, renewal, fifo, semaphore, election);
}

#[cfg(feature = "postgres")]
mod postgres_advisory {
    lockkit_core::conformance_suite!(crate::UrlHarness {
        url_key: "LOCKKIT_POSTGRES_URL",
        params: "strategy=advisory",
        closed: "postgres://lockkit:lockkit@127.0.0.1:1/lockkit",
    }; fencing, lease_expiry, renewal, semaphore, election);
}

#[cfg(feature = "postgres")]
mod postgres_table {
    lockkit_core::conformance_suite!(crate::UrlHarness {
        url_key: "LOCKKIT_POSTGRES_URL",
        params: "strategy=table",
        closed: "postgres://lockkit:lockkit@127.0.0.1:1/lockkit",
    }; fencing, lease_expiry, renewal, semaphore, election);
}

#[cfg(feature = "mysql")]
mod mysql_advisory {
    lockkit_core::conformance_suite!(crate::UrlHarness {
        url_key: "LOCKKIT_MYSQL_URL",
        params: "strategy=advisory",
        closed: "mysql://lockkit:lockkit@127.0.0.1:1/lockkit",
    }; fencing, lease_expiry, renewal, semaphore, election);
}

#[cfg(feature = "mysql")]
mod mysql_table {
    lockkit_core::conformance_suite!(crate::UrlHarness {
        url_key: "LOCKKIT_MYSQL_URL",
        params: "strategy=table",
        closed: "mysql://lockkit:lockkit@127.0.0.1:1/lockkit",
    }; fencing, lease_expiry, renewal, semaphore, election);
}

#[cfg(feature = "zk")]
mod zk {
    lockkit_core::conformance_suite!(crate::UrlHarness {
        url_key: "LOCKKIT_ZK_URL",
        params: "",
        closed: "zk://127.0.0.1:1",
    }; fencing, lease_expiry, renewal, fifo, semaphore, election);
}

#[cfg(feature = "etcd")]
mod etcd {
    lockkit_core::conformance_suite!(crate::UrlHarness {
        url_key: "LOCKKIT_ETCD_URL",
        params: "",
        closed: "etcd://127.0.0.1:1",
    }; fencing, lease_expiry, renewal, fifo, semaphore, election);
}
