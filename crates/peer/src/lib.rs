//! A node's side of the cluster: which members exist now ([`View`]), which of them own a key
//! ([`Cluster::owners`]), and the signed HTTP client that asks a peer for a blob, a manifest or
//! a pull ([`client`]).
//!
//! Peer requests never wait out a TCP timeout: connecting has a short deadline, a request that
//! has not answered by the hedge delay (derived from observed peer latency) lets the caller ask
//! the next candidate in parallel, and a blob stream that stalls fails so the caller can resume
//! elsewhere.
//!
//! Architecture invariant: this crate knows nothing of storage or of how the server answers
//! peers; it is a client and a view of the membership.

pub mod client;
pub mod metrics;
pub mod rate;
pub mod tls;

use std::sync::Arc;

use pier_cluster::{placement, ClusterSecret, Member, MemberState, NodeId};

pub use client::{
    BlobAnswer, Holding, ManifestAnswer, PeerClient, PeerClock, PeerError, PeerTimeouts,
    PullRequest, SwarmAnswer, SwarmHolder, SwarmReport, BUSY_HEADER, PIECE_HEADER,
};

/// The membership as the rest of pier needs it. Implemented by the gossip membership and by a
/// fixed list in tests.
pub trait View: Send + Sync {
    /// This node.
    fn local(&self) -> NodeId;
    /// Every member known (this node included), dead ones for a while.
    fn members(&self) -> Vec<Member>;
    /// Members usable now (alive or suspect), this node included.
    fn alive(&self) -> Vec<Member>;
}

/// A fixed membership: every member alive, for tests and for a cluster of one.
pub struct StaticView {
    pub local: NodeId,
    pub others: Vec<NodeId>,
}

impl View for StaticView {
    fn local(&self) -> NodeId {
        self.local.clone()
    }

    fn members(&self) -> Vec<Member> {
        self.alive()
    }

    fn alive(&self) -> Vec<Member> {
        std::iter::once(&self.local)
            .chain(self.others.iter())
            .map(|id| Member {
                id: id.clone(),
                state: MemberState::Alive,
                since: std::time::SystemTime::UNIX_EPOCH,
            })
            .collect()
    }
}

/// The cluster as one node sees it.
pub struct Cluster {
    view: Arc<dyn View>,
    replicas: usize,
    client: PeerClient,
}

impl Cluster {
    pub fn new(
        view: Arc<dyn View>,
        secret: ClusterSecret,
        replicas: usize,
        timeouts: PeerTimeouts,
        metrics: Arc<metrics::PeerMetrics>,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<Arc<Cluster>, PeerError> {
        let local = view.local().name;
        Ok(Arc::new(Cluster {
            view,
            replicas: replicas.max(1),
            client: PeerClient::new(local, secret, timeouts, metrics, tls)?,
        }))
    }

    pub fn client(&self) -> &PeerClient {
        &self.client
    }

    pub fn view(&self) -> &Arc<dyn View> {
        &self.view
    }

    pub fn local(&self) -> NodeId {
        self.view.local()
    }

    pub fn replicas(&self) -> usize {
        self.replicas
    }

    fn usable(&self) -> Vec<NodeId> {
        self.view.alive().into_iter().map(|m| m.id).collect()
    }

    /// Whether any other member is usable (a cluster of one never asks peers).
    pub fn has_peers(&self) -> bool {
        self.view.alive().len() > 1
    }

    /// The owners of `key` among the usable members, first owner first (this node may be one).
    pub fn owners(&self, key: &[u8]) -> Vec<NodeId> {
        self.owners_n(key, self.replicas)
    }

    /// The first `n` nodes for `key` by the placement rule.
    pub fn owners_n(&self, key: &[u8], n: usize) -> Vec<NodeId> {
        let members = self.usable();
        placement::owners(key, &members, n)
            .into_iter()
            .cloned()
            .collect()
    }

    /// Whether this node is among the owners of `key`.
    pub fn is_owner(&self, key: &[u8]) -> bool {
        let me = self.view.local().name;
        self.owners(key).iter().any(|n| n.name == me)
    }

    /// Every other usable member in the order a reader should ask them for `key`: owners first,
    /// then the rest by placement rank, each group with this node's zone first. Suspect
    /// members go last: they may be dead.
    pub fn candidates(&self, key: &[u8]) -> Vec<NodeId> {
        let me = self.view.local();
        let alive = self.view.alive();
        let suspect: Vec<String> = alive
            .iter()
            .filter(|m| m.state == MemberState::Suspect)
            .map(|m| m.id.name.clone())
            .collect();
        let members: Vec<NodeId> = alive.into_iter().map(|m| m.id).collect();
        let owners: Vec<String> = placement::owners(key, &members, self.replicas)
            .into_iter()
            .map(|n| n.name.clone())
            .collect();
        let mut ranked: Vec<(usize, NodeId)> = placement::ranked(key, &members)
            .into_iter()
            .enumerate()
            .filter(|(_, n)| n.name != me.name)
            .map(|(i, n)| (i, n.clone()))
            .collect();
        ranked.sort_by_key(|(rank, n)| {
            (
                suspect.contains(&n.name),
                !owners.contains(&n.name),
                n.zone != me.zone,
                *rank,
            )
        });
        ranked.into_iter().map(|(_, n)| n).collect()
    }

    /// A usable member by name.
    pub fn member(&self, name: &str) -> Option<NodeId> {
        self.usable().into_iter().find(|n| n.name == name)
    }
}

impl View for pier_cluster::membership::Membership {
    fn local(&self) -> NodeId {
        pier_cluster::membership::Membership::local(self)
    }

    fn members(&self) -> Vec<Member> {
        pier_cluster::membership::Membership::members(self)
    }

    fn alive(&self) -> Vec<Member> {
        pier_cluster::membership::Membership::alive(self)
    }
}
