//! Responses the edge writes itself: well-known documents, preflights, errors.

use bytes::Bytes;
use pingora::http::ResponseHeader;

/// CORS as the Matrix spec recommends for client-facing endpoints.
pub const CORS_HEADERS: [(&str, &str); 3] = [
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, POST, PUT, DELETE, OPTIONS"),
    ("Access-Control-Allow-Headers", "X-Requested-With, Content-Type, Authorization"),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
    /// Close the connection afterwards (the request body was not read).
    pub close: bool,
}

impl LocalResponse {
    pub fn json(status: u16, body: Bytes) -> Self {
        LocalResponse { status, headers: vec![("Content-Type", "application/json".into())], body, close: false }
    }

    pub fn empty(status: u16) -> Self {
        LocalResponse { status, headers: Vec::new(), body: Bytes::new(), close: false }
    }

    pub fn with_cors(mut self) -> Self {
        for (name, value) in CORS_HEADERS {
            self.headers.push((name, value.to_string()));
        }
        self
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    /// The response head; `Content-Length` is the body's even for HEAD.
    /// Pingora adds `Connection` itself from the session's keep-alive state.
    pub fn header(&self) -> pingora::Result<ResponseHeader> {
        let mut header = ResponseHeader::build(self.status, Some(self.headers.len() + 2))?;
        for (name, value) in &self.headers {
            header.insert_header(*name, value.as_str())?;
        }
        header.insert_header("Content-Length", self.body.len().to_string())?;
        Ok(header)
    }

    /// The whole response as HTTP/1.1 bytes, closing the connection; for
    /// answers written below Pingora's HTTP layer.
    pub fn to_http1_closing(&self) -> Vec<u8> {
        let reason = http::StatusCode::from_u16(self.status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
        let mut out = format!("HTTP/1.1 {} {reason}\r\n", self.status);
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", self.body.len()));
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}
