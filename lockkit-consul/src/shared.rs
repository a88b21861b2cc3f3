//! The client's shared sessions: one Consul session per TTL for all the guards that renew,
//! so an acquisition is one request (no session to create), a release one request (no
//! session to destroy), and renewal one request per session and second at most, however
//! many guards hold locks on it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use lockkit_core::backend::{retry_until, LockName};
use lockkit_core::{Error, LostReason, Result, RetryPolicy};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::lease::LeaseState;
use crate::lock::{lease_end, Inner};

/// A renewal sent at most this long ago serves a guard's `extend` without a request of its
/// own.
pub(crate) const RECENT: Duration = Duration::from_secs(1);

/// One session shared by the client's renewing guards of one TTL.
pub(crate) struct SharedSession {
    /// Shared with the leases of the keys taken on it.
    pub(crate) id: Arc<str>,
    pub(crate) ttl: Duration,
    state: Mutex<State>,
    /// One renewal at a time; callers that queue behind it reuse its answer.
    renewing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for SharedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSession")
            .field("id", &self.id)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

struct State {
    /// When the request that created or last renewed the session was sent: Consul keeps it
    /// at least until this plus the TTL.
    fresh_at: Instant,
    /// Consul no longer knows the session (or it was retired): no key may be taken on it.
    lost: bool,
    /// The keys held on the session, each with when it was taken and its loss signal.
    members: HashMap<Arc<str>, (Instant, Weak<LeaseState>)>,
    /// When the keys were last checked.
    checked_at: Instant,
}

impl SharedSession {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.state().lost
    }

    /// Until when the last renewal keeps the session.
    pub(crate) fn until(&self) -> Result<Instant> {
        lease_end(self.state().fresh_at, self.ttl)
    }

    pub(crate) fn mark_lost(&self) {
        let mut state = self.state();
        state.lost = true;
        for (_, member) in state.members.values() {
            if let Some(member) = member.upgrade() {
                member.mark_lost(LostReason::SessionLost(
                    "Consul no longer knows the session".into(),
                ));
            }
        }
    }

    pub(crate) fn join(&self, key: &Arc<str>, lease: &Arc<LeaseState>) {
        let taken = Instant::now();
        let member = (taken, Arc::downgrade(lease));
        self.state().members.insert(key.clone(), member);
    }

    pub(crate) fn leave(&self, key: &str) {
        self.state().members.remove(key);
    }

    /// Until when the session is known kept, from a renewal sent at most `recent` ago (one
    /// is sent now if needed; concurrent callers share it). Every third of the TTL the
    /// renewal also checks that the keys taken on the session are still held by it.
    pub(crate) async fn renewed(
        self: &Arc<Self>,
        inner: &Arc<Inner>,
        recent: Duration,
    ) -> Result<Instant> {
        let fresh = |state: &State| state.fresh_at.elapsed() <= recent;
        {
            let state = self.state();
            if state.lost {
                return Err(self.gone());
            }
            if fresh(&state) {
                return lease_end(state.fresh_at, self.ttl);
            }
        }
        let _one = self.renewing.lock().await;
        {
            let state = self.state();
            if state.lost {
                return Err(self.gone());
            }
            if fresh(&state) {
                return lease_end(state.fresh_at, self.ttl);
            }
        }
        let sent = Instant::now();
        let check = self.state().checked_at.elapsed() >= self.ttl / 3;
        // Boxed: only one of the callers sharing the renewal sends it, and with thousands
        // of locks on the session they all wait here at once.
        if !Box::pin(inner.http.renew_session(&self.id)).await? {
            self.mark_lost();
            return Err(self.gone());
        }
        {
            let mut state = self.state();
            state.fresh_at = sent;
            if check {
                // Not started again before a third of the TTL.
                state.checked_at = sent;
            }
        }
        if check {
            // In the background: the renewal's callers do not wait for a listing.
            let (this, inner) = (self.clone(), inner.clone());
            tokio::spawn(async move {
                if let Err(e) = this.check_keys(&inner).await {
                    tracing::debug!(error = %e, "checking the keys of a shared session");
                }
            });
        }
        lease_end(sent, self.ttl)
    }

    /// One listing of the lock prefix: a key taken on this session before the listing that
    /// the session no longer holds (released or deleted from outside) is marked lost.
    async fn check_keys(&self, inner: &Inner) -> Result<()> {
        let sent = Instant::now();
        let held = inner.http.keys_held_by(&inner.prefix(), &self.id).await?;
        let state = self.state();
        for (key, (taken, member)) in &state.members {
            if *taken < sent && !held.contains(&**key) {
                if let Some(member) = member.upgrade() {
                    member.mark_lost(LostReason::NotOwner);
                }
            }
        }
        Ok(())
    }

