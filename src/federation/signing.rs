//! Signed JSON as the spec's appendix defines it: ed25519 over the
//! canonical JSON of an object without `signatures` and `unsigned`, in
//! unpadded base64. Signatures are checked strictly (ed25519-dalek's
//! `verify_strict`): a small-order ("weak") key, which OpenSSL accepts and
//! which lets anyone sign anything as that key, and a non-canonical
//! signature are refused; so are the keys Synapse bans. The edge's own
//! signing (doctor's requests) stays OpenSSL's.

use crate::federation::canonical;
use crate::federation::{bad_keys, FederationError};
use openssl::pkey::{Id, PKey, Private};
use serde_json::Value;

/// Lenient as Python's `unpaddedbase64` is: padding optional, the URL-safe
/// alphabet accepted, stray low bits ignored.
fn engine(alphabet: &base64::alphabet::Alphabet) -> base64::engine::GeneralPurpose {
    let config = base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true);
    base64::engine::GeneralPurpose::new(alphabet, config)
}

pub fn decode_unpadded(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let alphabet = if text.contains(['-', '_']) { &base64::alphabet::URL_SAFE } else { &base64::alphabet::STANDARD };
    engine(alphabet).decode(text).ok()
}

pub fn encode_unpadded(bytes: &[u8]) -> String {
    use base64::Engine;
    engine(&base64::alphabet::STANDARD).encode(bytes)
}

/// Server signing keys Synapse refuses outright (`BANNED_SERVER_SIGNING_KEYS`
/// in `synapse/crypto/keyring.py`, since 1.147.1: CVE-2026-24044,
/// ELEMENTSEC-2025-1670), compared as bytes: Synapse lists the key in
/// padded base64 and compares it with its unpadded encoding, so its own
/// check never matches (seen with 1.163.2).
const BANNED_KEYS: [&str; 1] = ["l/O9hxMVKB6Lg+3Hqf0FQQZhVESQcMzbPN1Cz2nM3og="];

/// An ed25519 public key a server published, checked when it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

/// Why a published key is never used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefusal {
    /// A point of small order: signatures by it prove nothing.
    Weak,
    /// On Synapse's list of known insecure keys.
    Banned,
}

impl KeyRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            KeyRefusal::Weak => "weak_key",
            KeyRefusal::Banned => "banned_key",
        }
    }
}

impl std::fmt::Display for KeyRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyRefusal::Weak => "the origin signed with a weak (small-order) key",
            KeyRefusal::Banned => "the origin signed with a key known to be insecure (CVE-2026-24044)",
        })
    }
}

/// An ed25519 public key from its unpadded base64 form: `None` when it is
/// not one, the refusal when it is one no signature by may count.
pub fn public_key(text: &str) -> Option<Result<PublicKey, KeyRefusal>> {
    let raw: [u8; 32] = decode_unpadded(text)?.try_into().ok()?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&raw).ok()?;
    if BANNED_KEYS.iter().any(|banned| decode_unpadded(banned).is_some_and(|bytes| bytes == raw)) {
        return Some(Err(KeyRefusal::Banned));
    }
    if key.is_weak() {
        return Some(Err(KeyRefusal::Weak));
    }
    Some(Ok(PublicKey(key)))
}

/// Whether `signature` (unpadded base64) signs `message` with `key`, by
/// strict verification: the signature's S below the group order and its R
/// not of small order.
pub fn verifies(key: &PublicKey, signature: &str, message: &[u8]) -> bool {
    let Some(bytes) = decode_unpadded(signature) else { return false };
    let Ok(signature) = ed25519_dalek::Signature::from_slice(&bytes) else { return false };
    key.0.verify_strict(message, &signature).is_ok()
}

/// The bytes a signature of `object` covers; an object outside canonical
/// JSON's range (floats) has none.
pub fn signed_bytes(object: &Value) -> Result<Vec<u8>, canonical::NotCanonical> {
    match object {
        Value::Object(map) if map.contains_key("signatures") || map.contains_key("unsigned") => {
            let mut unsigned = map.clone();
            unsigned.remove("signatures");
            unsigned.remove("unsigned");
            canonical::encode(&Value::Object(unsigned))
        }
        other => canonical::encode(other),
    }
}

/// A server's current keys from its `/_matrix/key/v2/server` document (or
/// a notary's copy of it): `server_name` must be the server asked, and the
/// document must carry a signature by one of its own `verify_keys` that
/// verifies. `old_verify_keys` are left out: they sign events, not requests.
#[derive(Debug)]
pub struct ServerKeys {
    /// Each listed key, or why it is refused.
    pub keys: Vec<(String, Result<PublicKey, KeyRefusal>)>,
    pub valid_until_ts: u64,
}

