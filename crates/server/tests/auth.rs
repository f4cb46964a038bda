//! Authentication and authorization, in process: pier's whole router driven with
//! `tower::ServiceExt::oneshot` (each request carries the client address the accept loop
//! would give it), in front of a fake upstream on a loopback port that can demand Basic
//! credentials. The matrix test runs every identity against every operation on a hosted
//! and a mirrored namespace through one `check()`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::BodyExt;
use pier_auth::{
    Access, Actions, AuthSettings, FailedLogins, LoginLimits, Rule, Signer, TokenSettings,
};
use pier_mirror::metrics::MirrorMetrics;
use pier_mirror::{Mirror, UpstreamEntry};
use pier_oci::{Digest, Route};
use pier_registry::{Limits, Registry};
use pier_server::auth::{AuthGate, Limiter};
use pier_server::metrics::Metrics;
use pier_server::AppState;
use pier_store::{BlobStore, FsBlobStore, MetaStore, RedbMetaStore};
use pier_upstream::{Upstream, UpstreamConfig};
use tower::ServiceExt;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

// ---------------------------------------------------------------------------------------
// The fake upstream: one image `lib/app:v1`, optionally behind Basic credentials.

#[derive(Default)]
struct FakeUp {
    blobs: Mutex<HashMap<String, Bytes>>,
    manifest: Mutex<Option<(Bytes, String)>>,
    /// When set, every request needs one of these user/password pairs.
    users: Mutex<Option<HashMap<String, String>>>,
    blob_gets: AtomicUsize,
    checks: AtomicUsize,
}

async fn fake_upstream(State(up): State<Arc<FakeUp>>, req: Request<Body>) -> Response {
    if let Some(users) = up.users.lock().expect("lock").clone() {
        let ok = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| {
                s.split_once(':')
                    .map(|(u, p)| users.get(u).is_some_and(|w| w == p))
            })
            .unwrap_or(false);
        if !ok {
            return (
                StatusCode::UNAUTHORIZED,
                [("www-authenticate", "Basic realm=\"fake\"")],
            )
                .into_response();
        }
    }
    let head = req.method() == Method::HEAD;
    match pier_oci::route::parse(req.uri().path()) {
        Ok(Route::Base) => "{}".into_response(),
        Ok(Route::Tags { name }) if name.as_str() == "lib/app" => {
            up.checks.fetch_add(1, Ordering::SeqCst);
            axum::Json(serde_json::json!({"name": "lib/app", "tags": ["v1"]})).into_response()
        }
        Ok(Route::Manifest { name, .. }) if name.as_str() == "lib/app" => {
            let Some((bytes, digest)) = up.manifest.lock().expect("lock").clone() else {
                return StatusCode::NOT_FOUND.into_response();
            };
            let h = [
                ("content-type", OCI_MANIFEST.to_string()),
                ("docker-content-digest", digest),
                ("content-length", bytes.len().to_string()),
            ];
            if head {
                (h, Body::empty()).into_response()
            } else {
                (h, bytes).into_response()
            }
        }
        Ok(Route::Blob { digest, .. }) => {
            let Some(data) = up
                .blobs
                .lock()
                .expect("lock")
                .get(&digest.to_string())
                .cloned()
            else {
                return StatusCode::NOT_FOUND.into_response();
            };
            if head {
                return ([("content-length", data.len().to_string())], Body::empty())
                    .into_response();
            }
            up.blob_gets.fetch_add(1, Ordering::SeqCst);
            ([("content-length", data.len().to_string())], data).into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// An image manifest over `config` and `layer`, and its digest.
fn image(config: &[u8], layer: &[u8]) -> (Vec<u8>, String) {
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": Digest::sha256(config).to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": Digest::sha256(layer).to_string(), "size": layer.len()}],
    })
    .to_string()
    .into_bytes();
    let d = Digest::sha256(&body).to_string();
    (body, d)
}

const CONFIG: &[u8] = b"{\"architecture\":\"amd64\"}";
const LAYER: &[u8] = b"layer bytes of lib/app";

async fn start_upstream() -> (Arc<FakeUp>, String) {
    let up = Arc::new(FakeUp::default());
    for b in [CONFIG, LAYER] {
        up.blobs
            .lock()
            .expect("lock")
            .insert(Digest::sha256(b).to_string(), Bytes::from_static(b));
    }
    let (m, d) = image(CONFIG, LAYER);
    *up.manifest.lock().expect("lock") = Some((Bytes::from(m), d));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = axum::Router::new()
        .fallback(fake_upstream)
        .with_state(up.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (up, format!("http://{addr}"))
}

// ---------------------------------------------------------------------------------------
// pier under test.

/// Shared files: the htpasswd file and the token signing key.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(users: &[(&str, &str)]) -> Files {
        let f = Files {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        f.write_users(users);
        f
    }

    fn htpasswd(&self) -> PathBuf {
        self.dir.path().join("htpasswd")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("token-key.pem")
    }

    fn write_users(&self, users: &[(&str, &str)]) {
        let text: String = users
            .iter()
            .map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 4).expect("bcrypt")))
            .collect();
        // Write beside and rename, as an editor or `htpasswd` does.
        let tmp = self.dir.path().join("htpasswd.new");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, self.htpasswd()).expect("rename");
    }

    fn token_settings(&self) -> TokenSettings {
        TokenSettings {
            issuer: "pier".into(),
            ttl: Duration::from_secs(300),
            key_file: self.key(),
            generate: true,
            service: None,
        }
    }
}

