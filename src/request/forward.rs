//! Headers on the way to Synapse. The request target is never touched.

use http::header::{HeaderName, HeaderValue, FORWARDED, HOST, PROXY_AUTHORIZATION};
use pingora::http::RequestHeader;
use std::net::IpAddr;

/// Headers a client may send that would let it pose as someone else or
/// talk to a proxy hop that does not exist. (`X-Forwarded-For` and
/// `X-Forwarded-Proto` are replaced below rather than dropped.) Named as
/// parsed `HeaderName`s: looking one up by string parses it first, which
/// cost more than the lookup itself on every request (callgrind).
static DROPPED: [HeaderName; 4] =
    [FORWARDED, HeaderName::from_static("x-real-ip"), PROXY_AUTHORIZATION, HeaderName::from_static("x-forwarded-host")];
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Rewrites forwarding headers: Synapse trusts the first `X-Forwarded-For`
/// value, so it is replaced by the address the edge actually saw.
pub fn prepare_upstream_request(
    request: &mut RequestHeader,
    client_ip: Option<IpAddr>,
    tls: bool,
) -> pingora::Result<()> {
    for name in &DROPPED {
        request.remove_header(name);
    }
    match client_ip {
        Some(ip) => request.insert_header("X-Forwarded-For", address_value(ip))?,
        None => {
            // A Unix-socket client has no address; never pass on its claim.
            request.remove_header(&X_FORWARDED_FOR);
        }
    }
    request.insert_header("X-Forwarded-Proto", if tls { "https" } else { "http" })?;
    if request.headers.get(HOST).is_none() {
        // HTTP/2 carries the host in :authority; Synapse reads Host.
        if let Some(authority) = request.uri.authority().map(|a| a.as_str().to_string()) {
            request.insert_header(HOST, authority)?;
        }
    }
    Ok(())
}

/// Whether `client` is in one of `networks` (IPv4-mapped IPv6 addresses
/// as IPv4); no address is in none.
pub fn in_networks(networks: &[ipnet::IpNet], client: Option<IpAddr>) -> bool {
    client.is_some_and(|ip| {
        let ip = ip.to_canonical();
        networks.iter().any(|net| net.contains(&ip))
    })
}

/// What the edge believes of the proxies in front of it, and what it tells
/// the processes behind it.
#[derive(Debug, Clone, Default)]
pub struct Forwarding {
    /// HTTP proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Where the request ID goes to upstreams (and is read from a trusted proxy).
    pub request_id_header: Option<http::HeaderName>,
}

/// Longest request ID kept from a trusted proxy.
const MAX_REQUEST_ID: usize = 128;

impl Forwarding {
    /// The request ID a trusted proxy in front already gave this request,
    /// when it is one a log line can carry as is (visible ASCII without
    /// quotes or backslashes, at most 128 bytes); anything else, or from
    /// anyone else, is replaced by the edge's own.
    pub fn kept_request_id(&self, peer: Option<IpAddr>, value: Option<&[u8]>) -> Option<String> {
        let value = value?;
        if self.request_id_header.is_none() || !in_networks(&self.trusted_proxies, peer) {
            return None;
        }
        let loggable = |b: &u8| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\');
        if value.is_empty() || value.len() > MAX_REQUEST_ID || !value.iter().all(loggable) {
            return None;
        }
        String::from_utf8(value.to_vec()).ok()
    }
}

