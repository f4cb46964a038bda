//! The names archives give their images, made into a repository and a tag of this registry.
//!
//! An archive names an image as whoever saved it wrote it: `busybox:latest` (Docker's
//! `RepoTags`), `docker.io/library/busybox:latest` (Docker 25's `io.containerd.image.name`),
//! `pier-a.lan:5000/team/app:v1` (saved from another registry). The image is imported into
//! this registry, so the registry host is dropped, and Docker Hub's `library/` namespace with
//! it, so that the same image saved by any Docker version lands in the same repository.

use std::fmt;

/// A repository (before any configured prefix) and a tag.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageName {
    pub repo: String,
    pub tag: String,
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.repo, self.tag)
    }
}

/// Why an archive's name for an image cannot name a repository here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameProblem {
    #[error("{0:?} names an image by digest, not by tag")]
    Digest(String),
    #[error("{0:?} has no repository")]
    NoRepository(String),
}

/// Docker Hub's registry names, whose official images live under `library/`.
const DOCKER_HUB: &[&str] = &["docker.io", "index.docker.io", "registry-1.docker.io"];

/// Whether the first component of a name is a registry host (Docker's rule: it has a dot or a
/// port, or is `localhost`).
fn is_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// The repository and tag `raw` names here; a name without a tag means `latest`.
pub fn normalize(raw: &str) -> Result<ImageName, NameProblem> {
    if raw.contains('@') {
        return Err(NameProblem::Digest(raw.to_string()));
    }
    let (name, tag) = match raw.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, t),
        _ => (raw, "latest"),
    };
    let mut parts: Vec<&str> = name.split('/').collect();
    let mut hub = false;
    if parts.len() > 1 && is_host(parts[0]) {
        hub = DOCKER_HUB.contains(&parts[0]);
        parts.remove(0);
    }
    if hub && parts.len() == 2 && parts[0] == "library" {
        parts.remove(0);
    }
    let repo = parts.join("/");
    if repo.is_empty() || tag.is_empty() {
        return Err(NameProblem::NoRepository(raw.to_string()));
    }
    Ok(ImageName {
        repo,
        tag: tag.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::{normalize, NameProblem};

    fn check(raw: &str, want: &str) {
        assert_eq!(normalize(raw).map(|n| n.to_string()), Ok(want.to_string()));
    }

    #[test]
    fn every_docker_spelling_of_an_image_lands_in_one_repository() {
        check("busybox:latest", "busybox:latest");
        check("busybox", "busybox:latest");
        check("docker.io/library/busybox:1.36", "busybox:1.36");
        check("docker.io/team/app:v1", "team/app:v1");
        check("pier-a.lan:5000/team/app:v1", "team/app:v1");
        check("localhost/app:v1", "app:v1");
        check("team/app:v1", "team/app:v1");
        // library/ stays when it is not Docker Hub's.
        check("ghcr.io/library/app:v1", "library/app:v1");
        assert!(matches!(
            normalize("team/app@sha256:00"),
            Err(NameProblem::Digest(_))
        ));
        assert!(matches!(
            normalize("registry.lan:5000/"),
            Err(NameProblem::NoRepository(_))
        ));
    }
}
