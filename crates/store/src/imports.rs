//! The record of archive files already imported, by the digest of the whole file as
//! received, so that a copy of a file under another name (or the same file dropped again
//! after a restart) is recognised and skipped. Implemented in redb by
//! [`RedbMetaStore`](crate::RedbMetaStore); [`MemoryImportLog`] is for nodes and tests
//! without a database.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use pier_oci::Digest;
use serde::{Deserialize, Serialize};

use crate::Result;

/// One archive file that was imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedFile {
    /// sha256 of the whole file as received (compressed, if it was).
    pub digest: Digest,
    /// The name the file had when it was imported.
    pub name: String,
    pub size: u64,
    /// The images it made visible, `repo:tag@digest`.
    pub images: Vec<String>,
    /// Unix milliseconds of the import.
    pub at_ms: u64,
}

/// Storage of the files imported so far. Every record is durable when the call returns.
#[async_trait]
pub trait ImportLog: Send + Sync {
    /// The import of the file with this digest, if there was one.
    async fn imported(&self, digest: &Digest) -> Result<Option<ImportedFile>>;

    /// Remember an import (replacing an earlier record of the same digest).
    async fn record_import(&self, file: &ImportedFile) -> Result<()>;
}

/// An [`ImportLog`] in memory: forgotten when the process ends.
#[derive(Default)]
pub struct MemoryImportLog {
    files: Mutex<HashMap<Digest, ImportedFile>>,
}

#[async_trait]
impl ImportLog for MemoryImportLog {
    async fn imported(&self, digest: &Digest) -> Result<Option<ImportedFile>> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        Ok(files.get(digest).cloned())
    }

    async fn record_import(&self, file: &ImportedFile) -> Result<()> {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files.insert(file.digest.clone(), file.clone());
        Ok(())
    }
}
