//! Upload sessions: from `POST /blobs/uploads/` to a verified blob.
//!
//! The acknowledged offset of each session is durable in the metadata store and is only moved
//! after the chunk's bytes are fsynced, so after a crash a session resumes from the last
//! acknowledged byte. The running sha256 state is kept in memory between chunks, with the offset
//! it has hashed up to; after a restart (or a broken chunk) it is gone and the commit re-reads
//! the buffer instead. With shared storage (S3 and PostgreSQL) the chunks of one session may
//! reach different nodes: a node's state whose offset is not the session's acknowledged offset
//! (another node appended since) is dropped, never used.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use pier_oci::{Algorithm, Digest, Hasher, RepoName};
use pier_store::{BlobStore, ByteStream, MetaStore, StoreError, UploadRecord};

use crate::{RegistryError, Result};

/// A session's in-memory state: the hash of its first `n` bytes, as `(n, state)`.
type Session = Arc<tokio::sync::Mutex<Option<(u64, Hasher)>>>;

pub struct Uploads {
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    limit: Option<u64>,
    caps: UploadCaps,
    live: Mutex<HashMap<String, Session>>,
    slots: Mutex<Slots>,
    sweep_lock: crate::SweepLock,
}

/// How many upload sessions may be open at once. Each holds a buffer on disk and a little
/// memory until it is finished, cancelled or swept, so an unbounded number is a way to fill both.
#[derive(Debug, Clone, Copy)]
pub struct UploadCaps {
    /// Sessions open in total, recovered ones included.
    pub total: u64,
    /// Sessions one client (as the caller names it: the peer address) may hold open.
    pub per_client: u64,
}

impl Default for UploadCaps {
    fn default() -> Self {
        UploadCaps {
            total: 1024,
            per_client: 128,
        }
    }
}

/// Who holds which open session. Sessions recovered after a restart have no known client: they
/// count toward the total only.
#[derive(Default)]
struct Slots {
    open: u64,
    owner: HashMap<String, String>,
    by_client: HashMap<String, u64>,
}

impl Slots {
    fn release(&mut self, id: &str) {
        self.open = self.open.saturating_sub(1);
        if let Some(client) = self.owner.remove(id) {
            if let Some(n) = self.by_client.get_mut(&client) {
                *n -= 1;
                if *n == 0 {
                    self.by_client.remove(&client);
                }
            }
        }
    }
}

/// What start-up reconciliation found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// Sessions that can resume.
    pub resumable: u64,
    /// Session records whose buffer was missing, removed.
    pub dropped_records: u64,
    /// Buffers with no session record, removed.
    pub dropped_buffers: u64,
}

/// A chunk to append: where the client says it starts and how long it says it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChunkInfo {
    pub start: Option<u64>,
    /// Inclusive end from `Content-Range`, if given.
    pub end: Option<u64>,
}

