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

/// Sorts client errors into connection errors (retryable) and backend errors.
pub(crate) fn map_err(e: zk::Error) -> Error {
    use zk::Error::*;
    match e {
        ConnectionLoss | Timeout | NoHosts | SessionExpired | ClientClosed | SessionMoved
        | Throttled => Error::connection(BACKEND, e),
        e => Error::backend(BACKEND, e),
    }
}
