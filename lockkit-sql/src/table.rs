//! The lease-table strategy: one row per held lock (name, owner, expiry), changed only by
//! single statements that compare the owner and the clock.

use std::sync::Arc;
use std::time::Duration;

use lockkit_core::backend::{Acquired, Armed, FencingToken, LockName, Outcome};
use lockkit_core::Result;
use sqlx::Connection;
use tokio::time::Instant;

use crate::dialect::{Bind, Db, Dialect, On};
use crate::error;
use crate::lease::TableLease;
use crate::lock::{fence, Conn, Shared};
use crate::wait::lease_end;

/// One attempt: the lease row and its token, in one statement or one transaction. A
/// statement that lost a race against another client's on the same row changed nothing, and
/// counts as busy.
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
    let _turn = lock.take_turn().await?;
    let mut warm = lock
        .warm
        .acquire(&lock.pool)
        .await
        .map_err(error::map::<D>)?;
    let conn = warm.conn();
    let started = Instant::now();
    let bind = Bind::new(&name).lease(&owner, ttl);
    let token = match &lock.sql.table_fence {
        // The row's own statement returned its token.
        None => take_row(&lock, conn, &bind)
            .await?
            .map(|t| FencingToken(t as u64)),
        // The row stays locked by the transaction until its token is taken.
        Some(table_fence) => {
            let mut tx = conn.begin().await.map_err(error::map::<D>)?;
            let token = match take_row(&lock, &mut tx, &bind).await? {
                Some(_) => Some(fence::<D>(&mut tx, table_fence, &bind).await?),
                None => None,
            };
            tx.commit().await.map_err(error::map::<D>)?;
            token
        }
    };
    // Every statement answered: the connection is kept for the next one.
    warm.keep();
    drop(warm);
    let Some(token) = token else {
        return Ok(Outcome::Busy(()));
    };
    let lease = Armed::new(TableLease::new(
        lock.clone(),
        name,
        owner,
        token.get() as i64,
    ));
    let valid_until = lease_end(started, ttl);
    if Instant::now() >= valid_until {
        // Granted after its lease had run out (a slow statement): another client may hold
        // the row by now. Released, and busy.
        drop(lease);
        return Ok(Outcome::Busy(()));
    }
    Ok(Outcome::Won(Acquired::new(
        token,
        valid_until,
        Box::new(lease.disarm()),
    )))
}

/// Takes the lease row if it is free or expired: `Some` (the token, or 1 when the token is
/// taken apart) if taken.
async fn take_row<D: Dialect>(
    lock: &Shared<D>,
    conn: &mut Conn<D>,
    bind: &Bind<'_>,
) -> Result<Option<i64>> {
    for step in [Some(&lock.sql.acquire), lock.sql.take_over.as_ref()] {
        let Some(step) = step else { continue };
        let got = D::Db::run(On::Conn(&mut *conn), step, bind).await;
        if let Some(got) = got.map_err(error::map::<D>)?.filter(|&got| got > 0) {
            return Ok(Some(got));
        }
    }
    Ok(None)
}

/// How long the holder's lease of `name` has left (`None`: not held, or unknown).
pub(crate) async fn time_left<D: Dialect>(
    lock: &Shared<D>,
    name: &LockName,
) -> Result<Option<Duration>> {
    let bind = Bind::new(name);
    let _turn = lock.take_turn().await?;
    let left = D::Db::run(lock.warm(), &lock.sql.time_left, &bind).await;
    let left = left.map_err(error::map::<D>)?;
    Ok(left.map(|ms| Duration::from_millis(ms.max(0) as u64)))
}
