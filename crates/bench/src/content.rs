//! Generated layers for pushes: unique content whose digest costs the client almost nothing.
//!
//! Every layer of a run is the same pseudo-random bulk (a block from a fast PRNG, repeated)
//! followed by a tail of up to 32 fresh random bytes. The sha256 state after the bulk is
//! computed once; each layer's digest then only hashes its tail. So every pushed layer is new to
//! the registry (a distinct digest it has to receive, hash and store in full) while the client
//! spends its CPU sending bytes, not hashing them: on a small machine the benchmark measures the
//! registry rather than the load generator. The bytes are never copied per layer either: bodies
//! are slices of the shared block.

use std::sync::Arc;

use bytes::Bytes;
use pier_oci::Digest;
use sha2::{Digest as _, Sha256};

/// Fresh bytes at the end of every layer.
const TAIL: u64 = 32;
/// The repeated block: large enough that nothing downstream sees a short period.
const BLOCK: u64 = 16 << 20;
/// Bodies are sent in pieces of this size.
const PIECE: u64 = 1 << 20;

/// What every layer of one size shares.
pub struct LayerTemplate {
    block: Bytes,
    bulk: u64,
    tail_len: usize,
    /// sha256 state after the bulk.
    prefix: Sha256,
}

impl LayerTemplate {
    /// Generate and hash the bulk of `size`-byte layers: CPU-bound (about a second per GiB), so
    /// call it on a blocking thread.
    pub fn new(size: u64, seed: u64) -> LayerTemplate {
        let tail_len = size.min(TAIL);
        let bulk = size - tail_len;
        let mut block = vec![0u8; bulk.min(BLOCK) as usize];
        fastrand::Rng::with_seed(seed).fill(&mut block);
        let mut template = LayerTemplate {
            block: Bytes::from(block),
            bulk,
            tail_len: tail_len as usize,
            prefix: Sha256::new(),
        };
        let mut prefix = Sha256::new();
        for piece in template.bulk_pieces(0, bulk) {
            prefix.update(&piece);
        }
        template.prefix = prefix;
        template
    }

    /// The size of every layer made from this template.
    pub fn layer_size(&self) -> u64 {
        self.bulk + self.tail_len as u64
    }

    /// A new layer: the shared bulk and a tail drawn from `rng`.
    pub fn layer(self: &Arc<Self>, rng: &mut fastrand::Rng) -> Layer {
        let mut tail = [0u8; TAIL as usize];
        rng.fill(&mut tail[..self.tail_len]);
        let mut hasher = self.prefix.clone();
        hasher.update(&tail[..self.tail_len]);
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()))
            .parse()
            .expect("a sha256 digest we formatted");
        Layer {
            template: Arc::clone(self),
            tail,
            digest,
            size: self.layer_size(),
        }
    }

    /// Bulk bytes `[start, end)` as slices of the block, at most [`PIECE`] each.
    fn bulk_pieces(&self, start: u64, end: u64) -> impl Iterator<Item = Bytes> + 'static {
        let block = self.block.clone();
        let end = end.min(self.bulk);
        let mut pos = start;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let len = block.len() as u64;
            let off = pos % len;
            let n = PIECE.min(len - off).min(end - pos);
            pos += n;
            Some(block.slice(off as usize..(off + n) as usize))
        })
    }
}

/// One generated layer.
#[derive(Clone)]
pub struct Layer {
    template: Arc<LayerTemplate>,
    tail: [u8; TAIL as usize],
    pub digest: Digest,
    pub size: u64,
}

impl Layer {
    /// Bytes `[start, end)` of the layer in pieces, without copying the bulk.
    pub fn pieces(&self, start: u64, end: u64) -> impl Iterator<Item = Bytes> + 'static {
        let bulk = self.template.bulk;
        let end = end.min(self.size);
        let tail = (end > bulk).then(|| {
            let from = start.max(bulk) - bulk;
            Bytes::copy_from_slice(&self.tail[from as usize..(end - bulk) as usize])
        });
        self.template
            .bulk_pieces(start, end)
            .chain(tail.filter(|t| !t.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(layer: &Layer, start: u64, end: u64) -> Vec<u8> {
        layer.pieces(start, end).flat_map(|b| b.to_vec()).collect()
    }

    #[test]
    fn layers_hash_to_their_digest_and_differ() {
        // Larger than one block, so the repetition and the piece boundaries are exercised.
        for size in [16, 31, 32, 33, 4096, BLOCK + PIECE + 7] {
            let template = Arc::new(LayerTemplate::new(size, 7));
            let mut rng = fastrand::Rng::with_seed(1);
            let a = template.layer(&mut rng);
            let b = template.layer(&mut rng);
            let bytes = collect(&a, 0, a.size);
            assert_eq!(bytes.len() as u64, size);
            assert_eq!(Digest::sha256(&bytes), a.digest, "size {size}");
            assert_ne!(a.digest, b.digest, "size {size}");
            // Any split into ranges gives the same bytes (chunked uploads rely on it).
            let mid = size / 3;
            let mut joined = collect(&a, 0, mid);
            joined.extend(collect(&a, mid, size));
            assert_eq!(joined, bytes);
        }
    }
}
