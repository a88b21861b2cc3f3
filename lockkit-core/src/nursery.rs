//! Keepers started late: one task per runtime that starts the keeper of a guard still held a
//! short while after its acquisition, for leases whose backend never signals loss.
//!
//! Such a lease's keeper has nothing to do before its first renewal or the end of its lease;
//! most locks are released well before either. Started at once, every acquisition would wake
//! a worker for a task that usually only starts and stops: on a loaded machine the wake-ups
//! of threads cost more than the rest of the client's work. Here a guard is queued instead
//! (a lock, a push); the nursery wakes at most once per [`BATCH`], and starts the keepers of
//! the guards queued at least [`DELAY`] before that are still waiting (not released, not
//! dropped: a drop starts its keeper itself, to release at once).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::Instrument;

use crate::backend::Lease;

/// How long a guard waits for its keeper at least.
pub(crate) const DELAY: Duration = Duration::from_millis(20);

/// The nursery's wake-ups are this far apart at least: a keeper starts at most
/// `DELAY + BATCH` after its guard's acquisition.
pub(crate) const BATCH: Duration = Duration::from_millis(10);

/// The latest a queued keeper starts, after its guard's acquisition (with room for a
/// runtime that is slow to run the nursery): a guard is only queued if its keeper's first
/// duty is later than this.
pub(crate) const LATEST: Duration = Duration::from_millis(100);

/// A guard waiting for its keeper.
struct Waiting {
    /// When its keeper may start (queued `DELAY` before): the queue is in this order.
    due: Instant,
    guard: Weak<crate::guard::Shared>,
    lease: Weak<dyn Lease>,
    span: tracing::Span,
}

/// The nursery of one runtime.
pub(crate) struct Nursery {
    runtime: tokio::runtime::Id,
    /// `None` once the nursery's task is dropped (its runtime shut down, also before the task
    /// ever ran): nothing is queued then.
    queue: Mutex<Option<VecDeque<Waiting>>>,
    /// Wakes the task when a guard is queued into an empty queue.
    queued: Notify,
}

/// The nurseries of the runtimes that have one.
static NURSERIES: Mutex<Vec<Weak<Nursery>>> = Mutex::new(Vec::new());

/// Queues `guard`'s keeper (`lease`, `span`) to start after [`DELAY`] on `runtime`, unless
/// the guard is released or dropped first. `false` if the runtime's nursery is closed (the
/// runtime is shutting down, and dropped the nursery's task, or refused it): the caller
/// starts the keeper itself.
pub(crate) fn queue(
    runtime: &tokio::runtime::Handle,
    guard: &Arc<crate::guard::Shared>,
    lease: &Arc<dyn Lease>,
    span: tracing::Span,
) -> bool {
    let nursery = of(runtime);
    let mut queue = nursery.waiting();
    let Some(queue) = queue.as_mut() else {
        return false;
    };
    let was_empty = queue.is_empty();
    queue.push_back(Waiting {
        due: Instant::now() + DELAY,
        guard: Arc::downgrade(guard),
        lease: Arc::downgrade(lease),
        span,
    });
    if was_empty {
        nursery.queued.notify_one();
    }
    true
}

/// The nursery of `runtime`, started if it has none.
fn of(runtime: &tokio::runtime::Handle) -> Arc<Nursery> {
    let id = runtime.id();
    let mut all = NURSERIES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(nursery) = all
        .iter()
        .filter_map(Weak::upgrade)
        .find(|n| n.runtime == id)
    {
        return nursery;
    }
    all.retain(|n| n.strong_count() > 0);
    let nursery = Arc::new(Nursery {
        runtime: id,
        queue: Mutex::new(Some(VecDeque::new())),
        queued: Notify::new(),
    });
    all.push(Arc::downgrade(&nursery));
    runtime.spawn(tend(nursery.clone()));
    nursery
}

/// The nursery's task: starts the keepers that fall due, for as long as its runtime runs.
fn tend(nursery: Arc<Nursery>) -> impl std::future::Future<Output = ()> + Send {
    /// When the runtime drops the task (also unpolled, as a runtime shutting down does with
    /// what is spawned on it: so the task owns this from the start): the nursery closes, and
    /// the guards still waiting are told their keeper finished, so their `lost()` futures
    /// resolve, as a keeper dropped by its runtime does.
    struct Closing(Arc<Nursery>);
    impl Drop for Closing {
        fn drop(&mut self) {
            let left = self.0.waiting().take();
            for waiting in left.into_iter().flatten() {
                if let Some(guard) = waiting.guard.upgrade() {
                    if guard.forgo_keeper() {
                        guard.finish();
                    }
                }
            }
        }
    }
    let closing = Closing(nursery);
    async move {
        let nursery = &closing.0;
        loop {
            let queued = nursery.queued.notified();
            tokio::pin!(queued);
            queued.as_mut().enable();
            let next = nursery.front();
            match next {
                Some(due) => tokio::time::sleep_until(due).await,
                None => queued.await,
            }
            let now = Instant::now();
            let due: Vec<Waiting> = {
                let mut queue = nursery.waiting();
                let Some(queue) = queue.as_mut() else { return };
                let ready = queue.iter().take_while(|w| w.due <= now).count();
                queue.drain(..ready).collect()
            };
            for waiting in due {
                let (Some(guard), Some(lease)) = (waiting.guard.upgrade(), waiting.lease.upgrade())
                else {
                    continue;
                };
                if guard.claim_keeper() {
                    tokio::spawn(crate::guard::keep(guard, lease).instrument(waiting.span));
                }
            }
            // At most one wake-up per batch, however many guards come and go.
            tokio::time::sleep(BATCH).await;
        }
    }
}

impl Nursery {
    /// The queue (`None` once the nursery closed).
    fn waiting(&self) -> std::sync::MutexGuard<'_, Option<VecDeque<Waiting>>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the first guard in the queue is due, if one waits.
    fn front(&self) -> Option<Instant> {
        self.waiting().as_ref()?.front().map(|w| w.due)
    }
}
