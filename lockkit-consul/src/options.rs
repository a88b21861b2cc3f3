//! The backend's options, and how they combine with a `consul://` URL.

use std::fmt;
use std::time::Duration;

use lockkit_core::backend::Connect;
use lockkit_core::url::ServiceUrl;
use lockkit_core::{Error, Result};

/// What Consul does with a held key when the session holding it is invalidated (TTL
/// expired, or destroyed; lockkit's sessions have no health checks, so a failing node does
/// not invalidate them). An explicit release always only releases the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Behavior {
    /// Delete the key (the default): nothing is left behind by a crashed holder.
    #[default]
    Delete,
    /// Release the key and keep it (Consul's own default).
    Release,
}

impl Behavior {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Behavior::Delete => "delete",
            Behavior::Release => "release",
        }
    }
}

/// The longest lock-delay Consul accepts.
const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);

/// The longest connect or request timeout taken: longer ones are mistakes (and
/// `Duration::MAX` would overflow deadline arithmetic).
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// The longest wait of one blocking query: Consul itself caps `wait=` at 10 minutes.
const MAX_BLOCKING_WAIT: Duration = Duration::from_secs(600);

/// The URL parameters the backend takes (`behaviour` is accepted for `behavior`).
const PARAMS: &[&str] = &[
    "token",
    "dc",
    "behavior",
    "lock_delay",
    "connect_timeout",
    "request_timeout",
    "max_blocking_wait",
];

/// Tuning of the Consul backend. Every setting is optional here: one set on these options
/// (with its setter) wins over the URL's parameter of the same meaning, which wins over the
/// default. [`ConsulLock::options`](crate::ConsulLock::options) shows every setting in use.
///
/// ```
/// use std::time::Duration;
/// use lockkit_consul::{Behavior, ConsulOptions};
///
/// let options = ConsulOptions::new()
///     .behavior(Behavior::Release)
///     .lock_delay(Duration::from_secs(15));
/// assert_eq!(options.lock_delay, Some(Duration::from_secs(15)));
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsulOptions {
    /// KV prefix of every lock key (URL: the path). Default `lockkit`.
    pub prefix: Option<String>,
    /// Datacenter to use (URL `dc=`). Default: the agent's.
    pub datacenter: Option<String>,
    /// The sessions' invalidation behavior (URL `behavior=delete|release`). Default
    /// [`Behavior::Delete`].
    pub behavior: Option<Behavior>,
    /// The sessions' lock-delay, at most 60 s (URL `lock_delay=`, e.g. `15s`): after a
    /// session holding a lock is *invalidated* (not after an explicit release), Consul
    /// refuses to hand that lock to anyone for this long. Default 0 here; note that Consul's
    /// own default is 15 s. Sessions carry no health checks, so invalidation means the TTL
    /// lapsed (the holder has already given the lock up by then) or someone destroyed the
    /// session; a lock-delay covers the holder in the second case.
    pub lock_delay: Option<Duration>,
    /// Timeout of each TCP connection attempt (URL `connect_timeout=`): more than 0, at
    /// most 1 h. Default 2 s.
    pub connect_timeout: Option<Duration>,
    /// Timeout of each request that is not a blocking query (URL `request_timeout=`): more
    /// than 0, at most 1 h. Default 5 s.
    pub request_timeout: Option<Duration>,
    /// Longest wait of one blocking query while waiting for a lock (URL
    /// `max_blocking_wait=`): more than 0, at most 10 min (Consul's own limit). Waits end
    /// earlier at the caller's deadline; shorter values re-check more often, down to once a
    /// second. Default 5 s.
    pub max_blocking_wait: Option<Duration>,
    /// The ACL token (URL `token=`), sent as `X-Consul-Token`. Never shown.
    token: Option<String>,
}

