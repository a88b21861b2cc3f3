//! What the benchmark examples share: server URLs, latency statistics and the contended run.
// Each example uses the part it needs.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use lockkit::{LockOptions, Locks};

/// The value of `key` in `target/services.env` (written by `scripts/services up`).
pub(crate) fn from_env_file(key: &str) -> Option<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/target/services.env");
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("{key}=")))?;
    Some(line[key.len() + 1..].to_string())
}

/// Mean, median and 99th percentile of some latencies.
pub(crate) struct Stats {
    pub(crate) mean: Duration,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
}

/// The statistics of `samples` (not empty).
pub(crate) fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    Stats {
        mean,
        p50: samples[samples.len() / 2],
        p99: samples[samples.len() * 99 / 100],
    }
}

/// Latencies of an uncontended acquire + release on `lock`, after a tenth as many warm-up
/// rounds.
pub(crate) async fn uncontended(lock: &Locks, iterations: usize) -> Stats {
    let opts = LockOptions::new();
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations + iterations / 10 {
        let started = Instant::now();
        let guard = lock
            .acquire_with("bench/uncontended", &opts)
            .await
            .expect("acquire");
        guard.release().await.expect("release");
        if i >= iterations / 10 {
            samples.push(started.elapsed());
        }
    }
    stats(samples)
}

/// Lock operations per second when 8 clients, each its own connection, take and release one
/// lock name in a loop for `seconds`.
pub(crate) async fn contended(url: &str, seconds: f64) -> f64 {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let lock = lockkit::connect(url).await.expect("connect");
        tasks.spawn(async move {
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
        });
    }
    let mut total = 0;
    while let Some(done) = tasks.join_next().await {
        total += done.expect("task");
    }
    total as f64 / seconds
}
