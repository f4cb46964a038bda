//! The membership node without I/O: foca, the sealing of every datagram, the join handshake
//! and the view of the cluster that `Membership` publishes. It owns no socket and no clock:
//! the caller hands it datagrams, due ticks and the current time, and takes back sealed
//! datagrams to send and ticks to schedule. The tokio transport and the simulation drive the
//! very same code.
//!
//! Join handshake. foca joins by sending `Announce` to a member's *identity*, but a join entry
//! is only an address. So a joiner first sends a sealed `JOIN` (carrying its identity) to the
//! address; whoever answers there replies `WELCOME` with its own identity, and the joiner then
//! announces to it through foca (and is fed the active members). Addresses that already belong
//! to an active member are skipped, so a settled cluster sends nothing for its join list.
//!
//! Member list on join. foca's answer to an announce holds the members that fit in one
//! datagram (about forty), and after that a node learns of a member only when it hears from
//! it or when news of it is still being gossiped. News of a member that joined earlier has
//! usually died out, so in a thousand-node rollout a late joiner took minutes to learn the
//! last few early ones (each member probes a given one once per N probe periods). So with
//! `WELCOME`'s answer the joiner also sends `SYNC`, and the welcomer replies with every
//! active member it holds (`MEMBERS`, as many datagrams as needed, each member with its
//! incarnation and state), which the joiner applies without gossiping them on: they are
//! news to it, not to the cluster.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use foca::{Foca, Identity, NoCustomBroadcast, Notification, PostcardCodec, Runtime, State, Timer};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::seal::{Seal, OVERHEAD};
use crate::identity::{Member, MemberState, NodeId};

/// Largest datagram pier sends or accepts, sealed: below a 1500-byte Ethernet MTU with room
/// for IP and UDP headers and a tunnel's encapsulation.
pub const MAX_DATAGRAM: usize = 1400;
/// What foca may fill: the datagram less the seal and the kind byte.
const MAX_FOCA_PACKET: usize = MAX_DATAGRAM - OVERHEAD - 1;
/// Longest node name and zone accepted, so that three identities (a `PingReq` carries
/// source, destination and target) always fit in one datagram with room for updates.
pub(crate) const MAX_NAME: usize = 128;
pub(crate) const MAX_ZONE: usize = 64;
/// How long a dead member stays in the view (for status pages) after it died.
pub(crate) const DEAD_RETENTION: Duration = Duration::from_secs(600);
/// How many times each member passes on each update (see the module header of `membership`).
const MAX_TX: u8 = 15;
/// Join retry period while this node knows no live member (starting, or cut off).
const ALONE_RETRY: Duration = Duration::from_secs(1);

// The first plaintext byte of every datagram says what follows.
const KIND_FOCA: u8 = 0;
const KIND_JOIN: u8 = 1;
const KIND_WELCOME: u8 = 2;
const KIND_SYNC: u8 = 3;
const KIND_MEMBERS: u8 = 4;

/// A node's identity on the wire (foca's `Identity`). The name is foca's "address": two
/// identities with one name are the same node, and the higher generation wins, so a
/// restarted or renewed node replaces its previous self everywhere.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub(crate) struct Peer {
    name: Arc<str>,
    generation: u64,
    addr: SocketAddr,
    zone: Option<Arc<str>>,
}

impl Peer {
    fn from_id(id: &NodeId) -> Peer {
        Peer {
            name: id.name.as_str().into(),
            generation: id.generation,
            addr: id.addr,
            zone: id.zone.as_deref().map(Into::into),
        }
    }

    fn to_id(&self) -> NodeId {
        NodeId {
            name: self.name.to_string(),
            generation: self.generation,
            addr: self.addr,
            zone: self.zone.as_deref().map(str::to_string),
        }
    }

    fn is(&self, id: &NodeId) -> bool {
        self.generation == id.generation
            && self.addr == id.addr
            && self.zone.as_deref() == id.zone.as_deref()
            && *self.name == id.name
    }
}

impl Identity for Peer {
    type Addr = Arc<str>;

