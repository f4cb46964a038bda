//! Storage for pier: content-addressed blobs ([`BlobStore`]) and the metadata database
//! ([`MetaStore`]: repositories, tags, manifests, blob links, referrers, upload sessions), and
//! the durable job queue ([`JobStore`], run by [`JobRunner`]) that background work goes through,
//! and the record of imported archive files ([`ImportLog`]).
//!
//! Architecture invariant: this crate knows nothing of HTTP, routing or upstreams. It stores
//! bytes and facts; deciding what a request may see is the registry's job.
//!
//! Architecture invariant: nothing unverified becomes visible. Blob bytes are hashed while they
//! stream in, written to a temporary file, fsynced and linked into place only when their digest
//! matches.

pub mod blob;
pub mod error;
pub mod fs;
pub mod imports;
pub mod jobs;
pub mod meta;
pub mod pg;
pub mod pins;
pub mod redb_meta;
pub mod s3;
pub mod space;
pub mod spool;

pub use blob::{BlobEntry, BlobStore, ByteStream, StoreStats};
pub use error::{Blame, StoreError};
pub use fs::FsBlobStore;
pub use imports::{ImportLog, ImportedFile, MemoryImportLog};
pub use jobs::{
    Job, JobFailure, JobHandler, JobRunner, JobState, JobStore, RetryPolicy, RunnerConfig,
};
pub use meta::{BlobHold, ManifestRecord, MetaStore, Page, UploadRecord};
pub use pg::{MetaEvent, PgMetaStore};
pub use pins::{Pin, PinStore};
pub use redb_meta::RedbMetaStore;
pub use s3::{S3BlobStore, S3Options};
pub use space::{Space, SpaceState};
pub use spool::Spool;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