    fn gone(&self) -> Error {
        Error::lost(
            format!("session {}", self.id),
            LostReason::SessionLost("Consul no longer knows the session".into()),
        )
    }
}

/// The client's shared sessions, one per TTL, and the keys they hold.
#[derive(Default)]
pub(crate) struct Sessions {
    by_ttl: Mutex<HashMap<Duration, Arc<SharedSession>>>,
    /// Held while a session is created, so concurrent first acquisitions share one.
    creating: tokio::sync::Mutex<()>,
    /// The lock keys this client holds (or is taking, or letting go of) on a shared
    /// session. Consul lets a session take a key it already holds, so this is what keeps
    /// two guards of one client off one lock.
    /// Each key is the one string the lease and the session's books share.
    claimed: Mutex<HashSet<Arc<str>>>,
}

impl Sessions {
    fn map(&self) -> MutexGuard<'_, HashMap<Duration, Arc<SharedSession>>> {
        self.by_ttl.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn claims(&self) -> MutexGuard<'_, HashSet<Arc<str>>> {
        self.claimed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `key` for an acquisition by this client: `false` if the client holds it (or is
    /// taking it) already.
    pub(crate) fn claim(&self, key: &Arc<str>) -> bool {
        self.claims().insert(key.clone())
    }

    pub(crate) fn unclaim(&self, key: &str) {
        self.claims().remove(key);
    }

    fn live(&self, ttl: Duration) -> Option<Arc<SharedSession>> {
        self.map().get(&ttl).filter(|s| !s.is_lost()).cloned()
    }

    /// Forgets a session Consul no longer knows, so the next acquisition creates another.
    pub(crate) fn drop_session(&self, session: &Arc<SharedSession>) {
        session.mark_lost();
        let mut map = self.map();
        if map
            .get(&session.ttl)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            map.remove(&session.ttl);
        }
    }
}

impl Inner {
    /// The shared session of `ttl`, renewed first if a third of its TTL has passed since its
    /// last renewal; created if there is none (or Consul dropped it).
    pub(crate) async fn shared_session(
        self: &Arc<Self>,
        name: &LockName,
        ttl: Duration,
    ) -> Result<Arc<SharedSession>> {
        if let Some(session) = self.sessions.live(ttl) {
            match session.renewed(self, ttl / 3).await {
                Ok(_) => return Ok(session),
                Err(e) if e.is_lost() => self.sessions.drop_session(&session),
                Err(e) => return Err(e),
            }
        }
        let _one = self.sessions.creating.lock().await;
        if let Some(session) = self.sessions.live(ttl) {
            return Ok(session);
        }
        let label = format!("lockkit shared, first for {}", name.encoded());
        let (id, sent) = self.new_session(&label, ttl).await?;
        let session = Arc::new(SharedSession {
            id: id.into(),
            ttl,
            state: Mutex::new(State {
                fresh_at: sent,
                lost: false,
                members: HashMap::new(),
                checked_at: sent,
            }),
            renewing: tokio::sync::Mutex::new(()),
        });
        self.sessions.map().insert(ttl, session.clone());
        Ok(session)
    }

    /// Releases `key` held by `session` in the background, retrying for up to twice the
    /// TTL (the session stays valid while other guards renew it, so a key left held would
    /// block the lock), then gives the client's claim on it up. The outcome: `true` once
    /// the key is let go (released, or found not held by the session), `false` if the
    /// let-go gave up; the sender is dropped without a value when there is no runtime.
    pub(crate) fn let_go(
        self: &Arc<Self>,
        key: Arc<str>,
        session: Arc<SharedSession>,
    ) -> watch::Receiver<Option<bool>> {
        let (done, outcome) = watch::channel(None);
        let inner = self.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return outcome;
        };
        runtime.spawn(async move {
            let until = Instant::now() + session.ttl * 2;
            let release = || async {
                if session.is_lost() {
                    return Ok(false);
                }
                inner.http.put_key(&key, "", &session.id).await
            };
            let result = retry_until(&RetryPolicy::default(), until, release).await;
            if let Err(e) = &result {
                tracing::debug!(error = %e, %key, "letting go of a key");
            }
            inner.sessions.unclaim(&key);
            done.send_replace(Some(result.is_ok()));
        });
        outcome
    }
}
