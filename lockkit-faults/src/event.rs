//! One JSON line per event, stamped with CLOCK_MONOTONIC (shared by every process on the
//! machine, so the logs of the workers and of the driver sort into one timeline).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Nanoseconds of CLOCK_MONOTONIC: comparable across the processes of one machine.
pub fn now_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Milliseconds to nanoseconds.
pub const fn ms(ms: u64) -> u64 {
    ms * 1_000_000
}

/// One logged event. `ev` names it; the other fields are set where they mean something:
///
/// - workers: `start`, `connect_error`, `attempt` (`deadline`), `grant` (`token`, `at` = its
///   attempt), `acquire_error` (`at`, `deadline`, `err`), `cancelled` (`at`), `read` /
///   `write` (`token`, `value`, `ok`, `err`), `writing` (`token`: the pause between read
///   and write is over), `releasing` (`token`), `release` (`token`,
///   `ok`, `err`), `lost` (`token`, `err` = the reason), `exit`;
/// - the driver: `fault` (`what`, `target`) when a fault starts, `heal` (`what`) when it
///   ends, `stop` / `cont` / `kill` (`target` = a worker id).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// CLOCK_MONOTONIC, nanoseconds.
    pub t: u64,
    /// Who logged it: a worker id, or `driver`.
    pub w: String,
    /// What happened.
    pub ev: String,
    /// The fencing token concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
    /// A register value read or written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<i64>,
    /// Whether the operation succeeded (register: `false` = rejected as stale).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
    /// An error or a loss reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err: Option<String>,
    /// When the operation that this event ends began (an acquire's attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<u64>,
    /// An acquire's wait deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
    /// A fault's description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub what: Option<String>,
    /// The worker a driver action is aimed at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl Event {
    /// An event of `who` named `ev`, now.
    pub fn new(who: &str, ev: &str) -> Self {
        Event {
            t: now_ns(),
            w: who.to_owned(),
            ev: ev.to_owned(),
            ..Event::default()
        }
    }
}

/// An append-only JSON-lines log, one `write` per line (lines of concurrent writers never mix).
pub struct Log(Mutex<File>);

impl Log {
    /// Opens (creates) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Log> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Log(Mutex::new(file)))
    }

    /// Appends one event; a failed write is reported on stderr (the run's checkers will then
    /// miss the event, which can only make them stricter).
    pub fn put(&self, event: &Event) {
        let mut line = serde_json::to_vec(event).expect("events serialize");
        line.push(b'\n');
        let mut file = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(&line) {
            eprintln!("lockkit-faults: cannot log: {e}");
        }
    }
}

/// Every event of every `*.jsonl` file in `dir`, sorted by time. Unparsable lines (a process
/// killed in the middle of a write) are skipped.
pub fn read_dir(dir: &Path) -> std::io::Result<Vec<Event>> {
    let mut events = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "jsonl") {
            events.extend(read_file(&path)?);
        }
    }
    events.sort_by_key(|e| e.t);
    Ok(events)
}

/// The events of one log file, in file order.
pub fn read_file(path: &Path) -> std::io::Result<Vec<Event>> {
    let reader = BufReader::new(File::open(path)?);
    let mut events = Vec::new();
    for line in reader.lines() {
        if let Ok(event) = serde_json::from_str::<Event>(&line?) {
            events.push(event);
        }
    }
    Ok(events)
}
