//! The etcd backend and its acquire path: a key per acquisition in create-revision order,
//! waiting on the deletion of the key just before ours.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse, WatchFilterType, WatchOptions,
};
use lockkit_core::backend::{
    run_detached, spawn_cleanup, Acquired, Admin, Armed, Attempt, Backend, Capabilities, Cleanup,
    Connect, FencingToken, LockName, LockOptions,
};
use lockkit_core::{Error, LostReason, Result};
use tokio::time::Instant;

use crate::error::{lease_not_found, map_err, never_sent, BACKEND};
use crate::group::{Group, Groups};
use crate::lease::{secs, ttl_secs, EtcdLease, Granted, KeyNames};
use crate::options::EtcdOptions;

/// The shortest lease etcd grants with its default election timeout (1 s) is 1.5 s, which it
/// rounds up to 2 s: a shorter TTL would silently become 2 s.
const MIN_TTL: Duration = Duration::from_secs(2);

/// etcd checks for expired leases every 500 ms, then revokes them through Raft.
const EXPIRY_SLACK: Duration = Duration::from_secs(1);

/// HTTP/2 pings find dead connections. etcd refuses pings more often than every 5 s
/// (`--grpc-keepalive-min-time`) and pings on connections without streams.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// A lock service on an etcd cluster (v3 API), `etcd://h1:2379,h2:2379`.
///
/// Each acquisition creates the key `<prefix><encoded name>/<n>/<lease id in hex>` bound to
/// the client's shared lease of the lock's TTL (one lease and one keep-alive stream for all
/// the client's renewing guards of that TTL; a guard with renewal off gets a lease of its
/// own). The key with the lowest create
/// revision under the name holds the lock; the others wait in create-revision order, each
/// watching only the deletion of the key just before its own. The holder's create revision
/// is its fencing token. See the crate documentation for renewal, TTL changes and
/// cancellation.
#[derive(Debug, Clone)]
pub struct EtcdLock {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) client: Client,
    pub(crate) options: EtcdOptions,
    pub(crate) endpoints: Vec<String>,
    /// The shared leases of the client's renewing guards, one per TTL.
    pub(crate) groups: Groups,
    /// The names of the client's keys that may exist, for reuse once gone.
    pub(crate) names: KeyNames,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("endpoints", &self.endpoints)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// A key just created in a lock's queue.
struct Entry {
    lease: EtcdLease,
    /// The key's create revision: the fencing token if it gets the lock.
    token: i64,
    /// Until when its lease is known valid.
    valid_until: Instant,
    /// Its lease's granted TTL in seconds.
    granted: i64,
    /// On the client's shared lease (else on one of its own).
    shared: bool,
    /// The lock's key prefix: its queue.
    dir: String,
    /// The key just before it, `None` if it holds the lock.
    predecessor: Option<Vec<u8>>,
}

impl Entry {
    /// Hands the key over as the lock's lease, valid until `valid_until`.
    fn grant(self, valid_until: Instant) -> Acquired {
        let token = FencingToken(self.token.max(0) as u64);
        Acquired::new(token, valid_until, Box::new(self.lease))
    }
}

/// An [`Entry`] holds a place in the queue whether or not it holds the lock: if nobody is left
/// to take it, it must be released all the same, so both are handed over as an acquisition
/// (whose release deletes the key and revokes the lease).
impl Attempt for Entry {
    fn into_acquired(self) -> Option<Acquired> {
        let valid_until = self.valid_until;
        Some(self.grant(valid_until))
    }
}

/// A waiting key is deleted (its lease revoked) in the background if the wait is dropped.
impl Cleanup for Entry {
    const WHAT: &'static str = "leaving the queue";

    async fn cleanup(self) -> Result<()> {
        tracing::debug!(key = self.lease.key(), "leaving the queue");
        self.lease.withdraw().await
    }
}

