//! The peer listener's HTTP API (`/peer/v1/…`, see `pier_peer::client` for the paths). Served
//! only on the peer listener, never on the main one, and only to requests signed with the
//! cluster secret.
//!
//! Architecture invariant: an answer here never causes a request to another peer. Blobs come
//! from the store, from a fill in progress that reads an upstream, or from a new fill that
//! reads this node's upstream; manifests from the store or this node's mirror without its
//! owners. Pull requests are the exception by design: they name the node to fetch from. So
//! are swarm reports that make this node a coordinator that lacks the blob: a takeover fill
//! takes pieces from the members, a hosted fill reads a peer that stores the blob; either asks
//! only for stored bytes or pieces, which cause no request in turn.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pier_cluster::ClusterSecret;
use pier_mirror::{BlobSource, MirrorError, MirrorRef, SwarmFor};
use pier_oci::{Digest, ErrorCode, Reference, RepoName};
use pier_peer::client::{HOLDING_HEADER, SIZE_HEADER};
use pier_peer::rate::{limited, RateLimit};
use pier_peer::{PullRequest, SwarmReport, PIECE_HEADER};
use pier_store::ByteStream;

use crate::error::ApiError;
use crate::respond::{
    blob_headers, blob_range, file_response, hv, manifest_response, served_counters,
    stream_response, Query,
};
use crate::zerocopy::{FileBody, ZeroCopy};
use crate::AppState;

type Result<T> = std::result::Result<T, ApiError>;

/// What the peer API needs.
#[derive(Clone)]
pub struct PeerState {
    pub app: AppState,
    pub secret: ClusterSecret,
    /// The cap on bytes per second this node sends to peers, all requests together.
    pub upload_limit: Option<Arc<RateLimit>>,
    /// Fault injection for tests: flip a byte of every piece this node serves to a swarm, as a
    /// broken or malicious peer would (`PIER_FAULT_CORRUPT_PIECES=1`).
    pub corrupt_pieces: bool,
    /// Swarm pieces this node sends at once ([`piece_uploads`]); a piece request past them is
    /// answered "not here" and the fetcher asks another holder.
    pub piece_uploads: Arc<tokio::sync::Semaphore>,
}

/// The bound on swarm pieces a node sends at once (`pier_mirror::SWARM_UPLOADS`).
pub fn piece_uploads() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(pier_mirror::SWARM_UPLOADS))
}

/// A response body that holds a piece upload's permit until it is sent (or dropped).
struct Holding {
    body: Body,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl http_body::Body for Holding {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<http_body::Frame<Self::Data>, Self::Error>>>
    {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The node that signed a peer request.
#[derive(Clone)]
struct Signer(String);

/// The peer application.
pub fn router(state: PeerState) -> Router {
    Router::new()
        .route("/peer/v1/blobs/{digest}", get(blob).head(blob))
        .route("/peer/v1/manifests/{reference}", get(manifest))
        .route("/peer/v1/pull", post(pull))
        .route("/peer/v1/swarm/{digest}", post(swarm))
        .route("/peer/v1/health", get(health))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "no such peer path",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

/// Refuse every request that is not signed with the cluster secret.
async fn authenticate(State(state): State<PeerState>, req: Request<Body>, next: Next) -> Response {
    let header = req
        .headers()
        .get(pier_cluster::secret::AUTH_HEADER)
        .and_then(|v| v.to_str().ok());
    let path = req
        .uri()
        .path_and_query()
        .map_or(req.uri().path(), |p| p.as_str());
    match state.secret.verify(header, req.method().as_str(), path) {
        Ok(node) => {
            let span = tracing::debug_span!("peer", from = %node, method = %req.method());
            let mut req = req;
            req.extensions_mut().insert(Signer(node));
            tracing::Instrument::instrument(next.run(req), span).await
        }
        Err(e) => {
            state.app.metrics.peer_rejected.inc();
            let from = req
                .extensions()
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.to_string())
                .unwrap_or_default();
            tracing::warn!(%from, path, error = %e, "peer request refused");
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                format!("peer request refused: {e}"),
            )
            .into_response()
        }
    }
}

/// `GET /peer/v1/health`: this node answers, with its clock (unix milliseconds), so that
/// `pier check` on another node can tell the skew between them.
async fn health() -> Json<serde_json::Value> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Json(serde_json::json!({ "time_ms": now }))
}

fn mirror_of(state: &PeerState) -> Result<&Arc<pier_mirror::Mirror>> {
    state.app.mirror.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "this node has no mirror",
        )
    })
}

