//! The gate's decision for one federation request, as Synapse's
//! `Authenticator.authenticate_request` makes it: the object
//! `{method, uri, origin, destination, content}` (the raw target as
//! received, our own server name, the parsed body of a PUT or POST),
//! signed by the origin with one of its current keys; a header
//! `destination` naming another server is refused. Every `X-Matrix`
//! header counts, and every signature by a key the origin lists must
//! verify; at least one must.

use crate::federation::canonical::NotCanonical;
use crate::federation::header::{self, HeaderError, XMatrix};
use crate::federation::keys::{KeyCache, KeyError, KeyFetcher};
use crate::federation::signing;
use serde_json::Value;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// Nothing is checked.
    Off,
    /// Checked, logged and counted; everything is forwarded.
    #[default]
    Observe,
    /// A request that fails is answered 401 before Synapse sees it.
    Enforce,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Observe => "observe",
            Mode::Enforce => "enforce",
        }
    }
}

/// Why a request was refused (the metric's `reason` label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No `X-Matrix` header at all.
    Unsigned,
    BadHeader(HeaderError),
    /// The header names another server as its destination.
    Misdirected {
        origin: String,
        destination: String,
    },
    /// `X-Matrix` headers naming different origins.
    MixedOrigins,
    NoKey(KeyError),
    BadSignature,
    /// A PUT or POST whose body is not JSON (Synapse answers 400 too).
    NotJson,
    /// The verified origin is on `federation.deny` (or off `federation.allow`).
    Denied(String),
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::BadHeader(_) => "bad_header",
            Refusal::Misdirected { .. } => "misdirected",
            Refusal::MixedOrigins => "bad_header",
            Refusal::NoKey(KeyError::Unavailable(_)) => "key_unavailable",
            Refusal::NoKey(KeyError::Unknown) => "unknown_key",
            Refusal::NoKey(KeyError::Refused(refusal)) => refusal.reason(),
            Refusal::BadSignature => "bad_signature",
            Refusal::NotJson => "not_json",
            Refusal::Denied(_) => "denied",
        }
    }

    /// Every reason, so the metric shows each at 0 from the start.
    pub const REASONS: [&'static str; 10] = [
        "unsigned",
        "bad_header",
        "misdirected",
        "key_unavailable",
        "unknown_key",
        "weak_key",
        "banned_key",
        "bad_signature",
        "not_json",
        "denied",
    ];
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Unsigned => f.write_str("Missing Authorization headers"),
            Refusal::BadHeader(error) => write!(f, "{error}"),
            Refusal::Misdirected { destination, .. } => {
                write!(f, "Destination mismatch in auth header: {destination:?}")
            }
            Refusal::MixedOrigins => f.write_str("X-Matrix headers name different origins"),
            Refusal::NoKey(error) => write!(f, "{error}"),
            Refusal::BadSignature => f.write_str("Invalid signature"),
            Refusal::NotJson => f.write_str("Content not JSON"),
            Refusal::Denied(origin) => write!(f, "Federation denied with {origin}"),
        }
    }
}

/// What the gate made of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Verified(String),
    /// Passed on unchecked: the body is valid JSON a strict encoder cannot
    /// reproduce as Python would (floats, integers beyond 2^53, lone
    /// surrogates), or, observing, the origin's keys are being fetched.
    /// Synapse checks it itself.
    Unverifiable {
        origin: String,
        reason: &'static str,
    },
    /// With the origin the request claimed, when its header named one.
    Refused {
        origin: Option<String>,
        refusal: Refusal,
    },
}

fn refused(origin: &str, refusal: Refusal) -> Verdict {
    Verdict::Refused { origin: Some(origin.to_string()), refusal }
}

/// Endpoints under `/_matrix/federation/` that carry no signature.
const UNSIGNED_ENDPOINTS: [&[u8]; 2] = [b"/_matrix/federation/v1/version", b"/_matrix/federation/v1/openid/userinfo"];

/// Whether a request for `path` (no query) must be signed.
pub fn is_signed_endpoint(path: &[u8]) -> bool {
    path.starts_with(b"/_matrix/federation/") && !UNSIGNED_ENDPOINTS.contains(&path)
}

/// Names and `*.suffix` globs of server names, compared without case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerList {
    exact: Vec<String>,
    suffixes: Vec<String>,
}

impl ServerList {
    pub fn new(patterns: &[String]) -> Result<ServerList, super::FederationError> {
        let mut list = ServerList::default();
        for pattern in patterns {
            let lower = pattern.trim().to_ascii_lowercase();
            if lower == "*" {
                list.suffixes.push(String::new());
            } else if let Some(suffix) = lower.strip_prefix("*.") {
                if !header::is_server_name(suffix) {
                    return Err(super::bad_config(format!("{pattern:?} is not a server name or *.name glob")));
                }
                list.suffixes.push(format!(".{suffix}"));
            } else if header::is_server_name(&lower) {
                list.exact.push(lower);
            } else {
                return Err(super::bad_config(format!("{pattern:?} is not a server name or *.name glob")));
            }
        }
        Ok(list)
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.suffixes.is_empty()
    }

