//! The workloads of `lockkit bench` (feature `bench`): each backend against the least its
//! server needs for a lock through the plain client crate (the [floor]), measured in
//! the same run, so lockkit's overhead shows as a ratio.
//!
//! For one URL, [`run`] measures:
//!
//! - **uncontended:** `iterations` sequential acquire+release cycles, lockkit and the fenced
//!   floor (and the unfenced floor where it differs) interleaved `rounds` times; the ratio is
//!   the median of the rounds' ratios of mean latencies; and the client process's CPU time
//!   and context switches per cycle ([`Work`]) of lockkit and of the fenced floor;
//! - **contended:** `workers` clients (each its own connections) on one name, each holding
//!   the lock for `hold`, for `duration`: acquisitions per second, wait p50/p99/max,
//!   fairness (fewest ÷ most acquisitions per worker) and hand-off latency (release call →
//!   the next holder has the guard);
//! - **failover** (given the path of the `lockkit` binary): a holder in another process is
//!   killed (its keeper gone, nothing released) and the time until a waiter holds the lock
//!   is set against the TTL;
//! - **scale** (given `scale`): that many names held at once by one client for `scale_hold`:
//!   time to take them, memory per guard (RSS growth), CPU share of one core spent while
//!   holding (from `getrusage`), how many were still held at the end;
//! - **mutual exclusion** throughout: two holders at once, or a token not above the last
//!   one, is recorded in [`Report::violations`] (and fails `lockkit bench`).

mod contended;
pub mod floor;
mod stats;
mod sys;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use lockkit_core::url::ServiceUrl;
use lockkit_core::{BoxError, LockOptions, Locks};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

pub use contended::{contended, Contended};
pub use floor::Floor;
pub use stats::{median, ms, time_loop, try_time_loop, Stats};
pub use sys::{machine, utc_now};

/// What to run, and how long.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Timed acquire+release cycles per round and per contender (lockkit, each floor).
    pub iterations: usize,
    /// Rounds of the interleaved uncontended measurement.
    pub rounds: usize,
    /// Clients of the contended run.
    pub workers: usize,
    /// Length of the contended run.
    pub duration: Duration,
    /// How long a contended worker holds the lock each time.
    pub hold: Duration,
    /// The `lockkit` binary, for the failover run's holder process; `None`: no failover run.
    pub holder: Option<PathBuf>,
    /// The failover holder's TTL; `None`: the larger of 2 s and the backend's minimum.
    pub failover_ttl: Option<Duration>,
    /// Names held at once in the scale run; `None`: no scale run.
    pub scale: Option<usize>,
    /// How long the scale run holds its names.
    pub scale_hold: Duration,
    /// The scale run's lease TTL.
    pub scale_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            iterations: 500,
            rounds: 3,
            workers: 8,
            duration: Duration::from_secs(10),
            hold: Duration::from_millis(1),
            holder: None,
            failover_ttl: None,
            scale: None,
            scale_hold: Duration::from_secs(20),
            scale_ttl: Duration::from_secs(10),
        }
    }
}

/// Where a run is, for a progress display. Every method has a no-op default.
pub trait Progress: Send + Sync {
    /// A new phase of `steps` steps begins (`what`: e.g. `redis: contended`); 0 steps: a
    /// phase that runs for a set time.
    fn phase(&self, what: &str, steps: u64) {
        let _ = (what, steps);
    }
    /// `steps` more steps of the phase are done.
    fn advance(&self, steps: u64) {
        let _ = steps;
    }
}

/// No progress display.
pub struct Quiet;

impl Progress for Quiet {}

/// The uncontended measurement.
#[derive(Debug, Clone)]
pub struct Uncontended {
    /// lockkit's acquire+release, all rounds.
    pub lockkit: Stats,
    /// The fenced floor's round, all rounds.
    pub floor: Stats,
    /// The unfenced floor's round, where it differs from the fenced one.
    pub unfenced: Option<Stats>,
    /// Median over the rounds of lockkit's mean ÷ the fenced floor's mean.
    pub ratio: f64,
    /// Median over the rounds of lockkit's mean ÷ the unfenced floor's mean.
    pub unfenced_ratio: Option<f64>,
    /// What a lockkit cycle costs this process, all rounds.
    pub lockkit_work: Work,
    /// What a fenced floor's round costs this process, all rounds.
    pub floor_work: Work,
}

