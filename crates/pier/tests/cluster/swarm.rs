//! Swarming, on six namespaced nodes with shaped links: every node cold-pulls one large blob
//! at the same moment. Each copy must verify, the upstream must send the blob once, and the
//! blob's owner must have uploaded less than half of what the other nodes received (the swarm
//! carried the rest). Meanwhile one fetcher is killed mid-swarm (the others must not fail) and
//! one node serves corrupt pieces through the fault hook `PIER_FAULT_CORRUPT_PIECES=1` (its
//! pieces must be caught by their digests, and no node may cache a corrupt blob).
//!
//! [`cold_swarm`] is shared with the benchmark ([`swarm_bench`]), which runs it at eight nodes
//! and 1 Gbit/s with swarming on and off, warm, and for a mixed image.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::{
    push_image, write_layout, Descriptor, Entry, ImageSpec, LayerSpec, Upload, MIB,
};
use crate::nodes::{get_blob, Cluster, UpstreamCounts, PEER_PORT, UPSTREAM};
use crate::serial;

/// `roles` in placement order for `digest`.
pub fn ranked(c: &Cluster, digest: &str, roles: &[&str]) -> Vec<String> {
    let members: Vec<pier_cluster::NodeId> = roles
        .iter()
        .map(|r| pier_cluster::NodeId {
            name: r.to_string(),
            generation: 0,
            addr: SocketAddr::from((c.net.host(r).ip, PEER_PORT)),
            zone: Some(Cluster::zone_of(r).to_string()),
        })
        .collect();
    pier_cluster::placement::ranked(digest.as_bytes(), &members)
        .into_iter()
        .map(|n| n.name.clone())
        .collect()
}

/// What one node did in a cold swarm pull.
#[derive(Debug, Clone)]
pub struct NodeResult {
    pub role: String,
    pub took: Option<Duration>,
    pub error: Option<String>,
    pub sent: u64,
    pub received: u64,
    pub upstream: u64,
    pub corrupt_pieces: u64,
    /// Piece requests this node's fill had turned away by a busy holder, and that failed
    /// otherwise (a "not here" included).
    pub busy_pieces: u64,
    pub failed_pieces: u64,
}

/// The whole run.
pub struct SwarmOutcome {
    pub nodes: Vec<NodeResult>,
    pub upstream_gets: u64,
    pub from_elsewhere: Vec<String>,
    /// Every 100 ms of the run: the time, and the bytes each node's link had carried into it
    /// so far (in the order of `nodes`).
    pub timeline: Vec<(Duration, Vec<u64>)>,
    /// The share of this machine's cores busy (not idle or waiting on I/O) during the run,
    /// from `/proc/stat`: every node, client and the links' packet work share them.
    pub cores_busy: f64,
}

/// This machine's CPU time so far from `/proc/stat`: (busy, all) in clock ticks.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    let all: u64 = ticks.iter().take(8).sum();
    // user nice system idle iowait irq softirq steal
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (all - idle, all)
}

impl SwarmOutcome {
    pub fn node(&self, role: &str) -> &NodeResult {
        self.nodes
            .iter()
            .find(|n| n.role == role)
            .unwrap_or_else(|| panic!("no result for {role}"))
    }

    pub fn table(&self) -> String {
        let mut out = String::from(
            "  node   time      sent MiB  received MiB  upstream MiB  corrupt  busy  failed\n",
        );
        for n in &self.nodes {
            out.push_str(&format!(
                "  {:<6} {:<9} {:>8.1}  {:>12.1}  {:>12.1}  {:>7}  {:>4}  {:>6}{}\n",
                n.role,
                n.took
                    .map_or("-".to_string(), |t| format!("{:.2} s", t.as_secs_f64())),
                n.sent as f64 / MIB as f64,
                n.received as f64 / MIB as f64,
                n.upstream as f64 / MIB as f64,
                n.corrupt_pieces,
                n.busy_pieces,
                n.failed_pieces,
                n.error
                    .as_ref()
                    .map_or(String::new(), |e| format!("  error: {e}")),
            ));
        }
        out
    }

    /// What each node's link carried into it, per half second of the run, in Mbit/s; and the
    /// share of a `mbit` link it used until its pull ended.
    pub fn downlinks(&self, mbit: u64) -> String {
        let mut out = String::from("  downlink Mbit/s per 0.5 s:\n     t");
        let Some((_, first)) = self.timeline.first() else {
            return out;
        };
        // The nodes that pulled (a warm run's owner, added after, has no samples).
        let pulled = &self.nodes[..first.len().min(self.nodes.len())];
        for n in pulled {
            out.push_str(&format!(" {:>6}", n.role));
        }
        out.push('\n');
        let step = Duration::from_millis(500);
        let at = |t: Duration| -> Option<&Vec<u64>> {
            self.timeline.iter().find(|(s, _)| *s >= t).map(|(_, v)| v)
        };
        let mut t = Duration::ZERO;
        let mut was = first;
        while let Some(now) = at(t + step) {
            out.push_str(&format!("  {:>4.1}", t.as_secs_f64()));
            for (a, b) in was.iter().zip(now) {
                let mbits = b.saturating_sub(*a) as f64 * 8.0 / 1e6 / step.as_secs_f64();
                out.push_str(&format!(" {mbits:>6.0}"));
            }
            out.push('\n');
            was = now;
            t += step;
        }
        out.push_str("  used until done:");
        for (k, n) in pulled.iter().enumerate() {
            let used = n.took.and_then(|took| {
                let end = at(took).or(self.timeline.last().map(|(_, v)| v))?;
                let bytes = end[k].saturating_sub(first[k]) as f64;
                Some(100.0 * bytes * 8.0 / (mbit as f64 * 1e6 * took.as_secs_f64()))
            });
            out.push_str(&match used {
                Some(u) => format!(" {} {u:.0} %", n.role),
                None => format!(" {} -", n.role),
            });
        }
        out.push('\n');
        out
    }
}

