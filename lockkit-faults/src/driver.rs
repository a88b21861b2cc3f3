//! The fault driver: one schedule = one backend, one fault class, one seed. It starts worker
//! processes against the backend (through the fault proxy), injects the fault at seeded
//! times, stops the workers and runs the checkers over their logs and the register.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::check::{self, Limits, Report};
use crate::event::{ms, now_ns, Event, Log};
use crate::proxy::{Mode, Proxy};
use crate::register::Register;

/// The fault classes. One per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// 1: kill -9 the holder (a replacement worker is started).
    KillHolder,
    /// 2: SIGSTOP the holder between its read and its write, past the TTL, then SIGCONT.
    StopHolder,
    /// 3: SIGSTOP a waiter past its own lease, then SIGCONT.
    StopWaiter,
    /// 4: kill -9 the server (every instance) and restart it.
    KillServer,
    /// 5: SIGSTOP the server below the TTL, then above it.
    StopServer,
    /// 6: the proxy between workers and server: latency, black-hole, reset.
    Proxy,
    /// 7: RedLock: kill one instance, delete its data, restart it.
    WipeInstance,
    /// 8: a storm of cancelled acquires next to the workers.
    Storm,
    /// 9: kill the leader of a 3-member cluster while a lock is held. Wired by the cluster
    /// set-up: `scripts/clusters`; runs for backends whose cluster URL is known.
    LeaderKill,
}

impl Fault {
    /// Every class in matrix order.
    pub const ALL: [Fault; 9] = [
        Fault::KillHolder,
        Fault::StopHolder,
        Fault::StopWaiter,
        Fault::KillServer,
        Fault::StopServer,
        Fault::Proxy,
        Fault::WipeInstance,
        Fault::Storm,
        Fault::LeaderKill,
    ];

    /// Its short name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillHolder => "kill-holder",
            Fault::StopHolder => "stop-holder",
            Fault::StopWaiter => "stop-waiter",
            Fault::KillServer => "kill-server",
            Fault::StopServer => "stop-server",
            Fault::Proxy => "proxy",
            Fault::WipeInstance => "wipe-instance",
            Fault::Storm => "storm",
            Fault::LeaderKill => "leader-kill",
        }
    }

    /// Parses [`Fault::name`].
    pub fn parse(s: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == s)
    }
}

/// A backend under test: how to reach it and which server instances it runs on.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Row name (`postgres-advisory`, ...).
    pub key: &'static str,
    /// The direct URL (`None` for SQLite: a file per run).
    pub url: Option<String>,
    /// Instance names of `scripts/services` (for server faults); empty = embedded.
    pub instances: Vec<&'static str>,
    /// Lease TTL.
    pub ttl: Duration,
    /// Liveness bound (d): from a heal to the next grant.
    pub recovery: Duration,
    /// A 3-member cluster URL of this backend, for [`Fault::LeaderKill`].
    pub cluster_url: Option<String>,
}

impl Backend {
    /// Whether `fault` means something for this backend.
    pub fn applies(&self, fault: Fault) -> bool {
        let server = !self.instances.is_empty();
        match fault {
            Fault::KillServer | Fault::StopServer | Fault::Proxy => server,
            Fault::WipeInstance => self.key == "redlock",
            Fault::LeaderKill => self.cluster_url.is_some(),
            _ => true,
        }
    }

    /// The server group: backends sharing a server never run at the same time.
    pub fn group(&self) -> &'static str {
        self.instances.first().copied().unwrap_or(self.key)
    }
}

