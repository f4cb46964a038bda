//! The one error type of pier-bench: what stops a benchmark from starting or from reporting.
//!
//! A request that fails *during* a run is not an error here: it is counted in the report by kind
//! (`http_404`, `timeout`, …, see [`crate::stats::Failure`]), because failures under load are
//! part of what a benchmark measures.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Arguments that parse but do not make sense together.
    #[error("{0}")]
    Usage(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// Work done before the clock starts (pushing the image a `mixed` run pulls) failed.
    #[error("preparing the run: {0}")]
    Setup(String),
    #[error("interrupted before the run started")]
    Interrupted,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a pier bench JSON report: {source}")]
    BadReport {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode the report: {0}")]
    Encode(#[source] serde_json::Error),
    /// The run happened but measured nothing: every operation failed (the report, printed
    /// before this, says how). A script running a benchmark must not take it for a result.
    #[error("all {operations} operations failed ({kinds}); the numbers above measure errors, not the registry")]
    AllFailed { operations: u64, kinds: String },
}
