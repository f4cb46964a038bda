//! The cluster at scale, simulated: a thousand production membership engines (the
//! production tuning) over the simulated network of [`crate::membership::sim`], and the
//! production placement over the same members. [`run`] plays one rollout from start to end
//! and measures what an operator would ask about:
//!
//! 1. the nodes start one after another over a few seconds, all joining through a few seeds:
//!    how long until every node sees every other alive;
//! 2. a quiet network: the gossip bytes each node sends per second;
//! 3. a lossy network for a long window: how many "dead" verdicts name a node that never died;
//! 4. a tenth of the nodes killed at once: how long until every survivor holds every victim
//!    dead;
//! 5. placement over the members: how evenly keys spread, and how many move when one node
//!    leaves or joins.
//!
//! The example `simulate` prints the report; a test runs a smaller cluster and asserts on it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::identity::{MemberState, NodeId};
use crate::membership::sim::{Network, Sim, SimConfig};
use crate::placement;

/// What to simulate. [`ScaleConfig::new`] gives the defaults the report is meant for.
#[derive(Debug, Clone)]
pub struct ScaleConfig {
    pub nodes: usize,
    pub seed: u64,
    /// Nodes every other joins through.
    pub seeds: usize,
    pub zones: usize,
    /// Nodes start evenly over this window.
    pub join_over: Duration,
    /// The longest the join may take before it is reported as not converged.
    pub join_limit: Duration,
    /// How long the cluster runs after the join before traffic is measured (the join's
    /// news is still being gossiped), and the loss-free window in which it is.
    pub settle: Duration,
    pub quiet: Duration,
    /// Loss rate and length of the window in which false deaths are counted.
    pub loss: f64,
    pub lossy: Duration,
    /// Fraction of the nodes killed at once, and the loss rate while they are detected.
    pub kill_fraction: f64,
    pub kill_loss: f64,
    /// The longest the kill's detection may take before it is reported as incomplete.
    pub kill_limit: Duration,
    /// Blob keys placed, and owners per key.
    pub keys: usize,
    pub replicas: usize,
}

impl ScaleConfig {
    /// A thousand-style run for `nodes` nodes: five seconds of rollout, three seeds and
    /// zones, 30 s quiet, ten minutes at 5 % loss, a tenth killed, 100,000 keys on 2 owners.
    pub fn new(nodes: usize, seed: u64) -> ScaleConfig {
        ScaleConfig {
            nodes,
            seed,
            seeds: 3,
            zones: 3,
            join_over: Duration::from_secs(5),
            join_limit: Duration::from_secs(120),
            settle: Duration::from_secs(30),
            quiet: Duration::from_secs(30),
            loss: 0.05,
            lossy: Duration::from_secs(600),
            kill_fraction: 0.10,
            kill_loss: 0.0,
            kill_limit: Duration::from_secs(30),
            keys: 100_000,
            replicas: 2,
        }
    }
}

