//! Metadata in PostgreSQL, shared by every node of a highly available deployment.
//!
//! The same facts as [`crate::RedbMetaStore`], one table each, keys in byte order (`COLLATE
//! "C"`, as redb sorts them) so listings page identically. Records (manifests, upload sessions,
//! pins) are kept as the same JSON redb keeps. Every mutating call is one transaction; a
//! manifest's bytes, record, tag and referrer entry commit together, and deleting a manifest
//! removes its tags and referrer entry in the same transaction.
//!
//! The schema is applied at start: `schema_version` holds the versions applied, and each
//! missing migration runs in one transaction under an advisory lock, so nodes starting together
//! apply it once.
//!
//! Garbage collection keeps redb's model: `gc_marks` says since when a blob is deletable,
//! linking a blob or storing a manifest that references it deletes its mark in the same
//! transaction, and a sweep removes a blob's links only if its mark is unchanged. Between
//! nodes, [`MetaStore::hold_blobs`] is a PostgreSQL advisory lock per blob (shared for
//! writers, exclusive for a sweep), held on a connection of its own until the hold drops; a
//! mark takes the same lock exclusively until it commits, so that a write's clearing of marks
//! and the marking never cross (redb gets that from running one write at a time).
//!
//! Changes to tags and manifests are announced with `NOTIFY pier_meta` inside their
//! transaction (delivered only if it commits); [`PgMetaStore::events`] hands them to whatever
//! in-memory state a node wants to keep fresh.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures::StreamExt;
use pier_oci::Digest;
use tokio::sync::broadcast;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::meta::{BlobHold, ManifestRecord, MetaStore, Page, UploadRecord};
use crate::pins::{Pin, PinStore};
use crate::{Result, StoreError};

/// Connections kept open to the database per node.
const POOL_SIZE: usize = 16;
/// The channel change notices go out on.
const CHANNEL: &str = "pier_meta";
/// How long `connect` waits for the notice connection to listen.
const LISTEN_START: Duration = Duration::from_secs(10);
/// Advisory lock key taken while migrating ("pier" in ASCII).
const MIGRATION_LOCK: i64 = 0x7069_6572;
/// First key of the two-key advisory locks that hold blobs against a sweep ("blob").
const HOLD_SPACE: i32 = 0x626c_6f62;
/// Blobs marked per transaction (each holds one advisory lock per blob until it commits).
const MARK_GROUP: usize = 100;

/// The migrations, in order; version N is `MIGRATIONS[N - 1]`. Never edit one that shipped.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE repos (
    name TEXT COLLATE "C" PRIMARY KEY
);
CREATE TABLE blob_links (
    repo TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    size BIGINT NOT NULL,
    PRIMARY KEY (repo, digest)
);
CREATE TABLE manifest_bytes (
    digest TEXT COLLATE "C" PRIMARY KEY,
    bytes BYTEA NOT NULL
);
CREATE TABLE manifests (
    repo TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (repo, digest)
);
CREATE TABLE tags (
    repo TEXT COLLATE "C" NOT NULL,
    tag TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (repo, tag)
);
CREATE INDEX tags_by_digest ON tags (repo, digest);
CREATE TABLE referrers (
    repo TEXT COLLATE "C" NOT NULL,
    subject TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (repo, subject, digest)
);
CREATE TABLE uploads (
    id TEXT COLLATE "C" PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE pins (
    repo TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (repo, digest)
);
"#,
    r#"
CREATE TABLE gc_marks (
    digest TEXT COLLATE "C" PRIMARY KEY,
    at_ms BIGINT NOT NULL
);
CREATE TABLE blob_access (
    digest TEXT COLLATE "C" PRIMARY KEY,
    at_ms BIGINT NOT NULL
);
CREATE INDEX blob_links_by_digest ON blob_links (digest);
"#,
];

/// A change another node made (or this one): the `NOTIFY` payload, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaEvent {
    /// `repo:tag` now points somewhere else (or nowhere).
    Tag { repo: String, tag: String },
    /// A manifest was stored in or removed from `repo`.
    Manifest { repo: String, digest: String },
    /// Notices may have been missed (the listening connection dropped): forget everything.
    Lagged,
}