/// What one cycle of a loop costs the client, on average: this process's CPU time and
/// context switches (all its threads; for SQLite the database engine's too), from
/// `getrusage` before and after each round's loop. The switches hold steadier than latency
/// on a busy machine: a thread woken for nothing costs one whether or not it delays the
/// caller. Both count whatever else the process does meanwhile, such as a client's periodic
/// keep-alive, in the loop that happens to run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Work {
    /// CPU time per cycle, user and system.
    pub cpu: Duration,
    /// Context switches per cycle.
    pub switches: f64,
}

impl Work {
    fn per_cycle(used: sys::Usage, cycles: usize) -> Work {
        if cycles == 0 {
            return Work::default();
        }
        Work {
            cpu: used.cpu.div_f64(cycles as f64),
            switches: used.switches as f64 / cycles as f64,
        }
    }

    fn to_json(self) -> Value {
        json!({
            "cpu_us_per_cycle": self.cpu.as_secs_f64() * 1e6,
            "context_switches_per_cycle": self.switches,
        })
    }
}

/// The failover measurement.
#[derive(Debug, Clone)]
pub struct Failover {
    /// The killed holder's TTL.
    pub ttl: Duration,
    /// From the kill until the waiter held the lock.
    pub took: Duration,
}

/// The scale measurement.
#[derive(Debug, Clone)]
pub struct Scale {
    /// Names asked for.
    pub names: usize,
    /// Names taken.
    pub taken: usize,
    /// Acquisitions that failed, and the first error.
    pub failed: usize,
    /// The first failure's message.
    pub first_error: Option<String>,
    /// Time to take them all (64 at a time).
    pub take_time: Duration,
    /// How long they were held.
    pub hold: Duration,
    /// The lease TTL.
    pub ttl: Duration,
    /// Resident memory growth per guard taken, in bytes.
    pub bytes_per_guard: f64,
    /// CPU time of this process during the hold, in percent of one core.
    pub cpu_percent: f64,
    /// Guards still held at the end of the hold.
    pub held_at_end: usize,
    /// Releases that failed.
    pub release_failures: usize,
}

/// Everything one URL's run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// `scheme` or `scheme/strategy`.
    pub label: String,
    /// The URL without its password.
    pub url: String,
    /// The backend's name (`redis`, `postgres`, ...).
    pub backend: String,
    /// The server's version.
    pub server_version: String,
    /// What one fenced floor round does.
    pub floor_what: String,
    /// What one unfenced floor round does, where it differs.
    pub unfenced_what: Option<String>,
    /// The uncontended measurement.
    pub uncontended: Uncontended,
    /// The contended measurement.
    pub contended: Contended,
    /// The failover measurement, if run.
    pub failover: Option<Failover>,
    /// Why the failover run was skipped, if it was.
    pub failover_skipped: Option<String>,
    /// The scale measurement, if run.
    pub scale: Option<Scale>,
    /// Mutual-exclusion violations; empty in a correct run.
    pub violations: Vec<String>,
}

/// `scheme` or `scheme/strategy`, as the table shows a URL.
pub fn label(url: &str) -> String {
    match ServiceUrl::parse(url) {
        Ok(mut parsed) => match parsed.take("strategy") {
            Some(strategy) => format!("{}/{strategy}", parsed.scheme()),
            None => parsed.scheme().to_string(),
        },
        Err(_) => lockkit_core::url::redact(url),
    }
}

