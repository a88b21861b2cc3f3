//! The etcd leases a client's keys are bound to. Guards that renew share one lease per TTL
//! (whole seconds) with one keeper task and one keep-alive stream, the way etcd's own
//! `concurrency.Session` does; a guard with renewal off gets a lease of its own, renewed only
//! when it asks, so it runs out at its TTL whatever the other guards do.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, LeaseTimeToLiveOptions, Txn, TxnOp,
};
use lockkit_core::backend::LossSignal;
use lockkit_core::{Error, LostReason, Result};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::error::{lease_not_found, map_err, BACKEND};
use crate::lease::secs;
use crate::lock::Inner;

/// How long a shared lease with no key on it is kept (renewed) for the next acquisition
/// before it is revoked: at least this, and at least its TTL.
const LINGER: Duration = Duration::from_secs(5);

/// One key's loss signal, set by its lease's keeper.
pub(crate) type Signal = LossSignal;

/// An etcd lease and the keys bound to it.
pub(crate) struct Group {
    /// The TTL asked for it, in whole seconds.
    pub(crate) asked: i64,
    pub(crate) id: i64,
    /// The TTL etcd granted (at least etcd's minimum, so possibly above `asked`).
    pub(crate) granted: i64,
    /// Shared by the client's renewing guards of this TTL and kept alive by a keeper task;
    /// else one key's own lease, renewed only by that key's `extend`.
    pub(crate) shared: bool,
    state: Mutex<GroupState>,
    /// The keep-alive stream, opened by the first round and reopened after an error.
    stream: tokio::sync::Mutex<Option<(LeaseKeeper, LeaseKeepAliveStream)>>,
    /// Asks the keeper for a round now.
    kick: Notify,
    /// Counts the keeper's rounds, so a caller can wait for the next one's outcome.
    rounds: watch::Sender<u64>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("id", &format_args!("{:x}", self.id))
            .field("granted", &self.granted)
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

struct GroupState {
    /// Until when the lease is known valid: from before the last grant or keep-alive that
    /// etcd answered, for the TTL it answered.
    until: Instant,
    /// The lease is gone (expired, revoked) or retired: no key may join it any more.
    lost: bool,
    /// The keys on the lease, each with its loss signal and since when it is certainly
    /// there (`None` while the request creating or moving it is in flight).
    members: HashMap<Arc<str>, Member>,
    /// Keys whose deletion failed: the keeper deletes them.
    orphans: Vec<String>,
    /// The last round's error, if it failed.
    error: Option<String>,
    /// Since when no key is on the lease.
    empty_since: Instant,
}

struct Member {
    since: Option<Instant>,
    signal: Weak<Signal>,
}

impl Group {
    fn new(granted: &crate::lease::Granted, started: Instant, shared: bool) -> Arc<Group> {
        Arc::new(Group {
            asked: granted.asked,
            id: granted.id,
            granted: granted.granted,
            shared,
            state: Mutex::new(GroupState {
                until: started + secs(granted.granted),
                lost: false,
                members: HashMap::new(),
                orphans: Vec::new(),
                error: None,
                empty_since: started,
            }),
            stream: tokio::sync::Mutex::new(None),
            kick: Notify::new(),
            rounds: watch::channel(0).0,
        })
    }

    fn state(&self) -> MutexGuard<'_, GroupState> {
        // Never held across an await or a panic point.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn until(&self) -> Instant {
        self.state().until
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.state().lost
    }

    /// Puts `key` on the lease (not yet checked for); `false` if the lease is gone.
    pub(crate) fn join(&self, key: &Arc<str>, signal: &Arc<Signal>) -> bool {
        let mut state = self.state();
        if state.lost {
            return false;
        }
        let member = Member {
            since: None,
            signal: Arc::downgrade(signal),
        };
        state.members.insert(key.clone(), member);
        true
    }

    /// `key` is certainly on the lease from now on: later rounds check that it still is.
    pub(crate) fn confirm(&self, key: &str) {
        if let Some(member) = self.state().members.get_mut(key) {
            member.since = Some(Instant::now());
        }
    }

    /// Takes `key` off the lease's books.
    pub(crate) fn leave(&self, key: &str) {
        let mut state = self.state();
        if state.members.remove(key).is_some() && state.members.is_empty() {
            state.empty_since = Instant::now();
        }
    }

    /// Leaves `key` to the keeper to delete (its deletion failed).
    pub(crate) fn orphan(&self, key: &str) {
        self.state().orphans.push(key.to_string());
        self.kick.notify_one();
    }

    /// Marks the lease gone and every key on it lost.
    fn mark_lost(&self) {
        let mut state = self.state();
        state.lost = true;
        for member in state.members.values() {
            if let Some(signal) = member.signal.upgrade() {
                signal.mark(LostReason::NotOwner);
            }
        }
    }

    fn lost_error(&self) -> Error {
        Error::lost(format!("lease {:x}", self.id), LostReason::NotOwner)
    }

