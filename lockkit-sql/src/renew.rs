//! Renewals of lease rows, batched per client: the keeper extends each guard on its own, and
//! the extends that arrive within a few milliseconds of each other go out as one statement
//! (on SQLite also one commit). A batch in which some rows were not extended is halved and
//! each half sent again, down to single rows, so each guard learns its own answer.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use lockkit_core::backend::{LockName, RenewalBatches};
use lockkit_core::{Error, Result};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::dialect::{Bind, Db, Dialect};
use crate::lease::row;
use crate::lock::Shared;
use crate::wait::millis;

/// Most rows per statement.
const MOST: usize = 500;

/// One extend waiting for its batch.
pub(crate) struct Ask {
    name: LockName,
    owner: Arc<str>,
    ttl: Duration,
    /// When the statement that extended the row was sent; `None`: not ours, or too late.
    answer: oneshot::Sender<Result<Option<Instant>>>,
}

/// The extends of one client waiting for their batch, and whether a task is sending them.
pub(crate) type Renewals = RenewalBatches<Ask>;

/// Extends the lease row (`name`, `owner`) by `ttl` in the client's next batch: when the
/// statement that extended it was sent, or `None` if it is not ours or its lease ran out.
/// Cancel-safe: the batch is sent by a task of its own.
pub(crate) async fn extend<D: Dialect>(
    lock: &Arc<Shared<D>>,
    name: &LockName,
    owner: &Arc<str>,
    ttl: Duration,
) -> Result<Option<Instant>> {
    let (answer, answered) = oneshot::channel();
    let ask = Ask {
        name: name.clone(),
        owner: owner.clone(),
        ttl,
        answer,
    };
    lock.renewals.push(ask, || send_batches(lock.clone()));
    answered.await.unwrap_or_else(|_| {
        Err(Error::Unsupported(
            "the renewal task stopped: the Tokio runtime is shutting down".into(),
        ))
    })
}

/// Sends the waiting extends until none are left, each batch once it has waited for others
/// to join it ([`RenewalBatches::next_batch`]).
async fn send_batches<D: Dialect>(lock: Arc<Shared<D>>) {
    while let Some(batch) = lock.renewals.next_batch(MOST, |ask| ask.ttl).await {
        send::<D>(&lock, batch).await;
    }
}

/// Extends the rows of `batch` in one statement; a part in which only some rows were
/// extended (or that failed) is halved and each half tried again, down to single rows, so each
/// extend learns its own answer in few statements.
async fn send<D: Dialect>(lock: &Shared<D>, batch: Vec<Ask>) {
    let mut parts = vec![batch];
    while let Some(mut part) = parts.pop() {
        let many = match &lock.sql.extend_many {
            Some(many) if part.len() > 1 => many,
            _ => {
                for ask in part {
                    let sent = Instant::now();
                    let extended =
                        row(lock, &lock.sql.extend, &ask.name, &ask.owner, ask.ttl).await;
                    let _ = ask.answer.send(extended.map(|ok| ok.then_some(sent)));
                }
                continue;
            }
        };
        let rows = rows_json(&part);
        // Before the bind reads the local clock (SQLite's leases end on it).
        let sent = Instant::now();
        let bind = Bind::new(&part[0].name).rows(&rows);
        let answer = match D::Db::run(lock.warm(), many, &bind).await {
            Ok(Some(n)) if n == part.len() as i64 => Some(Some(sent)),
            // None was ours and in time: the statement checked each.
            Ok(Some(0)) => Some(None),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(error = %e, "a batched renewal failed; in halves");
                None
            }
        };
        match answer {
            Some(answer) => {
                for ask in part {
                    let _ = ask.answer.send(Ok(answer));
                }
            }
            None => {
                let half = part.split_off(part.len() / 2);
                parts.push(part);
                parts.push(half);
            }
        }
    }
}

/// The rows of `batch` as a JSON array of `{"name", "owner", "ttl"}`.
fn rows_json(batch: &[Ask]) -> String {
    // The fixed text of a row, with a 20-digit TTL.
    const ROW: usize = r#"{"name":"","owner":"","ttl":},"#.len() + 20;
    let size: usize = (batch.iter())
        .map(|ask| ROW + ask.name.as_str().len() + ask.owner.len())
        .sum();
    let mut out = String::with_capacity(size + 2);
    out.push('[');
    for (i, ask) in batch.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"name\":");
        json_string(&mut out, ask.name.as_str());
        out.push_str(",\"owner\":");
        json_string(&mut out, &ask.owner);
        let _ = write!(out, ",\"ttl\":{}}}", millis(ask.ttl));
    }
    out.push(']');
    out
}

/// `s` as a JSON string. The text between the characters that need escaping is copied as
/// it is (every byte that needs it is ASCII, so never part of a wider character).
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate() {
        if b >= 0x20 && b != b'"' && b != b'\\' {
            continue;
        }
        out.push_str(&s[plain..i]);
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        plain = i + 1;
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_strings_escape_quotes_backslashes_and_controls() {
        let mut out = String::new();
        super::json_string(&mut out, "a\"b\\c\nd\u{1}é");
        assert_eq!(out, "\"a\\\"b\\\\c\\u000ad\\u0001é\"");
        out.clear();
        super::json_string(&mut out, "plain/é✓");
        assert_eq!(out, "\"plain/é✓\"");
        out.clear();
        super::json_string(&mut out, "\"é\n");
        assert_eq!(out, "\"\\\"é\\u000a\"");
    }
}
