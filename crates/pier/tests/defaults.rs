//! `pier` with no arguments at all runs a useful node: it listens on 0.0.0.0:5000, keeps its
//! data under ./pier-data, and answers `/v2/`. And a node with its defaults takes the first push
//! an operator tries (`localhost:5000/myapp:v1`, as README.md shows it), says at start where
//! pushes land, and still refuses a name Docker Hub serves with a message naming the fix.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::clients::{oci_ref, Skopeo};
use common::{small_image, Launch, Pier, Upload};

#[tokio::test]
async fn no_arguments_serves_on_port_5000_with_data_in_the_working_directory() {
    if std::net::TcpListener::bind("0.0.0.0:5000").is_err() {
        // Something else holds the port; the contract cannot be checked on this machine now.
        eprintln!("skipped: port 5000 is in use");
        return;
    }
    let cwd = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pier"))
        .current_dir(cwd.path())
        .env_remove("PIER_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pier");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answer = None;
    while Instant::now() < deadline {
        if let Ok(resp) = client.get("http://127.0.0.1:5000/v2/").send().await {
            answer = Some((
                resp.status().as_u16(),
                resp.text().await.unwrap_or_default(),
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("pier exits");
    assert_eq!(answer, Some((200, "{}".to_string())));
    assert!(status.success(), "SIGTERM is a clean exit: {status:?}");
    assert!(cwd.path().join("pier-data/meta.redb").exists());
    assert!(cwd.path().join("pier-data/blobs").is_dir());
}

/// A node started with nothing but `--listen` and `--data-dir`.
fn default_node(dir: &std::path::Path) -> Pier {
    Launch::in_dir(dir).start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaults_take_a_push_of_a_single_name_and_refuse_docker_hubs_names() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = default_node(tmp.path());
    let log = node.log();
    assert!(
        log.contains("pushes: accepted into hosted namespaces (none declared) and single names")
            && log.contains("default_upstream=docker.io"),
        "the start-up log says where pushes land:\n{log}"
    );
    let (layout, image) = small_image(&tmp.path().join("src"), 61);
    let http = reqwest::Client::new();
    common::push_image(
        &http,
        &node.url(),
        "myapp",
        "1",
        &layout,
        &image,
        Upload::Monolithic,
    )
    .await;
    let got = http
        .get(format!("{}/v2/myapp/manifests/1", node.url()))
        .header("accept", &image.manifest.media_type)
        .send()
        .await
        .expect("pull the manifest");
    assert_eq!(got.status(), 200);
    assert_eq!(
        got.bytes().await.expect("body").to_vec(),
        image.manifest_bytes
    );

    // A name Docker Hub serves as spelled stays refused, and the answer names the fix.
    let refused = http
        .post(format!("{}/v2/team/app/blobs/uploads/", node.url()))
        .send()
        .await
        .expect("start an upload");
    assert_eq!(refused.status(), 403);
    let body = refused.text().await.expect("body");
    assert!(
        body.contains("DENIED") && body.contains("[mirror] hosted (or --hosted)"),
        "{body}"
    );
    let refused = http
        .post(format!("{}/v2/library/myapp/blobs/uploads/", node.url()))
        .send()
        .await
        .expect("start an upload");
    assert_eq!(
        refused.status(),
        403,
        "Docker Hub's spelling stays Docker Hub's"
    );
    // A single name is this registry's own before anything is pushed to it too: a read is a
    // local 404, not a question to Docker Hub.
    let unknown = http
        .get(format!("{}/v2/otherapp/manifests/1", node.url()))
        .send()
        .await
        .expect("read an unpushed single name");
    assert_eq!(unknown.status(), 404);
    let m = node.metrics(&http).await;
    assert_eq!(
        m.sum("pier_mirror_requests_total", &[("upstream", "docker.io")]),
        0.0,
        "nothing was asked of Docker Hub:\n{}",
        m.0
    );
}

/// README.md's first push, verbatim but for the port: skopeo copies an image to
/// `localhost:PORT/myapp:v1` of a node with its defaults, and reads it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_first_push_works_with_skopeo_against_defaults() {
    let Some(tmp) = common::interop_tempdir(&["skopeo"]) else {
        return;
    };
    let node = default_node(tmp.path());
    let (layout, image) = small_image(&tmp.path().join("src"), 62);
    let skopeo = Skopeo::new(tmp.path());
    let dest = format!("docker://localhost:{}/myapp:v1", node.port());
    skopeo.copy(&oci_ref(&layout.dir, "v1"), &dest).await;
    let raw = skopeo.inspect_raw(&dest).await;
    assert_eq!(
        raw, image.manifest_bytes,
        "the pushed manifest, byte for byte"
    );
    let refused = skopeo
        .try_run(&[
            "copy",
            "--dest-tls-verify=false",
            &oci_ref(&layout.dir, "v1"),
            &format!("docker://localhost:{}/team/app:v1", node.port()),
        ])
        .await;
    assert!(!refused.success, "{}", refused.output);
    assert!(
        refused.output.contains("default upstream docker.io"),
        "{}",
        refused.output
    );
}
