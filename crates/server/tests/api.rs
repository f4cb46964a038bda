//! The in-process HTTP tier: the whole router, over a real filesystem blob store and an in-memory
//! metadata store (or S3 and PostgreSQL with `PIER_TEST_BACKEND=s3pg`), driven with
//! `tower::ServiceExt::oneshot`. Every test asserts what a client would notice: the status, the
//! OCI error code, headers, and the exact bytes.

#[path = "../../store/tests/support/backend.rs"]
mod backend;

mod support {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{HeaderMap, Request, StatusCode};
    use axum::Router;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use pier_registry::{Limits, Registry};
    use pier_server::AppState;
    use pier_store::{FsBlobStore, RedbMetaStore};
    use serde_json::{json, Value};
    use sha2::Digest as _;
    use tower::ServiceExt;

    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

    /// The manifest limit every test app runs with: small, so the limit test stays cheap.
    pub const MANIFEST_LIMIT: u64 = 64 * 1024;

    pub struct App {
        pub state: AppState,
        router: Router,
        /// The test's database on PostgreSQL, dropped with the app.
        pub db: crate::backend::Guard,
        _dir: tempfile::TempDir,
    }

    /// A response, fully read.
    pub struct Resp {
        pub status: StatusCode,
        pub headers: HeaderMap,
        pub body: Bytes,
    }

    impl Resp {
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers.get(name).and_then(|v| v.to_str().ok())
        }

        /// Every value of a header (to catch duplicates).
        pub fn header_all(&self, name: &str) -> Vec<String> {
            self.headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap_or("<binary>").to_string())
                .collect()
        }

        pub fn code(&self) -> String {
            code(&self.body)
        }

        pub fn json(&self) -> Value {
            serde_json::from_slice(&self.body).unwrap_or_else(|e| {
                panic!(
                    "body is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(&self.body)
                )
            })
        }

        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }

        /// Assert a status; `what` names the request in the failure message.
        #[track_caller]
        pub fn status(&self, status: u16, what: &str) -> &Resp {
            assert_eq!(
                self.status.as_u16(),
                status,
                "{what}: body {:?}",
                self.text()
            );
            self
        }

        /// Assert an OCI error: the status, a JSON body, and its first code.
        #[track_caller]
        pub fn error(&self, status: u16, code: &str, what: &str) -> &Resp {
            self.status(status, what);
            assert_eq!(
                self.header("content-type"),
                Some("application/json"),
                "{what}: error content type"
            );
            assert_eq!(self.code(), code, "{what}: body {:?}", self.text());
            self
        }
    }

    /// The `code` of the first error in an OCI error body, or `""` if it is not one.
    pub fn code(body: &[u8]) -> String {
        serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v["errors"][0]["code"].as_str().map(String::from))
            .unwrap_or_default()
    }

    pub fn sha256(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
    }

    pub fn sha512(data: &[u8]) -> String {
        format!("sha512:{}", hex::encode(sha2::Sha512::digest(data)))
    }

    /// A descriptor of `data` with a sha256 digest.
    pub fn desc(media_type: &str, data: &[u8]) -> Value {
        json!({ "mediaType": media_type, "digest": sha256(data), "size": data.len() })
    }

    /// An image manifest of `media_type` over a config and layers.
    pub fn image(media_type: &str, config: Value, layers: Vec<Value>) -> Value {
        json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": config,
            "layers": layers,
        })
    }

    /// An index (or manifest list) of `media_type` over child descriptors.
    pub fn index(media_type: &str, manifests: Vec<Value>) -> Value {
        json!({ "schemaVersion": 2, "mediaType": media_type, "manifests": manifests })
    }

    /// The target of a `Link: <target>; rel="next"` header.
    pub fn link_target(link: &str) -> String {
        assert!(link.ends_with("; rel=\"next\""), "Link {link:?}");
        let start = link.find('<').expect("Link has <");
        let end = link.find('>').expect("Link has >");
        link[start + 1..end].to_string()
    }

    /// The value of an unlabelled metric in a text exposition.
    pub fn metric(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
            .trim()
            .parse()
            .expect("metric value is a number")
    }

    impl App {
        pub async fn new() -> App {
            App::with_limits(Limits {
                max_manifest_bytes: MANIFEST_LIMIT,
                ..Limits::default()
            })
            .await
        }

        pub async fn with_limits(limits: Limits) -> App {
            let dir = tempfile::tempdir().expect("tempdir");
            let (blobs, meta, db) = crate::backend::stores(dir.path()).await;
            let registry = Arc::new(Registry::new(blobs, meta, limits));
            let state = AppState::new(registry);
            App {
                router: pier_server::router(state.clone()),
                state,
                db,
                _dir: dir,
            }
        }

        /// An app whose store keeps `min_free` bytes free on its data directory (the local
        /// disk: always the filesystem store, whichever backend the other tests run on).
        pub async fn with_min_free(min_free: u64) -> App {
            let dir = tempfile::tempdir().expect("tempdir");
            let space = Arc::new(pier_store::Space::new(dir.path(), min_free));
            let blobs = FsBlobStore::open_with(dir.path(), Some(space.clone()))
                .await
                .expect("blob store");
            let meta = Arc::new(RedbMetaStore::in_memory().expect("meta store"));
            let registry = Arc::new(Registry::new(blobs, meta, Limits::default()));
            let state = AppState::new(registry).with_space(space);
            App {
                router: pier_server::router(state.clone()),
                state,
                db: None,
                _dir: dir,
            }
        }

        pub async fn request(&self, req: Request<Body>) -> Resp {
            let resp = self
                .router
                .clone()
                .oneshot(req)
                .await
                .expect("router is infallible");
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp
                .into_body()
                .collect()
                .await
                .expect("response body")
                .to_bytes();
            Resp {
                status,
                headers,
                body,
            }
        }

        /// Send a request with a whole body. Like an HTTP/1.1 client, a request that may carry a
        /// body gets a `Content-Length` unless the caller sets one.
        pub async fn send(
            &self,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
            body: impl Into<Bytes>,
        ) -> Resp {
            let body = body.into();
            let mut req = Request::builder().method(method).uri(path);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let sets_length = headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
            if !sets_length && (!body.is_empty() || matches!(method, "PUT" | "POST" | "PATCH")) {
                req = req.header("content-length", body.len());
            }
            self.request(req.body(Body::from(body)).expect("request"))
                .await
        }

        /// Send a body as a stream of chunks with no `Content-Length`, as a chunked HTTP/1.1 or
        /// an HTTP/2 client may.
        pub async fn send_stream(
            &self,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
            chunks: Vec<Vec<u8>>,
        ) -> Resp {
            let stream = futures::stream::iter(
                chunks
                    .into_iter()
                    .map(|c| Ok::<_, std::io::Error>(Bytes::from(c))),
            );
            self.send_body(method, path, headers, Body::from_stream(stream))
                .await
        }

        /// Send any body, adding no headers.
        pub async fn send_body(
            &self,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
            body: Body,
        ) -> Resp {
            let mut req = Request::builder().method(method).uri(path);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            self.request(req.body(body).expect("request")).await
        }

        pub async fn get(&self, path: &str) -> Resp {
            self.send("GET", path, &[], Bytes::new()).await
        }

        pub async fn head(&self, path: &str) -> Resp {
            self.send("HEAD", path, &[], Bytes::new()).await
        }

        pub async fn delete(&self, path: &str) -> Resp {
            self.send("DELETE", path, &[], Bytes::new()).await
        }

        /// Push a blob in one request and return its digest.
        pub async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
            let d = sha256(data);
            self.send(
                "POST",
                &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
                &[],
                data.to_vec(),
            )
            .await
            .status(201, "monolithic blob push");
            d
        }

        /// Start an upload session and return its Location.
        pub async fn start_upload(&self, repo: &str) -> String {
            let r = self
                .send("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], "")
                .await;
            r.status(202, "start upload");
            r.header("location").expect("Location").to_string()
        }

        pub async fn put_manifest(
            &self,
            repo: &str,
            reference: &str,
            media_type: &str,
            body: impl Into<Bytes>,
        ) -> Resp {
            self.send(
                "PUT",
                &format!("/v2/{repo}/manifests/{reference}"),
                &[("content-type", media_type)],
                body,
            )
            .await
        }

        /// Push a JSON manifest (with the media type it names) and return its digest.
        pub async fn push_manifest(&self, repo: &str, reference: &str, manifest: &Value) -> String {
            let bytes = manifest.to_string();
            let media_type = manifest["mediaType"].as_str().unwrap_or("application/json");
            self.put_manifest(repo, reference, media_type, bytes.clone())
                .await
                .status(201, "manifest push");
            sha256(bytes.as_bytes())
        }

        /// Push a config and one layer to `repo` and an OCI image manifest over them.
        pub async fn push_image(&self, repo: &str, tag: &str, seed: &str) -> (String, Vec<u8>) {
            let config = format!(r#"{{"architecture":"amd64","seed":"{seed}"}}"#).into_bytes();
            let layer = format!("layer of {seed}").into_bytes();
            self.push_blob(repo, &config).await;
            self.push_blob(repo, &layer).await;
            let m = image(
                OCI_MANIFEST,
                desc(OCI_CONFIG, &config),
                vec![desc(OCI_LAYER, &layer)],
            );
            let d = self.push_manifest(repo, tag, &m).await;
            (d, m.to_string().into_bytes())
        }
    }
}

use serde_json::json;
use support::*;

