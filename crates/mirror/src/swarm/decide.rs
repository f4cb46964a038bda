//! The swarm's decisions without its I/O: what the coordinator hands out and offers
//! ([`Board`]), and which piece a fetcher takes from whom ([`Picker`]). Nothing here owns a
//! socket, a spool or a clock: the caller passes the time, the reports and the bitmaps in and
//! carries the choices out. `run_swarm` and `swarm_answer` drive these types over the network;
//! [`crate::swarm_sim`] drives the same types over a simulated one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::pieces::Bits;

/// How often a fetcher reports, and how soon after it lands a piece: the others hear of a new
/// holder only through the coordinator, so every report round is a step of a piece's spread
/// (200 ms and a report only after a handed piece: 3.1x at 100 nodes in the simulation; 50 ms
/// and one after every piece: 1.5x). Answers are bounded ([`OFFER_HOLDERS`]), so reporting
/// often costs the coordinator a kilobyte or two per report.
pub(crate) const REPORT_EVERY: Duration = Duration::from_millis(50);
pub(crate) const REPORT_SOON: Duration = Duration::from_millis(20);
/// A member that has not reported for this long has left the swarm.
pub(crate) const MEMBER_TTL: Duration = Duration::from_secs(3);
/// The same for a member that reported holding every piece: it stops reporting once its fill
/// is done and serves the blob from its store. A dead one fails a request or two and is
/// benched by each fetcher (gossip drops it within seconds), so it may stay offered long.
pub(crate) const SEED_TTL: Duration = Duration::from_secs(60);
/// A piece handed to a member that does not report holding it within this long is handed to
/// someone else.
pub(crate) const ASSIGN_TTL: Duration = Duration::from_secs(4);
/// Pieces a member may have been handed and not yet reported holding.
pub(crate) const ASSIGN_OUTSTANDING: usize = 3;
/// The same for a member alone in its swarm: it takes everything from the coordinator.
pub(crate) const ASSIGN_ALONE: usize = 12;
/// Reports failed in a row before a coordinator the membership still lists is given up.
pub(crate) const COORD_FAILURES: u32 = 10;
/// Pieces a fetcher takes at once, from all holders together. Few, so each piece comes at a
/// good share of the links and is soon there to pass on (6: 1.8x at 100 nodes in the
/// simulation, 3: 1.5x), enough that real TCP flows, each short of its fair share of a
/// link, fill it together (six real nodes: 3 in flight and 3 uploads used 62 % of the
/// fetchers' links, 4 and 4 70-74 %, 1.60-1.65x to 1.41-1.50x).
pub(crate) const IN_FLIGHT: usize = 4;
/// Pieces a coordinator that took over takes from its upstream at once.
pub(crate) const UPSTREAM_IN_FLIGHT: usize = 2;
/// How far past the first missing piece a fetcher looks for pieces to take: far enough to
/// choose rare ones, near enough that its readers, who read in order, are not kept waiting.
pub(crate) const WINDOW: usize = 48;
/// The first pieces of the window a fetcher takes in order before any rarer one, when a
/// member besides the coordinator can send them and one member in [`URGENT_SHARE`] holds
/// them: a client reads the blob in order, and a piece that arrives before the ones ahead of
/// it waits for them (and for the whole-blob SHA-256, which runs in order too). Rarest first
/// alone left 82 % of a layer readable only in the last tenth of a fill at 100 nodes in the
/// simulation; six real nodes spent 1-1.5 s after their links went quiet reading and hashing
/// it.
pub(crate) const URGENT: usize = 3;
/// Before one member in this many holds a piece, rarest first decides: a hundred fetchers
/// asking the same few holders for the same first pieces would crowd them.
pub(crate) const URGENT_SHARE: usize = 4;
/// Holders of each piece of a fetcher's window that the coordinator's answer names, and the
/// most members it names in all (the coordinator besides): enough to choose from and to go
/// elsewhere when one fails, few enough that an answer is a kilobyte or two at any swarm size.
pub(crate) const OFFER_PER_PIECE: u32 = 4;
pub(crate) const OFFER_HOLDERS: usize = 24;
/// Pieces a node sends to swarm members at once; it answers a piece request past them "not
/// here" (404), and the fetcher takes the piece from another holder (or waits for the next
/// answer). Fetchers cannot see a holder's load: without a bound, one holder of the newest
/// piece had 770 transfers at 1/770 of its link each at 1,000 nodes while most links idled.
/// The bound replaces the fetchers' turns (a few per holder by their hashes) that came before
/// it: those kept links idle waiting for a turn, and an idle fetcher took a piece anyway.
pub const UPLOADS: usize = 4;
/// An idle fetcher that landed nothing for this long takes pieces from the coordinator
/// without being handed them.
pub(crate) const UNASKED_AFTER: Duration = Duration::from_secs(1);
/// A fill that lands no piece for this long gives up.
pub(crate) const STALL: Duration = Duration::from_secs(60);
/// How long a holder that failed to send a piece (as opposed to sending a bad one) is not
/// asked: long enough that a dead peer costs a failed request or two before gossip declares it
/// dead, short enough that a peer that was only slow for a moment rejoins the swarm.
pub(crate) const BENCH: Duration = Duration::from_secs(3);
/// How long a holder that said it is busy (at its [`UPLOADS`]) is not asked again: about the
/// time one of its transfers takes to free a slot. It keeps what it holds meanwhile.
pub(crate) const BUSY: Duration = Duration::from_millis(25);

/// The holders a fill is not asking, and why. A bad piece is proof of a bad peer (a corrupt
/// disk, a bug, an attacker) and excludes it for the rest of the fill; a failed request is
/// not: a timeout under load or a restart looks the same, so it only benches the peer.
#[derive(Debug, Default)]
pub(crate) struct Shunned {
    bad: HashSet<String>,
    benched: HashMap<String, Instant>,
}

impl Shunned {
    /// `name` sent a piece that failed its digest.
    pub(crate) fn corrupt(&mut self, name: &str) {
        self.benched.remove(name);
        self.bad.insert(name.to_string());
    }

