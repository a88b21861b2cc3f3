//! The e-commerce stock case: 16 workers take 500 orders against 100 units of stock. Each
//! order reads the stock, checks it, and writes it back, under a distributed lock; the
//! stock lives in a SQL database, and every read and write presents the lock's fencing
//! token to a fence table in the same transaction (`lockkit::sql::SqliteFence`, `PgFence`,
//! `MySqlFence`), so a holder that lost its lock cannot write.
//!
//! ```text
//! cargo run --release --example inventory                 # SQLite, no server needed
//! cargo run --release --example inventory -- --no-lock    # shows the oversell the lock prevents
//! cargo run --release --example inventory -- --url sqlite:///tmp/shop.db
//! cargo run --release --example inventory -- --processes 4   # workers in 4 OS processes
//! cargo run --release --example inventory -- --freeze        # a holder frozen past its TTL
//! cargo run --release --example inventory -- --freeze --no-fence   # ... and unfenced: oversold
//! cargo run --release --all-features --example inventory -- \
//!     --url redis://127.0.0.1:6379 --store postgres://user:pass@127.0.0.1/shop --freeze
//! ```
//!
//! Flags:
//! - `--url URL`: the lock service; by default a fresh SQLite file in the temp directory.
//! - `--store URL`: the database that keeps the stock and its fence table (`sqlite://…`,
//!   `postgres://…` with feature `postgres`, `mysql://…` with feature `mysql`); by default
//!   the lock service's SQLite file, or a fresh one.
//! - `--workers N`, `--orders N`, `--stock N`: the load (16, 500, 100).
//! - `--ttl-ms MS`: the lock's lease (10 000 ms; 2 000 ms with `--freeze`).
//! - `--processes N`: run the workers in N separate OS processes (the example runs itself
//!   again as each of them) and add up their results.
//! - `--freeze`: one worker, alone in its own process, is frozen mid-order: it takes the
//!   lock and reads the stock, then the example stops its process (`SIGSTOP`) past its TTL,
//!   lets the others take the lock and sell, and resumes it (`SIGCONT`). Its write then
//!   carries a stale token and the fence rejects it: the example prints `stale write
//!   rejected` with both tokens, and still oversold 0. Implies `--processes 2` at least.
//! - `--no-fence`: skip the token checks (the lock alone); with `--freeze`, the woken
//!   worker's write goes through and oversells.
//! - `--no-lock`: no lock at all (hence no tokens), to see the race it prevents.
//!
//! Prints sold, remaining and oversold (with the lock: 100, 0, 0) and the time taken.
//! Exits with status 1 if anything was oversold while locking and fencing.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use clap::Parser;
use lockkit::sql::fence::FenceError;
use lockkit::sql::SqliteFence;
use lockkit::{FencingToken, LockOptions, Locks};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The lock's name, and the fenced resource in the store.
const LOCK: &str = "inventory/sku-42";
/// The stock row's key.
const SKU: &str = "sku-42";

#[derive(Parser, Clone)]
#[command(about = "Sell limited stock to concurrent orders under a distributed lock")]
struct Args {
    /// Lock service URL; defaults to a fresh SQLite file in the temp directory.
    #[arg(long)]
    url: Option<String>,
    /// Stock database URL (sqlite, postgres, mysql); defaults to the lock service's SQLite
    /// file, or a fresh one.
    #[arg(long)]
    store: Option<String>,
    /// Concurrent workers.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    workers: u64,
    /// Orders to take, spread over the workers.
    #[arg(long, default_value_t = 500)]
    orders: u64,
    /// Units of stock at the start.
    #[arg(long, default_value_t = 100)]
    stock: i64,
    /// The lock's lease in milliseconds (default 10000; 2000 with --freeze).
    #[arg(long)]
    ttl_ms: Option<u64>,
    /// Run the workers in this many separate OS processes.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    processes: Option<u64>,
    /// Freeze one worker (SIGSTOP) mid-order past its TTL, then resume it: its stale write
    /// is rejected by the fence.
    #[arg(long)]
    freeze: bool,
    /// Do not check fencing tokens (the lock alone).
    #[arg(long)]
    no_fence: bool,
    /// Run without the lock, to see the race it prevents.
    #[arg(long)]
    no_lock: bool,
    /// Internal: run as one worker process of a parent, reporting on stdout.
    #[arg(long, hide = true)]
    worker_process: bool,
    /// Internal: this worker process is the one to be frozen.
    #[arg(long, hide = true)]
    frozen: bool,
    /// Internal: the orders of each of this process's workers, comma-separated.
    #[arg(long, hide = true, value_delimiter = ',')]
    shares: Vec<u64>,
}

