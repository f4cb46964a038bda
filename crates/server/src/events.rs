//! What happens after content arrives or leaves: the one place a push, an import or a delete
//! tells the background work about it. Cluster replication to owners and the sync rules'
//! replication both start here, so every way an image gets in (a client's push, a tarball
//! import) is replicated alike.

use pier_oci::Digest;

use crate::AppState;

/// A manifest is durable in `repo` (with `tag`): queue its copies. Never fails: the content
/// is already stored, and the queueing logs its own errors.
pub async fn pushed(state: &AppState, repo: &str, digest: &Digest, tag: Option<&str>) {
    if let Some(replicator) = &state.replicator {
        replicator.pushed(repo, digest, tag).await;
    }
    if let Some(sync) = &state.sync {
        sync.pushed(repo, digest, tag).await;
    }
}

/// A manifest was deleted from `repo`: rules that propagate deletes queue them.
pub async fn deleted(state: &AppState, repo: &str, digest: &Digest) {
    if let Some(sync) = &state.sync {
        sync.deleted(repo, digest).await;
    }
}

/// Tag `tag` was deleted from `repo` (its manifest stays): rules that propagate deletes queue
/// the tag's delete.
pub async fn tag_deleted(state: &AppState, repo: &str, tag: &str) {
    if let Some(sync) = &state.sync {
        sync.tag_deleted(repo, tag).await;
    }
}
