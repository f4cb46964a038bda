//! Swarms: many nodes fetching one large blob at once, taking pieces from each other instead of
//! each streaming the whole blob from its owner.
//!
//! There is no tracker. The blob's first owner, which every fetcher would ask anyway, is the
//! swarm's coordinator: it fills the blob from its upstream in one stream (or has it stored),
//! hashing each piece as it goes by ([`crate::pieces`]). Every other node that wants the blob
//! reports to the coordinator a few times a second which pieces it holds; the coordinator
//! answers with the piece digests, who holds what, and a few pieces that only it holds for this
//! node to take from it. A fetcher takes pieces (ranged GETs of a few MiB) from several holders
//! at once, rarest first, peers whose own fills are still growing included, and serves what it
//! holds to the others. So each piece leaves the coordinator about once and every node's link
//! carries a share of the load.
//!
//! Every piece is checked against its digest before a byte of it is written; a holder that
//! sends a bad piece is not asked again by this fill (and is reported to the coordinator, which
//! stops offering it), while one that fails to send a piece (a timeout, a refused connection)
//! is only benched for [`BENCH`] and then asked again; either way the piece is taken elsewhere. The whole blob is hashed in order as the pieces join up, and it becomes
//! visible only when that digest matches. If the coordinator stops answering, the next owner
//! takes over: fetchers report to it instead, and when it is this node, it takes the pieces no
//! one holds from its upstream, piece by piece.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use pier_cluster::NodeId;
use pier_oci::{Digest, Hasher};
use pier_peer::{Cluster, PeerError, SwarmAnswer, SwarmHolder, SwarmReport};

use crate::fill::{Fill, FillError};
use crate::pieces::{
    Bits, PieceDigest, PieceHasher, Pieces, PIECE_ALGORITHM, PIECE_SIZE, SWARM_MIN,
};
use crate::sources::upstream_error;
use crate::{BlobSource, Mirror, MirrorError, MirrorRef, Result};

/// A member that has not reported for this long has left the swarm.
const MEMBER_TTL: Duration = Duration::from_secs(3);
/// A piece handed to a member that does not report holding it within this long is handed to
/// someone else.
const ASSIGN_TTL: Duration = Duration::from_secs(4);
/// Pieces a member may have been handed and not yet reported holding.
const ASSIGN_OUTSTANDING: usize = 3;
const ASSIGN_ALONE: usize = 12;
/// How often a fetcher reports (and sooner after it lands a piece it was handed).
const REPORT_EVERY: Duration = Duration::from_millis(200);
const REPORT_SOON: Duration = Duration::from_millis(20);
/// Reports failed in a row before a coordinator the membership still lists is given up.
const COORD_FAILURES: u32 = 10;
/// Pieces a fetcher takes at once, from all holders together.
const IN_FLIGHT: usize = 6;
/// Pieces a coordinator that took over takes from its upstream at once.
const UPSTREAM_IN_FLIGHT: usize = 2;
/// How far past the first missing piece a fetcher looks for pieces to take: far enough to
/// choose rare ones, near enough that its readers, who read in order, are not kept waiting.
const WINDOW: usize = 48;
/// Pieces kept in memory until the whole-blob hash reaches them; later ones are read back
/// from the spool.
const HASH_AHEAD: usize = 16;
/// An idle fetcher that landed nothing for this long takes pieces from the coordinator
/// without being handed them.
const UNASKED_AFTER: Duration = Duration::from_secs(1);
/// A fill that lands no piece for this long gives up.
const STALL: Duration = Duration::from_secs(60);
/// Coordinators' boards nobody has reported to for this long are dropped.
const BOARD_TTL: Duration = Duration::from_secs(60);
/// Stored blobs whose piece digests are kept for swarms.
const STORED_PIECES: usize = 64;
/// How long a holder that failed to send a piece (as opposed to sending a bad one) is not
/// asked: long enough that a dead peer costs a failed request or two before gossip declares it
/// dead, short enough that a peer that was only slow for a moment rejoins the swarm.
const BENCH: Duration = Duration::from_secs(3);

