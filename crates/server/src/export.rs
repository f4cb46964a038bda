//! `GET /api/v1/export?image=NAME:TAG[&image=…]`: a tar of the images (every platform of an
//! index) that `docker load`, `podman load` and `pier import` accept, streamed from the store.
//! `pier export` is its client.
//!
//! The node builds the archive rather than the CLI pulling through `/v2/`: the node already
//! holds (or fetches once, through the mirror or its peers) every blob, so the bytes cross the
//! network once, are not hashed again on the way, and the length is known before the first
//! byte (the CLI's progress bar and its check that nothing was cut short use it). The layout
//! is `pier_archive::write`'s: an OCI layout with Docker's `manifest.json` beside it.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use pier_archive::write::{self as w, ExportImage};
use pier_oci::{Descriptor, Digest, ErrorCode, Manifest, Reference, Route};

use crate::error::ApiError;
use crate::warm::{ensure_local, manifest_bytes, parse_image, Place};
use crate::AppState;

type Result<T> = std::result::Result<T, ApiError>;

/// A piece of the archive: bytes in memory, or a blob read from the store when its turn comes.
enum Part {
    Bytes(Bytes),
    Blob { digest: Digest, size: u64 },
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::NameInvalid, msg)
}

/// The architecture name images use for this machine's, to choose the platform of an index
/// that Docker's `manifest.json` lists.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Everything an archive needs of one image.
struct Collected {
    /// Manifests (the top one last) by digest with their bytes.
    manifests: Vec<(Digest, Bytes)>,
    blobs: Vec<Digest>,
    docker: Option<(Digest, Vec<Digest>)>,
}

async fn collect(
    state: &AppState,
    place: &Place,
    top: &Digest,
    media_type: &str,
    bytes: Bytes,
) -> Result<Collected> {
    let mut out = Collected {
        manifests: Vec::new(),
        blobs: Vec::new(),
        docker: None,
    };
    let parse = |bytes: &[u8], media_type: &str, d: &Digest| {
        Manifest::parse(bytes, Some(media_type)).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::ManifestInvalid,
                format!("{d}: {e}"),
            )
        })
    };
    let m = parse(&bytes, media_type, top)?;
    let mut images = Vec::new();
    if m.manifests.is_empty() {
        images.push((top.clone(), m));
    } else {
        let mut host = None;
        for child in &m.manifests {
            let (child_type, child_bytes) =
                manifest_bytes(state, place, &Reference::Digest(child.digest.clone())).await?;
            let cm = parse(&child_bytes, &child_type, &child.digest)?;
            if cm.manifests.is_empty() {
                let matches = child
                    .platform
                    .as_ref()
                    .is_some_and(|p| p["os"] == "linux" && p["architecture"] == host_arch());
                if matches && host.is_none() {
                    host = Some(images.len());
                }
                out.manifests.push((child.digest.clone(), child_bytes));
                images.push((child.digest.clone(), cm));
            }
        }
        // Docker loads one platform: this machine's when the index has it.
        if let Some(h) = host {
            images.swap(0, h);
        }
    }
    out.manifests.push((top.clone(), bytes));
    for (n, (_, image)) in images.iter().enumerate() {
        let mut layers = Vec::new();
        for (i, b) in image.blobs.iter().enumerate() {
            if b.urls.as_ref().is_some_and(|u| !u.is_empty()) {
                continue;
            }
            if !out.blobs.contains(&b.digest) {
                out.blobs.push(b.digest.clone());
            }
            if i > 0 {
                layers.push(b.digest.clone());
            }
        }
        if n == 0 {
            if let Some(config) = image.blobs.first() {
                out.docker = Some((config.digest.clone(), layers));
            }
        }
    }
    Ok(out)
}

fn header_err(e: w::HeaderError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Internal,
        e.to_string(),
    )
}

/// Add a file held in memory: its header, its bytes, its padding.
fn add_bytes(parts: &mut Vec<Part>, total: &mut u64, path: &str, data: Bytes) -> Result<()> {
    let len = data.len() as u64;
    parts.push(Part::Bytes(Bytes::copy_from_slice(
        &w::header(path, len).map_err(header_err)?,
    )));
    *total += w::entry_len(len);
    parts.push(Part::Bytes(data));
    parts.push(Part::Bytes(Bytes::from(vec![0u8; w::padding(len)])));
    Ok(())
}

