//! `lockkit bench`, run as the real binary on SQLite and on Redis with short runs: the JSON
//! names every figure (floor, uncontended, contended, failover, scale, mutual exclusion,
//! versions, machine, date) and the chart is an SVG; and every floor on every server.
#![cfg(all(feature = "cli", feature = "sqlite"))]

use std::process::Command;

use serde_json::Value;

/// Runs a short bench of `urls`; returns the JSON and the SVG text.
fn bench(urls: &[String]) -> (Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let (json, svg) = (dir.path().join("out.json"), dir.path().join("out.svg"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_lockkit"));
    command.arg("bench");
    for url in urls {
        command.args(["--url", url]);
    }
    let out = command
        .args(["--duration", "500ms", "--iterations", "20", "--rounds", "2"])
        .args(["--workers", "3", "--scale", "20", "--scale-hold", "300ms"])
        .args(["--failover-ttl", "1s"])
        .arg("--json")
        .arg(&json)
        .arg("--chart")
        .arg(&svg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    // No progress bars when standard error is not a terminal.
    assert!(stderr.trim().is_empty(), "{stderr}");
    assert!(stdout.contains("÷floor"), "{stdout}");
    assert!(stdout.contains("cs lk/fl"), "{stdout}");
    let report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (report, std::fs::read_to_string(&svg).unwrap())
}

fn number(value: &Value, path: &str) -> f64 {
    let found = path
        .split('.')
        .fold(value, |v, key| &v[key])
        .as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number in {value:#}"));
    assert!(found.is_finite() && found >= 0.0, "{path} = {found}");
    found
}

fn check(report: &Value, labels: &[&str]) {
    assert!(report["lockkit_version"].is_string());
    assert!(report["date"].as_str().unwrap().ends_with('Z'));
    assert!(number(&report["machine"], "cores") >= 1.0);
    assert!(report["machine"]["os"].is_string());
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), labels.len(), "{report:#}");
    for (result, label) in results.iter().zip(labels) {
        assert_eq!(result["label"], *label);
        assert!(result["backend"].is_string() && result["server_version"].is_string());
        assert!(result["floor"]["fenced"].is_string());
        for stats in ["uncontended.lockkit", "uncontended.floor_fenced"] {
            for figure in ["mean_ms", "p50_ms", "p99_ms", "max_ms"] {
                assert!(number(result, &format!("{stats}.{figure}")) > 0.0);
            }
        }
        assert!(number(result, "uncontended.ratio_to_fenced_floor") > 0.0);
        for side in ["lockkit", "floor_fenced"] {
            // Every cycle waits for a reply (a server's, or SQLite's worker thread's).
            // Per cycle, not per round (22 cycles here): a debug build's cycle takes well under
            // 20 ms of CPU and 100 switches, a round's worth far more.
            let work = format!("uncontended.work.{side}");
            let cpu = number(result, &format!("{work}.cpu_us_per_cycle"));
            assert!(cpu > 0.0 && cpu < 20_000.0, "{result:#}");
            let switches = number(result, &format!("{work}.context_switches_per_cycle"));
            assert!(switches > 0.0 && switches < 100.0, "{result:#}");
        }
        assert!(number(result, "contended.acquisitions") > 0.0);
        number(result, "contended.acquisitions_per_second");
        let fairness = number(result, "contended.fairness");
        assert!(fairness <= 1.0);
        assert_eq!(
            result["contended"]["per_worker"].as_array().unwrap().len(),
            3
        );
        for figure in ["p50_ms", "p99_ms", "max_ms"] {
            number(result, &format!("contended.wait.{figure}"));
            number(result, &format!("contended.handoff.{figure}"));
        }
        assert!(number(result, "failover.took_ms") > 0.0, "{result:#}");
        assert!(number(result, "failover.ttl_ms") >= 1000.0);
        number(result, "failover.ratio_to_ttl");
        assert_eq!(number(result, "scale.names"), 20.0);
        assert_eq!(number(result, "scale.taken"), 20.0, "{result:#}");
        assert_eq!(number(result, "scale.held_at_end"), 20.0);
        number(result, "scale.bytes_per_guard");
        number(result, "scale.cpu_percent_of_a_core");
        number(result, "scale.take_ms");
        assert_eq!(result["mutual_exclusion"]["ok"], true, "{result:#}");
    }
    assert!(report["failures"].as_array().unwrap().is_empty());
}

#[test]
fn sqlite_bench_writes_every_figure() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let (report, svg) = bench(&[url]);
    check(&report, &["sqlite"]);
    assert!(svg.starts_with("<svg") && svg.contains("sqlite"), "{svg}");
    assert!(svg.contains("acquisitions/s"));
}

#[cfg(feature = "redis")]
#[test]
fn redis_bench_writes_every_figure() {
    let url = lockkit_testkit::service_url("LOCKKIT_REDIS_URL");
    let (report, svg) = bench(&[url]);
    check(&report, &["redis"]);
    assert!(report["results"][0]["server_version"] != "unknown");
    assert!(svg.contains("redis"));
}

/// Every floor, fenced and unfenced, on every server of `scripts/services`: a round takes the
/// key and frees it, so the next round finds it free, and a fenced take is a lock: it fails
/// while another client holds the key (two floors of one process share it).
#[cfg(feature = "full")]
#[tokio::test]
async fn every_floor_is_a_lock_that_frees_its_key() {
    use lockkit::bench::Floor;
    use lockkit_testkit::service_url;
    let dir = tempfile::tempdir().unwrap();
    let (pg, my) = (
        service_url("LOCKKIT_POSTGRES_URL"),
        service_url("LOCKKIT_MYSQL_URL"),
    );
    let urls = [
        format!("sqlite://{}", dir.path().join("floor.db").display()),
        service_url("LOCKKIT_REDIS_URL"),
        service_url("LOCKKIT_REDLOCK_URL"),
        service_url("LOCKKIT_ETCD_URL"),
        service_url("LOCKKIT_ZK_URL"),
        service_url("LOCKKIT_CONSUL_URL"),
        pg.clone(),
        format!("{pg}?strategy=table"),
        my.clone(),
        format!("{my}?strategy=table"),
    ];
    for url in urls {
        let connect = || async {
            Floor::connect(&url)
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"))
        };
        let (floor, other) = (connect().await, connect().await);
        let what = floor.fenced_what();
        for fenced in [true, true, false, false, true] {
            let round = floor.round(fenced).await;
            round.unwrap_or_else(|e| panic!("{url} ({what}), fenced {fenced}: {e}"));
        }
        other.take(true).await.unwrap();
        let taken = floor.take(true).await;
        assert!(
            taken.is_err(),
            "{url} ({what}): a fenced take of a held key succeeded"
        );
        other.free(true).await.unwrap();
        floor.round(true).await.unwrap();
        floor.close().await.unwrap();
        other.close().await.unwrap();
    }
}
