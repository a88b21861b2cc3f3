//! Latency statistics and the warm-up and timing loop every benchmark runs (lockkit's tests
//! use them too, through lockkit-testkit).

use std::future::Future;
use std::time::{Duration, Instant};

/// Mean, median, 99th percentile and maximum of some latencies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// The arithmetic mean.
    pub mean: Duration,
    /// The median (nearest rank).
    pub p50: Duration,
    /// The 99th percentile (nearest rank).
    pub p99: Duration,
    /// The largest sample.
    pub max: Duration,
}

impl Stats {
    /// The statistics of `samples`, in any order; all zero when there are none.
    pub fn of(samples: &[Duration]) -> Stats {
        if samples.is_empty() {
            return Stats::default();
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let rank = |q: f64| {
            let rank = (sorted.len() as f64 * q).ceil() as usize;
            sorted[rank.clamp(1, sorted.len()) - 1]
        };
        let total: Duration = sorted.iter().sum();
        Stats {
            mean: total / sorted.len() as u32,
            p50: rank(0.50),
            p99: rank(0.99),
            max: sorted[sorted.len() - 1],
        }
    }
}

/// Runs `op` `warmup` times untimed, then `iterations` times timed, one after the other;
/// returns the timed runs' latencies in order (see [`Stats::of`]).
pub async fn time_loop<F, Fut>(iterations: usize, warmup: usize, mut op: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let never = try_time_loop(iterations, warmup, || {
        let run = op();
        async move {
            run.await;
            Ok::<(), std::convert::Infallible>(())
        }
    });
    match never.await {
        Ok(samples) => samples,
    }
}

/// [`time_loop`] for an operation that can fail: stops at its first error and returns it.
pub async fn try_time_loop<F, Fut, E>(
    iterations: usize,
    warmup: usize,
    mut op: F,
) -> Result<Vec<Duration>, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    for _ in 0..warmup {
        op().await?;
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        op().await?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

/// The median of `values` (the upper one of the middle two for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

impl Stats {
    /// The statistics in milliseconds, as JSON: `mean_ms`, `p50_ms`, `p99_ms`, `max_ms`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "mean_ms": ms(self.mean),
            "p50_ms": ms(self.p50),
            "p99_ms": ms(self.p99),
            "max_ms": ms(self.max),
        })
    }
}

/// A duration in milliseconds (fractional).
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let stats = Stats::of(&samples);
        assert_eq!(stats.p50, Duration::from_millis(50));
        assert_eq!(stats.p99, Duration::from_millis(99));
        assert_eq!(stats.max, Duration::from_millis(100));
        assert_eq!(stats.mean, Duration::from_micros(50_500));
        assert_eq!(Stats::of(&[]), Stats::default());
        let one = Stats::of(&[Duration::from_millis(7)]);
        assert_eq!((one.p50, one.p99), (one.max, one.max));
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[]), 0.0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_warm_up_is_not_timed() {
        let mut runs = 0;
        let samples = time_loop(5, 3, || {
            runs += 1;
            async {}
        })
        .await;
        assert_eq!((runs, samples.len()), (8, 5));
    }
}
