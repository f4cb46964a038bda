//! The S3 blob store and the PostgreSQL metadata store against real servers: the ones
//! scripts/storage-services.sh starts (`PIER_TEST_S3_ENDPOINT`, `PIER_TEST_S3_BUCKET`,
//! `PIER_TEST_PG_URL`). Without them each test says SKIPPED and passes.
//!
//! Two store values on one bucket prefix (or one database) stand for two pier nodes.

#[path = "support/backend.rs"]
mod backend;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use pier_oci::{Digest, Hasher};
use pier_store::{
    BlobStore, ByteStream, ManifestRecord, MetaEvent, MetaStore, PgMetaStore, PinStore,
    S3BlobStore, S3Options, StoreError, UploadRecord,
};

fn s3_env() -> Option<(String, String)> {
    match (
        std::env::var("PIER_TEST_S3_ENDPOINT"),
        std::env::var("PIER_TEST_S3_BUCKET"),
    ) {
        (Ok(e), Ok(b)) => Some((e, b)),
        _ => {
            eprintln!("SKIPPED: PIER_TEST_S3_ENDPOINT / PIER_TEST_S3_BUCKET not set (scripts/storage-services.sh)");
            None
        }
    }
}

fn pg_env() -> Option<String> {
    match std::env::var("PIER_TEST_PG_URL") {
        Ok(u) => Some(u),
        Err(_) => {
            eprintln!("SKIPPED: PIER_TEST_PG_URL not set (scripts/storage-services.sh)");
            None
        }
    }
}

async fn s3(endpoint: &str, bucket: &str, prefix: &str, dir: &std::path::Path) -> Arc<S3BlobStore> {
    let options = S3Options {
        bucket: bucket.into(),
        endpoint: Some(endpoint.into()),
        region: Some("us-east-1".into()),
        path_style: true,
        prefix: prefix.into(),
        access_key_id: Some("pier-test".into()),
        secret_access_key: Some("pier-test".into()),
        redirect: Some(Duration::from_secs(60)),
        ..S3Options::default()
    };
    S3BlobStore::open(options, dir.join(uuid::Uuid::new_v4().to_string()))
        .await
        .expect("open the S3 store")
}

fn body(data: &[u8], piece: usize) -> ByteStream {
    let pieces: Vec<std::io::Result<Bytes>> = data
        .chunks(piece.max(1))
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Box::pin(futures::stream::iter(pieces))
}

async fn read_all(store: &dyn BlobStore, d: &Digest, start: u64, end: u64) -> Vec<u8> {
    let mut s = store.read(d, start, end).await.expect("read");
    let mut out = Vec::new();
    while let Some(b) = s.next().await {
        out.extend_from_slice(&b.expect("read chunk"));
    }
    out
}

/// Bytes that are not all alike, `n` long.
fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

#[tokio::test]
async fn s3_put_verifies_before_anything_is_visible_and_reads_ranges() {
    let Some((endpoint, bucket)) = s3_env() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("t-{}/", uuid::Uuid::new_v4().simple());
    let store = s3(&endpoint, &bucket, &prefix, dir.path()).await;

    // Larger than one multipart part, so the multipart path is the one taken.
    let big = data(9 * 1024 * 1024 + 17, 1);
    let d = Digest::sha256(&big);
    assert_eq!(
        store.stat(&d).await.unwrap(),
        None,
        "absent is None, not an error"
    );
    let (got, size) = store
        .put(Some(&d), body(&big, 64 * 1024), None)
        .await
        .unwrap();
    assert_eq!((got, size), (d.clone(), big.len() as u64));
    assert_eq!(store.stat(&d).await.unwrap(), Some(big.len() as u64));
    assert_eq!(read_all(&*store, &d, 0, big.len() as u64).await, big);
    assert_eq!(read_all(&*store, &d, 100, 5000).await, &big[100..5000]);
    assert_eq!(store.stats().blobs, 1);

    // A wrong digest, large and small: refused, and nothing appears under either digest.
    let other = data(6 * 1024 * 1024, 2);
    let claimed = Digest::sha256(b"something else");
    let e = store
        .put(Some(&claimed), body(&other, 1 << 20), None)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::DigestMismatch { .. }), "{e}");
    assert_eq!(store.stat(&claimed).await.unwrap(), None);
    let e = store
        .put(Some(&claimed), body(b"tiny", 2), None)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::DigestMismatch { .. }), "{e}");
    assert_eq!(store.stat(&claimed).await.unwrap(), None);

    // Over the limit: refused.
    let e = store
        .put(None, body(&other, 4096), Some(1000))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::TooLarge { limit: 1000 }), "{e}");

    // No digest given: computed, stored under it.
    let (d2, _) = store.put(None, body(b"hello", 2), None).await.unwrap();
    assert_eq!(d2, Digest::sha256(b"hello"));
    assert_eq!(read_all(&*store, &d2, 0, 5).await, b"hello");

    // A presigned URL serves the bytes without credentials.
    let url = store
        .redirect_url(&d2)
        .await
        .unwrap()
        .expect("redirects are on");
    let fetched = reqwest::get(&url).await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.bytes().await.unwrap().as_ref(), b"hello");

    assert!(store.delete(&d2).await.unwrap());
    assert!(!store.delete(&d2).await.unwrap());
    assert_eq!(store.stat(&d2).await.unwrap(), None);

    // A second store on the same prefix (another node) counts what is there.
    let again = s3(&endpoint, &bucket, &prefix, dir.path()).await;
    assert_eq!(again.stats().blobs, 1);
    assert_eq!(again.stats().bytes, big.len() as u64);
}

