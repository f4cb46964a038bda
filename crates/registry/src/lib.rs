//! The OCI registry's semantics over pier's stores: which blobs and manifests a repository may
//! serve, what a manifest push must satisfy, how upload sessions move from first byte to blob.
//!
//! Architecture invariant: this crate knows nothing of HTTP. It takes parsed names, digests and
//! byte streams and returns records, streams and [`RegistryError`]s; turning those into
//! responses is the server's job. It also knows nothing of upstreams or peers: a mirror fills
//! the same stores through the same calls.

pub mod cache;
pub mod error;
pub mod gc;
mod sweep;
pub mod upload;

use std::sync::Arc;

use bytes::Bytes;
use pier_oci::{Descriptor, Digest, Manifest, Reference, RepoName};
use pier_store::{BlobStore, ByteStream, ManifestRecord, MetaStore, Page};

pub use error::RegistryError;
pub use gc::{CheckFindings, GcOptions, GcReport, Untagged};
pub use upload::{UploadCaps, Uploads};

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// Limits a registry enforces on what it is sent.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest manifest accepted, in bytes.
    pub max_manifest_bytes: u64,
    /// Largest blob accepted, in bytes, if any limit.
    pub max_blob_bytes: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_manifest_bytes: 4 * 1024 * 1024,
            max_blob_bytes: None,
        }
    }
}

/// The result of a manifest push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedManifest {
    pub digest: Digest,
    pub subject: Option<Digest>,
}

/// A registry over one blob store and one metadata store.
pub struct Registry {
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    limits: Limits,
    uploads: Uploads,
    /// Held shared by writes that check a blob's link and then rely on its bytes, and
    /// exclusively by the garbage collector while it unlinks and deletes one blob (gc.rs).
    sweep_lock: SweepLock,
    /// Readers of each blob and when blobs were last read (cache.rs).
    reads: cache::Reads,
}

pub(crate) use sweep::SweepLock;

