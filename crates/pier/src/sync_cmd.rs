//! `pier sync status | retry | run` against a running node: the job queue's rows, failed jobs
//! queued again, a rule run now. Exit status 0 when what was asked happened, 1 when the node
//! answered that it did not (a job failed, no such job or rule, a rule's upstream down), 2
//! when the node could not be asked.

use std::process::ExitCode;
use std::time::Duration;

use pier_sync::JobRow;
use serde::Deserialize;

use crate::progress;
use crate::remote;

#[derive(clap::Args)]
pub struct SyncArgs {
    #[command(subcommand)]
    pub command: SyncCommand,
}

#[derive(clap::Subcommand)]
pub enum SyncCommand {
    /// One row per job: id, kind, state, attempts, the file (imports), image, target, last
    /// error. Exits 1 when any job has failed.
    Status {
        /// The node to ask; credentials, when auth is on, come from PIER_USERNAME with
        /// PIER_PASSWORD or PIER_PASSWORD_FILE in the environment, never from the URL.
        #[arg(long, value_name = "URL", default_value = remote::DEFAULT_URL)]
        url: String,
        /// Print the rows as JSON, as the node sent them.
        #[arg(long)]
        json: bool,
    },
    /// Queue failed jobs again: the one with ID, or every failed one with --failed.
    Retry {
        /// The node to ask; credentials, when auth is on, come from PIER_USERNAME with
        /// PIER_PASSWORD or PIER_PASSWORD_FILE in the environment, never from the URL.
        #[arg(long, value_name = "URL", default_value = remote::DEFAULT_URL)]
        url: String,
        /// The job to retry.
        #[arg(
            value_name = "ID",
            required_unless_present = "failed",
            conflicts_with = "failed"
        )]
        id: Option<u64>,
        /// Retry every failed job.
        #[arg(long)]
        failed: bool,
    },
    /// Run a `[[sync]]` or `[[replicate]]` rule now.
    Run {
        /// The node to ask; credentials, when auth is on, come from PIER_USERNAME with
        /// PIER_PASSWORD or PIER_PASSWORD_FILE in the environment, never from the URL.
        #[arg(long, value_name = "URL", default_value = remote::DEFAULT_URL)]
        url: String,
        /// The rule's name.
        #[arg(value_name = "NAME")]
        name: String,
    },
}

#[derive(Deserialize)]
struct Jobs {
    jobs: Vec<JobRow>,
}

#[derive(Deserialize)]
struct Queued {
    queued: usize,
}

/// A request may take this long: a run lists an upstream's tags first.
const TIMEOUT: Duration = Duration::from_secs(120);

pub fn run(args: SyncArgs) -> ExitCode {
    let url = match &args.command {
        SyncCommand::Status { url, .. }
        | SyncCommand::Retry { url, .. }
        | SyncCommand::Run { url, .. } => url.clone(),
    };
    let base = match progress::base(&url) {
        Ok(base) => base,
        Err(code) => return code,
    };
    let rt = match remote::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pier: cannot start the async runtime: {e}");
            return ExitCode::from(remote::EXIT_UNREACHABLE);
        }
    };
    rt.block_on(async move {
        match args.command {
            SyncCommand::Status { json, .. } => status(&base, json).await,
            SyncCommand::Retry { id, failed, .. } => retry(&base, id, failed).await,
            SyncCommand::Run { name, .. } => run_rule(&base, &name).await,
        }
    })
}

/// What a request to the node came to.
enum Answer {
    /// 2xx, with the body.
    Ok(Vec<u8>),
    /// The node answered no; the message says why.
    No(String),
    /// The node could not be asked.
    Unreachable(String),
}

async fn ask(method: reqwest::Method, url: &str, body: Option<serde_json::Value>) -> Answer {
    let client = match remote::client() {
        Ok(c) => c,
        Err(e) => return Answer::Unreachable(remote::cause(&e)),
    };
    let mut req = client.request(method, url).timeout(TIMEOUT);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return Answer::Unreachable(remote::cause(&e)),
    };
    let status = resp.status();
    let body = match remote::read_body(resp).await {
        Ok(b) => b,
        Err(e) => return Answer::Unreachable(e),
    };
    if status.is_success() {
        Answer::Ok(body)
    } else {
        let why = remote::oci_error_message(&body).unwrap_or_else(|| status.to_string());
        Answer::No(why)
    }
}

