//! PostgreSQL and MySQL/MariaDB under faults, against the servers of `scripts/services`:
//! a holder's connection killed from outside, cancelled waits and the pool, and advisory
//! keys that collide.
#![cfg(all(feature = "postgres", feature = "mysql"))]

use std::time::Duration;

use lockkit::sql::{MySqlLock, PgLock};
use lockkit::{LockName, LockOptions, Locks, LostReason};
use sqlx::{MySqlPool, PgPool};
use tokio::time::Instant;

use lockkit_testkit::{fresh_name, service_url, with_params};

fn url(key: &str, strategy: &str) -> String {
    with_params(&service_url(key), &format!("strategy={strategy}"))
}

/// The backend pid holding the advisory lock of `key`, if any.
async fn pg_holder(admin: &PgPool, key: i64) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1
         AND classid = (($1 >> 32) & 4294967295)::oid AND objid = ($1 & 4294967295)::oid",
    )
    .bind(key)
    .fetch_optional(admin)
    .await
    .unwrap()
}

/// The connection id holding a `GET_LOCK` name, if any.
async fn mysql_holder(admin: &MySqlPool, lock_name: &str) -> Option<i64> {
    sqlx::query_scalar("SELECT CAST(IS_USED_LOCK(?) AS SIGNED)")
        .bind(lock_name)
        .fetch_one(admin)
        .await
        .unwrap()
}

