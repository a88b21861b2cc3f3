//! etcd client errors as lockkit errors, keeping the client's error as the source.

use etcd_client::Error as E;
use lockkit_core::Error;
use tonic::Code;

/// The backend's name in errors and metrics.
pub(crate) const BACKEND: &str = "etcd";

/// Sorts etcd client errors into connection errors (retryable) and backend errors.
pub(crate) fn map_err(e: E) -> Error {
    let connection = match &e {
        E::TransportError(_) | E::IoError(_) | E::LeaseKeepAliveError(_) | E::WatchError(_) => true,
        E::GRpcStatus(status) => match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => true,
            Code::Unknown => {
                let message = status.message().to_ascii_lowercase();
                ["transport", "connection", "broken pipe", "h2 protocol"]
                    .iter()
                    .any(|m| message.contains(m))
            }
            _ => false,
        },
        _ => false,
    };
    if connection {
        Error::connection(BACKEND, e)
    } else {
        Error::backend(BACKEND, e)
    }
}

/// Whether a request failed before it reached any server (no connection could be made), so
/// sending it again cannot apply it twice.
pub(crate) fn never_sent(e: &E) -> bool {
    match e {
        E::GRpcStatus(status) => {
            status.code() == Code::Unavailable
                && ["connect error", "error trying to connect"]
                    .iter()
                    .any(|m| status.message().contains(m))
        }
        _ => false,
    }
}

/// Whether etcd answered that the lease does not exist (expired or revoked).
pub(crate) fn lease_not_found(e: &E) -> bool {
    match e {
        E::GRpcStatus(status) => status.code() == Code::NotFound,
        E::LeaseKeepAliveError(why) => why.contains("not found"),
        _ => false,
    }
}
