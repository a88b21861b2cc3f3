//! Parsing of `consul://` URLs.

use std::time::Duration;

use lockkit_core::{Error, Result};

use crate::{Behavior, ConsulOptions};

/// What a `consul://` URL says.
pub(crate) struct Parsed {
    /// `http://host:port`, without credentials.
    pub(crate) address: String,
    pub(crate) token: Option<String>,
}

/// Parses `consul://host[:port][/prefix][?token=…&dc=…&behavior=…&lock_delay=…]` into the
/// address and token, applying the other parameters to `options`.
pub(crate) fn parse(input: &str, options: &mut ConsulOptions) -> Result<Parsed> {
    let bad = |why: String| Error::InvalidOptions(format!("bad Consul URL: {why}"));
    let url = url::Url::parse(input).map_err(|e| bad(e.to_string()))?;
    if url.scheme() != "consul" {
        return Err(bad(format!(
            "the scheme is `{}`, expected `consul`",
            url.scheme()
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "credentials go in the `token=` parameter, not in the user part".into(),
        ));
    }
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad("no host".into()))?;
    let port = url.port().unwrap_or(8500);
    let prefix = url.path().trim_matches('/');
    if !prefix.is_empty() {
        let allowed = |c: char| c.is_ascii_alphanumeric() || "-_./".contains(c);
        if !prefix.chars().all(allowed) || prefix.split('/').any(str::is_empty) {
            return Err(bad(format!(
                "the key prefix `{prefix}` may only hold [A-Za-z0-9-_.] segments separated by `/`"
            )));
        }
        options.prefix = prefix.to_string();
    }
    let mut token = None;
    for (key, value) in url.query_pairs() {
        match key.as_ref() {
            "token" => token = Some(value.into_owned()).filter(|t| !t.is_empty()),
            "dc" => {
                let ok = !value.is_empty()
                    && value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                if !ok {
                    return Err(bad(format!("bad datacenter `{value}`")));
                }
                options.datacenter = Some(value.into_owned());
            }
            "behavior" | "behaviour" => {
                options.behavior = match value.as_ref() {
                    "delete" => Behavior::Delete,
                    "release" => Behavior::Release,
                    other => {
                        return Err(bad(format!(
                            "behavior must be `delete` or `release`, not `{other}`"
                        )))
                    }
                }
            }
            "lock_delay" => options.lock_delay = parse_duration(&value).map_err(bad)?,
            other => return Err(bad(format!("unknown parameter `{other}`"))),
        }
    }
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
        _ => host.to_string(),
    };
    Ok(Parsed {
        address: format!("http://{host}:{port}"),
        token,
    })
}

/// `15s`, `500ms`, `0` or a plain number of seconds.
fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let bad = || format!("bad duration `{text}` (use e.g. `0`, `500ms`, `15s`)");
    let (number, unit) = match text.strip_suffix("ms") {
        Some(n) => (n, 0.001),
        None => (text.strip_suffix('s').unwrap_or(text), 1.0),
    };
    let value: f64 = number.parse().map_err(|_| bad())?;
    if !value.is_finite() || value < 0.0 {
        return Err(bad());
    }
    Duration::try_from_secs_f64(value * unit).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_everything() {
        let mut options = ConsulOptions::default();
        let parsed = parse(
            "consul://127.0.0.1:18500/my/locks?token=s3cret&dc=dc2&behavior=release&lock_delay=15s",
            &mut options,
        )
        .unwrap();
        assert_eq!(parsed.address, "http://127.0.0.1:18500");
        assert_eq!(parsed.token.as_deref(), Some("s3cret"));
        assert_eq!(options.prefix, "my/locks");
        assert_eq!(options.datacenter.as_deref(), Some("dc2"));
        assert_eq!(options.behavior, Behavior::Release);
        assert_eq!(options.lock_delay, Duration::from_secs(15));
    }

    #[test]
    fn defaults() {
        let mut options = ConsulOptions::default();
        let parsed = parse("consul://consul.local", &mut options).unwrap();
        assert_eq!(parsed.address, "http://consul.local:8500");
        assert_eq!(parsed.token, None);
        assert_eq!(options.prefix, "lockkit");
        assert_eq!(options.behavior, Behavior::Delete);
        assert_eq!(options.lock_delay, Duration::ZERO);
    }

    #[test]
    fn rejects_bad_urls_without_echoing_the_token() {
        for bad in [
            "redis://127.0.0.1",
            "consul://",
            "consul://h/a%2Fb",
            "consul://h/a//x",
            "consul://h?behavior=keep",
            "consul://h?lock_delay=-1s",
            "consul://h?what=1",
            "consul://user:pw@h",
        ] {
            let err = parse(bad, &mut ConsulOptions::default())
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(matches!(err, Error::InvalidOptions(_)), "{bad}: {err:?}");
        }
        let err = parse("consul://h?token=s3cret&x=1", &mut ConsulOptions::default())
            .err()
            .unwrap();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }
}
