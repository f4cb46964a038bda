//! Importing image archives: `POST /api/v1/import` (what `pier import FILE` calls) and the
//! watched folder ([`watch`]) both end in [`import_reader`].
//!
//! The archive is read once on a blocking thread (`pier-archive`); each blob is streamed into
//! the blob store as it passes, which verifies it (and writes nothing for a blob it already
//! has). Only when the whole file has been read and every blob is durable are the images made
//! visible: blobs linked into their repositories, child manifests stored before the index, tags
//! last, then each image announced through [`crate::events::pushed`] like a push. A file whose
//! digest was imported before (under any name) is recognised by the import log and changes
//! nothing.

pub mod job;
pub mod watch;

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, Method, Request};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::TryStreamExt;
use pier_archive::read::{read_archive, BlobSink, Contents, SinkError};
use pier_oci::{Digest, Reference, RepoName, Route, Tag};
use pier_registry::RegistryError;
use pier_store::{BlobStore, ByteStream, ImportLog, ImportedFile, MemoryImportLog, StoreError};
use serde::Serialize;
use tokio::runtime::Handle;

use crate::metrics::ResultLabels;
use crate::AppState;

/// Bytes handed to the blob store at a time.
const CHUNK: usize = 1 << 20;

/// How imports behave on this node.
pub struct ImportSettings {
    /// Put before every repository name an archive gives (`site/` makes `team/app` into
    /// `site/team/app`); empty for none.
    pub prefix: String,
    /// The files imported so far.
    pub log: Arc<dyn ImportLog>,
    /// The most bytes one archive may write to the blob store once inflated (`[import]
    /// max_size`); an archive that would write more fails and keeps nothing of the blob it was
    /// writing.
    pub max_size: u64,
    /// The job queue every import is a row of ([`job`]); `None` records nothing.
    pub jobs: Option<Arc<pier_store::JobRunner>>,
}

/// `[import] max_size` by default: room for the largest real images (CUDA and ML images
/// reach 20-30 GB inflated), yet a decompression bomb stops long before it fills a disk.
pub const DEFAULT_MAX_SIZE: u64 = 64 << 30;

/// Inflated bytes past which an archive must not have inflated more than [`MAX_RATIO`]
/// times the bytes read of its file: below it a ratio proves nothing (a small layer of zeros
/// compresses a thousandfold), above it only a bomb does so.
pub const RATIO_FLOOR: u64 = 1 << 30;

/// The most an archive's inflated bytes may be of its file's bytes read so far, once past
/// [`RATIO_FLOOR`]. Real layers compress 2-10x; gzip's own limit is about 1,030x.
pub const MAX_RATIO: u64 = 100;

impl Default for ImportSettings {
    fn default() -> Self {
        ImportSettings {
            prefix: String::new(),
            log: Arc::new(MemoryImportLog::default()),
            max_size: DEFAULT_MAX_SIZE,
            jobs: None,
        }
    }
}

/// Counts the bytes read of an archive file, before any decompression.
struct CountingReader {
    inner: Box<dyn Read + Send>,
    read: Arc<AtomicU64>,
}

impl Read for CountingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The size guards of one import: what was written so far against `[import] max_size`, and
/// against the file's bytes read. The first refusal is kept, since the archive reader only
/// sees an I/O error and would call it retryable.
struct SizeGuard {
    max_size: u64,
    file_read: Arc<AtomicU64>,
    written: u64,
    refused: Arc<Mutex<Option<String>>>,
}

impl SizeGuard {
    fn add(&mut self, n: usize) -> Result<(), String> {
        self.written += n as u64;
        let read = self.file_read.load(Ordering::Relaxed).max(1);
        let why = if self.written > self.max_size {
            format!(
                "the archive inflates to more than [import] max_size ({} bytes); nothing of it \
                 was kept past the blob being written",
                self.max_size
            )
        } else if self.written > RATIO_FLOOR && self.written / read > MAX_RATIO {
            format!(
                "the archive inflated {} bytes from {read} bytes of the file, more than \
                 {MAX_RATIO} times, as only a decompression bomb does",
                self.written
            )
        } else {
            return Ok(());
        };
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why.clone());
        Err(why)
    }
}

