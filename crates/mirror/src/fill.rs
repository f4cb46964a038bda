//! Fills: one upstream fetch per missing blob, however many clients ask.
//!
//! A fill streams the blob from the upstream into a spool, hashing as it goes; every client
//! that wants the blob meanwhile reads the spool as it grows. The fill runs in its own task, so
//! a client that disconnects does not stop it. When the last byte is in, the digest is checked:
//! a match commits the spool into the blob store, a mismatch discards it and every reader's
//! response is aborted. Readers never receive the final byte of a blob before it is verified
//! (they get it as soon as the hash matches, without waiting for the fsync that makes the cache
//! durable), and a `Range` that ends before the blob does is answered only from verified bytes.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use pier_store::{ByteStream, Spool};
use tokio::sync::watch;

/// Bytes per read from a spool.
const CHUNK: u64 = 256 * 1024;
/// Bytes of recent batches kept in memory for readers. Must exceed what the writer may lag
/// (the fill's write backlog), so a byte is always in memory or on disk.
const RECENT_BYTES: u64 = 48 * 1024 * 1024;

/// How far a fill has got.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// The upstream answered: the size it gave (if any) is in `size`.
    pub started: bool,
    pub size: Option<u64>,
    /// Bytes received from the upstream (in the recent window or on disk).
    pub received: u64,
    /// Bytes written to the spool.
    pub written: u64,
    /// Every byte is in the spool and matches the digest (durability may still be pending).
    pub verified: bool,
    /// `Some(Ok)` once verified and committed, `Some(Err)` if the fill failed.
    pub outcome: Option<Result<(), FillError>>,
}

/// Why a fill failed, as readers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FillError {
    NotFound,
    /// The upstream refused pier's credentials (or lack of them).
    Denied(String),
    /// The upstream kept answering 429.
    TooManyRequests,
    Upstream(String),
    Corrupt(String),
    Store(String),
    /// The cache's disk is full: the fill could not be stored (and nothing of it is visible).
    NoSpace(String),
}

impl FillError {
    /// A store failure, keeping a full disk apart so the client is told that.
    pub fn store(e: pier_store::StoreError) -> FillError {
        if e.is_no_space() {
            FillError::NoSpace(e.to_string())
        } else {
            FillError::Store(e.to_string())
        }
    }
}

impl std::fmt::Display for FillError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FillError::NotFound => write!(f, "not found upstream"),
            FillError::Denied(e) => write!(f, "upstream refused access: {e}"),
            FillError::TooManyRequests => write!(f, "upstream is rate limiting (429)"),
            FillError::Upstream(e) => write!(f, "upstream failed: {e}"),
            FillError::Corrupt(e) => write!(f, "upstream sent corrupt content: {e}"),
            FillError::Store(e) => write!(f, "storing failed: {e}"),
            FillError::NoSpace(e) => write!(f, "storing failed: {e}"),
        }
    }
}

/// One blob being fetched.
pub struct Fill {
    pub(crate) progress: watch::Sender<Progress>,
    pub(crate) spool: OnceLock<Spool>,
    /// The latest batches, by offset, so readers keeping up never wait for the disk.
    recent: Mutex<VecDeque<(u64, Bytes)>>,
}

impl Fill {
    pub(crate) fn new() -> Arc<Fill> {
        Arc::new(Fill {
            progress: watch::Sender::new(Progress::default()),
            spool: OnceLock::new(),
            recent: Mutex::new(VecDeque::new()),
        })
    }

