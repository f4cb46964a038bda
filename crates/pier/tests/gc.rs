//! Storage upkeep as an operator meets it, with the real binary: `pier gc --dry-run` then
//! `pier gc` against a running node (numbers reported, the deleted image's blobs gone), and
//! `pier check --deep` finding a blob corrupted on disk: a hosted one is reported lost (exit
//! 2, and a pull gets BLOB_UNKNOWN rather than bad bytes); a mirrored one is quarantined
//! (exit 1) and the next pull fetches it from the upstream again (interop tier, with Debian's
//! docker-registry as the upstream).

mod common;
mod mirror_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{digest_of, error_code, interop_tempdir, one_image, LayerSpec};
use common::{json_of, pier_cli, Launch, Pier, KIB, MIB};
use mirror_support::{http_client, pull_http, start_mirror, upstream_table, Registry};
use reqwest::StatusCode;

/// The file of a blob under a node's data directory.
fn blob_file(data_dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    data_dir.join("blobs/sha256").join(&hex[..2]).join(hex)
}

fn flip_a_byte(path: &Path) {
    let mut bytes = std::fs::read(path).expect("read the blob file");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(path, bytes).expect("write the blob file");
}

/// A hosted node that collects without grace.
fn hosted_pier(tmp: &Path) -> Pier {
    Pier::with_config(
        tmp,
        "[gc]\ngrace = \"0s\"\n[mirror]\nbuiltin_upstreams = false\ndefault_upstream = \"\"\n",
        &["--hosted", "**"],
    )
}

async fn push_blob(http: &reqwest::Client, base: &str, repo: &str, data: &[u8]) -> String {
    let d = digest_of(data);
    let resp = http
        .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"))
        .body(data.to_vec())
        .send()
        .await
        .expect("push blob");
    assert_eq!(resp.status(), StatusCode::CREATED);
    d
}

