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
