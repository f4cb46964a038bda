//! The mirror, in process: pier's whole router on a loopback port in front of a fake upstream
//! registry that counts what it is asked and can fail in the ways real upstreams do (down,
//! corrupt bytes, cut streams, bearer tokens, moved tags). Real-registry interop lives in
//! crates/pier/tests/mirror.rs. The stores are the filesystem and redb, or S3 and PostgreSQL
//! with `PIER_TEST_BACKEND=s3pg` (scripts/test.sh runs the eviction test that way too).

#[path = "../../store/tests/support/backend.rs"]
mod backend;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use pier_mirror::metrics::MirrorMetrics;
use pier_mirror::{Mirror, UpstreamEntry};
use pier_oci::{Digest, Route};
use pier_registry::{Limits, Registry};
use pier_server::metrics::Metrics;
use pier_server::AppState;
use pier_store::BlobStore;
use pier_upstream::{Upstream, UpstreamConfig};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// How the fake upstream behaves right now.
#[derive(Default)]
struct Behaviour {
    /// Answer everything with 503.
    down: bool,
    /// Flip one byte in blob bodies.
    corrupt: bool,
    /// Cut the first blob GET (without Range) after this many bytes.
    cut_after: Option<usize>,
    /// Demand bearer tokens; `Some(true)` when the token endpoint wants Basic credentials.
    token: Option<bool>,
    /// Send blob bodies in pieces with a pause, so concurrent clients overlap.
    slow: bool,
    /// Answer the next blob GET with 429 and `Retry-After: 1`.
    throttle_once: bool,
    /// Hold the next blob GET's response headers back this long.
    stall_once: Option<Duration>,
}

#[derive(Default)]
struct Upstreamish {
    manifests: Mutex<HashMap<String, (Bytes, String)>>,
    blobs: Mutex<HashMap<String, Bytes>>,
    behaviour: Mutex<Behaviour>,
    blob_gets: AtomicUsize,
    blob_heads: AtomicUsize,
    blob_bytes: AtomicU64,
    manifest_gets: AtomicUsize,
    manifest_heads: AtomicUsize,
    token_requests: AtomicUsize,
}

type Fake = Arc<Upstreamish>;

impl Upstreamish {
    fn add_blob(&self, data: Vec<u8>) -> Digest {
        let d = Digest::sha256(&data);
        self.blobs
            .lock()
            .expect("lock")
            .insert(d.to_string(), Bytes::from(data));
        d
    }

