//! Sync: the rules that move images without anyone pulling them.
//!
//! - Pull rules (`[[sync]]`, [`rules::PullRule`]) copy tags of an upstream repository (or of
//!   every repository under a prefix) into the mirror cache on a schedule, chosen by tag
//!   filters ([`filter`]) and, for indexes, by platform; what they copy is pinned against
//!   eviction.
//! - Push rules (`[[replicate]]`, [`rules::PushRule`]) send hosted images to another OCI
//!   registry ([`push`]) or to every node of the cluster ([`nodes`]), on push, on a
//!   schedule, or both; deletes follow when the rule says so.
//!
//! Every copy is a job of pier's durable queue (`pier_store::jobs`): one per image per target,
//! keyed so that a second request for the same image and target while one is under way is
//! the same job. Jobs carry their rule's name; the rule's retry settings, concurrency per
//! target and bandwidth cap apply while they run. A job interrupted by a crash runs again
//! after the restart, and every step checks the target first (`HEAD`), so running again
//! sends only what is still missing.
//!
//! Architecture invariant: this crate reaches registries only through `pier-upstream` and
//! peers only through `pier-peer`'s pull requests; it knows nothing of HTTP servers.

pub mod filter;
pub mod limit;
pub mod metrics;
mod nodes;
mod pull;
mod push;
pub mod rules;
pub mod schedule;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use pier_mirror::Mirror;
use pier_oci::Digest;
use pier_peer::Cluster;
use pier_registry::Registry;
use pier_store::jobs::{unix_ms, Job, JobFailure, JobHandler, JobRunner, JobState};
use pier_store::{ManifestRecord, MetaStore, PinStore, RetryPolicy, StoreError};
use pier_upstream::{Upstream, UpstreamConfig, UpstreamError};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::limit::RateLimit;
use crate::metrics::SyncMetrics;
use crate::rules::{PullRule, PushRule, Target};
use crate::schedule::Schedule;

pub use status::JobRow;

/// Job kinds this crate runs.
pub const KIND_PULL: &str = "sync";
pub const KIND_PUSH: &str = "replicate";
pub const KIND_DELETE: &str = "replicate-delete";
pub const KIND_NODE: &str = "replicate-node";

/// Why a sync operation could not be done.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("invalid sync configuration: {0}")]
    Config(String),
    #[error("no sync or replicate rule is named {0:?}")]
    UnknownRule(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("upstream {upstream}: {error}")]
    Upstream {
        upstream: String,
        error: UpstreamError,
    },
}

/// What a job of this crate carries. One shape for every kind; each uses the fields it needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Payload {
    pub rule: String,
    /// As status rows show it: `team/app:1`, `team/app@sha256:…`.
    pub image: String,
    /// As status rows show it: a registry URL, a node's name, the repository pulled into.
    pub target: String,
    /// The repository here (push kinds) or on the upstream (pull).
    pub repo: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The manifest pushed (a tagged job resolves its tag again when it runs, so a moved tag
    /// sends what it points at then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The repository at the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_repo: Option<String>,
    /// For `replicate-node`: the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// For `sync`: the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
}

impl Payload {
    fn of(job: &Job) -> Result<Payload, JobFailure> {
        serde_json::from_value(job.payload.clone())
            .map_err(|e| JobFailure::fatal(format!("bad payload: {e}")))
    }
}

/// A push rule with what running it needs.
pub(crate) struct PushState {
    pub rule: PushRule,
    /// The client for a registry target.
    pub client: Option<Arc<Upstream>>,
    pub schedule: Option<Schedule>,
    pub bandwidth: Option<Arc<RateLimit>>,
}

/// A pull rule with what running it needs.
pub(crate) struct PullState {
    pub rule: PullRule,
    pub filter: filter::TagFilter,
    pub schedule: Option<Schedule>,
    /// The rule's cap on what its fills read from the upstream, all its jobs together.
    pub bandwidth: Option<Arc<RateLimit>>,
}

