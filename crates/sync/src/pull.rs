//! Pull rules at work. A run lists the rule's repositories (one, or the upstream's catalog
//! under a prefix) and their tags, selects tags with the rule's filter, and queues a `sync`
//! job per selected tag. A job fetches the tag's manifest through the mirror (so it lands in
//! the cache exactly as a client's pull would put it there, verified), then every blob of the
//! image, or of each wanted platform's image for an index, and pins what it fetched for the
//! rule. With `into`, the image is also kept in a hosted repository, and push rules that
//! match it replicate it from there.

use pier_mirror::{BlobSource, Mirror, MirrorError, MirrorRef};
use pier_oci::{Digest, Manifest, Reference, RepoName, Tag};
use pier_store::jobs::JobFailure;
use serde::Deserialize;

use crate::{store_failure, Payload, PullState, SyncEngine, SyncError, KIND_PULL};

/// Tags or repositories asked for per page.
const PAGE: usize = 1000;

#[derive(Deserialize)]
struct TagList {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Catalog {
    #[serde(default)]
    repositories: Vec<String>,
}

impl SyncEngine {
    fn mirror(&self) -> Result<&std::sync::Arc<Mirror>, SyncError> {
        self.parts
            .mirror
            .as_ref()
            .ok_or_else(|| SyncError::Config("no upstreams are configured".into()))
    }

    fn route(&self, upstream: &str, repo: &str) -> Result<MirrorRef, SyncError> {
        let name: RepoName = repo
            .parse()
            .map_err(|e| SyncError::Config(format!("repository {repo:?}: {e}")))?;
        match self.mirror()?.route(&name, Some(upstream)) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(SyncError::Config(format!(
                "upstream {upstream:?} is not configured"
            ))),
            Err(e) => Err(SyncError::Config(format!("{upstream}/{repo}: {e}"))),
        }
    }

    /// List, select and queue: a pull rule's run. Returns the jobs queued.
    pub(crate) async fn scan_pull(&self, state: &PullState) -> Result<usize, SyncError> {
        let rule = &state.rule;
        let upstream_err = |error| SyncError::Upstream {
            upstream: rule.upstream.clone(),
            error,
        };
        let repos = match (&rule.repository, &rule.prefix) {
            (Some(repo), _) => vec![repo.clone()],
            (None, Some(prefix)) => {
                let entry = self
                    .mirror()?
                    .upstreams()
                    .into_iter()
                    .find(|u| u.name() == rule.upstream)
                    .ok_or_else(|| {
                        SyncError::Config(format!("upstream {:?} is not configured", rule.upstream))
                    })?;
                let mut repos = Vec::new();
                let mut last: Option<String> = None;
                loop {
                    let mut query = format!("n={PAGE}");
                    if let Some(l) = &last {
                        query.push_str(&format!("&last={l}"));
                    }
                    let (body, link) = entry.client.catalog(&query).await.map_err(upstream_err)?;
                    let page: Catalog = serde_json::from_slice(&body).map_err(|e| {
                        upstream_err(pier_upstream::UpstreamError::Protocol(format!(
                            "catalog: {e}"
                        )))
                    })?;
                    let n = page.repositories.len();
                    last = page.repositories.last().cloned();
                    repos.extend(
                        page.repositories
                            .into_iter()
                            .filter(|r| r.starts_with(prefix.as_str())),
                    );
                    if link.is_none() || n < PAGE {
                        break;
                    }
                }
                repos
            }
            (None, None) => Vec::new(),
        };
        let mut queued = 0;
        for repo in repos {
            let r = self.route(&rule.upstream, &repo)?;
            let tags = list_tags(&r).await.map_err(upstream_err)?;
            let local = rule.into.clone().unwrap_or_else(|| r.cache_repo.clone());
            let selected = state.filter.select(&tags);
            // Tags that left the selection (or the upstream) let go of their pins.
            let prefix = holder(&rule.name, &repo, "");
            let released = self
                .release(
                    |h| {
                        h.strip_prefix(prefix.as_str())
                            .is_some_and(|tag| !selected.iter().any(|s| s == tag))
                    },
                    |_| true,
                )
                .await?;
            if released > 0 {
                tracing::info!(rule = %rule.name, repo, released, "pins of tags no longer selected released");
            }
            for tag in selected {
                let payload = Payload {
                    rule: rule.name.clone(),
                    image: format!("{}/{repo}:{tag}", rule.upstream),
                    target: local.clone(),
                    repo: repo.clone(),
                    tag: Some(tag.clone()),
                    digest: None,
                    target_repo: rule.into.clone(),
                    node: None,
                    upstream: Some(rule.upstream.clone()),
                };
                let key = format!("{KIND_PULL} {} {}/{repo}:{tag}", rule.name, rule.upstream);
                self.enqueue(KIND_PULL, &key, &payload).await?;
                queued += 1;
            }
        }
        Ok(queued)
    }

