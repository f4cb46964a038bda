//! Free space on the data directory's filesystem, and whether pier may write there now.
//!
//! Writes are refused up front (with [`StoreError::NoSpace`]) while free space is below the
//! configured floor, or after a write failed for lack of space until enough space has come
//! back: filling the disk to the last byte would also starve the metadata database. A
//! background task calls [`Space::refresh`] every few seconds; nothing needs a restart.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::{Result, StoreError};

/// After a write failed for lack of space, how much more than was free right after it must
/// come back before writes are tried again (at least; the floor counts if it is larger).
const RECOVER_MARGIN: u64 = 16 * 1024 * 1024;

/// What [`Space`] knows right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceState {
    pub free_bytes: u64,
    pub min_free_bytes: u64,
    pub writable: bool,
    /// Why writes are refused, for `/readyz` and the status endpoint.
    pub reason: Option<String>,
    /// Writes that failed because the disk was full, or were refused for that, since start.
    pub no_space_errors: u64,
}

/// Free-space tracking for one data directory. Share it behind an `Arc`.
#[derive(Debug)]
pub struct Space {
    root: PathBuf,
    min_free: u64,
    free: AtomicU64,
    /// Free bytes measured right after the last write that failed for lack of space, while
    /// that failure still stands.
    full_at: Mutex<Option<u64>>,
    errors: AtomicU64,
}

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

fn mib(n: u64) -> String {
    format!("{} MiB", n / (1024 * 1024))
}

impl Space {
    /// Track `root`, refusing writes below `min_free` bytes. Measures once now.
    pub fn new(root: impl Into<PathBuf>, min_free: u64) -> Space {
        let space = Space {
            root: root.into(),
            min_free,
            free: AtomicU64::new(u64::MAX),
            full_at: Mutex::new(None),
            errors: AtomicU64::new(0),
        };
        let _ = space.refresh();
        space
    }

    /// Measure free space again; clears a past "disk full" once enough space is back.
    pub fn refresh(&self) -> std::io::Result<u64> {
        let free = free_bytes(&self.root)?;
        self.free.store(free, Ordering::Relaxed);
        let mut full_at = self.full_at.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(base) = *full_at {
            if free >= base.saturating_add(RECOVER_MARGIN.max(self.min_free)) {
                tracing::info!(free_bytes = free, "free space is back; writes resume");
                *full_at = None;
            }
        }
        Ok(free)
    }

    /// Note that a write failed for lack of space (call after its partial bytes are gone).
    pub fn record_no_space(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let free = free_bytes(&self.root).unwrap_or(0);
        self.free.store(free, Ordering::Relaxed);
        *self.full_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(free);
    }

    /// Measure again the free space a standing "disk full" is judged against, once the failed
    /// write's partial bytes are gone (a spool's when its last handle closes): getting those
    /// back is not space freed.
    pub fn rebase(&self) {
        let mut full_at = self.full_at.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(base) = full_at.as_mut() {
            let free = free_bytes(&self.root).unwrap_or(0);
            self.free.store(free, Ordering::Relaxed);
            *base = (*base).max(free);
        }
    }

    /// Pass `e` through, noting it first if it is a full disk.
    pub fn note<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if e.is_no_space() {
                self.record_no_space();
            }
        }
        r
    }

    /// `Ok` if a write may start now; otherwise the reason, as [`StoreError::NoSpace`].
    pub fn check(&self) -> Result<()> {
        match self.state().reason {
            None => Ok(()),
            Some(reason) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                Err(StoreError::NoSpace(reason))
            }
        }
    }

    pub fn state(&self) -> SpaceState {
        let free = self.free.load(Ordering::Relaxed);
        let full_at = *self.full_at.lock().unwrap_or_else(|e| e.into_inner());
        let reason = if free < self.min_free {
            Some(format!(
                "disk: {} free, below min_free_space {}",
                mib(free),
                mib(self.min_free)
            ))
        } else if full_at.is_some() {
            Some(format!(
                "disk: a write failed with no space left on device ({} free now); waiting for \
                 space to be freed",
                mib(free)
            ))
        } else {
            None
        };
        SpaceState {
            free_bytes: free,
            min_free_bytes: self.min_free,
            writable: reason.is_none(),
            reason,
            no_space_errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_floor_above_free_space_refuses_writes_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let space = Space::new(dir.path(), u64::MAX);
        let e = space.check().unwrap_err();
        assert!(e.is_no_space());
        assert!(e.to_string().contains("below min_free_space"), "{e}");
        assert!(!space.state().writable);
    }

    #[test]
    fn a_failed_write_refuses_until_space_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let space = Space::new(dir.path(), 0);
        space.check().unwrap();
        space.record_no_space();
        let e = space.check().unwrap_err();
        assert!(e.to_string().contains("no space left on device"), "{e}");
        // Nothing was freed: a refresh does not clear it.
        space.refresh().unwrap();
        assert!(space.check().is_err());
        // Pretend the failure happened with the disk far fuller than it is now.
        *space.full_at.lock().unwrap() = Some(0);
        space.refresh().unwrap();
        if space.state().free_bytes >= RECOVER_MARGIN {
            space.check().unwrap();
        }
    }
}
