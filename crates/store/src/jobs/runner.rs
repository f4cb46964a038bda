//! The job runner: one tokio task that takes due jobs from a [`JobStore`], runs each through
//! the [`JobHandler`] registered for its kind (at most `concurrency` at once), and records the
//! outcome: succeeded, retrying after a backoff that doubles per failure up to a cap, or failed.
//!
//! A job is marked running (durably) before its handler starts, so a crash mid-attempt leaves
//! it running in the store, and [`JobStore::recover`] at the next start makes it due again.
//! Each attempt runs in its own task: a handler that panics fails that attempt (retryably),
//! never the runner.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::{unix_ms, Job, JobState, JobStore};
use crate::Result;

/// Does the jobs of one kind.
#[async_trait]
pub trait JobHandler: Send + Sync {
    /// Do the job. `Ok` means it succeeded; a [`JobFailure`] says whether to try again later
    /// (with backoff) or give up now.
    async fn run(&self, job: &Job) -> std::result::Result<(), JobFailure>;

    /// How a failing `job` is retried, when its kind says (a sync rule's own retry settings);
    /// `None` takes the runner's.
    fn retry_policy(&self, _job: &Job) -> Option<RetryPolicy> {
        None
    }
}

/// Backoff and attempts for a failing job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The wait after the first failure; it doubles with each further failure.
    pub first_delay: Duration,
    /// The longest wait between attempts.
    pub max_delay: Duration,
    /// Attempts before a job that keeps failing is failed for good; 0 retries forever.
    pub max_attempts: u32,
}

/// Why an attempt failed, and whether another attempt may succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    pub message: String,
    pub retry: bool,
}

impl JobFailure {
    /// A failure that may pass: a peer down, a timeout, a full disk.
    pub fn retry(message: impl Into<String>) -> JobFailure {
        JobFailure {
            message: message.into(),
            retry: true,
        }
    }

    /// A failure no retry can fix: the content is gone, the request is malformed.
    pub fn fatal(message: impl Into<String>) -> JobFailure {
        JobFailure {
            message: message.into(),
            retry: false,
        }
    }
}

impl std::fmt::Display for JobFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// How the runner paces work.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Jobs running at once.
    pub concurrency: usize,
    /// The wait after a job's first failure; it doubles with each further failure.
    pub first_delay: Duration,
    /// The longest wait between attempts.
    pub max_delay: Duration,
    /// Attempts before a job that keeps failing is failed for good; 0 retries forever.
    pub max_attempts: u32,
    /// Succeeded jobs kept as history; older ones are pruned.
    pub keep_succeeded: usize,
    /// How long a succeeded job is kept as history at most (`None`: only `keep_succeeded`
    /// bounds it).
    pub keep_succeeded_for: Option<Duration>,
}

impl RunnerConfig {
    fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            first_delay: self.first_delay,
            max_delay: self.max_delay,
            max_attempts: self.max_attempts,
        }
    }
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            concurrency: 4,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            max_attempts: 0,
            keep_succeeded: 1000,
            keep_succeeded_for: None,
        }
    }
}

/// The runner's notion of now, in unix milliseconds. The wall clock in production; tests pass
/// one that follows tokio's paused clock, so that backoff can be observed without waiting.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Successes between two prunes of the history.
const PRUNE_EVERY: usize = 100;

/// How often history is pruned by age when nothing else prunes it.
const PRUNE_PERIOD: Duration = Duration::from_secs(60);

/// How long the loop waits before asking the store again after it failed.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// Runs the queue. Create it, register a handler per kind, then [`start`](JobRunner::start).
pub struct JobRunner {
    store: Arc<dyn JobStore>,
    cfg: RunnerConfig,
    clock: Clock,
    handlers: RwLock<HashMap<String, Arc<dyn JobHandler>>>,
    /// Jobs taken by the loop and not yet recorded as over; a job is never run twice at once.
    busy: Mutex<HashSet<u64>>,
    permits: Arc<Semaphore>,
    wake: Notify,
    stop: watch::Sender<bool>,
    succeeded_since_prune: AtomicUsize,
    started: AtomicBool,
}

