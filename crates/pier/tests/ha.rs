//! HA tier: two real `pier serve` processes on one S3 bucket and one PostgreSQL database, as
//! behind one load balancer. What one node acknowledged, the other serves at once; the chunks
//! of one upload may reach either node; a node killed mid-push loses nothing acknowledged; `pier
//! gc` on one node frees what was deleted through the other, and `pier check --deep` finds an
//! object overwritten in the bucket.
//!
//! Needs the S3 server and PostgreSQL of scripts/storage-services.sh (`PIER_TEST_S3_ENDPOINT`,
//! `PIER_TEST_S3_BUCKET`, `PIER_TEST_PG_URL`); says SKIPPED without them.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    digest_of, gen_bytes, header, put_manifest, Launch, Pier, SharedStorage, KIB, MIB, OCI_CONFIG,
    OCI_LAYER_TAR, OCI_MANIFEST,
};
use object_store::ObjectStoreExt as _;
use reqwest::{header as h, StatusCode};
use serde_json::json;

const REPO: &str = "ha/app";

/// Node `name` of a deployment configured by `config`: data in `<dir>/<name>`, config and log
/// beside it, every repository hosted.
fn start(dir: &Path, name: &str, config: &str) -> Pier {
    Launch::new(&dir.join(name), &dir.join(format!("{name}.pier.log")))
        .config(config)
        .args(["--hosted", "**"])
        .start()
}

/// `POST` a session at `base`; returns its `Location` path.
async fn open_upload(http: &reqwest::Client, base: &str) -> String {
    let resp = http
        .post(format!("{base}/v2/{REPO}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "POST upload at {base}");
    let loc = header(&resp, "location");
    assert!(
        loc.starts_with('/'),
        "Location {loc:?} is a path any node answers"
    );
    loc
}

/// `PATCH` a chunk to `base` at `start`; asserts 202 and the acknowledged range.
async fn patch(http: &reqwest::Client, base: &str, loc: &str, start: u64, bytes: &[u8]) {
    let end = start + bytes.len() as u64 - 1;
    let resp = http
        .patch(format!("{base}{loc}"))
        .header(h::CONTENT_TYPE, "application/octet-stream")
        .header(h::CONTENT_RANGE, format!("{start}-{end}"))
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let range = header(&resp, "range");
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "PATCH {start}-{end} at {base}: {}",
        resp.text().await.unwrap_or_default()
    );
    assert_eq!(range, format!("0-{end}"), "PATCH at {base}");
}

/// `PUT ?digest=` (with an optional last chunk) at `base`; asserts 201.
async fn close(http: &reqwest::Client, base: &str, loc: &str, digest: &str, last: &[u8]) {
    let sep = if loc.contains('?') { '&' } else { '?' };
    let resp = http
        .put(format!("{base}{loc}{sep}digest={digest}"))
        .header(h::CONTENT_TYPE, "application/octet-stream")
        .body(last.to_vec())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    assert_eq!(
        status,
        StatusCode::CREATED,
        "PUT {digest} at {base}: {}",
        resp.text().await.unwrap_or_default()
    );
}

/// A monolithic push of `bytes` to `base`.
async fn push_blob(http: &reqwest::Client, base: &str, bytes: &[u8]) -> String {
    let digest = digest_of(bytes);
    let resp = http
        .post(format!("{base}/v2/{REPO}/blobs/uploads/?digest={digest}"))
        .header(h::CONTENT_TYPE, "application/octet-stream")
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::CREATED,
        "monolithic push at {base}"
    );
    digest
}

/// `GET` a blob from `base`; asserts its bytes.
async fn pull_blob(http: &reqwest::Client, base: &str, digest: &str, want: &[u8]) {
    let resp = http
        .get(format!("{base}/v2/{REPO}/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "GET blob {digest} at {base}");
    let got = resp.bytes().await.unwrap();
    assert!(
        got.as_ref() == want,
        "blob {digest} from {base}: wrong bytes ({} of {})",
        got.len(),
        want.len()
    );
}

/// An image manifest over a config and one layer, pushed as `tag` to `base`.
async fn push_image(
    http: &reqwest::Client,
    base: &str,
    tag: &str,
    config: &[u8],
    layer: &[u8],
) -> Vec<u8> {
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": digest_of(config), "size": config.len() },
        "layers": [{ "mediaType": OCI_LAYER_TAR, "digest": digest_of(layer), "size": layer.len() }],
    }))
    .unwrap();
    put_manifest(http, base, REPO, tag, OCI_MANIFEST, &manifest).await;
    manifest
}

