//! The options of the ZooKeeper backend, and what a `zk://` or `zookeeper://` URL says: the
//! ensemble, its chroot, and options of its own.

use std::time::Duration;

use lockkit_core::backend::Connect;
use lockkit_core::url::ServiceUrl;
use lockkit_core::{Error, Result};

/// The root of the lock nodes when neither the options nor the URL set one.
const DEFAULT_ROOT: &str = "/lockkit";

/// The URL parameters the backend reads.
const PARAMS: &[&str] = &["root"];

/// Tuning of the ZooKeeper backend. Build with the chained setters; what is set here wins
/// over the URL's parameters.
///
/// ```
/// use std::time::Duration;
/// use lockkit_zk::ZkOptions;
///
/// let options = ZkOptions::new()
///     .root("/app/locks")
///     .request_timeout(Duration::from_secs(2));
/// assert_eq!(options.root.as_deref(), Some("/app/locks"));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ZkOptions {
    /// The znode under which every lock gets its parent node (relative to the URL's chroot):
    /// an absolute path below `/`. `None` (the default): the URL's `root=` parameter, else
    /// `/lockkit`.
    pub root: Option<String>,
    /// How long establishing a session may take before the attempt fails with
    /// [`Error::Connection`]. Default 3 s.
    pub connect_timeout: Duration,
    /// How long one request may take before it fails with [`Error::Connection`]. Default 5 s.
    pub request_timeout: Duration,
    /// The shortest TTL accepted ([`Capabilities::min_ttl`]); a session timeout below about a
    /// second is fragile. Default 1 s. The server clamps session timeouts to its own
    /// `minSessionTimeout` (default two ticks) as well.
    ///
    /// [`Capabilities::min_ttl`]: lockkit_core::Capabilities::min_ttl
    pub min_ttl: Duration,
    /// The longest TTL accepted ([`Capabilities::max_ttl`]), at most [`ZkOptions::MAX_TTL`].
    /// Default one day. Session timeouts are clamped by the server's `maxSessionTimeout`
    /// (default 20 ticks): a holder that crashes loses the lock after the shorter of the two,
    /// and a lease is known valid for at most the session timeout after each renewal.
    ///
    /// [`Capabilities::max_ttl`]: lockkit_core::Capabilities::max_ttl
    pub max_ttl: Duration,
    /// How long a session that no guard and no waiter uses stays open before it is closed
    /// (one is opened per distinct TTL in use). Default 60 s.
    pub session_idle_timeout: Duration,
}

impl Default for ZkOptions {
    fn default() -> Self {
        ZkOptions {
            root: None,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(24 * 3600),
            session_idle_timeout: Duration::from_secs(60),
        }
    }
}

