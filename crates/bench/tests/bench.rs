//! pier-bench against pier's real router, in process: pier on 127.0.0.1:0 over a temporary
//! blob store and an in-memory database, `pier_bench::run` driven by arguments parsed as the
//! command line would parse them. Every run is bounded (a few operations or a few hundred
//! milliseconds) and targets only loopback.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use pier_bench::report::{Comparison, Limit, Report};
use pier_bench::BenchArgs;
use pier_registry::{Limits, Registry};
use pier_server::AppState;
use pier_store::{FsBlobStore, RedbMetaStore};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
}

/// A pier serving on loopback until the test ends.
struct Pier {
    url: String,
    dir: tempfile::TempDir,
}

async fn start_pier() -> Pier {
    let dir = tempfile::tempdir().unwrap();
    let blobs = FsBlobStore::open(dir.path()).await.unwrap();
    let meta = Arc::new(RedbMetaStore::in_memory().unwrap());
    let registry = Arc::new(Registry::new(blobs, meta, Limits::default()));
    let app = pier_server::router(AppState::new(registry));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Pier {
        url: format!("http://{addr}"),
        dir,
    }
}

impl Pier {
    /// `pier bench --registry <this pier> --no-progress <args…>`, run to the end.
    async fn bench(&self, args: &[&str]) -> Report {
        let mut argv = vec!["bench", "--registry", &self.url, "--no-progress"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        pier_bench::run(&cli.bench, CancellationToken::new())
            .await
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
    }

    async fn get_json(&self, path: &str) -> serde_json::Value {
        reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The size of a manifest and of everything it references, as one pull fetches them.
    async fn image_bytes(&self, repo: &str, tag: &str) -> (u64, Vec<String>) {
        let path = format!("/v2/{repo}/manifests/{tag}");
        let manifest_len = reqwest::get(format!("{}{path}", self.url))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .len() as u64;
        let m = self.get_json(&path).await;
        let mut blobs = vec![&m["config"]];
        blobs.extend(m["layers"].as_array().unwrap());
        let total = manifest_len
            + blobs
                .iter()
                .map(|b| b["size"].as_u64().unwrap())
                .sum::<u64>();
        let digests = blobs
            .iter()
            .map(|b| b["digest"].as_str().unwrap().to_string())
            .collect();
        (total, digests)
    }
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

fn sha_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn kind(report: &Report, name: &str) -> u64 {
    report
        .summary
        .by_kind
        .get(name)
        .map(|k| k.requests)
        .unwrap_or(0)
}

fn assert_clean(report: &Report) {
    let s = &report.summary;
    assert_eq!(s.errors, 0, "errors: {:?}", s.errors_by_kind);
    assert_eq!(s.failed_operations, 0);
    assert!(s.errors_by_kind.is_empty());
    assert!(!report.interrupted);
    assert_eq!(report.all_failed(), None, "a clean run exits 0");
}

#[tokio::test]
async fn push_then_pull_counts_requests_and_bytes() {
    let pier = start_pier().await;
    const LAYER: u64 = 100 * 1024;

    // Monolithic: per image 2 layers + 1 config (one POST each) and 1 manifest PUT.
    let push = pier
        .bench(&[
            "push",
            "--repo",
            "bench/app",
            "--layers",
            "2",
            "--layer-size",
            "100KiB",
            "-c",
            "2",
            "-n",
            "3",
        ])
        .await;
    assert_clean(&push);
    let s = &push.summary;
    assert_eq!(push.scenario, "push");
    assert_eq!(push.limit, Limit::Operations(3));
    assert_eq!(s.operations, 3);
    assert_eq!(s.requests, 12);
    assert_eq!(kind(&push, "blob_put"), 9);
    assert_eq!(kind(&push, "manifest_put"), 3);
    // Layer bytes exactly, plus three small configs and three small manifests.
    let extra = s.bytes_sent - 6 * LAYER;
    assert!(extra > 0 && extra < 3 * 4096, "bytes_sent {}", s.bytes_sent);
    assert!(s.latency_ms.p50 > 0.0 && s.latency_ms.p99 >= s.latency_ms.p50);
    assert!(s.latency_ms.max >= s.latency_ms.p99);

    // Pull what was pushed: per operation 1 manifest and 3 blobs, every byte counted, verified.
    let pushed = push.pushed.clone().expect("push reports an image");
    let (repo, tag) = pushed.split_once(':').unwrap();
    let (image_bytes, _) = pier.image_bytes(repo, tag).await;
    let pull = pier
        .bench(&["pull", "--image", &pushed, "--verify", "-c", "2", "-n", "4"])
        .await;
    assert_clean(&pull);
    let s = &pull.summary;
    assert_eq!(s.operations, 4);
    assert_eq!(s.requests, 16);
    assert_eq!(kind(&pull, "manifest_get"), 4);
    assert_eq!(kind(&pull, "blob_get"), 12);
    assert_eq!(s.bytes_received, 4 * image_bytes);
    assert_eq!(s.bytes_sent, 0);
    assert_eq!(s.bytes, s.bytes_received);

    // An index resolves to its linux/amd64 child: two manifests, then the child's blobs.
    let child = pier.get_json(&format!("/v2/{repo}/manifests/{tag}")).await;
    let child_bytes = serde_json::to_vec(&child).unwrap();
    let put = |tag: &str, body: Vec<u8>, media_type: &str| {
        reqwest::Client::new()
            .put(format!("{}/v2/{repo}/manifests/{tag}", pier.url))
            .header("content-type", media_type)
            .body(body)
            .send()
    };
    let child_digest = format!("sha256:{}", sha_hex(&child_bytes));
    assert_eq!(
        put(&child_digest, child_bytes.clone(), OCI_MANIFEST)
            .await
            .unwrap()
            .status(),
        201
    );
    // A linux/arm64 sibling listed first, with no layers: pulling it would fetch one blob.
    let mut arm = child.clone();
    arm["layers"] = serde_json::json!([]);
    let arm_bytes = serde_json::to_vec(&arm).unwrap();
    let arm_digest = format!("sha256:{}", sha_hex(&arm_bytes));
    let status = put(&arm_digest, arm_bytes.clone(), OCI_MANIFEST)
        .await
        .unwrap()
        .status();
    assert_eq!(status, 201);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            { "mediaType": OCI_MANIFEST, "digest": arm_digest, "size": arm_bytes.len(),
              "platform": { "os": "linux", "architecture": "arm64" } },
            { "mediaType": OCI_MANIFEST, "digest": child_digest, "size": child_bytes.len(),
              "platform": { "os": "linux", "architecture": "amd64" } },
        ],
    });
    let status = put("multi", serde_json::to_vec(&index).unwrap(), OCI_INDEX)
        .await
        .unwrap()
        .status();
    assert_eq!(status, 201);
    let multi = format!("{repo}:multi");
    let pull = pier
        .bench(&["pull", "--image", &multi, "--verify", "-n", "2"])
        .await;
    assert_clean(&pull);
    assert_eq!(kind(&pull, "manifest_get"), 4);
    assert_eq!(kind(&pull, "blob_get"), 6);

