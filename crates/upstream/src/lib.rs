//! A client for upstream OCI registries, built for a mirror that must keep serving when
//! upstreams misbehave.
//!
//! An [`Upstream`] is one registry (say `docker.io`) reached through one or more endpoints tried
//! in order. Each endpoint's health is tracked passively: a connection failure, timeout or 5xx
//! benches it for a cool-down, after which it is tried again. Requests carry cached bearer
//! tokens (fetched on a `401` challenge, anonymously or with credentials) or Basic credentials.
//! Idempotent requests are retried with exponential backoff and jitter; a `429` waits for
//! `Retry-After`; an endpoint that timed out waiting for response headers is not asked again
//! within the same request. Errors carry the transport's causes (DNS, refused, TLS). A blob stream that breaks is resumed with `Range` from the same or the next
//! endpoint.
//!
//! Architecture invariant: this crate knows nothing of pier's storage or its HTTP server. Every
//! error says whose fault it is and whether retrying may help ([`UpstreamError`]).

pub mod auth;
mod push;

pub use push::MountOutcome;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use pier_oci::{media, Digest};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};

use crate::auth::{parse_challenge, Challenge, TokenCache, TokenResponse};

/// Everything about how to reach one upstream registry.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The registry's name as clients write it (`docker.io`, `ghcr.io`, `localhost:5001`).
    pub name: String,
    /// Base URLs (`https://registry-1.docker.io`), tried in order.
    pub endpoints: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub timeouts: Timeouts,
    /// Attempts per request across all endpoints before giving up (at least 1).
    pub attempts: u32,
    /// How long a failing endpoint is skipped before it is tried again.
    pub cooldown: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// From sending a request to its response headers.
    pub first_byte: Duration,
    /// Longest silence while reading a body.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            first_byte: Duration::from_secs(30),
            idle: Duration::from_secs(30),
        }
    }
}

impl UpstreamConfig {
    pub fn new(name: impl Into<String>, endpoints: Vec<String>) -> UpstreamConfig {
        UpstreamConfig {
            name: name.into(),
            endpoints,
            username: None,
            password: None,
            timeouts: Timeouts::default(),
            attempts: 3,
            cooldown: Duration::from_secs(30),
        }
    }
}

/// Why an upstream request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream answered that the thing does not exist. Authoritative; not retried.
    #[error("not found upstream")]
    NotFound,
    /// The upstream refused our credentials (or lack of them).
    #[error("upstream refused access: {0}")]
    Denied(String),
    /// The upstream asked us to slow down and we gave up waiting.
    #[error("upstream is rate limiting (429)")]
    TooManyRequests,
    /// No endpoint could answer: connection failures, 5xx.
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    /// An endpoint was reachable but silent: no response headers, or no body bytes, in time.
    #[error("upstream timed out: {0}")]
    Timeout(String),
    /// The upstream answered something a registry should not.
    #[error("upstream protocol error: {0}")]
    Protocol(String),
}

impl UpstreamError {
    /// Whether a stale cached answer may stand in for this failure.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            UpstreamError::Unavailable(_)
                | UpstreamError::Timeout(_)
                | UpstreamError::TooManyRequests
        )
    }

    /// A transport failure, with every cause reqwest wraps (DNS, refused, TLS, timed out).
    fn transport(context: &str, e: &reqwest::Error) -> UpstreamError {
        let why = causes(e);
        if e.is_timeout() {
            UpstreamError::Timeout(format!("{context}: {why}"))
        } else {
            UpstreamError::Unavailable(format!("{context}: {why}"))
        }
    }
}

/// An error and its sources, outermost first, without repeats: reqwest's own message is only
/// "error sending request", the reason (DNS, connection refused, TLS) is in the chain.
pub fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

pub type Result<T, E = UpstreamError> = std::result::Result<T, E>;

/// A body streaming from an upstream.
pub type BodyStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

/// What an upstream said about a manifest.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    pub media_type: String,
    pub digest: Option<Digest>,
    pub size: Option<u64>,
}

/// A manifest fetched from an upstream.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub media_type: String,
    pub bytes: Bytes,
    /// The digest the upstream announced, if it did.
    pub announced: Option<Digest>,
}

/// The manifest media types pier asks upstreams for.
pub fn manifest_accept() -> HeaderValue {
    HeaderValue::from_static(concat!(
        "application/vnd.oci.image.index.v1+json, ",
        "application/vnd.oci.image.manifest.v1+json, ",
        "application/vnd.docker.distribution.manifest.list.v2+json, ",
        "application/vnd.docker.distribution.manifest.v2+json"
    ))
}

