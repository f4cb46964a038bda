//! The stores a test runs on, shared by the store, registry and server tests (each includes
//! this file with `#[path]`): the filesystem and redb, or, with `PIER_TEST_BACKEND=s3pg`, S3
//! (`PIER_TEST_S3_ENDPOINT`, `PIER_TEST_S3_BUCKET`) and PostgreSQL (`PIER_TEST_PG_URL`) as
//! scripts/storage-services.sh starts them. On S3 + PostgreSQL each test's stores get a key
//! prefix and a database of their own; [`Shared::open`] opens them again as another node
//! sharing them would.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use pier_store::{
    BlobStore, FsBlobStore, MetaStore, PgMetaStore, PinStore, RedbMetaStore, S3BlobStore, S3Options,
};

/// Whether `PIER_TEST_BACKEND` asks for S3 + PostgreSQL (anything but `fs` or unset panics).
pub fn s3pg() -> bool {
    match std::env::var("PIER_TEST_BACKEND").as_deref() {
        Ok("s3pg") => true,
        Ok("fs") | Err(_) => false,
        Ok(other) => panic!("PIER_TEST_BACKEND={other}: use fs or s3pg"),
    }
}

fn var(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("PIER_TEST_BACKEND=s3pg needs {k} set"))
}

/// Create an empty database next to the one `admin` names; returns its URL.
pub async fn fresh_database(admin: &str) -> String {
    let (client, conn) = tokio_postgres::connect(admin, tokio_postgres::NoTls)
        .await
        .expect("connect to PIER_TEST_PG_URL");
    tokio::spawn(conn);
    let name = format!("pier_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create a test database");
    let (base, _) = admin
        .rsplit_once('/')
        .expect("PIER_TEST_PG_URL ends in /database");
    format!("{base}/{name}")
}

/// One test's S3 key prefix and database, which any number of nodes open.
pub struct Shared {
    pub prefix: String,
    pub pg_url: String,
}

impl Shared {
    /// A fresh prefix and database.
    pub async fn new() -> Shared {
        Shared {
            prefix: format!("test-{}/", uuid::Uuid::new_v4().simple()),
            pg_url: fresh_database(&var("PIER_TEST_PG_URL")).await,
        }
    }

    /// The stores as one node opens them (`dir`: that node's local directory, for spools).
    pub async fn open(&self, dir: &Path) -> (Arc<dyn BlobStore>, Arc<dyn MetaStore>) {
        let (blobs, meta, _) = self.open_with_pins(dir).await;
        (blobs, meta)
    }

    /// [`Shared::open`], with the pin store (the metadata database) as well.
    pub async fn open_with_pins(
        &self,
        dir: &Path,
    ) -> (Arc<dyn BlobStore>, Arc<dyn MetaStore>, Arc<dyn PinStore>) {
        let options = S3Options {
            bucket: var("PIER_TEST_S3_BUCKET"),
            endpoint: Some(var("PIER_TEST_S3_ENDPOINT")),
            region: Some("us-east-1".into()),
            path_style: true,
            prefix: self.prefix.clone(),
            ..S3Options::default()
        };
        let blobs = S3BlobStore::open(options, dir.join("spool"))
            .await
            .expect("S3 blob store");
        let meta = PgMetaStore::connect(&self.pg_url)
            .await
            .expect("postgres meta store");
        (blobs, Arc::new(meta.clone()), Arc::new(meta))
    }
}

/// A test's stores on the backend `PIER_TEST_BACKEND` names (redb in memory on fs).
pub async fn stores(dir: &Path) -> (Arc<dyn BlobStore>, Arc<dyn MetaStore>) {
    let (blobs, meta, _) = stores_with_pins(dir).await;
    (blobs, meta)
}

/// [`stores`], with the pin store (the same database) as well.
pub async fn stores_with_pins(
    dir: &Path,
) -> (Arc<dyn BlobStore>, Arc<dyn MetaStore>, Arc<dyn PinStore>) {
    if s3pg() {
        Shared::new().await.open_with_pins(dir).await
    } else {
        let blobs = FsBlobStore::open(dir).await.expect("blob store");
        let redb = RedbMetaStore::in_memory().expect("meta store");
        (blobs, Arc::new(redb.clone()), Arc::new(redb))
    }
}
