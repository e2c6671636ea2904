//! The Pingora glue: each phase hands its work to a module and applies the
//! answer. Nothing here decides policy.

use crate::access::{admit, Admission, RequestFacts};
use crate::edge::{Edge, Listener};
use crate::errors::MatrixError;
use crate::forward::prepare_upstream_request;
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
    tried: Vec<usize>,
    body_limit: u64,
    body_seen: u64,
    /// The error the edge answered with, for the access log.
    local_error: Option<MatrixError>,
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip())
}

fn content_length(request: &RequestHeader) -> Option<u64> {
    let value = request.headers.get(http::header::CONTENT_LENGTH)?;
    value.to_str().ok()?.trim().parse().ok()
}

fn has_body(request: &RequestHeader) -> bool {
    content_length(request).is_some_and(|n| n > 0) || request.headers.contains_key(http::header::TRANSFER_ENCODING)
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

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            edge: self.edge.load_full(),
            started: Instant::now(),
            decision: None,
            member: None,
            tried: Vec::new(),
            body_limit: 0,
            body_seen: 0,
            local_error: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let edge = Arc::clone(&ctx.edge);
        let request = session.req_header();
        let facts = RequestFacts {
            target: request.raw_path(),
            has_upgrade: request.headers.contains_key(http::header::UPGRADE),
            admin_allowed: edge.admin_allowed(client_ip(session)),
            content_length: content_length(request),
        };
        match admit(&self.listener.roles, &facts, &edge.limits) {
            Admission::Forward { body_limit, .. } => {
                ctx.body_limit = body_limit;
                ctx.decision = Some(edge.router.route(request.method.as_str(), request.raw_path()));
                Ok(false)
            }
            Admission::WellKnown(document) => {
                let mut response = edge.well_known.respond(document, &request.method);
                // The body of a request answered locally is never read.
                response.close = has_body(request);
                write_local(session, &response).await?;
                Ok(true)
            }
            Admission::Reject(error) => {
                let mut response = error.to_response();
                response.close = has_body(request);
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
        match pool.pick(key.as_ref().map(|k| k.as_bytes()), &ctx.tried) {
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
                let worker = &pool.members[member];
                if worker.set_healthy(false) {
                    log::warn!("worker {} ({}) is down: {e}", worker.upstream.address, decision.group);
                }
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

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let request = session.req_header();
        log::info!(
            target: "access",
            "{} \"{} {} {:?}\" {} {}ms group={} worker={}{}{}",
            client_ip(session).map_or_else(|| "-".to_string(), |ip| ip.to_string()),
            request.method,
            crate::redact::target_for_log(request.raw_path()),
            request.version,
            status,
            ctx.started.elapsed().as_millis(),
            ctx.decision.map_or("-", |d| d.group.name()),
            worker_name(ctx),
            ctx.local_error.as_ref().map_or_else(String::new, |e| format!(" edge={}", e.errcode.as_str())),
            error.map_or_else(String::new, |e| format!(" error=\"{}\"", e.etype().as_str())),
        );
    }
}

fn worker_name(ctx: &RequestCtx) -> String {
    match (ctx.decision, ctx.member) {
        (Some(decision), Some(member)) => ctx
            .edge
            .pools
            .get(decision.group)
            .map_or_else(|| "-".to_string(), |pool| pool.members[member].upstream.address.to_string()),
        (Some(_), None) => "main".to_string(),
        _ => "-".to_string(),
    }
}
