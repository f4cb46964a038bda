//! Online garbage collection and integrity checks of the stores.
//!
//! The collector frees blobs that no manifest of any repository references, while pushes and
//! pulls go on. It follows garage's model: a blob is first marked "deletable since T", and
//! only a blob still marked is removed. The order of a run is what makes that safe:
//!
//! 1. list stored blobs older than the grace period (the candidates);
//! 2. mark every candidate deletable since T (one transaction per batch);
//! 3. only then read every manifest's references, and unmark the candidates referenced;
//! 4. sweep each candidate still marked: under the registry's sweep lock (sweep.rs: this
//!    process's, and with shared stores every node's), [`MetaStore::gc_sweep`] unlinks it in
//!    one transaction that first re-checks the mark, then the bytes go.
//!
//! Step 3 is one walk over every manifest (`Registry::each_manifest`, which the check and
//! the untagged-manifest retention page through too). With a retention it prunes first, in
//! the same walk: the manifests of the repositories in its scope are held, those untagged too
//! long are removed, and the prune hands back what it removed, so only the references of
//! what is left stay without the manifests being read again.
//!
//! A manifest put before step 2 committed is seen by step 3; one put after it clears the
//! marks of what it references in its own transaction ([`MetaStore::put_manifest`]), as does
//! linking a blob (an upload's commit, a mount). The registry's writes that check links and
//! then rely on the bytes (an upload's commit and link, a mount, a manifest put's check and
//! store) hold the sweep lock shared, so a sweep never falls between their check and their
//! write: a push that raced the collector either finds its blob linked (and the mark
//! cleared) or gets `MANIFEST_BLOB_UNKNOWN` and pushes the blob again.
//!
//! The check pages through links, manifests and blobs: every link's bytes must exist with the
//! linked size (a missing one is lost data), references no store holds are reported (normal
//! for mirrored images not pulled in full), stored blobs that nothing links are reported (the
//! collector frees them), and a deep check re-hashes every blob, quarantining one whose bytes
//! do not match their digest.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use futures::StreamExt;
use pier_oci::{Digest, Hasher};
use pier_store::blob::{BlobEntry, BlobStore};
use pier_store::{ManifestRecord, MetaStore};
use serde::{Deserialize, Serialize};

use crate::{Registry, Result};

/// Blobs and records read per page while walking the stores.
const PAGE: usize = 1000;

/// Every blob link (repository, digest, size) of every repository, a page at a time, in
/// (repository, digest) order.
struct LinkPages<'a> {
    meta: &'a dyn MetaStore,
    after: Option<(String, Digest)>,
    done: bool,
}

impl<'a> LinkPages<'a> {
    fn new(meta: &'a dyn MetaStore) -> LinkPages<'a> {
        LinkPages {
            meta,
            after: None,
            done: false,
        }
    }

    /// The next page, `None` once every link was handed out.
    async fn next(&mut self) -> Result<Option<Vec<(String, Digest, u64)>>> {
        if self.done {
            return Ok(None);
        }
        let after = self.after.as_ref().map(|(r, d)| (r.as_str(), d));
        let page = self.meta.link_page(after, PAGE).await?;
        let Some((repo, last, _)) = page.last() else {
            self.done = true;
            return Ok(None);
        };
        self.after = Some((repo.clone(), last.clone()));
        self.done = page.len() < PAGE;
        Ok(Some(page))
    }
}

/// Every stored blob, a page at a time, in digest order.
struct BlobPages<'a> {
    blobs: &'a dyn BlobStore,
    after: Option<Digest>,
    done: bool,
}

impl<'a> BlobPages<'a> {
    fn new(blobs: &'a dyn BlobStore) -> BlobPages<'a> {
        BlobPages {
            blobs,
            after: None,
            done: false,
        }
    }

    /// The next page, `None` once every blob was handed out.
    async fn next(&mut self) -> Result<Option<Vec<BlobEntry>>> {
        if self.done {
            return Ok(None);
        }
        let page = self.blobs.list(self.after.as_ref(), PAGE).await?;
        let Some(last) = page.last() else {
            self.done = true;
            return Ok(None);
        };
        self.after = Some(last.digest.clone());
        self.done = page.len() < PAGE;
        Ok(Some(page))
    }
}

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How a collection runs.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Report what would be freed and free nothing.
    pub dry_run: bool,
    /// Blobs written more recently than this are never collected.
    pub grace: Duration,
}

/// Untagged-manifest retention, run by a collection as it reads references
/// ([`Registry::gc_with_retention`]).
#[derive(Clone, Copy)]
pub struct Untagged<'a> {
    /// Manifests untagged and stored longer ago than this go.
    pub older_than: Duration,
    /// The repositories it applies to.
    pub in_scope: &'a (dyn Fn(&str) -> bool + Send + Sync),
}

