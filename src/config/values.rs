//! Small validated value types for the YAML schema.
//!
//! Each type parses itself through `#[serde(try_from = "String")]`, so a bad
//! value is reported by serde_yaml with its key path, line and column.

use serde::de::{self, Deserialize, Deserializer, Visitor};
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// A config value that does not parse: what it was meant to be, the text
/// as written, and what was expected. serde_yaml adds the key path, line
/// and column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {text:?}: {expected}")]
pub struct InvalidValue {
    pub what: &'static str,
    pub text: String,
    pub expected: String,
}

fn invalid<T>(what: &'static str, text: &str, expected: impl Into<String>) -> Result<T, InvalidValue> {
    Err(InvalidValue { what, text: text.to_string(), expected: expected.into() })
}

/// A name that could not be looked up while a snapshot was built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("{host} has no address")]
    NoAddress { host: String },
    #[error("cannot resolve {host}: {reason}")]
    Failed { host: String, reason: String },
    #[error("resolving {host} took longer than {}s", .timeout.as_secs())]
    TimedOut { host: String, timeout: Duration },
}

/// An address to listen on, such as `[::]:443` or `127.0.0.1:8008`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl TryFrom<String> for ListenAddr {
    type Error = InvalidValue;
    fn try_from(text: String) -> Result<Self, InvalidValue> {
        match text.parse::<SocketAddr>() {
            Ok(address) => Ok(ListenAddr(address)),
            Err(_) => invalid("listen address", &text, "expected IP:port, such as \"[::]:443\" or \"127.0.0.1:8448\""),
        }
    }
}

/// A byte count written as `50M`, `200M`, `1G`, `512K` or plain bytes.
/// Suffixes are binary (K = 1024), as in Synapse's `max_upload_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Option<u64> {
        let text = text.trim();
        let (digits, multiplier) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
            None => (text, 1),
            Some((split, _)) => {
                let unit = text[split..].trim().to_ascii_uppercase();
                let multiplier: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                    "" => 1,
                    "K" => 1 << 10,
                    "M" => 1 << 20,
                    "G" => 1 << 30,
                    _ => return None,
                };
                (&text[..split], multiplier)
            }
        };
        digits.parse::<u64>().ok()?.checked_mul(multiplier)
    }
}

impl TryFrom<String> for ByteSize {
    type Error = InvalidValue;
    fn try_from(text: String) -> Result<Self, InvalidValue> {
        match ByteSize::parse(&text) {
            Some(bytes) if bytes > 0 => Ok(ByteSize(bytes)),
            _ => invalid("size", &text, "expected a positive size such as 50M, 200M or 1G"),
        }
    }
}

/// A duration written as `5s`, `1h`, `10m` or `250ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub Duration);

impl TryFrom<String> for Span {
    type Error = InvalidValue;
    fn try_from(text: String) -> Result<Self, InvalidValue> {
        match humantime::parse_duration(text.trim()) {
            Ok(span) => Ok(Span(span)),
            Err(e) => invalid("duration", &text, format!("{e}; expected e.g. 5s, 10m, 1h")),
        }
    }
}

/// An IP network allowed to reach an API, such as `10.0.0.0/8` or `::1/128`.
/// A bare address means just that host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub ipnet::IpNet);

impl TryFrom<String> for Cidr {
    type Error = InvalidValue;
    fn try_from(text: String) -> Result<Self, InvalidValue> {
        if let Ok(net) = text.parse::<ipnet::IpNet>() {
            return Ok(Cidr(net.trunc()));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Cidr(ipnet::IpNet::from(ip)));
        }
        invalid("network", &text, "expected CIDR notation such as 127.0.0.1/32 or ::1/128")
    }
}

/// Where Synapse (or one of its workers, or a named upstream) listens, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAddr {
    /// Plain HTTP over TCP.
    Tcp(SocketAddr),
    /// HTTPS over TCP; the name is used for SNI and certificate verification.
    Tls(SocketAddr, String),
    /// Plain HTTP over a Unix socket.
    Unix(PathBuf),
}

/// An upstream as written in the config: `host:port`, `https://host:port`
/// or `unix:/path`. Only its form is checked while parsing; a name is
/// looked up when the running snapshot is built ([`UpstreamTarget::resolve`]),
/// so parsing (`check`'s first step, a reload, the fuzz target) never waits
/// on DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTarget {
    Tcp { host: String, port: u16, tls: bool },
    Unix(PathBuf),
}

/// How long one upstream name may take to resolve while a snapshot is built.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