    /// `name` failed to send a piece at `now`.
    pub(crate) fn failed(&mut self, name: &str, now: Instant) {
        self.benched.insert(name.to_string(), now + BENCH);
    }

    /// `name` said at `now` it is sending as many pieces as it will (a longer bench stays).
    pub(crate) fn busy(&mut self, name: &str, now: Instant) {
        let until = self.benched.entry(name.to_string()).or_insert(now);
        *until = (*until).max(now + BUSY);
    }

    /// Whether `name` is not to be asked at `now`.
    pub(crate) fn avoid(&self, name: &str, now: Instant) -> bool {
        self.bad.contains(name) || self.benched.get(name).is_some_and(|until| now < *until)
    }

    /// What the coordinator hears: only the proven bad, so a benched peer is still offered.
    pub(crate) fn reported(&self) -> Vec<String> {
        self.bad.iter().cloned().collect()
    }
}

/// What a coordinator knows of one swarm.
pub(crate) struct Board {
    /// Ordered by name, so that a walk over them is the same on every run.
    members: BTreeMap<String, (Bits, Instant)>,
    /// Members some fetcher found bad: not offered as holders, their pieces handed out again.
    bad: HashSet<String>,
    /// Per piece, the members (not found bad) that hold it.
    held: Vec<u32>,
    /// Of those, the members that hold every piece (done fetching, or stored it before).
    full: u32,
    /// Pieces handed to a member to take from the coordinator, and when.
    assigned: HashMap<u32, (String, Instant)>,
    /// Reports taken in: each answer's sample of holders starts somewhere else.
    rounds: u64,
    pub(crate) touched: Instant,
}

/// What a coordinator offers one fetcher: a sample of the holders of the pieces in its window,
/// not every member, so an answer's size does not grow with the swarm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Offer {
    /// The coordinator first, then at most [`OFFER_HOLDERS`] members.
    pub(crate) holders: Vec<(String, Bits)>,
    /// The swarm's counts over the fetcher's window, for its rarest-first order.
    pub(crate) counts: Counts,
}

/// How many hold each piece of a fetcher's window, and how many members the swarm has: which
/// pieces are rarest, which a sample of holders cannot tell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Members, the coordinator included.
    pub(crate) members: u32,
    /// `held[k]` holders (the coordinator included) of piece `from + k`.
    pub(crate) from: u32,
    pub(crate) held: Vec<u32>,
}

impl Counts {
    /// Holders of piece `i`, when the counts cover it.
    fn of(&self, i: u32) -> Option<u32> {
        let k = i.checked_sub(self.from)?;
        self.held.get(k as usize).copied()
    }
}

impl Board {
    pub(crate) fn new(now: Instant) -> Board {
        Board {
            members: BTreeMap::new(),
            bad: HashSet::new(),
            held: Vec::new(),
            full: 0,
            assigned: HashMap::new(),
            rounds: 0,
            touched: now,
        }
    }

    /// Add (`add`) or take away a member's pieces from the per-piece counts (`full` counts
    /// the members that hold them all).
    fn count(held: &mut [u32], full: &mut u32, have: &Bits, add: bool) {
        if have.len() as usize != held.len() {
            return;
        }
        if have.all() {
            *full = if add {
                *full + 1
            } else {
                full.saturating_sub(1)
            };
        }
        for (i, n) in held.iter_mut().enumerate() {
            if have.get(i as u32) {
                *n = if add { *n + 1 } else { n.saturating_sub(1) };
            }
        }
    }

    /// Take in `from`'s report at `now` (it holds `have` and found `bad` bad) on the
    /// coordinator `me`, which holds `own`, and hand `from` the pieces it is to take from the
    /// coordinator, in order. The holders to offer it are then [`Board::offer`].
    pub(crate) fn report(
        &mut self,
        from: &str,
        have: Bits,
        bad: &[String],
        me: &str,
        own: &Bits,
        now: Instant,
    ) -> Vec<u32> {
        let count = own.len();
        self.touched = now;
        self.rounds += 1;
        if self.held.len() != count as usize {
            // First report, or the blob's piece count changed under the board: count afresh.
            self.held = vec![0; count as usize];
            self.full = 0;
            for (n, (h, _)) in &self.members {
                if !self.bad.contains(n) {
                    Board::count(&mut self.held, &mut self.full, h, true);
                }
            }
        }
        for n in bad.iter().filter(|n| n.as_str() != me) {
            if self.bad.insert(n.clone()) {
                if let Some((h, _)) = self.members.get(n) {
                    Board::count(&mut self.held, &mut self.full, h, false);
                }
            }
        }
        let counted = !self.bad.contains(from);
        if counted {
            Board::count(&mut self.held, &mut self.full, &have, true);
        }
        if let Some((old, _)) = self.members.insert(from.to_string(), (have, now)) {
            if counted {
                Board::count(&mut self.held, &mut self.full, &old, false);
            }
        }
        let (held, full, bad) = (&mut self.held, &mut self.full, &self.bad);
        self.members.retain(|n, (h, seen)| {
            // A member that holds the whole blob has stopped reporting (its fill is done) and
            // serves it from its store: it stays offered, or the last pieces would have no
            // holder but the coordinator.
            let ttl = if h.all() { SEED_TTL } else { MEMBER_TTL };
            let keep = now.saturating_duration_since(*seen) < ttl;
            if !keep && !bad.contains(n) {
                Board::count(held, full, h, false);
            }
            keep
        });
        // Held by a member still fetching. A member that holds every piece (a node that
        // stored the blob before, or finished) serves what it is asked, but does not pass
        // pieces on as a fetcher does: the coordinator still hands out each piece to one
        // fetcher, or with two owners storing a blob the second would carry the swarm alone
        // while the first's link idled.
        let (held, full) = (&self.held, self.full);
        let held = |i: u32| held.get(i as usize).is_some_and(|n| *n > full);
        let members = &self.members;
        let taken = |i: u32| members.get(from).is_some_and(|(h, _)| h.get(i));
        // A handed-out piece stays handed out until a member holds it, or its taker goes
        // quiet or takes too long.
        self.assigned.retain(|i, (n, at)| {
            !held(*i) && now.saturating_duration_since(*at) < ASSIGN_TTL && members.contains_key(n)
        });
        let mut assign: Vec<u32> = self
            .assigned
            .iter()
            .filter(|(_, (n, _))| n == from)
            .map(|(i, _)| *i)
            .collect();
        // A lone fetcher takes everything from the coordinator: hand it enough to keep its
        // pipeline full.
        let outstanding = if self.members.len() <= 1 {
            ASSIGN_ALONE
        } else {
            ASSIGN_OUTSTANDING
        };
        let mut i = 0;
        while assign.len() < outstanding && i < count {
            if own.get(i) && !held(i) && !taken(i) && !self.assigned.contains_key(&i) {
                self.assigned.insert(i, (from.to_string(), now));
                assign.push(i);
            }
            i += 1;
        }
        assign.sort_unstable();
        assign
    }