// ---- base, unknown paths, wrong methods ----

#[tokio::test]
async fn base_endpoint_answers_200() {
    let app = App::new().await;
    for (method, path) in [("GET", "/v2/"), ("GET", "/v2"), ("HEAD", "/v2/")] {
        let r = app.send(method, path, &[], "").await;
        r.status(200, &format!("{method} {path}"));
        assert_eq!(
            r.header("docker-distribution-api-version"),
            Some("registry/2.0"),
            "{method} {path}"
        );
    }
    assert_eq!(app.get("/v2/").await.json(), json!({}));
}

#[tokio::test]
async fn unknown_paths_are_404_not_found() {
    let app = App::new().await;
    for path in [
        "/",
        "/v1/",
        "/v3/a/tags/list",
        "/v2x",
        "/v2/a",
        "/v2/a/b",
        "/v2/a/unknown/x",
        "/v2/a/tags",
        "/v2/a/tags/lists",
        "/v2/a/blobs/uploads/not-a-uuid",
        "/v2/a/blobs/uploads/0f0e8a4c-3c5b-4a8e-9d36-4d0d6bb5a1a1x",
    ] {
        app.get(path).await.error(404, "NOT_FOUND", path);
    }
}

#[tokio::test]
async fn wrong_methods_are_405_unsupported() {
    let app = App::new().await;
    let d = sha256(b"x");
    let upload = "/v2/a/blobs/uploads/0f0e8a4c-3c5b-4a8e-9d36-4d0d6bb5a1a1";
    for (method, path) in [
        ("POST", "/v2/".to_string()),
        ("DELETE", "/v2/".to_string()),
        ("PUT", "/v2/_catalog".to_string()),
        ("DELETE", "/v2/a/tags/list".to_string()),
        ("POST", "/v2/a/manifests/latest".to_string()),
        ("PATCH", "/v2/a/manifests/latest".to_string()),
        ("PUT", format!("/v2/a/blobs/{d}")),
        ("POST", format!("/v2/a/blobs/{d}")),
        ("PATCH", format!("/v2/a/blobs/{d}")),
        ("GET", "/v2/a/blobs/uploads/".to_string()),
        ("PUT", "/v2/a/blobs/uploads/".to_string()),
        ("DELETE", "/v2/a/blobs/uploads/".to_string()),
        ("POST", upload.to_string()),
        ("POST", format!("/v2/a/referrers/{d}")),
        ("DELETE", format!("/v2/a/referrers/{d}")),
    ] {
        let what = format!("{method} {path}");
        let r = app.send(method, &path, &[], "").await;
        r.status(405, &what);
        // A HEAD response carries no body to hold the code.
        if method != "HEAD" {
            r.error(405, "UNSUPPORTED", &what);
        }
    }
}

// ---- blob push ----

#[tokio::test]
async fn monolithic_push_then_get_and_head() {
    let app = App::new().await;
    let data: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    let d = sha256(&data);
    let r = app
        .send(
            "POST",
            &format!("/v2/r/blobs/uploads/?digest={d}"),
            &[("content-type", "application/octet-stream")],
            data.clone(),
        )
        .await;
    r.status(201, "monolithic POST");
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/r/blobs/{d}").as_str())
    );
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));

    let r = app.get(&format!("/v2/r/blobs/{d}")).await;
    r.status(200, "GET blob");
    assert_eq!(r.body.as_ref(), data.as_slice());
    assert_eq!(r.header("content-length"), Some("5000"));
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    assert_eq!(r.header("content-range"), None);

    let r = app.head(&format!("/v2/r/blobs/{d}")).await;
    r.status(200, "HEAD blob");
    assert_eq!(r.header_all("content-length"), vec!["5000"]);
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    assert!(r.body.is_empty(), "HEAD has no body");

    // The empty blob is a blob too.
    let empty = app.push_blob("r", b"").await;
    let r = app.get(&format!("/v2/r/blobs/{empty}")).await;
    r.status(200, "GET empty blob");
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-length"), Some("0"));
}

#[tokio::test]
async fn monolithic_push_with_wrong_or_bad_digest_is_rejected() {
    let app = App::new().await;
    let wrong = sha256(b"something else");
    app.send(
        "POST",
        &format!("/v2/r/blobs/uploads/?digest={wrong}"),
        &[],
        "data",
    )
    .await
    .error(400, "DIGEST_INVALID", "content does not match ?digest");
    for d in [wrong, sha256(b"data")] {
        app.get(&format!("/v2/r/blobs/{d}")).await.error(
            404,
            "BLOB_UNKNOWN",
            "nothing became visible",
        );
    }
    for bad in [
        "sha256:abc",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "nonsense",
    ] {
        app.send(
            "POST",
            &format!("/v2/r/blobs/uploads/?digest={bad}"),
            &[],
            "data",
        )
        .await
        .error(400, "DIGEST_INVALID", bad);
    }
}

#[tokio::test]
async fn post_then_put_with_the_whole_body() {
    let app = App::new().await;
    let r = app.send("POST", "/v2/r/blobs/uploads/", &[], "").await;
    r.status(202, "POST");
    let loc = r.header("location").expect("Location").to_string();
    assert!(loc.starts_with("/v2/r/blobs/uploads/"), "{loc}");
    assert_eq!(r.header("range"), Some("0-0"));
    let id = r.header("docker-upload-uuid").expect("Docker-Upload-UUID");
    assert!(loc.ends_with(id), "{loc} names {id}");

    let data = b"one request after the POST".to_vec();
    let d = sha256(&data);
    let r = app
        .send("PUT", &format!("{loc}?digest={d}"), &[], data.clone())
        .await;
    r.status(201, "PUT with body");
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/r/blobs/{d}").as_str())
    );
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    assert_eq!(
        app.get(&format!("/v2/r/blobs/{d}")).await.body.as_ref(),
        data
    );
    // The session is over.
    app.get(&loc)
        .await
        .error(404, "BLOB_UPLOAD_UNKNOWN", "status after PUT");
}

#[tokio::test]
async fn final_put_body_without_content_length_is_not_dropped() {
    // An HTTP/2 request carries neither Content-Length nor Transfer-Encoding; its body must
    // still count as the last chunk.
    let app = App::new().await;
    let loc = app.start_upload("r").await;
    let data = b"streamed in the final PUT".to_vec();
    let d = sha256(&data);
    app.send_stream(
        "PUT",
        &format!("{loc}?digest={d}"),
        &[],
        vec![data[..10].to_vec(), data[10..].to_vec()],
    )
    .await
    .status(201, "streamed PUT");
    assert_eq!(
        app.get(&format!("/v2/r/blobs/{d}")).await.body.as_ref(),
        data
    );
}

#[tokio::test]
async fn chunked_upload_with_content_range() {
    let app = App::new().await;
    let loc = app.start_upload("r").await;
    let data: Vec<u8> = (0..40u8).collect();
    let d = sha256(&data);

    let r = app
        .send(
            "PATCH",
            &loc,
            &[("content-range", "0-9")],
            data[..10].to_vec(),
        )
        .await;
    r.status(202, "first chunk");
    assert_eq!(r.header("range"), Some("0-9"));
    assert_eq!(r.header("location"), Some(loc.as_str()));

    let r = app.get(&loc).await;
    r.status(204, "status");
    assert_eq!(r.header("range"), Some("0-9"));
    assert_eq!(r.header("location"), Some(loc.as_str()));
    assert!(r.body.is_empty());

    // Out of order: the client learns where the session is.
    let r = app
        .send(
            "PATCH",
            &loc,
            &[("content-range", "20-29")],
            data[20..30].to_vec(),
        )
        .await;
    r.error(416, "BLOB_UPLOAD_INVALID", "out-of-order chunk");
    assert_eq!(r.header("range"), Some("0-9"));
    // A chunk that repeats acknowledged bytes is out of order too.
    let r = app
        .send(
            "PATCH",
            &loc,
            &[("content-range", "0-9")],
            data[..10].to_vec(),
        )
        .await;
    r.error(416, "BLOB_UPLOAD_INVALID", "repeated chunk");
    assert_eq!(r.header("range"), Some("0-9"));

    for bad in ["abc", "10-", "-19", "19-10", "10_19", "bytes=x-y"] {
        app.send(
            "PATCH",
            &loc,
            &[("content-range", bad)],
            data[10..20].to_vec(),
        )
        .await
        .error(
            400,
            "BLOB_UPLOAD_INVALID",
            &format!("Content-Range {bad:?}"),
        );
    }
    // Content-Range announcing more, or fewer, bytes than the body holds.
    for (range, body) in [("10-19", &data[10..15]), ("10-14", &data[10..20])] {
        app.send("PATCH", &loc, &[("content-range", range)], body.to_vec())
            .await
            .error(400, "BLOB_UPLOAD_INVALID", &format!("length vs {range}"));
    }
    // None of that moved the session.
    assert_eq!(app.get(&loc).await.header("range"), Some("0-9"));

    // The RFC form of Content-Range is accepted too.
    let r = app
        .send(
            "PATCH",
            &loc,
            &[("content-range", "bytes 10-19/*")],
            data[10..20].to_vec(),
        )
        .await;
    r.status(202, "RFC Content-Range");
    assert_eq!(r.header("range"), Some("0-19"));

    // A PATCH without Content-Range streams and appends.
    let r = app
        .send_stream(
            "PATCH",
            &loc,
            &[],
            vec![data[20..25].to_vec(), data[25..30].to_vec()],
        )
        .await;
    r.status(202, "streamed chunk");
    assert_eq!(r.header("range"), Some("0-29"));

    // The last chunk rides on the PUT.
    let r = app
        .send(
            "PUT",
            &format!("{loc}?digest={d}"),
            &[("content-range", "30-39")],
            data[30..].to_vec(),
        )
        .await;
    r.status(201, "final PUT");
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    let r = app.get(&format!("/v2/r/blobs/{d}")).await;
    r.status(200, "GET assembled blob");
    assert_eq!(r.body.as_ref(), data.as_slice());
}

