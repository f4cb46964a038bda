//! The dashboard in a real browser: headless Chromium (Debian's `chromium`, driven by Python
//! Playwright from PyPI; `tests/ui/dashboard.py`) opens `/ui/` of a three-node cluster on
//! 127.0.0.1, sees all three members alive and a non-zero byte count served from the node,
//! presses retry on a replication job that failed because its target registry was down (it is
//! up by then: Debian's docker-registry), and sees the job succeed. The screenshot is kept under
//! the target directory as the test's artifact. A second test opens a lone node's dashboard
//! (`tests/ui/node.py`): its `--node-name` in the header, upstreams nobody asked `unknown`. A
//! third drops a good and a broken archive into a node's watched folder and finds a row for
//! each in the jobs table (`tests/ui/imports.py`).
//!
//! Runs with `PIER_INTEROP=1` (scripts/test.sh installs chromium, playwright and
//! docker-registry).

mod common;
mod mirror_support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    free_port, interop_tempdir, one_image, push_image, wait_for_file, write_docker_save, Launch,
    LayerSpec, Pier, Upload, MIB,
};
use mirror_support::Registry;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_the_cluster_and_retries_a_failed_job_in_chromium() {
    let Some(tmp) = interop_tempdir(&["chromium", "python3", "docker-registry"]) else {
        return;
    };
    let secret = common::cluster_secret(tmp.path());
    let peer = [free_port(), free_port(), free_port()];
    let target = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // n0 replicates team/** to a registry that is not there yet, and gives up at once.
    let config = format!(
        "[mirror]\ndefault_upstream = \"\"\nbuiltin_upstreams = false\nhosted = [\"**\"]\n\n\
         [[replicate]]\nname = \"site-b\"\nrepositories = [\"team/**\"]\n\
         target = \"http://{target}\"\nretries = 0\n"
    );
    let node = |i: usize| {
        let name = format!("n{i}");
        let launch = Launch::new(
            &tmp.path().join(&name),
            &tmp.path().join(format!("{name}.log")),
        )
        .args(["--hosted", "**"]);
        let launch = if i == 0 {
            launch.config(&config)
        } else {
            launch
        };
        let join = (i > 0).then_some(peer[0]);
        launch.member(&name, peer[i], &secret, join).start()
    };
    let n0 = node(0);
    let _n1 = node(1);
    let _n2 = node(2);
    let http = reqwest::Client::new();

    let layout = one_image(
        &tmp.path().join("src"),
        "v1",
        vec![LayerSpec::new("app.bin", 3 * MIB, 91)],
    );
    let image = layout.image("v1").clone();
    push_image(
        &http,
        &n0.url(),
        "team/app",
        "v1",
        &layout,
        &image,
        Upload::Monolithic,
    )
    .await;
    // Bytes served from n0's own store.
    let layer = &image.layers[0].blob;
    let got = http
        .get(format!("{}/v2/team/app/blobs/{}", n0.url(), layer.digest))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.len() as u64, layer.size);

    // The replication job to the missing registry fails.
    let started = Instant::now();
    loop {
        let jobs: serde_json::Value =
            common::get_json(&http, &format!("{}/api/v1/sync/jobs", n0.url())).await;
        let failed = jobs["jobs"].as_array().unwrap().iter().any(|j| {
            j["state"] == "failed"
                && j["target"]
                    .as_str()
                    .is_some_and(|t| t.contains(&target.to_string()))
        });
        if failed {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no failed job to {target}: {jobs:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Now the registry is there, so a retry succeeds.
    let _registry = Registry::start_on(
        &tmp.path().join("registry"),
        &tmp.path().join("registry-storage"),
        target,
    )
    .expect("docker-registry listens on the target address");

    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("dashboard.png");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/dashboard.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(n0.url())
        .arg("3")
        .arg(&screenshot)
        .output()
        .expect("run python3 tests/ui/dashboard.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "the dashboard check failed:\n{text}");
    assert!(
        std::fs::metadata(&screenshot).is_ok_and(|m| m.len() > 10_000),
        "a screenshot at {}",
        screenshot.display()
    );
    println!("dashboard screenshot: {}", screenshot.display());
}

/// A node that joins no cluster, named with `--node-name`: the header shows that name, and
/// upstreams nothing has asked yet (the built-in ones on a fresh node) say `unknown` rather
/// than healthy, while one a pull has reached says what the pull saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_names_a_lone_node_and_shows_unasked_upstreams_as_unknown() {
    let Some(tmp) = interop_tempdir(&["chromium", "python3"]) else {
        return;
    };
    let dead = format!("http://127.0.0.1:{}", free_port());
    let node = Pier::with_config(
        tmp.path(),
        &format!("[[upstream]]\nname = \"dead.test\"\nendpoints = [\"{dead}\"]\n"),
        &["--node-name", "uinode"],
    );
    // A pull through the dead upstream: that endpoint is now known to be down.
    let missing = format!("sha256:{}", "ab".repeat(32));
    let resp = reqwest::Client::new()
        .get(format!(
            "{}/v2/team/app/blobs/{missing}?ns=dead.test",
            node.url()
        ))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_server_error(), "{}", resp.status());

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/node.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(node.url())
        .arg("uinode")
        .args([
            "docker.io=unknown (not tried yet)",
            "quay.io=unknown (not tried yet)",
            "dead.test=unhealthy",
        ])
        .output()
        .expect("run python3 tests/ui/node.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "the dashboard check failed:\n{text}");
}

/// A lone node with a watched folder: the dashboard's "Sync and import jobs" table has a row
/// per imported file, the good one succeeded with its image, the broken one failed with the
/// reason and no retry button (its file is in `failed/`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_lists_each_watched_import_with_its_fate() {
    let Some(tmp) = interop_tempdir(&["chromium", "python3"]) else {
        return;
    };
    let watch = tmp.path().join("incoming");
    std::fs::create_dir_all(&watch).unwrap();
    let layout = one_image(
        &tmp.path().join("src"),
        "v1",
        vec![LayerSpec::new("app.bin", MIB + 5, 51)],
    );
    let archive = tmp.path().join("app.tar");
    write_docker_save(&layout, layout.image("v1"), &["site/app:v1"], &archive);
    let node = Pier::with_config(
        tmp.path(),
        &format!(
            "[mirror]\ndefault_upstream = \"\"\nbuiltin_upstreams = false\n\
             [import]\nstable_seconds = 1\nrescan_seconds = 1\nwatch = {:?}\n",
            watch.display().to_string()
        ),
        &[],
    );
    std::fs::copy(&archive, watch.join("good.tar")).unwrap();
    let bytes = std::fs::read(&archive).unwrap();
    std::fs::write(watch.join("bad.tar"), &bytes[..bytes.len() / 2]).unwrap();
    for landed in ["done/good.tar", "failed/bad.tar.reason"] {
        assert!(
            wait_for_file(&watch.join(landed), Duration::from_secs(30)).await,
            "{landed}:\n{}",
            node.log()
        );
    }

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/imports.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(node.url())
        .args([
            "good.tar=succeeded=site/app:v1",
            "bad.tar=failed=reading the archive failed",
        ])
        .output()
        .expect("run python3 tests/ui/imports.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "the dashboard check failed:\n{text}");
}
