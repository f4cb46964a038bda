//! The swarm's protocol measured apart from the cores: a deterministic simulation that drives
//! the production decisions (the coordinator's [`Board`], each fetcher's [`Picker`], with the
//! production constants) over a simulated network, with a virtual clock and no sockets.
//!
//! The link model: every node has an uplink and a downlink of [`SwarmSimConfig::link`] bytes
//! per second; the upstream is one more uplink, of [`SwarmSimConfig::upstream`], that the
//! coordinators' fills share. A transfer runs at the smaller of its two shares: its sender's
//! uplink divided evenly among the transfers on it, and its receiver's downlink likewise
//! (rates are recomputed whenever a transfer starts or ends on either link; capacity one side
//! leaves unused is not handed to the other transfers, so the model errs slow). A piece
//! request reaches its sender one [`SwarmSimConfig::latency`] after it is made. Reports and
//! answers are transfers too: a report (its JSON body as the peer client sends it, plus
//! [`REPORT_OVERHEAD`]) starts one latency after it is sent and crosses the fetcher's uplink and
//! the coordinator's downlink; the coordinator's board takes it in when it has arrived, and the
//! answer (the JSON the coordinator would send, digests included) crosses the coordinator's
//! uplink and the fetcher's downlink, sharing them with the pieces. The coordinator of
//! each layer fills it from the upstream in one in-order stream, as a real one does, and
//! offers each piece once it is in. What the simulation leaves out: CPU (hashing, the spool),
//! TCP's ramp-up, and the fetcher's loop being blocked while a report is out (here pieces keep
//! landing meanwhile).
//!
//! Faults: one fetcher killed part-way (a request to it fails at once, a transfer from it
//! fails when it dies, and the membership stops listing it [`SwarmSimConfig::detect`] later),
//! and one peer that sends a wrong byte in every piece it serves (the fetcher's digest check
//! catches it; the simulation hands the picker what the check would).
//!
//! The example `swarm_sim` prints the table for 8, 100 and 1,000 nodes; the unit tests run it
//! small and assert what a user would notice.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use pier_peer::{SwarmAnswer, SwarmHolder, SwarmReport};

use crate::pieces::{Bits, PIECE_SIZE};
use crate::swarm::decide::{Board, Counts, From, Picker, REPORT_EVERY, REPORT_SOON, UPLOADS};

/// What to simulate. [`SwarmSimConfig::new`] gives the defaults the table is made with.
#[derive(Debug, Clone)]
pub struct SwarmSimConfig {
    pub nodes: usize,
    /// Blobs fetched at once, each with its own swarm and coordinator.
    pub layers: usize,
    pub layer_size: u64,
    /// Each node's upload and (separately) download rate, bytes per second.
    pub link: f64,
    /// The upstream's rate, bytes per second, shared by the coordinators' fills.
    pub upstream: f64,
    /// From a request to its first byte at the sender, and from a report to its answer.
    pub latency: Duration,
    /// Kill one fetcher once this fraction of size/link has passed.
    pub kill_at: Option<f64>,
    /// One fetcher serves corrupt pieces.
    pub corrupt_peer: bool,
    /// How long after a node dies the membership stops listing it.
    pub detect: Duration,
    /// The fetchers start evenly over this window.
    pub join_over: Duration,
    /// Simulated time after which the run stops and the unfinished are counted.
    pub limit: Duration,
    pub seed: u64,
}

