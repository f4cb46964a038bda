//! The command line of `pier bench`: the registry and credentials, the load shape (with
//! `--ramp`'s `START:STEP:MAX`), the output, and one scenario. The binary flattens
//! [`BenchArgs`] into its `bench` subcommand.
//!
//! Options that are not about one scenario are `global`, so they may be written before or after
//! the scenario name (`pier bench --concurrency 8 pull …` and `pier bench pull … -c 8`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Subcommand};
use pier_oci::{Reference, RepoName};
use pier_units::command_line::{parse_duration, parse_size};

/// Generate load against any OCI registry (pier or not) and report throughput and latency.
///
/// Each worker runs operations back to back: one operation is one image pulled (`pull`), one
/// blob downloaded (`blob`), one image pushed (`push`), or either (`mixed`). The run ends after
/// `--duration` or `--requests` operations, or with Ctrl-C, which prints the partial report.
///
/// Exit status: 0 when the run completed with at least one operation that succeeded; 1 when it
/// could not run, or when every operation failed (the report is still printed, and stderr says
/// so), so a script never takes a run against a dead registry for a result.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Registry")]
pub struct TargetArgs {
    /// Base URL of the registry under test (http:// or https://).
    #[arg(
        long,
        global = true,
        env = "PIER_BENCH_REGISTRY",
        default_value = "http://127.0.0.1:5000",
        value_name = "URL"
    )]
    pub registry: String,
    /// Accept any TLS certificate (self-signed test registries).
    #[arg(long, global = true)]
    pub insecure: bool,
    /// User for Basic auth or for the token endpoint of a Bearer challenge.
    #[arg(long, global = true, env = "PIER_BENCH_USERNAME", value_name = "USER")]
    pub username: Option<String>,
    /// Password or access token that goes with --username.
    #[arg(
        long,
        global = true,
        env = "PIER_BENCH_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub password: Option<String>,
    /// Give up on one request (from connecting to its last body byte) after this long.
    #[arg(long, global = true, default_value = "2m", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Load")]
pub struct LoadArgs {
    /// Workers running operations at the same time [default: 1].
    #[arg(short, long, global = true, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Run for this long (e.g. 500ms, 30s, 2m) [default: 10s].
    #[arg(short, long, global = true, value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Option<Duration>,
    /// Stop after this many operations instead of after a duration.
    #[arg(
        short = 'n',
        long,
        global = true,
        conflicts_with = "duration",
        value_name = "N"
    )]
    pub requests: Option<u64>,
    /// Find the highest concurrency whose p99 stays within --p99-limit: run --step-duration at
    /// START workers, then START+STEP, … up to MAX, stopping at the first step whose p99 exceeds
    /// the limit or whose requests fail more than 1% of the time.
    #[arg(long, global = true, value_parser = parse_ramp, value_name = "START:STEP:MAX")]
    pub ramp: Option<RampSpec>,
    /// The request p99 latency a ramp step must stay within.
    #[arg(long, global = true, value_parser = parse_duration, value_name = "DURATION")]
    pub p99_limit: Option<Duration>,
    /// How long each ramp step runs.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub step_duration: Duration,
    /// Hash every downloaded blob (and manifest fetched by digest) and count a mismatch as a
    /// `digest_mismatch` error. Costs client CPU.
    #[arg(long, global = true)]
    pub verify: bool,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Report")]
