//! Counting semaphores, built on the lock: semaphore `name` with limit `N` is the `N` locks
//! `name/permits-N/0` … `name/permits-N/{N-1}` (its slots), and a permit is one of them held.
//! So a permit has everything a lock has on every backend: a lease renewed by the one keeper,
//! release on drop, [`Permit::lost`], expiry of a crashed holder's permit, and a fencing token.
//!
//! **Fencing.** Permits are held side by side, so a resource fences each slot on its own: the
//! token strictly increases per slot ([`Permit::fence_key`]), and a holder whose slot was
//! granted again is refused.
//!
//! **Waiting.** After one pass of single attempts (starting at a random slot), a waiter waits
//! on every slot at once through the backend's own wake-ups, and keeps the first it gets; the
//! other waits are dropped, which leaves nothing queued. On a FIFO backend the longest waiter
//! is at the head of every slot's queue, so permits are handed out in waiting order.
//!
//! **Limits.** Every client must use the same limit for a name. The limit is part of the
//! slots' names, so clients with different limits never share slots; after taking a slot a
//! client lists the semaphore's held slots ([`Admin::list`](crate::backend::Admin::list)) and,
//! if it sees a slot of another limit, gives its permit back and fails with
//! [`Error::LimitMismatch`]. Of two clients that take permits with different limits at the
//! same moment, at least the later one sees the other.

use std::future::Future;
use std::time::Duration;

use futures_util::future::select_all;
use tokio::time::Instant;

use crate::error::{Error, LostReason, Result};
use crate::guard::LockGuard;
use crate::locks::Locks;
use crate::name::LockName;
use crate::options::LockOptions;
use crate::token::FencingToken;

/// The largest semaphore limit: a waiter waits on every slot at once, so a waiter costs the
/// backend up to this many waits.
pub const MAX_PERMITS: usize = 64;

/// One permit of a counting semaphore, from [`Locks::acquire_permit`]. Released when dropped
/// (in the background) or by [`Permit::release`]; renewed while held; [`Permit::lost`]
/// resolves if it is lost anyway.
#[derive(Debug)]
#[must_use = "the permit is given back as soon as it is dropped"]
pub struct Permit {
    guard: LockGuard,
    name: String,
    limit: usize,
    slot: usize,
}

impl Permit {
    /// The semaphore's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The semaphore's limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Which of the `limit` slots this permit is (0-based).
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// The key under which a resource fences this permit: the slot's lock name. Tokens
    /// strictly increase per fence key.
    pub fn fence_key(&self) -> &str {
        self.guard.name()
    }

    /// This permit's fencing token (strictly greater than every earlier token of its slot).
    pub fn fencing_token(&self) -> FencingToken {
        self.guard.fencing_token()
    }

    /// Whether the permit is still held, as far as this process knows.
    pub fn is_held(&self) -> bool {
        self.guard.is_held()
    }

    /// Resolves when the permit is lost (as [`LockGuard::lost`]).
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        self.guard.lost()
    }

    /// The lock guard that carries this permit.
    pub fn guard(&self) -> &LockGuard {
        &self.guard
    }

    /// Gives the permit back; reports [`Error::LockLost`] if it had been lost.
    pub async fn release(self) -> Result<()> {
        self.guard.release().await
    }
}

/// The slots' common prefix for semaphore `name`.
fn slots_prefix(name: &str) -> String {
    format!("{name}/permits-")
}

/// The limit of a listed slot of the semaphore whose prefix is `prefix`, if it is one.
fn slot_limit(prefix: &str, lock: &str) -> Option<usize> {
    let (limit, slot) = lock.strip_prefix(prefix)?.split_once('/')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(limit) && digits(slot)).then(|| limit.parse().ok())?
}

impl Locks {
    /// Takes one of `limit` permits of semaphore `name` with the default options, waiting as
    /// long as they say. See the [module docs](crate::Permit) for how permits map to locks.
    pub async fn acquire_permit(&self, name: &str, limit: usize) -> Result<Permit> {
        self.acquire_permit_with(name, limit, self.defaults()).await
    }

    /// One attempt with the default options: `Ok(None)` if all `limit` permits are held.
    pub async fn try_acquire_permit(&self, name: &str, limit: usize) -> Result<Option<Permit>> {
        self.try_acquire_permit_with(name, limit, self.defaults())
            .await
    }

    /// One attempt: `Ok(None)` if all `limit` permits are held. The wait timeout of `opts`
    /// is not used.
    pub async fn try_acquire_permit_with(
        &self,
        name: &str,
        limit: usize,
        opts: &LockOptions,
    ) -> Result<Option<Permit>> {
        let slots = self.slots(name, limit)?;
        self.try_slots(name, &slots, opts).await
    }

