//! Which requests the media cache keeps, under which key, and which
//! answers it stores.
//!
//! Synapse (1.163, `synapse/media/_base.py`) answers media with
//! `Cache-Control: public,max-age=86400,s-maxage=0,proxy-revalidate` and a
//! bare `ETag: 1`, and compares `If-None-Match` byte for byte: a shared
//! cache may keep the bytes but must ask Synapse every time. So every hit
//! is revalidated with the requester's own credentials (a 304 is Synapse
//! saying this requester may have them), and only 200s that allow a
//! shared cache and carry a validator are stored.

/// The media download and thumbnail paths, by API.
const MEDIA_PATHS: [&str; 4] = [
    "/_matrix/client/v1/media/download/",
    "/_matrix/client/v1/media/thumbnail/",
    "/_matrix/media/v3/download/",
    "/_matrix/media/v3/thumbnail/",
];

/// The query parameters that change a thumbnail (`timeout_ms` and
/// `allow_redirect` do not change the bytes).
const THUMBNAIL_PARAMETERS: [&str; 4] = ["width", "height", "method", "animated"];

/// The cache key of a GET or HEAD of media: the path, and for a thumbnail
/// the parameters that change it, in one order; `None` for anything else.
pub fn key(method: &http::Method, path: &[u8], query: Option<&[u8]>) -> Option<String> {
    if method != http::Method::GET && method != http::Method::HEAD {
        return None;
    }
    let path = std::str::from_utf8(path).ok()?;
    let prefix = MEDIA_PATHS.iter().find(|prefix| path.starts_with(*prefix))?;
    let mut key = path.to_string();
    if prefix.ends_with("/thumbnail/") {
        let query = query.and_then(|q| std::str::from_utf8(q).ok()).unwrap_or_default();
        let mut kept: Vec<(&str, &str)> = query
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .filter(|(name, _)| THUMBNAIL_PARAMETERS.contains(name))
            .collect();
        kept.sort_unstable();
        kept.dedup_by(|a, b| a.0 == b.0);
        for (name, value) in kept {
            key.push_str(&format!("&{name}={value}"));
        }
    }
    Some(key)
}

/// Whether an answer may be stored: a 200 with a validator whose
/// `Cache-Control` allows a shared cache.
pub fn storable(response: &pingora::http::ResponseHeader) -> bool {
    let header = |name: http::header::HeaderName| response.headers.get(name).and_then(|v| v.to_str().ok());
    let control = header(http::header::CACHE_CONTROL).unwrap_or_default().to_ascii_lowercase();
    let directives: Vec<&str> = control.split(',').map(str::trim).collect();
    response.status == 200
        && header(http::header::ETAG).is_some()
        && directives.contains(&"public")
        && !directives.iter().any(|d| *d == "private" || *d == "no-store")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_keys_keep_what_changes_the_bytes() {
        let get = http::Method::GET;
        let key = |path: &str, query: Option<&str>| key(&get, path.as_bytes(), query.map(str::as_bytes));
        assert_eq!(
            key("/_matrix/client/v1/media/download/a.org/xyz", Some("allow_redirect=true")).unwrap(),
            "/_matrix/client/v1/media/download/a.org/xyz"
        );
        let thumb = "/_matrix/client/v1/media/thumbnail/a.org/xyz";
        assert_eq!(
            key(thumb, Some("width=64&timeout_ms=20000&height=32&method=crop")),
            key(thumb, Some("method=crop&height=32&width=64")),
        );
        assert_ne!(key(thumb, Some("width=64&height=32")), key(thumb, Some("width=96&height=32")));
        assert_eq!(key("/_matrix/media/v3/download/a.org/xyz", None).unwrap(), "/_matrix/media/v3/download/a.org/xyz");
        assert_eq!(key("/_matrix/client/v3/sync", None), None);
        assert_eq!(super::key(&http::Method::PUT, b"/_matrix/client/v1/media/download/a/b", None), None);
    }

    #[test]
    fn only_public_answers_with_a_validator_are_stored() {
        let answer = |status: u16, headers: &[(&str, &str)]| {
            let mut response = pingora::http::ResponseHeader::build(status, None).unwrap();
            for (name, value) in headers {
                response.insert_header(name.to_string(), *value).unwrap();
            }
            response
        };
        let synapse = [("Cache-Control", "public,max-age=86400,s-maxage=0,proxy-revalidate"), ("ETag", "1")];
        assert!(storable(&answer(200, &synapse)));
        assert!(!storable(&answer(404, &synapse)));
        assert!(!storable(&answer(200, &synapse[..1])), "no validator");
        assert!(!storable(&answer(200, &[("Cache-Control", "private"), ("ETag", "1")])));
        assert!(!storable(&answer(200, &[("Cache-Control", "public, no-store"), ("ETag", "1")])));
    }
}
