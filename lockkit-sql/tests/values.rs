//! Leader values (`Lease::set_value`, `LockInfo::value`) and `Admin::changed`, on every
//! dialect and strategy, through the backend SPI (no lease keeper: a lease that is not
//! extended expires at its TTL). SQLite runs on a temporary file; PostgreSQL and MySQL on the
//! servers of `scripts/services` (fresh names, so runs can share them).
#![cfg(all(feature = "sqlite", feature = "postgres", feature = "mysql"))]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lockkit_core::backend::{Acquired, Backend, LockInfo, LockName, LockOptions};
use lockkit_core::Error;
use lockkit_sql::{MySqlLock, PgLock, SqlOptions, SqliteLock};
use lockkit_testkit::election::{self, inspect};
use lockkit_testkit::{fresh_name, service_url, with_params};
use tokio::time::Instant;

type Client = Arc<dyn Backend>;

/// Two clients of one database (`which`: sqlite, postgres or mysql) with `strategy`; the
/// directory keeps a SQLite file alive.
async fn clients(which: &str, strategy: &str) -> (Client, Client, Option<tempfile::TempDir>) {
    if which == "sqlite" {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("locks.db").display());
        let a = SqliteLock::connect(&url).await.unwrap();
        let b = SqliteLock::connect(&url).await.unwrap();
        return (Arc::new(a), Arc::new(b), Some(dir));
    }
    let key = match which {
        "postgres" => "LOCKKIT_POSTGRES_URL",
        _ => "LOCKKIT_MYSQL_URL",
    };
    let url = with_params(&service_url(key), &format!("strategy={strategy}"));
    let (a, b): (Client, Client) = match which {
        "postgres" => (
            Arc::new(PgLock::connect(&url).await.unwrap()),
            Arc::new(PgLock::connect(&url).await.unwrap()),
        ),
        _ => (
            Arc::new(MySqlLock::connect(&url).await.unwrap()),
            Arc::new(MySqlLock::connect(&url).await.unwrap()),
        ),
    };
    (a, b, None)
}

fn opts(ttl_ms: u64) -> LockOptions {
    LockOptions::new().ttl(Duration::from_millis(ttl_ms))
}

async fn take(client: &Client, name: &LockName, ttl_ms: u64) -> Acquired {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(acquired) = client.try_lock(name, &opts(ttl_ms)).await.unwrap() {
            return acquired;
        }
        assert!(Instant::now() < until, "{name}: never free");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn token_of(info: &Option<LockInfo>) -> Option<u64> {
    info.as_ref().and_then(|i| i.token).map(|t| t.get())
}

fn value_of(info: &Option<LockInfo>) -> Option<&str> {
    info.as_ref().and_then(|i| i.value.as_deref())
}

/// Stored, replaced (also by the same value again), listed, and gone with the release: the
/// next holder shows no value until it stores its own.
async fn stored_replaced_and_gone_with_the_holder(which: &str, strategy: &str) {
    let (a, b, _dir) = clients(which, strategy).await;
    assert!(a.capabilities().election, "{which} {strategy}: election");
    let name = LockName::new(&fresh_name("lockkit-sql-values/stored")).unwrap();
    let first = take(&a, &name, 10_000).await;
    assert_eq!(value_of(&inspect(&b, &name).await), None);
    first.lease.set_value("leader one").await.unwrap();
    let info = inspect(&b, &name).await;
    assert_eq!(value_of(&info), Some("leader one"), "{which} {strategy}");
    assert_eq!(token_of(&info), Some(first.token.get()));
    first.lease.set_value("leader two ✓").await.unwrap();
    first.lease.set_value("leader two ✓").await.unwrap();
    assert_eq!(value_of(&inspect(&b, &name).await), Some("leader two ✓"));
    // A NUL (PostgreSQL's text cannot hold one): kept verbatim, or a typed error that is not
    // retried, and the value before it stays.
    match first.lease.set_value("nul\0byte").await {
        Ok(()) => {
            let info = inspect(&b, &name).await;
            assert_eq!(value_of(&info), Some("nul\0byte"), "{which} {strategy}");
            first.lease.set_value("leader two ✓").await.unwrap();
        }
        Err(e) => assert!(
            !e.is_retryable() && !matches!(e, Error::LockLost { .. }),
            "{which} {strategy}: {e}"
        ),
    }
    assert_eq!(value_of(&inspect(&b, &name).await), Some("leader two ✓"));
    let listed = b.admin().unwrap().list(name.as_str()).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].value.as_deref(), Some("leader two ✓"));
    first.lease.release().await.unwrap();
    assert_eq!(inspect(&b, &name).await, None);
    // The releaser's own client next: on the advisory strategy it may reuse the session.
    for (i, client) in [&a, &b].into_iter().enumerate() {
        let next = take(client, &name, 10_000).await;
        let info = inspect(&b, &name).await;
        assert_eq!(
            token_of(&info),
            Some(next.token.get()),
            "{which} {strategy}"
        );
        assert_eq!(
            value_of(&info),
            None,
            "{which} {strategy}: an earlier holder's value"
        );
        let own = format!("holder {i}");
        next.lease.set_value(&own).await.unwrap();
        assert_eq!(value_of(&inspect(&a, &name).await), Some(own.as_str()));
        next.lease.release().await.unwrap();
    }
    // A released lease stores nothing.
    let err = first.lease.set_value("after release").await.unwrap_err();
    assert!(matches!(err, Error::LockLost { .. }), "{err}");
}

