//! The backend SPI: what a lock service implements. Users never call it; they call
//! [`Locks`](crate::Locks), which validates input, retries connection errors, enforces the
//! wait timeout, records telemetry and wraps every acquisition in a
//! [`LockGuard`](crate::LockGuard) kept by the one lease keeper.
//!
//! # Contract
//!
//! A [`Backend`] and the [`Lease`]s it hands out must:
//!
//! 1. **Exclude.** While a lease is valid (before its `valid_until`), no other
//!    [`Backend::try_lock`] or [`Backend::lock`] on the same name succeeds, from any client.
//! 2. **Fence.** If [`Capabilities::fencing`] is claimed, every acquisition's
//!    [`FencingToken`] is strictly greater than every earlier one of the same name.
//! 3. **Be conservative about time.** `valid_until` is measured from before the request was
//!    sent, less any clock-drift allowance: the server must not free the lock before it.
//! 4. **Act only as the owner.** [`Lease::extend`] and [`Lease::release`] change nothing and
//!    fail with [`Error::LockLost`] once the lock is not this
//!    lease's any more.
//! 5. **Leave nothing behind.** Each request that may take a lock runs under
//!    [`run_detached`], so a caller that stops waiting never leaves a lock held; a dropped
//!    [`Backend::lock`] future leaves nothing queued (use [`Armed`] for the clean-up).
//! 6. **Report errors by type.** Unreachable servers and broken connections are
//!    [`Error::Connection`] (retried by the caller); answers that
//!    say no are [`Error::Backend`]; never a panic, never a hang
//!    past the request timeouts the backend documents.
//! 7. **Promise only what it keeps.** [`Capabilities`] start with every guarantee off; the
//!    conformance suite runs the cases of exactly the guarantees a backend claims.
//!
//! Renewal, expiry, the loss signal and release on drop belong to the keeper: a backend
//! runs no renewal loop of its own. A lease whose server-side TTL is fixed when it is
//! created (a Consul session) says so with [`Lease::fixed_ttl`], and the keeper renews it
//! as often as that TTL needs.
//!
//! Implement [`Connect`] too, so `lockkit::connect(url)` finds the backend by its URL
//! schemes, and run the conformance suite (feature `conformance`) against a real server.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub use crate::admin::{Admin, LockInfo};
pub use crate::capabilities::Capabilities;
pub use crate::name::LockName;
pub use crate::options::{LockOptions, RetryPolicy};
pub use crate::token::FencingToken;
/// Re-exported so backends and harnesses use the same version as the core.
pub use async_trait::async_trait;

use crate::error::{Error, LostReason, Result};

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

    /// Whether [`Lease::lost`] can resolve. The default, `true`, is always safe. A lease
    /// that keeps the default `lost` may answer `false`: its guard's keeper, which would
    /// have nothing to watch until the first renewal or the end of the lease, then starts
    /// only if the guard is still held a few tens of milliseconds after the acquisition, so
    /// a short hold costs no task. A lease whose `lost` can resolve must answer `true`, or
    /// its guard would notice that loss late.
    fn signals_loss(&self) -> bool {
        true
    }

    /// Stores `value` with the lock while this lease holds it (an elected leader's
    /// announcement, replaced by each call), for [`Admin::inspect`] to report as
    /// [`LockInfo::value`] and [`Admin::changed`] to wake on. Owner-only like
    /// [`Lease::extend`]: fails with [`crate::Error::LockLost`] and changes nothing once the
    /// lock is not this lease's. The value goes when the lock does (release, expiry): no
    /// later holder's [`LockInfo`] ever shows it. The core passes at most
    /// [`MAX_VALUE_LEN`](crate::admin::MAX_VALUE_LEN) bytes. Claim
    /// [`Capabilities::election`] when implemented; the default fails with
    /// [`crate::Error::Unsupported`].
    async fn set_value(&self, value: &str) -> Result<()> {
        let _ = value;
        Err(Error::Unsupported(
            "this backend cannot store a value with a lock".into(),
        ))
    }

    /// The server-side TTL of this lease, if the server fixed it when the lease was created
    /// (a Consul session): [`Lease::extend`] then renews for this long whatever `ttl` it is
    /// given (and returns until when that renewal holds). With automatic renewal off the
    /// keeper then renews every third of it until the end the holder asked for (its TTL or
    /// latest extend) is covered; with it on, at the holder's interval as for any lease.
    /// `None` (the default): `extend` honours its `ttl`.
    fn fixed_ttl(&self) -> Option<Duration> {
        None
    }
}

