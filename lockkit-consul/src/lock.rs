//! The client and the acquire path: sessions, `PUT ?acquire=`, blocking-query waits.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lockkit_core::backend::{
    run_detached, Acquired, Admin, Armed, Attempt, Backend, Capabilities, Cleanup, Connect,
    FencingToken, LockName, LockOptions, Outcome,
};
use lockkit_core::{Error, Result};
use tokio::time::Instant;

use crate::error::BACKEND;
use crate::http::{go_duration, Http, KeyEntry, Locked, NewSession};
use crate::lease::ConsulLease;
use crate::options::{ConsulOptions, Settings};
use crate::shared::Sessions;
use crate::watcher::Watcher;

/// The shortest session TTL Consul accepts, and so the shortest lease.
pub const MIN_TTL: Duration = Duration::from_secs(10);

/// The longest session TTL Consul accepts (24 h), and so the longest lease.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// A lock service on a Consul agent (`consul://host:port/prefix?token=…&dc=…`).
///
/// The client's renewing guards of one TTL share one Consul session (TTL = the lock's TTL,
/// the configured behavior and lock-delay, and **no health checks**: not even the agent's
/// `serfHealth`, so a partitioned or failed agent does not hand the lock to someone else
/// while its holder still believes it holds it; the session ends only when its TTL lapses or
/// it is destroyed); an acquisition takes the key `<prefix>/<encoded name>` on it with one
/// `lock` transaction, and a release is one transaction (`unlock`, and a look at the line). A guard with renewal off gets a
/// session of its own. Reads are of exactly that key, except the shared session's key check
/// (one listing of the prefix every third of the TTL). The fencing token is the key's
/// `ModifyIndex` right after the acquisition: a Raft index, so it grows across releases and
/// deletions of the key.
/// A holder's value ([`Lease::set_value`](lockkit_core::backend::Lease::set_value)) is the
/// key's body, `<token> <value>`, written by the holder's session with a `check-index`
/// transaction; the body's token keeps the holder's token what it was although the write
/// moves the `ModifyIndex`. Observers ([`Admin::changed`]) block on the key.
/// Waiters queue: each enters the lock's line (`<key>/w/<session>`, held by a session of its
/// own), blocks on the entry ahead of it (the first one on the key) with Consul's blocking
/// queries, and a release hands the key to the first waiter in one transaction, so waiters
/// are served in arrival order. See the crate documentation for the details.
#[derive(Clone)]
pub struct ConsulLock {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for ConsulLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulLock")
            .field("http", &self.inner.http)
            .field("settings", &self.inner.settings)
            .finish()
    }
}

/// What a client's guards and waits share.
pub(crate) struct Inner {
    pub(crate) http: Http,
    pub(crate) settings: Settings,
    pub(crate) watcher: Arc<Watcher>,
    /// The shared sessions of the client's renewing guards, one per TTL.
    pub(crate) sessions: Sessions,
    /// Sessions of waiters whose leases were released, each with its TTL, kept for the
    /// client's next wait in a line: a contended client does not create and destroy a
    /// session per acquisition (each of which wakes every client's session watcher).
    pub(crate) spare: std::sync::Mutex<Vec<(String, Duration)>>,
    /// The keys this client lately handed to a waiter, and when.
    pub(crate) handed: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
}

/// How many released waiters' sessions a client keeps for its next waits; an unused one
/// lapses at its TTL, holding nothing.
const SPARE: usize = 8;

/// Refuses a TTL Consul would refuse for a session.
pub(crate) fn check_ttl(ttl: Duration) -> Result<()> {
    if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
        return Err(Error::InvalidOptions(format!(
            "a Consul session's TTL is 10 s to 24 h, not {ttl:?}"
        )));
    }
    Ok(())
}

/// A session made for one acquisition. Held [`Armed`] until handed to a lease, so a dropped
/// wait or a failed attempt destroys it.
pub(crate) struct Session {
    inner: Arc<Inner>,
    pub(crate) id: String,
    pub(crate) ttl: Duration,
    /// When the request that created or last renewed it was sent: Consul keeps it at least
    /// until this plus the TTL.
    pub(crate) fresh_at: Instant,
}

