//! The operator's view: who holds a lock, which locks are held, and removing a stuck one.
//!
//! A lock is held while its key `<prefix>/<encoded name>` carries a session; the owner shown
//! is that session, the token the key's `ModifyIndex` (the index of the acquisition). Consul
//! does not tell how long a session has left, so no remaining lease is shown. A forced
//! release destroys the holder's session, which frees the key; the next acquisition changes
//! the key at a later Raft index, so its token is higher. Consul then refuses the key to
//! every session for the session's lock-delay (15 s by default).

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
        let key = self.inner.key(name);
        let http = &self.inner.http;
        let (entry, _) = http.read_key(&key, None, std::time::Duration::ZERO).await?;
        match entry.and_then(|e| e.session) {
            Some(session) => {
                http.destroy_session(&session).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}
