//! The running configuration: everything a request needs, built and checked
//! from `EdgeConfig` in one place. A reload builds a new `Edge` and swaps it
//! in whole, so a request sees one consistent snapshot.

use crate::access::Limits;
use crate::config::values::ListenAddr;
use crate::config::{ConfigError, EdgeConfig, Role, Seg, Source};
use crate::tls::{CertStore, CertifiedKey};
use crate::upstream::Upstream;
use crate::well_known::WellKnown;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

pub struct Edge {
    pub server_name: String,
    pub listeners: Vec<Listener>,
    pub certificates: std::sync::Arc<CertStore>,
    pub well_known: WellKnown,
    pub main: Upstream,
    pub admin_allow: Vec<ipnet::IpNet>,
    pub limits: Limits,
    pub config: EdgeConfig,
    /// Things that work but are probably not what the admin meant.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub address: std::net::SocketAddr,
    pub tls: bool,
    pub roles: Vec<Role>,
}

impl Edge {
    /// Reads, parses and checks a config file.
    pub fn load(file: &Path) -> Result<Edge, ConfigError> {
        let source = Source::read(file)?;
        let config = source.parse()?;
        Edge::from_config(config, &source)
    }

    pub fn from_config(config: EdgeConfig, source: &Source) -> Result<Edge, ConfigError> {
        let EdgeConfig {
            server_name,
            listeners,
            tls,
            well_known,
            synapse,
            admin_api,
            limits,
            process: _,
        } = &config;

        if listeners.is_empty() {
            return Err(
                source.error_at(&[Seg::Key("listeners")], "at least one listener is needed")
            );
        }
        let mut warnings = Vec::new();
        let mut seen = BTreeSet::new();
        let mut compiled = Vec::with_capacity(listeners.len());
        for (index, listener) in listeners.iter().enumerate() {
            let at = |key| [Seg::Key("listeners"), Seg::Index(index), Seg::Key(key)];
            let ListenAddr(address) = listener.address;
            if !seen.insert(address) {
                return Err(source.error_at(
                    &at("address"),
                    format!("{address} is used by two listeners"),
                ));
            }
            if listener.serves.is_empty() {
                return Err(source.error_at(
                    &at("serves"),
                    "list at least one of well_known, client, federation",
                ));
            }
            let roles: BTreeSet<Role> = listener.serves.iter().copied().collect();
            if roles.len() != listener.serves.len() {
                return Err(source.error_at(&at("serves"), "a role is listed twice"));
            }
            if listener.tls && tls.certificates.is_empty() {
                return Err(source.error_at(
                    &at("tls"),
                    "this listener uses TLS but tls.certificates is empty",
                ));
            }
            if !listener.tls && roles.contains(&Role::Federation) {
                warnings.push(format!(
                    "listener {address} serves federation without TLS: other homeservers only connect over TLS, so a TLS-terminating load balancer must sit in front"
                ));
            }
            compiled.push(Listener {
                address,
                tls: listener.tls,
                roles: roles.into_iter().collect(),
            });
        }

        let mut certs = Vec::with_capacity(tls.certificates.len());
        for (index, files) in tls.certificates.iter().enumerate() {
            let base = source.file.parent().unwrap_or(Path::new("."));
            let cert = CertifiedKey::load(&base.join(&files.cert), &base.join(&files.key))
                .map_err(|e| {
                    let key = match e {
                        crate::tls::CertError::UnreadableKey { .. }
                        | crate::tls::CertError::BadKey { .. }
                        | crate::tls::CertError::KeyMismatch { .. } => "key",
                        _ => "cert",
                    };
                    source.error_at(
                        &[
                            Seg::Key("tls"),
                            Seg::Key("certificates"),
                            Seg::Index(index),
                            Seg::Key(key),
                        ],
                        e.to_string(),
                    )
                })?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            if cert.not_after_unix < now {
                warnings.push(format!("certificate {} has expired", files.cert.display()));
            }
            certs.push(cert);
        }

        let serves = |role| compiled.iter().any(|l| l.roles.contains(&role));
        if let Some(server) = &well_known.server {
            if !serves(Role::Federation) {
                return Err(source.error_at(
                    &[Seg::Key("well_known"), Seg::Key("server")],
                    format!("m.server sends federation to {server}, but no listener serves federation: add `federation` to a listener's `serves`"),
                ));
            }
            let port = server.effective_port();
            let federation_ports: Vec<u16> = compiled
                .iter()
                .filter(|l| l.roles.contains(&Role::Federation))
                .map(|l| l.address.port())
                .collect();
            if !federation_ports.contains(&port) {
                warnings.push(format!(
                    "m.server points at port {port} but federation listeners are on {federation_ports:?}; fine only if a port mapping sits in between"
                ));
            }
        }
        let documents_configured = well_known.server.is_some()
            || well_known.client.is_some()
            || well_known.support.is_some();
        if documents_configured && !serves(Role::WellKnown) {
            return Err(source.error_at(
                &[Seg::Key("well_known")],
                "well-known documents are configured but no listener serves well_known",
            ));
        }

        let timeouts = &synapse.timeouts;
        if timeouts.keepalive_idle.0.as_secs() >= 60 {
            return Err(source.error_at(
                &[Seg::Key("synapse"), Seg::Key("timeouts"), Seg::Key("keepalive_idle")],
                "must stay below 60s: Synapse closes idle connections after about 60s, and reusing one it just closed fails the request",
            ));
        }
        let main = Upstream::new(&synapse.main, timeouts)
            .map_err(|e| source.error_at(&[Seg::Key("synapse"), Seg::Key("main")], e))?;

        Ok(Edge {
            server_name: server_name.0.clone(),
            listeners: compiled,
            certificates: std::sync::Arc::new(CertStore::new(certs)),
            well_known: WellKnown::from_config(well_known, source)?,
            main,
            admin_allow: admin_api.allow.iter().map(|c| c.0).collect(),
            limits: Limits {
                max_upload_size: limits.max_upload_size.0,
                federation_max_body: limits.federation_max_body.0,
            },
            config,
            warnings,
        })
    }

    pub fn admin_allowed(&self, client: Option<IpAddr>) -> bool {
        client.is_some_and(|ip| {
            let ip = ip.to_canonical();
            self.admin_allow.iter().any(|net| net.contains(&ip))
        })
    }

    /// One line for `check`: what this config will do.
    pub fn summary(&self) -> String {
        let listeners: Vec<String> = self
            .listeners
            .iter()
            .map(|l| {
                let roles: Vec<String> = l.roles.iter().map(Role::to_string).collect();
                format!(
                    "{}{} [{}]",
                    l.address,
                    if l.tls { " tls" } else { "" },
                    roles.join(",")
                )
            })
            .collect();
        let names: Vec<&str> = self
            .certificates
            .certificates()
            .iter()
            .filter_map(|c| c.names.first().map(String::as_str))
            .collect();
        let documents = self.well_known.configured();
        format!(
            "server_name {}; listeners {}; certificates [{}]; well-known [{}]; synapse main {}",
            self.server_name,
            listeners.join(", "),
            names.join(", "),
            documents.join(", "),
            self.main.address
        )
    }
}
