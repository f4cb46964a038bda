//! Replication to another registry: a `replicate` job sends one image (a manifest, or an
//! index with every child) from pier's store to the rule's target, then the image's referrers.
//!
//! Only what the target lacks is sent: the manifest is asked for first (`HEAD`; the same
//! digest there means the whole tree is there, since a registry accepts a manifest only once
//! it has what the manifest references), each blob is asked for with `HEAD`, then mounted
//! from another repository of the target that this node sent it to, and only then uploaded,
//! streamed from the store through the rule's bandwidth cap. Children go before their parent
//! and blobs before their manifest, so an interrupted job leaves nothing that references a
//! missing piece, and running it again skips what arrived.

use std::sync::Arc;

use futures::future::BoxFuture;
use pier_oci::Digest;
use pier_store::jobs::JobFailure;
use pier_upstream::{MountOutcome, Upstream, UpstreamError};

use crate::limit::throttled;
use crate::rules::Target;
use crate::{
    children, retryable, store_failure, stored_manifest, Child, Payload, PushState, SyncEngine,
};

/// Uploads of one blob tried within an attempt before the job waits for its next one.
const UPLOAD_TRIES: u32 = 3;

/// One image on its way to one target.
struct Send<'a> {
    engine: &'a SyncEngine,
    state: &'a PushState,
    client: &'a Arc<Upstream>,
    url: &'a str,
    repo: &'a str,
    target_repo: &'a str,
}

impl SyncEngine {
    pub(crate) async fn run_push(&self, p: &Payload) -> Result<(), JobFailure> {
        let Some(state) = self.push_rule(&p.rule).cloned() else {
            return Err(JobFailure::fatal(format!(
                "the rule {} is no longer configured",
                p.rule
            )));
        };
        let (Target::Registry(url), Some(client)) = (&state.rule.target, &state.client) else {
            return Err(JobFailure::fatal("the rule's target is not a registry"));
        };
        let target_repo = p
            .target_repo
            .clone()
            .unwrap_or_else(|| format!("{}{}", state.rule.prefix, p.repo));
        let _permit = self.permit(url, state.rule.concurrency).await;
        let Some(digest) = self.current_digest(p).await? else {
            // The tag was deleted since: there is nothing left to send.
            tracing::info!(image = %p.image, "tag gone before replication; nothing to send");
            return Ok(());
        };
        let send = Send {
            engine: self,
            state: &state,
            client,
            url,
            repo: &p.repo,
            target_repo: &target_repo,
        };
        send.manifest(digest.clone(), p.tag.clone()).await?;
        send.referrers(&digest).await
    }

    pub(crate) async fn run_delete(&self, p: &Payload) -> Result<(), JobFailure> {
        let Some(state) = self.push_rule(&p.rule).cloned() else {
            return Err(JobFailure::fatal(format!(
                "the rule {} is no longer configured",
                p.rule
            )));
        };
        let Some(client) = &state.client else {
            return Err(JobFailure::fatal("the rule's target is not a registry"));
        };
        let target_repo = p
            .target_repo
            .clone()
            .unwrap_or_else(|| format!("{}{}", state.rule.prefix, p.repo));
        let _permit = self
            .permit(&state.rule.target.label(), state.rule.concurrency)
            .await;
        let meta = self.parts.registry.meta_store();
        if let Some(tag) = &p.tag {
            // Tagged again since the delete: the target keeps the tag (the push queued
            // its own replication).
            if meta
                .resolve_tag(&p.repo, tag)
                .await
                .map_err(store_failure)?
                .is_some()
            {
                return Ok(());
            }
            return client
                .delete_tag(&target_repo, tag)
                .await
                .map(|_| ())
                .map_err(|e| retryable("delete of the tag at the target", e));
        }
        let digest = parse_digest(p.digest.as_deref())?;
        // Pushed again since the delete: the target keeps it.
        if meta
            .manifest(&p.repo, &digest)
            .await
            .map_err(store_failure)?
            .is_some()
        {
            return Ok(());
        }
        client
            .delete_manifest(&target_repo, &digest)
            .await
            .map(|_| ())
            .map_err(|e| retryable("delete at the target", e))
    }

    /// The manifest a push job sends: what its tag points at now, or its digest.
    pub(crate) async fn current_digest(&self, p: &Payload) -> Result<Option<Digest>, JobFailure> {
        match &p.tag {
            Some(tag) => self
                .parts
                .registry
                .meta_store()
                .resolve_tag(&p.repo, tag)
                .await
                .map_err(store_failure),
            None => parse_digest(p.digest.as_deref()).map(Some),
        }
    }
}

pub(crate) fn parse_digest(d: Option<&str>) -> Result<Digest, JobFailure> {
    d.and_then(|d| d.parse().ok())
        .ok_or_else(|| JobFailure::fatal("the job names no valid digest"))
}

