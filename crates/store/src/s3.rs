//! Blobs in an S3 bucket (AWS, or anything that speaks its API), through `object_store`.
//!
//! Keys under the configured prefix:
//!
//! - `blobs/<alg>/<hex>`: committed blobs. A key appears only when its bytes are complete and
//!   verified: a whole-blob `put` with a known digest streams into a multipart upload of the
//!   final key and completes it only after the digest matched (a mismatch aborts it, and S3
//!   never shows an incomplete multipart upload); one without a known digest goes to `tmp/`
//!   first and is copied into place once its digest is computed.
//! - `uploads/<id>/session`: the marker of an upload session, and `uploads/<id>/<offset>` (the
//!   offset zero-padded to 20 digits) one object per chunk. Each acknowledged chunk is its own
//!   complete object before the metadata's offset moves past it, so any node can append the next
//!   chunk or commit the session, and a node killed mid-chunk leaves only an object at an offset
//!   nobody acknowledged, which the next append replaces. The commit streams the chunks in order
//!   into a multipart upload of the blob key, hashing on the way, and completes it only when the
//!   digest matches (a session of one chunk whose hash is known is copied server-side instead).
//! - `tmp/<uuid>`: whole blobs whose digest was not known in advance, while they are hashed.
//! - `quarantine/<alg>-<hex>-<unix ms>`: a blob a deep check found corrupt, copied out of
//!   `blobs/` for inspection (nothing reads it again).
//!
//! Spools (mirror fills that others read while they are written) are local files under the
//! node's data directory, uploaded when committed.
//!
//! Memory: a part buffer of [`PART`] bytes per stream, a few parts in flight.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use pier_oci::{Algorithm, Digest, Hasher};

use crate::blob::{BlobEntry, BlobStore, ByteStream, StoreStats};
use crate::{Result, Spool, StoreError};

/// One chunk object of an upload session: (offset, size).
type Chunk = (u64, u64);

/// Size of each multipart part (S3's minimum is 5 MiB for all but the last).
const PART: usize = 8 * 1024 * 1024;
/// Parts uploading at once per stream: the body is read no further ahead than this.
const PARTS_IN_FLIGHT: usize = 2;
/// Size of each read from a spool file when it is uploaded.
const SPOOL_READ: usize = 1024 * 1024;

/// How to reach the bucket. Credentials left out come from the usual AWS environment
/// variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// `AWS_REGION`, …), as the AWS tools read them.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub bucket: String,
    /// `http(s)://host:port` of an S3-compatible server; `None` for AWS itself.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`) instead of virtual-host style
    /// (`bucket.endpoint/key`).
    pub path_style: bool,
    /// Prepended to every key, so several sites can share a bucket (`site-a/`).
    pub prefix: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// When set, blob GETs may be answered with a redirect to a presigned URL valid this long.
    pub redirect: Option<Duration>,
}

/// The S3 blob store. Cheap to share behind an `Arc`.
pub struct S3BlobStore {
    store: Arc<AmazonS3>,
    prefix: String,
    /// Local directory for spools.
    spool_dir: PathBuf,
    redirect: Option<Duration>,
    blobs: AtomicU64,
    bytes: AtomicU64,
}

