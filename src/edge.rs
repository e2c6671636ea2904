//! The running configuration: everything a request needs, built and checked
//! from `EdgeConfig` in one place. A reload builds a new `Edge` and swaps it
//! in whole, so a request sees one consistent snapshot.

use crate::config::values::ListenAddr;
use crate::config::values::{Lookups, UpstreamAddr};
use crate::config::{ConfigError, EdgeConfig, Role, Seg, Source};
use crate::config::{SynapseConfig, WorkerList};
use crate::local::well_known::WellKnown;
use crate::request::admission::Limits;
use crate::request::forward::in_networks;
use crate::sites::Sites;
use crate::synapse::table::{Group, Methods, Router, Rule, Section, Sticky};
use crate::tls::{CertStore, CertifiedKey};
use crate::upstream::balance::{Balancing, Choice};
use crate::upstream::named::{NamedUpstream, NamedUpstreamError, NamedUpstreams};
use crate::upstream::peer::Upstream;
use crate::upstream::pool::{Member, Pool, Pools};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

/// One configuration's snapshot: what a request reads (sites, routing,
/// pools, policy), the certificates it serves, and what operations read
/// (listeners, the parsed config and its text, warnings). Each request pins
/// one; a reload builds a new one and swaps it in.
pub struct Edge {
    pub server_name: String,
    /// Virtual hosts, the Matrix site first.
    pub sites: crate::sites::Sites,
    /// Upstreams that site routes name.
    pub upstreams: crate::upstream::named::NamedUpstreams,
    pub router: Router,
    pub pools: Pools,
    pub main: Upstream,
    /// Metric handles for every group and worker above, resolved once.
    pub request_metrics: crate::observe::request_metrics::RequestMetrics,
    pub well_known: WellKnown,
    /// Who may reach what, the limits, and what goes to upstreams.
    pub policy: Policy,
    pub tls: TlsSnapshot,
    pub ops: Operations,
}

/// The per-request policy of a snapshot.
pub struct Policy {
    pub admin_allow: Vec<ipnet::IpNet>,
    pub mas_allow: Vec<ipnet::IpNet>,
    /// Trusted proxies in front, and the request-ID header to upstreams.
    pub forwarding: crate::request::forward::Forwarding,
    pub limits: Limits,
    pub connections: ConnectionLimits,
    pub rate_limits: crate::request::ratelimit::RateLimits,
    /// Counters in Redis shared with other edges (`rate_limits.shared`).
    pub shared_limits: Option<std::sync::Arc<crate::upstream::shared_limits::SharedCounters>>,
    /// Where the `redirect` role sends plain HTTP: the first TLS listener's port.
    pub https_port: Option<u16>,
    pub access_log: crate::observe::access_log::AccessLogFormat,
    /// How long a request whose upstream refused the connection is held.
    pub hold: std::time::Duration,
    /// How many may be held at once; past that, 503 at once.
    pub hold_limit: usize,
    /// The federation gate; `None` when `federation.verify.mode` is `off`.
    pub federation_gate: Option<std::sync::Arc<crate::federation::gate::Gate>>,
    /// How Synapse's JSON is compressed for clients; `None`: it is not.
    pub compression: Option<crate::request::compress::Compression>,
    /// Each origin's share of Synapse; `None`: no per-origin turns.
    pub turns: Option<crate::federation::turns::TurnSettings>,
    /// The media cache's sizes; `None`: media is not cached.
    pub media_cache: Option<MediaCacheSettings>,
}

/// `synapse.media_cache`, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaCacheSettings {
    pub memory: usize,
    pub max_object: usize,
}

/// The certificates a snapshot serves and where they come from.
pub struct TlsSnapshot {
    /// Swapped alone when ACME renews a certificate, so a renewal never
    /// depends on the config file being readable at that moment.
    pub certificates: arc_swap::ArcSwap<CertStore>,
    /// From `tls.certificates`, kept to rebuild `certificates` with new ACME ones.
    pub file_certificates: Vec<std::sync::Arc<CertifiedKey>>,
    pub acme: Option<crate::acme::AcmePlan>,
    /// Certificate and key files, resolved, for change detection.
    pub certificate_files: Vec<std::path::PathBuf>,
    pub certificate_watch: Option<std::time::Duration>,
}

/// What the services and commands read of a snapshot, never a request.
pub struct Operations {
    pub listeners: Vec<Listener>,
    pub health: HealthSettings,
    pub metrics_address: Option<std::net::SocketAddr>,
    pub config: EdgeConfig,
    /// Things that work but are probably not what the admin meant.
    pub warnings: Vec<String>,
    /// The text this snapshot was built from: DNS discovery rebuilds from it
    /// (not from the file, which may have changed or broken since).
    pub source: Source,
    /// Worker addresses from DNS this snapshot was built with.
    pub discovered: Discovered,
}

/// Addresses found for each `{ discover: ... }` name.
pub type Discovered = std::collections::BTreeMap<crate::config::values::DiscoverName, Vec<std::net::SocketAddr>>;

/// Per-connection protections, read when a connection is accepted.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_timeout: std::time::Duration,
    pub body_idle_timeout: std::time::Duration,
    /// 0: no cap.
    pub per_ip: u32,
    pub keepalive_requests: u32,
    pub keepalive_timeout: std::time::Duration,
}

