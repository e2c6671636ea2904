//! Errors the edge answers itself, rendered as Matrix JSON in one place.
//!
//! Web clients treat a text/plain or CORS-less error as a broken server, so
//! every local error carries `Content-Type: application/json`, the `errcode`
//! and `error` fields, and the CORS headers.

use crate::request::response::LocalResponse;
use bytes::Bytes;
use std::borrow::Cow;

/// The Matrix error codes the edge produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrCode {
    /// The endpoint does not exist here (404) or not for this method (405),
    /// or the request is malformed (400).
    Unrecognized,
    /// A body over the configured limit.
    TooLarge,
    /// Blocked by policy (admin API from outside the allow-list).
    Forbidden,
    /// Rate limited.
    LimitExceeded,
    /// Upstream trouble (502, 503, 504).
    Unknown,
    /// The resource is not configured (well-known documents).
    NotFound,
    /// A federation request without a valid signature of its origin.
    Unauthorized,
    /// A federation body that is not JSON.
    NotJson,
}

impl ErrCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrCode::Unrecognized => "M_UNRECOGNIZED",
            ErrCode::TooLarge => "M_TOO_LARGE",
            ErrCode::Forbidden => "M_FORBIDDEN",
            ErrCode::LimitExceeded => "M_LIMIT_EXCEEDED",
            ErrCode::Unknown => "M_UNKNOWN",
            ErrCode::NotFound => "M_NOT_FOUND",
            ErrCode::Unauthorized => "M_UNAUTHORIZED",
            ErrCode::NotJson => "M_NOT_JSON",
        }
    }
}

/// Ends the message of every federation gate refusal, so that `doctor` can
/// tell the edge's 401 from Synapse's.
pub const FEDERATION_REFUSAL_MARK: &str = "(refused by the edge)";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatrixError {
    pub status: u16,
    pub errcode: ErrCode,
    pub message: Cow<'static, str>,
    pub retry_after_ms: Option<u64>,
    /// Why the edge refused, when an errcode alone does not say (the
    /// access log's `edge_reason`; a [`Refused`]'s reason).
    pub reason: Option<&'static str>,
}

/// Why the edge answered a request for want of an upstream to take it.
/// Each is raised where it is decided, carried as the cause of Pingora's
/// error, and turned into Matrix JSON in one place ([`for_proxy_error`]),
/// so a shed request, an expired hold and a group with no worker up leave
/// with their own message, access-log reason and metric.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Every member was at its cap and the queue had no room.
    #[error("every {group} worker is busy and its queue is full")]
    QueueFull { group: String },
    /// The request waited the queue's whole timeout for a slot.
    #[error("no {group} worker had room within the queue's timeout")]
    QueueTimeout { group: String },
    /// The group has no member up to take it and no fallback, past the hold.
    #[error("no {group} worker came back within the hold")]
    NoUsableWorker { group: String },
    /// The process kept refusing connections for longer than the hold.
    #[error("the upstream refused connections for {waited_ms} ms, longer than the hold")]
    HoldExpired { waited_ms: u128 },
    /// `synapse.hold_limit` requests already wait.
    #[error("Synapse's main process refused the connection and enough requests wait for it already")]
    HoldFull,
    /// A named upstream (a site route) has no live member.
    #[error("no live member of upstream {name}")]
    NoLiveMember { name: String },
    /// The federation origin's queue for its turn at Synapse was full.
    #[error("{origin} has its share of Synapse in use and its queue full")]
    OriginQueueFull { origin: String },
    /// The federation origin's request waited the queue's whole timeout.
    #[error("{origin}'s request waited its queue's whole timeout for a turn at Synapse")]
    OriginQueueTimeout { origin: String },
}

impl Refused {
    /// Every reason, for metrics made at 0 and the docs.
    pub const REASONS: [&'static str; 8] = [
        "queue_full",
        "queue_timeout",
        "no_usable_worker",
        "hold_expired",
        "hold_full",
        "no_live_member",
        "origin_queue_full",
        "origin_queue_timeout",
    ];

