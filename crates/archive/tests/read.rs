//! Archives built here in every layout pier reads, read back through a sink in memory: the
//! images, names and blobs come out as the saver meant them, and broken archives fail with
//! the reason.

use std::collections::HashMap;
use std::io::{Read, Write};

use pier_archive::read::{read_archive, ArchiveError, BlobSink, SinkError};
use pier_archive::{Compression, Format};
use pier_oci::{Digest, Hasher};
use serde_json::json;

/// Blobs in memory, counting what was written.
#[derive(Default)]
struct MemSink {
    blobs: HashMap<Digest, Vec<u8>>,
    puts: usize,
}

impl BlobSink for MemSink {
    fn has(&mut self, digest: &Digest) -> Result<bool, SinkError> {
        Ok(self.blobs.contains_key(digest))
    }

    fn put(
        &mut self,
        expected: Option<&Digest>,
        body: &mut dyn Read,
    ) -> Result<(Digest, u64), SinkError> {
        let mut bytes = Vec::new();
        body.read_to_end(&mut bytes)
            .map_err(|e| SinkError::Store(e.to_string()))?;
        let mut h = Hasher::new(pier_oci::Algorithm::Sha256);
        h.update(&bytes);
        let actual = h.finish();
        if let Some(e) = expected {
            if *e != actual {
                return Err(SinkError::Mismatch {
                    expected: e.clone(),
                    actual,
                });
            }
        }
        let size = bytes.len() as u64;
        self.puts += 1;
        self.blobs.insert(actual.clone(), bytes);
        Ok((actual, size))
    }

    fn get(&mut self, digest: &Digest, _max: u64) -> Result<Option<Vec<u8>>, SinkError> {
        Ok(self.blobs.get(digest).cloned())
    }
}

/// A layer: a tar holding one file.
fn layer(file: &str, content: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(content.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, file, content).expect("append");
    b.into_inner().expect("layer tar")
}

fn config(layers: &[&Vec<u8>]) -> Vec<u8> {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| Digest::sha256(l).to_string())
        .collect();
    json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids}, "config": {}})
    .to_string()
    .into_bytes()
}

enum Item {
    File(String, Vec<u8>),
    Symlink(String, String),
}

fn tarball(items: &[Item]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for item in items {
        match item {
            Item::File(path, data) => {
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                b.append_data(&mut h, path, data.as_slice())
                    .expect("append");
            }
            Item::Symlink(path, target) => {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                b.append_link(&mut h, path, target).expect("link");
            }
        }
    }
    b.into_inner().expect("tarball")
}

fn file(path: &str, data: &[u8]) -> Item {
    Item::File(path.to_string(), data.to_vec())
}

fn hex(d: &[u8]) -> String {
    Digest::sha256(d).hex().to_string()
}

/// Two layers (the second big enough to stream), a config, as Docker before 25 saves them:
/// layers first, the second layer's directory a symlink to the first's as Docker writes
/// repeated layers, the manifest last.
fn legacy_archive(l1: &[u8], l2: &[u8], tags: serde_json::Value) -> (Vec<u8>, Vec<u8>) {
    let cfg = config(&[&l1.to_vec(), &l2.to_vec()]);
    let manifest = json!([{
        "Config": format!("{}.json", hex(&cfg)),
        "RepoTags": tags,
        "Layers": ["aaa/layer.tar", "bbb/layer.tar", ],
    }]);
    let items = vec![
        file("aaa/VERSION", b"1.0"),
        file("aaa/json", b"{}"),
        file("aaa/layer.tar", l1),
        file("ccc/layer.tar", l2),
        Item::Symlink("bbb/layer.tar".into(), "../ccc/layer.tar".into()),
        file(&format!("{}.json", hex(&cfg)), &cfg),
        file("manifest.json", manifest.to_string().as_bytes()),
        file("repositories", b"{}"),
    ];
    (tarball(&items), cfg)
}

fn read(bytes: &[u8], sink: &mut MemSink) -> Result<pier_archive::Contents, ArchiveError> {
    read_archive(bytes, sink)
}