    pub(crate) async fn run_pull(&self, p: &Payload) -> Result<(), JobFailure> {
        let Some(state) = self.pull_rule(&p.rule).cloned() else {
            return Err(JobFailure::fatal(format!(
                "the rule {} is no longer configured",
                p.rule
            )));
        };
        let rule = &state.rule;
        let _permit = self
            .permit(&format!("pull:{}", rule.name), rule.concurrency)
            .await;
        let upstream = p.upstream.clone().unwrap_or_else(|| rule.upstream.clone());
        let r = self
            .route(&upstream, &p.repo)
            .map_err(|e| JobFailure::fatal(e.to_string()))?;
        let tag: Tag = p
            .tag
            .as_deref()
            .unwrap_or("latest")
            .parse()
            .map_err(|e| JobFailure::fatal(format!("tag: {e}")))?;
        let mirror = self
            .mirror()
            .map_err(|e| JobFailure::fatal(e.to_string()))?;
        let (record, bytes, _) = mirror
            .manifest(&r, &Reference::Tag(tag.clone()))
            .await
            .map_err(|e| mirror_failure("the manifest", e))?;
        let manifest = Manifest::parse(&bytes, Some(&record.media_type))
            .map_err(|e| JobFailure::fatal(format!("the upstream's manifest: {e}")))?;
        // Held per tag, so that a tag that moves (or leaves the filter) lets go of what it
        // pinned before.
        let by = holder(&rule.name, &p.repo, tag.as_str());
        // (digest, bytes, media type) of every manifest kept, children first.
        let mut kept = Vec::new();
        for child in &manifest.manifests {
            if !rule.wants_platform(child.platform.as_ref()) {
                continue;
            }
            let (crec, cbytes, _) = mirror
                .manifest(&r, &Reference::Digest(child.digest.clone()))
                .await
                .map_err(|e| mirror_failure("a platform's manifest", e))?;
            let cm = Manifest::parse(&cbytes, Some(&crec.media_type))
                .map_err(|e| JobFailure::fatal(format!("the upstream's manifest: {e}")))?;
            self.fetch_blobs(mirror, &r, &cm, &state).await?;
            kept.push((crec.digest.clone(), cbytes, crec.media_type.clone()));
        }
        self.fetch_blobs(mirror, &r, &manifest, &state).await?;
        kept.push((record.digest.clone(), bytes, record.media_type.clone()));

        let pins = &self.parts.pins;
        for (digest, _, _) in &kept {
            pins.pin(&r.cache_repo, digest, &by)
                .await
                .map_err(store_failure)?;
        }
        if let Some(into) = &rule.into {
            self.keep_in(into, &kept, tag.as_str()).await?;
            let top = &record.digest;
            pins.pin(into, top, &by).await.map_err(store_failure)?;
            self.pushed(into, top, Some(tag.as_str())).await;
        }
        let kept: Vec<String> = kept.iter().map(|(d, _, _)| d.to_string()).collect();
        self.release(|h| h == by, |pin| !kept.contains(&pin.digest))
            .await
            .map_err(store_failure)?;
        Ok(())
    }

    /// Drop the pins whose holder `held_by` picks and that `doomed` picks.
    async fn release(
        &self,
        held_by: impl Fn(&str) -> bool,
        doomed: impl Fn(&pier_store::Pin) -> bool,
    ) -> Result<usize, pier_store::StoreError> {
        let pins = &self.parts.pins;
        let mut released = 0;
        for pin in pins.pins().await? {
            if !doomed(&pin) {
                continue;
            }
            let Ok(digest) = pin.digest.parse::<Digest>() else {
                continue;
            };
            for h in pin.by.iter().filter(|h| held_by(h)) {
                if pins.unpin(&pin.repo, &digest, h).await? {
                    released += 1;
                }
            }
        }
        Ok(released)
    }

