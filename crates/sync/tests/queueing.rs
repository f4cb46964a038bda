//! What the sync engine queues, without running anything: one job per image per target
//! (pushes of the same tag while one is waiting are that job), none for repositories a rule
//! does not match or for mirror caches, deletes only for rules that propagate them, and a
//! rule run that finds the images already queued.

use std::sync::Arc;

use bytes::Bytes;
use pier_oci::Digest;
use pier_registry::{Limits, Registry};
use pier_store::{FsBlobStore, JobRunner, JobState, ManifestRecord, MetaStore, RedbMetaStore};
use pier_sync::metrics::SyncMetrics;
use pier_sync::rules::PushRule;
use pier_sync::{SyncEngine, SyncError, SyncParts};

fn rule(text: &str) -> PushRule {
    toml::from_str(text).expect("rule")
}

async fn engine(dir: &std::path::Path, rules: Vec<PushRule>) -> (Arc<SyncEngine>, RedbMetaStore) {
    let meta = RedbMetaStore::in_memory().expect("meta");
    let blobs = FsBlobStore::open(dir).await.expect("blobs");
    let registry = Arc::new(Registry::new(
        blobs,
        Arc::new(meta.clone()),
        Limits::default(),
    ));
    let runner = JobRunner::new(Arc::new(meta.clone()), Default::default());
    let engine = SyncEngine::new(
        Vec::new(),
        rules,
        SyncParts {
            registry,
            mirror: None,
            cluster: None,
            pins: Arc::new(meta.clone()),
            runner,
            metrics: Arc::new(SyncMetrics::unregistered()),
            cache_prefixes: vec!["docker.io/".into()],
            timeouts: Default::default(),
        },
    )
    .expect("engine");
    (engine, meta)
}

async fn put(meta: &RedbMetaStore, repo: &str, tag: &str, body: &[u8]) -> Digest {
    let digest = Digest::sha256(body);
    let record = ManifestRecord {
        digest: digest.clone(),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        size: body.len() as u64,
        artifact_type: None,
        subject: None,
        annotations: None,
        references: Vec::new(),
        stored_ms: 0,
    };
    meta.put_manifest(repo, &record, Bytes::copy_from_slice(body), Some(tag))
        .await
        .expect("put manifest");
    digest
}

#[tokio::test]
async fn one_job_per_image_per_target() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, meta) = engine(
        dir.path(),
        vec![
            rule("name = \"dc2\"\nrepositories = [\"team/**\"]\ntarget = \"http://127.0.0.1:9\"\n"),
            rule(
                "name = \"dc3\"\nrepositories = [\"team/app\"]\ntarget = \"http://127.0.0.1:10\"\n\
                 deletes = true\n",
            ),
        ],
    )
    .await;
    let d1 = put(&meta, "team/app", "1", b"{\"a\":1}").await;
    let d2 = put(&meta, "team/app", "1", b"{\"a\":2}").await;
    engine.pushed("team/app", &d1, Some("1")).await;
    // The tag moved before the first job ran: the same job sends what it points at then.
    engine.pushed("team/app", &d2, Some("1")).await;
    engine.pushed("other/app", &d1, Some("1")).await;
    engine
        .pushed("docker.io/library/alpine", &d1, Some("3"))
        .await;

    let rows = engine.jobs().await.unwrap();
    let mut seen: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.kind.clone(), r.image.clone(), r.target.clone()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            (
                "replicate".into(),
                "team/app:1".into(),
                "http://127.0.0.1:10".into()
            ),
            (
                "replicate".into(),
                "team/app:1".into(),
                "http://127.0.0.1:9".into()
            ),
        ]
    );
    assert!(rows
        .iter()
        .all(|r| r.state == JobState::Queued && r.attempts == 0));

    // A run of the rule finds the same image queued: no second job.
    assert_eq!(engine.run("dc2").await.unwrap(), 1);
    assert_eq!(engine.jobs().await.unwrap().len(), 2);
    assert!(matches!(
        engine.run("nope").await,
        Err(SyncError::UnknownRule(_))
    ));

    // A delete goes only to the rule that propagates deletes.
    engine.deleted("team/app", &d1).await;
    let deletes: Vec<_> = engine
        .jobs()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == "replicate-delete")
        .collect();
    assert_eq!(deletes.len(), 1);
    assert_eq!(deletes[0].rule, "dc3");
    assert_eq!(deletes[0].image, format!("team/app@{d1}"));
}

#[tokio::test]
async fn rules_are_checked_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let meta = RedbMetaStore::in_memory().unwrap();
    let blobs = FsBlobStore::open(dir.path()).await.unwrap();
    let registry = Arc::new(Registry::new(
        blobs,
        Arc::new(meta.clone()),
        Limits::default(),
    ));
    let parts = |runner| SyncParts {
        registry: registry.clone(),
        mirror: None,
        cluster: None,
        pins: Arc::new(meta.clone()),
        runner,
        metrics: Arc::new(SyncMetrics::unregistered()),
        cache_prefixes: Vec::new(),
        timeouts: Default::default(),
    };
    let runner = || JobRunner::new(Arc::new(meta.clone()), Default::default());
    let twice = vec![
        rule("name = \"a\"\nrepositories = [\"**\"]\ntarget = \"http://x\"\n"),
        rule("name = \"a\"\nrepositories = [\"**\"]\ntarget = \"http://y\"\n"),
    ];
    let e = SyncEngine::new(Vec::new(), twice, parts(runner()))
        .err()
        .expect("refused");
    assert!(e.to_string().contains("two rules are named a"), "{e}");
    let cluster = vec![rule(
        "name = \"c\"\nrepositories = [\"**\"]\ntarget = \"cluster\"\n",
    )];
    let e = SyncEngine::new(Vec::new(), cluster, parts(runner()))
        .err()
        .expect("refused");
    assert!(e.to_string().contains("in no cluster"), "{e}");
    let never = vec![rule(
        "name = \"n\"\nrepositories = [\"**\"]\ntarget = \"http://x\"\non_push = false\n",
    )];
    let e = SyncEngine::new(Vec::new(), never, parts(runner()))
        .err()
        .expect("refused");
    assert!(e.to_string().contains("never runs"), "{e}");
}
