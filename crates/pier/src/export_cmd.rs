//! `pier export IMAGE... -o FILE`: have a running node stream the images as one archive
//! (`GET /api/v1/export`) that `docker load`, `podman load` and `pier import` accept, with a
//! progress bar. The archive is written beside FILE under a temporary name and renamed into
//! place only once complete and fsynced, so FILE is never a partial archive.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tokio::io::AsyncWriteExt;

use crate::progress;
use crate::remote;

#[derive(clap::Args)]
#[command(
    after_help = "Exit status: 0 when FILE holds every image; 1 when the node refused (the \
    reason is printed) or the archive could not be written whole; 2 when the node cannot be \
    reached at all."
)]
pub struct ExportArgs {
    /// Images to export, by tag (e.g. team/app:v1; every platform of an index is included).
    #[arg(value_name = "IMAGE", required = true)]
    pub images: Vec<String>,
    /// The archive to write.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// The node to export from; credentials, when auth is on, come from PIER_USERNAME
    /// with PIER_PASSWORD or PIER_PASSWORD_FILE in the environment, never from the URL.
    #[arg(long, value_name = "URL", default_value = remote::DEFAULT_URL)]
    pub url: String,
}

pub fn run(args: ExportArgs) -> ExitCode {
    let url = args.url.clone();
    progress::run(&url, "/api/v1/export", |endpoint| async move {
        export(&args, &endpoint).await
    })
}

fn partial_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".part");
    out.with_file_name(name)
}

async fn export(args: &ExportArgs, endpoint: &str) -> ExitCode {
    let client = match remote::client() {
        Ok(client) => client,
        Err(e) => return remote::unreachable(endpoint, &remote::cause(&e)),
    };
    let query: Vec<(&str, &str)> = args.images.iter().map(|i| ("image", i.as_str())).collect();
    let mut resp = match client.get(endpoint).query(&query).send().await {
        Ok(resp) => resp,
        Err(e) => return remote::unreachable(endpoint, &remote::cause(&e)),
    };
    let status = resp.status();
    if status != reqwest::StatusCode::OK {
        let body = remote::read_body(resp).await.unwrap_or_default();
        return progress::not_done(format_args!("export: {}", progress::refusal(status, &body)));
    }
    let len = resp.content_length();
    let shown = args.output.display().to_string();
    let bar = progress::bar(
        progress::bars_wanted(false),
        len,
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        shown.clone(),
    );
    let part = partial_path(&args.output);
    let written = async {
        let mut f = tokio::fs::File::create(&part)
            .await
            .map_err(|e| format!("cannot create {}: {e}", part.display()))?;
        let mut total = 0u64;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("the download broke: {}", remote::cause(&e)))?
        {
            f.write_all(&chunk)
                .await
                .map_err(|e| format!("writing {}: {e}", part.display()))?;
            total += chunk.len() as u64;
            bar.inc(chunk.len() as u64);
        }
        if let Some(len) = len {
            if total != len {
                return Err(format!("the download ended after {total} of {len} bytes"));
            }
        }
        f.sync_all()
            .await
            .map_err(|e| format!("writing {}: {e}", part.display()))?;
        tokio::fs::rename(&part, &args.output)
            .await
            .map_err(|e| format!("renaming {} to {shown}: {e}", part.display()))?;
        Ok(total)
    }
    .await;
    bar.finish_and_clear();
    match written {
        Ok(total) => {
            println!(
                "{shown}: {} image(s), {:.1} MB",
                args.images.len(),
                total as f64 / 1e6
            );
            progress::done(true)
        }
        Err(message) => {
            let _ = tokio::fs::remove_file(&part).await;
            progress::not_done(format_args!("export: {message}"))
        }
    }
}