/// A lock service, as the core sees it. See the [module docs](self) for the contract.
///
/// Only [`Locks`](crate::Locks) calls these methods; it validates names and options first.
#[async_trait]
pub trait Backend: std::any::Any + Send + Sync + Debug {
    /// The backend's short name (`sqlite`, `redis`, ...), used in errors and metrics.
    fn name(&self) -> &'static str;

    /// What the backend guarantees.
    fn capabilities(&self) -> Capabilities;

    /// One attempt, without waiting: `Ok(None)` when the lock is held elsewhere.
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

    /// The backend's operator view (inspect, list, force-release), if it has one; see
    /// [`Admin`]. `None` (the default): every such call is [`Error::Unsupported`].
    fn admin(&self) -> Option<&dyn Admin> {
        None
    }
}

/// A backend that can be opened from a URL: `lockkit::connect` builds its scheme table from
/// these declarations, so a scheme a backend accepts is always one the facade accepts.
pub trait Connect: Backend + Sized {
    /// The URL schemes this backend accepts (lower case, without `://`).
    const SCHEMES: &'static [&'static str];

    /// Connects to the service at `url` with default options.
    fn connect(url: &str) -> impl Future<Output = Result<Self>> + Send;
}

macro_rules! forward_backend {
    ($($pointer:ident),+) => {$(
        #[async_trait]
        impl<B: Backend + ?Sized> Backend for $pointer<B> {
            fn name(&self) -> &'static str {
                (**self).name()
            }

            fn capabilities(&self) -> Capabilities {
                (**self).capabilities()
            }

            async fn try_lock(
                &self,
                name: &LockName,
                opts: &LockOptions,
            ) -> Result<Option<Acquired>> {
                (**self).try_lock(name, opts).await
            }

            async fn lock(
                &self,
                name: &LockName,
                opts: &LockOptions,
                deadline: Option<Instant>,
            ) -> Result<Acquired> {
                (**self).lock(name, opts, deadline).await
            }

            fn admin(&self) -> Option<&dyn Admin> {
                (**self).admin()
            }
        }
    )+};
}

forward_backend!(Arc, Box);

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

/// What one acquisition request found: the lock, or that it is held elsewhere, with what the
/// backend learnt on the way (`B`: e.g. the holder's remaining lease, or a session to reuse).
#[derive(Debug)]
pub enum Outcome<B = ()> {
    /// The lock is ours.
    Won(Acquired),
    /// Held elsewhere.
    Busy(B),
}

/// A request that takes nothing ([`LockGuard::release`](crate::LockGuard::release)): run
/// detached only so that it finishes when its caller stops waiting.
impl Attempt for () {
    fn into_acquired(self) -> Option<Acquired> {
        None
    }
}

impl<B: Send + 'static> Attempt for Outcome<B> {
    fn into_acquired(self) -> Option<Acquired> {
        match self {
            Outcome::Won(acquired) => Some(acquired),
            Outcome::Busy(_) => None,
        }
    }
}

/// Runs an acquisition request to completion even if the caller stops waiting for it: if the
/// caller's future is dropped mid-request (wait timeout, cancellation) and the request then
/// succeeds, the lease is released right away instead of staying held until its TTL.
///
/// The request runs inline in the caller's task (no extra task or hand-off on the fast path);
/// only when the caller drops it mid-flight is the rest of it moved to a task of its own,
/// which finishes it and releases whatever it took. A request dropped before it was ever
/// polled sent nothing and is simply dropped.
///
/// Backends wrap each request that may take a lock in this, and keep the waiting between
/// requests cancellable; [`LockGuard::release`](crate::LockGuard::release) runs its release
/// in it too (an outcome of `()`: nothing to give back), so that a release its caller stops
/// waiting for still completes. Outside a Tokio runtime it fails with
/// [`Error::Unsupported`].
pub fn run_detached<T, F>(attempt: F) -> impl Future<Output = Result<T>> + Send
where
    T: Attempt,
    F: Future<Output = Result<T>> + Send + 'static,
{
    Detached {
        attempt: Some(Box::pin(attempt)),
        polled: false,
        runtime: tokio::runtime::Handle::try_current().ok(),
    }
}

