//! [`MetaStore`] on redb, an embedded transactional key-value database. Every write is one
//! fsynced transaction; reads see a consistent snapshot and do not block writers.
//!
//! Tables (keys are tuples so one repository's entries are contiguous and sorted):
//! `repos` name → (), `blob_links` (repo, digest) → size, `manifests` (repo, digest) → record
//! JSON, `manifest_bytes` digest → exact bytes, `tags` (repo, tag) → digest,
//! `referrers` (repo, subject, referrer) → (), `uploads` id → record JSON.
//!
//! The job queue ([`JobStore`]): `jobs` id → job JSON, `job_keys` dedupe key → id of the
//! newest job with that key, `job_due` (next attempt ms, id) → () for every queued or retrying
//! job (so finding due work is a range read, not a scan), `job_seq` "next" → the next id.
//! Pins ([`PinStore`]): `pins` (repo, digest) → pin JSON.
//! Garbage collection: `gc_marks` blob digest → unix ms since which it is deletable; cleared
//! by `link_blob` and `put_manifest` in their own transactions. Cache eviction:
//! `blob_access` blob digest → unix ms of its last read (flushed in batches).
//!
//! Imported archive files ([`ImportLog`]): `import_files` file digest → record JSON.
//!
//! After one I/O failure (a full disk during a commit, say) redb refuses every later
//! transaction until the database is closed and opened again. The store does that by itself:
//! an operation that fails with an I/O error reopens the database from its file (committed
//! transactions are durable, so nothing committed is lost; redb repairs what the failed one left)
//! and is tried once more.

use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pier_oci::Digest;
use redb::{Database, ReadTransaction, ReadableTable, TableDefinition};

use crate::imports::{ImportLog, ImportedFile};
use crate::jobs::{unix_ms, Job, JobState, JobStore};
use crate::meta::{ManifestRecord, MetaStore, Page, UploadRecord};
use crate::pins::{Pin, PinStore};
use crate::{Result, StoreError};

const REPOS: TableDefinition<'_, &str, ()> = TableDefinition::new("repos");
const BLOB_LINKS: TableDefinition<'_, (&str, &str), u64> = TableDefinition::new("blob_links");
const MANIFESTS: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("manifests");
const MANIFEST_BYTES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("manifest_bytes");
const TAGS: TableDefinition<'_, (&str, &str), &str> = TableDefinition::new("tags");
const REFERRERS: TableDefinition<'_, (&str, &str, &str), ()> = TableDefinition::new("referrers");
const UPLOADS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("uploads");
const JOBS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("jobs");
const JOB_KEYS: TableDefinition<'_, &str, u64> = TableDefinition::new("job_keys");
const JOB_DUE: TableDefinition<'_, (u64, u64), ()> = TableDefinition::new("job_due");
const JOB_SEQ: TableDefinition<'_, &str, u64> = TableDefinition::new("job_seq");
const IMPORT_FILES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("import_files");
const PINS: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("pins");
const GC_MARKS: TableDefinition<'_, &str, u64> = TableDefinition::new("gc_marks");
const BLOB_ACCESS: TableDefinition<'_, &str, u64> = TableDefinition::new("blob_access");

/// Opens the database again after an I/O failure. `None` for a database that lives only in
/// memory: reopening it would lose everything.
type Opener = Arc<dyn Fn() -> Result<Database> + Send + Sync>;

/// The redb metadata store. Cheap to clone.
#[derive(Clone)]
pub struct RedbMetaStore {
    /// `None` between dropping a poisoned database and opening it again (or if that failed).
    db: Arc<RwLock<Option<Arc<Database>>>>,
    opener: Option<Opener>,
}

/// A write transaction's body, run again after a reopen.
type WriteFn<T> = dyn Fn(&redb::WriteTransaction) -> Result<T> + Send + Sync;

/// Whether a failure means redb wants the database reopened.
fn needs_reopen(e: &StoreError) -> bool {
    matches!(e, StoreError::DbIo(_) | StoreError::NoSpace(_))
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(corrupt)
}

fn unjson<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(corrupt)
}

impl RedbMetaStore {
    /// Open or create the database file at `path`. Fails if another process holds it.
    pub fn open(path: &Path) -> Result<RedbMetaStore> {
        let path = path.to_path_buf();
        Self::open_with(Arc::new(move || Ok(Database::create(&path)?)))
    }

    /// Open through `opener`, which is called again to reopen the database after an I/O
    /// failure (tests pass one over a storage backend that fails on demand).
    pub fn open_with(opener: Opener) -> Result<RedbMetaStore> {
        let db = opener()?;
        Self::init(db, Some(opener))
    }

    /// A database that lives in memory only, for tests.
    pub fn in_memory() -> Result<RedbMetaStore> {
        let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?;
        Self::init(db, None)
    }

