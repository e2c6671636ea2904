//! The PROXY protocol (HAProxy's v1 text and v2 binary headers) in front of
//! a connection from a load balancer: the client's real address.
//!
//! The header is read exactly, never past its end (v1 a byte at a time up
//! to its CRLF, v2 by its length field), so nothing after it needs to be
//! pushed back and TLS or HTTP starts on the next byte. `ppp` validates it.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line the spec allows, CRLF included.
const V1_MAX: usize = 107;
/// Addresses (216 bytes for Unix sockets at most) plus room for TLVs; HAProxy
/// sends far less. A longer header is refused rather than buffered.
const V2_MAX: usize = 16 + 2048;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("the connection did not start with a PROXY protocol header")]
    NotProxy,
    #[error("the PROXY header is longer than allowed")]
    TooLong,
    #[error("invalid PROXY header: {0}")]
    Invalid(String),
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed or failed before its PROXY header ended: {0}")]
    Io(String),
}

/// What to read next.
#[derive(Debug, PartialEq, Eq)]
pub enum Need {
    More(usize),
    Complete,
}

/// How many more bytes `header` needs, never more than it will use.
pub fn next_read(header: &[u8]) -> Result<Need, ProxyHeaderError> {
    // v1's shortest line ("PROXY UNKNOWN\r\n") is 15 bytes, v2's fixed part 16.
    const PROBE: usize = 8;
    if header.len() < PROBE {
        return Ok(Need::More(PROBE - header.len()));
    }
    if header.starts_with(V1_PREFIX) {
        if header.ends_with(b"\r\n") {
            return Ok(Need::Complete);
        }
        if header.len() >= V1_MAX {
            return Err(ProxyHeaderError::TooLong);
        }
        return Ok(Need::More(1));
    }
    if header[..PROBE] != V2_SIGNATURE[..PROBE] {
        return Err(ProxyHeaderError::NotProxy);
    }
    if header.len() < 16 {
        return Ok(Need::More(16 - header.len()));
    }
    if header[..12] != V2_SIGNATURE[..] {
        return Err(ProxyHeaderError::NotProxy);
    }
    let total = 16 + usize::from(u16::from_be_bytes([header[14], header[15]]));
    if total > V2_MAX {
        return Err(ProxyHeaderError::TooLong);
    }
    Ok(if header.len() < total { Need::More(total - header.len()) } else { Need::Complete })
}