impl EtcdLock {
    /// Connects with default options to `etcd://[user:password@]host:port[,host:port…]`, or
    /// `etcds://…` (TLS, cargo feature `tls`; `?ca=/path/ca.pem` adds a CA to trust). A
    /// `prefix=` query parameter sets the key prefix; a host without a port means port 2379.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, EtcdOptions::default()).await
    }

    /// Connects with `options`. What `options` sets wins over the URL's parameters: a
    /// `prefix=` or `ca=` in the URL applies only if `options.prefix` or `options.ca` is
    /// `None`. The cluster must answer now: an unreachable cluster is an
    /// [`Error::Connection`] within the connect timeout.
    pub async fn connect_with(url: &str, mut options: EtcdOptions) -> Result<Self> {
        let parsed = options.apply_url(url)?;
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_keep_alive(PING_INTERVAL, PING_TIMEOUT)
            .with_keep_alive_while_idle(false);
        if let Some((user, password)) = parsed.user {
            connect = connect
                .with_user(user, password)
                .with_auto_token_refresh(true);
        }
        if parsed.tls {
            connect = tls(connect, options.ca.as_deref())?;
        }
        let endpoints = parsed.endpoints;
        let limit = options.connect_timeout;
        let silent = Error::connection(
            BACKEND,
            format!("{}: no answer within {limit:?}", endpoints.join(",")),
        );
        // With credentials, connecting authenticates; without, it only sets up the channel.
        let client = tokio::time::timeout(limit, Client::connect(&endpoints, Some(connect)))
            .await
            .map_err(|_| silent)?
            .map_err(map_err)?;
        let inner = Arc::new(Inner {
            client,
            options,
            endpoints,
            groups: Groups::default(),
            names: KeyNames::default(),
        });
        let status = || {
            let mut maintenance = inner.client.maintenance_client();
            async move { maintenance.status().await }
        };
        // The timeout's error names the endpoints, the URL's hosts.
        let status = inner.within("status", limit, status).await.map_err(|_| {
            Error::connection(
                BACKEND,
                format!("{}: no answer within {limit:?}", inner.endpoints.join(",")),
            )
        })?;
        let status = status.map_err(map_err)?;
        tracing::debug!(version = status.version(), endpoints = ?inner.endpoints, "connected");
        Ok(EtcdLock { inner })
    }

    /// The key prefix of the lock `name` (for inspection and operations). The keys under it
    /// are the holder (the lowest create revision) and the waiters, each named
    /// `<n>/<hex id of the lease it was created on>` (`n` numbers the creating client's
    /// keys of that lock and lease; a number is used again once its key is gone).
    pub fn key_prefix(&self, name: &LockName) -> String {
        self.inner.dir(name)
    }
}

#[cfg(feature = "tls")]
fn tls(connect: ConnectOptions, ca: Option<&std::path::Path>) -> Result<ConnectOptions> {
    let mut tls = etcd_client::TlsOptions::new().with_webpki_roots();
    if let Some(path) = ca {
        let pem = std::fs::read(path).map_err(|e| {
            Error::InvalidOptions(format!("cannot read the CA file {}: {e}", path.display()))
        })?;
        tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
    }
    Ok(connect.with_tls(tls))
}

#[cfg(not(feature = "tls"))]
fn tls(_: ConnectOptions, _: Option<&std::path::Path>) -> Result<ConnectOptions> {
    Err(Error::Unsupported(
        "etcds:// URLs need the cargo feature `tls` of lockkit-etcd".into(),
    ))
}

impl Inner {
    /// The key prefix of one lock name: its queue.
    pub(crate) fn dir(&self, name: &LockName) -> String {
        format!("{}{}/", self.options.key_prefix(), name.encoded())
    }

