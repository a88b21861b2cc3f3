//! The ZooKeeper backend and its acquire path: an ephemeral sequential node per
//! acquisition, waiting on the deletion of the node just before ours.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use lockkit_core::backend::{
    run_detached, Acquired, Admin, Armed, Attempt, Backend, Capabilities, Cleanup, Connect,
    FencingToken, LockName, LockOptions,
};
use lockkit_core::{Error, Result};
use tokio::time::Instant;
use zookeeper_client as zk;

use crate::error::{in_transit, map_err, BACKEND};
use crate::lease::ZkLease;
use crate::options::ZkOptions;
use crate::session::{Health, Orphan, Session};

/// Marks the lock nodes of this crate; the sequence number follows it.
const LOCK_SUFFIX: &str = "-lock-";

/// What `try_lock`'s request found.
type Outcome = lockkit_core::backend::Outcome;

/// A lock service on a ZooKeeper ensemble (`zk://h1:2181,h2:2181/optional/chroot`).
///
/// Each acquisition creates an ephemeral sequential node `<root>/<encoded name>/_c_<uuid>-lock-N`;
/// the lowest sequence holds the lock, every other contender watches only its immediate
/// predecessor, so the lock is handed over in FIFO order without a thundering herd. The
/// fencing token is the node's `czxid`. The lease is the ZooKeeper session that owns the
/// node: one session per client and per session timeout (the TTL), shared by all the guards
/// with that TTL, and closed once unused for [`ZkOptions::session_idle_timeout`]. See the
/// crate documentation for the details.
#[derive(Debug, Clone)]
pub struct ZkLock {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    /// The connect string for the client crate: `h1:p1,h2:p2[/chroot]`.
    cluster: String,
    pub(crate) options: ZkOptions,
    /// Live sessions by requested session timeout (ms).
    sessions: tokio::sync::Mutex<HashMap<u64, Slot>>,
}

/// A session, and since when nothing but the map holds it.
#[derive(Debug)]
struct Slot {
    session: Arc<Session>,
    idle_since: Option<Instant>,
}

impl ZkLock {
    /// Connects with default options to `zk://host:port[,host:port…][/chroot][?root=/path]`
    /// (`zookeeper://` works too).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, ZkOptions::default()).await
    }

    /// Connects with `options`. What `options` sets wins over the URL's parameters: a
    /// `root=` in the URL applies only if `options.root` is `None`. A first session (with
    /// the default TTL as its timeout) is opened now, so an unreachable ensemble is reported
    /// here as [`Error::Connection`].
    pub async fn connect_with(url: &str, mut options: ZkOptions) -> Result<Self> {
        let cluster = options.apply_url(url)?;
        let lock = ZkLock {
            inner: Arc::new(Inner {
                cluster,
                options,
                sessions: tokio::sync::Mutex::new(HashMap::new()),
            }),
        };
        lock.inner.session(lockkit_core::DEFAULT_TTL).await?;
        tokio::spawn(reap(Arc::downgrade(&lock.inner)));
        Ok(lock)
    }

    /// The znode path (relative to the chroot) of the parent node under which the
    /// contenders for `name` queue.
    pub fn lock_path(&self, name: &LockName) -> String {
        self.inner.parent(name)
    }

    /// The raw client of the session this lock uses for guards with lease TTL `ttl`
    /// (opened now if there is none). Guards that hold locks through it lose them if the
    /// session expires or is closed; meant for inspection and fault-injection tests.
    pub async fn session_client(&self, ttl: Duration) -> Result<zk::Client> {
        Ok(self.inner.session(ttl).await?.client.clone())
    }
}

/// A node this client created: its path, `czxid` and owning session.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) session: Arc<Session>,
    pub(crate) path: String,
    pub(crate) czxid: i64,
}

impl Node {
    /// The node's name under its parent.
    fn child(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or("")
    }
}

/// An armed node is deleted in the background when dropped: a dropped `lock()` future, or an
/// attempt that failed after creating its node, leaves nothing queued.
impl Cleanup for Node {
    const WHAT: &'static str = "deleting a lock node";

    async fn cleanup(self) -> Result<()> {
        self.session.delete(&self.path).await
    }
}

