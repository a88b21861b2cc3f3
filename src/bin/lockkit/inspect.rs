//! `lockkit status`, `lockkit ls` and `lockkit release --force`: the operator's view of the
//! locks on a server (see `lockkit::Locks::inspect`, `list` and `force_release`).

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use clap::Args;
use lockkit::{BoxError, LockInfo};

/// `lockkit status`.
#[derive(Args)]
pub(crate) struct StatusArgs {
    /// Lock service URL.
    #[arg(long, env = "LOCKKIT_URL")]
    url: String,
    /// Lock name.
    #[arg(long)]
    name: String,
    /// Print JSON (`{"name", "held", "token", "remaining_ms", "owner"}`).
    #[arg(long)]
    json: bool,
}

/// `lockkit ls`.
#[derive(Args)]
pub(crate) struct LsArgs {
    /// Lock service URL.
    #[arg(long, env = "LOCKKIT_URL")]
    url: String,
    /// Only the locks whose names start with this.
    #[arg(long, default_value = "")]
    prefix: String,
    /// Print one JSON array instead of lines.
    #[arg(long)]
    json: bool,
}

/// `lockkit release --force`.
#[derive(Args)]
pub(crate) struct ReleaseArgs {
    /// Lock service URL.
    #[arg(long, env = "LOCKKIT_URL")]
    url: String,
    /// Lock name.
    #[arg(long)]
    name: String,
    /// Required: this takes the lock away from whoever holds it.
    #[arg(long, required = true)]
    force: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
}

fn json(info: &LockInfo) -> serde_json::Value {
    serde_json::json!({
        "name": info.name,
        "held": true,
        "token": info.token.map(|t| t.get()),
        "remaining_ms": info.remaining.map(|r| r.as_millis() as u64),
        "owner": info.owner,
    })
}

/// `name  token  remaining  owner`, `-` for what the backend cannot tell.
fn line(info: &LockInfo) -> String {
    let dash = || "-".to_string();
    format!(
        "{}\t{}\t{}\t{}",
        info.name,
        info.token.map_or_else(dash, |t| t.get().to_string()),
        info.remaining
            .map_or_else(dash, |r| format!("{:.1}s", r.as_secs_f64())),
        info.owner.clone().unwrap_or_else(dash),
    )
}

pub(crate) async fn status(args: StatusArgs) -> Result<ExitCode, BoxError> {
    let locks = lockkit::connect(&args.url).await?;
    let found = locks.inspect(&args.name).await?;
    match (&found, args.json) {
        (Some(info), true) => println!("{}", json(info)),
        (None, true) => println!("{}", serde_json::json!({"name": args.name, "held": false})),
        (Some(info), false) => println!("held\t{}", line(info)),
        (None, false) => println!("free\t{}", args.name),
    }
    Ok(ExitCode::from(u8::from(found.is_some())))
}

pub(crate) async fn ls(args: LsArgs) -> Result<ExitCode, BoxError> {
    let locks = lockkit::connect(&args.url).await?;
    let held = locks.list(&args.prefix).await?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let all: Vec<_> = held.iter().map(json).collect();
        writeln!(out, "{}", serde_json::Value::Array(all))?;
    } else {
        for info in &held {
            writeln!(out, "{}", line(info))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn release(args: ReleaseArgs) -> Result<ExitCode, BoxError> {
    let locks = lockkit::connect(&args.url).await?;
    if !args.yes {
        let Some(info) = locks.inspect(&args.name).await? else {
            println!("free\t{}", args.name);
            return Ok(ExitCode::SUCCESS);
        };
        if !std::io::stdin().is_terminal() {
            return Err(format!(
                "`{}` is held ({}); not removed: confirm with --yes when not at a terminal",
                args.name,
                line(&info).replace('\t', " ")
            )
            .into());
        }
        eprint!(
            "Remove lock `{}` held by {} (token {})? Its holder may still be running. [y/N] ",
            args.name,
            info.owner.as_deref().unwrap_or("an unknown owner"),
            info.token
                .map_or_else(|| "?".into(), |t| t.get().to_string()),
        );
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err("not removed".into());
        }
    }
    match locks.force_release(&args.name).await? {
        true => println!("removed\t{}", args.name),
        false => println!("free\t{}", args.name),
    }
    Ok(ExitCode::SUCCESS)
}

/// `lockkit leader`.
#[derive(Args)]
pub(crate) struct LeaderArgs {
    /// Lock service URL.
    #[arg(long, env = "LOCKKIT_URL")]
    url: String,
    /// Election name.
    #[arg(long)]
    name: String,
    /// Keep printing every change of leader (or of its value) until stopped.
    #[arg(long)]
    watch: bool,
    /// Print JSON lines (`{"name", "leader", "token", "value"}`).
    #[arg(long)]
    json: bool,
}

fn print_leader(name: &str, leader: Option<&lockkit::Leader>, json: bool) {
    match (leader, json) {
        (Some(l), true) => println!(
            "{}",
            serde_json::json!({"name": name, "leader": true, "token": l.token.get(), "value": l.value})
        ),
        (None, true) => println!("{}", serde_json::json!({"name": name, "leader": false})),
        (Some(l), false) => println!("leader\t{name}\t{}\t{}", l.token.get(), l.value),
        (None, false) => println!("none\t{name}"),
    }
}

pub(crate) async fn leader(args: LeaderArgs) -> Result<ExitCode, BoxError> {
    use futures_util::StreamExt;
    let locks = lockkit::connect(&args.url).await?;
    if !args.watch {
        let leader = locks.leader(&args.name).await?;
        print_leader(&args.name, leader.as_ref(), args.json);
        return Ok(ExitCode::from(u8::from(leader.is_none())));
    }
    let mut changes = locks.observe(&args.name);
    while let Some(change) = changes.next().await {
        match change {
            Ok(leader) => print_leader(&args.name, leader.as_ref(), args.json),
            // A passing failure (a server restarting): say so and keep watching.
            Err(e) if e.is_retryable() => eprintln!("lockkit: {}", crate::one_line(&e.to_string())),
            Err(e) => return Err(e.into()),
        }
        std::io::stdout().flush()?;
    }
    Ok(ExitCode::SUCCESS)
}
