//! The URLs of the test servers: an environment variable of the same name, else the file
//! `target/services.env` of the workspace, written by `scripts/services up`.

use std::path::PathBuf;

use lockkit_core::url::ServiceUrl;

/// `<workspace root>/target/services.env`.
fn services_env() -> PathBuf {
    let kit = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    kit.parent()
        .unwrap_or(kit)
        .join("target")
        .join("services.env")
}

/// The `KEY=value` lines of `target/services.env`, in file order. Panics with instructions
/// when the file cannot be read.
fn env_file(wanted: &str) -> Vec<(String, String)> {
    let file = services_env();
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
        panic!(
            "{wanted} is not set and {} cannot be read ({e}): start the test servers with \
             `scripts/services up`, or run everything with `scripts/test`",
            file.display()
        )
    });
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
        .collect()
}

/// The URL of a test server: the environment variable `key` if set (to test against your own
/// servers), else the line `key=...` of `<workspace root>/target/services.env`, written by
/// `scripts/services up`. Panics with instructions when neither is there: a test that needs
/// a server fails loudly without it.
pub fn service_url(key: &str) -> String {
    if let Ok(url) = std::env::var(key) {
        return url;
    }
    match env_file(key).into_iter().find(|(k, _)| k == key) {
        Some((_, url)) => url,
        None => panic!(
            "{key} is not set and {} has no {key}: start that server with \
             `scripts/services up`",
            services_env().display()
        ),
    }
}

/// Every server URL of `target/services.env` (the `LOCKKIT_*_URL` lines), as `(key, url)` in
/// file order, each overridden by its environment variable if set. Panics with instructions
/// when the file cannot be read.
pub fn service_urls() -> Vec<(String, String)> {
    env_file("LOCKKIT_*_URL")
        .into_iter()
        .filter(|(key, _)| key.starts_with("LOCKKIT_") && key.ends_with("_URL"))
        .map(|(key, url)| {
            let url = std::env::var(&key).unwrap_or(url);
            (key, url)
        })
        .collect()
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