/// Waits for a guard's `lost()` and checks it came within the renewal interval plus margin.
async fn lost_within(guard: &lockkit::LockGuard, killed: Instant, ttl: Duration) {
    let bound = ttl / 3 + Duration::from_secs(2);
    let reason = tokio::time::timeout(bound, guard.lost())
        .await
        .expect("lost() did not fire after the connection was killed");
    assert!(
        matches!(reason, LostReason::SessionLost(_) | LostReason::NotOwner),
        "{reason:?}"
    );
    assert!(killed.elapsed() < bound);
    assert!(!guard.is_held());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_connection_fires_lost_and_frees_the_lock() {
    let admin = PgPool::connect(&service_url("LOCKKIT_POSTGRES_URL"))
        .await
        .unwrap();
    let (a, b) = (
        Locks::new(
            PgLock::connect(&url("LOCKKIT_POSTGRES_URL", "advisory"))
                .await
                .unwrap(),
        ),
        Locks::new(
            PgLock::connect(&url("LOCKKIT_POSTGRES_URL", "advisory"))
                .await
                .unwrap(),
        ),
    );
    let name = fresh_name("lockkit-sql-faults/pg_killed");
    let ttl = Duration::from_secs(3);
    let guard = a
        .acquire_with(&name, &LockOptions::new().ttl(ttl))
        .await
        .unwrap();
    let key = a
        .backend_as::<PgLock>()
        .unwrap()
        .advisory_key(&LockName::new(&name).unwrap())
        .await
        .unwrap();
    let pid = pg_holder(&admin, key)
        .await
        .expect("the lock shows in pg_locks");
    let killed = Instant::now();
    let done: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(done);
    lost_within(&guard, killed, ttl).await;
    let next = b
        .acquire_with(
            &name,
            &LockOptions::new().wait_timeout(Duration::from_secs(5)),
        )
        .await
        .expect("the killed holder's lock was not freed");
    assert!(next.fencing_token() > guard.fencing_token());
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_killed_connection_fires_lost_and_frees_the_lock() {
    let admin = MySqlPool::connect(&service_url("LOCKKIT_MYSQL_URL"))
        .await
        .unwrap();
    let (a, b) = (
        Locks::new(
            MySqlLock::connect(&url("LOCKKIT_MYSQL_URL", "advisory"))
                .await
                .unwrap(),
        ),
        Locks::new(
            MySqlLock::connect(&url("LOCKKIT_MYSQL_URL", "advisory"))
                .await
                .unwrap(),
        ),
    );
    let name = fresh_name("lockkit-sql-faults/mysql_killed");
    let ttl = Duration::from_secs(3);
    let guard = a
        .acquire_with(&name, &LockOptions::new().ttl(ttl))
        .await
        .unwrap();
    let lock_name = a
        .backend_as::<MySqlLock>()
        .unwrap()
        .lock_name(&LockName::new(&name).unwrap());
    let id = mysql_holder(&admin, &lock_name)
        .await
        .expect("the lock is in use");
    let killed = Instant::now();
    sqlx::query(&format!("KILL {id}"))
        .execute(&admin)
        .await
        .unwrap();
    lost_within(&guard, killed, ttl).await;
    let next = b
        .acquire_with(
            &name,
            &LockOptions::new().wait_timeout(Duration::from_secs(5)),
        )
        .await
        .expect("the killed holder's lock was not freed");
    assert!(next.fencing_token() > guard.fencing_token());
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_acquires_leave_pool_connections_lock_free() {
    let pg_admin = PgPool::connect(&service_url("LOCKKIT_POSTGRES_URL"))
        .await
        .unwrap();
    let my_admin = MySqlPool::connect(&service_url("LOCKKIT_MYSQL_URL"))
        .await
        .unwrap();
    let pg = Locks::new(
        PgLock::connect(&url("LOCKKIT_POSTGRES_URL", "advisory"))
            .await
            .unwrap(),
    );
    let my = Locks::new(
        MySqlLock::connect(&url("LOCKKIT_MYSQL_URL", "advisory"))
            .await
            .unwrap(),
    );
    let clients: [(&Locks, &str); 2] = [(&pg, "pg"), (&my, "mysql")];
    for (client, which) in clients {
        let name = fresh_name("lockkit-sql-faults/cancelled");
        let holder = client
            .acquire_with(&name, &LockOptions::new())
            .await
            .unwrap();
        let opts = LockOptions::new();
        for _ in 0..5 {
            let wait = client.acquire_with(&name, &opts);
            assert!(tokio::time::timeout(Duration::from_millis(200), wait)
                .await
                .is_err());
        }
        holder.release().await.unwrap();
        // The cancelled waits' server-side slices end within a wait slice (1 s); after that
        // no connection of the pool may hold the lock.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let lock = LockName::new(&name).unwrap();
        let held = match which {
            "pg" => pg_holder(
                &pg_admin,
                pg.backend_as::<PgLock>()
                    .unwrap()
                    .advisory_key(&lock)
                    .await
                    .unwrap(),
            )
            .await
            .map(|p| p.to_string()),
            _ => mysql_holder(
                &my_admin,
                &my.backend_as::<MySqlLock>().unwrap().lock_name(&lock),
            )
            .await
            .map(|c| c.to_string()),
        };
        assert_eq!(
            held, None,
            "{which}: a cancelled acquire left the lock held"
        );
        let next = client
            .acquire_with(
                &name,
                &LockOptions::new().wait_timeout(Duration::from_secs(2)),
            )
            .await
            .expect("free after the cancelled waits");
        next.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_names_and_a_forced_key_collision_never_block_each_other() {
    let admin = PgPool::connect(&service_url("LOCKKIT_POSTGRES_URL"))
        .await
        .unwrap();
    for strategy in ["advisory", "table"] {
        for key in ["LOCKKIT_POSTGRES_URL", "LOCKKIT_MYSQL_URL"] {
            let (a, b) = (
                lockkit::connect(&url(key, strategy)).await.unwrap(),
                lockkit::connect(&url(key, strategy)).await.unwrap(),
            );
            let base = fresh_name("lockkit-sql-faults/hundred");
            let opts = LockOptions::new();
            let mut held = Vec::new();
            for i in 0..100 {
                let guard = a
                    .try_acquire_with(&format!("{base}/a{i}"), &opts)
                    .await
                    .unwrap();
                held.push(guard.expect("distinct names blocked each other"));
            }
            for i in 0..100 {
                let guard = b
                    .try_acquire_with(&format!("{base}/b{i}"), &opts)
                    .await
                    .unwrap();
                guard
                    .expect("distinct names blocked each other")
                    .release()
                    .await
                    .unwrap();
            }
            drop(held);
        }
    }
    // A name whose hash key is already taken by another name gets a different key, and the
    // two lock independently.
    let pg = Locks::new(
        PgLock::connect(&url("LOCKKIT_POSTGRES_URL", "advisory"))
            .await
            .unwrap(),
    );
    let name = LockName::new(&fresh_name("lockkit-sql-faults/collision")).unwrap();
    let squatter = fresh_name("lockkit-sql-faults/squatter");
    sqlx::query("INSERT INTO lockkit_advisory_keys (name, key) VALUES ($1, $2)")
        .bind(&squatter)
        .bind(name.hash64() as i64)
        .execute(&admin)
        .await
        .unwrap();
    let key = pg
        .backend_as::<PgLock>()
        .unwrap()
        .advisory_key(&name)
        .await
        .unwrap();
    assert_ne!(key, name.hash64() as i64, "two names share an advisory key");
    let opts = LockOptions::new();
    let first = pg
        .try_acquire_with(&squatter, &opts)
        .await
        .unwrap()
        .expect("squatter");
    let second = pg
        .try_acquire_with(name.as_str(), &opts)
        .await
        .unwrap()
        .expect("blocked");
    first.release().await.unwrap();
    second.release().await.unwrap();
}
