//! Hosted content survives node loss: once a push is acknowledged on the node that took it,
//! its blobs and its manifest (with the tag) are copied to their owners in the background
//! through the durable job queue, and copied again when the membership changes who the owners
//! are.
//!
//! A job is "make node N hold X" (`replicate-blob`, `replicate-manifest`); it asks N with a
//! signed pull request naming this node as the source, and succeeds once N answers that it
//! holds X durably. A target that is down is retried with backoff while it is still an owner;
//! a job whose target is no longer an owner ends (the new owner got a job of its own).
//!
//! Repositories that a `cluster` replication rule sends to every node are left to that rule:
//! one decision says where a hosted image lives, its owners or every node, never both.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pier_oci::Digest;
use pier_peer::{Cluster, PullRequest};
use pier_store::jobs::{Job, JobFailure, JobHandler, JobRunner};
use pier_store::MetaStore;
use serde::{Deserialize, Serialize};

/// Job kinds this module runs.
pub const KIND_BLOB: &str = "replicate-blob";
pub const KIND_MANIFEST: &str = "replicate-manifest";

/// A job's payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Payload {
    target: String,
    /// The placement key whose owners the target was chosen among.
    key: String,
    pull: PullRequest,
}

/// Whether every node gets a repository's images by another way (the sync engine's
/// `cluster` rule): its content is then not also copied to its owners.
pub type Everywhere = Arc<dyn Fn(&str) -> bool + Send + Sync>;

pub struct Replicator {
    cluster: Arc<Cluster>,
    everywhere: Everywhere,
    meta: Arc<dyn MetaStore>,
    runner: Arc<JobRunner>,
    /// Repository name prefixes that are mirror caches (`docker.io/`): not replicated, since
    /// they can be fetched again.
    cache_prefixes: Vec<String>,
}

impl Replicator {
    /// Register the job kinds on `runner` (before it starts).
    pub fn new(
        cluster: Arc<Cluster>,
        meta: Arc<dyn MetaStore>,
        runner: Arc<JobRunner>,
        upstreams: Vec<String>,
        everywhere: Everywhere,
    ) -> Arc<Replicator> {
        let this = Arc::new(Replicator {
            cluster,
            everywhere,
            meta,
            runner: runner.clone(),
            cache_prefixes: upstreams.into_iter().map(|u| format!("{u}/")).collect(),
        });
        let handler = Arc::new(Handler {
            cluster: this.cluster.clone(),
        });
        runner.register(KIND_BLOB, handler.clone());
        runner.register(KIND_MANIFEST, handler);
        this
    }

    /// Whether `repo` is none of this module's business: a mirror cache (fetched again when
    /// needed) or hosted content every node is sent anyway.
    fn skips(&self, repo: &str) -> bool {
        self.cache_prefixes.iter().any(|p| repo.starts_with(p)) || (self.everywhere)(repo)
    }

    /// A manifest was pushed to `repo` (with `tag`): queue copies of it and of everything it
    /// references to their owners. Errors are logged: the push itself has succeeded.
    pub async fn pushed(&self, repo: &str, digest: &Digest, tag: Option<&str>) {
        if let Err(e) = self.queue_manifest(repo, digest, tag).await {
            tracing::warn!(repo, %digest, error = %e, "queueing replication failed");
        }
    }

