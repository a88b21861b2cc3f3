//! The Redis backend and its acquire path: one script run per instance, quorum, fencing token
//! write-back, and waiting on the release channel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use lockkit_core::backend::{
    run_detached, spawn_cleanup, Acquired, Admin, Armed, Attempt, Backend, Capabilities, Cleanup,
    Connect, FencingToken, LockName, LockOptions,
};
use lockkit_core::{Error, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::ErrorKind;
use tokio::time::Instant;

use crate::error::{map_err, QuorumError};
use crate::lease::RedisLease;
use crate::options::{Instance, RedisOptions, UNSAFE_ALLOW_EVICTION};
use crate::renewals::Renewals;
use crate::scripts;
use crate::subscriptions::{Role, Subscription, Subscriptions};

/// A lock service on one Redis server (`redis://`), or RedLock over N independent servers
/// (`redlock://h1:p1,h2:p2,…`, quorum N/2+1).
///
/// One acquisition is one round trip per instance: a script does `SET key owner NX PX ttl`
/// and, when it wins, issues the fencing token `max(fence + 1, server TIME in µs)` and stores
/// it in the name's fence key (which never expires): a hybrid logical clock. With RedLock,
/// the client takes the highest token among the instances it won; unless a quorum of them
/// issued that very token, it writes it back to every instance (`fence = max(fence, token)`)
/// before it returns the guard: any two quorums share an instance, so the next holder's
/// token is strictly larger. So that the instances usually issue the same token (and the
/// write-back round is skipped), the client proposes one: its clock plus 2 ms, which an
/// instance issues instead of its own clock only if it is later and at most 5 ms ahead of it.
///
/// Tokens keep rising when a fence key is lost (a restart without persistence or with the
/// last second of AOF lost, a failover to a replica that missed it, a FLUSHALL, eviction):
/// the server clock then carries on above the tokens issued before. **Assumed:** the clock of
/// the server that issues the next token reads later than the last token issued, i.e. no
/// server clock steps back (a slewing NTP is fine), and servers that take over from one
/// another (a promoted replica, RedLock instances) agree to within the time between the last
/// token and the loss, less 5 ms with RedLock (a proposed token may be that far ahead). Tokens are microseconds since the Unix epoch (about 1.7e15), not
/// small consecutive numbers. Mutual exclusion itself still needs the lock key to survive:
/// a server that loses it while the lock is held lets a second holder in (then the tokens
/// tell them apart), so use persistence (AOF with fsync) or restart past the longest TTL.
///
/// At connect, every instance that answers must have `maxmemory-policy noeviction` (eviction
/// may drop a held lock's key, which has a TTL, and under `allkeys-*` the fence key), unless
/// the URL (`?unsafe_allow_eviction=true`) or [`RedisOptions::unsafe_allow_eviction`] accept
/// the risk. Not checked: a policy changed after connect, RedLock instances down at connect,
/// and servers that refuse `CONFIG GET` (a warning is logged once).
///
/// Release and extend compare the owner id in a script. On a single instance, waiters queue
/// in arrival order (a sorted set per name, with a liveness deadline each waiter refreshes
/// with every attempt, and the TTL it asks for): a free lock goes only to the first live
/// waiter, so a releaser that asks again at once queues behind the waiters instead of
/// barging in. A release hands the lock over directly: the same script makes the first live
/// waiter the owner (its TTL, a new token) and publishes `<owner> <token> <attempt>` on that
/// waiter's own channel; only that waiter's connection receives it, and it returns the lock
/// without another round trip (the release script in `scripts.rs`). Its lease counts as
/// valid from when it sent the attempt the grant names (the server had seen that attempt,
/// so it was sent before the grant, and the key lives for the TTL from the grant), less the
/// drift allowance. A waiter that stops waiting (timeout, cancel) leaves the queue at once
/// and gives back a lock it was handed meanwhile, to the next waiter; one that crashed is
/// handed nothing after its liveness deadline (three `max_poll`s, at least 2 s), and a lock
/// it was handed before ends at its TTL. A waiter that missed its message finds the lock
/// its own on its next attempt, which renews it and returns it. RedLock waiters do not
/// queue (instances could order them differently) and are not handed anything; release
/// publishes `released` and one waiter per client wakes. Either way a jittered fallback
/// re-check covers lost messages, and a wake-up the holder's lease running out. Renewals of
/// one client are batched: the extends asked for while one batch is on its way go out
/// together in one script call per instance. Keys and channel of a name share one hash tag,
/// so they stay on one Redis Cluster slot (the batched renewal spans names, so it needs a
/// single instance or RedLock, not Redis Cluster).
///
/// A holder's value ([`Lease::set_value`](lockkit_core::backend::Lease::set_value), for
/// leader election) is kept in the name's value key with the holder's owner id, written only
/// while the lock key holds that id, and shown only with that holder. Acquisitions, releases
/// and values are published on the name's channel, which leader observers
/// ([`Admin::changed`]) subscribe to.
#[derive(Debug, Clone)]
pub struct RedisLock {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) backend: &'static str,
    pub(crate) nodes: Vec<Node>,
    pub(crate) quorum: usize,
    pub(crate) options: RedisOptions,
    pub(crate) subscriptions: Arc<Subscriptions>,
    /// The renewals waiting for the next batch.
    pub(crate) renewals: Renewals,
}

/// One Redis instance: a connection for commands, one for subscriptions.
#[derive(Debug)]
pub(crate) struct Node {
    /// `host:port`, for messages (never the password).
    pub(crate) address: String,
    pub(crate) commands: ConnectionManager,
    pub(crate) pubsub: ConnectionManager,
}

