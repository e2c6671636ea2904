//! The Pingora glue. `request_filter` asks [`crate::plan::plan`] what to do
//! with a request and carries the plan out; a forwarded request's tries
//! belong to an [`Attempt`], which the failure hooks tell what Pingora saw
//! and which answers whether to go again. Nothing here decides policy.

use crate::edge::{Edge, Listener};
use crate::federation::turns::TurnRefusal;
use crate::local::static_files::StaticAnswer;
use crate::observe::access_log;
use crate::observe::metrics::{GaugeGuard, METRICS};
use crate::observe::request_metrics::{GroupMetrics, WorkerCounters};
use crate::plan::attempt::{Attempt, ConnectFailure, ProxyFailure};
use crate::plan::{content_length, has_body, plan, Destination, Forward, Plan, RequestView, StickyKey};
use crate::request::errors::{MatrixError, Refused};
use crate::request::forward::prepare_upstream_request;
use crate::request::id::RequestId;
use crate::request::ratelimit::RateFacts;
use crate::request::response::LocalResponse;
use crate::server::gate::{self, Judged};
use crate::server::respond::{refusal, send_file, write_local};
use crate::upstream::pool::{Pool, Refusal};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::RetryType;
use pingora::{Error, ErrorType, Result};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// One listener's proxy logic; all listeners share the `Edge` snapshot cell.
pub struct EdgeProxy {
    pub listener: Listener,
    pub edge: Arc<ArcSwap<Edge>>,
    /// ACME HTTP-01 tokens on offer; outlives snapshots.
    pub challenges: crate::acme::SharedChallenges,
    /// What outlives snapshots: the federation key cache and refusal log,
    /// the requests held.
    pub runtime: Arc<crate::runtime::Runtime>,
}

pub struct RequestCtx {
    edge: Arc<Edge>,
    /// The client: the peer, the PROXY header's address, or the right-most
    /// untrusted `X-Forwarded-For` entry behind `trusted_proxies`.
    client: Option<IpAddr>,
    started: Instant,
    /// Where this request goes, as planned (`Edge` until it is forwarded).
    destination: Destination,
    /// A forwarded request's plan, and its tries.
    forward: Option<Forward>,
    attempt: Option<Attempt>,
    /// A WebSocket is open through this request (counted in the gauge while it lives).
    websocket_open: Option<GaugeGuard>,
    /// Counts this request in `requests_in_flight` until the context is
    /// dropped, whichever way the request ends (logging may never run).
    _in_flight: GaugeGuard,
    body_limit: u64,
    body_seen: u64,
    /// The error the edge answered with, for the access log.
    local_error: Option<MatrixError>,
    /// When the upstream's response header arrived, from `started`.
    upstream_time: Option<std::time::Duration>,
    request_id: RequestId,
    /// A signed federation body too large to read before choosing a worker:
    /// held here chunk by chunk and judged when complete, before any of it
    /// is sent on.
    gate_pending: Option<Vec<u8>>,
    /// The origin's share this federation request counts in, until its turn is taken.
    share: Option<String>,
    /// Its turn at Synapse, held until the request ends (retries included).
    _turn: Option<crate::federation::turns::Turn>,
}

/// What `request_filter` does once the plan no longer borrows the request.
enum Step {
    Answer(LocalResponse),
    Refuse(MatrixError),
    File { file: crate::local::static_files::FileAnswer, head_only: bool, close: bool },
    Forward(Forward),
}

/// The connection's peer: the PROXY header's client when a balancer sent one.
fn peer_ip(session: &Session) -> Option<IpAddr> {
    session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip())
}

static X_FORWARDED_FOR: http::header::HeaderName = http::header::HeaderName::from_static("x-forwarded-for");

