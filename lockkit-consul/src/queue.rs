//! The line of waiters of one lock, so waiters get it in the order they came and a releaser
//! that asks again at once queues behind them.
//!
//! Each waiter has a session of its own and, while it waits, the entry `<key>/w/<session>`
//! held by that session (so an entry goes with its session: a crashed waiter holds the line
//! up for its session's TTL at most). The line is the live entries (held by the session
//! they name) by `CreateIndex`. A waiter blocks on the entry ahead of it; the first one
//! blocks on the lock key. A release hands the key over in one transaction: it checks the
//! first waiter's entry, unlocks the key, locks it for that waiter's session and deletes the
//! entry; the waiter wakes with the key already its own, and its token is the key's
//! `ModifyIndex` as the hand-off wrote it. A first waiter that finds the key free (its holder
//! crashed, or a hand-off did not happen) takes it itself, leaving the line in the same
//! transaction.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lockkit_core::backend::{
    retry_until, run_detached, Acquired, Armed, Cleanup, FencingToken, LockName, Outcome,
};
use lockkit_core::{Error, LockOptions, Result, RetryPolicy};
use serde_json::json;
use tokio::time::Instant;

use crate::http::KeyEntry;
use crate::lease::ConsulLease;
use crate::lock::{lease_end, Inner, Session};

/// How many times a release looks for the next live waiter before it just unlocks the key.
const HAND_OFF_TRIES: usize = 4;

/// For how long after this client handed a lock to a waiter its next wait for that lock
/// goes straight into the line, without first trying to take it (it is surely held).
const HANDED_RECENTLY: Duration = Duration::from_secs(1);

/// The most recent hand-offs a client remembers.
const HANDED_KEPT: usize = 64;

/// The folder of `key`'s line (its waiters' entries are right under it).
fn line_of(key: &str) -> String {
    format!("{key}/w")
}

/// The entry of the waiter whose session is `session` in `key`'s line.
fn entry_of(key: &str, session: &str) -> String {
    format!("{key}/w/{session}")
}

/// The sessions of the live waiters among `entries`, first in line first: an entry counts
/// while the session it names holds it.
fn in_line<'a>(key: &str, entries: &'a [KeyEntry]) -> Vec<&'a KeyEntry> {
    let dir = format!("{}/", line_of(key));
    let mut line: Vec<&KeyEntry> = entries
        .iter()
        .filter(|e| {
            let named = e.key.strip_prefix(&dir);
            named.is_some_and(|s| e.session.as_deref() == Some(s))
        })
        .collect();
    line.sort_by(|a, b| (a.create_index, &a.key).cmp(&(b.create_index, &b.key)));
    line
}

/// The session of the first live waiter among `entries`.
fn first_in_line(key: &str, entries: &[KeyEntry]) -> Option<String> {
    in_line(key, entries)
        .first()
        .and_then(|e| e.session.clone())
}