    /// When a federation origin over its share may try again.
    const ORIGIN_RETRY_MS: u64 = 10_000;

    pub fn reason(&self) -> &'static str {
        match self {
            Refused::QueueFull { .. } => Self::REASONS[0],
            Refused::QueueTimeout { .. } => Self::REASONS[1],
            Refused::NoUsableWorker { .. } => Self::REASONS[2],
            Refused::HoldExpired { .. } => Self::REASONS[3],
            Refused::HoldFull => Self::REASONS[4],
            Refused::NoLiveMember { .. } => Self::REASONS[5],
            Refused::OriginQueueFull { .. } => Self::REASONS[6],
            Refused::OriginQueueTimeout { .. } => Self::REASONS[7],
        }
    }

    /// What the client reads: distinct for each, without naming the
    /// deployment's processes (the log line has the details).
    pub fn to_matrix(&self) -> MatrixError {
        let (status, message) = match self {
            Refused::QueueFull { .. } | Refused::QueueTimeout { .. } => {
                (503, "The homeserver is busy; try again shortly")
            }
            Refused::NoUsableWorker { .. } => {
                (503, "No homeserver process is up to answer this request; try again shortly")
            }
            Refused::HoldExpired { .. } | Refused::HoldFull => (503, "The homeserver is restarting; try again shortly"),
            Refused::NoLiveMember { .. } => (502, "The service behind this address could not be reached"),
            // Not 5xx: a sender's client counts those as the server failing.
            Refused::OriginQueueFull { .. } | Refused::OriginQueueTimeout { .. } => {
                let error = MatrixError::rate_limited(Self::ORIGIN_RETRY_MS);
                return MatrixError {
                    reason: Some(self.reason()),
                    message: "This server's requests already take their share of the homeserver; try again later"
                        .into(),
                    ..error
                };
            }
        };
        MatrixError { reason: Some(self.reason()), ..MatrixError::new(status, ErrCode::Unknown, message) }
    }

    /// As Pingora's error, with this as its cause.
    pub fn into_error(self) -> Box<pingora::Error> {
        let status = self.to_matrix().status;
        pingora::Error::because(pingora::ErrorType::HTTPStatus(status), self.to_string(), self)
    }
}

