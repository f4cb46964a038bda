//! The rules as configured: `[[sync]]` tables (pull rules) and `[[replicate]]` tables (push
//! rules), with the knobs every rule shares (retries, schedule, bandwidth). They deserialize
//! from pier's TOML configuration and are checked by [`PullRule::validate`] and
//! [`PushRule::validate`] before anything runs, so a typo fails at start, not at 3 a.m.

use std::time::Duration;

use pier_store::RetryPolicy;
use pier_units::{HumanDuration, Rate};
use serde::{Deserialize, Deserializer};

use crate::filter::TagFilter;
use crate::schedule::Schedule;
use crate::SyncError;

/// How a rule's failing jobs are retried: `retries` after the first attempt (then the job is
/// failed), the first `retry_initial` after the first failure, doubling up to `retry_max`.
fn policy(retries: u32, initial: HumanDuration, max: HumanDuration) -> RetryPolicy {
    RetryPolicy {
        first_delay: initial.0,
        max_delay: max.0.max(initial.0),
        max_attempts: retries.saturating_add(1),
    }
}

fn default_retries() -> u32 {
    3
}

fn default_retry_initial() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

fn default_retry_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}

/// `[[sync]]`: copy images from an upstream into this node, on a schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullRule {
    /// What `pier sync run NAME` and the status call the rule.
    pub name: String,
    /// A configured upstream (`docker.io`, or a `[[upstream]]` name).
    pub upstream: String,
    /// One repository on the upstream (`library/alpine`)…
    #[serde(default)]
    pub repository: Option<String>,
    /// …or every repository under this prefix (`team/`), from the upstream's catalog.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Tags whose name matches any of these regular expressions (all tags when empty).
    #[serde(default)]
    pub include: Vec<String>,
    /// Tags whose name matches any of these are left out, whatever else matches.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Only tags that are versions in this semver range (`">=1.2, <2"`); a leading `v` and
    /// missing minor or patch numbers are allowed in tags (`v1.2` is 1.2.0).
    #[serde(default)]
    pub semver: Option<String>,
    /// Only the newest N of the tags left: by version when they are versions, otherwise by
    /// name, last first.
    #[serde(default)]
    pub newest: Option<usize>,
    /// For indexes: only these platforms' images (`linux/amd64`, `linux/arm64/v8`); all when
    /// empty. The index itself is always kept.
    #[serde(default)]
    pub platforms: Vec<String>,
    /// Run every this long (and once at start).
    #[serde(default)]
    pub interval: Option<HumanDuration>,
    /// Or at the times of this cron expression (five fields, UTC).
    #[serde(default)]
    pub cron: Option<String>,
    /// Also keep the images in this hosted repository (besides the mirror cache), where
    /// pushes and push rules see them.
    #[serde(default)]
    pub into: Option<String>,
    /// Jobs of this rule running at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Bytes per second the fills this rule's jobs start may read from the upstream,
    /// together (beside the node's `[mirror] max_upstream_rate`).
    #[serde(default)]
    pub bandwidth: Option<Rate>,
    /// Retries after the first attempt before a job is failed (`0`: none).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// The wait before the first retry; it doubles with each further one.
    #[serde(default = "default_retry_initial")]
    pub retry_initial: HumanDuration,
    /// The longest wait between two attempts.
    #[serde(default = "default_retry_max")]
    pub retry_max: HumanDuration,
}

fn default_concurrency() -> usize {
    2
}

fn default_true() -> bool {
    true
}

/// Where a push rule sends images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every other node of this cluster.
    Cluster,
    /// An OCI registry at this base URL.
    Registry(String),
}

impl Target {
    pub fn parse(s: &str) -> Result<Target, String> {
        let s = s.trim();
        if s == "cluster" {
            return Ok(Target::Cluster);
        }
        if !(s.starts_with("http://") || s.starts_with("https://")) {
            return Err(format!(
                "target {s:?} must be \"cluster\" or a registry URL starting with http:// or \
                 https://"
            ));
        }
        Ok(Target::Registry(s.trim_end_matches('/').to_string()))
    }

