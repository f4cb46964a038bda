//! `POST /api/v1/gc[?dry_run=true]` (collect unreferenced blobs now, or say what that would
//! free) and `POST /api/v1/check[?deep=true]` (metadata against blobs, and with `deep` every
//! blob's digest, quarantining the corrupt). `pier gc` and `pier check` are their clients.
//!
//! The check streams newline-delimited JSON: a `plan` (blobs and bytes to verify), `progress`
//! events as blobs are verified, and a `report` whose `checks` are a list of named results,
//! each `pass`, `warn`, `fixed` or `fail`: the node's health first ([`crate::health`]), then
//! the stores'.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::Json;
use pier_registry::gc::CheckFindings;
use pier_registry::{GcOptions, GcReport, Untagged};
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::health::result;
pub use crate::health::CheckResult;
use crate::AppState;

/// Garbage-collection settings the API uses (`[gc]` in the configuration).
#[derive(Debug, Clone)]
pub struct GcSettings {
    /// Blobs younger than this are never collected.
    pub grace: Duration,
    /// Hosted manifests untagged (and stored) longer than this are removed first.
    pub untagged_after: Option<Duration>,
}

impl Default for GcSettings {
    fn default() -> Self {
        GcSettings {
            grace: Duration::from_secs(3600),
            untagged_after: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct GcQuery {
    #[serde(default)]
    pub dry_run: bool,
}

pub async fn gc(
    State(state): State<AppState>,
    Query(q): Query<GcQuery>,
) -> Result<Json<GcReport>, ApiError> {
    Ok(Json(collect(&state, q.dry_run).await?))
}

/// One collection as configured: untagged hosted manifests past `[gc] untagged_after` (when
/// set) pruned as it reads references, then unreferenced blobs; counted in the metrics unless
/// a dry run.
pub async fn collect(state: &AppState, dry_run: bool) -> pier_registry::Result<GcReport> {
    let hosted = |repo: &str| !is_cache_repo(state, repo);
    let untagged = state.gc.untagged_after.map(|older_than| Untagged {
        older_than,
        in_scope: &hosted,
    });
    let opts = GcOptions {
        dry_run,
        grace: state.gc.grace,
    };
    let report = state.registry.gc_with_retention(opts, untagged).await?;
    if !dry_run {
        state.metrics.gc_freed_bytes.inc_by(report.bytes);
        state.metrics.gc_freed_blobs.inc_by(report.blobs);
        state.metrics.gc_removed_manifests.inc_by(report.manifests);
    }
    Ok(report)
}

#[derive(Debug, Default, Deserialize)]
pub struct CheckQuery {
    #[serde(default)]
    pub deep: bool,
}

/// Whether a stored repository is a mirror's cache (`<upstream>/<name>`), whose missing
/// content the mirror fetches again, rather than hosted content, which only a push brings.
pub fn is_cache_repo(state: &AppState, repo: &str) -> bool {
    let Some(mirror) = &state.mirror else {
        return false;
    };
    if state
        .hosted
        .iter()
        .any(|g| pier_mirror::glob::matches(g, repo))
    {
        return false;
    }
    repo.split_once('/')
        .is_some_and(|(first, _)| mirror.has_upstream(first))
}

/// Turn what the registry found into named results.
pub fn results(state: &AppState, f: &CheckFindings, deep: bool) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let cache = |repo: &str| is_cache_repo(state, repo);

    let (lost, refetch): (Vec<_>, Vec<_>) = f
        .missing_links
        .iter()
        .chain(&f.wrong_size)
        .partition(|m| !cache(&m.repo));
    let details = |ms: &[&pier_registry::gc::Missing]| {
        ms.iter()
            .map(|m| format!("{}@{}: {}", m.repo, m.digest, m.detail))
            .collect::<Vec<_>>()
    };
    out.push(if !lost.is_empty() {
        result(
            "blob links",
            "fail",
            format!(
                "{} of {} linked blobs of hosted repositories have no (or wrong) bytes: lost",
                lost.len(),
                f.links
            ),
            details(&lost),
        )
    } else if !refetch.is_empty() {
        result(
            "blob links",
            "warn",
            format!(
                "{} linked blobs of mirrored repositories have no bytes; the mirror fetches \
                 them again when pulled",
                refetch.len()
            ),
            details(&refetch),
        )
    } else {
        result(
            "blob links",
            "pass",
            format!("{} links, every blob stored", f.links),
            Vec::new(),
        )
    });

    let (lost, lazy): (Vec<_>, Vec<_>) =
        f.unstored_references.iter().partition(|m| !cache(&m.repo));
    out.push(if !lost.is_empty() {
        result(
            "manifest references",
            "fail",
            format!(
                "{} references of hosted manifests name blobs that are not stored",
                lost.len()
            ),
            details(&lost),
        )
    } else if !lazy.is_empty() {
        // A mirror fetches what is pulled: this is its normal state, not a problem.
        // `lazy` holds one entry per reference: count the manifests they belong to (each
        // entry's detail names its manifest) so the count never exceeds the total.
        let manifests: std::collections::HashSet<(&str, &str)> = lazy
            .iter()
            .map(|m| (m.repo.as_str(), m.detail.as_str()))
            .collect();
        result(
            "manifest references",
            "pass",
            format!(
                "{} references of {} of {} manifests are not stored yet (mirrored images not \
                 pulled in full)",
                lazy.len(),
                manifests.len(),
                f.manifests
            ),
            Vec::new(),
        )
    } else {
        result(
            "manifest references",
            "pass",
            format!("{} manifests, every reference stored", f.manifests),
            Vec::new(),
        )
    });

    out.push(if f.unlinked_blobs > 0 {
        result(
            "unlinked blobs",
            "warn",
            format!(
                "{} stored blobs ({} bytes) no repository links; pier gc frees them",
                f.unlinked_blobs, f.unlinked_bytes
            ),
            Vec::new(),
        )
    } else {
        result(
            "unlinked blobs",
            "pass",
            format!("{} blobs, {} bytes, all linked", f.blobs, f.bytes),
            Vec::new(),
        )
    });

    if deep {
        let mut lost = Vec::new();
        let mut fixed = Vec::new();
        for q in &f.quarantined {
            let hosted: Vec<&String> = q.repos.iter().filter(|r| !cache(r)).collect();
            if hosted.is_empty() {
                fixed.push(format!(
                    "{} ({} bytes): quarantined; the mirror fetches it again",
                    q.digest, q.size
                ));
            } else {
                let manifests: Vec<String> = q
                    .manifests
                    .iter()
                    .filter(|(r, _)| !cache(r))
                    .map(|(r, m)| format!("{r}@{m}"))
                    .collect();
                lost.push(format!(
                    "{} ({} bytes): quarantined, LOST for {}; manifests that lost it: {}",
                    q.digest,
                    q.size,
                    hosted
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    if manifests.is_empty() {
                        "none".to_string()
                    } else {
                        manifests.join(", ")
                    }
                ));
            }
        }
        out.push(if !lost.is_empty() {
            let n = lost.len();
            lost.extend(fixed);
            result(
                "blob digests",
                "fail",
                format!("{n} corrupt blobs of hosted repositories were lost"),
                lost,
            )
        } else if !fixed.is_empty() {
            result(
                "blob digests",
                "fixed",
                format!("{} corrupt blobs quarantined", fixed.len()),
                fixed,
            )
        } else {
            result(
                "blob digests",
                "pass",
                format!("{} blobs verified", f.blobs),
                Vec::new(),
            )
        });
    }
    out
}

pub async fn check(State(state): State<AppState>, Query(q): Query<CheckQuery>) -> Response {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    let stats = state.registry.blob_store().stats();
    let _ = tx.send(
        json!({"event": "plan", "deep": q.deep, "blobs": stats.blobs,
        "bytes": stats.bytes}),
    );
    tokio::spawn(async move {
        // The node's health first: it takes a few seconds at most, the storage walk longer.
        let health = crate::health::checks(&state).await;
        let progress_tx = tx.clone();
        let progress = move |n: u64| {
            let _ = progress_tx.send(json!({"event": "progress", "bytes": n}));
        };
        let found = state.registry.check(q.deep, &progress).await;
        match found {
            Ok(f) => {
                for qd in &f.quarantined {
                    tracing::warn!(digest = %qd.digest, repos = ?qd.repos, "corrupt blob quarantined");
                }
                state
                    .metrics
                    .check_quarantined
                    .inc_by(f.quarantined.len() as u64);
                let mut checks = health;
                checks.extend(results(&state, &f, q.deep));
                let _ = tx.send(json!({"event": "report", "checks": checks}));
            }
            Err(e) => {
                let _ = tx.send(json!({"event": "error", "message": e.to_string()}));
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let v = rx.recv().await?;
        let mut line = v.to_string();
        line.push('\n');
        Some((Ok::<_, std::io::Error>(bytes::Bytes::from(line)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

/// Run a collection every `every`, until the process ends.
pub fn schedule(state: AppState, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = collect(&state, false).await {
                tracing::warn!(error = %e, "scheduled garbage collection failed");
            }
        }
    });
}
