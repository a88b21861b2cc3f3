//! Extending and releasing: a session lock on its held connection, or a lease row.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lockkit_core::backend::{Cleanup, Lease, LockName};
use lockkit_core::{Error, LostReason, Result};
use sqlx::pool::PoolConnection;
use tokio::time::Instant;

use crate::advisory::statements;
use crate::dialect::{Bind, Db, Dialect, Key, On};
use crate::error;
use crate::lock::Shared;
use crate::wait::lease_end;

/// A lock held by the session of `conn` (the advisory strategy).
#[derive(Debug)]
pub(crate) struct SessionLease<D: Dialect> {
    lock: Arc<Shared<D>>,
    name: LockName,
    key: Key,
    /// `None` once released or found dead.
    conn: tokio::sync::Mutex<Option<PoolConnection<D::Db>>>,
}

impl<D: Dialect> SessionLease<D> {
    pub(crate) fn new(
        lock: Arc<Shared<D>>,
        name: LockName,
        key: Key,
        conn: PoolConnection<D::Db>,
    ) -> Self {
        SessionLease {
            lock,
            name,
            key,
            conn: tokio::sync::Mutex::new(Some(conn)),
        }
    }

    fn not_owner(&self) -> Error {
        Error::lost(self.name.as_str(), LostReason::NotOwner)
    }

    /// The session, and the lock with it, is gone (or unusable: it is closed).
    fn gone(&self, mut conn: PoolConnection<D::Db>, e: sqlx::Error) -> Error {
        conn.close_on_drop();
        let e = error::map::<D>(e);
        Error::lost(self.name.as_str(), LostReason::SessionLost(e.to_string()))
    }
}

#[async_trait]
impl<D: Dialect> Lease for SessionLease<D> {
    /// Re-arms the session for `ttl` (the server ends it once silent that long), then checks
    /// it still holds the lock. A session the server ended is found here: the lock is lost
    /// no later than the first renewal after it ended.
    async fn extend(&self, ttl: Duration) -> Result<Instant> {
        let started = Instant::now();
        let mut slot = self.conn.lock().await;
        let conn = slot.as_mut().ok_or_else(|| self.not_owner())?;
        let bind = Bind::new(&self.name).key(&self.key, None).ttl(ttl);
        let sql = statements(&self.lock);
        let mut held = None;
        for step in [&sql.arm, &sql.held] {
            match D::Db::run(On::Conn(&mut **conn), step, &bind).await {
                Ok(got) => held = got,
                Err(e) => return Err(self.gone(slot.take().expect("checked above"), e)),
            }
        }
        match held {
            Some(1) => Ok(lease_end(started, ttl)),
            _ => Err(self.not_owner()),
        }
    }

    async fn release(&self) -> Result<()> {
        let mut conn = self
            .conn
            .lock()
            .await
            .take()
            .ok_or_else(|| self.not_owner())?;
        let bind = Bind::new(&self.name).key(&self.key, None);
        let sql = statements(&self.lock);
        match D::Db::run(On::Conn(&mut *conn), &sql.unlock, &bind).await {
            // Back to the pool, disarmed (or closed).
            Ok(Some(1)) => {
                if let Err(e) = D::Db::run(On::Conn(&mut *conn), &sql.disarm, &bind).await {
                    tracing::debug!(error = %e, "closing a session that could not be disarmed");
                    conn.close_on_drop();
                }
                Ok(())
            }
            Ok(_) => {
                conn.close_on_drop();
                Err(self.not_owner())
            }
            Err(e) => Err(self.gone(conn, e)),
        }
    }
}

impl<D: Dialect> Drop for SessionLease<D> {
    fn drop(&mut self) {
        // Not released: the session may still hold the lock, and is armed. Close it.
        if let Some(conn) = self.conn.get_mut().as_mut() {
            conn.close_on_drop();
        }
    }
}

/// A lease row (the lease-table strategy).
#[derive(Debug)]
pub(crate) struct TableLease<D: Dialect> {
    lock: Arc<Shared<D>>,
    name: LockName,
    owner: String,
}

impl<D: Dialect> TableLease<D> {
    pub(crate) fn new(lock: Arc<Shared<D>>, name: LockName, owner: String) -> Self {
        TableLease { lock, name, owner }
    }

    /// Runs a statement on our row; one that lost a race (an InnoDB deadlock against an
    /// acquiring transaction, which holds the row until its token is taken) changed nothing
    /// and runs again, with a jittered pause of at most 25 ms, for up to about a second.
    async fn run(&self, sql: &crate::dialect::Sql, ttl: Duration) -> Result<bool> {
        let bind = Bind::new(&self.name).lease(&self.owner, ttl);
        let mut tries = 0;
        loop {
            match D::Db::run(On::Pool(&self.lock.pool), sql, &bind).await {
                Err(sqlx::Error::Database(e)) if tries < 60 && D::lost_race(e.as_ref()) => {
                    tries += 1;
                    let most = (5 * tries).min(25);
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(1..=most))).await;
                }
                other => return Ok(other.map_err(error::map::<D>)? == Some(1)),
            }
        }
    }
}

#[async_trait]
impl<D: Dialect> Lease for TableLease<D> {
    async fn extend(&self, ttl: Duration) -> Result<Instant> {
        let started = Instant::now();
        if !self.run(&self.lock.sql.extend, ttl).await? {
            return Err(Error::lost(self.name.as_str(), LostReason::NotOwner));
        }
        Ok(lease_end(started, ttl))
    }

    async fn release(&self) -> Result<()> {
        let [in_time, late] = &self.lock.sql.release;
        let reason = if self.run(in_time, Duration::ZERO).await? {
            None
        } else if self.run(late, Duration::ZERO).await? {
            // Ours, but past its lease: another client may have taken it meanwhile.
            Some(LostReason::Expired)
        } else {
            return Err(Error::lost(self.name.as_str(), LostReason::NotOwner));
        };
        self.lock.wake.slot(&self.name).notify_waiters();
        match reason {
            None => Ok(()),
            Some(reason) => Err(Error::lost(self.name.as_str(), reason)),
        }
    }
}

impl<D: Dialect> Cleanup for TableLease<D> {
    const WHAT: &'static str = "releasing a lease row";

    async fn cleanup(self) -> Result<()> {
        self.release().await
    }
}