/// What the sync engine works with.
pub struct SyncParts {
    pub registry: Arc<Registry>,
    /// The mirror, for pull rules (their upstreams are the mirror's).
    pub mirror: Option<Arc<Mirror>>,
    /// The cluster, for `cluster` targets.
    pub cluster: Option<Arc<Cluster>>,
    pub pins: Arc<dyn PinStore>,
    pub runner: Arc<JobRunner>,
    pub metrics: Arc<SyncMetrics>,
    /// Repository name prefixes that are mirror caches (`docker.io/`): never pushed, since
    /// they can be fetched again.
    pub cache_prefixes: Vec<String>,
    /// Timeouts for target registries.
    pub timeouts: pier_upstream::Timeouts,
}

/// The sync engine: the rules, their triggers and the handlers of their jobs.
pub struct SyncEngine {
    pull: Vec<Arc<PullState>>,
    push: Vec<Arc<PushState>>,
    parts: SyncParts,
    /// Jobs running at once per target (`url`, `node:<name>`, `pull:<rule>`).
    permits: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Where each blob was last seen at a registry target: (target URL, digest) → repository,
    /// the source of a cross-repository mount for the next repository that needs it.
    mounts: Mutex<HashMap<(String, String), String>>,
    /// One upload at a time per (target, digest): two jobs that need the same blob (an index
    /// and its child pushed by digest, images sharing a layer) send it once, the second
    /// finding it there.
    in_flight: Mutex<HashMap<(String, String), TurnLock>>,
}

/// The lock of one (target, digest) upload.
type TurnLock = Arc<tokio::sync::Mutex<()>>;

/// How many mount sources are remembered; beyond it the map starts afresh.
const MOUNTS_KEPT: usize = 100_000;
/// Repositories whose finished replication jobs are looked through for a mount source the
/// memory does not hold.
const MOUNT_LOOKUPS: usize = 64;

impl SyncEngine {
    /// Check the rules, make a client per registry target and register the job kinds on the
    /// runner (before it starts).
    pub fn new(
        pull: Vec<PullRule>,
        push: Vec<PushRule>,
        parts: SyncParts,
    ) -> Result<Arc<SyncEngine>, SyncError> {
        let mut names = HashSet::new();
        let mut pulls = Vec::new();
        for rule in pull {
            rule.validate()?;
            if !names.insert(rule.name.clone()) {
                return Err(SyncError::Config(format!(
                    "two rules are named {}",
                    rule.name
                )));
            }
            let mirror = parts.mirror.as_ref().ok_or_else(|| {
                SyncError::Config(format!(
                    "[[sync]] {}: no upstreams are configured",
                    rule.name
                ))
            })?;
            if !mirror.has_upstream(&rule.upstream) {
                return Err(SyncError::Config(format!(
                    "[[sync]] {}: upstream {:?} is not configured",
                    rule.name, rule.upstream
                )));
            }
            pulls.push(Arc::new(PullState {
                filter: rule.filter()?,
                schedule: rule.schedule()?,
                bandwidth: rule.bandwidth.map(|r| RateLimit::new(r.0)),
                rule,
            }));
        }
        let mut pushes = Vec::new();
        for rule in push {
            rule.validate()?;
            if !names.insert(rule.name.clone()) {
                return Err(SyncError::Config(format!(
                    "two rules are named {}",
                    rule.name
                )));
            }
            let client = match &rule.target {
                Target::Cluster => {
                    if parts.cluster.is_none() {
                        return Err(SyncError::Config(format!(
                            "[[replicate]] {}: target = \"cluster\" but this node is in no \
                             cluster",
                            rule.name
                        )));
                    }
                    None
                }
                Target::Registry(url) => {
                    let mut c = UpstreamConfig::new(rule.name.clone(), vec![url.clone()]);
                    c.username = rule.username.clone();
                    c.password = rule.password.clone();
                    c.timeouts = parts.timeouts;
                    // A target that fails is tried again at once within a job: there is no
                    // other endpoint to move to.
                    c.cooldown = Duration::from_secs(1);
                    let client =
                        Upstream::new(c, Arc::new(pier_upstream::NoObserver)).map_err(|e| {
                            SyncError::Config(format!("[[replicate]] {}: {e}", rule.name))
                        })?;
                    Some(client)
                }
            };
            pushes.push(Arc::new(PushState {
                client,
                schedule: rule.schedule()?,
                bandwidth: rule.bandwidth.map(|r| RateLimit::new(r.0)),
                rule,
            }));
        }
        let runner = parts.runner.clone();
        let engine = Arc::new(SyncEngine {
            pull: pulls,
            push: pushes,
            parts,
            permits: Mutex::new(HashMap::new()),
            mounts: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
        });
        let handler = Arc::new(Handler {
            engine: Arc::downgrade(&engine),
        });
        for kind in [KIND_PULL, KIND_PUSH, KIND_DELETE, KIND_NODE] {
            runner.register(kind, handler.clone());
        }
        Ok(engine)
    }