fn rule(repos: &[&str], grant: &str, to: &[&str]) -> Rule {
    Rule {
        repos: repos.iter().map(|s| s.to_string()).collect(),
        grant: Actions::parse_list(grant),
        to: to.iter().map(|s| s.parse().expect("subject")).collect(),
        allow: Vec::new(),
    }
}

/// The matrix's rules: readers pull the team's and the mirrored images, the writer also
/// pushes and deletes the team's, admin does everything; nobody else may pull `other/**`.
fn matrix_settings(files: &Files) -> AuthSettings {
    AuthSettings {
        htpasswd: Some(files.htpasswd()),
        groups: HashMap::from([("readers".into(), vec!["reader".into(), "writer".into()])]),
        rules: vec![
            rule(&["team/**", "up.example/**"], "pull", &["group:readers"]),
            rule(&["team/**"], "push,delete", &["user:writer"]),
            rule(&["**"], "pull,push,delete,admin", &["user:admin"]),
        ],
        token: Some(files.token_settings()),
        ..AuthSettings::default()
    }
}

struct Pier {
    router: axum::Router,
    state: AppState,
    _dir: tempfile::TempDir,
}

/// What a test wants of the node.
struct Opts {
    auth: Option<AuthSettings>,
    private: bool,
    gate: Box<dyn FnOnce(&mut AuthGate)>,
}

async fn pier(upstream: &str, opts: Opts) -> Pier {
    let dir = tempfile::tempdir().expect("tempdir");
    let blobs: Arc<dyn BlobStore> = FsBlobStore::open(dir.path()).await.expect("blobs");
    let meta: Arc<dyn MetaStore> = Arc::new(RedbMetaStore::in_memory().expect("meta"));
    let registry = Arc::new(Registry::new(
        blobs.clone(),
        meta.clone(),
        Limits::default(),
    ));
    let (metrics, mm) = Metrics::new_with(|r| Arc::new(MirrorMetrics::new(r)));
    let mut config = UpstreamConfig::new("up.example", vec![upstream.to_string()]);
    // pier's own credentials for the upstream: what fills the shared cache.
    config.username = Some("robot".into());
    config.password = Some("robot-secret".into());
    let client = Upstream::new(config, mm.clone()).expect("upstream");
    let mirror = Mirror::new(
        vec![UpstreamEntry {
            client,
            tag_ttl: Duration::from_secs(300),
            allow: Vec::new(),
            deny: Vec::new(),
            private: opts.private,
            private_check_ttl: Duration::from_secs(60),
        }],
        None,
        blobs,
        meta,
        4 << 20,
        mm,
    );
    let mut state = AppState::with_mirror(registry, mirror, metrics);
    if let Some(settings) = opts.auth {
        let mut gate = AuthGate::new(pier_auth::Auth::new(settings).expect("auth"));
        (opts.gate)(&mut gate);
        state.auth = Some(Arc::new(gate));
    }
    Pier {
        router: pier_server::router(state.clone()),
        state,
        _dir: dir,
    }
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn code(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["errors"][0]["code"].as_str().map(String::from))
            .unwrap_or_default()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("json body")
    }
}

#[derive(Clone)]
enum Cred {
    None,
    Basic(&'static str, &'static str),
    Bearer(String),
}