/// Everything [`run`] measured. Times are simulated seconds unless named `wall`.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    pub nodes: usize,
    pub seed: u64,
    pub probe_period_ms: u64,
    /// The network outside the lossy window: one-way delay range and the slow tail.
    pub delay_ms: (f64, f64),
    pub slow_fraction: f64,
    pub join: JoinReport,
    /// Seconds between the join's end and the quiet window.
    pub settle_s: f64,
    pub quiet: TrafficReport,
    pub lossy: LossReport,
    pub kill: KillReport,
    pub placement: PlacementReport,
    /// Events (datagrams delivered, timers fired) the run took, and its wall-clock time.
    pub events: u64,
    pub wall_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct JoinReport {
    pub seeds: usize,
    /// The window over which the nodes started.
    pub window_s: f64,
    /// From the first start until every node saw all the others alive (`None`: not within
    /// the limit), and from the last start.
    pub all_see_all_s: Option<f64>,
    pub after_last_start_s: Option<f64>,
    /// When each node first saw all the others, counted from the last node's start (zero
    /// for a node whose view was full at once): median and worst.
    pub per_node_p50_s: Option<f64>,
    pub per_node_max_s: Option<f64>,
    /// Nodes that never saw all the others within the limit.
    pub incomplete: usize,
    /// False deaths during the join (renewals of nodes the cluster declared dead).
    pub renewals: u64,
    pub wall_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrafficReport {
    pub window_s: f64,
    /// Sealed gossip bytes (UDP payload) each node sent per second: mean and the busiest.
    pub bytes_per_node_s_mean: f64,
    pub bytes_per_node_s_max: f64,
    pub datagrams_per_node_s_mean: f64,
    pub datagrams_per_node_s_max: f64,
    /// Suspicions raised in all views during the window, and false deaths.
    pub suspicions: u64,
    pub false_dead_pairs: usize,
    pub wall_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LossReport {
    pub loss: f64,
    pub traffic: TrafficReport,
    /// (observer, victim) pairs in which a node held a live node dead, and the distinct live
    /// nodes ever held dead.
    pub false_dead_pairs: usize,
    pub false_dead_nodes: usize,
    /// Renewals (a node declared dead rejoins as a new generation).
    pub renewals: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct KillReport {
    pub killed: usize,
    pub loss: f64,
    /// Per survivor, when it held every victim dead: median, 99th percentile and worst;
    /// `None` for the worst while some survivor still missed a victim at the limit.
    pub agree_p50_s: Option<f64>,
    pub agree_p99_s: Option<f64>,
    pub all_agree_s: Option<f64>,
    /// Per (survivor, victim) pair, when the survivor first held the victim dead.
    pub pair_p50_s: Option<f64>,
    pub pair_p99_s: Option<f64>,
    pub pair_max_s: Option<f64>,
    /// Per victim, when the first survivor held it dead (how long detection took) and how
    /// long after that the last one did (how long the news took to spread): medians and
    /// worst.
    pub victim_first_p50_s: Option<f64>,
    pub victim_first_max_s: Option<f64>,
    pub victim_spread_p50_s: Option<f64>,
    pub victim_spread_max_s: Option<f64>,
    /// Pairs still not seen dead at the limit.
    pub missing_pairs: usize,
    /// Pairs within the product's bound of 2 s.
    pub pairs_within_2s: f64,
    /// Survivors held dead by another survivor during the detection.
    pub false_dead_pairs: usize,
    pub wall_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlacementReport {
    pub keys: usize,
    pub replicas: usize,
    pub zones: usize,
    /// Keys each node owns (any of the `replicas` owners).
    pub per_node_min: usize,
    pub per_node_mean: f64,
    pub per_node_max: usize,
    pub max_over_mean: f64,
    /// Fraction of keys whose owner set changed when one node left, when one joined, and the
    /// ideal (only the keys the node held or wins: replicas / nodes).
    pub moved_on_leave: f64,
    pub moved_on_join: f64,
    pub ideal_moved: f64,
    pub wall_s: f64,
}

/// Play the whole scenario of `cfg` and measure it.
pub fn run(cfg: &ScaleConfig) -> ScaleReport {
    let started = Instant::now();
    let network = Network::site(0.0);
    let mut sim = Sim::new(&SimConfig {
        seed: cfg.seed,
        nodes: cfg.nodes,
        seeds: cfg.seeds,
        zones: cfg.zones,
        join_over: cfg.join_over,
        network,
    });
    let join = join(&mut sim, cfg);
    sim.run_for(cfg.settle);
    let quiet = traffic(&mut sim, cfg.quiet);
    sim.set_loss(cfg.loss);
    let lossy = lossy(&mut sim, cfg);
    sim.set_loss(cfg.kill_loss);
    // Let the renewals of the lossy window settle, so the kill starts from a full view.
    settle(&mut sim, Duration::from_secs(60));
    let kill = kill(&mut sim, cfg);
    let placement = placement_report(&sim.identities(), cfg);
    ScaleReport {
        nodes: cfg.nodes,
        seed: cfg.seed,
        probe_period_ms: sim.probe_period().as_millis() as u64,
        delay_ms: (ms(network.min_delay), ms(network.max_delay)),
        slow_fraction: network.slow,
        join,
        settle_s: cfg.settle.as_secs_f64(),
        quiet,
        lossy,
        kill,
        placement,
        events: sim.events(),
        wall_s: started.elapsed().as_secs_f64(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The rollout: run until every node sees all the others usable.
fn join(sim: &mut Sim, cfg: &ScaleConfig) -> JoinReport {
    let wall = Instant::now();
    let n = sim.len();
    let mut full: Vec<Option<Duration>> = vec![None; n];
    let mut complete = 0;
    // A node that saw everyone can lose sight of one again (a false death); `complete`
    // counts nodes whose view is full now, `full` remembers the first time.
    let mut now_full = vec![false; n];
    let done = sim.run_watching(cfg.join_limit, |sim, i| {
        let is_full = sim.usable_others(i) + 1 == n;
        if is_full != now_full[i] {
            now_full[i] = is_full;
            if is_full {
                complete += 1;
                full[i].get_or_insert(sim.now());
            } else {
                complete -= 1;
            }
        }
        complete == n
    });
    let at = done.then(|| sim.now());
    let last_start = (0..n).map(|i| sim.started_at(i)).max().unwrap_or_default();
    let mut per_node: Vec<f64> = full
        .iter()
        .flatten()
        .map(|t| t.saturating_sub(last_start).as_secs_f64())
        .collect();
    per_node.sort_by(f64::total_cmp);
    let incomplete = full.iter().filter(|f| f.is_none()).count();
    JoinReport {
        seeds: cfg.seeds,
        window_s: cfg.join_over.as_secs_f64(),
        all_see_all_s: at.map(|t| t.as_secs_f64()),
        after_last_start_s: at.map(|t| t.saturating_sub(last_start).as_secs_f64()),
        per_node_p50_s: quantile(&per_node, 0.5),
        per_node_max_s: (incomplete == 0)
            .then(|| per_node.last().copied())
            .flatten(),
        incomplete,
        renewals: sim.renewals(),
        wall_s: wall.elapsed().as_secs_f64(),
    }
}

/// Run until every running node sees every other running node usable, at most `limit`.
fn settle(sim: &mut Sim, limit: Duration) -> bool {
    let live = (0..sim.len()).filter(|&i| sim.is_member(i)).count();
    let full =
        |sim: &Sim| (0..sim.len()).all(|i| !sim.is_member(i) || sim.usable_others(i) + 1 == live);
    sim.run_until(limit, full).is_some()
}

/// Run for `window` and measure what every node sent, and false deaths.
fn traffic(sim: &mut Sim, window: Duration) -> TrafficReport {
    let wall = Instant::now();
    sim.reset_traffic();
    let suspicions = sim.suspicions();
    let mut verdicts = FalseDeaths::new(sim);
    sim.run_watching(window, |sim, i| {
        verdicts.watch(sim, i);
        false
    });
    traffic_report(sim, window, suspicions, verdicts.pairs.len(), wall)
}

fn traffic_report(
    sim: &Sim,
    window: Duration,
    suspicions_before: u64,
    false_dead_pairs: usize,
    wall: Instant,
) -> TrafficReport {
    let secs = window.as_secs_f64().max(1e-9);
    let sent: Vec<(u64, u64)> = (0..sim.len())
        .filter(|&i| sim.is_member(i))
        .map(|i| sim.traffic()[i])
        .collect();
    let count = sent.len().max(1) as f64;
    let mean = |f: fn(&(u64, u64)) -> u64| sent.iter().map(f).sum::<u64>() as f64 / count / secs;
    let max = |f: fn(&(u64, u64)) -> u64| sent.iter().map(f).max().unwrap_or(0) as f64 / secs;
    TrafficReport {
        window_s: window.as_secs_f64(),
        bytes_per_node_s_mean: mean(|t| t.1),
        bytes_per_node_s_max: max(|t| t.1),
        datagrams_per_node_s_mean: mean(|t| t.0),
        datagrams_per_node_s_max: max(|t| t.0),
        suspicions: sim.suspicions() - suspicions_before,
        false_dead_pairs,
        wall_s: wall.elapsed().as_secs_f64(),
    }
}

/// "Dead" verdicts on nodes that are running, as each view changes.
struct FalseDeaths {
    /// Each node's death count in its view when last looked at.
    seen: Vec<u64>,
    /// (observer, victim) pairs, and every (observer, victim, generation) verdict.
    pairs: HashSet<(usize, usize)>,
    verdicts: HashSet<(usize, usize, u64)>,
}

impl FalseDeaths {
    fn new(sim: &Sim) -> FalseDeaths {
        FalseDeaths {
            seen: (0..sim.len()).map(|i| sim.deaths(i)).collect(),
            pairs: HashSet::new(),
            verdicts: HashSet::new(),
        }
    }

    fn watch(&mut self, sim: &Sim, i: usize) {
        let deaths = sim.deaths(i);
        if deaths == self.seen[i] {
            return;
        }
        self.seen[i] = deaths;
        for (victim, generation) in sim.dead_in_view(i) {
            if sim.is_member(victim) && self.verdicts.insert((i, victim, generation)) {
                self.pairs.insert((i, victim));
            }
        }
    }

    fn victims(&self) -> usize {
        self.pairs.iter().map(|p| p.1).collect::<HashSet<_>>().len()
    }
}

/// The lossy window: traffic and false deaths.
fn lossy(sim: &mut Sim, cfg: &ScaleConfig) -> LossReport {
    let wall = Instant::now();
    sim.reset_traffic();
    let suspicions = sim.suspicions();
    let renewals = sim.renewals();
    let mut verdicts = FalseDeaths::new(sim);
    sim.run_watching(cfg.lossy, |sim, i| {
        verdicts.watch(sim, i);
        false
    });
    let traffic = traffic_report(sim, cfg.lossy, suspicions, verdicts.pairs.len(), wall);
    LossReport {
        loss: cfg.loss,
        traffic,
        false_dead_pairs: verdicts.pairs.len(),
        false_dead_nodes: verdicts.victims(),
        renewals: sim.renewals() - renewals,
    }
}

/// Kill a fraction at once and time every survivor's verdicts on every victim.
fn kill(sim: &mut Sim, cfg: &ScaleConfig) -> KillReport {
    let wall = Instant::now();
    let n = sim.len();
    let count = ((n as f64 * cfg.kill_fraction).round() as usize).clamp(1, n.saturating_sub(1));
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x6b69_6c6c);
    let victims: Vec<usize> = sample(&mut rng, n, count).into_vec();
    for &v in &victims {
        sim.kill(v);
    }
    let names: Vec<String> = victims.iter().map(|&v| sim.name(v).to_string()).collect();
    let start = sim.now();
    let survivors: Vec<usize> = (0..n).filter(|&i| sim.is_member(i)).collect();
    // first[i][k]: when survivor i first held victim k dead.
    let mut first: Vec<Vec<Option<Duration>>> = vec![Vec::new(); n];
    for &s in &survivors {
        first[s] = vec![None; victims.len()];
    }
    let mut left_of: Vec<usize> = vec![0; n];
    for &s in &survivors {
        left_of[s] = victims.len();
    }
    let mut agreed: Vec<Option<Duration>> = vec![None; n];
    let mut waiting = survivors.len();
    let mut verdicts = FalseDeaths::new(sim);
    let mut deaths: Vec<u64> = (0..n).map(|i| sim.deaths(i)).collect();
    sim.run_watching(cfg.kill_limit, |sim, i| {
        if left_of[i] == 0 || sim.deaths(i) == deaths[i] {
            verdicts.watch(sim, i);
            return waiting == 0;
        }
        deaths[i] = sim.deaths(i);
        verdicts.watch(sim, i);
        for (k, name) in names.iter().enumerate() {
            if first[i][k].is_none() && sim.state(i, name) == Some(MemberState::Dead) {
                first[i][k] = Some(sim.now() - start);
                left_of[i] -= 1;
            }
        }
        if left_of[i] == 0 {
            agreed[i] = Some(sim.now() - start);
            waiting -= 1;
        }
        waiting == 0
    });
    let secs = |v: &mut Vec<f64>| v.sort_by(f64::total_cmp);
    let mut per_survivor: Vec<f64> = survivors
        .iter()
        .filter_map(|&s| agreed[s])
        .map(|d| d.as_secs_f64())
        .collect();
    secs(&mut per_survivor);
    let mut pairs: Vec<f64> = survivors
        .iter()
        .flat_map(|&s| first[s].iter().flatten())
        .map(Duration::as_secs_f64)
        .collect();
    secs(&mut pairs);
    let mut first_seen: Vec<f64> = Vec::new();
    let mut spread: Vec<f64> = Vec::new();
    for (k, _) in victims.iter().enumerate() {
        let times = survivors.iter().filter_map(|&s| first[s][k]);
        if let (Some(a), Some(b)) = (times.clone().min(), times.max()) {
            first_seen.push(a.as_secs_f64());
            spread.push((b - a).as_secs_f64());
        }
    }
    secs(&mut first_seen);
    secs(&mut spread);
    let all_pairs = survivors.len() * victims.len();
    let missing = all_pairs - pairs.len();
    KillReport {
        killed: victims.len(),
        loss: cfg.kill_loss,
        agree_p50_s: quantile(&per_survivor, 0.5),
        agree_p99_s: quantile(&per_survivor, 0.99),
        all_agree_s: (waiting == 0)
            .then(|| per_survivor.last().copied())
            .flatten(),
        pair_p50_s: quantile(&pairs, 0.5),
        pair_p99_s: quantile(&pairs, 0.99),
        pair_max_s: (missing == 0).then(|| pairs.last().copied()).flatten(),
        victim_first_p50_s: quantile(&first_seen, 0.5),
        victim_first_max_s: first_seen.last().copied(),
        victim_spread_p50_s: quantile(&spread, 0.5),
        victim_spread_max_s: spread.last().copied(),
        missing_pairs: missing,
        pairs_within_2s: pairs.iter().filter(|&&t| t <= 2.0).count() as f64
            / all_pairs.max(1) as f64,
        false_dead_pairs: verdicts.pairs.len(),
        wall_s: wall.elapsed().as_secs_f64(),
    }
}

/// The nearest-rank quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Placement over `members`: balance of `cfg.keys` blob keys on `cfg.replicas` owners, and
/// the keys that move when one member leaves and when one joins.
pub fn placement_report(members: &[NodeId], cfg: &ScaleConfig) -> PlacementReport {
    let wall = Instant::now();
    let keys: Vec<Vec<u8>> = (0..cfg.keys as u64)
        .map(|i| {
            let d = Sha256::digest([cfg.seed.to_le_bytes(), i.to_le_bytes()].concat());
            format!("blob:sha256:{}", hex::encode(d)).into_bytes()
        })
        .collect();
    let r = cfg.replicas;
    let index: HashMap<&str, usize> = members
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name.as_str(), i))
        .collect();
    let mut per_node = vec![0usize; members.len()];
    for k in &keys {
        for o in placement::owners(k, members, r) {
            per_node[index[o.name.as_str()]] += 1;
        }
    }
    let mean = (keys.len() * r.min(members.len())) as f64 / members.len().max(1) as f64;
    let min = per_node.iter().copied().min().unwrap_or(0);
    let max = per_node.iter().copied().max().unwrap_or(0);

    // One member leaves: the one in the middle, so no seed or zone is special.
    let leaver = members.len() / 2;
    let without: Vec<NodeId> = members
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != leaver)
        .map(|(_, m)| m.clone())
        .collect();
    let moved_on_leave = moved(&keys, members, &without, r);
    let mut with = members.to_vec();
    let mut joiner = members[leaver].clone();
    joiner.name = "node-joined".to_string();
    with.push(joiner);
    let moved_on_join = moved(&keys, members, &with, r);
    PlacementReport {
        keys: keys.len(),
        replicas: r,
        zones: cfg.zones,
        per_node_min: min,
        per_node_mean: mean,
        per_node_max: max,
        max_over_mean: max as f64 / mean.max(1e-9),
        moved_on_leave,
        moved_on_join,
        ideal_moved: r as f64 / members.len().max(1) as f64,
        wall_s: wall.elapsed().as_secs_f64(),
    }
}

/// Fraction of `keys` whose owner set (by name) differs between two member lists.
fn moved(keys: &[Vec<u8>], a: &[NodeId], b: &[NodeId], r: usize) -> f64 {
    let changed = keys
        .iter()
        .filter(|k| {
            let mut x: Vec<&str> = placement::owners(k, a, r)
                .iter()
                .map(|m| m.name.as_str())
                .collect();
            let mut y: Vec<&str> = placement::owners(k, b, r)
                .iter()
                .map(|m| m.name.as_str())
                .collect();
            x.sort_unstable();
            y.sort_unstable();
            x != y
        })
        .count();
    changed as f64 / keys.len().max(1) as f64
}

impl fmt::Display for ScaleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s =
            |t: Option<f64>| t.map_or_else(|| "not reached".to_string(), |t| format!("{t:.2} s"));
        let j = &self.join;
        writeln!(
            f,
            "{} nodes, seed {}, probe period {} ms, one-way delay {:.1}-{:.1} ms ({:.0} % held up to 8x longer)",
            self.nodes,
            self.seed,
            self.probe_period_ms,
            self.delay_ms.0,
            self.delay_ms.1,
            self.slow_fraction * 100.0
        )?;
        writeln!(
            f,
            "join: {} nodes started over {:.1} s through {} seeds; all see all {} after the first start, {} after the last (per node p50 {}, max {}); {} renewals",
            self.nodes,
            j.window_s,
            j.seeds,
            s(j.all_see_all_s),
            s(j.after_last_start_s),
            s(j.per_node_p50_s),
            s(j.per_node_max_s),
            j.renewals
        )?;
        if j.incomplete > 0 {
            writeln!(f, "      {} nodes never saw all the others", j.incomplete)?;
        }
        let t = &self.quiet;
        writeln!(
            f,
            "quiet ({:.0} s, no loss, {:.0} s after the join): {:.0} B/s per node (max {:.0}), {:.1} datagrams/s (max {:.1}); {} suspicions, {} false dead verdicts",
            t.window_s,
            self.settle_s,
            t.bytes_per_node_s_mean,
            t.bytes_per_node_s_max,
            t.datagrams_per_node_s_mean,
            t.datagrams_per_node_s_max,
            t.suspicions,
            t.false_dead_pairs
        )?;
        let l = &self.lossy;
        writeln!(
            f,
            "lossy ({:.0} s at {:.0} % loss): {} false dead verdicts (observer, victim), {} distinct live nodes held dead, {} renewals, {} suspicions",
            l.traffic.window_s,
            l.loss * 100.0,
            l.false_dead_pairs,
            l.false_dead_nodes,
            l.renewals,
            l.traffic.suspicions
        )?;
        writeln!(
            f,
            "      gossip {:.0} B/s per node (max {:.0}), {:.1} datagrams/s (max {:.1})",
            l.traffic.bytes_per_node_s_mean,
            l.traffic.bytes_per_node_s_max,
            l.traffic.datagrams_per_node_s_mean,
            l.traffic.datagrams_per_node_s_max
        )?;
        let k = &self.kill;
        writeln!(
            f,
            "kill: {} killed at once ({:.0} % loss); survivors agree p50 {}, p99 {}, all {}; per pair p50 {}, p99 {}, max {}; {:.2} % of pairs within 2 s; {} pairs missing; {} false dead verdicts",
            k.killed,
            k.loss * 100.0,
            s(k.agree_p50_s),
            s(k.agree_p99_s),
            s(k.all_agree_s),
            s(k.pair_p50_s),
            s(k.pair_p99_s),
            s(k.pair_max_s),
            k.pairs_within_2s * 100.0,
            k.missing_pairs,
            k.false_dead_pairs
        )?;
        writeln!(
            f,
            "      per victim: first survivor to hold it dead p50 {}, max {}; then the last one after p50 {}, max {}",
            s(k.victim_first_p50_s),
            s(k.victim_first_max_s),
            s(k.victim_spread_p50_s),
            s(k.victim_spread_max_s)
        )?;
        let p = &self.placement;
        writeln!(
            f,
            "placement: {} keys x {} owners over {} zones: per node min {}, mean {:.1}, max {} (max/mean {:.3}); moved on a leave {:.3} %, on a join {:.3} % (ideal {:.3} %)",
            p.keys,
            p.replicas,
            p.zones,
            p.per_node_min,
            p.per_node_mean,
            p.per_node_max,
            p.max_over_mean,
            p.moved_on_leave * 100.0,
            p.moved_on_join * 100.0,
            p.ideal_moved * 100.0
        )?;
        write!(
            f,
            "run: {} events in {:.1} s wall (join {:.1}, quiet {:.1}, lossy {:.1}, kill {:.1}, placement {:.1})",
            self.events,
            self.wall_s,
            j.wall_s,
            t.wall_s,
            l.traffic.wall_s,
            k.wall_s,
            p.wall_s
        )
    }
}
