//! `lockkit status`, `ls` and `release --force`, run as the real binary against every
//! backend: a lock this test holds is seen with its token, listed, removed, and the next
//! holder's token is higher. Test names are `<backend>::<case>`.
#![cfg(all(feature = "cli", feature = "sqlite"))]

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use lockkit::LockOptions;
use lockkit_testkit::{fresh_name, service_url, with_params};

fn lockkit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockkit"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Holds a lock, inspects it from the binary, removes it with `release --force`, and checks
/// that the next holder's token is above the removed one's.
async fn inspect_list_and_force_release(url: &str) {
    let locks = lockkit::connect(url).await.expect("connect");
    let prefix = fresh_name("cli-inspect");
    let name = format!("{prefix}/job one");
    let guard = locks
        .acquire_with(&name, &LockOptions::new().ttl(Duration::from_secs(30)))
        .await
        .expect("acquire");
    let token = guard.fencing_token().get();

    let out = lockkit(&["status", "--url", url, "--name", &name, "--json"]);
    assert_eq!(out.status.code(), Some(1), "held: {}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["held"], true, "{status}");
    assert_eq!(status["token"], token, "{status}");
    assert_eq!(status["name"], name.as_str(), "{status}");

    let out = lockkit(&["ls", "--url", url, "--prefix", &prefix, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["name"], name.as_str());
    assert_eq!(listed[0]["token"], token);
    let out = lockkit(&["ls", "--url", url, "--prefix", &prefix]);
    assert!(text(&out.stdout).starts_with(&format!("{name}\t{token}\t")));

    // Without --yes and without a terminal to ask at, nothing is removed.
    let out = lockkit(&["release", "--force", "--url", url, "--name", &name]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("--yes"), "{}", text(&out.stderr));
    let out = lockkit(&["status", "--url", url, "--name", &name]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));

    let out = lockkit(&["release", "--force", "--yes", "--url", url, "--name", &name]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("removed"),
        "{}",
        text(&out.stdout)
    );
    let out = lockkit(&["status", "--url", url, "--name", &name]);
    assert_eq!(out.status.code(), Some(0), "free: {}", text(&out.stdout));
    assert!(text(&out.stdout).starts_with("free"));
    let out = lockkit(&["ls", "--url", url, "--prefix", &prefix, "--json"]);
    assert_eq!(text(&out.stdout).trim(), "[]");

    // The next holder (Consul makes it wait out the session's lock-delay) is fenced above.
    let other = lockkit::connect(url).await.expect("connect");
    let next = other
        .acquire_with(
            &name,
            &LockOptions::new().wait_timeout(Duration::from_secs(40)),
        )
        .await
        .expect("the removed lock is free again");
    assert!(next.fencing_token().get() > token);
    next.release().await.unwrap();
    drop(guard);
}

#[cfg(feature = "sqlite")]
mod sqlite {
    #[tokio::test(flavor = "multi_thread")]
    async fn inspect_list_and_force_release() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("locks.db").display());
        super::inspect_list_and_force_release(&url).await;
    }
}

/// One test per server URL key (and per SQL strategy).
macro_rules! stamped {
    ($($feature:literal, $module:ident, $key:literal, $params:literal;)+) => {$(
        #[cfg(feature = $feature)]
        mod $module {
            #[tokio::test(flavor = "multi_thread")]
            async fn inspect_list_and_force_release() {
                let url = super::with_params(&super::service_url($key), $params);
                super::inspect_list_and_force_release(&url).await;
            }
        }
    )+};
}

stamped! {
    "redis", redis, "LOCKKIT_REDIS_URL", "";
    "redis", redlock, "LOCKKIT_REDLOCK_URL", "";
    "etcd", etcd, "LOCKKIT_ETCD_URL", "";
    "zk", zk, "LOCKKIT_ZK_URL", "";
    "consul", consul, "LOCKKIT_CONSUL_URL", "";
    "postgres", postgres_advisory, "LOCKKIT_POSTGRES_URL", "strategy=advisory";
    "postgres", postgres_table, "LOCKKIT_POSTGRES_URL", "strategy=table";
    "mysql", mysql_advisory, "LOCKKIT_MYSQL_URL", "strategy=advisory";
    "mysql", mysql_table, "LOCKKIT_MYSQL_URL", "strategy=table";
}

/// Bad input to the new commands: one line on standard error, a non-zero exit.
mod errors {
    use super::*;

    fn one_line_failure(args: &[&str]) {
        let out = lockkit(args);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {}", text(&out.stdout));
        assert_ne!(out.status.code(), Some(1), "{args:?}: 1 means held: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(!err.contains("s3cret"), "{args:?}: {err}");
    }

    #[test]
    fn bad_urls_and_unknown_flags() {
        for url in [
            "nosuchscheme://u:s3cret@h",
            "redis://u:s3c/ret@127.0.0.1:1",
            "postgres://u:s3cret@127.0.0.1:1/db?nonsense=1",
            "not a url",
        ] {
            one_line_failure(&["status", "--url", url, "--name", "x"]);
            one_line_failure(&["ls", "--url", url]);
            one_line_failure(&["release", "--force", "--yes", "--url", url, "--name", "x"]);
            one_line_failure(&["bench", "--url", url, "--duration", "100ms"]);
        }
        one_line_failure(&["status", "--url", "sqlite::memory:", "--name", ""]);
        one_line_failure(&["bench", "--url", "sqlite::memory:", "--duration", "soon"]);
        for args in [
            &[
                "status",
                "--url",
                "sqlite::memory:",
                "--name",
                "x",
                "--colour",
            ][..],
            &["ls", "--url", "sqlite::memory:", "--bogus"],
            &["release", "--url", "sqlite::memory:", "--name", "x"],
            &["bench", "--url", "sqlite::memory:", "--wrokers", "2"],
            &["frobnicate"],
        ] {
            let out = lockkit(args);
            assert_eq!(out.status.code(), Some(2), "{args:?}");
            assert!(text(&out.stderr).starts_with("error:"), "{args:?}");
        }
    }
}
