//! Release channels: one subscription per channel and client, however many of its waiters
//! listen, and one waiter woken per message. A queued waiter (a single instance) listens on
//! a channel of its own (`<name's channel>:<owner>`), so a message that hands it the lock
//! (`<owner> <token> <attempt>`, see [`RELEASE`](crate::scripts::RELEASE)) reaches no other
//! client; it leaves the [`Grant`] for that waiter to take. RedLock waiters share the
//! name's channel and any one of them wakes on `released`. Leader observers
//! ([`Admin::changed`](lockkit_core::backend::Admin::changed)) listen on the name's channel
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
    /// Waiters per channel, each count behind a lock of its own that is held across that
    /// channel's SUBSCRIBE/UNSUBSCRIBE, so they reach the server in order; channels do not
    /// wait for one another (every queued waiter has a channel of its own).
    counts: Mutex<HashMap<String, Arc<Slot>>>,
}

/// One channel's waiter count; `None` once its last waiter unsubscribed and the slot left
/// the map (a subscriber that waited for it takes a new one).
type Slot = tokio::sync::Mutex<Option<usize>>;

/// The waiters of one channel in this client.
#[derive(Debug, Default)]
struct Waiters {
    /// Woken by a message that names no waiter of ours (RedLock's `released`).
    any: Arc<Notify>,
    /// Queued waiters by owner id, woken by a message that names them.
    named: HashMap<Arc<str>, Named>,
    /// Leader observers, all woken by every message.
    observers: Arc<Notify>,
}

impl Waiters {
    fn all(&self) -> impl Iterator<Item = &Arc<Notify>> {
        [&self.any, &self.observers]
            .into_iter()
            .chain(self.named.values().map(|n| &n.notify))
    }
}

/// One queued waiter of this client: what wakes it, and the hand-off it was last told of.
#[derive(Debug, Default, Clone)]
struct Named {
    notify: Arc<Notify>,
    grant: Arc<Mutex<Option<Grant>>>,
}

/// A release handed the lock to a queued waiter: it is the owner already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grant {
    /// The fencing token issued for it.
    pub(crate) token: u64,
    /// The number of the waiter's latest attempt the server had seen when it granted the
    /// lock: the lease is valid at least from when the waiter sent that attempt.
    pub(crate) attempt: u64,
}

/// A message naming a queued waiter: its owner id, and the grant if it hands it the lock
/// (`<owner> <token> <attempt>`). A grant that does not parse is only a wake-up: the
/// waiter's next attempt finds the lock its own.
fn parse_turn(payload: &[u8]) -> Option<(&str, Option<Grant>)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut words = text.split(' ');
    let owner = words.next()?;
    let grant = match (words.next(), words.next(), words.next()) {
        (Some(token), Some(attempt), None) => match (token.parse(), attempt.parse()) {
            (Ok(token), Ok(attempt)) => Some(Grant { token, attempt }),
            _ => None,
        },
        _ => None,
    };
    Some((owner, grant))
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
        lock(&self.notifies)
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
                            Value::BulkString(payload) => {
                                parse_turn(payload).and_then(|(owner, grant)| {
                                    Some((waiters.named.get(owner)?, grant))
                                })
                            }
                            _ => None,
                        };
                        // One waiter per message: no stampede on a release.
                        match named {
                            Some((named, grant)) => {
                                if grant.is_some() {
                                    *lock(&named.grant) = grant;
                                }
                                named.notify.notify_one();
                            }
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
        let mut count = loop {
            let slot = lock(&self.counts)
                .entry(channel.to_string())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(Some(0))))
                .clone();
            let count = slot.lock_owned().await;
            if count.is_some() {
                break count;
            }
        };
        let waiters = count.get_or_insert(0);
        *waiters += 1;
        let first = *waiters == 1;
        let Named { notify, grant } = {
            let mut notifies = self.notifies();
            let waiters = notifies.entry(channel.to_string()).or_default();
            match role {
                Role::Queued(owner) => waiters.named.entry(owner.clone()).or_default().clone(),
                Role::Any => Named {
                    notify: waiters.any.clone(),
                    grant: Arc::default(),
                },
                Role::Observer => Named {
                    notify: waiters.observers.clone(),
                    grant: Arc::default(),
                },
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
            grant,
        });
        if first {
            on_nodes(&subscription.nodes, channel, true).await;
        }
        drop(count);
        subscription
    }

    async fn unsubscribe(
        &self,
        channel: String,
        owner: Option<Arc<str>>,
        nodes: Vec<ConnectionManager>,
    ) {
        let Some(slot) = lock(&self.counts).get(&channel).cloned() else {
            return;
        };
        let mut count = slot.lock().await;
        let Some(waiters) = count.as_mut() else {
            return;
        };
        if let Some(owner) = owner {
            if let Some(waiters) = self.notifies().get_mut(&channel) {
                waiters.named.remove(&owner);
            }
        }
        *waiters -= 1;
        if *waiters == 0 {
            self.notifies().remove(&channel);
            on_nodes(&nodes, &channel, false).await;
            // Retired before it leaves the map: a subscriber that waited for it takes a new
            // slot, and subscribes after this UNSUBSCRIBE.
            *count = None;
            let mut counts = lock(&self.counts);
            if counts.get(&channel).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                counts.remove(&channel);
            }
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
    /// The hand-off last announced to this (queued) waiter, until taken.
    grant: Arc<Mutex<Option<Grant>>>,
}

