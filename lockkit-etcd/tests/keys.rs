//! The names of the etcd keys a client creates: a client taking a lock again reuses its key
//! name once the old key is gone (etcd keeps deleted keys in its index until compaction, and
//! every read of the queue walks past them), while keys that exist together never share one.
//! Runs on the test server of `scripts/services`, with fresh names.

use std::time::Duration;

use lockkit_core::backend::{Backend, LockName, LockOptions};
use lockkit_etcd::etcd_client::{Client, GetOptions};
use lockkit_etcd::EtcdLock;
use lockkit_testkit::{fresh_name, service_url};

async fn client() -> EtcdLock {
    EtcdLock::connect(&service_url("LOCKKIT_ETCD_URL"))
        .await
        .expect("connect")
}

/// The keys under a lock's prefix, oldest first.
async fn keys(plain: &mut Client, prefix: &str) -> Vec<String> {
    let options = GetOptions::new().with_prefix().with_keys_only();
    let answer = plain.get(prefix, Some(options)).await.expect("get");
    let mut kvs: Vec<_> = answer.kvs().to_vec();
    kvs.sort_by_key(|kv| kv.create_revision());
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

/// The two keys under a lock's prefix, once a waiter has queued (within 10 s).
async fn two_keys(plain: &mut Client, prefix: &str) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let queue = keys(plain, prefix).await;
        if queue.len() == 2 {
            return queue;
        }
        assert!(tokio::time::Instant::now() < deadline, "{queue:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn plain() -> Client {
    let url = service_url("LOCKKIT_ETCD_URL");
    let host = url.trim_start_matches("etcd://").split(['/', '?']).next();
    Client::connect([host.expect("a host")], None)
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_taking_a_lock_again_reuses_its_key_name() {
    let lock = client().await;
    let mut plain = plain().await;
    let name = LockName::new(&fresh_name("lockkit-etcd/keys/again")).unwrap();
    let prefix = lock.key_prefix(&name);
    let opts = LockOptions::new().ttl(Duration::from_secs(10));
    let (mut names, mut tokens) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let held = lock.lock(&name, &opts, None).await.expect("lock");
        names.extend(keys(&mut plain, &prefix).await);
        tokens.push(held.token.get());
        held.lease.release().await.expect("release");
    }
    assert!(keys(&mut plain, &prefix).await.is_empty(), "a key left");
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens went back: {tokens:?}"
    );
    names.dedup();
    assert_eq!(names.len(), 1, "a new key each time: {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_exist_together_differ_and_a_reused_name_queues_last() {
    let lock = client().await;
    let mut plain = plain().await;
    let name = LockName::new(&fresh_name("lockkit-etcd/keys/together")).unwrap();
    let prefix = lock.key_prefix(&name);
    let opts = LockOptions::new().ttl(Duration::from_secs(10));
    let first = lock.lock(&name, &opts, None).await.expect("lock");
    let second = {
        let (lock, name, opts) = (lock.clone(), name.clone(), opts.clone());
        tokio::spawn(async move { lock.lock(&name, &opts, None).await })
    };
    let queue = two_keys(&mut plain, &prefix).await;
    assert_ne!(queue[0], queue[1]);
    first.lease.release().await.expect("release");
    let second = second.await.expect("no panic").expect("handed over");
    assert!(second.token > first.token);

    // The first key's name is free again: a third waiter of the same client takes it, and
    // still queues behind the second (order is by create revision, not by name).
    let third = {
        let (lock, name, opts) = (lock.clone(), name.clone(), opts.clone());
        tokio::spawn(async move { lock.lock(&name, &opts, None).await })
    };
    two_keys(&mut plain, &prefix).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!third.is_finished(), "the third waiter jumped the queue");
    second.lease.release().await.expect("release");
    let third = third.await.expect("no panic").expect("handed over");
    assert!(third.token > second.token);
    third.lease.release().await.expect("release");
    assert!(keys(&mut plain, &prefix).await.is_empty(), "a key left");
}
