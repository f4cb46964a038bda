//! Interop tier: the real `pier` binary driven by real clients: skopeo, containerd's `ctr`, the
//! Docker Engine and podman (all in `common::clients`). Runs only with `PIER_INTEROP=1`
//! (scripts/test.sh sets it and installs the tools); then a missing tool is a failure, not a
//! skip.

mod common;

use std::path::Path;
use std::time::Instant;

use common::clients::{oci_ref, Containerd, Docker, Podman, Skopeo};
use common::{
    assert_blobs_served, assert_same_blobs, digest_of, header, interop_tempdir, one_image,
    push_image, write_layout, Descriptor, Entry, ImageSpec, LayerSpec, Pier, Upload, WrittenImage,
    KIB, MIB, OCI_INDEX, OCI_MANIFEST, REF_NAME,
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
    let layout = one_image(
        &tmp.path().join("src"),
        "app",
        vec![
            LayerSpec::new("app.conf", 4099, 1),
            LayerSpec::new("big.bin", 200 * MIB, 2),
            LayerSpec::new("lib.bin", 3 * MIB + 5, 3),
            LayerSpec::new("tiny.bin", 1, 4),
        ],
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
    let layout = one_image(
        &tmp.path().join("src"),
        "v1",
        vec![
            LayerSpec::new("hello.bin", 3 * MIB + 3, 21),
            LayerSpec::new("world.bin", MIB, 22),
        ],
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

/// pier as a plain registry: no default upstream and no built-in upstreams, so every repository
/// is hosted whatever the mirror's routing rules say about names like `library/x`.
fn start_hosted(tmp: &Path) -> Pier {
    Pier::with_config(
        tmp,
        "[mirror]\ndefault_upstream = \"\"\nbuiltin_upstreams = false\n",
        &[],
    )
}

/// What pier serves for `repo:tag`: the manifest's digest (checked against its bytes), its
/// config and its layers.
async fn served_manifest(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
) -> (String, Descriptor, Vec<Descriptor>) {
    let resp = http
        .get(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header(
            reqwest::header::ACCEPT,
            format!("{OCI_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json"),
        )
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(resp.status(), StatusCode::OK, "GET {repo}:{tag}");
    let digest = header(&resp, "docker-content-digest");
    let body = resp.bytes().await.expect("manifest body");
    assert_eq!(
        digest_of(&body),
        digest,
        "Docker-Content-Digest of {repo}:{tag}"
    );
    let m: serde_json::Value = serde_json::from_slice(&body).expect("manifest JSON");
    let desc = |v: &serde_json::Value| Descriptor {
        media_type: v["mediaType"].as_str().expect("mediaType").to_string(),
        digest: v["digest"].as_str().expect("digest").to_string(),
        size: v["size"].as_u64().expect("size"),
    };
    let layers = m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(desc)
        .collect();
    (digest, desc(&m["config"]), layers)
}

/// The digest of a layer blob's tar: the blob's own when it is an uncompressed tar, or that of
/// what `gzip -dc` makes of it (Docker and podman gzip layers on push).
async fn tar_digest(http: &reqwest::Client, base: &str, repo: &str, blob: &Descriptor) -> String {
    let bytes = http
        .get(format!("{base}/v2/{repo}/blobs/{}", blob.digest))
        .send()
        .await
        .expect("GET layer")
        .bytes()
        .await
        .expect("layer body");
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return digest_of(&bytes);
    }
    let mut gunzip = tokio::process::Command::new("gzip");
    gunzip
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = gunzip.spawn().expect("spawn gzip");
    let mut stdin = child.stdin.take().expect("gzip stdin");
    let feed = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        stdin.write_all(&bytes).await.expect("feed gzip");
    });
    let out = common::within(
        std::time::Duration::from_secs(60),
        "gzip -dc",
        child.wait_with_output(),
    )
    .await
    .expect("gzip -dc");
    feed.await.expect("feeding gzip");
    assert!(out.status.success(), "gzip -dc of {}", blob.digest);
    digest_of(&out.stdout)
}

/// Pier holds `repo:tag` as the image pushed from `image`: the config byte for byte (so the
/// same image ID), and layers that unpack to exactly the original tars, each blob served with
/// bytes matching its digest. Returns the manifest digest.
async fn assert_pushed_image(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
    image: &WrittenImage,
) -> String {
    let (digest, config, layers) = served_manifest(http, base, repo, tag).await;
    assert_eq!(config.digest, image.config.digest, "config of {repo}:{tag}");
    let mut blobs = vec![&config];
    blobs.extend(layers.iter());
    assert_blobs_served(http, base, repo, "", &blobs).await;
    let mut tars = Vec::new();
    for l in &layers {
        tars.push(tar_digest(http, base, repo, l).await);
    }
    assert_eq!(
        tars,
        image.layer_digests(),
        "layer contents of {repo}:{tag}"
    );
    digest
}

/// Docker Engine pulls a hosted image from pier, tags it into another repository, pushes it
/// there, forgets it and pulls it back: the same image ID (config digest) and layer diff IDs
/// each time, and pier holds exactly that image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_pushes_and_pulls_a_hosted_image() {
    let Some(tmp) = interop_tempdir(&["docker", "dockerd", "gzip"]) else {
        return;
    };
    let t0 = Instant::now();
    let (layout, image) = common::small_image(&tmp.path().join("src"), 31);
    let pier = start_hosted(&tmp.path().join("pier"));
    let (host, base) = (pier.host(), pier.url());
    let http = reqwest::Client::new();
    push_image(
        &http,
        &base,
        "seed/app",
        "v1",
        &layout,
        &image,
        Upload::Monolithic,
    )
    .await;

    // Docker treats registries on 127.0.0.0/8 as plain HTTP without being told.
    let docker = Docker::start(&tmp.path().join("docker"), "{}\n");
    let seed = format!("{host}/seed/app:v1");
    docker.run(&["pull", &seed]).await;
    assert_eq!(
        docker.image_id(&seed).await,
        image.config.digest,
        "image ID"
    );
    assert_eq!(docker.diff_ids(&seed).await, image.layer_digests());

    let app = format!("{host}/team/app:v1");
    docker.run(&["tag", &seed, &app]).await;
    docker.run(&["push", &app]).await;
    let pushed = assert_pushed_image(&http, &base, "team/app", "v1", &image).await;

    docker.run(&["rmi", &seed, &app]).await;
    let left = docker.run(&["images", "-q"]).await;
    assert!(left.trim().is_empty(), "images left after rmi: {left}");
    docker.run(&["pull", &app]).await;
    assert_eq!(
        docker.image_id(&app).await,
        image.config.digest,
        "image ID pulled back"
    );
    assert_eq!(docker.diff_ids(&app).await, image.layer_digests());
    let repo_digest = docker
        .run(&[
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            &app,
        ])
        .await;
    assert!(
        repo_digest.contains(&format!("{host}/team/app@{pushed}")),
        "RepoDigests of {app}: {repo_digest}, pier has {pushed}"
    );
    drop(docker);
    println!("docker push and pulls took {:?}", t0.elapsed());
}

