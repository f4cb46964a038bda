//! Fuzzes `Manifest::parse` on raw bytes under several Content-Types: it may not panic, and every
//! descriptor digest of a parsed manifest (blobs, manifests, subject) re-parses from its Display.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pier_oci::{media, Descriptor, Digest, Manifest};

/// Content-Types to try, picked by the first input byte.
const CONTENT_TYPES: &[Option<&str>] = &[
    None,
    Some(media::OCI_MANIFEST),
    Some(media::OCI_INDEX),
    Some(media::DOCKER_MANIFEST),
    Some(media::DOCKER_MANIFEST_LIST),
    Some("application/json"),
    Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8"),
    Some(""),
];

fn check_descriptor(d: &Descriptor) {
    let again: Digest = d.digest.to_string().parse().expect("descriptor digest re-parses");
    assert_eq!(again, d.digest);
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else { return };
    let content_type = CONTENT_TYPES[first as usize % CONTENT_TYPES.len()];

    // The whole input as a body with no Content-Type, then the tail with the chosen one.
    for (bytes, ct) in [(data, None), (body, content_type)] {
        if let Ok(m) = Manifest::parse(bytes, ct) {
            m.blobs.iter().chain(&m.manifests).chain(&m.subject).for_each(check_descriptor);
        }
    }
});