impl fmt::Debug for ConsulOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulOptions")
            .field("prefix", &self.prefix)
            .field("datacenter", &self.datacenter)
            .field("behavior", &self.behavior)
            .field("lock_delay", &self.lock_delay)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_blocking_wait", &self.max_blocking_wait)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ConsulOptions {
    /// No setting made: the URL's parameters and the defaults apply.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the KV prefix of every lock key: `[A-Za-z0-9-_.]` segments separated by `/`.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// Sets the datacenter.
    #[must_use]
    pub fn datacenter(mut self, datacenter: impl Into<String>) -> Self {
        self.datacenter = Some(datacenter.into());
        self
    }

    /// Sets what Consul does with a held key when its session is invalidated.
    #[must_use]
    pub fn behavior(mut self, behavior: Behavior) -> Self {
        self.behavior = Some(behavior);
        self
    }

    /// Sets the sessions' lock-delay (at most 60 s).
    #[must_use]
    pub fn lock_delay(mut self, lock_delay: Duration) -> Self {
        self.lock_delay = Some(lock_delay);
        self
    }

    /// Sets the timeout of each TCP connection attempt.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Sets the timeout of each request that is not a blocking query.
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// Sets the longest wait of one blocking query while waiting for a lock.
    #[must_use]
    pub fn max_blocking_wait(mut self, wait: Duration) -> Self {
        self.max_blocking_wait = Some(wait);
        self
    }

    /// Sets the ACL token. It is sent as `X-Consul-Token` and never shown in `Debug` output,
    /// logs or errors.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Fills every unset field from `other`.
    fn or(self, other: ConsulOptions) -> ConsulOptions {
        ConsulOptions {
            prefix: self.prefix.or(other.prefix),
            datacenter: self.datacenter.or(other.datacenter),
            behavior: self.behavior.or(other.behavior),
            lock_delay: self.lock_delay.or(other.lock_delay),
            connect_timeout: self.connect_timeout.or(other.connect_timeout),
            request_timeout: self.request_timeout.or(other.request_timeout),
            max_blocking_wait: self.max_blocking_wait.or(other.max_blocking_wait),
            token: self.token.or(other.token),
        }
    }

    /// The settings in use for `url`: these options, then the URL's parameters, then the
    /// defaults.
    pub(crate) fn resolve(self, url: &str) -> Result<Settings> {
        let (address, from_url) = parse_url(url)?;
        let options = self.or(from_url);
        let settings = Settings {
            address,
            prefix: options.prefix.unwrap_or_else(|| "lockkit".into()),
            datacenter: options.datacenter,
            behavior: options.behavior.unwrap_or_default(),
            lock_delay: options.lock_delay.unwrap_or(Duration::ZERO),
            connect_timeout: options.connect_timeout.unwrap_or(Duration::from_secs(2)),
            request_timeout: options.request_timeout.unwrap_or(Duration::from_secs(5)),
            max_blocking_wait: options.max_blocking_wait.unwrap_or(Duration::from_secs(5)),
            token: options.token.filter(|t| !t.is_empty()),
        };
        settings.check()?;
        Ok(settings)
    }
}

/// Every setting of a client, resolved.
#[derive(Clone)]
pub(crate) struct Settings {
    /// `http://host:port`, without credentials.
    pub(crate) address: String,
    pub(crate) prefix: String,
    pub(crate) datacenter: Option<String>,
    pub(crate) behavior: Behavior,
    pub(crate) lock_delay: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) max_blocking_wait: Duration,
    pub(crate) token: Option<String>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.options(), f)
    }
}

