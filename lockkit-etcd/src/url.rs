//! `etcd://[user:password@]h1:p1[,h2:p2…][/][?prefix=…]` and `etcds://…[?ca=…]` URLs.

use lockkit_core::{Error, Result};

/// The client port etcd listens on when a host names none.
const DEFAULT_PORT: u16 = 2379;

/// A parsed etcd URL.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Parsed {
    /// `http://host:port` (or `https://`), one per cluster member given.
    pub(crate) endpoints: Vec<String>,
    pub(crate) tls: bool,
    /// User name and password, percent-decoded.
    pub(crate) user: Option<(String, String)>,
    pub(crate) prefix: Option<String>,
    /// A PEM file of CA certificates to trust (`etcds://` only).
    pub(crate) ca: Option<String>,
}

pub(crate) fn parse(url: &str) -> Result<Parsed> {
    let bad = |why: &str| Error::InvalidOptions(format!("bad etcd URL: {why}"));
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no `scheme://`"))?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "etcd" => false,
        "etcds" => true,
        other => {
            return Err(bad(&format!(
                "unknown scheme `{other}`, expected etcd or etcds"
            )))
        }
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(split);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let user = match userinfo {
        Some(userinfo) => {
            let (name, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            if name.is_empty() {
                return Err(bad("a password without a user name"));
            }
            Some((decode(name)?, decode(password)?))
        }
        None => None,
    };
    let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
    if !path.is_empty() && path != "/" {
        return Err(bad(&format!(
            "unexpected path `{path}`: etcd has no databases, set a key prefix with ?prefix="
        )));
    }
    let (mut prefix, mut ca) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "prefix" => prefix = Some(decode(value)?),
            "ca" => ca = Some(decode(value)?),
            other => return Err(bad(&format!("unknown parameter `{other}`"))),
        }
    }
    if ca.is_some() && !tls {
        return Err(bad("`ca=` needs an etcds:// URL"));
    }
    let scheme = if tls { "https" } else { "http" };
    let mut endpoints = Vec::new();
    for host in hosts.split(',') {
        if host.is_empty() {
            return Err(bad("an empty host"));
        }
        let has_port = match host.strip_prefix('[') {
            // [v6]:port
            Some(v6) => !v6.ends_with(']'),
            None => host.contains(':'),
        };
        endpoints.push(if has_port {
            format!("{scheme}://{host}")
        } else {
            format!("{scheme}://{host}:{DEFAULT_PORT}")
        });
    }
    Ok(Parsed {
        endpoints,
        tls,
        user,
        prefix,
        ca,
    })
}

/// Percent-decodes a URL component.
fn decode(s: &str) -> Result<String> {
    let bad = || Error::InvalidOptions(format!("bad percent-encoding in etcd URL part `{s}`"));
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_endpoint() {
        let p = parse("etcd://127.0.0.1:12379").unwrap();
        assert_eq!(p.endpoints, ["http://127.0.0.1:12379"]);
        assert!(!p.tls);
        assert_eq!((p.user, p.prefix, p.ca), (None, None, None));
    }

    #[test]
    fn cluster_with_credentials_and_prefix() {
        let p = parse("etcds://ops:p%40ss@a:1,b,[::1]:3,[::2]/?prefix=app%2Flocks/&ca=/etc/ca.pem")
            .unwrap();
        assert_eq!(
            p.endpoints,
            [
                "https://a:1",
                "https://b:2379",
                "https://[::1]:3",
                "https://[::2]:2379"
            ]
        );
        assert!(p.tls);
        assert_eq!(p.user, Some(("ops".into(), "p@ss".into())));
        assert_eq!(p.prefix.as_deref(), Some("app/locks/"));
        assert_eq!(p.ca.as_deref(), Some("/etc/ca.pem"));
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
    }
}
