//! The conformance suite: one set of cases every backend must pass, against a real server.
//!
//! A backend's test file implements [`Harness`] and stamps one test per case with
//! [`conformance_suite!`](crate::conformance_suite), inside a module named after the backend,
//! so the tests are called `<backend>::<case>`:
//!
//! ```text
//! mod sqlite {
//!     lockkit_core::conformance_suite!(crate::harness::sqlite().await);
//! }
//! ```
//!
//! Cases read the backend's [`Capabilities`] to choose timings, and run every check a
//! claimed capability implies. Each case uses fresh random lock names, so cases can run in
//! parallel against one server.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::{Capabilities, Error, LockOptions, Locks, LostReason, Result};

/// How long one case may run before it counts as hung.
pub const CASE_LIMIT: Duration = Duration::from_secs(240);

/// What a backend provides to the suite.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A new, independent client (its own connections or session), as a second process
    /// would have.
    async fn client(&self) -> Locks;

    /// Connects to a server that is not there (a closed port on loopback, or for an embedded
    /// backend a database that cannot be opened). Either this or the first acquisition on
    /// the returned client must fail with [`Error::Connection`].
    async fn unreachable(&self) -> Result<Locks>;
}

/// Stamps one `#[tokio::test]` per conformance case. `$harness` is an expression (it may
/// `.await`) giving a value that implements [`Harness`]; it is evaluated once per test.
/// After it, list the guarantees the backend claims (`fencing`, `lease_expiry`, `renewal`,
/// `fifo`, `election`, `semaphore`): the cases of each are stamped only when it is listed, and the case
/// `claimed_capabilities` checks that the list is exactly what the backend's
/// [`Capabilities`] claim, so a case can neither be skipped for a claimed guarantee nor
/// reported as passed for an unclaimed one. Invoke it inside a module named after the
/// backend:
///
/// ```text
/// mod etcd {
///     lockkit_core::conformance_suite!(EtcdHarness; fencing, lease_expiry, renewal, fifo);
/// }
/// ```
#[macro_export]
macro_rules! conformance_suite {
    ($harness:expr $(; $($claim:ident),* $(,)?)?) => {
        $crate::__conformance_cases!($harness;
            mutual_exclusion,
            try_acquire_when_held,
            wait_timeout,
            cancelled_wait_leaves_nothing,
            drop_releases,
            many_names,
            name_independence,
            prefix_names_are_independent,
            bad_input,
            unreachable_server,
            with_lock_runs_and_releases,
        );
        $($( $crate::__conformance_claim!($harness; $claim); )*)?

        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn claimed_capabilities() {
            let harness = $harness;
            $crate::conformance::claimed_capabilities(
                &harness,
                &[$($(stringify!($claim)),*)?],
            )
            .await;
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_claim {
    ($harness:expr; fencing) => {
        $crate::__conformance_cases!($harness; fencing_tokens_increase);
    };
    ($harness:expr; lease_expiry) => {
        $crate::__conformance_cases!($harness; lease_expiry, stale_owner_cannot_release_or_extend);
    };
    ($harness:expr; renewal) => {
        $crate::__conformance_cases!($harness; renewal_keeps_lock, extend_prolongs_lease);
    };
    ($harness:expr; fifo) => {
        $crate::__conformance_cases!($harness; fifo_order);
    };
    ($harness:expr; election) => {
        $crate::__conformance_cases!($harness;
            election_one_leader_at_a_time,
            election_tokens_increase_across_terms,
            election_leader_that_stops_renewing_is_replaced,
            election_observers_see_every_change_in_order,
            election_resign_hands_over_at_once,
            election_cancelled_campaign_leaves_nothing,
        );
    };
    ($harness:expr; semaphore) => {
        $crate::__conformance_cases!($harness;
            semaphore_never_more_than_limit,
            semaphore_crashed_permits_come_back,
            semaphore_tokens_increase,
            semaphore_cancelled_wait_leaves_nothing,
            semaphore_limit_mismatch_is_an_error,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($harness:expr; $($case:ident),+ $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let harness = $harness;
                let run = $crate::conformance::$case(&harness);
                if ::tokio::time::timeout($crate::conformance::CASE_LIMIT, run).await.is_err() {
                    panic!("case `{}` hung past {:?}", stringify!($case), $crate::conformance::CASE_LIMIT);
                }
            }
        )+
    };
}

/// The guarantees `caps` claims, by the names [`conformance_suite!`](crate::conformance_suite)
/// takes.
pub fn claims(caps: &Capabilities) -> Vec<&'static str> {
    [
        ("fencing", caps.fencing),
        ("lease_expiry", caps.lease_expiry),
        ("renewal", caps.renewal),
        ("fifo", caps.fifo),
        ("election", caps.election),
        // Semaphores are built from plain locks; their limit check lists the held slots.
        ("semaphore", caps.list),
    ]
    .into_iter()
    .filter_map(|(name, claimed)| claimed.then_some(name))
    .collect()
}

/// The test file lists exactly the guarantees the backend claims: every claimed guarantee's
/// cases are stamped, and no case of an unclaimed one is.
pub async fn claimed_capabilities(h: &dyn Harness, listed: &[&str]) {
    let caps = h.client().await.capabilities();
    let mut listed = listed.to_vec();
    listed.sort_unstable();
    let mut claimed = claims(&caps);
    claimed.sort_unstable();
    assert_eq!(
        listed, claimed,
        "the suite was stamped for other guarantees than the backend claims"
    );
}

/// Fails the case if the backend does not claim what it checks (the macro only stamps it
/// for claimed guarantees; this guards a direct call).
fn require(caps: &Capabilities, claim: &str) {
    assert!(
        claims(caps).contains(&claim),
        "this case checks `{claim}`, which the backend does not claim"
    );
}

fn fresh_name(case: &str) -> String {
    format!(
        "lockkit-conformance/{case}/{}",
        uuid::Uuid::new_v4().simple()
    )
}

/// A TTL short enough to wait out in a test, long enough for the backend.
fn short_ttl(caps: &Capabilities) -> Duration {
    caps.min_ttl.max(Duration::from_secs(1))
}

/// How long after its TTL an abandoned lease is certainly gone, with margin.
fn expiry_bound(caps: &Capabilities, ttl: Duration) -> Duration {
    ttl + caps.expiry_slack + Duration::from_secs(5)
}

fn waiting(limit: Duration) -> LockOptions {
    LockOptions::new().wait_timeout(limit)
}

async fn caps_of(h: &dyn Harness) -> (Locks, Capabilities) {
    let client = h.client().await;
    let caps = client.capabilities();
    (client, caps)
}

/// 16 tasks on two clients each take the lock 50 times and do a non-atomic
/// read-yield-write of a shared counter: the counter ends exact, no two holders overlap, and
/// tokens rise in the order the lock was taken.
pub async fn mutual_exclusion(h: &dyn Harness) {
    let clients = [h.client().await, h.client().await];
    let name = fresh_name("mutual_exclusion");
    let counter = Arc::new(AtomicU64::new(0));
    let holders = Arc::new(AtomicUsize::new(0));
    let max_holders = Arc::new(AtomicUsize::new(0));
    let last_token = Arc::new(Mutex::new(0u64));
    let mut tasks = JoinSet::new();
    for task in 0..16 {
        let client = clients[task % 2].clone();
        let (name, counter, holders, max_holders, last_token) = (
            name.clone(),
            counter.clone(),
            holders.clone(),
            max_holders.clone(),
            last_token.clone(),
        );
        tasks.spawn(async move {
            let opts = waiting(Duration::from_secs(120));
            for _ in 0..50 {
                let guard = client.acquire_with(&name, &opts).await.expect("acquire");
                let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                max_holders.fetch_max(now, Ordering::SeqCst);
                {
                    let mut last = last_token.lock().unwrap();
                    let token = guard.fencing_token().get();
                    assert!(token > *last, "token {token} after {}", *last);
                    *last = token;
                }
                let seen = counter.load(Ordering::SeqCst);
                tokio::task::yield_now().await;
                counter.store(seen + 1, Ordering::SeqCst);
                holders.fetch_sub(1, Ordering::SeqCst);
                guard.release().await.expect("release");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a worker failed");
    }
    assert_eq!(counter.load(Ordering::SeqCst), 16 * 50, "lost updates");
    assert_eq!(max_holders.load(Ordering::SeqCst), 1, "two holders at once");
}

/// `try_acquire` gives `None` while the lock is held (also to the holder's own client: locks
/// are not reentrant) and `Some` once it is released.
pub async fn try_acquire_when_held(h: &dyn Harness) {
    let (a, b) = (h.client().await, h.client().await);
    let name = fresh_name("try_acquire");
    let opts = LockOptions::new();
    let guard = a
        .try_acquire_with(&name, &opts)
        .await
        .unwrap()
        .expect("free lock");
    assert!(b.try_acquire_with(&name, &opts).await.unwrap().is_none());
    assert!(a.try_acquire_with(&name, &opts).await.unwrap().is_none());
    guard.release().await.expect("release");
    let again = b.try_acquire_with(&name, &opts).await.unwrap();
    again.expect("free after release").release().await.unwrap();
}

/// `acquire` on a held lock with a 300 ms wait fails with `Timeout` after 300 ms to 5 s.
pub async fn wait_timeout(h: &dyn Harness) {
    let (a, b) = (h.client().await, h.client().await);
    let name = fresh_name("wait_timeout");
    let guard = a.acquire_with(&name, &LockOptions::new()).await.unwrap();
    let started = Instant::now();
    let err = b
        .acquire_with(&name, &waiting(Duration::from_millis(300)))
        .await
        .expect_err("acquired a held lock");
    let took = started.elapsed();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(
        took >= Duration::from_millis(300),
        "gave up early: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "gave up late: {took:?}");
    guard.release().await.unwrap();
}

/// Dropping an `acquire` future mid-wait leaves nothing behind: once the holder releases, a
/// third client acquires at once.
pub async fn cancelled_wait_leaves_nothing(h: &dyn Harness) {
    let (a, b, c) = (h.client().await, h.client().await, h.client().await);
    let name = fresh_name("cancelled_wait");
    let opts = LockOptions::new();
    let guard = a.acquire_with(&name, &opts).await.unwrap();
    for _ in 0..3 {
        let wait = b.acquire_with(&name, &opts);
        let gave_up = tokio::time::timeout(Duration::from_millis(300), wait).await;
        assert!(gave_up.is_err(), "acquired a held lock");
    }
    guard.release().await.unwrap();
    let started = Instant::now();
    let next = c
        .acquire_with(&name, &waiting(Duration::from_secs(10)))
        .await
        .expect("the cancelled waiter left the lock blocked");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
    next.release().await.unwrap();
    // The cancelled waiters hold nothing now either.
    let again = b
        .try_acquire_with(&name, &LockOptions::new())
        .await
        .unwrap();
    again
        .expect("a cancelled waiter got the lock")
        .release()
        .await
        .unwrap();

    // Cancel waits just as the holder releases, so some cancelled waits have just been
    // granted the lock: none of them may keep it.
    for round in 0..20u64 {
        let guard = a.acquire_with(&name, &opts).await.unwrap();
        let b = b.clone();
        let (name2, opts2) = (name.clone(), opts.clone());
        let waiter = tokio::spawn(async move { b.acquire_with(&name2, &opts2).await.map(drop) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let release = tokio::spawn(guard.release());
        tokio::time::sleep(Duration::from_micros(round * 250)).await;
        waiter.abort();
        release.await.unwrap().unwrap();
        let _ = waiter.await;
        let started = Instant::now();
        let next = c
            .acquire_with(&name, &waiting(Duration::from_secs(10)))
            .await
            .unwrap_or_else(|e| panic!("round {round}: a cancelled waiter kept the lock: {e}"));
        assert!(started.elapsed() < Duration::from_secs(2), "round {round}");
        next.release().await.unwrap();
    }
}

/// A dropped guard releases promptly, also when dropped on a thread outside any runtime.
pub async fn drop_releases(h: &dyn Harness) {
    let (a, b) = (h.client().await, h.client().await);
    let caps = a.capabilities();
    let ttl = caps.min_ttl.max(Duration::from_secs(30));
    let opts = LockOptions::new().ttl(ttl);
    for outside_runtime in [false, true] {
        let name = fresh_name("drop_releases");
        let guard = a.acquire_with(&name, &opts).await.unwrap();
        if outside_runtime {
            std::thread::spawn(move || drop(guard)).join().unwrap();
        } else {
            drop(guard);
        }
        let started = Instant::now();
        let next = b
            .acquire_with(&name, &opts.clone().wait_timeout(ttl / 2))
            .await
            .expect("the dropped guard kept the lock");
        let took = started.elapsed();
        assert!(
            took < ttl / 4,
            "release on drop took {took:?} of a {ttl:?} TTL"
        );
        next.release().await.unwrap();
    }
}

/// A holder with renewal off that never releases (a crashed holder) loses the lock after the
/// TTL: its guard says so, and another client acquires with a larger token.
pub async fn lease_expiry(h: &dyn Harness) {
    let (a, caps) = caps_of(h).await;
    require(&caps, "lease_expiry");
    let b = h.client().await;
    let name = fresh_name("lease_expiry");
    let ttl = short_ttl(&caps);
    let opts = LockOptions::new().ttl(ttl).auto_renew(false);
    let stale = a.acquire_with(&name, &opts).await.unwrap();
    assert!(stale.is_held());
    let reason = tokio::time::timeout(expiry_bound(&caps, ttl), stale.lost())
        .await
        .expect("lost() did not resolve after the TTL");
    assert_ne!(reason, LostReason::Released);
    assert!(!stale.is_held());
    let next = b
        .acquire_with(&name, &waiting(expiry_bound(&caps, ttl)))
        .await
        .expect("the expired lease was never freed");
    assert!(next.fencing_token() > stale.fencing_token());
    next.release().await.unwrap();
    drop(stale);
}

/// With renewal on, a holder keeps the lock for three TTLs while a contender never gets it.
pub async fn renewal_keeps_lock(h: &dyn Harness) {
    let (a, caps) = caps_of(h).await;
    require(&caps, "renewal");
    let b = h.client().await;
    let name = fresh_name("renewal");
    let ttl = short_ttl(&caps);
    let opts = LockOptions::new().ttl(ttl);
    let guard = a.acquire_with(&name, &opts).await.unwrap();
    let until = Instant::now() + ttl * 3 + caps.expiry_slack;
    while Instant::now() < until {
        let stolen = b.try_acquire_with(&name, &opts).await.unwrap();
        assert!(stolen.is_none(), "a contender took a renewed lock");
        tokio::time::sleep(ttl / 5).await;
    }
    assert!(guard.is_held());
    assert!(guard.lost_reason().is_none());
    guard.release().await.expect("release after renewals");
}

/// 100 acquisitions alternating between two clients get strictly increasing tokens, also
/// across releases that delete the lock's record.
pub async fn fencing_tokens_increase(h: &dyn Harness) {
    let (a, caps) = caps_of(h).await;
    require(&caps, "fencing");
    let b = h.client().await;
    let name = fresh_name("fencing");
    let opts = waiting(Duration::from_secs(10));
    let mut last = 0;
    for round in 0..100 {
        let client = if round % 2 == 0 { &a } else { &b };
        let guard = client.acquire_with(&name, &opts).await.unwrap();
        let token = guard.fencing_token().get();
        assert!(token > last, "round {round}: token {token} after {last}");
        last = token;
        guard.release().await.unwrap();
    }
}

/// A guard whose lease expired, with the lock now held by another, can neither extend nor
/// release the new holder's lock; both calls report `LockLost`.
pub async fn stale_owner_cannot_release_or_extend(h: &dyn Harness) {
    let (a, caps) = caps_of(h).await;
    require(&caps, "lease_expiry");
    let (b, c) = (h.client().await, h.client().await);
    let name = fresh_name("stale_owner");
    let ttl = short_ttl(&caps);
    let stale = a
        .acquire_with(&name, &LockOptions::new().ttl(ttl).auto_renew(false))
        .await
        .unwrap();
    let holder = b
        .acquire_with(&name, &waiting(expiry_bound(&caps, ttl)).ttl(ttl * 4))
        .await
        .expect("the expired lease was never freed");
    let err = stale.extend(ttl).await.expect_err("a stale owner extended");
    assert!(err.is_lost(), "{err:?}");
    assert!(!stale.is_held());
    let err = stale.release().await.expect_err("a stale owner released");
    assert!(err.is_lost(), "{err:?}");
    assert!(c
        .try_acquire_with(&name, &LockOptions::new())
        .await
        .unwrap()
        .is_none());
    assert!(holder.is_held());
    holder
        .extend(ttl * 4)
        .await
        .expect("the new holder's lease");
    holder.release().await.expect("the new holder's release");

    // The stale owner's extend must not have prolonged a new holder's lease either: a holder
    // that does not renew loses the lock at its own TTL, whatever the stale owner asked for.
    let stale = a
        .acquire_with(&name, &LockOptions::new().ttl(ttl).auto_renew(false))
        .await
        .unwrap();
    let _ = tokio::time::timeout(expiry_bound(&caps, ttl), stale.lost()).await;
    let holder = b
        .acquire_with(
            &name,
            &waiting(expiry_bound(&caps, ttl)).ttl(ttl).auto_renew(false),
        )
        .await
        .expect("the expired lease was never freed");
    let long = (ttl * 20).min(caps.max_ttl);
    assert!(stale
        .extend(long)
        .await
        .expect_err("stale extend")
        .is_lost());
    let next = c
        .acquire_with(&name, &waiting(expiry_bound(&caps, ttl)))
        .await
        .expect("a stale owner's extend prolonged the new holder's lease");
    assert!(next.fencing_token() > holder.fencing_token());
    next.release().await.unwrap();
    drop((stale, holder));
}

/// One client holds 200 names at once; all are free again once the guards drop.
pub async fn many_names(h: &dyn Harness) {
    let (a, b) = (h.client().await, h.client().await);
    let base = fresh_name("many_names");
    let names: Vec<String> = (0..200).map(|i| format!("{base}/{i}")).collect();
    let opts = LockOptions::new();
    let mut guards = Vec::new();
    for name in &names {
        let guard = a.try_acquire_with(name, &opts).await.unwrap();
        guards.push(guard.unwrap_or_else(|| panic!("{name} is not free")));
    }
    for name in names.iter().step_by(40) {
        assert!(b.try_acquire_with(name, &opts).await.unwrap().is_none());
    }
    drop(guards);
    let wait = waiting(Duration::from_secs(10));
    for name in &names {
        let guard = b
            .acquire_with(name, &wait)
            .await
            .expect("not freed on drop");
        guard.release().await.unwrap();
    }
}

/// Names that differ in case, separators, escapes, trailing space, unicode or only in their
/// 255th byte are different locks.
pub async fn name_independence(h: &dyn Harness) {
    let (a, b) = (h.client().await, h.client().await);
    let base = fresh_name("names");
    let long = |last: char| {
        let mut s = format!("{base}/");
        while s.len() + 3 < 255 {
            s.push('€');
        }
        while s.len() + 1 < 255 {
            s.push('x');
        }
        s.push(last);
        assert_eq!(s.len(), 255);
        s
    };
    let names = [
        format!("{base}/a"),
        format!("{base}/A"),
        format!("{base}/a/b"),
        format!("{base}/a:b"),
        format!("{base}/a%2Fb"),
        format!("{base}/a "),
        format!("{base}/a."),
        format!("{base}/ロック🔒"),
        long('1'),
        long('2'),
    ];
    let opts = LockOptions::new();
    let mut all = Vec::new();
    for name in &names {
        let guard = a.try_acquire_with(name, &opts).await.unwrap();
        all.push(guard.unwrap_or_else(|| panic!("{name:?} collided with another name")));
    }
    for guard in all {
        guard.release().await.unwrap();
    }
    for (i, held) in names.iter().enumerate() {
        let guard = a
            .try_acquire_with(held, &opts)
            .await
            .unwrap()
            .expect("free");
        for (j, other) in names.iter().enumerate() {
            let got = b.try_acquire_with(other, &opts).await.unwrap();
            match got {
                Some(g) if i != j => g.release().await.unwrap(),
                None if i == j => {}
                Some(_) => panic!("{held:?} was taken twice"),
                None => panic!("holding {held:?} blocks {other:?}"),
            }
        }
        guard.release().await.unwrap();
    }
}

/// A held name does not make the names it starts with, or that start with it, look held:
/// `base/ab` held leaves `base/a` and `base/ab/c` free (backends that read keys by prefix
/// get this wrong).
pub async fn prefix_names_are_independent(h: &dyn Harness) {
    let (a, b) = (h.client().await, h.client().await);
    let base = fresh_name("prefix");
    let opts = LockOptions::new();
    let long = a
        .try_acquire_with(&format!("{base}/ab"), &opts)
        .await
        .unwrap()
        .expect("free");
    for other in [format!("{base}/a"), format!("{base}/ab/c"), base.clone()] {
        let got = b.try_acquire_with(&other, &opts).await.unwrap();
        got.unwrap_or_else(|| panic!("`{base}/ab` held makes `{other}` look held"))
            .release()
            .await
            .unwrap();
        let err = b
            .acquire_with(&other, &waiting(Duration::ZERO))
            .await
            .map(drop);
        assert!(err.is_ok(), "`{other}` with a zero wait: {err:?}");
    }
    long.release().await.unwrap();
}

/// Bad names and options give typed errors and hold nothing.
pub async fn bad_input(h: &dyn Harness) {
    let (a, caps) = caps_of(h).await;
    let b = h.client().await;
    let opts = LockOptions::new();
    for bad in [String::new(), "x".repeat(256), "a\0b".to_string()] {
        let err = a
            .acquire_with(&bad, &opts)
            .await
            .expect_err("bad name accepted");
        assert!(matches!(err, Error::InvalidName(_)), "{err:?}");
        let err = a
            .try_acquire_with(&bad, &opts)
            .await
            .expect_err("bad name accepted");
        assert!(matches!(err, Error::InvalidName(_)), "{err:?}");
    }
    let name = fresh_name("bad_input");
    let mut bad_opts = vec![
        LockOptions::new().ttl(Duration::ZERO),
        LockOptions::new().renew_every(caps.min_ttl.max(Duration::from_secs(30)) * 2),
        LockOptions::new().ttl(caps.max_ttl + Duration::from_secs(1)),
    ];
    if caps.min_ttl > Duration::from_millis(1) {
        bad_opts.push(LockOptions::new().ttl(caps.min_ttl / 2));
    }
    for bad in &bad_opts {
        let err = a
            .acquire_with(&name, bad)
            .await
            .expect_err("bad options accepted");
        assert!(matches!(err, Error::InvalidOptions(_)), "{bad:?}: {err:?}");
        let err = a
            .try_acquire_with(&name, bad)
            .await
            .expect_err("bad options accepted");
        assert!(matches!(err, Error::InvalidOptions(_)), "{bad:?}: {err:?}");
    }
    let guard = b.try_acquire_with(&name, &opts).await.unwrap();
    guard
        .expect("a rejected call held the lock")
        .release()
        .await
        .unwrap();
}

/// An unreachable server gives a connection error within 5 s, not a hang.
pub async fn unreachable_server(h: &dyn Harness) {
    let started = Instant::now();
    let attempt = async {
        let client = h.unreachable().await?;
        let opts = waiting(Duration::from_secs(3));
        client
            .acquire_with(&fresh_name("unreachable"), &opts)
            .await
            .map(drop)
    };
    let result = tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .expect("an unreachable server made the client hang");
    let err = result.expect_err("acquired a lock on an unreachable server");
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// `extend` pushes the lease out: without renewal, a holder that extended to three TTLs still
/// holds the lock past the original TTL.
pub async fn extend_prolongs_lease(h: &dyn Harness) {
    let (a, caps) = caps_of(h).await;
    require(&caps, "renewal");
    let b = h.client().await;
    let name = fresh_name("extend");
    let ttl = short_ttl(&caps);
    let opts = LockOptions::new().ttl(ttl).auto_renew(false);
    let guard = a.acquire_with(&name, &opts).await.unwrap();
    let before = guard.valid_until();
    guard.extend(ttl * 3).await.expect("extend");
    assert!(guard.valid_until() > before);
    tokio::time::sleep(ttl + caps.expiry_slack + ttl / 2).await;
    assert!(guard.is_held(), "the extended lease ran out at the old TTL");
    assert!(b.try_acquire_with(&name, &opts).await.unwrap().is_none());
    guard.release().await.expect("release after extend");
}

/// `with_lock` runs the closure under the lock, returns its output and releases.
pub async fn with_lock_runs_and_releases(h: &dyn Harness) {
    let (a, b) = (h.client().await, h.client().await);
    let name = fresh_name("with_lock");
    let opts = LockOptions::new();
    let b2 = b.clone();
    let out = a
        .with_lock_with(&name, &opts, async |guard| {
            assert!(guard.is_held());
            let other = b2.try_acquire_with(guard.name(), &LockOptions::new()).await;
            (guard.fencing_token().get(), other.unwrap().is_none())
        })
        .await
        .expect("with_lock");
    assert!(out.0 > 0);
    assert!(out.1, "the lock was not held inside with_lock");
    let after = b.try_acquire_with(&name, &opts).await.unwrap();
    after
        .expect("with_lock did not release")
        .release()
        .await
        .unwrap();
}

/// With the lock held, five clients start waiting one after another; after the release they
/// are granted the lock in the order they started waiting.
pub async fn fifo_order(h: &dyn Harness) {
    let (a, caps) = caps_of(h).await;
    require(&caps, "fifo");
    let name = fresh_name("fifo_order");
    let holder = a.acquire_with(&name, &LockOptions::new()).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = JoinSet::new();
    for i in 0..5 {
        let client = h.client().await;
        let (name, order) = (name.clone(), order.clone());
        waiters.spawn(async move {
            let guard = client
                .acquire_with(&name, &waiting(Duration::from_secs(60)))
                .await
                .expect("a waiter never got the lock");
            order.lock().unwrap().push(i);
            tokio::time::sleep(Duration::from_millis(20)).await;
            guard.release().await.expect("release");
        });
        // Give the waiter time to queue before the next one starts.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    holder.release().await.unwrap();
    while let Some(done) = waiters.join_next().await {
        done.expect("a waiter failed");
    }
    assert_eq!(
        *order.lock().unwrap(),
        [0, 1, 2, 3, 4],
        "not granted in arrival order"
    );
}

/// Tracks how many holders overlap, and fails the case if ever more than allowed.
#[derive(Default)]
struct Overlap {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl Overlap {
    fn enter(&self, allowed: usize) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        assert!(
            now <= allowed,
            "{now} holders at once, at most {allowed} allowed"
        );
    }

    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Three clients, four candidates each, campaign 5 times over: never two leaders at once,
/// each term's `leader()` is the campaign's own token and value.
pub async fn election_one_leader_at_a_time(h: &dyn Harness) {
    let (_, caps) = caps_of(h).await;
    require(&caps, "election");
    let clients = [h.client().await, h.client().await, h.client().await];
    let name = fresh_name("election_one_leader");
    let overlap = Arc::new(Overlap::default());
    let mut tasks = JoinSet::new();
    for candidate in 0..12 {
        let client = clients[candidate % 3].clone();
        let (name, overlap) = (name.clone(), overlap.clone());
        tasks.spawn(async move {
            for term in 0..5 {
                let value = format!("candidate-{candidate}/term-{term}");
                let leading = client
                    .campaign_with(&name, value.clone(), &waiting(Duration::from_secs(120)))
                    .await
                    .unwrap();
                overlap.enter(1);
                assert!(leading.is_leader());
                assert_eq!(leading.value(), value);
                let seen = client.leader(&name).await.unwrap().expect("no leader seen");
                assert_eq!((seen.token, seen.value), (leading.fencing_token(), value));
                tokio::time::sleep(Duration::from_millis(5)).await;
                overlap.leave();
                leading.resign().await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(overlap.max.load(Ordering::SeqCst), 1);
    assert_eq!(clients[0].leader(&name).await.unwrap(), None);
}

/// Every new term's token is greater than the last one's, also when a leader proclaims a
/// new value in between (a proclamation keeps the term and its token).
pub async fn election_tokens_increase_across_terms(h: &dyn Harness) {
    let (a, caps) = caps_of(h).await;
    require(&caps, "election");
    let b = h.client().await;
    let name = fresh_name("election_tokens");
    let mut last = None;
    for term in 0..6 {
        let client = if term % 2 == 0 { &a } else { &b };
        let leading = client.campaign(&name, format!("t{term}")).await.unwrap();
        let token = leading.fencing_token();
        if let Some(last) = last {
            assert!(token > last, "term {term}: token {token} after {last}");
        }
        leading.proclaim(format!("t{term}-again")).await.unwrap();
        assert_eq!(leading.fencing_token(), token);
        let seen = b.leader(&name).await.unwrap().expect("no leader seen");
        assert_eq!(
            (seen.token, seen.value.as_str()),
            (token, &*format!("t{term}-again"))
        );
        last = Some(token);
        leading.resign().await.unwrap();
    }
}

/// A leader whose lease is not renewed learns it lost within its bound, cannot proclaim any
/// more, and a waiting candidate takes over with a higher token.
pub async fn election_leader_that_stops_renewing_is_replaced(h: &dyn Harness) {
    let (a, caps) = caps_of(h).await;
    require(&caps, "election");
    require(&caps, "lease_expiry");
    let b = h.client().await;
    let name = fresh_name("election_loss");
    // Long enough that the campaign stores its value within the term on a loaded machine.
    let ttl = short_ttl(&caps).max(Duration::from_secs(2));
    let stale = a
        .campaign_with(&name, "old", &LockOptions::new().ttl(ttl).auto_renew(false))
        .await
        .unwrap();
    let next = {
        let (b, name) = (b.clone(), name.clone());
        let bound = expiry_bound(&caps, ttl);
        tokio::spawn(async move { b.campaign_with(&name, "new", &waiting(bound)).await })
    };
    let reason = tokio::time::timeout(expiry_bound(&caps, ttl), stale.lost())
        .await
        .expect("a leader past its lease never learnt it lost");
    assert_ne!(reason, LostReason::Released);
    assert!(!stale.is_leader());
    let next = next.await.unwrap().expect("no candidate took over");
    assert!(next.fencing_token() > stale.fencing_token());
    let err = stale.proclaim("still me").await.unwrap_err();
    assert!(err.is_lost(), "{err}");
    let seen = a.leader(&name).await.unwrap().expect("no leader seen");
    assert_eq!(
        (seen.token, seen.value.as_str()),
        (next.fencing_token(), "new")
    );
    next.resign().await.unwrap();
}

/// An observer sees no leader, each leader and each proclamation, in order, with rising
/// tokens, and no leader again at the end.
pub async fn election_observers_see_every_change_in_order(h: &dyn Harness) {
    use futures_util::StreamExt;
    let (a, caps) = caps_of(h).await;
    require(&caps, "election");
    let (b, watcher) = (h.client().await, h.client().await);
    let name = fresh_name("election_observe");
    let mut observed = watcher.observe(&name);
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(20), observed.next())
            .await
            .expect("the observer saw no change")
            .expect("the stream ended")
            .expect("the observer failed")
    };
    assert_eq!(next().await, None);
    let mut last = crate::FencingToken(0);
    for term in 0..3 {
        let client = if term % 2 == 0 { &a } else { &b };
        let leading = client
            .campaign(&name, format!("leader-{term}"))
            .await
            .unwrap();
        let seen = next().await.expect("a leader, not none");
        assert_eq!(seen.value, format!("leader-{term}"));
        assert_eq!(seen.token, leading.fencing_token());
        assert!(seen.token > last);
        last = seen.token;
        leading
            .proclaim(format!("leader-{term}-moved"))
            .await
            .unwrap();
        let seen = next().await.expect("a leader, not none");
        assert_eq!(
            (seen.token, seen.value),
            (last, format!("leader-{term}-moved"))
        );
        leading.resign().await.unwrap();
        assert_eq!(next().await, None);
    }
    let _ = caps;
}

/// A resigning leader hands over to the waiting candidate at once (well before any lease
/// would have run out).
pub async fn election_resign_hands_over_at_once(h: &dyn Harness) {
    let (a, caps) = caps_of(h).await;
    require(&caps, "election");
    let b = h.client().await;
    let name = fresh_name("election_resign");
    let opts = LockOptions::new().ttl(Duration::from_secs(60).max(caps.min_ttl));
    let first = a.campaign_with(&name, "first", &opts).await.unwrap();
    let waiter = {
        let (b, name, opts) = (b.clone(), name.clone(), opts.clone());
        tokio::spawn(async move {
            let leading = b.campaign_with(&name, "second", &opts).await;
            (leading, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resigned = Instant::now();
    first.resign().await.unwrap();
    let (second, at) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the candidate did not take over")
        .unwrap();
    let second = second.unwrap();
    let took = at.saturating_duration_since(resigned);
    assert!(took < Duration::from_secs(5), "hand-over took {took:?}");
    assert_eq!(
        a.leader(&name).await.unwrap().map(|l| l.value),
        Some("second".to_owned())
    );
    second.resign().await.unwrap();
}

/// Campaigns that time out or are dropped leave nothing: after the leader resigns nobody
/// leads, and a new candidate wins at once.
pub async fn election_cancelled_campaign_leaves_nothing(h: &dyn Harness) {
    let (a, caps) = caps_of(h).await;
    require(&caps, "election");
    let (b, c) = (h.client().await, h.client().await);
    let name = fresh_name("election_cancelled");
    let leading = a.campaign(&name, "leader").await.unwrap();
    let timed_out = b
        .campaign_with(&name, "impatient", &waiting(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert!(timed_out.is_timeout(), "{timed_out}");
    let dropped = tokio::time::timeout(Duration::from_millis(300), b.campaign(&name, "dropped"));
    assert!(dropped.await.is_err(), "a campaign won a held election");
    leading.resign().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(c.leader(&name).await.unwrap(), None);
    let now = c
        .try_campaign(&name, "late", &LockOptions::new())
        .await
        .unwrap()
        .expect("a cancelled campaign kept the election");
    now.resign().await.unwrap();
}

/// Eight tasks on four clients take permits of a limit-3 semaphore 4 times each: never more
/// than 3 holders, and 3 at once is reached (permits are really shared).
pub async fn semaphore_never_more_than_limit(h: &dyn Harness) {
    let (_, caps) = caps_of(h).await;
    require(&caps, "semaphore");
    let clients = [
        h.client().await,
        h.client().await,
        h.client().await,
        h.client().await,
    ];
    let name = fresh_name("semaphore_limit");
    let overlap = Arc::new(Overlap::default());
    let mut tasks = JoinSet::new();
    for task in 0..8 {
        let client = clients[task % 4].clone();
        let (name, overlap) = (name.clone(), overlap.clone());
        tasks.spawn(async move {
            for _ in 0..4 {
                let permit = client
                    .acquire_permit_with(&name, 3, &waiting(Duration::from_secs(120)))
                    .await
                    .unwrap();
                overlap.enter(3);
                assert!(permit.slot() < 3);
                // Long enough for three holders to overlap even on a loaded machine.
                tokio::time::sleep(Duration::from_millis(150)).await;
                overlap.leave();
                permit.release().await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(overlap.max.load(Ordering::SeqCst), 3);
    // A slot a dropped wait won just as it was dropped is given back in the background, at
    // once; nothing may stay held for longer (a leak would last until its lease ends).
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let held = clients[0].list(&format!("{name}/")).await.unwrap();
        if held.is_empty() {
            break;
        }
        assert!(Instant::now() < until, "permits left held: {held:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The permit of a holder that stops renewing comes back after its lease, to a waiter.
pub async fn semaphore_crashed_permits_come_back(h: &dyn Harness) {
    let (a, caps) = caps_of(h).await;
    require(&caps, "semaphore");
    require(&caps, "lease_expiry");
    let b = h.client().await;
    let name = fresh_name("semaphore_crash");
    // Long enough that both permits are still held when the third client first asks.
    let ttl = short_ttl(&caps).max(Duration::from_secs(3));
    let crashed = LockOptions::new().ttl(ttl).auto_renew(false);
    let first = a.acquire_permit_with(&name, 2, &crashed).await.unwrap();
    let second = a.acquire_permit_with(&name, 2, &crashed).await.unwrap();
    assert_ne!(first.slot(), second.slot());
    assert!(b.try_acquire_permit(&name, 2).await.unwrap().is_none());
    let back = b
        .acquire_permit_with(&name, 2, &waiting(expiry_bound(&caps, ttl)))
        .await
        .expect("a crashed holder's permit never came back");
    assert!(!first.is_held() || !second.is_held());
    back.release().await.unwrap();
    drop((first, second));
}

/// A slot granted again has a higher token, on the same fence key.
pub async fn semaphore_tokens_increase(h: &dyn Harness) {
    let (a, caps) = caps_of(h).await;
    require(&caps, "semaphore");
    require(&caps, "fencing");
    let b = h.client().await;
    let name = fresh_name("semaphore_tokens");
    let mut last: std::collections::HashMap<String, crate::FencingToken> = Default::default();
    for round in 0..8 {
        let client = if round % 2 == 0 { &a } else { &b };
        let permit = client.acquire_permit(&name, 2).await.unwrap();
        let other = client.acquire_permit(&name, 2).await.unwrap();
        for p in [&permit, &other] {
            assert!(p.fence_key().starts_with(&name));
            if let Some(&before) = last.get(p.fence_key()) {
                assert!(p.fencing_token() > before, "slot {} went back", p.slot());
            }
            last.insert(p.fence_key().to_owned(), p.fencing_token());
        }
        permit.release().await.unwrap();
        other.release().await.unwrap();
    }
    assert_eq!(last.len(), 2);
}

/// Waits that time out or are dropped take nothing: once a permit is given back, another
/// client gets it at once.
pub async fn semaphore_cancelled_wait_leaves_nothing(h: &dyn Harness) {
    let (a, caps) = caps_of(h).await;
    require(&caps, "semaphore");
    let (b, c) = (h.client().await, h.client().await);
    let name = fresh_name("semaphore_cancelled");
    let one = a.acquire_permit(&name, 2).await.unwrap();
    let two = a.acquire_permit(&name, 2).await.unwrap();
    let timed_out = b
        .acquire_permit_with(&name, 2, &waiting(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert!(timed_out.is_timeout(), "{timed_out}");
    let dropped = tokio::time::timeout(Duration::from_millis(300), b.acquire_permit(&name, 2));
    assert!(
        dropped.await.is_err(),
        "a permit beyond the limit was granted"
    );
    one.release().await.unwrap();
    let started = Instant::now();
    let next = c
        .acquire_permit_with(&name, 2, &waiting(Duration::from_secs(10)))
        .await
        .expect("a cancelled wait kept the permit");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(c.try_acquire_permit(&name, 2).await.unwrap().is_none());
    next.release().await.unwrap();
    two.release().await.unwrap();
}

/// A client using another limit than the permits already held gets
/// [`Error::LimitMismatch`] and holds nothing afterwards.
pub async fn semaphore_limit_mismatch_is_an_error(h: &dyn Harness) {
    let (a, caps) = caps_of(h).await;
    require(&caps, "semaphore");
    let b = h.client().await;
    let name = fresh_name("semaphore_mismatch");
    let held = a.acquire_permit(&name, 2).await.unwrap();
    match b.acquire_permit(&name, 3).await {
        Err(Error::LimitMismatch { ours, theirs, .. }) => assert_eq!((ours, theirs), (3, 2)),
        other => panic!("expected a limit mismatch, got {other:?}"),
    }
    match b.try_acquire_permit(&name, 1).await {
        Err(Error::LimitMismatch { ours, theirs, .. }) => assert_eq!((ours, theirs), (1, 2)),
        other => panic!("expected a limit mismatch, got {other:?}"),
    }
    let listed = b.list(&format!("{name}/")).await.unwrap();
    assert_eq!(
        listed.len(),
        1,
        "the refused client kept a permit: {listed:?}"
    );
    for bad in [0, crate::MAX_PERMITS + 1] {
        let err = b.acquire_permit(&name, bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidOptions(_)), "{err}");
    }
    held.release().await.unwrap();
}
