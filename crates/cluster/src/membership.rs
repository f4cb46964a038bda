//! Membership by SWIM gossip (foca) over pier's UDP peer socket: who is in the cluster, and
//! whether each member is alive, suspect or dead.
//!
//! The protocol logic lives in `engine` (foca, sealing, the join handshake, the view) and
//! does no I/O; this module is its tokio transport: one task that owns the socket and a timer
//! heap, resolves the join list in the background and publishes the view. The simulation in
//! [`sim`] drives the same engine over a lossy in-memory network with a simulated clock (the
//! thousand-node scenarios built on it are in [`crate::simulation`]).
//!
//! Every datagram is sealed (XChaCha20-Poly1305, the cluster's gossip key, see `seal`);
//! one that does not open is dropped and counted, so a node with another secret can neither
//! join nor poison anyone's view.
//!
//! Identities. A node is its name; `generation` (start time in ms, kept by the caller so a
//! restart is always above the last life: `identity::next_generation`) tells its lives apart
//! and the higher one wins, so a restarted node replaces its previous self at once. A node that
//! the cluster declared dead while it was in fact alive (hung, partitioned, too lossy) is told
//! so (`notify_down_members`) and renews itself as generation + 1, which rejoins it at once.
//!
//! Timing, derived from the probe period P (default 250 ms) for "a killed, hung or cut-off
//! node is dead in every other member's view within 2 s" on a LAN, without flapping under
//! loss. Measured in the simulation (30 members, 0.2-20 ms delays with 2 % of datagrams held
//! up to 160 ms, 100 kills per loss rate): at 15 % loss detection has a median of 0.97 s, a
//! p99 of 1.66 s and a worst of 1.85 s; at 20 % loss one kill in a hundred took 2.3 s. No live
//! member was declared dead in 40 runs of 30 s at 10, 20 or 25 % loss. At 1,000 members
//! (`crate::simulation`, 0.2-2 ms delays) the same tuning declared no live member dead in ten
//! minutes at 5 % loss, and a tenth killed at once was seen dead by every survivor within
//! 2.25 s (98 % of the verdicts within 2 s).
//! - Probe RTT 0.4 P (100 ms): far above LAN round trips, so only a lost or late reply
//!   starts the indirect cycle, which then has 0.6 P to finish.
//! - 4 indirect probes: a live member fails a whole probe cycle about once in 370 probes at
//!   10 % loss and once in 23 at 20 %. Such a suspicion is refuted (the suspect hears of it
//!   and raises its incarnation) in about 150 ms.
//! - Suspicion timeout 2 P (500 ms), three times the refutation. The detection budget is the
//!   wait until some member probes the dead node (each of n members probes one member per
//!   period, so that wait is about P, rarely over 4 P), P until that probe is judged failed,
//!   2 P of suspicion, then gossip.
//! - Periodic gossip every P/5 to 3 members, 15 transmissions per update per member: news
//!   spreads in a few tens of milliseconds per hop, and with 10 transmissions about one kill
//!   in twenty left some member unaware (it then waited for its own probe, seconds later).
//!   Gossip is sent only while there are updates, so a quiet cluster costs little more than
//!   the probes: 25 to 45 datagrams of about 130 bytes per member per second at 30 members
//!   and 10-15 % loss (suspicions and refutations are most of it).
//! - Announce to a random member every 5 s (its reply lists active members, repairing any
//!   gap in the view), and to 2 members believed dead every 8 P (2 s), so the two sides of a
//!   healed partition find each other within seconds; `JOIN` to the join list every
//!   `rejoin_every` (every second while no member is known).
//! - foca remembers dead members for an hour (for those announces); the view shows them for
//!   ten minutes.
//! - Datagrams are at most [`MAX_DATAGRAM`] (1400) bytes sealed; foca fills at most 1359.

mod engine;
mod seal;
pub mod sim;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::identity::{Member, MemberState, NodeId};
use engine::{Engine, Tick, Tuning};

pub use engine::MAX_DATAGRAM;

/// How a node takes part in gossip.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// This node.
    pub identity: NodeId,
    /// Where to find the cluster: `host:port` entries, or a DNS name with a port whose every
    /// A/AAAA record is a peer (a Kubernetes headless Service). Resolved again on every round.
    pub join: Vec<String>,
    /// How often this node probes a random member. Detection takes about four periods,
    /// rarely over seven.
    pub probe_period: Duration,
    /// How often the join list is resolved and sent `JOIN` (addresses held by live members
    /// are skipped); every second instead while this node knows no live member.
    pub rejoin_every: Duration,
}

impl MembershipConfig {
    pub fn new(identity: NodeId, join: Vec<String>) -> MembershipConfig {
        MembershipConfig {
            identity,
            join,
            probe_period: Duration::from_millis(250),
            rejoin_every: Duration::from_secs(10),
        }
    }

