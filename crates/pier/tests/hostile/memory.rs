//! Memory and upstream limits: many fills at once against `[mirror] fill_memory`, endless and
//! oversized upstream bodies against `max_blob_size`, silent and closed upstreams (the error
//! says why, and a silent one costs one first-byte timeout), and remembered upstream 404s.
//!
//! The upstream is a small server in this file serving deterministic bytes from [`Gen`], so
//! each case can make it misbehave exactly one way and count what pier asked it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use futures::StreamExt;

use crate::common::{error_code, free_port, gen_digest, Gen, Metrics, Pier};

const MIB: u64 = 1024 * 1024;

/// How the test upstream answers for one blob.
#[derive(Clone, Copy)]
enum Blob {
    /// `len` bytes of seed `seed`, with Content-Length.
    Bytes { seed: u64, len: u64 },
    /// Chunked bytes of seed `seed` that never end.
    Endless { seed: u64 },
    /// A Content-Length of `len` and (as far as pier reads) a body to match.
    Claims { len: u64 },
}

#[derive(Default)]
struct UpstreamState {
    blobs: Mutex<HashMap<String, Blob>>,
    /// Requests by path.
    requests: Mutex<HashMap<String, u64>>,
    /// Body bytes handed to the network.
    sent: AtomicU64,
}

/// The test upstream registry.
struct Upstream {
    state: Arc<UpstreamState>,
    port: u16,
}

