//! One HTTPS request as another homeserver or a client makes it, with what
//! the doctor needs to judge the answer: the certificate chain and whether
//! it verified for the name, the headers, the body.
//!
//! Blocking and deliberately small: a doctor run makes a dozen requests.

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use openssl::x509::X509;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use super::{bad_answer, bad_config, unreachable, FederationError};

const TIMEOUT: Duration = Duration::from_secs(10);
/// Well-known documents and key responses are small; refuse to buffer more.
const MAX_BODY: usize = 1 << 20;

/// curl's `--connect-to HOST:PORT:CONNECT-TO-HOST:CONNECT-TO-PORT`: requests
/// for HOST:PORT go to the other address, with HOST still in SNI and Host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectTo {
    pub host: String,
    pub port: Option<u16>,
    pub to_host: String,
    pub to_port: Option<u16>,
}

impl std::str::FromStr for ConnectTo {
    type Err = FederationError;
    fn from_str(text: &str) -> Result<Self, FederationError> {
        // IPv6 targets come in brackets: example.org:443:[::1]:8443.
        let mut parts = vec![String::new()];
        let mut bracketed = false;
        for c in text.chars() {
            match c {
                '[' if !bracketed => bracketed = true,
                ']' if bracketed => bracketed = false,
                ':' if !bracketed => parts.push(String::new()),
                c => parts.last_mut().map_or((), |part| part.push(c)),
            }
        }
        if bracketed {
            return Err(bad_config(format!("{text:?}: unclosed [")));
        }
        let port = |s: &str| {
            if s.is_empty() {
                Ok(None)
            } else {
                s.parse::<u16>().map(Some).map_err(|_| bad_config(format!("{s:?} is not a port")))
            }
        };
        match parts.as_slice() {
            [host, from_port, to_host, to_port] => Ok(ConnectTo {
                host: host.to_ascii_lowercase(),
                port: port(from_port)?,
                to_host: to_host.clone(),
                to_port: port(to_port)?,
            }),
            _ => Err(bad_config(format!("{text:?}: expected HOST:PORT:CONNECT-TO-HOST:CONNECT-TO-PORT"))),
        }
    }
}

#[derive(Clone)]
pub struct Client {
    pub connect_to: Vec<ConnectTo>,
    pub ca: Option<X509>,
    /// Per connect, read and write.
    pub timeout: Duration,
    /// Only over a certificate that verifies for the name (the federation
    /// gate's key fetches); the doctor instead reports a bad one and goes on.
    pub strict: bool,
}

pub struct Fetched {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Leaf first, as the server sent it.
    pub chain: Vec<X509>,
    /// Why the chain did not verify for the name; `None`: it did.
    pub certificate_problem: Option<String>,
}

impl Fetched {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Result<serde_json::Value, FederationError> {
        serde_json::from_slice(&self.body).map_err(|e| bad_answer(format!("not JSON ({e})")))
    }
}

impl Client {
    pub fn new(connect_to: Vec<ConnectTo>, ca_file: Option<&Path>) -> Result<Client, FederationError> {
        let ca = match ca_file {
            Some(file) => {
                let pem =
                    std::fs::read(file).map_err(|e| unreachable(format!("cannot read {}: {e}", file.display())))?;
                Some(
                    X509::from_pem(&pem)
                        .map_err(|e| unreachable(format!("{} is not a PEM certificate: {e}", file.display())))?,
                )
            }
            None => None,
        };
        Ok(Client { connect_to, ca, timeout: TIMEOUT, strict: false })
    }

    /// Whether `--connect-to` redirects this host (so DNS for it is beside the point).
    pub fn overridden(&self, host: &str) -> bool {
        self.connect_to.iter().any(|rule| rule.host == host.to_ascii_lowercase())
    }

