//! Mirror interop tier: the real `pier` binary as a pull-through mirror in front of the CNCF
//! distribution registry (`docker-registry`), pulled from by containerd, Docker Engine, podman,
//! skopeo and plain HTTP clients, with upstreams that fail over, die, corrupt bytes and demand bearer tokens.
//!
//! Runs only with `PIER_INTEROP=1` (then a missing tool is a failure, not a skip). Every
//! process and server listens on 127.0.0.1 on a free port, keeps its files in the test's
//! tempdir, and is killed when the test ends, however it ends.

mod common;
mod mirror_support;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::clients::{oci_ref, Containerd, Docker, Podman, Skopeo};
use common::{
    assert_same_blobs, digest_of, error_code, header, interop_tempdir, one_image, pier_cli_ok,
    require, try_digest_of_response, within, write_layout, Entry, ImageSpec, Launch, LayerSpec,
    Layout, Metrics, Pier, WrittenImage, KIB, MIB,
};
use mirror_support::{
    http_client, pull_http, start_mirror, upstream_table, CorruptingProxy, Registry, SigningKey,
    TcpProxy, TokenIssuer, MANIFEST_ACCEPT,
};
use reqwest::StatusCode;

const REQUESTS: &str = "pier_mirror_requests_total";
const UPSTREAM_BYTES: &str = "pier_mirror_upstream_bytes_total";

/// `pier_mirror_requests_total` of `upstream`'s requests for a `kind` ("blob", "manifest") that
/// ended as `result` ("miss", "hit", "shared", "stale").
fn requests(m: &Metrics, upstream: &str, kind: &str, result: &str) -> f64 {
    m.sum(
        REQUESTS,
        &[("upstream", upstream), ("kind", kind), ("result", result)],
    )
}

/// `pier_mirror_upstream_bytes_total` of `upstream`: what pier fetched from it.
fn upstream_bytes(m: &Metrics, upstream: &str) -> f64 {
    m.sum(UPSTREAM_BYTES, &[("upstream", upstream)])
}

/// `pier config containerd` for `pier`, with `args` (`--config`, `--upstream`): writes
/// `<certs>/<registry>/hosts.toml`. Returns the certs dir.
fn containerd_hosts(certs: &Path, pier: &Pier, args: &[String]) -> PathBuf {
    let certs_dir = certs.display().to_string();
    let mut words = [
        "config",
        "containerd",
        "--certs-dir",
        &certs_dir,
        "--pier",
        &pier.url(),
    ]
    .map(String::from)
    .to_vec();
    words.extend_from_slice(args);
    pier_cli_ok(&words);
    certs.to_path_buf()
}

/// What most tests start from: a one-image layout in `tmp/src` tagged `tag`, its image, and an
/// empty registry ([`Registry::start_in`]) to push it to.
fn image_and_registry(
    tmp: &Path,
    tag: &str,
    layers: Vec<LayerSpec>,
) -> (Layout, WrittenImage, Registry) {
    let layout = one_image(&tmp.join("src"), tag, layers);
    let image = layout.image(tag).clone();
    (layout, image, Registry::start_in(tmp))
}

/// [`image_and_registry`] with the image pushed to the registry over HTTP as `repo:v1`.
async fn pushed_image(tmp: &Path, repo: &str, layers: Vec<LayerSpec>) -> (WrittenImage, Registry) {
    let (layout, image, registry) = image_and_registry(tmp, "v1", layers);
    registry
        .push(&http_client(), repo, "v1", &layout, &image)
        .await;
    (image, registry)
}

/// `GET url`, asserting 200: the body's digest and length, or the error that broke it off.
async fn get_body(http: &reqwest::Client, url: &str) -> Result<(String, u64), reqwest::Error> {
    let resp = http.get(url).send().await.expect("GET the blob");
    assert_eq!(resp.status(), StatusCode::OK, "GET {url}");
    try_digest_of_response(resp).await
}