/// Every backend and strategy, from the env file of the fault servers. Bounds: a crashed
/// holder's lease runs out after its TTL (Consul: up to twice the TTL), then a waiter is told
/// within its back-off; 5 s on top covers reconnecting to a restarted server.
pub fn backends(env: &HashMap<String, String>) -> Vec<Backend> {
    let two = Duration::from_secs(2);
    let b = |key, url: Option<String>, instances: Vec<&'static str>, ttl: Duration| {
        let slack = if key == "consul" { ttl } else { Duration::ZERO };
        Backend {
            key,
            url,
            instances,
            ttl,
            recovery: ttl + ttl / 3 + slack + Duration::from_secs(5),
            cluster_url: None,
        }
    };
    let get = |k: &str| env.get(k).cloned();
    let strategy = |k: &str, s: &str| get(k).map(|u| format!("{u}?strategy={s}"));
    let mut out = vec![b("sqlite", None, vec![], two)];
    let servers = [
        ("redis", get("LOCKKIT_REDIS_URL"), vec!["redis-16379"], two),
        (
            "redlock",
            get("LOCKKIT_REDLOCK_URL"),
            vec![
                "redis-16380",
                "redis-16381",
                "redis-16382",
                "redis-16383",
                "redis-16384",
            ],
            two,
        ),
        ("etcd", get("LOCKKIT_ETCD_URL"), vec!["etcd"], two),
        ("zk", get("LOCKKIT_ZK_URL"), vec!["zk"], two),
        (
            "consul",
            get("LOCKKIT_CONSUL_URL"),
            vec!["consul"],
            Duration::from_secs(10),
        ),
        (
            "postgres-advisory",
            strategy("LOCKKIT_POSTGRES_URL", "advisory"),
            vec!["postgres"],
            two,
        ),
        (
            "postgres-table",
            strategy("LOCKKIT_POSTGRES_URL", "table"),
            vec!["postgres"],
            two,
        ),
        (
            "mysql-advisory",
            strategy("LOCKKIT_MYSQL_URL", "advisory"),
            vec!["mysql"],
            two,
        ),
        (
            "mysql-table",
            strategy("LOCKKIT_MYSQL_URL", "table"),
            vec!["mysql"],
            two,
        ),
    ];
    for (key, url, instances, ttl) in servers {
        if url.is_some() {
            out.push(b(key, url, instances, ttl));
        }
    }
    // Cluster leader kill (class 9) plugs in here: a backend whose cluster URL is known
    // (e.g. LOCKKIT_ETCD_CLUSTER_URL written by scripts/clusters) gets `cluster_url`.
    for backend in &mut out {
        let key = format!(
            "LOCKKIT_{}_CLUSTER_URL",
            backend
                .key
                .split('-')
                .next()
                .unwrap_or_default()
                .to_uppercase()
        );
        backend.cluster_url = get(&key);
    }
    out
}

/// Where the fault servers live and how to restart them.
#[derive(Debug, Clone)]
pub struct Services {
    /// `scripts/services`.
    pub script: PathBuf,
    /// Its `LOCKKIT_SERVICES_TARGET`.
    pub target: PathBuf,
    /// Its `LOCKKIT_SERVICES_PORT_OFFSET`.
    pub port_offset: u32,
}

impl Services {
    /// `scripts/clusters`, next to `scripts/services`.
    fn clusters(&self) -> PathBuf {
        self.script.with_file_name("clusters")
    }

    /// Fault class 9: `scripts/clusters kill-leader` for the backend's cluster (it returns once
    /// a new leader is elected); the killed member's name.
    async fn kill_leader(&self, backend: &Backend) -> Result<String, String> {
        let cluster = backend.key.split('-').next().unwrap_or(backend.key);
        let out = Command::new(self.clusters())
            .args(["kill-leader", cluster])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("{}: {e}", self.clusters().display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "kill-leader {cluster} failed: {}{}",
                stdout,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // "killed MEMBER PID at UNIX-SECONDS"
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("killed "))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .ok_or_else(|| format!("kill-leader {cluster}: no `killed` line in {stdout:?}"))
    }

