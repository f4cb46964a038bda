//! Sealing of gossip datagrams: every datagram pier sends to a peer's UDP port is
//! XChaCha20-Poly1305 with a random 24-byte nonce under the cluster's gossip key.
//!
//! Wire form: `nonce (24) || ciphertext || tag (16)`. The nonce is random rather than a
//! counter so that a restarted node, or two nodes sharing the key, never need to coordinate;
//! 192 random bits make a repeat negligible. A datagram that does not open is dropped whole:
//! a node without the secret can neither read gossip nor inject any.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use rand::RngCore;

const NONCE: usize = 24;
const TAG: usize = 16;
/// Bytes sealing adds to a plaintext.
pub(crate) const OVERHEAD: usize = NONCE + TAG;
/// Bound to every ciphertext, so a sealed datagram cannot be taken for another protocol's.
const CONTEXT: &[u8] = b"pier gossip v1";

pub(crate) struct Seal {
    cipher: XChaCha20Poly1305,
}

impl Seal {
    pub(crate) fn new(key: &[u8; 32]) -> Seal {
        Seal {
            cipher: XChaCha20Poly1305::new(key.into()),
        }
    }

    /// The sealed form of `plaintext`, with a nonce drawn from `rng`.
    pub(crate) fn seal(&self, rng: &mut impl RngCore, plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plaintext.len() + OVERHEAD);
        out.resize(NONCE, 0);
        rng.fill_bytes(&mut out[..NONCE]);
        out.extend_from_slice(plaintext);
        let (nonce, body) = out.split_at_mut(NONCE);
        // Encryption fails only for messages beyond 256 GiB; a datagram is far below that.
        let tag = self
            .cipher
            .encrypt_in_place_detached(XNonce::from_slice(nonce), CONTEXT, body)
            .expect("a datagram is far below the cipher's message limit");
        out.extend_from_slice(&tag);
        out
    }

    /// The plaintext of a sealed datagram, or `None` when it does not open with this key
    /// (another secret, truncated, altered or not pier's at all).
    pub(crate) fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < OVERHEAD {
            return None;
        }
        let (nonce, rest) = sealed.split_at(NONCE);
        let (body, tag) = rest.split_at(rest.len() - TAG);
        let mut plain = body.to_vec();
        self.cipher
            .decrypt_in_place_detached(
                XNonce::from_slice(nonce),
                CONTEXT,
                &mut plain,
                Tag::from_slice(tag),
            )
            .ok()?;
        Some(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn only_the_same_key_opens_and_any_change_is_refused() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let a = Seal::new(&[7; 32]);
        let sealed = a.seal(&mut rng, b"ping");
        assert_eq!(sealed.len(), 4 + OVERHEAD);
        assert_eq!(a.open(&sealed).as_deref(), Some(&b"ping"[..]));
        assert_eq!(Seal::new(&[8; 32]).open(&sealed), None);
        for i in 0..sealed.len() {
            let mut altered = sealed.clone();
            altered[i] ^= 1;
            assert_eq!(a.open(&altered), None, "byte {i} altered");
        }
        assert_eq!(a.open(&sealed[..sealed.len() - 1]), None);
        assert_eq!(a.open(b"short"), None);
        // Two seals of the same bytes differ (fresh nonce), so traffic shows no repeats.
        assert_ne!(a.seal(&mut rng, b"ping"), sealed);
    }
}