#[tokio::test]
async fn final_put_with_wrong_digest_ends_the_session() {
    let app = App::new().await;
    let loc = app.start_upload("r").await;
    app.send("PATCH", &loc, &[], "some bytes")
        .await
        .status(202, "PATCH");
    let wrong = sha256(b"other bytes");
    app.send("PUT", &format!("{loc}?digest={wrong}"), &[], "")
        .await
        .error(400, "DIGEST_INVALID", "PUT with wrong digest");
    app.send("PATCH", &loc, &[], "more").await.error(
        404,
        "BLOB_UPLOAD_UNKNOWN",
        "PATCH after failed PUT",
    );
    app.get(&loc)
        .await
        .error(404, "BLOB_UPLOAD_UNKNOWN", "status after failed PUT");
    for d in [wrong, sha256(b"some bytes")] {
        app.get(&format!("/v2/r/blobs/{d}")).await.error(
            404,
            "BLOB_UNKNOWN",
            "blob of a failed upload",
        );
    }
}

#[tokio::test]
async fn final_put_needs_a_valid_digest() {
    let app = App::new().await;
    let loc = app.start_upload("r").await;
    app.send("PATCH", &loc, &[], "abc")
        .await
        .status(202, "PATCH");
    for query in ["", "?digest=", "?digest=sha256:abc", "?digest=latest"] {
        app.send("PUT", &format!("{loc}{query}"), &[], "")
            .await
            .error(400, "DIGEST_INVALID", &format!("PUT {query:?}"));
    }
    // A request that names no valid digest does not end the session.
    let r = app.get(&loc).await;
    r.status(204, "status after digest-less PUTs");
    assert_eq!(r.header("range"), Some("0-2"));
    app.send("PUT", &format!("{loc}?digest={}", sha256(b"abc")), &[], "")
        .await
        .status(201, "PUT with digest");
}

#[tokio::test]
async fn cancelled_upload_is_gone() {
    let app = App::new().await;
    let loc = app.start_upload("r").await;
    app.send("PATCH", &loc, &[], "abc")
        .await
        .status(202, "PATCH");
    let r = app.delete(&loc).await;
    r.status(204, "cancel");
    app.get(&loc)
        .await
        .error(404, "BLOB_UPLOAD_UNKNOWN", "status after cancel");
    app.send("PATCH", &loc, &[], "def").await.error(
        404,
        "BLOB_UPLOAD_UNKNOWN",
        "PATCH after cancel",
    );
    app.send("PUT", &format!("{loc}?digest={}", sha256(b"abc")), &[], "")
        .await
        .error(404, "BLOB_UPLOAD_UNKNOWN", "PUT after cancel");
    app.delete(&loc)
        .await
        .error(404, "BLOB_UPLOAD_UNKNOWN", "cancel twice");
    app.get(&format!("/v2/r/blobs/{}", sha256(b"abc")))
        .await
        .error(404, "BLOB_UNKNOWN", "cancelled bytes");
}

#[tokio::test]
async fn upload_sessions_are_bound_to_their_repository() {
    let app = App::new().await;
    let loc = app.start_upload("a").await;
    let id = loc.rsplit('/').next().expect("id").to_string();
    app.send("PATCH", &loc, &[("content-range", "0-4")], "hello")
        .await
        .status(202, "PATCH in a");
    let d = sha256(b"hello world");
    let other = format!("/v2/b/blobs/uploads/{id}");
    for (method, path, body) in [
        ("GET", other.clone(), ""),
        ("PATCH", other.clone(), "xx"),
        ("PUT", format!("{other}?digest={d}"), " world"),
        ("DELETE", other.clone(), ""),
    ] {
        app.send(method, &path, &[], body).await.error(
            404,
            "BLOB_UPLOAD_UNKNOWN",
            &format!("{method} under repo b"),
        );
    }
    // A well-formed id pier never issued.
    app.get("/v2/a/blobs/uploads/0f0e8a4c-3c5b-4a8e-9d36-4d0d6bb5a1a1")
        .await
        .error(404, "BLOB_UPLOAD_UNKNOWN", "unknown id");
    // The owner's session is untouched; ids are case-insensitive hex.
    let upper = format!("/v2/a/blobs/uploads/{}", id.to_ascii_uppercase());
    assert_eq!(app.get(&upper).await.header("range"), Some("0-4"));
    app.send("PUT", &format!("{loc}?digest={d}"), &[], " world")
        .await
        .status(201, "PUT in a");
    app.get(&format!("/v2/a/blobs/{d}"))
        .await
        .status(200, "blob in a");
    app.get(&format!("/v2/b/blobs/{d}"))
        .await
        .error(404, "BLOB_UNKNOWN", "blob not in b");
}

#[tokio::test]
async fn chunks_of_one_session_never_run_side_by_side() {
    use futures::channel::mpsc::unbounded;
    use futures::StreamExt;
    use std::time::Duration;

    let app = App::new().await;
    let loc = app.start_upload("a").await;
    let id = loc.rsplit('/').next().expect("id").to_string();
    let received = || {
        app.state
            .metrics
            .received_bytes
            .get_or_create(&pier_server::metrics::KindLabels { kind: "blob" })
            .get()
    };
    let wait_received = |n: u64| async move {
        for _ in 0..1000 {
            if received() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(received(), n, "bytes streamed in so far");
    };
    // Chunk bodies the test holds open: each keeps the session busy until it is sent.
    let held = || {
        let (tx, rx) = unbounded::<bytes::Bytes>();
        (
            tx,
            axum::body::Body::from_stream(rx.map(Ok::<_, std::io::Error>)),
        )
    };
    let (tx1, body1) = held();
    let (tx2, body2) = held();
    let foreign_path = format!("/v2/b/blobs/uploads/{id}");
    // Polled in this order: the first chunk takes the session, then a request under another
    // repository and the owner's second chunk queue behind it.
    let first = app.send_body("PATCH", &loc, &[("content-range", "0-9")], body1);
    let foreign = app.send("PATCH", &foreign_path, &[], "zz");
    let second = app.send_body("PATCH", &loc, &[("content-range", "10-19")], body2);
    let driver = async {
        tx1.unbounded_send("01234".into()).expect("send");
        wait_received(5).await;
        tx1.unbounded_send("56789".into()).expect("send");
        drop(tx1);
        // The first chunk ends, the foreign request is refused, the second chunk starts.
        tx2.unbounded_send("abcde".into()).expect("send");
        wait_received(15).await;
        // The refused foreign request must not have released the session to newcomers.
        let third = app.send("PATCH", &loc, &[("content-range", "10-14")], "vwxyz");
        assert!(
            tokio::time::timeout(Duration::from_millis(300), third)
                .await
                .is_err(),
            "a third PATCH ran while the second still held the session"
        );
        tx2.unbounded_send("fghij".into()).expect("send");
        drop(tx2);
    };
    let (first, foreign, second, ()) = tokio::join!(first, foreign, second, driver);
    first.status(202, "first chunk");
    assert_eq!(first.header("range"), Some("0-9"));
    foreign.error(404, "BLOB_UPLOAD_UNKNOWN", "PATCH under repo b");
    second.status(202, "second chunk");
    assert_eq!(second.header("range"), Some("0-19"));
    let d = sha256(b"0123456789abcdefghij");
    app.send("PUT", &format!("{loc}?digest={d}"), &[], "")
        .await
        .status(201, "finish");
    assert_eq!(
        app.get(&format!("/v2/a/blobs/{d}")).await.body.as_ref(),
        b"0123456789abcdefghij"
    );
}

#[tokio::test]
async fn sha512_blobs_push_and_pull() {
    let app = App::new().await;
    // Monolithic.
    let data = b"a blob addressed by sha512".to_vec();
    let d = sha512(&data);
    let r = app
        .send(
            "POST",
            &format!("/v2/r/blobs/uploads/?digest={d}"),
            &[],
            data.clone(),
        )
        .await;
    r.status(201, "sha512 monolithic");
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    let r = app.get(&format!("/v2/r/blobs/{d}")).await;
    r.status(200, "GET sha512");
    assert_eq!(r.body.as_ref(), data.as_slice());
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));

    // Chunked, finished with a sha512 digest.
    let data2 = b"another, pushed in two chunks".to_vec();
    let d2 = sha512(&data2);
    let loc = app.start_upload("r").await;
    app.send("PATCH", &loc, &[], data2[..7].to_vec())
        .await
        .status(202, "chunk");
    app.send(
        "PUT",
        &format!("{loc}?digest={d2}"),
        &[],
        data2[7..].to_vec(),
    )
    .await
    .status(201, "sha512 final PUT");
    let r = app.get(&format!("/v2/r/blobs/{d2}")).await;
    r.status(200, "GET chunked sha512");
    assert_eq!(r.body.as_ref(), data2.as_slice());

    // The wrong sha512 is refused.
    app.send(
        "POST",
        &format!("/v2/r/blobs/uploads/?digest={}", sha512(b"x")),
        &[],
        "y",
    )
    .await
    .error(400, "DIGEST_INVALID", "wrong sha512");
}

