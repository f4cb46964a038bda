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
    let idle = registry.uploads().start(&repo).await.expect("start");
    registry
        .uploads()
        .append(&repo, &idle.id, ChunkInfo::default(), body(b"abandoned"))
        .await
        .expect("append");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = registry.uploads().start(&repo).await.expect("start");
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
