//! The one error type of lockkit.

use std::fmt;
use std::time::Duration;

/// A boxed error from a backend's client library, kept as the source of [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Short for `Result<T, lockkit_core::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a guard no longer holds its lock.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// The lease ran out before it was renewed (renewal off, or renewals kept failing).
    Expired,
    /// The backend no longer records this guard as the owner: the lease expired and the
    /// lock was taken by another owner, or the lock was deleted from outside.
    NotOwner,
    /// The backend's session or connection that carried the lock is gone.
    SessionLost(String),
    /// Renewal failed and the lease could not be confirmed before it ran out.
    RenewalFailed(String),
    /// The guard was released or dropped; reported by [`crate::LockGuard::lost`] futures
    /// that outlive their guard.
    Released,
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LostReason::Expired => f.write_str("the lease expired"),
            LostReason::NotOwner => f.write_str("the lock is no longer owned by this guard"),
            LostReason::SessionLost(why) => write!(f, "the session was lost: {why}"),
            LostReason::RenewalFailed(why) => write!(f, "renewal failed: {why}"),
            LostReason::Released => f.write_str("the guard was released"),
        }
    }
}

/// Everything that can go wrong when locking, on any backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The lock stayed held elsewhere for the whole wait timeout.
    #[error("timed out after {waited:?} waiting for lock `{name}`")]
    Timeout {
        /// The lock name.
        name: String,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The name is empty, longer than [`crate::MAX_NAME_LEN`] bytes, or contains NUL.
    #[error("invalid lock name: {0}")]
    InvalidName(String),
    /// The options (TTL, intervals) or a connection URL are not acceptable.
    #[error("invalid lock options: {0}")]
    InvalidOptions(String),
    /// The lock is not (or no longer) held by this guard.
    #[error("lock `{name}` is not held by this guard: {reason}")]
    LockLost {
        /// The lock name.
        name: String,
        /// Why it was lost.
        reason: LostReason,
    },
    /// The backend could not be reached, or the connection broke. Retryable.
    #[error("{backend}: connection error: {source}")]
    Connection {
        /// The backend's name (`sqlite`, `redis`, ...).
        backend: &'static str,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// The backend answered with an error.
    #[error("{backend}: backend error: {source}")]
    Backend {
        /// The backend's name.
        backend: &'static str,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// Two clients use semaphore `name` with different limits: permits of another limit
    /// are held. The permit this call took (if any) was given back.
    #[error("semaphore `{name}` is used with a limit of {theirs} elsewhere, not {ours}")]
    LimitMismatch {
        /// The semaphore's name.
        name: String,
        /// The limit this call asked for.
        ours: usize,
        /// The limit of permits held elsewhere.
        theirs: usize,
    },
    /// The operation, URL scheme or feature is not available in this build or backend.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl Error {
    /// A connection error of `backend`.
    pub fn connection(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Connection {
            backend,
            source: source.into(),
        }
    }

    /// A backend error of `backend`.
    pub fn backend(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            backend,
            source: source.into(),
        }
    }

    /// The lock `name` is not held for `reason`.
    pub fn lost(name: impl Into<String>, reason: LostReason) -> Self {
        Error::LockLost {
            name: name.into(),
            reason,
        }
    }

    /// Whether trying the same operation again may succeed: true for connection errors.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Connection { .. })
    }

    /// Whether this is [`Error::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// Whether this is [`Error::LockLost`].
    pub fn is_lost(&self) -> bool {
        matches!(self, Error::LockLost { .. })
    }
}