impl Inner {
    fn handed(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.handed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes that this client just handed `key` to a waiter.
    fn note_handed_off(&self, key: &str) {
        let mut handed = self.handed();
        if handed.len() >= HANDED_KEPT {
            handed.retain(|_, at| at.elapsed() < HANDED_RECENTLY);
        }
        if handed.len() < HANDED_KEPT {
            handed.insert(key.to_string(), Instant::now());
        }
    }

    /// Whether this client handed `key` to a waiter within [`HANDED_RECENTLY`] (and forgets
    /// it): a wait for it then enters the line at once.
    pub(crate) fn handed_off_recently(&self, key: &str) -> bool {
        let at = self.handed().remove(key);
        at.is_some_and(|at| at.elapsed() < HANDED_RECENTLY)
    }

    /// The session of the first live waiter for `key`.
    async fn next_in_line(&self, key: &str) -> Result<Option<String>> {
        let entries = self.http.list_keys(&line_of(key)).await?;
        Ok(first_in_line(key, &entries))
    }

    /// Releases `key`, held by `session`, handing it to the first live waiter if there is
    /// one: `false` if `session` did not hold it. `line` is what the lease saw of the line:
    /// nothing (taken without waiting: the unlock reads the line in its own transaction, one
    /// request when nobody waits, and a waiter found then is handed the key in a second one,
    /// or takes it itself first), or that it came through the line, with the waiter seen
    /// behind it (the key is handed to that one in one transaction if it still waits; if it
    /// left, or none was seen, the line is read first).
    pub(crate) async fn release_key(
        &self,
        key: &str,
        session: &str,
        line: Option<Option<&str>>,
    ) -> Result<bool> {
        let mut next = match line {
            None => None,
            Some(Some(behind)) => Some(behind.to_string()),
            Some(None) => self.next_in_line(key).await?,
        };
        let mut released = false;
        for _ in 0..HAND_OFF_TRIES {
            let unlock = json!({"KV": {"Verb": "unlock", "Key": key, "Session": session}});
            let mut ops = Vec::new();
            let (mut unlock_at, mut lock_at) = (None, None);
            match &next {
                None if released => return Ok(true),
                None => {
                    unlock_at = Some(0);
                    ops.push(unlock);
                    ops.push(
                        json!({"KV": {"Verb": "get-tree", "Key": format!("{}/", line_of(key))}}),
                    );
                }
                Some(waiter) => {
                    let entry = entry_of(key, waiter);
                    ops.push(
                        json!({"KV": {"Verb": "check-session", "Key": entry, "Session": waiter}}),
                    );
                    if !released {
                        unlock_at = Some(ops.len());
                        ops.push(unlock);
                    }
                    lock_at = Some(ops.len());
                    ops.push(json!({"KV": {"Verb": "lock", "Key": key, "Session": waiter}}));
                    ops.push(json!({"KV": {"Verb": "delete", "Key": entry}}));
                }
            }
            match self.http.transact("release (txn)", &json!(ops)).await? {
                Ok(_) if next.is_some() => {
                    self.note_handed_off(key);
                    return Ok(true);
                }
                Ok(entries) => {
                    released = true;
                    next = first_in_line(key, &entries);
                }
                Err(errors) => {
                    let failed = |at: Option<usize>| errors.iter().any(|e| Some(e.op_index) == at);
                    if failed(unlock_at) {
                        return Ok(false);
                    }
                    // Unlocked already, and someone took it: the first waiter itself (or a
                    // newcomer, who hands it on when done).
                    if released && failed(lock_at) {
                        return Ok(true);
                    }
                    // The waiter left the line: the next one.
                    next = self.next_in_line(key).await?;
                }
            }
        }
        if released {
            return Ok(true);
        }
        self.http.put_key(key, "", session).await
    }
}

/// A waiter in a lock's line: its own session and its entry. Dropped (a timeout, a
/// cancelled wait, a failed request), it leaves the line, hands the lock on if it was just
/// handed to it, and destroys its session.
pub(crate) struct Waiter {
    inner: Arc<Inner>,
    session: Session,
    key: String,
}

impl Waiter {
    fn entry(&self) -> String {
        entry_of(&self.key, &self.session.id)
    }
}

impl Cleanup for Waiter {
    const WHAT: &'static str = "leaving a Consul lock's line";