/// What became of an archive file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Imported,
    /// The same content was imported before (perhaps under another name): nothing changed.
    Duplicate,
    /// The file is not an importable archive, or is broken; trying it again will not help.
    Failed,
    /// The store failed (a full disk, say); the file may be imported later as it is.
    Retry,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Imported => "imported",
            Outcome::Duplicate => "duplicate",
            Outcome::Failed => "failed",
            Outcome::Retry => "retry",
        }
    }
}

/// The status of an import's answer: 200 when the file was imported or was a duplicate, 422
/// for a file that is not an importable archive, 503 when the store failed and the same file
/// may be sent again later. The body is the import report in every case.
pub fn import_status(result: Outcome) -> axum::http::StatusCode {
    use axum::http::StatusCode;
    match result {
        Outcome::Imported | Outcome::Duplicate => StatusCode::OK,
        Outcome::Failed => StatusCode::UNPROCESSABLE_ENTITY,
        Outcome::Retry => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// One image an import made visible.
#[derive(Debug, Clone, Serialize)]
pub struct ImportedImage {
    /// `repo:tag` in this registry.
    pub name: String,
    pub digest: String,
}

/// The report of one file's import, as `POST /api/v1/import` answers it.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    pub file: String,
    pub result: Outcome,
    /// sha256 of the file as received; absent when it could not be read to its end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    pub bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<&'static str>,
    pub images: Vec<ImportedImage>,
    /// Images of the archive that were not imported, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// For a duplicate, the name the file had when it was first imported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub seconds: f64,
}

impl ImportReport {
    fn new(file: &str) -> ImportReport {
        ImportReport {
            file: file.to_string(),
            result: Outcome::Failed,
            digest: None,
            bytes: 0,
            format: None,
            compression: None,
            images: Vec::new(),
            skipped: Vec::new(),
            notes: Vec::new(),
            duplicate_of: None,
            error: None,
            seconds: 0.0,
        }
    }
}

/// The blob store as the archive reader's sink: called on the reading thread, it drives the
/// store's async streaming put on the runtime.
struct StoreSink {
    rt: Handle,
    blobs: Arc<dyn BlobStore>,
    limit: Option<u64>,
    guard: SizeGuard,
}

fn sink_err(e: StoreError) -> SinkError {
    match e {
        StoreError::DigestMismatch { expected, actual } => SinkError::Mismatch { expected, actual },
        e => SinkError::Store(e.to_string()),
    }
}

impl BlobSink for StoreSink {
    fn has(&mut self, digest: &Digest) -> Result<bool, SinkError> {
        self.rt
            .block_on(self.blobs.stat(digest))
            .map(|s| s.is_some())
            .map_err(sink_err)
    }

    fn put(
        &mut self,
        expected: Option<&Digest>,
        body: &mut dyn Read,
    ) -> Result<(Digest, u64), SinkError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
        let stream: ByteStream = Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|c| (c, rx))
        }));
        let (blobs, expected, limit) = (self.blobs.clone(), expected.cloned(), self.limit);
        let task = self
            .rt
            .spawn(async move { blobs.put(expected.as_ref(), stream, limit).await });
        loop {
            let mut buf = vec![0u8; CHUNK];
            let mut filled = 0;
            let mut failed = None;
            while filled < CHUNK {
                match body.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            buf.truncate(filled);
            if failed.is_none() {
                if let Err(why) = self.guard.add(filled) {
                    failed = Some(io::Error::other(why));
                    buf.clear();
                }
            }
            let end = filled < CHUNK || failed.is_some();
            if !buf.is_empty() && tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                // The store gave up on this blob; its error says why.
                break;
            }
            if let Some(e) = failed {
                // The store must not commit a blob whose bytes broke off.
                let _ = tx.blocking_send(Err(e));
                break;
            }
            if end {
                break;
            }
        }
        drop(tx);
        self.rt
            .block_on(task)
            .map_err(|e| SinkError::Store(e.to_string()))?
            .map_err(sink_err)
    }

    fn get(&mut self, digest: &Digest, max: u64) -> Result<Option<Vec<u8>>, SinkError> {
        let blobs = self.blobs.clone();
        let d = digest.clone();
        self.rt.block_on(async move {
            let Some(size) = blobs.stat(&d).await.map_err(sink_err)? else {
                return Ok(None);
            };
            if size > max {
                return Err(SinkError::Store(format!(
                    "{d} has {size} bytes, more than a document may"
                )));
            }
            let stream = blobs.read(&d, 0, size).await.map_err(sink_err)?;
            let chunks: Vec<Bytes> = stream
                .try_collect()
                .await
                .map_err(|e| SinkError::Store(e.to_string()))?;
            Ok(Some(chunks.concat()))
        })
    }
}

