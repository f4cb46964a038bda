//! The web dashboard at `/ui/`: three files embedded in the binary (no CDN, no build step),
//! which poll `/api/v1/status`, `/api/v1/sync/jobs` and `/api/v1/errors` every two seconds and
//! draw what they say. Its only action is the retry of a failed job
//! (`POST /api/v1/sync/retry`). The recent-errors ring it reads is kept here too.

use std::collections::VecDeque;
use std::sync::Mutex;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use serde::Serialize;

use crate::AppState;

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/app.css");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            // Everything the page loads comes from this node.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

pub async fn redirect() -> Redirect {
    Redirect::permanent("/ui/")
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// How many recent errors are kept.
const KEEP: usize = 50;

/// One server-side failure (a 5xx answer) as the dashboard lists it.
#[derive(Debug, Clone, Serialize)]
pub struct RecentError {
    /// RFC 3339, UTC.
    pub at: String,
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// The last [`KEEP`] 5xx answers, newest first.
#[derive(Debug, Default)]
pub struct RecentErrors(Mutex<VecDeque<RecentError>>);

impl RecentErrors {
    pub fn record(&self, method: &str, path: &str, status: u16) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == KEEP {
            q.pop_back();
        }
        q.push_front(RecentError {
            at: crate::status::rfc3339(std::time::SystemTime::now()),
            method: method.to_string(),
            path: path.to_string(),
            status,
        });
    }

    pub fn list(&self) -> Vec<RecentError> {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().cloned().collect()
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorsAnswer {
    pub errors: Vec<RecentError>,
}

/// `GET /api/v1/errors`: the recent 5xx answers of the registry API, newest first.
pub async fn errors(State(state): State<AppState>) -> Json<ErrorsAnswer> {
    Json(ErrorsAnswer {
        errors: state.recent_errors.list(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_errors_keep_the_newest_fifty() {
        let r = RecentErrors::default();
        for i in 0..60 {
            r.record("GET", &format!("/v2/a/blobs/{i}"), 502);
        }
        let l = r.list();
        assert_eq!(l.len(), KEEP);
        assert_eq!(l[0].path, "/v2/a/blobs/59");
        assert_eq!(l[KEEP - 1].path, "/v2/a/blobs/10");
    }
}
