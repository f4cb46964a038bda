//! Crash tier: the real `pier` binary, killed with SIGKILL while uploads stream into it and
//! stopped with SIGTERM while an upload is in flight. Needs no external tools.
//!
//! What was acknowledged (a 201 or a 202) must survive a kill exactly; what was not must vanish
//! without a trace or resume from the last acknowledged byte.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    digest_of, digest_of_file, error_code, gen_bytes, gen_digest, header, put_manifest, range_of,
    Launch, Pier, Trickle, KIB, MIB, OCI_CONFIG, OCI_LAYER_TAR, OCI_MANIFEST,
};
use reqwest::{header as h, StatusCode};
use serde_json::json;

const REPO: &str = "crash/app";
/// Declared length of each upload still streaming when pier is killed.
const INFLIGHT_LEN: u64 = 128 * MIB;
/// Pace of the slow bodies: 256 KiB every 20 ms, about 12 MiB/s each.
const TRICKLE_CHUNK: usize = 256 * 1024;
const TRICKLE_PAUSE: Duration = Duration::from_millis(20);

/// The registry API of one running pier, as a client sees it.
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(pier: &Pier) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: pier.url(),
        }
    }

    /// An absolute URL for a path or a `Location` value.
    fn url(&self, location: &str) -> String {
        if location.starts_with("http://") {
            location.to_string()
        } else {
            format!("{}{location}", self.base)
        }
    }

    fn with_digest(&self, location: &str, digest: &str) -> String {
        let sep = if location.contains('?') { '&' } else { '?' };
        format!("{}{sep}digest={digest}", self.url(location))
    }

    /// Monolithic `POST ?digest=`; asserts 201.
    async fn push_monolithic(&self, bytes: &[u8]) -> String {
        let digest = digest_of(bytes);
        let resp = self
            .http
            .post(self.with_digest(&format!("/v2/{REPO}/blobs/uploads/"), &digest))
            .header(h::CONTENT_TYPE, "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .expect("monolithic POST");
        assert_eq!(resp.status(), StatusCode::CREATED, "monolithic POST");
        assert_eq!(header(&resp, "docker-content-digest"), digest);
        assert_eq!(
            header(&resp, "location"),
            format!("/v2/{REPO}/blobs/{digest}")
        );
        digest
    }

    /// `POST` without a digest: a new session; returns its Location.
    async fn start_session(&self) -> String {
        let resp = self
            .http
            .post(self.url(&format!("/v2/{REPO}/blobs/uploads/")))
            .send()
            .await
            .expect("POST session");
        assert_eq!(resp.status(), StatusCode::ACCEPTED, "POST session");
        assert_eq!(header(&resp, "range"), "0-0");
        assert!(!header(&resp, "docker-upload-uuid").is_empty());
        let loc = header(&resp, "location");
        assert!(
            loc.starts_with(&format!("/v2/{REPO}/blobs/uploads/")),
            "{loc}"
        );
        loc
    }

    /// `PATCH` one chunk with `Content-Range`; asserts 202 and the new `Range`. Returns the
    /// session's next Location.
    async fn patch(&self, location: &str, start: u64, chunk: &[u8]) -> String {
        let end = start + chunk.len() as u64 - 1;
        let resp = self
            .http
            .patch(self.url(location))
            .header(h::CONTENT_TYPE, "application/octet-stream")
            .header(h::CONTENT_RANGE, format!("{start}-{end}"))
            .body(chunk.to_vec())
            .send()
            .await
            .expect("PATCH chunk");
        let status = resp.status();
        let range = header(&resp, "range");
        let loc = header(&resp, "location");
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "PATCH {start}-{end}: {}",
            resp.text().await.unwrap_or_default()
        );
        assert_eq!(range, format!("0-{end}"), "Range after PATCH {start}-{end}");
        loc
    }

    /// `PUT ?digest=`, optionally with a last chunk; asserts 201.
    async fn finish(&self, location: &str, digest: &str, last: Option<(u64, &[u8])>) {
        let mut req = self.http.put(self.with_digest(location, digest));
        if let Some((start, chunk)) = last {
            let end = start + chunk.len() as u64 - 1;
            req = req
                .header(h::CONTENT_TYPE, "application/octet-stream")
                .header(h::CONTENT_RANGE, format!("{start}-{end}"))
                .body(chunk.to_vec());
        }
        let resp = req.send().await.expect("PUT finish");
        let status = resp.status();
        let got = header(&resp, "docker-content-digest");
        assert_eq!(
            status,
            StatusCode::CREATED,
            "PUT ?digest={digest}: {}",
            resp.text().await.unwrap_or_default()
        );
        assert_eq!(got, digest);
    }

    /// `GET` on a session: (status, Range, error code if any).
    async fn session_status(&self, location: &str) -> (StatusCode, String, String) {
        let resp = self
            .http
            .get(self.url(location))
            .send()
            .await
            .expect("GET session");
        let status = resp.status();
        let range = header(&resp, "range");
        let body = resp.bytes().await.unwrap_or_default();
        let code = if status.is_success() {
            String::new()
        } else {
            error_code(&body)
        };
        (status, range, code)
    }

    /// The blob is served with exactly these bytes, by GET and HEAD.
    async fn assert_blob(&self, what: &str, expected: &[u8]) {
        let digest = digest_of(expected);
        let url = self.url(&format!("/v2/{REPO}/blobs/{digest}"));
        let resp = self.http.head(&url).send().await.expect("HEAD blob");
        assert_eq!(resp.status(), StatusCode::OK, "HEAD {what} ({digest})");
        assert_eq!(
            header(&resp, "content-length"),
            expected.len().to_string(),
            "HEAD {what}"
        );
        let resp = self.http.get(&url).send().await.expect("GET blob");
        assert_eq!(resp.status(), StatusCode::OK, "GET {what} ({digest})");
        assert_eq!(header(&resp, "docker-content-digest"), digest);
        let body = resp.bytes().await.expect("blob body");
        assert_eq!(body.len(), expected.len(), "length of {what}");
        assert_eq!(digest_of(&body), digest, "sha256 of {what}");
    }

    /// The blob is not visible: HEAD 404, GET 404 BLOB_UNKNOWN.
    async fn assert_blob_unknown(&self, what: &str, digest: &str) {
        let url = self.url(&format!("/v2/{REPO}/blobs/{digest}"));
        let resp = self.http.head(&url).send().await.expect("HEAD blob");
        assert_eq!(
            resp.status(),
            StatusCode::NOT_FOUND,
            "HEAD {what} ({digest})"
        );
        let resp = self.http.get(&url).send().await.expect("GET blob");
        assert_eq!(
            resp.status(),
            StatusCode::NOT_FOUND,
            "GET {what} ({digest})"
        );
        let body = resp.bytes().await.unwrap_or_default();
        assert_eq!(error_code(&body), "BLOB_UNKNOWN", "GET {what}");
    }
}