impl Session {
    pub(crate) async fn create(
        inner: &Arc<Inner>,
        name: &LockName,
        ttl: Duration,
    ) -> Result<Armed<Session>> {
        let label = format!("lockkit {}", name.encoded());
        let (id, sent) = inner.new_session(&label, ttl).await?;
        Ok(Armed::new(Session {
            inner: inner.clone(),
            id,
            ttl,
            fresh_at: sent,
        }))
    }

    /// A session of `ttl` for a wait in a line: a spare one the client kept (renewed first),
    /// or a new one.
    pub(crate) async fn for_line(
        inner: &Arc<Inner>,
        name: &LockName,
        ttl: Duration,
    ) -> Result<Armed<Session>> {
        while let Some(id) = inner.take_spare(ttl) {
            let mut session = Armed::new(Session {
                inner: inner.clone(),
                id,
                ttl,
                fresh_at: Instant::now(),
            });
            if session.renew().await? {
                return Ok(session);
            }
            // Lapsed: nothing to destroy.
            session.disarm();
        }
        Session::create(inner, name, ttl).await
    }

    /// Renews the session once a third of its TTL has passed since it was last renewed, so
    /// a waiter's session outlives the wait and its lease starts with most of its TTL:
    /// `false` if Consul dropped it.
    pub(crate) async fn keep(&mut self) -> Result<bool> {
        if self.fresh_at.elapsed() <= self.ttl / 3 {
            return Ok(true);
        }
        self.renew().await
    }

    /// Renews the session now: `false` if Consul dropped it.
    pub(crate) async fn renew(&mut self) -> Result<bool> {
        let sent = Instant::now();
        if !self.inner.http.renew_session(&self.id).await? {
            return Ok(false);
        }
        self.fresh_at = sent;
        Ok(true)
    }
}

impl Cleanup for Session {
    const WHAT: &'static str = "destroying an unused session";

    async fn cleanup(self) -> Result<()> {
        self.inner.http.destroy_session(&self.id).await
    }
}

/// What one acquisition request found; when busy, the session comes back for reuse (none if
/// it was invalidated right after acquiring).
type Found = Outcome<Option<Armed<Session>>>;

impl ConsulLock {
    /// Connects with default options to `consul://host[:port][/prefix]` (port 8500 by
    /// default) with the optional parameters `token=` (ACL token; never logged), `dc=`,
    /// `behavior=delete|release`, `lock_delay=` (e.g. `0`, `15s`), `connect_timeout=`,
    /// `request_timeout=` and `max_blocking_wait=`. Other parameters are rejected.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, ConsulOptions::default()).await
    }

    /// Connects with `options`: a setting made on them wins over the URL's parameter, and
    /// the URL's parameters fill in what they leave unset. Checks that the agent answers and
    /// knows a cluster leader.
    pub async fn connect_with(url: &str, options: ConsulOptions) -> Result<Self> {
        let settings = options.resolve(url)?;
        let http = Http::new(
            settings.address.clone(),
            settings.token.clone(),
            settings.datacenter.clone(),
            settings.connect_timeout,
            settings.request_timeout,
        )?;
        http.ping().await?;
        Ok(ConsulLock {
            inner: Arc::new(Inner {
                http,
                settings,
                watcher: Arc::new(Watcher::default()),
                sessions: Sessions::default(),
                spare: std::sync::Mutex::default(),
                handed: std::sync::Mutex::default(),
            }),
        })
    }

    /// The Consul KV key that holds the lock `name` (for inspection and operations).
    pub fn lock_key(&self, name: &LockName) -> String {
        self.inner.key(name)
    }

    /// The settings in use, every field set: from the options, the URL, or the defaults.
    pub fn options(&self) -> ConsulOptions {
        self.inner.settings.options()
    }
}

impl Inner {
    pub(crate) fn key(&self, name: &LockName) -> String {
        format!("{}/{}", self.settings.prefix, name.encoded())
    }