fn check_limits(
    limits: &crate::config::LimitsConfig,
    rates: &crate::config::RateLimitsConfig,
    source: &Source,
) -> Result<(), ConfigError> {
    let at = |section, key| [Seg::Key(section), Seg::Key(key)];
    let nonzero_span = [
        ("header_timeout", limits.header_timeout),
        ("body_idle_timeout", limits.body_idle_timeout),
        ("keepalive_timeout", limits.keepalive_timeout),
    ];
    for (key, span) in nonzero_span {
        if span.0.is_zero() {
            return Err(source.error_at(&at("limits", key), "must be longer than 0s"));
        }
    }
    let counts = [("max_headers", limits.max_headers as u64), ("keepalive_requests", limits.keepalive_requests.into())];
    if let Some((key, _)) = counts.iter().find(|(_, count)| *count == 0) {
        return Err(source.error_at(&at("limits", key), "must be at least 1"));
    }
    for (key, rate) in [("login", rates.login), ("client", rates.client), ("federation", rates.federation)] {
        let Some(rate) = rate else { continue };
        let at = |field| [Seg::Key("rate_limits"), Seg::Key(key), Seg::Key(field)];
        if rate.requests == 0 {
            return Err(source.error_at(&at("requests"), "must be at least 1 (use `null` to turn the limit off)"));
        }
        if rate.per.0 < std::time::Duration::from_secs(1) || rate.per.0 > std::time::Duration::from_secs(86400) {
            return Err(source.error_at(&at("per"), "must be between 1s and 24h"));
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct HealthSettings {
    pub path: String,
    pub interval: std::time::Duration,
    pub timeout: std::time::Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub address: std::net::SocketAddr,
    pub tls: bool,
    pub roles: Vec<Role>,
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// PROXY protocol on a listener: who must send the header, and how fast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocol {
    pub from: Vec<ipnet::IpNet>,
    pub timeout: std::time::Duration,
}

impl ProxyProtocol {
    pub fn expected_from(&self, peer: Option<IpAddr>) -> bool {
        in_networks(&self.from, peer)
    }
}

impl crate::tls::CurrentCertificates for arc_swap::ArcSwap<Edge> {
    fn current(&self) -> std::sync::Arc<CertStore> {
        self.load().tls.certificates.load_full()
    }
}

/// File certificates first (they win the names they cover), then ACME's,
/// stored or placeholder.
fn certificate_store(
    files: &[std::sync::Arc<CertifiedKey>],
    acme: Option<&crate::acme::AcmePlan>,
) -> Result<CertStore, String> {
    let mut all = files.to_vec();
    if let Some(plan) = acme {
        all.extend(plan.certificates()?.into_iter().map(std::sync::Arc::new));
    }
    Ok(CertStore::new(all))
}

/// The names the edge answers over TLS, in the order the default certificate
/// should be picked: the server name (delegation), the federation and client
/// hosts, then every site host.
fn served_names(config: &EdgeConfig) -> Vec<String> {
    let mut names = vec![config.server_name.0.clone()];
    if let Some(server) = &config.well_known.server {
        names.push(server.host.clone());
    }
    if let Some(client) = &config.well_known.client {
        let host = client.homeserver.0.split("://").nth(1).and_then(|rest| rest.split(['/', ':']).next());
        names.extend(host.map(str::to_string));
    }
    names.extend(config.matrix_site.hosts.iter().flatten().map(|h| h.0.clone()));
    names.extend(config.sites.iter().flat_map(|site| site.hosts.iter().map(|h| h.0.clone())));
    let mut unique = Vec::with_capacity(names.len());
    for name in names {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if !unique.contains(&name) {
            unique.push(name);
        }
    }
    unique
}

impl Edge {
    /// Reads, parses and checks a config file.
    pub fn load(file: &Path) -> Result<Edge, ConfigError> {
        Edge::load_with(file, &Discovered::new())
    }

    /// Loads a config file with the worker addresses DNS discovery knows now.
    pub fn load_with(file: &Path, discovered: &Discovered) -> Result<Edge, ConfigError> {
        let source = Source::read(file)?;
        let config = source.parse()?;
        Edge::from_config_with(config, &source, discovered)
    }

    pub fn from_config(config: EdgeConfig, source: &Source) -> Result<Edge, ConfigError> {
        Edge::from_config_with(config, source, &Discovered::new())
    }

    /// Builds the snapshot; workers given as `{ discover: ... }` get the
    /// addresses in `discovered` (none yet: their groups go to main).
    pub fn from_config_with(config: EdgeConfig, source: &Source, discovered: &Discovered) -> Result<Edge, ConfigError> {
        Edge::build(config, source, discovered, &Lookups::strict())
    }

    /// The config file as `check` judges it: without a network too. A name
    /// that does not resolve is a warning, not an error; everything else is
    /// checked as a start would.
    pub fn check_file(file: &Path) -> Result<Edge, ConfigError> {
        let source = Source::read(file)?;
        let config = source.parse()?;
        let lookups = Lookups::lenient();
        let mut edge = Edge::build(config, &source, &Discovered::new(), &lookups)?;
        for unresolved in lookups.unresolved() {
            edge.ops.warnings.push(format!("{unresolved}: its address was not checked (a start needs it to resolve)"));
        }
        Ok(edge)
    }

    fn build(
        config: EdgeConfig,
        source: &Source,
        discovered: &Discovered,
        lookups: &Lookups,
    ) -> Result<Edge, ConfigError> {
        // Every section named, so a new one breaks the build until it is handled.
        let EdgeConfig {
            server_name,
            listeners: _,
            tls: _,
            well_known,
            synapse,
            admin_api: _,
            limits: _,
            rate_limits: _,
            process: _,
            metrics,
            upstreams: upstream_configs,
            sites: _,
            matrix_site: _,
            trusted_proxies: _,
            request_id_header: _,
            federation: _,
            compression: _,
            cluster: _,
        } = &config;
        let mut warnings = Vec::new();
        let listeners = build_listeners(&config, source, &mut warnings)?;
        let tls = build_tls(&config, &listeners, source, &mut warnings)?;
        check_well_known(&config, &listeners, source, &mut warnings)?;
        let policy = build_policy(&config, &listeners, source)?;

        let timeouts = &synapse.timeouts;
        if timeouts.keepalive_idle.0.as_secs() >= 60 {
            return Err(source.error_at(
                &[Seg::Key("synapse"), Seg::Key("timeouts"), Seg::Key("keepalive_idle")],
                "must stay below 60s: Synapse closes idle connections after about 60s, and reusing one it just closed fails the request",
            ));
        }
        let at_main = [Seg::Key("synapse"), Seg::Key("main")];
        let main = lookups.address(&synapse.main).map_err(|e| source.error_at(&at_main, e))?;
        let main = Upstream::new(&main, timeouts).map_err(|e| source.error_at(&at_main, e))?;
        let metrics_address = metrics.as_ref().map(|m| m.address.0);
        if let Some(address) = metrics_address {
            if listeners.iter().any(|l| l.address.port() == address.port()) {
                return Err(source.error_at(
                    &[Seg::Key("metrics"), Seg::Key("address")],
                    format!("{address} shares its port with a listener; metrics need their own, private listener"),
                ));
            }
        }
        let pools = build_pools(synapse, source, discovered, lookups)?;
        let router = build_router(synapse, &pools.declared(), source)?;
        let upstreams = build_named_upstreams(upstream_configs, source, lookups)?;
        let sites = Sites::from_config(&config, source, &upstreams)?;
        if !sites.single_site() && !listeners.iter().any(|l| l.roles.contains(&Role::Sites)) {
            warnings.push("sites are configured but no listener serves `sites`".into());
        }
        let health = HealthSettings {
            path: synapse.health_check.path.clone(),
            interval: synapse.health_check.interval.0,
            timeout: synapse.health_check.timeout.0,
        };
        let request_metrics = crate::observe::request_metrics::RequestMetrics::new(
            |group| pools.get(group).map(member_labels).unwrap_or_default(),
            upstreams.all().iter().map(|u| (u.name.as_str(), member_labels(&u.pool))),
        );
        Ok(Edge {
            server_name: server_name.0.clone(),
            sites,
            upstreams,
            router,
            pools,
            main,
            request_metrics,
            well_known: WellKnown::from_config(well_known, source)?,
            policy,
            tls,
            ops: Operations {
                listeners,
                health,
                metrics_address,
                config,
                warnings,
                source: source.clone(),
                discovered: discovered.clone(),
            },
        })
    }

    /// Builds the SNI map again from the file certificates and what the ACME
    /// store holds now, and swaps it in: new handshakes get the new
    /// certificates, established connections keep theirs.
    pub fn refresh_acme_certificates(&self) -> Result<(), String> {
        let store = certificate_store(&self.tls.file_certificates, self.tls.acme.as_ref())?;
        self.tls.certificates.store(std::sync::Arc::new(store));
        crate::tls::publish_expiry(&self.tls.certificates.load());
        Ok(())
    }

    pub fn admin_allowed(&self, client: Option<IpAddr>) -> bool {
        in_networks(&self.policy.admin_allow, client)
    }

    pub fn mas_api_allowed(&self, client: Option<IpAddr>) -> bool {
        in_networks(&self.policy.mas_allow, client)
    }

    /// One line for `check`: what this config will do.
    pub fn summary(&self) -> String {
        let certificates = self.tls.certificates.load();
        let listeners: Vec<String> = self
            .ops
            .listeners
            .iter()
            .map(|l| {
                let roles: Vec<String> = l.roles.iter().map(Role::to_string).collect();
                format!("{}{} [{}]", l.address, if l.tls { " tls" } else { "" }, roles.join(","))
            })
            .collect();
        let names: Vec<&str> =
            certificates.certificates().iter().filter_map(|c| c.names.first().map(String::as_str)).collect();
        let documents = self.well_known.configured();
        let acme = match &self.tls.acme {
            Some(plan) => format!(" (ACME from {} for {})", plan.directory_url, plan.names.join(", ")),
            None => String::new(),
        };
        format!(
            "server_name {}; listeners {}; certificates [{}]{acme}; well-known [{}]; synapse main {}",
            self.server_name,
            listeners.join(", "),
            names.join(", "),
            documents.join(", "),
            self.main.address
        )
    }
}

/// `listeners`, checked: addresses, roles, TLS, PROXY protocol.
fn build_listeners(
    config: &EdgeConfig,
    source: &Source,
    warnings: &mut Vec<String>,
) -> Result<Vec<Listener>, ConfigError> {
    let (listeners, tls) = (&config.listeners, &config.tls);
    if listeners.is_empty() {
        return Err(source.error_at(&[Seg::Key("listeners")], "at least one listener is needed"));
    }
    let mut seen = BTreeSet::new();
    let mut compiled = Vec::with_capacity(listeners.len());
    for (index, listener) in listeners.iter().enumerate() {
        let at = |key| [Seg::Key("listeners"), Seg::Index(index), Seg::Key(key)];
        let ListenAddr(address) = listener.address;
        if !seen.insert(address) {
            return Err(source.error_at(&at("address"), format!("{address} is used by two listeners")));
        }
        if listener.serves.is_empty() {
            return Err(source.error_at(&at("serves"), "list at least one of well_known, client, federation"));
        }
        let roles: BTreeSet<Role> = listener.serves.iter().copied().collect();
        if roles.len() != listener.serves.len() {
            return Err(source.error_at(&at("serves"), "a role is listed twice"));
        }
        if listener.tls && tls.certificates.is_empty() && tls.acme.is_none() {
            return Err(source.error_at(
                &at("tls"),
                "this listener uses TLS but there is no certificate: fill tls.certificates or set up tls.acme",
            ));
        }
        if roles.contains(&Role::Redirect) && roles.iter().any(|r| !matches!(r, Role::Acme | Role::Redirect)) {
            return Err(source.error_at(
                &at("serves"),
                "`redirect` answers every path with a redirect to https; it goes with `acme` alone",
            ));
        }
        let plain_only = [Role::Acme, Role::Redirect];
        if let Some(role) = plain_only.iter().find(|r| listener.tls && roles.contains(r)) {
            return Err(source.error_at(
                &at("serves"),
                format!("`{role}` is for a plain-HTTP listener (port 80); remove it here or set tls: false"),
            ));
        }
        if !listener.tls && roles.contains(&Role::Federation) {
            warnings.push(format!(
                "listener {address} serves federation without TLS: other homeservers only connect over TLS, so a TLS-terminating load balancer must sit in front"
            ));
        }
        let proxy_at = |key| [Seg::Key("listeners"), Seg::Index(index), Seg::Key("proxy_protocol"), Seg::Key(key)];
        let proxy_protocol = match &listener.proxy_protocol {
            Some(proxy) if proxy.from.is_empty() => {
                return Err(source.error_at(
                    &proxy_at("from"),
                    "list the load balancers' networks; without them no connection would be read as PROXY",
                ))
            }
            Some(proxy) if proxy.timeout.0.is_zero() || proxy.timeout.0 > std::time::Duration::from_secs(30) => {
                return Err(source.error_at(&proxy_at("timeout"), "must be between 1ms and 30s"))
            }
            Some(proxy) => {
                Some(ProxyProtocol { from: proxy.from.iter().map(|c| c.0).collect(), timeout: proxy.timeout.0 })
            }
            None => None,
        };
        compiled.push(Listener { address, tls: listener.tls, roles: roles.into_iter().collect(), proxy_protocol });
    }
    Ok(compiled)
}

/// `tls`: the certificate files read and checked, the ACME plan, the store served.
fn build_tls(
    config: &EdgeConfig,
    listeners: &[Listener],
    source: &Source,
    warnings: &mut Vec<String>,
) -> Result<TlsSnapshot, ConfigError> {
    let tls = &config.tls;
    let mut certs = Vec::with_capacity(tls.certificates.len());
    let mut certificate_files = Vec::with_capacity(tls.certificates.len() * 2);
    for (index, files) in tls.certificates.iter().enumerate() {
        let base = source.file.parent().unwrap_or(Path::new("."));
        certificate_files.push(base.join(&files.cert));
        certificate_files.push(base.join(&files.key));
        let cert = CertifiedKey::load(&base.join(&files.cert), &base.join(&files.key)).map_err(|e| {
            let key = match e {
                crate::tls::CertError::UnreadableKey { .. }
                | crate::tls::CertError::BadKey { .. }
                | crate::tls::CertError::KeyMismatch { .. } => "key",
                _ => "cert",
            };
            source
                .error_at(&[Seg::Key("tls"), Seg::Key("certificates"), Seg::Index(index), Seg::Key(key)], e.to_string())
        })?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        if cert.not_after_unix < now {
            warnings.push(format!("certificate {} has expired", files.cert.display()));
        }
        certs.push(std::sync::Arc::new(cert));
    }
    let file_store = CertStore::new(certs.clone());
    let acme = match &tls.acme {
        Some(acme) => {
            let served = served_names(config);
            let plan = crate::acme::AcmePlan::from_config(acme, &served, &|n| file_store.covers(n), source)?;
            if !listeners.iter().any(|l| l.roles.contains(&Role::Acme)) {
                return Err(source.error_at(
                    &[Seg::Key("tls"), Seg::Key("acme")],
                    "HTTP-01 needs a plain-HTTP listener on port 80 that serves `acme`: add `{ address: \"[::]:80\", serves: [acme, redirect] }` to listeners",
                ));
            }
            Some(plan)
        }
        None => None,
    };
    let certificates = certificate_store(&certs, acme.as_ref())
        .map_err(|e| source.error_at(&[Seg::Key("tls"), Seg::Key("acme")], e))?;
    Ok(TlsSnapshot {
        certificates: arc_swap::ArcSwap::from_pointee(certificates),
        file_certificates: certs,
        acme,
        certificate_files,
        certificate_watch: Some(tls.watch_interval.0).filter(|d| !d.is_zero()),
    })
}

/// The well-known documents against the listeners that must serve what they promise.
fn check_well_known(
    config: &EdgeConfig,
    listeners: &[Listener],
    source: &Source,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let well_known = &config.well_known;
    let serves = |role| listeners.iter().any(|l| l.roles.contains(&role));
    if let Some(server) = &well_known.server {
        if !serves(Role::Federation) {
            return Err(source.error_at(
                &[Seg::Key("well_known"), Seg::Key("server")],
                format!("m.server sends federation to {server}, but no listener serves federation: add `federation` to a listener's `serves`"),
            ));
        }
        let port = server.effective_port();
        let federation_ports: Vec<u16> =
            listeners.iter().filter(|l| l.roles.contains(&Role::Federation)).map(|l| l.address.port()).collect();
        if !federation_ports.contains(&port) {
            warnings.push(format!(
                "m.server points at port {port} but federation listeners are on {federation_ports:?}; fine only if a port mapping sits in between"
            ));
        }
    }
    if well_known.server.is_none() && config.synapse.federation != crate::config::FederationMode::OpenidOnly {
        // Plaintext federation listeners sit behind a TLS-terminating load
        // balancer, whose ports the config cannot see (and which is warned
        // about on its own).
        let federation_ports: Vec<u16> = listeners
            .iter()
            .filter(|l| l.tls && l.roles.contains(&Role::Federation))
            .map(|l| l.address.port())
            .collect();
        warnings.extend(undelegated_federation_warning(&config.server_name, &federation_ports));
    }
    if config.synapse.federation == crate::config::FederationMode::OpenidOnly && well_known.server.is_some() {
        return Err(source.error_at(
            &[Seg::Key("synapse"), Seg::Key("federation")],
            "openid_only closes federation, but well_known.server invites other homeservers: remove one of them",
        ));
    }
    let documents_configured =
        well_known.server.is_some() || well_known.client.is_some() || well_known.support.is_some();
    if documents_configured && !serves(Role::WellKnown) {
        return Err(source.error_at(
            &[Seg::Key("well_known")],
            "well-known documents are configured but no listener serves well_known",
        ));
    }
    Ok(())
}

/// Without `m.server`, other servers follow the spec's discovery for the
/// server name: its well-known (not published here), SRV records, then the
/// name's own port or 8448. A warning, not an error, when no federation
/// listener is on that port: an SRV record or a port mapping in front may
/// still bring them here, which the config cannot see.
fn undelegated_federation_warning(
    server_name: &crate::config::values::ServerName,
    federation_ports: &[u16],
) -> Option<String> {
    let address = server_name.address()?;
    if federation_ports.is_empty() {
        return None;
    }
    let (host, port) = (address.host.as_str(), address.effective_port());
    if federation_ports.contains(&port) {
        return None;
    }
    let discovery = if address.port.is_some() || host.parse::<IpAddr>().is_ok() {
        format!("other servers connect to {host}:{port}, which the server name names")
    } else {
        format!(
            "other servers look for https://{host}/.well-known/matrix/server (not published), then SRV records _matrix-fed._tcp.{host}, then connect to {host}:{port}"
        )
    };
    let suggested = federation_ports.first().map_or(443, |p| *p);
    Some(format!(
        "no listener serves federation on port {port} and well_known.server is not set: {discovery}, where this edge does not listen (it serves federation on {federation_ports:?}). Publish `well_known.server: \"{host}:{suggested}\"`, or add a listener on {port} serving federation; ignore this only if an SRV record or a port mapping in front sends them here"
    ))
}

/// Allow-lists, limits, rate limits (and their Redis), forwarding.
fn build_policy(config: &EdgeConfig, listeners: &[Listener], source: &Source) -> Result<Policy, ConfigError> {
    let (limits, rate_limits) = (&config.limits, &config.rate_limits);
    check_limits(limits, rate_limits, source)?;
    let shared = match (&rate_limits.shared, &config.cluster) {
        (Some(_), Some(_)) => {
            return Err(source.error_at(
                &[Seg::Key("rate_limits"), Seg::Key("shared")],
                "cluster.redis replaces rate_limits.shared: remove this, the rate limits are shared through cluster's Redis",
            ))
        }
        (Some(shared), None) => Some((shared.clone(), [Seg::Key("rate_limits"), Seg::Key("shared")])),
        (None, Some(cluster)) => Some((
            crate::config::SharedLimitsConfig {
                redis: cluster.redis.clone(),
                prefix: cluster.prefix.clone(),
                timeout: cluster.timeout,
            },
            [Seg::Key("cluster"), Seg::Key("redis")],
        )),
        (None, None) => None,
    };
    if let Some((shared, at)) = &shared {
        if shared.redis.starts_with("rediss://") || shared.redis.starts_with("valkeys://") {
            return Err(source.error_at(
                at,
                "TLS to Redis (rediss://) is not built in: reach Redis over a private network, or through a TLS tunnel (stunnel, spiped) listening on loopback",
            ));
        }
    }
    let shared_limits = match shared {
        Some((shared, at)) => Some(std::sync::Arc::new(
            crate::upstream::shared_limits::SharedCounters::new(&shared).map_err(|e| source.error_at(&at, e))?,
        )),
        None => None,
    };
    if let Some(name) = config.cluster.as_ref().and_then(|cluster| cluster.name.as_deref()) {
        if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(source.error_at(
                &[Seg::Key("cluster"), Seg::Key("name")],
                format!("1 to 64 visible ASCII characters, not {name:?}"),
            ));
        }
    }
    let request_id_header = match &config.request_id_header {
        Some(name) => Some(http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            source.error_at(&[Seg::Key("request_id_header")], format!("{name:?} is not a header name"))
        })?),
        None => None,
    };
    Ok(Policy {
        admin_allow: config.admin_api.allow.iter().map(|c| c.0).collect(),
        mas_allow: config.admin_api.mas_allow.iter().map(|c| c.0).collect(),
        forwarding: crate::request::forward::Forwarding {
            trusted_proxies: config.trusted_proxies.iter().map(|c| c.0).collect(),
            request_id_header,
        },
        limits: Limits { federation: config.synapse.federation, ..Limits::from_config(limits) },
        connections: ConnectionLimits {
            header_timeout: limits.header_timeout.0,
            body_idle_timeout: limits.body_idle_timeout.0,
            per_ip: limits.connections_per_ip,
            keepalive_requests: limits.keepalive_requests,
            keepalive_timeout: limits.keepalive_timeout.0,
        },
        rate_limits: crate::request::ratelimit::RateLimits::from_config(rate_limits),
        shared_limits,
        https_port: listeners.iter().find(|l| l.tls).map(|l| l.address.port()),
        access_log: config.process.access_log,
        hold: config.synapse.hold.0,
        hold_limit: config.synapse.hold_limit,
        federation_gate: build_federation_gate(config, source)?,
        compression: build_compression(&config.compression, source)?,
        turns: build_turns(&config.federation, source)?,
        media_cache: build_media_cache(config, source)?,
    })
}