impl MetaEvent {
    fn payload(&self) -> String {
        match self {
            MetaEvent::Tag { repo, tag } => format!("tag {repo} {tag}"),
            MetaEvent::Manifest { repo, digest } => format!("manifest {repo} {digest}"),
            MetaEvent::Lagged => "lagged".into(),
        }
    }

    fn parse(s: &str) -> Option<MetaEvent> {
        let mut it = s.splitn(3, ' ');
        let (kind, repo, rest) = (it.next()?, it.next()?, it.next()?);
        match kind {
            "tag" => Some(MetaEvent::Tag {
                repo: repo.into(),
                tag: rest.into(),
            }),
            "manifest" => Some(MetaEvent::Manifest {
                repo: repo.into(),
                digest: rest.into(),
            }),
            _ => None,
        }
    }
}

/// The PostgreSQL metadata store. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct PgMetaStore {
    pool: Pool,
    events: broadcast::Sender<MetaEvent>,
}

fn db(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(format!("postgres: {e}"))
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(corrupt)
}

fn unjson<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(corrupt)
}

/// The record of `(repo, digest)` in `table` (`manifests`, `pins`), its row locked until `tx`
/// ends: a concurrent writer of the same row waits for this transaction.
async fn record_for_update<T: serde::de::DeserializeOwned>(
    tx: &tokio_postgres::Transaction<'_>,
    table: &'static str,
    repo: &str,
    digest: &str,
) -> Result<Option<T>> {
    let sql = format!("SELECT record FROM {table} WHERE repo = $1 AND digest = $2 FOR UPDATE");
    let row = tx.query_opt(&sql, &[&repo, &digest]).await.map_err(db)?;
    row.map(|r| unjson(r.get::<_, &str>(0))).transpose()
}

fn size_i64(n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| corrupt(format!("size {n} out of range")))
}

fn limit_i64(n: usize) -> i64 {
    i64::try_from(n.saturating_add(1)).unwrap_or(i64::MAX)
}

fn page(mut items: Vec<String>, n: usize) -> Page {
    let more = items.len() > n;
    items.truncate(n);
    Page { items, more }
}

impl PgMetaStore {
    /// Connect (`postgres://user:password@host:port/db`), apply missing migrations, and start
    /// listening for change notices.
    pub async fn connect(url: &str) -> Result<PgMetaStore> {
        let config: tokio_postgres::Config = url.parse().map_err(db)?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .build()
            .map_err(db)?;
        let (events, _) = broadcast::channel(1024);
        let store = PgMetaStore { pool, events };
        store.migrate().await?;
        // Return only once the notice connection listens, so that a change made after
        // `connect` returns is always heard. A listener that cannot start in time keeps trying
        // in the background; subscribers then get `Lagged` when it does.
        let (ready, listening) = tokio::sync::oneshot::channel();
        tokio::spawn(listen(config, store.events.clone(), ready));
        match tokio::time::timeout(LISTEN_START, listening).await {
            Ok(Ok(())) => {}
            _ => tracing::warn!("postgres notice connection not listening yet; retrying"),
        }
        Ok(store)
    }

    /// Change notices from every node, this one included.
    pub fn events(&self) -> broadcast::Receiver<MetaEvent> {
        self.events.subscribe()
    }

