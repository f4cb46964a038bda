//! Fuzzes the `/v2/` route parser and the Reference, RepoName and Digest parsers: none may panic,
//! a parsed route's name is safe as a path (no empty, `.` or `..` component, no `%`), and every
//! parsed digest's Display re-parses to an equal digest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pier_oci::{route, Digest, Reference, RepoName, Route};

/// A repository name must be usable as a relative file path.
fn check_name(name: &RepoName) {
    assert!(!name.as_str().contains('%'), "'%' in name {name:?}");
    for c in name.components() {
        assert!(!c.is_empty() && c != "." && c != "..", "bad component {c:?} in {name:?}");
    }
}

/// Display of a digest must parse back to the same digest.
fn check_digest(d: &Digest) {
    let again: Digest = d.to_string().parse().expect("digest Display re-parses");
    assert_eq!(&again, d);
}

fn check_route(path: &str) {
    let Ok(r) = route::parse(path) else { return };
    if let Some(name) = r.name() {
        check_name(name);
    }
    match &r {
        Route::Blob { digest, .. } | Route::Referrers { digest, .. } => check_digest(digest),
        Route::Manifest { reference: Reference::Digest(d), .. } => check_digest(d),
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    // Paths reach the parser as &str; skip inputs that are not UTF-8.
    let Ok(s) = std::str::from_utf8(data) else { return };

    check_route(s);
    check_route(&format!("/v2/{s}"));

    if let Ok(Reference::Digest(d)) = s.parse::<Reference>() {
        check_digest(&d);
    }
    if let Ok(n) = s.parse::<RepoName>() {
        check_name(&n);
    }
    if let Ok(d) = s.parse::<Digest>() {
        check_digest(&d);
    }
});