/// `compression`: each level within its coding's range.
fn build_compression(
    config: &crate::config::CompressionConfig,
    source: &Source,
) -> Result<Option<crate::request::compress::Compression>, ConfigError> {
    for (key, level, most) in [("gzip", config.gzip, 9), ("brotli", config.brotli, 11), ("zstd", config.zstd, 19)] {
        if level > most {
            let at = [Seg::Key("compression"), Seg::Key(key)];
            return Err(source.error_at(&at, format!("{level} is not a {key} level: 1 to {most}, or 0 for none")));
        }
    }
    let any = config.gzip + config.brotli + config.zstd > 0;
    Ok((config.enabled && any).then_some(crate::request::compress::Compression {
        gzip: config.gzip,
        brotli: config.brotli,
        zstd: config.zstd,
        min_length: config.min_length.0,
    }))
}

/// `synapse.media_cache`: a file must fit in the memory given.
fn build_media_cache(config: &EdgeConfig, source: &Source) -> Result<Option<MediaCacheSettings>, ConfigError> {
    let Some(cache) = &config.synapse.media_cache else { return Ok(None) };
    let at = |key: &'static str| [Seg::Key("synapse"), Seg::Key("media_cache"), Seg::Key(key)];
    if cache.memory.0 < 1024 * 1024 {
        return Err(source.error_at(&at("memory"), "at least 1M"));
    }
    if cache.max_object.0 == 0 || cache.max_object.0 > cache.memory.0 {
        return Err(source.error_at(&at("max_object"), "above 0 and no more than memory"));
    }
    let size = |bytes: u64| usize::try_from(bytes).unwrap_or(usize::MAX);
    Ok(Some(MediaCacheSettings { memory: size(cache.memory.0), max_object: size(cache.max_object.0) }))
}