fn parse_repo(repo: &str) -> Result<RepoName> {
    repo.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::NameInvalid,
            format!("invalid repository {repo:?}"),
        )
    })
}

/// The mirrored repository a peer names by upstream and cache repository.
fn mirror_ref(state: &PeerState, upstream: &str, repo: &str) -> Result<MirrorRef> {
    let mirror = mirror_of(state)?;
    let name = parse_repo(repo)?;
    match mirror.route(&name, Some(upstream)) {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NameUnknown,
            format!("this node does not mirror {upstream}"),
        )),
        Err(e) => Err(ApiError::from_mirror(e)),
    }
}

fn digest_of(s: &str) -> Result<Digest> {
    s.parse()
        .map_err(|_| ApiError::digest_invalid(format!("invalid digest {s:?}")))
}

async fn blob(
    State(state): State<PeerState>,
    Path(digest): Path<String>,
    req: Request<Body>,
) -> Result<Response> {
    let digest = digest_of(&digest)?;
    let q = Query::of(&req);
    let head = req.method() == Method::HEAD;
    let signer = req
        .extensions()
        .get::<Signer>()
        .map(|s| s.0.clone())
        .unwrap_or_default();
    let app = &state.app;
    let registry = &app.registry;
    if req.headers().contains_key(PIECE_HEADER) {
        return piece(&state, &digest, req.headers(), zero_copy(&req)).await;
    }
    // In the store: serve it (linked to the named repository, when one is named without an
    // upstream: hosted content is shared only within its repository).
    if let Some(size) = registry.blob_store().stat(&digest).await? {
        let linked = match (q.get("repo"), q.get("upstream")) {
            (Some(repo), None) => registry
                .meta_store()
                .blob_link(repo, &digest)
                .await?
                .is_some(),
            _ => true,
        };
        if linked {
            return stored_response(&state, &digest, size, req.headers(), zero_copy(&req), head)
                .await;
        }
    }
    let mirror = mirror_of(&state)?;
    // Being fetched from an upstream here: readers share it. A fill that reads from a peer is
    // not offered, so two nodes never read a blob from each other.
    if let Some(fill) = mirror
        .fill_in_progress(&digest)
        .filter(|f| f.from_upstream())
    {
        if let Ok(size) = fill.started().await {
            return fill_response(&state, &digest, fill, size, req.headers(), head, "filling");
        }
    }
    if head || q.get("fill") != Some("1") {
        return Err(not_here(&digest));
    }
    let (Some(upstream), Some(repo)) = (q.get("upstream"), q.get("repo")) else {
        return Err(not_here(&digest));
    };
    let r = mirror_ref(&state, upstream, repo)?;
    match mirror
        .blob_for_peer(&r, &digest)
        .await
        .map_err(|e| ApiError::from_mirror(e).not_found_as(ErrorCode::BlobUnknown))?
    {
        BlobSource::Local { size } => {
            stored_response(&state, &digest, size, req.headers(), zero_copy(&req), false).await
        }
        // Two nodes that disagree for a moment about who owns the blob could each be asked to
        // fill it by the other: never hand a node its own bytes back.
        BlobSource::Filling { fill, .. } if fill.reads_from(&signer) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            format!("this node is reading {digest} from {signer}; ask another source"),
        )),
        BlobSource::Filling { fill, size } => {
            fill_response(&state, &digest, fill, size, req.headers(), false, "filling")
        }
    }
}

/// Bytes this node sends a peer: counted, and held to the upload cap.
fn to_peer(state: &PeerState, stream: ByteStream) -> ByteStream {
    let sent = state.app.metrics.peer_sent_bytes.clone();
    let stream = futures::StreamExt::inspect(stream, move |c| {
        if let Ok(c) = c {
            sent.inc_by(c.len() as u64);
        }
    });
    limited(stream, state.upload_limit.clone())
}

fn zero_copy(req: &Request<Body>) -> Option<ZeroCopy> {
    req.extensions().get::<ZeroCopy>().cloned()
}