/// The keys and channel of one lock name, all in one string: the lock key
/// `<prefix>{<encoded name>}` (the braces make it a cluster hash tag, so every key of a name
/// lands on one slot), then the lock key with each of [`SUFFIXES`] in turn. Built once per
/// acquisition (shared by its attempts) and once per release, not seven strings each time.
#[derive(Debug)]
pub(crate) struct Keys {
    all: String,
    /// Where each key starts in `all`, and where the last one ends: key `i` is
    /// `all[bounds[i]..bounds[i + 1]]`.
    bounds: [usize; 2 + SUFFIXES.len()],
}

/// The suffixes of a name's other keys, in [`Keys`]' order.
const SUFFIXES: [&str; 6] = [
    ":fence",
    ":value",
    ":released",
    ":queue",
    ":alive",
    ":asked",
];

/// A waiter's place in a name's queue (a single instance only): taken out of it in the
/// background when dropped, unless handed over, so a waiter that stops waiting (a timeout, a
/// cancelled `acquire`) never blocks the lock for the ones behind it.
pub(crate) struct Queued {
    inner: Arc<Inner>,
    keys: Arc<Keys>,
    owner: Arc<str>,
}

impl Cleanup for Queued {
    const WHAT: &'static str = "leaving a Redis lock queue";

    async fn cleanup(self) -> Result<()> {
        let inner = &self.inner;
        let answers: Vec<Result<i64>> = inner
            .on_all(
                lockkit_core::DEFAULT_TTL,
                &scripts::DEQUEUE,
                &[
                    self.keys.lock(),
                    self.keys.queue(),
                    self.keys.alive(),
                    self.keys.fence(),
                    self.keys.asked(),
                ],
                &[&self.owner, self.keys.channel()],
            )
            .await;
        answers.into_iter().try_for_each(|a| a.map(drop))
    }
}

/// How long a queued waiter is presumed alive after its last attempt: three of its longest
/// pauses between attempts (`max_poll`), and at least 2 s. A waiter that crashed holds up
/// the lock for at most this long once it is first in line.
fn liveness(options: &RedisOptions) -> Duration {
    options
        .max_poll
        .saturating_mul(3)
        .max(Duration::from_secs(2))
}

/// Why an acquisition request did not take the lock.
enum Busy {
    /// Held elsewhere (or another waiter's turn); the holder's lease has about this much
    /// left. With the waiter's place in the queue, if it queued.
    Held(Duration, Option<Armed<Queued>>),
    /// RedLock contenders split the instances and nobody reached a quorum; the attempt took
    /// this long.
    Split(Duration),
}

type Outcome = lockkit_core::backend::Outcome<Busy>;

impl RedisLock {
    /// Connects with default options to `redis://[user:password@]host:port[/db]`,
    /// `rediss://…` (feature `tls`) or `redlock://[user:password@]h1:p1,h2:p2,…[/db]`
    /// (`redlocks://…` with TLS). A `prefix=` query parameter sets the key prefix.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, RedisOptions::default()).await
    }

    /// Connects with `options`. What `options` sets wins over the URL's parameters: a
    /// `prefix=` in the URL applies only if `options.prefix` is `None`.
    ///
    /// A single instance must answer now; RedLock instances are connected lazily, so a
    /// client starts while a minority of them is down (the policy check below waits at most
    /// `connection_timeout + response_timeout` for them).
    ///
    /// Fails with [`Error::InvalidOptions`] when an option is out of range (see
    /// [`RedisOptions::validate`]), or when an instance that answers has a `maxmemory-policy`
    /// other than `noeviction` and neither the options nor the URL
    /// (`?unsafe_allow_eviction=true`) accept that. Where `CONFIG GET` is refused (managed
    /// Redis often renames it), the policy cannot be read: the client warns once through
    /// `tracing` and goes on.
    pub async fn connect_with(url: &str, mut options: RedisOptions) -> Result<Self> {
        let service = options.apply_url(url)?;
        options.validate()?;
        let subscriptions = Arc::new(Subscriptions::default());
        let mut nodes = Vec::with_capacity(service.instances.len());
        for instance in &service.instances {
            nodes.push(Node::connect(instance, &options, &subscriptions, service.redlock).await?);
        }
        if !options.eviction_allowed() {
            refuse_eviction(&nodes, &options, service.redlock).await?;
        }
        let quorum = nodes.len() / 2 + 1;
        Ok(RedisLock {
            inner: Arc::new(Inner {
                backend: if service.redlock { "redlock" } else { "redis" },
                nodes,
                quorum,
                options,
                subscriptions,
                renewals: Renewals::default(),
            }),
        })
    }

    /// The Redis key that holds the lock `name` (for inspection and operations).
    pub fn lock_key(&self, name: &LockName) -> String {
        self.inner.keys(name).lock().to_owned()
    }

    /// How many instances must agree: 1 for a single instance, N/2+1 for RedLock.
    pub fn quorum(&self) -> usize {
        self.inner.quorum
    }
}

