//! The real clients the interop tiers drive (`interop.rs`, `mirror.rs`): skopeo, a private
//! containerd daemon with `ctr`, a private Docker Engine (`dockerd` with the `docker` CLI), and
//! podman. Every file they write stays in the test's tempdir (or, for sockets, a short one of
//! its own), and every run is bounded in time, so a hung client fails the test instead of
//! stalling the suite.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{
    command_in, digest_of_file, kill_child, spawn_logged, wait_startup, within, Startup,
    WrittenImage,
};

/// How long one skopeo, ctr, docker or podman run may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Run a client (`tool args`) with a deadline, killed when it passes, and print how long it
/// took. Panics with its output, followed by `context()` (say, a daemon's log), unless it
/// succeeds. Returns stdout.
async fn run_client(
    cmd: tokio::process::Command,
    tool: &str,
    args: &[&str],
    context: impl FnOnce() -> String,
) -> Vec<u8> {
    let out = run_output(cmd, tool, args).await;
    assert!(
        out.status.success(),
        "{tool} {} failed ({}):\nstdout: {}\nstderr: {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        context()
    );
    out.stdout
}

/// Run a client with a deadline (killed when it passes) and return what it did, success or
/// not: for the runs a test expects to be refused.
async fn run_output(
    mut cmd: tokio::process::Command,
    tool: &str,
    args: &[&str],
) -> std::process::Output {
    let started = Instant::now();
    cmd.kill_on_drop(true);
    let out = within(CLIENT_TIMEOUT, tool, cmd.output())
        .await
        .unwrap_or_else(|e| panic!("run {tool}: {e}"));
    println!("{tool} {} -- {:?}", args.join(" "), started.elapsed());
    out
}

/// A client run that is expected to fail: whether it succeeded, and its stdout and stderr.
pub struct Outcome {
    pub success: bool,
    pub output: String,
}

