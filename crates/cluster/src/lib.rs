//! The cluster layer: who the members are ([`membership`]), which of them own a key
//! ([`placement`]), and the shared secret that seals gossip and signs peer requests
//! ([`secret`]).
//!
//! Architecture invariant: this crate knows nothing of storage, registries or HTTP servers. It
//! gives the layers above a list of members and a pure placement function; what moves between
//! members is their business.

pub mod identity;
pub mod membership;
pub mod placement;
pub mod secret;
pub mod simulation;

pub use identity::{Member, MemberState, NodeId};
pub use secret::{AuthError, ClusterSecret};
