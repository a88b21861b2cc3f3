//! The RAII guard and the one lease keeper that renews, watches and releases for every backend.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{sleep_until, timeout_at, Instant};
use tracing::Instrument;

use crate::backend::{Acquired, Lease};
use crate::capabilities::Capabilities;
use crate::error::{Error, LostReason, Result};
use crate::name::LockName;
use crate::options::{validate_ttl, LockOptions};
use crate::telemetry;
use crate::token::FencingToken;

/// A held lock. Dropping it releases the lock in the background (promptly, without blocking,
/// also outside a runtime); [`LockGuard::release`] releases it and reports whether the lock
/// was still ours. While it lives, its lease is renewed in the background (unless renewal
/// is off), and [`LockGuard::lost`] resolves if the lock is lost anyway.
#[derive(Debug)]
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard {
    shared: Arc<Shared>,
    lease: Arc<dyn Lease>,
    /// The runtime the guard was made on, where its keeper runs.
    runtime: tokio::runtime::Handle,
}

/// Stops the keeper (the guard dropped, or [`LockGuard::release`]): it then releases in the
/// background, unless `release` releases from the caller's task. A keeper still waiting to
/// start (a lease that never signals loss, held only briefly) is started now, to release at
/// once.
impl Drop for LockGuard {
    fn drop(&mut self) {
        self.shared.stop();
        self.start_keeper();
    }
}

/// [`Shared::keeper`]: the keeper waits in the [nursery](crate::nursery) to start.
const KEEPER_WAITING: u8 = 0;
/// [`Shared::keeper`]: the keeper was started (or is being started).
const KEEPER_STARTED: u8 = 1;
/// [`Shared::keeper`]: the guard was released before its keeper started, or the nursery
/// closed (its runtime shut down) while the keeper waited: it never starts.
const KEEPER_NEVER: u8 = 2;

#[derive(Debug)]
pub(crate) struct Shared {
    backend: &'static str,
    name: LockName,
    token: FencingToken,
    acquired_at: Instant,
    /// The backend's shortest and longest TTL, for [`LockGuard::extend`] (not all of its
    /// [`Capabilities`]: every held lock keeps this).
    ttl_limits: (Duration, Duration),
    clock: Mutex<Clock>,
    /// Wakes the keeper when `clock` changes or `stopped` is set.
    clock_changed: Notify,
    /// Held around every `Lease::extend` (renewals and explicit extends): one request at a
    /// time, so the server applies them in the order they were made and the clock always
    /// holds the answer to the request it applied last.
    extending: tokio::sync::Mutex<()>,
    /// Why the lock was lost, once it was.
    lost: Mutex<Option<LostReason>>,
    /// Set when the keeper has finished (released, or its runtime shut down).
    finished: std::sync::atomic::AtomicBool,
    /// Set by [`LockGuard::release`], which releases from the caller's task: the keeper then
    /// stops without releasing.
    releasing: std::sync::atomic::AtomicBool,
    /// Set when the guard is dropped or released: the keeper stops (a flag and the keeper's
    /// wake-up rather than a channel, which every held lock would allocate).
    stopped: std::sync::atomic::AtomicBool,
    /// Wakes [`LockGuard::lost`] futures when `lost` or `finished` changes.
    lost_changed: Notify,
    /// Whether the keeper started: `KEEPER_WAITING`, `KEEPER_STARTED` or `KEEPER_NEVER`.
    keeper: std::sync::atomic::AtomicU8,
}

#[derive(Debug, Clone, Copy)]
struct Clock {
    /// The holder's TTL: the options' or the latest `extend`'s.
    ttl: Duration,
    /// Until when the backend confirmed the lease (acquisition, last renewal or `extend`).
    lease_until: Instant,
    /// When the request that confirmed `lease_until` was sent.
    lease_start: Instant,
    /// Without automatic renewal: the end the holder asked for (the TTL from the acquisition
    /// or the latest `extend`). `None`: renewed for as long as the guard lives.
    hold_until: Option<Instant>,
    /// How often to renew: with automatic renewal, and for a lease whose server-side TTL is
    /// fixed ([`Lease::fixed_ttl`]) while `lease_until` falls short of `hold_until`.
    renew_every: Option<Duration>,
}

impl Clock {
    /// Until when the lock is known held: the confirmed lease, and no longer than the holder
    /// asked for.
    fn valid_until(&self) -> Instant {
        self.hold_until
            .map_or(self.lease_until, |hold| hold.min(self.lease_until))
    }

    /// When the next renewal is due (timed from the start of the lease, not from now), if
    /// one is: a lease that already covers the holder's end is not renewed. Rounded up onto
    /// the process's [renewal grid](on_renewal_grid).
    fn renewal_due(&self) -> Option<Instant> {
        let every = self.renew_every?;
        if self.hold_until.is_some_and(|hold| self.lease_until >= hold) {
            return None;
        }
        let due = self.lease_start + every;
        let left = self.lease_until.saturating_duration_since(due);
        Some(on_renewal_grid(due, every.min(left)))
    }
}

/// `at`, rounded up onto a grid shared by every guard of the process, counted from one
/// process-wide instant: steps of a power of two milliseconds (1 to 64 ms), the largest
/// within a 32nd of `slack` (the lesser of the renewal interval and what is left of the lease
/// when the renewal falls due: 64 ms for a 10 s TTL at the default third); not rounded if a
/// 32nd of `slack` is under 1 ms.
///
/// Each guard renews on its own schedule; with thousands held, some renewal would fall due
/// every millisecond, and each would wake the runtime on its own. On the grid, the renewals
/// due within one step wake it once, together, and reach a batching backend's queue at the
/// same moment; the steps being powers of two, guards of different TTLs share the points of
/// the coarser grid. The renewal starts at most a step later than due: a 32nd of the lease
/// it still has left.
fn on_renewal_grid(at: Instant, slack: Duration) -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let most = (slack / 32).as_millis().min(64) as u64;
    if most == 0 {
        return at;
    }
    // The largest power of two at most `most`.
    let step = Duration::from_millis(1 << most.ilog2());
    round_up(at, *ORIGIN.get_or_init(Instant::now), step)
}

/// The first point at or after `at` of the grid of `step` through `origin` (on either side
/// of it: a paused test runtime's clock may have run ahead of the instant taken first).
fn round_up(at: Instant, origin: Instant, step: Duration) -> Instant {
    let step = step.as_nanos();
    let nanos = |d: Duration| d.as_nanos() % step;
    match at.checked_duration_since(origin) {
        Some(after) => match nanos(after) {
            0 => at,
            past => at + Duration::from_nanos((step - past) as u64),
        },
        None => at + Duration::from_nanos(nanos(origin - at) as u64),
    }
}

