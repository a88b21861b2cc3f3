//! One lock key and the etcd lease it is bound to: keep-alive rounds, TTL changes, release.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp};
use lockkit_core::backend::{run_detached, Acquired, Attempt, Lease, LockName};
use lockkit_core::{Error, LostReason, Result};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::error::{lease_not_found, map_err, BACKEND};
use crate::lock::Inner;

/// A key in a lock's queue and its lease. While the key waits it is kept alive by the waiting
/// `lock` call; once it holds the lock it is the guard's [`Lease`].
///
/// Every operation runs to completion in a task of its own under the state's mutex, so a
/// caller that stops waiting (the keeper's deadline, a dropped future) never leaves the state
/// half-updated: a keep-alive answer left unread on the stream, or a key re-bound to a new
/// lease that the state does not know of.
#[derive(Clone)]
pub(crate) struct EtcdLease {
    inner: Arc<Inner>,
    name: LockName,
    key: String,
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
    id: i64,
    /// The TTL asked for it, in whole seconds.
    asked: i64,
    /// The TTL etcd granted (at least etcd's minimum, so possibly above `asked`).
    granted: i64,
    /// The keep-alive stream of `id`, opened by the first keep-alive round.
    keep_alive: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// A lease granted to re-bind the key whose transaction's outcome is unknown (its reply
    /// was lost): resolved by the next operation.
    pending: Option<Granted>,
    released: bool,
}

/// A lease as granted: id, asked TTL, granted TTL.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Granted {
    pub(crate) id: i64,
    pub(crate) asked: i64,
    pub(crate) granted: i64,
}

impl EtcdLease {
    pub(crate) fn new(
        inner: Arc<Inner>,
        name: LockName,
        key: String,
        id: i64,
        asked: i64,
        granted: i64,
    ) -> Self {
        EtcdLease {
            inner,
            name,
            key,
            state: Arc::new(Mutex::new(State {
                id,
                asked,
                granted,
                keep_alive: None,
                pending: None,
                released: false,
            })),
        }
    }

    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    fn lost(&self) -> Error {
        Error::lost(self.name.as_str(), LostReason::NotOwner)
    }

    /// The lease the key is bound to now.
    pub(crate) async fn id(&self) -> i64 {
        self.state.lock().await.id
    }

    /// One keep-alive round at the lease's current TTL (used while the key waits).
    pub(crate) async fn keep_alive(&self) -> Result<Instant> {
        let this = self.clone();
        detached(async move { this.extend_now(None).await }).await
    }

    /// Revokes the lease, which deletes the key if it still exists: withdraws a key that
    /// lost a `try_lock`. Retried a few times, since a key left behind would block the lock
    /// until the lease runs out.
    pub(crate) async fn withdraw(&self) -> Result<()> {
        let mut state = self.state.lock().await;
        state.released = true;
        state.keep_alive = None;
        let mut last = Ok(());
        for attempt in 0..3u32 {
            last = self.inner.revoke(state.id).await;
            match &last {
                Err(e) if e.is_retryable() => {
                    tokio::time::sleep(Duration::from_millis(20) * 4u32.pow(attempt)).await;
                }
                _ => break,
            }
        }
        match last {
            Err(e) if e.is_lost() => Ok(()),
            other => other,
        }
    }

    /// Extends to `asked` seconds (`None`: the current TTL). The state's mutex is held
    /// throughout.
    async fn extend_now(&self, asked: Option<i64>) -> Result<Instant> {
        let mut state = self.state.lock().await;
        if state.released {
            return Err(Error::lost(self.name.as_str(), LostReason::Released));
        }
        self.resolve_pending(&mut state).await?;
        match asked {
            Some(asked) if asked != state.asked => self.rebind(&mut state, asked).await,
            _ => self.keep_alive_round(&mut state).await,
        }
    }

    /// One keep-alive round: renews the lease and, at the same time, checks that the key
    /// still exists bound to it (it may have been deleted from outside). Valid from when
    /// the round started for the TTL etcd answered.
    async fn keep_alive_round(&self, state: &mut State) -> Result<Instant> {
        let started = Instant::now();
        let (id, granted) = (state.id, state.granted);
        let (renewed, bound) = tokio::join!(
            self.renew(&mut state.keep_alive, id, granted),
            self.inner.key_lease(&self.key)
        );
        let ttl = renewed?;
        match bound? {
            Some(lease) if lease == id => Ok(started + secs(ttl)),
            _ => Err(self.lost()),
        }
    }

