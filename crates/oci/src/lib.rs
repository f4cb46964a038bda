//! The vocabulary of the OCI Distribution Specification, with no I/O: digests, repository names,
//! references, the `/v2/` route grammar, manifest parsing and the error codes of the specification.
//!
//! Architecture invariant: this crate knows nothing of HTTP servers, storage or upstreams; every
//! other crate may depend on it.

pub mod digest;
pub mod error;
pub mod glob;
pub mod manifest;
pub mod media;
pub mod name;
pub mod route;

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use error::ErrorCode;
pub use manifest::{Descriptor, Manifest, ManifestError};
pub use name::{NameError, Reference, RepoName, Tag};
pub use route::{Route, RouteError};
