//! Waiters queue on the test Consul agent of `scripts/services`: they get the lock in the
//! order they started waiting, a releaser that asks again at once queues behind them, and a
//! waiter that gives up leaves nothing that holds the line up.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockkit_consul::ConsulLock;
use lockkit_core::backend::LockName;
use lockkit_core::{LockOptions, Locks};
use lockkit_testkit::{fresh_name, service_url};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::Instant;

async fn client() -> Locks {
    let url = service_url("LOCKKIT_CONSUL_URL");
    Locks::new(ConsulLock::connect(&url).await.unwrap())
}

fn waiting(wait: Duration, renew: bool) -> LockOptions {
    LockOptions::new().wait_timeout(wait).auto_renew(renew)
}

/// Five clients start waiting one after another (renewing guards and guards with renewal
/// off alternately); after the release they get the lock in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_get_the_lock_in_arrival_order() {
    let name = fresh_name("lockkit-consul-fifo/order");
    let holder = client().await.acquire(&name).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = JoinSet::new();
    for i in 0..5 {
        let locks = client().await;
        let (name, order) = (name.clone(), order.clone());
        waiters.spawn(async move {
            let opts = waiting(Duration::from_secs(60), i % 2 == 0);
            let guard = locks.acquire_with(&name, &opts).await.unwrap();
            order.lock().unwrap().push(i);
            tokio::time::sleep(Duration::from_millis(20)).await;
            guard.release().await.unwrap();
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    holder.release().await.unwrap();
    while let Some(done) = waiters.join_next().await {
        done.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4]);
}

/// A holder that releases while a client waits and asks again at once does not get the lock
/// back ahead of the waiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_releaser_does_not_barge_ahead_of_a_waiter() {
    let name = fresh_name("lockkit-consul-fifo/barge");
    let (a, b) = (client().await, client().await);
    for renew in [true, false] {
        let held = a.acquire_with(&name, &waiting(Duration::ZERO, renew)).await;
        let held = held.unwrap();
        let name2 = name.clone();
        let b = b.clone();
        let waiter = tokio::spawn(async move {
            let opts = waiting(Duration::from_secs(30), renew);
            let guard = b.acquire_with(&name2, &opts).await.unwrap();
            // Long enough that the releaser's try below comes while the waiter holds it.
            tokio::time::sleep(Duration::from_millis(500)).await;
            guard.release().await.unwrap();
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        held.release().await.unwrap();
        let again = a
            .try_acquire_with(&name, &waiting(Duration::ZERO, renew))
            .await;
        let barged = again.unwrap();
        assert!(
            barged.is_none(),
            "the releaser took the lock back ahead of the waiter"
        );
        waiter.await.unwrap();
    }
}

/// A waiter that times out leaves the line: the next waiter gets the lock as soon as it is
/// released, and then anyone gets it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiter_that_gives_up_leaves_the_line() {
    let name = fresh_name("lockkit-consul-fifo/gives-up");
    let (a, b, c) = (client().await, client().await, client().await);
    let held = a.acquire(&name).await.unwrap();
    let short = waiting(Duration::from_millis(700), true);
    let gave_up = b.acquire_with(&name, &short).await;
    assert!(gave_up.is_err(), "got a held lock");
    let name2 = name.clone();
    let next = tokio::spawn(async move {
        let opts = waiting(Duration::from_secs(30), true);
        let guard = c.acquire_with(&name2, &opts).await.unwrap();
        let got = Instant::now();
        guard.release().await.unwrap();
        got
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released = Instant::now();
    held.release().await.unwrap();
    let got = next.await.unwrap();
    assert!(
        got.duration_since(released) < Duration::from_secs(5),
        "the next waiter waited {:?} after the release",
        got.duration_since(released)
    );
    let after = b.try_acquire(&name).await.unwrap();
    assert!(
        after.is_some(),
        "the lock stayed held after every waiter left"
    );
}

/// The entries of the line of `name`: one raw `GET ?recurse` of `<key>/w/` (an HTTP status
/// line of 404 means none).
async fn line_keys(name: &str) -> Vec<String> {
    let url = service_url("LOCKKIT_CONSUL_URL");
    let lock = ConsulLock::connect(&url).await.unwrap();
    let key = lock.lock_key(&LockName::new(name).unwrap());
    let address = url.trim_start_matches("consul://");
    let address = address.split(['/', '?']).next().unwrap();
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let path = format!("/v1/kv/{}/w/?recurse", key.replace('%', "%25"));
    let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    if answer.starts_with("HTTP/1.0 404") || answer.starts_with("HTTP/1.1 404") {
        return Vec::new();
    }
    assert!(answer.contains(" 200 "), "unexpected answer: {answer}");
    let (_, body) = answer.split_once("\r\n\r\n").expect("a body");
    let entries: Vec<serde_json::Value> = serde_json::from_str(body).unwrap();
    let key = |e: &serde_json::Value| e["Key"].as_str().expect("a key").to_string();
    entries.iter().map(key).collect()
}

/// How many entries the line of `name` has.
async fn line_entries(name: &str) -> usize {
    line_keys(name).await.len()
}

/// How many entries the line of `name` has once it is empty, or `within` has passed.
async fn line_entries_after(name: &str, within: Duration) -> usize {
    let until = Instant::now() + within;
    let mut left = line_entries(name).await;
    while left > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = line_entries(name).await;
    }
    left
}

/// Waits that time out, and waits dropped at moments spread over their first requests
/// (entering the line among them), leave no entry in the line behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropped_waits_leave_no_entry() {
    let name = fresh_name("lockkit-consul-fifo/dropped");
    let holder = client().await.acquire(&name).await.unwrap();
    // The probe sees a waiter in line.
    let (locks, name2) = (client().await, name.clone());
    let queued = tokio::spawn(async move {
        let opts = waiting(Duration::from_secs(30), true);
        let _ = locks.acquire_with(&name2, &opts).await;
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(line_entries(&name).await, 1, "the waiter is not in line");
    queued.abort();
    let _ = queued.await;
    let mut waits = JoinSet::new();
    for i in 0..8u64 {
        let (locks, name) = (client().await, name.clone());
        waits.spawn(async move {
            let opts = waiting(Duration::from_secs(30), i % 2 == 0);
            let wait = locks.acquire_with(&name, &opts);
            // Dropped after 0 to 35 ms: before, during and after entering the line.
            let dropped = tokio::time::timeout(Duration::from_millis(5 * i), wait).await;
            assert!(dropped.is_err(), "got a held lock");
        });
    }
    while let Some(done) = waits.join_next().await {
        done.unwrap();
    }
    let left = line_entries_after(&name, Duration::from_secs(10)).await;
    assert_eq!(left, 0, "dropped waits left entries in the line");
    holder.release().await.unwrap();
    let after = client().await.try_acquire(&name).await.unwrap();
    assert!(
        after.is_some(),
        "the lock stayed held after every waiter left"
    );
}

/// A stand-in for a Consul agent whose servers are electing a leader: a TCP proxy in front
/// of the test agent that, while "electing", drops every open connection (a blocking query
/// in flight fails) and answers every new request `500 No cluster leader`, as an agent does
/// until a new leader is elected; otherwise it forwards.
struct Election {
    addr: std::net::SocketAddr,
    electing: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Election {
    async fn start(target: String) -> Election {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (electing, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(Self::serve(client, target.clone(), rx.clone()));
            }
        });
        Election {
            addr,
            electing,
            task,
        }
    }

    async fn serve(
        mut client: tokio::net::TcpStream,
        target: String,
        mut electing: tokio::sync::watch::Receiver<bool>,
    ) {
        if !*electing.borrow_and_update() {
            let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = electing.wait_for(|e| *e) => {}
            }
            return; // both dropped: closed
        }
        let mut request = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(1), client.read(&mut request)).await;
        let body = "No cluster leader";
        let answer = format!(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = client.write_all(answer.as_bytes()).await;
        let _ = client.shutdown().await;
    }

    /// A client of this stand-in agent.
    async fn client(&self) -> Locks {
        let url = format!("consul://{}", self.addr);
        Locks::new(ConsulLock::connect(&url).await.unwrap())
    }

    /// An election of `length`.
    async fn elect(&self, length: Duration) {
        self.electing.send_replace(true);
        tokio::time::sleep(length).await;
        self.electing.send_replace(false);
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The test agent's `host:port`.
fn agent() -> String {
    let url = service_url("LOCKKIT_CONSUL_URL");
    lockkit_testkit::hosts(&url).remove(0)
}

/// Queues a waiter for `name` (held) through `election`'s agent with `wait` time, and
/// returns once it is in line. Its task gives when it got the lock (released at once), or
/// the error.
async fn queue_through(
    election: &Election,
    name: &str,
    wait: Duration,
) -> tokio::task::JoinHandle<lockkit_core::Result<Instant>> {
    let locks = election.client().await;
    let name2 = name.to_string();
    let waiter = tokio::spawn(async move {
        let guard = locks.acquire_with(&name2, &waiting(wait, true)).await?;
        let got = Instant::now();
        guard.release().await?;
        Ok(got)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(line_entries(name).await, 1, "the waiter is not in line");
    waiter
}

/// Checks that the waiter of [`queue_through`] got the lock of `name` within 3 s of `since`
/// (the `what`), and left nothing in the line.
async fn handed_over(
    waiter: tokio::task::JoinHandle<lockkit_core::Result<Instant>>,
    name: &str,
    since: Instant,
    what: &str,
) {
    let got = waiter.await.unwrap();
    let got = got.unwrap_or_else(|e| panic!("no lock 20 s after the election: {e}"));
    let after = got.saturating_duration_since(since);
    assert!(
        after < Duration::from_secs(3),
        "the waiter got the lock {after:?} after the {what}"
    );
    assert_eq!(line_entries(name).await, 0, "entries left in the line");
}

/// A waiter whose agent loses its cluster leader for a while (its blocking query fails, and
/// so does every request until a new leader is elected) keeps its place: the holder's
/// release after the election hands it the lock at once, not to a stale entry of its own
/// that holds the lock until its session lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiter_keeps_its_place_through_a_leader_election() {
    let plain = format!("consul://{}", agent());
    assert_eq!(
        service_url("LOCKKIT_CONSUL_URL"),
        plain,
        "a URL with parameters"
    );
    let name = fresh_name("lockkit-consul-fifo/election");
    let election = Election::start(agent()).await;
    let holder = client().await.acquire(&name).await.unwrap();
    let waiter = queue_through(&election, &name, Duration::from_secs(20)).await;
    let before = line_keys(&name).await;
    election.elect(Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(line_keys(&name).await, before, "the waiter lost its place");
    let released = Instant::now();
    holder.release().await.unwrap();
    handed_over(waiter, &name, released, "release").await;
}

/// A wait dropped while its agent has no cluster leader (its clean-up fails then) leaves no
/// entry in the line once a leader is back, well before its session's TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wait_dropped_during_an_election_leaves_the_line_after_it() {
    let name = fresh_name("lockkit-consul-fifo/dropped-in-election");
    let election = Election::start(agent()).await;
    let holder = client().await.acquire(&name).await.unwrap();
    let waiter = queue_through(&election, &name, Duration::from_secs(60)).await;
    let electing = election.elect(Duration::from_secs(2));
    tokio::pin!(electing);
    // Dropped halfway through the election.
    let _ = tokio::time::timeout(Duration::from_secs(1), &mut electing).await;
    waiter.abort();
    let _ = waiter.await;
    electing.await;
    // Well before the session's TTL could end it.
    let left = line_entries_after(&name, Duration::from_secs(4)).await;
    assert_eq!(left, 0, "the dropped wait's entry outlived the election");
    holder.release().await.unwrap();
}

/// A holder that releases while its agent has no cluster leader (and so does its waiter's)
/// hands the lock to the waiter once a leader is back: the release is retried, and the
/// waiter, still in its place, wakes at the hand-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_during_an_election_hands_over_after_it() {
    let name = fresh_name("lockkit-consul-fifo/release-in-election");
    let election = Election::start(agent()).await;
    // Renewal off, so the guard's retries are the release's only ones (a renewing guard's
    // failed release is also let go in the background, and the two race: a retry that
    // comes second reports NotOwner, a known issue of the shared session's release).
    let own = waiting(Duration::ZERO, false);
    let holder = election.client().await;
    let holder = holder.acquire_with(&name, &own).await.unwrap();
    let waiter = queue_through(&election, &name, Duration::from_secs(20)).await;
    let electing = election.elect(Duration::from_secs(2));
    tokio::pin!(electing);
    let _ = tokio::time::timeout(Duration::from_millis(500), &mut electing).await;
    let (released, ()) = tokio::join!(holder.release(), electing);
    let elected = Instant::now();
    released.unwrap();
    handed_over(waiter, &name, elected, "election").await;
}
