//! A lease held on one or more Redis instances: extend, release and the holder's value, by
//! owner id.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lockkit_core::backend::{FencingToken, Lease, LockName};
use lockkit_core::{Error, LostReason, Result};
use tokio::time::Instant;

use crate::lock::Inner;
use crate::{renewals, scripts};

/// A lease held on one or more instances.
#[derive(Debug, Clone)]
pub(crate) struct RedisLease {
    inner: Arc<Inner>,
    name: LockName,
    /// The lock's key, for renewals; the name's other keys are derived when needed
    /// ([`Inner::keys`]), so a held lease keeps one key, not seven.
    lock_key: Box<str>,
    owner: Arc<str>,
    /// The sequence number of the last value stored: with RedLock, a later value wins over an
    /// earlier one on every instance, whatever order they arrive in.
    values: Arc<AtomicU64>,
    /// The fencing token, once the lease is won: stored with each value, since a RedLock
    /// instance's fence counter may have moved past it (a contender's undone partial win).
    token: FencingToken,
}

impl RedisLease {
    pub(crate) fn new(inner: Arc<Inner>, name: LockName, lock_key: &str, owner: Arc<str>) -> Self {
        RedisLease {
            inner,
            name,
            lock_key: lock_key.into(),
            owner,
            values: Arc::default(),
            token: FencingToken(0),
        }
    }

    /// The lease, won with `token`.
    pub(crate) fn with_token(mut self, token: FencingToken) -> Self {
        self.token = token;
        self
    }

    /// Releases on every instance (if `publish`: handing the lock to a single instance's
    /// first live queued waiter, or telling all RedLock waiters); returns how many released
    /// and how many failed to answer.
    pub(crate) async fn release_all(&self, publish: bool) -> (usize, usize) {
        let mode = match (publish, self.inner.nodes.len()) {
            (false, _) => "0",
            (true, 1) => "2",
            (true, _) => "1",
        };
        let keys = self.inner.keys(&self.name);
        let answers: Vec<Result<i64>> = self
            .inner
            .on_all(
                lockkit_core::DEFAULT_TTL,
                &scripts::RELEASE,
                &[
                    keys.lock(),
                    keys.queue(),
                    keys.value(),
                    keys.fence(),
                    keys.alive(),
                    keys.asked(),
                ],
                &[&self.owner, keys.channel(), mode],
            )
            .await;
        let released = answers.iter().filter(|a| matches!(a, Ok(1))).count();
        let failed = answers.iter().filter(|a| a.is_err()).count();
        (released, failed)
    }
}

impl RedisLease {
    /// Whether a quorum of instances did it (answered 1); [`Error::LockLost`] when so many
    /// refused (answered 0: the lock is not ours there) that no quorum is left.
    fn quorum_of(&self, answers: &[Result<i64>]) -> Result<bool> {
        let done = answers.iter().filter(|a| matches!(a, Ok(1))).count();
        let refused = answers.iter().filter(|a| matches!(a, Ok(0))).count();
        if refused > self.inner.nodes.len() - self.inner.quorum {
            return Err(Error::lost(self.name.as_str(), LostReason::NotOwner));
        }
        Ok(done >= self.inner.quorum)
    }

    /// The error of a request (`what`) that was neither refused nor confirmed by a quorum.
    fn short_of_quorum(&self, answers: Vec<Result<i64>>, what: &str) -> Error {
        let error = answers.into_iter().find_map(|a| a.err());
        error.unwrap_or_else(|| {
            Error::connection(
                self.inner.backend,
                format!("{what} did not reach a quorum in time"),
            )
        })
    }
}

#[async_trait]
impl Lease for RedisLease {
    async fn extend(&self, ttl: Duration) -> Result<Instant> {
        let inner = &self.inner;
        let validity = inner.validity(ttl)?;
        // Batched with the client's other renewals; valid from when the batch was sent.
        let (started, answers) = renewals::extend(inner, &self.lock_key, &self.owner, ttl).await?;
        if self.quorum_of(&answers)? {
            if let Some(valid_until) = Inner::valid_until(started, validity) {
                return Ok(valid_until);
            }
        }
        Err(self.short_of_quorum(answers, "the renewal"))
    }

    /// Stores `<owner> <sequence> <token> <value>` in the name's value key on every instance where
    /// the lock is this lease's (one script call each), and tells observers; a quorum must
    /// confirm. See [`scripts::SET_VALUE`].
    async fn set_value(&self, value: &str) -> Result<()> {
        let sequence = (self.values.fetch_add(1, Ordering::Relaxed) + 1).to_string();
        let value = format!("{} {value}", self.token.get());
        let keys = self.inner.keys(&self.name);
        let answers: Vec<Result<i64>> = self
            .inner
            .on_all(
                lockkit_core::DEFAULT_TTL,
                &scripts::SET_VALUE,
                &[keys.lock(), keys.value()],
                &[&self.owner, &sequence, &value, keys.channel()],
            )
            .await;
        if self.quorum_of(&answers)? {
            return Ok(());
        }
        Err(self.short_of_quorum(answers, "storing the value"))
    }

    /// Loss is found by the renewal that fails, or at the end of the lease.
    fn signals_loss(&self) -> bool {
        false
    }

    async fn release(&self) -> Result<()> {
        let inner = &self.inner;
        let (released, failed) = self.release_all(true).await;
        if released >= inner.quorum {
            Ok(())
        } else if released + failed >= inner.quorum {
            Err(Error::connection(
                inner.backend,
                format!(
                    "release confirmed by {released} of {} instances, {failed} did not answer",
                    inner.nodes.len()
                ),
            ))
        } else {
            Err(Error::lost(self.name.as_str(), LostReason::NotOwner))
        }
    }
}
