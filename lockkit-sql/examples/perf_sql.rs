//! lockkit-sql against plain sqlx on the same servers, in one run, as ratios.
//!
//! * **Uncontended**: `--iterations` sequential acquire+release cycles, lockkit and the
//!   *fenced floor* interleaved for 3 rounds (median of the per-round ratios of mean
//!   latencies), and the naive unfenced lock+unlock too. The fenced floor: PostgreSQL, one
//!   statement that takes `pg_try_advisory_lock` and bumps a committed counter (a CTE), then
//!   `pg_advisory_unlock`; MySQL/MariaDB: `GET_LOCK`, the counter bump, `RELEASE_LOCK`.
//! * **Contended**: 8 clients (each its own connections) on one name, each holding 1 ms, for
//!   `--seconds`: acquisitions per second, fairness (fewest ÷ most per client) and the
//!   longest wait, for lockkit's strategies and for the plain peer (sqlx `PgAdvisoryLock`,
//!   plain `GET_LOCK`).
//! * **Scale**: one process takes `--guards` names (TTL 10 s) and holds them for `--hold`
//!   seconds: the process's CPU over the hold (renewals) in % of a core, the memory per guard,
//!   and how many releases fail.
//!
//! ```text
//! cargo run --release -p lockkit-sql --all-features --example perf_sql -- --help
//! ```
//! URLs: `LOCKKIT_POSTGRES_URL` / `LOCKKIT_MYSQL_URL`, else `target/services.env`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockkit_core::{LockOptions, Locks};
use lockkit_sql::{MySqlLock, PgLock, SqliteLock};
use sqlx::mysql::MySqlConnection;
use sqlx::postgres::{PgAdvisoryLock, PgConnection};
use sqlx::Connection;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Options, as `--name value` pairs.
struct Args {
    iterations: usize,
    seconds: f64,
    guards: usize,
    hold: f64,
    only: Vec<String>,
}

impl Args {
    fn parse() -> Args {
        let mut args = Args {
            iterations: 500,
            seconds: 5.0,
            guards: 10_000,
            hold: 20.0,
            only: Vec::new(),
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().unwrap_or_default();
            match flag.as_str() {
                "--iterations" => args.iterations = value().parse().expect("--iterations N"),
                "--seconds" => args.seconds = value().parse().expect("--seconds S"),
                "--guards" => args.guards = value().parse().expect("--guards N"),
                "--hold" => args.hold = value().parse().expect("--hold S"),
                "--only" => args.only.push(value()),
                _ => {
                    println!(
                        "perf_sql [--iterations 500] [--seconds 5] [--guards 10000] [--hold 20] \
                         [--only uncontended|contended|scale]..."
                    );
                    std::process::exit(0);
                }
            }
        }
        args
    }

    fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == part)
    }
}

fn url(key: &str) -> String {
    if let Ok(url) = std::env::var(key) {
        return url;
    }
    for file in ["target/services.env", "../target/services.env"] {
        if let Ok(text) = std::fs::read_to_string(file) {
            for line in text.lines() {
                if let Some(url) = line.strip_prefix(&format!("{key}=")) {
                    return url.to_string();
                }
            }
        }
    }
    panic!("set {key}")
}

fn with(url: &str, params: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), fastrand::u64(..))
}

/// The plain-sqlx floors of one server.
enum Floor {
    Pg(PgConnection),
    My(MySqlConnection),
}

