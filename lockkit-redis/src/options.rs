//! The options of the Redis backend, and what a `redis://`, `rediss://`, `redlock://` or
//! `redlocks://` URL says: the instances, and options of its own.

use std::time::Duration;

use lockkit_core::backend::Connect;
use lockkit_core::url::{HostPort, ServiceUrl};
use lockkit_core::{Error, Result};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, ProtocolVersion};

/// The key prefix when neither the options nor the URL set one.
const DEFAULT_PREFIX: &str = "lockkit:";

/// The port of a host that names none.
const DEFAULT_PORT: u16 = 6379;

/// The URL parameters the backend reads.
const PARAMS: &[&str] = &["prefix", UNSAFE_ALLOW_EVICTION];

/// The URL parameter (and option) that lets a client use servers that may evict keys.
pub(crate) const UNSAFE_ALLOW_EVICTION: &str = "unsafe_allow_eviction";

/// The longest timeout or poll interval accepted: longer ones are mistakes (and would
/// overflow deadline arithmetic at `Duration::MAX`).
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// The shortest `max_poll`: below it the fallback re-check is a busy loop on the server.
const MIN_POLL: Duration = Duration::from_millis(10);

/// Tuning of the Redis backend. Build with the chained setters; what is set here wins over
/// the URL's parameters.
///
/// ```
/// use std::time::Duration;
/// use lockkit_redis::RedisOptions;
///
/// let options = RedisOptions::new()
///     .prefix("app:")
///     .response_timeout(Duration::from_millis(500));
/// assert_eq!(options.prefix.as_deref(), Some("app:"));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisOptions {
    /// Prefix of every key and channel. `None` (the default): the URL's `prefix=`
    /// parameter, else `lockkit:`.
    pub prefix: Option<String>,
    /// Timeout of each connection attempt. Default 2 s; above zero, at most a day.
    pub connection_timeout: Duration,
    /// Timeout of each request to one instance. Default 1 s; above zero, at most a day. With
    /// RedLock, requests to the instances run in parallel, each with this timeout, capped at
    /// a tenth of the TTL.
    pub response_timeout: Duration,
    /// Share of the TTL assumed lost to clock drift between client and servers (the RedLock
    /// paper's factor); a guard's validity ends `ttl * drift_factor + 2 ms` early. Default
    /// 0.01; at least 0 and below 1.
    pub drift_factor: f64,
    /// Longest pause between re-checks of a busy lock when no release message arrives
    /// (messages can be lost during a reconnect), and longest wait of a leader observer
    /// ([`Admin::changed`](lockkit_core::backend::Admin::changed)) without a message.
    /// Default 1 s; from 10 ms to a day.
    pub max_poll: Duration,
    /// Accept servers whose `maxmemory-policy` may evict keys (anything but `noeviction`).
    /// `None` (the default): the URL's `unsafe_allow_eviction=` parameter, else `false`, and
    /// connecting to such a server fails. Eviction can delete a held lock's key (it has a
    /// TTL, so every `volatile-*` policy may pick it) and, under `allkeys-*`, the fence key:
    /// two holders at once, and tokens that rest on the server clock alone.
    pub unsafe_allow_eviction: Option<bool>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            prefix: None,
            connection_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(1),
            drift_factor: 0.01,
            max_poll: Duration::from_secs(1),
            unsafe_allow_eviction: None,
        }
    }
}