impl MatrixError {
    fn new(status: u16, errcode: ErrCode, message: impl Into<Cow<'static, str>>) -> Self {
        MatrixError { status, errcode, message: message.into(), retry_after_ms: None, reason: None }
    }

    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(400, ErrCode::Unrecognized, message)
    }

    pub fn unrecognized() -> Self {
        Self::new(404, ErrCode::Unrecognized, "Unrecognized request")
    }

    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(404, ErrCode::NotFound, message)
    }

    /// No site here answers this host: 421, so a browser that reused a
    /// connection for another name (HTTP/2 coalescing) retries on a new one.
    pub fn misdirected() -> Self {
        Self::new(421, ErrCode::Unrecognized, "No site here answers for this host")
    }

    pub fn method_not_allowed() -> Self {
        Self::new(405, ErrCode::Unrecognized, "Method not allowed")
    }

    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(403, ErrCode::Forbidden, message)
    }

    pub fn too_large(limit: u64) -> Self {
        Self::new(413, ErrCode::TooLarge, format!("Request body exceeds the limit of {limit} bytes"))
    }

    pub fn target_too_long(limit: u64) -> Self {
        Self::new(414, ErrCode::TooLarge, format!("Request target longer than {limit} bytes"))
    }

    pub fn headers_too_large(byte_limit: u64, count_limit: usize) -> Self {
        let message = format!("Request headers exceed {byte_limit} bytes or {count_limit} fields");
        Self::new(431, ErrCode::TooLarge, message)
    }

    pub fn request_timeout() -> Self {
        Self::new(408, ErrCode::Unknown, "The request was not received in time")
    }

    pub fn rate_limited(retry_after_ms: u64) -> Self {
        MatrixError {
            retry_after_ms: Some(retry_after_ms),
            ..Self::new(429, ErrCode::LimitExceeded, "Too many requests")
        }
    }

    pub fn bad_gateway() -> Self {
        Self::new(502, ErrCode::Unknown, "The homeserver could not be reached")
    }

    pub fn unavailable() -> Self {
        Self::new(503, ErrCode::Unknown, "The homeserver is temporarily unavailable")
    }

    pub fn gateway_timeout() -> Self {
        Self::new(504, ErrCode::Unknown, "The homeserver took too long to answer")
    }

    pub fn internal() -> Self {
        Self::new(500, ErrCode::Unknown, "Internal error in the edge proxy")
    }

    /// The federation gate's refusal: 401 `M_UNAUTHORIZED` as Synapse
    /// answers a bad signature, 403 for a denied server, 400 for a body
    /// that is not JSON. The message says the edge refused it.
    pub fn federation_refused(refusal: &crate::federation::gate::Refusal) -> Self {
        use crate::federation::gate::Refusal;
        let message = format!("{refusal} {FEDERATION_REFUSAL_MARK}");
        match refusal {
            Refusal::Denied(_) => Self::new(403, ErrCode::Forbidden, message),
            Refusal::NotJson => Self::new(400, ErrCode::NotJson, message),
            _ => Self::new(401, ErrCode::Unauthorized, message),
        }
    }

    /// The error for a bare status Pingora answered with before any hook
    /// ran (a head it could not parse, CONNECT).
    pub fn for_status(status: u16) -> Self {
        match status {
            405 => Self::method_not_allowed(),
            500..=599 => Self::internal(),
            _ => Self::new(status, ErrCode::Unrecognized, "Malformed request"),
        }
    }

    pub fn body(&self) -> Bytes {
        let mut body = serde_json::json!({ "errcode": self.errcode.as_str(), "error": self.message });
        if let Some(ms) = self.retry_after_ms {
            body["retry_after_ms"] = ms.into();
        }
        Bytes::from(body.to_string())
    }

    pub fn to_response(&self) -> LocalResponse {
        let mut response = LocalResponse::json(self.status, self.body()).with_cors();
        if let Some(ms) = self.retry_after_ms {
            response = response.with_header("Retry-After", ms.div_ceil(1000).to_string());
        }
        if self.status == 503 {
            response = response.with_header("Retry-After", "5".to_string());
        }
        response
    }
}

impl std::fmt::Display for MatrixError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.errcode.as_str(), self.message)
    }
}

impl std::error::Error for MatrixError {}