    /// The names of the rules, pull rules first.
    pub fn rule_names(&self) -> Vec<String> {
        self.pull
            .iter()
            .map(|p| p.rule.name.clone())
            .chain(self.push.iter().map(|p| p.rule.name.clone()))
            .collect()
    }

    pub fn metrics(&self) -> &Arc<SyncMetrics> {
        &self.parts.metrics
    }

    pub fn runner(&self) -> &Arc<JobRunner> {
        &self.parts.runner
    }

    fn is_cache(&self, repo: &str) -> bool {
        self.parts
            .cache_prefixes
            .iter()
            .any(|p| repo.starts_with(p.as_str()))
    }

    fn push_rule(&self, name: &str) -> Option<&Arc<PushState>> {
        self.push.iter().find(|p| p.rule.name == name)
    }

    fn pull_rule(&self, name: &str) -> Option<&Arc<PullState>> {
        self.pull.iter().find(|p| p.rule.name == name)
    }

    /// A manifest was pushed (or imported) into `repo`, with `tag`: queue its replication by
    /// every push rule that matches and replicates on push. Errors are logged: the push itself
    /// has succeeded.
    pub async fn pushed(&self, repo: &str, digest: &Digest, tag: Option<&str>) {
        if self.is_cache(repo) {
            return;
        }
        for state in &self.push {
            if !state.rule.on_push || !state.rule.matches(repo) {
                continue;
            }
            if let Err(e) = self.queue_push(state, repo, digest, tag).await {
                tracing::warn!(rule = %state.rule.name, repo, %digest, error = %e, "queueing replication failed");
            }
        }
    }

    /// A manifest was deleted from `repo`: queue the delete at the targets of the rules that
    /// propagate deletes.
    pub async fn deleted(&self, repo: &str, digest: &Digest) {
        self.queue_deletes(repo, None, Some(digest)).await;
    }

    /// Tag `tag` was deleted from `repo` (the manifest stays): queue the tag's delete at the
    /// targets of the rules that propagate deletes.
    pub async fn tag_deleted(&self, repo: &str, tag: &str) {
        self.queue_deletes(repo, Some(tag), None).await;
    }

    /// One delete job per rule that propagates deletes of `repo` to a registry: of `tag`, or
    /// of the manifest `digest`.
    async fn queue_deletes(&self, repo: &str, tag: Option<&str>, digest: Option<&Digest>) {
        if self.is_cache(repo) {
            return;
        }
        let what = match (tag, digest) {
            (Some(tag), _) => format!("{repo}:{tag}"),
            (None, Some(digest)) => format!("{repo}@{digest}"),
            (None, None) => return,
        };
        for state in &self.push {
            let rule = &state.rule;
            if !rule.deletes || !rule.matches(repo) {
                continue;
            }
            let Target::Registry(url) = &rule.target else {
                // Nodes keep hosted content by replication and lose it by eviction; a delete
                // on one node is not replayed on the others.
                continue;
            };
            let target_repo = format!("{}{repo}", rule.prefix);
            let payload = Payload {
                rule: rule.name.clone(),
                image: what.clone(),
                target: url.clone(),
                repo: repo.to_string(),
                tag: tag.map(str::to_string),
                digest: digest.map(Digest::to_string),
                target_repo: Some(target_repo),
                node: None,
                upstream: None,
            };
            let key = format!("{KIND_DELETE} {} {what}", rule.name);
            if let Err(e) = self.enqueue(KIND_DELETE, &key, &payload).await {
                tracing::warn!(rule = %rule.name, image = %what, error = %e, "queueing a delete failed");
            }
        }
    }