/// A blob answered from this node's store.
async fn stored_response(
    state: &PeerState,
    digest: &Digest,
    size: u64,
    headers: &HeaderMap,
    zero_copy: Option<ZeroCopy>,
    head: bool,
) -> Result<Response> {
    let app = &state.app;
    let range = blob_range(headers, size)?;
    let (builder, start, end) = blob_headers(digest, size, range);
    let builder = builder
        .header(HOLDING_HEADER, "local")
        .header(SIZE_HEADER, size);
    if head || start == end {
        return Ok(builder.body(Body::empty()).unwrap_or_default());
    }
    // The upload cap paces a stream chunk by chunk; uncapped, the kernel sends from the file.
    let builder = match state.upload_limit {
        Some(_) => builder,
        None => {
            let mut counters = served_counters(app, "local");
            counters.push(app.metrics.peer_sent_bytes.clone());
            match file_response(
                app,
                zero_copy.as_ref(),
                builder,
                digest,
                start,
                end,
                counters,
            )
            .await?
            {
                Ok(resp) => return Ok(resp),
                Err(builder) => builder,
            }
        }
    };
    let stream = app.registry.read_blob(digest, start, end).await?;
    Ok(stream_response(
        app,
        builder,
        to_peer(state, stream),
        "local",
    ))
}

/// Pieces of a blob for a swarm member: from the store, or from this node's fill once every
/// piece the range touches has landed (in whatever order the fill takes them), else 404.
async fn piece(
    state: &PeerState,
    digest: &Digest,
    headers: &HeaderMap,
    zero_copy: Option<ZeroCopy>,
) -> Result<Response> {
    let app = &state.app;
    let stored = app.registry.blob_store().stat(digest).await?;
    let fill = match stored {
        Some(_) => None,
        None => Some(
            mirror_of(state)?
                .fill_in_progress(digest)
                .filter(|f| f.pieces().is_some())
                .ok_or_else(|| not_here(digest))?,
        ),
    };
    let size = match (stored, fill.as_ref().and_then(|f| f.pieces())) {
        (Some(size), _) => size,
        (None, Some(p)) => p.size(),
        (None, None) => return Err(not_here(digest)),
    };
    let Some(range) = blob_range(headers, size)? else {
        return Err(ApiError::range(size, "a piece request needs a Range"));
    };
    let (start, end) = (range.start, range.end);
    // Only pieces this node holds: the asker was told it holds them, and a piece not here
    // yet is better fetched from someone else than waited for.
    if let Some(fill) = &fill {
        if !fill.pieces().is_some_and(|p| p.covers(start, end)) {
            return Err(not_here(digest));
        }
    }
    // A holder sending to everyone at once sends to each at a sliver of its link: past the
    // bound, the asker is better off taking the piece from another holder.
    let Ok(permit) = state.piece_uploads.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::BlobUnknown,
            format!("this node is sending as many pieces as it will at once; ask another holder of {digest}"),
        )
        .with_header(pier_peer::BUSY_HEADER, "1".to_string()));
    };
    let resp = piece_response(state, digest, fill, size, range, zero_copy).await?;
    Ok(resp.map(|body| {
        Body::new(Holding {
            body,
            _permit: permit,
        })
    }))
}

/// The response for bytes `range` of `digest`, a piece range this node holds.
async fn piece_response(
    state: &PeerState,
    digest: &Digest,
    fill: Option<Arc<pier_mirror::fill::Fill>>,
    size: u64,
    range: crate::ranges::ByteRange,
    zero_copy: Option<ZeroCopy>,
) -> Result<Response> {
    let app = &state.app;
    let (start, end) = (range.start, range.end);
    let (builder, _, _) = blob_headers(digest, size, Some(range));
    let builder = builder
        .header(HOLDING_HEADER, "piece")
        .header(SIZE_HEADER, size);
    // Uncapped and unfaulted, on a plain connection, the kernel sends the piece from the
    // blob's file or the fill's spool (written pieces only, so never bytes that are not
    // there yet); otherwise it goes through memory.
    let builder = match zero_copy.filter(|_| state.upload_limit.is_none() && !state.corrupt_pieces)
    {
        None => builder,
        Some(zc) => {
            let mut counters = served_counters(app, "local");
            counters.push(app.metrics.peer_sent_bytes.clone());
            match &fill {
                None => {
                    match file_response(app, Some(&zc), builder, digest, start, end, counters)
                        .await?
                    {
                        Ok(resp) => return Ok(resp),
                        Err(builder) => builder,
                    }
                }
                Some(f) => match f.piece_file(start, end) {
                    Some(file) => {
                        let body = FileBody::new(file, start, end, zc, counters, Box::new(()));
                        return Ok(builder.body(Body::new(body)).unwrap_or_default());
                    }
                    None => builder,
                },
            }
        }
    };
    let stream = match fill {
        None => app.registry.read_blob(digest, start, end).await?,
        Some(fill) => fill.read_pieces(start, end),
    };
    let stream = if state.corrupt_pieces {
        corrupt(stream)
    } else {
        stream
    };
    Ok(stream_response(
        app,
        builder,
        to_peer(state, stream),
        "local",
    ))
}

