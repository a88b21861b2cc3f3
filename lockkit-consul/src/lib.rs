#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod http;
mod url;
mod watcher;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lockkit_core::backend::{
    run_detached, Acquired, Attempt, Backend, Capabilities, Connect, FencingToken, Lease, LockName,
    LockOptions,
};
use lockkit_core::{Error, LostReason, Result};
use rs_consul::types::{CreateOrUpdateKeyRequest, ReadKeyRequest, ReadKeyResponse};
use rs_consul::ConsulError;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::http::{go_duration, Http, NewSession, BACKEND};
use crate::watcher::Watcher;

/// The shortest session TTL Consul accepts, and so the shortest lease.
pub const MIN_TTL: Duration = Duration::from_secs(10);

/// The longest session TTL Consul accepts (24 h), and so the longest lease.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// What Consul does with a held key when the session holding it is invalidated (TTL
/// expired, destroyed, node failed). An explicit release always only releases the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Behavior {
    /// Delete the key (the default): nothing is left behind by a crashed holder.
    Delete,
    /// Release the key and keep it (Consul's own default).
    Release,
}

impl Behavior {
    fn as_str(self) -> &'static str {
        match self {
            Behavior::Delete => "delete",
            Behavior::Release => "release",
        }
    }
}

/// Tuning of the Consul backend. URL parameters override the matching fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsulOptions {
    /// KV prefix of every lock key (the URL's path). Default `lockkit`.
    pub prefix: String,
    /// Datacenter to use (URL `dc=`). Default: the agent's.
    pub datacenter: Option<String>,
    /// The sessions' invalidation behavior (URL `behavior=delete|release`). Default
    /// [`Behavior::Delete`].
    pub behavior: Behavior,
    /// The sessions' lock-delay (URL `lock_delay=`, e.g. `15s`): after a session holding a
    /// lock is *invalidated* (not after an explicit release), Consul refuses to hand that
    /// lock to anyone for this long. Default 0 here; note that Consul's own default is 15 s.
    pub lock_delay: Duration,
    /// Timeout of each TCP connection attempt. Default 2 s.
    pub connect_timeout: Duration,
    /// Timeout of each request that is not a blocking query. Default 5 s.
    pub request_timeout: Duration,
    /// Longest wait of one blocking query while waiting for a lock. Waits end earlier at the
    /// caller's deadline; shorter values re-check more often. Default 5 s.
    pub max_blocking_wait: Duration,
}

impl Default for ConsulOptions {
    fn default() -> Self {
        ConsulOptions {
            prefix: "lockkit".into(),
            datacenter: None,
            behavior: Behavior::Delete,
            lock_delay: Duration::ZERO,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            max_blocking_wait: Duration::from_secs(5),
        }
    }
}

/// A lock service on a Consul agent (`consul://host:port/prefix?token=…&dc=…`).
///
/// Every acquisition creates its own Consul session (TTL = the lock's TTL, the configured
/// behavior and lock-delay) and takes the key `<prefix>/<encoded name>` with
/// `PUT ?acquire=<session>`. The fencing token is the key's `ModifyIndex` right after the
/// acquisition: a Raft index, so it grows across releases and deletions of the key.
/// Waiters block on the key with Consul's blocking queries and try again when its session
/// clears. Renewal renews the session; release releases the key and destroys the session.
/// See the crate documentation for the details.
#[derive(Clone)]
pub struct ConsulLock {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ConsulLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulLock")
            .field("http", &self.inner.http)
            .field("options", &self.inner.options)
            .finish()
    }
}

struct Inner {
    http: Http,
    options: ConsulOptions,
    watcher: Arc<Watcher>,
}

/// A session made for one acquisition, destroyed when dropped unless handed to a lease.
struct Session {
    inner: Arc<Inner>,
    id: String,
    ttl: Duration,
    /// When the request that created or last renewed it was sent: Consul keeps it at least
    /// until this plus the TTL.
    fresh_at: Instant,
    armed: bool,
}

impl Session {
    async fn create(inner: &Arc<Inner>, name: &LockName, ttl: Duration) -> Result<Session> {
        let sent = Instant::now();
        let label = format!("lockkit {}", name.encoded());
        let id = inner
            .http
            .create_session(&NewSession {
                name: &label,
                ttl: go_duration(ttl),
                behavior: inner.options.behavior.as_str(),
                lock_delay: go_duration(inner.options.lock_delay),
            })
            .await?;
        Ok(Session {
            inner: inner.clone(),
            id,
            ttl,
            fresh_at: sent,
            armed: true,
        })
    }

