//! The archive pier exports: an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/<alg>/<hex>`) with Docker's `manifest.json` beside it, as Docker 25 writes it. Docker
//! of any version loads it by `manifest.json`, podman and skopeo by `index.json`, and pier
//! imports it back by `index.json`.
//!
//! The writer is the caller's: this module gives the tar headers and the documents, so a
//! server can stream blobs from its store between them without building the file anywhere,
//! and knows the archive's length before the first byte.

use pier_oci::{Descriptor, Digest};
use serde_json::json;

use crate::media::{CONTAINERD_IMAGE_NAME, REF_NAME};

/// A tar block.
pub const BLOCK: u64 = 512;
/// The end of a tar: two zero blocks.
pub const END: [u8; 1024] = [0u8; 1024];
/// The `oci-layout` file.
pub const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Why an entry cannot be written.
#[derive(Debug, thiserror::Error)]
#[error("tar header for {path}: {source}")]
pub struct HeaderError {
    path: String,
    source: std::io::Error,
}

/// The header of a regular file `path` of `size` bytes (mode 0644, time 0: an export of the
/// same images is the same file).
pub fn header(path: &str, size: u64) -> Result<[u8; 512], HeaderError> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).map_err(|source| HeaderError {
        path: path.to_string(),
        source,
    })?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut out = [0u8; 512];
    out.copy_from_slice(h.as_bytes());
    Ok(out)
}

/// Zero bytes that follow `size` bytes of data to fill the last block.
pub fn padding(size: u64) -> usize {
    ((BLOCK - size % BLOCK) % BLOCK) as usize
}

/// Bytes an entry of `size` takes in the tar: its header, its data and the padding.
pub fn entry_len(size: u64) -> u64 {
    BLOCK + size + padding(size) as u64
}

/// Where a blob goes in the layout.
pub fn blob_path(d: &Digest) -> String {
    format!("blobs/{}/{}", d.algorithm().as_str(), d.hex())
}

/// One named image of an export.
#[derive(Debug, Clone)]
pub struct ExportImage {
    /// The full name the loader gives the image, `repo:tag` (say, `pier.lan:5000/team/app:v1`).
    pub name: String,
    /// The manifest (or index) the name points at.
    pub top: Descriptor,
    /// For Docker's `manifest.json`: the config and layers of the image manifest Docker loads
    /// (for an index, one platform's).
    pub docker: Option<(Digest, Vec<Digest>)>,
}

/// `index.json`: each image by its full name, as containerd, podman and skopeo read it.
pub fn index_json(images: &[ExportImage]) -> Vec<u8> {
    let manifests: Vec<serde_json::Value> = images
        .iter()
        .map(|i| {
            json!({
                "mediaType": i.top.media_type,
                "digest": i.top.digest.to_string(),
                "size": i.top.size,
                "annotations": {
                    CONTAINERD_IMAGE_NAME: i.name,
                    REF_NAME: i.name,
                },
            })
        })
        .collect();
    let doc = json!({
        "schemaVersion": 2,
        "mediaType": pier_oci::media::OCI_INDEX,
        "manifests": manifests,
    });
    doc.to_string().into_bytes()
}

/// Docker's `manifest.json`: images with the same config share an entry with all their names.
pub fn manifest_json(images: &[ExportImage]) -> Vec<u8> {
    let mut entries: Vec<(Digest, Vec<Digest>, Vec<String>)> = Vec::new();
    for i in images {
        let Some((config, layers)) = &i.docker else {
            continue;
        };
        match entries.iter_mut().find(|(c, _, _)| c == config) {
            Some((_, _, tags)) => tags.push(i.name.clone()),
            None => entries.push((config.clone(), layers.clone(), vec![i.name.clone()])),
        }
    }
    let doc: Vec<serde_json::Value> = entries
        .iter()
        .map(|(config, layers, tags)| {
            json!({
                "Config": blob_path(config),
                "RepoTags": tags,
                "Layers": layers.iter().map(blob_path).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::Value::Array(doc).to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::{entry_len, header, padding};

    #[test]
    fn entries_fill_whole_blocks() {
        assert_eq!(padding(0), 0);
        assert_eq!(padding(1), 511);
        assert_eq!(padding(512), 0);
        assert_eq!(entry_len(513), 512 + 1024);
        let h = header("blobs/sha256/ab", 513).expect("header");
        let parsed = tar::Header::from_byte_slice(&h);
        assert_eq!(parsed.size().expect("size"), 513);
        assert_eq!(
            parsed.path().expect("path").to_str(),
            Some("blobs/sha256/ab")
        );
    }
}