/// A lease whose lock another client has taken (after expiry, or a forced release) cannot
/// store a value, and changes nothing inspect shows.
async fn stale_lease_stores_nothing(which: &str, strategy: &str, forced: bool) {
    let (a, b, _dir) = clients(which, strategy).await;
    let name = LockName::new(&fresh_name("lockkit-sql-values/stale")).unwrap();
    // Long enough to store the value within the lease on a loaded machine.
    let ttl = if forced { 10_000 } else { 1_500 };
    let stale = take(&a, &name, ttl).await;
    stale.lease.set_value("old leader").await.unwrap();
    if forced {
        assert!(b.admin().unwrap().force_release(&name).await.unwrap());
    } else {
        tokio::time::sleep(Duration::from_millis(ttl + 100)).await;
    }
    let next = take(&b, &name, 10_000).await;
    let info = inspect(&b, &name).await;
    assert_eq!(token_of(&info), Some(next.token.get()));
    assert_eq!(
        value_of(&info),
        None,
        "{which} {strategy}: the old holder's value"
    );
    let err = stale.lease.set_value("stale write").await.unwrap_err();
    assert!(
        matches!(err, Error::LockLost { .. }),
        "{which} {strategy}: {err}"
    );
    assert_eq!(
        value_of(&inspect(&b, &name).await),
        None,
        "{which} {strategy}"
    );
    next.lease.set_value("new leader").await.unwrap();
    let err = stale.lease.set_value("stale write").await.unwrap_err();
    assert!(matches!(err, Error::LockLost { .. }), "{err}");
    let info = inspect(&a, &name).await;
    assert_eq!(value_of(&info), Some("new leader"), "{which} {strategy}");
    assert_eq!(token_of(&info), Some(next.token.get()));
    next.lease.release().await.unwrap();
}

