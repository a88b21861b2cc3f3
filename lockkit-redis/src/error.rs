//! Redis client errors as lockkit errors, keeping the client's error as the source.

use lockkit_core::Error;

/// A Redis client error from one instance.
#[derive(Debug, thiserror::Error)]
#[error("{address}: {source}")]
pub(crate) struct InstanceError {
    /// The instance's `host:port` (never the password).
    address: String,
    source: redis::RedisError,
}

/// Too few instances took part for a quorum.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QuorumError {
    /// An acquisition reached too few instances.
    #[error("only {answered} of {total} instances answered, {needed} needed: {first}")]
    Unanswered {
        answered: usize,
        total: usize,
        needed: usize,
        /// The first instance's error.
        #[source]
        first: Error,
    },
    /// The fencing token was written back to too few instances.
    #[error("the fencing token reached only {confirmed} of {total} instances: {first}")]
    WriteBack {
        confirmed: usize,
        total: usize,
        /// The first instance's error.
        #[source]
        first: Error,
    },
}

/// Sorts Redis errors into connection errors (retryable) and backend errors.
pub(crate) fn map_err(address: &str, e: redis::RedisError) -> Error {
    let connection =
        e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal();
    let e = InstanceError {
        address: address.to_string(),
        source: e,
    };
    if connection {
        Error::connection("redis", e)
    } else {
        Error::backend("redis", e)
    }
}
