//! Renewals of lease rows (the table strategy), batched per client: many guards on one SQLite
//! file all kept through several TTLs, and a batch that holds rows no longer ours (taken over
//! by another client, or run out) extends only the rest, each extend learning its own answer;
//! and a burst of takes larger than the pool does not starve the renewals.
//! SQLite runs on a temporary file; PostgreSQL and MySQL on the servers of `scripts/services`.
#![cfg(feature = "sqlite")]

use std::sync::Arc;
use std::time::Duration;

use lockkit_core::backend::{Backend, Lease, LockName, LockOptions};
use lockkit_core::{Error, Locks};
use lockkit_sql::SqliteLock;
use lockkit_testkit::fresh_name;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

/// The SQLite tests that load the machine (thousands of guards, a burst of takes) run one at
/// a time: SQLite runs in this process, so each would be the other's CPU starvation.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// 2 000 guards with a 3 s TTL on one SQLite file (durable: a commit is an fsync), held for
/// three TTLs: only renewals keep them, and every one must be kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_keeps_two_thousand_guards() {
    let _heavy = HEAVY.lock().await;
    const GUARDS: usize = 2_000;
    let ttl = Duration::from_secs(3);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("locks.db").display());
    let locks = Locks::new(SqliteLock::connect(&url).await.unwrap());
    let other = SqliteLock::connect(&url).await.unwrap();
    let opts = LockOptions::new()
        .ttl(ttl)
        .wait_timeout(Duration::from_secs(5));
    let base = fresh_name("lockkit-sql-renewals/many");
    let took = Instant::now();
    // 64 acquisitions at a time, as the benchmark's scale run takes its names.
    let at_once = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = JoinSet::new();
    for i in 0..GUARDS {
        let (locks, opts, at_once) = (locks.clone(), opts.clone(), at_once.clone());
        let name = format!("{base}-{i}");
        tasks.spawn(async move {
            let _turn = at_once.acquire().await.unwrap();
            locks.acquire_with(&name, &opts).await
        });
    }
    let mut held = Vec::new();
    while let Some(guard) = tasks.join_next().await {
        held.push(guard.unwrap().expect("acquired"));
    }
    let lost = held.iter().filter(|g| !g.is_held()).count();
    eprintln!("took {GUARDS} guards in {:?}, {lost} lost", took.elapsed());
    tokio::time::sleep(ttl * 3).await;
    let lost = held.iter().filter(|g| !g.is_held()).count();
    assert_eq!(
        lost, 0,
        "{lost} of {GUARDS} guards lost: renewals fell behind"
    );
    // Held on the database too, not only in the keeper's belief.
    for i in [0, GUARDS / 2, GUARDS - 1] {
        let name = LockName::new(&format!("{base}-{i}")).unwrap();
        let taken = other.try_lock(&name, &opts).await.unwrap();
        assert!(taken.is_none(), "{name}: taken by another client");
    }
    // Not what this test checks (the guards end with their TTL anyway); shown if any fails.
    for guard in held {
        if let Err(e) = guard.release().await {
            eprintln!("a release failed: {e}");
        }
    }
}

