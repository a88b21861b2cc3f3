//! Consul faults and the proof behind the fencing token, against the agent at
//! `LOCKKIT_CONSUL_URL` (or `target/services.env`), plus a private agent the test starts and
//! stops itself.
#![cfg(feature = "consul")]

use std::process::Stdio;
use std::time::Duration;

use lockkit::{ConsulLock, Error, LockName, LockOptions, Locks, LostReason};
use lockkit_testkit::{fresh_name, hosts, service_url};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout, Instant};

fn url() -> String {
    service_url("LOCKKIT_CONSUL_URL")
}

/// `host:port` of a `consul://` URL.
fn address(url: &str) -> String {
    hosts(url).swap_remove(0)
}

/// One raw HTTP/1.0 request to the agent, outside lockkit: (status, body).
async fn raw(address: &str, method: &str, path: &str) -> (u16, String) {
    raw_with(address, method, path, "").await
}

/// One raw HTTP/1.0 request with a body: (status, body).
async fn raw_with(address: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to the Consul agent");
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {address}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// The key's entry as Consul stores it (`None` if it does not exist).
async fn entry(address: &str, key: &str) -> Option<Value> {
    let (status, body) = raw(
        address,
        "GET",
        &format!("/v1/kv/{}", key.replace('%', "%25")),
    )
    .await;
    match status {
        404 => None,
        200 => {
            let list: Value = serde_json::from_str(&body).unwrap();
            Some(list[0].clone())
        }
        _ => panic!("reading {key}: {status} {body}"),
    }
}

/// The fencing token is the key's ModifyIndex after the acquisition, not its LockIndex:
/// LockIndex starts again at 1 when the key is deleted (by `DELETE`, or by Consul when a
/// `behavior=delete` session holding it is invalidated), ModifyIndex is a Raft index and only
/// grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_token_is_modify_index_and_survives_key_deletion() {
    let url = url();
    let addr = address(&url);
    let locks = Locks::new(ConsulLock::connect(&url).await.unwrap());
    let name = fresh_name("lockkit-faults/fencing");
    let key = locks
        .backend_as::<ConsulLock>()
        .unwrap()
        .lock_key(&LockName::new(&name).unwrap());
    let opts = LockOptions::new();

    let mut tokens = Vec::new();
    let mut lock_indexes = Vec::new();
    for _ in 0..2 {
        let guard = locks.acquire_with(&name, &opts).await.unwrap();
        let held = entry(&addr, &key).await.expect("the held key");
        assert_eq!(
            held["ModifyIndex"].as_u64(),
            Some(guard.fencing_token().get())
        );
        tokens.push(guard.fencing_token().get());
        lock_indexes.push(held["LockIndex"].as_u64().unwrap());
        guard.release().await.unwrap();
    }
    assert_eq!(
        lock_indexes,
        [1, 2],
        "LockIndex counts acquisitions of one key"
    );

    // Delete the key from outside: LockIndex starts over, the token still grows.
    let (status, _) = raw(
        &addr,
        "DELETE",
        &format!("/v1/kv/{}", key.replace('%', "%25")),
    )
    .await;
    assert_eq!(status, 200);
    let guard = locks.acquire_with(&name, &opts).await.unwrap();
    let held = entry(&addr, &key).await.unwrap();
    assert_eq!(
        held["LockIndex"].as_u64(),
        Some(1),
        "LockIndex reset by the delete"
    );
    assert!(guard.fencing_token().get() > tokens[1]);
    tokens.push(guard.fencing_token().get());

    // Invalidate the holder's session: behavior=delete deletes the key with it.
    let session = held["Session"].as_str().unwrap().to_string();
    let (status, _) = raw(&addr, "PUT", &format!("/v1/session/destroy/{session}")).await;
    assert_eq!(status, 200);
    assert!(
        entry(&addr, &key).await.is_none(),
        "behavior=delete kept the key"
    );
    let next = locks
        .acquire_with(&name, &opts.clone().wait_timeout(Duration::from_secs(10)))
        .await
        .unwrap();
    let held = entry(&addr, &key).await.unwrap();
    assert_eq!(held["LockIndex"].as_u64(), Some(1));
    assert!(next.fencing_token().get() > tokens[2]);
    next.release().await.unwrap();
    drop(guard);
}

