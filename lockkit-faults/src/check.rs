//! The checkers, over the merged event logs of one run and the register's final state:
//!
//! - (a) the fenced register never accepted a token lower than one it had accepted, every
//!   write follows the value before it (no lost update), and every acknowledged write is in
//!   its final state;
//! - (b) tokens increase in the real-time order of grants (a grant that returned before
//!   another acquire began carries a lower token);
//! - (c) a holder whose lock went to another holder was told (`lost()` fired, or `release`
//!   said `LockLost`) within TTL + renewal interval + 1 s of that grant, counted from its
//!   resumption when it was the one stopped;
//! - (d) liveness: after each fault heals a grant comes within the backend's bound, and no
//!   acquire with wait time left fails (a waiter must ride out the fault).

use std::collections::BTreeMap;

use crate::event::Event;
use crate::register::Accepted;

/// The limits a run is checked against, in nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Lease TTL.
    pub ttl: u64,
    /// Renewal interval.
    pub renew: u64,
    /// Liveness bound: from a heal to the next grant.
    pub recovery: u64,
}

impl Limits {
    /// The loss-signal bound: TTL + renewal interval + 1 s.
    pub fn loss_bound(&self) -> u64 {
        self.ttl + self.renew + 1_000_000_000
    }
}

/// What the checkers found in one run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Grants logged.
    pub grants: usize,
    /// Register operations rejected as stale.
    pub stale_rejected: usize,
    /// Every violation, one line each, prefixed with its checker's letter.
    pub violations: Vec<String>,
    /// The longest time a holder took to learn of its loss (ns).
    pub worst_loss: Option<u64>,
    /// The longest time from a heal to the next grant (ns).
    pub worst_recovery: Option<u64>,
}

/// One grant, with when its hold ended as the holder saw it.
#[derive(Debug, Clone)]
struct Grant {
    w: String,
    token: u64,
    at: u64,
    t: u64,
    /// `releasing`, `lost` or the holder's death, whichever came first.
    end: Option<u64>,
    /// When the holder was told it lost the lock (`lost()`, or `release` said `LockLost`).
    told: Option<u64>,
    /// When `lost()` fired (a `release` that finds the lock gone is no loss signal when
    /// nobody took the lock over: the holder had finished with it).
    lost: Option<u64>,
    killed: Option<u64>,
}

/// Runs every checker.
pub fn check(events: &[Event], history: &[Accepted], final_value: i64, limits: Limits) -> Report {
    let mut report = Report::default();
    let grants = grants(events);
    report.grants = grants.len();
    report.stale_rejected = events
        .iter()
        .filter(|e| (e.ev == "read" || e.ev == "write") && e.ok == Some(false))
        .count();
    register(events, history, final_value, &mut report);
    token_order(&grants, &mut report);
    loss_signal(events, &grants, limits, &mut report);
    liveness(events, &grants, limits, &mut report);
    report
}

fn grants(events: &[Event]) -> Vec<Grant> {
    let mut out: Vec<Grant> = Vec::new();
    // open grant of each worker: index into out
    let mut open: BTreeMap<&str, usize> = BTreeMap::new();
    for e in events {
        match e.ev.as_str() {
            "grant" => {
                if let (Some(token), Some(at)) = (e.token, e.at) {
                    open.insert(&e.w, out.len());
                    out.push(Grant {
                        w: e.w.clone(),
                        token,
                        at,
                        t: e.t,
                        end: None,
                        told: None,
                        lost: None,
                        killed: None,
                    });
                }
            }
            "releasing" | "lost" | "release" => {
                if let Some(&i) = open.get(e.w.as_str()) {
                    let g = &mut out[i];
                    if Some(g.token) == e.token {
                        if e.ev != "release" && g.end.is_none() {
                            g.end = Some(e.t);
                        }
                        let lost_release = e.ev == "release"
                            && e.ok == Some(false)
                            && e.err.as_deref().is_some_and(|s| s.starts_with("lock_lost"));
                        if (e.ev == "lost" || lost_release) && g.told.is_none() {
                            g.told = Some(e.t);
                        }
                        if e.ev == "lost" && g.lost.is_none() {
                            g.lost = Some(e.t);
                        }
                    }
                }
            }
            "kill" => {
                let target = e.target.as_deref().unwrap_or_default();
                for g in out
                    .iter_mut()
                    .filter(|g| g.w == target || g.w.starts_with(&format!("{target}.")))
                {
                    if g.end.is_none() {
                        g.end = Some(e.t);
                    }
                    g.killed.get_or_insert(e.t);
                }
            }
            _ => {}
        }
    }
    out
}

