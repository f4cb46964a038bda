//! The watched folder (`[import] watch = "DIR"`): archives that appear in it are imported once
//! they are stable, then kept, deleted or moved to `done/`; a file that fails goes to
//! `failed/` with `<name>.reason` beside it.
//!
//! File system events (through `notify`) only wake the loop early: the folder is listed again
//! every `rescan` as well, since inotify sees nothing of what another machine writes to a
//! network share. A file is stable when its size and modification time have not changed for
//! `stable`; names that writers use while a file is incomplete (`*.tmp`, `*.part`, rsync's
//! `.name.XXXXXX`, any dot file) are never taken. Files are imported one at a time.
//!
//! Each file taken is a row of the job queue ([`super::job`]); a file the store could not
//! take is left to the queue, which imports it again when its row is due.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use notify::Watcher;
use tokio::sync::{mpsc, watch as tokio_watch};

use super::job::{self, Begun, ImportPayload};
use super::{import_reader, ImportReport, Outcome};
use crate::AppState;
use async_trait::async_trait;
use pier_store::jobs::{Job, JobFailure, JobHandler, RetryPolicy};

/// What happens to an archive once it is imported (or found to be a duplicate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Keep,
    Delete,
    Move,
}

/// The watched folder's settings (`[import]`).
#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub dir: PathBuf,
    /// How long a file's size and mtime must stay the same before it is imported.
    pub stable: Duration,
    /// How often the folder is listed even without file system events.
    pub rescan: Duration,
    pub after: After,
    /// What `pier check` reads of the watcher.
    pub health: Arc<WatchHealth>,
}

/// The watcher as `pier check` sees it: whether it runs, whether file system events arrive.
#[derive(Debug, Default)]
pub struct WatchHealth {
    running: AtomicBool,
    /// True while file system events are subscribed (else the folder is only listed).
    events_on: AtomicBool,
    events: AtomicU64,
    /// Why the watcher stopped, or why it has no events.
    problem: Mutex<Option<String>>,
}

impl WatchHealth {
    pub fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }
    pub fn events_on(&self) -> bool {
        self.events_on.load(Ordering::Relaxed)
    }
    /// File system events received so far.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    fn set_problem(&self, why: String) {
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }
}

/// Clears `running` however the loop ends.
struct Running(Arc<WatchHealth>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Relaxed);
    }
}

/// Whether a name is one writers use for files not yet complete, or a hidden file.
pub fn ignored(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    name.starts_with('.')
        || name.ends_with('~')
        || [
            ".tmp",
            ".part",
            ".partial",
            ".crdownload",
            ".swp",
            ".reason",
        ]
        .iter()
        .any(|s| lower.ends_with(s))
}

/// A file seen in the folder, and since when it has looked like this.
struct Seen {
    size: u64,
    mtime: Option<SystemTime>,
    since: Instant,
}

/// When the loop should look again while files wait to become stable.
const TICK: Duration = Duration::from_millis(250);

