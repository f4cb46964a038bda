//! The cluster secret: one file shared by every node. Two keys are derived from it, one that
//! seals gossip datagrams and one that signs peer HTTP requests, so neither use can be turned
//! into the other.
//!
//! A peer request carries `x-pier-peer-auth: <node>;<unix seconds>;<nonce>;<hex HMAC-SHA256>`
//! over the method, the path with its query, the time, the nonce and the node name. The
//! receiver accepts it within [`MAX_SKEW`] of its own clock, and once: the nonces of accepted
//! requests are remembered for as long as their time is within the skew, so a captured request
//! sent again is refused.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header that carries a peer request's signature.
pub const AUTH_HEADER: &str = "x-pier-peer-auth";
/// How far a signed request's time may be from the receiver's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(300);
/// Fewest bytes a secret may have.
pub const MIN_SECRET_BYTES: usize = 16;
/// Accepted requests remembered at most. Beyond, the oldest are forgotten and no request
/// signed at or before their time is accepted any more (so none of them can be replayed); at
/// these numbers that takes over 800 peer requests a second for five minutes.
pub const MAX_REMEMBERED: usize = 1 << 18;

type HmacSha256 = Hmac<Sha256>;

/// Why a peer request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no {AUTH_HEADER} header")]
    Missing,
    #[error("malformed {AUTH_HEADER} header")]
    Malformed,
    #[error("signed {0} s away from this node's clock (more than the allowed skew)")]
    Skew(i64),
    #[error("signature does not match (a different cluster secret?)")]
    BadSignature,
    #[error("this signed request was accepted once already (a replay)")]
    Replayed,
}

/// The derived keys. Debug output never shows them.
#[derive(Clone)]
pub struct ClusterSecret {
    gossip: [u8; 32],
    http: [u8; 32],
    /// The high half of this process's nonces (random), and the low half's counter.
    nonce_prefix: u64,
    nonces: Arc<AtomicU64>,
    /// Requests this node accepted, shared by every clone.
    seen: Arc<Mutex<Seen>>,
}

/// The (time, nonce) of each accepted request still within the skew.
#[derive(Default)]
struct Seen {
    accepted: BTreeSet<(u64, u128)>,
    /// Requests signed at or before this time are refused: some of them were forgotten.
    floor: Option<u64>,
}

impl Seen {
    fn admit(&mut self, unix: u64, nonce: u128, now: u64) -> Result<(), AuthError> {
        // What is older than the skew is refused by its time; it need not be remembered.
        let oldest = now.saturating_sub(MAX_SKEW.as_secs());
        while self.accepted.first().is_some_and(|(t, _)| *t < oldest) {
            self.accepted.pop_first();
        }
        if self.floor.is_some_and(|f| unix <= f) || !self.accepted.insert((unix, nonce)) {
            return Err(AuthError::Replayed);
        }
        while self.accepted.len() > MAX_REMEMBERED {
            if let Some((t, _)) = self.accepted.pop_first() {
                self.floor = Some(self.floor.map_or(t, |f| f.max(t)));
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

fn derive(secret: &[u8], label: &str) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(label.as_bytes());
    mac.finalize().into_bytes().into()
}

impl ClusterSecret {
    /// Derive the keys from the secret's bytes (surrounding whitespace is not part of it).
    pub fn from_bytes(secret: &[u8]) -> Result<ClusterSecret, String> {
        let trimmed = secret.trim_ascii();
        if trimmed.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the cluster secret must have at least {MIN_SECRET_BYTES} bytes (it has {})",
                trimmed.len()
            ));
        }
        Ok(ClusterSecret {
            gossip: derive(trimmed, "pier gossip v1"),
            http: derive(trimmed, "pier peer http v1"),
            nonce_prefix: rand::RngCore::next_u64(
                &mut <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng(),
            ),
            nonces: Arc::new(AtomicU64::new(0)),
            seen: Arc::default(),
        })
    }

    pub fn from_file(path: &Path) -> Result<ClusterSecret, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read the cluster secret {}: {e}", path.display()))?;
        Self::from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The key gossip datagrams are sealed with.
    pub fn gossip_key(&self) -> [u8; 32] {
        self.gossip
    }