/// Receives what happens on the wire, for metrics. pier's metrics layer implements it; the
/// client itself stays free of any metrics library.
pub trait Observer: Send + Sync {
    /// A request got response headers (`result` is the status class or `error`).
    fn request(&self, upstream: &str, endpoint: &str, result: &'static str, elapsed: Duration);
    /// An endpoint's observed health changed: it failed (`false`, benched or a probe
    /// failed) or answered (`true`). Never called for an endpoint nothing has reached yet.
    fn health(&self, upstream: &str, endpoint: &str, healthy: bool);
}

/// Whether a `/v2/` probe's status means the registry is there: 200, or 401/403 from one
/// that wants credentials.
pub fn probe_answered(status: u16) -> bool {
    matches!(status, 200 | 401 | 403)
}

/// An observer that ignores everything.
pub struct NoObserver;

impl Observer for NoObserver {
    fn request(&self, _: &str, _: &str, _: &'static str, _: Duration) {}
    fn health(&self, _: &str, _: &str, _: bool) {}
}

struct Endpoint {
    base: String,
    benched_until: Mutex<Option<Instant>>,
    /// What the last request or probe saw ([`Health`] as a number): nothing yet, an answer,
    /// or a failure.
    seen: AtomicU8,
}

impl Endpoint {
    fn new(base: &str) -> Endpoint {
        Endpoint {
            base: base.trim_end_matches('/').to_string(),
            benched_until: Mutex::new(None),
            seen: AtomicU8::new(Health::Unknown as u8),
        }
    }

    /// Not benched now: tried in its configured place.
    fn in_rotation(&self) -> bool {
        let until = self.benched_until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_none_or(|t| t <= Instant::now())
    }

    fn health(&self) -> Health {
        if !self.in_rotation() {
            return Health::Unhealthy;
        }
        Health::from_u8(self.seen.load(Ordering::Relaxed))
    }

    /// Record what a request or probe saw. Returns whether that changed the endpoint's health.
    fn observe(&self, health: Health) -> bool {
        self.seen.swap(health as u8, Ordering::Relaxed) != health as u8
    }

    /// Bench the endpoint for `cooldown`.
    fn bench(&self, cooldown: Duration, why: &str) {
        let mut until = self.benched_until.lock().unwrap_or_else(|e| e.into_inner());
        let was_healthy = until.is_none_or(|t| t <= Instant::now());
        if was_healthy {
            tracing::warn!(endpoint = %self.base, cooldown_s = cooldown.as_secs(), why, "upstream endpoint benched");
        }
        *until = Some(Instant::now() + cooldown);
    }

