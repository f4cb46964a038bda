//! Behaviour of the filesystem blob store and the redb metadata store.

use bytes::Bytes;
use futures::StreamExt;
use pier_oci::{Digest, Hasher};
use pier_store::{
    BlobStore, ByteStream, FsBlobStore, ManifestRecord, MetaStore, RedbMetaStore, StoreError,
};

fn body(parts: &[&[u8]]) -> ByteStream {
    let v: Vec<std::io::Result<Bytes>> = parts
        .iter()
        .map(|p| Ok(Bytes::copy_from_slice(p)))
        .collect();
    Box::pin(futures::stream::iter(v))
}

fn broken(first: &[u8]) -> ByteStream {
    let v: Vec<std::io::Result<Bytes>> = vec![
        Ok(Bytes::copy_from_slice(first)),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "client went away",
        )),
    ];
    Box::pin(futures::stream::iter(v))
}

async fn read_all(store: &FsBlobStore, d: &Digest, start: u64, end: u64) -> Vec<u8> {
    let mut s = store.read(d, start, end).await.expect("read");
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.expect("chunk"));
    }
    out
}

fn files_under(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|r| r.count()).unwrap_or(0)
}

#[tokio::test]
async fn put_verifies_and_dedupes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsBlobStore::open(dir.path()).await.expect("open");
    let data = vec![7u8; 600_000];
    let d = Digest::sha256(&data);
    let (got, size) = store
        .put(Some(&d), body(&[&data[..1000], &data[1000..]]), None)
        .await
        .expect("put");
    assert_eq!((got.clone(), size), (d.clone(), 600_000));
    assert_eq!(read_all(&store, &d, 0, 600_000).await, data);
    assert_eq!(
        read_all(&store, &d, 599_990, 600_000).await,
        data[599_990..]
    );
    // Same content again: one copy.
    store
        .put(Some(&d), body(&[&data]), None)
        .await
        .expect("put again");
    assert_eq!(store.stats().blobs, 1);
    assert_eq!(store.stats().bytes, 600_000);
}

#[tokio::test]
async fn wrong_digest_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsBlobStore::open(dir.path()).await.expect("open");
    let d = Digest::sha256(b"expected");
    let err = store
        .put(Some(&d), body(&[b"other"]), None)
        .await
        .expect_err("mismatch");
    assert!(matches!(err, StoreError::DigestMismatch { .. }));
    assert_eq!(store.stat(&d).await.expect("stat"), None);
    assert_eq!(
        store.stat(&Digest::sha256(b"other")).await.expect("stat"),
        None
    );
    assert_eq!(files_under(&dir.path().join("tmp")), 0);
    // A body that breaks leaves nothing either.
    let err = store
        .put(None, broken(b"abc"), None)
        .await
        .expect_err("broken");
    assert!(matches!(err, StoreError::Body(_)));
    assert_eq!(files_under(&dir.path().join("tmp")), 0);
    // Over the limit.
    let err = store
        .put(None, body(&[&[0u8; 100]]), Some(10))
        .await
        .expect_err("too large");
    assert!(matches!(err, StoreError::TooLarge { limit: 10 }));
    assert_eq!(store.stats().blobs, 0);
}

#[tokio::test]
async fn uploads_truncate_unacknowledged_bytes_and_rehash_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsBlobStore::open(dir.path()).await.expect("open");
    let id = "0f0e8a4c-3c5b-4a8e-9d36-4d0d6bb5a1a1";
    store.upload_create(id).await.expect("create");
    let h = Some(Hasher::new(pier_oci::Algorithm::Sha256));
    let (len, h) = store
        .upload_append(id, 0, h, body(&[b"hello "]), None)
        .await
        .expect("append");
    assert_eq!(len, 6);
    // A chunk that breaks half-way is not acknowledged: the next append starts at 6 again.
    assert!(store
        .upload_append(id, 6, h.clone(), broken(b"garbage"), None)
        .await
        .is_err());
    let (len, _) = store
        .upload_append(id, 6, None, body(&[b"world"]), None)
        .await
        .expect("append");
    assert_eq!(len, 11);
    // Reopen (a restart): the hasher state is gone, the commit rehashes the buffer.
    drop(store);
    let store = FsBlobStore::open(dir.path()).await.expect("reopen");
    assert_eq!(store.upload_ids().await.expect("ids"), vec![id.to_string()]);
    let d = Digest::sha256(b"hello world");
    store.upload_commit(id, 11, &d, None).await.expect("commit");
    assert_eq!(read_all(&store, &d, 0, 11).await, b"hello world");
    assert!(store.upload_ids().await.expect("ids").is_empty());
}