/// `federation.per_origin`: on with the gate unless said otherwise; weights by the cost table's names.
fn build_turns(
    federation: &crate::config::FederationConfig,
    source: &Source,
) -> Result<Option<crate::federation::turns::TurnSettings>, ConfigError> {
    use crate::synapse::federation_cost::{names, Weights};
    let config = &federation.per_origin;
    let at = |key: &'static str| [Seg::Key("federation"), Seg::Key("per_origin"), Seg::Key(key)];
    let mut weights = Weights::default();
    for (name, weight) in &config.weights {
        if *weight == 0 || !weights.set(name, *weight) {
            let known = names().join(", ");
            return Err(source.error_at(
                &at("weights"),
                format!("{name}: {weight}: weigh one of {known}, with a whole number from 1"),
            ));
        }
    }
    if config.max_in_flight == 0 {
        return Err(source.error_at(&at("max_in_flight"), "0 would let no origin in: at least 1"));
    }
    if config.queue_timeout.0.is_zero() && config.queue > 0 {
        return Err(source.error_at(&at("queue_timeout"), "a queue needs a timeout above 0 (or set queue: 0)"));
    }
    let gate_on = federation.verify.mode != crate::config::VerifyMode::Off;
    Ok(config.enabled.unwrap_or(gate_on).then_some(crate::federation::turns::TurnSettings {
        max_in_flight: config.max_in_flight,
        total_in_flight: config.total_in_flight,
        queue: config.queue,
        queue_timeout: config.queue_timeout.0,
        weights,
    }))
}

