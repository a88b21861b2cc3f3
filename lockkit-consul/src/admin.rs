//! The operator's view: who holds a lock, which locks are held, and removing a stuck one.
//!
//! A lock is held while its key `<prefix>/<encoded name>` carries a session; the owner shown
//! is that session, the token the key's `ModifyIndex` (the index of the acquisition). Consul
//! does not tell how long a session has left, so no remaining lease is shown. A forced
//! release deletes the key if it is still the same acquisition (check-and-set on its index),
//! leaving the holder's session alive: one session may hold many of a client's locks. The
//! next acquisition writes the key at a later Raft index, so its token is higher.

use async_trait::async_trait;
use hyper::{Method, StatusCode};
use lockkit_core::backend::{Admin, LockInfo, LockName};
use lockkit_core::Result;

use crate::http::{escaped, KeyEntry};
use crate::lock::ConsulLock;

fn describe(name: &str, entry: &KeyEntry) -> Option<LockInfo> {
    let session = entry.session.as_ref()?;
    Some(
        LockInfo::new(name)
            .token(entry.modify_index)
            .owner(format!("session {session}")),
    )
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
        let (entry, _) = http.read_key(&key, None, std::time::Duration::ZERO).await?;
        let Some(entry) = entry.filter(|e| e.session.is_some()) else {
            return Ok(false);
        };
        // Delete this acquisition's key only (check-and-set on its index): the holder's
        // session, which may hold the client's other locks, lives on; its guard on this name
        // learns it lost the key from the session watcher or its next renewal.
        let path = format!("/v1/kv/{}", escaped(&key));
        let query = [("cas", entry.modify_index.to_string())];
        let call = http.call(WHAT, Method::DELETE, &path, &query, None);
        let (status, body, _) = http.short(WHAT, call).await?;
        match status {
            StatusCode::OK => Ok(body.trim_ascii() == b"true"),
            _ => Err(http.status(WHAT, status, &body)),
        }
    }
}