/// Runs every workload on `url` (see the [module docs](self)).
pub async fn run(
    url: &str,
    settings: &Settings,
    progress: &dyn Progress,
) -> Result<Report, BoxError> {
    let label = label(url);
    let locks = crate::connect(url).await?;
    let floor = Floor::connect(url).await?;
    let server_version = floor.version().await;
    let mut violations = Vec::new();

    let uncontended =
        uncontended(&label, &locks, &floor, settings, progress, &mut violations).await;
    let floor_what = floor.fenced_what().to_string();
    let unfenced_what = floor.unfenced_what().map(str::to_string);
    // Best effort: what a floor leaves behind (a counter, a lease, a session) is small.
    let _ = floor.close().await;
    let uncontended = uncontended?;

    progress.phase(&format!("{label}: contended"), 0);
    let name = unique("lockkit-bench/contended");
    let run = contended(
        settings.workers,
        settings.duration,
        settings.hold,
        &name,
        || crate::connect(url),
    )
    .await?;
    violations.extend(run.violations.iter().map(|v| format!("contended: {v}")));

    let (mut failover_run, mut failover_skipped) = (None, None);
    match (&settings.holder, url.contains(":memory:")) {
        (None, _) => failover_skipped = Some("no lockkit binary to run the holder".into()),
        (Some(_), true) => failover_skipped = Some("an in-memory database has one process".into()),
        (Some(exe), false) => {
            progress.phase(&format!("{label}: failover"), 1);
            let measured = failover(url, exe, &locks, settings, &mut violations).await?;
            progress.advance(1);
            failover_run = Some(measured);
        }
    }

    let scale = match settings.scale {
        Some(names) => Some(scale(&label, url, names, settings, progress).await?),
        None => None,
    };

    Ok(Report {
        label,
        url: lockkit_core::url::redact(url),
        backend: locks.backend_name().to_string(),
        server_version,
        floor_what,
        unfenced_what,
        uncontended,
        contended: run,
        failover: failover_run,
        failover_skipped,
        scale,
        violations,
    })
}

/// A lock name no other run uses.
fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    format!(
        "{prefix}/{}-{}-{}",
        std::process::id(),
        now.map_or(0, |d| d.as_nanos()),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

async fn uncontended(
    label: &str,
    locks: &Locks,
    floor: &Floor,
    settings: &Settings,
    progress: &dyn Progress,
    violations: &mut Vec<String>,
) -> Result<Uncontended, BoxError> {
    let name = unique("lockkit-bench/uncontended");
    let opts = LockOptions::new();
    let fencing = locks.capabilities().fencing;
    let last = AtomicU64::new(0);
    let bad = std::sync::Mutex::new(Vec::new());
    let cycle = || async {
        let guard = locks.acquire_with(&name, &opts).await?;
        let token = guard.fencing_token().get();
        let before = last.swap(token, Ordering::Relaxed);
        if fencing && token <= before {
            bad.lock()
                .expect("not poisoned")
                .push(format!("uncontended: token {token} after {before}"));
        }
        guard.release().await?;
        Ok::<_, BoxError>(())
    };
    // One of each first, so a failure is reported before any timing.
    floor.round(true).await?;
    cycle().await?;

    let has_unfenced = floor.unfenced_what().is_some();
    let contenders = if has_unfenced { 3 } else { 2 };
    let (n, warmup) = (settings.iterations, settings.iterations / 10);
    progress.phase(
        &format!("{label}: uncontended"),
        (settings.rounds * contenders * (n + warmup)) as u64,
    );
    let step = |result: Result<Vec<Duration>, BoxError>| {
        progress.advance((n + warmup) as u64);
        result
    };
    let (mut ours, mut fenced, mut unfenced) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ratios, mut unfenced_ratios) = (Vec::new(), Vec::new());
    let (mut ours_used, mut floor_used) = (sys::Usage::default(), sys::Usage::default());
    let rounds = settings.rounds.max(1);
    for _ in 0..rounds {
        let (f, used) = sys::measured(try_time_loop(n, warmup, || floor.round(true))).await;
        floor_used = floor_used.plus(used);
        let f = step(f)?;
        let u = match has_unfenced {
            true => Some(step(try_time_loop(n, warmup, || floor.round(false)).await)?),
            false => None,
        };
        let (o, used) = sys::measured(try_time_loop(n, warmup, cycle)).await;
        ours_used = ours_used.plus(used);
        let o = step(o)?;
        let (fs, os) = (Stats::of(&f), Stats::of(&o));
        ratios.push(ms(os.mean) / ms(fs.mean).max(f64::MIN_POSITIVE));
        if let Some(u) = u {
            let us = Stats::of(&u);
            unfenced_ratios.push(ms(os.mean) / ms(us.mean).max(f64::MIN_POSITIVE));
            unfenced.extend(u);
        }
        fenced.extend(f);
        ours.extend(o);
    }
    violations.extend(bad.into_inner().expect("not poisoned"));
    Ok(Uncontended {
        lockkit: Stats::of(&ours),
        floor: Stats::of(&fenced),
        unfenced: has_unfenced.then(|| Stats::of(&unfenced)),
        ratio: median(&ratios),
        unfenced_ratio: has_unfenced.then(|| median(&unfenced_ratios)),
        lockkit_work: Work::per_cycle(ours_used, rounds * (n + warmup)),
        floor_work: Work::per_cycle(floor_used, rounds * (n + warmup)),
    })
}