/// `federation`: the gate's mode, how it fetches keys, the deny and allow lists.
fn build_federation_gate(
    config: &EdgeConfig,
    source: &Source,
) -> Result<Option<std::sync::Arc<crate::federation::gate::Gate>>, ConfigError> {
    use crate::config::VerifyMode;
    use crate::federation::gate::{Gate, Mode, ServerList};
    let federation = &config.federation;
    let at = |key: &'static str| [Seg::Key("federation"), Seg::Key("verify"), Seg::Key(key)];
    let deny = ServerList::new(&federation.deny)
        .map_err(|e| source.error_at(&[Seg::Key("federation"), Seg::Key("deny")], e))?;
    let allow = match &federation.allow {
        Some(names) => {
            Some(ServerList::new(names).map_err(|e| source.error_at(&[Seg::Key("federation"), Seg::Key("allow")], e))?)
        }
        None => None,
    };
    let mode = match federation.verify.mode {
        VerifyMode::Off => {
            if !deny.is_empty() || allow.is_some() {
                return Err(source.error_at(
                    &at("mode"),
                    "federation.deny and federation.allow apply to verified origins: set mode to observe or enforce",
                ));
            }
            return Ok(None);
        }
        VerifyMode::Observe => Mode::Observe,
        VerifyMode::Enforce => Mode::Enforce,
    };
    let mut rules = Vec::new();
    for (index, rule) in federation.verify.connect_to.iter().enumerate() {
        let parsed = rule.parse::<crate::federation::fetch::ConnectTo>().map_err(|e| {
            source.error_at(&[Seg::Key("federation"), Seg::Key("verify"), Seg::Key("connect_to"), Seg::Index(index)], e)
        })?;
        rules.push(parsed);
    }
    // Relative to the configuration file, as certificate paths are.
    let base = source.file.parent().unwrap_or(Path::new("."));
    let ca_file = federation.verify.ca_file.as_ref().map(|file| base.join(file));
    let client = crate::federation::fetch::Client::new(rules, ca_file.as_deref())
        .map_err(|e| source.error_at(&at("ca_file"), e))?;
    let mut notaries = Vec::new();
    for (index, notary) in federation.verify.trusted_key_servers.iter().enumerate() {
        let here = [Seg::Key("federation"), Seg::Key("verify"), Seg::Key("trusted_key_servers"), Seg::Index(index)];
        if !crate::federation::header::is_server_name(&notary.server_name) {
            return Err(source.error_at(&here, format!("{:?} is not a server name", notary.server_name)));
        }
        let mut keys = Vec::new();
        for (key_id, text) in &notary.verify_keys {
            let key = crate::federation::keys::pinned_key(text)
                .filter(|_| key_id.starts_with("ed25519:"))
                .ok_or_else(|| source.error_at(&here, format!("verify_keys.{key_id}: not an ed25519 public key")))?;
            keys.push((key_id.clone(), key));
        }
        if keys.is_empty() {
            return Err(source.error_at(&here, "pin at least one key in verify_keys"));
        }
        notaries.push(crate::federation::keys::Notary { server_name: notary.server_name.clone(), keys });
    }
    crate::federation::counters::create_all();
    let shared = match &config.cluster {
        Some(cluster) => Some(
            crate::federation::keys::SharedKeys::new(&cluster.redis, &cluster.prefix)
                .map_err(|e| source.error_at(&[Seg::Key("cluster"), Seg::Key("redis")], e))?,
        ),
        None => None,
    };
    let fetcher = crate::federation::keys::KeyFetcher::new(client, federation.verify.dns, notaries, shared);
    Ok(Some(std::sync::Arc::new(Gate {
        mode,
        server_name: config.server_name.0.clone(),
        fetcher: std::sync::Arc::new(fetcher),
        deny,
        allow,
    })))
}

