//! `pier status` and `pier warm` as a user runs them: the real binary against a node, judged by
//! what it prints and its exit status.
//!
//! `pier status` asks a real `pier serve`. `pier warm` asks a stub server written here that
//! answers `POST /api/v1/warm` with the event stream the node's contract describes: these tests
//! cover the client's reading of that stream and its exit statuses; the real endpoint, placing
//! real blobs on real nodes, is tested by the cluster tier.

mod common;

use std::convert::Infallible;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt as _;
use serde_json::{json, Value};

use common::{free_port, pier_cli, Launch, Pier};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// [`pier_cli`] (its stderr a pipe, so no progress bar is drawn) from async tests, off the runtime's threads so the stub keeps answering.
async fn pier_async(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        pier_cli(&args)
    })
    .await
    .expect("the pier run finished")
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// A loopback URL nothing listens on (a port that was free a moment ago).
fn dead_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

// ---------------------------------------------------------------------------------------------
// pier status against a real node
// ---------------------------------------------------------------------------------------------

#[test]
fn status_of_a_ready_node_exits_0_and_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Pier::start(&dir.path().join("data"));

    let out = pier_cli(&["status", "--url", &node.url(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(doc["ready"], json!(true), "{doc}");
    let name = doc["node"]["name"]
        .as_str()
        .expect("the node has a name")
        .to_string();
    assert!(!name.is_empty());

    // Without a scheme the URL means plain HTTP.
    let out = pier_cli(&["status", "--url", &node.host()]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let summary = text(&out.stdout);
    assert!(
        summary.starts_with(&format!("node       {name}, pier ")),
        "{summary}"
    );
    assert!(summary.contains("\nready      yes\n"), "{summary}");
    assert!(summary.contains(", writable\n"), "{summary}");
    assert!(summary.contains("0 B in 0 blobs"), "{summary}");
    // `--hosted '**'` still leaves the built-in upstreams configured.
    assert!(
        summary.contains("docker.io") && summary.contains("https://registry-1.docker.io"),
        "{summary}"
    );
}

#[test]
fn status_of_a_node_that_is_not_ready_exits_1_and_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A free-space floor no disk can meet: the node runs, but is not ready to take writes.
    let node = Pier::with_config(
        dir.path(),
        "[storage]\nmin_free_space = \"1000000TiB\"\n",
        &[],
    );

    let out = pier_cli(&["status", "--url", &node.url()]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let summary = text(&out.stdout);
    assert!(summary.contains("\nready      no\n"), "{summary}");
    assert!(summary.contains("below min_free_space"), "{summary}");
    assert!(summary.contains("NOT writable"), "{summary}");

    let out = pier_cli(&["status", "--url", &node.url(), "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(doc["ready"], json!(false));
}

#[test]
fn status_of_an_unreachable_node_exits_2_with_one_line() {
    let url = dead_url();
    for args in [
        vec!["status", "--url", &url],
        vec!["status", "--url", &url, "--json"],
    ] {
        let out = pier_cli(&args);
        assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
        let stderr = text(&out.stderr);
        assert!(
            stderr.starts_with(&format!("pier: cannot reach {url}/api/v1/status: ")),
            "{stderr}"
        );
        assert!(stderr.to_lowercase().contains("refused"), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            out.stdout.is_empty(),
            "nothing on stdout: {}",
            text(&out.stdout)
        );
    }
}

/// A status document from a newer node: members, fields and sections this client does not
/// know, and an optional section left out. Its keys are not in alphabetical order, to show that
/// `--json` keeps the node's order.
const NEWER_STATUS: &str = r#"{"node": {"name": "pier-a", "zone": "eu-1", "version": "9.0.0", "role": "edge"},
  "ready": true, "not_ready_reasons": [],
  "members": [
    {"name": "pier-a", "address": "10.0.0.1:5001", "zone": "eu-1", "state": "alive",
     "since": "2026-12-02T01:02:03.456Z", "generation": 1},
    {"name": "pier-b", "address": "10.0.0.2:5001", "zone": "eu-2", "state": "dead",
     "since": "2026-12-02T01:09:00.000Z", "generation": 2, "lag_ms": 12}],
  "cache": {"bytes": 3221225472, "blobs": 12, "evicted": 4,
            "served_bytes": {"local": 3221225472, "peer": 1073741824, "upstream": 0}},
  "upstreams": [],
  "sync": {"jobs": {"queued": 3}}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_newer_documents_and_refuses_what_is_not_one() {
    let app = Router::new()
        .route(
            "/newer/api/v1/status",
            get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    NEWER_STATUS,
                )
            }),
        )
        .route(
            "/other/api/v1/status",
            get(|| async { Json(json!({"hello": "world"})) }),
        );
    let base = serve_stub(app).await;

    let newer = format!("{base}/newer");
    let out = pier_async(&["status", "--url", &newer]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let summary = text(&out.stdout);
    assert!(
        summary.contains("pier-a, zone eu-1, pier 9.0.0"),
        "{summary}"
    );
    assert!(summary.contains("3.0 GiB in 12 blobs"), "{summary}");
    assert!(summary.contains("100.0 % by bytes"), "{summary}");
    assert!(
        summary.contains("NAME    ADDRESS        ZONE  STATE  SINCE\n"),
        "{summary}"
    );
    assert!(
        summary.contains("pier-b  10.0.0.2:5001  eu-2  dead   2026-12-02T01:09:00.000Z\n"),
        "{summary}"
    );
    assert!(
        !summary.contains("storage"),
        "no storage section: {summary}"
    );

    // --json prints the document as sent: the same values, in the node's key order.
    let out = pier_async(&["status", "--url", &newer, "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let printed: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let sent: Value = serde_json::from_str(NEWER_STATUS).expect("the stub's JSON");
    assert_eq!(printed, sent);
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("{\n  \"node\": {\n    \"name\": \"pier-a\","),
        "{stdout}"
    );

    for (path, cause) in [
        ("/other", "the answer is not a status document"),
        ("/missing", "the node answered 404 Not Found"),
    ] {
        let url = format!("{base}{path}");
        let out = pier_async(&["status", "--url", &url]).await;
        assert_eq!(out.status.code(), Some(2), "{path}: {}", describe(&out));
        let stderr = text(&out.stderr);
        assert!(
            stderr.starts_with(&format!("pier: cannot reach {url}/api/v1/status: {cause}")),
            "{path}: {stderr}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// pier warm against a stub of the node's warm endpoint
// ---------------------------------------------------------------------------------------------

/// Serve `app` on a loopback port for the rest of the test; its base URL.
async fn serve_stub(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the stub");
    let addr = listener.local_addr().expect("stub address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

const BLOB_A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const BLOB_B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn placed(blob: &str, node: &str, error: Option<&str>) -> Value {
    json!({"event": "placed", "blob": blob, "node": node, "ok": error.is_none(),
           "bytes": 1234, "error": error})
}

/// The events the stub sends for `image`, by the image's repository: `ok/…` places two blobs on
/// two nodes (with an event this client does not know in between), `partial/…` fails one
/// placement, `cut/…` stops before its summary. None means "answer with an error".
fn events(image: &str) -> Option<Vec<Value>> {
    let plan = |total: u64| json!({"event": "plan", "image": image, "blobs": 2, "targets": 2, "total": total});
    let summary = |ok: bool, placed: u64, failed: u64| json!({"event": "summary", "image": image, "ok": ok, "placed": placed, "failed": failed});
    let repo = image.split('/').next().unwrap_or_default();
    Some(match repo {
        "ok" => vec![
            plan(4),
            placed(BLOB_A, "pier-a", None),
            placed(BLOB_A, "pier-b", None),
            json!({"event": "note", "text": "an event from a newer node"}),
            placed(BLOB_B, "pier-a", None),
            placed(BLOB_B, "pier-b", None),
            summary(true, 4, 0),
        ],
        "partial" => vec![
            plan(2),
            placed(BLOB_A, "pier-a", None),
            placed(BLOB_B, "pier-b", Some("pier-b: connection refused")),
            summary(false, 1, 1),
        ],
        "cut" => vec![plan(2), placed(BLOB_A, "pier-a", None)],
        _ => return None,
    })
}

/// The lines of `events`, each sent in two pieces with a pause between, so the client must
/// put lines back together across reads as a real stream may cut them anywhere.
fn event_stream(events: Vec<Value>) -> Body {
    let mut pieces = Vec::new();
    for event in events {
        let line = format!("{event}\n");
        let (head, tail) = line.split_at(line.len() / 2);
        pieces.push(Bytes::from(head.to_string()));
        pieces.push(Bytes::from(tail.to_string()));
    }
    Body::from_stream(futures::stream::iter(pieces).then(|piece| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok::<_, Infallible>(piece)
    }))
}

type Requests = Arc<Mutex<Vec<Value>>>;

async fn warm(State(requests): State<Requests>, Json(request): Json<Value>) -> Response {
    requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(request.clone());
    let image = request["image"].as_str().unwrap_or_default();
    match events(image) {
        Some(events) => (
            [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
            event_stream(events),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"errors": [{"code": "MANIFEST_UNKNOWN",
                "message": format!("manifest unknown: {image}"), "detail": null}]})),
        )
            .into_response(),
    }
}

/// A stub warm endpoint; its base URL and the requests it got.
async fn warm_stub() -> (String, Requests) {
    let requests = Requests::default();
    let app = Router::new()
        .route("/api/v1/warm", post(warm))
        .with_state(requests.clone());
    (serve_stub(app).await, requests)
}

fn requests_of(requests: &Requests) -> Vec<Value> {
    requests.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_exits_0_when_every_image_is_placed() {
    let (url, requests) = warm_stub().await;
    let out = pier_async(&[
        "warm",
        "--url",
        &url,
        "--replicas",
        "3",
        "ok/app:v1",
        "ok/db:v2",
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = text(&out.stdout);
    for image in ["ok/app:v1", "ok/db:v2"] {
        assert!(
            stdout.contains(&format!(
                "{image}: 4 placements made, 0 failed (2 blobs, 2 target nodes)\n"
            )),
            "{stdout}"
        );
    }
    assert!(out.stderr.is_empty(), "{}", describe(&out));
    assert_eq!(
        requests_of(&requests),
        vec![
            json!({"image": "ok/app:v1", "replicas": 3, "all_nodes": false}),
            json!({"image": "ok/db:v2", "replicas": 3, "all_nodes": false}),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_json_prints_every_event_line_as_received() {
    let (url, requests) = warm_stub().await;
    let out = pier_async(&["warm", "--url", &url, "--all-nodes", "--json", "ok/app:v1"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let expected: Vec<String> = events("ok/app:v1")
        .expect("a scripted image")
        .iter()
        .map(Value::to_string)
        .collect();
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected, "{stdout}");
    assert_eq!(
        requests_of(&requests),
        vec![json!({"image": "ok/app:v1", "replicas": null, "all_nodes": true})]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_exits_1_when_anything_was_not_placed_and_still_warms_the_rest() {
    let (url, requests) = warm_stub().await;
    let images = [
        "partial/app:v1",
        "missing/app:v1",
        "cut/app:v1",
        "ok/app:v1",
    ];
    let mut args = vec!["warm", "--url", &url];
    args.extend(images);
    let out = pier_async(&args).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        stderr.contains(&format!(
            "pier: warm partial/app:v1: {BLOB_B} on pier-b: pier-b: connection refused\n"
        )),
        "{stderr}"
    );
    assert!(
        stdout.contains(
            "partial/app:v1: 1 placement made, 1 failed (2 blobs, 2 target nodes): NOT warm\n"
        ),
        "{stdout}"
    );
    assert!(
        stderr.contains("pier: warm missing/app:v1: manifest unknown: missing/app:v1\n"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pier: warm cut/app:v1: the node ended the stream before its summary\n"),
        "{stderr}"
    );
    assert!(
        stdout.contains("ok/app:v1: 4 placements made, 0 failed"),
        "{stdout}"
    );
    assert_eq!(
        requests_of(&requests).len(),
        images.len(),
        "every image was asked for"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_of_an_unreachable_node_exits_2_with_one_line() {
    let url = dead_url();
    let out = pier_async(&["warm", "--url", &url, "ok/app:v1", "ok/db:v2"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!("pier: cannot reach {url}/api/v1/warm: ")),
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "one message, not one per image: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_refuses_replicas_with_all_nodes_before_asking() {
    let (url, requests) = warm_stub().await;
    let out = pier_async(&[
        "warm",
        "--url",
        &url,
        "--replicas",
        "2",
        "--all-nodes",
        "ok/app:v1",
    ])
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("'--replicas <N>' cannot be used with '--all-nodes'"),
        "{}",
        describe(&out)
    );
    assert!(requests_of(&requests).is_empty(), "nothing was asked");

    let out = pier_async(&["warm", "--url", &url, "--replicas", "0", "ok/app:v1"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(requests_of(&requests).is_empty(), "nothing was asked");
}

// ---------------------------------------------------------------------------------------------
// What the status document says about a node outside a cluster and its upstreams
// ---------------------------------------------------------------------------------------------

async fn status_of(http: &reqwest::Client, node: &Pier) -> Value {
    common::get_json(http, &format!("{}/api/v1/status", node.url())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_outside_a_cluster_goes_by_its_node_name_and_zone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Launch::in_dir(dir.path())
        .args([
            "--hosted",
            "**",
            "--node-name",
            "uinode",
            "--zone",
            "rack-7",
        ])
        .start();
    let http = reqwest::Client::new();
    let doc = status_of(&http, &node).await;
    assert_eq!(doc["node"]["name"], "uinode", "{doc}");
    assert_eq!(doc["node"]["zone"], "rack-7", "{doc}");
    assert_eq!(doc["members"][0]["name"], "uinode", "{doc}");
    assert_eq!(
        doc["members"].as_array().map(Vec::len),
        Some(1),
        "a cluster of one: {doc}"
    );

    let out = pier_async(&["status", "--url", &node.url()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        text(&out.stdout).starts_with("node       uinode, zone rack-7, pier "),
        "{}",
        describe(&out)
    );
}

/// The state of the endpoint `url` of upstream `name` in a status document.
fn endpoint<'a>(doc: &'a Value, name: &str, url: &str) -> &'a Value {
    doc["upstreams"]
        .as_array()
        .and_then(|ups| ups.iter().find(|u| u["name"] == name))
        .and_then(|u| u["endpoints"].as_array())
        .and_then(|eps| eps.iter().find(|e| e["url"] == url))
        .unwrap_or_else(|| panic!("no endpoint {url} of {name}: {doc}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_health_is_unknown_until_a_request_sees_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let http = reqwest::Client::new();
    // The upstream that answers: another pier, holding one blob.
    let origin = Pier::start(&dir.path().join("origin"));
    let blob = b"a blob behind a healthy upstream".to_vec();
    let digest = common::digest_of(&blob);
    let pushed = http
        .post(format!(
            "{}/v2/team/app/blobs/uploads/?digest={digest}",
            origin.url()
        ))
        .body(blob.clone())
        .send()
        .await
        .expect("push the blob");
    assert_eq!(pushed.status(), StatusCode::CREATED);
    let dead = dead_url();
    let node = Pier::with_config(
        dir.path(),
        &format!(
            "[[upstream]]\nname = \"up.test\"\nendpoints = [\"{}\"]\n\n\
             [[upstream]]\nname = \"dead.test\"\nendpoints = [\"{dead}\"]\n",
            origin.url()
        ),
        &[],
    );

    // Nothing was asked yet: every endpoint, the built-in ones included, is unknown.
    let doc = status_of(&http, &node).await;
    let all: Vec<&Value> = doc["upstreams"]
        .as_array()
        .expect("upstreams")
        .iter()
        .flat_map(|u| u["endpoints"].as_array().expect("endpoints"))
        .collect();
    assert_eq!(
        all.len(),
        9,
        "seven built-in upstreams and two configured: {doc}"
    );
    for e in &all {
        assert_eq!(e["state"], "unknown", "{doc}");
        assert_eq!(e["healthy"], false, "never seen is not healthy: {doc}");
    }
    let m = node.metrics(&http).await;
    let docker = [("upstream", "docker.io"), ("state", "unknown")];
    assert_eq!(
        m.sum("pier_upstream_endpoint_state", &docker),
        1.0,
        "{}",
        m.0
    );
    assert_eq!(
        m.sum(
            "pier_upstream_endpoint_state",
            &[("upstream", "docker.io"), ("state", "healthy")]
        ),
        0.0,
        "{}",
        m.0
    );
    assert!(
        !m.0.contains("pier_upstream_endpoint_healthy{"),
        "no endpoint is called healthy or benched before anything reached it:\n{}",
        m.0
    );
    let out = pier_async(&["status", "--url", &node.url()]).await;
    let summary = text(&out.stdout);
    assert!(
        summary
            .lines()
            .any(|l| l.contains("https://registry-1.docker.io")
                && l.ends_with("unknown (not tried yet)")),
        "{summary}"
    );
    assert!(!summary.contains("healthy"), "{summary}");

    // One pull through each configured upstream: the live one answers, the dead one fails.
    let got = http
        .get(format!(
            "{}/v2/team/app/blobs/{digest}?ns=up.test",
            node.url()
        ))
        .send()
        .await
        .expect("pull through up.test");
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.bytes().await.expect("body").to_vec(), blob);
    // A blob nobody stores: the one above is in the node's store now, whatever the upstream.
    let elsewhere = common::digest_of(b"only the dead upstream would have this");
    let failed = http
        .get(format!(
            "{}/v2/team/app/blobs/{elsewhere}?ns=dead.test",
            node.url()
        ))
        .send()
        .await
        .expect("pull through dead.test");
    assert!(failed.status().is_server_error(), "{}", failed.status());

    let doc = status_of(&http, &node).await;
    let up = endpoint(&doc, "up.test", &origin.url());
    assert_eq!(
        (&up["state"], &up["healthy"]),
        (&json!("healthy"), &json!(true)),
        "{doc}"
    );
    let down = endpoint(&doc, "dead.test", &dead);
    assert_eq!(
        (&down["state"], &down["healthy"]),
        (&json!("unhealthy"), &json!(false)),
        "{doc}"
    );
    let docker = endpoint(&doc, "docker.io", "https://registry-1.docker.io");
    assert_eq!(docker["state"], "unknown", "still never asked: {doc}");
    let m = node.metrics(&http).await;
    let up_labels = [("upstream", "up.test")];
    assert_eq!(
        m.sum("pier_upstream_endpoint_healthy", &up_labels),
        1.0,
        "{}",
        m.0
    );
    let healthy = [("upstream", "up.test"), ("state", "healthy")];
    assert_eq!(
        m.sum("pier_upstream_endpoint_state", &healthy),
        1.0,
        "{}",
        m.0
    );
    let unhealthy = [("upstream", "dead.test"), ("state", "unhealthy")];
    assert_eq!(
        m.sum("pier_upstream_endpoint_state", &unhealthy),
        1.0,
        "{}",
        m.0
    );
    let unknown = [("upstream", "dead.test"), ("state", "unknown")];
    assert_eq!(
        m.sum("pier_upstream_endpoint_state", &unknown),
        0.0,
        "{}",
        m.0
    );
}
