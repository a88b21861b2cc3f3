//! The options of the etcd backend, and what an `etcd://` or `etcds://` URL says: the
//! cluster members, the credentials, and options of its own.

use std::path::PathBuf;
use std::time::Duration;

use lockkit_core::backend::Connect;
use lockkit_core::url::ServiceUrl;
use lockkit_core::Result;

/// The key prefix when neither the options nor the URL set one.
const DEFAULT_PREFIX: &str = "lockkit/";

/// The client port etcd listens on when a host names none.
const DEFAULT_PORT: u16 = 2379;

/// The URL parameters the backend reads.
const PARAMS: &[&str] = &["prefix", "ca"];

/// Tuning of the etcd backend. Build with the chained setters; what is set here wins over
/// the URL's parameters.
///
/// ```
/// use std::time::Duration;
/// use lockkit_etcd::EtcdOptions;
///
/// let options = EtcdOptions::new()
///     .prefix("app/locks/")
///     .request_timeout(Duration::from_secs(1));
/// assert_eq!(options.prefix.as_deref(), Some("app/locks/"));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EtcdOptions {
    /// Prefix of every key. `None` (the default): the URL's `prefix=` parameter, else
    /// `lockkit/`.
    pub prefix: Option<String>,
    /// A PEM file of CA certificates to trust besides the webpki roots (`etcds://` only).
    /// `None` (the default): the URL's `ca=` parameter, if any.
    pub ca: Option<PathBuf>,
    /// Timeout of each connection attempt, and of the first request `connect` makes to check
    /// that the cluster answers. Default 2 s.
    pub connect_timeout: Duration,
    /// Timeout of each request (grant, transaction, keep-alive round, revoke). Waiting for
    /// a predecessor's deletion (a watch) has none. Default 2 s.
    pub request_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            prefix: None,
            ca: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
        }
    }
}

impl EtcdOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the prefix of every key (over the URL's `prefix=`).
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// Sets a PEM file of CA certificates to trust (over the URL's `ca=`).
    #[must_use]
    pub fn ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca = Some(path.into());
        self
    }

    /// Sets the timeout of each connection attempt.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the timeout of each request.
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The key prefix in effect.
    pub(crate) fn key_prefix(&self) -> &str {
        self.prefix.as_deref().unwrap_or(DEFAULT_PREFIX)
    }

    /// Reads `url`: returns the cluster it names, and completes these options with its
    /// parameters where they leave a field unset.
    pub(crate) fn apply_url(&mut self, url: &str) -> Result<Cluster> {
        let mut url = ServiceUrl::parse(url)?;
        url.expect_scheme(<crate::EtcdLock as Connect>::SCHEMES)?;
        let prefix = url.take("prefix");
        self.prefix = self.prefix.take().or(prefix);
        let ca = url.take("ca").map(PathBuf::from);
        self.ca = self.ca.take().or(ca);
        url.finish(PARAMS)?;
        let tls = url.scheme() == "etcds";
        if self.ca.is_some() && !tls {
            return Err(url.error("`ca=` needs an etcds:// URL"));
        }
        if !matches!(url.path(), "" | "/") {
            return Err(url.error(format_args!(
                "unexpected path `{}`: etcd has no databases, set a key prefix with ?prefix=",
                url.path()
            )));
        }
        let user = match (url.username(), url.password()) {
            (None, None) => None,
            (None, Some(_)) => return Err(url.error("a password without a user name")),
            (Some(user), password) => {
                Some((user.to_string(), password.unwrap_or_default().to_string()))
            }
        };
        let scheme = if tls { "https" } else { "http" };
        let endpoints = url
            .expect_hosts()?
            .iter()
            .map(|host| format!("{scheme}://{}", host.with_default_port(DEFAULT_PORT)))
            .collect();
        Ok(Cluster {
            endpoints,
            tls,
            user,
        })
    }
}

/// The cluster a URL names.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Cluster {
    /// `http://host:port` (or `https://`), one per cluster member given.
    pub(crate) endpoints: Vec<String>,
    pub(crate) tls: bool,
    /// User name and password, percent-decoded.
    pub(crate) user: Option<(String, String)>,
}

#[cfg(test)]
mod tests {
    use lockkit_core::Error;

    use super::*;

    fn parse(url: &str) -> Result<(Cluster, EtcdOptions)> {
        let mut options = EtcdOptions::default();
        let cluster = options.apply_url(url)?;
        Ok((cluster, options))
    }

    #[test]
    fn one_endpoint() {
        let (c, o) = parse("etcd://127.0.0.1:12379").unwrap();
        assert_eq!(c.endpoints, ["http://127.0.0.1:12379"]);
        assert!(!c.tls);
        assert_eq!((c.user, o.prefix, o.ca), (None, None, None));
        assert_eq!(EtcdOptions::new().key_prefix(), DEFAULT_PREFIX);
    }

    #[test]
    fn cluster_with_credentials_and_prefix() {
        let (c, o) =
            parse("etcds://ops:p%40ss@a:1,b,[::1]:3,[::2]/?prefix=app%2Flocks/&ca=/etc/ca.pem")
                .unwrap();
        assert_eq!(
            c.endpoints,
            [
                "https://a:1",
                "https://b:2379",
                "https://[::1]:3",
                "https://[::2]:2379"
            ]
        );
        assert!(c.tls);
        assert_eq!(c.user, Some(("ops".into(), "p@ss".into())));
        assert_eq!(o.key_prefix(), "app/locks/");
        assert_eq!(o.ca, Some(PathBuf::from("/etc/ca.pem")));
    }

    #[test]
    fn explicit_options_win_over_the_url() {
        let mut options = EtcdOptions::new().prefix("mine/").ca("/mine.pem");
        options
            .apply_url("etcds://a:1?prefix=url/&ca=/url.pem")
            .unwrap();
        assert_eq!(options.key_prefix(), "mine/");
        assert_eq!(options.ca, Some(PathBuf::from("/mine.pem")));
        let mut options = EtcdOptions::new().ca("/mine.pem");
        assert!(options.apply_url("etcd://a:1").is_err());
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "etcd://",
            "etcd://a:1,,b:2",
            "etcd://a:1/db",
            "etcd://a:1?ca=/x",
            "etcd://a:1?timeout=3",
            "etcd://:pw@a:1",
            "etcd://a%zz@b:1",
            "http://a:1",
            "etcd:a",
        ] {
            assert!(matches!(parse(bad), Err(Error::InvalidOptions(_))), "{bad}");
        }
        let err = parse("etcd://u:s3cret@a:1?timeout=3")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`timeout`") && !err.contains("s3cret"),
            "{err}"
        );
    }
}