/// A holder in another process (`lockkit __bench-hold`), killed once a waiter of this
/// process is queued: how long until the waiter holds the lock.
async fn failover(
    url: &str,
    exe: &std::path::Path,
    locks: &Locks,
    settings: &Settings,
    violations: &mut Vec<String>,
) -> Result<Failover, BoxError> {
    let caps = locks.capabilities();
    let ttl = settings
        .failover_ttl
        .unwrap_or(Duration::from_secs(2))
        .max(caps.min_ttl);
    let name = unique("lockkit-bench/failover");
    let mut child = tokio::process::Command::new(exe)
        .args(["__bench-hold", "--url", url, "--name", &name, "--ttl"])
        .arg(format!("{}", ttl.as_secs_f64()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the failover holder {}: {e}", exe.display()))?;
    let stdout = child.stdout.take().ok_or("the holder has no stdout")?;
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(stdout);
    tokio::time::timeout(Duration::from_secs(60), reader.read_line(&mut line))
        .await
        .map_err(|_| "the failover holder did not take the lock within 60 s")??;
    let holder_token: u64 = line
        .trim()
        .strip_prefix("held ")
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| format!("the failover holder said {line:?}"))?;
    let waiter_opts = LockOptions::new()
        .ttl(ttl)
        .wait_timeout(ttl * 3 + caps.expiry_slack * 2 + Duration::from_secs(60));
    let waiter = {
        let (locks, name) = (locks.clone(), name.clone());
        tokio::spawn(async move {
            let guard = locks.acquire_with(&name, &waiter_opts).await?;
            let at = Instant::now();
            let token = guard.fencing_token().get();
            guard.release().await?;
            Ok::<_, lockkit_core::Error>((at, token))
        })
    };
    // Let the waiter queue up behind the holder, then kill the holder.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if waiter.is_finished() {
        violations.push("failover: a waiter got the lock while the holder was alive".into());
    }
    let killed = Instant::now();
    child.start_kill()?;
    let _ = child.wait().await;
    let (at, token) = waiter.await??;
    if caps.fencing && token <= holder_token {
        violations.push(format!(
            "failover: token {token} after the dead holder's {holder_token}"
        ));
    }
    Ok(Failover {
        ttl,
        took: at.saturating_duration_since(killed),
    })
}

