//! The whole matrix (or its short form): every backend × every fault class, backends that
//! share a server one after another, the others in parallel lanes; then the negative
//! control; then one table.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::driver::{self, Backend, Fault, RunResult, Schedule, Services};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The backends (already filtered).
    pub backends: Vec<Backend>,
    /// The fault classes (already filtered).
    pub faults: Vec<Fault>,
    /// Runs per cell (seeds `seed`, `seed + 1`, ...).
    pub runs: u32,
    /// Fault repetitions per run.
    pub rounds: u32,
    /// Worker processes per run.
    pub workers: u32,
    /// First seed.
    pub seed: u64,
    /// Parallel lanes.
    pub jobs: usize,
    /// Backends whose negative control runs (stop-holder, fencing off).
    pub negative: Vec<&'static str>,
    /// Where run directories go.
    pub out: PathBuf,
    /// This program.
    pub exe: PathBuf,
}

/// Runs the plan and prints the table; `true` when every fenced run passed and every
/// negative control caught a violation.
pub async fn run(plan: Plan, services: Services) -> bool {
    let started = Instant::now();
    let mut groups: BTreeMap<&'static str, Vec<Schedule>> = BTreeMap::new();
    for backend in &plan.backends {
        for &fault in &plan.faults {
            if !backend.applies(fault) {
                continue;
            }
            for r in 0..plan.runs {
                let seed = plan.seed + u64::from(r);
                groups.entry(backend.group()).or_default().push(Schedule {
                    backend: backend.clone(),
                    fault,
                    seed,
                    fenced: true,
                    rounds: plan.rounds,
                    workers: plan.workers,
                    dir: plan
                        .out
                        .join(format!("{}-{}-{seed}", backend.key, fault.name())),
                    exe: plan.exe.clone(),
                });
            }
        }
        if plan.negative.contains(&backend.key) {
            groups.entry(backend.group()).or_default().push(Schedule {
                backend: backend.clone(),
                fault: Fault::StopHolder,
                seed: plan.seed,
                fenced: false,
                rounds: plan.rounds,
                workers: plan.workers,
                dir: plan
                    .out
                    .join(format!("{}-negative-control-{}", backend.key, plan.seed)),
                exe: plan.exe.clone(),
            });
        }
    }
    // longest lanes first
    let mut queue: Vec<Vec<Schedule>> = groups.into_values().collect();
    queue.sort_by_key(|g| std::cmp::Reverse(g.iter().map(|s| s.backend.ttl).sum::<Duration>()));
    let queue = Arc::new(Mutex::new(VecDeque::from(queue)));
    let results = Arc::new(Mutex::new(Vec::<RunResult>::new()));
    let mut lanes = Vec::new();
    for _ in 0..plan.jobs.max(1) {
        let (queue, results, services) = (queue.clone(), results.clone(), services.clone());
        lanes.push(tokio::spawn(async move {
            loop {
                let Some(group) = queue.lock().expect("queue").pop_front() else {
                    break;
                };
                for s in group {
                    let r = driver::run(&s, &services).await;
                    eprintln!(
                        "faults: {:<18} {:<14} {:<8} {:>3} grants, {:>2} stale rejected, {} violations ({:.1} s) {}",
                        r.backend,
                        r.fault.name(),
                        if r.fenced { "fenced" } else { "UNFENCED" },
                        r.report.grants,
                        r.report.stale_rejected,
                        r.report.violations.len(),
                        r.wall.as_secs_f64(),
                        r.dir.display()
                    );
                    for v in r.report.violations.iter().take(5) {
                        eprintln!("faults:     {v}");
                    }
                    results.lock().expect("results").push(r);
                }
            }
        }));
    }
    for lane in lanes {
        let _ = lane.await;
    }
    let results = std::mem::take(&mut *results.lock().expect("results"));
    print_table(&plan, &results, started.elapsed())
}

#[derive(Default)]
struct Cell {
    runs: u32,
    grants: usize,
    stale: usize,
    violations: usize,
    loss: Option<u64>,
    recovery: Option<u64>,
}

fn ms(ns: Option<u64>) -> String {
    ns.map_or("-".into(), |n| format!("{}", n / 1_000_000))
}

fn print_table(plan: &Plan, results: &[RunResult], wall: Duration) -> bool {
    // fenced runs first (key `!fenced`), the negative controls after them
    let mut cells: BTreeMap<(bool, usize, Fault), Cell> = BTreeMap::new();
    let order: HashMap<&str, usize> = plan
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| (b.key, i))
        .collect();
    for r in results {
        let c = cells
            .entry((!r.fenced, order[r.backend], r.fault))
            .or_default();
        c.runs += 1;
        c.grants += r.report.grants;
        c.stale += r.report.stale_rejected;
        c.violations += r.report.violations.len();
        c.loss = c.loss.max(r.report.worst_loss);
        c.recovery = c.recovery.max(r.report.worst_recovery);
    }
    println!("| backend | fault | runs | grants | stale writes rejected | violations | worst loss-signal delay (ms) | worst recovery (ms) | recovery bound (ms) |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut ok = true;
    for ((unfenced, b, fault), c) in &cells {
        let fenced = &!*unfenced;
        let backend = &plan.backends[*b];
        let name = if *fenced {
            fault.name().to_owned()
        } else {
            format!("{} NEGATIVE CONTROL (fencing off)", fault.name())
        };
        let verdict = if *fenced {
            ok &= c.violations == 0;
            c.violations.to_string()
        } else if c.violations > 0 {
            format!("{} (caught, as it must)", c.violations)
        } else {
            ok = false;
            "0 (NOT CAUGHT: the checker cannot fail?)".to_owned()
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            backend.key,
            name,
            c.runs,
            c.grants,
            c.stale,
            verdict,
            ms(c.loss),
            ms(c.recovery),
            backend.recovery.as_millis()
        );
    }
    let fenced_runs = results.iter().filter(|r| r.fenced).count();
    let bad = results
        .iter()
        .filter(|r| r.fenced && !r.report.violations.is_empty())
        .count();
    println!();
    println!(
        "{} runs ({} fenced, {} with violations), {} negative controls, wall time {:.0} s: {}",
        results.len(),
        fenced_runs,
        bad,
        results.len() - fenced_runs,
        wall.as_secs_f64(),
        if ok { "PASS" } else { "FAIL" }
    );
    if !ok {
        println!();
        for r in results
            .iter()
            .filter(|r| r.fenced && !r.report.violations.is_empty())
        {
            println!("{} × {} ({}):", r.backend, r.fault.name(), r.dir.display());
            for v in r.report.violations.iter().take(8) {
                println!("  {v}");
            }
        }
    }
    ok
}