#[tokio::test]
async fn s3_upload_chunks_may_reach_different_nodes_and_unacknowledged_bytes_are_cut() {
    let Some((endpoint, bucket)) = s3_env() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("t-{}/", uuid::Uuid::new_v4().simple());
    let a = s3(&endpoint, &bucket, &prefix, dir.path()).await;
    let b = s3(&endpoint, &bucket, &prefix, dir.path()).await;

    let whole = data(300_000, 3);
    let d = Digest::sha256(&whole);
    let id = uuid::Uuid::new_v4().to_string();
    a.upload_create(&id).await.unwrap();
    assert_eq!(b.upload_ids().await.unwrap(), std::slice::from_ref(&id));

    let (n1, _) = a
        .upload_append(&id, 0, None, body(&whole[..100_000], 8192), None)
        .await
        .unwrap();
    assert_eq!(n1, 100_000);
    // Node B receives a chunk that breaks off after some bytes, never acknowledged.
    let broken: ByteStream = Box::pin(futures::stream::iter(vec![
        Ok(Bytes::copy_from_slice(&[0xee; 5000])),
        Err(std::io::Error::other("client went away")),
    ]));
    let e = b
        .upload_append(&id, n1, None, broken, None)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Body(_)), "{e}");
    // The same chunk again, properly, on B; then the rest on A.
    let (n2, _) = b
        .upload_append(&id, n1, None, body(&whole[100_000..250_000], 8192), None)
        .await
        .unwrap();
    assert_eq!(n2, 250_000);
    // A chunk written but never acknowledged (its node died before the offset moved).
    let (ghost, _) = a
        .upload_append(&id, n2, None, body(&[0xaa; 777], 100), None)
        .await
        .unwrap();
    assert_eq!(ghost, n2 + 777);
    let (n3, _) = a
        .upload_append(&id, n2, None, body(&whole[250_000..], 8192), None)
        .await
        .unwrap();
    assert_eq!(n3, whole.len() as u64);

    // Committing with a stale hash state is a mismatch the caller must never cause; the
    // store hashes the chunks itself when it is not given one.
    b.upload_commit(&id, n3, &d, None).await.unwrap();
    assert_eq!(read_all(&*a, &d, 0, n3).await, whole);
    assert!(
        a.upload_ids().await.unwrap().is_empty(),
        "the session is gone"
    );
    let e = a
        .upload_append(&id, 0, None, body(b"x", 1), None)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::UploadUnknown), "{e}");

    // A session of one chunk whose hash is known is copied server-side; a wrong digest
    // removes the session and shows nothing.
    let id2 = uuid::Uuid::new_v4().to_string();
    a.upload_create(&id2).await.unwrap();
    let mut h = Hasher::new(pier_oci::Algorithm::Sha256);
    h.update(b"one chunk");
    let (n, h) = a
        .upload_append(&id2, 0, Some(h.clone()), body(b"one chunk", 3), None)
        .await
        .unwrap();
    let wrong = Digest::sha256(b"not it");
    let e = a.upload_commit(&id2, n, &wrong, h).await.unwrap_err();
    assert!(matches!(e, StoreError::DigestMismatch { .. }), "{e}");
    assert_eq!(a.stat(&wrong).await.unwrap(), None);
    assert!(a.upload_ids().await.unwrap().is_empty());

    // An acknowledged offset the chunks do not reach is damage, said as such.
    let id3 = uuid::Uuid::new_v4().to_string();
    a.upload_create(&id3).await.unwrap();
    a.upload_append(&id3, 0, None, body(b"abc", 3), None)
        .await
        .unwrap();
    let e = a
        .upload_append(&id3, 10, None, body(b"x", 1), None)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::UploadDamaged(_)), "{e}");
    a.upload_delete(&id3).await.unwrap();
    a.upload_delete(&id3).await.unwrap();
    assert!(a.upload_ids().await.unwrap().is_empty());

    // An empty blob through a session with no chunk at all.
    let id4 = uuid::Uuid::new_v4().to_string();
    a.upload_create(&id4).await.unwrap();
    let empty = Digest::sha256(b"");
    a.upload_commit(&id4, 0, &empty, None).await.unwrap();
    assert_eq!(a.stat(&empty).await.unwrap(), Some(0));
    assert!(read_all(&*a, &empty, 0, 0).await.is_empty());
}