/// Push one layer of `mib` MiB to the upstream as `repo:v1` and return it.
pub async fn big_layer(c: &Cluster, repo: &str, mib: u64, seed: u64) -> Descriptor {
    let layout = write_layout(
        &c.tmp.path().join(format!("src-{seed}")),
        vec![(
            "v1",
            Entry::Image(ImageSpec::linux(
                "amd64",
                vec![LayerSpec::new("big.bin", mib * MIB, seed)],
            )),
        )],
    );
    let image = layout.image("v1").clone();
    c.upstream.push(&c.http, repo, "v1", &layout, &image).await;
    image.layers[0].blob.clone()
}

/// Where the clients of [`cold_swarm`] run.
#[derive(Clone, Copy)]
pub enum Clients {
    /// In the test process, outside the nodes' namespaces: each node's client download crosses
    /// the node's own link, beside what the node sends its peers.
    Outside,
    /// Inside each node's namespace, as containerd beside its node: the download stays on the
    /// host and the link carries only what nodes exchange.
    OnTheNode,
}

/// `GET <base>/v2/<repo>/blobs/<digest>` with curl inside the namespace `ns`, the body hashed
/// by OpenSSL there: Ok when it has the blob's digest.
async fn get_blob_in(ns: &str, base: &str, repo: &str, blob: &Descriptor) -> Result<(), String> {
    let url = format!("{base}/v2/{repo}/blobs/{}", blob.digest);
    // OpenSSL's SHA-256 (with the CPU's SHA extensions, as containerd's Go hashing has):
    // coreutils' sha256sum hashes at a fifth of that here, and six of them hashing at once
    // at the end of a pull took seconds of the two cores the nodes share.
    let script =
        format!("set -o pipefail; curl -sfS --max-time 120 '{url}' | openssl dgst -sha256 -r");
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", ns, "bash", "-c", &script])
        .output()
        .await
        .map_err(|e| format!("GET {url} in {ns}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let got = format!("sha256:{}", text.split_whitespace().next().unwrap_or(""));
    if !out.status.success() || got != blob.digest {
        return Err(format!(
            "GET {url} in {ns}: {} {got}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Every node of `roles` GETs `blobs` of `repo` (through its mirror, all blobs at once) at the
/// same moment; a
/// node in `kill` is SIGKILLed `kill_after` into the run. Returns per-node times (until the
/// node's last blob verified), bytes each node sent to and received from peers and from the
/// upstream, and the upstream's GETs of the blobs by its access log.
pub async fn cold_swarm(
    c: &Cluster,
    roles: &[&str],
    repo: &str,
    blobs: &[Descriptor],
    kill: Option<(&str, Duration)>,
    clients: Clients,
) -> SwarmOutcome {
    let from = c.upstream_accesses().len();
    let before: BTreeMap<String, crate::common::Metrics> = {
        let mut m = BTreeMap::new();
        for role in roles {
            let node = c.node(role);
            m.insert(
                role.to_string(),
                c.check(role, node.metrics(&c.http).await).await,
            );
        }
        m
    };
    let via = format!("{UPSTREAM}/{repo}");
    let started = Instant::now();
    let ticks = machine_ticks();
    let done = std::sync::atomic::AtomicBool::new(false);
    let sampler = async {
        let mut timeline = Vec::new();
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            let bytes = roles.iter().map(|r| c.net.received_bytes(r)).collect();
            timeline.push((started.elapsed(), bytes));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        timeline
    };
    let pulls = futures::future::join_all(roles.iter().map(|role| {
        let (http, base, via) = (c.http.clone(), c.node(role).url(), via.clone());
        let ns = c.net.host(role).ns.clone();
        async move {
            // All layers at once, as containerd pulls an image.
            let each = futures::future::join_all(blobs.iter().map(|b| async {
                match clients {
                    Clients::Outside => get_blob(&http, &base, &via, b).await,
                    Clients::OnTheNode => get_blob_in(&ns, &base, &via, b).await,
                }
            }))
            .await;
            each.into_iter().collect::<Result<Vec<()>, String>>()?;
            Ok::<_, String>(started.elapsed())
        }
    }));
    let killer = async {
        if let Some((victim, after)) = kill {
            tokio::time::sleep(after).await;
            c.node(victim).sigkill();
        }
    };
    let pulls = async {
        let results = pulls.await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        results
    };
    let (results, (), timeline) = tokio::join!(pulls, killer, sampler);
    let cores_busy = {
        let now = machine_ticks();
        (now.0 - ticks.0) as f64 / (now.1 - ticks.1).max(1) as f64
    };
    // docker-registry logs a request a moment after its last byte.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut nodes = Vec::new();
    for (role, r) in roles.iter().zip(results) {
        let killed = kill.is_some_and(|(v, _)| v == *role);
        let (sent, received, upstream, corrupt, busy, failed) = if killed {
            (0, 0, 0, 0, 0, 0)
        } else {
            let now = c.check(role, c.node(role).metrics(&c.http).await).await;
            let was = &before[*role];
            let d = |name: &str, labels: &[(&str, &str)]| {
                (now.sum(name, labels) - was.sum(name, labels)).max(0.0) as u64
            };
            (
                d("pier_peer_sent_bytes_total", &[]),
                d("pier_peer_received_bytes_total", &[]),
                d("pier_mirror_upstream_bytes_total", &[]),
                d("pier_swarm_pieces_total", &[("result", "corrupt")]),
                d("pier_swarm_pieces_total", &[("result", "busy")]),
                d("pier_swarm_pieces_total", &[("result", "failed")]),
            )
        };
        let (took, error) = match r {
            Ok(t) => (Some(t), None),
            Err(e) => (None, Some(e)),
        };
        nodes.push(NodeResult {
            role: role.to_string(),
            took,
            error,
            sent,
            received,
            upstream,
            corrupt_pieces: corrupt,
            busy_pieces: busy,
            failed_pieces: failed,
        });
    }
    let ips: Vec<_> = c.nodes.iter().map(|n| n.ip).collect();
    let counts = UpstreamCounts::of(&c.upstream_accesses()[from..], repo, &ips);
    let upstream_gets = blobs
        .iter()
        .map(|b| counts.gets_of(&format!("/v2/{repo}/blobs/{}", b.digest)))
        .sum();
    SwarmOutcome {
        nodes,
        upstream_gets,
        from_elsewhere: counts.from_elsewhere,
        timeline,
        cores_busy,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_cold_pull_with_a_killed_fetcher_and_a_corrupt_peer() {
    let Some(_one) = serial("swarm_cold_pull_with_a_killed_fetcher_and_a_corrupt_peer").await
    else {
        return;
    };
    let t0 = Instant::now();
    const ROLES: [&str; 6] = ["n1", "n2", "n3", "n4", "n5", "n6"];
    const MBIT: u32 = 400;
    let mut c = Cluster::new(6);
    let blob = big_layer(&c, "swarm/big", 160, 7300).await;
    // The coordinator must be honest (a swarm whose only source lies cannot finish); the
    // corrupt node and the victim are the two last in placement order.
    let order = ranked(&c, &blob.digest, &ROLES);
    let (owner, victim, corrupt) = (order[0].clone(), order[4].clone(), order[5].clone());
    let secret = c.secret.clone();
    for role in ROLES {
        if role == corrupt {
            c.start_member_with_env(role, &[("PIER_FAULT_CORRUPT_PIECES", "1")]);
        } else {
            c.start_node(role, crate::nodes::Membership::Secret(&secret));
        }
    }
    c.wait_all_alive(&ROLES, Duration::from_secs(20), "after start")
        .await;
    for role in ROLES.iter().chain(&["up"]) {
        c.net.limit_link(role, MBIT);
    }
    println!(
        "blob {} ({} MiB); coordinator {owner}, killed fetcher {victim}, corrupt peer {corrupt}; \
         links {MBIT} Mbit/s",
        blob.digest,
        blob.size / MIB
    );
    let outcome = cold_swarm(
        &c,
        &ROLES,
        "swarm/big",
        std::slice::from_ref(&blob),
        Some((&victim, Duration::from_millis(1500))),
        Clients::Outside,
    )
    .await;
    println!("{}", outcome.table());
    let mut wrong = Vec::new();
    for n in &outcome.nodes {
        if n.role != victim {
            if let Some(e) = &n.error {
                wrong.push(format!("{}: the pull failed: {e}", n.role));
            }
        }
    }
    if outcome.upstream_gets != 1 || !outcome.from_elsewhere.is_empty() {
        wrong.push(format!(
            "the upstream served the blob {} times (want 1); from outside the nodes: {:?}",
            outcome.upstream_gets, outcome.from_elsewhere
        ));
    }
    let upstream_bytes: u64 = outcome.nodes.iter().map(|n| n.upstream).sum();
    if upstream_bytes != blob.size {
        wrong.push(format!(
            "nodes received {upstream_bytes} bytes from the upstream, want exactly the blob's {}",
            blob.size
        ));
    }
    let fetched: u64 = outcome
        .nodes
        .iter()
        .filter(|n| n.role != owner)
        .map(|n| n.received)
        .sum();
    let owner_sent = outcome.node(&owner).sent;
    if owner_sent * 2 >= fetched {
        wrong.push(format!(
            "the coordinator {owner} uploaded {owner_sent} bytes of the {fetched} the others \
             received: not less than half, so the swarm did not carry the rest"
        ));
    }
    let detected: u64 = outcome.nodes.iter().map(|n| n.corrupt_pieces).sum();
    let corrupt_sent = outcome.node(&corrupt).sent;
    if corrupt_sent > 0 && detected == 0 {
        wrong.push(format!(
            "{corrupt} sent {corrupt_sent} bytes of corrupt pieces and no node counted a corrupt piece"
        ));
    }
    if corrupt_sent == 0 {
        wrong.push(format!(
            "{corrupt} (serving corrupt pieces) was never asked for one: the fault was not exercised"
        ));
    }
    // Every survivor holds the blob, and what it serves now from its store verifies.
    for role in ROLES.iter().filter(|r| **r != victim) {
        let node = c.node(role);
        if !node.holds_blob(&blob.digest) {
            wrong.push(format!("{role} does not hold the blob after its pull"));
            continue;
        }
        if let Err(e) = get_blob(&c.http, &node.url(), "upstream.test/swarm/big", &blob).await {
            wrong.push(format!("{role}'s stored copy: {e}"));
        }
    }
    if !wrong.is_empty() {
        c.fail(&format!(
            "the swarm pull went wrong:\n  {}",
            wrong.join("\n  ")
        ))
        .await;
    }
    println!(
        "swarm: {detected} corrupt pieces caught; coordinator sent {:.0} MiB of {:.0} MiB received \
         by the others; took {:?}",
        owner_sent as f64 / MIB as f64,
        fetched as f64 / MIB as f64,
        t0.elapsed()
    );
}

/// Whether `role` holds `digest` within a few seconds: a client may have the last byte of a
/// verified blob a moment before the node has committed it.
async fn holds_soon(c: &Cluster, role: &str, digest: &str) -> bool {
    let started = Instant::now();
    while !c.node(role).holds_blob(digest) {
        if started.elapsed() > Duration::from_secs(5) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Snapshots of `/metrics` of every node of `roles`.
async fn metrics_of(c: &Cluster, roles: &[&str]) -> BTreeMap<String, crate::common::Metrics> {
    let mut m = BTreeMap::new();
    for role in roles {
        let node = c.node(role);
        m.insert(
            role.to_string(),
            c.check(role, node.metrics(&c.http).await).await,
        );
    }
    m
}

/// How much `name` (with `labels`) grew on `role` between two snapshots.
fn grew(
    before: &BTreeMap<String, crate::common::Metrics>,
    after: &BTreeMap<String, crate::common::Metrics>,
    role: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> u64 {
    (after[role].sum(name, labels) - before[role].sum(name, labels)).max(0.0) as u64
}

/// POST a swarm report to `node`'s peer listener, signed as `signer` with the cluster's
/// secret, as a member would: the status and the answer's body.
async fn signed_report(
    c: &Cluster,
    node: &str,
    signer: &str,
    digest: &str,
    report: serde_json::Value,
) -> (reqwest::StatusCode, serde_json::Value) {
    let secret = pier_cluster::secret::ClusterSecret::from_file(&c.secret).expect("the secret");
    let path = format!("/peer/v1/swarm/{digest}");
    let resp = c
        .http
        .post(format!("{}{path}", c.node(node).peer_url()))
        .header(
            pier_cluster::secret::AUTH_HEADER,
            secret.sign("POST", &path, signer),
        )
        .json(&report)
        .timeout(Duration::from_secs(40))
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path} to {node}: {e}"));
    let code = resp.status();
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    (code, body)
}

/// A large hosted blob, pushed to its first owner only a moment before every other node pulls
/// it at once, is swarmed as a mirrored one is: every copy verifies, the nodes take pieces
/// from each other (the owner uploads less than half of what the others receive), and a
/// member's report for a repository the blob is not in gets no pieces (404), while one for
/// its own repository gets the piece digests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosted_blob_swarms_within_its_repository() {
    let Some(_one) = serial("a_hosted_blob_swarms_within_its_repository").await else {
        return;
    };
    hosted_swarm(0).await;
}

/// The same with the blob pushed to a node that does not own it (third in placement order):
/// every other node pulls it at once, while replication is only starting to bring it to its
/// owners, and the swarm (coordinated by the first owner, which fetches it from the pushed
/// node for the repository) still carries most of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosted_blob_pushed_to_a_node_that_does_not_own_it_swarms() {
    let Some(_one) = serial("a_hosted_blob_pushed_to_a_node_that_does_not_own_it_swarms").await
    else {
        return;
    };
    hosted_swarm(2).await;
}

/// A hosted blob that neither of its owners holds (both joined after it was pushed and
/// replicated to the owners of the time, with the `cluster` rule off so that it is on those
/// two nodes only, and re-replication has not reached the new owners yet) is still
/// swarmed: the members' reports make the first owner fetch it for the repository from a node
/// that stores it there, and it coordinates. Without that the owners answer 404 and every
/// puller streams the whole blob from a holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosted_blob_its_owners_lack_is_swarmed_by_the_first_owner() {
    let Some(_one) = serial("a_hosted_blob_its_owners_lack_is_swarmed_by_the_first_owner").await
    else {
        return;
    };
    let t0 = Instant::now();
    const ROLES: [&str; 6] = ["n1", "n2", "n3", "n4", "n5", "n6"];
    const MBIT: u32 = 400;
    let mut c = Cluster::new(6);
    // Hosted content goes to its owners only, not to every node (the `cluster` rule).
    c.toml = "[cluster]\nreplicate_all = false\n".into();
    // A layer whose two owners among all six are not n1, the node every other joins through:
    // those two start last.
    let (layout, order) = (7700u64..)
        .find_map(|seed| {
            let layout = write_layout(
                &c.tmp.path().join(format!("src-{seed}")),
                vec![(
                    "v1",
                    Entry::Image(ImageSpec::linux(
                        "amd64",
                        vec![LayerSpec::new("big.bin", 64 * MIB, seed)],
                    )),
                )],
            );
            let digest = layout.image("v1").layers[0].blob.digest.clone();
            let order = ranked(&c, &digest, &ROLES);
            (!order[..2].iter().any(|r| r == "n1")).then_some((layout, order))
        })
        .expect("some seed");
    let image = layout.image("v1").clone();
    let blob = image.layers[0].blob.clone();
    let (late, early) = (&order[..2], &order[2..]);
    let early: Vec<&str> = early.iter().map(String::as_str).collect();
    let secret = c.secret.clone();
    for role in &early {
        c.start_node(role, crate::nodes::Membership::Secret(&secret));
    }
    c.wait_all_alive(&early, Duration::from_secs(20), "the first four")
        .await;
    for role in ROLES {
        c.net.limit_link(role, MBIT);
    }
    // Pushed to the first owner among the four; replication brings it to the second.
    push_image(
        &c.http,
        &c.node(&order[2]).url(),
        "hosted/big",
        "v1",
        &layout,
        &image,
        Upload::Monolithic,
    )
    .await;
    let started = Instant::now();
    while !c.node(&order[3]).holds_blob(&blob.digest) {
        if started.elapsed() > Duration::from_secs(30) {
            c.fail(&format!("{} never got the pushed blob", order[3]))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for role in late {
        c.start_node(role, crate::nodes::Membership::Secret(&secret));
    }
    c.wait_all_alive(&ROLES, Duration::from_secs(20), "all six")
        .await;
    let pullers = [order[4].as_str(), order[5].as_str()];
    println!(
        "hosted blob {} ({} MiB) on {} and {}; owners {} and {} joined since; pullers {pullers:?}",
        blob.digest,
        blob.size / MIB,
        order[2],
        order[3],
        late[0],
        late[1]
    );
    let before = metrics_of(&c, &ROLES).await;
    let results = futures::future::join_all(pullers.iter().map(|role| {
        let (http, base) = (c.http.clone(), c.node(role).url());
        let blob = blob.clone();
        async move { get_blob(&http, &base, "hosted/big", &blob).await }
    }))
    .await;
    let after = metrics_of(&c, &ROLES).await;
    let mut wrong = Vec::new();
    for (role, r) in pullers.iter().zip(&results) {
        if let Err(e) = r {
            wrong.push(format!("{role}: the pull failed: {e}"));
        }
        if !holds_soon(&c, role, &blob.digest).await {
            wrong.push(format!("{role} does not hold the blob after its pull"));
        }
        if grew(&before, &after, role, "pier_swarm_fills_total", &[]) == 0 {
            wrong.push(format!("{role} did not take the blob from a swarm"));
        }
    }
    let fetched = grew(
        &before,
        &after,
        &order[0],
        "pier_peer_received_bytes_total",
        &[],
    );
    println!(
        "the first owner {} received {:.1} MiB while coordinating",
        order[0],
        fetched as f64 / MIB as f64
    );
    if !wrong.is_empty() {
        c.fail(&format!(
            "the swarm of a hosted blob its owners lacked went wrong:\n  {}",
            wrong.join("\n  ")
        ))
        .await;
    }
    println!("took {:?}", t0.elapsed());
}

/// [`a_hosted_blob_swarms_within_its_repository`], the blob pushed to the node `rank`th in
/// its placement order (0: its first owner, the swarm's coordinator).
async fn hosted_swarm(rank: usize) {
    let t0 = Instant::now();
    const ROLES: [&str; 5] = ["n1", "n2", "n3", "n4", "n5"];
    const MBIT: u32 = 400;
    let mut c = Cluster::new(5);
    let layout = write_layout(
        &c.tmp.path().join("src"),
        vec![(
            "v1",
            Entry::Image(ImageSpec::linux(
                "amd64",
                vec![LayerSpec::new("big.bin", 96 * MIB, 7500)],
            )),
        )],
    );
    let image = layout.image("v1").clone();
    let blob = image.layers[0].blob.clone();
    let order = ranked(&c, &blob.digest, &ROLES);
    // `owner`: the node the blob is pushed to, its only holder at first.
    let (coordinator, owner) = (order[0].clone(), order[rank].clone());
    c.start_members(&ROLES).await;
    for role in ROLES {
        c.net.limit_link(role, MBIT);
    }
    println!(
        "hosted blob {} ({} MiB) pushed to {owner} (rank {rank}), coordinated by its first owner \
         {coordinator}; links {MBIT} Mbit/s",
        blob.digest,
        blob.size / MIB
    );
    push_image(
        &c.http,
        &c.node(&owner).url(),
        "hosted/big",
        "v1",
        &layout,
        &image,
        Upload::Monolithic,
    )
    .await;
    let pullers: Vec<&str> = ROLES.iter().copied().filter(|r| *r != owner).collect();
    let before = metrics_of(&c, &ROLES).await;
    let results = futures::future::join_all(pullers.iter().map(|role| {
        let (http, base) = (c.http.clone(), c.node(role).url());
        let blob = blob.clone();
        async move { get_blob(&http, &base, "hosted/big", &blob).await }
    }))
    .await;
    let after = metrics_of(&c, &ROLES).await;
    let mut wrong = Vec::new();
    for (role, r) in pullers.iter().zip(&results) {
        if let Err(e) = r {
            wrong.push(format!("{role}: the pull failed: {e}"));
        }
        if !holds_soon(&c, role, &blob.digest).await {
            wrong.push(format!("{role} does not hold the blob after its pull"));
        }
    }
    let mut table = String::from(
        "  node   swarm fills  pieces ok  sent MiB  received MiB
",
    );
    let mut swarmed = 0;
    for role in ROLES {
        let fills = grew(&before, &after, role, "pier_swarm_fills_total", &[]);
        let ok = grew(
            &before,
            &after,
            role,
            "pier_swarm_pieces_total",
            &[("result", "ok")],
        );
        swarmed += usize::from(fills > 0);
        table.push_str(&format!(
            "  {role:<6} {fills:>11}  {ok:>9}  {:>8.1}  {:>12.1}
",
            grew(&before, &after, role, "pier_peer_sent_bytes_total", &[]) as f64 / MIB as f64,
            grew(&before, &after, role, "pier_peer_received_bytes_total", &[]) as f64 / MIB as f64,
        ));
    }
    println!("{table}");
    if swarmed < 2 {
        wrong.push(format!(
            "{swarmed} nodes took the hosted blob from a swarm (want every puller but at most one)"
        ));
    }
    let received: u64 = pullers
        .iter()
        .map(|r| grew(&before, &after, r, "pier_peer_received_bytes_total", &[]))
        .sum();
    let owner_sent = grew(&before, &after, &owner, "pier_peer_sent_bytes_total", &[]);
    if owner_sent * 2 >= received {
        wrong.push(format!(
 "{owner}, which the blob was pushed to, uploaded {owner_sent} bytes of the {received} the others received: not less than half, so no swarm carried the rest"
        ));
    }
    // The link is the permission: a report for another repository gets nothing; one for the
    // blob's own repository gets its piece digests.
    let member = pullers[0];
    let (code, body) = signed_report(
        &c,
        &coordinator,
        member,
        &blob.digest,
        serde_json::json!({ "repo": "other/app" }),
    )
    .await;
    if code != reqwest::StatusCode::NOT_FOUND {
        wrong.push(format!(
            "a report for other/app (the blob is only in hosted/big) was answered {code}: {body}"
        ));
    }
    let (code, body) = signed_report(
        &c,
        &coordinator,
        member,
        &blob.digest,
        serde_json::json!({ "repo": "hosted/big" }),
    )
    .await;
    let digests = body["digests"].as_array().map_or(0, Vec::len);
    if code != reqwest::StatusCode::OK || body["swarm"] != true || digests == 0 {
        wrong.push(format!(
            "a report for hosted/big was answered {code} with {digests} piece digests: {body}"
        ));
    }
    // And a client asking a node for the blob in a repository it is not in gets a 404, with
    // no swarm fill started for it.
    let before = metrics_of(&c, &[member]).await;
    let other = get_blob(&c.http, &c.node(member).url(), "other/app", &blob).await;
    let after = metrics_of(&c, &[member]).await;
    match other {
        Err(e) if e.contains("404") => {}
        other => wrong.push(format!(
            "GET other/app/blobs/{} on {member}: {other:?}, want a 404",
            blob.digest
        )),
    }
    if grew(&before, &after, member, "pier_swarm_fills_total", &[]) > 0 {
        wrong.push(format!("{member} swarmed the blob for other/app"));
    }
    if !wrong.is_empty() {
        c.fail(&format!(
            "the hosted swarm went wrong:\n  {}",
            wrong.join("\n  ")
        ))
        .await;
    }
    println!(
        "hosted swarm: {swarmed} nodes swarmed; owner sent {:.0} MiB of {:.0} MiB received; took {:?}",
        owner_sent as f64 / MIB as f64,
        received as f64 / MIB as f64,
        t0.elapsed()
    );
}

/// What [`coordinator_killed`] saw.
struct Takeover {
    c: Cluster,
    blob: Descriptor,
    next: String,
    /// Bytes the upstream sent the killed owner, and the other nodes.
    served_owner: u64,
    served_after: u64,
    /// Whole-blob GETs (no `Range`) the upstream answered the next owner.
    next_whole_gets: usize,
    wrong: Vec<String>,
}

/// Five nodes, 400 Mbit/s links, a 160 MiB layer pulled by three of them; the first owner,
/// coordinating the swarm, is killed 2 s in, and the next owner has no client pull, so it is
/// not fetching the blob when the members turn to it. With `lying`, every puller is started
/// with `PIER_FAULT_LYING_SEED=1`. Every pull must verify and every puller hold the blob.
async fn coordinator_killed(lying: bool) -> Takeover {
    const ROLES: [&str; 5] = ["n1", "n2", "n3", "n4", "n5"];
    const MBIT: u32 = 400;
    let mut c = Cluster::new(5);
    let blob = big_layer(&c, "swarm/takeover", 160, 7600).await;
    let order = ranked(&c, &blob.digest, &ROLES);
    let (owner, next) = (order[0].clone(), order[1].clone());
    let pullers: Vec<&str> = ROLES
        .iter()
        .copied()
        .filter(|r| *r != owner && *r != next)
        .collect();
    let secret = c.secret.clone();
    for role in ROLES {
        if lying && pullers.contains(&role) {
            c.start_member_with_env(role, &[("PIER_FAULT_LYING_SEED", "1")]);
        } else {
            c.start_node(role, crate::nodes::Membership::Secret(&secret));
        }
    }
    c.wait_all_alive(&ROLES, Duration::from_secs(20), "after start")
        .await;
    for role in ROLES.iter().chain(&["up"]) {
        c.net.limit_link(role, MBIT);
    }
    println!(
        "blob {} ({} MiB); coordinator {owner} (killed mid-swarm), next owner {next} (no client \
         pull), pullers {pullers:?}{}; links {MBIT} Mbit/s",
        blob.digest,
        blob.size / MIB,
        if lying {
            " (lying about piece digests)"
        } else {
            ""
        }
    );
    let from = c.upstream_accesses().len();
    let via = format!("{UPSTREAM}/swarm/takeover");
    let pulls = futures::future::join_all(pullers.iter().map(|role| {
        let (http, base, via) = (c.http.clone(), c.node(role).url(), via.clone());
        let blob = blob.clone();
        async move { get_blob(&http, &base, &via, &blob).await }
    }));
    let killer = async {
        // By then the owner has streamed over half the blob at the link's rate, and the
        // members hold part of it.
        tokio::time::sleep(Duration::from_millis(2000)).await;
        c.node(&owner).sigkill();
    };
    let (results, ()) = tokio::join!(pulls, killer);
    // docker-registry logs a request a moment after its last byte.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let path = format!("/v2/swarm/takeover/blobs/{}", blob.digest);
    let ip_of = |role: &str| c.net.host(role).ip.to_string();
    let (owner_ip, next_ip) = (ip_of(&owner), ip_of(&next));
    let (mut served_owner, mut served_after, mut next_whole_gets) = (0, 0, 0);
    let mut gets = Vec::new();
    for a in &c.upstream_accesses()[from..] {
        if a.method != "GET" || a.path != path {
            continue;
        }
        let ip = a.remote_addr.rsplit_once(':').map_or("", |(ip, _)| ip);
        gets.push(format!("{} bytes to {ip}", a.written));
        if ip == owner_ip {
            served_owner += a.written;
        } else {
            served_after += a.written;
        }
        if ip == next_ip && a.written == blob.size {
            next_whole_gets += 1;
        }
    }
    let mut wrong = Vec::new();
    for (role, r) in pullers.iter().zip(&results) {
        if let Err(e) = r {
            wrong.push(format!("{role}: the pull failed: {e}"));
        }
        if !holds_soon(&c, role, &blob.digest).await {
            wrong.push(format!("{role} does not hold the blob after its pull"));
        }
    }
    let mib = |b: u64| b as f64 / MIB as f64;
    println!(
        "upstream served {:.1} MiB to the killed owner and {:.1} MiB to the others ({} GETs: {gets:?})",
        mib(served_owner),
        mib(served_after),
        gets.len()
    );
    if served_owner == 0 || served_owner >= blob.size {
        wrong.push(format!(
            "the owner read {served_owner} bytes from the upstream before it was killed: the kill \
             did not land mid-swarm"
        ));
    }
    Takeover {
        c,
        blob,
        next,
        served_owner,
        served_after,
        next_whole_gets,
        wrong,
    }
}

/// The first owner coordinating a swarm is killed mid-swarm, and the next owner is not
/// fetching the blob (no client asks it): the members turn to it, and it takes the pieces
/// they hold from them and only the rest from the upstream. So the upstream serves the nodes
/// after the kill less than a whole blob (a next owner that refilled from byte 0 would take a
/// whole second copy), all of them less than two copies, and every pull verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_owner_that_was_not_fetching_takes_over_from_the_members_pieces() {
    let Some(_one) =
        serial("a_next_owner_that_was_not_fetching_takes_over_from_the_members_pieces").await
    else {
        return;
    };
    let t0 = Instant::now();
    let mut t = coordinator_killed(false).await;
    let size = t.blob.size;
    if t.served_after >= size {
        t.wrong.push(format!(
            "after the owner was killed the upstream served {} bytes, not less than the blob's \
             {size}: the next owner did not take the members' pieces",
            t.served_after
        ));
    }
    if t.served_owner + t.served_after >= 2 * size {
        t.wrong.push(format!(
            "the upstream served {} bytes in all, two copies of the blob or more",
            t.served_owner + t.served_after
        ));
    }
    if !t.wrong.is_empty() {
        t.c.fail(&format!(
            "the swarm takeover went wrong:\n  {}",
            t.wrong.join("\n  ")
        ))
        .await;
    }
    println!(
        "takeover: upstream bytes {:.2}x the blob; took {:?}",
        (t.served_owner + t.served_after) as f64 / size as f64,
        t0.elapsed()
    );
}

/// The same, with every member lying to the next owner about the piece digests (the fault
/// hook `PIER_FAULT_LYING_SEED=1`): the takeover fails on them, the next owner fills the blob
/// again from its upstream alone, every pull still verifies, and the next owner's stored copy
/// is the right blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_told_wrong_piece_digests_falls_back_to_a_clean_fill() {
    let Some(_one) = serial("a_takeover_told_wrong_piece_digests_falls_back_to_a_clean_fill").await
    else {
        return;
    };
    let t0 = Instant::now();
    let mut t = coordinator_killed(true).await;
    if t.next_whole_gets == 0 {
        t.wrong.push(format!(
            "{} never filled the blob from its upstream in one stream: the lie was not caught \
             or the fill did not fall back",
            t.next
        ));
    }
    let node = t.c.node(&t.next);
    if !holds_soon(&t.c, &t.next, &t.blob.digest).await {
        t.wrong.push(format!(
            "{} does not hold the blob after the fallback",
            t.next
        ));
    } else if let Err(e) = get_blob(
        &t.c.http,
        &node.url(),
        "upstream.test/swarm/takeover",
        &t.blob,
    )
    .await
    {
        t.wrong.push(format!("{}'s stored copy: {e}", t.next));
    }
    if !t.wrong.is_empty() {
        t.c.fail(&format!(
            "the lied-to takeover went wrong:\n  {}",
            t.wrong.join("\n  ")
        ))
        .await;
    }
    println!(
        "lied-to takeover: fell back ({} whole GETs by {}); upstream bytes {:.2}x the blob; took {:?}",
        t.next_whole_gets,
        t.next,
        (t.served_owner + t.served_after) as f64 / t.blob.size as f64,
        t0.elapsed()
    );
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One benchmark run's lines: completion times against the per-node minimum, upstream bytes
/// as a multiple of the content, uploads per node.
fn summary(name: &str, o: &SwarmOutcome, total: u64, mbit: u64, owner: &str) -> Vec<String> {
    let mut times: Vec<f64> = o
        .nodes
        .iter()
        .filter_map(|n| n.took.map(|t| t.as_secs_f64()))
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    let failed = o.nodes.iter().filter(|n| n.error.is_some()).count();
    let pick = |q: f64| -> f64 {
        if times.is_empty() {
            return f64::NAN;
        }
        times[((times.len() as f64 - 1.0) * q).round() as usize]
    };
    let minimum = total as f64 * 8.0 / (mbit as f64 * 1e6);
    let upstream: u64 = o.nodes.iter().map(|n| n.upstream).sum();
    let sent: Vec<u64> = o.nodes.iter().map(|n| n.sent).collect();
    let received: u64 = o
        .nodes
        .iter()
        .filter(|n| n.role != owner)
        .map(|n| n.received)
        .sum();
    let owner_sent = o
        .nodes
        .iter()
        .find(|n| n.role == owner)
        .map_or(0, |n| n.sent);
    vec![
        format!(
            "{name}: {} nodes, {} MiB, {mbit} Mbit/s links: completion p50 {:.2} s p99 {:.2} s max {:.2} s; \
             per-node minimum {:.2} s; p99/minimum {:.2}x{}",
            o.nodes.iter().filter(|n| n.took.is_some() || n.error.is_some()).count(),
            total / MIB,
            pick(0.5),
            pick(0.99),
            pick(1.0),
            minimum,
            pick(0.99) / minimum,
            if failed > 0 { format!("; {failed} pulls FAILED") } else { String::new() }
        ),
        format!(
            "{name}: upstream bytes {:.2}x the content ({} GETs); uploaded per node max {:.0} MiB min {:.0} MiB; \
             first owner {owner} uploaded {:.0} MiB = {:.0} % of what the others received",
            upstream as f64 / total as f64,
            o.upstream_gets,
            sent.iter().max().copied().unwrap_or(0) as f64 / MIB as f64,
            sent.iter().min().copied().unwrap_or(0) as f64 / MIB as f64,
            owner_sent as f64 / MIB as f64,
            100.0 * owner_sent as f64 / (received.max(1)) as f64,
        ),
    ]
}

/// A run's CPU line: seconds (user + system) per node, their sum, and the most any node that
/// pulled spent per GiB it received; the first owner apart (it also filled from upstream).
fn cpu_line(name: &str, cpu: &[(String, f64)], busy: f64, total: u64, owner: &str) -> String {
    let pullers: Vec<f64> = cpu
        .iter()
        .filter(|(r, _)| r != owner)
        .map(|(_, s)| *s)
        .collect();
    let max = pullers.iter().copied().fold(0.0, f64::max);
    let min = pullers.iter().copied().fold(f64::INFINITY, f64::min);
    let owner_s = cpu
        .iter()
        .find(|(r, _)| r == owner)
        .map_or(0.0, |(_, s)| *s);
    let sum: f64 = cpu.iter().map(|(_, s)| s).sum();
    let per_gib = |s: f64| pier_bench::cpu::per_gib(s, total).unwrap_or(f64::NAN);
    format!(
        "{name}: CPU per node (user+sys) max {max:.2} s min {:.2} s = {:.2} s/GiB received at most; \
         first owner {owner} {owner_s:.2} s ({:.2} s/GiB); all nodes {sum:.2} s; \
         the machine's cores {:.0} % busy",
        if min.is_finite() { min } else { 0.0 },
        per_gib(max),
        per_gib(owner_s),
        100.0 * busy,
    )
}

/// The swarm benchmark: `PIER_CLUSTER_BENCH_NODES` nodes (8) with links shaped to
/// `PIER_CLUSTER_BENCH_MBIT` (1000) both ways, the upstream too. Cold pull of one
/// `PIER_CLUSTER_BENCH_SWARM_MIB` (1024) layer on every node at once with swarming on, then
/// off (each node streams from the owner), then warm (the layer already on its two owners),
/// then a mixed image (four layers, 8/4/2/1 sixteenths of the size). Each run on a fresh
/// cluster. Prints and appends to `PIER_CLUSTER_BENCH_OUT`; asserts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_bench() {
    if std::env::var("PIER_CLUSTER_BENCH").as_deref() != Ok("1") {
        crate::skipped(
            "swarm_bench",
            "set PIER_CLUSTER_BENCH=1 (scripts/cluster-bench.sh does)",
        );
        return;
    }
    let Some(_one) = serial("swarm_bench").await else {
        return;
    };
    let nodes = env_number("PIER_CLUSTER_BENCH_NODES", 8) as usize;
    let mbit = env_number("PIER_CLUSTER_BENCH_MBIT", 1000);
    let mib = env_number("PIER_CLUSTER_BENCH_SWARM_MIB", 1024);
    // Clients beside their nodes (`node`, the default) or in the test process (`outside`,
    // where each node's own download shares its link with what it sends its peers).
    let clients = match std::env::var("PIER_CLUSTER_BENCH_CLIENTS").as_deref() {
        Ok("outside") => Clients::Outside,
        _ => Clients::OnTheNode,
    };
    let names: Vec<String> = (1..=nodes).map(|n| format!("n{n}")).collect();
    let roles: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut lines = Vec::new();
    // `PIER_CLUSTER_BENCH_RUNS=on,warm` runs only those (on, off, warm, mixed).
    let only = std::env::var("PIER_CLUSTER_BENCH_RUNS").unwrap_or_default();
    let wanted = |run: &str| {
        only.is_empty()
            || only.split(',').any(|w| match w.trim() {
                "on" => run == "cold, swarm on",
                "off" => run == "cold, swarm off",
                w => !w.is_empty() && run.starts_with(w),
            })
    };
    for run in [
        "cold, swarm on",
        "cold, swarm off",
        "warm (on 2 owners)",
        "mixed image",
    ]
    .into_iter()
    .filter(|r| wanted(r))
    {
        let mut c = Cluster::new(nodes);
        if run.contains("off") {
            c.extra.push("--no-swarm".into());
        }
        let blobs = if run == "mixed image" {
            let mut v = Vec::new();
            for (k, part) in [8u64, 4, 2, 1].iter().enumerate() {
                v.push(big_layer(&c, "bench/swarm", mib * part / 16, 7400 + k as u64).await);
            }
            v
        } else {
            vec![big_layer(&c, "bench/swarm", mib, 7400).await]
        };
        let secret = c.secret.clone();
        for role in &roles {
            c.start_node(role, crate::nodes::Membership::Secret(&secret));
        }
        c.wait_all_alive(&roles, Duration::from_secs(30), "after start")
            .await;
        for role in roles.iter().chain(&["up"]) {
            c.net.limit_link(role, mbit as u32);
        }
        let owner = ranked(&c, &blobs[0].digest, &roles)[0].clone();
        let mut pullers = roles.clone();
        if run.starts_with("warm") {
            // The layer's two owners fetch it first, one after the other; everyone else then
            // pulls at once.
            let owners: Vec<String> = ranked(&c, &blobs[0].digest, &roles)[..2].to_vec();
            for o in &owners {
                let r = get_blob(
                    &c.http,
                    &c.node(o).url(),
                    "upstream.test/bench/swarm",
                    &blobs[0],
                )
                .await;
                c.check(&format!("warming {o}"), r).await;
            }
            pullers.retain(|r| !owners.iter().any(|o| o == r));
        }
        let owner_before = c.check(&owner, c.node(&owner).metrics(&c.http).await).await;
        // Each node's CPU (user + system, read from /proc: every node shares this host's
        // cores, which is what bounds a swarm here).
        let cpu_before: Vec<(String, pier_bench::cpu::ServerCpu, f64)> = roles
            .iter()
            .filter_map(|r| {
                let cpu = pier_bench::cpu::ServerCpu::new(&[c.node(r).pid()]).ok()??;
                let before = cpu.seconds();
                Some((r.to_string(), cpu, before))
            })
            .collect();
        let mut o = cold_swarm(&c, &pullers, "bench/swarm", &blobs, None, clients).await;
        let cpu: Vec<(String, f64)> = cpu_before
            .iter()
            .map(|(r, cpu, before)| (r.clone(), cpu.seconds() - before))
            .collect();
        if !pullers.iter().any(|p| *p == owner) {
            // Warm: the owners served without pulling; count what the first sent meanwhile.
            let m = c.check(&owner, c.node(&owner).metrics(&c.http).await).await;
            let sent = m.sum("pier_peer_sent_bytes_total", &[])
                - owner_before.sum("pier_peer_sent_bytes_total", &[]);
            o.nodes.push(NodeResult {
                role: owner.clone(),
                took: None,
                error: None,
                sent: sent.max(0.0) as u64,
                received: 0,
                upstream: 0,
                corrupt_pieces: 0,
                busy_pieces: 0,
                failed_pieces: 0,
            });
        }
        println!("{run}:\n{}{}", o.table(), o.downlinks(mbit));
        let total: u64 = blobs.iter().map(|b| b.size).sum();
        lines.extend(summary(run, &o, total, mbit, &owner));
        lines.push(cpu_line(run, &cpu, o.cores_busy, total, &owner));
        for l in &lines[lines.len() - 3..] {
            println!("{l}");
        }
    }
    if let Ok(path) = std::env::var("PIER_CLUSTER_BENCH_OUT") {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
        for l in &lines {
            writeln!(f, "{l}").unwrap_or_else(|e| panic!("write {path}: {e}"));
        }
    }
}
