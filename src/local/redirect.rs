//! Redirects a site route answers itself (`redirect: { to: ..., status: 308 }`).

use crate::request::response::LocalResponse;
use bytes::Bytes;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub to: String,
    pub status: u16,
    /// Append the request's path and query to `to`.
    pub keep_path: bool,
}

use crate::config::values::InvalidValue;

impl Redirect {
    pub fn new(to: &str, status: u16, keep_path: bool) -> Result<Redirect, InvalidValue> {
        let invalid = |what, text: String, expected: &str| InvalidValue { what, text, expected: expected.into() };
        if !matches!(status, 301 | 302 | 303 | 307 | 308) {
            return Err(invalid("redirect status", status.to_string(), "expected 301, 302, 303, 307 or 308"));
        }
        if http::HeaderValue::from_str(to).is_err() {
            return Err(invalid("redirect", to.to_string(), "it cannot be sent as a Location header"));
        }
        Ok(Redirect { to: to.trim_end_matches('/').to_string(), status, keep_path })
    }

    /// The answer to a request for `target` (path and query, as received).
    pub fn respond(&self, target: &[u8]) -> LocalResponse {
        let location = if self.keep_path {
            // Not a header value unless every byte is visible ASCII, which the
            // request line already guarantees; keep the original bytes.
            format!("{}{}", self.to, String::from_utf8_lossy(target))
        } else if self.to.contains("://") && !self.to.split("://").nth(1).is_some_and(|r| r.contains('/')) {
            format!("{}/", self.to)
        } else {
            self.to.clone()
        };
        let body = Bytes::from(format!("Moved to {location}\n"));
        LocalResponse {
            status: self.status,
            headers: vec![("Content-Type", "text/plain; charset=utf-8".into()), ("Location", location)],
            body,
            close: false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn location(response: &LocalResponse) -> &str {
        response.headers.iter().find(|(n, _)| *n == "Location").map(|(_, v)| v.as_str()).unwrap()
    }

    #[test]
    fn keeps_or_drops_the_path() {
        let keep = Redirect::new("https://element.example.com/", 301, true).unwrap();
        let answer = keep.respond(b"/#/room/x?via=a");
        assert_eq!((answer.status, location(&answer)), (301, "https://element.example.com/#/room/x?via=a"));
        let drop = Redirect::new("https://element.example.com", 308, false).unwrap();
        assert_eq!(location(&drop.respond(b"/anything")), "https://element.example.com/");
        assert!(Redirect::new("https://x.example", 200, false).is_err());
    }
}