#[tokio::test]
async fn blob_size_limit_is_413() {
    let app = App::with_limits(pier_registry::Limits {
        max_manifest_bytes: MANIFEST_LIMIT,
        max_blob_bytes: Some(10),
    })
    .await;
    let big = b"eleven byte".to_vec();
    app.send(
        "POST",
        &format!("/v2/r/blobs/uploads/?digest={}", sha256(&big)),
        &[],
        big.clone(),
    )
    .await
    .error(413, "SIZE_INVALID", "monolithic over the limit");
    app.get(&format!("/v2/r/blobs/{}", sha256(&big)))
        .await
        .error(404, "BLOB_UNKNOWN", "too large blob");
    let loc = app.start_upload("r").await;
    app.send("PATCH", &loc, &[], big[..6].to_vec())
        .await
        .status(202, "first chunk");
    app.send("PATCH", &loc, &[], big[6..].to_vec()).await.error(
        413,
        "SIZE_INVALID",
        "chunks over the limit",
    );
    app.push_blob("r", b"ten bytes!").await;
}

// ---- cross-repository mount ----

#[tokio::test]
async fn cross_repo_mount() {
    let app = App::new().await;
    let data = b"shared base layer".to_vec();
    let d = app.push_blob("src", &data).await;

    let r = app
        .send(
            "POST",
            &format!("/v2/dst/blobs/uploads/?mount={d}&from=src"),
            &[],
            "",
        )
        .await;
    r.status(201, "mount");
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/dst/blobs/{d}").as_str())
    );
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    let r = app.get(&format!("/v2/dst/blobs/{d}")).await;
    r.status(200, "mounted blob");
    assert_eq!(r.body.as_ref(), data.as_slice());

    // Where `from` cannot supply the blob, the client gets an upload session instead.
    let absent = sha256(b"never pushed");
    for query in [
        format!("mount={absent}&from=src"),
        format!("mount={d}&from=elsewhere"),
        format!("mount={d}&from=NotAName"),
        format!("mount={d}"),
    ] {
        let r = app
            .send("POST", &format!("/v2/dst2/blobs/uploads/?{query}"), &[], "")
            .await;
        r.status(202, &query);
        let loc = r.header("location").expect("Location");
        assert!(loc.starts_with("/v2/dst2/blobs/uploads/"), "{query}: {loc}");
        app.get(loc).await.status(204, "fallback session exists");
    }
    app.get(&format!("/v2/dst2/blobs/{d}")).await.error(
        404,
        "BLOB_UNKNOWN",
        "failed mounts link nothing",
    );

    for bad in ["sha256:abc", "", "nonsense"] {
        app.send(
            "POST",
            &format!("/v2/dst/blobs/uploads/?mount={bad}&from=src"),
            &[],
            "",
        )
        .await
        .error(400, "DIGEST_INVALID", &format!("mount={bad:?}"));
    }
}

// ---- blob reads ----

#[tokio::test]
async fn blob_range_requests() {
    let app = App::new().await;
    let data: Vec<u8> = (0..100u8).collect();
    let d = app.push_blob("r", &data).await;
    let path = format!("/v2/r/blobs/{d}");

    let whole = app.get(&path).await;
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));

    // (Range, status, Content-Range, served slice)
    let cases: &[(&str, u16, Option<&str>, std::ops::Range<usize>)] = &[
        ("bytes=10-19", 206, Some("bytes 10-19/100"), 10..20),
        ("bytes=0-0", 206, Some("bytes 0-0/100"), 0..1),
        ("bytes=99-99", 206, Some("bytes 99-99/100"), 99..100),
        ("bytes=-10", 206, Some("bytes 90-99/100"), 90..100),
        ("bytes=-1000", 206, Some("bytes 0-99/100"), 0..100),
        ("bytes=95-", 206, Some("bytes 95-99/100"), 95..100),
        ("bytes=90-1000", 206, Some("bytes 90-99/100"), 90..100),
        ("bytes=0-1,5-6", 200, None, 0..100),
    ];
    for (range, status, content_range, slice) in cases {
        let r = app.send("GET", &path, &[("range", range)], "").await;
        r.status(*status, range);
        assert_eq!(r.header("content-range"), *content_range, "{range}");
        assert_eq!(r.body.as_ref(), &data[slice.clone()], "{range}");
        assert_eq!(
            r.header("content-length"),
            Some(slice.len().to_string().as_str()),
            "{range}"
        );
    }
    let r = app
        .send("HEAD", &path, &[("range", "bytes=10-19")], "")
        .await;
    r.status(206, "HEAD with Range");
    assert_eq!(r.header("content-length"), Some("10"));
    assert_eq!(r.header("content-range"), Some("bytes 10-19/100"));
    assert!(r.body.is_empty());

    // Unsatisfiable and malformed ranges: 416 with the size the client may ask within.
    for range in [
        "bytes=100-",
        "bytes=100-200",
        "bytes=-0",
        "bytes=19-10",
        "items=0-1",
        "bytes=a-b",
        "bytes=-",
        "bytes 0-1",
        "bytes=99999999999999999999999-",
    ] {
        let r = app.send("GET", &path, &[("range", range)], "").await;
        r.error(416, "RANGE_INVALID", range);
        assert_eq!(r.header("content-range"), Some("bytes */100"), "{range}");
    }
}

/// Blobs over a real socket, where plain HTTP/1.1 sends them from the file with the kernel and
/// HTTP/2 copies them: whole, in ranges that cross the body's frames, one after another on one
/// connection, and pipelined. Patterned bytes, so a stand-in frame sent in place of the file
/// (zeros) could not pass.
#[tokio::test]
async fn blobs_over_a_socket_arrive_exact_on_http1_pipelined_and_http2() {
    let app = App::new().await;
    let len = 9 * 1024 * 1024 + 17;
    let data: Vec<u8> = (0..len).map(|i| (i % 251 + i / 65536) as u8).collect();
    let d = app.push_blob("r", &data).await;
    let tiny = app.push_blob("r", b"tiny").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(pier_server::serve(
        listener,
        app.state.clone(),
        std::future::pending(),
    ));
    let four = 4 * 1024 * 1024;
    let cases: Vec<(Option<String>, std::ops::Range<usize>)> = vec![
        (None, 0..len),
        (
            Some(format!("bytes={}-{}", four - 3, 2 * four + 2)),
            four - 3..2 * four + 3,
        ),
        (Some("bytes=-5".into()), len - 5..len),
        (Some("bytes=0-0".into()), 0..1),
        (Some(format!("bytes={four}-")), four..len),
    ];
    for http2 in [false, true] {
        let client = if http2 {
            reqwest::Client::builder().http2_prior_knowledge()
        } else {
            reqwest::Client::builder().http1_only()
        }
        .build()
        .expect("client");
        for (range, slice) in &cases {
            let mut req = client.get(format!("http://{addr}/v2/r/blobs/{d}"));
            if let Some(r) = range {
                req = req.header("range", r);
            }
            let resp = req.send().await.expect("GET");
            assert!(resp.status().is_success(), "{range:?}: {}", resp.status());
            let body = resp.bytes().await.expect("body");
            assert!(body[..] == data[slice.clone()], "http2 {http2}, {range:?}");
        }
        let resp = client
            .get(format!("http://{addr}/v2/r/blobs/{tiny}"))
            .send()
            .await
            .expect("GET tiny");
        assert_eq!(resp.bytes().await.expect("body").as_ref(), b"tiny");
    }

    // Pipelined: three requests in one write; three responses back to back, in order.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let ask = |path: &str, range: &str| format!("GET {path} HTTP/1.1\r\nhost: x\r\n{range}\r\n");
    let big = format!("/v2/r/blobs/{d}");
    let small = format!("/v2/r/blobs/{tiny}");
    let reqs = ask(&big, "range: bytes=10-4194400\r\n")
        + &ask(&small, "")
        + &ask(&big, "connection: close\r\n");
    sock.write_all(reqs.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    sock.read_to_end(&mut got).await.expect("read");
    let mut rest = &got[..];
    for want in [&data[10..4194401], &b"tiny"[..], &data[..]] {
        let end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head");
        let head = std::str::from_utf8(&rest[..end]).expect("head is text");
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_owned)
            })
            .expect("content-length")
            .parse()
            .expect("a number");
        assert_eq!(length, want.len(), "{head}");
        let body = &rest[end + 4..end + 4 + length];
        assert!(body == want, "pipelined body after {head}");
        rest = &rest[end + 4 + length..];
    }
    assert!(
        rest.is_empty(),
        "{} bytes after the last response",
        rest.len()
    );
}

