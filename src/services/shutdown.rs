//! A stop asked with SIGTERM ends as soon as nothing is in flight, instead
//! of after the whole of `process.shutdown_drain`: Pingora stops accepting
//! and then sleeps the full grace period even when every request has
//! finished, which outlasts `podman stop`'s 10 s and turns a clean stop
//! into a SIGKILL. Readiness turns to draining on any stop (SIGTERM, an
//! upgrade's SIGQUIT), so a load balancer sends nothing more.

use crate::observe::metrics::METRICS;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// How often the in-flight count is looked at while draining.
const POLL: Duration = Duration::from_millis(100);
/// Room for connections accepted just before the listeners closed to have
/// their request counted before "nothing in flight" is believed.
const SETTLE: Duration = Duration::from_millis(300);

pub struct StopWhenDrained {
    pub runtime: std::sync::Arc<crate::runtime::Runtime>,
}

#[async_trait]
impl BackgroundService for StopWhenDrained {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut terminate = match signal(SignalKind::terminate()) {
            Ok(terminate) => terminate,
            Err(error) => {
                log::warn!("cannot watch SIGTERM ({error}): a stop waits the whole shutdown_drain");
                let _ = shutdown.wait_for(|stopping| *stopping).await;
                self.runtime.probes.mark_draining();
                return;
            }
        };
        tokio::select! {
            _ = terminate.recv() => {}
            _ = shutdown.wait_for(|stopping| *stopping) => {
                // An upgrade or a fast stop: Pingora ends the process.
                self.runtime.probes.mark_draining();
                return;
            }
        }
        self.runtime.probes.mark_draining();
        // Pingora closes the listeners on the same signal.
        let _ = tokio::time::timeout(Duration::from_secs(2), shutdown.wait_for(|stopping| *stopping)).await;
        tokio::time::sleep(SETTLE).await;
        loop {
            if METRICS.traffic.in_flight.get() <= 0 {
                log::info!("stopping: nothing in flight");
                std::process::exit(0);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}
