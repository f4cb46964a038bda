//! The cluster secret: one file shared by every node. Two keys are derived from it, one that
//! seals gossip datagrams and one that signs peer HTTP requests, so neither use can be turned
//! into the other.
//!
//! A peer request carries `x-pier-peer-auth: <node>;<unix seconds>;<hex HMAC-SHA256>` over the
//! method, the path with its query, the time and the node name. The receiver accepts it within
//! [`MAX_SKEW`] of its own clock.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header that carries a peer request's signature.
pub const AUTH_HEADER: &str = "x-pier-peer-auth";
/// How far a signed request's time may be from the receiver's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(300);
/// Fewest bytes a secret may have.
pub const MIN_SECRET_BYTES: usize = 16;

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
}

/// The derived keys. Debug output never shows them.
#[derive(Clone)]
pub struct ClusterSecret {
    gossip: [u8; 32],
    http: [u8; 32],
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

    fn mac(&self, method: &str, path_and_query: &str, node: &str, unix: u64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.http).expect("any key length");
        for part in [method, path_and_query, node, &unix.to_string()] {
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
        let tag = self
            .mac(method, path_and_query, node, unix)
            .finalize()
            .into_bytes();
        format!("{node};{unix};{}", hex::encode(tag))
    }

    /// Check a request's header; the signing node's name when it is good.
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
        let mut parts = header.rsplitn(3, ';');
        let (Some(sig), Some(unix), Some(node)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(AuthError::Malformed);
        };
        let unix: u64 = unix.parse().map_err(|_| AuthError::Malformed)?;
        let sig = hex::decode(sig).map_err(|_| AuthError::Malformed)?;
        let skew = unix as i64 - now as i64;
        if skew.unsigned_abs() > MAX_SKEW.as_secs() {
            return Err(AuthError::Skew(skew));
        }
        self.mac(method, path_and_query, node, unix)
            .verify_slice(&sig)
            .map_err(|_| AuthError::BadSignature)?;
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
    fn short_secrets_are_refused_and_the_two_keys_differ() {
        assert!(ClusterSecret::from_bytes(b"short").is_err());
        let s = secret("0123456789abcdef");
        assert_ne!(s.gossip_key(), s.http);
    }
}