impl RedisOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the prefix of every key and channel (over the URL's `prefix=`).
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// Sets the timeout of each connection attempt.
    #[must_use]
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// Sets the timeout of each request to one instance.
    #[must_use]
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Sets the share of the TTL assumed lost to clock drift.
    #[must_use]
    pub fn drift_factor(mut self, factor: f64) -> Self {
        self.drift_factor = factor;
        self
    }

    /// Sets the longest pause between re-checks of a busy lock.
    #[must_use]
    pub fn max_poll(mut self, max_poll: Duration) -> Self {
        self.max_poll = max_poll;
        self
    }

    /// Accepts (`true`) or refuses (`false`) servers whose `maxmemory-policy` may evict keys,
    /// over the URL's `unsafe_allow_eviction=`. See [`RedisOptions::unsafe_allow_eviction`].
    #[must_use]
    pub fn unsafe_allow_eviction(mut self, allow: bool) -> Self {
        self.unsafe_allow_eviction = Some(allow);
        self
    }

    /// Checks the values: a drift factor in `[0, 1)`; timeouts above zero and at most a day;
    /// `max_poll` from 10 ms to a day. Values outside would panic in `Duration` arithmetic,
    /// make every request fail, or turn waiting into a busy loop.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.drift_factor) {
            return Err(Error::InvalidOptions(format!(
                "drift_factor must be at least 0 and below 1, not {}",
                self.drift_factor
            )));
        }
        for (field, value, min) in [
            (
                "connection_timeout",
                self.connection_timeout,
                Duration::from_nanos(1),
            ),
            (
                "response_timeout",
                self.response_timeout,
                Duration::from_nanos(1),
            ),
            ("max_poll", self.max_poll, MIN_POLL),
        ] {
            if value < min || value > MAX_DURATION {
                return Err(Error::InvalidOptions(format!(
                    "{field} must be from {min:?} to {MAX_DURATION:?}, not {value:?}"
                )));
            }
        }
        Ok(())
    }

    /// Whether servers that may evict keys are accepted.
    pub(crate) fn eviction_allowed(&self) -> bool {
        self.unsafe_allow_eviction.unwrap_or(false)
    }

    /// The key prefix in effect.
    pub(crate) fn key_prefix(&self) -> &str {
        self.prefix.as_deref().unwrap_or(DEFAULT_PREFIX)
    }

    /// Reads `url`: returns the instances it names, and completes these options with its
    /// parameters where they leave a field unset.
    pub(crate) fn apply_url(&mut self, url: &str) -> Result<Service> {
        // Without `//` (`scheme:opaque`) a mistyped `redis:user:pw@host` cannot be told from
        // a path, so no part of it is known to be safe to show: refuse it unseen.
        let opaque = || {
            Error::InvalidOptions(
                "invalid URL (not shown: it may hold a password): expected \
                 redis://[user:password@]host:port[/db], rediss://…, redlock://h1,h2,h3… or \
                 redlocks://…"
                    .into(),
            )
        };
        if !url.contains("://") {
            return Err(opaque());
        }
        let mut url = ServiceUrl::parse(url)?;
        if !url.has_authority() {
            return Err(opaque());
        }
        url.expect_scheme(<crate::RedisLock as Connect>::SCHEMES)?;
        let prefix = url.take("prefix");
        self.prefix = self.prefix.take().or(prefix);
        let allow = url.take_bool(UNSAFE_ALLOW_EVICTION)?;
        self.unsafe_allow_eviction = self.unsafe_allow_eviction.or(allow);
        url.finish(PARAMS)?;
        Service::from_url(&url)
    }
}

/// The instances a URL names, and whether they form a RedLock.
#[derive(Debug)]
pub(crate) struct Service {
    pub(crate) instances: Vec<Instance>,
    pub(crate) redlock: bool,
}

/// One instance: how the redis crate connects to it, and its `host:port` for messages
/// (never the password).
#[derive(Debug)]
pub(crate) struct Instance {
    pub(crate) info: ConnectionInfo,
    pub(crate) address: String,
}

impl Service {
    fn from_url(url: &ServiceUrl) -> Result<Service> {
        let (redlock, tls) = match url.scheme() {
            "redis" => (false, false),
            "rediss" => (false, true),
            "redlock" => (true, false),
            _ => (true, true),
        };
        if tls && !cfg!(feature = "tls") {
            return Err(Error::Unsupported(format!(
                "{}:// URLs need the cargo feature `tls` of lockkit-redis",
                url.scheme()
            )));
        }
        let hosts = url.expect_hosts()?;
        if !redlock && hosts.len() > 1 {
            return Err(url.error("several hosts: use redlock://h1,h2,… for RedLock"));
        }
        if redlock && hosts.len() < 3 {
            return Err(url.error("RedLock needs at least 3 independent instances"));
        }
        let db = match url.path().trim_matches('/') {
            "" => 0,
            db => db.parse().map_err(|_| {
                url.error(format_args!("the path `/{db}` is not a database number"))
            })?,
        };
        let instances = hosts
            .iter()
            .map(|host| Instance {
                info: connection_info(url, host, tls, db),
                address: host.to_string(),
            })
            .collect();
        Ok(Service { instances, redlock })
    }
}

