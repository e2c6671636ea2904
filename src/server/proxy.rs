//! The Pingora glue: each phase hands its work to a module and applies the
//! answer. Nothing here decides policy.

use crate::config::sites::Balance;
use crate::edge::{Edge, Listener};
use crate::local::static_files::{FileAnswer, StaticAnswer};
use crate::observe::access_log;
use crate::observe::metrics::METRICS;
use crate::observe::request_metrics::{GroupMetrics, WorkerCounters};
use crate::request::admission::{admit, check_caps, path_of, Admission, RequestFacts};
use crate::request::errors::{MatrixError, Refused};
use crate::request::forward::prepare_upstream_request;
use crate::request::ratelimit::RateFacts;
use crate::request::response::LocalResponse;
use crate::sites::{Action, RouteFacts, RouteRef, Target};
use crate::synapse::sticky::{self, KeySource};
use crate::synapse::table::Decision;
use crate::upstream::named::UpstreamId;
use crate::upstream::pool::{Pool, Refusal, Slot};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::http::ResponseHeader;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::RetryType;
use pingora::{Error, ErrorType, Result};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// One listener's proxy logic; all listeners share the `Edge` snapshot cell.
pub struct EdgeProxy {
    pub listener: Listener,
    pub edge: Arc<ArcSwap<Edge>>,
    /// ACME HTTP-01 tokens on offer; outlives snapshots.
    pub challenges: crate::acme::SharedChallenges,
    /// Origins' signing keys for the federation gate; outlives snapshots.
    /// What outlives snapshots: the federation key cache and refusal log.
    pub runtime: Arc<crate::runtime::Runtime>,
}

pub struct RequestCtx {
    edge: Arc<Edge>,
    /// The client: the peer, the PROXY header's address, or the right-most
    /// untrusted `X-Forwarded-For` entry behind `trusted_proxies`.
    client: Option<IpAddr>,
    started: Instant,
    /// Where this request goes, decided once in `request_filter`.
    destination: Destination,
    /// Set when an upstream refused the connection: the request reached
    /// nothing, so it waits (`synapse.hold`) and tries again.
    held: Option<Hold>,
    /// A WebSocket is open through this request (counted in the gauge while it lives).
    websocket_open: Option<GaugeGuard>,
    /// Counts this request in `requests_in_flight` until the context is
    /// dropped, whichever way the request ends (logging may never run).
    _in_flight: GaugeGuard,
    /// The pool member serving the current attempt, if a worker does.
    member: Option<usize>,
    /// That member's slot: counts the attempt in its load until dropped.
    slot: Option<Slot>,
    /// A long-poll's own `timeout` (a sync waiting for news): counted apart
    /// and given that long plus a margin to answer.
    long_poll: Option<std::time::Duration>,
    /// Members already tried, so a retry goes elsewhere.
    tried: Tried,
    body_limit: u64,
    body_seen: u64,
    /// The error the edge answered with, for the access log.
    local_error: Option<MatrixError>,
    /// When Synapse's response header arrived, from `started`.
    upstream_time: Option<std::time::Duration>,
    request_id: RequestId,
    /// A signed federation body too large to read before choosing a worker:
    /// held here chunk by chunk and judged when complete, before any of it
    /// is sent on.
    gate_pending: Option<Vec<u8>>,
    /// The gate's refusal of such a body, answered by `fail_to_proxy`.
    gate_refusal: Option<MatrixError>,
}

/// Where a request goes: decided once, in `request_filter`, by the site's
/// router and Synapse's table; carried out by the later phases, which
/// match on it and decide nothing again.
#[derive(Debug, Clone, Copy)]
enum Destination {
    /// The edge answers (a local responder or a refusal), or nothing is decided yet.
    Edge,
    /// A Synapse process, as the table's decision says.
    Synapse(Decision),
    /// A named upstream, for a site route.
    Named(RouteRef, UpstreamId),
}

/// A request waiting for its upstream to accept connections again.
struct Hold {
    since: Instant,
    attempts: u32,
}

impl Hold {
    /// Counted in `requests_held` while it lives; `None` when `limit` wait already.
    fn start(limit: usize) -> Option<Hold> {
        let held = &METRICS.traffic.held;
        // Counted first, then checked: two requests arriving together can
        // never both take the last place (a check first could let both in).
        held.inc();
        if held.get() > i64::try_from(limit).unwrap_or(i64::MAX) {
            held.dec();
            return None;
        }
        Some(Hold { since: Instant::now(), attempts: 0 })
    }

    /// How long to wait before the next try: 100 ms doubling to 1 s, never
    /// past `limit` since the first refusal; `None` once it is spent.
    fn next_wait(&mut self, limit: std::time::Duration) -> Option<std::time::Duration> {
        let left = limit.checked_sub(self.since.elapsed()).filter(|left| !left.is_zero())?;
        let wait = std::time::Duration::from_millis(100 << self.attempts.min(4)).min(std::time::Duration::from_secs(1));
        self.attempts += 1;
        Some(wait.min(left))
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        METRICS.traffic.held.dec();
    }
}

