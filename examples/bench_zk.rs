//! Measures the ZooKeeper backend against the floor of raw requests on the same server:
//! uncontended acquire+release vs a raw create + delete of an ephemeral node, and 8-way
//! contended throughput.
//!
//! ```text
//! scripts/services up zk
//! cargo run --release --features zk --example bench_zk
//! cargo run --release --features zk --example bench_zk -- --url zk://my-host:2181
//! ```
//! Without `--url` it reads `target/services.env`.

#[path = "common/mod.rs"]
mod common;

use std::time::Instant;

use clap::Parser;
use lockkit::zk::zookeeper_client as zk;
use lockkit::ZkLock;

#[derive(Parser)]
struct Args {
    /// ZooKeeper URL (default: LOCKKIT_ZK_URL of target/services.env).
    #[arg(long)]
    url: Option<String>,
    /// Timed iterations per measurement.
    #[arg(long, default_value_t = 2000)]
    iterations: usize,
    /// Seconds of the contended run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

/// Raw create + delete of an ephemeral node: the least a ZooKeeper lock can cost.
async fn floor(url: &str, iterations: usize) -> common::Stats {
    let cluster = url.split_once("://").map_or(url, |(_, rest)| rest);
    let cluster = cluster.split('?').next().unwrap_or_default();
    let client = zk::Client::connect(cluster).await.expect("connect");
    let mode = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
    let path = format!("/lockkit-bench-floor-{}", std::process::id());
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations + iterations / 10 {
        let started = Instant::now();
        client.create(&path, b"", &mode).await.expect("create");
        client.delete(&path, None).await.expect("delete");
        if i >= iterations / 10 {
            samples.push(started.elapsed());
        }
    }
    common::stats(samples)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let url = args
        .url
        .or_else(|| common::from_env_file("LOCKKIT_ZK_URL"))
        .expect("--url or target/services.env (scripts/services up zk)");
    println!(
        "{:<6} {:<34} {:>10} {:>10} {:>10} {:>8}",
        "backend", "measurement", "mean", "p50", "p99", "ratio"
    );
    let lock = lockkit::Locks::new(ZkLock::connect(&url).await.expect("connect"));
    let floor = floor(&url, args.iterations).await;
    let ours = common::uncontended(&lock, args.iterations).await;
    let ratio = ours.mean.as_secs_f64() / floor.mean.as_secs_f64();
    for (what, s, r) in [
        ("floor: create + delete ephemeral", &floor, String::new()),
        ("acquire + release", &ours, format!("{ratio:.2}x")),
    ] {
        println!(
            "{:<6} {what:<34} {:>10.1?} {:>10.1?} {:>10.1?} {r:>8}",
            "zk", s.mean, s.p50, s.p99
        );
    }
    let throughput = common::contended(&url, args.seconds).await;
    println!(
        "{:<6} {:<34} {throughput:>10.0} ops/s",
        "zk", "8-way contended"
    );
}
