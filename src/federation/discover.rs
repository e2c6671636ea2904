//! Server discovery as the spec orders it (IP literal, explicit port,
//! `/.well-known/matrix/server`, SRV `_matrix-fed._tcp` then `_matrix._tcp`,
//! port 8448): `doctor` reports each step, the federation gate follows them
//! to fetch an origin's keys.

use crate::federation::fetch::{Client, ConnectTo};
use crate::federation::{unreachable, FederationError};

/// Where a server's federation API answers: the TCP address to connect to,
/// and the name its certificate and `Host` must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub tls_name: String,
    pub connect_host: String,
    pub port: u16,
}

impl Located {
    /// `GET target` there (the certificate checked for `tls_name`).
    pub fn get(&self, client: &Client, target: &str) -> Result<crate::federation::fetch::Fetched, FederationError> {
        if self.connect_host == self.tls_name {
            return client.get(&self.tls_name, self.port, target, &[]);
        }
        let mut via = client.clone();
        via.connect_to.insert(
            0,
            ConnectTo {
                host: self.tls_name.to_ascii_lowercase(),
                port: Some(self.port),
                to_host: self.connect_host.clone(),
                to_port: None,
            },
        );
        via.get(&self.tls_name, self.port, target, &[])
    }
}

/// Follows discovery for `server_name`. Blocking (well-known over HTTPS, SRV).
pub fn locate(
    client: &Client,
    server_name: &str,
    dns: Option<std::net::SocketAddr>,
) -> Result<Located, FederationError> {
    let (host, port) = split_host_port(server_name);
    let literal = host.parse::<std::net::IpAddr>().is_ok();
    let direct = |host: String, port: u16| Located { tls_name: host.clone(), connect_host: host, port };
    if literal || port.is_some() {
        return Ok(direct(host, port.unwrap_or(8448)));
    }
    let delegated = client
        .get(&host, 443, "/.well-known/matrix/server", &[])
        .ok()
        .filter(|fetched| fetched.status == 200)
        .and_then(|fetched| fetched.json().ok())
        .and_then(|document| document["m.server"].as_str().map(str::to_string));
    let (name, name_port) = match &delegated {
        Some(m_server) => split_host_port(m_server),
        None => (host, None),
    };
    if name.parse::<std::net::IpAddr>().is_ok() || name_port.is_some() {
        return Ok(direct(name, name_port.unwrap_or(8448)));
    }
    if !client.overridden(&name) {
        for service in ["_matrix-fed._tcp", "_matrix._tcp"] {
            if let Some((target, target_port)) = srv_lookup(&format!("{service}.{name}"), dns)? {
                return Ok(Located { tls_name: name, connect_host: target, port: target_port });
            }
        }
    }
    Ok(direct(name, 8448))
}

pub fn split_host_port(name: &str) -> (String, Option<u16>) {
    if let Some(rest) = name.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            return (host.to_string(), after.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    if name.parse::<std::net::Ipv6Addr>().is_ok() {
        return (name.to_string(), None);
    }
    match name.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => (host.to_string(), port.parse().ok()),
        _ => (name.to_string(), None),
    }
}

pub fn srv_lookup(name: &str, dns: Option<std::net::SocketAddr>) -> Result<Option<(String, u16)>, FederationError> {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| unreachable(e.to_string()))?;
    runtime.block_on(async {
        let mut builder = match dns {
            Some(server) => {
                let mut config = ResolverConfig::from_name_servers(Vec::new());
                let mut udp = ConnectionConfig::udp();
                udp.port = server.port();
                config.add_name_server(NameServerConfig::new(server.ip(), true, vec![udp]));
                hickory_resolver::TokioResolver::builder_with_config(
                    config,
                    hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
                )
            }
            None => hickory_resolver::TokioResolver::builder_tokio().map_err(|e| unreachable(e.to_string()))?,
        };
        builder.options_mut().timeout = std::time::Duration::from_secs(3);
        builder.options_mut().attempts = 1;
        let resolver = builder.build().map_err(|e| unreachable(e.to_string()))?;
        match resolver.srv_lookup(format!("{name}.")).await {
            Ok(answer) => Ok(answer.answers().iter().find_map(|record| match &record.data {
                hickory_resolver::proto::rr::RData::SRV(srv) => {
                    Some((srv.target.to_string().trim_end_matches('.').to_string(), srv.port))
                }
                _ => None,
            })),
            Err(error) if error.to_string().contains("no record") || error.to_string().contains("NXDomain") => Ok(None),
            Err(error) => Err(unreachable(error.to_string())),
        }
    })
}