    /// Each step is tried again after a connection error for as long as the session is
    /// surely alive: an entry left behind would hold the line up (and be handed the lock)
    /// until the session lapses.
    async fn cleanup(self) -> Result<()> {
        let http = &self.inner.http;
        let session = &self.session.id;
        let until =
            lease_end(self.session.fresh_at, self.session.ttl).unwrap_or_else(|_| Instant::now());
        let policy = RetryPolicy::default();
        // Out of the line first, so the next waiter wakes; then the key on, if it was handed
        // here; then the session.
        let delete = json!([{"KV": {"Verb": "delete", "Key": self.entry()}}]);
        let leave = || http.transact("leave the line (txn)", &delete);
        let left = retry_until(&policy, until, leave).await.map(drop);
        let hand_on = || self.inner.release_key(&self.key, session, Some(None));
        let handed = retry_until(&policy, until, hand_on).await.map(drop);
        let destroyed = retry_until(&policy, until, || http.destroy_session(session)).await;
        left.and(handed).and(destroyed)
    }
}

/// A waiter after one request: still waiting, or its session is gone (a new one is needed).
type Step = Outcome<Option<Armed<Waiter>>>;

/// What one look at the line came to.
enum Look {
    /// The lock is the waiter's.
    Won(Acquired),
    /// Still waiting (the waiter, unless its session is gone), and whether it just tried to
    /// take the key, found free, and was refused.
    Again(Option<Armed<Waiter>>, bool),
    /// Out of line without the lock: enter again, with this session if it is still there.
    Gone(Option<Armed<Session>>),
}

impl Inner {
    /// Enters `key`'s line with `session` (one transaction).
    async fn enter_line(self: Arc<Self>, key: String, session: Armed<Session>) -> Result<Step> {
        let entry = entry_of(&key, &session.id);
        let ops = json!([{"KV": {"Verb": "lock", "Key": entry, "Session": session.id}}]);
        let waiter = |session: Armed<Session>| Waiter {
            inner: self.clone(),
            session: session.disarm(),
            key: key.clone(),
        };
        match self.http.transact("enter the line (txn)", &ops).await {
            Ok(Ok(_)) => Ok(Outcome::Busy(Some(Armed::new(waiter(session))))),
            // Refused: the session is gone (nothing to destroy).
            Ok(Err(_)) => {
                session.disarm();
                Ok(Outcome::Busy(None))
            }
            // Unknown whether it entered: leave (in the background) and fail.
            Err(e) => {
                drop(Armed::new(waiter(session)));
                Err(e)
            }
        }
    }

    /// The first waiter's own take of a free key: it leaves the line in the same
    /// transaction.
    async fn take_turn(
        self: Arc<Self>,
        name: LockName,
        waiter: Armed<Waiter>,
        behind: Option<String>,
    ) -> Result<Step> {
        let (key, session, entry) = (&waiter.key, &waiter.session.id, waiter.entry());
        let ops = json!([
            {"KV": {"Verb": "check-session", "Key": entry, "Session": session}},
            {"KV": {"Verb": "lock", "Key": key, "Session": session}},
            {"KV": {"Verb": "delete", "Key": entry}},
        ]);
        let answer = match self.http.transact("take the lock (txn)", &ops).await {
            Ok(answer) => answer,
            // Unknown whether it took the key: the waiter's next look at the line tells (out
            // of line and holding it, or still first).
            Err(e) if e.is_retryable() => return Ok(Outcome::Busy(Some(waiter))),
            Err(e) => return Err(e),
        };
        match answer {
            Ok(entries) => {
                let taken = entries.into_iter().find(|e| e.key == *key);
                match taken {
                    Some(taken) => Ok(Outcome::Won(self.won(name, waiter, &taken, behind)?)),
                    None => Ok(Outcome::Busy(Some(waiter))),
                }
            }
            Err(_) => Ok(Outcome::Busy(Some(waiter))),
        }
    }

    /// The lease of a waiter whose session holds the key (`entry`); `behind` is the session
    /// of the waiter seen next in line, if any.
    fn won(
        self: &Arc<Self>,
        name: LockName,
        waiter: Armed<Waiter>,
        entry: &KeyEntry,
        behind: Option<String>,
    ) -> Result<Acquired> {
        let waiter = waiter.disarm();
        let taken = entry.acquisition();
        let valid_until = lease_end(waiter.session.fresh_at, waiter.session.ttl)?;
        let lease = ConsulLease::new(self.clone(), name, waiter.key, waiter.session, taken);
        Ok(Acquired::new(
            FencingToken(taken.token),
            valid_until,
            Box::new(lease.came_through_line(behind)),
        ))
    }

