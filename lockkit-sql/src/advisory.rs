//! The advisory strategy: a session lock (`pg_advisory_lock`, `GET_LOCK`) on a pool
//! connection held for the guard's life, so the lock dies with the session.

use std::sync::Arc;
use std::time::Duration;

use lockkit_core::backend::{Acquired, Armed, Cleanup, LockName, Outcome};
use lockkit_core::Result;
use sqlx::pool::PoolConnection;
use tokio::time::Instant;

use crate::dialect::{AdvisorySql, Bind, Db, Dialect, On};
use crate::error;
use crate::lease::SessionLease;
use crate::lock::{fence, Shared};
use crate::wait::lease_end;

/// The advisory statements of a client whose strategy is advisory (checked on connect).
pub(crate) fn statements<D: Dialect>(lock: &Shared<D>) -> &AdvisorySql {
    lock.sql
        .advisory
        .as_ref()
        .expect("the advisory strategy is only chosen where the dialect has it")
}

/// A connection whose session may hold a lock: closed unless handed over, so whatever the
/// session holds goes with it.
pub(crate) struct Session<D: Dialect>(pub(crate) PoolConnection<D::Db>);

impl<D: Dialect> Cleanup for Session<D> {
    const WHAT: &'static str = "closing a lock session";

    fn cleanup(self) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
        let closing = self.0.close();
        async move { closing.await.map_err(error::map::<D>) }
    }
}

/// One advisory attempt: a try-lock (`slice` `None`), or a wait on the server of at most
/// `slice`; the session is armed first to end once silent for `ttl`. Then the fencing token,
/// on the same session.
pub(crate) async fn attempt<D: Dialect>(
    lock: Arc<Shared<D>>,
    name: LockName,
    ttl: Duration,
    slice: Option<Duration>,
) -> Result<Outcome> {
    let sql = statements(&lock);
    let key = D::advisory_key(&lock, &name).await?;
    let conn = lock.pool.acquire().await.map_err(error::map::<D>)?;
    let mut session = Armed::new(Session::<D>(conn));
    let started = Instant::now();
    let bind = Bind::new(&name).key(&key, slice).ttl(ttl);
    // Armed before the lock is taken, so there is no moment the session holds it unarmed.
    let steps = match slice {
        None => [Some(&sql.arm), None, Some(&sql.try_lock)],
        Some(_) => [Some(&sql.arm), sql.prepare_wait.as_ref(), Some(&sql.wait)],
    };
    let mut got = None;
    for step in steps.into_iter().flatten() {
        got = match D::Db::run(On::Conn(&mut *session.0), step, &bind).await {
            Err(sqlx::Error::Database(e)) if D::lost_race(e.as_ref()) => Some(0),
            other => other.map_err(error::map::<D>)?,
        };
    }
    match got {
        Some(1) => {}
        // Held elsewhere: the connection goes back to the pool, disarmed (closed if that
        // fails).
        Some(_) => {
            let disarm = D::Db::run(On::Conn(&mut *session.0), &sql.disarm, &bind).await;
            disarm.map_err(error::map::<D>)?;
            drop(session.disarm());
            return Ok(Outcome::Busy(()));
        }
        None => return Err(error::no_value::<D>("the advisory lock")),
    }
    let token = fence::<D>(&mut *session.0, &sql.fence, &bind).await?;
    let lease = SessionLease::<D>::new(lock.clone(), name, key, session.disarm().0);
    Ok(Outcome::Won(Acquired::new(
        token,
        lease_end(started, ttl),
        Box::new(lease),
    )))
}