/// The holders a fill is not asking, and why. A bad piece is proof of a bad peer (a corrupt
/// disk, a bug, an attacker) and excludes it for the rest of the fill; a failed request is
/// not: a timeout under load or a restart looks the same, so it only benches the peer.
#[derive(Debug, Default)]
struct Shunned {
    bad: HashSet<String>,
    benched: HashMap<String, Instant>,
}

impl Shunned {
    /// `name` sent a piece that failed its digest.
    fn corrupt(&mut self, name: &str) {
        self.benched.remove(name);
        self.bad.insert(name.to_string());
    }

    /// `name` failed to send a piece at `now`.
    fn failed(&mut self, name: &str, now: Instant) {
        self.benched.insert(name.to_string(), now + BENCH);
    }

    /// Whether `name` is not to be asked at `now`.
    fn avoid(&self, name: &str, now: Instant) -> bool {
        self.bad.contains(name) || self.benched.get(name).is_some_and(|until| now < *until)
    }

    /// What the coordinator hears: only the proven bad, so a benched peer is still offered.
    fn reported(&self) -> Vec<String> {
        self.bad.iter().cloned().collect()
    }
}

/// What a coordinator knows of one swarm.
pub(crate) struct Board {
    members: HashMap<String, (Bits, Instant)>,
    /// Members some fetcher found bad: not offered as holders, their pieces handed out again.
    bad: HashSet<String>,
    /// Pieces handed to a member to take from the coordinator, and when.
    assigned: HashMap<u32, (String, Instant)>,
    touched: Instant,
}

impl Board {
    fn new() -> Board {
        Board {
            members: HashMap::new(),
            bad: HashSet::new(),
            assigned: HashMap::new(),
            touched: Instant::now(),
        }
    }
}

fn digest_strings(d: Vec<Option<PieceDigest>>) -> Vec<Option<String>> {
    d.into_iter().map(|d| d.map(|d| d.to_string())).collect()
}

impl Mirror {
    /// The pieces of `digest` this node can offer a swarm as its coordinator: a fill in
    /// progress, the stored blob, or (given `r`) a fill started now from the upstream.
    /// `None` when the blob is too small to swarm; then the size, when known.
    async fn coordinator_pieces(
        self: &Arc<Self>,
        digest: &Digest,
        r: Option<&MirrorRef>,
    ) -> Result<std::result::Result<Arc<Pieces>, u64>> {
        let from_fill = |fill: Arc<Fill>| async move {
            let size = fill.started().await.map_err(MirrorError::Fill)?;
            Ok::<_, MirrorError>(match fill.pieces() {
                Some(p) => Ok(p.clone()),
                None => Err(size.unwrap_or(0)),
            })
        };
        if let Some(fill) = self.fill_in_progress(digest) {
            return from_fill(fill).await;
        }
        if let Some(size) = self.blobs.stat(digest).await? {
            return self.stored_pieces(digest, size).await;
        }
        let Some(r) = r else {
            return Err(MirrorError::Fill(FillError::NotFound));
        };
        match self.blob_for_peer(r, digest).await? {
            BlobSource::Local { size } => self.stored_pieces(digest, size).await,
            BlobSource::Filling { fill, .. } => from_fill(fill).await,
        }
    }