    /// Store a manifest under its digest and `tag`; returns its digest.
    fn add_manifest(&self, repo: &str, tag: &str, blobs: &[(&Digest, usize)]) -> Digest {
        let layers: Vec<String> = blobs
            .iter()
            .map(|(d, n)| {
                format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":{n}}}"#)
            })
            .collect();
        let cfg = self.add_blob(format!("{{\"tag\":\"{tag}\"}}").into_bytes());
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cfg}","size":{}}},"layers":[{}]}}"#,
            format!("{{\"tag\":\"{tag}\"}}").len(),
            layers.join(",")
        );
        let d = Digest::sha256(body.as_bytes());
        let mut m = self.manifests.lock().expect("lock");
        let entry = (Bytes::from(body), OCI_MANIFEST.to_string());
        m.insert(format!("{repo}@{d}"), entry.clone());
        m.insert(format!("{repo}:{tag}"), entry);
        d
    }

    fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.behaviour.lock().expect("lock"));
    }
}

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn fake_registry(State(fake): State<Fake>, req: Request<Body>) -> Response {
    let path = req.uri().path().to_string();
    if path == "/token" {
        fake.token_requests.fetch_add(1, Ordering::SeqCst);
        let wants_basic = fake.behaviour.lock().expect("lock").token == Some(true);
        let has_basic = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("Basic "));
        if wants_basic && !has_basic {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        return axum::Json(serde_json::json!({"token": "good-token", "expires_in": 300}))
            .into_response();
    }
    let (down, corrupt, token, slow) = {
        let b = fake.behaviour.lock().expect("lock");
        (b.down, b.corrupt, b.token.is_some(), b.slow)
    };
    if down {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let host = req
        .headers()
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if token {
        let ok = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some("Bearer good-token");
        if !ok {
            let challenge = format!(
                r#"Bearer realm="http://{host}/token",service="fake",scope="repository:x:pull""#
            );
            return (StatusCode::UNAUTHORIZED, [("www-authenticate", challenge)]).into_response();
        }
    }
    let head = req.method() == Method::HEAD;
    match pier_oci::route::parse(&path) {
        Ok(Route::Base) => "{}".into_response(),
        Ok(Route::Manifest { name, reference }) => {
            if head {
                fake.manifest_heads.fetch_add(1, Ordering::SeqCst);
            } else {
                fake.manifest_gets.fetch_add(1, Ordering::SeqCst);
            }
            let sep = if reference.to_string().contains(':') {
                "@"
            } else {
                ":"
            };
            let key = format!("{name}{sep}{reference}");
            let found = fake.manifests.lock().expect("lock").get(&key).cloned();
            match found {
                None => StatusCode::NOT_FOUND.into_response(),
                Some((bytes, mt)) => {
                    let d = Digest::sha256(&bytes).to_string();
                    let hdrs = [
                        ("content-type", mt),
                        ("docker-content-digest", d),
                        ("content-length", bytes.len().to_string()),
                    ];
                    if head {
                        (hdrs, Body::empty()).into_response()
                    } else {
                        (hdrs, bytes).into_response()
                    }
                }
            }
        }
        Ok(Route::Blob { digest, .. }) => {
            let found = fake
                .blobs
                .lock()
                .expect("lock")
                .get(&digest.to_string())
                .cloned();
            let Some(data) = found else {
                return StatusCode::NOT_FOUND.into_response();
            };
            if head {
                fake.blob_heads.fetch_add(1, Ordering::SeqCst);
                return ([("content-length", data.len().to_string())], Body::empty())
                    .into_response();
            }
            fake.blob_gets.fetch_add(1, Ordering::SeqCst);
            let throttle = std::mem::take(&mut fake.behaviour.lock().expect("lock").throttle_once);
            if throttle {
                return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response();
            }
            let stall = fake.behaviour.lock().expect("lock").stall_once.take();
            if let Some(pause) = stall {
                tokio::time::sleep(pause).await;
            }
            let range_start = req
                .headers()
                .get("range")
                .and_then(|v| v.to_str().ok())
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|s| s.parse::<usize>().ok());
            let mut body = data.to_vec();
            if corrupt {
                let mid = body.len() / 2;
                body[mid] ^= 0xff;
            }
            let (status, start) = match range_start {
                Some(s) => (StatusCode::PARTIAL_CONTENT, s),
                None => (StatusCode::OK, 0),
            };
            let total = body.len();
            let mut slice = body[start..].to_vec();
            let cut = if range_start.is_none() {
                fake.behaviour.lock().expect("lock").cut_after.take()
            } else {
                None
            };
            fake.blob_bytes.fetch_add(
                cut.unwrap_or(slice.len()).min(slice.len()) as u64,
                Ordering::SeqCst,
            );
            let mut resp = Response::builder()
                .status(status)
                .header("content-length", slice.len().to_string());
            if status == StatusCode::PARTIAL_CONTENT {
                resp = resp.header(
                    "content-range",
                    format!("bytes {start}-{}/{total}", total - 1),
                );
            }
            let chunks: Vec<Vec<u8>> = match cut {
                Some(n) => {
                    slice.truncate(n);
                    vec![slice]
                }
                None => slice.chunks(64 * 1024).map(<[u8]>::to_vec).collect(),
            };
            let broken = cut.is_some();
            let stream = futures::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>))
                .then(move |c| async move {
                    if slow {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    c
                })
                .chain(futures::stream::iter(broken.then(|| {
                    Err(std::io::Error::other("connection cut by the test"))
                })));
            resp.body(Body::from_stream(stream)).unwrap_or_default()
        }
        Ok(Route::Tags { name }) => {
            // A first page of one tag, with the Link a registry sends for the next.
            if req.uri().query().is_some_and(|q| q.contains("n=1")) {
                let link = format!("</v2/{name}/tags/list?n=1&last=a>; rel=\"next\"");
                return (
                    [("link", link)],
                    axum::Json(serde_json::json!({"name": name.as_str(), "tags": ["a"]})),
                )
                    .into_response();
            }
            axum::Json(serde_json::json!({"name": name.as_str(), "tags": ["a", "b"]}))
                .into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    format!("http://{addr}")
}

struct Setup {
    pier: String,
    fake: Fake,
    blobs: Arc<dyn BlobStore>,
    state: AppState,
    _db: crate::backend::Guard,
    _dir: tempfile::TempDir,
}

struct Options {
    first_byte: Option<Duration>,
    endpoints_before: Vec<String>,
    tag_ttl: Duration,
    deny: Vec<String>,
    credentials: bool,
    cache: pier_server::cache::CacheSettings,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            first_byte: None,
            endpoints_before: Vec::new(),
            tag_ttl: Duration::from_secs(300),
            deny: Vec::new(),
            credentials: false,
            cache: pier_server::cache::CacheSettings::default(),
        }
    }
}

