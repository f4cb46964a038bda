//! Importing and exporting archives with the real binary: `pier import` against a running
//! node, the watched folder (`[import] watch`), and `pier export` read back by `pier import`.
//! The archives are written here in the layouts `docker save` and skopeo write; the interop
//! tier (`import_interop.rs`) does the same with the real tools and clients.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    assert_blobs_served, digest_of, drop_slowly, one_image, pier_cli, wait_for_file,
    write_docker_save, write_oci_archive, LayerSpec, Pier, WrittenImage, KIB, MIB,
};
use reqwest::StatusCode;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn image(dir: &Path, seed: u64) -> (common::Layout, WrittenImage) {
    let layout = one_image(
        dir,
        "v1",
        vec![
            LayerSpec::new("etc/app.conf", 4 * KIB + 1, seed),
            LayerSpec::new("app.bin", 5 * MIB + 3, seed + 1),
        ],
    );
    let image = layout.image("v1").clone();
    (layout, image)
}

/// A node with every name hosted and the watched folder (if any) at `watch`.
fn start(dir: &Path, watch: Option<&Path>, extra: &str) -> Pier {
    let mut config = "[mirror]\ndefault_upstream = \"\"\nbuiltin_upstreams = false\n".to_string();
    config.push_str("[import]\nstable_seconds = 1\nrescan_seconds = 1\n");
    if let Some(w) = watch {
        config.push_str(&format!("watch = {:?}\n", w.display().to_string()));
    }
    config.push_str(extra);
    Pier::with_config(dir, &config, &[])
}

