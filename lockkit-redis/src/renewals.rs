//! Lease renewals of one client, batched: the extends asked for within a few milliseconds
//! of each other, or while a batch is on its way, go out together in the next one, as one
//! script call per instance, however many guards the client holds.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lockkit_core::backend::renewal_gather;
use lockkit_core::{Error, Result};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::lock::{millis, Inner};
use crate::scripts;

/// The most leases one script call renews (the rest go in the next call).
const MAX_BATCH: usize = 1000;

/// What one instance answered about one lease: 1 extended, 0 not ours.
pub(crate) type Answers = Vec<Result<i64>>;

/// The extends waiting for the next batch, and whether a batch is on its way.
#[derive(Debug, Default)]
pub(crate) struct Renewals {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    waiting: Vec<Request>,
    flushing: bool,
}

#[derive(Debug)]
struct Request {
    lock: String,
    owner: Arc<str>,
    ttl: Duration,
    /// When the batch was sent, and every instance's answer.
    reply: oneshot::Sender<(Instant, Answers)>,
}

impl Renewals {
    fn state(&self) -> MutexGuard<'_, State> {
        // Never held across an await or a panic point.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Extends the lease `lock` of `owner` to `ttl` on every instance, in the next batch of the
/// client. Returns when that batch was sent (the lease is known valid from then) and the
/// instances' answers, in instance order.
pub(crate) async fn extend(
    inner: &Arc<Inner>,
    lock: &str,
    owner: &Arc<str>,
    ttl: Duration,
) -> Result<(Instant, Answers)> {
    let (reply, answer) = oneshot::channel();
    let request = Request {
        lock: lock.to_string(),
        owner: owner.clone(),
        ttl,
        reply,
    };
    let start = {
        let mut state = inner.renewals.state();
        state.waiting.push(request);
        !std::mem::replace(&mut state.flushing, true)
    };
    if start {
        // Spawned, not run here: the keepers whose renewals fall due together queue theirs
        // before it takes the first batch.
        tokio::spawn(flush(inner.clone()));
    }
    answer.await.map_err(|_| {
        Error::connection(
            inner.backend,
            "the renewal batch was dropped (the runtime is shutting down)",
        )
    })
}

/// Sends batches until no extend is waiting. Each waits for more extends to join it first,
/// as long as [`renewal_gather`] gives for the shortest TTL waiting: without a wait, 10 000
/// guards made one script call per renewal on every instance.
async fn flush(inner: Arc<Inner>) {
    loop {
        let gather = {
            let mut state = inner.renewals.state();
            match state.waiting.iter().map(|r| r.ttl).min() {
                Some(ttl) => renewal_gather(ttl, state.waiting.len(), MAX_BATCH),
                None => {
                    state.flushing = false;
                    return;
                }
            }
        };
        if !gather.is_zero() {
            tokio::time::sleep(gather).await;
        }
        // Not empty: only this task takes extends out, and it found some before the wait.
        let batch: Vec<Request> = {
            let mut state = inner.renewals.state();
            let take = state.waiting.len().min(MAX_BATCH);
            state.waiting.drain(..take).collect()
        };
        let ttl = batch.iter().map(|r| r.ttl).min().unwrap_or_default();
        let locks: Vec<&str> = batch.iter().map(|r| r.lock.as_str()).collect();
        let ttls: Vec<String> = batch.iter().map(|r| millis(r.ttl).to_string()).collect();
        let mut args = Vec::with_capacity(batch.len() * 2);
        for (request, ttl_ms) in batch.iter().zip(&ttls) {
            args.push(&*request.owner);
            args.push(ttl_ms.as_str());
        }
        let started = Instant::now();
        let answers: Vec<Result<Vec<i64>>> =
            inner.on_all(ttl, &scripts::EXTEND, &locks, &args).await;
        for (i, request) in batch.into_iter().enumerate() {
            let mine = answers
                .iter()
                .map(|answer| match answer {
                    Ok(extended) => Ok(extended.get(i).copied().unwrap_or(0)),
                    Err(e) => Err(Error::connection(inner.backend, e.to_string())),
                })
                .collect();
            let _ = request.reply.send((started, mine));
        }
    }
}
