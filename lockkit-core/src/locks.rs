//! The user's handle on a lock service, and the acquisition paths shared by every backend.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{field, Instrument};

use crate::backend::{Acquired, Backend};
use crate::capabilities::Capabilities;
use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::name::LockName;
use crate::options::LockOptions;
use crate::telemetry;

/// A handle on a lock service: what `lockkit::connect(url)` returns. Cheap to clone (clones
/// share the backend's connections); every method takes `&self`.
///
/// ```
/// # async fn demo(locks: lockkit_core::Locks) -> lockkit_core::Result<()> {
/// use std::time::Duration;
/// use lockkit_core::LockOptions;
///
/// // Wait as long as it takes, with the default options (30 s lease, renewed).
/// let guard = locks.acquire("orders/42").await?;
/// println!("token {}", guard.fencing_token());
/// guard.release().await?;
///
/// // One attempt: `None` if someone else holds it.
/// if let Some(guard) = locks.try_acquire("cron/nightly").await? {
///     guard.release().await?;
/// }
///
/// // Bounded wait and a shorter lease.
/// let opts = LockOptions::new()
///     .ttl(Duration::from_secs(5))
///     .wait_timeout(Duration::from_secs(2));
/// let rebuilt = locks
///     .with_lock_with("cache/rebuild", &opts, async |guard| guard.fencing_token())
///     .await?;
/// # let _ = rebuilt; Ok(()) }
/// ```
///
/// **Single attempts.** [`Locks::try_acquire`] is the way to make one attempt. `acquire`
/// with [`LockOptions::wait_timeout`] of zero makes the same single attempt but reports a
/// held lock as [`Error::Timeout`], so a wait budget computed down to zero still behaves
/// like a deadline.
#[derive(Clone)]
pub struct Locks {
    backend: Arc<dyn Backend>,
    defaults: LockOptions,
}

impl fmt::Debug for Locks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Locks")
            .field("backend", &self.backend)
            .field("defaults", &self.defaults)
            .finish()
    }
}

impl<B: Backend> From<B> for Locks {
    fn from(backend: B) -> Self {
        Locks::from_arc(Arc::new(backend))
    }
}

impl Locks {
    /// A handle on `backend`, with default options.
    pub fn new(backend: impl Backend) -> Self {
        Locks::from(backend)
    }

    /// A handle on a shared backend.
    pub fn from_arc(backend: Arc<dyn Backend>) -> Self {
        Locks {
            backend,
            defaults: LockOptions::new(),
        }
    }

    /// The same service with other default options for [`Locks::acquire`],
    /// [`Locks::try_acquire`] and [`Locks::with_lock`].
    #[must_use]
    pub fn with_defaults(mut self, defaults: LockOptions) -> Self {
        self.defaults = defaults;
        self
    }

    /// The default options.
    pub fn defaults(&self) -> &LockOptions {
        &self.defaults
    }

    /// The backend's short name (`sqlite`, `redis`, ...).
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// What the backend guarantees.
    pub fn capabilities(&self) -> Capabilities {
        self.backend.capabilities()
    }

    /// The backend itself.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The backend as its concrete type, for backend-specific inspection (e.g.
    /// `locks.backend_as::<lockkit::EtcdLock>()`); `None` if it is another type.
    pub fn backend_as<B: Backend>(&self) -> Option<&B> {
        let any: &dyn std::any::Any = &*self.backend;
        any.downcast_ref::<B>()
    }

    /// Who holds the lock `name` now (token, remaining lease, owner, where the backend can
    /// tell), or `None` if it is free. [`Error::Unsupported`] on backends that cannot tell
    /// ([`Capabilities::inspect`]).
    pub async fn inspect(&self, name: &str) -> Result<Option<crate::LockInfo>> {
        let name = LockName::new(name)?;
        self.admin("inspect a lock")?.inspect(&name).await
    }

    /// The locks held now whose names start with `prefix` (`""`: all), sorted by name.
    /// [`Error::Unsupported`] on backends that cannot list ([`Capabilities::list`]).
    pub async fn list(&self, prefix: &str) -> Result<Vec<crate::LockInfo>> {
        self.admin("list locks")?.list(prefix).await
    }

    /// Removes the lock `name` whoever holds it, for an operator clearing a stuck lock;
    /// `false` if it was free. The next holder gets a higher fencing token, so a holder that
    /// is still running is fenced off (and learns of the loss at its next renewal).
    /// [`Error::Unsupported`] on backends that cannot ([`Capabilities::force_release`]).
    pub async fn force_release(&self, name: &str) -> Result<bool> {
        let name = LockName::new(name)?;
        self.admin("remove a lock")?.force_release(&name).await
    }