/// Why the images of a read archive could not be made visible.
struct Refused {
    message: String,
    retryable: bool,
}

impl From<RegistryError> for Refused {
    fn from(e: RegistryError) -> Refused {
        let retryable = matches!(e, RegistryError::Store(_));
        Refused {
            message: e.to_string(),
            retryable,
        }
    }
}

/// Import the archive `reader` yields; `file` names it in the report and the log. Never
/// fails: what went wrong is the report's `result` and `error`.
pub async fn import_reader(
    state: &AppState,
    file: &str,
    reader: Box<dyn Read + Send>,
) -> ImportReport {
    let started = Instant::now();
    let mut report = ImportReport::new(file);
    let file_read = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(Mutex::new(None));
    let reader = CountingReader {
        inner: reader,
        read: file_read.clone(),
    };
    let sink = StoreSink {
        rt: Handle::current(),
        blobs: state.registry.blob_store().clone(),
        limit: state.registry.limits().max_blob_bytes,
        guard: SizeGuard {
            max_size: state.import.max_size,
            file_read,
            written: 0,
            refused: refused.clone(),
        },
    };
    let read = tokio::task::spawn_blocking(move || {
        let mut sink = sink;
        read_archive(reader, &mut sink)
    })
    .await;
    let refused = refused.lock().unwrap_or_else(|e| e.into_inner()).take();
    let contents = match read {
        Ok(Ok(c)) => c,
        Ok(Err(_)) if refused.is_some() => {
            report.result = Outcome::Failed;
            report.error = refused;
            return finish(state, report, started);
        }
        Ok(Err(e)) => {
            report.result = if e.is_retryable() {
                Outcome::Retry
            } else {
                Outcome::Failed
            };
            report.error = Some(e.to_string());
            return finish(state, report, started);
        }
        Err(e) => {
            report.error = Some(format!("the import task failed: {e}"));
            return finish(state, report, started);
        }
    };
    report.digest = Some(contents.file_digest.to_string());
    report.bytes = contents.file_size;
    report.format = Some(contents.format.as_str());
    report.compression = Some(contents.compression.as_str());
    report.skipped = contents.skipped.clone();
    report.notes = contents
        .images
        .iter()
        .flat_map(|i| i.notes.clone())
        .collect();
    let settings = state.import.clone();
    match settings.log.imported(&contents.file_digest).await {
        Ok(Some(earlier)) => {
            report.result = Outcome::Duplicate;
            report.duplicate_of = Some(earlier.name);
            report.images = earlier
                .images
                .iter()
                .filter_map(|i| i.rsplit_once('@'))
                .map(|(name, digest)| ImportedImage {
                    name: name.to_string(),
                    digest: digest.to_string(),
                })
                .collect();
            return finish(state, report, started);
        }
        Ok(None) => {}
        Err(e) => {
            report.result = Outcome::Retry;
            report.error = Some(format!("reading the import log failed: {e}"));
            return finish(state, report, started);
        }
    }
    if contents.images.is_empty() {
        report.error = Some(if contents.skipped.is_empty() {
            "the archive holds no image".to_string()
        } else {
            format!(
                "no image could be imported: {}",
                contents.skipped.join("; ")
            )
        });
        return finish(state, report, started);
    }
    match make_visible(state, &settings.prefix, &contents).await {
        Ok(images) => report.images = images,
        Err(r) => {
            report.result = if r.retryable {
                Outcome::Retry
            } else {
                Outcome::Failed
            };
            report.error = Some(r.message);
            return finish(state, report, started);
        }
    }
    let record = ImportedFile {
        digest: contents.file_digest.clone(),
        name: file.to_string(),
        size: contents.file_size,
        images: report
            .images
            .iter()
            .map(|i| format!("{}@{}", i.name, i.digest))
            .collect(),
        at_ms: pier_store::jobs::unix_ms(),
    };
    if let Err(e) = settings.log.record_import(&record).await {
        // The images are visible; only the memory of this file is missing, so a copy of it
        // would be imported again (changing nothing).
        tracing::warn!(file, error = %e, "recording the imported file failed");
        report
            .notes
            .push(format!("the file could not be recorded as imported: {e}"));
    }
    report.result = Outcome::Imported;
    for image in &contents.images {
        let Some(digest) = image.digest() else {
            continue;
        };
        for name in &image.names {
            let repo = format!("{}{}", settings.prefix, name.repo);
            crate::events::pushed(state, &repo, digest, Some(&name.tag)).await;
        }
    }
    finish(state, report, started)
}

