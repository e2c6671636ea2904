//! HTTP/1 message framing the edge refuses even where a lenient parser
//! (Pingora's included) would accept it, because another parser behind or in
//! front of it might frame the same bytes differently (request smuggling).
//!
//! The rule is RFC 9112's strict reading: a request line of exactly method,
//! target and version separated by single spaces, the target visible ASCII
//! only (checked on the bytes as received by the connection wrapper, since
//! Pingora's parser re-encodes a space and would forward a target the client
//! never sent); one `Content-Length` of plain digits, or one
//! `Transfer-Encoding: chunked`, never both; `chunked` only on HTTP/1.1;
//! exactly one `Host` on HTTP/1.1; CRLF line endings only. Every refusal is
//! a 400 and closes the connection.

use http::{HeaderMap, Version};

/// Why a request head is refused, for the error message.
pub fn check(version: Version, headers: &HeaderMap, raw_head: Option<&[u8]>) -> Result<(), &'static str> {
    if version == Version::HTTP_2 {
        // The h2 library enforces h2 framing; connection-specific headers are refused there.
        return Ok(());
    }
    let mut lengths = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let length = lengths.next();
    if lengths.next().is_some() {
        return Err("More than one Content-Length header");
    }
    if let Some(length) = length {
        let digits = length.as_bytes();
        if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
            return Err("Content-Length must be a single decimal number");
        }
    }
    let mut encodings = headers.get_all(http::header::TRANSFER_ENCODING).iter();
    if let Some(encoding) = encodings.next() {
        if encodings.next().is_some() || !encoding.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return Err("Transfer-Encoding must be exactly 'chunked'");
        }
        if version != Version::HTTP_11 {
            return Err("Transfer-Encoding is not defined before HTTP/1.1");
        }
        // Pingora drops Content-Length beside chunked while parsing, so the
        // received bytes are what tells.
        if length.is_some() || raw_head.is_some_and(|head| has_field(head, b"content-length")) {
            return Err("Content-Length and Transfer-Encoding together");
        }
    }
    if version == Version::HTTP_11 && headers.get_all(http::header::HOST).iter().count() != 1 {
        return Err("HTTP/1.1 requests need exactly one Host header");
    }
    if raw_head.is_some_and(has_bare_lf) {
        return Err("Header lines must end with CRLF");
    }
    Ok(())
}

/// `method SP request-target SP HTTP-version` and nothing else (RFC 9112 §3),
/// checked a byte at a time as the line arrives, so checking it needs no
/// copy of it. `feed` returns the verdict once the line's LF is in.
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestLineCheck {
    part: LinePart,
    /// Bytes of the current part so far.
    len: usize,
    version: [u8; 8],
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum LinePart {
    #[default]
    Method,
    Target,
    Version,
    Done,
}

const SEPARATORS: &str = "The request line must be a method, a target and a version, separated by single spaces";

impl RequestLineCheck {
    /// Feeds bytes of the line; `Some` once it is decided (at its LF, or at
    /// the first byte that cannot belong to a valid line).
    pub fn feed(&mut self, bytes: &[u8]) -> Option<Result<(), &'static str>> {
        for &byte in bytes {
            if let Some(verdict) = self.step(byte) {
                self.part = LinePart::Done;
                return Some(verdict);
            }
        }
        None
    }

    fn step(&mut self, byte: u8) -> Option<Result<(), &'static str>> {
        match (self.part, byte) {
            (LinePart::Done, _) => None,
            (LinePart::Method | LinePart::Target, b' ') if self.len == 0 => Some(Err(SEPARATORS)),
            (LinePart::Method, b' ') => self.next(LinePart::Target),
            (LinePart::Method, _) if byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte) => self.grow(),
            (LinePart::Method, b'\r' | b'\n') => Some(Err(SEPARATORS)),
            (LinePart::Method, _) => Some(Err("The request method is not a token")),
            (LinePart::Target, b' ') => self.next(LinePart::Version),
            (LinePart::Target, b'\r' | b'\n') => Some(Err(SEPARATORS)),
            (LinePart::Target, 0x21..=0x7e) => self.grow(),
            (LinePart::Target, _) => Some(Err("The request target holds spaces or control bytes")),
            (LinePart::Version, b' ') => Some(Err(SEPARATORS)),
            (LinePart::Version, b'\r') => None,
            (LinePart::Version, b'\n') => {
                let version = &self.version[..self.len.min(8)];
                let known = self.len == 8 && matches!(version, b"HTTP/1.1" | b"HTTP/1.0");
                Some(if known { Ok(()) } else { Err("The request line does not end in HTTP/1.1 or HTTP/1.0") })
            }
            (LinePart::Version, _) => {
                if let Some(slot) = self.version.get_mut(self.len) {
                    *slot = byte;
                }
                self.grow()
            }
        }
    }

    fn grow(&mut self) -> Option<Result<(), &'static str>> {
        self.len += 1;
        None
    }

    fn next(&mut self, part: LinePart) -> Option<Result<(), &'static str>> {
        self.part = part;
        self.len = 0;
        None
    }
}

