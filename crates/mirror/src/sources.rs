//! Where a fill's bytes come from: the upstream or a peer, in an order chosen when the fill
//! starts ([`plan`]). A fill opens the first source that answers; when a source fails
//! mid-stream the fill resumes from the next one with `Range` at the byte where it stopped.
//!
//! The plan for a blob missing here: the peers that hold it (asked with one HEAD each, all at
//! once, owners first and this zone first); if none does and the blob is mirrored, the first
//! reachable owner is asked to fill it from its upstream (so every node's request shares that
//! owner's single upstream fetch); the upstream itself last, or first when this node is the
//! first owner. A fill started by a peer's request plans the upstream only: a peer request
//! never causes a peer request back. Peers offer only blobs they hold or fill from an upstream,
//! so two nodes never read a blob from each other.

use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use pier_cluster::NodeId;
use pier_oci::Digest;
use pier_peer::{Cluster, PeerError};
use pier_upstream::UpstreamError;

use crate::fill::FillError;
use crate::MirrorRef;

pub(crate) type Body = Pin<Box<dyn Stream<Item = Result<Bytes, FillError>> + Send>>;

/// One place a fill may read from.
#[derive(Clone)]
pub(crate) enum Source {
    Upstream(MirrorRef),
    /// A peer that holds the blob, or (`fill`) an owner asked to fill it from its upstream.
    Peer {
        node: NodeId,
        /// The repository the blob must be linked to on the peer (hosted content).
        repo: Option<String>,
        /// (upstream, cache repository) the peer fills from when it lacks the blob.
        fill: Option<(String, String)>,
    },
}

impl Source {
    pub(crate) fn origin(&self) -> &'static str {
        match self {
            Source::Upstream(_) => "upstream",
            Source::Peer { .. } => "peer",
        }
    }

    /// The peer this source reads from, if it is one.
    pub(crate) fn node_name(&self) -> Option<String> {
        match self {
            Source::Upstream(_) => None,
            Source::Peer { node, .. } => Some(node.name.clone()),
        }
    }

    fn is_holder(&self) -> bool {
        matches!(self, Source::Peer { fill: None, .. })
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Source::Upstream(r) => format!("upstream {}", r.upstream_name()),
            Source::Peer {
                node, fill: None, ..
            } => format!("peer {}", node.name),
            Source::Peer { node, .. } => format!("owner {} (filling)", node.name),
        }
    }
}

/// The failure as a fill reports it: the upstream's kind is kept (403, 429 and 404 mean
/// something to a client), a peer's is a peer failure.
pub(crate) fn upstream_error(e: UpstreamError) -> FillError {
    match e {
        UpstreamError::NotFound => FillError::NotFound,
        UpstreamError::Denied(why) => FillError::Denied(why),
        UpstreamError::TooManyRequests => FillError::TooManyRequests,
        UpstreamError::Timeout(why) => FillError::Timeout(why),
        other => FillError::Upstream(other.to_string()),
    }
}

fn peer_error(e: PeerError) -> FillError {
    match e {
        PeerError::NotFound(_) => FillError::NotFound,
        // An owner relays its upstream's verdicts.
        PeerError::Status(_, 403, why) => FillError::Denied(why),
        PeerError::Status(_, 429, _) => FillError::TooManyRequests,
        other => FillError::Peer(other.to_string()),
    }
}

