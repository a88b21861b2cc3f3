//! One ZooKeeper session, the watch over its state that decides when its locks are lost,
//! and the deletes it still owes the server.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lockkit_core::{Error, Result};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};
use zookeeper_client as zk;

use crate::error::{in_transit, map_err, SessionError, BACKEND};
use crate::ZkOptions;

/// Whether a session can still be trusted to hold its nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Health {
    /// Connected to a server.
    Connected,
    /// Disconnected; the client is trying to reconnect before the session times out.
    Suspended,
    /// Expired, closed, failed authentication, or disconnected for a whole session timeout:
    /// its ephemeral nodes are gone or must be presumed gone.
    Lost(String),
}

/// A ZooKeeper session shared by every guard of one client that has the same TTL.
///
/// A monitor task follows the session's state: `Expired`, `Closed` and `AuthFailed` make it
/// [`Health::Lost`] at once. `Disconnected` makes it [`Health::Suspended`]; the client only
/// notices a dead connection after its connection timeout (2/5 of the session timeout) of
/// silence, so the server may expire the session one session timeout after the last
/// contact, that is 3/5 of the session timeout after we see the disconnect. If the session
/// has not reconnected by then, it is [`Health::Lost`] too (and stays lost even if it
/// reconnects later: a new session is opened for new acquisitions).
///
/// A delete that fails on a connection problem (a release, or the clean-up of a queued node)
/// is not abandoned: it is handed to the session's janitor, which deletes the node once the
/// session is connected again. Otherwise a session that reconnects after a silent disconnect
/// would keep the node, and with it the lock, for as long as the process lives.
///
/// Dropping the last reference closes the session (the client's own clones are dropped with
/// the tasks), and the server deletes whatever ephemeral nodes it still has.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) client: zk::Client,
    /// The session timeout the server negotiated: how long after our last contact it may
    /// expire the session, and so the longest a lease on it is known valid.
    pub(crate) timeout: Duration,
    request_timeout: Duration,
    health: watch::Receiver<Health>,
    orphans: Arc<Orphans>,
    held: Arc<Mutex<Held>>,
    tasks: [JoinHandle<()>; 3],
}

/// The nodes the session holds locks with, checked all together every quarter of the
/// lease span (`min(TTL, session timeout)`) in one multi-read: a renewal then needs no
/// request of its own, however many guards the session has.
#[derive(Debug, Default)]
struct Held {
    /// Path and `czxid` of each held node.
    nodes: HashMap<String, i64>,
    /// Held nodes the last check found deleted or replaced.
    gone: HashSet<String>,
    /// When the last check that completed was sent: the session was alive then.
    confirmed: Option<Instant>,
}

/// What the session's last check says about a held node.
pub(crate) enum Checked {
    /// In place, as of a check sent at this instant.
    Since(Instant),
    /// Deleted or replaced.
    Gone,
}

/// The most nodes one multi-read checks.
const CHECK_BATCH: usize = 500;

impl Drop for Session {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A node the session must still delete.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Orphan {
    /// The node at this path.
    Node(String),
    /// Our node under `parent` whose name starts with `marker`, if there is one: a create
    /// whose answer was lost.
    Marked { parent: String, marker: String },
}

/// The deletes a session owes, and a wake-up for its janitor when one is added.
#[derive(Debug, Default)]
struct Orphans {
    pending: Mutex<HashSet<Orphan>>,
    added: Notify,
}

impl Orphans {
    fn pending(&self) -> MutexGuard<'_, HashSet<Orphan>> {
        // Never held across an await or a panic point.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The janitor's pause after a failed round, doubled up to the maximum.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

impl Session {
    /// Opens a session whose timeout is `ttl` (clamped by the server).
    pub(crate) async fn open(cluster: &str, ttl: Duration, options: &ZkOptions) -> Result<Self> {
        let connector = zk::Client::connector()
            .with_session_timeout(ttl.min(Duration::from_millis(i32::MAX as u64)))
            .with_fail_eagerly();
        let client =
            match tokio::time::timeout(options.connect_timeout, connector.connect(cluster)).await {
                Ok(Ok(client)) => client,
                Ok(Err(zk::Error::BadArguments(why))) => {
                    return Err(Error::InvalidOptions(format!(
                        "bad ZooKeeper connect string `{cluster}`: {why}"
                    )))
                }
                Ok(Err(source)) => {
                    let cluster = cluster.to_string();
                    return Err(Error::connection(BACKEND, SessionError { cluster, source }));
                }
                Err(_) => {
                    return Err(Error::connection(
                        BACKEND,
                        format!(
                            "no session on {cluster} within {:?}",
                            options.connect_timeout
                        ),
                    ))
                }
            };
        let negotiated = client.session_timeout();
        if negotiated > ttl {
            tracing::debug!(
                ?ttl,
                ?negotiated,
                "the server raised the session timeout above the TTL: a crashed holder keeps \
                 the lock for the session timeout"
            );
        }
        let (tx, health) = watch::channel(Health::Connected);
        let orphans = Arc::new(Orphans::default());
        let held = Arc::new(Mutex::new(Held::default()));
        let every = (ttl.min(negotiated) / 4).max(Duration::from_millis(10));
        let checker = tokio::spawn(check_held(
            client.clone(),
            held.clone(),
            every,
            options.request_timeout,
        ));
        let monitor = tokio::spawn(monitor(client.state_watcher(), negotiated, tx));
        let janitor = tokio::spawn(janitor(
            client.clone(),
            orphans.clone(),
            options.request_timeout,
        ));
        Ok(Session {
            client,
            timeout: negotiated,
            request_timeout: options.request_timeout,
            health,
            orphans,
            held,
            tasks: [monitor, janitor, checker],
        })
    }