/// (a) the register.
fn register(events: &[Event], history: &[Accepted], final_value: i64, report: &mut Report) {
    let mut highest: Option<&Accepted> = None;
    let mut last_write = 0i64;
    let mut writes = 0i64;
    for op in history {
        if let Some(h) = highest {
            if op.token < h.token {
                report.violations.push(format!(
                    "(a) register accepted a {} with token {} after token {} (seq {} after {})",
                    op.op, op.token, h.token, op.seq, h.seq
                ));
            }
        }
        if highest.is_none_or(|h| op.token >= h.token) {
            highest = Some(op);
        }
        if op.op == "write" {
            writes += 1;
            if op.value != last_write + 1 {
                report.violations.push(format!(
                    "(a) lost update: write of {} with token {} (seq {}) followed the value {}",
                    op.value, op.token, op.seq, last_write
                ));
            }
            last_write = op.value;
        }
    }
    if final_value != last_write || final_value != writes {
        report.violations.push(format!(
            "(a) lost update: final value {final_value}, {writes} accepted writes, last written {last_write}"
        ));
    }
    for e in events
        .iter()
        .filter(|e| e.ev == "write" && e.ok == Some(true))
    {
        let found = history
            .iter()
            .any(|h| h.op == "write" && Some(h.token) == e.token && Some(h.value) == e.value);
        if !found {
            report.violations.push(format!(
                "(a) acknowledged write of {:?} with token {:?} by {} is missing from the register",
                e.value, e.token, e.w
            ));
        }
    }
}

/// (b) real-time order of grants.
fn token_order(grants: &[Grant], report: &mut Report) {
    let mut by_time: Vec<&Grant> = grants.iter().collect();
    by_time.sort_by_key(|g| g.t);
    let mut prefix_max: Vec<(u64, &Grant)> = Vec::with_capacity(by_time.len());
    for g in &by_time {
        let best = match prefix_max.last() {
            Some(&(m, mg)) if m >= g.token => (m, mg),
            _ => (g.token, *g),
        };
        prefix_max.push(best);
    }
    for b in grants {
        // grants that returned before b's acquire began
        let n = by_time.partition_point(|g| g.t < b.at);
        if n == 0 {
            continue;
        }
        let (max, a) = prefix_max[n - 1];
        if max >= b.token {
            report.violations.push(format!(
                "(b) {} got token {} after {} had already got token {} ({} ms earlier)",
                b.w,
                b.token,
                a.w,
                a.token,
                (b.at - a.t) / 1_000_000
            ));
        }
    }
}

/// The worker's latest `cont` at or before `t`.
fn resumed(events: &[Event], w: &str, t: u64) -> Option<u64> {
    events
        .iter()
        .filter(|e| e.ev == "cont" && e.t <= t && e.target.as_deref() == Some(w))
        .map(|e| e.t)
        .max()
}

/// (c) the loss signal.
fn loss_signal(events: &[Event], grants: &[Grant], limits: Limits, report: &mut Report) {
    let run_end = events.last().map_or(0, |e| e.t);
    let bound = limits.loss_bound();
    for g in grants.iter().filter(|g| g.killed.is_none()) {
        let end = g.end.unwrap_or(u64::MAX);
        let Some(next) = grants
            .iter()
            .filter(|n| n.token > g.token && n.t > g.t && n.t < end)
            .min_by_key(|n| n.t)
        else {
            if let Some(told) = g.lost {
                // not taken over: measured from the latest fault, grant or resumption
                let fault = events
                    .iter()
                    .filter(|e| e.ev == "fault" && e.t <= told)
                    .map(|e| e.t)
                    .max()
                    .unwrap_or(0);
                let from = fault.max(g.t).max(resumed(events, &g.w, told).unwrap_or(0));
                report.worst_loss = report.worst_loss.max(Some(told - from));
            }
            continue;
        };
        let probe = g.told.unwrap_or(run_end);
        let from = next.t.max(resumed(events, &g.w, probe).unwrap_or(0));
        match g.told {
            Some(told) => {
                let delay = told.saturating_sub(from);
                report.worst_loss = report.worst_loss.max(Some(delay));
                if delay > bound {
                    report.violations.push(format!(
                        "(c) {} (token {}) learned of its loss {} ms after {} got token {}, bound {} ms",
                        g.w,
                        g.token,
                        delay / 1_000_000,
                        next.w,
                        next.token,
                        bound / 1_000_000
                    ));
                }
            }
            None if run_end >= from + bound => report.violations.push(format!(
                "(c) {} (token {}) was never told it lost the lock to {} (token {})",
                g.w, g.token, next.w, next.token
            )),
            None => {}
        }
    }
}

