//! Workers found by DNS: `{ discover: "_synapse-http._tcp.zone" }` (SRV) or
//! `{ discover: "host:port" }` (A/AAAA) in a worker list.
//!
//! Each name is looked up again when its records' TTL runs out (at most
//! `synapse.discovery.interval` apart, at least a second). When an answer
//! changes, the running snapshot is rebuilt from the config it was built
//! from with the new addresses and swapped in like a reload: members that
//! stay keep their health (and, on the hash ring their place, so only keys
//! of members that came or went move), requests in flight finish on the
//! snapshot they started with. A lookup that fails or comes back empty
//! keeps the last good answer: a DNS hiccup must not empty a pool.

use crate::config::values::DiscoverName;
use crate::edge::{Discovered, Edge};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
const SHORTEST: Duration = Duration::from_secs(1);
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Discovery {
    pub edge: Arc<ArcSwap<Edge>>,
    /// New answers go to the installer, which rebuilds in turn with reloads.
    pub installs: crate::services::install::Installs,
}

fn resolver(servers: &[SocketAddr]) -> Result<TokioResolver, hickory_resolver::net::NetError> {
    if servers.is_empty() {
        return TokioResolver::builder_tokio()?.build();
    }
    let mut config = ResolverConfig::from_name_servers(Vec::new());
    for server in servers {
        let mut udp = ConnectionConfig::udp();
        udp.port = server.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = server.port();
        config.add_name_server(NameServerConfig::new(server.ip(), true, vec![udp, tcp]));
    }
    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
    // One quick try per round: the next round is at most seconds away, and
    // a dead server must not hold a round for the default 2 x 5 s.
    builder.options_mut().timeout = Duration::from_secs(2);
    builder.options_mut().attempts = 1;
    builder.build()
}

/// Why a discovery round learned nothing new about a name.
#[derive(Debug, thiserror::Error)]
enum LookupError {
    #[error("{0}")]
    Dns(#[from] hickory_resolver::net::NetError),
    #[error("{host}: {error}")]
    Target { host: String, error: hickory_resolver::net::NetError },
    #[error("no addresses in the answer")]
    Empty,
}

/// The addresses a name lists now, and how long the answer holds.
async fn lookup(resolver: &TokioResolver, name: &DiscoverName) -> Result<(Vec<SocketAddr>, Instant), LookupError> {
    let mut found = Vec::new();
    let valid_until = match name {
        DiscoverName::Host { host, port } => {
            let answer = resolver.lookup_ip(format!("{host}.")).await?;
            found.extend(answer.iter().map(|ip| SocketAddr::new(ip, *port)));
            answer.valid_until()
        }
        DiscoverName::Srv(srv) => {
            let answer = resolver.srv_lookup(format!("{srv}.")).await?;
            let mut valid_until = answer.valid_until();
            for record in answer.answers() {
                let RData::SRV(target) = &record.data else { continue };
                let host = target.target.to_string();
                let ips = resolver
                    .lookup_ip(host.as_str())
                    .await
                    .map_err(|error| LookupError::Target { host: host.clone(), error })?;
                valid_until = valid_until.min(ips.valid_until());
                found.extend(ips.iter().map(|ip| SocketAddr::new(ip, target.port)));
            }
            valid_until
        }
    };
    found.sort();
    found.dedup();
    if found.is_empty() {
        return Err(LookupError::Empty);
    }
    Ok((found, valid_until))
}

#[async_trait]
impl BackgroundService for Discovery {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut resolver_for: Option<(Vec<SocketAddr>, TokioResolver)> = None;
        loop {
            let edge = self.edge.load_full();
            let names: Vec<DiscoverName> = edge.ops.config.synapse.discovered().into_iter().cloned().collect();
            let discovery = &edge.ops.config.synapse.discovery;
            let interval = discovery.interval.map_or(DEFAULT_INTERVAL, |s| s.0).max(SHORTEST);
            let mut sleep = if names.is_empty() { Duration::from_secs(5) } else { interval };
            if !names.is_empty() {
                if resolver_for.as_ref().is_none_or(|(servers, _)| *servers != discovery.servers) {
                    match resolver(&discovery.servers) {
                        Ok(resolver) => resolver_for = Some((discovery.servers.clone(), resolver)),
                        Err(error) => log::error!("worker discovery: cannot set up DNS: {error}"),
                    }
                }
                if let Some((_, resolver)) = &resolver_for {
                    let mut known: Discovered = edge.ops.discovered.clone();
                    let mut changed = false;
                    for name in &names {
                        match tokio::time::timeout(LOOKUP_TIMEOUT, lookup(resolver, name)).await {
                            Ok(Ok((found, valid_until))) => {
                                let ttl = valid_until.saturating_duration_since(Instant::now());
                                sleep = sleep.min(ttl.max(SHORTEST));
                                if known.get(name) != Some(&found) {
                                    log::info!("worker discovery: {name} lists {found:?}");
                                    known.insert(name.clone(), found);
                                    changed = true;
                                }
                            }
                            outcome => {
                                let why = match outcome {
                                    Ok(Err(error)) => error.to_string(),
                                    _ => format!("no answer within {LOOKUP_TIMEOUT:?}"),
                                };
                                crate::observe::metrics::METRICS.operations.discovery_failures.inc();
                                let kept = known.get(name).map_or(0, Vec::len);
                                log::warn!("worker discovery: lookup of {name} failed ({why}); keeping the last answer ({kept} addresses)");
                                sleep = sleep.min(SHORTEST * 5);
                            }
                        }
                    }
                    known.retain(|name, _| names.contains(name));
                    if changed {
                        self.installs.discovered(known);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
