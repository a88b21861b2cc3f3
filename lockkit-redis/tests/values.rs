//! Leader values (`Lease::set_value`, `LockInfo::value`) and `Admin::changed` on a single
//! Redis server and on RedLock, through the backend SPI (no lease keeper: a lease nobody
//! extends runs out at its TTL). Runs on the servers of `scripts/services`, with fresh names.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lockkit_core::backend::{Acquired, Backend, LockName, LockOptions};
use lockkit_core::Error;
use lockkit_redis::{RedisLock, RedisOptions};
use lockkit_testkit::election::{self, inspect};
use lockkit_testkit::{fresh_name, service_url};
use tokio::time::Instant;

type Client = Arc<dyn Backend>;

/// The services.env key of a mode's URL.
fn url_key(redlock: bool) -> &'static str {
    if redlock {
        "LOCKKIT_REDLOCK_URL"
    } else {
        "LOCKKIT_REDIS_URL"
    }
}

/// A client of the test server(s); `max_poll` as given (an observer that must not be woken
/// by its fallback re-check gets a long one).
async fn client(redlock: bool, max_poll: Duration) -> Client {
    let options = RedisOptions::new().max_poll(max_poll);
    let url = service_url(url_key(redlock));
    Arc::new(RedisLock::connect_with(&url, options).await.unwrap())
}

async fn two_clients(redlock: bool) -> (Client, Client) {
    let poll = Duration::from_secs(1);
    (client(redlock, poll).await, client(redlock, poll).await)
}

fn name(test: &str) -> LockName {
    LockName::new(&fresh_name(&format!("lockkit-redis-values/{test}"))).unwrap()
}

/// Takes `name` (waiting up to 10 s for it to be free), with a lease of `ttl_ms`.
async fn take(client: &Client, name: &LockName, ttl_ms: u64) -> Acquired {
    let opts = LockOptions::new().ttl(Duration::from_millis(ttl_ms));
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(acquired) = client.try_lock(name, &opts).await.unwrap() {
            return acquired;
        }
        assert!(Instant::now() < until, "{name} never came free");
        tokio::time::sleep(Duration::from_millis(20)).await;
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

/// Stored, shown, replaced, listed, and gone with the release: the next holder shows none
/// until it stores its own, and the released lease cannot store one any more.
async fn stored_replaced_and_gone(redlock: bool) {
    let (a, b) = two_clients(redlock).await;
    assert!(a.capabilities().election && a.capabilities().watch);
    let name = name("stored");
    let first = take(&a, &name, 10_000).await;
    let token = first.token.get();
    assert_eq!(holder(&b, &name).await, Some((token, None)));
    first.lease.set_value("node-1:8080").await.unwrap();
    let seen = Some((token, Some("node-1:8080".to_string())));
    assert_eq!(holder(&b, &name).await, seen);
    // Spaces and any UTF-8 are kept as they are; the same value again is fine.
    for value in ["with  spaces and ✓", "", "with  spaces and ✓"] {
        first.lease.set_value(value).await.unwrap();
        assert_eq!(holder(&b, &name).await, Some((token, Some(value.into()))));
    }
    let listed = b.admin().unwrap().list(name.as_str()).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].value.as_deref(), Some("with  spaces and ✓"));
    first.lease.release().await.unwrap();
    assert_eq!(inspect(&b, &name).await, None);
    assert!(lost(first.lease.set_value("after release").await));
    for next in [&a, &b] {
        let held = take(next, &name, 10_000).await;
        assert_eq!(holder(&a, &name).await, Some((held.token.get(), None)));
        held.lease.set_value("mine").await.unwrap();
        let shown = holder(&b, &name).await;
        assert_eq!(shown, Some((held.token.get(), Some("mine".into()))));
        held.lease.release().await.unwrap();
    }
}

/// A lease whose lock ran out (or was force-released) and went to another client stores
/// nothing: `LockLost`, and inspect shows the new holder as before.
async fn stale_lease_stores_nothing(redlock: bool, forced: bool) {
    let (a, b) = two_clients(redlock).await;
    let name = name("stale");
    let ttl = if forced { 10_000 } else { 600 };
    let stale = take(&a, &name, ttl).await;
    stale.lease.set_value("old leader").await.unwrap();
    if forced {
        assert!(b.admin().unwrap().force_release(&name).await.unwrap());
    } else {
        tokio::time::sleep(Duration::from_millis(ttl + 200)).await;
    }
    let next = take(&b, &name, 10_000).await;
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
    next.lease.set_value("new leader").await.unwrap();
    assert!(lost(stale.lease.set_value("stale write").await));
    let shown = holder(&a, &name).await;
    assert_eq!(shown, Some((token, Some("new leader".into()))));
    next.lease.release().await.unwrap();
}

