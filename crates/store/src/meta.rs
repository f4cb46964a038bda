//! The metadata store trait and the records it keeps.

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use pier_oci::{Descriptor, Digest};
use serde::{Deserialize, Serialize};

use crate::{Result, StoreError};

/// What pier remembers about a manifest in a repository. The bytes are kept separately, exactly
/// as received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Blobs and manifests this manifest references (for garbage collection).
    #[serde(default)]
    pub references: Vec<Digest>,
    /// Unix milliseconds of when this manifest was last stored (pushed or fetched again); 0
    /// for a record stored before pier kept the time, which untagged retention never removes.
    #[serde(default)]
    pub stored_ms: u64,
}

impl ManifestRecord {
    /// The descriptor of this manifest in a referrers index.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            artifact_type: self.artifact_type.clone(),
            annotations: self.annotations.clone(),
            urls: None,
            platform: None,
        }
    }
}

/// An upload session. `offset` is the number of bytes acknowledged to the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRecord {
    pub id: String,
    pub repo: String,
    pub offset: u64,
    /// Seconds since the Unix epoch when the session started.
    pub started: u64,
    /// Seconds since the Unix epoch of the last acknowledged chunk (or the start).
    #[serde(default)]
    pub updated: u64,
}

/// One page of a sorted listing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    pub items: Vec<String>,
    /// Whether more items follow the last one returned.
    pub more: bool,
}

/// A hold on blobs from [`MetaStore::hold_blobs`]; dropping it releases them.
pub type BlobHold = Box<dyn Send + Sync>;

