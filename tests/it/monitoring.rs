//! The Grafana dashboard and the Prometheus rules in contrib/ against a
//! running edge: every metric they name is one the edge exports, the rules
//! pass `promtool check rules` and their unit tests (`promtool test rules`),
//! and the dashboard file is what its generator writes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use support::certs::TestPki;
use support::client::{self, h1_plain, h1_tls};
use support::upstream::RecordingUpstream;
use support::{free_port, EdgeProcess};

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib").join(path)
}

/// `matrix_edge_*` names in a text, histogram series folded into their family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("matrix_edge_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"].iter().fold(name, |n, suffix| n.strip_suffix(suffix).unwrap_or(n));
        names.insert(family.to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn every_metric_the_dashboard_and_rules_name_is_exported() {
    let pki = TestPki::new(&[&["synapse.example.com"]]);
    let (main, worker, livekit) = (RecordingUpstream::start(), RecordingUpstream::start(), RecordingUpstream::start());
    let addr = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
    let (public, metrics) = (addr(), addr());
    let config = format!(
        r#"server_name: example.com
listeners:
  - {{ address: "{public}", tls: true, serves: [well_known, client, federation, sites] }}
tls:
  certificates:
    - {{ cert: certs/synapse.example.com/fullchain.pem, key: certs/synapse.example.com/privkey.pem }}
synapse:
  main: "{}"
  workers:
    client_reader: "{}"
upstreams:
  livekit: {{ address: "{}" }}
matrix_site: {{ hosts: [synapse.example.com] }}
sites:
  - hosts: [rtc.example.com]
    routes: [{{ prefix: /, upstream: livekit, websocket: true }}]
rate_limits:
  client: {{ requests: 1000, per: 60s }}
metrics: {{ address: "{metrics}" }}
"#,
        main.addr, worker.addr, livekit.addr
    );
    let _edge = EdgeProcess::start(&config, Some(&pki), &[public, metrics]);
    // One proxied request over TLS gives the request, latency, upstream and handshake families series.
    let (response, _) = h1_tls(
        public,
        "synapse.example.com",
        &pki.root_pem,
        &client::get("/_matrix/client/versions", "synapse.example.com"),
    );
    assert_eq!(response.status, 200);
    let (scrape, _) = h1_plain(metrics, &client::get("/metrics", "localhost"));
    let exported = String::from_utf8(scrape.body).unwrap();
    let families: BTreeSet<String> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    let dashboard = std::fs::read_to_string(contrib("grafana/matrix-edge.json")).unwrap();
    let rules = std::fs::read_to_string(contrib("prometheus/matrix-edge.rules.yml")).unwrap();
    let named: BTreeSet<String> = metric_names(&dashboard).into_iter().chain(metric_names(&rules)).collect();
    assert!(named.len() >= 14, "the dashboard and rules name only {named:?}");
    let missing: Vec<&String> = named.iter().filter(|name| !families.contains(*name)).collect();
    assert!(missing.is_empty(), "named but not exported: {missing:?}\nexported: {families:?}");
    // Every series a rule reads carries the labels the rule groups by.
    for (family, label) in [
        ("matrix_edge_worker_up", "group=\"client_reader\""),
        ("matrix_edge_config_reloads_total", "result=\"error\""),
        ("matrix_edge_rate_limited_total", "class=\"login\""),
        ("matrix_edge_websocket_upgrades_total", "upstream=\"livekit\""),
        ("matrix_edge_certificate_expiry_timestamp_seconds", "certificate=\"synapse.example.com\""),
        ("matrix_edge_requests_total", "status=\"200\""),
    ] {
        assert!(
            exported.lines().any(|l| l.starts_with(family) && l.contains(label)),
            "no {family}{{{label}}} in {exported}"
        );
    }
}

#[test]
fn the_dashboard_is_what_its_generator_writes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dashboard.json");
    let status = Command::new("python3").arg(contrib("grafana/generate.py")).arg(&out).status().unwrap();
    assert!(status.success());
    let generated = std::fs::read_to_string(&out).unwrap();
    let committed = std::fs::read_to_string(contrib("grafana/matrix-edge.json")).unwrap();
    assert_eq!(generated, committed, "contrib/grafana/matrix-edge.json is stale: run contrib/grafana/generate.py");
    let dashboard: serde_json::Value = serde_json::from_str(&committed).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.iter().all(|p| p["targets"].as_array().is_some_and(|t| !t.is_empty())));
}

#[test]
#[ignore = "needs promtool (Debian's prometheus package): run scripts/test"]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let check = Command::new("promtool")
        .args(["check", "rules"])
        .arg(contrib("prometheus/matrix-edge.rules.yml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("SUCCESS: 8 rules found"),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let test = Command::new("promtool")
        .args(["test", "rules"])
        .arg(contrib("prometheus/matrix-edge.rules.test.yml"))
        .output()
        .unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&test.stdout), String::from_utf8_lossy(&test.stderr));
    assert!(test.status.success(), "{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}
