//! `matrix-edge init --from-synapse homeserver.yaml [--workers DIR]`: a
//! commented starting config read off Synapse's own.
//!
//! What Synapse's config says is taken as it is (server name, public URL,
//! the main listener, upload size, stream writers, MAS); which group a
//! generic worker serves is not in Synapse's config (it is the proxy's
//! decision), so it is read from the worker's name the way Synapse's own
//! docker scripts name them (`synchrotron1`, `client_reader2`...), and a
//! worker whose name says nothing is listed in a comment for the admin.

use crate::cli::{input, CliError};
use crate::synapse::table::{Group, Section};
use serde_yaml::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub struct InitOptions {
    pub homeserver: PathBuf,
    pub workers: Option<PathBuf>,
    /// The public listener; default `[::]:443`.
    pub listen: Option<String>,
    /// Certificate files; without them the config uses ACME.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Stream writers the edge routes to, by Synapse's stream names (events and
/// others take no HTTP traffic from clients): the registry's, so `init` and
/// `check --synapse` know every one the table routes.
pub(crate) fn routed_streams() -> impl Iterator<Item = &'static str> {
    Group::in_section(Section::StreamWriters).map(|spec| spec.name)
}

pub(crate) fn read_yaml(path: &Path) -> Result<Value, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| input(format!("cannot read {}: {e}", path.display())))?;
    serde_yaml::from_str(&text).map_err(|e| input(format!("{}: {e}", path.display())))
}

fn text<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

/// The first HTTP listener serving `client`, `federation` or `media`: the one the edge sends to.
fn client_listener(listeners: &Value) -> Option<&Value> {
    listeners.as_sequence()?.iter().find(|listener| {
        let names: Vec<&str> = listener
            .get("resources")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(|r| r.get("names").and_then(Value::as_sequence))
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        text(listener, "type") == Some("http") && names.iter().any(|n| matches!(*n, "client" | "federation" | "media"))
    })
}

/// The header Synapse's client listener takes its request IDs from (`request_id_header`).
pub(crate) fn request_id_header(listeners: &Value) -> Option<String> {
    client_listener(listeners).and_then(|listener| text(listener, "request_id_header")).map(str::to_string)
}

/// The loopback-reachable address of an HTTP listener serving `client`, `federation` or `media`.
pub(crate) fn http_address(listeners: &Value) -> Option<(String, bool)> {
    if let Some(listener) = client_listener(listeners) {
        let port = listener.get("port").and_then(Value::as_u64)?;
        let bind = listener
            .get("bind_addresses")
            .and_then(Value::as_sequence)
            .and_then(|b| b.first())
            .and_then(Value::as_str)
            .unwrap_or("127.0.0.1");
        let host = match bind {
            "0.0.0.0" | "" => "127.0.0.1".to_string(),
            "::" => "[::1]".to_string(),
            v6 if v6.contains(':') => format!("[{v6}]"),
            other => other.to_string(),
        };
        let x_forwarded = listener.get("x_forwarded").and_then(Value::as_bool).unwrap_or(false);
        return Some((format!("{host}:{port}"), x_forwarded));
    }
    None
}

/// The group a worker's name says it serves.
fn group_from_name(name: &str) -> Option<&'static str> {
    let base = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-' || c == '_').to_ascii_lowercase();
    Group::in_section(Section::Workers)
        .find(|spec| spec.worker_name_hints.iter().any(|f| base == *f || base.replace('-', "_") == *f))
        .map(|spec| spec.name)
}

pub(crate) struct Worker {
    pub name: String,
    pub address: String,
    pub app: String,
    pub media: bool,
}

pub(crate) fn read_workers(dir: &Path, warnings: &mut Vec<String>) -> Result<Vec<Worker>, CliError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| input(format!("cannot read {}: {e}", dir.display())))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json"))
        .collect();
    files.sort();
    let mut workers = Vec::new();
    for file in files {
        let Ok(config) = read_yaml(&file) else { continue };
        let (Some(app), Some(name)) = (text(&config, "worker_app"), text(&config, "worker_name")) else { continue };
        let Some((address, x_forwarded)) = config.get("worker_listeners").and_then(http_address) else {
            warnings.push(format!(
                "worker {name} ({}) has no HTTP listener for client or federation traffic: not routed",
                file.display()
            ));
            continue;
        };
        if !x_forwarded {
            warnings.push(format!(
                "worker {name} listens without x_forwarded: true, so it would log the edge's address for every client"
            ));
        }
        let media = app.ends_with(Group::MediaRepository.name())
            || config.get("enable_media_repo").and_then(Value::as_bool) == Some(true);
        workers.push(Worker { name: name.to_string(), address, app: app.to_string(), media });
    }
    Ok(workers)
}