impl Node {
    async fn connect(
        instance: &Instance,
        options: &RedisOptions,
        subscriptions: &Arc<Subscriptions>,
        lazy: bool,
    ) -> Result<Node> {
        // The client's configuration errors (core's `InvalidOptions` has no source to keep).
        let invalid = |e: redis::RedisError| {
            Error::InvalidOptions(format!("Redis client for {}: {e}", instance.address))
        };
        let client = redis::Client::open(instance.info.clone()).map_err(invalid)?;
        let config = || {
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(options.connection_timeout))
                .set_response_timeout(Some(options.response_timeout))
                .set_number_of_retries(2)
                .set_min_delay(Duration::from_millis(10))
                .set_max_delay(Duration::from_millis(500))
        };
        let sink = subscriptions.clone();
        let pubsub_config = config()
            .set_push_sender(move |push: redis::PushInfo| {
                sink.on_push(push);
                Ok::<(), redis::aio::SendError>(())
            })
            .set_automatic_resubscription();
        let (commands, pubsub) = if lazy {
            (
                ConnectionManager::new_lazy_with_config(client.clone(), config()),
                ConnectionManager::new_lazy_with_config(client, pubsub_config),
            )
        } else {
            let commands = ConnectionManager::new_with_config(client.clone(), config()).await;
            let commands = commands.map_err(|e| map_err(&instance.address, e))?;
            let pubsub = ConnectionManager::new_lazy_with_config(client, pubsub_config);
            (Ok(commands), pubsub)
        };
        Ok(Node {
            address: instance.address.clone(),
            commands: commands.map_err(invalid)?,
            pubsub: pubsub.map_err(invalid)?,
        })
    }
}

/// The answer of a server to `CONFIG GET maxmemory-policy`.
enum Policy {
    /// The policy.
    Read(String),
    /// The server refused the command (renamed, disabled, not allowed): the reason.
    Unreadable(String),
}

impl Node {
    /// Asks the server for its `maxmemory-policy`. A RedLock node connects here.
    async fn maxmemory_policy(&self, timeout: Duration) -> Result<Policy> {
        let mut conn = self.commands.clone();
        let mut command = redis::cmd("CONFIG");
        command.arg("GET").arg("maxmemory-policy");
        let query = command.query_async::<HashMap<String, String>>(&mut conn);
        match tokio::time::timeout(timeout, query).await {
            Ok(Ok(mut config)) => Ok(match config.remove("maxmemory-policy") {
                Some(policy) => Policy::Read(policy),
                None => Policy::Unreadable("CONFIG GET answered without it".into()),
            }),
            Ok(Err(e)) if matches!(e.kind(), ErrorKind::Server(_) | ErrorKind::Extension) => {
                Ok(Policy::Unreadable(e.to_string()))
            }
            Ok(Err(e)) => Err(map_err(&self.address, e)),
            Err(_) => Err(Error::connection(
                "redis",
                format!("{}: no answer within {timeout:?}", self.address),
            )),
        }
    }
}

/// Whether the warning about an unreadable `maxmemory-policy` was given (once per process).
static POLICY_WARNED: AtomicBool = AtomicBool::new(false);

