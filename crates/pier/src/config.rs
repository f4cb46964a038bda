//! pier's configuration: one documented struct, read from TOML, with defaults for every field
//! and command-line flags applied on top. docs/config.md describes each key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use pier_units::{ByteSize, HumanDuration};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the main listener: registry API, health, readiness and metrics.
    pub listen: SocketAddr,
    /// Where blobs, upload buffers and the metadata database live.
    pub data_dir: PathBuf,
    pub log_format: LogFormat,
    /// A tracing filter such as `info` or `pier=debug,info`.
    pub log_level: String,
    /// How long in-flight requests may run after SIGTERM before pier exits anyway.
    #[serde(with = "seconds")]
    pub shutdown_grace: Duration,
    pub registry: RegistryConfig,
    pub mirror: MirrorConfig,
    pub storage: StorageConfig,
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub cluster: ClusterConfig,
    pub import: ImportConfig,
    /// Upstream registries, added to (or replacing, by name) the built-in ones.
    #[serde(rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
    /// Pull rules: images copied from upstreams into this node on a schedule.
    #[serde(rename = "sync")]
    pub sync_rules: Vec<pier_sync::rules::PullRule>,
    /// Push rules: hosted images replicated to other registries or to every node.
    #[serde(rename = "replicate")]
    pub replicate_rules: Vec<pier_sync::rules::PushRule>,
    pub jobs: JobsConfig,
    /// Authentication and authorization; off when absent (and no `--htpasswd`).
    pub auth: Option<AuthConfig>,
    pub gc: GcConfig,
    pub cache: CacheConfig,
}

/// `[cache]`: the bound on the blob store, kept by evicting mirrored blobs least recently
/// used first (never hosted content, pinned images or blobs being read).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Bytes the blob store may hold; unset for no bound.
    pub max_size: Option<ByteSize>,
    /// Free space to keep on the data directory's disk by evicting; unset for none.
    pub min_free: Option<ByteSize>,
    /// Images never evicted: `repository@digest` or `repository:tag` as stored
    /// (`docker.io/library/alpine:3.20`).
    pub pins: Vec<String>,
    /// How often the bound is checked (and access times saved).
    pub check_every: HumanDuration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_size: None,
            min_free: None,
            pins: Vec::new(),
            check_every: HumanDuration(Duration::from_secs(30)),
        }
    }
}

/// `[gc]`: online garbage collection of blobs no manifest references.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// Blobs written more recently than this are never collected, so a push has this long
    /// between uploading a layer and putting the manifest that references it.
    pub grace: HumanDuration,
    /// Collect on this schedule (e.g. "24h"); unset (the default) runs only on `pier gc`.
    pub every: Option<HumanDuration>,
    /// Remove hosted manifests no tag has pointed at for this long (e.g. "30d") at each
    /// collection; unset (the default) keeps untagged manifests forever.
    pub untagged_after: Option<HumanDuration>,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            grace: HumanDuration(Duration::from_secs(3600)),
            every: None,
            untagged_after: None,
        }
    }
}

/// `[jobs]`: the durable job queue every kind of background work runs on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Jobs running at once, of every kind together (each rule also bounds its own per
    /// target).
    pub concurrency: usize,
    /// Succeeded jobs kept as history (their status rows), at most…
    pub keep_succeeded: usize,
    /// …and for at most this long.
    pub keep_succeeded_for: HumanDuration,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            concurrency: 16,
            keep_succeeded: 10_000,
            keep_succeeded_for: HumanDuration(Duration::from_secs(7 * 86_400)),
        }
    }
}