macro_rules! backend {
    ($module:ident, $which:literal, $strategy:literal) => {
        mod $module {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn stored_replaced_and_gone_with_the_holder() {
                super::stored_replaced_and_gone_with_the_holder($which, $strategy).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn stale_lease_after_expiry_stores_nothing() {
                super::stale_lease_stores_nothing($which, $strategy, false).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn stale_lease_after_force_release_stores_nothing() {
                super::stale_lease_stores_nothing($which, $strategy, true).await;
            }
        }
    };
}

backend!(sqlite, "sqlite", "table");
backend!(postgres_advisory, "postgres", "advisory");
backend!(postgres_table, "postgres", "table");
backend!(mysql_advisory, "mysql", "advisory");
backend!(mysql_table, "mysql", "table");

/// A database whose tables an older version created (no values table) gets it at connect.
#[tokio::test]
async fn sqlite_tables_of_an_older_version_gain_the_values_table() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("locks.db").display());
    let old = SqliteLock::connect(&url).await.unwrap();
    drop(old);
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query("DROP TABLE lockkit_lock_values")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    // Without migration the value cannot be stored...
    let unmigrated: Client = Arc::new(
        SqliteLock::connect_with(&url, SqlOptions::new().auto_migrate(false))
            .await
            .unwrap(),
    );
    let name = LockName::new("lockkit-sql-values/migrated").unwrap();
    let held = take(&unmigrated, &name, 10_000).await;
    assert!(held.lease.set_value("v").await.is_err());
    held.lease.release().await.unwrap();
    // ...a connect that migrates adds the table, and keeps the locks working.
    let migrated: Client = Arc::new(SqliteLock::connect(&url).await.unwrap());
    let held = take(&migrated, &name, 10_000).await;
    assert!(held.token.get() > 1);
    held.lease.set_value("v").await.unwrap();
    assert_eq!(value_of(&inspect(&unmigrated, &name).await), Some("v"));
    held.lease.release().await.unwrap();
}

/// PostgreSQL only claims a watch: `changed` wakes on `NOTIFY`.
#[tokio::test]
async fn only_postgres_claims_watch() {
    for strategy in ["advisory", "table"] {
        let (pg, _, _) = clients("postgres", strategy).await;
        assert!(pg.capabilities().watch, "postgres {strategy}");
        let (my, _, _) = clients("mysql", strategy).await;
        assert!(!my.capabilities().watch, "mysql {strategy}");
    }
    let (lite, _, _dir) = clients("sqlite", "table").await;
    assert!(!lite.capabilities().watch);
}

/// `changed`, from `b`, with `change` run 200 ms into the wait: how long it took from the
/// change to the return.
async fn changed_after(
    observer: &Client,
    name: &LockName,
    change: impl Future<Output = ()>,
) -> Duration {
    let (deadline, settle) = (Duration::from_secs(10), Duration::from_millis(200));
    election::changed_after(observer, name, deadline, settle, change).await
}

/// Returns promptly after another client's acquisition, set_value and release, and not
/// before its deadline when nothing changes.
async fn changed_wakes_on_changes(strategy: &str) {
    let (a, b, _) = clients("postgres", strategy).await;
    let name = LockName::new(&fresh_name("lockkit-sql-values/changed")).unwrap();
    let admin = b.admin().unwrap();
    let started = Instant::now();
    admin
        .changed(&name, None, started + Duration::from_millis(300))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{strategy}"
    );
    let mut took = Vec::new();
    let mut held = None;
    took.push(
        changed_after(&b, &name, async {
            held = Some(take(&a, &name, 10_000).await)
        })
        .await,
    );
    let lease = held.unwrap().lease;
    let set = |v: &'static str| async { lease.set_value(v).await.unwrap() };
    took.push(changed_after(&b, &name, set("one")).await);
    // A holder that changes nothing: the wait runs to its deadline.
    let seen = inspect(&b, &name).await;
    let started = Instant::now();
    admin
        .changed(&name, seen.as_ref(), started + Duration::from_millis(600))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(550),
        "{strategy}"
    );
    took.push(changed_after(&b, &name, set("two")).await);
    took.push(changed_after(&b, &name, async { lease.release().await.unwrap() }).await);
    println!("postgres {strategy}: changed returned after {took:?}");
    for t in took {
        assert!(t < Duration::from_secs(2), "{strategy}: {t:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_advisory_changed_wakes_on_changes() {
    changed_wakes_on_changes("advisory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_table_changed_wakes_on_changes() {
    changed_wakes_on_changes("table").await;
}
