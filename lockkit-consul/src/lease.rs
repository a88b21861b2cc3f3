//! A held lock: renewing its session, releasing its key, and the loss signal from the
//! client's session watcher. The keeper times the renewals; nothing here loops.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lockkit_core::backend::{FencingToken, Lease, LockName};
use lockkit_core::{Error, LostReason, Result};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::lock::{lease_end, Inner, Session};
use crate::watcher::Watcher;

/// A lease's loss signal, set by the client's session watcher.
#[derive(Debug)]
pub(crate) struct LeaseState {
    lost: watch::Sender<Option<LostReason>>,
}

impl LeaseState {
    /// Marks the lease lost, once.
    pub(crate) fn mark_lost(&self, reason: LostReason) {
        self.lost.send_if_modified(|slot| {
            if slot.is_none() {
                *slot = Some(reason);
                true
            } else {
                false
            }
        });
    }
}

/// A held lock: the key and the session that holds it.
pub(crate) struct ConsulLease {
    inner: Arc<Inner>,
    name: LockName,
    key: String,
    session: String,
    session_ttl: Duration,
    state: Arc<LeaseState>,
}

impl std::fmt::Debug for ConsulLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulLease")
            .field("key", &self.key)
            .field("session", &self.session)
            .field("session_ttl", &self.session_ttl)
            .finish_non_exhaustive()
    }
}

impl ConsulLease {
    /// The lease of `session`, which took the KV key `key` with fencing token `token`;
    /// watched for invalidation from now on.
    pub(crate) fn new(
        inner: Arc<Inner>,
        name: LockName,
        key: String,
        session: Session,
        token: FencingToken,
    ) -> Self {
        let (lost, _) = watch::channel(None);
        let state = Arc::new(LeaseState { lost });
        Watcher::register(&inner.watcher, &inner, &session.id, token.get(), &state);
        ConsulLease {
            inner,
            name,
            key,
            session: session.id,
            session_ttl: session.ttl,
            state,
        }
    }

    fn not_owner(&self) -> Error {
        Error::lost(self.name.as_str(), LostReason::NotOwner)
    }
}

#[async_trait]
impl Lease for ConsulLease {
    /// Renews the session and checks the key is still held by it. Consul fixes a session's
    /// TTL when it is created, so this renews for that TTL whatever `ttl` asks (see
    /// [`Lease::fixed_ttl`]): the keeper renews again until the holder's TTL is covered.
    async fn extend(&self, _ttl: Duration) -> Result<Instant> {
        let sent = Instant::now();
        if !self.inner.http.renew_session(&self.session).await? {
            return Err(self.not_owner());
        }
        let (entry, _) = self
            .inner
            .http
            .read_key(&self.key, None, Duration::ZERO)
            .await?;
        if entry.and_then(|e| e.session).as_deref() != Some(self.session.as_str()) {
            return Err(self.not_owner());
        }
        lease_end(sent, self.session_ttl)
    }

    /// Releases the key (only if this session holds it), then destroys the session.
    async fn release(&self) -> Result<()> {
        let released = self.inner.http.put_key(&self.key, "", &self.session).await;
        let destroyed = self.inner.http.destroy_session(&self.session).await;
        self.inner.watcher.deregister(&self.session);
        match (released?, destroyed) {
            (false, _) => Err(self.not_owner()),
            (true, Ok(())) => Ok(()),
            // Released: the session lapses on its own at its TTL, holding nothing.
            (true, Err(e)) => {
                tracing::debug!(error = %e, "destroying a released session");
                Ok(())
            }
        }
    }

    async fn lost(&self) -> LostReason {
        let mut rx = self.state.lost.subscribe();
        let reason = rx.wait_for(Option::is_some).await.map(|r| r.clone());
        match reason {
            Ok(Some(reason)) => reason,
            // The lease itself holds the sender, so this does not happen.
            _ => std::future::pending().await,
        }
    }

    fn fixed_ttl(&self) -> Option<Duration> {
        Some(self.session_ttl)
    }
}

impl Drop for ConsulLease {
    fn drop(&mut self) {
        self.inner.watcher.deregister(&self.session);
    }
}