    fn mac(
        &self,
        method: &str,
        path_and_query: &str,
        node: &str,
        unix: u64,
        nonce: &str,
    ) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.http).expect("any key length");
        for part in [method, path_and_query, node, &unix.to_string(), nonce] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac
    }

    /// The header value signing a request now.
    pub fn sign(&self, method: &str, path_and_query: &str, node: &str) -> String {
        self.sign_at(method, path_and_query, node, unix_now())
    }

    pub fn sign_at(&self, method: &str, path_and_query: &str, node: &str, unix: u64) -> String {
        // Unique, not secret: the HMAC is what cannot be forged.
        let count = self.nonces.fetch_add(1, Ordering::Relaxed);
        let nonce = format!(
            "{:032x}",
            (u128::from(self.nonce_prefix) << 64) | u128::from(count)
        );
        let tag = self
            .mac(method, path_and_query, node, unix, &nonce)
            .finalize()
            .into_bytes();
        format!("{node};{unix};{nonce};{}", hex::encode(tag))
    }

    /// Check a request's header; the signing node's name when it is good and was not
    /// accepted before.
    pub fn verify(
        &self,
        header: Option<&str>,
        method: &str,
        path_and_query: &str,
    ) -> Result<String, AuthError> {
        self.verify_at(header, method, path_and_query, unix_now())
    }

    pub fn verify_at(
        &self,
        header: Option<&str>,
        method: &str,
        path_and_query: &str,
        now: u64,
    ) -> Result<String, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let mut parts = header.rsplitn(4, ';');
        let (Some(sig), Some(nonce), Some(unix), Some(node)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let unix: u64 = unix.parse().map_err(|_| AuthError::Malformed)?;
        let sig = hex::decode(sig).map_err(|_| AuthError::Malformed)?;
        if nonce.len() != 32 {
            return Err(AuthError::Malformed);
        }
        let nonce_value = u128::from_str_radix(nonce, 16).map_err(|_| AuthError::Malformed)?;
        let skew = unix as i64 - now as i64;
        if skew.unsigned_abs() > MAX_SKEW.as_secs() {
            return Err(AuthError::Skew(skew));
        }
        self.mac(method, path_and_query, node, unix, nonce)
            .verify_slice(&sig)
            .map_err(|_| AuthError::BadSignature)?;
        // Only what verified is remembered, so forged headers cannot crowd out real ones.
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(unix, nonce_value, now)?;
        Ok(node.to_string())
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> ClusterSecret {
        ClusterSecret::from_bytes(s.as_bytes()).unwrap()
    }

    #[test]
    fn a_signature_verifies_only_with_the_same_secret_request_and_a_close_clock() {
        let a = secret("correct horse battery staple\n");
        let header = a.sign_at("GET", "/peer/v1/blobs/sha256:ab", "node-1", 1000);
        let ok = a.verify_at(Some(&header), "GET", "/peer/v1/blobs/sha256:ab", 1100);
        assert_eq!(ok, Ok("node-1".to_string()));
        // Surrounding whitespace is not part of the secret.
        let same = secret("  correct horse battery staple");
        assert!(same
            .verify_at(Some(&header), "GET", "/peer/v1/blobs/sha256:ab", 1000)
            .is_ok());
        let other = secret("another secret, sixteen bytes+");
        assert_eq!(
            other.verify_at(Some(&header), "GET", "/peer/v1/blobs/sha256:ab", 1000),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            a.verify_at(Some(&header), "HEAD", "/peer/v1/blobs/sha256:ab", 1000),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            a.verify_at(Some(&header), "GET", "/peer/v1/blobs/sha256:cd", 1000),
            Err(AuthError::BadSignature)
        );
        let forged = header.replacen("node-1", "node-2", 1);
        assert_eq!(
            a.verify_at(Some(&forged), "GET", "/peer/v1/blobs/sha256:ab", 1000),
            Err(AuthError::BadSignature)
        );
        assert!(matches!(
            a.verify_at(Some(&header), "GET", "/peer/v1/blobs/sha256:ab", 2000),
            Err(AuthError::Skew(_))
        ));
        assert_eq!(a.verify_at(None, "GET", "/", 1000), Err(AuthError::Missing));
        assert_eq!(
            a.verify_at(Some("nonsense"), "GET", "/", 1000),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn a_signed_request_is_accepted_once() {
        let receiver = secret("correct horse battery staple");
        let sender = secret("correct horse battery staple");
        let path = "/peer/v1/pull";
        let captured = sender.sign_at("POST", path, "node-1", 1000);
        assert_eq!(
            receiver.verify_at(Some(&captured), "POST", path, 1000),
            Ok("node-1".to_string())
        );
        // Replayed within the window, to the node or to a clone of its secret: refused.
        for at in [1000, 1001, 1299] {
            assert_eq!(
                receiver
                    .clone()
                    .verify_at(Some(&captured), "POST", path, at),
                Err(AuthError::Replayed),
                "at {at}"
            );
        }
        // The same request signed again is a new one.
        let again = sender.sign_at("POST", path, "node-1", 1000);
        assert_ne!(again, captured);
        assert!(receiver.verify_at(Some(&again), "POST", path, 1000).is_ok());
        // After the window the skew check refuses it, and the nonce is forgotten.
        assert!(matches!(
            receiver.verify_at(Some(&captured), "POST", path, 1301),
            Err(AuthError::Skew(_))
        ));
        assert!(receiver.seen.lock().unwrap().accepted.len() <= 2);
        // A header without a nonce (the old format) is malformed.
        let (head, sig) = captured.rsplit_once(';').unwrap();
        let (node_time, _) = head.rsplit_once(';').unwrap();
        assert_eq!(
            receiver.verify_at(Some(&format!("{node_time};{sig}")), "POST", path, 1000),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn beyond_what_is_remembered_older_requests_are_refused_not_forgotten() {
        let mut seen = Seen::default();
        for i in 0..MAX_REMEMBERED as u128 {
            seen.admit(1000, i, 1000).unwrap();
        }
        seen.admit(1001, u128::MAX, 1001).unwrap();
        // One of the requests signed at 1000 was forgotten: nothing signed then passes now.
        assert_eq!(
            seen.admit(1000, u128::MAX - 1, 1001),
            Err(AuthError::Replayed)
        );
        assert_eq!(seen.admit(1002, 7, 1002), Ok(()));
    }

    #[test]
    fn short_secrets_are_refused_and_the_two_keys_differ() {
        assert!(ClusterSecret::from_bytes(b"short").is_err());
        let s = secret("0123456789abcdef");
        assert_ne!(s.gossip_key(), s.http);
    }
}
