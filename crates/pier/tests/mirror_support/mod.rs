//! Support for the mirror interop tier (`mirror.rs`): pier started with upstreams, the CNCF
//! distribution registry (`docker-registry`) as the upstream with its access log parsed, and
//! small servers written here to misbehave on purpose: a throttling TCP proxy that can be
//! killed mid-stream, an HTTP proxy that corrupts blob bodies, and a bearer-token issuer signing
//! JWTs with the `openssl` CLI. The pier process, the clients (skopeo, containerd) and the
//! interop gate are shared with the other tiers in `common`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::common::{
    append_log, assert_blobs_served, command_in, free_port, header, http_status_at, kill_child,
    print_log_tail_if_panicking, push_image, read_log, spawn_logged, wait_startup, Launch, Layout,
    Pier, Startup, Upload, WrittenImage, READY_TIMEOUT,
};

/// An HTTP client that ignores proxy settings from the environment: everything here is on
/// 127.0.0.1.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("build the HTTP client")
}

// ---------------------------------------------------------------------------------------------
// base64
// ---------------------------------------------------------------------------------------------

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_std(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// base64url without padding, as JWTs use.
pub fn base64_url(data: &[u8]) -> String {
    base64_std(data)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

// ---------------------------------------------------------------------------------------------
// Pulling through pier
// ---------------------------------------------------------------------------------------------

pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Pull `image` through pier with plain HTTP: the manifest at `<base>/v2/<repo>/manifests/<tag>`
/// (+ `query`), then every blob, each checked against its digest. Returns the manifest's
/// `X-Pier-Cache`.
pub async fn pull_http(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
    query: &str,
    image: &WrittenImage,
) -> String {
    let resp = http
        .get(format!("{base}/v2/{repo}/manifests/{tag}{query}"))
        .header(reqwest::header::ACCEPT, MANIFEST_ACCEPT)
        .send()
        .await
        .expect("GET manifest through pier");
    let status = resp.status();
    let cache = header(&resp, "x-pier-cache");
    let digest = header(&resp, "docker-content-digest");
    let body = resp.bytes().await.expect("manifest body");
    assert_eq!(
        status,
        reqwest::StatusCode::OK,
        "GET {repo}:{tag}{query} through pier: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(
        body.as_ref(),
        image.manifest_bytes.as_slice(),
        "manifest bytes of {repo}:{tag}"
    );
    assert_eq!(digest, image.manifest.digest, "Docker-Content-Digest");
    assert_blobs_served(http, base, repo, query, &image.blobs()).await;
    cache
}

// ---------------------------------------------------------------------------------------------
// pier with upstreams
// ---------------------------------------------------------------------------------------------

/// pier in `tmp/pier` (its config, data and log there), configured by `[mirror]` without a
/// default upstream (and without the built-in upstreams unless `builtins`), then `tables`
/// (`[[upstream]]` tables), with `upstreams` (`<name>=<url>`) as `--upstream` flags. Returns
/// pier and the flags that name its upstreams (`--config` and `--upstream`), as `pier config`
/// takes them.
pub fn start_mirror(
    tmp: &Path,
    builtins: bool,
    tables: &str,
    upstreams: &[String],
) -> (Pier, Vec<String>) {
    let config =
        format!("[mirror]\ndefault_upstream = \"\"\nbuiltin_upstreams = {builtins}\n\n{tables}");
    let upstream_flags: Vec<String> = upstreams
        .iter()
        .flat_map(|u| ["--upstream".to_string(), u.clone()])
        .collect();
    let pier = Launch::in_dir(&tmp.join("pier"))
        .config(&config)
        .args(&upstream_flags)
        .start();
    let path = pier.config_path().expect("started with a config");
    let mut flags = vec!["--config".to_string(), path.display().to_string()];
    flags.extend(upstream_flags);
    (pier, flags)
}

/// `[[upstream]]` named `name` with `endpoints`, then `more` (further keys, one a line).
pub fn upstream_table(name: &str, endpoints: &[String], more: &str) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "[[upstream]]\nname = \"{name}\"\nendpoints = [{}]\n{more}",
        endpoints.join(", ")
    )
}

