//! Pieces of a large blob, the unit a swarm moves between nodes: fixed-size ranges, each with
//! its own digest so a piece can be verified the moment it arrives from any peer.
//!
//! Piece digests are BLAKE3 (`blake3:<hex>` on the wire): a cryptographic hash several times
//! faster than SHA-256 on one core, so the whole blob's SHA-256 is the only SHA-256 pass a node
//! makes over a swarmed blob. The coordinator picks the algorithm by the digests it hands out,
//! and a node verifies each piece with the algorithm its digest names (SHA-256 pieces are
//! still understood).
//!
//! The digests come from the node whose fill reads the blob from its source in order (the
//! swarm's coordinator, normally the blob's first owner): it hashes each piece as its bytes go
//! by. A node that takes pieces from peers learns the digests from the coordinator and checks
//! every piece against them before it writes a byte; the whole blob's digest is still checked,
//! in order, before the blob becomes visible.

use std::sync::{Arc, Mutex};

use pier_oci::{Algorithm, Hasher};

/// The hash of a piece digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceAlgorithm {
    Blake3,
    Sha256,
}

impl PieceAlgorithm {
    fn as_str(self) -> &'static str {
        match self {
            PieceAlgorithm::Blake3 => "blake3",
            PieceAlgorithm::Sha256 => "sha256",
        }
    }
}

/// What the pieces of new swarms are hashed with.
pub const PIECE_ALGORITHM: PieceAlgorithm = PieceAlgorithm::Blake3;

/// The digest of one piece: its algorithm and 64 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceDigest {
    algorithm: PieceAlgorithm,
    hex: String,
}

impl PieceDigest {
    pub fn compute(algorithm: PieceAlgorithm, data: &[u8]) -> PieceDigest {
        let mut h = PieceHash::new(algorithm);
        h.update(data);
        h.finish()
    }

    pub fn algorithm(&self) -> PieceAlgorithm {
        self.algorithm
    }
}

impl std::fmt::Display for PieceDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

impl std::str::FromStr for PieceDigest {
    type Err = ();

    fn from_str(s: &str) -> Result<PieceDigest, ()> {
        let (alg, hex) = s.split_once(':').ok_or(())?;
        let algorithm = match alg {
            "blake3" => PieceAlgorithm::Blake3,
            "sha256" => PieceAlgorithm::Sha256,
            _ => return Err(()),
        };
        let lower_hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
        if hex.len() != 64 || !hex.chars().all(lower_hex) {
            return Err(());
        }
        Ok(PieceDigest {
            algorithm,
            hex: hex.to_string(),
        })
    }
}

/// A piece digest being computed.
enum PieceHash {
    Blake3(Box<blake3::Hasher>),
    Sha256(Box<Hasher>),
}

impl PieceHash {
    fn new(algorithm: PieceAlgorithm) -> PieceHash {
        match algorithm {
            PieceAlgorithm::Blake3 => PieceHash::Blake3(Box::new(blake3::Hasher::new())),
            PieceAlgorithm::Sha256 => PieceHash::Sha256(Box::new(Hasher::new(Algorithm::Sha256))),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            PieceHash::Blake3(h) => {
                h.update(data);
            }
            PieceHash::Sha256(h) => h.update(data),
        }
    }

    fn finish(self) -> PieceDigest {
        match self {
            PieceHash::Blake3(h) => PieceDigest {
                algorithm: PieceAlgorithm::Blake3,
                hex: h.finalize().to_hex().to_string(),
            },
            PieceHash::Sha256(h) => PieceDigest {
                algorithm: PieceAlgorithm::Sha256,
                hex: h.finish().hex().to_string(),
            },
        }
    }
}

/// Bytes per piece.
pub const PIECE_SIZE: u64 = 4 * 1024 * 1024;
/// Blobs smaller than this are fetched directly: a swarm's bookkeeping costs more than it saves.
pub const SWARM_MIN: u64 = 32 * 1024 * 1024;

/// A set of piece indices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bits {
    len: u32,
    words: Vec<u64>,
}

