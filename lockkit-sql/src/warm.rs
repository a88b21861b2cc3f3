//! Connections kept between the lease-table statements, out of the pool.
//!
//! sqlx returns every pooled connection from a task that first pings it (a round trip on a
//! server, a hop to the worker thread on SQLite): one spawn and one ping per statement. A
//! lease-table lock runs a statement to take and one to release, so that was a third of an
//! uncontended cycle's work beside the statements themselves. [`Warm`] keeps the
//! connections whose statement finished cleanly and hands them to the next statement
//! directly. A connection whose statement was cut short (a cancelled future) or failed
//! without an answer from the database goes back through the pool, which checks it.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sqlx::pool::{Pool, PoolConnection};
use sqlx::Database;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a connection is kept unused before it goes back to the pool (whose own idle
/// timeout then closes it).
const KEEP: Duration = Duration::from_secs(10);

/// The connections kept warm for one client (see the module docs).
pub(crate) struct Warm<DB: Database> {
    idle: Arc<Mutex<Kept<DB>>>,
    /// Told when a connection is put back, for statements waiting on the pool meanwhile.
    returned: Notify,
}

struct Kept<DB: Database> {
    /// Idle connections, most recently used last, with when each was put back.
    conns: Vec<(PoolConnection<DB>, Instant)>,
    /// Whether a task is giving the ones kept unused past [`KEEP`] back to the pool.
    pruning: bool,
}

impl<DB: Database> Warm<DB> {
    pub(crate) fn new() -> Self {
        let kept = Kept {
            conns: Vec::new(),
            pruning: false,
        };
        Warm {
            idle: Arc::new(Mutex::new(kept)),
            returned: Notify::new(),
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept<DB>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `conn`; starts the pruning task if none runs.
    fn put_back(&self, conn: PoolConnection<DB>) {
        let mut kept = self.kept();
        kept.conns.push((conn, Instant::now()));
        if !kept.pruning {
            kept.pruning = true;
            tokio::spawn(prune(Arc::downgrade(&self.idle)));
        }
        drop(kept);
        self.returned.notify_one();
    }

    /// A kept connection, else one from `pool`; whichever comes first if the pool has to
    /// wait (a connection kept here does not count as idle in the pool).
    pub(crate) async fn acquire<'a>(
        &'a self,
        pool: &Pool<DB>,
    ) -> Result<WarmConn<'a, DB>, sqlx::Error> {
        // One wait at the pool throughout, so its acquire timeout holds.
        let from_pool = pool.acquire();
        tokio::pin!(from_pool);
        loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(conn) = self.pop() {
                return Ok(self.wrap(conn));
            }
            tokio::select! {
                biased;
                () = &mut returned => continue,
                conn = &mut from_pool => return Ok(self.wrap(conn?)),
            }
        }
    }

    fn wrap(&self, conn: PoolConnection<DB>) -> WarmConn<'_, DB> {
        WarmConn {
            conn: Some(conn),
            home: self,
            clean: false,
        }
    }

    /// The most recently used kept connection.
    fn pop(&self) -> Option<PoolConnection<DB>> {
        self.kept().conns.pop().map(|(conn, _)| conn)
    }
}

/// Gives the connections kept unused past [`KEEP`] back to the pool, every [`KEEP`], until
/// none is kept or the client is gone.
async fn prune<DB: Database>(idle: Weak<Mutex<Kept<DB>>>) {
    loop {
        tokio::time::sleep(KEEP).await;
        let Some(idle) = idle.upgrade() else { return };
        let mut kept = idle.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        kept.conns.retain(|(_, since)| now - *since < KEEP);
        if kept.conns.is_empty() {
            kept.pruning = false;
            return;
        }
    }
}

impl<DB: Database> Drop for Warm<DB> {
    /// Outside a Tokio runtime the kept connections are closed here: returning one to the
    /// pool would need a task.
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_err() {
            for (conn, _) in self.kept().conns.drain(..) {
                drop(conn.detach());
            }
        }
    }
}

