//! Requests for mirrored repositories. [`target`] decides whether a request is mirrored (the
//! precedence is in docs/mirror.md); [`dispatch`] answers it from the mirror.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::response::Response;
use pier_mirror::{BlobSource, Freshness, MirrorError, MirrorRef};
use pier_oci::{ErrorCode, Route};

use crate::error::ApiError;
use crate::respond::{
    blob_headers, blob_range, hv, json, local_response, manifest_response, stream_response, Query,
};
use crate::AppState;

type Result<T> = std::result::Result<T, ApiError>;

/// The mirrored repository a request addresses, or `None` for a hosted one.
///
/// 1. `?ns=<registry>` naming an upstream (containerd's mirror requests). An `ns` naming a
///    registry pier does not mirror is a 404 `NAME_UNKNOWN`, so containerd falls back to the
///    registry itself instead of being given another registry's image;
/// 2. a first path segment naming an upstream (`/v2/ghcr.io/org/app/...`);
/// 3. a name matching `[mirror] hosted`, or a repository already pushed here, is hosted; so is
///    a single name (`myapp`) that the default upstream would only serve respelled (Docker
///    Hub's `library/myapp`): clients that use pier as their mirror always send the full
///    spelling, so `myapp` is this registry's own name, for pushes and reads alike, while
///    `library/myapp` stays Docker Hub's;
/// 4. for reads, the default upstream (Docker's `registry-mirrors`, which sends `library/nginx`
///    and no `ns`). Blob and referrers reads take this route only once a manifest of the
///    repository came through it: clients fetch a manifest before its blobs, and a pusher's
///    `HEAD` of a blob in a new repository must get a quick local 404, not a question to
///    Docker Hub;
/// 5. a push into a name the default upstream serves is refused (403 `DENIED`): one name means
///    one image, and a pushed `library/x` would otherwise shadow Docker Hub's for some clients;
/// 6. otherwise the repository is hosted.
pub(crate) async fn target(
    state: &AppState,
    route: &Route,
    method: &Method,
    q: &Query,
) -> Result<Option<MirrorRef>> {
    let Some(name) = route.name() else {
        return Ok(None);
    };
    if let Some(ns) = q.get("ns") {
        if !state.mirror.as_ref().is_some_and(|m| m.has_upstream(ns)) {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NameUnknown,
                format!("pier does not mirror {ns}: ask {ns} itself"),
            ));
        }
    }
    let Some(mirror) = &state.mirror else {
        return Ok(None);
    };
    if let Some(r) = mirror
        .route(name, q.get("ns"))
        .map_err(ApiError::from_mirror)?
    {
        return Ok(Some(r));
    }
    if state
        .hosted
        .iter()
        .any(|g| pier_mirror::glob::matches(g, name.as_str()))
    {
        return Ok(None);
    }
    if mirror
        .default_route(name)
        .ok()
        .flatten()
        .is_some_and(|r| r.repo != name.as_str())
    {
        return Ok(None);
    }
    let read = *method == Method::GET || *method == Method::HEAD;
    if !read {
        let push = *method == Method::POST || *method == Method::PUT || *method == Method::PATCH;
        if push {
            // A name the default upstream refuses by policy is not served by it, so it may be
            // hosted; only names it would serve are protected.
            if let Ok(Some(r)) = mirror.default_route(name) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    ErrorCode::Denied,
                    format!(
                        "{name} is served by the default upstream {up} (as {cache}); pushing it \
                         here would shadow that image. Push under a namespace listed in \
                         [mirror] hosted (or --hosted), or set [mirror] default_upstream = \"\"",
                        up = r.upstream_name(),
                        cache = r.cache_repo,
                    ),
                ));
            }
        }
        return Ok(None);
    }
    let pullable = matches!(
        route,
        Route::Manifest { .. } | Route::Blob { .. } | Route::Tags { .. } | Route::Referrers { .. }
    );
    if !pullable {
        return Ok(None);
    }
    if repo_exists(state, name.as_str()).await? {
        return Ok(None);
    }
    let Some(r) = mirror.default_route(name).map_err(ApiError::from_mirror)? else {
        return Ok(None);
    };
    if matches!(route, Route::Blob { .. } | Route::Referrers { .. })
        && !repo_exists(state, &r.cache_repo).await?
    {
        return Ok(None);
    }
    Ok(Some(r))
}

/// Whether the repository exists here: pushed (hosted), or, for a cache repository, whether a
/// manifest or blob came through the mirror.
async fn repo_exists(state: &AppState, repo: &str) -> Result<bool> {
    state
        .registry
        .meta_store()
        .repo_exists(repo)
        .await
        .map_err(|e| ApiError::from(pier_registry::RegistryError::from(e)))
}

/// The upstream's `Link` for the next page, rewritten to the name (and `ns`) the client used, so
/// that following it comes back through pier.
fn client_link(link: &str, r: &MirrorRef, client_name: &str, ns: Option<&str>) -> String {
    let upstream_path = format!("/v2/{}/tags/list", r.repo);
    let client_path = format!("/v2/{client_name}/tags/list");
    let mut out = link.replacen(&upstream_path, &client_path, 1);
    if let Some(ns) = ns {
        let param: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("ns", ns)
            .finish();
        if let Some(end) = out.find('>') {
            let sep = if out[..end].contains('?') { '&' } else { '?' };
            out.insert_str(end, &format!("{sep}{param}"));
        }
    }
    out
}

fn freshness_header(f: Freshness) -> &'static str {
    match f {
        Freshness::Hit => "hit",
        Freshness::Miss => "miss",
        Freshness::Stale => "stale",
        Freshness::Peer => "peer",
    }
}

