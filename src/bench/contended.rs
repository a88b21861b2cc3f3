//! The contended run: several clients take one lock name in a loop, hold it a moment and
//! release it, while the run checks that no two of them ever hold it at once.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockkit_core::{LockOptions, Locks, Result};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use super::Stats;

/// What a [`contended`] run measured.
#[derive(Debug, Clone)]
pub struct Contended {
    /// From the moment every worker started until the last one stopped.
    pub elapsed: Duration,
    /// Acquisitions of each worker, in worker order.
    pub per_worker: Vec<u64>,
    /// How long acquisitions waited for the lock: from the call to the guard.
    pub wait: Stats,
    /// Hand-off latency: from a holder's call to release until the next acquisition returns.
    pub handoff: Stats,
    /// Mutual-exclusion violations seen: an acquisition while another worker held the lock,
    /// or (where the backend fences) a token not above the previous holder's. Must be empty.
    pub violations: Vec<String>,
}

impl Contended {
    /// Acquisitions by all workers together.
    pub fn total(&self) -> u64 {
        self.per_worker.iter().sum()
    }

    /// Acquisitions per second, all workers together.
    pub fn per_second(&self) -> f64 {
        self.total() as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
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

/// What every worker of one run sees: who holds the lock, the last token, the last release.
#[derive(Default)]
struct Shared {
    holders: AtomicUsize,
    fenced: AtomicBool,
    last_token: AtomicU64,
    released_at: Mutex<Option<Instant>>,
    violations: Mutex<Vec<String>>,
}

impl Shared {
    fn violation(&self, what: String) {
        self.violations.lock().expect("not poisoned").push(what);
    }
}

/// `workers` clients, each from its own call of `connect` (its own connections, as separate
/// processes would have), take the lock `name`, hold it for `hold` and release it, in a loop
/// for `duration`, all starting together. Each acquisition waits up to 30 s or `duration`,
/// whichever is longer. Stops at the first error of a connect, an acquisition or a release,
/// and returns it; exclusion violations do not stop the run, they are counted.
pub async fn contended<C, Fut>(
    workers: usize,
    duration: Duration,
    hold: Duration,
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
    let shared = Arc::new(Shared::default());
    if let Some(first) = clients.first() {
        shared
            .fenced
            .store(first.capabilities().fencing, Ordering::Relaxed);
    }
    let opts = LockOptions::new().wait_timeout(duration.max(Duration::from_secs(30)));
    let start = Arc::new(Barrier::new(workers + 1));
    let mut tasks = JoinSet::new();
    for (worker, locks) in clients.into_iter().enumerate() {
        let (name, opts, start) = (name.to_string(), opts.clone(), start.clone());
        let shared = shared.clone();
        tasks.spawn(async move {
            start.wait().await;
            let until = Instant::now() + duration;
            let (mut waits, mut handoffs) = (Vec::new(), Vec::new());
            while Instant::now() < until {
                let asked = Instant::now();
                let guard = locks.acquire_with(&name, &opts).await?;
                let now = Instant::now();
                waits.push(now - asked);
                if shared.holders.fetch_add(1, Ordering::SeqCst) != 0 {
                    shared.violation(format!("worker {worker} acquired while another held it"));
                }
                let token = guard.fencing_token().get();
                let last = shared.last_token.swap(token, Ordering::SeqCst);
                if shared.fenced.load(Ordering::Relaxed) && token <= last {
                    shared.violation(format!("token {token} after token {last}"));
                }
                if let Some(released) = shared.released_at.lock().expect("not poisoned").take() {
                    handoffs.push(now.saturating_duration_since(released));
                }
                if !hold.is_zero() {
                    tokio::time::sleep(hold).await;
                }
                // Counted out before the release: the next holder may get it before this
                // call returns.
                shared.holders.fetch_sub(1, Ordering::SeqCst);
                *shared.released_at.lock().expect("not poisoned") = Some(Instant::now());
                guard.release().await?;
            }
            Ok::<_, lockkit_core::Error>((worker, waits, handoffs))
        });
    }
    start.wait().await;
    let started = Instant::now();
    let mut per_worker = vec![0; workers];
    let (mut waits, mut handoffs) = (Vec::new(), Vec::new());
    while let Some(done) = tasks.join_next().await {
        let (worker, mine, handed) = match done {
            Ok(result) => result?,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("contended worker: {e}"),
        };
        per_worker[worker] = mine.len() as u64;
        waits.extend(mine);
        handoffs.extend(handed);
    }
    let violations = std::mem::take(&mut *shared.violations.lock().expect("not poisoned"));
    Ok(Contended {
        elapsed: started.elapsed(),
        per_worker,
        wait: Stats::of(&waits),
        handoff: Stats::of(&handoffs),
        violations,
    })
}