/// The digest pier serves for `repo:tag`, and the layer digests of that manifest.
async fn served(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
) -> (String, Vec<String>) {
    let resp = http
        .get(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header(
            reqwest::header::ACCEPT,
            "application/vnd.oci.image.manifest.v1+json",
        )
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(resp.status(), StatusCode::OK, "{repo}:{tag}");
    let body = resp.bytes().await.expect("body");
    let m: serde_json::Value = serde_json::from_slice(&body).expect("manifest");
    let mut blobs = vec![m["config"]["digest"].as_str().expect("config").to_string()];
    for l in m["layers"].as_array().expect("layers") {
        blobs.push(l["digest"].as_str().expect("digest").to_string());
    }
    (digest_of(&body), blobs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pier_import_imports_once_and_says_why_a_file_failed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (layout, img) = image(&tmp.path().join("src"), 1);
    let archive = tmp.path().join("app.tar");
    write_docker_save(&layout, &img, &["team/app:v1", "team/app:latest"], &archive);
    let pier = start(&tmp.path().join("pier"), None, "");
    let (url, http) = (pier.url(), reqwest::Client::new());

    let out = pier_cli(&["import", "--url", &url, &archive.display().to_string()]);
    assert!(out.status.success(), "pier import: {}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("imported team/app:v1"), "{said}");
    let (_, blobs) = served(&http, &url, "team/app", "v1").await;
    assert_eq!(blobs, img.blob_digests(), "config and layers as saved");
    assert_blobs_served(&http, &url, "team/app", "", &img.blobs()).await;
    assert_eq!(
        served(&http, &url, "team/app", "latest").await,
        served(&http, &url, "team/app", "v1").await
    );

    // The same bytes under another name change nothing.
    let copy = tmp.path().join("copy-of-app.tar");
    std::fs::copy(&archive, &copy).expect("copy");
    let out = pier_cli(&[
        "import",
        "--url",
        &url,
        "--json",
        &copy.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["result"], "duplicate");
    assert_eq!(report["duplicate_of"], "app.tar");

    // A truncated file fails, with the reason, and the exit status says so.
    let bytes = std::fs::read(&archive).expect("read");
    let cut = tmp.path().join("cut.tar");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let out = pier_cli(&["import", "--url", &url, &cut.display().to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("failed"),
        "{}",
        text(&out.stderr)
    );

    let m = pier.metrics(&http).await;
    for (result, n) in [("imported", 1.0), ("duplicate", 1.0), ("failed", 1.0)] {
        assert_eq!(
            m.sum("pier_import_files_total", &[("result", result)]),
            n,
            "{result}"
        );
    }

    // Nothing listens: exit status 2.
    let out = pier_cli(&[
        "import",
        "--url",
        "127.0.0.1:1",
        &archive.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watched_folder_imports_stable_files_once_and_sets_failures_aside() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let watch = tmp.path().join("incoming");
    std::fs::create_dir_all(&watch).expect("create the folder");
    let (layout, img) = image(&tmp.path().join("src"), 11);
    let legacy = tmp.path().join("legacy.tar");
    write_docker_save(&layout, &img, &["site/app:v1"], &legacy);
    let oci = tmp.path().join("oci.tar");
    write_oci_archive(&layout, "site/web", &oci);
    let pier = start(
        &tmp.path().join("pier"),
        Some(&watch),
        "prefix = \"edge/\"\n",
    );
    let (url, http) = (pier.url(), reqwest::Client::new());

    // A file left under its .part name is never taken.
    std::fs::write(watch.join("left.tar.part"), b"incomplete").expect("write");
    // Written slowly (longer than stable_seconds in all) and renamed when complete.
    drop_slowly(&legacy, &watch, "legacy.tar", 4, Duration::from_millis(400));
    assert!(
        wait_for_file(&watch.join("done/legacy.tar"), Duration::from_secs(30)).await,
        "legacy.tar not moved to done/:\n{}",
        pier.log()
    );
    let (digest, blobs) = served(&http, &url, "edge/site/app", "v1").await;
    assert_eq!(blobs, img.blob_digests());
    drop_slowly(&oci, &watch, "web.oci.tar", 2, Duration::from_millis(200));
    assert!(
        wait_for_file(&watch.join("done/web.oci.tar"), Duration::from_secs(30)).await,
        "{}",
        pier.log()
    );
    let (oci_digest, _) = served(&http, &url, "edge/site/web", "v1").await;
    assert_eq!(
        oci_digest, img.manifest.digest,
        "an OCI archive keeps its manifest"
    );
    assert_blobs_served(&http, &url, "edge/site/web", "", &img.blobs()).await;

    // A renamed copy is recognised by content.
    std::fs::copy(&legacy, watch.join("renamed.tar")).expect("copy");
    assert!(wait_for_file(&watch.join("done/renamed.tar"), Duration::from_secs(30)).await);
    // A truncated file goes to failed/ with the reason beside it.
    let bytes = std::fs::read(&oci).expect("read");
    std::fs::write(watch.join("cut.tar"), &bytes[..bytes.len() - 3000]).expect("write");
    assert!(
        wait_for_file(
            &watch.join("failed/cut.tar.reason"),
            Duration::from_secs(30)
        )
        .await,
        "{}",
        pier.log()
    );
    assert!(watch.join("failed/cut.tar").exists());
    let reason = std::fs::read_to_string(watch.join("failed/cut.tar.reason")).expect("reason");
    assert!(reason.contains("reading the archive failed"), "{reason}");

    assert!(watch.join("left.tar.part").exists(), "the .part file stays");
    let m = pier.metrics(&http).await;
    let count = |r: &str| m.sum("pier_import_files_total", &[("result", r)]);
    assert_eq!(
        (count("imported"), count("duplicate"), count("failed")),
        (2.0, 1.0, 1.0)
    );
    assert_eq!(served(&http, &url, "edge/site/app", "v1").await.0, digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_imports_into_another_node_as_the_same_image() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (layout, img) = image(&tmp.path().join("src"), 21);
    let oci = tmp.path().join("oci.tar");
    write_oci_archive(&layout, "team/app", &oci);
    let a = start(&tmp.path().join("a"), None, "");
    let out = pier_cli(&["import", "--url", &a.url(), &oci.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let exported = tmp.path().join("out/export.tar");
    std::fs::create_dir_all(exported.parent().expect("parent")).expect("mkdir");
    let out = pier_cli(&[
        "export",
        "--url",
        &a.url(),
        "team/app:v1",
        "-o",
        &exported.display().to_string(),
    ]);
    assert!(out.status.success(), "pier export: {}", text(&out.stderr));
    let names: Vec<String> = std::fs::read_dir(exported.parent().expect("parent"))
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["export.tar"], "no partial file left beside it");

    let b = start(&tmp.path().join("b"), None, "");
    let out = pier_cli(&["import", "--url", &b.url(), &exported.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let http = reqwest::Client::new();
    let (digest, blobs) = served(&http, &b.url(), "team/app", "v1").await;
    assert_eq!(digest, img.manifest.digest);
    assert_eq!(blobs, img.blob_digests());

    // An image the node does not have: exit status 1 and no file.
    let missing = tmp.path().join("missing.tar");
    let out = pier_cli(&[
        "export",
        "--url",
        &a.url(),
        "team/none:v1",
        "-o",
        &missing.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(!missing.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_inflating_past_max_size_fails_and_keeps_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (layout, img) = image(&tmp.path().join("src"), 7);
    let archive = tmp.path().join("big.tar");
    write_docker_save(&layout, &img, &["team/big:v1"], &archive);
    // The image's 5 MiB layer is more than this node takes from one archive.
    let pier = start(&tmp.path().join("pier"), None, "max_size = \"2MiB\"\n");
    let (url, http) = (pier.url(), reqwest::Client::new());

    let out = pier_cli(&[
        "import",
        "--url",
        &url,
        "--json",
        &archive.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["result"], "failed", "{report}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("[import] max_size (2097152 bytes)"),
        "{report}"
    );
    let resp = http
        .get(format!("{url}/v2/team/big/manifests/v1"))
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // The layer's bytes written before the refusal are gone: no file under the data
    // directory but the metadata database holds a MiB.
    let mut stack = vec![tmp.path().join("pier/data")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read the data dir") {
            let entry = entry.expect("entry");
            let meta = entry.metadata().expect("metadata");
            if meta.is_dir() {
                stack.push(entry.path());
            } else if entry.path().extension().is_none_or(|e| e != "redb") {
                assert!(meta.len() < MIB, "{} kept", entry.path().display());
            }
        }
    }
}

/// The import rows of `GET /api/v1/sync/jobs`, by file name.
async fn import_rows(
    http: &reqwest::Client,
    base: &str,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let resp = http
        .get(format!("{base}/api/v1/sync/jobs"))
        .send()
        .await
        .expect("GET /api/v1/sync/jobs");
    assert_eq!(resp.status(), StatusCode::OK);
    let answer: serde_json::Value = resp.json().await.expect("JSON");
    answer["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter(|j| j["kind"] == "import")
        .map(|j| (j["file"].as_str().unwrap_or("").to_string(), j.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_import_is_a_job_row_that_outlives_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let watch = tmp.path().join("incoming");
    std::fs::create_dir_all(&watch).expect("create the folder");
    let (layout, img) = image(&tmp.path().join("src"), 21);
    let good = tmp.path().join("good.tar");
    write_docker_save(&layout, &img, &["site/app:v1"], &good);
    let (layout2, img2) = image(&tmp.path().join("src2"), 31);
    let by_hand = tmp.path().join("by-hand.tar");
    write_docker_save(&layout2, &img2, &["team/tool:2"], &by_hand);
    let dir = tmp.path().join("pier");
    let mut pier = start(&dir, Some(&watch), "");
    let (url, http) = (pier.url(), reqwest::Client::new());

    std::fs::copy(&good, watch.join("good.tar")).expect("copy");
    let bytes = std::fs::read(&good).expect("read");
    std::fs::write(watch.join("bad.tar"), &bytes[..bytes.len() / 2]).expect("write");
    for landed in ["done/good.tar", "failed/bad.tar.reason"] {
        assert!(
            wait_for_file(&watch.join(landed), Duration::from_secs(30)).await,
            "{landed}:\n{}",
            pier.log()
        );
    }
    let out = pier_cli(&["import", "--url", &url, &by_hand.display().to_string()]);
    assert!(out.status.success(), "pier import: {}", text(&out.stderr));

    let check = |rows: &std::collections::BTreeMap<String, serde_json::Value>| {
        let files: Vec<&str> = rows.keys().map(String::as_str).collect();
        assert_eq!(files, ["bad.tar", "by-hand.tar", "good.tar"], "{rows:?}");
        let good = &rows["good.tar"];
        assert_eq!(good["state"], "succeeded", "{good}");
        assert_eq!(good["images"], serde_json::json!(["site/app:v1"]), "{good}");
        assert_eq!(good["last_error"], serde_json::Value::Null, "{good}");
        let bad = &rows["bad.tar"];
        assert_eq!(bad["state"], "failed", "{bad}");
        let why = bad["last_error"].as_str().unwrap_or("");
        assert!(why.contains("reading the archive failed"), "{bad}");
        let cli = &rows["by-hand.tar"];
        assert_eq!(cli["state"], "succeeded", "{cli}");
        assert_eq!(cli["images"], serde_json::json!(["team/tool:2"]), "{cli}");
    };
    let before = import_rows(&http, &url).await;
    check(&before);

    // `pier sync status` shows the same rows; a failed import makes it exit 1.
    let out = pier_cli(&["sync", "status", "--url", &url]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let line = |file: &str| {
        table
            .lines()
            .find(|l| l.contains(file))
            .unwrap_or_else(|| panic!("no row for {file}:\n{table}"))
            .to_string()
    };
    for (file, words) in [
        ("good.tar", vec!["import", "succeeded", "site/app:v1"]),
        (
            "bad.tar",
            vec!["import", "failed", "reading the archive failed"],
        ),
        ("by-hand.tar", vec!["import", "succeeded", "team/tool:2"]),
    ] {
        let l = line(file);
        for w in words {
            assert!(l.contains(w), "{w} in the row of {file}:\n{table}");
        }
    }

    // A failed import is not queued again behind the operator's back: its file is in failed/.
    let id = before["bad.tar"]["id"].as_u64().expect("id").to_string();
    let out = pier_cli(&["sync", "retry", "--url", &url, &id]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("failed/"),
        "{}",
        text(&out.stderr)
    );

    pier.stop();
    let pier = start(&dir, Some(&watch), "");
    let after = import_rows(&http, &pier.url()).await;
    check(&after);
    for (file, row) in &before {
        assert_eq!(after[file]["id"], row["id"], "{file} keeps its id");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_file_the_store_cannot_take_is_a_retrying_row_until_the_queue_imports_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let watch = tmp.path().join("incoming");
    std::fs::create_dir_all(&watch).expect("create the folder");
    let (layout, img) = image(&tmp.path().join("src"), 41);
    let archive = tmp.path().join("late.tar");
    write_docker_save(&layout, &img, &["site/late:1"], &archive);
    let dir = tmp.path().join("pier");
    // Below its free-space floor the node takes no blob: the import meets a store failure.
    let full = "[storage]\nmin_free_space = \"1000000TiB\"\n";
    let mut pier = start(&dir, Some(&watch), full);
    let http = reqwest::Client::new();
    std::fs::copy(&archive, watch.join("late.tar")).expect("copy");
    let started = std::time::Instant::now();
    let row = loop {
        let rows = import_rows(&http, &pier.url()).await;
        if let Some(row) = rows.get("late.tar").filter(|r| r["state"] == "retrying") {
            break row.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no retrying row: {rows:?}\n{}",
            pier.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        row["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{row}"
    );
    assert!(
        watch.join("late.tar").exists(),
        "the file stays in the folder"
    );

    // With room again (after a restart), the queue imports it when it is due.
    pier.stop();
    let pier = start(&dir, Some(&watch), "");
    assert!(
        wait_for_file(&watch.join("done/late.tar"), Duration::from_secs(90)).await,
        "{}",
        pier.log()
    );
    let rows = import_rows(&http, &pier.url()).await;
    assert_eq!(rows.len(), 1, "one row for the file: {rows:?}");
    let done = &rows["late.tar"];
    assert_eq!(done["id"], row["id"], "{done}");
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["images"], serde_json::json!(["site/late:1"]), "{done}");
    assert_eq!(done["attempts"], 2, "{done}");
    let (_, blobs) = served(&http, &pier.url(), "site/late", "1").await;
    assert_eq!(blobs, img.blob_digests());
}