#[tokio::test]
async fn blob_visibility_and_delete() {
    let app = App::new().await;
    let unknown = sha256(b"nobody pushed this");
    app.get(&format!("/v2/a/blobs/{unknown}"))
        .await
        .error(404, "BLOB_UNKNOWN", "unknown blob");
    app.head(&format!("/v2/a/blobs/{unknown}"))
        .await
        .status(404, "HEAD unknown blob");

    let d = app.push_blob("a", b"only in a").await;
    app.get(&format!("/v2/b/blobs/{d}"))
        .await
        .error(404, "BLOB_UNKNOWN", "blob of a read in b");
    app.head(&format!("/v2/b/blobs/{d}"))
        .await
        .status(404, "HEAD blob of a in b");
    app.delete(&format!("/v2/b/blobs/{d}")).await.error(
        404,
        "BLOB_UNKNOWN",
        "DELETE blob of a in b",
    );
    app.get(&format!("/v2/a/blobs/{d}"))
        .await
        .status(200, "still in a");

    app.delete(&format!("/v2/a/blobs/{d}"))
        .await
        .status(202, "DELETE blob");
    app.get(&format!("/v2/a/blobs/{d}"))
        .await
        .error(404, "BLOB_UNKNOWN", "GET after DELETE");
    app.delete(&format!("/v2/a/blobs/{d}"))
        .await
        .error(404, "BLOB_UNKNOWN", "DELETE twice");
    app.delete("/v2/a/blobs/sha256:abc")
        .await
        .error(400, "DIGEST_INVALID", "DELETE bad digest");
    app.get("/v2/a/blobs/sha256:ABC")
        .await
        .error(400, "DIGEST_INVALID", "GET bad digest");
}

// ---- manifests ----

#[tokio::test]
async fn manifest_bytes_are_served_exactly() {
    let app = App::new().await;
    let config = br#"{"architecture":"arm64","os":"linux"}"#.to_vec();
    let layer = b"layer bytes".to_vec();
    let cd = app.push_blob("r", &config).await;
    let ld = app.push_blob("r", &layer).await;
    // Odd whitespace, key order and a trailing newline: re-serialising would change the digest.
    let body = format!(
        "{{\n   \"layers\" : [ {{ \"size\":{},\"digest\":\"{ld}\",  \"mediaType\":\"{OCI_LAYER}\" }} ],\n\t\"schemaVersion\":   2 ,\n  \"config\":{{\"digest\":\"{cd}\",\"size\":{},\"mediaType\":\"{OCI_CONFIG}\"}},\n  \"mediaType\" : \"{OCI_MANIFEST}\",\n  \"annotations\": {{\"z\":\"1\",\"a\":\"2\"}}\n}}\n",
        layer.len(),
        config.len()
    );
    let digest = sha256(body.as_bytes());

    let r = app
        .put_manifest("r", "latest", OCI_MANIFEST, body.clone())
        .await;
    r.status(201, "PUT by tag");
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/r/manifests/{digest}").as_str())
    );
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(r.header("oci-subject"), None);

    for reference in ["latest", digest.as_str()] {
        let path = format!("/v2/r/manifests/{reference}");
        let r = app
            .send("GET", &path, &[("accept", OCI_MANIFEST)], "")
            .await;
        r.status(200, &path);
        assert_eq!(r.body.as_ref(), body.as_bytes(), "{path}");
        assert_eq!(r.header("content-type"), Some(OCI_MANIFEST), "{path}");
        assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
        assert_eq!(
            r.header("content-length"),
            Some(body.len().to_string().as_str())
        );

        let r = app.head(&path).await;
        r.status(200, &format!("HEAD {path}"));
        assert!(r.body.is_empty());
        assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
        assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
        assert_eq!(
            r.header_all("content-length"),
            vec![body.len().to_string()],
            "HEAD {path}: one Content-Length"
        );
    }
}

#[tokio::test]
async fn manifest_media_types_round_trip() {
    let app = App::new().await;
    let config = br#"{"os":"linux"}"#.to_vec();
    let layer = b"a layer".to_vec();
    app.push_blob("r", &config).await;
    app.push_blob("r", &layer).await;

    let oci = image(
        OCI_MANIFEST,
        desc(OCI_CONFIG, &config),
        vec![desc(OCI_LAYER, &layer)],
    );
    let docker = image(
        DOCKER_MANIFEST,
        desc(DOCKER_CONFIG, &config),
        vec![desc(DOCKER_LAYER, &layer)],
    );
    let oci_bytes = oci.to_string();
    let docker_bytes = docker.to_string();
    let oci_index = index(OCI_INDEX, vec![desc(OCI_MANIFEST, oci_bytes.as_bytes())]);
    let docker_list = index(
        DOCKER_LIST,
        vec![desc(DOCKER_MANIFEST, docker_bytes.as_bytes())],
    );
    // Children before the indexes that reference them.
    for (tag, manifest, media_type) in [
        ("oci", &oci, OCI_MANIFEST),
        ("docker", &docker, DOCKER_MANIFEST),
        ("oci-index", &oci_index, OCI_INDEX),
        ("docker-list", &docker_list, DOCKER_LIST),
    ] {
        let bytes = manifest.to_string();
        let d = app.push_manifest("r", tag, manifest).await;
        for reference in [tag, d.as_str()] {
            let r = app.get(&format!("/v2/r/manifests/{reference}")).await;
            r.status(200, reference);
            assert_eq!(r.header("content-type"), Some(media_type), "{reference}");
            assert_eq!(r.body.as_ref(), bytes.as_bytes(), "{reference}");
        }
    }

    // No mediaType field: the Content-Type of the PUT decides.
    let mut bare = oci.clone();
    bare.as_object_mut().expect("object").remove("mediaType");
    let r = app
        .put_manifest("r", "bare", OCI_MANIFEST, bare.to_string())
        .await;
    r.status(201, "manifest without mediaType");
    assert_eq!(
        app.get("/v2/r/manifests/bare").await.header("content-type"),
        Some(OCI_MANIFEST)
    );
    // A Content-Type naming another manifest type than the body is refused.
    app.put_manifest("r", "clash", DOCKER_MANIFEST, oci.to_string())
        .await
        .error(400, "MANIFEST_INVALID", "Content-Type clash");
}

#[tokio::test]
async fn manifest_push_errors() {
    let app = App::new().await;
    let config = br#"{"os":"linux"}"#.to_vec();
    let layer = b"present layer".to_vec();
    app.push_blob("r", &config).await;
    app.push_blob("r", &layer).await;
    app.push_blob("other", b"layer only in other").await;
    let good = image(
        OCI_MANIFEST,
        desc(OCI_CONFIG, &config),
        vec![desc(OCI_LAYER, &layer)],
    )
    .to_string();
    let missing_layer = image(
        OCI_MANIFEST,
        desc(OCI_CONFIG, &config),
        vec![desc(OCI_LAYER, b"never pushed")],
    )
    .to_string();
    let missing_config = image(
        OCI_MANIFEST,
        desc(OCI_CONFIG, b"no such config"),
        vec![desc(OCI_LAYER, &layer)],
    )
    .to_string();
    let layer_of_other_repo = image(
        OCI_MANIFEST,
        desc(OCI_CONFIG, &config),
        vec![desc(OCI_LAYER, b"layer only in other")],
    )
    .to_string();
    let index_missing_child = index(
        OCI_INDEX,
        vec![desc(OCI_MANIFEST, b"{\"no\":\"such manifest\"}")],
    )
    .to_string();
    let mut too_big = image(
        OCI_MANIFEST,
        desc(OCI_CONFIG, &config),
        vec![desc(OCI_LAYER, &layer)],
    );
    too_big["annotations"] = json!({ "pad": "x".repeat(MANIFEST_LIMIT as usize) });
    let too_big = too_big.to_string();
    let wrong_digest = sha256(b"not the manifest");

    // (reference, body, status, code)
    let cases: Vec<(String, String, u16, &str)> = vec![
        (wrong_digest.clone(), good.clone(), 400, "DIGEST_INVALID"),
        ("t".into(), missing_layer, 400, "MANIFEST_BLOB_UNKNOWN"),
        ("t".into(), missing_config, 400, "MANIFEST_BLOB_UNKNOWN"),
        (
            "t".into(),
            layer_of_other_repo,
            400,
            "MANIFEST_BLOB_UNKNOWN",
        ),
        (
            "t".into(),
            index_missing_child,
            400,
            "MANIFEST_BLOB_UNKNOWN",
        ),
        ("t".into(), "not json".into(), 400, "MANIFEST_INVALID"),
        ("t".into(), "{}".into(), 400, "MANIFEST_INVALID"),
        (
            "t".into(),
            good.replace("\"schemaVersion\":2", "\"schemaVersion\":1"),
            400,
            "MANIFEST_INVALID",
        ),
        (
            "t".into(),
            good.replace(&sha256(&layer), "sha256:1234"),
            400,
            "MANIFEST_INVALID",
        ),
        ("t".into(), too_big, 413, "SIZE_INVALID"),
        ("-bad".into(), good.clone(), 400, "MANIFEST_INVALID"),
        (".bad".into(), good.clone(), 400, "MANIFEST_INVALID"),
        ("a".repeat(129), good.clone(), 400, "MANIFEST_INVALID"),
        ("sha256:zz".into(), good.clone(), 400, "MANIFEST_INVALID"),
        ("ta%20g".into(), good.clone(), 400, "MANIFEST_INVALID"),
    ];
    for (reference, body, status, code) in &cases {
        let what = format!("PUT {reference:.40} ({code})");
        // The Content-Type a client sends: the body's own mediaType where it has one.
        let media_type = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["mediaType"].as_str().map(String::from))
            .unwrap_or_else(|| OCI_MANIFEST.to_string());
        app.put_manifest("r", reference, &media_type, body.clone())
            .await
            .error(*status, code, &what);
    }
    // Nothing was stored under the tag or the digest.
    app.get("/v2/r/manifests/t")
        .await
        .error(404, "MANIFEST_UNKNOWN", "tag after failed pushes");
    app.get(&format!("/v2/r/manifests/{wrong_digest}"))
        .await
        .error(404, "MANIFEST_UNKNOWN", "digest after failed push");
    // The same manifest by its true digest is fine.
    let r = app
        .put_manifest("r", &sha256(good.as_bytes()), OCI_MANIFEST, good.clone())
        .await;
    r.status(201, "PUT by the right digest");
    assert_eq!(
        r.header("docker-content-digest"),
        Some(sha256(good.as_bytes()).as_str())
    );
    // Pushing it to a repo without its blobs is not.
    app.put_manifest("other", "t", OCI_MANIFEST, good.clone())
        .await
        .error(400, "MANIFEST_BLOB_UNKNOWN", "blobs of r pushed in other");
}