    /// A node the cluster declared dead while it was alive (hung, partitioned, too lossy)
    /// comes back as the next generation, which wins over the dead one.
    fn renew(&self) -> Option<Peer> {
        Some(Peer {
            generation: self.generation.checked_add(1)?,
            ..self.clone()
        })
    }

    fn addr(&self) -> Arc<str> {
        self.name.clone()
    }

    fn win_addr_conflict(&self, adversary: &Peer) -> bool {
        // The generation decides; the rest only breaks ties between two processes that
        // were started with one name in the same millisecond, so both sides agree.
        (self.generation, self.addr, &self.zone)
            > (adversary.generation, adversary.addr, &adversary.zone)
    }
}

/// Something the engine asks to be handed back after a delay. (Ordered only so that it can
/// sit in a tuple in a heap; the order means nothing.)
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Tick {
    Foca(Timer<Peer>),
    /// Time to (re)send `JOIN` to the join list.
    Join,
}

/// The protocol timing, derived from the probe period (see the module header of
/// `membership` for the reasoning).
#[derive(Debug, Clone)]
pub(crate) struct Tuning {
    pub(crate) probe_period: Duration,
    pub(crate) rejoin_every: Duration,
}

impl Tuning {
    pub(crate) fn foca_config(&self) -> foca::Config {
        let p = self.probe_period;
        let every = |frequency: Duration, members: usize| foca::PeriodicParams {
            frequency,
            num_members: nonzero(members),
        };
        foca::Config {
            probe_period: p,
            probe_rtt: p * 2 / 5,
            num_indirect_probes: nonzero(4),
            max_transmissions: NonZeroU8::new(MAX_TX).unwrap_or(NonZeroU8::MIN),
            suspect_to_down_after: p * 2,
            remove_down_after: Duration::from_secs(3600),
            max_packet_size: nonzero(MAX_FOCA_PACKET),
            notify_down_members: true,
            periodic_announce: Some(every(Duration::from_secs(5), 1)),
            periodic_announce_to_down_members: Some(every(p * 8, 2)),
            periodic_gossip: Some(every(p / 5, 3)),
        }
    }
}

const fn nonzero(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        None => NonZeroUsize::MIN,
    }
}

/// What foca asked for during one call, before sealing.
#[derive(Default)]
struct Outbox {
    datagrams: Vec<(SocketAddr, Vec<u8>)>,
    ticks: Vec<(Duration, Tick)>,
    renewed: bool,
}

impl Outbox {
    fn push(&mut self, to: SocketAddr, kind: u8, body: &[u8]) {
        let mut plain = Vec::with_capacity(body.len() + 1);
        plain.push(kind);
        plain.extend_from_slice(body);
        self.datagrams.push((to, plain));
    }
}

impl Runtime<Peer> for Outbox {
    fn notify(&mut self, notification: Notification<'_, Peer>) {
        match notification {
            Notification::MemberUp(p) => {
                tracing::info!(member = %p.name, generation = p.generation, "cluster member up")
            }
            Notification::MemberDown(p) => {
                tracing::info!(member = %p.name, generation = p.generation, "cluster member down")
            }
            Notification::Rename(old, new) => tracing::info!(
                member = %new.name,
                old_generation = old.generation,
                generation = new.generation,
                "cluster member restarted or rejoined"
            ),
            Notification::Rejoin(p) => {
                tracing::warn!(
                    generation = p.generation,
                    "the cluster declared this node dead; rejoining as a new generation"
                );
                self.renewed = true;
            }
            Notification::Defunct => tracing::info!("this node left the cluster"),
            Notification::Idle => tracing::warn!("this node sees no live cluster member"),
            Notification::Active => tracing::debug!("this node is known to the cluster"),
        }
    }

    fn send_to(&mut self, to: Peer, data: &[u8]) {
        self.push(to.addr, KIND_FOCA, data);
    }

    fn submit_after(&mut self, event: Timer<Peer>, after: Duration) {
        self.ticks.push((after, Tick::Foca(event)));
    }
}

