//! Prometheus metrics, served on their own listener (never a public one).
//!
//! Labels are bounded: groups and workers come from the config, methods are
//! folded into classes, TLS names into the certificate that answered.

use once_cell::sync::Lazy;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Requests and what they carried.
    pub traffic: TrafficMetrics,
    /// Connections and TLS handshakes.
    pub connections: ConnectionMetrics,
    /// Workers, certificates, reloads, discovery, shared limits, ACME.
    pub operations: OperationMetrics,
    /// Pool members' load, queues, shedding, ejections.
    pub balancing: BalancingMetrics,
    /// The federation gate's verdicts and key fetches.
    pub federation: FederationMetrics,
}

/// The federation gate's verdicts and key fetches.
pub struct FederationMetrics {
    /// Signed-endpoint requests by outcome (`verified`, `refused`,
    /// `unverifiable`) and reason (why refused or unverifiable; empty when verified).
    pub requests: IntCounterVec,
    /// Fetches of origins' keys by result (`fetched`, `failed`).
    pub key_fetches: IntCounterVec,
    /// Requests waiting for their origin's turn (`federation.per_origin`).
    pub origin_queued: IntGauge,
    /// How long requests that got their origin's turn waited for it.
    pub origin_queue_wait: Histogram,
}

/// One unit of a gauge, given back when dropped.
pub struct GaugeGuard(&'static IntGauge);

impl GaugeGuard {
    pub fn new(gauge: &'static IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Pool members' load, queues, shedding, ejections.
pub struct BalancingMetrics {
    /// Requests in flight per member (long-polls apart).
    pub in_flight: IntGaugeVec,
    /// Long-polls (syncs with a timeout) and WebSockets open per member.
    pub long_polls: IntGaugeVec,
    /// Requests waiting for a slot, per pool.
    pub queued: IntGaugeVec,
    /// How long admitted requests waited for a slot, per pool.
    pub queue_wait: HistogramVec,
    /// Requests answered 503 by the edge for lack of a slot, by reason.
    pub shed: IntCounterVec,
    /// Members taken out of rotation, by reason (`failures`, `stall`).
    pub ejections: IntCounterVec,
    /// Requests sent again because their member stalled before answering.
    pub rescued: IntCounterVec,
    /// Retries refused because the pool's retry budget was spent.
    pub retries_denied: IntCounterVec,
}

/// Requests and what they carried.
pub struct TrafficMetrics {
    /// Requests by route group, worker, method class and status.
    pub requests: IntCounterVec,
    /// Whole-request latency by route group.
    pub latency: HistogramVec,
    /// Time to the upstream's response header, by route group.
    pub upstream_latency: HistogramVec,
    /// Requests being served right now.
    pub in_flight: IntGauge,
    /// Requests waiting for Synapse's main process to accept connections again.
    pub held: IntGauge,
    /// Requests refused with 429, by limit class.
    pub rate_limited: IntCounterVec,
    /// WebSocket upgrades the upstream accepted (101), by upstream.
    pub websocket_upgrades: IntCounterVec,
    /// WebSockets open right now.
    pub websockets_open: IntGauge,
    /// Requests the edge answered for want of an upstream, by reason
    /// (`request::errors::Refused`).
    pub refused: IntCounterVec,
}

/// Connections and TLS handshakes.
pub struct ConnectionMetrics {
    /// TLS handshakes that chose a certificate, by that certificate.
    pub tls_handshakes_started: IntCounterVec,
    /// Completed TLS handshakes by the certificate that answered; started
    /// minus completed is the failures for that name.
    pub tls_handshakes: IntCounterVec,
    /// Connections refused because their address had `connections_per_ip` open.
    pub connections_refused: IntCounter,
    /// Client connections open, as counted against `connections_per_ip`.
    pub connections_open: IntGauge,
    /// HTTP/1 requests refused because their connection's guard (which
    /// checks the request line as received) could not be found.
    pub guard_missing: IntCounter,
    /// Connections from a listed load balancer closed for a missing or bad PROXY header.
    pub proxy_protocol_refused: IntCounter,
    /// HTTP/2 connections said goodbye to (GOAWAY) after `keepalive_timeout` with no stream open.
    pub h2_idle_closed: IntCounter,
}

/// Workers, certificates, reloads, discovery, shared limits, ACME.
pub struct OperationMetrics {
    /// 1 while the cluster's Redis answers, 0 when not (absent without `cluster`).
    pub cluster_redis_up: IntGauge,
    /// Media requests the cache handled, by outcome.
    pub media_cache: IntCounterVec,
    /// 1 when a worker passes its health check, 0 when down.
    pub worker_up: IntGaugeVec,
    /// Certificate expiry (Unix seconds) by first name.
    pub certificate_expiry: IntGaugeVec,
    /// Reload attempts by result (`ok`, `error`).
    pub reloads: IntCounterVec,
    /// Unix time of the last successful (re)load.
    pub config_loaded_at: IntGauge,
    /// Worker discovery lookups that failed (the last answer was kept).
    pub discovery_failures: IntCounter,
    /// Rate-limit checks counted on this edge alone because Redis did not answer.
    pub rate_limit_fallbacks: IntCounter,
    /// ACME orders by name and result (`ok`, `error`).
    pub acme_orders: IntCounterVec,
    /// When the edge will next try to renew each ACME name (Unix seconds).
    pub acme_next_renewal: IntGaugeVec,
}

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new_custom(Some("matrix_edge".into()), None)?;
    let buckets = vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
    let metrics = Metrics {
        traffic: TrafficMetrics::new(buckets)?,
        connections: ConnectionMetrics::new()?,
        operations: OperationMetrics::new()?,
        balancing: BalancingMetrics::new()?,
        federation: FederationMetrics::new()?,
        registry,
    };
    register(&metrics)?;
    Ok(metrics)
}

impl TrafficMetrics {
    fn new(buckets: Vec<f64>) -> Result<Self, prometheus::Error> {
        Ok(TrafficMetrics {
            requests: IntCounterVec::new(
                Opts::new("requests_total", "Requests by route group, worker, method class and status"),
                &["group", "worker", "method", "status"],
            )?,
            latency: HistogramVec::new(
                HistogramOpts::new("request_duration_seconds", "Whole-request time by route group")
                    .buckets(buckets.clone()),
                &["group"],
            )?,
            upstream_latency: HistogramVec::new(
                HistogramOpts::new("upstream_response_seconds", "Time until Synapse's response header, by route group")
                    .buckets(buckets),
                &["group"],
            )?,
            in_flight: IntGauge::new("requests_in_flight", "Requests being served")?,
            held: IntGauge::new("requests_held", "Requests waiting for Synapse's main process to accept again")?,
            rate_limited: IntCounterVec::new(
                Opts::new("rate_limited_total", "Requests refused with 429 by limit class"),
                &["class"],
            )?,
            websocket_upgrades: IntCounterVec::new(
                Opts::new("websocket_upgrades_total", "WebSocket upgrades accepted by the upstream, by upstream"),
                &["upstream"],
            )?,
            websockets_open: IntGauge::new("websockets_open", "WebSocket connections open through the edge")?,
            refused: IntCounterVec::new(
                Opts::new("refused_total", "Requests the edge answered itself for want of an upstream, by reason"),
                &["reason"],
            )?,
        })
    }
}

impl ConnectionMetrics {
    fn new() -> Result<Self, prometheus::Error> {
        Ok(ConnectionMetrics {
            tls_handshakes_started: IntCounterVec::new(
                Opts::new("tls_handshakes_started_total", "TLS handshakes that chose a certificate (by SNI)"),
                &["certificate"],
            )?,
            tls_handshakes: IntCounterVec::new(
                Opts::new("tls_handshakes_total", "Completed TLS handshakes by the certificate that answered"),
                &["certificate"],
            )?,
            connections_refused: IntCounter::new(
                "connections_refused_total",
                "Connections refused because their address reached connections_per_ip",
            )?,
            connections_open: IntGauge::new(
                "connections_open",
                "Client connections open (those counted against connections_per_ip)",
            )?,
            guard_missing: IntCounter::new(
                "connection_guard_missing_total",
                "HTTP/1 requests refused because the check of their request line could not run",
            )?,
            proxy_protocol_refused: IntCounter::new(
                "proxy_protocol_refused_total",
                "Connections from a listed load balancer closed for a missing or invalid PROXY header",
            )?,
            h2_idle_closed: IntCounter::new(
                "http2_idle_closed_total",
                "HTTP/2 connections closed with a GOAWAY after keepalive_timeout with no stream open",
            )?,
        })
    }
}

impl OperationMetrics {
    fn new() -> Result<Self, prometheus::Error> {
        Ok(OperationMetrics {
            media_cache: IntCounterVec::new(
                Opts::new(
                    "media_cache_requests_total",
                    "Media requests through the media cache: miss, revalidated (Synapse said 304, the bytes came from the edge), replaced (Synapse sent new bytes), passed (Synapse's answer passed on, not stored)",
                ),
                &["outcome"],
            )?,
            cluster_redis_up: IntGauge::new(
                "cluster_redis_up",
                "1 while the Redis shared with the other edges (cluster) answers, 0 when it does not",
            )?,
            worker_up: IntGaugeVec::new(
                Opts::new("worker_up", "1 when a worker passes its health check"),
                &["group", "worker"],
            )?,
            certificate_expiry: IntGaugeVec::new(
                Opts::new("certificate_expiry_timestamp_seconds", "When each certificate expires"),
                &["certificate"],
            )?,
            reloads: IntCounterVec::new(
                Opts::new("config_reloads_total", "Configuration reloads by result"),
                &["result"],
            )?,
            config_loaded_at: IntGauge::new(
                "config_loaded_timestamp_seconds",
                "When the running configuration was loaded",
            )?,
            discovery_failures: IntCounter::new(
                "worker_discovery_failures_total",
                "Worker discovery lookups that failed or came back empty (the last answer was kept)",
            )?,
            rate_limit_fallbacks: IntCounter::new(
                "rate_limit_fallbacks_total",
                "Rate-limit checks counted on this edge alone because the shared Redis did not answer",
            )?,
            acme_orders: IntCounterVec::new(
                Opts::new("acme_orders_total", "ACME certificate orders by name and result"),
                &["name", "result"],
            )?,
            acme_next_renewal: IntGaugeVec::new(
                Opts::new("acme_next_renewal_timestamp_seconds", "When each ACME name is next due for renewal"),
                &["name"],
            )?,
        })
    }
}

impl BalancingMetrics {
    fn new() -> Result<Self, prometheus::Error> {
        Ok(BalancingMetrics {
            in_flight: IntGaugeVec::new(
                Opts::new("worker_in_flight", "Requests in flight per worker, long-polls apart"),
                &["group", "worker"],
            )?,
            long_polls: IntGaugeVec::new(
                Opts::new("worker_long_polls", "Long-polls and WebSockets open per worker"),
                &["group", "worker"],
            )?,
            queued: IntGaugeVec::new(Opts::new("queued_requests", "Requests waiting for a worker's slot"), &["group"])?,
            queue_wait: HistogramVec::new(
                HistogramOpts::new("queue_wait_seconds", "How long admitted requests waited for a slot")
                    .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                &["group"],
            )?,
            shed: IntCounterVec::new(
                Opts::new("shed_total", "Requests answered 503 for lack of a slot, by reason"),
                &["group", "reason"],
            )?,
            ejections: IntCounterVec::new(
                Opts::new("ejections_total", "Workers taken out of rotation, by reason"),
                &["group", "worker", "reason"],
            )?,
            rescued: IntCounterVec::new(
                Opts::new("rescued_total", "Requests sent again because their worker stalled before answering"),
                &["group"],
            )?,
            retries_denied: IntCounterVec::new(
                Opts::new("retries_denied_total", "Retries refused because the pool's retry budget was spent"),
                &["group"],
            )?,
        })
    }
}

impl FederationMetrics {
    fn new() -> Result<Self, prometheus::Error> {
        Ok(FederationMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "federation_requests_total",
                    "Signed federation requests checked at the edge, by outcome and reason",
                ),
                &["outcome", "reason"],
            )?,
            key_fetches: IntCounterVec::new(
                Opts::new("federation_key_fetches_total", "Fetches of origin servers' signing keys, by result"),
                &["result"],
            )?,
            origin_queued: IntGauge::new(
                "federation_origin_queued",
                "Federation requests waiting for their origin's turn at Synapse",
            )?,
            origin_queue_wait: Histogram::with_opts(
                HistogramOpts::new(
                    "federation_origin_queue_wait_seconds",
                    "How long federation requests waited for their origin's turn",
                )
                .buckets(vec![0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
            )?,
        })
    }
}

/// Every metric into the registry, so `/metrics` renders it.
fn register(metrics: &Metrics) -> Result<(), prometheus::Error> {
    let collectors: [Box<dyn prometheus::core::Collector>; 38] = [
        Box::new(metrics.traffic.requests.clone()),
        Box::new(metrics.traffic.latency.clone()),
        Box::new(metrics.traffic.upstream_latency.clone()),
        Box::new(metrics.operations.worker_up.clone()),
        Box::new(metrics.connections.tls_handshakes.clone()),
        Box::new(metrics.connections.tls_handshakes_started.clone()),
        Box::new(metrics.traffic.in_flight.clone()),
        Box::new(metrics.traffic.held.clone()),
        Box::new(metrics.operations.certificate_expiry.clone()),
        Box::new(metrics.operations.reloads.clone()),
        Box::new(metrics.operations.config_loaded_at.clone()),
        Box::new(metrics.connections.connections_refused.clone()),
        Box::new(metrics.connections.connections_open.clone()),
        Box::new(metrics.operations.cluster_redis_up.clone()),
        Box::new(metrics.operations.media_cache.clone()),
        Box::new(metrics.connections.guard_missing.clone()),
        Box::new(metrics.traffic.rate_limited.clone()),
        Box::new(metrics.traffic.websocket_upgrades.clone()),
        Box::new(metrics.traffic.websockets_open.clone()),
        Box::new(metrics.operations.acme_orders.clone()),
        Box::new(metrics.connections.proxy_protocol_refused.clone()),
        Box::new(metrics.connections.h2_idle_closed.clone()),
        Box::new(metrics.traffic.refused.clone()),
        Box::new(metrics.operations.rate_limit_fallbacks.clone()),
        Box::new(metrics.operations.discovery_failures.clone()),
        Box::new(metrics.operations.acme_next_renewal.clone()),
        Box::new(metrics.balancing.in_flight.clone()),
        Box::new(metrics.balancing.long_polls.clone()),
        Box::new(metrics.balancing.queued.clone()),
        Box::new(metrics.balancing.queue_wait.clone()),
        Box::new(metrics.balancing.shed.clone()),
        Box::new(metrics.balancing.ejections.clone()),
        Box::new(metrics.balancing.rescued.clone()),
        Box::new(metrics.balancing.retries_denied.clone()),
        Box::new(metrics.federation.requests.clone()),
        Box::new(metrics.federation.key_fetches.clone()),
        Box::new(metrics.federation.origin_queued.clone()),
        Box::new(metrics.federation.origin_queue_wait.clone()),
    ];
    for collector in collectors {
        metrics.registry.register(collector)?;
    }
    Ok(())
}

/// The process's metrics. The one `expect` in src/: `build` fails only on an
/// invalid metric name or a duplicate registration, both literals fixed in
/// this file (no user or peer input reaches it), and `metrics_register_and_render`
/// builds them on every test run.
#[allow(clippy::expect_used)]
pub static METRICS: Lazy<Metrics> = Lazy::new(|| build().expect("metric definitions are valid"));

pub fn render() -> Vec<u8> {
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&METRICS.registry.gather(), &mut out) {
        log::error!("cannot encode metrics: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_register_and_render() {
        METRICS.traffic.requests.with_label_values(&["sync", "127.0.0.1:8083", "read", "200"]).inc();
        let text = String::from_utf8(render()).unwrap();
        assert!(
            text.contains(
                "matrix_edge_requests_total{group=\"sync\",method=\"read\",status=\"200\",worker=\"127.0.0.1:8083\"} 1"
            ),
            "{text}"
        );
    }
}