#[tokio::test]
async fn descriptor_sizes_must_be_the_stored_sizes() {
    let app = App::new().await;
    let config = b"{}".to_vec();
    let layer = b"a layer".to_vec();
    app.push_blob("r", &config).await;
    app.push_blob("r", &layer).await;
    let mut lying_config = desc(OCI_CONFIG, &config);
    lying_config["size"] = json!(999);
    let lying = image(OCI_MANIFEST, lying_config, vec![desc(OCI_LAYER, &layer)]).to_string();
    let mut short_layer = desc(OCI_LAYER, &layer);
    short_layer["size"] = json!(1);
    let short = image(OCI_MANIFEST, desc(OCI_CONFIG, &config), vec![short_layer]).to_string();
    for (what, body) in [("config says 999", &lying), ("layer says 1", &short)] {
        let r = app.put_manifest("r", "t", OCI_MANIFEST, body.clone()).await;
        r.error(400, "MANIFEST_INVALID", what);
        assert!(
            r.text().contains("the stored content has"),
            "{what}: the message says why: {}",
            r.text()
        );
    }
    app.get("/v2/r/manifests/t").await.error(
        404,
        "MANIFEST_UNKNOWN",
        "nothing stored under the tag",
    );
    app.get(&format!("/v2/r/manifests/{}", sha256(lying.as_bytes())))
        .await
        .error(404, "MANIFEST_UNKNOWN", "nothing stored under the digest");
    // An index's descriptor of a child manifest is held to the child's size too.
    let (child, child_bytes) = app.push_image("r", "child", "c").await;
    let mut wrong_child = desc(OCI_MANIFEST, &child_bytes);
    wrong_child["size"] = json!(child_bytes.len() + 1);
    app.put_manifest(
        "r",
        "all",
        OCI_INDEX,
        index(OCI_INDEX, vec![wrong_child]).to_string(),
    )
    .await
    .error(400, "MANIFEST_INVALID", "index with a wrong child size");
    let right = index(OCI_INDEX, vec![desc(OCI_MANIFEST, &child_bytes)]);
    assert_eq!(right["manifests"][0]["digest"], json!(child));
    app.push_manifest("r", "all", &right).await;
}

#[tokio::test]
async fn manifest_size_limit_is_inclusive() {
    let app = App::new().await;
    let config = br#"{"os":"linux"}"#.to_vec();
    app.push_blob("r", &config).await;
    let mut m = image(OCI_MANIFEST, desc(OCI_CONFIG, &config), vec![]);
    m["annotations"] = json!({ "pad": "" });
    let base = m.to_string().len();
    m["annotations"]["pad"] = json!("x".repeat(MANIFEST_LIMIT as usize - base));
    let at_limit = m.to_string();
    assert_eq!(at_limit.len() as u64, MANIFEST_LIMIT);
    app.put_manifest("r", "at-limit", OCI_MANIFEST, at_limit)
        .await
        .status(201, "manifest of exactly the limit");
    m["annotations"]["pad"] = json!("x".repeat(MANIFEST_LIMIT as usize - base + 1));
    app.put_manifest("r", "over", OCI_MANIFEST, m.to_string())
        .await
        .error(413, "SIZE_INVALID", "one byte over");
    // Also when the body streams in without a length.
    let r = app
        .send_stream(
            "PUT",
            "/v2/r/manifests/over",
            &[("content-type", OCI_MANIFEST)],
            vec![m.to_string().into_bytes()],
        )
        .await;
    r.error(413, "SIZE_INVALID", "streamed, one byte over");
}

#[tokio::test]
async fn unknown_manifests_are_404() {
    let app = App::new().await;
    let (d, _) = app.push_image("a", "v1", "x").await;
    for path in [
        "/v2/a/manifests/nope".to_string(),
        format!("/v2/a/manifests/{}", sha256(b"nope")),
        "/v2/never/manifests/v1".to_string(),
        format!("/v2/b/manifests/{d}"),
        "/v2/b/manifests/v1".to_string(),
    ] {
        app.get(&path).await.error(404, "MANIFEST_UNKNOWN", &path);
        app.head(&path).await.status(404, &format!("HEAD {path}"));
        app.delete(&path)
            .await
            .error(404, "MANIFEST_UNKNOWN", &format!("DELETE {path}"));
    }
}

#[tokio::test]
async fn manifest_delete_by_tag_and_by_digest() {
    let app = App::new().await;
    let (d, bytes) = app.push_image("r", "one", "x").await;
    app.put_manifest("r", "two", OCI_MANIFEST, bytes.clone())
        .await
        .status(201, "second tag");

    // By tag: only the tag goes.
    app.delete("/v2/r/manifests/one")
        .await
        .status(202, "DELETE tag");
    app.get("/v2/r/manifests/one")
        .await
        .error(404, "MANIFEST_UNKNOWN", "deleted tag");
    let r = app.get(&format!("/v2/r/manifests/{d}")).await;
    r.status(200, "manifest after tag delete");
    assert_eq!(r.body.as_ref(), bytes.as_slice());
    app.get("/v2/r/manifests/two")
        .await
        .status(200, "other tag");
    assert_eq!(
        app.get("/v2/r/tags/list").await.json()["tags"],
        json!(["two"])
    );
    app.delete("/v2/r/manifests/one")
        .await
        .error(404, "MANIFEST_UNKNOWN", "DELETE tag twice");

    // By digest: the manifest and every tag on it.
    app.delete(&format!("/v2/r/manifests/{d}"))
        .await
        .status(202, "DELETE digest");
    app.get(&format!("/v2/r/manifests/{d}"))
        .await
        .error(404, "MANIFEST_UNKNOWN", "deleted digest");
    app.get("/v2/r/manifests/two")
        .await
        .error(404, "MANIFEST_UNKNOWN", "tag of deleted digest");
    assert_eq!(app.get("/v2/r/tags/list").await.json()["tags"], json!([]));
    app.delete(&format!("/v2/r/manifests/{d}")).await.error(
        404,
        "MANIFEST_UNKNOWN",
        "DELETE digest twice",
    );
}

// ---- listings ----

#[tokio::test]
async fn tags_list_sorted_and_paginated() {
    let app = App::new().await;
    let (_, bytes) = app.push_image("a/b", "seed", "x").await;
    let mut tags = vec!["v2", "latest", "v10", "A", "_x", "1.0", "v1.0-rc_1"];
    for t in &tags {
        app.put_manifest("a/b", t, OCI_MANIFEST, bytes.clone())
            .await
            .status(201, t);
    }
    tags.push("seed");
    tags.sort();

    let r = app.get("/v2/a/b/tags/list").await;
    r.status(200, "tags");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json(), json!({ "name": "a/b", "tags": tags }));
    assert_eq!(r.header("link"), None, "a complete list has no Link");

    // Follow Link headers from n=3 to the end.
    let mut seen: Vec<String> = Vec::new();
    let mut next = Some("/v2/a/b/tags/list?n=3".to_string());
    let mut pages = 0;
    while let Some(path) = next {
        let r = app.get(&path).await;
        r.status(200, &path);
        let page: Vec<String> =
            serde_json::from_value(r.json()["tags"].clone()).expect("tags array");
        assert!(page.len() <= 3, "{path}: {page:?}");
        next = r.header("link").map(|l| {
            let target = link_target(l);
            let last = page.last().expect("a page with a Link is not empty");
            assert_eq!(target, format!("/v2/a/b/tags/list?n=3&last={last}"));
            target
        });
        seen.extend(page);
        pages += 1;
    }
    assert_eq!(seen, tags);
    assert_eq!(pages, tags.len().div_ceil(3));

    let r = app.get("/v2/a/b/tags/list?n=8").await;
    assert_eq!(r.json()["tags"].as_array().map(Vec::len), Some(8));
    assert_eq!(r.header("link"), None, "n equal to the count: no next page");
    let r = app.get("/v2/a/b/tags/list?n=0").await;
    r.status(200, "n=0");
    assert_eq!(r.json()["tags"], json!([]));
    let r = app.get("/v2/a/b/tags/list?last=v1.0-rc_1").await;
    assert_eq!(r.json()["tags"], json!(["v10", "v2"]));
    let r = app.get("/v2/a/b/tags/list?last=zzz").await;
    assert_eq!(r.json()["tags"], json!([]));

    for n in ["abc", "-1", "1.5", "0x10"] {
        app.get(&format!("/v2/a/b/tags/list?n={n}")).await.error(
            400,
            "PAGINATION_NUMBER_INVALID",
            n,
        );
    }
    app.get("/v2/nobody/tags/list")
        .await
        .error(404, "NAME_UNKNOWN", "tags of an unknown repo");
    // A repository holding only blobs exists, with no tags.
    app.push_blob("blobs-only", b"b").await;
    let r = app.get("/v2/blobs-only/tags/list").await;
    r.status(200, "repo without tags");
    assert_eq!(r.json(), json!({ "name": "blobs-only", "tags": [] }));
}