fn finish(state: &AppState, mut report: ImportReport, started: Instant) -> ImportReport {
    report.seconds = started.elapsed().as_secs_f64();
    state
        .metrics
        .import_files
        .get_or_create(&ResultLabels {
            result: report.result.as_str(),
        })
        .inc();
    let mbps = report.bytes as f64 / 1e6 / report.seconds.max(1e-9);
    match report.result {
        Outcome::Imported | Outcome::Duplicate => tracing::info!(
            file = %report.file,
            result = report.result.as_str(),
            images = report.images.len(),
            bytes = report.bytes,
            mb_per_s = format!("{mbps:.0}"),
            "archive imported"
        ),
        Outcome::Failed | Outcome::Retry => tracing::warn!(
            file = %report.file,
            result = report.result.as_str(),
            error = report.error.as_deref().unwrap_or(""),
            "archive not imported"
        ),
    }
    report
}

/// Check every name first (nothing becomes visible if one is refused), then link the blobs
/// into each repository, store the child manifests and the tags.
async fn make_visible(
    state: &AppState,
    prefix: &str,
    contents: &Contents,
) -> Result<Vec<ImportedImage>, Refused> {
    let mut targets: Vec<(usize, RepoName, Tag)> = Vec::new();
    for (i, image) in contents.images.iter().enumerate() {
        for name in &image.names {
            let full = format!("{prefix}{}", name.repo);
            let repo: RepoName = full.parse().map_err(|e| Refused {
                message: format!("{full} is not a valid repository name: {e}"),
                retryable: false,
            })?;
            let tag: Tag = name.tag.parse().map_err(|e| Refused {
                message: format!("{full}:{} has an invalid tag: {e}", name.tag),
                retryable: false,
            })?;
            let route = Route::Manifest {
                name: repo.clone(),
                reference: Reference::Tag(tag.clone()),
            };
            // The same decision as a push of that name: one name means one image.
            match crate::mirror::target(
                state,
                &route,
                &Method::PUT,
                &crate::respond::Query::empty(),
            )
            .await
            {
                Ok(None) => {}
                Ok(Some(r)) => {
                    return Err(Refused {
                        message: format!(
                            "{full} is mirrored from {}; import under a hosted name ([import] \
                             prefix)",
                            r.upstream_name()
                        ),
                        retryable: false,
                    })
                }
                Err(e) => {
                    return Err(Refused {
                        message: e.message,
                        retryable: false,
                    })
                }
            }
            targets.push((i, repo, tag));
        }
    }
    let meta = state.registry.meta_store();
    let mut out = Vec::new();
    for (i, repo, tag) in &targets {
        let image = &contents.images[*i];
        for (digest, size) in &image.blobs {
            meta.link_blob(repo.as_str(), digest, *size)
                .await
                .map_err(|e| Refused::from(RegistryError::from(e)))?;
        }
        let Some((top, children)) = image.manifests.split_last() else {
            continue;
        };
        for child in children {
            state
                .registry
                .put_manifest(
                    repo,
                    &Reference::Digest(child.digest.clone()),
                    Some(&child.media_type),
                    Bytes::from(child.bytes.clone()),
                )
                .await?;
        }
        let pushed = state
            .registry
            .put_manifest(
                repo,
                &Reference::Tag(tag.clone()),
                Some(&top.media_type),
                Bytes::from(top.bytes.clone()),
            )
            .await?;
        out.push(ImportedImage {
            name: format!("{repo}:{tag}"),
            digest: pushed.digest.to_string(),
        });
    }
    Ok(out)
}

