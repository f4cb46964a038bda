//! Blobs on the local filesystem.
//!
//! Layout under the root: `blobs/<alg>/<hh>/<hex>` for committed blobs, `uploads/<id>` for
//! upload session buffers, `tmp/` for blobs being written. A blob becomes visible only by a
//! hard link to a fully written, fsynced temporary file (atomic, and never replacing a blob that
//! is already there), followed by an fsync of its directory;
//! `tmp/` is emptied at start-up, so a crash leaves nothing half-written in sight.
//! `quarantine/` holds blobs a deep check found corrupt, out of the store's sight, named
//! `<alg>-<hex>-<unix ms>` so an operator can look at them (pier never reads them again).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use pier_oci::{Algorithm, Digest, Hasher};
use tokio::sync::mpsc;

use crate::blob::{BlobEntry, BlobStore, ByteStream, StoreStats};
use crate::space::Space;
use crate::{Result, Spool, StoreError};

/// Size of each read from disk when serving a blob, and of each write batch when storing one.
const CHUNK: usize = 256 * 1024;
/// Reads in flight ahead of the client per blob stream.
const READ_AHEAD: usize = 2;

/// The filesystem blob store. Cheap to clone; clones share one root and one set of counters.
#[derive(Clone)]
pub struct FsBlobStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    blobs: AtomicU64,
    bytes: AtomicU64,
    /// Free-space tracking: writes are refused up front while it says the disk is full.
    space: Option<Arc<Space>>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl FsBlobStore {
    /// Open (creating if needed) a store rooted at `root`. Removes leftovers in `tmp/` and counts
    /// what is stored.
    pub async fn open(root: impl Into<PathBuf>) -> Result<Arc<FsBlobStore>> {
        Self::open_with(root, None).await
    }

    /// [`FsBlobStore::open`], refusing writes while `space` says the disk is full and telling
    /// it when a write fails for lack of space.
    pub async fn open_with(
        root: impl Into<PathBuf>,
        space: Option<Arc<Space>>,
    ) -> Result<Arc<FsBlobStore>> {
        let root = root.into();
        let r = root.clone();
        let (blobs, bytes) = blocking(move || {
            for d in ["blobs", "uploads", "tmp"] {
                std::fs::create_dir_all(r.join(d))?;
            }
            for entry in std::fs::read_dir(r.join("tmp"))? {
                let _ = std::fs::remove_file(entry?.path());
            }
            let mut blobs = 0u64;
            let mut bytes = 0u64;
            for alg in std::fs::read_dir(r.join("blobs"))? {
                for prefix in std::fs::read_dir(alg?.path())? {
                    for blob in std::fs::read_dir(prefix?.path())? {
                        blobs += 1;
                        bytes += blob?.metadata()?.len();
                    }
                }
            }
            Ok((blobs, bytes))
        })
        .await?;
        Ok(Arc::new(FsBlobStore {
            inner: Arc::new(Inner {
                root,
                blobs: AtomicU64::new(blobs),
                bytes: AtomicU64::new(bytes),
                space,
            }),
        }))
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.inner.blob_path(d)
    }

    fn upload_path(&self, id: &str) -> PathBuf {
        // Ids come from the route parser (UUID shape), never from raw user input.
        self.inner.root.join("uploads").join(id)
    }

    /// Refuse a write up front when the disk is known to be full.
    fn check_space(&self) -> Result<()> {
        match &self.inner.space {
            Some(space) => space.check(),
            None => Ok(()),
        }
    }

    /// Pass a write's result through, telling the space tracker about a full disk.
    fn note<T>(&self, r: Result<T>) -> Result<T> {
        match &self.inner.space {
            Some(space) => space.note(r),
            None => r,
        }
    }

    async fn put_inner(
        &self,
        expected: Option<&Digest>,
        body: ByteStream,
        limit: Option<u64>,
    ) -> Result<(Digest, u64)> {
        let tmp = self.tmp_path();

        let t = tmp.clone();
        let file = blocking(move || Ok(File::create_new(t)?)).await?;
        let algorithm = expected.map_or(Algorithm::Sha256, |d| d.algorithm());
        let written = write_stream(file, Some(Hasher::new(algorithm)), body, 0, limit).await;
        let result = async {
            let (size, hasher) = written?;
            let actual = hasher
                .ok_or_else(|| StoreError::Corrupt("hasher lost".into()))?
                .finish();
            if let Some(expected) = expected {
                if *expected != actual {
                    return Err(StoreError::DigestMismatch {
                        expected: expected.clone(),
                        actual,
                    });
                }
            }
            Ok((actual, size))
        }
        .await;
        match result {
            Ok((digest, size)) => {
                let this = self.inner.clone();
                let d = digest.clone();
                blocking(move || this.commit_file(&tmp, &d, size)).await?;
                Ok((digest, size))
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    fn tmp_path(&self) -> PathBuf {
        self.inner
            .root
            .join("tmp")
            .join(uuid::Uuid::new_v4().to_string())
    }
}

impl Inner {
    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(d.algorithm().as_str())
            .join(&d.hex()[..2])
            .join(d.hex())
    }

    /// Move a complete, fsynced file into its content address. If the blob is already there the
    /// file is dropped instead (same digest, same bytes).
    fn commit_file(&self, from: &Path, d: &Digest, size: u64) -> Result<()> {
        let to = self.blob_path(d);
        let dir = to
            .parent()
            .ok_or_else(|| StoreError::Corrupt("blob path".into()))?;
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            if let Some(alg_dir) = dir.parent() {
                fsync_dir(alg_dir)?;
            }
        }
        // A hard link appears atomically and never replaces: of two commits of the same digest
        // racing, exactly one creates the blob (and counts it), the other finds it there.
        match std::fs::hard_link(from, &to) {
            Ok(()) => {
                fsync_dir(dir)?;
                self.blobs.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(size, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Written again: it is young again, so the GC's grace period covers the push
                // that is about to reference it, even if the bytes were stored long ago.
                std::fs::File::options()
                    .write(true)
                    .open(&to)?
                    .set_modified(std::time::SystemTime::now())?;
            }
            Err(e) => return Err(e.into()),
        }
        // The temporary name goes; a crash before this leaves it to the start-up sweep of tmp/
        // (or, for an upload buffer, to the session that still owns it).
        std::fs::remove_file(from)?;
        Ok(())
    }
}

/// Hash a file's first `len` bytes.
fn hash_file(path: &Path, len: u64, algorithm: Algorithm) -> Result<Digest> {
    let mut f = File::open(path)?.take(len);
    let mut h = Hasher::new(algorithm);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

/// Write `body` to `file` from its current position, hashing on the way, then fsync. Disk work
/// and hashing run on a blocking thread while this task keeps receiving, so the network and the
/// disk overlap. Returns the bytes written and the hasher.
async fn write_stream(
    file: File,
    hasher: Option<Hasher>,
    mut body: ByteStream,
    already: u64,
    limit: Option<u64>,
) -> Result<(u64, Option<Hasher>)> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let worker = tokio::task::spawn_blocking(move || -> Result<Option<Hasher>> {
        let mut file = file;
        let mut hasher = hasher;
        while let Some(buf) = rx.blocking_recv() {
            if let Some(h) = hasher.as_mut() {
                h.update(&buf);
            }
            file.write_all(&buf)?;
        }
        file.sync_all()?;
        Ok(hasher)
    });
    let mut written = 0u64;
    let mut pending = BytesMut::with_capacity(CHUNK);
    let outcome: Result<()> = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(StoreError::Body)?;
            written += chunk.len() as u64;
            if let Some(limit) = limit {
                if already + written > limit {
                    return Err(StoreError::TooLarge { limit });
                }
            }
            if pending.is_empty() && chunk.len() >= CHUNK {
                tx.send(chunk).await.map_err(|_| closed())?;
                continue;
            }
            pending.extend_from_slice(&chunk);
            if pending.len() >= CHUNK {
                tx.send(pending.split().freeze())
                    .await
                    .map_err(|_| closed())?;
            }
        }
        if !pending.is_empty() {
            tx.send(pending.split().freeze())
                .await
                .map_err(|_| closed())?;
        }
        Ok(())
    }
    .await;
    drop(tx);
    let worked = worker
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
    // The writer's failure first: when it died (of a full disk, say), the receiving side only
    // saw the channel close, which says nothing of why.
    let hasher = worked?;
    outcome?;
    Ok((written, hasher))
}

