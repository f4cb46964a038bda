//! The lock between the collector's sweep of a blob and the registry's writes that check a
//! blob and then rely on its bytes (an upload's commit and link, a whole-blob put, a mount, a
//! manifest put's check and store).
//!
//! Within this process it is one read-write lock: writers share it, a sweep (of one blob by
//! the collector or the cache's eviction) takes it alone. Nodes that share their stores (S3 +
//! PostgreSQL) also take [`MetaStore::hold_blobs`] on the blobs concerned, so a sweep on one
//! node never falls between another node's check and its write.

use std::sync::Arc;

use pier_oci::Digest;
use pier_store::{BlobHold, MetaStore};
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use crate::Result;

#[derive(Clone)]
pub(crate) struct SweepLock {
    local: Arc<RwLock<()>>,
    meta: Arc<dyn MetaStore>,
}

/// What a writer or a sweep holds; dropping it lets the other side on. A writer holds this
/// process's lock shared, a sweep alone: exactly one of the two guards is there.
pub(crate) struct Held {
    // Fields drop in order: the store's hold goes first, then this process's lock.
    _shared: Option<BlobHold>,
    _write: Option<OwnedRwLockReadGuard<()>>,
    _sweep: Option<OwnedRwLockWriteGuard<()>>,
}

impl SweepLock {
    pub(crate) fn new(meta: Arc<dyn MetaStore>) -> SweepLock {
        SweepLock {
            local: Arc::default(),
            meta,
        }
    }

    /// Held by a write that checks `digests` and then links or references them.
    pub(crate) async fn write(&self, digests: &[Digest]) -> Result<Held> {
        let local = self.local.clone().read_owned().await;
        let shared = self.meta.hold_blobs(digests, false).await?;
        Ok(Held {
            _shared: shared,
            _write: Some(local),
            _sweep: None,
        })
    }

    /// Held by a sweep while it unlinks and deletes `digest`.
    pub(crate) async fn sweep(&self, digest: &Digest) -> Result<Held> {
        let local = self.local.clone().write_owned().await;
        let shared = self
            .meta
            .hold_blobs(std::slice::from_ref(digest), true)
            .await?;
        Ok(Held {
            _shared: shared,
            _write: None,
            _sweep: Some(local),
        })
    }
}