impl Upstream {
    async fn start() -> Upstream {
        let state = Arc::new(UpstreamState::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the test upstream");
        let port = listener.local_addr().expect("local addr").port();
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream { state, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn add(&self, digest: &str, blob: Blob) {
        self.state
            .blobs
            .lock()
            .unwrap()
            .insert(digest.to_string(), blob);
    }

    fn requests(&self, path: &str) -> u64 {
        self.state
            .requests
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

/// A stream of `len` bytes (`None`: endless) of seed `seed`, counting what it yields.
fn gen_body(state: Arc<UpstreamState>, seed: u64, len: Option<u64>) -> Body {
    let chunk = 64 * 1024;
    let s = futures::stream::unfold((Gen::new(seed), 0u64), move |(mut g, pos)| {
        let state = state.clone();
        async move {
            let n = len.map_or(chunk, |l| l.saturating_sub(pos).min(chunk));
            if n == 0 {
                return None;
            }
            let mut buf = vec![0u8; n as usize];
            g.fill(&mut buf);
            state.sent.fetch_add(n, Ordering::Relaxed);
            Some((Ok::<_, std::io::Error>(buf), (g, pos + n)))
        }
    });
    Body::from_stream(s)
}

async fn answer(State(s): State<Arc<UpstreamState>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    *s.requests.lock().unwrap().entry(path.clone()).or_default() += 1;
    if path == "/v2/" {
        return Response::new(Body::empty());
    }
    let digest = path.rsplit('/').next().unwrap_or("").to_string();
    let blob = s.blobs.lock().unwrap().get(&digest).copied();
    let head = req.method() == axum::http::Method::HEAD;
    let not_found = || {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}"#,
            ))
            .unwrap()
    };
    let Some(blob) = blob.filter(|_| path.contains("/blobs/")) else {
        return not_found();
    };
    let b = Response::builder().header(header::CONTENT_TYPE, "application/octet-stream");
    match blob {
        Blob::Bytes { seed, len } => {
            let body = if head {
                Body::empty()
            } else {
                gen_body(s.clone(), seed, Some(len))
            };
            b.header(header::CONTENT_LENGTH, len).body(body).unwrap()
        }
        Blob::Endless { seed } => b.body(gen_body(s.clone(), seed, None)).unwrap(),
        Blob::Claims { len } => {
            let body = if head {
                Body::empty()
            } else {
                gen_body(s.clone(), 1, Some(len))
            };
            b.header(header::CONTENT_LENGTH, len).body(body).unwrap()
        }
    }
}

/// pier in `tmp` with `[mirror]` keys `mirror` and one upstream `up.test` at `endpoints`.
fn start_pier(tmp: &Path, mirror: &str, endpoints: &[String]) -> Pier {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    let config = format!(
        "[mirror]\ndefault_upstream = \"\"\nbuiltin_upstreams = false\n{mirror}\n\n\
         [[upstream]]\nname = \"up.test\"\nendpoints = [{}]\n",
        endpoints.join(", ")
    );
    Pier::with_config(&tmp.join("pier"), &config, &[])
}

fn blob_url(pier: &Pier, digest: &str) -> String {
    format!("{}/v2/up.test/test/blob/blobs/{digest}", pier.url())
}

fn upstream_path(digest: &str) -> String {
    format!("/v2/test/blob/blobs/{digest}")
}

/// Resident memory of process `pid` in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Bytes of files under `dir`.
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                total += du(&e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

/// Read a response body to its end or its first error, pausing after each chunk if asked:
/// (sha256 of what came, bytes, error).
async fn drain(resp: reqwest::Response, pause: Option<Duration>) -> (String, u64, Option<String>) {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => {
                h.update(&c);
                n += c.len() as u64;
                if let Some(p) = pause {
                    tokio::time::sleep(p).await;
                }
            }
            Err(e) => return (String::new(), n, Some(e.to_string())),
        }
    }
    (format!("sha256:{}", hex::encode(h.finalize())), n, None)
}

/// `GET url` expecting an error answer: its status, body and the body as text.
async fn get_error(http: &reqwest::Client, url: &str) -> (reqwest::StatusCode, Vec<u8>, String) {
    let resp = http.get(url).send().await.expect("GET");
    let status = resp.status();
    let body = resp.bytes().await.expect("body").to_vec();
    let text = String::from_utf8_lossy(&body).into_owned();
    (status, body, text)
}

/// `fills` concurrent cold fills of distinct `len`-byte blobs through a pier with `fill_memory`
/// of `budget` bytes (`None`: the default, 256 MiB): every blob is served whole with its digest
/// and cached, the budget is all given back, and the process's peak resident memory stays
/// within its idle baseline plus the budget plus 32 MiB.
async fn concurrent_fills_stay_within_the_budget(fills: u64, len: u64, budget: Option<u64>) {
    const SLACK: u64 = 32 * MIB;
    let tmp = tempfile::tempdir().expect("tempdir");
    let up = Upstream::start().await;
    let mut blobs = Vec::new();
    for i in 0..fills {
        let seed = 1000 + i;
        let digest = gen_digest(b"", seed, len);
        up.add(&digest, Blob::Bytes { seed, len });
        blobs.push(digest);
    }
    let config = budget.map_or(String::new(), |b| {
        format!("fill_memory = \"{}MiB\"", b / MIB)
    });
    let budget = budget.unwrap_or(256 * MIB);
    let pier = start_pier(tmp.path(), &config, &[up.url()]);
    let pid = pier.pid();
    let http = reqwest::Client::new();
    // Idle baseline once the process has settled (and has answered one request).
    let _ = pier.metrics(&http).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = rss(pid);
    let peak = Arc::new(AtomicU64::new(baseline));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // What the budget's gauge showed at its highest, to tell charged memory from the rest.
    let charged = Arc::new(AtomicU64::new(0));
    let gauge = {
        let (charged, stop, http, pier_url) = (
            charged.clone(),
            stop.clone(),
            http.clone(),
            format!("{}/metrics", pier.url()),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = http.get(&pier_url).send().await {
                    let text = r.text().await.unwrap_or_default();
                    let m = Metrics(text);
                    charged.fetch_max(
                        m.sum("pier_mirror_fill_memory_bytes", &[]) as u64,
                        Ordering::Relaxed,
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let began = Instant::now();
    let mut tasks = Vec::new();
    for (i, digest) in blobs.iter().enumerate() {
        let (http, url, digest) = (http.clone(), blob_url(&pier, digest), digest.clone());
        // Half the readers keep up; the other half lag, so their fills' windows fill up and
        // their bytes come from the spool.
        let pause = (i % 2 == 1).then_some(Duration::from_millis(2));
        tasks.push(tokio::spawn(async move {
            let resp = http.get(&url).send().await.expect("GET blob");
            assert_eq!(resp.status(), 200, "GET {url}");
            let (got, n, err) = drain(resp, pause).await;
            assert_eq!(err, None, "blob {digest} broke after {n} bytes");
            assert_eq!(
                got, digest,
                "blob {digest} served different bytes ({n} bytes)"
            );
        }));
    }
    for t in tasks {
        t.await.expect("reader task");
    }
    let took = began.elapsed();
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    gauge.await.expect("gauge sampler");
    let peak = peak.load(Ordering::Relaxed);
    // Readers get a blob's last byte once its digest matched, before the fill's fsync and
    // commit; a fill gives its memory back when it ends, so wait for every fill to end.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut m = pier.metrics(&http).await;
    while m.sum("pier_mirror_fills_in_flight", &[]) > 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        m = pier.metrics(&http).await;
    }
    assert_eq!(
        m.sum("pier_mirror_fills_in_flight", &[]),
        0.0,
        "every fill ended within 60 s of its last reader"
    );
    let held = m.sum("pier_mirror_fill_memory_bytes", &[]);
    let bound = baseline + budget + SLACK;
    println!(
        "fills: {fills} x {} MiB, fill_memory {} MiB: baseline RSS {} MiB, peak {} MiB \
         (charged at most {} MiB), bound {} MiB; {:.1} s, {:.0} MB/s",
        len / MIB,
        budget / MIB,
        baseline / MIB,
        peak / MIB,
        charged.load(Ordering::Relaxed) / MIB,
        bound / MIB,
        took.as_secs_f64(),
        (fills * len) as f64 / took.as_secs_f64() / 1e6
    );
    assert!(
        peak <= bound,
        "peak RSS {} MiB exceeds baseline {} MiB + budget {} MiB + {} MiB",
        peak / MIB,
        baseline / MIB,
        budget / MIB,
        SLACK / MIB
    );
    assert_eq!(held, 0.0, "fill memory still held after every fill ended");
    // Every blob is cached: the next reads come from disk, not the upstream.
    for digest in &blobs {
        let resp = http.get(blob_url(&pier, digest)).send().await.expect("GET");
        assert_eq!(drain(resp, None).await.0, *digest);
        assert_eq!(
            up.requests(&upstream_path(digest)),
            1,
            "{digest} fetched twice"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_fills_of_128_mib_stay_within_the_default_fill_memory() {
    concurrent_fills_stay_within_the_budget(8, 128 * MIB, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_fills_stay_within_a_64_mib_fill_memory() {
    concurrent_fills_stay_within_the_budget(32, 32 * MIB, Some(64 * MIB)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_and_twenty_eight_fills_stay_within_a_64_mib_fill_memory() {
    concurrent_fills_stay_within_the_budget(128, 16 * MIB, Some(64 * MIB)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_upstream_body_is_cut_at_max_blob_size_and_nothing_is_cached() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let up = Upstream::start().await;
    let digest = gen_digest(b"endless", 7, 1);
    up.add(&digest, Blob::Endless { seed: 7 });
    let pier = start_pier(tmp.path(), "max_blob_size = \"32MiB\"", &[up.url()]);
    let http = reqwest::Client::new();
    for round in 1..=2 {
        let resp = http
            .get(blob_url(&pier, &digest))
            .send()
            .await
            .expect("GET");
        let status = resp.status();
        let (_, n, err) = drain(resp, None).await;
        println!("endless body, round {round}: status {status}, {n} bytes, then {err:?}");
        assert!(
            status != 200 || err.is_some(),
            "an endless body was served as a complete blob ({n} bytes)"
        );
        assert!(n <= 32 * MIB, "served {n} bytes, past the 32 MiB limit");
        // Nothing was cached, so the second round asks the upstream again.
        assert_eq!(up.requests(&upstream_path(&digest)), round);
    }
    let used = du(pier.data_dir());
    println!("data dir after two cut fills: {} MiB", used / MIB);
    assert!(
        used < 40 * MIB,
        "data dir holds {used} bytes after cut fills"
    );
    assert!(
        pier.log().contains("exceeded the 33554432-byte limit"),
        "pier's log does not say the body exceeded the limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_blob_larger_than_max_blob_size_is_refused_before_download() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let up = Upstream::start().await;
    let digest = gen_digest(b"huge", 9, 1);
    up.add(&digest, Blob::Claims { len: 1024 * MIB });
    let pier = start_pier(tmp.path(), "max_blob_size = \"32MiB\"", &[up.url()]);
    let http = reqwest::Client::new();
    let (status, body, text) = get_error(&http, &blob_url(&pier, &digest)).await;
    println!("1 GiB upstream blob, 32 MiB limit: {status} {text}");
    assert_eq!(status, 502);
    assert_eq!(error_code(&body), "UNAVAILABLE");
    assert!(
        text.contains("limit"),
        "message does not name the limit: {text}"
    );
    let sent = up.state.sent.load(Ordering::Relaxed);
    assert!(
        sent < 32 * MIB,
        "upstream sent {sent} bytes of a refused blob"
    );
    assert!(
        du(pier.data_dir()) < 8 * MIB,
        "a refused blob left data behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upstream_costs_one_first_byte_timeout_and_says_timed_out() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let held = Arc::new(Mutex::new(Vec::new()));
    {
        let held = held.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = silent.accept().await {
                held.lock().unwrap().push(conn);
            }
        });
    }
    let first_byte = 2;
    let pier = start_pier(
        tmp.path(),
        &format!("upstream_first_byte_timeout = {first_byte}"),
        &[format!("http://127.0.0.1:{port}")],
    );
    let http = reqwest::Client::new();
    let url = format!("{}/v2/up.test/test/app/manifests/latest", pier.url());
    let began = Instant::now();
    let (status, _, text) = get_error(&http, &url).await;
    let took = began.elapsed();
    println!("silent upstream: {status} after {took:?}: {text}");
    assert!(status == 502 || status == 504, "status {status}");
    assert!(
        text.contains("timed out"),
        "message does not say timed out: {text}"
    );
    // One endpoint, asked once: one first-byte timeout plus generous slack, far from the
    // three retries of the timeout a silent endpoint used to cost.
    let bound = Duration::from_secs(first_byte * 2 + 5);
    assert!(took < bound, "answer took {took:?}, over {bound:?}");
    let m: Metrics = pier.metrics(&http).await;
    assert!(m.sum("pier_upstream_requests_total", &[("result", "timeout")]) >= 1.0);
    assert_eq!(
        m.sum("pier_upstream_requests_total", &[("result", "error")]),
        0.0
    );
    assert!(
        m.sum(
            "pier_mirror_requests_total",
            &[("kind", "manifest"), ("result", "timeout")]
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_says_connection_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let closed = free_port();
    let pier = start_pier(tmp.path(), "", &[format!("http://127.0.0.1:{closed}")]);
    let http = reqwest::Client::new();
    let digest = gen_digest(b"any", 1, 1);
    let (status, body, text) = get_error(&http, &blob_url(&pier, &digest)).await;
    println!("closed port: {status} {text}");
    assert_eq!(status, 502);
    assert_eq!(error_code(&body), "UNAVAILABLE");
    assert!(
        text.to_lowercase().contains("connection refused"),
        "message does not say connection refused: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_404s_are_remembered_for_negative_ttl() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let up = Upstream::start().await;
    let ttl = 3;
    let pier = start_pier(tmp.path(), &format!("negative_ttl = {ttl}"), &[up.url()]);
    let http = reqwest::Client::new();
    let digest = gen_digest(b"", 3, 1);
    let path = upstream_path(&digest);
    for _ in 0..50 {
        let resp = http
            .get(blob_url(&pier, &digest))
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), 404);
        let body = resp.bytes().await.expect("body");
        assert_eq!(error_code(&body), "BLOB_UNKNOWN");
    }
    let manifest = "/v2/test/blob/manifests/missing";
    for _ in 0..10 {
        let url = format!("{}/v2/up.test/test/blob/manifests/missing", pier.url());
        let resp = http.get(url).send().await.expect("GET");
        assert_eq!(resp.status(), 404);
        let body = resp.bytes().await.expect("body");
        assert_eq!(error_code(&body), "MANIFEST_UNKNOWN");
    }
    let blob_asks = up.requests(&path);
    let manifest_asks = up.requests(manifest);
    println!("50 blob GETs -> {blob_asks} upstream; 10 manifest GETs -> {manifest_asks} upstream");
    assert_eq!(
        blob_asks, 1,
        "missing blob asked upstream {blob_asks} times"
    );
    assert_eq!(
        manifest_asks, 1,
        "missing tag asked upstream {manifest_asks} times"
    );
    let m = pier.metrics(&http).await;
    assert_eq!(m.sum("pier_mirror_negative_hits_total", &[]), 49.0 + 9.0);
    // After the TTL the upstream is asked again, and a blob it now has is served.
    tokio::time::sleep(Duration::from_millis(ttl * 1000 + 500)).await;
    let bytes_digest = digest.clone();
    up.add(&bytes_digest, Blob::Bytes { seed: 3, len: 1 });
    let resp = http
        .get(blob_url(&pier, &digest))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    assert_eq!(drain(resp, None).await.0, gen_digest(b"", 3, 1));
    assert_eq!(up.requests(&path), 2);
}
