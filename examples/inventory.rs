//! The e-commerce stock case: 16 workers take 500 orders against 100 units of stock. Each
//! order reads the stock, checks it, and writes it back, under a distributed lock.
//!
//! ```text
//! cargo run --release --example inventory                 # SQLite, no server needed
//! cargo run --release --example inventory -- --no-lock    # shows the oversell the lock prevents
//! cargo run --release --example inventory -- --url sqlite:///tmp/shop.db
//! ```
//!
//! Prints sold, remaining and oversold (with the lock: 100, 0, 0) and the time taken.
//! Exits with status 1 if anything was oversold while locking.

use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use lockkit::{LockOptions, Locks};

#[derive(Parser)]
#[command(about = "Sell limited stock to concurrent orders under a distributed lock")]
struct Args {
    /// Lock service URL; defaults to a fresh SQLite file in the temp directory.
    #[arg(long)]
    url: Option<String>,
    /// Concurrent workers.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    workers: u64,
    /// Orders to take, spread over the workers.
    #[arg(long, default_value_t = 500)]
    orders: u64,
    /// Units of stock at the start.
    #[arg(long, default_value_t = 100)]
    stock: i64,
    /// Run without the lock, to see the race it prevents.
    #[arg(long)]
    no_lock: bool,
}

/// The stock record of one product, as a database row would hold it: reads and writes are
/// separate calls, so a read-check-write is only safe under a lock.
struct StockRow {
    units: AtomicI64,
    /// Highest fencing token that wrote the row: a stale writer would be rejected.
    last_token: AtomicU64,
}

impl StockRow {
    async fn read(&self) -> i64 {
        tokio::time::sleep(Duration::from_micros(200)).await;
        self.units.load(Ordering::SeqCst)
    }

    async fn write(&self, units: i64, token: Option<u64>) {
        tokio::time::sleep(Duration::from_micros(200)).await;
        if let Some(token) = token {
            let previous = self.last_token.fetch_max(token, Ordering::SeqCst);
            assert!(
                token > previous,
                "stale write with token {token} after {previous}"
            );
        }
        self.units.store(units, Ordering::SeqCst);
    }
}

#[tokio::main]
async fn main() -> lockkit::Result<ExitCode> {
    let args = Args::parse();
    let url = args.url.clone().unwrap_or_else(|| {
        let file =
            std::env::temp_dir().join(format!("lockkit-inventory-{}.db", std::process::id()));
        format!("sqlite://{}", file.display())
    });
    let locks: Locks = lockkit::connect(&url).await?;
    let row = Arc::new(StockRow {
        units: AtomicI64::new(args.stock),
        last_token: AtomicU64::new(0),
    });
    let sold = Arc::new(AtomicU64::new(0));
    let opts = LockOptions::new()
        .ttl(Duration::from_secs(10))
        .wait_timeout(Duration::from_secs(60));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..args.workers {
        let orders = args.orders / args.workers + u64::from(worker < args.orders % args.workers);
        let (locks, row, sold, opts) = (locks.clone(), row.clone(), sold.clone(), opts.clone());
        let locking = !args.no_lock;
        workers.spawn(async move {
            for _ in 0..orders {
                let guard = match locking {
                    true => Some(locks.acquire_with("inventory/sku-42", &opts).await?),
                    false => None,
                };
                let units = row.read().await;
                if units > 0 {
                    let token = guard.as_ref().map(|g| g.fencing_token().get());
                    row.write(units - 1, token).await;
                    sold.fetch_add(1, Ordering::SeqCst);
                }
                if let Some(guard) = guard {
                    guard.release().await?;
                }
            }
            Ok::<_, lockkit::Error>(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done.expect("worker panicked")?;
    }
    let elapsed = started.elapsed();
    let sold = sold.load(Ordering::SeqCst);
    let remaining = row.units.load(Ordering::SeqCst);
    let oversold = sold.saturating_sub(args.stock as u64);
    println!("backend:   {} ({url})", locks.backend_name());
    println!("lock:      {}", if args.no_lock { "off" } else { "on" });
    println!("orders:    {} from {} workers", args.orders, args.workers);
    println!("sold:      {sold}");
    println!("remaining: {remaining}");
    println!("oversold:  {oversold}");
    println!("time:      {:.2?}", elapsed);
    if args.url.is_none() {
        let file = url.trim_start_matches("sqlite://");
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{file}{suffix}"));
        }
    }
    Ok(if oversold > 0 && !args.no_lock {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
