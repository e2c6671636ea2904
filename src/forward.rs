//! Headers on the way to Synapse. The request target is never touched.

use pingora::http::RequestHeader;
use std::net::IpAddr;

/// Headers a client may send that would let it pose as someone else or
/// talk to a proxy hop that does not exist.
const DROPPED: [&str; 5] = ["Forwarded", "X-Real-IP", "Proxy-Authorization", "X-Forwarded-Proto", "X-Forwarded-Host"];

/// Rewrites forwarding headers: Synapse trusts the first `X-Forwarded-For`
/// value, so it is replaced by the address the edge actually saw.
pub fn prepare_upstream_request(
    request: &mut RequestHeader,
    client_ip: Option<IpAddr>,
    tls: bool,
) -> pingora::Result<()> {
    for name in DROPPED {
        request.remove_header(name);
    }
    match client_ip {
        Some(ip) => {
            request.insert_header("X-Forwarded-For", ip.to_canonical().to_string())?;
        }
        None => {
            // A Unix-socket client has no address; never pass on its claim.
            request.remove_header("X-Forwarded-For");
        }
    }
    request.insert_header("X-Forwarded-Proto", if tls { "https" } else { "http" })?;
    if request.headers.get(http::header::HOST).is_none() {
        // HTTP/2 carries the host in :authority; Synapse reads Host.
        if let Some(authority) = request.uri.authority().map(|a| a.as_str().to_string()) {
            request.insert_header(http::header::HOST, authority)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