    /// The schema version in force.
    pub async fn schema_version(&self) -> Result<i64> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
            .await
            .map_err(db)?;
        Ok(row.get(0))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(db)
    }

    async fn migrate(&self) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_version (
                 version BIGINT PRIMARY KEY,
                 applied TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(db)?;
        let current: i64 = tx
            .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
            .await
            .map_err(db)?
            .get(0);
        let known = MIGRATIONS.len() as i64;
        if current > known {
            return Err(StoreError::Corrupt(format!(
                "the database has schema version {current}, this pier knows up to {known}: \
                 upgrade pier"
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            tx.batch_execute(sql).await.map_err(db)?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES ($1)",
                &[&(i as i64 + 1)],
            )
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }
}

/// Keep a connection that `LISTEN`s and pass each notice on; reconnect when it drops, telling
/// subscribers they may have missed some.
async fn listen(
    config: tokio_postgres::Config,
    events: broadcast::Sender<MetaEvent>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let mut messages =
                    futures::stream::poll_fn(move |cx| connection.poll_message(cx)).boxed();
                let sql = format!("LISTEN {CHANNEL}");
                let listening = client.batch_execute(&sql);
                // The connection must be polled for the LISTEN to complete.
                let mut listening = std::pin::pin!(listening);
                let ok = loop {
                    tokio::select! {
                        r = &mut listening => break r.is_ok(),
                        m = messages.next() => if m.is_none() { break false },
                    }
                };
                if ok {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                    while let Some(m) = messages.next().await {
                        match m {
                            Ok(AsyncMessage::Notification(n)) => {
                                if let Some(e) = MetaEvent::parse(n.payload()) {
                                    let _ = events.send(e);
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "postgres notice connection failed");
                                break;
                            }
                        }
                    }
                }
                let _ = events.send(MetaEvent::Lagged);
            }
            Err(e) => tracing::warn!(error = %e, "cannot connect to postgres to listen"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Remove manifest `d` from `repo` with every tag on it and its referrer entry, announcing
/// each change; false if it was not there.
async fn remove_manifest(
    tx: &deadpool_postgres::Transaction<'_>,
    repo: &str,
    d: &str,
) -> Result<bool> {
    let Some(row) = tx
        .query_opt(
            "DELETE FROM manifests WHERE repo = $1 AND digest = $2 RETURNING record",
            &[&repo, &d],
        )
        .await
        .map_err(db)?
    else {
        return Ok(false);
    };
    let rec: ManifestRecord = unjson(row.get::<_, &str>(0))?;
    let tags = tx
        .query(
            "DELETE FROM tags WHERE repo = $1 AND digest = $2 RETURNING tag",
            &[&repo, &d],
        )
        .await
        .map_err(db)?;
    for t in &tags {
        notify(
            tx,
            &MetaEvent::Tag {
                repo: repo.into(),
                tag: t.get(0),
            },
        )
        .await?;
    }
    if let Some(subject) = rec.subject {
        tx.execute(
            "DELETE FROM referrers WHERE repo = $1 AND subject = $2 AND digest = $3",
            &[&repo, &subject.to_string(), &d],
        )
        .await
        .map_err(db)?;
    }
    notify(
        tx,
        &MetaEvent::Manifest {
            repo: repo.into(),
            digest: d.to_string(),
        },
    )
    .await?;
    Ok(true)
}

async fn notify(tx: &deadpool_postgres::Transaction<'_>, event: &MetaEvent) -> Result<()> {
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &event.payload()])
        .await
        .map_err(db)?;
    Ok(())
}

#[async_trait]
impl MetaStore for PgMetaStore {
    async fn repos(&self, last: Option<&str>, n: usize) -> Result<Page> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT name FROM repos WHERE $1::TEXT IS NULL OR name > $1 \
                 ORDER BY name LIMIT $2",
                &[&last, &limit_i64(n)],
            )
            .await
            .map_err(db)?;
        Ok(page(rows.iter().map(|r| r.get(0)).collect(), n))
    }

    async fn repo_exists(&self, repo: &str) -> Result<bool> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT 1 FROM repos WHERE name = $1", &[&repo])
            .await
            .map_err(db)?;
        Ok(row.is_some())
    }

    async fn link_blob(&self, repo: &str, digest: &Digest, size: u64) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        tx.execute(
            "INSERT INTO repos (name) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&repo],
        )
        .await
        .map_err(db)?;
        let d = digest.to_string();
        // The mark goes first: a sweep of this blob in progress holds its row, so this waits
        // for it and then links after it, as redb's one writer at a time would.
        tx.execute("DELETE FROM gc_marks WHERE digest = $1", &[&d])
            .await
            .map_err(db)?;
        tx.execute(
            "INSERT INTO blob_links (repo, digest, size) VALUES ($1, $2, $3) \
             ON CONFLICT (repo, digest) DO UPDATE SET size = EXCLUDED.size",
            &[&repo, &d, &size_i64(size)?],
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn blob_link(&self, repo: &str, digest: &Digest) -> Result<Option<u64>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT size FROM blob_links WHERE repo = $1 AND digest = $2",
                &[&repo, &digest.to_string()],
            )
            .await
            .map_err(db)?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }

    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let client = self.client().await?;
        let n = client
            .execute(
                "DELETE FROM blob_links WHERE repo = $1 AND digest = $2",
                &[&repo, &digest.to_string()],
            )
            .await
            .map_err(db)?;
        Ok(n > 0)
    }

    async fn put_manifest(
        &self,
        repo: &str,
        record: &ManifestRecord,
        bytes: Bytes,
        tag: Option<&str>,
    ) -> Result<()> {
        let digest = record.digest.to_string();
        let rec = json(record)?;
        let references: Vec<String> = record.references.iter().map(|d| d.to_string()).collect();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        if !references.is_empty() {
            tx.execute(
                "DELETE FROM gc_marks WHERE digest = ANY($1)",
                &[&references],
            )
            .await
            .map_err(db)?;
        }
        tx.execute(
            "INSERT INTO repos (name) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&repo],
        )
        .await
        .map_err(db)?;
        tx.execute(
            "INSERT INTO manifest_bytes (digest, bytes) VALUES ($1, $2) \
             ON CONFLICT (digest) DO UPDATE SET bytes = EXCLUDED.bytes",
            &[&digest, &bytes.as_ref()],
        )
        .await
        .map_err(db)?;
        tx.execute(
            "INSERT INTO manifests (repo, digest, record) VALUES ($1, $2, $3) \
             ON CONFLICT (repo, digest) DO UPDATE SET record = EXCLUDED.record",
            &[&repo, &digest, &rec],
        )
        .await
        .map_err(db)?;
        if let Some(tag) = tag {
            tx.execute(
                "INSERT INTO tags (repo, tag, digest) VALUES ($1, $2, $3) \
                 ON CONFLICT (repo, tag) DO UPDATE SET digest = EXCLUDED.digest",
                &[&repo, &tag, &digest],
            )
            .await
            .map_err(db)?;
            notify(
                &tx,
                &MetaEvent::Tag {
                    repo: repo.into(),
                    tag: tag.into(),
                },
            )
            .await?;
        }
        if let Some(subject) = &record.subject {
            tx.execute(
                "INSERT INTO referrers (repo, subject, digest) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
                &[&repo, &subject.to_string(), &digest],
            )
            .await
            .map_err(db)?;
        }
        notify(
            &tx,
            &MetaEvent::Manifest {
                repo: repo.into(),
                digest: digest.clone(),
            },
        )
        .await?;
        tx.commit().await.map_err(db)
    }

    async fn manifest(&self, repo: &str, digest: &Digest) -> Result<Option<ManifestRecord>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT record FROM manifests WHERE repo = $1 AND digest = $2",
                &[&repo, &digest.to_string()],
            )
            .await
            .map_err(db)?;
        row.map(|r| unjson(r.get::<_, &str>(0))).transpose()
    }

    async fn manifest_bytes(&self, digest: &Digest) -> Result<Option<Bytes>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT bytes FROM manifest_bytes WHERE digest = $1",
                &[&digest.to_string()],
            )
            .await
            .map_err(db)?;
        Ok(row.map(|r| Bytes::from(r.get::<_, Vec<u8>>(0))))
    }

    async fn resolve_tag(&self, repo: &str, tag: &str) -> Result<Option<Digest>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT digest FROM tags WHERE repo = $1 AND tag = $2",
                &[&repo, &tag],
            )
            .await
            .map_err(db)?;
        row.map(|r| r.get::<_, &str>(0).parse().map_err(corrupt))
            .transpose()
    }

    async fn delete_manifest(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let d = digest.to_string();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        if !remove_manifest(&tx, repo, &d).await? {
            return Ok(false);
        }
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn delete_untagged_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        stored_before_ms: u64,
    ) -> Result<bool> {
        let d = digest.to_string();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        // The row held: a push storing this manifest again waits, and then stores it anew.
        let Some(rec) = record_for_update::<ManifestRecord>(&tx, "manifests", repo, &d).await?
        else {
            return Ok(false);
        };
        if rec.stored_ms == 0 || rec.stored_ms > stored_before_ms {
            return Ok(false);
        }
        let tagged = tx
            .query_opt(
                "SELECT 1 FROM tags WHERE repo = $1 AND digest = $2 LIMIT 1",
                &[&repo, &d],
            )
            .await
            .map_err(db)?;
        if tagged.is_some() || !remove_manifest(&tx, repo, &d).await? {
            return Ok(false);
        }
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let n = tx
            .execute(
                "DELETE FROM tags WHERE repo = $1 AND tag = $2",
                &[&repo, &tag],
            )
            .await
            .map_err(db)?;
        if n > 0 {
            notify(
                &tx,
                &MetaEvent::Tag {
                    repo: repo.into(),
                    tag: tag.into(),
                },
            )
            .await?;
        }
        tx.commit().await.map_err(db)?;
        Ok(n > 0)
    }

    async fn tags(&self, repo: &str, last: Option<&str>, n: usize) -> Result<Page> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT tag FROM tags WHERE repo = $1 AND ($2::TEXT IS NULL OR tag > $2) \
                 ORDER BY tag LIMIT $3",
                &[&repo, &last, &limit_i64(n)],
            )
            .await
            .map_err(db)?;
        Ok(page(rows.iter().map(|r| r.get(0)).collect(), n))
    }

    async fn referrers(&self, repo: &str, subject: &Digest) -> Result<Vec<ManifestRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT m.record FROM referrers r JOIN manifests m \
                   ON m.repo = r.repo AND m.digest = r.digest \
                 WHERE r.repo = $1 AND r.subject = $2 ORDER BY r.digest",
                &[&repo, &subject.to_string()],
            )
            .await
            .map_err(db)?;
        rows.iter().map(|r| unjson(r.get::<_, &str>(0))).collect()
    }

    async fn put_upload(&self, upload: &UploadRecord) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO uploads (id, record) VALUES ($1, $2) \
                 ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
                &[&upload.id, &json(upload)?],
            )
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn upload(&self, id: &str) -> Result<Option<UploadRecord>> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT record FROM uploads WHERE id = $1", &[&id])
            .await
            .map_err(db)?;
        row.map(|r| unjson(r.get::<_, &str>(0))).transpose()
    }

    async fn delete_upload(&self, id: &str) -> Result<()> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM uploads WHERE id = $1", &[&id])
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn uploads(&self) -> Result<Vec<UploadRecord>> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT record FROM uploads ORDER BY id", &[])
            .await
            .map_err(db)?;
        rows.iter().map(|r| unjson(r.get::<_, &str>(0))).collect()
    }

    async fn manifest_page(
        &self,
        after: Option<(&str, &Digest)>,
        n: usize,
    ) -> Result<Vec<(String, ManifestRecord)>> {
        let (repo, digest) = after_key(after);
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT repo, record FROM manifests \
                 WHERE $1::TEXT IS NULL OR (repo, digest) > ($1, $2) \
                 ORDER BY repo, digest LIMIT $3",
                &[&repo, &digest, &limit_exact(n)],
            )
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| Ok((r.get(0), unjson(r.get::<_, &str>(1))?)))
            .collect()
    }

    async fn tag_page(
        &self,
        repo: &str,
        after: Option<&str>,
        n: usize,
    ) -> Result<Vec<(String, Digest)>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT tag, digest FROM tags WHERE repo = $1 AND ($2::TEXT IS NULL OR tag > $2) \
                 ORDER BY tag LIMIT $3",
                &[&repo, &after, &limit_exact(n)],
            )
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| Ok((r.get(0), r.get::<_, &str>(1).parse().map_err(corrupt)?)))
            .collect()
    }

    async fn link_page(
        &self,
        after: Option<(&str, &Digest)>,
        n: usize,
    ) -> Result<Vec<(String, Digest, u64)>> {
        let (repo, digest) = after_key(after);
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT repo, digest, size FROM blob_links \
                 WHERE $1::TEXT IS NULL OR (repo, digest) > ($1, $2) \
                 ORDER BY repo, digest LIMIT $3",
                &[&repo, &digest, &limit_exact(n)],
            )
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.get(0),
                    r.get::<_, &str>(1).parse().map_err(corrupt)?,
                    r.get::<_, i64>(2) as u64,
                ))
            })
            .collect()
    }

    async fn gc_mark(&self, digests: &[Digest], at_ms: u64) -> Result<()> {
        let at = size_i64(at_ms)?;
        let mut client = self.client().await?;
        for group in digests.chunks(MARK_GROUP) {
            let mut keys: Vec<i32> = group.iter().map(hold_key).collect();
            keys.sort_unstable();
            keys.dedup();
            let tx = client.transaction().await.map_err(db)?;
            // Each blob's hold, exclusive until the marks commit: a write holding it (from
            // its check to its commit) finishes first, so its manifest is seen by the
            // collector's read of references, or it starts after and clears the mark. Without
            // this, a manifest's clearing of a mark not yet made and the mark could cross.
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, k) \
                 FROM (SELECT k FROM unnest($2::INT4[]) AS k ORDER BY k) AS held",
                &[&HOLD_SPACE, &keys],
            )
            .await
            .map_err(db)?;
            tx.execute(
                "INSERT INTO gc_marks (digest, at_ms) SELECT d, $2 FROM unnest($1::TEXT[]) d \
                 ON CONFLICT (digest) DO UPDATE SET at_ms = EXCLUDED.at_ms",
                &[&strings(group), &at],
            )
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)?;
        }
        Ok(())
    }

    async fn gc_unmark(&self, digests: &[Digest]) -> Result<()> {
        let digests = strings(digests);
        let client = self.client().await?;
        client
            .execute("DELETE FROM gc_marks WHERE digest = ANY($1)", &[&digests])
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn gc_sweep(&self, digest: &Digest, at_ms: u64) -> Result<Option<Vec<String>>> {
        let d = digest.to_string();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let marked = tx
            .execute(
                "DELETE FROM gc_marks WHERE digest = $1 AND at_ms = $2",
                &[&d, &size_i64(at_ms)?],
            )
            .await
            .map_err(db)?;
        if marked == 0 {
            return Ok(None);
        }
        tx.execute("DELETE FROM blob_access WHERE digest = $1", &[&d])
            .await
            .map_err(db)?;
        let rows = tx
            .query(
                "DELETE FROM blob_links WHERE digest = $1 RETURNING repo",
                &[&d],
            )
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        let mut repos: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        repos.sort();
        Ok(Some(repos))
    }

    async fn record_access(&self, accesses: &[(Digest, u64)]) -> Result<()> {
        // One row per digest (the latest), or the upsert would touch a row twice.
        let mut latest: std::collections::BTreeMap<String, u64> = Default::default();
        for (d, t) in accesses {
            let e = latest.entry(d.to_string()).or_insert(*t);
            *e = (*e).max(*t);
        }
        if latest.is_empty() {
            return Ok(());
        }
        let times = latest
            .values()
            .map(|t| size_i64(*t))
            .collect::<Result<Vec<i64>>>()?;
        let digests: Vec<String> = latest.into_keys().collect();
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO blob_access (digest, at_ms) \
                 SELECT * FROM unnest($1::TEXT[], $2::BIGINT[]) \
                 ON CONFLICT (digest) DO UPDATE \
                 SET at_ms = GREATEST(blob_access.at_ms, EXCLUDED.at_ms)",
                &[&digests, &times],
            )
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn access_times(&self, digests: &[Digest]) -> Result<Vec<Option<u64>>> {
        let keys = strings(digests);
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT digest, at_ms FROM blob_access WHERE digest = ANY($1)",
                &[&keys],
            )
            .await
            .map_err(db)?;
        let found: std::collections::HashMap<String, u64> = rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect();
        Ok(keys.iter().map(|k| found.get(k).copied()).collect())
    }

    async fn hold_blobs(&self, digests: &[Digest], exclusive: bool) -> Result<Option<BlobHold>> {
        let mut keys: Vec<i32> = digests.iter().map(hold_key).collect();
        // In one order everywhere, so two writers never wait on each other in a cycle.
        keys.sort_unstable();
        keys.dedup();
        let client = self.client().await?;
        let sql = if exclusive {
            "SELECT pg_advisory_lock($1, $2)"
        } else {
            "SELECT pg_advisory_lock_shared($1, $2)"
        };
        for k in &keys {
            // On an error the locks taken so far go with the connection.
            if let Err(e) = client.execute(sql, &[&HOLD_SPACE, k]).await {
                drop(PgHold(Some(client)));
                return Err(db(e));
            }
        }
        Ok(Some(Box::new(PgHold(Some(client)))))
    }
}

