//! Issue 14 for the key-value backends (etcd, Consul): one run that prints lockkit's ratios
//! against the fenced floor (the plain client's two round trips, see `bench/floor.rs`) and
//! against the plain client's own lock (etcd-client's Lock RPC, rs-consul's lock), the
//! contended rate with fairness and waits, and what holding many locks in one process costs.
//!
//! ```text
//! cargo run --release --all-features --example perf_kv                 # etcd and Consul
//! cargo run --release --all-features --example perf_kv -- --url etcd://127.0.0.1:2379 \
//!     --iterations 500 --seconds 10 --guards 10000 --hold 20
//! ```
//!
//! Uncontended: 3 rounds, each timing the floor, lockkit and the peer one after the other
//! (`--iterations` each after a tenth as many for warm-up); ratios are the medians of the
//! rounds' ratios of mean latencies. Contended: 8 clients (each with its own connections) on
//! one name, each holding the lock 1 ms, for `--seconds`: acquisitions per second, fairness
//! (fewest ÷ most acquisitions of a client), median and largest wait. Scale: one client
//! takes `--guards` names (TTL 10 s, renewed), holds them `--hold` seconds, and releases
//! them: time to take, CPU share of this process while holding, resident memory per guard,
//! guards still held at the end, releases that failed.

#[path = "bench/floor.rs"]
mod floor;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::stream::{self, StreamExt};
use lockkit::consul::rs_consul;
use lockkit::etcd::etcd_client;
use lockkit::url::ServiceUrl;
use lockkit::{BoxError, LockOptions, Locks};
use lockkit_testkit::{fresh_name, hosts, service_urls, time_loop, Stats};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use floor::Floor;

#[derive(Parser)]
struct Args {
    /// An etcd:// or consul:// URL to measure; repeat for both (default: the etcd and
    /// Consul URLs of the environment and target/services.env).
    #[arg(long)]
    url: Vec<String>,
    /// Timed iterations of each uncontended measurement, per round.
    #[arg(long, default_value_t = 500)]
    iterations: usize,
    /// Seconds of each contended run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Guards of the scale run (0: skip it).
    #[arg(long, default_value_t = 10_000)]
    guards: usize,
    /// Seconds the scale run holds its guards.
    #[arg(long, default_value_t = 20.0)]
    hold: f64,
}

const ROUNDS: usize = 3;
const WORKERS: usize = 8;
const HOLD: Duration = Duration::from_millis(1);

/// The plain client's own lock, the peer lockkit is compared with.
enum Peer {
    /// etcd's Lock RPC, on a lease granted once per client (an hour, not kept alive).
    Etcd(etcd_client::Client, i64),
    /// rs-consul's `get_lock` (a session per acquisition) and a blocking query to wait.
    Consul(Box<rs_consul::Consul>),
}

impl Peer {
    async fn connect(url: &str) -> Result<Peer, BoxError> {
        let parsed = ServiceUrl::parse(url)?;
        match parsed.scheme() {
            "etcd" => {
                let mut client = etcd_client::Client::connect(hosts(url), None).await?;
                // Long enough for the whole run: nothing keeps it alive.
                let lease = client.lease_grant(3600, None).await?.id();
                Ok(Peer::Etcd(client, lease))
            }
            "consul" => {
                let host = parsed.expect_hosts()?[0].with_default_port(8500);
                let config = rs_consul::Config {
                    address: format!("http://{host}"),
                    token: None,
                    ..rs_consul::Config::default()
                };
                Ok(Peer::Consul(Box::new(rs_consul::Consul::new(config))))
            }
            other => Err(format!("no peer for {other}").into()),
        }
    }