fn closed() -> StoreError {
    StoreError::Io(std::io::Error::other("blob writer stopped"))
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        match tokio::fs::metadata(self.blob_path(digest)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn read(&self, digest: &Digest, start: u64, end: u64) -> Result<ByteStream> {
        let path = self.blob_path(digest);
        // One handle per stream, its cursor behind a lock: reads are issued in order, so the
        // lock is uncontended. `read_to_end` into fresh capacity lets the kernel fill memory
        // that was never zeroed first (zeroing cost a tenth of the CPU of a blob GET).
        let file = Arc::new(std::sync::Mutex::new(
            blocking(move || Ok(File::open(path)?)).await?,
        ));
        let offsets = (start..end).step_by(CHUNK);
        let stream = futures::stream::iter(offsets)
            .map(move |off| {
                let file = file.clone();
                let len = (end - off).min(CHUNK as u64);
                async move {
                    tokio::task::spawn_blocking(move || {
                        let mut f = file.lock().unwrap_or_else(|e| e.into_inner());
                        f.seek(SeekFrom::Start(off))?;
                        let mut buf = Vec::with_capacity(len as usize);
                        (&mut *f).take(len).read_to_end(&mut buf)?;
                        if (buf.len() as u64) < len {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "blob shorter than expected",
                            ));
                        }
                        Ok(Bytes::from(buf))
                    })
                    .await
                    .map_err(std::io::Error::other)?
                }
            })
            .buffered(READ_AHEAD);
        Ok(Box::pin(stream))
    }

    async fn open_file(&self, digest: &Digest) -> Result<Option<std::fs::File>> {
        let path = self.blob_path(digest);
        Ok(Some(blocking(move || Ok(File::open(path)?)).await?))
    }

    async fn put(
        &self,
        expected: Option<&Digest>,
        body: ByteStream,
        limit: Option<u64>,
    ) -> Result<(Digest, u64)> {
        self.check_space()?;
        let r = self.put_inner(expected, body, limit).await;
        self.note(r)
    }
    async fn delete(&self, digest: &Digest) -> Result<bool> {
        let path = self.blob_path(digest);
        match tokio::fs::metadata(&path).await {
            Ok(m) => {
                tokio::fs::remove_file(&path).await?;
                self.inner.blobs.fetch_sub(1, Ordering::Relaxed);
                self.inner.bytes.fetch_sub(m.len(), Ordering::Relaxed);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn upload_create(&self, id: &str) -> Result<()> {
        self.check_space()?;
        let path = self.upload_path(id);
        let created = blocking(move || {
            File::create_new(&path)?.sync_all()?;
            if let Some(dir) = path.parent() {
                fsync_dir(dir)?;
            }
            Ok(())
        })
        .await;
        self.note(created)
    }

    async fn upload_append(
        &self,
        id: &str,
        offset: u64,
        hasher: Option<Hasher>,
        body: ByteStream,
        limit: Option<u64>,
    ) -> Result<(u64, Option<Hasher>)> {
        self.check_space()?;
        let path = self.upload_path(id);
        let again = path.clone();
        let file = blocking(move || {
            let file = match OpenOptions::new().write(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(StoreError::UploadUnknown)
                }
                Err(e) => return Err(e.into()),
            };
            let len = file.metadata()?.len();
            if len < offset {
                return Err(StoreError::UploadDamaged(format!(
                    "buffer holds {len} bytes, {offset} were acknowledged"
                )));
            }
            if len > offset {
                // Bytes of a chunk that was never acknowledged (a broken request or a crash).
                file.set_len(offset)?;
            }
            let mut file = file;
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset))?;
            Ok(file)
        })
        .await?;
        let (written, hasher) = match write_stream(file, hasher, body, offset, limit).await {
            Ok(done) => done,
            Err(e) => {
                // Give back the bytes of the failed chunk now, not when the session sends again
                // (it may never): on a full disk they are what the next push needs.
                let cut = blocking(move || {
                    let f = OpenOptions::new().write(true).open(&again)?;
                    f.set_len(offset)?;
                    Ok(())
                })
                .await;
                if let Err(cut) = cut {
                    tracing::warn!(error = %cut, "cutting a failed chunk off its upload failed");
                }
                return self.note(Err(e));
            }
        };
        Ok((offset + written, hasher))
    }

    async fn upload_commit(
        &self,
        id: &str,
        len: u64,
        expected: &Digest,
        hasher: Option<Hasher>,
    ) -> Result<()> {
        let path = self.upload_path(id);
        let this = self.inner.clone();
        let expected = expected.clone();
        let r = blocking(move || {
            let file_len = match std::fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(StoreError::UploadUnknown)
                }
                Err(e) => return Err(e.into()),
            };
            if file_len < len {
                return Err(StoreError::UploadDamaged(format!(
                    "buffer holds {file_len} bytes, {len} were acknowledged"
                )));
            }
            if file_len > len {
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(len)?;
                f.sync_all()?;
            }
            let actual = match hasher {
                Some(h) if h.algorithm() == expected.algorithm() => h.finish(),
                _ => hash_file(&path, len, expected.algorithm())?,
            };
            if actual != expected {
                let _ = std::fs::remove_file(&path);
                return Err(StoreError::DigestMismatch { expected, actual });
            }
            this.commit_file(&path, &expected, len)
        })
        .await;
        self.note(r)
    }

    async fn upload_delete(&self, id: &str) -> Result<()> {
        match tokio::fs::remove_file(self.upload_path(id)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn upload_ids(&self) -> Result<Vec<String>> {
        let dir = self.inner.root.join("uploads");
        blocking(move || {
            let mut ids = Vec::new();
            for e in std::fs::read_dir(dir)? {
                if let Some(name) = e?.file_name().to_str() {
                    ids.push(name.to_string());
                }
            }
            Ok(ids)
        })
        .await
    }

    async fn spool(&self) -> Result<Spool> {
        self.check_space()?;
        let path = self.tmp_path();
        let space = self.inner.space.clone();
        let r = blocking(move || Spool::create(path, space)).await;
        self.note(r)
    }

    async fn commit_spool(&self, spool: Spool, digest: &Digest, size: u64) -> Result<()> {
        let this = self.inner.clone();
        let digest = digest.clone();
        let r = blocking(move || this.commit_file(spool.path(), &digest, size)).await;
        self.note(r)
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            blobs: self.inner.blobs.load(Ordering::Relaxed),
            bytes: self.inner.bytes.load(Ordering::Relaxed),
        }
    }

    async fn list(&self, after: Option<&Digest>, n: usize) -> Result<Vec<BlobEntry>> {
        let root = self.inner.root.join("blobs");
        let after = after.cloned();
        blocking(move || list_blobs(&root, after.as_ref(), n)).await
    }

    async fn quarantine(&self, digest: &Digest) -> Result<bool> {
        let from = self.blob_path(digest);
        let dir = self.inner.root.join("quarantine");
        let name = format!(
            "{}-{}-{}",
            digest.algorithm().as_str(),
            digest.hex(),
            crate::jobs::unix_ms()
        );
        let inner = self.inner.clone();
        blocking(move || {
            let len = match std::fs::metadata(&from) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e.into()),
            };
            std::fs::create_dir_all(&dir)?;
            std::fs::rename(&from, dir.join(name))?;
            if let Some(parent) = from.parent() {
                fsync_dir(parent)?;
            }
            fsync_dir(&dir)?;
            inner.blobs.fetch_sub(1, Ordering::Relaxed);
            inner.bytes.fetch_sub(len, Ordering::Relaxed);
            Ok(true)
        })
        .await
    }
}

