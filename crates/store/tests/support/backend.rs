//! The stores a test runs on, shared by the store, registry and server tests (each includes
//! this file with `#[path]`): the filesystem and redb, or, with `PIER_TEST_BACKEND=s3pg`, S3
//! (`PIER_TEST_S3_ENDPOINT`, `PIER_TEST_S3_BUCKET`) and PostgreSQL (`PIER_TEST_PG_URL`) as
//! scripts/storage-services.sh starts them. On S3 + PostgreSQL each test's stores get a key
//! prefix and a database of their own; [`Shared::open`] opens them again as another node
//! sharing them would. The database is dropped when its [`TestDatabase`] is (a test keeps
//! the [`Guard`] its stores came with for as long as it uses them).
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

/// A database made for one test, dropped with this value (connections still open to it
/// are ended). Dereferences to its URL.
pub struct TestDatabase {
    pub url: String,
    pub name: String,
    admin: String,
}

impl std::ops::Deref for TestDatabase {
    type Target = str;

    fn deref(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // The test's runtime may be gone or shutting down: drop it from a runtime of its own.
        let dropped = std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .join()
        .unwrap_or_else(|_| Err("the dropping thread panicked".into()));
        if let Err(e) = dropped {
            eprintln!("test database {} was not dropped: {e}", self.name);
        }
    }
}

/// Create an empty database next to the one `admin` names.
pub async fn fresh_database(admin: &str) -> TestDatabase {
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
    TestDatabase {
        url: format!("{base}/{name}"),
        name,
        admin: admin.to_string(),
    }
}

/// One test's S3 key prefix and database, which any number of nodes open.
pub struct Shared {
    pub prefix: String,
    pub pg_url: String,
    pub db: TestDatabase,
}

/// What keeps a test's stores alive: on S3 + PostgreSQL its [`Shared`] (whose database goes
/// when it is dropped); nothing on the filesystem.
pub type Guard = Option<Shared>;

impl Shared {
    /// A fresh prefix and database.
    pub async fn new() -> Shared {
        let db = fresh_database(&var("PIER_TEST_PG_URL")).await;
        Shared {
            prefix: format!("test-{}/", uuid::Uuid::new_v4().simple()),
            pg_url: db.url.clone(),
            db,
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

/// A test's stores on the backend `PIER_TEST_BACKEND` names (redb in memory on fs), and the
/// guard to keep while using them.
pub async fn stores(dir: &Path) -> (Arc<dyn BlobStore>, Arc<dyn MetaStore>, Guard) {
    let (blobs, meta, _, guard) = stores_with_pins(dir).await;
    (blobs, meta, guard)
}

/// [`stores`], with the pin store (the same database) as well.
pub async fn stores_with_pins(
    dir: &Path,
) -> (
    Arc<dyn BlobStore>,
    Arc<dyn MetaStore>,
    Arc<dyn PinStore>,
    Guard,
) {
    if s3pg() {
        let shared = Shared::new().await;
        let (blobs, meta, pins) = shared.open_with_pins(dir).await;
        (blobs, meta, pins, Some(shared))
    } else {
        let blobs = FsBlobStore::open(dir).await.expect("blob store");
        let redb = RedbMetaStore::in_memory().expect("meta store");
        (blobs, Arc::new(redb.clone()), Arc::new(redb), None)
    }
}
