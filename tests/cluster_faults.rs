//! Item 9 of the fault matrix (issue 12): kill -9 the leader of a real three-member cluster
//! while a lock is held — a 3-member etcd cluster, a 3-server ZooKeeper ensemble, and 3 Consul
//! servers behind one Consul client agent (lockkit talks to one Consul agent, and a client
//! agent is how Consul is deployed: it stays up while a server, the leader included, dies).
//!
//! The clusters come from `scripts/clusters up` (which `scripts/test` runs), their URLs from
//! `target/clusters.env`. Each test kills its cluster's leader through `scripts/clusters` and
//! starts the killed member again at the end, so the tests run in any order.
//!
//! What each test asserts: the holder either keeps the lock (renewal and `extend` work after
//! the election, it still holds it TTL + renewal interval + 1 s after the kill, and nobody
//! else got it meanwhile) or its `lost()` fires within TTL + renewal interval + 1 s of the
//! kill; then two waiters get the lock one after the other, within a stated bound, with
//! tokens above the holder's and rising in the order of the grants; and at no grant did
//! anyone else still believe to hold the lock.
#![cfg(any(feature = "etcd", feature = "zk", feature = "consul"))]

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lockkit::{LockGuard, LockOptions, Locks, LostReason};
use lockkit_testkit::{cluster_url, fresh_name};
use tokio::time::{timeout_at, Instant};

/// `scripts/clusters` of this workspace.
fn script() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/clusters")
}

/// Runs `scripts/clusters ARGS`: whether it succeeded, its standard output, and its log
/// (standard error).
fn run_clusters(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(script())
        .args(args)
        .output()
        .expect("run scripts/clusters");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// [`run_clusters`] off the runtime's threads; the log goes to the test's stderr.
async fn clusters_async(args: &[&str]) -> (bool, String, String) {
    let args: Vec<String> = args.iter().map(ToString::to_string).collect();
    let (ok, out, log) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_clusters(&args)
    })
    .await
    .expect("scripts/clusters panicked");
    eprint!("{log}");
    (ok, out, log)
}

/// [`clusters_async`] that must succeed: its standard output.
async fn clusters(args: &[&str]) -> String {
    let (ok, out, log) = clusters_async(args).await;
    assert!(ok, "scripts/clusters {} failed:\n{log}", args.join(" "));
    out
}

/// Starts a killed member again: explicitly at the end of a test, or when dropped by a test
/// that failed halfway.
struct Restart(Option<String>);

impl Restart {
    async fn now(mut self) {
        if let Some(member) = self.0.take() {
            clusters(&["start", &member]).await;
        }
    }
}

impl Drop for Restart {
    fn drop(&mut self) {
        if let Some(member) = self.0.take() {
            let (ok, _, log) = run_clusters(&["start", &member]);
            if !ok {
                eprintln!("scripts/clusters start {member} failed:\n{log}");
            }
        }
    }
}

/// Every guard granted in a test and not yet released, to catch two holders at once.
#[derive(Clone, Default)]
struct Holders(Arc<Mutex<Vec<Holding>>>);

/// Who holds which guard.
type Holding = (&'static str, Arc<LockGuard>);

impl Holders {
    /// Records that `who` was just granted `guard`: an error names whoever else still
    /// believed to hold the lock at that moment.
    fn granted(&self, who: &'static str, guard: LockGuard) -> Result<(), String> {
        let mut held = self.0.lock().unwrap();
        let others: Vec<String> = held
            .iter()
            .filter(|(_, g)| g.is_held())
            .map(|(w, g)| format!("{w} (token {})", g.fencing_token()))
            .collect();
        let token = guard.fencing_token();
        held.push((who, Arc::new(guard)));
        if others.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{who} got the lock (token {token}) while {} still held it",
                others.join(", ")
            ))
        }
    }

    /// `who`'s guard, shared.
    fn get(&self, who: &str) -> Arc<LockGuard> {
        let held = self.0.lock().unwrap();
        let (_, guard) = held
            .iter()
            .find(|(w, _)| *w == who)
            .expect("no such holder");
        guard.clone()
    }

    /// Takes `who`'s guard back (to release it); no other clone of it may be alive.
    fn take(&self, who: &str) -> LockGuard {
        let mut held = self.0.lock().unwrap();
        let at = held
            .iter()
            .position(|(w, _)| *w == who)
            .expect("no such holder");
        let (_, guard) = held.remove(at);
        Arc::try_unwrap(guard).unwrap_or_else(|_| panic!("{who}'s guard is still shared"))
    }
}

/// How long a holder waits before it tries `extend` again after a connection error.
const RETRY: Duration = Duration::from_millis(100);

/// One waiter's grant.
#[derive(Debug)]
struct Grant {
    who: &'static str,
    at: Instant,
    token: u64,
    /// Someone else still held the lock when this grant came.
    overlap: Result<(), String>,
}