/// Manifest records of some repositories, by repository, as one walk read them.
type ByRepo = BTreeMap<String, Vec<ManifestRecord>>;

/// What a collection freed (or, in a dry run, would free).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Blobs freed.
    pub blobs: u64,
    /// Bytes freed.
    pub bytes: u64,
    /// Untagged manifests removed (or, in a dry run, that would go) by the retention
    /// [`Registry::gc_with_retention`] was given.
    pub manifests: u64,
    /// Stored blobs looked at.
    pub scanned: u64,
    /// Unreferenced blobs kept because they are younger than the grace period.
    pub young: u64,
    /// Candidates that something wanted again while the collection ran, and so were kept.
    pub rescued: u64,
}

impl Registry {
    /// Collect unreferenced blobs (see the module header for why this is safe while pushes
    /// run).
    pub async fn gc(&self, opts: GcOptions) -> Result<GcReport> {
        self.gc_with_retention(opts, None).await
    }

    /// [`Registry::gc`], with `untagged` first removing the manifests it names (as
    /// [`Registry::prune_untagged`] does) in the walk that reads references, so that what
    /// only they referenced is collected in the same run.
    pub async fn gc_with_retention(
        &self,
        opts: GcOptions,
        untagged: Option<Untagged<'_>>,
    ) -> Result<GcReport> {
        let mut report = GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        };
        let now = unix_ms();
        let cutoff = now.saturating_sub(opts.grace.as_millis() as u64);

        // 1. Candidates: every blob older than the grace period. In a dry run also those the
        //    references below rule out; they are filtered the same way.
        let mut candidates: Vec<BlobEntry> = Vec::new();
        let mut pages = BlobPages::new(&*self.blobs);
        while let Some(page) = pages.next().await? {
            for b in page {
                report.scanned += 1;
                if b.modified_ms <= cutoff {
                    candidates.push(b);
                }
            }
        }

        // 2. Mark them deletable as of `now`, before reading references.
        if !opts.dry_run {
            for chunk in candidates.chunks(PAGE) {
                let digests: Vec<Digest> = chunk.iter().map(|b| b.digest.clone()).collect();
                self.meta.gc_mark(&digests, now).await?;
            }
        }

        // 3. Everything any manifest references stays, once the retention has pruned.
        let (referenced, pruned) = self.referenced(untagged, opts.dry_run).await?;
        report.manifests = pruned;
        let (kept, doomed): (Vec<BlobEntry>, Vec<BlobEntry>) = candidates
            .into_iter()
            .partition(|b| referenced.contains(&b.digest));
        if !opts.dry_run {
            for chunk in kept.chunks(PAGE) {
                let digests: Vec<Digest> = chunk.iter().map(|b| b.digest.clone()).collect();
                self.meta.gc_unmark(&digests).await?;
            }
        }
        report.young = self.count_young_unreferenced(cutoff, &referenced).await?;

