//! `Authorization: X-Matrix origin=…,destination=…,key=…,sig=…` read as
//! RFC 9110 §11.4 auth-params: names in any case and order, values quoted
//! (with backslash escapes) or bare (colons allowed, as older servers send
//! them), whitespace around commas, unknown parameters ignored.

/// One `X-Matrix` header's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XMatrix {
    pub origin: String,
    pub destination: Option<String>,
    pub key: String,
    pub sig: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Another scheme (`Bearer`, …): not a server's signature.
    OtherScheme,
    Malformed,
    Missing(&'static str),
    /// `origin` is not a server name.
    BadOrigin,
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::OtherScheme => f.write_str("the Authorization header is not X-Matrix"),
            HeaderError::Malformed => f.write_str("the X-Matrix header is malformed"),
            HeaderError::Missing(name) => write!(f, "the X-Matrix header has no {name}"),
            HeaderError::BadOrigin => f.write_str("the X-Matrix origin is not a server name"),
        }
    }
}

const SCHEME: &[u8] = b"x-matrix";

pub fn parse(value: &[u8]) -> Result<XMatrix, HeaderError> {
    let value = trim(value);
    let scheme_end = value.iter().position(|&b| b == b' ' || b == b'\t').unwrap_or(value.len());
    if !value[..scheme_end].eq_ignore_ascii_case(SCHEME) {
        return Err(HeaderError::OtherScheme);
    }
    let mut rest = &value[scheme_end..];
    let (mut origin, mut destination, mut key, mut sig) = (None, None, None, None);
    loop {
        rest = skip(rest, |b| b == b' ' || b == b'\t' || b == b',');
        if rest.is_empty() {
            break;
        }
        let name_end = rest.iter().position(|&b| !is_tchar(b)).unwrap_or(rest.len());
        if name_end == 0 {
            return Err(HeaderError::Malformed);
        }
        let name = &rest[..name_end];
        rest = skip(&rest[name_end..], is_space);
        rest = rest.strip_prefix(b"=").ok_or(HeaderError::Malformed)?;
        rest = skip(rest, is_space);
        let (parsed, after) = if rest.first() == Some(&b'"') { quoted(&rest[1..])? } else { bare(rest)? };
        rest = skip(after, is_space);
        if !rest.is_empty() && rest[0] != b',' {
            return Err(HeaderError::Malformed);
        }
        let slot = match name.to_ascii_lowercase().as_slice() {
            b"origin" => &mut origin,
            b"destination" => &mut destination,
            b"key" => &mut key,
            b"sig" => &mut sig,
            _ => continue,
        };
        // A parameter given twice is ambiguous; the spec allows it once.
        if slot.replace(parsed).is_some() {
            return Err(HeaderError::Malformed);
        }
    }
    let origin = origin.ok_or(HeaderError::Missing("origin"))?;
    if !is_server_name(&origin) {
        return Err(HeaderError::BadOrigin);
    }
    Ok(XMatrix {
        origin,
        destination,
        key: key.ok_or(HeaderError::Missing("key"))?,
        sig: sig.ok_or(HeaderError::Missing("sig"))?,
    })
}

fn quoted(input: &[u8]) -> Result<(String, &[u8]), HeaderError> {
    let mut value = Vec::new();
    let mut index = 0;
    while index < input.len() {
        match input[index] {
            b'"' => {
                let text = String::from_utf8(value).map_err(|_| HeaderError::Malformed)?;
                return Ok((text, &input[index + 1..]));
            }
            b'\\' if index + 1 < input.len() => {
                value.push(input[index + 1]);
                index += 2;
            }
            byte if byte == b'\t' || byte >= 0x20 && byte != 0x7f => {
                value.push(byte);
                index += 1;
            }
            _ => return Err(HeaderError::Malformed),
        }
    }
    Err(HeaderError::Malformed)
}

fn bare(input: &[u8]) -> Result<(String, &[u8]), HeaderError> {
    let end = input.iter().position(|&b| b == b',' || is_space(b)).unwrap_or(input.len());
    let value = &input[..end];
    if value.is_empty() || value.iter().any(|&b| b == b'"' || b < 0x21 || b == 0x7f) {
        return Err(HeaderError::Malformed);
    }
    let text = std::str::from_utf8(value).map_err(|_| HeaderError::Malformed)?;
    Ok((text.to_string(), &input[end..]))
}