/// Push a config and one layer, and a manifest over them tagged `tag`; its digest.
async fn push_image(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
    layer: &[u8],
) -> (String, String, String) {
    let config = format!("{{\"architecture\":\"amd64\",\"tag\":\"{tag}\"}}").into_bytes();
    let c = push_blob(http, base, repo, &config).await;
    let l = push_blob(http, base, repo, layer).await;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": c, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": l, "size": layer.len()}],
    })
    .to_string();
    let resp = http
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .expect("push manifest");
    assert_eq!(resp.status(), StatusCode::CREATED);
    (digest_of(manifest.as_bytes()), c, l)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_dry_run_then_gc_frees_a_deleted_images_blobs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = hosted_pier(tmp.path());
    let http = http_client();
    let base = node.url();
    let old_layer = vec![3u8; 300 * 1024];
    let (old, old_config, old_l) = push_image(&http, &base, "team/app", "old", &old_layer).await;
    let (_, _, new_l) = push_image(&http, &base, "team/app", "new", &[4u8; 1000]).await;
    let resp = http
        .delete(format!("{base}/v2/team/app/manifests/{old}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let freed_bytes = old_layer.len() as u64
        + std::fs::metadata(blob_file(node.data_dir(), &old_config))
            .unwrap()
            .len();

    let plan = pier_cli(&["gc", "--dry-run", "--json", "--url", &base]);
    assert!(plan.status.success(), "{plan:?}");
    let plan = json_of(&plan);
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["blobs"], 2, "{plan}");
    assert_eq!(plan["bytes"], freed_bytes, "{plan}");
    assert!(
        blob_file(node.data_dir(), &old_l).exists(),
        "a dry run frees nothing"
    );

    let done = pier_cli(&["gc", "--url", &base]);
    let text = String::from_utf8_lossy(&done.stdout).to_string();
    assert!(done.status.success(), "{done:?}");
    assert!(
        text.starts_with(&format!("freed 2 blobs, {freed_bytes} bytes")),
        "{text}"
    );
    assert!(!blob_file(node.data_dir(), &old_l).exists());
    let resp = http
        .get(format!("{base}/v2/team/app/blobs/{old_l}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(&resp.bytes().await.unwrap()), "BLOB_UNKNOWN");
    // The image still tagged is whole.
    let resp = http
        .get(format!("{base}/v2/team/app/blobs/{new_l}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &[4u8; 1000]);

    let again = json_of(&pier_cli(&["gc", "--dry-run", "--json", "--url", &base]));
    assert_eq!(
        (again["blobs"].as_u64(), again["bytes"].as_u64()),
        (Some(0), Some(0))
    );
    let m = node.metrics(&http).await;
    assert_eq!(m.sum("pier_gc_freed_blobs_total", &[]), 2.0, "{}", m.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_deep_reports_a_corrupt_hosted_blob_lost_and_pulls_get_blob_unknown() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = hosted_pier(tmp.path());
    let http = http_client();
    let base = node.url();
    let (manifest, _, layer) = push_image(&http, &base, "team/app", "v1", &[5u8; 64 * 1024]).await;

    let clean = pier_cli(&["check", "--deep", "--url", &base]);
    let text = String::from_utf8_lossy(&clean.stdout).to_string();
    assert_eq!(clean.status.code(), Some(0), "{text}");
    assert!(
        text.contains("pass   blob digests: 2 blobs verified"),
        "{text}"
    );

    flip_a_byte(&blob_file(node.data_dir(), &layer));
    let found = pier_cli(&["check", "--deep", "--json", "--url", &base]);
    assert_eq!(found.status.code(), Some(2), "lost data exits 2: {found:?}");
    let report = json_of(&found);
    let digests = common::check_of(&report, "blob digests");
    assert_eq!(digests["status"], "fail", "{digests}");
    let details = digests["details"].to_string();
    assert!(
        details.contains(&layer) && details.contains(&format!("team/app@{manifest}")),
        "the report names the blob and the manifest that lost it: {details}"
    );
    assert!(!blob_file(node.data_dir(), &layer).exists());
    assert!(
        std::fs::read_dir(node.data_dir().join("quarantine"))
            .unwrap()
            .count()
            == 1,
        "the corrupt bytes are kept aside"
    );
    let resp = http
        .get(format!("{base}/v2/team/app/blobs/{layer}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(&resp.bytes().await.unwrap()), "BLOB_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_deep_quarantines_a_corrupt_mirrored_blob_and_the_next_pull_fetches_it_again() {
    let Some(tmp) = interop_tempdir(&["docker-registry"]) else {
        return;
    };
    let layout = one_image(
        &tmp.path().join("src"),
        "v1",
        vec![
            LayerSpec::new("big.bin", 2 * MIB + 7, 501),
            LayerSpec::new("small.conf", 3 * KIB, 502),
        ],
    );
    let image = layout.image("v1").clone();
    let registry = Registry::start_in(tmp.path());
    let http = http_client();
    registry
        .push(&http, "team/app", "v1", &layout, &image)
        .await;
    let upstream = format!("localhost:{}", registry.port());
    let tables = upstream_table(&upstream, &[registry.url()], "");
    let (node, _) = start_mirror(tmp.path(), false, &tables, &[]);
    let query = format!("?ns={upstream}");
    pull_http(&http, &node.url(), "team/app", "v1", &query, &image).await;
    let layer = &image.layers[0].blob;
    let url = format!("{}/v2/team/app/blobs/{}{query}", node.url(), layer.digest);
    let first = http.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(digest_of(&first), layer.digest);

    let file = blob_file(node.data_dir(), &layer.digest);
    // The fill commits just after the client has its last byte.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !file.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        file.exists(),
        "the mirror cached the layer at {}",
        file.display()
    );
    let before = node.metrics(&http).await;
    let fetched = before.sum(
        "pier_mirror_upstream_bytes_total",
        &[("upstream", &upstream)],
    );
    flip_a_byte(&file);
    let found = pier_cli(&["check", "--deep", "--url", &node.url()]);
    let text = String::from_utf8_lossy(&found.stdout).to_string();
    assert_eq!(
        found.status.code(),
        Some(1),
        "found and fixed exits 1:\n{text}"
    );
    assert!(text.contains("fixed  blob digests"), "{text}");
    assert!(text.contains(&layer.digest), "{text}");

    let again = http.get(&url).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    let again = again.bytes().await.unwrap();
    assert_eq!(digest_of(&again), layer.digest, "the right bytes");
    let after = node.metrics(&http).await;
    let fetched_again = after.sum(
        "pier_mirror_upstream_bytes_total",
        &[("upstream", &upstream)],
    );
    assert!(
        fetched_again >= fetched + layer.size as f64,
        "the upstream was asked again: {fetched} then {fetched_again} bytes"
    );
    let clean = pier_cli(&["check", "--deep", "--url", &node.url()]);
    assert_eq!(clean.status.code(), Some(0), "{clean:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pier_pin_and_unpin_hold_an_image_by_digest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = hosted_pier(tmp.path());
    let http = http_client();
    let base = node.url();
    let (manifest, _, _) = push_image(&http, &base, "team/app", "v1", &[6u8; 4096]).await;

    let pinned = pier_cli(&["pin", "team/app:v1", "--url", &base]);
    assert!(pinned.status.success(), "{pinned:?}");
    assert_eq!(
        String::from_utf8_lossy(&pinned.stdout).trim(),
        format!("pinned team/app@{manifest}")
    );
    let pins: serde_json::Value =
        common::get_json(&http, &format!("{base}/api/v1/sync/pins")).await;
    assert_eq!(pins["pins"][0]["repo"], "team/app", "{pins}");
    assert_eq!(pins["pins"][0]["digest"], manifest.as_str(), "{pins}");
    assert_eq!(pins["pins"][0]["by"][0], "cli", "{pins}");

    let unpinned = pier_cli(&["unpin", "team/app:v1", "--url", &base]);
    assert!(unpinned.status.success(), "{unpinned:?}");
    assert!(String::from_utf8_lossy(&unpinned.stdout).starts_with("unpinned "));
    let pins: serde_json::Value =
        common::get_json(&http, &format!("{base}/api/v1/sync/pins")).await;
    assert_eq!(pins["pins"].as_array().map(Vec::len), Some(0), "{pins}");

    let missing = pier_cli(&["pin", "team/app:nope", "--url", &base]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("is not stored here"),
        "{missing:?}"
    );
}

/// The node's health checks: a healthy hosted node passes every line (exit 0); a node whose
/// upstream does not answer and whose watched folder cannot be created fails with a line
/// naming each (exit 2).
#[tokio::test]
async fn check_names_an_unreachable_upstream_and_a_broken_watch_folder() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let healthy = hosted_pier(&tmp.path().join("healthy"));
    let out = pier_cli(&["check", "--url", &healthy.url()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}");
    for name in ["data directory:", "free disk:", "listeners:"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("pass") && l.contains(name)),
            "no passing {name} line:\n{text}"
        );
    }

    let broken = tmp.path().join("broken");
    std::fs::create_dir_all(&broken).expect("mkdir");
    // A closed port: nothing listens there.
    let closed = common::free_port();
    // The watched folder's parent is a file, so the folder can never be made.
    std::fs::write(broken.join("not-a-dir"), b"x").expect("write");
    let node = Launch::in_dir(&broken)
        .config(&format!(
            "[mirror]\nbuiltin_upstreams = false\ndefault_upstream = \"\"\n\
             [import]\nwatch = \"{}\"\n\
             [[upstream]]\nname = \"dead.example\"\nendpoints = [\"http://127.0.0.1:{closed}\"]\n",
            broken.join("not-a-dir/inbox").display()
        ))
        .start();
    let out = pier_cli(&["check", "--url", &node.url()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(2), "{text}");
    let fail_line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with("fail") && l.contains(name))
            .unwrap_or_else(|| panic!("no failing {name} line:\n{text}"))
            .to_string()
    };
    assert!(fail_line("upstreams:").contains("dead.example"), "{text}");
    assert!(fail_line("watch folder:").contains("not running"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("pass") && l.contains("data directory:")),
        "{text}"
    );
}

/// Bind-mounts `dir` on itself read-only; unmounted on drop. New files under it fail with
/// EROFS while files pier already holds open stay writable, as on a disk remounted read-only.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn bind(dir: &Path) -> ReadOnly {
        let run = |args: &[&str]| {
            let status = Command::new("mount")
                .args(args)
                .arg(dir)
                .arg(dir)
                .status()
                .expect("run mount");
            assert!(status.success(), "mount {args:?} {}", dir.display());
        };
        run(&["--bind"]);
        let ro = ReadOnly(dir.to_path_buf());
        let status = Command::new("mount")
            .args(["-o", "remount,ro,bind"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "remount {} read-only", dir.display());
        ro
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The lines of `pier check` with `status` whose check is `name`.
fn lines_of<'a>(text: &'a str, status: &str, name: &str) -> Option<&'a str> {
    text.lines()
        .find(|l| l.starts_with(status) && l.contains(&format!(" {name}:")))
}

/// The conditions an operator's monitor must see, each on a line of its own with the exit
/// status it keys on: two nodes in a cluster pass (0); the data disk below twice its floor
/// warns (1); then, with the peer SIGKILLed, the disk below its floor and the data directory
/// read-only, `peers`, `free disk` and `data directory` fail (2); and a node that is not
/// running gives one failing `listener` line (2). Needs root for the mounts.
#[tokio::test]
async fn check_fails_on_a_read_only_data_dir_a_dead_peer_and_a_full_disk() {
    if !common::require(&["mount", "umount", "df"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let disk = common::Tmpfs::mount(&tmp.path().join("disk"), 96);
    let secret = common::cluster_secret(tmp.path());
    let config = "[storage]\nmin_free_space = \"24MiB\"\n\
                  [mirror]\nbuiltin_upstreams = false\ndefault_upstream = \"\"\n";
    let peer_ports = [common::free_port(), common::free_port()];
    let node = |i: usize, data: &Path| -> Pier {
        let name = format!("n{}", i + 1);
        let join = (i > 0).then_some(peer_ports[0]);
        Launch::new(data, &tmp.path().join(format!("{name}.log")))
            .config(config)
            .args(["--hosted", "**"])
            .member(&name, peer_ports[i], &secret, join)
            .start()
    };
    let data = disk.dir.join("data");
    let mut n1 = node(0, &data);
    let mut n2 = node(1, &tmp.path().join("n2"));
    let url = n1.url();
    let check = || {
        let out = pier_cli(&["check", "--url", &url]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };

    // Both alive: every line passes.
    let started = std::time::Instant::now();
    let text = loop {
        let (code, text) = check();
        if code == Some(0) && lines_of(&text, "pass", "peers").is_some() {
            break text;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "two live nodes do not pass (exit {code:?}):\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(lines_of(&text, "pass", "clock skew").is_some(), "{text}");
    assert!(!text.contains("warn") && !text.contains("fail"), "{text}");

    // Below twice the floor (48 MiB): a warning, exit 1.
    let _warn_filler = disk.fill_to("filler-1", 36 * MIB);
    let (code, text) = check();
    assert_eq!(code, Some(1), "a warning exits 1:\n{text}");
    let line = lines_of(&text, "warn", "free disk").unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("twice the floor of 24 MiB"), "{line}");

    // The peer dies, the disk falls below its floor, the data directory turns read-only.
    n2.kill();
    let _fail_filler = disk.fill_to("filler-2", 8 * MIB);
    let read_only = ReadOnly::bind(&data);
    let (code, text) = check();
    assert_eq!(code, Some(2), "failures exit 2:\n{text}");
    let line = lines_of(&text, "fail", "data directory").unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("does not take writes"), "{line}");
    assert!(line.to_lowercase().contains("read-only"), "{line}");
    let line = lines_of(&text, "fail", "free disk").unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("below the floor of 24 MiB"), "{line}");
    let line = lines_of(&text, "fail", "peers").unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("1 of 1 peers are down"), "{line}");
    assert!(
        text.contains(&format!("n2 (127.0.0.1:{})", peer_ports[1])),
        "the dead peer is named:\n{text}"
    );
    drop(read_only);

    // A node that is not running: one failing line for the listener.
    n1.kill();
    let (code, text) = check();
    assert_eq!(code, Some(2), "{text}");
    let line = lines_of(&text, "fail", "listener").unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains(&format!("cannot reach {url}")), "{line}");
}

/// `[gc] untagged_after` through the real binary: an image whose tag moved on to a new push
/// is removed by `pier gc` once older than the retention, with its layer; the tagged image
/// stays whole, and the metric counts the removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_a_manifest_untagged_past_the_retention_and_its_layer() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = Pier::with_config(
        tmp.path(),
        "[gc]\ngrace = \"0s\"\nuntagged_after = \"1s\"\n\
         [mirror]\nbuiltin_upstreams = false\ndefault_upstream = \"\"\n",
        &["--hosted", "**"],
    );
    let http = http_client();
    let base = node.url();
    let (old, _, old_l) = push_image(&http, &base, "team/app", "v1", &[6u8; 20_000]).await;
    // The same tag, a new image: the old manifest is untagged now.
    let (new, _, new_l) = push_image(&http, &base, "team/app", "v1", &[7u8; 30_000]).await;
    assert_ne!(old, new);
    let young = json_of(&pier_cli(&["gc", "--dry-run", "--json", "--url", &base]));
    assert_eq!(young["manifests"], 0, "younger than the retention: {young}");
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;

    let done = pier_cli(&["gc", "--json", "--url", &base]);
    assert!(done.status.success(), "{done:?}");
    let report = json_of(&done);
    assert_eq!(report["manifests"], 1, "{report}");
    assert!(!blob_file(node.data_dir(), &old_l).exists(), "{report}");
    let resp = http
        .get(format!("{base}/v2/team/app/manifests/{old}"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(&resp.bytes().await.unwrap()), "MANIFEST_UNKNOWN");
    let resp = http
        .get(format!("{base}/v2/team/app/manifests/v1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(digest_of(&resp.bytes().await.unwrap()), new);
    let resp = http
        .get(format!("{base}/v2/team/app/blobs/{new_l}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &[7u8; 30_000]);
    let m = node.metrics(&http).await;
    assert_eq!(
        m.sum("pier_gc_removed_manifests_total", &[]),
        1.0,
        "{}",
        m.0
    );
}

/// An air-gapped node as an operator sets it up: only `--upstream docker.io=...` given, the six
/// other built-in upstreams unreachable (every HTTPS request goes to a proxy that is not
/// there). `pier check` warns about those and says how to turn them off, but does not fail;
/// it fails once the upstream the operator configured stops answering. A mirrored manifest
/// whose config and layers were not pulled counts as one manifest, not as its references.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_only_warns_about_builtin_upstreams_nobody_asked_for() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let http = http_client();
    let mut origin = hosted_pier(&tmp.path().join("origin"));
    // One image of a config and three layers, stored at the origin.
    let config = br#"{"architecture":"amd64"}"#.to_vec();
    let c = push_blob(&http, &origin.url(), "team/app", &config).await;
    let mut layers = Vec::new();
    for i in 0..3u8 {
        let data = vec![i; 1000 + usize::from(i)];
        let d = push_blob(&http, &origin.url(), "team/app", &data).await;
        layers.push(
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "digest": d, "size": data.len()}),
        );
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": c, "size": config.len()},
        "layers": layers,
    })
    .to_string();
    let put = http
        .put(format!("{}/v2/team/app/manifests/v1", origin.url()))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest)
        .send()
        .await
        .expect("push manifest");
    assert_eq!(put.status(), StatusCode::CREATED);

    let dead_proxy = format!("http://127.0.0.1:{}", common::free_port());
    let node = Launch::in_dir(&tmp.path().join("node"))
        .args(["--upstream", &format!("docker.io={}", origin.url())])
        .env("HTTPS_PROXY", &dead_proxy)
        .env("https_proxy", &dead_proxy)
        .start();
    // The manifest only, through the default upstream: its four blobs are not stored here.
    let got = http
        .get(format!("{}/v2/team/app/manifests/v1", node.url()))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("pull the manifest");
    assert_eq!(got.status(), StatusCode::OK);

    let out = pier_cli(&["check", "--url", &node.url()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "warnings only:\n{text}");
    assert!(!text.lines().any(|l| l.starts_with("fail")), "{text}");
    let warn = lines_of(&text, "warn", "upstreams").unwrap_or_else(|| panic!("{text}"));
    assert!(
        warn.contains("6 built-in upstreams")
            && warn.contains("[mirror] builtin_upstreams = false"),
        "{text}"
    );
    assert!(
        warn.contains("quay.io") && !warn.contains("docker.io"),
        "{text}"
    );
    let refs = lines_of(&text, "pass", "manifest references").unwrap_or_else(|| panic!("{text}"));
    assert!(
        refs.contains("4 references of 1 of 1 manifests are not stored yet"),
        "{text}"
    );

    // The upstream the operator named is gone: that is a failure.
    origin.kill();
    let out = pier_cli(&["check", "--url", &node.url()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(2), "{text}");
    let fail = lines_of(&text, "fail", "upstreams").unwrap_or_else(|| panic!("{text}"));
    assert!(
        fail.contains("1 of 1 configured or used upstreams unreachable: docker.io"),
        "{text}"
    );
    assert!(text.contains("builtin_upstreams = false"), "{text}");
}

/// A proxy for `HTTPS_PROXY` that tunnels `CONNECT quay.io:443` to `to` while `open` holds
/// (closing the tunnels it holds when it turns false) and refuses every other tunnel (502):
/// the internet as an air-gapped node sees it, with one registry reachable until it is not.
async fn connect_proxy(
    to: std::net::SocketAddr,
    open: tokio::sync::watch::Receiver<bool>,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the proxy");
    let url = format!("http://{}", listener.local_addr().expect("proxy address"));
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let mut open = open.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    match client.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let line = String::from_utf8_lossy(&head);
                let wanted = line.starts_with("CONNECT quay.io:443 ");
                if !(wanted && *open.borrow()) {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                }
                let Ok(mut server) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    _ = open.wait_for(|o| !*o) => {}
                }
            });
        }
    });
    url
}

