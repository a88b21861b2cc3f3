//! Redis safety under data loss, eviction and bad options. Most cases start PRIVATE
//! `redis-server`s (the Debian binary) on free loopback ports, in temp dirs, so they can
//! restart them and configure them freely; the rest touch only their own keys on the shared
//! single instance. Nothing here stops a shared server, so these run in parallel.
#![cfg(feature = "redis")]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lockkit::redis::RedisOptions;
use lockkit::{Error, LockGuard, LockName, LockOptions, Locks, RedisLock};

use lockkit_testkit::{fresh_name, service_url};

/// A `redis-server` of this test alone, killed when dropped.
struct PrivateRedis {
    port: u16,
    args: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts a server with `args` on top of: loopback, a free port, a temp dir.
    fn start(args: &[&str]) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = PrivateRedis {
            port,
            args: args.iter().map(|a| a.to_string()).collect(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (the Debian package `redis-server`)");
        self.child = Some(child);
        let started = Instant::now();
        // Up when it answers (a password-protected one answers NOAUTH).
        while !self.answers() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server on port {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let mut reply = [0u8; 64];
        stream.write_all(b"PING\r\n").is_ok() && stream.read(&mut reply).is_ok_and(|n| n > 0)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `SHUTDOWN NOSAVE` (all data in memory is gone), then the same server again.
    fn lose_everything_and_restart(&mut self) {
        let _ = self.cli(&["SHUTDOWN", "NOSAVE"]);
        if let Some(mut child) = self.child.take() {
            child.wait().expect("redis-server exit");
        }
        self.spawn();
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn fresh(case: &str) -> String {
    fresh_name(&format!("lockkit-safety/{case}"))
}

async fn token_of(locks: &Locks, name: &str) -> u64 {
    let guard: LockGuard = locks.acquire(name).await.expect("acquire");
    let token = guard.fencing_token().get();
    guard.release().await.expect("release");
    token
}

// ------------------------------------------------------------------ tokens ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_token_rises_after_a_restart_that_lost_all_data() {
    let mut server = PrivateRedis::start(&["--save", "", "--appendonly", "no"]);
    let locks = Locks::new(RedisLock::connect(&server.url()).await.unwrap());
    let name = fresh("restart");
    let mut before = Vec::new();
    for _ in 0..3 {
        before.push(token_of(&locks, &name).await);
    }
    server.lose_everything_and_restart();
    // The same client reconnects on its own.
    let opts = LockOptions::new().wait_timeout(Duration::from_secs(10));
    let guard = locks
        .acquire_with(&name, &opts)
        .await
        .expect("after restart");
    let after = guard.fencing_token().get();
    assert!(
        before.iter().all(|&b| after > b),
        "token {after} after the restart, {before:?} before it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_token_rises_after_the_fence_key_is_deleted() {
    let url = service_url("LOCKKIT_REDIS_URL");
    let lock = RedisLock::connect(&url).await.unwrap();
    let name = fresh("fence_deleted");
    let fence = format!("{}:fence", lock.lock_key(&LockName::new(&name).unwrap()));
    let locks = Locks::new(lock);
    let first = token_of(&locks, &name).await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let deleted: i64 = redis::cmd("DEL")
        .arg(&fence)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted, 1, "no fence key `{fence}`: the key layout changed");
    let second = token_of(&locks, &name).await;
    assert!(
        second > first,
        "token {second} after {first}, the fence key deleted in between"
    );
}

// ---------------------------------------------------------------- eviction ----

fn invalid_options(result: Result<RedisLock, Error>) -> String {
    match result {
        Err(Error::InvalidOptions(msg)) => msg,
        Err(other) => panic!("expected InvalidOptions, got {other:?}"),
        Ok(_) => panic!("connected although keys can be evicted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refuses_an_evicting_maxmemory_policy_unless_told() {
    let server = PrivateRedis::start(&["--save", "", "--maxmemory-policy", "volatile-lru"]);
    let msg = invalid_options(RedisLock::connect(&server.url()).await);
    assert!(
        msg.contains("maxmemory-policy")
            && msg.contains("volatile-lru")
            && msg.contains("noeviction")
            && msg.contains("unsafe_allow_eviction"),
        "{msg}"
    );
    let url = format!("{}?unsafe_allow_eviction=true", server.url());
    let lock = RedisLock::connect(&url).await.expect("opted out");
    let locks = Locks::new(lock);
    token_of(&locks, &fresh("evicting")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_refuses_an_instance_that_evicts() {
    let servers: Vec<_> = ["noeviction", "allkeys-lru", "noeviction"]
        .iter()
        .map(|policy| PrivateRedis::start(&["--save", "", "--maxmemory-policy", policy]))
        .collect();
    let hosts: Vec<_> = servers
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    let url = format!("redlock://{}", hosts.join(","));
    let msg = invalid_options(RedisLock::connect(&url).await);
    assert!(
        msg.contains(&hosts[1]) && msg.contains("maxmemory-policy") && msg.contains("allkeys-lru"),
        "{msg}"
    );
    RedisLock::connect(&format!("{url}?unsafe_allow_eviction=true"))
        .await
        .expect("opted out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_without_config_command_connects() {
    // Managed Redis often renames or disables CONFIG: the policy cannot be read, so the
    // client warns and goes on.
    let server = PrivateRedis::start(&["--save", "", "--rename-command", "CONFIG", ""]);
    let locks = Locks::new(RedisLock::connect(&server.url()).await.expect("connect"));
    token_of(&locks, &fresh("no_config")).await;
}

// ----------------------------------------------------------------- options ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_that_would_panic_or_spin_are_refused_at_connect() {
    let url = service_url("LOCKKIT_REDIS_URL");
    let d = RedisOptions::new;
    let cases = [
        ("drift_factor", d().drift_factor(-0.01)),
        ("drift_factor", d().drift_factor(f64::NAN)),
        ("drift_factor", d().drift_factor(1.0)),
        ("drift_factor", d().drift_factor(f64::INFINITY)),
        ("connection_timeout", d().connection_timeout(Duration::ZERO)),
        ("connection_timeout", d().connection_timeout(Duration::MAX)),
        ("response_timeout", d().response_timeout(Duration::ZERO)),
        ("response_timeout", d().response_timeout(Duration::MAX)),
        ("max_poll", d().max_poll(Duration::ZERO)),
        ("max_poll", d().max_poll(Duration::MAX)),
    ];
    let mut accepted = Vec::new();
    for (field, options) in cases {
        let label = format!("{field} in {options:?}");
        match RedisLock::connect_with(&url, options).await {
            Err(Error::InvalidOptions(msg)) => assert!(msg.contains(field), "{label}: {msg}"),
            Err(other) => panic!("{label}: {other:?}"),
            Ok(lock) => {
                let tried = tokio::spawn(async move {
                    let locks = Locks::new(lock);
                    let opts = LockOptions::new().wait_timeout(Duration::from_secs(1));
                    let guard = locks.acquire_with(&fresh("bad_options"), &opts).await;
                    guard.map(|g| g.fencing_token().get())
                });
                let outcome = tokio::time::timeout(Duration::from_secs(5), tried).await;
                accepted.push(format!(
                    "{label}: connected; acquiring then gave {outcome:?}"
                ));
            }
        }
    }
    assert!(accepted.is_empty(), "{accepted:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_the_drift_allowance_eats_whole_is_refused_not_retried_forever() {
    let url = service_url("LOCKKIT_REDIS_URL");
    let options = RedisOptions::new().drift_factor(0.99);
    let locks = Locks::new(RedisLock::connect_with(&url, options).await.unwrap());
    let opts = LockOptions::new()
        .ttl(Duration::from_millis(100))
        .wait_timeout(Duration::from_secs(1));
    let err = locks
        .acquire_with(&fresh("drift"), &opts)
        .await
        .expect_err("a lease with no validity left");
    assert!(
        matches!(&err, Error::InvalidOptions(msg) if msg.contains("drift")),
        "{err:?}"
    );
}

// ----------------------------------------------------------------- secrets ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_not_in_the_error() {
    let server = PrivateRedis::start(&["--save", "", "--requirepass", "right-one"]);
    let url = format!("redis://:Wr0ngS3cret@127.0.0.1:{}", server.port);
    let err = RedisLock::connect(&url).await.expect_err("wrong password");
    let shown = format!("{err} / {err:?}");
    assert!(!shown.contains("Wr0ngS3cret"), "{shown}");
    let url = format!("redis://default:Wr0ngS3cret@127.0.0.1:{}/99", server.port);
    let err = RedisLock::connect(&url).await.expect_err("wrong password");
    let shown = format!("{err} / {err:?}");
    assert!(!shown.contains("Wr0ngS3cret"), "{shown}");
}
