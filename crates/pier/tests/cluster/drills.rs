//! Fault drills (`scripts/drills.sh`; only with `PIER_DRILLS=1`): four nodes on the cluster
//! tier's network with Debian's docker-registry as their upstream, pulls running against the
//! cluster the whole time, and one fault after another: node loss (SIGKILL), a network
//! partition, an upstream outage, a full disk, a slow peer (its link shaped to a crawl) and a
//! node restart (SIGTERM, then start again). For each, the report gives the pulls attempted
//! and failed while it lasted, the time until the cluster noticed, the time until full service,
//! and the bytes lost: the blobs of every image pulled or pushed so far that some node can no
//! longer serve with the right bytes after recovery (must be 0).
//!
//! The load behaves like clients behind a load balancer with readiness checks: each pull goes
//! to the next node in turn that answers `/readyz` with 200 and is not the one the drill took
//! down (a client of a dead node cannot be served by anyone). The report is markdown, written to
//! `PIER_DRILLS_REPORT` (default `target/drills.md`) and printed.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{write_layout, Entry, ImageSpec, LayerSpec, Layout, WrittenImage, MIB};
use crate::nodes::{pull_image, Cluster, Fault, FOUR, UPSTREAM};
use crate::skipped;

/// One drill's line of the report.
struct Outcome {
    drill: &'static str,
    fault: String,
    attempted: usize,
    failed: usize,
    noticed: Option<Duration>,
    full_service: Duration,
    bytes_lost: u64,
    notes: String,
}

/// Pulls counted while a drill runs.
#[derive(Default)]
struct Load {
    attempted: AtomicUsize,
    failed: AtomicUsize,
    errors: Mutex<Vec<String>>,
    stop: AtomicBool,
    /// Roles the load must not send to (the node the drill took down).
    avoid: Mutex<Vec<String>>,
    slowest_ms: AtomicUsize,
}

impl Load {
    fn take(&self) -> (usize, usize, Vec<String>) {
        let r = (
            self.attempted.swap(0, Ordering::Relaxed),
            self.failed.swap(0, Ordering::Relaxed),
            std::mem::take(&mut *self.errors.lock().unwrap()),
        );
        self.slowest_ms.store(0, Ordering::Relaxed);
        r
    }
}

