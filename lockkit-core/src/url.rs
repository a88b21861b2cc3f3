//! Service URLs, parsed once for every backend.
//!
//! Every backend's URL has the same shape, and [`ServiceUrl::parse`] reads it the same way for
//! all of them:
//!
//! ```text
//! scheme://[user[:password]@]host[:port][,host[:port]…][/path][?key=value&…]
//! scheme:opaque[?key=value&…]          (e.g. sqlite::memory:, sqlite:relative/path.db)
//! ```
//!
//! User, password, path, parameter names and values are percent-decoded (`%2F` is `/`; a
//! `+` stays a `+`). A backend takes the parameters it knows with the `take_*` methods and
//! then calls [`ServiceUrl::finish`], which rejects every parameter left over, naming it.
//! The password never appears in an error message or in `Debug` output:
//! [`ServiceUrl::redacted`] is the form to show.
//!
//! ```
//! use lockkit_core::url::ServiceUrl;
//!
//! let mut url = ServiceUrl::parse("redlock://app:s%2Fcret@h1:7000,h2:7001/2?prefix=jobs")?;
//! assert_eq!(url.scheme(), "redlock");
//! assert_eq!(url.username(), Some("app"));
//! assert_eq!(url.password(), Some("s/cret"));
//! assert_eq!(url.hosts()[1].host, "h2");
//! assert_eq!(url.hosts()[1].port, Some(7001));
//! assert_eq!(url.path(), "/2");
//! assert_eq!(url.take("prefix").as_deref(), Some("jobs"));
//! url.finish(&["prefix"])?;
//! assert_eq!(url.redacted(), "redlock://app:***@h1:7000,h2:7001/2");
//! # Ok::<(), lockkit_core::Error>(())
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use percent_encoding::percent_decode_str;

use crate::error::{Error, Result};

/// One `host[:port]` of a URL's authority. IPv6 hosts keep their brackets (`[::1]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// The host name or address, as written (IPv6 in brackets).
    pub host: String,
    /// The port, if given.
    pub port: Option<u16>,
}

impl HostPort {
    /// `host:port`, with `default_port` when the URL named none.
    pub fn with_default_port(&self, default_port: u16) -> String {
        format!("{}:{}", self.host, self.port.unwrap_or(default_port))
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

/// A parsed service URL. See the [module docs](self) for the grammar.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceUrl {
    scheme: String,
    username: Option<String>,
    password: Option<String>,
    hosts: Vec<HostPort>,
    /// False for an opaque URL (`scheme:opaque`).
    has_authority: bool,
    path: String,
    /// Decoded `(key, value)` pairs in URL order, and whether a backend took each.
    params: Vec<(String, String, bool)>,
}

impl fmt::Debug for ServiceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ServiceUrl").field(&self.redacted()).finish()
    }
}

fn decode(part: &str, what: &str, shown: &str) -> Result<String> {
    percent_decode_str(part)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            invalid(
                shown,
                &format!("the {what} is not valid UTF-8 once decoded"),
            )
        })
}

/// An error about the URL whose safe form is `shown`.
fn invalid(shown: &str, why: &str) -> Error {
    Error::InvalidOptions(format!("invalid URL `{shown}`: {why}"))
}

/// Whether `part` has a `%` not followed by two hex digits.
fn bad_escape(part: &str) -> bool {
    let bytes = part.as_bytes();
    bytes.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    })
}

/// The URL as it may be shown: any password replaced by `***`. Works on text that does not
/// parse, so errors about a broken URL never print its secret either.
pub fn redact(url: &str) -> String {
    // Secret parameters first: their values may hold an unescaped `@`, which must not pass
    // for the end of a user part.
    let url = redact_query(url);
    let Some((scheme, rest)) = url.split_once("://") else {
        return redact_opaque(&url);
    };
    // The userinfo ends at the last `@`: a malformed URL may hold `/`, `?` or `#` unescaped
    // in its password, so look through the whole rest (an `@` in a parameter value only
    // hides more than needed).
    let Some(at) = rest.rfind('@') else {
        return url;
    };
    let userinfo = &rest[..at];
    let user = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => userinfo.to_string(),
    };
    format!("{scheme}://{user}@{}", &rest[at + 1..])
}

/// A URL without `scheme://` that still looks like it carries credentials (`redis:u:pw@h`,
/// `u:pw@h`): everything between the first `:` and the last `@` is hidden.
fn redact_opaque(url: &str) -> String {
    let url = redact_query(url);
    let (before_query, query) = match url.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (url.as_str(), None),
    };
    let Some(at) = before_query.rfind('@') else {
        return url.clone();
    };
    let keep = before_query[..at].find(':').map_or(0, |colon| colon + 1);
    let mut out = format!("{}***{}", &before_query[..keep], &before_query[at..]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// Parameters whose values are secrets.
const SECRET_PARAMS: &[&str] = &["password", "token", "secret"];

fn redact_query(rest: &str) -> String {
    let Some((before, query)) = rest.split_once('?') else {
        return rest.to_string();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if SECRET_PARAMS.iter().any(|s| k.eq_ignore_ascii_case(s)) => {
                format!("{k}=***")
            }
            _ => pair.to_string(),
        })
        .collect();
    format!("{before}?{}", pairs.join("&"))
}

