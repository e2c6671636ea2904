//! What the plain-HTTP listener (port 80) answers itself: ACME HTTP-01
//! challenges (`acme`) and a redirect of everything else to https
//! (`redirect`).

use crate::request::response::LocalResponse;
use bytes::Bytes;

pub const ACME_CHALLENGE_PREFIX: &[u8] = b"/.well-known/acme-challenge/";

/// The key authorization for a token the edge has offered, else 404.
pub fn challenge(answer: Option<String>) -> LocalResponse {
    match answer {
        Some(key_authorization) => LocalResponse {
            status: 200,
            headers: vec![("Content-Type", "application/octet-stream".into()), ("Cache-Control", "no-store".into())],
            body: Bytes::from(key_authorization),
            close: false,
        },
        None => LocalResponse {
            status: 404,
            headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
            body: Bytes::from_static(b"No such ACME challenge\n"),
            close: false,
        },
    }
}

/// 308 to the same host and target over https (308 keeps the method and
/// body, unlike 301). `https_port` is left out of the URL when it is 443.
/// A Host that is not a plain name or address gets a 400 rather than being
/// echoed into a Location header.
pub fn to_https(host: Option<&[u8]>, https_port: Option<u16>, target: &[u8]) -> LocalResponse {
    let Some(name) = host.and_then(host_name) else {
        return LocalResponse {
            status: 400,
            headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
            body: Bytes::from_static(b"A Host header naming this server is required\n"),
            close: true,
        };
    };
    let port = match https_port {
        Some(443) | None => String::new(),
        Some(port) => format!(":{port}"),
    };
    let location = format!("https://{name}{port}{}", String::from_utf8_lossy(target));
    LocalResponse {
        status: 308,
        headers: vec![("Content-Type", "text/plain; charset=utf-8".into()), ("Location", location.clone())],
        body: Bytes::from(format!("Moved to {location}\n")),
        close: false,
    }
}

/// The host part of a Host header, lowercase, without its port.
fn host_name(host: &[u8]) -> Option<String> {
    let host = std::str::from_utf8(host).ok()?.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        let (inside, _) = rest.split_once(']')?;
        inside.parse::<std::net::Ipv6Addr>().ok()?;
        return Some(format!("[{}]", inside.to_ascii_lowercase()));
    } else {
        host.rsplit_once(':')
            .map_or(host, |(name, port)| if port.bytes().all(|b| b.is_ascii_digit()) { name } else { "" })
    };
    let name = name.trim_end_matches('.');
    let plain = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    plain.then(|| name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn location(response: &LocalResponse) -> Option<&str> {
        response.headers.iter().find(|(n, _)| *n == "Location").map(|(_, v)| v.as_str())
    }

    #[test]
    fn redirects_keep_host_and_target_and_drop_the_plain_port() {
        let answer = to_https(Some(b"Matrix.Example.org:80"), Some(443), b"/_matrix/client/versions?x=1");
        assert_eq!(answer.status, 308);
        assert_eq!(location(&answer), Some("https://matrix.example.org/_matrix/client/versions?x=1"));
        let dev = to_https(Some(b"localhost:8080"), Some(8443), b"/");
        assert_eq!(location(&dev), Some("https://localhost:8443/"));
        let v6 = to_https(Some(b"[::1]:8080"), Some(443), b"/a");
        assert_eq!(location(&v6), Some("https://[::1]/a"));
    }

    #[test]
    fn odd_hosts_are_refused_not_echoed() {
        for host in [&b"evil.example/x"[..], b"a b", b"", b"x.example:80:80", b"[zz]", b"a@b"] {
            let answer = to_https(Some(host), Some(443), b"/");
            assert_eq!(answer.status, 400, "{:?}", String::from_utf8_lossy(host));
            assert_eq!(location(&answer), None);
        }
        assert_eq!(to_https(None, Some(443), b"/").status, 400);
    }

    #[test]
    fn challenges_answer_what_was_offered() {
        let found = challenge(Some("tok.thumb".into()));
        assert_eq!((found.status, &found.body[..]), (200, &b"tok.thumb"[..]));
        assert_eq!(challenge(None).status, 404);
    }
}
