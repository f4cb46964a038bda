//! Docker token authentication: the JWTs pier's token service signs (ES256 with a P-256 key
//! kept in a PKCS#8 PEM file, generated on first start when none is configured), and the
//! verification of bearer tokens, pier's own and an external issuer's (a PEM public key or a
//! JWKS file, with its issuer and audience). Verification takes only the algorithms of the
//! key's family, so `alg: none` and HMAC tokens never pass; expiry, not-before, issuer and
//! audience are checked with 30 s of leeway.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{Actions, AuthError, TokenSettings};

const LEEWAY: u64 = 30;

/// One entry of a token's `access` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub actions: Vec<String>,
}

/// The claims pier reads from and writes into a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default)]
    pub iss: String,
    #[serde(default)]
    pub sub: String,
    /// A string or a list of strings, depending on the issuer.
    #[serde(default)]
    pub aud: serde_json::Value,
    pub exp: u64,
    #[serde(default)]
    pub nbf: u64,
    #[serde(default)]
    pub iat: u64,
    #[serde(default)]
    pub jti: String,
    #[serde(default)]
    pub access: Vec<Access>,
}

/// A requested scope (`repository:team/app:pull,push`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub kind: String,
    pub name: String,
    pub actions: Actions,
}

impl Scope {
    /// Parse one `scope` value. The name may hold a `:` (a registry host with a port), so
    /// the type ends at the first colon and the actions start after the last.
    pub fn parse(s: &str) -> Option<Scope> {
        let (kind, rest) = s.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        if kind.is_empty() || name.is_empty() {
            return None;
        }
        Some(Scope {
            kind: kind.into(),
            name: name.into(),
            actions: Actions::parse_list(actions),
        })
    }
}

/// What a token grants on `repo`.
pub fn granted(access: &[Access], repo: &str) -> Actions {
    access
        .iter()
        .filter(|a| a.kind == "repository" && a.name == repo)
        .flat_map(|a| a.actions.iter())
        .filter_map(|w| Actions::parse(w))
        .fold(Actions::NONE, Actions::union)
        .intersect(Actions::REPOSITORY)
}

/// A token as the token service hands it out.
#[derive(Debug, Clone)]
pub struct Issued {
    pub token: String,
    pub expires_in: u64,
    pub issued_at: SystemTime,
    pub access: Vec<Access>,
}

/// pier's signing key and what it puts into tokens.
pub struct Signer {
    key: EncodingKey,
    /// The public key as an uncompressed point, for verification.
    public: Vec<u8>,
    kid: String,
    issuer: String,
    ttl: Duration,
}

impl Signer {
    /// Load the key file, creating it with a new key first when allowed and absent.
    pub fn load(t: &TokenSettings) -> Result<Signer, AuthError> {
        let err = |e: String| AuthError::Config(format!("token key {}: {e}", t.key_file.display()));
        if !t.key_file.exists() && t.generate {
            generate(&t.key_file).map_err(err)?;
            tracing::info!(path = %t.key_file.display(), "generated the token signing key");
        }
        let pem = std::fs::read_to_string(&t.key_file).map_err(|e| err(e.to_string()))?;
        let der = pem_body(&pem, "PRIVATE KEY").map_err(err)?;
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &SystemRandom::new())
                .map_err(|e| err(format!("not a PKCS#8 EC P-256 private key: {e}")))?;
        let public = pair.public_key().as_ref().to_vec();
        let kid = hex_prefix(&Sha256::digest(&public));
        Ok(Signer {
            key: EncodingKey::from_ec_der(&der),
            public,
            kid,
            issuer: t.issuer.clone(),
            ttl: t.ttl,
        })
    }

    /// The public key as a JWK (`kty: EC`, P-256), for whoever verifies pier's tokens.
    pub fn public_jwk(&self) -> serde_json::Value {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        // The uncompressed point is 0x04 || x || y.
        serde_json::json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
            "x": b64(&self.public[1..33]), "y": b64(&self.public[33..65]),
        })
    }

    pub fn issue(
        &self,
        subject: &str,
        audience: &str,
        access: Vec<Access>,
        now: SystemTime,
    ) -> Result<Issued, AuthError> {
        let at = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let mut jti = [0u8; 16];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut jti)
            .map_err(|_| AuthError::Config("no randomness for a token id".into()))?;
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: subject.to_string(),
            aud: serde_json::Value::String(audience.to_string()),
            exp: at + self.ttl.as_secs(),
            nbf: at.saturating_sub(1),
            iat: at,
            jti: hex_prefix(&jti),
            access: access.clone(),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| AuthError::Config(format!("signing a token: {e}")))?;
        Ok(Issued {
            token,
            expires_in: self.ttl.as_secs(),
            issued_at: now,
            access,
        })
    }
}

