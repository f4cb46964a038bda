//! `pier status`: ask a node for `GET /api/v1/status` and print it, either as the JSON
//! document received (indented, keys in the node's order) or as a summary for people. The exit
//! status says whether the node is ready.
//!
//! The document only grows, so the summary reads it leniently: unknown fields are ignored and
//! every section but the node's name and readiness may be missing.

use std::fmt::Write as _;
use std::process::ExitCode;

use serde::Deserialize;

use crate::remote;

#[derive(clap::Args)]
#[command(
    after_help = "Exit status: 0 when the node is ready; 1 when it answered but is not \
    ready (the status is still printed); 2 when it cannot be reached or did not answer with a \
    status document."
)]
pub struct StatusArgs {
    /// The node to ask; credentials, when auth is on, come from PIER_USERNAME
    /// with PIER_PASSWORD or PIER_PASSWORD_FILE in the environment, never from the URL.
    #[arg(long, value_name = "URL", default_value = remote::DEFAULT_URL)]
    pub url: String,
    /// Print the status document as JSON, as the node sent it.
    #[arg(long)]
    pub json: bool,
}

/// How long the whole status request may take: the node builds the document from memory, so
/// a node that needs longer is as good as unreachable for someone checking on it.
const STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub fn run(args: StatusArgs) -> ExitCode {
    let base = match remote::base_url(&args.url) {
        Ok(base) => base,
        Err(message) => {
            eprintln!("pier: {message}");
            return ExitCode::from(remote::EXIT_UNREACHABLE);
        }
    };
    let url = format!("{base}/api/v1/status");
    let fetched = match remote::runtime() {
        Ok(rt) => rt.block_on(fetch(&url)),
        Err(e) => Err(format!("cannot start the async runtime: {e}")),
    };
    let (body, status) = match fetched {
        Ok(got) => got,
        Err(cause) => return remote::unreachable(&url, &cause),
    };
    if args.json {
        println!("{}", indent_json(&String::from_utf8_lossy(&body)));
    } else {
        print!("{}", render(&status));
    }
    ExitCode::from(if status.ready {
        remote::EXIT_OK
    } else {
        remote::EXIT_NOT_DONE
    })
}

/// GET the status: the body as received and its parsed form, or why there is none.
async fn fetch(url: &str) -> Result<(Vec<u8>, Status), String> {
    let client = remote::client().map_err(|e| remote::cause(&e))?;
    let resp = client
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .timeout(STATUS_TIMEOUT)
        .send()
        .await
        .map_err(|e| remote::cause(&e))?;
    let http_status = resp.status();
    let body = remote::read_body(resp).await?;
    // A status document is taken whatever the HTTP status: a node (or a proxy in front of it)
    // may well answer "not ready" with a 503 and the document.
    match serde_json::from_slice::<Status>(&body) {
        Ok(status) => Ok((body, status)),
        Err(_) if !http_status.is_success() => Err(match remote::oci_error_message(&body) {
            Some(message) => format!("the node answered {http_status}: {message}"),
            None => format!("the node answered {http_status}"),
        }),
        Err(e) => Err(format!("the answer is not a status document ({e})")),
    }
}

/// The parts of the status document the summary shows. Every field the node may leave out in
/// some version is an `Option`, so an older or newer node still gets a summary.
#[derive(Debug, Deserialize)]
struct Status {
    node: Node,
    ready: bool,
    not_ready_reasons: Option<Vec<String>>,
    members: Option<Vec<Member>>,
    storage: Option<Storage>,
    cache: Option<Cache>,
    upstreams: Option<Vec<Upstream>>,
}

