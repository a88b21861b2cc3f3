//! Extending, releasing and storing a value (`set_value`, in `<prefix>lock_values`, checked
//! against the holder in the same statement): a session lock on its held connection, or a
//! lease row.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lockkit_core::backend::{spawn_cleanup, Cleanup, Lease, LockName};
use lockkit_core::{Error, LostReason, Result};
use tokio::time::Instant;

use crate::advisory::statements;
use crate::dialect::{Bind, Db, Dialect, Key};
use crate::error;
use crate::lock::Shared;
use crate::session::{Holder, Session};
use crate::wait::{lease_end, millis};

/// A lock held by an advisory session of the client (the advisory strategy), which may hold
/// many.
#[derive(Debug)]
pub(crate) struct SessionLease<D: Dialect> {
    lock: Arc<Shared<D>>,
    name: LockName,
    key: Key,
    /// The fencing token, stored with a value.
    token: i64,
    holder: Holder<D>,
    /// Set once released (or given up).
    released: AtomicBool,
    /// Set once a value may have been stored: it is cleared when the lock is let go of.
    valued: AtomicBool,
}

/// How much older than an extend the latest statement on its session may be and still count
/// as its renewal, as a fraction of the TTL: the renewals of a session's locks share
/// statements, and the lease is then that much shorter than asked (conservative).
const SHARED_RENEWAL: u32 = 16;

impl<D: Dialect> SessionLease<D> {
    pub(crate) fn new(
        lock: Arc<Shared<D>>,
        name: LockName,
        key: Key,
        token: i64,
        holder: Holder<D>,
    ) -> Self {
        SessionLease {
            lock,
            name,
            key,
            token,
            holder,
            released: AtomicBool::new(false),
            valued: AtomicBool::new(false),
        }
    }

    /// What letting go of the lock needs.
    fn held(&self) -> Held<'_> {
        Held {
            name: &self.name,
            key: &self.key,
            token: self.token,
            valued: self.valued.load(Ordering::SeqCst),
        }
    }

    fn not_owner(&self) -> Error {
        Error::lost(self.name.as_str(), LostReason::NotOwner)
    }

    /// The session, and the lock with it, is gone.
    fn gone(&self, session: &Session<D>) -> Error {
        let why = session
            .ended
            .clone()
            .unwrap_or_else(|| "the session ended".into());
        Error::lost(self.name.as_str(), LostReason::SessionLost(why))
    }
}

#[async_trait]
impl<D: Dialect> Lease for SessionLease<D> {
    /// Re-arms the session for `ttl` (the server ends it once silent that long): the session
    /// being alive is what keeps the lock, so one statement renews every lock of the session,
    /// and a statement sent on it shortly before (a sixteenth of the TTL) counts. A session
    /// the server ended is found here: the lock is lost no later than the first renewal after.
    async fn extend(&self, ttl: Duration) -> Result<Instant> {
        let asked = Instant::now();
        let mut session = self.holder.lock().await;
        if self.released.load(Ordering::SeqCst) {
            return Err(self.not_owner());
        }
        if !session.alive() {
            return Err(self.gone(&session));
        }
        let ttl_ms = millis(ttl);
        if !session.set_ttl(&self.key, ttl_ms) {
            return Err(self.not_owner());
        }
        let arm_ms = session.arm_for(ttl_ms);
        if let Some(last) = session.last_ok {
            let recent = asked.saturating_duration_since(last) <= ttl / SHARED_RENEWAL;
            if recent && session.armed_ms >= arm_ms {
                return Ok(lease_end(last, ttl));
            }
        }
        let bind = Bind::new(&self.name).ttl(Duration::from_millis(arm_ms as u64));
        let sent = Instant::now();
        match session.run(&statements(&self.lock).arm, &bind).await {
            Ok(_) => {
                session.armed_ms = arm_ms;
                Ok(lease_end(sent, ttl))
            }
            Err(_) if !session.alive() => Err(self.gone(&session)),
            Err(e) => Err(error::map::<D>(e)),
        }
    }

