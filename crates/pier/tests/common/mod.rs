//! Helpers shared by pier's process-level tests: the real `pier` binary as a child process
//! (one way to start a node, [`Launch`], with its config, flags and environment, kept by the
//! [`Pier`] it returns so that a test can restart the node), one way to run the CLI
//! ([`pier_cli`]), small helpers for any child process the tests start (logs, readiness,
//! cleanup), deterministic content, an OCI image-layout writer, a plain reqwest pusher and
//! checker, and the gate of the interop tier. [`clients`] drives the real clients the interop
//! tiers run: skopeo, containerd, podman and docker.
//!
//! Each test binary uses a different subset of these helpers; each tier keeps only what is
//! particular to it.
#![allow(dead_code)]

pub mod certs;
pub mod clients;

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest as _, Sha256};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// How long a started pier (or another server a test starts) gets to answer `GET /v2/`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// What became of a child process started to serve.
pub enum Startup {
    Ready,
    Exited(ExitStatus),
    TimedOut,
}

/// Poll every `poll` until `ready()` holds, `child` exits, or `timeout` passes.
pub fn wait_startup(
    child: &mut Child,
    timeout: Duration,
    poll: Duration,
    mut ready: impl FnMut() -> bool,
) -> Startup {
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Startup::Exited(status);
        }
        if ready() {
            return Startup::Ready;
        }
        if started.elapsed() > timeout {
            return Startup::TimedOut;
        }
        std::thread::sleep(poll);
    }
}

/// Open a child's log file for appending: restarts add to what is there.
pub fn append_log(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open the log {}: {e}", path.display()))
}

/// `program` to be run inside the network namespace `netns` when one is given, through
/// `ip netns exec`, which execs the program in place: the child's pid is the program's, so
/// signals sent to the child reach it. Without a namespace, `program` as is.
pub fn command_in(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns, program]);
            cmd
        }
        None => Command::new(program),
    }
}

/// Spawn `cmd` with no stdin, its stdout and stderr both going to `log`.
pub fn spawn_logged(cmd: &mut Command, log: File) -> Child {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone the log handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"))
}