    /// Keep a batch starting at `offset` in the recent window, dropping the oldest beyond it.
    pub(crate) fn remember(&self, offset: u64, batch: Bytes) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.push_back((offset, batch));
        let mut total: u64 = recent.iter().map(|(_, b)| b.len() as u64).sum();
        while total > RECENT_BYTES && recent.len() > 1 {
            if let Some((_, b)) = recent.pop_front() {
                total -= b.len() as u64;
            }
        }
    }

    /// Up to `len` bytes at `offset` from the recent window.
    fn recent_at(&self, offset: u64, len: u64) -> Option<Bytes> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let (start, batch) = recent
            .iter()
            .find(|(o, b)| *o <= offset && offset < *o + b.len() as u64)?;
        let from = (offset - start) as usize;
        let to = (from + len as usize).min(batch.len());
        Some(batch.slice(from..to))
    }

    /// Wait until the upstream has answered (or the fill failed). Returns the size if known.
    pub async fn started(&self) -> Result<Option<u64>, FillError> {
        let mut rx = self.progress.subscribe();
        let p = rx
            .wait_for(|p| p.started || p.outcome.is_some())
            .await
            .map_err(|_| FillError::Store("fill vanished".into()))?
            .clone();
        match p.outcome {
            Some(Err(e)) if !p.started => Err(e),
            _ => Ok(p.size),
        }
    }

    /// Wait for the end of the fill.
    pub async fn finished(&self) -> Result<(), FillError> {
        let mut rx = self.progress.subscribe();
        let p = rx
            .wait_for(|p| p.outcome.is_some())
            .await
            .map_err(|_| FillError::Store("fill vanished".into()))?
            .clone();
        p.outcome.unwrap_or(Ok(()))
    }

    /// Stream bytes `start..end` (`end` = the blob's end when `None`) as they arrive.
    pub fn read(self: &Arc<Fill>, start: u64, end: Option<u64>) -> ByteStream {
        struct State {
            fill: Arc<Fill>,
            rx: watch::Receiver<Progress>,
            pos: u64,
            end: Option<u64>,
            done: bool,
        }
        let state = State {
            fill: self.clone(),
            rx: self.progress.subscribe(),
            pos: start,
            end,
            done: false,
        };
        Box::pin(futures::stream::unfold(state, |mut s| async move {
            if s.done {
                return None;
            }
            loop {
                let p = s.rx.borrow_and_update().clone();
                if let Some(Err(e)) = &p.outcome {
                    s.done = true;
                    return Some((Err(std::io::Error::other(e.to_string())), s));
                }
                let verified = p.verified || matches!(p.outcome, Some(Ok(())));
                let end = s.end.or(p.size).map(|e| e.min(p.size.unwrap_or(u64::MAX)));
                if let Some(end) = end {
                    if s.pos >= end && (verified || end == 0) {
                        return None;
                    }
                }
                if verified && end.is_none() && s.pos >= p.received {
                    return None;
                }
                // What may be handed out now: everything once verified; before that, all but
                // the last byte when reading to the blob's end, nothing for an inner range.
                let to_blob_end = s.end.is_none() || s.end == p.size;
                let available = if verified {
                    p.received
                } else if to_blob_end {
                    p.received.saturating_sub(1)
                } else {
                    0
                };
                let limit = end.map_or(available, |e| available.min(e));
                if limit > s.pos {
                    if let Some(b) = s.fill.recent_at(s.pos, limit - s.pos) {
                        s.pos += b.len() as u64;
                        return Some((Ok(b), s));
                    }
                    // Not in memory any more, so on disk: read only what the writer wrote.
                    let on_disk = limit.min(p.written);
                    if on_disk <= s.pos {
                        s.done = true;
                        return Some((Err(std::io::Error::other("fill bytes lost")), s));
                    }
                    let len = (on_disk - s.pos).min(CHUNK) as usize;
                    let Some(spool) = s.fill.spool.get() else {
                        s.done = true;
                        return Some((Err(std::io::Error::other("spool missing")), s));
                    };
                    match spool.read_at(s.pos, len).await {
                        Ok(b) => {
                            s.pos += b.len() as u64;
                            return Some((Ok::<Bytes, _>(b), s));
                        }
                        Err(e) => {
                            s.done = true;
                            return Some((Err(std::io::Error::other(e.to_string())), s));
                        }
                    }
                }
                if s.rx.changed().await.is_err() {
                    // The fill is gone; whatever it reached is final.
                    if s.rx.borrow().outcome.is_none() {
                        s.done = true;
                        return Some((Err(std::io::Error::other("fill ended without outcome")), s));
                    }
                }
            }
        }))
    }
}
