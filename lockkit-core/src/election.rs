//! Leader election, built on the lock: the leader of election `name` is the holder of the lock
//! `name`, and its announced value is stored with that lock
//! ([`Lease::set_value`](crate::backend::Lease::set_value)). So a term is a lock acquisition:
//! it has the lock's fencing token (strictly increasing across terms), is renewed by the same
//! keeper, and is lost the same way, with the same [`Leadership::lost`] signal. Observers read
//! the lock's holder and value ([`Admin::inspect`](crate::backend::Admin::inspect)) and wait
//! for the next change ([`Admin::changed`](crate::backend::Admin::changed)).

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::stream::{self, BoxStream, StreamExt};
use tokio::time::Instant;

use crate::admin::{LockInfo, MAX_VALUE_LEN};
use crate::error::{Error, LostReason, Result};
use crate::guard::LockGuard;
use crate::locks::{with_retries, Locks};
use crate::name::LockName;
use crate::options::LockOptions;
use crate::token::FencingToken;

/// The longest an observer waits for a change before it looks again anyway.
const OBSERVE_RECHECK: Duration = Duration::from_secs(30);

/// How long an observer waits before it asks again after a failed request.
const OBSERVE_BACKOFF: Duration = Duration::from_millis(500);

/// A leader as observers see it: the term's fencing token and the value the leader announced.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Leader {
    /// The term's fencing token: strictly greater than every earlier term's of this election.
    pub token: FencingToken,
    /// The value the leader announced ([`Locks::campaign`] or [`Leadership::proclaim`]).
    pub value: String,
}

impl Leader {
    /// The leader `info` describes, if it has announced a value. A holder that has taken the
    /// lock but not yet stored its value (one round trip after winning) is not announced yet.
    fn of(info: &LockInfo) -> Option<Leader> {
        Some(Leader {
            token: info.token.unwrap_or(FencingToken(0)),
            value: info.value.clone()?,
        })
    }
}

/// This process's term as leader of an election, from [`Locks::campaign`]. Like a
/// [`LockGuard`] (which it wraps): renewed in the background, resigned when dropped,
/// [`Leadership::lost`] resolves if leadership is lost anyway.
///
/// Hand [`Leadership::fencing_token`] to everything the leader changes, as for a lock: a
/// deposed leader that has not noticed yet is then refused by the resource.
#[derive(Debug)]
#[must_use = "leadership is resigned as soon as the handle is dropped"]
pub struct Leadership {
    guard: LockGuard,
    value: Mutex<String>,
}

impl Leadership {
    /// The election's name.
    pub fn name(&self) -> &str {
        self.guard.name()
    }

    /// This term's fencing token.
    pub fn fencing_token(&self) -> FencingToken {
        self.guard.fencing_token()
    }

    /// The value this leader announced last.
    pub fn value(&self) -> String {
        self.value.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether this process still leads, as far as it knows: false once leadership was lost
    /// (or its lease ran out unrenewed).
    pub fn is_leader(&self) -> bool {
        self.guard.is_held()
    }

    /// Resolves when leadership is lost (as [`LockGuard::lost`]); stop acting as leader then.
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        self.guard.lost()
    }

    /// The lock guard that carries this term (its lease, validity, extend).
    pub fn guard(&self) -> &LockGuard {
        &self.guard
    }

    /// Announces a new value without giving up leadership: observers see it as a change of
    /// the same term (same token). Fails with [`Error::LockLost`] if this process no longer
    /// leads, and then changes nothing.
    pub async fn proclaim(&self, value: impl Into<String>) -> Result<()> {
        let value = value.into();
        check_value(&value)?;
        if let Some(reason) = self.guard.lost_reason() {
            return Err(Error::lost(self.name(), reason));
        }
        self.guard
            .lease()
            .set_value(&value)
            .await
            .map_err(|e| self.guard.note(e))?;
        *self.value.lock().unwrap_or_else(|e| e.into_inner()) = value;
        Ok(())
    }

    /// Steps down: releases the election's lock, so the next candidate leads at once.
    /// Reports [`Error::LockLost`] if leadership had already been lost.
    pub async fn resign(self) -> Result<()> {
        self.guard.release().await
    }
}

/// Stores the winner's value and hands out its term. A connection error is retried (the
/// write is the same each time, so harmless) under the options' retry policy while the lease
/// is valid, rather than giving back a lock just won; a failure gives the lock back.
pub(crate) async fn announce(
    guard: LockGuard,
    value: String,
    opts: &LockOptions,
) -> Result<Leadership> {
    let written = with_retries(opts, false, Some(guard.valid_until()), || {
        guard.lease().set_value(&value)
    })
    .await;
    match written {
        Ok(()) => Ok(Leadership {
            guard,
            value: Mutex::new(value),
        }),
        Err(Some(e)) => Err(guard.note(e)),
        Err(None) => Err(Error::lost(guard.name(), LostReason::Expired)),
    }
}

fn check_value(value: &str) -> Result<()> {
    if value.len() > MAX_VALUE_LEN {
        return Err(Error::InvalidOptions(format!(
            "the leader's value is {} bytes long, the limit is {MAX_VALUE_LEN}",
            value.len()
        )));
    }
    Ok(())
}