pub fn verify_server_keys(document: &Value, server_name: &str) -> Result<ServerKeys, FederationError> {
    let named = document["server_name"].as_str().unwrap_or("");
    if named != server_name {
        return Err(bad_keys(format!("the keys are for {named:?}, not {server_name:?}")));
    }
    let listed = document["verify_keys"].as_object().ok_or_else(|| bad_keys("no verify_keys"))?;
    let mut keys = Vec::new();
    for (key_id, entry) in listed {
        if let Some(key) = key_id.starts_with("ed25519:").then(|| entry["key"].as_str().and_then(public_key)).flatten()
        {
            keys.push((key_id.clone(), key));
        }
    }
    let signatures = document["signatures"][server_name]
        .as_object()
        .ok_or_else(|| bad_keys("the document is not signed by the server"))?;
    let message =
        signed_bytes(document).map_err(|e| bad_keys(format!("the document is not canonical JSON ({})", e.reason())))?;
    let mut checked = false;
    for (key_id, signature) in signatures {
        // A refused key's signature proves nothing, whichever way it verifies.
        let Some((_, Ok(key))) = keys.iter().find(|(id, _)| id == key_id) else { continue };
        if !verifies(key, signature.as_str().unwrap_or(""), &message) {
            return Err(bad_keys(format!("the signature by {key_id} does not verify")));
        }
        checked = true;
    }
    if !checked {
        return Err(bad_keys("no signature by a listed key"));
    }
    let valid_until_ts = document["valid_until_ts"].as_u64().ok_or_else(|| bad_keys("no valid_until_ts"))?;
    Ok(ServerKeys { keys, valid_until_ts })
}

/// Synapse's signing key file: `ed25519 <version> <base64 seed>`.
pub fn read_signing_key(path: &std::path::Path) -> Result<(String, PKey<Private>), FederationError> {
    let text = std::fs::read_to_string(path).map_err(|e| bad_keys(format!("cannot read {}: {e}", path.display())))?;
    let mut parts = text.split_whitespace();
    let (Some("ed25519"), Some(version), Some(seed)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad_keys(format!("{} is not a Synapse signing key (ed25519 <version> <key>)", path.display())));
    };
    let seed = decode_unpadded(seed).ok_or_else(|| bad_keys(format!("{}: the key is not base64", path.display())))?;
    let key = PKey::private_key_from_raw_bytes(&seed, Id::ED25519)
        .map_err(|e| bad_keys(format!("{}: {e}", path.display())))?;
    Ok((format!("ed25519:{version}"), key))
}

/// Signs canonical bytes; unpadded base64.
pub fn sign(key: &PKey<Private>, message: &[u8]) -> Result<String, FederationError> {
    let mut signer = openssl::sign::Signer::new_without_digest(key).map_err(|e| bad_keys(e.to_string()))?;
    let signature = signer.sign_oneshot_to_vec(message).map_err(|e| bad_keys(e.to_string()))?;
    Ok(encode_unpadded(&signature))
}