impl Floor {
    async fn connect(url: &str) -> Result<Floor, BoxError> {
        Ok(match url.starts_with("postgres") {
            true => {
                let mut c = PgConnection::connect(url).await?;
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS perf_floor_fences (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
                )
                .execute(&mut c)
                .await?;
                Floor::Pg(c)
            }
            false => {
                let mut c = MySqlConnection::connect(url).await?;
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS perf_floor_fences (name VARBINARY(255) PRIMARY KEY, value BIGINT NOT NULL) ENGINE=InnoDB",
                )
                .execute(&mut c)
                .await?;
                Floor::My(c)
            }
        })
    }

    /// One fenced lock + unlock (`fenced`), or the naive lock + unlock.
    async fn round(&mut self, name: &str, fenced: bool) -> Result<(), BoxError> {
        let key = name.len() as i64 * 7919 + 424_242;
        match self {
            Floor::Pg(c) if fenced => {
                let token: i64 = sqlx::query_scalar(
                    "WITH l AS (SELECT pg_try_advisory_lock($1) AS got),
                          f AS (INSERT INTO perf_floor_fences (name, value) SELECT $2, 1 FROM l WHERE got
                                ON CONFLICT (name) DO UPDATE SET value = perf_floor_fences.value + 1 RETURNING value)
                     SELECT COALESCE((SELECT value FROM f), 0) FROM l",
                )
                .bind(key)
                .bind(name)
                .fetch_one(&mut *c)
                .await?;
                assert!(token > 0);
                sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(key)
                    .execute(&mut *c)
                    .await?;
            }
            Floor::Pg(c) => {
                let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(key)
                    .fetch_one(&mut *c)
                    .await?;
                assert!(got);
                sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(key)
                    .execute(&mut *c)
                    .await?;
            }
            Floor::My(c) => {
                let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 0)")
                    .bind(name)
                    .fetch_one(&mut *c)
                    .await?;
                assert_eq!(got, Some(1));
                if fenced {
                    sqlx::query(
                        "INSERT INTO perf_floor_fences (name, value) VALUES (?, LAST_INSERT_ID(1))
                         ON DUPLICATE KEY UPDATE value = LAST_INSERT_ID(value + 1)",
                    )
                    .bind(name)
                    .execute(&mut *c)
                    .await?;
                }
                sqlx::query("SELECT RELEASE_LOCK(?)")
                    .bind(name)
                    .execute(&mut *c)
                    .await?;
            }
        }
        Ok(())
    }
}