impl JobRunner {
    pub fn new(store: Arc<dyn JobStore>, cfg: RunnerConfig) -> Arc<JobRunner> {
        Self::with_clock(store, cfg, Arc::new(unix_ms))
    }

    /// A runner whose "now" comes from `clock` (unix milliseconds).
    pub fn with_clock(store: Arc<dyn JobStore>, cfg: RunnerConfig, clock: Clock) -> Arc<JobRunner> {
        let cfg = RunnerConfig {
            concurrency: cfg.concurrency.max(1),
            ..cfg
        };
        Arc::new(JobRunner {
            store,
            permits: Arc::new(Semaphore::new(cfg.concurrency)),
            cfg,
            clock,
            handlers: RwLock::new(HashMap::new()),
            busy: Mutex::new(HashSet::new()),
            wake: Notify::new(),
            stop: watch::Sender::new(false),
            succeeded_since_prune: AtomicUsize::new(0),
            started: AtomicBool::new(false),
        })
    }

    /// Route jobs of `kind` to `handler`. Register every kind before [`start`](Self::start):
    /// a due job whose kind has no handler is failed.
    pub fn register(&self, kind: &str, handler: Arc<dyn JobHandler>) {
        self.handlers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(kind.to_string(), handler);
    }

    /// Queue a job (see [`JobStore::enqueue`] for the dedupe by key) and wake the loop.
    pub async fn enqueue(&self, kind: &str, key: &str, payload: serde_json::Value) -> Result<u64> {
        let id = self.store.enqueue(kind, key, payload).await?;
        self.wake();
        Ok(id)
    }

    /// Queue failed jobs again (see [`JobStore::retry`]) and wake the loop.
    pub async fn retry(&self, id: Option<u64>) -> Result<usize> {
        let n = self.store.retry(id).await?;
        self.wake();
        Ok(n)
    }