#[tokio::test]
async fn s3_spool_commits_to_the_bucket_while_readers_keep_reading() {
    let Some((endpoint, bucket)) = s3_env() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("t-{}/", uuid::Uuid::new_v4().simple());
    let store = s3(&endpoint, &bucket, &prefix, dir.path()).await;
    let bytes = data(2 * 1024 * 1024 + 5, 4);
    let d = Digest::sha256(&bytes);
    let spool = store.spool().await.unwrap();
    let (s, b) = (spool.clone(), bytes.clone());
    tokio::task::spawn_blocking(move || {
        s.write_at(&b, 0).unwrap();
        s.sync().unwrap();
    })
    .await
    .unwrap();
    let reader = spool.clone();
    store
        .commit_spool(spool, &d, bytes.len() as u64)
        .await
        .unwrap();
    assert_eq!(
        reader.read_at(10, 100).await.unwrap().as_ref(),
        &bytes[10..110]
    );
    assert_eq!(read_all(&*store, &d, 0, bytes.len() as u64).await, bytes);
}

fn record(d: &Digest, subject: Option<&Digest>) -> ManifestRecord {
    ManifestRecord {
        digest: d.clone(),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        size: 10,
        artifact_type: Some("application/x-test".into()),
        subject: subject.cloned(),
        annotations: None,
        references: vec![],
        stored_ms: 0,
    }
}