    /// Until when the lease is valid, once that is at least `need` from now: at once if the
    /// last renewal covers it, else after a renewal (the keeper's next round for a shared
    /// lease, one keep-alive here for a key's own lease).
    pub(crate) async fn fresh(&self, inner: &Inner, need: Duration) -> Result<Instant> {
        let round = {
            let state = self.state();
            if state.lost {
                return Err(self.lost_error());
            }
            if state.until >= Instant::now() + need {
                return Ok(state.until);
            }
            *self.rounds.borrow()
        };
        if !self.shared {
            self.keep_alive(inner).await?;
            return Ok(self.until());
        }
        let mut rounds = self.rounds.subscribe();
        self.kick.notify_one();
        let limit = inner.options.request_timeout + Duration::from_millis(100);
        let next = tokio::time::timeout(limit, async {
            rounds.wait_for(|r| *r > round).await.map(|_| ())
        })
        .await;
        let state = self.state();
        if state.lost {
            return Err(self.lost_error());
        }
        match (next, &state.error) {
            (Ok(Ok(_)), None) => Ok(state.until),
            (_, Some(error)) => Err(Error::connection(BACKEND, error.clone())),
            _ => Err(Error::connection(
                BACKEND,
                format!("lease keep-alive: no answer within {limit:?}"),
            )),
        }
    }

    /// One keep-alive round: sends a keep-alive on the lease's stream and reads the answer,
    /// opening the stream if there is none or the one there failed (a broken connection, a
    /// restarted server). A lease etcd no longer knows marks every key on it lost.
    pub(crate) async fn keep_alive(&self, inner: &Inner) -> Result<()> {
        let started = Instant::now();
        let mut slot = self.stream.lock().await;
        let result = renew(inner, &mut slot, self.id, self.granted).await;
        drop(slot);
        let mut state = self.state();
        match result {
            Ok(Some(ttl)) => {
                state.until = state.until.max(started + secs(ttl));
                state.error = None;
                Ok(())
            }
            Ok(None) => {
                drop(state);
                self.mark_lost();
                Err(self.lost_error())
            }
            Err(e) => {
                state.error = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Checks that every key known to be on the lease still is (one request listing the
    /// lease's keys); a key deleted from outside is marked lost.
    async fn check_keys(&self, inner: &Inner) -> Result<()> {
        let started = Instant::now();
        let ask = || {
            let mut client = inner.client.lease_client();
            let id = self.id;
            async move {
                client
                    .time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
                    .await
            }
        };
        let answer = inner.call("lease time-to-live", ask).await?;
        if answer.ttl() <= 0 {
            self.mark_lost();
            return Err(self.lost_error());
        }
        let keys: HashSet<&[u8]> = answer.keys().iter().map(Vec::as_slice).collect();
        let state = self.state();
        for (key, member) in &state.members {
            let checkable = member.since.is_some_and(|since| since < started);
            if checkable && !keys.contains(key.as_bytes()) {
                if let Some(signal) = member.signal.upgrade() {
                    signal.mark(LostReason::NotOwner);
                }
            }
        }
        Ok(())
    }

    /// Deletes the keys whose deletion failed, if still on this lease.
    async fn delete_orphans(&self, inner: &Inner) {
        let orphans = std::mem::take(&mut self.state().orphans);
        for key in orphans {
            if let Err(e) = inner.delete_on(&key, self.id).await {
                tracing::debug!(key, error = %e, "deleting a released key failed, retrying");
                self.state().orphans.push(key);
            }
        }
    }
}

/// Sends one keep-alive request on `slot`'s stream and reads its answer (opening the stream
/// if needed): the TTL etcd answered, `None` if the lease is gone.
async fn renew(
    inner: &Inner,
    slot: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    id: i64,
    granted: i64,
) -> Result<Option<i64>> {
    let timeout = inner.options.request_timeout;
    if let Some((mut keeper, mut stream)) = slot.take() {
        let round = async {
            keeper.keep_alive().await?;
            stream.message().await
        };
        match tokio::time::timeout(timeout, round).await {
            Ok(Ok(Some(answer))) if answer.ttl() <= 0 => return Ok(None),
            Ok(Ok(Some(answer))) => {
                *slot = Some((keeper, stream));
                return Ok(Some(answer.ttl()));
            }
            Ok(Ok(None)) => tracing::debug!(lease = id, "keep-alive stream closed, reopening"),
            Ok(Err(e)) => {
                tracing::debug!(lease = id, error = %e, "keep-alive stream failed, reopening")
            }
            Err(_) => {
                // The stream is dropped: the next round opens a new one.
                return Err(Error::connection(
                    BACKEND,
                    format!("lease keep-alive: no answer within {timeout:?}"),
                ));
            }
        }
    }
    // Opening the stream sends the first keep-alive and reads its answer.
    let open = || {
        let mut client = inner.client.lease_client();
        async move { client.keep_alive(id).await }
    };
    match inner.within("lease keep-alive", timeout, open).await? {
        Ok(opened) => {
            *slot = Some(opened);
            // etcd renews a lease to its full granted TTL.
            Ok(Some(granted))
        }
        Err(e) if lease_not_found(&e) => Ok(None),
        Err(e) => Err(map_err(e)),
    }
}

/// The client's shared leases, one per TTL in whole seconds.
#[derive(Debug, Default)]
pub(crate) struct Groups {
    shared: Mutex<HashMap<i64, Arc<Group>>>,
    /// Held while a shared lease is granted, so concurrent first acquisitions share one.
    creating: tokio::sync::Mutex<()>,
}

impl Groups {
    fn map(&self) -> MutexGuard<'_, HashMap<i64, Arc<Group>>> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live(&self, asked: i64) -> Option<Arc<Group>> {
        self.map().get(&asked).filter(|g| !g.is_lost()).cloned()
    }
}

impl Inner {
    /// The shared lease of `asked` seconds, granted (and its keeper started) if there is none.
    pub(crate) async fn shared_group(self: &Arc<Self>, asked: i64) -> Result<Arc<Group>> {
        if let Some(group) = self.groups.live(asked) {
            return Ok(group);
        }
        let _one = self.groups.creating.lock().await;
        if let Some(group) = self.groups.live(asked) {
            return Ok(group);
        }
        let started = Instant::now();
        let granted = self.grant(asked).await?;
        let group = Group::new(&granted, started, true);
        self.groups.map().insert(asked, group.clone());
        tracing::debug!(
            lease = granted.id,
            ttl = granted.granted,
            "shared lease granted"
        );
        tokio::spawn(keep(group.clone(), Arc::downgrade(self)));
        Ok(group)
    }

    /// A lease of `asked` seconds for one key alone.
    pub(crate) async fn own_group(&self, asked: i64) -> Result<Arc<Group>> {
        let started = Instant::now();
        let granted = self.grant(asked).await?;
        Ok(Group::new(&granted, started, false))
    }

    /// Deletes `key` if it is bound to `lease`: whether it was.
    pub(crate) async fn delete_on(&self, key: &str, lease: i64) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::lease(key, CompareOp::Equal, lease)])
            .and_then([TxnOp::delete(key, None)]);
        Ok(self.txn(txn).await?.succeeded())
    }
}

