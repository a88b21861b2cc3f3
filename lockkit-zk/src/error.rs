//! ZooKeeper client errors as lockkit errors, keeping the client's error as the source.

use lockkit_core::Error;
use zookeeper_client as zk;

/// The backend's name in errors and metrics.
pub(crate) const BACKEND: &str = "zk";

/// A session could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open a session on {cluster}: {source}")]
pub(crate) struct SessionError {
    /// The connect string (hosts and chroot; the URL's credentials are refused).
    pub(crate) cluster: String,
    pub(crate) source: zk::Error,
}

/// Whether a request failed in transit, its outcome unknown: the connection was lost or
/// declared dead (the client fails the requests in flight with the connection's own error,
/// such as "no response from connection"), or no answer came in time.
pub(crate) fn in_transit(e: &zk::Error) -> bool {
    matches!(
        e,
        zk::Error::ConnectionLoss | zk::Error::Timeout | zk::Error::Custom(_)
    )
}

/// Sorts client errors into connection errors (retryable) and backend errors.
pub(crate) fn map_err(e: zk::Error) -> Error {
    use zk::Error::*;
    match e {
        NoHosts | SessionExpired | ClientClosed | SessionMoved | Throttled => {
            Error::connection(BACKEND, e)
        }
        e if in_transit(&e) => Error::connection(BACKEND, e),
        e => Error::backend(BACKEND, e),
    }
}
