//! `POST /api/v1/warm`: put every blob of an image (all platforms of an index) on N nodes or on
//! every node, ahead of the pulls that will want it. `pier warm` is its client.
//!
//! The node that takes the request brings each blob in first (one upstream fetch for the
//! cluster, or a peer fetch for hosted content), then asks each target to pull it from here;
//! a target answers once the blob is durable there. Progress streams back as one JSON object
//! per line: a `plan`, one `placed` per (blob, node), and a `summary`.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, Method, StatusCode};
use axum::response::Response;
use axum::Json;
use futures::StreamExt;
use pier_cluster::NodeId;
use pier_mirror::{BlobSource, MirrorRef};
use pier_oci::{Digest, ErrorCode, Manifest, Reference, RepoName, Route};
use pier_peer::PullRequest;
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::AppState;

type Result<T> = std::result::Result<T, ApiError>;

/// Placements made at once.
const PARALLEL: usize = 4;

#[derive(Debug, Deserialize)]
pub struct WarmRequest {
    pub image: String,
    #[serde(default)]
    pub replicas: Option<usize>,
    #[serde(default)]
    pub all_nodes: bool,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::NameInvalid, msg)
}

/// `name[:tag]` or `name@digest` as clients write images (the tag defaults to `latest`).
pub fn parse_image(image: &str) -> Result<(RepoName, Reference)> {
    let (name, reference) = match image.split_once('@') {
        Some((n, d)) => (n, d.to_string()),
        None => match image.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, t.to_string()),
            _ => (image, "latest".to_string()),
        },
    };
    let name: RepoName = name
        .parse()
        .map_err(|e| bad(format!("{image}: invalid repository name: {e}")))?;
    let reference: Reference = reference
        .parse()
        .map_err(|e| bad(format!("{image}: invalid tag or digest: {e}")))?;
    Ok((name, reference))
}

/// Where an image's content lives on this node.
pub(crate) enum Place {
    Mirrored(MirrorRef),
    Hosted(RepoName),
}

impl Place {
    pub(crate) fn repo(&self) -> String {
        match self {
            Place::Mirrored(r) => r.cache_repo.clone(),
            Place::Hosted(n) => n.as_str().to_string(),
        }
    }
}

pub(crate) async fn manifest_bytes(
    state: &AppState,
    place: &Place,
    reference: &Reference,
) -> Result<(String, bytes::Bytes)> {
    match place {
        Place::Mirrored(r) => {
            let mirror = state
                .mirror
                .as_ref()
                .ok_or_else(|| bad("no mirror on this node"))?;
            let (rec, bytes, _) = mirror
                .manifest(r, reference)
                .await
                .map_err(|e| ApiError::from_mirror(e).not_found_as(ErrorCode::ManifestUnknown))?;
            Ok((rec.media_type, bytes))
        }
        Place::Hosted(name) => match state.registry.manifest(name, reference).await {
            Ok((rec, bytes)) => Ok((rec.media_type, bytes)),
            Err(e) => match crate::cluster::hosted_manifest_bytes(state, name, reference).await? {
                Some((rec, bytes)) => Ok((rec.media_type, bytes)),
                None => Err(e.into()),
            },
        },
    }
}

/// Every blob of the image, all platforms of an index included.
async fn image_blobs(
    state: &AppState,
    place: &Place,
    reference: &Reference,
) -> Result<Vec<(Digest, u64)>> {
    let mut blobs: Vec<(Digest, u64)> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut todo = vec![reference.clone()];
    while let Some(r) = todo.pop() {
        let (media_type, bytes) = manifest_bytes(state, place, &r).await?;
        let m = Manifest::parse(&bytes, Some(&media_type)).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::ManifestInvalid,
                format!("{r}: {e}"),
            )
        })?;
        for child in m.manifests {
            if seen.insert(child.digest.to_string()) {
                todo.push(Reference::Digest(child.digest));
            }
        }
        for b in m.blobs {
            // Foreign layers live elsewhere by design.
            if b.urls.as_ref().is_some_and(|u| !u.is_empty()) {
                continue;
            }
            if seen.insert(b.digest.to_string()) {
                blobs.push((b.digest, b.size));
            }
        }
    }
    Ok(blobs)
}

/// Bring a blob onto this node (and wait until it is durable here).
pub(crate) async fn ensure_local(state: &AppState, place: &Place, digest: &Digest) -> Result<()> {
    let mirror = state
        .mirror
        .as_ref()
        .ok_or_else(|| bad("no mirror on this node"))?;
    let source = match place {
        Place::Mirrored(r) => mirror.blob(r, digest).await,
        Place::Hosted(name) => {
            if state.registry.blob_size(name, digest).await.is_ok() {
                return Ok(());
            }
            mirror.hosted_blob(name.as_str(), digest, None).await
        }
    }
    .map_err(|e| ApiError::from_mirror(e).not_found_as(ErrorCode::BlobUnknown))?;
    if let BlobSource::Filling { fill, .. } = source {
        fill.finished()
            .await
            .map_err(|e| ApiError::from_mirror(pier_mirror::MirrorError::Fill(e)))?;
    }
    Ok(())
}

pub async fn warm(State(state): State<AppState>, Json(req): Json<WarmRequest>) -> Response {
    match plan(&state, &req).await {
        Ok(resp) => resp,
        Err(e) => axum::response::IntoResponse::into_response(e),
    }
}