    fn address(&self, host: &str, port: u16) -> Result<SocketAddr, FederationError> {
        let host_lower = host.to_ascii_lowercase();
        let rule = self
            .connect_to
            .iter()
            .find(|rule| (rule.host.is_empty() || rule.host == host_lower) && rule.port.is_none_or(|p| p == port));
        let (host, port) = match rule {
            Some(rule) => {
                (if rule.to_host.is_empty() { host } else { rule.to_host.as_str() }, rule.to_port.unwrap_or(port))
            }
            None => (host, port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (host, port)
            .to_socket_addrs()
            .map_err(|e| unreachable(format!("cannot resolve {host}: {e}")))?
            .next()
            .ok_or_else(|| unreachable(format!("{host} has no address")))
    }

    fn connector(&self, verify: bool) -> Result<SslConnector, FederationError> {
        let mut builder = SslConnector::builder(SslMethod::tls()).map_err(|e| unreachable(e.to_string()))?;
        if let Some(ca) = &self.ca {
            builder.cert_store_mut().add_cert(ca.clone()).map_err(|e| unreachable(e.to_string()))?;
        }
        builder.set_verify(if verify { SslVerifyMode::PEER } else { SslVerifyMode::NONE });
        builder.set_alpn_protos(b"\x08http/1.1").map_err(|e| unreachable(e.to_string()))?;
        Ok(builder.build())
    }

    /// `GET https://host:port/target` with extra headers. A certificate that
    /// does not verify is reported and the request made anyway, so the
    /// other checks still run.
    pub fn get(
        &self,
        host: &str,
        port: u16,
        target: &str,
        headers: &[(&str, String)],
    ) -> Result<Fetched, FederationError> {
        let address = self.address(host, port)?;
        let mut certificate_problem = None;
        let attempts: &[bool] = if self.strict { &[true] } else { &[true, false] };
        for &verify in attempts {
            let tcp = TcpStream::connect_timeout(&address, self.timeout)
                .map_err(|e| unreachable(format!("cannot connect to {host}:{port} ({address}): {e}")))?;
            tcp.set_read_timeout(Some(self.timeout)).map_err(|e| unreachable(e.to_string()))?;
            tcp.set_write_timeout(Some(self.timeout)).map_err(|e| unreachable(e.to_string()))?;
            let mut configuration = self.connector(verify)?.configure().map_err(|e| unreachable(e.to_string()))?;
            if host.parse::<std::net::IpAddr>().is_ok() {
                configuration.set_use_server_name_indication(false);
            }
            match configuration.connect(host.trim_start_matches('[').trim_end_matches(']'), tcp) {
                Ok(mut stream) => {
                    let chain: Vec<X509> = stream
                        .ssl()
                        .peer_cert_chain()
                        .map(|chain| chain.iter().map(|c| c.to_owned()).collect())
                        .unwrap_or_default();
                    let host_header = if port == 443 { host.to_string() } else { format!("{host}:{port}") };
                    let mut request = format!("GET {target} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\nUser-Agent: matrix-edge-doctor\r\n");
                    for (name, value) in headers {
                        request.push_str(&format!("{name}: {value}\r\n"));
                    }
                    request.push_str("\r\n");
                    stream.write_all(request.as_bytes()).map_err(|e| unreachable(format!("{host}:{port}: {e}")))?;
                    let (status, headers, body) =
                        read_response(stream).map_err(|e| unreachable(format!("{host}:{port}{target}: {e}")))?;
                    return Ok(Fetched { status, headers, body, chain, certificate_problem });
                }
                Err(error) if verify && !self.strict => {
                    let reason = match &error {
                        openssl::ssl::HandshakeError::Failure(mid) => {
                            let result = mid.ssl().verify_result();
                            if result.as_raw() == 0 {
                                return Err(unreachable(format!("TLS with {host}:{port} failed: {}", mid.error())));
                            }
                            result.error_string().to_string()
                        }
                        other => return Err(unreachable(format!("TLS with {host}:{port} failed: {other}"))),
                    };
                    certificate_problem = Some(reason);
                }
                Err(error) => return Err(unreachable(format!("TLS with {host}:{port} failed: {error}"))),
            }
        }
        Err(unreachable(format!("TLS with {host}:{port} failed")))
    }
}

/// Status, headers and body.
type Response = (u16, Vec<(String, String)>, Vec<u8>);

fn read_response(stream: impl Read) -> Result<Response, FederationError> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| bad_answer(e.to_string()))?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| bad_answer(format!("not an HTTP response: {:?}", line.trim_end())))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).map_err(|e| bad_answer(e.to_string()))?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    let header = |name: &str| {
        headers.iter().find(|(n, _): &&(String, String)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            line.clear();
            reader.read_line(&mut line).map_err(|e| bad_answer(e.to_string()))?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad_answer("bad chunk size"))?;
            if size == 0 || body.len() + size > MAX_BODY {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..]).map_err(|e| bad_answer(e.to_string()))?;
            line.clear();
            reader.read_line(&mut line).map_err(|e| bad_answer(e.to_string()))?;
        }
    } else if let Some(length) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(length.min(MAX_BODY), 0);
        reader.read_exact(&mut body).map_err(|e| bad_answer(e.to_string()))?;
    } else {
        reader.take(MAX_BODY as u64).read_to_end(&mut body).map_err(|e| bad_answer(e.to_string()))?;
    }
    Ok((status, headers, body))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn connect_to_reads_curls_syntax() {
        let rule: ConnectTo = "example.org:443:127.0.0.1:8443".parse().unwrap();
        assert_eq!(
            rule,
            ConnectTo { host: "example.org".into(), port: Some(443), to_host: "127.0.0.1".into(), to_port: Some(8443) }
        );
        let v6: ConnectTo = "Example.org:8448:[::1]:9448".parse().unwrap();
        assert_eq!((v6.host.as_str(), v6.to_host.as_str(), v6.to_port), ("example.org", "::1", Some(9448)));
        let any_port: ConnectTo = "example.org::127.0.0.1:".parse().unwrap();
        assert_eq!((any_port.port, any_port.to_port), (None, None));
        assert!("example.org:443".parse::<ConnectTo>().is_err());
        assert!("example.org:x:127.0.0.1:1".parse::<ConnectTo>().is_err());
    }
}
