//! The state directory: one folder per CA (so a staging certificate is
//! never served after switching to production), holding the account and
//! one folder per name with `fullchain.pem` and `key.pem`.
//!
//! Files are written to a temporary name and renamed, key first: a crash
//! in between leaves a key that does not match the chain, which `load`
//! refuses like a missing certificate, so the name is ordered again.

use crate::tls::CertifiedKey;
use openssl::asn1::Asn1Time;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::stack::Stack;
use openssl::x509::extension::SubjectAlternativeName;
use openssl::x509::{X509Builder, X509NameBuilder, X509ReqBuilder};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    /// `<state_dir>/acme/<ca>`.
    pub dir: PathBuf,
}

impl Store {
    pub fn new(state_dir: &Path, directory_url: &str) -> Store {
        Store { dir: state_dir.join("acme").join(ca_folder(directory_url)) }
    }

    fn name_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn chain_path(&self, name: &str) -> PathBuf {
        self.name_dir(name).join("fullchain.pem")
    }

    fn key_path(&self, name: &str) -> PathBuf {
        self.name_dir(name).join("key.pem")
    }

    fn renew_marker(&self, name: &str) -> PathBuf {
        self.name_dir(name).join("renew-requested")
    }

    pub fn account_path(&self) -> PathBuf {
        self.dir.join("account.json")
    }

    /// The stored certificate for `name`, if there is a usable one.
    pub fn load(&self, name: &str) -> Option<CertifiedKey> {
        let cert = self.chain_path(name);
        if !cert.exists() {
            return None;
        }
        match CertifiedKey::load(&cert, &self.key_path(name)) {
            Ok(loaded) if loaded.names.iter().any(|n| n == name) => Some(loaded),
            Ok(_) => {
                log::warn!("{} does not name {name}; ordering it again", cert.display());
                None
            }
            Err(error) => {
                log::warn!("stored certificate for {name} unusable ({error}); ordering it again");
                None
            }
        }
    }

    pub fn save(&self, name: &str, chain_pem: &[u8], key_pem: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(self.name_dir(name))?;
        write_private(&self.key_path(name), key_pem)?;
        write_private(&self.chain_path(name), chain_pem)?;
        let _ = std::fs::remove_file(self.renew_marker(name));
        Ok(())
    }

    /// Asks the running edge to renew `name` at its next look (`matrix-edge renew`).
    pub fn request_renewal(&self, name: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(self.name_dir(name))?;
        write_private(&self.renew_marker(name), b"")
    }

    pub fn renewal_requested(&self, name: &str) -> bool {
        self.renew_marker(name).exists()
    }

    pub fn clear_request(&self, name: &str) {
        let _ = std::fs::remove_file(self.renew_marker(name));
    }

    pub fn save_account(&self, json: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        write_private(&self.account_path(), json)
    }
}

/// Owner-only, written whole then renamed into place.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

/// `acme-v02.api.letsencrypt.org-1f0e…`: readable, and distinct per URL.
fn ca_folder(directory_url: &str) -> String {
    let host = directory_url.split("://").nth(1).unwrap_or(directory_url).split('/').next().unwrap_or("");
    let readable: String =
        host.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect();
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let hash =
        directory_url.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("{readable}-{:08x}", hash as u32)
}

/// A fresh P-256 key in PKCS#8 PEM.
pub fn new_key() -> Result<PKey<Private>, openssl::error::ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    PKey::from_ec_key(EcKey::generate(&group)?)
}

/// A DER certificate request for `name` signed by `key`.
pub fn csr_der(name: &str, key: &PKey<Private>) -> Result<Vec<u8>, openssl::error::ErrorStack> {
    let mut request = X509ReqBuilder::new()?;
    let mut subject = X509NameBuilder::new()?;
    subject.append_entry_by_nid(Nid::COMMONNAME, name)?;
    request.set_subject_name(&subject.build())?;
    request.set_pubkey(key)?;
    let mut extensions = Stack::new()?;
    extensions.push(SubjectAlternativeName::new().dns(name).build(&request.x509v3_context(None))?)?;
    request.add_extensions(&extensions)?;
    request.sign(key, MessageDigest::sha256())?;
    request.build().to_der()
}

/// RFC 5280 §4.1.2.2: positive and at most 20 octets. 127 random bits with
/// the top one set are 16 octets whose first bit is clear: never zero,
/// never negative, never padded.
fn random_serial() -> Result<openssl::asn1::Asn1Integer, openssl::error::ErrorStack> {
    let mut serial = openssl::bn::BigNum::new()?;
    serial.rand(127, openssl::bn::MsbOption::ONE, false)?;
    serial.to_asn1_integer()
}