    /// Queue the jobs that bring `repo@digest` (as `tag`) to the rule's target: one for a
    /// registry, one per other node for `cluster`. Returns how many were queued.
    async fn queue_push(
        &self,
        state: &PushState,
        repo: &str,
        digest: &Digest,
        tag: Option<&str>,
    ) -> Result<usize, StoreError> {
        let rule = &state.rule;
        let image = match tag {
            Some(t) => format!("{repo}:{t}"),
            None => format!("{repo}@{digest}"),
        };
        let mut payload = Payload {
            rule: rule.name.clone(),
            image: image.clone(),
            target: rule.target.label(),
            repo: repo.to_string(),
            tag: tag.map(str::to_string),
            digest: Some(digest.to_string()),
            target_repo: None,
            node: None,
            upstream: None,
        };
        match &rule.target {
            Target::Registry(_) => {
                payload.target_repo = Some(format!("{}{repo}", rule.prefix));
                let key = format!("{KIND_PUSH} {} {image}", rule.name);
                self.enqueue(KIND_PUSH, &key, &payload).await?;
                Ok(1)
            }
            Target::Cluster => {
                let mut queued = 0;
                for node in self.other_nodes() {
                    payload.node = Some(node.clone());
                    payload.target = node.clone();
                    let key = format!("{KIND_NODE} {} {node} {image}", rule.name);
                    self.enqueue(KIND_NODE, &key, &payload).await?;
                    queued += 1;
                }
                Ok(queued)
            }
        }
    }

    /// Every other node the membership knows, dead ones included: a node that is down now
    /// gets its job when it returns.
    fn other_nodes(&self) -> Vec<String> {
        let Some(cluster) = &self.parts.cluster else {
            return Vec::new();
        };
        let me = cluster.local().name;
        let mut names: Vec<String> = cluster
            .view()
            .members()
            .into_iter()
            .map(|m| m.id.name)
            .filter(|n| *n != me)
            .collect();
        names.sort();
        names.dedup();
        names
    }

    async fn enqueue(&self, kind: &str, key: &str, payload: &Payload) -> Result<u64, StoreError> {
        let value =
            serde_json::to_value(payload).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.parts.runner.enqueue(kind, key, value).await
    }

    /// Run a rule now: a pull rule lists its upstream's tags and queues a job per selected
    /// tag; a push rule queues a job per matching image here. Returns how many jobs were
    /// queued (jobs already under way for the same image count too).
    pub async fn run(&self, name: &str) -> Result<usize, SyncError> {
        if let Some(state) = self.pull_rule(name).cloned() {
            return self.scan_pull(&state).await;
        }
        if let Some(state) = self.push_rule(name).cloned() {
            return self.scan_push(&state, None).await;
        }
        Err(SyncError::UnknownRule(name.to_string()))
    }

    /// Queue a push rule's job for every matching tagged image here (only for `node`, when
    /// given and the target is the cluster).
    async fn scan_push(&self, state: &PushState, node: Option<&str>) -> Result<usize, SyncError> {
        let meta = self.parts.registry.meta_store();
        let mut queued = 0;
        let mut last: Option<String> = None;
        loop {
            let page = meta.repos(last.as_deref(), 1000).await?;
            for repo in &page.items {
                if self.is_cache(repo) || !state.rule.matches(repo) {
                    continue;
                }
                let tags = meta.tags(repo, None, 100_000).await?;
                for tag in &tags.items {
                    let Some(digest) = meta.resolve_tag(repo, tag).await? else {
                        continue;
                    };
                    queued += match node {
                        Some(node) => self.queue_node(state, repo, &digest, tag, node).await?,
                        None => self.queue_push(state, repo, &digest, Some(tag)).await?,
                    };
                }
            }
            last = page.items.last().cloned();
            if !page.more || last.is_none() {
                break;
            }
        }
        Ok(queued)
    }