impl Shared {
    fn clock(&self) -> MutexGuard<'_, Clock> {
        // The lock is never held across an await or a panic point.
        self.clock.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lost_reason(&self) -> Option<LostReason> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Tells the keeper to stop; idempotent, and needs no runtime.
    fn stop(&self) {
        if !self.stopped.swap(true, std::sync::atomic::Ordering::AcqRel) {
            // A permit if the keeper is busy: it sees the flag on its next turn.
            self.clock_changed.notify_one();
        }
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Marks the lock lost, once; later calls keep the first reason.
    fn mark_lost(&self, reason: LostReason) {
        let first = {
            let mut slot = self.lost.lock().unwrap_or_else(|e| e.into_inner());
            let first = slot.is_none();
            if first {
                *slot = Some(reason.clone());
            }
            first
        };
        if first {
            self.lost_changed.notify_waiters();
            metrics::counter!(
                telemetry::LOSSES_TOTAL,
                "backend" => self.backend,
                "reason" => telemetry::reason_label(&reason),
            )
            .increment(1);
            tracing::warn!(lock = %self.name, token = self.token.0, %reason, "lock lost");
        }
    }
}

impl Shared {
    /// Takes the keeper's start on the caller: true if it was waiting (and is now started).
    pub(crate) fn claim_keeper(&self) -> bool {
        self.keeper_from(KEEPER_STARTED)
    }

    /// Gives up a keeper still waiting: true if it was (and now never starts).
    pub(crate) fn forgo_keeper(&self) -> bool {
        self.keeper_from(KEEPER_NEVER)
    }

    fn keeper_from(&self, to: u8) -> bool {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        self.keeper
            .compare_exchange(KEEPER_WAITING, to, AcqRel, Acquire)
            .is_ok()
    }

    /// What the keeper does when it ends, for a keeper that never started.
    pub(crate) fn keeper_done(&self) {
        self.record_hold();
        self.finish();
    }

    /// Records how long the lock was held (the hold-time histogram), and returns it.
    fn record_hold(&self) -> Duration {
        let held = self.acquired_at.elapsed();
        metrics::histogram!(telemetry::HOLD_SECONDS, "backend" => self.backend)
            .record(held.as_secs_f64());
        held
    }

    /// Marks the keeper finished, so `lost()` futures resolve.
    pub(crate) fn finish(&self) {
        self.finished
            .store(true, std::sync::atomic::Ordering::Release);
        self.lost_changed.notify_waiters();
    }

    /// The keeper's span.
    fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "lockkit.hold",
            backend = self.backend,
            lock = %self.name,
            token = self.token.0,
        )
    }

    /// When the keeper first has something to do: the first renewal, or the end of the lease.
    fn first_duty(&self) -> Instant {
        let clock = self.clock();
        let valid_until = clock.valid_until();
        clock
            .renewal_due()
            .map_or(valid_until, |at| at.min(valid_until))
    }
}

impl LockGuard {
    /// Makes the guard of a fresh acquisition and starts its keeper, at once or from the
    /// [nursery](crate::nursery). Needs a Tokio runtime.
    pub(crate) fn start(
        backend: &'static str,
        name: LockName,
        acquired: Acquired,
        opts: &LockOptions,
        caps: &Capabilities,
    ) -> Result<LockGuard> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Unsupported("lockkit guards need to be created inside a Tokio runtime".into())
        })?;
        let fixed_ttl = acquired.lease.fixed_ttl();
        let lease_ttl = fixed_ttl.unwrap_or(opts.ttl);
        let renew_every = match (opts.auto_renew, fixed_ttl) {
            (true, _) => Some(opts.renewal_interval()),
            // The holder's TTL may outlast the server's: renew until it is covered.
            (false, Some(fixed)) => Some((fixed / 3).max(Duration::from_millis(1))),
            (false, None) => None,
        };
        let now = Instant::now();
        let lease_start = acquired.valid_until.checked_sub(lease_ttl).unwrap_or(now);
        // Without renewal the holder keeps the lock for its TTL; a server that fixed a
        // shorter lease (a capped session timeout) is renewed until then.
        let hold_until = match fixed_ttl {
            Some(_) => lease_start
                .checked_add(opts.ttl)
                .unwrap_or(acquired.valid_until),
            None => acquired.valid_until,
        };
        let shared = Arc::new(Shared {
            backend,
            name,
            token: acquired.token,
            acquired_at: now,
            ttl_limits: (caps.min_ttl, caps.max_ttl),
            clock: Mutex::new(Clock {
                ttl: opts.ttl,
                lease_until: acquired.valid_until,
                lease_start,
                hold_until: (!opts.auto_renew).then_some(hold_until),
                renew_every,
            }),
            clock_changed: Notify::new(),
            extending: tokio::sync::Mutex::new(()),
            lost: Mutex::new(None),
            finished: std::sync::atomic::AtomicBool::new(false),
            releasing: std::sync::atomic::AtomicBool::new(false),
            stopped: std::sync::atomic::AtomicBool::new(false),
            lost_changed: Notify::new(),
            keeper: std::sync::atomic::AtomicU8::new(KEEPER_WAITING),
        });
        let lease: Arc<dyn Lease> = Arc::from(acquired.lease);
        // A lease whose backend never signals loss needs its keeper only for its first
        // renewal or the end of the lease: if that is far enough, the keeper waits in the
        // nursery, and a guard released before it starts costs no task at all.
        let queued = !lease.signals_loss()
            && shared.first_duty() > now + crate::nursery::LATEST
            && crate::nursery::queue(&runtime, &shared, &lease, shared.span());
        let guard = LockGuard {
            shared,
            lease,
            runtime,
        };
        if !queued {
            guard.start_keeper();
        }
        Ok(guard)
    }

    /// Starts the keeper if it is still waiting.
    fn start_keeper(&self) {
        if self.shared.claim_keeper() {
            let keeper = keep(self.shared.clone(), self.lease.clone());
            self.runtime.spawn(keeper.instrument(self.shared.span()));
        }
    }

    /// The lease this guard holds, for the election handle built on it.
    pub(crate) fn lease(&self) -> &Arc<dyn Lease> {
        &self.lease
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        self.shared.name.as_str()
    }

    /// The backend that holds the lock (`sqlite`, `redis`, ...).
    pub fn backend(&self) -> &'static str {
        self.shared.backend
    }

    /// This acquisition's fencing token: strictly greater than every earlier token of the
    /// same lock name.
    pub fn fencing_token(&self) -> FencingToken {
        self.shared.token
    }

    /// Whether the lock is still held: not lost, and the lease not past its known validity.
    pub fn is_held(&self) -> bool {
        self.shared.lost_reason().is_none() && Instant::now() < self.valid_until()
    }

    /// Notes what a request made with this guard's lease learnt: a [`Error::LockLost`]
    /// marks the guard lost at once (its holder need not wait for the next renewal to find
    /// out). Returns the error.
    pub(crate) fn note(&self, error: Error) -> Error {
        if let Error::LockLost { reason, .. } = &error {
            self.shared.mark_lost(reason.clone());
        }
        error
    }

    /// Why the lock was lost, if it was.
    pub fn lost_reason(&self) -> Option<LostReason> {
        self.shared.lost_reason()
    }

    /// Until when the lease is known to be valid: confirmed by the backend, and no later than
    /// the end the holder asked for (the TTL, or the latest [`LockGuard::extend`]) when
    /// automatic renewal is off. It moves forward with every renewal, including those that
    /// carry a lease whose server-side TTL is fixed (a Consul session) to an `extend` longer
    /// than that TTL.
    pub fn valid_until(&self) -> Instant {
        self.shared.clock().valid_until()
    }

    /// Resolves when the lock is lost: the lease expired, the backend's session is gone, or
    /// renewal could not keep the lease. Use it to stop work that needs the lock:
    ///
    /// ```no_run
    /// # async fn demo(guard: lockkit_core::LockGuard) {
    /// tokio::select! {
    ///     reason = guard.lost() => eprintln!("stopping: {reason}"),
    ///     _ = async { /* the protected work */ } => {}
    /// }
    /// # }
    /// ```
    ///
    /// The future does not borrow the guard; once the guard is released or dropped it
    /// resolves with [`LostReason::Released`].
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        let shared = self.shared.clone();
        async move {
            loop {
                let changed = shared.lost_changed.notified();
                tokio::pin!(changed);
                // Registered before the check, so a change in between still wakes us.
                changed.as_mut().enable();
                if let Some(reason) = shared.lost_reason() {
                    return reason;
                }
                if shared.finished.load(std::sync::atomic::Ordering::Acquire) {
                    return LostReason::Released;
                }
                changed.await;
            }
        }
    }

    /// Extends the lease to `ttl` from now; later automatic renewals use `ttl` too. A lease
    /// whose server-side TTL is fixed ([`Lease::fixed_ttl`]) and shorter than `ttl` is
    /// renewed by the keeper until `ttl` from now is covered, also with renewal off.
    /// Fails with [`Error::LockLost`] if the lock is no longer ours, or if no answer came
    /// before the lease ran out (the lock is then lost, as after such a renewal), and with
    /// [`Error::InvalidOptions`] for a TTL outside the backend's limits.
    pub async fn extend(&self, ttl: Duration) -> Result<()> {
        validate_ttl(ttl, self.shared.ttl_limits.0, self.shared.ttl_limits.1)?;
        // A shorter TTL may bring the next renewal before the nursery would start the keeper.
        self.start_keeper();
        // Waits for a renewal in flight: it is applied first, and this extend after it.
        let _one_at_a_time = self.shared.extending.lock().await;
        let started = Instant::now();
        // Like a renewal, it must answer before the lease runs out: the keeper's renewals
        // wait for it, so while it hangs, only this deadline can tell the holder in time.
        let valid_until = self.shared.clock().valid_until();
        let Ok(result) = timeout_at(valid_until, self.lease.extend(ttl)).await else {
            self.shared.mark_lost(LostReason::RenewalFailed(
                "no answer before the lease ran out".into(),
            ));
            return Err(Error::lost(
                self.name(),
                self.shared.lost_reason().unwrap_or(LostReason::Expired),
            ));
        };
        if let Some(reason) = self.shared.lost_reason() {
            return Err(Error::lost(self.name(), reason));
        }
        match result {
            Ok(lease_until) => {
                {
                    let mut clock = self.shared.clock();
                    clock.ttl = ttl;
                    clock.lease_until = lease_until;
                    clock.lease_start = started;
                    match clock.hold_until.as_mut() {
                        Some(hold) => *hold = started + ttl,
                        None => {
                            if let Some(every) = clock.renew_every.as_mut() {
                                *every = (*every).min(ttl / 3).max(Duration::from_millis(1));
                            }
                        }
                    }
                }
                self.shared.clock_changed.notify_one();
                Ok(())
            }
            Err(Error::LockLost { reason, .. }) => {
                self.shared.mark_lost(reason.clone());
                Err(Error::lost(self.name(), reason))
            }
            Err(e) => Err(e),
        }
    }

    /// Releases the lock now. Fails with [`Error::LockLost`] if the lock was lost before
    /// (the lease expired or was taken over): the protected work may then have overlapped
    /// with another holder.
    ///
    /// Dropping this future before it completes (a `select!`, a timeout) does not leave the
    /// lock held until its TTL: on a Tokio runtime, the release already under way goes on in
    /// a task of its own, as an acquisition does
    /// ([`run_detached`](crate::backend::run_detached)). Polled outside a Tokio runtime, or
    /// dropped by a runtime that is shutting down, a release cut short leaves the lease to end
    /// at its TTL.
    pub async fn release(self) -> Result<()> {
        let span = tracing::info_span!(
            "lockkit.release",
            backend = self.shared.backend,
            lock = %self.shared.name,
            token = self.shared.token.0,
        );
        async {
            // Released from here, not by the keeper: no hand-off to another task on the way.
            // The keeper stops (cancelling a renewal in flight) without releasing.
            self.shared
                .releasing
                .store(true, std::sync::atomic::Ordering::Release);
            self.shared.stop();
            // A keeper still waiting never starts: it would have had nothing to do.
            if self.shared.forgo_keeper() {
                self.shared.keeper_done();
            }
            let (shared, lease) = (self.shared.clone(), self.lease.clone());
            let release = async move {
                // After any renewal in flight, so the server sees the release last.
                let _one_at_a_time = shared.extending.lock().await;
                release_with_retries(&shared, lease.as_ref()).await
            };
            let result = match tokio::runtime::Handle::try_current() {
                Ok(_) => crate::backend::run_detached(release).await,
                // No runtime to finish it on if the caller stops waiting: here, as before.
                Err(_) => release.await,
            };
            if let Some(reason) = self.shared.lost_reason() {
                return Err(Error::lost(self.name(), reason));
            }
            result
        }
        .instrument(span)
        .await
    }
}

