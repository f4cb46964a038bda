//! Authentication and authorization at the HTTP front (docs/security.md). [`guard`] runs
//! before every handler: it refuses addresses outside the allow-list and callers over their
//! rate (before a byte of the body is read or storage is touched), identifies the caller from
//! Basic credentials or a bearer token, and decides the node-wide endpoints (`/api/v1/*`,
//! `/ui/`, `/metrics` and the health checks). `/v2/` requests are decided by [`authorize`],
//! called from `v2::dispatch` once the repository is known (a mirrored one by the name it is
//! cached under). [`token`] is the token service at `/token`. Private upstreams are checked
//! here too, with the client's own credentials, whether or not pier's auth is on.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use pier_auth::{Actions, Auth, FailedLogins, Identity, LimitedBy, LoginLimits, Scope};
use pier_mirror::{MirrorError, MirrorRef};
use pier_oci::{ErrorCode, Route};
use pier_peer::rate::RateLimit;
use sha2::{Digest as _, Sha256};

use crate::error::ApiError;
use crate::metrics::ResultLabels;
use crate::respond::Query;
use crate::AppState;

/// Buckets kept per limiter before idle ones are dropped.
const MAX_BUCKETS: usize = 100_000;

/// pier's auth as the HTTP front runs it.
pub struct AuthGate {
    pub auth: Auth,
    /// `/metrics`, `/healthz` and `/readyz` without credentials.
    pub metrics_open: bool,
    pub per_ip: Option<Limiter>,
    pub per_user: Option<Limiter>,
    /// The token realm in challenges is `https://` (the listener serves TLS).
    pub https: bool,
    /// Proxies whose `X-Forwarded-For` names the client (`[auth] trusted_proxies`).
    pub trusted_proxies: Vec<pier_auth::IpNet>,
    /// Wrong passwords per address and per user (`[auth.rate] failed_logins_*`).
    pub logins: FailedLogins,
}

impl AuthGate {
    /// The client's address: the TCP peer's, or, when the peer is a trusted proxy, the last
    /// address in `X-Forwarded-For` that is not one (the first any proxy of ours saw).
    pub fn client_ip<B>(&self, req: &Request<B>) -> IpAddr {
        let peer = client_ip(req);
        let trusted = |ip: IpAddr| {
            !self.trusted_proxies.is_empty()
                && pier_auth::rules::ip_allowed(&self.trusted_proxies, ip)
        };
        if !trusted(peer) {
            return peer;
        }
        let hops: Vec<IpAddr> = req
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse().ok())
            .collect();
        hops.iter()
            .rev()
            .find(|ip| !trusted(**ip))
            .or(hops.first())
            .copied()
            .unwrap_or(peer)
    }
}

impl AuthGate {
    pub fn new(auth: Auth) -> AuthGate {
        AuthGate {
            auth,
            metrics_open: true,
            per_ip: None,
            per_user: None,
            https: false,
            trusted_proxies: Vec::new(),
            logins: FailedLogins::new(LoginLimits::default()),
        }
    }
}

/// Token buckets by key (a client address, a user name), one [`RateLimit`] each.
pub struct Limiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Arc<RateLimit>>>,
}

impl Limiter {
    /// `per_sec` requests a second, `burst` at once.
    pub fn new(per_sec: f64, burst: u32) -> Limiter {
        Limiter {
            per_sec,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// One request for `key`, or how long it must wait.
    fn check(&self, key: &str) -> Result<(), Duration> {
        let bucket = {
            let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
            if b.len() >= MAX_BUCKETS && !b.contains_key(key) {
                // A flood of new addresses: start over rather than grow without bound.
                b.clear();
            }
            b.entry(key.to_string())
                .or_insert_with(|| RateLimit::with_burst(self.per_sec, self.burst))
                .clone()
        };
        bucket.try_take(1.0)
    }
}

/// Who is calling, as [`guard`] found out; handlers read it from the request's extensions.
#[derive(Clone, Debug)]
pub struct Caller {
    pub identity: Identity,
    pub ip: IpAddr,
    /// The Basic credentials sent, for private upstreams (checked there, not by pier).
    pub basic: Option<(String, String)>,
    /// Credentials were sent and failed (why), or a token did not verify.
    pub failed: Option<String>,
    /// The failed or lacking credentials were a bearer token.
    pub bearer: bool,
}

enum Credentials {
    Basic(String, String),
    Bearer(String),
}

fn credentials(headers: &HeaderMap) -> Option<Credentials> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (u, p) = text.split_once(':')?;
        Some(Credentials::Basic(u.to_string(), p.to_string()))
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Some(Credentials::Bearer(rest.to_string()))
    } else {
        None
    }
}

