//! The real servers that `scripts/services up` starts for the backend tests answer on their
//! URLs. These fail loudly when a server is missing, so no backend's tests are skipped
//! silently.

use std::time::Duration;

use lockkit_testkit::{hosts, service_url};
use tokio::net::TcpStream;

/// Connects to every `host:port` of a URL's authority (RedLock and etcd URLs list several).
async fn answers(key: &str) {
    for host in hosts(&service_url(key)) {
        let connect = TcpStream::connect(&host);
        match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("{key}: {host} refused: {e}"),
            Err(_) => panic!("{key}: {host} did not answer within 5 s"),
        }
    }
}

#[tokio::test]
async fn redis_answers() {
    answers("LOCKKIT_REDIS_URL").await;
}

#[tokio::test]
async fn redlock_instances_answer() {
    answers("LOCKKIT_REDLOCK_URL").await;
}

#[tokio::test]
async fn etcd_answers() {
    answers("LOCKKIT_ETCD_URL").await;
}

#[tokio::test]
async fn zookeeper_answers() {
    answers("LOCKKIT_ZK_URL").await;
}

#[tokio::test]
async fn consul_answers() {
    answers("LOCKKIT_CONSUL_URL").await;
}

#[tokio::test]
async fn postgres_answers() {
    answers("LOCKKIT_POSTGRES_URL").await;
}

#[tokio::test]
async fn mysql_answers() {
    answers("LOCKKIT_MYSQL_URL").await;
}
