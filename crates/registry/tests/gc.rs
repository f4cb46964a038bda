//! Garbage collection at the registry level, over the real filesystem blob store and redb, or
//! with `PIER_TEST_BACKEND=s3pg` over S3 and PostgreSQL: a deleted manifest's blobs are freed
//! after the grace period, and a collector running without grace beside pushes never leaves a
//! manifest whose blob is gone. On S3 + PostgreSQL the collector runs on a second node sharing
//! the stores, as in a highly available deployment.

#[path = "../../store/tests/support/backend.rs"]
mod backend;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use pier_oci::{Digest, Reference, RepoName};
use pier_registry::upload::ChunkInfo;
use pier_registry::{GcOptions, Limits, Registry, RegistryError};
use pier_store::ByteStream;

fn body(data: Vec<u8>) -> ByteStream {
    Box::pin(futures::stream::iter(vec![Ok(Bytes::from(data))]))
}

/// A registry, and the guard of its stores to keep while it is used.
async fn registry(dir: &std::path::Path) -> (Arc<Registry>, backend::Guard) {
    let (blobs, meta, guard) = backend::stores(dir).await;
    (
        Arc::new(Registry::new(blobs, meta, Limits::default())),
        guard,
    )
}

/// Two nodes: on S3 + PostgreSQL two registries sharing one key prefix and one database; on
/// the filesystem (one process's own stores) the same registry twice.
async fn two_nodes(dir: &std::path::Path) -> (Arc<Registry>, Arc<Registry>, backend::Guard) {
    if !backend::s3pg() {
        let (r, guard) = registry(dir).await;
        return (r.clone(), r, guard);
    }
    let shared = backend::Shared::new().await;
    let mut nodes = Vec::new();
    for name in ["a", "b"] {
        let (blobs, meta) = shared.open(&dir.join(name)).await;
        nodes.push(Arc::new(Registry::new(blobs, meta, Limits::default())));
    }
    let b = nodes.pop().expect("b");
    (nodes.pop().expect("a"), b, Some(shared))
}

fn manifest(config: &Digest, config_len: usize, layer: &Digest, layer_len: usize) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config.to_string(), "size": config_len},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer.to_string(), "size": layer_len}],
        })
        .to_string(),
    )
}

async fn read_all(r: &Registry, repo: &RepoName, d: &Digest) -> Result<Vec<u8>, RegistryError> {
    let size = r.blob_size(repo, d).await?;
    let mut s = r.read_blob(d, 0, size).await?;
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.expect("read"));
    }
    Ok(out)
}

/// Upload through a session (POST, PATCH, PUT) as clients push layers.
async fn upload(r: &Registry, repo: &RepoName, data: &[u8]) -> Result<Digest, RegistryError> {
    let d = Digest::sha256(data);
    let s = r.uploads().start(repo, "test").await?;
    r.uploads()
        .append(repo, &s.id, ChunkInfo::default(), body(data.to_vec()))
        .await?;
    r.uploads().finish(repo, &s.id, &d, None).await?;
    Ok(d)
}