impl Bits {
    pub fn new(len: u32) -> Bits {
        Bits {
            len,
            words: vec![0; (len as usize).div_ceil(64)],
        }
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    pub fn set(&mut self, i: u32) {
        if i < self.len {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    pub fn count(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }

    pub fn all(&self) -> bool {
        self.count() == self.len
    }

    /// Every index `other` holds as well (word by word; `other` of another length adds what
    /// fits).
    pub fn union(&mut self, other: &Bits) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
        if self.len & 63 != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << (self.len % 64)) - 1;
            }
        }
    }

    /// Every index below `n` (capped at the length).
    pub fn fill_below(&mut self, n: u32) {
        for i in 0..n.min(self.len) {
            self.set(i);
        }
    }

    /// Hex of the bitmap, least significant index first within each byte; the wire form.
    pub fn to_hex(&self) -> String {
        let bytes = (self.len as usize).div_ceil(8);
        let mut out = String::with_capacity(bytes * 2);
        for b in 0..bytes {
            let byte = (self.words[b / 8] >> ((b % 8) * 8)) as u8;
            out.push_str(&format!("{byte:02x}"));
        }
        out
    }

    /// The bitmap of `len` pieces from its wire form; `None` when it does not fit `len`.
    pub fn from_hex(len: u32, hex: &str) -> Option<Bits> {
        let bytes = (len as usize).div_ceil(8);
        if hex.len() != bytes * 2 || !hex.is_ascii() {
            return None;
        }
        let mut bits = Bits::new(len);
        for b in 0..bytes {
            let byte = u8::from_str_radix(&hex[b * 2..b * 2 + 2], 16).ok()?;
            bits.words[b / 8] |= (byte as u64) << ((b % 8) * 8);
        }
        // Bits past the length would name pieces that do not exist.
        if len & 63 != 0 {
            if let Some(last) = bits.words.last() {
                if last >> (len % 64) != 0 {
                    return None;
                }
            }
        }
        Some(bits)
    }
}

/// The pieces of one blob being fetched on this node: which are on the spool, and the digests
/// known so far.
pub struct Pieces {
    size: u64,
    piece_size: u64,
    state: Mutex<State>,
}

struct State {
    digests: Vec<Option<PieceDigest>>,
    on_disk: Bits,
}