impl From<std::process::Output> for Outcome {
    fn from(out: std::process::Output) -> Outcome {
        Outcome {
            success: out.status.success(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

/// `oci:<dir>:<tag>`: an image in an OCI layout, as skopeo names it.
pub fn oci_ref(dir: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", dir.display())
}

// ---------------------------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------------------------

/// skopeo, kept inside a test's tempdir: its TMPDIR, HOME and auth file are there. skopeo run
/// as root writes a blob-info cache to /var/lib/containers whatever it is told, so as root it
/// runs as `nobody`, whose cache goes under HOME. It may run inside a network namespace.
pub struct Skopeo {
    scratch: PathBuf,
    user: Option<u32>,
    netns: Option<String>,
}

const NOBODY: u32 = 65534;

impl Skopeo {
    pub fn new(tmp: &Path) -> Skopeo {
        Skopeo::with_netns(tmp, None)
    }

    /// skopeo run inside the network namespace `netns` (`ip netns exec`), its files in `tmp`.
    pub fn in_netns(tmp: &Path, netns: &str) -> Skopeo {
        Skopeo::with_netns(tmp, Some(netns))
    }

    fn with_netns(tmp: &Path, netns: Option<&str>) -> Skopeo {
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
            netns: netns.map(String::from),
        };
        skopeo.writable_dir(&skopeo.scratch);
        skopeo
    }

    /// Create a directory skopeo may write into.
    pub fn writable_dir(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).expect("create dir");
        if let Some(uid) = self.user {
            std::os::unix::fs::chown(dir, Some(uid), Some(uid)).expect("chown to nobody");
        }
        dir.to_path_buf()
    }

    /// Run skopeo; panic with its output unless it succeeds. Returns stdout.
    pub async fn run(&self, args: &[&str]) -> Vec<u8> {
        run_client(self.command(args), "skopeo", args, String::new).await
    }

    /// Run skopeo and return what it did, success or not.
    pub async fn try_run(&self, args: &[&str]) -> Outcome {
        run_output(self.command(args), "skopeo", args).await.into()
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        // Entering a namespace needs root, so inside one the switch to `nobody` happens after
        // it (setpriv), not before the exec.
        let mut cmd = match (&self.netns, self.user) {
            (Some(ns), Some(uid)) => {
                let mut c = command_in(Some(ns), "setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .args(["--clear-groups", "--", "skopeo"]);
                tokio::process::Command::from(c)
            }
            (netns, _) => tokio::process::Command::from(command_in(netns.as_deref(), "skopeo")),
        };
        cmd.arg("--insecure-policy")
            .args(args)
            .env("TMPDIR", &self.scratch)
            .env("HOME", &self.scratch)
            .env("XDG_DATA_HOME", self.scratch.join("share"))
            .env("REGISTRY_AUTH_FILE", self.scratch.join("auth.json"))
            .current_dir(&self.scratch)
            .stdin(Stdio::null());
        if let (Some(uid), None) = (self.user, &self.netns) {
            cmd.uid(uid).gid(uid);
        }
        cmd
    }

    /// `skopeo copy --preserve-digests` from `src` to `dest`. Without --preserve-digests skopeo
    /// gzips uncompressed layers on their way into an `oci:` layout. TLS verification is off
    /// for each side that is a registry (`docker://`): every registry here speaks plain HTTP.
    pub async fn copy(&self, src: &str, dest: &str) -> Vec<u8> {
        self.copy_with(&[], src, dest).await
    }

    /// [`Skopeo::copy`] with `--all`: every image of a multi-platform index.
    pub async fn copy_all(&self, src: &str, dest: &str) -> Vec<u8> {
        self.copy_with(&["--all"], src, dest).await
    }

    async fn copy_with(&self, flags: &[&str], src: &str, dest: &str) -> Vec<u8> {
        let mut args = vec!["copy"];
        args.extend_from_slice(flags);
        args.push("--preserve-digests");
        if src.starts_with("docker://") {
            args.push("--src-tls-verify=false");
        }
        if dest.starts_with("docker://") {
            args.push("--dest-tls-verify=false");
        }
        args.extend([src, dest]);
        self.run(&args).await
    }

    /// `skopeo inspect --raw` of a registry image: the manifest's exact bytes.
    pub async fn inspect_raw(&self, image: &str) -> Vec<u8> {
        self.run(&["inspect", "--raw", "--tls-verify=false", image])
            .await
    }

    /// `skopeo inspect` of a registry image, parsed.
    pub async fn inspect(&self, image: &str) -> serde_json::Value {
        serde_json::from_slice(&self.run(&["inspect", "--tls-verify=false", image]).await)
            .expect("skopeo inspect JSON")
    }
}

// ---------------------------------------------------------------------------------------------
// containerd
// ---------------------------------------------------------------------------------------------

/// A private containerd daemon, everything it writes under one directory; killed on drop. It
/// may run inside a network namespace, and then `ctr` runs there too (containerd 2 pulls in the
/// daemon, 1.x in `ctr`: either way the fetches leave from the namespace).
pub struct Containerd {
    child: Option<Child>,
    root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    netns: Option<String>,
}

impl Containerd {
    pub fn start(dir: &Path) -> Containerd {
        Containerd::start_with_netns(dir, None)
    }

    /// containerd (and its `ctr`) inside the network namespace `netns`, files in `dir`.
    pub fn start_in_netns(dir: &Path, netns: &str) -> Containerd {
        Containerd::start_with_netns(dir, Some(netns))
    }

    fn start_with_netns(dir: &Path, netns: Option<&str>) -> Containerd {
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
        let mut cmd = command_in(netns, "containerd");
        cmd.arg("--config").arg(&config_path).env("TMPDIR", dir);
        let out = std::fs::File::create(&log).expect("containerd log");
        let mut c = Containerd {
            child: Some(spawn_logged(&mut cmd, out)),
            root,
            socket,
            log,
            netns: netns.map(String::from),
        };
        let answers = |socket: &Path| {
            socket.exists()
                && ctr_command(socket, netns, &["version"])
                    .output()
                    .is_ok_and(|o| o.status.success())
        };
        let child = c.child.as_mut().expect("just spawned");
        let timeout = Duration::from_secs(30);
        match wait_startup(child, timeout, Duration::from_millis(100), || {
            answers(&c.socket)
        }) {
            Startup::Ready => c,
            Startup::Exited(status) => panic!("containerd exited with {status}:\n{}", c.log()),
            Startup::TimedOut => panic!(
                "containerd not answering on {} after {timeout:?}:\n{}",
                c.socket.display(),
                c.log()
            ),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Run `ctr`; panic with its output and containerd's log unless it succeeds.
    pub async fn ctr(&self, args: &[&str]) -> String {
        let cmd =
            tokio::process::Command::from(ctr_command(&self.socket, self.netns.as_deref(), args));
        let out = run_client(cmd, "ctr", args, || {
            format!("\ncontainerd log:\n{}", self.log())
        })
        .await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Run `ctr` and return what it did, success or not.
    pub async fn try_ctr(&self, args: &[&str]) -> Outcome {
        let cmd =
            tokio::process::Command::from(ctr_command(&self.socket, self.netns.as_deref(), args));
        run_output(cmd, "ctr", args).await.into()
    }

    /// `ctr images pull` of `reference` from a plain-HTTP registry.
    pub async fn pull_plain_http(&self, reference: &str) -> String {
        self.pull_with(&["--plain-http"], reference).await
    }

    /// `ctr images pull` of `reference` with the registry hosts configured in `hosts_dir`.
    pub async fn pull(&self, hosts_dir: &Path, reference: &str) -> String {
        let hosts = hosts_dir.display().to_string();
        self.pull_with(&["--hosts-dir", &hosts], reference).await
    }

    /// `ctr images pull` of the linux/amd64 image of `reference`, unpacked with the native
    /// snapshotter (plain directories the tests can read); `source` says how to reach the
    /// registry.
    async fn pull_with(&self, source: &[&str], reference: &str) -> String {
        let mut args = vec!["images", "pull"];
        args.extend_from_slice(source);
        args.extend([
            "--snapshotter",
            "native",
            "--platform",
            "linux/amd64",
            reference,
        ]);
        self.ctr(&args).await
    }

    /// The native snapshotter's snapshot directories.
    pub fn snapshot_dirs(&self) -> Vec<PathBuf> {
        let snapshots = self
            .root
            .join("io.containerd.snapshotter.v1.native")
            .join("snapshots");
        match std::fs::read_dir(&snapshots) {
            Ok(rd) => rd
                .map(|e| e.expect("snapshot entry").path())
                .filter(|p| p.is_dir())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Assert each layer's file is unpacked in some snapshot with exactly its bytes, and that
    /// one snapshot (the image's top) holds them all.
    pub fn assert_unpacked(&self, image: &WrittenImage) {
        let dirs = self.snapshot_dirs();
        for layer in &image.layers {
            let holders: Vec<&PathBuf> = dirs
                .iter()
                .filter(|d| d.join(&layer.file).is_file())
                .collect();
            assert!(
                !holders.is_empty(),
                "{} not unpacked in any snapshot of {}: {dirs:?}\ncontainerd log:\n{}",
                layer.file,
                self.root.display(),
                self.log()
            );
            for d in holders {
                let f = d.join(&layer.file);
                assert_eq!(
                    std::fs::metadata(&f).expect("stat unpacked file").len(),
                    layer.file_size,
                    "unpacked length of {}",
                    f.display()
                );
                assert_eq!(
                    digest_of_file(&f),
                    layer.file_digest,
                    "unpacked bytes of {}",
                    f.display()
                );
            }
        }
        assert!(
            dirs.iter()
                .any(|d| image.layers.iter().all(|l| d.join(&l.file).is_file())),
            "no snapshot holds every layer's file: {dirs:?}"
        );
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// `ctr` talking to the daemon on `socket`, in the tests' own containerd namespace (and in the
/// network namespace `netns` when given).
fn ctr_command(socket: &Path, netns: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = command_in(netns, "ctr");
    cmd.arg("--address")
        .arg(socket)
        .arg("--namespace")
        .arg("pier-test")
        .args(args)
        .stdin(Stdio::null());
    cmd
}

// ---------------------------------------------------------------------------------------------
// Docker Engine
// ---------------------------------------------------------------------------------------------

/// A private Docker Engine: `dockerd` with its data root in the test's tempdir and its exec root,
/// API socket and pid file in a short directory of its own under /tmp (dockerd and the
/// containerd it starts put unix sockets there, whose paths must stay under about 100 bytes).
/// No iptables rules, no NAT, no bridge: it only pulls and pushes. The vfs storage driver needs
/// no overlay support from the filesystem the tests run on. Stopped on drop.
pub struct Docker {
    child: Option<Child>,
    short: tempfile::TempDir,
    data_root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    /// The CLI's own config dir (`DOCKER_CONFIG`): no credentials or contexts of the machine.
    cli_config: PathBuf,
}

impl Docker {
    /// Start dockerd with `daemon_json` as its `--config-file` (say, `registry-mirrors`) and
    /// wait until `docker info` answers.
    pub fn start(dir: &Path, daemon_json: &str) -> Docker {
        std::fs::create_dir_all(dir).expect("create the docker dir");
        let short = tempfile::Builder::new()
            .prefix("pier-dk")
            .tempdir_in("/tmp")
            .expect("short tempdir for dockerd's sockets");
        let exec_root = short.path().join("x");
        let socket = short.path().join("docker.sock");
        let data_root = dir.join("data-root");
        let cli_config = dir.join("cli");
        std::fs::create_dir_all(&cli_config).expect("create the docker CLI config dir");
        let config = dir.join("daemon.json");
        std::fs::write(&config, daemon_json).expect("write daemon.json");
        let log = dir.join("dockerd.log");
        let mut cmd = Command::new("dockerd");
        cmd.arg("--config-file")
            .arg(&config)
            .arg("--data-root")
            .arg(&data_root)
            .arg("--exec-root")
            .arg(&exec_root)
            .arg("--pidfile")
            .arg(short.path().join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .args([
                "--iptables=false",
                "--ip-masq=false",
                "--bridge=none",
                "--storage-driver=vfs",
            ])
            .env("TMPDIR", dir);
        let mut d = Docker {
            child: Some(spawn_logged(&mut cmd, super::append_log(&log))),
            short,
            data_root,
            socket,
            log,
            cli_config,
        };
        let timeout = Duration::from_secs(60);
        let mut child = d.child.take().expect("just spawned");
        let answers = || {
            d.socket.exists()
                && succeeds_within(
                    d.command(&["info", "--format", "{{.ServerVersion}}"]),
                    Duration::from_secs(10),
                )
        };
        let startup = wait_startup(&mut child, timeout, Duration::from_millis(200), answers);
        d.child = Some(child);
        match startup {
            Startup::Ready => d,
            Startup::Exited(status) => {
                d.child = None;
                panic!("dockerd exited with {status}:\n{}", d.log())
            }
            Startup::TimedOut => panic!(
                "dockerd not answering on {} after {timeout:?}:\n{}",
                d.socket.display(),
                d.log()
            ),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `docker -H unix://<socket> args`, isolated from the machine's Docker CLI config.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker");
        cmd.arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .env("DOCKER_CONFIG", &self.cli_config)
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .stdin(Stdio::null());
        cmd
    }

    /// Run the docker CLI; panic with its output and dockerd's log unless it succeeds.
    pub async fn run(&self, args: &[&str]) -> String {
        let cmd = tokio::process::Command::from(self.command(args));
        let out = run_client(cmd, "docker", args, || {
            format!("\ndockerd log:\n{}", self.log())
        })
        .await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Run the docker CLI and return what it did, success or not.
    pub async fn try_run(&self, args: &[&str]) -> Outcome {
        let cmd = tokio::process::Command::from(self.command(args));
        run_output(cmd, "docker", args).await.into()
    }

    /// Run the docker CLI with `input` on its stdin (`login --password-stdin`); panic unless
    /// it succeeds.
    pub async fn run_with_stdin(&self, args: &[&str], input: &str) -> String {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::from(self.command(args));
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn docker");
        let mut stdin = child.stdin.take().expect("docker's stdin");
        stdin
            .write_all(input.as_bytes())
            .await
            .expect("write stdin");
        drop(stdin);
        let out = within(CLIENT_TIMEOUT, "docker", child.wait_with_output())
            .await
            .expect("docker runs");
        assert!(
            out.status.success(),
            "docker {} failed: {}{}\ndockerd log:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The image ID Docker gives `image`: the digest of its config, `sha256:<hex>`.
    pub async fn image_id(&self, image: &str) -> String {
        self.run(&["image", "inspect", "--format", "{{.Id}}", image])
            .await
            .trim()
            .to_string()
    }

    /// The layer diff IDs Docker recorded for `image` (each verified against the layer's
    /// uncompressed bytes when it was pulled).
    pub async fn diff_ids(&self, image: &str) -> Vec<String> {
        let json = self
            .run(&[
                "image",
                "inspect",
                "--format",
                "{{json .RootFS.Layers}}",
                image,
            ])
            .await;
        serde_json::from_str(json.trim()).expect("RootFS.Layers is a JSON list")
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGTERM lets dockerd stop its containerd and undo its mounts; SIGKILL only if it
        // does not manage that in time, then containerd and the mounts are cleaned up here.
        let containerd = std::fs::read_to_string(
            self.short
                .path()
                .join("x")
                .join("containerd")
                .join("containerd.pid"),
        )
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok());
        if matches!(child.try_wait(), Ok(None)) {
            super::send_signal(&child, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut child = Some(child);
        kill_child(&mut child);
        if let Some(pid) = containerd {
            // At worst it is already gone.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        unmount_under(&[&self.data_root, self.short.path()]);
    }
}

/// Whether `cmd` exits successfully within `limit`; it is killed when the limit passes (a CLI
/// talking to a daemon that accepted the connection but never answers would wait forever).
fn succeeds_within(mut cmd: Command, limit: Duration) -> bool {
    let Ok(mut child) = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn() else {
        return false;
    };
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                kill_child(&mut Some(child));
                return false;
            }
        }
    }
}

/// Detach every mount at or below one of `dirs` (deepest first), so their tempdirs can be
/// removed after a daemon died without undoing its own mounts.
fn unmount_under(dirs: &[&Path]) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut targets: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(PathBuf::from)
        .filter(|t| dirs.iter().any(|d| t.starts_with(d)))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.components().count()));
    for t in targets {
        let _ = Command::new("umount").arg("-l").arg(&t).status();
    }
}

// ---------------------------------------------------------------------------------------------
// podman
// ---------------------------------------------------------------------------------------------

/// podman with its storage (vfs: no overlay or fuse needed), run root, libpod state, and
/// configuration files (storage.conf, registries.conf, containers.conf, policy.json) all in
/// one directory, so nothing of the machine's podman setup is read or changed. It only pulls,
/// tags and pushes: no containers, so no network, conmon or cgroups come into play.
pub struct Podman {
    dir: PathBuf,
}

impl Podman {
    pub fn new(dir: &Path) -> Podman {
        for sub in ["root", "run", "tmp", "networks", "volumes"] {
            std::fs::create_dir_all(dir.join(sub)).expect("create podman dirs");
        }
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text).expect("write podman config");
        };
        write(
            "storage.conf",
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                dir.join("root").display(),
                dir.join("run").display()
            ),
        );
        // No search registries: a short name must never reach out to the internet.
        write(
            "registries.conf",
            "unqualified-search-registries = []\n".into(),
        );
        write(
            "containers.conf",
            "[engine]\nevents_logger = \"none\"\ncgroup_manager = \"cgroupfs\"\n".into(),
        );
        write(
            "policy.json",
            r#"{"default": [{"type": "insecureAcceptAnything"}]}"#.into(),
        );
        // podman insists that an auth file it is pointed at exists.
        write("auth.json", "{}\n".into());
        Podman {
            dir: dir.to_path_buf(),
        }
    }

    /// Run podman with this instance's storage and configuration; panic with its output unless
    /// it succeeds. Returns stdout.
    pub async fn run(&self, args: &[&str]) -> String {
        let out = run_client(self.command(args), "podman", args, String::new).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Run podman and return what it did, success or not.
    pub async fn try_run(&self, args: &[&str]) -> Outcome {
        run_output(self.command(args), "podman", args).await.into()
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let d = |sub: &str| self.dir.join(sub);
        let mut cmd = tokio::process::Command::new("podman");
        cmd.arg("--root")
            .arg(d("root"))
            .arg("--runroot")
            .arg(d("run"))
            .arg("--tmpdir")
            .arg(d("tmp"))
            .arg("--network-config-dir")
            .arg(d("networks"))
            .arg("--volumepath")
            .arg(d("volumes"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "none",
            ])
            .args(args)
            .env("CONTAINERS_STORAGE_CONF", d("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", d("registries.conf"))
            .env("CONTAINERS_CONF", d("containers.conf"))
            .env("REGISTRY_AUTH_FILE", d("auth.json"))
            .env("TMPDIR", d("tmp"))
            .env("HOME", &self.dir)
            .env("XDG_RUNTIME_DIR", d("run"))
            .env("XDG_CONFIG_HOME", d("config"))
            .env("XDG_DATA_HOME", d("share"))
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        cmd
    }

    /// Add `entries` (say, what `pier config podman` prints) to this podman's registries.conf.
    pub fn add_registries_conf(&self, entries: &str) {
        let path = self.dir.join("registries.conf");
        let mut text = std::fs::read_to_string(&path).expect("read registries.conf");
        text.push('\n');
        text.push_str(entries);
        std::fs::write(&path, text).expect("write registries.conf");
    }

    /// The policy file to pass as `--signature-policy` to pull and push.
    pub fn policy(&self) -> String {
        self.dir.join("policy.json").display().to_string()
    }

    /// `podman image inspect --format <format> image`, trimmed.
    pub async fn inspect(&self, image: &str, format: &str) -> String {
        self.run(&["image", "inspect", "--format", format, image])
            .await
            .trim()
            .to_string()
    }
}
