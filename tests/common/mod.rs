//! What the integration tests share: the URLs of the real servers.

use std::collections::HashMap;
use std::path::Path;

/// The URL of a test server: the environment variable `key` if set (to test against your own
/// servers), else the line `key=...` of `target/services.env`, written by
/// `scripts/services up`. Panics with instructions when neither is there: a test that needs a
/// server fails loudly without it.
#[allow(dead_code)]
pub(crate) fn service_url(key: &str) -> String {
    if let Ok(url) = std::env::var(key) {
        return url;
    }
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/services.env");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
        panic!(
            "{key} is not set and {} cannot be read ({e}): start the test servers with \
             `scripts/services up`, or run everything with `scripts/test`",
            file.display()
        )
    });
    let urls: HashMap<&str, &str> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    match urls.get(key) {
        Some(url) => url.to_string(),
        None => panic!(
            "{} has no {key}: start that server with `scripts/services up`",
            file.display()
        ),
    }
}