impl Args {
    fn ttl(&self) -> Duration {
        let default = if self.freeze { 2_000 } else { 10_000 };
        Duration::from_millis(self.ttl_ms.unwrap_or(default))
    }
}

/// The stock database and its fence table.
enum Store {
    Sqlite(sqlx::SqlitePool, SqliteFence),
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool, lockkit::sql::PgFence),
    #[cfg(feature = "mysql")]
    MySql(sqlx::MySqlPool, lockkit::sql::MySqlFence),
}

/// Runs `$body` with the store's pool and fence, whatever the database.
macro_rules! on_store {
    ($store:expr, |$pool:ident, $fence:ident| $body:expr) => {
        match $store {
            Store::Sqlite($pool, $fence) => $body,
            #[cfg(feature = "postgres")]
            Store::Postgres($pool, $fence) => $body,
            #[cfg(feature = "mysql")]
            Store::MySql($pool, $fence) => $body,
        }
    };
}

/// How a fenced step ended, other than done.
#[derive(Debug)]
enum Refused {
    /// The fence rejected the token.
    Stale { presented: u64, highest: u64 },
    /// Anything else.
    Failed(BoxError),
}

impl<E: Into<BoxError>> From<E> for Refused {
    fn from(e: E) -> Self {
        let e: BoxError = e.into();
        match e.downcast::<FenceError>() {
            Ok(fence) => match *fence {
                FenceError::Stale {
                    presented, highest, ..
                } => Refused::Stale { presented, highest },
                other => Refused::Failed(other.into()),
            },
            Err(e) => Refused::Failed(e),
        }
    }
}

