//! The one place snapshots are swapped. A reload (SIGHUP, certificate
//! files changed) and DNS discovery send it a reason; one task builds each
//! new snapshot from the config it last installed (or the file, for a
//! reload) with the latest addresses discovery found, and installs one at
//! a time. Two services swapping on their own could each build from the
//! snapshot they saw and undo the other's change: a discovery rebuild from
//! the config before a reload, or a reload with addresses from before a
//! lookup.

use crate::edge::{Discovered, Edge};
use crate::observe::metrics::METRICS;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// Why a new snapshot is wanted.
pub enum Reason {
    /// Read the config file again; `done` hears whether it went in.
    Reload { why: &'static str, done: Option<oneshot::Sender<bool>> },
    /// The addresses DNS discovery knows now, every name's.
    Discovered(Discovered),
}

/// Where reasons go; cheap to clone.
#[derive(Clone)]
pub struct Installs(mpsc::UnboundedSender<Reason>);

impl Installs {
    /// Reloads the config file; true once the new snapshot serves.
    pub async fn reload(&self, why: &'static str) -> bool {
        let (done, outcome) = oneshot::channel();
        if self.0.send(Reason::Reload { why, done: Some(done) }).is_err() {
            return false;
        }
        outcome.await.unwrap_or(false)
    }

    /// New addresses from discovery; installed in turn, after what came before.
    pub fn discovered(&self, discovered: Discovered) {
        if self.0.send(Reason::Discovered(discovered)).is_err() {
            log::error!("worker discovery: the installer has stopped; new addresses not applied");
        }
    }
}

/// Builds and swaps snapshots, one reason at a time.
pub struct Installer {
    pub cell: Arc<ArcSwap<Edge>>,
    pub config_path: PathBuf,
    /// The latest addresses from discovery, for every build.
    discovered: Discovered,
    /// Told after each successful reload (the ACME service looks again).
    pub reloaded: Arc<tokio::sync::Notify>,
    /// Where the reload's outcome is kept for the status page.
    pub runtime: Arc<crate::runtime::Runtime>,
}

impl Installer {
    pub fn new(
        cell: Arc<ArcSwap<Edge>>,
        config_path: PathBuf,
        reloaded: Arc<tokio::sync::Notify>,
        runtime: Arc<crate::runtime::Runtime>,
    ) -> Installer {
        let discovered = cell.load().ops.discovered.clone();
        Installer { cell, config_path, discovered, reloaded, runtime }
    }

    /// Carries out one reason; true when a new snapshot went in.
    pub fn apply(&mut self, reason: Reason) -> bool {
        match reason {
            Reason::Reload { why, done } => {
                let installed = self.reload(why);
                if let Some(done) = done {
                    let _ = done.send(installed);
                }
                installed
            }
            Reason::Discovered(discovered) => {
                self.discovered = discovered;
                let base = self.cell.load_full();
                match Edge::from_config_with(base.ops.config.clone(), &base.ops.source, &self.discovered) {
                    Ok(new) => {
                        install(&self.cell, new);
                        log::info!("worker discovery: pools updated");
                        true
                    }
                    Err(error) => {
                        log::error!("worker discovery: cannot rebuild the configuration: {error}");
                        false
                    }
                }
            }
        }
    }

    fn reload(&self, why: &str) -> bool {
        let new = match Edge::load_with(&self.config_path, &self.discovered) {
            Ok(new) => new,
            Err(error) => {
                METRICS.operations.reloads.with_label_values(&["error"]).inc();
                log::error!("reload ({why}) refused, still serving the previous configuration: {error}");
                self.runtime.record_reload(Some(error.to_string()));
                return false;
            }
        };
        if new.ops.listeners != self.cell.load().ops.listeners {
            log::warn!(
                "listener changes take effect at the next restart or binary upgrade; the running listeners stay"
            );
        }
        for warning in &new.ops.warnings {
            log::warn!("{warning}");
        }
        install(&self.cell, new);
        METRICS.operations.reloads.with_label_values(&["ok"]).inc();
        self.runtime.record_reload(None);
        log::info!("configuration reloaded ({why})");
        self.reloaded.notify_one();
        true
    }

    /// The installer as a service, and where to send it reasons.
    pub fn service(self) -> (InstallerService, Installs) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (InstallerService { installer: Mutex::new(Some((self, receiver))) }, Installs(sender))
    }
}

/// Swaps a new snapshot in, carrying over what must outlive snapshots:
/// members' health and load, pool queues, rate-limit counts, the shared-limits connection.
fn install(cell: &ArcSwap<Edge>, mut new: Edge) {
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
    crate::services::reload::publish(&new);
    cell.store(Arc::new(new));
}