/// The advisory lock key of a blob: 32 bits of its digest (a collision only makes one wait).
fn hold_key(d: &Digest) -> i32 {
    let hex = d.hex();
    let n = u32::from_str_radix(hex.get(..8).unwrap_or("0"), 16).unwrap_or(0);
    n as i32
}

/// A connection holding advisory locks. Dropped, it releases them and goes back to the pool;
/// if that cannot be done, the connection is closed, which releases them too.
struct PgHold(Option<deadpool_postgres::Object>);

impl Drop for PgHold {
    fn drop(&mut self) {
        let Some(client) = self.0.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if client
                        .batch_execute("SELECT pg_advisory_unlock_all()")
                        .await
                        .is_err()
                    {
                        drop(deadpool_postgres::Object::take(client));
                    }
                });
            }
            Err(_) => drop(deadpool_postgres::Object::take(client)),
        }
    }
}

fn strings(digests: &[Digest]) -> Vec<String> {
    digests.iter().map(|d| d.to_string()).collect()
}

/// A page's start as query parameters: `(None, "")` for the first page.
fn after_key(after: Option<(&str, &Digest)>) -> (Option<String>, String) {
    match after {
        Some((r, d)) => (Some(r.to_string()), d.to_string()),
        None => (None, String::new()),
    }
}