    /// What to offer `from` after its report, on the coordinator `me`, which holds `own`: the
    /// coordinator, and for each piece of `from`'s window (the [`WINDOW`] pieces it lacks from
    /// the first) up to [`OFFER_PER_PIECE`] of its holders, at most [`OFFER_HOLDERS`] in all,
    /// taken from a different place of the member list at every report (members no fetcher
    /// found bad, `from` left out); and the counts of holders over the window and of members.
    /// Every fetcher gets its own sample, so their requests spread over the holders as the
    /// whole list spread them, and the answer stays the same size at any number of members.
    pub(crate) fn offer(&self, from: &str, me: &str, own: &Bits) -> Offer {
        let count = own.len();
        let empty = Bits::new(count);
        let have = match self.members.get(from) {
            Some((h, _)) if h.len() == count => h,
            _ => &empty,
        };
        // The window, and how many holders each of its pieces still wants in the sample.
        let first = (0..count).find(|i| !have.get(*i)).unwrap_or(count);
        let mut window = Vec::new();
        let mut end = first;
        while end < count && window.len() < WINDOW {
            if !have.get(end) {
                window.push(end);
            }
            end += 1;
        }
        let held = |i: u32| self.held.get(i as usize).copied().unwrap_or(0);
        let mut want: Vec<(u32, u32)> = window
            .iter()
            .map(|&i| (i, held(i).min(OFFER_PER_PIECE)))
            .filter(|(_, w)| *w > 0)
            .collect();
        let mut holders = vec![(me.to_string(), own.clone())];
        let askable = self
            .members
            .iter()
            .filter(|(n, (h, _))| n.as_str() != from && h.len() == count && !self.bad.contains(*n));
        let total = self.members.len();
        let skip = if total == 0 {
            0
        } else {
            (spread(from, self.rounds as u32) % total as u64) as usize
        };
        for (n, (h, _)) in askable.clone().skip(skip).chain(askable.take(skip)) {
            if want.is_empty() || holders.len() > OFFER_HOLDERS {
                break;
            }
            let mut useful = false;
            for (i, w) in &mut want {
                if h.get(*i) {
                    *w -= 1;
                    useful = true;
                }
            }
            if useful {
                want.retain(|(_, w)| *w > 0);
                holders.push((n.clone(), h.clone()));
            }
        }
        let members = self
            .members
            .keys()
            .filter(|n| !self.bad.contains(*n))
            .count() as u32;
        Offer {
            holders,
            counts: Counts {
                members: members + 1,
                from: first,
                held: (first..end)
                    .map(|i| held(i) + u32::from(own.get(i)))
                    .collect(),
            },
        }
    }

    /// Members still reporting at `now` and what they hold, for a coordinator that fetches
    /// too (one that took over).
    pub(crate) fn holders(&self, count: u32, now: Instant) -> HashMap<String, Bits> {
        self.members
            .iter()
            .filter(|(n, (h, seen))| {
                let ttl = if h.all() { SEED_TTL } else { MEMBER_TTL };
                now.saturating_duration_since(*seen) < ttl
                    && h.len() == count
                    && !self.bad.contains(*n)
            })
            .map(|(n, (h, _))| (n.clone(), h.clone()))
            .collect()
    }
}

/// Where a piece comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum From {
    Peer(String),
    Upstream,
}

/// What a fetcher does when its coordinator stops answering.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Turn {
    /// This node coordinates now (and takes what no one holds from its upstream).
    Coordinate,
    /// Report to this node instead.
    To(String),
}

/// One fetcher's choices for one blob: who holds what, what is in flight from whom, who is
/// shunned, and which piece to take next from whom.
pub(crate) struct Picker {
    me: String,
    coord: String,
    /// This node has become the coordinator (the previous one stopped answering).
    coordinating: bool,
    failed_coords: HashSet<String>,
    coord_failures: u32,
    /// Who holds which pieces, as the coordinator last said (a sample, from a coordinator
    /// that sends [`Counts`]).
    holders: HashMap<String, Bits>,
    /// The swarm's counts for this node's window, as the coordinator last said; `None` from
    /// a coordinator that names every member instead (the counts are then taken from them).
    counts: Option<Counts>,
    /// Pieces the coordinator handed this node to take from it.
    assigned: HashSet<u32>,
    /// Holders this fill is not asking: for good after a bad piece, for a while after a failure.
    shunned: Shunned,
    in_flight: HashMap<u32, From>,
    /// Pieces in flight per holder.
    load: HashMap<From, usize>,
    upstream_in_flight: usize,
    have: Bits,
    /// The first piece this node lacks: where the window starts.
    first_missing: u32,
    last_piece: Instant,
}

impl Picker {
    pub(crate) fn new(me: &str, coord: &str, count: u32, now: Instant) -> Picker {
        Picker {
            me: me.to_string(),
            coord: coord.to_string(),
            coordinating: false,
            failed_coords: HashSet::new(),
            coord_failures: 0,
            holders: HashMap::new(),
            counts: None,
            assigned: HashSet::new(),
            shunned: Shunned::default(),
            in_flight: HashMap::new(),
            load: HashMap::new(),
            upstream_in_flight: 0,
            have: Bits::new(count),
            first_missing: 0,
            last_piece: now,
        }
    }

