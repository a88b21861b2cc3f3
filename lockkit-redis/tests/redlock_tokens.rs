//! RedLock fencing tokens when the instances issue different tokens, and what one waiting
//! `lock()` call's attempts may count as won. Runs on the RedLock instances of
//! `scripts/services` (and the single instance), touching only fresh names' keys; no server
//! is stopped.

use std::time::Duration;

use lockkit_core::backend::{Backend, LockName, LockOptions};
use lockkit_redis::redis::{self, aio::MultiplexedConnection};
use lockkit_redis::RedisLock;
use lockkit_testkit::{fresh_name, service_url};

/// A plain client per RedLock instance of the test services.
fn clients() -> Vec<redis::Client> {
    let url = service_url("LOCKKIT_REDLOCK_URL");
    let hosts = url
        .split("://")
        .nth(1)
        .expect("a scheme")
        .split(['/', '?'])
        .next()
        .expect("hosts");
    hosts
        .split(',')
        .map(|host| redis::Client::open(format!("redis://{host}/")).expect("a URL"))
        .collect()
}

/// One plain connection per RedLock instance of the test services.
async fn instances() -> Vec<MultiplexedConnection> {
    let mut conns = Vec::new();
    for client in clients() {
        conns.push(client.get_multiplexed_async_connection().await.expect("up"));
    }
    conns
}

/// The server's clock in µs since the Unix epoch.
async fn server_micros(conn: &mut MultiplexedConnection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.expect("TIME");
    secs * 1_000_000 + micros
}

async fn fence_of(conn: &mut MultiplexedConnection, key: &str) -> u64 {
    let value: Option<u64> = redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .expect("GET");
    value.unwrap_or(0)
}

/// Two instances' counters far ahead of the others': their token is the highest, and a
/// quorum of instances must carry a counter at least as high before the guard is handed
/// out, else the next quorum (the other three) could issue a lower token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_only_a_minority_issued_reaches_a_quorum_before_the_guard() {
    let lock = RedisLock::connect(&service_url("LOCKKIT_REDLOCK_URL"))
        .await
        .expect("connect");
    let mut conns = instances().await;
    assert_eq!(conns.len(), 5);
    let name = LockName::new(&fresh_name("lockkit-redis/minority_token")).unwrap();
    let fence = format!("{}:fence", lock.lock_key(&name));
    let ahead = server_micros(&mut conns[0]).await + 60_000_000;
    for conn in &mut conns[..2] {
        let _: () = redis::cmd("SET")
            .arg(&fence)
            .arg(ahead)
            .query_async(conn)
            .await
            .expect("SET");
    }
    let opts = LockOptions::new().ttl(Duration::from_secs(5));
    let acquired = lock.try_lock(&name, &opts).await.expect("try_lock");
    let acquired = acquired.expect("free");
    let token = acquired.token.get();
    assert!(
        token > ahead,
        "token {token} not above the counters at {ahead}"
    );
    let mut fences = Vec::new();
    for conn in &mut conns {
        fences.push(fence_of(conn, &fence).await);
    }
    acquired.lease.release().await.expect("release");
    let carrying = fences.iter().filter(|f| **f >= token).count();
    assert!(
        carrying >= lock.quorum(),
        "token {token}, but only {carrying} counters carry it: {fences:?}"
    );

    // The next holder's token is above it, whichever three instances it would win.
    let again = lock.try_lock(&name, &opts).await.expect("try_lock");
    let again = again.expect("free");
    assert!(
        again.token.get() > token,
        "{} after {token}",
        again.token.get()
    );
    again.lease.release().await.expect("release");
}