async fn scale(
    label: &str,
    url: &str,
    names: usize,
    settings: &Settings,
    progress: &dyn Progress,
) -> Result<Scale, BoxError> {
    let locks = crate::connect(url).await?;
    let opts = LockOptions::new()
        .ttl(settings.scale_ttl)
        .wait_timeout(Duration::from_secs(30));
    let base = unique("lockkit-bench/scale");
    progress.phase(&format!("{label}: scale, taking {names}"), names as u64);
    let rss_before = sys::rss_bytes();
    let started = Instant::now();
    let results: Vec<_> = stream::iter(0..names)
        .map(|i| {
            let (locks, opts, name) = (&locks, &opts, format!("{base}/{i}"));
            async move {
                let result = locks.acquire_with(&name, opts).await;
                progress.advance(1);
                result
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let take_time = started.elapsed();
    let (mut guards, mut first_error, mut failed) = (Vec::new(), None, 0);
    for result in results {
        match result {
            Ok(guard) => guards.push(guard),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let rss_after = sys::rss_bytes();
    progress.phase(&format!("{label}: scale, holding {}", guards.len()), 0);
    let held_from = Instant::now();
    let ((), used) = sys::measured(tokio::time::sleep(settings.scale_hold)).await;
    let cpu = used.cpu;
    let hold = held_from.elapsed();
    let held_at_end = guards.iter().filter(|g| g.is_held()).count();
    let taken = guards.len();
    let failures = Arc::new(AtomicU64::new(0));
    stream::iter(guards)
        .for_each_concurrent(64, |guard| {
            let failures = failures.clone();
            async move {
                if guard.release().await.is_err() {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .await;
    let grown = rss_after.saturating_sub(rss_before) as f64;
    Ok(Scale {
        names,
        taken,
        failed,
        first_error,
        take_time,
        hold,
        ttl: settings.scale_ttl,
        bytes_per_guard: if taken == 0 {
            0.0
        } else {
            grown / taken as f64
        },
        cpu_percent: cpu.as_secs_f64() / hold.as_secs_f64().max(f64::MIN_POSITIVE) * 100.0,
        held_at_end,
        release_failures: failures.load(Ordering::Relaxed) as usize,
    })
}

impl Report {
    /// Every figure of the report as JSON (durations in milliseconds, named `*_ms`).
    pub fn to_json(&self) -> Value {
        let u = &self.uncontended;
        let c = &self.contended;
        json!({
            "label": self.label,
            "url": self.url,
            "backend": self.backend,
            "server_version": self.server_version,
            "floor": {
                "fenced": self.floor_what,
                "unfenced": self.unfenced_what,
            },
            "uncontended": {
                "lockkit": u.lockkit.to_json(),
                "floor_fenced": u.floor.to_json(),
                "floor_unfenced": u.unfenced.map(|s| s.to_json()),
                "ratio_to_fenced_floor": u.ratio,
                "ratio_to_unfenced_floor": u.unfenced_ratio,
                "work": {
                    "lockkit": u.lockkit_work.to_json(),
                    "floor_fenced": u.floor_work.to_json(),
                },
            },
            "contended": {
                "workers": c.per_worker.len(),
                "seconds": c.elapsed.as_secs_f64(),
                "acquisitions": c.total(),
                "acquisitions_per_second": c.per_second(),
                "per_worker": c.per_worker,
                "fairness": c.fairness(),
                "wait": c.wait.to_json(),
                "handoff": c.handoff.to_json(),
            },
            "failover": self.failover.as_ref().map(|f| json!({
                "ttl_ms": ms(f.ttl),
                "took_ms": ms(f.took),
                "ratio_to_ttl": f.took.as_secs_f64() / f.ttl.as_secs_f64(),
            })),
            "failover_skipped": self.failover_skipped,
            "scale": self.scale.as_ref().map(|s| json!({
                "names": s.names,
                "taken": s.taken,
                "failed": s.failed,
                "first_error": s.first_error,
                "take_ms": ms(s.take_time),
                "hold_ms": ms(s.hold),
                "ttl_ms": ms(s.ttl),
                "bytes_per_guard": s.bytes_per_guard,
                "cpu_percent_of_a_core": s.cpu_percent,
                "held_at_end": s.held_at_end,
                "release_failures": s.release_failures,
            })),
            "mutual_exclusion": {
                "ok": self.violations.is_empty(),
                "violations": self.violations,
            },
        })
    }
}
