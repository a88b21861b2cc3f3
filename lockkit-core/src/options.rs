//! Per-acquisition options: lease TTL, wait timeout, renewal and retry.

use std::time::Duration;

use crate::capabilities::Capabilities;
use crate::error::{Error, Result};

/// The lease TTL when none is set: 30 seconds.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// How to retry retryable (connection) errors while acquiring.
///
/// A single attempt (`try_acquire`, or `acquire` with a zero wait) retries at most
/// `max_retries` times. A waiter (`acquire` with wait time) instead rides out a server
/// restart: it keeps retrying for up to `max_outage` of consecutive failures, never past its
/// wait deadline, and then returns the connection error. Delays start at `initial_backoff`
/// and double, with jitter, up to `max_backoff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Retries of a single attempt after it failed; 0 disables retrying altogether.
    pub max_retries: u32,
    /// Delay before the first retry; doubled for each further retry, with jitter.
    pub initial_backoff: Duration,
    /// Upper bound of the delay between retries.
    pub max_backoff: Duration,
    /// How long a waiter keeps retrying through consecutive connection errors (bounded by
    /// its wait deadline).
    pub max_outage: Duration,
}

impl RetryPolicy {
    /// No retries: the first connection error is returned.
    pub const NONE: RetryPolicy = RetryPolicy {
        max_retries: 0,
        initial_backoff: Duration::ZERO,
        max_backoff: Duration::ZERO,
        max_outage: Duration::ZERO,
    };

    /// How long a waiter rides out an outage by default: 30 seconds.
    pub const DEFAULT_MAX_OUTAGE: Duration = Duration::from_secs(30);

    /// `max_retries` retries with exponential backoff from `initial_backoff` up to
    /// `max_backoff`; waiters ride out outages of up to [`Self::DEFAULT_MAX_OUTAGE`].
    pub fn new(max_retries: u32, initial_backoff: Duration, max_backoff: Duration) -> Self {
        RetryPolicy {
            max_retries,
            initial_backoff,
            max_backoff,
            max_outage: Self::DEFAULT_MAX_OUTAGE,
        }
    }

    /// Sets how long a waiter keeps retrying through consecutive connection errors.
    #[must_use]
    pub fn max_outage(mut self, outage: Duration) -> Self {
        self.max_outage = outage;
        self
    }

    /// The jittered delay before retry number `retry` (0-based): between half and all of
    /// `initial_backoff * 2^retry`, capped at `max_backoff`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let base = self
            .initial_backoff
            .saturating_mul(1u32 << retry.min(16))
            .min(self.max_backoff);
        let half = base / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

impl Default for RetryPolicy {
    /// Three retries of a single attempt, 25 ms doubling up to 1 s; waiters ride out 30 s of
    /// outage.
    fn default() -> Self {
        RetryPolicy::new(3, Duration::from_millis(25), Duration::from_secs(1))
    }
}

/// Options of one acquisition. Build with the chained setters:
///
/// ```
/// use std::time::Duration;
/// use lockkit_core::LockOptions;
///
/// let opts = LockOptions::new()
///     .ttl(Duration::from_secs(10))
///     .wait_timeout(Duration::from_secs(2));
/// assert_eq!(opts.renewal_interval(), Duration::from_secs(10) / 3);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockOptions {
    /// Lease TTL: how long the lock stays held without renewal if the holder disappears.
    pub ttl: Duration,
    /// How long `acquire` waits for a held lock; `None` waits until it is acquired.
    pub wait: Option<Duration>,
    /// Whether the guard renews its lease in the background while it lives.
    pub auto_renew: bool,
    /// Interval between renewals; `None` means a third of the TTL. A renewal starts at most
    /// a 32nd of the interval (or of the lease then left, if less; at most 64 ms) after it
    /// falls due, so that renewals due close together go out together.
    pub renew_every: Option<Duration>,
    /// Retrying of connection errors while acquiring.
    pub retry: RetryPolicy,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            ttl: DEFAULT_TTL,
            wait: None,
            auto_renew: true,
            renew_every: None,
            retry: RetryPolicy::default(),
        }
    }
}

