//! The HTTP/2 accept loop, ours instead of Pingora's, so that a connection
//! with no stream open for the keep-alive idle time is said goodbye to
//! (GOAWAY, then closed), as nginx and HAProxy do. Pingora's own loop
//! (0.9.1) can only drop an idle connection without a GOAWAY, so a client
//! that sent a request as it closed could not tell whether it was served;
//! with the GOAWAY's last stream id it knows, and retries safely.
//!
//! Everything else is Pingora's loop as it is: graceful shutdown keeps
//! accepting the streams the client opened before it saw the GOAWAY, and a
//! connection is torn down after as many malformed streams as Pingora
//! allows (its budget is private, so it is counted here).

use crate::observe::metrics::METRICS;
use pingora::apps::HttpServerApp;
use pingora::protocols::http::v2::server::{handshake, H2Accept, HttpSession};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Digest, Stream};
use pingora::server::ShutdownWatch;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Malformed streams one connection may open before it is torn down:
/// Pingora's `MAX_MALFORMED_STREAMS_PER_CONN`, which its own loop enforces.
pub const MALFORMED_STREAMS_PER_CONNECTION: usize = 32;

/// After an idle connection's GOAWAY, how long the client has to finish
/// the goodbye (answer the GOAWAY's PING, finish a stream it had opened
/// before seeing it) before the socket is closed anyway: a vanished phone
/// answers nothing.
const GOODBYE_LIMIT: Duration = Duration::from_secs(5);

/// Why the loop said goodbye, if it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goodbye {
    Idle,
    Shutdown,
}

/// Serves one HTTP/2 connection until the client closes it, it errs, it
/// stays idle for `idle`, or the process shuts down.
pub async fn serve<A: HttpServerApp + Send + Sync + 'static>(
    app: &Arc<A>,
    stream: Stream,
    shutdown: &ShutdownWatch,
    idle: Duration,
) {
    let digest = Arc::new(Digest {
        ssl_digest: stream.get_ssl_digest(),
        timing_digest: stream.get_timing_digest(),
        proxy_digest: stream.get_proxy_digest(),
        socket_digest: stream.get_socket_digest(),
    });
    let mut connection = match handshake(stream, app.h2_options()).await {
        Ok(connection) => connection,
        Err(e) => {
            log::debug!("HTTP/2 handshake failed: {e}");
            return;
        }
    };
    let open = Arc::new(OpenStreams::default());
    let mut watch = shutdown.clone();
    let mut goodbye = if *watch.borrow() { Some(Goodbye::Shutdown) } else { None };
    if goodbye.is_some() {
        connection.graceful_shutdown();
    }
    let mut malformed = 0usize;
    loop {
        let accepted = tokio::select! {
            // The shutdown first, so a signal arriving with a stream is seen.
            biased;
            _ = watch.changed(), if goodbye.is_none() => {
                connection.graceful_shutdown();
                goodbye = Some(Goodbye::Shutdown);
                continue;
            }
            accepted = HttpSession::from_h2_conn(&mut connection, Arc::clone(&digest)) => accepted,
            // Any accepted stream cancels this wait; the next turn of the
            // loop starts a new idle period once every stream has ended.
            _ = open.idle_for(idle), if goodbye.is_none() => {
                METRICS.connections.h2_idle_closed.inc();
                connection.graceful_shutdown();
                goodbye = Some(Goodbye::Idle);
                continue;
            }
            _ = open.idle_for(GOODBYE_LIMIT), if goodbye == Some(Goodbye::Idle) => return,
        };
        match accepted {
            // A client that just disconnects without closing HTTP/2 is common.
            Err(e) => {
                log::debug!("HTTP/2 connection ended: {e}");
                return;
            }
            // The goodbye is complete (or the client closed).
            Ok(None) => return,
            Ok(Some(H2Accept::Rejected)) => {
                malformed += 1;
                if malformed >= MALFORMED_STREAMS_PER_CONNECTION {
                    log::warn!("HTTP/2 connection closed after {malformed} malformed requests");
                    return;
                }
            }
            Ok(Some(H2Accept::Session(session))) => {
                let in_flight = open.start();
                let app = Arc::clone(app);
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    let _in_flight = in_flight;
                    app.process_new_http(ServerSession::new_http2(session), &shutdown).await;
                });
            }
        }
    }
}