/// The spec's server name: a DNS name, IPv4 address or bracketed IPv6
/// address, then an optional port.
pub fn is_server_name(name: &str) -> bool {
    let (host, port) = if let Some(rest) = name.strip_prefix('[') {
        let Some(close) = rest.find(']') else { return false };
        match &rest[close + 1..] {
            "" => (&name[..close + 2], None),
            after => match after.strip_prefix(':') {
                Some(port) => (&name[..close + 2], Some(port)),
                None => return false,
            },
        }
    } else {
        match name.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (name, None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !host.is_empty() && host.len() <= 255 && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn is_space(byte: u8) -> bool {
    byte == b' ' || byte == b'\t'
}

fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

fn skip(input: &[u8], what: impl Fn(u8) -> bool) -> &[u8] {
    let start = input.iter().position(|&b| !what(b)).unwrap_or(input.len());
    &input[start..]
}

fn trim(bytes: &[u8]) -> &[u8] {
    let bytes = skip(bytes, is_space);
    let end = bytes.iter().rposition(|&b| !is_space(b)).map_or(0, |i| i + 1);
    &bytes[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(origin: &str, destination: Option<&str>, key: &str, sig: &str) -> XMatrix {
        XMatrix { origin: origin.into(), destination: destination.map(Into::into), key: key.into(), sig: sig.into() }
    }

    #[test]
    fn the_spec_example_and_its_variants_parse_alike() {
        let expected = header("origin.hs.example.com", Some("destination.hs.example.com"), "ed25519:key1", "ABCDEF");
        for value in [
            r#"X-Matrix origin="origin.hs.example.com",destination="destination.hs.example.com",key="ed25519:key1",sig="ABCDEF""#,
            r#"x-matrix   ORIGIN=origin.hs.example.com , Destination = "destination.hs.example.com",key=ed25519:key1,	sig="ABC\DEF""#,
            r#"X-MATRIX sig="ABCDEF",key="ed25519:key1",future="x, y",destination=destination.hs.example.com,origin=origin.hs.example.com,"#,
        ] {
            assert_eq!(parse(value.as_bytes()), Ok(expected.clone()), "{value}");
        }
    }

    #[test]
    fn destination_is_optional_and_escapes_are_undone() {
        let parsed = parse(br#"X-Matrix origin="a.example:8448",key="ed25519:\"k\"",sig="s\\""#).expect("parses");
        assert_eq!(parsed, header("a.example:8448", None, "ed25519:\"k\"", "s\\"));
    }

    #[test]
    fn broken_headers_are_refused_with_a_reason() {
        let cases: [(&[u8], HeaderError); 9] = [
            (b"Bearer abc", HeaderError::OtherScheme),
            (b"X-Matrixorigin=a", HeaderError::OtherScheme),
            (b"X-Matrix origin=\"a.example\",key=\"k\"", HeaderError::Missing("sig")),
            (b"X-Matrix key=k,sig=s", HeaderError::Missing("origin")),
            (b"X-Matrix origin=\"a.example,key=k,sig=s", HeaderError::Malformed),
            (b"X-Matrix origin=a.example key=k,sig=s", HeaderError::Malformed),
            (b"X-Matrix origin=a.example,origin=b.example,key=k,sig=s", HeaderError::Malformed),
            (b"X-Matrix origin=\"a/b\",key=k,sig=s", HeaderError::BadOrigin),
            (b"X-Matrix =x,origin=a.example,key=k,sig=s", HeaderError::Malformed),
        ];
        for (value, error) in cases {
            assert_eq!(parse(value), Err(error), "{}", String::from_utf8_lossy(value));
        }
    }

    #[test]
    fn server_names_follow_the_grammar() {
        for good in ["example.com", "example.com:8448", "1.2.3.4", "1.2.3.4:80", "[::1]", "[::1]:8448", "localhost"] {
            assert!(is_server_name(good), "{good}");
        }
        for bad in ["", "exa mple.com", "example.com:", "example.com:123456", "[::1", "::1", "a/b", "example.com:x"] {
            assert!(!is_server_name(bad), "{bad}");
        }
    }
}