/// (d) liveness.
fn liveness(events: &[Event], grants: &[Grant], limits: Limits, report: &mut Report) {
    let run_end = events.last().map_or(0, |e| e.t);
    for heal in events.iter().filter(|e| e.ev == "heal") {
        let next = grants.iter().filter(|g| g.t >= heal.t).map(|g| g.t).min();
        let waited = next.unwrap_or(run_end).saturating_sub(heal.t);
        if next.is_some() || waited >= limits.recovery {
            report.worst_recovery = report.worst_recovery.max(Some(waited));
        }
        if waited > limits.recovery {
            report.violations.push(format!(
                "(d) no grant within {} ms of the heal of {} ({})",
                limits.recovery / 1_000_000,
                heal.what.as_deref().unwrap_or("a fault"),
                match next {
                    Some(_) => format!("the next came after {} ms", waited / 1_000_000),
                    None => "none came".to_owned(),
                }
            ));
        }
    }
    let failed: Vec<&Event> = events
        .iter()
        .filter(|e| e.ev == "acquire_error" && e.deadline.is_none_or(|d| e.t + 500_000_000 < d))
        .collect();
    if let Some(first) = failed.first() {
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for e in &failed {
            let msg = e.err.clone().unwrap_or_default();
            let kind = msg.split(':').next().unwrap_or_default().to_owned();
            *kinds.entry(kind).or_default() += 1;
        }
        report.violations.push(format!(
            "(d) {} acquires gave up with wait time left ({kinds:?}); first by {}: {}",
            failed.len(),
            first.w,
            first.err.as_deref().unwrap_or_default()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const LIMITS: Limits = Limits {
        ttl: 2 * S,
        renew: S,
        recovery: 5 * S,
    };

    fn ev(t: u64, w: &str, name: &str) -> Event {
        Event {
            t,
            w: w.into(),
            ev: name.into(),
            ..Event::default()
        }
    }

    fn grant(t: u64, at: u64, w: &str, token: u64) -> Event {
        Event {
            token: Some(token),
            at: Some(at),
            ..ev(t, w, "grant")
        }
    }

    fn tok(t: u64, w: &str, name: &str, token: u64) -> Event {
        Event {
            token: Some(token),
            ..ev(t, w, name)
        }
    }

    fn write(t: u64, w: &str, token: u64, value: i64) -> Event {
        Event {
            value: Some(value),
            ok: Some(true),
            ..tok(t, w, "write", token)
        }
    }

    fn acc(seq: i64, op: &str, token: u64, value: i64) -> Accepted {
        Accepted {
            seq,
            op: op.into(),
            token,
            value,
        }
    }

    /// Two clean holds, one after the other.
    fn clean() -> (Vec<Event>, Vec<Accepted>) {
        let events = vec![
            grant(10, 5, "a", 1),
            write(20, "a", 1, 1),
            tok(30, "a", "releasing", 1),
            grant(40, 35, "b", 2),
            write(50, "b", 2, 2),
            tok(60, "b", "releasing", 2),
        ];
        let history = vec![
            acc(1, "read", 1, 0),
            acc(2, "write", 1, 1),
            acc(3, "read", 2, 1),
            acc(4, "write", 2, 2),
        ];
        (events, history)
    }

    #[test]
    fn a_clean_run_passes() {
        let (events, history) = clean();
        let report = check(&events, &history, 2, LIMITS);
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        assert_eq!(report.grants, 2);
    }

    #[test]
    fn a_reports_a_lower_token_accepted_after_a_higher_one() {
        let (events, mut history) = clean();
        history.push(acc(5, "read", 1, 2));
        let report = check(&events, &history, 2, LIMITS);
        assert!(
            report
                .violations
                .iter()
                .any(|v| v.starts_with("(a) register accepted")),
            "{:?}",
            report.violations
        );
    }

    #[test]
    fn a_reports_a_lost_update() {
        let (events, mut history) = clean();
        // a stale holder wrote 1 + 1 again: the value 2 was written twice
        history.push(acc(5, "write", 3, 2));
        let report = check(&events, &history, 2, LIMITS);
        assert!(
            report.violations.iter().any(|v| v.contains("lost update")),
            "{:?}",
            report.violations
        );
    }

    #[test]
    fn a_reports_an_acknowledged_write_missing() {
        let (mut events, history) = clean();
        events.push(write(70, "b", 2, 3));
        let report = check(&events, &history, 2, LIMITS);
        assert!(
            report.violations.iter().any(|v| v.contains("missing")),
            "{:?}",
            report.violations
        );
    }

    #[test]
    fn b_reports_a_token_lower_than_an_earlier_grant() {
        let (mut events, history) = clean();
        events.push(grant(80, 70, "c", 2));
        let report = check(&events, &history, 2, LIMITS);
        assert!(
            report.violations.iter().any(|v| v.starts_with("(b)")),
            "{:?}",
            report.violations
        );
        // overlapping acquires are not ordered
        let (mut events, history) = clean();
        events.insert(0, grant(12, 1, "c", 0));
        let report = check(&events, &history, 2, LIMITS);
        assert!(
            !report.violations.iter().any(|v| v.starts_with("(b)")),
            "{:?}",
            report.violations
        );
    }

    #[test]
    fn c_reports_a_holder_told_too_late_or_never() {
        let ok = vec![
            grant(S, 0, "a", 1),
            grant(4 * S, 3 * S, "b", 2),
            tok(5 * S, "a", "lost", 1),
            tok(6 * S, "a", "releasing", 1),
        ];
        let report = check(&ok, &[], 0, LIMITS);
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        assert_eq!(report.worst_loss, Some(S));

        let late = vec![
            grant(S, 0, "a", 1),
            grant(4 * S, 3 * S, "b", 2),
            tok(9 * S, "a", "lost", 1),
        ];
        let report = check(&late, &[], 0, LIMITS);
        assert!(
            report.violations.iter().any(|v| v.starts_with("(c)")),
            "{:?}",
            report.violations
        );

        let never = vec![
            grant(S, 0, "a", 1),
            grant(4 * S, 3 * S, "b", 2),
            tok(5 * S, "a", "releasing", 1),
            Event {
                ok: Some(true),
                ..tok(5 * S, "a", "release", 1)
            },
            ev(20 * S, "b", "exit"),
        ];
        let report = check(&never, &[], 0, LIMITS);
        assert!(
            report.violations.iter().any(|v| v.contains("never told")),
            "{:?}",
            report.violations
        );

        // a holder stopped over the takeover is measured from its resumption
        let stopped = vec![
            grant(S, 0, "a", 1),
            Event {
                target: Some("a".into()),
                ..ev(2 * S, "driver", "stop")
            },
            grant(5 * S, 4 * S, "b", 2),
            Event {
                target: Some("a".into()),
                ..ev(10 * S, "driver", "cont")
            },
            tok(10 * S + 1000, "a", "lost", 1),
        ];
        let report = check(&stopped, &[], 0, LIMITS);
        assert!(report.violations.is_empty(), "{:?}", report.violations);
    }

    #[test]
    fn d_reports_slow_recovery_and_waiters_giving_up() {
        let heal = Event {
            what: Some("server restart".into()),
            ..ev(S, "driver", "heal")
        };
        let slow = vec![heal.clone(), grant(7 * S, 0, "a", 1)];
        let report = check(&slow, &[], 0, LIMITS);
        assert!(
            report
                .violations
                .iter()
                .any(|v| v.starts_with("(d) no grant")),
            "{:?}",
            report.violations
        );
        assert_eq!(report.worst_recovery, Some(6 * S));

        let none = vec![heal.clone(), ev(8 * S, "a", "exit")];
        let report = check(&none, &[], 0, LIMITS);
        assert!(
            report.violations.iter().any(|v| v.contains("none came")),
            "{:?}",
            report.violations
        );

        let gave_up = vec![
            heal,
            Event {
                at: Some(S),
                deadline: Some(61 * S),
                err: Some("connection: connection refused".into()),
                ..ev(2 * S, "a", "acquire_error")
            },
            grant(3 * S, 0, "b", 1),
        ];
        let report = check(&gave_up, &[], 0, LIMITS);
        assert!(
            report
                .violations
                .iter()
                .any(|v| v.contains("gave up with wait time left")),
            "{:?}",
            report.violations
        );
    }
}
