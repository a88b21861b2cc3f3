//! `redis://`, `rediss://` and `redlock://h1,h2,…` URLs.

use lockkit_core::{Error, Result};

/// A parsed lock-service URL.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub(crate) instances: Vec<Instance>,
    pub(crate) redlock: bool,
    pub(crate) prefix: Option<String>,
}

/// One instance: its URL for the redis crate, and its `host:port` for messages.
#[derive(Debug)]
pub(crate) struct Instance {
    pub(crate) url: String,
    pub(crate) address: String,
}

pub(crate) fn parse(url: &str) -> Result<Parsed> {
    let bad = |why: &str| Error::InvalidOptions(format!("bad Redis URL: {why}"));
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no `scheme://`"))?;
    let (redlock, scheme) = match scheme.to_ascii_lowercase().as_str() {
        "redis" => (false, "redis"),
        "rediss" => (false, "rediss"),
        "redlock" => (true, "redis"),
        "redlocks" => (true, "rediss"),
        other => return Err(bad(&format!("unknown scheme `{other}`"))),
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(split);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
        None => (String::new(), authority),
    };
    let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
    let mut prefix = None;
    let mut params = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        if let Some(value) = pair.strip_prefix("prefix=") {
            prefix = Some(value.to_string());
        } else if !pair.starts_with("protocol=") {
            params.push(pair);
        }
    }
    // Subscriptions need RESP3 push messages.
    params.push("protocol=resp3");
    let hosts: Vec<&str> = hosts.split(',').collect();
    if hosts.iter().any(|h| h.is_empty()) {
        return Err(bad("an empty host"));
    }
    if !redlock && hosts.len() > 1 {
        return Err(bad("several hosts: use redlock://h1,h2,… for RedLock"));
    }
    if redlock && hosts.len() < 3 {
        return Err(bad("RedLock needs at least 3 independent instances"));
    }
    let query = params.join("&");
    let instances = hosts
        .into_iter()
        .map(|host| Instance {
            url: format!("{scheme}://{userinfo}{host}{path}?{query}"),
            address: host.to_string(),
        })
        .collect();
    Ok(Parsed {
        instances,
        redlock,
        prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_instance() {
        let p = parse("redis://user:pw@127.0.0.1:16379/2?prefix=app:").unwrap();
        assert!(!p.redlock);
        assert_eq!(p.prefix.as_deref(), Some("app:"));
        assert_eq!(p.instances.len(), 1);
        assert_eq!(
            p.instances[0].url,
            "redis://user:pw@127.0.0.1:16379/2?protocol=resp3"
        );
        assert_eq!(p.instances[0].address, "127.0.0.1:16379");
    }

    #[test]
    fn redlock_instances_share_credentials_and_db() {
        let p = parse("redlock://:pw@a:1,b:2,c:3/1").unwrap();
        assert!(p.redlock);
        let urls: Vec<_> = p.instances.iter().map(|i| i.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "redis://:pw@a:1/1?protocol=resp3",
                "redis://:pw@b:2/1?protocol=resp3",
                "redis://:pw@c:3/1?protocol=resp3"
            ]
        );
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "redis://a:1,b:2",
            "redlock://a:1,b:2",
            "redlock://a:1,,c:3",
            "http://x",
            "redis:x",
        ] {
            assert!(matches!(parse(bad), Err(Error::InvalidOptions(_))), "{bad}");
        }
    }
}