    /// The store the runner works from, for status pages.
    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.store
    }

    /// Start the loop. It first makes jobs a crash left running due again, then runs jobs
    /// until [`shutdown`](Self::shutdown); the handle resolves once the jobs running then have
    /// finished (a caller that cannot wait that long drops it: those jobs are recovered at the
    /// next start). Only the first call starts a loop: a second one would recover the first
    /// one's running jobs as interrupted.
    pub fn start(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        if self.started.swap(true, Ordering::SeqCst) {
            tracing::warn!("the job runner is already started");
            return tokio::spawn(async {});
        }
        let me = self.clone();
        tokio::spawn(async move { me.run_loop().await }.instrument(tracing::info_span!("jobs")))
    }

    /// Stop taking jobs.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// Look for due jobs now (after something was queued behind the runner's back).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn now(&self) -> u64 {
        (self.clock)()
    }

    async fn run_loop(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        match self.store.recover().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "jobs interrupted by a stop are queued again"),
            Err(e) => tracing::warn!(error = %e, "could not recover interrupted jobs"),
        }
        self.prune().await;
        let mut pruned_at = tokio::time::Instant::now();
        loop {
            if *stop.borrow_and_update() {
                break;
            }
            // History kept for a while also ends by age, not only by count.
            if self.cfg.keep_succeeded_for.is_some() && pruned_at.elapsed() >= PRUNE_PERIOD {
                self.prune().await;
                pruned_at = tokio::time::Instant::now();
            }
            let next = match self.dispatch().await {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!(error = %e, "the job queue could not be read");
                    Some(self.now() + STORE_RETRY.as_millis() as u64)
                }
            };
            let mut wait = next.map(|at| Duration::from_millis(at.saturating_sub(self.now())));
            if self.cfg.keep_succeeded_for.is_some() {
                wait = Some(wait.map_or(PRUNE_PERIOD, |w| w.min(PRUNE_PERIOD)));
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
                _ = stop.changed() => {}
            }
        }
        // Every running job holds a permit until its outcome is recorded.
        let all = u32::try_from(self.cfg.concurrency).unwrap_or(u32::MAX);
        drop(self.permits.acquire_many(all).await);
        self.prune().await;
    }

    /// Start every due job there is a permit for. Returns when the loop should look again:
    /// the earliest next attempt among waiting jobs, or `None` to wait for a wake (nothing is
    /// waiting, or every permit is taken and a finishing job will wake the loop).
    async fn dispatch(self: &Arc<Self>) -> Result<Option<u64>> {
        loop {
            let free = self.permits.available_permits();
            if free == 0 {
                return Ok(None);
            }
            let due = self.store.due(self.now(), free).await?;
            if due.is_empty() {
                return self.store.next_due().await;
            }
            let mut taken = 0;
            for job in due {
                let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                    break;
                };
                if !self.lock_busy().insert(job.id) {
                    continue;
                }
                let id = job.id;
                if let Err(e) = self.begin(job, permit).await {
                    self.lock_busy().remove(&id);
                    return Err(e);
                }
                taken += 1;
            }
            if taken == 0 {
                // Everything due is already running (someone re-queued a job behind the
                // runner's back): asking again now would spin; its end wakes the loop.
                return Ok(None);
            }
        }
    }

    fn lock_busy(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mark `job` running and spawn its attempt, or fail it if no handler knows its kind.
    async fn begin(self: &Arc<Self>, mut job: Job, permit: OwnedSemaphorePermit) -> Result<()> {
        let handler = self
            .handlers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&job.kind)
            .cloned();
        job.updated_ms = self.now();
        let Some(handler) = handler else {
            tracing::warn!(id = job.id, kind = %job.kind, "no handler for this kind of job");
            job.state = JobState::Failed;
            job.last_error = Some(format!("no handler for jobs of kind \"{}\"", job.kind));
            self.store.update(&job).await?;
            self.lock_busy().remove(&job.id);
            return Ok(());
        };
        job.state = JobState::Running;
        self.store.update(&job).await?;
        let policy = handler
            .retry_policy(&job)
            .unwrap_or_else(|| self.cfg.policy());

        let span = tracing::info_span!("job", id = job.id, kind = %job.kind, key = %job.key);
        let me = self.clone();
        tokio::spawn(
            async move {
                let attempt = {
                    let job = job.clone();
                    tokio::spawn(async move { handler.run(&job).await })
                };
                let outcome = match attempt.await {
                    Ok(outcome) => outcome,
                    Err(e) => Err(JobFailure::retry(join_error_message(e))),
                };
                let id = job.id;
                me.finish(job, outcome, policy).await;
                me.lock_busy().remove(&id);
                drop(permit);
                me.wake();
            }
            .instrument(span),
        );
        Ok(())
    }

    /// Record the outcome of an attempt.
    async fn finish(
        &self,
        mut job: Job,
        outcome: std::result::Result<(), JobFailure>,
        policy: RetryPolicy,
    ) {
        let now = self.now();
        // A handler may have written what it found into the payload while it ran (an
        // import's images); the outcome keeps that, not the payload it was handed.
        if let Ok(Some(stored)) = self.store.job(job.id).await {
            job.payload = stored.payload;
        }
        job.attempts = job.attempts.saturating_add(1);
        job.updated_ms = now;
        let succeeded = outcome.is_ok();
        match outcome {
            Ok(()) => {
                tracing::debug!(attempts = job.attempts, "job succeeded");
                job.state = JobState::Succeeded;
                job.last_error = None;
            }
            Err(f) => {
                let out_of_attempts =
                    policy.max_attempts != 0 && job.attempts >= policy.max_attempts;
                if f.retry && !out_of_attempts {
                    let delay = backoff(&policy, job.attempts);
                    tracing::info!(attempts = job.attempts, error = %f, retry_in = ?delay, "job failed; will retry");
                    job.state = JobState::Retrying;
                    job.next_at_ms = now.saturating_add(delay.as_millis() as u64);
                } else {
                    tracing::warn!(attempts = job.attempts, error = %f, "job failed");
                    job.state = JobState::Failed;
                }
                job.last_error = Some(f.message);
            }
        }
        // If the outcome cannot be written the job stays running in the store, and runs again
        // after the next start; try a few times before settling for that.
        let mut pauses = [100, 1_000, 5_000].into_iter();
        while let Err(e) = self.store.update(&job).await {
            let Some(pause) = pauses.next() else {
                tracing::error!(error = %e, "could not record the outcome of a job; it runs again after a restart");
                break;
            };
            tracing::warn!(error = %e, "could not record the outcome of a job; trying again");
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        if succeeded
            && self.succeeded_since_prune.fetch_add(1, Ordering::Relaxed) + 1 >= PRUNE_EVERY
        {
            self.prune().await;
        }
    }

    async fn prune(&self) {
        self.succeeded_since_prune.store(0, Ordering::Relaxed);
        let before = self
            .cfg
            .keep_succeeded_for
            .map_or(0, |d| self.now().saturating_sub(d.as_millis() as u64));
        if let Err(e) = self
            .store
            .prune_succeeded(self.cfg.keep_succeeded, before)
            .await
        {
            tracing::warn!(error = %e, "could not prune the job history");
        }
    }
}