/// What the caller must do after handing the engine something.
#[derive(Default)]
pub(crate) struct Output {
    /// Sealed datagrams and where to send them.
    pub(crate) datagrams: Vec<(SocketAddr, Vec<u8>)>,
    /// Ticks to hand back after their delay.
    pub(crate) ticks: Vec<(Duration, Tick)>,
    /// Resolve the join list and call [`Engine::join`] with the addresses.
    pub(crate) join: bool,
}

struct Entry {
    id: NodeId,
    state: MemberState,
    since: SystemTime,
}

pub(crate) struct Engine {
    foca: Foca<Peer, PostcardCodec, StdRng, NoCustomBroadcast>,
    seal: Seal,
    nonces: StdRng,
    out: Outbox,
    join_due: bool,
    rejoin_every: Duration,
    local: Peer,
    local_since: SystemTime,
    /// Every other node by name, as last seen.
    others: BTreeMap<String, Entry>,
    /// Bumped when the usable set (alive or suspect) changes.
    changes: u64,
    /// Bumped on any change of the view, `since` included.
    version: u64,
    rejected: u64,
    /// Times a member turned suspect in this view.
    suspicions: u64,
    /// Times a member turned dead in this view.
    deaths: u64,
    /// Other members usable now (alive or suspect), kept as the view changes so that a
    /// simulation of a thousand nodes can check convergence without walking every view.
    usable: usize,
    /// foca's members as last seen (see `fingerprint`).
    print: u64,
}

const STATE_ALIVE: u8 = 0;
const STATE_SUSPECT: u8 = 1;
const STATE_DOWN: u8 = 2;

fn state_byte(state: State) -> u8 {
    match state {
        State::Alive => STATE_ALIVE,
        State::Suspect => STATE_SUSPECT,
        State::Down => STATE_DOWN,
    }
}

fn state_of(state: State) -> MemberState {
    match state {
        State::Alive => MemberState::Alive,
        State::Suspect => MemberState::Suspect,
        State::Down => MemberState::Dead,
    }
}

impl Engine {
    /// `rng` drives foca's choices and `nonces` the seal; both come from the OS in
    /// production and from a seed in the simulation.
    pub(crate) fn new(
        identity: &NodeId,
        tuning: &Tuning,
        key: &[u8; 32],
        rng: StdRng,
        nonces: StdRng,
        now: SystemTime,
    ) -> Engine {
        let local = Peer::from_id(identity);
        let foca = Foca::new(local.clone(), tuning.foca_config(), rng, PostcardCodec);
        let mut out = Outbox::default();
        out.ticks.push((Duration::ZERO, Tick::Join));
        Engine {
            foca,
            seal: Seal::new(key),
            nonces,
            out,
            join_due: false,
            rejoin_every: tuning.rejoin_every,
            local,
            local_since: now,
            others: BTreeMap::new(),
            changes: 0,
            version: 0,
            rejected: 0,
            suspicions: 0,
            deaths: 0,
            usable: 0,
            print: 0,
        }
    }

    /// A datagram arrived from `from`.
    pub(crate) fn receive(&mut self, now: SystemTime, from: SocketAddr, sealed: &[u8]) {
        if sealed.len() > MAX_DATAGRAM {
            self.rejected += 1;
            return;
        }
        let Some(plain) = self.seal.open(sealed) else {
            self.rejected += 1;
            tracing::debug!(%from, "dropped a gossip datagram that does not open with the cluster key");
            return;
        };
        match plain.split_first() {
            Some((&KIND_FOCA, data)) => {
                if let Err(e) = self.foca.handle_data(data, &mut self.out) {
                    tracing::debug!(%from, error = %e, "gossip datagram not used");
                }
            }
            Some((&KIND_JOIN, body)) => {
                if let Some(joiner) = self.decode_peer(body, from) {
                    tracing::debug!(%from, joiner = %joiner.name, "join request");
                    let me = postcard_peer(&self.local);
                    self.out.push(from, KIND_WELCOME, &me);
                }
            }
            Some((&KIND_WELCOME, body)) => {
                if let Some(member) = self.decode_peer(body, from) {
                    if let Err(e) = self.foca.announce(member, &mut self.out) {
                        tracing::debug!(%from, error = %e, "cannot announce");
                    }
                    self.out.push(from, KIND_SYNC, &[]);
                }
            }
            Some((&KIND_SYNC, _)) => self.send_members(from),
            Some((&KIND_MEMBERS, body)) => self.apply_members(body, from),
            _ => tracing::debug!(%from, "gossip datagram of an unknown kind"),
        }
        self.refresh(now);
    }

