//! The operator's view: who holds a lock, which locks are held, and removing a stuck one.
//!
//! A lock is held while its key `<prefix>/<encoded name>` carries a session; the owner shown
//! is that session, the token the key's `ModifyIndex` (the index of the acquisition). Consul
//! does not tell how long a session has left, so no remaining lease is shown. A forced
//! release deletes the key if it is still the same acquisition (check-and-set on its index),
//! leaving the holder's session alive: one session may hold many of a client's locks. The
//! next acquisition writes the key at a later Raft index, so its token is higher.
//!
//! The holder's value is the key's body, `<token> <value>` (see
//! [`ConsulLease`](crate::lease)): its token is the holder's, since storing a value moves the
//! `ModifyIndex`. An acquisition writes an empty body, so a body is always the current
//! holder's. [`Admin::changed`] reads the key, then blocks on it from that read's index
//! (`?index=`): any write to it (taken, released, deleted, a value stored) ends the wait.

use std::time::Duration;

use async_trait::async_trait;
use hyper::{Method, StatusCode};
use lockkit_core::backend::{Admin, LockInfo, LockName};
use lockkit_core::Result;
use tokio::time::Instant;

use crate::http::{escaped, KeyEntry};
use crate::lock::ConsulLock;

/// How many times a forced release tries again when the holder stored a value between its
/// read and its delete.
const FORCE_TRIES: usize = 3;

/// The holder's token and value in the body `<token> <value>` of `entry`, if it holds one
/// (a token between the key's creation and its last change).
fn stored(entry: &KeyEntry) -> Option<(u64, String)> {
    let body = entry.value_bytes();
    let space = body.iter().position(|b| *b == b' ')?;
    let token: u64 = std::str::from_utf8(&body[..space]).ok()?.parse().ok()?;
    let value = String::from_utf8_lossy(&body[space + 1..]).into_owned();
    (entry.create_index..=entry.modify_index)
        .contains(&token)
        .then_some((token, value))
}

fn describe(name: &str, entry: &KeyEntry) -> Option<LockInfo> {
    let session = entry.session.as_ref()?;
    let info = LockInfo::new(name).owner(format!("session {session}"));
    Some(match stored(entry) {
        Some((token, value)) => info.token(token).value(value),
        None => info.token(entry.modify_index),
    })
}

#[async_trait]
impl Admin for ConsulLock {
    async fn inspect(&self, name: &LockName) -> Result<Option<LockInfo>> {
        let key = self.inner.key(name);
        let (entry, _) = self
            .inner
            .http
            .read_key(&key, None, std::time::Duration::ZERO)
            .await?;
        Ok(entry.and_then(|e| describe(name.as_str(), &e)))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<LockInfo>> {
        const WHAT: &str = "list lock keys";
        let root = format!("{}/", self.inner.settings.prefix);
        let under = match prefix {
            "" => root.clone(),
            prefix => format!("{root}{}", LockName::new(prefix)?.encoded()),
        };
        let http = &self.inner.http;
        let path = format!("/v1/kv/{}", escaped(&under));
        let query = [("recurse", "true".to_string())];
        let call = http.call(WHAT, Method::GET, &path, &query, None);
        let (status, body, _) = http.short(WHAT, call).await?;
        let entries: Vec<KeyEntry> = match status {
            StatusCode::NOT_FOUND => Vec::new(),
            StatusCode::OK => serde_json::from_slice(&body).map_err(|e| http.answer(WHAT, e))?,
            _ => return Err(http.status(WHAT, status, &body)),
        };
        let mut held: Vec<LockInfo> = entries
            .iter()
            .filter_map(|entry| {
                let name = LockName::decode(entry.key.strip_prefix(&root)?)?;
                describe(name.as_str(), entry)
            })
            .collect();
        held.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(held)
    }

    async fn force_release(&self, name: &LockName) -> Result<bool> {
        const WHAT: &str = "force-release a lock key";
        let key = self.inner.key(name);
        let http = &self.inner.http;
        let (entry, _) = http.read_key(&key, None, Duration::ZERO).await?;
        let Some(mut entry) = entry.filter(|e| e.session.is_some()) else {
            return Ok(false);
        };
        let holder = entry.acquisition();
        for _ in 0..FORCE_TRIES {
            // Delete this acquisition's key only (check-and-set on its index): the holder's
            // session, which may hold the client's other locks, lives on; its guard on this
            // name learns it lost the key from the session watcher or its next renewal.
            let path = format!("/v1/kv/{}", escaped(&key));
            let query = [("cas", entry.modify_index.to_string())];
            let call = http.call(WHAT, Method::DELETE, &path, &query, None);
            let (status, body, _) = http.short(WHAT, call).await?;
            match status {
                StatusCode::OK if body.trim_ascii() == b"true" => return Ok(true),
                StatusCode::OK => {}
                _ => return Err(http.status(WHAT, status, &body)),
            }
            // Changed since the read: again only if the same holder stored a value.
            let (now, _) = http.read_key(&key, None, Duration::ZERO).await?;
            match now {
                Some(now) if now.held_by(entry.session.as_deref().unwrap_or(""), &holder) => {
                    entry = now;
                }
                _ => return Ok(false),
            }
        }
        Ok(false)
    }

    /// Reads the key and returns at once if that differs from `seen`; else blocks on it
    /// from that read's index (at most `max_blocking_wait` per request) until it differs
    /// or `deadline` passes. A missing key's index is the KV store's, which other keys'
    /// writes move: a blocking read that answers with the key as `seen` blocks again.
    async fn changed(
        &self,
        name: &LockName,
        seen: Option<&LockInfo>,
        deadline: Instant,
    ) -> Result<()> {
        let key = self.inner.key(name);
        let http = &self.inner.http;
        let differs = |entry: &Option<KeyEntry>| {
            let now = entry.as_ref().and_then(|e| describe(name.as_str(), e));
            !lockkit_core::admin::same_state(now.as_ref(), seen)
        };
        let (entry, mut index) = http.read_key(&key, None, Duration::ZERO).await?;
        if differs(&entry) {
            return Ok(());
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Consul adds up to a sixteenth of `wait` to it: asked for 15/16 of what is
            // left, it answers by the deadline.
            let wait = (left - left / 16).min(self.inner.settings.max_blocking_wait);
            let Some(since) = index.filter(|_| wait >= Duration::from_millis(10)) else {
                // No index to block on (none sent), or too little time left to ask.
                let poll = Instant::now() + lockkit_core::admin::POLL_INTERVAL;
                tokio::time::sleep_until(deadline.min(poll)).await;
                return Ok(());
            };
            let read = tokio::select! {
                read = http.read_key(&key, Some(since), wait) => read?,
                _ = tokio::time::sleep_until(deadline) => return Ok(()),
            };
            match read {
                (entry, _) if differs(&entry) => return Ok(()),
                // The index went back (the server's state was reset): look again from scratch.
                (_, Some(next)) if next < since => return Ok(()),
                (_, next) => index = next,
            }
            if Instant::now() >= deadline {
                return Ok(());
            }
        }
    }
}
