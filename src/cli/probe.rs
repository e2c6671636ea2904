//! `matrix-edge probe [ready|live]`: asks the running edge's metrics
//! listener for `/readyz` or `/livez`, for a container health check or an
//! exec probe in an image that has no curl. Exit 0 on a 200.

use crate::cli::{edge, input, CliError};
use crate::config::Source;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Probe {
    /// Every listener accepts, and the edge is not stopping (`/readyz`).
    Ready,
    /// The process answers (`/livez`).
    Live,
}

impl Probe {
    fn path(self) -> &'static str {
        match self {
            Probe::Ready => "/readyz",
            Probe::Live => "/livez",
        }
    }
}

/// The metrics listener of the config, as a client reaches it: a wildcard
/// address is asked on loopback. Only the YAML is read (no certificates, no
/// DNS), so a probe stays cheap however often it runs.
pub fn address_from_config(config: &Path) -> Result<SocketAddr, CliError> {
    let parsed = Source::read(config).and_then(|source| source.parse()).map_err(|e| input(e.to_string()))?;
    let metrics = parsed.metrics.ok_or_else(|| {
        input(format!(
            "{}: no `metrics` listener to probe: add `metrics: {{ address: \"127.0.0.1:9090\" }}`",
            config.display()
        ))
    })?;
    let mut address = metrics.address.0;
    if address.ip().is_unspecified() {
        let loopback = match address.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        address.set_ip(loopback);
    }
    Ok(address)
}

pub fn run(address: SocketAddr, probe: Probe) -> Result<String, CliError> {
    let path = probe.path();
    let mut stream =
        TcpStream::connect_timeout(&address, TIMEOUT).map_err(|e| edge(format!("{address}{path}: {e}")))?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(|e| edge(e.to_string()))?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(|e| edge(e.to_string()))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
        .map_err(|e| edge(format!("{address}{path}: {e}")))?;
    let mut answer = Vec::with_capacity(256);
    stream.take(4096).read_to_end(&mut answer).map_err(|e| edge(format!("{address}{path}: {e}")))?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.split(' ').nth(1).unwrap_or("");
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body).trim();
    match status {
        "200" => Ok(format!("{address}{path}: {body}")),
        "" => Err(edge(format!("{address}{path}: no HTTP answer"))),
        status => Err(edge(format!("{address}{path}: {status} {body}"))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_wildcard_metrics_listener_is_probed_on_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        let write = |metrics: &str| {
            let text = format!(
                "server_name: example.org\nlisteners: [{{ address: \"127.0.0.1:8008\", tls: false, serves: [client] }}]\nsynapse: {{ main: \"127.0.0.1:8009\" }}\n{metrics}"
            );
            std::fs::write(&config, text).unwrap();
        };
        write("metrics: { address: \"0.0.0.0:9090\" }\n");
        assert_eq!(address_from_config(&config), Ok("127.0.0.1:9090".parse().unwrap()));
        write("metrics: { address: \"[::]:9091\" }\n");
        assert_eq!(address_from_config(&config), Ok("[::1]:9091".parse().unwrap()));
        write("");
        assert!(address_from_config(&config).is_err_and(|e| e.to_string().contains("no `metrics` listener")));
    }

    #[test]
    fn nothing_listening_is_a_failed_probe() {
        let unused = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr());
        let address = unused.unwrap();
        assert!(run(address, Probe::Ready).is_err());
    }
}