#[tokio::test]
async fn upload_commit_with_wrong_digest_removes_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsBlobStore::open(dir.path()).await.expect("open");
    let id = "1f0e8a4c-3c5b-4a8e-9d36-4d0d6bb5a1a1";
    store.upload_create(id).await.expect("create");
    store
        .upload_append(id, 0, None, body(&[b"abc"]), None)
        .await
        .expect("append");
    let err = store
        .upload_commit(id, 3, &Digest::sha256(b"xyz"), None)
        .await
        .expect_err("mismatch");
    assert!(matches!(err, StoreError::DigestMismatch { .. }));
    assert_eq!(store.stats().blobs, 0);
    assert!(matches!(
        store.upload_append(id, 3, None, body(&[b"d"]), None).await,
        Err(StoreError::UploadUnknown)
    ));
}

fn record(data: &[u8], subject: Option<Digest>) -> ManifestRecord {
    ManifestRecord {
        digest: Digest::sha256(data),
        media_type: pier_oci::media::OCI_MANIFEST.into(),
        size: data.len() as u64,
        artifact_type: Some("application/x-test".into()),
        subject,
        annotations: None,
        references: vec![],
        stored_ms: 0,
    }
}

#[tokio::test]
async fn tags_paginate_and_manifest_delete_cascades() {
    let meta = RedbMetaStore::in_memory().expect("db");
    let m1 = record(b"one", None);
    let sig = record(b"sig", Some(m1.digest.clone()));
    meta.put_manifest("a/b", &m1, Bytes::from_static(b"one"), Some("v1"))
        .await
        .expect("put");
    for t in ["v3", "v2", "latest"] {
        meta.put_manifest("a/b", &m1, Bytes::from_static(b"one"), Some(t))
            .await
            .expect("put");
    }
    meta.put_manifest("a/b", &sig, Bytes::from_static(b"sig"), None)
        .await
        .expect("put");
    meta.put_manifest("a/bc", &m1, Bytes::from_static(b"one"), Some("zz"))
        .await
        .expect("put");

    let p = meta.tags("a/b", None, 2).await.expect("tags");
    assert_eq!(
        (p.items.clone(), p.more),
        (vec!["latest".to_string(), "v1".to_string()], true)
    );
    let p = meta.tags("a/b", Some("v1"), 10).await.expect("tags");
    assert_eq!(
        (p.items.clone(), p.more),
        (vec!["v2".to_string(), "v3".to_string()], false)
    );
    // Tags with their manifests, a page at a time, and only the repository's own.
    let pairs = |tags: &[&str]| -> Vec<(String, Digest)> {
        tags.iter()
            .map(|t| (t.to_string(), m1.digest.clone()))
            .collect()
    };
    let p = meta.tag_page("a/b", None, 2).await.expect("tag page");
    assert_eq!(p, pairs(&["latest", "v1"]));
    let p = meta.tag_page("a/b", Some("v1"), 2).await.expect("tag page");
    assert_eq!(p, pairs(&["v2", "v3"]));
    assert!(meta
        .tag_page("a/b", Some("v3"), 2)
        .await
        .expect("tag page")
        .is_empty());
    assert_eq!(
        meta.tag_page("a/bc", None, 10).await.expect("tag page"),
        pairs(&["zz"])
    );
    assert!(meta
        .tag_page("a", None, 10)
        .await
        .expect("tag page")
        .is_empty());
    assert_eq!(
        meta.repos(None, 10).await.expect("repos").items,
        vec!["a/b", "a/bc"]
    );
    assert_eq!(
        meta.referrers("a/b", &m1.digest).await.expect("refs"),
        vec![sig.clone()]
    );

    assert!(meta
        .delete_manifest("a/b", &sig.digest)
        .await
        .expect("delete"));
    assert!(meta
        .referrers("a/b", &m1.digest)
        .await
        .expect("refs")
        .is_empty());
    assert!(meta
        .delete_manifest("a/b", &m1.digest)
        .await
        .expect("delete"));
    assert!(meta
        .tags("a/b", None, 10)
        .await
        .expect("tags")
        .items
        .is_empty());
    // The other repository keeps its tag.
    assert_eq!(
        meta.resolve_tag("a/bc", "zz").await.expect("tag"),
        Some(m1.digest.clone())
    );
    assert!(!meta
        .delete_manifest("a/b", &m1.digest)
        .await
        .expect("delete"));
}