/// A session destroyed from outside fires `lost()` at once (not at the next renewal), the
/// guard's release reports the loss, and another client takes the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_destroyed_from_outside_fires_lost() {
    let url = url();
    let addr = address(&url);
    let (a, b) = (
        Locks::new(ConsulLock::connect(&url).await.unwrap()),
        Locks::new(ConsulLock::connect(&url).await.unwrap()),
    );
    let name = fresh_name("lockkit-faults/destroyed");
    let key = a
        .backend_as::<ConsulLock>()
        .unwrap()
        .lock_key(&LockName::new(&name).unwrap());
    // A 60 s TTL renews every 20 s: a loss seen within 5 s was not seen by a renewal.
    let opts = LockOptions::new().ttl(Duration::from_secs(60));
    let guard = a.acquire_with(&name, &opts).await.unwrap();
    let held = entry(&addr, &key).await.unwrap();
    let session = held["Session"].as_str().unwrap().to_string();
    let (status, _) = raw(&addr, "PUT", &format!("/v1/session/destroy/{session}")).await;
    assert_eq!(status, 200);

    let reason = timeout(Duration::from_secs(5), guard.lost())
        .await
        .expect("lost() did not fire after the session was destroyed");
    assert!(matches!(reason, LostReason::SessionLost(_)), "{reason:?}");
    assert!(!guard.is_held());
    let next = b
        .acquire_with(&name, &opts.clone().wait_timeout(Duration::from_secs(5)))
        .await
        .expect("the lock of a destroyed session stayed taken");
    assert!(next.fencing_token() > guard.fencing_token());
    let err = guard.release().await.expect_err("released a lost lock");
    assert!(err.is_lost(), "{err:?}");
    assert!(next.is_held());
    next.release().await.unwrap();
}

