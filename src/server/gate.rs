//! The federation gate on a Pingora session: a signed request with a
//! small body is read and judged before a worker is chosen, so a refused
//! request reaches none; a larger one is judged when its body is complete,
//! before any of it is sent on. Verdicts are counted and logged here.

use crate::federation::gate::{Gate, Mode, Verdict};
use crate::request::errors::MatrixError;
use crate::request::id::RequestId;
use crate::runtime::Runtime;
use crate::server::respond::{read_whole_body, PREREAD_BODY};
use pingora::proxy::Session;
use std::time::Duration;

/// The gate's word on a request whose head has arrived.
pub enum Judged {
    /// Judged: the verified origin, or `None` when nothing was verified
    /// (observe mode, or unverifiable and let through).
    Origin(Option<String>),
    /// The body is too large to read first: judge it when complete.
    AfterBody,
}

/// Judges a signed request, reading its body first when it is small.
pub async fn judge_head(
    session: &mut Session,
    gate: &Gate,
    runtime: &Runtime,
    request_id: &RequestId,
    body_limit: u64,
    idle: Duration,
) -> Result<Judged, MatrixError> {
    let request = session.req_header();
    let length = crate::plan::content_length(request);
    let body = if crate::plan::has_body(request, length) {
        if length.is_none_or(|n| n > PREREAD_BODY) {
            return Ok(Judged::AfterBody);
        }
        read_whole_body(session, body_limit, idle).await?
    } else {
        Vec::new()
    };
    judge(session, gate, runtime, request_id, &body).await.map(Judged::Origin)
}

/// Judges a signed request with its whole body.
pub async fn judge(
    session: &Session,
    gate: &Gate,
    runtime: &Runtime,
    request_id: &RequestId,
    body: &[u8],
) -> Result<Option<String>, MatrixError> {
    let request = session.req_header();
    let authorizations = request.headers.get_all(http::header::AUTHORIZATION).iter().map(|v| v.as_bytes());
    let verdict =
        gate.judge(&runtime.federation_keys, request.method.as_str(), request.raw_path(), authorizations, body).await;
    settle(gate, verdict, request_id, runtime)
}

/// Counts and logs the verdict; the refusal to answer in enforce mode.
fn settle(
    gate: &Gate,
    verdict: Verdict,
    request_id: &RequestId,
    runtime: &Runtime,
) -> Result<Option<String>, MatrixError> {
    use crate::federation::counters;
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
            runtime.federation_refusals.note(origin.as_deref(), refusal.reason(), &refusal.to_string(), enforced);
            if enforced {
                Err(MatrixError::federation_refused(&refusal))
            } else {
                Ok(None)
            }
        }
    }
}