    // --manifests-only fetches no blob.
    let manifests = pier
        .bench(&["pull", "--image", &pushed, "--manifests-only", "-n", "5"])
        .await;
    assert_clean(&manifests);
    assert_eq!(manifests.summary.requests, 5);
    assert_eq!(kind(&manifests, "blob_get"), 0);
}

#[tokio::test]
async fn chunked_push_then_verified_pull() {
    let pier = start_pier().await;
    // Per image: each layer POST + 3 PATCHes (100 KiB in 40 KiB chunks) + PUT; the config
    // POST + 1 PATCH + PUT; the manifest PUT.
    let push = pier
        .bench(&[
            "push",
            "--repo",
            "bench/chunked",
            "--layers",
            "2",
            "--layer-size",
            "100KiB",
            "--chunked",
            "40KiB",
            "--tag",
            "latest",
            "-n",
            "2",
        ])
        .await;
    assert_clean(&push);
    assert_eq!(push.summary.requests, 2 * 14);
    assert_eq!(kind(&push, "upload_start"), 6);
    assert_eq!(kind(&push, "upload_chunk"), 2 * (2 * 3 + 1));
    assert_eq!(kind(&push, "upload_finish"), 6);
    assert_eq!(push.pushed.as_deref(), Some("bench/chunked:latest"));

    let pull = pier
        .bench(&[
            "pull",
            "--image",
            "bench/chunked:latest",
            "--verify",
            "-n",
            "2",
        ])
        .await;
    assert_clean(&pull);
    assert_eq!(kind(&pull, "blob_get"), 6);
}

