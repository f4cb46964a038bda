//! `pier gc` and `pier check`: ask a running node to collect unreferenced blobs (or say what
//! that would free), and to check its stores, deep (every digest) with a progress bar.
//!
//! `pier check` prints one line per named check (`pass`, `warn`, `fixed`, `fail`) and exits
//! for monitoring: 0 when every check passed, 1 on a warning or something found and fixed
//! (quarantined blobs the mirror fetches again), 2 on a failure: data lost, a broken
//! condition, or a node that could not be asked (then one `fail` line names the listener).

use std::process::ExitCode;

use serde::Deserialize;

use crate::remote;

#[derive(clap::Args)]
#[command(
    after_help = "Exit status: 0 when the collection ran (or, with --dry-run, was \
    planned); 1 when the node refused or failed it; 2 when the node cannot be reached."
)]
pub struct GcArgs {
    /// Report what would be freed, and free nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The node to ask; credentials, when auth is on, come from PIER_USERNAME
    /// with PIER_PASSWORD or PIER_PASSWORD_FILE in the environment, never from the URL.
    #[arg(long, value_name = "URL", default_value = remote::DEFAULT_URL)]
    pub url: String,
    /// Print the node's report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
#[command(
    after_help = "Exit status: 0 every check passed; 1 a warning, or problems found and \
    fixed (corrupt blobs quarantined, to be fetched again); 2 a check failed (data lost, a \
    broken condition), or the node cannot be reached."
)]
pub struct CheckArgs {
    /// Also re-hash every blob and quarantine those whose bytes do not match their digest.
    #[arg(long)]
    pub deep: bool,
    /// The node to ask; credentials, when auth is on, come from PIER_USERNAME
    /// with PIER_PASSWORD or PIER_PASSWORD_FILE in the environment, never from the URL.
    #[arg(long, value_name = "URL", default_value = remote::DEFAULT_URL)]
    pub url: String,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct GcReport {
    dry_run: bool,
    blobs: u64,
    bytes: u64,
    manifests: u64,
    #[serde(default)]
    scanned: u64,
    #[serde(default)]
    young: u64,
    #[serde(default)]
    rescued: u64,
}

fn endpoint(url: &str, path: &str) -> Result<String, ExitCode> {
    match remote::base_url(url) {
        Ok(base) => Ok(format!("{base}{path}")),
        Err(message) => {
            eprintln!("pier: {message}");
            Err(ExitCode::from(remote::EXIT_UNREACHABLE))
        }
    }
}

pub fn run_gc(args: GcArgs) -> ExitCode {
    let url = match endpoint(
        &args.url,
        if args.dry_run {
            "/api/v1/gc?dry_run=true"
        } else {
            "/api/v1/gc"
        },
    ) {
        Ok(u) => u,
        Err(code) => return code,
    };
    match remote::runtime() {
        Ok(rt) => rt.block_on(gc(&args, &url)),
        Err(e) => remote::unreachable(&url, &format!("cannot start the async runtime: {e}")),
    }
}

async fn gc(args: &GcArgs, url: &str) -> ExitCode {
    let client = match remote::client() {
        Ok(c) => c,
        Err(e) => return remote::unreachable(url, &remote::cause(&e)),
    };
    let resp = match client.post(url).send().await {
        Ok(r) => r,
        Err(e) => return remote::unreachable(url, &remote::cause(&e)),
    };
    let status = resp.status();
    let body = match remote::read_body(resp).await {
        Ok(b) => b,
        Err(e) => return remote::unreachable(url, &e),
    };
    if !status.is_success() {
        let message = remote::oci_error_message(&body)
            .unwrap_or_else(|| format!("the node answered {status}"));
        eprintln!("pier: gc: {message}");
        return ExitCode::from(remote::EXIT_NOT_DONE);
    }
    let report: GcReport = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return remote::unreachable(url, &format!("not a gc report: {e}")),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        let verb = if report.dry_run {
            "would free"
        } else {
            "freed"
        };
        println!(
            "{verb} {} blobs, {} bytes ({}), {} manifests; {} blobs scanned, {} unreferenced \
             kept as younger than the grace period, {} wanted again during the run",
            report.blobs,
            report.bytes,
            human(report.bytes),
            report.manifests,
            report.scanned,
            report.young,
            report.rescued
        );
    }
    ExitCode::from(remote::EXIT_OK)
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// One named result, as the node reports it.
#[derive(Debug, Deserialize, serde::Serialize)]
struct CheckResult {
    name: String,
    status: String,
    message: String,
    #[serde(default)]
    details: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    Plan {
        bytes: Option<u64>,
    },
    Progress {
        bytes: Option<u64>,
    },
    Report {
        checks: Vec<CheckResult>,
    },
    Error {
        message: Option<String>,
    },
    #[serde(other)]
    Other,
}

pub fn run_check(args: CheckArgs) -> ExitCode {
    let url = match endpoint(
        &args.url,
        if args.deep {
            "/api/v1/check?deep=true"
        } else {
            "/api/v1/check"
        },
    ) {
        Ok(u) => u,
        Err(code) => return code,
    };
    match remote::runtime() {
        Ok(rt) => rt.block_on(check(&args, &url)),
        Err(e) => remote::unreachable(&url, &format!("cannot start the async runtime: {e}")),
    }
}

/// The longest event line accepted.
const MAX_LINE: usize = 16 << 20;

/// The node could not be asked: one failing `listener` line (so a monitor reading the output
/// sees which check failed) besides the message on stderr, and exit 2.
fn unreachable(args: &CheckArgs, url: &str, cause: &str) -> ExitCode {
    let line = CheckResult {
        name: "listener".into(),
        status: "fail".into(),
        message: format!("cannot reach {url}: {cause}"),
        details: Vec::new(),
    };
    print_checks(args, &[line]);
    remote::unreachable(url, cause)
}

fn print_checks(args: &CheckArgs, checks: &[CheckResult]) {
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "checks": checks }))
                .unwrap_or_default()
        );
    } else {
        for c in checks {
            println!("{:<6} {}: {}", c.status, c.name, c.message);
            for d in &c.details {
                println!("         {d}");
            }
        }
    }
}

