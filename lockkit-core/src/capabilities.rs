//! What a backend promises; the conformance suite holds it to every promise.

use std::time::Duration;

/// What a backend guarantees. The conformance suite picks its cases and timings from this:
/// a backend that claims a property runs the case that checks it, and a case whose property
/// is not claimed is not registered at all (never reported as passed).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Fencing tokens strictly increase per lock name across all clients and processes.
    pub fencing: bool,
    /// Waiters are granted the lock in the order they started waiting.
    pub fifo: bool,
    /// A holder that stops renewing (crashed) loses the lock once its TTL has passed.
    pub lease_expiry: bool,
    /// Leases can be renewed (extended) while held.
    pub renewal: bool,
    /// Whether the backend talks to a server over the network.
    pub networked: bool,
    /// The shortest lease TTL the backend accepts.
    pub min_ttl: Duration,
    /// The longest lease TTL the backend accepts.
    pub max_ttl: Duration,
    /// How long past the TTL the server may take to free an expired lease (Consul takes up to
    /// twice the TTL). Zero for backends that free it at the TTL.
    pub expiry_slack: Duration,
    /// [`Admin::inspect`](crate::backend::Admin::inspect) works: who holds a lock.
    pub inspect: bool,
    /// [`Admin::list`](crate::backend::Admin::list) works: which locks are held.
    pub list: bool,
    /// [`Admin::force_release`](crate::backend::Admin::force_release) works.
    pub force_release: bool,
    /// [`Lease::set_value`](crate::backend::Lease::set_value) stores a value with a held lock
    /// and [`Admin::inspect`](crate::backend::Admin::inspect) reports it
    /// ([`LockInfo::value`](crate::LockInfo::value)): leader election
    /// ([`Locks::campaign`](crate::Locks::campaign)) works.
    pub election: bool,
    /// [`Admin::changed`](crate::backend::Admin::changed) wakes on the server's own events
    /// (watch, blocking query, pub/sub, notification) instead of the core's polling default.
    pub watch: bool,
}

impl Capabilities {
    /// A backend that promises nothing yet: no fencing, no FIFO hand-off, no lease expiry,
    /// no renewal, not networked, no operator view (inspect, list, force-release), no
    /// values (election), no server-side watch, the given minimum TTL, a maximum of one day
    /// and no expiry slack. Claim each guarantee the backend keeps with the builder methods; the
    /// conformance suite then runs the cases that check it.
    pub fn new(min_ttl: Duration) -> Self {
        Capabilities {
            fencing: false,
            fifo: false,
            lease_expiry: false,
            renewal: false,
            networked: false,
            min_ttl,
            max_ttl: Duration::from_secs(24 * 3600),
            expiry_slack: Duration::ZERO,
            inspect: false,
            list: false,
            force_release: false,
            election: false,
            watch: false,
        }
    }

    /// Sets [`Capabilities::fencing`].
    #[must_use]
    pub fn fencing(mut self, fencing: bool) -> Self {
        self.fencing = fencing;
        self
    }

    /// Sets [`Capabilities::fifo`].
    #[must_use]
    pub fn fifo(mut self, fifo: bool) -> Self {
        self.fifo = fifo;
        self
    }

    /// Sets [`Capabilities::lease_expiry`].
    #[must_use]
    pub fn lease_expiry(mut self, lease_expiry: bool) -> Self {
        self.lease_expiry = lease_expiry;
        self
    }

    /// Sets [`Capabilities::renewal`].
    #[must_use]
    pub fn renewal(mut self, renewal: bool) -> Self {
        self.renewal = renewal;
        self
    }

    /// Sets [`Capabilities::networked`].
    #[must_use]
    pub fn networked(mut self, networked: bool) -> Self {
        self.networked = networked;
        self
    }

    /// Sets [`Capabilities::max_ttl`].
    #[must_use]
    pub fn max_ttl(mut self, max_ttl: Duration) -> Self {
        self.max_ttl = max_ttl;
        self
    }

    /// Sets [`Capabilities::expiry_slack`].
    #[must_use]
    pub fn expiry_slack(mut self, slack: Duration) -> Self {
        self.expiry_slack = slack;
        self
    }

    /// Sets the operator view's flags: [`Capabilities::inspect`], [`Capabilities::list`] and
    /// [`Capabilities::force_release`].
    #[must_use]
    pub fn admin(mut self, inspect: bool, list: bool, force_release: bool) -> Self {
        self.inspect = inspect;
        self.list = list;
        self.force_release = force_release;
        self
    }

    /// Sets [`Capabilities::election`].
    #[must_use]
    pub fn election(mut self, election: bool) -> Self {
        self.election = election;
        self
    }

    /// Sets [`Capabilities::watch`].
    #[must_use]
    pub fn watch(mut self, watch: bool) -> Self {
        self.watch = watch;
        self
    }
}
