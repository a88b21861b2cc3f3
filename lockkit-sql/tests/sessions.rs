//! Advisory locks of one client share sessions (many locks per connection), against the
//! servers of `scripts/services`: far more held than the pool has connections, never one
//! name twice on one session (session locks are re-entrant on the server), all renewed, and
//! all freed with their session.
#![cfg(all(feature = "postgres", feature = "mysql"))]

use std::time::Duration;

use lockkit_core::{LockOptions, Locks};
use lockkit_sql::{MySqlLock, PgLock};
use lockkit_testkit::{fresh_name, service_url, with_params};

async fn connect(key: &str, params: &str) -> Locks {
    let url = with_params(&service_url(key), params);
    match key {
        "LOCKKIT_POSTGRES_URL" => Locks::new(PgLock::connect(&url).await.unwrap()),
        _ => Locks::new(MySqlLock::connect(&url).await.unwrap()),
    }
}

/// 300 guards on a pool of 4 connections, held for four TTLs (advisory: TTL 2 s; lease rows,
/// whose renewals go out in batches: 3 s).
async fn many_guards_share_few_connections(key: &str, strategy: &str) {
    let locks = connect(key, &format!("strategy={strategy}&max_connections=4")).await;
    let other = connect(key, &format!("strategy={strategy}")).await;
    let base = fresh_name("lockkit-sql-sessions/many");
    let ttl = Duration::from_secs(if strategy == "table" { 3 } else { 2 });
    let opts = LockOptions::new()
        .ttl(ttl)
        .wait_timeout(Duration::from_secs(5));
    let mut held = Vec::new();
    for i in 0..300 {
        let guard = locks.acquire_with(&format!("{base}-{i}"), &opts).await;
        held.push(guard.unwrap_or_else(|e| panic!("{key}: guard {i}: {e}")));
    }
    for i in [0, 150, 299] {
        let name = format!("{base}-{i}");
        assert!(
            held[i].is_held(),
            "{key}: guard {i} lost (an overloaded machine?)"
        );
        assert!(
            locks.try_acquire(&name).await.unwrap().is_none(),
            "{key}: the holder's own client took {name} twice"
        );
        assert!(other.try_acquire(&name).await.unwrap().is_none());
    }
    // Four TTLs: only renewals keep them.
    tokio::time::sleep(ttl * 4).await;
    assert!(held.iter().all(|g| g.is_held()), "{key}: a guard was lost");
    let name = format!("{base}-7");
    assert!(other.try_acquire(&name).await.unwrap().is_none());
    let before = held[7].fencing_token();
    for guard in held {
        guard.release().await.unwrap();
    }
    let again = other.try_acquire(&name).await.unwrap().expect("released");
    assert!(again.fencing_token() > before);
    again.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_many_guards_share_few_connections() {
    many_guards_share_few_connections("LOCKKIT_POSTGRES_URL", "advisory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_many_guards_share_few_connections() {
    many_guards_share_few_connections("LOCKKIT_MYSQL_URL", "advisory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_many_lease_rows_renewed_in_batches() {
    many_guards_share_few_connections("LOCKKIT_POSTGRES_URL", "table").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_many_lease_rows_renewed_in_batches() {
    many_guards_share_few_connections("LOCKKIT_MYSQL_URL", "table").await;
}

/// Waiters queue on their own connections while the holder's session keeps serving the
/// client's other locks: a release is not stuck behind a wait.
async fn waits_do_not_block_the_holders_session(key: &str) {
    let locks = connect(key, "strategy=advisory&max_connections=8").await;
    let base = fresh_name("lockkit-sql-sessions/waits");
    let busy = locks.acquire(&format!("{base}-busy")).await.unwrap();
    let waiting = {
        let locks = locks.clone();
        let name = format!("{base}-busy");
        tokio::spawn(async move {
            let opts = LockOptions::new().wait_timeout(Duration::from_secs(10));
            locks.acquire_with(&name, &opts).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = tokio::time::Instant::now();
    for i in 0..20 {
        let guard = locks.acquire(&format!("{base}-{i}")).await.unwrap();
        guard.release().await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{key}: locks stalled behind a wait: {:?}",
        started.elapsed()
    );
    let token = busy.fencing_token();
    busy.release().await.unwrap();
    let next = waiting.await.unwrap().expect("the waiter got the lock");
    assert!(next.fencing_token() > token);
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_waits_do_not_block_the_holders_session() {
    waits_do_not_block_the_holders_session("LOCKKIT_POSTGRES_URL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_waits_do_not_block_the_holders_session() {
    waits_do_not_block_the_holders_session("LOCKKIT_MYSQL_URL").await;
}
