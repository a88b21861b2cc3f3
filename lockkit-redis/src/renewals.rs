//! Lease renewals of one client, batched: the extends asked for within a few milliseconds
//! of each other, or while a batch is on its way, go out together in the next one, as one
//! script call per instance, however many guards the client holds.

use std::sync::Arc;
use std::time::Duration;

use lockkit_core::backend::RenewalBatches;
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
pub(crate) type Renewals = RenewalBatches<Request>;

/// One extend waiting for its batch.
#[derive(Debug)]
pub(crate) struct Request {
    lock: String,
    owner: Arc<str>,
    ttl: Duration,
    /// When the batch was sent, and every instance's answer.
    reply: oneshot::Sender<(Instant, Answers)>,
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
    inner.renewals.push(request, || flush(inner.clone()));
    answer.await.map_err(|_| {
        Error::connection(
            inner.backend,
            "the renewal batch was dropped (the runtime is shutting down)",
        )
    })
}

/// Sends batches until no extend is waiting, each once it has waited for more extends to
/// join it ([`RenewalBatches::next_batch`]): without a wait, 10 000 guards made one script
/// call per renewal on every instance.
async fn flush(inner: Arc<Inner>) {
    while let Some(batch) = inner.renewals.next_batch(MAX_BATCH, |r| r.ttl).await {
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