    async fn queue_node(
        &self,
        state: &PushState,
        repo: &str,
        digest: &Digest,
        tag: &str,
        node: &str,
    ) -> Result<usize, StoreError> {
        let rule = &state.rule;
        let image = format!("{repo}:{tag}");
        let payload = Payload {
            rule: rule.name.clone(),
            image: image.clone(),
            target: node.to_string(),
            repo: repo.to_string(),
            tag: Some(tag.to_string()),
            digest: Some(digest.to_string()),
            target_repo: None,
            node: Some(node.to_string()),
            upstream: None,
        };
        let key = format!("{KIND_NODE} {} {node} {image}", rule.name);
        self.enqueue(KIND_NODE, &key, &payload).await?;
        Ok(1)
    }

    /// Every job, as status rows.
    pub async fn jobs(&self) -> Result<Vec<JobRow>, SyncError> {
        let jobs = self.parts.runner.store().jobs().await?;
        Ok(jobs.iter().map(JobRow::from_job).collect())
    }

    /// Every pin (what pull rules keep from eviction), by repository and digest.
    pub async fn pins(&self) -> Result<Vec<pier_store::Pin>, SyncError> {
        Ok(self.parts.pins.pins().await?)
    }

    /// Queue failed jobs again: the one with `id`, or all. Returns how many.
    pub async fn retry(&self, id: Option<u64>) -> Result<usize, SyncError> {
        Ok(self.parts.runner.retry(id).await?)
    }

    /// Bring the metrics up to date with the queue (called before each scrape).
    pub async fn refresh_metrics(&self) {
        match self.parts.runner.store().jobs().await {
            Ok(jobs) => self
                .parts
                .metrics
                .observe(&jobs, &self.rule_names(), unix_ms()),
            Err(e) => tracing::warn!(error = %e, "reading the job queue for metrics failed"),
        }
    }

    /// Run the scheduled rules: those with an interval once now and then every interval,
    /// those with cron at its times. Ends when `stop` fires.
    pub async fn schedule(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let now = unix_ms();
        let mut next: Vec<(String, Schedule, u64)> = Vec::new();
        for (name, schedule) in self
            .pull
            .iter()
            .filter_map(|p| p.schedule.clone().map(|s| (p.rule.name.clone(), s)))
            .chain(
                self.push
                    .iter()
                    .filter_map(|p| p.schedule.clone().map(|s| (p.rule.name.clone(), s))),
            )
        {
            let first = if schedule.runs_at_start() {
                Some(now)
            } else {
                schedule.next_after(now)
            };
            if let Some(at) = first {
                next.push((name, schedule, at));
            }
        }
        loop {
            let Some(soonest) = next.iter().map(|n| n.2).min() else {
                return;
            };
            let wait = Duration::from_millis(soonest.saturating_sub(unix_ms()));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
            let now = unix_ms();
            for (name, schedule, at) in next.iter_mut() {
                if *at > now {
                    continue;
                }
                match self.run(name).await {
                    Ok(n) => tracing::info!(rule = %name, jobs = n, "scheduled rule ran"),
                    Err(e) => tracing::warn!(rule = %name, error = %e, "scheduled rule failed"),
                }
                *at = schedule.next_after(unix_ms()).unwrap_or(u64::MAX);
            }
            next.retain(|n| n.2 != u64::MAX);
        }
    }