fn limit_exact(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[async_trait]
impl PinStore for PgMetaStore {
    async fn pin(&self, repo: &str, digest: &Digest, by: &str) -> Result<()> {
        let d = digest.to_string();
        let fresh = Pin {
            repo: repo.into(),
            digest: d.clone(),
            by: Vec::new(),
            pinned_ms: unix_ms(),
        };
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        // Make the row exist, then hold it: two nodes pinning at once take turns.
        tx.execute(
            "INSERT INTO pins (repo, digest, record) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[&repo, &d, &json(&fresh)?],
        )
        .await
        .map_err(db)?;
        let mut pin: Pin = record_for_update(&tx, "pins", repo, &d)
            .await?
            .ok_or_else(|| {
                db(format!(
                    "the pin of {repo}@{d} vanished inside its transaction"
                ))
            })?;
        if !pin.by.iter().any(|b| b == by) {
            pin.by.push(by.into());
            pin.by.sort();
            tx.execute(
                "UPDATE pins SET record = $3 WHERE repo = $1 AND digest = $2",
                &[&repo, &d, &json(&pin)?],
            )
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn unpin(&self, repo: &str, digest: &Digest, by: &str) -> Result<bool> {
        let d = digest.to_string();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let Some(mut pin) = record_for_update::<Pin>(&tx, "pins", repo, &d).await? else {
            return Ok(false);
        };
        let before = pin.by.len();
        pin.by.retain(|b| b != by);
        if pin.by.is_empty() {
            tx.execute(
                "DELETE FROM pins WHERE repo = $1 AND digest = $2",
                &[&repo, &d],
            )
            .await
            .map_err(db)?;
        } else if pin.by.len() != before {
            tx.execute(
                "UPDATE pins SET record = $3 WHERE repo = $1 AND digest = $2",
                &[&repo, &d, &json(&pin)?],
            )
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(pin.by.len() != before)
    }

    async fn pins(&self) -> Result<Vec<Pin>> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT record FROM pins ORDER BY repo, digest", &[])
            .await
            .map_err(db)?;
        rows.iter().map(|r| unjson(r.get::<_, &str>(0))).collect()
    }

    async fn pinned(&self, repo: &str, digest: &Digest) -> Result<Option<Pin>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT record FROM pins WHERE repo = $1 AND digest = $2",
                &[&repo, &digest.to_string()],
            )
            .await
            .map_err(db)?;
        row.map(|r| unjson(r.get::<_, &str>(0))).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_notices_round_trip() {
        for e in [
            MetaEvent::Tag {
                repo: "a/b".into(),
                tag: "v1".into(),
            },
            MetaEvent::Manifest {
                repo: "a".into(),
                digest: Digest::sha256(b"x").to_string(),
            },
        ] {
            assert_eq!(MetaEvent::parse(&e.payload()), Some(e));
        }
        assert_eq!(MetaEvent::parse("bogus"), None);
    }
}
