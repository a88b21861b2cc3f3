//! Redis and RedLock under faults, against the servers of `scripts/services`: instances are
//! stopped and restarted (`scripts/services stop-one|start-one`), so these tests run one at a
//! time, in their own test binary (cargo runs test binaries one after another).
#![cfg(feature = "redis")]

use std::process::Command;
use std::time::Duration;

use lockkit::{Error, LockName, LockOptions, Locks, LostReason, RedisLock};
use tokio::time::Instant;

use lockkit_testkit::{fresh_name, service_url, Stopped};

/// One fault test at a time: they stop shared servers.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn redlock() -> Locks {
    Locks::new(
        RedisLock::connect(&service_url("LOCKKIT_REDLOCK_URL"))
            .await
            .expect("RedLock client"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_with_two_of_five_down_acquires_renews_and_releases() {
    let _serial = SERIAL.lock().await;
    let before = redlock().await; // connected while all instances were up
    let down = Stopped::new(&["redis-16380", "redis-16381"]);
    let after = redlock().await; // connected while two are down
    let name = fresh_name("lockkit-faults/two_down");
    let ttl = Duration::from_secs(1);
    let opts = LockOptions::new()
        .ttl(ttl)
        .wait_timeout(Duration::from_secs(5));
    let guard = before
        .acquire_with(&name, &opts)
        .await
        .expect("acquire with 3 of 5");
    tokio::time::sleep(ttl * 3).await;
    assert!(
        guard.is_held(),
        "renewal with 3 of 5 failed: {:?}",
        guard.lost_reason()
    );
    assert!(after
        .try_acquire_with(&name, &opts)
        .await
        .unwrap()
        .is_none());
    guard.release().await.expect("release with 3 of 5");
    let next = after
        .acquire_with(&name, &opts)
        .await
        .expect("acquire after release");
    next.release().await.unwrap();
    drop(down);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_with_three_of_five_down_fails_fast_and_leaves_no_key() {
    let _serial = SERIAL.lock().await;
    let down = Stopped::new(&["redis-16380", "redis-16381", "redis-16382"]);
    let client = redlock().await;
    let name = fresh_name("lockkit-faults/three_down");
    let started = Instant::now();
    let opts = LockOptions::new().wait_timeout(Duration::from_secs(3));
    let err = client
        .acquire_with(&name, &opts)
        .await
        .expect_err("acquired without quorum");
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let key = client
        .backend_as::<RedisLock>()
        .unwrap()
        .lock_key(&LockName::new(&name).unwrap());
    // The attempt the wait deadline cut off finishes in the background, undoing what it took;
    // a partial acquisition left behind would stay for the whole TTL (30 s).
    let undone_by = Instant::now() + Duration::from_secs(6);
    for port in ["16383", "16384"] {
        loop {
            let out = Command::new("redis-cli")
                .args(["-p", port, "EXISTS", &key])
                .output()
                .expect("redis-cli");
            let exists = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if exists == "0" {
                break;
            }
            assert!(
                Instant::now() < undone_by,
                "a partial acquisition stayed on {port}: EXISTS {exists}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    drop(down);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_tokens_rise_while_the_answering_instances_change() {
    let _serial = SERIAL.lock().await;
    let (a, b) = (redlock().await, redlock().await);
    let name = fresh_name("lockkit-faults/changing_quorum");
    let opts = LockOptions::new().wait_timeout(Duration::from_secs(10));
    let mut tokens = Vec::new();
    for phase in [
        &[][..],
        &["redis-16380", "redis-16381"][..],
        &["redis-16383", "redis-16384"][..],
        &["redis-16382"][..],
        &["redis-16380", "redis-16384"][..],
    ] {
        let down = (!phase.is_empty()).then(|| Stopped::new(phase));
        for i in 0..4 {
            let client = if i % 2 == 0 { &a } else { &b };
            let guard = client.acquire_with(&name, &opts).await.expect("acquire");
            tokens.push(guard.fencing_token().get());
            guard.release().await.expect("release");
        }
        drop(down);
    }
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens went back: {tokens:?}"
    );
}

/// The duplicate: token t1 with all up; t2 with two down (they miss the write-back);
/// one of the three that have t2 loses its fence counter, the two come back and two others
/// go down. The next quorum (the one that lost the counter and the two that missed t2) must
/// still issue a larger token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_token_rises_after_an_instance_loses_the_fence_counter() {
    let _serial = SERIAL.lock().await;
    let client = redlock().await;
    let name = fresh_name("lockkit-faults/fence_lost");
    let fence = format!(
        "{}:fence",
        client
            .backend_as::<RedisLock>()
            .unwrap()
            .lock_key(&LockName::new(&name).unwrap())
    );
    let opts = LockOptions::new().wait_timeout(Duration::from_secs(10));
    let token = |guard: lockkit::LockGuard| async move {
        let token = guard.fencing_token().get();
        guard.release().await.expect("release");
        token
    };
    let t1 = token(client.acquire_with(&name, &opts).await.expect("all up")).await;
    let down = Stopped::new(&["redis-16383", "redis-16384"]);
    let t2 = token(client.acquire_with(&name, &opts).await.expect("3 of 5")).await;
    // 16382 loses its data, as far as this lock goes.
    let out = Command::new("redis-cli")
        .args(["-p", "16382", "DEL", &fence])
        .output()
        .expect("redis-cli");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "{fence}");
    drop(down);
    let down = Stopped::new(&["redis-16380", "redis-16381"]);
    let t3 = token(
        client
            .acquire_with(&name, &opts)
            .await
            .expect("the other 3"),
    )
    .await;
    drop(down);
    assert!(t1 < t2 && t2 < t3, "tokens {t1}, {t2}, {t3}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_waiter_wakes_on_the_release_message() {
    let _serial = SERIAL.lock().await;
    let url = service_url("LOCKKIT_REDIS_URL");
    let (a, b) = (
        Locks::new(RedisLock::connect(&url).await.unwrap()),
        Locks::new(RedisLock::connect(&url).await.unwrap()),
    );
    let name = fresh_name("lockkit-faults/wake");
    let opts = LockOptions::new().wait_timeout(Duration::from_secs(10));
    for round in 0..5 {
        let guard = a.acquire_with(&name, &opts).await.unwrap();
        let (b, name2, opts2) = (b.clone(), name.clone(), opts.clone());
        let waiter = tokio::spawn(async move {
            let guard = b.acquire_with(&name2, &opts2).await.expect("waiter");
            (Instant::now(), guard)
        });
        // Long enough for a polling waiter to have backed off well past the bound below.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let released = Instant::now();
        guard.release().await.unwrap();
        let (woke, next) = waiter.await.unwrap();
        let latency = woke - released;
        assert!(
            latency < Duration::from_millis(200),
            "round {round}: the waiter took {latency:?} after the release"
        );
        next.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_server_gone_mid_lease_fires_lost_and_errors_are_typed() {
    let _serial = SERIAL.lock().await;
    let client = Locks::new(
        RedisLock::connect(&service_url("LOCKKIT_REDIS_URL"))
            .await
            .unwrap(),
    );
    let name = fresh_name("lockkit-faults/server_gone");
    let ttl = Duration::from_secs(2);
    let guard = client
        .acquire_with(&name, &LockOptions::new().ttl(ttl))
        .await
        .unwrap();
    let down = Stopped::new(&["redis-16379"]);
    let reason = tokio::time::timeout(ttl + Duration::from_secs(3), guard.lost())
        .await
        .expect("lost() did not fire after the server went away");
    assert!(
        matches!(reason, LostReason::Expired | LostReason::RenewalFailed(_)),
        "{reason:?}"
    );
    assert!(!guard.is_held());
    let started = Instant::now();
    let opts = LockOptions::new().wait_timeout(Duration::from_secs(2));
    let err = client
        .acquire_with(&fresh_name("lockkit-faults/server_gone"), &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(down);
    drop(guard);
    // Back up: the same client works again once the server returns.
    let again = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match client
                .acquire_with(&fresh_name("lockkit-faults/server_back"), &opts)
                .await
            {
                Ok(guard) => break guard,
                Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .expect("the client did not reconnect");
    again.release().await.unwrap();
}