/// The wait before the attempt after the `attempts`-th failure: `first_delay` doubled per
/// earlier failure, ±10 % so that jobs that failed together do not retry together, and never
/// more than `max_delay`.
fn backoff(policy: &RetryPolicy, attempts: u32) -> Duration {
    let max = policy.max_delay.as_secs_f64();
    let doublings = attempts.saturating_sub(1).min(63) as i32;
    let base = (policy.first_delay.as_secs_f64() * 2f64.powi(doublings)).min(max);
    let jittered = base * (0.9 + 0.2 * fastrand::f64());
    Duration::from_secs_f64(jittered.min(max))
}

/// What to record when an attempt's task ended without an outcome.
fn join_error_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return "the attempt was cancelled".to_string();
    }
    let panic = e.into_panic();
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string());
    format!("the handler panicked: {what}")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use serde_json::json;

    use super::*;
    use crate::RedbMetaStore;

    /// A clock that follows tokio's (paused) clock from the wall time the test started at.
    fn tokio_clock() -> Clock {
        let start = tokio::time::Instant::now();
        let base = unix_ms();
        Arc::new(move || base + start.elapsed().as_millis() as u64)
    }

    fn config() -> RunnerConfig {
        RunnerConfig {
            concurrency: 2,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(8),
            max_attempts: 0,
            keep_succeeded: 1000,
            keep_succeeded_for: None,
        }
    }

    type Outcome = std::result::Result<(), JobFailure>;

    /// A handler that answers from a script and remembers when each attempt started.
    struct Scripted {
        clock: Clock,
        runs: Mutex<Vec<(u64, u64)>>,
        answer: Box<dyn Fn(&Job) -> Outcome + Send + Sync>,
    }

    impl Scripted {
        fn new(
            clock: &Clock,
            answer: impl Fn(&Job) -> Outcome + Send + Sync + 'static,
        ) -> Arc<Scripted> {
            Arc::new(Scripted {
                clock: clock.clone(),
                runs: Mutex::new(Vec::new()),
                answer: Box::new(answer),
            })
        }

        fn starts(&self, id: u64) -> Vec<u64> {
            let runs = self.runs.lock().unwrap();
            runs.iter().filter(|r| r.0 == id).map(|r| r.1).collect()
        }
    }

    #[async_trait]
    impl JobHandler for Scripted {
        async fn run(&self, job: &Job) -> Outcome {
            self.runs.lock().unwrap().push((job.id, (self.clock)()));
            (self.answer)(job)
        }
    }

    /// Wait (in tokio time) until `cond` holds for the job, and return it.
    async fn wait_for(store: &RedbMetaStore, id: u64, cond: impl Fn(&Job) -> bool) -> Job {
        for _ in 0..100_000 {
            if let Some(job) = store.job(id).await.unwrap() {
                if cond(&job) {
                    return job;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "job {id} never got there: {:?}",
            store.job(id).await.unwrap()
        );
    }

    async fn stop(runner: &JobRunner, handle: tokio::task::JoinHandle<()>) {
        runner.shutdown();
        handle.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_the_cap() {
        let store = RedbMetaStore::in_memory().unwrap();
        let clock = tokio_clock();
        let runner = JobRunner::with_clock(Arc::new(store.clone()), config(), clock.clone());
        let handler = Scripted::new(&clock, |_| Err(JobFailure::retry("peer unreachable")));
        runner.register("replicate-blob", handler.clone());
        let handle = runner.start();
        let id = runner
            .enqueue("replicate-blob", "blob:a->n2", json!(null))
            .await
            .unwrap();

        let job = wait_for(&store, id, |j| j.attempts >= 7).await;
        assert_eq!(job.state, JobState::Retrying);
        assert_eq!(job.last_error.as_deref(), Some("peer unreachable"));
        let starts = handler.starts(id);
        let gaps: Vec<u64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        for (i, (gap, want)) in gaps
            .iter()
            .zip([1_000u64, 2_000, 4_000, 8_000, 8_000, 8_000])
            .enumerate()
        {
            let (lo, hi) = (want * 9 / 10, (want * 11 / 10).min(8_000));
            assert!(
                (lo..=hi + 5).contains(gap),
                "retry {} came {gap} ms after the one before, not {lo}..={hi} ms (all: {gaps:?})",
                i + 1
            );
        }
        stop(&runner, handle).await;
    }

    /// A handler whose jobs carry their own retry settings, as a sync rule's do.
    struct OwnPolicy(Arc<Scripted>);

    #[async_trait]
    impl JobHandler for OwnPolicy {
        async fn run(&self, job: &Job) -> Outcome {
            self.0.run(job).await
        }

        fn retry_policy(&self, job: &Job) -> Option<RetryPolicy> {
            let first = job.payload["retry_initial_ms"].as_u64()?;
            Some(RetryPolicy {
                first_delay: Duration::from_millis(first),
                max_delay: Duration::from_secs(3600),
                max_attempts: 3,
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_kind_may_set_its_own_backoff_and_attempts() {
        let store = RedbMetaStore::in_memory().unwrap();
        let clock = tokio_clock();
        let runner = JobRunner::with_clock(Arc::new(store.clone()), config(), clock.clone());
        let handler = Scripted::new(&clock, |_| Err(JobFailure::retry("target 503")));
        runner.register("replicate", Arc::new(OwnPolicy(handler.clone())));
        let handle = runner.start();
        let own = runner
            .enqueue("replicate", "a", json!({"retry_initial_ms": 60_000}))
            .await
            .unwrap();
        let default = runner.enqueue("replicate", "b", json!({})).await.unwrap();

        let job = wait_for(&store, own, |j| j.state == JobState::Failed).await;
        assert_eq!(job.attempts, 3, "three attempts, then failed");
        let starts = handler.starts(own);
        let gaps: Vec<u64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps.len(), 2);
        for (gap, want) in gaps.iter().zip([60_000u64, 120_000]) {
            assert!(
                (want * 9 / 10..=want * 11 / 10 + 5).contains(gap),
                "gaps {gaps:?}, wanted about {want} ms"
            );
        }
        // The other job keeps the runner's settings: retried forever, a second apart at first.
        let job = store.job(default).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Retrying);
        assert!(job.attempts > 3, "{job:?}");
        stop(&runner, handle).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_out_of_attempts_fails_and_retry_revives_it() {
        let store = RedbMetaStore::in_memory().unwrap();
        let clock = tokio_clock();
        let cfg = RunnerConfig {
            max_attempts: 3,
            ..config()
        };
        let runner = JobRunner::with_clock(Arc::new(store.clone()), cfg, clock.clone());
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let h = healthy.clone();
        let handler = Scripted::new(&clock, move |_| {
            if h.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(JobFailure::retry("upstream 503"))
            }
        });
        runner.register("sync", handler.clone());
        let handle = runner.start();
        let a = runner.enqueue("sync", "sync:a", json!(null)).await.unwrap();
        let b = runner.enqueue("sync", "sync:b", json!(null)).await.unwrap();

        let job = wait_for(&store, a, |j| j.state == JobState::Failed).await;
        assert_eq!(job.attempts, 3);
        assert_eq!(job.last_error.as_deref(), Some("upstream 503"));
        wait_for(&store, b, |j| j.state == JobState::Failed).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(handler.starts(a).len(), 3, "a failed job is not run again");

        healthy.store(true, Ordering::SeqCst);
        assert_eq!(runner.retry(Some(a)).await.unwrap(), 1);
        let job = wait_for(&store, a, |j| j.state == JobState::Succeeded).await;
        assert_eq!(job.attempts, 1);
        assert_eq!(store.job(b).await.unwrap().unwrap().state, JobState::Failed);
        assert_eq!(runner.retry(None).await.unwrap(), 1);
        wait_for(&store, b, |j| j.state == JobState::Succeeded).await;
        stop(&runner, handle).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_failure_is_not_retried() {
        let store = RedbMetaStore::in_memory().unwrap();
        let clock = tokio_clock();
        let runner = JobRunner::with_clock(Arc::new(store.clone()), config(), clock.clone());
        let handler = Scripted::new(&clock, |_| Err(JobFailure::fatal("manifest unknown")));
        runner.register("replicate-manifest", handler.clone());
        let handle = runner.start();
        let id = runner
            .enqueue("replicate-manifest", "m:a", json!(null))
            .await
            .unwrap();
        let job = wait_for(&store, id, |j| j.state == JobState::Failed).await;
        assert_eq!(job.attempts, 1);
        assert_eq!(job.last_error.as_deref(), Some("manifest unknown"));
        stop(&runner, handle).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_of_an_unknown_kind_fails_with_a_reason() {
        let store = RedbMetaStore::in_memory().unwrap();
        let runner = JobRunner::with_clock(Arc::new(store.clone()), config(), tokio_clock());
        let handle = runner.start();
        let id = runner
            .enqueue("teleport", "t:1", json!(null))
            .await
            .unwrap();
        let job = wait_for(&store, id, |j| j.state == JobState::Failed).await;
        let why = job.last_error.unwrap_or_default();
        assert!(why.contains("teleport"), "{why}");
        stop(&runner, handle).await;
    }

    /// Panics on its first attempts, then works.
    struct Panicky {
        calls: AtomicUsize,
    }

    #[async_trait]
    impl JobHandler for Panicky {
        async fn run(&self, _job: &Job) -> std::result::Result<(), JobFailure> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < 2 {
                panic!("index out of bounds");
            }
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_handler_fails_the_attempt_not_the_runner() {
        let store = RedbMetaStore::in_memory().unwrap();
        let clock = tokio_clock();
        let runner = JobRunner::with_clock(Arc::new(store.clone()), config(), clock.clone());
        runner.register(
            "import",
            Arc::new(Panicky {
                calls: AtomicUsize::new(0),
            }),
        );
        runner.register("sync", Scripted::new(&clock, |_| Ok(())));
        let handle = runner.start();
        let id = runner.enqueue("import", "i:1", json!(null)).await.unwrap();

        let job = wait_for(&store, id, |j| j.attempts == 1).await;
        assert_eq!(job.state, JobState::Retrying);
        let why = job.last_error.unwrap_or_default();
        assert!(
            why.contains("panicked") && why.contains("index out of bounds"),
            "{why}"
        );
        // The loop goes on: other jobs run, and the panicking one succeeds once it stops.
        let other = runner.enqueue("sync", "s:1", json!(null)).await.unwrap();
        wait_for(&store, other, |j| j.state == JobState::Succeeded).await;
        let job = wait_for(&store, id, |j| j.state == JobState::Succeeded).await;
        assert_eq!(job.attempts, 3);
        stop(&runner, handle).await;
    }

    /// Counts attempts in flight and remembers the most at once.
    struct Slow {
        now: AtomicUsize,
        most: AtomicUsize,
    }

    #[async_trait]
    impl JobHandler for Slow {
        async fn run(&self, _job: &Job) -> std::result::Result<(), JobFailure> {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_than_concurrency_jobs_run_at_once() {
        let store = RedbMetaStore::in_memory().unwrap();
        let cfg = RunnerConfig {
            concurrency: 3,
            ..config()
        };
        let runner = JobRunner::with_clock(Arc::new(store.clone()), cfg, tokio_clock());
        let slow = Arc::new(Slow {
            now: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
        });
        runner.register("replicate-blob", slow.clone());
        let mut ids = Vec::new();
        for i in 0..12 {
            ids.push(
                runner
                    .enqueue("replicate-blob", &format!("b{i}"), json!(i))
                    .await
                    .unwrap(),
            );
        }
        let handle = runner.start();
        for id in ids {
            wait_for(&store, id, |j| j.state == JobState::Succeeded).await;
        }
        assert_eq!(slow.most.load(Ordering::SeqCst), 3);
        stop(&runner, handle).await;
    }

    #[tokio::test]
    async fn a_job_interrupted_by_a_crash_runs_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let id = {
            let store = RedbMetaStore::open(&path).unwrap();
            let id = store
                .enqueue(
                    "replicate-blob",
                    "blob:a->n2",
                    json!({"digest": "sha256:ab"}),
                )
                .await
                .unwrap();
            // The process died mid-attempt: the job is still marked running.
            let mut job = store.job(id).await.unwrap().unwrap();
            job.state = JobState::Running;
            store.update(&job).await.unwrap();
            id
        };

        let store = RedbMetaStore::open(&path).unwrap();
        let clock: Clock = Arc::new(unix_ms);
        let runner = JobRunner::new(Arc::new(store.clone()), config());
        let handler = Scripted::new(&clock, |_| Ok(()));
        runner.register("replicate-blob", handler.clone());
        let handle = runner.start();
        let job = tokio::time::timeout(
            Duration::from_secs(60),
            wait_for(&store, id, |j| j.state == JobState::Succeeded),
        )
        .await
        .expect("the interrupted job ran");
        assert_eq!(job.attempts, 1);
        assert_eq!(job.payload, json!({"digest": "sha256:ab"}));
        assert_eq!(handler.starts(id).len(), 1);
        stop(&runner, handle).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_history_of_succeeded_jobs_stays_bounded() {
        let store = RedbMetaStore::in_memory().unwrap();
        let clock = tokio_clock();
        let cfg = RunnerConfig {
            keep_succeeded: 3,
            ..config()
        };
        let runner = JobRunner::with_clock(Arc::new(store.clone()), cfg, clock.clone());
        runner.register("sync", Scripted::new(&clock, |_| Ok(())));
        let handle = runner.start();
        let mut ids = Vec::new();
        for i in 0..10 {
            ids.push(
                runner
                    .enqueue("sync", &format!("s{i}"), json!(null))
                    .await
                    .unwrap(),
            );
        }
        for &id in &ids {
            wait_for(&store, id, |j| j.state == JobState::Succeeded).await;
        }
        stop(&runner, handle).await;
        let left: Vec<u64> = store.jobs().await.unwrap().iter().map(|j| j.id).collect();
        assert_eq!(left, ids[7..]);
    }
}