/// The keeper: one task per guard (started at acquisition, or a little later by the
/// [nursery](crate::nursery)). Renews the lease, watches the backend's loss signal and
/// the lease's validity, and releases when the guard asks or is dropped.
///
/// A plain function returning an `async move` block rather than an `async fn`: the block
/// uses its captures in place, where an `async fn` would keep its arguments twice in every
/// guard's task (see `keeper_task_fits_in_512_bytes`).
#[allow(clippy::manual_async_fn)]
pub(crate) fn keep(shared: Arc<Shared>, lease: Arc<dyn Lease>) -> impl Future<Output = ()> + Send {
    /// Marks the keeper finished however it ends, so `lost()` futures resolve: also when
    /// its runtime drops it, and when that happens before it ever ran (a runtime shutting
    /// down drops what is spawned on it unpolled), which is why the task owns it from the
    /// start rather than making it when it first runs.
    struct Finished(Arc<Shared>);
    impl Drop for Finished {
        fn drop(&mut self) {
            self.0.finish();
        }
    }
    let finished = Finished(shared);
    async move {
        let shared = &finished.0;
        // The backend's loss signal, made once and polled for as long as the lock is held.
        let lease_lost = lease.lost();
        tokio::pin!(lease_lost);
        // One timer and one registration for clock changes, kept across the turns of the loop
        // (re-armed, not re-made): with thousands of guards a process does little else.
        let timer = sleep_until(Instant::now());
        tokio::pin!(timer);
        let clock_changed = shared.clock_changed.notified();
        tokio::pin!(clock_changed);
        let mut next_renewal = shared.clock().renewal_due();
        // Once the lock is lost, the lease is released right away (best effort): a lease that
        // ran out here must not live on in the backend, where a session-based lock (an advisory
        // lock, a ZooKeeper node) would otherwise outlast its TTL.
        let mut released = false;
        'keep: loop {
            if shared.is_stopped() {
                break;
            }
            if !released && shared.lost_reason().is_some() {
                released = true;
                if let Err(e) = lease.release().await {
                    tracing::debug!(error = %e, "release after loss");
                }
                continue;
            }
            let lost = shared.lost_reason().is_some();
            // The timer wakes the keeper for the next renewal, or at the end of the lease.
            {
                let wake_at = {
                    let valid_until = shared.clock().valid_until();
                    next_renewal.map_or(valid_until, |at| at.min(valid_until))
                };
                if timer.deadline() != wake_at {
                    timer.as_mut().reset(wake_at);
                }
            }
            // The renewal runs after this select, not inside it: the two selects' state then
            // shares room in the task.
            let renew = tokio::select! {
                biased;
                _ = clock_changed.as_mut() => {
                    clock_changed.set(shared.clock_changed.notified());
                    if shared.is_stopped() {
                        break;
                    }
                    // An explicit extend may have shortened the TTL, or asked a fixed-TTL lease
                    // to outlast its server-side TTL: renew no later than it needs.
                    let soonest = shared.clock().renewal_due();
                    next_renewal = next_renewal.into_iter().chain(soonest).min();
                    false
                }
                reason = &mut lease_lost, if !lost => {
                    shared.mark_lost(reason);
                    false
                }
                _ = timer.as_mut(), if !lost => {
                    let now = Instant::now();
                    if now >= shared.clock().valid_until() {
                        shared.mark_lost(LostReason::Expired);
                        false
                    } else {
                        // Not due if the lease was extended meanwhile.
                        next_renewal.is_some_and(|at| now >= at)
                    }
                }
            };
            if renew {
                let mut renewing = renewal(shared, lease.as_ref());
                next_renewal = loop {
                    tokio::select! {
                        biased;
                        _ = clock_changed.as_mut() => {
                            clock_changed.set(shared.clock_changed.notified());
                            if shared.is_stopped() {
                                break 'keep;
                            }
                            // An extend changed the clock: the renewal, which waited for it,
                            // goes on and times the next one from the clock it leaves.
                        }
                        reason = &mut lease_lost => {
                            shared.mark_lost(reason);
                            continue 'keep;
                        }
                        next = renewing.as_mut() => break next,
                    }
                };
            }
        }
        let held = shared.record_hold();
        if shared.releasing.load(std::sync::atomic::Ordering::Acquire) {
            // `LockGuard::release` releases from the caller's task.
            return;
        }
        let result = match (released, shared.lost_reason()) {
            (true, Some(reason)) => Err(Error::lost(shared.name.as_str(), reason)),
            _ => Box::pin(release_with_retries(shared, lease.as_ref())).await,
        };
        match result {
            Ok(()) => tracing::debug!(?held, "released on drop"),
            Err(e) if e.is_lost() => tracing::debug!(error = %e, "released on drop after loss"),
            Err(e) => {
                tracing::warn!(error = %e, "release on drop failed; the lease ends at its TTL")
            }
        }
    }
}

