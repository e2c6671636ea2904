//! Per-connection protections that Pingora leaves to the application: a cap
//! on open connections per client address, and a deadline for the whole
//! request head (Pingora's own read timeout restarts with every byte, so a
//! client trickling one header byte at a time would hold a connection forever).
//!
//! [`GuardedApp`] wraps the HTTP proxy app: it counts each accepted
//! connection against its address and wraps the stream in [`HeadDeadline`],
//! which fails reads once a request head has taken too long. The proxy stops
//! the clock when a head is parsed ([`head_complete`]); the keep-alive loop
//! starts it again at the next request's first byte.

use crate::edge::Edge;
use crate::observe::metrics::METRICS;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Open connections per client address, in shards picked by address so
/// that accepts from different clients do not queue on one lock.
#[derive(Debug, Default)]
pub struct ConnectionCounts {
    shards: [Mutex<HashMap<IpAddr, u32>>; SHARDS],
}

const SHARDS: usize = 16;

impl ConnectionCounts {
    fn shard(&self, ip: IpAddr) -> &Mutex<HashMap<IpAddr, u32>> {
        let hash = match ip {
            IpAddr::V4(v4) => u32::from(v4) as usize,
            IpAddr::V6(v6) => (u128::from(v6) >> 64) as usize ^ u128::from(v6) as usize,
        };
        &self.shards[(hash ^ hash >> 16) % SHARDS]
    }
}

/// One counted connection; dropping it releases the count.
pub struct Slot {
    counts: Arc<ConnectionCounts>,
    ip: IpAddr,
}

impl ConnectionCounts {
    /// Counts a connection from `ip`, or refuses it when `cap` are already open
    /// (`cap` 0: no cap).
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, cap: u32) -> Option<Slot> {
        let ip = ip.to_canonical();
        let mut open = self.shard(ip).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = open.entry(ip).or_insert(0);
        if cap != 0 && *count >= cap {
            return None;
        }
        *count += 1;
        METRICS.connections.connections_open.inc();
        Some(Slot { counts: Arc::clone(self), ip })
    }

    pub fn open(&self, ip: IpAddr) -> u32 {
        let ip = ip.to_canonical();
        let open = self.shard(ip).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        open.get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        METRICS.connections.connections_open.dec();
        let mut open = self.counts.shard(self.ip).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Refuses connections from addresses at their cap before the TLS handshake,
/// so a flood from one address costs no handshakes. (The count itself is
/// taken after the handshake, in [`GuardedApp`], where its release is certain.)
pub struct CapFilter {
    pub counts: Arc<ConnectionCounts>,
    pub edge: Arc<ArcSwap<Edge>>,
    /// A balancer's connections carry many clients; they are counted per
    /// client once the PROXY header is read.
    pub proxy: Option<crate::edge::ProxyProtocol>,
}

impl std::fmt::Debug for CapFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapFilter").field("counts", &self.counts).finish_non_exhaustive()
    }
}

#[async_trait]
impl pingora::listeners::ConnectionFilter for CapFilter {
    async fn should_accept(&self, addr: Option<&std::net::SocketAddr>) -> bool {
        let cap = self.edge.load().policy.connections.per_ip;
        let balancer = self.proxy.as_ref().is_some_and(|p| p.expected_from(addr.map(|a| a.ip())));
        let accept = cap == 0 || balancer || addr.is_none_or(|addr| self.counts.open(addr.ip()) < cap);
        if !accept {
            METRICS.connections.connections_refused.inc();
        }
        accept
    }
}

/// The HTTP proxy app with per-connection protections around it.
pub struct GuardedApp<A> {
    pub inner: Arc<A>,
    pub edge: Arc<ArcSwap<Edge>>,
    pub counts: Arc<ConnectionCounts>,
    /// On plain listeners only: TLS listeners read it before the handshake.
    pub plain_proxy: Option<crate::edge::ProxyProtocol>,
}