    /// Piece digests of a stored blob, computed once by reading it.
    async fn stored_pieces(
        &self,
        digest: &Digest,
        size: u64,
    ) -> Result<std::result::Result<Arc<Pieces>, u64>> {
        if size < SWARM_MIN {
            return Ok(Err(size));
        }
        if let Some(p) = self.lock_stored().get(digest) {
            return Ok(Ok(p.clone()));
        }
        let pieces = Arc::new(Pieces::new(size, PIECE_SIZE));
        let mut hasher = PieceHasher::new(pieces.clone());
        let mut body = self.blobs.read(digest, 0, size).await?;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(pier_store::StoreError::Io)?;
            hasher.update(&chunk);
        }
        pieces.mark_written(size);
        if pieces.digests_known() != pieces.count() {
            return Err(MirrorError::Fill(FillError::Store(format!(
                "{digest} is shorter than its recorded {size} bytes"
            ))));
        }
        let mut stored = self.lock_stored();
        if stored.len() >= STORED_PIECES {
            if let Some(k) = stored.keys().next().cloned() {
                stored.remove(&k);
            }
        }
        stored.insert(digest.clone(), pieces.clone());
        Ok(Ok(pieces))
    }

    fn lock_stored(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<Pieces>>> {
        self.stored_pieces.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_boards(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Board>> {
        self.boards.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answer a swarm member's report, as the coordinator of `digest`'s swarm. With `r`, a node
    /// that lacks the blob starts filling it from that upstream first.
    pub async fn swarm_answer(
        self: &Arc<Self>,
        digest: &Digest,
        from: &str,
        report: &SwarmReport,
        r: Option<&MirrorRef>,
    ) -> Result<SwarmAnswer> {
        let pieces = match self.coordinator_pieces(digest, r).await? {
            Ok(p) => p,
            Err(size) => {
                return Ok(SwarmAnswer {
                    size,
                    swarm: false,
                    piece_size: PIECE_SIZE,
                    digests_from: 0,
                    digests: Vec::new(),
                    holders: Vec::new(),
                    assign: Vec::new(),
                })
            }
        };
        let me = self
            .cluster
            .get()
            .map(|c| c.local().name)
            .unwrap_or_default();
        let count = pieces.count();
        let have = Bits::from_hex(count, &report.have).unwrap_or_else(|| Bits::new(count));
        let own = pieces.have();
        let now = Instant::now();
        let mut boards = self.lock_boards();
        boards.retain(|_, b| b.touched.elapsed() < BOARD_TTL);
        let board = boards.entry(digest.clone()).or_insert_with(Board::new);
        board.touched = now;
        board.members.insert(from.to_string(), (have.clone(), now));
        board
            .members
            .retain(|_, (_, seen)| seen.elapsed() < MEMBER_TTL);
        board
            .bad
            .extend(report.bad.iter().filter(|n| **n != me).cloned());
        let mut held = Bits::new(count);
        let bad = &board.bad;
        for (_, (h, _)) in board.members.iter().filter(|(n, _)| !bad.contains(*n)) {
            for i in 0..count {
                if h.get(i) {
                    held.set(i);
                }
            }
        }
        // A handed-out piece stays handed out until a member holds it, or its taker goes
        // quiet or takes too long.
        let members = &board.members;
        board.assigned.retain(|i, (n, at)| {
            !held.get(*i) && at.elapsed() < ASSIGN_TTL && members.contains_key(n)
        });
        let mut assign: Vec<u32> = board
            .assigned
            .iter()
            .filter(|(_, (n, _))| n == from)
            .map(|(i, _)| *i)
            .collect();
        // A lone fetcher takes everything from the coordinator: hand it enough to keep its
        // pipeline full.
        let outstanding = if board.members.len() <= 1 {
            ASSIGN_ALONE
        } else {
            ASSIGN_OUTSTANDING
        };
        let mut i = 0;
        while assign.len() < outstanding && i < count {
            if own.get(i) && !held.get(i) && !board.assigned.contains_key(&i) {
                board.assigned.insert(i, (from.to_string(), now));
                assign.push(i);
            }
            i += 1;
        }
        assign.sort_unstable();
        let mut holders = vec![SwarmHolder {
            node: me,
            have: own.to_hex(),
        }];
        holders.extend(
            board
                .members
                .iter()
                .filter(|(n, (h, _))| {
                    n.as_str() != from && h.count() > 0 && !board.bad.contains(*n)
                })
                .map(|(n, (h, _))| SwarmHolder {
                    node: n.clone(),
                    have: h.to_hex(),
                }),
        );
        drop(boards);
        let known = report.known.min(count);
        Ok(SwarmAnswer {
            size: pieces.size(),
            swarm: true,
            piece_size: pieces.piece_size(),
            digests_from: known,
            digests: digest_strings(pieces.digests_from(known)),
            holders,
            assign,
        })
    }

    /// Members of the swarm this node coordinates for `digest` and what they hold.
    fn board_holders(&self, digest: &Digest, count: u32) -> HashMap<String, Bits> {
        let boards = self.lock_boards();
        let Some(board) = boards.get(digest) else {
            return HashMap::new();
        };
        board
            .members
            .iter()
            .filter(|(n, (h, seen))| {
                seen.elapsed() < MEMBER_TTL && h.len() == count && !board.bad.contains(*n)
            })
            .map(|(n, (h, _))| (n.clone(), h.clone()))
            .collect()
    }

    /// Ask the blob's coordinator whether this fill should swarm. `Some` with the coordinator
    /// and its first answer when the blob is large enough; `None` to fetch it directly (this
    /// node coordinates, the blob is small, or no coordinator answers).
    pub(crate) async fn join_swarm(
        &self,
        cluster: &Cluster,
        r: &MirrorRef,
        digest: &Digest,
    ) -> Option<(NodeId, SwarmAnswer)> {
        let me = cluster.local().name;
        let report = SwarmReport {
            have: String::new(),
            known: 0,
            upstream: Some(r.upstream_name().to_string()),
            repo: Some(r.cache_repo.clone()),
            bad: Vec::new(),
        };
        for owner in cluster.owners(digest.to_string().as_bytes()) {
            if owner.name == me {
                return None;
            }
            match cluster.client().swarm(&owner, digest, &report, true).await {
                Ok(a) if a.swarm => return Some((owner, a)),
                Ok(_) => return None,
                Err(e) => {
                    tracing::debug!(%digest, owner = %owner.name, error = %e, "swarm coordinator did not answer");
                }
            }
        }
        None
    }

    /// Fetch `digest` piece by piece from its swarm, coordinated by `coord` (whose first
    /// answer is `first`), and commit it linked to `link_repo` once the whole blob verifies.
    pub(crate) async fn run_swarm(
        &self,
        digest: &Digest,
        fill: &Arc<Fill>,
        link_repo: &str,
        r: &MirrorRef,
        cluster: &Cluster,
        (coord, first): (NodeId, SwarmAnswer),
    ) -> std::result::Result<(), FillError> {
        let size = first.size;
        let max = self.policy.max_blob_bytes;
        if size > max {
            return Err(FillError::TooLarge(format!(
                "coordinator {} announced {size} bytes for {digest}, more than the {max}-byte limit",
                coord.name
            )));
        }
        if first.piece_size == 0 || size.div_ceil(first.piece_size) > u32::MAX as u64 {
            return Err(FillError::Peer(format!(
                "coordinator {} gave an unusable piece size {}",
                coord.name, first.piece_size
            )));
        }
        // Held until the bytes are committed (or given up): the cache makes room for them now.
        let _reserved = self.reservations.reserve(size);
        let pieces = fill
            .pieces
            .get_or_init(|| Arc::new(Pieces::new(size, first.piece_size)))
            .clone();
        let spool = self.blobs.spool().await.map_err(FillError::store)?;
        let _ = fill.spool.set(spool.clone());
        fill.progress.send_modify(|p| {
            p.started = true;
            p.size = Some(size);
            p.origin = Some("peer");
            p.from_node = Some(coord.name.clone());
        });
        self.metrics.swarm_fills.inc();
        let mut run = SwarmRun {
            mirror: self,
            digest,
            fill,
            r,
            cluster,
            me: cluster.local().name,
            key: digest.to_string(),
            pieces: pieces.clone(),
            spool: spool.clone(),
            coord,
            coordinating: false,
            failed_coords: HashSet::new(),
            coord_failures: 0,
            holders: HashMap::new(),
            assigned: HashSet::new(),
            shunned: Shunned::default(),
            in_flight: HashMap::new(),
            load: HashMap::new(),
            upstream_in_flight: 0,
            have: Bits::new(pieces.count()),
            prefix: 0,
            hashed: 0,
            hasher: Hasher::new(digest.algorithm()),
            waiting: BTreeMap::new(),
            tasks: FuturesUnordered::new(),
            last_piece: Instant::now(),
        };
        run.absorb(first);
        let outcome = run.drive().await;
        drop(run);
        match outcome {
            Ok(()) => {
                let s2 = spool.clone();
                tokio::task::spawn_blocking(move || s2.sync())
                    .await
                    .map_err(|e| FillError::Store(e.to_string()))?
                    .map_err(FillError::store)?;
                self.blobs
                    .commit_spool(spool, digest, size)
                    .await
                    .map_err(FillError::store)?;
                self.meta
                    .link_blob(link_repo, digest, size)
                    .await
                    .map_err(FillError::store)?;
                Ok(())
            }
            Err(e) => {
                spool.discard();
                Err(e)
            }
        }
    }
}

/// Where a piece came from.
#[derive(Clone, PartialEq, Eq, Hash)]
enum From {
    Peer(String),
    Upstream,
}

type PieceResult = (u32, From, std::result::Result<Bytes, FillError>);

/// One swarm fill's state on the fetching node.
struct SwarmRun<'a> {
    mirror: &'a Mirror,
    digest: &'a Digest,
    fill: &'a Arc<Fill>,
    r: &'a MirrorRef,
    cluster: &'a Cluster,
    me: String,
    key: String,
    pieces: Arc<Pieces>,
    spool: pier_store::Spool,
    coord: NodeId,
    /// This node has become the coordinator (the previous one stopped answering).
    coordinating: bool,
    failed_coords: HashSet<String>,
    coord_failures: u32,
    /// Who holds which pieces, as the coordinator last said.
    holders: HashMap<String, Bits>,
    /// Pieces the coordinator handed this node to take from it.
    assigned: HashSet<u32>,
    /// Holders this fill is not asking: for good after a bad piece, for a while after a failure.
    shunned: Shunned,
    in_flight: HashMap<u32, From>,
    /// Pieces in flight per holder.
    load: HashMap<From, usize>,
    upstream_in_flight: usize,
    have: Bits,
    /// Pieces joined up from the first, and the bytes of them hashed into the whole digest.
    prefix: u32,
    hashed: u64,
    hasher: Hasher,
    /// Pieces landed past the prefix, with their bytes while few enough are waiting.
    waiting: BTreeMap<u32, Option<Bytes>>,
    tasks: FuturesUnordered<BoxFuture<'static, PieceResult>>,
    last_piece: Instant,
}

impl SwarmRun<'_> {
    /// Take in a coordinator's answer.
    fn absorb(&mut self, a: SwarmAnswer) {
        let count = self.pieces.count();
        for (k, d) in a.digests.into_iter().enumerate() {
            let i = a.digests_from as usize + k;
            if i >= count as usize {
                break;
            }
            if let Some(d) = d.and_then(|d| d.parse::<PieceDigest>().ok()) {
                if self.pieces.digest(i as u32).is_none() {
                    self.pieces.set_digest(i as u32, d);
                }
            }
        }
        self.holders = a
            .holders
            .into_iter()
            .filter(|h| h.node != self.me)
            .filter_map(|h| Some((h.node.clone(), Bits::from_hex(count, &h.have)?)))
            .collect();
        self.assigned = a.assign.into_iter().filter(|&i| i < count).collect();
        self.coord_failures = 0;
    }

    async fn drive(&mut self) -> std::result::Result<(), FillError> {
        let mut next_report = Instant::now() + REPORT_EVERY;
        while !self.have.all() {
            if self.coordinating {
                self.holders = self.mirror.board_holders(self.digest, self.pieces.count());
            }
            self.schedule();
            if self.last_piece.elapsed() > STALL {
                return Err(FillError::Peer(format!(
                    "the swarm for {} delivered no piece for {} s",
                    self.digest,
                    STALL.as_secs()
                )));
            }
            let wait = next_report.saturating_duration_since(Instant::now());
            tokio::select! {
                Some((i, from, result)) = self.tasks.next(), if !self.tasks.is_empty() => {
                    if self.landed(i, from, result).await? {
                        next_report = next_report.min(Instant::now() + REPORT_SOON);
                    }
                }
                () = tokio::time::sleep(wait) => {
                    self.report().await;
                    next_report = Instant::now() + REPORT_EVERY;
                }
            }
        }
        // Every piece is in: hash what is still waiting, in order.
        self.join_prefix().await?;
        let hasher = std::mem::replace(&mut self.hasher, Hasher::new(self.digest.algorithm()));
        let actual = hasher.finish();
        if actual != *self.digest || self.hashed != self.pieces.size() {
            return Err(FillError::Corrupt(format!(
                "swarm pieces of {} joined to {actual}",
                self.digest
            )));
        }
        self.fill.progress.send_modify(|p| p.verified = true);
        Ok(())
    }

    /// Tell the coordinator what this node holds and take in its answer; after two failures
    /// in a row, turn to the next owner (or take over, when that is this node).
    async fn report(&mut self) {
        if self.coordinating {
            return;
        }
        let report = SwarmReport {
            have: self.pieces.have().to_hex(),
            known: self.pieces.digests_known(),
            upstream: Some(self.r.upstream_name().to_string()),
            repo: Some(self.r.cache_repo.clone()),
            bad: self.shunned.reported(),
        };
        let first = self.coord_failures > 0;
        match self
            .cluster
            .client()
            .swarm(&self.coord, self.digest, &report, first)
            .await
        {
            Ok(a) if a.swarm && a.size == self.pieces.size() => self.absorb(a),
            Ok(_) => {
                tracing::warn!(digest = %self.digest, coordinator = %self.coord.name, "coordinator answered for a different blob size; ignoring it");
                self.coord_failures += 1;
            }
            Err(e) => {
                tracing::debug!(digest = %self.digest, coordinator = %self.coord.name, error = %e, "swarm report failed");
                self.coord_failures += 1;
            }
        }
        // A coordinator that is merely slow to answer (a busy node) keeps its role: a second
        // coordinator would fetch from the upstream what the first already has. It is replaced
        // once the membership declares it dead, or after many failures in a row.
        let gone = self.cluster.member(&self.coord.name).is_none();
        if self.coord_failures >= COORD_FAILURES || gone {
            self.failed_coords.insert(self.coord.name.clone());
            let next = self
                .cluster
                .owners(self.key.as_bytes())
                .into_iter()
                .chain(self.cluster.candidates(self.key.as_bytes()))
                .find(|n| !self.failed_coords.contains(&n.name));
            match next {
                Some(n) if n.name == self.me => {
                    tracing::info!(digest = %self.digest, previous = %self.coord.name, "coordinating the swarm now");
                    self.coordinating = true;
                    self.holders.retain(|n, _| !self.failed_coords.contains(n));
                }
                Some(n) => {
                    tracing::info!(digest = %self.digest, previous = %self.coord.name, next = %n.name, "swarm coordinator changed");
                    self.coord = n;
                    self.holders.retain(|n, _| !self.failed_coords.contains(n));
                }
                None => {}
            }
            self.coord_failures = 1;
        }
    }

    /// Start fetching pieces until the in-flight limit: among the first missing pieces, the
    /// rarest first, each from its least-loaded holder. A piece only the coordinator holds is
    /// taken from it only when handed to this node, or when no one else is fetching.
    fn schedule(&mut self) {
        self.schedule_pass(false);
        // Idle with pieces left that only the coordinator can send verifiably (their other
        // holders failed this node, say): take them from it unasked rather than wait.
        if self.in_flight.is_empty() && self.last_piece.elapsed() > UNASKED_AFTER {
            self.schedule_pass(true);
        }
    }

    fn schedule_pass(&mut self, unasked: bool) {
        let count = self.pieces.count();
        let now = Instant::now();
        while self.in_flight.len() < IN_FLIGHT {
            let mut best: Option<(usize, u32, From)> = None;
            let mut looked = 0;
            let mut i = self.prefix;
            while i < count && looked < WINDOW {
                if self.have.get(i) || self.in_flight.contains_key(&i) {
                    i += 1;
                    continue;
                }
                looked += 1;
                let holders: Vec<&String> = self
                    .holders
                    .iter()
                    .filter(|(n, h)| h.get(i) && !self.shunned.avoid(n, now))
                    .map(|(n, _)| n)
                    .collect();
                let choice = if self.pieces.digest(i).is_none() || holders.is_empty() {
                    // Nobody can send it verifiably yet; a coordinator that took over fetches it
                    // from its upstream.
                    (self.coordinating
                        && self.upstream_in_flight < UPSTREAM_IN_FLIGHT
                        && holders.is_empty())
                    .then_some(From::Upstream)
                } else {
                    let only_coord = holders.iter().all(|n| **n == self.coord.name);
                    if only_coord && !self.assigned.contains(&i) && !unasked {
                        None
                    } else {
                        holders
                            .iter()
                            .min_by_key(|n| {
                                let from = From::Peer((**n).clone());
                                // The coordinator's link is the scarce one: it sends a
                                // piece only when no one else can.
                                (
                                    n.as_str() == self.coord.name,
                                    self.load.get(&from).copied().unwrap_or(0),
                                    spread(n, i),
                                )
                            })
                            .map(|n| From::Peer((*n).clone()))
                    }
                };
                if let Some(from) = choice {
                    let rarity = match &from {
                        From::Upstream => 0,
                        From::Peer(_) => holders.len(),
                    };
                    if best.as_ref().is_none_or(|(r, _, _)| rarity < *r) {
                        best = Some((rarity, i, from));
                    }
                }
                i += 1;
            }
            let Some((_, i, from)) = best else {
                return;
            };
            self.start(i, from);
        }
    }

    fn start(&mut self, i: u32, from: From) {
        let (start, end) = self.pieces.range(i);
        let digest = self.digest.clone();
        let fut: BoxFuture<'static, PieceResult> = match &from {
            From::Peer(name) => {
                let Some(node) = self.cluster.member(name) else {
                    // Not a member just now (left, or not yet seen again): ask again later.
                    self.shunned.failed(name, Instant::now());
                    return;
                };
                let client = self.cluster.client().clone();
                let f = from.clone();
                async move {
                    let r = client
                        .get_piece(&node, &digest, start, end)
                        .await
                        .map_err(peer_fill_error);
                    (i, f, r)
                }
                .boxed()
            }
            From::Upstream => {
                self.upstream_in_flight += 1;
                let upstream = self.r.upstream.clone();
                let repo = self.r.repo.clone();
                let limit = self.mirror.upstream_limit.clone();
                let counter = self
                    .mirror
                    .metrics
                    .upstream_bytes_counter(self.r.upstream_name());
                async move {
                    let r = async {
                        let (_, body) = upstream
                            .client
                            .get_blob(&repo, &digest, start)
                            .await
                            .map_err(upstream_error)?;
                        let body = pier_peer::rate::limited(body, limit);
                        take_exactly(body, (end - start) as usize, &counter).await
                    }
                    .await;
                    (i, From::Upstream, r)
                }
                .boxed()
            }
        };
        *self.load.entry(from.clone()).or_default() += 1;
        self.in_flight.insert(i, from);
        self.tasks.push(fut);
    }

    /// A piece fetch ended. `Ok(true)` when it landed a piece the coordinator handed this
    /// node (the coordinator should hear of it soon).
    async fn landed(
        &mut self,
        i: u32,
        from: From,
        result: std::result::Result<Bytes, FillError>,
    ) -> std::result::Result<bool, FillError> {
        self.in_flight.remove(&i);
        if let Some(n) = self.load.get_mut(&from) {
            *n = n.saturating_sub(1);
        }
        if from == From::Upstream {
            self.upstream_in_flight = self.upstream_in_flight.saturating_sub(1);
        }
        let bytes = match result {
            Ok(b) => b,
            Err(e) => {
                self.mirror.metrics.piece("failed");
                match &from {
                    From::Peer(n) => {
                        tracing::info!(digest = %self.digest, piece = i, peer = %n, error = %e, "piece fetch failed; asking other holders");
                        if matches!(e, FillError::NotFound) {
                            if let Some(h) = self.holders.get_mut(n) {
                                *h = Bits::new(h.len());
                            }
                        } else {
                            self.shunned.failed(n, Instant::now());
                        }
                    }
                    From::Upstream => {
                        tracing::warn!(digest = %self.digest, piece = i, error = %e, "upstream piece fetch failed");
                        if matches!(e, FillError::NotFound | FillError::Denied(_)) {
                            return Err(e);
                        }
                    }
                }
                return Ok(false);
            }
        };
        // Checked with the algorithm the coordinator's digest names; a piece nobody has a digest
        // for yet (taken from the upstream) gets one in this node's algorithm.
        let want = self.pieces.digest(i);
        let algorithm = want
            .as_ref()
            .map_or(PIECE_ALGORITHM, PieceDigest::algorithm);
        let got = PieceDigest::compute(algorithm, &bytes);
        match (want, &from) {
            (Some(want), From::Peer(n)) if want != got => {
                self.mirror.metrics.piece("corrupt");
                tracing::warn!(digest = %self.digest, piece = i, peer = %n, "piece failed its digest; that peer is not asked again by this fill");
                self.shunned.corrupt(n);
                return Ok(false);
            }
            (Some(want), From::Upstream) if want != got => {
                self.mirror.metrics.piece("corrupt");
                return Err(FillError::Corrupt(format!(
                    "upstream piece {i} of {} does not match the swarm's digest",
                    self.digest
                )));
            }
            (None, From::Upstream) => self.pieces.set_digest(i, got),
            (None, From::Peer(_)) => return Ok(false),
            _ => {}
        }
        self.mirror.metrics.piece(match from {
            From::Upstream => "upstream",
            From::Peer(_) => "ok",
        });
        let (start, _) = self.pieces.range(i);
        let spool = self.spool.clone();
        let b2 = bytes.clone();
        tokio::task::spawn_blocking(move || spool.write_at(&b2, start))
            .await
            .map_err(|e| FillError::Store(e.to_string()))?
            .map_err(FillError::store)?;
        self.pieces.mark_on_disk(i);
        self.have.set(i);
        self.last_piece = Instant::now();
        let keep = self.waiting.len() < HASH_AHEAD || i == self.prefix;
        self.waiting.insert(i, keep.then_some(bytes));
        self.join_prefix().await?;
        let joined = self.hashed;
        self.fill.pieces_changed();
        self.fill.progress.send_modify(|p| {
            p.received = joined;
            p.written = joined;
        });
        Ok(self.assigned.remove(&i))
    }

    /// Hash the landed pieces that now join the prefix, in order.
    async fn join_prefix(&mut self) -> std::result::Result<(), FillError> {
        while let Some(bytes) = self.waiting.remove(&self.prefix) {
            let bytes = match bytes {
                Some(b) => b,
                None => {
                    let (start, end) = self.pieces.range(self.prefix);
                    self.spool
                        .read_at(start, (end - start) as usize)
                        .await
                        .map_err(FillError::store)?
                }
            };
            self.hasher.update(&bytes);
            self.hashed += bytes.len() as u64;
            self.prefix += 1;
        }
        Ok(())
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

fn peer_fill_error(e: PeerError) -> FillError {
    match e {
        PeerError::NotFound(_) => FillError::NotFound,
        other => FillError::Peer(other.to_string()),
    }
}

/// The first `len` bytes of `body`, or an error if it ends sooner.
async fn take_exactly(
    mut body: std::pin::Pin<
        Box<
            dyn futures::Stream<Item = std::result::Result<Bytes, pier_upstream::UpstreamError>>
                + Send,
        >,
    >,
    len: usize,
    counter: &prometheus_client::metrics::counter::Counter,
) -> std::result::Result<Bytes, FillError> {
    let mut out = BytesMut::with_capacity(len);
    while out.len() < len {
        match body.next().await {
            Some(Ok(c)) => {
                let take = c.len().min(len - out.len());
                counter.inc_by(take as u64);
                out.extend_from_slice(&c[..take]);
            }
            Some(Err(e)) => return Err(upstream_error(e)),
            None => {
                return Err(FillError::Upstream(format!(
                    "body ended after {} of {len} bytes",
                    out.len()
                )))
            }
        }
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