impl Settings {
    /// The settings as options with every field set.
    pub(crate) fn options(&self) -> ConsulOptions {
        ConsulOptions {
            prefix: Some(self.prefix.clone()),
            datacenter: self.datacenter.clone(),
            behavior: Some(self.behavior),
            lock_delay: Some(self.lock_delay),
            connect_timeout: Some(self.connect_timeout),
            request_timeout: Some(self.request_timeout),
            max_blocking_wait: Some(self.max_blocking_wait),
            token: self.token.clone(),
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidOptions(format!("Consul options: {why}")));
        let prefix = &self.prefix;
        let allowed = |c: char| c.is_ascii_alphanumeric() || "-_./".contains(c);
        if !prefix.chars().all(allowed) || prefix.split('/').any(str::is_empty) {
            return bad(format!(
                "the key prefix `{prefix}` may only hold [A-Za-z0-9-_.] segments separated by `/`"
            ));
        }
        if let Some(dc) = &self.datacenter {
            let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
            if dc.is_empty() || !dc.chars().all(allowed) {
                return bad(format!("bad datacenter `{dc}`"));
            }
        }
        if self.lock_delay > MAX_LOCK_DELAY {
            return bad(format!(
                "lock_delay is at most 60 s (Consul's limit), not {:?}",
                self.lock_delay
            ));
        }
        for (what, value, max) in [
            ("connect_timeout", self.connect_timeout, MAX_TIMEOUT),
            ("request_timeout", self.request_timeout, MAX_TIMEOUT),
            (
                "max_blocking_wait",
                self.max_blocking_wait,
                MAX_BLOCKING_WAIT,
            ),
        ] {
            if value.is_zero() || value > max {
                return bad(format!(
                    "{what} must be more than 0 and at most {max:?}, not {value:?}"
                ));
            }
        }
        // Checked here rather than failing every request later; never shown.
        if let Some(token) = &self.token {
            if hyper::header::HeaderValue::from_str(token).is_err() {
                return bad("the token must be printable ASCII".into());
            }
        }
        Ok(())
    }
}