/// A log file's text from byte `offset` on; "" when there is none.
pub fn read_log(path: &Path, offset: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = (offset as usize).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// During a panic, print the last `lines` lines of `what`'s log: a failing test shows why.
pub fn print_log_tail_if_panicking(what: &str, path: &Path, lines: usize) {
    if !std::thread::panicking() {
        return;
    }
    let log = read_log(path, 0);
    let all: Vec<&str> = log.lines().collect();
    eprintln!(
        "--- last lines of the {what} log {} ---\n{}\n--- end of {what} log ---",
        path.display(),
        all[all.len().saturating_sub(lines)..].join("\n")
    );
}

/// SIGKILL and reap a child that may still run.
pub fn kill_child(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Run a future with a deadline, panicking with `what` when it passes.
pub async fn within<T>(limit: Duration, what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {limit:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The pier process
// ---------------------------------------------------------------------------------------------

/// How a `pier serve` is started: its data directory, log, config file, flags, environment,
/// address and readiness probe. [`Launch::start`] starts it; the [`Pier`] it returns keeps it,
/// so that [`Pier::restart`] starts the same node again on what it left behind.
#[derive(Clone)]
pub struct Launch {
    data_dir: PathBuf,
    log_path: PathBuf,
    /// The config file given with `--config`, once [`Launch::config`] wrote it.
    config: Option<PathBuf>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    ip: String,
    ready: Arc<dyn Fn(u16) -> bool + Send + Sync>,
}

impl Launch {
    /// pier with `data_dir` as its data directory, stdout and stderr appended (across
    /// restarts) to `log_path`, listening on 127.0.0.1 and ready once `GET /v2/` answers 200
    /// (401 with auth on: a node with auth challenges every caller without credentials).
    pub fn new(data_dir: &Path, log_path: &Path) -> Launch {
        Launch {
            data_dir: data_dir.to_path_buf(),
            log_path: log_path.to_path_buf(),
            config: None,
            args: Vec::new(),
            env: Vec::new(),
            ip: "127.0.0.1".to_string(),
            ready: Arc::new(|port| matches!(http_status(port, "/v2/"), Some(200 | 401))),
        }
    }

    /// [`Launch::new`] for a node of its own directory: data in `<dir>/data`, the log at
    /// `<dir>/pier.log` (and a config, if given, at `<dir>/pier.toml`).
    pub fn in_dir(dir: &Path) -> Launch {
        std::fs::create_dir_all(dir).expect("create the node's directory");
        Launch::new(&dir.join("data"), &dir.join("pier.log"))
    }

    /// Write `toml` as the node's config file, beside its log with the ending `.toml`, and
    /// pass it with `--config` (before the other flags).
    pub fn config(mut self, toml: &str) -> Launch {
        let path = self.log_path.with_extension("toml");
        write_config(&path, toml);
        self.config = Some(path);
        self
    }

    /// Flags after `--listen`, `--data-dir` and `--config`.
    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Launch {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// A member of a cluster on this host: named `name`, its peer listener on
    /// 127.0.0.1:`peer_port`, the cluster secret in the file `secret`, joining through the
    /// member whose peer listener is on 127.0.0.1:`join` when one is given.
    pub fn member(self, name: &str, peer_port: u16, secret: &Path, join: Option<u16>) -> Launch {
        let launch = self.args([
            "--node-name",
            name,
            "--peer-listen",
            &format!("127.0.0.1:{peer_port}"),
            "--cluster-secret-file",
            &secret.display().to_string(),
        ]);
        match join {
            Some(port) => launch.args(["--join", &format!("127.0.0.1:{port}")]),
            None => launch,
        }
    }

    /// An environment variable of the process.
    pub fn env(mut self, key: &str, value: &str) -> Launch {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Listen on `ip` (an address of this host) instead of 127.0.0.1.
    pub fn ip(mut self, ip: &str) -> Launch {
        self.ip = ip.to_string();
        self
    }

    /// Ready once `ready(port)` holds: a node serving TLS, or one that wants credentials for
    /// `/v2/`, is asked differently.
    pub fn ready(mut self, ready: impl Fn(u16) -> bool + Send + Sync + 'static) -> Launch {
        self.ready = Arc::new(ready);
        self
    }

    /// Start pier on a free port and wait until it is ready.
    pub fn start(self) -> Pier {
        let mut pier = Pier {
            child: None,
            port: 0,
            launch: self,
        };
        pier.run();
        pier
    }
}

/// A cluster secret for the members a test starts with [`Launch::member`], written to
/// `<dir>/secret`; its path.
pub fn cluster_secret(dir: &Path) -> PathBuf {
    let path = dir.join("secret");
    std::fs::write(&path, "a cluster secret of some length\n").expect("write the cluster secret");
    path
}

fn write_config(path: &Path, toml: &str) {
    std::fs::write(path, toml)
        .unwrap_or_else(|e| panic!("write the pier config {}: {e}", path.display()));
}

/// A running `pier serve`, on 127.0.0.1 unless its [`Launch`] said otherwise. Dropping it
/// SIGKILLs the process; on a panic the log's tail is printed.
pub struct Pier {
    child: Option<Child>,
    port: u16,
    launch: Launch,
}

impl Pier {
    /// Start pier on a free port with `data_dir` as its data directory, every repository hosted
    /// (`--hosted '**'`), and wait until `GET /v2/` answers 200 (401 with auth on). stdout and
    /// stderr go, appended across restarts, to `<data_dir's parent>/<data_dir's name>.pier.log`.
    pub fn start(data_dir: &Path) -> Pier {
        let parent = data_dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .expect("the data directory has a parent to hold the log");
        std::fs::create_dir_all(parent).expect("create the data directory's parent");
        let name = data_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("pier");
        // A registry for pushes: every name hosted, so no push is refused for shadowing a name
        // of the default upstream (docker.io).
        Launch::new(data_dir, &parent.join(format!("{name}.pier.log")))
            .args(["--hosted", "**"])
            .start()
    }

    /// A node of its own directory `dir` configured by `toml`: the config written to
    /// `<dir>/pier.toml` and given with `--config`, then `args`; data in `<dir>/data`, the log
    /// at `<dir>/pier.log`.
    pub fn with_config(dir: &Path, toml: &str, args: &[&str]) -> Pier {
        Launch::in_dir(dir).config(toml).args(args).start()
    }

    /// Start the process of [`Launch`] until it is ready, retrying on another port when the
    /// one picked was taken meanwhile.
    fn run(&mut self) {
        let launch = &self.launch;
        let ip = launch.ip.clone();
        let mut args: Vec<String> = Vec::new();
        if let Some(config) = &launch.config {
            args.extend(["--config".to_string(), config.display().to_string()]);
        }
        args.extend(launch.args.iter().cloned());
        // Picking a port and handing it over leaves a window in which someone else may take it:
        // if pier then cannot listen, try another port.
        for attempt in 1..=5 {
            let port = free_port();
            let log_start = std::fs::metadata(&self.launch.log_path).map_or(0, |m| m.len());
            let mut log = append_log(&self.launch.log_path);
            writeln!(
                log,
                "=== test harness: pier serve --listen {ip}:{port}{} (attempt {attempt})",
                args.iter().map(|a| format!(" {a}")).collect::<String>()
            )
            .expect("write the pier log");
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_pier"));
            cmd.arg("serve")
                .arg("--listen")
                .arg(format!("{ip}:{port}"))
                .arg("--data-dir")
                .arg(&self.launch.data_dir)
                .args(&args)
                .env("NO_COLOR", "1")
                // The tests read pier's log, so a filter from the caller's environment must not
                // hide what they look for.
                .env_remove("PIER_LOG")
                .envs(self.launch.env.iter().map(|(k, v)| (k, v)));
            self.child = Some(spawn_logged(&mut cmd, log));
            self.port = port;
            let ready = Arc::clone(&self.launch.ready);
            let child = self.child.as_mut().expect("just spawned");
            match wait_startup(child, READY_TIMEOUT, Duration::from_millis(50), || {
                ready(port)
            }) {
                Startup::Ready => {
                    let log = self.log_since(log_start);
                    assert!(
                        log.contains("pier is serving") && log.contains(&format!("{ip}:{port}")),
                        "pier answers but did not log \"pier is serving\" with its address:\n{log}"
                    );
                    return;
                }
                Startup::Exited(status) => {
                    self.child = None;
                    let log = self.log_since(log_start);
                    if log.contains("cannot listen") && attempt < 5 {
                        continue;
                    }
                    panic!("pier exited with {status} before it was ready:\n{log}");
                }
                Startup::TimedOut => {
                    self.kill();
                    panic!(
                        "pier was not ready within {READY_TIMEOUT:?}:\n{}",
                        self.log_since(log_start)
                    );
                }
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Start the same node again, as [`Launch`] said (data directory, config file, flags,
    /// environment), appending to the same log; a node still running is stopped first (SIGTERM,
    /// graceful exit). It listens on a new port: ask [`Pier::url`] again.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.run();
    }

    /// Write `toml` over the node's config file, for its next [`Pier::restart`].
    pub fn set_config(&self, toml: &str) {
        let path = self
            .launch
            .config
            .as_ref()
            .expect("the node was started with a config file");
        write_config(path, toml);
    }

    /// The config file given with `--config`, when the node was started with one.
    pub fn config_path(&self) -> Option<&Path> {
        self.launch.config.as_deref()
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// `127.0.0.1:<port>`, as image references spell a registry.
    pub fn host(&self) -> String {
        format!("{}:{}", self.launch.ip, self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The running process (to signal it).
    pub fn child(&self) -> &Child {
        self.child.as_ref().expect("pier is running")
    }

    pub fn data_dir(&self) -> &Path {
        &self.launch.data_dir
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("pier is running").id()
    }

    /// Everything pier wrote to stdout and stderr so far, across restarts.
    pub fn log(&self) -> String {
        self.log_since(0)
    }

    fn log_since(&self, offset: u64) -> String {
        read_log(&self.launch.log_path, offset)
    }

    /// SIGKILL: no chance to clean up, as in a power cut of the process. Waits for the exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(&child, libc::SIGKILL);
            child.wait().expect("reap the killed pier");
        }
    }

    /// Send SIGTERM without waiting.
    pub fn terminate(&self) {
        send_signal(self.child.as_ref().expect("pier is running"), libc::SIGTERM);
    }

    /// Wait for pier to exit on its own; SIGKILL it and panic after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("pier is running");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("poll pier") {
                return status;
            }
            if started.elapsed() > timeout {
                send_signal(&child, libc::SIGKILL);
                let _ = child.wait();
                panic!(
                    "pier did not exit within {timeout:?} and was killed:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait (up to 60 s) for the graceful exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.terminate();
        self.wait_exit(Duration::from_secs(60))
    }

    /// A snapshot of `/metrics`.
    pub async fn metrics(&self, http: &reqwest::Client) -> Metrics {
        let resp = http
            .get(format!("{}/metrics", self.url()))
            .send()
            .await
            .expect("GET /metrics");
        assert!(
            resp.status().is_success(),
            "GET /metrics: {}",
            resp.status()
        );
        Metrics(resp.text().await.expect("metrics body"))
    }
}

impl Drop for Pier {
    fn drop(&mut self) {
        self.kill();
        print_log_tail_if_panicking("pier", &self.launch.log_path, 60);
    }
}

/// Send `sig` to a child that has not been reaped yet.
#[allow(unsafe_code)]
pub fn send_signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) takes two integers and touches no memory of ours. `child` is not reaped
    // yet (reaping takes it by value or through `&mut`), so the pid still names our child.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// The text of `/metrics`, with sums over label subsets.
pub struct Metrics(pub String);

impl Metrics {
    /// The sum of every sample of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut total = 0.0;
        for line in self.0.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                continue;
            }
            let have: Vec<(&str, &str)> = label_text
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.trim(), v.trim_matches('"')))
                .collect();
            if labels.iter().all(|want| have.contains(want)) {
                total += value.parse::<f64>().unwrap_or(0.0);
            }
        }
        total
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// The status code of a plain `GET path` on 127.0.0.1:port, or `None` if nothing answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    http_status_at(SocketAddr::from(([127, 0, 0, 1], port)), path)
}

/// The status code of a plain `GET path` on `addr`, or `None` if nothing answers.
pub fn http_status_at(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(head.get(9..12)?).ok()?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Deterministic content
// ---------------------------------------------------------------------------------------------

const GEN_BLOCK: usize = 64 * 1024;

/// A deterministic pseudo-random byte stream (xorshift64), the same for a seed however it is
/// read: bytes are produced in fixed blocks and served from them.
pub struct Gen {
    state: u64,
    block: Vec<u8>,
    pos: usize,
}

impl Gen {
    pub fn new(seed: u64) -> Gen {
        let state = (seed ^ 0x9E37_79B9_7F4A_7C15).max(1);
        Gen {
            state,
            block: vec![0; GEN_BLOCK],
            pos: GEN_BLOCK,
        }
    }

    fn refill(&mut self) {
        let mut s = self.state;
        for word in self.block.chunks_exact_mut(8) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            word.copy_from_slice(&s.to_le_bytes());
        }
        self.state = s;
        self.pos = 0;
    }

    pub fn fill(&mut self, mut out: &mut [u8]) {
        while !out.is_empty() {
            if self.pos == GEN_BLOCK {
                self.refill();
            }
            let n = out.len().min(GEN_BLOCK - self.pos);
            out[..n].copy_from_slice(&self.block[self.pos..self.pos + n]);
            self.pos += n;
            out = &mut out[n..];
        }
    }
}

/// The first `len` bytes of seed `seed`'s stream.
pub fn gen_bytes(seed: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0; usize::try_from(len).expect("fits memory")];
    Gen::new(seed).fill(&mut v);
    v
}

/// The digest of `prefix` followed by the first `len` bytes of seed `seed`'s stream, computed
/// without holding them.
pub fn gen_digest(prefix: &[u8], seed: u64, len: u64) -> String {
    let mut h = Sha256::new();
    h.update(prefix);
    let mut g = Gen::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        g.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        left -= n as u64;
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `sha256:<hex>` of a file's contents, streamed.
pub fn digest_of_file(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read file");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Whether two files hold the same bytes, compared in streaming fashion.
pub fn files_equal(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (
        File::open(a).expect("open a"),
        File::open(b).expect("open b"),
    );
    if fa.metadata().expect("stat a").len() != fb.metadata().expect("stat b").len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut fa, &mut ba);
        let m = read_full(&mut fb, &mut bb);
        if n != m || ba[..n] != bb[..m] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        let n = f.read(&mut buf[filled..]).expect("read");
        if n == 0 {
            break;
        }
        filled += n;
    }
    filled
}

/// The `Range` value a registry reports for a session holding `len` bytes.
pub fn range_of(len: u64) -> String {
    if len == 0 {
        "0-0".into()
    } else {
        format!("0-{}", len - 1)
    }
}

// ---------------------------------------------------------------------------------------------
// Slow request bodies
// ---------------------------------------------------------------------------------------------

/// A request body fed by a thread at a limited pace: `chunk` bytes of seed `seed`'s stream,
/// then a pause, until `len` bytes are sent. The body is read from one end of a socket pair, so
/// no stream trait is needed; dropping the `Trickle` stops the thread.
pub struct Trickle {
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    writer: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl Trickle {
    pub fn start(seed: u64, len: u64, chunk: usize, pause: Duration) -> (reqwest::Body, Trickle) {
        let (reader, writer) = UnixStream::pair().expect("socket pair");
        let mut w = writer.try_clone().expect("clone the writer");
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (sent, stop) = (sent.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut g = Gen::new(seed);
                let mut buf = vec![0u8; chunk];
                let mut left = len;
                while left > 0 && !stop.load(Ordering::Relaxed) {
                    let n = left.min(chunk as u64) as usize;
                    g.fill(&mut buf[..n]);
                    if w.write_all(&buf[..n]).is_err() {
                        return; // the request is gone
                    }
                    sent.fetch_add(n as u64, Ordering::Relaxed);
                    left -= n as u64;
                    if left > 0 {
                        std::thread::sleep(pause);
                    }
                }
                let _ = w.shutdown(Shutdown::Write);
            })
        };
        let file = File::from(OwnedFd::from(reader));
        let body = reqwest::Body::from(tokio::fs::File::from_std(file));
        (
            body,
            Trickle {
                sent,
                stop,
                writer,
                thread: Some(thread),
            },
        )
    }

    /// Bytes handed to the request so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Trickle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.writer.shutdown(Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// OCI image layouts
// ---------------------------------------------------------------------------------------------

/// One layer: a tar archive holding one regular file of `size` pseudo-random bytes.
#[derive(Debug, Clone)]
pub struct LayerSpec {
    pub file: String,
    pub size: u64,
    pub seed: u64,
}

impl LayerSpec {
    pub fn new(file: &str, size: u64, seed: u64) -> LayerSpec {
        LayerSpec {
            file: file.into(),
            size,
            seed,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub os: String,
    pub arch: String,
    pub layers: Vec<LayerSpec>,
}

impl ImageSpec {
    pub fn linux(arch: &str, layers: Vec<LayerSpec>) -> ImageSpec {
        ImageSpec {
            os: "linux".into(),
            arch: arch.into(),
            layers,
        }
    }
}

/// What a tag of the layout points at.
pub enum Entry {
    Image(ImageSpec),
    /// A multi-platform index over one manifest per image.
    Index(Vec<ImageSpec>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    pub fn to_json(&self) -> serde_json::Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size })
    }

    pub fn hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").expect("sha256 digest")
    }
}

#[derive(Debug, Clone)]
pub struct WrittenLayer {
    pub blob: Descriptor,
    /// Path of the one file inside the tar.
    pub file: String,
    pub file_size: u64,
    /// `sha256:<hex>` of the file's contents.
    pub file_digest: String,
}

#[derive(Debug, Clone)]
pub struct WrittenImage {
    pub manifest: Descriptor,
    pub manifest_bytes: Vec<u8>,
    pub config: Descriptor,
    pub layers: Vec<WrittenLayer>,
    pub os: String,
    pub arch: String,
}

impl WrittenImage {
    /// Config and layer blobs, in push order.
    pub fn blobs(&self) -> Vec<&Descriptor> {
        std::iter::once(&self.config)
            .chain(self.layers.iter().map(|l| &l.blob))
            .collect()
    }

    /// Manifest, config and layer digests.
    pub fn digests(&self) -> Vec<String> {
        std::iter::once(self.manifest.digest.clone())
            .chain(self.blob_digests())
            .collect()
    }

    /// Config and layer digests, in push order.
    pub fn blob_digests(&self) -> Vec<String> {
        self.blobs().into_iter().map(|d| d.digest.clone()).collect()
    }

    /// Layer digests, in manifest order.
    pub fn layer_digests(&self) -> Vec<&str> {
        self.layers.iter().map(|l| l.blob.digest.as_str()).collect()
    }
}

#[derive(Debug, Clone)]
pub struct WrittenIndex {
    pub index: Descriptor,
    pub index_bytes: Vec<u8>,
    pub images: Vec<WrittenImage>,
}

impl WrittenIndex {
    pub fn digests(&self) -> Vec<String> {
        std::iter::once(self.index.digest.clone())
            .chain(self.images.iter().flat_map(WrittenImage::digests))
            .collect()
    }
}

pub enum Written {
    Image(WrittenImage),
    Index(WrittenIndex),
}

/// An OCI image layout on disk and what was written into it.
pub struct Layout {
    pub dir: PathBuf,
    pub entries: Vec<(String, Written)>,
}

impl Layout {
    pub fn image(&self, tag: &str) -> &WrittenImage {
        match self.entries.iter().find(|(t, _)| t == tag) {
            Some((_, Written::Image(i))) => i,
            _ => panic!("no image tagged {tag} in the layout"),
        }
    }

    pub fn index(&self, tag: &str) -> &WrittenIndex {
        match self.entries.iter().find(|(t, _)| t == tag) {
            Some((_, Written::Index(i))) => i,
            _ => panic!("no index tagged {tag} in the layout"),
        }
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        blob_path(&self.dir, digest)
    }
}

/// `<layout>/blobs/sha256/<hex>`
pub fn blob_path(layout_dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    layout_dir.join("blobs").join("sha256").join(hex)
}

/// A small one-image layout tagged `v1` (a 4 KiB and a 2 MiB layer): what the client tests
/// load, push and pull back.
pub fn small_image(dir: &Path, seed: u64) -> (Layout, WrittenImage) {
    let layout = one_image(
        dir,
        "v1",
        vec![
            LayerSpec::new("etc/app.conf", 4099, seed),
            LayerSpec::new("app.bin", 2 * MIB + 3, seed + 1),
        ],
    );
    let image = layout.image("v1").clone();
    (layout, image)
}

/// A layout of one linux/amd64 image of `layers`, tagged `tag`: what most tests push and pull.
pub fn one_image(dir: &Path, tag: &str, layers: Vec<LayerSpec>) -> Layout {
    write_layout(
        dir,
        vec![(tag, Entry::Image(ImageSpec::linux("amd64", layers)))],
    )
}

/// Write an OCI image layout: `oci-layout`, `index.json` naming each entry by its tag in an
/// `org.opencontainers.image.ref.name` annotation, and `blobs/sha256/*`. Layers are streamed
/// to disk, so a layer of hundreds of MiB needs only a few MiB of memory.
pub fn write_layout(dir: &Path, entries: Vec<(&str, Entry)>) -> Layout {
    std::fs::create_dir_all(dir.join("blobs").join("sha256")).expect("create the layout");
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("write oci-layout");
    let mut written = Vec::new();
    let mut top = Vec::new();
    for (tag, entry) in entries {
        let (desc, w) = match entry {
            Entry::Image(spec) => {
                let image = write_image(dir, &spec);
                (image.manifest.clone(), Written::Image(image))
            }
            Entry::Index(specs) => {
                let images: Vec<WrittenImage> = specs.iter().map(|s| write_image(dir, s)).collect();
                let manifests: Vec<serde_json::Value> = images
                    .iter()
                    .map(|i| {
                        let mut d = i.manifest.to_json();
                        d["platform"] = json!({ "architecture": i.arch, "os": i.os });
                        d
                    })
                    .collect();
                let bytes = serde_json::to_vec_pretty(&json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_INDEX,
                    "manifests": manifests,
                }))
                .expect("serialize index");
                let index = write_blob(dir, OCI_INDEX, &bytes);
                (
                    index.clone(),
                    Written::Index(WrittenIndex {
                        index,
                        index_bytes: bytes,
                        images,
                    }),
                )
            }
        };
        let mut d = desc.to_json();
        d["annotations"] = json!({ REF_NAME: tag });
        top.push(d);
        written.push((tag.to_string(), w));
    }
    let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": top });
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec_pretty(&index).expect("serialize index.json"),
    )
    .expect("write index.json");
    Layout {
        dir: dir.to_path_buf(),
        entries: written,
    }
}