async fn check(args: &CheckArgs, url: &str) -> ExitCode {
    let client = match remote::client() {
        Ok(c) => c,
        Err(e) => return unreachable(args, url, &remote::cause(&e)),
    };
    let mut resp = match client.post(url).send().await {
        Ok(r) => r,
        Err(e) => return unreachable(args, url, &remote::cause(&e)),
    };
    let status = resp.status();
    if !status.is_success() {
        let body = remote::read_body(resp).await.unwrap_or_default();
        let message = remote::oci_error_message(&body)
            .unwrap_or_else(|| format!("the node answered {status}"));
        eprintln!("pier: check: {message}");
        return ExitCode::from(remote::EXIT_UNREACHABLE);
    }
    let bar = crate::progress::bar(
        args.deep && crate::progress::bars_wanted(args.json),
        Some(0),
        "verifying [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        String::new(),
    );
    let mut pending: Vec<u8> = Vec::new();
    let mut checks: Option<Vec<CheckResult>> = None;
    let mut failure: Option<String> = None;
    let mut take = |line: &[u8], checks: &mut Option<Vec<CheckResult>>| {
        let Ok(event) = serde_json::from_slice::<Event>(line) else {
            return;
        };
        match event {
            Event::Plan { bytes } => bar.set_length(bytes.unwrap_or(0)),
            Event::Progress { bytes } => bar.inc(bytes.unwrap_or(0)),
            Event::Report { checks: c } => *checks = Some(c),
            Event::Error { message } => {
                failure = Some(message.unwrap_or_else(|| "the check failed".into()))
            }
            Event::Other => {}
        }
    };
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                pending.extend_from_slice(&chunk);
                while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=nl).collect();
                    take(&line, &mut checks);
                }
                if pending.len() > MAX_LINE {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                bar.finish_and_clear();
                return unreachable(
                    args,
                    url,
                    &format!("the stream broke before its report: {}", remote::cause(&e)),
                );
            }
        }
    }
    if !pending.is_empty() {
        take(&pending, &mut checks);
    }
    bar.finish_and_clear();
    let Some(checks) = checks else {
        eprintln!(
            "pier: check: {}",
            failure.unwrap_or_else(|| "the node ended the stream before its report".into())
        );
        return ExitCode::from(remote::EXIT_UNREACHABLE);
    };
    print_checks(args, &checks);
    let code = if checks.iter().any(|c| c.status == "fail") {
        2
    } else if checks
        .iter()
        .any(|c| c.status == "fixed" || c.status == "warn")
    {
        1
    } else {
        0
    };
    ExitCode::from(code)
}

#[derive(clap::Args)]
#[command(
    after_help = "Exit status: 0 when the image is pinned (or unpinned); 1 when the node \
    refused (the image is not stored there, say); 2 when the node cannot be reached."
)]
pub struct PinArgs {
    /// The image as clients pull it through the node (docker.io/library/alpine:3.20,
    /// team/app@sha256:…). It must be stored there already.
    #[arg(value_name = "IMAGE")]
    pub image: String,
    /// The node to ask; credentials, when auth is on, come from PIER_USERNAME
    /// with PIER_PASSWORD or PIER_PASSWORD_FILE in the environment, never from the URL.
    #[arg(long, value_name = "URL", default_value = remote::DEFAULT_URL)]
    pub url: String,
}

/// `pier pin` (`unpin` false) or `pier unpin`.
pub fn run_pin(args: PinArgs, unpin: bool) -> ExitCode {
    let path = if unpin {
        "/api/v1/unpin"
    } else {
        "/api/v1/pin"
    };
    let url = match endpoint(&args.url, path) {
        Ok(u) => u,
        Err(code) => return code,
    };
    let rt = match remote::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            return remote::unreachable(&url, &format!("cannot start the async runtime: {e}"))
        }
    };
    rt.block_on(async {
        let client = match remote::client() {
            Ok(c) => c,
            Err(e) => return remote::unreachable(&url, &remote::cause(&e)),
        };
        let resp = match client
            .post(&url)
            .json(&serde_json::json!({ "image": args.image }))
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return remote::unreachable(&url, &remote::cause(&e)),
        };
        let status = resp.status();
        let body = match remote::read_body(resp).await {
            Ok(b) => b,
            Err(e) => return remote::unreachable(&url, &e),
        };
        if !status.is_success() {
            let message = remote::oci_error_message(&body)
                .unwrap_or_else(|| format!("the node answered {status}"));
            eprintln!("pier: {}: {message}", if unpin { "unpin" } else { "pin" });
            return ExitCode::from(remote::EXIT_NOT_DONE);
        }
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let what = format!(
            "{}@{}",
            answer["repo"].as_str().unwrap_or("?"),
            answer["digest"].as_str().unwrap_or("?")
        );
        match (unpin, answer["changed"].as_bool()) {
            (false, _) => println!("pinned {what}"),
            (true, Some(true)) => println!("unpinned {what}"),
            (true, _) => println!("{what} was not pinned by pier pin"),
        }
        ExitCode::from(remote::EXIT_OK)
    })
}
