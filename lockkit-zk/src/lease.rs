//! A held ZooKeeper lock: our node, owned by a shared session whose heartbeats are the
//! renewal. A leader's value is the node's data (see [`Lease::set_value`] below).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use lockkit_core::backend::{Lease, LockName};
use lockkit_core::{Error, LostReason, Result};
use tokio::time::Instant;
use zookeeper_client as zk;

use crate::error::{in_transit, map_err, BACKEND};
use crate::lock::Node;
use crate::session::{Checked, Health, Orphan};

/// A held lock: our node, owned by a shared session.
#[derive(Debug)]
pub(crate) struct ZkLease {
    pub(crate) name: LockName,
    pub(crate) node: Node,
    /// Set once a release that failed on a connection problem was handed to the session,
    /// which deletes the node when it is connected again.
    pub(crate) handed_over: AtomicBool,
}

/// A released (or dropped) lease's node is no longer checked by its session.
impl Drop for ZkLease {
    fn drop(&mut self) {
        self.node.session.unhold(&self.node.path);
    }
}

impl ZkLease {
    fn lost(&self, reason: LostReason) -> Error {
        Error::lost(self.name.as_str(), reason)
    }
}

#[async_trait]
impl Lease for ZkLease {
    /// Checks that the session is connected and our node still exists; the session's own
    /// heartbeats are the renewal. Valid for `ttl`, and at most the negotiated session
    /// timeout, from when the check was sent.
    async fn extend(&self, ttl: Duration) -> Result<Instant> {
        let started = Instant::now();
        let session = &self.node.session;
        match session.health() {
            Health::Lost(why) => return Err(self.lost(LostReason::SessionLost(why))),
            Health::Suspended => {
                return Err(Error::connection(
                    BACKEND,
                    "disconnected from the ensemble; waiting for the session to reconnect",
                ))
            }
            Health::Connected => {}
        }
        // The session's own recent check of all its nodes answers without a request.
        let span = ttl.min(session.timeout);
        match session.checked(&self.node.path, span) {
            Some(Checked::Since(sent)) => return Ok(sent + span),
            Some(Checked::Gone) => return Err(self.lost(LostReason::NotOwner)),
            None => {}
        }
        match session
            .request(session.client.check_stat(&self.node.path))
            .await
        {
            Ok(Some(stat))
                if stat.czxid == self.node.czxid
                    && stat.ephemeral_owner == session.client.session_id().0 =>
            {
                Ok(session.valid_until(started, ttl))
            }
            Ok(_) => Err(self.lost(LostReason::NotOwner)),
            Err(zk::Error::SessionExpired) => Err(self.lost(LostReason::SessionLost(
                "the ZooKeeper session expired".into(),
            ))),
            Err(e) => Err(map_err(e)),
        }
    }

    /// Deletes our node (any version: [`Lease::set_value`] writes it; its path, unique to
    /// this acquisition, is the check). If the request fails on a connection problem, the
    /// session deletes the node once connected again (the error is still returned, so the
    /// keeper may retry).
    async fn release(&self) -> Result<()> {
        let session = &self.node.session;
        let path = &self.node.path;
        match session.request(session.client.delete(path, None)).await {
            Ok(()) => Ok(()),
            // Deleted by the session since a failed attempt handed it over.
            Err(zk::Error::NoNode) if self.handed_over.load(Ordering::SeqCst) => Ok(()),
            Err(zk::Error::NoNode | zk::Error::BadVersion) => Err(self.lost(LostReason::NotOwner)),
            Err(e) if in_transit(&e) => {
                self.handed_over.store(true, Ordering::SeqCst);
                session.orphan(Orphan::Node(path.clone()));
                Err(map_err(e))
            }
            Err(zk::Error::SessionExpired | zk::Error::ClientClosed) => Err(self.lost(
                LostReason::SessionLost("the ZooKeeper session expired".into()),
            )),
            Err(e) => Err(map_err(e)),
        }
    }

    /// One `setData` on our node (any version: only this lease writes it). A node that is
    /// gone (released, force-released, its session expired) is not re-created: `NoNode` is
    /// `LockLost`. The answer's stat confirms the node is still the one we created, owned by
    /// our session. See the crate docs ("Leader values").
    async fn set_value(&self, value: &str) -> Result<()> {
        let session = &self.node.session;
        if let Health::Lost(why) = session.health() {
            return Err(self.lost(LostReason::SessionLost(why)));
        }
        let write = session
            .client
            .set_data(&self.node.path, value.as_bytes(), None);
        match session.request(write).await {
            Ok(stat)
                if stat.czxid == self.node.czxid
                    && stat.ephemeral_owner == session.client.session_id().0 =>
            {
                Ok(())
            }
            Ok(_) | Err(zk::Error::NoNode) => Err(self.lost(LostReason::NotOwner)),
            Err(zk::Error::SessionExpired | zk::Error::ClientClosed) => Err(self.lost(
                LostReason::SessionLost("the ZooKeeper session expired".into()),
            )),
            Err(e) => Err(map_err(e)),
        }
    }

    /// Resolves when the session is lost: at once when it expires or is closed, or after it
    /// stayed disconnected for the session timeout (see [`Session`]).
    async fn lost(&self) -> LostReason {
        LostReason::SessionLost(self.node.session.lost().await)
    }

    /// The negotiated session timeout: no check makes the lease valid for longer, whatever
    /// TTL it asks, so the keeper renews within it until the holder's TTL (say, after an
    /// `extend` past the session timeout) is covered, also with automatic renewal off.
    fn fixed_ttl(&self) -> Option<Duration> {
        Some(self.node.session.timeout)
    }
}
