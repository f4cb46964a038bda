//! Upload sessions at the registry level: idle sessions are purged with their buffers, busy
//! and recent ones stay.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pier_oci::{Digest, RepoName};
use pier_registry::upload::ChunkInfo;
use pier_registry::{Limits, Registry};
use pier_store::{BlobStore, ByteStream, FsBlobStore, RedbMetaStore};

fn body(data: &'static [u8]) -> ByteStream {
    Box::pin(futures::stream::iter(vec![Ok(Bytes::from_static(data))]))
}

#[tokio::test]
async fn idle_sessions_are_purged_and_recent_ones_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blobs = FsBlobStore::open(dir.path()).await.expect("blobs");
    let store: Arc<dyn BlobStore> = blobs.clone();
    let registry = Registry::new(
        store,
        Arc::new(RedbMetaStore::in_memory().expect("meta")),
        Limits::default(),
    );
    let repo: RepoName = "team/app".parse().expect("name");
    let idle = registry
        .uploads()
        .start(&repo, "test")
        .await
        .expect("start");
    registry
        .uploads()
        .append(&repo, &idle.id, ChunkInfo::default(), body(b"abandoned"))
        .await
        .expect("append");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = registry
        .uploads()
        .start(&repo, "test")
        .await
        .expect("start");
    assert_eq!(registry.uploads().open_sessions(), 2);

    let purged = registry
        .uploads()
        .purge_idle(Duration::ZERO)
        .await
        .expect("purge");
    assert_eq!(purged, 1);
    assert_eq!(registry.uploads().open_sessions(), 1);
    assert!(registry.uploads().status(&repo, &idle.id).await.is_err());
    assert_eq!(
        blobs.upload_ids().await.expect("ids"),
        vec![fresh.id.clone()]
    );

    // The recent session still works to the end.
    let size = registry
        .uploads()
        .finish(
            &repo,
            &fresh.id,
            &Digest::sha256(b"kept"),
            Some((ChunkInfo::default(), body(b"kept"))),
        )
        .await
        .expect("finish");
    assert_eq!(size, 4);
}

#[tokio::test]
async fn session_caps_hold_per_client_and_in_total_and_free_on_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blobs = FsBlobStore::open(dir.path()).await.expect("blobs");
    let store: Arc<dyn BlobStore> = blobs.clone();
    let meta = Arc::new(RedbMetaStore::in_memory().expect("meta"));
    let caps = pier_registry::UploadCaps {
        total: 3,
        per_client: 2,
    };
    let registry =
        Registry::new(store.clone(), meta.clone(), Limits::default()).with_upload_caps(caps);
    let repo: RepoName = "team/app".parse().expect("name");
    let up = registry.uploads();
    let a1 = up.start(&repo, "a").await.expect("a1");
    let a2 = up.start(&repo, "a").await.expect("a2");
    let err = up.start(&repo, "a").await.expect_err("third for a");
    assert!(
        matches!(err, pier_registry::RegistryError::TooManyUploads(ref m) if m.contains("max_upload_sessions_per_client")),
        "{err}"
    );
    assert_eq!(err.code(), pier_oci::ErrorCode::TooManyRequests);
    let _b1 = up.start(&repo, "b").await.expect("b1");
    let err = up.start(&repo, "c").await.expect_err("total reached");
    assert!(err.to_string().contains("3 upload sessions"), "{err}");
    assert_eq!(up.open_sessions(), 3);

    // Cancelling frees a slot of that client and of the total.
    up.cancel(&repo, &a1.id).await.expect("cancel");
    let a3 = up.start(&repo, "a").await.expect("a again after cancel");
    // Finishing frees one too.
    up.finish(
        &repo,
        &a2.id,
        &Digest::sha256(b"done"),
        Some((ChunkInfo::default(), body(b"done"))),
    )
    .await
    .expect("finish");
    up.start(&repo, "c").await.expect("c after finish");
    // A failed commit ends the session and frees its slot.
    let err = up
        .finish(
            &repo,
            &a3.id,
            &Digest::sha256(b"something else"),
            Some((ChunkInfo::default(), body(b"lies"))),
        )
        .await
        .expect_err("digest mismatch");
    assert!(matches!(
        err,
        pier_registry::RegistryError::DigestInvalid(_)
    ));
    assert_eq!(up.open_sessions(), 2);

    // After a restart the recovered sessions count toward the total.
    let again = Registry::new(store, meta, Limits::default()).with_upload_caps(caps);
    let rec = again.uploads().recover().await.expect("recover");
    assert_eq!(rec.resumable, 2);
    again.uploads().start(&repo, "d").await.expect("third slot");
    let err = again.uploads().start(&repo, "e").await.expect_err("full");
    assert!(matches!(
        err,
        pier_registry::RegistryError::TooManyUploads(_)
    ));
}
