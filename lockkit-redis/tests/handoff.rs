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

/// A lock held by client `a` (lease `held`), with client `b` (fallback re-check every
/// `b_poll`) queued for it: `wait` is b's wait, polled only when the test polls it.
struct Scene {
    a: RedisLock,
    conn: ConnectionManager,
    name: LockName,
    opts: LockOptions,
    held: Acquired,
    wait: Wait<'static>,
    /// b's owner id.
    waiter: String,
}

impl Scene {
    async fn new(test: &str, b_poll: Duration) -> Scene {
        let (a, b) = (client(Duration::from_secs(1)).await, client(b_poll).await);
        let (name, opts) = (name(test), LockOptions::new().ttl(TTL));
        let held = a.try_lock(&name, &opts).await.unwrap().expect("free");
        let (mine, my_opts) = (name.clone(), opts.clone());
        let wait = Box::pin(async move { b.lock(&mine, &my_opts, None).await });
        let mut scene = Scene {
            a,
            conn: raw().await,
            name,
            opts,
            held,
            wait,
            waiter: String::new(),
        };
        scene.waiter = scene.until_queued(1, true).await.remove(0);
        scene
    }

    /// The owner ids in the queue, first first.
    async fn queued(&mut self) -> Vec<String> {
        let queue = format!("{}:queue", self.a.lock_key(&self.name));
        let range = redis::cmd("ZRANGE").arg(&queue).arg(0).arg(-1).clone();
        range.query_async(&mut self.conn).await.unwrap()
    }

    /// Waits until the queue holds `count` waiters (polling b's wait meanwhile if `poll`,
    /// which must not return: the lock is held).
    async fn until_queued(&mut self, count: usize, poll: bool) -> Vec<String> {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let queue = self.queued().await;
            if queue.len() == count {
                return queue;
            }
            assert!(Instant::now() < until, "never {count} queued: {queue:?}");
            let pause = Duration::from_millis(10);
            if !poll {
                tokio::time::sleep(pause).await;
            } else if let Ok(done) = tokio::time::timeout(pause, &mut self.wait).await {
                panic!("the waiter returned while the lock was held: {done:?}");
            }
        }
    }

    /// The owner id the lock key holds.
    async fn holder(&mut self) -> Option<String> {
        let get = redis::cmd("GET").arg(self.a.lock_key(&self.name)).clone();
        get.query_async(&mut self.conn).await.unwrap()
    }
}

/// A waiter that is handed the lock by a release and then stops waiting (its wait dropped
/// before it saw the message: a timeout, a cancel) gives it back and hands it to the next
/// waiter: nothing stays held by a waiter that left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_gave_up_while_handed_the_lock_passes_it_on() {
    let mut scene = Scene::new("gave-up", Duration::from_secs(1)).await;
    let c = client(Duration::from_secs(1)).await;
    let c_wait = tokio::spawn({
        let (name, opts) = (scene.name.clone(), scene.opts.clone());
        async move { c.lock(&name, &opts, None).await }
    });
    let queue = scene.until_queued(2, false).await;
    assert_eq!(queue[0], scene.waiter, "FIFO: the first waiter stays first");

    // Released while b is not looking (its wait is not polled), then b gives up.
    scene.held.lease.release().await.unwrap();
    let after_release = scene.holder().await;
    let handed = Some(&scene.waiter);
    assert_eq!(
        after_release.as_ref(),
        handed,
        "not handed to the first waiter"
    );
    // b gives up: its wait is dropped.
    scene.wait = Box::pin(std::future::pending());

    let started = Instant::now();
    let next = tokio::time::timeout(Duration::from_secs(5), c_wait)
        .await
        .expect("the next waiter did not get the lock within 5 s")
        .unwrap()
        .unwrap();
    println!("handed on after {:?}", started.elapsed());
    let first = scene.held.token;
    assert!(next.token > first, "{:?} after {first:?}", next.token);
    assert_eq!(scene.holder().await, Some(queue[1].clone()));
    next.lease.release().await.unwrap();
    assert_eq!(scene.holder().await, None);
    assert!(scene.queued().await.is_empty());
}