#[derive(Debug, Deserialize)]
struct Node {
    name: String,
    zone: Option<String>,
    version: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Member {
    name: Option<String>,
    address: Option<String>,
    zone: Option<String>,
    state: Option<String>,
    since: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Storage {
    free_bytes: Option<u64>,
    min_free_bytes: Option<u64>,
    writable: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Cache {
    bytes: Option<u64>,
    blobs: Option<u64>,
    served_bytes: Option<Served>,
}

#[derive(Debug, Deserialize)]
struct Served {
    local: Option<u64>,
    peer: Option<u64>,
    upstream: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Upstream {
    name: Option<String>,
    endpoints: Option<Vec<Endpoint>>,
}

#[derive(Debug, Deserialize)]
struct Endpoint {
    url: Option<String>,
    /// `healthy`, `unhealthy` or `unknown`; older nodes send only `healthy`.
    state: Option<String>,
    healthy: Option<bool>,
}

/// Width of the label column of the summary.
const LABEL: usize = 11;

/// The summary for people: one line per aspect, then the members and upstreams as tables.
fn render(status: &Status) -> String {
    let mut out = String::new();
    let node = &status.node;
    let mut about = node.name.clone();
    if let Some(zone) = &node.zone {
        let _ = write!(about, ", zone {zone}");
    }
    if let Some(version) = &node.version {
        let _ = write!(about, ", pier {version}");
    }
    line(&mut out, "node", &about);

    let reasons = status.not_ready_reasons.as_deref().unwrap_or_default();
    match (status.ready, reasons) {
        (true, _) => line(&mut out, "ready", "yes"),
        (false, []) => line(&mut out, "ready", "no (the node gave no reason)"),
        (false, reasons) => {
            line(&mut out, "ready", "no");
            for reason in reasons {
                line(&mut out, "", &format!("- {reason}"));
            }
        }
    }

    if let Some(storage) = &status.storage {
        let mut text = match storage.free_bytes {
            Some(free) => format!("{} free", human_bytes(free)),
            None => "free space not tracked".to_string(),
        };
        if let Some(floor) = storage.min_free_bytes.filter(|&f| f > 0) {
            let _ = write!(text, " (keeps {} free)", human_bytes(floor));
        }
        match storage.writable {
            Some(true) => text.push_str(", writable"),
            Some(false) => text.push_str(", NOT writable"),
            None => {}
        }
        line(&mut out, "storage", &text);
    }

    if let Some(cache) = &status.cache {
        let mut text = match cache.bytes {
            Some(bytes) => human_bytes(bytes),
            None => "-".to_string(),
        };
        if let Some(blobs) = cache.blobs {
            let _ = write!(text, " in {blobs} {}", plural(blobs, "blob", "blobs"));
        }
        line(&mut out, "cache", &text);
        if let Some(served) = &cache.served_bytes {
            let (local, peer, upstream) = (
                served.local.unwrap_or(0),
                served.peer.unwrap_or(0),
                served.upstream.unwrap_or(0),
            );
            line(
                &mut out,
                "served",
                &format!(
                    "{} local, {} from peers, {} from upstreams",
                    human_bytes(local),
                    human_bytes(peer),
                    human_bytes(upstream)
                ),
            );
            let ratio = match hit_ratio(local, peer, upstream) {
                Some(ratio) => format!(
                    "{:.1} % by bytes (served without the upstream)",
                    ratio * 100.0
                ),
                None => "- (nothing served yet)".to_string(),
            };
            line(&mut out, "hit ratio", &ratio);
        }
    }

    if let Some(members) = &status.members {
        out.push('\n');
        let mut rows = vec![["NAME", "ADDRESS", "ZONE", "STATE", "SINCE"].map(String::from)];
        for m in members {
            rows.push(
                [&m.name, &m.address, &m.zone, &m.state, &m.since]
                    .map(|v| v.clone().unwrap_or_else(|| "-".to_string())),
            );
        }
        table(&mut out, &rows);
    }

    match status.upstreams.as_deref() {
        None => {}
        Some([]) => {
            out.push('\n');
            line(&mut out, "upstreams", "none (not a mirror)");
        }
        Some(upstreams) => {
            out.push('\n');
            let mut rows = vec![["UPSTREAM", "ENDPOINT", "HEALTH"].map(String::from)];
            for u in upstreams {
                let name = u.name.clone().unwrap_or_else(|| "-".to_string());
                let endpoints = u.endpoints.as_deref().unwrap_or_default();
                if endpoints.is_empty() {
                    rows.push([name.clone(), "-".to_string(), "-".to_string()]);
                }
                for e in endpoints {
                    let health = match (e.state.as_deref(), e.healthy) {
                        (Some("healthy"), _) | (None, Some(true)) => "healthy",
                        (Some("unhealthy"), _) | (None, Some(false)) => "UNHEALTHY",
                        (Some("unknown"), _) => "unknown (not tried yet)",
                        (Some(other), _) => other,
                        (None, None) => "-",
                    };
                    rows.push([
                        name.clone(),
                        e.url.clone().unwrap_or_else(|| "-".to_string()),
                        health.to_string(),
                    ]);
                }
            }
            table(&mut out, &rows);
        }
    }
    out
}

fn line(out: &mut String, label: &str, text: &str) {
    let _ = writeln!(out, "{label:<LABEL$}{text}");
}

/// Rows as columns separated by two spaces, each as wide as its widest cell.
fn table<const N: usize>(out: &mut String, rows: &[[String; N]]) {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut text = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    }
}

/// The share of served bytes that did not come from an upstream; None before any byte.
fn hit_ratio(local: u64, peer: u64, upstream: u64) -> Option<f64> {
    let total = local as f64 + peer as f64 + upstream as f64;
    (total > 0.0).then(|| (local as f64 + peer as f64) / total)
}

fn plural(n: u64, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 {
        one
    } else {
        many
    }
}

/// A byte count in binary units: `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Valid JSON re-indented by two spaces per level, changing only whitespace outside strings:
/// keys stay in the order the node sent them and numbers exactly as written, which parsing
/// into a map and printing it again would not guarantee.
fn indent_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len() * 2);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut chars = json.chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n("  ", depth));
    };
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
                // An empty object or array stays on one line.
                if let Some(close @ ('}' | ']')) = chars.peek().copied() {
                    out.push(close);
                    chars.next();
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{human_bytes, indent_json, render, Status};

    #[test]
    fn sizes_print_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(256 << 20), "256.0 MiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn json_is_indented_without_reordering_or_touching_strings() {
        let text = r#"{"node":{"name":"b","zone":null},"ready":true,"a":[],"x":{},
            "s":"a, b: {c} \"[d]\"","n":[1.50,2]}"#;
        let pretty = indent_json(text);
        assert_eq!(
            pretty,
            "{\n  \"node\": {\n    \"name\": \"b\",\n    \"zone\": null\n  },\n  \
             \"ready\": true,\n  \"a\": [],\n  \"x\": {},\n  \
             \"s\": \"a, b: {c} \\\"[d]\\\"\",\n  \"n\": [\n    1.50,\n    2\n  ]\n}"
        );
        let before: serde_json::Value = serde_json::from_str(text).expect("valid");
        let after: serde_json::Value = serde_json::from_str(&pretty).expect("still valid");
        assert_eq!(before, after);
    }

    fn summary(doc: serde_json::Value) -> String {
        render(&serde_json::from_value::<Status>(doc).expect("a status document"))
    }

    #[test]
    fn the_summary_shows_members_upstreams_and_the_hit_ratio() {
        let text = summary(serde_json::json!({
            "node": {"name": "pier-a", "zone": "eu-1", "version": "0.2.0"},
            "ready": true,
            "not_ready_reasons": [],
            "members": [
                {"name": "pier-a", "address": "10.0.0.1:5001", "zone": "eu-1", "state": "alive",
                 "since": "2026-12-02T01:02:03.456Z", "generation": 1},
                {"name": "pier-b", "address": "10.0.0.2:5001", "zone": null, "state": "suspect",
                 "since": "2026-12-02T01:05:00.000Z", "generation": 2}
            ],
            "storage": {"free_bytes": 10u64 << 30, "min_free_bytes": 256u64 << 20, "writable": true},
            "cache": {"bytes": 3u64 << 20, "blobs": 7,
                      "served_bytes": {"local": 6u64 << 30, "peer": 3u64 << 30, "upstream": 1u64 << 30}},
            "upstreams": [{"name": "docker.io", "endpoints": [
                {"url": "https://registry-1.docker.io", "healthy": true},
                {"url": "https://mirror.gcr.io", "healthy": false}]}],
            "later_section": {"anything": [1, 2]}
        }));
        assert!(text.contains("pier-a, zone eu-1, pier 0.2.0"), "{text}");
        assert!(text.contains("ready      yes"), "{text}");
        assert!(
            text.contains("10.0 GiB free (keeps 256.0 MiB free), writable"),
            "{text}"
        );
        assert!(text.contains("3.0 MiB in 7 blobs"), "{text}");
        assert!(text.contains("90.0 % by bytes"), "{text}");
        assert!(
            text.contains("NAME    ADDRESS        ZONE  STATE    SINCE"),
            "{text}"
        );
        assert!(
            text.contains("pier-b  10.0.0.2:5001  -     suspect  2026-12-02T01:05:00.000Z"),
            "{text}"
        );
        assert!(
            text.contains("https://mirror.gcr.io         UNHEALTHY"),
            "{text}"
        );
    }

    #[test]
    fn a_sparse_document_still_gets_a_summary_with_the_reasons() {
        let text = summary(serde_json::json!({
            "node": {"name": "old-node"},
            "ready": false,
            "not_ready_reasons": ["disk: 1 MiB free, below min_free_space 256 MiB"],
            "cache": {"bytes": 0, "served_bytes": {"local": 0}}
        }));
        assert!(text.starts_with("node       old-node\n"), "{text}");
        assert!(
            text.contains("ready      no\n           - disk: 1 MiB free"),
            "{text}"
        );
        assert!(text.contains("- (nothing served yet)"), "{text}");
        assert!(
            !text.contains("NAME"),
            "no members table without members: {text}"
        );
    }
}