/// The future of [`run_detached`]: the request, finished in the background if dropped
/// mid-flight.
struct Detached<T: Attempt, F: Future<Output = Result<T>> + Send + 'static> {
    attempt: Option<std::pin::Pin<Box<F>>>,
    polled: bool,
    runtime: Option<tokio::runtime::Handle>,
}

impl<T: Attempt, F: Future<Output = Result<T>> + Send + 'static> Future for Detached<T, F> {
    type Output = Result<T>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<T>> {
        // Only `Box`es and plain fields: moving `Detached` is fine.
        let this = &mut *self;
        if this.runtime.is_none() {
            this.attempt = None;
            return std::task::Poll::Ready(Err(Error::Unsupported(
                "lockkit needs a Tokio runtime to acquire or release locks".into(),
            )));
        }
        let Some(attempt) = this.attempt.as_mut() else {
            return std::task::Poll::Ready(Err(Error::Unsupported(
                "the acquisition was polled after it finished".into(),
            )));
        };
        this.polled = true;
        let result = std::task::ready!(attempt.as_mut().poll(cx));
        this.attempt = None;
        std::task::Poll::Ready(result)
    }
}

impl<T: Attempt, F: Future<Output = Result<T>> + Send + 'static> Drop for Detached<T, F> {
    fn drop(&mut self) {
        let (Some(attempt), Some(runtime)) = (self.attempt.take(), self.runtime.as_ref()) else {
            return;
        };
        if !self.polled {
            return;
        }
        // Mid-request: finish it elsewhere and give back whatever it took.
        runtime.spawn(async move {
            match attempt.await {
                Ok(outcome) => release_orphan(outcome),
                Err(e) => {
                    tracing::debug!(error = %e, "a request whose caller stopped waiting failed")
                }
            }
        });
    }
}

fn release_orphan<T: Attempt>(outcome: T) {
    if let Some(orphan) = outcome.into_acquired() {
        tracing::debug!("releasing a lock whose caller stopped waiting");
        spawn_cleanup("releasing an orphaned lock", async move {
            orphan.lease.release().await
        });
    }
}

/// Runs a clean-up request (`what` names it in the debug log if it fails) in the background
/// on the current Tokio runtime. Without a runtime (a drop on a plain thread, or during
/// shutdown) nothing runs: whatever it would have removed ends at its TTL.
pub fn spawn_cleanup<F>(what: &'static str, cleanup: F)
where
    F: Future<Output = Result<()>> + Send + 'static,
{
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            if let Err(e) = cleanup.await {
                tracing::debug!(error = %e, "{what} failed");
            }
        });
    }
}

/// Runs `request` until it gets through: again after each retryable (connection) error,
/// pausing as `policy` backs off, while the next try would start before `until` (a pause
/// that would end within 2 ms of it, a Tokio timer's lateness, is not taken, and a pause
/// that ended late is not followed by a try past it). Gives its answer, or the last error.
/// For a request that must happen although a lock's own retries are over, such as a
/// clean-up while the service's servers elect a leader; `until` is when it stops mattering
/// (say, when the session it cleans up after lapses anyway).
pub async fn retry_until<T, F, Fut>(
    policy: &RetryPolicy,
    until: Instant,
    mut request: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut failed = 0u32;
    loop {
        match request().await {
            Err(e) if e.is_retryable() => {
                let pause = policy.backoff(failed);
                if Instant::now() + pause + TIMER_SLACK >= until {
                    return Err(e);
                }
                tracing::debug!(error = %e, ?pause, "retrying a request that must get through");
                failed = failed.saturating_add(1);
                tokio::time::sleep(pause).await;
                if Instant::now() >= until {
                    return Err(e);
                }
            }
            answer => return answer,
        }
    }
}

/// How late a Tokio timer may fire: it rounds its deadline up to a whole millisecond of its
/// clock, and wakes on the next tick.
const TIMER_SLACK: Duration = Duration::from_millis(2);