/// podman loads an image from an OCI layout, pushes it to pier, forgets it and pulls it back:
/// the same image ID and the digest its push reported, and pier holds exactly that image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pushes_and_pulls_back() {
    let Some(tmp) = interop_tempdir(&["podman", "gzip"]) else {
        return;
    };
    let t0 = Instant::now();
    let (layout, image) = common::small_image(&tmp.path().join("src"), 41);
    let pier = start_hosted(&tmp.path().join("pier"));
    let (host, base) = (pier.host(), pier.url());
    let http = reqwest::Client::new();
    let podman = Podman::new(&tmp.path().join("podman"));
    let policy = podman.policy();
    let config_hex = image.config.hex().to_string();

    // `podman pull oci:<dir>` names the image after the directory, which a tempdir's
    // mixed-case name makes an invalid reference; `podman load` of an OCI archive does not.
    let archive = tmp.path().join("image.oci.tar");
    {
        let mut tar = tar::Builder::new(std::fs::File::create(&archive).expect("create archive"));
        tar.append_dir_all(".", &layout.dir)
            .expect("archive the layout");
        tar.finish().expect("finish the archive");
    }
    let loaded = podman
        .run(&[
            "load",
            "--signature-policy",
            &policy,
            "-i",
            &archive.display().to_string(),
        ])
        .await;
    assert!(loaded.contains("Loaded image"), "podman load: {loaded}");
    assert_eq!(
        podman.inspect(&config_hex, "{{.Id}}").await,
        config_hex,
        "the loaded image's ID is its config digest"
    );
    let app = format!("{host}/team/app:v1");
    podman.run(&["tag", &config_hex, &app]).await;
    let digest_file = tmp.path().join("pushed.digest");
    let digest_arg = digest_file.display().to_string();
    podman
        .run(&[
            "push",
            "--tls-verify=false",
            "--signature-policy",
            &policy,
            "--digestfile",
            &digest_arg,
            &app,
        ])
        .await;
    let reported = std::fs::read_to_string(&digest_file).expect("read the digest file");
    let pushed = assert_pushed_image(&http, &base, "team/app", "v1", &image).await;
    assert_eq!(
        reported.trim(),
        pushed,
        "the digest podman reported is the one pier serves"
    );

    podman.run(&["rmi", "--all", "--force"]).await;
    let left = podman.run(&["images", "-q"]).await;
    assert!(left.trim().is_empty(), "images left after rmi: {left}");
    podman
        .run(&[
            "pull",
            "--tls-verify=false",
            "--signature-policy",
            &policy,
            &app,
        ])
        .await;
    assert_eq!(
        podman.inspect(&app, "{{.Id}}").await,
        config_hex,
        "image ID"
    );
    assert_eq!(
        podman.inspect(&app, "{{.Digest}}").await,
        pushed,
        "image digest"
    );
    println!("podman load, push and pull took {:?}", t0.elapsed());
}