impl TryFrom<String> for UpstreamTarget {
    type Error = InvalidValue;
    fn try_from(text: String) -> Result<Self, InvalidValue> {
        let expected = "expected host:port, https://host:port or unix:/path";
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return invalid("upstream", &text, format!("a unix socket path must be absolute ({expected})"));
            }
            return Ok(UpstreamTarget::Unix(PathBuf::from(path)));
        }
        let (authority, tls) = match text.strip_prefix("https://") {
            Some(rest) => (rest.trim_end_matches('/'), true),
            None => (text.strip_prefix("http://").unwrap_or(&text).trim_end_matches('/'), false),
        };
        if authority.contains('/') {
            return invalid("upstream", &text, format!("no path is allowed ({expected})"));
        }
        // Require an explicit port: guessing 8008 would hide mistakes.
        let parsed = authority.rsplit_once(':').and_then(|(host, port)| {
            let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
            let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
            let valid = match bare {
                Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
                None => host.parse::<std::net::Ipv4Addr>().is_ok() || is_dns_name(host),
            };
            valid.then(|| (bare.unwrap_or(host).to_string(), port))
        });
        match parsed {
            Some((host, port)) => Ok(UpstreamTarget::Tcp { host, port, tls }),
            None => invalid("upstream", &text, expected),
        }
    }
}

impl UpstreamTarget {
    /// Whether it names an address outright (an IP literal or a socket path).
    pub fn is_literal(&self) -> bool {
        match self {
            UpstreamTarget::Tcp { host, .. } => host.parse::<IpAddr>().is_ok(),
            UpstreamTarget::Unix(_) => true,
        }
    }

    /// The address to connect to; a name is looked up (first answer), and
    /// a lookup that takes longer than `timeout` is an error.
    pub fn resolve(&self, timeout: Duration) -> Result<UpstreamAddr, ResolveError> {
        let (host, port, tls) = match self {
            UpstreamTarget::Unix(path) => return Ok(UpstreamAddr::Unix(path.clone())),
            UpstreamTarget::Tcp { host, port, tls } => (host, *port, *tls),
        };
        let addr = match host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            Err(_) => lookup(host, port, timeout)?,
        };
        Ok(if tls { UpstreamAddr::Tls(addr, host.clone()) } else { UpstreamAddr::Tcp(addr) })
    }
}

/// How a build finds the addresses of the names a config gives. Strict (a
/// start, a reload): a name that does not resolve is an error. Lenient
/// (`check`, which must work without a network): the name is noted, an
/// unspecified address stands in for it, and everything else is checked.
#[derive(Debug, Default)]
pub struct Lookups {
    lenient: bool,
    unresolved: std::sync::Mutex<Vec<String>>,
}

impl Lookups {
    pub fn strict() -> Lookups {
        Lookups::default()
    }

    pub fn lenient() -> Lookups {
        Lookups { lenient: true, ..Lookups::default() }
    }