/// The TCP peer's address. A request that did not come through the accept loop (an
/// in-process test without `ConnectInfo`) is from 0.0.0.0, which no allow-list contains.
pub fn client_ip<B>(req: &Request<B>) -> IpAddr {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
}

/// Identify the caller of `req` (without deciding anything).
fn identify(gate: Option<&AuthGate>, req: &Request<Body>) -> Caller {
    let ip = gate.map_or_else(|| client_ip(req), |g| g.client_ip(req));
    let mut caller = Caller {
        identity: Identity::Anonymous,
        ip,
        basic: None,
        failed: None,
        bearer: false,
    };
    match credentials(req.headers()) {
        None => {}
        Some(Credentials::Basic(u, p)) => {
            if let Some(g) = gate {
                match g.auth.basic(&u, &p) {
                    Ok(id) => caller.identity = id,
                    Err(e) => caller.failed = Some(e.to_string()),
                }
            }
            caller.basic = Some((u, p));
        }
        Some(Credentials::Bearer(t)) => {
            caller.bearer = true;
            if let Some(g) = gate {
                match g.auth.bearer(&t) {
                    Ok(id) => caller.identity = id,
                    Err(e) => caller.failed = Some(e.to_string()),
                }
            }
        }
    }
    caller
}

/// The middleware in front of every route.
pub async fn guard(State(state): State<AppState>, mut req: Request<Body>, next: Next) -> Response {
    let Some(gate) = state.auth.clone() else {
        // Auth off: every request passes; only private upstreams look at credentials.
        let caller = identify(None, &req);
        req.extensions_mut().insert(caller);
        return next.run(req).await;
    };
    let ip = gate.client_ip(&req);
    let path = req.uri().path().to_string();
    if !gate.auth.client_allowed(ip) {
        let mut caller = identify(None, &req);
        caller.ip = ip;
        return refuse(&state, &caller, req.method(), &path, "address not allowed");
    }
    if let Some(l) = &gate.per_ip {
        if let Err(wait) = l.check(&ip.to_string()) {
            return too_many(&state, wait, &format!("address {ip}"));
        }
    }
    if path == "/token" {
        // The token service reads the credentials itself.
        return next.run(req).await;
    }
    // A password is not even checked while its address or its user is over the failures
    // allowed: guessing stops, and so does the bcrypt work it would cost.
    if let Some(Credentials::Basic(user, _)) = credentials(req.headers()) {
        if let Err(refused) = login_allowed(&state, &gate, ip, &user, req.method(), &path) {
            return refused.into_response();
        }
    }
    let caller = identify(Some(&gate), &req);
    if let (Some(_), Some((user, _))) = (&caller.failed, &caller.basic) {
        gate.logins.failed(ip, user, now());
    }
    // Anonymous callers, with or without an anonymous token, are held by the address limit.
    let named = !caller.identity.is_anonymous() && caller.identity.name() != "anonymous";
    if let (Some(l), true) = (&gate.per_user, named) {
        if let Err(wait) = l.check(caller.identity.name()) {
            return too_many(&state, wait, &format!("user {}", caller.identity.name()));
        }
    }
    let health = matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics");
    let admin_only = (health && !gate.metrics_open)
        || path.starts_with("/api/")
        || path == "/ui"
        || path.starts_with("/ui/");
    if admin_only {
        if caller.failed.is_some() || caller.identity.is_anonymous() {
            return unauthorized(
                &state,
                &caller,
                req.method(),
                &path,
                "Basic realm=\"pier\"".into(),
            );
        }
        if !gate.auth.admin(&caller.identity, ip) {
            return refuse(&state, &caller, req.method(), &path, "admin needed");
        }
        count(&state, "allowed");
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// The clock failed logins are counted by: tokio's, so a test may pause it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A password attempt for `user` from `ip`, or 429 while either had too many failures.
fn login_allowed(
    state: &AppState,
    gate: &AuthGate,
    ip: IpAddr,
    user: &str,
    method: &Method,
    what: &str,
) -> Result<(), ApiError> {
    let Err(limited) = gate.logins.check(ip, user, now()) else {
        return Ok(());
    };
    let who = match limited.by {
        LimitedBy::Address => format!("address {ip}"),
        LimitedBy::User => format!("user {user}"),
    };
    let caller = Caller {
        identity: Identity::Anonymous,
        ip,
        basic: None,
        failed: None,
        bearer: false,
    };
    let why = format!("too many failed logins for {who}");
    audit(&caller, method, what, "rate_limited", &why);
    count(state, "rate_limited");
    let secs = retry_secs(limited.wait);
    Err(ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::TooManyRequests,
        format!("{why}; retry in {secs} s"),
    )
    .with_header("retry-after", secs.to_string()))
}

fn retry_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

fn count(state: &AppState, result: &'static str) {
    if state.auth.is_some() {
        state
            .metrics
            .auth_requests
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}

fn audit(caller: &Caller, method: &Method, what: &str, result: &str, why: &str) {
    tracing::info!(
        target: "pier::audit",
        user = caller.identity.name(),
        client = %caller.ip,
        method = %method,
        what,
        result,
        why,
        "audit"
    );
}

fn refuse(state: &AppState, caller: &Caller, method: &Method, what: &str, why: &str) -> Response {
    denied(state, caller, method, what, why).into_response()
}

fn denied(state: &AppState, caller: &Caller, method: &Method, what: &str, why: &str) -> ApiError {
    count(state, "denied");
    audit(caller, method, what, "denied", why);
    ApiError::new(
        StatusCode::FORBIDDEN,
        ErrorCode::Denied,
        format!("{} may not do this: {why}", caller.identity.name()),
    )
}

fn unauthorized(
    state: &AppState,
    caller: &Caller,
    method: &Method,
    what: &str,
    challenge: String,
) -> Response {
    unauthorized_error(state, caller, method, what, challenge).into_response()
}

fn unauthorized_error(
    state: &AppState,
    caller: &Caller,
    method: &Method,
    what: &str,
    challenge: String,
) -> ApiError {
    count(state, "unauthorized");
    let why = caller
        .failed
        .as_deref()
        .unwrap_or("authentication required");
    audit(caller, method, what, "unauthorized", why);
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        ErrorCode::Unauthorized,
        why.to_string(),
    )
    .with_header("www-authenticate", challenge)
}

fn too_many(state: &AppState, wait: Duration, who: &str) -> Response {
    count(state, "rate_limited");
    let secs = retry_secs(wait);
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::TooManyRequests,
        format!("{who} is over its request rate; retry in {secs} s"),
    )
    .with_header("retry-after", secs.to_string())
    .into_response()
}

