//! Several processes share locks through one SQLite file, driven by the `lockkit` command:
//! the embedded default is a real cross-process lock, and the command's exit codes hold.
#![cfg(all(feature = "cli", feature = "sqlite"))]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn lockkit(db: &Path, args: &[&str], script: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockkit"));
    cmd.args(["run", "--url", &format!("sqlite://{}", db.display())])
        .args(args)
        .args(["--", "sh", "-c", script])
        .stderr(Stdio::null());
    cmd
}

#[test]
fn processes_exclude_each_other_and_tokens_rise() {
    let dir = tempfile::tempdir().unwrap();
    let (db, counter, tokens) = (
        dir.path().join("locks.db"),
        dir.path().join("counter"),
        dir.path().join("tokens"),
    );
    std::fs::write(&counter, "0").unwrap();
    // A read-modify-write of a file, with a pause that makes overlapping runs lose updates.
    let script = format!(
        "v=$(cat '{c}'); sleep 0.01; echo $((v + 1)) > '{c}'; echo $LOCKKIT_FENCING_TOKEN >> '{t}'",
        c = counter.display(),
        t = tokens.display()
    );
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (db, script) = (db.clone(), script.clone());
            std::thread::spawn(move || {
                for _ in 0..10 {
                    let status = lockkit(&db, &["--name", "shared", "--wait", "60"], &script)
                        .status()
                        .unwrap();
                    assert!(status.success(), "{status}");
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let count = std::fs::read_to_string(&counter).unwrap();
    assert_eq!(count.trim(), "40", "lost updates between processes");
    let tokens: Vec<u64> = std::fs::read_to_string(&tokens)
        .unwrap()
        .lines()
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(tokens.len(), 40);
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
}

#[test]
fn busy_lock_exits_73_and_command_status_passes_through() {
    let dir = tempfile::tempdir().unwrap();
    let (db, started, done) = (
        dir.path().join("locks.db"),
        dir.path().join("started"),
        dir.path().join("done"),
    );
    // The holder keeps the lock until the test says it is done.
    let mut holder = lockkit(
        &db,
        &["--name", "job"],
        &format!(
            "touch '{}'; while [ ! -e '{}' ]; do sleep 0.02; done",
            started.display(),
            done.display()
        ),
    )
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !started.exists() {
        assert!(Instant::now() < deadline, "the holder never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let busy = lockkit(&db, &["--name", "job", "--wait", "0.2"], "exit 0")
        .status()
        .unwrap();
    assert_eq!(busy.code(), Some(73));
    std::fs::write(&done, "").unwrap();
    assert!(holder.wait().unwrap().success());
    let passed = lockkit(&db, &["--name", "job", "--wait", "5"], "exit 9")
        .status()
        .unwrap();
    assert_eq!(passed.code(), Some(9));
}
