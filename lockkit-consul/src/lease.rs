//! A held lock: renewing its session, releasing its key, storing the holder's value in it,
//! and the loss signal from the client's session watcher. The keeper times the renewals;
//! nothing here loops.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lockkit_core::backend::{Lease, LockName, LossSignal};
use lockkit_core::{Error, LostReason, Result};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::BACKEND;
use crate::http::Acquisition;
use crate::lock::{lease_end, Inner, Session};
use crate::shared::{SharedSession, RECENT};
use crate::watcher::Watcher;

/// A lease's loss signal, set by the client's session watcher (and, for a shared session,
/// by its key check).
#[derive(Debug)]
pub(crate) struct LeaseState {
    lost: LossSignal,
}

impl LeaseState {
    /// Marks the lease lost, once.
    pub(crate) fn mark_lost(&self, reason: LostReason) {
        self.lost.mark(reason);
    }

    fn reason(&self) -> Option<LostReason> {
        self.lost.reason()
    }
}

/// The session a held key is on.
pub(crate) enum Holder {
    /// A session of the lock's own (renewal off), destroyed on release.
    Own,
    /// The client's shared session of the lock's TTL, kept for its other locks.
    Shared(Arc<SharedSession>),
}

/// A held lock: the key and the session that holds it.
pub(crate) struct ConsulLease {
    inner: Arc<Inner>,
    name: LockName,
    /// Shared with the session's and the watcher's books (one allocation per held lock).
    key: Arc<str>,
    session: Arc<str>,
    session_ttl: Duration,
    holder: Holder,
    state: Arc<LeaseState>,
    /// The acquisition: the token, and what tells this holder from a later one on the same
    /// (shared) session.
    taken: Acquisition,
    /// The key's `ModifyIndex` after this lease's last write (the acquisition, then each
    /// value stored); one value is stored at a time. Made by the first value stored (only
    /// leaders store values), so a plain lock does not carry a mutex for it.
    written: std::sync::OnceLock<Box<tokio::sync::Mutex<u64>>>,
    /// Taken through the line: `Some`, with the session of the waiter seen behind, if any
    /// (the release hands the key to it, or reads the line first).
    line: Option<Option<String>>,
    /// Set when a release attempt's outcome was unknown (a connection error) and the key
    /// was handed to a background let-go (see [`ConsulLease::release_shared`]): its outcome.
    let_go: std::sync::Mutex<Option<watch::Receiver<Option<bool>>>>,
}

impl std::fmt::Debug for ConsulLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulLease")
            .field("key", &self.key)
            .field("session", &self.session)
            .field("session_ttl", &self.session_ttl)
            .field("shared", &matches!(self.holder, Holder::Shared(_)))
            .finish_non_exhaustive()
    }
}

impl ConsulLease {
    /// The lease of `session` (its own), which took the KV key `key` (`taken`); watched for
    /// invalidation from now on.
    pub(crate) fn new(
        inner: Arc<Inner>,
        name: LockName,
        key: String,
        session: Session,
        taken: Acquisition,
    ) -> Self {
        Self::build(
            inner,
            name,
            key.into(),
            session.id.into(),
            session.ttl,
            Holder::Own,
            taken,
        )
    }

    /// The lease of a key taken on the client's shared session `session`.
    pub(crate) fn shared(
        inner: Arc<Inner>,
        name: LockName,
        key: Arc<str>,
        session: Arc<SharedSession>,
        taken: Acquisition,
    ) -> Self {
        let (id, ttl) = (session.id.clone(), session.ttl);
        Self::build(inner, name, key, id, ttl, Holder::Shared(session), taken)
    }

    fn build(
        inner: Arc<Inner>,
        name: LockName,
        key: Arc<str>,
        session: Arc<str>,
        session_ttl: Duration,
        holder: Holder,
        taken: Acquisition,
    ) -> Self {
        let state = Arc::new(LeaseState {
            lost: LossSignal::new(),
        });
        if let Holder::Shared(shared) = &holder {
            shared.join(&key, &state);
        }
        Watcher::register(&inner.watcher, &inner, &key, &session, taken.token, &state);
        ConsulLease {
            inner,
            name,
            key,
            session,
            session_ttl,
            holder,
            state,
            taken,
            written: std::sync::OnceLock::new(),
            line: None,
            let_go: std::sync::Mutex::new(None),
        }
    }

    /// Marks the lease as taken through the line, with `behind` the session of the waiter
    /// seen next in it.
    pub(crate) fn came_through_line(mut self, behind: Option<String>) -> Self {
        self.line = Some(behind);
        self
    }

    /// Releases the key (only if this lease's session holds it), handing it to the first
    /// waiter in line if there is one.
    async fn release_key(&self) -> Result<bool> {
        let inner = &self.inner;
        inner
            .release_key(
                &self.key,
                &self.session,
                self.line.as_ref().map(Option::as_deref),
            )
            .await
    }

    fn not_owner(&self) -> Error {
        Error::lost(self.name.as_str(), LostReason::NotOwner)
    }

    /// Renews the lock's own session and checks the key is still held by it.
    async fn extend_own(&self) -> Result<Instant> {
        let sent = Instant::now();
        if !self.inner.http.renew_session(&self.session).await? {
            return Err(self.not_owner());
        }
        let (entry, _) = self
            .inner
            .http
            .read_key(&self.key, None, Duration::ZERO)
            .await?;
        if entry.and_then(|e| e.session).as_deref() != Some(&*self.session) {
            return Err(self.not_owner());
        }
        lease_end(sent, self.session_ttl)
    }