pub struct OutputArgs {
    /// Print the report as one JSON object (for saving and --compare) instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Also print how req/s, MB/s and p99 changed against a report saved with --json.
    #[arg(long, global = true, value_name = "FILE")]
    pub compare: Option<PathBuf>,
    /// Do not draw the progress bar (it is never drawn when stderr is not a terminal or with
    /// --json).
    #[arg(long, global = true)]
    pub no_progress: bool,
    /// The registry's process on this host (repeatable; its child processes count too, so
    /// nginx's master pid covers its workers): the report adds the server's CPU seconds (user
    /// + system, from /proc) during the run and per GiB moved.
    #[arg(long, global = true, value_name = "PID")]
    pub server_pid: Vec<u32>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Scenario {
    /// Pull images: manifest, then every blob.
    ///
    /// Each operation GETs the manifest by its reference (accepting OCI and Docker manifests
    /// and indexes; an index resolves to its linux/amd64 child, or its first child), then,
    /// unless --manifests-only, every blob it references (config and layers), one after
    /// another.
    Pull(PullArgs),
    /// GET one blob over and over.
    ///
    /// Single-stream throughput with -c 1; many clients downloading the same blob with -c N.
    Blob(BlobArgs),
    /// Push freshly generated images.
    ///
    /// Each operation uploads --layers new layers of --layer-size and a config (monolithic
    /// POST ?digest=, or chunked with --chunked), then PUTs an OCI manifest under a new tag.
    /// Layers are pseudo-random bytes, unique per layer, so the registry stores every one.
    Push(PushArgs),
    /// Pull and push at once, by a ratio.
    ///
    /// Each operation is a push (as `push`) with probability --push-ratio, otherwise a pull
    /// (as `pull`).
    Mixed(MixedArgs),
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Pull(_) => "pull",
            Scenario::Blob(_) => "blob",
            Scenario::Push(_) => "push",
            Scenario::Mixed(_) => "mixed",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct PullArgs {
    #[command(flatten)]
    pub pull: PullOpts,
}

#[derive(Args, Debug, Clone)]
pub struct PullOpts {
    /// An image in the registry under test, REPO:TAG or REPO@DIGEST; repeatable (workers take
    /// them in turn).
    #[arg(long = "image", value_name = "REPO:TAG")]
    pub images: Vec<ImageRef>,
    /// Fetch manifests only, not the blobs they reference.
    #[arg(long)]
    pub manifests_only: bool,
}

#[derive(Args, Debug, Clone)]
pub struct BlobArgs {
    /// Repository the blob is linked to.
    #[arg(long, value_name = "REPO")]
    pub repo: RepoName,
    /// The blob's digest.
    #[arg(long, value_name = "DIGEST")]
    pub digest: pier_oci::Digest,
}

#[derive(Args, Debug, Clone)]
pub struct PushArgs {
    #[command(flatten)]
    pub push: PushOpts,
}

#[derive(Args, Debug, Clone)]
pub struct PushOpts {
    /// Repository to push into.
    #[arg(long, value_name = "REPO", default_value = "pier-bench/push")]
    pub repo: RepoName,
    /// Layers per image.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub layers: usize,
    /// Size of each layer (e.g. 512KiB, 200MiB, 1GB).
    #[arg(long, default_value = "1MiB", value_parser = parse_size, value_name = "SIZE")]
    pub layer_size: u64,
    /// Upload blobs in PATCH chunks of this size (POST, PATCH…, PUT) instead of one monolithic
    /// POST ?digest=.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub chunked: Option<u64>,
    /// Tag every pushed image with this tag instead of a new one per operation
    /// (bench-<run>-<n>).
    #[arg(long, value_name = "TAG")]
    pub tag: Option<pier_oci::Tag>,
}

#[derive(Args, Debug, Clone)]
pub struct MixedArgs {
    /// Fraction of operations that are pushes (0 to 1).
    #[arg(long, default_value_t = 0.1, value_name = "RATIO")]
    pub push_ratio: f64,
    /// Images to pull; without any, one generated image is pushed before the run starts and
    /// pulled.
    #[command(flatten)]
    pub pull: PullOpts,
    #[command(flatten)]
    pub push: PushOpts,
}

/// `REPO:TAG` or `REPO@DIGEST` in the registry under test (no registry host: that is
/// `--registry`). A bare `REPO` means `REPO:latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub repo: RepoName,
    pub reference: Reference,
}

impl FromStr for ImageRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (repo, reference) = if let Some((repo, digest)) = s.split_once('@') {
            (repo, digest)
        } else {
            match s.rsplit_once(':') {
                // A colon before the last '/' belongs to a host:port prefix, not to a tag.
                Some((repo, tag)) if !tag.contains('/') => (repo, tag),
                _ => (s, "latest"),
            }
        };
        let repo: RepoName = repo
            .parse()
            .map_err(|e| format!("{s:?}: bad repository: {e}"))?;
        let reference: Reference = reference
            .parse()
            .map_err(|e| format!("{s:?}: bad tag or digest: {e}"))?;
        Ok(ImageRef { repo, reference })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}:{t}", self.repo),
            Reference::Digest(d) => write!(f, "{}@{d}", self.repo),
        }
    }
}