/// How long a backend that batches its renewals lets the first renewal of a batch wait for
/// others to join it, for leases of `ttl` (the shortest waiting): 1 % of the TTL, between 1
/// and 5 ms.
///
/// The keeper renews each guard at a third of its TTL (or its `renew_every`), each on its
/// own schedule but rounded up onto a process-wide grid (steps of a power of two
/// milliseconds, at most a 32nd of the interval and 64 ms): a client holding thousands of
/// locks wakes the renewals due within a step together, and they reach the queue within a
/// few milliseconds of each other. The short wait lets them all join one batch, one request
/// per server; the renewal counts its lease from when the batch is sent. An explicit
/// [`LockGuard::extend`](crate::LockGuard::extend) joins the batch too, so it answers
/// within about this wait plus a round trip (two, if a batch is in flight when it arrives).
/// (Holding 10 000 SQLite locks: 5.1–5.6 % of a core with a wait of up to 100 ms and no
/// grid; 3.6–4.4 % on the grid, whether the wait is at most 100 or at most 5 ms.)
///
/// No wait when `waiting` renewals already fill a batch of at most `batch`: a backlog is sent
/// at once, so the wait never caps how many renewals a client sends per second.
pub fn renewal_gather(ttl: Duration, waiting: usize, batch: usize) -> Duration {
    if waiting >= batch {
        return Duration::ZERO;
    }
    (ttl / 100).clamp(Duration::from_millis(1), Duration::from_millis(5))
}

/// The renewals of one client waiting for their batch, for a backend that renews many leases
/// in one request (one script call, one statement), and whether a sender is taking them.
///
/// A renewal is queued with [`RenewalBatches::push`]; the first one queued while no sender
/// runs starts one, which takes batches with [`RenewalBatches::next_batch`] until none is
/// waiting.
pub struct RenewalBatches<T> {
    /// The renewals waiting, and whether a sender runs.
    state: std::sync::Mutex<(Vec<T>, bool)>,
}

impl<T> Default for RenewalBatches<T> {
    fn default() -> Self {
        RenewalBatches {
            state: std::sync::Mutex::new((Vec::new(), false)),
        }
    }
}

impl<T> Debug for RenewalBatches<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenewalBatches").finish_non_exhaustive()
    }
}

impl<T> RenewalBatches<T> {
    fn state(&self) -> std::sync::MutexGuard<'_, (Vec<T>, bool)> {
        // Never held across an await or a panic point.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a renewal for the next batch, and spawns the sender `sender` makes if none
    /// runs: spawned, not run here, so the renewals that fall due together queue before it
    /// takes the first batch.
    pub fn push<F>(&self, renewal: T, sender: impl FnOnce() -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let start = {
            let mut state = self.state();
            state.0.push(renewal);
            !std::mem::replace(&mut state.1, true)
        };
        if start {
            tokio::spawn(sender());
        }
    }

    /// For the sender: the next batch, at most `max` renewals, taken once it has waited for
    /// others to join it as long as [`renewal_gather`] gives for the shortest TTL waiting
    /// (`ttl` of each). `None` when none is waiting: the sender is done, and the next
    /// [`RenewalBatches::push`] starts another.
    pub async fn next_batch(&self, max: usize, ttl: impl Fn(&T) -> Duration) -> Option<Vec<T>> {
        let gather = {
            let mut state = self.state();
            match state.0.iter().map(&ttl).min() {
                Some(shortest) => renewal_gather(shortest, state.0.len(), max),
                None => {
                    state.1 = false;
                    return None;
                }
            }
        };
        if !gather.is_zero() {
            tokio::time::sleep(gather).await;
        }
        // Not empty: only the sender takes renewals out, and it found some before the wait.
        let mut state = self.state();
        let take = state.0.len().min(max);
        Some(state.0.drain(..take).collect())
    }
}

/// A lease's loss: marked once by whatever finds it (a watcher, a session check), with the
/// first reason, and awaited by [`Lease::lost`]. Every held lock of a backend that signals
/// loss keeps one, so it is a mutex and a [`tokio::sync::Notify`] (about 72 bytes) rather
/// than a `watch` channel (several hundred).
#[derive(Debug, Default)]
pub struct LossSignal {
    reason: std::sync::Mutex<Option<LostReason>>,
    marked: tokio::sync::Notify,
}