/// A session left open with `acked` bytes acknowledged.
struct OpenSession {
    name: &'static str,
    location: String,
    acked: Vec<u8>,
}

impl OpenSession {
    fn id(&self) -> &str {
        self.location.rsplit('/').next().expect("session id")
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Names of the entries of a directory.
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Every blob file under DATA/blobs/sha256, checked to hash to its own name.
fn blob_files(data: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let root = data.join("blobs").join("sha256");
    for prefix in std::fs::read_dir(&root).expect("read blobs/sha256") {
        let prefix = prefix.expect("entry").path();
        for blob in std::fs::read_dir(&prefix).expect("read blob prefix dir") {
            let path = blob.expect("entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let digest = format!("sha256:{name}");
            assert_eq!(
                digest_of_file(&path),
                digest,
                "blob file {} does not hold the bytes its name promises",
                path.display()
            );
            assert!(
                prefix.ends_with(&name[..2]),
                "blob {name} is under the wrong prefix"
            );
            found.insert(digest);
        }
    }
    found
}

/// Wait, polling, until `ready()` holds; panic with `what` and the pier log after `timeout`.
async fn wait_until(pier: &Pier, timeout: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ready() {
        assert!(
            started.elapsed() < timeout,
            "precondition not reached within {timeout:?}: {what}\n{}",
            pier.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

type InFlight = tokio::task::JoinHandle<Result<(StatusCode, String), reqwest::Error>>;

fn spawn_request(req: reqwest::RequestBuilder) -> InFlight {
    tokio::spawn(async move {
        let resp = req.send().await?;
        let status = resp.status();
        let range = header(&resp, "range");
        Ok((status, range))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_upload_keeps_what_was_acknowledged() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut pier = Pier::start(&data);
    let api = Api::new(&pier);

    // ---- acknowledged: whole blobs, monolithic and chunked, and a manifest ----
    let monolithic = gen_bytes(1, 3 * MIB + 17);
    api.push_monolithic(&monolithic).await;

    let chunked = gen_bytes(2, 2 * MIB + 5);
    let loc = api.start_session().await;
    let loc = api.patch(&loc, 0, &chunked[..MIB as usize]).await;
    let loc = api.patch(&loc, MIB, &chunked[MIB as usize..]).await;
    api.finish(&loc, &digest_of(&chunked), None).await;

    let with_last_chunk = gen_bytes(3, MIB + 333);
    let split = 700_000usize;
    let loc = api.start_session().await;
    let loc = api.patch(&loc, 0, &with_last_chunk[..split]).await;
    api.finish(
        &loc,
        &digest_of(&with_last_chunk),
        Some((split as u64, &with_last_chunk[split..])),
    )
    .await;

    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [digest_of(&monolithic), digest_of(&chunked)] },
    }))
    .unwrap();
    api.push_monolithic(&config).await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": digest_of(&config), "size": config.len() },
        "layers": [
            { "mediaType": OCI_LAYER_TAR, "digest": digest_of(&monolithic), "size": monolithic.len() },
            { "mediaType": OCI_LAYER_TAR, "digest": digest_of(&chunked), "size": chunked.len() },
        ],
    }))
    .unwrap();
    put_manifest(&api.http, &api.base, REPO, "v1", OCI_MANIFEST, &manifest).await;

    let acknowledged: Vec<(&str, Vec<u8>)> = vec![
        ("monolithic blob", monolithic),
        ("chunked blob", chunked),
        ("chunked blob with a last chunk on PUT", with_last_chunk),
        ("config blob", config),
    ];

    // ---- acknowledged chunks of sessions left open ----
    let mut open = Vec::new();
    for (name, seed, chunks) in [
        ("one chunk acknowledged", 10, vec![700 * KIB + 1]),
        ("two chunks acknowledged", 11, vec![MIB, 512 * KIB + 3]),
        ("no chunk yet", 12, vec![]),
    ] {
        let total: u64 = chunks.iter().sum();
        let bytes = gen_bytes(seed, total);
        let mut loc = api.start_session().await;
        let mut at = 0u64;
        for len in chunks {
            loc = api
                .patch(&loc, at, &bytes[at as usize..(at + len) as usize])
                .await;
            at += len;
        }
        open.push(OpenSession {
            name,
            location: loc,
            acked: bytes,
        });
    }

    // ---- in flight when pier dies ----
    let mut trickles = Vec::new();
    let mut inflight: Vec<(&str, InFlight)> = Vec::new();

    // A monolithic POST ?digest= with Content-Length.
    let mono_digest = gen_digest(&[], 20, INFLIGHT_LEN);
    let (body, t) = Trickle::start(20, INFLIGHT_LEN, TRICKLE_CHUNK, TRICKLE_PAUSE);
    trickles.push(t);
    inflight.push((
        "monolithic POST",
        spawn_request(
            api.http
                .post(api.with_digest(&format!("/v2/{REPO}/blobs/uploads/"), &mono_digest))
                .header(h::CONTENT_LENGTH, INFLIGHT_LEN)
                .header(h::CONTENT_TYPE, "application/octet-stream")
                .body(body),
        ),
    ));

    // A PATCH with Content-Range after an acknowledged chunk.
    let patch_session = {
        let acked = gen_bytes(21, 512 * KIB);
        let loc = api.start_session().await;
        let loc = api.patch(&loc, 0, &acked).await;
        OpenSession {
            name: "PATCH in flight",
            location: loc,
            acked,
        }
    };
    let (body, t) = Trickle::start(22, INFLIGHT_LEN, TRICKLE_CHUNK, TRICKLE_PAUSE);
    trickles.push(t);
    let start = patch_session.acked.len() as u64;
    inflight.push((
        "PATCH with Content-Range",
        spawn_request(
            api.http
                .patch(api.url(&patch_session.location))
                .header(
                    h::CONTENT_RANGE,
                    format!("{start}-{}", start + INFLIGHT_LEN - 1),
                )
                .header(h::CONTENT_LENGTH, INFLIGHT_LEN)
                .header(h::CONTENT_TYPE, "application/octet-stream")
                .body(body),
        ),
    ));

    // A closing PUT ?digest= whose last chunk is streaming.
    let put_session = {
        let acked = gen_bytes(23, 256 * KIB);
        let loc = api.start_session().await;
        let loc = api.patch(&loc, 0, &acked).await;
        OpenSession {
            name: "PUT with last chunk in flight",
            location: loc,
            acked,
        }
    };
    let put_digest = gen_digest(&put_session.acked, 24, INFLIGHT_LEN);
    let (body, t) = Trickle::start(24, INFLIGHT_LEN, TRICKLE_CHUNK, TRICKLE_PAUSE);
    trickles.push(t);
    inflight.push((
        "PUT with last chunk",
        spawn_request(
            api.http
                .put(api.with_digest(&put_session.location, &put_digest))
                .header(h::CONTENT_LENGTH, INFLIGHT_LEN)
                .header(h::CONTENT_TYPE, "application/octet-stream")
                .body(body),
        ),
    ));

    // A streamed PATCH (no Content-Range, chunked transfer encoding) on a fresh session.
    let stream_session = OpenSession {
        name: "streamed PATCH in flight",
        location: api.start_session().await,
        acked: Vec::new(),
    };
    let (body, t) = Trickle::start(25, INFLIGHT_LEN, TRICKLE_CHUNK, TRICKLE_PAUSE);
    trickles.push(t);
    inflight.push((
        "streamed PATCH",
        spawn_request(
            api.http
                .patch(api.url(&stream_session.location))
                .header(h::CONTENT_TYPE, "application/octet-stream")
                .body(body),
        ),
    ));

    // Wait until every body is well under way and pier has written part of each to disk.
    let uploads = data.join("uploads");
    let partial_path = |s: &OpenSession| uploads.join(s.id());
    wait_until(
        &pier,
        Duration::from_secs(30),
        "every slow body sent 6 MiB and pier wrote part of each",
        || {
            trickles.iter().all(|t| t.sent() >= 6 * MIB)
                && file_len(&partial_path(&patch_session)) > patch_session.acked.len() as u64
                && file_len(&partial_path(&put_session)) > put_session.acked.len() as u64
                && file_len(&partial_path(&stream_session)) > 0
                && std::fs::read_dir(data.join("tmp"))
                    .map(|d| d.flatten().any(|e| file_len(&e.path()) > 0))
                    .unwrap_or(false)
        },
    )
    .await;
    let patch_partial = file_len(&partial_path(&patch_session));
    for (what, task) in &inflight {
        assert!(!task.is_finished(), "{what} finished before the kill");
    }

    pier.kill();
    println!(
        "killed pier mid-upload after {:?}; bodies sent: {:?} MiB",
        started.elapsed(),
        trickles.iter().map(|t| t.sent() / MIB).collect::<Vec<_>>()
    );

    for (what, task) in inflight {
        let outcome = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .unwrap_or_else(|_| panic!("{what} still running 30 s after the kill"))
            .expect("request task");
        if let Ok((status, _)) = outcome {
            assert!(
                !status.is_success(),
                "{what} was acknowledged ({status}) by a pier that was killed before its body ended"
            );
        }
    }
    drop(trickles);

    // ---- restart on the same data directory ----
    pier.restart();
    let api = Api::new(&pier);

    let leftovers = entries(&data.join("tmp"));
    assert!(
        leftovers.is_empty(),
        "DATA/tmp not emptied at start-up: {leftovers:?}"
    );

    for (what, bytes) in &acknowledged {
        api.assert_blob(what, bytes).await;
    }

    let resp = api
        .http
        .get(api.url(&format!("/v2/{REPO}/manifests/v1")))
        .header(h::ACCEPT, OCI_MANIFEST)
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "manifest by tag after the kill"
    );
    assert_eq!(header(&resp, "content-type"), OCI_MANIFEST);
    assert_eq!(header(&resp, "docker-content-digest"), digest_of(&manifest));
    assert_eq!(
        resp.bytes().await.expect("manifest body").as_ref(),
        manifest.as_slice(),
        "manifest bytes after the kill"
    );
    let resp = api
        .http
        .get(api.url(&format!("/v2/{REPO}/manifests/{}", digest_of(&manifest))))
        .header(h::ACCEPT, OCI_MANIFEST)
        .send()
        .await
        .expect("GET manifest by digest");
    assert_eq!(resp.status(), StatusCode::OK, "manifest by digest");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), manifest.as_slice());

    api.assert_blob_unknown("monolithic POST in flight", &mono_digest)
        .await;
    api.assert_blob_unknown("PUT in flight", &put_digest).await;

    let mut expected_blobs: BTreeSet<String> =
        acknowledged.iter().map(|(_, b)| digest_of(b)).collect();

    // Sessions with acknowledged chunks resume from exactly there.
    for (i, s) in open.iter().enumerate() {
        let (status, range, code) = api.session_status(&s.location).await;
        assert_eq!(
            status,
            StatusCode::NO_CONTENT,
            "status of {}: {code}",
            s.name
        );
        assert_eq!(range, range_of(s.acked.len() as u64), "Range of {}", s.name);
        let next = gen_bytes(100 + i as u64, 300 * KIB + i as u64);
        let loc = api.patch(&s.location, s.acked.len() as u64, &next).await;
        let whole = [s.acked.as_slice(), next.as_slice()].concat();
        api.finish(&loc, &digest_of(&whole), None).await;
        api.assert_blob(s.name, &whole).await;
        expected_blobs.insert(digest_of(&whole));
    }

    // The chunk that was streaming into this session never counted: a chunk claiming to start
    // where the partial bytes ended is out of order.
    let resp = api
        .http
        .patch(api.url(&patch_session.location))
        .header(
            h::CONTENT_RANGE,
            format!("{patch_partial}-{}", patch_partial + 9),
        )
        .body(vec![0u8; 10])
        .send()
        .await
        .expect("PATCH past the acknowledged offset");
    assert_eq!(
        resp.status(),
        StatusCode::RANGE_NOT_SATISFIABLE,
        "a chunk starting at the unacknowledged offset {patch_partial}"
    );
    assert_eq!(
        header(&resp, "range"),
        range_of(patch_session.acked.len() as u64)
    );

    // Sessions whose chunk was in flight resume from the last acknowledged byte, or are gone
    // cleanly; never a blob with the partial bytes in it.
    for (i, s) in [&patch_session, &put_session, &stream_session]
        .into_iter()
        .enumerate()
    {
        let (status, range, code) = api.session_status(&s.location).await;
        if status == StatusCode::NOT_FOUND {
            assert_eq!(code, "BLOB_UPLOAD_UNKNOWN", "{}", s.name);
            println!(
                "{}: session dropped after the kill (404 BLOB_UPLOAD_UNKNOWN)",
                s.name
            );
            continue;
        }
        assert_eq!(
            status,
            StatusCode::NO_CONTENT,
            "status of {}: {code}",
            s.name
        );
        assert_eq!(
            range,
            range_of(s.acked.len() as u64),
            "{} must resume from its acknowledged offset",
            s.name
        );
        let next = gen_bytes(200 + i as u64, 100 * KIB + 7);
        let whole = [s.acked.as_slice(), next.as_slice()].concat();
        let start = s.acked.len() as u64;
        if i % 2 == 0 {
            let loc = api.patch(&s.location, start, &next).await;
            api.finish(&loc, &digest_of(&whole), None).await;
        } else {
            api.finish(&s.location, &digest_of(&whole), Some((start, &next)))
                .await;
        }
        api.assert_blob(s.name, &whole).await;
        expected_blobs.insert(digest_of(&whole));
        println!("{}: resumed at {start} and finished", s.name);
    }

    // On disk: every blob holds what its name says, nothing half-written became a blob, and
    // no session buffer or temporary file is left behind.
    let on_disk = blob_files(&data);
    let mut allowed = expected_blobs.clone();
    allowed.insert(digest_of(&manifest));
    assert!(
        on_disk.is_superset(&expected_blobs) && on_disk.is_subset(&allowed),
        "blobs on disk {on_disk:?}, expected {expected_blobs:?}"
    );
    assert!(entries(&data.join("tmp")).is_empty(), "DATA/tmp not empty");
    assert!(
        entries(&data.join("uploads")).is_empty(),
        "upload buffers left after every session finished: {:?}",
        entries(&data.join("uploads"))
    );

    let exit = pier.stop();
    assert_eq!(exit.code(), Some(0), "pier exit after SIGTERM: {exit}");
    println!("sigkill test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_inflight_uploads_finish() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut pier = Pier::start(&data);
    let api = Api::new(&pier);

    // About two seconds of monolithic POST and of chunk PATCH.
    let blob_len = 24 * MIB;
    let blob_digest = gen_digest(&[], 30, blob_len);
    let (body, post_trickle) = Trickle::start(30, blob_len, TRICKLE_CHUNK, TRICKLE_PAUSE);
    let post = spawn_request(
        api.http
            .post(api.with_digest(&format!("/v2/{REPO}/blobs/uploads/"), &blob_digest))
            .header(h::CONTENT_LENGTH, blob_len)
            .header(h::CONTENT_TYPE, "application/octet-stream")
            .body(body),
    );
    let chunk_len = 16 * MIB;
    let session = api.start_session().await;
    let (body, patch_trickle) = Trickle::start(31, chunk_len, TRICKLE_CHUNK, TRICKLE_PAUSE);
    let patch = spawn_request(
        api.http
            .patch(api.url(&session))
            .header(h::CONTENT_RANGE, format!("0-{}", chunk_len - 1))
            .header(h::CONTENT_LENGTH, chunk_len)
            .header(h::CONTENT_TYPE, "application/octet-stream")
            .body(body),
    );
    let buffer = data
        .join("uploads")
        .join(session.rsplit('/').next().unwrap());
    wait_until(
        &pier,
        Duration::from_secs(30),
        "both bodies under way and being written",
        || {
            post_trickle.sent() >= 2 * MIB
                && patch_trickle.sent() >= 2 * MIB
                && file_len(&buffer) > 0
                && !entries(&data.join("tmp")).is_empty()
        },
    )
    .await;
    assert!(
        !post.is_finished() && !patch.is_finished(),
        "uploads ended before SIGTERM"
    );

    pier.terminate();
    let sent_at_sigterm = post_trickle.sent();

    let (status, _) = tokio::time::timeout(Duration::from_secs(60), post)
        .await
        .expect("POST answered within 60 s of SIGTERM")
        .expect("POST task")
        .expect("POST gets a response after SIGTERM");
    assert_eq!(status, StatusCode::CREATED, "in-flight POST after SIGTERM");
    let (status, range) = tokio::time::timeout(Duration::from_secs(60), patch)
        .await
        .expect("PATCH answered within 60 s of SIGTERM")
        .expect("PATCH task")
        .expect("PATCH gets a response after SIGTERM");
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "in-flight PATCH after SIGTERM"
    );
    assert_eq!(range, range_of(chunk_len));
    assert!(
        post_trickle.sent() == blob_len && sent_at_sigterm < blob_len,
        "the POST body was still streaming at SIGTERM ({sent_at_sigterm} of {blob_len})"
    );

    let exit = pier.wait_exit(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0), "pier exit after SIGTERM: {exit}");
    assert!(pier.log().contains("shutting down"), "{}", pier.log());
    drop((post_trickle, patch_trickle));

    // What was acknowledged during the shutdown is there after a restart.
    pier.restart();
    let api = Api::new(&pier);
    let blob = gen_bytes(30, blob_len);
    api.assert_blob("blob uploaded during shutdown", &blob)
        .await;
    let (status, range, code) = api.session_status(&session).await;
    assert_eq!(
        status,
        StatusCode::NO_CONTENT,
        "session after restart: {code}"
    );
    assert_eq!(range, range_of(chunk_len));
    let chunk = gen_bytes(31, chunk_len);
    api.finish(&session, &digest_of(&chunk), None).await;
    api.assert_blob("chunk acknowledged during shutdown", &chunk)
        .await;
    let exit = pier.stop();
    assert_eq!(exit.code(), Some(0), "second exit: {exit}");
    println!("sigterm test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_chunk_discards_the_partial_chunk() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut pier = Pier::start(&data);
    let api = Api::new(&pier);

    let acked = gen_bytes(50, 300 * KIB + 1);
    let loc = api.start_session().await;
    let loc = api.patch(&loc, 0, &acked).await;
    let start = acked.len() as u64;
    let declared = 64 * MIB;
    let (body, trickle) = Trickle::start(51, declared, TRICKLE_CHUNK, TRICKLE_PAUSE);
    let patch = spawn_request(
        api.http
            .patch(api.url(&loc))
            .header(
                h::CONTENT_RANGE,
                format!("{start}-{}", start + declared - 1),
            )
            .header(h::CONTENT_LENGTH, declared)
            .header(h::CONTENT_TYPE, "application/octet-stream")
            .body(body),
    );
    let buffer = data.join("uploads").join(loc.rsplit('/').next().unwrap());
    wait_until(
        &pier,
        Duration::from_secs(30),
        "part of the chunk written",
        || file_len(&buffer) > start + MIB,
    )
    .await;
    // The client goes away: its body ends short of the declared length.
    drop(trickle);
    let outcome = tokio::time::timeout(Duration::from_secs(30), patch)
        .await
        .expect("the broken PATCH ends")
        .expect("PATCH task");
    if let Ok((status, _)) = outcome {
        assert!(
            !status.is_success(),
            "a chunk cut short was acknowledged: {status}"
        );
    }

    let (status, range, code) = api.session_status(&loc).await;
    assert_eq!(
        status,
        StatusCode::NO_CONTENT,
        "session after the broken chunk: {code}"
    );
    assert_eq!(range, range_of(start), "the broken chunk must not count");
    let next = gen_bytes(52, 200 * KIB + 3);
    let loc = api.patch(&loc, start, &next).await;
    let whole = [acked.as_slice(), next.as_slice()].concat();
    api.finish(&loc, &digest_of(&whole), None).await;
    api.assert_blob("blob resumed after a broken chunk", &whole)
        .await;
    assert!(entries(&data.join("uploads")).is_empty());
    assert!(entries(&data.join("tmp")).is_empty());
    let exit = pier.stop();
    assert_eq!(exit.code(), Some(0), "exit: {exit}");
}