pub(crate) async fn dispatch(
    state: &AppState,
    r: MirrorRef,
    route: Route,
    req: Request<Body>,
    q: &Query,
) -> Result<Response> {
    let Some(mirror) = state.mirror.clone() else {
        return Err(ApiError::unsupported_method());
    };
    let method = req.method().clone();
    let head = method == Method::HEAD;
    match (route, &method) {
        (Route::Manifest { reference, .. }, &Method::GET | &Method::HEAD) => {
            let (record, bytes, freshness) = mirror
                .manifest(&r, &reference)
                .await
                .map_err(|e| ApiError::from_mirror(e).not_found_as(ErrorCode::ManifestUnknown))?;
            let source = match freshness {
                Freshness::Miss => "upstream",
                Freshness::Peer => "peer",
                Freshness::Hit | Freshness::Stale => "local",
            };
            let mut resp = manifest_response(state, &record, bytes, head, source);
            resp.headers_mut()
                .insert("x-pier-cache", hv(freshness_header(freshness)));
            Ok(resp)
        }
        (Route::Blob { digest, .. }, &Method::HEAD) => {
            let size = match mirror.blob_size(&r, &digest).await {
                Ok(size) => size,
                // Pullers fetch a manifest before its blobs, so a blob HEAD in a repository no
                // manifest came through is a pusher checking what to upload: with the upstream
                // unreachable it gets a local 404 (and then the read-only 405 for its POST)
                // rather than a 502 that hides why its push cannot work.
                Err(MirrorError::Upstream(e))
                    if e.is_outage() && !repo_exists(state, &r.cache_repo).await? =>
                {
                    return Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        ErrorCode::BlobUnknown,
                        format!("blob unknown here, and {e}"),
                    ));
                }
                Err(e) => return Err(ApiError::from_mirror(e).not_found_as(ErrorCode::BlobUnknown)),
            };
            let (builder, _, _) = blob_headers(&digest, size, None);
            Ok(builder.body(Body::empty()).unwrap_or_default())
        }
        (Route::Blob { digest, .. }, &Method::GET) => {
            let source = mirror
                .blob(&r, &digest)
                .await
                .map_err(|e| ApiError::from_mirror(e).not_found_as(ErrorCode::BlobUnknown))?;
            match source {
                BlobSource::Local { size } => {
                    let range = blob_range(req.headers(), size)?;
                    let (builder, start, end) = blob_headers(&digest, size, range);
                    if start == end {
                        return Ok(builder.body(Body::empty()).unwrap_or_default());
                    }
                    let zero_copy = req.extensions().get::<crate::zerocopy::ZeroCopy>();
                    local_response(state, zero_copy, builder, &digest, start, end).await
                }
                BlobSource::Filling {
                    fill,
                    size: Some(size),
                } => {
                    let range = blob_range(req.headers(), size)?;
                    let (builder, start, end) = blob_headers(&digest, size, range);
                    if start == end {
                        return Ok(builder.body(Body::empty()).unwrap_or_default());
                    }
                    let stream = fill.read(start, Some(end));
                    let source = fill.origin();
                    Ok(stream_response(state, builder, stream, source))
                }
                BlobSource::Filling { fill, size: None } => {
                    // The upstream sent no length: stream it chunked, whole.
                    let builder = Response::builder()
                        .status(StatusCode::OK)
                        .header(header::CONTENT_TYPE, "application/octet-stream")
                        .header("docker-content-digest", hv(&digest.to_string()));
                    let source = fill.origin();
                    Ok(stream_response(state, builder, fill.read(0, None), source))
                }
            }
        }
        (Route::Tags { name }, &Method::GET) => {
            let (body, link) = mirror
                .tags(&r, &q.without_ns())
                .await
                .map_err(|e| ApiError::from_mirror(e).not_found_as(ErrorCode::NameUnknown))?;
            // The list names the repository as the client asked for it, not as the upstream
            // calls it (`docker.io/library/nginx` through a path prefix, not `library/nginx`).
            let body = match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(mut v) if v.get("name").is_some() => {
                    v["name"] = serde_json::Value::String(name.as_str().to_string());
                    v.to_string()
                }
                _ => String::from_utf8_lossy(&body).into_owned(),
            };
            let mut resp = json(StatusCode::OK, body);
            if let Some(link) = link {
                let link = client_link(&link, &r, name.as_str(), q.get("ns"));
                resp.headers_mut().insert(header::LINK, hv(&link));
            }
            Ok(resp)
        }
        (Route::Referrers { digest, .. }, &Method::GET) => {
            // The upstream's answer when it has the referrers API; otherwise (a registry without
            // it answers 404, or the upstream is down) what pier cached: referrers whose
            // manifests came through this mirror.
            match r
                .upstream
                .client
                .referrers(&r.repo, &digest, &q.without_ns())
                .await
            {
                Ok((body, filtered)) => {
                    let mut resp = Response::builder()
                        .status(StatusCode::OK)
                        .header(header::CONTENT_TYPE, pier_oci::media::OCI_INDEX);
                    if filtered {
                        resp = resp.header("oci-filters-applied", "artifactType");
                    }
                    Ok(resp.body(Body::from(body)).unwrap_or_default())
                }
                Err(e) if e.is_outage() || matches!(e, pier_upstream::UpstreamError::NotFound) => {
                    let cache: pier_oci::RepoName = r.cache_repo.parse().map_err(|_| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            ErrorCode::NameInvalid,
                            "cache repository name",
                        )
                    })?;
                    crate::respond::referrers(state, &cache, &digest, q).await
                }
                Err(e) => Err(ApiError::from_mirror(e.into())),
            }
        }
        _ => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unsupported,
            format!(
                "{} is mirrored from {} and read-only here",
                r.repo,
                r.upstream_name()
            ),
        )),
    }
}