    pub fn address(&self, target: &UpstreamTarget) -> Result<UpstreamAddr, ResolveError> {
        match target.resolve(RESOLVE_TIMEOUT) {
            Ok(address) => Ok(address),
            Err(error) if self.lenient => {
                let UpstreamTarget::Tcp { host, port, tls } = target else { return Err(error) };
                self.unresolved.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(error.to_string());
                let stand_in = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), *port);
                Ok(if *tls { UpstreamAddr::Tls(stand_in, host.clone()) } else { UpstreamAddr::Tcp(stand_in) })
            }
            Err(error) => Err(error),
        }
    }

    /// What a lenient build could not resolve, each with the reason.
    pub fn unresolved(&self) -> Vec<String> {
        self.unresolved.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

/// The system resolver has no timeout of its own: it runs on a thread of
/// its own, and a late answer is dropped with it.
fn lookup(host: &str, port: u16, timeout: Duration) -> Result<SocketAddr, ResolveError> {
    let (answer, wait) = std::sync::mpsc::channel();
    let name = host.to_string();
    std::thread::spawn(move || {
        let _ = answer.send((name.as_str(), port).to_socket_addrs().map(|mut addrs| addrs.next()));
    });
    match wait.recv_timeout(timeout) {
        Ok(Ok(Some(addr))) => Ok(addr),
        Ok(Ok(None)) => Err(ResolveError::NoAddress { host: host.to_string() }),
        Ok(Err(e)) => Err(ResolveError::Failed { host: host.to_string(), reason: e.to_string() }),
        Err(_) => Err(ResolveError::TimedOut { host: host.to_string(), timeout }),
    }
}

impl fmt::Display for UpstreamTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamTarget::Tcp { host, port, tls } => {
                let scheme = if *tls { "https://" } else { "" };
                if host.contains(':') {
                    write!(f, "{scheme}[{host}]:{port}")
                } else {
                    write!(f, "{scheme}{host}:{port}")
                }
            }
            UpstreamTarget::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamAddr::Tcp(addr) => write!(f, "{addr}"),
            UpstreamAddr::Tls(addr, host) => write!(f, "https://{host} ({addr})"),
            UpstreamAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The `m.server` value: `<hostname or IP literal>[:<port>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddress {
    pub host: String,
    pub port: Option<u16>,
}

impl ServerAddress {
    /// The port remote servers will connect to: the given one, else 8448.
    pub fn effective_port(&self) -> u16 {
        self.port.unwrap_or(8448)
    }
}

impl fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.host),
            None => write!(f, "{}", self.host),
        }
    }
}

impl TryFrom<String> for ServerAddress {
    type Error = InvalidValue;
    fn try_from(text: String) -> Result<Self, InvalidValue> {
        match parse_server_address(&text) {
            Some(address) => Ok(address),
            None => invalid(
                "server address",
                &text,
                "expected a hostname or IP literal with an optional port, such as \"synapse.example.com:443\"",
            ),
        }
    }
}

impl ServerName {
    /// The host and port the name itself gives (the port is rarely there).
    pub fn address(&self) -> Option<ServerAddress> {
        parse_server_address(&self.0)
    }
}

fn parse_server_address(text: &str) -> Option<ServerAddress> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (ip6, after) = rest.split_once(']')?;
        ip6.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (format!("[{ip6}]"), port)
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host.to_string(), Some(port)),
            None => (text.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0)?),
        None => None,
    };
    if !host.starts_with('[') && !is_dns_name(&host) {
        return None;
    }
    Some(ServerAddress { host, port })
}

/// A DNS name or IPv4 literal as the Matrix spec allows in server names.
pub fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host.split('.').all(|label| {
            !label.is_empty() && label.len() <= 63 && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The homeserver's `server_name`: a DNS name or IP literal, optionally with a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerName(pub String);

impl TryFrom<String> for ServerName {
    type Error = InvalidValue;
    fn try_from(text: String) -> Result<Self, InvalidValue> {
        match parse_server_address(&text) {
            Some(_) => Ok(ServerName(text)),
            None => invalid(
                "server_name",
                &text,
                "expected the domain at the end of your user IDs, such as \"example.com\"",
            ),
        }
    }
}

/// An absolute `http(s)://` URL as the well-known documents need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(pub String);

impl TryFrom<String> for HttpUrl {
    type Error = InvalidValue;
    fn try_from(text: String) -> Result<Self, InvalidValue> {
        let rest = text.strip_prefix("https://").or_else(|| text.strip_prefix("http://"));
        let host = rest.map(|r| r.split(['/', '?', '#']).next().unwrap_or(""));
        match host {
            Some(host) if !host.is_empty() && !text.chars().any(char::is_whitespace) => Ok(HttpUrl(text)),
            _ => invalid("URL", &text, "expected an absolute https:// URL such as \"https://matrix.example.com\""),
        }
    }
}

/// Values are parsed inside the scalar's visitor, not after it, so that
/// serde_yaml reports a bad value at its own line and key rather than at the
/// enclosing mapping.
struct StrVisitor<T>(std::marker::PhantomData<T>, &'static str);

impl<T: TryFrom<String, Error: fmt::Display>> Visitor<'_> for StrVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.1)
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
        T::try_from(text.to_string()).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<T, E> {
        T::try_from(n.to_string()).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<T, E> {
        T::try_from(n.to_string()).map_err(E::custom)
    }
}

macro_rules! deserialize_from_str {
    ($($type:ty => $expecting:literal),* $(,)?) => {$(
        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserializer.deserialize_any(StrVisitor::<$type>(std::marker::PhantomData, $expecting))
            }
        }
    )*};
}

