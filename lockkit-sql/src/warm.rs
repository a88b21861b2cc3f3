//! Connections kept between the lease-table statements, out of the pool.
//!
//! sqlx returns every pooled connection from a task that first pings it (a round trip on a
//! server, a hop to the worker thread on SQLite): one spawn and one ping per statement. A
//! lease-table lock runs a statement to take and one to release, so that was a third of an
//! uncontended cycle's work beside the statements themselves. [`Warm`] keeps the
//! connections whose statement succeeded and hands them to the next statement directly.
//!
//! A connection goes back through the pool, which checks it, when its statement was cut
//! short (a cancelled future) or failed; when the pool has no other connection to give (so
//! a caller of the pool itself, an admin call or a waiter queued there, is served by the
//! pool's own fair queue); when a quarter of the pool, or [`MOST`], is kept already; when
//! kept unused for [`KEEP`] (a caller of the pool itself waits at most that long for a kept
//! one, well within the pool's acquire timeout); and once it has been kept for
//! [`LIFETIME`], so that the pool's own check of its age runs.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use sqlx::pool::{Pool, PoolConnection};
use sqlx::Database;
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a connection is kept unused before it goes back to the pool (whose own idle
/// timeout then closes it): the gain is for statements that follow one another closely.
const KEEP: Duration = Duration::from_secs(1);

/// The most connections kept at once: sequential statements need one, a few concurrent
/// ones a few; more wait at the pool as before.
const MOST: usize = 4;

/// How long a connection may go from kept to kept before it goes back to the pool once, so
/// that the pool's own check of its age (`max_lifetime`, 30 min) runs at least that often.
const LIFETIME: Duration = Duration::from_secs(2 * 60);

/// The connections kept warm for one client (see the module docs).
pub(crate) struct Warm<DB: Database> {
    idle: Arc<Mutex<Kept<DB>>>,
    /// Told when a connection is put back, for statements waiting on the pool meanwhile.
    returned: Notify,
    /// The runtime the client was made on: a connection dropped outside any runtime goes
    /// back to the pool from a task there (sqlx spawns one for every pooled connection).
    runtime: Option<Handle>,
}

struct Kept<DB: Database> {
    /// Idle connections, most recently used last.
    conns: Vec<Idle<DB>>,
    /// Whether a task is giving the ones kept unused past [`KEEP`] back to the pool.
    pruning: bool,
}

struct Idle<DB: Database> {
    conn: PoolConnection<DB>,
    /// When it was put back.
    since: Instant,
    /// When it was first taken from the pool.
    from_pool: Instant,
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
            runtime: Handle::try_current().ok(),
        }
    }

    fn kept(&self) -> MutexGuard<'_, Kept<DB>> {
        lock(&self.idle)
    }

    /// A kept connection, else one from `pool`; whichever comes first if the pool has to
    /// wait (a connection kept here does not count as idle in the pool).
    pub(crate) async fn acquire<'a>(
        &'a self,
        pool: &'a Pool<DB>,
    ) -> Result<WarmConn<'a, DB>, sqlx::Error> {
        // One wait at the pool throughout, so its acquire timeout holds.
        let from_pool = pool.acquire();
        tokio::pin!(from_pool);
        loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            let kept = self.kept().conns.pop();
            if let Some(Idle {
                conn, from_pool, ..
            }) = kept
            {
                return Ok(self.lend(conn, from_pool, pool));
            }
            tokio::select! {
                biased;
                () = &mut returned => continue,
                conn = &mut from_pool => return Ok(self.lend(conn?, Instant::now(), pool)),
            }
        }
    }

    fn lend<'a>(
        &'a self,
        conn: PoolConnection<DB>,
        from_pool: Instant,
        pool: &'a Pool<DB>,
    ) -> WarmConn<'a, DB> {
        WarmConn {
            conn: Some(conn),
            from_pool,
            home: self,
            pool,
            clean: false,
        }
    }

    /// Keeps `conn` if the pool can do without it (see the module docs), else drops it back
    /// into the pool; starts the pruning task if none runs.
    fn put_back(&self, conn: PoolConnection<DB>, from_pool: Instant, pool: &Pool<DB>) {
        let max = pool.options().get_max_connections();
        // This connection counts in the pool's size: room means another one to give.
        let room = pool.num_idle() > 0 || pool.size() < max;
        let most = MOST.min(max as usize / 4);
        let mut kept = self.kept();
        if !room || kept.conns.len() >= most || from_pool.elapsed() >= LIFETIME {
            drop(kept);
            drop(conn);
            return;
        }
        let since = Instant::now();
        kept.conns.push(Idle {
            conn,
            since,
            from_pool,
        });
        let start_pruning = !std::mem::replace(&mut kept.pruning, true);
        drop(kept);
        if start_pruning {
            // Outside the lock: a runtime that has shut down drops the task at once, and
            // its guard takes the lock. On the client's runtime: the caller's may be a
            // short-lived one (a `block_on` per call), which would drop the task with it.
            let pruner = prune(Arc::downgrade(&self.idle));
            match &self.runtime {
                Some(runtime) => drop(runtime.spawn(pruner)),
                None => drop(tokio::spawn(pruner)),
            }
        }
        self.returned.notify_one();
    }

    /// Enters the client's runtime if the caller runs outside one.
    fn enter(&self) -> Option<tokio::runtime::EnterGuard<'_>> {
        match Handle::try_current() {
            Ok(_) => None,
            Err(_) => self.runtime.as_ref().map(Handle::enter),
        }
    }
}

