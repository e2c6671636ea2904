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
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let edge = self.edge.load_full();
            let settings = edge.health.clone();
            let mut probes = tokio::task::JoinSet::new();
            for (pool_index, pool) in edge.pools.all().iter().enumerate() {
                for (member_index, member) in pool.members.iter().enumerate() {
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
                    let target = member.health.clone();
                    let path = check.path.clone();
                    probes.spawn(async move {
                        let healthy = probe(&target, &path, check.timeout).await;
                        (named_offset + upstream_index, member_index, healthy)
                    });
                }
            }
            while let Some(Ok((pool_index, member_index, healthy))) = probes.join_next().await {
                match edge.pools.all().get(pool_index) {
                    Some(pool) => pool.mark(member_index, healthy),
                    None => edge.upstreams.all()[pool_index - named_offset].pool.mark(member_index, healthy),
                };
            }
            tokio::select! {
                _ = tokio::time::sleep(settings.interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// One `GET <path>`; healthy means a 200 status line within `timeout`.
pub async fn probe(target: &UpstreamAddr, path: &str, timeout: Duration) -> bool {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: matrix-edge-health\r\nConnection: close\r\n\r\n"
    );
    let exchange = async {
        let mut head = [0u8; 16];
        let read = match target {
            UpstreamAddr::Tcp(addr) => {
                let mut stream = tokio::net::TcpStream::connect(addr).await?;
                stream.write_all(request.as_bytes()).await?;
                stream.read(&mut head).await?
            }
            // A TLS worker is only checked for a connection.
            UpstreamAddr::Tls(addr, _) => {
                tokio::net::TcpStream::connect(addr).await?;
                return Ok::<bool, std::io::Error>(true);
            }
            UpstreamAddr::Unix(path) => {
                let mut stream = tokio::net::UnixStream::connect(path).await?;
                stream.write_all(request.as_bytes()).await?;
                stream.read(&mut head).await?
            }
        };
        Ok(head[..read].starts_with(b"HTTP/1.1 200") || head[..read].starts_with(b"HTTP/1.0 200"))
    };
    matches!(tokio::time::timeout(timeout, exchange).await, Ok(Ok(true)))
}