fn write_blob(dir: &Path, media_type: &str, bytes: &[u8]) -> Descriptor {
    let digest = digest_of(bytes);
    std::fs::write(blob_path(dir, &digest), bytes).expect("write blob");
    Descriptor {
        media_type: media_type.into(),
        digest,
        size: bytes.len() as u64,
    }
}

fn write_image(dir: &Path, spec: &ImageSpec) -> WrittenImage {
    let layers: Vec<WrittenLayer> = spec.layers.iter().map(|l| write_layer(dir, l)).collect();
    // Layers are uncompressed tars, so each diff_id is the layer's own digest.
    let config = serde_json::to_vec_pretty(&json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": spec.arch,
        "os": spec.os,
        "config": { "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.blob.digest.clone()).collect::<Vec<_>>(),
        },
        "history": layers.iter().map(|l| json!({
            "created": "2024-01-01T00:00:00Z",
            "created_by": format!("pier test: add {}", l.file),
        })).collect::<Vec<_>>(),
    }))
    .expect("serialize config");
    let config = write_blob(dir, OCI_CONFIG, &config);
    let manifest_bytes = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(),
        "layers": layers.iter().map(|l| l.blob.to_json()).collect::<Vec<_>>(),
    }))
    .expect("serialize manifest");
    let manifest = write_blob(dir, OCI_MANIFEST, &manifest_bytes);
    WrittenImage {
        manifest,
        manifest_bytes,
        config,
        layers,
        os: spec.os.clone(),
        arch: spec.arch.clone(),
    }
}