#[tokio::test]
async fn postgres_keeps_manifests_tags_and_referrers_together() {
    let Some(admin) = pg_env() else { return };
    let url = backend::fresh_database(&admin).await;
    // Two nodes starting at once apply the schema once.
    let (a, b) = tokio::join!(PgMetaStore::connect(&url), PgMetaStore::connect(&url));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.schema_version().await.unwrap(), 2);
    let mut events = b.events();

    let base = Digest::sha256(b"base");
    let sig = Digest::sha256(b"signature");
    a.put_manifest(
        "lib/app",
        &record(&base, None),
        Bytes::from_static(b"base"),
        Some("v1"),
    )
    .await
    .unwrap();
    a.put_manifest(
        "lib/app",
        &record(&sig, Some(&base)),
        Bytes::from_static(b"signature"),
        Some("sig"),
    )
    .await
    .unwrap();
    // Node B sees it all at once, and hears of the tag.
    assert_eq!(
        b.resolve_tag("lib/app", "v1").await.unwrap(),
        Some(base.clone())
    );
    assert_eq!(
        b.manifest_bytes(&base).await.unwrap().unwrap().as_ref(),
        b"base"
    );
    assert_eq!(
        b.manifest("lib/app", &base).await.unwrap(),
        Some(record(&base, None))
    );
    let refs = b.referrers("lib/app", &base).await.unwrap();
    assert_eq!(refs, [record(&sig, Some(&base))]);
    let heard = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(MetaEvent::Tag { repo, tag }) = events.recv().await {
                if repo == "lib/app" && tag == "v1" {
                    return;
                }
            }
        }
    })
    .await;
    assert!(heard.is_ok(), "the tag notice reached the other node");

    // Paging in byte order, as redb pages.
    for t in ["b", "a", "C", "v2"] {
        a.put_manifest(
            "lib/app",
            &record(&base, None),
            Bytes::from_static(b"base"),
            Some(t),
        )
        .await
        .unwrap();
    }
    let p = b.tags("lib/app", None, 3).await.unwrap();
    assert_eq!(
        (p.items.as_slice(), p.more),
        (&["C".to_string(), "a".into(), "b".into()][..], true)
    );
    let p = b.tags("lib/app", Some("b"), 10).await.unwrap();
    assert_eq!(p.items, ["sig", "v1", "v2"]);
    assert!(!p.more);
    // Tags with their manifests, a page at a time, in the same order.
    let p = b.tag_page("lib/app", None, 3).await.unwrap();
    assert_eq!(
        p,
        [
            ("C".to_string(), base.clone()),
            ("a".into(), base.clone()),
            ("b".into(), base.clone())
        ]
    );
    let p = b.tag_page("lib/app", Some("b"), 10).await.unwrap();
    assert_eq!(
        p,
        [
            ("sig".to_string(), sig.clone()),
            ("v1".into(), base.clone()),
            ("v2".into(), base.clone())
        ]
    );
    assert!(b
        .tag_page("lib/app", Some("v2"), 10)
        .await
        .unwrap()
        .is_empty());
    assert!(b.tag_page("lib", None, 10).await.unwrap().is_empty());
    a.link_blob("lib/other", &base, 4).await.unwrap();
    let repos = b.repos(None, 10).await.unwrap();
    assert_eq!(repos.items, ["lib/app", "lib/other"]);
    assert!(b.repo_exists("lib/other").await.unwrap());
    assert_eq!(b.blob_link("lib/other", &base).await.unwrap(), Some(4));
    assert!(b.unlink_blob("lib/other", &base).await.unwrap());
    assert_eq!(b.blob_link("lib/other", &base).await.unwrap(), None);

    // Deleting the signature removes its tag and its referrer entry; deleting the base its tags.
    assert!(b.delete_manifest("lib/app", &sig).await.unwrap());
    assert!(!b.delete_manifest("lib/app", &sig).await.unwrap());
    assert_eq!(a.resolve_tag("lib/app", "sig").await.unwrap(), None);
    assert!(a.referrers("lib/app", &base).await.unwrap().is_empty());
    assert!(a.delete_tag("lib/app", "v2").await.unwrap());
    assert!(!a.delete_tag("lib/app", "v2").await.unwrap());
    assert!(a.delete_manifest("lib/app", &base).await.unwrap());
    assert!(a.tags("lib/app", None, 10).await.unwrap().items.is_empty());
    assert_eq!(a.manifest("lib/app", &base).await.unwrap(), None);

    // Upload sessions.
    let up = UploadRecord {
        id: "u1".into(),
        repo: "lib/app".into(),
        offset: 42,
        started: 1,
        updated: 2,
    };
    a.put_upload(&up).await.unwrap();
    assert_eq!(b.upload("u1").await.unwrap(), Some(up.clone()));
    assert_eq!(b.uploads().await.unwrap(), [up]);
    b.delete_upload("u1").await.unwrap();
    assert_eq!(a.upload("u1").await.unwrap(), None);

    // A reconnect applies nothing twice.
    let c = PgMetaStore::connect(&url).await.unwrap();
    assert_eq!(c.schema_version().await.unwrap(), 2);
}