/// Six rows ours and in time, one taken over by another client, one run out: extended at
/// once (one batch, halved), the six are extended and the two are lost, and neither of the
/// two rows is touched: the other client's row still ends at its own TTL, the run-out row
/// stays free.
async fn batch_extends_only_rows_ours_and_in_time(a: Arc<dyn Backend>, b: Arc<dyn Backend>) {
    let short = LockOptions::new().ttl(Duration::from_millis(2_500));
    let long = LockOptions::new().ttl(Duration::from_secs(10));
    let expiring = LockOptions::new().ttl(Duration::from_millis(1_000));
    let base = fresh_name("lockkit-sql-renewals/batch");
    let name = |i: usize| LockName::new(&format!("{base}-{i}")).unwrap();
    let take = |client: &Arc<dyn Backend>, i: usize, opts: &LockOptions| {
        let (client, opts, name) = (client.clone(), opts.clone(), name(i));
        async move {
            let taken = client.try_lock(&name, &opts).await.unwrap();
            taken.unwrap_or_else(|| panic!("{name}: not free"))
        }
    };
    let run_out = take(&a, 7, &expiring).await;
    let mut ours = Vec::new();
    for i in 0..6 {
        ours.push(take(&a, i, &short).await);
    }
    let stolen = take(&a, 6, &long).await;
    assert!(b.admin().unwrap().force_release(&name(6)).await.unwrap());
    let thief = take(&b, 6, &short).await;
    // The run-out row's lease ends (on the database too: its end is at most the TTL after
    // the acquire was sent, and the local view ends before it).
    sleep_until(run_out.valid_until + Duration::from_millis(300)).await;
    let mut leases: Vec<Arc<dyn Lease>> = ours.into_iter().map(|a| a.lease.into()).collect();
    leases.push(stolen.lease.into());
    leases.push(run_out.lease.into());
    let mut extends = JoinSet::new();
    for (i, lease) in leases.iter().enumerate() {
        let lease = lease.clone();
        extends.spawn(async move { (i, lease.extend(Duration::from_secs(10)).await) });
    }
    let mut answered = 0;
    while let Some(answer) = extends.join_next().await {
        answered += 1;
        match answer.unwrap() {
            (i, Ok(_)) => assert!(i < 6, "row {i} is not ours, yet was extended"),
            (i, Err(e)) => {
                assert!(i >= 6, "row {i} ours, yet not extended: {e}");
                assert!(matches!(e, Error::LockLost { .. }), "row {i}: {e}");
            }
        }
    }
    assert_eq!(answered, leases.len());
    let run_out_row = b.try_lock(&name(7), &short).await.unwrap();
    assert!(run_out_row.is_some(), "the run-out row was extended");
    // Past the 2.5 s leases as first taken: ours were extended, the other client's was not.
    sleep_until(thief.valid_until + Duration::from_millis(1_000)).await;
    for i in 0..6 {
        let taken = b.try_lock(&name(i), &short).await.unwrap();
        assert!(taken.is_none(), "row {i} extended, yet taken");
    }
    let theirs = a.try_lock(&name(6), &short).await.unwrap();
    assert!(
        theirs.is_some(),
        "the other client's row was extended by ours"
    );
    let err = thief
        .lease
        .extend(Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LockLost { .. }), "{err}");
    for lease in &leases[..6] {
        lease.release().await.unwrap();
    }
}

