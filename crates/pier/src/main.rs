//! The `pier` command: `pier serve` runs a node, `pier config` writes client configuration,
//! `pier bench` loads a registry (the work is in the pier-bench crate), `pier status`,
//! `pier warm`, `pier import`, `pier export`, `pier sync`, `pier gc` and `pier check` ask a
//! running node.

mod clientconf;
mod config;
mod export_cmd;
mod gc_cmd;
mod import_cmd;
mod progress;
mod remote;
mod serve;
mod status_cmd;
mod sync_cmd;
mod warm_cmd;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::LogFormat;

#[derive(Parser)]
#[command(
    name = "pier",
    version,
    about = "Container-image distribution: OCI registry, mirror and peer-to-peer cache in one binary"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pier node (the default when no command is given).
    Serve(Box<ServeArgs>),
    /// Write or print client configuration that pulls through this pier.
    #[command(subcommand)]
    Config(ConfigCommand),
    Bench(Box<pier_bench::BenchArgs>),
    /// Show a running node's status: readiness, storage, cache, cluster members, upstreams.
    Status(status_cmd::StatusArgs),
    /// Put every blob of some images on N nodes of the cluster (or on all), with progress.
    Warm(warm_cmd::WarmArgs),
    /// Import image archives (docker save, OCI archives; gzip or zstd too) into a running node.
    Import(import_cmd::ImportArgs),
    /// Write images from a running node into one archive that docker load, podman load and
    /// pier import accept.
    Export(export_cmd::ExportArgs),
    /// The sync and replication jobs of a running node: status, retry, run a rule.
    Sync(sync_cmd::SyncArgs),
    /// Free blobs no manifest references (on a running node), or with --dry-run say how much.
    Gc(gc_cmd::GcArgs),
    /// Check a running node's stores: metadata against blobs, and with --deep every digest.
    Check(gc_cmd::CheckArgs),
    /// Keep an image stored on a running node from cache eviction.
    Pin(gc_cmd::PinArgs),
    /// Let go of a `pier pin` (pins of sync rules stay).
    Unpin(gc_cmd::PinArgs),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Write certs.d/<registry>/hosts.toml for every upstream (pier first, the registry as fallback).
    Containerd {
        #[command(flatten)]
        common: ClientArgs,
        /// containerd's registry config directory.
        #[arg(long, default_value = "/etc/containerd/certs.d", value_name = "DIR")]
        certs_dir: PathBuf,
        /// Print the files instead of writing them.
        #[arg(long)]
        dry_run: bool,
        /// Undo an earlier run: put back the hosts.toml files that were there before (kept as
        /// hosts.toml.pier-backup) and remove the ones pier added.
        #[arg(long, conflicts_with = "dry_run")]
        restore: bool,
    },
    /// Print the daemon.json snippet for Docker (Docker mirrors Docker Hub only).
    Docker {
        #[command(flatten)]
        common: ClientArgs,
    },
    /// Print registries.conf mirror entries for podman, CRI-O and skopeo.
    Podman {
        #[command(flatten)]
        common: ClientArgs,
    },
}

#[derive(clap::Args)]
struct ClientArgs {
    /// pier as clients reach it, e.g. http://pier.lan:5000 [default: from the listen address].
    #[arg(long, value_name = "URL")]
    pier: Option<String>,
    /// The pier configuration file, to learn its upstreams and listen address.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Extra upstreams, as for `pier serve`.
    #[arg(long, value_name = "REGISTRY=URL[,URL...]")]
    upstream: Vec<String>,
}

