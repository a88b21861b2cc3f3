//! Options of the SQL backends, and reading them from a URL.

use std::time::Duration;

use lockkit_core::url::ServiceUrl;
use lockkit_core::{Error, Result};

use crate::dialect::{ConnectOptions, Dialect, Target};

/// How a database holds locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Strategy {
    /// Session advisory locks (`pg_advisory_lock`, MySQL `GET_LOCK`), many per session on
    /// connections the client keeps out of the pool. A lock dies with its session, so a
    /// crashed holder frees it at once; a holder that stops renewing, or cannot run
    /// (frozen), frees it at its TTL: the server ends a session silent for the longest TTL
    /// of its locks (`idle_session_timeout`, PostgreSQL 14+ only; MySQL `wait_timeout`).
    /// The default on PostgreSQL and MySQL; SQLite has none.
    #[default]
    Advisory,
    /// A lease table (`<prefix>locks`): one row per held lock, with its owner and expiry.
    /// The only strategy of SQLite; on servers, for setups where session locks do not fit,
    /// such as poolers in transaction mode.
    Table,
}

impl std::str::FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "advisory" => Ok(Strategy::Advisory),
            "table" => Ok(Strategy::Table),
            _ => Err("use `advisory` or `table`".into()),
        }
    }
}

/// Declares [`SqlOptions`]: each option unset until a setter (or the URL) sets it, and
/// the rule that one set in code wins over the URL's.
macro_rules! options {
    ($($(#[$doc:meta])* $name:ident: $ty:ty,)*) => {
        /// Options of [`SqlLock`](crate::SqlLock) (all three databases), set with the
        /// builder methods. Every option can also be given as a URL parameter of the same
        /// name (`?strategy=table&table_prefix=app_&max_poll=250ms`); **an option set here
        /// overrides the URL's**. The URL rejects parameters its database does not use;
        /// here they are ignored.
        #[derive(Debug, Clone, Default)]
        pub struct SqlOptions {
            $($name: Option<$ty>,)*
        }

        impl SqlOptions {
            $(
                $(#[$doc])*
                pub fn $name(mut self, value: impl Into<$ty>) -> Self {
                    self.$name = Some(value.into());
                    self
                }
            )*

            /// These options over `fallback`'s: each one set here wins.
            fn over(self, fallback: SqlOptions) -> SqlOptions {
                SqlOptions {
                    $($name: self.$name.or(fallback.$name),)*
                }
            }
        }
    };
}

options! {
    /// Advisory locks or the lease table (`strategy=`). Default: advisory where the
    /// database has them (PostgreSQL, MySQL), else the table.
    strategy: Strategy,
    /// Prefix of the tables lockkit uses (`<prefix>locks`, `<prefix>fences`, ...): up to
    /// 40 ASCII letters, digits and `_` (`table_prefix=`). Default `lockkit_`.
    table_prefix: String,
    /// Create the tables on connect (`auto_migrate=`). Off for users who forbid runtime
    /// DDL: then run `migrate()` once (or its SQL) ahead of time. Default on.
    auto_migrate: bool,
    /// Pool size (`max_connections=`). With advisory locks a connection holds up to 1000
    /// locks, and every concurrent acquisition or wait uses one. With lease tables, takes use
    /// all connections but one, which stays free for renewals and releases. Default 256 for
    /// advisory locks, 32 for a server's lease table, 4 for SQLite (1 for an in-memory
    /// database, whatever is set).
    max_connections: u32,
    /// How long to wait for a connection, to connect or from the pool
    /// (`acquire_timeout=`). Default 3 s; SQLite: its busy timeout.
    acquire_timeout: Duration,
    /// Advisory waits block on the server in slices of at most this long, so a cancelled
    /// wait lets go of its connection soon (`wait_slice=`). Default 1 s.
    wait_slice: Duration,
    /// Lease table: longest pause between re-checks when no release signal arrives
    /// (`max_poll=`). Default 1 s on PostgreSQL (which has `NOTIFY`), 100 ms on MySQL and
    /// SQLite.
    max_poll: Duration,
    /// SQLite: how long a statement waits for another connection's write lock
    /// (`busy_timeout=`). Default 5 s.
    busy_timeout: Duration,
    /// SQLite: `PRAGMA synchronous=FULL` (the default) makes every acquisition durable
    /// across power loss, so a fencing token is never handed out twice; `false` uses
    /// `NORMAL`, faster but a power cut may lose the last acquisitions (`durable=`).
    durable: bool,
}

/// The options of SQLite: the same type as the others'.
pub type SqliteOptions = SqlOptions;

impl SqlOptions {
    /// Default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads lockkit's own parameters of dialect `D` from `url`.
    fn from_url<D: Dialect>(url: &mut ServiceUrl) -> Result<Self> {
        let mut options = SqlOptions {
            strategy: url.take_parsed("strategy")?,
            table_prefix: url.take("table_prefix"),
            auto_migrate: url.take_bool("auto_migrate")?,
            max_connections: url.take_parsed("max_connections")?,
            acquire_timeout: url.take_duration("acquire_timeout")?,
            max_poll: url.take_duration("max_poll")?,
            ..SqlOptions::default()
        };
        if D::SERVER {
            options.wait_slice = url.take_duration("wait_slice")?;
        } else {
            options.busy_timeout = url.take_duration("busy_timeout")?;
            options.durable = url.take_bool("durable")?;
        }
        Ok(options)
    }
}

/// The longest timeout, wait slice or poll pause an option may set.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The options in effect, defaults filled in.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) strategy: Strategy,
    pub(crate) table_prefix: String,
    pub(crate) auto_migrate: bool,
    pub(crate) max_connections: u32,
    pub(crate) acquire_timeout: Duration,
    pub(crate) wait_slice: Duration,
    pub(crate) max_poll: Duration,
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) busy_timeout: Duration,
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) durable: bool,
}