impl ServiceUrl {
    /// Parses `url`. Errors are [`Error::InvalidOptions`] and show the URL without its
    /// password.
    pub fn parse(url: &str) -> Result<Self> {
        let shown = redact(url);
        let shown = shown.as_str();
        let (scheme, rest) = url
            .split_once(':')
            .ok_or_else(|| invalid(shown, "no scheme (expected scheme://…)"))?;
        let scheme_ok = scheme
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !scheme_ok {
            return Err(invalid(shown, "no scheme (expected scheme://…)"));
        }
        if let Some(after) = rest.strip_prefix("//") {
            let authority_end = after.find(['/', '?', '#']).unwrap_or(after.len());
            if !after[..authority_end].contains('@') && after[authority_end..].contains('@') {
                return Err(invalid(
                    shown,
                    "cannot tell the user and password from the host: percent-encode `/`, \
                     `?`, `#` and `@` in them (`%2F`, `%3F`, `%23`, `%40`)",
                ));
            }
        }
        let (body, query) = match rest.split_once('?') {
            Some((body, query)) => (body, Some(query)),
            None => (rest, None),
        };
        let mut parsed = ServiceUrl {
            scheme: scheme.to_ascii_lowercase(),
            username: None,
            password: None,
            hosts: Vec::new(),
            has_authority: false,
            path: String::new(),
            params: Vec::new(),
        };
        if let Some(after) = body.strip_prefix("//") {
            parsed.has_authority = true;
            let (authority, path) = match after.find('/') {
                Some(slash) => after.split_at(slash),
                None => (after, ""),
            };
            let hosts = match authority.rsplit_once('@') {
                Some((userinfo, hosts)) => {
                    if bad_escape(userinfo) {
                        return Err(invalid(shown, "a bad %-escape in the user or password"));
                    }
                    let (user, password) = match userinfo.split_once(':') {
                        Some((user, password)) => (user, Some(password)),
                        None => (userinfo, None),
                    };
                    if !user.is_empty() {
                        parsed.username = Some(decode(user, "user name", shown)?);
                    }
                    if let Some(password) = password {
                        // Never echo the decoded bytes either.
                        parsed.password = Some(decode(password, "password", shown)?);
                    }
                    hosts
                }
                None => authority,
            };
            if !hosts.is_empty() {
                for one in hosts.split(',') {
                    parsed.hosts.push(parse_host(one, shown)?);
                }
            }
            parsed.path = decode_checked(path, "path", shown)?;
        } else {
            parsed.path = decode_checked(body, "path", shown)?;
        }
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            if pair.is_empty() {
                continue;
            }
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = decode_checked(key, "parameter name", shown)?;
            let value = decode_checked(value, "parameter value", shown)?;
            if key.is_empty() {
                return Err(invalid(shown, "a parameter without a name"));
            }
            if parsed.params.iter().any(|(k, ..)| *k == key) {
                return Err(invalid(
                    shown,
                    &format!("the parameter `{key}` is given twice"),
                ));
            }
            parsed.params.push((key, value, false));
        }
        Ok(parsed)
    }

    /// The scheme, lower-cased.
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// Whether the URL has an authority (`scheme://…`), as opposed to `scheme:opaque`.
    pub fn has_authority(&self) -> bool {
        self.has_authority
    }

    /// The decoded user name, if any.
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    /// The decoded password, if any. Never print it: show [`ServiceUrl::redacted`].
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The hosts of the authority, in order (empty if there are none).
    pub fn hosts(&self) -> &[HostPort] {
        &self.hosts
    }

    /// The decoded path: for `scheme://host/a/b` it is `/a/b`; for an opaque URL
    /// (`sqlite::memory:`) everything between the scheme's colon and the query.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The URL as it may be shown in messages and logs: the password as `***`, secret
    /// parameters (`token`, `password`, `secret`) as `***`.
    pub fn redacted(&self) -> String {
        let mut out = format!("{}:", self.scheme);
        if self.has_authority {
            out.push_str("//");
            if self.username.is_some() || self.password.is_some() {
                out.push_str(self.username.as_deref().unwrap_or(""));
                if self.password.is_some() {
                    out.push_str(":***");
                }
                out.push('@');
            }
            let hosts: Vec<String> = self.hosts.iter().map(ToString::to_string).collect();
            out.push_str(&hosts.join(","));
        }
        if self.has_authority {
            out.push_str(&self.path);
        } else {
            out.push_str(&redact_opaque(&self.path));
        }
        let params: Vec<String> = self
            .params
            .iter()
            .filter(|(.., taken)| !*taken)
            .map(|(k, v, _)| {
                let secret = SECRET_PARAMS.iter().any(|s| k.eq_ignore_ascii_case(s));
                format!("{k}={}", if secret { "***" } else { v })
            })
            .collect();
        if !params.is_empty() {
            out.push('?');
            out.push_str(&params.join("&"));
        }
        out
    }

    /// An error about this URL ([`Error::InvalidOptions`]), showing it redacted.
    pub fn error(&self, why: impl fmt::Display) -> Error {
        invalid(&self.redacted(), &why.to_string())
    }

    /// Fails unless the scheme is one of `schemes`.
    pub fn expect_scheme(&self, schemes: &[&str]) -> Result<()> {
        if schemes.contains(&self.scheme.as_str()) {
            return Ok(());
        }
        Err(self.error(format_args!(
            "the scheme must be one of {}",
            schemes
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// Fails unless the URL names at least one host.
    pub fn expect_hosts(&self) -> Result<&[HostPort]> {
        if self.hosts.is_empty() {
            return Err(self.error("no host"));
        }
        Ok(&self.hosts)
    }

    /// Takes the parameter `key` (its decoded value), if present.
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.params
            .iter_mut()
            .find(|(k, _, taken)| k == key && !*taken)
            .map(|(_, value, taken)| {
                *taken = true;
                value.clone()
            })
    }

    /// Takes the parameter `key` and parses it with [`FromStr`].
    pub fn take_parsed<T>(&mut self, key: &str) -> Result<Option<T>>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        let Some(value) = self.take(key) else {
            return Ok(None);
        };
        value
            .parse()
            .map(Some)
            .map_err(|e| self.error(format_args!("the parameter `{key}={value}`: {e}")))
    }

    /// Takes a boolean parameter: `true`/`false`, `1`/`0`, `yes`/`no`, or just `?key`.
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>> {
        let Some(value) = self.take(key) else {
            return Ok(None);
        };
        match value.to_ascii_lowercase().as_str() {
            "" | "true" | "1" | "yes" => Ok(Some(true)),
            "false" | "0" | "no" => Ok(Some(false)),
            _ => Err(self.error(format_args!(
                "the parameter `{key}={value}` must be true or false"
            ))),
        }
    }

    /// Takes a duration parameter: a number with a unit (`250ms`, `10s`, `5m`, `1h`); a bare
    /// number is seconds.
    pub fn take_duration(&mut self, key: &str) -> Result<Option<Duration>> {
        let Some(value) = self.take(key) else {
            return Ok(None);
        };
        parse_duration(&value)
            .map(Some)
            .map_err(|why| self.error(format_args!("the parameter `{key}={value}`: {why}")))
    }

    /// The names of the parameters no backend took.
    pub fn remaining(&self) -> Vec<&str> {
        self.params
            .iter()
            .filter(|(.., taken)| !*taken)
            .map(|(k, ..)| k.as_str())
            .collect()
    }

    /// Fails, naming them, if any parameters were not taken. `known` lists the parameters
    /// the backend accepts, for the message.
    pub fn finish(&self, known: &[&str]) -> Result<()> {
        let left = self.remaining();
        if left.is_empty() {
            return Ok(());
        }
        let known = if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        };
        Err(self.error(format_args!(
            "unknown parameter{} {} (known: {known})",
            if left.len() > 1 { "s" } else { "" },
            left.iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

fn decode_checked(part: &str, what: &str, shown: &str) -> Result<String> {
    if bad_escape(part) {
        return Err(invalid(shown, &format!("a bad %-escape in the {what}")));
    }
    decode(part, what, shown)
}

fn parse_host(one: &str, shown: &str) -> Result<HostPort> {
    if one.is_empty() {
        return Err(invalid(shown, "an empty host in the host list"));
    }
    let (host, port) = if one.starts_with('[') {
        let end = one
            .find(']')
            .ok_or_else(|| invalid(shown, "an IPv6 host without its closing `]`"))?;
        let (host, rest) = one.split_at(end + 1);
        match rest {
            "" => (host, None),
            _ => match rest.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(invalid(shown, &format!("cannot read the host `{one}`"))),
            },
        }
    } else {
        match one.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (one, None),
        }
    };
    if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
        return Err(invalid(shown, &format!("cannot read the host `{one}`")));
    }
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| {
            invalid(
                shown,
                &format!("the port `{p}` of `{host}` is not a number from 1 to 65535"),
            )
        })?),
    };
    Ok(HostPort {
        host: host.to_string(),
        port,
    })
}