/// `START:STEP:MAX` of `--ramp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RampSpec {
    pub start: usize,
    pub step: usize,
    pub max: usize,
}

pub fn parse_ramp(s: &str) -> Result<RampSpec, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("{s:?} is not START:STEP:MAX (e.g. 1:4:64)");
    let [start, step, max] = parts[..] else {
        return Err(bad());
    };
    let n = |p: &str| p.trim().parse::<usize>().map_err(|_| bad());
    let spec = RampSpec {
        start: n(start)?,
        step: n(step)?,
        max: n(max)?,
    };
    if spec.start == 0 || spec.step == 0 || spec.max < spec.start {
        return Err(format!(
            "{s:?}: START and STEP must be at least 1 and MAX at least START"
        ));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn image_refs() {
        let r: ImageRef = "team/app:v1".parse().unwrap();
        assert_eq!(r.repo.as_str(), "team/app");
        assert_eq!(r.to_string(), "team/app:v1");
        let r: ImageRef = "team/app".parse().unwrap();
        assert_eq!(r.to_string(), "team/app:latest");
        let d = format!("sha256:{}", "a".repeat(64));
        let r: ImageRef = format!("app@{d}").parse().unwrap();
        assert_eq!(r.reference, Reference::Digest(d.parse().unwrap()));
        assert!("Team/App:v1".parse::<ImageRef>().is_err());
        // A mirror path prefix with a port, as pier serves them.
        let r: ImageRef = "localhost:5001/app:v2".parse().unwrap();
        assert_eq!(r.repo.as_str(), "localhost:5001/app");
        assert_eq!(r.to_string(), "localhost:5001/app:v2");
    }

    #[test]
    fn global_options_go_before_or_after_the_scenario() {
        let a = Cli::try_parse_from([
            "bench",
            "--registry",
            "http://r:1",
            "push",
            "--repo",
            "a/b",
            "--layer-size",
            "200MiB",
            "-c",
            "4",
            "-n",
            "10",
        ])
        .unwrap()
        .bench;
        assert_eq!(a.target.registry, "http://r:1");
        assert_eq!(a.load.concurrency, Some(4));
        assert_eq!(a.load.requests, Some(10));
        let Scenario::Push(p) = a.scenario else {
            panic!("not push")
        };
        assert_eq!(p.push.layer_size, 200 << 20);
        assert!(Cli::try_parse_from(["bench", "blob", "--repo", "a", "--digest", "x"]).is_err());
        assert!(Cli::try_parse_from([
            "bench",
            "pull",
            "--image",
            "a:b",
            "--duration",
            "1s",
            "--requests",
            "3"
        ])
        .is_err());
    }

    #[test]
    fn ramps() {
        assert_eq!(
            parse_ramp("1:4:64"),
            Ok(RampSpec {
                start: 1,
                step: 4,
                max: 64
            })
        );
        assert!(parse_ramp("0:1:4").is_err());
        assert!(parse_ramp("8:1:4").is_err());
        assert!(parse_ramp("1:4").is_err());
    }
}