impl SwarmSimConfig {
    /// `nodes` nodes fetching `layers` blobs of 256 MiB at once over 1 Gbit/s links.
    pub fn new(nodes: usize, layers: usize) -> SwarmSimConfig {
        SwarmSimConfig {
            nodes,
            layers,
            layer_size: 256 * 1024 * 1024,
            link: 125_000_000.0,
            upstream: 125_000_000.0,
            latency: Duration::from_millis(1),
            kill_at: None,
            corrupt_peer: false,
            detect: Duration::from_secs(2),
            join_over: Duration::from_millis(20),
            limit: Duration::from_secs(600),
            seed: 1,
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct SwarmSimReport {
    pub nodes: usize,
    pub layers: usize,
    pub fault: &'static str,
    /// What every node downloads, over its link: the best any node can do.
    pub ideal: Duration,
    /// Per-node completion over `ideal` (the killed node left out), nearest rank.
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    /// Live nodes that did not end with every layer (gave up, or ran past the limit).
    pub incomplete: usize,
    /// Bytes taken from the upstream, over the bytes of the layers.
    pub upstream: f64,
    /// Pieces each layer's coordinator sent to fetchers, over the pieces of the layers.
    pub coordinator_pieces: f64,
    /// Corrupt pieces fetchers received (and threw away).
    pub corrupt_received: u64,
    /// Piece requests that failed (a dead sender).
    pub failed: u64,
    /// Piece requests a holder turned away, having [`UPLOADS`] transfers already, per piece
    /// landed.
    pub refused: f64,
    /// Bytes of the coordinators' answers (holders and digests, as the wire has them), over
    /// the bytes of the layers.
    pub answers: f64,
    /// Bytes of one answer, on average.
    pub answer_bytes: f64,
    /// The share of a layer an in-order reader (a client's GET) gets only in the last tenth
    /// of `ideal` before its fill ends, on average over the fills: what arrives out of order
    /// waits for the pieces before it, and a client then reads and hashes it all at once.
    pub late: f64,
    /// Simulated time from the first join until the last node was done.
    pub wall: Duration,
    /// Real time the run took.
    pub real: Duration,
}

impl SwarmSimReport {
    /// The table's header, for rows printed with `{}`.
    pub fn header() -> String {
        format!(
            "{:>6} {:>6} {:<8} {:>6} {:>6} {:>6} {:>5} {:>9} {:>11} {:>8} {:>7} {:>7} {:>8} {:>5} {:>8} {:>7}",
            "nodes",
            "layers",
            "fault",
            "p50",
            "p99",
            "max",
            "unfin",
            "upstream",
            "coord/piece",
            "corrupt",
            "failed",
            "refused",
            "answers",
            "late",
            "wall s",
            "real s"
        )
    }
}

impl fmt::Display for SwarmSimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>6} {:>6} {:<8} {:>5.2}x {:>5.2}x {:>5.2}x {:>5} {:>8.2}x {:>10.2}x {:>8} {:>7} {:>7.2} {:>7.2}x {:>4.0}% {:>8.2} {:>7.1}",
            self.nodes,
            self.layers,
            self.fault,
            self.p50,
            self.p99,
            self.max,
            self.incomplete,
            self.upstream,
            self.coordinator_pieces,
            self.corrupt_received,
            self.failed,
            self.refused,
            self.answers,
            100.0 * self.late,
            self.wall.as_secs_f64(),
            self.real.as_secs_f64()
        )
    }
}

/// Bytes of a report's request line, host, signature and other headers besides its JSON body
/// (a signed POST of the peer client), and of an answer's status line and headers.
const REPORT_OVERHEAD: u64 = 300;
const ANSWER_OVERHEAD: u64 = 150;

/// Nanoseconds of simulated time.
type Time = u64;

const NEVER: Time = Time::MAX;

fn ns(d: Duration) -> Time {
    d.as_nanos() as Time
}

/// A small seeded generator (SplitMix64): the run depends on the seed alone.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A coordinator's fill from the upstream.
    Fill,
    /// A piece from a peer.
    Peer,
    /// A piece a coordinator that took over takes from the upstream.
    Upstream,
    /// A fetcher's report on its way to the coordinator.
    Report,
    /// The coordinator's answer on its way back.
    Answer,
}

/// What a report or an answer carries until it has crossed its links.
enum Message {
    Report {
        have: Bits,
        bad: Vec<String>,
        known: u32,
    },
    Answer {
        holders: Vec<(String, Bits)>,
        counts: Counts,
        assign: Vec<u32>,
        /// The digests the answer carries: `digests_from..known`.
        digests_from: u32,
        known: u32,
    },
}

struct Flow {
    kind: Kind,
    /// A node, or `nodes` for the upstream.
    sender: usize,
    receiver: usize,
    layer: usize,
    piece: u32,
    remaining: f64,
    rate: f64,
    at: Time,
    /// When its pending check is due.
    due: Time,
    /// The report or answer it carries.
    message: Option<Message>,
}

enum Ev {
    /// A fetcher's report is due: it is sent.
    Report {
        node: usize,
        layer: usize,
    },
    /// A request reached its sender: the transfer starts.
    Start {
        flow: usize,
    },
    /// A transfer may have ended.
    Check {
        flow: usize,
    },
    Kill {
        node: usize,
    },
    /// A holder's "not here" to a request it had no room for reached the fetcher.
    Refused {
        flow: usize,
    },
}

/// One node's fill of one layer.
struct Fetch {
    picker: Picker,
    /// Pieces whose digests the coordinator has sent (its fill's prefix).
    known: u32,
    /// When the report that counts is due; `NEVER` while one is out.
    next_report: Time,
    done_at: Option<Time>,
    gave_up: bool,
    /// When each piece joined the prefix an in-order reader can read (in piece order).
    readable_at: Vec<Time>,
    /// A piece landed while the report was out: the next is due soon after its answer.
    landed_since_report: bool,
}