/// Repositories, tags, manifests, blob links, referrers and upload sessions.
///
/// Each mutating call is one transaction: when it returns `Ok`, the change is durable.
#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// Repositories in order, after `last`, at most `n`.
    async fn repos(&self, last: Option<&str>, n: usize) -> Result<Page>;
    async fn repo_exists(&self, repo: &str) -> Result<bool>;

    /// Record that `repo` holds blob `digest` of `size` bytes.
    async fn link_blob(&self, repo: &str, digest: &Digest, size: u64) -> Result<()>;
    /// The size of a blob linked in `repo`.
    async fn blob_link(&self, repo: &str, digest: &Digest) -> Result<Option<u64>>;
    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> Result<bool>;

    /// Store a manifest's bytes and record, optionally pointing `tag` at it, and index it as a
    /// referrer of its subject. One transaction.
    async fn put_manifest(
        &self,
        repo: &str,
        record: &ManifestRecord,
        bytes: Bytes,
        tag: Option<&str>,
    ) -> Result<()>;
    async fn manifest(&self, repo: &str, digest: &Digest) -> Result<Option<ManifestRecord>>;
    async fn manifest_bytes(&self, digest: &Digest) -> Result<Option<Bytes>>;
    async fn resolve_tag(&self, repo: &str, tag: &str) -> Result<Option<Digest>>;
    /// Remove a manifest from a repository with every tag that points at it and its referrer
    /// entry. Returns whether it existed.
    async fn delete_manifest(&self, repo: &str, digest: &Digest) -> Result<bool>;
    async fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool>;
    /// Tags of `repo` in order, after `last`, at most `n`.
    async fn tags(&self, repo: &str, last: Option<&str>, n: usize) -> Result<Page>;
    /// Manifests in `repo` whose subject is `subject`.
    async fn referrers(&self, repo: &str, subject: &Digest) -> Result<Vec<ManifestRecord>>;

    async fn put_upload(&self, upload: &UploadRecord) -> Result<()>;
    async fn upload(&self, id: &str) -> Result<Option<UploadRecord>>;
    async fn delete_upload(&self, id: &str) -> Result<()>;
    async fn uploads(&self) -> Result<Vec<UploadRecord>>;

    // ---- garbage collection and integrity checks ----
    //
    // The collector's model (garage's): a blob first becomes "deletable since T" (a mark),
    // and only a blob still marked is removed. Every write that makes a blob wanted again
    // ([`MetaStore::link_blob`], [`MetaStore::put_manifest`] of a manifest referencing it)
    // clears its mark in the same transaction, so a push racing the collector wins.

    /// Every manifest of every repository, ordered by (repository, digest), after `after`, at
    /// most `n`.
    async fn manifest_page(
        &self,
        after: Option<(&str, &Digest)>,
        n: usize,
    ) -> Result<Vec<(String, ManifestRecord)>> {
        let _ = (after, n);
        Err(StoreError::Unsupported("listing manifests"))
    }

    /// Every tag of `repo` with the manifest it points at, ordered by tag, after `after`, at
    /// most `n` (a whole page of tags resolved in one read, for untagged-manifest retention).
    async fn tag_page(
        &self,
        repo: &str,
        after: Option<&str>,
        n: usize,
    ) -> Result<Vec<(String, Digest)>> {
        let _ = (repo, after, n);
        Err(StoreError::Unsupported("listing tags with their manifests"))
    }

    /// Every blob link (repository, digest, size), ordered by (repository, digest), after
    /// `after`, at most `n`.
    async fn link_page(
        &self,
        after: Option<(&str, &Digest)>,
        n: usize,
    ) -> Result<Vec<(String, Digest, u64)>> {
        let _ = (after, n);
        Err(StoreError::Unsupported("listing blob links"))
    }

    /// Mark blobs deletable as of `at_ms` (unix milliseconds). A blob already marked keeps
    /// the new time.
    async fn gc_mark(&self, digests: &[Digest], at_ms: u64) -> Result<()> {
        let _ = (digests, at_ms);
        Err(StoreError::Unsupported("garbage collection marks"))
    }

    /// Clear marks (the collector found the blobs referenced after all).
    async fn gc_unmark(&self, digests: &[Digest]) -> Result<()> {
        let _ = digests;
        Err(StoreError::Unsupported("garbage collection marks"))
    }

    /// In one transaction: if `digest` is still marked deletable as of `at_ms`, remove the
    /// mark and every repository's link to it, and return those repositories; if the mark is
    /// gone or newer (something wanted the blob since), change nothing and return `None`.
    /// Only after `Some` may the caller delete the bytes.
    async fn gc_sweep(&self, digest: &Digest, at_ms: u64) -> Result<Option<Vec<String>>> {
        let _ = (digest, at_ms);
        Err(StoreError::Unsupported("garbage collection"))
    }
    /// In one transaction: if no tag of `repo` points at manifest `digest` and it was stored
    /// (with a known time) at or before `stored_before_ms`, remove it as
    /// [`MetaStore::delete_manifest`] does and return true; otherwise change nothing. For
    /// untagged-manifest retention: a push that tags or stores it again meanwhile keeps it.
    async fn delete_untagged_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        stored_before_ms: u64,
    ) -> Result<bool> {
        let _ = (repo, digest, stored_before_ms);
        Err(StoreError::Unsupported("untagged-manifest retention"))
    }

    // ---- cache eviction ----

    /// Remember when blobs were last read (unix ms), so least-recently-used order survives a
    /// restart. Called with batches gathered in memory; a later time replaces an earlier one.
    async fn record_access(&self, accesses: &[(Digest, u64)]) -> Result<()> {
        let _ = accesses;
        Err(StoreError::Unsupported("blob access times"))
    }

    /// The last recorded read of each of `digests` (unix ms), `None` where none is recorded.
    async fn access_times(&self, digests: &[Digest]) -> Result<Vec<Option<u64>>> {
        let _ = digests;
        Err(StoreError::Unsupported("blob access times"))
    }

    // ---- between nodes sharing the store ----

    /// Hold `digests` against a sweep by any node that shares this store, until the returned
    /// hold drops: shared by a write that checks blobs and then links or references them,
    /// exclusive (one digest at a time) by a sweep while it unlinks and deletes a blob. `None`
    /// for a store only this process uses, where the registry's own lock already excludes.
    async fn hold_blobs(&self, digests: &[Digest], exclusive: bool) -> Result<Option<BlobHold>> {
        let _ = (digests, exclusive);
        Ok(None)
    }
}
