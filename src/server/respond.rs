//! Answers the edge writes itself on a Pingora session: local responses,
//! static files, and what an early answer does with the request body.

use crate::local::static_files::FileAnswer;
use crate::plan::has_body;
use crate::request::errors::MatrixError;
use crate::request::response::LocalResponse;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Writes an answer the edge gives itself. One that leaves a request body
/// unread (`close`) then reads and drops that body, unless the request was
/// malformed (400): the body of a request framed two ways may hold a
/// smuggled request and is not to be consumed as one.
pub async fn write_local(session: &mut Session, response: &LocalResponse) -> Result<()> {
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
    if response.close && response.status != 400 && has_body(request, crate::plan::content_length(request)) {
        discard_request_body(session).await;
    }
    Ok(())
}

/// The answer for a refusal. A malformed request leaves the connection in
/// doubt, and an unread body would be taken for the next request: both close.
pub fn refusal(error: &MatrixError, has_body: bool) -> LocalResponse {
    let mut response = error.to_response();
    response.close = error.status == 400 || has_body;
    response
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

/// Streams the chosen bytes of a static file, a bounded chunk at a time,
/// so memory stays flat whatever the file's size.
pub async fn send_file(session: &mut Session, file: &FileAnswer, head_only: bool, close: bool) -> Result<()> {
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
pub const PREREAD_BODY: u64 = 64 * 1024;

/// Reads a request's whole body (at most `limit` bytes), keeping it in
/// Pingora's retry buffer, from which it is sent on unchanged.
pub async fn read_whole_body(
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