type Pending = (Installer, mpsc::UnboundedReceiver<Reason>);

/// The task that owns the swap.
pub struct InstallerService {
    installer: Mutex<Option<Pending>>,
}

#[async_trait]
impl BackgroundService for InstallerService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let taken = self.installer.lock().ok().and_then(|mut slot| slot.take());
        let Some((mut installer, mut reasons)) = taken else { return };
        loop {
            tokio::select! {
                reason = reasons.recv() => match reason {
                    Some(reason) => {
                        installer.apply(reason);
                    }
                    None => return,
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;
    use crate::config::values::DiscoverName;
    use std::net::SocketAddr;

    pub fn config(upload_mib: u32) -> String {
        format!(
            "server_name: example.com\nlisteners:\n  - {{ address: \"127.0.0.1:1\", serves: [client] }}\nsynapse:\n  main: 127.0.0.1:8008\n  workers:\n    synchrotron: [{{ discover: \"sync.test:8083\" }}]\n  discovery: {{ servers: [\"127.0.0.1:53\"], interval: 1s }}\nlimits: {{ max_upload_size: {upload_mib}M }}\n"
        )
    }

    pub fn discovered(port: u16) -> Discovered {
        let name: DiscoverName = serde_yaml::from_str("\"sync.test:8083\"").unwrap();
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        [(name, vec![address])].into_iter().collect()
    }

    pub fn upload_limit(edge: &Edge) -> u64 {
        edge.ops.config.limits.max_upload_size.0
    }

    pub fn synchrotrons(edge: &Edge) -> Vec<String> {
        let pool = edge.pools.get(crate::synapse::table::Group::Synchrotron).unwrap();
        pool.members.iter().map(|m| m.label.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;

    /// Reloads (each a new config file) and discovery answers (each new
    /// addresses) arrive from two threads at once, many times: the snapshot
    /// at the end has the last of both. (Before the installer, the reload
    /// service and discovery each built from the snapshot they saw and
    /// swapped on their own; the same interleaving through them lost one
    /// or the other in 19 of 20 runs.)
    #[test]
    fn interleaved_reloads_and_discovery_lose_neither() {
        const ROUNDS: u16 = 40;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, config(1)).unwrap();
        let cell = Arc::new(ArcSwap::from_pointee(Edge::load(&path).unwrap()));
        let installer = Installer::new(Arc::clone(&cell), path.clone(), Arc::default(), Arc::default());
        let (service, installs) = installer.service();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let (_stop, watch) = tokio::sync::watch::channel(false);
            let running = tokio::spawn(async move { service.start(watch).await });
            let reloads = {
                let installs = installs.clone();
                let path = path.clone();
                tokio::spawn(async move {
                    for round in 1..=ROUNDS {
                        std::fs::write(&path, config(u32::from(round) + 1)).unwrap();
                        assert!(installs.reload("test").await);
                    }
                })
            };
            let lookups = tokio::task::spawn_blocking(move || {
                for round in 1..=ROUNDS {
                    installs.discovered(discovered(9000 + round));
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                installs
            });
            reloads.await.unwrap();
            let installs = lookups.await.unwrap();
            // One more reload, answered after every reason sent before it.
            assert!(installs.reload("last").await);
            drop(installs);
            running.await.unwrap();
        });
        let edge = cell.load();
        assert_eq!(upload_limit(&edge), (u64::from(ROUNDS) + 1) << 20, "a discovery rebuild undid a reload");
        assert_eq!(synchrotrons(&edge), [format!("127.0.0.1:{}", 9000 + ROUNDS)], "a reload undid discovery");
    }

    #[test]
    fn a_refused_reload_keeps_the_running_snapshot_and_the_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, config(7)).unwrap();
        let cell = Arc::new(ArcSwap::from_pointee(Edge::load(&path).unwrap()));
        let mut installer = Installer::new(Arc::clone(&cell), path.clone(), Arc::default(), Arc::default());
        assert!(installer.apply(Reason::Discovered(discovered(9100))));
        std::fs::write(&path, "server_name: [").unwrap();
        assert!(!installer.apply(Reason::Reload { why: "test", done: None }));
        assert_eq!(upload_limit(&cell.load()), 7 << 20);
        assert_eq!(synchrotrons(&cell.load()), ["127.0.0.1:9100"]);
        std::fs::write(&path, config(8)).unwrap();
        assert!(installer.apply(Reason::Reload { why: "test", done: None }));
        assert_eq!(synchrotrons(&cell.load()), ["127.0.0.1:9100"], "the reload forgot the discovered addresses");
    }
}