/// A private dev agent on its own ports, killed when dropped.
struct PrivateAgent {
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl PrivateAgent {
    const HTTP: u16 = 28500;

    async fn start() -> PrivateAgent {
        let bin = std::env::var("LOCKKIT_CONSUL_BIN")
            .unwrap_or_else(|_| "/opt/lockkit/consul/usr/bin/consul".into());
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let child = tokio::process::Command::new(&bin)
            .args([
                "agent",
                "-dev",
                "-bind=127.0.0.1",
                "-client=127.0.0.1",
                "-http-port=28500",
                "-server-port=28300",
                "-serf-lan-port=28301",
                "-serf-wan-port=28302",
                "-grpc-port=28502",
                "-dns-port=-1",
                "-log-level=warn",
                "-node=lockkit-faults-private",
            ])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let agent = PrivateAgent { child, _dir: dir };
        let addr = format!("127.0.0.1:{}", Self::HTTP);
        let started = Instant::now();
        loop {
            let up = timeout(Duration::from_secs(1), async {
                match tokio::net::TcpStream::connect(&addr).await {
                    Ok(_) => {
                        let leader = raw(&addr, "GET", "/v1/status/leader").await.1;
                        // Sessions need the node registered, a moment after the election
                        // ("Missing node registration" before).
                        let node = "/v1/catalog/node/lockkit-faults-private";
                        let registered = raw(&addr, "GET", node).await.1;
                        (leader, registered)
                    }
                    Err(_) => Default::default(),
                }
            })
            .await
            .unwrap_or_default();
            let (leader, registered) = up;
            if leader.trim().trim_matches('"').contains(':') && registered.contains("\"Node\"") {
                return agent;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the private agent did not elect itself leader"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The agent goes away while a holder renews: renewals and new requests fail with
/// connection errors (typed, retryable), `lost()` fires once the lease runs out, and nothing
/// panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_stopped_while_holder_renews() {
    let mut agent = PrivateAgent::start().await;
    let url = format!("consul://127.0.0.1:{}", PrivateAgent::HTTP);
    let locks = Locks::new(ConsulLock::connect(&url).await.unwrap());
    let ttl = Duration::from_secs(10);
    let guard = locks
        .acquire_with("faults/agent-stopped", &LockOptions::new().ttl(ttl))
        .await
        .unwrap();
    // One renewal goes through while the agent is up.
    tokio::time::sleep(ttl / 2).await;
    assert!(guard.is_held());
    let renewed_until = guard.valid_until();

    agent.child.kill().await.unwrap();
    let stopped = Instant::now();

    let err = guard
        .extend(ttl)
        .await
        .expect_err("extended without an agent");
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(err.is_retryable());
    let err = locks
        .try_acquire_with("faults/other", &LockOptions::new())
        .await
        .expect_err("acquired without an agent");
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");

    let left = renewed_until.saturating_duration_since(Instant::now());
    let reason = timeout(left + Duration::from_secs(5), guard.lost())
        .await
        .expect("lost() did not fire after the lease ran out");
    assert!(
        matches!(reason, LostReason::RenewalFailed(_) | LostReason::Expired),
        "{reason:?}"
    );
    assert!(
        Instant::now() + Duration::from_millis(50) >= renewed_until,
        "lost {:?} before the lease ran out",
        renewed_until - Instant::now()
    );
    assert!(stopped.elapsed() <= ttl + Duration::from_secs(5));
    assert!(!guard.is_held());
    let err = guard
        .release()
        .await
        .expect_err("released without an agent");
    assert!(err.is_lost(), "{err:?}");
}

/// A held lock's session carries no health checks (TTL only), so a failing node check (the
/// agent's `serfHealth`, as when the holder's agent is partitioned away or dies, or any other
/// node-level check) does not invalidate it and hand the lock to someone else while the
/// holder still believes it holds it. On the private agent (it marks its own node's
/// `serfHealth` critical).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_node_checks_do_not_hand_the_lock_over() {
    let _agent = PrivateAgent::start().await;
    let addr = format!("127.0.0.1:{}", PrivateAgent::HTTP);
    let url = format!("consul://{addr}");
    let (a, b) = (
        Locks::new(ConsulLock::connect(&url).await.unwrap()),
        Locks::new(ConsulLock::connect(&url).await.unwrap()),
    );
    let name = "faults/node-checks";
    let key = a
        .backend_as::<ConsulLock>()
        .unwrap()
        .lock_key(&LockName::new(name).unwrap());
    // A 60 s TTL renews every 20 s: nothing below depends on a renewal.
    let opts = LockOptions::new().ttl(Duration::from_secs(60));
    let guard = a.acquire_with(name, &opts).await.unwrap();
    let session = entry(&addr, &key).await.unwrap()["Session"]
        .as_str()
        .unwrap()
        .to_string();

    let (status, body) = raw(&addr, "GET", &format!("/v1/session/info/{session}")).await;
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    let info = &info[0];
    for field in ["Checks", "NodeChecks", "ServiceChecks"] {
        assert!(
            info[field].as_array().is_none_or(Vec::is_empty),
            "the lock's session has health checks: {field} = {}",
            info[field]
        );
    }
    let node = info["Node"].as_str().unwrap().to_string();

    // A node-level check of the holder's agent fails, and so does its serfHealth check
    // (what Consul's leader does when the agent stops answering).
    let (status, body) = raw_with(
        &addr,
        "PUT",
        "/v1/agent/check/register",
        r#"{"ID":"lockkit-faults","Name":"lockkit faults","TTL":"1h"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = raw(&addr, "PUT", "/v1/agent/check/fail/lockkit-faults").await;
    assert_eq!(status, 200, "{body}");
    let serf = |status: &str| {
        format!(
            r#"{{"Node":"{node}","Address":"127.0.0.1","SkipNodeUpdate":true,
                "Check":{{"Node":"{node}","CheckID":"serfHealth","Name":"Serf Health Status",
                "Status":"{status}"}}}}"#
        )
    };
    let (status, body) = raw_with(&addr, "PUT", "/v1/catalog/register", &serf("critical")).await;
    assert_eq!(status, 200, "{body}");

    // The holder keeps the lock, and nobody else gets it.
    if let Ok(reason) = timeout(Duration::from_secs(3), guard.lost()).await {
        panic!("the holder lost its lock when a node check failed: {reason:?}");
    }
    assert!(guard.is_held());
    assert_eq!(
        entry(&addr, &key).await.map(|e| e["Session"].clone()),
        Some(Value::from(session.clone())),
        "the key changed hands when a node check failed"
    );
    let other = b
        .try_acquire_with(name, &opts)
        .await
        .expect("a new session while a node check fails");
    assert!(other.is_none(), "another client took the held lock");
    guard.extend(opts.ttl).await.unwrap();
    guard.release().await.unwrap();

    raw_with(&addr, "PUT", "/v1/catalog/register", &serf("passing")).await;
    raw(&addr, "PUT", "/v1/agent/check/deregister/lockkit-faults").await;
}
