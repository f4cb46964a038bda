//! What the registry API answers from this node's store, shared by every route that serves
//! one: the decoded query, blob ranges and headers, blob bodies (sent from the file where the
//! connection allows, see `zerocopy`), manifest and referrers responses. A leaf: it imports no
//! route module, and every route module may import it.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use pier_oci::{media, Digest, RepoName};
use pier_store::ByteStream;

use crate::error::ApiError;
use crate::metrics::ServedLabels;
use crate::ranges::{parse_range, RangeError};
use crate::zerocopy::{FileBody, ZeroCopy};
use crate::AppState;

type Result<T> = std::result::Result<T, ApiError>;

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