impl std::fmt::Debug for S3BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3BlobStore")
            .field("store", &self.store.to_string())
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Map an object store error: a missing key is the caller's business (`None`, unknown upload),
/// everything else is storage that failed and may work on a retry.
fn s3_err(e: object_store::Error) -> StoreError {
    StoreError::Io(std::io::Error::other(format!("s3: {e}")))
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl S3BlobStore {
    /// Connect to the bucket, check it answers, and count the blobs in it.
    pub async fn open(options: S3Options, spool_dir: PathBuf) -> Result<Arc<S3BlobStore>> {
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&options.bucket);
        if let Some(endpoint) = &options.endpoint {
            b = b
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(region) = &options.region {
            b = b.with_region(region);
        }
        b = b.with_virtual_hosted_style_request(!options.path_style);
        if let Some(k) = &options.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(s) = &options.secret_access_key {
            b = b.with_secret_access_key(s);
        }
        if let Some(t) = &options.session_token {
            b = b.with_token(t);
        }
        let store = b.build().map_err(s3_err)?;
        let mut prefix = options.prefix.trim_matches('/').to_string();
        if !prefix.is_empty() {
            prefix.push('/');
        }
        std::fs::create_dir_all(&spool_dir)?;
        for entry in std::fs::read_dir(&spool_dir)? {
            let _ = std::fs::remove_file(entry?.path());
        }
        let this = S3BlobStore {
            store: Arc::new(store),
            prefix,
            spool_dir,
            redirect: options.redirect,
            blobs: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        };
        let mut listing = this.store.list(Some(&this.key("blobs")));
        let (mut blobs, mut bytes) = (0u64, 0u64);
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(s3_err)?;
            blobs += 1;
            bytes += meta.size;
        }
        drop(listing);
        this.blobs.store(blobs, Ordering::Relaxed);
        this.bytes.store(bytes, Ordering::Relaxed);
        Ok(Arc::new(this))
    }

    fn key(&self, rest: &str) -> Path {
        Path::from(format!("{}{rest}", self.prefix))
    }

    fn blob_key(&self, d: &Digest) -> Path {
        self.key(&format!("blobs/{}/{}", d.algorithm().as_str(), d.hex()))
    }

    fn session_dir(&self, id: &str) -> Path {
        // Ids come from the route parser (UUID shape), never from raw user input.
        self.key(&format!("uploads/{id}"))
    }

    fn marker_key(&self, id: &str) -> Path {
        self.key(&format!("uploads/{id}/session"))
    }

    fn chunk_key(&self, id: &str, offset: u64) -> Path {
        self.key(&format!("uploads/{id}/{offset:020}"))
    }

    /// A presigned URL for a GET of the blob, if redirects are on.
    pub async fn presigned(&self, digest: &Digest) -> Result<Option<String>> {
        let Some(ttl) = self.redirect else {
            return Ok(None);
        };
        let url = self
            .store
            .signed_url(http::Method::GET, &self.blob_key(digest), ttl)
            .await
            .map_err(s3_err)?;
        Ok(Some(url.to_string()))
    }

    async fn head(&self, key: &Path) -> Result<Option<u64>> {
        match self.store.head(key).await {
            Ok(m) => Ok(Some(m.size)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(s3_err(e)),
        }
    }

    /// The chunks of a session, in order, as (offset, size); errors if the session is unknown.
    async fn chunks(&self, id: &str) -> Result<Vec<(u64, u64)>> {
        let dir = self.session_dir(id);
        let mut listing = self.store.list(Some(&dir));
        let mut marker = false;
        let mut chunks = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(s3_err)?;
            let Some(name) = meta.location.filename() else {
                continue;
            };
            if name == "session" {
                marker = true;
            } else if let Ok(offset) = name.parse::<u64>() {
                chunks.push((offset, meta.size));
            }
        }
        if !marker {
            return Err(StoreError::UploadUnknown);
        }
        chunks.sort_unstable();
        Ok(chunks)
    }

    /// The chunks covering exactly `0..len`: every acknowledged byte once, in order. Chunks
    /// past `len` (written, never acknowledged) are returned apart.
    fn acknowledged(chunks: &[Chunk], len: u64) -> Result<(Vec<Chunk>, Vec<u64>)> {
        let mut covered = 0u64;
        let mut keep = Vec::new();
        let mut stale = Vec::new();
        for &(offset, size) in chunks {
            if offset >= len {
                stale.push(offset);
                continue;
            }
            if offset != covered || offset + size > len {
                return Err(StoreError::UploadDamaged(format!(
                    "chunk at {offset} of {size} bytes does not follow byte {covered} \
                     within the {len} acknowledged"
                )));
            }
            covered += size;
            keep.push((offset, size));
        }
        if covered != len {
            return Err(StoreError::UploadDamaged(format!(
                "chunks hold {covered} bytes, {len} were acknowledged"
            )));
        }
        Ok((keep, stale))
    }

    /// Stream `body` into the object `key`, hashing on the way. The object is written only if
    /// `check` accepts the final hash (else nothing appears). Returns the length and the hasher.
    async fn write_object<S>(
        &self,
        key: &Path,
        mut body: S,
        mut hasher: Option<Hasher>,
        already: u64,
        limit: Option<u64>,
        check: impl FnOnce(Option<&Hasher>) -> Result<()>,
    ) -> Result<(u64, Option<Hasher>)>
    where
        S: futures::Stream<Item = Result<Bytes>> + Unpin,
    {
        let mut written = 0u64;
        let mut first = BytesMut::new();
        let mut writer: Option<WriteMultipart> = None;
        let outcome: Result<()> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                written += chunk.len() as u64;
                if let Some(limit) = limit {
                    if already + written > limit {
                        return Err(StoreError::TooLarge { limit });
                    }
                }
                if let Some(h) = hasher.as_mut() {
                    h.update(&chunk);
                }
                match writer.as_mut() {
                    Some(w) => {
                        w.wait_for_capacity(PARTS_IN_FLIGHT).await.map_err(s3_err)?;
                        w.put(chunk);
                    }
                    None => {
                        first.extend_from_slice(&chunk);
                        if first.len() >= PART {
                            // Big enough for multipart: start it with what is buffered.
                            let upload = self.store.put_multipart(key).await.map_err(s3_err)?;
                            let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
                            w.put(first.split().freeze());
                            writer = Some(w);
                        }
                    }
                }
            }
            Ok(())
        }
        .await;
        let verdict = outcome.and_then(|()| check(hasher.as_ref()));
        match (verdict, writer) {
            (Ok(()), Some(w)) => {
                w.finish().await.map_err(s3_err)?;
            }
            (Ok(()), None) => {
                self.store
                    .put(key, PutPayload::from(first.freeze()))
                    .await
                    .map_err(s3_err)?;
            }
            (Err(e), Some(w)) => {
                if let Err(abort) = w.abort().await {
                    tracing::warn!(error = %abort, "aborting a multipart upload failed");
                }
                return Err(e);
            }
            (Err(e), None) => return Err(e),
        }
        Ok((written, hasher))
    }

    /// The bytes `range` of an object as a stream.
    async fn get_stream(&self, key: &Path, range: Range<u64>) -> Result<ByteStream> {
        if range.is_empty() {
            return Ok(Box::pin(futures::stream::empty()));
        }
        let opts = GetOptions {
            range: Some(GetRange::Bounded(range)),
            ..Default::default()
        };
        let got = match self.store.get_opts(key, opts).await {
            Ok(got) => got,
            // Gone (collected or evicted since the caller looked): as a missing file reads.
            Err(e) if is_not_found(&e) => {
                return Err(StoreError::Io(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("s3: {e}"),
                )))
            }
            Err(e) => return Err(s3_err(e)),
        };
        Ok(Box::pin(
            got.into_stream()
                .map_err(|e| std::io::Error::other(format!("s3: {e}"))),
        ))
    }

    /// Lower the counters for a blob of `size` bytes that left.
    fn uncount(&self, size: u64) {
        let _ = self
            .blobs
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(size))
            });
    }

    /// Count a blob that was just made visible, unless it was there before.
    fn count(&self, existed: bool, size: u64) {
        if !existed {
            self.blobs.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(size, Ordering::Relaxed);
        }
    }

    async fn delete_session(&self, id: &str) -> Result<()> {
        let dir = self.session_dir(id);
        let keys: Vec<Path> = self
            .store
            .list(Some(&dir))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(s3_err)?;
        // Chunks first, the marker last: a session half-deleted still reads as a session,
        // which a later delete (or the idle sweep) finishes.
        let marker = self.marker_key(id);
        for key in keys.iter().filter(|k| **k != marker) {
            delete_quietly(&self.store, key).await?;
        }
        delete_quietly(&self.store, &marker).await
    }
}