    pub fn contains(&self, server_name: &str) -> bool {
        let name = server_name.to_ascii_lowercase();
        let host = header_host(&name);
        self.exact.iter().any(|exact| *exact == name || exact == host)
            || self.suffixes.iter().any(|suffix| suffix.is_empty() || host.ends_with(suffix.as_str()))
    }
}

/// The host part of a server name (a port does not make another server).
fn header_host(name: &str) -> &str {
    match name.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(']') => {
            host
        }
        _ => name,
    }
}

/// The gate as the running configuration has it.
pub struct Gate {
    pub mode: Mode,
    pub server_name: String,
    pub fetcher: Arc<KeyFetcher>,
    pub deny: ServerList,
    pub allow: Option<ServerList>,
}

/// The signatures a request carries, read from its `Authorization` headers.
#[derive(Debug, PartialEq, Eq)]
pub struct Claims {
    pub origin: String,
    /// Key id and signature, as given.
    pub signatures: Vec<(String, String)>,
}

/// Reads every `Authorization` header; other schemes are ignored as Synapse ignores them.
pub fn claims<'a>(authorizations: impl Iterator<Item = &'a [u8]>, server_name: &str) -> Result<Claims, Refusal> {
    let mut found: Option<Claims> = None;
    for value in authorizations {
        let XMatrix { origin, destination, key, sig } = match header::parse(value) {
            Ok(parsed) => parsed,
            Err(HeaderError::OtherScheme) => continue,
            Err(error) => return Err(Refusal::BadHeader(error)),
        };
        if let Some(destination) = destination {
            if !destination.eq_ignore_ascii_case(server_name) {
                return Err(Refusal::Misdirected { origin, destination });
            }
        }
        match &mut found {
            Some(claims) if claims.origin != origin => return Err(Refusal::MixedOrigins),
            Some(claims) => claims.signatures.push((key, sig)),
            None => found = Some(Claims { origin, signatures: vec![(key, sig)] }),
        }
    }
    found.ok_or(Refusal::Unsigned)
}

/// The body as Synapse reads it: parsed for PUT and POST, absent otherwise.
pub fn content(method: &str, body: &[u8]) -> Result<Option<Value>, Result<&'static str, Refusal>> {
    if method != "PUT" && method != "POST" {
        return Ok(None);
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => Ok(Some(value)),
        // Python reads a lone surrogate escape; serde_json does not.
        Err(error) if lone_surrogate(&error.to_string()) => Err(Ok("lone_surrogate")),
        Err(_) => Err(Err(Refusal::NotJson)),
    }
}

fn lone_surrogate(error: &str) -> bool {
    ["surrogate", "hex escape", "unicode code point"].iter().any(|phrase| error.contains(phrase))
}

/// The bytes the origin signed.
pub fn signed_message(
    method: &str,
    uri: &str,
    origin: &str,
    destination: &str,
    content: Option<Value>,
) -> Result<Vec<u8>, NotCanonical> {
    let mut object = serde_json::Map::new();
    object.insert("method".into(), Value::String(method.into()));
    object.insert("uri".into(), Value::String(uri.into()));
    object.insert("origin".into(), Value::String(origin.into()));
    object.insert("destination".into(), Value::String(destination.into()));
    if let Some(content) = content {
        object.insert("content".into(), content);
    }
    crate::federation::canonical::encode(&Value::Object(object))
}

