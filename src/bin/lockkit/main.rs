//! The `lockkit` command: run a command while holding a distributed lock, compare backends,
//! and inspect locks.
//!
//! ```text
//! lockkit run --url sqlite:///var/lib/app/locks.db --name nightly-report -- ./report.sh
//! lockkit run --url etcd://127.0.0.1:2379 --elect scheduler --value "$HOSTNAME" --keep-campaigning -- ./scheduler
//! lockkit run --url redis://127.0.0.1 --permits 4 --name api-quota -- ./call-api.sh
//! lockkit leader --url etcd://127.0.0.1:2379 --name scheduler --watch
//! lockkit bench --url sqlite:///tmp/b.db --url redis://127.0.0.1 --json out.json --chart out.svg
//! lockkit status --url redis://127.0.0.1 --name nightly-report
//! lockkit ls --url redis://127.0.0.1 --prefix nightly
//! lockkit release --force --url redis://127.0.0.1 --name nightly-report --yes
//! ```
//!
//! `run`: the command runs only while the lock is held, in its own process group; if the lock
//! is lost (lease expired, server gone), the whole group is killed and `lockkit` exits with
//! status 75. SIGTERM and SIGINT stop the command the same way and release the lock (exit
//! 143, 130). If the lock is busy past `--wait`, `lockkit` exits with status 73 without
//! running the command. Otherwise it exits with the command's status.
//!
//! With `--elect`, the command runs only while this process leads the election (it gets the
//! term's token in `LOCKKIT_FENCING_TOKEN` and its value in `LOCKKIT_LEADER_VALUE`);
//! `--keep-campaigning` campaigns again whenever the command exits or leadership is lost.
//! With `--permits N`, at most N such commands run at once per `--name` (the permit's
//! fencing token and fence key are in `LOCKKIT_FENCING_TOKEN` and `LOCKKIT_FENCE_KEY`).
//!
//! `leader` exits 0 when the election has a leader and 1 when not (with `--watch` it runs
//! until stopped). `status` exits 0 when the lock is free and 1 when it is held; `status`, `ls`, `release`
//! and `bench` exit 2 on an error, and `bench` exits 3 when a run saw two holders at once.

mod bench;
mod chart;
mod inspect;
mod run;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lockkit::Error;

#[derive(Parser)]
#[command(
    name = "lockkit",
    version,
    about = "Distributed locks from the command line"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a command while holding a lock (a singleton cron job, a cache rebuild), while
    /// leading an election (`--elect`), or under one of N permits (`--permits`).
    Run(run::RunArgs),
    /// The current leader of an election (exit 0 if there is one, 1 if not); `--watch`
    /// prints every change.
    Leader(inspect::LeaderArgs),
    /// Compares backends on your servers: the same workloads on each URL, one table.
    Bench(bench::Args),
    /// Whether a lock is held, and by whom: exit 0 if free, 1 if held.
    Status(inspect::StatusArgs),
    /// The locks held now, one per line (name, token, remaining lease, owner).
    Ls(inspect::LsArgs),
    /// Removes a stuck lock whoever holds it (the next holder gets a higher token).
    Release(inspect::ReleaseArgs),
    /// Holds a lock until killed (the failover run of `lockkit bench` kills it).
    #[command(name = "__bench-hold", hide = true)]
    BenchHold(bench::HoldArgs),
}

const EXIT_BUSY: u8 = 73;
const EXIT_LOST: u8 = 75;

fn seconds(value: f64, what: &str) -> Result<Duration, Error> {
    if value.is_nan() || value < 0.0 {
        return Err(Error::InvalidOptions(format!(
            "--{what} must be a non-negative number of seconds, not {value}"
        )));
    }
    Duration::try_from_secs_f64(value)
        .map_err(|_| Error::InvalidOptions(format!("--{what} {value} is too large (in seconds)")))
}

/// Exit status of `status`, `ls`, `release` and `bench` on an error.
const EXIT_ERROR: u8 = 2;

async fn dispatch(cli: Cli) -> ExitCode {
    let outcome = match cli.command {
        Command::Run(args) => {
            return match run::main(args).await {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("lockkit: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Leader(args) => inspect::leader(args).await,
        Command::Bench(args) => bench::main(args).await,
        Command::Status(args) => inspect::status(args).await,
        Command::Ls(args) => inspect::ls(args).await,
        Command::Release(args) => inspect::release(args).await,
        Command::BenchHold(args) => bench::hold(args).await,
    };
    outcome.unwrap_or_else(|e| {
        eprintln!("lockkit: {}", one_line(&e.to_string()));
        ExitCode::from(EXIT_ERROR)
    })
}

/// A message on one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[tokio::main]
async fn main() -> ExitCode {
    use clap::error::ErrorKind;
    match Cli::try_parse() {
        Ok(cli) => dispatch(cli).await,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        // Usage errors on one line, as every other error.
        Err(e) => {
            let message = e.to_string();
            let first = message.lines().next().unwrap_or("error: bad arguments");
            eprintln!("{first} (see `lockkit --help`)");
            ExitCode::from(2)
        }
    }
}