    /// Until when a lease confirmed by a request sent at `sent` is known valid: `ttl` later,
    /// and never later than the session timeout, after which the server may have expired
    /// the session (and deleted the node) without our hearing of it.
    pub(crate) fn valid_until(&self, sent: Instant, ttl: Duration) -> Instant {
        sent + ttl.min(self.timeout)
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        lock(&self.held)
    }

    /// Adds a node to those the session checks together.
    pub(crate) fn hold(&self, path: &str, czxid: i64) {
        let mut held = self.held();
        held.gone.remove(path);
        held.nodes.insert(path.to_string(), czxid);
    }

    /// Stops checking a node (its lock was released).
    pub(crate) fn unhold(&self, path: &str) {
        let mut held = self.held();
        held.nodes.remove(path);
        held.gone.remove(path);
    }

    /// What the session's last check found about the held node at `path`, if it is fresh
    /// enough for a lease of `span`: sent less than half of `span` ago. `None`: ask the
    /// server about this node.
    pub(crate) fn checked(&self, path: &str, span: Duration) -> Option<Checked> {
        let held = self.held();
        if held.gone.contains(path) {
            return Some(Checked::Gone);
        }
        if !held.nodes.contains_key(path) {
            return None;
        }
        let sent = held.confirmed?;
        (Instant::now() < sent + span / 2).then_some(Checked::Since(sent))
    }

    /// The session's health now.
    pub(crate) fn health(&self) -> Health {
        self.health.borrow().clone()
    }

    /// Whether new acquisitions may use this session.
    pub(crate) fn is_usable(&self) -> bool {
        !matches!(self.health(), Health::Lost(_))
    }

    /// Resolves with the reason once the session is lost. Cancel-safe.
    pub(crate) async fn lost(&self) -> String {
        let mut health = self.health.clone();
        let lost = health
            .wait_for(|h| matches!(h, Health::Lost(_)))
            .await
            .map(|h| h.clone());
        match lost {
            Ok(Health::Lost(why)) => why,
            // The monitor is gone only when the session is dropped.
            _ => std::future::pending().await,
        }
    }

    /// Runs one request with the request timeout.
    pub(crate) async fn request<T>(
        &self,
        future: impl Future<Output = std::result::Result<T, zk::Error>>,
    ) -> std::result::Result<T, zk::Error> {
        tokio::time::timeout(self.request_timeout, future)
            .await
            .unwrap_or(Err(zk::Error::Timeout))
    }

    /// Deletes `path` (a node already gone is fine). On a connection problem the delete is
    /// handed to the janitor, which retries it whenever the session is connected, and the
    /// error is returned.
    pub(crate) async fn delete(&self, path: &str) -> Result<()> {
        match self.request(self.client.delete(path, None)).await {
            Ok(()) | Err(zk::Error::NoNode | zk::Error::BadVersion) => Ok(()),
            Err(e) if in_transit(&e) => {
                self.orphan(Orphan::Node(path.to_string()));
                Err(map_err(e))
            }
            Err(e) => Err(map_err(e)),
        }
    }