    fn admin(&self, what: &str) -> Result<&dyn crate::admin::Admin> {
        self.backend.admin().ok_or_else(|| {
            Error::Unsupported(format!("the {} backend cannot {what}", self.backend.name()))
        })
    }

    /// Acquires `name` with the default options, waiting as long as they say (forever by
    /// default). The guard releases the lock when dropped.
    pub async fn acquire(&self, name: &str) -> Result<LockGuard> {
        self.acquire_with(name, &self.defaults).await
    }

    /// Acquires `name`, waiting up to `opts`' wait timeout ([`Error::Timeout`] after it).
    pub async fn acquire_with(&self, name: &str, opts: &LockOptions) -> Result<LockGuard> {
        acquire(&*self.backend, name, opts).await
    }

    /// One attempt with the default options: `Ok(None)` if the lock is held elsewhere.
    pub async fn try_acquire(&self, name: &str) -> Result<Option<LockGuard>> {
        self.try_acquire_with(name, &self.defaults).await
    }

    /// One attempt: `Ok(None)` if the lock is held elsewhere. The wait timeout of `opts`
    /// is not used.
    pub async fn try_acquire_with(
        &self,
        name: &str,
        opts: &LockOptions,
    ) -> Result<Option<LockGuard>> {
        try_acquire(&*self.backend, name, opts).await
    }

    /// Runs `f` while holding `name` (default options), then releases the lock and returns
    /// `f`'s output.
    ///
    /// If the lock is lost while `f` runs, `f` is cancelled (dropped at its next await point)
    /// and the result is [`Error::LockLost`]; a failing release is reported too, since the
    /// work may then have run without exclusivity.
    pub async fn with_lock<F, T>(&self, name: &str, f: F) -> Result<T>
    where
        F: AsyncFnOnce(&LockGuard) -> T,
    {
        self.with_lock_with(name, &self.defaults, f).await
    }

    /// [`Locks::with_lock`] with explicit options.
    pub async fn with_lock_with<F, T>(&self, name: &str, opts: &LockOptions, f: F) -> Result<T>
    where
        F: AsyncFnOnce(&LockGuard) -> T,
    {
        let guard = self.acquire_with(name, opts).await?;
        let lost = guard.lost();
        let out = tokio::select! {
            biased;
            reason = lost => return Err(Error::lost(name, reason)),
            out = f(&guard) => out,
        };
        guard.release().await?;
        Ok(out)
    }
}

/// Checks the name and options before anything is sent, and opens the acquisition's span.
fn prepare(
    lock: &dyn Backend,
    name: &str,
    opts: &LockOptions,
) -> Result<(&'static str, LockName, Capabilities, tracing::Span)> {
    let backend = lock.name();
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
    Ok((backend, name, caps, span))
}

async fn acquire(lock: &dyn Backend, name: &str, opts: &LockOptions) -> Result<LockGuard> {
    let (backend, name, caps, span) = prepare(lock, name, opts)?;
    async {
        let started = Instant::now();
        let result = match opts.wait {
            Some(wait) if wait.is_zero() => {
                match with_retries(opts, false, None, || {
                    fresh_or_none(lock, lock.try_lock(&name, opts))
                })
                .await
                .map_err(no_deadline)
                {
                    Ok(Some(acquired)) => Ok(acquired),
                    Ok(None) => Err(timeout(&name, started)),
                    Err(e) => Err(e),
                }
            }
            Some(wait) if started.checked_add(wait).is_some() => {
                let deadline = started + wait;
                with_retries(opts, true, Some(deadline), || {
                    fresh(lock, lock.lock(&name, opts, Some(deadline)))
                })
                .await
                .map_err(|e| e.unwrap_or_else(|| timeout(&name, started)))
            }
            // No deadline, or one too far away to represent.
            _ => with_retries(opts, true, None, || {
                fresh(lock, lock.lock(&name, opts, None))
            })
            .await
            .map_err(no_deadline),
        };
        let guard = finish(backend, &name, opts, &caps, started, result.map(Some))?;
        guard.ok_or_else(|| Error::Unsupported("backend returned no lock".into()))
    }
    .instrument(span)
    .await
}

