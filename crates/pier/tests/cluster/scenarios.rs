//! What a cluster of pier nodes promises its users, each checked on four real nodes (five for
//! the wrong secret): a cold pull on every node at once costs the upstream one fetch of each
//! blob and manifest; a node killed, hung or cut off during pulls fails no pull and is seen
//! dead by the others within seconds, then comes back; hosted content outlives the node it was
//! pushed to; a node without the secret can neither join nor fetch; and a tag pulled once keeps
//! being served on every node while the upstream is down.
//!
//! A failing scenario says what it expected, then prints every node's status, the upstream's
//! access log and the tail of each node's log.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;

use crate::common::clients::{oci_ref, Containerd, Skopeo};
use crate::common::{
    assert_same_blobs, error_code, push_image, put_manifest, write_layout, Entry, ImageSpec,
    LayerSpec, Layout, Upload, WrittenImage, WrittenIndex, KIB, MIB, OCI_INDEX,
};
use crate::nodes::{
    get_blob, get_manifest, hosts_dir, local_pier, pull_image, Cluster, Fault, Membership,
    UpstreamCounts, FOUR, MAIN_PORT, REPLICAS, UPSTREAM,
};
use crate::serial;

/// How long the other nodes may take to list a lost node as dead.
const DETECT_LIMIT: Duration = Duration::from_secs(10);
/// How long a healed or restarted node may take to be listed alive by every node again.
const REJOIN_LIMIT: Duration = Duration::from_secs(20);

/// A one-image layout tagged `v1` in `dir`.
fn one_image(dir: &Path, layers: Vec<LayerSpec>) -> (Layout, WrittenImage) {
    let layout = write_layout(
        dir,
        vec![("v1", Entry::Image(ImageSpec::linux("amd64", layers)))],
    );
    let image = layout.image("v1").clone();
    (layout, image)
}

/// Run `f`, turning a panic (a failed assertion inside a client wrapper) into an error, so that the
/// scenario can fail with the cluster's report.
async fn caught<T>(f: impl Future<Output = T>) -> Result<T, String> {
    AssertUnwindSafe(f)
        .catch_unwind()
        .await
        .map_err(|p| panic_text(p.as_ref()))
}