/// 1. containerd, configured by `pier config containerd`, pulls a multi-layer image through
/// pier (`?ns=`); after the image is removed from containerd, a second pull is served entirely
/// from pier's cache: no blob is fetched from the upstream twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_hosts_toml_then_warm_from_cache() {
    let Some(tmp) = interop_tempdir(&["docker-registry", "skopeo", "containerd", "ctr"]) else {
        return;
    };
    let t0 = Instant::now();
    let skopeo = Skopeo::new(tmp.path());
    let (layout, image, registry) = image_and_registry(
        tmp.path(),
        "v1",
        vec![
            LayerSpec::new("app.conf", 4099, 101),
            LayerSpec::new("app.bin", 6 * MIB + 7, 102),
            LayerSpec::new("data.bin", MIB, 103),
        ],
    );
    let dest = format!("docker://{}/team/app:v1", registry.host());
    skopeo.copy(&oci_ref(&layout.dir, "v1"), &dest).await;
    let pushed = registry.accesses().len();

    // The image reference names `localhost:<port>`, not the 127.0.0.1 pier and the registry
    // listen on, so containerd treats pier as a mirror and sends `?ns=localhost:<port>`.
    let upstream = format!("localhost:{}", registry.port());
    let up = upstream.as_str();
    let (pier, flags) = start_mirror(
        tmp.path(),
        false,
        "",
        &[format!("{upstream}={}", registry.url())],
    );
    let http = http_client();

    let certs = containerd_hosts(&tmp.path().join("certs.d"), &pier, &flags);
    let written: Vec<_> = std::fs::read_dir(&certs)
        .expect("read certs.d")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(written, vec![upstream.clone()], "hosts.toml directories");
    let hosts =
        std::fs::read_to_string(certs.join(&upstream).join("hosts.toml")).expect("read hosts.toml");
    assert!(
        hosts.contains(&format!("server = \"{}\"", registry.url()))
            && hosts.contains(&format!("[host.\"{}\"]", pier.url())),
        "hosts.toml:\n{hosts}"
    );

    let containerd = Containerd::start(&tmp.path().join("ctrd"));
    let reference = format!("{upstream}/team/app:v1");
    let blobs = image.blobs();
    let blob_bytes: u64 = blobs.iter().map(|b| b.size).sum();
    let n = blobs.len() as f64;

    // Cold: every blob is filled from the upstream once.
    containerd.pull(&certs, &reference).await;
    containerd.assert_unpacked(&image);
    let cold = pier.metrics(&http).await;
    assert_eq!(requests(&cold, up, "blob", "miss"), n, "cold blob misses");
    assert_eq!(requests(&cold, up, "blob", "hit"), 0.0, "cold blob hits");
    assert_eq!(
        upstream_bytes(&cold, up),
        blob_bytes as f64,
        "bytes fetched from the upstream on the cold pull"
    );

    // Forget the image in containerd, content and snapshots included.
    containerd
        .ctr(&["images", "rm", "--sync", &reference])
        .await;
    let content = containerd.ctr(&["content", "ls", "-q"]).await;
    for d in image.blob_digests() {
        assert!(
            !content.contains(&d),
            "containerd still holds {d} after images rm:\n{content}"
        );
    }

    // Warm: the same blobs again, every one a hit, nothing more from the upstream.
    containerd.pull(&certs, &reference).await;
    containerd.assert_unpacked(&image);
    let warm = pier.metrics(&http).await;
    assert_eq!(
        requests(&warm, up, "blob", "hit"),
        n,
        "warm pull: every blob from pier's cache"
    );
    assert_eq!(requests(&warm, up, "blob", "miss"), n, "no new blob misses");
    assert_eq!(
        upstream_bytes(&warm, up),
        blob_bytes as f64,
        "the warm pull fetched nothing from the upstream"
    );
    assert_eq!(
        requests(&warm, up, "manifest", "miss"),
        requests(&cold, up, "manifest", "miss"),
        "the warm pull resolved the tag from pier's cache (within its TTL)"
    );
    assert!(requests(&warm, up, "manifest", "hit") > requests(&cold, up, "manifest", "hit"));

    // The upstream's own account: each blob served once, and only ever to pier (containerd
    // never fell back to the registry itself).
    let since_push: Vec<_> = registry.accesses().split_off(pushed);
    for b in &blobs {
        let path = format!("/v2/team/app/blobs/{}", b.digest);
        let gets: Vec<_> = since_push
            .iter()
            .filter(|a| a.method == "GET" && a.path == path)
            .collect();
        assert_eq!(gets.len(), 1, "upstream GETs of {}: {gets:?}", b.digest);
        assert_eq!(gets[0].status, 200);
        assert_eq!(
            gets[0].written, b.size,
            "bytes the upstream sent for {}",
            b.digest
        );
    }
    let strangers: Vec<_> = since_push
        .iter()
        .filter(|a| !a.user_agent.starts_with("pier/"))
        .collect();
    assert!(
        strangers.is_empty(),
        "requests reached the upstream without pier: {strangers:?}"
    );
    println!(
        "containerd cold + warm pull through pier: {:?}",
        t0.elapsed()
    );
}

/// 2. Sixteen clients ask at once for a 200 MiB layer pier does not have: all get exactly its
/// bytes, and the upstream sends them once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_gets_share_one_upstream_fetch() {
    let Some(tmp) = interop_tempdir(&["docker-registry"]) else {
        return;
    };
    let t0 = Instant::now();
    let (image, registry) = pushed_image(
        tmp.path(),
        "team/big",
        vec![LayerSpec::new("big.bin", 200 * MIB, 201)],
    )
    .await;
    let layer = image.layers[0].blob.clone();
    assert!(layer.size >= 200 * MIB);
    let http = http_client();
    println!("200 MiB layer written and pushed: {:?}", t0.elapsed());

    let upstream = format!("localhost:{}", registry.port());
    let up = upstream.as_str();
    let (pier, _) = start_mirror(
        tmp.path(),
        false,
        "",
        &[format!("{upstream}={}", registry.url())],
    );

    // Path-prefix route: /v2/localhost:<port>/team/big/blobs/<digest>.
    let url = format!(
        "{}/v2/{upstream}/team/big/blobs/{}",
        pier.url(),
        layer.digest
    );
    let clients = 16;
    let barrier = Arc::new(tokio::sync::Barrier::new(clients));
    let t1 = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (http, url, barrier) = (http.clone(), url.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let resp = http.get(&url).send().await.expect("GET the layer");
                assert_eq!(resp.status(), StatusCode::OK, "client {i}");
                let length = resp.content_length();
                let got = try_digest_of_response(resp)
                    .await
                    .unwrap_or_else(|e| panic!("client {i}: body broke: {e}"));
                (i, length, got)
            })
        })
        .collect();
    for t in tasks {
        let (i, length, (digest, len)) = within(Duration::from_secs(120), "16 GETs", t)
            .await
            .expect("client task");
        assert_eq!(length, Some(layer.size), "client {i}: Content-Length");
        assert_eq!(len, layer.size, "client {i}: bytes received");
        assert_eq!(digest, layer.digest, "client {i}: sha256 of the body");
    }
    println!("16 concurrent cold GETs of 200 MiB: {:?}", t1.elapsed());

    let gets = registry
        .wait_blob_gets("team/big", &layer.digest, |g| !g.is_empty())
        .await;
    assert_eq!(gets.len(), 1, "upstream GETs of the layer: {gets:?}");
    assert_eq!(gets[0].status, 200);
    assert_eq!(
        gets[0].written, layer.size,
        "the upstream sent the layer's bytes exactly once"
    );
    let m = pier.metrics(&http).await;
    assert_eq!(requests(&m, up, "blob", "miss"), 1.0, "one fill");
    assert_eq!(
        requests(&m, up, "blob", "miss")
            + requests(&m, up, "blob", "shared")
            + requests(&m, up, "blob", "hit"),
        clients as f64,
        "every client counted as miss, shared or hit"
    );
    assert_eq!(upstream_bytes(&m, up), layer.size as f64);
    println!("concurrent cold GETs: {:?}", t0.elapsed());
}