async fn try_acquire(
    lock: &dyn Backend,
    name: &str,
    opts: &LockOptions,
) -> Result<Option<LockGuard>> {
    let (backend, name, caps, span) = prepare(lock, name, opts)?;
    async {
        let started = Instant::now();
        let result = with_retries(opts, false, None, || {
            fresh_or_none(lock, lock.try_lock(&name, opts))
        })
        .await
        .map_err(no_deadline);
        finish(backend, &name, opts, &caps, started, result)
    }
    .instrument(span)
    .await
}

/// Refuses a grant whose lease had already ended when the reply arrived (a reply slower than
/// the TTL): another client may hold the lock by now. The lease is released in the
/// background and the refusal is a retryable error, so the caller's retry policy and
/// deadline decide whether to try again.
async fn fresh(
    lock: &dyn Backend,
    attempt: impl std::future::Future<Output = Result<Acquired>>,
) -> Result<Acquired> {
    let acquired = attempt.await?;
    if Instant::now() < acquired.valid_until {
        return Ok(acquired);
    }
    tracing::debug!(
        token = acquired.token.0,
        "the grant arrived after its lease ended"
    );
    crate::backend::spawn_cleanup("releasing a grant that arrived too late", async move {
        acquired.lease.release().await
    });
    Err(Error::connection(
        lock.name(),
        "the lock was granted after its lease had already ended (the reply was slower than \
         the TTL); released",
    ))
}

/// [`fresh`] for a single attempt.
async fn fresh_or_none(
    lock: &dyn Backend,
    attempt: impl std::future::Future<Output = Result<Option<Acquired>>>,
) -> Result<Option<Acquired>> {
    match attempt.await? {
        Some(acquired) => fresh(lock, async { Ok(acquired) }).await.map(Some),
        None => Ok(None),
    }
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

/// Runs `attempt`, retrying connection errors with the options' back-off, never past
/// `deadline`. A waiter (`waiting`) rides out a server restart: it retries through up to the
/// policy's `max_outage` of consecutive failures; a single attempt retries at most
/// `max_retries` times. A policy of no retries is obeyed either way.
///
/// Fails with the attempt's error, or with `None` when the deadline passed during an attempt
/// that had not failed yet; a deadline passing while the service is down (during an attempt
/// after a connection error, or before the next retry) gives that connection error, which
/// names the cause where a bare timeout would hide it.
pub(crate) async fn with_retries<T, F, Fut>(
    opts: &LockOptions,
    waiting: bool,
    deadline: Option<Instant>,
    mut attempt: F,
) -> std::result::Result<T, Option<Error>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let policy = opts.retry;
    let mut retry: u32 = 0;
    let mut outage_since: Option<Instant> = None;
    let mut last: Option<Error> = None;
    // An attempt that runs longer than this before failing found the service up meanwhile.
    let healthy_after = policy.max_backoff.max(Duration::from_secs(1));
    loop {
        let began = Instant::now();
        let result = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, attempt()).await {
                Ok(result) => result,
                // Waiting behind a holder on a working service: a plain timeout.
                Err(_) if began.elapsed() > healthy_after => return Err(None),
                Err(_) => return Err(last),
            },
            None => attempt().await,
        };
        let e = match result {
            Err(e) if e.is_retryable() && policy.max_retries > 0 => e,
            Ok(value) => return Ok(value),
            Err(e) => return Err(Some(e)),
        };
        if began.elapsed() > healthy_after {
            // The attempt waited a while before failing: the service was up meanwhile, so
            // this is a new outage, not more of the last one.
            outage_since = None;
            retry = 0;
        }
        let since = *outage_since.get_or_insert_with(Instant::now);
        let delay = policy.backoff(retry);
        let resume = Instant::now().checked_add(delay);
        let allowed = if waiting {
            resume.is_some_and(|at| at.duration_since(since) < policy.max_outage)
        } else {
            retry < policy.max_retries
        };
        let past_deadline = deadline.is_some_and(|d| resume.is_none_or(|at| at >= d));
        if !allowed || past_deadline {
            return Err(Some(e));
        }
        if waiting && retry >= policy.max_retries {
            tracing::warn!(error = %e, retry, ?delay, "the lock service is unreachable; waiting");
        } else {
            tracing::debug!(error = %e, retry, ?delay, "retrying after a connection error");
        }
        last = Some(e);
        retry = retry.saturating_add(1);
        tokio::time::sleep(delay.max(Duration::from_millis(1))).await;
    }
}