    /// Renews a waiter's session once a third of its TTL has passed; `None` if Consul
    /// dropped it (its entry went with it). A failed renewal gives the waiter back with the
    /// error (it may still be in line).
    async fn keep(
        mut waiter: Armed<Waiter>,
    ) -> std::result::Result<Option<Armed<Waiter>>, (Error, Armed<Waiter>)> {
        match waiter.session.keep().await {
            Ok(true) => Ok(Some(waiter)),
            Ok(false) => {
                waiter.disarm();
                Ok(None)
            }
            Err(e) => Err((e, waiter)),
        }
    }

    /// Waits in `name`'s line with `session` (a session of the waiter's own) until the lock
    /// is handed to it, or it is first in line and finds the lock free.
    ///
    /// A request that fails on the way (the agent's servers electing a leader: a blocking
    /// query in flight fails, and so does every request until a leader is elected) does not
    /// give up the waiter's place: the waiter keeps its entry, pauses as `opts.retry` says,
    /// and looks at the line again; it gives up (and leaves the line) with the error only
    /// when the policy allows no retries, or its session could lapse before the next try.
    pub(crate) async fn wait_in_line(
        self: &Arc<Self>,
        name: &LockName,
        opts: &LockOptions,
        session: Armed<Session>,
        deadline: Option<Instant>,
    ) -> Result<Acquired> {
        let ttl = opts.ttl;
        let key = self.key(name);
        let max_wait = self.settings.max_blocking_wait.max(Duration::from_secs(1));
        let mut session = Some(session);
        let mut waiter: Option<Armed<Waiter>> = None;
        let mut refused = 0u32;
        let mut failed = 0u32;
        // Keeps the waiter in line through a failed request (see above).
        let ride_out = |e: Error, current: Option<Armed<Waiter>>, failed: &mut u32| {
            let Some(current) = current else {
                return Err(e);
            };
            let pause = opts.retry.backoff(*failed);
            let lapse = current.session.fresh_at.checked_add(current.session.ttl);
            let lapses = lapse.is_none_or(|at| Instant::now() + pause >= at);
            if !e.is_retryable() || opts.retry.max_retries == 0 || lapses {
                return Err(e);
            }
            tracing::debug!(error = %e, ?pause, "waiting in a Consul lock's line");
            *failed = failed.saturating_add(1);
            Ok((current, pause))
        };
        loop {
            let current = match waiter.take() {
                Some(current) => match Self::keep(current).await {
                    Ok(kept) => kept,
                    Err((e, current)) => {
                        let (current, pause) = ride_out(e, Some(current), &mut failed)?;
                        tokio::time::sleep(pause).await;
                        waiter = Some(current);
                        continue;
                    }
                },
                None => {
                    let session = match session.take() {
                        Some(session) => session,
                        None => Session::for_line(self, name, ttl).await?,
                    };
                    let enter = self.clone().enter_line(key.clone(), session);
                    match run_detached(enter).await? {
                        Outcome::Busy(entered) => entered,
                        Outcome::Won(acquired) => return Ok(acquired),
                    }
                }
            };
            let Some(current) = current else {
                continue;
            };
            // Each wait ends in time to renew the session (and at the caller's deadline).
            let wait = deadline
                .map_or(max_wait, |d| d.saturating_duration_since(Instant::now()))
                .clamp(Duration::from_secs(1), max_wait)
                .min(ttl / 3);
            match self.look(name, &key, current, wait).await {
                Ok(Look::Won(acquired)) => return Ok(acquired),
                Ok(Look::Again(back, took)) => {
                    failed = 0;
                    waiter = back;
                    if took {
                        // Refused although the key looked free (a lock-delay, or a newcomer
                        // took it): pause a little more each time.
                        refused += 1;
                        if refused > 1 {
                            let pause = 25 * u64::from(refused.min(40));
                            tokio::time::sleep(Duration::from_millis(pause)).await;
                        }
                    } else {
                        refused = 0;
                    }
                }
                Ok(Look::Gone(kept)) => {
                    failed = 0;
                    session = kept;
                }
                Err((e, current)) => {
                    let (current, pause) = ride_out(e, current, &mut failed)?;
                    tokio::time::sleep(pause).await;
                    waiter = Some(current);
                }
            }
        }
    }