/// 3. The first endpoint dies in the middle of a blob: pier resumes from the second with a
/// `Range` request, and the client gets the whole blob, unbroken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_dying_mid_stream_fails_over_with_range() {
    let Some(tmp) = interop_tempdir(&["docker-registry"]) else {
        return;
    };
    let t0 = Instant::now();
    let (image, registry) = pushed_image(
        tmp.path(),
        "team/stream",
        vec![LayerSpec::new("stream.bin", 64 * MIB, 301)],
    )
    .await;
    let layer = image.layers[0].blob.clone();
    let http = http_client();

    // Endpoint 1: a proxy passing 16 MiB/s; endpoint 2: the registry itself.
    let proxy = TcpProxy::start(registry.port(), 16 * MIB).await;
    let endpoints = [proxy.url(), registry.url()];
    let tables = upstream_table("failover.test", &endpoints, "");
    let (pier, _) = start_mirror(tmp.path(), false, &tables, &[]);

    let url = format!(
        "{}/v2/team/stream/blobs/{}?ns=failover.test",
        pier.url(),
        layer.digest
    );
    let client = {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move { get_body(&http, &url).await })
    };
    within(Duration::from_secs(30), "8 MiB through the proxy", async {
        while proxy.forwarded() < 8 * MIB {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    proxy.kill();
    let at_kill = proxy.forwarded();
    assert!(
        at_kill < layer.size,
        "the proxy passed the whole blob ({at_kill} bytes) before it was killed"
    );
    println!("proxy killed after {at_kill} bytes");

    let (digest, len) = within(Duration::from_secs(60), "the client's GET", client)
        .await
        .expect("client task")
        .expect("the client's body must not break when an endpoint dies");
    assert_eq!(len, layer.size, "bytes the client received");
    assert_eq!(digest, layer.digest, "sha256 of what the client received");

    // The upstream saw the GET through the proxy cut short, then a Range GET straight to it.
    let gets = registry
        .wait_blob_gets("team/stream", &layer.digest, |g| g.len() >= 2)
        .await;
    let via_proxy: Vec<_> = gets.iter().filter(|a| a.host == proxy.host()).collect();
    let direct: Vec<_> = gets.iter().filter(|a| a.host == registry.host()).collect();
    assert_eq!(via_proxy.len(), 1, "GETs through the proxy: {gets:?}");
    assert!(via_proxy[0].written < layer.size, "{gets:?}");
    assert_eq!(direct.len(), 1, "GETs straight to the registry: {gets:?}");
    assert_eq!(
        direct[0].status, 206,
        "the resume is a Range request: {gets:?}"
    );
    assert!(direct[0].written < layer.size, "{gets:?}");

    let m = pier.metrics(&http).await;
    assert_eq!(
        upstream_bytes(&m, "failover.test"),
        layer.size as f64,
        "pier received each byte once across both endpoints"
    );
    assert_eq!(
        m.sum(
            "pier_upstream_endpoint_healthy",
            &[("upstream", "failover.test"), ("endpoint", &proxy.url())]
        ),
        0.0,
        "the dead endpoint is benched"
    );
    assert!(pier.log().contains("resuming"), "pier logged the resume");

    // And it is cached whole.
    let (digest, _) = get_body(&http, &url).await.expect("cached body");
    assert_eq!(digest, layer.digest);
    let m = pier.metrics(&http).await;
    assert_eq!(
        requests(&m, "failover.test", "blob", "miss"),
        1.0,
        "{}",
        m.0
    );
    assert_eq!(
        upstream_bytes(&m, "failover.test"),
        layer.size as f64,
        "the second GET fetched nothing"
    );

    // New requests go to the live endpoint: the whole image pulls by tag.
    let cache = pull_http(
        &http,
        &pier.url(),
        "team/stream",
        "v1",
        "?ns=failover.test",
        &image,
    )
    .await;
    assert_eq!(cache, "miss");
    println!("failover mid-stream: {:?}", t0.elapsed());
}

/// 4. With the upstream gone, an image pulled once still pulls by tag into a fresh containerd:
/// the tag's TTL has passed, revalidation fails, and pier serves what it has (`stale`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_pulls_by_tag_from_cache() {
    let Some(tmp) = interop_tempdir(&["docker-registry", "containerd", "ctr"]) else {
        return;
    };
    let t0 = Instant::now();
    let (image, mut registry) = pushed_image(
        tmp.path(),
        "team/keep",
        vec![
            LayerSpec::new("keep.bin", 2 * MIB + 1, 401),
            LayerSpec::new("keep.conf", 3 * KIB, 402),
        ],
    )
    .await;
    let http = http_client();

    let upstream = format!("localhost:{}", registry.port());
    let tables = upstream_table(&upstream, &[registry.url()], "tag_ttl = 1\n");
    let (pier, flags) = start_mirror(tmp.path(), false, &tables, &[]);
    let certs = containerd_hosts(&tmp.path().join("certs.d"), &pier, &flags);
    let reference = format!("{upstream}/team/keep:v1");

    {
        let first = Containerd::start(&tmp.path().join("ctrd-1"));
        first.pull(&certs, &reference).await;
        first.assert_unpacked(&image);
    }

    registry.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fresh = Containerd::start(&tmp.path().join("ctrd-2"));
    assert!(fresh.snapshot_dirs().is_empty(), "a fresh containerd");
    fresh.pull(&certs, &reference).await;
    fresh.assert_unpacked(&image);

    let resp = http
        .get(format!(
            "{}/v2/team/keep/manifests/v1?ns={upstream}",
            pier.url()
        ))
        .header(reqwest::header::ACCEPT, MANIFEST_ACCEPT)
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-pier-cache"), "stale");
    assert_eq!(
        resp.bytes().await.expect("manifest").as_ref(),
        image.manifest_bytes.as_slice()
    );
    let m = pier.metrics(&http).await;
    assert!(
        requests(&m, &upstream, "manifest", "stale") >= 2.0,
        "stale manifests served (containerd's and ours):\n{}",
        m.0
    );
    assert!(
        pier.log().contains("serving the cached manifest"),
        "pier warned that it served a stale manifest"
    );
    println!("upstream down: {:?}", t0.elapsed());
}

/// 5. An upstream that flips a byte: the client's download is aborted (never a clean end with
/// wrong bytes), nothing is cached, and once the upstream behaves the blob is fetched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_upstream_bytes_abort_the_download_and_are_not_cached() {
    let Some(tmp) = interop_tempdir(&["docker-registry"]) else {
        return;
    };
    let t0 = Instant::now();
    let (image, registry) = pushed_image(
        tmp.path(),
        "team/fragile",
        vec![LayerSpec::new("fragile.bin", 4 * MIB + 3, 501)],
    )
    .await;
    let layer = image.layers[0].blob.clone();
    let http = http_client();
    let proxy = CorruptingProxy::start(&registry.url()).await;
    let tables = upstream_table("flaky.test", &[proxy.url()], "");
    let (pier, _) = start_mirror(tmp.path(), false, &tables, &[]);
    let url = format!(
        "{}/v2/flaky.test/team/fragile/blobs/{}",
        pier.url(),
        layer.digest
    );
    let upstream_path = format!("/v2/team/fragile/blobs/{}", layer.digest);

    // pier answers 200 and streams while it fills; the body must then break off.
    let read = within(
        Duration::from_secs(60),
        "the corrupt body",
        get_body(&http, &url),
    )
    .await;
    match read {
        Err(e) => println!("body aborted as it should be: {e}"),
        Ok((digest, len)) => panic!(
            "the client got a complete body ({len} bytes, {digest}) from a corrupt upstream; \
             it must be aborted"
        ),
    }
    assert_eq!(proxy.gets_of(&upstream_path), 1);

    // The failed fill is over and counted; nothing of it was kept.
    let m = within(Duration::from_secs(10), "the fill to end", async {
        loop {
            let m = pier.metrics(&http).await;
            if m.sum("pier_mirror_fills_in_flight", &[]) == 0.0 {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        m.sum("pier_mirror_corrupt_total", &[("upstream", "flaky.test")]) >= 1.0,
        "corruption counted:\n{}",
        m.0
    );
    assert!(
        pier.log().contains("fill failed"),
        "pier logged the failed fill"
    );

    proxy.corrupt.store(false, Ordering::Relaxed);
    let resp = http.head(&url).send().await.expect("HEAD the blob");
    assert_eq!(resp.status(), StatusCode::OK, "HEAD after the corrupt fill");
    // (reqwest's content_length() is the body's length, 0 for a HEAD: read the header.)
    assert_eq!(header(&resp, "content-length"), layer.size.to_string());
    let (digest, len) = get_body(&http, &url)
        .await
        .expect("an intact body once the upstream behaves");
    assert_eq!((digest.as_str(), len), (layer.digest.as_str(), layer.size));
    assert_eq!(
        proxy.gets_of(&upstream_path),
        2,
        "the corrupt copy was not cached: pier fetched the blob again"
    );
    // Now it is cached.
    let (digest, _) = get_body(&http, &url).await.expect("cached body");
    assert_eq!(digest, layer.digest);
    assert_eq!(proxy.gets_of(&upstream_path), 2, "served from the cache");
    let m = pier.metrics(&http).await;
    let blob = |result| requests(&m, "flaky.test", "blob", result);
    assert_eq!(blob("miss"), 2.0, "{}", m.0);
    // A hit, or (should the fill still be committing) a reader joining it.
    assert_eq!(blob("hit") + blob("shared"), 1.0, "{}", m.0);
    println!("corrupt upstream: {:?}", t0.elapsed());
}

/// An upstream behind bearer-token auth: distribution's `auth: token` trusting an issuer
/// written here, holding `team/private` (credentials needed) and `team/public` (anonymous
/// pulls allowed), and a pier with three upstreams on it: `auth.test` with the right
/// credentials, `anon.test` without any, `wrong.test` with a wrong password.
struct TokenSetup {
    // Field order is drop order: pier first, the tempdir last.
    pier: Pier,
    _registry: Registry,
    issuer: TokenIssuer,
    private_image: WrittenImage,
    public_image: WrittenImage,
    http: reqwest::Client,
    _tmp: tempfile::TempDir,
}

impl TokenSetup {
    async fn start() -> TokenSetup {
        let tmp = tempfile::tempdir().expect("tempdir");
        let private = one_image(
            &tmp.path().join("private"),
            "v1",
            vec![
                LayerSpec::new("secret.bin", 512 * KIB + 1, 601),
                LayerSpec::new("secret.conf", 700, 602),
            ],
        );
        let public = one_image(
            &tmp.path().join("public"),
            "v1",
            vec![LayerSpec::new("open.bin", 300 * KIB, 603)],
        );
        let (private_image, public_image) =
            (private.image("v1").clone(), public.image("v1").clone());
        let http = http_client();

        // Fill the storage through a registry without auth, then serve it with token auth.
        let storage = tmp.path().join("storage");
        {
            let open = Registry::start(&tmp.path().join("open-registry"), &storage, "");
            open.push(&http, "team/private", "v1", &private, &private_image)
                .await;
            open.push(&http, "team/public", "v1", &public, &public_image)
                .await;
        }
        let key = SigningKey::generate(&tmp.path().join("keys"));
        let issuer = TokenIssuer::start(&key, "puller", "s3cret", &["team/private"]).await;
        let registry = Registry::start(
            &tmp.path().join("registry"),
            &storage,
            &issuer.registry_auth(&key),
        );
        let resp = http
            .get(format!("{}/v2/team/public/manifests/v1", registry.url()))
            .send()
            .await
            .expect("GET without a token");
        assert_eq!(
            resp.status(),
            StatusCode::UNAUTHORIZED,
            "the registry demands tokens"
        );
        let challenge = header(&resp, "www-authenticate");
        assert!(
            challenge.starts_with("Bearer ") && challenge.contains(&issuer.realm()),
            "challenge: {challenge}"
        );

        let endpoint = [registry.url()];
        let tables = [
            upstream_table(
                "auth.test",
                &endpoint,
                "username = \"puller\"\npassword = \"s3cret\"\n",
            ),
            upstream_table("anon.test", &endpoint, ""),
            upstream_table(
                "wrong.test",
                &endpoint,
                "username = \"puller\"\npassword = \"guess\"\n",
            ),
        ];
        let (pier, _) = start_mirror(tmp.path(), false, &tables.join("\n"), &[]);
        TokenSetup {
            pier,
            _registry: registry,
            issuer,
            private_image,
            public_image,
            http,
            _tmp: tmp,
        }
    }

    /// `method path` through pier: the status and the OCI error code ("" for a success).
    async fn status(&self, method: reqwest::Method, path: &str) -> (StatusCode, String) {
        let url = format!("{}{path}", self.pier.url());
        let resp = self
            .http
            .request(method.clone(), &url)
            .header(reqwest::header::ACCEPT, MANIFEST_ACCEPT)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status();
        let body = resp.bytes().await.expect("body");
        let code = if status.is_success() || method == reqwest::Method::HEAD {
            String::new()
        } else {
            error_code(&body)
        };
        println!(
            "{method} {path}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        (status, code)
    }
}

/// 6. An upstream behind bearer-token auth: pier pulls a private repository with the
/// configured credentials, is refused (403 `DENIED`) without them or with wrong ones, and pulls
/// a public repository anonymously.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_upstream_with_and_without_credentials() {
    if !require(&["docker-registry", "openssl"]) {
        return;
    }
    let t0 = Instant::now();
    let t = TokenSetup::start().await;
    let (http, base, issuer) = (&t.http, t.pier.url(), &t.issuer);

    // With credentials: the private image pulls.
    let cache = pull_http(
        http,
        &base,
        "auth.test/team/private",
        "v1",
        "",
        &t.private_image,
    )
    .await;
    assert_eq!(cache, "miss");
    assert!(
        issuer.stats.authenticated.load(Ordering::Relaxed) >= 1,
        "pier fetched its token with the credentials"
    );

    // Without: refused, and pier says so.
    let refused_before = issuer.stats.refused.load(Ordering::Relaxed);
    let forbidden = (StatusCode::FORBIDDEN, "DENIED".to_string());
    assert_eq!(
        t.status(
            reqwest::Method::GET,
            "/v2/anon.test/team/private/manifests/v1"
        )
        .await,
        forbidden
    );
    assert!(issuer.stats.refused.load(Ordering::Relaxed) > refused_before);
    // Wrong credentials are refused even for a public repository.
    assert_eq!(
        t.status(
            reqwest::Method::GET,
            "/v2/wrong.test/team/public/manifests/v1"
        )
        .await,
        forbidden
    );

    // Anonymous pulls of a public repository work.
    let anonymous_before = issuer.stats.anonymous.load(Ordering::Relaxed);
    pull_http(
        http,
        &base,
        "anon.test/team/public",
        "v1",
        "",
        &t.public_image,
    )
    .await;
    assert!(
        issuer.stats.anonymous.load(Ordering::Relaxed) > anonymous_before,
        "pier fetched an anonymous token"
    );
    println!("bearer tokens: {:?}", t0.elapsed());
}

/// 6b. A blob the upstream refuses to pier is refused to the client the way a manifest is:
/// 403 `DENIED` (docs/mirror.md: "401/403 after authenticating → 403 DENIED"), for `GET` as
/// for `HEAD`, so a user sees an access problem, not an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_upstream_refusing_a_blob_answers_403() {
    if !require(&["docker-registry", "openssl"]) {
        return;
    }
    let t = TokenSetup::start().await;
    let forbidden = (StatusCode::FORBIDDEN, "DENIED".to_string());
    let private_blob = format!(
        "/v2/anon.test/team/private/blobs/{}",
        t.private_image.layers[0].blob.digest
    );
    let public_blob = format!(
        "/v2/wrong.test/team/public/blobs/{}",
        t.public_image.layers[0].blob.digest
    );
    assert_eq!(
        t.status(reqwest::Method::HEAD, &private_blob).await.0,
        StatusCode::FORBIDDEN,
        "HEAD {private_blob}"
    );
    assert_eq!(
        t.status(reqwest::Method::GET, &private_blob).await,
        forbidden,
        "GET {private_blob} without credentials"
    );
    assert_eq!(
        t.status(reqwest::Method::GET, &public_blob).await,
        forbidden,
        "GET {public_blob} with wrong credentials"
    );
}

/// 7. skopeo reaches a mirrored Docker Hub image through pier's path prefix
/// (`pier/docker.io/library/<name>`), with the built-in docker.io pointed at a local registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_inspects_and_copies_through_the_path_prefix() {
    let Some(tmp) = interop_tempdir(&["docker-registry", "skopeo"]) else {
        return;
    };
    let t0 = Instant::now();
    let skopeo = Skopeo::new(tmp.path());
    let (layout, image, registry) = image_and_registry(
        tmp.path(),
        "1.0",
        vec![
            LayerSpec::new("hello.bin", MIB + 11, 701),
            LayerSpec::new("hello.conf", 99, 702),
        ],
    );
    let dest = format!("docker://{}/library/hello:1.0", registry.host());
    skopeo.copy(&oci_ref(&layout.dir, "1.0"), &dest).await;
    let pushed = registry.accesses().len();

    // Built-in upstreams on, docker.io overridden by the flag.
    let (pier, _) = start_mirror(
        tmp.path(),
        true,
        "",
        &[format!("docker.io={}", registry.url())],
    );
    let mirrored = format!("docker://{}/docker.io/library/hello:1.0", pier.host());

    let info = skopeo.inspect(&mirrored).await;
    assert_eq!(info["Digest"], image.manifest.digest.as_str(), "{info}");
    let layers = serde_json::json!(image.layer_digests());
    assert_eq!(info["Layers"], layers, "{info}");
    assert_eq!(info["Architecture"], "amd64", "{info}");
    assert_eq!(info["Os"], "linux", "{info}");

    let raw = skopeo.inspect_raw(&mirrored).await;
    assert_eq!(raw, image.manifest_bytes, "exact manifest bytes");
    // Docker Hub's short names are normalised: docker.io/hello is docker.io/library/hello.
    let short = format!("docker://{}/docker.io/hello:1.0", pier.host());
    let raw = skopeo.inspect_raw(&short).await;
    assert_eq!(digest_of(&raw), image.manifest.digest, "docker.io/hello");
    let tags: serde_json::Value = serde_json::from_slice(
        &skopeo
            .run(&[
                "list-tags",
                "--tls-verify=false",
                &format!("docker://{}/docker.io/library/hello", pier.host()),
            ])
            .await,
    )
    .expect("skopeo list-tags JSON");
    assert_eq!(tags["Tags"], serde_json::json!(["1.0"]), "{tags}");

    // A whole copy out through the prefix, byte for byte.
    let back = skopeo.writable_dir(&tmp.path().join("back"));
    skopeo.copy(&mirrored, &oci_ref(&back, "1.0")).await;
    assert_same_blobs(&layout, &back, &image.blob_digests());
    let since_push: Vec<_> = registry.accesses().split_off(pushed);
    assert!(
        !since_push.is_empty() && since_push.iter().all(|a| a.user_agent.starts_with("pier/")),
        "the registry was reached only through pier: {since_push:?}"
    );
    let m = pier.metrics(&http_client()).await;
    assert!(
        m.sum(REQUESTS, &[("upstream", "docker.io"), ("kind", "manifest")]) >= 1.0,
        "requests counted under docker.io:\n{}",
        m.0
    );
    println!("skopeo through the path prefix: {:?}", t0.elapsed());
}

/// `pier config <client> --pier <pier>` with `args` (`--upstream`): the printed text.
fn client_config(client: &str, pier: &Pier, args: &[String]) -> String {
    let mut words = ["config", client, "--pier", &pier.url()]
        .map(String::from)
        .to_vec();
    words.extend_from_slice(args);
    pier_cli_ok(&words)
}

/// The upstream served every blob of `image` in `repo` once, only to pier, and nothing since
/// `pushed` (the number of requests the push itself made) reached it from anyone else.
fn assert_fetched_once_by_pier(
    registry: &Registry,
    pushed: usize,
    repo: &str,
    image: &WrittenImage,
) {
    let since_push: Vec<_> = registry.accesses().split_off(pushed);
    for b in image.blobs() {
        let path = format!("/v2/{repo}/blobs/{}", b.digest);
        let gets: Vec<_> = since_push
            .iter()
            .filter(|a| a.method == "GET" && a.path == path)
            .collect();
        assert_eq!(gets.len(), 1, "upstream GETs of {}: {gets:?}", b.digest);
        assert_eq!(
            (gets[0].status, gets[0].written),
            (200, b.size),
            "the upstream's answer for {}",
            b.digest
        );
    }
    let strangers: Vec<_> = since_push
        .iter()
        .filter(|a| !a.user_agent.starts_with("pier/"))
        .collect();
    assert!(
        strangers.is_empty(),
        "requests reached the upstream without pier: {strangers:?}"
    );
}

/// Docker Engine, configured with the `daemon.json` that `pier config docker` prints, pulls
/// `pierdemo:v1` (Docker Hub's `library/pierdemo`): the request goes to pier as its
/// `registry-mirrors` entry, pier's default upstream (docker.io, here pointed at a local
/// registry) fetches it, and Docker ends up with the image's ID and verified layers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_pulls_through_registry_mirrors_and_the_default_upstream() {
    let Some(tmp) = interop_tempdir(&["docker-registry", "docker", "dockerd"]) else {
        return;
    };
    let t0 = Instant::now();
    let (layout, image, registry) = image_and_registry(
        tmp.path(),
        "v1",
        vec![
            LayerSpec::new("etc/demo.conf", 333, 901),
            LayerSpec::new("demo.bin", 3 * MIB + 1, 902),
        ],
    );
    let http = http_client();
    registry
        .push(&http, "library/pierdemo", "v1", &layout, &image)
        .await;
    let pushed = registry.accesses().len();

    // pier's defaults, but docker.io is the local registry.
    let upstream = [format!("--upstream=docker.io={}", registry.url())];
    let pier = Launch::in_dir(&tmp.path().join("pier"))
        .args(&upstream)
        .start();

    let daemon_json = client_config("docker", &pier, &[]);
    let parsed: serde_json::Value = serde_json::from_str(&daemon_json).expect("daemon.json");
    assert_eq!(parsed["registry-mirrors"], serde_json::json!([pier.url()]));
    let docker = Docker::start(&tmp.path().join("docker"), &daemon_json);

    docker.run(&["pull", "pierdemo:v1"]).await;
    assert_eq!(
        docker.image_id("pierdemo:v1").await,
        image.config.digest,
        "image ID"
    );
    assert_eq!(docker.diff_ids("pierdemo:v1").await, image.layer_digests());
    let repo_digests = docker
        .run(&[
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            "pierdemo:v1",
        ])
        .await;
    assert!(
        repo_digests.contains(&format!("pierdemo@{}", image.manifest.digest)),
        "RepoDigests: {repo_digests}"
    );

    assert_fetched_once_by_pier(&registry, pushed, "library/pierdemo", &image);
    let m = pier.metrics(&http).await;
    assert_eq!(
        requests(&m, "docker.io", "blob", "miss"),
        image.blobs().len() as f64,
        "blobs filled from docker.io"
    );
    drop(docker);
    println!("docker pull through registry-mirrors: {:?}", t0.elapsed());
}

