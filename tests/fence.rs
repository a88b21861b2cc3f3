//! The fence helpers against real servers (`target/services.env`, written by
//! `scripts/services up`): a stale token is rejected and the caller's write in that
//! transaction (SQL) or script (Redis) does not happen; equal and higher tokens are
//! accepted; concurrent writers with interleaved tokens leave the highest; bad table names,
//! resources and out-of-range tokens are typed errors. Tests are named `<backend>::<case>`:
//! `cargo test --all-features --test fence -- mysql::`.

use lockkit_testkit::fresh_name;

/// Writers in the concurrency cases.
const WRITERS: u64 = 32;

/// Tokens 1..=WRITERS in an interleaved order (13 is prime to 32): 14, 27, 8, 21, 2, ...
fn interleaved() -> Vec<u64> {
    (0..WRITERS).map(|i| (i * 13) % WRITERS + 1).collect()
}

/// A table name no other test, run or process uses.
#[allow(dead_code)]
fn fresh_table(prefix: &str) -> String {
    fresh_name(prefix).replace('/', "_")
}

/// A pool of the test server whose URL is `key`, and nothing else to keep.
#[allow(dead_code)]
async fn server_pool<DB: sqlx::Database>(
    key: &str,
) -> (sqlx::Pool<DB>, Box<dyn std::any::Any + Send + Sync>) {
    let url = lockkit_testkit::service_url(key);
    let pool = sqlx::Pool::<DB>::connect(&url).await.unwrap();
    (pool, Box::new(()))
}

