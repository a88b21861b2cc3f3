//! `lockkit bench`: the workloads of `lockkit::bench` on every URL, one table, and the JSON
//! and SVG chart of the run.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args as ClapArgs;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lockkit::bench::{self, ms, Progress, Report, Settings};
use lockkit::url::parse_duration;
use lockkit::{BoxError, LockOptions};

/// `lockkit bench`.
#[derive(ClapArgs)]
pub(crate) struct Args {
    /// A lock service URL to measure; repeat for several (measured one after another).
    #[arg(long, required = true)]
    url: Vec<String>,
    /// Clients of the contended run, each with its own connections.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Length of the contended run (`10s`, `500ms`, ...).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// How long a contended worker holds the lock each time.
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    hold: Duration,
    /// Sequential acquire+release cycles per round, for lockkit and each floor.
    #[arg(long, default_value_t = 500)]
    iterations: usize,
    /// Rounds of the interleaved uncontended measurement (the ratio is their median).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// TTL of the failover run's holder (default: 2 s, or the backend's minimum).
    #[arg(long, value_parser = parse_duration)]
    failover_ttl: Option<Duration>,
    /// Skip the failover run.
    #[arg(long)]
    no_failover: bool,
    /// Also hold this many different names at once from one client (memory, CPU).
    #[arg(long)]
    scale: Option<usize>,
    /// How long the scale run holds its names.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    scale_hold: Duration,
    /// Lease TTL of the scale run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    scale_ttl: Duration,
    /// Write every figure, with the machine and versions, to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw latency and throughput per backend to this SVG file.
    #[arg(long)]
    chart: Option<PathBuf>,
}

/// `lockkit __bench-hold`.
#[derive(ClapArgs)]
pub(crate) struct HoldArgs {
    #[arg(long)]
    url: String,
    #[arg(long)]
    name: String,
    /// Seconds.
    #[arg(long)]
    ttl: f64,
}

/// Progress bars on standard error, one per phase; none when it is not a terminal.
struct Bars {
    bar: std::sync::Mutex<Option<ProgressBar>>,
}

impl Bars {
    fn finish(&self) {
        if let Some(bar) = self.bar.lock().expect("not poisoned").take() {
            bar.finish_and_clear();
        }
    }
}

impl Progress for Bars {
    fn phase(&self, what: &str, steps: u64) {
        self.finish();
        let bar = match steps {
            0 => {
                let bar = ProgressBar::new_spinner();
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                        .expect("valid template"),
                );
                bar.enable_steady_tick(Duration::from_millis(100));
                bar
            }
            steps => {
                let bar = ProgressBar::new(steps);
                bar.set_style(
                    ProgressStyle::with_template("{msg:32} {wide_bar} {pos}/{len} {eta}")
                        .expect("valid template"),
                );
                bar
            }
        };
        bar.set_draw_target(ProgressDrawTarget::stderr());
        bar.set_message(what.to_string());
        *self.bar.lock().expect("not poisoned") = Some(bar);
    }

    fn advance(&self, steps: u64) {
        if let Some(bar) = &*self.bar.lock().expect("not poisoned") {
            bar.inc(steps);
        }
    }
}

