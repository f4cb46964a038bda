//! The bounded cache: when the blob store holds more than `[cache] max_size` (or the disk has
//! less free than `[cache] min_free`), mirrored blobs are evicted least recently used first
//! until the store is at 90 % of the bound. Never evicted: a blob any hosted repository links
//! or any hosted manifest references, a blob of a pinned image (pins of pull rules and of
//! `[cache] pins`), a blob being read. Manifests stay (they are small and live in the
//! metadata database): a pull of an evicted image finds its manifest and fetches the blobs
//! again. Access times are flushed to the metadata store on every pass.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::Json;
use pier_oci::{Digest, ErrorCode, Reference, Route};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::error::ApiError;
use crate::AppState;

/// Who holds a pin made by `pier pin`.
pub const CLI_HOLDER: &str = "cli";

/// `[cache]` as the server uses it.
#[derive(Debug, Clone, Default)]
pub struct CacheSettings {
    /// Bytes the blob store may hold before mirrored blobs are evicted.
    pub max_bytes: Option<u64>,
    /// Free bytes the data directory's disk keeps; below it mirrored blobs are evicted.
    pub min_free: Option<u64>,
    /// Images always kept, as `repository@digest` or `repository:tag` of cached repositories.
    pub pins: Vec<String>,
    /// How often the bound is checked (besides at once when a fill would pass it).
    pub every: Duration,
}

/// Records read per page while walking the stores.
const PAGE: usize = 1000;

/// What one eviction pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Evicted {
    pub blobs: u64,
    pub bytes: u64,
    /// Blobs skipped because a reader held them or something wanted them again.
    pub kept: u64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How many bytes to free now, if any, with `stored` bytes in the blob store, `free` on its
/// disk (when measured) and `reserved` on their way in (the fills in flight): enough that the
/// store with what is coming is at 90 % of `max_bytes`, and that free space once it has come
/// is 10 % above `min_free`. Reserved bytes a fill has written already are counted against
/// free space twice, which errs towards evicting a little more.
fn excess(s: &CacheSettings, stored: u64, free: Option<u64>, reserved: u64) -> u64 {
    let mut need = 0;
    if let Some(max) = s.max_bytes {
        let coming = stored + reserved;
        if coming > max {
            need = coming - max / 10 * 9;
        }
    }
    if let (Some(floor), Some(free)) = (s.min_free, free) {
        if free < floor + reserved {
            need = need.max(floor + reserved - free + floor / 10);
        }
    }
    need
}

/// [`excess`] of the node now.
fn excess_now(state: &AppState) -> u64 {
    excess(
        &state.cache,
        state.registry.blob_store().stats().bytes,
        state.space.as_ref().map(|s| s.state().free_bytes),
        state.mirror.as_ref().map_or(0, |m| m.reserved_bytes()),
    )
}

/// What fills poke: a pass starts at once when a fill is admitted (or ends) with the store
/// past its bound, counting what the fills in flight will add.
struct Bound {
    settings: Arc<CacheSettings>,
    registry: Arc<pier_registry::Registry>,
    space: Option<Arc<pier_store::Space>>,
    wake: Arc<Notify>,
}

impl pier_mirror::room::Room for Bound {
    fn changed(&self, reserved: u64) {
        let stored = self.registry.blob_store().stats().bytes;
        let free = self.space.as_ref().map(|s| s.state().free_bytes);
        if excess(&self.settings, stored, free, reserved) > 0 {
            // One stored permit: pokes while a pass runs make one more pass, not many.
            self.wake.notify_one();
        }
    }
}

