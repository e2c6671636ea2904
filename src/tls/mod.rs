//! Certificates: loading and checking PEM files, and choosing one by SNI.
//!
//! Everything that can fail happens at load time so that `check` reports it;
//! a handshake only looks a name up in a prebuilt map (no file IO, no
//! allocation beyond lowercasing a name that is not already lowercase).

use async_trait::async_trait;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use pingora::tls::pkey::{PKey, Private};
use pingora::tls::ssl::NameType;
use pingora::tls::x509::{X509VerifyResult, X509};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// A certificate chain (leaf first) with its private key and the names it serves.
pub struct CertifiedKey {
    pub chain: Vec<X509>,
    pub key: PKey<Private>,
    /// Lowercase DNS names from the SANs (or the CN when there are none);
    /// wildcards keep their `*.` prefix.
    pub names: Vec<String>,
    /// Seconds since the epoch after which the leaf is invalid.
    pub not_after_unix: i64,
    /// Seconds since the epoch from which the leaf is valid.
    pub not_before_unix: i64,
    /// `tls_handshakes_started_total` and `tls_handshakes_total` for this
    /// certificate, resolved on its first handshake rather than on each.
    handshake_counters: once_cell::sync::OnceCell<Option<(prometheus::IntCounter, prometheus::IntCounter)>>,
}

/// Which file is wrong and how; rendered next to the config key that names it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertError {
    #[error("cannot read certificate file {path}: {reason}")]
    UnreadableCert { path: String, reason: String },
    #[error("cannot read private key file {path}: {reason}")]
    UnreadableKey { path: String, reason: String },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("{path} is not a PEM private key: {reason}")]
    BadKey { path: String, reason: String },
    #[error("private key {key} does not match the certificate in {cert}")]
    KeyMismatch { cert: String, key: String },
    #[error("certificate {index} in {path} did not issue certificate {previous}: put the leaf first, then each intermediate in order")]
    ChainOrder { path: String, index: usize, previous: usize },
    #[error("certificate in {path} names no DNS host (no subjectAltName DNS entry or common name)")]
    NoNames { path: String },
}

impl CertifiedKey {
    /// Counted under the certificate's first name; none without a name.
    fn handshake_counters(&self) -> Option<&(prometheus::IntCounter, prometheus::IntCounter)> {
        self.handshake_counters
            .get_or_init(|| {
                let metrics = &crate::observe::metrics::METRICS;
                self.names.first().map(|name| {
                    (
                        metrics.connections.tls_handshakes_started.with_label_values(&[name]),
                        metrics.connections.tls_handshakes.with_label_values(&[name]),
                    )
                })
            })
            .as_ref()
    }

    pub fn load(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, CertError> {
        let cert_name = cert_path.display().to_string();
        let key_name = key_path.display().to_string();
        let cert_pem = std::fs::read(cert_path)
            .map_err(|e| CertError::UnreadableCert { path: cert_name.clone(), reason: e.to_string() })?;
        let key_pem = std::fs::read(key_path)
            .map_err(|e| CertError::UnreadableKey { path: key_name.clone(), reason: e.to_string() })?;
        Self::from_pem(&cert_pem, &key_pem, &cert_name, &key_name)
    }

    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        cert_name: &str,
        key_name: &str,
    ) -> Result<CertifiedKey, CertError> {
        let chain = X509::stack_from_pem(cert_pem).unwrap_or_default();
        let Some(leaf) = chain.first() else {
            return Err(CertError::NoCertificate { path: cert_name.to_string() });
        };
        let key = PKey::private_key_from_pem(key_pem)
            .map_err(|e| CertError::BadKey { path: key_name.to_string(), reason: first_openssl_reason(&e) })?;
        let matches = leaf.public_key().map(|public| public.public_eq(&key)).unwrap_or(false);
        if !matches {
            return Err(CertError::KeyMismatch { cert: cert_name.to_string(), key: key_name.to_string() });
        }
        for (index, pair) in chain.windows(2).enumerate() {
            if pair[1].issued(&pair[0]) != X509VerifyResult::OK {
                return Err(CertError::ChainOrder { path: cert_name.to_string(), index: index + 1, previous: index });
            }
        }
        let names = names_of(leaf);
        if names.is_empty() {
            return Err(CertError::NoNames { path: cert_name.to_string() });
        }
        let not_after_unix = asn1_to_unix(leaf.not_after());
        let not_before_unix = asn1_to_unix(leaf.not_before());
        Ok(CertifiedKey {
            chain,
            key,
            names,
            not_after_unix,
            not_before_unix,
            handshake_counters: once_cell::sync::OnceCell::new(),
        })
    }
}

fn first_openssl_reason(e: &pingora::tls::error::ErrorStack) -> String {
    e.errors().first().and_then(|err| err.reason().map(str::to_string)).unwrap_or_else(|| "unrecognised format".into())
}

fn names_of(leaf: &X509) -> Vec<String> {
    let mut names: Vec<String> = leaf
        .subject_alt_names()
        .map(|sans| sans.iter().filter_map(|n| n.dnsname().map(str::to_ascii_lowercase)).collect())
        .unwrap_or_default();
    if names.is_empty() {
        names = leaf
            .subject_name()
            .entries_by_nid(pingora::tls::nid::Nid::COMMONNAME)
            .filter_map(|entry| entry.data().to_string().ok().map(|s| s.to_ascii_lowercase()))
            .collect();
    }
    names
}

fn asn1_to_unix(time: &openssl::asn1::Asn1TimeRef) -> i64 {
    let epoch = openssl::asn1::Asn1Time::from_unix(0);
    match epoch.as_ref().map(|epoch| epoch.diff(time)) {
        Ok(Ok(diff)) => i64::from(diff.days) * 86_400 + i64::from(diff.secs),
        _ => 0,
    }
}

