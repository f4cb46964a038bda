//! Writing to a registry: what replication to another site needs. Blobs are checked with
//! `HEAD` first and mounted from another repository of the same registry where one is known
//! to hold them, so only what the target lacks is uploaded; an upload is a `POST` that opens a
//! session and one `PUT` that streams the whole blob (the CNCF distribution registry accepts
//! no single-request upload). Manifests are `PUT` as their exact bytes.
//!
//! Every request asks for a token with `push,pull` scope on the repository (and `pull` on a
//! mount's source). Requests without a body to stream (`HEAD`, `POST`, manifest `PUT`,
//! `DELETE`) fail over and retry like reads; a `POST` retried after a lost answer at worst
//! leaves an unused upload session, which registries expire. The blob `PUT` is sent once: its
//! body is a stream from pier's store, and the caller opens a fresh one to try again.

use bytes::Bytes;
use pier_oci::Digest;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};

use crate::{header_digest, Access, Result, Upstream, UpstreamError};

/// What `POST /v2/<name>/blobs/uploads/` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountOutcome {
    /// The registry mounted the blob from the other repository: nothing to upload.
    Mounted,
    /// An upload session was opened at this absolute URL.
    Upload(String),
}

impl Access {
    /// Push access to `repo`, and pull access to `from` when a blob is mounted from it.
    fn push(repo: &str, from: Option<&str>) -> Access {
        let mut scope = format!("repository:{repo}:pull,push");
        let mut key = format!("push {repo}");
        if let Some(from) = from.filter(|f| *f != repo) {
            scope.push_str(&format!(" repository:{from}:pull"));
            key.push_str(&format!(" from {from}"));
        }
        Access {
            repo: repo.to_string(),
            scope: Some(scope),
            key,
        }
    }
}

impl Upstream {
    /// Whether `repo` on this registry already serves blob `digest`.
    pub async fn has_blob(&self, repo: &str, digest: &Digest) -> Result<bool> {
        self.found(Method::HEAD, repo, &format!("/v2/{repo}/blobs/{digest}"))
            .await
    }