/// `lock()`'s first request: our node, queued, and the same node as a lease, so a caller that
/// stops waiting during the request has it deleted.
/// With the queue as the create saw it, if it did, and when the create was sent.
struct Queued(Acquired, Node, Option<Vec<String>>, Instant);

impl Attempt for Queued {
    fn into_acquired(self) -> Option<Acquired> {
        Some(self.0)
    }
}

impl Inner {
    fn parent(&self, name: &LockName) -> String {
        format!("{}/{}", self.options.lock_root(), name.encoded())
    }

    /// The live session for guards with lease TTL `ttl`, opened if there is none (or the
    /// previous one was lost).
    async fn session(&self, ttl: Duration) -> Result<Arc<Session>> {
        let key = ttl.as_millis().min(u128::from(u64::MAX)) as u64;
        let mut sessions = self.sessions.lock().await;
        if let Some(slot) = sessions.get_mut(&key) {
            if slot.session.is_usable() {
                slot.idle_since = None;
                return Ok(slot.session.clone());
            }
            sessions.remove(&key);
        }
        let session = Arc::new(Session::open(&self.cluster, ttl, &self.options).await?);
        let slot = Slot {
            session: session.clone(),
            idle_since: None,
        };
        sessions.insert(key, slot);
        Ok(session)
    }

    /// Closes the sessions nobody uses (no guard, no waiter, no request): those idle for
    /// the idle timeout, and lost ones at once. The server limits connections per client
    /// address, so sessions for TTLs used once must not pile up.
    async fn close_idle(&self) {
        let now = Instant::now();
        let idle = self.options.session_idle_timeout;
        let mut sessions = self.sessions.lock().await;
        sessions.retain(|_, slot| {
            // Only the map holds it: nobody can take a new reference without this lock.
            if Arc::strong_count(&slot.session) > 1 {
                slot.idle_since = None;
                return true;
            }
            let since = *slot.idle_since.get_or_insert(now);
            slot.session.is_usable() && now.duration_since(since) < idle
        });
    }

    /// Renewals must come more often than the session timeout the server negotiated: a
    /// lease is known valid for at most that long after each.
    fn check_renewal(session: &Session, renew_every: Option<Duration>) -> Result<()> {
        match renew_every {
            Some(every) if every >= session.timeout => Err(Error::InvalidOptions(format!(
                "renewing every {every:?} cannot keep a ZooKeeper lease: the server negotiated \
                 a session timeout of {:?}; use a TTL below three times that, or renew more \
                 often",
                session.timeout
            ))),
            _ => Ok(()),
        }
    }

    /// Creates our ephemeral sequential node under `parent`, creating the parents on
    /// demand. A create whose answer was lost is found again by its unique marker.
    ///
    /// The children of `parent` are asked for in the same breath (requests of a session are
    /// sent at once and answered in order, so the list includes our node): the queue in
    /// queue order, if that answer came, saves a round trip after the create.
    async fn create_node(
        &self,
        session: &Arc<Session>,
        parent: &str,
    ) -> Result<(Node, Option<Vec<String>>)> {
        let marker = format!("_c_{}", uuid::Uuid::new_v4());
        let prefix = format!("{parent}/{marker}{LOCK_SUFFIX}");
        let client = &session.client;
        let mode = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
        for _ in 0..10 {
            let create = client.create(&prefix, b"", &mode);
            let children = client.list_children(parent);
            let created = session.request(create).await;
            match created {
                Ok((stat, sequence)) => {
                    let node = Node {
                        session: session.clone(),
                        path: format!("{prefix}{sequence}"),
                        czxid: stat.czxid,
                    };
                    let queue = session
                        .request(children)
                        .await
                        .ok()
                        .map(|children| queue_order(children, node.child()));
                    return Ok((node, queue));
                }
                Err(zk::Error::NoNode) => self.create_parent(session, parent).await?,
                Err(e) if in_transit(&e) => {
                    // The create may have gone through: look for our marker. Requests of a
                    // session are ordered, so a create the server got is visible now.
                    match self.find_marked(session, parent, &marker).await {
                        Ok(Some(node)) => return Ok((node, None)),
                        Ok(None) => return Err(map_err(e)),
                        Err(found) => {
                            // Still unsure: the session deletes it once it is visible.
                            session.orphan(Orphan::Marked {
                                parent: parent.to_string(),
                                marker,
                            });
                            return Err(found);
                        }
                    }
                }
                Err(e) => return Err(map_err(e)),
            }
        }
        Err(Error::backend(
            BACKEND,
            format!("the lock node {parent} kept disappearing while creating a contender"),
        ))
    }

