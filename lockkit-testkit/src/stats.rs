//! Latency statistics and the warm-up and timing loop every benchmark runs.

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
    for _ in 0..warmup {
        op().await;
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        op().await;
        samples.push(started.elapsed());
    }
    samples
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