#[tokio::test]
async fn database_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta.redb");
    let d = Digest::sha256(b"blob");
    {
        let meta = RedbMetaStore::open(&path).expect("db");
        meta.link_blob("r", &d, 4).await.expect("link");
        meta.put_upload(&pier_store::UploadRecord {
            id: "u".into(),
            repo: "r".into(),
            offset: 9,
            started: 1,
            updated: 1,
        })
        .await
        .expect("upload");
    }
    let meta = RedbMetaStore::open(&path).expect("reopen");
    assert_eq!(meta.blob_link("r", &d).await.expect("link"), Some(4));
    assert_eq!(
        meta.upload("u").await.expect("upload").map(|u| u.offset),
        Some(9)
    );
    assert!(meta.unlink_blob("r", &d).await.expect("unlink"));
    assert_eq!(meta.blob_link("r", &d).await.expect("link"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_puts_of_one_blob_store_and_count_it_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsBlobStore::open(dir.path()).await.expect("open");
    let data = vec![42u8; 300_000];
    let d = Digest::sha256(&data);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, data, d) = (store.clone(), data.clone(), d.clone());
        tasks.push(tokio::spawn(async move {
            store.put(Some(&d), body(&[&data]), None).await
        }));
    }
    for t in tasks {
        t.await.expect("task").expect("put");
    }
    assert_eq!(store.stats().blobs, 1);
    assert_eq!(store.stats().bytes, 300_000);
    assert_eq!(read_all(&store, &d, 0, 300_000).await, data);
    assert_eq!(files_under(&dir.path().join("tmp")), 0);
}

#[tokio::test]
async fn listing_pages_through_blobs_in_digest_order_and_quarantine_hides_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path()).await.unwrap();
    let mut digests = Vec::new();
    for i in 0..25u32 {
        let data = format!("blob number {i}").into_bytes();
        let (d, _) = store.put(None, body(&[&data]), None).await.unwrap();
        digests.push(d);
    }
    digests.sort_by_key(|d| d.to_string());
    let mut seen = Vec::new();
    let mut after: Option<Digest> = None;
    loop {
        let page = store.list(after.as_ref(), 7).await.unwrap();
        assert!(page.len() <= 7);
        let Some(last) = page.last() else { break };
        after = Some(last.digest.clone());
        seen.extend(page.into_iter().map(|b| b.digest));
    }
    assert_eq!(seen, digests, "every blob once, in order");

    let victim = &digests[3];
    assert!(store.quarantine(victim).await.unwrap());
    assert_eq!(store.stat(victim).await.unwrap(), None);
    assert!(!store.quarantine(victim).await.unwrap(), "already gone");
    assert_eq!(store.stats().blobs, 24);
    assert_eq!(
        std::fs::read_dir(dir.path().join("quarantine"))
            .unwrap()
            .count(),
        1
    );
    let all = store.list(None, 100).await.unwrap();
    assert_eq!(all.len(), 24);
    assert!(all.iter().all(|b| &b.digest != victim));
}

#[tokio::test]
async fn a_gc_mark_holds_only_until_something_wants_the_blob() {
    let meta = RedbMetaStore::in_memory().unwrap();
    let d = Digest::sha256(b"layer");
    meta.link_blob("team/a", &d, 5).await.unwrap();
    meta.link_blob("team/b", &d, 5).await.unwrap();

    // Marked, then linked again: the sweep finds no mark and changes nothing.
    meta.gc_mark(std::slice::from_ref(&d), 100).await.unwrap();
    meta.link_blob("team/c", &d, 5).await.unwrap();
    assert_eq!(meta.gc_sweep(&d, 100).await.unwrap(), None);
    assert_eq!(meta.blob_link("team/a", &d).await.unwrap(), Some(5));

    // Marked, then a manifest referencing it: kept too.
    meta.gc_mark(std::slice::from_ref(&d), 200).await.unwrap();
    let record = ManifestRecord {
        digest: Digest::sha256(b"manifest"),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        size: 8,
        artifact_type: None,
        subject: None,
        annotations: None,
        references: vec![d.clone()],
        stored_ms: 0,
    };
    meta.put_manifest("team/a", &record, Bytes::from_static(b"manifest"), None)
        .await
        .unwrap();
    assert_eq!(meta.gc_sweep(&d, 200).await.unwrap(), None);

    // A newer mark than the sweeper's is not its to act on.
    meta.gc_mark(std::slice::from_ref(&d), 300).await.unwrap();
    assert_eq!(meta.gc_sweep(&d, 299).await.unwrap(), None);
    // The mark still holds: every link goes, once.
    let mut repos = meta.gc_sweep(&d, 300).await.unwrap().expect("swept");
    repos.sort();
    assert_eq!(repos, ["team/a", "team/b", "team/c"]);
    assert_eq!(meta.blob_link("team/b", &d).await.unwrap(), None);
    assert_eq!(meta.gc_sweep(&d, 300).await.unwrap(), None);

    let page = meta.manifest_page(None, 10).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].0, "team/a");
    meta.record_access(&[(d.clone(), 5), (d.clone(), 3)])
        .await
        .unwrap();
    assert_eq!(
        meta.access_times(std::slice::from_ref(&d)).await.unwrap(),
        [Some(5)]
    );
}
