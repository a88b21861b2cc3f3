//! Release channels shared by all waiters of one client: one subscription per channel, however
//! many waiters, and one waiter woken per release message: the queued waiter the message
//! names (a single instance), or any one waiter (RedLock's `released`). Leader observers
//! ([`Admin::changed`](lockkit_core::backend::Admin::changed)) share the same subscription
//! and wake on every message (`taken` and `value` wake only them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use lockkit_core::backend::{Armed, Cleanup};
use lockkit_core::Result;
use redis::aio::ConnectionManager;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::Notify;

/// How long one SUBSCRIBE or UNSUBSCRIBE may take before the waiter falls back to polling.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
pub(crate) struct Subscriptions {
    /// What the push callback wakes, per channel.
    notifies: Mutex<HashMap<String, Waiters>>,
    /// Waiters per channel. Held across SUBSCRIBE/UNSUBSCRIBE so they reach the server in order.
    counts: tokio::sync::Mutex<HashMap<String, usize>>,
}

/// The waiters of one channel in this client.
#[derive(Debug, Default)]
struct Waiters {
    /// Woken by a message that names no waiter of ours (RedLock's `released`).
    any: Arc<Notify>,
    /// Queued waiters by owner id, woken by a message that names them.
    named: HashMap<Arc<str>, Arc<Notify>>,
    /// Leader observers, all woken by every message.
    observers: Arc<Notify>,
}

impl Waiters {
    fn all(&self) -> impl Iterator<Item = &Arc<Notify>> {
        [&self.any, &self.observers]
            .into_iter()
            .chain(self.named.values())
    }
}

/// Who subscribes to a channel.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Role<'a> {
    /// A RedLock waiter: woken by a message that names no queued waiter of this client.
    Any,
    /// A queued waiter (a single instance), by its owner id: woken by the messages naming it.
    Queued(&'a Arc<str>),
    /// A leader observer: woken by every message (through `Notify::notify_waiters`, so
    /// only a `Notified` created before the message sees it).
    Observer,
}

/// Messages for leader observers only: a lock taken, a holder's value stored.
fn for_observers_only(payload: &Value) -> bool {
    matches!(payload, Value::BulkString(p) if p == b"taken" || p == b"value")
}

impl Subscriptions {
    fn notifies(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiters>> {
        self.notifies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by the connection for every push message.
    pub(crate) fn on_push(&self, push: PushInfo) {
        match push.kind {
            PushKind::Message => {
                if let [Value::BulkString(channel), payload, ..] = push.data.as_slice() {
                    let channel = String::from_utf8_lossy(channel);
                    if let Some(waiters) = self.notifies().get(channel.as_ref()) {
                        waiters.observers.notify_waiters();
                        if for_observers_only(payload) {
                            return;
                        }
                        let named = match payload {
                            Value::BulkString(owner) => std::str::from_utf8(owner)
                                .ok()
                                .and_then(|owner| waiters.named.get(owner)),
                            _ => None,
                        };
                        // One waiter per message: no stampede on a release.
                        match named {
                            Some(notify) => notify.notify_one(),
                            // Another client's waiter's turn, or a RedLock release.
                            None if waiters.named.is_empty() => waiters.any.notify_one(),
                            None => {}
                        }
                    }
                }
            }
            // Messages may have been lost while disconnected: everyone re-checks.
            PushKind::Disconnection => {
                for waiters in self.notifies().values() {
                    waiters.all().for_each(|notify| notify.notify_waiters());
                }
            }
            _ => {}
        }
    }

    /// Subscribes to `channel` on every node (unless this client already is) for as long as
    /// the returned guard lives. Nodes that fail to subscribe are left to the fallback poll.
    /// What wakes the subscriber depends on its `role`. Cancel-safe: a subscriber dropped
    /// while the SUBSCRIBE is on its way gives its hold back in the background.
    pub(crate) async fn subscribe(
        self: &Arc<Self>,
        channel: &str,
        role: Role<'_>,
        nodes: Vec<ConnectionManager>,
    ) -> Armed<Subscription> {
        let mut counts = self.counts.lock().await;
        let count = counts.entry(channel.to_string()).or_insert(0);
        *count += 1;
        let first = *count == 1;
        let notify = {
            let mut notifies = self.notifies();
            let waiters = notifies.entry(channel.to_string()).or_default();
            match role {
                Role::Queued(owner) => waiters.named.entry(owner.clone()).or_default().clone(),
                Role::Any => waiters.any.clone(),
                Role::Observer => waiters.observers.clone(),
            }
        };
        let owner = match role {
            Role::Queued(owner) => Some(owner.clone()),
            Role::Any | Role::Observer => None,
        };
        // Armed before the first await: counted now, so given back if dropped.
        let subscription = Armed::new(Subscription {
            subscriptions: self.clone(),
            channel: channel.to_string(),
            owner,
            nodes,
            notify,
        });
        if first {
            on_nodes(&subscription.nodes, channel, true).await;
        }
        drop(counts);
        subscription
    }

    async fn unsubscribe(
        &self,
        channel: String,
        owner: Option<Arc<str>>,
        nodes: Vec<ConnectionManager>,
    ) {
        let mut counts = self.counts.lock().await;
        let Some(count) = counts.get_mut(&channel) else {
            return;
        };
        if let Some(owner) = owner {
            if let Some(waiters) = self.notifies().get_mut(&channel) {
                waiters.named.remove(&owner);
            }
        }
        *count -= 1;
        if *count == 0 {
            counts.remove(&channel);
            self.notifies().remove(&channel);
            on_nodes(&nodes, &channel, false).await;
        }
    }
}

async fn on_nodes(nodes: &[ConnectionManager], channel: &str, subscribe: bool) {
    join_all(nodes.iter().map(|node| async move {
        let mut node = node.clone();
        let request = async {
            if subscribe {
                node.subscribe(channel).await
            } else {
                node.unsubscribe(channel).await
            }
        };
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, request).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(channel, subscribe, error = %e, "(un)subscribe failed"),
            Err(_) => tracing::debug!(channel, subscribe, "(un)subscribe timed out"),
        }
    }))
    .await;
}

/// A waiter's hold on a channel subscription.
pub(crate) struct Subscription {
    subscriptions: Arc<Subscriptions>,
    channel: String,
    /// The queued waiter's owner id, if it queued.
    owner: Option<Arc<str>>,
    nodes: Vec<ConnectionManager>,
    notify: Arc<Notify>,
}

impl Subscription {
    /// Notified when a release message arrives on the channel.
    pub(crate) fn notify(&self) -> Arc<Notify> {
        self.notify.clone()
    }
}

/// Dropping the waiter's hold unsubscribes in the background once no waiter is left.
impl Cleanup for Subscription {
    const WHAT: &'static str = "unsubscribing from a release channel";

    async fn cleanup(self) -> Result<()> {
        self.subscriptions
            .unsubscribe(self.channel, self.owner, self.nodes)
            .await;
        Ok(())
    }
}
