//! Handlers for every `/v2/` route. The path was parsed once into a [`Route`]; here the method
//! picks the operation, headers and query are read, and the registry does the work.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use pier_oci::{Digest, Reference, RepoName, Route};
use pier_registry::upload::ChunkInfo;
use pier_registry::RegistryError;
use pier_store::ByteStream;

use crate::error::ApiError;
use crate::metrics::KindLabels;
use crate::ranges::parse_content_range;
use crate::respond::{
    blob_headers, blob_range, hv, json, local_response, manifest_response, referrers, Query,
};
use crate::zerocopy::ZeroCopy;
use crate::AppState;

type Result<T> = std::result::Result<T, ApiError>;

/// Largest page of tags or repositories returned when the client gives no `n`.
const DEFAULT_PAGE: usize = 10_000;

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
            match &reference {
                Reference::Digest(digest) => {
                    crate::events::deleted(&state, name.as_str(), digest).await
                }
                Reference::Tag(tag) => {
                    crate::events::tag_deleted(&state, name.as_str(), tag.as_str()).await
                }
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