#[test]
fn a_legacy_docker_save_becomes_an_oci_image_of_the_same_layer_files() {
    let l1 = layer("etc/app.conf", b"hello");
    let l2 = layer("app.bin", &vec![7u8; 3 << 20]);
    let (archive, cfg) = legacy_archive(&l1, &l2, json!(["team/app:v1", "docker.io/team/app:v2"]));
    let mut sink = MemSink::default();
    let c = read(&archive, &mut sink).expect("read");
    assert_eq!(c.format, Format::DockerLegacy);
    assert_eq!(c.compression, Compression::None);
    assert_eq!(c.file_digest, Digest::sha256(&archive));
    assert_eq!(c.file_size, archive.len() as u64);
    assert_eq!(c.images.len(), 1);
    let image = &c.images[0];
    let names: Vec<String> = image.names.iter().map(|n| n.to_string()).collect();
    assert_eq!(names, ["team/app:v1", "team/app:v2"]);
    let m: serde_json::Value = serde_json::from_slice(&image.manifests[0].bytes).expect("json");
    assert_eq!(m["config"]["digest"], Digest::sha256(&cfg).to_string());
    let layers: Vec<&str> = m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest"))
        .collect();
    assert_eq!(
        layers,
        [
            Digest::sha256(&l1).to_string(),
            Digest::sha256(&l2).to_string()
        ]
    );
    assert_eq!(m["layers"][0]["mediaType"], pier_archive::media::OCI_LAYER);
    assert_eq!(
        image.manifests[0].digest,
        Digest::sha256(&image.manifests[0].bytes)
    );
    // Config and both layers are stored; the legacy metadata files are not.
    for b in [&cfg, &l1, &l2] {
        assert_eq!(sink.blobs.get(&Digest::sha256(b)), Some(b));
    }
    assert_eq!(sink.blobs.len(), 3);
}

/// An OCI layout with one image and an index of two platforms, every blob in `blobs/`, in the
/// order given.
fn oci_archive(blobs_first: bool, ref_name: &str, gz: Compression) -> (Vec<u8>, Vec<Vec<u8>>) {
    let l1 = layer("a.txt", b"a");
    let l2 = layer("big.bin", &vec![3u8; 2 << 20]);
    let cfg = config(&[&l1, &l2]);
    let layers: Vec<serde_json::Value> = [&l1, &l2]
        .iter()
        .map(|l| {
            json!({"mediaType": pier_archive::media::OCI_LAYER,
                "digest": Digest::sha256(l).to_string(), "size": l.len()})
        })
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": pier_oci::media::OCI_MANIFEST,
        "config": {"mediaType": pier_archive::media::OCI_CONFIG,
            "digest": Digest::sha256(&cfg).to_string(), "size": cfg.len()},
        "layers": layers,
    })
    .to_string()
    .into_bytes();
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": pier_oci::media::OCI_MANIFEST,
            "digest": Digest::sha256(&manifest).to_string(), "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": ref_name}}],
    })
    .to_string()
    .into_bytes();
    let blobs = vec![l1, l2, cfg, manifest];
    let mut items: Vec<Item> = blobs
        .iter()
        .map(|b| file(&format!("./blobs/sha256/{}", hex(b)), b))
        .collect();
    let docs = vec![
        file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
        file("index.json", &index),
    ];
    if blobs_first {
        items.extend(docs);
    } else {
        let mut d = docs;
        d.extend(items);
        items = d;
    }
    (compress(tarball(&items), gz), blobs)
}

fn compress(tar: Vec<u8>, c: Compression) -> Vec<u8> {
    match c {
        Compression::None => tar,
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&tar).expect("gzip");
            e.finish().expect("gzip")
        }
        Compression::Zstd => zstd::encode_all(tar.as_slice(), 1).expect("zstd"),
    }
}