/// A `Write` that hashes and counts what passes through.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `len` bytes of a seed's stream as a `Read`, hashing what it hands out.
struct GenReader {
    gen: Gen,
    left: u64,
    hasher: Sha256,
}

impl Read for GenReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.left.min(buf.len() as u64) as usize;
        self.gen.fill(&mut buf[..n]);
        self.hasher.update(&buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

fn write_layer(dir: &Path, spec: &LayerSpec) -> WrittenLayer {
    let blobs = dir.join("blobs").join("sha256");
    let tmp = tempfile::NamedTempFile::new_in(&blobs).expect("temporary layer file");
    let mut out = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, tmp.reopen().expect("reopen temp file")),
        hasher: Sha256::new(),
        len: 0,
    };
    let mut content = GenReader {
        gen: Gen::new(spec.seed),
        left: spec.size,
        hasher: Sha256::new(),
    };
    {
        let mut tar = tar::Builder::new(&mut out);
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(spec.size);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        tar.append_data(&mut header, &spec.file, &mut content)
            .expect("write the layer tar");
        tar.finish().expect("finish the layer tar");
    }
    out.flush().expect("flush the layer");
    assert_eq!(content.left, 0, "the whole file went into the tar");
    let digest = format!("sha256:{}", hex::encode(out.hasher.finalize()));
    let size = out.len;
    drop(out.inner);
    let path = blob_path(dir, &digest);
    tmp.persist(&path).expect("move the layer into place");
    // Temporary files are private; a layout is readable like any written file.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("make the layer readable");
    WrittenLayer {
        blob: Descriptor {
            media_type: OCI_LAYER_TAR.into(),
            digest,
            size,
        },
        file: spec.file.clone(),
        file_size: spec.size,
        file_digest: format!("sha256:{}", hex::encode(content.hasher.finalize())),
    }
}

