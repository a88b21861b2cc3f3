//! etcd beyond the conformance suite (which checks FIFO hand-off): a lease revoked from
//! outside, a waiter's key lost, a dead cluster member, and a server killed, paused and
//! restarted under a holder. The shared etcd of `scripts/services` is never stopped: the
//! restart test starts a private etcd of its own.
#![cfg(feature = "etcd")]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lockkit::etcd::etcd_client::{self, GetOptions};
use lockkit::{EtcdLock, LockGuard, LockName, LockOptions, Locks, LostReason};
use tokio::time::Instant;

use lockkit_testkit::{fresh_name, hosts, service_url};

async fn raw_client(url: &str) -> etcd_client::Client {
    etcd_client::Client::connect(hosts(url), None)
        .await
        .expect("raw etcd client")
}

/// The keys under a lock's prefix, oldest first, with the lease each is bound to and its
/// create revision.
async fn queue(raw: &mut etcd_client::Client, prefix: &str) -> Vec<(String, i64, i64)> {
    let options = GetOptions::new().with_prefix().with_sort(
        etcd_client::SortTarget::Create,
        etcd_client::SortOrder::Ascend,
    );
    let answer = raw.get(prefix, Some(options)).await.expect("list keys");
    answer
        .kvs()
        .iter()
        .map(|kv| {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            (key, kv.lease(), kv.create_revision())
        })
        .collect()
}

