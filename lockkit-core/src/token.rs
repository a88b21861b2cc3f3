//! Fencing tokens.

/// A fencing token: strictly increases per lock name with every acquisition, across all
/// clients and processes. Pass it to the resource you protect and have it reject writes
/// carrying a token lower than the highest it has seen: that makes a paused or partitioned
/// former holder harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl FencingToken {
    /// The token's value.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for FencingToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}