// ---------------------------------------------------------------------------------------------
// Pushing and pulling with plain HTTP
// ---------------------------------------------------------------------------------------------

/// How a blob is uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upload {
    /// One `POST ?digest=` carrying the bytes, as pier accepts.
    Monolithic,
    /// `POST` to open a session, then `PUT ?digest=` with the bytes: the CNCF distribution
    /// registry has no single-request monolithic upload.
    PostThenPut,
}

/// Push one blob, the bytes streamed from `file`; asserts the registry accepted it.
pub async fn push_blob(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    file: &Path,
    digest: &str,
    upload: Upload,
) {
    let size = std::fs::metadata(file).expect("stat blob").len();
    let (method, url) = match upload {
        Upload::Monolithic => (
            reqwest::Method::POST,
            format!("{base}/v2/{repo}/blobs/uploads/?digest={digest}"),
        ),
        Upload::PostThenPut => {
            let resp = http
                .post(format!("{base}/v2/{repo}/blobs/uploads/"))
                .send()
                .await
                .expect("start upload");
            assert_eq!(resp.status(), reqwest::StatusCode::ACCEPTED, "POST upload");
            let location = header(&resp, "location");
            let url = if location.starts_with("http") {
                location
            } else {
                format!("{base}{location}")
            };
            let sep = if url.contains('?') { '&' } else { '?' };
            (reqwest::Method::PUT, format!("{url}{sep}digest={digest}"))
        }
    };
    let body = tokio::fs::File::open(file).await.expect("open blob");
    let resp = http
        .request(method.clone(), url)
        .header(reqwest::header::CONTENT_LENGTH, size)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(reqwest::Body::from(body))
        .send()
        .await
        .expect("push blob");
    let status = resp.status();
    assert_eq!(
        status,
        reqwest::StatusCode::CREATED,
        "{method} blob {digest}: {}",
        resp.text().await.unwrap_or_default()
    );
}

