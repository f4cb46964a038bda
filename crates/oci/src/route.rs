//! The one parser of `/v2/` paths. Names have any number of segments, so a path is read from its
//! end: the trailing keywords decide the route and everything before them is the name.

use crate::digest::{Digest, DigestError};
use crate::name::{NameError, Reference, RepoName};

/// A parsed `/v2/` request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags { name: RepoName },
    /// `/v2/<name>/manifests/<reference>`
    Manifest {
        name: RepoName,
        reference: Reference,
    },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: RepoName, digest: Digest },
    /// `/v2/<name>/blobs/uploads/`
    UploadStart { name: RepoName },
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload { name: RepoName, id: String },
    /// `/v2/<name>/referrers/<digest>`
    Referrers { name: RepoName, digest: Digest },
}

impl Route {
    /// A low-cardinality label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Tags { .. } => "tags",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::UploadStart { .. } => "upload_start",
            Route::Upload { .. } => "upload",
            Route::Referrers { .. } => "referrers",
        }
    }

    /// The repository the route addresses, if any.
    pub fn name(&self) -> Option<&RepoName> {
        match self {
            Route::Base | Route::Catalog => None,
            Route::Tags { name }
            | Route::Manifest { name, .. }
            | Route::Blob { name, .. }
            | Route::UploadStart { name }
            | Route::Upload { name, .. }
            | Route::Referrers { name, .. } => Some(name),
        }
    }
}

/// Why a path is not a route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no route for this path")]
    NotFound,
    #[error("invalid repository name: {0}")]
    Name(NameError),
    #[error("invalid reference: {0}")]
    Reference(NameError),
    #[error("invalid digest: {0}")]
    Digest(DigestError),
    #[error("invalid upload id")]
    UploadId,
}

/// Whether `id` has the shape of an upload session id pier issues (a hyphenated UUID).
pub fn valid_upload_id(id: &str) -> bool {
    id.len() == 36
        && id.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

fn name(segments: &[&str]) -> Result<RepoName, RouteError> {
    segments.join("/").parse().map_err(RouteError::Name)
}

/// Parse a request path (the raw path, without query) into a route.
pub fn parse(path: &str) -> Result<Route, RouteError> {
    let rest = match path.strip_prefix("/v2") {
        Some("") | Some("/") => return Ok(Route::Base),
        Some(r) => r.strip_prefix('/').ok_or(RouteError::NotFound)?,
        None => return Err(RouteError::NotFound),
    };
    if rest == "_catalog" {
        return Ok(Route::Catalog);
    }
    let seg: Vec<&str> = rest.split('/').collect();
    let n = seg.len();
    let at = |i: usize| -> &str { seg[n - i] };

    // /<name>/blobs/uploads/  (and without the trailing slash)
    if n >= 4 && at(1).is_empty() && at(2) == "uploads" && at(3) == "blobs" {
        return Ok(Route::UploadStart {
            name: name(&seg[..n - 3])?,
        });
    }
    if n >= 3 && at(1) == "uploads" && at(2) == "blobs" {
        return Ok(Route::UploadStart {
            name: name(&seg[..n - 2])?,
        });
    }
    if n >= 4 && at(2) == "uploads" && at(3) == "blobs" {
        let id = at(1);
        if !valid_upload_id(id) {
            return Err(RouteError::UploadId);
        }
        return Ok(Route::Upload {
            name: name(&seg[..n - 3])?,
            id: id.to_ascii_lowercase(),
        });
    }
    if n >= 3 && at(2) == "tags" && at(1) == "list" {
        return Ok(Route::Tags {
            name: name(&seg[..n - 2])?,
        });
    }
    if n >= 3 && at(2) == "manifests" {
        let name = name(&seg[..n - 2])?;
        let reference = at(1).parse().map_err(RouteError::Reference)?;
        return Ok(Route::Manifest { name, reference });
    }
    if n >= 3 && at(2) == "blobs" {
        let name = name(&seg[..n - 2])?;
        let digest = at(1).parse().map_err(RouteError::Digest)?;
        return Ok(Route::Blob { name, digest });
    }
    if n >= 3 && at(2) == "referrers" {
        let name = name(&seg[..n - 2])?;
        let digest = at(1).parse().map_err(RouteError::Digest)?;
        return Ok(Route::Referrers { name, digest });
    }
    Err(RouteError::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn check(path: &str, expect: &str) {
        let got = match parse(path) {
            Ok(r) => format!(
                "{} {}",
                r.kind(),
                r.name().map(|n| n.as_str()).unwrap_or("-")
            ),
            Err(e) => format!("error {e:?}")
                .split('(')
                .next()
                .unwrap_or("")
                .to_string(),
        };
        assert_eq!(got, expect, "{path}");
    }

    #[test]
    fn routes() {
        check("/v2/", "base -");
        check("/v2", "base -");
        check("/v2/_catalog", "catalog -");
        check("/v2/a/tags/list", "tags a");
        check("/v2/a/b/c/tags/list", "tags a/b/c");
        check("/v2/a/manifests/latest", "manifest a");
        check(&format!("/v2/a/b/manifests/{D}"), "manifest a/b");
        check(&format!("/v2/a/blobs/{D}"), "blob a");
        check("/v2/a/blobs/uploads/", "upload_start a");
        check("/v2/a/blobs/uploads", "upload_start a");
        check(
            "/v2/a/blobs/uploads/0f0e8a4c-3c5b-4a8e-9d36-4d0d6bb5a1a1",
            "upload a",
        );
        check(&format!("/v2/a/referrers/{D}"), "referrers a");
        // Keywords are valid name components too.
        check(
            "/v2/blobs/manifests/manifests/x",
            "manifest blobs/manifests",
        );
        check("/v2/tags/tags/list", "tags tags");
        check(&format!("/v2/x/blobs/blobs/{D}"), "blob x/blobs");
        // Errors.
        check("/v3/a/tags/list", "error NotFound");
        check("/v2/a", "error NotFound");
        check("/v2/a/manifests/", "error Reference");
        check("/v2/A/manifests/latest", "error Name");
        check("/v2/../etc/manifests/latest", "error Name");
        check("/v2/a/%2e%2e/manifests/latest", "error Name");
        check("/v2/a/blobs/sha256:../../etc/passwd", "error NotFound");
        check("/v2/a/blobs/sha256:abc", "error Digest");
        check("/v2/a/blobs/uploads/../../x", "error NotFound");
        check("/v2/a/blobs/uploads/not-a-uuid", "error UploadId");
        check("/v2//manifests/latest", "error Name");
    }

    proptest! {
        #[test]
        fn never_panics(s in "/v2/[a-zA-Z0-9:/._%-]{0,80}") {
            let _ = parse(&s);
        }

        #[test]
        fn manifest_paths_round_trip(name in "[a-z0-9]{1,6}(/[a-z0-9]{1,6}){0,4}", tag in "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,20}") {
            let route = parse(&format!("/v2/{name}/manifests/{tag}"));
            prop_assert!(matches!(route, Ok(Route::Manifest { .. })), "{:?}", route);
            if let Ok(Route::Manifest { name: n, reference }) = route {
                prop_assert_eq!(n.as_str(), name.as_str());
                prop_assert_eq!(reference.to_string(), tag);
            }
        }
    }
}