/// The client behind HTTP proxies the admin trusts: when the connection
/// comes from one of `trusted`, `X-Forwarded-For` is read right to left
/// (each proxy appends the address it saw) and the first address not in
/// `trusted` is the client, as MAS and Synapse's own `x_forwarded` reading
/// do. Entries left of it are whatever the client claimed and are ignored.
/// An entry that is not an address stops the walk at the last good hop.
pub fn client_behind_proxies<'a>(
    peer: Option<IpAddr>,
    forwarded_for: impl Iterator<Item = &'a [u8]>,
    trusted: &[ipnet::IpNet],
) -> Option<IpAddr> {
    let is_trusted = |ip: IpAddr| in_networks(trusted, Some(ip));
    let peer = peer?;
    if trusted.is_empty() || !is_trusted(peer) {
        return Some(peer);
    }
    let values: Vec<&[u8]> = forwarded_for.collect();
    let mut client = peer;
    for entry in values.iter().rev().flat_map(|value| value.rsplit(|&b| b == b',')) {
        let Some(ip) = std::str::from_utf8(entry).ok().and_then(parse_forwarded_address) else { break };
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    Some(client)
}

/// `203.0.113.7`, `2001:db8::7`, and the forms with a port some proxies write.
fn parse_forwarded_address(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| entry.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

/// The client address as a header value, IPv4-mapped IPv6 shown as IPv4.
/// IPv4 is written by hand: `Display` through the formatting machinery was
/// over a thousand instructions per request (callgrind).
fn address_value(ip: IpAddr) -> HeaderValue {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let mut text = [0u8; 15];
            let mut len = 0;
            for (index, octet) in v4.octets().into_iter().enumerate() {
                if index > 0 {
                    text[len] = b'.';
                    len += 1;
                }
                let digits = [octet / 100, octet / 10 % 10, octet % 10];
                let skip = match octet {
                    100.. => 0,
                    10..=99 => 1,
                    _ => 2,
                };
                for digit in &digits[skip..] {
                    text[len] = b'0' + digit;
                    len += 1;
                }
            }
            HeaderValue::from_bytes(&text[..len]).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
        }
        IpAddr::V6(v6) => {
            HeaderValue::from_str(&v6.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_proxies_are_walked_right_to_left() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "2001:db8:ff::/48".parse().unwrap()];
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let walk = |peer: &str, values: &[&str]| {
            client_behind_proxies(ip(peer), values.iter().map(|v| v.as_bytes()), &trusted)
        };
        // An untrusted peer is the client, whatever it claims.
        assert_eq!(walk("198.51.100.1", &["203.0.113.7"]), ip("198.51.100.1"));
        // One balancer: the address it appended.
        assert_eq!(walk("10.0.0.2", &["203.0.113.7"]), ip("203.0.113.7"));
        // A client's forged entry on the left is skipped; trusted hops are walked.
        assert_eq!(walk("10.0.0.2", &["6.6.6.6, 203.0.113.7, 10.0.0.9"]), ip("203.0.113.7"));
        assert_eq!(walk("10.0.0.2", &["6.6.6.6", "203.0.113.7", "10.0.0.9"]), ip("203.0.113.7"));
        // Ports and brackets some proxies write; IPv6 and mapped forms.
        assert_eq!(walk("10.0.0.2", &["203.0.113.7:5555"]), ip("203.0.113.7"));
        assert_eq!(walk("::ffff:10.0.0.2", &["[2001:db8::7]:443"]), ip("2001:db8::7"));
        assert_eq!(walk("10.0.0.2", &["[2001:db8::7]"]), ip("2001:db8::7"));
        // Garbage stops the walk at the last good hop; nothing sent keeps the peer.
        assert_eq!(walk("10.0.0.2", &["203.0.113.7, junk, 10.0.0.9"]), ip("10.0.0.9"));
        assert_eq!(walk("10.0.0.2", &[]), ip("10.0.0.2"));
        // All trusted: the left-most.
        assert_eq!(walk("10.0.0.2", &["10.1.1.1, 10.0.0.9"]), ip("10.1.1.1"));
        // No trusted list: the header means nothing.
        assert_eq!(client_behind_proxies(ip("10.0.0.2"), [b"203.0.113.7".as_slice()].into_iter(), &[]), ip("10.0.0.2"));
    }

    #[test]
    fn forged_forwarding_headers_are_replaced() {
        let mut request = RequestHeader::build("GET", b"/_matrix/client/v3/sync?since=a%2Fb", None).unwrap();
        request.insert_header("Host", "matrix.example.com:8443").unwrap();
        request.append_header("X-Forwarded-For", "6.6.6.6").unwrap();
        request.append_header("X-Forwarded-For", "7.7.7.7").unwrap();
        request.insert_header("Forwarded", "for=6.6.6.6").unwrap();
        request.insert_header("X-Real-IP", "6.6.6.6").unwrap();
        request.insert_header("X-Forwarded-Proto", "http").unwrap();
        prepare_upstream_request(&mut request, Some("::ffff:10.1.2.3".parse().unwrap()), true).unwrap();
        let values: Vec<_> = request.headers.get_all("X-Forwarded-For").iter().collect();
        assert_eq!(values, ["10.1.2.3"]);
        assert_eq!(request.headers["X-Forwarded-Proto"], "https");
        assert!(request.headers.get("Forwarded").is_none());
        assert!(request.headers.get("X-Real-IP").is_none());
        assert_eq!(request.headers["Host"], "matrix.example.com:8443");
        assert_eq!(request.raw_path(), b"/_matrix/client/v3/sync?since=a%2Fb");
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        let addresses = ["0.0.0.0", "1.2.3.4", "9.10.99.100", "255.255.255.255", "127.0.0.1", "::1", "2001:db8::7"];
        for text in addresses {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(address_value(ip), text);
        }
        assert_eq!(address_value("::ffff:10.20.0.254".parse().unwrap()), "10.20.0.254");
        for octet in 0..=255u8 {
            let ip = IpAddr::from([octet, 255 - octet, octet / 2, 7]);
            assert_eq!(address_value(ip), ip.to_string());
        }
    }

    #[test]
    fn a_request_id_is_kept_only_from_a_trusted_proxy_and_only_when_loggable() {
        let forwarding = Forwarding {
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            request_id_header: Some(http::HeaderName::from_static("x-request-id")),
        };
        let proxy = Some("10.1.2.3".parse().unwrap());
        let stranger = Some("192.0.2.7".parse().unwrap());
        assert_eq!(forwarding.kept_request_id(proxy, Some(b"lb-4f2a:9")), Some("lb-4f2a:9".into()));
        assert_eq!(forwarding.kept_request_id(Some("::ffff:10.1.2.3".parse().unwrap()), Some(b"x")), Some("x".into()));
        assert_eq!(forwarding.kept_request_id(stranger, Some(b"lb-4f2a")), None);
        for unloggable in [&b""[..], b"two words", b"quote\"", b"back\\slash", b"tab\tx", &[b'a'; 129][..]] {
            assert_eq!(forwarding.kept_request_id(proxy, Some(unloggable)), None, "{unloggable:?}");
        }
        let off = Forwarding { request_id_header: None, ..forwarding };
        assert_eq!(off.kept_request_id(proxy, Some(b"lb-4f2a")), None);
    }
}