/// Fails with [`Error::InvalidOptions`] if an instance may evict keys. A RedLock instance
/// that does not answer now is not checked; a single instance must answer.
async fn refuse_eviction(nodes: &[Node], options: &RedisOptions, redlock: bool) -> Result<()> {
    let timeout = options
        .connection_timeout
        .saturating_add(options.response_timeout);
    let answers = join_all(nodes.iter().map(|n| n.maxmemory_policy(timeout))).await;
    for (node, answer) in nodes.iter().zip(answers) {
        match answer {
            Ok(Policy::Read(policy)) if policy.eq_ignore_ascii_case("noeviction") => {}
            Ok(Policy::Read(policy)) => {
                return Err(Error::InvalidOptions(format!(
                    "{}: maxmemory-policy is `{policy}`, so the server may evict a held lock's \
                     key (and under allkeys-* its fence counter): set `maxmemory-policy \
                     noeviction` on the server (CONFIG SET and redis.conf), or accept the \
                     risk with `?{UNSAFE_ALLOW_EVICTION}=true` in the URL or \
                     RedisOptions::unsafe_allow_eviction(true)",
                    node.address
                )));
            }
            Ok(Policy::Unreadable(why)) => {
                let address = &node.address;
                if POLICY_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::debug!(%address, %why, "cannot read maxmemory-policy");
                } else {
                    tracing::warn!(
                        %address,
                        %why,
                        "cannot read maxmemory-policy (CONFIG disabled or renamed?): make \
                         sure the server never evicts keys (noeviction), or locks may be \
                         lost and fencing tokens rest on the server clock alone"
                    );
                }
            }
            Err(e) if redlock => {
                tracing::debug!(address = %node.address, error = %e, "maxmemory-policy not checked");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Keys {
    fn new(prefix: &str, name: &LockName) -> Keys {
        let encoded = name.encoded();
        let lock_len = prefix.len() + encoded.len() + 2;
        let suffixes: usize = SUFFIXES.iter().map(|s| s.len()).sum();
        let mut all = String::with_capacity(lock_len * (1 + SUFFIXES.len()) + suffixes);
        let mut bounds = [0; 2 + SUFFIXES.len()];
        for (end, suffix) in bounds[1..].iter_mut().zip([""].iter().chain(&SUFFIXES)) {
            all.push_str(prefix);
            all.push('{');
            all.push_str(&encoded);
            all.push('}');
            all.push_str(suffix);
            *end = all.len();
        }
        Keys { all, bounds }
    }

    fn nth(&self, i: usize) -> &str {
        &self.all[self.bounds[i]..self.bounds[i + 1]]
    }

    /// The lock key: the owner id while held.
    pub(crate) fn lock(&self) -> &str {
        self.nth(0)
    }

    /// The fence counter: the last token issued (see [`scripts::ACQUIRE`]).
    pub(crate) fn fence(&self) -> &str {
        self.nth(1)
    }

    /// Where the holder's value lives (`<owner> <sequence> <token> <value>`), see
    /// [`scripts::SET_VALUE`].
    pub(crate) fn value(&self) -> &str {
        self.nth(2)
    }

    /// RedLock's `released` for its waiters; `taken`, `released` and `value` for leader
    /// observers. A queued waiter's messages come on its own [`Keys::turn_channel`].
    pub(crate) fn channel(&self) -> &str {
        self.nth(3)
    }

    /// The waiters in arrival order (a single instance only).
    pub(crate) fn queue(&self) -> &str {
        self.nth(4)
    }

    /// Until when each waiter is presumed alive.
    pub(crate) fn alive(&self) -> &str {
        self.nth(5)
    }

    /// What each waiter asks for: its TTL and the number of its latest attempt (see
    /// [`scripts::ACQUIRE`]), for a release to hand it the lock.
    pub(crate) fn asked(&self) -> &str {
        self.nth(6)
    }

    /// The channel of one queued waiter (`<channel>:<owner>`): its hand-off, or a wake-up.
    pub(crate) fn turn_channel(&self, owner: &str) -> String {
        format!("{}:{owner}", self.channel())
    }
}

impl Inner {
    pub(crate) fn keys(&self, name: &LockName) -> Keys {
        Keys::new(self.options.key_prefix(), name)
    }

    /// The timeout of one request to one instance.
    fn request_timeout(&self, ttl: Duration) -> Duration {
        if self.nodes.len() > 1 {
            self.options
                .response_timeout
                .min(ttl / 10)
                .max(Duration::from_millis(5))
        } else {
            self.options.response_timeout
        }
    }

    /// How long a lease of `ttl` counts as valid from when it was asked for: the TTL less
    /// the clock-drift allowance (`ttl * drift_factor + 2 ms`). [`Error::InvalidOptions`]
    /// when the allowance leaves nothing: no acquisition could ever be valid.
    pub(crate) fn validity(&self, ttl: Duration) -> Result<Duration> {
        let share = ttl.as_secs_f64() * self.options.drift_factor;
        let drift = Duration::try_from_secs_f64(share)
            .unwrap_or(ttl)
            .saturating_add(Duration::from_millis(2));
        match ttl.checked_sub(drift) {
            Some(validity) if !validity.is_zero() => Ok(validity),
            _ => Err(Error::InvalidOptions(format!(
                "the lease TTL {ttl:?} leaves no validity after the clock-drift allowance \
                 {drift:?} (ttl * drift_factor {} + 2 ms): raise the TTL",
                self.options.drift_factor
            ))),
        }
    }

    /// The end of a lease of `validity` asked for at `started`, if it is still ahead. For a
    /// lease handed over by a release, `started` is when the waiter sent the attempt the grant
    /// names, which the grant followed.
    pub(crate) fn valid_until(started: Instant, validity: Duration) -> Option<Instant> {
        started
            .checked_add(validity)
            .filter(|until| Instant::now() < *until)
    }

    /// Runs `script` on every instance in parallel, each with the request timeout.
    pub(crate) async fn on_all<T: redis::FromRedisValue>(
        &self,
        ttl: Duration,
        script: &redis::Script,
        keys: &[&str],
        args: &[&str],
    ) -> Vec<Result<T>> {
        let timeout = self.request_timeout(ttl);
        // Built once for every instance (a renewal batch has thousands of arguments), into
        // one buffer: the acquisition's hot path allocates little.
        let call = ScriptCall::new(script, keys, args);
        let on = |node| call.on(node, timeout);
        match &self.nodes[..] {
            [node] => vec![on(node).await],
            nodes => join_all(nodes.iter().map(on)).await,
        }
    }

    /// Whether waiters queue (a single instance): RedLock instances could order the same
    /// waiters differently and hand the lock to different ones, so RedLock waiters do not.
    fn queues(&self) -> bool {
        self.nodes.len() == 1
    }

    /// One acquisition request on every instance, as `owner`; a single instance's waiter
    /// (`queue`) takes a place in the name's queue if the lock is not free for it, recording
    /// its TTL and the number of this attempt (`number`) for a release to hand it the lock.
    async fn attempt(
        self: Arc<Self>,
        name: LockName,
        keys: Arc<Keys>,
        ttl: Duration,
        owner: Arc<str>,
        queue: bool,
        number: u64,
    ) -> Result<Outcome> {
        let validity = self.validity(ttl)?;
        let queue = queue && self.queues();
        let ttl_ms = millis(ttl).to_string();
        let liveness_ms = millis(liveness(&self.options)).to_string();
        let proposal = match self.nodes.len() {
            1 => 0,
            _ => proposal(),
        }
        .to_string();
        let number = number.to_string();
        let started = Instant::now();
        let answers: Vec<Result<(i64, i64)>> = self
            .on_all(
                ttl,
                &scripts::ACQUIRE,
                &[
                    keys.lock(),
                    keys.fence(),
                    keys.queue(),
                    keys.alive(),
                    keys.asked(),
                ],
                &[
                    &owner,
                    &ttl_ms,
                    if queue { "1" } else { "0" },
                    &liveness_ms,
                    keys.channel(),
                    &proposal,
                    &number,
                ],
            )
            .await;
        let mut tokens = Vec::new();
        let mut busy_for: Option<i64> = None;
        let mut unanswered = Vec::new();
        for (node, answer) in self.nodes.iter().zip(answers) {
            match answer {
                Ok((1, token)) => tokens.push(token),
                // -1: a key without TTL (not ours); its end is unknown.
                Ok((_, pttl)) if pttl < 0 => {}
                Ok((_, pttl)) => busy_for = Some(busy_for.map_or(pttl, |b| b.min(pttl))),
                Err(e) => unanswered.push((node, e)),
            }
        }
        // The script may have run although its answer was lost: ask those instances again,
        // all at once.
        let recovered = join_all(
            unanswered
                .iter()
                .map(|(node, _)| self.recover(node, &keys, &owner, ttl, queue)),
        )
        .await;
        let mut failures = Vec::new();
        for ((_, e), token) in unanswered.into_iter().zip(recovered) {
            match token {
                Some(token) => tokens.push(token),
                None => failures.push(e),
            }
        }
        let lease = RedisLease::new(self.clone(), name.clone(), keys.lock(), owner.clone());
        if tokens.len() >= self.quorum {
            let mut token = tokens.iter().copied().max().unwrap_or(0);
            // A quorum whose fence counters already stand at the token (they issued it, or
            // their counter reads it) needs no write-back: any later quorum shares one of them.
            let agreed = tokens.iter().filter(|t| **t == token).count() >= self.quorum;
            if self.nodes.len() > 1 && !agreed {
                token = self.write_back(&keys, token, ttl).await.inspect_err(|_| {
                    let lease = lease.clone();
                    spawn_cleanup("undoing a partial RedLock acquisition", async move {
                        lease.release_all(false).await;
                        Ok(())
                    });
                })?;
            }
            if let Some(valid_until) = Inner::valid_until(started, validity) {
                let token = FencingToken(token.max(0) as u64);
                return Ok(Outcome::Won(Acquired::new(
                    token,
                    valid_until,
                    Box::new(lease.with_token(token)),
                )));
            }
            tracing::debug!(lock = %name, "acquired too late to be valid, releasing");
        }
        // No quorum (or no validity left): undo the partial acquisitions at once, quietly for
        // RedLock (nothing was really held); a single instance's first waiter is told.
        let split = !tokens.is_empty();
        if split || !failures.is_empty() {
            // A single instance's queue is told: the lock is free for its first waiter.
            lease.release_all(self.queues()).await;
        }
        if failures.len() > self.nodes.len() - self.quorum {
            let first = failures.swap_remove(0);
            return Err(if self.nodes.len() == 1 {
                first
            } else {
                Error::connection(
                    self.backend,
                    QuorumError::Unanswered {
                        answered: self.nodes.len() - failures.len() - 1,
                        total: self.nodes.len(),
                        needed: self.quorum,
                        first,
                    },
                )
            });
        }
        if split {
            return Ok(Outcome::Busy(Busy::Split(started.elapsed())));
        }
        // Unknown: wake on the message or the fallback re-check only.
        let left = busy_for.map_or(self.options.max_poll, |ms| Duration::from_millis(ms as u64));
        // Queued (or already in the queue): an attempt whose caller went away leaves it.
        let queued = queue.then(|| {
            Armed::new(Queued {
                inner: self.clone(),
                keys,
                owner,
            })
        });
        Ok(Outcome::Busy(Busy::Held(left, queued)))
    }

    /// Who holds the lock on a single instance: the lock key's owner id (`None` when free,
    /// or when the instance did not answer in time).
    async fn holder(&self, keys: &Keys, ttl: Duration) -> Option<String> {
        let mut conn = self.nodes[0].commands.clone();
        let get = redis::cmd("GET").arg(keys.lock()).clone();
        let answer = tokio::time::timeout(self.request_timeout(ttl), get.query_async(&mut conn));
        answer.await.ok()?.ok()?
    }

    /// After an ambiguous error: the token if our SET went through after all, or (a queued
    /// waiter, `queued`) a release handed us the lock; then the key is renewed to `ttl` from
    /// now, since the hand-off may predate the attempt the lease is counted from.
    async fn recover(
        &self,
        node: &Node,
        keys: &Keys,
        owner: &str,
        ttl: Duration,
        queued: bool,
    ) -> Option<i64> {
        let renew = if queued { millis(ttl) } else { 0 }.to_string();
        let call = ScriptCall::new(
            &scripts::RECOVER,
            &[keys.lock(), keys.fence()],
            &[owner, &renew],
        );
        let answer = call.on(node, self.request_timeout(ttl)).await;
        answer.ok().filter(|token: &i64| *token >= 0)
    }

    /// Raises the fence counter of every instance to at least `token`; a quorum must confirm.
    async fn write_back(&self, keys: &Keys, token: i64, ttl: Duration) -> Result<i64> {
        let value = token.to_string();
        let answers: Vec<Result<i64>> = self
            .on_all(ttl, &scripts::WRITE_BACK, &[keys.fence()], &[&value])
            .await;
        let confirmed = answers.iter().filter(|a| a.is_ok()).count();
        // Below a quorum, some instance failed.
        match answers.into_iter().find_map(|a| a.err()) {
            Some(first) if confirmed < self.quorum => Err(Error::connection(
                self.backend,
                QuorumError::WriteBack {
                    confirmed,
                    total: self.nodes.len(),
                    first,
                },
            )),
            _ => Ok(token),
        }
    }
}

#[async_trait]
impl Backend for RedisLock {
    fn name(&self) -> &'static str {
        self.inner.backend
    }

    fn capabilities(&self) -> Capabilities {
        let min_ttl = if self.inner.nodes.len() > 1 { 500 } else { 100 };
        Capabilities::new(Duration::from_millis(min_ttl))
            .fencing(true)
            // A single instance's waiters queue and are handed the lock in arrival order.
            .fifo(self.inner.queues())
            .lease_expiry(true)
            .renewal(true)
            .networked(true)
            .admin(true, true, true)
            .election(true)
            .watch(true)
    }

    fn admin(&self) -> Option<&dyn Admin> {
        Some(self)
    }

    async fn try_lock(&self, name: &LockName, opts: &LockOptions) -> Result<Option<Acquired>> {
        let keys = Arc::new(self.inner.keys(name));
        let attempt =
            self.inner
                .clone()
                .attempt(name.clone(), keys, opts.ttl, owner_id(), false, 0);
        Ok(run_detached(attempt).await?.into_acquired())
    }

    async fn lock(
        &self,
        name: &LockName,
        opts: &LockOptions,
        _deadline: Option<Instant>,
    ) -> Result<Acquired> {
        let inner = &self.inner;
        // Made once for every attempt of the wait, and the place in the queue.
        let keys = Arc::new(inner.keys(name));
        let validity = inner.validity(opts.ttl)?;
        // A single instance: one owner id for the whole wait, its place in the queue.
        let owner = owner_id();
        let mut queued: Option<Armed<Queued>> = None;
        let mut subscription: Option<Armed<Subscription>> = None;
        let mut poll = Duration::from_millis(50);
        let mut splits = 0;
        // The number of the latest attempt, and when it was sent (taken before sending).
        let mut number = 0;
        let mut sent;
        loop {
            let notify = subscription.as_deref().map(Subscription::notify);
            let woken = notify.as_ref().map(|n| n.notified());
            tokio::pin!(woken);
            if let Some(woken) = woken.as_mut().as_pin_mut() {
                woken.enable();
            }
            number += 1;
            sent = Instant::now();
            // RedLock: each attempt under an owner id of its own, so an attempt only ever
            // counts keys it set itself. A key an earlier attempt set and whose undo never
            // reached its instance must not pass a later attempt's recovery check, which
            // would count it as won with that key's shorter TTL.
            let as_owner = match inner.queues() {
                true => owner.clone(),
                false => owner_id(),
            };
            let attempt =
                inner
                    .clone()
                    .attempt(name.clone(), keys.clone(), opts.ttl, as_owner, true, number);
            let busy_for = match run_detached(attempt).await? {
                Outcome::Won(acquired) => {
                    // The winning attempt took us out of the queue.
                    if let Some(queued) = queued.take() {
                        queued.disarm();
                    }
                    return Ok(acquired);
                }
                Outcome::Busy(Busy::Held(left, place)) => {
                    // The same place each time: keep one armed.
                    if let Some(place) = place {
                        if let Some(old) = queued.replace(place) {
                            old.disarm();
                        }
                    }
                    left
                }
                Outcome::Busy(Busy::Split(took)) => {
                    // Retry after a random pause that widens with each split in a row, so
                    // one contender gets ahead instead of all splitting again.
                    splits = (splits + 1).min(5);
                    let window = took
                        .max(Duration::from_millis(1))
                        .saturating_mul(1 << splits);
                    tokio::time::sleep(window.mul_f64(fastrand::f64())).await;
                    continue;
                }
            };
            if subscription.is_none() {
                // Subscribe, then look again: a release before the subscription was missed.
                let nodes = inner.nodes.iter().map(|n| n.pubsub.clone()).collect();
                // A queued waiter listens on a channel of its own, on which only messages for
                // it come: a hand-off wakes no other client.
                let (channel, role) = match inner.queues() {
                    true => (keys.turn_channel(&owner), Role::Queued(&owner)),
                    false => (keys.channel().to_owned(), Role::Any),
                };
                let subscribed = inner.subscriptions.subscribe(&channel, role, nodes);
                subscription = Some(subscribed.await);
                // A queued waiter that finds the lock still held by another needs no second
                // attempt: it is in the queue, and the hand-off will come on its channel. A
                // plain GET tells, where an attempt would run the acquire script again.
                let held_by_another = match inner.queues() {
                    true => inner
                        .holder(&keys, opts.ttl)
                        .await
                        .is_some_and(|holder| *holder != *owner),
                    false => false,
                };
                if !held_by_another {
                    // Free, handed to us already, unknown, or RedLock: try again.
                    continue;
                }
            }
            let jittered = poll / 2 + poll.mul_f64(fastrand::f64() / 2.0);
            let pause = jittered.min(busy_for.saturating_add(Duration::from_millis(1)));
            // Subscribed after this turn's attempt: a message since then left a permit.
            let late = match woken.is_none() {
                true => subscription.as_deref().map(Subscription::notify),
                false => None,
            };
            tokio::select! {
                _ = async {
                    match (woken.as_pin_mut(), &late) {
                        (Some(woken), _) => woken.await,
                        (None, Some(late)) => late.notified().await,
                        (None, None) => std::future::pending().await,
                    }
                } => {}
                _ = tokio::time::sleep(pause) => {}
            }
            let granted = subscription.as_deref().and_then(Subscription::take_grant);
            if let Some(grant) = granted.filter(|g| g.attempt == number) {
                // Handed over by a release after it had seen attempt `number`, so after we
                // sent it: the lease, which runs from the grant, is valid at least from then.
                if let Some(valid_until) = Inner::valid_until(sent, validity) {
                    if let Some(queued) = queued.take() {
                        queued.disarm();
                    }
                    let token = FencingToken(grant.token);
                    let lease = RedisLease::new(inner.clone(), name.clone(), keys.lock(), owner);
                    let lease = Box::new(lease.with_token(token));
                    return Ok(Acquired::new(token, valid_until, lease));
                }
                // Too late to count as valid: the next attempt finds the lock ours and
                // renews it from then.
                continue;
            }
            poll = poll.saturating_mul(2).min(inner.options.max_poll);
        }
    }
}

impl Connect for RedisLock {
    const SCHEMES: &'static [&'static str] = &["redis", "rediss", "redlock", "redlocks"];

    async fn connect(url: &str) -> Result<Self> {
        RedisLock::connect(url).await
    }
}

/// How far ahead of this client's clock a RedLock acquisition proposes its token (2 ms): enough
/// for the request to reach instances whose clocks agree with ours, well within
/// [`scripts::MAX_LEAD_US`].
const PROPOSAL_LEAD: Duration = Duration::from_millis(2);

/// The token a RedLock acquisition proposes to every instance: this client's clock in µs
/// since the Unix epoch, plus [`PROPOSAL_LEAD`]. An instance whose clock is later, or more
/// than [`scripts::MAX_LEAD_US`] before it, issues its own (see [`scripts::ACQUIRE`]); then the
/// tokens differ and the highest is written back.
fn proposal() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(PROPOSAL_LEAD);
    // Below 2^53, so the script's numbers (doubles) hold it exactly.
    (now.as_micros().min((1 << 53) - 1)) as u64
}

