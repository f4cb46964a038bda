//! Repository names, tags and references, validated against the specification's grammar.

use std::fmt;
use std::str::FromStr;

use crate::digest::{Digest, DigestError};

/// The longest repository name pier accepts (the common limit of registries).
pub const MAX_NAME_LEN: usize = 255;
/// The longest tag the specification allows.
pub const MAX_TAG_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("repository name is empty")]
    Empty,
    #[error("repository name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("repository name component {0:?} does not match [a-z0-9]+((.|_|__|-+)[a-z0-9]+)*")]
    BadComponent(String),
    #[error("tag {0:?} does not match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
    BadTag(String),
    #[error("reference is neither a tag nor a digest: {0}")]
    BadReference(DigestError),
}

/// A repository name such as `library/nginx` or `docker.io/library/nginx`: any number of
/// `/`-separated components. Components never contain `/`, `..` or uppercase letters, so a name
/// is safe to use in a file path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() {
        return false;
    }
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    // Every component is runs of [a-z0-9]+ joined by one separator: ".", "_", "__" or "-"+.
    loop {
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

/// A name component, or a registry host with a port: `<component>:<digits>`.
fn valid_host_port(c: &str) -> bool {
    match c.split_once(':') {
        None => valid_component(c),
        Some((host, port)) => {
            valid_component(host)
                && !port.is_empty()
                && port.len() <= 5
                && port.bytes().all(|b| b.is_ascii_digit())
        }
    }
}

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components of the name.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The first component.
    pub fn first(&self) -> &str {
        self.0.split('/').next().unwrap_or("")
    }
}

impl FromStr for RepoName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        let many = s.contains('/');
        for (i, c) in s.split('/').enumerate() {
            // The first of several components may name a registry with a port
            // (`localhost:5001/team/app`), as mirror path prefixes do.
            let ok = if i == 0 && many {
                valid_host_port(c)
            } else {
                valid_component(c)
            };
            if !ok {
                return Err(NameError::BadComponent(c.chars().take(64).collect()));
            }
        }
        Ok(RepoName(s.to_string()))
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let first_ok = b
            .first()
            .is_some_and(|&x| x.is_ascii_alphanumeric() || x == b'_');
        let rest_ok = b
            .iter()
            .skip(1)
            .all(|&x| x.is_ascii_alphanumeric() || x == b'_' || x == b'.' || x == b'-');
        if first_ok && rest_ok && b.len() <= MAX_TAG_LEN {
            Ok(Tag(s.to_string()))
        } else {
            Err(NameError::BadTag(s.chars().take(64).collect()))
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// The `<reference>` of a manifest path: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            s.parse()
                .map(Reference::Digest)
                .map_err(NameError::BadReference)
        } else {
            s.parse().map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check_name(s: &str, ok: bool) {
        assert_eq!(s.parse::<RepoName>().is_ok(), ok, "{s:?}");
    }

    #[test]
    fn names() {
        for good in [
            "a",
            "library/nginx",
            "docker.io/library/nginx",
            "a/b/c/d/e/f",
            "my-repo",
            "my--repo",
            "my_repo",
            "my__repo",
            "a.b",
            "0",
            "localhost/x",
            "localhost:5000/x",
            "registry.example.com:443/team/app",
        ] {
            check_name(good, true);
        }
        for bad in [
            "",
            "A",
            "a//b",
            "/a",
            "a/",
            "..",
            "a/../b",
            "a/./b",
            "a___b",
            "a..b",
            "-a",
            "a-",
            "a_",
            "a%2fb",
            "a b",
            "localhost:5000",
            "a/localhost:5000/x",
            "localhost:/x",
            "localhost:5000:1/x",
            "localhost:123456/x",
            &"a".repeat(256),
        ] {
            check_name(bad, false);
        }
    }

    #[test]
    fn tags() {
        assert!("latest".parse::<Tag>().is_ok());
        assert!("_x".parse::<Tag>().is_ok());
        assert!("v1.2.3-rc_1".parse::<Tag>().is_ok());
        assert!("A".repeat(128).parse::<Tag>().is_ok());
        assert!("A".repeat(129).parse::<Tag>().is_err());
        assert!(".x".parse::<Tag>().is_err());
        assert!("-x".parse::<Tag>().is_err());
        assert!("".parse::<Tag>().is_err());
        assert!("a/b".parse::<Tag>().is_err());
    }

    #[test]
    fn references() {
        assert!(matches!(
            "latest".parse::<Reference>(),
            Ok(Reference::Tag(_))
        ));
        assert!(matches!(
            format!("sha256:{}", "0".repeat(64)).parse::<Reference>(),
            Ok(Reference::Digest(_))
        ));
        assert!("sha256:zz".parse::<Reference>().is_err());
    }

    proptest! {
        #[test]
        fn valid_names_never_escape_a_directory(s in "[a-z0-9._/-]{1,40}") {
            if let Ok(n) = s.parse::<RepoName>() {
                for c in n.components() {
                    prop_assert!(c != "." && c != ".." && !c.is_empty());
                    prop_assert!(!c.starts_with('.'));
                }
            }
        }

        #[test]
        fn generated_names_parse(parts in proptest::collection::vec("[a-z0-9]{1,5}([._-][a-z0-9]{1,5}){0,2}", 1..6)) {
            let s = parts.join("/");
            prop_assume!(s.len() <= MAX_NAME_LEN);
            prop_assert_eq!(s.parse::<RepoName>().map(|n| n.to_string()), Ok(s.clone()));
        }
    }
}