async fn ready(http: &reqwest::Client, url: &str) -> bool {
    http.get(format!("{url}/readyz"))
        .timeout(Duration::from_secs(1))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

/// Pull the images one after another, round robin over the ready nodes, until told to stop.
async fn run_load(
    http: reqwest::Client,
    nodes: Vec<(String, String)>,
    images: Arc<Mutex<Vec<(String, WrittenImage)>>>,
    load: Arc<Load>,
) {
    let mut turn = 0usize;
    while !load.stop.load(Ordering::Relaxed) {
        turn += 1;
        let avoid = load.avoid.lock().unwrap().clone();
        let mut target = None;
        for k in 0..nodes.len() {
            let (role, url) = &nodes[(turn + k) % nodes.len()];
            if !avoid.contains(role) && ready(&http, url).await {
                target = Some((role.clone(), url.clone()));
                break;
            }
        }
        let Some((role, url)) = target else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (repo, image) = {
            let list = images.lock().unwrap();
            list[turn % list.len()].clone()
        };
        let started = Instant::now();
        load.attempted.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = pull_image(&http, &url, &repo, "v1", &image).await {
            load.failed.fetch_add(1, Ordering::Relaxed);
            load.errors.lock().unwrap().push(format!("{role}: {e}"));
        }
        let ms = started.elapsed().as_millis() as usize;
        load.slowest_ms.fetch_max(ms, Ordering::Relaxed);
    }
}

fn image(dir: &Path, seed: u64, big_mib: u64) -> (Layout, WrittenImage) {
    let layout = write_layout(
        dir,
        vec![(
            "v1",
            Entry::Image(ImageSpec::linux(
                "amd64",
                vec![
                    LayerSpec::new("srv/big.bin", big_mib * MIB, seed),
                    LayerSpec::new("etc/app.conf", 4099, seed + 1),
                    LayerSpec::new("lib/lib.so", 2 * MIB + 7, seed + 2),
                ],
            )),
        )],
    );
    let image = layout.image("v1").clone();
    (layout, image)
}

/// Push a fresh image to the upstream and add it to what the load pulls (through the mirror).
async fn add_upstream_image(
    c: &Cluster,
    images: &Mutex<Vec<(String, WrittenImage)>>,
    name: &str,
    seed: u64,
) -> (String, WrittenImage) {
    let (layout, img) = image(&c.tmp.path().join(format!("src-{name}")), seed, 24);
    let repo = format!("drill/{name}");
    c.upstream.push(&c.http, &repo, "v1", &layout, &img).await;
    let via = format!("{UPSTREAM}/{repo}");
    images.lock().unwrap().push((via.clone(), img.clone()));
    (via, img)
}

/// The images so far (the lock is not held while they are pulled).
fn snapshot(images: &Mutex<Vec<(String, WrittenImage)>>) -> Vec<(String, WrittenImage)> {
    images.lock().unwrap().clone()
}

/// Bytes of the blobs that some running node cannot serve with the right bytes.
async fn bytes_lost(c: &Cluster, images: &[(String, WrittenImage)]) -> (u64, Vec<String>) {
    let mut lost = 0;
    let mut what = Vec::new();
    for role in FOUR {
        let url = c.node(role).url();
        for (repo, img) in images {
            if let Err(e) = pull_image(&c.http, &url, repo, "v1", img).await {
                // Count the blobs this node cannot serve.
                for blob in img.blobs() {
                    let ok = crate::nodes::get_blob(&c.http, &url, repo, blob)
                        .await
                        .is_ok();
                    if !ok {
                        lost += blob.size;
                    }
                }
                what.push(format!("{role} {repo}: {e}"));
            }
        }
    }
    (lost, what)
}

async fn wait_until(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if f().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// A progress line on stderr (the report comes at the end).
fn progress(t0: Instant, what: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "[drills {:6.1?}] {what}", t0.elapsed());
}

/// The report's row of a drill.
fn row(o: &Outcome) -> String {
    format!(
        "| {} | {} | {} | {} ({:.1} %) | {} | {:.1} s | {} | {} |",
        o.drill,
        o.fault,
        o.attempted,
        o.failed,
        if o.attempted == 0 {
            0.0
        } else {
            100.0 * o.failed as f64 / o.attempted as f64
        },
        o.noticed
            .map_or("–".to_string(), |d| format!("{:.2} s", d.as_secs_f64())),
        o.full_service.as_secs_f64(),
        o.bytes_lost,
        o.notes.replace('|', "/"),
    )
}

fn report_last(t0: Instant, outcomes: &[Outcome]) {
    if let Some(o) = outcomes.last() {
        progress(t0, &row(o));
    }
}

/// How long a drill's fault lasts before it is repaired.
const HOLD: Duration = Duration::from_secs(8);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drills() {
    if std::env::var("PIER_DRILLS").as_deref() != Ok("1") {
        skipped(
            "drills",
            "set PIER_DRILLS=1 (scripts/drills.sh) to run the fault drills",
        );
        return;
    }
    let Some(_one) = crate::serial("drills").await else {
        return;
    };
    let t0 = Instant::now();
    let mut c = Cluster::new(4);
    // n4's data directory on a small tmpfs of its own, for the disk-full drill.
    let n4_dir = c.tmp.path().join("n4");
    std::fs::create_dir_all(&n4_dir).unwrap();
    let mount = |args: &[&str]| {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    mount(&[
        "mount",
        "-t",
        "tmpfs",
        "-o",
        "size=768m",
        "tmpfs",
        &n4_dir.display().to_string(),
    ]);
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .args(["-l", &self.0])
                .output();
        }
    }
    let _unmount = Unmount(n4_dir.display().to_string());
    c.start_members(&FOUR).await;
    progress(t0, "four nodes alive; pushing the images");

    let images: Arc<Mutex<Vec<(String, WrittenImage)>>> = Arc::default();
    for (i, name) in ["warm-a", "warm-b", "warm-c"].iter().enumerate() {
        add_upstream_image(&c, &images, name, 7000 + 10 * i as u64).await;
    }
    // A hosted image pushed to n4 (the victim of most drills): replicated to every node.
    let (layout, hosted) = image(&c.tmp.path().join("src-hosted"), 7900, 8);
    crate::common::push_image(
        &c.http,
        &c.node("n4").url(),
        "team/hosted",
        "v1",
        &layout,
        &hosted,
        crate::common::Upload::Monolithic,
    )
    .await;
    images
        .lock()
        .unwrap()
        .push(("team/hosted".to_string(), hosted.clone()));
    // Every node has pulled everything once before the drills begin.
    let everything = images.lock().unwrap().clone();
    let started = Instant::now();
    loop {
        let (lost, what) = bytes_lost(&c, &everything).await;
        if lost == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "warm-up: {what:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    progress(t0, "every node serves every image; the load starts");
    let load = Arc::new(Load::default());
    let nodes: Vec<(String, String)> = FOUR
        .iter()
        .map(|r| (r.to_string(), c.node(r).url()))
        .collect();
    let runner = tokio::spawn(run_load(
        c.http.clone(),
        nodes,
        images.clone(),
        load.clone(),
    ));
    let mut outcomes: Vec<Outcome> = Vec::new();
    let others = ["n1", "n2", "n3"];

    // 1 and 2: node loss and partition of n4, with a cold image pulled meanwhile.
    for (k, fault) in [Fault::Kill, Fault::Partition].into_iter().enumerate() {
        add_upstream_image(
            &c,
            &images,
            &format!("cold-{}", fault.name()),
            7100 + 10 * k as u64,
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        load.take();
        report_last(t0, &outcomes);
        progress(t0, fault.name());
        *load.avoid.lock().unwrap() = vec!["n4".to_string()];
        let since = Instant::now();
        c.inject(fault, "n4");
        let noticed = c
            .wait_dead("n4", &others, since, Duration::from_secs(10))
            .await;
        let noticed = noticed.ok();
        tokio::time::sleep(HOLD.saturating_sub(since.elapsed())).await;
        c.repair(fault, "n4");
        c.wait_all_alive(&FOUR, Duration::from_secs(30), "after the drill")
            .await;
        let full = since.elapsed();
        load.avoid.lock().unwrap().clear();
        let (attempted, failed, errors) = load.take();
        let (lost, what) = bytes_lost(&c, &snapshot(&images)).await;
        outcomes.push(Outcome {
            drill: if matches!(fault, Fault::Kill) {
                "node loss"
            } else {
                "network partition"
            },
            fault: format!(
                "{} n4 for {}s, then {}",
                if matches!(fault, Fault::Kill) {
                    "SIGKILL"
                } else {
                    "iptables DROP of"
                },
                HOLD.as_secs(),
                if matches!(fault, Fault::Kill) {
                    "restart"
                } else {
                    "heal"
                }
            ),
            attempted,
            failed,
            noticed,
            full_service: full,
            bytes_lost: lost,
            notes: errors
                .into_iter()
                .chain(what)
                .take(3)
                .collect::<Vec<_>>()
                .join("; "),
        });
    }

    // 3: upstream outage: everything cached keeps being served; a new image cannot be.
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
        load.take();
        report_last(t0, &outcomes);
        progress(t0, "upstream outage");
        let since = Instant::now();
        c.net.partition("up");
        // The cluster notices when a fetch needs the upstream: a pull of an image it never saw.
        let (layout, probe) = image(&c.tmp.path().join("src-probe"), 7400, 1);
        let url1 = c.node("n1").url();
        let noticed = wait_until(Duration::from_secs(60), async || {
            let _ = pull_image(
                &c.http,
                &url1,
                &format!("{UPSTREAM}/drill/probe"),
                "v1",
                &probe,
            )
            .await;
            c.status("n1").await.is_ok_and(|s| {
                s.0["upstreams"].as_array().is_some_and(|u| {
                    u.iter().any(|u| {
                        u["endpoints"]
                            .as_array()
                            .is_some_and(|e| e.iter().all(|e| e["healthy"] == false))
                    })
                })
            })
        })
        .await;
        tokio::time::sleep(HOLD.saturating_sub(since.elapsed())).await;
        c.net.heal("up");
        c.upstream
            .push(&c.http, "drill/probe", "v1", &layout, &probe)
            .await;
        let back = wait_until(Duration::from_secs(60), async || {
            pull_image(
                &c.http,
                &url1,
                &format!("{UPSTREAM}/drill/probe"),
                "v1",
                &probe,
            )
            .await
            .is_ok()
        })
        .await;
        let full = since.elapsed();
        let (attempted, failed, errors) = load.take();
        let (lost, what) = bytes_lost(&c, &snapshot(&images)).await;
        outcomes.push(Outcome {
            drill: "upstream outage",
            fault: format!("iptables DROP of the upstream for {}s", HOLD.as_secs()),
            attempted,
            failed,
            noticed,
            full_service: full,
            bytes_lost: lost,
            notes: if back.is_none() {
                "a new image was still not pullable 60 s after the upstream came back".into()
            } else {
                errors
                    .into_iter()
                    .chain(what)
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        });
    }

    // 4: disk full on n4: it stops taking writes and says so on /readyz; the load goes around
    // it; once space is back it is ready again by itself.
    {
        load.take();
        report_last(t0, &outcomes);
        progress(t0, "disk full");
        let filler = n4_dir.join("filler");
        let since = Instant::now();
        let free = rustix::fs::statvfs(&n4_dir).unwrap();
        let free_bytes = free.f_bavail * free.f_frsize;
        // Leave less than the 256 MiB floor.
        let fill = free_bytes.saturating_sub(64 * MIB);
        mount(&[
            "fallocate",
            "-l",
            &fill.to_string(),
            &filler.display().to_string(),
        ]);
        let url4 = c.node("n4").url();
        let noticed = wait_until(Duration::from_secs(30), async || {
            !ready(&c.http, &url4).await
        })
        .await;
        // A cold image is pulled meanwhile: fetched by the nodes that have room.
        add_upstream_image(&c, &images, "cold-diskfull", 7500).await;
        tokio::time::sleep(HOLD.saturating_sub(since.elapsed())).await;
        std::fs::remove_file(&filler).unwrap();
        let back = wait_until(Duration::from_secs(30), async || {
            ready(&c.http, &url4).await
        })
        .await;
        let full = since.elapsed();
        let (attempted, failed, errors) = load.take();
        let (lost, what) = bytes_lost(&c, &snapshot(&images)).await;
        outcomes.push(Outcome {
            drill: "disk full",
            fault: format!(
                "n4's data filesystem filled to 64 MiB free for {}s",
                HOLD.as_secs()
            ),
            attempted,
            failed,
            noticed,
            full_service: full,
            bytes_lost: lost,
            notes: if back.is_none() {
                "n4 did not become ready again within 30 s".into()
            } else {
                errors
                    .into_iter()
                    .chain(what)
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        });
    }

    // 5: a slow peer: n4's link shaped to 8 Mbit/s while new images are pulled everywhere.
    {
        load.take();
        let since = Instant::now();
        report_last(t0, &outcomes);
        progress(t0, "slow peer");
        c.net.limit_link("n4", 8);
        add_upstream_image(&c, &images, "cold-slow-a", 7600).await;
        add_upstream_image(&c, &images, "cold-slow-b", 7610).await;
        tokio::time::sleep(Duration::from_secs(12)).await;
        c.net.unlimit_link("n4");
        let full = since.elapsed();
        let slowest = Duration::from_millis(load.slowest_ms.load(Ordering::Relaxed) as u64);
        let (attempted, failed, errors) = load.take();
        let (lost, what) = bytes_lost(&c, &snapshot(&images)).await;
        outcomes.push(Outcome {
            drill: "slow peer",
            fault: "n4's link shaped to 8 Mbit/s for 12 s (tc tbf)".into(),
            attempted,
            failed,
            noticed: None,
            full_service: full,
            bytes_lost: lost,
            notes: format!("slowest pull {slowest:.1?}")
                + &errors
                    .into_iter()
                    .chain(what)
                    .take(3)
                    .map(|e| format!("; {e}"))
                    .collect::<String>(),
        });
    }

    // 6: a node restart (SIGTERM, as an upgrade does).
    {
        load.take();
        report_last(t0, &outcomes);
        progress(t0, "node restart");
        *load.avoid.lock().unwrap() = vec!["n4".to_string()];
        let since = Instant::now();
        let stopped = c.node_mut("n4").stop_gracefully(Duration::from_secs(40));
        assert!(stopped, "n4 did not stop within 40 s of SIGTERM");
        let noticed = c
            .wait_dead("n4", &others, since, Duration::from_secs(10))
            .await
            .ok();
        c.node_mut("n4").spawn();
        c.wait_all_alive(&FOUR, Duration::from_secs(30), "after the restart")
            .await;
        let full = since.elapsed();
        load.avoid.lock().unwrap().clear();
        let (attempted, failed, errors) = load.take();
        let (lost, what) = bytes_lost(&c, &snapshot(&images)).await;
        outcomes.push(Outcome {
            drill: "node restart",
            fault: "SIGTERM n4, start it again on its data".into(),
            attempted,
            failed,
            noticed,
            full_service: full,
            bytes_lost: lost,
            notes: errors
                .into_iter()
                .chain(what)
                .take(3)
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    report_last(t0, &outcomes);
    progress(t0, "drills done");
    load.stop.store(true, Ordering::Relaxed);
    let _ = runner.await;

    let mut report = String::new();
    let _ = writeln!(
        report,
        "| drill | fault | pulls attempted | pulls failed | noticed after | full service after | bytes lost | notes |\n|---|---|---|---|---|---|---|---|"
    );
    for o in &outcomes {
        let _ = writeln!(report, "{}", row(o));
    }
    let path = std::env::var("PIER_DRILLS_REPORT").unwrap_or_else(|_| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/drills.md")
            .display()
            .to_string()
    });
    std::fs::write(&path, &report).unwrap();
    println!(
        "{report}\nwritten to {path}; the drills took {:?}",
        t0.elapsed()
    );
    // What the drills promise.
    for o in &outcomes {
        assert_eq!(o.bytes_lost, 0, "{}: bytes lost", o.drill);
        if ["node loss", "network partition", "upstream outage"].contains(&o.drill) {
            assert_eq!(o.failed, 0, "{}: failed pulls: {}", o.drill, o.notes);
        }
    }
}