#[tokio::test]
async fn tampered_blob_is_a_digest_mismatch_with_verify() {
    let pier = start_pier().await;
    let push = pier
        .bench(&[
            "push",
            "--repo",
            "bench/t",
            "--layer-size",
            "64KiB",
            "--tag",
            "v1",
            "-n",
            "1",
        ])
        .await;
    assert_clean(&push);
    let (_, digests) = pier.image_bytes("bench/t", "v1").await;
    let layer = &digests[1];
    let hex = layer.strip_prefix("sha256:").unwrap();
    let path: PathBuf = pier
        .dir
        .path()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    let plain = pier
        .bench(&["blob", "--repo", "bench/t", "--digest", layer, "-n", "3"])
        .await;
    assert_clean(&plain);
    assert_eq!(plain.summary.bytes_received, 3 * 64 * 1024);

    let verified = pier
        .bench(&[
            "blob", "--repo", "bench/t", "--digest", layer, "--verify", "-n", "3",
        ])
        .await;
    let s = &verified.summary;
    assert_eq!(s.requests, 3);
    assert_eq!(s.failed_operations, 3);
    assert_eq!(s.errors_by_kind.get("digest_mismatch"), Some(&3));

    // An unknown blob is an http_404.
    let missing = format!("sha256:{}", "0".repeat(64));
    let r = pier
        .bench(&["blob", "--repo", "bench/t", "--digest", &missing, "-n", "2"])
        .await;
    assert_eq!(r.summary.errors_by_kind.get("http_404"), Some(&2));
}

