//! Server faults for fault tests: instances of `scripts/services` stopped for the length of a
//! test and started again when it ends, also when it fails, and a proxy whose traffic can be
//! cut.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Runs `scripts/services <verb> <instances...>` of this workspace; whether it succeeded.
pub fn services(verb: &str, instances: &[&str]) -> bool {
    let kit = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = kit.parent().unwrap_or(kit).join("scripts").join("services");
    Command::new(script)
        .arg(verb)
        .args(instances)
        .status()
        .is_ok_and(|s| s.success())
}

/// Instances of `scripts/services` stopped (`stop-one`, data kept) while this value lives and
/// started again (`start-one`) when it is dropped, also when the test panics.
#[derive(Debug)]
pub struct Stopped(Vec<&'static str>);

impl Stopped {
    /// Stops `instances` (e.g. `["etcd"]`, `["redis-16379"]`); panics if that fails.
    pub fn new(instances: &[&'static str]) -> Self {
        assert!(services("stop-one", instances), "stop {instances:?}");
        Stopped(instances.to_vec())
    }

    /// Starts the instances again now; panics if that fails.
    pub fn start(mut self) {
        let instances = std::mem::take(&mut self.0);
        assert!(services("start-one", &instances), "start {instances:?}");
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if !self.0.is_empty() && !services("start-one", &self.0) {
            eprintln!("could not restart {:?}", self.0);
        }
    }
}

/// A TCP proxy on loopback in front of one server whose traffic can be cut silently, like a
/// network partition: while cut, open connections forward nothing (neither end sees a close)
/// and new ones are accepted but never answered. Restoring closes every connection that lived
/// through the cut (their bytes are lost) and forwards new ones again. Stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// A proxy on a free loopback port that forwards to `target` (`host:port`).
    pub async fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let (cut, rx) = watch::channel(false);
        let target = target.to_owned();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(pump(client, target.clone(), rx.clone()));
            }
        });
        Proxy { addr, cut, task }
    }

    /// Where clients connect to reach the server through the proxy.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts the traffic (see [`Proxy`]).
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Ends the cut (see [`Proxy`]).
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards one client connection until it ends or the traffic is cut, then holds it open
/// without a word until the cut ends.
async fn pump(mut client: TcpStream, target: String, mut cut: watch::Receiver<bool>) {
    if !*cut.borrow_and_update() {
        let Ok(mut server) = TcpStream::connect(&target).await else {
            return;
        };
        let forward = tokio::io::copy_bidirectional(&mut client, &mut server);
        let was_cut = tokio::select! {
            _ = forward => false,
            _ = cut.wait_for(|cut| *cut) => true,
        };
        if !was_cut {
            return;
        }
    }
    let _ = cut.wait_for(|cut| !*cut).await;
}