#[test]
fn oci_layouts_read_in_any_order_and_compression() {
    for (first, c) in [
        (true, Compression::None),
        (false, Compression::None),
        (true, Compression::Gzip),
        (false, Compression::Zstd),
    ] {
        let (archive, blobs) = oci_archive(first, "registry.lan:5000/team/app:v3", c);
        let mut sink = MemSink::default();
        let got = read(&archive, &mut sink).expect("read");
        assert_eq!(got.format, Format::OciLayout);
        assert_eq!(got.compression, c);
        assert_eq!(got.file_digest, Digest::sha256(&archive), "{c:?}");
        let image = &got.images[0];
        assert_eq!(image.names[0].to_string(), "team/app:v3");
        assert_eq!(image.manifests.len(), 1);
        assert_eq!(image.manifests[0].bytes, blobs[3]);
        // Layers and config are stored; the manifest is not a blob.
        for b in &blobs[..3] {
            assert!(sink.blobs.contains_key(&Digest::sha256(b)), "{c:?}");
        }
        assert!(!sink.blobs.contains_key(&Digest::sha256(&blobs[3])));
        assert_eq!(image.blobs.len(), 3);
    }
}

#[test]
fn blobs_already_stored_are_verified_not_written_again() {
    let (archive, _) = oci_archive(true, "team/app:v1", Compression::None);
    let mut sink = MemSink::default();
    read(&archive, &mut sink).expect("first read");
    let puts = sink.puts;
    read(&archive, &mut sink).expect("second read");
    assert_eq!(sink.puts, puts, "nothing written the second time");
}

#[test]
fn docker_25_names_come_from_its_annotations_or_manifest_json() {
    let l1 = layer("x", b"x");
    let cfg = config(&[&l1]);
    let manifest = json!({
        "schemaVersion": 2, "mediaType": pier_oci::media::OCI_MANIFEST,
        "config": {"mediaType": pier_archive::media::OCI_CONFIG,
            "digest": Digest::sha256(&cfg).to_string(), "size": cfg.len()},
        "layers": [{"mediaType": pier_archive::media::OCI_LAYER,
            "digest": Digest::sha256(&l1).to_string(), "size": l1.len()}],
    })
    .to_string()
    .into_bytes();
    for annotations in [
        json!({"io.containerd.image.name": "docker.io/library/busybox:1.36",
            "org.opencontainers.image.ref.name": "1.36"}),
        json!({}),
    ] {
        let index = json!({"schemaVersion": 2, "manifests": [{
            "mediaType": pier_oci::media::OCI_MANIFEST,
            "digest": Digest::sha256(&manifest).to_string(), "size": manifest.len(),
            "annotations": annotations}]});
        let legacy = json!([{"Config": format!("blobs/sha256/{}", hex(&cfg)),
            "RepoTags": ["busybox:1.36"],
            "Layers": [format!("blobs/sha256/{}", hex(&l1))]}]);
        let items = vec![
            file(&format!("blobs/sha256/{}", hex(&l1)), &l1),
            file(&format!("blobs/sha256/{}", hex(&cfg)), &cfg),
            file(&format!("blobs/sha256/{}", hex(&manifest)), &manifest),
            file("index.json", index.to_string().as_bytes()),
            file("manifest.json", legacy.to_string().as_bytes()),
            file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
        ];
        let mut sink = MemSink::default();
        let got = read(&tarball(&items), &mut sink).expect("read");
        assert_eq!(got.format, Format::DockerOci);
        assert_eq!(got.images.len(), 1);
        assert_eq!(got.images[0].names[0].to_string(), "busybox:1.36");
        assert_eq!(got.images[0].manifests[0].bytes, manifest);
    }
}

#[test]
fn an_untagged_image_is_skipped_with_the_reason() {
    let (archive, _) = oci_archive(true, "v1", Compression::None);
    let got = read(&archive, &mut MemSink::default()).expect("read");
    assert!(got.images.is_empty());
    assert!(got.skipped[0].contains("has no name"), "{:?}", got.skipped);
}