#[tokio::test]
async fn postgres_pins_are_held_by_each_holder() {
    let Some(admin) = pg_env() else { return };
    let url = backend::fresh_database(&admin).await;
    let a = PgMetaStore::connect(&url).await.unwrap();
    let b = PgMetaStore::connect(&url).await.unwrap();
    let d = Digest::sha256(b"m");
    let (x, y) = tokio::join!(a.pin("r", &d, "sync:a"), b.pin("r", &d, "sync:b"));
    x.unwrap();
    y.unwrap();
    a.pin("r", &d, "sync:a").await.unwrap();
    assert_eq!(
        b.pinned("r", &d).await.unwrap().unwrap().by,
        ["sync:a", "sync:b"]
    );
    assert!(b.unpin("r", &d, "sync:a").await.unwrap());
    assert!(!b.unpin("r", &d, "sync:a").await.unwrap());
    assert_eq!(a.pins().await.unwrap().len(), 1);
    assert!(a.unpin("r", &d, "sync:b").await.unwrap());
    assert!(a.pins().await.unwrap().is_empty());
    assert!(a.pinned("r", &d).await.unwrap().is_none());
}

#[tokio::test]
async fn s3_lists_blobs_in_digest_order_and_quarantine_hides_one() {
    let Some((endpoint, bucket)) = s3_env() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("t-{}/", uuid::Uuid::new_v4().simple());
    let store = s3(&endpoint, &bucket, &prefix, dir.path()).await;
    let mut digests = Vec::new();
    for i in 0..25u32 {
        let bytes = format!("blob number {i}").into_bytes();
        let (d, _) = store.put(None, body(&bytes, 5), None).await.unwrap();
        digests.push(d);
    }
    // An upload session's objects are not blobs.
    store.upload_create("a-session").await.unwrap();
    digests.sort_by_key(|d| d.to_string());
    let mut seen = Vec::new();
    let mut after: Option<Digest> = None;
    loop {
        let page = store.list(after.as_ref(), 7).await.unwrap();
        assert!(page.len() <= 7);
        let Some(last) = page.last() else { break };
        after = Some(last.digest.clone());
        for b in &page {
            assert!(b.modified_ms > 0, "{b:?}");
            assert_eq!(Some(b.size), store.stat(&b.digest).await.unwrap());
        }
        seen.extend(page.into_iter().map(|b| b.digest));
    }
    assert_eq!(seen, digests, "every blob once, in order");

    let victim = &digests[3];
    let size = store.stat(victim).await.unwrap().unwrap();
    let before = store.stats();
    assert!(store.quarantine(victim).await.unwrap());
    assert_eq!(store.stat(victim).await.unwrap(), None);
    assert!(!store.quarantine(victim).await.unwrap(), "already gone");
    assert_eq!(store.stats().blobs, before.blobs - 1);
    assert_eq!(store.stats().bytes, before.bytes - size);
    let all = store.list(None, 100).await.unwrap();
    assert_eq!(all.len(), 24);
    assert!(all.iter().all(|b| &b.digest != victim));
    // A read of a blob that went reads as a missing file, as the deep check expects.
    match store.read(victim, 0, size).await {
        Err(StoreError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}"),
        Err(e) => panic!("not a missing object: {e}"),
        Ok(_) => panic!("a quarantined blob still reads"),
    }
}

