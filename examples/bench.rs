//! Measures lockkit against the floor of each backend: what one take-and-free round costs
//! through the plain client crate on the same server (see `bench/floor.rs`).
//!
//! For every URL: 3 rounds, each timing the floor and then lockkit's uncontended
//! acquire+release (`--iterations` each, after a tenth as many for warm-up); the ratio is the
//! median of the rounds' ratios of mean latencies. Then 8 clients, each with its own
//! connections, take and release one lock name for `--seconds`: acquisitions per second,
//! fairness (the fewest acquisitions of a client divided by the most) and the wait for the
//! lock. One table, the same statistics for every backend.
//!
//! ```text
//! scripts/services up
//! cargo run --release --all-features --example bench                  # every server
//! cargo run --release --all-features --example bench -- \
//!     --url redis://my-host:6379 --url sqlite:///tmp/bench.db --iterations 500 --seconds 2
//! ```
//! Without `--url` it runs every server URL: the `LOCKKIT_*_URL` environment variables and
//! the lines of `target/services.env`, PostgreSQL and MySQL once per strategy.

#[path = "bench/floor.rs"]
mod floor;

use std::time::Duration;

use clap::Parser;
use lockkit::url::ServiceUrl;
use lockkit::{BoxError, LockOptions, Locks};
use lockkit_testkit::{contended, fresh_name, service_urls, time_loop, with_params, Stats};

use floor::Floor;

#[derive(Parser)]
struct Args {
    /// A lockkit URL to measure; repeat for several (default: every LOCKKIT_*_URL of the
    /// environment and target/services.env).
    #[arg(long)]
    url: Vec<String>,
    /// Timed iterations of each uncontended measurement, per round.
    #[arg(long, default_value_t = 1000)]
    iterations: usize,
    /// Seconds of the contended run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

/// Rounds of floor and lockkit measurements, alternating.
const ROUNDS: usize = 3;
/// Clients of the contended run.
const WORKERS: usize = 8;

/// One URL's row of the table.
struct Row {
    floor_what: &'static str,
    floor: Stats,
    ours: Stats,
    ratio: f64,
    per_second: f64,
    fairness: f64,
    wait: Stats,
}

/// `scheme` or `scheme/strategy`, as the table shows a URL.
fn label(url: &str) -> String {
    match ServiceUrl::parse(url) {
        Ok(mut parsed) => match parsed.take("strategy") {
            Some(strategy) => format!("{}/{strategy}", parsed.scheme()),
            None => parsed.scheme().to_string(),
        },
        Err(_) => lockkit::url::redact(url),
    }
}

/// The URLs of `target/services.env`; the SQL servers once per strategy.
fn default_urls() -> Vec<String> {
    let mut urls = Vec::new();
    for (key, url) in service_urls() {
        match key.as_str() {
            "LOCKKIT_POSTGRES_URL" | "LOCKKIT_MYSQL_URL" if !url.contains("strategy=") => {
                urls.push(with_params(&url, "strategy=advisory"));
                urls.push(with_params(&url, "strategy=table"));
            }
            _ => urls.push(url),
        }
    }
    urls
}

/// One uncontended acquire + release through lockkit.
async fn acquire_release(locks: &Locks, name: &str, opts: &LockOptions) -> lockkit::Result<()> {
    locks.acquire_with(name, opts).await?.release().await
}

async fn measure(url: &str, args: &Args) -> Result<Row, BoxError> {
    let locks = lockkit::connect(url).await?;
    let floor = Floor::connect(url).await?;
    let name = fresh_name("lockkit-bench/uncontended");
    let opts = LockOptions::new();
    // One of each first, so a failure is an error and not a panic inside the timing loop.
    floor.round().await?;
    acquire_release(&locks, &name, &opts).await?;

    let (iterations, warmup) = (args.iterations, args.iterations / 10);
    let (mut floor_samples, mut our_samples, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let floor_round = time_loop(iterations, warmup, || async {
            floor.round().await.expect("floor round");
        })
        .await;
        let our_round = time_loop(iterations, warmup, || async {
            acquire_release(&locks, &name, &opts)
                .await
                .expect("acquire + release");
        })
        .await;
        let (f, o) = (Stats::of(&floor_round), Stats::of(&our_round));
        ratios.push(o.mean.as_secs_f64() / f.mean.as_secs_f64());
        floor_samples.extend(floor_round);
        our_samples.extend(our_round);
    }
    ratios.sort_by(f64::total_cmp);

    let run = contended(
        WORKERS,
        Duration::from_secs_f64(args.seconds),
        &fresh_name("lockkit-bench/contended"),
        || lockkit::connect(url),
    )
    .await?;
    Ok(Row {
        floor_what: floor.what(),
        floor: Stats::of(&floor_samples),
        ours: Stats::of(&our_samples),
        ratio: ratios[ratios.len() / 2],
        per_second: run.per_second(),
        fairness: run.fairness(),
        wait: run.wait,
    })
}

/// A duration in milliseconds with two decimals, the table's one unit.
fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let urls = match args.url.is_empty() {
        true => default_urls(),
        false => args.url.clone(),
    };
    println!(
        "{:<18} {:<30} {:>28} {:>28} {:>6} {:>9} {:>5} {:>17}",
        "",
        "floor",
        "floor ms mean/p50/p99",
        "lockkit ms mean/p50/p99",
        "ratio",
        "8-way/s",
        "fair",
        "wait ms p99/max"
    );
    for url in &urls {
        let label = label(url);
        match measure(url, &args).await {
            Ok(row) => println!(
                "{label:<18} {:<30} {:>28} {:>28} {:>5.2}x {:>9.0} {:>5.2} {:>17}",
                row.floor_what,
                format!(
                    "{}/{}/{}",
                    ms(row.floor.mean),
                    ms(row.floor.p50),
                    ms(row.floor.p99)
                ),
                format!(
                    "{}/{}/{}",
                    ms(row.ours.mean),
                    ms(row.ours.p50),
                    ms(row.ours.p99)
                ),
                row.ratio,
                row.per_second,
                row.fairness,
                format!("{}/{}", ms(row.wait.p99), ms(row.wait.max)),
            ),
            Err(e) => println!("{label:<18} failed: {e}"),
        }
    }
}