/// pier mirroring the fake upstream as `up.example` (and as the default upstream), with
/// `mine/**` hosted.
async fn setup(opts: Options) -> Setup {
    let fake: Fake = Arc::new(Upstreamish::default());
    let upstream_url = serve(
        axum::Router::new()
            .fallback(fake_registry)
            .with_state(fake.clone()),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (blobs, meta, pins, db) = crate::backend::stores_with_pins(dir.path()).await;
    let registry = Arc::new(Registry::new(
        blobs.clone(),
        meta.clone(),
        Limits::default(),
    ));
    let (metrics, mm) = Metrics::new_with(|r| Arc::new(MirrorMetrics::new(r)));
    let mut endpoints = opts.endpoints_before.clone();
    endpoints.push(upstream_url);
    let mut config = UpstreamConfig::new("up.example", endpoints);
    config.cooldown = Duration::from_secs(60);
    if let Some(t) = opts.first_byte {
        config.timeouts.first_byte = t;
    }
    if opts.credentials {
        config.username = Some("robot".into());
        config.password = Some("secret".into());
    }
    let client = Upstream::new(config, mm.clone()).expect("upstream");
    let mirror = Mirror::new(
        vec![UpstreamEntry {
            client,
            tag_ttl: opts.tag_ttl,
            allow: Vec::new(),
            deny: opts.deny,
            private: false,
            private_check_ttl: Duration::from_secs(60),
        }],
        Some("up.example".into()),
        blobs.clone(),
        meta,
        4 << 20,
        mm,
    );
    let mut state = AppState::with_mirror(registry, mirror, metrics);
    state.hosted = Arc::new(vec!["mine/**".to_string()]);
    state.cache = Arc::new(opts.cache);
    state.pins = Some(pins);
    let pier = serve(pier_server::router(state.clone())).await;
    Setup {
        pier,
        fake,
        blobs,
        state,
        _db: db,
        _dir: dir,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn get(url: &str) -> (StatusCode, HeaderMap, Result<Bytes, String>) {
    let resp = client().get(url).send().await.expect("request");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.map_err(|e| e.to_string());
    (status, headers, body)
}

fn code(body: &Result<Bytes, String>) -> String {
    let b = body.as_ref().expect("body");
    serde_json::from_slice::<serde_json::Value>(b).expect("json")["errors"][0]["code"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

async fn metrics(pier: &str) -> String {
    client()
        .get(format!("{pier}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cold_gets_fetch_once_and_all_get_the_bytes() {
    let s = setup(Options::default()).await;
    let data = pseudo_random(8 << 20, 7);
    let d = s.fake.add_blob(data.clone());
    s.fake.set(|b| b.slow = true);
    let url = format!("{}/v2/up.example/team/app/blobs/{d}", s.pier);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move { get(&url).await }));
    }
    for t in tasks {
        let (status, headers, body) = t.await.expect("task");
        assert_eq!(status, 200);
        assert_eq!(
            headers.get("content-length").and_then(|v| v.to_str().ok()),
            Some("8388608")
        );
        let body = body.expect("complete body");
        assert!(body == data, "a client got wrong bytes");
    }
    assert_eq!(
        s.fake.blob_gets.load(Ordering::SeqCst),
        1,
        "one upstream GET"
    );
    assert_eq!(s.fake.blob_bytes.load(Ordering::SeqCst), 8 << 20);
    // Clients get the last byte once the digest matched, before the fsync and commit that make
    // the blob durable: the fill ends shortly after, not necessarily already.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !metrics(&s.pier)
        .await
        .contains("pier_mirror_fills_in_flight 0")
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Warm: served locally, upstream untouched.
    let (status, _, body) = get(&url).await;
    assert_eq!(
        (status, body.expect("body") == data),
        (StatusCode::OK, true)
    );
    assert_eq!(s.fake.blob_gets.load(Ordering::SeqCst), 1);
    assert_eq!(s.blobs.stat(&d).await.expect("stat"), Some(8 << 20));
    let m = metrics(&s.pier).await;
    assert!(
        m.contains(
            r#"pier_mirror_requests_total{upstream="up.example",kind="blob",result="miss"} 1"#
        ),
        "{m}"
    );
    assert!(
        m.contains(
            r#"pier_mirror_requests_total{upstream="up.example",kind="blob",result="hit"} 1"#
        ),
        "{m}"
    );
    assert!(m.contains("pier_mirror_fills_in_flight 0"), "{m}");
}

#[tokio::test]
async fn corrupt_upstream_bytes_abort_the_response_and_nothing_is_cached() {
    let s = setup(Options::default()).await;
    let data = pseudo_random(1 << 20, 3);
    let d = s.fake.add_blob(data.clone());
    s.fake.set(|b| b.corrupt = true);
    let url = format!("{}/v2/team/app/blobs/{d}?ns=up.example", s.pier);
    let (status, _, body) = get(&url).await;
    assert_eq!(status, 200, "headers go out before the digest is known");
    assert!(
        body.is_err(),
        "the body must not end cleanly after wrong bytes"
    );
    assert_eq!(
        s.blobs.stat(&d).await.expect("stat"),
        None,
        "nothing cached"
    );
    // Once the upstream behaves, the blob is fetched again and is right.
    s.fake.set(|b| b.corrupt = false);
    let (status, _, body) = get(&url).await;
    assert_eq!(status, 200);
    assert!(body.expect("body") == data);
    assert_eq!(s.fake.blob_gets.load(Ordering::SeqCst), 2);
    let m = metrics(&s.pier).await;
    assert!(
        m.contains(r#"pier_mirror_corrupt_total{upstream="up.example"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn a_mirrored_manifest_with_wrong_descriptor_sizes_is_not_served() {
    let s = setup(Options::default()).await;
    let layer = s.fake.add_blob(b"ab".to_vec());
    let liar = s.fake.add_manifest("team/liar", "v1", &[(&layer, 999)]);
    let by_tag = format!("{}/v2/up.example/team/liar/manifests/v1", s.pier);
    let by_digest = format!("{}/v2/up.example/team/liar/manifests/{liar}", s.pier);
    for url in [&by_tag, &by_digest] {
        let (status, _, body) = get(url).await;
        assert_eq!(
            (status, code(&body).as_str()),
            (StatusCode::BAD_GATEWAY, "UNAVAILABLE")
        );
        let text = String::from_utf8_lossy(body.as_ref().expect("body")).into_owned();
        assert!(
            text.contains(&format!("{layer} says 999 bytes, the blob has 2")),
            "the message says which descriptor: {text}"
        );
    }
    assert!(
        s.state
            .registry
            .meta_store()
            .manifest("up.example/team/liar", &liar)
            .await
            .expect("meta")
            .is_none(),
        "nothing cached"
    );
    let m = metrics(&s.pier).await;
    assert!(
        m.contains(r#"pier_mirror_corrupt_total{upstream="up.example"} 2"#),
        "{m}"
    );
    // A blob the cache already holds is measured there: cached, then described wrongly.
    let (status, _, _) = get(&format!("{}/v2/up.example/team/liar/blobs/{layer}", s.pier)).await;
    assert_eq!(status, 200);
    fills_done(&s.pier).await;
    s.fake.blobs.lock().expect("lock").clear();
    s.fake.add_manifest("team/liar", "v2", &[(&layer, 3)]);
    let (status, _, body) = get(&format!("{}/v2/up.example/team/liar/manifests/v2", s.pier)).await;
    assert_eq!(
        (status, code(&body).as_str()),
        (StatusCode::BAD_GATEWAY, "UNAVAILABLE")
    );
    // The same image with the true size is served.
    s.fake.add_manifest("team/liar", "v3", &[(&layer, 2)]);
    let (status, _, _) = get(&format!("{}/v2/up.example/team/liar/manifests/v3", s.pier)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_cut_stream_resumes_with_range() {
    let s = setup(Options::default()).await;
    let data = pseudo_random(3 << 20, 5);
    let d = s.fake.add_blob(data.clone());
    s.fake.set(|b| b.cut_after = Some(1_000_000));
    let (status, _, body) = get(&format!("{}/v2/up.example/r/blobs/{d}", s.pier)).await;
    assert_eq!(status, 200);
    assert!(body.expect("body") == data, "resumed bytes must be intact");
    assert_eq!(
        s.fake.blob_gets.load(Ordering::SeqCst),
        2,
        "first GET, then a Range GET"
    );
    assert_eq!(
        s.fake.blob_bytes.load(Ordering::SeqCst),
        3 << 20,
        "no byte fetched twice"
    );
}

#[tokio::test]
async fn failover_to_the_next_endpoint_and_bench_the_dead_one() {
    // A port nothing listens on: connection refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let s = setup(Options {
        endpoints_before: vec![dead.clone()],
        ..Options::default()
    })
    .await;
    let d = s.fake.add_blob(b"failover".to_vec());
    let (status, _, body) = get(&format!("{}/v2/up.example/r/blobs/{d}", s.pier)).await;
    assert_eq!(status, 200);
    assert_eq!(body.expect("body").as_ref(), b"failover");
    let m = metrics(&s.pier).await;
    assert!(
        m.contains(&format!(
            r#"pier_upstream_endpoint_healthy{{upstream="up.example",endpoint="{dead}"}} 0"#
        )),
        "{m}"
    );
}

#[tokio::test]
async fn head_of_an_uncached_blob_does_not_download_it() {
    let s = setup(Options::default()).await;
    let d = s.fake.add_blob(pseudo_random(4096, 9));
    let resp = client()
        .head(format!("{}/v2/up.example/r/blobs/{d}", s.pier))
        .send()
        .await
        .expect("head");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some("4096")
    );
    assert_eq!(s.fake.blob_heads.load(Ordering::SeqCst), 1);
    assert_eq!(s.fake.blob_gets.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn not_found_upstream_is_a_fast_404() {
    let s = setup(Options::default()).await;
    let (status, _, body) = get(&format!("{}/v2/up.example/r/manifests/nope", s.pier)).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN".into())
    );
    let missing = Digest::sha256(b"missing");
    let (status, _, body) = get(&format!("{}/v2/up.example/r/blobs/{missing}", s.pier)).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::NOT_FOUND, "BLOB_UNKNOWN".into())
    );
}

#[tokio::test]
async fn tags_are_cached_revalidated_and_served_stale_when_the_upstream_is_down() {
    let s = setup(Options {
        tag_ttl: Duration::ZERO,
        ..Options::default()
    })
    .await;
    let layer = s.fake.add_blob(b"layer".to_vec());
    let d1 = s.fake.add_manifest("team/app", "v1", &[(&layer, 5)]);
    let url = format!("{}/v2/up.example/team/app/manifests/v1", s.pier);
    let (status, h, body) = get(&url).await;
    assert_eq!(status, 200);
    assert_eq!(
        h.get("x-pier-cache").and_then(|v| v.to_str().ok()),
        Some("miss")
    );
    assert_eq!(
        h.get("docker-content-digest").and_then(|v| v.to_str().ok()),
        Some(d1.to_string().as_str())
    );
    assert_eq!(Digest::sha256(&body.expect("body")), d1, "exact bytes");
    // TTL 0: revalidated with a HEAD, not downloaded again.
    let gets = s.fake.manifest_gets.load(Ordering::SeqCst);
    let (status, _, _) = get(&url).await;
    assert_eq!(status, 200);
    assert_eq!(
        s.fake.manifest_gets.load(Ordering::SeqCst),
        gets,
        "unchanged tag: no GET"
    );
    assert!(s.fake.manifest_heads.load(Ordering::SeqCst) >= 1);
    // The tag moves upstream: the new manifest is served.
    let d2 = s
        .fake
        .add_manifest("team/app", "v1", &[(&layer, 5), (&layer, 5)]);
    let (_, h, _) = get(&url).await;
    assert_eq!(
        h.get("docker-content-digest").and_then(|v| v.to_str().ok()),
        Some(d2.to_string().as_str())
    );
    // Upstream down: the last known manifest is served, marked stale.
    s.fake.set(|b| b.down = true);
    let (status, h, body) = get(&url).await;
    assert_eq!(status, 200);
    assert_eq!(
        h.get("x-pier-cache").and_then(|v| v.to_str().ok()),
        Some("stale")
    );
    assert_eq!(Digest::sha256(&body.expect("body")), d2);
    // ... and by digest, from cache.
    let (status, _, _) = get(&format!("{}/v2/up.example/team/app/manifests/{d1}", s.pier)).await;
    assert_eq!(status, 200);
    // A tag never seen cannot be served: 502.
    let (status, _, body) = get(&format!("{}/v2/up.example/team/app/manifests/v9", s.pier)).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_GATEWAY, "UNAVAILABLE".into())
    );
    let m = metrics(&s.pier).await;
    assert!(m.contains(r#"kind="manifest",result="stale"} 1"#), "{m}");
}

#[tokio::test]
async fn bearer_tokens_are_fetched_once_and_reused() {
    let s = setup(Options::default()).await;
    s.fake.set(|b| b.token = Some(false));
    let a = s.fake.add_blob(b"a".to_vec());
    let b = s.fake.add_blob(b"b".to_vec());
    for d in [&a, &b] {
        let (status, _, _) = get(&format!("{}/v2/up.example/r/blobs/{d}", s.pier)).await;
        assert_eq!(status, 200);
    }
    assert_eq!(s.fake.token_requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn token_endpoint_refusing_anonymous_is_403_and_credentials_fix_it() {
    let anon = setup(Options::default()).await;
    anon.fake.set(|b| b.token = Some(true));
    let layer = anon.fake.add_blob(b"l".to_vec());
    anon.fake.add_manifest("private/app", "v1", &[(&layer, 1)]);
    let (status, _, body) = get(&format!(
        "{}/v2/up.example/private/app/manifests/v1",
        anon.pier
    ))
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "DENIED".into())
    );

    let creds = setup(Options {
        credentials: true,
        ..Options::default()
    })
    .await;
    creds.fake.set(|b| b.token = Some(true));
    let layer = creds.fake.add_blob(b"l".to_vec());
    creds.fake.add_manifest("private/app", "v1", &[(&layer, 1)]);
    let (status, _, _) = get(&format!(
        "{}/v2/up.example/private/app/manifests/v1",
        creds.pier
    ))
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn routing_precedence_and_read_only_mirrors() {
    let s = setup(Options {
        deny: vec!["secret/**".into()],
        ..Options::default()
    })
    .await;
    let layer = s.fake.add_blob(b"x".to_vec());
    let d = s.fake.add_manifest("library/nginx", "1", &[(&layer, 1)]);
    // Default upstream, with Docker Hub style normalisation only for docker.io (not here).
    let (status, _, _) = get(&format!("{}/v2/library/nginx/manifests/1", s.pier)).await;
    assert_eq!(status, 200);
    // ?ns= and the path prefix reach the same cache.
    let (status, h, _) = get(&format!(
        "{}/v2/library/nginx/manifests/1?ns=up.example",
        s.pier
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        h.get("x-pier-cache").and_then(|v| v.to_str().ok()),
        Some("hit")
    );
    let (status, h, _) = get(&format!(
        "{}/v2/up.example/library/nginx/manifests/{d}",
        s.pier
    ))
    .await;
    assert_eq!(
        (status, h.get("x-pier-cache").and_then(|v| v.to_str().ok())),
        (StatusCode::OK, Some("hit"))
    );
    // Mirrored repositories are read-only.
    let resp = client()
        .post(format!(
            "{}/v2/up.example/library/nginx/blobs/uploads/",
            s.pier
        ))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 405);
    // Deny list.
    let (status, _, body) = get(&format!("{}/v2/up.example/secret/x/manifests/1", s.pier)).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "DENIED".into())
    );
    // A push into a name the default upstream serves is refused, saying why and what to do.
    let blob = b"hosted";
    let hd = Digest::sha256(blob);
    let resp = client()
        .post(format!(
            "{}/v2/library/nginx/blobs/uploads/?digest={hd}",
            s.pier
        ))
        .body(blob.to_vec())
        .send()
        .await
        .expect("push");
    assert_eq!(resp.status(), 403);
    let body = resp.bytes().await.expect("body");
    assert_eq!(code(&Ok(body.clone())), "DENIED");
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("default upstream up.example") && text.contains("[mirror] hosted"),
        "{text}"
    );
    // A hosted namespace ([mirror] hosted) takes pushes, and its reads never go upstream.
    let resp = client()
        .post(format!("{}/v2/mine/app/blobs/uploads/?digest={hd}", s.pier))
        .body(blob.to_vec())
        .send()
        .await
        .expect("push");
    assert_eq!(resp.status(), 201);
    let (status, _, body) = get(&format!("{}/v2/mine/app/blobs/{hd}", s.pier)).await;
    assert_eq!(
        (status, body.expect("body").as_ref()),
        (StatusCode::OK, &blob[..])
    );
    // A blob HEAD in a repository nobody pushed or pulled: local 404, the upstream is not asked.
    let heads = s.fake.blob_heads.load(Ordering::SeqCst);
    let resp = client()
        .head(format!("{}/v2/fresh/repo/blobs/{hd}", s.pier))
        .send()
        .await
        .expect("head");
    assert_eq!(resp.status(), 404);
    assert_eq!(s.fake.blob_heads.load(Ordering::SeqCst), heads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_does_not_cancel_the_fill() {
    let s = setup(Options::default()).await;
    let data = pseudo_random(4 << 20, 11);
    let d = s.fake.add_blob(data.clone());
    s.fake.set(|b| b.slow = true);
    let url = format!("{}/v2/up.example/r/blobs/{d}", s.pier);
    let resp = client().get(&url).send().await.expect("request");
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = body.next().await.expect("a first chunk").expect("bytes");
    assert!(!first.is_empty());
    drop(body);
    // The fill goes on without any client and lands in the store.
    let mut cached = None;
    for _ in 0..200 {
        cached = s.blobs.stat(&d).await.expect("stat");
        if cached.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(cached, Some(4 << 20), "the abandoned fill still completed");
    let (status, _, body) = get(&url).await;
    assert_eq!(status, 200);
    assert!(body.expect("body") == data);
    assert_eq!(
        s.fake.blob_gets.load(Ordering::SeqCst),
        1,
        "fetched once in all"
    );
}

#[tokio::test]
async fn referrers_of_a_mirrored_repository_fall_back_to_the_cache() {
    let s = setup(Options::default()).await;
    let layer = s.fake.add_blob(b"l".to_vec());
    let d = s.fake.add_manifest("team/app", "v1", &[(&layer, 1)]);
    let (status, _, _) = get(&format!("{}/v2/up.example/team/app/manifests/v1", s.pier)).await;
    assert_eq!(status, 200);
    // The fake upstream has no referrers API (404): pier answers from its cache, an empty index.
    let (status, h, body) = get(&format!("{}/v2/up.example/team/app/referrers/{d}", s.pier)).await;
    assert_eq!(status, 200);
    assert_eq!(
        h.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/vnd.oci.image.index.v1+json")
    );
    let index: serde_json::Value = serde_json::from_slice(&body.expect("body")).expect("json");
    assert_eq!(index["manifests"], serde_json::json!([]));
}

#[tokio::test]
async fn rate_limits_are_waited_out_and_slow_endpoints_time_out() {
    let s = setup(Options::default()).await;
    let d = s.fake.add_blob(b"limited".to_vec());
    s.fake.set(|b| b.throttle_once = true);
    let started = std::time::Instant::now();
    let (status, _, body) = get(&format!("{}/v2/up.example/r/blobs/{d}", s.pier)).await;
    assert_eq!(status, 200, "served after the 429's Retry-After");
    assert_eq!(body.expect("body").as_ref(), b"limited");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "pier waited for Retry-After: 1"
    );
    assert_eq!(
        s.fake.blob_gets.load(Ordering::SeqCst),
        2,
        "one 429, then the GET"
    );

    // An endpoint that sends no response headers in time is given up on at its first-byte
    // timeout and not asked again within the same request (a silent upstream costs one
    // timeout, not one per retry); the next request asks it again.
    let s = setup(Options {
        first_byte: Some(Duration::from_millis(300)),
        ..Options::default()
    })
    .await;
    let d = s.fake.add_blob(b"stalled".to_vec());
    s.fake.set(|b| b.stall_once = Some(Duration::from_secs(5)));
    let (status, _, body) = get(&format!("{}/v2/up.example/r/blobs/{d}", s.pier)).await;
    assert_eq!(status, 502);
    let text = String::from_utf8_lossy(&body.expect("body")).into_owned();
    assert!(text.contains("timed out"), "{text}");
    let m = metrics(&s.pier).await;
    assert!(m.contains(r#"result="timeout"} 1"#), "{m}");
    assert_eq!(s.fake.blob_gets.load(Ordering::SeqCst), 1);
    let (status, _, body) = get(&format!("{}/v2/up.example/r/blobs/{d}", s.pier)).await;
    assert_eq!(status, 200);
    assert_eq!(body.expect("body").as_ref(), b"stalled");
    assert_eq!(s.fake.blob_gets.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn mirrored_tag_lists_page_back_through_pier() {
    let s = setup(Options::default()).await;
    let (status, h, body) = get(&format!("{}/v2/up.example/team/app/tags/list?n=1", s.pier)).await;
    assert_eq!(status, 200);
    let tags: serde_json::Value = serde_json::from_slice(&body.expect("body")).expect("json");
    assert_eq!(tags["tags"], serde_json::json!(["a"]));
    // The list names the repository as the client asked for it.
    assert_eq!(tags["name"], "up.example/team/app");
    assert_eq!(
        h.get("link").and_then(|v| v.to_str().ok()),
        Some(r#"</v2/up.example/team/app/tags/list?n=1&last=a>; rel="next""#)
    );
    let (_, h, _) = get(&format!(
        "{}/v2/team/app/tags/list?n=1&ns=up.example",
        s.pier
    ))
    .await;
    assert_eq!(
        h.get("link").and_then(|v| v.to_str().ok()),
        Some(r#"</v2/team/app/tags/list?n=1&last=a&ns=up.example>; rel="next""#)
    );
}

#[tokio::test]
async fn an_unknown_ns_is_not_served_from_another_registry() {
    let s = setup(Options::default()).await;
    let layer = s.fake.add_blob(b"x".to_vec());
    let d = s
        .fake
        .add_manifest("library/small", "latest", &[(&layer, 1)]);
    // The default upstream has the image, and ?ns= naming it gets it ...
    let (status, _, _) = get(&format!(
        "{}/v2/library/small/manifests/latest?ns=up.example",
        s.pier
    ))
    .await;
    assert_eq!(status, 200);
    // ... but a registry pier does not mirror gets a 404, so containerd asks it instead.
    for path in [
        "library/small/manifests/latest".to_string(),
        format!("library/small/manifests/{d}"),
        format!("library/small/blobs/{layer}"),
        "library/small/tags/list".to_string(),
    ] {
        let (status, _, body) = get(&format!(
            "{}/v2/{path}?ns=registry.corp.example:5000",
            s.pier
        ))
        .await;
        assert_eq!(
            (status, code(&body)),
            (StatusCode::NOT_FOUND, "NAME_UNKNOWN".into()),
            "{path}"
        );
        let text = String::from_utf8_lossy(body.as_ref().expect("body")).into_owned();
        assert!(
            text.contains("does not mirror registry.corp.example:5000"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn reads_of_bad_references_and_upload_heads_are_404() {
    let s = setup(Options::default()).await;
    // Not a valid tag: nothing can have it, so a read is 404 (a push of it would be 400).
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let resp = client()
            .request(
                method.clone(),
                format!("{}/v2/mine/app/manifests/-bad-", s.pier),
            )
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 404, "{method}");
    }
    let (_, _, body) = get(&format!("{}/v2/mine/app/manifests/-bad-", s.pier)).await;
    assert_eq!(code(&body), "MANIFEST_UNKNOWN");
    let resp = client()
        .put(format!("{}/v2/mine/app/manifests/-bad-", s.pier))
        .body("{}")
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), 400);
    // HEAD of an unknown upload answers like its GET.
    let id = "01234567-89ab-cdef-0123-456789abcdef";
    let (status, _, _) = get(&format!("{}/v2/mine/app/blobs/uploads/{id}", s.pier)).await;
    let resp = client()
        .head(format!("{}/v2/mine/app/blobs/uploads/{id}", s.pier))
        .send()
        .await
        .expect("head");
    assert_eq!(
        (status, resp.status()),
        (StatusCode::NOT_FOUND, StatusCode::NOT_FOUND)
    );
}

#[tokio::test]
async fn status_reports_served_bytes_by_source_and_upstream_health() {
    let s = setup(Options::default()).await;
    let data = pseudo_random(1 << 20, 21);
    let d = s.fake.add_blob(data.clone());
    let url = format!("{}/v2/up.example/r/blobs/{d}", s.pier);
    let status = || async {
        let resp = client()
            .get(format!("{}/api/v1/status", s.pier))
            .send()
            .await
            .expect("status");
        assert_eq!(resp.status(), 200);
        resp.json::<serde_json::Value>().await.expect("status JSON")
    };
    let (code, _, body) = get(&url).await;
    assert_eq!((code, body.expect("body") == data), (StatusCode::OK, true));
    let cold = status().await;
    assert_eq!(cold["cache"]["served_bytes"]["upstream"], 1 << 20, "{cold}");
    assert_eq!(cold["cache"]["served_bytes"]["local"], 0, "{cold}");
    assert_eq!(cold["cache"]["served_bytes"]["peer"], 0, "{cold}");
    let up = &cold["upstreams"][0];
    assert_eq!(up["name"], "up.example", "{cold}");
    assert_eq!(up["endpoints"][0]["healthy"], true, "{cold}");
    // Once the fill has ended the same blob comes from the store.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !metrics(&s.pier)
        .await
        .contains("pier_mirror_fills_in_flight 0")
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, _, body) = get(&url).await;
    assert_eq!((code, body.expect("body") == data), (StatusCode::OK, true));
    let warm = status().await;
    assert_eq!(warm["cache"]["served_bytes"]["local"], 1 << 20, "{warm}");
    assert_eq!(warm["cache"]["served_bytes"]["upstream"], 1 << 20, "{warm}");
    assert!(warm["node"]["version"].is_string() && warm["node"].get("zone").is_some());
}

#[tokio::test]
async fn status_shows_a_benched_endpoint_as_unhealthy() {
    let dead = format!("http://127.0.0.1:{}", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    });
    let s = setup(Options {
        endpoints_before: vec![dead.clone()],
        ..Options::default()
    })
    .await;
    let d = s.fake.add_blob(b"via the second endpoint".to_vec());
    let (code, _, _) = get(&format!("{}/v2/up.example/r/blobs/{d}", s.pier)).await;
    assert_eq!(code, StatusCode::OK);
    let st: serde_json::Value = client()
        .get(format!("{}/api/v1/status", s.pier))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("JSON");
    let endpoints = &st["upstreams"][0]["endpoints"];
    assert_eq!(endpoints[0]["url"], dead.as_str(), "{st}");
    assert_eq!(endpoints[0]["healthy"], false, "{st}");
    assert_eq!(endpoints[1]["healthy"], true, "{st}");
}

/// Wait until no fill is running (a fill commits just after its clients got the last byte).
async fn fills_done(pier: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !metrics(pier)
        .await
        .contains("pier_mirror_fills_in_flight 0")
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eviction_keeps_the_bound_pinned_hosted_and_blobs_being_read() {
    const MIB: usize = 1 << 20;
    let s = setup(Options {
        cache: pier_server::cache::CacheSettings {
            max_bytes: Some(40 * MIB as u64),
            pins: vec!["up.example/team/pinned:v1".into()],
            every: Duration::from_secs(3600),
            ..Default::default()
        },
        ..Options::default()
    })
    .await;
    let http = client();
    // Four mirrored images (one pinned, one to be read slowly while eviction runs), one hosted.
    let mut layers = HashMap::new();
    for (i, (name, size)) in [("pinned", 8), ("reading", 32), ("old", 8), ("older", 8)]
        .into_iter()
        .enumerate()
    {
        let data = pseudo_random(size * MIB, 101 + 2 * i as u64);
        let d = s.fake.add_blob(data.clone());
        s.fake
            .add_manifest(&format!("team/{name}"), "v1", &[(&d, data.len())]);
        let (status, _, _) = get(&format!(
            "{}/v2/up.example/team/{name}/manifests/v1",
            s.pier
        ))
        .await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, body) =
            get(&format!("{}/v2/up.example/team/{name}/blobs/{d}", s.pier)).await;
        assert_eq!(
            (status, body.expect("body") == data),
            (StatusCode::OK, true)
        );
        layers.insert(name, (d, data));
    }
    let hosted = pseudo_random(8 * MIB, 200);
    let hd = Digest::sha256(&hosted);
    let resp = http
        .post(format!("{}/v2/mine/app/blobs/uploads/?digest={hd}", s.pier))
        .body(hosted.clone())
        .send()
        .await
        .expect("push");
    assert_eq!(resp.status(), StatusCode::CREATED);
    // And one pinned the way `pier pin` does it.
    let resp = http
        .post(format!("{}/api/v1/pin", s.pier))
        .json(&serde_json::json!({"image": "up.example/team/old:v1"}))
        .send()
        .await
        .expect("pin");
    assert_eq!(resp.status(), StatusCode::OK);
    fills_done(&s.pier).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.blobs.stats().bytes < 64 * MIB as u64 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = s.blobs.stats().bytes;
    assert!(before >= 64 * MIB as u64, "{before} bytes stored");

    // A slow ranged read of the 32 MiB layer: one chunk, then eviction, then the rest.
    let (rd, rdata) = layers["reading"].clone();
    let mut resp = http
        .get(format!("{}/v2/up.example/team/reading/blobs/{rd}", s.pier))
        .header("range", format!("bytes=1000-{}", rdata.len() - 1))
        .send()
        .await
        .expect("ranged GET");
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    let mut got = resp
        .chunk()
        .await
        .expect("chunk")
        .expect("a first chunk")
        .to_vec();
    let first = pier_server::cache::evict_once(&s.state)
        .await
        .expect("evict");
    assert!(first.blobs >= 1, "the older image went: {first:?}");
    assert!(
        s.blobs.stat(&rd).await.unwrap().is_some(),
        "a blob being read stays"
    );
    while let Some(c) = resp.chunk().await.expect("the rest of the read") {
        got.extend_from_slice(&c);
    }
    assert!(
        got == rdata[1000..],
        "the read completed with the right bytes"
    );

    // Once the read is over the bound is reached.
    let second = pier_server::cache::evict_once(&s.state)
        .await
        .expect("evict");
    let after = s.blobs.stats().bytes;
    assert!(
        after <= 40 * MIB as u64,
        "{after} bytes stored after {second:?}"
    );
    assert!(
        s.blobs.stat(&rd).await.unwrap().is_none(),
        "then it is evicted"
    );
    assert!(
        s.blobs.stat(&layers["pinned"].0).await.unwrap().is_some(),
        "pinned stays"
    );
    assert!(s.blobs.stat(&hd).await.unwrap().is_some(), "hosted stays");
    let (status, _, body) = get(&format!("{}/v2/mine/app/blobs/{hd}", s.pier)).await;
    assert_eq!(
        (status, body.expect("body") == hosted),
        (StatusCode::OK, true)
    );

    // An evicted image pulls again, from the upstream.
    let gets = s.fake.blob_gets.load(Ordering::SeqCst);
    let (od, odata) = layers["older"].clone();
    let (status, _, body) = get(&format!("{}/v2/up.example/team/older/blobs/{od}", s.pier)).await;
    assert_eq!(
        (status, body.expect("body") == odata),
        (StatusCode::OK, true)
    );
    assert_eq!(
        s.fake.blob_gets.load(Ordering::SeqCst),
        gets + 1,
        "fetched again"
    );
    let m = metrics(&s.pier).await;
    assert!(m.contains("pier_cache_max_bytes 41943040"), "{m}");
    let evicted = first.bytes + second.bytes;
    assert!(
        m.contains(&format!("pier_cache_evicted_bytes_total {evicted}")),
        "{m}"
    );
}