    /// A peer identity in a join message, unless it is unreadable or this node's own name
    /// (a join list usually names this node too).
    fn decode_peer(&self, body: &[u8], from: SocketAddr) -> Option<Peer> {
        match postcard::from_bytes::<Peer>(body) {
            Ok(peer) if peer.name != self.local.name => Some(peer),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(%from, error = %e, "unreadable join message");
                None
            }
        }
    }

    /// Every other active member this node holds, to `to`, in as many datagrams as they
    /// need. (The asker learns of this node itself from the announce it just sent here.)
    fn send_members(&mut self, to: SocketAddr) {
        let active = self
            .foca
            .iter_membership_state()
            .filter(|m| m.state() != State::Down)
            .map(|m| (m.id().clone(), m.incarnation(), state_byte(m.state())));
        let mut body = Vec::with_capacity(MAX_FOCA_PACKET);
        for entry in active {
            let Ok(bytes) = postcard::to_allocvec(&entry) else {
                continue;
            };
            if body.len() + bytes.len() > MAX_FOCA_PACKET && !body.is_empty() {
                self.out.push(to, KIND_MEMBERS, &body);
                body.clear();
            }
            body.extend_from_slice(&bytes);
        }
        if !body.is_empty() {
            self.out.push(to, KIND_MEMBERS, &body);
        }
    }

    /// Members another node listed in answer to `SYNC`: news to this node only, so foca
    /// applies them without gossiping them on.
    fn apply_members(&mut self, mut body: &[u8], from: SocketAddr) {
        let mut members = Vec::new();
        while !body.is_empty() {
            match postcard::take_from_bytes::<(Peer, u16, u8)>(body) {
                Ok(((peer, incarnation, state), rest)) => {
                    body = rest;
                    let state = match state {
                        STATE_ALIVE => State::Alive,
                        STATE_SUSPECT => State::Suspect,
                        _ => continue,
                    };
                    if peer.name != self.local.name {
                        members.push(foca::Member::new(peer, incarnation, state));
                    }
                }
                Err(e) => {
                    tracing::debug!(%from, error = %e, "unreadable member list");
                    break;
                }
            }
        }
        if let Err(e) = self
            .foca
            .apply_many(members.into_iter(), false, &mut self.out)
        {
            tracing::debug!(%from, error = %e, "member list not used");
        }
    }

    /// A tick scheduled earlier is due.
    pub(crate) fn tick(&mut self, now: SystemTime, tick: Tick) {
        match tick {
            Tick::Foca(timer) => {
                // foca 1.0 (and 2.0) sends `TurnUndead` to a suspect when its suspicion timer
                // fires even if the suspect refuted in time, which would make every refuted
                // suspicion a renewal. That send is the only datagram the timer produces, so
                // it is taken back unless the member really was declared dead.
                let suspect = match &timer {
                    Timer::ChangeSuspectToDown { member_id, .. } => Some(member_id.clone()),
                    _ => None,
                };
                let sent_before = self.out.datagrams.len();
                if let Err(e) = self.foca.handle_timer(timer, &mut self.out) {
                    tracing::debug!(error = %e, "gossip timer");
                }
                if let Some(suspect) = suspect {
                    let dead = self
                        .foca
                        .iter_membership_state()
                        .any(|m| m.id() == &suspect && m.state() == State::Down);
                    if !dead {
                        self.out.datagrams.truncate(sent_before);
                    }
                }
            }
            Tick::Join => {
                self.join_due = true;
                let next = if self.foca.num_members() == 0 {
                    self.rejoin_every.min(ALONE_RETRY)
                } else {
                    self.rejoin_every
                };
                self.out.ticks.push((next, Tick::Join));
                self.forget_long_dead(now);
            }
        }
        self.refresh(now);
    }

    /// Send `JOIN` to every resolved join address not held by a live member.
    pub(crate) fn join(&mut self, addrs: &[SocketAddr]) {
        let me = postcard_peer(&self.local);
        for &addr in addrs {
            let known =
                addr == self.local.addr || self.foca.iter_members().any(|m| m.id().addr == addr);
            if !known {
                self.out.push(addr, KIND_JOIN, &me);
            }
        }
    }

    /// Tell a few members this node is leaving; after this it answers no one.
    pub(crate) fn leave(&mut self, now: SystemTime) {
        // foca tells 4 random members; two more rounds make it likely that the news survives
        // a lossy network (detection would still find the node gone, just later).
        let mut told = self.foca.leave_cluster(&mut self.out);
        for _ in 0..2 {
            told = told.and_then(|()| self.foca.gossip(&mut self.out));
        }
        if let Err(e) = told {
            tracing::debug!(error = %e, "leaving the cluster");
        }
        self.refresh(now);
    }

    /// Everything asked for since the last call, datagrams sealed.
    pub(crate) fn take_output(&mut self) -> Output {
        let datagrams = std::mem::take(&mut self.out.datagrams)
            .into_iter()
            .map(|(to, plain)| (to, self.seal.seal(&mut self.nonces, &plain)))
            .collect();
        Output {
            datagrams,
            ticks: std::mem::take(&mut self.out.ticks),
            join: std::mem::take(&mut self.join_due),
        }
    }

    /// Bring the view up to date with foca after any call that may have changed it.
    fn refresh(&mut self, now: SystemTime) {
        if self.out.renewed {
            // Renewed: find the members this node lost sight of without waiting a period.
            self.out.renewed = false;
            self.join_due = true;
        }
        if self.foca.identity() != &self.local {
            self.local = self.foca.identity().clone();
            self.local_since = now;
            self.changes += 1;
            self.version += 1;
        }
        // Most calls change nothing foca holds (a probe and its reply); walking the view by
        // name then would cost more than all the rest of the call at a thousand members.
        let print = self.fingerprint();
        if print == self.print {
            return;
        }
        self.print = print;
        for member in self.foca.iter_membership_state() {
            let peer = member.id();
            if peer.name == self.local.name {
                // This node's previous generation, which foca keeps as dead after a renewal.
                continue;
            }
            let state = state_of(member.state());
            let Some(entry) = self.others.get_mut(&*peer.name) else {
                self.others.insert(
                    peer.name.to_string(),
                    Entry {
                        id: peer.to_id(),
                        state,
                        since: now,
                    },
                );
                self.version += 1;
                self.changes += u64::from(state != MemberState::Dead);
                self.usable += usize::from(state != MemberState::Dead);
                self.deaths += u64::from(state == MemberState::Dead);
                continue;
            };
            // An older generation than one already seen is stale gossip.
            if peer.generation < entry.id.generation {
                continue;
            }
            let same = peer.is(&entry.id);
            if same && entry.state == state {
                continue;
            }
            let usable_before = entry.state != MemberState::Dead;
            let usable = state != MemberState::Dead;
            if usable_before != usable || (usable && !same) {
                self.changes += 1;
            }
            if usable_before != usable {
                if usable {
                    self.usable += 1;
                } else {
                    self.usable -= 1;
                    self.deaths += 1;
                }
            }
            if !same {
                entry.id = peer.to_id();
            }
            if state == MemberState::Suspect {
                self.suspicions += 1;
            }
            entry.state = state;
            entry.since = now;
            self.version += 1;
        }
    }

    /// A sum over foca's members of a hash of what the view takes from each (identity and
    /// state), independent of the order foca keeps them in. An identity is hashed by the
    /// addresses of its shared strings with its numbers: foca swaps in another `Peer` (newly
    /// decoded, so other allocations) whenever an identity changes, and keeps the same one
    /// otherwise. A change the sum misses needs a 64-bit collision.
    fn fingerprint(&self) -> u64 {
        self.foca
            .iter_membership_state()
            .map(|m| {
                let p = m.id();
                let zone = p
                    .zone
                    .as_ref()
                    .map_or(0, |z| Arc::as_ptr(z).cast::<u8>() as usize);
                let addr = match p.addr.ip() {
                    std::net::IpAddr::V4(ip) => u64::from(ip.to_bits()),
                    std::net::IpAddr::V6(ip) => {
                        let b = ip.to_bits();
                        (b as u64) ^ ((b >> 64) as u64)
                    }
                };
                let state = match m.state() {
                    State::Alive => 1,
                    State::Suspect => 2,
                    State::Down => 3,
                };
                let mut h =
                    mix64(Arc::as_ptr(&p.name).cast::<u8>() as u64 ^ (p.name.len() as u64) << 48);
                h = mix64(h ^ p.generation);
                h = mix64(h ^ addr ^ u64::from(p.addr.port()) << 32);
                mix64(h ^ zone as u64 ^ state << 60)
            })
            .fold(0u64, u64::wrapping_add)
    }

    /// Drop members dead for longer than [`DEAD_RETENTION`] that foca no longer holds
    /// (while foca remembers one, the view keeps it and `members` hides it).
    fn forget_long_dead(&mut self, now: SystemTime) {
        let held: std::collections::HashSet<&str> = self
            .foca
            .iter_membership_state()
            .map(|m| &*m.id().name)
            .collect();
        self.others.retain(|name, e| {
            e.state != MemberState::Dead || held.contains(name.as_str()) || !expired(e, now)
        });
    }

    pub(crate) fn local(&self) -> NodeId {
        self.local.to_id()
    }

    /// The view: this node (alive) and every other node known, by name, leaving out those
    /// dead for longer than [`DEAD_RETENTION`].
    pub(crate) fn members(&self, now: SystemTime) -> Vec<Member> {
        let me = Member {
            id: self.local.to_id(),
            state: MemberState::Alive,
            since: self.local_since,
        };
        let mut all: Vec<Member> = self
            .others
            .values()
            .filter(|e| e.state != MemberState::Dead || !expired(e, now))
            .map(|e| Member {
                id: e.id.clone(),
                state: e.state,
                since: e.since,
            })
            .chain(std::iter::once(me))
            .collect();
        all.sort_by(|a, b| a.id.name.cmp(&b.id.name));
        all
    }

    /// What this node believes of the node called `name`, for the simulation.
    pub(crate) fn state_of(&self, name: &str) -> Option<(u64, MemberState)> {
        if *self.local.name == *name {
            return Some((self.local.generation, MemberState::Alive));
        }
        self.others.get(name).map(|e| (e.id.generation, e.state))
    }

    pub(crate) fn changes(&self) -> u64 {
        self.changes
    }

    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    pub(crate) fn rejected(&self) -> u64 {
        self.rejected
    }

    pub(crate) fn suspicions(&self) -> u64 {
        self.suspicions
    }

    /// Times a member turned dead in this view (kills, leaves and false verdicts alike).
    pub(crate) fn deaths(&self) -> u64 {
        self.deaths
    }

    /// How many other members are usable (alive or suspect) in this view.
    pub(crate) fn usable_others(&self) -> usize {
        self.usable
    }

    /// The members this view holds dead, by name and generation.
    pub(crate) fn dead(&self) -> impl Iterator<Item = (&str, u64)> {
        self.others
            .iter()
            .filter(|(_, e)| e.state == MemberState::Dead)
            .map(|(name, e)| (name.as_str(), e.id.generation))
    }
}

/// The 64-bit finaliser of MurmurHash3, to spread the fingerprint's inputs.
fn mix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn expired(e: &Entry, now: SystemTime) -> bool {
    now.duration_since(e.since)
        .is_ok_and(|age| age > DEAD_RETENTION)
}

fn postcard_peer(peer: &Peer) -> Vec<u8> {
    // Serialising a struct of strings, numbers and an address into a Vec cannot fail.
    postcard::to_allocvec(peer).unwrap_or_default()
}
