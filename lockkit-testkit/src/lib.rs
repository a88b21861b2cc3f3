//! What lockkit's integration tests and benchmarks share, so each is written once: the URLs of
//! the test servers ([`service_url`], [`service_urls`]), lock names no other run uses
//! ([`fresh_name`]), servers stopped for a fault test ([`Stopped`]) or cut off behind a proxy ([`Proxy`]), and, from
//! `lockkit::bench` (the code of `lockkit bench`), the warm-up and timing loop
//! ([`time_loop`]) with its statistics ([`Stats`]) and the contended run ([`contended`]), and
//! the checks of a backend's part of leader election ([`election`]).
//!
//! Not published: a dev-dependency of the workspace's tests and examples only.

pub mod election;
mod faults;
mod services;

pub use faults::{services, Proxy, Stopped};
pub use lockkit::bench::{contended, time_loop, try_time_loop, Contended, Stats};
pub use services::{cluster_url, hosts, service_url, service_urls, with_params};

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// `prefix/<16 hex digits>`, a lock name no other test, run or process uses, so tests can
/// share a server (and its leftovers) without seeing each other's locks.
pub fn fresh_name(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS once per thread and differs with every call;
    // the counter, pid and clock make a collision within one run impossible too.
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH);
    hasher.write_u128(now.map_or(0, |d| d.as_nanos()));
    format!("{prefix}/{:016x}", hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_names_differ_and_keep_the_prefix() {
        let names: std::collections::HashSet<String> =
            (0..1000).map(|_| fresh_name("cases/one")).collect();
        assert_eq!(names.len(), 1000);
        assert!(names.iter().all(|n| n.starts_with("cases/one/")));
    }
}
