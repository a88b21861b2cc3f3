//! One ZooKeeper session and the watch over its state that decides when its locks are lost.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lockkit_core::{Error, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use zookeeper_client as zk;

use crate::error::{map_err, SessionError, BACKEND};
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
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) client: zk::Client,
    request_timeout: Duration,
    health: watch::Receiver<Health>,
    monitor: JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.monitor.abort();
    }
}

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
        let monitor = tokio::spawn(monitor(client.state_watcher(), negotiated, tx));
        Ok(Session {
            client,
            request_timeout: options.request_timeout,
            health,
            monitor,
        })
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

    /// Deletes `path`, retrying connection losses briefly; a node already gone is fine.
    pub(crate) async fn delete(&self, path: &str) -> Result<()> {
        let mut result = Ok(());
        for _ in 0..3 {
            match self.request(self.client.delete(path, None)).await {
                Ok(()) | Err(zk::Error::NoNode | zk::Error::BadVersion) => return Ok(()),
                Err(e @ (zk::Error::ConnectionLoss | zk::Error::Timeout)) => {
                    result = Err(map_err(e))
                }
                Err(e) => return Err(map_err(e)),
            }
        }
        result
    }

    /// Finds our node by its `marker` under `parent` and deletes it: for a create whose
    /// answer was lost and that could not be resolved at once.
    pub(crate) async fn delete_marked(
        self: Arc<Self>,
        parent: String,
        marker: String,
    ) -> Result<()> {
        let mut result = Ok(());
        for _ in 0..3 {
            let children = match self.request(self.client.list_children(&parent)).await {
                Ok(children) => children,
                Err(zk::Error::NoNode) => return Ok(()),
                Err(e) => {
                    result = Err(map_err(e));
                    continue;
                }
            };
            return match children.into_iter().find(|c| c.starts_with(&marker)) {
                Some(child) => self.delete(&format!("{parent}/{child}")).await,
                None => Ok(()),
            };
        }
        result
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