/// One unit of a gauge, given back when dropped.
struct GaugeGuard(&'static prometheus::IntGauge);

impl GaugeGuard {
    fn new(gauge: &'static prometheus::IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
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

    /// Lets a member be picked again.
    fn forget(&mut self, member: usize) {
        if let Some(at) = self.as_slice().iter().position(|&m| m == member) {
            self.members.copy_within(at + 1..self.len, at);
            self.len -= 1;
        }
    }
}

/// An ID per request for correlating logs: the edge's own (a per-process
/// prefix and a counter, as 16 hex digits), or the one a trusted proxy in
/// front gave it. Rendered once: the header to the upstream and the access
/// line read the same text.
enum RequestId {
    Own([u8; 16]),
    Kept(Box<str>),
}

static REQUEST_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static PROCESS_PREFIX: once_cell::sync::Lazy<u64> = once_cell::sync::Lazy::new(|| {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    (u64::from(std::process::id()) << 32 | u64::from(nanos)) << 24
});

impl RequestId {
    fn next() -> RequestId {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let id = *PROCESS_PREFIX ^ REQUEST_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut text = [0u8; 16];
        for (at, digit) in text.iter_mut().enumerate() {
            *digit = HEX[((id >> (60 - 4 * at)) & 0xf) as usize];
        }
        RequestId::Own(text)
    }

    fn as_str(&self) -> &str {
        match self {
            // Hex digits only, so always UTF-8.
            RequestId::Own(text) => std::str::from_utf8(text).unwrap_or_default(),
            RequestId::Kept(text) => text,
        }
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The connection's peer: the PROXY header's client when a balancer sent one.
fn peer_ip(session: &Session) -> Option<IpAddr> {
    session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip())
}

static X_FORWARDED_FOR: http::header::HeaderName = http::header::HeaderName::from_static("x-forwarded-for");

fn content_length(request: &RequestHeader) -> Option<u64> {
    let value = request.headers.get(http::header::CONTENT_LENGTH)?;
    value.to_str().ok()?.trim().parse().ok()
}

/// Whether a request announces a body (which a local answer leaves unread).
fn has_body(request: &RequestHeader, content_length: Option<u64>) -> bool {
    content_length.is_some_and(|n| n > 0) || request.headers.contains_key(http::header::TRANSFER_ENCODING)
}

/// The configured request rates; a refusal is a 429 with the wait.
async fn rate_limit(
    edge: &Edge,
    session: &Session,
    client: Option<IpAddr>,
    verified_origin: Option<&str>,
) -> std::result::Result<(), MatrixError> {
    if edge.policy.rate_limits.is_empty() {
        return Ok(());
    }
    let request = session.req_header();
    let facts = RateFacts {
        is_post: request.method == http::Method::POST,
        target: request.raw_path(),
        client_ip: client,
        authorization: request.headers.get(http::header::AUTHORIZATION).map(|v| v.as_bytes()),
        verified_origin: verified_origin.map(str::as_bytes),
    };
    let outcome = match &edge.policy.shared_limits {
        Some(shared) => crate::upstream::shared_limits::admit_shared(&edge.policy.rate_limits, shared, &facts).await,
        None => edge.policy.rate_limits.admit(&facts),
    };
    outcome.map_err(|(class, wait)| {
        crate::request::ratelimit::RATE_LIMITED[class as usize].inc();
        MatrixError::rate_limited(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1))
    })
}

/// Writes an answer the edge gives itself. One that leaves a request body
/// unread (`close`) then reads and drops that body, unless the request was
/// malformed (400): the body of a request framed two ways may hold a
/// smuggled request and is not to be consumed as one.
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
    let request = session.req_header();
    if response.close && response.status != 400 && has_body(request, content_length(request)) {
        discard_request_body(session).await;
    }
    Ok(())
}

/// Answers with a Matrix error. A malformed request leaves the connection
/// in doubt, and an unread body would be taken for the next request: both close.
async fn refuse(
    session: &mut Session,
    ctx: &mut RequestCtx,
    error: MatrixError,
    content_length: Option<u64>,
) -> Result<bool> {
    let mut response = error.to_response();
    response.close = error.status == 400 || has_body(session.req_header(), content_length);
    ctx.local_error = Some(error);
    write_local(session, &response).await?;
    Ok(true)
}

/// How long and how much the edge keeps reading (and dropping) of a refused
/// request body: in all and per read (nginx's `lingering_time` and
/// `lingering_timeout`), and a byte cap so a client that never stops
/// sending costs a bounded amount of work, not 30 s at line rate.
const DISCARD_TIME: std::time::Duration = std::time::Duration::from_secs(30);
const DISCARD_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
const DISCARD_BYTES: u64 = 128 << 20;

/// Reads and drops the rest of a request body after an early answer, so
/// that a client that writes its whole body before reading (most HTTP
/// libraries, browsers, curl) still reads the answer.
/// - HTTP/1.1: closing with unread bytes makes the kernel send a reset,
///   which destroys the answer in the client's receive buffer.
/// - HTTP/2: dropping the stream early resets it with NO_ERROR, which RFC
///   9113 §8.1 allows, but curl 7.88 (Debian 12's) then discards the answer.
///   Reading gives the flow-control window back as it goes, so the stream
///   ends cleanly when the client finishes; the connection's other streams
///   are served meanwhile. Past a limit the stream is reset as before.
async fn discard_request_body(session: &mut Session) {
    if session.req_header().version != http::Version::HTTP_2 {
        crate::server::connections::half_close(session);
    }
    let drain = async {
        let mut discarded = 0u64;
        while discarded <= DISCARD_BYTES {
            match tokio::time::timeout(DISCARD_READ_TIMEOUT, session.read_request_body()).await {
                Ok(Ok(Some(chunk))) => discarded += chunk.len() as u64,
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIME, drain).await;
}

/// The host a request names: `:authority` on HTTP/2, else `Host`.
fn request_host(request: &RequestHeader) -> Option<&[u8]> {
    if request.version == http::Version::HTTP_2 {
        if let Some(authority) = request.uri.authority() {
            return Some(authority.as_str().as_bytes());
        }
    }
    request.headers.get(http::header::HOST).map(|v| v.as_bytes())
}

/// A member of the named upstream a site route forwards to.
async fn named_peer(
    edge: &Edge,
    (at, id): (RouteRef, UpstreamId),
    session: &Session,
    ctx: &mut RequestCtx,
) -> Result<Box<HttpPeer>> {
    let route = edge.sites.route(at);
    let upstream = edge.upstreams.get(id);
    let mut octets = [0u8; 16];
    let key = match (upstream.balance, ctx.client) {
        (Balance::ClientIp, Some(std::net::IpAddr::V4(ip))) => {
            octets[..4].copy_from_slice(&ip.octets());
            Some(&octets[..4])
        }
        (Balance::ClientIp, Some(std::net::IpAddr::V6(ip))) => {
            octets = ip.octets();
            Some(&octets[..])
        }
        _ => None,
    };
    let upgrading = session.req_header().headers.contains_key(http::header::UPGRADE);
    let slot = match upstream.pool.acquire(key, ctx.tried.as_slice(), upgrading).await {
        Ok(slot) => slot,
        Err(Refusal::NoneLive) => return Err(Refused::NoLiveMember { name: upstream.name.clone() }.into_error()),
        Err(refusal) => return shed(&upstream.pool, refusal),
    };
    let mut peer = take_slot(&upstream.pool, slot, ctx);
    if let (Some(idle), true) = (route.websocket_idle, upgrading) {
        peer.options.read_timeout = Some(idle);
        peer.options.write_timeout = Some(idle);
    }
    Ok(peer)
}

/// The two addresses of a TCP connection to an upstream, to recognise its
/// descriptor later.
fn tcp_connection(
    fd: std::os::unix::io::RawFd,
    digest: Option<&pingora::protocols::Digest>,
) -> Option<crate::upstream::state::Connection> {
    let socket = digest?.socket_digest.as_ref()?;
    let local = *socket.local_addr()?.as_inet()?;
    let peer = *socket.peer_addr()?.as_inet()?;
    Some(crate::upstream::state::Connection { fd, local, peer })
}

/// The 503 for a request no member had room for (Matrix JSON, Retry-After, CORS).
fn shed(pool: &Pool, refusal: Refusal) -> Result<Box<HttpPeer>> {
    METRICS.balancing.shed.with_label_values(&[&pool.label, refusal.reason()]).inc();
    let group = pool.label.clone();
    Err(match refusal {
        Refusal::QueueTimeout => Refused::QueueTimeout { group },
        Refusal::QueueFull | Refusal::NoneLive => Refused::QueueFull { group },
    }
    .into_error())
}

/// Sends this attempt to the slot's member, with the pool's time to answer:
/// a long-poll its own timeout plus the margin, anything else the pool's
/// `response_timeout` (else the upstream's read timeout).
fn take_slot(pool: &Pool, slot: Slot, ctx: &mut RequestCtx) -> Box<HttpPeer> {
    let index = slot.member;
    if ctx.tried.as_slice().is_empty() {
        pool.shared.deposit_retry_token();
    }
    ctx.tried.push(index);
    ctx.member = Some(index);
    ctx.slot = Some(slot);
    let mut peer = pool.members[index].upstream.peer();
    let answer_within = match ctx.long_poll {
        Some(timeout) => Some(timeout + pool.balancing.long_poll_margin),
        None => pool.balancing.response_timeout,
    };
    if let Some(limit) = answer_within {
        peer.options.read_timeout = Some(peer.options.read_timeout.map_or(limit, |read| read.min(limit)));
    }
    peer
}

/// The pool serving this request's destination, if any.
fn pool_of(ctx: &RequestCtx) -> Option<&Pool> {
    match ctx.destination {
        Destination::Named(_, id) => Some(&ctx.edge.upstreams.get(id).pool),
        Destination::Synapse(decision) => ctx.edge.pools.get(decision.group),
        Destination::Edge => None,
    }
}

/// Streams the chosen bytes of a static file, a bounded chunk at a time,
/// so memory stays flat whatever the file's size.
async fn send_file(session: &mut Session, file: &FileAnswer, head_only: bool, close: bool) -> Result<()> {
    const CHUNK: u64 = 64 << 10;
    let mut header = ResponseHeader::build(file.status, Some(file.headers.len() + 1))?;
    for (name, value) in &file.headers {
        header.insert_header(*name, value.as_str())?;
    }
    if file.status != 304 {
        header.insert_header("Content-Length", file.length.to_string())?;
    }
    if close {
        session.set_keepalive(None);
    }
    let no_body = head_only || file.length == 0;
    session.write_response_header(Box::new(header), no_body).await?;
    if no_body {
        return Ok(());
    }
    let read_error = |e: std::io::Error| Error::because(ErrorType::ReadError, "reading a static file", e);
    let mut reader = tokio::fs::File::open(&file.file).await.map_err(read_error)?;
    reader.seek(std::io::SeekFrom::Start(file.offset)).await.map_err(read_error)?;
    let mut remaining = file.length;
    while remaining > 0 {
        let mut chunk = bytes::BytesMut::with_capacity(remaining.min(CHUNK) as usize);
        let read = reader.read_buf(&mut chunk).await.map_err(read_error)?;
        if read == 0 {
            return Error::e_explain(ErrorType::ReadError, "a static file shrank while it was being sent");
        }
        remaining = remaining.saturating_sub(read as u64);
        session.write_response_body(Some(chunk.freeze()), remaining == 0).await?;
    }
    Ok(())
}

/// The largest federation body read before a worker is chosen: Pingora
/// keeps this much to send on (its retry buffer), so a refused request
/// sends nothing at all.
const PREREAD_BODY: u64 = 64 * 1024;

/// Reads a request's whole body (at most `limit` bytes), keeping it in
/// Pingora's retry buffer, from which it is sent on unchanged.
async fn read_whole_body(
    session: &mut Session,
    limit: u64,
    idle: std::time::Duration,
) -> std::result::Result<Vec<u8>, MatrixError> {
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue && session.write_continue_response().await.is_err() {
        return Err(MatrixError::bad_request("the connection failed"));
    }
    session.enable_retry_buffering();
    let mut body = Vec::new();
    loop {
        match tokio::time::timeout(idle, session.read_request_body()).await {
            Ok(Ok(Some(chunk))) => {
                body.extend_from_slice(&chunk);
                if body.len() as u64 > limit {
                    return Err(MatrixError::too_large(limit));
                }
            }
            Ok(Ok(None)) => return Ok(body),
            Ok(Err(_)) => return Err(MatrixError::bad_request("the request body could not be read")),
            Err(_) => return Err(MatrixError::request_timeout()),
        }
    }
}

/// Counts and logs the gate's verdict; the refusal to answer in enforce mode.
fn settle_verdict(
    gate: &crate::federation::gate::Gate,
    verdict: crate::federation::gate::Verdict,
    request_id: &RequestId,
    refusals: &crate::federation::recent::RecentRefusals,
) -> std::result::Result<Option<String>, MatrixError> {
    use crate::federation::counters;
    use crate::federation::gate::{Mode, Verdict};
    match verdict {
        Verdict::Verified(origin) => {
            counters::verified();
            Ok(Some(origin))
        }
        Verdict::Unverifiable { origin, reason } => {
            counters::unverifiable(reason);
            log::info!("request {request_id}: federation request from {origin} passed unverified ({reason})");
            Ok(None)
        }
        Verdict::Refused { origin, refusal } => {
            counters::refused(refusal.reason());
            let enforced = gate.mode == Mode::Enforce;
            let action = if enforced { "refused" } else { "would be refused (observe)" };
            log::warn!("request {request_id}: federation request {action}: {refusal}");
            refusals.note(origin.as_deref(), refusal.reason(), &refusal.to_string(), enforced);
            if enforced {
                Err(MatrixError::federation_refused(&refusal))
            } else {
                Ok(None)
            }
        }
    }
}

impl EdgeProxy {
    /// A request for a site route: admitted there, then forwarded to its
    /// upstream or answered by its local responder.
    async fn site_request(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        edge: &Edge,
        at: RouteRef,
        client: Option<IpAddr>,
        content_length: Option<u64>,
    ) -> Result<bool> {
        let request = session.req_header();
        let route_facts = RouteFacts {
            target: request.raw_path(),
            upgrade: request.headers.get(http::header::UPGRADE).map(|v| v.as_bytes()),
            client,
            content_length,
        };
        let body_limit = match edge.sites.admit_route(at, &route_facts, &edge.policy.limits) {
            Ok(limit) => limit,
            Err(error) => return refuse(session, ctx, error, content_length).await,
        };
        let upgrade = route_facts.upgrade.is_some();
        let route = edge.sites.route(at);
        let closing = has_body(request, content_length);
        match &route.action {
            Action::Upstream(id) => {
                ctx.destination = Destination::Named(at, *id);
                ctx.body_limit = body_limit;
                let idle = match route.websocket_idle {
                    Some(idle) if upgrade => idle,
                    _ => edge.policy.connections.body_idle_timeout,
                };
                session.set_read_timeout(Some(idle));
                Ok(false)
            }
            Action::Redirect(redirect) => {
                let mut response = redirect.respond(request.raw_path());
                response.close = closing;
                write_local(session, &response).await?;
                Ok(true)
            }
            Action::Static(root) => {
                let path = path_of(request.raw_path());
                let below = route.rewritten_target(path);
                let answer = root.resolve(&request.method, below.as_deref().unwrap_or(path), &request.headers);
                let head_only = request.method == http::Method::HEAD;
                match answer {
                    StaticAnswer::File(file) => send_file(session, &file, head_only, closing).await?,
                    StaticAnswer::AddSlash(mut location) => {
                        if let Some(query) = request.uri.query() {
                            location.push('?');
                            location.push_str(query);
                        }
                        let mut response = LocalResponse::empty(301).with_header("Location", location);
                        response.close = closing;
                        write_local(session, &response).await?;
                    }
                    StaticAnswer::Refuse(error) => return refuse(session, ctx, error, content_length).await,
                }
                Ok(true)
            }
        }
    }

    /// Synapse's paths on the Matrix site: the listener's policy, the
    /// federation gate, then the rates.
    async fn matrix_admission(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        edge: &Edge,
        admission: Admission,
        client: Option<IpAddr>,
    ) -> Admission {
        match admission {
            Admission::Forward { body_limit } => {
                let verified = match self.federation_gate(session, ctx, edge, body_limit).await {
                    Ok(verified) => verified,
                    Err(error) => return Admission::Reject(error),
                };
                match rate_limit(edge, session, client, verified.as_deref()).await {
                    Ok(()) => Admission::Forward { body_limit },
                    Err(error) => Admission::Reject(error),
                }
            }
            other => other,
        }
    }

    /// The federation gate, for a signed endpoint when it is on: the
    /// verified origin, `None` when nothing was verified, or the refusal
    /// (enforce mode). A body up to `PREREAD_BODY` is read here, so a
    /// refused request reaches no worker at all; a larger one is judged in
    /// `request_body_filter` before any of it is sent on.
    async fn federation_gate(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        edge: &Edge,
        body_limit: u64,
    ) -> std::result::Result<Option<String>, MatrixError> {
        let Some(gate) = &edge.policy.federation_gate else { return Ok(None) };
        let request = session.req_header();
        if !crate::federation::gate::is_signed_endpoint(path_of(request.raw_path())) {
            return Ok(None);
        }
        let length = content_length(request);
        let body = if has_body(request, length) {
            if length.is_none_or(|n| n > PREREAD_BODY) {
                ctx.gate_pending = Some(Vec::new());
                return Ok(None);
            }
            read_whole_body(session, body_limit, edge.policy.connections.body_idle_timeout).await?
        } else {
            Vec::new()
        };
        let request = session.req_header();
        let verdict = gate
            .judge(
                &self.runtime.federation_keys,
                request.method.as_str(),
                request.raw_path(),
                request.headers.get_all(http::header::AUTHORIZATION).iter().map(|v| v.as_bytes()),
                &body,
            )
            .await;
        settle_verdict(gate, verdict, &ctx.request_id, &self.runtime.federation_refusals)
    }

    /// Applies the Matrix admission: the worker table, a well-known document or a refusal.
    async fn matrix_request(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        edge: &Edge,
        admission: Admission,
        content_length: Option<u64>,
    ) -> Result<bool> {
        let request = session.req_header();
        match admission {
            Admission::Forward { body_limit } => {
                ctx.body_limit = body_limit;
                ctx.destination = Destination::Synapse(edge.router.route(request.method.as_str(), request.raw_path()));
                ctx.long_poll = crate::synapse::long_poll::long_poll_timeout(request.raw_path());
                session.set_read_timeout(Some(edge.policy.connections.body_idle_timeout));
                Ok(false)
            }
            Admission::WellKnown(document) => {
                let mut response = edge.well_known.respond(document, &request.method);
                // The body of a request answered locally is never read.
                response.close = has_body(request, content_length);
                write_local(session, &response).await?;
                Ok(true)
            }
            Admission::Preflight(kind) => {
                let mut response = crate::local::preflight::answer(kind);
                response.close = has_body(request, content_length);
                write_local(session, &response).await?;
                Ok(true)
            }
            Admission::Reject(error) => refuse(session, ctx, error, content_length).await,
        }
    }
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    /// No downstream modules: Pingora's default adds a disabled compression
    /// module, which still costs an allocation and calls on every request.
    /// Synapse compresses what it wants compressed.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            _in_flight: GaugeGuard::new(&METRICS.traffic.in_flight),
            edge: self.edge.load_full(),
            started: Instant::now(),
            destination: Destination::Edge,
            held: None,
            websocket_open: None,
            member: None,
            slot: None,
            long_poll: None,
            tried: Tried::default(),
            body_limit: 0,
            body_seen: 0,
            local_error: None,
            upstream_time: None,
            request_id: RequestId::next(),
            client: None,
            gate_pending: None,
            gate_refusal: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let edge = Arc::clone(&ctx.edge);
        crate::server::connections::head_complete(session);
        let request = session.req_header();
        let peer = peer_ip(session);
        let forwarding = &edge.policy.forwarding;
        let client = if forwarding.trusted_proxies.is_empty() {
            peer
        } else {
            let forwarded = request.headers.get_all(&X_FORWARDED_FOR).iter().map(|v| v.as_bytes());
            let given_id = forwarding.request_id_header.as_ref().and_then(|name| request.headers.get(name));
            if let Some(kept) = forwarding.kept_request_id(peer, given_id.map(|v| v.as_bytes())) {
                ctx.request_id = RequestId::Kept(kept.into_boxed_str());
            }
            crate::request::forward::client_behind_proxies(peer, forwarded, &forwarding.trusted_proxies)
        };
        ctx.client = client;
        let facts = RequestFacts {
            target: request.raw_path(),
            has_upgrade: request.headers.contains_key(http::header::UPGRADE),
            admin_allowed: edge.admin_allowed(client),
            mas_api_allowed: edge.mas_api_allowed(client),
            is_options: request.method == http::Method::OPTIONS,
            content_length: content_length(request),
            header_bytes: request.headers.iter().map(|(name, value)| (name.as_str().len() + value.len()) as u64).sum(),
            header_count: request.headers.len(),
        };
        // Framing first: a request framed two ways is refused whatever its
        // site or path.
        let raw_head = (request.version != http::Version::HTTP_2).then(|| session.as_downstream().to_h1_raw());
        let framing = crate::server::connections::request_line_verdict(session)
            .and_then(|()| crate::server::framing::check(request.version, &request.headers, raw_head.as_deref()));
        if let Err(reason) = framing {
            return refuse(session, ctx, MatrixError::bad_request(reason), facts.content_length).await;
        }
        let (_, target) = edge.sites.target(&self.listener.roles, request_host(request), path_of(facts.target));
        if let Target::Matrix = target {
            let content_length = facts.content_length;
            let admission = admit(&self.listener.roles, &facts, &edge.policy.limits);
            let admission = self.matrix_admission(session, ctx, &edge, admission, client).await;
            return self.matrix_request(session, ctx, &edge, admission, content_length).await;
        }
        // Matrix admission checks the caps itself; every other target here.
        let at = match (check_caps(&facts, &edge.policy.limits), target) {
            (Err(error), _) => return refuse(session, ctx, error, facts.content_length).await,
            (Ok(()), Target::Route(at, _)) => at,
            (Ok(()), Target::AcmeChallenge(token)) => {
                let mut response = crate::local::plain_http::challenge(self.challenges.answer(token));
                response.close = has_body(request, facts.content_length);
                write_local(session, &response).await?;
                return Ok(true);
            }
            (Ok(()), Target::ToHttps) => {
                let mut response = crate::local::plain_http::to_https(
                    request_host(request),
                    edge.policy.https_port,
                    request.raw_path(),
                );
                response.close |= has_body(request, facts.content_length);
                write_local(session, &response).await?;
                return Ok(true);
            }
            (Ok(()), Target::UnknownHost) => {
                return refuse(session, ctx, MatrixError::misdirected(), facts.content_length).await
            }
            (Ok(()), _) => {
                let error = MatrixError::not_found("Nothing is served at this path");
                return refuse(session, ctx, error, facts.content_length).await;
            }
        };
        self.site_request(session, ctx, &edge, at, client, facts.content_length).await
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        let edge = Arc::clone(&ctx.edge);
        ctx.member = None;
        // The previous attempt's slot goes back before this one takes one.
        ctx.slot = None;
        if let Some(hold) = &mut ctx.held {
            match hold.next_wait(edge.policy.hold) {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return Err(Refused::HoldExpired { waited_ms: hold.since.elapsed().as_millis() }.into_error()),
            }
        }
        let decision = match ctx.destination {
            Destination::Named(at, id) => return named_peer(&edge, (at, id), session, ctx).await,
            Destination::Synapse(decision) => decision,
            // `request_filter` answered these itself; fail closed if one gets here.
            Destination::Edge => {
                return Error::e_explain(ErrorType::InternalError, "no upstream was decided for this request")
            }
        };
        let Some(pool) = edge.pools.get(decision.group) else { return Ok(edge.main.peer()) };
        let request = session.req_header();
        let source = KeySource {
            target: request.raw_path(),
            authorization: request.headers.get(http::header::AUTHORIZATION).map(|v| v.as_bytes()),
            client_ip: ctx.client,
        };
        let key = sticky::key(decision.sticky, &source);
        let upgrading = request.headers.contains_key(http::header::UPGRADE);
        let long_poll = ctx.long_poll.is_some() || upgrading;
        loop {
            match pool.acquire(key.as_ref().map(|k| k.as_bytes()), ctx.tried.as_slice(), long_poll).await {
                Ok(slot) => return Ok(take_slot(pool, slot, ctx)),
                Err(Refusal::NoneLive) if decision.group.falls_back_to_main() => return Ok(edge.main.peer()),
                // A group with no fallback (media, SSO, MAS) and no member to
                // take the request (restarting, drained): nothing was sent,
                // so it waits for one as a request to a restarting main does.
                Err(Refusal::NoneLive) => {
                    if ctx.held.is_none() && !edge.policy.hold.is_zero() {
                        ctx.held = Hold::start(edge.policy.hold_limit);
                    }
                    let wait = ctx.held.as_mut().and_then(|hold| hold.next_wait(edge.policy.hold));
                    let Some(wait) = wait else {
                        return Err(Refused::NoUsableWorker { group: decision.group.to_string() }.into_error());
                    };
                    // Members refused before reached nothing: they may take it once back.
                    ctx.tried = Tried::default();
                    tokio::time::sleep(wait).await;
                }
                Err(refusal) => return shed(pool, refusal),
            }
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
        // A refused connection reached nothing: any request may wait for
        // its process to come back (a restart) and try again. A worker's
        // refusal sends the request to another member (or main) at once,
        // below; main has no other.
        let to_main = ctx.member.is_none() && matches!(ctx.destination, Destination::Synapse(_));
        if to_main && matches!(e.etype(), ErrorType::ConnectRefused) && !ctx.edge.policy.hold.is_zero() {
            if ctx.held.is_none() {
                match Hold::start(ctx.edge.policy.hold_limit) {
                    Some(hold) => ctx.held = Some(hold),
                    None => return Refused::HoldFull.into_error(),
                }
            }
            e.set_retry(true);
        }
        let Some(member) = ctx.member else { return e };
        let Some(pool) = pool_of(ctx) else { return e };
        log::debug!("connecting to member {member} of {} failed: {e}", pool.label);
        // Without active checks nothing would bring a named upstream's
        // member back up; the retry avoids it for this request all the same.
        let checked = match ctx.destination {
            Destination::Named(_, id) => ctx.edge.upstreams.get(id).health.is_some(),
            _ => true,
        };
        if checked {
            pool.mark_unreachable(member);
        }
        pool.failed(member);
        if pool.shared.take_retry() {
            e.set_retry(true);
        } else {
            METRICS.balancing.retries_denied.with_label_values(&[&pool.label]).inc();
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("peer {peer}"));
        // A request that may have reached the upstream is sent again only if
        // repeating it is harmless: idempotent method, body still buffered,
        // nothing answered to the client yet.
        let repeatable = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated()
            && session.response_written().is_none();
        // Pingora marks failures of the connection itself (closed, reset,
        // before a response header) as retryable on a reused connection only.
        let connection_failed = matches!(e.retry, RetryType::ReusedOnly);
        e.set_retry(false);
        if let Some(slot) = &mut ctx.slot {
            slot.settle();
        }
        let pool = pool_of(ctx);
        let timed_out = matches!(e.etype(), ErrorType::ReadTimedout) && session.response_written().is_none();
        if let (Some(pool), Some(member), true) = (pool, ctx.member, timed_out) {
            pool.failed(member);
        }
        // Past a deliberate limit (a long-poll's own timeout plus the
        // margin, or the pool's response_timeout) the request may try
        // another member; past the general read timeout it is answered 504.
        let timed_out =
            timed_out && (ctx.long_poll.is_some() || pool.is_some_and(|p| p.balancing.response_timeout.is_some()));
        // A member taken out while this request waited on it (a stall):
        // its connection was cut on purpose, and the request goes elsewhere.
        let taken_out = match (pool, ctx.member) {
            (Some(pool), Some(member)) => !pool.is_usable(member),
            _ => false,
        };
        if repeatable && (taken_out || timed_out) && ctx.member.is_some() {
            let budget = taken_out || pool.is_some_and(|pool| pool.shared.take_retry());
            if budget {
                e.set_retry(true);
            } else if let Some(pool) = pool {
                METRICS.balancing.retries_denied.with_label_values(&[&pool.label]).inc();
            }
        } else if repeatable && connection_failed {
            if client_reused {
                // A pooled connection the upstream closed while idle
                // (Twisted's ~60 s race) says nothing about the member, which
                // may be the only one or the sticky one: it stays eligible.
                if let Some(member) = ctx.member {
                    ctx.tried.forget(member);
                }
                e.set_retry(true);
            } else if ctx.member.is_some() {
                // A fresh connection that failed: the worker itself is in
                // trouble (killed, restarting). Like nginx's default
                // `proxy_next_upstream error`, the request goes to another
                // member (this one stays on the tried list), or to main
                // where the group falls back.
                e.set_retry(true);
            }
        }
        e
    }

    async fn connected_to_upstream(
        &self,
        session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        fd: std::os::unix::io::RawFd,
        digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(slot) = &mut ctx.slot {
            // Only a request that is harmless to repeat, and has no body to
            // replay, may be cut and sent elsewhere if the member stalls.
            let request = session.req_header();
            let repeatable = request.method.is_idempotent() && !has_body(request, content_length(request));
            let connection = if repeatable { tcp_connection(fd, digest) } else { None };
            slot.sent(ctx.long_poll, connection);
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        prepare_upstream_request(upstream_request, ctx.client, self.listener.tls)?;
        if let Some(name) = &ctx.edge.policy.forwarding.request_id_header {
            upstream_request.insert_header(name.clone(), ctx.request_id.as_str())?;
        }
        if let Destination::Named(at, _) = ctx.destination {
            let route = ctx.edge.sites.route(at);
            if let Some(target) = route.rewritten_target(upstream_request.raw_path()) {
                upstream_request.set_raw_path(&target)?;
            }
            for name in &route.remove_headers {
                upstream_request.remove_header(name);
            }
            for (name, value) in &route.set_headers {
                upstream_request.insert_header(name.clone(), value.clone())?;
            }
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // After a 101 the client's bytes are a stream that lives as long as
        // the call or app does, not a body: no body cap applies to them.
        let upgraded = ctx.websocket_open.is_some();
        if let (Some(chunk), false) = (body.as_ref(), upgraded) {
            ctx.body_seen += chunk.len() as u64;
            if ctx.body_seen > ctx.body_limit {
                return Error::e_explain(ErrorType::HTTPStatus(413), "request body over the limit");
            }
        }
        if let Some(held) = &mut ctx.gate_pending {
            if let Some(chunk) = body.take() {
                held.extend_from_slice(&chunk);
            }
            if !end_of_stream {
                // Nothing goes on until the whole body is judged.
                *body = Some(Bytes::new());
                return Ok(());
            }
            let held = std::mem::take(held);
            ctx.gate_pending = None;
            let edge = Arc::clone(&ctx.edge);
            if let Some(gate) = &edge.policy.federation_gate {
                let request = session.req_header();
                let verdict = gate
                    .judge(
                        &self.runtime.federation_keys,
                        request.method.as_str(),
                        request.raw_path(),
                        request.headers.get_all(http::header::AUTHORIZATION).iter().map(|v| v.as_bytes()),
                        &held,
                    )
                    .await;
                if let Err(error) = settle_verdict(gate, verdict, &ctx.request_id, &self.runtime.federation_refusals) {
                    ctx.gate_refusal = Some(error);
                    return Error::e_explain(ErrorType::HTTPStatus(401), "federation signature refused");
                }
            }
            *body = Some(Bytes::from(held));
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        let error = match ctx.gate_refusal.take() {
            Some(refusal) => Some(refusal),
            None => crate::request::errors::for_proxy_error(e, ctx.body_limit),
        };
        let code = error.as_ref().map_or(0, |error| error.status);
        if let Some(reason) = error.as_ref().and_then(|error| error.reason) {
            METRICS.traffic.refused.with_label_values(&[reason]).inc();
            log::debug!("request {} refused: {e}", ctx.request_id);
        }
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
        session: &mut Session,
        upstream_response: &mut pingora::http::ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_time = Some(ctx.started.elapsed());
        if let Some(slot) = &mut ctx.slot {
            slot.settle();
            slot.state().answered(crate::upstream::state::now_ms());
        }
        if let (Some(pool), Some(member)) = (pool_of(ctx), ctx.member) {
            match upstream_response.status.as_u16() {
                502..=504 => pool.failed(member),
                _ => pool.succeeded(member),
            }
        }
        if session.as_downstream().is_http2() {
            crate::server::http2::own_header_values(upstream_response);
        }
        if upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS && ctx.websocket_open.is_none() {
            ctx.websocket_open = Some(GaugeGuard::new(&METRICS.traffic.websockets_open));
            METRICS.traffic.websocket_upgrades.with_label_values(&[metrics_for(ctx).0.name()]).inc();
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.started.elapsed();
        let (group_metrics, worker_metrics) = metrics_for(ctx);
        let (group, worker) = (group_metrics.name(), worker_metrics.worker());
        let request = session.req_header();
        worker_metrics.count(&request.method, status);
        group_metrics.observe(elapsed, ctx.upstream_time);
        if let Some(error) = error {
            log::debug!("request {} failed: {error}", ctx.request_id);
        }
        if ctx.edge.policy.access_log == access_log::AccessLogFormat::Off {
            // Nothing below is needed then.
            return;
        }
        let header = |name: http::header::HeaderName| request.headers.get(name).and_then(|v| v.to_str().ok());
        let entry = access_log::Entry {
            // Refused before request_filter ran: the connection's own peer.
            client: ctx.client.or_else(|| peer_ip(session)),
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
            request_id: ctx.request_id.as_str(),
            edge_error: ctx.local_error.as_ref().map(|e| e.errcode.as_str()),
            edge_reason: ctx.local_error.as_ref().and_then(|e| e.reason),
        };
        if let Some(line) = access_log::line(ctx.edge.policy.access_log, &entry, std::time::SystemTime::now()) {
            log::info!(target: "access", "{line}");
        }
    }
}

/// The metric handles for this request's group and worker (also the
/// labels the access log shows).
fn metrics_for(ctx: &RequestCtx) -> (&GroupMetrics, &WorkerCounters) {
    let metrics = &ctx.edge.request_metrics;
    let group = match ctx.destination {
        Destination::Named(_, id) => metrics.upstream(id.0),
        Destination::Synapse(decision) => metrics.synapse(decision.group),
        Destination::Edge => metrics.edge(),
    };
    (group, group.worker(ctx.member))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_request_ids_are_sixteen_lowercase_hex_digits_of_the_counter() {
        let first = RequestId::next();
        let second = RequestId::next();
        for id in [&first, &second] {
            assert_eq!(id.as_str().len(), 16);
            assert!(id.as_str().bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id}");
        }
        let value = |id: &RequestId| u64::from_str_radix(id.as_str(), 16).unwrap_or_default();
        // The counter under the prefix grows.
        assert!(value(&second) ^ *PROCESS_PREFIX > value(&first) ^ *PROCESS_PREFIX);
        assert_eq!(first.as_str(), format!("{:016x}", value(&first)));
    }
}
