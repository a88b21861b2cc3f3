//! Safety of the SQL backends against the servers of `scripts/services`: a lease-table
//! holder delayed between its row and its token, a frozen advisory holder, an unreachable
//! server, and options too large to compute with.
#![cfg(all(
    feature = "postgres",
    feature = "mysql",
    feature = "sqlite",
    feature = "cli"
))]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lockkit::backend::Backend;
use lockkit::sql::{MySqlLock, PgLock, SqlOptions, SqliteLock};
use lockkit::{Error, LockName, LockOptions, Locks};
use sqlx::{MySqlPool, PgPool};

use lockkit_testkit::{fresh_name, service_url, with_params};

/// A table prefix no other test uses.
fn private_prefix() -> String {
    format!("safety_{:08x}_", fastrand_u32())
}

fn fastrand_u32() -> u32 {
    let name = fresh_name("p");
    name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Holder A takes the lease row of a fresh name with a 1 s TTL while a one-shot trigger on
/// the fence table delays its token by 2 s; B acquires meanwhile. A must not come out of it
/// holding a token above B's.
async fn delayed_fence<B: Backend>(a: B, b: Locks, name: &str) {
    let lock_name = LockName::new(name).unwrap();
    let holder = tokio::spawn(async move {
        let opts = LockOptions::new().ttl(Duration::from_secs(1));
        let got = a.try_lock(&lock_name, &opts).await;
        (got.map(|acquired| acquired.map(|a| a.token)), a)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let next = b
        .acquire_with(
            name,
            &LockOptions::new().wait_timeout(Duration::from_secs(15)),
        )
        .await
        .expect("B acquires once A's lease has run out");
    let (delayed, _a) = holder.await.unwrap();
    if let Ok(Some(token)) = delayed {
        assert!(
            next.fencing_token() > token,
            "the delayed holder got token {token:?} above the next holder's {:?}",
            next.fencing_token()
        );
    }
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_table_holder_delayed_between_row_and_token_gets_no_higher_token() {
    let base = service_url("LOCKKIT_POSTGRES_URL");
    let p = private_prefix();
    let url = with_params(&base, &format!("strategy=table&table_prefix={p}"));
    let a = PgLock::connect(&url).await.unwrap();
    let b = Locks::new(PgLock::connect(&url).await.unwrap());
    let admin = PgPool::connect(&base).await.unwrap();
    sqlx::raw_sql(&format!(
        "CREATE SEQUENCE {p}delayed;
         CREATE FUNCTION {p}delay() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF nextval('{p}delayed') = 1 THEN PERFORM pg_sleep(2); END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER {p}delay BEFORE INSERT ON {p}fences
             FOR EACH ROW EXECUTE FUNCTION {p}delay();"
    ))
    .execute(&admin)
    .await
    .unwrap();
    delayed_fence(a, b, &fresh_name("lockkit-sql-safety/delayed_fence")).await;
    sqlx::raw_sql(&format!(
        "DROP TABLE {p}fences, {p}locks, {p}advisory_keys;
         DROP FUNCTION {p}delay(); DROP SEQUENCE {p}delayed;"
    ))
    .execute(&admin)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_table_holder_delayed_between_row_and_token_gets_no_higher_token() {
    let base = service_url("LOCKKIT_MYSQL_URL");
    let p = private_prefix();
    let url = with_params(&base, &format!("strategy=table&table_prefix={p}"));
    let a = MySqlLock::connect(&url).await.unwrap();
    let b = Locks::new(MySqlLock::connect(&url).await.unwrap());
    let admin = MySqlPool::connect(&base).await.unwrap();
    // The name's counter exists: a fresh insert in a table with a trigger reports no
    // `LAST_INSERT_ID`, whatever lockkit does.
    let name = fresh_name("lockkit-sql-safety/delayed_fence");
    sqlx::query(&format!(
        "INSERT INTO {p}fences (name, value) VALUES (?, 10)"
    ))
    .bind(&name)
    .execute(&admin)
    .await
    .unwrap();
    // The marker is a session lock: only the first session to insert a fence sleeps, and
    // it blocks no one else (a marker table would be locked for the whole statement).
    sqlx::raw_sql(&format!(
        "CREATE TRIGGER {p}delay BEFORE INSERT ON {p}fences FOR EACH ROW
         BEGIN
             IF GET_LOCK('{p}slept', 0) = 1 THEN
                 SET @lockkit_slept = SLEEP(2);
             END IF;
         END"
    ))
    .execute(&admin)
    .await
    .unwrap();
    delayed_fence(a, b, &name).await;
    sqlx::raw_sql(&format!("DROP TABLE {p}fences, {p}locks"))
        .execute(&admin)
        .await
        .unwrap();
}

/// `lockkit run` holding `name` on `url` with a 2 s TTL.
fn holder(url: &str, name: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lockkit"))
        .args([
            "run", "--url", url, "--name", name, "--ttl", "2", "--", "sleep", "60",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig}");
}

/// A holder process frozen past its TTL does not keep the advisory lock.
async fn frozen_holder_frees_the_lock(key: &str) {
    let url = with_params(&service_url(key), "strategy=advisory");
    let name = fresh_name("lockkit-sql-safety/frozen");
    let mut child = holder(&url, &name);
    let other = lockkit::connect(&url).await.unwrap();
    let ready = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match other.try_acquire(&name).await.unwrap() {
            None => break,
            Some(guard) => guard.release().await.unwrap(),
        }
        assert!(tokio::time::Instant::now() < ready, "the holder never held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal(&child, "-STOP");
    let ttl = Duration::from_secs(2);
    let got = other
        .acquire_with(
            &name,
            &LockOptions::new().wait_timeout(ttl * 2 + Duration::from_secs(5)),
        )
        .await;
    signal(&child, "-CONT");
    signal(&child, "-TERM");
    let _ = child.wait();
    let guard = got.expect("a frozen holder kept the advisory lock past its TTL");
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_frozen_advisory_holder_frees_the_lock_at_its_ttl() {
    frozen_holder_frees_the_lock("LOCKKIT_POSTGRES_URL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_frozen_advisory_holder_frees_the_lock_at_its_ttl() {
    frozen_holder_frees_the_lock("LOCKKIT_MYSQL_URL").await;
}

#[tokio::test]
async fn unreachable_servers_say_connection_refused_and_where() {
    for url in [
        "postgres://lockkit:secret-pw@127.0.0.1:1/lockkit",
        "mysql://lockkit:secret-pw@127.0.0.1:1/lockkit",
    ] {
        let err = lockkit::connect(url).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.to_lowercase().contains("refused") && text.contains("127.0.0.1:1"),
            "{url}: {text}"
        );
        assert!(!text.contains("secret-pw"), "{text}");
        assert!(err.is_retryable(), "{text}");
    }
}

#[tokio::test]
async fn unusable_durations_are_invalid_options() {
    let max = Duration::MAX;
    let cases = [
        ("acquire_timeout", SqlOptions::new().acquire_timeout(max)),
        ("wait_slice", SqlOptions::new().wait_slice(max)),
        ("max_poll", SqlOptions::new().max_poll(max)),
        ("busy_timeout", SqlOptions::new().busy_timeout(max)),
        (
            "acquire_timeout",
            SqlOptions::new().acquire_timeout(Duration::ZERO),
        ),
    ];
    for (option, options) in cases {
        let got = tokio::spawn(SqliteLock::connect_with("sqlite::memory:", options)).await;
        match got {
            Ok(Err(Error::InvalidOptions(text))) => assert!(text.contains(option), "{text}"),
            Ok(Err(e)) => panic!("{option}: {e}"),
            Ok(Ok(_)) => panic!("{option}: accepted"),
            Err(panic) => panic!("{option}: panicked: {panic}"),
        }
    }
}

#[tokio::test]
async fn a_backend_asked_for_an_endless_lease_does_not_panic() {
    let lock = SqliteLock::connect("sqlite::memory:").await.unwrap();
    let name = LockName::new("endless").unwrap();
    let opts = LockOptions::new().ttl(Duration::MAX);
    let got =
        tokio::spawn(async move { lock.try_lock(&name, &opts).await.map(|a| a.is_some()) }).await;
    assert!(got.is_ok(), "panicked: {:?}", got.err());
}

#[tokio::test]
async fn a_lease_extended_endlessly_does_not_panic() {
    let lock = SqliteLock::connect("sqlite::memory:").await.unwrap();
    let name = LockName::new("extended").unwrap();
    let acquired = lock
        .try_lock(&name, &LockOptions::new())
        .await
        .unwrap()
        .expect("free");
    let got = tokio::spawn(async move { acquired.lease.extend(Duration::MAX).await.is_ok() }).await;
    assert!(got.is_ok(), "panicked: {:?}", got.err());
}