    /// Sends one keep-alive request on the lease's stream and reads its answer; opens the
    /// stream if there is none, or if the one there failed (a broken connection, a
    /// restarted server). Returns the TTL etcd answered.
    async fn renew(
        &self,
        slot: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
        id: i64,
        granted: i64,
    ) -> Result<i64> {
        let timeout = self.inner.options.request_timeout;
        if let Some((mut keeper, mut stream)) = slot.take() {
            let round = async {
                keeper.keep_alive().await?;
                stream.message().await
            };
            match tokio::time::timeout(timeout, round).await {
                Ok(Ok(Some(answer))) if answer.ttl() <= 0 => return Err(self.lost()),
                Ok(Ok(Some(answer))) => {
                    *slot = Some((keeper, stream));
                    return Ok(answer.ttl());
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
            let mut client = self.inner.client.lease_client();
            async move { client.keep_alive(id).await }
        };
        match self.inner.within("lease keep-alive", timeout, open).await? {
            Ok(opened) => {
                *slot = Some(opened);
                // etcd renews a lease to its full granted TTL.
                Ok(granted)
            }
            Err(e) if lease_not_found(&e) => Err(self.lost()),
            Err(e) => Err(map_err(e)),
        }
    }

    /// Changes the TTL: etcd cannot change a lease's TTL, so the key is re-bound to a new
    /// lease of `asked` seconds, in a transaction that only does so while the key is still
    /// bound to our lease; the old lease is then revoked. The key keeps its create revision
    /// (the fencing token) and its place in the queue.
    async fn rebind(&self, state: &mut State, asked: i64) -> Result<Instant> {
        let started = Instant::now();
        let new = self.inner.grant(asked).await?;
        let txn = Txn::new()
            .when([Compare::lease(
                self.key.as_str(),
                CompareOp::Equal,
                state.id,
            )])
            .and_then([TxnOp::put(
                self.key.as_str(),
                Vec::new(),
                Some(PutOptions::new().with_lease(new.id).with_ignore_value()),
            )]);
        match self.inner.txn(txn).await {
            Ok(answer) if answer.succeeded() => {
                let old = state.id;
                adopt(state, new);
                self.inner.revoke_in_background(vec![old]);
                Ok(started + secs(new.granted))
            }
            Ok(_) => {
                self.inner.revoke_in_background(vec![new.id]);
                Err(self.lost())
            }
            Err(e) => {
                state.pending = Some(new);
                Err(e)
            }
        }
    }

    /// Settles a re-bind whose outcome was unknown: adopts the new lease if the key is bound
    /// to it, else revokes it.
    async fn resolve_pending(&self, state: &mut State) -> Result<()> {
        let Some(pending) = state.pending else {
            return Ok(());
        };
        let bound = self.inner.key_lease(&self.key).await?;
        state.pending = None;
        if bound == Some(pending.id) {
            let old = state.id;
            adopt(state, pending);
            self.inner.revoke_in_background(vec![old]);
        } else {
            self.inner.revoke_in_background(vec![pending.id]);
        }
        Ok(())
    }

    async fn release_now(&self) -> Result<()> {
        let mut state = self.state.lock().await;
        if state.released {
            return Ok(());
        }
        state.released = true;
        state.keep_alive = None;
        // Best effort: a pending lease the key might be bound to is revoked below anyway.
        let _ = self.resolve_pending(&mut state).await;
        let mut leases = vec![state.id];
        leases.extend(state.pending.take().map(|p| p.id));
        let txn = Txn::new()
            .when([Compare::lease(
                self.key.as_str(),
                CompareOp::Equal,
                state.id,
            )])
            .and_then([TxnOp::delete(self.key.as_str(), None)]);
        match self.inner.txn(txn).await {
            Ok(answer) => {
                // The lock is free now; the lease has no key left, revoking it is tidying.
                self.inner.revoke_in_background(leases);
                if answer.succeeded() {
                    Ok(())
                } else {
                    Err(self.lost())
                }
            }
            Err(e) => {
                // Unknown whether the key was deleted: revoking the lease deletes it if not.
                let mut result = Ok(());
                for id in leases {
                    if let Err(revoke) = self.inner.revoke(id).await {
                        if !revoke.is_lost() {
                            result = Err(e);
                            break;
                        }
                    }
                }
                result
            }
        }
    }
}

fn adopt(state: &mut State, lease: Granted) {
    state.id = lease.id;
    state.asked = lease.asked;
    state.granted = lease.granted;
    // The stream keeps the old lease alive: closing it lets that lease go.
    state.keep_alive = None;
}

#[async_trait]
impl Lease for EtcdLease {
    /// A keep-alive round when `ttl` rounds up to the lease's TTL in whole seconds, else a
    /// re-bind of the key to a new lease of that TTL. See the crate docs.
    async fn extend(&self, ttl: Duration) -> Result<Instant> {
        let this = self.clone();
        let asked = ttl_secs(ttl);
        detached(async move { this.extend_now(Some(asked)).await }).await
    }

    async fn release(&self) -> Result<()> {
        let this = self.clone();
        detached(async move { this.release_now().await }).await
    }
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
