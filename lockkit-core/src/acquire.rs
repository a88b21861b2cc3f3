//! The user-facing acquisition paths shared by every backend.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{field, Instrument};

use crate::backend::{Acquired, DistributedLock};
use crate::capabilities::Capabilities;
use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::name::LockName;
use crate::options::LockOptions;
use crate::telemetry;

pub(crate) async fn acquire<L>(lock: &L, name: &str, opts: &LockOptions) -> Result<LockGuard>
where
    L: DistributedLock + ?Sized,
{
    let backend = lock.backend();
    let name = LockName::new(name)?;
    let caps = lock.capabilities();
    opts.validate(&caps)?;
    let span = tracing::info_span!(
        "lockkit.acquire",
        backend,
        lock = %name,
        wait_ms = field::Empty,
        token = field::Empty,
    );
    async {
        let started = Instant::now();
        let result = match opts.wait {
            Some(wait) if wait.is_zero() => {
                match with_retries(opts, None, || lock.try_lock(&name, opts)).await {
                    Ok(Some(acquired)) => Ok(acquired),
                    Ok(None) => Err(timeout(&name, started)),
                    Err(e) => Err(e),
                }
            }
            Some(wait) if started.checked_add(wait).is_some() => {
                let deadline = started + wait;
                let attempt = with_retries(opts, Some(deadline), || {
                    lock.lock(&name, opts, Some(deadline))
                });
                match tokio::time::timeout_at(deadline, attempt).await {
                    Ok(result) => result,
                    Err(_) => Err(timeout(&name, started)),
                }
            }
            // No deadline, or one too far away to represent.
            _ => with_retries(opts, None, || lock.lock(&name, opts, None)).await,
        };
        finish(backend, &name, opts, &caps, started, result.map(Some)).and_then(|guard| {
            guard.ok_or_else(|| Error::Unsupported("backend returned no lock".into()))
        })
    }
    .instrument(span)
    .await
}

pub(crate) async fn try_acquire<L>(
    lock: &L,
    name: &str,
    opts: &LockOptions,
) -> Result<Option<LockGuard>>
where
    L: DistributedLock + ?Sized,
{
    let backend = lock.backend();
    let name = LockName::new(name)?;
    let caps = lock.capabilities();
    opts.validate(&caps)?;
    let span = tracing::info_span!(
        "lockkit.acquire",
        backend,
        lock = %name,
        wait_ms = field::Empty,
        token = field::Empty,
    );
    async {
        let started = Instant::now();
        let result = with_retries(opts, None, || lock.try_lock(&name, opts)).await;
        finish(backend, &name, opts, &caps, started, result)
    }
    .instrument(span)
    .await
}

fn timeout(name: &LockName, started: Instant) -> Error {
    Error::Timeout {
        name: name.to_string(),
        waited: started.elapsed(),
    }
}

/// Records the outcome and turns a backend acquisition into a guard.
fn finish(
    backend: &'static str,
    name: &LockName,
    opts: &LockOptions,
    caps: &Capabilities,
    started: Instant,
    result: Result<Option<Acquired>>,
) -> Result<Option<LockGuard>> {
    let waited = started.elapsed();
    let span = tracing::Span::current();
    span.record("wait_ms", waited.as_secs_f64() * 1000.0);
    let outcome = match &result {
        Ok(Some(acquired)) => {
            span.record("token", acquired.token.0);
            "acquired"
        }
        Ok(None) => "busy",
        Err(Error::Timeout { .. }) => {
            metrics::counter!(telemetry::TIMEOUTS_TOTAL, "backend" => backend).increment(1);
            "timeout"
        }
        Err(_) => "error",
    };
    metrics::counter!(telemetry::ACQUIRES_TOTAL, "backend" => backend, "outcome" => outcome)
        .increment(1);
    metrics::histogram!(telemetry::ACQUIRE_WAIT_SECONDS, "backend" => backend, "outcome" => outcome)
        .record(waited.as_secs_f64());
    match result {
        Ok(Some(acquired)) => {
            tracing::debug!(token = acquired.token.0, "acquired");
            LockGuard::start(backend, name.clone(), acquired, opts, caps).map(Some)
        }
        Ok(None) => Ok(None),
        Err(e) => {
            tracing::debug!(error = %e, "acquire failed");
            Err(e)
        }
    }
}

/// Runs `attempt`, retrying connection errors per the options' retry policy, never sleeping
/// past `deadline`.
async fn with_retries<T, F, Fut>(
    opts: &LockOptions,
    deadline: Option<Instant>,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut retry = 0;
    loop {
        match attempt().await {
            Err(e) if e.is_retryable() && retry < opts.retry.max_retries => {
                let delay = opts.retry.backoff(retry);
                let until = Instant::now().checked_add(delay);
                if deadline.is_some_and(|d| until.is_none_or(|u| u >= d)) {
                    return Err(e);
                }
                tracing::debug!(error = %e, retry, ?delay, "retrying after a connection error");
                retry += 1;
                tokio::time::sleep(delay.max(Duration::from_millis(1))).await;
            }
            other => return other,
        }
    }
}
