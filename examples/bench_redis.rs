//! Measures the Redis backend against the floor of raw commands on the same server:
//! uncontended acquire+release vs a raw `SET NX PX` + `DEL`, and 8-way contended throughput,
//! for a single instance and for RedLock.
//!
//! ```text
//! scripts/services up redis
//! cargo run --release --features redis --example bench_redis
//! cargo run --release --features redis --example bench_redis -- --url redis://my-host:6379
//! ```
//! Without `--url` it reads `target/services.env`.

#[path = "common/mod.rs"]
mod common;

use std::time::Instant;

use clap::Parser;
use futures_util::future::join_all;
use lockkit::RedisLock;

#[derive(Parser)]
struct Args {
    /// Single-instance Redis URL (default: LOCKKIT_REDIS_URL of target/services.env).
    #[arg(long)]
    url: Option<String>,
    /// RedLock URL (default: LOCKKIT_REDLOCK_URL of target/services.env).
    #[arg(long)]
    redlock_url: Option<String>,
    /// Timed iterations per measurement.
    #[arg(long, default_value_t = 2000)]
    iterations: usize,
    /// Seconds of the contended run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

/// Raw `SET NX PX` + `DEL` on every instance of `url` (one after the other per instance,
/// instances in parallel), the least a correct lock can cost.
async fn floor(urls: &[String], iterations: usize) -> common::Stats {
    let mut conns = Vec::new();
    for url in urls {
        let client = redis::Client::open(url.as_str()).expect("redis URL");
        conns.push(client.get_connection_manager().await.expect("connect"));
    }
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations + iterations / 10 {
        let started = Instant::now();
        join_all(conns.iter().map(|conn| {
            let mut conn = conn.clone();
            async move {
                let _: Option<String> = redis::cmd("SET")
                    .arg("lockkit-bench:floor")
                    .arg("owner")
                    .arg("NX")
                    .arg("PX")
                    .arg(30_000)
                    .query_async(&mut conn)
                    .await
                    .expect("SET");
                let _: i64 = redis::cmd("DEL")
                    .arg("lockkit-bench:floor")
                    .query_async(&mut conn)
                    .await
                    .expect("DEL");
            }
        }))
        .await;
        if i >= iterations / 10 {
            samples.push(started.elapsed());
        }
    }
    common::stats(samples)
}

fn instance_urls(url: &str) -> Vec<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let hosts = rest.split(['/', '?']).next().unwrap_or_default();
    hosts.split(',').map(|h| format!("redis://{h}")).collect()
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let single = args
        .url
        .or_else(|| common::from_env_file("LOCKKIT_REDIS_URL"))
        .expect("--url or target/services.env (scripts/services up redis)");
    let redlock = args
        .redlock_url
        .or_else(|| common::from_env_file("LOCKKIT_REDLOCK_URL"));
    println!(
        "{:<10} {:<28} {:>10} {:>10} {:>10} {:>8}",
        "backend", "measurement", "mean", "p50", "p99", "ratio"
    );
    let mut configs = vec![("redis", single)];
    configs.extend(redlock.map(|u| ("redlock", u)));
    for (label, url) in configs {
        let lock = lockkit::Locks::new(RedisLock::connect(&url).await.expect("connect"));
        let floor = floor(&instance_urls(&url), args.iterations).await;
        let ours = common::uncontended(&lock, args.iterations).await;
        let ratio = ours.mean.as_secs_f64() / floor.mean.as_secs_f64();
        for (what, s, r) in [
            ("floor: SET NX PX + DEL", &floor, String::new()),
            ("acquire + release", &ours, format!("{ratio:.2}x")),
        ] {
            println!(
                "{label:<10} {what:<28} {:>10.1?} {:>10.1?} {:>10.1?} {r:>8}",
                s.mean, s.p50, s.p99
            );
        }
        let throughput = common::contended(&url, args.seconds).await;
        println!(
            "{label:<10} {:<28} {throughput:>10.0} ops/s",
            "8-way contended"
        );
    }
}
