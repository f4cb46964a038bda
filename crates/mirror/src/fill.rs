//! Fills: one fetch per missing blob per node, however many clients ask, from the upstream or
//! from a peer.
//!
//! A fill streams the blob from its source into a spool, hashing as it goes; every client
//! that wants the blob meanwhile reads the spool as it grows. The fill runs in its own task, so
//! a client that disconnects does not stop it. When the last byte is in, the digest is checked:
//! a match commits the spool into the blob store, a mismatch discards it and every reader's
//! response is aborted. Readers never receive the final byte of a blob before it is verified
//! (they get it as soon as the hash matches, without waiting for the fsync that makes the cache
//! durable), and a `Range` that ends before the blob does is answered only from verified bytes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use pier_store::{ByteStream, Spool};

use crate::pieces::Pieces;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{watch, Notify};

/// Bytes per read from a spool.
const CHUNK: u64 = 256 * 1024;
/// Bytes a fill gathers from its source before handing them to its window and writer thread.
pub(crate) const FILL_BATCH: usize = 512 * 1024;
/// Batch buffers kept for reuse once a batch's last copy is dropped (8 MiB for all fills).
const POOLED_BATCHES: usize = 16;
/// Most bytes of recent batches one fill keeps in memory for readers, budget permitting.
const RECENT_BYTES: u64 = 48 * 1024 * 1024;

/// The memory all fills together may hold: the batches being gathered, recent windows, write
/// backlogs, the spool reads on their way to clients and each source connection's buffers.
/// A batch is charged from the moment its buffer is allocated until its last copy is dropped
/// (by the window, the writer and any reader holding a slice), so what is charged is what is
/// held.
pub struct MemoryBudget {
    limit: u64,
    used: AtomicU64,
    gauge: Gauge,
    /// Woken whenever a charge is given back, for those waiting for room.
    freed: Notify,
    /// Buffers of batches no one holds any more, for the next batches. A buffer this big is
    /// its own mapping (main.rs sets glibc's threshold), so a fresh one costs a page fault and
    /// a zeroed page for every 4 KiB the fill writes into it, and an unmapping when dropped:
    /// reused, it costs neither. They are not charged (at most [`POOLED_BATCHES`] of them).
    pool: Mutex<Vec<Vec<u8>>>,
}

impl MemoryBudget {
    pub fn new(limit: u64, gauge: Gauge) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit,
            used: AtomicU64::new(0),
            gauge,
            freed: Notify::new(),
            pool: Mutex::new(Vec::new()),
        })
    }

    /// An empty buffer for a batch, reused when one was given back.
    pub(crate) fn batch_buffer(&self) -> Vec<u8> {
        let reused = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        reused.unwrap_or_else(|| Vec::with_capacity(FILL_BATCH))
    }

    /// Keep `buf`, a batch's buffer no one reads any more, for a later batch.
    fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() != FILL_BATCH {
            return;
        }
        buf.clear();
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOLED_BATCHES {
            pool.push(buf);
        }
    }

    /// Take `len` bytes of the budget if they fit now.
    pub(crate) fn try_reserve(self: &Arc<Self>, len: u64) -> Option<Reservation> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + len <= self.limit).then_some(u + len)
            })
            .ok()?;
        self.gauge.inc_by(len as i64);
        Some(Reservation {
            len,
            budget: self.clone(),
        })
    }

    /// Take `len` bytes of the budget (at most all of it), waiting until others give back
    /// enough. Everything charged is given back without anyone waiting for the budget (a
    /// writer drains its queue, a client reads what it was sent), so the wait ends.
    pub(crate) async fn reserve(self: &Arc<Self>, len: u64) -> Reservation {
        let len = len.min(self.limit);
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(r) = self.try_reserve(len) {
                return r;
            }
            freed.await;
        }
    }

    /// Whether less than `len` bytes of the budget are left: fills then keep in memory only
    /// what is not on disk yet.
    pub(crate) fn short_of(&self, len: u64) -> bool {
        self.used() + len > self.limit
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// Bytes of the budget taken for memory that is (or is about to be) held.
pub(crate) struct Reservation {
    len: u64,
    budget: Arc<MemoryBudget>,
}

impl Reservation {
    /// A gathered batch as bytes that hold this reservation until their last copy is
    /// dropped, and then give the buffer back to the budget's pool.
    pub(crate) fn hold_batch(self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Batch { buf, charge: self })
    }

    /// `bytes`, holding this reservation until their last copy is dropped.
    pub(crate) fn hold(self, bytes: Bytes) -> Bytes {
        Bytes::from_owner(Charged {
            bytes,
            _charge: self,
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.len, Ordering::AcqRel);
        self.budget.gauge.dec_by(self.len as i64);
        self.budget.freed.notify_waiters();
    }
}

/// A batch's buffer and its charge; dropped, the buffer goes back to the pool (before the
/// charge is given back, so that a fill woken by the charge finds it there).
struct Batch {
    buf: Vec<u8>,
    charge: Reservation,
}

impl AsRef<[u8]> for Batch {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.charge.budget.give_back(buf);
    }
}

