//! The blob store trait: content-addressed bytes, plus the upload sessions that produce them.

use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use pier_oci::{Digest, Hasher};

use crate::{Result, Spool, StoreError};

/// A stream of bytes moving into or out of the store. Errors are I/O errors: for a request body
/// they mean the client's stream broke; for a read they mean the store failed mid-blob.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// Counters the store keeps about itself, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub blobs: u64,
    pub bytes: u64,
}

/// One stored blob, as a listing reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobEntry {
    pub digest: Digest,
    pub size: u64,
    /// Unix milliseconds of when the bytes were last written (a blob's age, for the GC grace).
    pub modified_ms: u64,
}

/// Content-addressed blob storage. A blob exists here once, whatever repositories link it;
/// which repository may see it is the metadata's business.
///
/// Upload sessions are byte buffers keyed by an id. Their durable offset lives in the metadata
/// store; a session buffer may hold bytes past that offset after a crash, and every append first
/// cuts the buffer back to the offset the caller says was acknowledged.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The size of a blob, or `None` if it is not stored.
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>>;

    /// Stream bytes `start..end` of a blob. The caller has checked the range against `stat`.
    async fn read(&self, digest: &Digest, start: u64, end: u64) -> Result<ByteStream>;

    /// Store a whole blob from a stream, verifying it against `expected` if given (else computing
    /// its sha256). Returns the digest and size. Nothing is visible unless verification passes.
    async fn put(
        &self,
        expected: Option<&Digest>,
        body: ByteStream,
        limit: Option<u64>,
    ) -> Result<(Digest, u64)>;

    /// Remove a blob's bytes. Returns whether it existed.
    async fn delete(&self, digest: &Digest) -> Result<bool>;

    /// Create an empty upload session buffer.
    async fn upload_create(&self, id: &str) -> Result<()>;

    /// Append `body` to a session at `offset` (the acknowledged length). `hasher`, when given, is
    /// the sha256 state of bytes `0..offset`; the updated state is returned with the new length.
    async fn upload_append(
        &self,
        id: &str,
        offset: u64,
        hasher: Option<Hasher>,
        body: ByteStream,
        limit: Option<u64>,
    ) -> Result<(u64, Option<Hasher>)>;

    /// Verify a session's first `len` bytes against `expected` and make them a blob. On a
    /// mismatch the session buffer is removed and `DigestMismatch` returned.
    async fn upload_commit(
        &self,
        id: &str,
        len: u64,
        expected: &Digest,
        hasher: Option<Hasher>,
    ) -> Result<()>;

    /// Remove a session buffer (no error if it is gone).
    async fn upload_delete(&self, id: &str) -> Result<()>;

    /// Ids of every session buffer present (to reconcile with metadata after a restart).
    async fn upload_ids(&self) -> Result<Vec<String>>;

    /// A new empty spool for a blob that will be written while others read it.
    async fn spool(&self) -> Result<Spool>;

    /// Make a complete, fsynced spool the blob `digest` of `size` bytes. The caller has verified
    /// the digest. Readers of the spool keep reading.
    async fn commit_spool(&self, spool: Spool, digest: &Digest, size: u64) -> Result<()>;

    fn stats(&self) -> StoreStats;

    /// Stored blobs in digest order (as strings sort), after `after`, at most `n`. For garbage
    /// collection and integrity checks, which page through the store rather than hold it.
    async fn list(&self, after: Option<&Digest>, n: usize) -> Result<Vec<BlobEntry>> {
        let _ = (after, n);
        Err(StoreError::Unsupported("listing blobs"))
    }

    /// Move a blob's bytes out of sight (a corrupt blob found by a deep check), keeping them
    /// for inspection where the backend can. Returns whether the blob was there.
    async fn quarantine(&self, digest: &Digest) -> Result<bool> {
        let _ = digest;
        Err(StoreError::Unsupported("quarantining blobs"))
    }

    /// A URL the client may fetch the blob from directly (a presigned object URL), when the
    /// store is configured to hand them out. GETs of the blob then answer with a redirect.
    async fn redirect_url(&self, _digest: &Digest) -> Result<Option<String>> {
        Ok(None)
    }

    /// An open handle on the blob's bytes when the store keeps them in a local file, so a
    /// server can hand the file to the kernel (sendfile) instead of copying it through memory.
    /// `None` where the bytes live elsewhere. A missing blob is `Io(NotFound)`, as in `read`.
    async fn open_file(&self, _digest: &Digest) -> Result<Option<std::fs::File>> {
        Ok(None)
    }
}