async fn pull_manifest(http: &reqwest::Client, base: &str, tag: &str, want: &[u8]) {
    let resp = http
        .get(format!("{base}/v2/{REPO}/manifests/{tag}"))
        .header(h::ACCEPT, OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "GET manifest {tag} at {base}"
    );
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        want,
        "manifest {tag} at {base}"
    );
}

#[tokio::test]
async fn two_nodes_on_one_bucket_and_one_database_serve_each_others_pushes() {
    let Some(storage) = SharedStorage::from_env("the HA tier") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = storage.deployment_config().await;
    let mut a = start(dir.path(), "a", &config);
    let mut b = start(dir.path(), "b", &config);
    let (ua, ub) = (a.url(), b.url());
    let http = reqwest::Client::new();

    // Pushes alternate between the nodes; each is pulled from the other at once.
    let mut pushed = Vec::new();
    for i in 0..4u64 {
        let (to, from) = if i % 2 == 0 { (&ua, &ub) } else { (&ub, &ua) };
        let config_blob = format!("{{\"n\":{i}}}").into_bytes();
        let layer = gen_bytes(i, 300 * KIB + i);
        push_blob(&http, to, &config_blob).await;
        push_blob(&http, to, &layer).await;
        let tag = format!("v{i}");
        let manifest = push_image(&http, to, &tag, &config_blob, &layer).await;
        pull_manifest(&http, from, &tag, &manifest).await;
        pull_blob(&http, from, &digest_of(&layer), &layer).await;
        pushed.push((tag, manifest, layer));
    }

    // One chunked upload whose chunks reach both nodes: PATCH to A, PATCH to B, PUT to A. The
    // chunks are larger than one multipart part, so the commit streams them together.
    let big = gen_bytes(77, 12 * MIB + 3);
    let digest = digest_of(&big);
    let loc = open_upload(&http, &ua).await;
    let (c1, c2) = (5 * MIB as usize + 11, 10 * MIB as usize);
    patch(&http, &ua, &loc, 0, &big[..c1]).await;
    patch(&http, &ub, &loc, c1 as u64, &big[c1..c2]).await;
    // The session's state is shared: B reports A's and its own bytes.
    let status = http.get(format!("{ub}{loc}")).send().await.unwrap();
    assert_eq!(status.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&status, "range"), format!("0-{}", c2 - 1));
    close(&http, &ua, &loc, &digest, &big[c2..]).await;
    pull_blob(&http, &ub, &digest, &big).await;

    // Node B is killed (SIGKILL) in the middle of a chunk of an upload it acknowledged a
    // chunk of; the survivor resumes the session from the acknowledged byte.
    let killed = gen_bytes(99, 3 * MIB);
    let kd = digest_of(&killed);
    let loc = open_upload(&http, &ub).await;
    let first = MIB as usize;
    patch(&http, &ub, &loc, 0, &killed[..first]).await;
    let (tx, rx) = futures::channel::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let stream_body = reqwest::Body::wrap_stream(rx);
    let in_flight = {
        let http = http.clone();
        let url = format!("{ub}{loc}");
        tokio::spawn(async move {
            http.patch(url)
                .header(h::CONTENT_TYPE, "application/octet-stream")
                .body(stream_body)
                .send()
                .await
        })
    };
    let mut tx = tx;
    use futures::SinkExt;
    tx.send(Ok(killed[first..first + 512 * KIB as usize].to_vec()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.kill();
    drop(tx);
    let cut = in_flight.await.unwrap();
    assert!(
        cut.as_ref()
            .map_or(true, |r| r.status() != StatusCode::ACCEPTED),
        "the chunk cut by the kill was not acknowledged"
    );
    let status = http.get(format!("{ua}{loc}")).send().await.unwrap();
    assert_eq!(
        status.status(),
        StatusCode::NO_CONTENT,
        "A knows B's session"
    );
    assert_eq!(header(&status, "range"), format!("0-{}", first - 1));
    patch(&http, &ua, &loc, first as u64, &killed[first..]).await;
    close(&http, &ua, &loc, &kd, &[]).await;
    pull_blob(&http, &ua, &kd, &killed).await;

    // The survivor serves everything acknowledged, B's pushes included.
    for (tag, manifest, layer) in &pushed {
        pull_manifest(&http, &ua, tag, manifest).await;
        pull_blob(&http, &ua, &digest_of(layer), layer).await;
    }
    pull_blob(&http, &ua, &digest, &big).await;
    let tags: serde_json::Value =
        common::get_json(&http, &format!("{ua}/v2/{REPO}/tags/list")).await;
    assert_eq!(tags["tags"], json!(["v0", "v1", "v2", "v3"]));

    // B comes back and serves the same; its start-up cleanup keeps A's open session.
    let open = open_upload(&http, &ua).await;
    patch(&http, &ua, &open, 0, b"still open").await;
    b.restart();
    pull_blob(&http, &b.url(), &kd, &killed).await;
    close(&http, &b.url(), &open, &digest_of(b"still open"), &[]).await;
    pull_blob(&http, &ua, &digest_of(b"still open"), b"still open").await;
    a.stop();
}

/// The `[storage.s3]` key prefix a deployment config names.
fn s3_prefix(config: &str) -> String {
    config
        .lines()
        .find_map(|l| l.strip_prefix("prefix = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("a prefix in the deployment config")
        .to_string()
}

fn pier_json(args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let out = common::pier_cli(args);
    (out.status.code(), common::json_of(&out))
}

/// Upkeep on shared stores, with the real binary: an image deleted through node A is
/// collected by `pier gc` asked of node B (its layer gone from both, the image still tagged
/// whole on both); then a blob whose object in the bucket the test overwrites with bad bytes
/// is found by `pier check --deep` on A, reported lost (a hosted blob, exit 2) with the
/// manifest that lost it, and neither node serves the bad bytes.
#[tokio::test]
async fn gc_on_one_node_frees_an_image_deleted_on_the_other_and_check_deep_finds_a_bad_object() {
    let Some(storage) = SharedStorage::from_env("the HA tier") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = storage.deployment_config().await;
    let prefix = s3_prefix(&config);
    config.push_str(
        "\n[gc]\ngrace = \"0s\"\n\n[mirror]\nbuiltin_upstreams = false\ndefault_upstream = \"\"\n",
    );
    let a = start(dir.path(), "a", &config);
    let b = start(dir.path(), "b", &config);
    let (ua, ub) = (a.url(), b.url());
    let http = reqwest::Client::new();

    let config_blob = b"{\"architecture\":\"amd64\"}".to_vec();
    let (gone, kept) = (gen_bytes(1, 200 * KIB), gen_bytes(2, 150 * KIB + 1));
    for blob in [&config_blob, &gone, &kept] {
        push_blob(&http, &ua, blob).await;
    }
    let m1 = push_image(&http, &ua, "v1", &config_blob, &gone).await;
    let m2 = push_image(&http, &ub, "v2", &config_blob, &kept).await;
    let resp = http
        .delete(format!("{ua}/v2/{REPO}/manifests/{}", digest_of(&m1)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "DELETE v1 at A");

    let (code, report) = pier_json(&["gc", "--json", "--url", &ub]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(
        report["blobs"], 1,
        "only the deleted image's layer: {report}"
    );
    assert_eq!(report["bytes"], gone.len(), "{report}");
    for base in [&ua, &ub] {
        let resp = http
            .get(format!("{base}/v2/{REPO}/blobs/{}", digest_of(&gone)))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "collected at {base}");
        pull_manifest(&http, base, "v2", &m2).await;
        pull_blob(&http, base, &digest_of(&kept), &kept).await;
        pull_blob(&http, base, &digest_of(&config_blob), &config_blob).await;
    }

    let (code, report) = pier_json(&["check", "--deep", "--json", "--url", &ua]);
    assert_eq!(code, Some(0), "clean before the damage: {report}");

    // Bad bytes of the same length where the layer's object is, written as any S3 client
    // (a failing disk under the S3 server, an operator's mistake) could.
    let mut bad = kept.clone();
    bad[1000] ^= 0xff;
    let key = format!(
        "{prefix}blobs/sha256/{}",
        &digest_of(&kept)["sha256:".len()..]
    );
    let bucket = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(&storage.s3_bucket)
        .with_endpoint(&storage.s3_endpoint)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_virtual_hosted_style_request(false)
        .with_access_key_id("pier-test")
        .with_secret_access_key("pier-test")
        .build()
        .expect("an S3 client");
    bucket
        .put(&object_store::path::Path::from(key.as_str()), bad.into())
        .await
        .unwrap_or_else(|e| panic!("overwrite {key}: {e}"));

    let (code, report) = pier_json(&["check", "--deep", "--json", "--url", &ua]);
    assert_eq!(code, Some(2), "a lost hosted blob exits 2: {report}");
    let digests = common::check_of(&report, "blob digests");
    assert_eq!(digests["status"], "fail", "{digests}");
    let details = digests["details"].to_string();
    assert!(
        details.contains(&digest_of(&kept))
            && details.contains(&format!("{REPO}@{}", digest_of(&m2))),
        "the report names the blob and the manifest that lost it: {details}"
    );
    for base in [&ua, &ub] {
        let resp = http
            .get(format!("{base}/v2/{REPO}/blobs/{}", digest_of(&kept)))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::NOT_FOUND,
            "the bad bytes are not served at {base}"
        );
    }
}
