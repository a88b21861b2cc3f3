//! ZooKeeper beyond the conformance suite (which checks FIFO hand-off): session loss forced
//! from outside, cancellation cleanup and long waits, checked by listing the lock's znodes
//! with a raw client.
#![cfg(feature = "zk")]

use std::time::Duration;

use lockkit::zk::zookeeper_client as zk;
use lockkit::{LockName, LockOptions, Locks, LostReason, ZkLock};
use tokio::time::Instant;

use lockkit_testkit::{fresh_name, hosts, service_url};

fn url() -> String {
    service_url("LOCKKIT_ZK_URL")
}

async fn client() -> Locks {
    Locks::new(ZkLock::connect(&url()).await.expect("connect to ZooKeeper"))
}

/// A raw session, as an operator's tool would open one.
async fn raw() -> zk::Client {
    zk::Client::connect(&hosts(&url()).join(","))
        .await
        .expect("raw ZooKeeper client")
}

/// The contender nodes queued for `name`.
async fn contenders(raw: &zk::Client, lock: &Locks, name: &str) -> Vec<String> {
    let parent = lock
        .backend_as::<ZkLock>()
        .unwrap()
        .lock_path(&LockName::new(name).unwrap());
    match raw.list_children(&parent).await {
        Ok(children) => children,
        Err(zk::Error::NoNode) => Vec::new(),
        Err(e) => panic!("list {parent}: {e}"),
    }
}

/// Polls until `name` has `count` contender nodes, for at most `limit`.
async fn wait_for_contenders(raw: &zk::Client, lock: &Locks, name: &str, count: usize) {
    let limit = Instant::now() + Duration::from_secs(5);
    loop {
        let now = contenders(raw, lock, name).await;
        if now.len() == count {
            return;
        }
        assert!(
            Instant::now() < limit,
            "expected {count} contenders, found {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_closed_from_outside_fires_lost() {
    let (a, b) = (client().await, client().await);
    let name = fresh_name("lockkit-zk-faults/session_closed");
    // A long TTL and renewal: only the session's end can take the lock away here.
    let ttl = Duration::from_secs(20);
    let opts = LockOptions::new().ttl(ttl);
    let guard = a.acquire_with(&name, &opts).await.unwrap();
    assert!(b.try_acquire_with(&name, &opts).await.unwrap().is_none());

    // Open the guard's session a second time, by id and password, and close it.
    let session = a
        .backend_as::<ZkLock>()
        .unwrap()
        .session_client(ttl)
        .await
        .unwrap()
        .session()
        .clone();
    let cluster = hosts(&url()).join(",");
    let twin = zk::Client::connector()
        .with_session(session)
        .connect(&cluster)
        .await
        .expect("reopen the session");
    let started = Instant::now();
    drop(twin);

    let reason = tokio::time::timeout(Duration::from_secs(10), guard.lost())
        .await
        .expect("lost() did not fire after the session was closed");
    assert!(matches!(reason, LostReason::SessionLost(_)), "{reason:?}");
    assert!(!guard.is_held());
    eprintln!("lost() fired {:?} after the close", started.elapsed());

    // The node went with the session: another client gets the lock at once.
    let next = b
        .acquire_with(&name, &opts.clone().wait_timeout(Duration::from_secs(5)))
        .await
        .expect("the closed session's node stayed");
    assert!(next.fencing_token() > guard.fencing_token());
    let err = guard.release().await.expect_err("released after loss");
    assert!(err.is_lost(), "{err:?}");
    next.release().await.unwrap();

    // The client opens a new session for later acquisitions.
    let again = a
        .acquire_with(&name, &opts.clone().wait_timeout(Duration::from_secs(5)))
        .await
        .expect("acquire on a fresh session");
    again.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_wait_leaves_no_node() {
    let raw = raw().await;
    let (a, b) = (client().await, client().await);
    let name = fresh_name("lockkit-zk-faults/cancelled");
    let guard = a.acquire_with(&name, &LockOptions::new()).await.unwrap();

    // Cancelled while queued.
    let waiter = {
        let (b, name) = (b.clone(), name.clone());
        tokio::spawn(async move { b.acquire_with(&name, &LockOptions::new()).await.map(drop) })
    };
    wait_for_contenders(&raw, &a, &name, 2).await;
    waiter.abort();
    let _ = waiter.await;
    wait_for_contenders(&raw, &a, &name, 1).await;

    // Cancelled at every point of the request: before, during and after the create.
    for round in 0..30u64 {
        let (b, name) = (b.clone(), name.clone());
        let wait =
            tokio::spawn(async move { b.acquire_with(&name, &LockOptions::new()).await.map(drop) });
        tokio::time::sleep(Duration::from_micros(round * 200)).await;
        wait.abort();
        let _ = wait.await;
    }
    // Let detached requests and background deletes finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_for_contenders(&raw, &a, &name, 1).await;
    let left = contenders(&raw, &a, &name).await;
    assert_eq!(left.len(), 1, "orphans: {left:?}");
    guard.release().await.unwrap();
    wait_for_contenders(&raw, &a, &name, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_longer_than_the_ttl_still_gets_a_full_lease() {
    let (a, b) = (client().await, client().await);
    let name = fresh_name("lockkit-zk-faults/long_wait");
    let guard = a.acquire_with(&name, &LockOptions::new()).await.unwrap();
    let ttl = Duration::from_secs(1);
    let opts = LockOptions::new()
        .ttl(ttl)
        .auto_renew(false)
        .wait_timeout(Duration::from_secs(10));
    let releaser = tokio::spawn(async move {
        tokio::time::sleep(ttl * 2).await;
        guard.release().await.unwrap();
    });
    let next = b
        .acquire_with(&name, &opts)
        .await
        .expect("acquire after the wait");
    let left = next.valid_until().saturating_duration_since(Instant::now());
    assert!(next.is_held(), "{:?}", next.lost_reason());
    assert!(
        left > ttl / 2,
        "the lease was measured from the start of the wait: {left:?}"
    );
    releaser.await.unwrap();
    next.release().await.unwrap();
}