impl LockOptions {
    /// The defaults: 30 s TTL, wait forever, automatic renewal every TTL/3, 3 retries of a
    /// single attempt, waiters riding out 30 s of server outage.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the lease TTL.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Waits at most `wait` for a held lock, then fails with [`Error::Timeout`]. Zero makes
    /// `acquire` a single attempt at the lock (connection errors are still retried per the
    /// retry policy).
    #[must_use]
    pub fn wait_timeout(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Waits until the lock is acquired (the default).
    #[must_use]
    pub fn wait_forever(mut self) -> Self {
        self.wait = None;
        self
    }

    /// Turns automatic renewal on or off. Without renewal the lease ends after the TTL unless
    /// the holder calls [`crate::LockGuard::extend`].
    #[must_use]
    pub fn auto_renew(mut self, on: bool) -> Self {
        self.auto_renew = on;
        self
    }

    /// Renews every `every` instead of every TTL/3.
    #[must_use]
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.renew_every = Some(every);
        self
    }

    /// Sets the retry policy for connection errors while acquiring.
    #[must_use]
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The renewal interval in effect: the explicit one, or a third of the TTL.
    pub fn renewal_interval(&self) -> Duration {
        self.renew_every.unwrap_or(self.ttl / 3)
    }

    /// Checks the options against a backend's capabilities.
    pub fn validate(&self, caps: &Capabilities) -> Result<()> {
        validate_ttl(self.ttl, caps.min_ttl, caps.max_ttl)?;
        if self.auto_renew {
            if !caps.renewal {
                return Err(Error::InvalidOptions(
                    "this backend cannot renew leases: turn auto_renew off".into(),
                ));
            }
            let every = self.renewal_interval();
            if every.is_zero() || every >= self.ttl {
                return Err(Error::InvalidOptions(format!(
                    "the renewal interval {every:?} must be above zero and below the TTL {:?}",
                    self.ttl
                )));
            }
        }
        Ok(())
    }
}

/// Checks one lease TTL against a backend's limits.
pub(crate) fn validate_ttl(ttl: Duration, min_ttl: Duration, max_ttl: Duration) -> Result<()> {
    if ttl.is_zero() {
        return Err(Error::InvalidOptions(
            "the lease TTL must be above zero".into(),
        ));
    }
    if ttl < min_ttl {
        return Err(Error::InvalidOptions(format!(
            "the lease TTL {ttl:?} is below this backend's minimum of {min_ttl:?}"
        )));
    }
    if ttl > max_ttl {
        return Err(Error::InvalidOptions(format!(
            "the lease TTL {ttl:?} is above this backend's maximum of {max_ttl:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let caps = Capabilities::new(Duration::from_millis(100))
            .renewal(true)
            .lease_expiry(true);
        assert!(LockOptions::new().validate(&caps).is_ok());
        for bad in [
            LockOptions::new().ttl(Duration::ZERO),
            LockOptions::new().ttl(Duration::from_millis(50)),
            LockOptions::new().ttl(Duration::from_secs(100 * 24 * 3600)),
            LockOptions::new().renew_every(Duration::from_secs(30)),
            LockOptions::new().renew_every(Duration::ZERO),
        ] {
            assert!(
                matches!(bad.validate(&caps), Err(Error::InvalidOptions(_))),
                "{bad:?}"
            );
        }
        // Without renewal, the interval does not matter.
        assert!(LockOptions::new()
            .auto_renew(false)
            .renew_every(Duration::ZERO)
            .validate(&caps)
            .is_ok());
    }

    #[test]
    fn backoff_is_bounded_and_grows() {
        let p = RetryPolicy::new(5, Duration::from_millis(100), Duration::from_millis(300));
        for retry in 0..10 {
            let d = p.backoff(retry);
            assert!(d <= Duration::from_millis(300), "{d:?}");
        }
        assert!(p.backoff(0) <= Duration::from_millis(100));
        assert!(p.backoff(0) >= Duration::from_millis(50));
        assert!(p.backoff(3) >= Duration::from_millis(150));
    }
}
