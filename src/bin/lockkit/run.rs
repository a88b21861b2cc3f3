//! `lockkit run`: a command that runs only while this process holds a lock, leads an election
//! (`--elect`) or holds one of a semaphore's permits (`--permits`).

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use lockkit::{Error, LockGuard, LockOptions, Locks};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};

use crate::{seconds, EXIT_BUSY, EXIT_LOST};

/// `lockkit run`.
#[derive(Args)]
pub(crate) struct RunArgs {
    /// Lock service URL (`sqlite://path`, ...).
    #[arg(long, env = "LOCKKIT_URL")]
    url: String,
    /// Lock name (with `--permits`: the semaphore's name).
    #[arg(long, required_unless_present = "elect", conflicts_with = "elect")]
    name: Option<String>,
    /// Run only while leading election NAME (the command gets the term's token).
    #[arg(long, value_name = "NAME")]
    elect: Option<String>,
    /// The value this candidate announces as leader (default: host name and process id).
    #[arg(long, requires = "elect")]
    value: Option<String>,
    /// After the command exits or leadership is lost, campaign again and rerun it.
    #[arg(long, requires = "elect")]
    keep_campaigning: bool,
    /// Run under one of N permits of the semaphore `--name` (at most N such commands at once).
    #[arg(long, value_name = "N", conflicts_with = "elect")]
    permits: Option<usize>,
    /// Lease TTL in seconds; renewed automatically while the command runs.
    #[arg(long, default_value_t = 30.0)]
    ttl: f64,
    /// Seconds to wait for a busy lock (0: one attempt); waits forever when omitted.
    #[arg(long)]
    wait: Option<f64>,
    /// The command and its arguments.
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

/// What the command runs under.
enum Held {
    Lock(LockGuard),
    Leader(lockkit::Leadership),
    Permit(lockkit::Permit),
}

impl Held {
    fn guard(&self) -> &LockGuard {
        match self {
            Held::Lock(guard) => guard,
            Held::Leader(leading) => leading.guard(),
            Held::Permit(permit) => permit.guard(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Held::Lock(guard) => format!("holding `{}`", guard.name()),
            Held::Leader(leading) => {
                format!("leading `{}` as `{}`", leading.name(), leading.value())
            }
            Held::Permit(permit) => format!(
                "holding permit {} of {} of `{}`",
                permit.slot() + 1,
                permit.limit(),
                permit.name()
            ),
        }
    }

    /// Environment for the command: the token, and what it holds.
    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![(
            "LOCKKIT_FENCING_TOKEN",
            self.guard().fencing_token().to_string(),
        )];
        match self {
            Held::Lock(_) => {}
            Held::Leader(leading) => env.push(("LOCKKIT_LEADER_VALUE", leading.value())),
            Held::Permit(permit) => {
                env.push(("LOCKKIT_FENCE_KEY", permit.fence_key().to_owned()));
                env.push(("LOCKKIT_PERMIT_SLOT", permit.slot().to_string()));
            }
        }
        env
    }

