//! The processes of the tier: `pier serve` nodes, each in its own network namespace on the
//! same ports (main 5000, peer 5001), and Debian's `docker-registry` as their upstream in a
//! namespace of its own. [`Cluster`] holds them with the network and the tempdir, reads the
//! nodes' status documents, waits for membership views, injects process faults (kill, hang)
//! next to the network ones, and writes the report a failing scenario prints: every node's
//! status JSON, the upstream's access log, and (from each node's drop) the tail of its log.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use crate::common::{
    append_log, command_in, http_status_at, kill_child, print_log_tail_if_panicking, read_log,
    send_signal, spawn_logged, try_digest_of_response, wait_startup, Descriptor, Metrics, Startup,
    WrittenImage, READY_TIMEOUT,
};
use crate::mirror_support::{Access, Registry, MANIFEST_ACCEPT};
use crate::net::{Host, Net};

pub const MAIN_PORT: u16 = 5000;
pub const PEER_PORT: u16 = 5001;
/// The upstream's registry name: mirrored repositories are `upstream.test/<repo>`.
pub const UPSTREAM: &str = "upstream.test";
/// The members of most scenarios.
pub const FOUR: [&str; 4] = ["n1", "n2", "n3", "n4"];
/// Owners per blob, as the nodes are started with.
pub const REPLICAS: u32 = 2;

/// How often a membership view is polled.
pub const POLL: Duration = Duration::from_millis(25);

// ---------------------------------------------------------------------------------------------
// One node
// ---------------------------------------------------------------------------------------------