impl Registry {
    pub fn new(blobs: Arc<dyn BlobStore>, meta: Arc<dyn MetaStore>, limits: Limits) -> Registry {
        let sweep_lock = SweepLock::new(meta.clone());
        let uploads = Uploads::new(
            blobs.clone(),
            meta.clone(),
            limits.max_blob_bytes,
            sweep_lock.clone(),
        );
        Registry {
            blobs,
            meta,
            limits,
            uploads,
            sweep_lock,
            reads: cache::Reads::default(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn blob_store(&self) -> &Arc<dyn BlobStore> {
        &self.blobs
    }

    pub fn meta_store(&self) -> &Arc<dyn MetaStore> {
        &self.meta
    }

    /// Upload sessions.
    /// Bound the number of open upload sessions (defaults: [`UploadCaps::default`]).
    pub fn with_upload_caps(mut self, caps: UploadCaps) -> Registry {
        self.uploads.set_caps(caps);
        self
    }

    pub fn uploads(&self) -> &Uploads {
        &self.uploads
    }

    // ---- blobs ----

    /// The size of a blob `repo` may serve.
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        if self.meta.blob_link(repo.as_str(), digest).await?.is_none() {
            return Err(RegistryError::BlobUnknown);
        }
        // A link whose bytes are gone (removed by hand, or a future GC) is as good as unknown.
        self.blobs
            .stat(digest)
            .await?
            .ok_or(RegistryError::BlobUnknown)
    }

    /// Bytes `start..end` of a blob; the caller has checked the range with [`Self::blob_size`].
    /// The stream holds a reader's place on the blob until it is dropped, so cache eviction
    /// leaves the blob alone meanwhile; the read counts as the blob's latest use.
    pub async fn read_blob(&self, digest: &Digest, start: u64, end: u64) -> Result<ByteStream> {
        let guard = self.reads.enter(digest);
        let stream = match self.blobs.read(digest, start, end).await {
            Ok(s) => s,
            // Evicted or collected between the caller's size check and the open.
            Err(pier_store::StoreError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RegistryError::BlobUnknown)
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Box::pin(futures::StreamExt::map(stream, move |chunk| {
            let _held = &guard;
            chunk
        })))
    }

    /// The blob's file, for a server that hands bytes to the kernel instead of copying them,
    /// with the guard that keeps the blob counted as being read (eviction skips it) until the
    /// response is done. `None` when the store does not keep blobs in local files.
    pub async fn open_blob_file(
        &self,
        digest: &Digest,
    ) -> Result<Option<(std::fs::File, cache::ReadGuard)>> {
        let guard = self.reads.enter(digest);
        match self.blobs.open_file(digest).await {
            Ok(Some(f)) => Ok(Some((f, guard))),
            Ok(None) => Ok(None),
            Err(pier_store::StoreError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(RegistryError::BlobUnknown)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Where a client may fetch a blob straight from the store instead (a presigned URL), if
    /// the store hands those out.
    pub async fn blob_redirect(&self, digest: &Digest) -> Result<Option<String>> {
        Ok(self.blobs.redirect_url(digest).await?)
    }

    /// Store a whole blob pushed in one request and link it into `repo`.
    pub async fn put_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        body: ByteStream,
    ) -> Result<u64> {
        let _sweep = self.sweep_lock.write(std::slice::from_ref(digest)).await?;
        let (_, size) = self
            .blobs
            .put(Some(digest), body, self.limits.max_blob_bytes)
            .await?;
        self.meta.link_blob(repo.as_str(), digest, size).await?;
        Ok(size)
    }

    /// Link a blob that `from` holds into `repo` without moving bytes. `None` if `from` does not
    /// hold it (the caller then starts an ordinary upload).
    pub async fn mount_blob(
        &self,
        repo: &RepoName,
        from: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>> {
        let _sweep = self.sweep_lock.write(std::slice::from_ref(digest)).await?;
        if self.meta.blob_link(from.as_str(), digest).await?.is_none() {
            return Ok(None);
        }
        let Some(size) = self.blobs.stat(digest).await? else {
            return Ok(None);
        };
        self.meta.link_blob(repo.as_str(), digest, size).await?;
        Ok(Some(size))
    }

    /// Unlink a blob from `repo`. Its bytes stay until garbage collection.
    pub async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        if self.meta.unlink_blob(repo.as_str(), digest).await? {
            Ok(())
        } else {
            Err(RegistryError::BlobUnknown)
        }
    }

    // ---- manifests ----

    async fn resolve(&self, repo: &RepoName, reference: &Reference) -> Result<Digest> {
        match reference {
            Reference::Digest(d) => Ok(d.clone()),
            Reference::Tag(t) => self
                .meta
                .resolve_tag(repo.as_str(), t.as_str())
                .await?
                .ok_or(RegistryError::ManifestUnknown),
        }
    }

    /// A manifest's record and exact bytes.
    pub async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(ManifestRecord, Bytes)> {
        let digest = self.resolve(repo, reference).await?;
        let record = self
            .meta
            .manifest(repo.as_str(), &digest)
            .await?
            .ok_or(RegistryError::ManifestUnknown)?;
        let bytes = self
            .meta
            .manifest_bytes(&digest)
            .await?
            .ok_or(RegistryError::ManifestUnknown)?;
        Ok((record, bytes))
    }

    /// Validate and store a pushed manifest: its digest matches a digest reference, it parses,
    /// and everything it references is in `repo`.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: Bytes,
    ) -> Result<PushedManifest> {
        let limit = self.limits.max_manifest_bytes;
        if bytes.len() as u64 > limit {
            return Err(RegistryError::TooLarge { limit });
        }
        let digest = match reference {
            Reference::Digest(d) => {
                let actual = Digest::compute(d.algorithm(), &bytes);
                if actual != *d {
                    return Err(RegistryError::DigestInvalid(format!(
                        "manifest has digest {actual}, not {d}"
                    )));
                }
                actual
            }
            Reference::Tag(_) => Digest::sha256(&bytes),
        };
        let manifest = Manifest::parse(&bytes, content_type)
            .map_err(|e| RegistryError::ManifestInvalid(e.to_string()))?;
        // From the check of the links to the store: a collector's sweep must not fall between.
        let held: Vec<Digest> = manifest.blobs.iter().map(|b| b.digest.clone()).collect();
        let _sweep = self.sweep_lock.write(&held).await?;
        for blob in &manifest.blobs {
            // Foreign (non-distributable) layers live elsewhere by design.
            if blob.urls.as_ref().is_some_and(|u| !u.is_empty()) {
                continue;
            }
            if self
                .meta
                .blob_link(repo.as_str(), &blob.digest)
                .await?
                .is_none()
            {
                return Err(RegistryError::ManifestBlobUnknown(blob.digest.clone()));
            }
        }
        // And the bytes behind the links: a write that linked outside the sweep lock (an
        // import, say, of a blob already stored) may have linked one a sweep had just taken.
        let stats = futures::future::join_all(
            manifest
                .blobs
                .iter()
                .filter(|b| b.urls.as_ref().is_none_or(|u| u.is_empty()))
                .map(|b| async move { (b, self.blobs.stat(&b.digest).await) }),
        )
        .await;
        for (blob, stat) in stats {
            let Some(stored) = stat? else {
                return Err(RegistryError::ManifestBlobUnknown(blob.digest.clone()));
            };
            // A client trusts a descriptor's size to bound what it reads; a wrong one would
            // be served to every puller as a promise the registry never checked.
            check_size(blob, stored)?;
        }
        for child in &manifest.manifests {
            let Some(record) = self.meta.manifest(repo.as_str(), &child.digest).await? else {
                return Err(RegistryError::ManifestBlobUnknown(child.digest.clone()));
            };
            check_size(child, record.size)?;
        }
        let references = manifest
            .blobs
            .iter()
            .chain(manifest.manifests.iter())
            .map(|d| d.digest.clone())
            .collect();
        let subject = manifest.subject.as_ref().map(|s| s.digest.clone());
        let record = ManifestRecord {
            digest: digest.clone(),
            media_type: manifest.media_type,
            size: bytes.len() as u64,
            artifact_type: manifest.artifact_type,
            subject: subject.clone(),
            annotations: manifest.annotations,
            references,
            stored_ms: gc::unix_ms(),
        };
        let tag = match reference {
            Reference::Tag(t) => Some(t.as_str()),
            Reference::Digest(_) => None,
        };
        self.meta
            .put_manifest(repo.as_str(), &record, bytes, tag)
            .await?;
        Ok(PushedManifest { digest, subject })
    }

    /// Delete by digest (the manifest and every tag on it) or by tag (only the tag).
    pub async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        let existed = match reference {
            Reference::Digest(d) => self.meta.delete_manifest(repo.as_str(), d).await?,
            Reference::Tag(t) => self.meta.delete_tag(repo.as_str(), t.as_str()).await?,
        };
        if existed {
            Ok(())
        } else {
            Err(RegistryError::ManifestUnknown)
        }
    }

    // ---- discovery ----

    pub async fn tags(&self, repo: &RepoName, last: Option<&str>, n: usize) -> Result<Page> {
        if !self.meta.repo_exists(repo.as_str()).await? {
            return Err(RegistryError::NameUnknown);
        }
        Ok(self.meta.tags(repo.as_str(), last, n).await?)
    }

    pub async fn catalog(&self, last: Option<&str>, n: usize) -> Result<Page> {
        Ok(self.meta.repos(last, n).await?)
    }

    /// Descriptors of the manifests in `repo` whose subject is `subject`, optionally only those
    /// of one artifact type.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>> {
        let records = self.meta.referrers(repo.as_str(), subject).await?;
        Ok(records
            .iter()
            .filter(|r| artifact_type.is_none_or(|t| r.artifact_type.as_deref() == Some(t)))
            .map(ManifestRecord::descriptor)
            .collect())
    }
}

/// A descriptor must give the size of what it names: clients bound their reads by it.
fn check_size(descriptor: &Descriptor, stored: u64) -> Result<()> {
    if descriptor.size == stored {
        return Ok(());
    }
    Err(RegistryError::ManifestInvalid(format!(
        "the descriptor of {} says {} bytes; the stored content has {stored}",
        descriptor.digest, descriptor.size
    )))
}