/// Take a session's hash state if it covers exactly the `offset` acknowledged bytes.
fn current(hasher: &mut Option<(u64, Hasher)>, offset: u64) -> Option<Hasher> {
    hasher
        .take()
        .filter(|(at, _)| *at == offset)
        .map(|(_, h)| h)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Uploads {
    pub(crate) fn new(
        blobs: Arc<dyn BlobStore>,
        meta: Arc<dyn MetaStore>,
        limit: Option<u64>,
        sweep_lock: crate::SweepLock,
    ) -> Uploads {
        Uploads {
            blobs,
            meta,
            limit,
            caps: UploadCaps::default(),
            live: Mutex::new(HashMap::new()),
            slots: Mutex::new(Slots::default()),
            sweep_lock,
        }
    }

    pub(crate) fn set_caps(&mut self, caps: UploadCaps) {
        self.caps = caps;
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take a slot for a new session of `client`, or say which cap is reached.
    fn reserve(&self, id: &str, client: &str) -> Result<()> {
        let mut slots = self.slots();
        if slots.open >= self.caps.total {
            return Err(RegistryError::TooManyUploads(format!(
                "{} upload sessions are open, the most this registry allows (max_upload_sessions)",
                self.caps.total
            )));
        }
        let mine = slots.by_client.get(client).copied().unwrap_or(0);
        if mine >= self.caps.per_client {
            return Err(RegistryError::TooManyUploads(format!(
                "this client has {mine} upload sessions open, the most one client may hold \
                 (max_upload_sessions_per_client); finish or cancel one first"
            )));
        }
        slots.open += 1;
        *slots.by_client.entry(client.to_string()).or_insert(0) += 1;
        slots.owner.insert(id.to_string(), client.to_string());
        Ok(())
    }

    /// Reconcile session records with session buffers after a start. Call once before serving.
    pub async fn recover(&self) -> Result<Recovery> {
        let records = self.meta.uploads().await?;
        let buffers: std::collections::HashSet<String> =
            self.blobs.upload_ids().await?.into_iter().collect();
        let mut report = Recovery::default();
        let mut known = std::collections::HashSet::new();
        for r in records {
            if buffers.contains(&r.id) {
                report.resumable += 1;
                known.insert(r.id);
            } else {
                self.meta.delete_upload(&r.id).await?;
                report.dropped_records += 1;
            }
        }
        for b in buffers.difference(&known) {
            // With shared storage another node may have opened this session since the records
            // were listed: look again before removing its buffer.
            if self.meta.upload(b).await?.is_some() {
                report.resumable += 1;
                continue;
            }
            self.blobs.upload_delete(b).await?;
            report.dropped_buffers += 1;
        }
        self.slots().open = report.resumable;
        Ok(report)
    }

    /// Remove sessions idle for longer than `idle` (no chunk acknowledged since), with their
    /// buffers. A session busy with a request right now is left alone. Returns how many went.
    pub async fn purge_idle(&self, idle: std::time::Duration) -> Result<u64> {
        let cutoff = now().saturating_sub(idle.as_secs());
        let mut purged = 0;
        for record in self.meta.uploads().await? {
            let last = record.updated.max(record.started);
            if last >= cutoff {
                continue;
            }
            let session = self.session(&record.id);
            let Ok(_guard) = session.try_lock() else {
                continue;
            };
            // Check again under the lock: a chunk may have landed since the listing.
            match self.meta.upload(&record.id).await? {
                Some(r) if r.updated.max(r.started) < cutoff => {}
                _ => continue,
            }
            self.blobs.upload_delete(&record.id).await?;
            self.meta.delete_upload(&record.id).await?;
            self.forget(&record.id, true);
            purged += 1;
        }
        Ok(purged)
    }

    /// Sessions currently open.
    pub fn open_sessions(&self) -> u64 {
        self.slots().open
    }

    fn session(&self, id: &str) -> Session {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.entry(id.to_string()).or_default().clone()
    }

    /// Forget the in-memory state of a session; `closed` when the session itself ended.
    fn forget(&self, id: &str, closed: bool) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.remove(id);
        drop(live);
        if closed {
            self.slots().release(id);
        }
    }

    /// The session's record, or forget the in-memory entry made while looking it up. A live
    /// session of another repository keeps its entry: requests of its owner may be queued on
    /// that entry's lock, and a fresh entry would let a newcomer append beside them.
    async fn lookup(&self, repo: &RepoName, id: &str) -> Result<UploadRecord> {
        match self.meta.upload(id).await? {
            Some(r) if r.repo == repo.as_str() => Ok(r),
            Some(_) => Err(RegistryError::UploadUnknown),
            None => {
                self.forget(id, false);
                Err(RegistryError::UploadUnknown)
            }
        }
    }

    /// Open a session for `client` (any stable name for the caller, such as its IP address),
    /// within [`UploadCaps`].
    pub async fn start(&self, repo: &RepoName, client: &str) -> Result<UploadRecord> {
        let id = uuid::Uuid::new_v4().to_string();
        self.reserve(&id, client)?;
        match self.create(repo, &id).await {
            Ok(r) => Ok(r),
            Err(e) => {
                self.slots().release(&id);
                Err(e)
            }
        }
    }

    async fn create(&self, repo: &RepoName, id: &str) -> Result<UploadRecord> {
        let id = id.to_string();
        self.blobs.upload_create(&id).await?;
        let record = UploadRecord {
            id: id.clone(),
            repo: repo.to_string(),
            offset: 0,
            started: now(),
            updated: now(),
        };
        self.meta.put_upload(&record).await?;
        *self.session(&id).lock().await = Some((0, Hasher::new(Algorithm::Sha256)));
        Ok(record)
    }

    /// A session of `repo`.
    pub async fn status(&self, repo: &RepoName, id: &str) -> Result<UploadRecord> {
        match self.meta.upload(id).await? {
            Some(r) if r.repo == repo.as_str() => Ok(r),
            _ => Err(RegistryError::UploadUnknown),
        }
    }

    async fn append_locked(
        &self,
        hasher: &mut Option<(u64, Hasher)>,
        mut record: UploadRecord,
        chunk: ChunkInfo,
        body: ByteStream,
    ) -> Result<UploadRecord> {
        if let Some(start) = chunk.start {
            if start != record.offset {
                return Err(RegistryError::ChunkOutOfOrder {
                    current: record.offset,
                });
            }
        }
        let state = current(hasher, record.offset);
        let (len, state) = self
            .blobs
            .upload_append(&record.id, record.offset, state, body, self.limit)
            .await?;
        if let (Some(start), Some(end)) = (chunk.start, chunk.end) {
            if len != end + 1 {
                // The bytes stay unacknowledged; the next append cuts them off.
                return Err(RegistryError::UploadInvalid(format!(
                    "Content-Range {start}-{end} announced {} bytes, the body had {}",
                    end + 1 - start,
                    len - start
                )));
            }
        }
        record.offset = len;
        record.updated = now();
        self.meta.put_upload(&record).await?;
        *hasher = state.map(|h| (len, h));
        Ok(record)
    }

    /// Append a chunk (`PATCH`).
    pub async fn append(
        &self,
        repo: &RepoName,
        id: &str,
        chunk: ChunkInfo,
        body: ByteStream,
    ) -> Result<UploadRecord> {
        let session = self.session(id);
        let mut hasher = session.lock().await;
        let record = self.lookup(repo, id).await?;
        self.append_locked(&mut hasher, record, chunk, body).await
    }

    /// Close a session (`PUT ?digest=`), with an optional last chunk: verify and link the blob.
    /// Returns the blob's size.
    pub async fn finish(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        last: Option<(ChunkInfo, ByteStream)>,
    ) -> Result<u64> {
        let session = self.session(id);
        let mut hasher = session.lock().await;
        let mut record = self.lookup(repo, id).await?;
        if let Some((chunk, body)) = last {
            record = self.append_locked(&mut hasher, record, chunk, body).await?;
        }
        let size = record.offset;
        // The commit (which may find the blob already stored) and the link are one step for
        // the collector: it never deletes the bytes between them.
        let _sweep = self.sweep_lock.write(std::slice::from_ref(digest)).await?;
        match self
            .blobs
            .upload_commit(id, size, digest, current(&mut hasher, size))
            .await
        {
            Ok(()) => {}
            Err(e @ StoreError::DigestMismatch { .. }) => {
                // The store removed the buffer; the session is over.
                self.meta.delete_upload(id).await?;
                self.forget(id, true);
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        }
        self.meta.link_blob(repo.as_str(), digest, size).await?;
        self.meta.delete_upload(id).await?;
        self.forget(id, true);
        Ok(size)
    }

    /// Abandon a session (`DELETE`).
    pub async fn cancel(&self, repo: &RepoName, id: &str) -> Result<()> {
        let session = self.session(id);
        let _guard = session.lock().await;
        self.lookup(repo, id).await?;
        self.blobs.upload_delete(id).await?;
        self.meta.delete_upload(id).await?;
        self.forget(id, true);
        Ok(())
    }
}