#[derive(clap::Args, Default)]
pub struct ServeArgs {
    /// Address to listen on [default: 0.0.0.0:5000].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// Directory for blobs and metadata [default: ./pier-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML configuration file; flags override its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// An upstream registry and its endpoints in failover order; repeatable. Adds to or
    /// replaces (by name) the configured ones.
    #[arg(long, value_name = "REGISTRY=URL[,URL...]")]
    pub upstream: Vec<String>,
    /// A repository glob hosted here although the default upstream would serve it (pushes
    /// allowed); repeatable. Adds to `[mirror] hosted`.
    #[arg(long, value_name = "GLOB")]
    pub hosted: Vec<String>,
    /// This node's name in the cluster [default: the host name].
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// The zone this node is in (replicas are spread across zones, reads prefer the own zone).
    #[arg(long, value_name = "ZONE")]
    pub zone: Option<String>,
    /// Peer HTTP (TCP) and gossip (UDP) address [default: 0.0.0.0:5001].
    #[arg(long, value_name = "ADDR")]
    pub peer_listen: Option<std::net::SocketAddr>,
    /// The peer address other nodes reach this one at [default: the peer listen address].
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Peers to join (host:port, or a DNS name whose every address is a peer); repeatable.
    #[arg(long, value_name = "ADDR[,ADDR...]", value_delimiter = ',')]
    pub join: Vec<String>,
    /// The shared cluster secret; a node without it can neither join nor fetch.
    #[arg(long, value_name = "FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Owners per blob and per mirrored tag [default: 2].
    #[arg(long, value_name = "N")]
    pub replicas: Option<usize>,
    /// Mutual TLS between peers: this node's certificate chain (PEM); with --peer-tls-key and
    /// --peer-tls-ca.
    #[arg(long, value_name = "FILE")]
    pub peer_tls_cert: Option<PathBuf>,
    /// The private key of --peer-tls-cert (PEM).
    #[arg(long, value_name = "FILE")]
    pub peer_tls_key: Option<PathBuf>,
    /// The CA certificate(s) that issue every node's peer certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub peer_tls_ca: Option<PathBuf>,
    /// Serve the main listener over TLS with this certificate chain (PEM); with --tls-key.
    /// Re-read when the file changes or on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Accept only clients presenting a certificate issued by this CA (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// Never swarm: each node streams a large blob from its owner (sets `[cluster] swarm`).
    #[arg(long)]
    pub no_swarm: bool,
    /// Require credentials: an htpasswd file of bcrypt lines (`htpasswd -B`); sets
    /// `[auth] htpasswd` (turning auth on with its defaults when there is no `[auth]`).
    #[arg(long, value_name = "FILE")]
    pub htpasswd: Option<PathBuf>,
}

/// glibc's malloc, left to itself, raises its mmap threshold each time a large block is freed,
/// so after the first fills every 512 KiB batch comes from an arena and, freed, stays in the
/// process (peak RSS ran 60-90 MiB past what fills held). A fixed threshold of 128 KiB maps
/// every batch and spool read on its own and gives it back when dropped; two arenas keep the
/// many fill writer threads from each holding memory of its own.
#[allow(unsafe_code)]
fn tame_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called first thing in main, before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> std::process::ExitCode {
    tame_malloc();
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Serve(Box::default())) {
        Command::Serve(args) => serve::run(*args),
        Command::Config(cmd) => client_config(cmd),
        Command::Bench(args) => pier_bench::cli(*args).map_err(anyhow::Error::from),
        // These two choose their own exit statuses (ready / not ready / unreachable).
        Command::Status(args) => return status_cmd::run(args),
        Command::Warm(args) => return warm_cmd::run(args),
        Command::Import(args) => return import_cmd::run(args),
        Command::Export(args) => return export_cmd::run(args),
        Command::Sync(args) => return sync_cmd::run(args),
        Command::Gc(args) => return gc_cmd::run_gc(args),
        Command::Check(args) => return gc_cmd::run_check(args),
        Command::Pin(args) => return gc_cmd::run_pin(args, false),
        Command::Unpin(args) => return gc_cmd::run_pin(args, true),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pier: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn client_config(cmd: ConfigCommand) -> anyhow::Result<()> {
    let common = match &cmd {
        ConfigCommand::Containerd { common, .. }
        | ConfigCommand::Docker { common }
        | ConfigCommand::Podman { common } => common,
    };
    let config = match &common.config {
        Some(path) => config::Config::load(path)?,
        None => config::Config::default(),
    };
    let flags = common
        .upstream
        .iter()
        .map(|f| config::UpstreamConfig::from_flag(f))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let upstreams = config.effective_upstreams(&flags)?;
    let pier = clientconf::pier_url(common.pier.as_deref(), config.listen)?;
    match cmd {
        ConfigCommand::Containerd {
            certs_dir,
            restore: true,
            ..
        } => clientconf::containerd_restore(&upstreams, &certs_dir),
        ConfigCommand::Containerd {
            certs_dir, dry_run, ..
        } => clientconf::containerd(&upstreams, &pier, &certs_dir, dry_run),
        ConfigCommand::Docker { .. } => {
            print!("{}", clientconf::docker(&pier));
            Ok(())
        }
        ConfigCommand::Podman { .. } => {
            print!("{}", clientconf::podman(&upstreams, &pier));
            Ok(())
        }
    }
}
