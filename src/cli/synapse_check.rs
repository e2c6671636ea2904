//! `matrix-edge check --synapse homeserver.yaml [--workers DIR]`: the
//! edge's config against Synapse's, for the disagreements that work
//! until the day they don't (uploads refused at one size by one and at
//! another by the other, two answers for the well-known, a stream writer
//! the edge sends elsewhere, a worker nobody sends anything).

use super::init::{http_address, read_workers, read_yaml, request_id_header, routed_streams};
use crate::cli::CliError;
use crate::edge::Edge;
use serde_yaml::Value;
use std::path::Path;

/// Problems (the two disagree) and warnings (they agree, but not well).
pub struct CrossCheck {
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
}

fn size_of(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(text) => crate::config::values::ByteSize::parse(text),
        _ => None,
    }
}

pub fn cross_check(edge: &Edge, homeserver: &Path, workers: Option<&Path>) -> Result<CrossCheck, CliError> {
    let synapse = read_yaml(homeserver)?;
    let mut problems = Vec::new();
    let mut warnings = Vec::new();

    match synapse.get("listeners").and_then(http_address) {
        Some((address, x_forwarded)) => {
            if !x_forwarded {
                problems.push(format!(
                    "Synapse's listener {address} has x_forwarded off: it would log and rate-limit the edge's address for every client"
                ));
            }
            if address != edge.main.address.to_string() {
                warnings
                    .push(format!("synapse.main is {}, but Synapse's client listener is {address}", edge.main.address));
            }
            warnings.extend(request_id_disagreement(edge, &synapse, &address));
        }
        None => problems.push("homeserver.yaml has no HTTP listener for client or federation traffic".into()),
    }

    // Synapse's default is 50M; the edge's too.
    let synapse_upload = synapse.get("max_upload_size").and_then(size_of).unwrap_or(50 << 20);
    let edge_upload = edge.policy.limits.max_upload_size;
    if edge_upload < synapse_upload {
        problems.push(format!(
            "uploads between {edge_upload} and {synapse_upload} bytes pass Synapse's max_upload_size but the edge refuses them: set limits.max_upload_size to {synapse_upload}"
        ));
    } else if edge_upload > synapse_upload {
        warnings.push(format!(
            "the edge accepts uploads up to {edge_upload} bytes, Synapse only {synapse_upload}: larger ones cross the edge to be refused"
        ));
    }

    let public_baseurl =
        synapse.get("public_baseurl").and_then(Value::as_str).map(|u| u.trim_end_matches('/').to_string());
    let client_homeserver =
        edge.ops.config.well_known.client.as_ref().map(|c| c.homeserver.0.trim_end_matches('/').to_string());
    match (&public_baseurl, &client_homeserver) {
        (Some(base), Some(published)) if base != published => problems.push(format!(
            "the client well-known sends clients to {published}, but Synapse's public_baseurl is {base}: links in emails, SSO and MAS redirects would point elsewhere"
        )),
        (None, Some(_)) => warnings.push("Synapse has no public_baseurl: set it to the client well-known's homeserver URL".into()),
        _ => {}
    }
    let synapse_serves_well_known = synapse.get("serve_server_wellknown").and_then(Value::as_bool) == Some(true);
    if synapse_serves_well_known && edge.ops.config.well_known.server.is_some() {
        problems.push(
            "both Synapse (serve_server_wellknown) and the edge (well_known.server) publish /.well-known/matrix/server: keep one"
                .into(),
        );
    }

    if let Some(dir) = workers {
        let workers = read_workers(dir, &mut warnings)?;
        let address_of = |name: &str| workers.iter().find(|w| w.name == name).map(|w| w.address.clone());
        let writers = synapse.get("stream_writers");
        for stream in routed_streams() {
            let named: Vec<String> = match writers.and_then(|w| w.get(stream)) {
                Some(Value::Sequence(list)) => list.iter().filter_map(Value::as_str).map(str::to_string).collect(),
                Some(Value::String(one)) => vec![one.clone()],
                _ => Vec::new(),
            };
            let synapse_addresses: Vec<String> = named.iter().filter_map(|n| address_of(n)).collect();
            let edge_addresses: Vec<String> = edge
                .pools
                .all()
                .iter()
                .filter(|pool| pool.label == *stream)
                .flat_map(|pool| pool.members.iter().map(|m| m.upstream.address.to_string()))
                .collect();
            if !synapse_addresses.is_empty() && synapse_addresses != edge_addresses {
                problems.push(format!(
                    "Synapse's {stream} stream writer is {} ({synapse_addresses:?}), but the edge sends {stream} requests to {}",
                    named.join(", "),
                    if edge_addresses.is_empty() { "main".to_string() } else { format!("{edge_addresses:?}") }
                ));
            } else if named.is_empty() && !edge_addresses.is_empty() {
                problems.push(format!(
                    "the edge sends {stream} requests to {edge_addresses:?}, but Synapse has no {stream} stream writer: main handles them"
                ));
            }
        }
        let known: Vec<String> = edge
            .pools
            .all()
            .iter()
            .flat_map(|pool| pool.members.iter().map(|m| m.upstream.address.to_string()))
            .collect();
        for worker in &workers {
            if !known.contains(&worker.address) {
                problems.push(format!(
                    "worker {} ({}) listens on {}, which no group of the edge's config names: it receives nothing",
                    worker.name, worker.app, worker.address
                ));
            }
        }
    }
    Ok(CrossCheck { problems, warnings })
}

/// Whether Synapse's client listener reads the request ID the edge sends.
fn request_id_disagreement(edge: &Edge, synapse: &Value, address: &str) -> Option<String> {
    let sent = edge.policy.forwarding.request_id_header.as_ref()?;
    match synapse.get("listeners").and_then(request_id_header) {
        Some(read) if sent.as_str().eq_ignore_ascii_case(&read) => None,
        Some(read) => Some(format!(
            "the edge sends its request ID in {sent}, but Synapse's listener {address} reads {read}: set request_id_header to the same header on both"
        )),
        None => Some(format!(
            "Synapse's listener {address} has no request_id_header: add `request_id_header: {sent}` so its access log names each request by the edge's ID"
        )),
    }
}