async fn plan(state: &AppState, req: &WarmRequest) -> Result<Response> {
    let (name, reference) = parse_image(&req.image)?;
    let route = Route::Manifest {
        name: name.clone(),
        reference: reference.clone(),
    };
    let place =
        match crate::mirror::target(state, &route, &Method::GET, &crate::respond::Query::empty())
            .await?
        {
            Some(r) => Place::Mirrored(r),
            None => Place::Hosted(name),
        };
    let blobs = image_blobs(state, &place, &reference).await?;
    let cluster = state.mirror.as_ref().and_then(|m| m.cluster()).cloned();
    let me = cluster.as_ref().map(|c| c.local());
    let targets_of = |digest: &Digest| -> Vec<Option<NodeId>> {
        match &cluster {
            None => vec![None],
            Some(c) if req.all_nodes => c.view().alive().into_iter().map(|m| Some(m.id)).collect(),
            Some(c) => c
                .owners_n(
                    digest.to_string().as_bytes(),
                    req.replicas.unwrap_or(c.replicas()).max(1),
                )
                .into_iter()
                .map(Some)
                .collect(),
        }
    };
    let placements: Vec<(Digest, u64, Vec<Option<NodeId>>)> = blobs
        .into_iter()
        .map(|(d, size)| {
            let t = targets_of(&d);
            (d, size, t)
        })
        .collect();
    let total: usize = placements.iter().map(|(_, _, t)| t.len()).sum();
    let nodes: BTreeSet<String> = placements
        .iter()
        .flat_map(|(_, _, t)| {
            t.iter()
                .map(|n| n.as_ref().map_or("local".into(), |n| n.name.clone()))
        })
        .collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<serde_json::Value>(64);
    let image = req.image.clone();
    let _ = tx
        .send(
            json!({"event": "plan", "image": image, "blobs": placements.len(),
            "targets": nodes.len(), "total": total}),
        )
        .await;
    let state = state.clone();
    let repo = place.repo();
    let upstream = match &place {
        Place::Mirrored(r) => Some(r.upstream_name().to_string()),
        Place::Hosted(_) => None,
    };
    tokio::spawn(async move {
        let results = futures::stream::iter(placements)
            .map(|(digest, size, targets)| {
                let (state, place, tx, cluster, me, repo, upstream) = (
                    &state,
                    &place,
                    tx.clone(),
                    cluster.clone(),
                    me.clone(),
                    repo.clone(),
                    upstream.clone(),
                );
                async move {
                    let local = ensure_local(state, place, &digest).await;
                    let mut ok = 0usize;
                    let mut failed = 0usize;
                    for target in targets {
                        let outcome = match (&local, &target, &cluster, &me) {
                            (Err(e), _, _, _) => Err(e.message.clone()),
                            (Ok(()), None, _, _) => Ok(()),
                            (Ok(()), Some(t), _, Some(me)) if t.name == me.name => Ok(()),
                            (Ok(()), Some(t), Some(c), me) => c
                                .client()
                                .pull(
                                    t,
                                    &PullRequest {
                                        kind: "blob".into(),
                                        repo: repo.clone(),
                                        digest: digest.to_string(),
                                        tag: None,
                                        from: me.as_ref().map(|m| m.name.clone()),
                                        upstream: upstream.clone(),
                                    },
                                )
                                .await
                                .map_err(|e| e.to_string()),
                            (Ok(()), Some(_), None, _) => Err("no cluster".into()),
                        };
                        let node = target
                            .as_ref()
                            .map_or("local".to_string(), |t| t.name.clone());
                        match &outcome {
                            Ok(()) => ok += 1,
                            Err(_) => failed += 1,
                        }
                        let _ = tx
                            .send(json!({"event": "placed", "blob": digest.to_string(),
                                "node": node, "ok": outcome.is_ok(), "bytes": size,
                                "error": outcome.err()}))
                            .await;
                    }
                    (ok, failed)
                }
            })
            .buffer_unordered(PARALLEL)
            .collect::<Vec<_>>()
            .await;
        let placed: usize = results.iter().map(|(o, _)| o).sum();
        let failed: usize = results.iter().map(|(_, f)| f).sum();
        let _ = tx
            .send(
                json!({"event": "summary", "image": image, "ok": failed == 0,
                "placed": placed, "failed": failed}),
            )
            .await;
    });
    let body = tokio_stream_lines(rx);
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(body)
        .unwrap_or_default())
}

/// The events as newline-delimited JSON, as they happen.
fn tokio_stream_lines(rx: tokio::sync::mpsc::Receiver<serde_json::Value>) -> Body {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let v = rx.recv().await?;
        let mut line = v.to_string();
        line.push('\n');
        Some((Ok::<_, std::io::Error>(bytes::Bytes::from(line)), rx))
    });
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::parse_image;

    #[test]
    fn images_parse_as_clients_write_them() {
        let (n, r) = parse_image("upstream.test/library/app:1").unwrap();
        assert_eq!(
            (n.as_str(), r.to_string().as_str()),
            ("upstream.test/library/app", "1")
        );
        let (n, r) = parse_image("team/app").unwrap();
        assert_eq!((n.as_str(), r.to_string().as_str()), ("team/app", "latest"));
        let d = format!("sha256:{}", "a".repeat(64));
        let (n, r) = parse_image(&format!("team/app@{d}")).unwrap();
        assert_eq!((n.as_str(), r.to_string()), ("team/app", d));
        assert!(parse_image("Team/App:1").is_err());
    }
}
