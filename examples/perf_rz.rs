//! Redis, RedLock and ZooKeeper against their floors and peers, in one interleaved run
//! (issue 14): uncontended ratios, contended rate/fairness/max wait with a 1 ms hold, and a
//! 10 000-guard scale run with CPU % and KiB per guard read from `/proc/self`.
//!
//! ```text
//! cargo run --release --features redis,zk --example perf_rz -- --seconds 10
//! cargo run --release --features redis,zk --example perf_rz -- --only scale-redis
//! ```
//! The URLs come from `target/services.env` (`LOCKKIT_REDIS_URL`, `LOCKKIT_REDLOCK_URL`,
//! `LOCKKIT_ZK_URL`). Peers written here in a few lines each, through the plain clients:
//! a `SET NX PX` lock that polls every 10 ms (jittered) and releases by compare-and-delete
//! (naive: no token), a `BLPOP` lock (one token in a list), and zookeeper-client's own lock
//! recipe.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use lockkit::zk::zookeeper_client as zk;
use lockkit::{BoxError, LockOptions, Locks};
use lockkit_testkit::{fresh_name, service_url, time_loop, Stats};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

#[derive(Parser)]
struct Args {
    /// Timed acquire+release cycles per round and side.
    #[arg(long, default_value_t = 500)]
    iterations: usize,
    /// Seconds of each contended run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Guards of the scale run.
    #[arg(long, default_value_t = 10_000)]
    guards: usize,
    /// Seconds the scale run holds them.
    #[arg(long, default_value_t = 20.0)]
    hold: f64,
    /// Run only these parts: redis, redlock, zk, scale-redis, scale-zk (repeatable).
    #[arg(long)]
    only: Vec<String>,
}

const ROUNDS: usize = 3;
const WORKERS: usize = 8;
const HOLD: Duration = Duration::from_millis(1);

/// One lock implementation for the contended run: acquire, then release.
trait Contender: Send + Sync + 'static {
    fn cycle(&self, name: &str) -> impl Future<Output = Result<(), BoxError>> + Send;
}

struct Lockkit(Locks, LockOptions);

impl Contender for Lockkit {
    async fn cycle(&self, name: &str) -> Result<(), BoxError> {
        let guard = self.0.acquire_with(name, &self.1).await?;
        tokio::time::sleep(HOLD).await;
        guard.release().await?;
        Ok(())
    }
}

static OWNERS: AtomicU64 = AtomicU64::new(0);

/// A pseudo-random number below `below` (from the clock: good enough for a retry jitter).
fn jitter(below: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    u64::from(nanos.wrapping_mul(2_654_435_761)) % below
}

/// `SET NX PX` polling every ~10 ms, released by compare-and-delete: no token, no queue.
struct SetNxPoll(redis::aio::MultiplexedConnection);

const CAD: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

impl Contender for SetNxPoll {
    async fn cycle(&self, name: &str) -> Result<(), BoxError> {
        let mut conn = self.0.clone();
        let owner = format!(
            "{}-{}",
            std::process::id(),
            OWNERS.fetch_add(1, Ordering::Relaxed)
        );
        loop {
            let set: Option<String> = redis::cmd("SET")
                .arg(name)
                .arg(&owner)
                .arg("NX")
                .arg("PX")
                .arg(30_000)
                .query_async(&mut conn)
                .await?;
            if set.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_micros(5_000 + jitter(10_000))).await;
        }
        tokio::time::sleep(HOLD).await;
        let _: i64 = redis::Script::new(CAD)
            .key(name)
            .arg(&owner)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }
}

/// A `BLPOP` lock: the list holds one token; take it to hold the lock, push it back to
/// release. Fair (Redis serves blocked clients first come, first served), no expiry.
struct Blpop(redis::aio::MultiplexedConnection);