    /// Take the endpoint off the bench: it answered.
    fn restore(&self) {
        let mut until = self.benched_until.lock().unwrap_or_else(|e| e.into_inner());
        until.take();
    }
}

/// An endpoint's health as observed: `Unknown` until a request or probe has reached it (or
/// failed to), `Healthy` while its last answer came, `Unhealthy` while benched or since its
/// last request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Unknown = 0,
    Healthy = 1,
    Unhealthy = 2,
}

impl Health {
    fn from_u8(n: u8) -> Health {
        match n {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    /// `healthy`, `unhealthy` or `unknown`, as the status document and metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }

    pub const ALL: [Health; 3] = [Health::Healthy, Health::Unhealthy, Health::Unknown];
}

/// One endpoint as the status page shows it.
#[derive(Debug, Clone)]
pub struct EndpointHealth {
    pub url: String,
    pub health: Health,
}

/// One upstream registry.
pub struct Upstream {
    config: UpstreamConfig,
    endpoints: Vec<Endpoint>,
    client: reqwest::Client,
    tokens: TokenCache,
    /// Set once an endpoint challenged for Basic credentials: later requests send them at
    /// once, which a streamed upload (whose body cannot be sent twice) needs.
    basic_seen: AtomicBool,
    observer: Arc<dyn Observer>,
    /// When a request (not a probe) last got a 2xx answer from any endpoint.
    last_served: Mutex<Option<Instant>>,
}

/// What a request needs to be allowed: the repository, the token scope (`None`: whatever
/// the registry's challenge names, or pull) and the key its token is cached under.
struct Access {
    repo: String,
    scope: Option<String>,
    key: String,
}

impl Access {
    fn pull(repo: &str) -> Access {
        Access {
            repo: repo.to_string(),
            scope: None,
            key: repo.to_string(),
        }
    }
}

/// One attempt's outcome, to decide what to do next.
enum Attempt {
    Done(reqwest::Response, usize),
    Fail(UpstreamError),
}

impl Upstream {
    /// Each endpoint in failover order with its observed health.
    pub fn endpoint_health(&self) -> Vec<EndpointHealth> {
        self.endpoints
            .iter()
            .map(|e| EndpointHealth {
                url: e.base.clone(),
                health: e.health(),
            })
            .collect()
    }

    /// Whether a request to this upstream got a 2xx answer within the last `within`
    /// (probes do not count: they say it is there, not that anyone uses it).
    pub fn served_within(&self, within: Duration) -> bool {
        let last = self.last_served.lock().unwrap_or_else(|e| e.into_inner());
        last.is_some_and(|t| t.elapsed() <= within)
    }

    /// Record what endpoint `i` was seen doing, telling the observer when that changed.
    fn observe(&self, i: usize, health: Health) {
        let ep = &self.endpoints[i];
        if ep.observe(health) && health != Health::Unknown {
            self.observer
                .health(&self.config.name, &ep.base, health == Health::Healthy);
        }
    }

    /// Ask every endpoint for `/v2/` at once, without credentials and without benching
    /// anything: each endpoint with the status it answered (200, or 401/403 from a registry
    /// that wants a login, all mean it is there) or why it could not be reached within
    /// `limit`. What it saw becomes the endpoint's observed health (a benched endpoint stays
    /// unhealthy until a real request gets through).
    pub async fn probe(&self, limit: Duration) -> Vec<(String, std::result::Result<u16, String>)> {
        let asks = self.endpoints.iter().enumerate().map(|(i, e)| async move {
            let url = format!("{}/v2/", e.base);
            let answer = match tokio::time::timeout(limit, self.client.get(&url).send()).await {
                Err(_) => Err(format!("no answer within {} ms", limit.as_millis())),
                Ok(Err(err)) => Err(causes(&err)),
                Ok(Ok(resp)) => Ok(resp.status().as_u16()),
            };
            match answer {
                Ok(s) if probe_answered(s) => {
                    if e.in_rotation() {
                        self.observe(i, Health::Healthy);
                    }
                }
                _ => self.observe(i, Health::Unhealthy),
            }
            (e.base.clone(), answer)
        });
        futures::future::join_all(asks).await
    }

    pub fn new(config: UpstreamConfig, observer: Arc<dyn Observer>) -> Result<Arc<Upstream>> {
        if config.endpoints.is_empty() {
            return Err(UpstreamError::Protocol(format!(
                "upstream {} has no endpoints",
                config.name
            )));
        }
        // reqwest's read timeout also covers waiting for response headers, so it must not fire
        // before pier's own first-byte and idle timers (which say which one it was): it is only
        // a backstop for bodies pier does not time itself.
        let backstop =
            config.timeouts.first_byte.max(config.timeouts.idle) + Duration::from_secs(1);
        let client = reqwest::Client::builder()
            .connect_timeout(config.timeouts.connect)
            .read_timeout(backstop)
            .redirect(reqwest::redirect::Policy::limited(5))
            .user_agent(concat!("pier/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| UpstreamError::Protocol(format!("http client: {e}")))?;
        let endpoints = config.endpoints.iter().map(|b| Endpoint::new(b)).collect();
        Ok(Arc::new(Upstream {
            config,
            endpoints,
            client,
            tokens: TokenCache::default(),
            basic_seen: AtomicBool::new(false),
            observer,
            last_served: Mutex::new(None),
        }))
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Whether the registry lets `username` pull `repo`, asked with those credentials (a
    /// one-entry tag list, which any registry answers per repository and which Docker Hub
    /// does not count as a pull). `Ok(false)` when it refuses them or does not know the
    /// repository; an error when it could not be asked.
    pub async fn can_pull(&self, repo: &str, username: &str, password: &str) -> Result<bool> {
        let mut config = self.config.clone();
        config.username = Some(username.to_string());
        config.password = Some(password.to_string());
        config.attempts = 1;
        let asker = Upstream {
            config,
            endpoints: self
                .endpoints
                .iter()
                .map(|e| Endpoint::new(&e.base))
                .collect(),
            client: self.client.clone(),
            tokens: TokenCache::default(),
            basic_seen: AtomicBool::new(false),
            observer: Arc::new(NoObserver),
            last_served: Mutex::new(None),
        };
        match asker.tags(repo, "n=1").await {
            Ok(_) => Ok(true),
            Err(UpstreamError::Denied(_) | UpstreamError::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// Endpoint indexes in the order to try: healthy ones first, in configured order, then the
    /// benched ones (better a benched endpoint than none).
    fn order(&self, after: Option<usize>) -> Vec<usize> {
        let n = self.endpoints.len();
        let start = after.map_or(0, |a| (a + 1) % n);
        let rotated: Vec<usize> = (0..n).map(|i| (start + i) % n).collect();
        let (mut healthy, benched): (Vec<usize>, Vec<usize>) = rotated
            .into_iter()
            .partition(|&i| self.endpoints[i].in_rotation());
        if after.is_none() {
            healthy.sort_unstable();
        }
        healthy.extend(benched);
        healthy
    }

    fn bench(&self, endpoint: usize, why: &str) {
        self.endpoints[endpoint].bench(self.config.cooldown, why);
        self.observe(endpoint, Health::Unhealthy);
    }

    async fn send_once(
        &self,
        endpoint: usize,
        method: &Method,
        path: &str,
        access: &Access,
        headers: &HeaderMap,
        body: Option<&Bytes>,
    ) -> Attempt {
        let ep = &self.endpoints[endpoint];
        let url = format!("{}{}", ep.base, path);
        let mut authorized_with: Option<String> = None;
        for round in 0..2 {
            let mut req = self
                .client
                .request(method.clone(), &url)
                .headers(headers.clone());
            if let Some(body) = body {
                req = req.body(body.clone());
            }
            let basic_now = authorized_with.is_some() || self.basic_seen.load(Ordering::Relaxed);
            if let Some(token) = self.tokens.get(&access.key) {
                req = req.bearer_auth(token);
                authorized_with = Some("bearer".into());
            } else if let (Some(u), true) = (&self.config.username, basic_now) {
                req = req.basic_auth(u, self.config.password.as_ref());
            }
            let began = Instant::now();
            let sent = tokio::time::timeout(self.config.timeouts.first_byte, req.send()).await;
            let result = match &sent {
                Ok(Ok(r)) if r.status().is_success() => "2xx",
                Ok(Ok(r)) if r.status() == StatusCode::NOT_FOUND => "404",
                Ok(Ok(r)) if r.status() == StatusCode::TOO_MANY_REQUESTS => "429",
                Ok(Ok(r)) if r.status().is_client_error() => "4xx",
                Ok(Ok(_)) => "5xx",
                Ok(Err(e)) if e.is_timeout() => "timeout",
                Ok(Err(_)) => "error",
                Err(_) => "timeout",
            };
            self.observer
                .request(&self.config.name, &ep.base, result, began.elapsed());
            let resp = match sent {
                Err(_) => {
                    self.bench(endpoint, "no response headers in time");
                    return Attempt::Fail(UpstreamError::Timeout(format!(
                        "{url}: timed out after {}s waiting for response headers",
                        self.config.timeouts.first_byte.as_secs_f64()
                    )));
                }
                Ok(Err(e)) => {
                    self.bench(endpoint, "request failed");
                    return Attempt::Fail(UpstreamError::transport(&url, &e));
                }
                Ok(Ok(r)) => r,
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && round == 0 {
                let challenge = resp
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_challenge);
                match challenge {
                    Some(Challenge::Bearer {
                        realm,
                        service,
                        scope,
                    }) => {
                        self.tokens.forget(&access.key);
                        // A push knows the scope it needs (push, and pull of a mount's
                        // source); a pull takes what the registry asks for.
                        let scope = access
                            .scope
                            .clone()
                            .or(scope)
                            .unwrap_or_else(|| format!("repository:{}:pull", access.repo));
                        match self.fetch_token(&realm, service.as_deref(), &scope).await {
                            Ok((token, lifetime)) => {
                                self.tokens.put(access.key.clone(), token, lifetime);
                                continue;
                            }
                            Err(e) => return Attempt::Fail(e),
                        }
                    }
                    Some(Challenge::Basic) if self.config.username.is_some() => {
                        self.basic_seen.store(true, Ordering::Relaxed);
                        authorized_with = Some("basic".into());
                        continue;
                    }
                    _ => {
                        return Attempt::Fail(UpstreamError::Denied(format!(
                            "{url}: 401 without a usable challenge"
                        )))
                    }
                }
            }
            return Attempt::Done(resp, endpoint);
        }
        Attempt::Fail(UpstreamError::Denied(format!(
            "{url}: still 401 after authenticating"
        )))
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<(String, Duration)> {
        // Several scopes (a mount's source and destination) are several `scope` parameters.
        let mut query: Vec<(&str, &str)> = scope
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(|s| ("scope", s))
            .collect();
        if let Some(s) = service {
            query.push(("service", s));
        }
        let mut req = self.client.get(realm).query(&query);
        if let Some(u) = &self.config.username {
            req = req.basic_auth(u, self.config.password.as_ref());
        }
        let resp = tokio::time::timeout(self.config.timeouts.first_byte, req.send())
            .await
            .map_err(|_| {
                UpstreamError::Timeout(format!(
                    "token endpoint {realm}: timed out after {}s waiting for response headers",
                    self.config.timeouts.first_byte.as_secs_f64()
                ))
            })?
            .map_err(|e| UpstreamError::transport(&format!("token endpoint {realm}"), &e))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(UpstreamError::Denied(format!(
                "token endpoint {realm} refused: {status}"
            )));
        }
        if !status.is_success() {
            return Err(UpstreamError::Unavailable(format!(
                "token endpoint {realm} answered {status}"
            )));
        }
        let body: TokenResponse = resp
            .json()
            .await
            .map_err(|e| UpstreamError::Protocol(format!("token endpoint {realm}: {e}")))?;
        let token = body
            .token
            .or(body.access_token)
            .ok_or_else(|| UpstreamError::Protocol(format!("token endpoint {realm}: no token")))?;
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(60).max(1));
        Ok((token, lifetime))
    }

    /// Send an idempotent request, failing over between endpoints and retrying with backoff.
    /// Returns a 2xx (or 206) response. `after` starts with the endpoint after that one.
    async fn request(
        &self,
        method: Method,
        path: &str,
        access: &Access,
        headers: HeaderMap,
        body: Option<Bytes>,
        after: Option<usize>,
    ) -> Result<(reqwest::Response, usize)> {
        let mut last = UpstreamError::Unavailable("no attempt made".into());
        // An endpoint that stayed silent for a whole first-byte timeout is not asked again
        // within this request: a silent upstream costs a client one timeout per endpoint, not
        // one per attempt.
        let mut silent = vec![false; self.endpoints.len()];
        for attempt in 0..self.config.attempts.max(1) {
            let mut wait = backoff(attempt);
            let order: Vec<usize> = self
                .order(if attempt == 0 { after } else { None })
                .into_iter()
                .filter(|&ep| !silent[ep])
                .collect();
            if order.is_empty() {
                break;
            }
            for ep in order {
                match self
                    .send_once(ep, &method, path, access, &headers, body.as_ref())
                    .await
                {
                    Attempt::Fail(e @ UpstreamError::Denied(_)) => return Err(e),
                    Attempt::Fail(e @ UpstreamError::Timeout(_)) => {
                        silent[ep] = true;
                        last = e;
                    }
                    Attempt::Fail(e) => last = e,
                    Attempt::Done(resp, ep) => {
                        let status = resp.status();
                        let endpoint = &self.endpoints[ep];
                        if !status.is_server_error() {
                            // It answered: whatever the answer means for this request, the
                            // endpoint is up.
                            endpoint.restore();
                            self.observe(ep, Health::Healthy);
                        }
                        if status.is_success() {
                            *self.last_served.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(Instant::now());
                            return Ok((resp, ep));
                        }
                        match status {
                            StatusCode::NOT_FOUND => return Err(UpstreamError::NotFound),
                            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
                                return Err(UpstreamError::Denied(format!(
                                    "{} answered {status}",
                                    endpoint.base
                                )))
                            }
                            StatusCode::TOO_MANY_REQUESTS => {
                                let after = retry_after(resp.headers());
                                tracing::warn!(endpoint = %endpoint.base, retry_after_s = after.as_secs(), "upstream rate limit");
                                wait = wait.max(after);
                                last = UpstreamError::TooManyRequests;
                                // Another endpoint of the same registry shares the limit.
                                break;
                            }
                            s if s.is_server_error() => {
                                self.bench(ep, "5xx");
                                last = UpstreamError::Unavailable(format!(
                                    "{} answered {s}",
                                    endpoint.base
                                ));
                            }
                            s => {
                                return Err(UpstreamError::Protocol(format!(
                                    "{} answered {s}",
                                    endpoint.base
                                )))
                            }
                        }
                    }
                }
            }
            if attempt + 1 < self.config.attempts.max(1) {
                if wait > MAX_WAIT {
                    break;
                }
                tokio::time::sleep(wait).await;
            }
        }
        Err(last)
    }

    /// HEAD a manifest: its media type and digest, without downloading it (Docker Hub does not
    /// count HEADs against its pull limit).
    pub async fn head_manifest(&self, repo: &str, reference: &str) -> Result<ManifestHead> {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, manifest_accept());
        let path = format!("/v2/{repo}/manifests/{reference}");
        let (resp, _) = self
            .request(Method::HEAD, &path, &Access::pull(repo), h, None, None)
            .await?;
        let headers = resp.headers();
        Ok(ManifestHead {
            media_type: content_type(headers),
            digest: header_digest(headers),
            size: headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse().ok()),
        })
    }

    /// GET a manifest's exact bytes (at most `limit`).
    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
        limit: u64,
    ) -> Result<FetchedManifest> {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, manifest_accept());
        let path = format!("/v2/{repo}/manifests/{reference}");
        let (resp, _) = self
            .request(Method::GET, &path, &Access::pull(repo), h, None, None)
            .await?;
        let media_type = content_type(resp.headers());
        let announced = header_digest(resp.headers());
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(UpstreamError::Protocol(format!(
                "manifest larger than {limit} bytes"
            )));
        }
        let mut body = resp.bytes_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| UpstreamError::transport("manifest body", &e))?;
            buf.extend_from_slice(&chunk);
            if buf.len() as u64 > limit {
                return Err(UpstreamError::Protocol(format!(
                    "manifest larger than {limit} bytes"
                )));
            }
        }
        Ok(FetchedManifest {
            media_type,
            bytes: Bytes::from(buf),
            announced,
        })
    }

