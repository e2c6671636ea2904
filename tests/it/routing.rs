//! The routing table against real request lines (tests/routing/requests.txt):
//! every line reaches its group with its sticky key, the compiled RegexSet
//! agrees with a plain first-match scan, and every built-in rule is exercised.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use matrix_edge::config::Source;
use matrix_edge::edge::Edge;
use matrix_edge::synapse::sticky::{self, Key, KeySource};
use matrix_edge::synapse::table::{Group, Router, BUILTIN};
use std::collections::BTreeSet;

const ROUTING_CONFIG: &str = r#"
server_name: example.com
listeners: [{ address: "127.0.0.1:1", serves: [client, federation] }]
synapse:
  main: 127.0.0.1:9000
  workers:
    synchrotron: [127.0.0.1:9001, 127.0.0.1:9002]
    initial_sync: 127.0.0.1:9003
    client_reader: [127.0.0.1:9004, 127.0.0.1:9005]
    event_creator: [127.0.0.1:9006, 127.0.0.1:9007]
    federation_reader: 127.0.0.1:9008
    federation_inbound: [127.0.0.1:9009, 127.0.0.1:9010]
    media_repository: 127.0.0.1:9011
    sso: 127.0.0.1:9012
    user_directory: 127.0.0.1:9013
  stream_writers:
    typing: 127.0.0.1:9014
    to_device: 127.0.0.1:9015
    account_data: 127.0.0.1:9016
    presence: 127.0.0.1:9017
    push_rules: 127.0.0.1:9018
    receipts: [127.0.0.1:9019]
    device_lists: [127.0.0.1:9020]
    quarantined_media_changes: 127.0.0.1:9021
    thread_subscriptions: 127.0.0.1:9022
  routes:
    - { path: "^/_matrix/client/v3/rooms/[^/]+/report", methods: [POST], to: main }
"#;

/// The same deployment with MAS handling logins (and so no sso worker).
fn mas_config() -> String {
    ROUTING_CONFIG.replace("    sso: 127.0.0.1:9012\n", "").replace("  routes:\n", "  mas: 127.0.0.1:9030\n  routes:\n")
}

struct Case {
    line: usize,
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    group: String,
    key: Option<String>,
}

fn cases() -> Vec<Case> {
    parse_cases(include_str!("../routing/requests.txt"))
}

fn mas_cases() -> Vec<Case> {
    parse_cases(include_str!("../routing/requests-mas.txt"))
}

fn parse_cases(text: &str) -> Vec<Case> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(index, line)| {
            let (request, expected) = line.split_once(" => ").unwrap_or_else(|| panic!("line {}: no =>", index + 1));
            let mut parts = request.split(" | ");
            let (method, target) = parts.next().unwrap().split_once(' ').unwrap();
            let headers = parts
                .map(|h| {
                    let (k, v) = h.split_once(": ").unwrap();
                    (k.to_string(), v.to_string())
                })
                .collect();
            let mut expected = expected.split(' ');
            Case {
                line: index + 1,
                method: method.to_string(),
                target: target.to_string(),
                headers,
                group: expected.next().unwrap().to_string(),
                key: expected.next().map(str::to_string),
            }
        })
        .collect()
}

fn edge() -> Edge {
    edge_from(ROUTING_CONFIG)
}

fn edge_from(text: &str) -> Edge {
    let source = Source { file: "routing.yaml".into(), text: text.to_string() };
    Edge::from_config(source.parse().unwrap(), &source).unwrap()
}

fn describe_key(key: Option<Key<'_>>) -> Option<String> {
    key.map(|k| match k {
        Key::Bytes(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Key::Ip(_) => "<ip>".into(),
    })
}

#[test]
fn at_least_200_real_request_lines() {
    assert!(cases().len() >= 200, "only {} lines", cases().len());
}

#[test]
fn every_request_line_reaches_its_group_with_its_key() {
    check_cases(&edge(), cases());
}

#[test]
fn with_mas_its_paths_go_to_mas_and_the_rest_stays() {
    check_cases(&edge_from(&mas_config()), mas_cases());
}

fn check_cases(edge: &Edge, cases: Vec<Case>) {
    let mut failures = Vec::new();
    for case in cases {
        let decision = edge.router.route(&case.method, case.target.as_bytes());
        let authorization =
            case.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("authorization")).map(|(_, v)| v.as_bytes());
        let source =
            KeySource { target: case.target.as_bytes(), authorization, client_ip: Some("10.0.0.1".parse().unwrap()) };
        let key = describe_key(sticky::key(decision.sticky, &source));
        let expected_key = case.key.as_deref().map(|k| match k.split_once('=') {
            Some((_, value)) => value.to_string(),
            None if k == "ip" => "<ip>".to_string(),
            None => panic!("line {}: bad key {k}", case.line),
        });
        if decision.group.name() != case.group || key != expected_key {
            failures.push(format!(
                "line {}: {} {} -> {} key {:?}, expected {} key {:?}",
                case.line, case.method, case.target, decision.group, key, case.group, expected_key
            ));
        }
    }
    assert!(failures.is_empty(), "{} misrouted:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn compiled_set_agrees_with_the_first_match_scan() {
    for edge in [edge(), edge_from(&mas_config())] {
        compiled_agrees(&edge);
    }
}

fn compiled_agrees(edge: &Edge) {
    let mut targets: Vec<(String, String)> =
        cases().into_iter().chain(mas_cases()).map(|c| (c.method, c.target)).collect();
    // Also every line under every other method.
    let extra: Vec<(String, String)> = targets
        .iter()
        .flat_map(|(_, t)| ["GET", "PUT", "POST", "DELETE", "HEAD", "OPTIONS"].map(|m| (m.to_string(), t.clone())))
        .collect();
    targets.extend(extra);
    for (method, target) in &targets {
        assert_eq!(
            edge.router.route(method, target.as_bytes()),
            edge.router.route_naive(method, target.as_bytes()),
            "{method} {target}"
        );
    }
}

#[test]
fn every_builtin_rule_is_exercised() {
    let mut hit: BTreeSet<usize> = BTreeSet::new();
    for (edge, cases) in [(edge(), cases()), (edge_from(&mas_config()), mas_cases())] {
        let user_rules = edge.router.user_rule_count();
        hit.extend(
            cases
                .iter()
                .filter_map(|c| edge.router.route(&c.method, c.target.as_bytes()).rule)
                .filter(|index| *index >= user_rules)
                .map(|index| index - user_rules),
        );
    }
    let missed: Vec<&str> =
        BUILTIN.iter().enumerate().filter(|(i, _)| !hit.contains(i)).map(|(_, r)| r.pattern.as_ref()).collect();
    assert!(missed.is_empty(), "rules no line exercises: {missed:#?}");
}

#[test]
fn without_a_writer_its_paths_go_to_generic_workers_or_main() {
    let router = Router::new(Vec::new(), &[Group::ClientReader]).unwrap();
    for case in cases() {
        let group = router.route(&case.method, case.target.as_bytes()).group;
        let expected = match case.group.as_str() {
            "device_lists" | "user_directory" | "client_reader" => Group::ClientReader,
            _ => Group::Main,
        };
        assert_eq!(group, expected, "line {}: {} {}", case.line, case.method, case.target);
    }
}

#[test]
fn with_no_workers_everything_goes_to_main() {
    let router = Router::new(Vec::new(), &[]).unwrap();
    for case in cases() {
        assert_eq!(router.route(&case.method, case.target.as_bytes()).group, Group::Main, "line {}", case.line);
    }
}