impl Pier {
    async fn call_from(
        &self,
        ip: &str,
        method: Method,
        path: &str,
        cred: &Cred,
        body: Body,
    ) -> Resp {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "pier.test:5000");
        match cred {
            Cred::None => {}
            Cred::Basic(u, p) => {
                let v = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
                b = b.header("authorization", format!("Basic {v}"));
            }
            Cred::Bearer(t) => b = b.header("authorization", format!("Bearer {t}")),
        }
        let mut req = b.body(body).expect("request");
        let addr: SocketAddr = format!("{ip}:40000").parse().expect("addr");
        req.extensions_mut().insert(ConnectInfo(addr));
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Resp {
            status,
            headers,
            body,
        }
    }

    async fn call(&self, method: Method, path: &str, cred: &Cred, body: Vec<u8>) -> Resp {
        self.call_from("127.0.0.1", method, path, cred, Body::from(body))
            .await
    }

    /// Push `repo:v1` (config, layer, manifest) as `cred`; returns the manifest digest.
    async fn seed(&self, repo: &str, cred: &Cred) -> String {
        for b in [CONFIG, LAYER] {
            let d = Digest::sha256(b);
            let r = self
                .call(
                    Method::POST,
                    &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
                    cred,
                    b.to_vec(),
                )
                .await;
            assert_eq!(r.status, 201, "seed blob: {:?}", r.body);
        }
        let (m, d) = image(CONFIG, LAYER);
        let mut req = Request::builder()
            .method(Method::PUT)
            .uri(format!("/v2/{repo}/manifests/v1"))
            .header("content-type", OCI_MANIFEST);
        if let Cred::Basic(u, p) = cred {
            let v = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            req = req.header("authorization", format!("Basic {v}"));
        }
        let mut req = req.body(Body::from(m)).expect("request");
        req.extensions_mut().insert(ConnectInfo(
            "127.0.0.1:40000".parse::<SocketAddr>().expect("addr"),
        ));
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), 201, "seed manifest");
        d
    }

    fn metric(&self, result: &str) -> u64 {
        let text = self.state.metrics.encode();
        let needle = format!("pier_auth_requests_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

fn no_gate() -> Box<dyn FnOnce(&mut AuthGate)> {
    Box::new(|_| {})
}

// ---------------------------------------------------------------------------------------
// The matrix.

const USERS: &[(&str, &str)] = &[
    ("reader", "reader-pw"),
    ("writer", "writer-pw"),
    ("admin", "admin-pw"),
];

/// The operations of one row, in this order.
const OPS: [&str; 8] = [
    "pull hosted",
    "push hosted",
    "delete hosted",
    "pull mirrored",
    "push mirrored",
    "delete mirrored",
    "catalog",
    "status",
];

/// What one cell must answer. `401` cells must carry a challenge; `4xx` cells an OCI code.
fn code_of(status: u16) -> &'static str {
    match status {
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        405 => "UNSUPPORTED",
        _ => "",
    }
}

/// A token signed by pier's key, valid or not, carrying `access`.
fn pier_token(files: &Files, access: Vec<Access>, at: SystemTime) -> String {
    let signer = Signer::load(&files.token_settings()).expect("signer");
    signer
        .issue("writer", "pier.test:5000", access, at)
        .expect("issue")
        .token
}

fn repo_access(name: &str, actions: &[&str]) -> Access {
    Access {
        kind: "repository".into(),
        name: name.into(),
        actions: actions.iter().map(|s| s.to_string()).collect(),
    }
}

/// Run one row: a fresh node (hosted `team/app:v1` and `other/secret:v1` pushed by admin),
/// then each operation as `cred`, asserting status, error code and the challenge.
async fn check(upstream: &str, files: &Files, who: &str, cred: Cred, want: [u16; 8]) {
    let p = pier(
        upstream,
        Opts {
            auth: Some(matrix_settings(files)),
            private: false,
            gate: no_gate(),
        },
    )
    .await;
    let admin = Cred::Basic("admin", "admin-pw");
    let hosted = p.seed("team/app", &admin).await;
    p.seed("other/secret", &admin).await;
    let (_, mirrored) = image(CONFIG, LAYER);
    let ops: [(Method, String); 8] = [
        (Method::GET, "/v2/team/app/manifests/v1".into()),
        (Method::POST, "/v2/team/app/blobs/uploads/".into()),
        (Method::DELETE, format!("/v2/team/app/manifests/{hosted}")),
        (Method::GET, "/v2/up.example/lib/app/manifests/v1".into()),
        (Method::POST, "/v2/up.example/lib/app/blobs/uploads/".into()),
        (
            Method::DELETE,
            format!("/v2/up.example/lib/app/manifests/{mirrored}"),
        ),
        (Method::GET, "/v2/_catalog".into()),
        (Method::GET, "/api/v1/status".into()),
    ];
    for (i, (method, path)) in ops.into_iter().enumerate() {
        let cell = format!("{who} / {}", OPS[i]);
        let r = p.call(method, &path, &cred, Vec::new()).await;
        assert_eq!(
            r.status.as_u16(),
            want[i],
            "{cell}: body {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.code(), code_of(want[i]), "{cell}: error code");
        if want[i] == 401 {
            let c = r.header("www-authenticate").unwrap_or_default();
            let expected = if OPS[i] == "status" {
                "Basic realm=\"pier\"".to_string()
            } else {
                "Bearer realm=\"http://pier.test:5000/token\",service=\"pier.test:5000\"".into()
            };
            assert!(c.starts_with(&expected), "{cell}: challenge {c:?}");
            if i < 6 {
                let name = if i < 3 {
                    "team/app"
                } else {
                    "up.example/lib/app"
                };
                let actions = match i % 3 {
                    0 => "pull",
                    1 => "pull,push",
                    _ => "delete",
                };
                let scope = format!("scope=\"repository:{name}:{actions}\"");
                assert!(c.contains(&scope), "{cell}: {c:?} lacks {scope}");
            }
        }
        if OPS[i] == "catalog" && r.status == 200 {
            let repos = r.json()["repositories"].clone();
            let listed: Vec<&str> = repos
                .as_array()
                .expect("list")
                .iter()
                .filter_map(|v| v.as_str())
                .collect();
            assert_eq!(
                listed.contains(&"other/secret"),
                who == "admin",
                "{cell}: {listed:?}"
            );
            assert_eq!(
                listed.contains(&"team/app"),
                !who.starts_with("token for another"),
                "{cell}: {listed:?}"
            );
        }
    }
}

#[tokio::test]
async fn authz_matrix() {
    let (_up, upstream) = start_upstream().await;
    let files = Files::new(USERS);
    // Tokens as the token service hands them out, for a real login flow.
    let token_for = |scopes: &'static [&'static str]| {
        let upstream = upstream.clone();
        let files = &files;
        async move {
            let p = pier(
                &upstream,
                Opts {
                    auth: Some(matrix_settings(files)),
                    private: false,
                    gate: no_gate(),
                },
            )
            .await;
            let q: Vec<String> = scopes.iter().map(|s| format!("scope={s}")).collect();
            let r = p
                .call(
                    Method::GET,
                    &format!("/token?service=pier.test:5000&{}", q.join("&")),
                    &Cred::Basic("writer", "writer-pw"),
                    Vec::new(),
                )
                .await;
            assert_eq!(r.status, 200, "token: {:?}", r.body);
            let j = r.json();
            assert_eq!(j["token"], j["access_token"]);
            assert_eq!(j["expires_in"], 300);
            assert!(j["issued_at"].as_str().is_some_and(|s| s.ends_with('Z')));
            j["token"].as_str().expect("token").to_string()
        }
    };
    let writer_token = token_for(&[
        "repository:team/app:pull,push,delete",
        "repository:up.example/lib/app:pull,push,delete",
    ])
    .await;
    let other_repo_token = token_for(&["repository:team/other:pull,push,delete"]).await;
    let expired = pier_token(
        &files,
        vec![repo_access("team/app", &["pull", "push", "delete"])],
        SystemTime::now() - Duration::from_secs(3600),
    );
    let foreign = {
        let other = tempfile::tempdir().expect("tempdir");
        let t = TokenSettings {
            key_file: other.path().join("k.pem"),
            ..files.token_settings()
        };
        Signer::load(&t)
            .expect("signer")
            .issue(
                "writer",
                "pier.test:5000",
                vec![repo_access("team/app", &["pull", "push", "delete"])],
                SystemTime::now(),
            )
            .expect("issue")
            .token
    };
    let alg_none = {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let payload = writer_token.split('.').nth(1).expect("payload");
        format!("{}.{payload}.", b64(r#"{"alg":"none","typ":"JWT"}"#))
    };

    #[rustfmt::skip]
    let table: Vec<(&str, Cred, [u16; 8])> = vec![
        //                                         pull  push  del   m-pull m-push m-del catalog status
        ("anonymous",               Cred::None,                              [401, 401, 401, 401, 401, 401, 401, 401]),
        ("reader",                  Cred::Basic("reader", "reader-pw"),      [200, 403, 403, 200, 403, 403, 200, 403]),
        ("writer",                  Cred::Basic("writer", "writer-pw"),      [200, 202, 202, 200, 403, 403, 200, 403]),
        ("admin",                   Cred::Basic("admin", "admin-pw"),        [200, 202, 202, 200, 405, 405, 200, 200]),
        ("wrong password",          Cred::Basic("writer", "nope"),           [401, 401, 401, 401, 401, 401, 401, 401]),
        ("writer's token",          Cred::Bearer(writer_token.clone()),      [200, 202, 202, 200, 401, 401, 200, 403]),
        ("expired token",           Cred::Bearer(expired),                   [401, 401, 401, 401, 401, 401, 401, 401]),
        ("token for another repo",  Cred::Bearer(other_repo_token),          [401, 401, 401, 401, 401, 401, 200, 403]),
        ("token of another key",    Cred::Bearer(foreign),                   [401, 401, 401, 401, 401, 401, 401, 401]),
        ("alg none token",          Cred::Bearer(alg_none),                  [401, 401, 401, 401, 401, 401, 401, 401]),
    ];
    for (who, cred, want) in table {
        check(&upstream, &files, who, cred, want).await;
    }
}

#[tokio::test]
async fn the_token_service_grants_only_what_rules_permit() {
    let (_up, upstream) = start_upstream().await;
    let files = Files::new(USERS);
    let p = pier(
        &upstream,
        Opts {
            auth: Some(matrix_settings(&files)),
            private: false,
            gate: no_gate(),
        },
    )
    .await;
    let decode = |t: &str| -> serde_json::Value {
        let payload = t.split('.').nth(1).expect("payload");
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64");
        serde_json::from_slice(&raw).expect("claims")
    };
    // The reader asks for push and for a repository it may not see: the token carries pull
    // on team/app only, and asking is not an error.
    let r = p
        .call(
            Method::GET,
            "/token?service=pier.test:5000&scope=repository:team/app:pull,push&scope=repository:other/secret:pull",
            &Cred::Basic("reader", "reader-pw"),
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    let claims = decode(r.json()["token"].as_str().expect("token"));
    assert_eq!(
        claims["access"],
        serde_json::json!([{"type": "repository", "name": "team/app", "actions": ["pull"]}])
    );
    assert_eq!(claims["sub"], "reader");
    assert_eq!(claims["aud"], "pier.test:5000");
    assert_eq!(claims["iss"], "pier");

    // Anonymous callers get a token, with nothing in it (no rule grants them anything).
    let r = p
        .call(
            Method::GET,
            "/token?scope=repository:team/app:pull",
            &Cred::None,
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        decode(r.json()["token"].as_str().expect("token"))["access"],
        serde_json::json!([])
    );

    // Wrong credentials: 401.
    let r = p
        .call(
            Method::GET,
            "/token?scope=repository:team/app:pull",
            &Cred::Basic("reader", "x"),
            Vec::new(),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "UNAUTHORIZED")
    );

    // The OAuth2 password grant answers the same token.
    let form = "grant_type=password&username=writer&password=writer-pw&service=pier.test:5000&scope=repository:team/app:pull,push&client_id=test";
    let r = p
        .call(
            Method::POST,
            "/token",
            &Cred::None,
            form.as_bytes().to_vec(),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let token = r.json()["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    assert_eq!(
        decode(&token)["access"][0]["actions"],
        serde_json::json!(["pull", "push"])
    );
    let r = p
        .call(
            Method::POST,
            "/v2/team/app/blobs/uploads/",
            &Cred::Bearer(token),
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 202);
    let form = "grant_type=refresh_token&refresh_token=x";
    let r = p
        .call(
            Method::POST,
            "/token",
            &Cred::None,
            form.as_bytes().to_vec(),
        )
        .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn with_no_anonymous_grant_v2_challenges_and_metrics_stay_open() {
    let (_up, upstream) = start_upstream().await;
    let files = Files::new(USERS);
    let p = pier(
        &upstream,
        Opts {
            auth: Some(matrix_settings(&files)),
            private: false,
            gate: no_gate(),
        },
    )
    .await;
    let r = p.call(Method::GET, "/v2/", &Cred::None, Vec::new()).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "UNAUTHORIZED")
    );
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"http://pier.test:5000/token\",service=\"pier.test:5000\"")
    );
    let r = p
        .call(
            Method::GET,
            "/v2/",
            &Cred::Basic("reader", "reader-pw"),
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            p.call(Method::GET, path, &Cred::None, Vec::new())
                .await
                .status,
            200,
            "{path}"
        );
    }
    assert!(p.metric("unauthorized") >= 1);
    assert!(p.metric("allowed") >= 1);

    // Closed metrics need admin.
    let closed = pier(
        &upstream,
        Opts {
            auth: Some(matrix_settings(&files)),
            private: false,
            gate: Box::new(|g| g.metrics_open = false),
        },
    )
    .await;
    let r = closed
        .call(Method::GET, "/metrics", &Cred::None, Vec::new())
        .await;
    assert_eq!(r.status, 401);
    let r = closed
        .call(
            Method::GET,
            "/metrics",
            &Cred::Basic("reader", "reader-pw"),
            Vec::new(),
        )
        .await;
    assert_eq!((r.status.as_u16(), r.code().as_str()), (403, "DENIED"));
    let r = closed
        .call(
            Method::GET,
            "/metrics",
            &Cred::Basic("admin", "admin-pw"),
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn v2_challenges_callers_without_credentials_even_when_anonymous_may_pull() {
    let (_up, upstream) = start_upstream().await;
    let files = Files::new(USERS);
    let mut s = matrix_settings(&files);
    s.rules.push(rule(&["team/**"], "pull", &["anonymous"]));
    let p = pier(
        &upstream,
        Opts {
            auth: Some(s),
            private: false,
            gate: no_gate(),
        },
    )
    .await;
    p.seed("team/app", &Cred::Basic("admin", "admin-pw")).await;
    let r = p.call(Method::GET, "/v2/", &Cred::None, Vec::new()).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "UNAUTHORIZED")
    );
    // What anonymous callers are granted works without a token, and with an anonymous one.
    let r = p
        .call(
            Method::GET,
            "/v2/team/app/manifests/v1",
            &Cred::None,
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = p
        .call(
            Method::GET,
            "/token?scope=repository:team/app:pull",
            &Cred::None,
            Vec::new(),
        )
        .await;
    let token = r.json()["token"].as_str().expect("token").to_string();
    let r = p
        .call(
            Method::GET,
            "/v2/",
            &Cred::Bearer(token.clone()),
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = p
        .call(
            Method::GET,
            "/v2/team/app/manifests/v1",
            &Cred::Bearer(token),
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = p
        .call(Method::GET, "/v2/_catalog", &Cred::None, Vec::new())
        .await;
    assert_eq!(r.json()["repositories"], serde_json::json!(["team/app"]));
}

#[tokio::test]
async fn without_the_token_service_clients_are_challenged_for_basic() {
    let (_up, upstream) = start_upstream().await;
    let files = Files::new(USERS);
    let mut s = matrix_settings(&files);
    s.token = None;
    let p = pier(
        &upstream,
        Opts {
            auth: Some(s),
            private: false,
            gate: no_gate(),
        },
    )
    .await;
    let r = p
        .call(
            Method::GET,
            "/v2/team/app/manifests/v1",
            &Cred::None,
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Basic realm=\"pier\""));
    let r = p
        .call(
            Method::GET,
            "/token?scope=repository:team/app:pull",
            &Cred::None,
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn tokens_of_an_external_issuer_grant_their_access_claims() {
    let (_up, upstream) = start_upstream().await;
    let files = Files::new(USERS);
    let keys = tempfile::tempdir().expect("tempdir");
    let issuer = Signer::load(&TokenSettings {
        issuer: "https://auth.example".into(),
        ttl: Duration::from_secs(300),
        key_file: keys.path().join("issuer.pem"),
        generate: true,
        service: None,
    })
    .expect("issuer key");
    let jwks = keys.path().join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::json!({"keys": [issuer.public_jwk()]}).to_string(),
    )
    .expect("write jwks");
    let mut s = matrix_settings(&files);
    s.external = Some(pier_auth::ExternalIssuer {
        public_key: None,
        jwks: Some(jwks),
        issuer: "https://auth.example".into(),
        audience: "registry.example".into(),
    });
    let p = pier(
        &upstream,
        Opts {
            auth: Some(s),
            private: false,
            gate: no_gate(),
        },
    )
    .await;
    p.seed("team/app", &Cred::Basic("admin", "admin-pw")).await;
    let token = |aud: &str, access| {
        issuer
            .issue("ci-bot", aud, access, SystemTime::now())
            .expect("issue")
            .token
    };
    let pull = || vec![repo_access("team/app", &["pull"])];
    let good = Cred::Bearer(token("registry.example", pull()));
    let r = p
        .call(Method::GET, "/v2/team/app/manifests/v1", &good, Vec::new())
        .await;
    assert_eq!(r.status, 200);
    let r = p
        .call(
            Method::POST,
            "/v2/team/app/blobs/uploads/",
            &good,
            Vec::new(),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "UNAUTHORIZED")
    );
    assert!(r
        .header("www-authenticate")
        .unwrap_or_default()
        .contains("error=\"insufficient_scope\""));
    let wrong_audience = Cred::Bearer(token("elsewhere", pull()));
    let r = p
        .call(
            Method::GET,
            "/v2/team/app/manifests/v1",
            &wrong_audience,
            Vec::new(),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "UNAUTHORIZED")
    );
    assert!(r
        .header("www-authenticate")
        .unwrap_or_default()
        .contains("error=\"invalid_token\""));
}

// ---------------------------------------------------------------------------------------
// Limits.

#[tokio::test]
async fn a_burst_beyond_the_rate_gets_429_with_retry_after() {
    let (_up, upstream) = start_upstream().await;
    let files = Files::new(USERS);
    let mut s = matrix_settings(&files);
    s.rules.push(rule(&["public/**"], "pull", &["anonymous"]));
    let p = pier(
        &upstream,
        Opts {
            auth: Some(s),
            private: false,
            gate: Box::new(|g| {
                g.per_ip = Some(Limiter::new(0.5, 3));
                g.per_user = Some(Limiter::new(0.5, 2));
            }),
        },
    )
    .await;
    for i in 0..3 {
        let r = p
            .call(Method::GET, "/v2/_catalog", &Cred::None, Vec::new())
            .await;
        assert_eq!(r.status, 200, "request {i} of the burst");
    }
    let r = p
        .call(Method::GET, "/v2/_catalog", &Cred::None, Vec::new())
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (429, "TOOMANYREQUESTS")
    );
    let after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=2).contains(&after), "Retry-After {after}");
    assert_eq!(p.metric("rate_limited"), 1);

    // Another address has its own bucket; a user is limited wherever it calls from.
    let writer = Cred::Basic("writer", "writer-pw");
    for (i, ip) in ["127.0.0.2", "127.0.0.3"].into_iter().enumerate() {
        let r = p
            .call_from(ip, Method::GET, "/v2/", &writer, Body::empty())
            .await;
        assert_eq!(r.status, 200, "writer request {i}");
    }
    let r = p
        .call_from("127.0.0.4", Method::GET, "/v2/", &writer, Body::empty())
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (429, "TOOMANYREQUESTS")
    );
}