// ---------------------------------------------------------------------------------------------
// The upstream: CNCF distribution (docker-registry)
// ---------------------------------------------------------------------------------------------

/// One request as docker-registry logged it on completion.
#[derive(Debug, Clone)]
pub struct Access {
    pub method: String,
    /// The request URI without its query.
    pub path: String,
    pub status: u16,
    pub written: u64,
    /// The `Host` the client sent: tells requests through a proxy from direct ones.
    pub host: String,
    pub user_agent: String,
    /// The client's `address:port`, as the registry saw it.
    pub remote_addr: String,
}

/// A `docker-registry serve` with a JSON log (access log on), on 127.0.0.1 or on an address of
/// its own inside a network namespace. Killed on drop.
pub struct Registry {
    child: Option<Child>,
    addr: SocketAddr,
    log_path: PathBuf,
}

impl Registry {
    /// The registry process's id (for its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Start a registry storing under `storage` (several may share one), with its config and
    /// log in `dir`. `auth` is a YAML `auth:` section or "".
    pub fn start(dir: &Path, storage: &Path, auth: &str) -> Registry {
        for _ in 1..=5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            if let Some(reg) = Registry::launch(dir, storage, auth, addr, None) {
                return reg;
            }
        }
        panic!("docker-registry found no free port in 5 attempts")
    }

    /// A registry without auth on `addr` (on this host), as a registry that comes back on the
    /// address it had; `None` when the address is taken.
    pub fn start_on(dir: &Path, storage: &Path, addr: SocketAddr) -> Option<Registry> {
        Registry::launch(dir, storage, "", addr, None)
    }

    /// A registry without auth listening on `addr` inside the network namespace `netns` (run
    /// with `ip netns exec`), with its config and log in `dir`, storing under `storage`.
    pub fn start_in_netns(dir: &Path, storage: &Path, netns: &str, addr: SocketAddr) -> Registry {
        Registry::launch(dir, storage, "", addr, Some(netns)).unwrap_or_else(|| {
            panic!(
                "docker-registry could not listen on {addr} in {netns}:\n{}",
                read_log(&dir.join("registry.log"), 0)
            )
        })
    }

    /// Start the registry on `addr` and wait until it answers; `None` when the address was
    /// taken.
    fn launch(
        dir: &Path,
        storage: &Path,
        auth: &str,
        addr: SocketAddr,
        netns: Option<&str>,
    ) -> Option<Registry> {
        std::fs::create_dir_all(dir).expect("create the registry dir");
        std::fs::create_dir_all(storage).expect("create the registry storage");
        let log_path = dir.join("registry.log");
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {addr}\n  secret: pier-mirror-interop\n\
             {auth}\n",
            storage = storage.display(),
        );
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config).expect("write the registry config");
        let log_start = std::fs::metadata(&log_path).map_or(0, |m| m.len());
        let mut cmd = command_in(netns, "docker-registry");
        cmd.arg("serve").arg(&config_path);
        let mut reg = Registry {
            child: Some(spawn_logged(&mut cmd, append_log(&log_path))),
            addr,
            log_path: log_path.clone(),
        };
        let child = reg.child.as_mut().expect("just spawned");
        // 200, or 401 with token auth: either way it answers.
        match wait_startup(child, READY_TIMEOUT, Duration::from_millis(50), || {
            http_status_at(addr, "/v2/").is_some()
        }) {
            Startup::Ready => Some(reg),
            Startup::Exited(status) => {
                reg.child = None;
                let log = read_log(&log_path, log_start);
                if log.contains("address already in use") {
                    return None;
                }
                panic!("docker-registry exited with {status}:\n{log}");
            }
            Startup::TimedOut => panic!(
                "docker-registry did not answer on {addr} within {READY_TIMEOUT:?}:\n{}",
                reg.log()
            ),
        }
    }

    /// A registry with its config and log in `tmp/registry`, storing in `tmp/storage`, without
    /// auth: the usual upstream of a test.
    pub fn start_in(tmp: &Path) -> Registry {
        Registry::start(&tmp.join("registry"), &tmp.join("storage"), "")
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn log(&self) -> String {
        read_log(&self.log_path, 0)
    }

    /// SIGKILL the registry and wait for it.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// Push an image of `layout` under `repo:tag`.
    pub async fn push(
        &self,
        http: &reqwest::Client,
        repo: &str,
        tag: &str,
        layout: &Layout,
        image: &WrittenImage,
    ) {
        let base = self.url();
        push_image(http, &base, repo, tag, layout, image, Upload::PostThenPut).await;
    }

    /// Every completed request in the log so far.
    pub fn accesses(&self) -> Vec<Access> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["msg"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("response completed"))
            })
            .map(|v| {
                let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
                let uri = s("http.request.uri");
                Access {
                    method: s("http.request.method"),
                    path: uri.split('?').next().unwrap_or("").to_string(),
                    status: v["http.response.status"].as_u64().unwrap_or(0) as u16,
                    written: v["http.response.written"].as_u64().unwrap_or(0),
                    host: s("http.request.host"),
                    user_agent: s("http.request.useragent"),
                    remote_addr: s("http.request.remoteaddr"),
                }
            })
            .collect()
    }

    /// The completed `GET`s of one blob.
    pub fn blob_gets(&self, repo: &str, digest: &str) -> Vec<Access> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        self.accesses()
            .into_iter()
            .filter(|a| a.method == "GET" && a.path == path)
            .collect()
    }

    /// Poll the log until `f` holds for the blob's completed GETs (docker-registry logs a
    /// request after its last byte, a moment after the client has it).
    pub async fn wait_blob_gets(
        &self,
        repo: &str,
        digest: &str,
        f: impl Fn(&[Access]) -> bool,
    ) -> Vec<Access> {
        let started = Instant::now();
        loop {
            let gets = self.blob_gets(repo, digest);
            if f(&gets) || started.elapsed() > Duration::from_secs(10) {
                return gets;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
        print_log_tail_if_panicking("registry", &self.log_path, 30);
    }
}

// ---------------------------------------------------------------------------------------------
// A throttling TCP proxy that can be killed
// ---------------------------------------------------------------------------------------------

/// A TCP proxy on 127.0.0.1 in front of `target`, passing the server's bytes on at most `rate`
/// bytes per second. [`TcpProxy::kill`] drops the listener and every connection at once, as if
/// the process died. Dropping the proxy kills it too.
pub struct TcpProxy {
    port: u16,
    forwarded: Arc<AtomicU64>,
    kill: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(target: u16, rate: u64) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let forwarded = Arc::new(AtomicU64::new(0));
        let (kill, _) = watch::channel(false);
        let task = {
            let forwarded = forwarded.clone();
            let mut killed = kill.subscribe();
            let kill = kill.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = killed.wait_for(|k| *k) => return,
                        accepted = listener.accept() => {
                            let Ok((client, _)) = accepted else { continue };
                            let killed = kill.subscribe();
                            tokio::spawn(proxy_conn(client, target, rate, forwarded.clone(), killed));
                        }
                    }
                }
            })
        };
        TcpProxy {
            port,
            forwarded,
            kill,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Bytes passed from the server to clients so far (headers included).
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    pub fn kill(&self) {
        let _ = self.kill.send(true);
        self.task.abort();
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn proxy_conn(
    client: tokio::net::TcpStream,
    target: u16,
    rate: u64,
    forwarded: Arc<AtomicU64>,
    mut killed: watch::Receiver<bool>,
) {
    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
    };
    let down = async {
        let began = Instant::now();
        let mut sent = 0u64;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
            sent += n as u64;
            forwarded.fetch_add(n as u64, Ordering::Relaxed);
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(began.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::select! {
        _ = killed.wait_for(|k| *k) => {}
        _ = async { tokio::join!(up, down) } => {}
    }
}

// ---------------------------------------------------------------------------------------------
// An HTTP proxy that corrupts blob bodies
// ---------------------------------------------------------------------------------------------

/// An HTTP proxy on 127.0.0.1 in front of a registry. While `corrupt` is set it flips one
/// byte in the middle of every `200` body of a blob `GET`; otherwise it passes everything
/// through unchanged.
pub struct CorruptingProxy {
    port: u16,
    pub corrupt: Arc<AtomicBool>,
    /// Blob `GET`s forwarded, by path.
    pub blob_gets: Arc<std::sync::Mutex<HashMap<String, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct ProxyState {
    upstream: String,
    client: reqwest::Client,
    corrupt: Arc<AtomicBool>,
    blob_gets: Arc<std::sync::Mutex<HashMap<String, u64>>>,
}

impl CorruptingProxy {
    pub async fn start(upstream: &str) -> CorruptingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let corrupt = Arc::new(AtomicBool::new(true));
        let blob_gets = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let state = ProxyState {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("proxy client"),
            corrupt: corrupt.clone(),
            blob_gets: blob_gets.clone(),
        };
        let app = axum::Router::new().fallback(forward).with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        CorruptingProxy {
            port,
            corrupt,
            blob_gets,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// How many blob `GET`s for `path` went through.
    pub fn gets_of(&self, path: &str) -> u64 {
        self.blob_gets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for CorruptingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(State(s): State<ProxyState>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let pq = req
        .uri()
        .path_and_query()
        .map_or(path.clone(), |p| p.as_str().to_string());
    let mut up = s
        .client
        .request(method.clone(), format!("{}{pq}", s.upstream));
    for (k, v) in req.headers() {
        if k != axum::http::header::HOST {
            up = up.header(k, v);
        }
    }
    let resp = match up.send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = resp.status();
    let blob_get = method == Method::GET && path.contains("/blobs/") && status == StatusCode::OK;
    if blob_get {
        *s.blob_gets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(path)
            .or_default() += 1;
    }
    let flip_at = (blob_get && s.corrupt.load(Ordering::Relaxed))
        .then(|| resp.content_length().unwrap_or(1) / 2);
    let mut headers = HeaderMap::new();
    for (k, v) in resp.headers() {
        if k != axum::http::header::TRANSFER_ENCODING && k != axum::http::header::CONNECTION {
            headers.append(k, v.clone());
        }
    }
    let mut pos = 0u64;
    let body = resp.bytes_stream().map(move |chunk| {
        chunk.map(|c| {
            let start = pos;
            pos += c.len() as u64;
            match flip_at {
                Some(at) if at >= start && at < pos => {
                    let mut v = c.to_vec();
                    v[(at - start) as usize] ^= 0x5a;
                    axum::body::Bytes::from(v)
                }
                _ => c,
            }
        })
    });
    let mut out = Response::new(Body::from_stream(body));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

// ---------------------------------------------------------------------------------------------
// An HTTP proxy that fails a fraction of requests
// ---------------------------------------------------------------------------------------------

/// An HTTP proxy on 127.0.0.1 in front of a registry that fails a fraction of the requests
/// at random (seeded): half of the failures answer 503 without passing the request on, the
/// other half pass it on and then answer 502 instead of the registry's answer, as when a
/// connection drops after the server acted (the client cannot tell it happened). Bodies
/// stream both ways.
pub struct FaultyProxy {
    port: u16,
    pub requests: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct FaultState {
    upstream: String,
    client: reqwest::Client,
    /// Failures per million requests.
    ppm: u64,
    rng: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl FaultyProxy {
    pub async fn start(upstream: &str, fail_fraction: f64, seed: u64) -> FaultyProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let requests = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let state = FaultState {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("proxy client"),
            ppm: (fail_fraction.clamp(0.0, 1.0) * 1_000_000.0) as u64,
            rng: Arc::new(AtomicU64::new(seed | 1)),
            requests: requests.clone(),
            failed: failed.clone(),
        };
        let app = axum::Router::new()
            .fallback(fault_forward)
            .with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FaultyProxy {
            port,
            requests,
            failed,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// xorshift64: a seeded sequence shared by every request of the proxy.
fn next_random(rng: &AtomicU64) -> u64 {
    let mut x = rng.load(Ordering::Relaxed);
    loop {
        let mut y = x;
        y ^= y << 13;
        y ^= y >> 7;
        y ^= y << 17;
        match rng.compare_exchange(x, y, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return y,
            Err(now) => x = now,
        }
    }
}

async fn fault_forward(State(s): State<FaultState>, req: Request) -> Response {
    s.requests.fetch_add(1, Ordering::Relaxed);
    let roll = next_random(&s.rng) % 1_000_000;
    let fail = roll < s.ppm;
    if fail && roll & 1 == 0 {
        s.failed.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::SERVICE_UNAVAILABLE, "injected failure").into_response();
    }
    let method = req.method().clone();
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    let mut up = s.client.request(method, format!("{}{pq}", s.upstream));
    // The Host goes along: distribution builds its upload `Location`s from it, and they must
    // lead back through the proxy.
    for (k, v) in req.headers() {
        up = up.header(k, v);
    }
    let body = req.into_body().into_data_stream();
    let resp = match up.body(reqwest::Body::wrap_stream(body)).send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    if fail {
        // The registry acted on the request; its answer is lost on the way back.
        let _ = resp.bytes().await;
        s.failed.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::BAD_GATEWAY, "injected lost answer").into_response();
    }
    let status = resp.status();
    let mut headers = HeaderMap::new();
    for (k, v) in resp.headers() {
        if k != axum::http::header::TRANSFER_ENCODING && k != axum::http::header::CONNECTION {
            headers.append(k, v.clone());
        }
    }
    let mut out = Response::new(Body::from_stream(resp.bytes_stream()));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

// ---------------------------------------------------------------------------------------------
// A bearer-token issuer
// ---------------------------------------------------------------------------------------------

/// A key and self-signed certificate made with the `openssl` CLI, for signing tokens.
pub struct SigningKey {
    pub key: PathBuf,
    pub cert: PathBuf,
    /// The certificate in DER, standard base64: the JWT header's `x5c`.
    pub x5c: String,
}

pub fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl SigningKey {
    /// An RSA key and a certificate for it that distribution accepts: usable for digital
    /// signatures (distribution requires that of the leaf) and its own root.
    pub fn generate(dir: &Path) -> SigningKey {
        std::fs::create_dir_all(dir).expect("create the key dir");
        let key = dir.join("issuer.key");
        let cert = dir.join("issuer.crt");
        let der = dir.join("issuer.der");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key.to_str().expect("utf-8 path"),
            "-out",
            cert.to_str().expect("utf-8 path"),
            "-days",
            "2",
            "-subj",
            "/CN=pier-test-token-issuer",
            "-addext",
            "keyUsage=critical,digitalSignature,keyCertSign",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
        ]);
        openssl(&[
            "x509",
            "-in",
            cert.to_str().expect("utf-8 path"),
            "-outform",
            "DER",
            "-out",
            der.to_str().expect("utf-8 path"),
        ]);
        let x5c = base64_std(&std::fs::read(&der).expect("read the DER certificate"));
        SigningKey { key, cert, x5c }
    }
}

/// Counts of what the issuer did.
#[derive(Default)]
pub struct IssuerStats {
    /// Tokens issued to requests with the right Basic credentials.
    pub authenticated: AtomicU64,
    /// Tokens issued to requests without credentials.
    pub anonymous: AtomicU64,
    /// Requests refused with 401.
    pub refused: AtomicU64,
    /// Every `scope` asked for, in order.
    pub scopes: std::sync::Mutex<Vec<String>>,
}

#[derive(Clone)]
struct IssuerState {
    key: PathBuf,
    x5c: String,
    issuer: String,
    service: String,
    /// `Basic <base64(user:password)>`
    credentials: String,
    user: String,
    /// Repositories that need credentials; the others may be pulled anonymously.
    private: Vec<String>,
    stats: Arc<IssuerStats>,
}

/// A token endpoint in the style of Docker Hub's: `GET /token?service=…&scope=…`, answered with
/// an RS256 JWT whose header carries the signing certificate (`x5c`). Repositories in `private`
/// need the Basic credentials; any request with wrong credentials is refused.
pub struct TokenIssuer {
    port: u16,
    pub stats: Arc<IssuerStats>,
    task: tokio::task::JoinHandle<()>,
}

pub const ISSUER: &str = "pier-test-issuer";
pub const SERVICE: &str = "pier-test-registry";

impl TokenIssuer {
    pub async fn start(
        key: &SigningKey,
        user: &str,
        password: &str,
        private: &[&str],
    ) -> TokenIssuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the issuer");
        let port = listener.local_addr().expect("issuer address").port();
        let stats = Arc::new(IssuerStats::default());
        let state = IssuerState {
            key: key.key.clone(),
            x5c: key.x5c.clone(),
            issuer: ISSUER.into(),
            service: SERVICE.into(),
            credentials: format!(
                "Basic {}",
                base64_std(format!("{user}:{password}").as_bytes())
            ),
            user: user.into(),
            private: private.iter().map(|s| s.to_string()).collect(),
            stats: stats.clone(),
        };
        let app = axum::Router::new()
            .route("/token", axum::routing::get(issue))
            .with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TokenIssuer { port, stats, task }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// The registry's `auth:` section trusting this issuer.
    pub fn registry_auth(&self, key: &SigningKey) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.realm(),
            key.cert.display()
        )
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn issue(
    State(s): State<IssuerState>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let refuse = |why: &str| {
        s.stats.refused.fetch_add(1, Ordering::Relaxed);
        (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({ "details": why })),
        )
            .into_response()
    };
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let authenticated = match auth {
        Some(a) if a == s.credentials => true,
        Some(_) => return refuse("incorrect username or password"),
        None => false,
    };
    let mut access = Vec::new();
    for (k, v) in &params {
        if k == "service" && *v != s.service {
            return refuse("unknown service");
        }
        if k != "scope" {
            continue;
        }
        // repository:<name>:<actions>
        let mut parts = v.splitn(2, ':');
        let (Some("repository"), Some(rest)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some((name, actions)) = rest.rsplit_once(':') else {
            continue;
        };
        s.stats
            .scopes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(v.clone());
        if s.private.iter().any(|p| p == name) && !authenticated {
            return refuse("authentication required");
        }
        // Anyone may pull; only the holder of the credentials may do more.
        let granted: Vec<&str> = actions
            .split(',')
            .filter(|a| *a == "pull" || authenticated)
            .collect();
        access.push(serde_json::json!({
            "type": "repository", "name": name, "actions": granted,
        }));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let header = serde_json::json!({ "typ": "JWT", "alg": "RS256", "x5c": [s.x5c] });
    let claims = serde_json::json!({
        "iss": s.issuer,
        "sub": if authenticated { s.user.as_str() } else { "" },
        "aud": s.service,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("{now}-{}", s.stats.authenticated.load(Ordering::Relaxed) + s.stats.anonymous.load(Ordering::Relaxed)),
        "access": access,
    });
    let input = format!(
        "{}.{}",
        base64_url(header.to_string().as_bytes()),
        base64_url(claims.to_string().as_bytes())
    );
    let signature = match sign(&s.key, input.as_bytes()).await {
        Ok(sig) => sig,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    };
    let token = format!("{input}.{}", base64_url(&signature));
    if authenticated {
        s.stats.authenticated.fetch_add(1, Ordering::Relaxed);
    } else {
        s.stats.anonymous.fetch_add(1, Ordering::Relaxed);
    }
    axum::Json(serde_json::json!({
        "token": token, "access_token": token, "expires_in": 300,
    }))
    .into_response()
}

/// RS256: an RSA PKCS#1 v1.5 signature over SHA-256, by `openssl dgst -sha256 -sign`.
async fn sign(key: &Path, input: &[u8]) -> Result<Vec<u8>, String> {
    let mut child = tokio::process::Command::new("openssl")
        .arg("dgst")
        .arg("-sha256")
        .arg("-sign")
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("spawn openssl: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    stdin
        .write_all(input)
        .await
        .map_err(|e| format!("write to openssl: {e}"))?;
    drop(stdin);
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| format!("openssl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl dgst -sign failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_std(input.as_bytes()), want, "{input:?}");
        }
        assert_eq!(base64_url(&[0xfb, 0xff]), "-_8");
    }
}
