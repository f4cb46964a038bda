//! pier's durable job queue: what background work is owed (replicating pushed content to its
//! cluster owners, later syncs, remote replication and imports), its state, and its history.
//!
//! One queue holds every kind of job. A job is keyed by what must be done (its dedupe `key`),
//! carries a JSON payload its handler understands, and remembers its attempts, last error and
//! when it may next run. [`JobStore`] is the storage (implemented by
//! [`RedbMetaStore`](crate::RedbMetaStore)); [`runner::JobRunner`] takes due jobs, runs them
//! through the handler registered for their kind, and retries failures with backoff.
//!
//! Architecture invariant: the queue knows what a job's state is, never what a job does;
//! handlers (which may talk to peers or upstreams) live in the layers above.

pub mod runner;

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::Result;

pub use runner::{Clock, JobFailure, JobHandler, JobRunner, RetryPolicy, RunnerConfig};

/// One unit of background work and what has happened to it so far.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    /// Assigned at enqueue, increasing; never reused.
    pub id: u64,
    /// Chooses the handler: `replicate-blob`, `replicate-manifest`, later `sync`, `import`…
    pub kind: String,
    /// What must be done, e.g. `blob:<repo>@<digest>->node-b`: at most one job per key is
    /// active at a time.
    pub key: String,
    pub payload: serde_json::Value,
    pub state: JobState,
    /// Attempts that ran to an outcome (a crash mid-attempt does not count one).
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Unix milliseconds of the next attempt, for queued and retrying jobs.
    pub next_at_ms: u64,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// Where a job is in its life. The names are what status pages and the CLI show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    /// Failed an attempt and will run again at `next_at_ms`.
    Retrying,
    /// Gave up: a permanent failure, or out of attempts. Only an explicit retry revives it.
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Retrying => "retrying",
            JobState::Failed => "failed",
        }
    }

    /// Whether the job still has work ahead of it; a second enqueue of its key is the same job.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            JobState::Queued | JobState::Running | JobState::Retrying
        )
    }

    /// Whether the job waits for its `next_at_ms` to run.
    pub fn is_waiting(self) -> bool {
        matches!(self, JobState::Queued | JobState::Retrying)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Storage of the job queue. Every change is durable when the call returns.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Add a job unless one with the same key is queued, running or retrying (then return
    /// that one's id). A failed or succeeded job with the key is replaced by a fresh queued
    /// job, due now.
    async fn enqueue(&self, kind: &str, key: &str, payload: serde_json::Value) -> Result<u64>;

    /// Add a job its caller does itself (an import, whose bytes only the caller has): it is
    /// running from the start, so the runner takes it only once it is made due again (a
    /// retry, or a restart that found it running). `None` when a job with the key is still
    /// queued, running or retrying. Unlike [`enqueue`](Self::enqueue), an earlier job with the
    /// key that is over stays as history.
    async fn record(
        &self,
        kind: &str,
        key: &str,
        payload: serde_json::Value,
    ) -> Result<Option<u64>>;

    async fn job(&self, id: u64) -> Result<Option<Job>>;

    /// Every job, by id.
    async fn jobs(&self) -> Result<Vec<Job>>;

    /// Up to `limit` queued or retrying jobs whose `next_at_ms` is at most `now_ms`, the
    /// longest-due first.
    async fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<Job>>;

    /// The earliest `next_at_ms` of any queued or retrying job: when the queue has work next.
    async fn next_due(&self) -> Result<Option<u64>>;

    /// Record a job's new state, attempts, error, times and payload. Its id, kind, key and
    /// creation time are fixed at enqueue; a job that does not exist is
    /// [`StoreError::JobUnknown`](crate::StoreError::JobUnknown).
    async fn update(&self, job: &Job) -> Result<()>;

    /// Make failed jobs (all, or the one with `id`) queued again, due now, with their attempts
    /// counted afresh; returns how many.
    async fn retry(&self, id: Option<u64>) -> Result<usize>;

    /// Remove succeeded jobs beyond the newest `keep`, and those last updated before
    /// `before_ms` (0: no age limit), so history stays bounded; returns how many went.
    async fn prune_succeeded(&self, keep: usize, before_ms: u64) -> Result<usize>;

    /// Make jobs left running by a process that stopped mid-attempt queued again, due now;
    /// returns how many. Called once at start, before any job runs.
    async fn recover(&self) -> Result<usize>;
}

/// The wall clock in unix milliseconds: what the store writes into job times.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{RedbMetaStore, StoreError};

    async fn set_state(store: &RedbMetaStore, id: u64, state: JobState) -> Job {
        let mut job = store.job(id).await.unwrap().unwrap();
        job.state = state;
        store.update(&job).await.unwrap();
        job
    }

    #[tokio::test]
    async fn the_queue_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let before = {
            let store = RedbMetaStore::open(&path).unwrap();
            let a = store
                .enqueue("replicate-blob", "blob:a->n1", json!({"repo": "a"}))
                .await
                .unwrap();
            store
                .enqueue("replicate-blob", "blob:b->n1", json!({"repo": "b"}))
                .await
                .unwrap();
            let c = store
                .enqueue("sync", "sync:nightly", json!(null))
                .await
                .unwrap();
            let mut job = store.job(a).await.unwrap().unwrap();
            job.state = JobState::Retrying;
            job.attempts = 2;
            job.last_error = Some("peer n1 refused".into());
            job.next_at_ms = unix_ms() + 3_600_000;
            store.update(&job).await.unwrap();
            set_state(&store, c, JobState::Failed).await;
            store.jobs().await.unwrap()
        };

        let store = RedbMetaStore::open(&path).unwrap();
        let after = store.jobs().await.unwrap();
        assert_eq!(after, before);
        assert_eq!(after[0].last_error.as_deref(), Some("peer n1 refused"));
        // Only the queued job is due; the retrying one waits for its hour.
        let due = store.due(unix_ms(), 10).await.unwrap();
        assert_eq!(
            due.iter().map(|j| j.key.as_str()).collect::<Vec<_>>(),
            ["blob:b->n1"]
        );
        assert_eq!(store.next_due().await.unwrap(), Some(due[0].next_at_ms));
        // Ids keep increasing across the reopen.
        let d = store
            .enqueue("sync", "sync:other", json!(null))
            .await
            .unwrap();
        assert_eq!(d, 4);
    }

    #[tokio::test]
    async fn one_active_job_per_key() {
        let store = RedbMetaStore::in_memory().unwrap();
        let k = "blob:team/app@sha256:ab->node-b";
        let first = store.enqueue("replicate-blob", k, json!(1)).await.unwrap();
        assert_eq!(
            store.enqueue("replicate-blob", k, json!(2)).await.unwrap(),
            first
        );
        for state in [JobState::Running, JobState::Retrying] {
            set_state(&store, first, state).await;
            assert_eq!(
                store.enqueue("replicate-blob", k, json!(3)).await.unwrap(),
                first,
                "a second job while the first is {state}"
            );
        }
        assert_eq!(store.jobs().await.unwrap().len(), 1);
        assert_eq!(
            store.job(first).await.unwrap().unwrap().payload,
            json!(1),
            "the first payload stands"
        );

        // Once the job is over, the same work can be asked for again: a fresh job replaces it.
        let mut last = first;
        for state in [JobState::Succeeded, JobState::Failed] {
            set_state(&store, last, state).await;
            let next = store.enqueue("replicate-blob", k, json!(4)).await.unwrap();
            assert!(next > last);
            let jobs = store.jobs().await.unwrap();
            assert_eq!(jobs.len(), 1, "{state} job replaced");
            assert_eq!(jobs[0].id, next);
            assert_eq!(jobs[0].state, JobState::Queued);
            assert_eq!(jobs[0].attempts, 0);
            last = next;
        }
        // Another key is another job.
        let other = store
            .enqueue("replicate-blob", "blob:x->node-c", json!(5))
            .await
            .unwrap();
        assert_ne!(other, last);
    }

    #[tokio::test]
    async fn a_recorded_job_runs_where_it_was_recorded_and_stays_as_history() {
        let store = RedbMetaStore::in_memory().unwrap();
        let k = "import /in/app.tar";
        let first = store
            .record("import", k, json!({"file": "app.tar"}))
            .await
            .unwrap()
            .expect("a new job");
        let job = store.job(first).await.unwrap().unwrap();
        assert_eq!((job.state, job.attempts), (JobState::Running, 0));
        assert!(store.due(unix_ms(), 10).await.unwrap().is_empty());
        assert_eq!(store.next_due().await.unwrap(), None);
        // While it runs, the same work is not recorded twice.
        assert_eq!(store.record("import", k, json!(null)).await.unwrap(), None);

        set_state(&store, first, JobState::Failed).await;
        let second = store
            .record("import", k, json!({"file": "app.tar"}))
            .await
            .unwrap()
            .expect("a new job once the first is over");
        assert!(second > first);
        let states: Vec<(u64, JobState)> = store
            .jobs()
            .await
            .unwrap()
            .iter()
            .map(|j| (j.id, j.state))
            .collect();
        assert_eq!(
            states,
            [(first, JobState::Failed), (second, JobState::Running)],
            "the earlier job is history, not replaced"
        );
        // A stop mid-import leaves it running: the next start makes it due.
        assert_eq!(store.recover().await.unwrap(), 1);
        assert_eq!(store.due(unix_ms(), 10).await.unwrap()[0].id, second);
    }

    #[tokio::test]
    async fn due_returns_waiting_jobs_in_time_order() {
        let store = RedbMetaStore::in_memory().unwrap();
        let now = unix_ms();
        let mut ids = Vec::new();
        for (i, offset) in [30_000u64, 0, 10_000, 20_000].iter().enumerate() {
            let id = store
                .enqueue("k", &format!("key-{i}"), json!(null))
                .await
                .unwrap();
            let mut job = store.job(id).await.unwrap().unwrap();
            job.state = JobState::Retrying;
            job.next_at_ms = now + offset;
            store.update(&job).await.unwrap();
            ids.push(id);
        }
        let running = store.enqueue("k", "running", json!(null)).await.unwrap();
        set_state(&store, running, JobState::Running).await;

        let keys = |jobs: Vec<Job>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
        assert_eq!(
            keys(store.due(now + 15_000, 10).await.unwrap()),
            [ids[1], ids[2]]
        );
        assert_eq!(
            keys(store.due(now + 60_000, 10).await.unwrap()),
            [ids[1], ids[2], ids[3], ids[0]]
        );
        assert_eq!(keys(store.due(now + 60_000, 1).await.unwrap()), [ids[1]]);
        assert_eq!(store.next_due().await.unwrap(), Some(now));
    }

    #[tokio::test]
    async fn retry_revives_failed_jobs() {
        let store = RedbMetaStore::in_memory().unwrap();
        let mut failed = Vec::new();
        for i in 0..3 {
            let id = store
                .enqueue("import", &format!("import:{i}"), json!(null))
                .await
                .unwrap();
            let mut job = store.job(id).await.unwrap().unwrap();
            job.state = JobState::Failed;
            job.attempts = 5;
            job.last_error = Some("tarball truncated".into());
            store.update(&job).await.unwrap();
            failed.push(id);
        }
        let queued = store
            .enqueue("import", "import:q", json!(null))
            .await
            .unwrap();
        assert!(store.due(unix_ms(), 10).await.unwrap().len() == 1);

        assert_eq!(store.retry(Some(failed[1])).await.unwrap(), 1);
        let job = store.job(failed[1]).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Queued);
        assert_eq!(job.attempts, 0);
        assert_eq!(
            store.job(failed[0]).await.unwrap().unwrap().state,
            JobState::Failed
        );
        // A job that has not failed is left alone, and so is one that does not exist.
        assert_eq!(store.retry(Some(failed[1])).await.unwrap(), 0);
        assert_eq!(store.retry(Some(queued)).await.unwrap(), 0);
        assert_eq!(store.retry(Some(999)).await.unwrap(), 0);

        assert_eq!(store.retry(None).await.unwrap(), 2);
        let due = store.due(unix_ms(), 10).await.unwrap();
        assert_eq!(due.len(), 4);
        assert!(store
            .jobs()
            .await
            .unwrap()
            .iter()
            .all(|j| j.state == JobState::Queued));
        assert_eq!(store.retry(None).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn prune_keeps_the_newest_succeeded_jobs() {
        let store = RedbMetaStore::in_memory().unwrap();
        let mut ids = Vec::new();
        for i in 0..8 {
            ids.push(
                store
                    .enqueue("replicate-blob", &format!("b{i}"), json!(null))
                    .await
                    .unwrap(),
            );
        }
        for &id in &ids[..6] {
            set_state(&store, id, JobState::Succeeded).await;
        }
        set_state(&store, ids[6], JobState::Failed).await;

        assert_eq!(store.prune_succeeded(2, 0).await.unwrap(), 4);
        let left: Vec<(u64, JobState)> = store
            .jobs()
            .await
            .unwrap()
            .iter()
            .map(|j| (j.id, j.state))
            .collect();
        assert_eq!(
            left,
            [
                (ids[4], JobState::Succeeded),
                (ids[5], JobState::Succeeded),
                (ids[6], JobState::Failed),
                (ids[7], JobState::Queued),
            ]
        );
        assert_eq!(store.prune_succeeded(2, 0).await.unwrap(), 0);
        // Succeeded jobs older than the age limit go even when few are kept.
        let mut old = store.job(ids[4]).await.unwrap().unwrap();
        old.updated_ms = 1_000;
        store.update(&old).await.unwrap();
        assert_eq!(store.prune_succeeded(10, 2_000).await.unwrap(), 1);
        assert!(store.job(ids[4]).await.unwrap().is_none());
        assert!(store.job(ids[5]).await.unwrap().is_some());
        // A pruned job's key is free again.
        let again = store
            .enqueue("replicate-blob", "b0", json!(null))
            .await
            .unwrap();
        assert!(again > ids[7]);
    }

    #[tokio::test]
    async fn recover_makes_interrupted_jobs_due_again() {
        let store = RedbMetaStore::in_memory().unwrap();
        let a = store.enqueue("k", "a", json!(null)).await.unwrap();
        let b = store.enqueue("k", "b", json!(null)).await.unwrap();
        set_state(&store, a, JobState::Running).await;
        set_state(&store, b, JobState::Succeeded).await;
        assert!(store.due(unix_ms(), 10).await.unwrap().is_empty());

        assert_eq!(store.recover().await.unwrap(), 1);
        let due = store.due(unix_ms(), 10).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].id, a);
        assert_eq!(due[0].state, JobState::Queued);
        assert_eq!(store.recover().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn updating_a_missing_job_is_an_error() {
        let store = RedbMetaStore::in_memory().unwrap();
        let id = store.enqueue("k", "a", json!(null)).await.unwrap();
        let mut job = store.job(id).await.unwrap().unwrap();
        job.id = 77;
        let e = store.update(&job).await.unwrap_err();
        assert!(matches!(e, StoreError::JobUnknown(77)), "{e}");
    }

    #[test]
    fn states_have_the_names_users_see() {
        for (state, name) in [
            (JobState::Queued, "queued"),
            (JobState::Running, "running"),
            (JobState::Succeeded, "succeeded"),
            (JobState::Retrying, "retrying"),
            (JobState::Failed, "failed"),
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), json!(name));
            assert_eq!(state.to_string(), name);
        }
    }
}
