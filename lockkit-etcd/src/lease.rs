//! One lock key and the etcd lease it is bound to: renewal, TTL changes, release, and the
//! leader's value, stored in the key itself (see [`Lease::set_value`] below).

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use lockkit_core::backend::{run_detached, Acquired, Attempt, Lease, LockName};
use lockkit_core::{Error, LostReason, Result};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::group::{Group, Signal};
use crate::lock::Inner;

/// The key names a client's keys have now, per lock and lease, so a client that takes the
/// same lock again reuses a name instead of creating a new key each time: etcd keeps a
/// deleted key in its index until the history is compacted, and every read of a lock's
/// queue (a range over its prefix) walks past the deleted keys, so new names would make
/// each acquisition of a busy lock slower than the one before.
///
/// A name is taken while its key may exist, and given back only once the key is known to be
/// gone (deleted by its lease's holder, found deleted); a name whose deletion failed stays
/// taken. A reused name's key is a new key: a new create revision (token and place in the
/// queue), a new version, and a deletion watchers of the old key saw.
#[derive(Debug, Default)]
pub(crate) struct KeyNames {
    /// The keys `<dir><n>/<lease>` taken, each the same string the lease and its group's
    /// books hold: nothing more per held lock than a place in this set.
    taken: std::sync::Mutex<HashSet<Arc<str>>>,
}

impl KeyNames {
    fn taken(&self) -> std::sync::MutexGuard<'_, HashSet<Arc<str>>> {
        // Never held across an await or a panic point.
        self.taken.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The key `<dir><n>/<lease>` with the lowest number `n` free, now taken.
    fn take(&self, dir: &str, lease: i64) -> Arc<str> {
        let mut taken = self.taken();
        let mut n: u64 = 0;
        loop {
            let key = format!("{dir}{n:x}/{:016x}", lease as u64);
            if !taken.contains(key.as_str()) {
                let key: Arc<str> = key.into();
                taken.insert(key.clone());
                return key;
            }
            n += 1;
        }
    }

    /// Gives `key` back: it is gone from etcd.
    fn give_back(&self, key: &str) {
        self.taken().remove(key);
    }
}

/// A key in a lock's queue and the lease it is bound to. While the key waits it belongs to
/// the waiting `lock` call; once it holds the lock it is the guard's [`Lease`].
///
/// Operations that send requests run to completion in a task of their own under the state's
/// mutex, so a caller that stops waiting (the keeper's deadline, a dropped future) never
/// leaves the state half-updated: a key re-bound to a lease that the state does not know of.
#[derive(Clone)]
pub(crate) struct EtcdLease {
    inner: Arc<Inner>,
    name: LockName,
    key: Arc<str>,
    signal: Arc<Signal>,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for EtcdLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLease")
            .field("name", &self.name)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

struct State {
    /// The lease the key is bound to.
    group: Arc<Group>,
    /// A lease the key is being moved to whose transaction's outcome is unknown (its reply
    /// was lost): settled by the next operation.
    pending: Option<Arc<Group>>,
    released: bool,
    /// The key's create revision (its fencing token) once created, else 0.
    revision: i64,
}

/// A lease as granted: id, asked TTL, granted TTL.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Granted {
    pub(crate) id: i64,
    pub(crate) asked: i64,
    pub(crate) granted: i64,
}

impl EtcdLease {
    /// A new key under `dir` on `group`'s lease, not created yet; `None` if that lease is
    /// gone.
    pub(crate) fn join(
        inner: Arc<Inner>,
        name: LockName,
        dir: &str,
        group: Arc<Group>,
    ) -> Option<Self> {
        // Shared with the key names' set and the lease's books in the group (one allocation
        // per held lock).
        let key = inner.names.take(dir, group.id);
        let signal = Arc::new(Signal::new());
        if !group.join(&key, &signal) {
            inner.names.give_back(&key);
            return None;
        }
        Some(EtcdLease {
            inner,
            name,
            key,
            signal,
            state: Arc::new(Mutex::new(State {
                group,
                pending: None,
                released: false,
                revision: 0,
            })),
        })
    }

    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    fn lost(&self) -> Error {
        Error::lost(self.name.as_str(), LostReason::NotOwner)
    }