impl LossSignal {
    /// Not lost.
    pub fn new() -> Self {
        Self::default()
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<LostReason>> {
        // Never held across an await or a panic point.
        self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the lease lost with `reason`, unless it already was (the first reason stays);
    /// whether this call marked it.
    pub fn mark(&self, reason: LostReason) -> bool {
        let first = {
            let mut slot = self.slot();
            let first = slot.is_none();
            if first {
                *slot = Some(reason);
            }
            first
        };
        if first {
            self.marked.notify_waiters();
        }
        first
    }

    /// Why the lease was lost, once it was.
    pub fn reason(&self) -> Option<LostReason> {
        self.slot().clone()
    }

    /// Resolves with the reason once the lease is marked lost (at once if it already was).
    /// Cancel-safe.
    pub async fn wait(&self) -> LostReason {
        loop {
            let notified = self.marked.notified();
            tokio::pin!(notified);
            // Registered before the check, so a mark between the two still wakes it.
            notified.as_mut().enable();
            if let Some(reason) = self.reason() {
                return reason;
            }
            notified.await;
        }
    }
}

/// Something a backend created on the server that must be removed unless it is handed over
/// (a queued node, a session, a waiter's key).
pub trait Cleanup: Send + 'static {
    /// What the clean-up does, for the debug log.
    const WHAT: &'static str;

    /// Removes it from the server.
    fn cleanup(self) -> impl Future<Output = Result<()>> + Send + 'static;
}

/// Holds a [`Cleanup`] value and removes it in the background when dropped, unless
/// [`Armed::disarm`]ed first: a dropped wait or a failed attempt leaves nothing behind.
#[derive(Debug)]
pub struct Armed<T: Cleanup>(Option<T>);

impl<T: Cleanup> Armed<T> {
    /// Arms `value`.
    pub fn new(value: T) -> Self {
        Armed(Some(value))
    }

    /// Hands the value over: it is no longer removed on drop.
    pub fn disarm(mut self) -> T {
        self.0.take().expect("armed until disarmed")
    }
}

impl<T: Cleanup> std::ops::Deref for Armed<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.0.as_ref().expect("armed until disarmed")
    }
}

impl<T: Cleanup> std::ops::DerefMut for Armed<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.0.as_mut().expect("armed until disarmed")
    }
}

