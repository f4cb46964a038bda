//! Swarms: many nodes fetching one large blob at once, taking pieces from each other instead of
//! each streaming the whole blob from its owner.
//!
//! There is no tracker. The blob's first owner, which every fetcher would ask anyway, is the
//! swarm's coordinator: it fills the blob from its upstream in one stream (or has it stored),
//! hashing each piece as it goes by ([`crate::pieces`]). Every other node that wants the blob
//! reports to the coordinator a few times a second which pieces it holds; the coordinator
//! answers with the piece digests, who holds what, and a few pieces that only it holds for this
//! node to take from it. The holders named are a sample of those of the pieces the asker lacks,
//! with the swarm's count of holders per piece ([`decide::Board::offer`]), so an answer stays
//! small at any swarm size. A fetcher takes pieces (ranged GETs of a few MiB) from several
//! holders at once, rarest first, peers whose own fills are still growing included, and serves
//! what it holds to the others, at most [`decide::UPLOADS`] at once (the peer server turns
//! the rest away and they ask elsewhere). So each piece leaves the coordinator about once and
//! every node's link carries a share of the load.
//!
//! Every piece is checked against its digest before a byte of it is written; a holder that
//! sends a bad piece is not asked again by this fill (and is reported to the coordinator, which
//! stops offering it), while one that fails to send a piece (a timeout, a refused connection)
//! is only benched for [`BENCH`] and then asked again; either way the piece is taken elsewhere. The whole blob is hashed in order as the pieces join up, and it becomes
//! visible only when that digest matches. If the coordinator stops answering, the next owner
//! takes over: fetchers report to it instead, and when it is this node, it takes the pieces no
//! one holds from its upstream, piece by piece. A next owner that was not fetching the blob
//! does the same: the members' first reports to it carry the piece digests they know, and it
//! starts a fill of its own that coordinates from the start ([`Seed`]); those digests are
//! unverified, so when the whole blob does not verify it fills again from its upstream alone.
//!
//! Hosted blobs swarm alike ([`SwarmFor::Hosted`]): the report names the repository, the
//! coordinator answers only if the blob is linked to that repository on it or it fetches it
//! for that repository (lacking it, it starts that fetch from the peers that store it there),
//! and the pieces no member holds come from those peers instead of an upstream.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use pier_cluster::NodeId;
use pier_oci::{Digest, Hasher};
use pier_peer::{Cluster, PeerError, SwarmAnswer, SwarmHolder, SwarmReport};

pub(crate) mod decide;

pub(crate) use decide::Board;
use decide::{Counts, From, Picker, Turn, REPORT_EVERY, REPORT_SOON, STALL};

use crate::fill::{Fill, FillError};
use crate::pieces::{
    Bits, PieceAlgorithm, PieceDigest, PieceHasher, Pieces, PIECE_ALGORITHM, PIECE_SIZE, SWARM_MIN,
};
use crate::sources::upstream_error;
use crate::{BlobSource, Mirror, MirrorError, MirrorRef, Result};

/// Pieces kept in memory until the whole-blob hash reaches them; later ones are read back
/// from the spool.
const HASH_AHEAD: usize = 16;
/// Coordinators' boards nobody has reported to for this long are dropped.
const BOARD_TTL: Duration = Duration::from_secs(60);
/// Stored blobs whose piece digests are kept for swarms.
const STORED_PIECES: usize = 64;

fn digest_strings(d: Vec<Option<PieceDigest>>) -> Vec<Option<String>> {
    d.into_iter().map(|d| d.map(|d| d.to_string())).collect()
}

/// What a swarm fetches a blob for, and so where the pieces no member holds come from.
#[derive(Clone)]
pub enum SwarmFor {
    /// Mirrored content: from the upstream.
    Mirrored(MirrorRef),
    /// Hosted content of `repo`: from `holders`, the peers that store it linked there.
    Hosted { repo: String, holders: Vec<NodeId> },
}

impl SwarmFor {
    /// The report's `upstream` and `repo`: both for mirrored content, the repository alone
    /// for hosted content.
    fn names(&self) -> (Option<String>, Option<String>) {
        match self {
            SwarmFor::Mirrored(r) => (
                Some(r.upstream_name().to_string()),
                Some(r.cache_repo.clone()),
            ),
            SwarmFor::Hosted { repo, .. } => (None, Some(repo.clone())),
        }
    }
}