pub(crate) async fn main(args: Args) -> Result<ExitCode, BoxError> {
    if args.workers == 0 || args.iterations == 0 || args.rounds == 0 {
        return Err("--workers, --iterations and --rounds must be at least 1".into());
    }
    let settings = Settings {
        iterations: args.iterations,
        rounds: args.rounds,
        workers: args.workers,
        duration: args.duration,
        hold: args.hold,
        holder: match args.no_failover {
            true => None,
            false => Some(std::env::current_exe()?),
        },
        failover_ttl: args.failover_ttl,
        scale: args.scale,
        scale_hold: args.scale_hold,
        scale_ttl: args.scale_ttl,
    };
    let bars = Bars {
        bar: std::sync::Mutex::new(None),
    };
    let quiet = bench::Quiet;
    let progress: &dyn Progress = match std::io::stderr().is_terminal() {
        true => &bars,
        false => &quiet,
    };
    let date = bench::utc_now();
    let machine = bench::machine();
    println!(
        "lockkit {} bench, {date}, {} cores, {}",
        env!("CARGO_PKG_VERSION"),
        machine["cores"],
        machine["os"].as_str().unwrap_or("?")
    );
    print_header(&settings);
    let (mut reports, mut failures) = (Vec::new(), Vec::new());
    for url in &args.url {
        let result = bench::run(url, &settings, progress).await;
        bars.finish();
        match result {
            Ok(report) => {
                print_row(&report);
                reports.push(report);
            }
            Err(e) => {
                let message = crate::one_line(&e.to_string());
                eprintln!("lockkit: {}: {message}", bench::label(url));
                failures.push(serde_json::json!({
                    "url": lockkit::url::redact(url),
                    "error": message,
                }));
            }
        }
    }
    print_scale(&reports);
    if let Some(path) = &args.json {
        let document = serde_json::json!({
            "lockkit_version": env!("CARGO_PKG_VERSION"),
            "date": date,
            "machine": machine,
            "settings": {
                "iterations": settings.iterations,
                "rounds": settings.rounds,
                "workers": settings.workers,
                "duration_ms": ms(settings.duration),
                "hold_ms": ms(settings.hold),
                "scale": settings.scale,
                "scale_hold_ms": ms(settings.scale_hold),
                "scale_ttl_ms": ms(settings.scale_ttl),
            },
            "results": reports.iter().map(Report::to_json).collect::<Vec<_>>(),
            "failures": failures,
        });
        let text = serde_json::to_string_pretty(&document)?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(path) = &args.chart {
        crate::chart::draw(path, &reports, &date)?;
    }
    let violated: Vec<&Report> = reports
        .iter()
        .filter(|r| !r.violations.is_empty())
        .collect();
    for report in &violated {
        eprintln!(
            "lockkit: MUTUAL EXCLUSION VIOLATED on {}: {}",
            report.label,
            report.violations.join("; ")
        );
    }
    Ok(match (violated.is_empty(), failures.is_empty()) {
        (false, _) => ExitCode::from(3),
        (true, false) => ExitCode::from(crate::EXIT_ERROR),
        (true, true) => ExitCode::SUCCESS,
    })
}

fn f2(d: Duration) -> String {
    format!("{:.2}", ms(d))
}

/// The table's header; each URL's row follows as soon as it is measured.
fn print_header(settings: &Settings) {
    println!(
        "uncontended: {} cycles x {} rounds, interleaved with the floor; contended: {} workers \
         holding {} for {:?}; times in ms",
        settings.iterations,
        settings.rounds,
        settings.workers,
        humantime(settings.hold),
        settings.duration
    );
    println!(
        "{:<18} {:<16} {:<38} {:>13} {:>14} {:>7} {:>9} {:>12} {:>10} {:>8} {:>5} {:>20} {:>9} {:>16}",
        "backend",
        "server",
        "fenced floor",
        "floor p50/p99",
        "lockkit p50/99",
        "÷floor",
        "÷unfenced",
        "cpu µs lk/fl",
        "cs lk/fl",
        "acq/s",
        "fair",
        "wait p50/p99/max",
        "hand-off",
        "failover (TTL)"
    );
}

fn print_row(r: &Report) {
    {
        let u = &r.uncontended;
        let c = &r.contended;
        let failover = match &r.failover {
            Some(f) => format!("{:.2}s ({:.0}s)", f.took.as_secs_f64(), f.ttl.as_secs_f64()),
            None => "-".into(),
        };
        println!(
            "{:<18} {:<16} {:<38} {:>13} {:>14} {:>6.2}x {:>9} {:>12} {:>10} {:>8.0} {:>5.2} {:>20} {:>9} {:>16}",
            r.label,
            truncate(&r.server_version, 16),
            truncate(&r.floor_what, 38),
            format!("{}/{}", f2(u.floor.p50), f2(u.floor.p99)),
            format!("{}/{}", f2(u.lockkit.p50), f2(u.lockkit.p99)),
            u.ratio,
            u.unfenced_ratio
                .map_or_else(|| "-".into(), |x| format!("{x:.2}x")),
            format!(
                "{:.0}/{:.0}",
                u.lockkit_work.cpu.as_secs_f64() * 1e6,
                u.floor_work.cpu.as_secs_f64() * 1e6
            ),
            format!("{:.1}/{:.1}", u.lockkit_work.switches, u.floor_work.switches),
            c.per_second(),
            c.fairness(),
            format!("{}/{}/{}", f2(c.wait.p50), f2(c.wait.p99), f2(c.wait.max)),
            f2(c.handoff.p50),
            failover,
        );
    }
}

fn print_scale(reports: &[Report]) {
    let scaled: Vec<_> = reports
        .iter()
        .filter_map(|r| Some((r, r.scale.as_ref()?)))
        .collect();
    if !scaled.is_empty() {
        println!(
            "{:<18} {:>9} {:>9} {:>8} {:>11} {:>10} {:>12} {:>9}",
            "scale", "names", "taken", "take s", "KiB/guard", "CPU %core", "held at end", "failed"
        );
        for (r, s) in scaled {
            println!(
                "{:<18} {:>9} {:>9} {:>8.1} {:>11.1} {:>10.1} {:>12} {:>9}",
                r.label,
                s.names,
                s.taken,
                s.take_time.as_secs_f64(),
                s.bytes_per_guard / 1024.0,
                s.cpu_percent,
                s.held_at_end,
                s.failed + s.release_failures,
            );
            if let Some(e) = &s.first_error {
                println!("{:<18} first failure: {}", "", crate::one_line(e));
            }
        }
    }
}

fn humantime(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn truncate(text: &str, width: usize) -> String {
    match text.char_indices().nth(width) {
        Some((at, _)) => text[..at].to_string(),
        None => text.to_string(),
    }
}

/// Holds `args.name` until killed: prints `held <token>` once it does.
pub(crate) async fn hold(args: HoldArgs) -> Result<ExitCode, BoxError> {
    let ttl = Duration::try_from_secs_f64(args.ttl).map_err(|e| format!("--ttl: {e}"))?;
    let locks = lockkit::connect(&args.url).await?;
    let opts = LockOptions::new()
        .ttl(ttl)
        .wait_timeout(Duration::from_secs(60));
    let guard = locks.acquire_with(&args.name, &opts).await?;
    println!("held {}", guard.fencing_token().get());
    let reason = guard.lost().await;
    Err(format!("lost `{}`: {reason}", args.name).into())
}
