//! Jobs as `pier sync status` and `GET /api/v1/sync/jobs` show them: one row per job with
//! `id`, `kind`, `image`, `target`, `state`, `attempts` and `last_error`, plus the rule and the
//! job's times. Rows are made from any job of the queue, so cluster replication to owners
//! (`replicate-blob`, `replicate-manifest`) and imports (`import`, with the `file` and the
//! `images` it made visible) show beside the sync rules' jobs.

use pier_store::jobs::{Job, JobState};
use serde::{Deserialize, Serialize};

/// One job, as the status surfaces show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRow {
    pub id: u64,
    pub kind: String,
    pub image: String,
    pub target: String,
    pub state: JobState,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// The rule that made the job; empty for jobs no rule made.
    #[serde(default)]
    pub rule: String,
    /// For an import: the archive's file name (`upload` for a body sent without one).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub file: String,
    /// For an import: the images it made visible, `repo:tag`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// When a queued or retrying job runs next.
    pub next_at_ms: u64,
}

impl JobRow {
    pub fn from_job(job: &Job) -> JobRow {
        let p = &job.payload;
        let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
        // Cluster replication to owners keeps what it asks of the owner in `pull`.
        let images: Vec<String> = p["images"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i.as_str())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        let (image, target) = if job.kind == "import" {
            (images.join(", "), String::new())
        } else if p.get("image").is_some() {
            (text(&p["image"]), text(&p["target"]))
        } else if let Some(pull) = p.get("pull") {
            let repo = text(&pull["repo"]);
            let image = match pull["tag"].as_str() {
                Some(tag) => format!("{repo}:{tag}"),
                None => format!("{repo}@{}", text(&pull["digest"])),
            };
            (image, text(&p["target"]))
        } else {
            (job.key.clone(), String::new())
        };
        JobRow {
            id: job.id,
            kind: job.kind.clone(),
            image,
            target,
            state: job.state,
            attempts: job.attempts,
            last_error: job.last_error.clone(),
            rule: text(&p["rule"]),
            file: if job.kind == "import" {
                text(&p["file"])
            } else {
                String::new()
            },
            images: if job.kind == "import" {
                images
            } else {
                Vec::new()
            },
            created_ms: job.created_ms,
            updated_ms: job.updated_ms,
            next_at_ms: job.next_at_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn job(kind: &str, payload: serde_json::Value) -> Job {
        Job {
            id: 7,
            kind: kind.into(),
            key: "k".into(),
            payload,
            state: JobState::Retrying,
            attempts: 2,
            last_error: Some("target answered 503".into()),
            next_at_ms: 3,
            created_ms: 1,
            updated_ms: 2,
        }
    }

    #[test]
    fn rows_name_the_image_and_the_target() {
        let row = JobRow::from_job(&job(
            "replicate",
            json!({"rule": "dc2", "image": "team/app:1", "target": "http://dc2:5000", "repo": "team/app"}),
        ));
        assert_eq!(
            (row.image.as_str(), row.target.as_str(), row.rule.as_str()),
            ("team/app:1", "http://dc2:5000", "dc2")
        );
        let v = serde_json::to_value(&row).unwrap();
        for field in [
            "id",
            "kind",
            "image",
            "target",
            "state",
            "attempts",
            "last_error",
        ] {
            assert!(v.get(field).is_some(), "{field} in {v}");
        }
        assert_eq!(v["state"], "retrying");

        let owners = JobRow::from_job(&job(
            "replicate-blob",
            json!({"target": "node-b", "key": "sha256:ab", "pull": {"kind": "blob", "repo": "team/app", "digest": "sha256:ab"}}),
        ));
        assert_eq!(owners.image, "team/app@sha256:ab");
        assert_eq!(owners.target, "node-b");
        assert_eq!(owners.rule, "");

        let import = JobRow::from_job(&job(
            "import",
            json!({"file": "app.tar", "path": "/in/app.tar", "images": ["team/app:1", "team/app:latest"]}),
        ));
        assert_eq!(import.file, "app.tar");
        assert_eq!(import.images, ["team/app:1", "team/app:latest"]);
        assert_eq!(import.image, "team/app:1, team/app:latest");
        assert_eq!(import.target, "");
        let v = serde_json::to_value(&import).unwrap();
        assert_eq!(v["file"], "app.tar");
        assert!(serde_json::to_value(&owners).unwrap().get("file").is_none());
    }
}