/// Bounds on client connections. Timeouts are in seconds; 0 turns one off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Time a client has to send a request's line and headers.
    pub header_timeout: u64,
    /// Time a connection may sit with no request in flight before pier closes it.
    pub idle_timeout: u64,
    /// Time a request body may send nothing before the request fails.
    pub body_stall_timeout: u64,
    /// Time a client may read nothing of a response before pier drops the connection.
    pub write_stall_timeout: u64,
    /// Connections held at once; beyond it new ones get 503 and are closed. When absent, 4096
    /// or what the open-file limit leaves room for, whichever is smaller.
    pub max_connections: Option<usize>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_timeout: 10,
            idle_timeout: 60,
            body_stall_timeout: 30,
            write_stall_timeout: 60,
            max_connections: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MirrorConfig {
    /// Upstream for requests that name no registry (Docker's `registry-mirrors`); "" for none.
    pub default_upstream: String,
    /// Whether docker.io, ghcr.io, quay.io, gcr.io, registry.k8s.io, mcr.microsoft.com and
    /// public.ecr.aws are configured without being listed.
    pub builtin_upstreams: bool,
    /// Seconds a tag's manifest is served before asking the upstream again, for upstreams that
    /// set no `tag_ttl` of their own.
    pub tag_ttl: u64,
    /// Repository globs hosted here although the default upstream would serve them: pushes
    /// into them are accepted, and reads of them never go to the default upstream.
    pub hosted: Vec<String>,
    /// Memory all fills together may hold for readers and the write backlog.
    pub fill_memory: ByteSize,
    /// Largest blob fetched from an upstream; a larger or endless body fails the fill.
    pub max_blob_size: ByteSize,
    /// Seconds an upstream 404 for a manifest or blob is answered without asking again; 0 off.
    pub negative_ttl: u64,
    /// Seconds to connect to an upstream endpoint.
    pub upstream_connect_timeout: u64,
    /// Seconds from sending a request to an upstream to its response headers.
    pub upstream_first_byte_timeout: u64,
    /// Seconds an upstream body may go without a byte before the fill resumes elsewhere.
    pub upstream_idle_timeout: u64,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            default_upstream: "docker.io".into(),
            builtin_upstreams: true,
            tag_ttl: 300,
            hosted: Vec::new(),
            fill_memory: ByteSize(256 * 1024 * 1024),
            max_blob_size: ByteSize(64 * 1024 * 1024 * 1024),
            negative_ttl: 30,
            upstream_connect_timeout: 5,
            upstream_first_byte_timeout: 30,
            upstream_idle_timeout: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The registry as clients name it: `docker.io`, `ghcr.io`, `registry.example.com:5000`.
    pub name: String,
    /// Base URLs tried in order (failover).
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Overrides `[mirror] tag_ttl` for this upstream.
    #[serde(default)]
    pub tag_ttl: Option<u64>,
    /// Repository globs that may be mirrored (all when empty). `*` stays within one path
    /// component, `**` crosses them.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Repository globs that may not be mirrored; wins over `allow`.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Serve its cached images only to clients whose own credentials it accepts for the
    /// repository (docs/security.md).
    #[serde(default)]
    pub private: bool,
    /// Seconds a positive private check is remembered per client and repository.
    #[serde(default = "default_private_check_ttl")]
    pub private_check_ttl: u64,
    /// One of [`BUILTIN_UPSTREAMS`] that no table or flag names: nobody asked for it, so
    /// `pier check` only warns when it is unreachable (unless it served pulls lately).
    #[serde(skip)]
    pub builtin: bool,
}

fn default_private_check_ttl() -> u64 {
    60
}

impl UpstreamConfig {
    pub fn new(name: &str, endpoints: Vec<String>) -> UpstreamConfig {
        UpstreamConfig {
            name: name.to_string(),
            endpoints,
            username: None,
            password: None,
            tag_ttl: None,
            allow: Vec::new(),
            deny: Vec::new(),
            private: false,
            private_check_ttl: default_private_check_ttl(),
            builtin: false,
        }
    }

    /// Parse `REGISTRY=URL[,URL...]` as given to `--upstream`.
    pub fn from_flag(flag: &str) -> anyhow::Result<UpstreamConfig> {
        let (name, urls) = flag.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("--upstream {flag:?}: expected REGISTRY=URL[,URL...]")
        })?;
        let endpoints: Vec<String> = urls
            .split(',')
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect();
        let up = UpstreamConfig::new(name.trim(), endpoints);
        up.validate()?;
        Ok(up)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let n = &self.name;
        let name_ok = !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-:".contains(&b));
        anyhow::ensure!(
            name_ok,
            "upstream name {n:?} is not a registry host such as docker.io"
        );
        anyhow::ensure!(!self.endpoints.is_empty(), "upstream {n} has no endpoints");
        for e in &self.endpoints {
            anyhow::ensure!(
                e.starts_with("http://") || e.starts_with("https://"),
                "upstream {n}: endpoint {e:?} must start with http:// or https://"
            );
        }
        Ok(())
    }
}

