//! Tells systemd (`Type=notify`) the edge is ready once every listener
//! accepts connections, so `systemctl start` returns only then, writes the
//! pid file at that moment, and turns `/readyz` to 200.

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::net::SocketAddr;
use std::time::Duration;

pub struct Readiness {
    pub addresses: Vec<SocketAddr>,
    /// Written with this process's ID once ready; `matrix-edge reload`
    /// reads it (and, after an upgrade, waits for the new ID to appear).
    pub pid_file: Option<std::path::PathBuf>,
    pub runtime: std::sync::Arc<crate::runtime::Runtime>,
}

/// Whether the kernel lists a socket in LISTEN state on this port. Reading
/// /proc instead of connecting keeps the check out of the TLS error log.
fn listening(port: u16) -> bool {
    let wanted = format!(":{port:04X} ");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                let mut fields = line.split_whitespace();
                let local = fields.nth(1).unwrap_or("");
                let state = fields.nth(1).unwrap_or("");
                state == "0A" && format!("{local} ").ends_with(&wanted)
            })
        })
    })
}

#[async_trait]
impl BackgroundService for Readiness {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        for address in &self.addresses {
            loop {
                if listening(address.port()) {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
        log::info!("listening on {} addresses", self.addresses.len());
        self.runtime.probes.mark_listening();
        if let Some(pid_file) = &self.pid_file {
            if let Err(e) = std::fs::write(pid_file, format!("{}\n", std::process::id())) {
                log::warn!("cannot write the pid file {}: {e}", pid_file.display());
            }
        }
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            // After an upgrade this process replaces the one systemd started.
            let states = [sd_notify::NotifyState::MainPid(std::process::id()), sd_notify::NotifyState::Ready];
            if let Err(e) = sd_notify::notify(false, &states) {
                log::warn!("cannot notify systemd: {e}");
            }
        }
    }
}