/// Flip the first byte of a stream (the fault hook of [`PeerState::corrupt_pieces`]).
fn corrupt(stream: ByteStream) -> ByteStream {
    let mut first = true;
    Box::pin(futures::StreamExt::map(stream, move |c| {
        c.map(|b| {
            if first && !b.is_empty() {
                first = false;
                let mut v = b.to_vec();
                v[0] ^= 0xff;
                bytes::Bytes::from(v)
            } else {
                b
            }
        })
    }))
}

/// A swarm member's report to this node as the blob's coordinator.
async fn swarm(
    State(state): State<PeerState>,
    Path(digest): Path<String>,
    axum::Extension(signer): axum::Extension<Signer>,
    Json(report): Json<SwarmReport>,
) -> Result<Response> {
    let digest = digest_of(&digest)?;
    let mirror = mirror_of(&state)?.clone();
    // Mirrored content names its upstream; hosted content only its repository, whose link to
    // the blob here is the permission to its pieces.
    let want = match (report.upstream.as_deref(), report.repo.as_deref()) {
        (Some(up), Some(repo)) => Some(SwarmFor::Mirrored(mirror_ref(&state, up, repo)?)),
        (None, Some(repo)) => {
            parse_repo(repo)?;
            Some(SwarmFor::Hosted {
                repo: repo.to_string(),
                holders: Vec::new(),
            })
        }
        _ => None,
    };
    let answer = mirror
        .swarm_answer(&digest, &signer.0, &report, want.as_ref())
        .await
        .map_err(|e| ApiError::from_mirror(e).not_found_as(ErrorCode::BlobUnknown))?;
    Ok(Json(answer).into_response())
}

fn not_here(digest: &Digest) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::BlobUnknown,
        format!("this node does not hold {digest}"),
    )
}

/// A blob answered from a fill in progress on this node.
fn fill_response(
    state: &PeerState,
    digest: &Digest,
    fill: Arc<pier_mirror::fill::Fill>,
    size: Option<u64>,
    headers: &HeaderMap,
    head: bool,
    holding: &'static str,
) -> Result<Response> {
    let app = &state.app;
    let source = fill.origin();
    match size {
        Some(size) => {
            let range = blob_range(headers, size)?;
            let (builder, start, end) = blob_headers(digest, size, range);
            let builder = builder
                .header(HOLDING_HEADER, holding)
                .header(SIZE_HEADER, size);
            if head || start == end {
                return Ok(builder.body(Body::empty()).unwrap_or_default());
            }
            Ok(stream_response(
                app,
                builder,
                to_peer(state, fill.read(start, Some(end))),
                source,
            ))
        }
        None => {
            // No length known: the whole blob, chunked. A ranged resume needs a length.
            if headers.contains_key(header::RANGE) {
                return Err(ApiError::range(0, "the blob's size is not known yet"));
            }
            let builder = Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(HOLDING_HEADER, holding)
                .header("docker-content-digest", hv(&digest.to_string()));
            if head {
                return Ok(builder.body(Body::empty()).unwrap_or_default());
            }
            Ok(stream_response(
                app,
                builder,
                to_peer(state, fill.read(0, None)),
                source,
            ))
        }
    }
}

