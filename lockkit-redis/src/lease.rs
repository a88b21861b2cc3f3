//! A lease held on one or more Redis instances: extend and release, by owner id.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lockkit_core::backend::{Lease, LockName};
use lockkit_core::{Error, LostReason, Result};
use tokio::time::Instant;

use crate::lock::{Inner, Keys};
use crate::{renewals, scripts};

/// A lease held on one or more instances.
#[derive(Debug, Clone)]
pub(crate) struct RedisLease {
    inner: Arc<Inner>,
    name: LockName,
    keys: Keys,
    owner: Arc<str>,
}

impl RedisLease {
    pub(crate) fn new(inner: Arc<Inner>, name: LockName, keys: Keys, owner: Arc<str>) -> Self {
        RedisLease {
            inner,
            name,
            keys,
            owner,
        }
    }

    /// Releases on every instance (telling waiters if `publish`: a single instance's first
    /// queued waiter, or all RedLock waiters); returns how many released and how many failed
    /// to answer.
    pub(crate) async fn release_all(&self, publish: bool) -> (usize, usize) {
        let mode = match (publish, self.inner.nodes.len()) {
            (false, _) => "0",
            (true, 1) => "2",
            (true, _) => "1",
        };
        let answers: Vec<Result<i64>> = self
            .inner
            .on_all(
                lockkit_core::DEFAULT_TTL,
                &scripts::RELEASE,
                &[&self.keys.lock, &self.keys.queue],
                &[&self.owner, &self.keys.channel, mode],
            )
            .await;
        let released = answers.iter().filter(|a| matches!(a, Ok(1))).count();
        let failed = answers.iter().filter(|a| a.is_err()).count();
        (released, failed)
    }
}

#[async_trait]
impl Lease for RedisLease {
    async fn extend(&self, ttl: Duration) -> Result<Instant> {
        let inner = &self.inner;
        let validity = inner.validity(ttl)?;
        // Batched with the client's other renewals; valid from when the batch was sent.
        let (started, answers) = renewals::extend(inner, &self.keys.lock, &self.owner, ttl).await?;
        let extended = answers.iter().filter(|a| matches!(a, Ok(1))).count();
        let refused = answers.iter().filter(|a| matches!(a, Ok(0))).count();
        if extended >= inner.quorum {
            if let Some(valid_until) = Inner::valid_until(started, validity) {
                return Ok(valid_until);
            }
        }
        if refused > inner.nodes.len() - inner.quorum {
            return Err(Error::lost(self.name.as_str(), LostReason::NotOwner));
        }
        let error = answers.into_iter().find_map(|a| a.err());
        Err(error.unwrap_or_else(|| {
            Error::connection(inner.backend, "the renewal did not reach a quorum in time")
        }))
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
