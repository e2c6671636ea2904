//! An HTTPS key server for origins that sign federation requests: a
//! stand-in for each origin's Synapse answering `/_matrix/key/v2/server`
//! self-signed, as the spec says, chosen by `Host`; counts its fetches.

use crate::support::certs::Leaf;
use matrix_edge::federation::signing::{encode_unpadded, sign, signed_bytes};
use openssl::pkey::{PKey, Private};
use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The origins' published keys: server name (with port) to key id and key.
type Published = Arc<Mutex<Vec<(String, String, PKey<Private>)>>>;

/// An HTTPS key server for every origin, by `Host`; counts its fetches.
pub struct KeyServer {
    pub address: SocketAddr,
    published: Published,
    /// Origins that publish the weak key (and its forged self-signature).
    weak: Arc<Mutex<Vec<String>>>,
    fetches: Arc<AtomicUsize>,
}

/// The identity point as an ed25519 public key, and the "signature"
/// (R = identity, S = 0) that a lenient verifier (OpenSSL's) accepts from
/// it for any message at all.
pub fn weak_key() -> String {
    let mut key = [0u8; 32];
    key[0] = 1;
    encode_unpadded(&key)
}

pub fn weak_forgery() -> String {
    let mut signature = [0u8; 64];
    signature[0] = 1;
    encode_unpadded(&signature)
}

/// A key document listing a good key, which signs it, and the weak key
/// beside it (a server whose keys were tampered with): the document
/// verifies, and a request "signed" by the weak key must still be refused.
fn weak_key_document(origin: &str) -> Value {
    let good = PKey::generate_ed25519().unwrap();
    let valid_until =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64 + 3_600_000;
    let mut document = json!({
        "server_name": origin,
        "valid_until_ts": valid_until,
        "verify_keys": {
            "ed25519:good": { "key": encode_unpadded(&good.raw_public_key().unwrap()) },
            "ed25519:w": { "key": weak_key() },
        },
        "old_verify_keys": {},
    });
    let message = signed_bytes(&document).unwrap();
    document["signatures"] = json!({ origin: { "ed25519:good": sign(&good, &message).unwrap() } });
    document
}

impl KeyServer {
    pub fn start(dir: &std::path::Path, leaf: &Leaf) -> KeyServer {
        std::fs::write(dir.join("ks.pem"), &leaf.fullchain_pem).unwrap();
        std::fs::write(dir.join("ks.key"), &leaf.key_pem).unwrap();
        let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
        acceptor.set_certificate_chain_file(dir.join("ks.pem")).unwrap();
        acceptor.set_private_key_file(dir.join("ks.key"), SslFiletype::PEM).unwrap();
        let acceptor = Arc::new(acceptor.build());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let published: Published = Arc::default();
        let weak: Arc<Mutex<Vec<String>>> = Arc::default();
        let fetches = Arc::new(AtomicUsize::new(0));
        let (keys, weak_origins, count) = (Arc::clone(&published), Arc::clone(&weak), Arc::clone(&fetches));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (acceptor, keys, count) = (Arc::clone(&acceptor), Arc::clone(&keys), Arc::clone(&count));
                let weak_origins = Arc::clone(&weak_origins);
                std::thread::spawn(move || {
                    let Ok(stream) = acceptor.accept(stream) else { return };
                    let mut reader = BufReader::new(stream);
                    let (mut line, mut host) = (String::new(), String::new());
                    reader.read_line(&mut line).unwrap_or(0);
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                            break;
                        }
                        if let Some(value) = header.strip_prefix("Host:").or_else(|| header.strip_prefix("host:")) {
                            host = value.trim().to_string();
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let document = if weak_origins.lock().unwrap().contains(&host) {
                        weak_key_document(&host)
                    } else {
                        key_document(&keys.lock().unwrap(), &host)
                    };
                    let body = document.to_string();
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = reader.get_mut().write_all(answer.as_bytes());
                });
            }
        });
        KeyServer { address, published, weak, fetches }
    }

    pub fn publish_weak(&self, origin: &str) {
        self.weak.lock().unwrap().push(origin.into());
    }

    pub fn publish(&self, origin: &str, key_id: &str) -> PKey<Private> {
        let key = PKey::generate_ed25519().unwrap();
        let mut published = self.published.lock().unwrap();
        published.retain(|(name, _, _)| name != origin);
        published.push((origin.into(), key_id.into(), key.clone()));
        key
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// `/_matrix/key/v2/server` for `origin`, self-signed.
fn key_document(published: &[(String, String, PKey<Private>)], origin: &str) -> Value {
    let mut verify_keys = serde_json::Map::new();
    for (_, key_id, key) in published.iter().filter(|(name, _, _)| name == origin) {
        verify_keys.insert(key_id.clone(), json!({ "key": encode_unpadded(&key.raw_public_key().unwrap()) }));
    }
    let valid_until =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64 + 3_600_000;
    let mut document = json!({
        "server_name": origin,
        "valid_until_ts": valid_until,
        "verify_keys": verify_keys,
        "old_verify_keys": {},
    });
    let message = signed_bytes(&document).unwrap();
    let mut signatures = serde_json::Map::new();
    for (_, key_id, key) in published.iter().filter(|(name, _, _)| name == origin) {
        signatures.insert(key_id.clone(), json!(sign(key, &message).unwrap()));
    }
    document["signatures"] = json!({ origin: signatures });
    document
}