    /// A bodiless request with push access to `repo`: `true` when it succeeds, `false` when
    /// the registry answers 404 (it has no such thing).
    async fn found(&self, method: Method, repo: &str, path: &str) -> Result<bool> {
        let access = Access::push(repo, None);
        match self
            .request(method, path, &access, HeaderMap::new(), None, None)
            .await
        {
            Ok(_) => Ok(true),
            Err(UpstreamError::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The digest `repo:reference` has on this registry, if it exists.
    pub async fn manifest_digest(&self, repo: &str, reference: &str) -> Result<Option<Digest>> {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, crate::manifest_accept());
        let path = format!("/v2/{repo}/manifests/{reference}");
        match self
            .request(
                Method::HEAD,
                &path,
                &Access::push(repo, None),
                h,
                None,
                None,
            )
            .await
        {
            Ok((resp, _)) => Ok(header_digest(resp.headers())),
            Err(UpstreamError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Open an upload of `digest` into `repo`, asking the registry to mount it from `from`
    /// (a repository of this registry that holds it) instead when one is given.
    pub async fn start_upload(
        &self,
        repo: &str,
        digest: &Digest,
        from: Option<&str>,
    ) -> Result<MountOutcome> {
        let from = from.filter(|f| *f != repo);
        let path = match from {
            Some(from) => format!("/v2/{repo}/blobs/uploads/?mount={digest}&from={from}"),
            None => format!("/v2/{repo}/blobs/uploads/"),
        };
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let (resp, ep) = self
            .request(
                Method::POST,
                &path,
                &Access::push(repo, from),
                h,
                Some(Bytes::new()),
                None,
            )
            .await?;
        if resp.status() == StatusCode::CREATED {
            return Ok(MountOutcome::Mounted);
        }
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                UpstreamError::Protocol(format!(
                    "POST {path} answered {} without a Location",
                    resp.status()
                ))
            })?;
        Ok(MountOutcome::Upload(self.absolute(ep, location)))
    }

    /// Finish an upload opened by [`Upstream::start_upload`]: one `PUT` carrying the whole
    /// blob (`size` bytes streamed from `body`) and its digest. Sent once; a failure is for
    /// the caller to retry with a new session and a new body.
    pub async fn finish_upload(
        &self,
        repo: &str,
        location: &str,
        digest: &Digest,
        size: u64,
        body: reqwest::Body,
    ) -> Result<()> {
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={digest}");
        let access = Access::push(repo, None);
        let mut req = self
            .client
            .put(&url)
            .header(header::CONTENT_LENGTH, size)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        // The session was opened with this token (or these credentials); a streamed body
        // cannot answer a challenge by being sent again.
        if let Some(token) = self.tokens.get(&access.key) {
            req = req.bearer_auth(token);
        } else if let (Some(u), true) = (
            &self.config.username,
            self.basic_seen.load(std::sync::atomic::Ordering::Relaxed),
        ) {
            req = req.basic_auth(u, self.config.password.as_ref());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| UpstreamError::transport(&format!("PUT {url}"), &e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = resp.text().await.unwrap_or_default();
        Err(status_error(&format!("PUT blob {digest}"), status, &body))
    }

    /// `PUT` a manifest's exact bytes as `repo:reference`; returns the digest the registry
    /// says it stored.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Option<Digest>> {
        let mut h = HeaderMap::new();
        let ct = HeaderValue::from_str(media_type)
            .map_err(|_| UpstreamError::Protocol(format!("media type {media_type:?}")))?;
        h.insert(header::CONTENT_TYPE, ct);
        let path = format!("/v2/{repo}/manifests/{reference}");
        let (resp, _) = self
            .request(
                Method::PUT,
                &path,
                &Access::push(repo, None),
                h,
                Some(bytes),
                None,
            )
            .await?;
        Ok(header_digest(resp.headers()))
    }

    /// `DELETE` a manifest by digest. Returns whether the registry had it.
    pub async fn delete_manifest(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let path = format!("/v2/{repo}/manifests/{digest}");
        self.found(Method::DELETE, repo, &path).await
    }

    /// Remove tag `tag` from `repo`, leaving the manifest it pointed at (other tags or
    /// digests may still use it). `DELETE /v2/<repo>/manifests/<tag>` is tried first (the OCI
    /// distribution spec allows it; pier, zot and Harbor accept it). A registry that refuses
    /// a tag as the reference (the CNCF distribution registry answers 400 DIGEST_INVALID) is
    /// given a placeholder instead: an empty OCI manifest, unique to this tag, is put under the
    /// tag (moving the tag off the image) and then deleted by its digest, which takes the tag
    /// with it. Returns whether the registry had the tag.
    pub async fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool> {
        let path = format!("/v2/{repo}/manifests/{tag}");
        match self.found(Method::DELETE, repo, &path).await {
            Ok(had) => return Ok(had),
            Err(UpstreamError::Protocol(why)) => {
                tracing::debug!(repo, tag, %why, "the target refused a delete by tag; moving the tag to a placeholder");
            }
            Err(e) => return Err(e),
        }
        if self.manifest_digest(repo, tag).await?.is_none() {
            return Ok(false);
        }
        let config = Bytes::from_static(EMPTY_CONFIG);
        let config_digest = Digest::sha256(&config);
        if !self.has_blob(repo, &config_digest).await? {
            if let MountOutcome::Upload(location) =
                self.start_upload(repo, &config_digest, None).await?
            {
                let size = config.len() as u64;
                self.finish_upload(repo, &location, &config_digest, size, config.into())
                    .await?;
            }
        }
        let placeholder = tag_placeholder(repo, tag, &config_digest);
        let digest = Digest::sha256(&placeholder);
        self.put_manifest(
            repo,
            tag,
            "application/vnd.oci.image.manifest.v1+json",
            Bytes::from(placeholder),
        )
        .await?;
        self.delete_manifest(repo, &digest).await?;
        Ok(true)
    }

    /// A `Location` made absolute against the endpoint that sent it.
    fn absolute(&self, endpoint: usize, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            let base = &self.endpoints[endpoint].base;
            // The base may carry a path prefix; a Location starting with `/` is from the host.
            let origin = base
                .find("://")
                .and_then(|i| base[i + 3..].find('/').map(|j| &base[..i + 3 + j]))
                .unwrap_or(base);
            if location.starts_with('/') {
                format!("{origin}{location}")
            } else {
                format!("{base}/{location}")
            }
        }
    }
}

/// The config of a tag's placeholder: OCI's empty descriptor content.
const EMPTY_CONFIG: &[u8] = b"{}";

/// The manifest [`Upstream::delete_tag`] puts under a tag to delete it from a registry that
/// deletes by digest only: empty, and unique to the repository and tag, so deleting it by
/// digest takes no other tag along.
fn tag_placeholder(repo: &str, tag: &str, config: &Digest) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": config.to_string(),
            "size": EMPTY_CONFIG.len(),
        },
        "layers": [],
        "annotations": { "io.pier.tag-delete": format!("{repo}:{tag}") },
    }))
    .expect("a JSON value serializes")
}

