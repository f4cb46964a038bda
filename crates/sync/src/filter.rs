//! Which of an upstream repository's tags a pull rule copies: regular expressions to include
//! and exclude, a semver range, and the newest N of what is left.
//!
//! Tags are names, not dates: "newest" orders by version when every tag left parses as one
//! (`1.10` after `1.9`), otherwise by name, greatest last. Finding out when an image was built
//! would cost a config blob fetch per tag, which a filter run over hundreds of tags must not.

use regex::Regex;
use semver::{Version, VersionReq};

/// A compiled tag filter.
#[derive(Debug, Clone)]
pub struct TagFilter {
    include: Vec<Regex>,
    exclude: Vec<Regex>,
    range: Option<VersionReq>,
    newest: Option<usize>,
}

impl TagFilter {
    pub fn new(
        include: &[String],
        exclude: &[String],
        range: Option<&str>,
        newest: Option<usize>,
    ) -> Result<TagFilter, String> {
        let compile = |patterns: &[String]| {
            patterns
                .iter()
                .map(|p| Regex::new(p).map_err(|e| format!("tag pattern {p:?}: {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        let range = range
            .map(|r| VersionReq::parse(r).map_err(|e| format!("semver range {r:?}: {e}")))
            .transpose()?;
        if newest == Some(0) {
            return Err("newest = 0 would copy nothing".into());
        }
        Ok(TagFilter {
            include: compile(include)?,
            exclude: compile(exclude)?,
            range,
            newest,
        })
    }

    /// The tags to copy, in the order they should be copied (oldest first).
    pub fn select(&self, tags: &[String]) -> Vec<String> {
        let mut kept: Vec<&String> = tags
            .iter()
            .filter(|t| self.include.is_empty() || self.include.iter().any(|r| r.is_match(t)))
            .filter(|t| !self.exclude.iter().any(|r| r.is_match(t)))
            .filter(|t| {
                self.range
                    .as_ref()
                    .is_none_or(|range| version(t).is_some_and(|v| range.matches(&v)))
            })
            .collect();
        let versions: Option<Vec<Version>> = kept.iter().map(|t| version(t)).collect();
        match versions {
            Some(versions) if !kept.is_empty() => {
                let mut pairs: Vec<(Version, &String)> = versions.into_iter().zip(kept).collect();
                // Equal versions (`1.2` and `v1.2.0`) fall back to the name, so the order is
                // the same on every run.
                pairs.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
                kept = pairs.into_iter().map(|(_, t)| t).collect();
            }
            _ => kept.sort(),
        }
        if let Some(n) = self.newest {
            let skip = kept.len().saturating_sub(n);
            kept.drain(..skip);
        }
        kept.into_iter().cloned().collect()
    }
}

/// A tag read as a version: an optional `v`, then one to three numbers, then an optional
/// pre-release or build suffix (`v1.2`, `3.18.4`, `2.0.0-rc.1`).
pub fn version(tag: &str) -> Option<Version> {
    let t = tag.strip_prefix('v').unwrap_or(tag);
    let end = t.find(['-', '+']).unwrap_or(t.len());
    let (core, rest) = t.split_at(end);
    let parts: Vec<&str> = core.split('.').collect();
    if parts.is_empty() || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    if !parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    let mut full = parts.join(".");
    for _ in parts.len()..3 {
        full.push_str(".0");
    }
    Version::parse(&format!("{full}{rest}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One case: the filter's settings, the upstream's tags, the tags to copy.
    fn check(
        include: &[&str],
        exclude: &[&str],
        range: Option<&str>,
        newest: Option<usize>,
        tags: &[&str],
        want: &[&str],
    ) {
        let s = |v: &[&str]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        let f = TagFilter::new(&s(include), &s(exclude), range, newest).unwrap();
        assert_eq!(
            f.select(&s(tags)),
            s(want),
            "include {include:?} exclude {exclude:?} range {range:?} newest {newest:?}"
        );
    }

    #[test]
    fn selects_the_tags_a_rule_names() {
        let tags = [
            "latest",
            "1.9",
            "1.10",
            "1.10.1",
            "2.0.0-rc.1",
            "2.0",
            "v2.1",
            "edge",
        ];
        check(&[], &[], None, None, &["b", "a"], &["a", "b"]);
        check(
            &[r"^1\."],
            &[],
            None,
            None,
            &tags,
            &["1.9", "1.10", "1.10.1"],
        );
        check(&[r"^1\."], &[r"\.1$"], None, None, &tags, &["1.9", "1.10"]);
        check(
            &[],
            &[],
            Some(">=1.10, <2"),
            None,
            &tags,
            &["1.10", "1.10.1"],
        );
        // Pre-releases only match a range that names one, as semver says.
        check(&[], &[], Some(">=2"), None, &tags, &["2.0", "v2.1"]);
        check(
            &[],
            &["rc"],
            None,
            Some(3),
            &tags[1..7],
            &["1.10.1", "2.0", "v2.1"],
        );
        // Tags that are not all versions are ordered by name.
        check(&[], &[], None, Some(2), &tags, &["latest", "v2.1"]);
        check(&["^nothing$"], &[], None, Some(2), &tags, &[]);
    }

    #[test]
    fn tags_as_versions() {
        assert_eq!(version("v1.2"), Version::parse("1.2.0").ok());
        assert_eq!(version("3"), Version::parse("3.0.0").ok());
        assert_eq!(version("2.0.0-rc.1"), Version::parse("2.0.0-rc.1").ok());
        for not in ["latest", "1.2.3.4", "1..2", "v", "1.x", "alpine-3"] {
            assert_eq!(version(not).map(|v| v.to_string()), None, "{not}");
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(TagFilter::new(&["(".into()], &[], None, None).is_err());
        assert!(TagFilter::new(&[], &[], Some(">>1"), None).is_err());
        assert!(TagFilter::new(&[], &[], None, Some(0)).is_err());
    }
}
