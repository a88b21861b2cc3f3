//! The URLs of the test servers: an environment variable of the same name, else the file
//! `target/services.env` of the workspace, written by `scripts/services up` (for the
//! three-member clusters: `target/clusters.env`, written by `scripts/clusters up`).

use std::path::PathBuf;

use lockkit_core::url::ServiceUrl;

/// `<workspace root>/target/<file>`.
fn target_file(file: &str) -> PathBuf {
    let kit = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    kit.parent().unwrap_or(kit).join("target").join(file)
}

/// The servers of `scripts/services` (`target/services.env`).
const SERVICES: (&str, &str) = ("services.env", "scripts/services up");
/// The three-member clusters of `scripts/clusters` (`target/clusters.env`).
const CLUSTERS: (&str, &str) = ("clusters.env", "scripts/clusters up");

/// The `KEY=value` lines of `target/<file>`, in file order.
fn env_file(file: &str) -> std::io::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(target_file(file))?;
    Ok(text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
        .collect())
}

/// Fails a test that wants the URL `wanted` when `target/<file>` (written by `script`)
/// cannot be read.
fn no_env_file(wanted: &str, (file, script): (&str, &str), e: std::io::Error) -> ! {
    panic!(
        "{wanted} is not set and {} cannot be read ({e}): start the test servers with \
         `{script}`, or run everything with `scripts/test`",
        target_file(file).display()
    )
}

/// The environment variable `key` if set, else the line `key=...` of `target/<file>`,
/// written by `script`; panics with instructions when neither is there.
fn url_from(key: &str, (file, script): (&str, &str)) -> String {
    if let Ok(url) = std::env::var(key) {
        return url;
    }
    let lines = env_file(file).unwrap_or_else(|e| no_env_file(key, (file, script), e));
    match lines.into_iter().find(|(k, _)| k == key) {
        Some((_, url)) => url,
        None => panic!(
            "{key} is not set and {} has no {key}: start that server with `{script}`",
            target_file(file).display()
        ),
    }
}

/// The URL of a test server: the environment variable `key` if set (to test against your own
/// servers), else the line `key=...` of `<workspace root>/target/services.env`, written by
/// `scripts/services up`. Panics with instructions when neither is there: a test that needs
/// a server fails loudly without it.
pub fn service_url(key: &str) -> String {
    url_from(key, SERVICES)
}

/// The URL of a three-member test cluster (`LOCKKIT_ETCD_CLUSTER_URL`,
/// `LOCKKIT_ZK_CLUSTER_URL`, `LOCKKIT_CONSUL_CLUSTER_URL`): the environment variable `key` if
/// set, else its line in `<workspace root>/target/clusters.env`, written by
/// `scripts/clusters up` (which `scripts/test` runs). Panics with instructions when neither
/// is there.
pub fn cluster_url(key: &str) -> String {
    url_from(key, CLUSTERS)
}

/// Whether `key` names a server URL: `LOCKKIT_*_URL`.
fn is_url_key(key: &str) -> bool {
    key.len() > "LOCKKIT__URL".len() && key.starts_with("LOCKKIT_") && key.ends_with("_URL")
}

/// Every server URL, as `(key, url)`: the `LOCKKIT_*_URL` lines of `target/services.env` in
/// file order, each overridden by its environment variable if set, then the `LOCKKIT_*_URL`
/// environment variables the file does not have, by name. Panics with instructions when
/// there are none (no such variable, and the file cannot be read).
pub fn service_urls() -> Vec<(String, String)> {
    let mut from_env: Vec<(String, String)> = std::env::vars()
        .filter(|(key, _)| is_url_key(key))
        .collect();
    from_env.sort();
    let in_file = match env_file(SERVICES.0) {
        Ok(lines) => lines,
        Err(_) if !from_env.is_empty() => Vec::new(),
        Err(e) => no_env_file("LOCKKIT_*_URL", SERVICES, e),
    };
    let mut urls: Vec<(String, String)> = in_file
        .into_iter()
        .filter(|(key, _)| is_url_key(key))
        .map(|(key, url)| {
            let url = std::env::var(&key).unwrap_or(url);
            (key, url)
        })
        .collect();
    for (key, url) in from_env {
        if !urls.iter().any(|(k, _)| *k == key) {
            urls.push((key, url));
        }
    }
    urls
}

/// `url` with the query parameters `params` (`a=1&b=2`) appended: after `?`, or after `&`
/// when it has a query already. An empty `params` leaves it as it is.
pub fn with_params(url: &str, params: &str) -> String {
    match (params.is_empty(), url.contains('?')) {
        (true, _) => url.to_string(),
        (false, true) => format!("{url}&{params}"),
        (false, false) => format!("{url}?{params}"),
    }
}

/// `host:port` of every host of a URL's authority, in order (`host` alone where the URL
/// names no port): what a raw client of the server is given. Panics on a URL that does not
/// parse or names no host.
pub fn hosts(url: &str) -> Vec<String> {
    let parsed = ServiceUrl::parse(url).unwrap_or_else(|e| panic!("{e}"));
    let hosts = parsed.expect_hosts().unwrap_or_else(|e| panic!("{e}"));
    hosts.iter().map(ToString::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_appended_after_the_right_separator() {
        assert_eq!(with_params("redis://h", ""), "redis://h");
        assert_eq!(
            with_params("pg://h/db", "strategy=table"),
            "pg://h/db?strategy=table"
        );
        assert_eq!(with_params("pg://h/db?a=1", "b=2"), "pg://h/db?a=1&b=2");
    }

    #[test]
    fn hosts_of_a_cluster_url() {
        assert_eq!(
            hosts("etcd://u:p@10.0.0.1:2379,10.0.0.2/x?a=1"),
            ["10.0.0.1:2379", "10.0.0.2"]
        );
    }

    #[test]
    fn an_environment_variable_wins_over_the_file() {
        std::env::set_var("LOCKKIT_TESTKIT_SELF_URL", "redis://elsewhere");
        assert_eq!(service_url("LOCKKIT_TESTKIT_SELF_URL"), "redis://elsewhere");
    }
}
