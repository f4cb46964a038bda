//! Interop tier: the real `pier` binary driven by real clients, skopeo and containerd's `ctr`
//! (both in `common::clients`). Runs only with `PIER_INTEROP=1` (scripts/test.sh sets it and
//! installs the tools); then a missing tool is a failure, not a skip.

mod common;

use std::path::Path;
use std::time::Instant;

use common::clients::{oci_ref, Containerd, Skopeo};
use common::{
    assert_blobs_served, assert_same_blobs, digest_of, header, interop_tempdir, push_image,
    write_layout, Entry, ImageSpec, LayerSpec, Pier, Upload, KIB, MIB, OCI_INDEX, OCI_MANIFEST,
    REF_NAME,
};
use reqwest::StatusCode;

/// The digest `index.json` of an OCI layout gives for a ref name.
fn layout_ref(dir: &Path, name: &str) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).expect("read index.json"))
            .expect("parse index.json");
    index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| m["annotations"][REF_NAME] == name)
        .and_then(|m| m["digest"].as_str())
        .unwrap_or_else(|| panic!("no {name} in {index}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_preserve_digests() {
    let Some(tmp) = interop_tempdir(&["skopeo"]) else {
        return;
    };
    let t0 = Instant::now();
    let skopeo = Skopeo::new(tmp.path());
    let layout = write_layout(
        &tmp.path().join("src"),
        vec![(
            "app",
            Entry::Image(ImageSpec::linux(
                "amd64",
                vec![
                    LayerSpec::new("app.conf", 4099, 1),
                    LayerSpec::new("big.bin", 200 * MIB, 2),
                    LayerSpec::new("lib.bin", 3 * MIB + 5, 3),
                    LayerSpec::new("tiny.bin", 1, 4),
                ],
            )),
        )],
    );
    let image = layout.image("app").clone();
    assert!(image.layers[1].blob.size >= 200 * MIB);
    println!("layout written in {:?}", t0.elapsed());

    let pier = Pier::start(&tmp.path().join("data"));
    let host = pier.host();
    let http = reqwest::Client::new();

    // Push: the layout into pier, digests preserved.
    let a = format!("docker://{host}/a:1");
    skopeo.copy(&oci_ref(&layout.dir, "app"), &a).await;
    let raw = skopeo.inspect_raw(&a).await;
    assert_eq!(
        digest_of(&raw),
        image.manifest.digest,
        "digest of the pushed manifest"
    );
    assert_eq!(raw, image.manifest_bytes, "manifest bytes as pushed");

    // Pull: back into a new layout, every blob byte-identical.
    let back = skopeo.writable_dir(&tmp.path().join("back"));
    skopeo.copy(&a, &oci_ref(&back, "pulled")).await;
    assert_eq!(layout_ref(&back, "pulled"), image.manifest.digest);
    assert_same_blobs(&layout, &back, &image.digests());

    // Registry to registry, inside pier.
    let c = format!("docker://{host}/b/c:1");
    skopeo.copy(&a, &c).await;
    let raw = skopeo.inspect_raw(&c).await;
    assert_eq!(
        digest_of(&raw),
        image.manifest.digest,
        "digest after registry copy"
    );
    let info = skopeo.inspect(&c).await;
    assert_eq!(info["Digest"], image.manifest.digest.as_str());
    assert_eq!(info["Layers"], serde_json::json!(image.layer_digests()));
    assert_blobs_served(&http, &pier.url(), "b/c", "", &image.blobs()).await;
    println!("skopeo round trips took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_multi_platform_index() {
    let Some(tmp) = interop_tempdir(&["skopeo"]) else {
        return;
    };
    let t0 = Instant::now();
    let skopeo = Skopeo::new(tmp.path());
    let shared = LayerSpec::new("shared.bin", 64 * KIB, 10);
    let layout = write_layout(
        &tmp.path().join("src"),
        vec![(
            "multi",
            Entry::Index(vec![
                ImageSpec::linux(
                    "amd64",
                    vec![shared.clone(), LayerSpec::new("amd64.bin", 2 * MIB + 1, 11)],
                ),
                ImageSpec::linux(
                    "arm64",
                    vec![shared, LayerSpec::new("arm64.bin", MIB + 9, 12)],
                ),
            ]),
        )],
    );
    let index = layout.index("multi").clone();

    let pier = Pier::start(&tmp.path().join("data"));
    let host = pier.host();
    let base = pier.url();
    let http = reqwest::Client::new();

    let dest = format!("docker://{host}/multi/app:1");
    skopeo.copy_all(&oci_ref(&layout.dir, "multi"), &dest).await;
    let raw = skopeo.inspect_raw(&dest).await;
    assert_eq!(
        digest_of(&raw),
        index.index.digest,
        "digest of the pushed index"
    );
    assert_eq!(raw, index.index_bytes);

    for image in &index.images {
        let resp = http
            .get(format!(
                "{base}/v2/multi/app/manifests/{}",
                image.manifest.digest
            ))
            .header(
                reqwest::header::ACCEPT,
                format!("{OCI_MANIFEST}, {OCI_INDEX}"),
            )
            .send()
            .await
            .expect("GET platform manifest");
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "{} manifest by digest",
            image.arch
        );
        assert_eq!(header(&resp, "content-type"), OCI_MANIFEST);
        assert_eq!(
            header(&resp, "docker-content-digest"),
            image.manifest.digest
        );
        let body = resp.bytes().await.expect("manifest body");
        assert_eq!(
            digest_of(&body),
            image.manifest.digest,
            "{} manifest",
            image.arch
        );
        assert_blobs_served(&http, &base, "multi/app", "", &image.blobs()).await;
    }

    // And back out, whole.
    let back = skopeo.writable_dir(&tmp.path().join("back"));
    skopeo.copy_all(&dest, &oci_ref(&back, "multi")).await;
    assert_eq!(layout_ref(&back, "multi"), index.index.digest);
    assert_same_blobs(&layout, &back, &index.digests());
    println!("multi-platform copies took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_and_unpacks() {
    let Some(tmp) = interop_tempdir(&["containerd", "ctr"]) else {
        return;
    };
    let t0 = Instant::now();
    let layout = write_layout(
        &tmp.path().join("src"),
        vec![(
            "v1",
            Entry::Image(ImageSpec::linux(
                "amd64",
                vec![
                    LayerSpec::new("hello.bin", 3 * MIB + 3, 21),
                    LayerSpec::new("world.bin", MIB, 22),
                ],
            )),
        )],
    );
    let image = layout.image("v1").clone();

    let pier = Pier::start(&tmp.path().join("data"));
    let http = reqwest::Client::new();
    let (repo, tag) = ("interop/ctr", "v1");
    push_image(
        &http,
        &pier.url(),
        repo,
        tag,
        &layout,
        &image,
        Upload::Monolithic,
    )
    .await;

    let containerd = Containerd::start(&tmp.path().join("ctrd"));
    let reference = format!("{}/{repo}:{tag}", pier.host());
    containerd.pull_plain_http(&reference).await;
    let listed = containerd.ctr(&["images", "ls"]).await;
    assert!(
        listed
            .lines()
            .any(|l| l.contains(&reference) && l.contains(&image.manifest.digest)),
        "ctr images ls does not show {reference} at {}:\n{listed}",
        image.manifest.digest
    );

    // Unpacked: each layer's file is in the native snapshots with exactly its bytes, and one
    // snapshot (the image's top) holds them all.
    containerd.assert_unpacked(&image);
    drop(containerd);
    println!("containerd pull took {:?}", t0.elapsed());
}