/// Pingora's first buffer for a request head.
const HEAD_BUFFER: usize = 4096;

impl<A: HttpServerApp + Send + Sync + 'static> GuardedApp<A> {
    /// HTTP/1 keep-alive, as Pingora's own loop does it, except that the
    /// wait for each request's first byte happens here, holding only the
    /// stream: Pingora's per-request state (its session, buffers and the
    /// proxy task) exists only while a request is in flight, so idle
    /// keep-alive connections cost little memory.
    ///
    /// The first request's head is timed from accept (the stream starts
    /// armed), so a silent new connection is cut at `header_timeout`.
    async fn serve_http1(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
        limits: crate::edge::ConnectionLimits,
    ) -> Option<Stream> {
        let mut carried: Option<HttpPersistentSettings> = None;
        loop {
            if let Some(guarded) = stream.as_any().downcast_ref::<HeadDeadline>() {
                guarded.expect_request_line();
            }
            let mut watch = shutdown.clone();
            if *watch.borrow() {
                return None;
            }
            let read = tokio::select! {
                read = tokio::time::timeout(limits.keepalive_timeout, read_head_start(&mut stream)) => read,
                _ = watch.changed() => return None,
            };
            let prefix = match read {
                Ok(Ok(prefix)) if !prefix.is_empty() => prefix,
                _ => return None,
            };
            if let Some(guarded) = stream.as_any().downcast_ref::<HeadDeadline>() {
                guarded.start_clock();
            }
            let session = http1_session(stream, prefix, carried.take(), limits, *shutdown.borrow());
            let reused = self.inner.process_new_http(session, shutdown).await?;
            (stream, carried) = reused.consume();
        }
    }
}

