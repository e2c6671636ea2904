//! The Pingora glue: each phase hands its work to a module and applies the
//! answer. Nothing here decides policy.

use crate::access::{admit, Admission, RequestFacts};
use crate::access_log;
use crate::edge::{Edge, Listener};
use crate::errors::MatrixError;
use crate::forward::prepare_upstream_request;
use crate::metrics::{self, METRICS};
use crate::ratelimit::RateFacts;
use crate::response::LocalResponse;
use crate::routes::Decision;
use crate::sticky::{self, KeySource};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// One listener's proxy logic; all listeners share the `Edge` snapshot cell.
pub struct EdgeProxy {
    pub listener: Listener,
    pub edge: Arc<ArcSwap<Edge>>,
}

pub struct RequestCtx {
    edge: Arc<Edge>,
    started: Instant,
    /// Where the router sent this request.
    decision: Option<Decision>,
    /// The pool member serving the current attempt, if a worker does.
    member: Option<usize>,
    /// Members already tried, so a retry goes elsewhere.
    tried: Tried,
    body_limit: u64,
    body_seen: u64,
    /// The error the edge answered with, for the access log.
    local_error: Option<MatrixError>,
    /// When Synapse's response header arrived, from `started`.
    upstream_time: Option<std::time::Duration>,
    request_id: RequestId,
}

/// Pool members tried by one request, kept inline: the request path
/// allocates nothing for it (retries past eight members may repeat one).
#[derive(Default, Clone, Copy)]
struct Tried {
    members: [usize; 8],
    len: usize,
}

impl Tried {
    fn push(&mut self, member: usize) {
        if self.len < self.members.len() {
            self.members[self.len] = member;
            self.len += 1;
        }
    }

    fn as_slice(&self) -> &[usize] {
        &self.members[..self.len]
    }
}

/// A short ID per request for correlating logs: a per-process prefix and a counter.
#[derive(Clone, Copy)]
struct RequestId(u64);

static REQUEST_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static PROCESS_PREFIX: once_cell::sync::Lazy<u64> = once_cell::sync::Lazy::new(|| {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    (u64::from(std::process::id()) << 32 | u64::from(nanos)) << 24
});

impl RequestId {
    fn next() -> RequestId {
        RequestId(*PROCESS_PREFIX ^ REQUEST_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip())
}

fn content_length(request: &RequestHeader) -> Option<u64> {
    let value = request.headers.get(http::header::CONTENT_LENGTH)?;
    value.to_str().ok()?.trim().parse().ok()
}

/// Whether a request announces a body (which a local answer leaves unread).
fn has_body(request: &RequestHeader, content_length: Option<u64>) -> bool {
    content_length.is_some_and(|n| n > 0) || request.headers.contains_key(http::header::TRANSFER_ENCODING)
}

/// The configured request rates; a refusal is a 429 with the wait.
fn rate_limit(edge: &Edge, session: &Session) -> std::result::Result<(), MatrixError> {
    if edge.rate_limits.is_empty() {
        return Ok(());
    }
    let request = session.req_header();
    let facts = RateFacts {
        is_post: request.method == http::Method::POST,
        target: request.raw_path(),
        client_ip: client_ip(session),
        authorization: request.headers.get(http::header::AUTHORIZATION).map(|v| v.as_bytes()),
    };
    edge.rate_limits.admit(&facts).map_err(|(class, wait)| {
        METRICS.rate_limited.with_label_values(&[class.name()]).inc();
        MatrixError::rate_limited(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1))
    })
}