    fn queue_manifest<'a>(
        &'a self,
        repo: &'a str,
        digest: &'a Digest,
        tag: Option<&'a str>,
    ) -> futures::future::BoxFuture<'a, Result<usize, pier_store::StoreError>> {
        Box::pin(self.queue_manifest_inner(repo, digest, tag))
    }

    async fn queue_manifest_inner(
        &self,
        repo: &str,
        digest: &Digest,
        tag: Option<&str>,
    ) -> Result<usize, pier_store::StoreError> {
        if !self.cluster.has_peers() || self.skips(repo) {
            return Ok(0);
        }
        let Some(record) = self.meta.manifest(repo, digest).await? else {
            return Ok(0);
        };
        let mut queued = 0;
        // Blobs first, by their own placement: readers look for a blob at its digest's owners.
        for child in &record.references {
            let linked = self.meta.blob_link(repo, child).await?.is_some();
            if !linked {
                // A child manifest of an index goes the same way, before its parent.
                if self.meta.manifest(repo, child).await?.is_some() {
                    queued += self.queue_manifest(repo, child, None).await?;
                }
                continue;
            }
            let pull = PullRequest {
                kind: "blob".into(),
                repo: repo.to_string(),
                digest: child.to_string(),
                tag: None,
                from: None,
                upstream: None,
            };
            queued += self
                .queue_to_owners(KIND_BLOB, &[child.to_string()], pull)
                .await?;
        }
        // The manifest goes to the owners of its tag (where tag reads go) and of its digest.
        let mut keys = vec![digest.to_string()];
        if let Some(tag) = tag {
            keys.insert(0, format!("{repo}:{tag}"));
        }
        let pull = PullRequest {
            kind: "manifest".into(),
            repo: repo.to_string(),
            digest: digest.to_string(),
            tag: tag.map(str::to_string),
            from: None,
            upstream: None,
        };
        queued += self.queue_to_owners(KIND_MANIFEST, &keys, pull).await?;
        Ok(queued)
    }

    /// Queue `pull` (sourced from this node) for every other owner of any of `keys`, once per
    /// owner; the job remembers the first key that made it an owner.
    async fn queue_to_owners(
        &self,
        kind: &str,
        keys: &[String],
        mut pull: PullRequest,
    ) -> Result<usize, pier_store::StoreError> {
        let me = self.cluster.local().name;
        pull.from = Some(me.clone());
        let tag = pull
            .tag
            .as_deref()
            .map(|t| format!(":{t}"))
            .unwrap_or_default();
        let mut targets: Vec<String> = Vec::new();
        let mut queued = 0;
        for key in keys {
            for owner in self.cluster.owners(key.as_bytes()) {
                if owner.name == me || targets.contains(&owner.name) {
                    continue;
                }
                targets.push(owner.name.clone());
                let job_key = format!(
                    "{} {}@{}{tag} -> {}",
                    pull.kind, pull.repo, pull.digest, owner.name
                );
                let payload = Payload {
                    target: owner.name.clone(),
                    key: key.clone(),
                    pull: pull.clone(),
                };
                self.enqueue(kind, &job_key, &payload).await?;
                queued += 1;
            }
        }
        Ok(queued)
    }

    async fn enqueue(
        &self,
        kind: &str,
        key: &str,
        payload: &Payload,
    ) -> Result<u64, pier_store::StoreError> {
        let value = serde_json::to_value(payload)
            .map_err(|e| pier_store::StoreError::Corrupt(e.to_string()))?;
        self.runner.enqueue(kind, key, value).await
    }

    /// Queue copies of every hosted manifest (and its blobs) this node holds to their current
    /// owners. Run after membership changes; targets that already hold something answer at
    /// once.
    pub async fn resync(&self) -> Result<usize, pier_store::StoreError> {
        if !self.cluster.has_peers() {
            return Ok(0);
        }
        let mut queued = 0;
        let mut last: Option<String> = None;
        loop {
            let page = self.meta.repos(last.as_deref(), 1000).await?;
            if page.items.is_empty() {
                break;
            }
            for repo in &page.items {
                if self.skips(repo) {
                    continue;
                }
                let tags = self.meta.tags(repo, None, 100_000).await?;
                for tag in &tags.items {
                    if let Some(d) = self.meta.resolve_tag(repo, tag).await? {
                        queued += self.queue_manifest(repo, &d, Some(tag)).await?;
                    }
                }
            }
            last = page.items.last().cloned();
            if page.items.len() < 1000 {
                break;
            }
        }
        Ok(queued)
    }

    /// Re-replicate after every membership change, once the membership has been quiet for a
    /// few seconds (a rolling restart is one resync, not one per node).
    pub async fn follow(self: Arc<Self>, mut changes: tokio::sync::watch::Receiver<u64>) {
        loop {
            if !pier_cluster::membership::settled(&mut changes, Duration::from_secs(3)).await {
                return;
            }
            match self.resync().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    jobs = n,
                    "membership changed; re-replicating hosted content"
                ),
                Err(e) => tracing::warn!(error = %e, "re-replication scan failed"),
            }
        }
    }
}

struct Handler {
    cluster: Arc<Cluster>,
}

#[async_trait]
impl JobHandler for Handler {
    async fn run(&self, job: &Job) -> Result<(), JobFailure> {
        let p: Payload = serde_json::from_value(job.payload.clone())
            .map_err(|e| JobFailure::fatal(format!("bad payload: {e}")))?;
        let still_owner = self
            .cluster
            .owners(p.key.as_bytes())
            .iter()
            .any(|o| o.name == p.target);
        let Some(target) = self.cluster.member(&p.target) else {
            if still_owner {
                return Err(JobFailure::retry(format!("{} is not reachable", p.target)));
            }
            // Its keys moved to other owners, which got jobs of their own.
            return Ok(());
        };
        self.cluster
            .client()
            .pull(&target, &p.pull)
            .await
            .map_err(|e| JobFailure::retry(e.to_string()))
    }
}