/// The configured request rates; a refusal is a 429 with the wait.
async fn rate_limit(
    edge: &Edge,
    session: &Session,
    client: Option<IpAddr>,
    verified_origin: Option<&str>,
) -> std::result::Result<(), MatrixError> {
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

/// Answers with a Matrix error, and keeps it for the access log.
async fn refuse(session: &mut Session, ctx: &mut RequestCtx, error: MatrixError) -> Result<bool> {
    let request = session.req_header();
    let response = refusal(&error, has_body(request, content_length(request)));
    compress(session, None);
    ctx.local_error = Some(error);
    write_local(session, &response).await?;
    Ok(true)
}

/// Sets the response compression for this request: the plan's levels, or none.
fn compress(session: &mut Session, compression: Option<crate::request::compress::Compression>) {
    use pingora::modules::http::compression::ResponseCompression;
    use pingora::protocols::http::compression::Algorithm;
    let Some(module) = session.downstream_modules_ctx.get_mut::<ResponseCompression>() else { return };
    match compression {
        Some(levels) => {
            module.adjust_algorithm_level(Algorithm::Gzip, levels.gzip);
            module.adjust_algorithm_level(Algorithm::Brotli, levels.brotli);
            module.adjust_algorithm_level(Algorithm::Zstd, levels.zstd);
        }
        None => module.adjust_level(0),
    }
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

impl EdgeProxy {
    /// The client behind trusted proxies (and the request ID they gave), else the peer.
    fn client(session: &Session, edge: &Edge, ctx: &mut RequestCtx) -> Option<IpAddr> {
        let peer = peer_ip(session);
        let forwarding = &edge.policy.forwarding;
        if forwarding.trusted_proxies.is_empty() {
            return peer;
        }
        let request = session.req_header();
        let forwarded = request.headers.get_all(&X_FORWARDED_FOR).iter().map(|v| v.as_bytes());
        let given_id = forwarding.request_id_header.as_ref().and_then(|name| request.headers.get(name));
        if let Some(kept) = forwarding.kept_request_id(peer, given_id.map(|v| v.as_bytes())) {
            ctx.request_id = RequestId::Kept(kept.into_boxed_str());
        }
        crate::request::forward::client_behind_proxies(peer, forwarded, &forwarding.trusted_proxies)
    }

    /// The plan for this request, as owned steps: local answers are made
    /// here, while the request is borrowed.
    fn step(&self, edge: &Edge, request: &RequestHeader, client: Option<IpAddr>) -> Step {
        let view = RequestView::of(request, client);
        match plan(edge, &self.listener.roles, &view) {
            Plan::Forward(forward) => Step::Forward(forward),
            Plan::Answer(response) => Step::Answer(response),
            Plan::Refuse(error) => Step::Refuse(error),
            Plan::AcmeChallenge(token) => {
                let mut response = crate::local::plain_http::challenge(self.challenges.answer(token));
                response.close = view.has_body;
                Step::Answer(response)
            }
            Plan::Static { root, path } => match root.resolve(&request.method, &path, &request.headers) {
                StaticAnswer::File(file) => {
                    Step::File { file, head_only: request.method == http::Method::HEAD, close: view.has_body }
                }
                StaticAnswer::AddSlash(mut location) => {
                    if let Some(query) = request.uri.query() {
                        location.push('?');
                        location.push_str(query);
                    }
                    let mut response = LocalResponse::empty(301).with_header("Location", location);
                    response.close = view.has_body;
                    Step::Answer(response)
                }
                StaticAnswer::Refuse(error) => Step::Refuse(error),
            },
        }
    }

    /// A forwarded request: the gate and the rates first, then its tries.
    async fn forward(&self, session: &mut Session, ctx: &mut RequestCtx, forward: Forward) -> Result<bool> {
        let edge = Arc::clone(&ctx.edge);
        let mut origin = None;
        if let (true, Some(gate)) = (forward.gate, &edge.policy.federation_gate) {
            let idle = edge.policy.connections.body_idle_timeout;
            match gate::judge_head(session, gate, &self.runtime, &ctx.request_id, forward.body_limit, idle).await {
                Ok(Judged::Origin(verified)) => origin = verified,
                Ok(Judged::AfterBody) => ctx.gate_pending = Some(Vec::new()),
                Err(error) => return refuse(session, ctx, error).await,
            }
        }
        if forward.rate_limited {
            if let Err(error) = rate_limit(&edge, session, ctx.client, origin.as_deref()).await {
                return refuse(session, ctx, error).await;
            }
        }
        if forward.turn_cost.is_some() {
            let authorization = session.req_header().headers.get(http::header::AUTHORIZATION);
            ctx.share = Some(crate::federation::turns::share_of(
                origin.as_deref(),
                authorization.map(http::HeaderValue::as_bytes),
                ctx.client,
            ));
        }
        session.set_read_timeout(Some(forward.read_idle));
        let (to_synapse, unchecked) = match forward.destination {
            Destination::Named(_, id) => (false, edge.upstreams.get(id).health.is_none()),
            _ => (true, false),
        };
        ctx.attempt = Some(Attempt::new(to_synapse, unchecked, forward.long_poll, forward.hold));
        ctx.body_limit = forward.body_limit;
        ctx.destination = forward.destination;
        ctx.forward = Some(forward);
        Ok(false)
    }
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    /// Response compression only (Pingora's; off for each request until
    /// its plan allows it): Synapse leaves compression to the proxy.
    fn init_downstream_modules(&self, modules: &mut pingora::modules::http::HttpModules) {
        modules.add_module(pingora::modules::http::compression::ResponseCompressionBuilder::enable(1));
    }

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            _in_flight: GaugeGuard::new(&METRICS.traffic.in_flight),
            edge: self.edge.load_full(),
            started: Instant::now(),
            destination: Destination::Edge,
            forward: None,
            attempt: None,
            websocket_open: None,
            body_limit: 0,
            body_seen: 0,
            local_error: None,
            upstream_time: None,
            request_id: RequestId::next(),
            client: None,
            gate_pending: None,
            share: None,
            _turn: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let edge = Arc::clone(&ctx.edge);
        crate::server::connections::head_complete(session);
        ctx.client = Self::client(session, &edge, ctx);
        // Framing first: a request framed two ways is refused whatever its
        // site or path.
        let request = session.req_header();
        let raw_head = (request.version != http::Version::HTTP_2).then(|| session.as_downstream().to_h1_raw());
        let framing = crate::server::connections::request_line_verdict(session)
            .and_then(|()| crate::server::framing::check(request.version, &request.headers, raw_head.as_deref()));
        if let Err(reason) = framing {
            return refuse(session, ctx, MatrixError::bad_request(reason)).await;
        }
        let step = self.step(&edge, session.req_header(), ctx.client);
        // Only a forward the plan allows is compressed, never a local answer.
        compress(session, if let Step::Forward(forward) = &step { forward.compress } else { None });
        match step {
            Step::Forward(forward) => self.forward(session, ctx, forward).await,
            Step::Answer(response) => write_local(session, &response).await.map(|()| true),
            Step::Refuse(error) => refuse(session, ctx, error).await,
            Step::File { file, head_only, close } => send_file(session, &file, head_only, close).await.map(|()| true),
        }
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        let edge = Arc::clone(&ctx.edge);
        // `request_filter` answered anything else itself; fail closed if one gets here.
        let (Some(forward), Some(attempt)) = (&ctx.forward, &mut ctx.attempt) else {
            return Error::e_explain(ErrorType::InternalError, "no upstream was decided for this request");
        };
        if let Some(wait) = attempt.begin().map_err(Refused::into_error)? {
            tokio::time::sleep(wait).await;
        }
        let key = forward.sticky_key.as_ref().map(StickyKey::as_bytes);
        let upgrading = session.req_header().headers.contains_key(http::header::UPGRADE);
        let decision = match forward.destination {
            Destination::Synapse(decision) => decision,
            Destination::Named(at, id) => {
                let upstream = edge.upstreams.get(id);
                let slot = match upstream.pool.acquire(key, attempt.tried(), upgrading).await {
                    Ok(slot) => slot,
                    Err(Refusal::NoneLive) => {
                        return Err(Refused::NoLiveMember { name: upstream.name.clone() }.into_error())
                    }
                    Err(refusal) => return shed(&upstream.pool, refusal),
                };
                let mut peer = attempt.take(&upstream.pool, slot);
                if let (Some(idle), true) = (edge.sites.route(at).websocket_idle, upgrading) {
                    peer.options.read_timeout = Some(idle);
                    peer.options.write_timeout = Some(idle);
                }
                return Ok(peer);
            }
            Destination::Edge => return Error::e_explain(ErrorType::InternalError, "no upstream was decided"),
        };
        if let (Some(share), Some(cost), Some(settings)) = (ctx.share.take(), forward.turn_cost, &edge.policy.turns) {
            ctx._turn = Some(self.runtime.federation_turns.take(&share, cost, settings).await.map_err(|refusal| {
                let refused = match refusal {
                    TurnRefusal::QueueFull => Refused::OriginQueueFull { origin: share },
                    TurnRefusal::QueueTimeout => Refused::OriginQueueTimeout { origin: share },
                };
                refused.into_error()
            })?);
        }
        let Some(pool) = edge.pools.get(decision.group) else { return Ok(edge.main.peer()) };
        let long_poll = forward.long_poll.is_some() || upgrading;
        loop {
            match pool.acquire(key, attempt.tried(), long_poll).await {
                Ok(slot) => return Ok(attempt.take(pool, slot)),
                Err(Refusal::NoneLive) if decision.group.falls_back_to_main() => return Ok(edge.main.peer()),
                Err(Refusal::NoneLive) => {
                    let group = decision.group.to_string();
                    let wait = attempt.wait_for_member(&self.runtime.held, &group).map_err(Refused::into_error)?;
                    tokio::time::sleep(wait).await;
                }
                Err(refusal) => return shed(pool, refusal),
            }
        }
    }

    fn fail_to_connect(&self, _: &mut Session, _: &HttpPeer, ctx: &mut RequestCtx, mut e: Box<Error>) -> Box<Error> {
        let pool = ctx.destination.pool(&ctx.edge);
        let Some(attempt) = &mut ctx.attempt else { return e };
        let failure = ConnectFailure { refused: matches!(e.etype(), ErrorType::ConnectRefused) };
        match attempt.connect_failed(failure, pool, &self.runtime.held) {
            Ok(again) => {
                if again {
                    e.set_retry(true);
                }
                e
            }
            Err(refused) => refused.into_error(),
        }
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
        let unanswered = session.response_written().is_none();
        let failure = ProxyFailure {
            repeatable: session.req_header().method.is_idempotent()
                && !session.as_ref().retry_buffer_truncated()
                && unanswered,
            // Pingora marks failures of the connection itself (closed, reset,
            // before a response header) as retryable on a reused connection only.
            connection_failed: matches!(e.retry, RetryType::ReusedOnly),
            timed_out: matches!(e.etype(), ErrorType::ReadTimedout) && unanswered,
            reused: client_reused,
        };
        let pool = ctx.destination.pool(&ctx.edge);
        let again = ctx.attempt.as_mut().is_some_and(|attempt| attempt.proxy_failed(failure, pool));
        e.set_retry(again);
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
        let has_body = ctx.forward.as_ref().is_none_or(|forward| forward.has_body);
        if let Some(attempt) = ctx.attempt.as_mut().filter(|attempt| attempt.member().is_some()) {
            // Only a request that is harmless to repeat, and has no body to
            // replay, may be cut and sent elsewhere if the member stalls.
            let repeatable = session.req_header().method.is_idempotent() && !has_body;
            attempt.sent(if repeatable { tcp_connection(fd, digest) } else { None });
        }
        Ok(())
    }

    /// Media the plan gave a key is looked up in the media cache (Pingora's
    /// cache: one fetch per missed file, single ranges, the requester's own
    /// headers on every revalidation).
    fn request_cache_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        let keyed = ctx.forward.as_ref().is_some_and(|forward| forward.media_key.is_some());
        let Some(settings) = ctx.edge.policy.media_cache.filter(|_| keyed) else { return Ok(()) };
        let store = self.runtime.media_store(settings.memory);
        session.cache.enable(store.storage, Some(store.eviction), None, Some(store.lock), None);
        session.cache.set_max_file_size_bytes(settings.max_object);
        Ok(())
    }

    fn cache_key_callback(&self, _session: &Session, ctx: &mut RequestCtx) -> Result<pingora_cache::CacheKey> {
        let key = ctx.forward.as_ref().and_then(|forward| forward.media_key.clone()).unwrap_or_default();
        Ok(pingora_cache::CacheKey::new(key, ""))
    }

    /// Never a body without this request's own revalidation: every hit
    /// goes to Synapse with the requester's credentials and the validator.
    async fn cache_hit_filter(
        &self,
        _session: &mut Session,
        _meta: &pingora_cache::CacheMeta,
        _hit_handler: &mut pingora_cache::storage::HitHandler,
        _is_fresh: bool,
        _ctx: &mut RequestCtx,
    ) -> Result<Option<pingora_cache::ForcedFreshness>> {
        Ok(Some(pingora_cache::ForcedFreshness::ForceExpired))
    }

    fn response_cache_filter(
        &self,
        _session: &Session,
        response: &pingora::http::ResponseHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<pingora_cache::RespCacheable> {
        use pingora_cache::{CacheMeta, NoCacheReason, RespCacheable};
        if !crate::request::media::storable(response) {
            return Ok(RespCacheable::Uncacheable(NoCacheReason::OriginNotCache));
        }
        let now = std::time::SystemTime::now();
        Ok(RespCacheable::Cacheable(CacheMeta::new(now, now, 0, 0, response.clone())))
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
                return Err(MatrixError::too_large(ctx.body_limit).into_error());
            }
        }
        let Some(held) = &mut ctx.gate_pending else { return Ok(()) };
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
            gate::judge(session, gate, &self.runtime, &ctx.request_id, &held).await.map_err(MatrixError::into_error)?;
        }
        *body = Some(Bytes::from(held));
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        let error = crate::request::errors::for_proxy_error(e, ctx.body_limit);
        let code = error.as_ref().map_or(0, |error| error.status);
        if let Some(reason) = error.as_ref().and_then(|error| error.reason) {
            METRICS.traffic.refused.with_label_values(&[reason]).inc();
            log::debug!("request {} refused: {e}", ctx.request_id);
        }
        if let Some(error) = error {
            compress(session, None);
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
        let pool = ctx.destination.pool(&ctx.edge);
        if let Some(attempt) = &mut ctx.attempt {
            attempt.answered(pool, upstream_response.status.as_u16());
        }
        if let Some(compression) = ctx.forward.as_ref().and_then(|forward| forward.compress) {
            if !crate::request::compress::answer_allows(upstream_response, compression.min_length) {
                compress(session, None);
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
        record_last_minute(ctx, status, elapsed);
        // The cache is enabled exactly for the requests the plan gave a media key.
        if ctx.forward.as_ref().is_some_and(|forward| forward.media_key.is_some()) {
            use pingora_cache::CachePhase;
            let outcome = match session.cache.phase() {
                CachePhase::Miss => Some("miss"),
                CachePhase::Revalidated => Some("revalidated"),
                CachePhase::Expired if status == 200 => Some("replaced"),
                CachePhase::Expired => Some("passed"),
                CachePhase::RevalidatedNoCache(_) => Some("passed"),
                _ => None,
            };
            if let Some(outcome) = outcome {
                METRICS.operations.media_cache.with_label_values(&[outcome]).inc();
            }
        }
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

/// The member's last minute: every request counted, an error when it got
/// a 5xx or no answer, timed unless it was a long-poll or a WebSocket.
fn record_last_minute(ctx: &RequestCtx, status: u16, elapsed: std::time::Duration) {
    let Some(index) = ctx.attempt.as_ref().and_then(Attempt::member) else { return };
    let Some(member) = ctx.destination.pool(&ctx.edge).and_then(|pool| pool.members.get(index)) else { return };
    let waits = ctx.forward.as_ref().is_some_and(|forward| forward.long_poll.is_some()) || ctx.websocket_open.is_some();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    member.state.last_minute.record(now, status == 0 || status >= 500, (!waits).then_some(elapsed));
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
    (group, group.worker(ctx.attempt.as_ref().and_then(Attempt::member)))
}