/// The upstreams pier knows without configuration, with their registry endpoints.
pub const BUILTIN_UPSTREAMS: &[(&str, &str)] = &[
    ("docker.io", "https://registry-1.docker.io"),
    ("ghcr.io", "https://ghcr.io"),
    ("quay.io", "https://quay.io"),
    ("gcr.io", "https://gcr.io"),
    ("registry.k8s.io", "https://registry.k8s.io"),
    ("mcr.microsoft.com", "https://mcr.microsoft.com"),
    ("public.ecr.aws", "https://public.ecr.aws"),
];

impl Config {
    /// Every upstream in effect: the built-ins (if enabled), then the file's, then the flags',
    /// a later one with the same name replacing an earlier one.
    pub fn effective_upstreams(
        &self,
        flags: &[UpstreamConfig],
    ) -> anyhow::Result<Vec<UpstreamConfig>> {
        let mut out: Vec<UpstreamConfig> = Vec::new();
        let mut put = |u: UpstreamConfig| match out.iter_mut().find(|o| o.name == u.name) {
            Some(existing) => *existing = u,
            None => out.push(u),
        };
        if self.mirror.builtin_upstreams {
            for (name, url) in BUILTIN_UPSTREAMS {
                let mut builtin = UpstreamConfig::new(name, vec![url.to_string()]);
                builtin.builtin = true;
                put(builtin);
            }
        }
        for u in self.upstreams.iter().chain(flags) {
            u.validate()?;
            put(u.clone());
        }
        let d = &self.mirror.default_upstream;
        anyhow::ensure!(
            d.is_empty() || out.iter().any(|u| &u.name == d),
            "[mirror] default_upstream {d:?} is not a configured upstream"
        );
        Ok(out)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Largest manifest accepted on push.
    pub max_manifest_size: ByteSize,
    /// Largest blob accepted on push; unlimited when absent.
    pub max_blob_size: Option<ByteSize>,
    /// Seconds an upload session may sit without a new chunk before it and its buffer are
    /// removed.
    pub upload_idle_timeout: u64,
    /// Upload sessions open at once, in total.
    pub max_upload_sessions: u64,
    /// Upload sessions one client (peer IP address) may hold open.
    pub max_upload_sessions_per_client: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 5000)),
            data_dir: PathBuf::from("./pier-data"),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            shutdown_grace: Duration::from_secs(30),
            registry: RegistryConfig::default(),
            mirror: MirrorConfig::default(),
            storage: StorageConfig::default(),
            server: ServerConfig::default(),
            tls: TlsConfig::default(),
            cluster: ClusterConfig::default(),
            import: ImportConfig::default(),
            upstreams: Vec::new(),
            sync_rules: Vec::new(),
            replicate_rules: Vec::new(),
            jobs: JobsConfig::default(),
            gc: GcConfig::default(),
            cache: CacheConfig::default(),
            auth: None,
        }
    }
}

/// `[auth]`: who may do what (docs/security.md). With the table absent and no `--htpasswd`,
/// every request is allowed, as before.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// An htpasswd file of bcrypt lines (`htpasswd -B`), read again when it changes.
    pub htpasswd: Option<PathBuf>,
    /// Issue tokens at `/token` and challenge clients with `Bearer` (else `Basic`).
    pub token_service: bool,
    /// Seconds a token pier issues is valid.
    pub token_ttl: u64,
    /// The `iss` of the tokens pier issues.
    pub issuer: String,
    /// The `service` of the challenge and the audience of tokens; default: the host the
    /// client called.
    pub service: Option<String>,
    /// PKCS#8 PEM EC P-256 private key; default `<data_dir>/auth/token-key.pem`, generated
    /// when absent.
    pub signing_key: Option<PathBuf>,
    /// Accept tokens of an external issuer too.
    pub external: Option<ExternalAuthConfig>,
    /// `/metrics`, `/healthz`, `/readyz` without credentials; otherwise they need admin.
    pub metrics_open: bool,
    /// Client networks (CIDR) allowed at all; every address when empty.
    pub allow: Vec<String>,
    /// Proxies (CIDR) whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<String>,
    /// Request rate limits.
    pub rate: RateConfig,
    /// Group name to its users.
    pub groups: std::collections::BTreeMap<String, Vec<String>>,
    /// Grants; with none, every authenticated user may do everything.
    #[serde(rename = "rule")]
    pub rules: Vec<AuthRuleConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            htpasswd: None,
            token_service: true,
            token_ttl: 300,
            issuer: "pier".into(),
            service: None,
            signing_key: None,
            external: None,
            metrics_open: true,
            allow: Vec::new(),
            trusted_proxies: Vec::new(),
            rate: RateConfig::default(),
            groups: Default::default(),
            rules: Vec::new(),
        }
    }
}

