//! Sticky keys: what a request is hashed on so that one user's syncs, one
//! room's events and one server's transactions keep reaching one worker.
//! Every function borrows from the request and allocates nothing.

use crate::synapse::table::Sticky;

/// The facts a key may come from.
pub struct KeySource<'a> {
    pub target: &'a [u8],
    pub authorization: Option<&'a [u8]>,
    pub client_ip: Option<std::net::IpAddr>,
}

/// The bytes to hash, or `None` for "any worker".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key<'a> {
    Bytes(&'a [u8]),
    Ip([u8; 16]),
}

impl Key<'_> {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Bytes(bytes) => bytes,
            Key::Ip(octets) => octets,
        }
    }
}

pub fn key<'a>(sticky: Sticky, source: &KeySource<'a>) -> Option<Key<'a>> {
    match sticky {
        Sticky::None => None,
        Sticky::User => user(source).map(Key::Bytes),
        Sticky::Room => room(source.target).map(Key::Bytes),
        Sticky::Origin => origin(source.authorization)
            .map(Key::Bytes)
            .or_else(|| source.client_ip.map(|ip| Key::Ip(ip.to_canonical().into_ipv6_octets()))),
    }
}

trait IntoIpv6Octets {
    fn into_ipv6_octets(self) -> [u8; 16];
}

impl IntoIpv6Octets for std::net::IpAddr {
    fn into_ipv6_octets(self) -> [u8; 16] {
        match self {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(v6) => v6.octets(),
        }
    }
}

/// The access token from `Authorization: Bearer`, else `access_token=`.
pub fn access_token<'a>(source: &KeySource<'a>) -> Option<&'a [u8]> {
    if let Some(value) = source.authorization {
        let value = trim(value);
        if value.len() > 7 && value[..7].eq_ignore_ascii_case(b"bearer ") {
            return Some(trim(&value[7..]));
        }
    }
    query_param(source.target, b"access_token")
}

/// The user behind a token: for Synapse's `syt_<localpart>_<random>_<crc>`
/// tokens the localpart, so all of one user's devices share a worker; any
/// other token shape is hashed whole.
pub fn user<'a>(source: &KeySource<'a>) -> Option<&'a [u8]> {
    let token = access_token(source).filter(|t| !t.is_empty())?;
    if let Some(rest) = token.strip_prefix(b"syt_") {
        if let Some(end) = rest.iter().position(|&b| b == b'_') {
            if end > 0 {
                return Some(&rest[..end]);
            }
        }
    }
    Some(token)
}

/// The room ID segment (as received, percent-encoded or not) after
/// `/rooms/`, `/join/` or `/knock/`.
pub fn room(target: &[u8]) -> Option<&[u8]> {
    let path = match target.iter().position(|&b| b == b'?') {
        Some(at) => &target[..at],
        None => target,
    };
    for marker in [&b"/rooms/"[..], b"/join/", b"/knock/"] {
        if let Some(at) = find(path, marker) {
            let rest = &path[at + marker.len()..];
            let end = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
            if end > 0 {
                return Some(&rest[..end]);
            }
        }
    }
    None
}

/// `origin` from `Authorization: X-Matrix origin="a.example",key=...`.
pub fn origin(authorization: Option<&[u8]>) -> Option<&[u8]> {
    let value = trim(authorization?);
    if value.len() < 9 || !value[..9].eq_ignore_ascii_case(b"x-matrix ") {
        return None;
    }
    for param in value[9..].split(|&b| b == b',') {
        let param = trim(param);
        let Some(eq) = param.iter().position(|&b| b == b'=') else { continue };
        if trim(&param[..eq]).eq_ignore_ascii_case(b"origin") {
            let raw = trim(&param[eq + 1..]);
            let unquoted = raw.strip_prefix(b"\"").and_then(|r| r.strip_suffix(b"\"")).unwrap_or(raw);
            return (!unquoted.is_empty()).then_some(unquoted);
        }
    }
    None
}

fn query_param<'a>(target: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let query = &target[target.iter().position(|&b| b == b'?')? + 1..];
    query.split(|&b| b == b'&').find_map(|pair| {
        let eq = pair.iter().position(|&b| b == b'=')?;
        (&pair[..eq] == name).then_some(&pair[eq + 1..])
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &bytes[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source<'a>(target: &'a [u8], authorization: Option<&'a [u8]>) -> KeySource<'a> {
        KeySource { target, authorization, client_ip: Some("10.0.0.7".parse().unwrap()) }
    }

    #[test]
    fn user_key_is_the_localpart_of_synapse_tokens() {
        let s = source(b"/_matrix/client/v3/sync", Some(b"Bearer syt_YWxpY2U_abcdef_0123"));
        assert_eq!(user(&s), Some(&b"YWxpY2U"[..]));
        let q = source(b"/_matrix/client/v3/sync?since=x&access_token=syt_Ym9i_zz_9", None);
        assert_eq!(user(&q), Some(&b"Ym9i"[..]));
        let other = source(b"/_matrix/client/v3/sync", Some(b"bearer mat_opaque_token"));
        assert_eq!(user(&other), Some(&b"mat_opaque_token"[..]));
        assert_eq!(user(&source(b"/_matrix/client/v3/sync", None)), None);
        assert_eq!(user(&source(b"/x?access_token=", None)), None);
    }

    #[test]
    fn room_key_is_the_raw_segment() {
        assert_eq!(
            room(b"/_matrix/client/v3/rooms/%21abc%3Aexample.com/send/m.room.message/1"),
            Some(&b"%21abc%3Aexample.com"[..])
        );
        assert_eq!(room(b"/_matrix/client/v3/rooms/!abc:example.com/messages?dir=b"), Some(&b"!abc:example.com"[..]));
        assert_eq!(room(b"/_matrix/client/v3/join/%23alias%3Aexample.com"), Some(&b"%23alias%3Aexample.com"[..]));
        assert_eq!(room(b"/_matrix/client/v3/knock/!r:b?server_name=b"), Some(&b"!r:b"[..]));
        assert_eq!(room(b"/_matrix/client/v3/createRoom"), None);
    }

    #[test]
    fn origin_comes_from_x_matrix_else_client_ip() {
        let header = br#"X-Matrix origin="remote.example",destination="example.com",key="ed25519:a",sig="x""#;
        assert_eq!(origin(Some(header)), Some(&b"remote.example"[..]));
        assert_eq!(origin(Some(b"X-Matrix key=\"k\", origin=other.example,sig=\"s\"")), Some(&b"other.example"[..]));
        assert_eq!(origin(Some(b"Bearer x")), None);
        let s = source(b"/_matrix/federation/v1/send/1", None);
        assert!(matches!(key(Sticky::Origin, &s), Some(Key::Ip(_))));
    }
}
