//! HTTP to the registry under test: one request-and-response exchange at a time, timed from
//! sending the request to the last byte of the response body, with whatever authentication the
//! registry asks for.
//!
//! Authentication is reactive, as Docker and containerd do it: requests go out bare until the
//! registry answers `401`. A `Basic` challenge switches every later request to Basic
//! credentials; a `Bearer` challenge sends us to its realm (`?service=&scope=`, with Basic
//! credentials when given) for a token, cached by scope until it expires. The request is then
//! sent once more; only that attempt is timed, since the handshake is not the registry's speed.
//! Token fetches are serialised per client, so a hundred workers starting together ask for one
//! token, not a hundred.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pier_oci::{Digest, Hasher};
use pier_upstream::auth::{parse_challenge, Challenge, TokenCache, TokenResponse};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};

use crate::args::TargetArgs;
use crate::content::Layer;
use crate::error::BenchError;
use crate::stats::{Counters, Failure, Kind, Tally};

/// A token endpoint that does not say how long its token lives is taken at the specification's
/// default.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Manifests larger than this are not kept in memory (pier's own limit is 4 MiB).
const MAX_KEPT_BODY: usize = 32 << 20;

/// What a request needs the registry to allow on its repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Pull,
    Push,
}

/// A token scope, also the key of the token cache.
pub fn scope(repo: &str, access: Access) -> String {
    match access {
        Access::Pull => format!("repository:{repo}:pull"),
        Access::Push => format!("repository:{repo}:pull,push"),
    }
}

/// A request body that can be built again, for the retry after an auth challenge.
#[derive(Clone)]
pub enum Payload {
    Empty,
    Bytes(Bytes),
    /// Bytes `[start, end)` of a generated layer, streamed without copying.
    Layer {
        layer: Layer,
        start: u64,
        end: u64,
    },
}

impl Payload {
    pub fn len(&self) -> u64 {
        match self {
            Payload::Empty => 0,
            Payload::Bytes(b) => b.len() as u64,
            Payload::Layer { start, end, .. } => end - start,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes `[start, end)` of this payload, for one chunk of a chunked upload.
    pub fn slice(&self, start: u64, end: u64) -> Payload {
        match self {
            Payload::Empty => Payload::Empty,
            Payload::Bytes(b) => Payload::Bytes(b.slice(start as usize..end as usize)),
            Payload::Layer {
                layer, start: s, ..
            } => Payload::Layer {
                layer: layer.clone(),
                start: s + start,
                end: s + end,
            },
        }
    }

    fn attach(
        &self,
        req: reqwest::RequestBuilder,
        bodyless: bool,
        counters: &Arc<Counters>,
    ) -> reqwest::RequestBuilder {
        match self {
            // POST, PUT and PATCH without a body still say so; a GET says nothing.
            Payload::Empty if bodyless => req,
            Payload::Empty => req.header(header::CONTENT_LENGTH, 0),
            Payload::Bytes(b) => {
                Counters::add(&counters.bytes_out, b.len() as u64);
                req.body(b.clone())
            }
            Payload::Layer { layer, start, end } => {
                let counters = Arc::clone(counters);
                let pieces = layer.pieces(*start, *end).map(move |piece| {
                    // Counted as handed to the connection, so a run cut short still counts
                    // what it sent.
                    Counters::add(&counters.bytes_out, piece.len() as u64);
                    Ok::<Bytes, std::io::Error>(piece)
                });
                // An explicit length keeps the upload length-delimited rather than chunked,
                // which some registries require.
                req.header(header::CONTENT_LENGTH, end - start)
                    .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
            }
        }
    }
}

/// One request to make.
pub struct Req {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub payload: Payload,
}

impl Req {
    pub fn get(url: Url) -> Req {
        Req {
            method: Method::GET,
            url,
            headers: HeaderMap::new(),
            payload: Payload::Empty,
        }
    }

    pub fn header(mut self, name: header::HeaderName, value: &str) -> Req {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.insert(name, v);
        }
        self
    }
}

/// What to do with a response body.
pub enum Sink {
    /// Read and drop it (blob downloads without --verify).
    Discard,
    /// Keep it (manifests).
    Keep,
    /// Hash it and fail with `digest_mismatch` unless it matches; `keep` also keeps it.
    Verify { digest: Digest, keep: bool },
}

/// A successful exchange.
pub struct Done {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Done {
    pub fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub struct Client {
    http: reqwest::Client,
    base: Url,
    username: Option<String>,
    password: Option<String>,
    /// The registry asked for Basic credentials once: send them up front from now on.
    basic: AtomicBool,
    tokens: TokenCache,
    token_fetch: tokio::sync::Mutex<()>,
}

impl Client {
    pub fn new(target: &TargetArgs) -> Result<Client, BenchError> {
        let base = Url::parse(&target.registry)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
            .ok_or_else(|| {
                BenchError::Usage(format!(
                    "--registry {:?} is not an http:// or https:// URL",
                    target.registry
                ))
            })?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("pier-bench/", env!("CARGO_PKG_VERSION")))
            .danger_accept_invalid_certs(target.insecure)
            .connect_timeout(target.timeout.min(Duration::from_secs(10)))
            .timeout(target.timeout)
            .build()
            .map_err(BenchError::Client)?;
        Ok(Client {
            http,
            base,
            username: target.username.clone(),
            password: target.password.clone(),
            basic: AtomicBool::new(false),
            tokens: TokenCache::default(),
            token_fetch: tokio::sync::Mutex::new(()),
        })
    }

