//! sqlx errors as lockkit errors: connection errors (retryable) and backend errors, each
//! with the sqlx error as its source.

use lockkit_core::Error;

use crate::dialect::Dialect;

/// Sorts a sqlx error of dialect `D` into a connection error (the caller retries) or a
/// backend error.
pub(crate) fn map<D: Dialect>(e: sqlx::Error) -> Error {
    match is_connection::<D>(&e) {
        true => Error::connection(D::NAME, e),
        false => Error::backend(D::NAME, e),
    }
}

/// [`map`] for an error of connecting to `address`, which the message names.
pub(crate) fn map_at<D: Dialect>(address: &str, e: sqlx::Error) -> Error {
    let connection = is_connection::<D>(&e);
    let e = At {
        address: address.to_string(),
        source: e.into(),
    };
    match connection {
        true => Error::connection(D::NAME, e),
        false => Error::backend(D::NAME, e),
    }
}

/// No connection to `address` within `timeout`.
pub(crate) fn no_answer<D: Dialect>(address: &str, timeout: std::time::Duration) -> Error {
    let e = At {
        address: address.to_string(),
        source: format!("no connection within {timeout:?}").into(),
    };
    Error::connection(D::NAME, e)
}

/// An error of connecting to a server, with its address.
#[derive(Debug)]
pub(crate) struct At {
    address: String,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.address, self.source)
    }
}

impl std::error::Error for At {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

/// Whether `e` means the connection is lost or the server is not taking connections.
pub(crate) fn is_connection<D: Dialect>(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => D::connection_lost(db.as_ref()),
        _ => false,
    }
}

/// Whether `e` is a statement of dialect `D` that lost a race and changed nothing (a
/// deadlock victim, a lock wait that ran out).
pub(crate) fn lost_race<D: Dialect>(e: &Error) -> bool {
    let source = match e {
        Error::Backend { source, .. } => source,
        _ => return false,
    };
    match source.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(db)) => D::lost_race(db.as_ref()),
        _ => false,
    }
}

/// A statement that must return a value returned none (or NULL).
#[derive(Debug)]
pub(crate) struct NoValue(pub(crate) &'static str);

impl std::fmt::Display for NoValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} returned no value", self.0)
    }
}

impl std::error::Error for NoValue {}

/// The backend error of a statement (`what`) that returned no value.
pub(crate) fn no_value<D: Dialect>(what: &'static str) -> Error {
    Error::backend(D::NAME, NoValue(what))
}