    /// Creates the root (persistent) and the lock's parent (a container node, reaped by the
    /// server once empty).
    async fn create_parent(&self, session: &Session, parent: &str) -> Result<()> {
        let client = &session.client;
        let container = zk::CreateMode::Container.with_acls(zk::Acls::anyone_all());
        match session
            .request(client.create(parent, b"", &container))
            .await
        {
            Ok(_) | Err(zk::Error::NodeExists) => return Ok(()),
            Err(zk::Error::NoNode) => {}
            Err(e) => return Err(map_err(e)),
        }
        let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        let root = self.options.lock_root();
        match session.request(client.mkdir(root, &persistent)).await {
            Ok(()) => {}
            Err(zk::Error::NoNode) => {
                return Err(Error::InvalidOptions(format!(
                    "the chroot of `{}` does not exist: create it first",
                    self.cluster
                )))
            }
            Err(e) => return Err(map_err(e)),
        }
        match session
            .request(client.create(parent, b"", &container))
            .await
        {
            // NoNode: a racing reaper; the caller's create tries again.
            Ok(_) | Err(zk::Error::NodeExists | zk::Error::NoNode) => Ok(()),
            Err(e) => Err(map_err(e)),
        }
    }

    /// Our node with `marker` under `parent`, if it exists.
    async fn find_marked(
        &self,
        session: &Arc<Session>,
        parent: &str,
        marker: &str,
    ) -> Result<Option<Node>> {
        let children = session.request(session.client.list_children(parent)).await;
        let children = match children {
            Ok(children) => children,
            Err(zk::Error::NoNode) => return Ok(None),
            Err(e) => return Err(map_err(e)),
        };
        let Some(child) = children.into_iter().find(|c| c.starts_with(marker)) else {
            return Ok(None);
        };
        let path = format!("{parent}/{child}");
        match session.request(session.client.check_stat(&path)).await {
            Ok(Some(stat)) => Ok(Some(Node {
                session: session.clone(),
                path,
                czxid: stat.czxid,
            })),
            Ok(None) => Ok(None),
            Err(e) => Err(map_err(e)),
        }
    }

    /// The contenders under `parent` in queue order, as names; `mine` is our node's name.
    async fn queue(&self, session: &Session, parent: &str, mine: &str) -> Result<Vec<String>> {
        let children = session.request(session.client.list_children(parent)).await;
        let children = match children {
            Ok(children) => children,
            Err(zk::Error::NoNode) => Vec::new(),
            Err(e) => return Err(map_err(e)),
        };
        Ok(queue_order(children, mine))
    }

    fn acquired(&self, name: &LockName, node: Node, ttl: Duration, started: Instant) -> Acquired {
        let token = FencingToken(node.czxid.max(0) as u64);
        let valid_until = node.session.valid_until(started, ttl);
        node.session.hold(&node.path, node.czxid);
        let lease = ZkLease {
            name: name.clone(),
            node,
            handed_over: AtomicBool::new(false),
        };
        Acquired::new(token, valid_until, Box::new(lease))
    }

    /// `try_lock`'s request: create, and keep the node only if it is first in line.
    async fn attempt(self: Arc<Self>, name: LockName, opts: Renewal) -> Result<Outcome> {
        let (ttl, renew_every) = opts;
        let started = Instant::now();
        let session = self.session(ttl).await?;
        Self::check_renewal(&session, renew_every)?;
        let parent = self.parent(&name);
        let (node, queue) = self.create_node(&session, &parent).await?;
        let node = Armed::new(node);
        let queue = match queue {
            Some(queue) => queue,
            None => self.queue(&session, &parent, node.child()).await?,
        };
        if queue.first().map(String::as_str) == Some(node.child()) {
            let node = node.disarm();
            return Ok(Outcome::Won(self.acquired(&name, node, ttl, started)));
        }
        // Not first: take our node out of the queue again, waiting for the answer, so a
        // caller that retries at once does not find itself queued twice (if the delete
        // fails, the armed node is deleted in the background).
        let deleted = session.request(session.client.delete(&node.path, None));
        if let Ok(()) | Err(zk::Error::NoNode) = deleted.await {
            node.disarm();
        }
        Ok(Outcome::Busy(()))
    }