    fn tuning(&self) -> Tuning {
        Tuning {
            probe_period: self.probe_period,
            rejoin_every: self.rejoin_every,
        }
    }
}

/// What the gossip task publishes for readers.
struct Shared {
    view: Mutex<View>,
    rejected: AtomicU64,
    suspicions: AtomicU64,
    changes: watch::Sender<u64>,
}

struct View {
    local: NodeId,
    members: Vec<Member>,
}

/// A running member of the cluster. Gossip stops on [`Membership::shutdown`] or when the
/// last handle is dropped (the node then leaves as gracefully as `shutdown` would).
pub struct Membership {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Membership {
    /// Start gossip on an already bound UDP socket (the peer port); `key` is
    /// `ClusterSecret::gossip_key()`. Must be called within a tokio runtime.
    pub async fn start(
        cfg: MembershipConfig,
        socket: UdpSocket,
        key: [u8; 32],
    ) -> std::io::Result<Arc<Membership>> {
        validate(&cfg)?;
        let now = SystemTime::now();
        let os_rng = || StdRng::try_from_os_rng().map_err(std::io::Error::other);
        let engine = Engine::new(
            &cfg.identity,
            &cfg.tuning(),
            &key,
            os_rng()?,
            os_rng()?,
            now,
        );
        let shared = Arc::new(Shared {
            view: Mutex::new(View {
                local: engine.local(),
                members: engine.members(now),
            }),
            rejected: AtomicU64::new(0),
            suspicions: AtomicU64::new(0),
            changes: watch::Sender::new(0),
        });
        let (stop, stopped) = watch::channel(false);
        let driver = Driver {
            engine,
            socket,
            shared: shared.clone(),
            join: Arc::new(cfg.join),
            timers: BinaryHeap::new(),
            seq: 0,
            resolving: None,
            published: u64::MAX,
        };
        let task = tokio::spawn(driver.run(stopped));
        Ok(Arc::new(Membership {
            shared,
            stop,
            task: Mutex::new(Some(task)),
        }))
    }

    /// This node's identity now (a renewal after a false death raises its generation).
    pub fn local(&self) -> NodeId {
        lock(&self.shared.view).local.clone()
    }

    /// Every member known, this node included (always alive), one entry per name (the
    /// newest generation), sorted by name. Dead members stay for ten minutes after their
    /// death, so a status page can show them with `since`.
    pub fn members(&self) -> Vec<Member> {
        let now = SystemTime::now();
        let mut members = lock(&self.shared.view).members.clone();
        members.retain(|m| {
            m.state != MemberState::Dead
                || now
                    .duration_since(m.since)
                    .map_or(true, |age| age <= engine::DEAD_RETENTION)
        });
        members
    }

    /// Members usable now for placement and reads: alive and suspect (a suspicion alone
    /// must not move data), this node included, sorted by name.
    pub fn alive(&self) -> Vec<Member> {
        let mut members = lock(&self.shared.view).members.clone();
        members.retain(|m| m.state != MemberState::Dead);
        members
    }

    /// Changes whenever the set of usable members does (a member joins, dies, leaves or
    /// restarts as a new generation); the value counts those changes. A suspicion that is
    /// refuted changes nothing here.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Datagrams dropped because they did not open with the key (another secret, garbage).
    pub fn rejected_datagrams(&self) -> u64 {
        self.shared.rejected.load(Ordering::Relaxed)
    }

    /// Times a member turned suspect in this node's view. Suspicions that are refuted are
    /// normal on a lossy network; a fast-growing count says the network (or a peer) is
    /// struggling before anyone is declared dead.
    pub fn suspicions(&self) -> u64 {
        self.shared.suspicions.load(Ordering::Relaxed)
    }