/// The keeper of a shared lease: renews it every third of its TTL (sooner after a failure,
/// or when asked), checks its keys, deletes orphans, and revokes the lease once it has been
/// unused for a while. Ends when the lease is gone or the client is dropped (the lease then
/// runs out by itself).
async fn keep(group: Arc<Group>, inner: Weak<Inner>) {
    let every = secs(group.granted) / 3;
    let linger = LINGER.max(secs(group.granted));
    let mut next = Instant::now() + every;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = group.kick.notified() => {}
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if retire(&group, &inner, linger) {
            let id = group.id;
            inner.revoke_in_background(vec![id]);
            tracing::debug!(lease = id, "unused shared lease revoked");
            return;
        }
        let started = Instant::now();
        let renewed = group.keep_alive(&inner).await;
        let checked = match renewed {
            Ok(()) if !group.state().members.is_empty() => group.check_keys(&inner).await,
            _ => Ok(()),
        };
        if let Err(e) = &checked {
            if !e.is_lost() {
                tracing::debug!(lease = group.id, error = %e, "checking a lease's keys");
            }
        }
        group.delete_orphans(&inner).await;
        group.rounds.send_modify(|r| *r += 1);
        if group.is_lost() {
            let mut map = inner.groups.map();
            if map
                .get(&group.asked)
                .is_some_and(|g| Arc::ptr_eq(g, &group))
            {
                map.remove(&group.asked);
            }
            tracing::debug!(lease = group.id, "shared lease lost");
            return;
        }
        next = match renewed {
            Ok(()) => started + every,
            Err(e) => {
                let now = Instant::now();
                let left = group.until().saturating_duration_since(now);
                let retry = (left / 4).clamp(Duration::from_millis(50), every);
                tracing::warn!(lease = group.id, error = %e, ?retry, "shared lease renewal failed");
                now + retry
            }
        };
    }
}

/// Retires the lease if no key has been on it for `linger`: takes it out of the client's
/// map and marks it gone, so no key joins it any more.
fn retire(group: &Group, inner: &Inner, linger: Duration) -> bool {
    let mut map = inner.groups.map();
    let mut state = group.state();
    let idle = state.members.is_empty()
        && state.orphans.is_empty()
        && state.empty_since.elapsed() >= linger;
    if !idle {
        return false;
    }
    state.lost = true;
    if map
        .get(&group.asked)
        .is_some_and(|g| std::ptr::eq(&**g, group))
    {
        map.remove(&group.asked);
    }
    true
}