/// `POST /api/v1/import[?name=FILE]`: the body is an archive; the answer is its
/// [`ImportReport`] (the status says whether it was imported, see [`import_status`]).
pub async fn import(State(state): State<AppState>, req: Request<Body>) -> Response {
    let q = crate::respond::Query::of(&req);
    let name = q.get("name").unwrap_or("upload").to_string();
    let stream = req.into_body().into_data_stream().map_err(io::Error::other);
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let row = job::begin(
        &state,
        &job::upload_key(&name),
        &job::ImportPayload {
            file: name.clone(),
            ..job::ImportPayload::default()
        },
    )
    .await;
    let report = import_reader(&state, &name, Box::new(reader)).await;
    if let job::Begun::Row(id) = row {
        // Nothing keeps an upload to try it again: a store failure fails its row (the client
        // is told it may send the file again).
        job::end(&state, id, &report, None).await;
    }
    let status = import_status(report.result);
    let body = serde_json::to_string(&report).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn guard(max_size: u64, file_read: u64) -> (SizeGuard, Arc<AtomicU64>) {
        let read = Arc::new(AtomicU64::new(file_read));
        let guard = SizeGuard {
            max_size,
            file_read: read.clone(),
            written: 0,
            refused: Arc::new(Mutex::new(None)),
        };
        (guard, read)
    }

    /// Write `total` bytes through the guard a MiB at a time; the bytes written when it refused.
    fn feed(guard: &mut SizeGuard, total: u64) -> Option<(u64, String)> {
        let mut written = 0;
        while written < total {
            written += MIB as u64;
            if let Err(why) = guard.add(MIB) {
                return Some((written, why));
            }
        }
        None
    }

    #[test]
    fn a_bomb_is_refused_once_past_the_floor_and_the_first_reason_is_kept() {
        // 2.1 MB of gzip inflating to 2 GiB: ~1,000x.
        let (mut g, _) = guard(DEFAULT_MAX_SIZE, 2_100_000);
        let (at, why) = feed(&mut g, 2 << 30).expect("refused");
        assert_eq!(
            at,
            RATIO_FLOOR + MIB as u64,
            "refused as soon as past the floor"
        );
        assert!(why.contains("more than 100 times"), "{why}");
        assert!(why.contains("decompression bomb"), "{why}");
        // The reason the import reports is the first one, whatever the reader makes of the
        // I/O error afterwards.
        let _ = g.add(MIB);
        let kept = g.refused.lock().unwrap().clone();
        assert_eq!(kept.as_deref(), Some(why.as_str()));
    }

    #[test]
    fn a_highly_compressible_layer_below_the_floor_is_not_a_bomb() {
        // A 512 MiB layer of zeros from half a MiB of gzip: a thousandfold, and legitimate.
        let (mut g, _) = guard(DEFAULT_MAX_SIZE, 512 << 10);
        assert_eq!(feed(&mut g, 512 << 20), None);
    }

    #[test]
    fn real_compression_ratios_pass_past_the_floor() {
        // 3 GiB inflated while the file is read along at a 10x ratio: a large real image.
        let (mut g, read) = guard(DEFAULT_MAX_SIZE, 0);
        for _ in 0..3 * 1024 {
            read.fetch_add(MIB as u64 / 10, Ordering::Relaxed);
            assert_eq!(g.add(MIB), Ok(()));
        }
    }

    #[test]
    fn max_size_is_refused_first_and_names_the_setting() {
        let (mut g, _) = guard(8 << 20, 8 << 20);
        let (at, why) = feed(&mut g, 64 << 20).expect("refused");
        assert_eq!(at, (8 << 20) + MIB as u64);
        assert!(why.contains("[import] max_size (8388608 bytes)"), "{why}");
    }
}