impl<T: Cleanup> Drop for Armed<T> {
    fn drop(&mut self) {
        if let Some(value) = self.0.take() {
            spawn_cleanup(T::WHAT, value.cleanup());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[derive(Debug)]
    struct Counted(Arc<AtomicU32>);

    #[async_trait]
    impl Lease for Counted {
        async fn extend(&self, ttl: Duration) -> Result<Instant> {
            Ok(Instant::now() + ttl)
        }

        async fn release(&self) -> Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn won(releases: &Arc<AtomicU32>) -> Option<Acquired> {
        Some(Acquired::new(
            FencingToken(1),
            Instant::now() + Duration::from_secs(30),
            Box::new(Counted(releases.clone())),
        ))
    }

    #[tokio::test]
    async fn a_request_dropped_mid_flight_gives_back_what_it_takes() {
        let releases = Arc::new(AtomicU32::new(0));
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let taken = releases.clone();
        let request = run_detached(async move {
            let _ = wait.await;
            Ok(won(&taken))
        });
        // The caller gives up while the request is in flight.
        assert!(tokio::time::timeout(Duration::from_millis(20), request)
            .await
            .is_err());
        go.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(releases.load(Ordering::SeqCst), 1, "the late win was kept");
    }

    #[tokio::test]
    async fn a_request_that_finishes_hands_over_its_lock() {
        let releases = Arc::new(AtomicU32::new(0));
        let taken = releases.clone();
        let acquired = run_detached(async move { Ok(won(&taken)) }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(acquired.is_some());
        assert_eq!(releases.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_request_never_polled_sends_nothing() {
        let ran = Arc::new(AtomicU32::new(0));
        let counted = ran.clone();
        drop(run_detached(async move {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(None::<Acquired>)
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn outside_a_runtime_it_is_a_typed_error() {
        let request = run_detached(async { Ok(None::<Acquired>) });
        let out = futures_util::FutureExt::now_or_never(request).unwrap();
        assert!(matches!(out, Err(Error::Unsupported(_))));
    }

    #[tokio::test]
    async fn a_loss_signal_keeps_its_first_reason_and_wakes_every_waiter() {
        let signal = Arc::new(LossSignal::new());
        assert_eq!(signal.reason(), None);
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let signal = signal.clone();
                tokio::spawn(async move { signal.wait().await })
            })
            .collect();
        // A wait dropped before the mark leaves nothing behind.
        let dropped = tokio::time::timeout(Duration::from_millis(20), signal.wait()).await;
        assert!(dropped.is_err(), "resolved before the mark");
        assert!(signal.mark(LostReason::NotOwner));
        assert!(!signal.mark(LostReason::Expired), "marked twice");
        for waiter in waiters {
            let reason = tokio::time::timeout(Duration::from_secs(5), waiter).await;
            assert_eq!(reason.unwrap().unwrap(), LostReason::NotOwner);
        }
        // Marked already: at once, with the first reason.
        assert_eq!(signal.wait().await, LostReason::NotOwner);
        assert_eq!(signal.reason(), Some(LostReason::NotOwner));
    }

    #[test]
    fn renewal_gather_is_one_percent_of_the_ttl_within_1_to_5_ms_unless_a_batch_is_full() {
        let ms = Duration::from_millis;
        let gather = |ttl| super::renewal_gather(ttl, 1, 500);
        assert_eq!(gather(ms(10_000)), ms(5));
        assert_eq!(gather(Duration::from_secs(3600)), ms(5));
        assert_eq!(gather(ms(300)), ms(3));
        assert_eq!(gather(ms(100)), ms(1));
        assert_eq!(gather(Duration::ZERO), ms(1));
        // A full batch waiting: sent at once.
        assert_eq!(super::renewal_gather(ms(10_000), 499, 500), ms(5));
        assert_eq!(super::renewal_gather(ms(10_000), 500, 500), Duration::ZERO);
        assert_eq!(
            super::renewal_gather(ms(10_000), 9_000, 500),
            Duration::ZERO
        );
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_batches_start_one_sender_and_drain_in_batches() {
        let batches = Arc::new(super::RenewalBatches::default());
        let senders = Arc::new(AtomicU32::new(0));
        let ttl = Duration::from_secs(10);
        let push = |n: usize| {
            for _ in 0..n {
                let senders = senders.clone();
                batches.push(ttl, move || async move {
                    senders.fetch_add(1, Ordering::SeqCst);
                });
            }
        };
        push(5);
        tokio::task::yield_now().await;
        assert_eq!(
            senders.load(Ordering::SeqCst),
            1,
            "one sender for five renewals"
        );
        // A full batch waiting goes at once; the rest waits for others to join it.
        let started = tokio::time::Instant::now();
        assert_eq!(batches.next_batch(3, |t| *t).await.unwrap().len(), 3);
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(batches.next_batch(3, |t| *t).await.unwrap().len(), 2);
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(5),
            "the gather wait"
        );
        assert!(batches.next_batch(3, |t| *t).await.is_none());
        // The sender ended: the next renewal starts another.
        push(1);
        tokio::task::yield_now().await;
        assert_eq!(senders.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_until_retries_connection_errors_only_until_its_deadline() {
        let policy = RetryPolicy::default();
        let tries = AtomicU32::new(0);
        // The pauses are random, and a timer fires on a whole millisecond: many runs, from
        // starts off the millisecond, so a pause that ends just before the deadline is met.
        for run in 0..200u64 {
            tokio::time::advance(Duration::from_micros(137 * run % 1000)).await;
            tries.store(0, Ordering::SeqCst);
            let until = Instant::now() + Duration::from_millis(100);
            let result: Result<()> = retry_until(&policy, until, || async {
                tries.fetch_add(1, Ordering::SeqCst);
                assert!(Instant::now() < until, "run {run}: tried past its deadline");
                Err(Error::connection("test", "down"))
            })
            .await;
            assert!(result.unwrap_err().is_retryable());
            let tried = tries.load(Ordering::SeqCst);
            assert!((2..10).contains(&tried), "{tried} tries");
            assert!(Instant::now() < until, "run {run}: slept past its deadline");
        }
        // An answer that is not a connection error ends it at once.
        tries.store(0, Ordering::SeqCst);
        let result: Result<()> = retry_until(
            &policy,
            Instant::now() + Duration::from_secs(60),
            || async {
                tries.fetch_add(1, Ordering::SeqCst);
                Err(Error::lost("x", LostReason::NotOwner))
            },
        )
        .await;
        assert!(result.unwrap_err().is_lost());
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }
}