/// A `pier serve` inside a host's namespace. Dropping it SIGKILLs the process; on a panic the
/// log's tail is printed.
pub struct Node {
    /// `n1`…: also its `--node-name`.
    pub role: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    dir: PathBuf,
    args: Vec<String>,
    /// Environment variables the process starts with (fault hooks).
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Node {
    /// Start pier in `host`'s namespace with its data, config and log in `dir`, mirroring the
    /// upstream at `upstream_url` as [`UPSTREAM`], then `extra` flags (the cluster's), with
    /// environment variables `env` and `toml` appended to its configuration file. Waits until
    /// `GET /v2/` answers 200 from the root namespace.
    pub fn start_with_env(
        host: &Host,
        dir: &Path,
        upstream_url: &str,
        extra: &[String],
        env: &[(&str, &str)],
        toml: &str,
    ) -> Node {
        std::fs::create_dir_all(dir).expect("create the node dir");
        // No default upstream and no built-in ones: nothing may leave the test network.
        let config = dir.join("pier.toml");
        std::fs::write(
            &config,
            format!("[mirror]\ndefault_upstream = \"\"\nbuiltin_upstreams = false\n{toml}"),
        )
        .expect("write the node config");
        let mut args: Vec<String> = [
            "serve",
            "--listen",
            &format!("0.0.0.0:{MAIN_PORT}"),
            "--data-dir",
            &dir.join("data").display().to_string(),
            "--config",
            &config.display().to_string(),
            "--hosted",
            "**",
            "--upstream",
            &format!("{UPSTREAM}={upstream_url}"),
        ]
        .map(String::from)
        .to_vec();
        args.extend_from_slice(extra);
        let mut node = Node {
            role: host.role.clone(),
            ns: host.ns.clone(),
            ip: host.ip,
            dir: dir.to_path_buf(),
            args,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        node.spawn();
        node
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("pier.log")
    }

    /// Start the process (again, after [`Node::kill`]) with the same flags and data.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.role);
        let log_path = self.log_path();
        let log_start = std::fs::metadata(&log_path).map_or(0, |m| m.len());
        let mut log = append_log(&log_path);
        writeln!(
            log,
            "=== test harness: in {}: pier {}",
            self.ns,
            self.args.join(" ")
        )
        .expect("write the node log");
        // `PIER_CLUSTER_NODE_BIN` runs another build of pier as the nodes (an A/B of two
        // commits with the same harness: scripts/cluster-bench.sh's `NODE_BIN`).
        let bin = std::env::var("PIER_CLUSTER_NODE_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_pier").to_string());
        let mut cmd = command_in(Some(&self.ns), &bin);
        cmd.args(&self.args)
            .env("NO_COLOR", "1")
            .env_remove("PIER_LOG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut child = spawn_logged(&mut cmd, log);
        let addr = self.main_addr();
        let started = wait_startup(&mut child, READY_TIMEOUT, Duration::from_millis(50), || {
            http_status_at(addr, "/v2/") == Some(200)
        });
        match started {
            Startup::Ready => self.child = Some(child),
            Startup::Exited(status) => panic!(
                "pier {} exited with {status} before it answered on {addr}:\n{}",
                self.role,
                read_log(&log_path, log_start)
            ),
            Startup::TimedOut => {
                kill_child(&mut Some(child));
                panic!(
                    "pier {} did not answer GET /v2/ on {addr} within {READY_TIMEOUT:?}:\n{}",
                    self.role,
                    read_log(&log_path, log_start)
                )
            }
        }
    }

    pub fn main_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, MAIN_PORT))
    }

    /// The main listener, as the test process reaches it.
    pub fn url(&self) -> String {
        format!("http://{}", self.main_addr())
    }

    pub fn peer_url(&self) -> String {
        format!("http://{}:{PEER_PORT}", self.ip)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the node is running").id()
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether the node's blob store holds `digest` (the filesystem store's content address,
    /// `DATA/blobs/<alg>/<first two hex>/<hex>`).
    pub fn holds_blob(&self, digest: &str) -> bool {
        let (alg, hex) = digest.split_once(':').expect("alg:hex digest");
        self.data_dir()
            .join("blobs")
            .join(alg)
            .join(&hex[..2])
            .join(hex)
            .is_file()
    }

    /// SIGKILL, as a power cut of the process; waits for the exit.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// SIGKILL without waiting (the process is reaped by a later [`Node::kill`]).
    pub fn sigkill(&self) {
        send_signal(
            self.child.as_ref().expect("the node is running"),
            libc::SIGKILL,
        );
    }

    /// SIGTERM, as `systemctl stop` does, and wait up to `limit` for the process to exit
    /// after finishing its requests; false when it is still running then.
    pub fn stop_gracefully(&mut self, limit: Duration) -> bool {
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        send_signal(child, libc::SIGTERM);
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// SIGSTOP: the process keeps its sockets and answers nothing, as a hung node.
    pub fn hang(&self) {
        send_signal(
            self.child.as_ref().expect("the node is running"),
            libc::SIGSTOP,
        );
    }

    /// SIGCONT after [`Node::hang`].
    pub fn resume(&self) {
        send_signal(
            self.child.as_ref().expect("the node is running"),
            libc::SIGCONT,
        );
    }

    /// A snapshot of `/metrics`.
    pub async fn metrics(&self, http: &reqwest::Client) -> Result<Metrics, String> {
        let url = format!("{}/metrics", self.url());
        let resp = http
            .get(&url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: {}", resp.status()));
        }
        let text = resp.text().await.map_err(|e| format!("GET {url}: {e}"))?;
        Ok(Metrics(text))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A stopped process dies of SIGKILL too.
        self.kill();
        print_log_tail_if_panicking(&format!("pier {}", self.role), &self.log_path(), 40);
    }
}

// ---------------------------------------------------------------------------------------------
// Status documents
// ---------------------------------------------------------------------------------------------

/// A node's `GET /api/v1/status`.
#[derive(Debug, Clone)]
pub struct Status(pub serde_json::Value);

impl Status {
    /// `(name, state)` of every member the node lists.
    pub fn members(&self) -> Vec<(String, String)> {
        self.0["members"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .map(|m| {
                        let s = |k: &str| m[k].as_str().unwrap_or("?").to_string();
                        (s("name"), s("state"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The state the node gives `name`, if it lists it.
    pub fn state_of(&self, name: &str) -> Option<String> {
        self.members()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
    }

    /// `n1=alive n2=dead …`, for messages.
    pub fn view(&self) -> String {
        let members = self.members();
        if members.is_empty() {
            return "(no members listed)".to_string();
        }
        members
            .iter()
            .map(|(n, s)| format!("{n}={s}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn served_bytes(&self, source: &str) -> u64 {
        self.0["cache"]["served_bytes"][source]
            .as_u64()
            .unwrap_or(0)
    }
}

pub async fn status(http: &reqwest::Client, node: &Node) -> Result<Status, String> {
    let url = format!("{}/api/v1/status", node.url());
    let resp = http
        .get(&url)
        .timeout(Duration::from_secs(1))
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let code = resp.status();
    let body = resp.text().await.map_err(|e| format!("GET {url}: {e}"))?;
    if !code.is_success() {
        return Err(format!("GET {url}: {code}: {body}"));
    }
    serde_json::from_str(&body)
        .map(Status)
        .map_err(|e| format!("GET {url}: not JSON ({e}): {body}"))
}

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

/// How a node is lost.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// SIGKILL.
    Kill,
    /// SIGSTOP: sockets stay open, nothing answers.
    Hang,
    /// iptables DROP of everything in and out of its namespace.
    Partition,
}

impl Fault {
    pub const ALL: [Fault; 3] = [Fault::Kill, Fault::Hang, Fault::Partition];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Hang => "hang",
            Fault::Partition => "partition",
        }
    }
}

/// Whether (and how) a node takes part in the cluster.
pub enum Membership<'a> {
    /// No cluster flags at all: pier as it was before clusters.
    Plain,
    /// The cluster flags, joining `n1`, with this secret file.
    Secret(&'a Path),
}

/// The network, the upstream and the nodes of one scenario. Fields drop in order: processes
/// first, then the network, then the files.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub upstream: Registry,
    pub http: reqwest::Client,
    /// The secret every node of the cluster shares.
    pub secret: PathBuf,
    pub net: Net,
    pub tmp: tempfile::TempDir,
    /// Flags every member is started with after its cluster flags.
    pub extra: Vec<String>,
    /// TOML appended to every node's configuration file.
    pub toml: String,
}

/// The zone of a node: n1, n2 (and n5) in `a`, the others in `b`.
fn zone(role: &str) -> &'static str {
    match role {
        "n1" | "n2" | "n5" => "a",
        _ => "b",
    }
}

impl Cluster {
    /// A network with the upstream and `nodes` node hosts (`n1`…), the upstream registry
    /// running, the cluster secret written; no node started yet.
    pub fn new(nodes: usize) -> Cluster {
        let tmp = tempfile::tempdir().expect("tempdir");
        // skopeo runs as `nobody` and must reach its directories under the tempdir.
        std::fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("open the tempdir to nobody");
        let mut roles = vec!["up".to_string()];
        roles.extend((1..=nodes).map(|n| format!("n{n}")));
        let net = Net::new(&roles.iter().map(String::as_str).collect::<Vec<_>>());
        let up = net.host("up");
        let upstream = Registry::start_in_netns(
            &tmp.path().join("upstream"),
            &tmp.path().join("upstream-storage"),
            &up.ns,
            SocketAddr::from((up.ip, 5000)),
        );
        let secret = tmp.path().join("cluster.secret");
        std::fs::write(&secret, "a cluster secret for the test tier\n").expect("write secret");
        // No idle connections are kept: one pooled across a fault (a node hung, then resumed,
        // closes its idle connections at once) would fail the next request for the test's
        // reason, not pier's.
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .expect("build the HTTP client");
        Cluster {
            nodes: Vec::new(),
            upstream,
            http,
            secret,
            net,
            tmp,
            extra: Vec::new(),
            toml: String::new(),
        }
    }

    /// The upstream registry's URL, as nodes (and the test process) reach it.
    pub fn upstream_url(&self) -> String {
        self.upstream.url()
    }

    /// The cluster flags of `role`: its name and zone, the peer listener, the address others
    /// reach it at, `n1` to join (n1 too, as a seed list names every seed), the secret.
    pub fn cluster_flags(&self, role: &str, secret: &Path) -> Vec<String> {
        let ip = self.net.host(role).ip;
        let seed = self.net.host("n1").ip;
        [
            "--node-name",
            role,
            "--zone",
            zone(role),
            "--peer-listen",
            &format!("0.0.0.0:{PEER_PORT}"),
            "--advertise",
            &format!("{ip}:{PEER_PORT}"),
            "--join",
            &format!("{seed}:{PEER_PORT}"),
            "--cluster-secret-file",
            &secret.display().to_string(),
            "--replicas",
            &REPLICAS.to_string(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// Start the node `role`.
    pub fn start_node(&mut self, role: &str, membership: Membership<'_>) -> &Node {
        let flags = match membership {
            Membership::Plain => Vec::new(),
            Membership::Secret(secret) => {
                let mut f = self.cluster_flags(role, secret);
                f.extend(self.extra.iter().cloned());
                f
            }
        };
        let node = Node::start_with_env(
            self.net.host(role),
            &self.tmp.path().join(role),
            &self.upstream_url(),
            &flags,
            &[],
            &self.toml,
        );
        self.nodes.push(node);
        self.nodes.last().expect("just pushed")
    }

    /// Start the member `role` (with the shared secret) with environment variables.
    pub fn start_member_with_env(&mut self, role: &str, env: &[(&str, &str)]) -> &Node {
        let secret = self.secret.clone();
        let mut flags = self.cluster_flags(role, &secret);
        flags.extend(self.extra.iter().cloned());
        let node = Node::start_with_env(
            self.net.host(role),
            &self.tmp.path().join(role),
            &self.upstream_url(),
            &flags,
            env,
            &self.toml,
        );
        self.nodes.push(node);
        self.nodes.last().expect("just pushed")
    }

    /// The zone each node of `roles` is started in.
    pub fn zone_of(role: &str) -> &'static str {
        zone(role)
    }

    /// Start every role in `roles` as a member with the shared secret, then wait until each
    /// lists all of them alive.
    pub async fn start_members(&mut self, roles: &[&str]) {
        let secret = self.secret.clone();
        for role in roles {
            self.start_node(role, Membership::Secret(&secret));
        }
        self.wait_all_alive(roles, Duration::from_secs(20), "after start")
            .await;
    }

    pub fn node(&self, role: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.role == role)
            .unwrap_or_else(|| panic!("no node {role}"))
    }

    pub fn node_mut(&mut self, role: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.role == role)
            .unwrap_or_else(|| panic!("no node {role}"))
    }

    pub async fn status(&self, role: &str) -> Result<Status, String> {
        status(&self.http, self.node(role)).await
    }

    /// Poll until every node of `roles` lists each of them `alive`; fail with the report after
    /// `limit`. Returns how long it took.
    pub async fn wait_all_alive(&self, roles: &[&str], limit: Duration, when: &str) -> Duration {
        let started = Instant::now();
        loop {
            let mut pending = Vec::new();
            for observer in roles {
                match self.status(observer).await {
                    Ok(s) => {
                        let missing: Vec<&&str> = roles
                            .iter()
                            .filter(|r| s.state_of(r).as_deref() != Some("alive"))
                            .collect();
                        if !missing.is_empty() {
                            pending.push(format!("{observer} sees {}", s.view()));
                        }
                    }
                    Err(e) => pending.push(format!("{observer}: {e}")),
                }
            }
            if pending.is_empty() {
                return started.elapsed();
            }
            if started.elapsed() > limit {
                self.fail(&format!(
                    "{when}: not every node of {roles:?} lists all of them alive within \
                     {limit:?}:\n  {}",
                    pending.join("\n  ")
                ))
                .await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Poll every `observers`' status every [`POLL`] until each lists `victim` as `dead`: the
    /// time from `since` until the last of them did, or what each saw last when `limit`
    /// passed first.
    pub async fn wait_dead(
        &self,
        victim: &str,
        observers: &[&str],
        since: Instant,
        limit: Duration,
    ) -> Result<Duration, String> {
        let mut seen: BTreeMap<&str, Duration> = BTreeMap::new();
        let mut last: BTreeMap<&str, String> = BTreeMap::new();
        loop {
            for observer in observers {
                if seen.contains_key(observer) {
                    continue;
                }
                match self.status(observer).await {
                    Ok(s) if s.state_of(victim).as_deref() == Some("dead") => {
                        seen.insert(observer, since.elapsed());
                    }
                    Ok(s) => {
                        last.insert(observer, s.view());
                    }
                    Err(e) => {
                        last.insert(observer, e);
                    }
                }
            }
            if seen.len() == observers.len() {
                return Ok(seen.values().copied().max().unwrap_or_default());
            }
            if since.elapsed() > limit {
                let lines: Vec<String> = observers
                    .iter()
                    .map(|o| match seen.get(o) {
                        Some(t) => format!("{o}: dead after {t:?}"),
                        None => format!("{o}: {}", last.get(o).map_or("?", String::as_str)),
                    })
                    .collect();
                return Err(format!(
                    "{victim} not listed dead by every other node within {limit:?}:\n  {}",
                    lines.join("\n  ")
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Take `victim` down by `fault`. Takes a shared borrow, as it runs beside pulls that
    /// borrow the cluster too: a kill is a SIGKILL by pid, and [`Cluster::repair`] reaps it.
    pub fn inject(&self, fault: Fault, victim: &str) {
        match fault {
            Fault::Kill => self.node(victim).sigkill(),
            Fault::Hang => self.node(victim).hang(),
            Fault::Partition => self.net.partition(victim),
        }
    }

    /// Undo `fault`: restart the killed node on its data and flags, resume the hung one, heal
    /// the cut one.
    pub fn repair(&mut self, fault: Fault, victim: &str) {
        match fault {
            Fault::Kill => {
                let node = self.node_mut(victim);
                node.kill();
                node.spawn();
            }
            Fault::Hang => self.node(victim).resume(),
            Fault::Partition => self.net.heal(victim),
        }
    }

    /// The upstream's completed requests so far.
    pub fn upstream_accesses(&self) -> Vec<Access> {
        self.upstream.accesses()
    }

    /// What a failing scenario prints besides its message: every running node's status (a
    /// hung or cut-off node says so) and the upstream's access log. The node logs' tails follow
    /// as the nodes are dropped.
    pub async fn report(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let _ = write!(out, "--- status of {} ({}): ", node.role, node.url());
            if !node.running() {
                out.push_str("not running\n");
                continue;
            }
            match status(&self.http, node).await {
                Ok(s) => {
                    let _ = writeln!(
                        out,
                        "{}",
                        serde_json::to_string_pretty(&s.0).unwrap_or_default()
                    );
                }
                Err(e) => {
                    let _ = writeln!(out, "{e}");
                }
            }
        }
        out.push_str("--- upstream access log (method status path from):\n");
        for a in self.upstream_accesses() {
            let _ = writeln!(
                out,
                "  {} {} {} from {} ({})",
                a.method, a.status, a.path, a.remote_addr, a.user_agent
            );
        }
        out
    }

    /// Panic with `msg` and the [`Cluster::report`].
    pub async fn fail(&self, msg: &str) -> ! {
        let report = self.report().await;
        panic!("{msg}\n{report}");
    }

    /// `Err(msg)` → [`Cluster::fail`].
    pub async fn check<T>(&self, what: &str, r: Result<T, String>) -> T {
        match r {
            Ok(v) => v,
            Err(e) => self.fail(&format!("{what}: {e}")).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pulling with plain HTTP
// ---------------------------------------------------------------------------------------------

/// `GET <base>/v2/<repo>/manifests/<reference>`: the body when it is 200 with `want`'s bytes.
pub async fn get_manifest(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    want: &[u8],
) -> Result<(), String> {
    let url = format!("{base}/v2/{repo}/manifests/{reference}");
    let started = Instant::now();
    let resp = http
        .get(&url)
        .header(reqwest::header::ACCEPT, MANIFEST_ACCEPT)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e} (after {:?})", started.elapsed()))?;
    let code = resp.status();
    let body = resp
        .bytes()
        .await
        .map_err(|e| format!("GET {url}: body: {e}"))?;
    if code != reqwest::StatusCode::OK {
        return Err(format!(
            "GET {url}: {code}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    if body.as_ref() != want {
        return Err(format!(
            "GET {url}: other bytes than the pushed manifest: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(())
}

/// `GET <base>/v2/<repo>/blobs/<digest>`, the body streamed through sha256: Ok when it is
/// 200 with exactly the blob's bytes.
pub async fn get_blob(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    blob: &Descriptor,
) -> Result<(), String> {
    let url = format!("{base}/v2/{repo}/blobs/{}", blob.digest);
    let started = Instant::now();
    let resp = http
        .get(&url)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e} (after {:?})", started.elapsed()))?;
    let code = resp.status();
    if code != reqwest::StatusCode::OK {
        let body = resp.text().await.unwrap_or_default();
        return Err(format!("GET {url}: {code}: {body}"));
    }
    let (digest, len) = try_digest_of_response(resp).await.map_err(|e| {
        format!(
            "GET {url}: the body broke off after {:?}: {e}",
            started.elapsed()
        )
    })?;
    if digest != blob.digest || len != blob.size {
        return Err(format!(
            "GET {url}: {len} bytes with digest {digest}, not the blob's {} bytes",
            blob.size
        ));
    }
    Ok(())
}

/// Pull `image` by `reference` through `base`: the manifest, then every blob, all checked.
pub async fn pull_image(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    image: &WrittenImage,
) -> Result<(), String> {
    get_manifest(http, base, repo, reference, &image.manifest_bytes).await?;
    for blob in image.blobs() {
        get_blob(http, base, repo, blob).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// containerd's view of the mirror
// ---------------------------------------------------------------------------------------------

/// A containerd hosts directory for [`UPSTREAM`]: `pier_url` first (a node's local pier is
/// `http://127.0.0.1:5000` from inside its namespace), the upstream itself as the fallback
/// `server`, as `pier config containerd` writes it.
pub fn hosts_dir(dir: &Path, pier_url: &str, upstream_url: &str) -> PathBuf {
    let d = dir.join(UPSTREAM);
    std::fs::create_dir_all(&d).expect("create the hosts dir");
    std::fs::write(
        d.join("hosts.toml"),
        format!(
            "server = \"{upstream_url}\"\n\n\
             [host.\"{pier_url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .expect("write hosts.toml");
    dir.to_path_buf()
}

/// The local pier as a client inside a node's namespace reaches it.
pub fn local_pier() -> String {
    format!("http://127.0.0.1:{MAIN_PORT}")
}

// ---------------------------------------------------------------------------------------------
// The upstream's account
// ---------------------------------------------------------------------------------------------

/// GET and HEAD requests the upstream answered, by path.
#[derive(Debug, Default)]
pub struct UpstreamCounts {
    pub gets: BTreeMap<String, u64>,
    pub heads: BTreeMap<String, u64>,
    /// Requests that did not come from a node (a client falling back to the upstream).
    pub from_elsewhere: Vec<String>,
}

impl UpstreamCounts {
    /// Count `accesses` to `/v2/<repo>/…`; `nodes` are the node addresses pier's requests
    /// come from.
    pub fn of(accesses: &[Access], repo: &str, nodes: &[Ipv4Addr]) -> UpstreamCounts {
        let prefix = format!("/v2/{repo}/");
        let mut c = UpstreamCounts::default();
        for a in accesses.iter().filter(|a| a.path.starts_with(&prefix)) {
            let from = a.remote_addr.rsplit_once(':').map_or("", |(ip, _)| ip);
            if !nodes.iter().any(|n| n.to_string() == from) {
                c.from_elsewhere
                    .push(format!("{} {} from {}", a.method, a.path, a.remote_addr));
            }
            let map = match a.method.as_str() {
                "GET" => &mut c.gets,
                "HEAD" => &mut c.heads,
                _ => continue,
            };
            *map.entry(a.path.clone()).or_default() += 1;
        }
        c
    }

    pub fn gets_of(&self, path: &str) -> u64 {
        self.gets.get(path).copied().unwrap_or(0)
    }

    /// One line per path: `GET ×n HEAD ×m path`.
    pub fn table(&self) -> String {
        let mut paths: Vec<&String> = self.gets.keys().chain(self.heads.keys()).collect();
        paths.sort();
        paths.dedup();
        paths
            .iter()
            .map(|p| {
                format!(
                    "  GET x{} HEAD x{} {p}",
                    self.gets.get(*p).copied().unwrap_or(0),
                    self.heads.get(*p).copied().unwrap_or(0)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}