/// The names lockkit takes from a URL of dialect `D`, for the unknown-parameter error.
fn known<D: Dialect>() -> Vec<&'static str> {
    let common = [
        "strategy",
        "table_prefix",
        "auto_migrate",
        "max_connections",
        "acquire_timeout",
        "max_poll",
    ];
    let own: &[&str] = match D::SERVER {
        true => &["wait_slice"],
        false => &["busy_timeout", "durable"],
    };
    let pass_through: Vec<_> = D::PASS_THROUGH.split(' ').collect();
    [&common[..], own, &pass_through].concat()
}

impl Settings {
    /// Reads `url` for dialect `D`, with `explicit` options over the URL's parameters.
    /// Returns the settings and the URL with lockkit's parameters taken, for the dialect to
    /// read its connect options from.
    pub(crate) fn resolve<D: Dialect>(
        url: &str,
        explicit: SqlOptions,
    ) -> Result<(Settings, ServiceUrl)> {
        let mut url = ServiceUrl::parse(url)?;
        url.expect_scheme(D::SCHEMES)?;
        let o = explicit.over(SqlOptions::from_url::<D>(&mut url)?);
        let strategy = o.strategy.unwrap_or(match D::SERVER {
            true => Strategy::Advisory,
            false => Strategy::Table,
        });
        if strategy == Strategy::Advisory && !D::SERVER {
            return Err(url.error(format_args!(
                "{} has no advisory locks: use strategy=table",
                D::NAME
            )));
        }
        let busy_timeout = o.busy_timeout.unwrap_or(Duration::from_secs(5));
        let settings = Settings {
            strategy,
            table_prefix: o.table_prefix.unwrap_or_else(|| "lockkit_".into()),
            auto_migrate: o.auto_migrate.unwrap_or(true),
            max_connections: o.max_connections.unwrap_or(match (strategy, D::SERVER) {
                (Strategy::Advisory, _) => 256,
                (Strategy::Table, true) => 32,
                (Strategy::Table, false) => 4,
            }),
            acquire_timeout: o.acquire_timeout.unwrap_or(match D::SERVER {
                true => Duration::from_secs(3),
                false => busy_timeout,
            }),
            wait_slice: o.wait_slice.unwrap_or(Duration::from_secs(1)),
            max_poll: o.max_poll.unwrap_or(D::MAX_POLL),
            busy_timeout,
            durable: o.durable.unwrap_or(true),
        };
        settings.check()?;
        Ok((settings, url))
    }

    /// Checks that `url` has no parameter left that neither lockkit nor the dialect took.
    pub(crate) fn finish<D: Dialect>(url: &ServiceUrl) -> Result<()> {
        url.finish(&known::<D>())
    }