/// Push every blob of `image` (streamed from the layout) and then its manifest under `tag`.
pub async fn push_image(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
    layout: &Layout,
    image: &WrittenImage,
    upload: Upload,
) {
    for blob in image.blobs() {
        let file = layout.blob_path(&blob.digest);
        push_blob(http, base, repo, &file, &blob.digest, upload).await;
    }
    let digest = put_manifest(
        http,
        base,
        repo,
        tag,
        &image.manifest.media_type,
        &image.manifest_bytes,
    )
    .await;
    assert_eq!(digest, image.manifest.digest);
}

/// `PUT /v2/<repo>/manifests/<reference>`; asserts 201 and returns Docker-Content-Digest.
pub async fn put_manifest(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) -> String {
    let resp = http
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header(reqwest::header::CONTENT_TYPE, media_type)
        .body(bytes.to_vec())
        .send()
        .await
        .expect("put manifest");
    let status = resp.status();
    let digest = header(&resp, "docker-content-digest");
    assert_eq!(
        status,
        reqwest::StatusCode::CREATED,
        "PUT manifest {repo}:{reference}: {}",
        resp.text().await.unwrap_or_default()
    );
    assert_eq!(
        digest,
        digest_of(bytes),
        "Docker-Content-Digest of the manifest"
    );
    digest
}

/// The JSON document `GET url` answers with; a status other than 2xx, or a body that is not
/// JSON, panics naming the URL.
pub async fn get_json(http: &reqwest::Client, url: &str) -> serde_json::Value {
    let resp = http
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: the body broke off: {e}"));
    let text = || String::from_utf8_lossy(&body).into_owned();
    assert!(status.is_success(), "GET {url}: {status}: {}", text());
    serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {}", text()))
}

/// Every blob is served from `<base>/v2/<repo>/blobs/<digest><query>` with its exact bytes.
pub async fn assert_blobs_served(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    query: &str,
    blobs: &[&Descriptor],
) {
    for blob in blobs {
        let d = &blob.digest;
        let resp = http
            .get(format!("{base}/v2/{repo}/blobs/{d}{query}"))
            .send()
            .await
            .expect("GET blob");
        assert_eq!(
            resp.status(),
            reqwest::StatusCode::OK,
            "GET {repo} blob {d}"
        );
        let (got, len) = try_digest_of_response(resp)
            .await
            .unwrap_or_else(|e| panic!("body of {repo} blob {d} broke: {e}"));
        assert_eq!(&got, d, "bytes of {repo} blob {d}");
        assert_eq!(len, blob.size, "length of {repo} blob {d}");
    }
}

/// Every blob of `digests` is in the layout at `copy` with the same bytes as in `original`.
pub fn assert_same_blobs(original: &Layout, copy: &Path, digests: &[String]) {
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

/// A response header as text, or "" when absent.
pub fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// The first OCI error code of an error body.
pub fn error_code(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(String::from))
        .unwrap_or_else(|| format!("<no OCI error in {:?}>", String::from_utf8_lossy(body)))
}