        // 4. Sweep what is still marked.
        for b in doomed {
            if opts.dry_run {
                report.blobs += 1;
                report.bytes += b.size;
                continue;
            }
            let _sweep = self.sweep_lock.sweep(&b.digest).await?;
            match self.meta.gc_sweep(&b.digest, now).await? {
                Some(_unlinked) => {
                    if self.blobs.delete(&b.digest).await? {
                        report.blobs += 1;
                        report.bytes += b.size;
                    }
                }
                None => report.rescued += 1,
            }
        }
        if !opts.dry_run && report.blobs > 0 {
            tracing::info!(
                blobs = report.blobs,
                bytes = report.bytes,
                rescued = report.rescued,
                "garbage collected"
            );
        }
        Ok(report)
    }

    /// Untagged-manifest retention: remove manifests of the repositories `in_scope` says
    /// (hosted ones; a mirror's cache has eviction instead) that no tag points at, that were
    /// stored more than `older_than` ago, that no other manifest of their repository names (an
    /// index's children stay while the index does) and whose subject, if they have one, is
    /// gone (a signature stays while what it signs does). Each removal re-checks, in its own
    /// transaction, that the manifest is still untagged and not stored again since
    /// ([`MetaStore::delete_untagged_manifest`]). Returns how many went (or, with `dry_run`,
    /// would go); their blobs are then the collector's.
    ///
    /// [`MetaStore::delete_untagged_manifest`]: pier_store::MetaStore::delete_untagged_manifest
    pub async fn prune_untagged(
        &self,
        older_than: Duration,
        dry_run: bool,
        in_scope: &(dyn Fn(&str) -> bool + Send + Sync),
    ) -> Result<u64> {
        let mut by_repo = ByRepo::new();
        self.each_manifest(|repo, record| {
            if in_scope(&repo) {
                by_repo.entry(repo).or_default().push(record);
            }
        })
        .await?;
        let removed = self.prune(&by_repo, older_than, dry_run).await?;
        Ok(removed.len() as u64)
    }

    /// The retention's decisions over the manifests one walk read: which of `by_repo` go.
    /// Returns the (repository, digest) of each removed (or, with `dry_run`, that would be).
    async fn prune(
        &self,
        by_repo: &ByRepo,
        older_than: Duration,
        dry_run: bool,
    ) -> Result<HashSet<(String, Digest)>> {
        let cutoff = unix_ms().saturating_sub(older_than.as_millis() as u64);
        let mut removed = HashSet::new();
        for (repo, records) in by_repo {
            let present: HashSet<&Digest> = records.iter().map(|r| &r.digest).collect();
            let named: HashSet<&Digest> = records.iter().flat_map(|r| &r.references).collect();
            let tagged = self.tagged(repo).await?;
            for r in records {
                let old = r.stored_ms != 0 && r.stored_ms <= cutoff;
                let wanted = tagged.contains(&r.digest)
                    || named.contains(&r.digest)
                    || r.subject.as_ref().is_some_and(|s| present.contains(s));
                if !old || wanted {
                    continue;
                }
                if dry_run
                    || self
                        .meta
                        .delete_untagged_manifest(repo, &r.digest, cutoff)
                        .await?
                {
                    removed.insert((repo.clone(), r.digest.clone()));
                }
            }
        }
        if !dry_run && !removed.is_empty() {
            tracing::info!(manifests = removed.len(), "untagged manifests removed");
        }
        Ok(removed)
    }

    /// Every manifest a tag of `repo` points at, read a page of tags at a time.
    async fn tagged(&self, repo: &str) -> Result<HashSet<Digest>> {
        let mut tagged = HashSet::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.meta.tag_page(repo, after.as_deref(), PAGE).await?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after = Some(last.clone());
            let full = page.len() == PAGE;
            tagged.extend(page.into_iter().map(|(_, digest)| digest));
            if !full {
                break;
            }
        }
        Ok(tagged)
    }

    /// Every manifest of every repository, in (repository, digest) order, read a page at a
    /// time: the one walk the collector, the retention and the check share.
    async fn each_manifest(&self, mut each: impl FnMut(String, ManifestRecord)) -> Result<()> {
        let mut after: Option<(String, Digest)> = None;
        loop {
            let page = self
                .meta
                .manifest_page(after.as_ref().map(|(r, d)| (r.as_str(), d)), PAGE)
                .await?;
            let Some((repo, last)) = page.last() else {
                break;
            };
            after = Some((repo.clone(), last.digest.clone()));
            let full = page.len() == PAGE;
            for (repo, record) in page {
                each(repo, record);
            }
            if !full {
                break;
            }
        }
        Ok(())
    }

    /// Every digest any manifest of any repository references, and how many manifests
    /// `untagged` pruned first (or, in a dry run, would prune). The manifests of the
    /// repositories in its scope are held until the prune has decided; a removed one's
    /// references do not count. A dry run removes nothing, so all references count.
    async fn referenced(
        &self,
        untagged: Option<Untagged<'_>>,
        dry_run: bool,
    ) -> Result<(HashSet<Digest>, u64)> {
        let mut referenced = HashSet::new();
        let mut scoped = ByRepo::new();
        self.each_manifest(|repo, record| {
            if untagged.is_some_and(|u| (u.in_scope)(&repo)) {
                scoped.entry(repo).or_default().push(record);
            } else {
                referenced.extend(record.references);
            }
        })
        .await?;
        let Some(u) = untagged else {
            return Ok((referenced, 0));
        };
        let removed = self.prune(&scoped, u.older_than, dry_run).await?;
        for (repo, records) in scoped {
            for r in records {
                if dry_run || !removed.contains(&(repo.clone(), r.digest)) {
                    referenced.extend(r.references);
                }
            }
        }
        Ok((referenced, removed.len() as u64))
    }

    /// Unreferenced blobs the grace period protects (for the report only).
    async fn count_young_unreferenced(
        &self,
        cutoff: u64,
        referenced: &HashSet<Digest>,
    ) -> Result<u64> {
        let mut young = 0;
        let mut pages = BlobPages::new(&*self.blobs);
        while let Some(page) = pages.next().await? {
            young += page
                .iter()
                .filter(|b| b.modified_ms > cutoff && !referenced.contains(&b.digest))
                .count() as u64;
        }
        Ok(young)
    }

    /// Check metadata against blobs, and with `deep` every blob's digest (quarantining the
    /// corrupt). `progress` is told each blob's size as the deep pass finishes it.
    pub async fn check(
        &self,
        deep: bool,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<CheckFindings> {
        let mut f = CheckFindings::default();

        // Blob links: the bytes exist, at the linked size.
        let mut linked: HashSet<Digest> = HashSet::new();
        let mut links = LinkPages::new(&*self.meta);
        while let Some(page) = links.next().await? {
            for (repo, digest, size) in page {
                f.links += 1;
                match self.blobs.stat(&digest).await? {
                    Some(s) if s == size => {}
                    Some(s) => f.wrong_size.push(Missing {
                        repo: repo.clone(),
                        digest: digest.to_string(),
                        detail: format!("linked as {size} bytes, {s} stored"),
                    }),
                    None => f.missing_links.push(Missing {
                        repo: repo.clone(),
                        digest: digest.to_string(),
                        detail: "linked, no bytes".into(),
                    }),
                }
                linked.insert(digest);
            }
        }

        // Manifests: what they reference is a manifest of the repository or a stored blob.
        let mut manifests_by_repo: BTreeMap<String, BTreeSet<Digest>> = BTreeMap::new();
        let mut references: Vec<(String, Digest, Digest)> = Vec::new();
        self.each_manifest(|repo, record| {
            f.manifests += 1;
            manifests_by_repo
                .entry(repo.clone())
                .or_default()
                .insert(record.digest.clone());
            for r in record.references {
                references.push((repo.clone(), record.digest.clone(), r));
            }
        })
        .await?;
        for (repo, manifest, r) in &references {
            if manifests_by_repo.get(repo).is_some_and(|m| m.contains(r)) {
                continue;
            }
            if self.blobs.stat(r).await?.is_none() {
                f.unstored_references.push(Missing {
                    repo: repo.clone(),
                    digest: r.to_string(),
                    detail: format!("referenced by {manifest}"),
                });
            }
        }

        // Stored blobs: linked by some repository, and (deep) their bytes match their digest.
        let mut pages = BlobPages::new(&*self.blobs);
        while let Some(page) = pages.next().await? {
            for b in page {
                f.blobs += 1;
                f.bytes += b.size;
                if !linked.contains(&b.digest) {
                    f.unlinked_blobs += 1;
                    f.unlinked_bytes += b.size;
                }
                if deep {
                    let ok = self.verify(&b).await?;
                    progress(b.size);
                    if !ok && self.blobs.quarantine(&b.digest).await? {
                        let users = references
                            .iter()
                            .filter(|(_, _, r)| *r == b.digest)
                            .map(|(repo, m, _)| (repo.clone(), m.to_string()))
                            .collect();
                        f.quarantined.push(Quarantined {
                            digest: b.digest.to_string(),
                            size: b.size,
                            manifests: users,
                            repos: Vec::new(),
                        });
                    }
                }
            }
        }
        // Which repositories linked what was quarantined (to tell mirrored from hosted).
        if !f.quarantined.is_empty() {
            let mut links = LinkPages::new(&*self.meta);
            while let Some(page) = links.next().await? {
                for (repo, digest, _) in page {
                    let d = digest.to_string();
                    if let Some(q) = f.quarantined.iter_mut().find(|q| q.digest == d) {
                        q.repos.push(repo);
                    }
                }
            }
        }
        Ok(f)
    }

    /// Whether a stored blob's bytes hash to its digest.
    async fn verify(&self, b: &BlobEntry) -> Result<bool> {
        let mut stream = match self.blobs.read(&b.digest, 0, b.size).await {
            Ok(s) => s,
            // Collected or evicted since the listing: nothing left to verify.
            Err(pier_store::StoreError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(true)
            }
            Err(e) => return Err(e.into()),
        };
        let mut h = Hasher::new(b.digest.algorithm());
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => h.update(&c),
                // A blob that cannot be read to its end is as bad as a corrupt one.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
                Err(e) => return Err(pier_store::StoreError::Io(e).into()),
            }
        }
        Ok(h.finish() == b.digest)
    }
}

/// A link or reference whose bytes are not where they should be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Missing {
    pub repo: String,
    pub digest: String,
    pub detail: String,
}

/// A blob a deep check moved aside, and who used it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub digest: String,
    pub size: u64,
    /// Repositories that linked it.
    pub repos: Vec<String>,
    /// (repository, manifest digest) of every manifest that references it.
    pub manifests: Vec<(String, String)>,
}

/// What [`Registry::check`] found; the server turns it into named pass/warn/fail results.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckFindings {
    pub links: u64,
    pub manifests: u64,
    pub blobs: u64,
    pub bytes: u64,
    /// Links whose bytes are gone.
    pub missing_links: Vec<Missing>,
    /// Links whose bytes have another size than linked.
    pub wrong_size: Vec<Missing>,
    /// References that are neither a manifest of the repository nor a stored blob.
    pub unstored_references: Vec<Missing>,
    /// Stored blobs no repository links.
    pub unlinked_blobs: u64,
    pub unlinked_bytes: u64,
    /// Blobs whose bytes did not match their digest (deep only), now out of the store.
    pub quarantined: Vec<Quarantined>,
}
