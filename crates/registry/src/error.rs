//! The registry's error type. Each variant knows its OCI error code, whose fault it is, and
//! whether a retry may help; the HTTP layer maps it to a status in one place.

use pier_oci::{Digest, ErrorCode};
use pier_store::{Blame, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("blob unknown to this repository")]
    BlobUnknown,
    #[error("manifest unknown")]
    ManifestUnknown,
    #[error("repository name not known to this registry")]
    NameUnknown,
    #[error("upload session unknown")]
    UploadUnknown,
    #[error("upload invalid: {0}")]
    UploadInvalid(String),
    #[error("chunk out of order: the upload is at byte {current}")]
    ChunkOutOfOrder { current: u64 },
    #[error("digest invalid: {0}")]
    DigestInvalid(String),
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    #[error("manifest references {0}, which this repository does not hold")]
    ManifestBlobUnknown(Digest),
    #[error("content is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("too many upload sessions: {0}")]
    TooManyUploads(String),
    #[error("storage failed: {0}")]
    Store(StoreError),
}

impl RegistryError {
    pub fn code(&self) -> ErrorCode {
        match self {
            RegistryError::BlobUnknown => ErrorCode::BlobUnknown,
            RegistryError::ManifestUnknown => ErrorCode::ManifestUnknown,
            RegistryError::NameUnknown => ErrorCode::NameUnknown,
            RegistryError::UploadUnknown => ErrorCode::BlobUploadUnknown,
            RegistryError::UploadInvalid(_) | RegistryError::ChunkOutOfOrder { .. } => {
                ErrorCode::BlobUploadInvalid
            }
            RegistryError::DigestInvalid(_) => ErrorCode::DigestInvalid,
            RegistryError::ManifestInvalid(_) => ErrorCode::ManifestInvalid,
            RegistryError::ManifestBlobUnknown(_) => ErrorCode::ManifestBlobUnknown,
            RegistryError::TooLarge { .. } => ErrorCode::SizeInvalid,
            RegistryError::TooManyUploads(_) => ErrorCode::TooManyRequests,
            RegistryError::Store(_) => ErrorCode::Internal,
        }
    }

    pub fn blame(&self) -> Blame {
        match self {
            RegistryError::Store(e) => e.blame(),
            _ => Blame::Client,
        }
    }

    pub fn retryable(&self) -> bool {
        match self {
            RegistryError::Store(e) => e.retryable(),
            // Slots free up as other sessions finish.
            RegistryError::TooManyUploads(_) => true,
            _ => false,
        }
    }
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UploadUnknown => RegistryError::UploadUnknown,
            StoreError::UploadDamaged(why) => RegistryError::UploadInvalid(why),
            StoreError::DigestMismatch { expected, actual } => {
                RegistryError::DigestInvalid(format!("content has digest {actual}, not {expected}"))
            }
            StoreError::OffsetMismatch { current, .. } => {
                RegistryError::ChunkOutOfOrder { current }
            }
            StoreError::TooLarge { limit } => RegistryError::TooLarge { limit },
            StoreError::Body(e) => RegistryError::UploadInvalid(format!("request body: {e}")),
            other => RegistryError::Store(other),
        }
    }
}
