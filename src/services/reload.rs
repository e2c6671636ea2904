//! Configuration and certificate reloads while serving.
//!
//! SIGHUP, or a change to any certificate or key file (checked every
//! `tls.watch_interval`), loads the config file again. A config that fails
//! its checks is refused with the reason in the log and the running one
//! keeps serving; a good one is swapped in whole, so in-flight requests
//! finish with the snapshot they started with and new ones use the new one.

use crate::edge::Edge;
use crate::observe::metrics::METRICS;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Watches for SIGHUP and certificate file changes and asks the installer
/// (`services::install`) for a reload.
pub struct Reloader {
    pub edge: Arc<ArcSwap<Edge>>,
    pub installs: crate::services::install::Installs,
}

/// Modification times of the files a snapshot depends on.
fn stamps(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    files.iter().map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok()).collect()
}

/// Gauges that describe a loaded snapshot.
pub fn publish(edge: &Edge) {
    crate::tls::publish_expiry(&edge.tls.certificates.load());
    let named = edge.upstreams.all().iter().map(|u| &u.pool);
    let balancing = &METRICS.balancing;
    for pool in edge.pools.all().iter().chain(named) {
        let group = pool.label.as_str();
        for member in &pool.members {
            let worker = member.label.as_str();
            METRICS.operations.worker_up.with_label_values(&[group, worker]).set(i64::from(member.is_healthy()));
            for reason in ["failures", "stall"] {
                balancing.ejections.with_label_values(&[group, worker, reason]);
            }
        }
        for refusal in [crate::upstream::pool::Refusal::QueueFull, crate::upstream::pool::Refusal::QueueTimeout] {
            balancing.shed.with_label_values(&[group, refusal.reason()]);
        }
        balancing.queue_wait.with_label_values(&[group]);
        balancing.rescued.with_label_values(&[group]);
        balancing.retries_denied.with_label_values(&[group]);
    }
    // Counters a dashboard or an alert reads exist from the start, at 0, so
    // `increase()` sees their first event and panels are not "no data".
    for result in ["ok", "error"] {
        METRICS.operations.reloads.with_label_values(&[result]);
    }
    for reason in crate::request::errors::Refused::REASONS {
        METRICS.traffic.refused.with_label_values(&[reason]);
    }
    once_cell::sync::Lazy::force(&crate::request::ratelimit::RATE_LIMITED);
    for site in edge.sites.all() {
        for route in site.routes.iter().filter(|r| r.websocket_idle.is_some()) {
            if let crate::sites::Action::Upstream(id) = route.action {
                METRICS.traffic.websocket_upgrades.with_label_values(&[edge.upstreams.get(id).name.as_str()]);
            }
        }
    }
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    METRICS.operations.config_loaded_at.set(now);
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(e) => {
                log::error!("cannot listen for SIGHUP, reload by signal is off: {e}");
                None
            }
        };
        let mut seen = stamps(&self.edge.load().tls.certificate_files);
        loop {
            let interval = self.edge.load().tls.certificate_watch.unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    if self.installs.reload("SIGHUP").await {
                        seen = stamps(&self.edge.load().tls.certificate_files);
                    }
                }
                _ = tokio::time::sleep(interval), if self.edge.load().tls.certificate_watch.is_some() => {
                    let now = stamps(&self.edge.load().tls.certificate_files);
                    // A failed reload (a renewal caught half-written) is tried again next time.
                    if now != seen && self.installs.reload("certificate files changed").await {
                        seen = stamps(&self.edge.load().tls.certificate_files);
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
