//! ZooKeeper beyond the conformance suite (which checks FIFO hand-off): session loss forced
//! from outside, cancellation cleanup, a connection that goes silent (through a TCP proxy
//! that can black-hole it), the server's session-timeout limits and idle sessions, checked by
//! listing the lock's znodes with a raw client and the server's `cons` command.
#![cfg(feature = "zk")]

use std::collections::HashSet;
use std::time::Duration;

use lockkit::zk::zookeeper_client as zk;
use lockkit::zk::ZkOptions;
use lockkit::{Error, LockName, LockOptions, Locks, LostReason, ZkLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use lockkit_testkit::{fresh_name, hosts, service_url, Proxy};

fn url() -> String {
    service_url("LOCKKIT_ZK_URL")
}

/// The server's `host:port` (without a chroot).
fn server() -> String {
    hosts(&url()).remove(0)
}

fn fresh(case: &str) -> String {
    fresh_name(&format!("lockkit-zk-faults/{case}"))
}

async fn client() -> Locks {
    Locks::new(ZkLock::connect(&url()).await.expect("connect to ZooKeeper"))
}

/// A raw session, as an operator's tool would open one.
async fn raw() -> zk::Client {
    zk::Client::connect(&hosts(&url()).join(","))
        .await
        .expect("raw ZooKeeper client")
}

/// The contender nodes queued for `name`.
async fn contenders(raw: &zk::Client, lock: &Locks, name: &str) -> Vec<String> {
    let parent = lock
        .backend_as::<ZkLock>()
        .unwrap()
        .lock_path(&LockName::new(name).unwrap());
    match raw.list_children(&parent).await {
        Ok(children) => children,
        Err(zk::Error::NoNode) => Vec::new(),
        Err(e) => panic!("list {parent}: {e}"),
    }
}

/// Polls until `name` has `count` contender nodes, for at most `limit`.
async fn wait_for_contenders(raw: &zk::Client, lock: &Locks, name: &str, count: usize) {
    let limit = Instant::now() + Duration::from_secs(5);
    loop {
        let now = contenders(raw, lock, name).await;
        if now.len() == count {
            return;
        }
        assert!(
            Instant::now() < limit,
            "expected {count} contenders, found {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An operator (or another process holding the session's id and password) closes a holder's
/// session: the holder learns it lost the lock as soon as it can talk to the server again.
///
/// The holder talks through a [`Proxy`] that is cut while the session is closed: otherwise
/// its client, moved off the session by the twin's reattach, reattaches at once and the two
/// clients fight over the session (reattaches time out and the close may never happen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_closed_from_outside_fires_lost() {
    let proxy = Proxy::start(&server()).await;
    let backend = ZkLock::connect(&format!("zk://{}", proxy.addr()))
        .await
        .unwrap();
    let a = Locks::new(backend.clone());
    let (b, raw) = (client().await, raw().await);
    let name = fresh_name("lockkit-zk-faults/session_closed");
    // A long TTL and renewal: only the session's end can take the lock away here.
    let ttl = Duration::from_secs(20);
    let opts = LockOptions::new().ttl(ttl);
    let guard = a.acquire_with(&name, &opts).await.unwrap();
    assert!(b.try_acquire_with(&name, &opts).await.unwrap().is_none());
    let session = backend.session_client(ttl).await.unwrap().session().clone();

    // Open the guard's session a second time, by id and password, and close it.
    proxy.cut();
    let twin = zk::Client::connector()
        .with_session(session)
        .connect(&hosts(&url()).join(","))
        .await
        .expect("reopen the session");
    drop(twin);
    // The node went with the session: the lock is free for another client at once.
    wait_for_contenders(&raw, &b, &name, 0).await;
    let next = b
        .acquire_with(&name, &opts.clone().wait_timeout(Duration::from_secs(5)))
        .await
        .expect("the closed session's node stayed");
    assert!(next.fencing_token() > guard.fencing_token());

    // The holder hears of it once its connection is back.
    proxy.restore();
    let restored = Instant::now();
    let reason = tokio::time::timeout(Duration::from_secs(10), guard.lost())
        .await
        .expect("lost() did not fire after the session was closed");
    assert!(matches!(reason, LostReason::SessionLost(_)), "{reason:?}");
    assert!(!guard.is_held());
    eprintln!("lost() fired {:?} after the restore", restored.elapsed());
    let err = guard.release().await.expect_err("released after loss");
    assert!(err.is_lost(), "{err:?}");
    next.release().await.unwrap();

    // The client opens a new session for later acquisitions.
    let again = a
        .acquire_with(&name, &opts.clone().wait_timeout(Duration::from_secs(5)))
        .await
        .expect("acquire on a fresh session");
    again.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_wait_leaves_no_node() {
    let raw = raw().await;
    let (a, b) = (client().await, client().await);
    let name = fresh_name("lockkit-zk-faults/cancelled");
    let guard = a.acquire_with(&name, &LockOptions::new()).await.unwrap();

    // Cancelled while queued.
    let waiter = {
        let (b, name) = (b.clone(), name.clone());
        tokio::spawn(async move { b.acquire_with(&name, &LockOptions::new()).await.map(drop) })
    };
    wait_for_contenders(&raw, &a, &name, 2).await;
    waiter.abort();
    let _ = waiter.await;
    wait_for_contenders(&raw, &a, &name, 1).await;

    // Cancelled at every point of the request: before, during and after the create.
    for round in 0..30u64 {
        let (b, name) = (b.clone(), name.clone());
        let wait =
            tokio::spawn(async move { b.acquire_with(&name, &LockOptions::new()).await.map(drop) });
        tokio::time::sleep(Duration::from_micros(round * 200)).await;
        wait.abort();
        let _ = wait.await;
    }
    // Let detached requests and background deletes finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_for_contenders(&raw, &a, &name, 1).await;
    let left = contenders(&raw, &a, &name).await;
    assert_eq!(left.len(), 1, "orphans: {left:?}");
    guard.release().await.unwrap();
    wait_for_contenders(&raw, &a, &name, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_longer_than_the_ttl_still_gets_a_full_lease() {
    let (a, b) = (client().await, client().await);
    let name = fresh_name("lockkit-zk-faults/long_wait");
    let guard = a.acquire_with(&name, &LockOptions::new()).await.unwrap();
    let ttl = Duration::from_secs(1);
    let opts = LockOptions::new()
        .ttl(ttl)
        .auto_renew(false)
        .wait_timeout(Duration::from_secs(10));
    let releaser = tokio::spawn(async move {
        tokio::time::sleep(ttl * 2).await;
        guard.release().await.unwrap();
    });
    let next = b
        .acquire_with(&name, &opts)
        .await
        .expect("acquire after the wait");
    let left = next.valid_until().saturating_duration_since(Instant::now());
    assert!(next.is_held(), "{:?}", next.lost_reason());
    assert!(
        left > ttl / 2,
        "the lease was measured from the start of the wait: {left:?}"
    );
    releaser.await.unwrap();
    next.release().await.unwrap();
}

/// Polls `client`'s session state until it is connected, for at most `limit`.
async fn wait_connected(client: &zk::Client, limit: Duration) {
    let deadline = Instant::now() + limit;
    while client.state() != zk::SessionState::SyncConnected {
        assert!(
            Instant::now() < deadline,
            "the session did not reconnect: {}",
            client.state()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A release that cannot reach the server during a silent disconnect must not leave the node
/// behind once the shared session reconnects: the session lives on (it heartbeats for the
/// other guards), so the node would wedge the lock for every client until the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_lost_in_a_silent_disconnect_is_done_after_reconnect() {
    let proxy = Proxy::start(&server()).await;
    let options = ZkOptions::new().request_timeout(Duration::from_secs(1));
    let backend = ZkLock::connect_with(&format!("zk://{}", proxy.addr()), options)
        .await
        .unwrap();
    let cut_off = Locks::new(backend.clone());
    let direct = client().await;
    let name = fresh("silent_release");
    let ttl = Duration::from_secs(10);
    let opts = LockOptions::new().ttl(ttl).auto_renew(false);
    let guard = cut_off.acquire_with(&name, &opts).await.unwrap();
    let acquired = Instant::now();
    let session = backend.session_client(ttl).await.unwrap();

    // Half a TTL later the connection goes silent, and the release cannot get through: it
    // is retried while the lease is valid, then given up.
    tokio::time::sleep_until(acquired + ttl / 2).await;
    proxy.cut();
    let released = guard.release().await;
    eprintln!(
        "release during the cut: {released:?}, {:?} after the acquisition",
        acquired.elapsed()
    );
    assert!(released.is_err(), "the release got through the cut");

    // The network comes back before the server expires the session (one session timeout
    // after the last ping, at least 3.5 s after the cut): the session lives on.
    tokio::time::sleep_until((acquired + ttl + Duration::from_millis(500)).max(Instant::now()))
        .await;
    proxy.restore();
    let restored = Instant::now();
    wait_connected(&session, Duration::from_secs(3)).await;

    let next = direct
        .acquire_with(
            &name,
            &LockOptions::new().wait_timeout(ttl + Duration::from_secs(3)),
        )
        .await
        .expect("the node of the abandoned release wedged the lock");
    eprintln!(
        "the lock was free {:?} after the restore",
        restored.elapsed()
    );
    next.release().await.unwrap();
}

/// The session ids the server has connections for (its `cons` four-letter word).
async fn server_sessions() -> HashSet<String> {
    let mut conn = TcpStream::connect(server()).await.unwrap();
    conn.write_all(b"cons").await.unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).await.unwrap();
    text.split("sid=")
        .skip(1)
        .map(|rest| {
            rest.split([',', ')'])
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// A session per distinct TTL is opened on demand; once idle (no guard, no waiter) for the
/// idle timeout it is closed, so a client that uses many TTLs does not pile up connections
/// (the server limits them per client address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_closed() {
    let idle = Duration::from_secs(1);
    let backend = ZkLock::connect_with(&url(), ZkOptions::new().session_idle_timeout(idle))
        .await
        .unwrap();
    let locks = Locks::new(backend.clone());
    let name = fresh("idle_sessions");
    let mut ours = HashSet::new();
    for secs in 2..12 {
        let ttl = Duration::from_secs(secs);
        let guard = locks
            .acquire_with(&name, &LockOptions::new().ttl(ttl))
            .await
            .unwrap();
        let id = backend.session_client(ttl).await.unwrap().session_id();
        ours.insert(format!("{id}"));
        guard.release().await.unwrap();
    }
    assert_eq!(ours.len(), 10, "one session per TTL");
    let live = server_sessions().await;
    assert!(
        ours.iter().filter(|id| live.contains(*id)).count() >= 5,
        "the server's `cons` does not list our sessions {ours:?}: {live:?}"
    );

    tokio::time::sleep(idle * 3).await;
    let live = server_sessions().await;
    let left: Vec<_> = ours.iter().filter(|id| live.contains(*id)).collect();
    assert!(left.is_empty(), "idle sessions still open: {left:?}");

    // Sessions are opened again when needed.
    let guard = locks
        .acquire_with(&name, &LockOptions::new().ttl(Duration::from_secs(2)))
        .await
        .unwrap();
    guard.release().await.unwrap();
}

/// The server clamps session timeouts to its `maxSessionTimeout` (60 s in scripts/services);
/// a lease cannot be known valid longer than the session that carries it, whatever TTL was
/// asked, also after an `extend` to a longer TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validity_is_capped_by_the_negotiated_session_timeout() {
    let backend = ZkLock::connect(&url()).await.unwrap();
    let locks = Locks::new(backend.clone());
    let name = fresh("negotiated");
    let ttl = Duration::from_secs(120);
    let negotiated = backend.session_client(ttl).await.unwrap().session_timeout();
    assert!(
        negotiated < ttl,
        "the test needs a server whose maxSessionTimeout is below {ttl:?}: {negotiated:?}"
    );
    let capped = |guard: &lockkit::LockGuard, when: &str| {
        let bound = Instant::now() + negotiated;
        assert!(
            guard.valid_until() <= bound,
            "{when}: valid_until is {:?} past now + the negotiated session timeout {negotiated:?}",
            guard.valid_until() - bound
        );
        assert!(guard.is_held(), "{when}");
    };
    for auto_renew in [true, false] {
        let opts = LockOptions::new().ttl(ttl).auto_renew(auto_renew);
        let guard = locks.acquire_with(&name, &opts).await.unwrap();
        capped(&guard, &format!("acquired, auto_renew {auto_renew}"));
        guard.extend(ttl + ttl / 2).await.unwrap();
        capped(&guard, &format!("extended, auto_renew {auto_renew}"));
        guard.release().await.unwrap();
    }

    // Renewals further apart than the session timeout could never keep the lease.
    let opts = LockOptions::new().ttl(negotiated * 4);
    let err = locks.acquire_with(&name, &opts).await.unwrap_err();
    assert!(matches!(err, Error::InvalidOptions(_)), "{err:?}");
    let err = locks.try_acquire_with(&name, &opts).await.unwrap_err();
    assert!(matches!(err, Error::InvalidOptions(_)), "{err:?}");
}

/// Huge timeouts mean "no practical limit", not a panic: the longest accepted TTL and
/// `Duration::MAX` timeouts work against a live server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_durations_do_not_panic() {
    let options = ZkOptions::new()
        .connect_timeout(Duration::MAX)
        .request_timeout(Duration::MAX)
        .session_idle_timeout(Duration::MAX)
        .max_ttl(ZkOptions::MAX_TTL);
    let locks = Locks::new(ZkLock::connect_with(&url(), options).await.unwrap());
    let name = fresh("largest");
    let opts = LockOptions::new().ttl(ZkOptions::MAX_TTL).auto_renew(false);
    let guard = locks.acquire_with(&name, &opts).await.unwrap();
    assert!(guard.is_held());
    guard.extend(ZkOptions::MAX_TTL).await.unwrap();
    guard.release().await.unwrap();
}