#[tokio::test]
async fn wrong_passwords_are_limited_per_address_and_per_user() {
    let (_up, upstream) = start_upstream().await;
    let files = Files::new(USERS);
    let p = pier(
        &upstream,
        Opts {
            auth: Some(matrix_settings(&files)),
            private: false,
            gate: Box::new(|g| {
                g.logins = FailedLogins::new(LoginLimits {
                    per_ip: 3,
                    per_user: 5,
                    window: Duration::from_secs(600),
                });
            }),
        },
    )
    .await;
    let call = |ip: &'static str, cred: Cred| {
        let p = &p;
        async move {
            p.call_from(ip, Method::GET, "/v2/", &cred, Body::empty())
                .await
        }
    };
    let limited = |r: &Resp, what: &str| {
        assert_eq!(
            (r.status.as_u16(), r.code().as_str()),
            (429, "TOOMANYREQUESTS"),
            "{what}"
        );
        let after: u64 = r
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .expect("Retry-After");
        assert!((1..=600).contains(&after), "{what}: Retry-After {after}");
    };
    for i in 0..3 {
        let r = call("127.0.0.2", Cred::Basic("writer", "guess")).await;
        assert_eq!(r.status, 401, "wrong password {i}");
    }
    limited(
        &call("127.0.0.2", Cred::Basic("writer", "guess")).await,
        "a fourth guess",
    );
    // While the address is limited its passwords are not checked, right ones included, at
    // the token service too; other addresses are not held by it.
    limited(
        &call("127.0.0.2", Cred::Basic("writer", "writer-pw")).await,
        "the right password from the limited address",
    );
    let r = p
        .call_from(
            "127.0.0.2",
            Method::GET,
            "/token?service=pier.test&scope=repository:team/app:pull",
            &Cred::Basic("writer", "writer-pw"),
            Body::empty(),
        )
        .await;
    limited(
        &r,
        "a token for the right password from the limited address",
    );
    assert_eq!(
        call("127.0.0.3", Cred::Basic("writer", "writer-pw"))
            .await
            .status,
        200
    );

    // Per user: guesses for reader spread over addresses, none over its own limit.
    for ip in [
        "127.0.0.4",
        "127.0.0.4",
        "127.0.0.5",
        "127.0.0.5",
        "127.0.0.6",
    ] {
        let r = call(ip, Cred::Basic("reader", "guess")).await;
        assert_eq!(r.status, 401, "guess for reader from {ip}");
    }
    limited(
        &call("127.0.0.7", Cred::Basic("reader", "reader-pw")).await,
        "reader from a fresh address",
    );
    assert_eq!(
        call("127.0.0.7", Cred::Basic("writer", "writer-pw"))
            .await
            .status,
        200,
        "another user from that address"
    );
    assert_eq!(p.metric("rate_limited"), 4);
}

