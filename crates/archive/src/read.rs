//! Reading an image archive in one pass.
//!
//! The tar's entries may come in any order (a `docker save` writes layers before the
//! `manifest.json` that explains them), so each regular file is dealt with as it passes:
//!
//! - a blob of an OCI layout (`blobs/<alg>/<hex>`) is verified against its name. If the sink
//!   already has it, its bytes are only hashed; a small one is held in memory (it may be a
//!   manifest, which is not stored as a blob); any other goes to the sink, which stores it;
//! - any other large file (a legacy `<id>/layer.tar`, skopeo's `<hex>.tar`) goes to the sink,
//!   which computes its digest;
//! - small files (`manifest.json`, `index.json`, configs) are held in memory.
//!
//! At the end the layout is resolved: `index.json` when there is one (Docker 25 writes both
//! it and `manifest.json`), else `manifest.json`, whose images get a synthesized OCI manifest
//! whose layers are exactly the archive's layer files. Held blobs that an image references are
//! handed to the sink then; held files nothing references are dropped. Memory is bounded: at
//! most [`HOLD_BUDGET`] bytes are held, and what does not fit goes to the sink at once (and is
//! read back from it if it turns out to be a manifest).

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};

use pier_oci::{Algorithm, Descriptor, Digest, Hasher, Manifest};
use serde::Deserialize;

use crate::media::{self as amedia, CONTAINERD_IMAGE_NAME, REF_NAME};
use crate::names::{normalize, ImageName};
use crate::Compression;

/// A file no larger than this may be held in memory until the layout says what it is.
pub const SMALL: u64 = 1 << 20;
/// The most bytes held in memory at once.
pub const HOLD_BUDGET: u64 = 64 << 20;
/// The largest JSON document (`manifest.json`, `index.json`, a config, a manifest) accepted.
pub const MAX_DOC: u64 = 16 << 20;
/// Size of each read handed on while streaming a file.
const CHUNK: usize = 1 << 20;

/// Why a sink could not take a blob.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The bytes do not have the digest the archive names them by.
    #[error("digest mismatch: the archive names {expected}, its bytes are {actual}")]
    Mismatch { expected: Digest, actual: Digest },
    /// The store failed (full disk, I/O); the archive itself may be fine.
    #[error("{0}")]
    Store(String),
}

/// Where the blobs of an archive go while it is read. Called from the reading thread.
pub trait BlobSink {
    /// Whether a blob is already stored; its bytes in the archive are then hashed, not written.
    fn has(&mut self, digest: &Digest) -> Result<bool, SinkError>;

    /// Store a blob from `body` (read it to its end), verifying it against `expected` when the
    /// archive names it, else computing its sha256. Returns the digest and size. A read error
    /// from `body` must make this fail.
    fn put(
        &mut self,
        expected: Option<&Digest>,
        body: &mut dyn Read,
    ) -> Result<(Digest, u64), SinkError>;

    /// The bytes of a small blob stored earlier, at most `max` of them (a manifest that was
    /// stored because it did not fit in memory). `None` if it is not stored.
    fn get(&mut self, digest: &Digest, max: u64) -> Result<Option<Vec<u8>>, SinkError>;
}

/// Why an archive could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The file could not be read (a read error, or it ended early).
    #[error("reading the archive failed: {0}")]
    Io(#[from] io::Error),
    /// The archive is not one pier understands, or is inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// A blob's bytes do not match the digest the archive gives it.
    #[error("{0}")]
    Corrupt(String),
    /// The store failed; the archive may be fine and importing it again may work.
    #[error("storing a blob failed: {0}")]
    Store(String),
}

impl ArchiveError {
    /// Whether trying the same file again may succeed (the fault was the store's).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ArchiveError::Store(_))
    }
}

fn invalid(msg: impl Into<String>) -> ArchiveError {
    ArchiveError::Invalid(msg.into())
}

