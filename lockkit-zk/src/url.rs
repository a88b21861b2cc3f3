//! `zk://` URLs.

use lockkit_core::{Error, Result};

/// A parsed `zk://h1:p1,h2:p2[/chroot][?root=/path]` URL.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Parsed {
    /// The connect string of the client crate: `h1:p1,h2:p2[/chroot]`.
    pub(crate) cluster: String,
    /// The `root=` parameter, if given.
    pub(crate) root: Option<String>,
}

pub(crate) fn parse(url: &str) -> Result<Parsed> {
    let bad = |why: &str| Error::InvalidOptions(format!("bad ZooKeeper URL `{url}`: {why}"));
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected zk://host:port[,host:port…][/chroot]"))?;
    if !matches!(scheme.to_ascii_lowercase().as_str(), "zk" | "zookeeper") {
        return Err(bad("the scheme must be zk:// or zookeeper://"));
    }
    let (cluster, query) = match rest.split_once('?') {
        Some((cluster, query)) => (cluster, Some(query)),
        None => (rest, None),
    };
    let hosts = cluster.split('/').next().unwrap_or("");
    if hosts.is_empty() || hosts.split(',').any(str::is_empty) {
        return Err(bad("no host"));
    }
    if hosts.contains('@') {
        return Err(bad("credentials in the URL are not supported"));
    }
    let chroot = &cluster[hosts.len()..];
    if chroot == "/" || chroot.ends_with('/') && !chroot.is_empty() {
        return Err(bad("the chroot must not end with `/`"));
    }
    let mut root = None;
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        if pair.is_empty() {
            continue;
        }
        match pair.split_once('=') {
            Some(("root", value)) => root = Some(value.to_string()),
            _ => return Err(bad(&format!("unknown parameter `{pair}` (known: root)"))),
        }
    }
    Ok(Parsed {
        cluster: cluster.to_string(),
        root,
    })
}

/// The lock root must be an absolute path of non-empty segments, not `/` itself.
pub(crate) fn check_root(root: &str) -> Result<()> {
    let trimmed = root.strip_suffix('/').unwrap_or(root);
    let ok = trimmed.starts_with('/')
        && trimmed.len() > 1
        && trimmed[1..]
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..");
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidOptions(format!(
            "the lock root `{root}` must be an absolute znode path below `/`, like `/lockkit`"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let p = parse("zk://a:1,b:2/app/x?root=/locks").unwrap();
        assert_eq!(p.cluster, "a:1,b:2/app/x");
        assert_eq!(p.root.as_deref(), Some("/locks"));
        let p = parse("zookeeper://127.0.0.1:2181").unwrap();
        assert_eq!(p.cluster, "127.0.0.1:2181");
        assert_eq!(p.root, None);
        for bad in [
            "zk://",
            "zk:///chroot",
            "zk://a:1,,b:2",
            "zk://a:1/",
            "zk://a:1?x=1",
            "redis://a:1",
            "a:1",
            "zk://u:p@a:1",
        ] {
            assert!(matches!(parse(bad), Err(Error::InvalidOptions(_))), "{bad}");
        }
    }

    #[test]
    fn roots() {
        assert!(check_root("/lockkit").is_ok());
        assert!(check_root("/a/b/").is_ok());
        for bad in ["", "/", "lockkit", "/a//b", "/a/../b"] {
            assert!(check_root(bad).is_err(), "{bad}");
        }
    }
}