/// Waits for the lock, holds it for `hold`, releases it.
async fn waiter(
    who: &'static str,
    locks: Locks,
    name: String,
    opts: LockOptions,
    holders: Holders,
    hold: Duration,
) -> Grant {
    let guard = locks
        .acquire_with(&name, &opts)
        .await
        .unwrap_or_else(|e| panic!("waiter {who} did not get the lock: {e}"));
    let at = Instant::now();
    let token = guard.fencing_token().get();
    let overlap = holders.granted(who, guard);
    tokio::time::sleep(hold).await;
    let guard = holders.take(who);
    assert!(
        guard.is_held(),
        "{who} lost the lock while holding it for {hold:?}"
    );
    guard
        .release()
        .await
        .unwrap_or_else(|e| panic!("{who}'s release failed: {e}"));
    Grant {
        who,
        at,
        token,
        overlap,
    }
}

/// How the first holder came through the failover.
#[derive(Debug)]
enum Holder {
    /// Still held past TTL + renewal interval + 1 s after the kill, then released.
    Kept { released_at: Instant },
    /// `lost()` fired, this long after the kill; `extend` had said `extend`.
    Lost {
        reason: LostReason,
        after: Duration,
        extend: String,
    },
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Kept { .. } => write!(f, "kept the lock"),
            Holder::Lost {
                reason,
                after,
                extend,
            } => write!(
                f,
                "lost it ({reason}) {after:?} after the kill; extend: {extend}"
            ),
        }
    }
}

/// The member `scripts/clusters kill-leader` says it killed, and when
/// (`killed MEMBER PID at UNIX-SECONDS`).
fn killed_member(out: &str) -> Option<(String, Instant)> {
    out.lines().find_map(
        |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["killed", member, _pid, "at", when] => {
                let when = UNIX_EPOCH + Duration::from_secs_f64(when.parse().expect("kill time"));
                let ago = SystemTime::now().duration_since(when).unwrap_or_default();
                Some((member.to_string(), Instant::now() - ago))
            }
            _ => None,
        },
    )
}

/// The next leader and the election time `scripts/clusters kill-leader` measured
/// (`leader MEMBER PID after SECONDSs`).
fn next_leader(out: &str) -> (String, f64) {
    out.lines()
        .find_map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["leader", member, _pid, "after", secs] => {
                    let secs = secs.trim_end_matches('s').parse().expect("election time");
                    Some((member.to_string(), secs))
                }
                _ => None,
            },
        )
        .unwrap_or_else(|| panic!("no `leader` line in {out:?}"))
}