#[tokio::test]
async fn a_deleted_manifests_blobs_are_freed_after_the_grace_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (r, _db) = registry(dir.path()).await;
    let repo: RepoName = "team/app".parse().unwrap();
    let config = b"{\"architecture\":\"amd64\"}".to_vec();
    let layer = vec![7u8; 100_000];
    let kept_layer = vec![9u8; 5_000];
    let c = upload(&r, &repo, &config).await.unwrap();
    let l = upload(&r, &repo, &layer).await.unwrap();
    let k = upload(&r, &repo, &kept_layer).await.unwrap();
    let gone = r
        .put_manifest(
            &repo,
            &"v1".parse().unwrap(),
            None,
            manifest(&c, config.len(), &l, layer.len()),
        )
        .await
        .unwrap();
    r.put_manifest(
        &repo,
        &"v2".parse().unwrap(),
        None,
        manifest(&c, config.len(), &k, kept_layer.len()),
    )
    .await
    .unwrap();
    r.delete_manifest(&repo, &Reference::Digest(gone.digest))
        .await
        .unwrap();

    // Within the grace period nothing goes.
    let young = r
        .gc(GcOptions {
            dry_run: false,
            grace: Duration::from_secs(3600),
        })
        .await
        .unwrap();
    assert_eq!((young.blobs, young.bytes, young.young), (0, 0, 1));
    assert_eq!(read_all(&r, &repo, &l).await.unwrap(), layer);

    let plan = r
        .gc(GcOptions {
            dry_run: true,
            grace: Duration::ZERO,
        })
        .await
        .unwrap();
    assert_eq!((plan.blobs, plan.bytes), (1, layer.len() as u64));
    assert_eq!(
        read_all(&r, &repo, &l).await.unwrap(),
        layer,
        "a dry run frees nothing"
    );

    let done = r
        .gc(GcOptions {
            dry_run: false,
            grace: Duration::ZERO,
        })
        .await
        .unwrap();
    assert_eq!((done.blobs, done.bytes), (1, layer.len() as u64));
    assert!(matches!(
        read_all(&r, &repo, &l).await,
        Err(RegistryError::BlobUnknown)
    ));
    // The image still tagged keeps its layer and the shared config.
    assert_eq!(read_all(&r, &repo, &k).await.unwrap(), kept_layer);
    assert_eq!(read_all(&r, &repo, &c).await.unwrap(), config);
    let again = r
        .gc(GcOptions {
            dry_run: false,
            grace: Duration::ZERO,
        })
        .await
        .unwrap();
    assert_eq!(again.blobs, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_racing_a_collector_without_grace_never_lose_a_referenced_blob() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Pushes go to `r`, the collector runs on `collecting` (the same node on the filesystem).
    let (r, collecting, _db) = two_nodes(dir.path()).await;
    let repo: RepoName = "team/race".parse().unwrap();
    let mut pushed = Vec::new();
    let mut refused = 0;
    let mut freed = 0;
    // Each collection lists the whole bucket on S3: fewer rounds there keep the run short.
    let rounds = if backend::s3pg() { 60 } else { 200 };
    // How long a collection takes here: the manifest put's head start is spread over it.
    let mut span = Duration::from_millis(20);
    for i in 0..rounds {
        let config = format!("{{\"n\":{i}}}").into_bytes();
        let layer: Vec<u8> = (0..20_000u32).map(|j| ((i * 31 + j) % 251) as u8).collect();
        let c = upload(&r, &repo, &config).await.expect("upload config");
        let l = upload(&r, &repo, &layer).await.expect("upload layer");
        let tag: Reference = format!("v{i}").parse().unwrap();
        // The collection and the manifest put start together, on different threads; a
        // small random head start for one or the other moves the overlap around.
        let collector = {
            let r = collecting.clone();
            let delay = Duration::from_micros(u64::from((i * 7919) % 3000));
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let started = std::time::Instant::now();
                let report = r
                    .gc(GcOptions {
                        dry_run: false,
                        grace: Duration::ZERO,
                    })
                    .await
                    .expect("gc");
                (report, started.elapsed())
            })
        };
        let put = {
            let (r, repo, tag) = (r.clone(), repo.clone(), tag.clone());
            let m = manifest(&c, config.len(), &l, layer.len());
            let delay = span.mul_f64(f64::from((i * 104_729) % 1000) / 1000.0);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                r.put_manifest(&repo, &tag, None, m).await
            })
        };
        let ((report, took), put) = (collector.await.unwrap(), put.await.unwrap());
        span = span.max(took);
        freed += report.blobs;
        match put {
            Ok(_) => {
                // Pullable, with the right bytes, whatever the collector did.
                assert_eq!(read_all(&r, &repo, &l).await.expect("layer"), layer);
                assert_eq!(read_all(&r, &repo, &c).await.expect("config"), config);
                pushed.push((tag, c, config, l, layer));
            }
            Err(RegistryError::ManifestBlobUnknown(_)) => {
                refused += 1;
                // The client's answer to that: push the blobs again, then the manifest.
                upload(&r, &repo, &config).await.expect("upload config");
                upload(&r, &repo, &layer).await.expect("upload layer");
                r.put_manifest(
                    &repo,
                    &tag,
                    None,
                    manifest(&c, config.len(), &l, layer.len()),
                )
                .await
                .expect("the retried push");
                pushed.push((tag, c, config, l, layer));
            }
            Err(e) => panic!("push {i} failed uncleanly: {e}"),
        }
    }
    eprintln!(
        "{rounds} pushes: {} refused with MANIFEST_BLOB_UNKNOWN and pushed again; the collections \
         freed {freed} blobs",
        refused
    );
    // One more collection, then every pushed image is whole.
    collecting
        .gc(GcOptions {
            dry_run: false,
            grace: Duration::ZERO,
        })
        .await
        .unwrap();
    for (tag, c, config, l, layer) in &pushed {
        r.manifest(&repo, tag).await.expect("manifest");
        assert_eq!(read_all(&r, &repo, l).await.expect("layer"), *layer);
        assert_eq!(read_all(&r, &repo, c).await.expect("config"), *config);
    }
    assert_eq!(pushed.len(), rounds as usize);
}