    /// Hands the session over: it is no longer destroyed on drop.
    fn disarm(mut self) -> String {
        self.armed = false;
        std::mem::take(&mut self.id)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (inner, id) = (self.inner.clone(), std::mem::take(&mut self.id));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = inner.http.destroy_session(&id).await {
                    tracing::debug!(error = %e, "destroying an unused session");
                }
            });
        }
    }
}

/// What one acquisition request found.
enum Outcome {
    Won(Acquired),
    /// Held elsewhere (or refused during a lock-delay); the session comes back for reuse.
    Busy(Option<Session>),
}

impl Attempt for Outcome {
    fn into_acquired(self) -> Option<Acquired> {
        match self {
            Outcome::Won(acquired) => Some(acquired),
            Outcome::Busy(_) => None,
        }
    }
}

impl ConsulLock {
    /// Connects with default options to `consul://host[:port][/prefix]` (port 8500 by
    /// default) with the optional parameters `token=` (ACL token; never logged), `dc=`,
    /// `behavior=delete|release` and `lock_delay=` (e.g. `0`, `15s`).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, ConsulOptions::default()).await
    }

    /// Connects with `options`; URL parameters override them. Checks that the agent answers
    /// and knows a cluster leader.
    pub async fn connect_with(url: &str, mut options: ConsulOptions) -> Result<Self> {
        let parsed = url::parse(url, &mut options)?;
        if options.lock_delay > Duration::from_secs(60) {
            return Err(Error::InvalidOptions(
                "Consul's lock-delay is at most 60 s".into(),
            ));
        }
        let http = Http::new(
            parsed.address,
            parsed.token,
            options.datacenter.clone(),
            options.connect_timeout,
            options.request_timeout,
        )?;
        http.ping().await?;
        Ok(ConsulLock {
            inner: Arc::new(Inner {
                http,
                options,
                watcher: Arc::new(Watcher::default()),
            }),
        })
    }

    /// The Consul KV key that holds the lock `name` (for inspection and operations).
    pub fn lock_key(&self, name: &LockName) -> String {
        self.inner.key(name)
    }

    /// The options in use (after the URL's parameters).
    pub fn options(&self) -> &ConsulOptions {
        &self.inner.options
    }
}

impl Inner {
    fn key(&self, name: &LockName) -> String {
        format!("{}/{}", self.options.prefix, name.encoded())
    }

    /// The key as it goes into a URL path: the encoding's `%` must itself be escaped.
    fn key_path(&self, name: &LockName) -> String {
        self.key(name).replace('%', "%25")
    }

    /// Reads the key, blocking until it changes after `index` (at most `wait`) when given:
    /// the entry if the key exists, and the index to block on next.
    async fn read(
        &self,
        path: &str,
        index: Option<u64>,
        wait: Duration,
    ) -> Result<(Option<ReadKeyResponse>, Option<u64>)> {
        let request = ReadKeyRequest::builder()
            .key(path)
            .datacenter(self.http.dc())
            .maybe_index(index)
            .wait(wait)
            .build();
        let read = self.http.consul.read_key(request);
        let result = match index {
            None => self.http.short(async { Ok(read.await) }).await?,
            Some(_) => {
                let limit = wait + wait / 16 + self.http.timeout();
                tokio::time::timeout(limit, read).await.map_err(|_| {
                    Error::connection(BACKEND, "no answer to a blocking query on a lock key")
                })?
            }
        };
        match result {
            Ok(meta) => Ok((meta.response.into_iter().next(), Some(meta.index))),
            Err(ConsulError::UnexpectedResponseCode(hyper::StatusCode::NOT_FOUND, _)) => {
                Ok((None, None))
            }
            Err(e) => Err(self.http.map("read lock key", e)),
        }
    }

    /// `PUT ?acquire=` or `?release=` through rs-consul: whether Consul did it.
    async fn put(&self, path: &str, acquire: &str, release: &str) -> Result<bool> {
        let request = CreateOrUpdateKeyRequest::builder()
            .key(path)
            .datacenter(self.http.dc())
            .acquire(acquire)
            .release(release)
            .build();
        let put = self.http.consul.create_or_update_key(request, Vec::new());
        let result = self.http.short(async { Ok(put.await) }).await?;
        match result {
            Ok((done, _)) => Ok(done),
            Err(e) => Err(self.http.map(
                if acquire.is_empty() {
                    "release"
                } else {
                    "acquire"
                },
                e,
            )),
        }
    }