    /// Creates our key on a lease of `ttl` (the client's shared lease of that TTL if
    /// `shared`, else one of its own), reading who is before us in the same transaction.
    async fn enqueue(
        self: Arc<Self>,
        name: LockName,
        ttl: Duration,
        shared: bool,
    ) -> Result<Entry> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.clone().enqueue_on(name.clone(), ttl, shared).await {
                Err((e, Some(group))) if attempt < 3 && !e.is_retryable() => {
                    // A shared lease that etcd no longer knows (revoked, expired) before its
                    // keeper noticed: found out now, and the next attempt uses a new one.
                    match group.keep_alive(&self).await {
                        Err(lost) if lost.is_lost() => continue,
                        _ => return Err(e),
                    }
                }
                other => return other.map_err(|(e, _)| e),
            }
        }
    }

    /// One attempt of [`Inner::enqueue`]; a failure of the transaction on a shared lease
    /// comes with that lease.
    async fn enqueue_on(
        self: Arc<Self>,
        name: LockName,
        ttl: Duration,
        shared: bool,
    ) -> std::result::Result<Entry, (Error, Option<Arc<Group>>)> {
        let started = Instant::now();
        let asked = ttl_secs(ttl);
        let dir = self.dir(&name);
        let mut joined = None;
        for _ in 0..3 {
            let group = match shared {
                true => self.shared_group(asked).await,
                false => self.own_group(asked).await,
            };
            let group = group.map_err(|e| (e, None))?;
            if let Some(lease) = EtcdLease::join(self.clone(), name.clone(), &dir, group) {
                joined = Some(lease);
                break;
            }
        }
        let Some(lease) = joined else {
            let e = Error::connection(BACKEND, "the shared lease kept vanishing");
            return Err((e, None));
        };
        let group = lease.group().await;
        let granted = group.granted;
        // A shared lease is granted on if it is known valid for half its TTL yet.
        let valid_until = match shared {
            true => match group.fresh(&self, secs(granted) / 2).await {
                Ok(until) => until,
                Err(e) => {
                    let _ = lease.withdraw().await;
                    return Err((e, None));
                }
            },
            false => started + secs(granted),
        };
        let key = lease.key().to_string();
        // Ours is the newest key: sorted by create revision downwards, the first two keys
        // are ours and our predecessor.
        let queue = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(2)
            .with_keys_only();
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(
                    key.as_str(),
                    name.as_str(),
                    Some(PutOptions::new().with_lease(group.id)),
                ),
                TxnOp::get(dir.as_str(), Some(queue)),
            ]);
        let answer = match self.txn(txn).await {
            Ok(answer) if answer.succeeded() => answer,
            other => {
                // The key may exist (a lost reply): deleting it (or revoking its own lease)
                // removes it.
                let _ = lease.withdraw().await;
                let e = other
                    .err()
                    .unwrap_or_else(|| Error::backend(BACKEND, format!("the key {key} existed")));
                return Err((e, shared.then_some(group)));
            }
        };
        let kvs = match answer.op_responses().into_iter().nth(1) {
            Some(TxnOpResponse::Get(get)) => get.kvs().to_vec(),
            _ => Vec::new(),
        };
        let ours = kvs.first().filter(|kv| kv.key() == key.as_bytes());
        lease
            .created(ours.map_or(0, |kv| kv.create_revision()))
            .await;
        let Some(ours) = ours else {
            let _ = lease.withdraw().await;
            let e = Error::backend(
                BACKEND,
                "the key just created is not the newest of its lock",
            );
            return Err((e, None));
        };
        Ok(Entry {
            token: ours.create_revision(),
            valid_until,
            granted,
            shared,
            predecessor: kvs.get(1).map(|kv| kv.key().to_vec()),
            dir,
            lease,
        })
    }

    /// Waits until `entry` is the oldest key. `Ok(None)` when its key or lease vanished
    /// while waiting (expired: the process was paused, or deleted from outside). A broken
    /// connection or a restarting server does not end the wait: it re-establishes the
    /// watch (the caller's deadline bounds it).
    async fn wait_turn(&self, entry: &Entry) -> Result<Option<Instant>> {
        let lease = &entry.lease;
        let mut predecessor = entry.predecessor.clone();
        let mut backoff = Duration::from_millis(50);
        loop {
            let Some(before) = predecessor.clone() else {
                // First in line: granted on a lease known valid for half its TTL yet.
                return lease.ready().await;
            };
            match self.wait_deleted(entry, &before).await {
                Ok(Some(next)) => {
                    predecessor = next;
                    backoff = Duration::from_millis(50);
                }
                Ok(None) => return Ok(None),
                Err(e) if e.is_retryable() => {
                    tracing::debug!(error = %e, ?backoff, "waiting for the lock: retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = lease.gone() => return Ok(None),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until the key `before` is deleted and returns the key before ours then (`None`
    /// inside: we are first). `Ok(None)` if our own key is gone.
    ///
    /// The watch starts at the current revision (a synced watcher, whose events etcd sends at
    /// once; a watch from a past revision waits for etcd's unsynced-watcher loop, every
    /// 100 ms), and only once etcd confirms it is the predecessor read again: a deletion
    /// before the watch started is seen by that read, one after it by the watch.
    async fn wait_deleted(&self, entry: &Entry, before: &[u8]) -> Result<Option<Option<Vec<u8>>>> {
        let lease = &entry.lease;
        let options = WatchOptions::new().with_filters([WatchFilterType::NoPut]);
        let open = || {
            let mut client = self.client.watch_client();
            let (before, options) = (before.to_vec(), options.clone());
            async move { client.watch(before, Some(options)).await }
        };
        let mut watch = self.call("watch", open).await?;
        let timeout = self.options.request_timeout;
        let closed = || Error::connection(BACKEND, "the watch stream closed");
        loop {
            match tokio::time::timeout(timeout, watch.message()).await {
                Ok(Ok(Some(m))) if m.created() => break,
                Ok(Ok(Some(m))) if m.canceled() => {
                    return Err(Error::backend(
                        BACKEND,
                        format!("watch refused: {}", m.cancel_reason()),
                    ))
                }
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => return Err(closed()),
                Ok(Err(e)) => return Err(map_err(e)),
                Err(_) => {
                    return Err(Error::connection(
                        BACKEND,
                        format!("watch: not created within {timeout:?}"),
                    ))
                }
            }
        }
        match self.predecessor(entry).await? {
            None => return Ok(None),
            Some(now) if now.as_deref() != Some(before) => return Ok(Some(now)),
            Some(_) => {}
        }
        // A key's own lease is kept alive by the wait itself.
        let every = secs(entry.granted) / 3;
        let mut valid_until = entry.lease.group().await.until();
        let mut renew_at = Instant::now() + every;
        loop {
            tokio::select! {
                message = watch.message() => match message {
                    // Deleted, or the watch was cancelled (compacted history): look again.
                    Ok(Some(m)) if m.canceled() || !m.events().is_empty() => break,
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(closed()),
                    Err(e) => return Err(map_err(e)),
                },
                _ = lease.gone() => return Ok(None),
                _ = tokio::time::sleep_until(renew_at), if !entry.shared => {
                    let round = Instant::now();
                    match lease.keep_alive().await {
                        Ok(until) => {
                            valid_until = until;
                            renew_at = round + every;
                        }
                        Err(e) if e.is_lost() => return Ok(None),
                        Err(e) => {
                            let now = Instant::now();
                            if now + Duration::from_millis(50) >= valid_until {
                                return Err(e);
                            }
                            tracing::debug!(error = %e, "keeping a waiting key failed, retrying");
                            renew_at = now + ((valid_until - now) / 4).min(every);
                        }
                    }
                }
            }
        }
        drop(watch);
        self.predecessor(entry).await
    }

    /// The key just before ours and the revision of the read, in a transaction that first
    /// checks that our key still exists on our lease (`None` if not).
    async fn predecessor(&self, entry: &Entry) -> Result<Option<Option<Vec<u8>>>> {
        let (lease, token, dir) = (&entry.lease, entry.token, entry.dir.as_str());
        let key = lease.key();
        let before = GetOptions::new()
            .with_prefix()
            .with_max_create_revision((token - 1).max(1))
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(1)
            .with_keys_only();
        let txn = Txn::new()
            .when([Compare::lease(
                key,
                CompareOp::Equal,
                lease.group().await.id,
            )])
            .and_then([TxnOp::get(dir, Some(before))]);
        let answer = self.txn(txn).await?;
        if !answer.succeeded() {
            return Ok(None);
        }
        let before = match answer.op_responses().into_iter().next() {
            Some(TxnOpResponse::Get(get)) => get.kvs().first().map(|kv| kv.key().to_vec()),
            _ => None,
        };
        Ok(Some(before))
    }
}

/// The requests, each with the request timeout.
impl Inner {
    pub(crate) async fn grant(&self, asked: i64) -> Result<Granted> {
        let answer = self
            .call("lease grant", || {
                let mut client = self.client.lease_client();
                async move { client.grant(asked, None).await }
            })
            .await?;
        Ok(Granted {
            id: answer.id(),
            asked,
            granted: answer.ttl(),
        })
    }

    /// Revokes `id`: `LockLost` if etcd no longer knows it.
    pub(crate) async fn revoke(&self, id: i64) -> Result<()> {
        let revoke = || {
            let mut client = self.client.lease_client();
            async move { client.revoke(id).await }
        };
        let timeout = self.options.request_timeout;
        match self.within("lease revoke", timeout, revoke).await? {
            Err(e) if lease_not_found(&e) => {
                Err(Error::lost(format!("lease {id:x}"), LostReason::NotOwner))
            }
            other => other.map(drop).map_err(map_err),
        }
    }

    /// Revokes leases that no key needs any more, without waiting. One that is not revoked
    /// runs out by itself within its TTL: it holds no key.
    pub(crate) fn revoke_in_background(self: &Arc<Self>, ids: Vec<i64>) {
        if ids.is_empty() {
            // Every release of a key on a shared lease: no task for nothing to do.
            return;
        }
        let inner = self.clone();
        spawn_cleanup("revoking a spare lease", async move {
            let mut result = Ok(());
            for id in ids {
                match inner.revoke(id).await {
                    Err(e) if !e.is_lost() => result = Err(e),
                    _ => {}
                }
            }
            result
        });
    }

    /// The lease `key` is bound to, `None` if the key does not exist.
    pub(crate) async fn key_lease(&self, key: &str) -> Result<Option<i64>> {
        let get = || {
            let mut client = self.client.kv_client();
            async move {
                client
                    .get(key, Some(GetOptions::new().with_keys_only()))
                    .await
            }
        };
        let answer = self.call("get", get).await?;
        Ok(answer.kvs().first().map(|kv| kv.lease()))
    }

    pub(crate) async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse> {
        self.call("txn", || {
            let (mut client, txn) = (self.client.kv_client(), txn.clone());
            async move { client.txn(txn).await }
        })
        .await
    }

    /// Runs one request with the request timeout, mapping its errors. `request` builds the
    /// request; it is sent again when it never reached a server (see [`never_sent`]).
    pub(crate) async fn call<T, F, Fut>(&self, what: &str, request: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let timeout = self.options.request_timeout;
        self.within(what, timeout, request).await?.map_err(map_err)
    }

    /// Runs one request within `timeout` (an `Error::Connection` after it), leaving the
    /// client's errors unmapped.
    ///
    /// A request that never reached a server is sent again, after a pause growing from 1 ms
    /// to 16 ms: etcd-client's balancer keeps a member that refuses connections in
    /// rotation, and a request routed to it fails at once, unsent, while the next may reach
    /// a live member. It gives up with the last refusal once every member of the URL has
    /// refused (a member is known by its address in the refusal, which shows the address
    /// connected to: a host name is not found there), or after [`REFUSALS_PER_MEMBER`]
    /// refusals per member when the refusals do not name them (under a second for three),
    /// so a cluster that is down fails fast rather than at the timeout. A single member is
    /// not tried again.
    pub(crate) async fn within<T, F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        mut request: F,
    ) -> Result<Result<T, etcd_client::Error>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let run = async {
            let mut refusals = Refusals::new(&self.endpoints);
            loop {
                match request().await {
                    Err(e) if never_sent(&e) && !refusals.all_refused(&e) => {
                        tracing::debug!(what, error = %e, "not sent, trying another member");
                        tokio::time::sleep(refusals.pause()).await;
                    }
                    answer => return answer,
                }
            }
        };
        tokio::time::timeout(timeout, run).await.map_err(|_| {
            Error::connection(BACKEND, format!("{what}: no answer within {timeout:?}"))
        })
    }
}

/// How many refusals per member [`Inner::within`] takes when refusals do not name the
/// member (a host name the client resolved): with one live member of three, 16 random
/// picks per member all miss it with a chance of (2/3)^48, about 4e-9.
const REFUSALS_PER_MEMBER: usize = 16;

/// The members that refused a request, for [`Inner::within`].
struct Refusals<'a> {
    /// The URL's members as `host:port`, and whether each has refused.
    members: Vec<(&'a str, bool)>,
    /// Refusals so far.
    count: usize,
}

/// Whether `text` names the address `member`: not as a part of a longer one
/// (`127.0.0.1:12`, `110.0.0.1:1`, `my-etcd:1` do not name `127.0.0.1:1`, `10.0.0.1:1`,
/// `etcd:1`).
fn names(text: &str, member: &str) -> bool {
    let part = |c: char| c.is_ascii_alphanumeric() || ".-_".contains(c);
    text.match_indices(member).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + member.len()..].chars().next();
        !before.is_some_and(part) && !after.is_some_and(|c| c.is_ascii_alphanumeric())
    })
}

