//! Signed JSON as the spec's appendix defines it: ed25519 over the
//! canonical JSON of an object without `signatures` and `unsigned`, in
//! unpadded base64. Keys and signatures are OpenSSL's Ed25519 (already
//! linked for TLS), so no second crypto library comes in.

use crate::federation::canonical;
use crate::federation::{bad_keys, FederationError};
use openssl::pkey::{Id, PKey, Private, Public};
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

/// An ed25519 public key from its unpadded base64 form.
pub fn public_key(text: &str) -> Option<PKey<Public>> {
    let raw = decode_unpadded(text)?;
    PKey::public_key_from_raw_bytes(&raw, Id::ED25519).ok()
}

/// Whether `signature` (unpadded base64) signs `message` with `key`.
pub fn verifies(key: &PKey<Public>, signature: &str, message: &[u8]) -> bool {
    let Some(signature) = decode_unpadded(signature) else { return false };
    openssl::sign::Verifier::new_without_digest(key)
        .and_then(|mut verifier| verifier.verify_oneshot(&signature, message))
        .unwrap_or(false)
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
    pub keys: Vec<(String, PKey<Public>)>,
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
        let Some((_, key)) = keys.iter().find(|(id, _)| id == key_id) else { continue };
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

    #[test]
    fn base64_is_read_as_leniently_as_python_reads_it() {
        assert_eq!(decode_unpadded("YWI"), Some(b"ab".to_vec()));
        assert_eq!(decode_unpadded("YWI="), Some(b"ab".to_vec()));
        assert_eq!(decode_unpadded("-_8"), Some(vec![0xfb, 0xff]));
        assert_eq!(decode_unpadded("+/8"), Some(vec![0xfb, 0xff]));
        assert_eq!(decode_unpadded("!!"), None);
    }
}