/// Releases, retrying connection errors while the lease is still valid: a release that
/// fails on a passing error would otherwise leave the lock held until its TTL.
async fn release_with_retries(shared: &Shared, lease: &dyn Lease) -> Result<()> {
    let mut pause = Duration::from_millis(10);
    loop {
        match lease.release().await {
            Err(e) if e.is_retryable() && Instant::now() + pause < shared.clock().valid_until() => {
                tracing::debug!(error = %e, ?pause, "release failed, retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            result => return result,
        }
    }
}

/// What a renewal found, when it was sent, and the clock it was sent with.
type Renewal = (
    std::result::Result<Result<Instant>, tokio::time::error::Elapsed>,
    Instant,
    Clock,
);

/// One renewal, applied ([`renewed`]): not while an explicit extend is in flight, then with
/// the clock it left, answered before the lease runs out; gives when to renew next. Boxed,
/// and made here rather than in [`keep`]: it is in flight only now and then, so it must not
/// be part of every idle keeper's state.
fn renewal<'a>(
    shared: &'a Shared,
    lease: &'a dyn Lease,
) -> std::pin::Pin<Box<dyn Future<Output = Option<Instant>> + Send + 'a>> {
    Box::pin(async move {
        let _one_at_a_time = shared.extending.lock().await;
        let clock = *shared.clock();
        let started = Instant::now();
        let result = timeout_at(clock.valid_until(), lease.extend(clock.ttl)).await;
        renewed(shared, (result, started, clock))
    })
}