impl Pieces {
    pub fn new(size: u64, piece_size: u64) -> Pieces {
        let piece_size = piece_size.max(1);
        let count = size.div_ceil(piece_size) as u32;
        Pieces {
            size,
            piece_size,
            state: Mutex::new(State {
                digests: vec![None; count as usize],
                on_disk: Bits::new(count),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn piece_size(&self) -> u64 {
        self.piece_size
    }

    pub fn count(&self) -> u32 {
        self.size.div_ceil(self.piece_size) as u32
    }

    /// Byte range `start..end` of piece `i`.
    pub fn range(&self, i: u32) -> (u64, u64) {
        let start = i as u64 * self.piece_size;
        (start, (start + self.piece_size).min(self.size))
    }

    pub fn set_digest(&self, i: u32, digest: PieceDigest) {
        if let Some(d) = self.state().digests.get_mut(i as usize) {
            *d = Some(digest);
        }
    }

    pub fn digest(&self, i: u32) -> Option<PieceDigest> {
        self.state().digests.get(i as usize).cloned().flatten()
    }

    /// The digests from piece `from` on (`None` where not known yet).
    pub fn digests_from(&self, from: u32) -> Vec<Option<PieceDigest>> {
        let s = self.state();
        s.digests.iter().skip(from as usize).cloned().collect()
    }

    /// How many digests are known without a gap from the first piece.
    pub fn digests_known(&self) -> u32 {
        self.state()
            .digests
            .iter()
            .take_while(|d| d.is_some())
            .count() as u32
    }

    pub fn mark_on_disk(&self, i: u32) {
        self.state().on_disk.set(i);
    }

    /// Every piece that ends at or before `written` is on the spool.
    pub fn mark_written(&self, written: u64) {
        let full = if written >= self.size {
            self.count()
        } else {
            (written / self.piece_size) as u32
        };
        self.state().on_disk.fill_below(full);
    }

    /// Pieces this node can serve: on the spool with a known digest.
    pub fn have(&self) -> Bits {
        let s = self.state();
        let mut have = s.on_disk.clone();
        for (i, d) in s.digests.iter().enumerate() {
            if d.is_none() {
                have.words[i / 64] &= !(1 << (i % 64));
            }
        }
        have
    }

    /// Whether every byte of `start..end` lies in pieces this node can serve.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        if end <= start || end > self.size {
            return end == start && end <= self.size;
        }
        let first = (start / self.piece_size) as u32;
        let last = ((end - 1) / self.piece_size) as u32;
        let s = self.state();
        (first..=last).all(|i| s.on_disk.get(i) && s.digests[i as usize].is_some())
    }
}

/// Hashes the pieces of a blob whose bytes go by in order, recording each piece's digest as
/// its last byte passes.
pub struct PieceHasher {
    pieces: Arc<Pieces>,
    index: u32,
    filled: u64,
    hasher: PieceHash,
}

impl PieceHasher {
    pub fn new(pieces: Arc<Pieces>) -> PieceHasher {
        PieceHasher {
            pieces,
            index: 0,
            filled: 0,
            hasher: PieceHash::new(PIECE_ALGORITHM),
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        let count = self.pieces.count();
        while !data.is_empty() && self.index < count {
            let (start, end) = self.pieces.range(self.index);
            let need = (end - start) - self.filled;
            let take = need.min(data.len() as u64) as usize;
            self.hasher.update(&data[..take]);
            self.filled += take as u64;
            data = &data[take..];
            if self.filled == end - start {
                let done = std::mem::replace(&mut self.hasher, PieceHash::new(PIECE_ALGORITHM));
                self.pieces.set_digest(self.index, done.finish());
                self.index += 1;
                self.filled = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_round_trip_through_hex_and_refuse_what_does_not_fit() {
        let mut b = Bits::new(70);
        for i in [0, 7, 8, 63, 64, 69] {
            b.set(i);
        }
        let hex = b.to_hex();
        assert_eq!(hex.len(), 18);
        assert_eq!(Bits::from_hex(70, &hex), Some(b.clone()));
        assert_eq!(b.count(), 6);
        assert!(Bits::from_hex(80, &hex).is_none(), "a different length");
        assert!(Bits::from_hex(70, "zz").is_none());
        // A bit past the length.
        let mut bad = Bits::new(72);
        bad.set(71);
        assert!(Bits::from_hex(70, &bad.to_hex()).is_none());

        // A union keeps both sides and nothing past its own length.
        let mut u = Bits::new(70);
        u.set(3);
        u.union(&bad);
        assert_eq!((u.get(3), u.get(71), u.count()), (true, false, 1));
        let mut other = Bits::new(70);
        other.set(69);
        u.union(&other);
        assert_eq!(u.count(), 2);
    }

    #[test]
    fn a_piece_is_served_only_when_written_and_its_digest_known() {
        let p = Pieces::new(10, 4);
        assert_eq!(p.count(), 3);
        assert_eq!(p.range(2), (8, 10));
        p.mark_written(9);
        assert!(!p.covers(0, 4), "no digest yet");
        p.set_digest(0, PieceDigest::compute(PIECE_ALGORITHM, b"a"));
        p.set_digest(1, PieceDigest::compute(PIECE_ALGORITHM, b"b"));
        assert!(p.covers(0, 8));
        assert!(!p.covers(7, 9), "piece 2 is not complete");
        p.set_digest(2, PieceDigest::compute(PIECE_ALGORITHM, b"c"));
        p.mark_written(10);
        assert!(p.covers(0, 10));
        assert_eq!(p.have().count(), 3);
        assert_eq!(p.digests_known(), 3);
    }

    #[test]
    fn the_piece_hasher_records_each_piece_whatever_the_chunking() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let pieces = Arc::new(Pieces::new(data.len() as u64, 64));
        let mut h = PieceHasher::new(pieces.clone());
        for chunk in data.chunks(37) {
            h.update(chunk);
        }
        for i in 0..pieces.count() {
            let (s, e) = pieces.range(i);
            assert_eq!(
                pieces.digest(i),
                Some(PieceDigest::compute(
                    PIECE_ALGORITHM,
                    &data[s as usize..e as usize]
                )),
                "piece {i}"
            );
        }
    }

    #[test]
    fn piece_digests_are_blake3_on_the_wire_and_sha256_ones_still_parse() {
        let d = PieceDigest::compute(PieceAlgorithm::Blake3, b"abc");
        // The BLAKE3 test vector for "abc".
        assert_eq!(
            d.to_string(),
            "blake3:6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        assert_eq!(d.to_string().parse::<PieceDigest>(), Ok(d));
        let sha = PieceDigest::compute(PieceAlgorithm::Sha256, b"abc");
        assert_eq!(
            sha.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(sha.to_string().parse::<PieceDigest>(), Ok(sha));
        for bad in ["md5:00", "blake3:ABC", "blake3:", "6437b3ac", "sha256:zz"] {
            assert!(bad.parse::<PieceDigest>().is_err(), "{bad}");
        }
    }
}