/// The error of a retried call that had no deadline: it always has one.
fn no_deadline(e: Option<Error>) -> Error {
    e.unwrap_or_else(|| Error::Unsupported("an acquisition without a deadline timed out".into()))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use crate::backend::{async_trait, Lease};
    use crate::error::LostReason;
    use crate::options::RetryPolicy;
    use crate::token::FencingToken;

    use super::*;

    /// Grants every lock, but the first `stale` grants arrive after their lease ended (a
    /// reply slower than the TTL).
    #[derive(Debug, Default)]
    struct SlowGrants {
        stale: AtomicU32,
        grants: AtomicU32,
        releases: Arc<AtomicU32>,
    }

    #[derive(Debug)]
    struct CountedLease(Arc<AtomicU32>);

    #[async_trait]
    impl Lease for CountedLease {
        async fn extend(&self, ttl: Duration) -> Result<Instant> {
            Ok(Instant::now() + ttl)
        }

        async fn release(&self) -> Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    impl SlowGrants {
        fn grant(&self, opts: &LockOptions) -> Acquired {
            let n = self.grants.fetch_add(1, Ordering::SeqCst);
            let late = self
                .stale
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| s.checked_sub(1))
                .is_ok();
            let now = Instant::now();
            let valid_until = if late {
                now - Duration::from_millis(1)
            } else {
                now + opts.ttl
            };
            let lease = Box::new(CountedLease(self.releases.clone()));
            Acquired::new(FencingToken(u64::from(n) + 1), valid_until, lease)
        }
    }

    #[async_trait]
    impl Backend for SlowGrants {
        fn name(&self) -> &'static str {
            "slow"
        }

        fn capabilities(&self) -> Capabilities {
            Capabilities::new(Duration::from_millis(1))
                .renewal(true)
                .lease_expiry(true)
        }

        async fn try_lock(&self, _: &LockName, opts: &LockOptions) -> Result<Option<Acquired>> {
            Ok(Some(self.grant(opts)))
        }

        async fn lock(
            &self,
            _: &LockName,
            opts: &LockOptions,
            _: Option<Instant>,
        ) -> Result<Acquired> {
            Ok(self.grant(opts))
        }
    }

    /// A grant whose lease had already ended when it arrived is released and tried again,
    /// never handed out as a guard, on every acquisition path.
    #[tokio::test]
    async fn a_grant_past_its_lease_is_retried_not_handed_out() {
        for path in ["acquire", "acquire_with zero wait", "try_acquire"] {
            let backend = SlowGrants::default();
            backend.stale.store(2, Ordering::SeqCst);
            let releases = backend.releases.clone();
            let locks = Locks::new(backend);
            let guard = match path {
                "acquire" => locks.acquire("x").await.unwrap(),
                "try_acquire" => locks.try_acquire("x").await.unwrap().unwrap(),
                _ => {
                    let opts = LockOptions::new().wait_timeout(Duration::ZERO);
                    locks.acquire_with("x", &opts).await.unwrap()
                }
            };
            assert!(guard.is_held(), "{path}: handed out a guard past its lease");
            assert_eq!(guard.fencing_token(), FencingToken(3), "{path}");
            assert_eq!(guard.lost_reason(), None::<LostReason>);
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(
                releases.load(Ordering::SeqCst),
                2,
                "{path}: stale grants kept"
            );
            guard.release().await.unwrap();
        }
    }

    /// Fails every attempt with a connection error until `until`, then grants: a server
    /// restart as the client sees it.
    #[derive(Debug)]
    struct Outage {
        until: Instant,
        /// Attempts after the first hang until the outage ends (a client stuck connecting).
        hang: bool,
        attempts: AtomicU32,
        releases: Arc<AtomicU32>,
    }

    impl Outage {
        fn new(lasting: Duration) -> Self {
            Outage {
                until: Instant::now() + lasting,
                hang: false,
                attempts: AtomicU32::new(0),
                releases: Arc::default(),
            }
        }

        fn attempt(&self, opts: &LockOptions) -> Result<Acquired> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            if Instant::now() < self.until {
                return Err(Error::connection("outage", "connection refused"));
            }
            let lease = Box::new(CountedLease(self.releases.clone()));
            Ok(Acquired::new(
                FencingToken(1),
                Instant::now() + opts.ttl,
                lease,
            ))
        }
    }

    #[async_trait]
    impl Backend for Outage {
        fn name(&self) -> &'static str {
            "outage"
        }

        fn capabilities(&self) -> Capabilities {
            Capabilities::new(Duration::from_millis(1))
                .renewal(true)
                .lease_expiry(true)
        }

        async fn try_lock(&self, _: &LockName, opts: &LockOptions) -> Result<Option<Acquired>> {
            self.attempt(opts).map(Some)
        }

        async fn lock(
            &self,
            _: &LockName,
            opts: &LockOptions,
            _: Option<Instant>,
        ) -> Result<Acquired> {
            if self.hang && self.attempts.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep_until(self.until).await;
            }
            self.attempt(opts)
        }
    }

    /// A waiter with wait time left rides out a server outage longer than the retry policy's
    /// few quick retries: it keeps retrying with back-off until its deadline.
    #[tokio::test]
    async fn a_waiter_rides_out_an_outage_until_its_deadline() {
        let locks = Locks::new(Outage::new(Duration::from_millis(1500)));
        let opts = LockOptions::new().wait_timeout(Duration::from_secs(20));
        let started = Instant::now();
        let guard = locks.acquire_with("x", &opts).await.unwrap();
        assert!(guard.is_held());
        // Back-off is capped at the policy's maximum (1 s), so the waiter is back within
        // about a second of the outage's end.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        guard.release().await.unwrap();
    }

    /// An outage that outlasts the wait ends with the connection error (not a timeout that
    /// hides the cause, and not a hang) by the deadline.
    #[tokio::test]
    async fn an_outage_past_the_deadline_is_the_connection_error() {
        let backend = Outage::new(Duration::from_secs(3600));
        let locks = Locks::new(backend);
        let opts = LockOptions::new().wait_timeout(Duration::from_millis(800));
        let started = Instant::now();
        let err = locks.acquire_with("x", &opts).await.unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let attempts = locks
            .backend_as::<Outage>()
            .unwrap()
            .attempts
            .load(Ordering::SeqCst);
        assert!(
            attempts > 4,
            "gave up after {attempts} attempts with wait time left"
        );
    }

    /// A waiter without a deadline rides out a short outage too, and gives up with the
    /// connection error after the policy's outage budget instead of retrying forever.
    #[tokio::test]
    async fn an_unbounded_waiter_rides_out_an_outage_within_its_budget() {
        let locks = Locks::new(Outage::new(Duration::from_millis(1500)));
        let guard = locks.acquire("x").await.unwrap();
        guard.release().await.unwrap();

        let locks = Locks::new(Outage::new(Duration::from_secs(3600)));
        let policy = RetryPolicy::default().max_outage(Duration::from_millis(700));
        let opts = LockOptions::new().retry(policy);
        let started = Instant::now();
        let err = locks.acquire_with("x", &opts).await.unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    /// A deadline that passes while a retry is stuck connecting still reports the
    /// connection error that started the outage, not a bare timeout.
    #[tokio::test]
    async fn a_deadline_during_a_stuck_retry_is_the_connection_error() {
        let mut backend = Outage::new(Duration::from_secs(3600));
        backend.hang = true;
        let locks = Locks::new(backend);
        let opts = LockOptions::new().wait_timeout(Duration::from_millis(500));
        let err = locks.acquire_with("x", &opts).await.unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
    }

    /// Retrying can be turned off: the first connection error is returned at once, even with
    /// wait time left; single attempts keep the policy's retry count.
    #[tokio::test]
    async fn retries_follow_the_policy_where_there_is_no_wait() {
        let locks = Locks::new(Outage::new(Duration::from_secs(3600)));
        let none = LockOptions::new()
            .wait_timeout(Duration::from_secs(20))
            .retry(RetryPolicy::NONE);
        locks.acquire_with("x", &none).await.unwrap_err();
        let attempts = || {
            locks
                .backend_as::<Outage>()
                .unwrap()
                .attempts
                .load(Ordering::SeqCst)
        };
        assert_eq!(attempts(), 1);
        locks.try_acquire("x").await.unwrap_err();
        assert_eq!(attempts(), 1 + 1 + RetryPolicy::default().max_retries);
    }

    /// When every grant arrives too late, acquisition ends with a retryable error once the
    /// retries are spent, instead of a guard that is already lost.
    #[tokio::test]
    async fn grants_that_always_arrive_late_are_an_error() {
        let backend = SlowGrants::default();
        backend.stale.store(u32::MAX, Ordering::SeqCst);
        let locks = Locks::new(backend);
        let err = locks.try_acquire("x").await.unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        assert!(err.to_string().contains("after its lease"), "{err}");
    }
}