/// `[auth.external]`: an existing token server whose tokens pier accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalAuthConfig {
    #[serde(default)]
    pub public_key: Option<PathBuf>,
    #[serde(default)]
    pub jwks: Option<PathBuf>,
    pub issuer: String,
    pub audience: String,
}

/// `[auth.rate]`: token buckets per client address and per user (`"50/s"`, `"600/m"`), and
/// the failed logins allowed per address and per user within a window (0: no limit).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateConfig {
    pub per_ip: Option<String>,
    pub per_user: Option<String>,
    /// Requests a bucket holds (a burst allowed at once); default one second's worth.
    pub burst: Option<u32>,
    pub failed_logins_per_ip: u32,
    pub failed_logins_per_user: u32,
    pub failed_login_window: HumanDuration,
}

impl Default for RateConfig {
    fn default() -> Self {
        let d = pier_auth::LoginLimits::default();
        RateConfig {
            per_ip: None,
            per_user: None,
            burst: None,
            failed_logins_per_ip: d.per_ip,
            failed_logins_per_user: d.per_user,
            failed_login_window: HumanDuration(d.window),
        }
    }
}

/// `[[auth.rule]]`: `grant` actions on `repos` to subjects `to`, from networks `allow`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthRuleConfig {
    pub repos: Vec<String>,
    pub grant: Vec<String>,
    pub to: Vec<String>,
    #[serde(default)]
    pub allow: Vec<String>,
}

/// `"50/s"`, `"600/m"`, `"3600/h"` as requests per second.
pub fn parse_rate(s: &str) -> anyhow::Result<f64> {
    let (n, unit) = s
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("rate {s:?}: expected N/s, N/m or N/h"))?;
    let n: f64 = n
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("rate {s:?}: {n:?} is not a number"))?;
    let per = match unit.trim() {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        u => anyhow::bail!("rate {s:?}: unit {u:?} is not s, m or h"),
    };
    anyhow::ensure!(n > 0.0, "rate {s:?} must be positive");
    Ok(n / per)
}

/// `[cluster]`: this node's place in a cluster (docs/cluster.md). With no `join` and no
/// secret the node is a cluster of one and opens no peer port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This node's name in the cluster (default: the host name). Unique per node.
    pub node_name: Option<String>,
    /// The zone (rack, room, availability zone) the node is in.
    pub zone: Option<String>,
    /// Where peer HTTP (TCP) and gossip (UDP) listen, one port for both.
    pub peer_listen: SocketAddr,
    /// The peer address other nodes use to reach this one (default: `peer_listen`, with the
    /// address of the interface that routes to the first `join` entry when it is unspecified).
    pub advertise: Option<String>,
    /// Peers to join: `host:port`, or a DNS name whose every address is a peer.
    pub join: Vec<String>,
    /// File holding the shared cluster secret (at least 16 bytes).
    pub cluster_secret_file: Option<PathBuf>,
    /// Owners per blob and per mirrored tag.
    pub replicas: usize,
    /// Gossip probe period in milliseconds (detection takes a few periods).
    pub probe_period_ms: u64,
    /// Mutual TLS on the peer listener: this node's certificate chain (PEM), its key, and the
    /// CA that issues every node's certificate. All three or none.
    pub peer_tls_cert: Option<PathBuf>,
    pub peer_tls_key: Option<PathBuf>,
    pub peer_tls_ca: Option<PathBuf>,
    /// Bytes per second this node sends to peers at most, all requests together (none: no cap).
    pub max_upload_rate: Option<ByteSize>,
    /// Bytes per second this node downloads from upstreams at most, all fills together.
    pub max_upstream_rate: Option<ByteSize>,
    /// Swarm large blobs that several nodes fetch at once (off: each streams from its owner).
    pub swarm: bool,
    /// Whether hosted pushes and imports go to every node (a built-in `[[replicate]]` rule
    /// named `cluster`) when no rule of the configuration targets `cluster`.
    pub replicate_all: bool,
}