#[tokio::test]
async fn failed_logins_are_limited_by_default() {
    let (_up, upstream) = start_upstream().await;
    let files = Files::new(USERS);
    let p = pier(
        &upstream,
        Opts {
            auth: Some(matrix_settings(&files)),
            private: false,
            gate: no_gate(),
        },
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..60 {
        let r = p
            .call_from(
                "127.0.0.9",
                Method::GET,
                "/v2/",
                &Cred::Basic("admin", "guess"),
                Body::empty(),
            )
            .await;
        statuses.push(r.status.as_u16());
    }
    let limit = LoginLimits::default().per_ip as usize;
    assert!(statuses[..limit].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses[limit..].iter().all(|s| *s == 429), "{statuses:?}");
}

#[tokio::test]
async fn a_denied_address_is_refused_before_any_work() {
    let (_up, upstream) = start_upstream().await;
    let files = Files::new(USERS);
    let mut s = matrix_settings(&files);
    s.allow = vec!["10.0.0.0/8".parse().expect("net")];
    let mut per_rule = rule(&["team/**"], "pull,push", &["user:reader"]);
    per_rule.allow = vec!["127.0.0.0/8".parse().expect("net")];
    s.rules.push(per_rule);
    let p = pier(
        &upstream,
        Opts {
            auth: Some(s),
            private: false,
            gate: no_gate(),
        },
    )
    .await;

    // A monolithic upload whose body records whether anyone read it.
    let polled = Arc::new(AtomicBool::new(false));
    let flag = polled.clone();
    let body = Body::from_stream(futures::stream::once(async move {
        flag.store(true, Ordering::SeqCst);
        Ok::<_, std::io::Error>(Bytes::from_static(LAYER))
    }));
    let d = Digest::sha256(LAYER);
    let r = p
        .call_from(
            "127.0.0.1",
            Method::POST,
            &format!("/v2/team/app/blobs/uploads/?digest={d}"),
            &Cred::Basic("admin", "admin-pw"),
            body,
        )
        .await;
    assert_eq!((r.status.as_u16(), r.code().as_str()), (403, "DENIED"));
    assert!(!polled.load(Ordering::SeqCst), "the body was read");
    assert_eq!(p.state.registry.uploads().open_sessions(), 0);
    assert!(
        p.state
            .registry
            .blob_store()
            .stat(&d)
            .await
            .expect("stat")
            .is_none(),
        "the blob was stored"
    );

    // From inside the allow-list the same push works; the reader's per-rule grant applies
    // only from 127.0.0.0/8, which the global list now refuses anyway.
    let r = p
        .call_from(
            "10.1.2.3",
            Method::POST,
            &format!("/v2/team/app/blobs/uploads/?digest={d}"),
            &Cred::Basic("admin", "admin-pw"),
            Body::from(LAYER),
        )
        .await;
    assert_eq!(r.status, 201);
    let r = p
        .call_from(
            "10.1.2.3",
            Method::POST,
            "/v2/team/app/blobs/uploads/",
            &Cred::Basic("reader", "reader-pw"),
            Body::empty(),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (403, "DENIED"),
        "per-rule list"
    );
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_is_the_client() {
    let (_up, upstream) = start_upstream().await;
    let files = Files::new(USERS);
    let mut s = matrix_settings(&files);
    s.allow = vec!["10.0.0.0/8".parse().expect("net")];
    let p = pier(
        &upstream,
        Opts {
            auth: Some(s),
            private: false,
            gate: Box::new(|g| g.trusted_proxies = vec!["192.0.2.1/32".parse().expect("net")]),
        },
    )
    .await;
    let call = |peer: &'static str, xff: &'static str| {
        let p = &p;
        async move {
            let mut req = Request::builder()
                .uri("/v2/")
                .header("x-forwarded-for", xff)
                .header(
                    "authorization",
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode("reader:reader-pw")
                    ),
                )
                .body(Body::empty())
                .expect("request");
            let addr: SocketAddr = format!("{peer}:40000").parse().expect("addr");
            req.extensions_mut().insert(ConnectInfo(addr));
            p.router
                .clone()
                .oneshot(req)
                .await
                .expect("infallible")
                .status()
        }
    };
    assert_eq!(
        call("192.0.2.1", "10.1.1.1").await,
        200,
        "through the proxy"
    );
    assert_eq!(
        call("192.0.2.9", "10.1.1.1").await,
        403,
        "an untrusted peer's header is ignored"
    );
    // A client's own X-Forwarded-For comes before the proxy's entry: the proxy's wins.
    assert_eq!(
        call("192.0.2.1", "10.9.9.9, 198.51.100.7").await,
        403,
        "spoofed"
    );
}

// ---------------------------------------------------------------------------------------
// Identities change while running.

#[tokio::test]
async fn htpasswd_changes_apply_while_running() {
    let (_up, upstream) = start_upstream().await;
    let files = Files::new(&[("alice", "a-pw")]);
    let mut s = matrix_settings(&files);
    s.rules = vec![rule(&["**"], "pull", &["authenticated"])];
    let p = pier(
        &upstream,
        Opts {
            auth: Some(s),
            private: false,
            gate: no_gate(),
        },
    )
    .await;
    let alice = Cred::Basic("alice", "a-pw");
    let bob = Cred::Basic("bob", "b-pw");
    assert_eq!(
        p.call(Method::GET, "/v2/", &alice, Vec::new()).await.status,
        200
    );
    assert_eq!(
        p.call(Method::GET, "/v2/", &bob, Vec::new()).await.status,
        401
    );

    files.write_users(&[("bob", "b-pw")]);
    assert_eq!(
        p.call(Method::GET, "/v2/", &bob, Vec::new()).await.status,
        200,
        "new user"
    );
    let r = p.call(Method::GET, "/v2/", &alice, Vec::new()).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "UNAUTHORIZED"),
        "removed user"
    );
}

