//! Pins: manifests that something declared must stay (a pull rule that copied an image into
//! the cache, say). Eviction of cached content honours them: a pinned manifest, and what it
//! references, is never evicted while any pin on it remains.
//!
//! A pin is per (repository, manifest digest) and names who holds it (a pull rule's tag:
//! `sync:<rule>:<repo>:<tag>`), so two rules (or two tags) that want the same image each
//! hold a pin and one letting go leaves the other.

use async_trait::async_trait;
use pier_oci::Digest;
use serde::{Deserialize, Serialize};

use crate::Result;

/// One pinned manifest and who pinned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub repo: String,
    pub digest: String,
    /// The holders, sorted: `sync:<rule>:<repo>:<tag>`.
    pub by: Vec<String>,
    /// Unix milliseconds of the first pin.
    pub pinned_ms: u64,
}

/// Storage of pins. Every change is durable when the call returns.
#[async_trait]
pub trait PinStore: Send + Sync {
    /// Pin `repo@digest` on behalf of `by` (a second pin by the same holder changes nothing).
    async fn pin(&self, repo: &str, digest: &Digest, by: &str) -> Result<()>;
    /// Drop `by`'s pin; returns whether it held one. The pin goes once nobody holds it.
    async fn unpin(&self, repo: &str, digest: &Digest, by: &str) -> Result<bool>;
    /// Every pin, by repository and digest.
    async fn pins(&self) -> Result<Vec<Pin>>;
    async fn pinned(&self, repo: &str, digest: &Digest) -> Result<Option<Pin>>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RedbMetaStore;

    #[tokio::test]
    async fn pins_are_held_by_each_holder_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let d = Digest::sha256(b"manifest");
        {
            let store = RedbMetaStore::open(&path).unwrap();
            store
                .pin("docker.io/library/alpine", &d, "sync:a")
                .await
                .unwrap();
            store
                .pin("docker.io/library/alpine", &d, "sync:b")
                .await
                .unwrap();
            store
                .pin("docker.io/library/alpine", &d, "sync:a")
                .await
                .unwrap();
        }
        let store = RedbMetaStore::open(&path).unwrap();
        let pin = store
            .pinned("docker.io/library/alpine", &d)
            .await
            .unwrap()
            .expect("pinned after a reopen");
        assert_eq!(pin.by, ["sync:a", "sync:b"]);
        assert!(store.pinned("other", &d).await.unwrap().is_none());

        assert!(store
            .unpin("docker.io/library/alpine", &d, "sync:a")
            .await
            .unwrap());
        assert!(!store
            .unpin("docker.io/library/alpine", &d, "sync:a")
            .await
            .unwrap());
        assert_eq!(
            store.pins().await.unwrap().len(),
            1,
            "sync:b still holds it"
        );
        assert!(store
            .unpin("docker.io/library/alpine", &d, "sync:b")
            .await
            .unwrap());
        assert!(store.pins().await.unwrap().is_empty());
    }
}