/// `synapse.workers` and `synapse.stream_writers` from the workers' files
/// and Synapse's `stream_writers`.
fn worker_sections(
    out: &mut String,
    homeserver: &Value,
    options: &InitOptions,
    warnings: &mut Vec<String>,
) -> Result<(), CliError> {
    let workers = match &options.workers {
        Some(dir) => read_workers(dir, warnings)?,
        None => Vec::new(),
    };
    let writers = homeserver.get("stream_writers");
    let writer_of = |name: &str| -> Option<&'static str> {
        routed_streams().find(|stream| {
            writers
                .and_then(|w| w.get(*stream))
                .map(|v| match v {
                    Value::Sequence(list) => list.iter().any(|n| n.as_str() == Some(name)),
                    Value::String(one) => one == name,
                    _ => false,
                })
                .unwrap_or(false)
        })
    };
    let mut groups: Vec<(&str, Vec<&Worker>)> = Vec::new();
    let mut streams: Vec<(&str, Vec<&Worker>)> = Vec::new();
    let mut unplaced = Vec::new();
    for worker in &workers {
        if let Some(stream) = writer_of(&worker.name) {
            match streams.iter_mut().find(|(s, _)| *s == stream) {
                Some((_, list)) => list.push(worker),
                None => streams.push((stream, vec![worker])),
            }
            continue;
        }
        let group = if worker.media { Some(Group::MediaRepository.name()) } else { group_from_name(&worker.name) };
        match group {
            Some(group) => match groups.iter_mut().find(|(g, _)| *g == group) {
                Some((_, list)) => list.push(worker),
                None => groups.push((group, vec![worker])),
            },
            None => unplaced.push(worker),
        }
    }
    if !groups.is_empty() || !unplaced.is_empty() {
        let _ = writeln!(out, "  workers:");
        for (group, members) in &groups {
            let addresses: Vec<String> = members.iter().map(|w| format!("\"{}\"", w.address)).collect();
            let names: Vec<&str> = members.iter().map(|w| w.name.as_str()).collect();
            let _ = writeln!(out, "    {group}: [{}]   # {}", addresses.join(", "), names.join(", "));
        }
        for worker in &unplaced {
            let _ = writeln!(
                out,
                "    # {} ({}, {}): its name does not say which requests it serves; add it to a group above",
                worker.name, worker.app, worker.address
            );
        }
    }
    if !streams.is_empty() {
        let _ = writeln!(out, "  stream_writers:   # from Synapse's stream_writers");
        for (stream, members) in &streams {
            let addresses: Vec<String> = members.iter().map(|w| format!("\"{}\"", w.address)).collect();
            let _ = writeln!(out, "    {stream}: [{}]", addresses.join(", "));
        }
    }
    for stream in routed_streams() {
        let named = writers.and_then(|w| w.get(stream)).is_some();
        if named && !streams.iter().any(|(s, _)| *s == stream) && options.workers.is_some() {
            warnings.push(format!(
                "stream_writers.{stream} names a worker whose config was not found in the workers directory"
            ));
        }
    }
    Ok(())
}

/// `well_known.server`, and why. Without it other servers follow the
/// spec's discovery to the server name's port 8448; the edge's one listener
/// is elsewhere (443 by default), so the document sends them there, as
/// Synapse's own `serve_server_wellknown` does: one port to open for
/// clients and servers alike, one certificate, and no second listener.
fn server_delegation(server_name: &str, base_host: Option<&str>, listen_port: u16) -> String {
    let mut out = String::new();
    match base_host {
        Some(host) if host != server_name => {
            let with_port = if host.contains(':') { host.to_string() } else { format!("{host}:{listen_port}") };
            let _ = writeln!(out, "  # Federation goes to public_baseurl's host, on the listener above.");
            let _ = writeln!(out, "  server: {with_port}");
        }
        _ if server_name.contains(':') => {
            let _ = writeln!(out, "  # server: not published: {server_name} names its own port, where other");
            let _ = writeln!(out, "  # servers connect directly; a listener must serve federation there.");
        }
        _ if listen_port == 8448 => {
            let _ = writeln!(out, "  # server: not needed: other servers try {server_name}:8448 by default,");
            let _ = writeln!(out, "  # where the listener above serves federation.");
        }
        _ => {
            let _ = writeln!(out, "  # Other servers read this first; without it they would try {server_name}:8448");
            let _ = writeln!(out, "  # (the spec's default), where nothing listens. It sends them to the listener");
            let _ = writeln!(out, "  # above instead, as Synapse's serve_server_wellknown would: one port and one");
            let _ =
                writeln!(out, "  # certificate for clients and servers. Behind a port mapping, name the public port.");
            let _ = writeln!(out, "  server: {server_name}:{listen_port}");
        }
    }
    out
}

