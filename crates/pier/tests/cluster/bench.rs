//! The cluster benchmark, on the tier's four namespaced nodes: how many requests a cold pull on
//! every node at once costs the upstream, single-stream GET throughput of a blob filled from a
//! peer over the veth links (and of the same blob once local), and failure detection times for
//! a kill, a hang and a partition: from the fault to the moment every other node's status
//! lists the victim dead, over several trials each, healing and waiting for all alive between
//! trials. It prints numbers and asserts none of them.
//!
//! Runs only with `PIER_CLUSTER_BENCH=1` (and what the tier needs); otherwise it prints
//! `SKIPPED`. `scripts/cluster-bench.sh` runs it in release mode. Knobs:
//! `PIER_CLUSTER_BENCH_TRIALS` (trials per fault, default 10), `PIER_CLUSTER_BENCH_BLOB_MIB`
//! (the peer-read blob, default 1024), `PIER_CLUSTER_BENCH_OUT` (a file the result lines are
//! appended to).

use std::io::Write as _;
use std::time::{Duration, Instant};

use crate::common::{
    push_image, write_layout, Entry, ImageSpec, LayerSpec, Upload, WrittenImage, MIB,
};
use crate::nodes::{pull_image, Cluster, Fault, UpstreamCounts, FOUR, UPSTREAM};
use crate::{serial, skipped};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The result lines: printed as they come, appended to `PIER_CLUSTER_BENCH_OUT` at the end.
struct Results(Vec<String>);

impl Results {
    fn line(&mut self, text: String) {
        println!("{text}");
        self.0.push(text);
    }