/// Stream a response body through sha256: (`sha256:<hex>`, length), or `Err` when the body
/// breaks off.
pub async fn try_digest_of_response(
    mut resp: reqwest::Response,
) -> Result<(String, u64), reqwest::Error> {
    let mut h = Sha256::new();
    let mut len = 0u64;
    while let Some(chunk) = resp.chunk().await? {
        h.update(&chunk);
        len += chunk.len() as u64;
    }
    Ok((format!("sha256:{}", hex::encode(h.finalize())), len))
}

// ---------------------------------------------------------------------------------------------
// The interop gate
// ---------------------------------------------------------------------------------------------

/// Whether an interop test may run: only with `PIER_INTEROP=1`, and then every tool it needs
/// must be on PATH (a missing one fails the test instead of skipping it).
pub fn require(tools: &[&str]) -> bool {
    if std::env::var("PIER_INTEROP").as_deref() != Ok("1") {
        println!(
            "skipped: set PIER_INTEROP=1 to run this interop test (it needs {})",
            tools.join(", ")
        );
        return false;
    }
    for tool in tools {
        if find_on_path(tool).is_none() {
            let package = match *tool {
                "ctr" | "containerd" => "containerd",
                "docker" | "dockerd" => "docker.io",
                other => other,
            };
            panic!(
                "PIER_INTEROP=1 but `{tool}` is not on PATH: install {package} \
                 (apt-get install -y {package}, or run scripts/test.sh)"
            );
        }
    }
    true
}

/// [`require`], then a fresh tempdir for the test; `None` when the test is skipped.
pub fn interop_tempdir(tools: &[&str]) -> Option<tempfile::TempDir> {
    require(tools).then(|| tempfile::tempdir().expect("tempdir"))
}

pub fn find_on_path(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| {
                p.metadata()
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    })
}

// ---------------------------------------------------------------------------------------------
// Image archives
// ---------------------------------------------------------------------------------------------

/// Add a regular file (mode 0644) of `data` at `path` to an archive.
fn append_file(tar: &mut tar::Builder<File>, path: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, path, data)
        .unwrap_or_else(|e| panic!("append {path} to the archive: {e}"));
}

/// Write `image` of `layout` as `docker save` before Docker 25 writes it: each layer as
/// `<id>/layer.tar` beside `<id>/json` and `<id>/VERSION`, the config as `<hex>.json`, and
/// `manifest.json` (last, as Docker writes it) naming the image by `tags`.
pub fn write_docker_save(layout: &Layout, image: &WrittenImage, tags: &[&str], out: &Path) {
    let mut tar = tar::Builder::new(File::create(out).expect("create the archive"));
    let mut add = |path: &str, data: &[u8]| append_file(&mut tar, path, data);
    let mut layers = Vec::new();
    for (i, l) in image.layers.iter().enumerate() {
        let id = format!("{:064x}", i + 1);
        add(&format!("{id}/VERSION"), b"1.0");
        add(&format!("{id}/json"), b"{}");
        let bytes = std::fs::read(layout.blob_path(&l.blob.digest)).expect("read layer");
        add(&format!("{id}/layer.tar"), &bytes);
        layers.push(format!("{id}/layer.tar"));
    }
    let config = std::fs::read(layout.blob_path(&image.config.digest)).expect("read config");
    let config_name = format!("{}.json", image.config.hex());
    add(&config_name, &config);
    let manifest = json!([{ "Config": config_name, "RepoTags": tags, "Layers": layers }]);
    add("manifest.json", manifest.to_string().as_bytes());
    add("repositories", b"{}");
    tar.into_inner()
        .expect("finish the archive")
        .sync_all()
        .expect("sync the archive");
}

/// Write `layout` as an OCI image-layout archive whose `index.json` names each entry
/// `<repo>:<tag>` (a whole reference, as skopeo and podman write ref names).
pub fn write_oci_archive(layout: &Layout, repo: &str, out: &Path) {
    let mut index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.dir.join("index.json")).expect("read index.json"),
    )
    .expect("index.json");
    for m in index["manifests"].as_array_mut().expect("manifests") {
        let tag = m["annotations"][REF_NAME]
            .as_str()
            .expect("ref name")
            .to_string();
        m["annotations"][REF_NAME] = json!(format!("{repo}:{tag}"));
    }
    let mut tar = tar::Builder::new(File::create(out).expect("create the archive"));
    for entry in std::fs::read_dir(layout.dir.join("blobs").join("sha256")).expect("blobs") {
        let path = entry.expect("blob").path();
        let name = format!(
            "blobs/sha256/{}",
            path.file_name().and_then(|n| n.to_str()).expect("name")
        );
        tar.append_path_with_name(&path, name).expect("append blob");
    }
    let mut add = |path: &str, data: &[u8]| append_file(&mut tar, path, data);
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", index.to_string().as_bytes());
    tar.into_inner()
        .expect("finish the archive")
        .sync_all()
        .expect("sync the archive");
}

/// The variables through which the `pier` CLI takes credentials, or a default for a flag: a
/// test's CLI run sees them only where the test sets them, never from the caller's shell.
const CLI_ENV: &[&str] = &[
    "PIER_USERNAME",
    "PIER_PASSWORD",
    "PIER_PASSWORD_FILE",
    "PIER_BENCH_REGISTRY",
];

/// Run the `pier` binary with `args` (a client command) and return its output.
pub fn pier_cli<S: AsRef<OsStr>>(args: &[S]) -> Output {
    pier_cli_env(args, &[])
}