/// Tokens of two RedLock clients taking turns rise strictly, whether the instances agreed
/// on the proposed token or one of them was written back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_tokens_of_two_clients_taking_turns_rise() {
    let url = service_url("LOCKKIT_REDLOCK_URL");
    let a = RedisLock::connect(&url).await.expect("connect");
    let b = RedisLock::connect(&url).await.expect("connect");
    let mut conns = instances().await;
    let name = LockName::new(&fresh_name("lockkit-redis/turns")).unwrap();
    let fence = format!("{}:fence", a.lock_key(&name));
    let opts = LockOptions::new().ttl(Duration::from_secs(5));
    let mut tokens = Vec::new();
    for i in 0..40 {
        if i == 20 {
            // One instance's counter jumps ahead: the next token comes from it alone.
            let ahead = server_micros(&mut conns[4]).await + 10_000_000;
            let _: () = redis::cmd("SET")
                .arg(&fence)
                .arg(ahead)
                .query_async(&mut conns[4])
                .await
                .expect("SET");
        }
        let client = if i % 2 == 0 { &a } else { &b };
        let acquired = client.try_lock(&name, &opts).await.expect("try_lock");
        let acquired = acquired.expect("free");
        tokens.push(acquired.token.get());
        acquired.lease.release().await.expect("release");
    }
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens went back: {tokens:?}"
    );
}

/// The quoted words of a `MONITOR` line (`... [0 lua] "SET" "key" "owner" "NX" ...`).
fn quoted(line: &str) -> Vec<&str> {
    line.split('"').skip(1).step_by(2).collect()
}

/// A RedLock `lock()` call that has to try again (the instances are split between other
/// holders) sets each attempt's keys under an owner id of that attempt alone. With one owner
/// id for the whole wait, a key an earlier attempt set and whose undo never reached its
/// instance would still be "ours" to a later attempt whose answer from that instance was
/// lost: the recovery check would count it as won, with the old key's shorter TTL, and two
/// clients could then both count a quorum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_redlock_attempt_sets_its_keys_under_its_own_owner_id() {
    use futures_util::StreamExt;

    let lock = RedisLock::connect(&service_url("LOCKKIT_REDLOCK_URL"))
        .await
        .expect("connect");
    let clients = clients();
    let mut conns = instances().await;
    assert_eq!(conns.len(), 5);
    let name = LockName::new(&fresh_name("lockkit-redis/attempt_owners")).unwrap();
    let key = lock.lock_key(&name);
    // Instances 3 and 4 see every attempt; the other three are held by others for a while,
    // so each attempt wins two instances, no quorum, and undoes them.
    let monitor = clients[3].get_async_monitor().await.expect("MONITOR");
    let mut lines = monitor.into_on_message::<String>();
    for (conn, holder) in conns[..3].iter_mut().zip(["x", "x", "y"]) {
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(holder)
            .arg("PX")
            .arg(1_000)
            .query_async(conn)
            .await
            .expect("SET");
    }
    let opts = LockOptions::new().ttl(Duration::from_secs(5));
    let acquired = tokio::time::timeout(Duration::from_secs(10), lock.lock(&name, &opts, None))
        .await
        .expect("won once the other holders' keys expired")
        .expect("lock");
    acquired.lease.release().await.expect("release");

    // The owner ids instance 3's acquisitions set the key to, in order, up to a marker sent
    // after the release.
    let marker = format!("{key} seen");
    let _: String = redis::cmd("ECHO")
        .arg(&marker)
        .query_async(&mut conns[3])
        .await
        .expect("ECHO");
    let mut owners = Vec::new();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(5), lines.next())
            .await
            .expect("the monitor saw the marker")
            .expect("the monitor stream");
        let words = quoted(&line);
        if words.get(1) == Some(&marker.as_str()) {
            break;
        }
        let set_nx = words.len() > 3 && words[0].eq_ignore_ascii_case("SET") && words[1] == key;
        if set_nx && words.contains(&"NX") {
            owners.push(words[2].to_string());
        }
    }
    assert!(
        owners.len() >= 2,
        "only {} attempts: {owners:?}",
        owners.len()
    );
    let mut distinct = owners.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        owners.len(),
        "attempts reused an owner id: {owners:?}"
    );
}
