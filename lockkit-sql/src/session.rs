//! Advisory-lock sessions: connections whose sessions hold advisory locks, many locks each,
//! kept out of the pool while they may hold any. A try-lock runs on a free session of the
//! client, a wait on a connection of its own (which then keeps what it won), and renewals of
//! every lock of a session share its statements: the session being alive is what keeps its
//! locks, so one statement renews them all.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockkit_core::Result;
use sqlx::pool::{Pool, PoolConnection};
use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

use crate::dialect::{Bind, Db, Dialect, Key, On, Sql};
use crate::error;

/// Most locks one session holds: more take another connection.
const PER_SESSION: usize = 1000;
/// Sessions holding nothing kept for the next lock; more are closed.
const SPARE: usize = 4;

/// A session that may hold advisory locks.
pub(crate) type Holder<D> = Arc<tokio::sync::Mutex<Session<D>>>;

/// A session, its locks, and what it is armed with.
pub(crate) struct Session<D: Dialect> {
    /// `None` once the session ended (or was closed because it could not be trusted).
    conn: Option<PoolConnection<D::Db>>,
    /// Why it ended.
    pub(crate) ended: Option<String>,
    /// The locks it holds, each with its lease's TTL in milliseconds. Changed only through
    /// [`Session::hold`], [`Session::set_ttl`] and [`Session::let_go`], which keep `ttls`;
    /// read through [`Session::holds_none`] and [`Session::holds`].
    keys: HashMap<Key, i64>,
    /// How many held locks have each TTL: the longest in O(log n) for [`Session::arm_for`],
    /// which every renewal asks (a session holds up to a thousand locks).
    ttls: BTreeMap<i64, u32>,
    /// The idle timeout the server ends it after, in milliseconds (0: not armed): at least
    /// every held lock's TTL, so the server never ends it before a lease it confirmed.
    pub(crate) armed_ms: i64,
    /// When the latest statement that succeeded on it was sent.
    pub(crate) last_ok: Option<Instant>,
}

impl<D: Dialect> std::fmt::Debug for Session<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("alive", &self.conn.is_some())
            .field("locks", &self.keys.len())
            .field("armed_ms", &self.armed_ms)
            .finish_non_exhaustive()
    }
}

impl<D: Dialect> Session<D> {
    fn new(conn: PoolConnection<D::Db>) -> Self {
        Session {
            conn: Some(conn),
            ended: None,
            keys: HashMap::new(),
            ttls: BTreeMap::new(),
            armed_ms: 0,
            last_ok: None,
        }
    }

    /// Whether the session is still open (as far as this client knows).
    pub(crate) fn alive(&self) -> bool {
        self.conn.is_some()
    }

    /// Whether the session holds no lock.
    pub(crate) fn holds_none(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether the session holds `key`.
    pub(crate) fn holds(&self, key: &Key) -> bool {
        self.keys.contains_key(key)
    }

    /// An empty session the server may have ended by now for being idle: not reused.
    fn stale(&self, now: Instant) -> bool {
        let idle = self.last_ok.map(|t| now.saturating_duration_since(t));
        self.armed_ms > 0
            && self.keys.is_empty()
            && idle.is_none_or(|idle| idle >= Duration::from_millis(self.armed_ms as u64) / 2)
    }

    fn usable_for(&self, key: &Key, now: Instant) -> bool {
        self.alive()
            && !self.keys.contains_key(key)
            && self.keys.len() < PER_SESSION
            && !self.stale(now)
    }

    /// The idle timeout the session needs with its locks and one more of `ttl_ms`.
    pub(crate) fn arm_for(&self, ttl_ms: i64) -> i64 {
        let longest = self.ttls.last_key_value().map_or(ttl_ms, |(&t, _)| t);
        longest.max(ttl_ms).max(1)
    }

    /// Records that the session holds `key` with a lease of `ttl_ms`.
    pub(crate) fn hold(&mut self, key: Key, ttl_ms: i64) {
        if let Some(old) = self.keys.insert(key, ttl_ms) {
            self.forget_ttl(old);
        }
        *self.ttls.entry(ttl_ms).or_default() += 1;
    }

    /// Changes the TTL of a held `key`; `false` if the session does not hold it.
    pub(crate) fn set_ttl(&mut self, key: &Key, ttl_ms: i64) -> bool {
        let Some(held) = self.keys.get_mut(key) else {
            return false;
        };
        let old = std::mem::replace(held, ttl_ms);
        self.forget_ttl(old);
        *self.ttls.entry(ttl_ms).or_default() += 1;
        true
    }

    /// Records that the session no longer holds `key`; `false` if it did not.
    pub(crate) fn let_go(&mut self, key: &Key) -> bool {
        match self.keys.remove(key) {
            Some(old) => {
                self.forget_ttl(old);
                true
            }
            None => false,
        }
    }

    fn forget_ttl(&mut self, ttl_ms: i64) {
        if let Some(count) = self.ttls.get_mut(&ttl_ms) {
            *count -= 1;
            if *count == 0 {
                self.ttls.remove(&ttl_ms);
            }
        }
    }

    /// Runs `sql` on the session; a success restarts its idle clock. A connection error
    /// ends the session here.
    pub(crate) async fn run(&mut self, sql: &Sql, bind: &Bind<'_>) -> sqlx::Result<Option<i64>> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(sqlx::Error::PoolClosed);
        };
        let sent = Instant::now();
        match D::Db::run(On::Conn(&mut **conn), sql, bind).await {
            Ok(got) => {
                self.last_ok = Some(sent);
                Ok(got)
            }
            Err(e) => {
                if error::is_connection::<D>(&e) {
                    self.end(&e.to_string());
                }
                Err(e)
            }
        }
    }