impl Store {
    async fn open(url: &str) -> Result<Store, BoxError> {
        let scheme = url.split(':').next().unwrap_or_default();
        let store = match scheme {
            "sqlite" => {
                use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
                let options = url
                    .parse::<SqliteConnectOptions>()?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    // In WAL mode a crash of the process loses nothing; a power cut may lose
                    // the last sales, but never the fence row without its stock row.
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(60));
                Store::Sqlite(
                    sqlx::SqlitePool::connect_with(options).await?,
                    SqliteFence::new(),
                )
            }
            #[cfg(feature = "postgres")]
            "postgres" | "postgresql" => Store::Postgres(
                sqlx::PgPool::connect(url).await?,
                lockkit::sql::PgFence::new(),
            ),
            #[cfg(feature = "mysql")]
            "mysql" | "mariadb" => Store::MySql(
                sqlx::MySqlPool::connect(&url.replacen("mariadb:", "mysql:", 1)).await?,
                lockkit::sql::MySqlFence::new(),
            ),
            other => {
                return Err(format!(
                    "--store `{other}:` URLs are not supported by this build: use sqlite, or \
                     postgres/mysql with --features postgres/mysql"
                )
                .into())
            }
        };
        Ok(store)
    }

    /// Creates the stock table and the fence table, and starts a sale: `units` in stock, and
    /// the resource's fence forgotten (tokens of another lock service may be higher).
    async fn reset(&self, units: i64) -> Result<(), BoxError> {
        on_store!(self, |pool, fence| {
            fence.create(pool).await?;
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS inventory_stock \
                 (sku VARCHAR(64) PRIMARY KEY, units BIGINT NOT NULL)",
            )
            .execute(pool)
            .await?;
            sqlx::query(&format!("DELETE FROM inventory_stock WHERE sku = '{SKU}'"))
                .execute(pool)
                .await?;
            sqlx::query(&format!(
                "INSERT INTO inventory_stock (sku, units) VALUES ('{SKU}', {units})"
            ))
            .execute(pool)
            .await?;
            sqlx::query(&format!(
                "DELETE FROM {} WHERE resource = '{LOCK}'",
                fence.table()
            ))
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// Reads the stock: in one transaction with the token's check when fenced.
    async fn read(&self, token: Option<FencingToken>) -> Result<i64, Refused> {
        let select = format!("SELECT units FROM inventory_stock WHERE sku = '{SKU}'");
        on_store!(self, |pool, fence| {
            let mut tx = pool.begin().await?;
            if let Some(token) = token {
                fence.check(&mut tx, LOCK, token).await?;
            }
            let units: i64 = sqlx::query_scalar(&select).fetch_one(&mut *tx).await?;
            tx.commit().await?;
            Ok(units)
        })
    }

    /// Writes the stock: in one transaction with the token's check when fenced.
    async fn write(&self, units: i64, token: Option<FencingToken>) -> Result<(), Refused> {
        let update = format!("UPDATE inventory_stock SET units = {units} WHERE sku = '{SKU}'");
        on_store!(self, |pool, fence| {
            let mut tx = pool.begin().await?;
            if let Some(token) = token {
                fence.check(&mut tx, LOCK, token).await?;
            }
            sqlx::query(&update).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(())
        })
    }
}

/// What the workers of one process did.
#[derive(Default)]
struct Totals {
    sold: AtomicU64,
    stale: AtomicU64,
}

/// One order: read the stock, and if there is some, write it back one lower. `pause` runs
/// between the read and the write (the frozen worker's moment).
async fn order(
    store: &Store,
    token: Option<FencingToken>,
    pause: impl AsyncFnOnce(),
) -> Result<bool, Refused> {
    let units = store.read(token).await?;
    pause().await;
    if units <= 0 {
        return Ok(false);
    }
    store.write(units - 1, token).await?;
    Ok(true)
}

/// Runs this process's workers, each taking `shares[i]` orders. In a worker process, prints
/// its first sale (`SOLD`), every stale write (`STALE presented highest`) and, for the
/// frozen worker, `HOLDING token` once it holds the lock mid-order, then waits for a line
/// on stdin before writing.
async fn run_workers(
    args: &Args,
    locks: &Locks,
    store: Arc<Store>,
    shares: &[u64],
) -> Result<Arc<Totals>, BoxError> {
    let totals = Arc::new(Totals::default());
    let opts = LockOptions::new()
        .ttl(args.ttl())
        .wait_timeout(Duration::from_secs(120));
    let mut workers = tokio::task::JoinSet::new();
    for &orders in shares {
        let (locks, store, totals, opts) =
            (locks.clone(), store.clone(), totals.clone(), opts.clone());
        let (locking, fencing, child, mut freeze) = (
            !args.no_lock,
            !args.no_fence,
            args.worker_process,
            args.frozen,
        );
        workers.spawn(async move {
            let mut reported = false;
            for _ in 0..orders {
                let guard = match locking {
                    true => Some(locks.acquire_with(LOCK, &opts).await?),
                    false => None,
                };
                let token = guard.as_ref().map(|g| g.fencing_token());
                let pause = async || {
                    if std::mem::take(&mut freeze) {
                        println!("HOLDING {}", token.map_or(0, FencingToken::get));
                        std::io::stdout().flush().ok();
                        let mut go = String::new();
                        tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut go))
                            .await
                            .ok();
                    }
                };
                match order(&store, token.filter(|_| fencing), pause).await {
                    Ok(true) => {
                        totals.sold.fetch_add(1, Ordering::SeqCst);
                        if child && !reported {
                            reported = true;
                            println!("SOLD {}", token.map_or(0, FencingToken::get));
                        }
                    }
                    Ok(false) => {}
                    Err(Refused::Stale { presented, highest }) => {
                        totals.stale.fetch_add(1, Ordering::SeqCst);
                        match child {
                            true => println!("STALE {presented} {highest}"),
                            false => println!(
                                "stale write rejected: token {presented}, the store had seen \
                                 token {highest}"
                            ),
                        }
                    }
                    Err(Refused::Failed(e)) => return Err(e),
                }
                if let Some(guard) = guard {
                    match guard.release().await {
                        // The frozen worker's lock ran out while it was stopped.
                        Err(e) if e.is_lost() => {}
                        other => other?,
                    }
                }
            }
            Ok::<_, BoxError>(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    Ok(totals)
}

/// `n` spread over `parts` as evenly as it goes.
fn spread(n: u64, parts: u64) -> Vec<u64> {
    (0..parts)
        .map(|i| n / parts + u64::from(i < n % parts))
        .collect()
}

/// A child worker process and what it reported.
struct Worker {
    child: Child,
    sold: u64,
    stale: u64,
}

/// A line from a child, or the end of its output.
enum Event {
    Line(usize, String),
    Done(usize),
}

/// Starts a worker process running `shares`, its output read into `events`.
fn spawn_worker(
    args: &Args,
    url: &str,
    store: &str,
    shares: &[u64],
    frozen: bool,
    index: usize,
    events: &mpsc::Sender<Event>,
) -> Result<Worker, BoxError> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args(["--worker-process", "--url", url, "--store", store])
        .arg(format!("--ttl-ms={}", args.ttl().as_millis()))
        .arg(format!(
            "--shares={}",
            shares
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    for (on, flag) in [
        (frozen, "--frozen"),
        (args.no_lock, "--no-lock"),
        (args.no_fence, "--no-fence"),
    ] {
        if on {
            command.arg(flag);
        }
    }
    let mut child = command.spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let events = events.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = events.send(Event::Line(index, line));
        }
        let _ = events.send(Event::Done(index));
    });
    Ok(Worker {
        child,
        sold: 0,
        stale: 0,
    })
}

/// Sends `signal` to a worker process.
#[cfg(unix)]
fn signal(worker: &Worker, signal: nix::sys::signal::Signal) -> Result<(), BoxError> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(worker.child.id())?);
    nix::sys::signal::kill(pid, signal)?;
    Ok(())
}

