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

/// The last reload's outcome, for the status page (outlives snapshots).
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    /// Unix seconds.
    pub at: i64,
    pub error: Option<String>,
}

static LAST_RELOAD: std::sync::Mutex<Option<ReloadOutcome>> = std::sync::Mutex::new(None);

pub fn last_reload() -> Option<ReloadOutcome> {
    LAST_RELOAD.lock().ok().and_then(|last| last.clone())
}

fn record(error: Option<String>) {
    let at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    if let Ok(mut last) = LAST_RELOAD.lock() {
        *last = Some(ReloadOutcome { at, error });
    }
}

pub struct Reloader {
    pub config_path: PathBuf,
    pub edge: Arc<ArcSwap<Edge>>,
    /// Told after each successful reload (the ACME service looks again).
    pub reloaded: Arc<tokio::sync::Notify>,
}

/// Modification times of the files a snapshot depends on.
fn stamps(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    files.iter().map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok()).collect()
}

impl Reloader {
    /// Loads the config file again; on success the new snapshot serves every
    /// request that starts from now on.
    pub fn reload(&self, why: &str) -> bool {
        let old = self.edge.load();
        let new = match Edge::load_with(&self.config_path, &old.ops.discovered) {
            Ok(new) => new,
            Err(error) => {
                METRICS.operations.reloads.with_label_values(&["error"]).inc();
                log::error!("reload ({why}) refused, still serving the previous configuration: {error}");
                record(Some(error.to_string()));
                return false;
            }
        };
        if new.ops.listeners != old.ops.listeners {
            log::warn!(
                "listener changes take effect at the next restart or binary upgrade; the running listeners stay"
            );
        }
        for warning in &new.ops.warnings {
            log::warn!("{warning}");
        }
        install(&self.edge, new);
        METRICS.operations.reloads.with_label_values(&["ok"]).inc();
        record(None);
        log::info!("configuration reloaded ({why})");
        self.reloaded.notify_one();
        true
    }
}

/// Swaps a new snapshot in, carrying over what must outlive snapshots:
/// members' health and load, pool queues, rate-limit counts, the shared-limits connection.
pub fn install(cell: &ArcSwap<Edge>, mut new: Edge) {
    let old = cell.load();
    new.pools.adopt_state(&old.pools);
    new.upstreams.adopt_state(&old.upstreams);
    // A reload or a certificate renewal must not hand every client a fresh budget.
    new.policy.rate_limits.inherit(&old.policy.rate_limits);
    if let (Some(new_shared), Some(old_shared)) = (&new.policy.shared_limits, &old.policy.shared_limits) {
        if new_shared.config == old_shared.config {
            new.policy.shared_limits = Some(std::sync::Arc::clone(old_shared));
        }
    }
    // Members that left (a reload, DNS discovery) leave the worker gauge too,
    // or dashboards would show them up or down forever.
    let named_old = old.upstreams.all().iter().map(|u| &u.pool);
    for pool in old.pools.all().iter().chain(named_old) {
        for member in &pool.members {
            let named_new = new.upstreams.all().iter().map(|u| &u.pool);
            let stays = new
                .pools
                .all()
                .iter()
                .chain(named_new)
                .any(|p| p.label == pool.label && p.members.iter().any(|m| m.label == member.label));
            if !stays {
                let labels = [pool.label.as_str(), member.label.as_str()];
                let _ = METRICS.operations.worker_up.remove_label_values(&labels);
                let _ = METRICS.balancing.in_flight.remove_label_values(&labels);
                let _ = METRICS.balancing.long_polls.remove_label_values(&labels);
            }
        }
    }
    publish(&new);
    cell.store(Arc::new(new));
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
                    if self.reload("SIGHUP") {
                        seen = stamps(&self.edge.load().tls.certificate_files);
                    }
                }
                _ = tokio::time::sleep(interval), if self.edge.load().tls.certificate_watch.is_some() => {
                    let now = stamps(&self.edge.load().tls.certificate_files);
                    // A failed reload (a renewal caught half-written) is tried again next time.
                    if now != seen && self.reload("certificate files changed") {
                        seen = stamps(&self.edge.load().tls.certificate_files);
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
