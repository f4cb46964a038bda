//! Hostile tier: namespaces that are not pier's to serve. An `ns` naming a registry pier does not
//! mirror must not be answered from another registry (containerd falls back to the registry
//! itself), a push must not shadow a name the default upstream serves, and a push into a
//! mirrored path is told it is read-only.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;

use crate::common::clients::{oci_ref, Containerd, Skopeo};
use crate::common::{
    error_code, free_port, interop_tempdir, write_layout, Entry, ImageSpec, LayerSpec, Layout,
    Pier, KIB,
};
use crate::mirror_support::{http_client, Registry};

/// pier whose default upstream `docker.io` is `docker_io` (an URL), with `extra` config lines in
/// the `[mirror]` table and `flags` after the config.
fn pier_with_default(tmp: &Path, docker_io: &str, extra: &str, flags: &[&str]) -> Pier {
    Pier::with_config(
        &tmp.join("pier"),
        &format!(
            "[mirror]\nbuiltin_upstreams = false\ndefault_upstream = \"docker.io\"\n{extra}\n\n\
             [[upstream]]\nname = \"docker.io\"\nendpoints = [\"{docker_io}\"]\n"
        ),
        flags,
    )
}

/// Two different one-layer images, tagged `a` and `b`.
fn two_images(dir: &Path) -> Layout {
    write_layout(
        dir,
        vec![
            (
                "a",
                Entry::Image(ImageSpec::linux(
                    "amd64",
                    vec![LayerSpec::new("from-a.txt", 37 * KIB, 701)],
                )),
            ),
            (
                "b",
                Entry::Image(ImageSpec::linux(
                    "amd64",
                    vec![LayerSpec::new("from-b.txt", 41 * KIB, 702)],
                )),
            ),
        ],
    )
}

/// `pier_http_requests_total` of `route` answered with `status`.
async fn requests(pier: &Pier, route: &str, status: &str) -> f64 {
    pier.metrics(&http_client()).await.sum(
        "pier_http_requests_total",
        &[("route", route), ("status", status)],
    )
}

/// containerd with a `_default` hosts.toml that sends every registry through pier pulls an
/// image of a registry pier does not mirror: pier answers 404 for that `ns` (instead of the
/// default upstream's image of the same name), containerd falls back to the registry itself, and
/// the image unpacked is that registry's, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_ns_is_404_and_containerd_falls_back_to_the_registry() {
    let Some(tmp) = interop_tempdir(&["docker-registry", "containerd", "ctr"]) else {
        return;
    };
    let http = http_client();
    let layout = two_images(&tmp.path().join("src"));
    let (image_a, image_b) = (layout.image("a").clone(), layout.image("b").clone());
    // "Docker Hub" has library/x = A; the corporate registry has library/x = B.
    let hub = Registry::start(&tmp.path().join("hub"), &tmp.path().join("hub-data"), "");
    hub.push(&http, "library/x", "latest", &layout, &image_a)
        .await;
    let corp = Registry::start(&tmp.path().join("corp"), &tmp.path().join("corp-data"), "");
    corp.push(&http, "library/x", "latest", &layout, &image_b)
        .await;
    let pier = pier_with_default(tmp.path(), &hub.url(), "", &[]);

    // Plain HTTP first: the ns of a registry pier does not mirror is a 404 NAME_UNKNOWN ...
    let resp = http
        .get(format!(
            "{}/v2/library/x/manifests/latest?ns=evil.example.com",
            pier.url()
        ))
        .send()
        .await
        .expect("GET with an unknown ns");
    let status = resp.status();
    let body = resp.bytes().await.expect("body");
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN".to_string()),
        "{}",
        String::from_utf8_lossy(&body)
    );
    // ... while Docker's registry-mirrors path (no ns) still gets Docker Hub's image.
    let resp = http
        .get(format!("{}/v2/library/x/manifests/latest", pier.url()))
        .header(reqwest::header::ACCEPT, &image_a.manifest.media_type)
        .send()
        .await
        .expect("GET through the default upstream");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.bytes().await.expect("manifest").as_ref(),
        image_a.manifest_bytes.as_slice()
    );

    // containerd: every registry goes to pier first, then to the registry itself.
    let hosts = tmp.path().join("certs.d");
    std::fs::create_dir_all(hosts.join("_default")).expect("create _default");
    std::fs::write(
        hosts.join("_default").join("hosts.toml"),
        format!(
            "[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            pier.url()
        ),
    )
    .expect("write hosts.toml");
    let not_found_before = requests(&pier, "manifest", "404").await;
    let containerd = Containerd::start(&tmp.path().join("ctrd"));
    // `localhost:<port>` is not 127.0.0.1 as pier knows it, so it is a registry pier does not
    // mirror; containerd sends ?ns=localhost:<port>.
    let reference = format!("localhost:{}/library/x:latest", corp.port());
    let hosts_dir = hosts.display().to_string();
    containerd
        .ctr(&[
            "images",
            "pull",
            "--plain-http",
            "--hosts-dir",
            &hosts_dir,
            "--snapshotter",
            "native",
            "--platform",
            "linux/amd64",
            &reference,
        ])
        .await;
    containerd.assert_unpacked(&image_b);
    let listed = containerd.ctr(&["images", "ls"]).await;
    assert!(
        listed.contains(&image_b.manifest.digest) && !listed.contains(&image_a.manifest.digest),
        "containerd must hold the corporate registry's image, not Docker Hub's:\n{listed}"
    );
    assert!(
        requests(&pier, "manifest", "404").await > not_found_before,
        "containerd asked pier first (and got a 404); pier log:\n{}",
        pier.log()
    );
    assert!(
        corp.accesses()
            .iter()
            .any(|a| a.method == "GET" && a.path.contains("/blobs/")),
        "containerd fetched the blobs from the corporate registry itself"
    );
}