#[tokio::test]
async fn catalog_sorted_and_paginated() {
    let app = App::new().await;
    let mut repos = vec!["c", "a", "b/x", "b", "a-b", "z/y/x"];
    for r in &repos {
        app.push_blob(r, r.as_bytes()).await;
    }
    repos.sort();
    let r = app.get("/v2/_catalog").await;
    r.status(200, "catalog");
    assert_eq!(r.json(), json!({ "repositories": repos }));

    let mut seen: Vec<String> = Vec::new();
    let mut next = Some("/v2/_catalog?n=4".to_string());
    while let Some(path) = next {
        let r = app.get(&path).await;
        r.status(200, &path);
        let page: Vec<String> =
            serde_json::from_value(r.json()["repositories"].clone()).expect("array");
        next = r.header("link").map(link_target);
        if let Some(n) = &next {
            let last = page.last().expect("non-empty page");
            // form-urlencoded writes "/" as %2F.
            assert_eq!(
                *n,
                format!("/v2/_catalog?n=4&last={}", last.replace('/', "%2F"))
            );
        }
        seen.extend(page);
    }
    assert_eq!(seen, repos);
    app.get("/v2/_catalog?n=x")
        .await
        .error(400, "PAGINATION_NUMBER_INVALID", "catalog n=x");
}

// ---- referrers ----