    /// Creates a session of `ttl` (no health checks, the configured behavior and
    /// lock-delay): its ID, and when the request was sent.
    pub(crate) async fn new_session(
        &self,
        label: &str,
        ttl: Duration,
    ) -> Result<(String, Instant)> {
        check_ttl(ttl)?;
        let sent = Instant::now();
        let id = self
            .http
            .create_session(&NewSession {
                name: label,
                ttl: go_duration(ttl),
                behavior: self.settings.behavior.as_str(),
                lock_delay: go_duration(self.settings.lock_delay),
            })
            .await?;
        Ok((id, sent))
    }

    fn spares(&self) -> std::sync::MutexGuard<'_, Vec<(String, Duration)>> {
        self.spare.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_spare(&self, ttl: Duration) -> Option<String> {
        let mut spare = self.spares();
        let at = spare.iter().position(|(_, t)| *t == ttl)?;
        Some(spare.swap_remove(at).0)
    }

    /// Keeps the session `id` of `ttl`, which holds nothing, for a later wait; `false` if
    /// enough are kept (the caller destroys it).
    pub(crate) fn keep_spare(&self, id: &str, ttl: Duration) -> bool {
        let mut spare = self.spares();
        if spare.len() >= SPARE {
            return false;
        }
        spare.push((id.to_string(), ttl));
        true
    }

    /// The KV prefix of every lock key.
    pub(crate) fn prefix(&self) -> String {
        self.settings.prefix.clone()
    }

    /// One acquisition request on the client's shared session of `ttl`: a single `lock`
    /// transaction, whose answer carries the fencing token. `Busy` also when this client
    /// holds the lock already (Consul would let the shared session take it twice). Runs
    /// detached: it is never cancelled half-way.
    async fn attempt_shared(self: Arc<Self>, name: LockName, ttl: Duration) -> Result<Outcome<()>> {
        // One string for the claim, the lease and the session's books.
        let key: Arc<str> = self.key(&name).into();
        if !self.sessions.claim(&key) {
            return Ok(Outcome::Busy(()));
        }
        let mut session = match self.shared_session(&name, ttl).await {
            Ok(session) => session,
            Err(e) => {
                self.sessions.unclaim(&key);
                return Err(e);
            }
        };
        for _ in 0..3 {
            match self.http.lock_key(&key, &session.id).await {
                Ok(Locked::Taken(taken)) => {
                    let token = FencingToken(taken.token);
                    let valid_until = session.until()?;
                    let lease = ConsulLease::shared(self.clone(), name, key, session, taken);
                    return Ok(Outcome::Won(Acquired::new(
                        token,
                        valid_until,
                        Box::new(lease),
                    )));
                }
                Ok(Locked::Busy) => break,
                Ok(Locked::InvalidSession) => {
                    self.sessions.drop_session(&session);
                    session = match self.shared_session(&name, ttl).await {
                        Ok(session) => session,
                        Err(e) => {
                            self.sessions.unclaim(&key);
                            return Err(e);
                        }
                    };
                }
                Err(e) => {
                    // Unknown whether the key was taken: let it go before taking it again.
                    drop(self.let_go(key, session));
                    return Err(e);
                }
            }
        }
        self.sessions.unclaim(&key);
        Ok(Outcome::Busy(()))
    }

    /// One acquisition request with `session` (a new one if `None`). Runs detached: it is
    /// never cancelled half-way.
    async fn attempt(
        self: Arc<Self>,
        name: LockName,
        ttl: Duration,
        session: Option<Armed<Session>>,
    ) -> Result<Found> {
        let key = self.key(&name);
        let session = match session {
            Some(session) => session,
            None => Session::create(&self, &name, ttl).await?,
        };
        // On an error the session is dropped, and destroyed: whatever an ambiguous acquire
        // may have taken is let go with it.
        if !self.http.put_key(&key, &session.id, "").await? {
            return Ok(Outcome::Busy(Some(session)));
        }
        let (entry, _) = self.http.read_key(&key, None, Duration::ZERO).await?;
        match entry {
            Some(entry) if entry.session.as_deref() == Some(session.id.as_str()) => {
                let taken = entry.acquisition();
                let token = FencingToken(taken.token);
                let valid_until = lease_end(session.fresh_at, session.ttl)?;
                let lease = ConsulLease::new(self.clone(), name, key, session.disarm(), taken);
                Ok(Outcome::Won(Acquired::new(
                    token,
                    valid_until,
                    Box::new(lease),
                )))
            }
            // Invalidated right after the acquisition: not ours after all.
            _ => Ok(Outcome::Busy(None)),
        }
    }
}

