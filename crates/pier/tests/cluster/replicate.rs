//! Replication to every node (the built-in `cluster` rule): a `docker-archive` tarball
//! (written by skopeo) imported on one node with `pier import` is held and served by every
//! node, `pier sync status --json` shows a succeeded `replicate-node` job per node, and a node
//! that was down during the import gets the image once it is back.

use std::time::{Duration, Instant};

use crate::common::clients::{oci_ref, Skopeo};
use crate::common::{
    bench_line, pier_cli, push_image, write_layout, Entry, ImageSpec, LayerSpec, Upload, MIB,
};
use crate::nodes::{Cluster, FOUR};
use crate::serial;

/// The rows `pier sync status --json` prints for the node at `url`, and its exit code.
fn sync_status(url: &str) -> (i32, Vec<serde_json::Value>) {
    let out = pier_cli(&["sync", "status", "--json", "--url", url]);
    let rows = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["jobs"].as_array().cloned())
        .unwrap_or_default();
    (out.status.code().unwrap_or(-1), rows)
}

/// The `replicate-node` rows for `image`, by target node.
fn node_jobs<'a>(rows: &'a [serde_json::Value], image: &str) -> Vec<&'a serde_json::Value> {
    rows.iter()
        .filter(|r| r["kind"] == "replicate-node" && r["image"] == image)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_tarball_reaches_every_node_and_a_node_that_was_down_gets_it_back() {
    let Some(_one) =
        serial("an_imported_tarball_reaches_every_node_and_a_node_that_was_down_gets_it_back")
            .await
    else {
        return;
    };
    let t0 = Instant::now();
    let mut c = Cluster::new(4);
    c.start_members(&FOUR).await;

    // n4 goes down before the import.
    c.node_mut("n4").kill();
    let dead = c
        .wait_dead(
            "n4",
            &["n1", "n2", "n3"],
            Instant::now(),
            Duration::from_secs(10),
        )
        .await;
    c.check("n4 seen dead", dead).await;

    let layout = write_layout(
        &c.tmp.path().join("src"),
        vec![(
            "v1",
            Entry::Image(ImageSpec::linux(
                "amd64",
                vec![
                    LayerSpec::new("a.bin", 6 * MIB, 4101),
                    LayerSpec::new("b.bin", 2 * MIB + 3, 4102),
                ],
            )),
        )],
    );
    let skopeo = Skopeo::new(c.tmp.path());
    let archive = skopeo
        .writable_dir(&c.tmp.path().join("archives"))
        .join("app.tar");
    skopeo
        .run(&[
            "copy",
            &oci_ref(&layout.dir, "v1"),
            &format!("docker-archive:{}:team/app:v1", archive.display()),
        ])
        .await;
    let n1 = c.node("n1").url();
    let pushed = Instant::now();
    let out = pier_cli(&["import", "--url", &n1, &archive.display().to_string()]);
    if !out.status.success() {
        c.fail(&format!(
            "pier import of a docker-archive on n1 failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
        .await;
    }
    // What the import made of the archive: n1's manifest and the blobs it names.
    let manifest: serde_json::Value = c
        .http
        .get(format!("{n1}/v2/team/app/manifests/v1"))
        .header(
            reqwest::header::ACCEPT,
            crate::mirror_support::MANIFEST_ACCEPT,
        )
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .expect("n1 serves the imported manifest")
        .json()
        .await
        .expect("the manifest is JSON");
    let mut wanted: Vec<String> = vec![manifest["config"]["digest"]
        .as_str()
        .expect("a config digest")
        .to_string()];
    wanted.extend(
        manifest["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .filter_map(|l| l["digest"].as_str().map(str::to_string)),
    );
    assert_eq!(wanted.len(), 3, "config and two layers: {manifest:#}");

    // Every node that is up holds every blob, and n1 shows a succeeded job for each of them.
    loop {
        let (code, rows) = sync_status(&n1);
        let jobs = node_jobs(&rows, "team/app:v1");
        let done = |node: &str| {
            jobs.iter()
                .any(|r| r["target"] == node && r["state"] == "succeeded")
        };
        let held = ["n2", "n3"]
            .iter()
            .all(|n| wanted.iter().all(|d| c.node(n).holds_blob(d)));
        if done("n2") && done("n3") && held {
            assert_eq!(code, 0, "nothing has failed yet: {rows:#?}");
            let n4 = jobs.iter().find(|r| r["target"] == "n4");
            if let Some(n4) = n4 {
                assert_ne!(n4["state"], "succeeded", "n4 is down: {n4:#}");
            }
            println!(
                "replicated to the nodes that are up in {:.2?}",
                pushed.elapsed()
            );
            break;
        }
        if pushed.elapsed() > Duration::from_secs(30) {
            c.fail(&format!(
                "30 s after the import, not every live node holds team/app:v1: {jobs:#?}"
            ))
            .await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every node that is up serves it: the manifest by tag from its own store.
    for role in ["n2", "n3"] {
        let resp = c
            .http
            .get(format!("{}/v2/team/app/manifests/v1", c.node(role).url()))
            .header(
                reqwest::header::ACCEPT,
                crate::mirror_support::MANIFEST_ACCEPT,
            )
            .send()
            .await;
        let ok = resp.as_ref().is_ok_and(|r| r.status().is_success());
        if !ok {
            c.fail(&format!("{role} does not serve team/app:v1: {resp:?}"))
                .await;
        }
    }

    // n4 comes back and is brought up to date without anyone asking.
    let back = Instant::now();
    c.node_mut("n4").spawn();
    c.wait_all_alive(&FOUR, Duration::from_secs(20), "after n4 came back")
        .await;
    loop {
        let (_, rows) = sync_status(&n1);
        let jobs = node_jobs(&rows, "team/app:v1");
        let n4_done = jobs
            .iter()
            .any(|r| r["target"] == "n4" && r["state"] == "succeeded");
        let held = wanted.iter().all(|d| c.node("n4").holds_blob(d));
        if n4_done && held {
            let targets: Vec<&str> = jobs
                .iter()
                .filter(|r| r["state"] == "succeeded")
                .filter_map(|r| r["target"].as_str())
                .collect();
            for n in ["n2", "n3", "n4"] {
                assert!(targets.contains(&n), "no succeeded job for {n}: {jobs:#?}");
            }
            // One decision of where the image lives: every node, by the rule, and not its
            // owners besides.
            let owners: Vec<&serde_json::Value> = rows
                .iter()
                .filter(|r| r["kind"] == "replicate-blob" || r["kind"] == "replicate-manifest")
                .collect();
            assert!(
                owners.is_empty(),
                "beside the cluster rule, copies to owners were queued as well: {owners:#?}"
            );
            println!(
                "n4 caught up {:.2?} after it was started again",
                back.elapsed()
            );
            break;
        }
        if back.elapsed() > Duration::from_secs(60) {
            c.fail(&format!(
                "60 s after n4 came back it does not hold team/app:v1: {jobs:#?}"
            ))
            .await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "an_imported_tarball_reaches_every_node_and_a_node_that_was_down_gets_it_back took {:?}",
        t0.elapsed()
    );
}

/// Replication throughput to every node: an image of one large layer pushed to n1 of four,
/// timed from the end of the push until n1 lists a succeeded job for each other node, as
/// bytes delivered (three copies) per second. Runs only with `PIER_SYNC_BENCH=1`
/// (scripts/sync-bench.sh); `PIER_SYNC_BENCH_MIB` sets the layer (default 512). Prints the
/// number and asserts none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_bench_all_nodes() {
    if std::env::var("PIER_SYNC_BENCH").as_deref() != Ok("1") {
        crate::skipped(
            "sync_bench_all_nodes",
            "set PIER_SYNC_BENCH=1 (scripts/sync-bench.sh does)",
        );
        return;
    }
    let Some(_one) = serial("sync_bench_all_nodes").await else {
        return;
    };
    let mib: u64 = std::env::var("PIER_SYNC_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let mut c = Cluster::new(4);
    c.start_members(&FOUR).await;
    let layout = write_layout(
        &c.tmp.path().join("src"),
        vec![(
            "v1",
            Entry::Image(ImageSpec::linux(
                "amd64",
                vec![LayerSpec::new("big.bin", mib * MIB, 4201)],
            )),
        )],
    );
    let image = layout.image("v1").clone();
    let bytes: u64 = image.blobs().iter().map(|b| b.size).sum();
    let n1 = c.node("n1").url();
    push_image(
        &c.http,
        &n1,
        "team/big",
        "v1",
        &layout,
        &image,
        Upload::Monolithic,
    )
    .await;
    let pushed = Instant::now();
    loop {
        let (_, rows) = sync_status(&n1);
        let jobs = node_jobs(&rows, "team/big:v1");
        if jobs.len() == 3 && jobs.iter().all(|r| r["state"] == "succeeded") {
            break;
        }
        if pushed.elapsed() > Duration::from_secs(600) {
            c.fail(&format!("not replicated to every node in 600 s: {jobs:#?}"))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = pushed.elapsed();
    let line = format!(
        "sync: replication to all nodes: {:.0} MiB to 3 nodes in {:.2} s = {:.1} MB/s delivered",
        bytes as f64 / MIB as f64,
        took.as_secs_f64(),
        3.0 * bytes as f64 / 1e6 / took.as_secs_f64()
    );
    bench_line("PIER_SYNC_BENCH_OUT", &line);
}