    /// Every blob of `manifest` in the cache, fetched from the upstream (or peers) if missing.
    async fn fetch_blobs(
        &self,
        mirror: &std::sync::Arc<Mirror>,
        r: &MirrorRef,
        manifest: &Manifest,
        state: &PullState,
    ) -> Result<(), JobFailure> {
        let rule = &state.rule.name;
        for blob in &manifest.blobs {
            if blob.urls.as_ref().is_some_and(|u| !u.is_empty()) {
                continue;
            }
            match mirror
                .blob_capped(r, &blob.digest, state.bandwidth.clone())
                .await
                .map_err(|e| mirror_failure("a blob", e))?
            {
                BlobSource::Local { .. } => {}
                BlobSource::Filling { fill, .. } => {
                    fill.finished()
                        .await
                        .map_err(|e| JobFailure::retry(format!("blob {}: {e}", blob.digest)))?;
                    self.parts.metrics.sent(rule, blob.size);
                }
            }
        }
        Ok(())
    }

    /// Keep the fetched manifests in the hosted repository `into` too: link their blobs
    /// there and store each manifest's exact bytes, the top one under `tag`.
    async fn keep_in(
        &self,
        into: &str,
        kept: &[(Digest, bytes::Bytes, String)],
        tag: &str,
    ) -> Result<(), JobFailure> {
        let meta = self.parts.registry.meta_store();
        let mirror = self
            .mirror()
            .map_err(|e| JobFailure::fatal(e.to_string()))?;
        let last = kept.len().saturating_sub(1);
        for (i, (digest, bytes, media_type)) in kept.iter().enumerate() {
            let m = Manifest::parse(bytes, Some(media_type))
                .map_err(|e| JobFailure::fatal(format!("manifest {digest}: {e}")))?;
            for blob in &m.blobs {
                if let Some(size) = self
                    .parts
                    .registry
                    .blob_store()
                    .stat(&blob.digest)
                    .await
                    .map_err(store_failure)?
                {
                    meta.link_blob(into, &blob.digest, size)
                        .await
                        .map_err(store_failure)?;
                }
            }
            let tag = (i == last).then_some(tag);
            mirror
                .store_manifest(into, digest.clone(), bytes.clone(), media_type, tag)
                .await
                .map_err(|e| mirror_failure("keeping the manifest", e))?;
        }
        Ok(())
    }
}

/// Every tag of a mirrored repository, following the upstream's pages.
async fn list_tags(r: &MirrorRef) -> Result<Vec<String>, pier_upstream::UpstreamError> {
    let mut all = Vec::new();
    let mut last: Option<String> = None;
    loop {
        let mut query = format!("n={PAGE}");
        if let Some(l) = &last {
            query.push_str(&format!("&last={l}"));
        }
        let (body, link) = r.upstream.client.tags(&r.repo, &query).await?;
        let page: TagList = serde_json::from_slice(&body).map_err(|e| {
            pier_upstream::UpstreamError::Protocol(format!("tags list of {}: {e}", r.repo))
        })?;
        let tags = page.tags.unwrap_or_default();
        let n = tags.len();
        last = tags.last().cloned();
        all.extend(tags);
        if link.is_none() || n < PAGE || last.is_none() {
            break;
        }
    }
    Ok(all)
}

fn mirror_failure(what: &str, e: MirrorError) -> JobFailure {
    // A policy refusal will not change by waiting; everything else (the upstream down, a
    // fill that broke, a full disk) may.
    match e {
        MirrorError::NotAllowed(_) => JobFailure::fatal(format!("{what}: {e}")),
        e => JobFailure::retry(format!("{what}: {e}")),
    }
}

/// Who holds the pins a pull rule's job for `repo:tag` makes: `sync:<rule>:<repo>:<tag>`.
fn holder(rule: &str, repo: &str, tag: &str) -> String {
    format!("sync:{rule}:{repo}:{tag}")
}
