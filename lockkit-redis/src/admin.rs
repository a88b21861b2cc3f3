//! The operator's view: who holds a lock, which locks are held, and removing a stuck one.
//!
//! A lock is held where its lock key exists; the holder's token is the name's fence key
//! (which never expires), its owner the lock key's value, its remaining lease the key's
//! PTTL. With RedLock a lock counts as held when a quorum of instances has the same owner.
//! A forced release deletes the lock key on every instance and tells the waiters; the fence
//! key stays, so the next holder's token is higher.
//!
//! The holder's value ([`Lease::set_value`](lockkit_core::backend::Lease::set_value)) is the
//! name's value key, `<owner> <sequence> <token> <value>`: shown only when its owner is the
//! holder (owner ids are fresh for every acquisition), from the instance with the highest
//! sequence number, and with the token stored there (with RedLock the highest fence may be
//! past the holder's token when a contender's partial win was undone; a holder without a
//! value is shown with that highest fence). [`Admin::changed`] subscribes to the name's channel (sharing RedLock waiters'
//! subscription), on which an acquisition or a hand-off to a queued waiter publishes `taken`,
//! a release that hands nothing on `released` and a stored value `value` (a queued waiter's
//! own messages go to its own channel); an expiry publishes nothing, so the caller's deadline
//! (bounded by the holder's remaining lease) covers it.

use std::collections::BTreeSet;
use std::time::Duration;

use async_trait::async_trait;
use lockkit_core::backend::{Admin, LockInfo, LockName};
use lockkit_core::Result;
use redis::Script;
use tokio::time::Instant;

use crate::error::map_err;
use crate::lock::{Keys, Node, RedisLock};
use crate::subscriptions::Role;

/// KEYS: lock, queue, value. ARGV: channel. Deletes the lock key (and the holder's value)
/// whoever owns it and tells the waiters (RedLock's with `released`, the first queued one by
/// its owner id): 1 if it existed.
const FORCE_RELEASE: &str = r"
if redis.call('DEL', KEYS[1]) == 1 then
    redis.call('DEL', KEYS[3])
    redis.call('PUBLISH', ARGV[1], 'released')
    local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
    if head then
        redis.call('PUBLISH', ARGV[1] .. ':' .. head, head)
        redis.call('PUBLISH', ARGV[1], head)
    end
    return 1
end
return 0
";

/// What one instance says about one name: owner, PTTL in ms, fence, value key.
type Seen = (Option<String>, i64, Option<u64>, Option<Vec<u8>>);

async fn look(node: &Node, keys: &Keys) -> Result<Seen> {
    let mut conn = node.commands.clone();
    redis::pipe()
        .get(keys.lock())
        .pttl(keys.lock())
        .get(keys.fence())
        .get(keys.value())
        .query_async(&mut conn)
        .await
        .map_err(|e| map_err(&node.address, e))
}

/// What a value key holds (`<owner> <sequence> <token> <value>`), if `owner` stored it:
/// the sequence number, the holder's token and the value.
fn value_of(stored: &[u8], owner: &str) -> Option<(u64, u64, String)> {
    let mut parts = stored.splitn(4, |b| *b == b' ');
    let (by, sequence, token) = (parts.next()?, parts.next()?, parts.next()?);
    if by != owner.as_bytes() {
        return None;
    }
    let number = |text: &[u8]| std::str::from_utf8(text).ok()?.parse().ok();
    let value = String::from_utf8_lossy(parts.next()?).into_owned();
    Some((number(sequence)?, number(token)?, value))
}