    /// One acquisition request with `session` (a new one if `None`). Runs detached: it is
    /// never cancelled half-way.
    async fn attempt(
        self: Arc<Self>,
        name: LockName,
        ttl: Duration,
        session: Option<Session>,
    ) -> Result<Outcome> {
        let path = self.key_path(&name);
        let session = match session {
            Some(session) => session,
            None => Session::create(&self, &name, ttl).await?,
        };
        // On an error the session is dropped, and destroyed: whatever an ambiguous acquire
        // may have taken is let go with it.
        if !self.put(&path, &session.id, "").await? {
            return Ok(Outcome::Busy(Some(session)));
        }
        let (entry, _) = self.read(&path, None, Duration::ZERO).await?;
        let entry = match entry {
            Some(entry) if entry.session.as_deref() == Some(session.id.as_str()) => entry,
            // Invalidated right after the acquisition: not ours after all.
            _ => return Ok(Outcome::Busy(None)),
        };
        let token = FencingToken(entry.modify_index.max(0) as u64);
        let valid_until = session.fresh_at + session.ttl;
        let lease = ConsulLease::new(self.clone(), name, path, session, token);
        Ok(Outcome::Won(Acquired::new(
            token,
            valid_until,
            Box::new(lease),
        )))
    }
}

/// Whether a key entry is free to take.
fn free(entry: &Option<ReadKeyResponse>) -> bool {
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
            .lease_expiry(true)
            .renewal(true)
            .networked(true)
            .max_ttl(MAX_TTL)
            .expiry_slack(MIN_TTL)
    }

    async fn try_lock(&self, name: &LockName, opts: &LockOptions) -> Result<Option<Acquired>> {
        let path = self.inner.key_path(name);
        let (entry, _) = self.inner.read(&path, None, Duration::ZERO).await?;
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
        let inner = &self.inner;
        let path = inner.key_path(name);
        let max_wait = inner.options.max_blocking_wait.max(Duration::from_secs(1));
        let mut index = None;
        // A session kept across attempts of this wait (destroyed if the wait is dropped).
        let mut session: Option<Session> = None;
        let mut refused = 0u32;
        loop {
            let wait = deadline.map_or(max_wait, |d| {
                d.saturating_duration_since(Instant::now())
                    .clamp(Duration::from_secs(1), max_wait)
            });
            let (entry, next) = inner.read(&path, index, wait).await?;
            if !free(&entry) {
                index = next;
                continue;
            }
            // Free: take it. A kept session that is getting old is renewed first (or
            // replaced if Consul dropped it), so the lease starts with most of its TTL.
            if let Some(mut kept) = session.take() {
                if kept.fresh_at.elapsed() > kept.ttl / 3 {
                    let sent = Instant::now();
                    if inner.http.renew_session(&kept.id).await? {
                        kept.fresh_at = sent;
                        session = Some(kept);
                    } else {
                        kept.armed = false;
                    }
                } else {
                    session = Some(kept);
                }
            }
            let attempt = inner
                .clone()
                .attempt(name.clone(), opts.ttl, session.take());
            match run_detached(attempt).await? {
                Outcome::Won(acquired) => return Ok(acquired),
                Outcome::Busy(back) => session = back,
            }
            // Someone else got it: block on the key again. If the key looked free yet the
            // acquisition was refused twice in a row (a lock-delay), pause before retrying.
            refused += 1;
            if refused > 1 {
                let pause = Duration::from_millis(25 * u64::from(refused.min(40)));
                tokio::time::sleep(pause).await;
            }
            index = None;
            let (entry, next) = inner.read(&path, None, Duration::ZERO).await?;
            if !free(&entry) {
                refused = 0;
                index = next;
            }
        }
    }
}

/// The state of a lease shared with the client's session watcher and the sustainer.
#[derive(Debug)]
pub(crate) struct LeaseState {
    lost: watch::Sender<Option<LostReason>>,
    /// Until when the holder asked the lease to last (the latest `extend`).
    hold_until: Mutex<Instant>,
    sustainer: Mutex<Option<JoinHandle<()>>>,
}

impl LeaseState {
    /// Marks the lease lost, once.
    pub(crate) fn mark_lost(&self, reason: LostReason) {
        self.lost.send_if_modified(|slot| {
            if slot.is_none() {
                *slot = Some(reason);
                true
            } else {
                false
            }
        });
    }

    fn is_lost(&self) -> bool {
        self.lost.borrow().is_some()
    }
}

/// A held lock: the key and the session that holds it.
struct ConsulLease {
    inner: Arc<Inner>,
    name: LockName,
    path: String,
    session: String,
    session_ttl: Duration,
    state: Arc<LeaseState>,
}

impl std::fmt::Debug for ConsulLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulLease")
            .field("key", &self.inner.key(&self.name))
            .field("session", &self.session)
            .field("session_ttl", &self.session_ttl)
            .finish_non_exhaustive()
    }
}

