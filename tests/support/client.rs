//! Raw clients: HTTP/1.1 bytes over TLS or TCP, and HTTP/2 over TLS, so a
//! test controls exactly what goes on the wire.

use openssl::ssl::{SslConnector, SslMethod, SslStream, SslVerifyMode};
use openssl::x509::X509;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn header_count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).count()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts a Matrix error: status, errcode, JSON content type and CORS.
    pub fn assert_matrix_error(&self, status: u16, errcode: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("content-type"), Some("application/json"), "{self:?}");
        assert_eq!(self.header("access-control-allow-origin"), Some("*"), "{self:?}");
        assert_eq!(self.header_count("access-control-allow-origin"), 1);
        let body = self.json();
        assert_eq!(body["errcode"], errcode, "{body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    }
}

pub fn connector(root_pem: &str, alpn: &[&str]) -> SslConnector {
    let mut builder = SslConnector::builder(SslMethod::tls()).unwrap();
    builder.set_verify(SslVerifyMode::PEER);
    builder.cert_store_mut().add_cert(X509::from_pem(root_pem.as_bytes()).unwrap()).unwrap();
    if !alpn.is_empty() {
        let mut wire = Vec::new();
        for proto in alpn {
            wire.push(proto.len() as u8);
            wire.extend_from_slice(proto.as_bytes());
        }
        builder.set_alpn_protos(&wire).unwrap();
    }
    builder.build()
}

pub fn tls_connect(addr: SocketAddr, sni: &str, root_pem: &str, alpn: &[&str]) -> SslStream<TcpStream> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    connector(root_pem, alpn).connect(sni, tcp).unwrap_or_else(|e| panic!("TLS to {addr} as {sni}: {e}"))
}

/// Reads one response; `head_only` for answers to HEAD.
pub fn read_response<R: Read>(reader: &mut BufReader<R>, head_only: bool) -> Option<Response> {
    let mut status_line = String::new();
    loop {
        status_line.clear();
        if reader.read_line(&mut status_line).ok()? == 0 {
            return None;
        }
        let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).ok()?;
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                break;
            }
            let (k, v) = line.split_once(':')?;
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        if (100..200).contains(&status) {
            continue;
        }
        let mut response = Response { status, headers, body: Vec::new() };
        if head_only || status == 204 || status == 304 {
            return Some(response);
        }
        if response.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let mut size = String::new();
                reader.read_line(&mut size).ok()?;
                let size = usize::from_str_radix(size.trim(), 16).ok()?;
                let mut chunk = vec![0; size + 2];
                reader.read_exact(&mut chunk).ok()?;
                if size == 0 {
                    break;
                }
                response.body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(length) = response.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            response.body = vec![0; length];
            reader.read_exact(&mut response.body).ok()?;
        } else {
            reader.read_to_end(&mut response.body).ok()?;
        }
        return Some(response);
    }
}

/// True when the peer closed the connection (EOF within the timeout).
pub fn is_closed<R: Read>(reader: &mut BufReader<R>) -> bool {
    let mut byte = [0u8; 1];
    matches!(reader.read(&mut byte), Ok(0))
}

/// One raw HTTP/1.1 exchange over TLS; returns the response and whether the
/// server closed the connection afterwards.
pub fn h1_tls(addr: SocketAddr, sni: &str, root_pem: &str, raw: &[u8]) -> (Response, bool) {
    let mut stream = tls_connect(addr, sni, root_pem, &["http/1.1"]);
    stream.write_all(raw).unwrap();
    stream.flush().unwrap();
    let head_only = raw.starts_with(b"HEAD ");
    let mut reader = BufReader::new(stream);
    let response = read_response(&mut reader, head_only).expect("no HTTP response");
    reader.get_mut().get_ref().set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let closed = is_closed(&mut reader);
    (response, closed)
}

/// One raw HTTP/1.1 exchange over plain TCP.
pub fn h1_plain(addr: SocketAddr, raw: &[u8]) -> (Response, bool) {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut writer = stream.try_clone().unwrap();
    writer.write_all(raw).unwrap();
    let mut reader = BufReader::new(stream);
    let response = read_response(&mut reader, raw.starts_with(b"HEAD ")).expect("no HTTP response");
    reader.get_ref().set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let closed = is_closed(&mut reader);
    (response, closed)
}