    /// The lease the key is bound to now.
    pub(crate) async fn group(&self) -> Arc<Group> {
        self.state.lock().await.group.clone()
    }

    /// The key was created at `revision`: its lease's keeper checks from now on that it
    /// still exists.
    pub(crate) async fn created(&self, revision: i64) {
        let mut state = self.state.lock().await;
        state.revision = revision;
        state.group.confirm(&self.key);
    }

    /// Resolves when the lease's keeper finds the key or its lease gone.
    pub(crate) async fn gone(&self) -> LostReason {
        self.signal.wait().await
    }

    /// Until when the key's lease is valid, once at least half its TTL is left (after a
    /// renewal if needed); `None` if the lease is gone.
    pub(crate) async fn ready(&self) -> Result<Option<Instant>> {
        let this = self.clone();
        let ready = detached(async move {
            let group = this.group().await;
            let need = secs(group.granted) / 2;
            group.fresh(&this.inner, need).await
        });
        match ready.await {
            Ok(until) => Ok(Some(until)),
            Err(e) if e.is_lost() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One keep-alive round of a key's own lease (used while it waits).
    pub(crate) async fn keep_alive(&self) -> Result<Instant> {
        let this = self.clone();
        detached(async move {
            let group = this.group().await;
            group.keep_alive(&this.inner).await?;
            Ok(group.until())
        })
        .await
    }

    /// Deletes the key (and revokes its own lease): withdraws a key that lost a `try_lock`
    /// or whose wait was dropped. Retried a few times, since a key left behind would block
    /// the lock (a shared lease's keeper keeps trying after that).
    pub(crate) async fn withdraw(&self) -> Result<()> {
        match self.release_now().await {
            Err(e) if e.is_lost() => Ok(()),
            other => other,
        }
    }

    /// Extends to `asked` seconds. The state's mutex is held throughout.
    async fn extend_now(&self, asked: i64) -> Result<Instant> {
        let mut state = self.state.lock().await;
        if state.released {
            return Err(Error::lost(self.name.as_str(), LostReason::Released));
        }
        self.resolve_pending(&mut state).await?;
        if let Some(reason) = self.signal.reason() {
            return Err(Error::lost(self.name.as_str(), reason));
        }
        let group = state.group.clone();
        if asked != group.asked {
            return self.rebind(&mut state, asked).await;
        }
        if group.shared {
            // The lease's keeper renews it and checks the key.
            let need = secs(group.granted) / 2;
            return group.fresh(&self.inner, need).await.map_err(|e| {
                if e.is_lost() {
                    self.lost()
                } else {
                    e
                }
            });
        }
        // A key's own lease: one keep-alive round, and at the same time a check that the
        // key still exists bound to it.
        let (renewed, bound) = tokio::join!(
            group.keep_alive(&self.inner),
            self.inner.key_lease(&self.key)
        );
        match renewed {
            Err(e) if e.is_lost() => return Err(self.lost()),
            other => other?,
        }
        match bound? {
            Some(lease) if lease == group.id => Ok(group.until()),
            _ => Err(self.lost()),
        }
    }

    /// The lease for `asked` seconds of the same kind as the key's (shared or its own).
    async fn lease_for(&self, shared: bool, asked: i64) -> Result<Arc<Group>> {
        match shared {
            true => self.inner.shared_group(asked).await,
            false => self.inner.own_group(asked).await,
        }
    }

    /// Changes the TTL: etcd cannot change a lease's TTL, so the key is moved to a lease of
    /// `asked` seconds, in a transaction that only does so while the key is still bound to
    /// our lease. A key's own old lease is then revoked. The key keeps its create revision
    /// (the fencing token) and its place in the queue.
    async fn rebind(&self, state: &mut State, asked: i64) -> Result<Instant> {
        let old = state.group.clone();
        let mut target = None;
        for _ in 0..3 {
            let group = self.lease_for(old.shared, asked).await?;
            if group.join(&self.key, &self.signal) {
                target = Some(group);
                break;
            }
        }
        let Some(new) = target else {
            return Err(Error::connection(
                crate::error::BACKEND,
                "no lease to move the key to",
            ));
        };
        // The old lease's keeper must not take the key's move for a deletion.
        old.leave(&self.key);
        let txn = Txn::new()
            .when([Compare::lease(&*self.key, CompareOp::Equal, old.id)])
            .and_then([TxnOp::put(
                &*self.key,
                Vec::new(),
                Some(PutOptions::new().with_lease(new.id).with_ignore_value()),
            )]);
        match self.inner.txn(txn).await {
            Ok(answer) if answer.succeeded() => {
                new.confirm(&self.key);
                state.group = new.clone();
                if !old.shared {
                    self.inner.revoke_in_background(vec![old.id]);
                }
                Ok(new.until())
            }
            Ok(_) => {
                new.leave(&self.key);
                if !new.shared {
                    self.inner.revoke_in_background(vec![new.id]);
                }
                Err(self.lost())
            }
            Err(e) => {
                state.pending = Some(new);
                Err(e)
            }
        }
    }

    /// Settles a move whose outcome was unknown: keeps the key's books on the lease it is
    /// bound to, and revokes a key's own lease it is not bound to.
    async fn resolve_pending(&self, state: &mut State) -> Result<()> {
        let Some(pending) = state.pending.clone() else {
            return Ok(());
        };
        let bound = self.inner.key_lease(&self.key).await?;
        state.pending = None;
        let (kept, spare) = match bound == Some(pending.id) {
            true => (pending, state.group.clone()),
            false => (state.group.clone(), pending),
        };
        spare.leave(&self.key);
        if !spare.shared {
            self.inner.revoke_in_background(vec![spare.id]);
        }
        if bound == Some(kept.id) && kept.join(&self.key, &self.signal) {
            kept.confirm(&self.key);
        }
        state.group = kept;
        Ok(())
    }

    /// Stores `value` in the key, in one transaction that does so only while the key is the
    /// one this lease created (same create revision): a key deleted (released, expired,
    /// force-released) is not re-created. The put keeps the key's lease and create revision,
    /// so its token and place; waiters watch deletions only, so none wakes.
    async fn set_value_now(&self, value: &str) -> Result<()> {
        let state = self.state.lock().await;
        if state.released {
            return Err(Error::lost(self.name.as_str(), LostReason::Released));
        }
        if let Some(reason) = self.signal.reason() {
            return Err(Error::lost(self.name.as_str(), reason));
        }
        let stored = store_value(&self.name, value);
        let txn = Txn::new()
            .when([Compare::create_revision(
                &*self.key,
                CompareOp::Equal,
                state.revision,
            )])
            .and_then([TxnOp::put(
                &*self.key,
                stored,
                Some(PutOptions::new().with_ignore_lease()),
            )]);
        match self.inner.txn(txn).await?.succeeded() {
            true => Ok(()),
            false => Err(self.lost()),
        }
    }

    async fn release_now(&self) -> Result<()> {
        let mut state = self.state.lock().await;
        if state.released {
            return Ok(());
        }
        state.released = true;
        // Best effort: a pending lease the key might be bound to is dealt with below anyway.
        let settled = self.resolve_pending(&mut state).await.is_ok();
        let group = state.group.clone();
        group.leave(&self.key);
        let mut spare: Vec<Arc<Group>> = state.pending.take().into_iter().collect();
        spare.push(group.clone());
        let own: Vec<i64> = spare.iter().filter(|g| !g.shared).map(|g| g.id).collect();
        let mut last = Ok(false);
        for attempt in 0..3u32 {
            last = self.inner.delete_on(&self.key, group.id).await;
            match &last {
                Err(e) if e.is_retryable() => {
                    tokio::time::sleep(Duration::from_millis(20) * 4u32.pow(attempt)).await;
                }
                _ => break,
            }
        }
        match last {
            Ok(deleted) => {
                // The lock is free now; a key's own lease has no key left: revoking it is
                // tidying. The key is gone (or was never bound to any lease of ours but
                // this one): its name may serve again.
                if settled {
                    self.inner.names.give_back(&self.key);
                }
                self.inner.revoke_in_background(own);
                match deleted {
                    true => Ok(()),
                    false => Err(self.lost()),
                }
            }
            Err(e) if group.shared => {
                // The lease's keeper deletes the key; if it cannot reach etcd, it cannot
                // renew the lease either, which then runs out with the key.
                group.orphan(&self.key);
                Err(e)
            }
            Err(e) => {
                // Unknown whether the key was deleted: revoking its own lease deletes it.
                for id in own {
                    if let Err(revoke) = self.inner.revoke(id).await {
                        if !revoke.is_lost() {
                            return Err(e);
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

#[async_trait]
impl Lease for EtcdLease {
    /// On a shared lease whose TTL rounds to `ttl`: no request while its keeper keeps it
    /// renewed (until when it is confirmed valid, or the key or lease found gone). On a key's
    /// own lease: a keep-alive round. Another TTL moves the key to a lease of that TTL. See
    /// the crate docs.
    async fn extend(&self, ttl: Duration) -> Result<Instant> {
        let asked = ttl_secs(ttl);
        // The common case without a task of its own: nothing to cancel half-way.
        if let Ok(state) = self.state.try_lock() {
            let group = &state.group;
            let quiet =
                !state.released && state.pending.is_none() && self.signal.reason().is_none();
            if quiet && group.shared && group.asked == asked && !group.is_lost() {
                let until = group.until();
                if until >= Instant::now() + secs(group.granted) / 2 {
                    return Ok(until);
                }
            }
        }
        let this = self.clone();
        detached(async move { this.extend_now(asked).await }).await
    }

    async fn release(&self) -> Result<()> {
        let this = self.clone();
        detached(async move { this.release_now().await }).await
    }

    async fn lost(&self) -> LostReason {
        self.signal.wait().await
    }

    /// One transaction: the value goes into the key itself while it is still ours. See the
    /// crate docs ("Leader values").
    async fn set_value(&self, value: &str) -> Result<()> {
        let (this, value) = (self.clone(), value.to_string());
        detached(async move { this.set_value_now(&value).await }).await
    }
}

/// What a lock key holds: the lock's name, then, once the holder stored a value, a NUL and
/// the value (a name has no NUL).
pub(crate) fn store_value(name: &LockName, value: &str) -> Vec<u8> {
    let mut stored = Vec::with_capacity(name.as_str().len() + 1 + value.len());
    stored.extend_from_slice(name.as_str().as_bytes());
    stored.push(0);
    stored.extend_from_slice(value.as_bytes());
    stored
}

/// The value stored in a lock key by [`store_value`], if any.
pub(crate) fn stored_value(key_value: &[u8]) -> Option<String> {
    let at = key_value.iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&key_value[at + 1..]).into_owned())
}

/// A lease operation's result. It holds no lock of its own: if the caller stops waiting,
/// there is nothing to release.
struct Done<T>(T);

impl<T: Send + 'static> Attempt for Done<T> {
    fn into_acquired(self) -> Option<Acquired> {
        None
    }
}

/// Runs `work` in a task of its own, so it completes even if the caller stops waiting.
async fn detached<T: Send + 'static>(
    work: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    Ok(run_detached(async move { work.await.map(Done) }).await?.0)
}

/// A TTL in whole seconds, rounded up: a lease is never shorter than asked.
pub(crate) fn ttl_secs(ttl: Duration) -> i64 {
    ttl.as_nanos()
        .div_ceil(1_000_000_000)
        .clamp(1, i64::MAX as u128) as i64
}

pub(crate) fn secs(ttl: i64) -> Duration {
    Duration::from_secs(ttl.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::KeyNames;

    #[test]
    fn key_names_take_the_lowest_free_number_and_reuse_given_back_ones() {
        let names = KeyNames::default();
        let first = names.take("p/a/", 0x1f);
        assert_eq!(&*first, "p/a/0/000000000000001f");
        let second = names.take("p/a/", 0x1f);
        assert_eq!(&*second, "p/a/1/000000000000001f");
        // Another lease or another lock starts at 0 again.
        assert_eq!(&*names.take("p/a/", 0x20), "p/a/0/0000000000000020");
        assert_eq!(&*names.take("p/a/0/", 0x1f), "p/a/0/0/000000000000001f");
        names.give_back(&first);
        assert_eq!(names.take("p/a/", 0x1f), first);
        assert_eq!(&*names.take("p/a/", 0x1f), "p/a/2/000000000000001f");
    }
}
