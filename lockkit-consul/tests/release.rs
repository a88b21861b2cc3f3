//! A release cut off by an outage, on the test Consul agent of `scripts/services` reached
//! through a proxy the test cuts: it goes through once the agent answers again, and
//! reports what happened to the lock.

use std::time::Duration;

use lockkit_consul::ConsulLock;
use lockkit_core::{LockOptions, Locks};
use lockkit_testkit::{fresh_name, service_url, Proxy};

/// The test agent's `host:port`.
fn agent() -> String {
    let url = service_url("LOCKKIT_CONSUL_URL");
    url.trim_start_matches("consul://")
        .split(['/', '?'])
        .next()
        .unwrap()
        .to_string()
}

/// While the holder's release is cut off, the client lets the key go in the background
/// and the guard's release retries: whichever reaches the agent second finds the key
/// already released. That is the release this guard asked for, not a loss, so `release`
/// succeeds; and the lock is free afterwards. The race goes either way, so it runs a few
/// rounds (on the old code it failed in most of them with `LockLost(NotOwner)`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_cut_off_by_an_outage_still_reports_success() {
    let agent = agent();
    let observer = Locks::new(
        ConsulLock::connect(&service_url("LOCKKIT_CONSUL_URL"))
            .await
            .unwrap(),
    );
    for round in 0..4 {
        let name = fresh_name("lockkit-consul-release/outage");
        let proxy = Proxy::start(&agent).await;
        let url = format!("consul://{}?request_timeout=300ms", proxy.addr());
        let locks = Locks::new(ConsulLock::connect(&url).await.unwrap());
        let opts = LockOptions::new().ttl(Duration::from_secs(30));
        let guard = locks.acquire_with(&name, &opts).await.unwrap();
        proxy.cut();
        let release = tokio::spawn(guard.release());
        // Long enough for a timed-out first attempt, the background let-go and a few
        // retries of the guard's own.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        proxy.restore();
        let result = tokio::time::timeout(Duration::from_secs(20), release)
            .await
            .expect("the release ended")
            .unwrap();
        assert!(result.is_ok(), "round {round}: {result:?}");
        // Released for real: another client takes it at once.
        let mut taken = None;
        for _ in 0..50 {
            taken = observer.try_acquire(&name).await.unwrap();
            if taken.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let taken = taken.unwrap_or_else(|| panic!("round {round}: the lock stayed held"));
        taken.release().await.unwrap();
    }
}