/// Open `source` at `offset`: the blob's total size (when known) and its bytes.
async fn open(
    source: &Source,
    cluster: Option<&Cluster>,
    digest: &Digest,
    offset: u64,
) -> Result<(Option<u64>, Body), FillError> {
    match source {
        Source::Upstream(r) => {
            let (size, body) = r
                .upstream
                .client
                .get_blob(&r.repo, digest, offset)
                .await
                .map_err(upstream_error)?;
            Ok((size, Box::pin(body.map(|c| c.map_err(upstream_error)))))
        }
        Source::Peer { node, repo, fill } => {
            let Some(cluster) = cluster else {
                return Err(FillError::Peer("no cluster".into()));
            };
            let answer = cluster
                .client()
                .get_blob(
                    node,
                    digest,
                    offset,
                    repo.as_deref().or(fill.as_ref().map(|(_, r)| r.as_str())),
                    fill.as_ref().map(|(u, _)| u.as_str()),
                )
                .await
                .map_err(peer_error)?;
            Ok((
                answer.size,
                Box::pin(answer.body.map(|c| c.map_err(peer_error))),
            ))
        }
    }
}

/// Open the first source from `start` on that answers. A peer holding the blob that has not
/// answered by the hedge delay is raced against the next holder; the first answer wins.
/// Returns the index of the source that answered.
pub(crate) async fn open_first(
    sources: &[Source],
    start: usize,
    cluster: Option<&Cluster>,
    digest: &Digest,
    offset: u64,
) -> Result<(usize, Option<u64>, Body), FillError> {
    let mut errors: Vec<(usize, FillError)> = Vec::new();
    let mut i = start;
    while i < sources.len() {
        let hedge = cluster.map_or(Duration::from_millis(250), |c| c.client().hedge_delay());
        let first = open(&sources[i], cluster, digest, offset);
        tokio::pin!(first);
        let can_hedge = sources[i].is_holder() && sources.get(i + 1).is_some_and(Source::is_holder);
        if can_hedge {
            tokio::select! {
                r = &mut first => match r {
                    Ok((size, body)) => return Ok((i, size, body)),
                    Err(e) => { errors.push((i, e)); i += 1; continue; }
                },
                () = tokio::time::sleep(hedge) => {}
            }
            if let Some(c) = cluster {
                c.client().metrics().hedged.inc();
            }
            let second = open(&sources[i + 1], cluster, digest, offset);
            tokio::pin!(second);
            let (mut a_done, mut b_done) = (false, false);
            while !(a_done && b_done) {
                tokio::select! {
                    r = &mut first, if !a_done => match r {
                        Ok((size, body)) => return Ok((i, size, body)),
                        Err(e) => { a_done = true; errors.push((i, e)); }
                    },
                    r = &mut second, if !b_done => match r {
                        Ok((size, body)) => return Ok((i + 1, size, body)),
                        Err(e) => { b_done = true; errors.push((i + 1, e)); }
                    },
                }
            }
            i += 2;
            continue;
        }
        match first.await {
            Ok((size, body)) => return Ok((i, size, body)),
            Err(e) => {
                tracing::debug!(source = %sources[i].describe(), %digest, error = %e, "source failed");
                errors.push((i, e));
                i += 1;
            }
        }
    }
    Err(best_error(sources, errors))
}

/// The error to report when every source failed: the upstream's when it was asked (it is the
/// authority on whether a blob exists), else "not found" only if every peer said so.
fn best_error(sources: &[Source], errors: Vec<(usize, FillError)>) -> FillError {
    if let Some((_, e)) = errors
        .iter()
        .rev()
        .find(|(i, _)| matches!(sources[*i], Source::Upstream(_)))
    {
        return e.clone();
    }
    if errors.iter().all(|(_, e)| *e == FillError::NotFound) {
        return FillError::NotFound;
    }
    errors
        .into_iter()
        .rfind(|(_, e)| *e != FillError::NotFound)
        .map(|(_, e)| e)
        .unwrap_or(FillError::NotFound)
}