// ---------------------------------------------------------------------------------------
// Private upstreams.

#[tokio::test]
async fn a_private_upstream_image_is_served_only_to_clients_it_accepts() {
    let (up, upstream) = start_upstream().await;
    *up.users.lock().expect("lock") = Some(HashMap::from([
        ("robot".to_string(), "robot-secret".to_string()),
        ("alice".to_string(), "alice-upstream-pw".to_string()),
    ]));
    // pier's own auth is off: the private check stands on its own.
    let p = pier(
        &upstream,
        Opts {
            auth: None,
            private: true,
            gate: no_gate(),
        },
    )
    .await;
    let (manifest, _) = image(CONFIG, LAYER);
    let layer = Digest::sha256(LAYER);
    let alice = Cred::Basic("alice", "alice-upstream-pw");

    let r = p
        .call(
            Method::GET,
            "/v2/up.example/lib/app/manifests/v1",
            &alice,
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, Bytes::from(manifest));
    let r = p
        .call(
            Method::GET,
            &format!("/v2/up.example/lib/app/blobs/{layer}"),
            &alice,
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, Bytes::from_static(LAYER));

    // The bytes are cached now, yet a client without upstream credentials gets none of them.
    let r = p
        .call(
            Method::GET,
            &format!("/v2/up.example/lib/app/blobs/{layer}"),
            &Cred::None,
            Vec::new(),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "UNAUTHORIZED")
    );
    assert_eq!(
        r.header("www-authenticate"),
        Some("Basic realm=\"up.example\"")
    );
    let mallory = Cred::Basic("mallory", "guess");
    for path in [
        format!("/v2/up.example/lib/app/blobs/{layer}"),
        "/v2/up.example/lib/app/manifests/v1".to_string(),
    ] {
        let r = p.call(Method::GET, &path, &mallory, Vec::new()).await;
        assert_eq!(
            (r.status.as_u16(), r.code().as_str()),
            (403, "DENIED"),
            "{path}"
        );
        assert!(r.body.len() < 300, "an error, not the bytes");
    }

    // Alice again: from the shared cache, with her positive answer remembered.
    let checks = up.checks.load(Ordering::SeqCst);
    let r = p
        .call(
            Method::GET,
            &format!("/v2/up.example/lib/app/blobs/{layer}"),
            &alice,
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        up.checks.load(Ordering::SeqCst),
        checks,
        "remembered for the TTL"
    );
    assert_eq!(
        up.blob_gets.load(Ordering::SeqCst),
        1,
        "one upstream fetch of the blob"
    );

    // Nor does the catalog name the private repository.
    let r = p
        .call(Method::GET, "/v2/_catalog", &alice, Vec::new())
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["repositories"], serde_json::json!([]));
}

