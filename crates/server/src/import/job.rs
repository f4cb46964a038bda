//! Imports as rows of the job queue (kind `import`): every file the watched folder takes and
//! every `POST /api/v1/import` is a job, so `pier sync status`, `GET /api/v1/sync/jobs` and
//! the dashboard show each archive's fate beside the sync and replication jobs.
//!
//! The first attempt runs where the bytes are: the watched folder's loop (one file at a time,
//! as before) or the request that streams the upload. It is recorded running
//! ([`JobStore::record`](pier_store::JobStore::record)) and moved to succeeded or failed by the
//! code that did it. What comes after is the queue's, like any job: a watched file that met a
//! store failure is left `retrying`, and the watched folder's handler
//! ([`super::watch::ImportJobs`]) imports it again when it is due; so is a job a stop
//! interrupted. An upload is not kept, so nothing can run it again. This module only keeps
//! the rows: it knows nothing of the folder.

use std::sync::atomic::{AtomicU64, Ordering};

use pier_store::jobs::{unix_ms, Job, JobState};
use serde::{Deserialize, Serialize};

use super::{ImportReport, Outcome};
use crate::AppState;

/// The kind of job an import is.
pub const KIND: &str = "import";

/// What an import job carries, and what the import found.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImportPayload {
    /// The file's name (`upload` for a body sent without one).
    pub file: String,
    /// Where a watched file was when it was taken; absent for an upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The images it made visible (or, for a duplicate, had made), `repo:tag`.
    #[serde(default)]
    pub images: Vec<String>,
    /// sha256 of the file as received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// `imported`, `duplicate`, `failed` or `retry`, once an attempt is over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// For a duplicate, the name the file had when it was first imported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<String>,
}

impl ImportPayload {
    pub fn of(job: &Job) -> ImportPayload {
        serde_json::from_value(job.payload.clone()).unwrap_or_default()
    }

    pub fn fill(&mut self, report: &ImportReport) {
        self.result = Some(report.result.as_str().to_string());
        if report.digest.is_some() {
            self.digest = report.digest.clone();
        }
        self.images = report.images.iter().map(|i| i.name.clone()).collect();
        self.duplicate_of = report.duplicate_of.clone();
    }
}

/// The job key of a watched file: one job at a time per path.
pub fn watched_key(path: &std::path::Path) -> String {
    format!("{KIND} {}", path.display())
}

/// A key of its own for every upload: two uploads of the same name are two jobs.
pub fn upload_key(file: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{KIND} upload {} {}-{n}", file, unix_ms())
}

/// How recording the start of an import went.
pub enum Begun {
    /// The row that stands for this import.
    Row(u64),
    /// A job for the same file is still queued, running or retrying: it is that job's file.
    Busy,
    /// No row: this node has no job queue, or it could not be written (the import goes ahead
    /// all the same, as it would without the queue).
    NoRow,
}

/// Record an import as a running job.
pub async fn begin(state: &AppState, key: &str, payload: &ImportPayload) -> Begun {
    let Some(runner) = &state.import.jobs else {
        return Begun::NoRow;
    };
    let value = serde_json::to_value(payload).unwrap_or_default();
    match runner.store().record(KIND, key, value).await {
        Ok(Some(id)) => Begun::Row(id),
        Ok(None) => Begun::Busy,
        Err(e) => {
            tracing::warn!(file = %payload.file, error = %e, "recording the import as a job failed");
            Begun::NoRow
        }
    }
}

/// Record the outcome of an import's first attempt in its row: succeeded (imported, or a
/// duplicate), failed, or, for a store failure, retrying at `retry_at` when something will
/// import it again (`None`: failed).
pub async fn end(state: &AppState, id: u64, report: &ImportReport, retry_at: Option<u64>) {
    let Some(runner) = &state.import.jobs else {
        return;
    };
    let store = runner.store();
    let mut job = match store.job(id).await {
        Ok(Some(job)) => job,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(id, error = %e, "reading the import job failed");
            return;
        }
    };
    let mut payload = ImportPayload::of(&job);
    payload.fill(report);
    job.payload = serde_json::to_value(&payload).unwrap_or_default();
    let now = unix_ms();
    job.attempts = job.attempts.saturating_add(1);
    job.updated_ms = now;
    job.last_error = report.error.clone();
    job.state = match (report.result, retry_at) {
        (Outcome::Imported | Outcome::Duplicate, _) => JobState::Succeeded,
        (Outcome::Retry, Some(at)) => {
            job.next_at_ms = at;
            JobState::Retrying
        }
        (Outcome::Failed | Outcome::Retry, _) => JobState::Failed,
    };
    if let Err(e) = store.update(&job).await {
        tracing::warn!(id, error = %e, "recording the outcome of the import job failed");
    }
    if job.state == JobState::Retrying {
        runner.wake();
    }
}

/// Why a failed import is not queued again by `pier sync retry`, or `None` for another job.
pub fn not_retryable(job: &Job) -> Option<String> {
    if job.kind != KIND {
        return None;
    }
    let payload = ImportPayload::of(job);
    Some(match payload.path {
        Some(_) => format!(
            "job {} is the import of {}, which is in the watched folder's failed/ now: move it \
             back into the folder to import it again",
            job.id, payload.file
        ),
        None => format!(
            "job {} is the import of an upload ({}), which is not kept: send the file again \
             (pier import FILE)",
            job.id, payload.file
        ),
    })
}