/// The same cases on every SQL database: `$fence` is its fence type, `$db` its sqlx
/// database, `stale_snapshot_busy` whether a transaction that read before a newer commit
/// fails to write (SQLite), and `$pool` an async block giving a pool and what must outlive it.
#[allow(unused_macros)]
macro_rules! sql_fence_cases {
    ($fence:ty, $db:ty, stale_snapshot_busy: $stale_snapshot_busy:literal, $pool:expr) => {
        use std::sync::Arc;

        use lockkit::sql::fence::{FenceError, DEFAULT_FENCE_TABLE, MAX_SQL_TOKEN};
        use lockkit::FencingToken;

        use crate::{fresh_table, interleaved, WRITERS};

        type Fence = $fence;

        /// A pool of this database, and what must outlive it.
        async fn pool() -> (sqlx::Pool<$db>, Box<dyn std::any::Any + Send + Sync>) {
            $pool.await
        }

        /// A pool, a fence table and a one-row register `(id = 1, value)` of this test.
        struct Env {
            pool: sqlx::Pool<$db>,
            fence: Fence,
            data: String,
            resource: String,
            _keep: Box<dyn std::any::Any + Send + Sync>,
        }

        async fn env() -> Arc<Env> {
            let (pool, keep) = pool().await;
            let fence = Fence::with_table(&fresh_table("fence")).unwrap();
            fence.create(&pool).await.unwrap();
            // Twice: creating is idempotent.
            fence.create(&pool).await.unwrap();
            let data = fresh_table("register");
            sqlx::query(&format!(
                "CREATE TABLE {data} (id INTEGER PRIMARY KEY, value BIGINT NOT NULL)"
            ))
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query(&format!("INSERT INTO {data} (id, value) VALUES (1, 0)"))
                .execute(&pool)
                .await
                .unwrap();
            Arc::new(Env {
                pool,
                fence,
                data,
                resource: lockkit_testkit::fresh_name("register"),
                _keep: keep,
            })
        }

        impl Env {
            /// The register's value, read outside any transaction.
            async fn value(&self) -> i64 {
                sqlx::query_scalar(&format!("SELECT value FROM {} WHERE id = 1", self.data))
                    .fetch_one(&self.pool)
                    .await
                    .unwrap()
            }

            /// One fenced operation, as a holder does it: the check, then read the register
            /// and write `token` into it, in one transaction, run again on a retryable
            /// error. The value read, or the fence's error (the transaction rolled back).
            async fn write(&self, token: u64) -> Result<i64, FenceError> {
                for _ in 0..100 {
                    let mut tx = self.pool.begin().await.unwrap();
                    match self
                        .fence
                        .check(&mut tx, &self.resource, FencingToken(token))
                        .await
                    {
                        Ok(()) => {}
                        Err(e) if e.is_retryable() => continue,
                        Err(e) => return Err(e),
                    }
                    let seen: i64 = sqlx::query_scalar(&format!(
                        "SELECT value FROM {} WHERE id = 1",
                        self.data
                    ))
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
                    sqlx::query(&format!(
                        "UPDATE {} SET value = {token} WHERE id = 1",
                        self.data
                    ))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                    tx.commit().await.unwrap();
                    return Ok(seen);
                }
                panic!("token {token}: 100 retryable errors in a row")
            }

            async fn drop_tables(&self) {
                for table in [self.fence.table(), &self.data] {
                    sqlx::query(&format!("DROP TABLE {table}"))
                        .execute(&self.pool)
                        .await
                        .unwrap();
                }
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn stale_token_rolls_back_the_write() {
            let env = env().await;
            assert_eq!(env.write(10).await.unwrap(), 0);
            // The write first, then the check: the error alone keeps the write out, once
            // the transaction is dropped.
            let mut tx = env.pool.begin().await.unwrap();
            sqlx::query(&format!("UPDATE {} SET value = 9 WHERE id = 1", env.data))
                .execute(&mut *tx)
                .await
                .unwrap();
            let err = env
                .fence
                .check(&mut tx, &env.resource, FencingToken(9))
                .await
                .unwrap_err();
            assert!(
                matches!(&err, FenceError::Stale { resource, presented: 9, highest: 10 }
                    if *resource == env.resource),
                "{err:?}"
            );
            assert!(err.is_stale() && !err.is_retryable());
            assert!(err.to_string().contains("stale fencing token 9"), "{err}");
            drop(tx);
            assert_eq!(env.value().await, 10);
            // The check first, as the docs say: rejected before the read.
            assert!(env.write(9).await.unwrap_err().is_stale());
            assert!(env.write(1).await.unwrap_err().is_stale());
            assert_eq!(env.value().await, 10);
            env.drop_tables().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn equal_and_higher_tokens_are_accepted() {
            let env = env().await;
            assert_eq!(env.write(5).await.unwrap(), 0);
            // The same holder again.
            assert_eq!(env.write(5).await.unwrap(), 5);
            assert_eq!(env.write(6).await.unwrap(), 5);
            // Far higher: tokens need not be consecutive (Redis's are microseconds).
            assert_eq!(env.write(1 << 51).await.unwrap(), 6);
            let err = env.write(6).await.unwrap_err();
            assert!(
                matches!(err, FenceError::Stale { presented: 6, highest, .. } if highest == 1 << 51),
                "{err:?}"
            );
            assert_eq!(env.value().await, 1 << 51);
            // Resources are fenced apart: another one starts from nothing.
            let mut tx = env.pool.begin().await.unwrap();
            env.fence
                .check(&mut tx, "another resource", FencingToken(1))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            env.drop_tables().await;
        }

        /// A transaction that read before its check (MySQL's REPEATABLE READ snapshot
        /// then predates the newer holder's commit) must still meet the newest token, not
        /// the one its snapshot shows.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn an_older_snapshot_does_not_hide_a_newer_token() {
            let env = env().await;
            env.write(5).await.unwrap();
            let mut old = env.pool.begin().await.unwrap();
            let seen: i64 = sqlx::query_scalar(&format!(
                "SELECT token FROM {} WHERE resource = '{}'",
                env.fence.table(),
                env.resource
            ))
            .fetch_one(&mut *old)
            .await
            .unwrap();
            assert_eq!(seen, 5);
            env.write(10).await.unwrap();
            match env.fence.check(&mut old, &env.resource, FencingToken(9)).await {
                Err(FenceError::Stale { highest: 10, .. }) => {}
                // SQLite cannot turn a read transaction whose snapshot is out of date into a
                // write one: SQLITE_BUSY_SNAPSHOT, retryable; run again, it is stale.
                Err(e) if $stale_snapshot_busy && e.is_retryable() => {
                    drop(old);
                    assert!(env.write(9).await.unwrap_err().is_stale());
                    return env.drop_tables().await;
                }
                other => panic!("{other:?}"),
            }
            drop(old);
            assert_eq!(env.value().await, 10);
            env.drop_tables().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn concurrent_writers_leave_the_highest() {
            let env = env().await;
            let mut writers = tokio::task::JoinSet::new();
            for token in interleaved() {
                let env = env.clone();
                writers.spawn(async move { (token, env.write(token).await) });
            }
            let (mut accepted, mut stale) = (0, 0);
            while let Some(done) = writers.join_next().await {
                match done.unwrap() {
                    // Every accepted writer read a value no higher than its own token: no
                    // lower token was accepted after a higher one.
                    (token, Ok(seen)) => {
                        assert!(seen <= token as i64, "token {token} read {seen}");
                        accepted += 1;
                    }
                    (token, Err(FenceError::Stale { presented, highest, .. })) => {
                        assert_eq!(presented, token);
                        assert!(highest > token, "{token} refused for {highest}");
                        stale += 1;
                    }
                    (token, Err(e)) => panic!("token {token}: {e:?}"),
                }
            }
            assert_eq!(accepted + stale, WRITERS);
            assert!(accepted >= 1);
            assert_eq!(env.value().await, WRITERS as i64);
            let err = env.write(WRITERS - 1).await.unwrap_err();
            assert!(
                matches!(err, FenceError::Stale { highest, .. } if highest == WRITERS),
                "{err:?}"
            );
            env.drop_tables().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn bad_table_names_are_rejected() {
            assert_eq!(Fence::new().table(), DEFAULT_FENCE_TABLE);
            let long = "f".repeat(64);
            for bad in [
                "",
                "1fence",
                "fence-x",
                "fence x",
                "fence;DROP TABLE x",
                "public.fence",
                "\"fence\"",
                "fénce",
                "fence\0",
                &long,
            ] {
                let err = Fence::with_table(bad).unwrap_err();
                assert!(matches!(err, FenceError::InvalidTable(_)), "{bad:?}: {err:?}");
            }
            // The longest name every database takes (PostgreSQL: 63 bytes) works.
            let (pool, _keep) = pool().await;
            let name = fresh_table("f");
            let name = format!("{name}{}", "x".repeat(63 - name.len()));
            let fence = Fence::with_table(&name).unwrap();
            fence.create(&pool).await.unwrap();
            let mut conn = pool.acquire().await.unwrap();
            fence.check(&mut conn, "r", FencingToken(1)).await.unwrap();
            sqlx::query(&format!("DROP TABLE {name}"))
                .execute(&pool)
                .await
                .unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn tokens_above_i64_max_are_rejected() {
            let env = env().await;
            let mut tx = env.pool.begin().await.unwrap();
            for token in [MAX_SQL_TOKEN + 1, u64::MAX] {
                let err = env
                    .fence
                    .check(&mut tx, &env.resource, FencingToken(token))
                    .await
                    .unwrap_err();
                assert!(
                    matches!(err, FenceError::TokenOutOfRange { token: t, max } if t == token && max == i64::MAX as u64),
                    "{err:?}"
                );
            }
            // The largest that fits is stored exactly: nothing below it passes any more.
            env.fence
                .check(&mut tx, &env.resource, FencingToken(MAX_SQL_TOKEN))
                .await
                .unwrap();
            let err = env
                .fence
                .check(&mut tx, &env.resource, FencingToken(MAX_SQL_TOKEN - 1))
                .await
                .unwrap_err();
            assert!(
                matches!(err, FenceError::Stale { highest: MAX_SQL_TOKEN, .. }),
                "{err:?}"
            );
            drop(tx);
            env.drop_tables().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn bad_resources_are_rejected() {
            let env = env().await;
            let mut tx = env.pool.begin().await.unwrap();
            let long = "r".repeat(256);
            for bad in ["", "a\0b", &long] {
                let err = env
                    .fence
                    .check(&mut tx, bad, FencingToken(1))
                    .await
                    .unwrap_err();
                assert!(matches!(err, FenceError::InvalidResource { .. }), "{err:?}");
            }
            // 255 bytes, any characters: taken, and compared byte for byte.
            for good in ["r".repeat(255), "Stock/SKU-42 ü".into(), "stock/sku-42 ü".into()] {
                env.fence
                    .check(&mut tx, &good, FencingToken(7))
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
            let mut tx = env.pool.begin().await.unwrap();
            let err = env
                .fence
                .check(&mut tx, "Stock/SKU-42 ü", FencingToken(6))
                .await
                .unwrap_err();
            assert!(err.is_stale(), "{err:?}");
            drop(tx);
            env.drop_tables().await;
        }
    };
}

#[cfg(feature = "sqlite")]
mod sqlite {
    sql_fence_cases!(lockkit::sql::SqliteFence, sqlx::Sqlite, stale_snapshot_busy: true, async {
        use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("shop.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .unwrap();
        (pool, Box::new(dir) as Box<dyn std::any::Any + Send + Sync>)
    });
}

#[cfg(feature = "postgres")]
mod postgres {
    sql_fence_cases!(
        lockkit::sql::PgFence,
        sqlx::Postgres,
        stale_snapshot_busy: false,
        crate::server_pool("LOCKKIT_POSTGRES_URL")
    );
}

#[cfg(feature = "mysql")]
mod mysql {
    sql_fence_cases!(
        lockkit::sql::MySqlFence,
        sqlx::MySql,
        stale_snapshot_busy: false,
        crate::server_pool("LOCKKIT_MYSQL_URL")
    );
}

#[cfg(feature = "redis")]
mod redis {
    use lockkit::redis::fence::{FenceError, RedisFence, DEFAULT_FENCE_PREFIX};
    use lockkit::redis::redis::aio::MultiplexedConnection;
    use lockkit::redis::redis::{self as client, AsyncCommands};
    use lockkit::FencingToken;
    use lockkit_testkit::{fresh_name, service_url};

    use crate::{interleaved, WRITERS};

    async fn conn() -> MultiplexedConnection {
        client::Client::open(service_url("LOCKKIT_REDIS_URL"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// A resource and a data key of this test.
    fn names() -> (String, String) {
        (fresh_name("register"), fresh_name("data"))
    }

    fn stale(err: &FenceError, presented: u64, highest: u64) -> bool {
        matches!(err, FenceError::Stale { presented: p, highest: h, .. } if *p == presented && *h == highest)
    }

    #[tokio::test]
    async fn stale_token_is_rejected_and_not_applied() {
        let (mut conn, fence) = (conn().await, RedisFence::new());
        let (res, key) = names();
        fence
            .set(&mut conn, &res, FencingToken(10), &key, "ten")
            .await
            .unwrap();
        let err = fence
            .set(&mut conn, &res, FencingToken(9), &key, "nine")
            .await
            .unwrap_err();
        assert!(stale(&err, 9, 10) && err.is_stale(), "{err:?}");
        assert!(err.to_string().contains("stale fencing token 9"), "{err}");
        // Reads are fenced too.
        let err = fence
            .get::<_, String>(&mut conn, &res, FencingToken(9), &key)
            .await
            .unwrap_err();
        assert!(stale(&err, 9, 10), "{err:?}");
        let err = fence
            .check(&mut conn, &res, FencingToken(1))
            .await
            .unwrap_err();
        assert!(stale(&err, 1, 10), "{err:?}");
        // The stale operations did nothing: the value and the fence are as token 10 left them.
        let value: String = conn.get(&key).await.unwrap();
        assert_eq!(value, "ten");
        let seen: String = conn.get(fence.fence_key(&res)).await.unwrap();
        assert_eq!(seen, "10");
        assert_eq!(
            fence.fence_key(&res),
            format!("{DEFAULT_FENCE_PREFIX}{res}")
        );
        // Counters: a stale INCRBY/DECRBY changes nothing either.
        let counter = fresh_name("counter");
        assert_eq!(
            fence
                .incr_by(&mut conn, &res, FencingToken(10), &counter, 5)
                .await
                .unwrap(),
            5
        );
        let err = fence
            .decr_by(&mut conn, &res, FencingToken(9), &counter, 1)
            .await
            .unwrap_err();
        assert!(stale(&err, 9, 10), "{err:?}");
        let err = fence
            .incr_by(&mut conn, &res, FencingToken(9), &counter, 1)
            .await
            .unwrap_err();
        assert!(stale(&err, 9, 10), "{err:?}");
        let units: i64 = conn.get(&counter).await.unwrap();
        assert_eq!(units, 5);
        let _: () = conn
            .del(&[&key, &counter, &fence.fence_key(&res)])
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn equal_and_higher_tokens_are_accepted() {
        let (mut conn, fence) = (conn().await, RedisFence::with_prefix("test:fence:"));
        let (res, key) = names();
        assert_eq!(
            fence
                .get::<_, String>(&mut conn, &res, FencingToken(5), &key)
                .await
                .unwrap(),
            None
        );
        fence
            .set(&mut conn, &res, FencingToken(5), &key, 50)
            .await
            .unwrap();
        // The same holder again, then a higher one.
        assert_eq!(
            fence
                .decr_by(&mut conn, &res, FencingToken(5), &key, 1)
                .await
                .unwrap(),
            49
        );
        assert_eq!(
            fence
                .get::<_, i64>(&mut conn, &res, FencingToken(6), &key)
                .await
                .unwrap(),
            Some(49)
        );
        // Decimal strings of different lengths compare as numbers, not as text ("9" > "10").
        fence
            .check(&mut conn, &res, FencingToken(10))
            .await
            .unwrap();
        assert!(stale(
            &fence
                .check(&mut conn, &res, FencingToken(9))
                .await
                .unwrap_err(),
            9,
            10
        ));
        let seen: String = conn.get(fence.fence_key(&res)).await.unwrap();
        assert_eq!(seen, "10");
        assert!(fence.fence_key(&res).starts_with("test:fence:"));
        let _: () = conn.del(&[&key, &fence.fence_key(&res)]).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_leave_the_highest() {
        let fence = RedisFence::new();
        let (res, key) = names();
        let mut writers = tokio::task::JoinSet::new();
        for token in interleaved() {
            let (fence, res, key) = (fence.clone(), res.clone(), key.clone());
            writers.spawn(async move {
                let mut conn = conn().await;
                let token = FencingToken(token);
                // Read, then write, each fenced: a writer that read must not see a higher
                // token's value and still write.
                let seen = fence.get::<_, u64>(&mut conn, &res, token, &key).await?;
                assert!(seen.unwrap_or(0) <= token.get(), "{token} read {seen:?}");
                fence.set(&mut conn, &res, token, &key, token.get()).await?;
                Ok::<_, FenceError>(token.get())
            });
        }
        let (mut accepted, mut rejected) = (0, 0);
        while let Some(done) = writers.join_next().await {
            match done.unwrap() {
                Ok(_) => accepted += 1,
                Err(FenceError::Stale {
                    presented, highest, ..
                }) => {
                    assert!(highest > presented, "{presented} refused for {highest}");
                    rejected += 1;
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        assert_eq!(accepted + rejected, WRITERS);
        let mut conn = conn().await;
        let value: u64 = conn.get(&key).await.unwrap();
        assert_eq!(value, WRITERS);
        let seen: u64 = conn.get(fence.fence_key(&res)).await.unwrap();
        assert_eq!(seen, WRITERS);
        let _: () = conn.del(&[&key, &fence.fence_key(&res)]).await.unwrap();
    }

    /// Tokens past 2^53, where Lua's doubles round (2^53 + 1 reads as 2^53), up to
    /// `u64::MAX`, are compared exactly.
    #[tokio::test]
    async fn tokens_past_two_to_the_53_compare_exactly() {
        let (mut conn, fence) = (conn().await, RedisFence::new());
        let (res, _) = names();
        let big = (1u64 << 53) + 1;
        fence
            .check(&mut conn, &res, FencingToken(big))
            .await
            .unwrap();
        let err = fence
            .check(&mut conn, &res, FencingToken(1 << 53))
            .await
            .unwrap_err();
        assert!(stale(&err, 1 << 53, big), "{err:?}");
        fence
            .check(&mut conn, &res, FencingToken(u64::MAX))
            .await
            .unwrap();
        let err = fence
            .check(&mut conn, &res, FencingToken(u64::MAX - 1))
            .await
            .unwrap_err();
        assert!(stale(&err, u64::MAX - 1, u64::MAX), "{err:?}");
        let _: () = conn.del(fence.fence_key(&res)).await.unwrap();
    }

    #[tokio::test]
    async fn bad_input_is_a_typed_error() {
        let (mut conn, fence) = (conn().await, RedisFence::new());
        let err = fence
            .check(&mut conn, "", FencingToken(1))
            .await
            .unwrap_err();
        assert!(matches!(err, FenceError::InvalidResource { .. }), "{err:?}");
        // A fence key someone else wrote: an error, not a comparison with garbage.
        let (res, key) = names();
        let _: () = conn
            .set(fence.fence_key(&res), "not a token")
            .await
            .unwrap();
        let err = fence
            .set(&mut conn, &res, FencingToken(1), &key, "x")
            .await
            .unwrap_err();
        assert!(
            matches!(&err, FenceError::Redis(_)) && err.to_string().contains("holds no token"),
            "{err:?}"
        );
        let exists: bool = conn.exists(&key).await.unwrap();
        assert!(!exists);
        // A data key of the wrong type: Redis's error; the fence is not raised for it.
        let counter = fresh_name("counter");
        let _: () = conn.set(&counter, "not a number").await.unwrap();
        let res2 = fresh_name("register");
        let err = fence
            .incr_by(&mut conn, &res2, FencingToken(3), &counter, 1)
            .await
            .unwrap_err();
        assert!(matches!(err, FenceError::Redis(_)), "{err:?}");
        let raised: bool = conn.exists(fence.fence_key(&res2)).await.unwrap();
        assert!(!raised);
        let _: () = conn.del(&[fence.fence_key(&res), counter]).await.unwrap();
    }
}