struct Layer {
    coord: usize,
    board: Board,
    own: Bits,
    next_fill: u32,
    done_at: Option<Time>,
    coord_sent: u64,
}

struct Sim {
    cfg: SwarmSimConfig,
    t0: Instant,
    now: Time,
    seq: u64,
    events: BTreeMap<(Time, u64), Ev>,
    names: Vec<String>,
    dead_at: Vec<Option<Time>>,
    corrupt: Option<usize>,
    fetches: Vec<Vec<Option<Fetch>>>,
    layers: Vec<Layer>,
    flows: Vec<Option<Flow>>,
    /// Flows on each uplink (the upstream's last) and each downlink.
    up: Vec<Vec<usize>>,
    down: Vec<Vec<usize>>,
    pieces: u32,
    upstream_bytes: u64,
    corrupt_received: u64,
    failed: u64,
    answer_bytes: u64,
    answer_count: u64,
    report_bytes: u64,
    refused: u64,
    /// Pieces fetchers landed from peers and the upstream.
    landed: u64,
}

/// Play one scenario from the first join until every live node holds every layer.
pub fn run(cfg: &SwarmSimConfig) -> SwarmSimReport {
    let real = Instant::now();
    let mut sim = Sim::new(cfg.clone());
    sim.play();
    sim.measure(real.elapsed())
}

impl Sim {
    fn new(cfg: SwarmSimConfig) -> Sim {
        let t0 = Instant::now();
        let n = cfg.nodes.max(2);
        let pieces = cfg.layer_size.div_ceil(PIECE_SIZE) as u32;
        let names: Vec<String> = (0..n).map(|i| format!("node-{i:04}")).collect();
        let mut rng = Rng(cfg.seed);
        let layers: Vec<Layer> = (0..cfg.layers.max(1))
            .map(|l| Layer {
                coord: l * n / cfg.layers.max(1),
                board: Board::new(t0),
                own: Bits::new(pieces),
                next_fill: 0,
                done_at: None,
                coord_sent: 0,
            })
            .collect();
        let coords: Vec<usize> = layers.iter().map(|l| l.coord).collect();
        let fetchers: Vec<usize> = (0..n).filter(|i| !coords.contains(i)).collect();
        let pick_fetcher = |rng: &mut Rng, not: Option<usize>| {
            let choices: Vec<usize> = fetchers
                .iter()
                .copied()
                .filter(|f| Some(*f) != not)
                .collect();
            (!choices.is_empty()).then(|| choices[rng.below(choices.len() as u64) as usize])
        };
        let killed = cfg.kill_at.and_then(|_| pick_fetcher(&mut rng, None));
        let corrupt = cfg
            .corrupt_peer
            .then(|| pick_fetcher(&mut rng, killed))
            .flatten();
        let fetches = (0..n)
            .map(|i| {
                layers
                    .iter()
                    .map(|l| {
                        (l.coord != i).then(|| Fetch {
                            picker: Picker::new(&names[i], &names[l.coord], pieces, t0),
                            known: 0,
                            next_report: NEVER,
                            done_at: None,
                            gave_up: false,
                            readable_at: Vec::new(),
                            landed_since_report: false,
                        })
                    })
                    .collect()
            })
            .collect();
        let mut sim = Sim {
            t0,
            now: 0,
            seq: 0,
            events: BTreeMap::new(),
            dead_at: vec![None; n],
            corrupt,
            fetches,
            layers,
            flows: Vec::new(),
            up: vec![Vec::new(); n + 1],
            down: vec![Vec::new(); n],
            pieces,
            upstream_bytes: 0,
            corrupt_received: 0,
            failed: 0,
            answer_bytes: 0,
            answer_count: 0,
            report_bytes: 0,
            refused: 0,
            landed: 0,
            names,
            cfg,
        };
        for l in 0..sim.layers.len() {
            sim.next_fill(l);
        }
        let window = ns(sim.cfg.join_over).max(1);
        for node in 0..n {
            for layer in 0..sim.layers.len() {
                if sim.fetches[node][layer].is_some() {
                    let at = rng.below(window);
                    if let Some(f) = sim.fetches[node][layer].as_mut() {
                        f.next_report = at;
                    }
                    sim.push(at, Ev::Report { node, layer });
                }
            }
        }
        if let (Some(node), Some(frac)) = (killed, sim.cfg.kill_at) {
            let at = (sim.ideal().as_nanos() as f64 * frac) as Time;
            sim.push(at, Ev::Kill { node });
        }
        sim
    }

    fn ideal(&self) -> Duration {
        Duration::from_secs_f64(
            (self.cfg.layer_size * self.layers.len() as u64) as f64 / self.cfg.link,
        )
    }