    /// HEAD a blob: its size.
    pub async fn head_blob(&self, repo: &str, digest: &Digest) -> Result<Option<u64>> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let (resp, _) = self
            .request(
                Method::HEAD,
                &path,
                &Access::pull(repo),
                HeaderMap::new(),
                None,
                None,
            )
            .await?;
        Ok(resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok()))
    }

    /// Open a blob's bytes from `offset` on. Returns the blob's total size if the upstream said
    /// it, and the stream. The stream resumes by itself with `Range` when a connection breaks,
    /// moving to the next endpoint, up to the configured attempts.
    pub async fn get_blob(
        self: &Arc<Self>,
        repo: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<(Option<u64>, BodyStream)> {
        let (total, resp, ep) = self.open_blob(repo, digest, offset, None).await?;
        let this = self.clone();
        let repo = repo.to_string();
        let digest = digest.clone();
        let state = Resume {
            upstream: this,
            repo,
            digest,
            pos: offset,
            total,
            endpoint: ep,
            body: Some(Box::pin(resp.bytes_stream())),
            failures: 0,
            cause: String::new(),
        };
        let stream = futures::stream::unfold(state, |mut s| async move {
            loop {
                if let Some(body) = s.body.as_mut() {
                    let idle = s.upstream.config.timeouts.idle;
                    match tokio::time::timeout(idle, body.next()).await {
                        Ok(Some(Ok(chunk))) => {
                            s.pos += chunk.len() as u64;
                            return Some((Ok(chunk), s));
                        }
                        Ok(None) if s.total.is_none_or(|t| s.pos >= t) => return None,
                        Ok(None) => {
                            s.cause = "body ended early".into();
                            tracing::warn!(pos = s.pos, "upstream blob body ended early; resuming");
                        }
                        Ok(Some(Err(e))) => {
                            s.cause = causes(&e);
                            tracing::warn!(pos = s.pos, error = %s.cause, "upstream blob stream broke; resuming");
                        }
                        Err(_) => {
                            s.cause = format!(
                                "timed out after {}s without body bytes",
                                idle.as_secs_f64()
                            );
                            tracing::warn!(
                                pos = s.pos,
                                idle_s = idle.as_secs_f64(),
                                "upstream blob body silent; resuming"
                            );
                        }
                    }
                    s.upstream.bench(s.endpoint, "blob stream broke");
                    s.body = None;
                }
                s.failures += 1;
                if s.failures > s.upstream.config.attempts.max(1) {
                    return Some((
                        Err(UpstreamError::Unavailable(format!(
                            "blob {} broke at byte {} too many times (last: {})",
                            s.digest, s.pos, s.cause
                        ))),
                        s.finished(),
                    ));
                }
                match s
                    .upstream
                    .open_blob(&s.repo, &s.digest, s.pos, Some(s.endpoint))
                    .await
                {
                    Ok((_, resp, ep)) => {
                        s.endpoint = ep;
                        s.body = Some(Box::pin(resp.bytes_stream()));
                    }
                    Err(e) => return Some((Err(e), s.finished())),
                }
            }
        });
        Ok((total, Box::pin(stream)))
    }

    /// Bytes `start..end` of a blob in one GET with `Range: bytes=start-(end-1)`, for a swarm
    /// piece: the upstream sends the piece, not the rest of the blob behind it. No resume: a
    /// piece that breaks off is fetched again whole. A 200 (a registry that ignores `Range`) is
    /// taken only for a range from byte 0, whose bytes then come first.
    pub async fn get_blob_range(
        &self,
        repo: &str,
        digest: &Digest,
        start: u64,
        end: u64,
    ) -> Result<BodyStream> {
        let last = end.saturating_sub(1);
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&format!("bytes={start}-{last}")) {
            h.insert(header::RANGE, v);
        }
        let path = format!("/v2/{repo}/blobs/{digest}");
        let (resp, _) = self
            .request(Method::GET, &path, &Access::pull(repo), h, None, None)
            .await?;
        let whole_from_zero = start == 0 && resp.status().is_success();
        if resp.status() != StatusCode::PARTIAL_CONTENT && !whole_from_zero {
            return Err(UpstreamError::Protocol(format!(
                "asked for bytes {start}-{last}, got {}",
                resp.status()
            )));
        }
        let idle = self.config.timeouts.idle;
        let body = Box::pin(resp.bytes_stream());
        let stream = futures::stream::unfold(Some(body), move |body| async move {
            let mut body = body?;
            match tokio::time::timeout(idle, body.next()).await {
                Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(body))),
                Ok(None) => None,
                Ok(Some(Err(e))) => Some((Err(UpstreamError::Unavailable(causes(&e))), None)),
                Err(_) => Some((
                    Err(UpstreamError::Timeout(format!(
                        "no bytes of a blob range for {}s",
                        idle.as_secs_f64()
                    ))),
                    None,
                )),
            }
        });
        Ok(Box::pin(stream))
    }

    async fn open_blob(
        &self,
        repo: &str,
        digest: &Digest,
        offset: u64,
        after: Option<usize>,
    ) -> Result<(Option<u64>, reqwest::Response, usize)> {
        let mut h = HeaderMap::new();
        if offset > 0 {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-")) {
                h.insert(header::RANGE, v);
            }
        }
        let path = format!("/v2/{repo}/blobs/{digest}");
        let (resp, ep) = self
            .request(Method::GET, &path, &Access::pull(repo), h, None, after)
            .await?;
        let total = if offset == 0 {
            if resp.status() == StatusCode::PARTIAL_CONTENT {
                return Err(UpstreamError::Protocol(
                    "206 to a request without Range".into(),
                ));
            }
            resp.content_length()
        } else {
            if resp.status() != StatusCode::PARTIAL_CONTENT {
                return Err(UpstreamError::Protocol(format!(
                    "asked for bytes from {offset}, got {}",
                    resp.status()
                )));
            }
            content_range_total(resp.headers())
        };
        Ok((total, resp, ep))
    }

    /// GET the referrers index of `digest`, passing the query (`artifactType`) through. Returns
    /// the body and whether the upstream applied a filter.
    pub async fn referrers(
        &self,
        repo: &str,
        digest: &Digest,
        query: &str,
    ) -> Result<(Bytes, bool)> {
        let path = with_query(format!("/v2/{repo}/referrers/{digest}"), query);
        let (body, headers) = self
            .get_whole(&path, &Access::pull(repo), "referrers body")
            .await?;
        Ok((body, headers.contains_key("oci-filters-applied")))
    }

    /// GET a page of the registry's catalog (`/v2/_catalog?n=&last=`). Returns the body and
    /// any `Link`. Registries that keep their catalog private answer 401 or 404.
    pub async fn catalog(&self, query: &str) -> Result<(Bytes, Option<String>)> {
        let path = with_query("/v2/_catalog".to_string(), query);
        let access = Access {
            repo: String::new(),
            scope: Some("registry:catalog:*".to_string()),
            key: "catalog".to_string(),
        };
        let (body, headers) = self.get_whole(&path, &access, "catalog body").await?;
        Ok((body, link(&headers)))
    }

    /// GET a tags list page, passing the query through. Returns the body and any `Link`.
    pub async fn tags(&self, repo: &str, query: &str) -> Result<(Bytes, Option<String>)> {
        let path = with_query(format!("/v2/{repo}/tags/list"), query);
        let (body, headers) = self
            .get_whole(&path, &Access::pull(repo), "tags body")
            .await?;
        Ok((body, link(&headers)))
    }

    /// GET a small document whole: its body (`what` names it in errors) and headers.
    async fn get_whole(
        &self,
        path: &str,
        access: &Access,
        what: &str,
    ) -> Result<(Bytes, HeaderMap)> {
        let (resp, _) = self
            .request(Method::GET, path, access, HeaderMap::new(), None, None)
            .await?;
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|e| UpstreamError::transport(what, &e))?;
        Ok((body, headers))
    }
}

