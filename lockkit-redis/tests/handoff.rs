//! The direct hand-off on a single Redis server: a release makes the first live queued
//! waiter the owner in the same script. What must hold whatever happens to the waiter: one
//! that stopped waiting while being handed the lock gives it back to the next waiter (it is
//! not held until its TTL), and one that missed the hand-off message finds the lock already
//! its own on its fallback re-check (it does not wait out its own lease). Through the
//! backend SPI (no lease keeper), on the server of `scripts/services`, with fresh names.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use lockkit_core::backend::{Acquired, Backend, LockName, LockOptions};
use lockkit_redis::redis::aio::ConnectionManager;
use lockkit_redis::{redis, RedisLock, RedisOptions};
use lockkit_testkit::{fresh_name, service_url};
use tokio::time::Instant;

/// Long enough that a lock left held until its TTL fails the test's 5 s bounds.
const TTL: Duration = Duration::from_secs(30);

async fn client(max_poll: Duration) -> RedisLock {
    let url = service_url("LOCKKIT_REDIS_URL");
    RedisLock::connect_with(&url, RedisOptions::new().max_poll(max_poll))
        .await
        .unwrap()
}

async fn raw() -> ConnectionManager {
    let url = service_url("LOCKKIT_REDIS_URL");
    let client = redis::Client::open(url).unwrap();
    ConnectionManager::new(client).await.unwrap()
}

fn name(test: &str) -> LockName {
    LockName::new(&fresh_name(&format!("lockkit-redis-handoff/{test}"))).unwrap()
}

type Wait<'a> = Pin<Box<dyn Future<Output = lockkit_core::Result<Acquired>> + Send + 'a>>;

/// The owner ids in `name`'s queue, first first.
async fn queued(conn: &mut ConnectionManager, lock: &RedisLock, name: &LockName) -> Vec<String> {
    let queue = format!("{}:queue", lock.lock_key(name));
    redis::cmd("ZRANGE")
        .arg(&queue)
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await
        .unwrap()
}

/// Polls `wait` (without letting it finish) until `name`'s queue holds `count` waiters.
async fn until_queued(
    conn: &mut ConnectionManager,
    lock: &RedisLock,
    name: &LockName,
    wait: &mut Wait<'_>,
    count: usize,
) -> Vec<String> {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(done) = tokio::time::timeout(Duration::from_millis(20), &mut *wait).await {
            panic!("the waiter returned while the lock was held: {done:?}");
        }
        let queue = queued(conn, lock, name).await;
        if queue.len() == count {
            return queue;
        }
        assert!(Instant::now() < until, "never queued: {queue:?}");
    }
}

async fn lock_holder(
    conn: &mut ConnectionManager,
    lock: &RedisLock,
    name: &LockName,
) -> Option<String> {
    redis::cmd("GET")
        .arg(lock.lock_key(name))
        .query_async(conn)
        .await
        .unwrap()
}

/// A waiter that is handed the lock by a release and then stops waiting (its wait dropped
/// before it saw the message: a timeout, a cancel) gives it back and hands it to the next
/// waiter: nothing stays held by a waiter that left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_gave_up_while_handed_the_lock_passes_it_on() {
    let (a, b, c) = (
        client(Duration::from_secs(1)).await,
        client(Duration::from_secs(1)).await,
        client(Duration::from_secs(1)).await,
    );
    let mut conn = raw().await;
    let name = name("gave-up");
    let opts = LockOptions::new().ttl(TTL);
    let held = a.try_lock(&name, &opts).await.unwrap().expect("free");

    let mut b_wait: Wait = Box::pin(b.lock(&name, &opts, None));
    let first = until_queued(&mut conn, &a, &name, &mut b_wait, 1).await;
    let c_wait = tokio::spawn({
        let (c, name, opts) = (c.clone(), name.clone(), opts.clone());
        async move { c.lock(&name, &opts, None).await }
    });
    let queue = loop {
        let queue = queued(&mut conn, &a, &name).await;
        if queue.len() == 2 {
            break queue;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(queue[0], first[0], "FIFO: the first waiter stays first");

    // Released while B is not looking (its wait is not polled), then B gives up.
    held.lease.release().await.unwrap();
    let after_release = lock_holder(&mut conn, &a, &name).await;
    assert_eq!(
        after_release.as_ref(),
        Some(&first[0]),
        "not handed to the first waiter"
    );
    drop(b_wait);

    let started = Instant::now();
    let next = tokio::time::timeout(Duration::from_secs(5), c_wait)
        .await
        .unwrap_or_else(|_| {
            panic!("the next waiter did not get the lock within 5 s (held by {after_release:?} after the release)")
        })
        .unwrap()
        .unwrap();
    println!("handed on after {:?}", started.elapsed());
    assert!(
        next.token > held.token,
        "{:?} after {:?}",
        next.token,
        held.token
    );
    assert_eq!(
        lock_holder(&mut conn, &a, &name).await,
        Some(queue[1].clone())
    );
    next.lease.release().await.unwrap();
    assert_eq!(lock_holder(&mut conn, &a, &name).await, None);
    assert!(queued(&mut conn, &a, &name).await.is_empty());
}

/// A waiter made the owner by a hand-off whose message it never got (a lost message, a
/// resubscription) notices on its fallback re-check that the lock is already its own, and
/// returns it with the token issued for it, instead of waiting out its own lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_missed_its_hand_off_message_finds_the_lock_on_its_re_check() {
    let a = client(Duration::from_secs(1)).await;
    let b = client(Duration::from_millis(200)).await;
    let mut conn = raw().await;
    let name = name("missed");
    let opts = LockOptions::new().ttl(TTL);
    let held = a.try_lock(&name, &opts).await.unwrap().expect("free");

    let mut b_wait: Wait = Box::pin(b.lock(&name, &opts, None));
    let queue = until_queued(&mut conn, &a, &name, &mut b_wait, 1).await;
    // What a release's hand-off does, without its message.
    let key = a.lock_key(&name);
    let token: u64 = redis::Script::new(
        r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
return redis.call('INCR', KEYS[2])
",
    )
    .key(&key)
    .key(format!("{key}:fence"))
    .key(format!("{key}:queue"))
    .key(format!("{key}:alive"))
    .key(format!("{key}:asked"))
    .arg(&queue[0])
    .arg(TTL.as_millis() as u64)
    .invoke_async(&mut conn)
    .await
    .unwrap();
    assert!(token > held.token.get());

    let started = Instant::now();
    let acquired = tokio::time::timeout(Duration::from_secs(5), b_wait)
        .await
        .expect("the waiter did not notice within 5 s that the lock is its own")
        .unwrap();
    println!("noticed after {:?}", started.elapsed());
    assert_eq!(acquired.token.get(), token);
    assert!(acquired.valid_until > Instant::now());
    acquired.lease.release().await.unwrap();
    assert_eq!(lock_holder(&mut conn, &a, &name).await, None);
    // The lock is no longer the first holder's: it can neither extend nor release it.
    assert!(held.lease.extend(TTL).await.is_err());
    assert!(held.lease.release().await.is_err());
}