    fn check(&self) -> Result<()> {
        let prefix = &self.table_prefix;
        if !(prefix.is_empty() || identifier(prefix, 40)) {
            return Err(Error::InvalidOptions(format!(
                "table prefix `{prefix}`: use up to 40 ASCII letters, digits and `_`"
            )));
        }
        // Longer ones overflow the clock arithmetic of sqlx and of the waits, or block a
        // cancelled wait's connection for that long.
        // The busy timeout first: it is SQLite's default acquire timeout.
        for (option, value) in [
            ("busy_timeout", self.busy_timeout),
            ("acquire_timeout", self.acquire_timeout),
            ("wait_slice", self.wait_slice),
            ("max_poll", self.max_poll),
        ] {
            if value > MAX_TIMEOUT {
                return Err(Error::InvalidOptions(format!(
                    "{option} {value:?} is above the limit of {MAX_TIMEOUT:?}"
                )));
            }
        }
        if self.acquire_timeout.is_zero() {
            return Err(Error::InvalidOptions(
                "acquire_timeout must be above 0".into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(Error::InvalidOptions(
                "max_connections must be above 0".into(),
            ));
        }
        Ok(())
    }
}

/// Whether `name` can be spliced into SQL as a table name (or part of one) on every
/// database: 1 to `max` ASCII letters, digits and `_`, not starting with a digit.
pub(crate) fn identifier(name: &str, max: usize) -> bool {
    (1..=max).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

/// A server's connect options (`scheme://user:password@host:port/database?…`), read by its
/// sqlx driver from a URL rebuilt from the parsed parts with the dialect's pass-through
/// parameters and nothing else, so the driver reads exactly what lockkit checked.
pub(crate) fn server_target<D: Dialect>(url: &mut ServiceUrl) -> Result<Target<D>> {
    let sqlx_url = server_url::<D>(url)?;
    let options = <ConnectOptions<D> as sqlx::ConnectOptions>::from_url(&sqlx_url)
        .map_err(|e| url.error(format_args!("{}: {e}", D::NAME)))?;
    let host = url.hosts().first().map(ToString::to_string);
    let database = format!("{}{}", host.clone().unwrap_or_default(), url.path());
    Ok(Target {
        options,
        address: Some(host.unwrap_or_else(|| "localhost".into())),
        database: Some(database),
    })
}

fn server_url<D: Dialect>(url: &mut ServiceUrl) -> Result<url::Url> {
    let host = match url.hosts() {
        [] => "localhost".to_string(),
        [one] => one.to_string(),
        _ => return Err(url.error(format_args!("{} takes one host", D::NAME))),
    };
    let mut out = url::Url::parse(&format!("{}://{host}", D::SCHEMES[0]))
        .map_err(|e| url.error(format_args!("cannot read the host: {e}")))?;
    let set = out
        .set_username(url.username().unwrap_or_default())
        .and_then(|()| out.set_password(url.password()));
    set.map_err(|()| url.error("cannot carry the user or password"))?;
    out.set_path(url.path());
    for key in D::PASS_THROUGH.split(' ') {
        if let Some(value) = url.take(key) {
            out.query_pairs_mut().append_pair(key, &value);
        }
    }
    Ok(out)
}

#[cfg(all(test, feature = "postgres"))]
mod tests {
    use super::*;
    use crate::dialect::Postgres;

    #[test]
    fn url_parameters_are_read_and_options_override_them() {
        let (s, mut url) = Settings::resolve::<Postgres>(
            "postgres://u:p%40ss@h:1/db?strategy=table&sslmode=disable&table_prefix=app_",
            SqlOptions::new().table_prefix("mine_"),
        )
        .unwrap();
        assert_eq!(s.strategy, Strategy::Table);
        assert_eq!(s.table_prefix, "mine_");
        let sqlx_url = server_url::<Postgres>(&mut url).unwrap();
        Settings::finish::<Postgres>(&url).unwrap();
        assert_eq!(
            sqlx_url.as_str(),
            "postgres://u:p%40ss@h:1/db?sslmode=disable"
        );
        for bad in [
            "postgres://h/db?strategy=magic",
            "postgres://h/db?table_prefix=x;drop",
            "mysql://h/db",
        ] {
            assert!(Settings::resolve::<Postgres>(bad, SqlOptions::new()).is_err());
        }
        let (_, mut url) =
            Settings::resolve::<Postgres>("postgres://h/db?colour=red", SqlOptions::new()).unwrap();
        server_url::<Postgres>(&mut url).unwrap();
        let err = Settings::finish::<Postgres>(&url).unwrap_err().to_string();
        assert!(err.contains("`colour`"), "{err}");
    }
}