#[tokio::test]
async fn referrers_api() {
    let app = App::new().await;
    let (subject, subject_bytes) = app.push_image("r", "v1", "subject").await;
    let empty = b"{}".to_vec();
    app.push_blob("r", &empty).await;
    let subject_desc = json!({
        "mediaType": OCI_MANIFEST,
        "digest": subject,
        "size": subject_bytes.len(),
    });
    let artifact = |artifact_type: &str, note: &str| {
        let mut m = image(
            OCI_MANIFEST,
            desc(OCI_EMPTY, &empty),
            vec![desc(OCI_EMPTY, &empty)],
        );
        m["artifactType"] = json!(artifact_type);
        m["subject"] = subject_desc.clone();
        m["annotations"] = json!({ "org.example.note": note });
        m
    };

    // PUT of a referrer tells the client the subject is indexed.
    let sbom = artifact("application/vnd.example.sbom", "sbom");
    let sbom_bytes = sbom.to_string();
    let sbom_digest = sha256(sbom_bytes.as_bytes());
    let r = app
        .put_manifest("r", &sbom_digest, OCI_MANIFEST, sbom_bytes.clone())
        .await;
    r.status(201, "push sbom");
    assert_eq!(r.header("oci-subject"), Some(subject.as_str()));
    let sig = artifact("application/vnd.example.sig", "sig");
    let sig_digest = app.push_manifest("r", "sig", &sig).await;
    // An image with a subject and no artifactType: the config's media type stands in.
    let config = b"custom config".to_vec();
    app.push_blob("r", &config).await;
    let mut img = image(
        OCI_MANIFEST,
        desc("application/vnd.example.config", &config),
        vec![],
    );
    img["subject"] = subject_desc.clone();
    let img_digest = app.push_manifest("r", "img", &img).await;

    let listed = |r: &Resp| -> Vec<(String, String)> {
        assert_eq!(r.header("content-type"), Some(OCI_INDEX));
        let v = r.json();
        assert_eq!(v["schemaVersion"], json!(2));
        assert_eq!(v["mediaType"], json!(OCI_INDEX));
        let mut out: Vec<(String, String)> = v["manifests"]
            .as_array()
            .expect("manifests array")
            .iter()
            .map(|m| {
                (
                    m["digest"].as_str().unwrap_or_default().to_string(),
                    m["artifactType"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        out.sort();
        out
    };
    let sorted = |mut v: Vec<(String, String)>| {
        v.sort();
        v
    };

    let path = format!("/v2/r/referrers/{subject}");
    let r = app.get(&path).await;
    r.status(200, "referrers");
    assert_eq!(r.header("oci-filters-applied"), None);
    assert_eq!(
        listed(&r),
        sorted(vec![
            (sbom_digest.clone(), "application/vnd.example.sbom".into()),
            (sig_digest.clone(), "application/vnd.example.sig".into()),
            (img_digest.clone(), "application/vnd.example.config".into()),
        ])
    );
    // Each descriptor is complete.
    let v = r.json();
    let d = v["manifests"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["digest"] == json!(sbom_digest)))
        .expect("sbom listed")
        .clone();
    assert_eq!(d["mediaType"], json!(OCI_MANIFEST));
    assert_eq!(d["size"], json!(sbom_bytes.len()));
    assert_eq!(d["annotations"], json!({ "org.example.note": "sbom" }));

    // Filtered by artifactType.
    let r = app
        .get(&format!("{path}?artifactType=application/vnd.example.sbom"))
        .await;
    r.status(200, "filtered");
    assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
    assert_eq!(
        listed(&r),
        vec![(sbom_digest.clone(), "application/vnd.example.sbom".into())]
    );
    let r = app
        .get(&format!("{path}?artifactType=application/vnd.example.none"))
        .await;
    assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
    assert_eq!(listed(&r), Vec::<(String, String)>::new());

    // Unknown subject, unknown repository, other repository: an empty index.
    for p in [
        format!("/v2/r/referrers/{}", sha256(b"no subject")),
        format!("/v2/nobody/referrers/{subject}"),
        format!("/v2/r2/referrers/{subject}"),
    ] {
        let r = app.get(&p).await;
        r.status(200, &p);
        assert_eq!(listed(&r), Vec::<(String, String)>::new(), "{p}");
    }

    // Deleting a referrer takes it off the list.
    app.delete(&format!("/v2/r/manifests/{sbom_digest}"))
        .await
        .status(202, "delete sbom");
    assert_eq!(
        listed(&app.get(&path).await),
        sorted(vec![
            (sig_digest.clone(), "application/vnd.example.sig".into()),
            (img_digest, "application/vnd.example.config".into()),
        ])
    );
    // Deleting only its tag does not.
    app.delete("/v2/r/manifests/sig")
        .await
        .status(202, "delete sig tag");
    assert!(listed(&app.get(&path).await)
        .contains(&(sig_digest, "application/vnd.example.sig".to_string())));

    for bad in ["sha256:zz", "latest", "sha256:ABCDEF"] {
        app.get(&format!("/v2/r/referrers/{bad}"))
            .await
            .error(400, "DIGEST_INVALID", bad);
    }
}

#[tokio::test]
async fn referrer_may_precede_its_subject() {
    let app = App::new().await;
    let empty = b"{}".to_vec();
    app.push_blob("r", &empty).await;
    let subject = sha256(b"a subject not pushed yet");
    let mut m = image(OCI_MANIFEST, desc(OCI_EMPTY, &empty), vec![]);
    m["artifactType"] = json!("application/vnd.example.sig");
    m["subject"] = json!({ "mediaType": OCI_MANIFEST, "digest": subject, "size": 10 });
    let bytes = m.to_string();
    let r = app
        .put_manifest("r", "sig", OCI_MANIFEST, bytes.clone())
        .await;
    r.status(201, "referrer before subject");
    assert_eq!(r.header("oci-subject"), Some(subject.as_str()));
    let v = app.get(&format!("/v2/r/referrers/{subject}")).await.json();
    assert_eq!(v["manifests"][0]["digest"], json!(sha256(bytes.as_bytes())));
}

// ---- names ----

#[tokio::test]
async fn multi_segment_names() {
    let app = App::new().await;
    for name in [
        "a/b/c/d",
        "x/blobs",
        "tags",
        "library/uploads",
        "m/manifests",
    ] {
        let loc = app.start_upload(name).await;
        assert!(
            loc.starts_with(&format!("/v2/{name}/blobs/uploads/")),
            "{name}: {loc}"
        );
        let data = format!("blob of {name}").into_bytes();
        let d = sha256(&data);
        app.send("PATCH", &loc, &[], data.clone())
            .await
            .status(202, name);
        let r = app.send("PUT", &format!("{loc}?digest={d}"), &[], "").await;
        r.status(201, name);
        assert_eq!(
            r.header("location"),
            Some(format!("/v2/{name}/blobs/{d}").as_str())
        );
        assert_eq!(
            app.get(&format!("/v2/{name}/blobs/{d}"))
                .await
                .body
                .as_ref(),
            data
        );

        let (md, _) = app.push_image(name, "v1", name).await;
        let r = app.get(&format!("/v2/{name}/manifests/v1")).await;
        r.status(200, name);
        assert_eq!(r.header("docker-content-digest"), Some(md.as_str()));
        assert_eq!(
            app.get(&format!("/v2/{name}/tags/list")).await.json(),
            json!({ "name": name, "tags": ["v1"] })
        );
        app.get(&format!("/v2/{name}/referrers/{md}"))
            .await
            .status(200, name);
    }
    let catalog = app.get("/v2/_catalog").await.json();
    assert_eq!(
        catalog["repositories"],
        json!([
            "a/b/c/d",
            "library/uploads",
            "m/manifests",
            "tags",
            "x/blobs"
        ])
    );
}

#[tokio::test]
async fn invalid_names_are_400_name_invalid() {
    let app = App::new().await;
    let long = format!("/v2/{}/tags/list", "a".repeat(256));
    for path in [
        "/v2/Upper/tags/list",
        "/v2/a/B/manifests/latest",
        "/v2/../x/manifests/latest",
        "/v2/a/../x/manifests/latest",
        "/v2/./x/manifests/latest",
        "/v2/%2e%2e/x/manifests/latest",
        "/v2/a/%2e%2e/manifests/latest",
        "/v2/a%2fb/tags/list",
        "/v2/a//b/tags/list",
        "/v2//tags/list",
        "/v2/a_/tags/list",
        "/v2/-a/tags/list",
        "/v2/a..b/tags/list",
        "/v2/a%20b/tags/list",
        long.as_str(),
    ] {
        app.get(path).await.error(400, "NAME_INVALID", path);
    }
    app.send("POST", "/v2/Bad/blobs/uploads/", &[], "")
        .await
        .error(400, "NAME_INVALID", "upload to a bad name");
    app.put_manifest("../etc", "latest", OCI_MANIFEST, "{}")
        .await
        .error(400, "NAME_INVALID", "manifest under ../etc");
}

#[tokio::test]
async fn path_traversal_never_reaches_storage() {
    let app = App::new().await;
    // A real blob, so a traversal that resolved to it would show up as a 200.
    let d = app.push_blob("a", b"secret").await;
    let hex = d.trim_start_matches("sha256:");
    for (path, status, code) in [
        (
            "/v2/a/blobs/sha256:../../etc/passwd".to_string(),
            404,
            "NOT_FOUND",
        ),
        (format!("/v2/a/blobs/sha256:{hex}/.."), 404, "NOT_FOUND"),
        (
            "/v2/a/blobs/sha256:..%2f..%2fetc".to_string(),
            400,
            "DIGEST_INVALID",
        ),
        (
            format!("/v2/a/blobs/sha256:..%2f{hex}"),
            400,
            "DIGEST_INVALID",
        ),
        // A read of a reference that cannot exist is 404; only a push of one is 400.
        (
            "/v2/a/manifests/sha256:..%2f..".to_string(),
            404,
            "MANIFEST_UNKNOWN",
        ),
        ("/v2/a/manifests/..".to_string(), 404, "MANIFEST_UNKNOWN"),
        ("/v2/a/referrers/sha256:../x".to_string(), 404, "NOT_FOUND"),
        ("/v2/a/blobs/uploads/../../x".to_string(), 404, "NOT_FOUND"),
        (
            "/v2/a/blobs/uploads/..%2f..%2fx".to_string(),
            404,
            "NOT_FOUND",
        ),
        (format!("/v2/b/../a/blobs/{d}"), 400, "NAME_INVALID"),
        (format!("/v2/b/%2e%2e/a/blobs/{d}"), 400, "NAME_INVALID"),
    ] {
        app.get(&path).await.error(status, code, &path);
    }
}

// ---- health, readiness, metrics ----

#[tokio::test]
async fn health_and_readiness() {
    let app = App::new().await;
    let r = app.get("/healthz").await;
    r.status(200, "healthz");
    assert_eq!(r.text(), "ok\n");
    app.get("/readyz").await.status(200, "readyz");
    app.send("POST", "/healthz", &[], "")
        .await
        .status(405, "POST /healthz");
    app.state
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    app.get("/readyz")
        .await
        .status(503, "readyz while draining");
    app.get("/healthz")
        .await
        .status(200, "healthz while draining");
}

#[tokio::test]
async fn metrics_reflect_requests_store_and_sessions() {
    let app = App::new().await;
    let data = vec![7u8; 1234];
    let d = app.push_blob("r", &data).await;
    app.get(&format!("/v2/r/blobs/{d}"))
        .await
        .status(200, "GET blob");
    app.get("/v2/r/manifests/nope")
        .await
        .status(404, "GET unknown manifest");
    app.get("/nowhere").await.status(404, "unknown path");

    let r = app.get("/metrics").await;
    r.status(200, "metrics");
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{:?}",
        r.header("content-type")
    );
    let text = r.text();
    for series in [
        r#"pier_http_requests_total{route="upload_start",method="POST",status="201"} 1"#,
        r#"pier_http_requests_total{route="blob",method="GET",status="200"} 1"#,
        r#"pier_http_requests_total{route="manifest",method="GET",status="404"} 1"#,
        r#"pier_http_requests_total{route="unknown",method="GET",status="404"} 1"#,
        r#"pier_served_bytes_total{kind="blob",source="local"} 1234"#,
        r#"pier_received_bytes_total{kind="blob"} 1234"#,
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
    assert!(text.contains("pier_http_request_duration_seconds"));
    assert_eq!(metric(&text, "pier_store_size_bytes"), 1234.0);
    assert_eq!(metric(&text, "pier_store_blobs"), 1.0);
    assert_eq!(metric(&text, "pier_upload_sessions_open"), 0.0);

    // Open sessions are counted until they finish or are cancelled.
    let one = app.start_upload("r").await;
    let two = app.start_upload("r").await;
    let a = &app;
    let open =
        || async move { metric(&a.get("/metrics").await.text(), "pier_upload_sessions_open") };
    assert_eq!(open().await, 2.0);
    app.delete(&one).await.status(204, "cancel");
    assert_eq!(open().await, 1.0);
    // Failed requests on a session, or on someone else's, change nothing.
    app.delete(&one).await.status(404, "cancel twice");
    app.send("PUT", &two, &[], "")
        .await
        .status(400, "PUT without digest");
    assert_eq!(open().await, 1.0);
    app.send("PUT", &format!("{two}?digest={}", sha256(b"")), &[], "")
        .await
        .status(201, "finish");
    assert_eq!(open().await, 0.0);
    // A failed verification ends the session too.
    let three = app.start_upload("r").await;
    app.send("PUT", &format!("{three}?digest={}", sha256(b"x")), &[], "")
        .await
        .status(400, "wrong digest");
    assert_eq!(open().await, 0.0);
    let text = app.get("/metrics").await.text();
    assert_eq!(metric(&text, "pier_store_blobs"), 2.0, "the empty blob");
    assert_eq!(metric(&text, "pier_store_size_bytes"), 1234.0);
}

#[tokio::test]
async fn manifest_bytes_are_counted() {
    let app = App::new().await;
    let (d, bytes) = app.push_image("r", "v1", "x").await;
    app.get(&format!("/v2/r/manifests/{d}"))
        .await
        .status(200, "GET manifest");
    app.head("/v2/r/manifests/v1").await.status(200, "HEAD");
    let text = app.get("/metrics").await.text();
    let n = bytes.len();
    for series in [
        format!(r#"pier_received_bytes_total{{kind="manifest"}} {n}"#),
        // The HEAD sends no bytes.
        format!(r#"pier_served_bytes_total{{kind="manifest",source="local"}} {n}"#),
    ] {
        assert!(text.contains(&series), "{series} missing from:\n{text}");
    }
}

#[tokio::test]
async fn below_the_free_space_floor_pushes_get_507_and_readiness_says_why() {
    let app = App::with_min_free(u64::MAX).await;
    let r = app.get("/readyz").await;
    r.status(503, "readyz below the floor");
    assert!(r.text().contains("below min_free_space"), "{}", r.text());
    app.get("/healthz")
        .await
        .status(200, "healthz stays liveness");
    let st = app.get("/api/v1/status").await;
    st.status(200, "status");
    let st = st.json();
    assert_eq!(st["ready"], json!(false), "{st}");
    assert_eq!(st["storage"]["writable"], json!(false), "{st}");
    assert!(st["not_ready_reasons"][0]
        .as_str()
        .is_some_and(|r| r.contains("below min_free_space")));
    assert!(
        st["node"]["name"].as_str().is_some_and(|n| !n.is_empty()),
        "{st}"
    );
    let data = b"layer bytes";
    let r = app
        .send(
            "POST",
            &format!("/v2/r/blobs/uploads/?digest={}", sha256(data)),
            &[],
            &data[..],
        )
        .await;
    r.error(507, "UNAVAILABLE", "push below the floor");
    assert!(r.text().contains("no space left on device"), "{}", r.text());
    app.send("POST", "/v2/r/blobs/uploads/", &[], "")
        .await
        .error(507, "UNAVAILABLE", "upload start below the floor");

    let app = App::with_min_free(0).await;
    app.get("/readyz").await.status(200, "readyz with no floor");
    let st = app.get("/api/v1/status").await.json();
    assert_eq!(st["ready"], json!(true), "{st}");
    assert_eq!(st["storage"]["writable"], json!(true), "{st}");
    assert_eq!(st["storage"]["min_free_bytes"], json!(0), "{st}");
    app.push_blob("r", data).await;
    let st = app.get("/api/v1/status").await.json();
    assert_eq!(st["cache"]["blobs"], json!(1), "{st}");
    assert_eq!(st["cache"]["bytes"], json!(data.len()), "{st}");
}

#[tokio::test]
async fn the_test_database_is_dropped_with_its_app() {
    if !backend::s3pg() {
        eprintln!("skipped: runs with PIER_TEST_BACKEND=s3pg (a database per test)");
        return;
    }
    let app = App::new().await;
    app.push_image("r", "t", "kept").await;
    let name = app.db.as_ref().expect("a database").db.name.clone();
    let admin = std::env::var("PIER_TEST_PG_URL").expect("PIER_TEST_PG_URL");
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let databases = || async {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_database WHERE datname = $1",
                &[&name],
            )
            .await
            .expect("query")
            .get(0);
        n
    };
    assert_eq!(databases().await, 1, "{name} is there while the app is");
    drop(app);
    assert_eq!(databases().await, 0, "{name} went with its app");
}