/// The host the client called, for the token realm and the default service name.
fn host(headers: &HeaderMap, uri: &axum::http::Uri) -> String {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| uri.authority().map(|a| a.to_string()))
        .unwrap_or_else(|| "localhost".into())
}

/// The challenge for a `/v2/` request: Docker's token flow when pier issues tokens, else
/// Basic. `scope` names what the request needs; `error` is RFC 6750's (`invalid_token`,
/// `insufficient_scope`).
fn challenge(gate: &AuthGate, host: &str, scope: Option<&str>, error: Option<&str>) -> String {
    if !gate.auth.token_service() {
        return "Basic realm=\"pier\"".into();
    }
    let scheme = if gate.https { "https" } else { "http" };
    let service = gate.auth.service().unwrap_or(host);
    let mut c = format!("Bearer realm=\"{scheme}://{host}/token\",service=\"{service}\"");
    if let Some(s) = scope {
        c.push_str(&format!(",scope=\"{s}\""));
    }
    if let Some(e) = error {
        c.push_str(&format!(",error=\"{e}\""));
    }
    c
}

/// Remembered positive answers of private upstreams, per (upstream, repository, credentials).
#[derive(Default)]
pub struct PrivateChecks {
    passed: Mutex<HashMap<[u8; 32], Instant>>,
}

