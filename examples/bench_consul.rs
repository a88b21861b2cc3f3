//! Measures the Consul backend against the floor of raw KV requests on the same agent:
//! uncontended acquire+release vs a raw `PUT` + `DELETE` of one key (on one keep-alive
//! connection), and 8-way contended throughput.
//!
//! ```text
//! cargo run --release --features consul --example bench_consul -- --url consul://127.0.0.1:8500
//! ```
//! Without `--url` it reads `LOCKKIT_CONSUL_URL` of `target/services.env`.
//!
//! An acquire+release is six requests (read the key, create a session, `PUT ?acquire=`, read
//! the key for its fencing token, `PUT ?release=`, destroy the session), four of them Raft
//! writes; the floor is two Raft writes.

#[path = "common/mod.rs"]
mod common;

use std::time::Instant;

use clap::Parser;
use lockkit::ConsulLock;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    /// Consul URL (default: LOCKKIT_CONSUL_URL of target/services.env).
    #[arg(long)]
    url: Option<String>,
    /// Timed iterations per measurement.
    #[arg(long, default_value_t = 500)]
    iterations: usize,
    /// Seconds of the contended run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
}

/// A minimal HTTP/1.1 keep-alive client: one request at a time on one connection.
struct Raw {
    stream: BufReader<TcpStream>,
    host: String,
}

impl Raw {
    async fn connect(host: &str) -> Raw {
        let stream = TcpStream::connect(host).await.expect("connect to Consul");
        stream.set_nodelay(true).unwrap();
        Raw {
            stream: BufReader::new(stream),
            host: host.to_string(),
        }
    }

    async fn call(&mut self, method: &str, path: &str) -> String {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\n\r\n",
            self.host
        );
        self.stream
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await.unwrap();
        String::from_utf8(body).unwrap().trim().to_string()
    }
}

/// Raw `PUT` + `DELETE` of one key, the least a KV round of take-and-free can cost.
async fn floor(host: &str, iterations: usize) -> common::Stats {
    let mut raw = Raw::connect(host).await;
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations + iterations / 10 {
        let started = Instant::now();
        assert_eq!(raw.call("PUT", "/v1/kv/lockkit-bench/floor").await, "true");
        assert_eq!(
            raw.call("DELETE", "/v1/kv/lockkit-bench/floor").await,
            "true"
        );
        if i >= iterations / 10 {
            samples.push(started.elapsed());
        }
    }
    common::stats(samples)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let url = args
        .url
        .or_else(|| common::from_env_file("LOCKKIT_CONSUL_URL"))
        .expect("--url or target/services.env (scripts/services up consul)");
    let host = url
        .strip_prefix("consul://")
        .and_then(|rest| rest.split(['/', '?']).next())
        .expect("a consul:// URL")
        .to_string();
    println!(
        "{:<10} {:<28} {:>10} {:>10} {:>10} {:>8}",
        "backend", "measurement", "mean", "p50", "p99", "ratio"
    );
    let lock = lockkit::Locks::new(ConsulLock::connect(&url).await.expect("connect"));
    let floor = floor(&host, args.iterations).await;
    let ours = common::uncontended(&lock, args.iterations).await;
    let ratio = ours.mean.as_secs_f64() / floor.mean.as_secs_f64();
    for (what, s, r) in [
        ("floor: KV PUT + DELETE", &floor, String::new()),
        ("acquire + release", &ours, format!("{ratio:.2}x")),
    ] {
        println!(
            "{:<10} {what:<28} {:>10.1?} {:>10.1?} {:>10.1?} {r:>8}",
            "consul", s.mean, s.p50, s.p99
        );
    }
    let throughput = common::contended(&url, args.seconds).await;
    println!(
        "{:<10} {:<28} {throughput:>10.0} ops/s",
        "consul", "8-way contended"
    );
}
