//! The operator's view: who holds a lock, which locks are held, and removing a stuck one.
//!
//! A lock's queue is the keys under `<prefix><encoded name>/`; the key with the lowest
//! create revision holds it, and that revision is its token. The owner shown is the hex id
//! of the lease the key is bound to, the remaining lease that lease's TTL left. A forced
//! release deletes the holder's key (not its lease, which may carry other keys): the next
//! waiter's key, or any key created later, has a higher create revision, so a higher token.
//!
//! A holder's value lives in its key (after the lock's name and a NUL), so it goes with the
//! key: a later holder's key never carries it. [`Admin::changed`] reads the holder and then
//! watches the name's prefix from the revision after that read, returning on the first
//! event about the holder's key (a value put, a TTL move, its deletion) or, when the lock
//! was free, on any new key.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, LeaseTimeToLiveOptions, SortOrder, SortTarget, Txn,
    TxnOp, WatchOptions,
};
use lockkit_core::backend::{Admin, LockInfo, LockName};
use lockkit_core::Result;
use tokio::time::Instant;

use crate::lease::stored_value;
use crate::lock::{EtcdLock, Inner};

impl Inner {
    /// The keys under `prefix` with their values, oldest first, and the revision they were
    /// read at.
    async fn keys_under(&self, prefix: &str, limit: i64) -> Result<(Vec<KeyValue>, i64)> {
        let answer = self
            .call("get", || {
                let mut client = self.client.kv_client();
                let options = GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                    .with_limit(limit);
                async move { client.get(prefix, Some(options)).await }
            })
            .await?;
        let revision = answer.header().map_or(0, |h| h.revision());
        Ok((answer.kvs().to_vec(), revision))
    }

    /// The holder of the lock under `dir` (its key, if held) and the revision it was read at.
    async fn holder(&self, dir: &str) -> Result<(Option<KeyValue>, i64)> {
        let (keys, revision) = self.keys_under(dir, 1).await?;
        Ok((keys.into_iter().next(), revision))
    }

    /// The holder key `kv` of `name`, described with what the key itself tells.
    fn holder_info(name: &str, kv: &KeyValue) -> LockInfo {
        let info = LockInfo::new(name)
            .token(kv.create_revision() as u64)
            .owner(format!("lease {:016x}", kv.lease() as u64));
        match stored_value(kv.value()) {
            Some(value) => info.value(value),
            None => info,
        }
    }

    /// The holder key `kv` of `name`, described, with its lease's remaining TTL.
    async fn describe(&self, name: &str, kv: &KeyValue) -> Result<LockInfo> {
        let mut info = Self::holder_info(name, kv);
        if kv.lease() != 0 {
            let id = kv.lease();
            let lease = self
                .call("lease time-to-live", || {
                    let mut client = self.client.lease_client();
                    async move {
                        client
                            .time_to_live(id, Some(LeaseTimeToLiveOptions::new()))
                            .await
                    }
                })
                .await?;
            info = info.remaining(Duration::from_secs(lease.ttl().max(0) as u64));
        }
        Ok(info)
    }
}

#[async_trait]
impl Admin for EtcdLock {
    async fn inspect(&self, name: &LockName) -> Result<Option<LockInfo>> {
        let dir = self.inner.dir(name);
        match self.inner.holder(&dir).await?.0 {
            Some(kv) => Ok(Some(self.inner.describe(name.as_str(), &kv).await?)),
            None => Ok(None),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<LockInfo>> {
        let root = self.inner.options.key_prefix();
        let under = match prefix {
            "" => root.to_string(),
            prefix => format!("{root}{}", LockName::new(prefix)?.encoded()),
        };
        // The holder of each queue is its oldest key: the first seen, oldest first.
        let mut holders: BTreeMap<LockName, KeyValue> = BTreeMap::new();
        for kv in self.inner.keys_under(&under, 0).await?.0 {
            let Some(rest) = kv.key_str().ok().and_then(|k| k.strip_prefix(root)) else {
                continue;
            };
            let Some(name) = rest.split_once('/').and_then(|(n, _)| LockName::decode(n)) else {
                continue;
            };
            holders.entry(name).or_insert(kv);
        }
        let mut held = Vec::with_capacity(holders.len());
        for (name, kv) in holders {
            held.push(self.inner.describe(name.as_str(), &kv).await?);
        }
        Ok(held)
    }

    async fn force_release(&self, name: &LockName) -> Result<bool> {
        let dir = self.inner.dir(name);
        let Some(holder) = self.inner.holder(&dir).await?.0 else {
            return Ok(false);
        };
        // Deleted only if it is still that acquisition's key (not a newer one of that name).
        let key = holder.key().to_vec();
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                holder.create_revision(),
            )])
            .and_then([TxnOp::delete(key, None)]);
        Ok(self.inner.txn(txn).await?.succeeded())
    }

    /// Reads the holder, returns at once if it differs from `seen`, else watches the name's
    /// prefix from the revision after that read (so nothing after it is missed) until an
    /// event concerns the holder's key (or any key, if the lock was free) or `deadline`.
    /// Dropping it closes the watch stream, which ends the watch on the server.
    async fn changed(
        &self,
        name: &LockName,
        seen: Option<&LockInfo>,
        deadline: Instant,
    ) -> Result<()> {
        let inner = &self.inner;
        let wait = async {
            let dir = inner.dir(name);
            let (holder, revision) = inner.holder(&dir).await?;
            let now = holder
                .as_ref()
                .map(|kv| Inner::holder_info(name.as_str(), kv));
            if !same_holder(now.as_ref(), seen) {
                return Ok(());
            }
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            let open = || {
                let (mut client, dir, options) =
                    (inner.client.watch_client(), dir.clone(), options.clone());
                async move { client.watch(dir, Some(options)).await }
            };
            let mut watch = inner.call("watch", open).await?;
            let holder_key = holder.as_ref().map(KeyValue::key);
            // A closed or failing stream, or a cancelled watch (compacted history), is a
            // spurious return: the caller inspects again.
            while let Ok(Some(message)) = watch.message().await {
                let about_holder = |e: &etcd_client::Event| {
                    let key = e.kv().map(KeyValue::key);
                    holder_key.is_none() || key == holder_key
                };
                if message.canceled() || message.events().iter().any(about_holder) {
                    break;
                }
            }
            Ok(())
        };
        tokio::time::timeout_at(deadline, wait)
            .await
            .unwrap_or(Ok(()))
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