    /// Hands `orphan` to the janitor: it is deleted as soon as the session is connected.
    pub(crate) fn orphan(&self, orphan: Orphan) {
        tracing::debug!(?orphan, "deleting once the session is connected");
        self.orphans.pending().insert(orphan);
        self.orphans.added.notify_one();
    }
}

/// Deletes the session's orphans whenever it is connected, retrying each until it is gone.
/// Ends when the session ends: the server deletes its ephemeral nodes then.
async fn janitor(client: zk::Client, orphans: Arc<Orphans>, request_timeout: Duration) {
    let mut states = client.state_watcher();
    let mut pause = RETRY_MIN;
    loop {
        let pending: Vec<Orphan> = orphans.pending().iter().cloned().collect();
        if pending.is_empty() {
            // A permit stored by `notify_one` since the check wakes this at once.
            orphans.added.notified().await;
            continue;
        }
        match states.state() {
            zk::SessionState::SyncConnected => {}
            // A read-only server refuses deletes: wait for a writable one.
            zk::SessionState::Disconnected | zk::SessionState::ConnectedReadOnly => {
                states.changed().await;
                continue;
            }
            _ => return,
        }
        let mut failed = false;
        for orphan in pending {
            let deleted = tokio::time::timeout(request_timeout, delete_orphan(&client, &orphan));
            match deleted.await.unwrap_or(Err(zk::Error::Timeout)) {
                Ok(()) => {}
                Err(e) if in_transit(&e) => {
                    failed = true;
                    continue;
                }
                Err(zk::Error::SessionExpired | zk::Error::ClientClosed) => return,
                Err(e) => tracing::warn!(error = %e, ?orphan, "cannot delete a lock node"),
            }
            orphans.pending().remove(&orphan);
        }
        if failed {
            tokio::select! {
                _ = sleep(pause) => {}
                _ = states.changed() => {}
            }
            pause = (pause * 2).min(RETRY_MAX);
        } else {
            pause = RETRY_MIN;
        }
    }
}

/// Locks the held nodes (never held across an await or a panic point).
fn lock(held: &Mutex<Held>) -> MutexGuard<'_, Held> {
    held.lock().unwrap_or_else(|e| e.into_inner())
}

/// Checks every held node of the session, `every` so often, in multi-reads: a node that is
/// gone or no longer the session's is marked gone; a check that completes confirms the
/// session (and so every other node) as of when it was sent.
async fn check_held(
    client: zk::Client,
    held: Arc<Mutex<Held>>,
    every: Duration,
    request_timeout: Duration,
) {
    let session = client.session_id().0;
    loop {
        sleep(every).await;
        let nodes: Vec<(String, i64)> = {
            let held = lock(&held);
            held.nodes.iter().map(|(p, c)| (p.clone(), *c)).collect()
        };
        if nodes.is_empty() || client.state() != zk::SessionState::SyncConnected {
            continue;
        }
        let sent = Instant::now();
        let mut complete = true;
        for chunk in nodes.chunks(CHECK_BATCH) {
            let mut reader = client.new_multi_reader();
            if chunk
                .iter()
                .any(|(path, _)| reader.add_get_data(path).is_err())
            {
                complete = false;
                break;
            }
            let results = match tokio::time::timeout(request_timeout, reader.commit()).await {
                Ok(Ok(results)) => results,
                _ => {
                    complete = false;
                    break;
                }
            };
            let mut held = lock(&held);
            for ((path, czxid), result) in chunk.iter().zip(results) {
                let mine = matches!(
                    result,
                    zk::MultiReadResult::Data { stat, .. }
                        if stat.czxid == *czxid && stat.ephemeral_owner == session
                );
                if !mine && held.nodes.contains_key(path) {
                    held.gone.insert(path.clone());
                }
            }
        }
        if complete {
            lock(&held).confirmed = Some(sent);
        }
    }
}

/// Deletes one orphan; one already gone is fine.
async fn delete_orphan(client: &zk::Client, orphan: &Orphan) -> std::result::Result<(), zk::Error> {
    let path = match orphan {
        Orphan::Node(path) => path.clone(),
        Orphan::Marked { parent, marker } => {
            // Requests of a session are ordered: a create the server got is visible now.
            let children = match client.list_children(parent).await {
                Ok(children) => children,
                Err(zk::Error::NoNode) => return Ok(()),
                Err(e) => return Err(e),
            };
            match children
                .into_iter()
                .find(|c| c.starts_with(marker.as_str()))
            {
                Some(child) => format!("{parent}/{child}"),
                None => return Ok(()),
            }
        }
    };
    match client.delete(&path, None).await {
        Ok(()) | Err(zk::Error::NoNode) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Follows the session state into `health` until the session is lost.
async fn monitor(
    mut states: zk::StateWatcher,
    session_timeout: Duration,
    health: watch::Sender<Health>,
) {
    // Of a session timeout, what is left when the client notices a dead connection.
    let grace = session_timeout - session_timeout * 2 / 5;
    let mut state = states.state();
    let mut deadline: Option<Instant> = None;
    loop {
        match state {
            zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                deadline = None;
                health.send_replace(Health::Connected);
            }
            zk::SessionState::Disconnected => {
                deadline.get_or_insert_with(|| Instant::now() + grace);
                health.send_replace(Health::Suspended);
            }
            terminal => {
                let why = match terminal {
                    zk::SessionState::Expired => "the ZooKeeper session expired".to_string(),
                    zk::SessionState::Closed => "the ZooKeeper session was closed".to_string(),
                    other => format!("the ZooKeeper session ended: {other}"),
                };
                health.send_replace(Health::Lost(why));
                return;
            }
        }
        tokio::select! {
            next = states.changed() => state = next,
            _ = async { sleep_until(deadline.expect("suspended")).await }, if deadline.is_some() => {
                health.send_replace(Health::Lost(format!(
                    "disconnected from ZooKeeper for the session timeout ({session_timeout:?})"
                )));
                return;
            }
        }
    }
}