/// Parses `250ms`, `10s`, `1.5s`, `5m`, `1h`, or a bare number of seconds. Rejects negative,
/// not-a-number and out-of-range values.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let text = text.trim();
    // The unit is the alphabetic suffix (`1e3s` is a thousand seconds).
    let split = text
        .char_indices()
        .rev()
        .take_while(|(_, c)| c.is_alphabetic())
        .last()
        .map_or(text.len(), |(i, _)| i);
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("unknown unit `{unit}` (use ms, s, m or h)")),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{number}` is not a number"))?;
    if !value.is_finite() || value < 0.0 {
        return Err("must be a non-negative number".into());
    }
    Duration::try_from_secs_f64(value * scale).map_err(|_| "is too large".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_part() {
        let mut url =
            ServiceUrl::parse("etcd://u%40x:p%3Aw@h1:1,[::1]:2,h3/a%20b?k=v%26w&flag").unwrap();
        assert_eq!(url.scheme(), "etcd");
        assert_eq!(url.username(), Some("u@x"));
        assert_eq!(url.password(), Some("p:w"));
        assert_eq!(
            url.hosts(),
            &[
                HostPort {
                    host: "h1".into(),
                    port: Some(1)
                },
                HostPort {
                    host: "[::1]".into(),
                    port: Some(2)
                },
                HostPort {
                    host: "h3".into(),
                    port: None
                },
            ]
        );
        assert_eq!(url.path(), "/a b");
        assert_eq!(url.take("k").as_deref(), Some("v&w"));
        assert_eq!(url.take_bool("flag").unwrap(), Some(true));
        url.finish(&[]).unwrap();
    }

    #[test]
    fn opaque_urls_keep_their_path() {
        let url = ServiceUrl::parse("sqlite::memory:").unwrap();
        assert!(!url.has_authority());
        assert_eq!(url.path(), ":memory:");
        let url = ServiceUrl::parse("SQLite:dir/locks.db?mode=rwc").unwrap();
        assert_eq!(url.scheme(), "sqlite");
        assert_eq!(url.path(), "dir/locks.db");
        assert_eq!(url.remaining(), ["mode"]);
    }

    #[test]
    fn unknown_parameters_are_named() {
        let mut url = ServiceUrl::parse("redis://h?prefix=x&colour=red&size=2").unwrap();
        url.take("prefix");
        let err = url.finish(&["prefix"]).unwrap_err().to_string();
        assert!(err.contains("`colour`") && err.contains("`size`"), "{err}");
        assert!(err.contains("known: prefix"), "{err}");
    }

    #[test]
    fn errors_never_show_the_password() {
        for url in [
            "etcd://u:s3cret%zz@h:1",
            "zk://u:s3cretpw@h:notaport",
            "redis://u:s3c/ret@h:1",
            "redis://u:s3c?ret@h:1",
            "redis://u:s3c#ret@h:1/0?x=1",
            "consul://u:s3cret@h:1?token=s3cret&x=%ff",
            "postgres://u:s3cret@[::1/db",
            "mysql://u:s3cret@h:1/db?a=1&a=2",
            "redis:u:s3cret@a:1",
            "redis:/u:s3cret@a:1",
            "redis//u:s3cret@a:1",
            "u:s3cret@a:1",
            "redis:://u:s3cret@a:1",
            "consul://h?token=s3cret&x=a@b",
            "consul://h:1?token=s3c@ret&x=%ff",
        ] {
            // A malformed URL is an error; an opaque one (`redis:u:pw@h`) may parse, and
            // then its shown form must hide the secret as well.
            let shown = match ServiceUrl::parse(url).and_then(|u| u.finish(&[]).map(|()| u)) {
                Err(err) => err.to_string(),
                Ok(parsed) => format!("{} {parsed:?}", parsed.redacted()),
            };
            assert!(!shown.contains("s3c"), "{url}: {shown}");
            assert!(!redact(url).contains("s3c"), "{url}: {}", redact(url));
        }
        let url = ServiceUrl::parse("redis://u:s3cret@h:1?token=s3cret").unwrap();
        assert!(!format!("{url:?}").contains("s3c"));
        assert!(!url.redacted().contains("s3c"));
    }

    #[test]
    fn bad_urls_are_rejected() {
        for bad in [
            "no-scheme",
            "://x",
            "redis://h:0",
            "redis://h:70000",
            "redis://h1,,h2",
            "redis://h?=v",
            "redis://h?a=%zz",
            "redis://[::1",
        ] {
            assert!(
                matches!(ServiceUrl::parse(bad), Err(Error::InvalidOptions(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("NaN").is_err());
        assert!(parse_duration("1e30").unwrap_err().contains("too large"));
        assert!(parse_duration("5 parsecs").is_err());
    }
}