#[tokio::test]
async fn postgres_gc_marks_yield_to_links_and_manifests_and_a_sweep_needs_its_own_mark() {
    let Some(admin) = pg_env() else { return };
    let url = backend::fresh_database(&admin).await;
    let (a, b) = (
        PgMetaStore::connect(&url).await.unwrap(),
        PgMetaStore::connect(&url).await.unwrap(),
    );
    let [linked, referenced, idle] =
        ["linked", "referenced", "idle"].map(|x| Digest::sha256(x.as_bytes()));
    for d in [&linked, &referenced, &idle] {
        a.link_blob("lib/app", d, 7).await.unwrap();
        a.link_blob("lib/other", d, 7).await.unwrap();
    }
    a.gc_mark(&[linked.clone(), referenced.clone(), idle.clone()], 100)
        .await
        .unwrap();
    // Another node links one and stores a manifest referencing another: their marks go.
    b.link_blob("team/new", &linked, 7).await.unwrap();
    let mut rec = record(&Digest::sha256(b"manifest"), None);
    rec.references = vec![referenced.clone()];
    b.put_manifest("team/new", &rec, Bytes::from_static(b"m"), Some("v1"))
        .await
        .unwrap();
    assert_eq!(a.gc_sweep(&linked, 100).await.unwrap(), None);
    assert_eq!(a.gc_sweep(&referenced, 100).await.unwrap(), None);
    // A mark renewed since is not the sweep's to act on; its own is.
    a.gc_mark(std::slice::from_ref(&idle), 200).await.unwrap();
    assert_eq!(a.gc_sweep(&idle, 100).await.unwrap(), None);
    b.record_access(&[(idle.clone(), 5), (idle.clone(), 9)])
        .await
        .unwrap();
    assert_eq!(
        b.access_times(&[idle.clone(), linked.clone()])
            .await
            .unwrap(),
        vec![Some(9), None]
    );
    a.record_access(&[(idle.clone(), 7)]).await.unwrap();
    assert_eq!(
        a.access_times(std::slice::from_ref(&idle)).await.unwrap(),
        vec![Some(9)],
        "the later read stays"
    );
    assert_eq!(
        a.gc_sweep(&idle, 200).await.unwrap(),
        Some(vec!["lib/app".to_string(), "lib/other".to_string()])
    );
    assert_eq!(a.gc_sweep(&idle, 200).await.unwrap(), None, "once");
    assert_eq!(a.blob_link("lib/app", &idle).await.unwrap(), None);
    assert_eq!(
        a.access_times(std::slice::from_ref(&idle)).await.unwrap(),
        vec![None]
    );
    a.gc_mark(std::slice::from_ref(&linked), 300).await.unwrap();
    a.gc_unmark(std::slice::from_ref(&linked)).await.unwrap();
    assert_eq!(a.gc_sweep(&linked, 300).await.unwrap(), None);

    // Pages of links and manifests, in (repository, digest) order.
    let mut links = Vec::new();
    let mut after: Option<(String, Digest)> = None;
    loop {
        let page = b
            .link_page(after.as_ref().map(|(r, d)| (r.as_str(), d)), 2)
            .await
            .unwrap();
        let Some((r, d, _)) = page.last() else { break };
        after = Some((r.clone(), d.clone()));
        links.extend(page.into_iter().map(|(r, d, _)| (r, d.to_string())));
    }
    let mut expected = vec![
        ("lib/app".to_string(), linked.to_string()),
        ("lib/app".to_string(), referenced.to_string()),
        ("lib/other".to_string(), linked.to_string()),
        ("lib/other".to_string(), referenced.to_string()),
        ("team/new".to_string(), linked.to_string()),
    ];
    expected.sort();
    assert_eq!(links, expected);
    let manifests = b.manifest_page(None, 10).await.unwrap();
    assert_eq!(manifests.len(), 1);
    assert_eq!(manifests[0].0, "team/new");
    assert_eq!(manifests[0].1.references, vec![referenced.clone()]);
    let after = (manifests[0].0.as_str(), &manifests[0].1.digest);
    assert!(b.manifest_page(Some(after), 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn postgres_holds_keep_a_sweep_on_one_node_out_of_a_write_on_another() {
    let Some(admin) = pg_env() else { return };
    let url = backend::fresh_database(&admin).await;
    let (a, b) = (
        PgMetaStore::connect(&url).await.unwrap(),
        PgMetaStore::connect(&url).await.unwrap(),
    );
    let d = Digest::sha256(b"held");
    let other = Digest::sha256(b"other");
    let writer = a
        .hold_blobs(&[d.clone(), other.clone()], false)
        .await
        .unwrap()
        .expect("postgres holds");
    // A second writer shares the hold.
    let second = b.hold_blobs(std::slice::from_ref(&d), false).await.unwrap();
    drop(second);
    let sweeper = {
        let (b, d) = (b.clone(), d.clone());
        tokio::spawn(async move { b.hold_blobs(std::slice::from_ref(&d), true).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!sweeper.is_finished(), "the sweep waits for the writer");
    drop(writer);
    let swept = tokio::time::timeout(Duration::from_secs(10), sweeper)
        .await
        .expect("the sweep goes on once the writer is done")
        .unwrap()
        .unwrap();
    // And now a writer waits for the sweep.
    let late = {
        let (a, d) = (a.clone(), d.clone());
        tokio::spawn(async move { a.hold_blobs(std::slice::from_ref(&d), false).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!late.is_finished(), "a writer waits for the sweep");
    drop(swept);
    tokio::time::timeout(Duration::from_secs(10), late)
        .await
        .expect("the writer goes on once the sweep is done")
        .unwrap()
        .unwrap();
}
