//! The advisory strategy: session locks (`pg_advisory_lock`, `GET_LOCK`) on the client's
//! advisory sessions (`session.rs`), many locks per session, so the locks die with the
//! session.

use std::sync::Arc;
use std::time::Duration;

use lockkit_core::backend::{Acquired, FencingToken, LockName, Outcome};
use lockkit_core::Result;
use tokio::time::Instant;

use crate::dialect::{AdvisorySql, Bind, Dialect, Key};
use crate::error;
use crate::lease::SessionLease;
use crate::lock::Shared;
use crate::session::Session;
use crate::wait::{lease_end, millis};

/// The advisory statements of a client whose strategy is advisory (checked on connect).
pub(crate) fn statements<D: Dialect>(lock: &Shared<D>) -> &AdvisorySql {
    lock.sql
        .advisory
        .as_ref()
        .expect("the advisory strategy is only chosen where the dialect has it")
}

/// One advisory attempt: a try-lock (`slice` `None`) on a free session of the client, or a
/// wait on the server of at most `slice` on a session of its own. The session is armed for
/// `ttl` (or its longest lock's) before or in the statement that takes the lock, and the
/// fencing token is taken on it.
pub(crate) async fn attempt<D: Dialect>(
    lock: Arc<Shared<D>>,
    name: LockName,
    ttl: Duration,
    slice: Option<Duration>,
) -> Result<Outcome> {
    let key = D::advisory_key(&lock, &name).await?;
    let ttl_ms = millis(ttl);
    let sessions = &lock.sessions;
    let mut session = match slice {
        None => {
            let max = lock.settings.max_connections;
            sessions.for_take(&lock.pool, &key, max).await?
        }
        Some(_) => sessions.for_wait(&lock.pool).await?,
    };
    let started = Instant::now();
    let token = take::<D>(&lock, &mut session, &name, &key, ttl_ms, slice).await;
    if session.holds_none() {
        sessions.emptied(&mut session);
    }
    if token.as_ref().is_err_and(|e| e.is_retryable()) {
        sessions.close_spares();
    }
    let holder = tokio::sync::OwnedMutexGuard::mutex(&session).clone();
    drop(session);
    Ok(won(lock, name, key, holder, token?, started, ttl))
}

fn won<D: Dialect>(
    lock: Arc<Shared<D>>,
    name: LockName,
    key: Key,
    holder: crate::session::Holder<D>,
    token: Option<i64>,
    started: Instant,
    ttl: Duration,
) -> Outcome {
    let Some(token) = token else {
        return Outcome::Busy(());
    };
    let lease = SessionLease::<D>::new(lock, name, key, token, holder);
    Outcome::Won(Acquired::new(
        FencingToken(token as u64),
        lease_end(started, ttl),
        Box::new(lease),
    ))
}

/// Takes `key` on `session` (waiting up to `slice` on the server): its fencing token, or
/// `None` if held elsewhere. The session records the lock and its TTL.
async fn take<D: Dialect>(
    lock: &Shared<D>,
    session: &mut Session<D>,
    name: &LockName,
    key: &Key,
    ttl_ms: i64,
    slice: Option<Duration>,
) -> Result<Option<i64>> {
    let sql = statements(lock);
    let arm_ms = session.arm_for(ttl_ms);
    let bind = Bind::new(name)
        .key(key, slice)
        .ttl(Duration::from_millis(arm_ms as u64));
    if sql.fence.is_some() && session.armed_ms != arm_ms {
        session
            .run(&sql.arm, &bind)
            .await
            .map_err(error::map::<D>)?;
        session.armed_ms = arm_ms;
    }
    let step = match slice {
        None => &sql.take,
        Some(_) => &sql.wait,
    };
    let got = match session.run(step, &bind).await {
        // A wait that ran out. PostgreSQL: its statement was rolled back, yet the lock is
        // let go of in case the statement had taken it.
        Err(sqlx::Error::Database(e)) if D::lost_race(e.as_ref()) => {
            if sql.fence.is_none() {
                let_go::<D>(lock, session, &bind).await?;
            }
            return Ok(None);
        }
        Err(e) => {
            let_go::<D>(lock, session, &bind).await?;
            return Err(error::map::<D>(e));
        }
        Ok(got) => got,
    };
    let token = match (&sql.fence, got) {
        // PostgreSQL: the statement armed the session and returned the token (0: busy).
        (None, Some(token)) => {
            session.armed_ms = arm_ms;
            Some(token).filter(|&t| t > 0)
        }
        (Some(fence), Some(1)) => match session.run(fence, &bind).await {
            Ok(Some(token)) => Some(token),
            other => {
                let_go::<D>(lock, session, &bind).await?;
                return Err(match other {
                    Err(e) => error::map::<D>(e),
                    Ok(_) => error::no_value::<D>("the fence counter"),
                });
            }
        },
        (Some(_), Some(_)) => None,
        (_, None) => return Err(error::no_value::<D>("the advisory lock")),
    };
    if token.is_some() {
        session.hold(key.clone(), ttl_ms);
    }
    Ok(token)
}

/// After a statement that failed and may have taken the lock of `bind`: let go of it, or
/// end the session if that fails too.
async fn let_go<D: Dialect>(
    lock: &Shared<D>,
    session: &mut Session<D>,
    bind: &Bind<'_>,
) -> Result<()> {
    if !session.alive() {
        return Ok(());
    }
    if let Err(e) = session.run(&statements(lock).unlock_if_held, bind).await {
        tracing::debug!(error = %e, "ending a session that may hold a lock it did not report");
        session.end("a lock could not be let go of");
    }
    Ok(())
}
