//! Which answers the edge compresses for the client: Synapse leaves
//! compression to the proxy (`compress` is off on its listeners), so an
//! initial `/sync` of several megabytes would otherwise cross a phone's
//! network as it is. Pingora's response compression does the encoding,
//! streamed (a long answer is never held whole), with the `Vary` header;
//! these rules decide where it may.

use pingora::http::ResponseHeader;

/// The levels per coding (0 turns one off) and the smallest answer worth it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    pub gzip: u32,
    pub brotli: u32,
    pub zstd: u32,
    pub min_length: u64,
}

/// Whether answers on this path may be compressed at all: never media
/// (already compressed, and byte ranges must stay the file's), and never
/// the answers that carry credentials (an access or refresh token beside
/// what the client sent: the BREACH rule).
pub fn path_allows(path: &[u8]) -> bool {
    const MEDIA: [&[u8]; 3] = [b"/_matrix/media/", b"/_matrix/client/v1/media/", b"/_matrix/federation/v1/media/"];
    const CREDENTIALS: [&[u8]; 4] = [b"/login", b"/register", b"/refresh", b"/openid/request_token"];
    if MEDIA.iter().any(|prefix| path.starts_with(prefix)) {
        return false;
    }
    let Some(client) = path.strip_prefix(b"/_matrix/client/") else { return true };
    // `/_matrix/client/v3/login`, `/r0/register/available` stays allowed
    // only where no token comes back: registration answers carry one.
    !CREDENTIALS.iter().any(|endpoint| contains(client, endpoint))
        && !client.starts_with(b"unstable/org.matrix.msc2965/")
}

/// Whether this answer is worth compressing: JSON, not encoded already,
/// and not known to be shorter than `min_length`.
pub fn answer_allows(response: &ResponseHeader, min_length: u64) -> bool {
    let headers = &response.headers;
    if headers.contains_key(http::header::CONTENT_ENCODING) {
        return false;
    }
    let json = headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().get(..16).is_some_and(|t| t.eq_ignore_ascii_case(b"application/json")));
    let long_enough = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| std::str::from_utf8(value.as_bytes()).ok()?.trim().parse::<u64>().ok())
        .is_none_or(|length| length >= min_length);
    json && long_enough
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_and_credentials_are_never_compressed() {
        for path in [
            "/_matrix/media/v3/download/a/b",
            "/_matrix/client/v1/media/thumbnail/a/b",
            "/_matrix/federation/v1/media/download/x",
            "/_matrix/client/v3/login",
            "/_matrix/client/r0/register",
            "/_matrix/client/v3/refresh",
            "/_matrix/client/v3/user/@a:b/openid/request_token",
        ] {
            assert!(!path_allows(path.as_bytes()), "{path}");
        }
        for path in
            ["/_matrix/client/v3/sync", "/_matrix/client/v3/rooms/!r:x/messages", "/_matrix/federation/v1/send/1"]
        {
            assert!(path_allows(path.as_bytes()), "{path}");
        }
    }

    fn answer(headers: &[(&str, &str)]) -> ResponseHeader {
        let mut response = ResponseHeader::build(200, None).unwrap();
        for (name, value) in headers {
            response.insert_header(name.to_string(), *value).unwrap();
        }
        response
    }

    #[test]
    fn only_json_long_enough_and_not_encoded_already() {
        assert!(answer_allows(&answer(&[("Content-Type", "application/json"), ("Content-Length", "5000")]), 1024));
        assert!(answer_allows(&answer(&[("Content-Type", "application/json; charset=utf-8")]), 1024), "streamed");
        assert!(!answer_allows(&answer(&[("Content-Type", "application/json"), ("Content-Length", "90")]), 1024));
        assert!(!answer_allows(&answer(&[("Content-Type", "image/png")]), 1024));
        let encoded = answer(&[("Content-Type", "application/json"), ("Content-Encoding", "gzip")]);
        assert!(!answer_allows(&encoded, 1024));
    }
}