#[test]
fn broken_archives_fail_with_a_reason() {
    let l1 = layer("etc/app.conf", b"hello");
    let l2 = layer("app.bin", &vec![7u8; 3 << 20]);
    let (archive, _) = legacy_archive(&l1, &l2, json!(["team/app:v1"]));

    // Truncated inside the big layer.
    let cut = &archive[..archive.len() / 2];
    let err = read(cut, &mut MemSink::default()).expect_err("truncated");
    assert!(matches!(err, ArchiveError::Io(_)), "{err}");
    assert!(!err.is_retryable());

    // Truncated in a compressed file.
    let (oci, _) = oci_archive(true, "team/app:v1", Compression::Gzip);
    let err = read(&oci[..oci.len() - 100], &mut MemSink::default()).expect_err("cut gzip");
    assert!(matches!(err, ArchiveError::Io(_)), "{err}");

    // A blob whose bytes are not those its name says.
    let (oci, blobs) = oci_archive(true, "team/app:v1", Compression::None);
    let mut bad = oci.clone();
    let big = &blobs[1];
    let at = bad
        .windows(64)
        .position(|w| w == &big[..64])
        .expect("find the big layer");
    bad[at + 1000] ^= 0xff;
    let err = read(&bad, &mut MemSink::default()).expect_err("corrupt");
    assert!(matches!(err, ArchiveError::Corrupt(_)), "{err}");

    // A layer that is not the one the config names.
    let other = layer("other", b"other");
    let cfg = config(&[&other]);
    let manifest = json!([{"Config": "c.json", "RepoTags": ["a:1"], "Layers": ["l/layer.tar"]}]);
    let items = vec![
        file("l/layer.tar", &l1),
        file("c.json", &cfg),
        file("manifest.json", manifest.to_string().as_bytes()),
    ];
    let err = read(&tarball(&items), &mut MemSink::default()).expect_err("wrong layer");
    assert!(err.to_string().contains("config says"), "{err}");

    // Not an image archive at all.
    let err = read(
        &tarball(&[file("hello.txt", b"hi")]),
        &mut MemSink::default(),
    )
    .expect_err("no manifest");
    assert!(err
        .to_string()
        .contains("neither index.json nor manifest.json"));
    let err =
        read(b"just some text, not a tar at all", &mut MemSink::default()).expect_err("not a tar");
    assert!(
        matches!(err, ArchiveError::Invalid(_) | ArchiveError::Io(_)),
        "{err}"
    );
}

/// Layers many times the inflating thread's look-ahead, in both compressions, and bytes after
/// the compressed stream: every layer arrives whole and the file's digest covers every byte.
#[test]
fn large_compressed_archives_arrive_whole_through_the_inflating_thread() {
    // Incompressible-looking layer content, so the compressed file is large too.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    let l1 = layer("a.bin", &noise(5 << 20));
    let l2 = layer("b.bin", &noise(3 << 20));
    let (tar, _) = legacy_archive(&l1, &l2, json!(["team/big:v1"]));
    for c in [Compression::Gzip, Compression::Zstd] {
        let mut archive = compress(tar.clone(), c);
        let compressed = archive.len();
        // What a transfer may leave after the stream: it is the file's, hashed, never read.
        if c == Compression::Zstd {
            archive.extend_from_slice(&[0u8; 1000]);
        }
        let mut sink = MemSink::default();
        let got = read(&archive, &mut sink).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        assert_eq!(got.compression, c);
        assert_eq!(got.file_digest, Digest::sha256(&archive), "{c:?}");
        assert_eq!(got.file_size, archive.len() as u64, "{c:?} of {compressed}");
        assert_eq!(sink.blobs.get(&Digest::sha256(&l1)), Some(&l1), "{c:?}");
        assert_eq!(sink.blobs.get(&Digest::sha256(&l2)), Some(&l2), "{c:?}");
    }
    // A stream broken in the middle of a layer fails, and does not hang the reader.
    let gz = compress(tar, Compression::Gzip);
    let mut bad = gz.clone();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..mid + 64] {
        *b ^= 0x5a;
    }
    read(&bad, &mut MemSink::default()).expect_err("a corrupt deflate stream");
}
