//! Measures the PostgreSQL and MySQL/MariaDB backends, per strategy, against the floor of the
//! raw statements on the same server: uncontended acquire+release vs raw lock+unlock
//! (`pg_advisory_lock`/`pg_advisory_unlock`, `GET_LOCK`/`RELEASE_LOCK`, or a lease row's
//! INSERT+DELETE), and 8-way contended throughput.
//!
//! ```text
//! scripts/services up postgres mysql
//! cargo run --release --features postgres,mysql --example bench_sql
//! cargo run --release --features postgres,mysql --example bench_sql -- \
//!     --postgres postgres://u:p@host/db --mysql mysql://u:p@host/db
//! ```

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use clap::Parser;
use lockkit::LockOptions;
use sqlx::{Connection, MySqlConnection, PgConnection};

#[derive(Parser)]
struct Args {
    /// PostgreSQL URL (default: LOCKKIT_POSTGRES_URL of target/services.env).
    #[arg(long)]
    postgres: Option<String>,
    /// MySQL/MariaDB URL (default: LOCKKIT_MYSQL_URL of target/services.env).
    #[arg(long)]
    mysql: Option<String>,
    /// Timed iterations per measurement.
    #[arg(long, default_value_t = 1000)]
    iterations: usize,
    /// Seconds of each contended run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

/// Mean of `iterations` timed runs of `op`, after a tenth as many warm-up runs.
async fn mean<F, Fut>(iterations: usize, mut op: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..iterations / 10 {
        op().await;
    }
    let started = Instant::now();
    for _ in 0..iterations {
        op().await;
    }
    started.elapsed() / iterations as u32
}

async fn floor(url: &str, strategy: &str, iterations: usize) -> Duration {
    let table = strategy == "table";
    if url.starts_with("postgres") {
        let mut conn = PgConnection::connect(url).await.expect("connect");
        sqlx::query("CREATE TABLE IF NOT EXISTS lockkit_bench_floor (name TEXT PRIMARY KEY)")
            .execute(&mut conn)
            .await
            .expect("floor table");
        let conn = &mut conn;
        let (lock, unlock) = match table {
            true => (
                "INSERT INTO lockkit_bench_floor VALUES ('x')",
                "DELETE FROM lockkit_bench_floor WHERE name = 'x'",
            ),
            false => (
                "SELECT pg_advisory_lock(42)::text",
                "SELECT pg_advisory_unlock(42)::text",
            ),
        };
        let mut run = 0;
        let mut total = Duration::ZERO;
        for i in 0..iterations + iterations / 10 {
            let started = Instant::now();
            sqlx::query(lock).execute(&mut *conn).await.expect("lock");
            sqlx::query(unlock)
                .execute(&mut *conn)
                .await
                .expect("unlock");
            if i >= iterations / 10 {
                total += started.elapsed();
                run += 1;
            }
        }
        total / run
    } else {
        let mut conn = MySqlConnection::connect(url).await.expect("connect");
        sqlx::query("CREATE TABLE IF NOT EXISTS lockkit_bench_floor (name VARCHAR(8) PRIMARY KEY)")
            .execute(&mut conn)
            .await
            .expect("floor table");
        let (lock, unlock) = match table {
            true => (
                "INSERT INTO lockkit_bench_floor VALUES ('x')",
                "DELETE FROM lockkit_bench_floor WHERE name = 'x'",
            ),
            false => (
                "SELECT GET_LOCK('lockkit_bench', 10)",
                "SELECT RELEASE_LOCK('lockkit_bench')",
            ),
        };
        let mut run = 0;
        let mut total = Duration::ZERO;
        for i in 0..iterations + iterations / 10 {
            let started = Instant::now();
            sqlx::query(lock).execute(&mut conn).await.expect("lock");
            sqlx::query(unlock)
                .execute(&mut conn)
                .await
                .expect("unlock");
            if i >= iterations / 10 {
                total += started.elapsed();
                run += 1;
            }
        }
        total / run
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let pg = args
        .postgres
        .or_else(|| common::from_env_file("LOCKKIT_POSTGRES_URL"));
    let my = args
        .mysql
        .or_else(|| common::from_env_file("LOCKKIT_MYSQL_URL"));
    println!(
        "{:<10} {:<9} {:>12} {:>12} {:>7} {:>14}",
        "database", "strategy", "floor", "ours", "ratio", "8-way ops/s"
    );
    for (db, url) in [("postgres", pg), ("mysql", my)] {
        let Some(url) = url else { continue };
        for strategy in ["advisory", "table"] {
            let with_strategy = format!("{url}?strategy={strategy}");
            let lock = lockkit::connect(&with_strategy).await.expect("connect");
            let floor = floor(&url, strategy, args.iterations).await;
            let opts = LockOptions::new();
            let ours = mean(args.iterations, || async {
                let guard = lock
                    .acquire_with("bench/uncontended", &opts)
                    .await
                    .expect("acquire");
                guard.release().await.expect("release");
            })
            .await;
            let ratio = ours.as_secs_f64() / floor.as_secs_f64();
            let throughput = common::contended(&with_strategy, args.seconds).await;
            println!(
                "{db:<10} {strategy:<9} {:>12.1?} {:>12.1?} {:>6.2}x {throughput:>14.0}",
                floor, ours, ratio
            );
        }
    }
}