/// podman, configured with the `registries.conf` that `pier config podman` prints, pulls
/// `docker.io/library/pierdemo:v1`: it asks pier under the `docker.io/` path prefix, pier fetches
/// from the upstream, and podman has the image with its ID and digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_through_the_registries_conf_mirror() {
    let Some(tmp) = interop_tempdir(&["docker-registry", "podman"]) else {
        return;
    };
    let t0 = Instant::now();
    let (layout, image, registry) = image_and_registry(
        tmp.path(),
        "v1",
        vec![
            LayerSpec::new("etc/demo.conf", 444, 911),
            LayerSpec::new("demo.bin", 2 * MIB + 5, 912),
        ],
    );
    let http = http_client();
    registry
        .push(&http, "library/pierdemo", "v1", &layout, &image)
        .await;
    let pushed = registry.accesses().len();

    let upstream = vec![format!("--upstream=docker.io={}", registry.url())];
    let pier = Launch::in_dir(&tmp.path().join("pier"))
        .args(&upstream)
        .start();

    let podman = Podman::new(&tmp.path().join("podman"));
    let mirrors = client_config("podman", &pier, &upstream);
    podman.add_registries_conf(&mirrors);
    let policy = podman.policy();
    let name = "docker.io/library/pierdemo:v1";
    podman
        .run(&["pull", "--signature-policy", &policy, name])
        .await;
    assert_eq!(
        podman.inspect(name, "{{.Id}}").await,
        image.config.hex(),
        "image ID"
    );
    assert_eq!(
        podman.inspect(name, "{{.Digest}}").await,
        image.manifest.digest,
        "image digest"
    );
    assert_fetched_once_by_pier(&registry, pushed, "library/pierdemo", &image);
    println!("podman pull through registries.conf: {:?}", t0.elapsed());
}

