//! Checks of a backend's part of leader election, through its SPI ([`Lease::set_value`],
//! [`Admin::inspect`], [`Admin::changed`]), shared by the backend crates' own tests. Each
//! takes two clients of one backend (`a` holds, `b` looks on or takes over) and a fresh
//! lock name, and panics with what went wrong.
//!
//! [`Lease::set_value`]: lockkit_core::backend::Lease::set_value
//! [`Admin::inspect`]: lockkit_core::backend::Admin::inspect
//! [`Admin::changed`]: lockkit_core::backend::Admin::changed

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lockkit_core::backend::{Acquired, Admin, Backend, LockInfo, LockName, LockOptions};
use tokio::time::Instant;

/// How long a watching backend may take to report a change: generous (it should be well
/// under a second), so a loaded machine does not fail the check.
pub const PROMPT: Duration = Duration::from_secs(2);

/// A fresh lock name for the check `case` of a backend crate's tests (`prefix`: the crate).
pub fn name(prefix: &str, case: &str) -> LockName {
    LockName::new(&crate::fresh_name(&format!("{prefix}/{case}"))).expect("a valid name")
}

/// Stamps the backend-independent checks of this module as tests of a backend crate:
/// `prefix` names its locks, `$connect` is an expression whose `.await` is a new client.
#[macro_export]
macro_rules! election_tests {
    ($prefix:literal, $connect:expr) => {
        $crate::election_tests!(@cases $prefix, $connect;
            value_follows_the_holder,
            stale_set_value_fails,
            set_value_wakes_no_waiter,
            changed_sees_every_change);
    };
    (@cases $prefix:literal, $connect:expr; $($case:ident),+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (a, b) = ($connect.await, $connect.await);
                let name = $crate::election::name($prefix, stringify!($case));
                $crate::election::$case(&a, &b, &name).await;
            }
        )+
    };
}

fn admin(backend: &dyn Backend) -> &dyn Admin {
    backend.admin().expect("the backend has no admin interface")
}

fn options() -> LockOptions {
    LockOptions::new().ttl(Duration::from_secs(10))
}

/// Takes the free lock `name` with one attempt.
pub async fn take(backend: &dyn Backend, name: &LockName, opts: &LockOptions) -> Acquired {
    backend
        .try_lock(name, opts)
        .await
        .unwrap_or_else(|e| panic!("{}: try_lock {name}: {e}", backend.name()))
        .unwrap_or_else(|| panic!("{}: {name} is held", backend.name()))
}

/// What `b` sees of `name`.
pub async fn inspect(b: &dyn Backend, name: &LockName) -> Option<LockInfo> {
    admin(b)
        .inspect(name)
        .await
        .unwrap_or_else(|e| panic!("{}: inspect {name}: {e}", b.name()))
}

/// The value `b` sees `name`'s holder announce, checking that the holder has `token`.
async fn value_of(b: &dyn Backend, name: &LockName, held: &Acquired) -> Option<String> {
    let info = inspect(b, name).await.expect("the lock is held");
    assert_eq!(
        info.token,
        Some(held.token),
        "{}: the holder's token",
        b.name()
    );
    info.value
}

/// A value is shown with its holder only, replaced by the next `set_value`, and gone with
/// the holder: the next holder shows none (or its own). Storing one changes no token.
pub async fn value_follows_the_holder(a: &dyn Backend, b: &dyn Backend, name: &LockName) {
    let first = take(a, name, &options()).await;
    assert_eq!(value_of(b, name, &first).await, None, "no value set yet");
    for value in ["one", "two", "", "ünïcode\0with a NUL"] {
        first.lease.set_value(value).await.expect("set_value");
        assert_eq!(value_of(b, name, &first).await.as_deref(), Some(value));
    }
    first.lease.release().await.expect("release");
    assert_eq!(inspect(b, name).await, None, "released");
    let second = take(b, name, &options()).await;
    assert!(
        second.token > first.token,
        "the next holder's token is higher"
    );
    assert_eq!(
        value_of(a, name, &second).await,
        None,
        "a former holder's value"
    );
    second.lease.set_value("second").await.expect("set_value");
    assert_eq!(value_of(a, name, &second).await.as_deref(), Some("second"));
    second.lease.release().await.expect("release");
}

/// A lease that lost its lock to another holder (here by a forced release) fails to store
/// a value with `LockLost`, and what inspect shows of the new holder does not change.
pub async fn stale_set_value_fails(a: &dyn Backend, b: &dyn Backend, name: &LockName) {
    let stale = take(a, name, &options()).await;
    stale.lease.set_value("old").await.expect("set_value");
    assert!(admin(b).force_release(name).await.expect("force_release"));
    let holder = take(b, name, &options()).await;
    stale_fails_after_takeover(b, name, &stale, &holder).await;
    holder.lease.release().await.expect("release");
}

/// `stale` lost `name` and `holder` holds it now: `stale` cannot store a value, before or
/// after the holder stored its own.
pub async fn stale_fails_after_takeover(
    b: &dyn Backend,
    name: &LockName,
    stale: &Acquired,
    holder: &Acquired,
) {
    assert_eq!(
        value_of(b, name, holder).await,
        None,
        "the old holder's value"
    );
    refused(b, stale).await;
    assert_eq!(
        value_of(b, name, holder).await,
        None,
        "after a stale set_value"
    );
    holder.lease.set_value("new").await.expect("set_value");
    refused(b, stale).await;
    assert_eq!(value_of(b, name, holder).await.as_deref(), Some("new"));
}