/// One call of a script: `EVALSHA` with its keys and arguments, written straight into one
/// command (built once, sent to every instance), and the script to load first where the
/// server does not know it yet (a restart, a `SCRIPT FLUSH`).
struct ScriptCall<'a> {
    script: &'a redis::Script,
    command: redis::Cmd,
}

impl<'a> ScriptCall<'a> {
    fn new(script: &'a redis::Script, keys: &[&str], args: &[&str]) -> Self {
        let data = keys.iter().chain(args).map(|a| a.len()).sum::<usize>() + 64;
        let mut command = redis::Cmd::with_capacity(3 + keys.len() + args.len(), data);
        command
            .arg("EVALSHA")
            .arg(script.get_hash())
            .arg(keys.len())
            .arg(keys)
            .arg(args);
        ScriptCall { script, command }
    }

    /// The call on `node`, within `timeout`.
    async fn on<T: redis::FromRedisValue>(&self, node: &Node, timeout: Duration) -> Result<T> {
        let mut conn = node.commands.clone();
        match tokio::time::timeout(timeout, self.send(&mut conn)).await {
            Ok(result) => result.map_err(|e| map_err(&node.address, e)),
            Err(_) => Err(Error::connection(
                "redis",
                format!("{}: no answer within {timeout:?}", node.address),
            )),
        }
    }

