//! One blocking query per client on the session list, so a guard learns at once when Consul
//! invalidates its session (TTL lapsed, destroyed from outside; sessions carry no health
//! checks, so a node failure is not a cause): the lease's
//! `lost()` then resolves without waiting for the next renewal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use lockkit_core::LostReason;

use crate::lease::LeaseState;
use crate::lock::Inner;

/// How long one blocking query on the session list may wait.
const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub(crate) struct Watcher {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    running: bool,
    /// Lock key → (the session holding it, the lock's fencing token, the lease). Several
    /// keys may be on one (shared) session.
    leases: HashMap<Arc<str>, (Arc<str>, u64, Weak<LeaseState>)>,
}

impl Watcher {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches `session`, which acquired the lock `key` at Raft index `token`.
    pub(crate) fn register(
        this: &Arc<Watcher>,
        inner: &Arc<Inner>,
        key: &Arc<str>,
        session: &Arc<str>,
        token: u64,
        lease: &Arc<LeaseState>,
    ) {
        let mut state = this.state();
        let watched = (session.clone(), token, Arc::downgrade(lease));
        state.leases.insert(key.clone(), watched);
        if !state.running {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                state.running = true;
                runtime.spawn(watch(this.clone(), Arc::downgrade(inner)));
            }
        }
    }

    pub(crate) fn deregister(&self, key: &str) {
        self.state().leases.remove(key);
    }
}

async fn watch(watcher: Arc<Watcher>, inner: Weak<Inner>) {
    let mut index = 0;
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(client) = inner.upgrade() else {
            watcher.state().running = false;
            return;
        };
        let listed = client.http.list_sessions(index, WAIT).await;
        drop(client);
        match listed {
            Ok((sessions, new_index)) => {
                let sessions: std::collections::HashSet<&str> =
                    sessions.iter().map(String::as_str).collect();
                backoff = Duration::from_millis(100);
                // An index that went backwards means the server state was reset.
                index = if new_index < index { 0 } else { new_index };
                let mut state = watcher.state();
                state.leases.retain(|_, (id, token, lease)| {
                    let Some(lease) = lease.upgrade() else {
                        return false;
                    };
                    // A list at an index below the acquisition may predate the session.
                    if new_index < *token || sessions.contains(&**id) {
                        return true;
                    }
                    lease.mark_lost(LostReason::SessionLost(
                        "Consul invalidated the session (TTL lapsed or destroyed)".into(),
                    ));
                    false
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, ?backoff, "watching sessions");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                index = 0;
            }
        }
        let mut state = watcher.state();
        if state.leases.is_empty() {
            state.running = false;
            return;
        }
    }
}