    fn instant(&self) -> Instant {
        self.t0 + Duration::from_nanos(self.now)
    }

    fn push(&mut self, at: Time, ev: Ev) {
        self.seq += 1;
        self.events.insert((at, self.seq), ev);
    }

    fn play(&mut self) {
        let limit = ns(self.cfg.limit);
        while let Some(((at, _), ev)) = self.events.pop_first() {
            if at > limit || self.finished() {
                break;
            }
            self.now = at;
            match ev {
                Ev::Report { node, layer } => self.send_report(node, layer),
                Ev::Start { flow } => self.start(flow),
                Ev::Check { flow } => self.check(flow),
                Ev::Kill { node } => self.kill(node),
                Ev::Refused { flow } => self.refuse(flow),
            }
        }
    }

    fn finished(&self) -> bool {
        self.layers.iter().all(|l| l.done_at.is_some())
            && self.fetches.iter().enumerate().all(|(n, fs)| {
                self.dead_at[n].is_some()
                    || fs
                        .iter()
                        .flatten()
                        .all(|f| f.done_at.is_some() || f.gave_up)
            })
    }

    fn live_fetch(&mut self, node: usize, layer: usize) -> Option<&mut Fetch> {
        if self.dead_at[node].is_some() {
            return None;
        }
        self.fetches[node][layer]
            .as_mut()
            .filter(|f| f.done_at.is_none() && !f.gave_up)
    }

    /// A fetcher sends its report: it crosses the fetcher's uplink and the coordinator's
    /// downlink like any transfer, and the coordinator takes it in once it has arrived.
    fn send_report(&mut self, node: usize, layer: usize) {
        let now = self.now;
        if self.dead_at[node].is_some() {
            return;
        }
        let Some(f) = self.fetches[node][layer].as_mut() else {
            return;
        };
        // The report that counts, or the last one, which tells the coordinator this node
        // holds the whole blob now.
        let last = f.done_at == Some(now);
        if !last && (f.next_report != now || f.done_at.is_some() || f.gave_up)
            || f.picker.coordinating()
        {
            return;
        }
        f.next_report = NEVER;
        let message = Message::Report {
            have: f.picker.have().clone(),
            bad: f.picker.bad(),
            known: f.known,
        };
        let coord = self.layers[layer].coord;
        let bytes = self.wire_bytes(&message);
        self.report_bytes += bytes;
        let id = self.new_message(node, coord, layer, bytes, message);
        self.push(now + ns(self.cfg.latency), Ev::Start { flow: id });
    }

    /// The coordinator of `layer` takes in `node`'s report and sends its answer back.
    fn report(&mut self, node: usize, layer: usize, have: Bits, bad: &[String], already: u32) {
        let at = self.instant();
        if self.dead_at[node].is_some() {
            return;
        }
        let name = &self.names[node];
        let l = &mut self.layers[layer];
        let coord = &self.names[l.coord];
        let assign = l.board.report(name, have, bad, coord, &l.own, at);
        let offer = l.board.offer(name, coord, &l.own);
        let message = Message::Answer {
            holders: offer.holders,
            counts: offer.counts,
            assign,
            digests_from: already,
            known: l.own.count().max(already),
        };
        let bytes = self.wire_bytes(&message);
        self.answer_bytes += bytes;
        self.answer_count += 1;
        let coord = self.layers[layer].coord;
        let id = self.new_message(coord, node, layer, bytes, message);
        self.start(id);
    }

    /// Bytes a report or an answer takes on the wire: its JSON body as the peer client sends
    /// it (the answer's new piece digests included) and [`REPORT_OVERHEAD`] or
    /// [`ANSWER_OVERHEAD`] for the request or response line and headers.
    fn wire_bytes(&self, message: &Message) -> u64 {
        let body = match message {
            Message::Report { have, bad, known } => serde_json::to_vec(&SwarmReport {
                have: have.to_hex(),
                known: *known,
                upstream: Some("docker.io".into()),
                repo: Some("library/layer".into()),
                bad: bad.clone(),
                ..SwarmReport::default()
            }),
            Message::Answer {
                holders,
                counts,
                assign,
                digests_from,
                known,
            } => {
                let fresh = known.saturating_sub(*digests_from) as usize;
                serde_json::to_vec(&SwarmAnswer {
                    size: self.cfg.layer_size,
                    swarm: true,
                    piece_size: PIECE_SIZE,
                    digests_from: *digests_from,
                    digests: vec![Some(format!("blake3:{:064x}", 0)); fresh],
                    holders: holders
                        .iter()
                        .map(|(n, h)| SwarmHolder {
                            node: n.clone(),
                            have: h.to_hex(),
                        })
                        .collect(),
                    assign: assign.clone(),
                    members: counts.members,
                    held_from: counts.from,
                    held: counts.held.clone(),
                })
            }
        };
        let overhead = match message {
            Message::Report { .. } => REPORT_OVERHEAD,
            Message::Answer { .. } => ANSWER_OVERHEAD,
        };
        body.map_or(0, |b| b.len() as u64) + overhead
    }