/// The client address a complete header carries; `None` for a header that
/// carries none (v2 `LOCAL`, v1 `UNKNOWN`: the balancer's own health
/// checks), which keeps the connection's own peer.
pub fn parse(header: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    if header.starts_with(V1_PREFIX) {
        let parsed = ppp::v1::Header::try_from(header).map_err(|e| ProxyHeaderError::Invalid(format!("v1: {e}")))?;
        if parsed.header.len() != header.len() {
            return Err(ProxyHeaderError::Invalid("v1: bytes after the header line".into()));
        }
        return Ok(match parsed.addresses {
            ppp::v1::Addresses::Tcp4(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
            ppp::v1::Addresses::Tcp6(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
            ppp::v1::Addresses::Unknown => None,
        });
    }
    let parsed = ppp::v2::Header::try_from(header).map_err(|e| ProxyHeaderError::Invalid(format!("v2: {e}")))?;
    if parsed.header.len() != header.len() {
        return Err(ProxyHeaderError::Invalid("v2: length field disagrees with the header".into()));
    }
    if parsed.command == ppp::v2::Command::Local {
        return Ok(None);
    }
    Ok(match parsed.addresses {
        ppp::v2::Addresses::IPv4(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
        ppp::v2::Addresses::IPv6(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    })
}

/// A socket digest like the connection's own, but naming `client` as the peer,
/// so every later reader (XFF toward Synapse, rate limits, per-address caps,
/// the admin allow-list, the access log) sees the client, not the balancer.
pub fn digest_for(
    old: Option<std::sync::Arc<pingora::protocols::SocketDigest>>,
    fd: std::os::unix::io::RawFd,
    client: SocketAddr,
) -> pingora::protocols::SocketDigest {
    use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
    let digest = pingora::protocols::SocketDigest::from_raw_fd(fd);
    let _ = digest.peer_addr.set(Some(PeerAddr::Inet(client)));
    if let Some(local) = old.as_ref().and_then(|d| d.local_addr().cloned()) {
        let _ = digest.local_addr.set(Some(local));
    }
    digest
}

fn peer_ip(digest: Option<std::sync::Arc<pingora::protocols::SocketDigest>>) -> Option<std::net::IpAddr> {
    digest.and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
}

/// Reads the header on a plain or not-yet-TLS connection when its peer is a
/// listed balancer, and installs the client address it carries. Other peers
/// pass untouched (a PROXY header from them is then just a bad request or
/// handshake). An error means: close the connection.
pub async fn accept<S>(
    stream: &mut S,
    fd: std::os::unix::io::RawFd,
    proxy: &crate::edge::ProxyProtocol,
) -> Result<(), ProxyHeaderError>
where
    S: AsyncRead + Unpin + pingora::protocols::GetSocketDigest + ?Sized,
{
    let balancer = peer_ip(stream.get_socket_digest());
    if !proxy.expected_from(balancer) {
        return Ok(());
    }
    match read_header(stream, proxy.timeout).await {
        Ok(Some(client)) => {
            let digest = digest_for(stream.get_socket_digest(), fd, client);
            stream.set_socket_digest(digest);
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(error) => {
            crate::observe::metrics::METRICS.connections.proxy_protocol_refused.inc();
            log::warn!("closing a connection from load balancer {balancer:?}: {error}");
            Err(error)
        }
    }
}

/// Pingora's hook between accept and the TLS handshake.
pub struct PreTlsHeader {
    pub proxy: crate::edge::ProxyProtocol,
}

#[async_trait::async_trait]
impl pingora::listeners::PreTlsProcess for PreTlsHeader {
    async fn process(&self, stream: &mut pingora::protocols::l4::stream::Stream) -> pingora::Result<()> {
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(stream);
        accept(stream, fd, &self.proxy).await.map_err(|error| {
            pingora::Error::explain(pingora::ErrorType::AcceptError, format!("PROXY protocol: {error}"))
        })
    }
}

/// Reads one header from the start of `stream` within `timeout`.
pub async fn read_header<S: AsyncRead + Unpin + ?Sized>(
    stream: &mut S,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let read = async {
        let mut header = Vec::with_capacity(64);
        loop {
            match next_read(&header)? {
                Need::Complete => return parse(&header),
                Need::More(count) => {
                    let start = header.len();
                    header.resize(start + count, 0);
                    stream.read_exact(&mut header[start..]).await.map_err(|e| ProxyHeaderError::Io(e.to_string()))?;
                }
            }
        }
    };
    tokio::time::timeout(timeout, read).await.unwrap_or(Err(ProxyHeaderError::Timeout(timeout)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.push(0x20 | command);
        header.push(family);
        header.extend_from_slice(&((addresses.len() + tlvs.len()) as u16).to_be_bytes());
        header.extend_from_slice(addresses);
        header.extend_from_slice(tlvs);
        header
    }

    /// Reads `bytes` through `next_read` as the stream would, returning the
    /// header and how much of `bytes` it took.
    fn take(bytes: &[u8]) -> Result<(Vec<u8>, usize), ProxyHeaderError> {
        let mut header = Vec::new();
        loop {
            match next_read(&header)? {
                Need::Complete => return Ok((header.clone(), header.len())),
                Need::More(count) => {
                    let start = header.len();
                    if start + count > bytes.len() {
                        return Err(ProxyHeaderError::Io("eof".into()));
                    }
                    header.extend_from_slice(&bytes[start..start + count]);
                }
            }
        }
    }

    #[test]
    fn v1_lines_give_the_source() {
        let line = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\nGET / HTTP/1.1\r\n";
        let (header, used) = take(line).unwrap();
        assert_eq!(used, line.len() - b"GET / HTTP/1.1\r\n".len(), "read past the header");
        assert_eq!(parse(&header).unwrap(), Some("203.0.113.7:51234".parse().unwrap()));
        let six = b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n";
        assert_eq!(parse(&take(six).unwrap().0).unwrap(), Some("[2001:db8::7]:51234".parse().unwrap()));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap(), None);
    }

    #[test]
    fn v2_headers_give_the_source_and_local_keeps_the_peer() {
        let addresses = [203, 0, 113, 7, 192, 0, 2, 1, 0xC8, 0x22, 0x01, 0xBB];
        let tlv = [0x04, 0x00, 0x01, 0x2a]; // a NOOP TLV HAProxy may add
        let mut stream = v2(1, 0x11, &addresses, &tlv);
        stream.extend_from_slice(b"\x16\x03\x01 TLS follows");
        let (header, used) = take(&stream).unwrap();
        assert_eq!(used, 16 + addresses.len() + tlv.len());
        assert_eq!(parse(&header).unwrap(), Some("203.0.113.7:51234".parse().unwrap()));
        let local = v2(0, 0x00, &[], &[]);
        assert_eq!(parse(&take(&local).unwrap().0).unwrap(), None);
    }

    #[test]
    fn everything_else_is_refused_by_name() {
        assert_eq!(take(b"GET / HTTP/1.1\r\n\r\n").unwrap_err(), ProxyHeaderError::NotProxy);
        assert_eq!(take(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03").unwrap_err(), ProxyHeaderError::NotProxy);
        let endless = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(take(&endless).unwrap_err(), ProxyHeaderError::TooLong);
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(take(&huge).unwrap_err(), ProxyHeaderError::TooLong);
        assert!(matches!(parse(b"PROXY TCP4 999.0.0.1 192.0.2.1 1 2\r\n"), Err(ProxyHeaderError::Invalid(_))));
        assert!(matches!(parse(&v2(1, 0x11, &[1, 2, 3], &[])), Err(ProxyHeaderError::Invalid(_))));
        let mut wrong_version = v2(1, 0x11, &[0; 12], &[]);
        wrong_version[12] = 0x31;
        assert!(matches!(parse(&wrong_version), Err(ProxyHeaderError::Invalid(_))));
    }

    #[tokio::test]
    async fn slow_or_short_headers_fail_in_time() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"PROXY TCP4 ").await.unwrap();
        let timeout = Duration::from_millis(100);
        assert_eq!(read_header(&mut server, timeout).await, Err(ProxyHeaderError::Timeout(timeout)));
        drop(client);
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2\r\n").await.unwrap();
        assert_eq!(read_header(&mut server, timeout).await, Ok(Some("203.0.113.7:1".parse().unwrap())));
    }
}