    fn what(&self) -> &'static str {
        match self {
            Peer::Etcd(..) => "etcd-client Lock RPC",
            Peer::Consul(_) => "rs-consul lock",
        }
    }

    /// Takes the lock `name` (waiting), holds it `hold`, releases it; returns the wait.
    async fn round(&self, name: &str, hold: Duration) -> Result<Duration, BoxError> {
        let asked = Instant::now();
        match self {
            Peer::Etcd(client, lease) => {
                let mut client = client.clone();
                let options = etcd_client::LockOptions::new().with_lease(*lease);
                let key = client.lock(name, Some(options)).await?.key().to_vec();
                let waited = asked.elapsed();
                tokio::time::sleep(hold).await;
                client.unlock(key).await?;
                Ok(waited)
            }
            Peer::Consul(consul) => {
                let key = format!("lockkit-peer/{name}");
                loop {
                    let request = rs_consul::types::LockRequest {
                        key: &key,
                        lock_delay: Duration::ZERO,
                        ..Default::default()
                    };
                    match consul.get_lock(request, b"").await {
                        Ok(lock) => {
                            let waited = asked.elapsed();
                            tokio::time::sleep(hold).await;
                            let release = rs_consul::types::CreateOrUpdateKeyRequest {
                                key: &key,
                                release: &lock.session_id,
                                ..Default::default()
                            };
                            consul.create_or_update_key(release, Vec::new()).await?;
                            // Its Drop releases again with a blocking call: released above.
                            std::mem::forget(lock);
                            return Ok(waited);
                        }
                        Err(rs_consul::ConsulError::LockAcquisitionFailure(index)) => {
                            let watch = rs_consul::types::LockWatchRequest {
                                key: &key,
                                index: Some(index),
                                wait: Duration::from_secs(5),
                                ..Default::default()
                            };
                            let _ = consul.watch_lock(watch).await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
    }
}

/// One uncontended acquire + release through lockkit.
async fn acquire_release(locks: &Locks, name: &str, opts: &LockOptions) -> lockkit::Result<()> {
    locks.acquire_with(name, opts).await?.release().await
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// What a contended run measured.
struct Run {
    per_second: f64,
    fairness: f64,
    wait: Stats,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>7.1}/s  fairness {:.2}  wait median {:>7.2} ms  max {:>8.2} ms",
            self.per_second,
            self.fairness,
            ms(self.wait.p50),
            ms(self.wait.max)
        )
    }
}

/// `WORKERS` tasks, each with its own client from `connect`, take the lock `name` in turn,
/// each holding it `HOLD`, for `seconds`.
async fn contended<C, F, Fut>(seconds: f64, connect: C, take: F) -> Result<Run, BoxError>
where
    C: AsyncFn() -> Result<Arc<dyn std::any::Any + Send + Sync>, BoxError>,
    F: Fn(Arc<dyn std::any::Any + Send + Sync>) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<Duration, BoxError>> + Send,
{
    let mut clients = Vec::new();
    for _ in 0..WORKERS {
        clients.push(connect().await?);
    }
    let start = Arc::new(Barrier::new(WORKERS + 1));
    let duration = Duration::from_secs_f64(seconds);
    let mut tasks = JoinSet::new();
    for (worker, client) in clients.into_iter().enumerate() {
        let (start, take) = (start.clone(), take.clone());
        tasks.spawn(async move {
            start.wait().await;
            let until = Instant::now() + duration;
            let mut waits = Vec::new();
            while Instant::now() < until {
                waits.push(take(client.clone()).await?);
            }
            Ok::<_, BoxError>((worker, waits))
        });
    }
    start.wait().await;
    let started = Instant::now();
    let (mut counts, mut waits) = (vec![0u64; WORKERS], Vec::new());
    while let Some(done) = tasks.join_next().await {
        let (worker, mine) = done??;
        counts[worker] = mine.len() as u64;
        waits.extend(mine);
    }
    let (most, fewest) = (
        counts.iter().copied().max().unwrap_or(0),
        counts.iter().copied().min().unwrap_or(0),
    );
    Ok(Run {
        per_second: counts.iter().sum::<u64>() as f64 / started.elapsed().as_secs_f64(),
        fairness: if most == 0 {
            0.0
        } else {
            fewest as f64 / most as f64
        },
        wait: Stats::of(&waits),
    })
}

/// This process's CPU time so far (user + system), from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// This process's resident memory in KiB, from `/proc/self/status`.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One client takes `count` names, holds them `hold`, and releases them.
async fn scale(url: &str, count: usize, hold: f64) -> Result<String, BoxError> {
    let locks = lockkit::connect(url).await?;
    let opts = LockOptions::new().ttl(Duration::from_secs(10));
    let base = fresh_name("lockkit-perf-kv/scale");
    let rss_before = rss_kib();
    let started = Instant::now();
    let taken: Vec<_> = stream::iter(0..count)
        .map(|i| {
            let (locks, opts, name) = (locks.clone(), opts.clone(), format!("{base}/{i}"));
            async move { locks.acquire_with(&name, &opts).await }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let took = started.elapsed();
    let failed_acquires = taken.iter().filter(|t| t.is_err()).count();
    let guards: Vec<_> = taken.into_iter().filter_map(|t| t.ok()).collect();
    // Let the acquisition burst settle before measuring the steady state.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (cpu_before, wall) = (cpu_time(), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(hold)).await;
    let cpu = (cpu_time() - cpu_before).as_secs_f64() / wall.elapsed().as_secs_f64();
    let per_guard = (rss_kib().saturating_sub(rss_before)) as f64 / guards.len().max(1) as f64;
    let held = guards.iter().filter(|g| g.is_held()).count();
    let released: Vec<_> = stream::iter(guards)
        .map(|guard| guard.release())
        .buffer_unordered(64)
        .collect()
        .await;
    let failed_releases = released.iter().filter(|r| r.is_err()).count();
    Ok(format!(
        "{count} guards: taken in {:.1} s ({failed_acquires} failed), CPU {:.1} % of a core while \
         holding, {per_guard:.1} KiB per guard, {held} still held after {hold} s, \
         {failed_releases} releases failed",
        took.as_secs_f64(),
        cpu * 100.0
    ))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn measure(url: &str, args: &Args) -> Result<(), BoxError> {
    let label = ServiceUrl::parse(url)?.scheme().to_string();
    let locks = lockkit::connect(url).await?;
    let floor = Floor::connect(url).await?;
    let peer = Peer::connect(url).await?;
    let name = fresh_name("lockkit-perf-kv/uncontended");
    let peer_name = fresh_name("lockkit-perf-kv/peer");
    let opts = LockOptions::new();
    floor.round().await?;
    acquire_release(&locks, &name, &opts).await?;
    peer.round(&peer_name, Duration::ZERO).await?;

    let (iterations, warmup) = (args.iterations, args.iterations / 10);
    let (mut to_floor, mut to_peer) = (Vec::new(), Vec::new());
    let (mut floors, mut ours, mut peers) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let f = time_loop(iterations, warmup, || async {
            floor.round().await.expect("floor round");
        })
        .await;
        let o = time_loop(iterations, warmup, || async {
            acquire_release(&locks, &name, &opts)
                .await
                .expect("acquire + release");
        })
        .await;
        let p = time_loop(iterations, warmup, || async {
            peer.round(&peer_name, Duration::ZERO).await.expect("peer");
        })
        .await;
        let (fs, os, ps) = (Stats::of(&f), Stats::of(&o), Stats::of(&p));
        to_floor.push(os.mean.as_secs_f64() / fs.mean.as_secs_f64());
        to_peer.push(os.mean.as_secs_f64() / ps.mean.as_secs_f64());
        floors.extend(f);
        ours.extend(o);
        peers.extend(p);
    }
    let (fs, os, ps) = (Stats::of(&floors), Stats::of(&ours), Stats::of(&peers));
    println!("== {label}");
    println!(
        "uncontended: floor ({}) {:.3} ms, lockkit {:.3} ms, {} {:.3} ms (means)",
        floor.what(),
        ms(fs.mean),
        ms(os.mean),
        peer.what(),
        ms(ps.mean)
    );
    println!(
        "  lockkit ÷ floor {:.2}×, lockkit ÷ peer {:.2}×",
        median(to_floor),
        median(to_peer)
    );

    let seconds = args.seconds;
    let lock_name = fresh_name("lockkit-perf-kv/contended");
    let ours = contended(
        seconds,
        async || Ok(Arc::new(lockkit::connect(url).await?) as Arc<_>),
        move |client| {
            let name = lock_name.clone();
            async move {
                let locks = client.downcast_ref::<Locks>().expect("a Locks");
                let opts = LockOptions::new().wait_timeout(Duration::from_secs(60));
                let asked = Instant::now();
                let guard = locks.acquire_with(&name, &opts).await?;
                let waited = asked.elapsed();
                tokio::time::sleep(HOLD).await;
                guard.release().await?;
                Ok(waited)
            }
        },
    )
    .await?;
    let peer_lock = fresh_name("lockkit-perf-kv/peer-contended");
    let theirs = contended(
        seconds,
        async || Ok(Arc::new(Peer::connect(url).await?) as Arc<_>),
        move |client| {
            let name = peer_lock.clone();
            async move {
                let peer = client.downcast_ref::<Peer>().expect("a Peer");
                peer.round(&name, HOLD).await
            }
        },
    )
    .await?;
    println!("contended ({WORKERS} clients, hold 1 ms, {seconds} s):");
    println!("  lockkit {ours}");
    println!("  {:<7} {theirs}", "peer");
    println!(
        "  lockkit ÷ peer {:.2}×",
        ours.per_second / theirs.per_second.max(f64::MIN_POSITIVE)
    );
    if args.guards > 0 {
        println!("scale: {}", scale(url, args.guards, args.hold).await?);
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let urls = match args.url.is_empty() {
        true => service_urls()
            .into_iter()
            .filter(|(key, _)| key == "LOCKKIT_ETCD_URL" || key == "LOCKKIT_CONSUL_URL")
            .map(|(_, url)| url)
            .collect(),
        false => args.url.clone(),
    };
    for url in &urls {
        if let Err(e) = measure(url, &args).await {
            eprintln!("{}: {e}", lockkit::url::redact(url));
            std::process::exit(1);
        }
    }
}