/// What the redis crate needs to connect to `host`: the URL's credentials and database,
/// and RESP3, which subscriptions need (push messages).
fn connection_info(url: &ServiceUrl, host: &HostPort, tls: bool, db: i64) -> ConnectionInfo {
    // The redis crate wants IPv6 addresses without their brackets.
    let name = host.host.trim_start_matches('[').trim_end_matches(']');
    let (name, port) = (name.to_string(), host.port.unwrap_or(DEFAULT_PORT));
    let addr = if tls {
        ConnectionAddr::TcpTls {
            host: name,
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(name, port)
    };
    let mut settings = redis::RedisConnectionInfo::default()
        .set_db(db)
        .set_protocol(ProtocolVersion::RESP3);
    if let Some(user) = url.username() {
        settings = settings.set_username(user);
    }
    if let Some(password) = url.password() {
        settings = settings.set_password(password);
    }
    let info = addr
        .into_connection_info()
        .expect("an address always converts");
    info.set_redis_settings(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<(Service, RedisOptions)> {
        let mut options = RedisOptions::default();
        let service = options.apply_url(url)?;
        Ok((service, options))
    }

    #[test]
    fn single_instance() {
        let (s, o) = parse("redis://user:p%40w@127.0.0.1:16379/2?prefix=app:").unwrap();
        assert!(!s.redlock);
        assert_eq!(o.key_prefix(), "app:");
        assert_eq!(s.instances.len(), 1);
        let info = &s.instances[0].info;
        assert_eq!(info.addr(), &ConnectionAddr::Tcp("127.0.0.1".into(), 16379));
        let settings = info.redis_settings();
        assert_eq!(settings.db(), 2);
        assert_eq!(settings.username(), Some("user"));
        assert_eq!(settings.password(), Some("p@w"));
        assert_eq!(settings.protocol(), ProtocolVersion::RESP3);
        assert_eq!(s.instances[0].address, "127.0.0.1:16379");
    }

    #[test]
    fn redlock_instances_share_credentials_and_db() {
        let (s, o) = parse("redlock://:pw@a:1,b:2,[::1]/1").unwrap();
        assert!(s.redlock);
        assert_eq!(o.key_prefix(), DEFAULT_PREFIX);
        let addrs: Vec<_> = s.instances.iter().map(|i| i.info.addr().clone()).collect();
        assert_eq!(
            addrs,
            [
                ConnectionAddr::Tcp("a".into(), 1),
                ConnectionAddr::Tcp("b".into(), 2),
                ConnectionAddr::Tcp("::1".into(), DEFAULT_PORT),
            ]
        );
        for instance in &s.instances {
            let settings = instance.info.redis_settings();
            assert_eq!(
                (settings.username(), settings.password()),
                (None, Some("pw"))
            );
            assert_eq!(settings.db(), 1);
        }
    }

    #[test]
    fn explicit_options_win_over_the_url() {
        let mut options = RedisOptions::new().prefix("mine:");
        options.apply_url("redis://h:1?prefix=url:").unwrap();
        assert_eq!(options.key_prefix(), "mine:");
    }

    #[test]
    fn eviction_opt_out_from_the_url_or_the_options() {
        let (_, o) = parse("redis://h:1").unwrap();
        assert!(!o.eviction_allowed());
        let (_, o) = parse("redis://h:1?unsafe_allow_eviction=true").unwrap();
        assert!(o.eviction_allowed());
        let mut options = RedisOptions::new().unsafe_allow_eviction(false);
        options
            .apply_url("redis://h:1?unsafe_allow_eviction=true")
            .unwrap();
        assert!(!options.eviction_allowed(), "the options win over the URL");
        let mut options = RedisOptions::new().unsafe_allow_eviction(true);
        options.apply_url("redis://h:1").unwrap();
        assert!(options.eviction_allowed());
    }

    #[test]
    fn validate_accepts_the_edges_and_refuses_beyond() {
        let d = RedisOptions::new;
        let day = Duration::from_secs(24 * 3600);
        for good in [
            d(),
            d().drift_factor(0.0),
            d().drift_factor(0.999),
            d().connection_timeout(Duration::from_nanos(1)),
            d().response_timeout(day),
            d().max_poll(Duration::from_millis(10)),
            d().max_poll(day),
        ] {
            good.validate().unwrap();
        }
        for (field, bad) in [
            ("drift_factor", d().drift_factor(-0.0001)),
            ("drift_factor", d().drift_factor(f64::NAN)),
            ("drift_factor", d().drift_factor(1.0)),
            ("drift_factor", d().drift_factor(f64::NEG_INFINITY)),
            (
                "connection_timeout",
                d().connection_timeout(day + Duration::from_nanos(1)),
            ),
            ("response_timeout", d().response_timeout(Duration::ZERO)),
            ("max_poll", d().max_poll(Duration::from_millis(9))),
            ("max_poll", d().max_poll(Duration::MAX)),
        ] {
            match bad.validate() {
                Err(Error::InvalidOptions(msg)) => assert!(msg.contains(field), "{msg}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "redis://a:1,b:2",
            "redlock://a:1,b:2",
            "redlock://a:1,,c:3",
            "redis://a:1/db",
            "redis://a:1?colour=red",
            "http://x",
            "redis:x",
        ] {
            assert!(matches!(parse(bad), Err(Error::InvalidOptions(_))), "{bad}");
        }
        let err = parse("redis://u:s3cret@a:1?colour=red")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`colour`") && !err.contains("s3cret"), "{err}");
    }
}