/// Bytes of the blob files under `data_dir/blobs`: what the cache holds on disk.
fn blob_bytes_on_disk(data_dir: &Path) -> u64 {
    fn walk(dir: &Path) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk(&e.path()),
                Ok(m) => m.len(),
                // Evicted between the listing and the stat.
                Err(_) => 0,
            })
            .sum()
    }
    walk(&data_dir.join("blobs"))
}

/// `[cache] max_size` holds at every moment, not only when the (here hourly) timer fires: a
/// mirror bounded to 40 MiB pulls 6 images of 2 × 8 MiB layers (2.4 times the bound), three
/// one after another with skopeo and three at once over HTTP, while the blob store's size on
/// disk is sampled every 100 ms. No sample is above the bound plus the layers that can be in
/// flight at once, the store is within the bound once the pulls end, and every pull gets
/// its image byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_bound_holds_while_pulls_fill_it() {
    let Some(tmp) = interop_tempdir(&["docker-registry", "skopeo"]) else {
        return;
    };
    let t0 = Instant::now();
    const BOUND: u64 = 40 * MIB;
    const LAYER: u64 = 8 * MIB;
    let tags = ["a", "b", "c", "d", "e", "f"];
    let layout = write_layout(
        &tmp.path().join("src"),
        tags.iter()
            .enumerate()
            .map(|(i, tag)| {
                let seed = 2000 + 10 * i as u64;
                let layers = vec![
                    LayerSpec::new("one.bin", LAYER, seed),
                    LayerSpec::new("two.bin", LAYER, seed + 1),
                ];
                (*tag, Entry::Image(ImageSpec::linux("amd64", layers)))
            })
            .collect(),
    );
    let registry = Registry::start_in(tmp.path());
    let http = http_client();
    for tag in tags {
        registry
            .push(
                &http,
                &format!("team/{tag}"),
                "v1",
                &layout,
                layout.image(tag),
            )
            .await;
    }
    let tables = format!(
        "[cache]\nmax_size = \"40MiB\"\ncheck_every = \"1h\"\n\n{}",
        upstream_table("bound.test", &[registry.url()], "")
    );
    let (pier, _) = start_mirror(tmp.path(), false, &tables, &[]);

    let data_dir = pier.data_dir().to_path_buf();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                samples.push(blob_bytes_on_disk(&data_dir));
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        })
    };

    // One after another: skopeo takes an image's two layers at once.
    let skopeo = Skopeo::new(tmp.path());
    for tag in &tags[..3] {
        let back = skopeo.writable_dir(&tmp.path().join(format!("back-{tag}")));
        let from = format!("docker://{}/bound.test/team/{tag}:v1", pier.host());
        skopeo.copy(&from, &oci_ref(&back, "v1")).await;
        assert_same_blobs(&layout, &back, &layout.image(tag).blob_digests());
    }
    // Three at once, each fetching its blobs in turn.
    let base = pier.url();
    let repos: Vec<String> = tags[3..]
        .iter()
        .map(|tag| format!("bound.test/team/{tag}"))
        .collect();
    futures::future::join_all(
        repos
            .iter()
            .zip(&tags[3..])
            .map(|(repo, tag)| pull_http(&http, &base, repo, "v1", "", layout.image(tag))),
    )
    .await;
    // The store as the pulls left it, a moment later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await.expect("sampler");
    let after = blob_bytes_on_disk(pier.data_dir());

    // At most three layers are filled at once (and the configs are a few hundred bytes).
    let in_flight = 3 * LAYER;
    let max = samples.iter().copied().max().unwrap_or(0);
    let mib = |b: u64| b as f64 / MIB as f64;
    println!(
        "cache bound {:.0} MiB: {} samples, the largest {:.1} MiB, {:.1} MiB after the pulls ({:?})",
        mib(BOUND),
        samples.len(),
        mib(max),
        mib(after),
        t0.elapsed()
    );
    assert!(
        max <= BOUND + in_flight + MIB,
        "the store held {:.1} MiB during the pulls, more than the {:.0} MiB bound plus {:.0} MiB \
         of fills in flight",
        mib(max),
        mib(BOUND),
        mib(in_flight)
    );
    assert!(
        after <= BOUND,
        "the store holds {:.1} MiB after the pulls, more than the {:.0} MiB bound",
        mib(after),
        mib(BOUND)
    );
    let m = pier.metrics(&http).await;
    assert!(
        m.sum("pier_cache_evicted_blobs_total", &[]) > 0.0
            && m.sum("pier_cache_passes_total", &[("trigger", "fill")]) > 0.0,
        "fills started eviction passes that evicted blobs:\n{}",
        m.0
    );
    assert_eq!(
        m.sum("pier_mirror_fill_reserved_bytes", &[]),
        0.0,
        "no fill holds a reservation once the pulls are over"
    );
}
