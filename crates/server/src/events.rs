//! What follows an image becoming visible here, whichever way it arrived: a manifest push
//! (`v2.rs`) or an imported archive (`import.rs`). One function, so that everything that reacts
//! to new content (copying it to its cluster owners, replication rules) hooks in once.

use pier_oci::Digest;

use crate::AppState;

/// `repo` now holds the manifest `digest`, tagged `tag` if it was pushed by tag. Called after
/// the manifest is durable; what it starts is durable jobs, so it never fails the push.
pub async fn pushed(state: &AppState, repo: &str, digest: &Digest, tag: Option<&str>) {
    if let Some(replicator) = &state.replicator {
        // The push is durable here; the copies to the owners are durable jobs.
        replicator.pushed(repo, digest, tag).await;
    }
}
