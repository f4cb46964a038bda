//! Image archives: the tarballs `docker save` writes (the legacy `manifest.json` layout and the
//! OCI layout of Docker 25 and later), OCI image-layout archives as skopeo and podman write
//! them, each optionally gzip- or zstd-compressed; and the archive pier exports, which every
//! one of those readers accepts.
//!
//! Reading streams: [`read::read_archive`] walks the tar once, hands every layer-sized file to
//! a [`read::BlobSink`] as it passes (the sink stores and verifies it), keeps the small JSON
//! documents in memory, and only at the end decides what the images are. Nothing is
//! extracted to disk first.
//!
//! Architecture invariant: this crate does no storage and no networking. It knows the archive
//! formats and the OCI vocabulary of `pier-oci`; where bytes go is the sink's business.

pub mod names;
pub mod read;
pub mod write;

pub use names::{normalize, ImageName, NameProblem};
pub use read::{
    read_archive, ArchiveError, BlobSink, Contents, Format, Image, ManifestDoc, SinkError,
};

/// How an archive file is compressed, told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression whose magic number `head` starts with (a plain tar has none).
    pub fn detect(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// Media types of the documents and layers pier writes for archives.
pub mod media {
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// Docker 25+ and containerd name the full image reference with this annotation.
    pub const CONTAINERD_IMAGE_NAME: &str = "io.containerd.image.name";
    /// The OCI layout's name for an image: a tag, or (as skopeo and podman write it) a whole
    /// reference.
    pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
}
