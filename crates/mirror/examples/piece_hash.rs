//! CPU seconds per GiB of the two piece digests and the blob digest on this machine:
//! `cargo run --release -p pier-mirror --example piece_hash`. BENCHMARKS.md records a run.

use std::time::Instant;

use pier_mirror::pieces::{PieceAlgorithm, PieceDigest, PIECE_SIZE};
use pier_oci::{Algorithm, Hasher};

fn main() {
    let piece: Vec<u8> = (0..PIECE_SIZE as usize)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let pieces = 256; // 1 GiB
    for (name, algorithm) in [
        ("blake3 pieces", Some(PieceAlgorithm::Blake3)),
        ("sha256 pieces", Some(PieceAlgorithm::Sha256)),
        ("sha256 whole blob", None),
    ] {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            match algorithm {
                Some(a) => {
                    for _ in 0..pieces {
                        std::hint::black_box(PieceDigest::compute(a, &piece));
                    }
                }
                None => {
                    let mut h = Hasher::new(Algorithm::Sha256);
                    for _ in 0..pieces {
                        h.update(&piece);
                    }
                    std::hint::black_box(h.finish());
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{name:18} {:.3} CPU s/GiB ({:.2} GB/s, one thread, best of 3)",
            best,
            (pieces as f64 * PIECE_SIZE as f64) / best / 1e9
        );
    }
}