impl Contender for Blpop {
    async fn cycle(&self, name: &str) -> Result<(), BoxError> {
        let mut conn = self.0.clone();
        loop {
            let got: Option<(String, String)> = redis::cmd("BLPOP")
                .arg(name)
                .arg(1)
                .query_async(&mut conn)
                .await?;
            if got.is_some() {
                break;
            }
        }
        tokio::time::sleep(HOLD).await;
        let _: i64 = redis::cmd("LPUSH")
            .arg(name)
            .arg("t")
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}

/// zookeeper-client's lock recipe (Curator-compatible names).
struct ZkRecipe(zk::Client);

impl Contender for ZkRecipe {
    async fn cycle(&self, name: &str) -> Result<(), BoxError> {
        let prefix = zk::LockPrefix::new_curator(name, "lock-")?;
        let options = zk::LockOptions::new(zk::Acls::anyone_all())
            .with_ancestor_options(zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()))?;
        let lock = self.0.lock(prefix, b"", options).await?;
        tokio::time::sleep(HOLD).await;
        let path = lock.lock_path().to_string();
        std::mem::forget(lock);
        self.0.delete(&path, None).await?;
        Ok(())
    }
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
            "{:7.0}/s fairness {:.2} wait p50 {:6.2} ms p99 {:7.2} ms max {:7.2} ms",
            self.per_second,
            self.fairness,
            self.wait.p50.as_secs_f64() * 1e3,
            self.wait.p99.as_secs_f64() * 1e3,
            self.wait.max.as_secs_f64() * 1e3,
        )
    }
}

async fn contend<C: Contender>(clients: Vec<C>, name: &str, seconds: f64) -> Result<Run, BoxError> {
    let start = Arc::new(Barrier::new(clients.len() + 1));
    let duration = Duration::from_secs_f64(seconds);
    let mut tasks = JoinSet::new();
    for (worker, client) in clients.into_iter().enumerate() {
        let (name, start) = (name.to_string(), start.clone());
        tasks.spawn(async move {
            start.wait().await;
            let until = Instant::now() + duration;
            let mut waits = Vec::new();
            while Instant::now() < until {
                let asked = Instant::now();
                client.cycle(&name).await?;
                // The wait is the whole cycle less the hold.
                waits.push(asked.elapsed().saturating_sub(HOLD));
            }
            Ok::<_, BoxError>((worker, waits))
        });
    }
    start.wait().await;
    let started = Instant::now();
    let mut counts = Vec::new();
    let mut waits = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (_, mine) = done??;
        counts.push(mine.len() as u64);
        waits.extend(mine);
    }
    let most = counts.iter().copied().max().unwrap_or(0).max(1);
    let fewest = counts.iter().copied().min().unwrap_or(0);
    Ok(Run {
        per_second: counts.iter().sum::<u64>() as f64 / started.elapsed().as_secs_f64(),
        fairness: fewest as f64 / most as f64,
        wait: Stats::of(&waits),
    })
}

/// Interleaved uncontended rounds: `(name, op)` pairs, the first is the floor. Prints each
/// side's mean and its median ratio to the floor.
type Op<'a> = Box<dyn FnMut() -> std::pin::Pin<Box<dyn Future<Output = ()> + 'a>> + 'a>;

