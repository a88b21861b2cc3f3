//! Metric names. lockkit records through the [`metrics`] facade, so any recorder (Prometheus,
//! StatsD, ...) installed by the application sees them; every metric carries a `backend` label.
//!
//! Tracing: `lockkit.acquire` spans (fields `backend`, `lock`, `wait_ms`, `token`),
//! `lockkit.hold` spans for the life of a guard (renewals, renewal failures and losses are
//! events inside it), and `lockkit.release` spans.

/// Histogram, seconds from the start of `acquire`/`try_acquire` to its outcome; label
/// `outcome` is `acquired`, `busy`, `timeout` or `error`.
pub const ACQUIRE_WAIT_SECONDS: &str = "lockkit_acquire_wait_seconds";
/// Counter of acquisition attempts by `outcome` (`acquired`, `busy`, `timeout`, `error`).
pub const ACQUIRES_TOTAL: &str = "lockkit_acquires_total";
/// Counter of acquisitions that gave up at the wait timeout.
pub const TIMEOUTS_TOTAL: &str = "lockkit_timeouts_total";
/// Histogram, seconds a guard was held (from acquisition to release or drop).
pub const HOLD_SECONDS: &str = "lockkit_hold_seconds";
/// Counter of successful lease renewals.
pub const RENEWALS_TOTAL: &str = "lockkit_renewals_total";
/// Counter of failed lease renewal attempts (each may be retried within the lease).
pub const RENEWAL_FAILURES_TOTAL: &str = "lockkit_renewal_failures_total";
/// Counter of guards that lost their lock, with label `reason`.
pub const LOSSES_TOTAL: &str = "lockkit_losses_total";

use crate::error::LostReason;

pub(crate) fn reason_label(reason: &LostReason) -> &'static str {
    match reason {
        LostReason::Expired => "expired",
        LostReason::NotOwner => "not_owner",
        LostReason::SessionLost(_) => "session_lost",
        LostReason::RenewalFailed(_) => "renewal_failed",
        LostReason::Released => "released",
    }
}