/// An external token issuer pier accepts tokens from.
#[derive(Debug, Clone)]
pub struct ExternalIssuer {
    /// A PEM public key (EC or RSA).
    pub public_key: Option<PathBuf>,
    /// A JWKS JSON file.
    pub jwks: Option<PathBuf>,
    pub issuer: String,
    pub audience: String,
}

struct TrustedKey {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
    kid: Option<String>,
    issuer: String,
    audience: Option<String>,
}

/// The keys bearer tokens are checked against.
#[derive(Default)]
pub struct Verifier {
    keys: Vec<TrustedKey>,
}

impl Verifier {
    /// Trust pier's own key; `audience` `None` skips the audience check.
    pub fn trust_own(&mut self, signer: &Signer, issuer: &str, audience: Option<String>) {
        self.keys.push(TrustedKey {
            key: DecodingKey::from_ec_der(&signer.public),
            algorithms: vec![Algorithm::ES256],
            kid: Some(signer.kid.clone()),
            issuer: issuer.to_string(),
            audience,
        });
    }

    pub fn trust_external(&mut self, ext: &ExternalIssuer) -> Result<(), AuthError> {
        let cfg = |p: &Path, e: String| AuthError::Config(format!("{}: {e}", p.display()));
        let mut added = 0;
        if let Some(p) = &ext.public_key {
            let pem = std::fs::read(p).map_err(|e| cfg(p, e.to_string()))?;
            let (key, algorithms) = if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                (k, vec![Algorithm::ES256, Algorithm::ES384])
            } else if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                (k, RSA.to_vec())
            } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
                (k, vec![Algorithm::EdDSA])
            } else {
                return Err(cfg(p, "not a PEM EC, RSA or Ed25519 public key".into()));
            };
            self.keys.push(TrustedKey {
                key,
                algorithms,
                kid: None,
                issuer: ext.issuer.clone(),
                audience: Some(ext.audience.clone()),
            });
            added += 1;
        }
        if let Some(p) = &ext.jwks {
            let text = std::fs::read_to_string(p).map_err(|e| cfg(p, e.to_string()))?;
            let set: jsonwebtoken::jwk::JwkSet =
                serde_json::from_str(&text).map_err(|e| cfg(p, format!("not a JWKS: {e}")))?;
            for jwk in &set.keys {
                use jsonwebtoken::jwk::AlgorithmParameters as P;
                let algorithms = match &jwk.algorithm {
                    P::EllipticCurve(_) => vec![Algorithm::ES256, Algorithm::ES384],
                    P::RSA(_) => RSA.to_vec(),
                    P::OctetKeyPair(_) => vec![Algorithm::EdDSA],
                    // A shared secret is not a public key: never trusted.
                    P::OctetKey(_) => continue,
                };
                let key = DecodingKey::from_jwk(jwk).map_err(|e| cfg(p, e.to_string()))?;
                self.keys.push(TrustedKey {
                    key,
                    algorithms,
                    kid: jwk.common.key_id.clone(),
                    issuer: ext.issuer.clone(),
                    audience: Some(ext.audience.clone()),
                });
                added += 1;
            }
        }
        if added == 0 {
            return Err(AuthError::Config(
                "[auth] external needs a public_key or a jwks file with a public key".into(),
            ));
        }
        Ok(())
    }

    /// The claims of a token one of the trusted keys signed, that is current and for us.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let bad = |why: String| AuthError::InvalidToken(why);
        // An unknown `alg` (`none` among them) fails here already.
        let header = jsonwebtoken::decode_header(token).map_err(|e| bad(e.to_string()))?;
        let mut last = "no trusted key for this token".to_string();
        for k in &self.keys {
            if !k.algorithms.contains(&header.alg) {
                continue;
            }
            if let (Some(want), Some(got)) = (&k.kid, &header.kid) {
                if want != got {
                    continue;
                }
            }
            let mut v = Validation::new(header.alg);
            v.algorithms = k.algorithms.clone();
            v.leeway = LEEWAY;
            v.validate_nbf = true;
            v.set_issuer(&[&k.issuer]);
            v.set_required_spec_claims(&["exp", "iss"]);
            match &k.audience {
                Some(a) => v.set_audience(&[a]),
                None => v.validate_aud = false,
            }
            match jsonwebtoken::decode::<Claims>(token, &k.key, &v) {
                Ok(data) => return Ok(data.claims),
                Err(e) => last = e.to_string(),
            }
        }
        Err(bad(last))
    }
}