/// The layout an archive turned out to have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `docker save` before Docker 25, and skopeo's `docker-archive:`: `manifest.json`.
    DockerLegacy,
    /// `docker save` from Docker 25 on: an OCI layout plus `manifest.json`.
    DockerOci,
    /// An OCI image layout (`oci-layout`, `index.json`, `blobs/`).
    OciLayout,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::DockerLegacy => "docker-save",
            Format::DockerOci => "docker-save-oci",
            Format::OciLayout => "oci-layout",
        }
    }
}

/// A manifest to store, with its exact bytes.
#[derive(Debug, Clone)]
pub struct ManifestDoc {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Vec<u8>,
}

/// One image of an archive, ready to be made visible.
#[derive(Debug, Clone)]
pub struct Image {
    /// The names the archive gives it, normalized (`repo:tag`). Never empty.
    pub names: Vec<ImageName>,
    /// The manifest the names point at, and every manifest under it; children come first.
    pub manifests: Vec<ManifestDoc>,
    /// Every blob the manifests reference (configs and layers), all stored by the sink.
    pub blobs: Vec<(Digest, u64)>,
    /// Said about the image on the way (an index whose other platforms are missing, say).
    pub notes: Vec<String>,
}

impl Image {
    /// The digest the names point at.
    pub fn digest(&self) -> Option<&Digest> {
        self.manifests.last().map(|m| &m.digest)
    }
}

/// What an archive holds.
#[derive(Debug, Clone)]
pub struct Contents {
    /// The sha256 of the whole file as read (compressed, if it was).
    pub file_digest: Digest,
    pub file_size: u64,
    pub compression: Compression,
    pub format: Format,
    pub images: Vec<Image>,
    /// Images the archive holds that could not be imported, with the reason (no name, say).
    pub skipped: Vec<String>,
}

/// What became of one regular file of the tar.
enum Seen {
    /// In memory (small documents and blobs, until the layout says what they are).
    Held(Vec<u8>),
    /// Handed to the sink: its digest, size and the compression of its bytes.
    Stored {
        digest: Digest,
        size: u64,
        compression: Compression,
    },
    /// Verified by its name and already in the store.
    Present { digest: Digest, size: u64 },
}

/// A reader that hashes and counts what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: Option<Hasher>,
    read: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = self.hasher.as_mut() {
            h.update(&buf[..n]);
        }
        self.read += n as u64;
        Ok(n)
    }
}

/// An entry's bytes, remembering whether reading them failed or they ended before the size
/// the tar header declared (a truncated file): the sink's error alone cannot tell a broken
/// archive from a broken store.
struct EntryReader<'a, R: Read> {
    inner: &'a mut R,
    want: u64,
    got: u64,
    broke: Option<io::Error>,
}

impl<R: Read> Read for EntryReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(0) if self.got < self.want => {
                let e = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the file ends inside an entry ({} of {} bytes)",
                        self.got, self.want
                    ),
                );
                self.broke = Some(io::Error::new(e.kind(), e.to_string()));
                Err(e)
            }
            Ok(n) => {
                self.got += n as u64;
                Ok(n)
            }
            Err(e) => {
                self.broke = Some(io::Error::new(e.kind(), e.to_string()));
                Err(e)
            }
        }
    }
}

/// A tar path as the layout documents name it: no leading `./`, no `.` components.
fn clean_path(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    parts.join("/")
}

/// Join a symlink's target to the directory holding the link, resolving `..`.
fn join_link(link: &str, target: &str) -> String {
    let mut parts: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        let mut p: Vec<&str> = link.split('/').collect();
        p.pop();
        p
    };
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

/// The digest an OCI layout path names: `blobs/<alg>/<hex>`.
fn blob_path_digest(path: &str) -> Option<Digest> {
    let rest = path.strip_prefix("blobs/")?;
    let (alg, hex) = rest.split_once('/')?;
    format!("{alg}:{hex}").parse().ok()
}