    /// Follow the membership for the `cluster` rules: a node that comes back (or joins) has
    /// its waiting jobs run now and gets a job for every image it may have missed.
    pub async fn follow(self: Arc<Self>, mut changes: tokio::sync::watch::Receiver<u64>) {
        let cluster_rules: Vec<Arc<PushState>> = self
            .push
            .iter()
            .filter(|p| p.rule.target == Target::Cluster)
            .cloned()
            .collect();
        let Some(cluster) = self.parts.cluster.clone() else {
            return;
        };
        if cluster_rules.is_empty() {
            return;
        }
        // By name and generation: a node that restarted within one settling period (dead
        // and back before the change was looked at) is new again.
        let alive = |c: &Cluster| -> HashSet<(String, u64)> {
            c.view()
                .alive()
                .into_iter()
                .map(|m| (m.id.name, m.id.generation))
                .collect()
        };
        let mut known = alive(&cluster);
        loop {
            // A burst of changes (a node restarting) settles first.
            if !pier_cluster::membership::settled(&mut changes, Duration::from_secs(1)).await {
                return;
            }
            let now = alive(&cluster);
            let me = cluster.local().name;
            for (node, _) in now.difference(&known).filter(|(n, _)| *n != me) {
                match self.node_returned(node, &cluster_rules).await {
                    Ok(n) => tracing::info!(node, jobs = n, "node is back; replicating to it"),
                    Err(e) => {
                        tracing::warn!(node, error = %e, "replicating to a returned node failed")
                    }
                }
            }
            known = now;
        }
    }

    async fn node_returned(
        &self,
        node: &str,
        rules: &[Arc<PushState>],
    ) -> Result<usize, SyncError> {
        let store = self.parts.runner.store();
        let now = unix_ms();
        for mut job in store.jobs().await? {
            if job.kind != KIND_NODE || !matches!(job.state, JobState::Failed | JobState::Retrying)
            {
                continue;
            }
            if job.payload["node"].as_str() != Some(node) {
                continue;
            }
            if job.state == JobState::Failed {
                store.retry(Some(job.id)).await?;
            } else {
                job.state = JobState::Queued;
                job.next_at_ms = now;
                store.update(&job).await?;
            }
        }
        let mut queued = 0;
        for state in rules {
            queued += self.scan_push(state, Some(node)).await?;
        }
        self.parts.runner.wake();
        Ok(queued)
    }

    /// A permit to run against `target`, at most `limit` at once.
    async fn permit(&self, target: &str, limit: usize) -> tokio::sync::OwnedSemaphorePermit {
        let sem = {
            let mut permits = self.permits.lock().unwrap_or_else(|e| e.into_inner());
            permits
                .entry(target.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(limit.max(1))))
                .clone()
        };
        loop {
            match sem.clone().acquire_owned().await {
                Ok(p) => return p,
                // The semaphore is never closed; should that change, wait rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }

    /// Hold the (target, digest) upload lock for as long as the guard lives.
    async fn blob_turn(&self, target: &str, digest: &Digest) -> BlobTurn<'_> {
        let key = (target.to_string(), digest.to_string());
        let lock = {
            let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        BlobTurn {
            engine: self,
            key,
            lock,
            _guard: guard,
        }
    }

    /// A repository of registry `target` that holds blob `digest`, to mount it from: the one
    /// it was last sent to or seen in by this process, or else (after a restart) the target
    /// repository of a replication job that succeeded to that registry from a repository
    /// here that links the blob. The newest jobs are asked first, at most
    /// [`MOUNT_LOOKUPS`] repositories. A wrong guess costs nothing: the registry then opens
    /// an upload instead of mounting.
    async fn mount_source(&self, target: &str, digest: &Digest) -> Option<String> {
        let key = (target.to_string(), digest.to_string());
        if let Some(repo) = self
            .mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned()
        {
            return Some(repo);
        }
        let jobs = match self.parts.runner.store().jobs().await {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::debug!(error = %e, "reading the job queue for a mount source failed");
                return None;
            }
        };
        let meta = self.parts.registry.meta_store();
        let mut asked = HashSet::new();
        for job in jobs.iter().rev() {
            if job.kind != KIND_PUSH || job.state != JobState::Succeeded {
                continue;
            }
            let Ok(p) = serde_json::from_value::<Payload>(job.payload.clone()) else {
                continue;
            };
            let Some(target_repo) = p.target_repo.filter(|_| p.target == target) else {
                continue;
            };
            if !asked.insert(p.repo.clone()) {
                continue;
            }
            if asked.len() > MOUNT_LOOKUPS {
                break;
            }
            if let Ok(Some(_)) = meta.blob_link(&p.repo, digest).await {
                self.remember_mount(target, digest, &target_repo);
                return Some(target_repo);
            }
        }
        None
    }

    fn remember_mount(&self, target: &str, digest: &Digest, repo: &str) {
        let mut mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
        if mounts.len() >= MOUNTS_KEPT {
            mounts.clear();
        }
        mounts.insert((target.to_string(), digest.to_string()), repo.to_string());
    }
}

/// A turn at uploading one blob to one target; the map entry goes with the last turn.
struct BlobTurn<'a> {
    engine: &'a SyncEngine,
    key: (String, String),
    lock: TurnLock,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for BlobTurn<'_> {
    fn drop(&mut self) {
        let mut map = self
            .engine
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Held by the map, this turn and its guard: nobody else waits for it.
        if Arc::strong_count(&self.lock) <= 3 {
            map.remove(&self.key);
        }
    }
}

