//! `pier warm`: ask a node to put every blob of some images on N nodes (or on all), one image
//! after the other, following the node's stream of newline-delimited JSON events as it comes
//! (`plan`, one `placed` per placement, `summary`) with a progress bar per image.
//!
//! The exit status is 0 only when every image's summary says ok: the point of warming is that
//! the blobs are where they were asked to be, so anything less must be visible to a script.

use std::process::ExitCode;

use indicatif::ProgressBar;
use serde::Deserialize;

use crate::progress::{self, Outcome, Tally};
use crate::remote;

#[derive(clap::Args)]
#[command(
    after_help = "Exit status: 0 when every blob of every image is where it was asked to \
    be; 1 when something was not placed (each failure is printed); 2 when the node cannot be \
    reached at all."
)]
pub struct WarmArgs {
    /// Images to place, as a client pulls them through this node (e.g.
    /// docker.io/library/alpine:3.20, or team/app@sha256:…).
    #[arg(value_name = "IMAGE", required = true)]
    pub images: Vec<String>,
    /// Put every blob on N nodes [default: the node's own --replicas].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub replicas: Option<u32>,
    /// Put every blob on every node of the cluster.
    #[arg(long, conflicts_with = "replicas")]
    pub all_nodes: bool,
    /// The node to ask; credentials, when auth is on, come from PIER_USERNAME
    /// with PIER_PASSWORD or PIER_PASSWORD_FILE in the environment, never from the URL.
    #[arg(long, value_name = "URL", default_value = remote::DEFAULT_URL)]
    pub url: String,
    /// Print the node's events as JSON lines, as received, instead of progress bars.
    #[arg(long)]
    pub json: bool,
}

/// The longest event line accepted; real ones are a few hundred bytes.
const MAX_LINE: usize = 1 << 20;

pub fn run(args: WarmArgs) -> ExitCode {
    let url = args.url.clone();
    progress::run(&url, "/api/v1/warm", |endpoint| async move {
        warm_all(&args, &endpoint).await
    })
}

async fn warm_all(args: &WarmArgs, endpoint: &str) -> ExitCode {
    let client = match remote::client() {
        Ok(client) => client,
        Err(e) => return remote::unreachable(endpoint, &remote::cause(&e)),
    };
    let bars = progress::bars_wanted(args.json);
    let mut tally = Tally::new("warm", endpoint);
    for image in &args.images {
        let outcome = warm_one(&client, endpoint, image, args, bars).await;
        if let Err(code) = tally.count(image, outcome) {
            return code;
        }
    }
    tally.exit()
}

/// What became of one image: answered ok when its summary said every placement was made.
async fn warm_one(
    client: &reqwest::Client,
    endpoint: &str,
    image: &str,
    args: &WarmArgs,
    bars: bool,
) -> Outcome {
    let request = serde_json::json!({
        "image": image,
        "replicas": args.replicas,
        "all_nodes": args.all_nodes,
    });
    let mut resp = match client.post(endpoint).json(&request).send().await {
        Ok(resp) => resp,
        Err(e) => return Outcome::Unreachable(remote::cause(&e)),
    };
    let status = resp.status();
    if status != reqwest::StatusCode::OK {
        let body = remote::read_body(resp).await.unwrap_or_default();
        eprintln!("pier: warm {image}: {}", progress::refusal(status, &body));
        return Outcome::Answered(false);
    }

    let mut warm = Warm::new(image, bars, args.json);
    let mut pending: Vec<u8> = Vec::new();
    let ended = loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                pending.extend_from_slice(&chunk);
                while let Some(newline) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=newline).collect();
                    warm.line(&line);
                }
                if pending.len() > MAX_LINE {
                    break Err(format!(
                        "the node sent a line longer than {} KiB",
                        MAX_LINE >> 10
                    ));
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => {
                break Err(format!(
                    "the stream broke before its summary: {}",
                    remote::cause(&e)
                ))
            }
        }
    };
    // A last event without its newline still counts.
    if !pending.is_empty() {
        warm.line(&pending);
    }
    Outcome::Answered(warm.finish(ended))
}

/// One event of the stream. Unknown events and fields are ignored: the stream may grow.
#[derive(Debug, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    Plan {
        blobs: Option<u64>,
        targets: Option<u64>,
        total: Option<u64>,
    },
    Placed {
        blob: Option<String>,
        node: Option<String>,
        ok: Option<bool>,
        error: Option<String>,
    },
    Summary {
        ok: Option<bool>,
        placed: Option<u64>,
        failed: Option<u64>,
    },
    #[serde(other)]
    Other,
}

/// The progress of one image's warm, as the events tell it.
struct Warm<'a> {
    image: &'a str,
    json: bool,
    bar: ProgressBar,
    plan: Option<(Option<u64>, Option<u64>)>,
    summary: Option<(bool, u64, u64)>,
}

impl<'a> Warm<'a> {
    fn new(image: &'a str, bars: bool, json: bool) -> Warm<'a> {
        let bar = progress::bar(
            bars,
            None,
            "{prefix} [{bar:30}] {pos}/{len} placements {msg}",
            image.to_string(),
        );
        bar.set_message("(planning)");
        Warm {
            image,
            json,
            bar,
            plan: None,
            summary: None,
        }
    }

    /// Take one line of the stream.
    fn line(&mut self, raw: &[u8]) {
        let text = String::from_utf8_lossy(raw);
        let text = text.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            return;
        }
        if self.json {
            println!("{text}");
        }
        // A line that is not an event is skipped: the summary, not each line, decides.
        let Ok(event) = serde_json::from_str::<Event>(text) else {
            return;
        };
        match event {
            Event::Plan {
                blobs,
                targets,
                total,
            } => {
                self.plan = Some((blobs, targets));
                self.bar.set_length(total.unwrap_or(0));
                self.bar.set_message("");
            }
            Event::Placed {
                blob,
                node,
                ok,
                error,
            } => {
                self.bar.inc(1);
                if ok != Some(true) {
                    let message = format!(
                        "pier: warm {}: {} on {}: {}",
                        self.image,
                        blob.as_deref().unwrap_or("a blob"),
                        node.as_deref().unwrap_or("a node"),
                        error.as_deref().unwrap_or("not placed")
                    );
                    self.bar.suspend(|| eprintln!("{message}"));
                }
            }
            Event::Summary { ok, placed, failed } => {
                let (placed, failed) = (placed.unwrap_or(0), failed.unwrap_or(0));
                self.summary = Some((ok.unwrap_or(failed == 0), placed, failed));
            }
            Event::Other => {}
        }
    }

    /// Close the bar, report the image's result, and say whether it is ok. `ended` is how the
    /// stream ended; once the summary arrived nothing else is expected, so only a stream that
    /// ended or broke before it fails the image.
    fn finish(self, ended: Result<(), String>) -> bool {
        self.bar.finish_and_clear();
        let Some((ok, placed, failed)) = self.summary else {
            let why = ended
                .err()
                .unwrap_or_else(|| "the node ended the stream before its summary".to_string());
            eprintln!("pier: warm {}: {why}", self.image);
            return false;
        };
        if !self.json {
            let mut text = format!(
                "{}: {placed} {} made, {failed} failed",
                self.image,
                if placed == 1 {
                    "placement"
                } else {
                    "placements"
                }
            );
            if let Some((Some(blobs), Some(targets))) = self.plan {
                text.push_str(&format!(" ({blobs} blobs, {targets} target nodes)"));
            }
            if !ok {
                text.push_str(": NOT warm");
            }
            println!("{text}");
        }
        ok
    }
}