    /// `lock()`'s first request: queue up.
    async fn enqueue(self: Arc<Self>, name: LockName, opts: Renewal) -> Result<Queued> {
        let (ttl, renew_every) = opts;
        let started = Instant::now();
        let session = self.session(ttl).await?;
        Self::check_renewal(&session, renew_every)?;
        let (node, queue) = self.create_node(&session, &self.parent(&name)).await?;
        let acquired = self.acquired(&name, node.clone(), ttl, started);
        Ok(Queued(acquired, node, queue, started))
    }

    /// Waits until `node` is first in line: watches only its immediate predecessor. Returns
    /// when the request that saw it first was sent: the lease is known valid from then.
    /// `seen`: the queue as a request sent at that instant saw it, if there is one.
    async fn wait_turn(
        &self,
        name: &LockName,
        node: &Node,
        ttl: Duration,
        mut seen: Option<(Vec<String>, Instant)>,
    ) -> Result<Instant> {
        let session = &node.session;
        let parent = self.parent(name);
        let mine = node.child();
        loop {
            if let Health::Lost(why) = session.health() {
                return Err(Error::connection(BACKEND, format!("session lost: {why}")));
            }
            let (queue, asked) = match seen.take() {
                Some(seen) => seen,
                None => {
                    let asked = Instant::now();
                    (self.queue(session, &parent, mine).await?, asked)
                }
            };
            let Some(at) = queue.iter().position(|c| *c == mine) else {
                return Err(Error::connection(
                    BACKEND,
                    "our queued node vanished (session expired?)",
                ));
            };
            if at == 0 {
                return Ok(asked);
            }
            let predecessor = format!("{parent}/{}", queue[at - 1]);
            let watching = Instant::now();
            let watched = session
                .request(session.client.check_and_watch_stat(&predecessor))
                .await;
            match watched {
                Ok((None, _)) => continue,
                Ok((Some(_), watcher)) => {
                    let event = tokio::select! {
                        event = watcher.changed() => event,
                        why = session.lost() => {
                            return Err(Error::connection(BACKEND, format!("session lost: {why}")));
                        }
                    };
                    // The first in line just left: no node can come before ours any more
                    // (new nodes queue behind), so ours is first without listing again. The
                    // session was alive when the watch was set; that check counts as the
                    // grant's if it is recent enough to leave most of the lease.
                    let span = ttl.min(session.timeout);
                    if at == 1
                        && event.event_type == zk::EventType::NodeDeleted
                        && Instant::now() < watching + span / 2
                    {
                        return Ok(watching);
                    }
                }
                Err(e) => return Err(map_err(e)),
            }
        }
    }
}

#[async_trait]
impl Backend for ZkLock {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        let options = &self.inner.options;
        Capabilities::new(options.min_ttl)
            .fencing(true)
            .lease_expiry(true)
            .renewal(true)
            .networked(true)
            .fifo(true)
            .max_ttl(options.max_ttl)
            .admin(true, true, true)
            .election(true)
            .watch(true)
    }

    fn admin(&self) -> Option<&dyn Admin> {
        Some(self)
    }

    async fn try_lock(&self, name: &LockName, opts: &LockOptions) -> Result<Option<Acquired>> {
        let attempt = self.inner.clone().attempt(name.clone(), renewal(opts));
        Ok(run_detached(attempt).await?.into_acquired())
    }

    async fn lock(
        &self,
        name: &LockName,
        opts: &LockOptions,
        _deadline: Option<Instant>,
    ) -> Result<Acquired> {
        let enqueue = self.inner.clone().enqueue(name.clone(), renewal(opts));
        let Queued(_, node, queue, sent) = run_detached(enqueue).await?;
        // From here on, a dropped future deletes the node in the background.
        let node = Armed::new(node);
        let seen = queue.map(|queue| (queue, sent));
        let first = self.inner.wait_turn(name, &node, opts.ttl, seen).await?;
        Ok(self.inner.acquired(name, node.disarm(), opts.ttl, first))
    }
}

