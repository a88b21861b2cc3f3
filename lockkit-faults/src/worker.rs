//! A worker process: only the public API (`lockkit::connect`), in a loop: acquire, read the
//! register with the token, pause, write the value read plus one with the token, release.
//! Every step is logged. A storm worker cancels its acquires after a random delay.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lockkit::{Error, LockOptions, Locks, LostReason};

use crate::event::{ms, now_ns, Event, Log};
use crate::register::{Outcome, Register};

/// A worker's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// The lock service URL.
    #[arg(long)]
    pub url: String,
    /// The lock name.
    #[arg(long)]
    pub name: String,
    /// This worker's id in the logs.
    #[arg(long)]
    pub id: String,
    /// Where to append the JSON lines.
    #[arg(long)]
    pub log: PathBuf,
    /// The register's SQLite file.
    #[arg(long)]
    pub register: PathBuf,
    /// Negative control: the register does not check tokens.
    #[arg(long)]
    pub unfenced: bool,
    /// Lease TTL, milliseconds.
    #[arg(long)]
    pub ttl_ms: u64,
    /// How long one acquire may wait, milliseconds.
    #[arg(long, default_value_t = 60_000)]
    pub wait_ms: u64,
    /// Stop at this CLOCK_MONOTONIC time (ns), or at SIGTERM, whichever comes first: no new
    /// acquire, a waiting one is abandoned, a hold in progress finishes.
    #[arg(long)]
    pub until_ns: u64,
    /// Concurrent loops in this process.
    #[arg(long, default_value_t = 1)]
    pub tasks: u32,
    /// Storm: cancel each acquire after a random delay up to this many ms.
    #[arg(long)]
    pub cancel_max_ms: Option<u64>,
    /// Shortest pause between read and write, ms.
    #[arg(long, default_value_t = 100)]
    pub pause_min_ms: u64,
    /// Longest pause between read and write, ms.
    #[arg(long, default_value_t = 400)]
    pub pause_max_ms: u64,
    /// Seed of the pauses.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs the worker until `until_ns`.