    fn init(db: Database, opener: Option<Opener>) -> Result<RedbMetaStore> {
        let tx = db.begin_write()?;
        tx.open_table(REPOS)?;
        tx.open_table(BLOB_LINKS)?;
        tx.open_table(MANIFESTS)?;
        tx.open_table(MANIFEST_BYTES)?;
        tx.open_table(TAGS)?;
        tx.open_table(REFERRERS)?;
        tx.open_table(UPLOADS)?;
        tx.open_table(JOBS)?;
        tx.open_table(JOB_KEYS)?;
        tx.open_table(JOB_DUE)?;
        tx.open_table(JOB_SEQ)?;
        tx.open_table(IMPORT_FILES)?;
        tx.open_table(PINS)?;
        tx.open_table(GC_MARKS)?;
        tx.open_table(BLOB_ACCESS)?;
        tx.commit()?;
        Ok(RedbMetaStore {
            db: Arc::new(RwLock::new(Some(Arc::new(db)))),
            opener,
        })
    }

    /// The open database, reopening it first if an earlier reopen did not succeed.
    async fn db(&self) -> Result<Arc<Database>> {
        if let Some(db) = self.current() {
            return Ok(db);
        }
        self.reopen(None).await?;
        self.current()
            .ok_or_else(|| StoreError::DbIo("the database is not open".into()))
    }

    fn current(&self) -> Option<Arc<Database>> {
        self.db.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Close the database and open it again from its file.
    /// `failed` is the database the caller saw fail: if another caller has replaced it since,
    /// there is nothing left to do.
    async fn reopen(&self, failed: Option<Arc<Database>>) -> Result<()> {
        let Some(opener) = self.opener.clone() else {
            return Ok(());
        };
        let slot = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = slot.write().unwrap_or_else(|e| e.into_inner());
            let replaced = match (&failed, guard.as_ref()) {
                (Some(f), Some(cur)) => !Arc::ptr_eq(f, cur),
                _ => false,
            };
            // Our own handle must not keep the old database alive while we wait for it to close.
            drop(failed);
            if replaced {
                return Ok(());
            }
            if let Some(old) = guard.take() {
                // Other holders finish their transaction and let go; the file lock is released
                // only when the last one has, and only then can the file be opened again.
                let mut old = old;
                for _ in 0..400 {
                    match Arc::try_unwrap(old) {
                        Ok(db) => {
                            drop(db);
                            break;
                        }
                        Err(still) => {
                            old = still;
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
            }
            let mut last = None;
            for _ in 0..20 {
                match opener() {
                    Ok(db) => {
                        tracing::warn!("metadata database reopened after an i/o failure");
                        *guard = Some(Arc::new(db));
                        return Ok(());
                    }
                    Err(e) => {
                        last = Some(e);
                        std::thread::sleep(Duration::from_millis(25));
                    }
                }
            }
            Err(last.unwrap_or_else(|| StoreError::DbIo("reopening failed".into())))
        })
        .await
        .map_err(|e| StoreError::Db(e.to_string()))?
    }

    /// Run a read, reopening the database and trying once more if it failed on I/O.
    async fn read<T>(&self, f: impl Fn(&ReadTransaction) -> Result<T>) -> Result<T> {
        let attempt = |db: &Database| -> Result<T> { f(&db.begin_read()?) };
        let db = self.db().await?;
        match attempt(&db) {
            Err(e) if needs_reopen(&e) && self.opener.is_some() => {
                tracing::warn!(error = %e, "metadata read failed; reopening the database");
                self.reopen(Some(db)).await?;
                attempt(&*self.db().await?)
            }
            other => other,
        }
    }

    /// Run a write transaction, reopening the database and trying once more if it failed on
    /// I/O (the failed transaction was not committed, so running it again is safe).
    async fn write<T: Send + 'static>(
        &self,
        f: impl Fn(&redb::WriteTransaction) -> Result<T> + Send + Sync + 'static,
    ) -> Result<T> {
        let f = Arc::new(f);
        let attempt = |db: Arc<Database>, f: Arc<_>| async move {
            let f: Arc<WriteFn<T>> = f;
            tokio::task::spawn_blocking(move || -> Result<T> {
                let tx = db.begin_write()?;
                let out = f(&tx)?;
                tx.commit()?;
                Ok(out)
            })
            .await
            .map_err(|e| StoreError::Db(e.to_string()))?
        };
        let db = self.db().await?;
        match attempt(db.clone(), f.clone()).await {
            Err(e) if needs_reopen(&e) && self.opener.is_some() => {
                tracing::warn!(error = %e, "metadata write failed; reopening the database");
                self.reopen(Some(db)).await?;
                attempt(self.db().await?, f).await
            }
            other => other,
        }
    }
}

/// Page through keys `(prefix, x)` of a two-part-key table, returning the `x` parts.
fn page2<V: redb::Value + 'static>(
    table: &impl ReadableTable<(&'static str, &'static str), V>,
    prefix: &str,
    last: Option<&str>,
    n: usize,
) -> Result<Page> {
    let start = match last {
        Some(l) => Bound::Excluded((prefix, l)),
        None => Bound::Included((prefix, "")),
    };
    let mut page = Page::default();
    for item in table.range::<(&str, &str)>((start, Bound::Unbounded))? {
        let (k, _) = item?;
        let (p, x) = k.value();
        if p != prefix {
            break;
        }
        if page.items.len() == n {
            page.more = true;
            break;
        }
        page.items.push(x.to_string());
    }
    Ok(page)
}