impl ConsulLease {
    fn new(
        inner: Arc<Inner>,
        name: LockName,
        path: String,
        session: Session,
        token: FencingToken,
    ) -> Self {
        let (lost, _) = watch::channel(None);
        let state = Arc::new(LeaseState {
            lost,
            hold_until: Mutex::new(session.fresh_at + session.ttl),
            sustainer: Mutex::new(None),
        });
        let session_ttl = session.ttl;
        let id = session.disarm();
        Watcher::register(&inner.watcher, &inner, &id, token.get(), &state);
        ConsulLease {
            inner,
            name,
            path,
            session: id,
            session_ttl,
            state,
        }
    }

    fn lost_error(&self, reason: LostReason) -> Error {
        self.state.mark_lost(reason.clone());
        Error::lost(self.name.as_str(), reason)
    }

    /// Stops the background renewals of an extended lease, if any run.
    fn stop_sustainer(&self) {
        let task = self
            .state
            .sustainer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            task.abort();
        }
    }

    /// Keeps renewing the session until `hold_until` is covered, for leases extended past
    /// the session's own TTL (which Consul fixes at creation).
    fn sustain(&self) {
        let mut slot = self
            .state
            .sustainer
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let (inner, state) = (self.inner.clone(), self.state.clone());
        let (id, ttl) = (self.session.clone(), self.session_ttl);
        *slot = Some(tokio::spawn(async move {
            // The renewal that armed this task was sent at most a moment ago.
            let mut covered = Instant::now() + ttl - Duration::from_millis(1);
            let mut last = Instant::now();
            loop {
                let hold_until = *state.hold_until.lock().unwrap_or_else(|e| e.into_inner());
                if covered >= hold_until || state.is_lost() {
                    return;
                }
                let next = (last + ttl / 3).min(covered);
                tokio::time::sleep_until(next).await;
                let sent = Instant::now();
                match inner.http.renew_session(&id).await {
                    Ok(true) => {
                        covered = sent + ttl;
                        last = sent;
                    }
                    Ok(false) => {
                        state.mark_lost(LostReason::NotOwner);
                        return;
                    }
                    Err(e) if Instant::now() >= covered => {
                        state.mark_lost(LostReason::RenewalFailed(e.to_string()));
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "session renewal failed, retrying");
                        last = Instant::now() - ttl / 3 + Duration::from_millis(500);
                    }
                }
            }
        }));
    }
}

#[async_trait]
impl Lease for ConsulLease {
    /// Renews the session and checks the key is still held by it. The session's TTL is
    /// fixed when it is created; a longer `ttl` is honored by renewing the session in the
    /// background until `ttl` from now has passed (then it lapses unless extended again).
    async fn extend(&self, ttl: Duration) -> Result<Instant> {
        let sent = Instant::now();
        if !self.inner.http.renew_session(&self.session).await? {
            return Err(self.lost_error(LostReason::NotOwner));
        }
        let (entry, _) = self.inner.read(&self.path, None, Duration::ZERO).await?;
        if entry.and_then(|e| e.session).as_deref() != Some(self.session.as_str()) {
            return Err(self.lost_error(LostReason::NotOwner));
        }
        let until = sent + ttl.max(self.session_ttl);
        *self
            .state
            .hold_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = until;
        if ttl > self.session_ttl {
            self.sustain();
        }
        Ok(until)
    }

    /// Releases the key (only if this session holds it), then destroys the session.
    async fn release(&self) -> Result<()> {
        self.stop_sustainer();
        let released = self.inner.put(&self.path, "", &self.session).await;
        let destroyed = self.inner.http.destroy_session(&self.session).await;
        self.inner.watcher.deregister(&self.session);
        match (released?, destroyed) {
            (false, _) => Err(self.lost_error(LostReason::NotOwner)),
            (true, Ok(())) => Ok(()),
            // Released: the session lapses on its own at its TTL, holding nothing.
            (true, Err(e)) => {
                tracing::debug!(error = %e, "destroying a released session");
                Ok(())
            }
        }
    }

    async fn lost(&self) -> LostReason {
        let mut rx = self.state.lost.subscribe();
        let reason = rx.wait_for(Option::is_some).await.map(|r| r.clone());
        match reason {
            Ok(Some(reason)) => reason,
            // The lease itself holds the sender, so this does not happen.
            _ => std::future::pending().await,
        }
    }
}

impl Drop for ConsulLease {
    fn drop(&mut self) {
        self.stop_sustainer();
        self.inner.watcher.deregister(&self.session);
    }
}

impl Connect for ConsulLock {
    const SCHEMES: &'static [&'static str] = &["consul"];

    async fn connect(url: &str) -> Result<Self> {
        ConsulLock::connect(url).await
    }
}
