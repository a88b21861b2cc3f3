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

    /// Whether a retry may succeed: the request did not get through, to the agent or from
    /// the agent to the servers' leader.
    fn is_connection(&self) -> bool {
        match self {
            RequestError::Transport { .. }
            | RequestError::Timeout { .. }
            | RequestError::NoLeader { .. } => true,
            RequestError::Status { status, body, .. } => {
                *status == StatusCode::INTERNAL_SERVER_ERROR
                    && NO_SERVER_ANSWER.iter().any(|words| body.contains(words))
            }
            RequestError::Answer { .. } => false,
        }
    }
}

/// What Consul says in a 500 answer when the servers did not answer the request: no leader
/// (yet), the agent's RPC to a server broke off (the server died mid-call, or the agent's
/// multiplexed connection to it was torn down: yamux's "session shutdown", not the end of a
/// Consul session, which is "invalid session"), or the leader lost its leadership while
/// committing. While a new leader is elected, every request gets one of these; once it is,
/// the same request succeeds. (An answer from the leader, like "invalid session", is none of
/// these and stays an `Error::Backend`.)
const NO_SERVER_ANSWER: &[&str] = &[
    "No cluster leader",
    "No known Consul servers",
    "rpc error making call: EOF",
    "rpc error making call: unexpected EOF",
    "rpc error making call: stream closed",
    "rpc error making call: session shutdown",
    "rpc error getting client",
    "leadership lost while committing log",
    "node is not the leader",
    "raft is already shutdown",
    "connection refused",
    "connection reset by peer",
];

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

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(body: &str) -> Error {
        let status = StatusCode::INTERNAL_SERVER_ERROR;
        RequestError::status("read lock key", "http://a:8500", status, body.as_bytes()).into()
    }

    #[test]
    fn a_leader_election_is_a_connection_error() {
        // Seen on a client agent while the server leader was killed (tests/cluster_faults.rs).
        for body in [
            "rpc error making call: rpc error making call: EOF",
            "rpc error making call: rpc error making call: stream closed",
            // The agent's multiplexed connection to the killed server was torn down (yamux).
            "rpc error making call: rpc error making call: session shutdown",
            "rpc error making call: No cluster leader",
            "No cluster leader",
            "leadership lost while committing log",
        ] {
            assert!(answered(body).is_retryable(), "{body}");
        }
    }

    #[test]
    fn an_answer_of_the_leader_is_not() {
        for body in [
            "rpc error making call: invalid session \"x\"",
            "Missing key name",
        ] {
            assert!(!answered(body).is_retryable(), "{body}");
        }
        let not_found = RequestError::status("x", "a", StatusCode::NOT_FOUND, b"No cluster leader");
        assert!(!Error::from(not_found).is_retryable());
    }
}