/// One value from the edge's Prometheus page: the first line starting with
/// `line_start` (a name, with its labels if any).
pub fn metric(metrics: SocketAddr, line_start: &str) -> Option<f64> {
    let (response, _) = h1_plain(metrics, &get("/metrics", "localhost"));
    let text = String::from_utf8(response.body).unwrap();
    text.lines().find(|line| line.starts_with(line_start)).and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

/// A simple GET request head for a target, with a Host header.
pub fn get(target: &str, host: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
}

/// One HTTP/2 request over TLS (ALPN h2). `body` is sent in 16 KiB pieces.
pub fn h2_tls(
    addr: SocketAddr,
    sni: &str,
    root_pem: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<Response, String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let ssl = connector(root_pem, &["h2"]).configure().unwrap().into_ssl(sni).unwrap();
        let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
        std::pin::Pin::new(&mut tls).connect().await.map_err(|e| e.to_string())?;
        assert_eq!(tls.ssl().selected_alpn_protocol(), Some(&b"h2"[..]), "server did not pick h2");
        let (mut client, connection) = h2::client::handshake(tls).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let uri = format!("https://{sni}{target}");
        let mut request = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request.body(()).map_err(|e| e.to_string())?;
        let (response, mut send) = client.send_request(request, body.is_none()).map_err(|e| e.to_string())?;
        let sender = async move {
            if let Some(body) = body {
                for piece in body.chunks(16384) {
                    send.reserve_capacity(piece.len());
                    let _ = std::future::poll_fn(|cx| send.poll_capacity(cx)).await;
                    if send.send_data(bytes::Bytes::copy_from_slice(piece), false).is_err() {
                        return;
                    }
                }
                let _ = send.send_data(bytes::Bytes::new(), true);
            }
        };
        let receiver = read_h2_response(response);
        let receiving = tokio::spawn(receiver);
        tokio::select! {
            _ = sender => {},
            _ = tokio::time::sleep(Duration::from_secs(30)) => {},
        }
        tokio::time::timeout(Duration::from_secs(30), receiving)
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?
    })
}

/// An HTTP/2 response with its whole body, the window released as it arrives.
async fn read_h2_response(response: h2::client::ResponseFuture) -> Result<Response, String> {
    let response = response.await.map_err(|e| e.to_string())?;
    let (parts, mut body) = response.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let headers = parts.headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect();
    Ok(Response { status: parts.status.as_u16(), headers, body: data })
}

/// GETs for all `targets` at once, as streams of one HTTP/2 connection over
/// TLS; the answers in the order of `targets`.
pub fn h2_tls_many(addr: SocketAddr, sni: &str, root_pem: &str, targets: &[&str]) -> Vec<Result<Response, String>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let ssl = connector(root_pem, &["h2"]).configure().unwrap().into_ssl(sni).unwrap();
        let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
        std::pin::Pin::new(&mut tls).connect().await.unwrap();
        // Until the server's SETTINGS arrive, h2 would open streams without
        // limit and the server refuses those past its own (RFC 9113 §5.1.2);
        // 100 is the least limit the RFC recommends a server to allow.
        let (client, connection) =
            h2::client::Builder::new().initial_max_send_streams(100).handshake::<_, bytes::Bytes>(tls).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut answers = Vec::new();
        for target in targets {
            let mut client = client.clone().ready().await.unwrap();
            let request = http::Request::get(format!("https://{sni}{target}")).body(()).unwrap();
            let (response, _) = client.send_request(request, true).unwrap();
            answers.push(tokio::spawn(read_h2_response(response)));
        }
        let mut results = Vec::new();
        for answer in answers {
            let result = tokio::time::timeout(Duration::from_secs(60), answer).await;
            results.push(match result {
                Ok(Ok(response)) => response,
                Ok(Err(join)) => Err(join.to_string()),
                Err(_) => Err("timed out".to_string()),
            });
        }
        results
    })
}

/// A TCP connection from a chosen loopback source address (127.0.0.2 and
/// up), for tests where the client's address matters.
pub fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let stream = socket.connect(addr).await.unwrap().into_std().unwrap();
        stream.set_nonblocking(false).unwrap();
        stream
    })
}
