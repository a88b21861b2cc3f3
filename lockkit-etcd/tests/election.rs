//! The etcd backend's part of leader election against the test server of
//! `scripts/services`: values stored with the holder's key, the owner check, and the watch
//! behind `changed`.

use std::time::Duration;

use lockkit_core::backend::{Backend, LockOptions};
use lockkit_etcd::EtcdLock;
use lockkit_testkit::election::{self, take};
use lockkit_testkit::service_url;

async fn client() -> EtcdLock {
    EtcdLock::connect(&service_url("LOCKKIT_ETCD_URL"))
        .await
        .expect("connect")
}

lockkit_testkit::election_tests!("lockkit-etcd-election", client());

/// A holder whose lease ran out (its own lease, not renewed) cannot store a value once
/// another client holds the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_set_value_fails() {
    let (a, b) = (client().await, client().await);
    let name = election::name("lockkit-etcd-election", "expired");
    let short = LockOptions::new()
        .ttl(a.capabilities().min_ttl)
        .auto_renew(false);
    let stale = take(&a, &name, &short).await;
    let wait = LockOptions::new()
        .ttl(Duration::from_secs(10))
        .wait_timeout(Duration::from_secs(10));
    let holder = b.lock(&name, &wait, None).await.expect("taken over");
    assert!(holder.token > stale.token);
    election::stale_fails_after_takeover(&b, &name, &stale, &holder).await;
}