fn panic_text(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// skopeo inside `role`'s namespace, its files (and the copies it makes) under `dir`.
fn skopeo_in(c: &Cluster, role: &str, dir: &Path) -> Skopeo {
    std::fs::create_dir_all(dir).expect("create the skopeo dir");
    Skopeo::in_netns(dir, &c.net.host(role).ns)
}

/// `skopeo copy` of the linux/amd64 image of `src` into a fresh OCI layout `dest`, whatever
/// the platform the test runs on.
async fn skopeo_copy_amd64(skopeo: &Skopeo, src: &str, dest: &Path) {
    let dest = oci_ref(&skopeo.writable_dir(dest), "v1");
    skopeo
        .run(&[
            "--override-os",
            "linux",
            "--override-arch",
            "amd64",
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            src,
            &dest,
        ])
        .await;
}

/// The upstream's account of `repo` since access number `from`, once it has logged a GET of
/// every path in `want` (it logs a request a moment after its last byte) or 5 s passed.
async fn upstream_counts(c: &Cluster, from: usize, repo: &str, want: &[String]) -> UpstreamCounts {
    let nodes: Vec<_> = c.nodes.iter().map(|n| n.ip).collect();
    let started = Instant::now();
    loop {
        let all = c.upstream_accesses();
        let counts = UpstreamCounts::of(all.get(from..).unwrap_or_default(), repo, &nodes);
        if want.iter().all(|p| counts.gets_of(p) > 0) || started.elapsed() > Duration::from_secs(5)
        {
            return counts;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Push every image of `index` by digest, then the index as `repo:tag`, to the upstream.
async fn push_index_upstream(
    c: &Cluster,
    repo: &str,
    tag: &str,
    layout: &Layout,
    index: &WrittenIndex,
) {
    let base = c.upstream_url();
    for image in &index.images {
        let digest = image.manifest.digest.clone();
        push_image(
            &c.http,
            &base,
            repo,
            &digest,
            layout,
            image,
            Upload::PostThenPut,
        )
        .await;
    }
    put_manifest(&c.http, &base, repo, tag, OCI_INDEX, &index.index_bytes).await;
}

/// `local/peer/upstream` bytes each node says it served.
async fn served_table(c: &Cluster) -> String {
    let mut lines = Vec::new();
    for node in c.nodes.iter().filter(|n| n.running()) {
        let line = match c.status(&node.role).await {
            Ok(s) => format!(
                "  {}: local {} peer {} upstream {}",
                node.role,
                s.served_bytes("local"),
                s.served_bytes("peer"),
                s.served_bytes("upstream")
            ),
            Err(e) => format!("  {}: {e}", node.role),
        };
        lines.push(line);
    }
    lines.join("\n")
}

// ---------------------------------------------------------------------------------------------
// 1. Cold pull everywhere at once
// ---------------------------------------------------------------------------------------------

/// Four nodes pull the same new image at the same moment, two with containerd and two with
/// skopeo, each through its local pier: all get the right content, and the upstream serves each
/// blob and each manifest once for the whole cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_pull_everywhere_at_once() {
    let Some(_one) = serial("cold_pull_everywhere_at_once").await else {
        return;
    };
    let t0 = Instant::now();
    let mut c = Cluster::new(4);
    let layout = write_layout(
        &c.tmp.path().join("src"),
        vec![(
            "v1",
            Entry::Index(vec![
                ImageSpec::linux(
                    "amd64",
                    vec![
                        LayerSpec::new("etc/base.conf", MIB + 17, 1101),
                        LayerSpec::new("usr/lib/libapp.so", 2 * MIB + 5, 1102),
                        LayerSpec::new("usr/bin/app", 4 * MIB + 3, 1103),
                        LayerSpec::new("srv/data.bin", 8 * MIB, 1104),
                    ],
                ),
                ImageSpec::linux("arm64", vec![LayerSpec::new("usr/bin/app", MIB, 1105)]),
            ]),
        )],
    );
    let index = layout.index("v1").clone();
    let amd64 = index.images[0].clone();
    push_index_upstream(&c, "team/app", "v1", &layout, &index).await;
    let pushed = c.upstream_accesses().len();

    c.start_members(&FOUR).await;
    let hosts = hosts_dir(
        &c.tmp.path().join("hosts"),
        &local_pier(),
        &c.upstream_url(),
    );
    let ctrd1 = Containerd::start_in_netns(&c.tmp.path().join("n1-ctrd"), &c.net.host("n1").ns);
    let ctrd2 = Containerd::start_in_netns(&c.tmp.path().join("n2-ctrd"), &c.net.host("n2").ns);
    let sk3 = skopeo_in(&c, "n3", &c.tmp.path().join("n3-skopeo"));
    let sk4 = skopeo_in(&c, "n4", &c.tmp.path().join("n4-skopeo"));
    let (copy3, copy4) = (c.tmp.path().join("n3-copy"), c.tmp.path().join("n4-copy"));

    let reference = format!("{UPSTREAM}/team/app:v1");
    let src = format!("docker://127.0.0.1:{MAIN_PORT}/{UPSTREAM}/team/app:v1");
    let started = Instant::now();
    let (r1, r2, r3, r4) = tokio::join!(
        caught(ctrd1.pull(&hosts, &reference)),
        caught(ctrd2.pull(&hosts, &reference)),
        caught(skopeo_copy_amd64(&sk3, &src, &copy3)),
        caught(skopeo_copy_amd64(&sk4, &src, &copy4)),
    );
    let took = started.elapsed();
    for (who, r) in [
        ("containerd on n1", r1.map(drop)),
        ("containerd on n2", r2.map(drop)),
        ("skopeo on n3", r3),
        ("skopeo on n4", r4),
    ] {
        c.check(
            &format!("{who} pulling {reference} at once with the others"),
            r,
        )
        .await;
    }
    println!("4 cold pulls at once took {took:?}");
    ctrd1.assert_unpacked(&amd64);
    ctrd2.assert_unpacked(&amd64);
    assert_same_blobs(&layout, &copy3, &amd64.digests());
    assert_same_blobs(&layout, &copy4, &amd64.digests());

    let blob_paths: Vec<String> = amd64
        .blob_digests()
        .iter()
        .map(|d| format!("/v2/team/app/blobs/{d}"))
        .collect();
    let counts = upstream_counts(&c, pushed, "team/app", &blob_paths).await;
    println!(
        "upstream requests for the cold pull on 4 nodes:\n{}",
        counts.table()
    );
    println!("bytes served by source:\n{}", served_table(&c).await);
    if !counts.from_elsewhere.is_empty() {
        c.fail(&format!(
            "requests reached the upstream from outside the nodes (a client fell back to it): \
             {:?}",
            counts.from_elsewhere
        ))
        .await;
    }
    let mut wrong = Vec::new();
    for path in &blob_paths {
        if counts.gets_of(path) != 1 {
            wrong.push(format!("{path}: {} GETs", counts.gets_of(path)));
        }
    }
    let by = |r: &str| format!("/v2/team/app/manifests/{r}");
    let index_gets = counts.gets_of(&by("v1")) + counts.gets_of(&by(&index.index.digest));
    if index_gets != 1 {
        wrong.push(format!(
            "the index (by tag v1 or by digest): {index_gets} GETs"
        ));
    }
    let manifest_gets = counts.gets_of(&by(&amd64.manifest.digest));
    if manifest_gets != 1 {
        wrong.push(format!(
            "the amd64 manifest {}: {manifest_gets} GETs",
            amd64.manifest.digest
        ));
    }
    if !wrong.is_empty() {
        c.fail(&format!(
            "the upstream did not serve each blob and manifest exactly once for the cluster:\n  \
             {}",
            wrong.join("\n  ")
        ))
        .await;
    }
    println!("cold_pull_everywhere_at_once took {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 2. Node loss during pulls
// ---------------------------------------------------------------------------------------------

/// Pull `image` through `base`: the manifest, then the blobs starting at `first` (so that
/// pullers on different nodes start on different blobs), counting each finished blob in
/// `done`.
async fn counted_pull(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    image: &WrittenImage,
    first: usize,
    done: &AtomicUsize,
) -> Result<(), String> {
    get_manifest(http, base, repo, "v1", &image.manifest_bytes).await?;
    let blobs = image.blobs();
    for i in 0..blobs.len() {
        get_blob(http, base, repo, blobs[(first + i) % blobs.len()]).await?;
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// For each of SIGKILL, SIGSTOP and a partition: a new image is pulled on three nodes at once
/// while the fourth is taken down mid-way. Every pull succeeds with the right bytes, the three
/// list the victim dead within [`DETECT_LIMIT`], and once repaired the victim is alive on all
/// and serves the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_loss_during_pulls() {
    let Some(_one) = serial("node_loss_during_pulls").await else {
        return;
    };
    let t0 = Instant::now();
    let mut c = Cluster::new(4);
    // A slow uplink: the large layer takes seconds to arrive, so the fault lands mid-pull.
    c.net.limit_rate("up", 200);
    c.start_members(&FOUR).await;
    for (k, (fault, victim)) in [
        (Fault::Kill, "n2"),
        (Fault::Hang, "n3"),
        (Fault::Partition, "n4"),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 2000 + 100 * k as u64;
        let mut layers = vec![LayerSpec::new("srv/large.bin", 64 * MIB, seed)];
        layers.extend((1..=6).map(|i| LayerSpec::new(&format!("lib/part{i}"), 2 * MIB, seed + i)));
        let (layout, image) =
            one_image(&c.tmp.path().join(format!("src-{}", fault.name())), layers);
        let repo = format!("team/loss-{}", fault.name());
        c.upstream.push(&c.http, &repo, "v1", &layout, &image).await;
        let pullers: Vec<&str> = FOUR.iter().copied().filter(|r| *r != victim).collect();
        let via = format!("{UPSTREAM}/{repo}");

        let done = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let pulls = futures::future::join_all(pullers.iter().enumerate().map(|(i, role)| {
            let base = c.node(role).url();
            let (http, via, image, done) = (c.http.clone(), via.clone(), &image, done.clone());
            async move {
                let r = counted_pull(&http, &base, &via, image, 2 * i, &done).await;
                (*role, r, started.elapsed())
            }
        }));
        let fault_then_detect = async {
            while done.load(Ordering::Relaxed) < 2 {
                if started.elapsed() > Duration::from_secs(60) {
                    return (None, Err("the pulls made no progress in 60 s".to_string()));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let at = started.elapsed();
            c.inject(fault, victim);
            let since = Instant::now();
            (
                Some(at),
                c.wait_dead(victim, &pullers, since, DETECT_LIMIT).await,
            )
        };
        let (results, (fault_at, detected)) = tokio::join!(pulls, fault_then_detect);

        let failed: Vec<String> = results
            .iter()
            .filter_map(|(role, r, t)| {
                r.as_ref()
                    .err()
                    .map(|e| format!("{role} (after {t:?}): {e}"))
            })
            .collect();
        let fault_at = fault_at.map_or("never".to_string(), |t| format!("{t:?}"));
        if !failed.is_empty() {
            c.fail(&format!(
                "{} of {victim} at {fault_at} into the pulls: pulls failed:\n  {}",
                fault.name(),
                failed.join("\n  ")
            ))
            .await;
        }
        let detected = c
            .check(
                &format!("{} of {victim} at {fault_at} into the pulls", fault.name()),
                detected,
            )
            .await;
        let durations: Vec<String> = results
            .iter()
            .map(|(role, _, t)| format!("{role} {t:.2?}"))
            .collect();
        println!(
            "{} {victim} at {fault_at}: pulls all succeeded ({}); every other node listed it \
             dead after {detected:.2?}",
            fault.name(),
            durations.join(", ")
        );

        c.repair(fault, victim);
        let back = c
            .wait_all_alive(&FOUR, REJOIN_LIMIT, &format!("after repairing {victim}"))
            .await;
        let served = pull_image(&c.http, &c.node(victim).url(), &via, "v1", &image).await;
        c.check(&format!("pull from {victim} once it is back"), served)
            .await;
        println!("{victim} alive on all again after {back:.2?} and serves the image");
    }
    println!("node_loss_during_pulls took {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 3. Hosted content survives node loss
// ---------------------------------------------------------------------------------------------

/// An image pushed to node A is replicated in the background; once A is killed it is still
/// pulled, with fresh client caches, from the node that pulled it before and from one that
/// never did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosted_content_survives_node_loss() {
    let Some(_one) = serial("hosted_content_survives_node_loss").await else {
        return;
    };
    let t0 = Instant::now();
    let mut c = Cluster::new(4);
    c.start_members(&FOUR).await;
    let (layout, image) = one_image(
        &c.tmp.path().join("src"),
        vec![
            LayerSpec::new("etc/hosted.conf", 5 * KIB, 3101),
            LayerSpec::new("usr/bin/hosted", 4 * MIB + 9, 3102),
            LayerSpec::new("srv/hosted.bin", 8 * MIB, 3103),
        ],
    );
    let a = c.node("n1").url();
    push_image(
        &c.http,
        &a,
        "hosted/app",
        "v1",
        &layout,
        &image,
        Upload::Monolithic,
    )
    .await;

    // Background replication: every blob reaches another node than A (its owners hold it).
    let started = Instant::now();
    loop {
        let holders: Vec<(String, Vec<&str>)> = image
            .blob_digests()
            .into_iter()
            .map(|d| {
                let on = c
                    .nodes
                    .iter()
                    .filter(|n| n.holds_blob(&d))
                    .map(|n| n.role.as_str())
                    .collect();
                (d, on)
            })
            .collect();
        let replicated = holders
            .iter()
            .all(|(_, on)| on.iter().filter(|r| **r != "n1").count() >= REPLICAS as usize - 1);
        if replicated {
            println!("replicated after {:.2?}: {holders:?}", started.elapsed());
            break;
        }
        if started.elapsed() > Duration::from_secs(20) {
            c.fail(&format!(
                "20 s after the push to n1, not every blob is on another node (holders: \
                 {holders:?})"
            ))
            .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let reference = format!("docker://127.0.0.1:{MAIN_PORT}/hosted/app:v1");
    let sk4 = skopeo_in(&c, "n4", &c.tmp.path().join("n4-skopeo"));
    let before = caught(skopeo_copy_amd64(
        &sk4,
        &reference,
        &c.tmp.path().join("n4-before"),
    ))
    .await;
    c.check("skopeo on n4 pulling hosted/app:v1 while n1 is up", before)
        .await;
    assert_same_blobs(&layout, &c.tmp.path().join("n4-before"), &image.digests());

    c.node_mut("n1").kill();
    for role in ["n4", "n3"] {
        let dir = c.tmp.path().join(format!("{role}-after"));
        let sk = skopeo_in(&c, role, &c.tmp.path().join(format!("{role}-skopeo-after")));
        let r = caught(skopeo_copy_amd64(&sk, &reference, &dir)).await;
        c.check(
            &format!("skopeo on {role} pulling hosted/app:v1 right after n1 was killed"),
            r,
        )
        .await;
        assert_same_blobs(&layout, &dir, &image.digests());
    }
    println!("hosted_content_survives_node_loss took {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 4. Wrong secret
// ---------------------------------------------------------------------------------------------

/// A fifth node with another secret joins n1: no member ever lists it, it lists only itself,
/// and peer requests without a valid signature, or replayed, are refused with 401 (and counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_neither_joins_nor_fetches() {
    let Some(_one) = serial("wrong_secret_neither_joins_nor_fetches").await else {
        return;
    };
    let t0 = Instant::now();
    let mut c = Cluster::new(5);
    c.start_members(&FOUR).await;
    let before = c
        .check("metrics of n1", c.node("n1").metrics(&c.http).await)
        .await;
    let other = c.tmp.path().join("other.secret");
    std::fs::write(&other, "not the secret of this cluster at all\n").expect("write secret");
    c.start_node("n5", Membership::Secret(&other));

    // Several gossip rounds: n5 never shows up anywhere but in its own view.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(6) {
        for role in FOUR {
            let s = c
                .check(&format!("status of {role}"), c.status(role).await)
                .await;
            if s.state_of("n5").is_some() {
                c.fail(&format!(
                    "{role} lists n5, which has another secret, after {:.2?}: {}",
                    watch.elapsed(),
                    s.view()
                ))
                .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let own = c.check("status of n5", c.status("n5").await).await;
    let names: Vec<String> = own.members().into_iter().map(|(n, _)| n).collect();
    if names != ["n5"] {
        c.fail(&format!(
            "n5 (wrong secret) should list only itself, it lists: {}",
            own.view()
        ))
        .await;
    }

    // The peer port refuses unsigned and wrongly signed requests; the main listener has no
    // peer API at all.
    let path = format!("/peer/v1/blobs/sha256:{}", "0".repeat(64));
    let n1 = c.node("n1");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let forged = format!("n5;{now};{}", "ab".repeat(32));
    for (what, signature) in [("unsigned", None), ("wrongly signed", Some(forged))] {
        let url = format!("{}{path}", n1.peer_url());
        let mut req = c.http.get(&url).timeout(Duration::from_secs(5));
        if let Some(sig) = &signature {
            req = req.header("x-pier-peer-auth", sig);
        }
        let resp = c
            .check(
                what,
                req.send().await.map_err(|e| format!("GET {url}: {e}")),
            )
            .await;
        let code = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        if code != reqwest::StatusCode::UNAUTHORIZED || error_code(&body) != "UNAUTHORIZED" {
            c.fail(&format!(
                "{what} GET {url}: want 401 with the OCI code UNAUTHORIZED, got {code}: {}",
                String::from_utf8_lossy(&body)
            ))
            .await;
        }
    }
    // A request signed with the cluster's own secret is accepted once: the same request
    // captured and sent again within the allowed skew is refused.
    let secret = pier_cluster::secret::ClusterSecret::from_file(&c.secret).expect("the secret");
    let health = "/peer/v1/health";
    let captured = secret.sign("GET", health, "n2");
    for (what, want) in [
        ("a signed request", reqwest::StatusCode::OK),
        (
            "the same signed request replayed",
            reqwest::StatusCode::UNAUTHORIZED,
        ),
    ] {
        let url = format!("{}{health}", n1.peer_url());
        let req = c
            .http
            .get(&url)
            .header("x-pier-peer-auth", &captured)
            .timeout(Duration::from_secs(5));
        let resp = c
            .check(
                what,
                req.send().await.map_err(|e| format!("GET {url}: {e}")),
            )
            .await;
        let code = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        if code != want {
            c.fail(&format!(
                "{what} GET {url}: want {want}, got {code}: {}",
                String::from_utf8_lossy(&body)
            ))
            .await;
        }
    }
    let main = format!("{}{path}", n1.url());
    let resp = c
        .check(
            "GET /peer/ on the main listener",
            c.http.get(&main).send().await.map_err(|e| e.to_string()),
        )
        .await;
    if resp.status() != reqwest::StatusCode::NOT_FOUND {
        c.fail(&format!(
            "GET {main}: the main listener must not serve the peer API, got {}",
            resp.status()
        ))
        .await;
    }

    let after = c
        .check("metrics of n1", c.node("n1").metrics(&c.http).await)
        .await;
    let rejected = |m: &crate::common::Metrics| m.sum("pier_peer_requests_rejected_total", &[]);
    let gossip = after.sum("pier_cluster_gossip_rejected_total", &[]);
    println!(
        "n1 rejected {} peer requests and {gossip} gossip messages",
        rejected(&after) - rejected(&before)
    );
    if rejected(&after) - rejected(&before) < 3.0 {
        c.fail(&format!(
            "n1's pier_peer_requests_rejected_total rose by {} for the three refused requests",
            rejected(&after) - rejected(&before)
        ))
        .await;
    }
    println!(
        "wrong_secret_neither_joins_nor_fetches took {:?}",
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Upstream down
// ---------------------------------------------------------------------------------------------

/// A tag pulled through one node, then the upstream stops: the three nodes that never pulled
/// it still serve it by tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_tags_served_by_every_node() {
    let Some(_one) = serial("upstream_down_tags_served_by_every_node").await else {
        return;
    };
    let t0 = Instant::now();
    let mut c = Cluster::new(4);
    c.start_members(&FOUR).await;
    let (layout, image) = one_image(
        &c.tmp.path().join("src"),
        vec![
            LayerSpec::new("etc/outage.conf", 2 * KIB, 5101),
            LayerSpec::new("usr/bin/outage", 3 * MIB + 1, 5102),
            LayerSpec::new("srv/outage.bin", 2 * MIB, 5103),
        ],
    );
    c.upstream
        .push(&c.http, "team/outage", "v1", &layout, &image)
        .await;
    let via = format!("{UPSTREAM}/team/outage");
    let first = pull_image(&c.http, &c.node("n2").url(), &via, "v1", &image).await;
    c.check("pull through n2 with the upstream up", first).await;

    c.upstream.kill();
    let pulls = futures::future::join_all(["n1", "n3", "n4"].map(|role| {
        let (http, base, via, image) = (c.http.clone(), c.node(role).url(), via.clone(), &image);
        async move { (role, pull_image(&http, &base, &via, "v1", image).await) }
    }))
    .await;
    let failed: Vec<String> = pulls
        .iter()
        .filter_map(|(role, r)| r.as_ref().err().map(|e| format!("{role}: {e}")))
        .collect();
    if !failed.is_empty() {
        c.fail(&format!(
            "with the upstream down, pulls by tag of {via}:v1 failed on nodes that never pulled \
             it:\n  {}",
            failed.join("\n  ")
        ))
        .await;
    }
    println!("bytes served by source:\n{}", served_table(&c).await);
    println!(
        "upstream_down_tags_served_by_every_node took {:?}",
        t0.elapsed()
    );
}

/// `pier warm`, as an operator runs it against one node.
async fn pier_warm(node_url: &str, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pier"))
        .arg("warm")
        .args(args)
        .args(["--url", node_url])
        .output()
        .await
        .expect("run pier warm");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn warm_puts_every_blob_where_it_was_asked() {
    let Some(_one) = serial("warm_puts_every_blob_where_it_was_asked").await else {
        return;
    };
    let t0 = Instant::now();
    let mut c = Cluster::new(4);
    c.start_members(&FOUR).await;
    let (layout, image) = one_image(
        &c.tmp.path().join("src"),
        vec![
            LayerSpec::new("etc/warm.conf", 3 * KIB, 6101),
            LayerSpec::new("usr/bin/warm", 4 * MIB + 7, 6102),
            LayerSpec::new("srv/warm.bin", 2 * MIB, 6103),
        ],
    );
    let pushed = c.upstream_accesses().len();
    c.upstream
        .push(&c.http, "team/warm", "v1", &layout, &image)
        .await;
    let reference = format!("{UPSTREAM}/team/warm:v1");
    let digests = image.blob_digests();
    let holders = |c: &Cluster, d: &str| c.nodes.iter().filter(|n| n.holds_blob(d)).count();

    let (ok, out) = pier_warm(&c.node("n2").url(), &[&reference, "--replicas", "3"]).await;
    if !ok {
        c.fail(&format!("pier warm --replicas 3 failed:\n{out}"))
            .await;
    }
    let short: Vec<String> = digests
        .iter()
        .filter(|d| holders(&c, d) < 3)
        .map(|d| format!("{d} on {} nodes", holders(&c, d)))
        .collect();
    if !short.is_empty() {
        c.fail(&format!(
            "after pier warm --replicas 3 (exit 0), blobs on fewer than 3 nodes:\n  {}\n{out}",
            short.join("\n  ")
        ))
        .await;
    }

    let (ok, out) = pier_warm(&c.node("n3").url(), &[&reference, "--all-nodes"]).await;
    if !ok {
        c.fail(&format!("pier warm --all-nodes failed:\n{out}"))
            .await;
    }
    let missing: Vec<String> = digests
        .iter()
        .filter(|d| holders(&c, d) < 4)
        .map(|d| format!("{d} on {} nodes", holders(&c, d)))
        .collect();
    if !missing.is_empty() {
        c.fail(&format!(
            "after pier warm --all-nodes (exit 0), blobs not on every node:\n  {}",
            missing.join("\n  ")
        ))
        .await;
    }
    // Warming moved each blob across the uplink once.
    let blob_paths: Vec<String> = digests
        .iter()
        .map(|d| format!("/v2/team/warm/blobs/{d}"))
        .collect();
    let counts = upstream_counts(&c, pushed, "team/warm", &blob_paths).await;
    let repeated: Vec<String> = blob_paths
        .iter()
        .filter(|p| counts.gets_of(p) != 1)
        .map(|p| format!("{p}: {} GETs", counts.gets_of(p)))
        .collect();
    if !repeated.is_empty() {
        c.fail(&format!(
            "warming should fetch each blob from the upstream once:\n  {}",
            repeated.join("\n  ")
        ))
        .await;
    }

    // An image that does not exist is a failure, with the reason.
    let (ok, out) = pier_warm(&c.node("n1").url(), &[&format!("{UPSTREAM}/team/none:v1")]).await;
    assert!(!ok, "warming a missing image must fail; it said:\n{out}");
    println!(
        "warm_puts_every_blob_where_it_was_asked took {:?}",
        t0.elapsed()
    );
}