/// `upstreams`: each named upstream with its members and checks.
fn build_named_upstreams(
    configs: &crate::config::UpstreamsConfig,
    source: &Source,
    lookups: &Lookups,
) -> Result<NamedUpstreams, ConfigError> {
    let mut named = Vec::with_capacity(configs.len());
    for (name, upstream) in configs {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(source
                .error_at(&[Seg::Key("upstreams")], format!("upstream name {name:?}: use letters, digits, - and _")));
        }
        let at = [Seg::Key("upstreams"), Seg::Name(name.clone())];
        let built = NamedUpstream::from_config(name, upstream, lookups).map_err(|e| match e {
            NamedUpstreamError::Balancing((key, message)) => source.error_at(
                &[Seg::Key("upstreams"), Seg::Name(name.clone()), Seg::Key("balancing"), Seg::Key(key)],
                message,
            ),
            other => source.error_at(&at, other),
        })?;
        named.push(built);
    }
    Ok(NamedUpstreams::new(named))
}

/// A pool's member labels in its order, for the metric handles.
fn member_labels(pool: &crate::upstream::pool::Pool) -> Vec<&str> {
    pool.members.iter().map(|member| member.label.as_str()).collect()
}

/// Every declared group with where it sits in the file; config keys are the
/// groups' own names.
fn declared_groups(synapse: &SynapseConfig) -> Vec<(Group, Vec<Seg>, &WorkerList)> {
    let sections = [
        (Section::Workers.key(), &synapse.workers.lists),
        (Section::StreamWriters.key(), &synapse.stream_writers.lists),
    ];
    let mut declared: Vec<(Group, Vec<Seg>, &WorkerList)> = sections
        .into_iter()
        .flat_map(|(section, lists)| {
            lists.iter().map(move |(group, list)| {
                (*group, vec![Seg::Key("synapse"), Seg::Key(section), Seg::Key(group.name())], list)
            })
        })
        .collect();
    if let Some(mas) = &synapse.mas {
        declared.push((Group::Mas, vec![Seg::Key("synapse"), Seg::Key(Section::Mas.key())], mas));
    }
    declared
}