/// Streams being served on one connection, and a wake-up when the last ends.
#[derive(Default)]
struct OpenStreams {
    count: AtomicUsize,
    none_left: Notify,
}

/// One stream being served; dropping it ends it.
struct InFlight(Arc<OpenStreams>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            // A stored permit if nobody waits yet: the waiter sees it.
            self.0.none_left.notify_one();
        }
    }
}

impl OpenStreams {
    fn start(self: &Arc<Self>) -> InFlight {
        self.count.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// Returns once no stream has been open for `period`.
    async fn idle_for(&self, period: Duration) {
        while self.count.load(Ordering::Acquire) != 0 {
            self.none_left.notified().await;
        }
        tokio::time::sleep(period).await;
    }
}

/// Gives an upstream answer's header values storage of their own before
/// they go out on an HTTP/2 connection. Pingora parses an upstream's
/// HTTP/1 answer into slices of one read buffer (4 KiB at least); HTTP/2's
/// header compression keeps the values it indexes for the connection's
/// life, and with each value the whole buffer under it: 4 KiB per idle
/// connection (a heap profile, bench/RESULTS.md). The values are copied
/// into one buffer of their own (a few hundred bytes) and replaced in
/// place: one allocation per answer (re-inserting every header through
/// Pingora's header cost 9,800 instructions a request).
pub fn own_header_values(response: &mut pingora::http::ResponseHeader) {
    // Pingora's header gives no mutable access to values: it is taken
    // apart and rebuilt, losing only the header names' case and the
    // reason phrase, which HTTP/2 has neither of.
    let Ok(placeholder) = pingora::http::ResponseHeader::build_no_case(200, Some(0)) else { return };
    let mut parts: http::response::Parts = std::mem::replace(response, placeholder).into();
    let total = parts.headers.values().map(http::HeaderValue::len).sum();
    let mut buffer = bytes::BytesMut::with_capacity(total);
    for value in parts.headers.values() {
        buffer.extend_from_slice(value.as_bytes());
    }
    let buffer = buffer.freeze();
    let mut at = 0;
    for value in parts.headers.values_mut() {
        let end = at + value.len();
        // The bytes were a valid value a moment ago; a refusal keeps the old one.
        if let Ok(mut owned) = http::HeaderValue::from_maybe_shared(buffer.slice(at..end)) {
            owned.set_sensitive(value.is_sensitive());
            *value = owned;
        }
        at = end;
    }
    *response = pingora::http::ResponseHeader::from(parts);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_the_last_stream_then_the_whole_period() {
        let open = Arc::new(OpenStreams::default());
        let first = open.start();
        let second = open.start();
        let started = tokio::time::Instant::now();
        let waiter = {
            let open = Arc::clone(&open);
            tokio::spawn(async move { open.idle_for(Duration::from_secs(60)).await })
        };
        tokio::time::sleep(Duration::from_secs(100)).await;
        drop(first);
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!waiter.is_finished(), "a stream is still open");
        drop(second);
        waiter.await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(260));
    }

    #[test]
    fn header_values_keep_their_order_and_no_longer_share_the_read_buffer() {
        let mut response = pingora::http::ResponseHeader::build(200, None).unwrap();
        response.append_header("set-cookie", "a=1").unwrap();
        response.append_header("content-type", "application/json").unwrap();
        response.append_header("set-cookie", "b=2").unwrap();
        let parsed = bytes::Bytes::from_static(b"x-upstream: synapse");
        let shared = http::HeaderValue::from_maybe_shared(parsed.slice(12..)).unwrap();
        response.insert_header("x-upstream", shared).unwrap();
        own_header_values(&mut response);
        let cookies: Vec<&[u8]> = response.headers.get_all("set-cookie").iter().map(|v| v.as_bytes()).collect();
        assert_eq!(cookies, [b"a=1".as_slice(), b"b=2".as_slice()]);
        assert_eq!(response.headers["content-type"], "application/json");
        let value = response.headers["x-upstream"].as_bytes();
        assert_eq!(value, b"synapse");
        let within = parsed.as_ptr() as usize..parsed.as_ptr() as usize + parsed.len();
        assert!(!within.contains(&(value.as_ptr() as usize)), "still a slice of the parsed buffer");
    }
}
