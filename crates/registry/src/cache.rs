//! What cache eviction needs from the read path: who is reading which blob right now (a
//! blob with readers is never evicted) and when each blob was last read (least recently used
//! goes first). Reads are counted in memory, and access times gathered in memory and written
//! to the metadata store in batches ([`Registry::flush_access`]), so a read costs a map update,
//! not a transaction, and the order survives a restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pier_oci::Digest;

use crate::{Registry, Result};

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Default)]
struct ReadState {
    readers: HashMap<Digest, usize>,
    /// Reads since the last flush: digest → unix ms.
    accessed: HashMap<Digest, u64>,
}

/// Readers and recent accesses of blobs. Cheap to clone.
#[derive(Clone, Default)]
pub struct Reads(Arc<Mutex<ReadState>>);

impl Reads {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReadState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Count a reader of `digest` until the guard is dropped, and note the access.
    pub fn enter(&self, digest: &Digest) -> ReadGuard {
        let mut s = self.lock();
        *s.readers.entry(digest.clone()).or_insert(0) += 1;
        s.accessed.insert(digest.clone(), unix_ms());
        ReadGuard {
            reads: self.clone(),
            digest: digest.clone(),
        }
    }

    pub fn readers(&self, digest: &Digest) -> usize {
        self.lock().readers.get(digest).copied().unwrap_or(0)
    }

    /// The accesses not yet flushed, and forget them.
    fn take_accessed(&self) -> Vec<(Digest, u64)> {
        std::mem::take(&mut self.lock().accessed)
            .into_iter()
            .collect()
    }

    fn accessed(&self, digest: &Digest) -> Option<u64> {
        self.lock().accessed.get(digest).copied()
    }
}

/// One reader's place on a blob.
pub struct ReadGuard {
    reads: Reads,
    digest: Digest,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut s = self.reads.lock();
        if let Some(n) = s.readers.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                s.readers.remove(&self.digest);
            }
        }
    }
}

impl Registry {
    /// Readers of blobs and their access times.
    pub fn reads(&self) -> &Reads {
        &self.reads
    }

    /// Write the access times gathered since the last flush to the metadata store.
    pub async fn flush_access(&self) -> Result<usize> {
        let batch = self.reads.take_accessed();
        if batch.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self.meta.record_access(&batch).await {
            // Keep them for the next flush rather than lose the order.
            let mut s = self.reads.lock();
            for (d, t) in batch {
                let slot = s.accessed.entry(d).or_insert(t);
                *slot = (*slot).max(t);
            }
            return Err(e.into());
        }
        Ok(batch.len())
    }

    /// When each blob was last read: in memory since the last flush, else as recorded, else
    /// `None`.
    pub async fn last_access(&self, digests: &[Digest]) -> Result<Vec<Option<u64>>> {
        let recorded = self.meta.access_times(digests).await?;
        Ok(digests
            .iter()
            .zip(recorded)
            .map(|(d, r)| self.reads.accessed(d).or(r))
            .collect())
    }

    /// Evict one cached blob: unlink it everywhere and delete its bytes, unless it has a
    /// reader or something linked or referenced it since `mark_ms` (when the caller marked
    /// it with [`pier_store::MetaStore::gc_mark`]). Returns whether it went.
    pub async fn evict_blob(&self, digest: &Digest, mark_ms: u64) -> Result<bool> {
        let _sweep = self.sweep_lock.sweep(digest).await?;
        if self.reads.readers(digest) > 0 {
            self.meta.gc_unmark(std::slice::from_ref(digest)).await?;
            return Ok(false);
        }
        match self.meta.gc_sweep(digest, mark_ms).await? {
            Some(_) => Ok(self.blobs.delete(digest).await?),
            None => Ok(false),
        }
    }
}