    /// `path` (starting with `/v2/`) on the registry, or a `Location` the registry returned
    /// (absolute or relative).
    pub fn url(&self, path: &str) -> Result<Url, Failure> {
        self.base.join(path).map_err(|_| Failure::Protocol)
    }

    /// Send `req` and read its whole response, recording the outcome under `kind` in `tally`:
    /// success when the status is one of `expect` (and the body passes `sink`), otherwise the
    /// failure, which is also returned.
    pub async fn exchange(
        &self,
        tally: &mut Tally,
        kind: Kind,
        scope: &str,
        req: &Req,
        expect: &[StatusCode],
        sink: Sink,
    ) -> Result<Done, Failure> {
        let result = self
            .exchange_inner(tally, kind, scope, req, expect, sink)
            .await;
        match &result {
            Ok((_, latency)) => tally.success(kind, *latency, req.payload.len()),
            Err(failure) => tally.failure(kind, failure),
        }
        result.map(|(done, _)| done)
    }

    async fn exchange_inner(
        &self,
        tally: &mut Tally,
        kind: Kind,
        scope: &str,
        req: &Req,
        expect: &[StatusCode],
        sink: Sink,
    ) -> Result<(Done, Duration), Failure> {
        let (resp, started) = self.send(tally, scope, req).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        if !expect.contains(&status) {
            // Read the (small) error body so the connection can be reused, then fail.
            let _ = read_body(resp, tally, kind, &Sink::Discard).await;
            return Err(Failure::Status(status.as_u16()));
        }
        let body = read_body(resp, tally, kind, &sink).await?;
        let latency = started.elapsed();
        Ok((
            Done {
                status,
                headers,
                body,
            },
            latency,
        ))
    }

    /// Send `req`, answering one authentication challenge. Returns the response and when the
    /// timed attempt started.
    async fn send(
        &self,
        tally: &mut Tally,
        scope: &str,
        req: &Req,
    ) -> Result<(reqwest::Response, Instant), Failure> {
        let mut challenged = false;
        loop {
            let mut builder = self
                .http
                .request(req.method.clone(), req.url.clone())
                .headers(req.headers.clone());
            let token = self.tokens.get(scope);
            let mut sent_basic = false;
            if let Some(token) = &token {
                builder = builder.bearer_auth(token);
            } else if self.basic.load(Ordering::Relaxed) {
                if let Some(user) = &self.username {
                    builder = builder.basic_auth(user, self.password.as_ref());
                    sent_basic = true;
                }
            }
            let bodyless = matches!(req.method, Method::GET | Method::HEAD);
            builder = req.payload.attach(builder, bodyless, &tally.counters);
            let started = Instant::now();
            let resp = builder
                .send()
                .await
                .map_err(|e| Failure::from_reqwest(&e))?;
            if resp.status() != StatusCode::UNAUTHORIZED || challenged {
                return Ok((resp, started));
            }
            challenged = true;
            let challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge);
            match challenge {
                Some(Challenge::Bearer {
                    realm,
                    service,
                    scope: asked,
                }) => {
                    self.refresh_token(
                        tally,
                        scope,
                        token.as_deref(),
                        &realm,
                        service.as_deref(),
                        asked.as_deref(),
                    )
                    .await?;
                }
                Some(Challenge::Basic) if self.username.is_some() => {
                    if sent_basic {
                        // The credentials themselves were refused.
                        return Ok((resp, started));
                    }
                    self.basic.store(true, Ordering::Relaxed);
                }
                _ => return Ok((resp, started)),
            }
        }
    }

