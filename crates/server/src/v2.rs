//! Handlers for every `/v2/` route. The path was parsed once into a [`Route`]; here the method
//! picks the operation, headers and query are read, and the registry does the work.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use pier_oci::{media, Digest, Reference, RepoName, Route};
use pier_registry::upload::ChunkInfo;
use pier_registry::RegistryError;
use pier_store::ByteStream;

use crate::error::ApiError;
use crate::metrics::{KindLabels, ServedLabels};
use crate::ranges::{parse_content_range, parse_range, RangeError};
use crate::zerocopy::{FileBody, ZeroCopy};
use crate::AppState;

type Result<T> = std::result::Result<T, ApiError>;

/// Largest page of tags or repositories returned when the client gives no `n`.
const DEFAULT_PAGE: usize = 10_000;

/// Decoded query parameters.
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub(crate) fn empty() -> Query {
        Query(Vec::new())
    }

    pub(crate) fn of(req: &Request<Body>) -> Query {
        let q = req.uri().query().unwrap_or("");
        Query(form_urlencoded::parse(q.as_bytes()).into_owned().collect())
    }

    /// The query re-encoded without `ns` (to pass on to an upstream).
    pub(crate) fn without_ns(&self) -> String {
        let mut out = form_urlencoded::Serializer::new(String::new());
        for (k, v) in self.0.iter().filter(|(k, _)| k != "ns") {
            out.append_pair(k, v);
        }
        out.finish()
    }

    /// Every value given for `key`, in order.
    pub(crate) fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub(crate) fn remove(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

pub async fn dispatch(state: AppState, route: Route, req: Request<Body>) -> Result<Response> {
    let method = req.method().clone();
    let mut q = Query::of(&req);
    let target = crate::mirror::target(&state, &route, &method, &q).await?;
    let facts = crate::auth::RequestFacts::of(&state, &req);
    crate::auth::authorize(&state, &route, &method, &mut q, target.as_ref(), facts).await?;
    if let Some(target) = target {
        return crate::mirror::dispatch(&state, target, route, req, &q).await;
    }
    match (route, &method) {
        (Route::Base, &Method::GET | &Method::HEAD) => Ok(json(StatusCode::OK, "{}".into())),
        (Route::Catalog, &Method::GET) => {
            catalog(&state, &q, crate::auth::catalog_filter(&state, &req)).await
        }
        (Route::Tags { name }, &Method::GET) => tags(&state, &name, &q).await,
        (Route::Manifest { name, reference }, &Method::GET | &Method::HEAD) => {
            get_manifest(&state, &name, &reference, method == Method::HEAD).await
        }
        (Route::Manifest { name, reference }, &Method::PUT) => {
            put_manifest(&state, &name, &reference, req).await
        }
        (Route::Manifest { name, reference }, &Method::DELETE) => {
            state.registry.delete_manifest(&name, &reference).await?;
            if let Reference::Digest(digest) = &reference {
                crate::events::deleted(&state, name.as_str(), digest).await;
            }
            Ok(StatusCode::ACCEPTED.into_response())
        }
        (Route::Blob { name, digest }, &Method::GET | &Method::HEAD) => {
            get_blob(
                &state,
                &name,
                &digest,
                req.headers(),
                req.extensions().get::<ZeroCopy>(),
                method == Method::HEAD,
            )
            .await
        }
        (Route::Blob { name, digest }, &Method::DELETE) => {
            state.registry.delete_blob(&name, &digest).await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        (Route::UploadStart { name }, &Method::POST) => start_upload(&state, &name, &q, req).await,
        (Route::Upload { name, id }, &Method::GET | &Method::HEAD) => {
            let rec = state.registry.uploads().status(&name, &id).await?;
            Ok(upload_response(
                StatusCode::NO_CONTENT,
                &name,
                &id,
                rec.offset,
            ))
        }
        (Route::Upload { name, id }, &Method::PATCH) => patch_upload(&state, &name, &id, req).await,
        (Route::Upload { name, id }, &Method::PUT) => put_upload(&state, &name, &id, &q, req).await,
        (Route::Upload { name, id }, &Method::DELETE) => {
            state.registry.uploads().cancel(&name, &id).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (Route::Referrers { name, digest }, &Method::GET) => {
            referrers(&state, &name, &digest, &q).await
        }
        _ => Err(ApiError::unsupported_method()),
    }
}

pub(crate) fn json(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

pub(crate) fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `n` and `last` of a paginated listing.
fn pagination(q: &Query) -> Result<(usize, Option<String>)> {
    let n = match q.get("n") {
        None | Some("") => DEFAULT_PAGE,
        Some(s) => s
            .parse::<usize>()
            .map_err(|_| ApiError::pagination(format!("n={s:?} is not a count")))?
            .min(DEFAULT_PAGE),
    };
    Ok((n, q.get("last").filter(|l| !l.is_empty()).map(String::from)))
}

fn link_next(path: &str, n: usize, last: &str) -> HeaderValue {
    let q: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("n", &n.to_string())
        .append_pair("last", last)
        .finish();
    hv(&format!("<{path}?{q}>; rel=\"next\""))
}

/// The catalog; with auth on, only what the caller may pull (`visible`). A page is filtered
/// after it is read, so it may hold fewer than `n` names while `Link` says there are more.
async fn catalog(
    state: &AppState,
    q: &Query,
    visible: Option<crate::auth::Visible>,
) -> Result<Response> {
    let (n, last) = pagination(q)?;
    let mut page = state.registry.catalog(last.as_deref(), n).await?;
    let last_seen = page.items.last().cloned();
    if let Some(visible) = &visible {
        page.items.retain(|r| visible(r));
    }
    let body = serde_json::json!({ "repositories": page.items }).to_string();
    let mut resp = json(StatusCode::OK, body);
    if let (true, Some(l)) = (page.more, last_seen) {
        resp.headers_mut()
            .insert(header::LINK, link_next("/v2/_catalog", n, &l));
    }
    Ok(resp)
}

async fn tags(state: &AppState, name: &RepoName, q: &Query) -> Result<Response> {
    let (n, last) = pagination(q)?;
    let page = state.registry.tags(name, last.as_deref(), n).await?;
    let body = serde_json::json!({ "name": name.as_str(), "tags": page.items }).to_string();
    let mut resp = json(StatusCode::OK, body);
    if let (true, Some(l)) = (page.more, page.items.last()) {
        let path = format!("/v2/{name}/tags/list");
        resp.headers_mut()
            .insert(header::LINK, link_next(&path, n, l));
    }
    Ok(resp)
}

async fn get_manifest(
    state: &AppState,
    name: &RepoName,
    reference: &Reference,
    head: bool,
) -> Result<Response> {
    match state.registry.manifest(name, reference).await {
        Ok((record, bytes)) => Ok(manifest_response(state, &record, bytes, head, "local")),
        // Pushed to another node of the cluster, perhaps.
        Err(e @ (RegistryError::ManifestUnknown | RegistryError::NameUnknown)) => {
            match crate::cluster::hosted_manifest(state, name, reference, head).await? {
                Some(resp) => Ok(resp),
                None => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// A manifest's exact bytes with its media type and digest. `source` labels the bytes served.
pub(crate) fn manifest_response(
    state: &AppState,
    record: &pier_store::ManifestRecord,
    bytes: Bytes,
    head: bool,
    source: &'static str,
) -> Response {
    let digest = record.digest.to_string();
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, hv(&record.media_type))
        .header(header::CONTENT_LENGTH, bytes.len())
        .header("docker-content-digest", hv(&digest))
        .header(header::ETAG, hv(&format!("\"{digest}\"")));
    if head {
        // Content-Length is already set above; a second copy would be a duplicate header.
        return resp.body(Body::empty()).unwrap_or_default();
    }
    state
        .metrics
        .served_bytes
        .get_or_create(&ServedLabels {
            kind: "manifest",
            source,
        })
        .inc_by(bytes.len() as u64);
    resp.body(Body::from(bytes)).unwrap_or_default()
}

async fn put_manifest(
    state: &AppState,
    name: &RepoName,
    reference: &Reference,
    req: Request<Body>,
) -> Result<Response> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let limit = state.registry.limits().max_manifest_bytes;
    let bytes: Bytes = axum::body::to_bytes(req.into_body(), limit as usize)
        .await
        .map_err(|e| {
            if std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            {
                ApiError::from(pier_registry::RegistryError::TooLarge { limit })
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    pier_oci::ErrorCode::ManifestInvalid,
                    format!("reading the manifest failed: {e}"),
                )
            }
        })?;
    let size = bytes.len() as u64;
    // In a cluster, a client may have pushed the blobs through another node (a load balancer
    // spreads requests): what this node lacks is fetched from its peers before giving up.
    let mut fetched = 0usize;
    let pushed = loop {
        match state
            .registry
            .put_manifest(name, reference, content_type.as_deref(), bytes.clone())
            .await
        {
            Err(RegistryError::ManifestBlobUnknown(missing)) if fetched < 1024 => {
                if !crate::cluster::fetch_referenced(state, name, &missing).await? {
                    return Err(RegistryError::ManifestBlobUnknown(missing).into());
                }
                fetched += 1;
            }
            other => break other?,
        }
    };
    state
        .metrics
        .received_bytes
        .get_or_create(&KindLabels { kind: "manifest" })
        .inc_by(size);
    // The push is durable here; the copies elsewhere are durable jobs.
    let tag = match reference {
        Reference::Tag(t) => Some(t.as_str()),
        Reference::Digest(_) => None,
    };
    crate::events::pushed(state, name.as_str(), &pushed.digest, tag).await;
    let digest = pushed.digest.to_string();
    let mut resp = Response::builder()
        .status(StatusCode::CREATED)
        .header(
            header::LOCATION,
            hv(&format!("/v2/{name}/manifests/{digest}")),
        )
        .header("docker-content-digest", hv(&digest));
    if let Some(subject) = pushed.subject {
        resp = resp.header("oci-subject", hv(&subject.to_string()));
    }
    Ok(resp.body(Body::empty()).unwrap_or_default())
}

async fn get_blob(
    state: &AppState,
    name: &RepoName,
    digest: &Digest,
    headers: &HeaderMap,
    zero_copy: Option<&ZeroCopy>,
    head: bool,
) -> Result<Response> {
    let size = match state.registry.blob_size(name, digest).await {
        Ok(size) => size,
        Err(e @ RegistryError::BlobUnknown) => {
            let hosted =
                crate::cluster::hosted_blob(state, name, digest, headers, zero_copy, head).await?;
            return match hosted {
                Some(resp) => Ok(resp),
                None => Err(e.into()),
            };
        }
        Err(e) => return Err(e.into()),
    };
    let range = blob_range(headers, size)?;
    if !head {
        if let Some(url) = state.registry.blob_redirect(digest).await? {
            // The client follows with the same Range header, which the store honours.
            return Ok(Response::builder()
                .status(StatusCode::TEMPORARY_REDIRECT)
                .header(header::LOCATION, hv(&url))
                .header("docker-content-digest", hv(&digest.to_string()))
                .body(Body::empty())
                .unwrap_or_default());
        }
    }
    let (builder, start, end) = blob_headers(digest, size, range);
    if head || start == end {
        return Ok(builder.body(Body::empty()).unwrap_or_default());
    }
    local_response(state, zero_copy, builder, digest, start, end).await
}

/// Bytes `start..end` of a blob in this node's store as a response: sent from its file by the
/// kernel where the connection and the store allow it, read through memory otherwise.
pub(crate) async fn local_response(
    state: &AppState,
    zero_copy: Option<&ZeroCopy>,
    builder: http::response::Builder,
    digest: &Digest,
    start: u64,
    end: u64,
) -> Result<Response> {
    let counters = served_counters(state, "local");
    let builder =
        match file_response(state, zero_copy, builder, digest, start, end, counters).await? {
            Ok(resp) => return Ok(resp),
            Err(builder) => builder,
        };
    let stream = state.registry.read_blob(digest, start, end).await?;
    Ok(stream_response(state, builder, stream, "local"))
}

/// Bytes `start..end` of a stored blob sent from its file, counted in `counters`; the builder
/// back when the connection or the store cannot send from files.
pub(crate) async fn file_response(
    state: &AppState,
    zero_copy: Option<&ZeroCopy>,
    builder: http::response::Builder,
    digest: &Digest,
    start: u64,
    end: u64,
    counters: Vec<prometheus_client::metrics::counter::Counter>,
) -> Result<std::result::Result<Response, http::response::Builder>> {
    let Some(zc) = zero_copy else {
        return Ok(Err(builder));
    };
    let Some((file, guard)) = state.registry.open_blob_file(digest).await? else {
        return Ok(Err(builder));
    };
    let body = FileBody::new(file, start, end, zc.clone(), counters, Box::new(guard));
    Ok(Ok(builder.body(Body::new(body)).unwrap_or_default()))
}

/// The range a blob GET asks for, checked against the blob's size.
pub(crate) fn blob_range(
    headers: &HeaderMap,
    size: u64,
) -> Result<Option<crate::ranges::ByteRange>> {
    Ok(match headers.get(header::RANGE) {
        None => None,
        Some(h) => {
            let h = h
                .to_str()
                .map_err(|_| ApiError::range(size, "Range header is not text"))?;
            match parse_range(h, size) {
                Ok(r) => r,
                Err(RangeError::Malformed) => {
                    return Err(ApiError::range(size, format!("malformed Range {h:?}")))
                }
                Err(RangeError::Unsatisfiable) => {
                    return Err(ApiError::range(
                        size,
                        format!("Range {h:?} is outside the blob of {size} bytes"),
                    ))
                }
            }
        }
    })
}

/// Status and headers of a blob response; returns the byte range to send.
pub(crate) fn blob_headers(
    digest: &Digest,
    size: u64,
    range: Option<crate::ranges::ByteRange>,
) -> (http::response::Builder, u64, u64) {
    let (status, start, end) = match range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r.start, r.end),
        None => (StatusCode::OK, 0, size),
    };
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::ACCEPT_RANGES, "bytes")
        .header("docker-content-digest", hv(&digest.to_string()))
        .header(header::ETAG, hv(&format!("\"{digest}\"")));
    if status == StatusCode::PARTIAL_CONTENT {
        resp = resp.header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{}", start, end - 1, size),
        );
    }
    (resp, start, end)
}

/// Stream blob bytes as a response body, counting them by `source`. A stream error aborts the
/// response, so a client never sees a clean end after bad bytes.
pub(crate) fn stream_response(
    state: &AppState,
    builder: http::response::Builder,
    stream: ByteStream,
    source: &'static str,
) -> Response {
    let counters = served_counters(state, source);
    let stream = stream.inspect(move |chunk| {
        if let Ok(c) = chunk {
            for counter in &counters {
                counter.inc_by(c.len() as u64);
            }
        }
    });
    builder.body(Body::from_stream(stream)).unwrap_or_default()
}

/// The counters a blob response from `source` adds its bytes to.
pub(crate) fn served_counters(
    state: &AppState,
    source: &'static str,
) -> Vec<prometheus_client::metrics::counter::Counter> {
    let m = &state.metrics;
    vec![
        m.served_bytes
            .get_or_create(&ServedLabels {
                kind: "blob",
                source,
            })
            .clone(),
        m.blob_served_bytes
            .get_or_create(&crate::metrics::SourceLabels { source })
            .clone(),
    ]
}

/// The request body as a stream of bytes, counted as received blob bytes.
fn body_stream(state: &AppState, body: Body) -> ByteStream {
    let counter = state
        .metrics
        .received_bytes
        .get_or_create(&KindLabels { kind: "blob" })
        .clone();
    Box::pin(body.into_data_stream().map(move |r| {
        r.inspect(|b| {
            counter.inc_by(b.len() as u64);
        })
        .map_err(std::io::Error::other)
    }))
}

fn upload_response(status: StatusCode, name: &RepoName, id: &str, offset: u64) -> Response {
    let range = if offset == 0 {
        "0-0".to_string()
    } else {
        format!("0-{}", offset - 1)
    };
    Response::builder()
        .status(status)
        .header(
            header::LOCATION,
            hv(&format!("/v2/{name}/blobs/uploads/{id}")),
        )
        .header(header::RANGE, hv(&range))
        .header("docker-upload-uuid", hv(id))
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .unwrap_or_default()
}

fn blob_created(name: &RepoName, digest: &Digest) -> Response {
    let d = digest.to_string();
    Response::builder()
        .status(StatusCode::CREATED)
        .header(header::LOCATION, hv(&format!("/v2/{name}/blobs/{d}")))
        .header("docker-content-digest", hv(&d))
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .unwrap_or_default()
}

fn parse_digest(s: &str) -> Result<Digest> {
    s.parse()
        .map_err(|e| ApiError::digest_invalid(format!("{s:?}: {e}")))
}

async fn start_upload(
    state: &AppState,
    name: &RepoName,
    q: &Query,
    req: Request<Body>,
) -> Result<Response> {
    if let Some(mount) = q.get("mount") {
        let digest = parse_digest(mount)?;
        // A `from` that is not a valid name cannot hold the blob: fall back to an upload.
        if let Some(from) = q.get("from").and_then(|f| f.parse::<RepoName>().ok()) {
            if state
                .registry
                .mount_blob(name, &from, &digest)
                .await?
                .is_some()
            {
                return Ok(blob_created(name, &digest));
            }
        }
    } else if let Some(d) = q.get("digest") {
        let digest = parse_digest(d)?;
        let body = body_stream(state, req.into_body());
        state.registry.put_blob(name, &digest, body).await?;
        return Ok(blob_created(name, &digest));
    }
    // Sessions are capped per client, and the client is the peer address. A request that did not
    // come through the accept loop (an in-process test) has none and shares one key.
    let client = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "local".to_string(), |c| c.0.ip().to_string());
    let rec = state.registry.uploads().start(name, &client).await?;
    Ok(upload_response(StatusCode::ACCEPTED, name, &rec.id, 0))
}