impl PrivateChecks {
    async fn check(
        &self,
        target: &MirrorRef,
        user: &str,
        password: &str,
    ) -> Result<bool, pier_upstream::UpstreamError> {
        let key: [u8; 32] = Sha256::new()
            .chain_update(target.upstream_name().as_bytes())
            .chain_update([0])
            .chain_update(target.repo.as_bytes())
            .chain_update([0])
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(password.as_bytes())
            .finalize()
            .into();
        let ttl = target.upstream.private_check_ttl;
        {
            let p = self.passed.lock().unwrap_or_else(|e| e.into_inner());
            if p.get(&key).is_some_and(|at| at.elapsed() < ttl) {
                return Ok(true);
            }
        }
        let ok = target
            .upstream
            .client
            .can_pull(&target.repo, user, password)
            .await?;
        if ok {
            let mut p = self.passed.lock().unwrap_or_else(|e| e.into_inner());
            if p.len() >= MAX_BUCKETS {
                p.retain(|_, at| at.elapsed() < ttl);
            }
            p.insert(key, Instant::now());
        }
        Ok(ok)
    }
}

/// What [`authorize`] needs of a request, taken before it awaits anything.
pub(crate) struct RequestFacts {
    caller: Caller,
    path: String,
    host: String,
}

impl RequestFacts {
    pub(crate) fn of(state: &AppState, req: &Request<Body>) -> RequestFacts {
        RequestFacts {
            caller: match req.extensions().get::<Caller>() {
                Some(c) => c.clone(),
                None => identify(state.auth.as_deref(), req),
            },
            path: req.uri().path().to_string(),
            host: host(req.headers(), req.uri()),
        }
    }
}

/// Decide a `/v2/` request. `target` is the mirrored repository it addresses, if any. A
/// blob mount from a repository the caller may not pull is dropped from `q` (the push then
/// uploads the blob, as the specification allows).
pub(crate) async fn authorize(
    state: &AppState,
    route: &Route,
    method: &Method,
    q: &mut Query,
    target: Option<&MirrorRef>,
    req: RequestFacts,
) -> Result<(), ApiError> {
    let RequestFacts { caller, path, host } = req;
    let action = match (route, method) {
        // An upload session is the pusher's: its status and its cancel need push.
        (Route::Upload { .. }, _) => Actions::PUSH,
        (_, &Method::GET | &Method::HEAD) => Actions::PULL,
        (_, &Method::DELETE) => Actions::DELETE,
        _ => Actions::PUSH,
    };
    let Some(name) = route.name() else {
        // `/v2/` challenges every caller without credentials, as Docker Hub and
        // distribution do: clients (containers/image, containerd, Docker) learn from this
        // one request whether and how to authenticate, and one that got 200 here never
        // sends the credentials it has. Clients without credentials then fetch an anonymous
        // token, or go on without one. `/v2/_catalog` is open to anonymous callers when
        // some rule grants them anything (and lists what they may pull).
        let Some(gate) = state.auth.as_deref() else {
            return Ok(());
        };
        let anonymous_refused = match route {
            Route::Base => true,
            _ => !gate.auth.anonymous_has_grants(),
        };
        if caller.failed.is_some() || (caller.identity.is_anonymous() && anonymous_refused) {
            let error = caller
                .failed
                .as_ref()
                .map(|_| "invalid_token")
                .filter(|_| caller.bearer);
            let c = challenge(gate, &host, None, error);
            return Err(unauthorized_error(state, &caller, method, &path, c));
        }
        count(state, "allowed");
        return Ok(());
    };
    let repo = target.map_or(name.as_str(), |t| t.cache_repo.as_str());
    if let Some(t) = target.filter(|t| t.upstream.private && action == Actions::PULL) {
        return private(state, &caller, method, repo, t).await;
    }
    let Some(gate) = state.auth.as_deref() else {
        return Ok(());
    };
    let has = granted(gate, &caller, repo, name.as_str());
    let scope_actions = if action == Actions::PUSH {
        "pull,push".to_string()
    } else {
        action.names().join(",")
    };
    let scope = format!("repository:{name}:{scope_actions}");
    if caller.failed.is_some() {
        let error = caller.bearer.then_some("invalid_token");
        let c = challenge(gate, &host, Some(&scope), error);
        return Err(unauthorized_error(state, &caller, method, repo, c));
    }
    if !has.contains(action) {
        return Err(match &caller.identity {
            Identity::User { .. } => denied(
                state,
                &caller,
                method,
                repo,
                &format!("no {} grant", action.names().join(",")),
            ),
            // Anonymous callers and tokens without the scope get a challenge: a client then
            // asks for a token with the scope (and is given what the rules allow).
            Identity::Anonymous | Identity::Token { .. } => {
                let error = (!caller.identity.is_anonymous()).then_some("insufficient_scope");
                let c = challenge(gate, &host, Some(&scope), error);
                unauthorized_error(state, &caller, method, repo, c)
            }
        });
    }
    count(state, "allowed");
    if action != Actions::PULL {
        audit(&caller, method, repo, "allowed", "granted");
    }
    if let (Route::UploadStart { .. }, Some(from)) = (route, q.get("from").map(str::to_string)) {
        // A `from` that is not a name mounts nothing anyway.
        let permitted = match from.parse::<pier_oci::RepoName>() {
            Err(_) => true,
            Ok(f) => {
                let from_repo = match state.mirror.as_ref().map(|m| m.route(&f, None)) {
                    Some(Ok(Some(r))) => r.cache_repo,
                    _ => from.clone(),
                };
                granted(gate, &caller, &from_repo, &from).contains(Actions::PULL)
            }
        };
        if !permitted {
            q.remove("mount");
            q.remove("from");
        }
    }
    Ok(())
}