    /// Get a token for `scope` from `realm`, unless another worker replaced the one that was
    /// refused (`used`) while we waited for the lock.
    async fn refresh_token(
        &self,
        tally: &mut Tally,
        scope: &str,
        used: Option<&str>,
        realm: &str,
        service: Option<&str>,
        asked: Option<&str>,
    ) -> Result<(), Failure> {
        let _one_at_a_time = self.token_fetch.lock().await;
        if let Some(current) = self.tokens.get(scope) {
            if Some(current.as_str()) != used {
                return Ok(());
            }
        }
        self.tokens.forget(scope);
        let mut url = Url::parse(realm).map_err(|_| Failure::Auth)?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            query.append_pair("scope", scope);
            // The registry may name a scope of its own; ask for both.
            if let Some(asked) = asked.filter(|a| *a != scope && !a.is_empty()) {
                query.append_pair("scope", asked);
            }
        }
        let mut builder = self.http.get(url);
        if let Some(user) = &self.username {
            builder = builder.basic_auth(user, self.password.as_ref());
        }
        let started = Instant::now();
        let answer = async {
            let resp = builder.send().await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let body: TokenResponse = resp.json().await.ok()?;
            let token = body.token.or(body.access_token)?;
            let lifetime = body
                .expires_in
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_TOKEN_LIFETIME);
            Some((token, lifetime))
        }
        .await;
        match answer {
            Some((token, lifetime)) => {
                tally.success(Kind::Token, started.elapsed(), 0);
                self.tokens.put(scope.to_string(), token, lifetime);
                Ok(())
            }
            None => {
                tally.token_failure();
                Err(Failure::Auth)
            }
        }
    }
}

/// Read a whole body, counting its bytes as they arrive and applying `sink`.
async fn read_body(
    mut resp: reqwest::Response,
    tally: &mut Tally,
    kind: Kind,
    sink: &Sink,
) -> Result<Bytes, Failure> {
    let (keep, mut hasher, expected) = match sink {
        Sink::Discard => (false, None, None),
        Sink::Keep => (true, None, None),
        Sink::Verify { digest, keep } => {
            (*keep, Some(Hasher::new(digest.algorithm())), Some(digest))
        }
    };
    let mut kept = BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| Failure::from_reqwest(&e))? {
        tally.received(kind, chunk.len() as u64);
        if let Some(h) = hasher.as_mut() {
            h.update(&chunk);
        }
        if keep {
            if kept.len() + chunk.len() > MAX_KEPT_BODY {
                return Err(Failure::BadManifest);
            }
            kept.extend_from_slice(&chunk);
        }
    }
    if let (Some(h), Some(expected)) = (hasher, expected) {
        if h.finish() != *expected {
            return Err(Failure::DigestMismatch);
        }
    }
    Ok(kept.freeze())
}

#[cfg(test)]
mod tests {
    //! The auth flows against a small fake registry that demands a bearer token (or Basic
    //! credentials) and a token endpoint that wants Basic credentials.

    use std::sync::atomic::AtomicUsize;

    use axum::extract::{RawQuery, State};
    use axum::http::{HeaderMap as AxumHeaders, StatusCode as AxumStatus};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use axum::Router;

    use super::*;

    const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    /// `user:secret`
    const GOOD_BASIC: &str = "Basic dXNlcjpzZWNyZXQ=";

    struct Fake {
        addr: std::net::SocketAddr,
        basic_only: bool,
        token_lifetime: u64,
        tokens_issued: AtomicUsize,
        /// The scope query of the last token request.
        last_query: std::sync::Mutex<String>,
    }