    pub(crate) fn coordinating(&self) -> bool {
        self.coordinating
    }

    /// The pieces this fill holds.
    pub(crate) fn have(&self) -> &Bits {
        &self.have
    }

    pub(crate) fn done(&self) -> bool {
        self.have.all()
    }

    /// The first piece this fill lacks: an in-order reader has every piece before it.
    pub(crate) fn first_missing(&self) -> u32 {
        self.first_missing
    }

    /// The holders this fill found bad, for its report.
    pub(crate) fn bad(&self) -> Vec<String> {
        self.shunned.reported()
    }

    /// Whether the fill has landed nothing for too long and should give up.
    pub(crate) fn stalled(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_piece) > STALL
    }

    /// Take in a coordinator's answer: the holders it offers, the pieces it hands this node,
    /// and the swarm's counts when it sent them.
    pub(crate) fn absorb(
        &mut self,
        holders: impl IntoIterator<Item = (String, Bits)>,
        assign: impl IntoIterator<Item = u32>,
        counts: Option<Counts>,
    ) {
        let count = self.have.len();
        let me = &self.me;
        self.holders = holders.into_iter().filter(|(n, _)| n != me).collect();
        self.counts = counts;
        self.assigned = assign.into_iter().filter(|&i| i < count).collect();
        self.coord_failures = 0;
    }

    /// The holders as a coordinator that took over sees them on its own board.
    pub(crate) fn set_holders(&mut self, holders: HashMap<String, Bits>) {
        self.holders = holders;
        self.counts = None;
    }

    /// Whether the last report went unanswered (the next asks the coordinator to join it
    /// afresh).
    pub(crate) fn failed_reports(&self) -> bool {
        self.coord_failures > 0
    }

    /// A report went unanswered (or answered for another blob).
    pub(crate) fn report_failed(&mut self) {
        self.coord_failures += 1;
    }

    /// After a report: whether the coordinator is to be given up, because it failed too many
    /// reports in a row or the membership no longer lists it (`gone`). A merely slow
    /// coordinator keeps its role: a second one would fetch from the upstream what the first
    /// already has.
    pub(crate) fn give_up_coordinator(&mut self, gone: bool) -> bool {
        if self.coord_failures >= COORD_FAILURES || gone {
            self.failed_coords.insert(self.coord.clone());
            true
        } else {
            false
        }
    }

    /// Whether `name` is a coordinator this fill gave up.
    pub(crate) fn failed_coordinator(&self, name: &str) -> bool {
        self.failed_coords.contains(name)
    }

    /// Turn to `next`, the first owner (or candidate) not given up, after
    /// [`Picker::give_up_coordinator`] said so.
    pub(crate) fn turn(&mut self, next: Option<&str>) -> Option<Turn> {
        let turn = match next {
            Some(n) if n == self.me => {
                self.coordinating = true;
                Some(Turn::Coordinate)
            }
            Some(n) => {
                self.coord = n.to_string();
                Some(Turn::To(n.to_string()))
            }
            None => None,
        };
        if turn.is_some() {
            let failed = &self.failed_coords;
            self.holders.retain(|n, _| !failed.contains(n));
        }
        self.coord_failures = 1;
        turn
    }

    /// Start fetching pieces until the in-flight limit: among the first missing pieces, the
    /// rarest first, each from its least-loaded holder. A piece only the coordinator holds is
    /// taken from it only when handed to this node, or when no one else is fetching. `known`
    /// says whether a piece's digest is known; `start` starts a fetch and says whether it
    /// could (a peer that is not a member just now is benched instead).
    pub(crate) fn schedule(
        &mut self,
        now: Instant,
        known: &dyn Fn(u32) -> bool,
        start: &mut dyn FnMut(u32, &From) -> bool,
    ) {
        self.schedule_pass(now, false, known, start);
        // Idle with pieces left that only the coordinator can send verifiably (their other
        // holders failed this node, say): take them from it unasked rather than wait.
        if self.in_flight.is_empty()
            && now.saturating_duration_since(self.last_piece) > UNASKED_AFTER
        {
            self.schedule_pass(now, true, known, start);
        }
    }

    fn schedule_pass(
        &mut self,
        now: Instant,
        unasked: bool,
        known: &dyn Fn(u32) -> bool,
        start: &mut dyn FnMut(u32, &From) -> bool,
    ) {
        let count = self.have.len();
        while self.in_flight.len() < IN_FLIGHT {
            let Some((i, from)) = self.pick(now, unasked, count, known) else {
                return;
            };
            if start(i, &from) {
                *self.load.entry(from.clone()).or_default() += 1;
                if from == From::Upstream {
                    self.upstream_in_flight += 1;
                }
                self.in_flight.insert(i, from);
            } else if let From::Peer(name) = &from {
                // Not a member just now (left, or not yet seen again): ask again later.
                self.shunned.failed(name, now);
            } else {
                return;
            }
        }
    }

    /// The next piece to take and from whom, if any: the first [`URGENT`] pieces this node
    /// lacks, in order, when one member in [`URGENT_SHARE`] holds them (a peer besides the
    /// coordinator among them); otherwise the rarest in the window (by the swarm's counts when
    /// the coordinator sent them), and among the equally rare the one this node's own hash
    /// orders first. Fetchers see the same holders, so taking the first of the
    /// equally rare would send them all after the same few pieces from the same few holders,
    /// and leave every other link idle; a holder with [`UPLOADS`] transfers already turns the
    /// rest away. The holders to ask are filtered once per pick (not once per piece looked
    /// at), and the least-loaded holder is chosen only for a piece that beats the best so far:
    /// at a thousand members the same choice costs a fraction of the work.
    fn pick(
        &self,
        now: Instant,
        unasked: bool,
        count: u32,
        known: &dyn Fn(u32) -> bool,
    ) -> Option<(u32, From)> {
        let askable: Vec<(&String, &Bits)> = self
            .holders
            .iter()
            .filter(|(n, _)| !self.shunned.avoid(n, now))
            .collect();
        // (rarity, tie-break): from the upstream in order, from peers in this node's order.
        let mut best: Option<((usize, usize, u64), u32, From)> = None;
        let mut looked = 0;
        let mut lacking = 0;
        let members = self
            .counts
            .as_ref()
            .map_or(self.holders.len() + 1, |c| c.members as usize);
        let mut i = self.first_missing;
        while i < count && looked < WINDOW {
            if self.have.get(i) {
                i += 1;
                continue;
            }
            lacking += 1;
            if self.in_flight.contains_key(&i) {
                i += 1;
                continue;
            }
            looked += 1;
            let mut rarity = 0;
            let mut peers = 0;
            for (n, h) in &askable {
                if h.get(i) {
                    rarity += 1;
                    peers += usize::from(**n != self.coord);
                }
            }
            let only_coord = peers == 0;
            if !known(i) || rarity == 0 {
                // Nobody can send it verifiably yet; a coordinator that took over fetches it
                // from its upstream.
                if self.coordinating
                    && self.upstream_in_flight < UPSTREAM_IN_FLIGHT
                    && rarity == 0
                    && best.as_ref().is_none_or(|(r, _, _)| (0, 0, 0) < *r)
                {
                    best = Some(((0, 0, 0), i, From::Upstream));
                }
            } else if !(only_coord && !self.assigned.contains(&i) && !unasked) {
                // The swarm's own count, when the coordinator sent it: the holders named here
                // are a sample.
                let rarity = match self.counts.as_ref().and_then(|c| c.of(i)) {
                    Some(n) => (n as usize).max(rarity),
                    None => rarity,
                };
                // The reader's next pieces first, in order, once a peer besides the
                // coordinator and one member in URGENT_SHARE hold them; the rest rarest first.
                let key = if lacking <= URGENT && !only_coord && rarity * URGENT_SHARE >= members {
                    (0, i as usize, 0)
                } else {
                    (1, rarity, spread(&self.me, i))
                };
                if best.as_ref().is_some_and(|(r, _, _)| *r <= key) {
                    i += 1;
                    continue;
                }
                let from = askable
                    .iter()
                    .filter(|(_, h)| h.get(i))
                    .min_by_key(|(n, _)| {
                        let from = From::Peer((*n).clone());
                        // The coordinator's link is the scarce one: it sends a piece only
                        // when it handed it to this node, or when no one else can.
                        (
                            (**n == self.coord) != self.assigned.contains(&i),
                            self.load.get(&from).copied().unwrap_or(0),
                            spread(&self.me, i) ^ spread(n, i),
                        )
                    })
                    .map(|(n, _)| From::Peer((*n).clone()));
                if let Some(from) = from {
                    best = Some((key, i, from));
                }
            }
            i += 1;
        }
        best.map(|(_, i, from)| (i, from))
    }

    /// A fetch of piece `i` from `from` ended, landed or not.
    pub(crate) fn ended(&mut self, i: u32, from: &From) {
        self.in_flight.remove(&i);
        if let Some(n) = self.load.get_mut(from) {
            *n = n.saturating_sub(1);
        }
        if *from == From::Upstream {
            self.upstream_in_flight = self.upstream_in_flight.saturating_sub(1);
        }
    }

    /// The peer `name` failed to send a piece at `now`: it said it does not hold the blob
    /// (`not_found`: it holds nothing, until the coordinator says otherwise) or the request
    /// failed (it is benched).
    pub(crate) fn peer_failed(&mut self, name: &str, not_found: bool, now: Instant) {
        if not_found {
            if let Some(h) = self.holders.get_mut(name) {
                *h = Bits::new(h.len());
            }
        } else {
            self.shunned.failed(name, now);
        }
    }

    /// The holder `name` turned a piece request away at `now` because it is sending as many
    /// pieces as it will: it is asked again shortly, for what it still holds.
    pub(crate) fn peer_busy(&mut self, name: &str, now: Instant) {
        self.shunned.busy(name, now);
    }

    /// The peer `name` sent a piece that failed its digest: it is not asked again.
    pub(crate) fn corrupt(&mut self, name: &str) {
        self.shunned.corrupt(name);
    }

    /// Piece `i` landed verified at `now`. Whether the coordinator had handed it to this node
    /// (it should hear of it soon).
    pub(crate) fn landed(&mut self, i: u32, now: Instant) -> bool {
        self.have.set(i);
        while self.have.get(self.first_missing) {
            self.first_missing += 1;
        }
        self.last_piece = now;
        self.assigned.remove(&i)
    }
}