/// Runs the workers in `processes` child processes and adds up what they sold. With
/// `--freeze`, worker 0 runs alone in the first process, which is stopped once it holds
/// the lock mid-order, until its TTL has passed and another process has sold; the other
/// processes start once it is stopped.
fn run_processes(
    args: &Args,
    url: &str,
    store: &str,
    processes: u64,
) -> Result<(u64, u64), BoxError> {
    let per_worker = spread(args.orders, args.workers);
    let processes = processes.min(args.workers).max(1 + u64::from(args.freeze));
    // Worker i goes to process i % processes; with --freeze, worker 0 alone to process 0.
    let mut plans: Vec<Vec<u64>> = vec![Vec::new(); processes as usize];
    for (i, orders) in per_worker.iter().enumerate() {
        let p = match args.freeze {
            true if i == 0 => 0,
            true => 1 + (i - 1) % (processes as usize - 1),
            false => i % processes as usize,
        };
        plans[p].push(*orders);
    }
    let (events, incoming) = mpsc::channel();
    let mut workers = Vec::new();
    let start = |workers: &mut Vec<Worker>, range: std::ops::Range<usize>| {
        for p in range {
            let frozen = args.freeze && p == 0;
            workers.push(spawn_worker(
                args, url, store, &plans[p], frozen, p, &events,
            )?);
        }
        Ok::<_, BoxError>(())
    };
    match args.freeze {
        true => start(&mut workers, 0..1)?,
        false => start(&mut workers, 0..plans.len())?,
    }
    let ttl = args.ttl();
    // While frozen: since when, the token held, and whether another process sold since.
    let mut frozen: Option<(Instant, u64, bool)> = None;
    let mut open = workers.len();
    while open > 0 {
        if let Some((since, token, others_sold)) = frozen {
            let waited = since.elapsed();
            if waited > ttl + Duration::from_millis(500) && others_sold
                || waited > ttl + Duration::from_secs(60)
            {
                println!(
                    "resumed it after {waited:.1?} (SIGCONT), still holding token {token} as \
                     far as it knows"
                );
                #[cfg(unix)]
                signal(&workers[0], nix::sys::signal::Signal::SIGCONT)?;
                if let Some(stdin) = workers[0].child.stdin.as_mut() {
                    writeln!(stdin, "go")?;
                }
                frozen = None;
            }
        }
        let event = match incoming.recv_timeout(Duration::from_millis(50)) {
            Ok(event) => event,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let (index, line) = match event {
            Event::Line(index, line) => (index, line),
            Event::Done(index) => {
                open -= 1;
                // The frozen worker ended without ever holding: start the others anyway.
                if args.freeze && index == 0 && workers.len() == 1 {
                    start(&mut workers, 1..plans.len())?;
                    open += plans.len() - 1;
                }
                continue;
            }
        };
        let mut words = line.split_whitespace();
        let pid = workers[index].child.id();
        let numbers: Vec<u64> = words
            .clone()
            .skip(1)
            .filter_map(|w| w.parse().ok())
            .collect();
        match (words.next(), numbers.as_slice()) {
            (Some("HOLDING"), [token]) => {
                #[cfg(unix)]
                signal(&workers[index], nix::sys::signal::Signal::SIGSTOP)?;
                #[cfg(not(unix))]
                return Err("--freeze needs a Unix system (SIGSTOP)".into());
                println!(
                    "froze worker process {pid} (SIGSTOP) mid-order: it holds the lock with \
                     token {token} and has read the stock; its lease is {ttl:?}"
                );
                frozen = Some((Instant::now(), *token, false));
                start(&mut workers, 1..plans.len())?;
                open += plans.len() - 1;
            }
            (Some("SOLD"), _) => {
                if let Some((_, _, others_sold)) = frozen.as_mut() {
                    *others_sold |= index != 0;
                }
            }
            (Some("STALE"), [presented, highest]) => println!(
                "stale write rejected: worker process {pid} wrote with token {presented}, \
                 the store had already seen token {highest}"
            ),
            (Some("RESULT"), [sold, stale]) => {
                workers[index].sold = *sold;
                workers[index].stale = *stale;
            }
            _ => eprintln!("[worker process {pid}] {line}"),
        }
    }
    let mut totals = (0, 0);
    for worker in &mut workers {
        let status = worker.child.wait()?;
        if !status.success() {
            return Err(format!("worker process {} failed: {status}", worker.child.id()).into());
        }
        totals = (totals.0 + worker.sold, totals.1 + worker.stale);
    }
    Ok(totals)
}

/// The default lock service: a fresh SQLite file in the temp directory.
fn temp_sqlite(what: &str) -> String {
    let file = std::env::temp_dir().join(format!(
        "lockkit-inventory-{what}-{}.db",
        std::process::id()
    ));
    format!("sqlite://{}", file.display())
}

#[tokio::main]
async fn main() -> Result<ExitCode, BoxError> {
    let args = Args::parse();
    if args.freeze && args.no_lock {
        return Err("--freeze freezes a lock holder: it needs the lock (drop --no-lock)".into());
    }
    // The files this run creates, removed at its end.
    let mut temporary = Vec::new();
    let url = args.url.clone().unwrap_or_else(|| {
        temporary.push(temp_sqlite("locks"));
        temporary[0].clone()
    });
    let store_url = match (&args.store, url.starts_with("sqlite:")) {
        (Some(store), _) => store.clone(),
        (None, true) => url.clone(),
        (None, false) => {
            temporary.push(temp_sqlite("stock"));
            temporary[temporary.len() - 1].clone()
        }
    };
    let store = Arc::new(Store::open(&store_url).await?);
    if args.worker_process {
        let locks = lockkit::connect(&url).await?;
        let totals = run_workers(&args, &locks, store, &args.shares).await?;
        let (sold, stale) = (
            totals.sold.load(Ordering::SeqCst),
            totals.stale.load(Ordering::SeqCst),
        );
        println!("RESULT {sold} {stale}");
        return Ok(ExitCode::SUCCESS);
    }
    // Connect before the reset: the lock service creates its tables in a shared SQLite file.
    let locks: Locks = lockkit::connect(&url).await?;
    store.reset(args.stock).await?;
    let started = Instant::now();
    let processes = match (args.processes, args.freeze) {
        (Some(n), _) => Some(n),
        (None, true) => Some(2),
        (None, false) => None,
    };
    let (sold, stale) = match processes {
        Some(n) => run_processes(&args, &url, &store_url, n)?,
        None => {
            let shares = spread(args.orders, args.workers);
            let totals = run_workers(&args, &locks, store.clone(), &shares).await?;
            (
                totals.sold.load(Ordering::SeqCst),
                totals.stale.load(Ordering::SeqCst),
            )
        }
    };
    let elapsed = started.elapsed();
    let remaining = store.read(None).await.map_err(|e| format!("{e:?}"))?;
    let oversold = sold.saturating_sub(args.stock.max(0) as u64);
    println!(
        "backend:   {} ({})",
        locks.backend_name(),
        lockkit::url::redact(&url)
    );
    println!("store:     {}", lockkit::url::redact(&store_url));
    println!(
        "lock:      {}, fencing {}",
        if args.no_lock { "off" } else { "on" },
        if args.no_lock || args.no_fence {
            "off"
        } else {
            "on"
        }
    );
    match processes {
        Some(n) => println!(
            "orders:    {} from {} workers in {n} processes",
            args.orders, args.workers
        ),
        None => println!("orders:    {} from {} workers", args.orders, args.workers),
    }
    println!("sold:      {sold}");
    println!("remaining: {remaining}");
    println!("oversold:  {oversold}");
    println!("stale writes rejected: {stale}");
    println!("time:      {:.2?}", elapsed);
    drop(store);
    for file in &temporary {
        let file = file.trim_start_matches("sqlite://");
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{file}{suffix}"));
        }
    }
    Ok(if oversold > 0 && !args.no_lock && !args.no_fence {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