async fn delete_quietly(store: &AmazonS3, key: &Path) -> Result<()> {
    match store.delete(key).await {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(s3_err(e)),
    }
}

fn verify(expected: &Digest, h: Option<&Hasher>) -> Result<()> {
    let actual = h
        .cloned()
        .ok_or_else(|| StoreError::Corrupt("hasher lost".into()))?
        .finish();
    if actual != *expected {
        return Err(StoreError::DigestMismatch {
            expected: expected.clone(),
            actual,
        });
    }
    Ok(())
}

/// The objects `keys` (each read up to its size), one after the other.
fn concat_chunks(
    store: Arc<AmazonS3>,
    keys: Vec<(Path, u64)>,
) -> BoxStream<'static, Result<Bytes>> {
    futures::stream::iter(keys)
        .then(move |(k, size)| {
            let store = store.clone();
            async move {
                let opts = GetOptions {
                    range: Some(GetRange::Bounded(0..size)),
                    ..Default::default()
                };
                let got = store.get_opts(&k, opts).await.map_err(s3_err)?;
                Ok::<_, StoreError>(got.into_stream().map_err(s3_err))
            }
        })
        .try_flatten()
        .boxed()
}

/// The first `size` bytes of a spool, in reads of [`SPOOL_READ`].
fn spool_reads(spool: Spool, size: u64) -> BoxStream<'static, Result<Bytes>> {
    futures::stream::iter((0..size).step_by(SPOOL_READ))
        .then(move |off| {
            let s = spool.clone();
            async move {
                let n = (size - off).min(SPOOL_READ as u64) as usize;
                s.read_at(off, n).await
            }
        })
        .boxed()
}