    /// Leave the cluster (tell a few members, so the others learn it at once rather than
    /// by detection), then stop gossip. Returns when the socket is closed.
    pub async fn shutdown(&self) {
        self.stop.send_replace(true);
        let task = lock(&self.task).take();
        if let Some(task) = task {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "gossip task ended abnormally");
            }
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Wait for the next change of [`Membership::changes`] and then for `quiet` without another
/// (a rolling restart is one change, not one per node). `false` once the membership is gone.
pub async fn settled(changes: &mut watch::Receiver<u64>, quiet: Duration) -> bool {
    if changes.changed().await.is_err() {
        return false;
    }
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return false },
            () = tokio::time::sleep(quiet) => return true,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The view is replaced whole under the lock, so a panicking holder cannot leave it torn.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn validate(cfg: &MembershipConfig) -> std::io::Result<()> {
    let invalid = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg);
    let id = &cfg.identity;
    if id.name.is_empty() || id.name.len() > engine::MAX_NAME {
        return Err(invalid(format!(
            "a node name must have 1 to {} bytes (`{}` has {})",
            engine::MAX_NAME,
            id.name,
            id.name.len()
        )));
    }
    if id.zone.as_ref().is_some_and(|z| z.len() > engine::MAX_ZONE) {
        return Err(invalid(format!(
            "a zone must have at most {} bytes",
            engine::MAX_ZONE
        )));
    }
    if cfg.probe_period < Duration::from_millis(10) {
        return Err(invalid(
            "the probe period must be at least 10 ms".to_string(),
        ));
    }
    if cfg.rejoin_every.is_zero() {
        return Err(invalid("rejoin_every must not be zero".to_string()));
    }
    Ok(())
}

/// The gossip task: the engine, its socket and its timers.
struct Driver {
    engine: Engine,
    socket: UdpSocket,
    shared: Arc<Shared>,
    join: Arc<Vec<String>>,
    /// Due time, scheduling order (so equal times keep their order), tick.
    timers: BinaryHeap<Reverse<(Instant, u64, Tick)>>,
    seq: u64,
    /// The join list being resolved in the background, if a round is under way.
    resolving: Option<mpsc::Receiver<Vec<SocketAddr>>>,
    /// The engine's view version last published.
    published: u64,
}

/// How long one DNS lookup of a join entry may take before the round goes on without it.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

impl Driver {
    async fn run(mut self, mut stopped: watch::Receiver<bool>) {
        // A sealed datagram is at most MAX_DATAGRAM; a longer one is truncated here and
        // then fails to open, which counts it as rejected.
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        loop {
            self.flush().await;
            let next = self.timers.peek().map(|Reverse(due)| due.0);
            tokio::select! {
                // Due timers before datagrams: a flood of datagrams (garbage included) must
                // not hold back the probes, or this node would start declaring others dead.
                biased;
                _ = stopped.wait_for(|stop| *stop) => break,
                _ = sleep_until(next) => self.fire_due(),
                addrs = recv_resolved(&mut self.resolving) => {
                    self.resolving = None;
                    if let Some(addrs) = addrs {
                        self.engine.join(&addrs);
                    }
                }
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((n, from)) => self.engine.receive(SystemTime::now(), from, &buf[..n]),
                    Err(e) => {
                        // Some platforms report an earlier send's ICMP error here; the
                        // socket itself is fine.
                        tracing::debug!(error = %e, "gossip receive");
                    }
                },
            }
        }
        self.engine.leave(SystemTime::now());
        self.flush().await;
    }

    fn fire_due(&mut self) {
        let now = Instant::now();
        while self.timers.peek().is_some_and(|Reverse(due)| due.0 <= now) {
            if let Some(Reverse((_, _, tick))) = self.timers.pop() {
                self.engine.tick(SystemTime::now(), tick);
            }
        }
    }

    /// Send what the engine produced, schedule its ticks, start a join round if asked, and
    /// publish the view if it changed.
    async fn flush(&mut self) {
        let out = self.engine.take_output();
        for (to, datagram) in out.datagrams {
            if let Err(e) = self.socket.send_to(&datagram, to).await {
                tracing::debug!(%to, error = %e, "gossip send");
            }
        }
        let now = Instant::now();
        for (after, tick) in out.ticks {
            self.seq += 1;
            self.timers.push(Reverse((now + after, self.seq, tick)));
        }
        if out.join && self.resolving.is_none() && !self.join.is_empty() {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(resolve(self.join.clone(), tx));
            self.resolving = Some(rx);
        }
        self.shared
            .rejected
            .store(self.engine.rejected(), Ordering::Relaxed);
        self.shared
            .suspicions
            .store(self.engine.suspicions(), Ordering::Relaxed);
        if self.engine.version() != self.published {
            self.published = self.engine.version();
            let now = SystemTime::now();
            *lock(&self.shared.view) = View {
                local: self.engine.local(),
                members: self.engine.members(now),
            };
            let changes = self.engine.changes();
            self.shared.changes.send_if_modified(|c| {
                let modified = *c != changes;
                *c = changes;
                modified
            });
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn recv_resolved(
    rx: &mut Option<mpsc::Receiver<Vec<SocketAddr>>>,
) -> Option<Vec<SocketAddr>> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Resolve every join entry (each A/AAAA record is a peer); entries that fail are logged and
/// skipped, so one bad name does not keep the node from the others.
async fn resolve(join: Arc<Vec<String>>, tx: mpsc::Sender<Vec<SocketAddr>>) {
    let mut addrs = Vec::new();
    for entry in join.iter() {
        match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(entry.as_str())).await {
            Ok(Ok(found)) => addrs.extend(found),
            Ok(Err(e)) => tracing::warn!(join = %entry, error = %e, "cannot resolve a join entry"),
            Err(_) => tracing::warn!(join = %entry, "resolving a join entry timed out"),
        }
    }
    addrs.sort_unstable();
    addrs.dedup();
    // The receiver is gone only when gossip stopped.
    let _ = tx.send(addrs).await;
}