/// What a member that turned to a new coordinator knows of the blob, from its report: enough
/// for a coordinator that was not fetching the blob to coordinate from the start, taking the
/// members' pieces from them. Its digests are unverified.
#[derive(Clone)]
pub(crate) struct Seed {
    size: u64,
    piece_size: u64,
    digests: Vec<Option<String>>,
}

impl Seed {
    /// The seed a report carries, if it carries a usable one.
    pub(crate) fn of(report: &SwarmReport) -> Option<Seed> {
        let usable = report.size >= SWARM_MIN
            && report.piece_size > 0
            && report.size.div_ceil(report.piece_size) <= u32::MAX as u64
            && report.digests.iter().any(Option::is_some);
        usable.then(|| Seed {
            size: report.size,
            piece_size: report.piece_size,
            digests: report.digests.clone(),
        })
    }

    /// The seed as the first answer of a swarm this node coordinates.
    pub(crate) fn answer(&self) -> SwarmAnswer {
        SwarmAnswer {
            size: self.size,
            swarm: true,
            piece_size: self.piece_size,
            digests_from: 0,
            digests: self.digests.clone(),
            holders: Vec::new(),
            assign: Vec::new(),
            members: 0,
            held_from: 0,
            held: Vec::new(),
        }
    }
}

impl Mirror {
    /// The pieces of `digest` this node can offer a swarm as its coordinator: a fill in
    /// progress, the stored blob, or a fill started now: for mirrored content from the
    /// upstream (taking the members' pieces from them when the report carries a `seed`), for
    /// hosted content from the nodes that store it linked to the report's repository. Hosted
    /// content only when it is linked to that repository here, or this node fetches it for
    /// that repository. `Err(size)` when the blob is too small to swarm.
    async fn coordinator_pieces(
        self: &Arc<Self>,
        digest: &Digest,
        want: Option<&SwarmFor>,
        seed: Option<Seed>,
    ) -> Result<std::result::Result<Arc<Pieces>, u64>> {
        let from_fill = |fill: Arc<Fill>| async move {
            let size = fill.started().await.map_err(MirrorError::Fill)?;
            Ok::<_, MirrorError>(match fill.pieces() {
                Some(p) => Ok(p.clone()),
                None => Err(size.unwrap_or(0)),
            })
        };
        // Hosted content is shared only within its repository: the link is the permission.
        let hosted = match want {
            Some(SwarmFor::Hosted { repo, .. }) => Some(repo.as_str()),
            _ => None,
        };
        let not_here = || Err(MirrorError::Fill(FillError::NotFound));
        if let Some(fill) = self.fill_in_progress(digest) {
            if hosted.is_some_and(|repo| fill.hosted.get().map(String::as_str) != Some(repo)) {
                return not_here();
            }
            return from_fill(fill).await;
        }
        if let Some(size) = self.blobs.stat(digest).await? {
            if let Some(repo) = hosted {
                if self.meta.blob_link(repo, digest).await?.is_none() {
                    return not_here();
                }
            }
            return self.stored_pieces(digest, size).await;
        }
        let source = match (want, seed) {
            // Hosted content this node lacks: fetched for the repository from the nodes that
            // store it linked there, if any does (so the link still is the permission).
            (Some(SwarmFor::Hosted { repo, .. }), _) => {
                self.hosted_fill(repo, digest, None, false).await?
            }
            (Some(SwarmFor::Mirrored(r)), Some(seed)) => {
                self.mirrored_blob(r, digest, false, None, Some(seed))
                    .await?
            }
            (Some(SwarmFor::Mirrored(r)), None) => self.blob_for_peer(r, digest).await?,
            (None, _) => return not_here(),
        };
        match source {
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
        let _hashing = self.hashing_stored.lock().await;
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
        self.remember_pieces(digest, pieces.clone());
        Ok(Ok(pieces))
    }

    /// Keep a stored blob's piece digests (a few blobs' worth) for the swarms this node
    /// coordinates. Only complete ones: every piece written, every digest known.
    pub(crate) fn remember_pieces(&self, digest: &Digest, pieces: Arc<Pieces>) {
        if pieces.size() < SWARM_MIN
            || pieces.digests_known() != pieces.count()
            || !pieces.have().all()
        {
            return;
        }
        let mut stored = self.lock_stored();
        if stored.len() >= STORED_PIECES && !stored.contains_key(digest) {
            if let Some(k) = stored.keys().next().cloned() {
                stored.remove(&k);
            }
        }
        stored.insert(digest.clone(), pieces);
    }

    fn lock_stored(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<Pieces>>> {
        self.stored_pieces.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_boards(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Board>> {
        self.boards.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answer a swarm member's report, as the coordinator of `digest`'s swarm. For mirrored
    /// content, a node that lacks the blob starts filling it from that upstream first; for
    /// hosted content it answers not found unless the blob is the report's repository's here
    /// or a peer stores it there.
    pub async fn swarm_answer(
        self: &Arc<Self>,
        digest: &Digest,
        from: &str,
        report: &SwarmReport,
        want: Option<&SwarmFor>,
    ) -> Result<SwarmAnswer> {
        let seed = Seed::of(report);
        let pieces = match self.coordinator_pieces(digest, want, seed).await? {
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
                    members: 0,
                    held_from: 0,
                    held: Vec::new(),
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
        boards.retain(|_, b| now.saturating_duration_since(b.touched) < BOARD_TTL);
        let board = boards
            .entry(digest.clone())
            .or_insert_with(|| Board::new(now));
        let assign = board.report(from, have, &report.bad, &me, &own, now);
        let offer = board.offer(from, &me, &own);
        drop(boards);
        let holders = offer
            .holders
            .iter()
            .map(|(n, h)| SwarmHolder {
                node: n.clone(),
                have: h.to_hex(),
            })
            .collect();
        let known = report.known.min(count);
        let mut digests = pieces.digests_from(known);
        let seeded = self.fill_in_progress(digest).is_some_and(|f| {
            f.seeded.get().is_some() && f.pieces().is_some_and(|p| Arc::ptr_eq(p, &pieces))
        });
        if seeded {
            // A member's unverified word is not passed on: a lie would then spread to
            // members that could never verify the pieces it names.
            for (k, d) in digests.iter_mut().enumerate() {
                if !own.get(known + k as u32) {
                    *d = None;
                }
            }
        }
        Ok(SwarmAnswer {
            size: pieces.size(),
            swarm: true,
            piece_size: pieces.piece_size(),
            digests_from: known,
            digests: digest_strings(digests),
            holders,
            assign,
            members: offer.counts.members,
            held_from: offer.counts.from,
            held: offer.counts.held,
        })
    }

    /// Members of the swarm this node coordinates for `digest` and what they hold.
    fn board_holders(&self, digest: &Digest, count: u32) -> HashMap<String, Bits> {
        let boards = self.lock_boards();
        match boards.get(digest) {
            Some(board) => board.holders(count, Instant::now()),
            None => HashMap::new(),
        }
    }

    /// Ask the blob's coordinator whether this fill should swarm. `Some` with the coordinator
    /// and its first answer when the blob is large enough; `None` to fetch it directly (this
    /// node coordinates, the blob is small, or no coordinator answers).
    pub(crate) async fn join_swarm(
        &self,
        cluster: &Cluster,
        want: &SwarmFor,
        digest: &Digest,
    ) -> Option<(NodeId, SwarmAnswer)> {
        let me = cluster.local().name;
        let (upstream, repo) = want.names();
        let report = SwarmReport {
            upstream,
            repo,
            ..SwarmReport::default()
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
    /// With `coordinate`, this node coordinates the swarm from the start (a takeover: `coord`
    /// is this node and `first` the members' [`Seed`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn run_swarm(
        &self,
        digest: &Digest,
        fill: &Arc<Fill>,
        link_repo: &str,
        want: &SwarmFor,
        cluster: &Cluster,
        (coord, first): (NodeId, SwarmAnswer),
        coordinate: bool,
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
            want,
            cluster,
            key: digest.to_string(),
            pieces: pieces.clone(),
            spool: spool.clone(),
            picker: Picker::new(
                &cluster.local().name,
                &coord.name,
                pieces.count(),
                Instant::now(),
            ),
            coord,
            prefix: 0,
            hashed: 0,
            hasher: Hasher::new(digest.algorithm()),
            waiting: BTreeMap::new(),
            tasks: FuturesUnordered::new(),
            seed_next: false,
        };
        run.absorb(first);
        if coordinate {
            let _ = fill.seeded.set(());
            tracing::info!(%digest, "coordinating the swarm from the members' pieces");
            run.picker.turn(Some(&cluster.local().name));
        }
        let outcome = run.drive().await;
        let last = run.last_report();
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
                // Told that this node holds the whole blob, the coordinator keeps offering it
                // (the pieces come from its store now) after it stops reporting. In the
                // background: a slow coordinator must not hold up the pull that is done.
                if let Some((coord, report)) = last {
                    let client = cluster.client().clone();
                    let digest = digest.clone();
                    tokio::spawn(async move {
                        if let Err(e) = client.swarm(&coord, &digest, &report, false).await {
                            tracing::debug!(%digest, coordinator = %coord.name, error = %e, "last swarm report failed");
                        }
                    });
                }
                Ok(())
            }
            Err(e) => {
                spool.discard();
                Err(e)
            }
        }
    }
}

/// A piece fetch's end: the piece, where from, and its bytes with their digest (computed in
/// the fetch's own task, in the algorithm the coordinator's digest named when it started).
type PieceResult = (
    u32,
    From,
    std::result::Result<(Bytes, PieceDigest), FillError>,
);

/// A report's round trip to the coordinator, run beside the piece fetches.
type ReportResult = std::result::Result<SwarmAnswer, PeerError>;

/// One swarm fill's state on the fetching node: its I/O; the choices are its [`Picker`]'s.
struct SwarmRun<'a> {
    mirror: &'a Mirror,
    digest: &'a Digest,
    fill: &'a Arc<Fill>,
    want: &'a SwarmFor,
    cluster: &'a Cluster,
    key: String,
    pieces: Arc<Pieces>,
    spool: pier_store::Spool,
    coord: NodeId,
    picker: Picker,
    /// Pieces joined up from the first, and the bytes of them hashed into the whole digest.
    prefix: u32,
    hashed: u64,
    hasher: Hasher,
    /// Pieces landed past the prefix, with their bytes while few enough are waiting.
    waiting: BTreeMap<u32, Option<Bytes>>,
    tasks: FuturesUnordered<BoxFuture<'static, PieceResult>>,
    /// The coordinator changed and has not answered yet: reports carry the [`Seed`].
    seed_next: bool,
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
        let holders = a
            .holders
            .into_iter()
            .filter_map(|h| Some((h.node.clone(), Bits::from_hex(count, &h.have)?)));
        // An older coordinator names every member and sends no counts.
        let counts = (a.members > 0).then_some(Counts {
            members: a.members,
            from: a.held_from,
            held: a.held,
        });
        self.picker.absorb(holders, a.assign, counts);
    }

    async fn drive(&mut self) -> std::result::Result<(), FillError> {
        let mut next_report = Instant::now() + REPORT_EVERY;
        // The report in flight: its round trip (the coordinator's queue and links) runs beside
        // the loop, which goes on landing and starting pieces meanwhile.
        let mut reporting: Option<BoxFuture<'static, ReportResult>> = None;
        // A piece landed since the report in flight was sent: report again soon.
        let mut soon = false;
        while !self.picker.done() {
            if self.picker.coordinating() {
                let holders = self.mirror.board_holders(self.digest, self.pieces.count());
                self.picker.set_holders(holders);
            }
            self.schedule();
            if self.picker.stalled(Instant::now()) {
                return Err(FillError::Peer(format!(
                    "the swarm for {} delivered no piece for {} s",
                    self.digest,
                    STALL.as_secs()
                )));
            }
            let wait = next_report.saturating_duration_since(Instant::now());
            let in_flight = reporting.is_some();
            tokio::select! {
                Some((i, from, result)) = self.tasks.next(), if !self.tasks.is_empty() => {
                    if self.landed(i, from, result).await? {
                        next_report = next_report.min(Instant::now() + REPORT_SOON);
                        soon |= in_flight;
                    }
                }
                answer = async { reporting.as_mut().expect("a report in flight").await }, if in_flight => {
                    reporting = None;
                    self.answered(answer);
                    next_report = Instant::now() + if soon { REPORT_SOON } else { REPORT_EVERY };
                    soon = false;
                }
                () = tokio::time::sleep(wait), if !in_flight => {
                    reporting = self.report();
                    if reporting.is_none() {
                        next_report = Instant::now() + REPORT_EVERY;
                    }
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

    /// What this node holds, as it tells the coordinator (no seed).
    fn holding(&self) -> SwarmReport {
        let (upstream, repo) = self.want.names();
        SwarmReport {
            have: self.pieces.have().to_hex(),
            known: self.pieces.digests_known(),
            upstream,
            repo,
            bad: self.picker.bad(),
            ..SwarmReport::default()
        }
    }

    /// The report that tells the coordinator this node holds the whole blob, and to whom.
    fn last_report(&self) -> Option<(NodeId, SwarmReport)> {
        (!self.picker.coordinating()).then(|| (self.coord.clone(), self.holding()))
    }

    /// Tell the coordinator what this node holds: the round trip, for [`SwarmRun::answered`]
    /// (none when this node coordinates).
    fn report(&mut self) -> Option<BoxFuture<'static, ReportResult>> {
        if self.picker.coordinating() {
            return None;
        }
        let mut report = self.holding();
        if self.seed_next {
            report.size = self.pieces.size();
            report.piece_size = self.pieces.piece_size();
            let mut digests = self.pieces.digests_from(0);
            if self.mirror.policy.fault_lying_seed {
                for d in digests.iter_mut().flatten() {
                    *d = PieceDigest::compute(d.algorithm(), d.to_string().as_bytes());
                }
            }
            report.digests = digest_strings(digests);
        }
        let first = self.picker.failed_reports();
        let (client, coord, digest) = (
            self.cluster.client().clone(),
            self.coord.clone(),
            self.digest.clone(),
        );
        Some(async move { client.swarm(&coord, &digest, &report, first).await }.boxed())
    }

    /// Take in a report's answer; after too many failures in a row, turn to the next owner
    /// (or take over, when that is this node).
    fn answered(&mut self, answer: ReportResult) {
        match answer {
            Ok(a) if a.swarm && a.size == self.pieces.size() => {
                self.seed_next = false;
                self.absorb(a)
            }
            Ok(_) => {
                tracing::warn!(digest = %self.digest, coordinator = %self.coord.name, "coordinator answered for a different blob size; ignoring it");
                self.picker.report_failed();
            }
            Err(e) => {
                tracing::debug!(digest = %self.digest, coordinator = %self.coord.name, error = %e, "swarm report failed");
                self.picker.report_failed();
            }
        }
        let gone = self.cluster.member(&self.coord.name).is_none();
        if self.picker.give_up_coordinator(gone) {
            let next = self
                .cluster
                .owners(self.key.as_bytes())
                .into_iter()
                .chain(self.cluster.candidates(self.key.as_bytes()))
                .find(|n| !self.picker.failed_coordinator(&n.name));
            let previous = self.coord.name.clone();
            match self.picker.turn(next.as_ref().map(|n| n.name.as_str())) {
                Some(Turn::Coordinate) => {
                    tracing::info!(digest = %self.digest, %previous, "coordinating the swarm now");
                }
                Some(Turn::To(name)) => {
                    tracing::info!(digest = %self.digest, %previous, next = %name, "swarm coordinator changed");
                    if let Some(n) = next {
                        self.coord = n;
                    }
                    self.seed_next = true;
                }
                None => {}
            }
        }
    }

    /// Start the fetches the picker chooses.
    fn schedule(&mut self) {
        let (mirror, digest, want, cluster) = (self.mirror, self.digest, self.want, self.cluster);
        let pieces = &self.pieces;
        let tasks = &mut self.tasks;
        let known = |i: u32| pieces.digest(i).is_some();
        self.picker
            .schedule(Instant::now(), &known, &mut |i, from| match fetch(
                mirror, digest, want, cluster, pieces, i, from,
            ) {
                Some(f) => {
                    tasks.push(f);
                    true
                }
                None => false,
            });
    }

    /// A piece fetch ended. `Ok(true)` when it landed a piece: the coordinator should hear of
    /// it soon, so that the others can take it from this node.
    async fn landed(
        &mut self,
        i: u32,
        from: From,
        result: std::result::Result<(Bytes, PieceDigest), FillError>,
    ) -> std::result::Result<bool, FillError> {
        self.picker.ended(i, &from);
        let (bytes, got) = match result {
            Ok(b) => b,
            Err(e) => {
                self.mirror
                    .metrics
                    .piece(if matches!(e, FillError::TooManyRequests) {
                        "busy"
                    } else {
                        "failed"
                    });
                match &from {
                    From::Peer(n) => {
                        // A holder already sending all it will at once (pier_server's piece
                        // bound) says so; it still holds what it held. An older node answers
                        // "not here" alone.
                        let not_found = matches!(e, FillError::NotFound);
                        if matches!(e, FillError::TooManyRequests) {
                            tracing::debug!(digest = %self.digest, piece = i, peer = %n, "holder is busy; asking other holders");
                            self.picker.peer_busy(n, Instant::now());
                        } else {
                            if not_found {
                                tracing::debug!(digest = %self.digest, piece = i, peer = %n, "holder turned the piece request away; asking other holders");
                            } else {
                                tracing::info!(digest = %self.digest, piece = i, peer = %n, error = %e, "piece fetch failed; asking other holders");
                            }
                            self.picker.peer_failed(n, not_found, Instant::now());
                        }
                    }
                    From::Upstream => {
                        tracing::warn!(digest = %self.digest, piece = i, error = %e, "upstream piece fetch failed");
                        // A takeover gives up at once (its fill then starts again from the
                        // upstream alone): a seed with a wrong size would otherwise ask the
                        // upstream for ranges it does not have until the fill stalls.
                        let seeded = self.fill.seeded.get().is_some();
                        if seeded || matches!(e, FillError::NotFound | FillError::Denied(_)) {
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
        // The digest became known, in another algorithm, while the piece was coming.
        let got = if got.algorithm() == algorithm {
            got
        } else {
            PieceDigest::compute(algorithm, &bytes)
        };
        match (want, &from) {
            (Some(want), From::Peer(n)) if want != got => {
                self.mirror.metrics.piece("corrupt");
                tracing::warn!(digest = %self.digest, piece = i, peer = %n, "piece failed its digest; that peer is not asked again by this fill");
                self.picker.corrupt(n);
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
        self.picker.landed(i, Instant::now());
        let keep = self.waiting.len() < HASH_AHEAD || i == self.prefix;
        self.waiting.insert(i, keep.then_some(bytes));
        self.join_prefix().await?;
        let joined = self.hashed;
        self.fill.pieces_changed();
        self.fill.progress.send_modify(|p| {
            p.received = joined;
            p.written = joined;
        });
        Ok(true)
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

/// The fetch of piece `i` from `from`; `None` when `from` is a peer that is not a member just
/// now (left, or not yet seen again). From the "upstream" of hosted content means from the
/// first of the peers storing it linked to its repository that sends the range.
fn fetch(
    mirror: &Mirror,
    digest: &Digest,
    want: &SwarmFor,
    cluster: &Cluster,
    pieces: &Pieces,
    i: u32,
    from: &From,
) -> Option<BoxFuture<'static, PieceResult>> {
    let (start, end) = pieces.range(i);
    let digest = digest.clone();
    let algorithm = pieces.digest(i).map_or(PIECE_ALGORITHM, |d| d.algorithm());
    let fut: BoxFuture<'static, (u32, From, std::result::Result<Bytes, FillError>)> = match from {
        From::Peer(name) => {
            let node = cluster.member(name)?;
            let client = cluster.client().clone();
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
        From::Upstream => match want {
            SwarmFor::Mirrored(r) => {
                let upstream = r.upstream.clone();
                let repo = r.repo.clone();
                let limit = mirror.upstream_limit.clone();
                let counter = mirror.metrics.upstream_bytes_counter(r.upstream_name());
                async move {
                    let r = async {
                        let body = upstream
                            .client
                            .get_blob_range(&repo, &digest, start, end)
                            .await
                            .map_err(upstream_error)?;
                        let body = pier_peer::rate::limited(body, limit)
                            .map(|c| c.map_err(upstream_error));
                        take_exactly(body, (end - start) as usize, Some(&counter)).await
                    }
                    .await;
                    (i, From::Upstream, r)
                }
                .boxed()
            }
            SwarmFor::Hosted { repo, holders } => {
                let (repo, holders) = (repo.clone(), holders.clone());
                let client = cluster.client().clone();
                async move {
                    let mut result = Err(FillError::NotFound);
                    for node in &holders {
                        let got = async {
                            let answer = client
                                .get_blob(node, &digest, start, Some(&repo), None)
                                .await
                                .map_err(peer_fill_error)?;
                            let body = answer.body.map(|c| c.map_err(peer_fill_error));
                            take_exactly(body, (end - start) as usize, None).await
                        }
                        .await;
                        match got {
                            Ok(b) => {
                                result = Ok(b);
                                break;
                            }
                            // A holder's failure is worth reporting over another's "not here".
                            Err(e) if result.is_err() && e != FillError::NotFound => {
                                result = Err(e)
                            }
                            Err(_) => {}
                        }
                    }
                    (i, From::Upstream, result)
                }
                .boxed()
            }
        },
    };
    Some(spawned(i, from.clone(), fut, algorithm))
}

/// Run a piece fetch in its own task (aborted when the fill drops it), its digest computed
/// there: its bytes keep coming while the fill's loop writes, hashes or waits on a report, and
/// the digests of pieces that land together are computed on every core.
fn spawned(
    i: u32,
    from: From,
    fut: BoxFuture<'static, (u32, From, std::result::Result<Bytes, FillError>)>,
    algorithm: PieceAlgorithm,
) -> BoxFuture<'static, PieceResult> {
    let task = tokio::spawn(fut.map(move |(i, f, r)| {
        let r = r.map(|b| {
            let d = PieceDigest::compute(algorithm, &b);
            (b, d)
        });
        (i, f, r)
    }));
    let abort = AbortOnDrop(task.abort_handle());
    async move {
        let _abort = abort;
        task.await.unwrap_or_else(|e| {
            (
                i,
                from,
                Err(FillError::Peer(format!("piece {i} fetch task ended: {e}"))),
            )
        })
    }
    .boxed()
}

/// Aborts a task when dropped: a fill that ends (or gives up) stops its piece fetches.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn peer_fill_error(e: PeerError) -> FillError {
    match e {
        PeerError::NotFound(_) => FillError::NotFound,
        // A holder at its bound of pieces sent at once ([`decide::UPLOADS`]).
        PeerError::Busy(_) => FillError::TooManyRequests,
        other => FillError::Peer(other.to_string()),
    }
}

/// The first `len` bytes of `body` (counted on `counter`), or an error if it ends sooner.
async fn take_exactly(
    body: impl futures::Stream<Item = std::result::Result<Bytes, FillError>>,
    len: usize,
    counter: Option<&prometheus_client::metrics::counter::Counter>,
) -> std::result::Result<Bytes, FillError> {
    let mut body = std::pin::pin!(body);
    let mut out = BytesMut::with_capacity(len);
    while out.len() < len {
        match body.next().await {
            Some(Ok(c)) => {
                let take = c.len().min(len - out.len());
                if let Some(counter) = counter {
                    counter.inc_by(take as u64);
                }
                out.extend_from_slice(&c[..take]);
            }
            Some(Err(e)) => return Err(e),
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

    fn report(size: u64, piece_size: u64, digests: Vec<Option<String>>) -> SwarmReport {
        SwarmReport {
            size,
            piece_size,
            digests,
            ..SwarmReport::default()
        }
    }

    #[test]
    fn only_a_usable_seed_starts_a_takeover() {
        let d = || Some(format!("blake3:{}", "0".repeat(64)));
        let usable = report(SWARM_MIN, PIECE_SIZE, vec![d(), None]);
        let seed = Seed::of(&usable).expect("a usable seed");
        let first = seed.answer();
        assert!(first.swarm);
        assert_eq!((first.size, first.piece_size), (SWARM_MIN, PIECE_SIZE));
        assert_eq!((first.digests_from, first.digests.len()), (0, 2));
        for (why, r) in [
            ("no seed at all", SwarmReport::default()),
            (
                "too small to swarm",
                report(SWARM_MIN - 1, PIECE_SIZE, vec![d()]),
            ),
            ("no piece size", report(SWARM_MIN, 0, vec![d()])),
            (
                "no digest known",
                report(SWARM_MIN, PIECE_SIZE, vec![None, None]),
            ),
            (
                "more pieces than a bitmap counts",
                report(u64::MAX, 1, vec![d()]),
            ),
        ] {
            assert!(Seed::of(&r).is_none(), "{why}");
        }
    }
}