    /// Starts a killed cluster member again in its data dir.
    async fn start_member(&self, member: &str) -> Result<(), String> {
        let out = Command::new(self.clusters())
            .args(["start", member])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("{}: {e}", self.clusters().display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "start {member} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn pid(&self, instance: &str) -> Option<i32> {
        let path = self.target.join("services").join(instance).join("pid");
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    fn dir(&self, instance: &str) -> Option<PathBuf> {
        let path = self.target.join("services").join(instance).join("dir");
        Some(PathBuf::from(std::fs::read_to_string(path).ok()?.trim()))
    }

    /// Sends `signal` to the instance's process group (PostgreSQL's backends too).
    fn signal(&self, instance: &str, signal: Signal) -> Result<(), String> {
        let pid = self
            .pid(instance)
            .ok_or_else(|| format!("{instance}: no pid under {}", self.target.display()))?;
        killpg(Pid::from_raw(pid), signal)
            .or_else(|_| nix::sys::signal::kill(Pid::from_raw(pid), signal))
            .map_err(|e| format!("{instance}: {signal} to {pid}: {e}"))
    }

    async fn start(&self, instances: &[&str]) -> Result<(), String> {
        let out = Command::new(&self.script)
            .arg("start-one")
            .args(instances)
            .env("LOCKKIT_SERVICES_TARGET", &self.target)
            .env("LOCKKIT_SERVICES_PORT_OFFSET", self.port_offset.to_string())
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("{}: {e}", self.script.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "start-one {instances:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    async fn kill_and_restart(
        &self,
        instances: &[&str],
        down: Duration,
        wipe: bool,
    ) -> Result<(), String> {
        for i in instances {
            self.signal(i, Signal::SIGKILL)?;
        }
        // let the processes go (a killed PostgreSQL postmaster's children leave on their own)
        for i in instances {
            let pid = self.pid(i).unwrap_or(0);
            for _ in 0..100 {
                if nix::sys::signal::kill(Pid::from_raw(pid), None).is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if wipe {
            for i in instances {
                let dir = self.dir(i).ok_or_else(|| format!("{i}: no dir"))?;
                for entry in std::fs::read_dir(&dir).map_err(|e| e.to_string())? {
                    let path = entry.map_err(|e| e.to_string())?.path();
                    let name = path
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned();
                    if name.starts_with("appendonly") || name.ends_with(".rdb") {
                        let _ =
                            std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                    }
                }
            }
        }
        tokio::time::sleep(down).await;
        self.start(instances).await
    }
}

/// One schedule's settings.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The backend.
    pub backend: Backend,
    /// The fault class.
    pub fault: Fault,
    /// Seed of every random choice.
    pub seed: u64,
    /// The register checks tokens (false = the negative control).
    pub fenced: bool,
    /// Fault repetitions (1 in the short form).
    pub rounds: u32,
    /// Worker processes.
    pub workers: u32,
    /// Where the logs and the register go (emptied first).
    pub dir: PathBuf,
    /// This program, for the worker processes.
    pub exe: PathBuf,
}

/// The outcome of one schedule.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Backend row name.
    pub backend: &'static str,
    /// Fault class.
    pub fault: Fault,
    /// Fenced register (false = negative control).
    pub fenced: bool,
    /// The checkers' report; a driver failure is one more violation.
    pub report: Report,
    /// Wall time of the run.
    pub wall: Duration,
    /// Where its logs are.
    pub dir: PathBuf,
}

struct Worker {
    id: String,
    child: Child,
    pid: i32,
    log: Tail,
}

/// Reads a JSON-lines log incrementally.
struct Tail {
    path: PathBuf,
    offset: u64,
}

impl Tail {
    fn poll(&mut self) -> Vec<Event> {
        let Ok(mut file) = File::open(&self.path) else {
            return Vec::new();
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut reader = BufReader::new(file);
        let mut out = Vec::new();
        let mut line = String::new();
        while let Ok(n) = reader.read_line(&mut line) {
            if n == 0 || !line.ends_with('\n') {
                break; // a line still being written is read next time
            }
            self.offset += n as u64;
            if let Ok(e) = serde_json::from_str(&line) {
                out.push(e);
            }
            line.clear();
        }
        out
    }
}

struct Run<'a> {
    s: &'a Schedule,
    services: &'a Services,
    url: String,
    name: String,
    proxy: Proxy,
    log: Log,
    workers: Vec<Worker>,
    last: HashMap<String, Event>,
    grants: Vec<u64>,
    rng: fastrand::Rng,
    next_id: u32,
    until: u64,
}

impl Run<'_> {
    fn spawn(&mut self, storm: bool) -> Result<(), String> {
        let id = if storm {
            format!("storm{}", self.next_id)
        } else {
            format!("w{}", self.next_id)
        };
        self.next_id += 1;
        let log = self.s.dir.join(format!("{id}.jsonl"));
        let stderr =
            File::create(self.s.dir.join(format!("{id}.stderr"))).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&self.s.exe);
        cmd.arg("worker")
            .args(["--url", &self.url, "--name", &self.name, "--id", &id])
            .arg("--log")
            .arg(&log)
            .arg("--register")
            .arg(self.s.dir.join("register.db"))
            .args(["--ttl-ms", &self.s.backend.ttl.as_millis().to_string()])
            .args(["--until-ns", &self.until.to_string()])
            .args(["--seed", &self.rng.u64(..).to_string()]);
        if !self.s.fenced {
            cmd.arg("--unfenced");
        }
        if storm {
            cmd.args(["--tasks", "16", "--cancel-max-ms", "60"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("worker: {e}"))?;
        let pid = child
            .id()
            .map(|p| p as i32)
            .ok_or("worker exited at once")?;
        self.workers.push(Worker {
            id,
            child,
            pid,
            log: Tail {
                path: log,
                offset: 0,
            },
        });
        Ok(())
    }

    fn poll(&mut self) {
        for w in &mut self.workers {
            for e in w.log.poll() {
                if e.ev == "grant" {
                    self.grants.push(e.t);
                }
                self.last.insert(w.id.clone(), e);
            }
        }
    }

    fn note(&self, ev: &str, what: Option<String>, target: Option<&str>) {
        let mut e = Event::new("driver", ev);
        e.what = what;
        e.target = target.map(str::to_owned);
        self.log.put(&e);
    }

    async fn sleep(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20).min(end - Instant::now())).await;
            self.poll();
        }
    }