async fn write_local(session: &mut Session, response: &LocalResponse) -> Result<()> {
    let head_only = session.req_header().method == http::Method::HEAD;
    if response.close {
        session.set_keepalive(None);
    }
    let header = response.header()?;
    let end = head_only || response.body.is_empty();
    session.write_response_header(Box::new(header), end).await?;
    if !end {
        session.write_response_body(Some(response.body.clone()), true).await?;
    }
    Ok(())
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    /// No downstream modules: Pingora's default adds a disabled compression
    /// module, which still costs an allocation and calls on every request.
    /// Synapse compresses what it wants compressed.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        METRICS.in_flight.inc();
        RequestCtx {
            edge: self.edge.load_full(),
            started: Instant::now(),
            decision: None,
            member: None,
            tried: Tried::default(),
            body_limit: 0,
            body_seen: 0,
            local_error: None,
            upstream_time: None,
            request_id: RequestId::next(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let edge = Arc::clone(&ctx.edge);
        crate::connections::head_complete(session);
        let request = session.req_header();
        let facts = RequestFacts {
            target: request.raw_path(),
            has_upgrade: request.headers.contains_key(http::header::UPGRADE),
            admin_allowed: edge.admin_allowed(client_ip(session)),
            content_length: content_length(request),
            header_bytes: request.headers.iter().map(|(name, value)| (name.as_str().len() + value.len()) as u64).sum(),
            header_count: request.headers.len(),
        };
        // Framing first (a request framed two ways is refused whatever its
        // path), then the listener's policy, then the rates.
        let raw_head = (request.version != http::Version::HTTP_2).then(|| session.as_downstream().to_h1_raw());
        let admission = match crate::framing::check(request.version, &request.headers, raw_head.as_deref()) {
            Err(reason) => Admission::Reject(MatrixError::bad_request(reason)),
            Ok(()) => match admit(&self.listener.roles, &facts, &edge.limits) {
                Admission::Forward { body_limit } => match rate_limit(&edge, session) {
                    Ok(()) => Admission::Forward { body_limit },
                    Err(error) => Admission::Reject(error),
                },
                other => other,
            },
        };
        let content_length = facts.content_length;
        let request = session.req_header();
        match admission {
            Admission::Forward { body_limit } => {
                ctx.body_limit = body_limit;
                ctx.decision = Some(edge.router.route(request.method.as_str(), request.raw_path()));
                session.set_read_timeout(Some(edge.connections.body_idle_timeout));
                Ok(false)
            }
            Admission::WellKnown(document) => {
                let mut response = edge.well_known.respond(document, &request.method);
                // The body of a request answered locally is never read.
                response.close = has_body(request, content_length);
                write_local(session, &response).await?;
                Ok(true)
            }
            Admission::Reject(error) => {
                let mut response = error.to_response();
                // A malformed request leaves the connection in doubt; an
                // unread body would be taken for the next request.
                response.close = error.status == 400 || has_body(request, content_length);
                ctx.local_error = Some(error);
                write_local(session, &response).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        let edge = Arc::clone(&ctx.edge);
        ctx.member = None;
        let Some(decision) = ctx.decision else { return Ok(edge.main.peer()) };
        let Some(pool) = edge.pools.get(decision.group) else { return Ok(edge.main.peer()) };
        let request = session.req_header();
        let source = KeySource {
            target: request.raw_path(),
            authorization: request.headers.get(http::header::AUTHORIZATION).map(|v| v.as_bytes()),
            client_ip: client_ip(session),
        };
        let key = sticky::key(decision.sticky, &source);
        match pool.pick(key.as_ref().map(|k| k.as_bytes()), ctx.tried.as_slice()) {
            Some(index) => {
                ctx.tried.push(index);
                ctx.member = Some(index);
                Ok(pool.members[index].upstream.peer())
            }
            None if decision.group.falls_back_to_main() => Ok(edge.main.peer()),
            None => Error::e_explain(ErrorType::HTTPStatus(503), format!("no live {} worker", decision.group)),
        }
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the worker, so any request may go to another one.
        if let (Some(decision), Some(member)) = (ctx.decision, ctx.member) {
            if let Some(pool) = ctx.edge.pools.get(decision.group) {
                log::debug!("connecting to worker {member} of {} failed: {e}", decision.group);
                pool.mark(member, false);
                e.set_retry(true);
            }
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        prepare_upstream_request(upstream_request, client_ip(session), self.listener.tls)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(chunk) = body {
            ctx.body_seen += chunk.len() as u64;
            if ctx.body_seen > ctx.body_limit {
                return Error::e_explain(ErrorType::HTTPStatus(413), "request body over the limit");
            }
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        let error = crate::errors::for_proxy_error(e, ctx.body_limit);
        let code = error.as_ref().map_or(0, |error| error.status);
        if let Some(error) = error {
            if session.response_written().is_none() {
                let response = error.to_response().closing();
                if let Err(write_error) = write_local(session, &response).await {
                    log::debug!("could not send the error response: {write_error}");
                }
            }
            ctx.local_error = Some(error);
        }
        FailToProxy { error_code: code, can_reuse_downstream: false }
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        _upstream_response: &mut pingora::http::ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_time = Some(ctx.started.elapsed());
        Ok(())
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        METRICS.in_flight.dec();
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.started.elapsed();
        let group = ctx.decision.map_or("edge", |d| d.group.name());
        let worker = worker_name(ctx);
        let request = session.req_header();
        METRICS
            .requests
            .with_label_values(&[group, worker, metrics::method_class(&request.method), status_label(status)])
            .inc();
        METRICS.latency.with_label_values(&[group]).observe(elapsed.as_secs_f64());
        if let Some(upstream) = ctx.upstream_time {
            METRICS.upstream_latency.with_label_values(&[group]).observe(upstream.as_secs_f64());
        }
        if let Some(error) = error {
            log::debug!("request {} failed: {error}", ctx.request_id);
        }
        if ctx.edge.access_log == access_log::AccessLogFormat::Off {
            // Nothing below is needed then; formatting the request ID alone
            // was a measurable share of this hook.
            return;
        }
        let header = |name: http::header::HeaderName| request.headers.get(name).and_then(|v| v.to_str().ok());
        let request_id = ctx.request_id.to_string();
        let entry = access_log::Entry {
            client: client_ip(session),
            method: request.method.as_str(),
            target: request.raw_path(),
            version: match request.version {
                http::Version::HTTP_2 => "HTTP/2.0",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            status,
            bytes: session.body_bytes_sent(),
            referer: header(http::header::REFERER),
            user_agent: header(http::header::USER_AGENT),
            group,
            worker,
            duration_ms: elapsed.as_millis(),
            upstream_ms: ctx.upstream_time.map(|t| t.as_millis()),
            request_id: &request_id,
            edge_error: ctx.local_error.as_ref().map(|e| e.errcode.as_str()),
        };
        if let Some(line) = access_log::line(ctx.edge.access_log, &entry, std::time::SystemTime::now()) {
            log::info!(target: "access", "{line}");
        }
    }
}

/// Status codes as static labels (bounded cardinality): common codes by
/// number, the rest by class, without allocating.
fn status_label(status: u16) -> &'static str {
    match status {
        0 => "none",
        101 => "101",
        200 => "200",
        204 => "204",
        206 => "206",
        301 => "301",
        302 => "302",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        413 => "413",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        _ => match status / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        },
    }
}

/// The worker label: its address, `main`, or `edge` for local answers.
fn worker_name(ctx: &RequestCtx) -> &str {
    match (ctx.decision, ctx.member) {
        (Some(decision), Some(member)) => {
            ctx.edge.pools.get(decision.group).map_or("-", |pool| pool.members[member].label.as_str())
        }
        (Some(_), None) => "main",
        _ => "edge",
    }
}
