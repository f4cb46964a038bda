//! `pier import FILE...`: send image archives to a running node, which imports them
//! (`POST /api/v1/import`), one after the other, with a progress bar per file, and print what
//! each became: imported (with the images), a duplicate of a file imported before, or failed
//! with the reason.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use futures::StreamExt;
use serde::Deserialize;

use crate::progress::{self, Outcome, Tally};
use crate::remote;

#[derive(clap::Args)]
#[command(
    after_help = "Formats: docker save archives (either layout), OCI image-layout archives, \
    each optionally gzip- or zstd-compressed. Exit status: 0 when every file was imported or \
    had been already; 1 when a file was not (each reason is printed); 2 when the node cannot \
    be reached at all."
)]
pub struct ImportArgs {
    /// Archives to import.
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
    /// The node to import into; credentials, when auth is on, come from PIER_USERNAME
    /// with PIER_PASSWORD or PIER_PASSWORD_FILE in the environment, never from the URL.
    #[arg(long, value_name = "URL", default_value = remote::DEFAULT_URL)]
    pub url: String,
    /// Print each file's report as a JSON line instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

/// The parts of the node's report this command reads; it prints the whole in `--json`.
#[derive(Debug, Deserialize)]
struct Report {
    result: String,
    #[serde(default)]
    images: Vec<ReportImage>,
    #[serde(default)]
    bytes: u64,
    #[serde(default)]
    seconds: f64,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    duplicate_of: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    skipped: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ReportImage {
    name: String,
    digest: String,
}

pub fn run(args: ImportArgs) -> ExitCode {
    let url = args.url.clone();
    progress::run(&url, "/api/v1/import", |endpoint| async move {
        import_all(&args, &endpoint).await
    })
}

async fn import_all(args: &ImportArgs, endpoint: &str) -> ExitCode {
    let client = match remote::client() {
        Ok(client) => client,
        Err(e) => return remote::unreachable(endpoint, &remote::cause(&e)),
    };
    let bars = progress::bars_wanted(args.json);
    let mut tally = Tally::new("import", endpoint);
    for file in &args.files {
        let outcome = import_one(&client, endpoint, file, args.json, bars).await;
        if let Err(code) = tally.count(file.display(), outcome) {
            return code;
        }
    }
    tally.exit()
}

/// What became of one file: answered ok when the node's report says the file is in; not
/// asked when the file could not be read here.
async fn import_one(
    client: &reqwest::Client,
    endpoint: &str,
    path: &Path,
    json: bool,
    bars: bool,
) -> Outcome {
    let shown = path.display().to_string();
    let file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("pier: import {shown}: {e}");
            return Outcome::NotAsked;
        }
    };
    let size = match file.metadata().await {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => {
            eprintln!("pier: import {shown}: not a regular file");
            return Outcome::NotAsked;
        }
        Err(e) => {
            eprintln!("pier: import {shown}: {e}");
            return Outcome::NotAsked;
        }
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| shown.clone());
    let bar = progress::bar(
        bars,
        Some(size),
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        name.clone(),
    );
    let counted = bar.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).inspect(move |c| {
        if let Ok(c) = c {
            counted.inc(c.len() as u64);
        }
    });
    let sent = client
        .post(endpoint)
        .query(&[("name", name.as_str())])
        .header(reqwest::header::CONTENT_LENGTH, size)
        .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    bar.finish_and_clear();
    let resp = match sent {
        Ok(resp) => resp,
        Err(e) => return Outcome::Unreachable(remote::cause(&e)),
    };
    let status = resp.status();
    let body = match remote::read_body(resp).await {
        Ok(body) => body,
        Err(cause) => {
            eprintln!("pier: import {shown}: reading the answer failed: {cause}");
            return Outcome::Answered(false);
        }
    };
    let Ok(report) = serde_json::from_slice::<Report>(&body) else {
        eprintln!("pier: import {shown}: {}", progress::refusal(status, &body));
        return Outcome::Answered(false);
    };
    if json {
        println!("{}", String::from_utf8_lossy(&body).trim_end());
    } else {
        print_report(&shown, &report);
    }
    Outcome::Answered(report.result == "imported" || report.result == "duplicate")
}

fn print_report(file: &str, r: &Report) {
    let names: Vec<String> = r
        .images
        .iter()
        .map(|i| format!("{} ({})", i.name, short(&i.digest)))
        .collect();
    match r.result.as_str() {
        "imported" => {
            let mb = r.bytes as f64 / 1e6;
            println!(
                "{file}: imported {} [{}, {mb:.1} MB in {:.1} s, {:.0} MB/s]",
                names.join(", "),
                r.format.as_deref().unwrap_or("?"),
                r.seconds,
                mb / r.seconds.max(1e-6)
            );
        }
        "duplicate" => println!(
            "{file}: already imported as {}: {}",
            r.duplicate_of.as_deref().unwrap_or("?"),
            names.join(", ")
        ),
        other => eprintln!(
            "pier: import {file}: {}{}",
            if other == "retry" {
                "not imported (the node's store failed; try again): "
            } else {
                "failed: "
            },
            r.error.as_deref().unwrap_or("no reason given")
        ),
    }
    for s in &r.skipped {
        eprintln!("pier: import {file}: skipped {s}");
    }
}

/// `sha256:0123456789ab`: enough of a digest to tell images apart in a sentence.
fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}
