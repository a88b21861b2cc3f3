//! Options shared by the PostgreSQL and MySQL backends.

use std::time::Duration;

use lockkit_core::{Error, Result};

/// How a server database holds locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Strategy {
    /// Session advisory locks (`pg_advisory_lock`, MySQL `GET_LOCK`), each on a connection
    /// held for the guard's life. The lock dies with the session, so a crashed holder frees
    /// it at once; a holder that stops renewing frees it at its TTL. The default.
    #[default]
    Advisory,
    /// A lease table (`<prefix>locks`), as the SQLite backend uses: for setups where session
    /// locks do not fit, such as poolers in transaction mode.
    Table,
}

/// Tuning of the PostgreSQL and MySQL backends. URL parameters `strategy=advisory|table`
/// and `table_prefix=` override the matching fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SqlOptions {
    /// Advisory locks or the lease table.
    pub strategy: Strategy,
    /// Prefix of the tables lockkit uses (`<prefix>fences`, `<prefix>locks`, ...): ASCII
    /// letters, digits and `_`. Default `lockkit_`.
    pub table_prefix: String,
    /// Create the tables on connect. Off for users who forbid runtime DDL: then run
    /// `migrate()` once (or its SQL) ahead of time. Default on.
    pub auto_migrate: bool,
    /// Pool size. With advisory locks every held or waiting guard uses one connection.
    /// Default 256 for advisory locks, 32 for the lease table.
    pub max_connections: Option<u32>,
    /// How long to wait for a connection (connect or pool). Default 3 s.
    pub acquire_timeout: Duration,
    /// Advisory waits block on the server in slices of at most this long, so a cancelled
    /// wait lets go of its connection soon. Default 1 s.
    pub wait_slice: Duration,
    /// Lease table: longest pause between re-checks when no release signal arrives.
    /// Default 1 s with `NOTIFY` (PostgreSQL), 100 ms without (MySQL).
    pub max_poll: Option<Duration>,
}

impl Default for SqlOptions {
    fn default() -> Self {
        SqlOptions {
            strategy: Strategy::Advisory,
            table_prefix: "lockkit_".into(),
            auto_migrate: true,
            max_connections: None,
            acquire_timeout: Duration::from_secs(3),
            wait_slice: Duration::from_secs(1),
            max_poll: None,
        }
    }
}

impl SqlOptions {
    /// The pool size in effect.
    pub(crate) fn pool_size(&self) -> u32 {
        self.max_connections.unwrap_or(match self.strategy {
            Strategy::Advisory => 256,
            Strategy::Table => 32,
        })
    }

    /// Takes lockkit's own parameters out of `url`, applying them; returns the URL for sqlx.
    pub(crate) fn apply_url(&mut self, url: &str) -> Result<String> {
        let Some((base, query)) = url.split_once('?') else {
            return Ok(url.to_string());
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("strategy", "advisory")) => self.strategy = Strategy::Advisory,
                Some(("strategy", "table")) => self.strategy = Strategy::Table,
                Some(("strategy", other)) => {
                    return Err(Error::InvalidOptions(format!(
                        "strategy `{other}`: use `advisory` or `table`"
                    )))
                }
                Some(("table_prefix", prefix)) => self.table_prefix = prefix.to_string(),
                _ => kept.push(pair),
            }
        }
        self.check()?;
        Ok(if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        })
    }

    pub(crate) fn check(&self) -> Result<()> {
        let prefix = &self.table_prefix;
        let valid = prefix.len() <= 40
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !prefix.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(Error::InvalidOptions(format!(
                "table prefix `{prefix}`: use up to 40 ASCII letters, digits and `_`"
            )));
        }
        if self.max_connections == Some(0) {
            return Err(Error::InvalidOptions(
                "max_connections must be above 0".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_are_taken_out() {
        let mut o = SqlOptions::default();
        let url = o
            .apply_url("postgres://u:p@h:1/db?strategy=table&sslmode=disable&table_prefix=app_")
            .unwrap();
        assert_eq!(url, "postgres://u:p@h:1/db?sslmode=disable");
        assert_eq!(o.strategy, Strategy::Table);
        assert_eq!(o.table_prefix, "app_");
        assert!(SqlOptions::default()
            .apply_url("mysql://h/db?strategy=magic")
            .is_err());
        assert!(SqlOptions::default()
            .apply_url("mysql://h/db?table_prefix=x;drop")
            .is_err());
    }
}