    /// Loss is found by the renewal that fails, or at the end of the lease.
    fn signals_loss(&self) -> bool {
        false
    }

    async fn release(&self) -> Result<()> {
        let mut session = self.holder.lock().await;
        if self.released.swap(true, Ordering::SeqCst) {
            return Err(self.not_owner());
        }
        unlock(&self.lock, &mut session, self.held())
            .await
            .map_err(|lost| Error::lost(self.name.as_str(), lost))
    }

    /// On the session, in one statement that stores the value only if the session holds
    /// the lock (the server's own record, as inspect reads it). A session found ended is
    /// the lock lost, as for [`Lease::extend`].
    async fn set_value(&self, value: &str) -> Result<()> {
        let mut session = self.holder.lock().await;
        if self.released.load(Ordering::SeqCst) {
            return Err(self.not_owner());
        }
        if !session.alive() {
            return Err(self.gone(&session));
        }
        if !session.holds(&self.key) {
            return Err(self.not_owner());
        }
        // Before the statement: a value whose answer is lost is still cleared.
        self.valued.store(true, Ordering::SeqCst);
        let bind = Bind::new(&self.name)
            .key(&self.key, None)
            .token(self.token)
            .value(value);
        match session.run(&statements(&self.lock).set_value, &bind).await {
            Ok(Some(stored)) if stored > 0 => Ok(()),
            Ok(_) => Err(self.not_owner()),
            Err(_) if !session.alive() => Err(self.gone(&session)),
            Err(e) => Err(error::map::<D>(e)),
        }
    }
}

/// A lock of a session, to let go of.
struct Held<'a> {
    name: &'a LockName,
    key: &'a Key,
    token: i64,
    /// Whether a value may have been stored with it.
    valued: bool,
}

/// Lets go of a lock on `session`, then clears the value stored with it; a session that
/// cannot do either is ended, so nothing stays held, and no later lock on it shows the value.
async fn unlock<D: Dialect>(
    lock: &Shared<D>,
    session: &mut Session<D>,
    held: Held<'_>,
) -> std::result::Result<(), LostReason> {
    let Held { name, key, .. } = held;
    if !session.alive() {
        let why = session.ended.clone().unwrap_or_default();
        return Err(LostReason::SessionLost(why));
    }
    if !session.let_go(key) {
        return Err(LostReason::NotOwner);
    }
    let bind = Bind::new(name).key(key, None);
    let result = match session.run(&statements(lock).unlock, &bind).await {
        Ok(Some(1)) => Ok(()),
        Ok(_) => Err(LostReason::NotOwner),
        Err(e) => Err(LostReason::SessionLost(error::map::<D>(e).to_string())),
    };
    if result.is_ok() && held.valued {
        let bind = Bind::new(name).token(held.token);
        if let Err(e) = session.run(&statements(lock).clear_value, &bind).await {
            tracing::debug!(error = %e, "ending a session whose released lock kept its value");
            session.end("a released lock's value could not be cleared");
        }
    }
    if result.is_err() {
        // Whatever the session holds that it should not goes with it.
        session.end("a lock could not be let go of");
    } else if session.alive() && session.holds_none() {
        lock.sessions.emptied(session);
    }
    result
}

impl<D: Dialect> Drop for SessionLease<D> {
    fn drop(&mut self) {
        // Not released: let go of the lock in the background (without a runtime it goes
        // when its session is closed).
        if self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        let (lock, holder) = (self.lock.clone(), self.holder.clone());
        let (name, key) = (self.name.clone(), self.key.clone());
        let (token, valued) = (self.token, self.valued.load(Ordering::SeqCst));
        spawn_cleanup("letting go of an advisory lock", async move {
            let mut session = holder.lock().await;
            let held = Held {
                name: &name,
                key: &key,
                token,
                valued,
            };
            let unlocked = unlock(&lock, &mut session, held).await;
            unlocked.map_err(|lost| Error::lost(name.as_str(), lost))
        });
    }
}