    fn save(&self) {
        let Ok(path) = std::env::var("PIER_CLUSTER_BENCH_OUT") else {
            return;
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
        for l in &self.0 {
            writeln!(f, "{l}").unwrap_or_else(|e| panic!("write {path}: {e}"));
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn rate(bytes: u64, d: Duration) -> String {
    let per_s = bytes as f64 / d.as_secs_f64().max(1e-9);
    if per_s >= 1e9 {
        format!("{:.2} GB/s", per_s / 1e9)
    } else {
        format!("{:.0} MB/s", per_s / 1e6)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench() {
    if std::env::var("PIER_CLUSTER_BENCH").as_deref() != Ok("1") {
        skipped(
            "bench",
            "set PIER_CLUSTER_BENCH=1 (scripts/cluster-bench.sh does)",
        );
        return;
    }
    let Some(_one) = serial("bench").await else {
        return;
    };
    let trials = env_number("PIER_CLUSTER_BENCH_TRIALS", 10) as usize;
    let blob_mib = env_number("PIER_CLUSTER_BENCH_BLOB_MIB", 1024);
    let mut out = Results(Vec::new());
    let mut c = Cluster::new(4);
    c.start_members(&FOUR).await;

    cold_pull_requests(&c, &mut out).await;
    peer_throughput(&c, blob_mib, &mut out).await;
    for fault in Fault::ALL {
        detection(&mut c, fault, trials, &mut out).await;
    }
    out.save();
}

/// Every node pulls one new image at once through its pier; the upstream's access log says
/// what that cost it.
async fn cold_pull_requests(c: &Cluster, out: &mut Results) {
    let layout = write_layout(
        &c.tmp.path().join("bench-src"),
        vec![(
            "v1",
            Entry::Image(ImageSpec::linux(
                "amd64",
                (1..=4)
                    .map(|i| LayerSpec::new(&format!("layer{i}.bin"), 8 * MIB, 7000 + i))
                    .collect(),
            )),
        )],
    );
    let image = layout.image("v1").clone();
    c.upstream
        .push(&c.http, "bench/cold", "v1", &layout, &image)
        .await;
    let from = c.upstream_accesses().len();
    let via = format!("{UPSTREAM}/bench/cold");
    let started = Instant::now();
    let pulls = futures::future::join_all(FOUR.map(|role| {
        let (http, base, via, image) = (c.http.clone(), c.node(role).url(), via.clone(), &image);
        async move { (role, pull_image(&http, &base, &via, "v1", image).await) }
    }))
    .await;
    let took = started.elapsed();
    for (role, r) in pulls {
        c.check(&format!("cold pull on {role}"), r).await;
    }
    // docker-registry logs a request a moment after its last byte.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let nodes: Vec<_> = c.nodes.iter().map(|n| n.ip).collect();
    let counts = UpstreamCounts::of(&c.upstream_accesses()[from..], "bench/cold", &nodes);
    let sum = |m: &std::collections::BTreeMap<String, u64>, kind: &str| -> u64 {
        m.iter()
            .filter(|(p, _)| p.contains(kind))
            .map(|(_, n)| n)
            .sum()
    };
    out.line(format!(
        "cold pull on 4 nodes at once ({} blobs, {} MiB): upstream GETs: blobs {} manifests {} \
         (HEADs: manifests {}); {}",
        image.blobs().len(),
        image.blobs().iter().map(|b| b.size).sum::<u64>() / MIB,
        sum(&counts.gets, "/blobs/"),
        sum(&counts.gets, "/manifests/"),
        sum(&counts.heads, "/manifests/"),
        secs(took),
    ));
}

/// A large blob pushed to n1, then read from the main listener of a node that does not hold
/// it (filled from a peer over the veth), then read again there (local).
async fn peer_throughput(c: &Cluster, blob_mib: u64, out: &mut Results) {
    let layout = write_layout(
        &c.tmp.path().join("bench-big"),
        vec![(
            "v1",
            Entry::Image(ImageSpec::linux(
                "amd64",
                vec![LayerSpec::new("big.bin", blob_mib * MIB, 7100)],
            )),
        )],
    );
    let image: WrittenImage = layout.image("v1").clone();
    let blob = image.layers[0].blob.clone();
    push_image(
        &c.http,
        &c.node("n1").url(),
        "bench/big",
        "v1",
        &layout,
        &image,
        Upload::Monolithic,
    )
    .await;
    // Background replication copies the blob to its owners: wait until the set of holders has
    // not changed for 3 s, then read from a node outside it.
    let holders = || -> Vec<String> {
        c.nodes
            .iter()
            .filter(|n| n.holds_blob(&blob.digest))
            .map(|n| n.role.clone())
            .collect()
    };
    let (mut last, mut since) = (holders(), Instant::now());
    let settle = Instant::now();
    while since.elapsed() < Duration::from_secs(3) && settle.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = holders();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    let Some(reader) = FOUR.iter().find(|r| !last.iter().any(|h| h == *r)) else {
        out.line(format!(
            "peer GET: every node holds the blob after replication ({last:?}): nothing to measure"
        ));
        return;
    };
    let url = format!(
        "{}/v2/bench/big/blobs/{}",
        c.node(reader).url(),
        blob.digest
    );
    let mut reads = Vec::new();
    for which in ["peer", "local"] {
        match timed_get(&c.http, &url, blob.size).await {
            Ok(took) => reads.push(took),
            Err(e) => {
                out.line(format!("{which} GET on {reader}: failed: {e}"));
                return;
            }
        }
    }
    out.line(format!(
        "peer GET {} MiB on {reader} (held by {last:?}), single stream: {} ({})",
        blob.size / MIB,
        rate(blob.size, reads[0]),
        secs(reads[0])
    ));
    out.line(format!(
        "local GET {} MiB on {reader}, single stream: {} ({})",
        blob.size / MIB,
        rate(blob.size, reads[1]),
        secs(reads[1])
    ));
}

/// How long a `GET url` of `size` bytes took, counting (not hashing, which would be the
/// bottleneck) the bytes.
async fn timed_get(http: &reqwest::Client, url: &str, size: u64) -> Result<Duration, String> {
    let started = Instant::now();
    let mut resp = http.get(url).send().await.map_err(|e| e.to_string())?;
    if resp.status() != reqwest::StatusCode::OK {
        let status = resp.status();
        return Err(format!(
            "{status}: {}",
            resp.text().await.unwrap_or_default()
        ));
    }
    let mut len = 0u64;
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        len += chunk.len() as u64;
    }
    if len != size {
        return Err(format!("{len} bytes, not {size}"));
    }
    Ok(started.elapsed())
}

/// `trials` times: take a node down by `fault`, time until every other node lists it dead,
/// then repair it and wait until all list it alive again.
async fn detection(c: &mut Cluster, fault: Fault, trials: usize, out: &mut Results) {
    let mut times = Vec::new();
    let mut misses = 0;
    for t in 0..trials {
        let victim = ["n2", "n3", "n4"][t % 3];
        let observers: Vec<&str> = FOUR.iter().copied().filter(|r| *r != victim).collect();
        let at = Instant::now();
        c.inject(fault, victim);
        match c
            .wait_dead(victim, &observers, at, Duration::from_secs(30))
            .await
        {
            Ok(d) => times.push(d),
            Err(e) => {
                misses += 1;
                println!("detect {}: trial {t}: {e}", fault.name());
            }
        }
        c.repair(fault, victim);
        c.wait_all_alive(
            &FOUR,
            Duration::from_secs(30),
            &format!("after repairing {victim} ({})", fault.name()),
        )
        .await;
    }
    times.sort();
    let line = match (times.get(times.len() / 2), times.last()) {
        (Some(p50), Some(max)) => format!(
            "detect {}: p50 {} max {} ({} trials{})",
            fault.name(),
            secs(*p50),
            secs(*max),
            times.len(),
            if misses > 0 {
                format!(", {misses} not detected within 30 s")
            } else {
                String::new()
            }
        ),
        _ => format!(
            "detect {}: never detected within 30 s ({misses} trials)",
            fault.name()
        ),
    };
    out.line(line);
}
