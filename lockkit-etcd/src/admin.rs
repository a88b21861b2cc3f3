//! The operator's view: who holds a lock, which locks are held, and removing a stuck one.
//!
//! A lock's queue is the keys under `<prefix><encoded name>/`; the key with the lowest
//! create revision holds it, and that revision is its token. The owner shown is the hex id
//! of the lease the key is bound to, the remaining lease that lease's TTL left. A forced
//! release deletes the holder's key (not its lease, which may carry other keys): the next
//! waiter's key, or any key created later, has a higher create revision, so a higher token.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, LeaseTimeToLiveOptions, SortOrder, SortTarget, Txn,
    TxnOp,
};
use lockkit_core::backend::{Admin, LockInfo, LockName};
use lockkit_core::Result;

use crate::lock::{EtcdLock, Inner};

impl Inner {
    /// The keys under `prefix`, oldest first.
    async fn keys_under(&self, prefix: &str, limit: i64) -> Result<Vec<KeyValue>> {
        let answer = self
            .call("get", || {
                let mut client = self.client.kv_client();
                let options = GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                    .with_limit(limit)
                    .with_keys_only();
                async move { client.get(prefix, Some(options)).await }
            })
            .await?;
        Ok(answer.kvs().to_vec())
    }

    /// The holder key `kv` of `name`, described.
    async fn describe(&self, name: &str, kv: &KeyValue) -> Result<LockInfo> {
        let mut info = LockInfo::new(name)
            .token(kv.create_revision() as u64)
            .owner(format!("lease {:016x}", kv.lease() as u64));
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
        match self.inner.keys_under(&dir, 1).await?.first() {
            Some(kv) => Ok(Some(self.inner.describe(name.as_str(), kv).await?)),
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
        for kv in self.inner.keys_under(&under, 0).await? {
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
        let Some(holder) = self.inner.keys_under(&dir, 1).await?.into_iter().next() else {
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
}
