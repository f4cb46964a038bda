//! Interop tier for security: real clients log in to a real pier over TLS, with certificates
//! from a CA made here (openssl) and users in an htpasswd file written by Apache's
//! `htpasswd -B`: skopeo with `--creds`, podman and Docker Engine with `login`, containerd
//! with credentials through its resolver (`ctr --user`) and the CA in hosts.toml. Each client
//! is refused where the rules say so, and the htpasswd file is edited while pier runs.
//!
//! Runs only with `PIER_INTEROP=1` (scripts/test.sh sets it and installs the tools).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::certs::make_certs_for;
use common::clients::{oci_ref, Containerd, Docker, Podman, Skopeo};
use common::{interop_tempdir, Launch, Pier};

/// The users of every test and their passwords.
const USERS: &[(&str, &str)] = &[
    ("reader", "reader-pw"),
    ("writer", "writer-pw"),
    ("admin", "admin-pw"),
];

/// What each user may do: `reader` pulls `team/**`, `writer` (group `ci`) pulls and pushes
/// it, `admin` everything; anonymous nothing.
const RULES: &str = r#"
[auth.groups]
ci = ["writer"]

[[auth.rule]]
repos = ["team/**"]
grant = ["pull"]
to = ["user:reader", "user:late"]

[[auth.rule]]
repos = ["team/**"]
grant = ["pull", "push"]
to = ["group:ci"]

[[auth.rule]]
repos = ["**"]
grant = ["pull", "push", "delete", "admin"]
to = ["user:admin"]
"#;