/// Mean time of `n` runs of `op` (after `n / 10` unmeasured).
async fn mean<F, Fut>(n: usize, mut op: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    for _ in 0..n / 10 {
        op().await;
    }
    let start = Instant::now();
    for _ in 0..n {
        op().await;
    }
    start.elapsed() / n as u32
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn uncontended(label: &str, locks: &Locks, server: &str, n: usize) -> Result<(), BoxError> {
    let floor = tokio::sync::Mutex::new(Floor::connect(server).await?);
    let name = unique("perf-sql/uncontended");
    let floor_name = unique("perf-sql/floor");
    let (mut fenced, mut naive, mut ours) = (Vec::new(), Vec::new(), Vec::new());
    let mut times = [Duration::ZERO; 3];
    for _ in 0..3 {
        let f = mean(n, || async {
            floor
                .lock()
                .await
                .round(&floor_name, true)
                .await
                .expect("fenced floor");
        })
        .await;
        let o = mean(n, || async {
            let guard = locks.acquire(&name).await.expect("acquire");
            guard.release().await.expect("release");
        })
        .await;
        let u = mean(n, || async {
            floor
                .lock()
                .await
                .round(&floor_name, false)
                .await
                .expect("naive floor");
        })
        .await;
        fenced.push(o.as_secs_f64() / f.as_secs_f64());
        naive.push(o.as_secs_f64() / u.as_secs_f64());
        ours.push(o.as_secs_f64());
        times = [f, u, o];
    }
    let [f, u, o] = times;
    println!(
        "{label:<18} uncontended: lockkit {:>7.1} µs  fenced floor {:>7.1} µs  naive {:>7.1} µs  \
         ratio ÷fenced {:.2}x  ÷naive {:.2}x",
        o.as_secs_f64() * 1e6,
        f.as_secs_f64() * 1e6,
        u.as_secs_f64() * 1e6,
        median(fenced),
        median(naive),
    );
    Ok(())
}

/// 8 workers on one name, each holding 1 ms, for `seconds`: (per second, fairness, max wait).
async fn contended<F, Fut>(seconds: f64, worker: F) -> (f64, f64, Duration)
where
    F: Fn(usize, Instant) -> Fut,
    Fut: Future<Output = Vec<Duration>> + Send + 'static,
{
    let until = Instant::now() + Duration::from_millis(300) + Duration::from_secs_f64(seconds);
    let start = Instant::now() + Duration::from_millis(300);
    let tasks: Vec<_> = (0..8).map(|w| tokio::spawn(worker(w, until))).collect();
    let mut counts = Vec::new();
    let mut max = Duration::ZERO;
    for task in tasks {
        let waits = task.await.expect("worker");
        counts.push(waits.len());
        max = max.max(waits.into_iter().max().unwrap_or_default());
    }
    let elapsed = start.elapsed().as_secs_f64();
    let total: usize = counts.iter().sum();
    let (fewest, most) = (
        *counts.iter().min().unwrap_or(&0),
        *counts.iter().max().unwrap_or(&0),
    );
    let fairness = if most == 0 {
        0.0
    } else {
        fewest as f64 / most as f64
    };
    (total as f64 / elapsed, fairness, max)
}

fn row(label: &str, (per_s, fair, max): (f64, f64, Duration)) {
    println!(
        "{label:<18} contended: {per_s:>7.0}/s  fairness {fair:.2}  max wait {:>7.1} ms",
        max.as_secs_f64() * 1e3
    );
}

const HOLD: Duration = Duration::from_millis(1);

async fn lockkit_contended(clients: Vec<Locks>, seconds: f64) -> (f64, f64, Duration) {
    let clients = Arc::new(clients);
    let name = unique("perf-sql/contended");
    contended(seconds, move |w, until| {
        let (clients, name) = (clients.clone(), name.clone());
        async move {
            tokio::time::sleep_until((until - Duration::from_secs_f64(seconds)).into()).await;
            let opts = LockOptions::new().wait_timeout(Duration::from_secs(60));
            let mut waits = Vec::new();
            while Instant::now() < until {
                let asked = Instant::now();
                let guard = clients[w]
                    .acquire_with(&name, &opts)
                    .await
                    .expect("acquire");
                waits.push(asked.elapsed());
                tokio::time::sleep(HOLD).await;
                guard.release().await.expect("release");
            }
            waits
        }
    })
    .await
}

async fn pg_peer_contended(server: String, seconds: f64) -> (f64, f64, Duration) {
    let name = unique("perf-sql/peer");
    contended(seconds, move |_, until| {
        let (server, name) = (server.clone(), name.clone());
        async move {
            let mut conn = PgConnection::connect(&server).await.expect("connect");
            tokio::time::sleep_until((until - Duration::from_secs_f64(seconds)).into()).await;
            let lock = PgAdvisoryLock::new(&name);
            let mut waits = Vec::new();
            while Instant::now() < until {
                let asked = Instant::now();
                let guard = lock.acquire(conn).await.expect("acquire");
                waits.push(asked.elapsed());
                tokio::time::sleep(HOLD).await;
                conn = guard.release_now().await.expect("release");
            }
            waits
        }
    })
    .await
}

async fn my_peer_contended(server: String, seconds: f64) -> (f64, f64, Duration) {
    let name = unique("perf-sql/peer");
    contended(seconds, move |_, until| {
        let (server, name) = (server.clone(), name.clone());
        async move {
            let mut conn = MySqlConnection::connect(&server).await.expect("connect");
            tokio::time::sleep_until((until - Duration::from_secs_f64(seconds)).into()).await;
            let mut waits = Vec::new();
            while Instant::now() < until {
                let asked = Instant::now();
                let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 60)")
                    .bind(&name)
                    .fetch_one(&mut conn)
                    .await
                    .expect("GET_LOCK");
                assert_eq!(got, Some(1));
                waits.push(asked.elapsed());
                tokio::time::sleep(HOLD).await;
                sqlx::query("SELECT RELEASE_LOCK(?)")
                    .bind(&name)
                    .execute(&mut conn)
                    .await
                    .expect("RELEASE_LOCK");
            }
            waits
        }
    })
    .await
}

