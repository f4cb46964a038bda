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
    Io(#[from] std::io::Error),
    #[error("metadata database failed: {0}")]
    Db(String),
    #[error("metadata is corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn blame(&self) -> Blame {
        match self {
            StoreError::UploadUnknown
            | StoreError::UploadDamaged(_)
            | StoreError::DigestMismatch { .. }
            | StoreError::OffsetMismatch { .. }
            | StoreError::TooLarge { .. }
            | StoreError::Body(_) => Blame::Client,
            StoreError::Io(_) | StoreError::Db(_) | StoreError::Corrupt(_) => Blame::Internal,
        }
    }

    /// Whether the same request may succeed if retried unchanged.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Io(_) | StoreError::Db(_) | StoreError::Body(_)
        )
    }
}

macro_rules! db_error {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.to_string())
            }
        }
    )*};
}
db_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
