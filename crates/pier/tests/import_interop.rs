//! Interop tier for import and export: archives written by skopeo (`docker-archive:` and
//! `oci-archive:`) and by Docker Engine's `docker save` are dropped into a node's watched
//! folder the way a slow writer does (a `.part` name, renamed when complete); containerd,
//! podman and Docker pull the imported images and see the original files and image IDs; a
//! renamed copy is skipped, a truncated file set aside with its reason; and what `pier export`
//! writes, `docker load` and `podman load` accept. Runs only with `PIER_INTEROP=1`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::clients::{oci_ref, Containerd, Docker, Podman, Skopeo};
use common::{drop_slowly, interop_tempdir, pier_cli, push_image, wait_for_file, Pier, Upload};

const WAIT: Duration = Duration::from_secs(60);

/// A plain registry (no upstreams) watching `watch`.
fn start(dir: &Path, watch: &Path) -> Pier {
    Pier::with_config(
        dir,
        &format!(
            "[mirror]\ndefault_upstream = \"\"\nbuiltin_upstreams = false\n\
             [import]\nwatch = {:?}\nstable_seconds = 1\nrescan_seconds = 2\n",
            watch.display().to_string()
        ),
        &[],
    )
}

async fn imported(pier: &Pier, done: &Path) {
    assert!(
        wait_for_file(done, WAIT).await,
        "{} did not appear:\n{}",
        done.display(),
        pier.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_archives_in_the_folder_are_pulled_by_containerd_podman_and_docker() {
    let Some(tmp) =
        interop_tempdir(&["skopeo", "containerd", "ctr", "podman", "docker", "dockerd"])
    else {
        return;
    };
    let t0 = Instant::now();
    let (layout, image) = common::small_image(&tmp.path().join("src"), 51);
    let skopeo = Skopeo::new(tmp.path());
    let out = skopeo.writable_dir(&tmp.path().join("archives"));
    let docker_archive = out.join("docker.tar");
    let oci_archive = out.join("oci.tar");
    let src = oci_ref(&layout.dir, "v1");
    skopeo
        .run(&[
            "copy",
            &src,
            &format!("docker-archive:{}:team/app:v1", docker_archive.display()),
        ])
        .await;
    skopeo
        .run(&[
            "copy",
            "--preserve-digests",
            &src,
            &format!("oci-archive:{}:team/web:v1", oci_archive.display()),
        ])
        .await;

    let watch = tmp.path().join("incoming");
    std::fs::create_dir_all(&watch).expect("create the folder");
    let pier = start(&tmp.path().join("pier"), &watch);
    let host = pier.host();
    drop_slowly(
        &docker_archive,
        &watch,
        "app.tar",
        5,
        Duration::from_millis(300),
    );
    imported(&pier, &watch.join("done/app.tar")).await;
    drop_slowly(
        &oci_archive,
        &watch,
        "web.tar",
        5,
        Duration::from_millis(300),
    );
    imported(&pier, &watch.join("done/web.tar")).await;

    // A renamed copy is skipped by content; a truncated file is set aside with the reason.
    std::fs::copy(&docker_archive, watch.join("app-again.tar")).expect("copy");
    imported(&pier, &watch.join("done/app-again.tar")).await;
    let bytes = std::fs::read(&oci_archive).expect("read");
    std::fs::write(watch.join("cut.tar"), &bytes[..bytes.len() * 2 / 3]).expect("write");
    imported(&pier, &watch.join("failed/cut.tar.reason")).await;
    let reason = std::fs::read_to_string(watch.join("failed/cut.tar.reason")).expect("reason");
    assert!(!reason.trim().is_empty());
    println!("failed/cut.tar.reason: {}", reason.trim());
    let http = reqwest::Client::new();
    let m = pier.metrics(&http).await;
    let count = |r: &str| m.sum("pier_import_files_total", &[("result", r)]);
    assert_eq!(
        (count("imported"), count("duplicate"), count("failed")),
        (2.0, 1.0, 1.0),
        "each file imported exactly once"
    );

    // containerd unpacks the docker-archive import to the original files.
    let containerd = Containerd::start(&tmp.path().join("ctrd"));
    containerd
        .pull_plain_http(&format!("{host}/team/app:v1"))
        .await;
    containerd.assert_unpacked(&image);
    drop(containerd);

    // podman pulls the OCI-archive import: the same image ID (config) as the original.
    let podman = Podman::new(&tmp.path().join("podman"));
    let web = format!("{host}/team/web:v1");
    podman
        .run(&[
            "pull",
            "--tls-verify=false",
            "--signature-policy",
            &podman.policy(),
            &web,
        ])
        .await;
    assert_eq!(podman.inspect(&web, "{{.Id}}").await, image.config.hex());
    assert_eq!(
        podman.inspect(&web, "{{.Digest}}").await,
        image.manifest.digest,
        "the OCI archive's manifest, kept as it was"
    );

    // Docker pulls both: same image ID and layer diff IDs as the original.
    let docker = Docker::start(&tmp.path().join("docker"), "{}\n");
    for name in ["team/app:v1", "team/web:v1"] {
        let r = format!("{host}/{name}");
        docker.run(&["pull", &r]).await;
        assert_eq!(docker.image_id(&r).await, image.config.digest, "{name}");
        assert_eq!(docker.diff_ids(&r).await, image.layer_digests(), "{name}");
    }
    drop(docker);
    println!("skopeo archives imported and pulled in {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_save_is_imported_and_exports_load_in_docker_and_podman() {
    let Some(tmp) = interop_tempdir(&["docker", "dockerd", "podman", "containerd", "ctr"]) else {
        return;
    };
    let t0 = Instant::now();
    let (layout, image) = common::small_image(&tmp.path().join("src"), 61);
    let watch = tmp.path().join("incoming");
    std::fs::create_dir_all(&watch).expect("create the folder");
    let pier = start(&tmp.path().join("pier"), &watch);
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

    // Docker Engine's own `docker save` of an image it pulled, named as a local image.
    let docker = Docker::start(&tmp.path().join("docker"), "{}\n");
    let seed = format!("{host}/seed/app:v1");
    docker.run(&["pull", &seed]).await;
    docker.run(&["tag", &seed, "saved/app:v2"]).await;
    let saved = tmp.path().join("saved.tar");
    docker
        .run(&["save", "-o", &saved.display().to_string(), "saved/app:v2"])
        .await;
    drop_slowly(&saved, &watch, "saved.tar", 4, Duration::from_millis(300));
    imported(&pier, &watch.join("done/saved.tar")).await;

    docker.run(&["rmi", &seed, "saved/app:v2"]).await;
    let pulled = format!("{host}/saved/app:v2");
    docker.run(&["pull", &pulled]).await;
    assert_eq!(docker.image_id(&pulled).await, image.config.digest);
    assert_eq!(docker.diff_ids(&pulled).await, image.layer_digests());
    let containerd = Containerd::start(&tmp.path().join("ctrd"));
    containerd.pull_plain_http(&pulled).await;
    containerd.assert_unpacked(&image);
    drop(containerd);

    // `pier export` writes what docker load and podman load take.
    let exported = tmp.path().join("export.tar");
    let out = pier_cli(&[
        "export",
        "--url",
        &base,
        "saved/app:v2",
        "-o",
        &exported.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "pier export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    docker.run(&["rmi", &pulled]).await;
    let loaded = docker
        .run(&["load", "-i", &exported.display().to_string()])
        .await;
    assert!(loaded.contains("saved/app:v2"), "docker load: {loaded}");
    assert_eq!(docker.image_id("saved/app:v2").await, image.config.digest);
    assert_eq!(docker.diff_ids("saved/app:v2").await, image.layer_digests());
    drop(docker);

    let podman = Podman::new(&tmp.path().join("podman"));
    let loaded = podman
        .run(&[
            "load",
            "--signature-policy",
            &podman.policy(),
            "-i",
            &exported.display().to_string(),
        ])
        .await;
    assert!(loaded.contains("Loaded image"), "podman load: {loaded}");
    let config_hex = image.config.hex().to_string();
    assert_eq!(podman.inspect(&config_hex, "{{.Id}}").await, config_hex);
    println!("podman load: {}", loaded.trim());
    println!(
        "docker save imported and exports loaded in {:?}",
        t0.elapsed()
    );
}
