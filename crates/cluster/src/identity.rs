//! Who a member is, and what the cluster believes about it.

use std::net::SocketAddr;
use std::time::SystemTime;

/// A member's identity as gossip carries it. A restart is a new `generation` (the start time
/// in milliseconds), so the cluster tells a node that came back from the one that died.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    pub name: String,
    pub generation: u64,
    /// Where its peer listener is reached (TCP for peer HTTP, UDP for gossip, same port).
    pub addr: SocketAddr,
    pub zone: Option<String>,
}

/// The generation of a node's next life: its start time in ms, unless its last life (as the
/// caller kept it) had that or a later one, because the clock went back or the restart came
/// within the same millisecond. Members take the higher generation of a name as the live one
/// and remember a dead one for an hour, so a smaller one would not rejoin for that long. The
/// margin over the last life covers renewals it made after the caller last kept it.
pub fn next_generation(now_ms: u64, last: Option<u64>) -> u64 {
    match last {
        Some(last) => now_ms.max(last.saturating_add(GENERATION_MARGIN)),
        None => now_ms,
    }
}

/// How far a new life's generation stays above the last one kept (renewals add 1 each).
pub const GENERATION_MARGIN: u64 = 1_000;

/// What the cluster believes of a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberState {
    Alive,
    /// Missed its probes; declared dead unless it answers within the suspicion timeout.
    Suspect,
    Dead,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Dead => "dead",
        }
    }
}

/// A member and since when it has been in its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: NodeId,
    pub state: MemberState,
    pub since: SystemTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_life_is_always_above_the_last() {
        assert_eq!(next_generation(5_000_000, None), 5_000_000);
        assert_eq!(next_generation(5_000_000, Some(4_000_000)), 5_000_000);
        // The clock went back an hour across the restart.
        let last = 5_000_000 + 3_600_000;
        assert_eq!(
            next_generation(5_000_000, Some(last)),
            last + GENERATION_MARGIN
        );
        assert_eq!(next_generation(0, Some(u64::MAX)), u64::MAX);
    }
}