struct Walk<'s> {
    sink: &'s mut dyn BlobSink,
    files: HashMap<String, Seen>,
    /// Link path → the path it points at (archive-relative).
    links: HashMap<String, String>,
    held: u64,
}

impl Walk<'_> {
    fn store_err(e: SinkError, path: &str, broke: Option<io::Error>) -> ArchiveError {
        if let Some(io) = broke {
            return ArchiveError::Io(io::Error::new(io.kind(), format!("{path}: {io}")));
        }
        match e {
            SinkError::Mismatch { .. } => ArchiveError::Corrupt(format!("{path}: {e}")),
            SinkError::Store(s) => ArchiveError::Store(format!("{path}: {s}")),
        }
    }

    fn entry(&mut self, path: String, size: u64, body: &mut impl Read) -> Result<(), ArchiveError> {
        let named = blob_path_digest(&path);
        let doc = path == "manifest.json" || path == "index.json" || path == "oci-layout";
        let top_json = !path.contains('/') && path.ends_with(".json");
        if let Some(expected) = &named {
            if self
                .sink
                .has(expected)
                .map_err(|e| Self::store_err(e, &path, None))?
            {
                let (actual, size) = hash_all(body, expected.algorithm(), size)?;
                if actual != *expected {
                    return Err(ArchiveError::Corrupt(format!(
                        "{path}: the archive names {expected}, its bytes are {actual}"
                    )));
                }
                self.files.insert(
                    path,
                    Seen::Present {
                        digest: actual,
                        size,
                    },
                );
                return Ok(());
            }
        }
        let hold = doc
            || (top_json && size <= MAX_DOC)
            || (size <= SMALL && self.held + size <= HOLD_BUDGET);
        if hold {
            if size > MAX_DOC {
                return Err(invalid(format!("{path} is larger than {MAX_DOC} bytes")));
            }
            let mut bytes = Vec::with_capacity(size as usize);
            let mut r = EntryReader {
                inner: body,
                want: size,
                got: 0,
                broke: None,
            };
            r.read_to_end(&mut bytes)?;
            if let Some(expected) = &named {
                let actual = Digest::compute(expected.algorithm(), &bytes);
                if actual != *expected {
                    return Err(ArchiveError::Corrupt(format!(
                        "{path}: the archive names {expected}, its bytes are {actual}"
                    )));
                }
            }
            self.held += size;
            self.files.insert(path, Seen::Held(bytes));
            return Ok(());
        }
        // The first bytes tell whether a layer file is compressed; they go on to the sink.
        let mut head = [0u8; 4];
        let mut filled = 0;
        let mut r = EntryReader {
            inner: body,
            want: size,
            got: 0,
            broke: None,
        };
        while filled < head.len() && (filled as u64) < size {
            let n = r.read(&mut head[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        let compression = Compression::detect(&head[..filled]);
        let mut chained = (&head[..filled]).chain(&mut r);
        let put = self.sink.put(named.as_ref(), &mut chained);
        let (digest, stored) = match put {
            Ok(v) => v,
            Err(e) => return Err(Self::store_err(e, &path, r.broke.take())),
        };
        if let Some(io) = r.broke.take() {
            return Err(ArchiveError::Io(io));
        }
        if stored != size {
            return Err(invalid(format!(
                "{path}: {stored} bytes stored of the {size} the tar header declares"
            )));
        }
        self.files.insert(
            path,
            Seen::Stored {
                digest,
                size,
                compression,
            },
        );
        Ok(())
    }

    /// The entry a path names, following links.
    fn resolve(&self, path: &str) -> Option<(&str, &Seen)> {
        let mut p = clean_path(path);
        for _ in 0..16 {
            if let Some((k, seen)) = self.files.get_key_value(&p) {
                return Some((k.as_str(), seen));
            }
            p = self.links.get(&p)?.clone();
        }
        None
    }

    /// A JSON document's bytes by path (held, or read back from the sink).
    fn doc(&mut self, path: &str) -> Result<Option<Vec<u8>>, ArchiveError> {
        let digest = match self.resolve(path) {
            None => return Ok(None),
            Some((_, Seen::Held(b))) => return Ok(Some(b.clone())),
            Some((_, Seen::Stored { digest, .. } | Seen::Present { digest, .. })) => digest.clone(),
        };
        self.sink
            .get(&digest, MAX_DOC)
            .map_err(|e| Self::store_err(e, path, None))
    }

    /// The bytes of a blob of the layout by digest (a manifest or an index).
    fn blob_bytes(&mut self, digest: &Digest) -> Result<Option<Vec<u8>>, ArchiveError> {
        let path = format!("blobs/{}/{}", digest.algorithm().as_str(), digest.hex());
        if let Some(b) = self.doc(&path)? {
            return Ok(Some(b));
        }
        // A blob the archive leaves out may be stored from an earlier import.
        self.sink
            .get(digest, MAX_DOC)
            .map_err(|e| Self::store_err(e, &path, None))
    }

    /// Make sure the blob `d` is stored: hand a held one to the sink, or find it stored.
    fn ensure_blob(&mut self, d: &Digest) -> Result<u64, ArchiveError> {
        let path = format!("blobs/{}/{}", d.algorithm().as_str(), d.hex());
        match self.files.get(&path) {
            Some(Seen::Held(bytes)) => {
                let bytes = bytes.clone();
                let (digest, size) = self
                    .sink
                    .put(Some(d), &mut bytes.as_slice())
                    .map_err(|e| Self::store_err(e, &path, None))?;
                self.files.insert(
                    path,
                    Seen::Stored {
                        digest,
                        size,
                        compression: Compression::detect(&bytes),
                    },
                );
                Ok(size)
            }
            Some(Seen::Stored { size, .. } | Seen::Present { size, .. }) => Ok(*size),
            None => {
                if self
                    .sink
                    .has(d)
                    .map_err(|e| Self::store_err(e, &path, None))?
                {
                    // Stored by an earlier import; the size comes from the manifest.
                    Ok(0)
                } else {
                    Err(invalid(format!("blob {d} is not in the archive")))
                }
            }
        }
    }

    /// Hand a held file (a legacy config, a small layer) to the sink; returns its digest and
    /// size and the compression of its bytes.
    fn store_path(&mut self, path: &str) -> Result<(Digest, u64, Compression), ArchiveError> {
        let (key, seen) = self
            .resolve(path)
            .ok_or_else(|| invalid(format!("manifest.json names {path}, which is not there")))?;
        let key = key.to_string();
        match seen {
            Seen::Stored {
                digest,
                size,
                compression,
            } => Ok((digest.clone(), *size, *compression)),
            Seen::Present { digest, size } => Ok((digest.clone(), *size, Compression::None)),
            Seen::Held(bytes) => {
                let bytes = bytes.clone();
                let compression = Compression::detect(&bytes);
                let (digest, size) = self
                    .sink
                    .put(None, &mut bytes.as_slice())
                    .map_err(|e| Self::store_err(e, &key, None))?;
                self.files.insert(
                    key,
                    Seen::Stored {
                        digest: digest.clone(),
                        size,
                        compression,
                    },
                );
                Ok((digest, size, compression))
            }
        }
    }
}

/// Hash a reader to its end (bytes the store already has, verified but not written).
fn hash_all(
    body: &mut impl Read,
    alg: Algorithm,
    size: u64,
) -> Result<(Digest, u64), ArchiveError> {
    let mut h = Hasher::new(alg);
    let mut r = EntryReader {
        inner: body,
        want: size,
        got: 0,
        broke: None,
    };
    let mut buf = vec![0u8; CHUNK];
    let mut n_total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        n_total += n as u64;
    }
    Ok((h.finish(), n_total))
}

/// Read the archive `input` once, storing its blobs through `sink`, and say what images it
/// holds. Manifests are not stored: the caller makes them visible once everything they
/// reference is, children before indexes.
///
/// A compressed archive is inflated on a thread of its own, a few buffers ahead of the tar
/// reader, so decompression and the hashing and writing of layers use two cores rather than
/// taking turns on one (see [`inflate_on_a_thread`]).
pub fn read_archive(
    input: impl Read + Send,
    sink: &mut dyn BlobSink,
) -> Result<Contents, ArchiveError> {
    let mut file = HashingReader {
        inner: input,
        hasher: Some(Hasher::new(Algorithm::Sha256)),
        read: 0,
    };
    let mut head = [0u8; 4];
    let mut filled = 0;
    while filled < head.len() {
        let n = file.read(&mut head[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    let compression = Compression::detect(&head[..filled]);
    let mut walk = Walk {
        sink,
        files: HashMap::new(),
        links: HashMap::new(),
        held: 0,
    };
    let head = &head[..filled];
    match compression {
        Compression::None => walk_tar(head.chain(&mut file), &mut walk)?,
        Compression::Gzip | Compression::Zstd => {
            inflate_on_a_thread(head, &mut file, compression, |inflated| {
                walk_tar(inflated, &mut walk)
            })?
        }
    }
    // Whatever follows the tar's end (padding to a record, say) belongs to the file's digest.
    io::copy(&mut file, &mut io::sink())?;
    let file_size = file.read;
    let file_digest = file
        .hasher
        .take()
        .map(Hasher::finish)
        .ok_or_else(|| invalid("hasher lost"))?;
    let (format, images, skipped) = resolve(&mut walk)?;
    Ok(Contents {
        file_digest,
        file_size,
        compression,
        format,
        images,
        skipped,
    })
}

/// Inflated bytes move from the inflating thread to the tar reader in buffers of this size…
const INFLATED_BUFFER: usize = 256 * 1024;
/// …at most this many of them waiting, so the thread is at most 2 MiB ahead.
const INFLATED_AHEAD: usize = 8;

/// Run `consume` over the inflated bytes of `head` followed by `file`, inflating on a thread of
/// its own. The thread keeps `file` until it is done with it, then returns: when `consume`
/// finished early (a tar ends before the compressed stream does), the receiver is dropped, the
/// thread's next send fails, and it stops inflating, so what follows is left in `file` for the
/// caller to hash, just as when one thread did both. An error of the inflater reaches
/// `consume` as a read error, where the tar reader reports it.
fn inflate_on_a_thread<R: Read + Send>(
    head: &[u8],
    file: &mut R,
    compression: Compression,
    consume: impl FnOnce(ChannelReader) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(INFLATED_AHEAD);
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let rest = head.chain(file);
            let mut inflater: Box<dyn Read + '_> = match compression {
                Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(rest)),
                Compression::Zstd => match zstd::stream::read::Decoder::new(rest) {
                    Ok(d) => Box::new(d),
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                },
                Compression::None => Box::new(rest),
            };
            loop {
                let mut buf = vec![0u8; INFLATED_BUFFER];
                let mut filled = 0;
                // Fill the buffer: inflaters hand out small reads.
                let end = loop {
                    match inflater.read(&mut buf[filled..]) {
                        Ok(0) => break Ok(true),
                        Ok(n) => {
                            filled += n;
                            if filled == buf.len() {
                                break Ok(false);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                buf.truncate(filled);
                let sent = match end {
                    Ok(done) => {
                        let sent = filled == 0 || tx.send(Ok(buf)).is_ok();
                        if done {
                            return;
                        }
                        sent
                    }
                    Err(e) => {
                        if filled > 0 && tx.send(Ok(buf)).is_err() {
                            return;
                        }
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                if !sent {
                    return;
                }
            }
        });
        consume(ChannelReader {
            rx,
            current: Vec::new(),
            at: 0,
        })
    })
}

/// The tar reader's end of [`inflate_on_a_thread`]: the buffers the thread sends, as a `Read`.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    at: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            match self.rx.recv() {
                Ok(Ok(next)) => {
                    self.current = next;
                    self.at = 0;
                }
                Ok(Err(e)) => return Err(e),
                // The thread ended: the inflated stream is over.
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn walk_tar(decoded: impl Read, walk: &mut Walk<'_>) -> Result<(), ArchiveError> {
    let mut tar = tar::Archive::new(decoded);
    let mut entries = 0usize;
    for entry in tar.entries()? {
        let mut entry = entry?;
        entries += 1;
        let path = clean_path(&String::from_utf8_lossy(&entry.path_bytes()));
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            if let Some(target) = entry.link_name_bytes() {
                let target = String::from_utf8_lossy(&target).into_owned();
                let resolved = if kind.is_symlink() {
                    join_link(&path, &target)
                } else {
                    clean_path(&target)
                };
                walk.links.insert(path, resolved);
            }
            continue;
        }
        if !kind.is_file() || path.is_empty() {
            continue;
        }
        // The legacy per-layer metadata of Docker 1.9 is not needed to rebuild the image.
        if path.ends_with("/json") || path.ends_with("/VERSION") {
            continue;
        }
        let size = entry.size();
        walk.entry(path, size, &mut entry)?;
    }
    if entries == 0 {
        return Err(invalid("not a tar archive, or an empty one"));
    }
    Ok(())
}

#[derive(Deserialize)]
struct LegacyEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<Digest>,
}

#[derive(Deserialize)]
struct ImageConfig {
    rootfs: Option<RootFs>,
}

type Resolved = (Format, Vec<Image>, Vec<String>);

fn resolve(walk: &mut Walk<'_>) -> Result<Resolved, ArchiveError> {
    let legacy: Option<Vec<LegacyEntry>> =
        match walk.doc("manifest.json")? {
            Some(b) => Some(serde_json::from_slice(&b).map_err(|e| {
                invalid(format!("manifest.json is not a docker save manifest: {e}"))
            })?),
            None => None,
        };
    if let Some(index) = walk.doc("index.json")? {
        let format = if legacy.is_some() {
            Format::DockerOci
        } else {
            Format::OciLayout
        };
        let (images, skipped) = resolve_layout(walk, &index, legacy.as_deref().unwrap_or(&[]))?;
        return Ok((format, images, skipped));
    }
    match legacy {
        Some(entries) => {
            let (images, skipped) = resolve_legacy(walk, &entries)?;
            Ok((Format::DockerLegacy, images, skipped))
        }
        None => Err(invalid(
            "not an image archive: it has neither index.json nor manifest.json",
        )),
    }
}

/// Add an image, or its names to an image already found with the same manifest.
fn add_image(images: &mut Vec<Image>, image: Image) {
    if let Some(existing) = images.iter_mut().find(|i| i.digest() == image.digest()) {
        for n in image.names {
            if !existing.names.contains(&n) {
                existing.names.push(n);
            }
        }
    } else {
        images.push(image);
    }
}

fn names_of(raw: &[String], skipped: &mut Vec<String>) -> Vec<ImageName> {
    let mut names = Vec::new();
    for r in raw {
        match normalize(r) {
            Ok(n) if !names.contains(&n) => names.push(n),
            Ok(_) => {}
            Err(e) => skipped.push(e.to_string()),
        }
    }
    names
}

fn resolve_legacy(
    walk: &mut Walk<'_>,
    entries: &[LegacyEntry],
) -> Result<(Vec<Image>, Vec<String>), ArchiveError> {
    let mut images = Vec::new();
    let mut skipped = Vec::new();
    for e in entries {
        let raw = e.repo_tags.clone().unwrap_or_default();
        let names = names_of(&raw, &mut skipped);
        if names.is_empty() {
            skipped.push(format!("the image with config {} has no tag", e.config));
            continue;
        }
        let config_bytes = walk.doc(&e.config)?.ok_or_else(|| {
            invalid(format!(
                "manifest.json names {}, which is not there",
                e.config
            ))
        })?;
        let config: ImageConfig = serde_json::from_slice(&config_bytes)
            .map_err(|err| invalid(format!("{} is not an image config: {err}", e.config)))?;
        let diff_ids = config.rootfs.map(|r| r.diff_ids).unwrap_or_default();
        if diff_ids.len() != e.layers.len() {
            return Err(invalid(format!(
                "{} lists {} layers, its config {}",
                e.config,
                e.layers.len(),
                diff_ids.len()
            )));
        }
        let (config_digest, config_size, _) = walk.store_path(&e.config)?;
        let mut layers = Vec::new();
        let mut blobs = vec![(config_digest.clone(), config_size)];
        for (path, diff_id) in e.layers.iter().zip(&diff_ids) {
            let (digest, size, compression) = walk.store_path(path)?;
            // An uncompressed layer is its own diff: anything else is a corrupt archive, and
            // the clients would refuse the image after pulling it.
            if compression == Compression::None && digest != *diff_id {
                return Err(ArchiveError::Corrupt(format!(
                    "{path} has digest {digest}, but the config says its layer is {diff_id}"
                )));
            }
            let media_type = match compression {
                Compression::None => amedia::OCI_LAYER,
                Compression::Gzip => amedia::OCI_LAYER_GZIP,
                Compression::Zstd => amedia::OCI_LAYER_ZSTD,
            };
            layers.push(serde_json::json!({
                "mediaType": media_type, "digest": digest.to_string(), "size": size,
            }));
            blobs.push((digest, size));
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": pier_oci::media::OCI_MANIFEST,
            "config": {
                "mediaType": amedia::OCI_CONFIG,
                "digest": config_digest.to_string(),
                "size": config_size,
            },
            "layers": layers,
        });
        let bytes = serde_json::to_vec(&manifest).map_err(|e| invalid(e.to_string()))?;
        add_image(
            &mut images,
            Image {
                names,
                manifests: vec![ManifestDoc {
                    digest: Digest::sha256(&bytes),
                    media_type: pier_oci::media::OCI_MANIFEST.to_string(),
                    bytes,
                }],
                blobs,
                notes: Vec::new(),
            },
        );
    }
    Ok((images, skipped))
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// A manifest of the layout and everything under it: `out` gets children before parents.
/// Returns false when the manifest itself is not in the archive (nor stored).
fn collect(
    walk: &mut Walk<'_>,
    desc: &Descriptor,
    out: &mut Vec<ManifestDoc>,
    blobs: &mut Vec<(Digest, u64)>,
    notes: &mut Vec<String>,
    depth: usize,
) -> Result<bool, ArchiveError> {
    if depth > 4 {
        return Err(invalid("indexes nest too deep"));
    }
    let Some(bytes) = walk.blob_bytes(&desc.digest)? else {
        return Ok(false);
    };
    if Digest::compute(desc.digest.algorithm(), &bytes) != desc.digest {
        return Err(ArchiveError::Corrupt(format!(
            "manifest {} does not have its digest",
            desc.digest
        )));
    }
    let m = Manifest::parse(&bytes, Some(&desc.media_type))
        .map_err(|e| invalid(format!("manifest {}: {e}", desc.digest)))?;
    let mut children_present = Vec::new();
    for child in &m.manifests {
        if collect(walk, child, out, blobs, notes, depth + 1)? {
            children_present.push(child.digest.clone());
        } else {
            notes.push(format!(
                "{} (of index {}) is not in the archive",
                child.digest, desc.digest
            ));
        }
    }
    if !m.manifests.is_empty() && children_present.len() != m.manifests.len() {
        // An index whose other platforms were left out (Docker 25 saves the local platform's
        // content only) cannot be stored: its names go to the first platform present.
        return match children_present.first() {
            Some(_) => Ok(true),
            None => Err(invalid(format!(
                "index {} has none of its manifests in the archive",
                desc.digest
            ))),
        };
    }
    for b in &m.blobs {
        if b.urls.as_ref().is_some_and(|u| !u.is_empty()) {
            continue;
        }
        let size = walk.ensure_blob(&b.digest)?;
        let size = if size == 0 { b.size } else { size };
        if size != b.size {
            return Err(ArchiveError::Corrupt(format!(
                "blob {} has {size} bytes, the manifest says {}",
                b.digest, b.size
            )));
        }
        if !blobs.iter().any(|(d, _)| *d == b.digest) {
            blobs.push((b.digest.clone(), size));
        }
    }
    if !out.iter().any(|d| d.digest == desc.digest) {
        out.push(ManifestDoc {
            digest: desc.digest.clone(),
            media_type: m.media_type,
            bytes,
        });
    }
    Ok(true)
}

fn resolve_layout(
    walk: &mut Walk<'_>,
    index_bytes: &[u8],
    legacy: &[LegacyEntry],
) -> Result<(Vec<Image>, Vec<String>), ArchiveError> {
    let index: Index = serde_json::from_slice(index_bytes)
        .map_err(|e| invalid(format!("index.json is not an OCI index: {e}")))?;
    let mut images = Vec::new();
    let mut skipped = Vec::new();
    for desc in &index.manifests {
        let mut manifests = Vec::new();
        let mut blobs = Vec::new();
        let mut notes = Vec::new();
        if !collect(walk, desc, &mut manifests, &mut blobs, &mut notes, 0)? {
            return Err(invalid(format!(
                "index.json names {}, which is not in the archive",
                desc.digest
            )));
        }
        // An index missing children was not stored: the names go to its first present child.
        let top_present = manifests.iter().any(|m| m.digest == desc.digest);
        let mut raw = image_names(desc, &manifests, legacy);
        raw.dedup();
        let names = names_of(&raw, &mut skipped);
        if names.is_empty() {
            skipped.push(format!(
                "{} has no name (no {REF_NAME} or {CONTAINERD_IMAGE_NAME} annotation naming a \
                 repository)",
                desc.digest
            ));
            continue;
        }
        if !top_present {
            if let Some(first) = manifests.first() {
                notes.push(format!(
                    "only {} of index {} was imported",
                    first.digest, desc.digest
                ));
            }
            // The children that are present were stored before the index in `manifests`;
            // the names point at the first, so it must come last.
            if let Some(first) = manifests.first().cloned() {
                manifests.retain(|m| m.digest != first.digest);
                manifests.push(first);
            }
        }
        add_image(
            &mut images,
            Image {
                names,
                manifests,
                blobs,
                notes,
            },
        );
    }
    Ok((images, skipped))
}

/// The names an `index.json` entry gives its image: Docker's and containerd's full name, or a
/// ref name that is a whole reference (skopeo and podman write those); a ref name that is only
/// a tag takes its repository from Docker's `manifest.json` entry for the same config.
fn image_names(
    desc: &Descriptor,
    manifests: &[ManifestDoc],
    legacy: &[LegacyEntry],
) -> Vec<String> {
    let ann: BTreeMap<String, String> = desc.annotations.clone().unwrap_or_default();
    let mut out = Vec::new();
    if let Some(full) = ann.get(CONTAINERD_IMAGE_NAME) {
        out.push(full.clone());
    }
    if let Some(r) = ann.get(REF_NAME) {
        if r.contains('/') || r.contains(':') {
            out.push(r.clone());
        }
    }
    if out.is_empty() {
        // Docker 25's manifest.json names layers and configs by blob path.
        let config = manifests.last().and_then(|m| {
            Manifest::parse(&m.bytes, Some(&m.media_type))
                .ok()
                .and_then(|p| p.blobs.first().map(|c| c.digest.clone()))
        });
        for e in legacy {
            let d = blob_path_digest(&clean_path(&e.config));
            if d.is_some() && d == config {
                out.extend(e.repo_tags.clone().unwrap_or_default());
            }
        }
    }
    out
}
