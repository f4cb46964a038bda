//! Mutual TLS between peers (`--peer-tls-cert`, `--peer-tls-key`, `--peer-tls-ca`): the peer
//! listener accepts only clients with a certificate issued by the cluster's CA, and a node
//! dials peers over TLS presenting its own certificate and trusting only that CA. A peer's
//! certificate must name the address it advertises (an IP address or DNS subject alternative
//! name), since that is the name a node dials.
//!
//! The main listener's TLS (`--tls-cert`, `--tls-key`, optionally `--tls-client-ca`) is built
//! here too, from the same pieces: [`CertFiles`] holds a certificate and key loaded from files
//! and hands the current pair to every new handshake, so replacing the files (a renewal) and
//! calling [`CertFiles::reload_if_changed`] takes effect for new connections while existing ones
//! keep the certificate they began with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Both sides of a node's peer TLS.
#[derive(Clone)]
pub struct PeerTls {
    pub server: Arc<ServerConfig>,
    pub client: ClientConfig,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerTls(..)")
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

fn roots(ca: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots
            .add(c)
            .map_err(|e| format!("bad CA certificate in {}: {e}", ca.display()))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its key, read from two PEM files and re-read when they change.
pub struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' modification times when they were last read.
    seen: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl std::fmt::Debug for CertFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CertFiles({})", self.cert.display())
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl CertFiles {
    /// Read both files; an unreadable file, a key that is not a key, or a key that does not
    /// belong to the certificate is an error naming the file.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<CertFiles>, String> {
        let seen = (modified(cert), modified(key));
        let current = Self::read(cert, key)?;
        Ok(Arc::new(CertFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(Arc::new(current)),
            seen: Mutex::new(seen),
        }))
    }

    fn read(cert: &Path, key_path: &Path) -> Result<CertifiedKey, String> {
        let chain = certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key_path)
            .map_err(|e| format!("cannot read the private key {}: {e}", key_path.display()))?;
        let signing = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("unusable private key {}: {e}", key_path.display()))?;
        let certified = CertifiedKey::new(chain, signing);
        certified.keys_match().map_err(|e| {
            format!(
                "the key {} does not belong to the certificate {}: {e}",
                key_path.display(),
                cert.display()
            )
        })?;
        Ok(certified)
    }

    /// Re-read the files now. On an error the previous certificate stays in use.
    pub fn reload(&self) -> Result<(), String> {
        let seen = (modified(&self.cert), modified(&self.key));
        let fresh = Self::read(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = seen;
        Ok(())
    }

    /// Re-read the files if either changed since the last read; returns whether it did.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let now = (modified(&self.cert), modified(&self.key));
        if *self.seen.lock().unwrap_or_else(|p| p.into_inner()) == now {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }

    /// The certificate chain and key new handshakes get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The main listener's TLS: the certificate from `cert`, HTTP/2 and HTTP/1.1 offered by ALPN,
/// and, with `client_ca`, only clients presenting a certificate that CA issued.
pub fn main_server_config(
    cert: Arc<CertFiles>,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, String> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let mut server = match client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider)
                    .build()
                    .map_err(|e| format!("TLS client verifier: {e}"))?;
            builder
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(cert)
        }
        None => builder.with_no_client_auth().with_cert_resolver(cert),
    };
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(server))
}

impl PeerTls {
    /// Load this node's certificate chain and key and the CA that issues every node's.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<PeerTls, String> {
        let chain = certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| format!("cannot read the private key {}: {e}", key.display()))?;
        let roots = Arc::new(roots(ca)?);
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| format!("peer TLS client verifier: {e}"))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("peer TLS: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("peer TLS certificate {}: {e}", cert.display()))?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("peer TLS: {e}"))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("peer TLS client certificate {}: {e}", cert.display()))?;
        Ok(PeerTls {
            server: Arc::new(server),
            client,
        })
    }
}