impl Gate {
    /// The verdict on a signed endpoint's request (`uri` the raw target as
    /// received, `body` all of it).
    pub async fn judge<'a>(
        &self,
        cache: &Arc<KeyCache>,
        method: &str,
        uri: &[u8],
        authorizations: impl Iterator<Item = &'a [u8]>,
        body: &[u8],
    ) -> Verdict {
        let claims = match claims(authorizations, &self.server_name) {
            Ok(claims) => claims,
            Err(refusal) => {
                // Only a misdirected header names one origin to show for it.
                let origin = match &refusal {
                    Refusal::Misdirected { origin, .. } => Some(origin.clone()),
                    _ => None,
                };
                return Verdict::Refused { origin, refusal };
            }
        };
        // Synapse decodes the target as ASCII; anything else cannot verify there either.
        let Some(uri) = std::str::from_utf8(uri).ok().filter(|uri| uri.is_ascii()) else {
            return refused(&claims.origin, Refusal::BadSignature);
        };
        let content = match content(method, body) {
            Ok(content) => content,
            Err(Ok(reason)) => return Verdict::Unverifiable { origin: claims.origin, reason },
            Err(Err(refusal)) => return refused(&claims.origin, refusal),
        };
        let message = match signed_message(method, uri, &claims.origin, &self.server_name, content) {
            Ok(message) => message,
            Err(not_canonical) => {
                return Verdict::Unverifiable { origin: claims.origin, reason: not_canonical.reason() }
            }
        };
        let mut verified = false;
        let mut missing = None;
        for (key_id, signature) in &claims.signatures {
            // Observing must not slow federation down: a key not at hand is
            // fetched beside the request, which goes on unverified.
            let key = match self.mode {
                Mode::Enforce => cache.key(&claims.origin, key_id, &self.fetcher).await,
                _ => match cache.cached(&claims.origin, key_id) {
                    Some(answer) => answer,
                    None => {
                        cache.prefetch(&claims.origin, key_id, &self.fetcher);
                        return Verdict::Unverifiable { origin: claims.origin, reason: "keys_pending" };
                    }
                },
            };
            match key {
                Ok(key) if signing::verifies(&key, signature, &message) => verified = true,
                Ok(_) => return refused(&claims.origin, Refusal::BadSignature),
                Err(error) => missing = Some(error),
            }
        }
        if !verified {
            return refused(&claims.origin, Refusal::NoKey(missing.unwrap_or(KeyError::Unknown)));
        }
        let denied = self.deny.contains(&claims.origin)
            || self.allow.as_ref().is_some_and(|allow| !allow.contains(&claims.origin));
        if denied {
            return refused(&claims.origin, Refusal::Denied(claims.origin.clone()));
        }
        Verdict::Verified(claims.origin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_version_and_userinfo_go_unsigned() {
        assert!(!is_signed_endpoint(b"/_matrix/federation/v1/version"));
        assert!(!is_signed_endpoint(b"/_matrix/federation/v1/openid/userinfo"));
        for signed in [
            "/_matrix/federation/v1/send/1",
            "/_matrix/federation/v1/media/download/x",
            "/_matrix/federation/v1/version/",
            "/_matrix/federation/v1/%76ersion",
            "/_matrix/federation/v2/invite/!r/$e",
        ] {
            assert!(is_signed_endpoint(signed.as_bytes()), "{signed}");
        }
        assert!(!is_signed_endpoint(b"/_matrix/key/v2/server"));
    }

    #[test]
    fn claims_gather_every_x_matrix_header_and_check_the_destination() {
        let headers: [&[u8]; 3] = [
            b"Bearer token",
            b"X-Matrix origin=a.example,destination=me.example,key=ed25519:1,sig=AAA",
            b"X-Matrix origin=a.example,key=ed25519:2,sig=BBB",
        ];
        let claims = claims(headers.into_iter(), "me.example").expect("claims");
        assert_eq!(claims.origin, "a.example");
        assert_eq!(claims.signatures, [("ed25519:1".into(), "AAA".into()), ("ed25519:2".into(), "BBB".into())]);
        let elsewhere: [&[u8]; 1] = [b"X-Matrix origin=a.example,destination=other.example,key=k,sig=s"];
        assert_eq!(
            super::claims(elsewhere.into_iter(), "me.example"),
            Err(Refusal::Misdirected { origin: "a.example".into(), destination: "other.example".into() })
        );
        let mixed: [&[u8]; 2] = [b"X-Matrix origin=a.example,key=k,sig=s", b"X-Matrix origin=b.example,key=k,sig=s"];
        assert_eq!(super::claims(mixed.into_iter(), "me.example"), Err(Refusal::MixedOrigins));
        let none: [&[u8]; 1] = [b"Bearer x"];
        assert_eq!(super::claims(none.into_iter(), "me.example"), Err(Refusal::Unsigned));
    }

    #[test]
    fn bodies_are_read_as_synapse_reads_them() {
        assert_eq!(content("GET", b"junk"), Ok(None));
        assert_eq!(content("PUT", br#"{"a":1}"#), Ok(Some(serde_json::json!({"a": 1}))));
        assert_eq!(content("POST", b""), Err(Err(Refusal::NotJson)));
        assert_eq!(content("PUT", b"{\"a\":"), Err(Err(Refusal::NotJson)));
        assert_eq!(content("PUT", br#"{"a":"\ud800"}"#), Err(Ok("lone_surrogate")));
        assert_eq!(content("PUT", br#"{"a":"\udc00x"}"#), Err(Ok("lone_surrogate")));
    }

    #[test]
    fn server_lists_match_names_and_globs_without_case_or_port() {
        let list = ServerList::new(&["Evil.example".into(), "*.spam.example".into()]).expect("list");
        for listed in ["evil.example", "EVIL.example:8448", "a.spam.example", "b.a.spam.example:443"] {
            assert!(list.contains(listed), "{listed}");
        }
        for other in ["notevil.example", "spam.example", "evil.example.org"] {
            assert!(!list.contains(other), "{other}");
        }
        assert!(ServerList::new(&["*".into()]).expect("all").contains("anything.example"));
        assert!(ServerList::new(&["bad name".into()]).unwrap_err().to_string().contains("\"bad name\""));
    }
}