struct Resume {
    upstream: Arc<Upstream>,
    repo: String,
    digest: Digest,
    pos: u64,
    total: Option<u64>,
    endpoint: usize,
    body: Option<std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>>,
    failures: u32,
    /// Why the body last broke, for the error when resuming gives up.
    cause: String,
}

impl Resume {
    /// A state whose next poll ends the stream.
    fn finished(mut self) -> Resume {
        self.body = Some(Box::pin(futures::stream::empty()));
        self.total = Some(0);
        self
    }
}

const MAX_WAIT: Duration = Duration::from_secs(10);

/// Exponential backoff with jitter: ~100 ms, 200 ms, 400 ms … capped at 5 s.
fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(6)).min(5_000);
    Duration::from_millis(base / 2 + fastrand::u64(0..=base / 2))
}

fn retry_after(headers: &HeaderMap) -> Duration {
    headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(1), Duration::from_secs)
}

/// `path` with `query` after a `?`, when there is one.
fn with_query(path: String, query: &str) -> String {
    if query.is_empty() {
        path
    } else {
        format!("{path}?{query}")
    }
}

/// The `Link` header (the next page of a listing), if any.
fn link(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::LINK)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or("").trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| media::OCI_MANIFEST.to_string())
}

fn header_digest(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse().ok())
}

