//! A counting semaphore: ten cache rebuilds, at most three at once, on any backend. Each
//! rebuild holds one of three permits (released when it ends, renewed while it runs, back
//! after its lease if its process crashes).
//!
//! ```text
//! cargo run --example semaphore                                  # SQLite, no server
//! cargo run --all-features --example semaphore -- --url redis://127.0.0.1:6379
//! ```
//!
//! Prints each rebuild with its permit and the most that ran at once; exits 1 if that was
//! ever more than the limit.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser)]
#[command(about = "Ten jobs through three permits")]
struct Args {
    /// Lock service URL; defaults to a fresh SQLite file in the temp directory.
    #[arg(long)]
    url: Option<String>,
    /// How many may run at once.
    #[arg(long, default_value_t = 3)]
    limit: usize,
    /// How many jobs.
    #[arg(long, default_value_t = 10)]
    jobs: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("semaphore: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<bool, BoxError> {
    let dir = tempfile::tempdir()?;
    let url = args
        .url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("locks.db").display()));
    let locks = lockkit::connect(&url).await?;
    let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut jobs = tokio::task::JoinSet::new();
    for job in 0..args.jobs {
        let (locks, running, most, limit) =
            (locks.clone(), running.clone(), most.clone(), args.limit);
        jobs.spawn(async move {
            let permit = locks.acquire_permit("cache/rebuild", limit).await?;
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            println!(
                "job {job}: rebuilding under permit {} (fence key {}, token {}), {now} running",
                permit.slot(),
                permit.fence_key(),
                permit.fencing_token()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            running.fetch_sub(1, Ordering::SeqCst);
            permit.release().await?;
            Ok::<_, BoxError>(())
        });
    }
    while let Some(done) = jobs.join_next().await {
        done??;
    }
    let most = most.load(Ordering::SeqCst);
    println!("at most {most} of {} ran at once", args.limit);
    Ok(most <= args.limit)
}