/// The config text, and warnings for the admin.
pub fn init(options: &InitOptions) -> Result<(String, Vec<String>), CliError> {
    let homeserver = read_yaml(&options.homeserver)?;
    let mut warnings = Vec::new();
    let server_name =
        text(&homeserver, "server_name").ok_or_else(|| input("homeserver.yaml has no server_name"))?.to_string();
    let public_baseurl = text(&homeserver, "public_baseurl").map(|u| u.trim_end_matches('/').to_string());
    let (main, x_forwarded) = homeserver
        .get("listeners")
        .and_then(http_address)
        .ok_or_else(|| input("homeserver.yaml has no HTTP listener serving client or federation"))?;
    if !x_forwarded {
        warnings.push(format!(
            "Synapse's listener {main} has x_forwarded off: set `x_forwarded: true` so it logs and rate-limits the real client, not the edge"
        ));
    }
    let request_id = homeserver.get("listeners").and_then(request_id_header);
    if request_id.is_none() {
        warnings.push(format!(
            "Synapse's listener {main} has no request_id_header: add `request_id_header: X-Request-ID` so both access logs name each request by the edge's ID"
        ));
    }
    let mut out = String::new();
    let _ = writeln!(out, "# Generated by `matrix-edge init --from-synapse {}`.", options.homeserver.display());
    let _ = writeln!(out, "# Read it through, then `matrix-edge check -c` it.");
    let _ = writeln!(out, "server_name: {server_name}\n");
    let _ = writeln!(out, "# Each request's ID goes to Synapse in this header; Synapse's listener reads it");
    let _ = writeln!(out, "# with request_id_header, so both access logs name the same request.");
    let _ = writeln!(out, "request_id_header: {}\n", request_id.as_deref().unwrap_or("X-Request-ID"));
    let listen = options.listen.clone().unwrap_or_else(|| "[::]:443".into());
    let _ = writeln!(out, "listeners:");
    let _ = writeln!(out, "  - {{ address: \"{listen}\", tls: true, serves: [well_known, client, federation] }}");
    let acme = options.cert.is_none();
    if acme {
        let _ = writeln!(out, "  # Port 80: ACME challenges, and everything else redirected to https.");
        let _ = writeln!(out, "  - {{ address: \"[::]:80\", serves: [acme, redirect] }}");
    }
    let _ = writeln!(out, "\ntls:");
    match (&options.cert, &options.key) {
        (Some(cert), Some(key)) => {
            let _ = writeln!(out, "  certificates:\n    - {{ cert: {}, key: {} }}", cert.display(), key.display());
        }
        _ => {
            let _ = writeln!(
                out,
                "  acme:\n    contact: admin@{server_name}   # where Let's Encrypt writes about expiry: change it"
            );
        }
    }

    // Delegation: the public URL's host serves clients and federation.
    let base_host = public_baseurl
        .as_deref()
        .and_then(|u| u.split("://").nth(1))
        .map(|rest| rest.split('/').next().unwrap_or(rest).to_string());
    let listen_port = listen.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).unwrap_or(443);
    let _ = writeln!(out, "\nwell_known:");
    out.push_str(&server_delegation(&server_name, base_host.as_deref(), listen_port));
    if let Some(url) = &public_baseurl {
        let _ = writeln!(out, "  client:\n    homeserver: {url}   # from public_baseurl");
    } else {
        warnings.push(
            "homeserver.yaml has no public_baseurl: set it, and well_known.client.homeserver to the same URL".into(),
        );
    }
    if homeserver.get("serve_server_wellknown").and_then(Value::as_bool) == Some(true) {
        warnings.push("serve_server_wellknown is on in Synapse: the edge answers /.well-known/matrix/server itself, so turn it off to have one answer".into());
    }

    let _ = writeln!(out, "\nsynapse:\n  main: \"{main}\"");
    // MAS, when Synapse delegates authentication to it.
    let mas = homeserver
        .get("matrix_authentication_service")
        .filter(|m| m.get("enabled").and_then(Value::as_bool) == Some(true));
    if let Some(endpoint) = mas.and_then(|m| text(m, "endpoint")) {
        let address = endpoint.split("://").nth(1).unwrap_or(endpoint).trim_end_matches('/');
        let _ = writeln!(out, "  mas: \"{address}\"   # matrix_authentication_service.endpoint");
    }

    worker_sections(&mut out, &homeserver, options, &mut warnings)?;

    if let Some(size) = homeserver.get("max_upload_size") {
        let size = match size {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => String::new(),
        };
        if !size.is_empty() {
            let _ = writeln!(out, "\nlimits:\n  max_upload_size: {size}   # Synapse's max_upload_size");
        }
    }
    Ok((out, warnings))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_server_without_delegation_is_sent_to_the_listener() {
        let own = server_delegation("example.org", Some("example.org"), 443);
        assert!(own.contains("\n  server: example.org:443\n"), "{own}");
        assert!(server_delegation("example.org", None, 8443).contains("\n  server: example.org:8443\n"));
        let on_8448 = server_delegation("example.org", Some("example.org"), 8448);
        assert!(!on_8448.contains("\n  server:"), "{on_8448}");
        let delegated = server_delegation("example.org", Some("matrix.example.org"), 443);
        assert!(delegated.contains("\n  server: matrix.example.org:443\n"), "{delegated}");
        let explicit = server_delegation("example.org", Some("matrix.example.org:8443"), 443);
        assert!(explicit.contains("\n  server: matrix.example.org:8443\n"), "{explicit}");
    }

    #[test]
    fn worker_names_say_their_group() {
        assert_eq!(group_from_name("sync1"), Some(Group::Synchrotron.name()));
        assert_eq!(group_from_name("client-2"), Some(Group::ClientReader.name()));
        assert_eq!(group_from_name("inbound1"), Some(Group::FederationInbound.name()));
        assert_eq!(group_from_name("media1"), Some(Group::MediaRepository.name()));
        assert_eq!(group_from_name("user_dir"), Some(Group::UserDirectory.name()));
        assert_eq!(group_from_name("worker7"), None);
        assert_eq!(group_from_name("background"), None);
    }

    #[test]
    fn listeners_give_a_reachable_address() {
        let listeners: Value = serde_yaml::from_str(
            "- {port: 9093, type: http, resources: [{names: [replication]}]}\n- {port: 8008, bind_addresses: ['0.0.0.0'], type: http, x_forwarded: true, resources: [{names: [client, federation]}]}",
        )
        .unwrap();
        assert_eq!(http_address(&listeners), Some(("127.0.0.1:8008".into(), true)));
    }

    #[test]
    fn the_request_id_header_is_the_client_listeners() {
        let listeners: Value = serde_yaml::from_str(
            "- {port: 9093, type: http, request_id_header: X-Wrong, resources: [{names: [replication]}]}\n- {port: 8008, type: http, request_id_header: X-Request-ID, resources: [{names: [client]}]}",
        )
        .unwrap();
        assert_eq!(request_id_header(&listeners).as_deref(), Some("X-Request-ID"));
        let without: Value =
            serde_yaml::from_str("- {port: 8008, type: http, resources: [{names: [client]}]}").unwrap();
        assert_eq!(request_id_header(&without), None);
    }

    /// `init --from-synapse` and `check --synapse` read Synapse's
    /// `stream_writers` through `routed_streams`: every stream writer a rule
    /// of the table sends requests to must be among them (the list once
    /// kept here by hand lacked the quarantined-media stream).
    #[test]
    fn init_and_check_know_every_stream_writer_the_table_routes() {
        let known: Vec<&str> = routed_streams().collect();
        let routed: Vec<Group> = crate::synapse::table::BUILTIN
            .iter()
            .flat_map(|rule| rule.chain.iter().copied())
            .filter(|group| group.spec().section == Section::StreamWriters)
            .collect();
        assert!(routed.contains(&Group::QuarantinedMediaChanges));
        for group in routed {
            assert!(known.contains(&group.name()), "init and check --synapse ignore stream writer {group}");
        }
    }
}
