//! The operator's view: who holds a lock, which locks are held, and removing a stuck one.
//!
//! A lock's queue is the ephemeral sequential nodes under `<root>/<encoded name>`; the oldest
//! (lowest `czxid`, which is also its token) holds it, and the owner shown is the ZooKeeper
//! session that owns that node. The remaining lease is the session's, which the server does
//! not tell: it is not shown. A forced release deletes the holder's node: every other node,
//! queued or created later, has a higher `czxid`, so the next holder's token is higher.
//!
//! A holder's value is its node's data, written by `setData` (so a node whose version is
//! still 0 has none): it goes with the node, and a later holder's node never carries it.
//! [`Admin::changed`] sets a children watch on the lock's node, then reads the holder with a
//! data watch on its node; it returns on the data watch (a new value, the holder's
//! deletion) or, when the lock is free, on the children watch (a new contender).

use std::collections::BTreeSet;

use async_trait::async_trait;
use lockkit_core::backend::{Admin, LockInfo, LockName};
use lockkit_core::{Result, DEFAULT_TTL};
use tokio::time::Instant;
use zookeeper_client as zk;

use crate::error::map_err;
use crate::lock::{sequence_of, ZkLock};

/// A lock node: its path, stat and data.
type Found = (String, zk::Stat, Vec<u8>);

/// The holder node of the queue under `parent`.
async fn holder(client: &zk::Client, parent: &str) -> Result<Option<Found>> {
    match client.list_children(parent).await {
        Ok(children) => oldest(client, parent, children).await,
        Err(zk::Error::NoNode) => Ok(None),
        Err(e) => Err(map_err(e)),
    }
}

/// The holder among the `children` of `parent`: the lock node with the lowest `czxid`.
async fn oldest(client: &zk::Client, parent: &str, children: Vec<String>) -> Result<Option<Found>> {
    let mut oldest: Option<Found> = None;
    for child in children.into_iter().filter(|c| sequence_of(c).is_some()) {
        let path = format!("{parent}/{child}");
        let (data, stat) = match client.get_data(&path).await {
            Ok(found) => found,
            // A node deleted since the listing is simply not a candidate.
            Err(zk::Error::NoNode) => continue,
            Err(e) => return Err(map_err(e)),
        };
        if oldest.as_ref().is_none_or(|(_, o, _)| stat.czxid < o.czxid) {
            oldest = Some((path, stat, data));
        }
    }
    Ok(oldest)
}

/// The holder node `stat` with `data`, described: a node never written (version 0) has no
/// value.
fn describe(name: &str, stat: &zk::Stat, data: &[u8]) -> LockInfo {
    let info = LockInfo::new(name)
        .token(stat.czxid as u64)
        .owner(format!("session {:016x}", stat.ephemeral_owner as u64));
    match stat.version {
        0 => info,
        _ => info.value(String::from_utf8_lossy(data)),
    }
}

/// Whether two views of a lock show the same holder (token, owner) with the same value.
fn same_holder(now: Option<&LockInfo>, seen: Option<&LockInfo>) -> bool {
    match (now, seen) {
        (None, None) => true,
        (Some(now), Some(seen)) => {
            (&now.token, &now.owner, &now.value) == (&seen.token, &seen.owner, &seen.value)
        }
        _ => false,
    }
}

impl ZkLock {
    /// [`Admin::changed`] without its deadline.
    async fn wait_changed(&self, name: &LockName, seen: Option<&LockInfo>) -> Result<()> {
        let client = self.session_client(DEFAULT_TTL).await?;
        let parent = self.lock_path(name);
        let (children, children_watch) = match client.list_and_watch_children(&parent).await {
            Ok(listed) => listed,
            Err(zk::Error::NoNode) => {
                // Nobody ever queued (or the container was reaped): free.
                let (stat, created) = client
                    .check_and_watch_stat(&parent)
                    .await
                    .map_err(map_err)?;
                if seen.is_none() && stat.is_none() {
                    created.changed().await;
                }
                return Ok(());
            }
            Err(e) => return Err(map_err(e)),
        };
        let Some((path, ..)) = oldest(&client, &parent, children).await? else {
            if seen.is_none() {
                children_watch.changed().await;
            }
            return Ok(());
        };
        // Held: only the holder's node matters (a new value, its deletion); the waiters
        // queueing behind it do not. Dropping a watcher removes it.
        drop(children_watch);
        let (data, stat, holder_watch) = match client.get_and_watch_data(&path).await {
            Ok(found) => found,
            // The holder just left.
            Err(zk::Error::NoNode) => return Ok(()),
            Err(e) => return Err(map_err(e)),
        };
        let now = describe(name.as_str(), &stat, &data);
        if same_holder(Some(&now), seen) {
            holder_watch.changed().await;
        }
        Ok(())
    }
}

#[async_trait]
impl Admin for ZkLock {
    async fn inspect(&self, name: &LockName) -> Result<Option<LockInfo>> {
        let client = self.session_client(DEFAULT_TTL).await?;
        let found = holder(&client, &self.lock_path(name)).await?;
        Ok(found.map(|(_, stat, data)| describe(name.as_str(), &stat, &data)))
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
            if let Some((_, stat, data)) = holder(&client, &self.lock_path(&name)).await? {
                held.push(describe(name.as_str(), &stat, &data));
            }
        }
        Ok(held)
    }

    async fn force_release(&self, name: &LockName) -> Result<bool> {
        let client = self.session_client(DEFAULT_TTL).await?;
        let Some((path, stat, _)) = holder(&client, &self.lock_path(name)).await? else {
            return Ok(false);
        };
        match client.delete(&path, Some(stat.version)).await {
            Ok(()) => Ok(true),
            // Released meanwhile: nothing left to remove.
            Err(zk::Error::NoNode) => Ok(false),
            Err(e) => Err(map_err(e)),
        }
    }

    /// A children watch on the lock's node, then the holder read with a data watch on its
    /// node; returns at once if that differs from `seen`, else on the first event of the
    /// watch that matters (see the module docs) or at `deadline`. Dropped, its watchers are
    /// removed.
    async fn changed(
        &self,
        name: &LockName,
        seen: Option<&LockInfo>,
        deadline: Instant,
    ) -> Result<()> {
        let wait = self.wait_changed(name, seen);
        tokio::time::timeout_at(deadline, wait)
            .await
            .unwrap_or(Ok(()))
    }
}
