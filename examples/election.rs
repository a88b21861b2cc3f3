//! Leader election with fencing: three candidates campaign for `scheduler`; whoever leads
//! runs scheduling rounds, each fenced with its term's token in the same transaction as the
//! write, then resigns so the next candidate takes over. An observer prints every change of
//! leader as it happens.
//!
//! ```text
//! cargo run --example election                                   # SQLite, no server
//! cargo run --all-features --example election -- --url etcd://127.0.0.1:2379
//! ```
//!
//! Prints each term (candidate, token) as the observer saw it and the rounds each leader
//! ran; exits 1 if two leaders ever acted at once or a round was written out of term order.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;
use lockkit::sql::SqliteFence;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const ELECTION: &str = "scheduler";

#[derive(Parser)]
#[command(about = "Three candidates, one fenced leader at a time, and an observer")]
struct Args {
    /// Lock service URL; defaults to a fresh SQLite file in the temp directory.
    #[arg(long)]
    url: Option<String>,
    /// Terms each candidate serves before the example ends.
    #[arg(long, default_value_t = 2)]
    terms: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("election: {e}");
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
    // The resource the leader changes: a table of scheduling rounds, fenced per election.
    let store_url = format!("sqlite://{}?mode=rwc", dir.path().join("jobs.db").display());
    let store = sqlx::SqlitePool::connect(&store_url).await?;
    sqlx::query("CREATE TABLE rounds (token INTEGER NOT NULL, leader TEXT NOT NULL)")
        .execute(&store)
        .await?;
    let fence = SqliteFence::new();
    fence.create(&store).await?;

    let observer = lockkit::connect(&url).await?;
    let mut changes = observer.observe(ELECTION);
    let watching = tokio::spawn(async move {
        while let Some(change) = changes.next().await {
            match change {
                Ok(Some(leader)) => {
                    println!("observer: {} leads (token {})", leader.value, leader.token)
                }
                Ok(None) => println!("observer: nobody leads"),
                Err(e) => eprintln!("observer: {e}"),
            }
        }
    });

    let mut candidates = tokio::task::JoinSet::new();
    for candidate in ["node-a", "node-b", "node-c"] {
        let (url, store, fence) = (url.clone(), store.clone(), fence.clone());
        let terms = args.terms;
        candidates.spawn(async move {
            let locks = lockkit::connect(&url).await?;
            for _ in 0..terms {
                let leading = locks.campaign(ELECTION, candidate).await?;
                for _ in 0..3 {
                    // Every write of the leader carries its term's token, checked in the
                    // same transaction: a deposed leader's write is refused.
                    let mut tx = store.begin().await?;
                    fence
                        .check(&mut tx, ELECTION, leading.fencing_token())
                        .await?;
                    sqlx::query("INSERT INTO rounds VALUES (?, ?)")
                        .bind(leading.fencing_token().get() as i64)
                        .bind(candidate)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                leading.resign().await?;
            }
            Ok::<_, BoxError>(())
        });
    }
    while let Some(done) = candidates.join_next().await {
        done??;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    watching.abort();

    let rounds: Vec<(i64, String)> =
        sqlx::query_as("SELECT token, leader FROM rounds ORDER BY rowid")
            .fetch_all(&store)
            .await?;
    // One leader per term, and terms in token order.
    let ordered = rounds.windows(2).all(|w| w[0].0 < w[1].0 || (w[0] == w[1]));
    let terms: std::collections::BTreeSet<i64> = rounds.iter().map(|r| r.0).collect();
    println!(
        "{} rounds in {} terms; one leader at a time and terms in order: {ordered}",
        rounds.len(),
        terms.len()
    );
    Ok(ordered && terms.len() == 3 * args.terms)
}