/// Each group's balancing: `synapse.balancing` with the group's overrides.
fn group_balancing(
    synapse: &SynapseConfig,
    declared: &[Group],
    source: &Source,
) -> Result<Vec<(Group, Balancing)>, ConfigError> {
    let section = |key: &'static str| [Seg::Key("synapse"), Seg::Key("balancing"), Seg::Key(key)];
    let defaults = &synapse.balancing;
    Balancing::from_config(defaults, Choice::LeastOutstanding).map_err(|(key, e)| source.error_at(&section(key), e))?;
    for (name, over) in &defaults.groups {
        let at = |key: Option<&'static str>| {
            let mut path =
                vec![Seg::Key("synapse"), Seg::Key("balancing"), Seg::Key("groups"), Seg::Name(name.clone())];
            path.extend(key.map(Seg::Key));
            path
        };
        match Group::from_name(name) {
            Some(group) if declared.contains(&group) => {}
            Some(_) => {
                return Err(
                    source.error_at(&at(None), format!("no {name} workers are listed, so nothing uses these settings"))
                )
            }
            None => return Err(source.error_at(&at(None), format!("{name:?} is not a worker group"))),
        }
        if !over.groups.is_empty() {
            return Err(source.error_at(&at(Some("groups")), "groups do not nest"));
        }
        Balancing::from_config(&defaults.merged(over), Choice::LeastOutstanding)
            .map_err(|(key, e)| source.error_at(&at(Some(key)), e))?;
    }
    declared
        .iter()
        .map(|&group| {
            let config = match defaults.groups.get(group.name()) {
                Some(over) => defaults.merged(over),
                None => defaults.clone(),
            };
            let balancing = Balancing::from_config(&config, Choice::LeastOutstanding)
                .map_err(|(key, e)| source.error_at(&section(key), e))?;
            Ok((group, balancing))
        })
        .collect()
}