/// Applies one renewal's outcome; returns when to renew next (`None` once lost, or once a
/// fixed-TTL lease covers the holder's end).
fn renewed(shared: &Shared, (result, started, clock): Renewal) -> Option<Instant> {
    let every = clock.renew_every?;
    let backend = shared.backend;
    match result {
        Ok(Ok(lease_until)) => {
            // No explicit extend ran meanwhile (they take turns): this answer is the latest.
            let mut now = shared.clock();
            now.lease_until = lease_until;
            now.lease_start = started;
            let next = now.renewal_due();
            drop(now);
            metrics::counter!(telemetry::RENEWALS_TOTAL, "backend" => backend).increment(1);
            tracing::debug!(took = ?started.elapsed(), "lease renewed");
            next
        }
        Ok(Err(Error::LockLost { reason, .. })) => {
            metrics::counter!(telemetry::RENEWAL_FAILURES_TOTAL, "backend" => backend).increment(1);
            shared.mark_lost(reason);
            None
        }
        Ok(Err(e)) => {
            metrics::counter!(telemetry::RENEWAL_FAILURES_TOTAL, "backend" => backend).increment(1);
            let now = Instant::now();
            let valid_until = clock.valid_until();
            if now >= valid_until {
                shared.mark_lost(LostReason::RenewalFailed(e.to_string()));
                return None;
            }
            // Retry soon, several times within what is left of the lease.
            let floor = Duration::from_millis(5).min(every);
            let retry = ((valid_until - now) / 4).clamp(floor, every);
            tracing::warn!(error = %e, ?retry, "lease renewal failed, retrying");
            Some(now + retry)
        }
        Err(_) => {
            metrics::counter!(telemetry::RENEWAL_FAILURES_TOTAL, "backend" => backend).increment(1);
            shared.mark_lost(LostReason::RenewalFailed(
                "no answer before the lease ran out".into(),
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use async_trait::async_trait;

    use super::*;

    /// A lease whose renewals fail on command, to drive the keeper through its states.
    #[derive(Debug, Default)]
    struct Script {
        /// Renewals still to fail with a connection error (`u32::MAX`: all of them).
        failures: AtomicU32,
        not_owner: AtomicBool,
        extends: AtomicU32,
        releases: AtomicU32,
        /// `release` calls still to fail with a connection error.
        release_failures: AtomicU32,
        /// `release` calls that succeeded.
        released: AtomicU32,
        /// How long each `release` call takes, in ms.
        release_ms: std::sync::atomic::AtomicU64,
        session_gone: Notify,
        /// The lease's server-side TTL, if fixed: `extend` then renews for this long.
        fixed: Option<Duration>,
        /// How long the next `extend` calls take (front first); none: no time. The "server"
        /// applies each call when it completes.
        delays: std::sync::Mutex<std::collections::VecDeque<Duration>>,
        /// The end of the lease as the "server" last applied it.
        server_until: std::sync::Mutex<Option<Instant>>,
        /// `set_value` calls still to fail with a connection error.
        value_failures: AtomicU32,
        /// `set_value` calls made.
        values: AtomicU32,
        /// The lease says it never signals loss ([`Lease::signals_loss`]), like Redis's.
        quiet: AtomicBool,
    }

    #[derive(Debug)]
    struct ScriptedLease(Arc<Script>);

    #[async_trait]
    impl Lease for ScriptedLease {
        async fn extend(&self, ttl: Duration) -> Result<Instant> {
            let script = &self.0;
            script.extends.fetch_add(1, Ordering::SeqCst);
            let delay = script.delays.lock().unwrap().pop_front();
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            if script.not_owner.load(Ordering::SeqCst) {
                return Err(Error::lost("x", LostReason::NotOwner));
            }
            let left = script.failures.load(Ordering::SeqCst);
            if left > 0 {
                if left != u32::MAX {
                    script.failures.store(left - 1, Ordering::SeqCst);
                }
                return Err(Error::connection("scripted", "connection refused"));
            }
            let until = Instant::now() + script.fixed.unwrap_or(ttl);
            *script.server_until.lock().unwrap() = Some(until);
            Ok(until)
        }

        async fn release(&self) -> Result<()> {
            let script = &self.0;
            script.releases.fetch_add(1, Ordering::SeqCst);
            let took = script.release_ms.load(Ordering::SeqCst);
            if took > 0 {
                tokio::time::sleep(Duration::from_millis(took)).await;
            }
            let left = script.release_failures.load(Ordering::SeqCst);
            if left > 0 {
                script.release_failures.store(left - 1, Ordering::SeqCst);
                return Err(Error::connection("scripted", "connection reset"));
            }
            script.released.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        async fn set_value(&self, _: &str) -> Result<()> {
            let script = &self.0;
            script.values.fetch_add(1, Ordering::SeqCst);
            if script.not_owner.load(Ordering::SeqCst) {
                return Err(Error::lost("x", LostReason::NotOwner));
            }
            let left = script.value_failures.load(Ordering::SeqCst);
            if left > 0 {
                script.value_failures.store(left - 1, Ordering::SeqCst);
                return Err(Error::connection("scripted", "connection reset"));
            }
            Ok(())
        }

        async fn lost(&self) -> LostReason {
            self.0.session_gone.notified().await;
            LostReason::SessionLost("scripted".into())
        }

        fn fixed_ttl(&self) -> Option<Duration> {
            self.0.fixed
        }

        fn signals_loss(&self) -> bool {
            !self.0.quiet.load(Ordering::SeqCst)
        }
    }

    /// A lease that never signals loss: its guard's keeper may wait in the nursery.
    fn quiet() -> Arc<Script> {
        let script = Script::default();
        script.quiet.store(true, Ordering::SeqCst);
        Arc::new(script)
    }

    fn keeper(guard: &LockGuard) -> u8 {
        guard.shared.keeper.load(Ordering::SeqCst)
    }

    const TTL: Duration = Duration::from_secs(3);

    fn guard(script: &Arc<Script>, opts: &LockOptions) -> LockGuard {
        let acquired = Acquired::new(
            FencingToken(7),
            Instant::now() + opts.ttl,
            Box::new(ScriptedLease(script.clone())),
        );
        let caps = Capabilities::new(Duration::from_millis(1))
            .lease_expiry(true)
            .renewal(true);
        LockGuard::start(
            "scripted",
            LockName::new("x").unwrap(),
            acquired,
            opts,
            &caps,
        )
        .unwrap()
    }

    /// An explicit extend made while an automatic renewal is in flight: the guard's
    /// validity is the one of the request the server applied last, never the longer one.
    #[tokio::test(start_paused = true)]
    async fn an_extend_racing_a_renewal_keeps_what_the_server_applied_last() {
        for (renewal_takes, extend_takes) in [(200, 0), (0, 200), (100, 100)] {
            let script = Arc::new(Script::default());
            let guard = guard(&script, &LockOptions::new().ttl(TTL));
            // The first renewal is due at TTL/3; make it (and then the extend) take time.
            script.delays.lock().unwrap().extend([
                Duration::from_millis(renewal_takes),
                Duration::from_millis(extend_takes),
            ]);
            tokio::time::sleep(TTL / 3 + Duration::from_millis(50)).await;
            assert_eq!(
                script.extends.load(Ordering::SeqCst),
                1,
                "renewal in flight"
            );
            guard.extend(TTL * 10).await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            let server = script.server_until.lock().unwrap().unwrap();
            assert!(
                guard.valid_until() <= server,
                "renewal {renewal_takes} ms, extend {extend_takes} ms: the guard believes {:?} \
                 more than the server applied",
                guard.valid_until() - server
            );
            assert!(guard.is_held());
            guard.release().await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_renewal_failures_are_retried_within_the_lease() {
        let script = Arc::new(Script::default());
        script.failures.store(3, Ordering::SeqCst);
        let guard = guard(&script, &LockOptions::new().ttl(TTL));
        tokio::time::sleep(TTL * 5).await;
        assert!(guard.is_held());
        assert_eq!(guard.lost_reason(), None);
        assert!(script.extends.load(Ordering::SeqCst) >= 3 + 5);
        guard.release().await.unwrap();
        assert_eq!(script.releases.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_that_keeps_failing_loses_the_lock_at_the_lease_end() {
        let script = Arc::new(Script::default());
        script.failures.store(u32::MAX, Ordering::SeqCst);
        let started = Instant::now();
        let guard = guard(&script, &LockOptions::new().ttl(TTL));
        let reason = guard.lost().await;
        assert!(
            matches!(reason, LostReason::Expired | LostReason::RenewalFailed(_)),
            "{reason:?}"
        );
        let took = started.elapsed();
        assert!(
            took >= TTL && took < TTL + Duration::from_millis(100),
            "{took:?}"
        );
        assert!(!guard.is_held());
        assert!(
            script.extends.load(Ordering::SeqCst) >= 3,
            "retried too little"
        );
        assert!(guard.release().await.unwrap_err().is_lost());
    }

    /// An explicit extend that hangs (a cluster electing a new leader) keeps the keeper's
    /// renewals waiting for their turn: the holder is still told at the lease's end, not
    /// when the extend returns.
    #[tokio::test(start_paused = true)]
    async fn a_hanging_extend_does_not_delay_lost_past_the_lease_end() {
        let script = Arc::new(Script::default());
        let started = Instant::now();
        let guard = guard(&script, &LockOptions::new().ttl(TTL));
        script.delays.lock().unwrap().push_back(TTL * 10);
        let lost = async {
            let reason = guard.lost().await;
            (reason, started.elapsed())
        };
        let both = tokio::time::timeout(TTL * 20, async { tokio::join!(lost, guard.extend(TTL)) });
        let ((reason, took), extended) = both.await.expect("lost() never fired");
        assert!(
            took >= TTL && took < TTL + Duration::from_millis(100),
            "{took:?}"
        );
        assert!(
            matches!(reason, LostReason::Expired | LostReason::RenewalFailed(_)),
            "{reason:?}"
        );
        assert!(extended.unwrap_err().is_lost());
        assert!(!guard.is_held());
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_refused_as_not_owner_loses_the_lock_at_once() {
        let script = Arc::new(Script::default());
        script.not_owner.store(true, Ordering::SeqCst);
        let guard = guard(&script, &LockOptions::new().ttl(TTL));
        assert_eq!(guard.lost().await, LostReason::NotOwner);
        assert!(!guard.is_held());
        assert!(guard.extend(TTL).await.unwrap_err().is_lost());
    }

    #[tokio::test(start_paused = true)]
    async fn backend_loss_signal_fires_lost() {
        let script = Arc::new(Script::default());
        let guard = guard(&script, &LockOptions::new().ttl(TTL));
        script.session_gone.notify_one();
        let reason = guard.lost().await;
        assert!(matches!(reason, LostReason::SessionLost(_)), "{reason:?}");
        assert!(!guard.is_held());
    }

    #[tokio::test(start_paused = true)]
    async fn without_renewal_the_lease_expires_unless_extended() {
        let script = Arc::new(Script::default());
        let guard = guard(&script, &LockOptions::new().ttl(TTL).auto_renew(false));
        tokio::time::sleep(TTL / 2).await;
        guard.extend(TTL).await.unwrap();
        tokio::time::sleep(TTL * 3 / 4).await;
        assert!(guard.is_held(), "extend did not push the expiry out");
        assert_eq!(script.extends.load(Ordering::SeqCst), 1);
        assert_eq!(guard.lost().await, LostReason::Expired);
        assert!(!guard.is_held());
        // A lease that ran out is released in the backend at once, not only on drop.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(script.releases.load(Ordering::SeqCst), 1);
        drop(guard);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(script.releases.load(Ordering::SeqCst), 1, "released twice");
    }

    /// A `lost()` future outliving the runtime that ran the keeper still resolves: a keeper
    /// that ran, one the runtime dropped before it ever ran, and one still waiting in the
    /// nursery (which may not have run either).
    #[test]
    fn lost_futures_resolve_when_the_keepers_runtime_shuts_down() {
        for (script, ran) in [
            (Arc::new(Script::default()), true),
            (Arc::new(Script::default()), false),
            (quiet(), true),
            (quiet(), false),
        ] {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let (guard, lost) = runtime.block_on(async {
                let guard = guard(&script, &LockOptions::new().ttl(TTL));
                if ran {
                    tokio::task::yield_now().await;
                }
                let lost = guard.lost();
                (guard, lost)
            });
            drop(runtime);
            let other = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let reason =
                other.block_on(async { tokio::time::timeout(Duration::from_secs(5), lost).await });
            assert_eq!(
                reason,
                Ok(LostReason::Released),
                "quiet {}, ran {ran}",
                script.quiet.load(Ordering::SeqCst)
            );
            drop(guard);
        }
    }

    /// A release whose caller gives up after 5 ms goes on without it: one request, completed.
    /// Cut short in the pause before a retry (its first request failed), or while its
    /// request is in flight (which must not be sent a second time).
    #[tokio::test(start_paused = true)]
    async fn a_release_whose_caller_gives_up_goes_on_without_it() {
        for (failures, takes_ms, requests) in [(1, 0, 2), (0, 100, 1)] {
            let script = Arc::new(Script::default());
            script.release_failures.store(failures, Ordering::SeqCst);
            script.release_ms.store(takes_ms, Ordering::SeqCst);
            let guard = guard(&script, &LockOptions::new().ttl(TTL));
            let gave_up = tokio::time::timeout(Duration::from_millis(5), guard.release()).await;
            assert!(gave_up.is_err(), "still releasing after 5 ms");
            tokio::time::sleep(Duration::from_secs(1)).await;
            let case = format!("{failures} failure(s), {takes_ms} ms a request");
            assert_eq!(script.releases.load(Ordering::SeqCst), requests, "{case}");
            assert_eq!(
                script.released.load(Ordering::SeqCst),
                1,
                "{case}: released"
            );
        }
    }

    /// Polls a future to completion on this thread, outside any Tokio runtime.
    fn block_on<F: Future>(future: F) -> F::Output {
        struct Unpark(std::thread::Thread);
        impl std::task::Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = std::task::Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        loop {
            if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
                return output;
            }
            std::thread::park();
        }
    }

    #[test]
    fn a_release_polled_outside_a_runtime_still_releases() {
        let script = Arc::new(Script::default());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let guard = runtime.block_on(async { guard(&script, &LockOptions::new().ttl(TTL)) });
        block_on(guard.release()).expect("released");
        assert_eq!(script.released.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn drop_releases_and_outliving_lost_futures_resolve() {
        let script = Arc::new(Script::default());
        let guard = guard(&script, &LockOptions::new().ttl(TTL));
        let lost = guard.lost();
        drop(guard);
        assert_eq!(lost.await, LostReason::Released);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(script.releases.load(Ordering::SeqCst), 1);
    }

    /// A guard released before its keeper's time costs no keeper: the keeper never starts,
    /// the lease is released once, by `release`, and `lost()` resolves.
    #[tokio::test(start_paused = true)]
    async fn a_short_hold_on_a_quiet_lease_never_starts_a_keeper() {
        let script = quiet();
        let guard = guard(&script, &LockOptions::new().ttl(TTL));
        assert_eq!(keeper(&guard), KEEPER_WAITING);
        let shared = guard.shared.clone();
        let lost = guard.lost();
        guard.release().await.unwrap();
        let lost = tokio::time::timeout(crate::nursery::DELAY, lost).await;
        assert_eq!(lost, Ok(LostReason::Released));
        assert_eq!(shared.keeper.load(Ordering::SeqCst), KEEPER_NEVER);
        tokio::time::sleep(TTL * 2).await;
        assert_eq!(script.releases.load(Ordering::SeqCst), 1);
        assert_eq!(extends(&script), 0);
    }

    /// A guard still held when the nursery's delay is over gets its keeper: it renews as
    /// every guard does.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_lease_held_on_is_renewed() {
        let script = quiet();
        let guard = guard(&script, &LockOptions::new().ttl(TTL));
        tokio::time::sleep(crate::nursery::LATEST).await;
        assert_eq!(keeper(&guard), KEEPER_STARTED);
        tokio::time::sleep(TTL * 2).await;
        assert!(extends(&script) >= 5, "{} renewals", extends(&script));
        assert!(guard.is_held());
        guard.release().await.unwrap();
        assert_eq!(script.releases.load(Ordering::SeqCst), 1);
    }

    /// Dropped before its keeper started: the drop starts it, and it releases at once, not
    /// when the nursery would have started it.
    #[tokio::test(start_paused = true)]
    async fn dropping_a_guard_whose_keeper_waits_releases_at_once() {
        let script = quiet();
        let guard = guard(&script, &LockOptions::new().ttl(TTL));
        let lost = guard.lost();
        let dropped = Instant::now();
        drop(guard);
        let lost = tokio::time::timeout(crate::nursery::LATEST, lost).await;
        assert_eq!(lost, Ok(LostReason::Released));
        assert!(
            dropped.elapsed() < crate::nursery::DELAY,
            "{:?}",
            dropped.elapsed()
        );
        assert_eq!(script.releases.load(Ordering::SeqCst), 1);
    }

    /// The keeper starts at once where it may have something to do soon: a lease that
    /// signals loss, or a first renewal before the nursery's latest start.
    #[tokio::test(start_paused = true)]
    async fn keepers_with_work_soon_start_at_once() {
        let loud = Arc::new(Script::default());
        let held = guard(&loud, &LockOptions::new().ttl(TTL));
        assert_eq!(keeper(&held), KEEPER_STARTED);
        let lost = held.lost();
        tokio::task::yield_now().await;
        loud.session_gone.notify_one();
        assert!(matches!(lost.await, LostReason::SessionLost(_)));
        let short = crate::nursery::LATEST * 2;
        let soon = guard(&quiet(), &LockOptions::new().ttl(short));
        assert_eq!(keeper(&soon), KEEPER_STARTED);
    }

    /// An extend starts a waiting keeper: a shorter TTL may bring the next renewal before
    /// the nursery would.
    #[tokio::test(start_paused = true)]
    async fn an_extend_starts_a_waiting_keeper() {
        let script = quiet();
        let guard = guard(&script, &LockOptions::new().ttl(TTL));
        // Shorter than the nursery's delay: only a keeper started now renews it in time.
        guard.extend(crate::nursery::DELAY / 2).await.unwrap();
        assert_eq!(keeper(&guard), KEEPER_STARTED);
        tokio::time::sleep(crate::nursery::LATEST).await;
        assert!(extends(&script) >= 5, "{} renewals", extends(&script));
        assert!(guard.is_held(), "{:?}", guard.lost_reason());
    }

    /// Guards queued after the nursery went idle (its queue empty) still get their keepers.
    #[tokio::test(start_paused = true)]
    async fn the_nursery_wakes_for_guards_queued_after_it_went_idle() {
        let script = quiet();
        for _ in 0..3 {
            let guard = guard(&script, &LockOptions::new().ttl(TTL));
            assert_eq!(keeper(&guard), KEEPER_WAITING);
            tokio::time::sleep(crate::nursery::LATEST).await;
            assert_eq!(keeper(&guard), KEEPER_STARTED);
            tokio::time::sleep(crate::nursery::LATEST * 3).await;
            guard.release().await.unwrap();
        }
        assert_eq!(script.releases.load(Ordering::SeqCst), 3);
    }

    /// A guard found lost while its keeper waits (a request with its lease learnt it) says so
    /// at once, and its lease is released once the keeper starts.
    #[tokio::test(start_paused = true)]
    async fn a_loss_noted_while_the_keeper_waits_is_released_by_it() {
        let script = quiet();
        let guard = guard(&script, &LockOptions::new().ttl(TTL));
        let _ = guard.note(Error::lost("x", LostReason::NotOwner));
        let lost = tokio::time::timeout(Duration::from_millis(1), guard.lost()).await;
        assert_eq!(lost, Ok(LostReason::NotOwner));
        tokio::time::sleep(crate::nursery::LATEST).await;
        assert_eq!(script.releases.load(Ordering::SeqCst), 1);
        assert!(matches!(guard.release().await, Err(Error::LockLost { .. })));
    }

    /// Guards dropped or released from many threads while the nursery starts keepers: each
    /// lease is released exactly once, and every `lost()` future resolves.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drops_and_releases_racing_the_nursery_release_each_lease_once() {
        let script = quiet();
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..4u64 {
            let script = script.clone();
            tasks.spawn(async move {
                for i in 0..40u64 {
                    let guard = guard(&script, &LockOptions::new().ttl(TTL));
                    let lost = guard.lost();
                    // Around the nursery's delay and batch: before, during and after.
                    let ms = (i * 7 + task * 3) % 40;
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    if i % 2 == 0 {
                        guard.release().await.unwrap();
                    } else {
                        drop(guard);
                    }
                    let lost = tokio::time::timeout(Duration::from_secs(5), lost).await;
                    assert_eq!(lost, Ok(LostReason::Released));
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(script.releases.load(Ordering::SeqCst), 160);
    }

    /// A lease like a Consul session: its server-side TTL is `TTL`, whatever `extend` asks.
    fn fixed() -> Arc<Script> {
        Arc::new(Script {
            fixed: Some(TTL),
            ..Script::default()
        })
    }

    /// A guard without automatic renewal on a fixed-TTL lease, extended to three TTLs; and
    /// when it was extended.
    async fn extended_past_fixed_ttl(script: &Arc<Script>) -> (LockGuard, Instant) {
        let guard = guard(script, &LockOptions::new().ttl(TTL).auto_renew(false));
        let extended = Instant::now();
        guard.extend(TTL * 3).await.unwrap();
        (guard, extended)
    }

    fn extends(script: &Script) -> u32 {
        script.extends.load(Ordering::SeqCst)
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_ttl_lease_without_renewal_holds_until_an_extend_past_its_ttl() {
        let script = fixed();
        let guard = guard(&script, &LockOptions::new().ttl(TTL).auto_renew(false));
        tokio::time::sleep(TTL / 2).await;
        let extended = Instant::now();
        guard.extend(TTL * 3).await.unwrap();
        // Only the server's TTL is confirmed so far.
        assert_eq!(guard.valid_until(), extended + TTL);
        tokio::time::sleep(TTL * 3 - Duration::from_millis(1)).await;
        assert!(guard.is_held(), "lost before the extended end");
        assert_eq!(guard.valid_until(), extended + TTL * 3);
        // The extend, then a renewal every third of the fixed TTL until the end is covered.
        assert_eq!(extends(&script), 1 + 6);
        assert_eq!(guard.lost().await, LostReason::Expired);
        assert_eq!(Instant::now(), extended + TTL * 3);
        assert!(!guard.is_held());
        tokio::time::sleep(TTL).await;
        assert_eq!(extends(&script), 7, "renewed past the holder's end");
        assert_eq!(script.releases.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_ttl_lease_without_renewal_or_extend_expires_at_its_ttl() {
        let script = fixed();
        let started = Instant::now();
        let guard = guard(&script, &LockOptions::new().ttl(TTL).auto_renew(false));
        assert_eq!(guard.lost().await, LostReason::Expired);
        assert_eq!(started.elapsed(), TTL);
        assert_eq!(extends(&script), 0);
    }

    /// A server that caps the lease below the holder's TTL (ZooKeeper's negotiated session
    /// timeout): without automatic renewal the guard still holds for its own TTL, renewing
    /// within the server's, and expires at its TTL.
    #[tokio::test(start_paused = true)]
    async fn a_lease_capped_below_the_ttl_is_held_for_the_ttl_without_renewal() {
        let server_cap = TTL / 3;
        let script = Arc::new(Script {
            fixed: Some(server_cap),
            ..Script::default()
        });
        let started = Instant::now();
        let acquired = Acquired::new(
            FencingToken(7),
            started + server_cap,
            Box::new(ScriptedLease(script.clone())),
        );
        let caps = Capabilities::new(Duration::from_millis(1))
            .lease_expiry(true)
            .renewal(true);
        let opts = LockOptions::new().ttl(TTL).auto_renew(false);
        let guard = LockGuard::start(
            "scripted",
            LockName::new("x").unwrap(),
            acquired,
            &opts,
            &caps,
        )
        .unwrap();
        tokio::time::sleep(TTL - Duration::from_millis(100)).await;
        assert!(
            guard.is_held(),
            "expired at the server's cap, not at its TTL"
        );
        assert!(extends(&script) >= 2, "not renewed within the server's cap");
        assert_eq!(guard.lost().await, LostReason::Expired);
        let took = started.elapsed();
        assert!(took >= TTL - server_cap / 2 && took <= TTL, "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_ttl_renewal_refused_loses_the_lock_before_the_extended_end() {
        let script = fixed();
        let (guard, extended) = extended_past_fixed_ttl(&script).await;
        script.not_owner.store(true, Ordering::SeqCst);
        assert_eq!(guard.lost().await, LostReason::NotOwner);
        // The first renewal: due at a third of the TTL, on the grid (a 32nd of that later).
        let due = extended + TTL / 3;
        assert!(
            (due..=due + TTL / 96).contains(&Instant::now()),
            "not lost at the first renewal"
        );
        assert!(!guard.is_held());
        assert!(guard.release().await.unwrap_err().is_lost());
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_ttl_renewals_that_keep_failing_lose_the_lock_at_the_servers_end() {
        let script = fixed();
        let (guard, extended) = extended_past_fixed_ttl(&script).await;
        script.failures.store(u32::MAX, Ordering::SeqCst);
        let reason = guard.lost().await;
        assert!(
            matches!(reason, LostReason::Expired | LostReason::RenewalFailed(_)),
            "{reason:?}"
        );
        // The server's session lapses at its fixed TTL, long before the holder's end.
        assert_eq!(Instant::now(), extended + TTL);
        // The extend, then at least three retries of the failing renewal.
        assert!(extends(&script) >= 4, "retried too little");
        assert!(!guard.is_held());
    }

    /// A leader whose proclaim finds the lock taken over knows at once that it lost: the
    /// guard reports the loss (and so `is_leader` turns false) without waiting for the
    /// next renewal to find out.
    #[tokio::test(start_paused = true)]
    async fn a_proclaim_that_finds_the_lock_lost_marks_the_term_lost() {
        let script = Arc::new(Script::default());
        let opts = LockOptions::new().ttl(TTL);
        let leading = crate::election::announce(guard(&script, &opts), "a".into(), &opts)
            .await
            .unwrap();
        script.not_owner.store(true, Ordering::SeqCst);
        let error = leading.proclaim("b").await.unwrap_err();
        assert!(error.is_lost(), "{error}");
        assert_eq!(leading.guard().lost_reason(), Some(LostReason::NotOwner));
        assert!(!leading.is_leader());
        assert_eq!(script.extends.load(Ordering::SeqCst), 0, "no renewal ran");
    }

    /// A campaign whose value write meets a passing connection error keeps the lock it won
    /// and writes the value again (the same value: the retry is harmless), instead of giving
    /// the lock back.
    #[tokio::test(start_paused = true)]
    async fn a_campaign_rides_out_a_connection_error_when_announcing() {
        let script = Arc::new(Script::default());
        script.value_failures.store(2, Ordering::SeqCst);
        let opts = LockOptions::new().ttl(TTL);
        let leading = crate::election::announce(guard(&script, &opts), "a".into(), &opts)
            .await
            .expect("announced after the retries");
        assert!(leading.is_leader());
        assert_eq!(script.values.load(Ordering::SeqCst), 3);
        assert_eq!(script.releases.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn renewals_due_close_together_fall_on_one_grid_point_no_later_than_a_step() {
        let every = Duration::from_millis(3_200); // a 32nd is 100 ms: steps of 64 ms
        let step = Duration::from_millis(64);
        let base = on_renewal_grid(Instant::now() + Duration::from_secs(1), every);
        assert_eq!(on_renewal_grid(base, every), base, "a grid point stays");
        for offset in [1, 999, 50_000_000, 63_999_999] {
            let at = base + Duration::from_nanos(offset);
            assert_eq!(
                on_renewal_grid(at, every),
                base + step,
                "{offset} ns past a point"
            );
        }
        // Steps of powers of two up to 64 ms; none under 1 ms (a slack under 32 ms).
        let at = base + Duration::from_micros(10);
        assert_eq!(on_renewal_grid(at, Duration::from_secs(3_600)), base + step);
        assert_eq!(on_renewal_grid(at, Duration::from_millis(31)), at);
        assert_eq!(
            on_renewal_grid(at, Duration::from_millis(32)),
            base + Duration::from_millis(1)
        );
        // 3 ms (a slack of 100 ms) rounds down to 2: a point of the 64 ms grid is one of its.
        assert_eq!(
            on_renewal_grid(at, Duration::from_millis(100)),
            base + Duration::from_millis(2)
        );
    }

    #[test]
    fn the_grid_runs_through_its_origin_on_both_sides() {
        let origin = Instant::now() + Duration::from_secs(10);
        let step = Duration::from_millis(4);
        for (at, up) in [
            (0, 0),
            (1, 4),
            (4, 4),
            (5, 8),
            (-1, 0),
            (-4, -4),
            (-5, -4),
            (-3999, -3996),
        ] {
            let at_ms = |ms: i64| {
                let d = Duration::from_millis(ms.unsigned_abs());
                if ms < 0 {
                    origin - d
                } else {
                    origin + d
                }
            };
            assert_eq!(
                round_up(at_ms(at), origin, step),
                at_ms(up),
                "{at} ms from the origin"
            );
        }
        let odd = origin - Duration::from_nanos(1);
        assert_eq!(round_up(odd, origin, step), origin);
    }

    #[test]
    fn a_renewal_due_close_to_the_lease_end_is_not_moved_past_a_32nd_of_what_is_left() {
        let start = Instant::now();
        let clock = |every: Duration| Clock {
            ttl: Duration::from_secs(10),
            lease_until: start + Duration::from_secs(10),
            lease_start: start,
            hold_until: None,
            renew_every: Some(every),
        };
        // The default third: up to a 32nd of the interval.
        let due = start + Duration::from_millis(3_333);
        let at = clock(Duration::from_millis(3_333)).renewal_due().unwrap();
        assert!(at >= due && at <= due + Duration::from_millis(3_333) / 32);
        // An interval of 9.9 s leaves 100 ms: up to a 32nd of those.
        let due = start + Duration::from_millis(9_900);
        let at = clock(Duration::from_millis(9_900)).renewal_due().unwrap();
        assert!(
            at >= due && at <= due + Duration::from_millis(100) / 32,
            "{:?}",
            at - due
        );
        // 20 ms left: not rounded at all.
        let due = start + Duration::from_millis(9_980);
        assert_eq!(clock(Duration::from_millis(9_980)).renewal_due(), Some(due));
    }

    /// Every held lock costs one keeper task and one `Shared`: with 10 000 guards in a
    /// process, each byte here is 10 kB. Tokio stores a task in a cell aligned to 128 bytes
    /// (a 32-byte header, the future plus 24 bytes, a 48-byte trailer, tokio 1.54): a
    /// future of at most 408 bytes keeps the cell at 512 bytes instead of 640.
    #[test]
    fn keeper_task_fits_in_512_bytes() {
        let script = Arc::new(Script::default());
        let now = Instant::now();
        let shared = Arc::new(Shared {
            backend: "test",
            name: LockName::new("size").unwrap(),
            token: FencingToken(1),
            acquired_at: now,
            ttl_limits: (Duration::ZERO, Duration::MAX),
            clock: Mutex::new(Clock {
                ttl: TTL,
                lease_until: now + TTL,
                lease_start: now,
                hold_until: None,
                renew_every: None,
            }),
            clock_changed: Notify::new(),
            extending: tokio::sync::Mutex::new(()),
            lost: Mutex::new(None),
            finished: Default::default(),
            releasing: Default::default(),
            stopped: Default::default(),
            lost_changed: Notify::new(),
            keeper: Default::default(),
        });
        let keeper = keep(shared, Arc::new(ScriptedLease(script)))
            .instrument(tracing::info_span!("lockkit.hold"));
        let size = std::mem::size_of_val(&keeper);
        assert!(size <= 408, "the keeper future is {size} bytes");
        // The guard's shared state: an `Arc` allocation of at most 352 bytes.
        let shared = std::mem::size_of::<Shared>();
        assert!(shared <= 336, "Shared is {shared} bytes");
    }
}