fn lock<DB: Database>(idle: &Mutex<Kept<DB>>) -> MutexGuard<'_, Kept<DB>> {
    idle.lock().unwrap_or_else(|e| e.into_inner())
}

/// Gives each connection kept unused for [`KEEP`] back to the pool, until none is kept or
/// the client is gone.
fn prune<DB: Database>(idle: Weak<Mutex<Kept<DB>>>) -> impl Future<Output = ()> + Send {
    /// Clears `pruning` when the task ends, also if it is dropped unpolled or midway (its
    /// runtime shut down), so that the next connection kept starts another.
    struct Stopped<DB: Database>(Weak<Mutex<Kept<DB>>>);
    impl<DB: Database> Stopped<DB> {
        /// `pruning` was cleared already.
        fn disarm(&mut self) {
            self.0 = Weak::new();
        }
    }
    impl<DB: Database> Drop for Stopped<DB> {
        fn drop(&mut self) {
            if let Some(idle) = self.0.upgrade() {
                lock(&idle).pruning = false;
            }
        }
    }
    // Made before the future, so that it is dropped with it even if never polled.
    let stopped = Stopped(idle.clone());
    async move {
        let mut stopped = stopped;
        let mut next = Instant::now() + KEEP;
        loop {
            tokio::time::sleep_until(next).await;
            let Some(idle) = idle.upgrade() else { return };
            let mut kept = lock(&idle);
            let now = Instant::now();
            kept.conns.retain(|idle| now - idle.since < KEEP);
            // The oldest is first: the next one to prune.
            match kept.conns.first() {
                Some(oldest) => next = oldest.since + KEEP,
                None => {
                    // Ended under the lock, so a connection kept from now on starts a task.
                    kept.pruning = false;
                    drop(kept);
                    stopped.disarm();
                    return;
                }
            }
        }
    }
}

impl<DB: Database> Drop for Warm<DB> {
    fn drop(&mut self) {
        let _entered = self.enter();
        self.kept().conns.clear();
    }
}

/// A connection lent by [`Warm`]: offered back to it when dropped if
/// [`WarmConn::settle`] or [`WarmConn::keep`] found its statements succeeded, else
/// given back to the pool.
pub(crate) struct WarmConn<'a, DB: Database> {
    conn: Option<PoolConnection<DB>>,
    from_pool: Instant,
    home: &'a Warm<DB>,
    pool: &'a Pool<DB>,
    clean: bool,
}

impl<DB: Database> WarmConn<'_, DB> {
    pub(crate) fn conn(&mut self) -> &mut DB::Connection {
        self.conn.as_mut().expect("taken only on drop")
    }

    /// Marks the connection's statements as finished: it is offered back when dropped.
    pub(crate) fn keep(&mut self) {
        self.clean = true;
    }

    /// Records how the connection's last statement ended: it is offered back only after a
    /// success (an error, even one the database answered, may have ended the session).
    pub(crate) fn settle<T>(&mut self, result: &Result<T, sqlx::Error>) {
        self.clean = result.is_ok();
    }
}