/// What to fill a blob for.
pub(crate) enum Want<'a> {
    /// A mirrored blob: peers, an owner's fill, the upstream.
    Mirrored(&'a MirrorRef),
    /// A hosted blob of this repository: peers that hold it linked there.
    Hosted(&'a str),
}

/// The sources for a blob missing here, in the order a fill tries them.
pub(crate) async fn plan(
    cluster: Option<&Cluster>,
    want: Want<'_>,
    digest: &Digest,
) -> Vec<Source> {
    let upstream = match &want {
        Want::Mirrored(r) => Some(Source::Upstream((*r).clone())),
        Want::Hosted(_) => None,
    };
    let Some(cluster) = cluster.filter(|c| c.has_peers()) else {
        return upstream.into_iter().collect();
    };
    let key = digest.to_string();
    let candidates = cluster.candidates(key.as_bytes());
    let owners = cluster.owners(key.as_bytes());
    let me = cluster.local().name;
    let repo_filter = match &want {
        Want::Hosted(repo) => Some(repo.to_string()),
        // Mirrored content is the same whichever cache repository holds it; the digest is
        // verified either way.
        Want::Mirrored(_) => None,
    };
    let answers = ask_holders(
        cluster,
        &candidates,
        &owners,
        digest,
        repo_filter.as_deref(),
    )
    .await;
    let mut holders: Vec<(bool, usize, NodeId)> = Vec::new();
    let mut reachable: Vec<String> = Vec::new();
    for (i, node) in candidates.iter().enumerate() {
        match answers.iter().find(|(n, _)| n == &node.name) {
            Some((_, Ok(Some(h)))) => {
                reachable.push(node.name.clone());
                holders.push((!h.local, i, node.clone()));
            }
            Some((_, Ok(None))) => reachable.push(node.name.clone()),
            _ => {}
        }
    }
    // Complete copies first, then fills in progress; each in candidate order.
    holders.sort_by_key(|(filling, i, _)| (*filling, *i));
    let mut sources: Vec<Source> = holders
        .into_iter()
        .map(|(_, _, node)| Source::Peer {
            node,
            repo: repo_filter.clone(),
            fill: None,
        })
        .collect();
    if let (Want::Mirrored(r), true) = (&want, sources.is_empty()) {
        // Nobody has it: the first owner this node can reach fills it from the upstream,
        // unless this node comes first (then it fills itself, below).
        for owner in &owners {
            if owner.name == me {
                break;
            }
            if reachable.contains(&owner.name) {
                sources.push(Source::Peer {
                    node: owner.clone(),
                    repo: None,
                    fill: Some((r.upstream_name().to_string(), r.cache_repo.clone())),
                });
                break;
            }
        }
    }
    sources.extend(upstream);
    sources
}

type Answers = Vec<(String, Result<Option<pier_peer::Holding>, PeerError>)>;

/// HEAD every candidate at once. Stops waiting once every answer is in, or once the hedge
/// delay has passed and a holder has answered or every owner has; a hung peer costs at most
/// the quick deadline.
async fn ask_holders(
    cluster: &Cluster,
    candidates: &[NodeId],
    owners: &[NodeId],
    digest: &Digest,
    repo: Option<&str>,
) -> Answers {
    let started = Instant::now();
    let hedge = cluster.client().hedge_delay();
    let mut pending: FuturesUnordered<_> = candidates
        .iter()
        .map(|node| async move {
            (
                node.name.clone(),
                cluster.client().head_blob(node, digest, repo).await,
            )
        })
        .collect();
    let mut answers: Answers = Vec::new();
    let owners_answered = |answers: &Answers| {
        owners
            .iter()
            .filter(|o| candidates.iter().any(|c| c.name == o.name))
            .all(|o| answers.iter().any(|(n, _)| *n == o.name))
    };
    let holder_found = |answers: &Answers| answers.iter().any(|(_, a)| matches!(a, Ok(Some(_))));
    loop {
        let wait = if started.elapsed() >= hedge {
            if holder_found(&answers) || owners_answered(&answers) {
                break;
            }
            Duration::from_millis(10)
        } else {
            hedge - started.elapsed()
        };
        tokio::select! {
            next = pending.next() => match next {
                Some(answer) => answers.push(answer),
                None => break,
            },
            () = tokio::time::sleep(wait) => {}
        }
    }
    answers
}