/// Rules see the repository as it is stored (`repo`); a token names it as the client
/// addressed it when asking for the token.
fn granted(gate: &AuthGate, caller: &Caller, repo: &str, addressed: &str) -> Actions {
    match &caller.identity {
        Identity::Token { .. } => gate
            .auth
            .granted(&caller.identity, addressed, caller.ip)
            .union(gate.auth.granted(&caller.identity, repo, caller.ip)),
        other => gate.auth.granted(other, repo, caller.ip),
    }
}

/// A read of a private upstream's image: rules naming the caller's user or group, or the
/// caller's own credentials accepted by the upstream for the repository.
async fn private(
    state: &AppState,
    caller: &Caller,
    method: &Method,
    repo: &str,
    target: &MirrorRef,
) -> Result<(), ApiError> {
    if let Some(gate) = state.auth.as_deref() {
        if caller.failed.is_none()
            && gate
                .auth
                .granted_by_name(&caller.identity, repo, caller.ip)
                .contains(Actions::PULL)
        {
            count(state, "allowed");
            return Ok(());
        }
    }
    let Some((user, password)) = &caller.basic else {
        return Err(unauthorized_error(
            state,
            caller,
            method,
            repo,
            format!("Basic realm=\"{}\"", target.upstream_name()),
        ));
    };
    match state.private.check(target, user, password).await {
        Ok(true) => {
            count(state, "allowed");
            Ok(())
        }
        Ok(false) => Err(denied(
            state,
            caller,
            method,
            repo,
            &format!(
                "{} does not let {user} pull {}",
                target.upstream_name(),
                target.repo
            ),
        )),
        // The upstream could not be asked: refuse (a private image is never served on
        // trust), blaming the upstream.
        Err(e) => Err(ApiError::from_mirror(MirrorError::Upstream(e))),
    }
}

/// Whether the caller may see a repository in the catalog.
pub(crate) type Visible = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// A filter for the catalog: the repositories the caller may pull (`None`: all). A private
/// upstream's cached repositories are listed only to users a rule names for them: nobody's
/// upstream credentials are checked for a whole catalog.
pub(crate) fn catalog_filter(state: &AppState, req: &Request<Body>) -> Option<Visible> {
    let private: Vec<String> = state
        .mirror
        .as_ref()
        .map(|m| {
            m.upstreams()
                .iter()
                .filter(|u| u.private)
                .map(|u| format!("{}/", u.name()))
                .collect()
        })
        .unwrap_or_default();
    let is_private = move |repo: &str| private.iter().any(|p| repo.starts_with(p.as_str()));
    let Some(gate) = state.auth.clone() else {
        return Some(Box::new(move |repo: &str| !is_private(repo)));
    };
    let caller = req
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(|| identify(Some(&gate), req));
    Some(Box::new(move |repo: &str| {
        if is_private(repo) {
            caller.failed.is_none()
                && gate
                    .auth
                    .granted_by_name(&caller.identity, repo, caller.ip)
                    .contains(Actions::PULL)
        } else {
            granted(&gate, &caller, repo, repo).contains(Actions::PULL)
        }
    }))
}