/// A release hands the lock to the waiting client with a higher token, and the waiter's
/// lease counts as valid no longer than the server keeps the lock key: it is measured from
/// before the grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_over_lease_is_valid_no_longer_than_the_server_keeps_it() {
    let a = client(Duration::from_secs(1)).await;
    // A long fallback re-check: the waiter returns on the hand-off message.
    let b = client(Duration::from_secs(30)).await;
    let mut conn = raw().await;
    let name = name("validity");
    let opts = LockOptions::new().ttl(TTL);
    let held = a.try_lock(&name, &opts).await.unwrap().expect("free");
    let mut b_wait: Wait = Box::pin(b.lock(&name, &opts, None));
    until_queued(&mut conn, &a, &name, &mut b_wait, 1).await;

    let started = Instant::now();
    held.lease.release().await.unwrap();
    let acquired = tokio::time::timeout(Duration::from_secs(5), b_wait)
        .await
        .expect("not handed over within 5 s")
        .unwrap();
    println!("handed over in {:?}", started.elapsed());
    assert!(acquired.token > held.token);
    let now = Instant::now();
    let pttl: u64 = redis::cmd("PTTL")
        .arg(a.lock_key(&name))
        .query_async(&mut conn)
        .await
        .unwrap();
    let valid_for = acquired.valid_until.saturating_duration_since(now);
    assert!(!valid_for.is_zero());
    assert!(
        valid_for <= Duration::from_millis(pttl),
        "valid for {valid_for:?}, the key lives {pttl} ms"
    );
    acquired.lease.release().await.unwrap();
}

/// The conformance suite's `fifo_order` case on a single server (the backend does not claim
/// `fifo`, RedLock waiters do not queue, so the suite does not stamp it for `redis://`):
/// five clients start waiting one after another; the releases hand the lock down the queue
/// in the order they started waiting, each with a higher token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_offs_follow_the_queue() {
    let a = client(Duration::from_secs(1)).await;
    let mut conn = raw().await;
    let name = name("fifo");
    let opts = LockOptions::new().ttl(TTL);
    let held = a.try_lock(&name, &opts).await.unwrap().expect("free");
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut waiters = tokio::task::JoinSet::new();
    for i in 0..5 {
        let client = client(Duration::from_secs(1)).await;
        let (mine, opts, order) = (name.clone(), opts.clone(), order.clone());
        waiters.spawn(async move {
            let acquired = client.lock(&mine, &opts, None).await.unwrap();
            order.lock().unwrap().push((i, acquired.token));
            tokio::time::sleep(Duration::from_millis(20)).await;
            acquired.lease.release().await.unwrap();
        });
        let until = Instant::now() + Duration::from_secs(5);
        while queued(&mut conn, &a, &name).await.len() <= i {
            assert!(Instant::now() < until, "waiter {i} never queued");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    held.lease.release().await.unwrap();
    let all = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(done) = waiters.join_next().await {
            done.unwrap();
        }
    });
    all.await
        .expect("the waiters did not all get the lock within 10 s");
    let order = order.lock().unwrap().clone();
    let waiters: Vec<_> = order.iter().map(|(i, _)| *i).collect();
    assert_eq!(waiters, [0, 1, 2, 3, 4], "not granted in arrival order");
    let mut last = held.token;
    for (_, token) in order {
        assert!(token > last, "{token:?} after {last:?}");
        last = token;
    }
    assert_eq!(lock_holder(&mut conn, &a, &name).await, None);
}