/// Names of the entries of `dir`, sorted (a missing directory has none).
fn sorted_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        if let Some(name) = entry?.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Up to `n` blobs under `root` (`<alg>/<hh>/<hex>`) whose digest sorts after `after`. Only the
/// directories at or past `after` are read, so each page costs about one prefix directory.
fn list_blobs(root: &Path, after: Option<&Digest>, n: usize) -> Result<Vec<BlobEntry>> {
    let mut out = Vec::new();
    let after_alg = after.map(|d| d.algorithm().as_str().to_string());
    let after_hex = after.map(|d| d.hex().to_string());
    for alg in sorted_names(root)? {
        if after_alg.as_deref().is_some_and(|a| alg.as_str() < a) {
            continue;
        }
        let same_alg = after_alg.as_deref() == Some(alg.as_str());
        for prefix in sorted_names(&root.join(&alg))? {
            if same_alg
                && after_hex
                    .as_deref()
                    .is_some_and(|h| prefix.as_str() < &h[..2])
            {
                continue;
            }
            let dir = root.join(&alg).join(&prefix);
            for hex in sorted_names(&dir)? {
                if same_alg && after_hex.as_deref().is_some_and(|h| hex.as_str() <= h) {
                    continue;
                }
                // Anything that is not a digest's name is not a blob of ours.
                let Ok(digest) = format!("{alg}:{hex}").parse::<Digest>() else {
                    continue;
                };
                let meta = match std::fs::metadata(dir.join(&hex)) {
                    Ok(m) => m,
                    // Deleted between the listing and now.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                };
                let modified_ms = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as u64);
                out.push(BlobEntry {
                    digest,
                    size: meta.len(),
                    modified_ms,
                });
                if out.len() == n {
                    return Ok(out);
                }
            }
        }
    }
    Ok(out)
}