/// `GET /token` (Docker's token authentication) and `POST /token` (its OAuth2 password
/// grant): the caller's credentials (or none) in, a signed token out carrying, of each
/// requested scope, what the rules permit.
pub async fn token(State(state): State<AppState>, req: Request<Body>) -> Response {
    match issue(&state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn issue(state: &AppState, req: Request<Body>) -> Result<Response, ApiError> {
    let not_here = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "pier issues no tokens here (the token service is off)",
        )
    };
    let gate = state.auth.clone().ok_or_else(not_here)?;
    if !gate.auth.token_service() {
        return Err(not_here());
    }
    let ip = gate.client_ip(&req);
    let host = host(req.headers(), req.uri());
    let basic = match credentials(req.headers()) {
        Some(Credentials::Basic(u, p)) => Some((u, p)),
        _ => None,
    };
    let post = req.method() == Method::POST;
    let mut params: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    if post {
        let body = axum::body::to_bytes(req.into_body(), 64 * 1024)
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::Unsupported,
                    format!("token request body: {e}"),
                )
            })?;
        params.extend(form_urlencoded::parse(&body).into_owned());
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let creds = if post {
        match get("grant_type").as_deref() {
            Some("password") => match (get("username"), get("password")) {
                (Some(u), Some(p)) => Some((u, p)),
                _ => None,
            },
            Some(other) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::Unsupported,
                    format!("grant_type {other:?} is not supported; use password"),
                ))
            }
            None => basic,
        }
    } else {
        basic
    };
    let who = match &creds {
        None => Identity::Anonymous,
        Some((u, p)) => match login_allowed(state, &gate, ip, u, &Method::GET, "/token")
            .map(|()| gate.auth.basic(u, p))?
        {
            Ok(id) => id,
            Err(e) => {
                gate.logins.failed(ip, u, now());
                let caller = Caller {
                    identity: Identity::Anonymous,
                    ip,
                    basic: None,
                    failed: Some(e.to_string()),
                    bearer: false,
                };
                return Err(unauthorized_error(
                    state,
                    &caller,
                    &Method::GET,
                    "/token",
                    "Basic realm=\"pier\"".into(),
                ));
            }
        },
    };
    if let (Some(l), false) = (&gate.per_user, who.is_anonymous()) {
        if let Err(wait) = l.check(who.name()) {
            return Ok(too_many(state, wait, &format!("user {}", who.name())));
        }
    }
    let scopes: Vec<Scope> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter_map(|s| Scope::parse(&s))
        .collect();
    let service = gate
        .auth
        .service()
        .map(str::to_string)
        .or_else(|| get("service"))
        .unwrap_or(host);
    let mirror = state.mirror.clone();
    let rules_name = |name: &str| -> String {
        let Ok(parsed) = name.parse::<pier_oci::RepoName>() else {
            return name.to_string();
        };
        match mirror.as_ref().map(|m| m.route(&parsed, None)) {
            Some(Ok(Some(r))) => r.cache_repo,
            _ => name.to_string(),
        }
    };
    let issued = gate
        .auth
        .issue(&who, &service, &scopes, ip, rules_name)
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                e.to_string(),
            )
        })?;
    count(state, "allowed");
    tracing::debug!(user = who.name(), client = %ip, scopes = scopes.len(), granted = issued.access.len(), "token issued");
    let body = serde_json::json!({
        "token": issued.token,
        "access_token": issued.token,
        "expires_in": issued.expires_in,
        "issued_at": crate::status::rfc3339(issued.issued_at),
    });
    Ok((StatusCode::OK, axum::Json(body)).into_response())
}
