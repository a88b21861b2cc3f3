//! The etcd backend's part of leader election against the test server of
//! `scripts/services`: values stored with the holder's key, the owner check, and the watch
//! behind `changed`.

use std::time::Duration;

use lockkit_core::backend::{Backend, LockName, LockOptions};
use lockkit_etcd::EtcdLock;
use lockkit_testkit::election::{self, take};
use lockkit_testkit::{fresh_name, service_url};

async fn client() -> EtcdLock {
    EtcdLock::connect(&service_url("LOCKKIT_ETCD_URL"))
        .await
        .expect("connect")
}

async fn pair(test: &str) -> (EtcdLock, EtcdLock, LockName) {
    let name = LockName::new(&fresh_name(&format!("lockkit-etcd-election/{test}"))).unwrap();
    (client().await, client().await, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_follows_the_holder() {
    let (a, b, name) = pair("follows").await;
    election::value_follows_the_holder(&a, &b, &name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_set_value_fails() {
    let (a, b, name) = pair("stale").await;
    election::stale_set_value_fails(&a, &b, &name).await;
}

/// A holder whose lease ran out (its own lease, not renewed) cannot store a value once
/// another client holds the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_set_value_fails() {
    let (a, b, name) = pair("expired").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_value_wakes_no_waiter() {
    let (a, b, name) = pair("waiter").await;
    election::set_value_wakes_no_waiter(&a, &b, &name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_sees_every_change() {
    let (a, b, name) = pair("changed").await;
    assert!(a.capabilities().watch && a.capabilities().election);
    election::changed_sees_every_change(&a, &b, &name).await;
}
