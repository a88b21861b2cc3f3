//! Consul's failures as a typed error, and how they map onto lockkit's [`Error`]: a request
//! that did not get through is [`Error::Connection`] (retried by the caller), an answer that
//! says no is [`Error::Backend`]. The underlying error stays the typed source.

use std::time::Duration;

use hyper::StatusCode;
use lockkit_core::{BoxError, Error};

/// The backend's name in errors and metrics.
pub(crate) const BACKEND: &str = "consul";

/// A request to the Consul agent that failed: the source of the [`Error::Connection`] or
/// [`Error::Backend`] lockkit reports. Never shows the ACL token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// Sending the request or reading its answer failed (refused, reset, closed mid-answer).
    #[error("{what}: {address}: {}", chain(source.as_ref()))]
    Transport {
        /// The request.
        what: &'static str,
        /// The agent's address.
        address: String,
        /// The HTTP client's error.
        #[source]
        source: BoxError,
    },
    /// No answer within the timeout.
    #[error("{what}: {address}: no answer within {timeout:?}")]
    Timeout {
        /// The request.
        what: &'static str,
        /// The agent's address.
        address: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// The agent answered with a status the request does not expect.
    #[error("{what}: {address} answered {status}: {body}")]
    Status {
        /// The request.
        what: &'static str,
        /// The agent's address.
        address: String,
        /// The HTTP status.
        status: StatusCode,
        /// The start of the answer's body.
        body: String,
    },
    /// The agent's answer could not be read.
    #[error("{what}: {address}: unreadable answer: {source}")]
    Answer {
        /// The request.
        what: &'static str,
        /// The agent's address.
        address: String,
        /// The decoding error.
        #[source]
        source: BoxError,
    },
    /// The agent answers but knows no cluster leader.
    #[error("{address}: the agent knows no cluster leader")]
    NoLeader {
        /// The agent's address.
        address: String,
    },
}

impl RequestError {
    /// A `Status` error, keeping at most 300 bytes of the body.
    pub(crate) fn status(
        what: &'static str,
        address: &str,
        status: StatusCode,
        body: &[u8],
    ) -> Self {
        let body = String::from_utf8_lossy(&body[..body.len().min(300)])
            .trim()
            .to_string();
        RequestError::Status {
            what,
            address: address.to_string(),
            status,
            body,
        }
    }

    /// Maps an rs-consul error: transport failures and timeouts are connection errors.
    pub(crate) fn from_client(
        what: &'static str,
        address: &str,
        e: rs_consul::ConsulError,
    ) -> Self {
        use rs_consul::ConsulError as C;
        let address = address.to_string();
        match e {
            C::ResponseError(e) => RequestError::Transport {
                what,
                address,
                source: e.into(),
            },
            C::InvalidResponse(e) => RequestError::Transport {
                what,
                address,
                source: e.into(),
            },
            C::TimeoutExceeded(timeout) => RequestError::Timeout {
                what,
                address,
                timeout,
            },
            C::UnexpectedResponseCode(status, body) => {
                Self::status(what, &address, status, body.unwrap_or_default().as_bytes())
            }
            other => RequestError::Answer {
                what,
                address,
                source: other.into(),
            },
        }
    }

    /// Whether a retry may succeed: the request did not get through.
    fn is_connection(&self) -> bool {
        matches!(
            self,
            RequestError::Transport { .. }
                | RequestError::Timeout { .. }
                | RequestError::NoLeader { .. }
        )
    }
}

impl From<RequestError> for Error {
    fn from(e: RequestError) -> Self {
        if e.is_connection() {
            Error::connection(BACKEND, e)
        } else {
            Error::backend(BACKEND, e)
        }
    }
}

/// The error and its causes on one line (hyper-util's own message is only "client error").
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
