//! Stand-in for the public fence helper (lockkit-sql's `fence` module, being written in
//! parallel): the token check inside the caller's transaction, against a fence table.

use sqlx::{Sqlite, Transaction};

/// Creates the fence table if missing.
pub async fn setup(tx: &mut Transaction<'_, Sqlite>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS lockkit_fence (resource TEXT PRIMARY KEY, token INTEGER NOT NULL)",
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Raises the resource's fence to `token` unless a higher token was seen; `false` = stale.
pub async fn check(
    tx: &mut Transaction<'_, Sqlite>,
    resource: &str,
    token: u64,
) -> Result<bool, sqlx::Error> {
    let token = token as i64;
    let done = sqlx::query(
        "INSERT INTO lockkit_fence (resource, token) VALUES (?1, ?2) \
         ON CONFLICT (resource) DO UPDATE SET token = excluded.token WHERE token <= excluded.token",
    )
    .bind(resource)
    .bind(token)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}