    fn authorization(h: &AxumHeaders) -> &str {
        h.get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    async fn manifest(State(fake): State<Arc<Fake>>, headers: AxumHeaders) -> Response {
        let auth = authorization(&headers);
        let issued = fake.tokens_issued.load(Ordering::SeqCst);
        let ok = if fake.basic_only {
            auth == GOOD_BASIC
        } else {
            // Only the newest token is valid, so an expired one is refused.
            auth == format!("Bearer token-{issued}")
        };
        if ok {
            return ([("content-type", pier_oci::media::OCI_MANIFEST)], MANIFEST).into_response();
        }
        let challenge = if fake.basic_only {
            r#"Basic realm="fake""#.to_string()
        } else {
            format!(
                r#"Bearer realm="http://{}/token",service="fake",scope="repository:team/app:pull""#,
                fake.addr
            )
        };
        (
            AxumStatus::UNAUTHORIZED,
            [("www-authenticate", challenge)],
            "",
        )
            .into_response()
    }

    async fn token(
        State(fake): State<Arc<Fake>>,
        headers: AxumHeaders,
        RawQuery(query): RawQuery,
    ) -> Response {
        if authorization(&headers) != GOOD_BASIC {
            return AxumStatus::UNAUTHORIZED.into_response();
        }
        *fake.last_query.lock().unwrap() = query.unwrap_or_default();
        let n = fake.tokens_issued.fetch_add(1, Ordering::SeqCst) + 1;
        axum::Json(serde_json::json!({
            "token": format!("token-{n}"),
            "expires_in": fake.token_lifetime,
        }))
        .into_response()
    }

    async fn start(basic_only: bool, token_lifetime: u64) -> Arc<Fake> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = Arc::new(Fake {
            addr: listener.local_addr().unwrap(),
            basic_only,
            token_lifetime,
            tokens_issued: AtomicUsize::new(0),
            last_query: Default::default(),
        });
        let app = Router::new()
            .route("/v2/team/app/manifests/v1", get(manifest))
            .route("/token", get(token))
            .with_state(Arc::clone(&fake));
        tokio::spawn(async move { axum::serve(listener, app).await });
        fake
    }

    fn client(fake: &Fake, password: &str) -> Client {
        Client::new(&TargetArgs {
            registry: format!("http://{}", fake.addr),
            insecure: false,
            username: Some("user".into()),
            password: Some(password.into()),
            timeout: Duration::from_secs(10),
        })
        .unwrap()
    }

    async fn get_manifest(client: &Client, tally: &mut Tally) -> Result<Done, Failure> {
        let req = Req::get(client.url("/v2/team/app/manifests/v1").unwrap());
        client
            .exchange(
                tally,
                Kind::ManifestGet,
                &scope("team/app", Access::Pull),
                &req,
                &[StatusCode::OK],
                Sink::Keep,
            )
            .await
    }

    fn tally() -> Tally {
        Tally::new(Arc::new(Counters::default()))
    }

    #[tokio::test]
    async fn bearer_token_is_fetched_once_cached_and_renewed() {
        let fake = start(false, 300).await;
        let client = Arc::new(client(&fake, "secret"));
        // Many requests at once: one token request between them.
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let client = Arc::clone(&client);
            tasks.push(tokio::spawn(async move {
                let mut tally = tally();
                let done = get_manifest(&client, &mut tally).await.map(|d| d.body);
                (done, tally.stats)
            }));
        }
        let mut stats = crate::stats::Stats::default();
        for t in tasks {
            let (done, s) = t.await.unwrap();
            assert_eq!(done.unwrap(), MANIFEST.as_bytes());
            stats.merge(&s);
        }
        assert_eq!(fake.tokens_issued.load(Ordering::SeqCst), 1);
        assert_eq!(stats.kinds[&Kind::Token].requests, 1);
        assert_eq!(stats.kinds[&Kind::ManifestGet].requests, 8);
        assert!(stats.errors.is_empty(), "{:?}", stats.errors);
        let query = fake.last_query.lock().unwrap().clone();
        assert_eq!(query, "service=fake&scope=repository%3Ateam%2Fapp%3Apull");

        // A cached token is reused without asking again.
        get_manifest(&client, &mut tally()).await.unwrap();
        assert_eq!(fake.tokens_issued.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_expired_token_is_replaced() {
        let fake = start(false, 1).await;
        let client = client(&fake, "secret");
        get_manifest(&client, &mut tally()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        get_manifest(&client, &mut tally()).await.unwrap();
        assert_eq!(fake.tokens_issued.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn refused_credentials_are_an_auth_error() {
        let fake = start(false, 300).await;
        let client = client(&fake, "wrong");
        let mut tally = tally();
        assert_eq!(
            get_manifest(&client, &mut tally).await.err(),
            Some(Failure::Auth)
        );
        assert_eq!(tally.stats.errors["auth"], 1);
        assert_eq!(tally.stats.kinds[&Kind::Token].errors, 1);
    }

    #[tokio::test]
    async fn basic_challenge_is_answered_with_credentials() {
        let fake = start(true, 300).await;
        let good = client(&fake, "secret");
        let mut t = tally();
        get_manifest(&good, &mut t).await.unwrap();
        get_manifest(&good, &mut t).await.unwrap();
        assert!(t.stats.errors.is_empty());
        assert!(!t.stats.kinds.contains_key(&Kind::Token));

        let bad = client(&fake, "wrong");
        let mut t = tally();
        assert_eq!(
            get_manifest(&bad, &mut t).await.err(),
            Some(Failure::Status(401))
        );
        assert_eq!(t.stats.errors["http_401"], 1);
    }
}
