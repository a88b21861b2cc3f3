//! The ZooKeeper backend's part of leader election against the test server of
//! `scripts/services`: values stored in the holder's node, the owner check, and the watch
//! behind `changed`.

use std::time::Duration;

use lockkit_core::backend::{Backend, LockOptions};
use lockkit_core::LostReason;
use lockkit_testkit::election::{self, take};
use lockkit_testkit::{hosts, service_url, Proxy};
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
///
/// The holder talks through a [`Proxy`] that is cut while the twin closes its session: else
/// its client, moved off the session, reattaches at once and the two fight over the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_session_set_value_fails() {
    let cluster = hosts(&service_url("LOCKKIT_ZK_URL"));
    let proxy = Proxy::start(&cluster[0]).await;
    let a = ZkLock::connect(&format!("zk://{}", proxy.addr()))
        .await
        .expect("connect through the proxy");
    let b = client().await;
    let name = election::name("lockkit-zk-election", "closed");
    let ttl = Duration::from_secs(10);
    let stale = take(&a, &name, &LockOptions::new().ttl(ttl)).await;
    let session = a.session_client(ttl).await.unwrap().session().clone();
    proxy.cut();
    let twin = zk::Client::connector()
        .with_session(session)
        .connect(&cluster.join(","))
        .await
        .expect("reopen the session");
    drop(twin);
    let wait = LockOptions::new()
        .ttl(Duration::from_secs(10))
        .wait_timeout(Duration::from_secs(10));
    let holder = b.lock(&name, &wait, None).await.expect("taken over");
    assert!(holder.token > stale.token);
    // The stale holder learns that its session ended once its connection is back.
    proxy.restore();
    let reason = tokio::time::timeout(Duration::from_secs(10), stale.lease.lost())
        .await
        .expect("the closed session was not reported lost");
    assert!(matches!(reason, LostReason::SessionLost(_)), "{reason:?}");
    election::stale_fails_after_takeover(&b, &name, &stale, &holder).await;
}
