//! What the process and the machine say about themselves: resident memory (Linux `/proc`),
//! CPU time and context switches (`getrusage`), cores, OS, and the date.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// This process's resident memory in bytes (`VmRSS` of `/proc/self/status`; 0 elsewhere).
pub(crate) fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// What this process has used so far, all its threads together, ended ones included.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Usage {
    /// CPU time, user and system.
    pub(crate) cpu: Duration,
    /// Context switches, voluntary (a thread waited: parked, blocked on I/O) and not.
    pub(crate) switches: u64,
}

impl Usage {
    /// Both together.
    pub(crate) fn plus(self, other: Usage) -> Usage {
        Usage {
            cpu: self.cpu + other.cpu,
            switches: self.switches + other.switches,
        }
    }

    /// What was used since `earlier`.
    pub(crate) fn since(self, earlier: Usage) -> Usage {
        Usage {
            cpu: self.cpu.saturating_sub(earlier.cpu),
            switches: self.switches.saturating_sub(earlier.switches),
        }
    }
}

/// Runs `work`, and what this process used meanwhile.
pub(crate) async fn measured<T>(work: impl std::future::Future<Output = T>) -> (T, Usage) {
    let before = usage();
    let out = work.await;
    (out, usage().since(before))
}

/// This process's [`Usage`] (`getrusage(RUSAGE_SELF)`, in microseconds; zero if it fails,
/// and off Unix).
#[cfg(not(unix))]
pub(crate) fn usage() -> Usage {
    Usage::default()
}

/// This process's [`Usage`] (`getrusage(RUSAGE_SELF)`, in microseconds; zero if it fails,
/// and off Unix).
#[cfg(unix)]
pub(crate) fn usage() -> Usage {
    use nix::sys::resource::{getrusage, UsageWho};
    use nix::sys::time::TimeValLike;
    let Ok(used) = getrusage(UsageWho::RUSAGE_SELF) else {
        return Usage::default();
    };
    let micros = |t: nix::sys::time::TimeVal| u64::try_from(t.num_microseconds()).unwrap_or(0);
    let switches = used.voluntary_context_switches() + used.involuntary_context_switches();
    Usage {
        cpu: Duration::from_micros(micros(used.user_time()) + micros(used.system_time())),
        switches: u64::try_from(switches).unwrap_or(0),
    }
}

/// The machine, for the JSON report: logical cores, OS and kernel.
pub fn machine() -> Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let os = release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| std::env::consts::OS.to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .ok();
    json!({
        "cores": cores,
        "os": os,
        "kernel": kernel,
        "arch": std::env::consts::ARCH,
    })
}

/// Now in UTC, as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// The date `days` after 1970-01-01 (Howard Hinnant's days-to-civil algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_process_readings() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
        assert_eq!(utc_now().len(), 20);
        if cfg!(target_os = "linux") {
            assert!(rss_bytes() > 0);
        }
        if !cfg!(unix) {
            return;
        }
        let before = usage();
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_add(std::hint::black_box(i) * i);
        }
        std::hint::black_box(x);
        std::thread::sleep(Duration::from_millis(5));
        let used = usage().since(before);
        // The loop takes milliseconds of CPU; the sleep is a voluntary switch.
        assert!(used.cpu >= Duration::from_micros(500), "{used:?}");
        assert!(used.switches >= 1, "{used:?}");
        assert_eq!(before.since(usage()), Usage::default());
    }
}