/// `observer.changed` on `name` from what it sees now, with `change` made 300 ms into the
/// wait (the observer is waiting by then): how long after the change it returned.
async fn changed_after(
    observer: &Client,
    name: &LockName,
    change: impl Future<Output = ()>,
) -> Duration {
    let (deadline, settle) = (Duration::from_secs(20), Duration::from_millis(300));
    election::changed_after(observer, name, deadline, settle, change).await
}

/// `changed` returns soon after another client's acquisition, stored values and release,
/// woken by the channel (the observer's fallback re-check is 30 s away), and waits out its
/// deadline when nothing changes.
async fn changed_wakes_on_changes(redlock: bool) {
    let a = client(redlock, Duration::from_secs(1)).await;
    let observer = client(redlock, Duration::from_secs(30)).await;
    let admin = observer.admin().unwrap();
    let name = name("changed");
    let started = Instant::now();
    let deadline = started + Duration::from_millis(300);
    admin.changed(&name, None, deadline).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    let mut took = Vec::new();
    let mut held = None;
    let acquire = async { held = Some(take(&a, &name, 10_000).await) };
    took.push(changed_after(&observer, &name, acquire).await);
    let lease = held.unwrap().lease;
    let set = |value: &'static str| async { lease.set_value(value).await.unwrap() };
    took.push(changed_after(&observer, &name, set("one")).await);
    took.push(changed_after(&observer, &name, set("two")).await);
    // Held, and nothing changes: the wait runs to its deadline.
    let seen = inspect(&observer, &name).await;
    let started = Instant::now();
    let deadline = started + Duration::from_millis(300);
    admin.changed(&name, seen.as_ref(), deadline).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    let release = async { lease.release().await.unwrap() };
    took.push(changed_after(&observer, &name, release).await);
    println!("redlock {redlock}: changed returned after {took:?}");
    for took in took {
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
}

/// A `changed` whose look already differs from `seen` returns at once; one dropped while it
/// waits leaves nothing behind that keeps later ones from waking.
async fn changed_returns_at_once_and_cancels_cleanly(redlock: bool) {
    let a = client(redlock, Duration::from_secs(1)).await;
    let observer = client(redlock, Duration::from_secs(30)).await;
    let admin = observer.admin().unwrap();
    let name = name("cancel");
    let held = take(&a, &name, 10_000).await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(20);
    admin.changed(&name, None, deadline).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    let seen = inspect(&observer, &name).await;
    for _ in 0..5 {
        let wait = admin.changed(&name, seen.as_ref(), deadline);
        let cut = tokio::time::timeout(Duration::from_millis(50), wait).await;
        assert!(cut.is_err(), "returned without a change");
    }
    let set = async { held.lease.set_value("after cancels").await.unwrap() };
    let took = changed_after(&observer, &name, set).await;
    assert!(took < Duration::from_secs(2), "{took:?}");
    held.lease.release().await.unwrap();
}

macro_rules! mode {
    ($module:ident, $redlock:literal) => {
        mod $module {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn stored_replaced_and_gone_with_the_holder() {
                super::stored_replaced_and_gone($redlock).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn stale_lease_after_expiry_stores_nothing() {
                super::stale_lease_stores_nothing($redlock, false).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn stale_lease_after_force_release_stores_nothing() {
                super::stale_lease_stores_nothing($redlock, true).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn changed_wakes_on_changes() {
                super::changed_wakes_on_changes($redlock).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn changed_returns_at_once_and_cancels_cleanly() {
                super::changed_returns_at_once_and_cancels_cleanly($redlock).await;
            }
        }
    };
}

mode!(single, false);
mode!(redlock, true);

/// The backend-independent checks of `lockkit_testkit::election`, on each mode.
mod shared_checks {
    async fn connect(redlock: bool) -> lockkit_redis::RedisLock {
        let url = lockkit_testkit::service_url(super::url_key(redlock));
        lockkit_redis::RedisLock::connect(&url)
            .await
            .expect("connect")
    }

    mod single {
        lockkit_testkit::election_tests!("lockkit-redis-election", super::connect(false));
    }

    mod redlock {
        lockkit_testkit::election_tests!("lockkit-redlock-election", super::connect(true));
    }
}