    /// Takes one of `limit` permits of semaphore `name`, waiting up to `opts`' wait timeout
    /// ([`Error::Timeout`] after it). `limit` is 1 to [`MAX_PERMITS`] and must be the same in
    /// every client ([`Error::LimitMismatch`] otherwise).
    pub async fn acquire_permit_with(
        &self,
        name: &str,
        limit: usize,
        opts: &LockOptions,
    ) -> Result<Permit> {
        let started = Instant::now();
        let slots = self.slots(name, limit)?;
        if let Some(permit) = self.try_slots(name, &slots, opts).await? {
            return Ok(permit);
        }
        let mut wait = opts.clone();
        if let Some(timeout) = opts.wait {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(Error::Timeout {
                    name: name.to_owned(),
                    waited: started.elapsed(),
                });
            }
            wait = wait.wait_timeout(left);
        }
        let waits = slots
            .iter()
            .map(|slot| Box::pin(self.acquire_with(slot, &wait)));
        // The first wait to finish decides; dropping the others leaves nothing queued.
        let (first, slot, _others) = select_all(waits).await;
        match first {
            Ok(guard) => self.checked(name, limit, slot, guard).await,
            Err(Error::Timeout { .. }) => Err(Error::Timeout {
                name: name.to_owned(),
                waited: started.elapsed(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Validates the semaphore's name and limit and names its slots.
    fn slots(&self, name: &str, limit: usize) -> Result<Vec<String>> {
        if !(1..=MAX_PERMITS).contains(&limit) {
            return Err(Error::InvalidOptions(format!(
                "a semaphore's limit is 1 to {MAX_PERMITS}, not {limit}"
            )));
        }
        LockName::new(name)?;
        if !self.capabilities().list {
            return Err(Error::Unsupported(format!(
                "the {} backend cannot list its locks, so it cannot check semaphore limits",
                self.backend_name()
            )));
        }
        let prefix = slots_prefix(name);
        (0..limit)
            .map(|slot| {
                let slot = format!("{prefix}{limit}/{slot}");
                LockName::new(&slot).map(|_| slot).map_err(|_| {
                    Error::InvalidName(format!(
                        "semaphore names are at most {} bytes long",
                        crate::MAX_NAME_LEN - (slots_prefix("").len() + 2 * 2 + 1)
                    ))
                })
            })
            .collect()
    }

    /// One pass of single attempts over the slots, from a random one.
    async fn try_slots(
        &self,
        name: &str,
        slots: &[String],
        opts: &LockOptions,
    ) -> Result<Option<Permit>> {
        let start = fastrand::usize(..slots.len());
        for k in 0..slots.len() {
            let slot = (start + k) % slots.len();
            if let Some(guard) = self.try_acquire_with(&slots[slot], opts).await? {
                return self.checked(name, slots.len(), slot, guard).await.map(Some);
            }
        }
        Ok(None)
    }

    /// Keeps a freshly taken slot only if no permit of another limit is held.
    async fn checked(
        &self,
        name: &str,
        limit: usize,
        slot: usize,
        guard: LockGuard,
    ) -> Result<Permit> {
        let prefix = slots_prefix(name);
        let held = match self.list(&prefix).await {
            Ok(held) => held,
            Err(e) => {
                give_back(guard).await;
                return Err(e);
            }
        };
        if let Some(theirs) = held
            .iter()
            .filter_map(|info| slot_limit(&prefix, &info.name))
            .find(|&theirs| theirs != limit)
        {
            give_back(guard).await;
            return Err(Error::LimitMismatch {
                name: name.to_owned(),
                ours: limit,
                theirs,
            });
        }
        Ok(Permit {
            guard,
            name: name.to_owned(),
            limit,
            slot,
        })
    }
}

/// Releases a slot taken by a call that fails, so the failure leaves nothing held.
async fn give_back(guard: LockGuard) {
    const GIVE_BACK_WITHIN: Duration = Duration::from_secs(5);
    let _ = tokio::time::timeout(GIVE_BACK_WITHIN, guard.release()).await;
}

#[cfg(test)]
mod tests {
    use super::slot_limit;

    #[test]
    fn only_slots_of_this_semaphore_count() {
        let prefix = "s/permits-";
        assert_eq!(slot_limit(prefix, "s/permits-3/0"), Some(3));
        assert_eq!(slot_limit(prefix, "s/permits-12/11"), Some(12));
        // Another semaphore whose name starts the same way.
        assert_eq!(slot_limit(prefix, "s/permits-3/permits-2/0"), None);
        assert_eq!(slot_limit(prefix, "s/permits-x/0"), None);
        assert_eq!(slot_limit(prefix, "s/permits-3/"), None);
        assert_eq!(slot_limit(prefix, "t/permits-3/0"), None);
    }
}
