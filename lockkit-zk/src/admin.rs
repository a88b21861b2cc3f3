//! The operator's view: who holds a lock, which locks are held, and removing a stuck one.
//!
//! A lock's queue is the ephemeral sequential nodes under `<root>/<encoded name>`; the oldest
//! (lowest `czxid`, which is also its token) holds it, and the owner shown is the ZooKeeper
//! session that owns that node. The remaining lease is the session's, which the server does
//! not tell: it is not shown. A forced release deletes the holder's node: every other node,
//! queued or created later, has a higher `czxid`, so the next holder's token is higher.

use std::collections::BTreeSet;

use async_trait::async_trait;
use lockkit_core::backend::{Admin, LockInfo, LockName};
use lockkit_core::{Result, DEFAULT_TTL};
use zookeeper_client as zk;

use crate::error::map_err;
use crate::lock::{sequence_of, ZkLock};

/// The holder node of the queue under `parent`: its path and stat.
async fn holder(client: &zk::Client, parent: &str) -> Result<Option<(String, zk::Stat)>> {
    let children = match client.list_children(parent).await {
        Ok(children) => children,
        Err(zk::Error::NoNode) => return Ok(None),
        Err(e) => return Err(map_err(e)),
    };
    let mut oldest: Option<(String, zk::Stat)> = None;
    for child in children.into_iter().filter(|c| sequence_of(c).is_some()) {
        let path = format!("{parent}/{child}");
        // A node deleted since the listing is simply not a candidate.
        let Some(stat) = client.check_stat(&path).await.map_err(map_err)? else {
            continue;
        };
        if oldest.as_ref().is_none_or(|(_, o)| stat.czxid < o.czxid) {
            oldest = Some((path, stat));
        }
    }
    Ok(oldest)
}

fn describe(name: &str, stat: &zk::Stat) -> LockInfo {
    LockInfo::new(name)
        .token(stat.czxid as u64)
        .owner(format!("session {:016x}", stat.ephemeral_owner as u64))
}

#[async_trait]
impl Admin for ZkLock {
    async fn inspect(&self, name: &LockName) -> Result<Option<LockInfo>> {
        let client = self.session_client(DEFAULT_TTL).await?;
        let found = holder(&client, &self.lock_path(name)).await?;
        Ok(found.map(|(_, stat)| describe(name.as_str(), &stat)))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<LockInfo>> {
        let client = self.session_client(DEFAULT_TTL).await?;
        let root = self.inner.options.lock_root();
        let root = if root.is_empty() { "/" } else { root };
        let encoded = match prefix {
            "" => String::new(),
            prefix => LockName::new(prefix)?.encoded(),
        };
        let parents = match client.list_children(root).await {
            Ok(children) => children,
            Err(zk::Error::NoNode) => Vec::new(),
            Err(e) => return Err(map_err(e)),
        };
        let names: BTreeSet<LockName> = parents
            .iter()
            .filter(|p| p.starts_with(&encoded))
            .filter_map(|p| LockName::decode(p))
            .collect();
        let mut held = Vec::new();
        for name in names {
            if let Some((_, stat)) = holder(&client, &self.lock_path(&name)).await? {
                held.push(describe(name.as_str(), &stat));
            }
        }
        Ok(held)
    }

    async fn force_release(&self, name: &LockName) -> Result<bool> {
        let client = self.session_client(DEFAULT_TTL).await?;
        let Some((path, stat)) = holder(&client, &self.lock_path(name)).await? else {
            return Ok(false);
        };
        match client.delete(&path, Some(stat.version)).await {
            Ok(()) => Ok(true),
            // Released meanwhile: nothing left to remove.
            Err(zk::Error::NoNode) => Ok(false),
            Err(e) => Err(map_err(e)),
        }
    }
}