/// Parses `consul://host[:port][/prefix][?token=…&dc=…&…]`: the agent's `http://` address,
/// and the options the URL sets.
fn parse_url(input: &str) -> Result<(String, ConsulOptions)> {
    let mut url = ServiceUrl::parse(input)?;
    url.expect_scheme(crate::ConsulLock::SCHEMES)?;
    if url.username().is_some() || url.password().is_some() {
        return Err(url.error("credentials go in the `token=` parameter, not in the user part"));
    }
    let address = match url.expect_hosts()? {
        [one] => format!("http://{}", one.with_default_port(8500)),
        _ => return Err(url.error("give one Consul agent")),
    };
    let prefix = Some(url.path().trim_matches('/'))
        .filter(|p| !p.is_empty())
        .map(str::to_string);
    let behavior = match url.take("behavior").or_else(|| url.take("behaviour")) {
        None => None,
        Some(b) if b == "delete" => Some(Behavior::Delete),
        Some(b) if b == "release" => Some(Behavior::Release),
        Some(other) => {
            return Err(url.error(format_args!(
                "behavior must be `delete` or `release`, not `{other}`"
            )))
        }
    };
    let options = ConsulOptions {
        prefix,
        token: url.take("token"),
        datacenter: url.take("dc"),
        behavior,
        lock_delay: url.take_duration("lock_delay")?,
        connect_timeout: url.take_duration("connect_timeout")?,
        request_timeout: url.take_duration("request_timeout")?,
        max_blocking_wait: url.take_duration("max_blocking_wait")?,
    };
    url.finish(PARAMS)?;
    Ok((address, options))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resolving `options` for `url` fails with `InvalidOptions`: the error.
    fn rejected(options: ConsulOptions, url: &str) -> Error {
        let shown = format!("{url} with {options:?}");
        let err = options
            .resolve(url)
            .err()
            .unwrap_or_else(|| panic!("{shown} accepted"));
        assert!(matches!(err, Error::InvalidOptions(_)), "{shown}: {err:?}");
        err
    }

    #[test]
    fn parses_everything() {
        let settings = ConsulOptions::new()
            .resolve(
                "consul://127.0.0.1:18500/my/locks?token=s3cret&dc=dc2&behavior=release\
                 &lock_delay=15s&connect_timeout=1s&request_timeout=3s&max_blocking_wait=2s",
            )
            .unwrap();
        assert_eq!(settings.address, "http://127.0.0.1:18500");
        assert_eq!(settings.token.as_deref(), Some("s3cret"));
        assert_eq!(settings.prefix, "my/locks");
        assert_eq!(settings.datacenter.as_deref(), Some("dc2"));
        assert_eq!(settings.behavior, Behavior::Release);
        assert_eq!(settings.lock_delay, Duration::from_secs(15));
        assert_eq!(settings.connect_timeout, Duration::from_secs(1));
        assert_eq!(settings.request_timeout, Duration::from_secs(3));
        assert_eq!(settings.max_blocking_wait, Duration::from_secs(2));
    }

    #[test]
    fn defaults() {
        let settings = ConsulOptions::new()
            .resolve("consul://consul.local")
            .unwrap();
        assert_eq!(settings.address, "http://consul.local:8500");
        assert_eq!(settings.token, None);
        assert_eq!(settings.prefix, "lockkit");
        assert_eq!(settings.datacenter, None);
        assert_eq!(settings.behavior, Behavior::Delete);
        assert_eq!(settings.lock_delay, Duration::ZERO);
        assert_eq!(settings.connect_timeout, Duration::from_secs(2));
        assert_eq!(settings.request_timeout, Duration::from_secs(5));
        assert_eq!(settings.max_blocking_wait, Duration::from_secs(5));
        let settings = ConsulOptions::new().resolve("consul://[::1]").unwrap();
        assert_eq!(settings.address, "http://[::1]:8500");
    }

    #[test]
    fn explicit_options_win_over_the_url() {
        let options = ConsulOptions::new()
            .prefix("mine")
            .behavior(Behavior::Delete)
            .lock_delay(Duration::from_secs(1))
            .token("explicit");
        let settings = options
            .resolve("consul://h/theirs?behavior=release&lock_delay=15s&dc=dc2&token=url")
            .unwrap();
        assert_eq!(settings.prefix, "mine");
        assert_eq!(settings.behavior, Behavior::Delete);
        assert_eq!(settings.lock_delay, Duration::from_secs(1));
        assert_eq!(settings.token.as_deref(), Some("explicit"));
        // What the options leave unset still comes from the URL.
        assert_eq!(settings.datacenter.as_deref(), Some("dc2"));
    }

    #[test]
    fn rejects_bad_urls_and_options() {
        for bad in [
            "redis://127.0.0.1",
            "consul://",
            "consul://h1,h2",
            "consul://h/a//x",
            "consul://h/a%20b",
            "consul://h?behavior=keep",
            "consul://h?lock_delay=-1s",
            "consul://h?lock_delay=61s",
            "consul://h?dc=a%20b",
            "consul://h?what=1",
            "consul://user:pw@h",
        ] {
            rejected(ConsulOptions::new(), bad);
        }
        let err = ConsulOptions::new()
            .prefix("a b")
            .resolve("consul://h")
            .unwrap_err();
        assert!(matches!(err, Error::InvalidOptions(_)), "{err:?}");
    }

    #[test]
    fn unknown_parameters_are_named_and_the_token_never_shown() {
        let err = ConsulOptions::new()
            .resolve("consul://h?token=s3cret&colour=red")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`colour`"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
        let err = ConsulOptions::new()
            .resolve("consul://h?token=s3cret&behavior=keep")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
        let options = ConsulOptions::new().token("s3cret");
        assert!(!format!("{options:?}").contains("s3cret"));
        let settings = options.resolve("consul://h?token=other").unwrap();
        assert!(!format!("{settings:?}").contains("s3cret"));
    }

    /// A URL carrying a secret (the `token=` parameter, or a password in the user part) and
    /// something broken: the error names what is broken and never shows the secret.
    #[test]
    fn errors_about_broken_urls_never_show_the_secret() {
        for bad in [
            "consul://h:notaport?token=s3cret",
            "consul://h?token=s3cret&lock_delay=soon",
            "consul://h?token=s3cret&lock_delay=99s",
            "consul://h?token=s3cret&dc=a%20b",
            "consul://h?token=s3cret&token=s3cret",
            "consul://h?token=s3cret%zz",
            "consul://h?Token=s3cret",
            "consul://h?token=s3cret&x=a@b",
            "consul://h?token=s3c@ret",
            "consul://h/a%20b?token=s3cret",
            "consul://h?token=s3cret&request_timeout=0",
            "consul://u:s3cret@h?token=s3cret",
            "consul://u:s3cret@h:1:2",
            "consul://u:s3c@ret@h",
            "consul://h?token=s3c%0Aret",
            "consul://h?token=s3c%7Fret",
        ] {
            let err = rejected(ConsulOptions::new(), bad);
            let (text, debug) = (err.to_string(), format!("{err:?}"));
            assert!(
                !text.contains("s3c"),
                "{bad}: the error shows the secret: {text}"
            );
            assert!(
                !debug.contains("s3c"),
                "{bad}: the error shows the secret: {debug}"
            );
        }
    }

    /// Timeouts so long that deadline arithmetic overflows (a panic) and zero timeouts (every
    /// request fails at once, and a retrying caller spins) are refused up front.
    #[test]
    fn timeouts_that_would_panic_or_spin_are_rejected() {
        for (what, options) in unusable_options() {
            let err = rejected(options, "consul://h");
            assert!(
                err.to_string().contains(what.split(' ').next().unwrap()),
                "{what}: {err}"
            );
        }
        for bad in [
            "consul://h?connect_timeout=0",
            "consul://h?request_timeout=0s",
            "consul://h?max_blocking_wait=0ms",
            "consul://h?connect_timeout=1e12",
            "consul://h?request_timeout=1e12",
            "consul://h?max_blocking_wait=1e12",
            "consul://h?max_blocking_wait=11m",
            "consul://h?lock_delay=1e12",
        ] {
            rejected(ConsulOptions::new(), bad);
        }
        // The limits themselves are fine.
        ConsulOptions::new()
            .connect_timeout(Duration::from_secs(3600))
            .request_timeout(Duration::from_secs(3600))
            .max_blocking_wait(Duration::from_secs(600))
            .lock_delay(Duration::from_secs(60))
            .resolve("consul://h")
            .unwrap();
        ConsulOptions::new()
            .connect_timeout(Duration::from_millis(1))
            .request_timeout(Duration::from_millis(1))
            .max_blocking_wait(Duration::from_millis(1))
            .lock_delay(Duration::ZERO)
            .resolve("consul://h")
            .unwrap();
    }

    /// `connect_with` refuses them before sending anything: no panic, no hang, and not a
    /// connection error from the unreachable agent.
    #[tokio::test]
    async fn connect_rejects_unusable_timeouts_before_any_request() {
        for (what, options) in unusable_options() {
            let connecting = crate::ConsulLock::connect_with("consul://127.0.0.1:1", options);
            let result = tokio::time::timeout(Duration::from_secs(10), connecting)
                .await
                .unwrap_or_else(|_| panic!("{what}: connect hung"));
            let err = result.err().unwrap_or_else(|| panic!("{what} accepted"));
            assert!(matches!(err, Error::InvalidOptions(_)), "{what}: {err:?}");
        }
    }

    fn unusable_options() -> Vec<(&'static str, ConsulOptions)> {
        let (max, zero) = (Duration::MAX, Duration::ZERO);
        let o = ConsulOptions::new;
        vec![
            ("connect_timeout MAX", o().connect_timeout(max)),
            ("request_timeout MAX", o().request_timeout(max)),
            ("max_blocking_wait MAX", o().max_blocking_wait(max)),
            ("lock_delay MAX", o().lock_delay(max)),
            ("connect_timeout 0", o().connect_timeout(zero)),
            ("request_timeout 0", o().request_timeout(zero)),
            ("max_blocking_wait 0", o().max_blocking_wait(zero)),
            (
                "request_timeout 2 h",
                o().request_timeout(Duration::from_secs(7200)),
            ),
            (
                "max_blocking_wait 11 min",
                o().max_blocking_wait(Duration::from_secs(660)),
            ),
        ]
    }
}