pub async fn run(args: WorkerArgs) -> std::io::Result<()> {
    let log = Arc::new(Log::open(&args.log)?);
    log.put(&Event::new(&args.id, "start"));
    let until = args.until_ns;
    let locks = loop {
        match lockkit::connect(&args.url).await {
            Ok(locks) => break locks,
            Err(e) => {
                let mut ev = Event::new(&args.id, "connect_error");
                ev.err = Some(e.to_string());
                log.put(&ev);
                if now_ns() >= until {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let register = loop {
        match Register::open(&args.register, !args.unfenced).await {
            Ok(r) => break r,
            Err(e) => {
                eprintln!("{}: register: {e}", args.id);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    {
        let until = args.until_ns;
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::time::sleep(until_left(until)) => {}
            }
            let _ = stop_tx.send(true);
        });
    }
    let mut tasks = Vec::new();
    for i in 0..args.tasks {
        let id = if args.tasks == 1 {
            args.id.clone()
        } else {
            format!("{}.{i}", args.id)
        };
        let seed = args.seed.wrapping_mul(31).wrapping_add(u64::from(i));
        tasks.push(tokio::spawn(work(
            args.clone(),
            id,
            seed,
            locks.clone(),
            register.clone(),
            log.clone(),
            stop.clone(),
        )));
    }
    for t in tasks {
        let _ = t.await;
    }
    register.close().await;
    log.put(&Event::new(&args.id, "exit"));
    Ok(())
}

fn until_left(until: u64) -> Duration {
    Duration::from_nanos(until.saturating_sub(now_ns()))
}

async fn work(
    args: WorkerArgs,
    id: String,
    seed: u64,
    locks: Locks,
    register: Register,
    log: Arc<Log>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let opts = LockOptions::new()
        .ttl(Duration::from_millis(args.ttl_ms))
        .wait_timeout(Duration::from_millis(args.wait_ms));
    while !*stop.borrow() {
        let mut attempt = Event::new(&id, "attempt");
        let at = attempt.t;
        attempt.deadline = Some(at + ms(args.wait_ms));
        log.put(&attempt);
        let cancel_after = match args.cancel_max_ms {
            Some(max) => Duration::from_millis(rng.u64(0..=max)),
            None => Duration::from_secs(3600),
        };
        let acquired = tokio::select! {
            r = tokio::time::timeout(cancel_after, locks.acquire_with(&args.name, &opts)) => r,
            _ = stop.wait_for(|s| *s) => {
                let mut ev = Event::new(&id, "abandoned");
                ev.at = Some(at);
                log.put(&ev);
                break;
            }
        };
        let guard = match acquired {
            Err(_) => {
                let mut ev = Event::new(&id, "cancelled");
                ev.at = Some(at);
                log.put(&ev);
                continue;
            }
            Ok(Err(e)) => {
                let mut ev = Event::new(&id, "acquire_error");
                ev.at = Some(at);
                ev.deadline = Some(at + ms(args.wait_ms));
                ev.err = Some(describe(&e));
                log.put(&ev);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Ok(Ok(guard)) => guard,
        };
        let token = guard.fencing_token().get();
        let mut grant = Event::new(&id, "grant");
        grant.token = Some(token);
        grant.at = Some(at);
        log.put(&grant);
        let lost = guard.lost();
        let watcher = {
            let (log, id) = (log.clone(), id.clone());
            tokio::spawn(async move {
                let reason = lost.await;
                if reason != LostReason::Released {
                    let mut ev = Event::new(&id, "lost");
                    ev.token = Some(token);
                    ev.err = Some(reason.to_string());
                    log.put(&ev);
                }
            })
        };
        // The protected work: deliberately NOT checking is_held() — the register's fence is
        // what must stop a holder that lost its lease.
        let read = register.read(token).await;
        log_op(&log, &id, "read", token, &read);
        if let Ok(Outcome::Accepted(value)) = read {
            let pause = rng.u64(args.pause_min_ms..=args.pause_max_ms.max(args.pause_min_ms));
            tokio::time::sleep(Duration::from_millis(pause)).await;
            // marks the end of the pause: the driver stops holders only before it
            let mut writing = Event::new(&id, "writing");
            writing.token = Some(token);
            log.put(&writing);
            let written = register.write(token, value + 1).await;
            log_op(&log, &id, "write", token, &written);
        }
        let mut releasing = Event::new(&id, "releasing");
        releasing.token = Some(token);
        log.put(&releasing);
        let released = guard.release().await;
        let mut ev = Event::new(&id, "release");
        ev.token = Some(token);
        ev.ok = Some(released.is_ok());
        if let Err(e) = &released {
            ev.err = Some(describe(e));
        }
        log.put(&ev);
        // let the loss watcher log a loss that came with the release (LockLost)
        let _ = tokio::time::timeout(Duration::from_millis(50), watcher).await;
    }
}

fn log_op(log: &Log, id: &str, op: &str, token: u64, result: &Result<Outcome, sqlx::Error>) {
    let mut ev = Event::new(id, op);
    ev.token = Some(token);
    match result {
        Ok(Outcome::Accepted(v)) => {
            ev.ok = Some(true);
            ev.value = Some(*v);
        }
        Ok(Outcome::Stale) => ev.ok = Some(false),
        Err(e) => ev.err = Some(format!("register: {e}")),
    }
    log.put(&ev);
}

/// The error's kind and text, e.g. `connection: …`, `timeout: …`.
fn describe(e: &Error) -> String {
    let kind = if matches!(e, Error::Connection { .. }) {
        "connection"
    } else if e.is_timeout() {
        "timeout"
    } else if e.is_lost() {
        "lock_lost"
    } else {
        "other"
    };
    format!("{kind}: {e}")
}