fn build_pools(
    synapse: &SynapseConfig,
    source: &Source,
    discovered: &Discovered,
    lookups: &Lookups,
) -> Result<Pools, ConfigError> {
    let declared: Vec<Group> = declared_groups(synapse).iter().map(|(group, _, _)| *group).collect();
    let mut balancing = group_balancing(synapse, &declared, source)?;
    let mut pools = Vec::new();
    for (group, at, list) in declared_groups(synapse) {
        let entries = list.entries();
        if entries.is_empty() {
            return Err(source.error_at(&at, "list at least one worker address, or remove the key"));
        }
        if group.single_writer() && entries.len() > 1 {
            return Err(source.error_at(
                &at,
                format!("Synapse allows exactly one {group} stream writer (its `stream_writers.{group}` takes one instance), but {} are listed", entries.len()),
            ));
        }
        if group == Group::Sso && synapse.mas.is_some() {
            return Err(source.error_at(
                &at,
                format!("with the Matrix Authentication Service (synapse.mas) handling logins, Synapse's own SSO is off: remove the {group} worker"),
            ));
        }
        if group == Group::Sso && entries.len() > 1 {
            return Err(source.error_at(
                &at,
                format!("every step of an SSO login must reach the same process, so list exactly one {group} worker"),
            ));
        }
        let fixed = group.single_writer() || group == Group::Sso || group == Group::Mas;
        if fixed && entries.iter().any(|e| matches!(e, crate::config::WorkerConfig::Discovered(_))) {
            return Err(source.error_at(
                &at,
                format!("{group} must be one known process: give its address, not a name to discover"),
            ));
        }
        let mut members = Vec::with_capacity(entries.len());
        for entry in entries {
            let (health_port, weight) = match entry {
                crate::config::WorkerConfig::Address(_) => (synapse.health_check.port, 1),
                crate::config::WorkerConfig::Detailed(d) => (d.health_port.or(synapse.health_check.port), d.weight),
                crate::config::WorkerConfig::Discovered(d) => (d.health_port.or(synapse.health_check.port), d.weight),
            };
            let addresses = match entry {
                crate::config::WorkerConfig::Discovered(d) => discovered
                    .get(&d.discover)
                    .map(|found| found.iter().map(|a| UpstreamAddr::Tcp(*a)).collect())
                    .unwrap_or_default(),
                _ => match entry.address() {
                    Some(target) => vec![lookups.address(target).map_err(|e| source.error_at(&at, e))?],
                    None => Vec::new(),
                },
            };
            for address in addresses.iter() {
                let health = match (health_port, address) {
                    (Some(port), UpstreamAddr::Tcp(addr)) => {
                        UpstreamAddr::Tcp(std::net::SocketAddr::new(addr.ip(), port))
                    }
                    (Some(port), UpstreamAddr::Tls(addr, host)) => {
                        UpstreamAddr::Tls(std::net::SocketAddr::new(addr.ip(), port), host.clone())
                    }
                    _ => address.clone(),
                };
                let upstream = Upstream::new(address, &synapse.timeouts).map_err(|e| source.error_at(&at, e))?;
                if !members.iter().any(|m: &Member| m.upstream.address == upstream.address) {
                    members.push(Member::new(group.name(), upstream, health, weight));
                }
            }
        }
        let at = balancing.iter().position(|(g, _)| *g == group);
        let policy = at.map(|at| balancing.swap_remove(at).1).unwrap_or_default();
        pools.push((group, Pool::new(group.name(), members, policy)));
    }
    Ok(Pools::new(pools))
}

fn build_router(synapse: &SynapseConfig, declared: &[Group], source: &Source) -> Result<Router, ConfigError> {
    let mut rules = Vec::with_capacity(synapse.routes.len());
    for (index, route) in synapse.routes.iter().enumerate() {
        let at = |key| [Seg::Key("synapse"), Seg::Key("routes"), Seg::Index(index), Seg::Key(key)];
        if let Err(e) = regex::Regex::new(&route.path) {
            return Err(source.error_at(&at("path"), format!("not a valid regular expression: {e}")));
        }
        let methods = match &route.methods {
            None => Methods::Any,
            Some(names) => Methods::only(names.iter().map(String::as_str))
                .map_err(|name| source.error_at(&at("methods"), format!("unknown method {name:?}")))?,
        };
        let group = Group::from_name(&route.to).ok_or_else(|| {
            source.error_at(&at("to"), format!("{:?} is not main or a worker group or stream writer name", route.to))
        })?;
        if group != Group::Main && !declared.contains(&group) {
            return Err(source.error_at(
                &at("to"),
                format!("no {group} workers are declared under synapse.workers or synapse.stream_writers"),
            ));
        }
        let sticky = match route.sticky.as_deref() {
            None => Sticky::None,
            Some("user") => Sticky::User,
            Some("room") => Sticky::Room,
            Some("origin") => Sticky::Origin,
            Some(other) => return Err(source.error_at(&at("sticky"), format!("{other:?} is not user, room or origin"))),
        };
        rules.push(Rule {
            pattern: route.path.clone().into(),
            methods,
            chain: vec![group].into(),
            sticky,
            only_if_declared: false,
        });
    }
    Router::new(rules, declared).map_err(|e| source.error_at(&[Seg::Key("synapse"), Seg::Key("routes")], e.to_string()))
}