/// A built-in upstream nobody configured that served a pull within the hour is in use: once it
/// stops answering, `pier check` fails it (exit 2), while the built-ins nobody used still only
/// warn. quay.io is a TLS pier with a certificate for `quay.io` from a test CA, reached
/// through an `HTTPS_PROXY` that tunnels only quay.io; the node trusts the CA through
/// `SSL_CERT_FILE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_a_builtin_upstream_that_served_a_pull_within_the_hour() {
    let Some(tmp) = interop_tempdir(&["openssl", "curl"]) else {
        return;
    };
    let dir = tmp.path();
    common::certs::make_certs_for(dir, &["quay"], "DNS:quay.io,IP:127.0.0.1");
    let ca = dir.join("ca.pem");
    let ca_probe = ca.clone();
    let origin = Launch::new(&dir.join("origin"), &dir.join("origin.log"))
        .args(["--hosted", "**", "--tls-cert"])
        .args([dir.join("quay.pem").display().to_string()])
        .args(["--tls-key"])
        .args([dir.join("quay.key").display().to_string()])
        .ready(move |port| {
            let out = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
                .arg(&ca_probe)
                .arg("--resolve")
                .arg(format!("quay.io:{port}:127.0.0.1"))
                .arg(format!("https://quay.io:{port}/healthz"))
                .output();
            out.is_ok_and(|o| o.stdout == b"200")
        })
        .start();
    let port = origin.url().rsplit(':').next().unwrap().to_string();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let tls = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_native_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).expect("the test CA"),
        )
        .resolve("quay.io", addr)
        .build()
        .unwrap();
    let quay = format!("https://quay.io:{port}");
    push_image(&tls, &quay, "team/app", "v1", &[3u8; 5000]).await;

    let (open, tunnels) = tokio::sync::watch::channel(true);
    let proxy = connect_proxy(addr, tunnels).await;
    let ca_file = ca.display().to_string();
    // Nothing configured: every upstream is a built-in one.
    let node = Launch::in_dir(&dir.join("node"))
        .env("HTTPS_PROXY", &proxy)
        .env("https_proxy", &proxy)
        .env("SSL_CERT_FILE", &ca_file)
        .start();
    let http = http_client();
    let got = http
        .get(format!("{}/v2/quay.io/team/app/manifests/v1", node.url()))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("pull through the node");
    assert_eq!(got.status(), StatusCode::OK, "quay.io through the node");

    // quay.io answers; the six built-ins nobody used do not, and only warn.
    let out = pier_cli(&["check", "--url", &node.url()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "warnings only:\n{text}");
    let warn = lines_of(&text, "warn", "upstreams").unwrap_or_else(|| panic!("{text}"));
    assert!(
        warn.contains("6 built-in upstreams") && !warn.contains("quay.io"),
        "{text}"
    );

    // quay.io, which served a pull minutes ago, stops answering: that is a failure.
    open.send_replace(false);
    let out = pier_cli(&["check", "--url", &node.url()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(2), "{text}");
    let fail = lines_of(&text, "fail", "upstreams").unwrap_or_else(|| panic!("{text}"));
    assert!(
        fail.contains("1 of 1 configured or used upstreams unreachable: quay.io"),
        "{text}"
    );
    drop(origin);
}