    /// Sends the command; on `NOSCRIPT`, loads the script and sends it once more.
    async fn send<T: redis::FromRedisValue>(
        &self,
        conn: &mut ConnectionManager,
    ) -> redis::RedisResult<T> {
        match self.command.query_async(conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.script.load_async(conn).await?;
                self.command.query_async(conn).await
            }
            answer => answer,
        }
    }
}

/// A fresh owner id: what the lock key holds while the lock is ours.
fn owner_id() -> Arc<str> {
    uuid::Uuid::new_v4().simple().to_string().into()
}

/// `d` in whole milliseconds, rounded up, so a lease is never shorter than asked.
pub(crate) fn millis(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000).min(u128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Taken by the tests here that run scripts on the test server: `SCRIPT FLUSH` empties the
    /// whole server's script cache, and a script loaded again could be flushed before its call.
    static SCRIPTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// [`SCRIPTS`], a client of the test server and a fresh name under `prefix`.
    async fn on_the_server(
        prefix: &str,
    ) -> (tokio::sync::MutexGuard<'static, ()>, RedisLock, LockName) {
        let alone = SCRIPTS.lock().await;
        let url = lockkit_testkit::service_url("LOCKKIT_REDIS_URL");
        let lock = RedisLock::connect(&url).await.unwrap();
        let name = LockName::new(&lockkit_testkit::fresh_name(prefix)).unwrap();
        (alone, lock, name)
    }

    /// Runs the acquisition script on a single instance with `proposed` as the proposed
    /// token; the token issued, and the lock's keys deleted again.
    async fn issued_for(lock: &RedisLock, name: &LockName, proposed: u64) -> i64 {
        let inner = &lock.inner;
        let keys = inner.keys(name);
        let proposed = proposed.to_string();
        let answers: Vec<Result<(i64, i64)>> = inner
            .on_all(
                Duration::from_secs(5),
                &scripts::ACQUIRE,
                &[
                    keys.lock(),
                    keys.fence(),
                    keys.queue(),
                    keys.alive(),
                    keys.asked(),
                ],
                &["owner", "5000", "0", "2000", keys.channel(), &proposed, "0"],
            )
            .await;
        let mut conn = inner.nodes[0].commands.clone();
        let deleted: i64 = redis::cmd("DEL")
            .arg(keys.lock())
            .arg(keys.fence())
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(deleted, 2);
        match answers.into_iter().next().unwrap().unwrap() {
            (1, token) => token,
            other => panic!("not taken: {other:?}"),
        }
    }

    async fn server_micros(lock: &RedisLock) -> i64 {
        let mut conn = lock.inner.nodes[0].commands.clone();
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
        secs * 1_000_000 + micros
    }

    /// A proposed token is issued only if it is at most `MAX_LEAD_US` ahead of the server's
    /// clock: a token never runs further ahead of it, so a lost fence counter is covered by
    /// that clock once it is that far past the last token.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_proposed_token_never_runs_far_ahead_of_the_server_clock() {
        let (_alone, lock, name) = on_the_server("lockkit-redis/proposal").await;

        let before = server_micros(&lock).await;
        let token = issued_for(&lock, &name, before as u64 + 3_600_000_000).await;
        let after = server_micros(&lock).await;
        assert!(
            (before..=after).contains(&token),
            "token {token} outside the server clock's {before}..={after}"
        );

        // Just ahead of the clock: issued as proposed, unless the clock has passed it by the
        // time the script runs (a machine that stalls the test for milliseconds), so a few
        // tries; a script that never takes a proposal fails them all.
        let mut issued = Vec::new();
        for _ in 0..5 {
            let near = server_micros(&lock).await + scripts::MAX_LEAD_US as i64 - 100;
            let token = issued_for(&lock, &name, near as u64).await;
            if token == near {
                break;
            }
            issued.push((near, token));
        }
        assert!(issued.len() < 5, "no proposal taken: {issued:?}");

        // Behind the clock: the clock wins.
        let before = server_micros(&lock).await;
        let token = issued_for(&lock, &name, 1).await;
        assert!(token >= before, "token {token} behind the clock {before}");
    }

    /// Every key of a name sits in the one string at its own place: the lock key, then the
    /// lock key with each suffix, the name percent-encoded inside the hash tag.
    #[test]
    fn keys_are_the_lock_key_and_its_suffixes() {
        let name = LockName::new("orders/42: {x}").unwrap();
        // A prefix of several-byte characters: every key still starts and ends where it should.
        let keys = Keys::new("ключ:", &name);
        let lock = "ключ:{orders%2F42%3A%20%7Bx%7D}";
        assert_eq!(keys.lock(), lock);
        // The names the servers hold (and other versions of lockkit use): written out, not
        // taken from `SUFFIXES`.
        let others = [
            (keys.fence(), ":fence"),
            (keys.value(), ":value"),
            (keys.channel(), ":released"),
            (keys.queue(), ":queue"),
            (keys.alive(), ":alive"),
            (keys.asked(), ":asked"),
        ];
        for (key, suffix) in others {
            assert_eq!(key, format!("{lock}{suffix}"));
        }
        assert_eq!(keys.turn_channel("ab"), format!("{lock}:released:ab"));
    }

    /// A server that forgot the scripts (a restart, `SCRIPT FLUSH`) is sent them again: the
    /// acquisition, renewal and release that follow still work.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scripts_the_server_forgot_are_loaded_again() {
        let (_alone, lock, name) = on_the_server("lockkit-redis/noscript").await;
        let opts = LockOptions::new();
        let mut conn = lock.inner.nodes[0].commands.clone();
        let flush = redis::cmd("SCRIPT").arg("FLUSH").clone();
        for _ in 0..2 {
            let () = flush.query_async(&mut conn).await.unwrap();
            let acquired = lock.lock(&name, &opts, None).await.unwrap();
            let () = flush.query_async(&mut conn).await.unwrap();
            acquired.lease.extend(Duration::from_secs(5)).await.unwrap();
            let () = flush.query_async(&mut conn).await.unwrap();
            acquired.lease.release().await.unwrap();
        }
        let held: Option<String> = redis::cmd("GET")
            .arg(lock.lock_key(&name))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(held, None);
    }

    #[tokio::test]
    async fn debug_never_shows_the_password() {
        // RedLock instances connect lazily: nothing needs to listen.
        let url = "redlock://u:s3cret@127.0.0.1:1,127.0.0.1:2,127.0.0.1:3?prefix=p:";
        let lock = RedisLock::connect(url).await.unwrap();
        assert_eq!(lock.quorum(), 2);
        let shown = format!("{lock:?}");
        assert!(
            shown.contains("127.0.0.1:2") && !shown.contains("s3cret"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn errors_about_broken_urls_never_show_the_password() {
        let mut leaks = Vec::new();
        for bad in [
            "redis://u:s3cret@a:1/db",
            "redis://u:s3cret@a:1/%ZZ",
            "redis://u:s3cret@a:1,b:2",
            "redis://u:s3cret@a:99999",
            "redis://u:s3cret@:1",
            "redis://u:s3cret@a:1?prefix",
            "redis://u:s3cret@a:1?colour=red",
            "redis://u:s3cret@a:1?unsafe_allow_eviction=maybe",
            "redis://u:s3cret@a b:1",
            "redis://u:s3cret@[::1:1",
            "redis://u:s3c/ret@a:1/x",
            "redis://u:s3c?ret@a:1",
            "redis://u:s3c#ret@a:1",
            "redis://u:s3cret%ZZ@a:1",
            "redis:u:s3cret@a:1",
            "redis:/u:s3cret@a:1",
            "redis//u:s3cret@a:1",
            "u:s3cret@a:1",
            "redis:://u:s3cret@a:1",
            " redis://u:s3cret@a:1",
            "http://u:s3cret@a:1",
            "redlock://u:s3cret@a:1,b:2",
            "redlock://u:s3cret@a:1,,c:3",
            "redlock://u:s3cret@a:1,b:2,c:x",
            "redlocks://u:s3cret@a:1,b:2,c:3/nodb",
        ] {
            let err = RedisLock::connect(bad).await.expect_err(bad);
            let shown = format!("{err} | {err:?}");
            if shown.contains("s3c") {
                leaks.push(format!("{bad}: {shown}"));
            }
        }
        assert!(leaks.is_empty(), "{leaks:#?}");
    }
}