    /// How status rows name it.
    pub fn label(&self) -> String {
        match self {
            Target::Cluster => "cluster".to_string(),
            Target::Registry(url) => url.clone(),
        }
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Target::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `[[replicate]]`: send pushed images to another registry or to every node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushRule {
    pub name: String,
    /// Repository globs whose images are replicated (`*` within a path component, `**`
    /// across).
    pub repositories: Vec<String>,
    pub target: Target,
    /// Credentials for the target registry.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Put into the target under this prefix (`site-a/` makes `team/app` `site-a/team/app`).
    #[serde(default)]
    pub prefix: String,
    /// Replicate each push as it happens.
    #[serde(default = "default_true")]
    pub on_push: bool,
    /// Also go over every matching image on a schedule (what a push missed is sent then).
    #[serde(default)]
    pub interval: Option<HumanDuration>,
    #[serde(default)]
    pub cron: Option<String>,
    /// Whether deleting a manifest here deletes it at the target.
    #[serde(default)]
    pub deletes: bool,
    /// Jobs running at once against the target (per node for `cluster`).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Bytes per second this rule's uploads may send, together.
    #[serde(default)]
    pub bandwidth: Option<Rate>,
    /// Retries after the first attempt before a job is failed (`0`: none).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// The wait before the first retry; it doubles with each further one.
    #[serde(default = "default_retry_initial")]
    pub retry_initial: HumanDuration,
    /// The longest wait between two attempts.
    #[serde(default = "default_retry_max")]
    pub retry_max: HumanDuration,
}

impl PushRule {
    /// The rule a cluster gets when no `[[replicate]]` rule targets `cluster`: every hosted
    /// push to every node.
    pub fn default_cluster() -> PushRule {
        PushRule {
            name: "cluster".to_string(),
            repositories: vec!["**".to_string()],
            target: Target::Cluster,
            username: None,
            password: None,
            prefix: String::new(),
            on_push: true,
            interval: None,
            cron: None,
            deletes: false,
            concurrency: default_concurrency(),
            bandwidth: None,
            retries: default_retries(),
            retry_initial: default_retry_initial(),
            retry_max: default_retry_max(),
        }
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        policy(self.retries, self.retry_initial, self.retry_max)
    }

    pub fn matches(&self, repo: &str) -> bool {
        self.repositories
            .iter()
            .any(|g| pier_mirror::glob::matches(g, repo))
    }

    pub fn schedule(&self) -> Result<Option<Schedule>, SyncError> {
        Schedule::from_parts(&self.name, self.interval, self.cron.as_deref())
    }

    pub fn validate(&self) -> Result<(), SyncError> {
        check_name(&self.name)?;
        if self.repositories.is_empty() {
            return Err(SyncError::Config(format!(
                "[[replicate]] {}: repositories is empty (\"**\" for all)",
                self.name
            )));
        }
        if !self.on_push && self.interval.is_none() && self.cron.is_none() {
            return Err(SyncError::Config(format!(
                "[[replicate]] {}: never runs (on_push = false and no interval or cron)",
                self.name
            )));
        }
        if self.target == Target::Cluster && (self.username.is_some() || !self.prefix.is_empty()) {
            return Err(SyncError::Config(format!(
                "[[replicate]] {}: the cluster target takes no credentials or prefix",
                self.name
            )));
        }
        self.schedule()?;
        Ok(())
    }
}

impl PullRule {
    pub fn retry_policy(&self) -> RetryPolicy {
        policy(self.retries, self.retry_initial, self.retry_max)
    }

    pub fn schedule(&self) -> Result<Option<Schedule>, SyncError> {
        Schedule::from_parts(&self.name, self.interval, self.cron.as_deref())
    }

    pub fn filter(&self) -> Result<TagFilter, SyncError> {
        TagFilter::new(
            &self.include,
            &self.exclude,
            self.semver.as_deref(),
            self.newest,
        )
        .map_err(|e| SyncError::Config(format!("[[sync]] {}: {e}", self.name)))
    }

    pub fn validate(&self) -> Result<(), SyncError> {
        check_name(&self.name)?;
        match (&self.repository, &self.prefix) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => {
                return Err(SyncError::Config(format!(
                    "[[sync]] {}: give exactly one of repository or prefix",
                    self.name
                )))
            }
        }
        if self.into.is_some() && self.prefix.is_some() {
            return Err(SyncError::Config(format!(
                "[[sync]] {}: into names one repository, so it goes with repository, not prefix",
                self.name
            )));
        }
        for p in &self.platforms {
            if p.split('/').count() < 2 {
                return Err(SyncError::Config(format!(
                    "[[sync]] {}: platform {p:?} is not os/arch[/variant]",
                    self.name
                )));
            }
        }
        self.filter()?;
        self.schedule()?;
        Ok(())
    }

    /// Whether a platform object of an index (`{"os": "linux", "architecture": "arm64",
    /// "variant": "v8"}`) is one the rule wants.
    pub fn wants_platform(&self, platform: Option<&serde_json::Value>) -> bool {
        if self.platforms.is_empty() {
            return true;
        }
        let Some(p) = platform else {
            // An entry without a platform (an attestation, say) is not an image to filter.
            return false;
        };
        let field = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("");
        let (os, arch, variant) = (field("os"), field("architecture"), field("variant"));
        self.platforms.iter().any(|want| {
            let mut parts = want.split('/');
            let w_os = parts.next().unwrap_or("");
            let w_arch = parts.next().unwrap_or("");
            let w_variant = parts.next();
            w_os == os && w_arch == arch && w_variant.is_none_or(|v| v == variant)
        })
    }
}

fn check_name(name: &str) -> Result<(), SyncError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SyncError::Config(format!(
            "rule name {name:?}: use letters, digits, '-', '_' and '.'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_filter_index_entries() {
        let rule: PullRule = toml_rule(
            "name = \"a\"\nupstream = \"docker.io\"\nrepository = \"library/alpine\"\n\
             platforms = [\"linux/amd64\", \"linux/arm64/v8\"]",
        );
        let p = |os: &str, arch: &str, variant: Option<&str>| {
            let mut v = serde_json::json!({"os": os, "architecture": arch});
            if let Some(variant) = variant {
                v["variant"] = variant.into();
            }
            v
        };
        assert!(rule.wants_platform(Some(&p("linux", "amd64", None))));
        assert!(rule.wants_platform(Some(&p("linux", "arm64", Some("v8")))));
        assert!(!rule.wants_platform(Some(&p("linux", "arm64", Some("v7")))));
        assert!(!rule.wants_platform(Some(&p("windows", "amd64", None))));
        assert!(!rule.wants_platform(None));
    }

    #[test]
    fn validation_names_the_rule_and_the_mistake() {
        let both: PullRule =
            toml_rule("name = \"x\"\nupstream = \"u\"\nrepository = \"a\"\nprefix = \"b/\"");
        let e = both.validate().unwrap_err().to_string();
        assert!(e.contains("[[sync]] x") && e.contains("exactly one"), "{e}");
        let bad_regex: PullRule =
            toml_rule("name = \"y\"\nupstream = \"u\"\nrepository = \"a\"\ninclude = [\"(\"]");
        let e = bad_regex.validate().unwrap_err().to_string();
        assert!(e.contains("[[sync]] y"), "{e}");
        assert!(Target::parse("ftp://x").is_err());
        assert_eq!(Target::parse("cluster"), Ok(Target::Cluster));
        assert_eq!(
            Target::parse("http://dc2:5000/"),
            Ok(Target::Registry("http://dc2:5000".into()))
        );
    }

    fn toml_rule<T: serde::de::DeserializeOwned>(text: &str) -> T {
        toml::from_str(text).unwrap()
    }
}