const RSA: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// Write a new P-256 key as PKCS#8 PEM, readable by its owner only, atomically.
fn generate(path: &Path) -> Result<(), String> {
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .map_err(|e| format!("generating a key: {e}"))?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write as _;
        #[cfg(unix)]
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        o.mode(0o600);
        let mut f = o.open(&tmp).map_err(|e| e.to_string())?;
        f.write_all(pem.as_bytes()).map_err(|e| e.to_string())?;
        f.sync_all().map_err(|e| e.to_string())?;
    }
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}

/// The DER inside the first PEM block labelled `label`.
fn pem_body(pem: &str, label: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem
        .find(&begin)
        .ok_or_else(|| format!("no {begin} block"))?
        + begin.len();
    let stop = pem[start..]
        .find(&end)
        .ok_or_else(|| format!("no {end} line"))?
        + start;
    let b64: String = pem[start..stop].split_whitespace().collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("bad base64: {e}"))
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(dir: &Path, name: &str, ttl: u64) -> (Signer, TokenSettings) {
        let t = TokenSettings {
            issuer: "pier".into(),
            ttl: Duration::from_secs(ttl),
            key_file: dir.join(name),
            generate: true,
            service: Some("registry.test".into()),
        };
        (Signer::load(&t).expect("signer"), t)
    }

    fn pull(name: &str) -> Vec<Access> {
        vec![Access {
            kind: "repository".into(),
            name: name.into(),
            actions: vec!["pull".into()],
        }]
    }

    #[test]
    fn own_tokens_verify_and_bad_ones_do_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, t) = signer(dir.path(), "key.pem", 300);
        let mut v = Verifier::default();
        v.trust_own(&s, &t.issuer, t.service.clone());

        let good = s
            .issue(
                "alice",
                "registry.test",
                pull("team/app"),
                SystemTime::now(),
            )
            .expect("issue");
        let claims = v.verify(&good.token).expect("valid");
        assert_eq!(claims.sub, "alice");
        assert_eq!(granted(&claims.access, "team/app"), Actions::PULL);
        assert_eq!(granted(&claims.access, "team/other"), Actions::NONE);

        // The key persists: loading it again verifies the same token.
        let (again, _) = signer(dir.path(), "key.pem", 300);
        let mut v2 = Verifier::default();
        v2.trust_own(&again, "pier", Some("registry.test".into()));
        assert!(v2.verify(&good.token).is_ok());

        let old = SystemTime::now() - Duration::from_secs(3600);
        let expired = s
            .issue("alice", "registry.test", pull("team/app"), old)
            .expect("issue");
        assert!(v.verify(&expired.token).is_err(), "expired");

        let wrong_aud = s
            .issue("alice", "elsewhere", pull("team/app"), SystemTime::now())
            .expect("issue");
        assert!(v.verify(&wrong_aud.token).is_err(), "audience");

        let (other, _) = signer(dir.path(), "other.pem", 300);
        let forged = other
            .issue(
                "alice",
                "registry.test",
                pull("team/app"),
                SystemTime::now(),
            )
            .expect("issue");
        assert!(v.verify(&forged.token).is_err(), "another key");

        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let payload = good.token.split('.').nth(1).expect("payload");
        let none = format!("{}.{payload}.", b64(r#"{"alg":"none","typ":"JWT"}"#));
        assert!(v.verify(&none).is_err(), "alg none");
        let hs = format!("{}.{payload}.AAAA", b64(r#"{"alg":"HS256","typ":"JWT"}"#));
        assert!(v.verify(&hs).is_err(), "HMAC");
        assert!(v.verify("garbage").is_err());
    }

    #[test]
    fn external_issuer_by_jwks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, _) = signer(dir.path(), "ext.pem", 300);
        let jwks = serde_json::json!({"keys": [s.public_jwk()]});
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, jwks.to_string()).expect("write");
        let mut v = Verifier::default();
        v.trust_external(&ExternalIssuer {
            public_key: None,
            jwks: Some(path),
            issuer: "pier".into(),
            audience: "registry.test".into(),
        })
        .expect("trust");
        let t = s
            .issue("ci", "registry.test", pull("a/b"), SystemTime::now())
            .expect("issue");
        assert_eq!(v.verify(&t.token).expect("valid").sub, "ci");
        let t = s
            .issue("ci", "other-audience", pull("a/b"), SystemTime::now())
            .expect("issue");
        assert!(v.verify(&t.token).is_err());
    }

    #[test]
    fn scopes_parse() {
        assert_eq!(
            Scope::parse("repository:localhost:5000/team/app:pull,push"),
            Some(Scope {
                kind: "repository".into(),
                name: "localhost:5000/team/app".into(),
                actions: Actions::PULL.union(Actions::PUSH),
            })
        );
        assert_eq!(
            Scope::parse("registry:catalog:*").map(|s| s.name),
            Some("catalog".into())
        );
        assert_eq!(Scope::parse("nonsense"), None);
    }
}
