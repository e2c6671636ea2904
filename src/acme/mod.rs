//! Certificates ordered and renewed by the edge (RFC 8555, HTTP-01).
//!
//! `plan` turns `tls.acme` into settings `check` can vouch for; `store`
//! keeps the account and certificates; `schedule` says when to renew;
//! `Challenges` is what the plain-HTTP listener answers
//! `/.well-known/acme-challenge/` from. The service that talks to the CA
//! and swaps new certificates in is `services::acme`.

pub mod schedule;
pub mod store;

use crate::config::{AcmeConfig, ConfigError, Seg, Source};
use crate::tls::CertifiedKey;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// `tls.acme`, checked and resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmePlan {
    pub directory_url: String,
    pub contact: String,
    pub ca_file: Option<PathBuf>,
    /// Key ID and the decoded MAC key.
    pub external_account: Option<(String, Vec<u8>)>,
    pub names: Vec<String>,
    pub store: store::Store,
}

impl AcmePlan {
    /// Checks `tls.acme`. `served` lists the names the edge serves over TLS
    /// in config order, `covered` says whether a certificate file covers one.
    pub fn from_config(
        config: &AcmeConfig,
        served: &[String],
        covered: &dyn Fn(&str) -> bool,
        source: &Source,
    ) -> Result<AcmePlan, ConfigError> {
        let at = |key| [Seg::Key("tls"), Seg::Key("acme"), Seg::Key(key)];
        let contact = config.contact.trim();
        let looks_like_email = contact.split_once('@').is_some_and(|(user, domain)| {
            !user.is_empty() && domain.contains('.') && !contact.contains(char::is_whitespace)
        });
        if !looks_like_email {
            return Err(source.error_at(&at("contact"), format!("{contact:?} is not an email address")));
        }
        let directory_url = match config.directory.as_str() {
            "letsencrypt" => LETSENCRYPT.to_string(),
            "letsencrypt-staging" => LETSENCRYPT_STAGING.to_string(),
            url if url.starts_with("https://") && url.len() > "https://".len() => url.to_string(),
            other => {
                return Err(source.error_at(
                    &at("directory"),
                    format!("{other:?}: use letsencrypt, letsencrypt-staging or the https:// URL of an ACME directory"),
                ))
            }
        };
        let base = source.file.parent().unwrap_or(std::path::Path::new("."));
        let ca_file = match &config.ca_file {
            Some(file) => {
                let path = base.join(file);
                let pem = std::fs::read(&path)
                    .map_err(|e| source.error_at(&at("ca_file"), format!("cannot read {}: {e}", path.display())))?;
                if openssl::x509::X509::stack_from_pem(&pem).map_or(true, |certs| certs.is_empty()) {
                    return Err(source.error_at(&at("ca_file"), format!("{} holds no PEM certificate", path.display())));
                }
                Some(path)
            }
            None => None,
        };
        let external_account = match &config.external_account {
            Some(eab) => {
                use base64::Engine;
                let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(eab.hmac_key.trim().trim_end_matches('='))
                    .map_err(|e| {
                        source.error_at(
                            &[Seg::Key("tls"), Seg::Key("acme"), Seg::Key("external_account"), Seg::Key("hmac_key")],
                            format!("not base64url: {e}"),
                        )
                    })?;
                if eab.key_id.trim().is_empty() {
                    return Err(source.error_at(
                        &[Seg::Key("tls"), Seg::Key("acme"), Seg::Key("external_account"), Seg::Key("key_id")],
                        "must not be empty",
                    ));
                }
                Some((eab.key_id.trim().to_string(), key))
            }
            None => None,
        };
        let names = match &config.names {
            Some(names) => {
                let mut checked = Vec::with_capacity(names.len());
                for (index, name) in names.iter().enumerate() {
                    let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
                    if let Err(why) = check_orderable(&name) {
                        return Err(source.error_at(
                            &[Seg::Key("tls"), Seg::Key("acme"), Seg::Key("names"), Seg::Index(index)],
                            why,
                        ));
                    }
                    if !checked.contains(&name) {
                        checked.push(name);
                    }
                }
                checked
            }
            None => served.iter().filter(|n| check_orderable(n).is_ok() && !covered(n)).cloned().collect(),
        };
        if names.is_empty() {
            return Err(source.error_at(
                &[Seg::Key("tls"), Seg::Key("acme")],
                "no name to order: every served name is covered by tls.certificates (list `names` to order some anyway)",
            ));
        }
        Ok(AcmePlan {
            store: store::Store::new(&base.join(&config.state_dir), &directory_url),
            directory_url,
            contact: contact.to_string(),
            ca_file,
            external_account,
            names,
        })
    }

    /// For each name: the stored certificate, or a placeholder until there is one.
    pub fn certificates(&self) -> Result<Vec<CertifiedKey>, String> {
        self.names.iter().map(|name| self.store.load(name).map_or_else(|| store::placeholder(name), Ok)).collect()
    }
}

/// HTTP-01 can prove a plain DNS name, not a wildcard or an address.
fn check_orderable(name: &str) -> Result<(), String> {
    if name.starts_with("*.") {
        return Err(format!(
            "{name}: wildcard certificates need DNS-01, which matrix-edge does not do; list the hosts"
        ));
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!("{name}: an IP address, not a DNS name"));
    }
    let labels_ok = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    });
    if !labels_ok || !name.contains('.') || name.len() > 253 {
        return Err(format!("{name:?} is not a public DNS name"));
    }
    Ok(())
}

/// Tokens the CA will fetch over plain HTTP and their key authorizations.
/// Shared by the manager (which fills it while an order is open) and every
/// snapshot's request path, so it outlives reloads.
#[derive(Default)]
pub struct Challenges {
    pending: RwLock<HashMap<String, String>>,
}

impl Challenges {
    pub fn answer(&self, token: &[u8]) -> Option<String> {
        let token = std::str::from_utf8(token).ok()?;
        self.pending.read().ok()?.get(token).cloned()
    }

    pub fn offer(&self, token: &str, key_authorization: String) {
        if let Ok(mut pending) = self.pending.write() {
            pending.insert(token.to_string(), key_authorization);
        }
    }

    pub fn withdraw(&self, token: &str) {
        if let Ok(mut pending) = self.pending.write() {
            pending.remove(token);
        }
    }
}

pub type SharedChallenges = Arc<Challenges>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_dns_names_can_be_ordered() {
        assert!(check_orderable("matrix.example.org").is_ok());
        assert!(check_orderable("*.example.org").unwrap_err().contains("DNS-01"));
        assert!(check_orderable("192.0.2.1").is_err());
        assert!(check_orderable("localhost").is_err());
        assert!(check_orderable("bad_name.example.org").is_err());
        assert!(check_orderable("-x.example.org").is_err());
    }

    #[test]
    fn challenges_answer_only_what_was_offered() {
        let challenges = Challenges::default();
        assert_eq!(challenges.answer(b"t1"), None);
        challenges.offer("t1", "t1.thumb".into());
        assert_eq!(challenges.answer(b"t1").as_deref(), Some("t1.thumb"));
        assert_eq!(challenges.answer(b"t2"), None);
        challenges.withdraw("t1");
        assert_eq!(challenges.answer(b"t1"), None);
    }
}