/// A number that orders holders differently for each piece, so fetchers that see the same
/// holders spread their requests over them.
fn spread(node: &str, piece: u32) -> u64 {
    use std::hash::{Hash, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (node, piece).hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(len: u32, set: &[u32]) -> Bits {
        let mut b = Bits::new(len);
        for &i in set {
            b.set(i);
        }
        b
    }

    fn all(len: u32) -> Bits {
        let mut b = Bits::new(len);
        b.fill_below(len);
        b
    }

    #[test]
    fn a_failed_holder_is_benched_then_asked_again_and_a_bad_one_never() {
        let t0 = Instant::now();
        let mut s = Shunned::default();
        s.failed("slow", t0);
        assert!(s.avoid("slow", t0));
        assert!(s.avoid("slow", t0 + BENCH - Duration::from_millis(1)));
        assert!(!s.avoid("slow", t0 + BENCH), "a timeout is not a verdict");
        // A benched peer is not reported: the coordinator keeps offering it to others.
        assert!(s.reported().is_empty());

        s.corrupt("liar");
        for later in [t0, t0 + BENCH, t0 + BENCH * 100] {
            assert!(s.avoid("liar", later));
        }
        assert_eq!(s.reported(), vec!["liar".to_string()]);

        // A peer benched first and then caught sending a bad piece stays out.
        s.failed("both", t0);
        s.corrupt("both");
        assert!(s.avoid("both", t0 + BENCH * 10));
        // And a bad one failing later is still bad.
        s.failed("liar", t0);
        assert!(s.avoid("liar", t0 + BENCH * 10));
        assert!(!s.avoid("stranger", t0));
    }

    #[test]
    fn the_board_hands_each_piece_to_one_member_until_someone_holds_it() {
        let t0 = Instant::now();
        let mut board = Board::new(t0);
        let own = all(10);
        // Alone, a member is handed enough to fill its pipeline.
        let a = board.report("a", Bits::new(10), &[], "c", &own, t0);
        assert_eq!(a, (0..10).collect::<Vec<_>>());
        // A second member gets only what is not handed out yet: nothing is left.
        let b = board.report("b", Bits::new(10), &[], "c", &own, t0);
        assert!(b.is_empty(), "{b:?}");
        // Once `a` holds 0..3, what it was handed and holds is no longer handed out, and `a`
        // keeps the rest it was handed.
        let mid = t0 + Duration::from_secs(2);
        let a = board.report("a", bits(10, &[0, 1, 2]), &[], "c", &own, mid);
        assert_eq!(a, (3..10).collect::<Vec<_>>());
        assert!(board
            .report("b", Bits::new(10), &[], "c", &own, mid)
            .is_empty());
        // A taker that does not land its pieces in time loses them to the next member.
        let later = t0 + ASSIGN_TTL;
        let a = board.report("a", bits(10, &[0, 1, 2]), &[], "c", &own, later);
        assert_eq!(a, vec![3, 4, 5]);
        let b = board.report("b", Bits::new(10), &[], "c", &own, later);
        assert_eq!(b.len(), ASSIGN_OUTSTANDING, "{b:?}");
        assert!(b.iter().all(|&i| i >= 3), "{b:?}");
        // The offered holders are the coordinator and the others that hold something `b`
        // lacks; the counts name both members and the coordinator.
        let offer = board.offer("b", "c", &own);
        let offered: Vec<&str> = offer.holders.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(offered, vec!["c", "a"]);
        assert_eq!(offer.counts.members, 3);
        assert_eq!(offer.counts.from, 0);
        assert_eq!(offer.counts.held[..4], [2, 2, 2, 1]);
    }

    #[test]
    fn the_board_stops_offering_a_member_reported_bad_and_forgets_quiet_ones() {
        let t0 = Instant::now();
        let mut board = Board::new(t0);
        let own = all(4);
        board.report("liar", all(4), &[], "c", &own, t0);
        board.report(
            "a",
            Bits::new(4),
            &["liar".into(), "c".into()],
            "c",
            &own,
            t0,
        );
        // The liar is not offered, nor counted; `a`, which holds nothing yet, is counted.
        let offer = board.offer("b", "c", &own);
        let offered: Vec<&str> = offer.holders.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(offered, vec!["c"]);
        assert_eq!(offer.counts.members, 2);
        assert_eq!(offer.counts.held, vec![1; 4]);
        // The liar's pieces are not held for the hand-out: a member is handed them.
        let a = board.report("a", Bits::new(4), &[], "c", &own, t0);
        assert!(!a.is_empty());
        // The coordinator never takes itself for bad.
        assert!(board.holders(4, t0).contains_key("a"));
        assert!(!board.holders(4, t0).contains_key("liar"));
        assert!(board.holders(4, t0 + MEMBER_TTL).is_empty());
    }

    #[test]
    fn an_answer_names_a_bounded_sample_of_holders_at_any_swarm_size() {
        let t0 = Instant::now();
        let own = all(64);
        let mut sizes = Vec::new();
        for members in [10u32, 100, 1000, 3000] {
            let mut board = Board::new(t0);
            // Member k holds pieces k % 64 .. and a few beyond: every piece has holders, the
            // asker `me` holds the first 8.
            for k in 0..members {
                let held: Vec<u32> = (0..6).map(|d| (k + d * 11) % 64).collect();
                board.report(&format!("m{k}"), bits(64, &held), &[], "c", &own, t0);
            }
            board.report(
                "me",
                bits(64, &(0..8).collect::<Vec<_>>()),
                &[],
                "c",
                &own,
                t0,
            );
            let offer = board.offer("me", "c", &own);
            assert_eq!(offer.holders[0].0, "c");
            assert!(
                offer.holders.len() <= OFFER_HOLDERS + 1,
                "{members}: {}",
                offer.holders.len()
            );
            assert!(offer.holders.iter().all(|(n, _)| n != "me"));
            assert_eq!(offer.counts.members, members + 2);
            assert_eq!(
                offer.counts.from, 8,
                "the window starts at the first piece lacking"
            );
            // The counts are the swarm's, not the sample's: every member is counted.
            let total: u32 = offer.counts.held.iter().sum();
            let expect: u32 = (8..8 + offer.counts.held.len() as u32)
                .map(|i| {
                    1 + (0..members)
                        .filter(|k| (0..6).any(|d| (k + d * 11) % 64 == i))
                        .count() as u32
                })
                .sum();
            assert_eq!(total, expect);
            // Each piece of the window that members hold has a few of them named (all of
            // them when fewer), unless the sample is full.
            for i in 8..8 + WINDOW as u32 {
                let holding = (0..members)
                    .filter(|k| (0..6).any(|d| (k + d * 11) % 64 == i))
                    .count();
                let named = offer.holders[1..].iter().filter(|(_, h)| h.get(i)).count();
                let full = offer.holders.len() > OFFER_HOLDERS;
                assert!(
                    named >= holding.min(OFFER_PER_PIECE as usize) || full && named >= 1,
                    "{members} members: piece {i} has {named} of {holding} holders named"
                );
            }
            let wire = offer
                .holders
                .iter()
                .map(|(n, h)| n.len() + h.to_hex().len())
                .sum::<usize>()
                + offer.counts.held.len() * 4;
            sizes.push(wire);
        }
        // The answer does not grow with the swarm.
        let (small, large) = (sizes[1], sizes[3]);
        assert!(large <= small * 2, "{sizes:?}");
    }

    #[test]
    fn a_member_holding_every_piece_does_not_keep_the_coordinator_from_handing_out() {
        let t0 = Instant::now();
        let mut board = Board::new(t0);
        let own = all(10);
        // A second owner that stored the blob reported it whole; two members still fetch.
        assert!(board.report("seed", all(10), &[], "c", &own, t0).is_empty());
        let a = board.report("a", Bits::new(10), &[], "c", &own, t0);
        assert_eq!(a, vec![0, 1, 2], "handed out though the seed holds them");
        // What a fetching member holds is not handed out again; the seed is never handed any.
        let b = board.report("b", bits(10, &[3]), &[], "c", &own, t0);
        assert_eq!(b, vec![4, 5, 6]);
        let later = t0 + Duration::from_millis(100);
        assert!(board
            .report("seed", all(10), &[], "c", &own, later)
            .is_empty());
        // The fetcher takes what it was handed from the coordinator, not from the seed that
        // holds it too; the rest from the seed.
        let mut p = Picker::new("a", "c", 10, t0);
        p.absorb(
            [("c".to_string(), all(10)), ("seed".to_string(), all(10))],
            a,
            None,
        );
        let started = schedule(&mut p, t0, 10);
        assert_eq!(started.len(), IN_FLIGHT);
        for (i, f) in &started {
            let from = if *i < 3 { "c" } else { "seed" };
            assert_eq!(*f, From::Peer(from.into()), "piece {i}");
        }
        let mut q = Picker::new("b", "c", 10, t0);
        q.absorb(
            [("c".to_string(), all(10)), ("seed".to_string(), all(10))],
            [],
            None,
        );
        for (i, f) in schedule(&mut q, t0, 10) {
            assert_eq!(f, From::Peer("seed".into()), "piece {i} was not handed out");
        }
    }

    fn schedule(p: &mut Picker, now: Instant, known: u32) -> Vec<(u32, From)> {
        let mut started = Vec::new();
        p.schedule(now, &|i| i < known, &mut |i, f| {
            started.push((i, f.clone()));
            true
        });
        started
    }

    #[test]
    fn the_picker_takes_the_rarest_within_its_window_and_spares_the_coordinator() {
        let t0 = Instant::now();
        let mut p = Picker::new("me", "c", 100, t0);
        let most: Vec<u32> = (0..100).filter(|i| *i != 7 && *i != 60).collect();
        // The coordinator's fill is still running (it lacks the last piece): its link is spared.
        let growing: Vec<u32> = (0..99).collect();
        // Twenty members holding nothing yet: no piece is held by one in four (so none is
        // taken in order for the reader first).
        let empty = (0..20).map(|k| (format!("e{k}"), Bits::new(100)));
        p.absorb(
            [
                ("c".to_string(), bits(100, &growing)),
                ("x".to_string(), all(100)),
                ("y".to_string(), bits(100, &most)),
                ("me".to_string(), all(100)),
            ]
            .into_iter()
            .chain(empty),
            [],
            None,
        );
        let started = schedule(&mut p, t0, 100);
        assert_eq!(started.len(), IN_FLIGHT);
        // Piece 7 is held by two, the rest by three: it goes first (from the peer, not the
        // coordinator), and 60 (as rare) lies past the window.
        assert_eq!(started[0], (7, From::Peer("x".into())));
        assert!(started.iter().all(|(i, _)| (*i as usize) < WINDOW));
        assert!(started.iter().all(|(_, f)| *f != From::Peer("c".into())));
        // Full: nothing more starts until one ends.
        assert!(schedule(&mut p, t0, 100).is_empty());
        let (i, f) = started[0].clone();
        p.ended(i, &f);
        assert!(!p.landed(i, t0));
        assert_eq!(schedule(&mut p, t0, 100).len(), 1);
    }

    #[test]
    fn the_picker_takes_from_the_coordinator_only_what_it_was_handed_or_when_idle() {
        let t0 = Instant::now();
        // The coordinator's own fill still runs: it lacks the last piece.
        let growing = bits(16, &(0..15).collect::<Vec<u32>>());
        let mut p = Picker::new("me", "c", 16, t0);
        p.absorb([("c".to_string(), growing.clone())], [2, 5], None);
        let started = schedule(&mut p, t0, 16);
        assert_eq!(
            started,
            vec![(2, From::Peer("c".into())), (5, From::Peer("c".into()))]
        );
        // A piece whose digest is unknown is not asked for.
        let mut q = Picker::new("me", "c", 16, t0);
        q.absorb([("c".to_string(), growing)], [2, 5], None);
        assert_eq!(schedule(&mut q, t0, 3), vec![(2, From::Peer("c".into()))]);
        // Idle past UNASKED_AFTER, it takes the rest unasked.
        for (i, f) in &started {
            p.ended(*i, f);
            assert!(p.landed(*i, t0));
        }
        assert!(schedule(&mut p, t0, 16).is_empty());
        let later = t0 + UNASKED_AFTER + Duration::from_millis(1);
        assert_eq!(schedule(&mut p, later, 16).len(), IN_FLIGHT);
    }

    #[test]
    fn the_picker_shuns_bad_and_failed_holders_and_benches_non_members() {
        let t0 = Instant::now();
        let mut p = Picker::new("me", "c", 4, t0);
        p.absorb(
            [("bad".to_string(), all(4)), ("gone".to_string(), all(4))],
            [],
            None,
        );
        p.corrupt("bad");
        // "gone" cannot be started (not a member): it is benched and nothing is started.
        let mut tries = Vec::new();
        p.schedule(t0, &|_| true, &mut |i, f| {
            tries.push((i, f.clone()));
            false
        });
        assert_eq!(tries.len(), 1);
        assert_eq!(tries[0].1, From::Peer("gone".into()));
        assert!(schedule(&mut p, t0, 4).is_empty());
        assert_eq!(p.bad(), vec!["bad".to_string()]);
        // Benched, not banned: asked again after BENCH.
        let started = schedule(&mut p, t0 + BENCH, 4);
        assert!(started.iter().all(|(_, f)| *f == From::Peer("gone".into())));
        assert_eq!(started.len(), IN_FLIGHT.min(4));
        // It says it lacks the blob: it holds nothing until the coordinator says otherwise.
        for (i, f) in &started {
            p.ended(*i, f);
        }
        p.peer_failed("gone", true, t0 + BENCH);
        assert!(schedule(&mut p, t0 + BENCH, 4).is_empty());
    }

    #[test]
    fn a_busy_holder_is_asked_again_shortly_for_what_it_still_holds() {
        let t0 = Instant::now();
        let mut p = Picker::new("me", "c", 4, t0);
        p.absorb([("h".to_string(), all(4))], [], None);
        let started = schedule(&mut p, t0, 4);
        assert!(!started.is_empty());
        for (i, f) in &started {
            p.ended(*i, f);
        }
        p.peer_busy("h", t0);
        assert!(schedule(&mut p, t0, 4).is_empty(), "asked again at once");
        // Not "not here": once the bench is over it is asked for the same pieces.
        let again = schedule(&mut p, t0 + BUSY, 4);
        assert_eq!(again.len(), started.len());
        assert!(again.iter().all(|(_, f)| *f == From::Peer("h".into())));
    }

    #[test]
    fn fetchers_that_see_the_same_holders_spread_their_requests_over_them() {
        let t0 = Instant::now();
        // Twenty holders, each of two pieces of its own (equally rare), and a hundred
        // fetchers told the same.
        let holders: Vec<(String, Bits)> = (0..20)
            .map(|k| (format!("h{k}"), bits(40, &[2 * k, 2 * k + 1])))
            .collect();
        let counts = Counts {
            members: 121,
            from: 0,
            held: vec![1; 40],
        };
        let mut asked: HashMap<From, usize> = HashMap::new();
        for k in 0..100 {
            let mut p = Picker::new(&format!("f{k}"), "c", 40, t0);
            p.absorb(holders.iter().cloned(), [], Some(counts.clone()));
            let started = schedule(&mut p, t0, 40);
            assert_eq!(started.len(), IN_FLIGHT);
            for (_, from) in started {
                *asked.entry(from).or_default() += 1;
            }
        }
        // 300 requests over 20 holders: each is asked, none by a crowd.
        assert_eq!(asked.len(), 20, "{asked:?}");
        let most = asked.values().max().copied().unwrap_or(0);
        assert!(
            most <= 3 * 300 / 20,
            "one holder was asked {most} times: {asked:?}"
        );
    }

    #[test]
    fn the_readers_next_pieces_come_first_once_one_member_in_four_holds_them() {
        let t0 = Instant::now();
        // Six members: the coordinator (its fill still running), two holding everything and
        // two fetching. Piece 30 is the rarest (the coordinator and x), the first ones are held
        // by three.
        let mut p = Picker::new("me", "c", 64, t0);
        let growing: Vec<u32> = (0..63).collect();
        let not_30: Vec<u32> = (0..64).filter(|i| *i != 30).collect();
        p.absorb(
            [
                ("c".to_string(), bits(64, &growing)),
                ("x".to_string(), all(64)),
                ("y".to_string(), bits(64, &not_30)),
                ("f".to_string(), Bits::new(64)),
            ],
            [],
            None,
        );
        let started: Vec<u32> = schedule(&mut p, t0, 64).iter().map(|(i, _)| *i).collect();
        // The first three in order, for the client reading the blob; then the rarest.
        assert_eq!(started, vec![0, 1, 2, 30]);
        // The same pieces held by three of a hundred: the rarest first again.
        let mut q = Picker::new("me", "c", 64, t0);
        let mut held = vec![3; 64];
        held[30] = 2;
        q.absorb(
            [
                ("c".to_string(), bits(64, &growing)),
                ("x".to_string(), all(64)),
                ("y".to_string(), bits(64, &not_30)),
            ],
            [],
            Some(Counts {
                members: 100,
                from: 0,
                held,
            }),
        );
        assert_eq!(schedule(&mut q, t0, 64)[0], (30, From::Peer("x".into())));
    }

    #[test]
    fn the_swarms_counts_decide_which_piece_is_rarest() {
        let t0 = Instant::now();
        // The sample names one holder of each piece; the counts say piece 3 is the rarest.
        let mut p = Picker::new("me", "c", 8, t0);
        let counts = Counts {
            members: 50,
            from: 0,
            held: vec![10, 10, 10, 2, 10, 10, 10, 10],
        };
        p.absorb([("x".to_string(), all(8))], [], Some(counts));
        assert_eq!(schedule(&mut p, t0, 8)[0], (3, From::Peer("x".into())));
        // Without counts (an older coordinator), the named holders are all it knows.
        let mut q = Picker::new("me", "c", 8, t0);
        q.absorb(
            [("x".to_string(), all(8)), ("y".to_string(), bits(8, &[5]))],
            [],
            None,
        );
        assert!(schedule(&mut q, t0, 8).iter().all(|(i, _)| *i != 5));
    }

    #[test]
    fn a_fetcher_turns_to_the_next_owner_or_takes_over_and_fetches_upstream() {
        let t0 = Instant::now();
        let mut p = Picker::new("me", "c", 4, t0);
        p.absorb([("c".to_string(), all(4))], [], None);
        for _ in 0..COORD_FAILURES - 1 {
            p.report_failed();
            assert!(
                !p.give_up_coordinator(false),
                "a slow coordinator keeps its role"
            );
        }
        assert!(
            p.give_up_coordinator(true),
            "one the membership dropped does not"
        );
        assert!(p.failed_coordinator("c"));
        assert_eq!(p.turn(Some("d")), Some(Turn::To("d".into())));
        assert!(p.failed_reports());
        p.absorb([], [], None);
        assert!(p.give_up_coordinator(true));
        assert_eq!(p.turn(Some("me")), Some(Turn::Coordinate));
        assert!(p.coordinating());
        // Now nobody holds anything: it takes pieces from its upstream, a couple at a time.
        let started = schedule(&mut p, t0, 0);
        assert_eq!(
            started,
            vec![(0, From::Upstream), (1, From::Upstream)],
            "UPSTREAM_IN_FLIGHT"
        );
    }
}