/// `htpasswd -D`: remove `user`.
fn remove_user(file: &Path, user: &str) {
    let out = Command::new("htpasswd")
        .arg("-D")
        .arg(file)
        .arg(user)
        .output()
        .expect("run htpasswd (apache2-utils; scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "htpasswd -D {user}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `htpasswd -B -b` (bcrypt) of `user`, creating the file with `-c` when it is new.
fn add_user(file: &Path, user: &str, password: &str) {
    let mut args = vec!["-B", "-b"];
    if !file.exists() {
        args.push("-c");
    }
    let out = Command::new("htpasswd")
        .args(&args)
        .arg(file)
        .args([user, password])
        .output()
        .expect("run htpasswd (apache2-utils; scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "htpasswd {args:?} {user}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A pier serving TLS on `ip` with a certificate for it, the users above and the rules.
struct Secure {
    pier: Pier,
    dir: PathBuf,
    htpasswd: PathBuf,
}

impl Secure {
    fn start(dir: &Path, ip: &str) -> Secure {
        std::fs::create_dir_all(dir).unwrap();
        make_certs_for(dir, &["server"], &format!("IP:{ip},DNS:localhost"));
        let htpasswd = dir.join("htpasswd");
        for (user, password) in USERS {
            add_user(&htpasswd, user, password);
        }
        let config = format!(
            "[mirror]\ndefault_upstream = \"\"\nbuiltin_upstreams = false\n\n\
             [tls]\ncert = {:?}\nkey = {:?}\n\n[auth]\nhtpasswd = {:?}\n{RULES}",
            dir.join("server.pem"),
            dir.join("server.key"),
            htpasswd,
        );
        let ca = dir.join("ca.pem").display().to_string();
        let ip_owned = ip.to_string();
        let pier = Launch::in_dir(dir)
            .config(&config)
            .ip(ip)
            .ready(move |port| {
                let out = Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
                    .arg(&ca)
                    .arg(format!("https://{ip_owned}:{port}/healthz"))
                    .output();
                out.is_ok_and(|o| o.stdout == b"200")
            })
            .start();
        Secure {
            pier,
            dir: dir.to_path_buf(),
            htpasswd,
        }
    }

    fn host(&self) -> String {
        self.pier.host()
    }

    /// A directory holding the CA as `ca.crt`, as skopeo's and podman's `--cert-dir` want it.
    fn cert_dir(&self) -> PathBuf {
        let d = self.dir.join("certs.d");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(self.dir.join("ca.pem"), d.join("ca.crt")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for p in [&self.dir, &d] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        d
    }
}

fn assert_refused(what: &str, outcome: &common::clients::Outcome) {
    assert!(
        !outcome.success,
        "{what} should be refused:\n{}",
        outcome.output
    );
    let lower = outcome.output.to_ascii_lowercase();
    assert!(
        lower.contains("unauthorized")
            || lower.contains("denied")
            || lower.contains("authentication required")
            || lower.contains("invalid username/password")
            || lower.contains("401")
            || lower.contains("403"),
        "{what} was refused for another reason than authorization:\n{}",
        outcome.output
    );
}

/// skopeo pushes with the writer's credentials and pulls with the reader's over TLS,
/// verifying pier's certificate against the test CA; the reader's push, a wrong password and
/// no credentials are refused. Then a user added to the htpasswd file while pier runs can
/// pull, and once removed again cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_with_credentials_over_tls_and_an_htpasswd_edited_while_running() {
    let Some(tmp) = interop_tempdir(&["skopeo", "openssl", "curl", "htpasswd"]) else {
        return;
    };
    let skopeo = Skopeo::new(tmp.path());
    let (layout, image) = common::small_image(&tmp.path().join("src"), 51);
    let secure = Secure::start(&tmp.path().join("pier"), "127.0.0.1");
    let certs = secure.cert_dir().display().to_string();
    let dest = format!("docker://{}/team/app:v1", secure.host());
    let src = oci_ref(&layout.dir, "v1");
    let copy = |creds: &'static str, from: String, to: String| {
        let certs = certs.clone();
        let skopeo = &skopeo;
        async move {
            let (cf, df) = if from.starts_with("docker://") {
                ("--src-creds", "--src-cert-dir")
            } else {
                ("--dest-creds", "--dest-cert-dir")
            };
            let mut args = vec!["copy", "--preserve-digests", df, certs.as_str()];
            if !creds.is_empty() {
                args.extend([cf, creds]);
            }
            args.extend([from.as_str(), to.as_str()]);
            skopeo.try_run(&args).await
        }
    };

    let pushed = copy("writer:writer-pw", src.clone(), dest.clone()).await;
    assert!(pushed.success, "the writer pushes:\n{}", pushed.output);
    assert_refused(
        "the reader's push",
        &copy(
            "reader:reader-pw",
            src.clone(),
            dest.replace("app:v1", "app:v2"),
        )
        .await,
    );
    assert_refused(
        "a push without credentials",
        &copy("", src.clone(), dest.replace("app:v1", "app:v3")).await,
    );
    let out_dir = skopeo.writable_dir(&tmp.path().join("pulled"));
    let pulled_ref = oci_ref(&out_dir, "v1");
    let pulled = copy("reader:reader-pw", dest.clone(), pulled_ref.clone()).await;
    assert!(pulled.success, "the reader pulls:\n{}", pulled.output);
    common::assert_same_blobs(&layout, &out_dir, &image.digests());
    assert_refused(
        "a pull with a wrong password",
        &copy("reader:wrong", dest.clone(), pulled_ref.clone()).await,
    );
    assert_refused(
        "a pull without credentials",
        &copy("", dest.clone(), pulled_ref.clone()).await,
    );
    // Without the CA, skopeo does not trust pier's certificate.
    let untrusted = skopeo
        .try_run(&["inspect", "--creds", "reader:reader-pw", &dest])
        .await;
    assert!(
        !untrusted.success && untrusted.output.contains("certificate"),
        "a client without the CA refuses the certificate:\n{}",
        untrusted.output
    );

    // htpasswd edited while pier runs: a new user can pull within seconds, and not after
    // being removed.
    let inspect = |creds: &'static str| {
        let certs = certs.clone();
        let dest = dest.clone();
        let skopeo = &skopeo;
        async move {
            skopeo
                .try_run(&["inspect", "--cert-dir", &certs, "--creds", creds, &dest])
                .await
        }
    };
    assert_refused("a user not yet added", &inspect("late:late-pw").await);
    add_user(&secure.htpasswd, "late", "late-pw");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let o = inspect("late:late-pw").await;
        if o.success {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a user added to the htpasswd file cannot pull after 15 s:\n{}",
            o.output
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    remove_user(&secure.htpasswd, "late");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let o = inspect("late:late-pw").await;
        if !o.success {
            assert_refused("a removed user", &o);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a user removed from the htpasswd file still pulls after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// podman logs in over TLS (trusting the test CA through `--cert-dir`), pushes, forgets the
/// image and pulls it back; after `logout` the pull is refused; the reader cannot push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_logs_in_pushes_and_pulls_over_tls() {
    let Some(tmp) = interop_tempdir(&["podman", "gzip", "openssl", "curl", "htpasswd"]) else {
        return;
    };
    let (layout, image) = common::small_image(&tmp.path().join("src"), 61);
    let secure = Secure::start(&tmp.path().join("pier"), "127.0.0.1");
    let certs = secure.cert_dir().display().to_string();
    let host = secure.host();
    let podman = Podman::new(&tmp.path().join("podman"));
    let policy = podman.policy();
    let archive = tmp.path().join("image.oci.tar");
    {
        let mut tar = tar::Builder::new(std::fs::File::create(&archive).unwrap());
        tar.append_dir_all(".", &layout.dir).unwrap();
        tar.finish().unwrap();
    }
    podman
        .run(&[
            "load",
            "--signature-policy",
            &policy,
            "-i",
            &archive.display().to_string(),
        ])
        .await;
    let config_hex = image.config.hex().to_string();
    let app = format!("{host}/team/app:v1");
    podman.run(&["tag", &config_hex, &app]).await;

    let wrong = podman
        .try_run(&[
            "login",
            "--cert-dir",
            &certs,
            "-u",
            "writer",
            "-p",
            "nope",
            &host,
        ])
        .await;
    assert_refused("podman login with a wrong password", &wrong);
    podman
        .run(&[
            "login",
            "--cert-dir",
            &certs,
            "-u",
            "writer",
            "-p",
            "writer-pw",
            &host,
        ])
        .await;
    podman
        .run(&[
            "push",
            "--cert-dir",
            &certs,
            "--signature-policy",
            &policy,
            &app,
        ])
        .await;
    podman.run(&["rmi", "--all", "--force"]).await;
    podman
        .run(&[
            "pull",
            "--cert-dir",
            &certs,
            "--signature-policy",
            &policy,
            &app,
        ])
        .await;
    assert_eq!(
        podman.inspect(&app, "{{.Id}}").await,
        config_hex,
        "the image pulled back"
    );

    podman.run(&["logout", &host]).await;
    podman.run(&["rmi", "--all", "--force"]).await;
    let anonymous = podman
        .try_run(&[
            "pull",
            "--cert-dir",
            &certs,
            "--signature-policy",
            &policy,
            &app,
        ])
        .await;
    assert_refused("an anonymous pull", &anonymous);

    podman
        .run(&[
            "login",
            "--cert-dir",
            &certs,
            "-u",
            "reader",
            "-p",
            "reader-pw",
            &host,
        ])
        .await;
    podman
        .run(&[
            "pull",
            "--cert-dir",
            &certs,
            "--signature-policy",
            &policy,
            &app,
        ])
        .await;
    let other = format!("{host}/team/other:v1");
    podman.run(&["tag", &app, &other]).await;
    let push = podman
        .try_run(&[
            "push",
            "--cert-dir",
            &certs,
            "--signature-policy",
            &policy,
            &other,
        ])
        .await;
    assert_refused("the reader's push", &push);
}

/// containerd pulls over TLS with the CA in hosts.toml and the reader's credentials through
/// its resolver (`ctr --user`), and is refused without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_with_credentials_over_tls() {
    let Some(tmp) =
        interop_tempdir(&["containerd", "ctr", "skopeo", "openssl", "curl", "htpasswd"])
    else {
        return;
    };
    let skopeo = Skopeo::new(tmp.path());
    let (layout, image) = common::small_image(&tmp.path().join("src"), 71);
    let secure = Secure::start(&tmp.path().join("pier"), "127.0.0.1");
    let certs = secure.cert_dir().display().to_string();
    let host = secure.host();
    skopeo
        .run(&[
            "copy",
            "--preserve-digests",
            "--dest-cert-dir",
            &certs,
            "--dest-creds",
            "writer:writer-pw",
            &oci_ref(&layout.dir, "v1"),
            &format!("docker://{host}/team/app:v1"),
        ])
        .await;

    let hosts = tmp.path().join("hosts");
    let host_dir = hosts.join(&host);
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"https://{host}\"\n\n[host.\"https://{host}\"]\n  \
             capabilities = [\"pull\", \"resolve\"]\n  ca = {:?}\n",
            secure.dir.join("ca.pem")
        ),
    )
    .unwrap();
    let containerd = Containerd::start(&tmp.path().join("containerd"));
    let reference = format!("{host}/team/app:v1");
    let hosts_arg = hosts.display().to_string();
    let pull = |user: Option<&'static str>| {
        let mut args = vec![
            "images",
            "pull",
            "--hosts-dir",
            hosts_arg.as_str(),
            "--snapshotter",
            "native",
            "--platform",
            "linux/amd64",
        ];
        if let Some(u) = user {
            args.extend(["--user", u]);
        }
        args.push(reference.as_str());
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let anonymous = pull(None);
    let refused = containerd
        .try_ctr(&anonymous.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    assert_refused("containerd without credentials", &refused);
    let wrong = pull(Some("reader:wrong"));
    let refused = containerd
        .try_ctr(&wrong.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    assert_refused("containerd with a wrong password", &refused);
    let reader = pull(Some("reader:reader-pw"));
    containerd
        .ctr(&reader.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    containerd.assert_unpacked(&image);
}

/// The address the Docker test serves on: Docker treats every registry on 127.0.0.0/8 as
/// insecure and would not verify the certificate there, so pier listens on an address this
/// test adds to the loopback interface.
const DOCKER_IP: &str = "10.213.7.1";

/// [`DOCKER_IP`] on `lo`, removed on drop.
struct LoopbackAddress;

impl LoopbackAddress {
    fn add() -> LoopbackAddress {
        let cidr = format!("{DOCKER_IP}/32");
        let _ = Command::new("ip")
            .args(["addr", "del", &cidr, "dev", "lo"])
            .output();
        let out = Command::new("ip")
            .args(["addr", "add", &cidr, "dev", "lo"])
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip addr add {cidr} dev lo: {} (the Docker TLS test needs root)",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopbackAddress
    }
}

impl Drop for LoopbackAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{DOCKER_IP}/32"), "dev", "lo"])
            .output();
    }
}

/// Docker's certificate directory for one registry, removed on drop.
struct DockerCerts(PathBuf);

impl Drop for DockerCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Docker Engine trusts the test CA (`/etc/docker/certs.d/<host>/ca.crt`), logs in, pushes,
/// forgets the image and pulls it back over TLS; a wrong password fails `docker login`, and
/// after `logout` the pull is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_logs_in_pushes_and_pulls_over_tls() {
    let Some(tmp) = interop_tempdir(&[
        "docker", "dockerd", "skopeo", "gzip", "openssl", "curl", "htpasswd", "ip",
    ]) else {
        return;
    };
    if !nix_is_root() {
        println!("SKIPPED: the Docker TLS test needs root (an address on lo, /etc/docker)");
        return;
    }
    let _address = LoopbackAddress::add();
    let skopeo = Skopeo::new(tmp.path());
    let (layout, image) = common::small_image(&tmp.path().join("src"), 81);
    let secure = Secure::start(&tmp.path().join("pier"), DOCKER_IP);
    let certs = secure.cert_dir().display().to_string();
    let host = secure.host();
    skopeo
        .run(&[
            "copy",
            "--preserve-digests",
            "--dest-cert-dir",
            &certs,
            "--dest-creds",
            "writer:writer-pw",
            &oci_ref(&layout.dir, "v1"),
            &format!("docker://{host}/team/seed:v1"),
        ])
        .await;
    let docker_certs = DockerCerts(PathBuf::from(format!("/etc/docker/certs.d/{host}")));
    std::fs::create_dir_all(&docker_certs.0).unwrap();
    std::fs::copy(secure.dir.join("ca.pem"), docker_certs.0.join("ca.crt")).unwrap();

    let docker = Docker::start(&tmp.path().join("docker"), "{}\n");
    let wrong = docker
        .try_run(&["login", "-u", "writer", "-p", "nope", &host])
        .await;
    assert_refused("docker login with a wrong password", &wrong);
    docker
        .run_with_stdin(
            &["login", "-u", "writer", "--password-stdin", &host],
            "writer-pw\n",
        )
        .await;
    let seed = format!("{host}/team/seed:v1");
    docker.run(&["pull", &seed]).await;
    assert_eq!(docker.image_id(&seed).await, image.config.digest);
    let app = format!("{host}/team/app:v1");
    docker.run(&["tag", &seed, &app]).await;
    docker.run(&["push", &app]).await;
    docker.run(&["rmi", &seed, &app]).await;
    docker.run(&["pull", &app]).await;
    assert_eq!(
        docker.image_id(&app).await,
        image.config.digest,
        "the image pulled back"
    );
    docker.run(&["logout", &host]).await;
    docker.run(&["rmi", &app]).await;
    let anonymous = docker.try_run(&["pull", &app]).await;
    assert_refused("an anonymous docker pull", &anonymous);
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}
