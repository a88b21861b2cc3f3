//! The fault matrix of lockkit (see the README's "Fault matrix"): `worker` processes that use
//! only the public API, a TCP fault `proxy`, and `matrix`, the driver that runs seeded fault
//! schedules against every backend and checks the logs.

use lockkit_faults::{driver, matrix, proxy, worker};

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::io::AsyncBufReadExt;

/// The lockkit fault matrix.
#[derive(Parser)]
#[command(name = "lockkit-faults")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One worker process: acquire, read the register, pause, write, release; in a loop.
    Worker(worker::WorkerArgs),
    /// A TCP fault proxy. Commands on stdin, one a line: `latency MS`, `blackhole`,
    /// `reset`, `pass` (or `heal`).
    Proxy {
        /// LISTEN=TARGET, e.g. 127.0.0.1:7000=127.0.0.1:6379 (repeatable).
        #[arg(long = "map", required = true)]
        maps: Vec<String>,
    },
    /// Run the matrix (or part of it) and print the table; exit 1 on any violation.
    Matrix(MatrixArgs),
}

#[derive(clap::Args)]
struct MatrixArgs {
    /// One short schedule per backend × fault, and the negative control on SQLite and Redis.
    #[arg(long)]
    short: bool,
    /// Only these backends (comma-separated row names, e.g. redis,postgres-table).
    #[arg(long, value_delimiter = ',')]
    backends: Vec<String>,
    /// Only these fault classes (kill-holder, stop-holder, stop-waiter, kill-server,
    /// stop-server, proxy, wipe-instance, storm, leader-kill).
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// First seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Runs per cell (default: 1 short, 3 full).
    #[arg(long)]
    runs: Option<u32>,
    /// Parallel lanes (backends sharing a server never run at once).
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    /// Worker processes per run.
    #[arg(long, default_value_t = 3)]
    workers: u32,
    /// The env file of the fault servers (URLs).
    #[arg(long)]
    env: PathBuf,
    /// The env file of the three-member clusters (`target/clusters.env` of
    /// `scripts/clusters`): cluster URLs for the leader-kill class.
    #[arg(long)]
    cluster_env: Option<PathBuf>,
    /// `scripts/services`, to restart killed servers.
    #[arg(long)]
    services: PathBuf,
    /// The servers' LOCKKIT_SERVICES_TARGET.
    #[arg(long)]
    services_target: PathBuf,
    /// The servers' LOCKKIT_SERVICES_PORT_OFFSET.
    #[arg(long, default_value_t = 0)]
    port_offset: u32,
    /// Where run directories (logs, registers) go.
    #[arg(long)]
    out: PathBuf,
    /// Negative control backends (default: sqlite,redis; `none` for none).
    #[arg(long, value_delimiter = ',')]
    negative: Vec<String>,
}

fn read_env(path: &PathBuf) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

async fn matrix(a: MatrixArgs) -> ExitCode {
    let mut env = read_env(&a.env);
    if let Some(clusters) = &a.cluster_env {
        env.extend(read_env(clusters));
    }
    let all = driver::backends(&env);
    for b in &a.backends {
        if !all.iter().any(|x| x.key == b) {
            eprintln!(
                "faults: unknown or unconfigured backend {b:?} (env {})",
                a.env.display()
            );
            return ExitCode::from(2);
        }
    }
    let backends: Vec<_> = all
        .into_iter()
        .filter(|b| a.backends.is_empty() || a.backends.iter().any(|x| x == b.key))
        .collect();
    let mut faults = Vec::new();
    for f in &a.faults {
        match driver::Fault::parse(f) {
            Some(f) => faults.push(f),
            None => {
                eprintln!("faults: unknown fault class {f:?}");
                return ExitCode::from(2);
            }
        }
    }
    if faults.is_empty() {
        faults = driver::Fault::ALL.to_vec();
    }
    let negative: Vec<&'static str> = if a.negative.iter().any(|n| n == "none") {
        Vec::new()
    } else {
        let want: Vec<String> = if a.negative.is_empty() {
            vec!["sqlite".into(), "redis".into()]
        } else {
            a.negative.clone()
        };
        backends
            .iter()
            .map(|b| b.key)
            .filter(|k| want.iter().any(|w| w == k))
            .collect()
    };
    let plan = matrix::Plan {
        backends,
        faults,
        runs: a.runs.unwrap_or(if a.short { 1 } else { 3 }),
        rounds: if a.short { 1 } else { 2 },
        workers: a.workers,
        seed: a.seed,
        jobs: a.jobs,
        negative,
        out: a.out,
        exe: std::env::current_exe().expect("own path"),
    };
    let services = driver::Services {
        script: a.services,
        target: a.services_target,
        port_offset: a.port_offset,
    };
    if matrix::run(plan, services).await {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn proxy(maps: Vec<String>) -> ExitCode {
    let p = proxy::Proxy::new();
    for m in &maps {
        let Some((listen, target)) = m.split_once('=') else {
            eprintln!("proxy: --map wants LISTEN=TARGET, got {m:?}");
            return ExitCode::from(2);
        };
        let (Ok(listen), Ok(target)) = (listen.parse(), target.parse()) else {
            eprintln!("proxy: bad address in {m:?}");
            return ExitCode::from(2);
        };
        if let Err(e) = p.listen_on(listen, target).await {
            eprintln!("proxy: {listen}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match line.parse() {
            Ok(mode) => {
                p.set(mode);
                eprintln!("proxy: {mode:?}");
            }
            Err(e) => eprintln!("proxy: {e}"),
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        match cli.command {
            Cmd::Worker(args) => match worker::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("worker: {e}");
                    ExitCode::FAILURE
                }
            },
            Cmd::Proxy { maps } => proxy(maps).await,
            Cmd::Matrix(a) => matrix(a).await,
        }
    })
}