    /// Releases the key (only if this lease's session holds it; handed to the first waiter
    /// in line, if any), then destroys the lock's own session (or, if it came through a
    /// line, keeps it for the client's next wait in one).
    async fn release_own(&self) -> Result<()> {
        let released = self.release_key().await;
        // A session that came through a line and now holds nothing serves the client's next
        // wait in one.
        let spare = self.line.is_some()
            && matches!(released, Ok(true))
            && self.inner.keep_spare(&self.session, self.session_ttl);
        if spare {
            return Ok(());
        }
        let destroyed = self.inner.http.destroy_session(&self.session).await;
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

    /// Releases the key on the shared session, which stays for the client's other locks.
    /// If the answer is lost, the key is let go in the background (retried) before this
    /// client may take it again.
    /// Releases the key of a shared session. After an attempt whose outcome is unknown (a
    /// connection error), the key is let go in the background, and later attempts wait for
    /// that let-go instead of sending a release of their own: one that reached Consul after
    /// the let-go had given up the client's claim could release the same key taken again by
    /// another guard of this client on the same session. A let-go that finds the key no
    /// longer held counts as released (the earlier attempt did it); a loss in that window,
    /// such as the session invalidated during the outage, is reported by `lost()`.
    async fn release_shared(&self, session: &Arc<SharedSession>) -> Result<()> {
        session.leave(&self.key);
        let pending = self
            .let_go
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(mut outcome) = pending {
            let limit = self.inner.http.timeout();
            let done = tokio::time::timeout(limit, outcome.wait_for(Option::is_some)).await;
            return match done.map(|done| done.map(|d| *d)) {
                Ok(Ok(Some(true))) => Ok(()),
                Ok(_) => Err(Error::connection(
                    BACKEND,
                    format!("letting the key {} go failed", self.key),
                )),
                Err(_) => Err(Error::connection(
                    BACKEND,
                    format!("the key {} is still being let go", self.key),
                )),
            };
        }
        match self.release_key().await {
            Ok(released) => {
                self.inner.sessions.unclaim(&self.key);
                match released {
                    true => Ok(()),
                    false => Err(self.not_owner()),
                }
            }
            Err(e) => {
                let outcome = self.inner.let_go(self.key.clone(), session.clone());
                *self.let_go.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
                Err(e)
            }
        }
    }
}

#[async_trait]
impl Lease for ConsulLease {
    /// Renews the session and checks the key is still held by it. Consul fixes a session's
    /// TTL when it is created, so this renews for that TTL whatever `ttl` asks (see
    /// [`Lease::fixed_ttl`]): the keeper renews again until the holder's TTL is covered.
    /// On a shared session a renewal sent within the last second serves (one renewal a
    /// second at most for all the client's locks of a TTL), and the keys are checked every
    /// third of the TTL with one listing.
    async fn extend(&self, _ttl: Duration) -> Result<Instant> {
        let session = match &self.holder {
            // Boxed, so a shared-session renewal (the common case, thousands at once) stays
            // small.
            Holder::Own => return Box::pin(self.extend_own()).await,
            Holder::Shared(session) => session,
        };
        if let Some(reason) = self.state.reason() {
            return Err(Error::lost(self.name.as_str(), reason));
        }
        let until = session.renewed(&self.inner, RECENT).await.map_err(|e| {
            if e.is_lost() {
                self.inner.sessions.drop_session(session);
                Error::lost(self.name.as_str(), LostReason::NotOwner)
            } else {
                e
            }
        })?;
        match self.state.reason() {
            Some(reason) => Err(Error::lost(self.name.as_str(), reason)),
            None => Ok(until),
        }
    }

    /// Writes `<token> <value>` to the key, only while this acquisition holds it: a
    /// `check-index` transaction on the index of the lease's last write (one request). If
    /// the key changed since (a write of ours whose answer was lost), it is read: still ours
    /// (same session, `CreateIndex` and `LockIndex`), the write is tried again at its new
    /// index; else [`Error::LockLost`].
    async fn set_value(&self, value: &str) -> Result<()> {
        if let Some(reason) = self.state.reason() {
            return Err(Error::lost(self.name.as_str(), reason));
        }
        let body = format!("{} {value}", self.taken.token);
        let written =
            (self.written).get_or_init(|| Box::new(tokio::sync::Mutex::new(self.taken.token)));
        let mut written = written.lock().await;
        let http = &self.inner.http;
        for _ in 0..3 {
            let write = http.write_held(&self.key, &self.session, *written, body.as_bytes());
            if let Some(index) = write.await? {
                *written = index;
                return Ok(());
            }
            let (entry, _) = http.read_key(&self.key, None, Duration::ZERO).await?;
            match entry {
                Some(entry) if entry.held_by(&self.session, &self.taken) => {
                    *written = entry.modify_index;
                }
                _ => return Err(self.not_owner()),
            }
        }
        Err(Error::connection(
            BACKEND,
            format!(
                "the key {} kept changing while its value was stored",
                self.key
            ),
        ))
    }

    async fn release(&self) -> Result<()> {
        let result = match &self.holder {
            Holder::Own => self.release_own().await,
            Holder::Shared(session) => self.release_shared(session).await,
        };
        self.inner.watcher.deregister(&self.key);
        result
    }

    async fn lost(&self) -> LostReason {
        self.state.lost.wait().await
    }

    fn fixed_ttl(&self) -> Option<Duration> {
        Some(self.session_ttl)
    }
}

impl Drop for ConsulLease {
    fn drop(&mut self) {
        self.inner.watcher.deregister(&self.key);
        if let Holder::Shared(session) = &self.holder {
            session.leave(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every held lock has one: with 10 000 held, each 16 bytes is 160 KB.
    #[test]
    fn a_lease_is_at_most_176_bytes() {
        let size = std::mem::size_of::<super::ConsulLease>();
        assert!(size <= 176, "ConsulLease is {size} bytes");
    }
}
