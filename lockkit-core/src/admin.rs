//! Inspecting locks from outside their holders: who holds a lock, which locks are held, and
//! removing a stuck one. Optional for a backend: every method has a default that fails with
//! [`Error::Unsupported`], and [`Capabilities`](crate::Capabilities) says which ones work
//! (`inspect`, `list`, `force_release`, all off by default).
//!
//! A backend opts in by returning itself from [`Backend::admin`](crate::backend::Backend::admin)
//! and implementing the methods it can. Users call them through
//! [`Locks::inspect`](crate::Locks::inspect), [`Locks::list`](crate::Locks::list) and
//! [`Locks::force_release`](crate::Locks::force_release), which validate names first.

use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::name::LockName;
use crate::token::FencingToken;

/// What the server says about one held lock. Fields a backend cannot tell are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockInfo {
    /// The lock name, as users gave it.
    pub name: String,
    /// The holder's fencing token.
    pub token: Option<FencingToken>,
    /// How long the holder's lease has left if it is not renewed (as the server counts it).
    pub remaining: Option<Duration>,
    /// The holder's identity on the server (owner id, session id, lease id).
    pub owner: Option<String>,
    /// The value the holder stored with [`Lease::set_value`](crate::backend::Lease::set_value)
    /// (an elected leader's announcement), if any. Only the current holder's value is ever
    /// reported: a value a former holder stored is not.
    pub value: Option<String>,
}

impl LockInfo {
    /// A held lock about which nothing more is known yet.
    pub fn new(name: impl Into<String>) -> Self {
        LockInfo {
            name: name.into(),
            token: None,
            remaining: None,
            owner: None,
            value: None,
        }
    }

    /// Sets [`LockInfo::token`].
    #[must_use]
    pub fn token(mut self, token: u64) -> Self {
        self.token = Some(FencingToken(token));
        self
    }

    /// Sets [`LockInfo::remaining`].
    #[must_use]
    pub fn remaining(mut self, remaining: Duration) -> Self {
        self.remaining = Some(remaining);
        self
    }

    /// Sets [`LockInfo::value`].
    #[must_use]
    pub fn value(mut self, value: impl Into<String>) -> Self {
        self.value = Some(value.into());
        self
    }

    /// Sets [`LockInfo::owner`].
    #[must_use]
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }
}

/// The operator's view of a backend. Every method fails with [`Error::Unsupported`] unless
/// the backend implements it (and claims it in its capabilities).
#[async_trait]
pub trait Admin: Send + Sync {
    /// The lock `name` if it is held now, else `None`.
    async fn inspect(&self, name: &LockName) -> Result<Option<LockInfo>> {
        let _ = name;
        Err(Error::Unsupported(
            "this backend cannot inspect a lock".into(),
        ))
    }

    /// Every lock held now whose name starts with `prefix` (`""`: all), sorted by name.
    async fn list(&self, prefix: &str) -> Result<Vec<LockInfo>> {
        let _ = prefix;
        Err(Error::Unsupported(
            "this backend cannot list its locks".into(),
        ))
    }

    /// Takes the lock `name` away from its holder, whoever it is; `false` if it was free.
    /// The next acquisition's fencing token is higher than the removed holder's, so a holder
    /// that is still running is fenced off; it learns of the loss at its next renewal.
    async fn force_release(&self, name: &LockName) -> Result<bool> {
        let _ = name;
        Err(Error::Unsupported(
            "this backend cannot remove a lock it does not hold".into(),
        ))
    }

    /// Waits until the lock `name` may have changed from `seen` (what the caller's last
    /// [`Admin::inspect`] returned): taken, released, expired, or given a new value. Returns
    /// by `deadline` at the latest; returning early without a change is allowed (the caller
    /// inspects again and compares), missing a change is not. Cancel-safe.
    ///
    /// Leader observers ([`Locks::observe`](crate::Locks::observe)) call it in a loop. A
    /// backend with server-side events (a watch, a blocking query, pub/sub) implements it
    /// with them and claims [`Capabilities::watch`](crate::Capabilities::watch), typically:
    /// start watching, inspect once more, return at once if that differs from `seen`, else
    /// wait for an event. The default polls: it sleeps [`POLL_INTERVAL`] (or until
    /// `deadline`).
    async fn changed(
        &self,
        name: &LockName,
        seen: Option<&LockInfo>,
        deadline: Instant,
    ) -> Result<()> {
        let _ = (name, seen);
        tokio::time::sleep_until(deadline.min(Instant::now() + POLL_INTERVAL)).await;
        Ok(())
    }
}

/// Whether two looks at a lock ([`Admin::inspect`] answers) show the same state: both free,
/// or the same holder (token and owner) with the same value. What an [`Admin::changed`]
/// compares its fresh look with `seen` by.
pub fn same_state(a: Option<&LockInfo>, b: Option<&LockInfo>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => (&a.token, &a.owner, &a.value) == (&b.token, &b.owner, &b.value),
        _ => false,
    }
}

/// How often [`Admin::changed`]'s default looks again: the delay with which observers on a
/// backend without server-side events see a change.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The longest value [`Lease::set_value`](crate::backend::Lease::set_value) accepts, in
/// bytes (the core checks it before calling the backend).
pub const MAX_VALUE_LEN: usize = 4096;
