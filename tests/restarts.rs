//! A waiter with wait time left rides out a restart of its server: the server is stopped
//! (`scripts/services stop-one`, data kept) while a connected client waits for a lock, and
//! started again a few seconds later; the waiter must get the lock, not fail at once with a
//! connection error or a pool timeout. The servers are shared, so these tests run one at a
//! time in their own test binary. Tests are named `<backend>::<case>`.
#![cfg(all(
    feature = "redis",
    feature = "etcd",
    feature = "zk",
    feature = "consul",
    feature = "postgres",
    feature = "mysql"
))]

use std::time::Duration;

use lockkit::LockOptions;
use lockkit_testkit::{fresh_name, service_url, with_params, Stopped};
use tokio::time::Instant;

/// One restart at a time: they stop shared servers.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long the server stays down.
const DOWN: Duration = Duration::from_secs(3);
/// The waiter's wait: generous, so only a waiter that gives up early fails.
const WAIT: Duration = Duration::from_secs(60);

/// Connects to `url_key` (+ `params`), stops `instance`, waits for a lock while it is down,
/// starts it again, and expects the waiter to hold the lock with a working lease.
async fn waiter_rides_out_a_restart(url_key: &str, params: &str, instance: &'static str) {
    let _serial = SERIAL.lock().await;
    let url = with_params(&service_url(url_key), params);
    let locks = lockkit::connect(&url).await.expect("connect");
    let name = fresh_name("restarts");
    // The client has talked to the server before it goes away.
    let warm = locks.acquire(&name).await.expect("first acquire");
    let before = warm.fencing_token();
    warm.release().await.expect("first release");

    let stopped = Stopped::new(&[instance]);
    let ttl = locks.capabilities().min_ttl.max(Duration::from_secs(5));
    let opts = LockOptions::new().ttl(ttl).wait_timeout(WAIT);
    let waiter = {
        let locks = locks.clone();
        let name = name.clone();
        tokio::spawn(async move { locks.acquire_with(&name, &opts).await })
    };
    tokio::time::sleep(DOWN).await;
    assert!(
        !waiter.is_finished(),
        "the waiter gave up while the server was down: {:?}",
        waiter.await
    );
    let restarted = Instant::now();
    stopped.start();
    let guard = tokio::time::timeout(WAIT, waiter)
        .await
        .expect("the waiter still waits a minute after the restart")
        .expect("waiter task")
        .unwrap_or_else(|e| panic!("the waiter failed after the restart: {e}"));
    eprintln!(
        "{instance}: held {:?} after the restart",
        restarted.elapsed()
    );
    assert!(
        guard.fencing_token() > before,
        "token did not rise across the restart"
    );
    guard.extend(ttl).await.expect("extend after the restart");
    guard.release().await.expect("release after the restart");
}

mod redis {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiter_rides_out_a_server_restart() {
        super::waiter_rides_out_a_restart("LOCKKIT_REDIS_URL", "", "redis-16379").await;
    }
}

mod etcd {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiter_rides_out_a_server_restart() {
        super::waiter_rides_out_a_restart("LOCKKIT_ETCD_URL", "", "etcd").await;
    }
}

mod zk {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiter_rides_out_a_server_restart() {
        super::waiter_rides_out_a_restart("LOCKKIT_ZK_URL", "", "zk").await;
    }
}

mod consul {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiter_rides_out_a_server_restart() {
        super::waiter_rides_out_a_restart("LOCKKIT_CONSUL_URL", "", "consul").await;
    }
}

mod postgres_advisory {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiter_rides_out_a_server_restart() {
        super::waiter_rides_out_a_restart("LOCKKIT_POSTGRES_URL", "strategy=advisory", "postgres")
            .await;
    }
}

mod postgres_table {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiter_rides_out_a_server_restart() {
        super::waiter_rides_out_a_restart("LOCKKIT_POSTGRES_URL", "strategy=table", "postgres")
            .await;
    }
}

mod mysql_advisory {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiter_rides_out_a_server_restart() {
        super::waiter_rides_out_a_restart("LOCKKIT_MYSQL_URL", "strategy=advisory", "mysql").await;
    }
}

mod mysql_table {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiter_rides_out_a_server_restart() {
        super::waiter_rides_out_a_restart("LOCKKIT_MYSQL_URL", "strategy=table", "mysql").await;
    }
}
