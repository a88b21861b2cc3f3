//! The backend trait every lock service implements, and the calls users make on it.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::capabilities::Capabilities;
use crate::error::{LostReason, Result};
use crate::guard::LockGuard;
use crate::name::LockName;
use crate::options::LockOptions;

/// A fencing token: strictly increases per lock name with every acquisition, across all
/// clients and processes. Pass it to the resource you protect and have it reject writes
/// carrying a token lower than the highest it has seen: that makes a paused or partitioned
/// former holder harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl FencingToken {
    /// The token's value.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for FencingToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

/// What a backend hands over for a lock it has just taken.
#[derive(Debug)]
#[non_exhaustive]
pub struct Acquired {
    /// The acquisition's fencing token.
    pub token: FencingToken,
    /// Until when the lease is known to be valid (conservatively: measured from when the
    /// request was sent, less any clock-drift allowance).
    pub valid_until: Instant,
    /// The handle that extends and releases this lease.
    pub lease: Box<dyn Lease>,
}

impl Acquired {
    /// Bundles what a backend returns for a successful acquisition.
    pub fn new(token: FencingToken, valid_until: Instant, lease: Box<dyn Lease>) -> Self {
        Acquired {
            token,
            valid_until,
            lease,
        }
    }
}

/// A held lease, owned by one guard. Its methods only act if the lease is still this
/// owner's: a stale owner can never extend or release someone else's lock.
#[async_trait]
pub trait Lease: Send + Sync + Debug + 'static {
    /// Extends the lease to `ttl` from now and returns until when it is known valid.
    /// Fails with [`crate::Error::LockLost`] if the lock is no longer this owner's.
    async fn extend(&self, ttl: Duration) -> Result<Instant>;

    /// Releases the lock. Fails with [`crate::Error::LockLost`] if it was no longer this
    /// owner's (nothing is changed then).
    async fn release(&self) -> Result<()>;

    /// Resolves when the backend itself sees the lock lost (session expired, connection
    /// closed). Must be cancel-safe: it is polled in a loop and dropped between polls.
    /// The default never resolves: loss is then detected by renewal and lease expiry.
    async fn lost(&self) -> LostReason {
        std::future::pending().await
    }
}

/// A lock service. Backends implement the required methods; users call
/// [`acquire`](DistributedLock::acquire) and [`try_acquire`](DistributedLock::try_acquire)
/// (and [`with_lock`](crate::with_lock)), which validate input, retry connection errors,
/// enforce the wait timeout, record telemetry and build the [`LockGuard`].
///
/// Backends must not override the provided methods.
#[async_trait]
pub trait DistributedLock: Send + Sync + Debug {
    /// The backend's short name (`sqlite`, `redis`, ...), used in errors and metrics.
    fn backend(&self) -> &'static str;

    /// What the backend guarantees.
    fn capabilities(&self) -> Capabilities;

    /// One attempt, without waiting: `Ok(None)` when the lock is held elsewhere.
    /// The options are already validated.
    async fn try_lock(&self, name: &LockName, opts: &LockOptions) -> Result<Option<Acquired>>;

    /// Waits until the lock is acquired, waking on the backend's events. The caller enforces
    /// the wait timeout by dropping this future at `deadline`, so it must be cancel-safe: a
    /// dropped wait leaves nothing held and nothing queued. `deadline` is a hint for
    /// backends whose server can wait with a timeout of its own.
    async fn lock(
        &self,
        name: &LockName,
        opts: &LockOptions,
        deadline: Option<Instant>,
    ) -> Result<Acquired>;

    /// Acquires `name`, waiting up to the options' wait timeout ([`crate::Error::Timeout`]
    /// after it). The guard releases the lock when dropped.
    async fn acquire(&self, name: &str, opts: &LockOptions) -> Result<LockGuard> {
        crate::acquire::acquire(self, name, opts).await
    }