/// Watch `cfg.dir` until `stop` turns true.
pub async fn run(state: AppState, cfg: WatchConfig, mut stop: tokio_watch::Receiver<bool>) {
    let health = cfg.health.clone();
    health.running.store(true, Ordering::Relaxed);
    let _running = Running(health.clone());
    for sub in ["", "done", "failed"] {
        if let Err(e) = tokio::fs::create_dir_all(cfg.dir.join(sub)).await {
            tracing::error!(dir = %cfg.dir.display(), error = %e,
                "cannot create the import folder; not watching it");
            health.set_problem(format!(
                "cannot create {}: {e}",
                cfg.dir.join(sub).display()
            ));
            return;
        }
    }
    let (tx, mut events) = mpsc::channel::<()>(1);
    let counter = health.clone();
    let watcher = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
        counter.events.fetch_add(1, Ordering::Relaxed);
        // A full channel already holds a wake-up; the listing sees everything.
        let _ = tx.try_send(());
    })
    .and_then(|mut w| {
        w.watch(&cfg.dir, notify::RecursiveMode::NonRecursive)
            .map(|()| w)
    });
    let _watcher = match watcher {
        Ok(w) => {
            health.events_on.store(true, Ordering::Relaxed);
            Some(w)
        }
        Err(e) => {
            tracing::warn!(dir = %cfg.dir.display(), error = %e,
                "no file system events for the import folder; listing it every rescan");
            health.set_problem(format!("no file system events: {e}"));
            None
        }
    };
    tracing::info!(dir = %cfg.dir.display(), "watching for archives to import");
    let mut seen: HashMap<PathBuf, Seen> = HashMap::new();
    // Files kept after import (or waiting after a store failure), as they were then: not
    // taken again unless they change.
    let mut settled: HashMap<PathBuf, (u64, Option<SystemTime>, Option<Instant>)> = HashMap::new();
    loop {
        let ready = scan(&cfg, &mut seen, &settled).await;
        for path in ready {
            if *stop.borrow() {
                return;
            }
            seen.remove(&path);
            let meta = tokio::fs::metadata(&path).await.ok();
            let as_seen = (
                meta.as_ref().map_or(0, |m| m.len()),
                meta.as_ref().and_then(|m| m.modified().ok()),
            );
            let payload = ImportPayload {
                file: file_name(&path),
                path: Some(path.display().to_string()),
                ..ImportPayload::default()
            };
            let row = match job::begin(&state, &job::watched_key(&path), &payload).await {
                Begun::Busy => {
                    // A job of the queue has this file (one a stop interrupted, or one
                    // retrying after a store failure): it imports it.
                    settled.insert(path, (as_seen.0, as_seen.1, None));
                    continue;
                }
                Begun::Row(id) => Some(id),
                Begun::NoRow => None,
            };
            let report = import_path(&state, &cfg, &path).await;
            let outcome = report.result;
            if let Some(id) = row {
                let retry_at = pier_store::jobs::unix_ms()
                    .saturating_add(retry_delay(&cfg).as_millis() as u64);
                job::end(&state, id, &report, Some(retry_at)).await;
            }
            match (outcome, cfg.after) {
                // The row is retrying: the queue imports the file again when it is due.
                (Outcome::Retry, _) if row.is_some() => {
                    settled.insert(path, (as_seen.0, as_seen.1, None));
                }
                (Outcome::Retry, _) => {
                    settled.insert(
                        path,
                        (
                            meta.as_ref().map_or(0, |m| m.len()),
                            meta.and_then(|m| m.modified().ok()),
                            Some(Instant::now() + retry_delay(&cfg)),
                        ),
                    );
                }
                (Outcome::Imported | Outcome::Duplicate, After::Keep) => {
                    settled.insert(
                        path,
                        (
                            meta.as_ref().map_or(0, |m| m.len()),
                            meta.and_then(|m| m.modified().ok()),
                            None,
                        ),
                    );
                }
                _ => {
                    settled.remove(&path);
                }
            }
        }
        settled.retain(|p, _| p.exists());
        let wait = if seen.is_empty() { cfg.rescan } else { TICK };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            Some(()) = events.recv() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// List the folder, note what changed, and return the files that have been stable long enough.
async fn scan(
    cfg: &WatchConfig,
    seen: &mut HashMap<PathBuf, Seen>,
    settled: &HashMap<PathBuf, (u64, Option<SystemTime>, Option<Instant>)>,
) -> Vec<PathBuf> {
    let mut rd = match tokio::fs::read_dir(&cfg.dir).await {
        Ok(rd) => rd,
        Err(e) => {
            tracing::warn!(dir = %cfg.dir.display(), error = %e, "listing the import folder failed");
            return Vec::new();
        }
    };
    let now = Instant::now();
    let mut present = Vec::new();
    let mut ready = Vec::new();
    while let Ok(Some(entry)) = rd.next_entry().await {
        let name = entry.file_name().to_string_lossy().into_owned();
        if ignored(&name) {
            continue;
        }
        let Ok(meta) = entry.metadata().await else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let path = entry.path();
        let (size, mtime) = (meta.len(), meta.modified().ok());
        if let Some((s, m, retry_at)) = settled.get(&path) {
            let unchanged = *s == size && *m == mtime;
            if unchanged && retry_at.is_none_or(|t| now < t) {
                continue;
            }
        }
        present.push(path.clone());
        match seen.get_mut(&path) {
            Some(s) if s.size == size && s.mtime == mtime => {
                if now.duration_since(s.since) >= cfg.stable {
                    ready.push(path);
                }
            }
            Some(s) => {
                *s = Seen {
                    size,
                    mtime,
                    since: now,
                };
            }
            None => {
                seen.insert(
                    path,
                    Seen {
                        size,
                        mtime,
                        since: now,
                    },
                );
            }
        }
    }
    seen.retain(|p, _| present.contains(p));
    ready.sort();
    ready
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Import one file and put it where its outcome says.
pub(crate) async fn import_path(state: &AppState, cfg: &WatchConfig, path: &Path) -> ImportReport {
    let name = file_name(path);
    let report = match std::fs::File::open(path) {
        Ok(f) => {
            let reader = std::io::BufReader::with_capacity(1 << 20, f);
            import_reader(state, &name, Box::new(reader)).await
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot open the archive");
            let mut report = ImportReport::new(&name);
            report.result = Outcome::Retry;
            report.error = Some(format!("cannot open the archive: {e}"));
            return report;
        }
    };
    let moved = match (report.result, cfg.after) {
        (Outcome::Retry, _) => Ok(()),
        (Outcome::Imported | Outcome::Duplicate, After::Keep) => Ok(()),
        (Outcome::Imported | Outcome::Duplicate, After::Delete) => std::fs::remove_file(path),
        (Outcome::Imported | Outcome::Duplicate, After::Move) => {
            move_into(path, &cfg.dir.join("done"), &name).map(|_| ())
        }
        (Outcome::Failed, _) => move_into(path, &cfg.dir.join("failed"), &name).and_then(|to| {
            let reason = report.error.clone().unwrap_or_default();
            let mut reason_path = to.into_os_string();
            reason_path.push(".reason");
            std::fs::write(reason_path, format!("{reason}\n"))
        }),
    };
    if let Err(e) = moved {
        tracing::warn!(file = %path.display(), error = %e, "cannot move the archive after import");
    }
    report
}

/// Rename `path` into `dir` as `name`, or `name.1`, `name.2`… if that is taken; returns where.
fn move_into(path: &Path, dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    for n in 0..1000 {
        let to = if n == 0 {
            dir.join(name)
        } else {
            dir.join(format!("{name}.{n}"))
        };
        if to.exists() {
            continue;
        }
        std::fs::rename(path, &to)?;
        return Ok(to);
    }
    Err(std::io::Error::other(format!(
        "{} already holds 1000 files named {name}",
        dir.display()
    )))
}

/// The runner's handler for import jobs it takes: a watched file due again (after a store
/// failure, or a stop mid-import) is imported again from where it was; an upload cannot be.
pub struct ImportJobs {
    pub state: AppState,
    /// The watched folder, when this node has one.
    pub watch: Option<WatchConfig>,
}

/// How long a watched file that met a store failure waits before it is imported again.
pub fn retry_delay(cfg: &WatchConfig) -> Duration {
    cfg.rescan.max(Duration::from_secs(30))
}

#[async_trait]
impl JobHandler for ImportJobs {
    async fn run(&self, job: &Job) -> Result<(), JobFailure> {
        let payload = ImportPayload::of(job);
        let Some(path) = payload.path.as_ref().map(PathBuf::from) else {
            return Err(JobFailure::fatal(
                "the import of this upload did not finish, and an upload is not kept: send the \
                 file again (pier import FILE)",
            ));
        };
        let Some(cfg) = &self.watch else {
            return Err(JobFailure::fatal(
                "this node no longer watches a folder for archives",
            ));
        };
        if !path.exists() {
            return Err(JobFailure::fatal(format!(
                "{} is no longer in the watched folder",
                payload.file
            )));
        }
        let report = import_path(&self.state, cfg, &path).await;
        if let Some(runner) = &self.state.import.jobs {
            let mut payload = payload;
            payload.fill(&report);
            let mut row = job.clone();
            row.payload = serde_json::to_value(&payload).unwrap_or_default();
            if let Err(e) = runner.store().update(&row).await {
                tracing::warn!(id = job.id, error = %e, "recording what the import found failed");
            }
        }
        let why = report.error.unwrap_or_default();
        match report.result {
            Outcome::Imported | Outcome::Duplicate => Ok(()),
            Outcome::Failed => Err(JobFailure::fatal(why)),
            Outcome::Retry => Err(JobFailure::retry(why)),
        }
    }

    fn retry_policy(&self, _job: &Job) -> Option<RetryPolicy> {
        // The watched folder's own pace: the same wait every time, for as long as it takes.
        let delay = self
            .watch
            .as_ref()
            .map_or(Duration::from_secs(30), retry_delay);
        Some(RetryPolicy {
            first_delay: delay,
            max_delay: delay,
            max_attempts: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ignored;

    #[test]
    fn names_of_incomplete_and_hidden_files_are_ignored() {
        for n in [
            "app.tar.part",
            "app.tar.tmp",
            ".app.tar.Xa81b2",
            ".hidden.tar",
            "app.tar~",
            "app.TAR.PART",
        ] {
            assert!(ignored(n), "{n}");
        }
        for n in ["app.tar", "app.tar.gz", "app.oci.tar.zst", "partition.tar"] {
            assert!(!ignored(n), "{n}");
        }
    }
}