/// Bytes and the charge they hold.
struct Charged {
    bytes: Bytes,
    _charge: Reservation,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

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
    /// Where the bytes come from now: `upstream` or `peer` (a resumed fill may change).
    pub origin: Option<&'static str>,
    /// The peer the bytes come from now, when `origin` is `peer`.
    pub from_node: Option<String>,
    /// Pieces on the spool, for a fill that tracks pieces (bumped as each lands).
    pub pieces: u32,
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
    /// No peer that held the blob could deliver it (and no upstream could be asked).
    Peer(String),
    /// The upstream stayed silent past a timeout.
    Timeout(String),
    /// The upstream's blob is larger than pier accepts, or its body ran past its size.
    TooLarge(String),
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
            FillError::Peer(e) => write!(f, "fetching from peers failed: {e}"),
            FillError::Timeout(e) => write!(f, "upstream timed out: {e}"),
            FillError::TooLarge(e) => write!(f, "upstream blob too large: {e}"),
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
    /// The blob's pieces, for a blob large enough to be swarmed (set once its size is known).
    pub(crate) pieces: OnceLock<Arc<Pieces>>,
    /// What readers' spool reads are charged to, like the fill's batches.
    budget: Arc<MemoryBudget>,
    /// The repository a hosted fill is for (set when it starts; unset for mirrored content):
    /// a swarm coordinator shares a hosted fill's pieces only with members fetching the blob
    /// for the same repository.
    pub(crate) hosted: OnceLock<String>,
    /// Set for a swarm this node coordinates from the piece digests its members sent it (a
    /// takeover): those digests are unverified, so its answers pass on only the digests of
    /// pieces it holds (checked against them), never the members' word alone.
    pub(crate) seeded: OnceLock<()>,
}

impl Fill {
    pub(crate) fn new(budget: Arc<MemoryBudget>) -> Arc<Fill> {
        Arc::new(Fill {
            progress: watch::Sender::new(Progress::default()),
            spool: OnceLock::new(),
            recent: Mutex::new(VecDeque::new()),
            pieces: OnceLock::new(),
            budget,
            hosted: OnceLock::new(),
            seeded: OnceLock::new(),
        })
    }

    /// The blob's pieces, when this fill tracks them (a swarmable blob).
    pub fn pieces(&self) -> Option<&Arc<Pieces>> {
        self.pieces.get()
    }

    /// Tell readers waiting for pieces that more are on the spool.
    pub(crate) fn pieces_changed(&self) {
        let n = self.pieces.get().map_or(0, |p| p.have().count());
        self.progress.send_modify(|p| p.pieces = n);
    }

    /// Stream bytes `start..end` once every piece they lie in is on the spool with its digest
    /// known; for peers of a swarm, which check each piece against its digest themselves.
    /// Fails at once when this fill tracks no pieces.
    pub fn read_pieces(self: &Arc<Fill>, start: u64, end: u64) -> ByteStream {
        let fill = self.clone();
        let stream = async_stream_pieces(fill, start, end);
        Box::pin(stream)
    }

    /// The spool's file, when every piece `start..end` lies in is on it: a peer of a swarm can
    /// then be sent those bytes from the file by the kernel. `None` otherwise (the caller
    /// falls back to [`Fill::read_pieces`]).
    pub fn piece_file(&self, start: u64, end: u64) -> Option<std::fs::File> {
        let covered = self.pieces.get()?.covers(start, end);
        covered.then(|| self.spool.get()?.reader().ok()).flatten()
    }

    /// Keep a (charged) batch starting at `offset` in the recent window, dropping the oldest
    /// beyond the per-fill window. A dropped batch the writer has not written yet stays in
    /// memory, charged, until it has.
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