    /// Closes the session, and every lock it holds with it.
    pub(crate) fn end(&mut self, why: &str) {
        if let Some(mut conn) = self.conn.take() {
            conn.close_on_drop();
        }
        self.ended.get_or_insert_with(|| why.to_string());
    }
}

impl<D: Dialect> Drop for Session<D> {
    fn drop(&mut self) {
        // Armed, or holding locks: never back to the pool.
        if self.armed_ms > 0 || !self.keys.is_empty() {
            self.end("closed");
        }
    }
}

/// The advisory sessions of one client.
pub(crate) struct Sessions<D: Dialect> {
    list: Mutex<Vec<Holder<D>>>,
}

impl<D: Dialect> std::fmt::Debug for Sessions<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.list.lock().map_or(0, |l| l.len());
        f.debug_struct("Sessions").field("sessions", &n).finish()
    }
}

impl<D: Dialect> Default for Sessions<D> {
    fn default() -> Self {
        Sessions {
            list: Mutex::default(),
        }
    }
}

impl<D: Dialect> Sessions<D> {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Holder<D>>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session to try `key` on: a free one of this client's that does not hold it, else
    /// a new one from the pool, else (the pool used up) the first of this client's to be
    /// free.
    pub(crate) async fn for_take(
        &self,
        pool: &Pool<D::Db>,
        key: &Key,
        max_connections: u32,
    ) -> Result<OwnedMutexGuard<Session<D>>> {
        let now = Instant::now();
        let mut wait_on = None;
        {
            let mut list = self.list();
            // Drop the ended and the stale empty ones (closed once their last lease goes).
            list.retain(|h| match h.try_lock() {
                Ok(s) => s.alive() && !s.stale(now),
                Err(_) => true,
            });
            let mut fewest = usize::MAX;
            for holder in list.iter() {
                match holder.clone().try_lock_owned() {
                    Ok(s) if s.usable_for(key, now) => return Ok(s),
                    Ok(_) => {}
                    // Busy: a candidate to wait for if the pool is used up.
                    Err(_) => {
                        if Arc::strong_count(holder) < fewest {
                            fewest = Arc::strong_count(holder);
                            wait_on = Some(holder.clone());
                        }
                    }
                }
            }
        }
        let room = pool.size() < max_connections || pool.num_idle() > 0;
        if let (false, Some(holder)) = (room, wait_on) {
            let s = holder.lock_owned().await;
            if s.usable_for(key, Instant::now()) {
                return Ok(s);
            }
        }
        self.fresh(pool).await
    }

    /// A session for a wait, which may block it for a wait slice: a spare one that holds
    /// nothing, or a new one from the pool.
    pub(crate) async fn for_wait(&self, pool: &Pool<D::Db>) -> Result<OwnedMutexGuard<Session<D>>> {
        let now = Instant::now();
        {
            let list = self.list();
            for holder in list.iter() {
                if let Ok(s) = holder.clone().try_lock_owned() {
                    if s.alive() && s.holds_none() && !s.stale(now) {
                        return Ok(s);
                    }
                }
            }
        }
        self.fresh(pool).await
    }

    async fn fresh(&self, pool: &Pool<D::Db>) -> Result<OwnedMutexGuard<Session<D>>> {
        let conn = pool.acquire().await.map_err(error::map::<D>)?;
        let holder: Holder<D> = Arc::new(tokio::sync::Mutex::new(Session::new(conn)));
        let s = holder
            .clone()
            .try_lock_owned()
            .expect("nobody else has it yet");
        self.list().push(holder);
        Ok(s)
    }

    /// A session of this client holds nothing now (it let go of its last lock, or a wait
    /// won nothing): kept as a spare unless there are enough.
    pub(crate) fn emptied(&self, session: &mut Session<D>) {
        if self.spares() >= SPARE {
            session.end("closed: spare sessions enough");
        }
    }

    /// After a connection error: the spare sessions were likely cut too (a server restart),
    /// so they are closed and the next attempt opens a new one. Sessions holding locks stay:
    /// their renewals find out.
    pub(crate) fn close_spares(&self) {
        self.list().retain(|h| match h.try_lock() {
            Ok(mut s) if s.holds_none() => {
                s.end("closed after a connection error");
                false
            }
            _ => true,
        });
    }

    fn spares(&self) -> usize {
        self.list()
            .iter()
            .filter(|h| h.try_lock().is_ok_and(|s| s.alive() && s.holds_none()))
            .count()
    }
}
