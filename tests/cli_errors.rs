//! The `lockkit` command's answers to bad input: one clear line, a non-zero exit, no secret.
#![cfg(all(feature = "cli", feature = "sqlite"))]

use std::process::Command;

/// Runs `lockkit run` with `args` and returns (exit code, standard error).
fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lockkit"))
        .arg("run")
        .args(args)
        .args(["--", "true"])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_huge_ttl_is_too_large_not_negative() {
    let (code, err) = run(&["--url", "sqlite::memory:", "--name", "x", "--ttl", "1e30"]);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("too large"), "{err}");
    assert!(!err.contains("non-negative"), "{err}");
}

#[test]
fn a_negative_wait_is_refused() {
    let (code, err) = run(&["--url", "sqlite::memory:", "--name", "x", "--wait=-1"]);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("--wait"), "{err}");
}

/// One URL per backend with a password (or token) and a broken part.
#[test]
fn a_bad_url_never_shows_its_password() {
    for url in [
        "etcd://u:s3cret%zz@127.0.0.1:1",
        "zk://u:s3cretpw@127.0.0.1:1",
        "redis://u:s3c/ret@127.0.0.1:1",
        "postgres://u:s3cret@127.0.0.1:1/db?nonsense=1",
        "mysql://u:s3cret@127.0.0.1:1/db?strategy=sideways",
        "redlock://:s3cret@127.0.0.1:1,127.0.0.1:2,[::1/0",
        "consul://127.0.0.1:1?token=s3cret&colour=red",
        "consul://u:s3cret%zz@127.0.0.1:1",
        "nosuchscheme://u:s3cret@h",
    ] {
        let (code, err) = run(&["--url", url, "--name", "x", "--wait", "0"]);
        assert_ne!(code, Some(0), "{url}: {err}");
        assert!(!err.contains("s3c"), "{url}: {err}");
        assert!(!err.trim().is_empty(), "{url}: no message");
    }
}