impl ClusterConfig {
    /// The node's name: `node_name` when set, else the host name. It names the node in and
    /// out of a cluster (the status document, the dashboard, the logs).
    pub fn name(&self) -> String {
        match &self.node_name {
            Some(n) if !n.trim().is_empty() => n.trim().to_string(),
            _ => rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned(),
        }
    }

    /// The node's zone, when one is set.
    pub fn zone(&self) -> Option<String> {
        self.zone.clone().filter(|z| !z.trim().is_empty())
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_name: None,
            zone: None,
            peer_listen: SocketAddr::from(([0, 0, 0, 0], 5001)),
            advertise: None,
            join: Vec::new(),
            cluster_secret_file: None,
            replicas: 2,
            probe_period_ms: 250,
            peer_tls_cert: None,
            peer_tls_key: None,
            peer_tls_ca: None,
            max_upload_rate: None,
            max_upstream_rate: None,
            swarm: true,
            replicate_all: true,
        }
    }
}

impl ClusterConfig {
    /// Whether this node runs the cluster (a peer port and gossip).
    pub fn enabled(&self) -> bool {
        self.cluster_secret_file.is_some() || !self.join.is_empty()
    }
}

/// What happens to an archive in the watched folder once it is imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AfterImport {
    /// Leave it where it is (it is not imported again unless it changes).
    Keep,
    Delete,
    /// Move it into `done/` inside the folder.
    Move,
}

/// `[import]`: archives imported from a watched folder and by `pier import` (docs/sync.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImportConfig {
    /// A folder whose archives are imported as they appear; none when absent.
    pub watch: Option<PathBuf>,
    /// Seconds a file's size and modification time must stay unchanged before it is imported.
    pub stable_seconds: u64,
    /// Seconds between listings of the folder (file system events wake it sooner).
    pub rescan_seconds: u64,
    /// Put before every repository name an archive gives, e.g. `"site/"`; none by default.
    pub prefix: String,
    /// `keep`, `delete` or `move` (into `done/`) an imported archive.
    pub after: AfterImport,
    /// The most bytes one archive may write once inflated; past it the import fails.
    pub max_size: ByteSize,
}

impl Default for ImportConfig {
    fn default() -> Self {
        ImportConfig {
            watch: None,
            stable_seconds: 3,
            rescan_seconds: 10,
            prefix: String::new(),
            after: AfterImport::Move,
            max_size: ByteSize(pier_server::import::DEFAULT_MAX_SIZE),
        }
    }
}

/// `[tls]`: TLS on the main listener. With `cert` and `key` every connection is TLS (HTTP/2 or
/// HTTP/1.1 by ALPN); the files are re-read when they change or on SIGHUP.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The certificate chain, PEM, leaf first.
    pub cert: Option<PathBuf>,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// When set, only clients presenting a certificate issued by this CA (PEM) are served.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Free space the data directory's filesystem keeps: below it pushes and mirror fills are
    /// refused (507) and `/readyz` fails, so the disk never fills to the last byte. 0 for none.
    pub min_free_space: ByteSize,
    /// Where blob bytes live: `fs` (under the data directory) or `s3` (`[storage.s3]`).
    pub blobs: BlobBackend,
    /// Where metadata lives: `redb` (a file in the data directory) or `postgres`
    /// (`[storage.postgres]`). `s3` with `postgres` is the highly available mode: any number of
    /// nodes on one bucket and one database.
    pub meta: MetaBackend,
    pub s3: Option<S3Config>,
    pub postgres: Option<PostgresConfig>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            min_free_space: ByteSize(256 * 1024 * 1024),
            blobs: BlobBackend::Fs,
            meta: MetaBackend::Redb,
            s3: None,
            postgres: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobBackend {
    Fs,
    S3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetaBackend {
    Redb,
    Postgres,
}

/// `[storage.s3]`: the bucket blobs go to when `blobs = "s3"`. Credentials left out come from
/// the usual AWS environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// `http(s)://host:port` of an S3-compatible server; leave out for AWS.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), as most S3-compatible servers want;
    /// `false` for virtual-host style (`bucket.endpoint/key`).
    #[serde(default)]
    pub path_style: bool,
    /// Prepended to every key (`"site-a/"`), so several deployments can share a bucket.
    #[serde(default)]
    pub prefix: String,
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
    #[serde(default)]
    pub session_token: Option<String>,
    /// Answer blob GETs with a redirect (307) to a presigned URL of the object, so the bytes
    /// flow from the bucket to the client without passing through pier.
    #[serde(default)]
    pub redirect: bool,
    /// How long a presigned URL stays valid, in seconds.
    #[serde(default = "default_redirect_ttl")]
    pub redirect_ttl: u64,
}