/// A manifest (as the registry stores it) over `config` and `layer`, with an optional subject.
fn manifest_with_subject(
    config: &Digest,
    config_len: usize,
    layer: &Digest,
    layer_len: usize,
    subject: &Digest,
    subject_len: usize,
) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.example.signature",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config.to_string(), "size": config_len},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer.to_string(), "size": layer_len}],
            "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": subject.to_string(), "size": subject_len},
        })
        .to_string(),
    )
}

/// Untagged-manifest retention: a manifest whose tag moved on, and an untagged index, go once
/// older than the retention (their layers with the next collection), the index's child with
/// the pass after; the tagged manifest, a signature of it and an untagged manifest younger
/// than the retention stay; a dry run removes nothing; repositories out of scope are left
/// alone.
#[tokio::test]
async fn untagged_manifests_past_the_retention_go_and_what_is_wanted_stays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (r, _db) = registry(dir.path()).await;
    let repo: RepoName = "team/app".parse().unwrap();
    let config = b"{\"architecture\":\"amd64\"}".to_vec();
    let (old_layer, new_layer, sig_layer) = (vec![1u8; 3000], vec![2u8; 4000], vec![3u8; 50]);
    let c = upload(&r, &repo, &config).await.unwrap();
    let l1 = upload(&r, &repo, &old_layer).await.unwrap();
    let l2 = upload(&r, &repo, &new_layer).await.unwrap();
    let ls = upload(&r, &repo, &sig_layer).await.unwrap();
    let v1: Reference = "v1".parse().unwrap();
    let old = r
        .put_manifest(
            &repo,
            &v1,
            None,
            manifest(&c, config.len(), &l1, old_layer.len()),
        )
        .await
        .unwrap();
    let new_bytes = manifest(&c, config.len(), &l2, new_layer.len());
    let new = r
        .put_manifest(&repo, &v1, None, new_bytes.clone())
        .await
        .unwrap();
    let sig_bytes = manifest_with_subject(
        &c,
        config.len(),
        &ls,
        sig_layer.len(),
        &new.digest,
        new_bytes.len(),
    );
    let sig_digest = Digest::sha256(&sig_bytes);
    r.put_manifest(
        &repo,
        &Reference::Digest(sig_digest.clone()),
        None,
        sig_bytes,
    )
    .await
    .unwrap();
    // An untagged index naming an untagged child: the child stays while the index does.
    let child_layer = vec![5u8; 700];
    let lc = upload(&r, &repo, &child_layer).await.unwrap();
    let child_bytes = manifest(&c, config.len(), &lc, child_layer.len());
    let child = Digest::sha256(&child_bytes);
    r.put_manifest(
        &repo,
        &Reference::Digest(child.clone()),
        None,
        child_bytes.clone(),
    )
    .await
    .unwrap();
    let index_bytes = Bytes::from(
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": child.to_string(), "size": child_bytes.len(),
                           "platform": {"architecture": "amd64", "os": "linux"}}],
        })
        .to_string(),
    );
    let index = Digest::sha256(&index_bytes);
    r.put_manifest(&repo, &Reference::Digest(index.clone()), None, index_bytes)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Stored just now: younger than the retention.
    let young_layer = vec![4u8; 10];
    let ly = upload(&r, &repo, &young_layer).await.unwrap();
    let young_bytes = manifest(&c, config.len(), &ly, young_layer.len());
    let young = Digest::sha256(&young_bytes);
    r.put_manifest(&repo, &Reference::Digest(young.clone()), None, young_bytes)
        .await
        .unwrap();

    let everything = |_: &str| true;
    let nothing = |_: &str| false;
    let retention = Duration::from_secs(1);
    let pruned = r.prune_untagged(retention, false, &nothing).await.unwrap();
    assert_eq!(pruned, 0, "out of scope");
    let planned = r
        .prune_untagged(retention, true, &everything)
        .await
        .unwrap();
    assert_eq!(
        planned, 2,
        "a dry run counts the old manifest and the index"
    );
    let still = r
        .manifest(&repo, &Reference::Digest(old.digest.clone()))
        .await;
    still.expect("a dry run removes nothing");
    let pruned = r
        .prune_untagged(retention, false, &everything)
        .await
        .unwrap();
    assert_eq!(pruned, 2);
    for gone in [&old.digest, &index] {
        let got = r.manifest(&repo, &Reference::Digest(gone.clone())).await;
        assert!(matches!(got, Err(RegistryError::ManifestUnknown)), "{gone}");
    }
    let got = r.manifest(&repo, &Reference::Digest(child.clone())).await;
    got.expect("the index's child stays while the index does");
    let pruned = r
        .prune_untagged(retention, false, &everything)
        .await
        .unwrap();
    assert_eq!(pruned, 1, "then it goes too");
    for kept in [&new.digest, &sig_digest, &young] {
        let got = r.manifest(&repo, &Reference::Digest(kept.clone())).await;
        got.unwrap_or_else(|e| panic!("{kept} stays: {e}"));
    }
    r.manifest(&repo, &v1)
        .await
        .expect("the tag still resolves");
    let report = r
        .gc(GcOptions {
            dry_run: false,
            grace: Duration::ZERO,
        })
        .await
        .unwrap();
    let freed = (old_layer.len() + child_layer.len()) as u64;
    assert_eq!((report.blobs, report.bytes), (2, freed));
    let got = read_all(&r, &repo, &l1).await;
    assert!(matches!(got, Err(RegistryError::BlobUnknown)));
    for (d, want) in [(&l2, &new_layer), (&ls, &sig_layer), (&ly, &young_layer)] {
        assert_eq!(read_all(&r, &repo, d).await.unwrap(), *want);
    }
}