/// Up to `n` entries of a two-part-key table from `start` on, each turned into a `T` by
/// `each`, which ends the page early by answering `None` (past a prefix, say).
fn pairs_from<V: redb::Value + 'static, T>(
    table: &impl ReadableTable<(&'static str, &'static str), V>,
    start: Bound<(&str, &str)>,
    n: usize,
    mut each: impl FnMut(&str, &str, V::SelfType<'_>) -> Result<Option<T>>,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for item in table.range::<(&str, &str)>((start, Bound::Unbounded))? {
        if out.len() == n {
            break;
        }
        let (k, v) = item?;
        let (a, b) = k.value();
        match each(a, b, v.value())? {
            Some(t) => out.push(t),
            None => break,
        }
    }
    Ok(out)
}

/// Where a page after `(a, b)` starts: just past it, or at the table's first entry.
fn past(after: &Option<(String, String)>) -> Bound<(&str, &str)> {
    match after {
        Some((a, b)) => Bound::Excluded((a.as_str(), b.as_str())),
        None => Bound::Unbounded,
    }
}

#[async_trait]
impl MetaStore for RedbMetaStore {
    async fn repos(&self, last: Option<&str>, n: usize) -> Result<Page> {
        self.read(|tx| {
            let table = tx.open_table(REPOS)?;
            let start = match last {
                Some(l) => Bound::Excluded(l),
                None => Bound::Unbounded,
            };
            let mut page = Page::default();
            for item in table.range::<&str>((start, Bound::Unbounded))? {
                let (k, _) = item?;
                if page.items.len() == n {
                    page.more = true;
                    break;
                }
                page.items.push(k.value().to_string());
            }
            Ok(page)
        })
        .await
    }

    async fn repo_exists(&self, repo: &str) -> Result<bool> {
        self.read(|tx| Ok(tx.open_table(REPOS)?.get(repo)?.is_some()))
            .await
    }