impl<'a> Refusals<'a> {
    fn new(endpoints: &'a [String]) -> Self {
        let members = endpoints
            .iter()
            .map(|e| (e.split_once("://").map_or(e.as_str(), |(_, a)| a), false))
            .collect();
        Refusals { members, count: 0 }
    }

    /// Counts the refusal `e`; whether every member has now refused.
    fn all_refused(&mut self, e: &etcd_client::Error) -> bool {
        self.count += 1;
        // The connect error names the address it tried, in its source's debug text.
        let text = format!("{e:?}");
        for (member, refused) in &mut self.members {
            *refused |= names(&text, member);
        }
        // A single member: there is no other to try.
        self.members.len() == 1
            || self.members.iter().all(|(_, refused)| *refused)
            || self.count >= REFUSALS_PER_MEMBER * self.members.len()
    }

    /// The pause before the next try: 1 ms, doubling per refusal up to 16 ms (so 16
    /// refusals per member of a dead cluster whose refusals name no member take under a
    /// second for three members).
    fn pause(&self) -> Duration {
        Duration::from_millis(1 << self.count.saturating_sub(1).min(4))
    }
}

#[async_trait]
impl Backend for EtcdLock {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(MIN_TTL)
            .fencing(true)
            .lease_expiry(true)
            .renewal(true)
            .networked(true)
            .fifo(true)
            .expiry_slack(EXPIRY_SLACK)
            .admin(true, true, true)
            .election(true)
            .watch(true)
    }

    fn admin(&self) -> Option<&dyn Admin> {
        Some(self)
    }

    async fn try_lock(&self, name: &LockName, opts: &LockOptions) -> Result<Option<Acquired>> {
        let inner = self.inner.clone();
        let (name, ttl, shared) = (name.clone(), opts.ttl, opts.auto_renew);
        run_detached(async move {
            let entry = inner.enqueue(name, ttl, shared).await?;
            if entry.predecessor.is_none() {
                return Ok(entry.into_acquired());
            }
            // Held: leave nothing behind.
            entry.lease.withdraw().await?;
            Ok(None)
        })
        .await
    }

    async fn lock(
        &self,
        name: &LockName,
        opts: &LockOptions,
        _deadline: Option<Instant>,
    ) -> Result<Acquired> {
        loop {
            let enqueue = self
                .inner
                .clone()
                .enqueue(name.clone(), opts.ttl, opts.auto_renew);
            // The shared lease this waiter queued on can lapse while it waits (a server
            // paused past the TTL): that loses the waiter's place, not its wait. It queues
            // again on a fresh lease, after a pause so a lease that keeps lapsing is no hot
            // loop; the caller's deadline still bounds the whole wait.
            let queued = match run_detached(enqueue).await {
                Ok(entry) => Some(Armed::new(entry)),
                Err(e) if e.is_lost() => None,
                Err(e) => return Err(e),
            };
            // From here on, a dropped wait deletes the key in the background.
            if let Some(entry) = queued {
                match self.inner.wait_turn(&entry).await {
                    Ok(Some(valid_until)) => return Ok(entry.disarm().grant(valid_until)),
                    Ok(None) => {}
                    Err(e) if e.is_lost() => {}
                    Err(e) => return Err(e),
                }
            }
            tracing::debug!(lock = %name, "the waiting key or its lease expired: queueing again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Connect for EtcdLock {
    const SCHEMES: &'static [&'static str] = &["etcd", "etcds"];

    async fn connect(url: &str) -> Result<Self> {
        EtcdLock::connect(url).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_a_member_only_by_its_whole_address() {
        let text = r#"ConnectError("tcp connect error", 127.0.0.1:1, Os { code: 111 })"#;
        assert!(names(text, "127.0.0.1:1"));
        assert!(!names(text, "127.0.0.1:12379"));
        assert!(!names("... 127.0.0.1:12379 ...", "127.0.0.1:1"));
        assert!(names("refused by 10.0.0.2:2379", "10.0.0.2:2379"));
        assert!(!names("refused by 110.0.0.2:2379", "10.0.0.2:2379"));
        assert!(!names("refused by my-etcd:2379", "etcd:2379"));
        assert!(names("[::1]:2379, refused", "[::1]:2379"));
    }

    #[test]
    fn refusals_end_when_every_member_refused_or_after_the_cap() {
        let endpoints = ["http://127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let refused = |addr: &str| {
            etcd_client::Error::IoError(std::io::Error::other(format!("connect {addr}, refused")))
        };
        let mut refusals = Refusals::new(&endpoints);
        assert!(!refusals.all_refused(&refused("127.0.0.1:1")));
        assert!(!refusals.all_refused(&refused("127.0.0.1:1")));
        assert!(refusals.all_refused(&refused("127.0.0.1:2")));
        // Refusals that name no member end after the cap, with pauses of at most 16 ms.
        let mut refusals = Refusals::new(&endpoints);
        let unnamed = (1..).find(|_| refusals.all_refused(&refused("localhost")));
        assert_eq!(unnamed, Some(REFUSALS_PER_MEMBER * endpoints.len()));
        assert_eq!(refusals.pause(), Duration::from_millis(16));
    }
}