pub async fn export(State(state): State<AppState>, req: Request<Body>) -> Response {
    // Only the query is needed; the request (whose body is not Sync) is not held across awaits.
    let q = crate::respond::Query::of(&req);
    drop(req);
    match build(&state, &q).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn build(state: &AppState, q: &crate::respond::Query) -> Result<Response> {
    let wanted = q.all("image");
    if wanted.is_empty() {
        return Err(bad("name at least one image: ?image=NAME:TAG"));
    }
    let mut exports: Vec<ExportImage> = Vec::new();
    let mut manifests: Vec<(Digest, Bytes)> = Vec::new();
    let mut blobs: Vec<Digest> = Vec::new();
    for image in wanted {
        let (name, reference) = parse_image(image)?;
        let Reference::Tag(tag) = &reference else {
            return Err(bad(format!(
                "{image}: export an image by tag, so that the loader can name it"
            )));
        };
        let route = Route::Manifest {
            name: name.clone(),
            reference: reference.clone(),
        };
        let place = match crate::mirror::target(
            state,
            &route,
            &Method::GET,
            &crate::respond::Query::empty(),
        )
        .await?
        {
            Some(r) => Place::Mirrored(r),
            None => Place::Hosted(name.clone()),
        };
        let (media_type, bytes) = manifest_bytes(state, &place, &reference).await?;
        let digest = Digest::sha256(&bytes);
        let size = bytes.len() as u64;
        let c = collect(state, &place, &digest, &media_type, bytes).await?;
        for d in &c.blobs {
            ensure_local(state, &place, d).await?;
        }
        for (d, b) in c.manifests {
            if !manifests.iter().any(|(m, _)| *m == d) {
                manifests.push((d, b));
            }
        }
        for d in c.blobs {
            if !blobs.contains(&d) {
                blobs.push(d);
            }
        }
        exports.push(ExportImage {
            name: format!("{name}:{tag}"),
            top: Descriptor {
                media_type,
                digest,
                size,
                artifact_type: None,
                annotations: None,
                urls: None,
                platform: None,
            },
            docker: c.docker,
        });
    }
    let mut parts: Vec<Part> = Vec::new();
    let mut total = 0u64;
    let mut paths = BTreeSet::new();
    add_bytes(
        &mut parts,
        &mut total,
        "oci-layout",
        Bytes::from_static(w::OCI_LAYOUT),
    )?;
    for (d, b) in manifests {
        let path = w::blob_path(&d);
        if paths.insert(path.clone()) {
            add_bytes(&mut parts, &mut total, &path, b)?;
        }
    }
    for d in blobs {
        let path = w::blob_path(&d);
        if !paths.insert(path.clone()) {
            continue;
        }
        let size = state.registry.blob_store().stat(&d).await?.ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::BlobUnknown,
                format!("{d} is not stored on this node"),
            )
        })?;
        parts.push(Part::Bytes(Bytes::copy_from_slice(
            &w::header(&path, size).map_err(header_err)?,
        )));
        parts.push(Part::Blob { digest: d, size });
        parts.push(Part::Bytes(Bytes::from(vec![0u8; w::padding(size)])));
        total += w::entry_len(size);
    }
    add_bytes(
        &mut parts,
        &mut total,
        "index.json",
        Bytes::from(w::index_json(&exports)),
    )?;
    add_bytes(
        &mut parts,
        &mut total,
        "manifest.json",
        Bytes::from(w::manifest_json(&exports)),
    )?;
    parts.push(Part::Bytes(Bytes::from_static(&w::END)));
    total += w::END.len() as u64;

    let registry = state.registry.clone();
    let stream = futures::stream::iter(parts)
        .then(move |part| {
            let registry = registry.clone();
            async move {
                match part {
                    Part::Blob { size: 0, .. } => Ok(futures::stream::empty().boxed()),
                    Part::Bytes(b) => Ok(futures::stream::once(async move { Ok(b) }).boxed()),
                    Part::Blob { digest, size } => registry
                        .read_blob(&digest, 0, size)
                        .await
                        .map_err(std::io::Error::other),
                }
            }
        })
        .try_flatten();
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-tar")
        .header(header::CONTENT_LENGTH, total)
        .body(Body::from_stream(stream))
        .unwrap_or_default())
}