fn default_redirect_ttl() -> u64 {
    20 * 60
}

/// `[storage.postgres]`: the database metadata goes to when `meta = "postgres"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database` (or a `key=value` connection string).
    pub url: String,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            max_manifest_size: ByteSize(4 * 1024 * 1024),
            max_blob_size: None,
            upload_idle_timeout: 24 * 60 * 60,
            max_upload_sessions: 1024,
            max_upload_sessions_per_client: 128,
        }
    }
}

impl Config {
    /// Read a TOML file. Unknown keys are errors, so a typo never silently does nothing.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Config> {
        Ok(toml::from_str(text)?)
    }
}

mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_parses_and_unknown_keys_fail() {
        let example = include_str!("../../../docs/pier.example.toml");
        let c = Config::parse(example).expect("example parses");
        assert_eq!(c.registry.max_manifest_size, ByteSize(4 << 20));
        let err = Config::parse("listn = \"0.0.0.0:1\"").expect_err("unknown key");
        assert!(format!("{err:#}").contains("listn"), "{err:#}");
        let err = Config::parse("[registry]\nmax_manifest_size = \"lots\"").expect_err("bad size");
        assert!(format!("{err:#}").contains("lots"), "{err:#}");
    }

    #[test]
    fn gc_and_cache_tables_parse_with_defaults_and_refuse_unknown_keys() {
        let c = Config::default();
        assert_eq!(c.gc.grace.0, Duration::from_secs(3600));
        assert!(c.gc.every.is_none() && c.cache.max_size.is_none());
        let c = Config::parse(
            "[gc]\ngrace = \"0s\"\nevery = \"24h\"\n[cache]\nmax_size = \"2GiB\"\n\
             pins = [\"docker.io/library/alpine:3.20\"]\n",
        )
        .expect("parses");
        assert_eq!(c.gc.grace.0, Duration::ZERO);
        assert_eq!(c.gc.every.map(|e| e.0), Some(Duration::from_secs(86_400)));
        assert_eq!(c.cache.max_size, Some(ByteSize(2 << 30)));
        let err = Config::parse("[cache]\nmax = 1").expect_err("unknown key");
        assert!(format!("{err:#}").contains("max"), "{err:#}");
    }

    /// The example's commented-out `[auth]` table, uncommented, parses and every rate in it
    /// is valid.
    #[test]
    fn example_auth_parses() {
        let example = include_str!("../../../docs/pier.example.toml");
        let start = example.find("# [auth]\n").expect("an [auth] example");
        let end = example.find("# (end of [auth])").expect("its end");
        let text: String = example[start..end]
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| !l.starts_with(' '))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = Config::parse(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
        let a = c.auth.expect("auth");
        assert_eq!(a.rules.len(), 3);
        assert_eq!(a.groups["ci"], ["alice", "bob"]);
        assert!(a.external.is_some());
        assert_eq!(
            parse_rate(a.rate.per_ip.as_deref().expect("per_ip")).expect("rate"),
            50.0
        );
        assert_eq!(
            (a.rate.failed_logins_per_ip, a.rate.failed_logins_per_user),
            (10, 20)
        );
        assert_eq!(a.rate.failed_login_window.0, Duration::from_secs(300));
        // Failed logins are limited without any [auth.rate] table.
        let d = Config::parse("[auth]\nhtpasswd = \"/x\"").expect("parses");
        let d = d.auth.expect("auth").rate;
        assert_eq!((d.failed_logins_per_ip, d.failed_logins_per_user), (10, 20));
        assert!((parse_rate("600/m").expect("rate") - 10.0).abs() < 1e-9);
        assert!(parse_rate("fast").is_err());
        assert!(Config::parse("[auth]\nbogus = 1").is_err());
    }

    /// The example's commented-out `[storage.s3]` and `[storage.postgres]` tables, uncommented,
    /// choose the HA backends; a typo in them is an error naming the key.
    #[test]
    fn storage_backends_parse_and_unknown_keys_fail() {
        let example = include_str!("../../../docs/pier.example.toml");
        let start = example
            .find("# [storage.s3]")
            .expect("a [storage.s3] example");
        let end = example[start..]
            .find("\n[")
            .map_or(example.len(), |e| start + e);
        let tables: String = example[start..end]
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .map(|l| format!("{l}\n"))
            .collect();
        let text = format!("[storage]\nblobs = \"s3\"\nmeta = \"postgres\"\n{tables}");
        let c = Config::parse(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
        assert_eq!(c.storage.blobs, BlobBackend::S3);
        assert_eq!(c.storage.meta, MetaBackend::Postgres);
        let s3 = c.storage.s3.expect("[storage.s3]");
        assert_eq!(
            (s3.bucket.as_str(), s3.path_style, s3.redirect),
            ("pier", true, false)
        );
        assert_eq!(s3.prefix, "site-a/");
        assert_eq!(
            c.storage.postgres.expect("[storage.postgres]").url,
            "postgres://pier@127.0.0.1:5432/pier"
        );
        let d = Config::parse("").unwrap();
        assert_eq!(
            (d.storage.blobs, d.storage.meta),
            (BlobBackend::Fs, MetaBackend::Redb)
        );
        let err = Config::parse("[storage.s3]\nbucket = \"b\"\nbuckt = \"c\"").expect_err("typo");
        assert!(format!("{err:#}").contains("buckt"), "{err:#}");
        let err = Config::parse("[storage]\nblobs = \"gcs\"").expect_err("unknown backend");
        assert!(format!("{err:#}").contains("gcs"), "{err:#}");
    }

    /// The example's commented-out `[[sync]]` and `[[replicate]]` tables, uncommented (the
    /// lines that are `# key = value` or `# [[table]]`), parse and pass the rules' checks.
    #[test]
    fn example_rules_parse_and_validate() {
        let example = include_str!("../../../docs/pier.example.toml");
        let start = example.find("# [[sync]]").expect("a [[sync]] example");
        let rules: String = example[start..]
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.starts_with("[[")
                    || l.split_once(" = ").is_some_and(|(k, _)| {
                        k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    })
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let c = Config::parse(&rules).unwrap_or_else(|e| panic!("{e:#}\n{rules}"));
        assert_eq!(c.sync_rules.len(), 1);
        assert_eq!(c.replicate_rules.len(), 1);
        c.sync_rules[0]
            .validate()
            .expect("the [[sync]] example is valid");
        c.replicate_rules[0]
            .validate()
            .expect("the [[replicate]] example is valid");
        assert_eq!(
            c.sync_rules[0].filter().unwrap().select(&[
                "3.19".into(),
                "3.20-rc".into(),
                "2.0".into()
            ]),
            ["3.19"]
        );
        let err = Config::parse(
            "[[replicate]]\nname = \"x\"\nrepositories = [\"a\"]\ntarget = \"ftp://x\"\n",
        )
        .expect_err("a target that is no URL");
        assert!(
            format!("{err:#}").contains("must be \"cluster\" or a registry URL"),
            "{err:#}"
        );
    }

    #[test]
    fn upstreams_merge_by_name() {
        let c = Config::parse(
            "[[upstream]]\nname = \"docker.io\"\nendpoints = [\"http://a\", \"http://b\"]\n",
        )
        .expect("parses");
        let flag = UpstreamConfig::from_flag("localhost:5001=http://127.0.0.1:5001").expect("flag");
        let ups = c.effective_upstreams(&[flag]).expect("valid");
        let docker = ups
            .iter()
            .find(|u| u.name == "docker.io")
            .expect("docker.io");
        assert_eq!(docker.endpoints, vec!["http://a", "http://b"]);
        assert!(ups.iter().any(|u| u.name == "ghcr.io"));
        assert!(ups.iter().any(|u| u.name == "localhost:5001"));
        assert!(UpstreamConfig::from_flag("nourl").is_err());
        assert!(UpstreamConfig::from_flag("x.io=ftp://x").is_err());
        assert!(UpstreamConfig::from_flag("X.io=http://x").is_err());
        let mut none = Config::default();
        none.mirror.builtin_upstreams = false;
        assert!(
            none.effective_upstreams(&[]).is_err(),
            "default docker.io missing"
        );
        none.mirror.default_upstream.clear();
        assert!(none.effective_upstreams(&[]).expect("valid").is_empty());
    }
}