impl Locks {
    /// Campaigns in election `name` with the default options and waits (as long as they say)
    /// until this process leads; the handle's value is `value`, visible to observers.
    ///
    /// Needs [`Capabilities::election`](crate::Capabilities::election)
    /// ([`Error::Unsupported`] otherwise). Candidates are served in the lock's order (FIFO on
    /// backends that claim it). Cancelling the campaign (dropping the future, or the wait
    /// timeout) leaves nothing behind.
    pub async fn campaign(&self, name: &str, value: impl Into<String>) -> Result<Leadership> {
        self.campaign_with(name, value, self.defaults()).await
    }

    /// [`Locks::campaign`] with explicit options (TTL: how soon a crashed leader is replaced;
    /// wait timeout: how long to campaign).
    pub async fn campaign_with(
        &self,
        name: &str,
        value: impl Into<String>,
        opts: &LockOptions,
    ) -> Result<Leadership> {
        let value = value.into();
        check_value(&value)?;
        self.require_election()?;
        let guard = self.acquire_with(name, opts).await?;
        announce(guard, value, opts).await
    }

    /// One attempt to become leader of `name` now: `Ok(None)` if another process leads.
    pub async fn try_campaign(
        &self,
        name: &str,
        value: impl Into<String>,
        opts: &LockOptions,
    ) -> Result<Option<Leadership>> {
        let value = value.into();
        check_value(&value)?;
        self.require_election()?;
        match self.try_acquire_with(name, opts).await? {
            Some(guard) => announce(guard, value, opts).await.map(Some),
            None => Ok(None),
        }
    }

    fn require_election(&self) -> Result<()> {
        if self.capabilities().election {
            Ok(())
        } else {
            Err(Error::Unsupported(format!(
                "the {} backend cannot store a leader's value, so it cannot run elections",
                self.backend_name()
            )))
        }
    }

    /// The current leader of election `name`, or `None` if nobody leads (or the winner has
    /// not announced its value yet).
    pub async fn leader(&self, name: &str) -> Result<Option<Leader>> {
        self.require_election()?;
        Ok(self.inspect(name).await?.as_ref().and_then(Leader::of))
    }

    /// Follows election `name`: the stream yields the current leader (`None`: nobody leads)
    /// at once, then every change (a new term, a new value, no leader) as it is seen, in
    /// order; consecutive equal states are reported once. Observing needs no campaign and
    /// changes nothing on the server.
    ///
    /// Changes are seen through the backend's events where it has them
    /// ([`Capabilities::watch`](crate::Capabilities::watch)), else by looking every
    /// [`POLL_INTERVAL`](crate::admin::POLL_INTERVAL). A leader that crashes is reported gone
    /// when its lease has run out. Terms that begin and end between two looks are not
    /// reported; the tokens an observer sees always increase. A failed request is yielded as
    /// an `Err` item and the stream carries on after a short pause; drop it to stop.
    pub fn observe(&self, name: &str) -> BoxStream<'static, Result<Option<Leader>>> {
        let start = LockName::new(name).and_then(|name| {
            self.require_election()?;
            if self.backend().admin().is_none() {
                return Err(Error::Unsupported(format!(
                    "the {} backend cannot inspect its locks",
                    self.backend_name()
                )));
            }
            Ok(name)
        });
        let name = match start {
            Ok(name) => name,
            Err(e) => return stream::once(async move { Err(e) }).boxed(),
        };
        let state = Observer {
            locks: self.clone(),
            name,
            seen: None,
            last: None,
            failed: false,
        };
        stream::unfold(state, |mut state| async move {
            let item = state.next().await;
            Some((item, state))
        })
        .boxed()
    }
}

fn admin_of(locks: &Locks) -> Result<&dyn crate::admin::Admin> {
    locks
        .backend()
        .admin()
        .ok_or_else(|| Error::Unsupported("this backend cannot inspect its locks".into()))
}

struct Observer {
    locks: Locks,
    name: LockName,
    /// What the last successful look found (`Some(None)`: free), for `changed`.
    seen: Option<Option<LockInfo>>,
    /// The last state yielded.
    last: Option<Option<Leader>>,
    failed: bool,
}

impl Observer {
    async fn next(&mut self) -> Result<Option<Leader>> {
        loop {
            if std::mem::take(&mut self.failed) {
                tokio::time::sleep(OBSERVE_BACKOFF).await;
            }
            if let Some(seen) = &self.seen {
                let now = Instant::now();
                let mut deadline = now + OBSERVE_RECHECK;
                if let Some(remaining) = seen.as_ref().and_then(|info| info.remaining) {
                    // A holder that stops renewing is gone once its lease has run out.
                    let slack = self.locks.capabilities().expiry_slack;
                    deadline = deadline.min(now + remaining + slack + Duration::from_millis(50));
                }
                let waited = admin_of(&self.locks)?
                    .changed(&self.name, seen.as_ref(), deadline)
                    .await;
                if let Err(e) = waited {
                    self.failed = true;
                    return Err(e);
                }
            }
            let info = match admin_of(&self.locks)?.inspect(&self.name).await {
                Ok(info) => info,
                Err(e) => {
                    self.failed = true;
                    return Err(e);
                }
            };
            let leader = info.as_ref().and_then(Leader::of);
            self.seen = Some(info);
            if self.last.as_ref() != Some(&leader) {
                // Never report an older term after a newer one (a stale read from a replica).
                let older = match (&self.last, &leader) {
                    (Some(Some(last)), Some(now)) => now.token < last.token,
                    _ => false,
                };
                if !older {
                    self.last = Some(leader.clone());
                    return Ok(leader);
                }
            }
        }
    }
}