/// One pass: evict until under the bound (or nothing evictable is left).
pub async fn evict_once(state: &AppState) -> Result<Evicted, pier_registry::RegistryError> {
    let registry = &state.registry;
    if let Err(e) = registry.flush_access().await {
        tracing::warn!(error = %e, "flushing blob access times failed");
    }
    let mut done = Evicted::default();
    let need = excess_now(state);
    if need == 0 {
        return Ok(done);
    }
    let meta = registry.meta_store();
    let cache_repo = |repo: &str| crate::gc::is_cache_repo(state, repo);

    // Pinned manifests: the pull rules' and `pier pin`'s, and the configured ones (tags
    // resolved now).
    let mut pinned: HashSet<(String, Digest)> = HashSet::new();
    if let Some(pins) = &state.pins {
        match pins.pins().await {
            Ok(pins) => {
                for p in pins {
                    if let Ok(d) = p.digest.parse() {
                        pinned.insert((p.repo, d));
                    }
                }
            }
            Err(e) => {
                // Without knowing the pins nothing may go.
                tracing::warn!(error = %e, "cannot read pins; not evicting");
                return Ok(done);
            }
        }
    }
    for pin in &state.cache.pins {
        if let Some((repo, d)) = pin.split_once('@') {
            if let Ok(d) = d.parse() {
                pinned.insert((repo.to_string(), d));
            }
        } else if let Some((repo, tag)) = pin.rsplit_once(':') {
            if let Ok(Some(d)) = meta.resolve_tag(repo, tag).await {
                pinned.insert((repo.to_string(), d));
            }
        }
    }

    // Every manifest's references; hosted and pinned ones (and a pinned index's children)
    // protect what they reference.
    let mut references: HashMap<(String, Digest), Vec<Digest>> = HashMap::new();
    let mut after: Option<(String, Digest)> = None;
    loop {
        let page = meta
            .manifest_page(after.as_ref().map(|(r, d)| (r.as_str(), d)), PAGE)
            .await?;
        let Some((repo, last)) = page.last() else {
            break;
        };
        after = Some((repo.clone(), last.digest.clone()));
        let full = page.len() == PAGE;
        for (repo, record) in page {
            references.insert((repo, record.digest), record.references);
        }
        if !full {
            break;
        }
    }
    let mut protected: HashSet<Digest> = HashSet::new();
    let mut stack: Vec<(String, Digest)> = references
        .keys()
        .filter(|(repo, _)| !cache_repo(repo))
        .cloned()
        .chain(pinned.iter().cloned())
        .collect();
    let mut seen: HashSet<(String, Digest)> = HashSet::new();
    while let Some(key) = stack.pop() {
        if !seen.insert(key.clone()) {
            continue;
        }
        protected.insert(key.1.clone());
        if let Some(refs) = references.get(&key) {
            for r in refs {
                protected.insert(r.clone());
                let child = (key.0.clone(), r.clone());
                if references.contains_key(&child) {
                    stack.push(child);
                }
            }
        }
    }

    // Blobs only cache repositories link, and nothing protects.
    let mut hosted_linked: HashSet<Digest> = HashSet::new();
    let mut cached: HashSet<Digest> = HashSet::new();
    let mut after: Option<(String, Digest)> = None;
    loop {
        let page = meta
            .link_page(after.as_ref().map(|(r, d)| (r.as_str(), d)), PAGE)
            .await?;
        let Some((repo, last, _)) = page.last() else {
            break;
        };
        after = Some((repo.clone(), last.clone()));
        let full = page.len() == PAGE;
        for (repo, digest, _) in page {
            if cache_repo(&repo) {
                cached.insert(digest);
            } else {
                hosted_linked.insert(digest);
            }
        }
        if !full {
            break;
        }
    }
    let mut candidates: Vec<(Digest, u64, u64)> = Vec::new();
    let mut after: Option<Digest> = None;
    loop {
        let page = registry.blob_store().list(after.as_ref(), PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.digest.clone());
        let full = page.len() == PAGE;
        let mine: Vec<_> = page
            .into_iter()
            .filter(|b| {
                cached.contains(&b.digest)
                    && !hosted_linked.contains(&b.digest)
                    && !protected.contains(&b.digest)
            })
            .collect();
        let digests: Vec<Digest> = mine.iter().map(|b| b.digest.clone()).collect();
        let times = registry.last_access(&digests).await?;
        for (b, t) in mine.into_iter().zip(times) {
            candidates.push((b.digest, b.size, t.unwrap_or(b.modified_ms)));
        }
        if !full {
            break;
        }
    }
    candidates.sort_by_key(|(_, _, t)| *t);

    // Mark them all, then evict oldest first; anything that wants a blob again in the
    // meantime clears its mark and keeps it.
    let mark = unix_ms();
    for chunk in candidates.chunks(PAGE) {
        let digests: Vec<Digest> = chunk.iter().map(|(d, _, _)| d.clone()).collect();
        meta.gc_mark(&digests, mark).await?;
    }
    let mut left = Vec::new();
    for (digest, size, _) in candidates {
        if done.bytes >= need {
            left.push(digest);
            continue;
        }
        if registry.evict_blob(&digest, mark).await? {
            done.blobs += 1;
            done.bytes += size;
        } else {
            done.kept += 1;
        }
    }
    for chunk in left.chunks(PAGE) {
        meta.gc_unmark(chunk).await?;
    }
    state.metrics.cache_evicted_blobs.inc_by(done.blobs);
    state.metrics.cache_evicted_bytes.inc_by(done.bytes);
    if done.blobs > 0 {
        tracing::info!(
            blobs = done.blobs,
            bytes = done.bytes,
            kept = done.kept,
            "evicted cached blobs"
        );
    }
    Ok(done)
}

