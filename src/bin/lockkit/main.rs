//! The `lockkit` command: run a command while holding a distributed lock, compare backends,
//! and inspect locks.
//!
//! ```text
//! lockkit run --url sqlite:///var/lib/app/locks.db --name nightly-report -- ./report.sh
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
//! `status` exits 0 when the lock is free and 1 when it is held; `status`, `ls`, `release`
//! and `bench` exit 2 on an error, and `bench` exits 3 when a run saw two holders at once.

mod bench;
mod chart;
mod inspect;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lockkit::{Error, LockOptions};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};

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
    /// Runs a command while holding a lock (a singleton cron job, a cache rebuild).
    Run {
        /// Lock service URL (`sqlite://path`, ...).
        #[arg(long, env = "LOCKKIT_URL")]
        url: String,
        /// Lock name.
        #[arg(long)]
        name: String,
        /// Lease TTL in seconds; renewed automatically while the command runs.
        #[arg(long, default_value_t = 30.0)]
        ttl: f64,
        /// Seconds to wait for a busy lock (0: one attempt); waits forever when omitted.
        #[arg(long)]
        wait: Option<f64>,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
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
        Command::Run {
            url,
            name,
            ttl,
            wait,
            command,
        } => {
            return match run(url, name, ttl, wait, command).await {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("lockkit: {e}");
                    ExitCode::FAILURE
                }
            }
        }
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

async fn run(
    url: String,
    name: String,
    ttl: f64,
    wait: Option<f64>,
    command: Vec<String>,
) -> Result<ExitCode, Error> {
    let mut opts = LockOptions::new().ttl(seconds(ttl, "ttl")?);
    if let Some(wait) = wait {
        opts = opts.wait_timeout(seconds(wait, "wait")?);
    }
    let locks = lockkit::connect(&url).await?;
    let guard = match locks.acquire_with(&name, &opts).await {
        Ok(guard) => guard,
        Err(e @ Error::Timeout { .. }) => {
            eprintln!("lockkit: {e}");
            return Ok(ExitCode::from(EXIT_BUSY));
        }
        Err(e) => return Err(e),
    };
    eprintln!(
        "lockkit: holding `{name}` (fencing token {})",
        guard.fencing_token()
    );
    // The command runs in its own process group, so everything it starts is stopped with it.
    let spawned = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .env("LOCKKIT_FENCING_TOKEN", guard.fencing_token().to_string())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            release(guard).await;
            return Err(Error::InvalidOptions(format!(
                "cannot run `{}`: {e}",
                command[0]
            )));
        }
    };
    let mut terminate = signal(SignalKind::terminate())
        .map_err(|e| Error::Unsupported(format!("cannot handle SIGTERM: {e}")))?;
    let mut interrupt = signal(SignalKind::interrupt())
        .map_err(|e| Error::Unsupported(format!("cannot handle SIGINT: {e}")))?;
    let outcome = tokio::select! {
        status = child.wait() => Ok(status),
        reason = guard.lost() => Err((format!("lost `{name}`: {reason}"), EXIT_LOST)),
        _ = terminate.recv() => Err(("terminated".to_string(), 143)),
        _ = interrupt.recv() => Err(("interrupted".to_string(), 130)),
    };
    match outcome {
        Ok(status) => {
            let status =
                status.map_err(|e| Error::Unsupported(format!("waiting for the command: {e}")))?;
            let lost = guard.release().await.err();
            match lost {
                Some(e @ Error::LockLost { .. }) => {
                    eprintln!("lockkit: {e}");
                    Ok(ExitCode::from(EXIT_LOST))
                }
                other => {
                    if let Some(e) = other {
                        eprintln!("lockkit: release failed (the lease ends by itself): {e}");
                    }
                    Ok(ExitCode::from(
                        status.code().map_or(1, |c| c.clamp(0, 255) as u8),
                    ))
                }
            }
        }
        Err((why, code)) => {
            eprintln!("lockkit: {why}; stopping the command");
            if let Some(pid) = child.id() {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            let _ = child.wait().await;
            release(guard).await;
            Ok(ExitCode::from(code))
        }
    }
}

/// Releases before the runtime ends (a guard merely dropped at exit would keep the lock until
/// its lease runs out).
async fn release(guard: lockkit::LockGuard) {
    if let Err(e) = guard.release().await {
        eprintln!("lockkit: {e}");
    }
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
