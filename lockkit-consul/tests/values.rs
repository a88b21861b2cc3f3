//! Leader values (`Lease::set_value`, `LockInfo::value`) and `Admin::changed` on the test
//! Consul agent of `scripts/services`, through the backend SPI (no lease keeper), with fresh
//! names: on the client's shared session (renewal on) and on a session of the lock's own.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lockkit_consul::ConsulLock;
use lockkit_core::backend::{Acquired, Backend, LockName, LockOptions};
use lockkit_core::Error;
use lockkit_testkit::election::{self, inspect};
use lockkit_testkit::{fresh_name, service_url};
use tokio::time::Instant;

type Client = Arc<dyn Backend>;

async fn client() -> Client {
    let url = service_url("LOCKKIT_CONSUL_URL");
    Arc::new(ConsulLock::connect(&url).await.unwrap())
}

fn name(test: &str) -> LockName {
    LockName::new(&fresh_name(&format!("lockkit-consul-values/{test}"))).unwrap()
}

fn opts(shared: bool, ttl: Duration) -> LockOptions {
    LockOptions::new().ttl(ttl).auto_renew(shared)
}

/// Takes `name` (waiting up to 40 s for it: an expired session may take twice its TTL to
/// go), on the client's shared session or a session of its own.
async fn take(client: &Client, name: &LockName, shared: bool) -> Acquired {
    take_for(client, name, shared, Duration::from_secs(10)).await
}

async fn take_for(client: &Client, name: &LockName, shared: bool, ttl: Duration) -> Acquired {
    let until = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(acquired) = client.try_lock(name, &opts(shared, ttl)).await.unwrap() {
            return acquired;
        }
        assert!(Instant::now() < until, "{name} never came free");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The holder's token and value, as `client` sees them.
async fn holder(client: &Client, name: &LockName) -> Option<(u64, Option<String>)> {
    let info = inspect(client, name).await?;
    Some((info.token.unwrap().get(), info.value))
}

fn lost(result: lockkit_core::Result<()>) -> bool {
    matches!(result, Err(Error::LockLost { .. }))
}

/// Stored, shown with the holder's own token (storing moves the key's `ModifyIndex`),
/// replaced, listed, and gone with the release; the next holder shows none until it stores
/// its own, and the released lease cannot store one.
async fn stored_replaced_and_gone(shared: bool) {
    let (a, b) = (client().await, client().await);
    assert!(a.capabilities().election && a.capabilities().watch);
    let name = name("stored");
    let first = take(&a, &name, shared).await;
    let token = first.token.get();
    assert_eq!(holder(&b, &name).await, Some((token, None)));
    for value in [
        "node-1:8080",
        "with  spaces and ✓",
        "",
        "with  spaces and ✓",
    ] {
        first.lease.set_value(value).await.unwrap();
        assert_eq!(holder(&b, &name).await, Some((token, Some(value.into()))));
    }
    // Renewal still finds the key held (a write keeps the session on it).
    first.lease.extend(Duration::from_secs(10)).await.unwrap();
    let listed = b.admin().unwrap().list(name.as_str()).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].token.unwrap().get(), token);
    assert_eq!(listed[0].value.as_deref(), Some("with  spaces and ✓"));
    first.lease.release().await.unwrap();
    assert_eq!(inspect(&b, &name).await, None);
    assert!(lost(first.lease.set_value("after release").await));
    // The same client (on a shared session: the same session) and another one.
    let mut tokens = vec![token];
    for next in [&a, &b] {
        let held = take(next, &name, shared).await;
        tokens.push(held.token.get());
        assert_eq!(holder(&a, &name).await, Some((held.token.get(), None)));
        held.lease.set_value("mine").await.unwrap();
        let shown = holder(&b, &name).await;
        assert_eq!(shown, Some((held.token.get(), Some("mine".into()))));
        held.lease.release().await.unwrap();
    }
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
}

/// A lease whose key was force-released and taken again, by another client or by its own
/// client (after the stale lease's refused release) on the same shared session, stores
/// nothing: `LockLost`, and inspect shows the new
/// holder as before.
async fn stale_lease_stores_nothing(shared: bool, same_client: bool) {
    let (a, b) = (client().await, client().await);
    let name = name("stale");
    let stale = take(&a, &name, shared).await;
    stale.lease.set_value("old leader").await.unwrap();
    assert!(b.admin().unwrap().force_release(&name).await.unwrap());
    if same_client {
        // The client keeps a key it holds from being taken again on its shared session
        // until that lease lets it go: its release (refused, the key is gone) does.
        assert!(stale.lease.release().await.is_err());
    }
    let next = take(if same_client { &a } else { &b }, &name, shared).await;
    let token = next.token.get();
    assert_eq!(
        holder(&b, &name).await,
        Some((token, None)),
        "old value shown"
    );
    assert!(lost(stale.lease.set_value("stale write").await));
    assert_eq!(
        holder(&b, &name).await,
        Some((token, None)),
        "stale write shown"
    );
    next.lease.set_value("new leader").await.unwrap();
    assert!(lost(stale.lease.set_value("stale write").await));
    let shown = holder(&b, &name).await;
    assert_eq!(shown, Some((token, Some("new leader".into()))));
    next.lease.release().await.unwrap();
}