/// A lease row (the lease-table strategy).
#[derive(Debug)]
pub(crate) struct TableLease<D: Dialect> {
    lock: Arc<Shared<D>>,
    name: LockName,
    /// Shared with the renewal batches it joins.
    owner: Arc<str>,
    /// The fencing token, stored with a value.
    token: i64,
}

impl<D: Dialect> TableLease<D> {
    pub(crate) fn new(lock: Arc<Shared<D>>, name: LockName, owner: String, token: i64) -> Self {
        TableLease {
            lock,
            name,
            owner: owner.into(),
            token,
        }
    }

    async fn run(&self, sql: &crate::dialect::Sql, ttl: Duration) -> Result<bool> {
        row(&self.lock, sql, &self.name, &self.owner, ttl).await
    }
}

/// Runs a statement on the row (`name`, `owner`): whether it changed it. One that lost a
/// race (an InnoDB deadlock against an acquiring transaction, which holds the row until its
/// token is taken) changed nothing and runs again, with a jittered pause of at most 25 ms,
/// for up to about a second.
pub(crate) async fn row<D: Dialect>(
    lock: &Shared<D>,
    sql: &crate::dialect::Sql,
    name: &LockName,
    owner: &str,
    ttl: Duration,
) -> Result<bool> {
    let bind = Bind::new(name).lease(owner, ttl);
    Ok(changed(lock, sql, &bind).await? == Some(1))
}

/// Runs a statement on a lease row with the values of `bind`, again after a lost race as
/// [`row`] does: the rows it changed.
async fn changed<D: Dialect>(
    lock: &Shared<D>,
    sql: &crate::dialect::Sql,
    bind: &Bind<'_>,
) -> Result<Option<i64>> {
    let mut tries = 0;
    loop {
        match D::Db::run(lock.warm(), sql, bind).await {
            Err(sqlx::Error::Database(e)) if tries < 60 && D::lost_race(e.as_ref()) => {
                tries += 1;
                let most = (5 * tries).min(25);
                tokio::time::sleep(Duration::from_millis(fastrand::u64(1..=most))).await;
            }
            other => return other.map_err(error::map::<D>),
        }
    }
}

#[async_trait]
impl<D: Dialect> Lease for TableLease<D> {
    /// In the client's next batch of renewals where the database takes them (one statement
    /// for many rows), else on its own.
    async fn extend(&self, ttl: Duration) -> Result<Instant> {
        let started = Instant::now();
        let extended = match &self.lock.sql.extend_many {
            Some(_) => crate::renew::extend(&self.lock, &self.name, &self.owner, ttl).await?,
            None => self
                .run(&self.lock.sql.extend, ttl)
                .await?
                .then_some(started),
        };
        match extended {
            Some(sent) => Ok(lease_end(sent, ttl)),
            None => Err(Error::lost(self.name.as_str(), LostReason::NotOwner)),
        }
    }

    /// Loss is found by the renewal that fails, or at the end of the lease.
    fn signals_loss(&self) -> bool {
        false
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

    /// One statement that stores the value only while the row is ours and in time.
    async fn set_value(&self, value: &str) -> Result<()> {
        let bind = Bind::new(&self.name)
            .lease(&self.owner, Duration::ZERO)
            .token(self.token)
            .value(value);
        match changed(&self.lock, &self.lock.sql.set_value, &bind).await? {
            Some(stored) if stored > 0 => Ok(()),
            _ => Err(Error::lost(self.name.as_str(), LostReason::NotOwner)),
        }
    }
}

impl<D: Dialect> Cleanup for TableLease<D> {
    const WHAT: &'static str = "releasing a lease row";

    async fn cleanup(self) -> Result<()> {
        self.release().await
    }
}