/// A connection lent by [`Warm`]: kept again when dropped if [`WarmConn::settle`] found its
/// statement finished cleanly, else given back to the pool.
pub(crate) struct WarmConn<'a, DB: Database> {
    conn: Option<PoolConnection<DB>>,
    home: &'a Warm<DB>,
    clean: bool,
}

impl<DB: Database> WarmConn<'_, DB> {
    pub(crate) fn conn(&mut self) -> &mut DB::Connection {
        self.conn.as_mut().expect("taken only on drop")
    }

    /// Marks the connection's statements as finished cleanly: it is kept when dropped.
    pub(crate) fn keep(&mut self) {
        self.clean = true;
    }

    /// Records how the connection's last statement ended: it is kept only after an answer
    /// (a success, or an error the database sent back).
    pub(crate) fn settle<T>(&mut self, result: &Result<T, sqlx::Error>) {
        self.clean = matches!(result, Ok(_) | Err(sqlx::Error::Database(_)));
    }
}

impl<DB: Database> Drop for WarmConn<'_, DB> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        match (self.clean, tokio::runtime::Handle::try_current()) {
            (true, Ok(_)) => self.home.put_back(conn),
            // Outside a runtime the pool's return task cannot be spawned.
            (_, Err(_)) => drop(conn.detach()),
            (false, Ok(_)) => drop(conn),
        }
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use super::*;
    use sqlx::pool::PoolOptions;
    use sqlx::{Executor, Sqlite};

    async fn pool_of_one() -> Pool<Sqlite> {
        PoolOptions::<Sqlite>::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(2))
            .connect("sqlite::memory:")
            .await
            .unwrap()
    }

    fn kept(warm: &Warm<Sqlite>) -> usize {
        warm.kept().conns.len()
    }

    #[tokio::test]
    async fn a_connection_is_kept_only_after_its_statement_answered() {
        let (pool, warm) = (pool_of_one().await, Warm::new());
        let mut conn = warm.acquire(&pool).await.unwrap();
        let answered = conn.conn().execute("SELECT 1").await.map(drop);
        conn.settle(&answered);
        drop(conn);
        assert_eq!(kept(&warm), 1);
        // A statement cut short, or an error the database did not answer: back to the
        // pool, which checks the connection.
        let conn = warm.acquire(&pool).await.unwrap();
        assert_eq!(kept(&warm), 0);
        drop(conn);
        assert_eq!(kept(&warm), 0);
        let mut conn = warm.acquire(&pool).await.unwrap();
        conn.settle(&Err::<(), _>(sqlx::Error::PoolClosed));
        drop(conn);
        assert_eq!(kept(&warm), 0);
    }

    #[tokio::test]
    async fn a_statement_waiting_for_the_pool_gets_the_connection_kept_meanwhile() {
        let (pool, warm) = (pool_of_one().await, std::sync::Arc::new(Warm::new()));
        let mut held = warm.acquire(&pool).await.unwrap();
        held.keep();
        let waiter = {
            let (pool, warm) = (pool.clone(), warm.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                drop(warm.acquire(&pool).await?);
                Ok::<_, sqlx::Error>(started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        // Kept, not returned to the pool: only the kept list can serve the waiter, well
        // before the pool's 2 s acquire timeout.
        drop(held);
        let waited = waiter
            .await
            .unwrap()
            .expect("the waiter timed out at the pool");
        assert!(waited < Duration::from_secs(1), "{waited:?}");
    }

    #[tokio::test]
    async fn a_connection_kept_unused_goes_back_to_the_pool() {
        let (pool, warm) = (pool_of_one().await, Warm::new());
        tokio::time::pause();
        warm.acquire(&pool).await.unwrap().keep();
        assert_eq!((kept(&warm), pool.num_idle()), (1, 0));
        tokio::time::sleep(KEEP / 2).await;
        assert_eq!(kept(&warm), 1);
        tokio::time::sleep(KEEP * 2).await;
        assert_eq!(kept(&warm), 0);
        // The pool's return task pings it first, on SQLite's worker thread.
        tokio::time::resume();
        let until = Instant::now() + Duration::from_secs(1);
        while pool.num_idle() == 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(pool.num_idle(), 1);
    }
}