deserialize_from_str! {
    ListenAddr => "an IP:port address",
    ByteSize => "a size such as 50M",
    Span => "a duration such as 5s",
    Cidr => "a network such as 10.0.0.0/8",
    UpstreamTarget => "host:port, https://host:port or unix:/path",
    ServerAddress => "a hostname with an optional port",
    ServerName => "a server name such as example.com",
    HttpUrl => "an https:// URL",
    DiscoverName => "an SRV name or host:port",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discover_names_are_srv_or_host_and_port() {
        let parse = |s: &str| DiscoverName::try_from(s.to_string());
        assert_eq!(
            parse("_synapse-http._tcp.Sync.Example.org.").unwrap(),
            DiscoverName::Srv("_synapse-http._tcp.sync.example.org".into())
        );
        assert_eq!(
            parse("workers.internal:8083").unwrap(),
            DiscoverName::Host { host: "workers.internal".into(), port: 8083 }
        );
        for bad in ["workers.internal", "workers.internal:0", "workers.internal:x", "_synapse._udp.x", "a b:80", ":80"]
        {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_use_binary_suffixes() {
        assert_eq!(ByteSize::parse("50M"), Some(50 << 20));
        assert_eq!(ByteSize::parse("1G"), Some(1 << 30));
        assert_eq!(ByteSize::parse("512k"), Some(512 << 10));
        assert_eq!(ByteSize::parse("100MiB"), Some(100 << 20));
        assert_eq!(ByteSize::parse("1234"), Some(1234));
        assert_eq!(ByteSize::parse("12X"), None);
        assert_eq!(ByteSize::parse("M"), None);
    }

    #[test]
    fn server_address_accepts_spec_forms() {
        for good in ["example.com", "synapse.example.com:443", "1.2.3.4:8448", "[::1]:443", "[2001:db8::1]"] {
            assert!(parse_server_address(good).is_some(), "{good}");
        }
        for bad in [
            "",
            "https://example.com",
            "example.com:",
            "example.com:0",
            "ex ample.com",
            "[::1",
            "example.com:99999",
            "a..b",
        ] {
            assert!(parse_server_address(bad).is_none(), "{bad}");
        }
    }

    fn target(text: &str) -> Result<UpstreamTarget, InvalidValue> {
        UpstreamTarget::try_from(text.to_string())
    }

    #[test]
    fn upstream_forms() {
        let resolve = |text: &str| target(text).unwrap().resolve(RESOLVE_TIMEOUT);
        assert_eq!(resolve("127.0.0.1:8008"), Ok(UpstreamAddr::Tcp("127.0.0.1:8008".parse().unwrap())));
        assert_eq!(resolve("[::1]:8008"), Ok(UpstreamAddr::Tcp("[::1]:8008".parse().unwrap())));
        assert!(matches!(resolve("unix:/run/synapse.sock"), Ok(UpstreamAddr::Unix(_))));
        assert!(matches!(resolve("https://127.0.0.1:8448"), Ok(UpstreamAddr::Tls(_, h)) if h == "127.0.0.1"));
        for bad in ["127.0.0.1", "unix:relative.sock", "http://127.0.0.1:8008/path", "host:0", "ho st:80", "[::1:80"] {
            assert!(target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_only_checked_when_parsed_and_looked_up_when_resolved() {
        // Parsing accepts the form without a lookup (`.invalid` never
        // resolves, RFC 6761); tests stay off the network, so the only name
        // looked up here is localhost, which /etc/hosts answers.
        let named = target("synapse.invalid:8008").unwrap();
        assert!(!named.is_literal());
        assert_eq!(named.to_string(), "synapse.invalid:8008");
        let local = target("localhost:8008").unwrap().resolve(RESOLVE_TIMEOUT).unwrap();
        assert!(matches!(local, UpstreamAddr::Tcp(addr) if addr.ip().is_loopback() && addr.port() == 8008));
    }

    #[test]
    fn cidr_accepts_bare_addresses() {
        assert_eq!(Cidr::try_from("::1".to_string()).unwrap().0.to_string(), "::1/128");
        assert_eq!(Cidr::try_from("10.1.2.3/8".to_string()).unwrap().0.to_string(), "10.0.0.0/8");
        assert!(Cidr::try_from("10.0.0.0/33".to_string()).is_err());
    }
}

/// A DNS name whose records list workers: an SRV name (`_service._tcp.zone`)
/// or a host name with the port its addresses serve on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DiscoverName {
    Srv(String),
    Host { host: String, port: u16 },
}

impl TryFrom<String> for DiscoverName {
    type Error = InvalidValue;
    fn try_from(text: String) -> Result<Self, InvalidValue> {
        let text = text.trim().trim_end_matches('.').to_ascii_lowercase();
        let plain = |name: &str| {
            !name.is_empty()
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                })
        };
        if text.starts_with('_') {
            if text.contains(':') || !plain(&text) || !text.contains("._tcp.") {
                return invalid("discovery name", &text, "an SRV name looks like _synapse-http._tcp.example.org");
            }
            return Ok(DiscoverName::Srv(text));
        }
        match text.rsplit_once(':') {
            Some((host, port)) if plain(host) => match port.parse::<u16>() {
                Ok(port) if port > 0 => Ok(DiscoverName::Host { host: host.to_string(), port }),
                _ => invalid("discovery name", &text, format!("{port:?} is not a port")),
            },
            _ => invalid(
                "discovery name",
                &text,
                "give an SRV name (_synapse-http._tcp.example.org) or host:port (synchrotrons.example.org:8083)",
            ),
        }
    }
}

impl std::fmt::Display for DiscoverName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiscoverName::Srv(name) => f.write_str(name),
            DiscoverName::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}