/// A whole request line (with or without its line end).
pub fn check_request_line(line: &[u8]) -> Result<(), &'static str> {
    let mut check = RequestLineCheck::default();
    check.feed(line).or_else(|| check.feed(b"\n")).unwrap_or(Err(SEPARATORS))
}

/// Whether a raw head has a header field `name` (lowercase).
fn has_field(head: &[u8], name: &[u8]) -> bool {
    head.split(|&b| b == b'\n').skip(1).any(|line| {
        line.len() > name.len() && line[..name.len()].eq_ignore_ascii_case(name) && line[name.len()] == b':'
    })
}

/// A line feed not preceded by a carriage return.
fn has_bare_lf(head: &[u8]) -> bool {
    head.iter().enumerate().any(|(at, &b)| b == b'\n' && (at == 0 || head[at - 1] != b'\r'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in lines {
            map.append(
                http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn request_lines_are_three_parts_of_visible_ascii() {
        let good =
            ["GET /_matrix/client/versions HTTP/1.1\r\n", "POST /x?a=%20b HTTP/1.0\r\n", "OPTIONS * HTTP/1.1\r\n"];
        for line in good {
            assert_eq!(check_request_line(line.as_bytes()), Ok(()), "{line:?}");
        }
        let bad = [
            "GET /a b HTTP/1.1\r\n",
            "GET  /a HTTP/1.1\r\n",
            "GET\t/a HTTP/1.1\r\n",
            "GET /a\tb HTTP/1.1\r\n",
            "GET /a\x01 HTTP/1.1\r\n",
            "GET /a\x7f HTTP/1.1\r\n",
            "GET /aé HTTP/1.1\r\n",
            "GET /a HTTP/1.1 extra\r\n",
            "GET /a\r\n",
            "GET /a HTTP/2.0\r\n",
            "G(T /a HTTP/1.1\r\n",
            " GET /a HTTP/1.1\r\n",
        ];
        for line in bad {
            assert!(check_request_line(line.as_bytes()).is_err(), "{line:?}");
        }
        // Arriving a byte at a time changes nothing.
        for line in good.iter().chain(&bad) {
            let mut check = RequestLineCheck::default();
            let verdict = line.as_bytes().chunks(1).find_map(|byte| check.feed(byte));
            assert_eq!(verdict, Some(check_request_line(line.as_bytes())), "{line:?}");
        }
    }

    fn check11(lines: &[(&str, &str)]) -> Result<(), &'static str> {
        check(Version::HTTP_11, &headers(lines), None)
    }

    #[test]
    fn plain_framing_passes() {
        assert!(check11(&[("host", "a")]).is_ok());
        assert!(check11(&[("host", "a"), ("content-length", "12")]).is_ok());
        assert!(check11(&[("host", "a"), ("transfer-encoding", "Chunked ")]).is_ok());
        assert!(check(Version::HTTP_10, &headers(&[("content-length", "3")]), None).is_ok());
        assert!(check(Version::HTTP_2, &headers(&[]), None).is_ok());
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        let refused = [
            vec![("host", "a"), ("content-length", "3"), ("content-length", "3")],
            vec![("host", "a"), ("content-length", "3, 3")],
            vec![("host", "a"), ("content-length", "+3")],
            vec![("host", "a"), ("content-length", "")],
            vec![("host", "a"), ("content-length", "99999999999999999999")],
            vec![("host", "a"), ("transfer-encoding", "chunked"), ("content-length", "3")],
            vec![("host", "a"), ("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")],
            vec![("host", "a"), ("transfer-encoding", "gzip, chunked")],
            vec![("host", "a"), ("transfer-encoding", "identity")],
            vec![],
            vec![("host", "a"), ("host", "b")],
        ];
        for lines in refused {
            assert!(check11(&lines).is_err(), "{lines:?} passed");
        }
        assert!(check(Version::HTTP_10, &headers(&[("transfer-encoding", "chunked")]), None).is_err());
    }

    #[test]
    fn bare_line_feeds_are_refused() {
        let ok = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert!(check(Version::HTTP_11, &headers(&[("host", "a")]), Some(ok)).is_ok());
        let bare = b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n";
        assert!(check(Version::HTTP_11, &headers(&[("host", "a")]), Some(bare)).is_err());
        assert!(has_bare_lf(b"\n"));
    }

    #[test]
    fn content_length_dropped_by_the_parser_still_counts() {
        let raw = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        let parsed = headers(&[("host", "a"), ("transfer-encoding", "chunked")]);
        assert!(check(Version::HTTP_11, &parsed, Some(raw)).is_err());
        assert!(!has_field(b"GET /content-length: HTTP/1.1\r\n", b"content-length"));
    }
}
