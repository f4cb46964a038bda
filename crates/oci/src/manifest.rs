//! Parsing of pushed manifests: enough to validate them and to know what they reference.
//! pier never re-serialises a manifest; the exact bytes received are what is stored and served.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::media;

/// A content descriptor, as in manifests, indexes and referrers responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    #[error("unsupported manifest schemaVersion {0} (want 2)")]
    SchemaVersion(i64),
    #[error("mediaType {field:?} in the manifest does not match Content-Type {header:?}")]
    MediaTypeMismatch { field: String, header: String },
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("manifest lacks a required field: {0}")]
    Missing(&'static str),
}

/// What pier needs to know about a parsed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub media_type: String,
    pub artifact_type: Option<String>,
    /// Blobs an image manifest references: its config, then its layers.
    pub blobs: Vec<Descriptor>,
    /// Manifests an index references.
    pub manifests: Vec<Descriptor>,
    pub subject: Option<Descriptor>,
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
    annotations: Option<BTreeMap<String, String>>,
}

/// Strip parameters (`; charset=...`) from a Content-Type.
fn bare(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

impl Manifest {
    /// Parse `bytes`, with the request's `Content-Type` if it had one. The manifest's own
    /// `mediaType` field wins; a Content-Type naming a different manifest type is an error.
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, ManifestError> {
        let raw: Raw =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        let header = content_type.map(bare).filter(|h| !h.is_empty());
        let media_type = match (&raw.media_type, header) {
            (Some(field), Some(h))
                if field != h && media::MANIFEST_TYPES.contains(&h) && !field.is_empty() =>
            {
                return Err(ManifestError::MediaTypeMismatch {
                    field: field.clone(),
                    header: h.to_string(),
                })
            }
            (Some(field), _) if !field.is_empty() => field.clone(),
            (_, Some(h)) if media::MANIFEST_TYPES.contains(&h) => h.to_string(),
            // Neither says: an OCI manifest may omit mediaType, so infer from the shape.
            _ if raw.manifests.is_some() => media::OCI_INDEX.to_string(),
            _ if raw.config.is_some() => media::OCI_MANIFEST.to_string(),
            _ => {
                return Err(ManifestError::UnsupportedMediaType(
                    header.unwrap_or("").to_string(),
                ))
            }
        };
        match raw.schema_version {
            Some(2) => {}
            Some(v) => return Err(ManifestError::SchemaVersion(v)),
            None => return Err(ManifestError::Missing("schemaVersion")),
        }
        if media::is_image_manifest(&media_type) {
            let config = raw.config.ok_or(ManifestError::Missing("config"))?;
            let layers = raw.layers.ok_or(ManifestError::Missing("layers"))?;
            let artifact_type = raw
                .artifact_type
                .clone()
                .or_else(|| Some(config.media_type.clone()));
            let mut blobs = Vec::with_capacity(layers.len() + 1);
            blobs.push(config);
            blobs.extend(layers);
            Ok(Manifest {
                media_type,
                artifact_type,
                blobs,
                manifests: Vec::new(),
                subject: raw.subject,
                annotations: raw.annotations,
            })
        } else if media::is_index(&media_type) {
            let manifests = raw.manifests.ok_or(ManifestError::Missing("manifests"))?;
            Ok(Manifest {
                media_type,
                artifact_type: raw.artifact_type,
                blobs: Vec::new(),
                manifests,
                subject: raw.subject,
                annotations: raw.annotations,
            })
        } else {
            Err(ManifestError::UnsupportedMediaType(media_type))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn image(extra: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D}","size":0}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{D}","size":0}}]{extra}}}"#,
            media::OCI_MANIFEST
        )
    }

    #[test]
    fn image_manifest() {
        let m = Manifest::parse(image("").as_bytes(), Some(media::OCI_MANIFEST)).expect("parses");
        assert_eq!(m.blobs.len(), 2);
        assert_eq!(
            m.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
        assert!(m.subject.is_none());
    }

    #[test]
    fn subject_and_artifact_type() {
        let extra = format!(
            r#","artifactType":"application/x-sig","subject":{{"mediaType":"{}","digest":"{D}","size":1}}"#,
            media::OCI_MANIFEST
        );
        let m = Manifest::parse(image(&extra).as_bytes(), None).expect("parses");
        assert_eq!(m.artifact_type.as_deref(), Some("application/x-sig"));
        assert!(m.subject.is_some());
    }

    #[test]
    fn rejects() {
        assert!(Manifest::parse(b"not json", None).is_err());
        assert!(Manifest::parse(b"{}", None).is_err());
        assert!(Manifest::parse(br#"{"schemaVersion":1,"config":{}}"#, None).is_err());
        // Content-Type naming another manifest type.
        assert!(matches!(
            Manifest::parse(image("").as_bytes(), Some(media::DOCKER_MANIFEST)),
            Err(ManifestError::MediaTypeMismatch { .. })
        ));
        // Bad digest inside a descriptor.
        let bad = image("").replace(D, "sha256:1234");
        assert!(Manifest::parse(bad.as_bytes(), None).is_err());
        // Index without manifests.
        assert!(Manifest::parse(
            format!(
                r#"{{"schemaVersion":2,"mediaType":"{}"}}"#,
                media::OCI_INDEX
            )
            .as_bytes(),
            None
        )
        .is_err());
    }

    #[test]
    fn index_inferred_from_shape() {
        let body = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{}","digest":"{D}","size":3}}]}}"#,
            media::OCI_MANIFEST
        );
        let m = Manifest::parse(body.as_bytes(), Some("application/json")).expect("parses");
        assert_eq!(m.media_type, media::OCI_INDEX);
        assert_eq!(m.manifests.len(), 1);
    }
}