    fn answer(
        &mut self,
        node: usize,
        layer: usize,
        holders: Vec<(String, Bits)>,
        counts: Counts,
        assign: Vec<u32>,
        known: u32,
    ) {
        let now = self.now;
        let Some(f) = self.live_fetch(node, layer) else {
            return;
        };
        f.picker.absorb(holders, assign, Some(counts));
        f.known = f.known.max(known);
        // As the fetcher's loop does: soon again when a piece landed while the report was out.
        let next = now
            + ns(if f.landed_since_report {
                REPORT_SOON
            } else {
                REPORT_EVERY
            });
        f.landed_since_report = false;
        f.next_report = next;
        self.push(next, Ev::Report { node, layer });
        self.schedule(node, layer);
    }

    /// Let the picker start what it chooses; each request reaches its sender a latency later.
    fn schedule(&mut self, node: usize, layer: usize) {
        let at = self.instant();
        let now = self.now;
        let detect = ns(self.cfg.detect);
        let dead_at = &self.dead_at;
        let Some(f) = self.fetches[node][layer].as_mut() else {
            return;
        };
        let known = f.known;
        let mut started: Vec<(u32, From)> = Vec::new();
        f.picker.schedule(at, &|i| i < known, &mut |i, from| {
            if let From::Peer(name) = from {
                let listed = index(name)
                    .and_then(|s| dead_at.get(s))
                    .is_some_and(|d| d.is_none_or(|d| now < d + detect));
                if !listed {
                    return false;
                }
            }
            started.push((i, from.clone()));
            true
        });
        if f.picker.stalled(at) {
            f.gave_up = true;
        }
        let upstream = self.cfg.nodes.max(2);
        for (piece, from) in started {
            let (kind, sender) = match &from {
                From::Peer(name) => (Kind::Peer, index(name).unwrap_or(0)),
                From::Upstream => (Kind::Upstream, upstream),
            };
            let id = self.new_flow(kind, sender, node, layer, piece);
            self.push(now + ns(self.cfg.latency), Ev::Start { flow: id });
        }
    }

    fn new_flow(
        &mut self,
        kind: Kind,
        sender: usize,
        receiver: usize,
        layer: usize,
        piece: u32,
    ) -> usize {
        let (start, end) = (
            u64::from(piece) * PIECE_SIZE,
            (u64::from(piece + 1) * PIECE_SIZE).min(self.cfg.layer_size),
        );
        self.flows.push(Some(Flow {
            kind,
            sender,
            receiver,
            layer,
            piece,
            remaining: (end - start) as f64,
            rate: 0.0,
            at: self.now,
            due: NEVER,
            message: None,
        }));
        self.flows.len() - 1
    }

    /// A report (`node` to its coordinator) or an answer (the coordinator to `node`) of
    /// `bytes` on the wire.
    fn new_message(
        &mut self,
        sender: usize,
        receiver: usize,
        layer: usize,
        bytes: u64,
        message: Message,
    ) -> usize {
        let kind = match message {
            Message::Report { .. } => Kind::Report,
            Message::Answer { .. } => Kind::Answer,
        };
        self.flows.push(Some(Flow {
            kind,
            sender,
            receiver,
            layer,
            piece: 0,
            remaining: bytes as f64,
            rate: 0.0,
            at: self.now,
            due: NEVER,
            message: Some(message),
        }));
        self.flows.len() - 1
    }

    /// The coordinator of `layer` goes on with its fill: the next piece from the upstream.
    fn next_fill(&mut self, layer: usize) {
        let l = &mut self.layers[layer];
        if l.next_fill >= self.pieces {
            return;
        }
        let (piece, coord) = (l.next_fill, l.coord);
        l.next_fill += 1;
        let upstream = self.cfg.nodes.max(2);
        let id = self.new_flow(Kind::Fill, upstream, coord, layer, piece);
        self.start(id);
    }

    fn start(&mut self, id: usize) {
        let Some(flow) = self.flows[id].as_ref() else {
            return;
        };
        let (sender, receiver) = (flow.sender, flow.receiver);
        if self.dead_at[receiver].is_some() {
            self.flows[id] = None;
            return;
        }
        if self.dead_at.get(sender).is_some_and(|d| d.is_some()) {
            // Refused: the fetcher hears at once.
            self.fail(id);
            return;
        }
        if flow.kind == Kind::Peer && self.sending(sender) >= UPLOADS {
            // The holder is sending all it will at once: its "not here" reaches the fetcher a
            // latency later, and the fetcher asks another holder.
            self.push(self.now + ns(self.cfg.latency), Ev::Refused { flow: id });
            return;
        }
        self.up[sender].push(id);
        self.down[receiver].push(id);
        self.relink(sender, receiver);
    }

