//! The lease-table strategy: one row per held lock (name, owner, expiry), changed only by
//! single statements that compare the owner and the clock.

use std::sync::Arc;
use std::time::Duration;

use lockkit_core::backend::{Acquired, Armed, LockName, Outcome};
use lockkit_core::Result;
use tokio::time::Instant;

use crate::dialect::{Bind, Db, Dialect, On};
use crate::error;
use crate::lease::TableLease;
use crate::lock::Shared;
use crate::wait::CLOCK_MARGIN;

/// One attempt: the lease row, then its token, on one connection. A statement that lost a
/// race against another client's on the same row changed nothing, and counts as busy.
pub(crate) async fn attempt<D: Dialect>(
    lock: Arc<Shared<D>>,
    name: LockName,
    ttl: Duration,
) -> Result<Outcome> {
    match take(lock, name, ttl).await {
        Err(e) if error::lost_race::<D>(&e) => Ok(Outcome::Busy(())),
        other => other,
    }
}

async fn take<D: Dialect>(lock: Arc<Shared<D>>, name: LockName, ttl: Duration) -> Result<Outcome> {
    let owner = uuid::Uuid::new_v4().simple().to_string();
    let mut conn = lock.pool.acquire().await.map_err(error::map::<D>)?;
    let started = Instant::now();
    let bind = Bind::new(&name).lease(&owner, ttl);
    let mut taken = false;
    for step in [Some(&lock.sql.acquire), lock.sql.take_over.as_ref()] {
        let Some(step) = step.filter(|_| !taken) else {
            continue;
        };
        let changed = D::Db::run(On::Conn(&mut conn), step, &bind).await;
        taken = changed.map_err(error::map::<D>)? == Some(1);
    }
    if !taken {
        return Ok(Outcome::Busy(()));
    }
    // Released again if the token cannot be had.
    let lease = Armed::new(TableLease::new(lock.clone(), name.clone(), owner.clone()));
    let token = lock.fence(&mut conn, &bind).await?;
    Ok(Outcome::Won(Acquired::new(
        token,
        started + ttl - CLOCK_MARGIN,
        Box::new(lease.disarm()),
    )))
}

/// How long the holder's lease of `name` has left (`None`: not held, or unknown).
pub(crate) async fn time_left<D: Dialect>(
    lock: &Shared<D>,
    name: &LockName,
) -> Result<Option<Duration>> {
    let bind = Bind::new(name);
    let left = D::Db::run(On::Pool(&lock.pool), &lock.sql.time_left, &bind).await;
    let left = left.map_err(error::map::<D>)?;
    Ok(left.map(|ms| Duration::from_millis(ms.max(0) as u64)))
}