impl MatrixError {
    /// As Pingora's error, with this as its cause: answered as it is by
    /// [`for_proxy_error`].
    pub fn into_error(self) -> Box<pingora::Error> {
        pingora::Error::because(pingora::ErrorType::HTTPStatus(self.status), self.message.to_string(), self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_matrix_json() {
        let body: serde_json::Value = serde_json::from_slice(&MatrixError::too_large(10).body()).unwrap();
        assert_eq!(body["errcode"], "M_TOO_LARGE");
        assert!(body["error"].as_str().unwrap().contains("10 bytes"));
        let limited: serde_json::Value = serde_json::from_slice(&MatrixError::rate_limited(1500).body()).unwrap();
        assert_eq!(limited["retry_after_ms"], 1500);
    }

    #[test]
    fn rate_limit_response_rounds_retry_after_up() {
        let response = MatrixError::rate_limited(1500).to_response();
        assert!(response.headers.iter().any(|(k, v)| *k == "Retry-After" && v == "2"));
    }
}

/// The Matrix error for a failure inside the proxy, or `None` when the
/// client is gone and nothing can be sent.
pub fn for_proxy_error(e: &pingora::Error, body_limit: u64) -> Option<MatrixError> {
    use pingora::{ErrorSource, ErrorType::*};
    if let Some(refused) = e.root_cause().downcast_ref::<Refused>() {
        return Some(refused.to_matrix());
    }
    if let Some(error) = e.root_cause().downcast_ref::<MatrixError>() {
        return Some(error.clone());
    }
    let by_status = |code: u16| match code {
        413 => MatrixError::too_large(body_limit),
        400 => MatrixError::bad_request("Malformed request"),
        503 => MatrixError::unavailable(),
        504 => MatrixError::gateway_timeout(),
        500 => MatrixError::internal(),
        _ => MatrixError::bad_gateway(),
    };
    match e.etype() {
        HTTPStatus(code) => return Some(by_status(*code)),
        ConnectTimedout | ReadTimedout | WriteTimedout if e.esource() == &ErrorSource::Upstream => {
            return Some(MatrixError::gateway_timeout())
        }
        _ => {}
    }
    match e.esource() {
        ErrorSource::Upstream => Some(MatrixError::bad_gateway()),
        ErrorSource::Downstream => match e.etype() {
            ReadError | WriteError | ConnectionClosed => None,
            ReadTimedout => Some(MatrixError::request_timeout()),
            WriteTimedout => None,
            _ => Some(MatrixError::bad_request("Malformed request")),
        },
        ErrorSource::Internal | ErrorSource::Unset => Some(MatrixError::internal()),
    }
}

#[cfg(test)]
mod proxy_error_tests {
    use super::*;
    use pingora::{Error, ErrorSource, ErrorType};

    fn error(etype: ErrorType, source: ErrorSource) -> Box<Error> {
        let mut e = Error::new(etype);
        e.esource = source;
        e
    }

    #[test]
    fn upstream_failures_become_matrix_errors() {
        let refused = for_proxy_error(&error(ErrorType::ConnectRefused, ErrorSource::Upstream), 0).unwrap();
        assert_eq!((refused.status, refused.errcode), (502, ErrCode::Unknown));
        let slow = for_proxy_error(&error(ErrorType::ReadTimedout, ErrorSource::Upstream), 0).unwrap();
        assert_eq!(slow.status, 504);
        let big = for_proxy_error(&error(ErrorType::HTTPStatus(413), ErrorSource::Internal), 7).unwrap();
        assert_eq!((big.status, big.errcode), (413, ErrCode::TooLarge));
        assert!(for_proxy_error(&error(ErrorType::ConnectionClosed, ErrorSource::Downstream), 0).is_none());
    }

    #[test]
    fn refusals_are_told_apart_after_travelling_as_pingora_errors() {
        let group = "client_reader".to_string();
        let cases = [
            (Refused::QueueFull { group: group.clone() }, 503, "busy"),
            (Refused::QueueTimeout { group: group.clone() }, 503, "busy"),
            (Refused::NoUsableWorker { group }, 503, "No homeserver process is up"),
            (Refused::HoldExpired { waited_ms: 15_000 }, 503, "restarting"),
            (Refused::HoldFull, 503, "restarting"),
            (Refused::NoLiveMember { name: "livekit".into() }, 502, "could not be reached"),
            (Refused::OriginQueueFull { origin: "noisy.test".into() }, 429, "their share"),
            (Refused::OriginQueueTimeout { origin: "noisy.test".into() }, 429, "their share"),
        ];
        let mut reasons = Vec::new();
        for (refused, status, words) in cases {
            let reason = refused.reason();
            let answer = for_proxy_error(&refused.into_error(), 0).unwrap();
            assert_eq!((answer.status, answer.reason), (status, Some(reason)));
            assert!(answer.message.contains(words), "{reason}: {}", answer.message);
            assert!(!answer.message.contains("client_reader"), "the deployment leaks: {}", answer.message);
            reasons.push(reason);
        }
        assert_eq!(reasons, Refused::REASONS);
    }
}