/// Run skopeo expecting it to fail; returns its stderr.
async fn skopeo_fails(tmp: &Path, args: &[&str]) -> String {
    let scratch = tmp.join("skopeo-fail");
    std::fs::create_dir_all(&scratch).expect("scratch");
    let mut cmd = tokio::process::Command::new("skopeo");
    cmd.arg("--insecure-policy")
        .args(args)
        .env("TMPDIR", &scratch)
        .env("HOME", &scratch)
        .env("REGISTRY_AUTH_FILE", scratch.join("auth.json"))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("skopeo finished within 120 s")
        .expect("run skopeo");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "skopeo {args:?} was expected to fail:\n{stderr}"
    );
    stderr
}

/// With the default upstream on, skopeo's push of `library/x` is refused with a message that
/// says why and what to do, and nothing becomes visible under that name; a push into a namespace
/// declared hosted works and pulls back identical; a push into a mirrored path (upstream down)
/// is told the path is read-only, not a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_cannot_shadow_the_default_upstream() {
    let Some(tmp) = interop_tempdir(&["skopeo"]) else {
        return;
    };
    let layout = two_images(&tmp.path().join("src"));
    let image = layout.image("a").clone();
    // The upstream is down (nothing listens there): refusals must not depend on asking it.
    let down = format!("http://127.0.0.1:{}", free_port());
    let pier = pier_with_default(tmp.path(), &down, "hosted = [\"team/**\"]", &[]);
    let src = oci_ref(&layout.dir, "a");

    let dest = format!("docker://{}/library/x:latest", pier.host());
    let err = skopeo_fails(
        tmp.path(),
        &["copy", "--dest-tls-verify=false", &src, &dest],
    )
    .await;
    assert!(
        err.contains("denied") && err.contains("default upstream docker.io"),
        "skopeo's error names the refusal and its reason:\n{err}"
    );
    let http = http_client();
    let catalog: serde_json::Value = http
        .get(format!("{}/v2/_catalog", pier.url()))
        .send()
        .await
        .expect("GET catalog")
        .json()
        .await
        .expect("catalog JSON");
    assert_eq!(
        catalog["repositories"],
        serde_json::json!([]),
        "nothing of the refused push is stored"
    );
    // The name still means Docker Hub's image (unreachable here), never the refused push.
    let resp = http
        .get(format!("{}/v2/library/x/manifests/latest", pier.url()))
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);

    // A hosted namespace takes the push, and serves exactly what was pushed.
    let skopeo = Skopeo::new(tmp.path());
    let hosted = format!("docker://{}/team/app:v1", pier.host());
    skopeo.copy(&src, &hosted).await;
    let raw = skopeo.inspect_raw(&hosted).await;
    assert_eq!(raw, image.manifest_bytes, "manifest bytes of team/app:v1");

    // A mirrored path is read-only: skopeo hears 405, not that the upstream is down.
    let mirrored = format!("docker://{}/docker.io/library/y:latest", pier.host());
    let err = skopeo_fails(
        tmp.path(),
        &["copy", "--dest-tls-verify=false", &src, &mirrored],
    )
    .await;
    assert!(
        err.contains("405") || err.contains("read-only") || err.contains("unsupported"),
        "skopeo's error says the mirrored path is read-only:\n{err}"
    );
    assert!(!err.contains("502"), "not a gateway error:\n{err}");
}
