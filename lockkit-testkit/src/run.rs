//! The contended run: several clients take and release one lock name in a loop.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockkit_core::{LockOptions, Locks, Result};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use crate::Stats;

/// What a [`contended`] run measured.
#[derive(Debug, Clone)]
pub struct Contended {
    /// From the moment every worker started until the last one stopped.
    pub elapsed: Duration,
    /// Acquisitions of each worker, in worker order.
    pub per_worker: Vec<u64>,
    /// How long acquisitions waited for the lock: from the call to the guard.
    pub wait: Stats,
}

impl Contended {
    /// Acquisitions by all workers together.
    pub fn total(&self) -> u64 {
        self.per_worker.iter().sum()
    }

    /// Acquisitions per second, all workers together.
    pub fn per_second(&self) -> f64 {
        self.total() as f64 / self.elapsed.as_secs_f64()
    }

    /// The fewest acquisitions of a worker divided by the most: 1 when every worker got the
    /// lock equally often, 0 when one never got it.
    pub fn fairness(&self) -> f64 {
        let most = self.per_worker.iter().copied().max().unwrap_or(0);
        let fewest = self.per_worker.iter().copied().min().unwrap_or(0);
        match most {
            0 => 0.0,
            _ => fewest as f64 / most as f64,
        }
    }
}

/// `workers` clients, each from its own call of `connect` (its own connections, as separate
/// processes would have), take and release the lock `name` in a loop for `duration`, all
/// starting together. Each acquisition waits up to 30 s or `duration`, whichever is longer.
/// Stops at the first error of a connect, an acquisition or a release, and returns it.
pub async fn contended<C, Fut>(
    workers: usize,
    duration: Duration,
    name: &str,
    mut connect: C,
) -> Result<Contended>
where
    C: FnMut() -> Fut,
    Fut: Future<Output = Result<Locks>>,
{
    let mut clients = Vec::with_capacity(workers);
    for _ in 0..workers {
        clients.push(connect().await?);
    }
    let opts = LockOptions::new().wait_timeout(duration.max(Duration::from_secs(30)));
    let start = Arc::new(Barrier::new(workers + 1));
    let mut tasks = JoinSet::new();
    for (worker, locks) in clients.into_iter().enumerate() {
        let (name, opts, start) = (name.to_string(), opts.clone(), start.clone());
        tasks.spawn(async move {
            start.wait().await;
            let until = Instant::now() + duration;
            let mut waits = Vec::new();
            while Instant::now() < until {
                let asked = Instant::now();
                let guard = locks.acquire_with(&name, &opts).await?;
                waits.push(asked.elapsed());
                guard.release().await?;
            }
            Ok::<_, lockkit_core::Error>((worker, waits))
        });
    }
    start.wait().await;
    let started = Instant::now();
    let mut per_worker = vec![0; workers];
    let mut waits = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (worker, mine) = match done {
            Ok(result) => result?,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("contended worker: {e}"),
        };
        per_worker[worker] = mine.len() as u64;
        waits.extend(mine);
    }
    Ok(Contended {
        elapsed: started.elapsed(),
        per_worker,
        wait: Stats::of(&waits),
    })
}