/// Certificates indexed by name: exact match, then wildcard, then the first.
/// `certificate_expiry_timestamp_seconds` for each certificate of a store
/// (by its first name), set whenever a store goes live.
pub fn publish_expiry(store: &CertStore) {
    let metrics = &crate::observe::metrics::METRICS;
    for cert in store.certificates() {
        if let Some(name) = cert.names.first() {
            metrics.operations.certificate_expiry.with_label_values(&[name]).set(cert.not_after_unix);
        }
    }
}

pub struct CertStore {
    certs: Vec<Arc<CertifiedKey>>,
    exact: HashMap<String, usize>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, usize>,
}

impl CertStore {
    /// The first certificate that claims a name wins it, so the config order
    /// decides overlaps and the first one is the default.
    pub fn new(certs: Vec<Arc<CertifiedKey>>) -> CertStore {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (index, cert) in certs.iter().enumerate() {
            for name in &cert.names {
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()).or_insert(index),
                    None => exact.entry(name.clone()).or_insert(index),
                };
            }
        }
        CertStore { certs, exact, wildcard }
    }

    /// Whether a certificate here serves `name` by its own names (not as the default).
    pub fn covers(&self, name: &str) -> bool {
        self.exact.contains_key(name)
            || name.split_once('.').is_some_and(|(_, parent)| self.wildcard.contains_key(parent))
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    pub fn certificates(&self) -> &[Arc<CertifiedKey>] {
        &self.certs
    }

    /// The certificate for a handshake's server name.
    pub fn select(&self, server_name: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        let index = server_name.and_then(|name| {
            let name = name.trim_end_matches('.');
            let lowered;
            let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                lowered = name.to_ascii_lowercase();
                lowered.as_str()
            } else {
                name
            };
            self.exact.get(name).or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.wildcard.get(parent)
            })
        });
        self.certs.get(index.copied().unwrap_or(0))
    }
}

/// Where the handshake finds the certificates in force. The running
/// snapshot implements it, so a reload replaces certificates together with
/// everything else, without this module knowing the snapshot's type.
pub trait CurrentCertificates: Send + Sync + 'static {
    fn current(&self) -> Arc<CertStore>;
}

/// Pingora's handshake hook: installs the chosen chain and key on the connection.
pub struct SniResolver<S> {
    pub source: Arc<S>,
}

#[async_trait]
impl<S: CurrentCertificates> TlsAccept for SniResolver<S> {
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        let store = self.source.current();
        let Some(cert) = store.select(ssl.servername(NameType::HOST_NAME)).cloned() else {
            log::warn!("TLS handshake but no certificate is loaded");
            return;
        };
        let Some(leaf) = cert.chain.first() else {
            return;
        };
        let installed = pingora::tls::ext::ssl_use_certificate(ssl, leaf)
            .and_then(|_| pingora::tls::ext::ssl_use_private_key(ssl, &cert.key))
            .and_then(|_| cert.chain[1..].iter().try_for_each(|c| pingora::tls::ext::ssl_add_chain_cert(ssl, c)));
        if let Some((started, _)) = cert.handshake_counters() {
            started.inc();
        }
        if let Err(e) = installed {
            log::error!("cannot install the certificate for {:?}: {e}", cert.names.first());
        }
    }

    async fn handshake_complete_callback(&self, ssl: &TlsRef) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let store = self.source.current();
        if let Some((_, completed)) =
            store.select(ssl.servername(NameType::HOST_NAME)).and_then(|cert| cert.handshake_counters())
        {
            completed.inc();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> CertifiedKey {
        let cert = rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        CertifiedKey::from_pem(cert.cert.pem().as_bytes(), cert.key_pair.serialize_pem().as_bytes(), "c", "k").unwrap()
    }

    #[test]
    fn sni_prefers_exact_then_wildcard_then_default() {
        let store = CertStore::new(vec![
            Arc::new(self_signed(&["default.example"])),
            Arc::new(self_signed(&["*.example.com"])),
            Arc::new(self_signed(&["matrix.example.com"])),
        ]);
        assert!(store.covers("chat.example.com") && store.covers("default.example"));
        assert!(!store.covers("example.com") && !store.covers("a.b.example.com"));
        let pick = |name: Option<&str>| store.select(name).unwrap().names[0].clone();
        assert_eq!(pick(Some("matrix.example.com")), "matrix.example.com");
        assert_eq!(pick(Some("MATRIX.Example.com.")), "matrix.example.com");
        assert_eq!(pick(Some("chat.example.com")), "*.example.com");
        assert_eq!(pick(Some("a.b.example.com")), "default.example");
        assert_eq!(pick(Some("example.com")), "default.example");
        assert_eq!(pick(None), "default.example");
    }

    #[test]
    fn mismatched_key_is_refused() {
        let a = rcgen::generate_simple_self_signed(vec!["a.example".to_string()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.example".to_string()]).unwrap();
        let err =
            CertifiedKey::from_pem(a.cert.pem().as_bytes(), b.key_pair.serialize_pem().as_bytes(), "a.pem", "b.key")
                .err()
                .unwrap();
        assert_eq!(err, CertError::KeyMismatch { cert: "a.pem".into(), key: "b.key".into() });
    }

    #[test]
    fn garbage_is_named() {
        let err = CertifiedKey::from_pem(b"nope", b"nope", "x.pem", "x.key").err().unwrap();
        assert_eq!(err, CertError::NoCertificate { path: "x.pem".into() });
    }
}
