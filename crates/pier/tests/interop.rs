//! Interop tier: the real `pier` binary driven by real clients, skopeo and containerd's `ctr`.
//! Runs only with `PIER_INTEROP=1` (scripts/test.sh sets it and installs the tools); then a
//! missing tool is a failure, not a skip.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    blob_path, digest_of, digest_of_file, digest_of_response, files_equal, header, push_image,
    require, write_layout, Entry, ImageSpec, LayerSpec, Layout, Pier, KIB, MIB, OCI_INDEX,
    OCI_MANIFEST, REF_NAME,
};
use reqwest::StatusCode;

/// skopeo, kept inside a test's tempdir: its TMPDIR, HOME and auth file are there. skopeo run
/// as root writes a blob-info cache to /var/lib/containers whatever it is told, so as root it
/// runs as `nobody`, whose cache goes under HOME.
struct Skopeo {
    scratch: PathBuf,
    user: Option<u32>,
}

const NOBODY: u32 = 65534;

impl Skopeo {
    fn new(tmp: &Path) -> Skopeo {
        let root = std::fs::metadata(tmp).expect("stat tempdir").uid() == 0;
        let user = root.then_some(NOBODY);
        if root {
            // Let `nobody` into the tempdir to read layouts and write where it is given a dir.
            std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755))
                .expect("open the tempdir to nobody");
        }
        let skopeo = Skopeo {
            scratch: tmp.join("skopeo"),
            user,
        };
        skopeo.writable_dir(&skopeo.scratch);
        skopeo
    }

    /// Create a directory skopeo may write into.
    fn writable_dir(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).expect("create dir");
        if let Some(uid) = self.user {
            std::os::unix::fs::chown(dir, Some(uid), Some(uid)).expect("chown to nobody");
        }
        dir.to_path_buf()
    }

    /// Run skopeo; panic with its output unless it succeeds. Returns stdout.
    async fn run(&self, args: &[&str]) -> Vec<u8> {
        let started = Instant::now();
        let mut cmd = tokio::process::Command::new("skopeo");
        cmd.arg("--insecure-policy")
            .args(args)
            .env("TMPDIR", &self.scratch)
            .env("HOME", &self.scratch)
            .env("XDG_DATA_HOME", self.scratch.join("share"))
            .env("REGISTRY_AUTH_FILE", self.scratch.join("auth.json"))
            .current_dir(&self.scratch)
            .stdin(Stdio::null());
        if let Some(uid) = self.user {
            cmd.uid(uid).gid(uid);
        }
        let out = cmd.output().await.expect("run skopeo");
        println!("skopeo {} -- {:?}", args.join(" "), started.elapsed());
        assert!(
            out.status.success(),
            "skopeo {} failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

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

/// Every blob of `digests` is in `copy` with the same bytes as in `original`.
fn assert_same_blobs(original: &Layout, copy: &Path, digests: &[String]) {
    for d in digests {
        let path = blob_path(copy, d);
        assert!(
            path.is_file(),
            "{d} missing from the copy {}",
            copy.display()
        );
        assert!(
            files_equal(&original.blob_path(d), &path),
            "{d} differs between the original layout and the copy"
        );
        assert_eq!(&digest_of_file(&path), d, "{d} in the copy");
    }
}

/// Every blob is served from `repo` with its exact bytes.
async fn assert_blobs_served(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    layout: &Layout,
    digests: &[&str],
) {
    for d in digests {
        let resp = http
            .get(format!("{base}/v2/{repo}/blobs/{d}"))
            .send()
            .await
            .expect("GET blob");
        assert_eq!(resp.status(), StatusCode::OK, "GET {repo} blob {d}");
        let (got, len) = digest_of_response(resp).await;
        assert_eq!(&got, d, "bytes of {repo} blob {d}");
        let want = std::fs::metadata(layout.blob_path(d)).expect("stat").len();
        assert_eq!(len, want, "length of {repo} blob {d}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_preserve_digests() {
    if !require("skopeo") {
        return;
    }
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
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
    let src = format!("oci:{}:app", layout.dir.display());
    let a = format!("docker://{host}/a:1");
    skopeo
        .run(&[
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &src,
            &a,
        ])
        .await;
    let raw = skopeo
        .run(&["inspect", "--raw", "--tls-verify=false", &a])
        .await;
    assert_eq!(
        digest_of(&raw),
        image.manifest.digest,
        "digest of the pushed manifest"
    );
    assert_eq!(raw, image.manifest_bytes, "manifest bytes as pushed");

    // Pull: back into a new layout, every blob byte-identical. (Without --preserve-digests
    // skopeo gzips uncompressed layers on their way into an oci: layout.)
    let back = skopeo.writable_dir(&tmp.path().join("back"));
    skopeo
        .run(&[
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            &a,
            &format!("oci:{}:pulled", back.display()),
        ])
        .await;
    assert_eq!(layout_ref(&back, "pulled"), image.manifest.digest);
    assert_same_blobs(&layout, &back, &image.digests());

    // Registry to registry, inside pier.
    let c = format!("docker://{host}/b/c:1");
    skopeo
        .run(&[
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &a,
            &c,
        ])
        .await;
    let raw = skopeo
        .run(&["inspect", "--raw", "--tls-verify=false", &c])
        .await;
    assert_eq!(
        digest_of(&raw),
        image.manifest.digest,
        "digest after registry copy"
    );
    let info: serde_json::Value =
        serde_json::from_slice(&skopeo.run(&["inspect", "--tls-verify=false", &c]).await)
            .expect("skopeo inspect JSON");
    assert_eq!(info["Digest"], image.manifest.digest.as_str());
    let layers: Vec<&str> = image
        .layers
        .iter()
        .map(|l| l.blob.digest.as_str())
        .collect();
    assert_eq!(info["Layers"], serde_json::json!(layers));
    let blobs: Vec<&str> = image.blobs().iter().map(|d| d.digest.as_str()).collect();
    assert_blobs_served(&http, &pier.url(), "b/c", &layout, &blobs).await;
    println!("skopeo round trips took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_multi_platform_index() {
    if !require("skopeo") {
        return;
    }
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
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
    skopeo
        .run(&[
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &format!("oci:{}:multi", layout.dir.display()),
            &dest,
        ])
        .await;
    let raw = skopeo
        .run(&["inspect", "--raw", "--tls-verify=false", &dest])
        .await;
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
        let blobs: Vec<&str> = image.blobs().iter().map(|d| d.digest.as_str()).collect();
        assert_blobs_served(&http, &base, "multi/app", &layout, &blobs).await;
    }

    // And back out, whole.
    let back = skopeo.writable_dir(&tmp.path().join("back"));
    skopeo
        .run(&[
            "copy",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
            &dest,
            &format!("oci:{}:multi", back.display()),
        ])
        .await;
    assert_eq!(layout_ref(&back, "multi"), index.index.digest);
    assert_same_blobs(&layout, &back, &index.digests());
    println!("multi-platform copies took {:?}", t0.elapsed());
}

/// A private containerd daemon; killed on drop.
struct Containerd {
    child: Option<Child>,
    root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Containerd {
    fn start(dir: &Path) -> Containerd {
        let root = dir.join("root");
        let state = dir.join("state");
        let socket = dir.join("containerd.sock");
        let log = dir.join("containerd.log");
        for d in [&root, &state] {
            std::fs::create_dir_all(d).expect("create containerd dirs");
        }
        // Everything containerd writes stays in `dir`; plugins not needed to pull and unpack
        // with the native snapshotter are off.
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = root.display(),
            state = state.display(),
            socket = socket.display(),
            opt = dir.join("opt").display(),
        );
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).expect("write containerd config");
        let out = std::fs::File::create(&log).expect("containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .env("TMPDIR", dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log"))
            .stderr(out)
            .spawn()
            .expect("spawn containerd");
        let mut c = Containerd {
            child: Some(child),
            root,
            socket,
            log,
        };
        let started = Instant::now();
        loop {
            if let Some(status) = c.child.as_mut().and_then(|ch| ch.try_wait().ok().flatten()) {
                panic!("containerd exited with {status}:\n{}", c.log());
            }
            if c.socket.exists() && c.ctr_sync(&["version"]).is_ok_and(|o| o.status.success()) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "containerd not answering on {} after 30 s:\n{}",
                c.socket.display(),
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg("pier-test")
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    fn ctr_sync(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        self.ctr_command(args).output()
    }

    /// Run `ctr`; panic with its output and containerd's log unless it succeeds.
    async fn ctr(&self, args: &[&str]) -> String {
        let started = Instant::now();
        let out = tokio::process::Command::from(self.ctr_command(args))
            .output()
            .await
            .expect("run ctr");
        println!("ctr {} -- {:?}", args.join(" "), started.elapsed());
        assert!(
            out.status.success(),
            "ctr {} failed ({}):\nstdout: {}\nstderr: {}\ncontainerd log:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_and_unpacks() {
    if !require("containerd") || !require("ctr") {
        return;
    }
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
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
    push_image(&http, &pier.url(), "interop/ctr", "v1", &layout, &image).await;

    let containerd = Containerd::start(&tmp.path().join("ctrd"));
    let reference = format!("{}/interop/ctr:v1", pier.host());
    containerd
        .ctr(&[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "native",
            "--platform",
            "linux/amd64",
            &reference,
        ])
        .await;
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
    let snapshots = containerd
        .root
        .join("io.containerd.snapshotter.v1.native")
        .join("snapshots");
    let dirs: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .unwrap_or_else(|e| panic!("read {}: {e}\n{}", snapshots.display(), containerd.log()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .collect();
    for layer in &image.layers {
        let holders: Vec<&PathBuf> = dirs
            .iter()
            .filter(|d| d.join(&layer.file).is_file())
            .collect();
        assert!(
            !holders.is_empty(),
            "{} not in any snapshot under {}",
            layer.file,
            snapshots.display()
        );
        for d in holders {
            let f = d.join(&layer.file);
            assert_eq!(
                std::fs::metadata(&f).unwrap().len(),
                layer.file_size,
                "{}",
                f.display()
            );
            assert_eq!(
                digest_of_file(&f),
                layer.file_digest,
                "bytes of {}",
                f.display()
            );
        }
    }
    assert!(
        dirs.iter()
            .any(|d| image.layers.iter().all(|l| d.join(&l.file).is_file())),
        "no snapshot holds every layer's file: {dirs:?}"
    );
    drop(containerd);
    println!("containerd pull took {:?}", t0.elapsed());
}