/// A manifest put checks the bytes behind its blobs' links, not only the links: a link left
/// without bytes (a write that linked outside the sweep lock just after a sweep took the
/// blob) gets MANIFEST_BLOB_UNKNOWN, so the client pushes the blob again, instead of an
/// acknowledged image with a layer nobody can pull.
#[tokio::test]
async fn a_manifest_put_refuses_a_blob_linked_without_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (r, _db) = registry(dir.path()).await;
    let repo: RepoName = "team/app".parse().unwrap();
    let config = b"{}".to_vec();
    let layer = vec![8u8; 2048];
    let c = upload(&r, &repo, &config).await.unwrap();
    let l = upload(&r, &repo, &layer).await.unwrap();
    assert!(
        r.blob_store().delete(&l).await.unwrap(),
        "the bytes go, the link stays"
    );
    let tag: Reference = "v1".parse().unwrap();
    let m = manifest(&c, config.len(), &l, layer.len());
    match r.put_manifest(&repo, &tag, None, m.clone()).await {
        Err(RegistryError::ManifestBlobUnknown(d)) => assert_eq!(d, l),
        other => panic!("a layer without bytes was accepted: {other:?}"),
    }
    upload(&r, &repo, &layer).await.unwrap();
    r.put_manifest(&repo, &tag, None, m)
        .await
        .expect("pushed again, accepted");
    assert_eq!(read_all(&r, &repo, &l).await.unwrap(), layer);
}
