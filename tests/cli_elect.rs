//! `lockkit run --permits`, `lockkit run --elect [--keep-campaigning]` and `lockkit leader
//! [--watch]`, run as the real binary: on SQLite (the embedded default, several processes on
//! one file) and on etcd and Redis (test servers). Test names are `<backend>::<case>`.
#![cfg(all(feature = "cli", feature = "sqlite"))]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lockkit_testkit::fresh_name;

fn lockkit(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockkit"));
    cmd.args(args).stdin(Stdio::null());
    cmd
}

fn output(args: &[&str]) -> Output {
    lockkit(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A shell script that records how many commands run at once: it adds a file to `dir`,
/// appends the count of files (and the environment it was given) to `log`, pauses, and
/// removes its file before exiting, so the count never exceeds the commands inside their
/// lock.
fn overlap_script(dir: &Path, log: &Path, pause: &str) -> String {
    format!(
        "f='{d}'/$$; touch \"$f\"; n=$(ls '{d}' | wc -l); \
         echo \"$n $LOCKKIT_FENCING_TOKEN ${{LOCKKIT_LEADER_VALUE:-}}${{LOCKKIT_FENCE_KEY:-}}\" >> '{l}'; \
         sleep {pause}; rm \"$f\"",
        d = dir.display(),
        l = log.display()
    )
}

/// Log lines as (holders at once, token, value or fence key).
fn log_lines(log: &Path) -> Vec<(usize, u64, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let mut parts = line.splitn(3, ' ');
            let n = parts.next().unwrap().parse().unwrap();
            let token = parts.next().unwrap().parse().unwrap();
            (n, token, parts.next().unwrap_or("").to_owned())
        })
        .collect()
}

/// Six processes run under 2 permits: never more than 2 at once, 2 at once reached, each
/// command told its permit's fence key and token.
fn permits_cap_concurrent_commands(url: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, log) = (tmp.path().join("running"), tmp.path().join("log"));
    std::fs::create_dir(&dir).unwrap();
    let name = fresh_name("cli-permits");
    let script = overlap_script(&dir, &log, "0.4");
    let runs: Vec<Child> = (0..6)
        .map(|_| {
            lockkit(&["run", "--url", url, "--permits", "2", "--name", &name])
                .args(["--wait", "60", "--", "sh", "-c", &script])
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut run in runs {
        let status = run.wait().unwrap();
        assert!(status.success(), "{status}");
    }
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 6);
    let most = lines.iter().map(|l| l.0).max().unwrap();
    assert_eq!(most, 2, "commands at once: {lines:?}");
    assert!(lines
        .iter()
        .all(|l| l.2.starts_with(&format!("{name}/permits-2/"))));
}

/// Two candidates: the command runs only while its process leads (never both at once), each
/// is told its value and term token, terms' tokens rise, and `lockkit leader` shows the
/// leader while it leads and nobody afterwards.
fn elect_runs_only_while_leading(url: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, log) = (tmp.path().join("running"), tmp.path().join("log"));
    std::fs::create_dir(&dir).unwrap();
    let name = fresh_name("cli-elect");
    let script = overlap_script(&dir, &log, "1.5");
    let candidate = |value: &str| {
        lockkit(&["run", "--url", url, "--elect", &name, "--value", value])
            .args(["--", "sh", "-c", &script])
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = candidate("first");
    // Until the first leads, as `lockkit leader` sees it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let shown = loop {
        let out = output(&["leader", "--url", url, "--name", &name]);
        if out.status.code() == Some(0) {
            break text(&out.stdout);
        }
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        assert!(Instant::now() < deadline, "nobody led");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut second = candidate("second");
    assert!(first.wait().unwrap().success());
    assert!(second.wait().unwrap().success());
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines.iter().all(|l| l.0 == 1),
        "two leaders at once: {lines:?}"
    );
    assert_eq!(
        (lines[0].2.as_str(), lines[1].2.as_str()),
        ("first", "second")
    );
    assert!(lines[0].1 < lines[1].1, "{lines:?}");
    assert_eq!(
        shown.trim_end(),
        format!("leader\t{name}\t{}\tfirst", lines[0].1)
    );
    let out = output(&["leader", "--url", url, "--name", &name, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["leader"], false, "{json}");
}

/// `--keep-campaigning` reruns the command in a new term each time it exits, until stopped;
/// `lockkit leader --watch` prints every change as a JSON line.
fn keep_campaigning_and_watch(url: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, log) = (tmp.path().join("running"), tmp.path().join("log"));
    std::fs::create_dir(&dir).unwrap();
    let name = fresh_name("cli-keep");
    let mut watch = lockkit(&["leader", "--url", url, "--name", &name, "--watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut watched = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&watched.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["leader"], false, "{first}");

    let script = overlap_script(&dir, &log, "0.3");
    let mut campaigner = lockkit(&["run", "--url", url, "--elect", &name, "--value", "keeper"])
        .args(["--keep-campaigning", "--", "sh", "-c", &script])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while log_lines(&log).len() < 3 {
        assert!(Instant::now() < deadline, "the command was not rerun");
        std::thread::sleep(Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(campaigner.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(campaigner.wait().unwrap().code(), Some(143));
    let lines = log_lines(&log);
    assert!(lines.windows(2).all(|w| w[0].1 < w[1].1), "{lines:?}");

    // The watcher saw at least one term of `keeper`, with the token that term ran with.
    let mut seen = Vec::new();
    for line in watched.by_ref() {
        let change: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if change["leader"] == true {
            assert_eq!(change["value"], "keeper", "{change}");
            seen.push(change["token"].as_u64().unwrap());
            if seen.len() >= 2 {
                break;
            }
        }
    }
    watch.kill().unwrap();
    let _ = watch.wait();
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(
        seen.iter().all(|t| lines.iter().any(|l| l.1 == *t)),
        "watched {seen:?}, ran {lines:?}"
    );
}

macro_rules! backend {
    ($module:ident, $url:expr) => {
        mod $module {
            #[test]
            fn permits_cap_concurrent_commands() {
                super::permits_cap_concurrent_commands(&$url);
            }

            #[test]
            fn elect_runs_only_while_leading() {
                super::elect_runs_only_while_leading(&$url);
            }

            #[test]
            fn keep_campaigning_and_watch() {
                super::keep_campaigning_and_watch(&$url);
            }
        }
    };
}

/// A fresh SQLite file per test, shared by the test's processes.
fn sqlite_url() -> String {
    let dir = std::env::temp_dir().join(format!("lockkit-cli-elect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    format!(
        "sqlite://{}",
        dir.join(fresh_name("db").replace('/', "-")).display()
    )
}

backend!(sqlite, super::sqlite_url());
#[cfg(feature = "etcd")]
backend!(etcd, lockkit_testkit::service_url("LOCKKIT_ETCD_URL"));
#[cfg(feature = "redis")]
backend!(redis, lockkit_testkit::service_url("LOCKKIT_REDIS_URL"));