/// Waits until the lock's queue has `len` keys.
async fn wait_for_queue(raw: &mut etcd_client::Client, prefix: &str, len: usize) {
    let until = Instant::now() + Duration::from_secs(5);
    while queue(raw, prefix).await.len() != len {
        assert!(Instant::now() < until, "the queue never reached {len} keys");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_revoked_from_outside_fires_lost_and_frees_the_lock() {
    let url = service_url("LOCKKIT_ETCD_URL");
    let mut raw = raw_client(&url).await;
    let (a, b) = (
        Locks::new(EtcdLock::connect(&url).await.unwrap()),
        Locks::new(EtcdLock::connect(&url).await.unwrap()),
    );
    let name = fresh_name("lockkit-faults/revoked");
    let prefix = a
        .backend_as::<EtcdLock>()
        .unwrap()
        .key_prefix(&LockName::new(&name).unwrap());
    let ttl = Duration::from_secs(3);
    let opts = LockOptions::new().ttl(ttl);
    let guard = a.acquire_with(&name, &opts).await.unwrap();
    let keys = queue(&mut raw, &prefix).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let (key, lease, _) = &keys[0];
    assert!(key.ends_with(&format!("/{:016x}", *lease as u64)), "{key}");

    raw.lease_revoke(*lease).await.expect("revoke");
    let revoked = Instant::now();
    let bound = opts.renewal_interval() + Duration::from_secs(1);
    let reason = tokio::time::timeout(bound, guard.lost())
        .await
        .expect("lost() did not fire within a renewal interval");
    assert_eq!(reason, LostReason::NotOwner);
    assert!(!guard.is_held());
    assert!(revoked.elapsed() < bound);

    let next = b
        .acquire_with(&name, &opts.clone().wait_timeout(Duration::from_secs(2)))
        .await
        .expect("the revoked lease still blocked the lock");
    assert!(next.fencing_token() > guard.fencing_token());
    assert!(guard.release().await.unwrap_err().is_lost());
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_to_another_ttl_rebinds_the_key_and_keeps_its_token() {
    let url = service_url("LOCKKIT_ETCD_URL");
    let mut raw = raw_client(&url).await;
    let (a, b) = (
        Locks::new(EtcdLock::connect(&url).await.unwrap()),
        Locks::new(EtcdLock::connect(&url).await.unwrap()),
    );
    let name = fresh_name("lockkit-faults/rebind");
    let prefix = a
        .backend_as::<EtcdLock>()
        .unwrap()
        .key_prefix(&LockName::new(&name).unwrap());
    let ttl = Duration::from_secs(2);
    let opts = LockOptions::new().ttl(ttl).auto_renew(false);
    let guard = a.acquire_with(&name, &opts).await.unwrap();
    let before = queue(&mut raw, &prefix).await;
    guard.extend(Duration::from_millis(4500)).await.unwrap();
    let after = queue(&mut raw, &prefix).await;
    assert_eq!(after.len(), 1);
    let ((key, old, created), (key2, new, created2)) = (&before[0], &after[0]);
    assert_eq!((key, created), (key2, created2), "the key was not kept");
    assert_eq!(guard.fencing_token().get(), *created as u64);
    assert_ne!(old, new, "the key is still on its first lease");
    let ttl_of = raw.lease_time_to_live(*new, None).await.unwrap();
    assert_eq!(ttl_of.granted_ttl(), 5, "4.5 s rounds up to 5 s");
    // The old lease is revoked (in the background).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let old_ttl = raw.lease_time_to_live(*old, None).await.unwrap();
    assert!(old_ttl.ttl() <= 0, "the old lease was not revoked");
    // Past the first TTL the lock is still held, on the new lease only.
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    assert!(guard.is_held());
    assert!(b.try_acquire_with(&name, &opts).await.unwrap().is_none());
    // Shorter again: back to a 2 s lease, then renewals keep the new TTL.
    guard.extend(ttl).await.unwrap();
    let (_, shorter, _) = queue(&mut raw, &prefix).await[0];
    let ttl_of = raw.lease_time_to_live(shorter, None).await.unwrap();
    assert_eq!(ttl_of.granted_ttl(), 2);
    guard.release().await.unwrap();
    assert!(queue(&mut raw, &prefix).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_key_vanished_queues_again_instead_of_taking_the_lock() {
    let url = service_url("LOCKKIT_ETCD_URL");
    let mut raw = raw_client(&url).await;
    let (a, w) = (
        Locks::new(EtcdLock::connect(&url).await.unwrap()),
        Locks::new(EtcdLock::connect(&url).await.unwrap()),
    );
    let name = fresh_name("lockkit-faults/vanished_waiter");
    let prefix = a
        .backend_as::<EtcdLock>()
        .unwrap()
        .key_prefix(&LockName::new(&name).unwrap());
    // A long TTL: the waiter does not renew during the test, so it learns of its lost key
    // only when it is its turn.
    let opts = LockOptions::new()
        .ttl(Duration::from_secs(60))
        .wait_timeout(Duration::from_secs(10));
    let holder = a.acquire_with(&name, &opts).await.unwrap();
    let (name2, opts2) = (name.clone(), opts.clone());
    let waiter = tokio::spawn(async move { w.acquire_with(&name2, &opts2).await });
    wait_for_queue(&mut raw, &prefix, 2).await;
    let (_, waiting_lease, waiting_created) = queue(&mut raw, &prefix).await[1];
    // The waiter's lease ends (as if it had expired) while it waits.
    raw.lease_revoke(waiting_lease).await.unwrap();
    holder.release().await.unwrap();
    let guard = waiter
        .await
        .unwrap()
        .expect("the waiter did not queue again");
    let keys = queue(&mut raw, &prefix).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let (_, lease, created) = keys[0];
    assert_ne!(lease, waiting_lease, "granted on the revoked lease");
    assert!(created > waiting_created);
    assert_eq!(guard.fencing_token().get(), created as u64);
    assert!(guard.is_held());
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_url_with_dead_members_still_connects_and_locks() {
    let url = service_url("LOCKKIT_ETCD_URL");
    let live = hosts(&url).join(",");
    // Ports 1 and 2 on loopback are closed: two members that are down, one up. etcd-client's
    // balancer keeps routing some requests to the dead ones, and every one of them must
    // still reach the live member.
    let cluster = format!("etcd://127.0.0.1:1,127.0.0.1:2,{live}");
    let started = Instant::now();
    let name = fresh_name("lockkit-faults/dead_member");
    let opts = LockOptions::new().wait_timeout(Duration::from_secs(2));
    for round in 0..10 {
        let client = Locks::new(
            EtcdLock::connect(&cluster)
                .await
                .unwrap_or_else(|e| panic!("connect {round} with two members down: {e}")),
        );
        for _ in 0..5 {
            let guard = client.acquire_with(&name, &opts).await.expect("acquire");
            guard.release().await.expect("release");
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_url_with_every_member_down_fails_fast() {
    let started = Instant::now();
    let err = match EtcdLock::connect("etcd://127.0.0.1:1,127.0.0.1:2,127.0.0.1:3").await {
        Ok(_) => panic!("connected to three closed ports"),
        Err(e) => e,
    };
    assert!(matches!(err, lockkit::Error::Connection { .. }), "{err:?}");
    // The members refuse at once, so the client need not wait out its 2 s connect timeout.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// An etcd of this test's own, on free loopback ports, in a temporary data directory.
struct PrivateEtcd {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().unwrap().port()
}

impl PrivateEtcd {
    async fn start() -> Self {
        let mut etcd = PrivateEtcd {
            dir: tempfile::tempdir().expect("temp dir"),
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
        };
        etcd.spawn().await;
        etcd
    }

    fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Starts etcd in the data directory (again) and waits until it answers.
    async fn spawn(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let child = Command::new("etcd")
            .args(["--name", "private", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("private={peer}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd (is it installed? scripts/services up etcd)");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(20);
        while EtcdLock::connect(&self.url()).await.is_err() {
            assert!(Instant::now() < until, "{}", self.log_tail());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {signal}");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for PrivateEtcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `contender` for the lock until `until`; every time it gets it, `holder` must not
/// think it still holds it. Returns the contender's guard, if it got the lock.
async fn contend(
    contender: &Locks,
    name: &str,
    holder: &LockGuard,
    until: Instant,
) -> Option<LockGuard> {
    let opts = LockOptions::new().retry(lockkit::RetryPolicy::NONE);
    while Instant::now() < until {
        if let Ok(Some(guard)) = contender.try_acquire_with(name, &opts).await {
            assert!(
                !holder.is_held(),
                "two holders at once: the first still holds a lock the second got"
            );
            return Some(guard);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_paused_and_restarted_under_a_renewing_holder() {
    assert!(
        which_etcd(),
        "etcd is not installed: scripts/services up etcd"
    );
    let mut etcd = PrivateEtcd::start().await;
    let (a, b) = (
        Locks::new(EtcdLock::connect(&etcd.url()).await.unwrap()),
        Locks::new(EtcdLock::connect(&etcd.url()).await.unwrap()),
    );

    // 1. Killed and restarted within the lease: the holder renews across the restart and
    // keeps the lock, or reports it lost; a contender never gets it while the holder holds.
    let name = fresh_name("lockkit-faults/restart");
    let ttl = Duration::from_secs(6);
    let guard = a
        .acquire_with(&name, &LockOptions::new().ttl(ttl))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.spawn().await;
    let until = Instant::now() + ttl;
    let stolen = contend(&b, &name, &guard, until).await;
    match (&stolen, guard.lost_reason()) {
        (None, None) => assert!(guard.is_held()),
        (Some(_), Some(_)) => {} // lost, and only then taken
        (None, Some(reason)) => eprintln!("the holder lost the lock over the restart: {reason}"),
        (Some(_), None) => unreachable!("checked in contend"),
    }
    drop(stolen);
    if guard.is_held() {
        guard.release().await.expect("release after the restart");
    }

    // 2. Paused past the lease: the holder reports the lock lost by the end of its lease;
    // once the server runs again, the contender gets the lock, and never before the holder
    // has given it up.
    let name = fresh_name("lockkit-faults/paused");
    let ttl = Duration::from_secs(2);
    let guard = a
        .acquire_with(&name, &LockOptions::new().ttl(ttl))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    etcd.signal("-STOP");
    let paused = Instant::now();
    let reason = tokio::time::timeout(ttl + Duration::from_secs(1), guard.lost()).await;
    let lost_after = paused.elapsed();
    tokio::time::sleep((ttl * 2).saturating_sub(lost_after)).await;
    etcd.signal("-CONT");
    let reason = reason.expect("lost() did not fire while the server was paused");
    assert!(
        matches!(reason, LostReason::Expired | LostReason::RenewalFailed(_)),
        "{reason:?}"
    );
    assert!(
        lost_after <= ttl,
        "lost after {lost_after:?}, the TTL is {ttl:?}"
    );
    let next = contend(&b, &name, &guard, Instant::now() + Duration::from_secs(10))
        .await
        .expect("the expired lease was never freed after the server resumed");
    assert!(next.fencing_token() > guard.fencing_token());
    next.release().await.unwrap();
    assert!(guard.release().await.unwrap_err().is_lost());
}

fn which_etcd() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
