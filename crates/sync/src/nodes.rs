//! Replication to every node: a `replicate-node` job makes one node hold one image, by the
//! peer pull requests cluster replication uses (the node fetches each piece from this node,
//! or from any peer that holds it, verifies it and keeps it). Blobs go first, then children,
//! then the manifest with its tag, then referrers; a node that already holds a piece answers
//! at once, so a job that runs again after a crash repeats nothing the node can see.
//!
//! A node that is down has its job retried with the rule's backoff; when the membership sees
//! it back, [`SyncEngine::follow`](crate::SyncEngine::follow) runs its waiting jobs at once.

use futures::future::BoxFuture;
use pier_cluster::NodeId;
use pier_oci::Digest;
use pier_peer::{Cluster, PullRequest};
use pier_store::jobs::JobFailure;

use crate::{children, store_failure, stored_manifest, Child, Payload, SyncEngine};

impl SyncEngine {
    pub(crate) async fn run_node(&self, p: &Payload) -> Result<(), JobFailure> {
        let Some(state) = self.push_rule(&p.rule).cloned() else {
            return Err(JobFailure::fatal(format!(
                "the rule {} is no longer configured",
                p.rule
            )));
        };
        let Some(cluster) = self.parts.cluster.clone() else {
            return Err(JobFailure::fatal("this node is in no cluster"));
        };
        let name = p
            .node
            .clone()
            .ok_or_else(|| JobFailure::fatal("the job names no node"))?;
        let _permit = self
            .permit(&format!("node:{name}"), state.rule.concurrency)
            .await;
        let Some(node) = cluster.member(&name) else {
            return Err(JobFailure::retry(format!("node {name} is not reachable")));
        };
        let Some(digest) = self.current_digest(p).await? else {
            return Ok(());
        };
        let me = cluster.local().name;
        let to = ToNode {
            engine: self,
            cluster: &cluster,
            node: &node,
            repo: &p.repo,
            me: &me,
            rule: &p.rule,
        };
        to.manifest(digest.clone(), p.tag.clone()).await?;
        let referrers = self
            .parts
            .registry
            .meta_store()
            .referrers(&p.repo, &digest)
            .await
            .map_err(store_failure)?;
        for r in referrers {
            to.manifest(r.digest, None).await?;
        }
        Ok(())
    }
}

struct ToNode<'a> {
    engine: &'a SyncEngine,
    cluster: &'a Cluster,
    node: &'a NodeId,
    repo: &'a str,
    me: &'a str,
    rule: &'a str,
}

impl ToNode<'_> {
    fn manifest(
        &self,
        digest: Digest,
        tag: Option<String>,
    ) -> BoxFuture<'_, Result<(), JobFailure>> {
        Box::pin(async move {
            let meta = self.engine.parts.registry.meta_store().as_ref();
            let record = stored_manifest(meta, self.repo, &digest).await?;
            for child in children(meta, self.repo, &record).await? {
                match child {
                    Child::Manifest(m) => self.manifest(m, None).await?,
                    Child::Blob(b, size) => {
                        self.pull("blob", &b, None).await?;
                        // What the node was asked to hold; one that had it already moved
                        // nothing.
                        self.engine.parts.metrics.sent(self.rule, size);
                    }
                }
            }
            self.pull("manifest", &digest, tag).await
        })
    }

    async fn pull(
        &self,
        kind: &str,
        digest: &Digest,
        tag: Option<String>,
    ) -> Result<(), JobFailure> {
        let pull = PullRequest {
            kind: kind.to_string(),
            repo: self.repo.to_string(),
            digest: digest.to_string(),
            tag,
            from: Some(self.me.to_string()),
            upstream: None,
        };
        self.cluster
            .client()
            .pull(self.node, &pull)
            .await
            .map_err(|e| JobFailure::retry(format!("{} {kind} {digest}: {e}", self.node.name)))
    }
}
