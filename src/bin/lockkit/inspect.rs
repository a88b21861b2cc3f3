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