/// [`pier_cli`] with the environment variables `env` set.
pub fn pier_cli_env<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pier"));
    cmd.args(args).stdin(Stdio::null()).env("NO_COLOR", "1");
    for var in CLI_ENV {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output()
        .unwrap_or_else(|e| panic!("run pier {}: {e}", shown(args)))
}

/// [`pier_cli`] that must succeed: its stdout. A failure panics with both outputs.
pub fn pier_cli_ok<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = pier_cli(args);
    assert!(
        out.status.success(),
        "pier {} exited with {}:\n{}{}",
        shown(args),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap_or_else(|e| panic!("pier {} printed no UTF-8: {e}", shown(args)))
}

/// What a `pier … --json` run printed, as JSON; a panic showing both outputs when it is not.
pub fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Command-line words as a shell line would show them (for messages).
fn shown<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A benchmark's result line: printed, and appended to the file the environment variable
/// `out_var` names when it is set (scripts collect the lines there).
pub fn bench_line(out_var: &str, text: &str) {
    println!("{text}");
    if let Ok(path) = std::env::var(out_var) {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {path} ({out_var}): {e}"));
        writeln!(f, "{text}").unwrap_or_else(|e| panic!("write {path} ({out_var}): {e}"));
    }
}

/// The check named `name` in what `pier check --json` printed.
pub fn check_of(report: &serde_json::Value, name: &str) -> serde_json::Value {
    report["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check named {name:?} in {report}"))
        .clone()
}

/// Copy `from` into `dir` as a writer that takes its time does: under `<name>.part`, in
/// pieces with pauses, then renamed to `name`.
pub fn drop_slowly(from: &Path, dir: &Path, name: &str, pieces: usize, pause: Duration) {
    let bytes = std::fs::read(from).expect("read the archive");
    let part = dir.join(format!("{name}.part"));
    let mut f = File::create(&part).expect("create the .part file");
    let step = bytes.len().div_ceil(pieces.max(1)).max(1);
    for chunk in bytes.chunks(step) {
        f.write_all(chunk).expect("write a piece");
        f.sync_data().expect("sync a piece");
        std::thread::sleep(pause);
    }
    drop(f);
    std::fs::rename(&part, dir.join(name)).expect("rename into place");
}

/// Wait until `path` exists (a file the watched folder moved), at most `limit`.
pub async fn wait_for_file(path: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    path.exists()
}

// ---------------------------------------------------------------------------------------------
// S3 + PostgreSQL
// ---------------------------------------------------------------------------------------------

/// Where the S3 server and PostgreSQL of scripts/storage-services.sh are, or `None` (after
/// printing SKIPPED for `what`) when they are not set.
pub struct SharedStorage {
    pub s3_endpoint: String,
    pub s3_bucket: String,
    pub pg_admin_url: String,
}

impl SharedStorage {
    pub fn from_env(what: &str) -> Option<SharedStorage> {
        match (
            std::env::var("PIER_TEST_S3_ENDPOINT"),
            std::env::var("PIER_TEST_S3_BUCKET"),
            std::env::var("PIER_TEST_PG_URL"),
        ) {
            (Ok(s3_endpoint), Ok(s3_bucket), Ok(pg_admin_url)) => Some(SharedStorage {
                s3_endpoint,
                s3_bucket,
                pg_admin_url,
            }),
            _ => {
                eprintln!(
                    "SKIPPED: {what}: PIER_TEST_S3_ENDPOINT, PIER_TEST_S3_BUCKET and \
                     PIER_TEST_PG_URL are not set (scripts/storage-services.sh starts them)"
                );
                None
            }
        }
    }

    /// A `[storage]` config for one deployment: a fresh database and a fresh key prefix. Every
    /// node given the same text shares one bucket prefix and one database.
    pub async fn deployment_config(&self) -> String {
        let (client, conn) = tokio_postgres::connect(&self.pg_admin_url, tokio_postgres::NoTls)
            .await
            .expect("connect to PIER_TEST_PG_URL");
        let conn = tokio::spawn(conn);
        let name = format!("pier_{}", uuid::Uuid::new_v4().simple());
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        drop(client);
        let _ = conn.await;
        let (base, _) = self
            .pg_admin_url
            .rsplit_once('/')
            .expect("PIER_TEST_PG_URL ends in /database");
        format!(
            "[storage]\nblobs = \"s3\"\nmeta = \"postgres\"\nmin_free_space = 0\n\n\
             [storage.s3]\nbucket = \"{bucket}\"\nendpoint = \"{endpoint}\"\n\
             region = \"us-east-1\"\npath_style = true\nprefix = \"{prefix}/\"\n\
             access_key_id = \"pier-test\"\nsecret_access_key = \"pier-test\"\n\n\
             [storage.postgres]\nurl = \"{base}/{name}\"\n",
            bucket = self.s3_bucket,
            endpoint = self.s3_endpoint,
            prefix = name,
        )
    }
}

/// A tmpfs of `size` MiB mounted at a fresh directory; unmounted on drop.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(dir: &Path, size_mib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("create the mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs at {}", dir.display());
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }

    /// Free bytes as `df` reports them.
    pub fn free(&self) -> u64 {
        let out = Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&self.dir)
            .output()
            .expect("run df");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("df output: {text}"))
    }

    /// Write a filler file so that about `leave` bytes stay free.
    pub fn fill_to(&self, name: &str, leave: u64) -> PathBuf {
        let path = self.dir.join(name);
        let mut f = std::fs::File::create(&path).expect("create the filler");
        let chunk = vec![0x5au8; MIB as usize];
        while self.free() > leave + MIB {
            f.write_all(&chunk).expect("write the filler");
        }
        f.sync_all().expect("sync the filler");
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}
