//! The sync API: `GET /api/v1/sync/jobs` (every job as a status row, the JSON
//! `pier sync status --json` prints), `POST /api/v1/sync/retry` (failed jobs queued again: one
//! by `{"id": N}`, or all with `{"failed": true}`; a failed import is not, its file being
//! in the watched folder's `failed/` or never kept) and `POST /api/v1/sync/run/{name}` (a rule
//! run now), and `GET /api/v1/sync/pins` (what pull rules keep from eviction). `pier sync` is
//! the client.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use pier_oci::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::AppState;

type Result<T> = std::result::Result<T, ApiError>;

/// The answer of `GET /api/v1/sync/jobs`.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobsAnswer {
    pub jobs: Vec<pier_sync::JobRow>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RetryRequest {
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub failed: bool,
}

/// The answer of a retry or a run: how many jobs were queued.
#[derive(Debug, Serialize, Deserialize)]
pub struct Queued {
    pub queued: usize,
}

fn engine(state: &AppState) -> Result<&std::sync::Arc<pier_sync::SyncEngine>> {
    state.sync.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "this node runs no job queue",
        )
    })
}

pub async fn jobs(State(state): State<AppState>) -> Result<Json<JobsAnswer>> {
    let jobs = engine(&state)?.jobs().await?;
    Ok(Json(JobsAnswer { jobs }))
}

/// The answer of `GET /api/v1/sync/pins`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PinsAnswer {
    pub pins: Vec<pier_store::Pin>,
}

pub async fn pins(State(state): State<AppState>) -> Result<Json<PinsAnswer>> {
    let pins = engine(&state)?.pins().await?;
    Ok(Json(PinsAnswer { pins }))
}

pub async fn retry(
    State(state): State<AppState>,
    body: Option<Json<RetryRequest>>,
) -> Result<Json<Queued>> {
    let req = body.map(|Json(r)| r).unwrap_or_default();
    let id = match (req.id, req.failed) {
        (Some(id), false) => Some(id),
        (None, true) => None,
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::Unsupported,
                "give either {\"id\": N} or {\"failed\": true}",
            ))
        }
    };
    let engine = engine(&state)?;
    let store = engine.runner().store();
    let queued = match id {
        Some(id) => {
            if let Some(why) = store
                .job(id)
                .await?
                .and_then(|j| crate::import::job::not_retryable(&j))
            {
                return Err(ApiError::new(StatusCode::CONFLICT, ErrorCode::Denied, why));
            }
            engine.retry(Some(id)).await?
        }
        None => {
            // Every failed job but imports, whose files the queue no longer has.
            let mut queued = 0;
            for job in store.jobs().await? {
                if job.state == pier_store::JobState::Failed
                    && crate::import::job::not_retryable(&job).is_none()
                {
                    queued += engine.retry(Some(job.id)).await?;
                }
            }
            queued
        }
    };
    Ok(Json(Queued { queued }))
}

pub async fn run(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Queued>> {
    let queued = engine(&state)?.run(&name).await?;
    Ok(Json(Queued { queued }))
}
