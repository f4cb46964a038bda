//! Free space on the data directory's filesystem, and whether pier may write there now.
//!
//! Writes are refused up front (with [`StoreError::NoSpace`]) while free space is below the
//! configured floor, or after a write failed for lack of space until free space is a margin
//! above the floor again: filling the disk to the last byte would also starve the metadata
//! database. Recovery is judged once the failed write's partial bytes are given back, so one
//! request that needed more than was free fails alone and writes that fit keep going. A
//! background task calls [`Space::refresh`] every few seconds; nothing needs a restart.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::{Result, StoreError};

/// After a write failed for lack of space, how far above the floor free space must be (with
/// the failed write's partial bytes given back) before writes are tried again: a disk that
/// something else keeps filling is not hammered with writes that fail one after the other.
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
    /// A write failed for lack of space and free space has not come back above
    /// `min_free + RECOVER_MARGIN` since.
    full: Mutex<bool>,
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
            full: Mutex::new(false),
            errors: AtomicU64::new(0),
        };
        let _ = space.refresh();
        space
    }

    /// Measure free space again; clears a past "disk full" once enough space is back.
    pub fn refresh(&self) -> std::io::Result<u64> {
        let free = free_bytes(&self.root)?;
        self.settle(free);
        Ok(free)
    }

    /// Free space a standing "disk full" must reach again before writes resume.
    fn recover_at(&self) -> u64 {
        self.min_free.saturating_add(RECOVER_MARGIN)
    }

    /// Take `free` as the free space now, and clear a standing "disk full" if it is enough.
    fn settle(&self, free: u64) {
        self.free.store(free, Ordering::Relaxed);
        let mut full = self.full.lock().unwrap_or_else(|e| e.into_inner());
        if *full && free >= self.recover_at() {
            tracing::info!(free_bytes = free, "free space is back; writes resume");
            *full = false;
        }
    }

    /// Note that a write failed for lack of space. Called once its partial bytes are gone
    /// (a spool's are gone when its last handle closes, see [`Space::rebase`]): if enough is
    /// free then, the failure was that one request's, which needed more than there was, and
    /// writes that fit go on.
    pub fn record_no_space(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let free = free_bytes(&self.root).unwrap_or(0);
        *self.full.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.settle(free);
    }

    /// Measure again once a failed write's partial bytes are gone (a spool's when its last
    /// handle closes), so a "disk full" that only that write caused clears at once.
    pub fn rebase(&self) {
        if let Ok(free) = free_bytes(&self.root) {
            self.settle(free);
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
        let full = *self.full.lock().unwrap_or_else(|e| e.into_inner());
        let reason = if free < self.min_free {
            Some(format!(
                "disk: {} free, below min_free_space {}",
                mib(free),
                mib(self.min_free)
            ))
        } else if full {
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

    /// A space whose floor sits `above` bytes below what is free now (so the test does not
    /// depend on how full the disk running it is).
    fn space_with_headroom(dir: &std::path::Path, above: u64) -> Space {
        let free = free_bytes(dir).unwrap();
        assert!(free > above, "the test needs {above} bytes free");
        Space::new(dir, free - above)
    }

    #[test]
    fn a_failed_write_refuses_until_space_is_a_margin_above_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let space = space_with_headroom(dir.path(), RECOVER_MARGIN / 2);
        space.check().unwrap();
        space.record_no_space();
        let e = space.check().unwrap_err();
        assert!(e.to_string().contains("no space left on device"), "{e}");
        // Nothing was freed: a refresh does not clear it.
        space.refresh().unwrap();
        assert!(space.check().is_err());
        // Space back above the floor plus the margin clears it.
        space.settle(space.recover_at());
        space.check().unwrap();
    }

    #[test]
    fn a_failed_write_that_needed_more_than_was_free_does_not_refuse_writes_that_fit() {
        let dir = tempfile::tempdir().unwrap();
        // Far more than the floor plus the margin is free once the write's bytes are gone.
        let space = space_with_headroom(dir.path(), 4 * RECOVER_MARGIN);
        space.record_no_space();
        space.check().unwrap();
        assert_eq!(space.state().no_space_errors, 1);
    }
}