#[tokio::test]
async fn an_unreachable_registry_is_a_connect_error() {
    // A loopback port nothing listens on any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let registry = format!("http://127.0.0.1:{port}");
    let digest = format!("sha256:{}", "0".repeat(64));
    let cli = Cli::try_parse_from([
        "bench",
        "--registry",
        &registry,
        "--no-progress",
        "blob",
        "--repo",
        "a",
        "--digest",
        &digest,
        "-n",
        "3",
    ])
    .unwrap();
    let r = pier_bench::run(&cli.bench, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(r.summary.failed_operations, 3);
    assert_eq!(r.summary.errors_by_kind.get("connect"), Some(&3));
    // Nothing but failures: `pier bench` exits non-zero saying so.
    assert_eq!(r.all_failed(), Some((3, "connect: 3".to_string())));
}

#[tokio::test]
async fn duration_bounded_mixed_run_stops_by_itself() {
    let pier = start_pier().await;
    let started = std::time::Instant::now();
    let r = pier
        .bench(&[
            "mixed",
            "--repo",
            "bench/mixed",
            "--layer-size",
            "32KiB",
            "--push-ratio",
            "0.5",
            "-c",
            "3",
            "-d",
            "300ms",
        ])
        .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_clean(&r);
    assert_eq!(r.limit, Limit::Duration(0.3));
    assert!(r.summary.duration_s >= 0.3 && r.summary.duration_s < 2.0);
    assert!(kind(&r, "manifest_put") > 0 && kind(&r, "manifest_get") > 0);
    // The image pulled was pushed before the clock started.
    assert_eq!(r.options["pull"]["images"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn cancelling_gives_a_partial_report() {
    let pier = start_pier().await;
    pier.bench(&[
        "push",
        "--repo",
        "bench/c",
        "--layer-size",
        "16KiB",
        "--tag",
        "v1",
        "-n",
        "1",
    ])
    .await;
    let cli = Cli::try_parse_from([
        "bench",
        "--registry",
        &pier.url,
        "--no-progress",
        "pull",
        "--image",
        "bench/c:v1",
        "-d",
        "1h",
    ])
    .unwrap();
    let stop = CancellationToken::new();
    let cancel = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
    });
    let r = pier_bench::run(&cli.bench, stop).await.unwrap();
    assert!(r.interrupted);
    assert!(r.summary.operations > 0);
    assert!(r.duration_s < 5.0);
}

#[tokio::test]
async fn json_round_trip_and_compare() {
    let pier = start_pier().await;
    let first = pier
        .bench(&[
            "push",
            "--repo",
            "bench/j",
            "--layer-size",
            "16KiB",
            "--tag",
            "v1",
            "-n",
            "3",
        ])
        .await;
    let json = first.to_json().unwrap();
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    for key in [
        "scenario",
        "concurrency",
        "duration_s",
        "registry",
        "pier_version",
        "summary",
    ] {
        assert!(value.get(key).is_some(), "{key} missing from {json}");
    }
    assert_eq!(
        value["summary"]["latency_ms"]["p99"],
        first.summary.latency_ms.p99
    );

    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("first.json");
    std::fs::write(&saved, &json).unwrap();
    let loaded = Report::load(&saved).unwrap();
    assert_eq!(loaded, first);

    // Against itself: no change, like for like.
    let same = Comparison::new(&loaded, &first, &saved);
    assert_eq!(same.req_per_s.change_pct, Some(0.0));
    assert!(same.differences.is_empty(), "{:?}", same.differences);

    let mut second = pier
        .bench(&[
            "push",
            "--repo",
            "bench/j",
            "--layer-size",
            "16KiB",
            "--tag",
            "v1",
            "-n",
            "3",
            "-c",
            "2",
        ])
        .await;
    let c = Comparison::new(&loaded, &second, &saved);
    assert_eq!(c.req_per_s.before, first.summary.req_per_s);
    assert_eq!(c.req_per_s.after, second.summary.req_per_s);
    let expected =
        (second.summary.req_per_s - first.summary.req_per_s) / first.summary.req_per_s * 100.0;
    assert!((c.req_per_s.change_pct.unwrap() - expected).abs() < 1e-3);
    assert_eq!(c.p99_ms.after, second.summary.latency_ms.p99);
    assert!(c.differences.iter().any(|d| d.starts_with("concurrency")));
    second.compare = Some(c);
    let table = second.to_table();
    assert!(table.contains("compared with"), "{table}");
    assert!(table.contains("not like for like: concurrency"), "{table}");
    // The comparison survives the JSON too.
    let again: Report = serde_json::from_str(&second.to_json().unwrap()).unwrap();
    assert_eq!(again, second);

    std::fs::write(&saved, "{\"not\": \"a report\"}").unwrap();
    assert!(Report::load(&saved).is_err());
}

#[tokio::test]
async fn ramp_steps_until_p99_passes_the_limit() {
    let pier = start_pier().await;
    pier.bench(&[
        "push",
        "--repo",
        "bench/r",
        "--layer-size",
        "16KiB",
        "--tag",
        "v1",
        "-n",
        "1",
    ])
    .await;
    let pull = ["pull", "--image", "bench/r:v1", "--manifests-only"];

    // A generous limit: every step is good, the ramp ends at MAX.
    let mut args = pull.to_vec();
    args.extend([
        "--ramp",
        "1:2:5",
        "--p99-limit",
        "10s",
        "--step-duration",
        "150ms",
    ]);
    let r = pier.bench(&args).await;
    let ramp = r.ramp.as_ref().expect("a ramp report");
    let concurrencies: Vec<usize> = ramp.steps.iter().map(|s| s.summary.concurrency).collect();
    assert_eq!(concurrencies, [1, 3, 5]);
    assert!(ramp.steps.iter().all(|s| s.good && s.summary.requests > 0));
    assert_eq!(ramp.last_good_concurrency, Some(5));
    assert_eq!(r.summary.concurrency, 5);
    assert_eq!(r.limit, Limit::Ramp);
    assert!(r.to_table().contains("last good concurrency: 5"));

    // An impossible limit: the first step fails and nothing is good.
    let mut args = pull.to_vec();
    args.extend([
        "--ramp",
        "1:1:4",
        "--p99-limit",
        "1us",
        "--step-duration",
        "100ms",
    ]);
    let r = pier.bench(&args).await;
    let ramp = r.ramp.as_ref().unwrap();
    assert_eq!(ramp.steps.len(), 1);
    assert!(!ramp.steps[0].good);
    assert_eq!(ramp.last_good_concurrency, None);
    assert_eq!(r.summary.concurrency, 1);
}

#[tokio::test]
async fn inconsistent_arguments_are_refused() {
    let pier = start_pier().await;
    for args in [
        vec!["pull"],
        vec!["pull", "--image", "a:b", "--ramp", "1:1:2"],
        vec!["pull", "--image", "a:b", "--p99-limit", "5ms"],
        vec![
            "pull",
            "--image",
            "a:b",
            "--ramp",
            "1:1:2",
            "--p99-limit",
            "5ms",
            "-c",
            "3",
        ],
        vec!["push", "--layers", "0"],
        vec!["mixed", "--image", "a:b", "--push-ratio", "1.5"],
    ] {
        let mut argv = vec!["bench", "--registry", &pier.url, "--no-progress"];
        argv.extend(&args);
        let cli = Cli::try_parse_from(&argv).unwrap();
        let e = pier_bench::run(&cli.bench, CancellationToken::new()).await;
        assert!(
            matches!(e, Err(pier_bench::BenchError::Usage(_))),
            "{args:?} was accepted"
        );
    }
}

#[tokio::test]
async fn server_pid_adds_the_servers_cpu_per_gib() {
    let pier = start_pier().await;
    // The server runs inside this test process, so its pid is ours.
    let pid = std::process::id().to_string();
    let push = pier
        .bench(&[
            "push",
            "--repo",
            "bench/cpu",
            "--layer-size",
            "4MiB",
            "-n",
            "8",
            "--server-pid",
            &pid,
        ])
        .await;
    assert_clean(&push);
    let s = &push.summary;
    let cpu = s
        .server_cpu_s
        .expect("--server-pid reports the server's CPU");
    let per_gib = s.cpu_s_per_gib.expect("bytes moved, so a per-GiB figure");
    assert!(cpu > 0.0, "hashing 32 MiB costs some CPU: {cpu}");
    let gib = s.bytes as f64 / (1u64 << 30) as f64;
    assert!(
        (per_gib - cpu / gib).abs() <= 0.01 * per_gib + 0.001,
        "{per_gib} vs {cpu} / {gib}"
    );
    assert!(
        push.to_table().contains("server cpu: "),
        "{}",
        push.to_table()
    );
    let json: serde_json::Value = serde_json::from_str(&push.to_json().unwrap()).unwrap();
    assert!(json["summary"]["cpu_s_per_gib"].as_f64().is_some());

    // Without the flag the figures are absent, not zero.
    let plain = pier
        .bench(&[
            "push",
            "--repo",
            "bench/cpu",
            "--layer-size",
            "4KiB",
            "-n",
            "1",
        ])
        .await;
    assert_eq!(plain.summary.server_cpu_s, None);
    assert!(!plain.to_table().contains("server cpu"));
    let json = plain.to_json().unwrap();
    assert!(!json.contains("cpu_s_per_gib"), "{json}");
}

#[tokio::test]
async fn a_server_pid_that_is_not_running_is_refused_before_the_run() {
    let pier = start_pier().await;
    let argv = [
        "pier-bench",
        "--registry",
        &pier.url,
        "push",
        "-n",
        "1",
        "--server-pid",
        "4294967295",
    ];
    let cli = Cli::try_parse_from(argv).unwrap();
    let err = pier_bench::run(&cli.bench, CancellationToken::new())
        .await
        .expect_err("no such process");
    assert!(err.to_string().contains("--server-pid 4294967295"), "{err}");
}