fn chunk_info(headers: &HeaderMap) -> Result<ChunkInfo> {
    match headers.get(header::CONTENT_RANGE) {
        None => Ok(ChunkInfo::default()),
        Some(v) => {
            let text = v.to_str().unwrap_or("");
            let (start, end) = parse_content_range(text).ok_or_else(|| {
                ApiError::upload_invalid(format!("malformed Content-Range {text:?}"))
            })?;
            Ok(ChunkInfo {
                start: Some(start),
                end: Some(end),
            })
        }
    }
}

async fn patch_upload(
    state: &AppState,
    name: &RepoName,
    id: &str,
    req: Request<Body>,
) -> Result<Response> {
    let chunk = chunk_info(req.headers())?;
    let body = body_stream(state, req.into_body());
    let rec = state
        .registry
        .uploads()
        .append(name, id, chunk, body)
        .await?;
    Ok(upload_response(StatusCode::ACCEPTED, name, id, rec.offset))
}

/// Whether a request carries body bytes. Asked of the body, not the headers: an HTTP/2 request
/// may carry a body with neither Content-Length nor Transfer-Encoding.
fn has_body(body: &Body) -> bool {
    use axum::body::HttpBody;
    !body.is_end_stream() && body.size_hint().exact() != Some(0)
}

async fn put_upload(
    state: &AppState,
    name: &RepoName,
    id: &str,
    q: &Query,
    req: Request<Body>,
) -> Result<Response> {
    let digest = parse_digest(
        q.get("digest")
            .ok_or_else(|| ApiError::digest_invalid("the digest query parameter is required"))?,
    )?;
    let (parts, body) = req.into_parts();
    let last = if has_body(&body) {
        let chunk = chunk_info(&parts.headers)?;
        Some((chunk, body_stream(state, body)))
    } else {
        None
    };
    state
        .registry
        .uploads()
        .finish(name, id, &digest, last)
        .await?;
    Ok(blob_created(name, &digest))
}

pub(crate) async fn referrers(
    state: &AppState,
    name: &RepoName,
    digest: &Digest,
    q: &Query,
) -> Result<Response> {
    let artifact_type = q.get("artifactType").filter(|t| !t.is_empty());
    let manifests = state
        .registry
        .referrers(name, digest, artifact_type)
        .await?;
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": manifests,
    })
    .to_string();
    let mut resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, media::OCI_INDEX);
    if artifact_type.is_some() {
        resp = resp.header("oci-filters-applied", "artifactType");
    }
    Ok(resp.body(Body::from(body)).unwrap_or_default())
}