    /// Drop the window's batches that are on disk (all of them when `all`), giving their
    /// memory back to the budget once no reader holds them; readers then read the spool.
    pub(crate) fn forget_written(&self, all: bool) {
        let written = self.progress.borrow().written;
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((o, b)) = recent.front() {
            if !all && o + b.len() as u64 > written {
                break;
            }
            recent.pop_front();
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

    /// Where the fill's bytes come from now (`upstream` or `peer`), once it has started.
    pub fn origin(&self) -> &'static str {
        self.progress.borrow().origin.unwrap_or("upstream")
    }

    /// Whether the fill reads its bytes from `node` now: such a fill must never be offered to
    /// that node, or each would wait for the other.
    pub fn reads_from(&self, node: &str) -> bool {
        self.progress.borrow().from_node.as_deref() == Some(node)
    }

    /// Whether the fill reads from an upstream: only such fills are offered to peers, so two
    /// nodes can never read a blob from each other.
    pub fn from_upstream(&self) -> bool {
        let p = self.progress.borrow();
        p.started && p.origin == Some("upstream") && p.outcome.is_none()
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
                    // Not in memory (evicted, or never kept when the budget was spent), so on
                    // disk or on its way there: read only what the writer wrote, and wait for
                    // the writer when this reader is ahead of it.
                    let on_disk = limit.min(p.written);
                    if on_disk > s.pos {
                        let len = (on_disk - s.pos).min(CHUNK) as usize;
                        let Some(spool) = s.fill.spool.get() else {
                            s.done = true;
                            return Some((Err(std::io::Error::other("spool missing")), s));
                        };
                        // The chunk is charged until the client has taken it: a reader
                        // that finds the budget spent waits for room (the fill itself
                        // does not wait for readers, so the room comes).
                        let charge = s.fill.budget.reserve(len as u64).await;
                        match spool.read_at(s.pos, len).await {
                            Ok(b) => {
                                s.pos += b.len() as u64;
                                return Some((Ok::<Bytes, _>(charge.hold(b)), s));
                            }
                            Err(e) => {
                                s.done = true;
                                return Some((Err(std::io::Error::other(e.to_string())), s));
                            }
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

/// The body of [`Fill::read_pieces`]: wait for the pieces, then read the spool.
fn async_stream_pieces(
    fill: Arc<Fill>,
    start: u64,
    end: u64,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send {
    struct State {
        fill: Arc<Fill>,
        rx: watch::Receiver<Progress>,
        pos: u64,
        end: u64,
        ready: bool,
    }
    let rx = fill.progress.subscribe();
    let state = State {
        fill,
        rx,
        pos: start,
        end,
        ready: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        if s.pos >= s.end {
            return None;
        }
        while !s.ready {
            let Some(pieces) = s.fill.pieces.get() else {
                s.pos = s.end;
                return Some((Err(std::io::Error::other("this fill has no pieces")), s));
            };
            if pieces.covers(s.pos, s.end) {
                s.ready = true;
                break;
            }
            let failed = match &s.rx.borrow_and_update().outcome {
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            if let Some(e) = failed {
                s.pos = s.end;
                return Some((Err(std::io::Error::other(e)), s));
            }
            if s.rx.changed().await.is_err() && !pieces.covers(s.pos, s.end) {
                s.pos = s.end;
                return Some((Err(std::io::Error::other("fill ended")), s));
            }
        }
        let Some(spool) = s.fill.spool.get() else {
            s.pos = s.end;
            return Some((Err(std::io::Error::other("spool missing")), s));
        };
        let len = (s.end - s.pos).min(CHUNK) as usize;
        match spool.read_at(s.pos, len).await {
            Ok(b) => {
                s.pos += b.len() as u64;
                Some((Ok(b), s))
            }
            Err(e) => {
                s.pos = s.end;
                Some((Err(std::io::Error::other(e.to_string())), s))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(budget: &Arc<MemoryBudget>, bytes: Vec<u8>) -> Option<Bytes> {
        let r = budget.try_reserve(bytes.len() as u64)?;
        Some(r.hold(Bytes::from(bytes)))
    }

    #[test]
    fn the_budget_refuses_past_its_limit_and_frees_when_the_last_copy_drops() {
        let gauge = Gauge::default();
        let budget = MemoryBudget::new(10, gauge.clone());
        let a = charge(&budget, vec![1u8; 6]).expect("6 of 10 fit");
        let copy = a.slice(2..4);
        assert!(charge(&budget, vec![2u8; 5]).is_none(), "11 of 10");
        let b = charge(&budget, vec![3u8; 4]).expect("10 of 10 fit");
        assert_eq!((budget.used(), gauge.get()), (10, 10));
        assert!(budget.short_of(1));
        drop(a);
        // A reader's slice still holds the batch's memory.
        assert_eq!(budget.used(), 10);
        assert_eq!(&copy[..], &[1, 1]);
        drop(copy);
        assert_eq!((budget.used(), gauge.get()), (4, 4));
        drop(b);
        assert_eq!((budget.used(), gauge.get()), (0, 0));
    }

    #[tokio::test]
    async fn a_reservation_waits_for_room_and_never_asks_more_than_the_budget() {
        let budget = MemoryBudget::new(10, Gauge::default());
        let held = budget.try_reserve(8).expect("8 of 10");
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve(5).await.len })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "5 more than fit was granted");
        drop(held);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter got its room once it was given back")
            .expect("waiter");
        assert_eq!(got, 5);
        // More than the whole budget is clamped to it, so it cannot wait forever.
        let all = tokio::time::timeout(std::time::Duration::from_secs(5), budget.reserve(100))
            .await
            .expect("a reservation larger than the budget");
        assert_eq!((all.len, budget.used()), (10, 10));
    }
}