/// A lease nobody renews runs out; once another client holds the lock, the old holder's
/// value is not shown and its lease stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_lease_after_expiry_stores_nothing() {
    let (a, b) = (client().await, client().await);
    let name = name("expired");
    // A TTL of its own, so no other lease of client `a` renews its shared session.
    let ttl = Duration::from_millis(10_123);
    let stale = take_for(&a, &name, true, ttl).await;
    stale.lease.set_value("old leader").await.unwrap();
    let next = take(&b, &name, true).await;
    let token = next.token.get();
    assert_eq!(
        holder(&a, &name).await,
        Some((token, None)),
        "old value shown"
    );
    assert!(lost(stale.lease.set_value("stale write").await));
    assert_eq!(
        holder(&a, &name).await,
        Some((token, None)),
        "stale write shown"
    );
    next.lease.release().await.unwrap();
}

/// A waiter blocked on the key is not fooled by the holder storing values: it gets the lock
/// only after the release, and then shows no value.
async fn waiters_wait_through_value_changes(shared: bool) {
    let (a, b) = (client().await, client().await);
    let name = name("waiter");
    let held = take(&a, &name, shared).await;
    let (b2, name2) = (b.clone(), name.clone());
    let waiter = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        let opts = opts(shared, Duration::from_secs(10));
        b2.lock(&name2, &opts, Some(deadline)).await.unwrap()
    });
    for i in 0..5 {
        held.lease.set_value(&format!("value {i}")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!waiter.is_finished(), "a value change let a waiter in");
    held.lease.release().await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter did not get the released lock")
        .unwrap();
    assert!(next.token > held.token);
    assert_eq!(holder(&a, &name).await, Some((next.token.get(), None)));
    next.lease.release().await.unwrap();
}

/// `observer.changed` on `name` from what it sees now, with `change` made 300 ms into the
/// wait: how long after the change it returned.
async fn changed_after(
    observer: &Client,
    name: &LockName,
    change: impl Future<Output = ()>,
) -> Duration {
    let (deadline, settle) = (Duration::from_secs(4), Duration::from_millis(300));
    election::changed_after(observer, name, deadline, settle, change).await
}

/// `changed` returns soon after another client's acquisition, stored values and release
/// (the blocking query, not the 4 s deadline), and waits out its deadline when nothing
/// changes, free or held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_wakes_on_changes() {
    let (a, observer) = (client().await, client().await);
    let admin = observer.admin().unwrap();
    let name = name("changed");
    let started = Instant::now();
    let deadline = started + Duration::from_millis(300);
    admin.changed(&name, None, deadline).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    let mut took = Vec::new();
    let mut held = None;
    let acquire = async { held = Some(take(&a, &name, true).await) };
    took.push(changed_after(&observer, &name, acquire).await);
    let lease = held.unwrap().lease;
    let set = |value: &'static str| async { lease.set_value(value).await.unwrap() };
    took.push(changed_after(&observer, &name, set("one")).await);
    took.push(changed_after(&observer, &name, set("two")).await);
    let seen = inspect(&observer, &name).await;
    let started = Instant::now();
    let deadline = started + Duration::from_millis(300);
    admin.changed(&name, seen.as_ref(), deadline).await.unwrap();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    let release = async { lease.release().await.unwrap() };
    took.push(changed_after(&observer, &name, release).await);
    println!("consul: changed returned after {took:?}");
    for took in took {
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    // What `seen` no longer describes returns at once.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(20);
    admin.changed(&name, seen.as_ref(), deadline).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
}

macro_rules! session {
    ($module:ident, $shared:literal) => {
        mod $module {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn stored_replaced_and_gone_with_the_holder() {
                super::stored_replaced_and_gone($shared).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn stale_lease_after_force_release_stores_nothing() {
                super::stale_lease_stores_nothing($shared, false).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn stale_lease_retaken_by_its_own_client_stores_nothing() {
                super::stale_lease_stores_nothing($shared, true).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn waiters_wait_through_value_changes() {
                super::waiters_wait_through_value_changes($shared).await;
            }
        }
    };
}

session!(shared, true);
session!(own, false);

/// The backend-independent checks of `lockkit_testkit::election`.
mod shared_checks {
    async fn connect() -> lockkit_consul::ConsulLock {
        let url = lockkit_testkit::service_url("LOCKKIT_CONSUL_URL");
        lockkit_consul::ConsulLock::connect(&url)
            .await
            .expect("connect")
    }

    lockkit_testkit::election_tests!("lockkit-consul-election", connect());
}