    /// Recompute the rates of every transfer on `sender`'s uplink and `receiver`'s downlink.
    fn relink(&mut self, sender: usize, receiver: usize) {
        let ids: Vec<usize> = self.up[sender]
            .iter()
            .chain(&self.down[receiver])
            .copied()
            .collect();
        for id in ids {
            self.rerate(id);
        }
    }

    fn rerate(&mut self, id: usize) {
        let now = self.now;
        let upstream = self.cfg.nodes.max(2);
        let (ups, downs) = match self.flows[id].as_ref() {
            Some(f) => (self.up[f.sender].len(), self.down[f.receiver].len()),
            None => return,
        };
        let up_rate = |s: usize| {
            if s == upstream {
                self.cfg.upstream
            } else {
                self.cfg.link
            }
        };
        let Some(f) = self.flows[id].as_mut() else {
            return;
        };
        f.remaining -= f.rate * (now - f.at) as f64 / 1e9;
        f.at = now;
        f.rate = (up_rate(f.sender) / ups.max(1) as f64).min(self.cfg.link / downs.max(1) as f64);
        let end = now + ((f.remaining.max(0.0) / f.rate) * 1e9).ceil() as Time;
        if end < f.due {
            f.due = end;
            self.push(end, Ev::Check { flow: id });
        }
    }

    fn check(&mut self, id: usize) {
        let now = self.now;
        let Some(f) = self.flows[id].as_mut() else {
            return;
        };
        if f.due != now {
            return;
        }
        f.remaining -= f.rate * (now - f.at) as f64 / 1e9;
        f.at = now;
        if f.remaining > 1.0 {
            let end = now + ((f.remaining / f.rate) * 1e9).ceil().max(1.0) as Time;
            f.due = end;
            self.push(end, Ev::Check { flow: id });
            return;
        }
        self.unlink(id);
        let Some(f) = self.flows[id].take() else {
            return;
        };
        let bytes = (u64::from(f.piece + 1) * PIECE_SIZE).min(self.cfg.layer_size)
            - u64::from(f.piece) * PIECE_SIZE;
        match f.kind {
            Kind::Report => {
                if let Some(Message::Report { have, bad, known }) = f.message {
                    self.report(f.sender, f.layer, have, &bad, known);
                }
            }
            Kind::Answer => {
                if let Some(Message::Answer {
                    holders,
                    counts,
                    assign,
                    known,
                    ..
                }) = f.message
                {
                    self.answer(f.receiver, f.layer, holders, counts, assign, known);
                }
            }
            Kind::Fill => {
                self.upstream_bytes += bytes;
                let l = &mut self.layers[f.layer];
                l.own.set(f.piece);
                if l.own.all() {
                    l.done_at = Some(now);
                }
                self.next_fill(f.layer);
            }
            Kind::Upstream => {
                self.upstream_bytes += bytes;
                self.landed(&f, From::Upstream);
            }
            Kind::Peer => {
                let from = From::Peer(self.names[f.sender].clone());
                if self.corrupt == Some(f.sender) {
                    self.corrupt_received += 1;
                    if let Some(x) = self.live_fetch(f.receiver, f.layer) {
                        x.picker.ended(f.piece, &from);
                        // What the digest check does with a piece that fails it.
                        if let From::Peer(name) = &from {
                            x.picker.corrupt(name);
                        }
                    }
                    self.schedule(f.receiver, f.layer);
                    return;
                }
                if self.layers[f.layer].coord == f.sender {
                    self.layers[f.layer].coord_sent += 1;
                }
                self.landed(&f, from);
            }
        }
    }

    fn landed(&mut self, f: &Flow, from: From) {
        let now = self.now;
        let at = self.instant();
        let soon = now + ns(REPORT_SOON);
        if self.live_fetch(f.receiver, f.layer).is_none() {
            return;
        }
        self.landed += 1;
        let Some(x) = self.live_fetch(f.receiver, f.layer) else {
            return;
        };
        x.picker.ended(f.piece, &from);
        x.picker.landed(f.piece, at);
        while (x.readable_at.len() as u32) < x.picker.first_missing() {
            x.readable_at.push(now);
        }
        if x.picker.done() {
            x.done_at = Some(now);
            self.send_report(f.receiver, f.layer);
            return;
        }
        // The coordinator hears of every new piece soon, so the others can take it from here.
        if x.next_report == NEVER {
            x.landed_since_report = true;
        } else if soon < x.next_report {
            x.next_report = soon;
            self.push(
                soon,
                Ev::Report {
                    node: f.receiver,
                    layer: f.layer,
                },
            );
        }
        self.schedule(f.receiver, f.layer);
    }