async fn uncontended(label: &str, iterations: usize, sides: &mut [(&str, Op<'_>)]) {
    let mut ratios = vec![Vec::new(); sides.len()];
    let mut means = vec![Vec::new(); sides.len()];
    for _ in 0..ROUNDS {
        let mut floor = 0.0;
        for (i, (_, op)) in sides.iter_mut().enumerate() {
            let samples = time_loop(iterations, iterations / 10, op).await;
            let mean = Stats::of(&samples).mean.as_secs_f64();
            if i == 0 {
                floor = mean;
            }
            ratios[i].push(mean / floor);
            means[i].push(mean);
        }
    }
    for (i, (name, _)) in sides.iter().enumerate() {
        ratios[i].sort_by(f64::total_cmp);
        means[i].sort_by(f64::total_cmp);
        println!(
            "{label:8} uncontended {name:28} {:8.1} µs  {:.2}× floor",
            means[i][ROUNDS / 2] * 1e6,
            ratios[i][ROUNDS / 2]
        );
    }
}

macro_rules! side {
    ($body:expr) => {
        Box::new(move || {
            Box::pin(async move {
                let _ = $body.await.expect("round");
            })
        })
    };
}

async fn redis_conn(url: &str) -> Result<redis::aio::MultiplexedConnection, BoxError> {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

async fn set_del(conn: &redis::aio::MultiplexedConnection, key: &str) -> Result<(), BoxError> {
    let mut conn = conn.clone();
    let _: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg("x")
        .arg("NX")
        .arg("PX")
        .arg(30_000)
        .query_async(&mut conn)
        .await?;
    let _: i64 = redis::cmd("DEL").arg(key).query_async(&mut conn).await?;
    Ok(())
}

async fn lockkit_cycle(locks: &Locks, name: &str) -> Result<(), BoxError> {
    locks.acquire(name).await?.release().await?;
    Ok(())
}

async fn lockkits(url: &str) -> Result<Vec<Lockkit>, BoxError> {
    let mut clients = Vec::new();
    for _ in 0..WORKERS {
        let opts = LockOptions::new().wait_timeout(Duration::from_secs(60));
        clients.push(Lockkit(lockkit::connect(url).await?, opts));
    }
    Ok(clients)
}

async fn redis_part(args: &Args) -> Result<(), BoxError> {
    let url = service_url("LOCKKIT_REDIS_URL");
    let locks = lockkit::connect(&url).await?;
    let conn = redis_conn(&url).await?;
    let key = fresh_name("perf-rz-floor");
    let name = fresh_name("perf-rz-unc");
    let peer = SetNxPoll(conn.clone());
    let (conn_r, key_r, locks_r, name_r, peer_r) =
        (&conn, key.as_str(), &locks, name.as_str(), &peer);
    uncontended(
        "redis",
        args.iterations,
        &mut [
            ("floor SET NX PX + DEL", side!(set_del(conn_r, key_r))),
            ("lockkit", side!(lockkit_cycle(locks_r, name_r))),
            ("peer SET NX + Lua CAD", side!(peer_r.cycle(key_r))),
        ],
    )
    .await;
    let run = contend(
        lockkits(&url).await?,
        &fresh_name("perf-rz-c"),
        args.seconds,
    )
    .await?;
    println!("redis    contended   lockkit                      {run}");
    let mut peers = Vec::new();
    for _ in 0..WORKERS {
        peers.push(SetNxPoll(redis_conn(&url).await?));
    }
    let run = contend(peers, &fresh_name("perf-rz-c"), args.seconds).await?;
    println!("redis    contended   peer SET NX poll 10 ms       {run}");
    let list = fresh_name("perf-rz-blpop");
    let mut peers = Vec::new();
    for _ in 0..WORKERS {
        peers.push(Blpop(redis_conn(&url).await?));
    }
    let mut c = conn.clone();
    let _: i64 = redis::cmd("LPUSH")
        .arg(&list)
        .arg("t")
        .query_async(&mut c)
        .await?;
    let run = contend(peers, &list, args.seconds).await?;
    let _: i64 = redis::cmd("DEL").arg(&list).query_async(&mut c).await?;
    println!("redis    contended   peer BLPOP                   {run}");
    Ok(())
}

async fn redlock_part(args: &Args) -> Result<(), BoxError> {
    let url = service_url("LOCKKIT_REDLOCK_URL");
    let locks = lockkit::connect(&url).await?;
    let mut conns = Vec::new();
    for host in lockkit_testkit::hosts(&url) {
        conns.push(redis_conn(&format!("redis://{host}")).await?);
    }
    let key = fresh_name("perf-rz-floor");
    let name = fresh_name("perf-rz-unc");
    let (conns_r, key_r, locks_r, name_r) = (&conns, key.as_str(), &locks, name.as_str());
    let all =
        move || futures_util::future::try_join_all(conns_r.iter().map(move |c| set_del(c, key_r)));
    uncontended(
        "redlock",
        args.iterations,
        &mut [
            ("floor SET NX PX + DEL on all", side!(all())),
            ("lockkit", side!(lockkit_cycle(locks_r, name_r))),
        ],
    )
    .await;
    let run = contend(
        lockkits(&url).await?,
        &fresh_name("perf-rz-c"),
        args.seconds,
    )
    .await?;
    println!("redlock  contended   lockkit                      {run}");
    Ok(())
}

async fn zk_client(url: &str) -> Result<zk::Client, BoxError> {
    let hosts = lockkit_testkit::hosts(url).join(",");
    Ok(zk::Client::connector()
        .with_session_timeout(Duration::from_secs(30))
        .connect(&hosts)
        .await?)
}

async fn zk_part(args: &Args) -> Result<(), BoxError> {
    let url = service_url("LOCKKIT_ZK_URL");
    let locks = lockkit::connect(&url).await?;
    let client = zk_client(&url).await?;
    let path = format!("/{}", fresh_name("perf-rz-floor").replace('/', "-"));
    let (client_r, path_r) = (&client, path.as_str());
    let floor = move || async move {
        let mode = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
        client_r.create(path_r, b"", &mode).await?;
        client_r.delete(path_r, None).await?;
        Ok::<_, BoxError>(())
    };
    let name = fresh_name("perf-rz-unc");
    let recipe = ZkRecipe(client.clone());
    let dir = format!("/{}", fresh_name("perf-rz-recipe").replace('/', "-"));
    let (locks_r, name_r, recipe_r, dir_r) = (&locks, name.as_str(), &recipe, dir.as_str());
    uncontended(
        "zk",
        args.iterations,
        &mut [
            ("floor create + delete", side!(floor())),
            ("lockkit", side!(lockkit_cycle(locks_r, name_r))),
            ("peer zookeeper-client lock", side!(recipe_r.cycle(dir_r))),
        ],
    )
    .await;
    let run = contend(
        lockkits(&url).await?,
        &fresh_name("perf-rz-c"),
        args.seconds,
    )
    .await?;
    println!("zk       contended   lockkit                      {run}");
    let mut peers = Vec::new();
    for _ in 0..WORKERS {
        peers.push(ZkRecipe(zk_client(&url).await?));
    }
    let dir = format!("/{}", fresh_name("perf-rz-recipe-c").replace('/', "-"));
    let run = contend(peers, &dir, args.seconds).await?;
    println!("zk       contended   peer zookeeper-client lock   {run}");
    Ok(())
}

/// utime + stime of this process, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of the line; after the `)` field 3 is index 0.
    (ticks(11) + ticks(12)) / 100.0
}

/// Resident memory in KiB.
fn rss_kib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

async fn scale(label: &str, key: &str, args: &Args) -> Result<(), BoxError> {
    let url = service_url(key);
    let locks = lockkit::connect(&url).await?;
    let opts = LockOptions::new().ttl(Duration::from_secs(10));
    let prefix = fresh_name("perf-rz-scale");
    let before = rss_kib();
    let taking = Instant::now();
    let mut guards = Vec::with_capacity(args.guards);
    for chunk in (0..args.guards).collect::<Vec<_>>().chunks(200) {
        let batch = futures_util::future::join_all(chunk.iter().map(|i| {
            let (locks, opts, name) = (&locks, &opts, format!("{prefix}/{i}"));
            async move { locks.acquire_with(&name, opts).await }
        }))
        .await;
        for guard in batch {
            guards.push(guard?);
        }
    }
    let took = taking.elapsed();
    let cpu = cpu_seconds();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let cpu = (cpu_seconds() - cpu) / started.elapsed().as_secs_f64();
    let per_guard = (rss_kib() - before) / args.guards as f64;
    let held = guards.iter().filter(|g| g.is_held()).count();
    let releases = futures_util::future::join_all(guards.into_iter().map(|g| g.release())).await;
    let failed = releases.iter().filter(|r| r.is_err()).count();
    println!(
        "{label:8} scale {} guards: took {:.1} s, renewals {:.1} % of a core, {:.2} KiB/guard, {held} held at the end, {failed} releases failed",
        args.guards,
        took.as_secs_f64(),
        cpu * 100.0,
        per_guard,
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let want = |part: &str| {
        if args.only.is_empty() {
            true
        } else {
            args.only.iter().any(|o| o == part)
        }
    };
    if want("redis") {
        redis_part(&args).await?;
    }
    if want("redlock") {
        redlock_part(&args).await?;
    }
    if want("zk") {
        zk_part(&args).await?;
    }
    if want("scale-redis") {
        scale("redis", "LOCKKIT_REDIS_URL", &args).await?;
    }
    if want("scale-zk") {
        scale("zk", "LOCKKIT_ZK_URL", &args).await?;
    }
    Ok(())
}