/// `stale`'s `set_value` fails with `LockLost`.
async fn refused(b: &dyn Backend, stale: &Acquired) {
    let error = stale
        .lease
        .set_value("stale")
        .await
        .expect_err("a stale set_value");
    assert!(error.is_lost(), "{}: a stale set_value: {error}", b.name());
}

/// Storing a value does not hand the lock over: a waiter keeps waiting until the release.
pub async fn set_value_wakes_no_waiter(a: &dyn Backend, b: &dyn Backend, name: &LockName) {
    let held = take(a, name, &options()).await;
    let opts = options().wait_timeout(Duration::from_secs(10));
    let waiting = b.lock(name, &opts, None);
    tokio::pin!(waiting);
    let announce = async {
        for value in ["one", "two", "three"] {
            tokio::time::sleep(Duration::from_millis(100)).await;
            held.lease.set_value(value).await.expect("set_value");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    tokio::select! {
        taken = &mut waiting => panic!("{}: a waiter took the held lock: {:?}", b.name(), taken.map(|t| t.token)),
        () = announce => {}
    }
    held.lease.release().await.expect("release");
    let next = tokio::time::timeout(PROMPT, waiting)
        .await
        .expect("the waiter gets the released lock")
        .expect("lock");
    assert!(next.token > held.token);
    assert_eq!(value_of(a, name, &next).await, None);
    next.lease.release().await.expect("release");
}

/// `observer`'s `changed` on `name`, from what it sees now and with `deadline` to go, with
/// `change` made `settle` into the wait (once the observer is waiting; returning before it
/// fails): how long after the change it returned.
pub async fn changed_after(
    observer: &Arc<dyn Backend>,
    name: &LockName,
    deadline: Duration,
    settle: Duration,
    change: impl Future<Output = ()>,
) -> Duration {
    let seen = inspect(observer.as_ref(), name).await;
    let (observer, watched) = (observer.clone(), name.clone());
    let waiting = tokio::spawn(async move {
        let deadline = Instant::now() + deadline;
        admin(observer.as_ref())
            .changed(&watched, seen.as_ref(), deadline)
            .await
            .unwrap_or_else(|e| panic!("{}: changed {watched}: {e}", observer.name()));
        Instant::now()
    });
    tokio::time::sleep(settle).await;
    assert!(!waiting.is_finished(), "{name}: returned before any change");
    let changed = Instant::now();
    change.await;
    let returned = waiting.await.expect("the observer panicked");
    returned.saturating_duration_since(changed)
}

/// How long `b`'s `changed` on `name` (seen as it is now, deadline `limit` away) takes while
/// `event` runs alongside.
async fn changed_during(
    b: &dyn Backend,
    name: &LockName,
    limit: Duration,
    event: impl Future<Output = ()>,
) -> Duration {
    let seen = inspect(b, name).await;
    let started = Instant::now();
    let watch = async {
        admin(b)
            .changed(name, seen.as_ref(), started + limit)
            .await
            .expect("changed");
        started.elapsed()
    };
    let (took, ()) = tokio::join!(watch, event);
    eprintln!("{}: changed returned after {took:?}", b.name());
    took
}

/// `changed` returns promptly after a change made by another client (a value stored, a
/// release, an acquisition; an event 100 ms after it started watching), at once when what
/// it was given is out of date, and not before its deadline when nothing changes.
pub async fn changed_sees_every_change(a: &dyn Backend, b: &dyn Backend, name: &LockName) {
    assert!(b.capabilities().watch, "{}: claims no watch", b.name());
    let after = |ms| tokio::time::sleep(Duration::from_millis(ms));
    let far = Duration::from_secs(10);
    let quiet = changed_during(b, name, Duration::from_millis(300), async {}).await;
    assert!(
        quiet >= Duration::from_millis(250),
        "free, quiet: {quiet:?}"
    );

    let mut holder = None;
    let took = changed_during(b, name, far, async {
        after(100).await;
        holder = Some(take(a, name, &options()).await);
    })
    .await;
    assert!(took < PROMPT, "{}: acquired, seen after {took:?}", b.name());
    let holder = holder.expect("acquired");

    let quiet = changed_during(b, name, Duration::from_millis(300), async {}).await;
    assert!(
        quiet >= Duration::from_millis(250),
        "held, quiet: {quiet:?}"
    );

    let took = changed_during(b, name, far, async {
        after(100).await;
        holder.lease.set_value("leader").await.expect("set_value");
    })
    .await;
    assert!(
        took < PROMPT,
        "{}: value set, seen after {took:?}",
        b.name()
    );

    // Given what was true before the value: changed at once.
    let mut before = inspect(b, name).await;
    if let Some(info) = before.as_mut() {
        info.value = None;
    }
    let started = Instant::now();
    admin(b)
        .changed(name, before.as_ref(), started + far)
        .await
        .expect("changed");
    let took = started.elapsed();
    assert!(
        took < PROMPT,
        "{}: out of date, returned after {took:?}",
        b.name()
    );

    let took = changed_during(b, name, far, async {
        after(100).await;
        holder.lease.release().await.expect("release");
    })
    .await;
    assert!(took < PROMPT, "{}: released, seen after {took:?}", b.name());
}