    fn unlink(&mut self, id: usize) {
        let Some(f) = self.flows[id].as_ref() else {
            return;
        };
        let (sender, receiver) = (f.sender, f.receiver);
        self.up[sender].retain(|x| *x != id);
        self.down[receiver].retain(|x| *x != id);
        self.relink(sender, receiver);
    }

    /// Pieces `node` is sending.
    fn sending(&self, node: usize) -> usize {
        self.up[node]
            .iter()
            .filter(|id| {
                self.flows[**id]
                    .as_ref()
                    .is_some_and(|f| f.kind == Kind::Peer)
            })
            .count()
    }

    /// The holder turned the request `id` away, as the peer server does past [`UPLOADS`].
    fn refuse(&mut self, id: usize) {
        let at = self.instant();
        let Some(f) = self.flows[id].take() else {
            return;
        };
        self.refused += 1;
        let name = self.names[f.sender].clone();
        let from = From::Peer(name.clone());
        if let Some(x) = self.live_fetch(f.receiver, f.layer) {
            x.picker.ended(f.piece, &from);
            x.picker.peer_busy(&name, at);
        }
        self.schedule(f.receiver, f.layer);
    }

    /// The transfer `id` failed (its sender is dead): the fetcher benches the sender.
    fn fail(&mut self, id: usize) {
        let at = self.instant();
        let Some(f) = self.flows[id].take() else {
            return;
        };
        if matches!(f.kind, Kind::Report | Kind::Answer) {
            // Only fetchers die, and a dead one's reports and answers no longer matter.
            return;
        }
        self.failed += 1;
        let from = match f.kind {
            Kind::Peer => From::Peer(self.names[f.sender].clone()),
            _ => From::Upstream,
        };
        if let Some(x) = self.live_fetch(f.receiver, f.layer) {
            x.picker.ended(f.piece, &from);
            if let From::Peer(name) = &from {
                x.picker.peer_failed(name, false, at);
            }
        }
        self.schedule(f.receiver, f.layer);
    }

    fn kill(&mut self, node: usize) {
        self.dead_at[node] = Some(self.now);
        let sending: Vec<usize> = self.up[node].clone();
        for id in sending {
            self.unlink(id);
            self.fail(id);
        }
        let receiving: Vec<usize> = self.down[node].clone();
        for id in receiving {
            self.unlink(id);
            self.flows[id] = None;
        }
    }

    /// See [`SwarmSimReport::late`].
    fn late(&self, ideal: Duration) -> f64 {
        let tenth = ns(ideal) / 10;
        let (mut sum, mut fills) = (0.0, 0);
        for f in self.fetches.iter().flatten().flatten() {
            let (Some(done), false) = (f.done_at, f.readable_at.is_empty()) else {
                continue;
            };
            let late = f.readable_at.iter().filter(|&&t| t + tenth > done).count();
            sum += late as f64 / f.readable_at.len() as f64;
            fills += 1;
        }
        if fills == 0 {
            0.0
        } else {
            sum / fills as f64
        }
    }

    fn measure(&self, real: Duration) -> SwarmSimReport {
        let ideal = self.ideal();
        let limit = ns(self.cfg.limit);
        let mut times = Vec::new();
        let mut incomplete = 0;
        for n in 0..self.names.len() {
            if self.dead_at[n].is_some() {
                continue;
            }
            let mut last = 0;
            let mut done = true;
            for (l, layer) in self.layers.iter().enumerate() {
                let at = match &self.fetches[n][l] {
                    Some(f) => f.done_at,
                    None => layer.done_at,
                };
                match at {
                    Some(t) => last = last.max(t),
                    None => done = false,
                }
            }
            if done {
                times.push(last);
            } else {
                incomplete += 1;
                times.push(limit);
            }
        }
        times.sort_unstable();
        let ratio = |t: Time| t as f64 / ideal.as_nanos() as f64;
        let rank = |p: f64| {
            let k = ((p * times.len() as f64).ceil() as usize).clamp(1, times.len().max(1));
            times.get(k - 1).copied().map_or(f64::NAN, ratio)
        };
        let total = (self.cfg.layer_size * self.layers.len() as u64) as f64;
        let pieces = f64::from(self.pieces) * self.layers.len() as f64;
        SwarmSimReport {
            nodes: self.names.len(),
            layers: self.layers.len(),
            fault: match (self.cfg.kill_at.is_some(), self.corrupt.is_some()) {
                (true, true) => "both",
                (true, false) => "killed",
                (false, true) => "corrupt",
                (false, false) => "none",
            },
            ideal,
            p50: rank(0.5),
            p99: rank(0.99),
            max: times.last().copied().map_or(f64::NAN, ratio),
            incomplete,
            upstream: self.upstream_bytes as f64 / total,
            coordinator_pieces: self.layers.iter().map(|l| l.coord_sent).sum::<u64>() as f64
                / pieces,
            corrupt_received: self.corrupt_received,
            failed: self.failed,
            refused: self.refused as f64 / self.landed.max(1) as f64,
            answers: self.answer_bytes as f64 / total,
            answer_bytes: self.answer_bytes as f64 / self.answer_count.max(1) as f64,
            late: self.late(ideal),
            wall: Duration::from_nanos(times.last().copied().unwrap_or(0)),
            real,
        }
    }
}