/// A self-signed certificate for `name`, served until the CA's arrives so
/// the listeners can bind at once. Clients refuse it, as they should.
pub fn placeholder(name: &str) -> Result<CertifiedKey, String> {
    let build = || -> Result<(Vec<u8>, Vec<u8>), openssl::error::ErrorStack> {
        let key = new_key()?;
        let mut subject = X509NameBuilder::new()?;
        subject.append_entry_by_nid(Nid::COMMONNAME, &format!("matrix-edge placeholder for {name}"))?;
        let subject = subject.build();
        let mut cert = X509Builder::new()?;
        cert.set_version(2)?;
        cert.set_serial_number(&*random_serial()?)?;
        cert.set_subject_name(&subject)?;
        cert.set_issuer_name(&subject)?;
        cert.set_pubkey(&key)?;
        cert.set_not_before(&*Asn1Time::days_from_now(0)?)?;
        cert.set_not_after(&*Asn1Time::days_from_now(7)?)?;
        let san = SubjectAlternativeName::new().dns(name).build(&cert.x509v3_context(None, None))?;
        cert.append_extension(san)?;
        cert.sign(&key, MessageDigest::sha256())?;
        Ok((cert.build().to_pem()?, key.private_key_to_pem_pkcs8()?))
    };
    let (cert, key) = build().map_err(|e| format!("cannot make a placeholder certificate for {name}: {e}"))?;
    CertifiedKey::from_pem(&cert, &key, "placeholder", "placeholder").map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_ca_has_its_own_folder() {
        let state = Path::new("/state");
        let production = Store::new(state, "https://acme-v02.api.letsencrypt.org/directory");
        let staging = Store::new(state, "https://acme-staging-v02.api.letsencrypt.org/directory");
        let pebble = Store::new(state, "https://127.0.0.1:14000/dir");
        assert!(production.dir.to_string_lossy().starts_with("/state/acme/acme-v02.api.letsencrypt.org-"));
        assert_ne!(production, staging);
        assert!(pebble.dir.to_string_lossy().contains("127.0.0.1_14000-"));
        assert_eq!(production, Store::new(state, "https://acme-v02.api.letsencrypt.org/directory"));
    }

    #[test]
    fn saved_certificates_load_and_mismatches_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), "https://ca.test/dir");
        assert!(store.load("a.test").is_none());
        let issued = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
        store.save("a.test", issued.cert.pem().as_bytes(), issued.key_pair.serialize_pem().as_bytes()).unwrap();
        assert_eq!(store.load("a.test").unwrap().names, vec!["a.test"]);
        // Renewal requests are cleared by the next save.
        store.request_renewal("a.test").unwrap();
        assert!(store.renewal_requested("a.test"));
        let other = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
        // Key written, chain not yet (a crash between the renames).
        write_private(&store.key_path("a.test"), other.key_pair.serialize_pem().as_bytes()).unwrap();
        assert!(store.load("a.test").is_none());
        store.save("a.test", other.cert.pem().as_bytes(), other.key_pair.serialize_pem().as_bytes()).unwrap();
        assert!(store.load("a.test").is_some());
        assert!(!store.renewal_requested("a.test"));
        // A stored certificate that does not name the folder's name is not used for it.
        std::fs::create_dir_all(store.name_dir("b.test")).unwrap();
        std::fs::copy(store.chain_path("a.test"), store.chain_path("b.test")).unwrap();
        std::fs::copy(store.key_path("a.test"), store.key_path("b.test")).unwrap();
        assert!(store.load("b.test").is_none());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(store.key_path("a.test")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o077, 0, "the key is readable by others");
    }

    /// The serial's DER content octets, checked against RFC 5280 §4.1.2.2.
    fn placeholder_serial(name: &str) -> Vec<u8> {
        let key = placeholder(name).unwrap();
        let serial = key.chain[0].serial_number().to_bn().unwrap();
        assert!(!serial.is_negative(), "negative serial");
        assert!(serial.num_bits() > 0, "zero serial");
        let octets = serial.to_vec();
        // Content octets of the DER INTEGER: a leading zero when the top bit is set.
        let der_len = octets.len() + usize::from(octets[0] & 0x80 != 0);
        assert!(der_len <= 20, "serial of {der_len} octets");
        octets
    }

    #[test]
    fn placeholders_and_requests_name_the_host() {
        let cert = placeholder("matrix.example.org").unwrap();
        assert_eq!(cert.names, vec!["matrix.example.org"]);
        let first = placeholder_serial("matrix.example.org");
        assert_ne!(first, placeholder_serial("matrix.example.org"), "serials must not repeat");
        let key = new_key().unwrap();
        let der = csr_der("matrix.example.org", &key).unwrap();
        let request = openssl::x509::X509Req::from_der(&der).unwrap();
        assert!(request.verify(&request.public_key().unwrap()).unwrap());
    }
}
