//! Waiting for a lease-table lock: wake-ups within the process (and from `NOTIFY` where the
//! database has it), a wake-up when the holder's lease runs out, and a jittered backoff
//! re-check for releases that send no signal.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use lockkit_core::backend::{Acquired, LockName, Outcome};
use lockkit_core::Result;
use tokio::sync::Notify;

/// Subtracted from a lease's validity: expiries are stored in whole milliseconds.
pub(crate) const CLOCK_MARGIN: Duration = Duration::from_millis(1);

/// Until when a lease of `ttl` taken by a request sent at `started` is valid (a TTL too long
/// for the clock counts as a century).
pub(crate) fn lease_end(started: tokio::time::Instant, ttl: Duration) -> tokio::time::Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    started + ttl.min(CENTURY) - CLOCK_MARGIN
}

/// A TTL in whole milliseconds, rounded up so a lease is never shorter than asked.
pub(crate) fn millis(d: Duration) -> i64 {
    d.as_nanos().div_ceil(1_000_000).min(i64::MAX as u128) as i64
}

/// How long the next server-side blocking wait may take: at most `slice`, no longer than
/// the caller still waits, and not so short that it spins.
pub(crate) fn next_slice(deadline: Option<tokio::time::Instant>, slice: Duration) -> Duration {
    let left = deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
    left.unwrap_or(slice)
        .min(slice)
        .max(Duration::from_millis(10))
}

/// Wake-up slots of one database: a release wakes the waiters whose name hashes to its slot.
/// And the turns of this process's waiters for each name, in the order they came.
#[derive(Debug)]
pub(crate) struct WakeSlots {
    slots: [Notify; 64],
    turns: Mutex<HashMap<LockName, Weak<tokio::sync::Mutex<()>>>>,
}

impl WakeSlots {
    pub(crate) fn slot(&self, name: &LockName) -> &Notify {
        &self.slots[(name.hash64() % 64) as usize]
    }

    /// The queue of this process's waiters for `name` (every client of the database): a
    /// waiter tries only once the ones before it are done, so a client that releases and
    /// asks again goes behind the waiters instead of taking the lock back first.
    pub(crate) fn turn(&self, name: &LockName) -> Arc<tokio::sync::Mutex<()>> {
        let mut turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(turn) = turns.get(name).and_then(Weak::upgrade) {
            return turn;
        }
        if turns.len() >= 64 && turns.len().is_power_of_two() {
            turns.retain(|_, turn| turn.strong_count() > 0);
        }
        let turn = Arc::new(tokio::sync::Mutex::new(()));
        turns.insert(name.clone(), Arc::downgrade(&turn));
        turn
    }

    /// Wakes every waiter (messages may have been missed).
    #[cfg(feature = "postgres")]
    pub(crate) fn wake_all(&self) {
        for slot in &self.slots {
            slot.notify_waiters();
        }
    }
}

/// The wake slots shared by every client of one database in this process (`key` names the
/// database), or fresh ones when `key` is `None`.
pub(crate) fn wake_slots(key: Option<String>) -> Arc<WakeSlots> {
    let fresh = || {
        Arc::new(WakeSlots {
            slots: std::array::from_fn(|_| Notify::new()),
            turns: Mutex::default(),
        })
    };
    let Some(key) = key else { return fresh() };
    static SLOTS: OnceLock<Mutex<HashMap<String, Weak<WakeSlots>>>> = OnceLock::new();
    let mut map = SLOTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    map.retain(|_, slots| slots.strong_count() > 0);
    if let Some(slots) = map.get(&key).and_then(Weak::upgrade) {
        return slots;
    }
    let slots = fresh();
    map.insert(key, Arc::downgrade(&slots));
    slots
}

/// Tries `attempt` until it wins; a busy attempt says how long the holder's lease has left
/// (`None`: unknown). Between attempts it waits for a wake-up on `slot`, the
/// end of the holder's lease, or a jittered backoff from 2 ms up to `max_poll`. Once the
/// database has answered once, a retryable error does not end the wait.
pub(crate) async fn until_acquired<F, Fut>(
    slot: &Notify,
    max_poll: Duration,
    mut attempt: F,
) -> Result<Acquired>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Outcome<Option<Duration>>>>,
{
    let max_poll = max_poll.max(Duration::from_millis(1));
    let mut poll = Duration::from_millis(2).min(max_poll);
    let mut reached = false;
    loop {
        // Register for the wake-up before trying, so a release in between is not missed.
        let woken = slot.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let left = match attempt().await {
            Ok(Outcome::Won(acquired)) => return Ok(acquired),
            Ok(Outcome::Busy(left)) => {
                reached = true;
                left.unwrap_or(max_poll)
            }
            Err(e) if reached && e.is_retryable() => {
                tracing::debug!(error = %e, "retrying while waiting");
                poll
            }
            Err(e) => return Err(e),
        };
        let jittered = poll / 2 + poll.mul_f64(fastrand::f64() / 2.0);
        let pause = jittered.min(left + Duration::from_millis(1));
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep(pause) => {}
        }
        poll = poll.saturating_mul(2).min(max_poll);
    }
}
