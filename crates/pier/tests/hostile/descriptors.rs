//! Hostile tier: manifests whose descriptors lie about sizes, pushed to the real binary with
//! plain HTTP as a crafted client would. A client bounds its reads by a descriptor's size, so
//! a registry that stored one it never checked would hand every puller a false promise.

use reqwest::StatusCode;

use crate::common::{digest_of, error_code, Pier};

#[tokio::test]
async fn a_descriptor_size_that_is_not_the_blobs_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pier = Pier::start(&tmp.path().join("data"));
    let http = reqwest::Client::new();
    let config = b"{}";
    let digest = digest_of(config);
    let resp = http
        .post(format!(
            "{}/v2/lie/app/blobs/uploads/?digest={digest}",
            pier.url()
        ))
        .body(config.to_vec())
        .send()
        .await
        .expect("push the config");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let manifest = |size: u64| {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{digest}","size":{size}}},"layers":[]}}"#
        )
    };
    let put = |body: String| {
        http.put(format!("{}/v2/lie/app/manifests/v1", pier.url()))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(body)
            .send()
    };
    let resp = put(manifest(999)).await.expect("put the lying manifest");
    let status = resp.status();
    let body = resp.bytes().await.expect("body");
    assert_eq!(
        (status, error_code(&body).as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let resp = http
        .get(format!("{}/v2/lie/app/manifests/v1", pier.url()))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "nothing was tagged");
    let resp = put(manifest(2)).await.expect("put the true manifest");
    assert_eq!(resp.status(), StatusCode::CREATED);
}