impl ZkOptions {
    /// The largest `max_ttl` accepted: the longest session timeout ZooKeeper's protocol can
    /// carry (`i32::MAX` milliseconds, about 24.8 days).
    pub const MAX_TTL: Duration = Duration::from_millis(i32::MAX as u64);

    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the znode under which the locks live (over the URL's `root=`).
    #[must_use]
    pub fn root(mut self, root: impl Into<String>) -> Self {
        self.root = Some(root.into());
        self
    }

    /// Sets how long establishing a session may take.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets how long one request may take.
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the shortest TTL accepted.
    #[must_use]
    pub fn min_ttl(mut self, ttl: Duration) -> Self {
        self.min_ttl = ttl;
        self
    }

    /// Sets the longest TTL accepted.
    #[must_use]
    pub fn max_ttl(mut self, ttl: Duration) -> Self {
        self.max_ttl = ttl;
        self
    }

    /// Sets how long an unused session stays open.
    #[must_use]
    pub fn session_idle_timeout(mut self, timeout: Duration) -> Self {
        self.session_idle_timeout = timeout;
        self
    }

    /// The root of the lock nodes in effect, without a trailing `/`.
    pub(crate) fn lock_root(&self) -> &str {
        let root = self.root.as_deref().unwrap_or(DEFAULT_ROOT);
        root.strip_suffix('/').unwrap_or(root)
    }

    /// Reads `url`: returns the connect string of the ensemble it names, and completes these
    /// options with its parameters where they leave a field unset.
    pub(crate) fn apply_url(&mut self, url: &str) -> Result<String> {
        let mut url = ServiceUrl::parse(url)?;
        url.expect_scheme(<crate::ZkLock as Connect>::SCHEMES)?;
        let root = url.take("root");
        self.root = self.root.take().or(root);
        url.finish(PARAMS)?;
        if url.username().is_some() || url.password().is_some() {
            return Err(url.error("credentials in the URL are not supported"));
        }
        let hosts = url.expect_hosts()?;
        let chroot = url.path();
        if chroot.ends_with('/') {
            return Err(url.error("the chroot must not end with `/`"));
        }
        self.check()?;
        let hosts: Vec<String> = hosts.iter().map(ToString::to_string).collect();
        Ok(format!("{}{chroot}", hosts.join(",")))
    }

    /// Durations that the backend adds to instants or waits for must be usable: above zero,
    /// and TTLs within what a session timeout can carry.
    fn check(&self) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidOptions(format!("ZooKeeper options: {why}")));
        if self.max_ttl > Self::MAX_TTL {
            return bad(format!(
                "max_ttl {:?} is above {:?}, the longest session timeout ZooKeeper can carry",
                self.max_ttl,
                Self::MAX_TTL
            ));
        }
        if self.min_ttl.is_zero() || self.min_ttl > self.max_ttl {
            return bad(format!(
                "min_ttl {:?} must be above zero and at most max_ttl {:?}",
                self.min_ttl, self.max_ttl
            ));
        }
        let timeouts = [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("session_idle_timeout", self.session_idle_timeout),
        ];
        if let Some((name, _)) = timeouts.iter().find(|(_, t)| t.is_zero()) {
            return bad(format!("{name} must be above zero"));
        }
        self.check_root()
    }

    /// The lock root must be an absolute path of non-empty segments, not `/` itself.
    fn check_root(&self) -> Result<()> {
        let root = self.lock_root();
        let ok = root.starts_with('/')
            && root.len() > 1
            && root[1..]
                .split('/')
                .all(|s| !s.is_empty() && s != "." && s != "..");
        if ok {
            return Ok(());
        }
        Err(Error::InvalidOptions(format!(
            "the lock root `{}` must be an absolute znode path below `/`, like `/lockkit`",
            self.root.as_deref().unwrap_or_default()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<(String, ZkOptions)> {
        let mut options = ZkOptions::default();
        let cluster = options.apply_url(url)?;
        Ok((cluster, options))
    }

    #[test]
    fn parses() {
        let (cluster, o) = parse("zk://a:1,b:2/app/x?root=/locks").unwrap();
        assert_eq!(cluster, "a:1,b:2/app/x");
        assert_eq!(o.lock_root(), "/locks");
        let (cluster, o) = parse("zookeeper://127.0.0.1:2181").unwrap();
        assert_eq!(cluster, "127.0.0.1:2181");
        assert_eq!((o.root.as_deref(), o.lock_root()), (None, DEFAULT_ROOT));
        for bad in [
            "zk://",
            "zk:///chroot",
            "zk://a:1,,b:2",
            "zk://a:1/",
            "zk://a:1?x=1",
            "redis://a:1",
            "a:1",
            "zk://u:p@a:1",
            "zk://a:1?root=relative",
        ] {
            assert!(matches!(parse(bad), Err(Error::InvalidOptions(_))), "{bad}");
        }
    }

    #[test]
    fn explicit_options_win_over_the_url() {
        let mut options = ZkOptions::new().root("/mine");
        options.apply_url("zk://a:1?root=/url").unwrap();
        assert_eq!(options.lock_root(), "/mine");
        let mut options = ZkOptions::new().root("/");
        assert!(options.apply_url("zk://a:1?root=/url").is_err());
    }

    #[tokio::test]
    async fn durations_that_would_overflow_or_spin_are_refused() {
        let refused = [
            (
                "max_ttl Duration::MAX",
                ZkOptions::new().max_ttl(Duration::MAX),
            ),
            (
                "max_ttl above MAX_TTL",
                ZkOptions::new().max_ttl(ZkOptions::MAX_TTL + Duration::from_millis(1)),
            ),
            (
                "min_ttl above max_ttl",
                ZkOptions::new()
                    .min_ttl(Duration::from_secs(10))
                    .max_ttl(Duration::from_secs(5)),
            ),
            ("min_ttl zero", ZkOptions::new().min_ttl(Duration::ZERO)),
            (
                "connect_timeout zero",
                ZkOptions::new().connect_timeout(Duration::ZERO),
            ),
            (
                "request_timeout zero",
                ZkOptions::new().request_timeout(Duration::ZERO),
            ),
            (
                "session_idle_timeout zero",
                ZkOptions::new().session_idle_timeout(Duration::ZERO),
            ),
        ];
        for (what, options) in refused {
            let err = crate::ZkLock::connect_with("zk://127.0.0.1:1", options)
                .await
                .unwrap_err();
            assert!(matches!(err, Error::InvalidOptions(_)), "{what}: {err:?}");
        }
        // The largest values are fine: checked before any connection is tried.
        let largest = ZkOptions::new()
            .max_ttl(ZkOptions::MAX_TTL)
            .connect_timeout(Duration::MAX)
            .request_timeout(Duration::MAX)
            .session_idle_timeout(Duration::MAX);
        let err = crate::ZkLock::connect_with("zk://127.0.0.1:1", largest)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn errors_never_show_the_password() {
        let secret = "s3cretpw";
        for url in [
            "zk://u:s3cretpw@127.0.0.1:1",
            "zk://:s3cretpw@127.0.0.1:1/app",
            "zk://u:s3cretpw@127.0.0.1:1/chroot/",
            "zk://u:s3cretpw@127.0.0.1:1?x=1",
            "zk://u:s3cretpw@127.0.0.1:1?root=relative",
            "zk://u:s3cretpw@",
            "zk://u:s3cretpw@h:port",
            "zookeeper://u:s3cretpw@127.0.0.1:1,h:2",
            "redis://u:s3cretpw@127.0.0.1:1",
        ] {
            let err = crate::ZkLock::connect(url).await.unwrap_err();
            let mut texts = vec![err.to_string(), format!("{err:?}")];
            let mut source = std::error::Error::source(&err);
            while let Some(e) = source {
                texts.push(e.to_string());
                source = e.source();
            }
            for text in texts {
                assert!(!text.contains(secret), "{url}: {text}");
            }
        }
    }

    #[test]
    fn roots() {
        assert!(ZkOptions::new().check_root().is_ok());
        assert!(ZkOptions::new().root("/lockkit").check_root().is_ok());
        assert!(ZkOptions::new().root("/a/b/").check_root().is_ok());
        for bad in ["", "/", "lockkit", "/a//b", "/a/../b"] {
            assert!(ZkOptions::new().root(bad).check_root().is_err(), "{bad}");
        }
    }
}