/// CPU time of this process so far.
fn cpu() -> Duration {
    let text = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = text
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// Resident memory of this process, bytes.
fn rss() -> u64 {
    let text = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

async fn scale(label: &str, locks: Locks, guards: usize, hold: f64) {
    let opts = LockOptions::new().ttl(Duration::from_secs(10));
    let base = unique("perf-sql/scale");
    // Warm up (key tables, sessions), then measure from here.
    locks
        .acquire(&format!("{base}-warm"))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let rss0 = rss();
    let taking = Instant::now();
    let locks = Arc::new(locks);
    let mut tasks = tokio::task::JoinSet::new();
    let per = guards.div_ceil(32);
    for t in 0..32 {
        let (locks, base, opts) = (locks.clone(), base.clone(), opts.clone());
        tasks.spawn(async move {
            let mut held = Vec::new();
            for i in t * per..((t + 1) * per).min(guards) {
                match locks.acquire_with(&format!("{base}-{i}"), &opts).await {
                    Ok(g) => held.push(g),
                    Err(e) => return (held, Some(e.to_string())),
                }
            }
            (held, None)
        });
    }
    let mut held = Vec::new();
    let mut failed = None;
    while let Some(done) = tasks.join_next().await {
        let (mine, err) = done.unwrap();
        held.extend(mine);
        failed = failed.or(err);
    }
    let took = taking.elapsed();
    let rss1 = rss();
    let cpu0 = cpu();
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(hold)).await;
    let busy = (cpu() - cpu0).as_secs_f64() / start.elapsed().as_secs_f64();
    let still = held.iter().filter(|g| g.is_held()).count();
    let n = held.len();
    let mut release_failed = 0;
    for g in held {
        if g.release().await.is_err() {
            release_failed += 1;
        }
    }
    println!(
        "{label:<18} scale: {n}/{guards} taken in {:.1} s{}, still held {still}, renewals {:.1} % of a core, \
         {:.2} KiB/guard, {release_failed} releases failed",
        took.as_secs_f64(),
        failed.map(|e| format!(" (stopped: {e})")).unwrap_or_default(),
        busy * 100.0,
        rss1.saturating_sub(rss0) as f64 / 1024.0 / n.max(1) as f64,
    );
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let pg = url("LOCKKIT_POSTGRES_URL");
    let my = url("LOCKKIT_MYSQL_URL");
    let dir = std::env::temp_dir().join(format!("perf-sql-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sqlite = format!("sqlite://{}", dir.join("locks.db").display());
    println!(
        "# perf_sql: {} iterations, {} s contended, {} guards for {} s",
        args.iterations, args.seconds, args.guards, args.hold
    );

    if args.runs("uncontended") {
        let pg_locks = Locks::new(PgLock::connect(&with(&pg, "strategy=advisory")).await?);
        uncontended("postgres/advisory", &pg_locks, &pg, args.iterations).await?;
        let my_locks = Locks::new(MySqlLock::connect(&with(&my, "strategy=advisory")).await?);
        uncontended("mysql/advisory", &my_locks, &my, args.iterations).await?;
    }
    if args.runs("contended") {
        row(
            "postgres sqlx peer",
            pg_peer_contended(pg.clone(), args.seconds).await,
        );
        for (label, url) in [
            ("postgres/advisory", with(&pg, "strategy=advisory")),
            ("postgres/table", with(&pg, "strategy=table")),
        ] {
            let mut clients = Vec::new();
            for _ in 0..8 {
                clients.push(Locks::new(PgLock::connect(&url).await?));
            }
            row(label, lockkit_contended(clients, args.seconds).await);
        }
        row(
            "mysql GET_LOCK peer",
            my_peer_contended(my.clone(), args.seconds).await,
        );
        for (label, url) in [
            ("mysql/advisory", with(&my, "strategy=advisory")),
            ("mysql/table", with(&my, "strategy=table")),
        ] {
            let mut clients = Vec::new();
            for _ in 0..8 {
                clients.push(Locks::new(MySqlLock::connect(&url).await?));
            }
            row(label, lockkit_contended(clients, args.seconds).await);
        }
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(Locks::new(SqliteLock::connect(&sqlite).await?));
        }
        row("sqlite", lockkit_contended(clients, args.seconds).await);
    }
    if args.runs("scale") {
        for (label, url) in [
            ("postgres/advisory", with(&pg, "strategy=advisory")),
            ("postgres/table", with(&pg, "strategy=table")),
            ("mysql/advisory", with(&my, "strategy=advisory")),
            ("mysql/table", with(&my, "strategy=table")),
        ] {
            let locks = match url.starts_with("postgres") {
                true => Locks::new(PgLock::connect(&url).await?),
                false => Locks::new(MySqlLock::connect(&url).await?),
            };
            scale(label, locks, args.guards, args.hold).await;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