/// An acquisition's TTL, and its renewal interval if it renews automatically.
type Renewal = (Duration, Option<Duration>);

fn renewal(opts: &LockOptions) -> Renewal {
    (opts.ttl, opts.auto_renew.then(|| opts.renewal_interval()))
}

/// Closes the idle sessions of a lock service now and then, until the service is dropped.
async fn reap(inner: Weak<Inner>) {
    let Some(idle) = inner.upgrade().map(|i| i.options.session_idle_timeout) else {
        return;
    };
    let every = (idle / 2).clamp(Duration::from_millis(50), Duration::from_secs(10));
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.close_idle().await;
    }
}

/// The sequence number of a lock node name, if it is one of ours.
pub(crate) fn sequence_of(child: &str) -> Option<i64> {
    let (_, sequence) = child.rsplit_once(LOCK_SUFFIX)?;
    sequence.parse().ok()
}

/// The lock nodes among `children` in queue order; `mine` is our node's name.
///
/// Sequence numbers are the parent's `cversion`, an `i32` that wraps to negative after
/// 2^31 creates: ordered by value, a node created after the wrap would jump the queue (and
/// take the lock while it is held). So they are ordered by their distance from ours, as
/// wrapping 32-bit serial numbers: right for any queue shorter than 2^31.
fn queue_order(children: Vec<String>, mine: &str) -> Vec<String> {
    let Some(reference) = sequence_of(mine) else {
        return Vec::new();
    };
    let mut queue: Vec<(i64, String)> = children
        .into_iter()
        .filter_map(|c| Some((distance(reference, sequence_of(&c)?), c)))
        .collect();
    queue.sort();
    queue.into_iter().map(|(_, c)| c).collect()
}

/// How far `sequence` comes after `reference` (negative: before it).
fn distance(reference: i64, sequence: i64) -> i64 {
    match (i32::try_from(reference), i32::try_from(sequence)) {
        (Ok(reference), Ok(sequence)) => i64::from(sequence.wrapping_sub(reference)),
        // Not 32-bit sequence numbers (a server that counts in 64 bits): they do not wrap.
        _ => sequence.saturating_sub(reference),
    }
}

impl Connect for ZkLock {
    const SCHEMES: &'static [&'static str] = &["zk", "zookeeper"];

    async fn connect(url: &str) -> Result<Self> {
        ZkLock::connect(url).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node name as ZooKeeper makes it: the sequence is the parent's `cversion`, an `i32`
    /// printed as `%010d`.
    fn node(sequence: i32) -> String {
        format!("_c_{sequence}{LOCK_SUFFIX}{sequence:010}")
    }

    #[test]
    fn queue_order_survives_the_sequence_wrap() {
        let order = |children: &[i32], mine: i32| -> Vec<i64> {
            let mut names: Vec<String> = children.iter().map(|&s| node(s)).collect();
            names.push("not-a-lock-node".into());
            queue_order(names, &node(mine))
                .iter()
                .map(|c| sequence_of(c).unwrap())
                .collect()
        };
        assert_eq!(order(&[10, 2, 9], 9), [2, 9, 10]);
        let wrapped = [i32::MIN + 1, i32::MAX, i32::MIN, i32::MAX - 2, i32::MAX - 1];
        let expected = [
            i64::from(i32::MAX - 2),
            i64::from(i32::MAX - 1),
            i64::from(i32::MAX),
            i64::from(i32::MIN),
            i64::from(i32::MIN + 1),
        ];
        for mine in wrapped {
            assert_eq!(order(&wrapped, mine), expected, "seen from {mine}");
        }
        // From -1 the counter goes on to 0.
        assert_eq!(order(&[1, -1, 0, -2], -2), [-2, -1, 0, 1]);
        assert_eq!(node(-5), "_c_-5-lock--000000005");
    }
}