async fn status(base: &str, json: bool) -> ExitCode {
    let url = format!("{base}/api/v1/sync/jobs");
    let body = match ask(reqwest::Method::GET, &url, None).await {
        Answer::Ok(b) => b,
        Answer::No(why) => return progress::not_done(why),
        Answer::Unreachable(cause) => return remote::unreachable(&url, &cause),
    };
    let jobs: Jobs = match serde_json::from_slice(&body) {
        Ok(j) => j,
        Err(e) => return remote::unreachable(&url, &format!("not a job list: {e}")),
    };
    if json {
        match serde_json::to_string_pretty(&serde_json::json!({ "jobs": jobs.jobs })) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("pier: {e}"),
        }
    } else {
        print!("{}", render(&jobs.jobs));
    }
    let failed = jobs
        .jobs
        .iter()
        .any(|j| j.state == pier_store::JobState::Failed);
    progress::done(!failed)
}

/// The rows as a table, newest job last. A FILE column (the archive an import came from)
/// appears when there are imports.
fn render(rows: &[JobRow]) -> String {
    if rows.is_empty() {
        return "no jobs\n".to_string();
    }
    let files = rows.iter().any(|r| !r.file.is_empty());
    let mut header = vec!["ID", "KIND", "STATE", "TRIES"];
    if files {
        header.push("FILE");
    }
    header.extend(["IMAGE", "TARGET", "LAST ERROR"]);
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = vec![
                r.id.to_string(),
                r.kind.clone(),
                r.state.to_string(),
                r.attempts.to_string(),
            ];
            if files {
                row.push(r.file.clone());
            }
            row.extend([
                r.image.clone(),
                r.target.clone(),
                r.last_error.clone().unwrap_or_default(),
            ]);
            row
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row.iter()).take(header.len() - 1) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cols: &[&str]| {
        let mut l = String::new();
        for (i, c) in cols.iter().enumerate() {
            if i + 1 == cols.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    out.push_str(&line(&header));
    for row in &cells {
        let cols: Vec<&str> = row.iter().map(String::as_str).collect();
        out.push_str(&line(&cols));
    }
    out
}

async fn retry(base: &str, id: Option<u64>, failed: bool) -> ExitCode {
    let url = format!("{base}/api/v1/sync/retry");
    let body = match id {
        Some(id) if !failed => serde_json::json!({ "id": id }),
        _ => serde_json::json!({ "failed": true }),
    };
    let queued = match ask(reqwest::Method::POST, &url, Some(body)).await {
        Answer::Ok(b) => match serde_json::from_slice::<Queued>(&b) {
            Ok(q) => q.queued,
            Err(e) => return remote::unreachable(&url, &format!("not a retry answer: {e}")),
        },
        Answer::No(why) => return progress::not_done(why),
        Answer::Unreachable(cause) => return remote::unreachable(&url, &cause),
    };
    match id {
        Some(id) if queued == 0 => progress::not_done(format_args!(
            "job {id} is not a failed job (no such job, or it has not failed)"
        )),
        Some(id) => {
            println!("job {id} queued again");
            progress::done(true)
        }
        None => {
            println!("{queued} failed job(s) queued again");
            progress::done(true)
        }
    }
}

async fn run_rule(base: &str, name: &str) -> ExitCode {
    let url = format!("{base}/api/v1/sync/run/{name}");
    match ask(reqwest::Method::POST, &url, None).await {
        Answer::Ok(b) => match serde_json::from_slice::<Queued>(&b) {
            Ok(q) => {
                println!("rule {name}: {} job(s) queued", q.queued);
                progress::done(true)
            }
            Err(e) => remote::unreachable(&url, &format!("not a run answer: {e}")),
        },
        Answer::No(why) => progress::not_done(format_args!("rule {name}: {why}")),
        Answer::Unreachable(cause) => remote::unreachable(&url, &cause),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_column_per_field() {
        let row = JobRow {
            id: 12,
            kind: "replicate".into(),
            image: "team/app:1".into(),
            target: "http://dc2:5000".into(),
            state: pier_store::JobState::Retrying,
            attempts: 2,
            last_error: Some("upstream unavailable: 503".into()),
            rule: "dc2".into(),
            file: String::new(),
            images: Vec::new(),
            created_ms: 0,
            updated_ms: 0,
            next_at_ms: 0,
        };
        let table = render(std::slice::from_ref(&row));
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("ID  KIND"), "{table}");
        assert!(lines[1].contains("retrying"), "{table}");
        assert!(lines[1].ends_with("upstream unavailable: 503"), "{table}");
        assert!(!lines[0].contains("FILE"), "{table}");
        assert_eq!(render(&[]), "no jobs\n");

        // Imports add the file they came from.
        let import = JobRow {
            id: 13,
            kind: "import".into(),
            image: "team/app:1".into(),
            target: String::new(),
            state: pier_store::JobState::Succeeded,
            attempts: 1,
            last_error: None,
            file: "app.tar".into(),
            images: vec!["team/app:1".into()],
            ..row
        };
        let table = render(&[import]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].starts_with("ID  KIND    STATE      TRIES  FILE"),
            "{table}"
        );
        assert!(lines[1].contains("app.tar  team/app:1"), "{table}");
    }
}
