//! The ZooKeeper backend's part of leader election against the test server of
//! `scripts/services`: values stored in the holder's node, the owner check, and the watch
//! behind `changed`.

use std::time::Duration;

use lockkit_core::backend::{Backend, LockOptions};
use lockkit_core::LostReason;
use lockkit_testkit::election::{self, take};
use lockkit_testkit::{hosts, service_url};
use lockkit_zk::zookeeper_client as zk;
use lockkit_zk::ZkLock;

async fn client() -> ZkLock {
    ZkLock::connect(&service_url("LOCKKIT_ZK_URL"))
        .await
        .expect("connect")
}

lockkit_testkit::election_tests!("lockkit-zk-election", client());

/// A holder whose session ended (closed by a twin client: the same as an expiry, at once)
/// cannot store a value once another client holds the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_session_set_value_fails() {
    let (a, b) = (client().await, client().await);
    let name = election::name("lockkit-zk-election", "closed");
    // A TTL of its own: the session is this test's only.
    let ttl = Duration::from_millis(9_876);
    let stale = take(&a, &name, &LockOptions::new().ttl(ttl)).await;
    let session = a.session_client(ttl).await.unwrap().session().clone();
    let cluster = hosts(&service_url("LOCKKIT_ZK_URL")).join(",");
    // The fault injector, not lockkit: reattaching to a session another connection still
    // owns can time out on a busy server, so it gets a few tries, each as long as the session.
    let mut tries = 0;
    let twin = loop {
        tries += 1;
        let reopen = zk::Client::connector()
            .with_session(session.clone())
            .with_session_timeout(ttl)
            .connect(&cluster)
            .await;
        match reopen {
            Ok(twin) => break twin,
            Err(e) if tries < 3 => eprintln!("reopening the session, try {tries}: {e}"),
            Err(e) => panic!("reopen the session: {e}"),
        }
    };
    drop(twin);
    // The stale holder learns that its session ended (before that, a write may fail on the
    // moved connection with a connection error: unknown, not lost, which is honest).
    let reason = tokio::time::timeout(Duration::from_secs(20), stale.lease.lost())
        .await
        .expect("the closed session was not reported lost");
    assert!(matches!(reason, LostReason::SessionLost(_)), "{reason:?}");
    let wait = LockOptions::new()
        .ttl(Duration::from_secs(10))
        .wait_timeout(Duration::from_secs(10));
    let holder = b.lock(&name, &wait, None).await.expect("taken over");
    assert!(holder.token > stale.token);
    election::stale_fails_after_takeover(&b, &name, &stale, &holder).await;
}
