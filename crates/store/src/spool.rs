//! A spool: a local file a blob is written into while others read it as it grows. Fills from
//! upstreams and peers write a spool; when the bytes are verified, the blob store takes it over
//! ([`crate::BlobStore::commit_spool`]). Readers that opened it keep reading after the commit.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::space::Space;
use crate::{Result, StoreError};

/// A growing local file. Cheap to clone; clones share the file.
#[derive(Clone, Debug)]
pub struct Spool {
    path: PathBuf,
    // Declared before `_closed`: fields drop in order, so the file is closed (and a discarded
    // spool's space freed) before the space tracker is told.
    file: Arc<File>,
    // Held only for its `Drop`.
    _closed: Arc<Closed>,
    /// Told when a write fails for lack of space.
    space: Option<Arc<Space>>,
}

/// Tells the space tracker, when the last handle of a spool is gone, to measure again.
#[derive(Debug)]
struct Closed(Option<Arc<Space>>);

impl Drop for Closed {
    fn drop(&mut self) {
        if let Some(space) = &self.0 {
            space.rebase();
        }
    }
}

impl Spool {
    /// Create a new empty spool file at `path`.
    pub fn create(path: PathBuf, space: Option<Arc<Space>>) -> Result<Spool> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(Spool {
            path,
            file: Arc::new(file),
            _closed: Arc::new(Closed(space.clone())),
            space,
        })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// A handle of its own on the spool's file, for a server that sends written ranges
    /// from the file (zero-copy) while the spool is still being written.
    pub fn reader(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// Write `data` at `offset` (blocking; call from a blocking thread).
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.note(
            self.file
                .write_all_at(data, offset)
                .map_err(StoreError::from),
        )
    }

    fn note(&self, r: Result<()>) -> Result<()> {
        match &self.space {
            Some(space) => space.note(r),
            None => r,
        }
    }

    /// Flush the bytes to disk (blocking).
    pub fn sync(&self) -> Result<()> {
        self.note(self.file.sync_all().map_err(StoreError::from))
    }

    /// Read `len` bytes at `offset`; the caller knows they are written.
    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = BytesMut::zeroed(len);
            let mut filled = 0;
            while filled < len {
                let n = file.read_at(&mut buf[filled..], offset + filled as u64)?;
                if n == 0 {
                    return Err(StoreError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "spool shorter than its writer said",
                    )));
                }
                filled += n;
            }
            Ok(buf.freeze())
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }

    /// Remove the file (its readers keep what they opened).
    pub fn discard(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
