//! Hosted content this node lacks, read from the cluster: a manifest from the peers that have
//! it (owners first), a blob through a fill from the peers that hold it. Mirrored content takes
//! the mirror's own path (`pier_mirror::Mirror` asks peers itself).

use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::Response;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use pier_mirror::BlobSource;
use pier_oci::{Digest, ErrorCode, Reference, RepoName};

use crate::error::ApiError;
use crate::respond::{
    blob_headers, blob_range, local_response, manifest_response, stream_response,
};
use crate::AppState;

type Result<T> = std::result::Result<T, ApiError>;

/// The placement key of a hosted manifest reference.
pub fn manifest_key(repo: &str, reference: &Reference) -> String {
    match reference {
        Reference::Tag(t) => format!("{repo}:{}", t.as_str()),
        Reference::Digest(d) => d.to_string(),
    }
}

/// A hosted manifest from a peer, or `None` when no peer has it (or there are none). All
/// peers are asked at once; the first good answer in preference order wins. The bytes are kept
/// here by digest (never the tag, which only its owners and the pushing node keep current).
pub(crate) async fn hosted_manifest(
    state: &AppState,
    name: &RepoName,
    reference: &Reference,
    head: bool,
) -> Result<Option<Response>> {
    Ok(hosted_manifest_bytes(state, name, reference)
        .await?
        .map(|(record, bytes)| manifest_response(state, &record, bytes, head, "peer")))
}

/// [`hosted_manifest`]'s record and bytes.
pub(crate) async fn hosted_manifest_bytes(
    state: &AppState,
    name: &RepoName,
    reference: &Reference,
) -> Result<Option<(pier_store::ManifestRecord, bytes::Bytes)>> {
    let Some(mirror) = &state.mirror else {
        return Ok(None);
    };
    let Some(cluster) = mirror.cluster().filter(|c| c.has_peers()) else {
        return Ok(None);
    };
    let key = manifest_key(name.as_str(), reference);
    let candidates = cluster.candidates(key.as_bytes());
    let reference_s = reference.to_string();
    let mut asked: FuturesUnordered<_> = candidates
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let reference_s = reference_s.clone();
            async move {
                let answer = cluster
                    .client()
                    .get_manifest(node, name.as_str(), &reference_s, None)
                    .await;
                (i, answer)
            }
        })
        .collect();
    while let Some((i, answer)) = asked.next().await {
        let answer = match answer {
            Ok(Some(a)) => a,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(peer = %candidates[i].name, error = %e, "peer could not answer a manifest");
                continue;
            }
        };
        let want = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => answer
                .digest
                .as_deref()
                .and_then(|d| d.parse::<Digest>().ok()),
        };
        let Some(want) = want else { continue };
        let actual = Digest::compute(want.algorithm(), &answer.bytes);
        if actual != want {
            tracing::warn!(peer = %candidates[i].name, expected = %want, %actual, "peer sent a manifest that does not match");
            continue;
        }
        let (record, bytes) = mirror
            .store_manifest(
                name.as_str(),
                actual,
                answer.bytes,
                &answer.media_type,
                None,
            )
            .await
            .map_err(ApiError::from_mirror)?;
        return Ok(Some((record, bytes)));
    }
    Ok(None)
}

/// A hosted blob from the peers that hold it linked to `name`, cached here while it streams.
/// `None` when there is no cluster to ask.
pub(crate) async fn hosted_blob(
    state: &AppState,
    name: &RepoName,
    digest: &Digest,
    headers: &HeaderMap,
    zero_copy: Option<&crate::zerocopy::ZeroCopy>,
    head: bool,
) -> Result<Option<Response>> {
    let Some(mirror) = &state.mirror else {
        return Ok(None);
    };
    if !mirror.cluster().is_some_and(|c| c.has_peers()) {
        return Ok(None);
    }
    let source = match mirror.hosted_blob(name.as_str(), digest, None).await {
        Ok(s) => s,
        Err(pier_mirror::MirrorError::Fill(pier_mirror::fill::FillError::NotFound)) => {
            return Ok(None)
        }
        Err(e) => return Err(ApiError::from_mirror(e).not_found_as(ErrorCode::BlobUnknown)),
    };
    let (size, fill) = match source {
        BlobSource::Local { size } => (size, None),
        BlobSource::Filling {
            fill,
            size: Some(size),
        } => (size, Some(fill)),
        BlobSource::Filling { fill, size: None } => {
            // Peers always send a length; wait for the end rather than guess.
            fill.finished()
                .await
                .map_err(|e| ApiError::from_mirror(pier_mirror::MirrorError::Fill(e)))?;
            let size = state.registry.blob_size(name, digest).await?;
            (size, None)
        }
    };
    let range = blob_range(headers, size)?;
    let (builder, start, end) = blob_headers(digest, size, range);
    if head || start == end {
        return Ok(Some(builder.body(Body::empty()).unwrap_or_default()));
    }
    Ok(Some(match fill {
        Some(fill) => {
            let source = fill.origin();
            stream_response(state, builder, fill.read(start, Some(end)), source)
        }
        None => local_response(state, zero_copy, builder, digest, start, end).await?,
    }))
}

/// Bring a blob or child manifest that a pushed manifest references, and this node lacks,
/// from the peers that have it in `name`. False when no peer has it (or there is no cluster).
pub(crate) async fn fetch_referenced(
    state: &AppState,
    name: &RepoName,
    digest: &Digest,
) -> Result<bool> {
    let Some(mirror) = &state.mirror else {
        return Ok(false);
    };
    if !mirror.cluster().is_some_and(|c| c.has_peers()) {
        return Ok(false);
    }
    match mirror.hosted_blob(name.as_str(), digest, None).await {
        Ok(BlobSource::Local { .. }) => return Ok(true),
        Ok(BlobSource::Filling { fill, .. }) => {
            fill.finished()
                .await
                .map_err(|e| ApiError::from_mirror(pier_mirror::MirrorError::Fill(e)))?;
            return Ok(true);
        }
        Err(pier_mirror::MirrorError::Fill(pier_mirror::fill::FillError::NotFound)) => {}
        Err(e) => return Err(ApiError::from_mirror(e)),
    }
    Ok(
        hosted_manifest_bytes(state, name, &Reference::Digest(digest.clone()))
            .await?
            .is_some(),
    )
}
