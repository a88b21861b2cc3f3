//! Measures the etcd backend against the floor of raw requests on the same server and
//! against etcd's own server-side `Lock` RPC: uncontended acquire+release, and 8-way
//! contended throughput on one lock name.
//!
//! ```text
//! scripts/services up etcd
//! cargo run --release --features etcd --example bench_etcd
//! cargo run --release --features etcd --example bench_etcd -- --url etcd://my-host:2379
//! ```
//! Without `--url` it reads `LOCKKIT_ETCD_URL`, then `target/services.env`.
//!
//! What each row costs in round trips (every write is a Raft commit and an fsync):
//! - floor: `put` + `delete` of one key, the least a lock that leaves nothing behind can do;
//! - `Lock` RPC, lease per acquisition: `LeaseGrant` + `Lock` + `Unlock` + `LeaseRevoke`,
//!   the same work lockkit does (a lease per guard, so a crashed holder frees the lock);
//! - `Lock` RPC, session lease: `Lock` + `Unlock` on one long-lived lease (etcd's usual
//!   `concurrency.Session` pattern, whose holders all share one TTL);
//! - lockkit: `LeaseGrant` + a transaction (put if absent, read the queue) to acquire, a
//!   transaction (delete if still on our lease) to release; the lease is revoked in the
//!   background after the release returns.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use clap::Parser;
use lockkit::etcd::etcd_client::{Client, LockOptions as RpcLockOptions};
use lockkit::{EtcdLock, LockOptions};

#[derive(Parser)]
struct Args {
    /// etcd URL (default: LOCKKIT_ETCD_URL, then target/services.env).
    #[arg(long)]
    url: Option<String>,
    /// Timed iterations per uncontended measurement.
    #[arg(long, default_value_t = 500)]
    iterations: usize,
    /// Seconds of each contended run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

/// `host:port` of every endpoint of an `etcd://` URL.
fn endpoints(url: &str) -> Vec<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let hosts = rest.split(['/', '?']).next().unwrap_or_default();
    hosts.split(',').map(str::to_string).collect()
}

/// Runs `op` `iterations` times after a tenth as many for warm-up.
async fn measure<F, Fut>(iterations: usize, mut op: F) -> common::Stats
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations + iterations / 10 {
        let started = Instant::now();
        op().await;
        if i >= iterations / 10 {
            samples.push(started.elapsed());
        }
    }
    common::stats(samples)
}

async fn raw(url: &str) -> Client {
    Client::connect(endpoints(url), None)
        .await
        .expect("connect")
}

/// One acquisition through etcd's `Lock` RPC; `session` is a long-lived lease to lock on,
/// or `None` for a lease of its own, granted before and revoked after.
async fn rpc_lock_unlock(client: &mut Client, name: &str, session: Option<i64>) {
    let lease = match session {
        Some(lease) => lease,
        None => client.lease_grant(30, None).await.expect("grant").id(),
    };
    let options = RpcLockOptions::new().with_lease(lease);
    let locked = client.lock(name, Some(options)).await.expect("Lock");
    client.unlock(locked.key()).await.expect("Unlock");
    if session.is_none() {
        client.lease_revoke(lease).await.expect("revoke");
    }
}

/// Acquisitions per second of 8 tasks, each on its own connection, taking one lock in turn.
async fn contended<F, Fut>(seconds: f64, mut task: F) -> f64
where
    F: FnMut(Instant) -> Fut,
    Fut: std::future::Future<Output = u64> + Send + 'static,
{
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        tasks.spawn(task(until));
    }
    let mut total = 0;
    while let Some(done) = tasks.join_next().await {
        total += done.expect("task");
    }
    total as f64 / seconds
}

fn row(what: &str, s: &common::Stats, floor: &common::Stats) {
    let ratio = s.mean.as_secs_f64() / floor.mean.as_secs_f64();
    println!(
        "{what:<40} {:>10.2?} {:>10.2?} {:>10.2?} {:>7.2}x",
        s.mean, s.p50, s.p99, ratio
    );
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let url = args
        .url
        .or_else(|| std::env::var("LOCKKIT_ETCD_URL").ok())
        .or_else(|| common::from_env_file("LOCKKIT_ETCD_URL"))
        .expect("--url, LOCKKIT_ETCD_URL or target/services.env (scripts/services up etcd)");
    let n = args.iterations;
    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>8}",
        "uncontended (one client)", "mean", "p50", "p99", "vs floor"
    );

    let mut client = raw(&url).await;
    let floor = measure(n, || {
        let mut c = client.clone();
        async move {
            c.put("lockkit-bench/floor", "x", None).await.expect("put");
            c.delete("lockkit-bench/floor", None).await.expect("delete");
        }
    })
    .await;
    row("floor: put + delete", &floor, &floor);

    let rpc = measure(n, || {
        let mut c = client.clone();
        async move { rpc_lock_unlock(&mut c, "lockkit-bench/rpc", None).await }
    })
    .await;
    row("etcd Lock RPC, lease per acquisition", &rpc, &floor);

    let session = client.lease_grant(60, None).await.expect("grant").id();
    let rpc_session = measure(n, || {
        let mut c = client.clone();
        async move { rpc_lock_unlock(&mut c, "lockkit-bench/rpc", Some(session)).await }
    })
    .await;
    row("etcd Lock RPC, session lease", &rpc_session, &floor);
    client.lease_revoke(session).await.expect("revoke");

    let lock = lockkit::Locks::new(EtcdLock::connect(&url).await.expect("connect"));
    let opts = LockOptions::new();
    let ours = measure(n, || {
        let (lock, opts) = (&lock, &opts);
        async move {
            let guard = lock
                .acquire_with("bench/uncontended", opts)
                .await
                .expect("acquire");
            guard.release().await.expect("release");
        }
    })
    .await;
    row("lockkit acquire + release", &ours, &floor);

    println!("\n8-way contended, one lock name, 8 connections:");
    let url2 = url.clone();
    let ours = contended(args.seconds, move |until| {
        let url = url2.clone();
        async move {
            let lock = lockkit::Locks::new(EtcdLock::connect(&url).await.expect("connect"));
            let opts = LockOptions::new().wait_timeout(Duration::from_secs(30));
            let mut done = 0u64;
            while Instant::now() < until {
                let guard = lock
                    .acquire_with("bench/contended", &opts)
                    .await
                    .expect("acquire");
                guard.release().await.expect("release");
                done += 1;
            }
            done
        }
    })
    .await;
    println!("{:<40} {ours:>10.0} acquisitions/s", "lockkit");
    for (label, per_acquisition) in [
        ("etcd Lock RPC, lease per acquisition", true),
        ("etcd Lock RPC, session lease per task", false),
    ] {
        let url2 = url.clone();
        let rpc = contended(args.seconds, move |until| {
            let url = url2.clone();
            async move {
                let mut client = raw(&url).await;
                let session = match per_acquisition {
                    true => None,
                    false => Some(client.lease_grant(60, None).await.expect("grant").id()),
                };
                let mut done = 0u64;
                while Instant::now() < until {
                    rpc_lock_unlock(&mut client, "lockkit-bench/rpc-contended", session).await;
                    done += 1;
                }
                if let Some(lease) = session {
                    client.lease_revoke(lease).await.expect("revoke");
                }
                done
            }
        })
        .await;
        println!("{label:<40} {rpc:>10.0} acquisitions/s");
    }
}