#[tokio::test]
async fn rules_naming_a_user_cover_a_private_upstream_but_broad_grants_do_not() {
    let (up, upstream) = start_upstream().await;
    *up.users.lock().expect("lock") = Some(HashMap::from([(
        "robot".to_string(),
        "robot-secret".to_string(),
    )]));
    let files = Files::new(USERS);
    let mut s = matrix_settings(&files);
    s.rules
        .push(rule(&["up.example/**"], "pull", &["authenticated"]));
    let p = pier(
        &upstream,
        Opts {
            auth: Some(s),
            private: true,
            gate: no_gate(),
        },
    )
    .await;
    // `reader` is named (through its group) by a rule on up.example/**: served.
    let r = p
        .call(
            Method::GET,
            "/v2/up.example/lib/app/manifests/v1",
            &Cred::Basic("reader", "reader-pw"),
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = p
        .call(
            Method::GET,
            "/v2/_catalog",
            &Cred::Basic("reader", "reader-pw"),
            Vec::new(),
        )
        .await;
    assert_eq!(
        r.json()["repositories"],
        serde_json::json!(["up.example/lib/app"])
    );
    // `admin`'s grant is by name too; a user only `authenticated` covers is checked upstream.
    let files2 = Files::new(&[("carol", "c-pw")]);
    let mut s = matrix_settings(&files2);
    s.rules = vec![rule(&["**"], "pull", &["authenticated"])];
    let p = pier(
        &upstream,
        Opts {
            auth: Some(s),
            private: true,
            gate: no_gate(),
        },
    )
    .await;
    let r = p
        .call(
            Method::GET,
            "/v2/up.example/lib/app/manifests/v1",
            &Cred::Basic("carol", "c-pw"),
            Vec::new(),
        )
        .await;
    assert_eq!((r.status.as_u16(), r.code().as_str()), (403, "DENIED"));
    let r = p
        .call(
            Method::GET,
            "/v2/_catalog",
            &Cred::Basic("carol", "c-pw"),
            Vec::new(),
        )
        .await;
    assert_eq!(r.json()["repositories"], serde_json::json!([]));
}

#[tokio::test]
async fn auth_off_behaves_as_before() {
    let (_up, upstream) = start_upstream().await;
    let p = pier(
        &upstream,
        Opts {
            auth: None,
            private: false,
            gate: no_gate(),
        },
    )
    .await;
    let d = p.seed("team/app", &Cred::None).await;
    let r = p
        .call(
            Method::DELETE,
            &format!("/v2/team/app/manifests/{d}"),
            &Cred::None,
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 202);
    assert_eq!(
        p.call(Method::GET, "/api/v1/status", &Cred::None, Vec::new())
            .await
            .status,
        200
    );
    assert_eq!(p.metric("allowed"), 0, "nothing counted with auth off");
    // Credentials nobody checks are ignored.
    let r = p
        .call(Method::GET, "/v2/", &Cred::Basic("who", "ever"), Vec::new())
        .await;
    assert_eq!(r.status, 200);
}