    /// Waits (up to `limit`) for a plain worker whose last event is one of `evs`; its index.
    async fn find(&mut self, evs: &[&str], limit: Duration) -> Option<usize> {
        let end = Instant::now() + limit;
        loop {
            self.poll();
            let mut found: Vec<usize> = self
                .workers
                .iter()
                .enumerate()
                .filter(|(_, w)| w.id.starts_with('w'))
                .filter(|(_, w)| {
                    self.last
                        .get(&w.id)
                        .is_some_and(|e| evs.contains(&e.ev.as_str()))
                })
                .map(|(i, _)| i)
                .collect();
            if !found.is_empty() {
                let pick = self.rng.usize(..found.len());
                return Some(found.swap_remove(pick));
            }
            if Instant::now() >= end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn signal(&self, i: usize, signal: Signal) {
        let _ = nix::sys::signal::kill(Pid::from_raw(self.workers[i].pid), signal);
    }

    /// Waits until a grant after `t`, or `limit`.
    async fn await_grant_after(&mut self, t: u64, limit: Duration) {
        let end = Instant::now() + limit;
        while Instant::now() < end && !self.grants.iter().any(|&g| g > t) {
            self.sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGSTOPs a worker whose last event is one of `evs` for `d`, then SIGCONTs it.
    async fn stop_worker(&mut self, evs: &[&str], what: &str, d: Duration) -> Result<(), String> {
        // The driver sees a worker's state a little late (more so on a busy machine): stop
        // it, then check its log again, frozen now; if it had moved on, resume it at once
        // (a few milliseconds) and pick again.
        let mut tries = 0;
        let i = loop {
            let i = self
                .find(evs, Duration::from_secs(10))
                .await
                .ok_or_else(|| format!("{what}: no worker seen in {evs:?}"))?;
            self.signal(i, Signal::SIGSTOP);
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.poll();
            let still = self
                .last
                .get(&self.workers[i].id)
                .is_some_and(|e| evs.contains(&e.ev.as_str()));
            tries += 1;
            if still || tries >= 50 {
                break i;
            }
            self.signal(i, Signal::SIGCONT);
        };
        let id = self.workers[i].id.clone();
        self.note("fault", Some(what.into()), Some(&id));
        self.note("stop", None, Some(&id));
        self.sleep(d).await;
        self.signal(i, Signal::SIGCONT);
        self.note("cont", None, Some(&id));
        self.note("heal", Some(what.into()), None);
        Ok(())
    }

    async fn inject(&mut self) -> Result<(), String> {
        let ttl = self.s.backend.ttl;
        // past the TTL, and past the time a server may take to end an expired lease
        let past_ttl =
            ttl + if self.s.backend.key == "consul" {
                ttl
            } else {
                Duration::ZERO
            } + Duration::from_millis(1500);
        let jitter = Duration::from_millis(self.rng.u64(0..=1000));
        self.sleep(Duration::from_millis(500) + jitter).await;
        let instances = self.s.backend.instances.clone();
        match self.s.fault {
            Fault::KillHolder => {
                let i = self
                    .find(&["grant", "read", "writing"], Duration::from_secs(10))
                    .await
                    .ok_or("no holder seen")?;
                let id = self.workers[i].id.clone();
                self.signal(i, Signal::SIGKILL);
                self.note("fault", Some("kill -9 holder".into()), Some(&id));
                self.note("kill", None, Some(&id));
                self.note("heal", Some("kill -9 holder".into()), None);
                self.spawn(false)?;
            }
            Fault::StopHolder => {
                // a holder in its pause, between its read and its write
                self.stop_worker(&["read"], "SIGSTOP holder", past_ttl)
                    .await?;
            }
            Fault::StopWaiter => {
                self.stop_worker(&["attempt"], "SIGSTOP waiter", past_ttl)
                    .await?;
            }
            Fault::KillServer | Fault::WipeInstance => {
                let (what, chosen, wipe) = if self.s.fault == Fault::KillServer {
                    ("kill -9 server, restart", instances.clone(), false)
                } else {
                    let one = instances[self.rng.usize(..instances.len())];
                    (
                        "kill -9 one instance, restart it without its data",
                        vec![one],
                        true,
                    )
                };
                self.find(&["grant", "read", "writing"], Duration::from_secs(10))
                    .await;
                self.note("fault", Some(what.into()), chosen.first().copied());
                let down = Duration::from_millis(self.rng.u64(300..=1500));
                self.services.kill_and_restart(&chosen, down, wipe).await?;
                self.note("heal", Some(what.into()), None);
            }
            Fault::StopServer => {
                for (what, d) in [
                    ("SIGSTOP server below the TTL", ttl / 2),
                    ("SIGSTOP server above the TTL", past_ttl),
                ] {
                    self.find(&["grant", "read", "writing"], Duration::from_secs(10))
                        .await;
                    self.note("fault", Some(what.into()), None);
                    for i in &instances {
                        self.services.signal(i, Signal::SIGSTOP)?;
                    }
                    self.sleep(d).await;
                    for i in &instances {
                        self.services.signal(i, Signal::SIGCONT)?;
                    }
                    self.note("heal", Some(what.into()), None);
                    let t = now_ns();
                    self.await_grant_after(t, self.s.backend.recovery).await;
                    self.sleep(Duration::from_millis(500)).await;
                }
            }
            Fault::Proxy => {
                let phases = [
                    (
                        "proxy latency 150 ms",
                        Mode::Latency(Duration::from_millis(150)),
                        Duration::from_secs(2),
                    ),
                    ("proxy black-hole past the TTL", Mode::BlackHole, past_ttl),
                    ("proxy reset", Mode::Reset, Duration::from_secs(1)),
                ];
                for (what, mode, d) in phases {
                    self.find(&["grant", "read", "writing"], Duration::from_secs(10))
                        .await;
                    self.note("fault", Some(what.into()), None);
                    self.proxy.set(mode);
                    self.sleep(d).await;
                    self.proxy.set(Mode::Pass);
                    self.note("heal", Some(what.into()), None);
                    let t = now_ns();
                    self.await_grant_after(t, self.s.backend.recovery).await;
                    self.sleep(Duration::from_millis(500)).await;
                }
            }
            Fault::Storm => {
                self.note("fault", Some("storm of cancelled acquires".into()), None);
                self.spawn(true)?;
                self.sleep(Duration::from_secs(3)).await;
                let storm = self.workers.len() - 1;
                self.signal(storm, Signal::SIGTERM);
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), self.workers[storm].child.wait())
                        .await;
                self.note("heal", Some("storm of cancelled acquires".into()), None);
            }
            Fault::LeaderKill => {
                let what = "kill -9 the cluster leader";
                self.find(&["grant", "read", "writing"], Duration::from_secs(10))
                    .await;
                self.note("fault", Some(what.into()), None);
                let member = self.services.kill_leader(&self.s.backend).await?;
                // `kill-leader` returns once a new leader is elected: the heal.
                self.note("heal", Some(what.into()), Some(&member));
                let t = now_ns();
                self.await_grant_after(t, self.s.backend.recovery).await;
                self.services.start_member(&member).await?;
                self.sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(())
    }
}

/// Rewrites every `127.0.0.1:PORT` of `url` to a proxy port forwarding to it.
async fn through_proxy(url: &str, proxy: &Proxy) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = url;
    while let Some(i) = rest.find("127.0.0.1:") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "127.0.0.1:".len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        let port: u16 = after[..digits]
            .parse()
            .map_err(|_| format!("no port in {url}"))?;
        let target = format!("127.0.0.1:{port}").parse().expect("address");
        let local = proxy.listen(target).await.map_err(|e| e.to_string())?;
        out.push_str(&format!("127.0.0.1:{local}"));
        rest = &after[digits..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Runs one schedule.
pub async fn run(s: &Schedule, services: &Services) -> RunResult {
    let started = Instant::now();
    let limits = Limits {
        ttl: s.backend.ttl.as_nanos() as u64,
        renew: (s.backend.ttl / 3).as_nanos() as u64,
        recovery: s.backend.recovery.as_nanos() as u64,
    };
    let mut report = match drive(s, services).await {
        Ok(()) => match collect(&s.dir, s.fenced).await {
            Ok((events, history, value)) => {
                let mut report = check::check(&events, &history, value, limits);
                if !history.iter().any(|h| h.op == "write") {
                    report
                        .violations
                        .push("driver: no write was accepted: the run checked nothing".into());
                }
                report
            }
            Err(e) => Report {
                violations: vec![format!("driver: reading the run: {e}")],
                ..Report::default()
            },
        },
        Err(e) => Report {
            violations: vec![format!("driver: {e}")],
            ..Report::default()
        },
    };
    if !s.fenced {
        report.violations.retain(|v| !v.starts_with("driver"));
    }
    RunResult {
        backend: s.backend.key,
        fault: s.fault,
        fenced: s.fenced,
        report,
        wall: started.elapsed(),
        dir: s.dir.clone(),
    }
}

async fn collect(
    dir: &Path,
    fenced: bool,
) -> Result<(Vec<Event>, Vec<crate::register::Accepted>, i64), String> {
    let events = crate::event::read_dir(dir).map_err(|e| e.to_string())?;
    let register = Register::open(&dir.join("register.db"), fenced)
        .await
        .map_err(|e| e.to_string())?;
    let history = register.history().await.map_err(|e| e.to_string())?;
    let value = register.value().await.map_err(|e| e.to_string())?;
    register.close().await;
    Ok((events, history, value))
}

async fn drive(s: &Schedule, services: &Services) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(&s.dir);
    std::fs::create_dir_all(&s.dir).map_err(|e| format!("{}: {e}", s.dir.display()))?;
    let proxy = Proxy::new();
    let url = match &s.backend.url {
        Some(url) if s.fault == Fault::LeaderKill => {
            s.backend.cluster_url.clone().unwrap_or_else(|| url.clone())
        }
        Some(url) => through_proxy(url, &proxy).await?,
        None => format!("sqlite://{}", s.dir.join("locks.db").display()),
    };
    // the register exists before the workers open it
    Register::open(&s.dir.join("register.db"), s.fenced)
        .await
        .map_err(|e| format!("register: {e}"))?
        .close()
        .await;
    let log = Log::open(&s.dir.join("driver.jsonl")).map_err(|e| e.to_string())?;
    let mut run = Run {
        s,
        services,
        url,
        name: format!(
            "faults/{}/{}/{}/{}",
            s.backend.key,
            s.fault.name(),
            s.seed,
            now_ns()
        ),
        proxy,
        log,
        workers: Vec::new(),
        last: HashMap::new(),
        grants: Vec::new(),
        rng: fastrand::Rng::with_seed(s.seed),
        next_id: 0,
        until: now_ns() + ms(600_000),
    };
    for _ in 0..s.workers {
        run.spawn(false)?;
    }
    let result = schedule(&mut run).await;
    // stop everyone: resume the stopped, SIGTERM, then SIGKILL stragglers
    for i in 0..run.workers.len() {
        run.signal(i, Signal::SIGCONT);
        run.signal(i, Signal::SIGTERM);
    }
    for w in &mut run.workers {
        if tokio::time::timeout(Duration::from_secs(15), w.child.wait())
            .await
            .is_err()
        {
            let _ = w.child.kill().await;
        }
    }
    result
}

async fn schedule(run: &mut Run<'_>) -> Result<(), String> {
    // warm up: a few grants first
    let end = Instant::now() + Duration::from_secs(20);
    while run.grants.len() < 2 && Instant::now() < end {
        run.sleep(Duration::from_millis(50)).await;
    }
    if run.grants.is_empty() {
        return Err("no grant in the first 20 s".into());
    }
    for _ in 0..run.s.rounds {
        run.inject().await?;
        // liveness after the heal: wait for the next grant (or the bound), then settle
        let healed = now_ns();
        run.await_grant_after(healed, run.s.backend.recovery + Duration::from_secs(1))
            .await;
        run.sleep(Duration::from_millis(1000)).await;
    }
    Ok(())
}