    async fn link_blob(&self, repo: &str, digest: &Digest, size: u64) -> Result<()> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.write(move |tx| {
            tx.open_table(REPOS)?.insert(repo.as_str(), ())?;
            tx.open_table(BLOB_LINKS)?
                .insert((repo.as_str(), digest.as_str()), size)?;
            tx.open_table(GC_MARKS)?.remove(digest.as_str())?;
            Ok(())
        })
        .await
    }

    async fn blob_link(&self, repo: &str, digest: &Digest) -> Result<Option<u64>> {
        self.read(|tx| {
            let table = tx.open_table(BLOB_LINKS)?;
            let d = digest.to_string();
            Ok(table.get((repo, d.as_str()))?.map(|v| v.value()))
        })
        .await
    }

    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.write(move |tx| {
            let mut t = tx.open_table(BLOB_LINKS)?;
            let existed = t.remove((repo.as_str(), digest.as_str()))?.is_some();
            Ok(existed)
        })
        .await
    }

    async fn put_manifest(
        &self,
        repo: &str,
        record: &ManifestRecord,
        bytes: Bytes,
        tag: Option<&str>,
    ) -> Result<()> {
        let repo = repo.to_string();
        let tag = tag.map(str::to_string);
        let digest = record.digest.to_string();
        let subject = record.subject.as_ref().map(|s| s.to_string());
        let references: Vec<String> = record.references.iter().map(|d| d.to_string()).collect();
        let rec = json(record)?;
        self.write(move |tx| {
            {
                let mut marks = tx.open_table(GC_MARKS)?;
                for r in &references {
                    marks.remove(r.as_str())?;
                }
            }
            tx.open_table(REPOS)?.insert(repo.as_str(), ())?;
            tx.open_table(MANIFEST_BYTES)?
                .insert(digest.as_str(), bytes.as_ref())?;
            tx.open_table(MANIFESTS)?
                .insert((repo.as_str(), digest.as_str()), rec.as_slice())?;
            if let Some(tag) = &tag {
                tx.open_table(TAGS)?
                    .insert((repo.as_str(), tag.as_str()), digest.as_str())?;
            }
            if let Some(subject) = &subject {
                tx.open_table(REFERRERS)?
                    .insert((repo.as_str(), subject.as_str(), digest.as_str()), ())?;
            }
            Ok(())
        })
        .await
    }

    async fn manifest(&self, repo: &str, digest: &Digest) -> Result<Option<ManifestRecord>> {
        self.read(|tx| {
            let table = tx.open_table(MANIFESTS)?;
            let d = digest.to_string();
            let v = table.get((repo, d.as_str()))?;
            v.map(|v| unjson(v.value())).transpose()
        })
        .await
    }

    async fn manifest_bytes(&self, digest: &Digest) -> Result<Option<Bytes>> {
        self.read(|tx| {
            let table = tx.open_table(MANIFEST_BYTES)?;
            let d = digest.to_string();
            let v = table.get(d.as_str())?;
            Ok(v.map(|v| Bytes::copy_from_slice(v.value())))
        })
        .await
    }

    async fn resolve_tag(&self, repo: &str, tag: &str) -> Result<Option<Digest>> {
        self.read(|tx| {
            let table = tx.open_table(TAGS)?;
            let v = table.get((repo, tag))?;
            v.map(|v| v.value().parse().map_err(corrupt)).transpose()
        })
        .await
    }

    async fn delete_manifest(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.write(move |tx| remove_manifest(tx, &repo, &digest))
            .await
    }

    async fn delete_untagged_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        stored_before_ms: u64,
    ) -> Result<bool> {
        let (repo, digest) = (repo.to_string(), digest.to_string());
        self.write(move |tx| {
            let rec = match tx
                .open_table(MANIFESTS)?
                .get((repo.as_str(), digest.as_str()))?
            {
                Some(v) => unjson::<ManifestRecord>(v.value())?,
                None => return Ok(false),
            };
            if rec.stored_ms == 0 || rec.stored_ms > stored_before_ms {
                return Ok(false);
            }
            if !tags_of(&tx.open_table(TAGS)?, &repo, &digest)?.is_empty() {
                return Ok(false);
            }
            remove_manifest(tx, &repo, &digest)
        })
        .await
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool> {
        let (repo, tag) = (repo.to_string(), tag.to_string());
        self.write(move |tx| {
            let existed = tx
                .open_table(TAGS)?
                .remove((repo.as_str(), tag.as_str()))?
                .is_some();
            Ok(existed)
        })
        .await
    }

    async fn tags(&self, repo: &str, last: Option<&str>, n: usize) -> Result<Page> {
        self.read(|tx| {
            let table = tx.open_table(TAGS)?;
            page2(&table, repo, last, n)
        })
        .await
    }

    async fn referrers(&self, repo: &str, subject: &Digest) -> Result<Vec<ManifestRecord>> {
        self.read(|tx| {
            let refs = tx.open_table(REFERRERS)?;
            let manifests = tx.open_table(MANIFESTS)?;
            let s = subject.to_string();
            let mut out = Vec::new();
            for item in refs.range::<(&str, &str, &str)>((repo, s.as_str(), "")..)? {
                let (k, _) = item?;
                let (r, sub, d) = k.value();
                if r != repo || sub != s {
                    break;
                }
                if let Some(v) = manifests.get((repo, d))? {
                    out.push(unjson(v.value())?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn put_upload(&self, upload: &UploadRecord) -> Result<()> {
        let id = upload.id.clone();
        let rec = json(upload)?;
        self.write(move |tx| {
            tx.open_table(UPLOADS)?
                .insert(id.as_str(), rec.as_slice())?;
            Ok(())
        })
        .await
    }

    async fn upload(&self, id: &str) -> Result<Option<UploadRecord>> {
        self.read(|tx| {
            let table = tx.open_table(UPLOADS)?;
            let v = table.get(id)?;
            v.map(|v| unjson(v.value())).transpose()
        })
        .await
    }

    async fn delete_upload(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.write(move |tx| {
            tx.open_table(UPLOADS)?.remove(id.as_str())?;
            Ok(())
        })
        .await
    }

    async fn uploads(&self) -> Result<Vec<UploadRecord>> {
        self.read(|tx| {
            let table = tx.open_table(UPLOADS)?;
            let mut out = Vec::new();
            for item in table.iter()? {
                let (_, v) = item?;
                out.push(unjson(v.value())?);
            }
            Ok(out)
        })
        .await
    }
    async fn manifest_page(
        &self,
        after: Option<(&str, &Digest)>,
        n: usize,
    ) -> Result<Vec<(String, ManifestRecord)>> {
        let after = after.map(|(r, d)| (r.to_string(), d.to_string()));
        self.read(|tx| {
            pairs_from(&tx.open_table(MANIFESTS)?, past(&after), n, |repo, _, v| {
                Ok(Some((repo.to_string(), unjson(v)?)))
            })
        })
        .await
    }

    async fn tag_page(
        &self,
        repo: &str,
        after: Option<&str>,
        n: usize,
    ) -> Result<Vec<(String, Digest)>> {
        self.read(|tx| {
            let start = match after {
                Some(t) => Bound::Excluded((repo, t)),
                None => Bound::Included((repo, "")),
            };
            pairs_from(&tx.open_table(TAGS)?, start, n, |r, tag, v| {
                if r != repo {
                    return Ok(None);
                }
                Ok(Some((tag.to_string(), v.parse().map_err(corrupt)?)))
            })
        })
        .await
    }

    async fn link_page(
        &self,
        after: Option<(&str, &Digest)>,
        n: usize,
    ) -> Result<Vec<(String, Digest, u64)>> {
        let after = after.map(|(r, d)| (r.to_string(), d.to_string()));
        self.read(|tx| {
            pairs_from(
                &tx.open_table(BLOB_LINKS)?,
                past(&after),
                n,
                |repo, digest, size| {
                    Ok(Some((
                        repo.to_string(),
                        digest.parse().map_err(corrupt)?,
                        size,
                    )))
                },
            )
        })
        .await
    }

    async fn gc_mark(&self, digests: &[Digest], at_ms: u64) -> Result<()> {
        let digests: Vec<String> = digests.iter().map(|d| d.to_string()).collect();
        self.write(move |tx| {
            let mut marks = tx.open_table(GC_MARKS)?;
            for d in &digests {
                marks.insert(d.as_str(), at_ms)?;
            }
            Ok(())
        })
        .await
    }

    async fn gc_unmark(&self, digests: &[Digest]) -> Result<()> {
        let digests: Vec<String> = digests.iter().map(|d| d.to_string()).collect();
        self.write(move |tx| {
            let mut marks = tx.open_table(GC_MARKS)?;
            for d in &digests {
                marks.remove(d.as_str())?;
            }
            Ok(())
        })
        .await
    }

    async fn record_access(&self, accesses: &[(Digest, u64)]) -> Result<()> {
        let accesses: Vec<(String, u64)> =
            accesses.iter().map(|(d, t)| (d.to_string(), *t)).collect();
        self.write(move |tx| {
            let mut table = tx.open_table(BLOB_ACCESS)?;
            for (d, t) in &accesses {
                let old = table.get(d.as_str())?.map(|v| v.value());
                if old.is_none_or(|o| o < *t) {
                    table.insert(d.as_str(), *t)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn access_times(&self, digests: &[Digest]) -> Result<Vec<Option<u64>>> {
        self.read(|tx| {
            let table = tx.open_table(BLOB_ACCESS)?;
            let mut out = Vec::with_capacity(digests.len());
            for d in digests {
                out.push(table.get(d.to_string().as_str())?.map(|v| v.value()));
            }
            Ok(out)
        })
        .await
    }

    async fn gc_sweep(&self, digest: &Digest, at_ms: u64) -> Result<Option<Vec<String>>> {
        let digest = digest.to_string();
        self.write(move |tx| {
            let mut marks = tx.open_table(GC_MARKS)?;
            let still = marks.get(digest.as_str())?.map(|v| v.value());
            if still != Some(at_ms) {
                return Ok(None);
            }
            marks.remove(digest.as_str())?;
            tx.open_table(BLOB_ACCESS)?.remove(digest.as_str())?;
            let repos: Vec<String> = {
                let table = tx.open_table(REPOS)?;
                let mut repos = Vec::new();
                for item in table.iter()? {
                    repos.push(item?.0.value().to_string());
                }
                repos
            };
            let mut links = tx.open_table(BLOB_LINKS)?;
            let mut unlinked = Vec::new();
            for repo in repos {
                if links.remove((repo.as_str(), digest.as_str()))?.is_some() {
                    unlinked.push(repo);
                }
            }
            Ok(Some(unlinked))
        })
        .await
    }
}

/// The tags of `repo` that point at `digest`.
fn tags_of(
    tags: &impl ReadableTable<(&'static str, &'static str), &'static str>,
    repo: &str,
    digest: &str,
) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for item in tags.range::<(&str, &str)>((repo, "")..)? {
        let (k, v) = item?;
        let (r, t) = k.value();
        if r != repo {
            break;
        }
        if v.value() == digest {
            found.push(t.to_string());
        }
    }
    Ok(found)
}

/// Remove a manifest from `repo` with every tag on it and its referrer entry.
fn remove_manifest(tx: &redb::WriteTransaction, repo: &str, digest: &str) -> Result<bool> {
    let rec = {
        let mut manifests = tx.open_table(MANIFESTS)?;
        let removed = manifests.remove((repo, digest))?;
        match removed {
            Some(v) => unjson::<ManifestRecord>(v.value())?,
            None => return Ok(false),
        }
    };
    let mut tags = tx.open_table(TAGS)?;
    for t in tags_of(&tags, repo, digest)? {
        tags.remove((repo, t.as_str()))?;
    }
    if let Some(subject) = rec.subject {
        let s = subject.to_string();
        tx.open_table(REFERRERS)?
            .remove((repo, s.as_str(), digest))?;
    }
    Ok(true)
}

/// One job from the `jobs` table.
#[async_trait]
impl ImportLog for RedbMetaStore {
    async fn imported(&self, digest: &Digest) -> Result<Option<ImportedFile>> {
        let key = digest.to_string();
        self.read(|tx| match tx.open_table(IMPORT_FILES)?.get(key.as_str())? {
            Some(v) => Ok(Some(unjson(v.value())?)),
            None => Ok(None),
        })
        .await
    }

    async fn record_import(&self, file: &ImportedFile) -> Result<()> {
        let key = file.digest.to_string();
        let value = json(file)?;
        self.write(move |tx| {
            tx.open_table(IMPORT_FILES)?
                .insert(key.as_str(), value.as_slice())?;
            Ok(())
        })
        .await
    }
}

fn load_job(table: &impl ReadableTable<u64, &'static [u8]>, id: u64) -> Result<Option<Job>> {
    table.get(id)?.map(|v| unjson(v.value())).transpose()
}

/// Every job, by id.
fn all_jobs(table: &impl ReadableTable<u64, &'static [u8]>) -> Result<Vec<Job>> {
    let mut out = Vec::new();
    for item in table.iter()? {
        let (_, v) = item?;
        out.push(unjson(v.value())?);
    }
    Ok(out)
}

/// Write `job` and, if it waits for a time, its entry in the due index. The caller has removed
/// the entry of the job's previous state.
fn save_job(tx: &redb::WriteTransaction, job: &Job) -> Result<()> {
    tx.open_table(JOBS)?.insert(job.id, json(job)?.as_slice())?;
    if job.state.is_waiting() {
        tx.open_table(JOB_DUE)?
            .insert((job.next_at_ms, job.id), ())?;
    }
    Ok(())
}

/// Take the next job id. A counter rather than the highest id in `jobs`, which pruning may
/// remove: ids are never reused.
fn next_job_id(tx: &redb::WriteTransaction) -> Result<u64> {
    let mut seq = tx.open_table(JOB_SEQ)?;
    let next = seq.get("next")?.map(|v| v.value()).unwrap_or(1);
    seq.insert("next", next + 1)?;
    Ok(next)
}

/// Set the jobs in `state` (the one with `id`, or all) back to queued and due at `now`, with
/// `attempts` reset if asked.
fn requeue(
    tx: &redb::WriteTransaction,
    state: JobState,
    id: Option<u64>,
    now: u64,
    reset_attempts: bool,
) -> Result<usize> {
    let chosen: Vec<Job> = {
        let jobs = tx.open_table(JOBS)?;
        match id {
            Some(id) => load_job(&jobs, id)?.into_iter().collect(),
            None => all_jobs(&jobs)?,
        }
    };
    let mut n = 0;
    for mut job in chosen.into_iter().filter(|j| j.state == state) {
        // Neither running nor failed jobs are in the due index, so there is no entry to drop.
        job.state = JobState::Queued;
        job.next_at_ms = now;
        job.updated_ms = now;
        if reset_attempts {
            job.attempts = 0;
        }
        save_job(tx, &job)?;
        n += 1;
    }
    Ok(n)
}

#[async_trait]
impl JobStore for RedbMetaStore {
    async fn enqueue(&self, kind: &str, key: &str, payload: serde_json::Value) -> Result<u64> {
        let (kind, key) = (kind.to_string(), key.to_string());
        let now = unix_ms();
        self.write(move |tx| {
            let current = tx
                .open_table(JOB_KEYS)?
                .get(key.as_str())?
                .map(|v| v.value());
            if let Some(id) = current {
                let mut jobs = tx.open_table(JOBS)?;
                match load_job(&jobs, id)? {
                    Some(job) if job.state.is_active() => return Ok(id),
                    // Over (succeeded or failed): the new request replaces it.
                    Some(_) => {
                        jobs.remove(id)?;
                    }
                    None => {}
                }
            }
            let id = next_job_id(tx)?;
            save_job(
                tx,
                &Job {
                    id,
                    kind: kind.clone(),
                    key: key.clone(),
                    payload: payload.clone(),
                    state: JobState::Queued,
                    attempts: 0,
                    last_error: None,
                    next_at_ms: now,
                    created_ms: now,
                    updated_ms: now,
                },
            )?;
            tx.open_table(JOB_KEYS)?.insert(key.as_str(), id)?;
            Ok(id)
        })
        .await
    }

    async fn record(
        &self,
        kind: &str,
        key: &str,
        payload: serde_json::Value,
    ) -> Result<Option<u64>> {
        let (kind, key) = (kind.to_string(), key.to_string());
        let now = unix_ms();
        self.write(move |tx| {
            let current = tx
                .open_table(JOB_KEYS)?
                .get(key.as_str())?
                .map(|v| v.value());
            if let Some(id) = current {
                let jobs = tx.open_table(JOBS)?;
                if load_job(&jobs, id)?.is_some_and(|j| j.state.is_active()) {
                    return Ok(None);
                }
            }
            let id = next_job_id(tx)?;
            save_job(
                tx,
                &Job {
                    id,
                    kind: kind.clone(),
                    key: key.clone(),
                    payload: payload.clone(),
                    state: JobState::Running,
                    attempts: 0,
                    last_error: None,
                    next_at_ms: now,
                    created_ms: now,
                    updated_ms: now,
                },
            )?;
            tx.open_table(JOB_KEYS)?.insert(key.as_str(), id)?;
            Ok(Some(id))
        })
        .await
    }

    async fn job(&self, id: u64) -> Result<Option<Job>> {
        self.read(|tx| load_job(&tx.open_table(JOBS)?, id)).await
    }

    async fn jobs(&self) -> Result<Vec<Job>> {
        self.read(|tx| all_jobs(&tx.open_table(JOBS)?)).await
    }

    async fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<Job>> {
        self.read(|tx| {
            let due = tx.open_table(JOB_DUE)?;
            let jobs = tx.open_table(JOBS)?;
            let mut out = Vec::new();
            for item in due.range::<(u64, u64)>((0, 0)..=(now_ms, u64::MAX))? {
                if out.len() >= limit {
                    break;
                }
                let (k, _) = item?;
                let (_, id) = k.value();
                if let Some(job) = load_job(&jobs, id)? {
                    out.push(job);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn next_due(&self) -> Result<Option<u64>> {
        self.read(|tx| {
            let due = tx.open_table(JOB_DUE)?;
            let first = due.first()?;
            Ok(first.map(|(k, _)| k.value().0))
        })
        .await
    }

    async fn update(&self, job: &Job) -> Result<()> {
        let job = job.clone();
        self.write(move |tx| {
            let old = {
                let jobs = tx.open_table(JOBS)?;
                load_job(&jobs, job.id)?.ok_or(StoreError::JobUnknown(job.id))?
            };
            if old.state.is_waiting() {
                tx.open_table(JOB_DUE)?.remove((old.next_at_ms, old.id))?;
            }
            let new = Job {
                kind: old.kind,
                key: old.key,
                created_ms: old.created_ms,
                ..job.clone()
            };
            save_job(tx, &new)
        })
        .await
    }

    async fn retry(&self, id: Option<u64>) -> Result<usize> {
        let now = unix_ms();
        self.write(move |tx| requeue(tx, JobState::Failed, id, now, true))
            .await
    }

    async fn prune_succeeded(&self, keep: usize, before_ms: u64) -> Result<usize> {
        self.write(move |tx| {
            let doomed: Vec<Job> = {
                let jobs = tx.open_table(JOBS)?;
                all_jobs(&jobs)?
                    .into_iter()
                    .rev()
                    .filter(|j| j.state == JobState::Succeeded)
                    .enumerate()
                    .filter(|(i, j)| *i >= keep || j.updated_ms < before_ms)
                    .map(|(_, j)| j)
                    .collect()
            };
            let mut jobs = tx.open_table(JOBS)?;
            let mut keys = tx.open_table(JOB_KEYS)?;
            for job in &doomed {
                jobs.remove(job.id)?;
                if keys.get(job.key.as_str())?.map(|v| v.value()) == Some(job.id) {
                    keys.remove(job.key.as_str())?;
                }
            }
            Ok(doomed.len())
        })
        .await
    }

    async fn recover(&self) -> Result<usize> {
        let now = unix_ms();
        self.write(move |tx| requeue(tx, JobState::Running, None, now, false))
            .await
    }
}

#[async_trait]
impl PinStore for RedbMetaStore {
    async fn pin(&self, repo: &str, digest: &Digest, by: &str) -> Result<()> {
        let (repo, digest, by) = (repo.to_string(), digest.to_string(), by.to_string());
        let now = unix_ms();
        self.write(move |tx| {
            let mut pins = tx.open_table(PINS)?;
            let mut pin = match pins.get((repo.as_str(), digest.as_str()))? {
                Some(v) => unjson::<Pin>(v.value())?,
                None => Pin {
                    repo: repo.clone(),
                    digest: digest.clone(),
                    by: Vec::new(),
                    pinned_ms: now,
                },
            };
            if !pin.by.contains(&by) {
                pin.by.push(by.clone());
                pin.by.sort();
                pins.insert((repo.as_str(), digest.as_str()), json(&pin)?.as_slice())?;
            }
            Ok(())
        })
        .await
    }

    async fn unpin(&self, repo: &str, digest: &Digest, by: &str) -> Result<bool> {
        let (repo, digest, by) = (repo.to_string(), digest.to_string(), by.to_string());
        self.write(move |tx| {
            let mut pins = tx.open_table(PINS)?;
            let Some(mut pin) = pins
                .get((repo.as_str(), digest.as_str()))?
                .map(|v| unjson::<Pin>(v.value()))
                .transpose()?
            else {
                return Ok(false);
            };
            let before = pin.by.len();
            pin.by.retain(|b| b != &by);
            if pin.by.is_empty() {
                pins.remove((repo.as_str(), digest.as_str()))?;
            } else if pin.by.len() != before {
                pins.insert((repo.as_str(), digest.as_str()), json(&pin)?.as_slice())?;
            }
            Ok(pin.by.len() != before)
        })
        .await
    }

    async fn pins(&self) -> Result<Vec<Pin>> {
        self.read(|tx| {
            let pins = tx.open_table(PINS)?;
            let mut out = Vec::new();
            for item in pins.iter()? {
                let (_, v) = item?;
                out.push(unjson::<Pin>(v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn pinned(&self, repo: &str, digest: &Digest) -> Result<Option<Pin>> {
        let digest = digest.to_string();
        self.read(|tx| {
            tx.open_table(PINS)?
                .get((repo, digest.as_str()))?
                .map(|v| unjson::<Pin>(v.value()))
                .transpose()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use redb::backends::InMemoryBackend;
    use redb::StorageBackend;

    use super::*;

    /// Storage that keeps its bytes across reopens and fails writes with ENOSPC on demand.
    #[derive(Debug)]
    struct Flaky {
        inner: Arc<InMemoryBackend>,
        full: Arc<AtomicBool>,
    }

    impl Flaky {
        fn check(&self) -> std::io::Result<()> {
            if self.full.load(Ordering::SeqCst) {
                Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
            } else {
                Ok(())
            }
        }
    }

    impl StorageBackend for Flaky {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
            self.inner.read(offset, len)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self, eventual: bool) -> std::io::Result<()> {
            self.check()?;
            self.inner.sync_data(eventual)
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.inner.write(offset, data)
        }
    }

    fn digest(n: u8) -> Digest {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn a_full_disk_during_a_commit_does_not_poison_later_transactions() {
        let inner = Arc::new(InMemoryBackend::new());
        let full = Arc::new(AtomicBool::new(false));
        let (i, f) = (inner.clone(), full.clone());
        let store = RedbMetaStore::open_with(Arc::new(move || {
            let backend = Flaky {
                inner: i.clone(),
                full: f.clone(),
            };
            Ok(Database::builder().create_with_backend(backend)?)
        }))
        .unwrap();
        store.link_blob("team/app", &digest(1), 10).await.unwrap();

        full.store(true, Ordering::SeqCst);
        let e = store
            .link_blob("team/app", &digest(2), 20)
            .await
            .unwrap_err();
        assert!(e.is_no_space(), "{e}");
        assert!(e.to_string().contains("No space left on device"), "{e}");

        // Space is back: the next transactions work without anyone reopening by hand, and
        // what was committed before the failure is intact.
        full.store(false, Ordering::SeqCst);
        store.link_blob("team/app", &digest(3), 30).await.unwrap();
        assert_eq!(
            store.blob_link("team/app", &digest(1)).await.unwrap(),
            Some(10)
        );
        assert_eq!(store.blob_link("team/app", &digest(2)).await.unwrap(), None);
        assert_eq!(
            store.blob_link("team/app", &digest(3)).await.unwrap(),
            Some(30)
        );
        assert!(store.repo_exists("team/app").await.unwrap());
    }
}

#[cfg(test)]
mod import_tests {
    use super::*;

    #[tokio::test]
    async fn imported_files_are_remembered_across_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta.redb");
        let d = Digest::sha256(b"an archive");
        let file = ImportedFile {
            digest: d.clone(),
            name: "app.tar".into(),
            size: 10,
            images: vec!["team/app:v1@sha256:00".into()],
            at_ms: 1,
        };
        {
            let store = RedbMetaStore::open(&path).expect("open");
            assert_eq!(store.imported(&d).await.expect("read"), None);
            store.record_import(&file).await.expect("record");
        }
        let store = RedbMetaStore::open(&path).expect("reopen");
        assert_eq!(store.imported(&d).await.expect("read"), Some(file));
        assert_eq!(
            store
                .imported(&Digest::sha256(b"other"))
                .await
                .expect("read"),
            None
        );
    }
}