/// Check the bound every `[cache]` interval, and at once when a fill would take the store
/// past it, until the process ends. One pass at a time.
pub fn run(state: AppState) {
    let wake = Arc::new(Notify::new());
    let bounded = state.cache.max_bytes.is_some() || state.cache.min_free.is_some();
    if let (Some(mirror), true) = (&state.mirror, bounded) {
        mirror.set_room(Arc::new(Bound {
            settings: state.cache.clone(),
            registry: state.registry.clone(),
            space: state.space.clone(),
            wake: wake.clone(),
        }));
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(state.cache.every.max(Duration::from_secs(1)));
        loop {
            let trigger = tokio::select! {
                _ = tick.tick() => "timer",
                () = wake.notified() => "fill",
            };
            state
                .metrics
                .cache_passes
                .get_or_create(&crate::metrics::TriggerLabels { trigger })
                .inc();
            if let Err(e) = evict_once(&state).await {
                tracing::warn!(error = %e, "cache eviction failed");
            }
        }
    });
}

#[derive(Debug, Deserialize)]
pub struct PinRequest {
    /// An image as clients pull it through this node (`docker.io/library/alpine:3.20`,
    /// `team/app@sha256:…`).
    pub image: String,
}

/// The answer of a pin or unpin: what is (or was) pinned.
#[derive(Debug, Serialize, Deserialize)]
pub struct PinAnswer {
    pub repo: String,
    pub digest: String,
    /// For an unpin: whether `pier pin` held it.
    #[serde(default)]
    pub changed: bool,
}

/// The stored repository and manifest digest an image names here.
async fn resolve(state: &AppState, image: &str) -> Result<(String, Digest), ApiError> {
    let (name, reference) = crate::warm::parse_image(image)?;
    let route = Route::Manifest {
        name: name.clone(),
        reference: reference.clone(),
    };
    let repo =
        match crate::mirror::target(state, &route, &Method::GET, &crate::respond::Query::empty())
            .await?
        {
            Some(r) => r.cache_repo,
            None => name.to_string(),
        };
    let digest = match reference {
        Reference::Digest(d) => d,
        Reference::Tag(t) => state
            .registry
            .meta_store()
            .resolve_tag(&repo, t.as_str())
            .await
            .map_err(pier_registry::RegistryError::from)?
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    ErrorCode::ManifestUnknown,
                    format!(
                        "{image} is not stored here (as {repo}); pull it (or pier warm it) first"
                    ),
                )
            })?,
    };
    Ok((repo, digest))
}

fn pin_store(state: &AppState) -> Result<&Arc<dyn pier_store::PinStore>, ApiError> {
    state.pins.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            ErrorCode::Unsupported,
            "this node keeps no pins",
        )
    })
}

/// `POST /api/v1/pin {"image": …}`: keep an image from eviction until it is unpinned.
pub async fn pin(
    State(state): State<AppState>,
    Json(req): Json<PinRequest>,
) -> Result<Json<PinAnswer>, ApiError> {
    let pins = pin_store(&state)?.clone();
    let (repo, digest) = resolve(&state, &req.image).await?;
    pins.pin(&repo, &digest, CLI_HOLDER)
        .await
        .map_err(pier_registry::RegistryError::from)?;
    Ok(Json(PinAnswer {
        repo,
        digest: digest.to_string(),
        changed: true,
    }))
}

/// `POST /api/v1/unpin {"image": …}`: drop `pier pin`'s pin (pull rules' pins stay).
pub async fn unpin(
    State(state): State<AppState>,
    Json(req): Json<PinRequest>,
) -> Result<Json<PinAnswer>, ApiError> {
    let pins = pin_store(&state)?.clone();
    let (repo, digest) = resolve(&state, &req.image).await?;
    let changed = pins
        .unpin(&repo, &digest, CLI_HOLDER)
        .await
        .map_err(pier_registry::RegistryError::from)?;
    Ok(Json(PinAnswer {
        repo,
        digest: digest.to_string(),
        changed,
    }))
}
