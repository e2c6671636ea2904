//! Active health checks: `GET /health` on every worker, on an interval, in a
//! background service. Failed connections mark a worker down at once (see
//! `proxy::EdgeProxy::fail_to_connect`); a passing check brings it back.

use crate::config::values::UpstreamAddr;
use crate::edge::Edge;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct HealthChecker {
    pub edge: Arc<ArcSwap<Edge>>,
    pub runtime: Arc<crate::runtime::Runtime>,
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let edge = self.edge.load_full();
            let settings = edge.ops.health.clone();
            let mut probes = tokio::task::JoinSet::new();
            for (pool_index, pool) in edge.pools.all().iter().enumerate() {
                for (member_index, member) in pool.members.iter().enumerate() {
                    if in_maintenance(member) {
                        continue;
                    }
                    let target = member.health.clone();
                    let path = settings.path.clone();
                    probes.spawn(async move {
                        let healthy = probe(&target, &path, settings.timeout).await;
                        (pool_index, member_index, healthy)
                    });
                }
            }
            // Named upstreams with a health check, each with its own path.
            let named_offset = edge.pools.all().len();
            for (upstream_index, upstream) in edge.upstreams.all().iter().enumerate() {
                let Some(check) = upstream.health.clone() else { continue };
                for (member_index, member) in upstream.pool.members.iter().enumerate() {
                    if in_maintenance(member) {
                        continue;
                    }
                    let target = member.health.clone();
                    let path = check.path.clone();
                    probes.spawn(async move {
                        let healthy = probe(&target, &path, check.timeout).await;
                        (named_offset + upstream_index, member_index, healthy)
                    });
                }
            }
            // A probe that failed to run (a panic) costs only its own result.
            while let Some(joined) = probes.join_next().await {
                let Ok((pool_index, member_index, healthy)) = joined else { continue };
                match edge.pools.all().get(pool_index) {
                    Some(pool) => pool.mark(member_index, healthy),
                    None => edge.upstreams.all()[pool_index - named_offset].pool.mark(member_index, healthy),
                };
            }
            tokio::select! {
                _ = tokio::time::sleep(settings.interval) => {}
                // Another edge of the cluster saw a member fail: check now.
                _ = self.runtime.health_now.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// A member stopped on purpose is not checked: its state stays as it was.
fn in_maintenance(member: &crate::upstream::pool::Member) -> bool {
    member.state.admin() == crate::upstream::state::Admin::Maintenance
}

/// How often pools are scanned for silent members, and how long the check
/// of a silent member may take: a Synapse worker answers `/health` from its
/// reactor at once unless the process itself is stuck.
const STALL_SCAN: Duration = Duration::from_millis(250);
const STALL_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Stall detection: a member that owes answers and has sent none for the
/// pool's `stall_after` is checked at once; if the check fails too, it is
/// taken out and the requests it holds that may be repeated go elsewhere
/// (`Pool::stalled`). Named upstreams without active checks are not
/// watched: nothing could tell a stall from a slow answer.
pub struct StallWatch {
    pub edge: Arc<ArcSwap<Edge>>,
}

#[async_trait]
impl BackgroundService for StallWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let edge = self.edge.load_full();
            let synapse = edge.pools.all().iter().map(|pool| (pool, edge.ops.health.path.as_str()));
            let named = edge
                .upstreams
                .all()
                .iter()
                .filter_map(|upstream| upstream.health.as_ref().map(|check| (&upstream.pool, check.path.as_str())));
            let mut suspects = Vec::new();
            for (pool_index, (pool, path)) in synapse.chain(named).enumerate() {
                for member in pool.silent_members() {
                    if pool.members[member].state.start_probe() {
                        suspects.push((pool_index, member, pool.members[member].health.clone(), path.to_string()));
                    }
                }
            }
            for (pool_index, member, target, path) in suspects {
                let edge = Arc::clone(&edge);
                tokio::spawn(async move {
                    let healthy = probe(&target, &path, STALL_PROBE_TIMEOUT).await;
                    let named = edge.upstreams.all().iter().filter(|u| u.health.is_some()).map(|u| &u.pool);
                    if let Some(pool) = edge.pools.all().iter().chain(named).nth(pool_index) {
                        if !healthy {
                            pool.stalled(member, true);
                        }
                        pool.members[member].state.end_probe();
                    }
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(STALL_SCAN) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// `HTTP/1.1 200`: the bytes that decide.
const STATUS_LINE_START: usize = 12;

/// Reads until the status code is in, however the peer splits its writes
/// (a short first read must not mark a healthy worker down).
async fn read_status<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, head: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < head.len() {
        let read = stream.read(&mut head[filled..]).await?;
        if read == 0 {
            break;
        }
        filled += read;
    }
    Ok(filled)
}

/// One `GET <path>`; healthy means a 200 status line within `timeout`.
pub async fn probe(target: &UpstreamAddr, path: &str, timeout: Duration) -> bool {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: matrix-edge-health\r\nConnection: close\r\n\r\n"
    );
    let exchange = async {
        let mut head = [0u8; STATUS_LINE_START];
        let read = match target {
            UpstreamAddr::Tcp(addr) => {
                let mut stream = tokio::net::TcpStream::connect(addr).await?;
                stream.write_all(request.as_bytes()).await?;
                read_status(&mut stream, &mut head).await?
            }
            // A TLS worker is only checked for a connection.
            UpstreamAddr::Tls(addr, _) => {
                tokio::net::TcpStream::connect(addr).await?;
                return Ok::<bool, std::io::Error>(true);
            }
            UpstreamAddr::Unix(path) => {
                let mut stream = tokio::net::UnixStream::connect(path).await?;
                stream.write_all(request.as_bytes()).await?;
                read_status(&mut stream, &mut head).await?
            }
        };
        Ok(head[..read].starts_with(b"HTTP/1.1 200") || head[..read].starts_with(b"HTTP/1.0 200"))
    };
    matches!(tokio::time::timeout(timeout, exchange).await, Ok(Ok(true)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A worker that answers `status`, written in two pieces with a pause between.
    async fn worker(first: &'static [u8], rest: &'static [u8]) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 512];
            let _ = stream.read(&mut request).await;
            stream.write_all(first).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = stream.write_all(rest).await;
        });
        addr
    }

    #[tokio::test]
    async fn a_status_line_split_across_writes_still_counts() {
        let healthy = worker(b"HTTP/1.1 2", b"00 OK\r\nContent-Length: 0\r\n\r\n").await;
        assert!(probe(&UpstreamAddr::Tcp(healthy), "/health", Duration::from_secs(2)).await);
        let failing = worker(b"HTTP/1.1 5", b"03 Service Unavailable\r\n\r\n").await;
        assert!(!probe(&UpstreamAddr::Tcp(failing), "/health", Duration::from_secs(2)).await);
    }

    #[tokio::test]
    async fn a_silent_worker_fails_within_the_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let started = std::time::Instant::now();
        assert!(!probe(&UpstreamAddr::Tcp(addr), "/health", Duration::from_millis(300)).await);
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(listener);
    }
}