fn body_stream(body: ByteStream) -> impl futures::Stream<Item = Result<Bytes>> + Unpin {
    body.map_err(StoreError::Body)
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        self.head(&self.blob_key(digest)).await
    }

    async fn read(&self, digest: &Digest, start: u64, end: u64) -> Result<ByteStream> {
        self.get_stream(&self.blob_key(digest), start..end).await
    }

    async fn put(
        &self,
        expected: Option<&Digest>,
        body: ByteStream,
        limit: Option<u64>,
    ) -> Result<(Digest, u64)> {
        let algorithm = expected.map_or(Algorithm::Sha256, |d| d.algorithm());
        let hasher = Some(Hasher::new(algorithm));
        if let Some(expected) = expected {
            let key = self.blob_key(expected);
            let existed = self.head(&key).await?.is_some();
            let (size, _) = self
                .write_object(&key, body_stream(body), hasher, 0, limit, |h| {
                    verify(expected, h)
                })
                .await?;
            self.count(existed, size);
            return Ok((expected.clone(), size));
        }
        let tmp = self.key(&format!("tmp/{}", uuid::Uuid::new_v4()));
        let (size, hasher) = self
            .write_object(&tmp, body_stream(body), hasher, 0, limit, |_| Ok(()))
            .await?;
        let digest = hasher
            .ok_or_else(|| StoreError::Corrupt("hasher lost".into()))?
            .finish();
        let key = self.blob_key(&digest);
        let existed = self.head(&key).await?.is_some();
        let copied = if existed {
            Ok(())
        } else {
            self.store.copy(&tmp, &key).await.map_err(s3_err)
        };
        delete_quietly(&self.store, &tmp).await?;
        copied?;
        self.count(existed, size);
        Ok((digest, size))
    }

    async fn delete(&self, digest: &Digest) -> Result<bool> {
        let key = self.blob_key(digest);
        let Some(size) = self.head(&key).await? else {
            return Ok(false);
        };
        delete_quietly(&self.store, &key).await?;
        self.uncount(size);
        Ok(true)
    }

    async fn upload_create(&self, id: &str) -> Result<()> {
        self.store
            .put(&self.marker_key(id), PutPayload::new())
            .await
            .map_err(s3_err)?;
        Ok(())
    }

    async fn upload_append(
        &self,
        id: &str,
        offset: u64,
        hasher: Option<Hasher>,
        body: ByteStream,
        limit: Option<u64>,
    ) -> Result<(u64, Option<Hasher>)> {
        let chunks = self.chunks(id).await?;
        let (_, stale) = Self::acknowledged(&chunks, offset)?;
        // Chunks past the acknowledged offset were never acknowledged (a broken request, or a
        // node that died before it could say so): they go before the new one is written.
        for s in stale {
            delete_quietly(&self.store, &self.chunk_key(id, s)).await?;
        }
        let key = self.chunk_key(id, offset);
        let (written, hasher) = self
            .write_object(&key, body_stream(body), hasher, offset, limit, |_| Ok(()))
            .await?;
        if written == 0 {
            // An empty chunk adds nothing; do not leave an empty object behind.
            delete_quietly(&self.store, &key).await?;
        }
        Ok((offset + written, hasher))
    }

    async fn upload_commit(
        &self,
        id: &str,
        len: u64,
        expected: &Digest,
        hasher: Option<Hasher>,
    ) -> Result<()> {
        let chunks = self.chunks(id).await?;
        let (keep, _) = Self::acknowledged(&chunks, len)?;
        let key = self.blob_key(expected);
        let existed = self.head(&key).await?.is_some();
        let known = hasher.filter(|h| h.algorithm() == expected.algorithm());
        let result = match (keep.as_slice(), known) {
            // One chunk and its hash known: check it, then let S3 copy the bytes.
            ([(offset, _)], Some(h)) => match verify(expected, Some(&h)) {
                Ok(()) if existed => Ok(()),
                Ok(()) => self
                    .store
                    .copy(&self.chunk_key(id, *offset), &key)
                    .await
                    .map_err(s3_err),
                Err(e) => Err(e),
            },
            // Otherwise stream the chunks in order into the blob, hashing them again.
            _ => {
                let keys: Vec<(Path, u64)> = keep
                    .iter()
                    .map(|&(offset, size)| (self.chunk_key(id, offset), size))
                    .collect();
                let parts = concat_chunks(self.store.clone(), keys);
                self.write_object(
                    &key,
                    parts,
                    Some(Hasher::new(expected.algorithm())),
                    0,
                    None,
                    |h| verify(expected, h),
                )
                .await
                .map(|_| ())
            }
        };
        match result {
            Ok(()) => {
                self.count(existed, len);
                if let Err(e) = self.delete_session(id).await {
                    tracing::warn!(upload = id, error = %e, "removing a committed upload's chunks failed");
                }
                Ok(())
            }
            Err(e @ StoreError::DigestMismatch { .. }) => {
                self.delete_session(id).await?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    async fn upload_delete(&self, id: &str) -> Result<()> {
        self.delete_session(id).await
    }

    async fn upload_ids(&self) -> Result<Vec<String>> {
        let listed = self
            .store
            .list_with_delimiter(Some(&self.key("uploads")))
            .await
            .map_err(s3_err)?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    async fn spool(&self) -> Result<Spool> {
        let path = self.spool_dir.join(uuid::Uuid::new_v4().to_string());
        tokio::task::spawn_blocking(move || Spool::create(path, None))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }

    async fn commit_spool(&self, spool: Spool, digest: &Digest, size: u64) -> Result<()> {
        let key = self.blob_key(digest);
        let existed = self.head(&key).await?.is_some();
        if !existed {
            let reads = spool_reads(spool.clone(), size);
            self.write_object(&key, reads, None, 0, None, |_| Ok(()))
                .await?;
        }
        // Readers that opened the spool keep their handle; the name goes now.
        spool.discard();
        self.count(existed, size);
        Ok(())
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            blobs: self.blobs.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }

    async fn redirect_url(&self, digest: &Digest) -> Result<Option<String>> {
        self.presigned(digest).await
    }

    async fn list(&self, after: Option<&Digest>, n: usize) -> Result<Vec<BlobEntry>> {
        let dir = self.key("blobs");
        let head = format!("{dir}/");
        // Keys sort as digests do: `blobs/<alg>/<hex>` against `<alg>:<hex>`.
        let mut listing = match after {
            Some(d) => self.store.list_with_offset(Some(&dir), &self.blob_key(d)),
            None => self.store.list(Some(&dir)),
        };
        let mut out = Vec::new();
        while out.len() < n {
            let Some(meta) = listing.next().await else {
                break;
            };
            let meta = meta.map_err(s3_err)?;
            // Anything that is not a digest's key is not a blob of ours.
            let Some((alg, hex)) = meta
                .location
                .as_ref()
                .strip_prefix(head.as_str())
                .and_then(|rest| rest.split_once('/'))
            else {
                continue;
            };
            let Ok(digest) = format!("{alg}:{hex}").parse::<Digest>() else {
                continue;
            };
            out.push(BlobEntry {
                digest,
                size: meta.size,
                modified_ms: u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0),
            });
        }
        Ok(out)
    }

    async fn quarantine(&self, digest: &Digest) -> Result<bool> {
        let key = self.blob_key(digest);
        let Some(size) = self.head(&key).await? else {
            return Ok(false);
        };
        let aside = self.key(&format!(
            "quarantine/{}-{}-{}",
            digest.algorithm().as_str(),
            digest.hex(),
            crate::jobs::unix_ms()
        ));
        match self.store.copy(&key, &aside).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => return Ok(false),
            Err(e) => return Err(s3_err(e)),
        }
        delete_quietly(&self.store, &key).await?;
        self.uncount(size);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledged_chunks_must_cover_every_byte_once() {
        let chunks = [(0, 10), (10, 5), (15, 7)];
        let (keep, stale) = S3BlobStore::acknowledged(&chunks, 15).unwrap();
        assert_eq!(keep, [(0, 10), (10, 5)]);
        assert_eq!(stale, [15]);
        assert!(matches!(
            S3BlobStore::acknowledged(&chunks, 12),
            Err(StoreError::UploadDamaged(_))
        ));
        assert!(matches!(
            S3BlobStore::acknowledged(&[(0, 10), (12, 3)], 15),
            Err(StoreError::UploadDamaged(_))
        ));
        assert!(matches!(
            S3BlobStore::acknowledged(&[(0, 10)], 20),
            Err(StoreError::UploadDamaged(_))
        ));
        let (keep, stale) = S3BlobStore::acknowledged(&[], 0).unwrap();
        assert!(keep.is_empty() && stale.is_empty());
    }
}
