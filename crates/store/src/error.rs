//! The store's error type, classified by whose fault it is and whether a retry may help.

use pier_oci::Digest;

/// Who caused an error: decides the status class a client sees and whether to log loudly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The client sent something wrong (bad bytes, wrong digest, out-of-order chunk).
    Client,
    /// Something failed inside pier (disk, database).
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("upload session unknown")]
    UploadUnknown,
    #[error("upload session data is damaged and cannot resume: {0}")]
    UploadDamaged(String),
    #[error("content does not match digest: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("chunk starts at {requested} but the upload is at {current}")]
    OffsetMismatch { current: u64, requested: u64 },
    #[error("content is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("reading the request body failed: {0}")]
    Body(std::io::Error),
    #[error("storage i/o failed: {0}")]
    Io(std::io::Error),
    /// The disk (or the quota) is full, or free space is below the configured floor. Kept apart
    /// from [`StoreError::Io`] so clients are told why and the node reports itself unwritable.
    #[error("no space left on device: {0}")]
    NoSpace(String),
    #[error("metadata database failed: {0}")]
    Db(String),
    /// The database's file could not be read or written. redb refuses every later transaction
    /// after one of these until it is reopened, which the store does by itself.
    #[error("metadata database i/o failed: {0}")]
    DbIo(String),
    #[error("metadata is corrupt: {0}")]
    Corrupt(String),
    #[error("job {0} unknown")]
    JobUnknown(u64),
    /// The backend does not implement this operation (yet).
    #[error("this storage backend does not support {0}")]
    Unsupported(&'static str),
}

impl StoreError {
    pub fn blame(&self) -> Blame {
        match self {
            StoreError::UploadUnknown
            | StoreError::UploadDamaged(_)
            | StoreError::DigestMismatch { .. }
            | StoreError::OffsetMismatch { .. }
            | StoreError::TooLarge { .. }
            | StoreError::Body(_)
            | StoreError::JobUnknown(_) => Blame::Client,
            StoreError::Io(_)
            | StoreError::NoSpace(_)
            | StoreError::Db(_)
            | StoreError::DbIo(_)
            | StoreError::Corrupt(_)
            | StoreError::Unsupported(_) => Blame::Internal,
        }
    }

    /// Whether the same request may succeed if retried unchanged.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Io(_)
                | StoreError::NoSpace(_)
                | StoreError::Db(_)
                | StoreError::DbIo(_)
                | StoreError::Body(_)
        )
    }

    /// Whether this is the disk being full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::NoSpace(_))
    }
}

/// Whether an I/O error means the disk or the quota is full.
pub fn io_is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        if io_is_no_space(&e) {
            StoreError::NoSpace(e.to_string())
        } else {
            StoreError::Io(e)
        }
    }
}

macro_rules! db_error {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::from(redb::Error::from(e))
            }
        }
    )*};
}
impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        // redb wraps the OS error: a commit that hit a full disk is a full disk, and any I/O
        // failure (or redb's refusal after one) means the database must be reopened.
        match e {
            redb::Error::Io(io) if io_is_no_space(&io) => {
                StoreError::NoSpace(format!("metadata database: {io}"))
            }
            redb::Error::Io(io) => StoreError::DbIo(io.to_string()),
            e @ redb::Error::PreviousIo => StoreError::DbIo(e.to_string()),
            e => StoreError::Db(e.to_string()),
        }
    }
}

db_error!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