/// The same clients against a pier whose blobs are in S3 and whose metadata is in PostgreSQL
/// (scripts/storage-services.sh): a skopeo round trip and a containerd pull.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_and_containerd_on_s3_and_postgres() {
    let Some(tmp) = interop_tempdir(&["skopeo", "containerd", "ctr"]) else {
        return;
    };
    let Some(storage) = common::SharedStorage::from_env("interop on S3 + PostgreSQL") else {
        return;
    };
    let t0 = Instant::now();
    let layout = one_image(
        &tmp.path().join("src"),
        "app",
        vec![
            LayerSpec::new("big.bin", 20 * MIB + 7, 31),
            LayerSpec::new("small.bin", 3 * KIB, 32),
        ],
    );
    let image = layout.image("app").clone();
    let pier = Pier::with_config(
        tmp.path(),
        &storage.deployment_config().await,
        &["--hosted", "**"],
    );
    let host = pier.host();
    let http = reqwest::Client::new();

    let skopeo = Skopeo::new(tmp.path());
    let pushed = format!("docker://{host}/s3pg/app:1");
    skopeo.copy(&oci_ref(&layout.dir, "app"), &pushed).await;
    let raw = skopeo.inspect_raw(&pushed).await;
    assert_eq!(raw, image.manifest_bytes, "manifest bytes as pushed");
    let back = skopeo.writable_dir(&tmp.path().join("back"));
    skopeo.copy(&pushed, &oci_ref(&back, "pulled")).await;
    assert_eq!(layout_ref(&back, "pulled"), image.manifest.digest);
    assert_same_blobs(&layout, &back, &image.digests());
    assert_blobs_served(&http, &pier.url(), "s3pg/app", "", &image.blobs()).await;

    let containerd = Containerd::start(&tmp.path().join("ctrd"));
    let reference = format!("{host}/s3pg/app:1");
    containerd.pull_plain_http(&reference).await;
    containerd.assert_unpacked(&image);
    drop(containerd);
    println!("S3 + PostgreSQL interop took {:?}", t0.elapsed());
}