impl<DB: Database> Drop for WarmConn<'_, DB> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        // Dropped outside a runtime: not kept (no task could prune it), and given back to
        // the pool from the client's runtime.
        let in_runtime = Handle::try_current().is_ok();
        let _entered = self.home.enter();
        match self.clean && in_runtime {
            true => self.home.put_back(conn, self.from_pool, self.pool),
            false => drop(conn),
        }
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use super::*;
    use sqlx::pool::PoolOptions;
    use sqlx::{Executor, Sqlite};

    async fn pool_of(max: u32) -> Pool<Sqlite> {
        PoolOptions::<Sqlite>::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(2))
            .connect("sqlite::memory:")
            .await
            .unwrap()
    }

    /// `n` connections lent at once, each marked to be kept when dropped.
    async fn lend_kept<'a>(
        warm: &'a Warm<Sqlite>,
        pool: &'a Pool<Sqlite>,
        n: usize,
    ) -> Vec<WarmConn<'a, Sqlite>> {
        let mut lent = Vec::new();
        for _ in 0..n {
            let mut conn = warm.acquire(pool).await.unwrap();
            conn.keep();
            lent.push(conn);
        }
        lent
    }

    fn kept(warm: &Warm<Sqlite>) -> usize {
        warm.kept().conns.len()
    }

    /// Waits (in real time) until the pool has `idle` idle connections of `size`.
    async fn settles(pool: &Pool<Sqlite>, idle: usize, size: u32) {
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while (pool.num_idle(), pool.size()) != (idle, size) {
            assert!(
                std::time::Instant::now() < until,
                "{:?}",
                (pool.num_idle(), pool.size())
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn a_connection_is_kept_only_after_its_statement_succeeded() {
        let (pool, warm) = (pool_of(8).await, Warm::new());
        let mut conn = warm.acquire(&pool).await.unwrap();
        let answered = conn.conn().execute("SELECT 1").await.map(drop);
        conn.settle(&answered);
        drop(conn);
        assert_eq!(kept(&warm), 1);
        // Cut short, or failed: back to the pool (which checks it), though it has room.
        let conn = warm.acquire(&pool).await.unwrap();
        assert_eq!(kept(&warm), 0);
        drop(conn);
        assert_eq!(kept(&warm), 0);
        settles(&pool, 1, 1).await;
        let mut conn = warm.acquire(&pool).await.unwrap();
        let failed = conn.conn().execute("SELECT nonsense").await.map(drop);
        conn.settle(&failed);
        assert!(pool.size() < 8);
        drop(conn);
        assert_eq!(kept(&warm), 0);
        settles(&pool, 1, 1).await;
    }

    #[tokio::test]
    async fn a_connection_the_pool_needs_goes_back_to_it() {
        // Every connection of the pool lent: keeping one returned would leave a caller of the
        // pool itself (an admin call, a migration) waiting until it is pruned.
        let (pool, warm) = (pool_of(4).await, Warm::new());
        let mut lent = lend_kept(&warm, &pool, 4).await;
        drop(lent.pop());
        assert_eq!(kept(&warm), 0);
        let direct = tokio::time::timeout(Duration::from_secs(1), pool.acquire()).await;
        assert!(matches!(direct, Ok(Ok(_))), "{direct:?}");
        // A pool of one keeps nothing either (at most a quarter of a pool is kept).
        let (pool, warm) = (pool_of(1).await, Warm::new());
        warm.acquire(&pool).await.unwrap().keep();
        assert_eq!(kept(&warm), 0);
    }

    #[tokio::test]
    async fn a_connection_kept_unused_goes_back_to_the_pool() {
        let (pool, warm) = (pool_of(4).await, Warm::new());
        // The clock is paused after the pool answered: a paused clock runs ahead while the
        // test waits on SQLite's thread, and would time the pool out.
        warm.acquire(&pool).await.unwrap().keep();
        tokio::time::pause();
        assert_eq!((kept(&warm), pool.num_idle()), (1, 0));
        tokio::time::sleep(KEEP / 2).await;
        assert_eq!(kept(&warm), 1);
        tokio::time::sleep(KEEP).await;
        assert_eq!(kept(&warm), 0);
        // The pool's return task pings it first, on SQLite's worker thread.
        tokio::time::resume();
        settles(&pool, 1, 1).await;
    }

    #[test]
    fn kept_connections_dropped_outside_the_runtime_go_back_through_it() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (pool, warm) = runtime.block_on(async {
            let (pool, warm) = (pool_of(4).await, Warm::new());
            warm.acquire(&pool).await.unwrap().keep();
            (pool, warm)
        });
        assert_eq!(kept(&warm), 1);
        // sqlx spawns a task for every pooled connection dropped: outside the runtime, a
        // panic unless the client's runtime is entered.
        drop(warm);
        runtime.block_on(settles(&pool, 1, 1));
    }

    #[tokio::test]
    async fn at_most_a_quarter_of_the_pool_is_kept() {
        let (pool, warm) = (pool_of(8).await, Warm::new());
        drop(lend_kept(&warm, &pool, 3).await);
        assert_eq!(kept(&warm), 2);
    }

    #[test]
    fn the_pruner_runs_on_the_clients_runtime_not_the_callers() {
        let client = tokio::runtime::Runtime::new().unwrap();
        let (pool, warm) = client.block_on(async { (pool_of(4).await, Warm::new()) });
        // A caller's runtime that ends right after the statement, with the pruner it
        // started if it was started there.
        let caller = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        caller.block_on(async { warm.acquire(&pool).await.unwrap().keep() });
        drop(caller);
        assert_eq!(kept(&warm), 1);
        client.block_on(async {
            let until = std::time::Instant::now() + KEEP * 5;
            while kept(&warm) > 0 {
                assert!(std::time::Instant::now() < until, "never pruned");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
}