/// An `Authorization: X-Matrix` header for a request from `origin` to
/// `destination` (`content`: the JSON body, if any).
pub fn x_matrix(
    origin: &str,
    destination: &str,
    method: &str,
    uri: &str,
    content: Option<&Value>,
    key_id: &str,
    key: &PKey<Private>,
) -> Result<String, FederationError> {
    let mut request = serde_json::json!({ "method": method, "uri": uri, "origin": origin, "destination": destination });
    if let Some(content) = content {
        request["content"] = content.clone();
    }
    let message = canonical::encode(&request).map_err(|e| bad_keys(format!("not canonical JSON ({})", e.reason())))?;
    Ok(format!(
        "X-Matrix origin=\"{origin}\",destination=\"{destination}\",key=\"{key_id}\",sig=\"{}\"",
        sign(key, &message)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key_document(name: &str, key: &PKey<Private>) -> Value {
        let public = key.raw_public_key().expect("raw key");
        let mut document = json!({
            "server_name": name,
            "valid_until_ts": 4_000_000_000_000u64,
            "verify_keys": { "ed25519:a_1": { "key": encode_unpadded(&public) } },
            "old_verify_keys": { "ed25519:old": { "key": encode_unpadded(&public), "expired_ts": 1 } },
        });
        let message = signed_bytes(&document).expect("canonical");
        document["signatures"] = json!({ name: { "ed25519:a_1": sign(key, &message).expect("signs") } });
        document
    }

    #[test]
    fn key_documents_verify_and_old_keys_are_left_out() {
        let key = PKey::generate_ed25519().expect("key");
        let document = key_document("example.org", &key);
        let keys = verify_server_keys(&document, "example.org").expect("verifies");
        assert_eq!(keys.keys.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["ed25519:a_1"]);
        assert_eq!(keys.valid_until_ts, 4_000_000_000_000);
        assert!(verify_server_keys(&document, "other.org").unwrap_err().to_string().contains("not \"other.org\""));
        let mut tampered = document.clone();
        tampered["valid_until_ts"] = json!(5_000_000_000_000u64);
        assert!(verify_server_keys(&tampered, "example.org").unwrap_err().to_string().contains("does not verify"));
        let mut unsigned = document;
        unsigned["signatures"] = json!({ "example.org": { "ed25519:unknown": "AAAA" } });
        assert!(verify_server_keys(&unsigned, "example.org").unwrap_err().to_string().contains("no signature"));
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len()).step_by(2).map(|at| u8::from_str_radix(&text[at..at + 2], 16).unwrap()).collect()
    }

    /// OpenSSL's own verdict, for the vectors below.
    fn openssl_verifies(public: &[u8], signature: &[u8], message: &[u8]) -> bool {
        let key = PKey::public_key_from_raw_bytes(public, Id::ED25519).unwrap();
        let mut verifier = openssl::sign::Verifier::new_without_digest(&key).unwrap();
        verifier.verify_oneshot(signature, message).unwrap_or(false)
    }

    #[test]
    fn rfc_8032_test_1_verifies() {
        let public = hex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
        let signature = hex(concat!(
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555",
            "fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        ));
        let key = public_key(&encode_unpadded(&public)).unwrap().unwrap();
        assert!(verifies(&key, &encode_unpadded(&signature), b""));
        assert!(!verifies(&key, &encode_unpadded(&signature), b"x"));
    }

    #[test]
    fn a_weak_key_is_refused_though_openssl_would_take_its_forgery() {
        // The identity point as a public key, and (R = identity, S = 0):
        // [S]B = R + [k]A holds for every message, so OpenSSL verifies
        // this "signature" of anything.
        let identity = hex("0100000000000000000000000000000000000000000000000000000000000000");
        let forgery = [identity.clone(), vec![0u8; 32]].concat();
        assert!(openssl_verifies(&identity, &forgery, b"any message at all"));
        assert_eq!(public_key(&encode_unpadded(&identity)), Some(Err(KeyRefusal::Weak)));
        // Another small-order point (order 4: y = 0) is just as weak.
        assert_eq!(public_key(&encode_unpadded(&[0u8; 32])), Some(Err(KeyRefusal::Weak)));
    }

    #[test]
    fn a_signature_with_a_non_canonical_s_is_refused() {
        let private = PKey::generate_ed25519().unwrap();
        let public = private.raw_public_key().unwrap();
        let signature = decode_unpadded(&sign(&private, b"message").unwrap()).unwrap();
        let key = public_key(&encode_unpadded(&public)).unwrap().unwrap();
        assert!(verifies(&key, &encode_unpadded(&signature), b"message"));
        // S + L (the group order), little-endian: the same point, a second encoding.
        let order = hex("edd3f55c1a631258d69cf7a2def9de1400000000000000000000000000000010");
        let mut malleated = signature.clone();
        let mut carry = 0u16;
        for at in 0..32 {
            let sum = u16::from(malleated[32 + at]) + u16::from(order[at]) + carry;
            malleated[32 + at] = sum as u8;
            carry = sum >> 8;
        }
        assert_eq!(carry, 0, "S + L fits in 32 bytes for any S below 2^252 + L");
        assert!(!verifies(&key, &encode_unpadded(&malleated), b"message"));
        assert!(!verifies(&key, "not base64 !", b"message"));
        assert!(!verifies(&key, &encode_unpadded(&signature[..63]), b"message"));
    }

    #[test]
    fn synapses_banned_key_is_refused_however_it_is_written() {
        let banned = BANNED_KEYS[0];
        assert_eq!(public_key(banned), Some(Err(KeyRefusal::Banned)));
        assert_eq!(public_key(banned.trim_end_matches('=')), Some(Err(KeyRefusal::Banned)));
    }

    #[test]
    fn a_key_document_signed_only_by_a_weak_key_proves_nothing() {
        let identity = encode_unpadded(&hex("0100000000000000000000000000000000000000000000000000000000000000"));
        let mut document = json!({
            "server_name": "evil.example",
            "valid_until_ts": 4_000_000_000_000u64,
            "verify_keys": { "ed25519:w": { "key": identity } },
        });
        let forgery = [hex("0100000000000000000000000000000000000000000000000000000000000000"), vec![0u8; 32]].concat();
        document["signatures"] = json!({ "evil.example": { "ed25519:w": encode_unpadded(&forgery) } });
        let refused = verify_server_keys(&document, "evil.example").unwrap_err();
        assert!(refused.to_string().contains("no signature by a listed key"), "{refused}");
    }

    #[test]
    fn base64_is_read_as_leniently_as_python_reads_it() {
        assert_eq!(decode_unpadded("YWI"), Some(b"ab".to_vec()));
        assert_eq!(decode_unpadded("YWI="), Some(b"ab".to_vec()));
        assert_eq!(decode_unpadded("-_8"), Some(vec![0xfb, 0xff]));
        assert_eq!(decode_unpadded("+/8"), Some(vec![0xfb, 0xff]));
        assert_eq!(decode_unpadded("!!"), None);
    }
}