/// Waits for the next request's first bytes and returns what one read
/// brought (empty at the end of the stream). The read lands in a buffer on
/// the stack of each poll, so a connection waiting here holds no buffer;
/// plaintext streams have none under them either (`PLAIN_READ_BUFFER`), and
/// a whole request head usually arrives in this one read, which Pingora then
/// parses without reading again.
async fn read_head_start(stream: &mut Stream) -> std::io::Result<bytes::BytesMut> {
    std::future::poll_fn(|cx| {
        let mut landing = [std::mem::MaybeUninit::<u8>::uninit(); HEAD_BUFFER];
        let mut read = ReadBuf::uninit(&mut landing);
        match Pin::new(&mut *stream).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                let mut prefix = bytes::BytesMut::with_capacity(HEAD_BUFFER);
                prefix.extend_from_slice(read.filled());
                Poll::Ready(Ok(prefix))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Pingora's session for the request whose first bytes were just read.
/// Built outside `serve_http1` so that its future, which every idle
/// keep-alive connection holds, has no room for a session (680 bytes) it
/// only passes on.
fn http1_session(
    stream: Stream,
    prefix: bytes::BytesMut,
    carried: Option<HttpPersistentSettings>,
    limits: crate::edge::ConnectionLimits,
    shutting_down: bool,
) -> ServerSession {
    let mut session = ServerSession::new_http1(stream);
    match carried {
        Some(settings) => settings.apply_to_session(&mut session),
        None => {
            session.set_keepalive(Some(limits.keepalive_timeout.as_secs().max(1)));
            // Pingora counts reuses after the first request.
            session.set_keepalive_reuses_remaining(Some(limits.keepalive_requests.saturating_sub(1)));
        }
    }
    if shutting_down {
        session.set_keepalive(None);
    }
    session.set_pipelined_prefix(prefix);
    session
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for GuardedApp<A> {
    async fn process_new(self: &Arc<Self>, mut stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        if let Some(proxy) = &self.plain_proxy {
            let fd = stream
                .as_any()
                .downcast_ref::<pingora::protocols::l4::stream::Stream>()
                .map(std::os::unix::io::AsRawFd::as_raw_fd)?;
            crate::server::proxy_protocol::accept(&mut *stream, fd, proxy).await.ok()?;
        }
        let limits = self.edge.load().policy.connections;
        let peer = stream.get_socket_digest().and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let _slot = match peer {
            Some(ip) => match self.counts.acquire(ip, limits.per_ip) {
                Some(slot) => Some(slot),
                None => {
                    METRICS.connections.connections_refused.inc();
                    return None;
                }
            },
            None => None,
        };
        // HTTP/2 heads arrive as frames on a shared connection; the h2
        // library bounds those itself, and our accept loop runs its streams.
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            let guarded: Stream = Box::new(HeadDeadline::new(stream, None));
            // Boxed: an HTTP/1 connection's future must not carry room for
            // the HTTP/2 connection state it never has.
            Box::pin(crate::server::http2::serve(&self.inner, guarded, shutdown, limits.keepalive_timeout)).await;
            return None;
        }
        let guarded: Stream = Box::new(HeadDeadline::new(stream, Some(limits.header_timeout)));
        self.serve_http1(guarded, shutdown, limits).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// A stream whose reads fail once a request head has been arriving for
/// longer than the deadline. The clock starts at accept, and again at the
/// first byte of each later request.
pub struct HeadDeadline {
    inner: Stream,
    timeout: Option<Duration>,
    /// Milliseconds since `epoch` when the current head must be complete;
    /// `DISARMED` while no head is being read.
    deadline: AtomicU64,
    epoch: Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Pingora's own error answer, rewritten as Matrix JSON, and how much of it is written.
    rewrite: Option<(Vec<u8>, usize)>,
    /// Close the sending side before the next read: the answer is complete,
    /// and what is read from now on is only drained (see `half_close`).
    half_close: std::sync::atomic::AtomicBool,
    /// HTTP/1 only: the request line as received, checked before Pingora's
    /// parser percent-encodes what it finds illegal in it (a target with a
    /// space would otherwise reach Synapse rewritten).
    line: RequestLineWatch,
}

/// Checks each request's first line in the bytes read, up to its LF.
#[derive(Default)]
struct RequestLineWatch {
    enabled: bool,
    /// Set between requests: the next bytes read begin a request line.
    expected: std::sync::atomic::AtomicBool,
    /// The line being checked; `None` once decided.
    checking: Option<crate::server::framing::RequestLineCheck>,
    refusal: Mutex<Option<&'static str>>,
}

impl RequestLineWatch {
    fn observe(&mut self, bytes: &[u8]) {
        if self.expected.swap(false, Ordering::Relaxed) {
            self.checking = Some(Default::default());
            *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        let Some(check) = self.checking.as_mut() else { return };
        if let Some(verdict) = check.feed(bytes) {
            *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = verdict.err();
            self.checking = None;
        }
    }
}

const DISARMED: u64 = u64::MAX;

impl HeadDeadline {
    /// `timeout`: HTTP/1, whose heads (and request lines) this stream watches;
    /// `None`: HTTP/2, whose frames the h2 library checks.
    pub fn new(inner: Stream, timeout: Option<Duration>) -> HeadDeadline {
        let epoch = Instant::now();
        let deadline = match timeout {
            Some(t) => t.as_millis().min(u128::from(DISARMED - 1)) as u64,
            None => DISARMED,
        };
        let half_close = std::sync::atomic::AtomicBool::new(false);
        let line = RequestLineWatch {
            enabled: timeout.is_some(),
            expected: std::sync::atomic::AtomicBool::new(timeout.is_some()),
            ..RequestLineWatch::default()
        };
        HeadDeadline {
            inner,
            timeout,
            deadline: AtomicU64::new(deadline),
            epoch,
            timer: None,
            rewrite: None,
            half_close,
            line,
        }
    }

    /// The next bytes read start a new request (the previous one is done).
    fn expect_request_line(&self) {
        if self.line.enabled {
            self.line.expected.store(true, Ordering::Relaxed);
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn head_complete(&self) {
        self.deadline.store(DISARMED, Ordering::Relaxed);
    }

    /// Starts the clock for a new head, unless one is already running.
    fn start_clock(&self) {
        if let Some(timeout) = self.timeout {
            let at = self.now_ms().saturating_add(timeout.as_millis() as u64).min(DISARMED - 1);
            let _ = self.deadline.compare_exchange(DISARMED, at, Ordering::Relaxed, Ordering::Relaxed);
        }
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "request head not received in time")
}

/// The one way to the guard under a session's HTTP/1 connection. `None`
/// for HTTP/2 (Pingora keeps no stream per request) and for a stream that
/// did not come through `GuardedApp`.
fn guard(session: &pingora::proxy::Session) -> Option<&HeadDeadline> {
    session.as_downstream().stream()?.as_any().downcast_ref::<HeadDeadline>()
}

/// The answer on the session's connection is complete and the connection
/// will close: signal the end (FIN, or TLS close_notify) before the edge
/// drains what the client still sends, as nginx's lingering close does, so
/// the client sees the end of the answer at once. Without a guard the
/// connection simply closes after the drain.
pub fn half_close(session: &pingora::proxy::Session) {
    if let Some(stream) = guard(session) {
        stream.half_close.store(true, Ordering::Relaxed);
    }
}

/// The strict check of an HTTP/1 request line as it was received, failing
/// closed: a request whose connection has no guard to have watched its line
/// is refused and counted, never passed unchecked. HTTP/2 has no request
/// line (the h2 library checks its pseudo-headers).
pub fn request_line_verdict(session: &pingora::proxy::Session) -> Result<(), &'static str> {
    if session.as_downstream().is_http2() {
        return Ok(());
    }
    let Some(stream) = guard(session) else {
        crate::observe::metrics::METRICS.connections.guard_missing.inc();
        log::error!("an HTTP/1 request arrived on a connection without its guard: refused");
        return Err("The request line could not be checked");
    };
    match *stream.line.refusal.lock().unwrap_or_else(|p| p.into_inner()) {
        Some(reason) => Err(reason),
        None => Ok(()),
    }
}

/// Stops the head clock of the session's connection (the head is parsed).
pub fn head_complete(session: &pingora::proxy::Session) {
    if let Some(stream) = guard(session) {
        stream.head_complete();
    }
}

impl AsyncRead for HeadDeadline {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.half_close.load(Ordering::Relaxed) {
            if Pin::new(&mut this.inner).poll_shutdown(cx).is_pending() {
                return Poll::Pending;
            }
            // Done or failed, the sending side is finished with.
            this.half_close.store(false, Ordering::Relaxed);
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.line.enabled && buf.filled().len() > before {
            this.line.observe(&buf.filled()[before..]);
        }
        let deadline = this.deadline.load(Ordering::Relaxed);
        if deadline == DISARMED {
            this.timer = None;
            return result;
        }
        if this.now_ms() >= deadline {
            return Poll::Ready(Err(timed_out()));
        }
        if result.is_pending() {
            let at = tokio::time::Instant::from_std(this.epoch + Duration::from_millis(deadline));
            let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(timed_out()));
            }
        }
        result
    }
}

/// The Matrix JSON answer replacing a bare error response Pingora wrote
/// itself (`HTTP/1.1 400 ...` with an empty body), if `written` is one.
fn matrix_answer_for(written: &[u8]) -> Option<Vec<u8>> {
    let status = written.strip_prefix(b"HTTP/1.1 ").or_else(|| written.strip_prefix(b"HTTP/1.0 "))?.get(..3)?;
    let status: u16 = std::str::from_utf8(status).ok()?.parse().ok()?;
    (400..600)
        .contains(&status)
        .then(|| crate::request::errors::MatrixError::for_status(status).to_response().to_http1_closing())
}

impl AsyncWrite for HeadDeadline {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        // A response while a head is still being read can only be Pingora's
        // own refusal of that head: no request reached the proxy logic. It
        // carries no body a client could use, so it is answered in Matrix
        // JSON instead, like every other error of the edge.
        if this.rewrite.is_none() && this.deadline.load(Ordering::Relaxed) != DISARMED {
            this.rewrite = matrix_answer_for(buf).map(|bytes| (bytes, 0));
        }
        let Some((bytes, written)) = this.rewrite.as_mut() else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        while *written < bytes.len() {
            match Pin::new(&mut this.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                other => return other,
            }
        }
        // Whatever Pingora writes after its refusal belongs to the replaced answer.
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        // One buffer at a time keeps the rewrite in `poll_write` in one place.
        let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
        self.poll_write(cx, first)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[async_trait]
impl Shutdown for HeadDeadline {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await;
    }
}

impl UniqueID for HeadDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeadDeadline {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeadDeadline {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeadDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for HeadDeadline {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for HeadDeadline {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

impl std::fmt::Debug for HeadDeadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadDeadline").field("inner", &self.inner).field("timeout", &self.timeout).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pingora_refusals_become_matrix_json() {
        let answer = matrix_answer_for(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").unwrap();
        let text = String::from_utf8(answer).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with(r#""errcode":"M_UNRECOGNIZED","error":"Malformed request"}"#), "{text}");
        assert!(matrix_answer_for(b"HTTP/1.1 405 Method Not Allowed\r\n").is_some());
        assert!(matrix_answer_for(b"HTTP/1.1 200 OK\r\n").is_none());
        assert!(matrix_answer_for(b"garbage").is_none());
    }

    #[test]
    fn connection_cap_counts_and_releases() {
        let counts = Arc::new(ConnectionCounts::default());
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let first = counts.acquire(ip, 2).unwrap();
        let second = counts.acquire(ip, 2).unwrap();
        assert!(counts.acquire(ip, 2).is_none());
        assert!(counts.acquire("192.0.2.10".parse().unwrap(), 2).is_some());
        // The mapped IPv6 form is the same client.
        assert!(counts.acquire("::ffff:192.0.2.9".parse().unwrap(), 2).is_none());
        drop(first);
        assert_eq!(counts.open(ip), 1);
        let third = counts.acquire(ip, 2);
        assert!(third.is_some());
        drop((second, third));
        assert_eq!(counts.open(ip), 0);
        assert!(counts.shards.iter().all(|shard| shard.lock().unwrap().is_empty()));
        assert!(counts.acquire(ip, 0).is_some(), "0 means no cap");
    }

    /// A session over `bytes`, read as Pingora reads a request; `guarded`
    /// puts the connection guard under it, as `GuardedApp` does.
    async fn session_over(bytes: &'static [u8], guarded: bool) -> pingora::proxy::Session {
        let mock: Stream = Box::new(tokio_test::io::Builder::new().read(bytes).build());
        let stream: Stream =
            if guarded { Box::new(HeadDeadline::new(mock, Some(Duration::from_secs(5)))) } else { mock };
        let mut session = pingora::proxy::Session::new_h1(stream);
        assert!(session.read_request().await.unwrap());
        session
    }

    #[tokio::test]
    async fn a_request_whose_connection_lacks_the_guard_is_refused_not_passed() {
        const GOOD: &[u8] = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: a.test\r\n\r\n";
        let before = crate::observe::metrics::METRICS.connections.guard_missing.get();
        let unguarded = session_over(GOOD, false).await;
        assert!(request_line_verdict(&unguarded).is_err(), "a well-formed line without its check still fails");
        assert_eq!(crate::observe::metrics::METRICS.connections.guard_missing.get(), before + 1);
        // The same request through the guard passes; a bad line does not.
        assert_eq!(request_line_verdict(&session_over(GOOD, true).await), Ok(()));
        let tab = session_over(b"GET /_matrix/client/versions\tx HTTP/1.1\r\nHost: a.test\r\n\r\n", true).await;
        assert!(request_line_verdict(&tab).is_err());
    }
}