/// The error for a non-success answer to a request sent once.
fn status_error(what: &str, status: StatusCode, body: &str) -> UpstreamError {
    let detail = body.trim();
    let detail = if detail.len() > 300 {
        &detail[..300]
    } else {
        detail
    };
    let msg = format!("{what}: {status} {detail}");
    match status {
        StatusCode::NOT_FOUND => UpstreamError::NotFound,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => UpstreamError::Denied(msg),
        StatusCode::TOO_MANY_REQUESTS => UpstreamError::TooManyRequests,
        s if s.is_server_error() => UpstreamError::Unavailable(msg),
        _ => UpstreamError::Protocol(msg),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::extract::{Request, State};
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};

    use super::*;
    use crate::{NoObserver, UpstreamConfig};

    /// A registry that records what it was asked and answers like distribution: mounts of
    /// `sha256:aa…` succeed, other mounts open a session, uploads and manifests are stored.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<String>>>);

    async fn registry(State(seen): State<Seen>, req: Request) -> Response {
        let line = format!(
            "{} {}",
            req.method(),
            req.uri().path_and_query().map_or("", |p| p.as_str())
        );
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let body = axum::body::to_bytes(req.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        seen.0
            .lock()
            .unwrap()
            .push(format!("{line} ({} bytes)", body.len()));
        match (method.as_str(), path.as_str()) {
            ("HEAD", p) if p.contains("/blobs/sha256:bb") => StatusCode::OK.into_response(),
            ("HEAD", _) => StatusCode::NOT_FOUND.into_response(),
            ("POST", _) if query.contains("mount=sha256:aa") => StatusCode::CREATED.into_response(),
            ("POST", _) => (
                StatusCode::ACCEPTED,
                [(header::LOCATION, "/v2/t/blobs/uploads/u1?_state=x")],
            )
                .into_response(),
            ("PUT", "/v2/t/blobs/uploads/u1") => StatusCode::CREATED.into_response(),
            ("PUT", p) if p.starts_with("/v2/t/manifests/") => (
                StatusCode::CREATED,
                [("docker-content-digest", Digest::sha256(&body).to_string())],
            )
                .into_response(),
            _ => StatusCode::BAD_REQUEST.into_response(),
        }
    }

    async fn start() -> (Arc<Upstream>, Seen) {
        let seen = Seen::default();
        let app = axum::Router::new()
            .fallback(registry)
            .with_state(seen.clone());
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

    /// A valid digest that starts with the marker `s`.
    fn d(s: &str) -> Digest {
        format!("sha256:{s}{}", "0".repeat(64 - s.len()))
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn pushes_what_the_target_lacks() {
        let (up, seen) = start().await;
        let digest = d("cc");
        assert!(!up.has_blob("t", &digest).await.unwrap());
        let outcome = up.start_upload("t", &digest, None).await.unwrap();
        let MountOutcome::Upload(location) = outcome else {
            panic!("expected an upload session, got {outcome:?}");
        };
        assert!(location.starts_with("http://127.0.0.1:"), "{location}");
        assert!(location.ends_with("/v2/t/blobs/uploads/u1?_state=x"));
        up.finish_upload("t", &location, &digest, 5, reqwest::Body::from("hello"))
            .await
            .unwrap();
        let stored = up
            .put_manifest(
                "t",
                "1",
                "application/vnd.oci.image.manifest.v1+json",
                Bytes::from_static(b"{}"),
            )
            .await
            .unwrap();
        assert_eq!(stored, Some(Digest::sha256(b"{}")));
        let seen = seen.0.lock().unwrap().clone();
        assert!(
            seen.iter().any(|l| l
                .starts_with("PUT /v2/t/blobs/uploads/u1?_state=x&digest=sha256:cc")
                && l.ends_with("(5 bytes)")),
            "{seen:#?}"
        );
    }

    #[tokio::test]
    async fn mounts_from_a_repository_that_holds_the_blob() {
        let (up, seen) = start().await;
        let outcome = up
            .start_upload("t", &d("aa"), Some("other/repo"))
            .await
            .unwrap();
        assert_eq!(outcome, MountOutcome::Mounted);
        // A blob the target has is seen as present; no upload is opened for it.
        assert!(up.has_blob("t", &d("bb")).await.unwrap());
        let seen = seen.0.lock().unwrap().clone();
        assert!(
            seen[0].starts_with("POST /v2/t/blobs/uploads/?mount=sha256:aa")
                && seen[0].contains("&from=other/repo"),
            "{seen:#?}"
        );
        assert_eq!(seen.iter().filter(|l| l.starts_with("POST")).count(), 1);
    }

    #[test]
    fn status_errors_say_whose_fault() {
        assert!(matches!(
            status_error("x", StatusCode::SERVICE_UNAVAILABLE, ""),
            UpstreamError::Unavailable(_)
        ));
        assert!(matches!(
            status_error("x", StatusCode::FORBIDDEN, ""),
            UpstreamError::Denied(_)
        ));
        let e = status_error(
            "PUT",
            StatusCode::BAD_REQUEST,
            "{\"errors\":[\"DIGEST_INVALID\"]}",
        );
        assert!(e.to_string().contains("DIGEST_INVALID"), "{e}");
    }
}