/// When a lease of `ttl` counted from `from` ends; an error, not a panic, if that is past
/// what an `Instant` can hold.
pub(crate) fn lease_end(from: Instant, ttl: Duration) -> Result<Instant> {
    from.checked_add(ttl)
        .ok_or_else(|| Error::InvalidOptions(format!("a lease of {ttl:?} ends too far ahead")))
}

/// Whether a key entry is free to take.
fn free(entry: &Option<KeyEntry>) -> bool {
    entry.as_ref().is_none_or(|e| e.session.is_none())
}

#[async_trait]
impl Backend for ConsulLock {
    fn name(&self) -> &'static str {
        BACKEND
    }

    /// Fencing, lease expiry and renewal; TTLs from 10 s to 24 h. Consul may take up to
    /// twice a session's TTL to invalidate it, so the expiry slack is the TTL itself; the
    /// value reported is the slack of the shortest TTL.
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(MIN_TTL)
            .fencing(true)
            .fifo(true)
            .lease_expiry(true)
            .renewal(true)
            .networked(true)
            .max_ttl(MAX_TTL)
            .expiry_slack(MIN_TTL)
            .admin(true, true, true)
            .election(true)
            .watch(true)
    }

    fn admin(&self) -> Option<&dyn Admin> {
        Some(self)
    }

    async fn try_lock(&self, name: &LockName, opts: &LockOptions) -> Result<Option<Acquired>> {
        if opts.auto_renew {
            let attempt = self.inner.clone().attempt_shared(name.clone(), opts.ttl);
            return Ok(run_detached(attempt).await?.into_acquired());
        }
        let key = self.inner.key(name);
        let (entry, _) = self.inner.http.read_key(&key, None, Duration::ZERO).await?;
        if !free(&entry) {
            return Ok(None);
        }
        let attempt = self.inner.clone().attempt(name.clone(), opts.ttl, None);
        Ok(run_detached(attempt).await?.into_acquired())
    }

    async fn lock(
        &self,
        name: &LockName,
        opts: &LockOptions,
        deadline: Option<Instant>,
    ) -> Result<Acquired> {
        // Just handed to a waiter by this client: surely held, so straight into the line.
        if self.inner.handed_off_recently(&self.inner.key(name)) {
            let session = Session::for_line(&self.inner, name, opts.ttl).await?;
            return self.inner.wait_in_line(name, opts, session, deadline).await;
        }
        if opts.auto_renew {
            let attempt = self.inner.clone().attempt_shared(name.clone(), opts.ttl);
            if let Outcome::Won(acquired) = run_detached(attempt).await? {
                return Ok(acquired);
            }
            let session = Session::for_line(&self.inner, name, opts.ttl).await?;
            return self.inner.wait_in_line(name, opts, session, deadline).await;
        }
        let attempt = self.inner.clone().attempt(name.clone(), opts.ttl, None);
        let session = match run_detached(attempt).await? {
            Outcome::Won(acquired) => return Ok(acquired),
            Outcome::Busy(Some(session)) => session,
            Outcome::Busy(None) => Session::for_line(&self.inner, name, opts.ttl).await?,
        };
        self.inner.wait_in_line(name, opts, session, deadline).await
    }
}

impl Connect for ConsulLock {
    const SCHEMES: &'static [&'static str] = &["consul"];

    async fn connect(url: &str) -> Result<Self> {
        ConsulLock::connect(url).await
    }
}