/// The node a simulated name stands for.
fn index(name: &str) -> Option<usize> {
    name.strip_prefix("node-")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::swarm::decide::IN_FLIGHT;

    /// A small swarm (64 MiB layers, so a debug build runs it in a moment).
    fn small(nodes: usize, layers: usize) -> SwarmSimConfig {
        let mut cfg = SwarmSimConfig::new(nodes, layers);
        cfg.layer_size = 64 * 1024 * 1024;
        cfg
    }

    #[test]
    fn every_node_completes_and_each_byte_leaves_the_upstream_once() {
        for (nodes, layers) in [(8, 1), (30, 1), (30, 4)] {
            let r = run(&small(nodes, layers));
            println!("{}\n{r}", SwarmSimReport::header());
            assert_eq!(r.incomplete, 0, "{nodes} nodes, {layers} layers: {r}");
            assert!((r.upstream - 1.0).abs() < 1e-9, "one upstream pass: {r}");
            assert_eq!(r.failed, 0, "no fault, no failed request: {r}");
            assert!(r.p50 >= 1.0 && r.max.is_finite(), "{r}");
        }
    }

    #[test]
    fn a_killed_fetcher_does_not_stall_the_rest() {
        let mut cfg = small(30, 1);
        cfg.kill_at = Some(0.3);
        let r = run(&cfg);
        println!("{}\n{r}", SwarmSimReport::header());
        assert_eq!(r.incomplete, 0, "{r}");
        assert_eq!(r.fault, "killed");
        assert!((r.upstream - 1.0).abs() < 1e-9, "{r}");
        // The rest finish within a few bench periods of the healthy run, not a stall's 60 s.
        let healthy = run(&small(30, 1));
        assert!(
            r.wall < healthy.wall + Duration::from_secs(10),
            "{r} against {healthy}"
        );
    }

    #[test]
    fn a_corrupt_peer_is_caught_by_each_fetcher_once_and_every_node_completes() {
        let mut cfg = small(30, 4);
        cfg.corrupt_peer = true;
        let r = run(&cfg);
        println!("{}\n{r}", SwarmSimReport::header());
        assert_eq!(r.incomplete, 0, "{r}");
        assert!(r.corrupt_received > 0, "the corrupt peer was asked: {r}");
        // A fetcher stops asking it after its first bad piece: at most what it had in flight
        // from it then, per layer.
        let bound = (cfg.nodes * cfg.layers * IN_FLIGHT) as u64;
        assert!(r.corrupt_received <= bound, "{r}");
        assert!((r.upstream - 1.0).abs() < 1e-9, "{r}");
    }

    #[test]
    fn an_answer_hardly_grows_from_30_nodes_to_150() {
        let few = run(&small(30, 1));
        let many = run(&small(150, 1));
        println!("{}\n{few}\n{many}", SwarmSimReport::header());
        assert_eq!(many.incomplete, 0, "{many}");
        // Naming every member made an answer five times larger at 150 nodes than at 30.
        assert!(
            many.answer_bytes <= few.answer_bytes * 1.5,
            "{} bytes per answer at 150 nodes, {} at 30",
            many.answer_bytes,
            few.answer_bytes
        );
        // Every node finishes within a small multiple of size/link, not N times it.
        assert!(many.max < 3.0, "{many}");
    }

    #[test]
    fn the_run_depends_on_the_seed_alone() {
        let mut cfg = small(20, 1);
        cfg.kill_at = Some(0.3);
        cfg.corrupt_peer = true;
        let (a, b) = (run(&cfg), run(&cfg));
        assert_eq!(
            (a.wall, a.corrupt_received, a.failed, a.p99.to_bits()),
            (b.wall, b.corrupt_received, b.failed, b.p99.to_bits())
        );
    }
}