    /// One look at the line by the waiter `current`, and one wait: on the entry ahead, or,
    /// for the first in line, on the key (taken if free). A failed request gives the waiter
    /// back with the error, if it still is one.
    async fn look(
        self: &Arc<Self>,
        name: &LockName,
        key: &str,
        current: Armed<Waiter>,
        wait: Duration,
    ) -> std::result::Result<Look, (Error, Option<Armed<Waiter>>)> {
        let entries = match self.http.list_keys(&line_of(key)).await {
            Ok(entries) => entries,
            Err(e) => return Err((e, Some(current))),
        };
        let line = in_line(key, &entries);
        let me = line.iter().position(|e| e.key == current.entry());
        match me {
            // Out of line: handed the lock, or the entry is gone (deleted from outside, or
            // with the session).
            None => {
                let entry = match self.http.read_key(key, None, Duration::ZERO).await {
                    Ok((entry, _)) => entry,
                    Err(e) => return Err((e, Some(current))),
                };
                match entry {
                    Some(entry) if entry.session.as_deref() == Some(&current.session.id) => {
                        let behind = line.first().and_then(|e| e.session.clone());
                        let won = self.won(name.clone(), current, &entry, behind);
                        won.map(Look::Won).map_err(|e| (e, None))
                    }
                    // Enter again, with the same session if it is still there.
                    _ => {
                        let mut kept = Armed::new(current.disarm().session);
                        match kept.renew().await {
                            Ok(true) => Ok(Look::Gone(Some(kept))),
                            Ok(false) => {
                                kept.disarm();
                                Ok(Look::Gone(None))
                            }
                            Err(e) => Err((e, None)),
                        }
                    }
                }
            }
            // First: the key is handed over, or taken when free.
            Some(0) => {
                let behind = line.get(1).and_then(|e| e.session.clone());
                let mut index = None;
                loop {
                    let (entry, next) = match self.http.read_key(key, index, wait).await {
                        Ok(read) => read,
                        Err(e) => return Err((e, Some(current))),
                    };
                    match &entry {
                        Some(e) if e.session.as_deref() == Some(&current.session.id) => {
                            let won = self.won(name.clone(), current, e, behind);
                            return won.map(Look::Won).map_err(|e| (e, None));
                        }
                        Some(e) if e.session.is_some() => {}
                        _ => {
                            let take = self.clone().take_turn(name.clone(), current, behind);
                            return match run_detached(take).await {
                                Ok(Outcome::Won(acquired)) => Ok(Look::Won(acquired)),
                                Ok(Outcome::Busy(back)) => Ok(Look::Again(back, true)),
                                Err(e) => Err((e, None)),
                            };
                        }
                    }
                    if index.is_some() {
                        // One blocking wait done: renew if due, and look at the line again.
                        return Ok(Look::Again(Some(current), false));
                    }
                    index = next;
                }
            }
            // Behind someone: wait until the entry ahead changes (left, or its session went).
            Some(at) => {
                let ahead = line[at - 1];
                let index = Some(ahead.modify_index);
                match self.http.read_key(&ahead.key, index, wait).await {
                    Ok(_) => Ok(Look::Again(Some(current), false)),
                    Err(e) => Err((e, Some(current))),
                }
            }
        }
    }
}