async fn manifest(
    State(state): State<PeerState>,
    Path(reference): Path<String>,
    req: Request<Body>,
) -> Result<Response> {
    let q = Query::of(&req);
    let repo = q.get("repo").ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::NameInvalid,
            "repo is required",
        )
    })?;
    let reference: Reference = reference.parse().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::ManifestUnknown,
            format!("invalid reference {reference:?}"),
        )
    })?;
    if let Some(upstream) = q.get("upstream") {
        let r = mirror_ref(&state, upstream, repo)?;
        let (record, bytes, freshness) = mirror_of(&state)?
            .manifest_for_peer(&r, &reference)
            .await
            .map_err(|e| ApiError::from_mirror(e).not_found_as(ErrorCode::ManifestUnknown))?;
        let mut resp = manifest_response(&state.app, &record, bytes, false, "local");
        let label = match freshness {
            pier_mirror::Freshness::Hit | pier_mirror::Freshness::Peer => "hit",
            pier_mirror::Freshness::Miss => "miss",
            pier_mirror::Freshness::Stale => "stale",
        };
        resp.headers_mut().insert("x-pier-cache", hv(label));
        return Ok(resp);
    }
    let name = parse_repo(repo)?;
    let (record, bytes) = state.app.registry.manifest(&name, &reference).await?;
    Ok(manifest_response(
        &state.app, &record, bytes, false, "local",
    ))
}

/// Hold a blob or manifest durably, fetched from the named node (or any holder).
async fn pull(State(state): State<PeerState>, Json(pull): Json<PullRequest>) -> Result<Response> {
    let mirror = mirror_of(&state)?.clone();
    let cluster = mirror.cluster().cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "this node is in no cluster",
        )
    })?;
    parse_repo(&pull.repo)?;
    let digest = digest_of(&pull.digest)?;
    let from = pull.from.as_deref().and_then(|n| cluster.member(n));
    match pull.kind.as_str() {
        "blob" => {
            let source = match pull.upstream.as_deref() {
                // Mirrored content may also come from the upstream when no peer has it.
                Some(up) if from.is_none() => {
                    let r = mirror_ref(&state, up, &pull.repo)?;
                    mirror.blob_for_peer(&r, &digest).await
                }
                _ => mirror.hosted_blob(&pull.repo, &digest, from).await,
            }
            .map_err(|e| ApiError::from_mirror(e).not_found_as(ErrorCode::BlobUnknown))?;
            if let BlobSource::Filling { fill, .. } = source {
                fill.finished().await.map_err(|e| {
                    ApiError::from_mirror(MirrorError::Fill(e)).not_found_as(ErrorCode::BlobUnknown)
                })?;
            }
            Ok(StatusCode::OK.into_response())
        }
        "manifest" => {
            let meta = state.app.registry.meta_store();
            let have = meta.manifest(&pull.repo, &digest).await?.is_some();
            if !have {
                let mut answer = None;
                let mut asked = Vec::new();
                if let Some(from) = &from {
                    asked.push(from.clone());
                }
                asked.extend(cluster.candidates(digest.to_string().as_bytes()));
                for node in asked {
                    match cluster
                        .client()
                        .get_manifest(&node, &pull.repo, &digest.to_string(), None)
                        .await
                    {
                        Ok(Some(a)) if Digest::compute(digest.algorithm(), &a.bytes) == digest => {
                            answer = Some(a);
                            break;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(node = %node.name, error = %e, "manifest source failed")
                        }
                    }
                }
                let Some(a) = answer else {
                    return Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        ErrorCode::ManifestUnknown,
                        format!("no peer has {} in {}", digest, pull.repo),
                    ));
                };
                mirror
                    .store_manifest(
                        &pull.repo,
                        digest.clone(),
                        a.bytes,
                        &a.media_type,
                        pull.tag.as_deref(),
                    )
                    .await
                    .map_err(ApiError::from_mirror)?;
            } else if let Some(tag) = pull.tag.as_deref() {
                let (record, bytes) = match (
                    meta.manifest(&pull.repo, &digest).await?,
                    meta.manifest_bytes(&digest).await?,
                ) {
                    (Some(r), Some(b)) => (r, b),
                    _ => {
                        return Err(ApiError::new(
                            StatusCode::NOT_FOUND,
                            ErrorCode::ManifestUnknown,
                            "manifest vanished",
                        ))
                    }
                };
                meta.put_manifest(&pull.repo, &record, bytes, Some(tag))
                    .await?;
            }
            Ok(StatusCode::OK.into_response())
        }
        other => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::Unsupported,
            format!("unknown pull kind {other:?}"),
        )),
    }
}