/// A waiter made the owner by a hand-off whose message it never got (a lost message, a
/// resubscription) notices on its fallback re-check that the lock is already its own, and
/// returns it with the token issued for it, instead of waiting out its own lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_missed_its_hand_off_message_finds_the_lock_on_its_re_check() {
    let mut scene = Scene::new("missed", Duration::from_millis(200)).await;
    // What a release's hand-off does, without its message.
    let key = scene.a.lock_key(&scene.name);
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
    .arg(&scene.waiter)
    .arg(TTL.as_millis() as u64)
    .invoke_async(&mut scene.conn)
    .await
    .unwrap();
    let held = scene.held;
    assert!(token > held.token.get());

    let started = Instant::now();
    let acquired = tokio::time::timeout(Duration::from_secs(5), scene.wait)
        .await
        .expect("the waiter did not notice within 5 s that the lock is its own")
        .unwrap();
    println!("noticed after {:?}", started.elapsed());
    assert_eq!(acquired.token.get(), token);
    assert!(acquired.valid_until > Instant::now());
    acquired.lease.release().await.unwrap();
    let get = redis::cmd("GET").arg(&key).clone();
    let left: Option<String> = get.query_async(&mut scene.conn).await.unwrap();
    assert_eq!(left, None);
    // The lock is no longer the first holder's: it can neither extend nor release it.
    assert!(held.lease.extend(TTL).await.is_err());
    assert!(held.lease.release().await.is_err());
}

/// A release hands the lock to the waiting client with a higher token, and the waiter's
/// lease counts as valid no longer than the server keeps the lock key: it is measured from
/// before the grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_over_lease_is_valid_no_longer_than_the_server_keeps_it() {
    // A long fallback re-check: the waiter returns on the hand-off message.
    let mut scene = Scene::new("validity", Duration::from_secs(30)).await;
    let started = Instant::now();
    scene.held.lease.release().await.unwrap();
    let acquired = tokio::time::timeout(Duration::from_secs(5), &mut scene.wait)
        .await
        .expect("not handed over within 5 s")
        .unwrap();
    println!("handed over in {:?}", started.elapsed());
    assert!(acquired.token > scene.held.token);
    let now = Instant::now();
    let pttl = redis::cmd("PTTL")
        .arg(scene.a.lock_key(&scene.name))
        .clone();
    let pttl: u64 = pttl.query_async(&mut scene.conn).await.unwrap();
    let valid_for = acquired.valid_until.saturating_duration_since(now);
    assert!(!valid_for.is_zero());
    assert!(
        valid_for <= Duration::from_millis(pttl),
        "valid for {valid_for:?}, the key lives {pttl} ms"
    );
    acquired.lease.release().await.unwrap();
}

/// A hand-off goes to the waiter's own channel: a client listening on the name's channel
/// (a leader observer, or the client of another waiter) hears `taken`, never the grant, so
/// a release wakes one connection however many clients wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_off_message_reaches_only_its_waiter() {
    use futures_util::StreamExt;

    // A long fallback re-check: the waiter returns on the hand-off message.
    let mut scene = Scene::new("own_channel", Duration::from_secs(30)).await;
    let client = redis::Client::open(service_url("LOCKKIT_REDIS_URL")).unwrap();
    let mut listener = client.get_async_pubsub().await.unwrap();
    let channel = format!("{}:released", scene.a.lock_key(&scene.name));
    listener.subscribe(&channel).await.unwrap();
    scene.held.lease.release().await.unwrap();
    let acquired = tokio::time::timeout(Duration::from_secs(5), &mut scene.wait)
        .await
        .expect("not handed over within 5 s")
        .unwrap();
    let mut heard = Vec::new();
    let mut messages = listener.on_message();
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(300), messages.next()).await
    {
        heard.push(message.get_payload::<String>().unwrap());
    }
    assert_eq!(
        heard,
        ["taken"],
        "the name's channel carried more than `taken`"
    );
    drop(messages);
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
        while queue_len(&mut conn, &a, &name).await <= i {
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
    let get = redis::cmd("EXISTS").arg(a.lock_key(&name)).clone();
    let left: u64 = get.query_async(&mut conn).await.unwrap();
    assert_eq!(left, 0, "still held");
}

async fn queue_len(conn: &mut ConnectionManager, lock: &RedisLock, name: &LockName) -> usize {
    let queue = format!("{}:queue", lock.lock_key(name));
    redis::cmd("ZCARD")
        .arg(&queue)
        .query_async(conn)
        .await
        .unwrap()
}