fn content_range_total(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.rsplit('/').next())
        .and_then(|t| t.parse().ok())
}

#[cfg(test)]
mod range_tests {
    use std::sync::{Arc, Mutex};

    use axum::extract::{Request, State};
    use axum::response::{IntoResponse, Response};

    use super::*;

    /// A blob of 1,000 bytes served by a registry that honours `Range` (`ranges`) or ignores
    /// it; the `Range` headers it was sent are recorded.
    #[derive(Clone)]
    struct Blob {
        ranges: bool,
        seen: Arc<Mutex<Vec<String>>>,
    }

    fn bytes() -> Vec<u8> {
        (0..1000u32).map(|i| (i % 251) as u8).collect()
    }

    async fn serve(State(b): State<Blob>, req: Request) -> Response {
        let range = req
            .headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        b.seen.lock().unwrap().push(range.clone());
        let all = bytes();
        let bounds = range
            .strip_prefix("bytes=")
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, z)| Some((a.parse::<usize>().ok()?, z.parse::<usize>().ok()?)));
        match bounds.filter(|_| b.ranges) {
            Some((a, z)) => (
                StatusCode::PARTIAL_CONTENT,
                [(header::CONTENT_RANGE, format!("bytes {a}-{z}/1000"))],
                all[a..=z].to_vec(),
            )
                .into_response(),
            None => (StatusCode::OK, all).into_response(),
        }
    }

    async fn start(ranges: bool) -> (Arc<Upstream>, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new().fallback(serve).with_state(Blob {
            ranges,
            seen: seen.clone(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let up = Upstream::new(
            UpstreamConfig::new("target", vec![format!("http://{addr}")]),
            Arc::new(NoObserver),
        )
        .unwrap();
        (up, seen)
    }

    async fn read(body: BodyStream) -> std::result::Result<Vec<u8>, UpstreamError> {
        let mut out = Vec::new();
        let mut body = body;
        while let Some(c) = body.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_blob_range_asks_for_just_that_range() {
        let digest = Digest::sha256(&bytes());
        let (up, seen) = start(true).await;
        let got = read(up.get_blob_range("t", &digest, 100, 300).await.unwrap())
            .await
            .unwrap();
        assert_eq!(got, bytes()[100..300].to_vec());
        assert_eq!(*seen.lock().unwrap(), vec!["bytes=100-299".to_string()]);

        // A registry that ignores Range: from byte 0 its whole body starts with the range;
        // from anywhere else it is an error, not the wrong bytes.
        let (up, _) = start(false).await;
        let got = read(up.get_blob_range("t", &digest, 0, 10).await.unwrap())
            .await
            .unwrap();
        assert_eq!(got[..10], bytes()[..10]);
        match up.get_blob_range("t", &digest, 10, 20).await {
            Err(UpstreamError::Protocol(why)) => assert!(why.contains("200"), "{why}"),
            Err(e) => panic!("expected a protocol error, got {e}"),
            Ok(_) => panic!("expected a protocol error, got a body"),
        }
    }
}