impl Send<'_> {
    /// Send `digest` (under `tag`, when given) and everything it references that the target
    /// lacks.
    fn manifest(
        &self,
        digest: Digest,
        tag: Option<String>,
    ) -> BoxFuture<'_, Result<(), JobFailure>> {
        Box::pin(async move {
            let meta = self.engine.parts.registry.meta_store();
            let reference = tag.clone().unwrap_or_else(|| digest.to_string());
            let there = self
                .client
                .manifest_digest(self.target_repo, &reference)
                .await
                .map_err(|e| retryable("asking the target for the manifest", e))?;
            if there.as_ref() == Some(&digest) {
                return Ok(());
            }
            let record = stored_manifest(meta.as_ref(), self.repo, &digest).await?;
            let bytes = meta
                .manifest_bytes(&digest)
                .await
                .map_err(store_failure)?
                .ok_or_else(|| JobFailure::fatal(format!("the bytes of {digest} are gone")))?;
            // When the target already has the manifest under its digest, only the tag moves.
            let tree_there = tag.is_some()
                && self
                    .client
                    .manifest_digest(self.target_repo, &digest.to_string())
                    .await
                    .map_err(|e| retryable("asking the target for the manifest", e))?
                    .is_some();
            if !tree_there {
                for child in children(meta.as_ref(), self.repo, &record).await? {
                    match child {
                        Child::Manifest(m) => self.manifest(m, None).await?,
                        Child::Blob(b, _) => self.blob(&b).await?,
                    }
                }
            }
            let stored = self
                .client
                .put_manifest(self.target_repo, &reference, &record.media_type, bytes)
                .await
                .map_err(|e| retryable("putting the manifest", e))?;
            if let Some(stored) = stored {
                if stored != digest {
                    return Err(JobFailure::fatal(format!(
                        "the target stored {reference} as {stored}, not {digest}"
                    )));
                }
            }
            Ok(())
        })
    }

    /// Send the manifests whose subject is `digest` (signatures, SBOMs), by digest.
    async fn referrers(&self, digest: &Digest) -> Result<(), JobFailure> {
        let referrers = self
            .engine
            .parts
            .registry
            .meta_store()
            .referrers(self.repo, digest)
            .await
            .map_err(store_failure)?;
        for r in referrers {
            self.manifest(r.digest.clone(), None).await?;
        }
        Ok(())
    }

    /// Make the target hold blob `digest` in its repository: present, mounted, or uploaded.
    async fn blob(&self, digest: &Digest) -> Result<(), JobFailure> {
        let _turn = self.engine.blob_turn(self.url, digest).await;
        let present = self
            .client
            .has_blob(self.target_repo, digest)
            .await
            .map_err(|e| retryable("asking the target for a blob", e))?;
        if present {
            self.engine
                .remember_mount(self.url, digest, self.target_repo);
            return Ok(());
        }
        let from = self
            .engine
            .mount_source(self.url, digest)
            .await
            .filter(|f| f != self.target_repo);
        let size = self
            .engine
            .parts
            .registry
            .blob_store()
            .stat(digest)
            .await
            .map_err(store_failure)?
            .ok_or_else(|| JobFailure::fatal(format!("blob {digest} is not in the store")))?;
        let mut last = None;
        for attempt in 0..UPLOAD_TRIES {
            let mount = if attempt == 0 { from.as_deref() } else { None };
            let location = match self
                .client
                .start_upload(self.target_repo, digest, mount)
                .await
            {
                Ok(MountOutcome::Mounted) => {
                    self.engine
                        .remember_mount(self.url, digest, self.target_repo);
                    return Ok(());
                }
                Ok(MountOutcome::Upload(location)) => location,
                Err(e) => return Err(retryable("opening an upload", e)),
            };
            match self.upload(&location, digest, size).await {
                Ok(()) => {
                    self.engine
                        .remember_mount(self.url, digest, self.target_repo);
                    return Ok(());
                }
                Err(e @ (UpstreamError::Unavailable(_) | UpstreamError::Timeout(_))) => {
                    tracing::debug!(%digest, attempt, error = %e, "blob upload failed; trying again");
                    last = Some(e);
                }
                Err(e) => return Err(retryable("uploading a blob", e)),
            }
        }
        Err(retryable(
            "uploading a blob",
            last.unwrap_or_else(|| UpstreamError::Unavailable("no attempt".into())),
        ))
    }

    async fn upload(
        &self,
        location: &str,
        digest: &Digest,
        size: u64,
    ) -> Result<(), UpstreamError> {
        let stream = self
            .engine
            .parts
            .registry
            .read_blob(digest, 0, size)
            .await
            .map_err(|e| UpstreamError::Unavailable(format!("reading the blob here: {e}")))?;
        let metrics = self.engine.parts.metrics.clone();
        let rule = self.state.rule.name.clone();
        let body = throttled(stream, self.state.bandwidth.clone(), move |n| {
            metrics.sent(&rule, n as u64)
        });
        self.client
            .finish_upload(
                self.target_repo,
                location,
                digest,
                size,
                reqwest::Body::wrap_stream(body),
            )
            .await
    }
}