/// Two clients of one temporary SQLite file (kept while the directory lives).
async fn sqlite_pair() -> (tempfile::TempDir, Arc<dyn Backend>, Arc<dyn Backend>) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("locks.db").display());
    let a = SqliteLock::connect(&url).await.unwrap();
    let b = SqliteLock::connect(&url).await.unwrap();
    (dir, Arc::new(a), Arc::new(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_batch_extends_only_rows_ours_and_in_time() {
    let (_dir, a, b) = sqlite_pair().await;
    batch_extends_only_rows_ours_and_in_time(a, b).await;
}

/// A batch of extends carries names of any characters (the batch is one JSON parameter):
/// every row is extended, so another client still finds each name held past the TTL it was
/// taken with.
async fn batch_extends_names_of_any_characters(a: Arc<dyn Backend>, b: Arc<dyn Backend>) {
    let short = LockOptions::new().ttl(Duration::from_millis(1_500));
    let base = fresh_name("lockkit-sql-renewals/chars");
    let suffixes = [
        ":",
        "a:b:c",
        "\"q\"",
        "back\\slash",
        "new\nline\ttab",
        "é✓ 🔒",
        "{}[],",
    ];
    let names: Vec<LockName> = (suffixes.iter())
        .map(|s| LockName::new(&format!("{base}{s}")).unwrap())
        .collect();
    let mut leases: Vec<Arc<dyn Lease>> = Vec::new();
    let mut first_end = Instant::now() + Duration::from_secs(60);
    for name in &names {
        let taken = a.try_lock(name, &short).await.unwrap();
        let taken = taken.unwrap_or_else(|| panic!("{name:?}: not free"));
        first_end = first_end.min(taken.valid_until);
        leases.push(taken.lease.into());
    }
    let mut extends = JoinSet::new();
    for (i, lease) in leases.iter().enumerate() {
        let lease = lease.clone();
        extends.spawn(async move { (i, lease.extend(Duration::from_secs(10)).await) });
    }
    while let Some(answer) = extends.join_next().await {
        let (i, answer) = answer.unwrap();
        if let Err(e) = answer {
            panic!("{:?} not extended: {e}", names[i]);
        }
    }
    sleep_until(first_end + Duration::from_millis(800)).await;
    for name in &names {
        let taken = b.try_lock(name, &short).await.unwrap();
        assert!(taken.is_none(), "{name:?} extended, yet taken");
    }
    for lease in &leases {
        lease.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_batch_extends_names_of_any_characters() {
    let (_dir, a, b) = sqlite_pair().await;
    batch_extends_names_of_any_characters(a, b).await;
}

/// A burst of takes far larger than the pool, from the client that holds a guard: its
/// renewals must not wait behind every queued take (longer than the TTL) and be lost.
async fn a_burst_of_takes_does_not_starve_renewals(ours: Locks, theirs: Locks, tries: usize) {
    let ttl = Duration::from_secs(1);
    let base = fresh_name("lockkit-sql-renewals/burst");
    let (kept, busy) = (format!("{base}-kept"), format!("{base}-busy"));
    let guard = ours
        .acquire_with(&kept, &LockOptions::new().ttl(ttl))
        .await
        .unwrap();
    let other = theirs
        .acquire_with(&busy, &LockOptions::new().ttl(Duration::from_secs(60)))
        .await
        .unwrap();
    // `tries` takes queued at once, and each that ends replaced by another at the back of the
    // queue for two and a half TTLs: every renewal in that time meets a queue of about
    // `tries` takes, however fast the machine (a fixed number of tries ended within twice
    // the TTL on a quiet machine, and the test failed as too short).
    let started = Instant::now();
    let last_start = ttl * 5 / 2;
    let try_one = |burst: &mut JoinSet<_>| {
        let (ours, busy) = (ours.clone(), busy.clone());
        burst.spawn(async move { ours.try_acquire(&busy).await.map(|g| g.is_some()) });
    };
    let mut burst = JoinSet::new();
    for _ in 0..tries {
        try_one(&mut burst);
    }
    let (mut errors, mut done) = (0, 0);
    while let Some(tried) = burst.join_next().await {
        done += 1;
        match tried.unwrap() {
            Ok(taken) => assert!(!taken, "took a lock another client holds"),
            Err(_) => errors += 1,
        }
        if started.elapsed() < last_start {
            try_one(&mut burst);
        }
    }
    let took = started.elapsed();
    eprintln!("{done} tries in {took:?}, {errors} failed");
    assert!(
        guard.is_held(),
        "the guard was lost during the burst: {:?}",
        guard.lost_reason()
    );
    guard.release().await.expect("release after the burst");
    other.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_burst_of_takes_does_not_starve_renewals() {
    let _heavy = HEAVY.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("locks.db").display());
    let ours = Locks::new(SqliteLock::connect(&url).await.unwrap());
    let theirs = Locks::new(SqliteLock::connect(&url).await.unwrap());
    a_burst_of_takes_does_not_starve_renewals(ours, theirs, 20_000).await;
}

#[cfg(all(feature = "postgres", feature = "mysql"))]
mod servers {
    use std::sync::Arc;

    use lockkit_core::backend::Backend;
    use lockkit_core::Locks;
    use lockkit_sql::{MySqlLock, PgLock};
    use lockkit_testkit::{service_url, with_params};

    async fn clients(key: &str) -> (Arc<dyn Backend>, Arc<dyn Backend>) {
        let url = with_params(&service_url(key), "strategy=table");
        match key {
            "LOCKKIT_POSTGRES_URL" => (
                Arc::new(PgLock::connect(&url).await.unwrap()),
                Arc::new(PgLock::connect(&url).await.unwrap()),
            ),
            _ => (
                Arc::new(MySqlLock::connect(&url).await.unwrap()),
                Arc::new(MySqlLock::connect(&url).await.unwrap()),
            ),
        }
    }

    /// A small pool, so the burst is many times its size.
    async fn small_pool(key: &str) -> (Locks, Locks) {
        let url = with_params(&service_url(key), "strategy=table&max_connections=4");
        let connect = |url: String| async move {
            match key {
                "LOCKKIT_POSTGRES_URL" => Locks::new(PgLock::connect(&url).await.unwrap()),
                _ => Locks::new(MySqlLock::connect(&url).await.unwrap()),
            }
        };
        (connect(url.clone()).await, connect(url).await)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_a_burst_of_takes_does_not_starve_renewals() {
        let (ours, theirs) = small_pool("LOCKKIT_POSTGRES_URL").await;
        super::a_burst_of_takes_does_not_starve_renewals(ours, theirs, 8_000).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql_a_burst_of_takes_does_not_starve_renewals() {
        let (ours, theirs) = small_pool("LOCKKIT_MYSQL_URL").await;
        super::a_burst_of_takes_does_not_starve_renewals(ours, theirs, 5_000).await;
    }

    /// The two-client cases on one server, as `servers::<database>::<case>`.
    macro_rules! two_clients {
        ($database:ident, $key:literal) => {
            mod $database {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn batch_extends_only_rows_ours_and_in_time() {
                    let (a, b) = super::clients($key).await;
                    crate::batch_extends_only_rows_ours_and_in_time(a, b).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn batch_extends_names_of_any_characters() {
                    let (a, b) = super::clients($key).await;
                    crate::batch_extends_names_of_any_characters(a, b).await;
                }
            }
        };
    }

    two_clients!(postgres, "LOCKKIT_POSTGRES_URL");
    two_clients!(mysql, "LOCKKIT_MYSQL_URL");
}