/// The generation a node announces itself with, from its own status.
async fn own_generation(http: &reqwest::Client, pier: &Pier, name: &str) -> u64 {
    let status: serde_json::Value = http
        .get(format!("{}/api/v1/status", pier.url()))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("status JSON");
    status["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["name"] == name)
        .and_then(|m| m["generation"].as_u64())
        .unwrap_or_else(|| panic!("{name} is not among its own members: {status}"))
}

/// A node whose clock went back across a restart still starts a generation above its last
/// life's (members take the higher one as the live node, and would keep the old one for an
/// hour); the one it starts with is kept in the data directory.
#[tokio::test]
async fn a_restart_always_gets_a_larger_generation() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let secret = common::cluster_secret(tmp.path());
    let data = tmp.path().join("node");
    let log = tmp.path().join("node.log");
    let http = reqwest::Client::new();
    // The last life ran with a clock an hour ahead of the one this start sees.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let last = now_ms + 3_600_000;
    std::fs::create_dir_all(data.join("cluster")).expect("mkdir");
    std::fs::write(data.join("cluster/generation"), format!("{last}\n")).expect("write");
    let mut pier = Launch::new(&data, &log)
        .member("gen-node", common::free_port(), &secret, None)
        .start();
    let first = own_generation(&http, &pier, "gen-node").await;
    assert!(
        first > last,
        "generation {first} is not above the last life's {last}"
    );
    pier.stop();
    let kept: u64 = std::fs::read_to_string(data.join("cluster/generation"))
        .expect("kept")
        .trim()
        .parse()
        .expect("a number");
    assert_eq!(kept, first, "the generation announced is the one kept");
    pier.restart();
    let second = own_generation(&http, &pier, "gen-node").await;
    assert!(second > first, "restart: {second} is not above {first}");
}