impl Subscription {
    /// Notified when a release message arrives on the channel.
    pub(crate) fn notify(&self) -> Arc<Notify> {
        self.notify.clone()
    }

    /// The hand-off last announced to this waiter since the previous call, if any.
    pub(crate) fn take_grant(&self) -> Option<Grant> {
        lock(&self.grant).take()
    }
}

/// Locks `mutex`, whether or not a holder panicked (what it guards stays consistent).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One channel's SUBSCRIBE in flight (its slot locked) holds up no other channel; the last
    /// waiter's leaving retires the slot, and the next subscriber counts on a fresh one.
    /// (Without nodes: no request leaves.)
    #[tokio::test]
    async fn channels_do_not_wait_for_one_another() {
        let subs = Arc::new(Subscriptions::default());
        let a = subs.subscribe("a", Role::Any, Vec::new()).await;
        let slot = lock(&subs.counts).get("a").cloned().expect("a's slot");
        let in_flight = slot.lock().await;
        let b = tokio::time::timeout(
            Duration::from_secs(1),
            subs.subscribe("b", Role::Any, Vec::new()),
        )
        .await
        .expect("b waited for a's request");
        drop(in_flight);
        a.disarm().cleanup().await.unwrap();
        assert!(lock(&subs.counts).get("a").is_none(), "a's slot stayed");
        assert_eq!(*slot.lock().await, None, "a's slot was not retired");
        let _again = subs.subscribe("a", Role::Any, Vec::new()).await;
        let fresh = lock(&subs.counts).get("a").cloned().expect("a new slot");
        assert!(!Arc::ptr_eq(&fresh, &slot));
        assert_eq!(*fresh.lock().await, Some(1));
        let b_slot = lock(&subs.counts)["b"].clone();
        assert_eq!(*b_slot.lock().await, Some(1));
        drop(b.disarm());
    }

    #[test]
    fn a_turn_names_the_waiter_and_maybe_hands_it_the_lock() {
        let grant = Grant {
            token: 1_700_000_000_000_001,
            attempt: 3,
        };
        assert_eq!(
            parse_turn(b"ab12 1700000000000001 3"),
            Some(("ab12", Some(grant)))
        );
        assert_eq!(parse_turn(b"ab12"), Some(("ab12", None)));
        // Malformed grants only wake the waiter: its next attempt looks for itself.
        for odd in [&b"ab12 x 3"[..], b"ab12 1 2 3", b"ab12 1", b"ab12 -1 3"] {
            assert_eq!(parse_turn(odd), Some(("ab12", None)), "{odd:?}");
        }
        assert_eq!(parse_turn(b"\xff\xfe 1 2"), None);
    }
}