/// The job handler of every kind this crate runs.
struct Handler {
    engine: Weak<SyncEngine>,
}

impl Handler {
    fn engine(&self) -> Result<Arc<SyncEngine>, JobFailure> {
        self.engine
            .upgrade()
            .ok_or_else(|| JobFailure::retry("pier is shutting down"))
    }
}

#[async_trait]
impl JobHandler for Handler {
    async fn run(&self, job: &Job) -> Result<(), JobFailure> {
        let engine = self.engine()?;
        let p = Payload::of(job)?;
        match job.kind.as_str() {
            KIND_PUSH => engine.run_push(&p).await,
            KIND_DELETE => engine.run_delete(&p).await,
            KIND_NODE => engine.run_node(&p).await,
            KIND_PULL => engine.run_pull(&p).await,
            other => Err(JobFailure::fatal(format!("unknown kind {other}"))),
        }
    }

    fn retry_policy(&self, job: &Job) -> Option<RetryPolicy> {
        let engine = self.engine.upgrade()?;
        let rule = job.payload["rule"].as_str()?;
        if let Some(p) = engine.push_rule(rule) {
            return Some(p.rule.retry_policy());
        }
        engine.pull_rule(rule).map(|p| p.rule.retry_policy())
    }
}

/// An upstream failure as a job failure: every one may pass (a target down, a token
/// expired, a rate limit), and the rule's retries bound how long it is given.
fn retryable(what: &str, e: UpstreamError) -> JobFailure {
    JobFailure::retry(format!("{what}: {e}"))
}

fn store_failure(e: StoreError) -> JobFailure {
    JobFailure::retry(format!("local store: {e}"))
}

/// A stored manifest's record, or the job's end when it is gone.
async fn stored_manifest(
    meta: &dyn MetaStore,
    repo: &str,
    digest: &Digest,
) -> Result<ManifestRecord, JobFailure> {
    meta.manifest(repo, digest)
        .await
        .map_err(store_failure)?
        .ok_or_else(|| JobFailure::fatal(format!("{repo}@{digest} is no longer here")))
}

/// What a manifest references in `repo`, as a job sends it: the manifests (an index's
/// children) and the blobs linked there, with their sizes, in the manifest's order. A
/// reference that is neither is a foreign layer, which lives elsewhere by design.
enum Child {
    Manifest(Digest),
    Blob(Digest, u64),
}

async fn children(
    meta: &dyn MetaStore,
    repo: &str,
    record: &ManifestRecord,
) -> Result<Vec<Child>, JobFailure> {
    let mut out = Vec::new();
    for child in &record.references {
        if meta
            .manifest(repo, child)
            .await
            .map_err(store_failure)?
            .is_some()
        {
            out.push(Child::Manifest(child.clone()));
        } else if let Some(size) = meta.blob_link(repo, child).await.map_err(store_failure)? {
            out.push(Child::Blob(child.clone(), size));
        }
    }
    Ok(out)
}