    /// One attempt: `Ok(None)` if the lock is held elsewhere.
    async fn try_acquire(&self, name: &str, opts: &LockOptions) -> Result<Option<LockGuard>> {
        crate::acquire::try_acquire(self, name, opts).await
    }
}

/// Runs `f` while holding `name`, then releases the lock and returns `f`'s output.
///
/// If the lock is lost while `f` runs, `f` is cancelled (dropped at its next await point) and
/// the result is [`crate::Error::LockLost`]; a failing release is reported too, since the
/// work may then have run without exclusivity.
///
/// ```no_run
/// # async fn demo(lock: &dyn lockkit_core::DistributedLock) -> lockkit_core::Result<()> {
/// use lockkit_core::{with_lock, LockOptions};
/// let total = with_lock(lock, "report", &LockOptions::new(), async |guard| {
///     println!("building with token {}", guard.fencing_token());
///     42
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub async fn with_lock<L, F, T>(lock: &L, name: &str, opts: &LockOptions, f: F) -> Result<T>
where
    L: DistributedLock + ?Sized,
    F: AsyncFnOnce(&LockGuard) -> T,
{
    let guard = lock.acquire(name, opts).await?;
    let lost = guard.lost();
    let out = tokio::select! {
        biased;
        reason = lost => return Err(crate::Error::lost(name, reason)),
        out = f(&guard) => out,
    };
    guard.release().await?;
    Ok(out)
}

/// The outcome of one acquisition request, as [`run_detached`] sees it: whether it holds a
/// lock that must be released if nobody is left to take it.
pub trait Attempt: Send + 'static {
    /// The acquisition this outcome holds, if any.
    fn into_acquired(self) -> Option<Acquired>;
}

impl Attempt for Option<Acquired> {
    fn into_acquired(self) -> Option<Acquired> {
        self
    }
}

/// Runs an acquisition request to completion even if the caller stops waiting for it: if the
/// caller's future is dropped mid-request (wait timeout, cancellation) and the request then
/// succeeds, or had just succeeded, the lease is released right away instead of staying held
/// until its TTL.
///
/// Backends wrap each request that may take a lock in this, and keep the waiting between
/// requests cancellable. Outside a Tokio runtime it fails with [`crate::Error::Unsupported`].
pub fn run_detached<T, F>(attempt: F) -> impl Future<Output = Result<T>> + Send
where
    T: Attempt,
    F: Future<Output = Result<T>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = tokio::runtime::Handle::try_current().map(|runtime| {
        runtime.spawn(async move {
            let result = attempt.await;
            if let Err(Ok(outcome)) = tx.send(result) {
                release_orphan(outcome);
            }
        })
    });
    let mut pending = Pending { rx };
    async move {
        if spawned.is_err() {
            return Err(crate::Error::Unsupported(
                "lockkit needs a Tokio runtime to acquire locks".into(),
            ));
        }
        (&mut pending.rx).await.unwrap_or_else(|_| {
            Err(crate::Error::Unsupported(
                "the acquisition task was cancelled: the Tokio runtime is shutting down".into(),
            ))
        })
    }
}

/// The caller's end of a detached attempt. If the caller goes away after the attempt has
/// delivered its outcome but before reading it, the outcome is taken back and released here.
struct Pending<T: Attempt> {
    rx: tokio::sync::oneshot::Receiver<Result<T>>,
}

impl<T: Attempt> Drop for Pending<T> {
    fn drop(&mut self) {
        self.rx.close();
        if let Ok(Ok(outcome)) = self.rx.try_recv() {
            release_orphan(outcome);
        }
    }
}

fn release_orphan<T: Attempt>(outcome: T) {
    if let Some(orphan) = outcome.into_acquired() {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            tracing::debug!("releasing a lock whose caller stopped waiting");
            runtime.spawn(async move {
                let _ = orphan.lease.release().await;
            });
        }
    }
}