/// Redis glob patterns treat these as special.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[async_trait]
impl Admin for RedisLock {
    async fn inspect(&self, name: &LockName) -> Result<Option<LockInfo>> {
        let keys = self.inner.keys(name);
        let mut seen = Vec::with_capacity(self.inner.nodes.len());
        for node in &self.inner.nodes {
            // An instance that is down counts as not holding it (as for acquisitions).
            match look(node, &keys).await {
                Ok(found) => seen.push(found),
                Err(e) if self.inner.nodes.len() == 1 => return Err(e),
                Err(_) => {}
            }
        }
        let owners: BTreeSet<&String> = seen.iter().filter_map(|s| s.0.as_ref()).collect();
        for owner in owners {
            let holding: Vec<&Seen> = seen
                .iter()
                .filter(|s| s.0.as_ref() == Some(owner))
                .collect();
            if holding.len() < self.inner.quorum {
                continue;
            }
            let remaining = holding.iter().map(|s| s.1.max(0)).min().unwrap_or(0);
            // Only the holder's own value, the latest it stored, with the holder's token
            // (a RedLock instance's fence may be past it: a contender's undone partial win).
            let value = seen
                .iter()
                .filter_map(|s| value_of(s.3.as_deref()?, owner))
                .max_by_key(|(sequence, _, _)| *sequence);
            let fence = seen.iter().filter_map(|s| s.2).max().unwrap_or(0);
            let info = LockInfo::new(name.as_str())
                .owner(owner.clone())
                .remaining(Duration::from_millis(remaining as u64));
            return Ok(Some(match value {
                Some((_, token, value)) => info.token(token).value(value),
                None => info.token(fence),
            }));
        }
        Ok(None)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<LockInfo>> {
        // Lock keys are `<key prefix>{<encoded name>}`; the fence and channel keys carry a
        // suffix after the closing brace, so the pattern skips them.
        let encoded = match prefix {
            "" => String::new(),
            prefix => LockName::new(prefix)?.encoded(),
        };
        let pattern = format!(
            "{}{{{}*}}",
            glob_escape(self.inner.options.key_prefix()),
            glob_escape(&encoded)
        );
        let start = self.inner.options.key_prefix().len() + 1;
        let mut names = BTreeSet::new();
        for node in &self.inner.nodes {
            let mut conn = node.commands.clone();
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| map_err(&node.address, e))?;
                for key in keys {
                    let inside = key.get(start..key.len().saturating_sub(1));
                    if let Some(name) = inside.and_then(LockName::decode) {
                        names.insert(name);
                    }
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        let mut held = Vec::with_capacity(names.len());
        for name in names {
            // A lock released since the scan is simply not listed.
            if let Some(info) = self.inspect(&name).await? {
                held.push(info);
            }
        }
        Ok(held)
    }

    async fn force_release(&self, name: &LockName) -> Result<bool> {
        let keys = self.inner.keys(name);
        let script = Script::new(FORCE_RELEASE);
        let mut removed = false;
        for node in &self.inner.nodes {
            let mut conn = node.commands.clone();
            let deleted: i64 = script
                .key(keys.lock())
                .key(keys.queue())
                .key(keys.value())
                .arg(keys.channel())
                .invoke_async(&mut conn)
                .await
                .map_err(|e| map_err(&node.address, e))?;
            removed |= deleted == 1;
        }
        Ok(removed)
    }

    /// Subscribes to the name's channel (or shares this client's subscription to it), looks
    /// once, and returns at once if that differs from `seen`; else waits for a message on
    /// the channel, `deadline`, or `max_poll` (lost messages), whichever comes first.
    async fn changed(
        &self,
        name: &LockName,
        seen: Option<&LockInfo>,
        deadline: Instant,
    ) -> Result<()> {
        let inner = &self.inner;
        let keys = inner.keys(name);
        let nodes = inner.nodes.iter().map(|n| n.pubsub.clone()).collect();
        let subscription = inner
            .subscriptions
            .subscribe(keys.channel(), Role::Observer, nodes)
            .await;
        let notify = subscription.notify();
        // Created before the look: a message from then on wakes it.
        let woken = notify.notified();
        if !lockkit_core::admin::same_state(self.inspect(name).await?.as_ref(), seen) {
            return Ok(());
        }
        let fallback = Instant::now() + inner.options.max_poll;
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep_until(deadline.min(fallback)) => {}
        }
        Ok(())
    }
}