/// Holds a lock on `cluster` (URL from `key`, lease `ttl`) with one client, queues two more,
/// kills the cluster's leader, and checks what the module docs say.
async fn kill_the_leader_under_a_held_lock(cluster: &str, key: &str, ttl: Duration) {
    let url = cluster_url(key);
    // All members running (a run that failed before its restart may have left one down).
    clusters(&["up", cluster]).await;
    let connect = || async {
        lockkit::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
    };
    let (a, b, c) = (connect().await, connect().await, connect().await);
    let name = fresh_name(&format!("lockkit-cluster/{cluster}"));
    let opts = LockOptions::new().ttl(ttl);
    let bound_lost = ttl + opts.renewal_interval() + Duration::from_secs(1);
    let holders = Holders::default();

    let guard = a.acquire_with(&name, &opts).await.expect("first acquire");
    let token_a = guard.fencing_token().get();
    let mut lost_a = {
        let lost = guard.lost();
        tokio::spawn(async move { (lost.await, Instant::now()) })
    };
    holders.granted("a", guard).unwrap();

    let wait = opts.clone().wait_timeout(Duration::from_secs(60));
    let hold = Duration::from_millis(300);
    let waiters = [("b", b), ("c", c)].map(|(who, locks)| {
        tokio::spawn(waiter(
            who,
            locks,
            name.clone(),
            wait.clone(),
            holders.clone(),
            hold,
        ))
    });
    tokio::time::sleep(Duration::from_millis(500)).await; // both queued

    let called_at = Instant::now();
    let (ok, out, log) = clusters_async(&["kill-leader", cluster]).await;
    let elected_at = Instant::now();
    let (killed, killed_at) =
        killed_member(&out).unwrap_or_else(|| panic!("no leader was killed:\n{log}"));
    let restart = Restart(Some(killed.clone()));
    assert!(
        ok,
        "{cluster}: no new leader after {killed} was killed:\n{log}"
    );
    let (leader, election) = next_leader(&out);

    // By TTL + renewal + 1 s after the kill, the holder either still holds the lock (its
    // renewals got through the new leader) or was told it lost it.
    let a_guard = holders.get("a");
    let deadline = killed_at + bound_lost;
    let holder = match timeout_at(deadline, &mut lost_a).await {
        Ok(lost) => {
            let (reason, at) = lost.unwrap();
            assert!(
                !a_guard.is_held(),
                "{cluster}: lost() fired, is_held() is true"
            );
            drop(a_guard);
            drop(holders.take("a"));
            Holder::Lost {
                reason,
                after: at - killed_at,
                extend: "not tried".into(),
            }
        }
        Err(_) => {
            assert!(
                a_guard.is_held(),
                "{cluster}: {bound_lost:?} after the kill, the holder neither holds the lock \
                 nor was told it lost it (lost reason {:?}, valid for {:?} more)",
                a_guard.lost_reason(),
                a_guard
                    .valid_until()
                    .saturating_duration_since(Instant::now())
            );
            // It held on; `extend` works too (within 10 s: a request to the killed member
            // may have to time out first).
            let valid_until = a_guard.valid_until();
            let give_up = Instant::now() + Duration::from_secs(10);
            let extended = loop {
                match timeout_at(give_up, a_guard.extend(ttl)).await {
                    Ok(Err(e)) if e.is_retryable() && Instant::now() + RETRY < give_up => {
                        tokio::time::sleep(RETRY).await
                    }
                    other => break other,
                }
            };
            match extended {
                Ok(Ok(())) => {
                    assert!(a_guard.is_held(), "{cluster}: extended, but not held");
                    assert!(
                        !lost_a.is_finished(),
                        "{cluster}: lost() fired on a held lock"
                    );
                    drop(a_guard);
                    let guard = holders.take("a");
                    let released_at = Instant::now();
                    guard.release().await.expect("release after the failover");
                    Holder::Kept { released_at }
                }
                Ok(Err(e)) if e.is_lost() => {
                    // Lost after all, later: told within the renewal interval + 1 s of the
                    // lease's end.
                    let told_by = valid_until.max(Instant::now())
                        + opts.renewal_interval()
                        + Duration::from_secs(1);
                    let (reason, at) = timeout_at(told_by, lost_a)
                        .await
                        .unwrap_or_else(|_| panic!("{cluster}: extend said {e}, lost() is silent"))
                        .unwrap();
                    drop(a_guard);
                    drop(holders.take("a"));
                    Holder::Lost {
                        reason,
                        after: at - killed_at,
                        extend: e.to_string(),
                    }
                }
                other => panic!(
                    "{cluster}: the holder still held the lock but could not extend it within \
                     10 s: {other:?}"
                ),
            }
        }
    };
    // The waiters get the lock one after the other, tokens rising with the grants.
    let mut grants = Vec::new();
    for w in waiters {
        grants.push(w.await.expect("waiter"));
    }
    grants.sort_by_key(|g| g.at);
    for g in &grants {
        if let Err(overlap) = &g.overlap {
            panic!("{cluster}: two holders at once: {overlap}");
        }
    }
    let (first, second) = (&grants[0], &grants[1]);
    assert!(
        first.token > token_a && second.token > first.token,
        "{cluster}: tokens do not rise with the grants: a {token_a}, {} {}, {} {}",
        first.who,
        first.token,
        second.who,
        second.token
    );
    // Kept: the release hands over at once (bound 5 s, ~10x the usual). Lost: the old lease
    // must end on the new leader first: within 2 x TTL (Consul's own slack) + 5 s of the
    // election.
    let (handoff, bound) = match &holder {
        Holder::Kept { released_at } => (first.at - *released_at, Duration::from_secs(5)),
        Holder::Lost { .. } => (first.at - elected_at, 2 * ttl + Duration::from_secs(5)),
    };
    assert!(
        handoff <= bound,
        "{cluster}: the first waiter got the lock {handoff:?} after the {}, bound {bound:?}",
        if matches!(holder, Holder::Kept { .. }) {
            "release"
        } else {
            "election"
        }
    );
    println!(
        "{cluster}: killed {killed}, {leader} led {election:.3}s after the kill \
         (`kill-leader` took {:.3}s); the holder {holder}; first waiter {} after {handoff:?}; tokens {token_a} < {} < {}",
        (elected_at - called_at).as_secs_f64(),
        first.who,
        first.token,
        second.token
    );
    restart.now().await;
}

#[cfg(feature = "etcd")]
mod etcd {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn killing_the_leader_under_a_held_lock_keeps_exclusion_and_hands_over() {
        kill_the_leader_under_a_held_lock(
            "etcd",
            "LOCKKIT_ETCD_CLUSTER_URL",
            Duration::from_secs(5),
        )
        .await;
    }
}

#[cfg(feature = "zk")]
mod zk {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn killing_the_leader_under_a_held_lock_keeps_exclusion_and_hands_over() {
        kill_the_leader_under_a_held_lock("zk", "LOCKKIT_ZK_CLUSTER_URL", Duration::from_secs(5))
            .await;
    }
}

#[cfg(feature = "consul")]
mod consul {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn killing_the_leader_under_a_held_lock_keeps_exclusion_and_hands_over() {
        kill_the_leader_under_a_held_lock(
            "consul",
            "LOCKKIT_CONSUL_CLUSTER_URL",
            Duration::from_secs(10),
        )
        .await;
    }

    /// The Consul backend talks to one agent: a URL naming the three servers is refused with
    /// a message saying so (the cluster is reached through a client agent instead).
    #[tokio::test]
    async fn a_url_naming_several_agents_is_refused() {
        let url = "consul://127.0.0.1:22501,127.0.0.1:22502,127.0.0.1:22503";
        let Err(err) = lockkit::connect(url).await else {
            panic!("a URL with three Consul agents was accepted");
        };
        assert!(err.to_string().contains("one Consul agent"), "{err}");
    }
}