    async fn release(self) -> lockkit::Result<()> {
        match self {
            Held::Lock(guard) => guard.release().await,
            Held::Leader(leading) => leading.resign().await,
            Held::Permit(permit) => permit.release().await,
        }
    }
}

/// How one run under the lock ended.
enum Ended {
    /// The command exited with this status while the lock was held.
    Exited(u8),
    /// The lock was lost (the command was stopped).
    Lost,
    /// A signal stopped `lockkit` (exit status 130 or 143).
    Signalled(u8),
}

pub(crate) async fn main(args: RunArgs) -> Result<ExitCode, Error> {
    let mut opts = LockOptions::new().ttl(seconds(args.ttl, "ttl")?);
    if let Some(wait) = args.wait {
        opts = opts.wait_timeout(seconds(wait, "wait")?);
    }
    let locks = lockkit::connect(&args.url).await?;
    let mut terminate = signal(SignalKind::terminate())
        .map_err(|e| Error::Unsupported(format!("cannot handle SIGTERM: {e}")))?;
    let mut interrupt = signal(SignalKind::interrupt())
        .map_err(|e| Error::Unsupported(format!("cannot handle SIGINT: {e}")))?;
    loop {
        let take = take(&locks, &args, &opts);
        let held = tokio::select! {
            held = take => held,
            _ = terminate.recv() => return Ok(ExitCode::from(143)),
            _ = interrupt.recv() => return Ok(ExitCode::from(130)),
        };
        let held = match held {
            Ok(held) => held,
            Err(e @ Error::Timeout { .. }) => {
                eprintln!("lockkit: {e}");
                return Ok(ExitCode::from(EXIT_BUSY));
            }
            Err(e) => return Err(e),
        };
        eprintln!(
            "lockkit: {} (fencing token {})",
            held.describe(),
            held.guard().fencing_token()
        );
        let ended = supervise(held, &args.command, &mut terminate, &mut interrupt).await?;
        match ended {
            Ended::Exited(_) | Ended::Lost if args.keep_campaigning => {
                eprintln!("lockkit: campaigning again");
                // A command that fails at once must not spin the election.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ended::Exited(code) => return Ok(ExitCode::from(code)),
            Ended::Lost => return Ok(ExitCode::from(EXIT_LOST)),
            Ended::Signalled(code) => return Ok(ExitCode::from(code)),
        }
    }
}

async fn take(locks: &Locks, args: &RunArgs, opts: &LockOptions) -> Result<Held, Error> {
    if let Some(election) = &args.elect {
        let value = args.value.clone().unwrap_or_else(default_value);
        return locks
            .campaign_with(election, value, opts)
            .await
            .map(Held::Leader);
    }
    let name = args.name.as_deref().unwrap_or_default();
    match args.permits {
        Some(limit) => locks
            .acquire_permit_with(name, limit, opts)
            .await
            .map(Held::Permit),
        None => locks.acquire_with(name, opts).await.map(Held::Lock),
    }
}

/// `host:pid`, the value a candidate announces unless told otherwise.
fn default_value() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}

/// Runs the command while `held` lasts, then gives it back.
async fn supervise(
    held: Held,
    command: &[String],
    terminate: &mut tokio::signal::unix::Signal,
    interrupt: &mut tokio::signal::unix::Signal,
) -> Result<Ended, Error> {
    // The command runs in its own process group, so everything it starts is stopped with it.
    let spawned = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .envs(held.env())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            release(held).await;
            return Err(Error::InvalidOptions(format!(
                "cannot run `{}`: {e}",
                command[0]
            )));
        }
    };
    let lost = held.guard().lost();
    let outcome = tokio::select! {
        status = child.wait() => Ok(status),
        reason = lost => Err((format!("lost it: {reason}"), Ended::Lost)),
        _ = terminate.recv() => Err(("terminated".to_string(), Ended::Signalled(143))),
        _ = interrupt.recv() => Err(("interrupted".to_string(), Ended::Signalled(130))),
    };
    match outcome {
        Ok(status) => {
            let status =
                status.map_err(|e| Error::Unsupported(format!("waiting for the command: {e}")))?;
            match held.release().await {
                Err(e @ Error::LockLost { .. }) => {
                    eprintln!("lockkit: {e}");
                    Ok(Ended::Lost)
                }
                other => {
                    if let Err(e) = other {
                        eprintln!("lockkit: release failed (the lease ends by itself): {e}");
                    }
                    Ok(Ended::Exited(
                        status.code().map_or(1, |c| c.clamp(0, 255) as u8),
                    ))
                }
            }
        }
        Err((why, ended)) => {
            eprintln!("lockkit: {why}; stopping the command");
            if let Some(pid) = child.id() {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            let _ = child.wait().await;
            release(held).await;
            Ok(ended)
        }
    }
}

/// Gives back before the runtime ends (a guard merely dropped at exit would keep the lock
/// until its lease runs out).
async fn release(held: Held) {
    if let Err(e) = held.release().await {
        eprintln!("lockkit: {e}");
    }
}
