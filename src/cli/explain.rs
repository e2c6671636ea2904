//! `matrix-edge routes` and `matrix-edge route`: the routing table and one
//! request's path through it, in words.

use crate::config::Role;
use crate::edge::Edge;
use crate::request::admission::{admit, Admission, RequestFacts};
use crate::synapse::sticky::{self, KeySource};
use crate::synapse::table::Group;
use std::fmt::Write;

/// Every rule in evaluation order with the group that serves it here.
pub fn routes_table(edge: &Edge) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:>3}  {:<9} {:<88} {:<26} key", "#", "methods", "path", "group");
    for (index, rule) in edge.router.rules().iter().enumerate() {
        let group = edge.router.serving_group(rule);
        let chain: Vec<&str> = rule.chain.iter().map(|g| g.name()).collect();
        let serving = if group.name() == chain[0] { group.to_string() } else { format!("{group} (no {})", chain[0]) };
        let origin = if index < edge.router.user_rule_count() { " (config)" } else { "" };
        let _ = writeln!(
            out,
            "{index:>3}  {:<9} {:<88} {:<26} {}{origin}",
            rule.methods.to_string(),
            rule.pattern,
            serving,
            if group == Group::Main { "-".to_string() } else { rule.sticky.to_string() },
        );
    }
    let _ = writeln!(out, "  -  {:<9} {:<88} {:<26} -", "*", "(anything else)", "main");
    out
}

/// Why one request would go where it goes, assuming every worker is healthy.
pub fn explain(edge: &Edge, method: &str, target: &str, headers: &[(String, String)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{method} {target}");
    let header = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_bytes());
    let facts = RequestFacts {
        target: target.as_bytes(),
        has_upgrade: header("upgrade").is_some(),
        admin_allowed: true,
        content_length: header("content-length").and_then(|v| std::str::from_utf8(v).ok()?.parse().ok()),
        header_bytes: headers.iter().map(|(name, value)| (name.len() + value.len()) as u64).sum(),
        header_count: headers.len(),
    };
    let roles = [Role::WellKnown, Role::Client, Role::Federation];
    match admit(&roles, &facts, &edge.limits) {
        Admission::WellKnown(document) => {
            let _ = writeln!(out, "  answered by the edge: well-known document {document:?}");
            return out;
        }
        Admission::Reject(error) => {
            let _ = writeln!(out, "  refused by the edge: {error}");
            return out;
        }
        Admission::Forward { body_limit } => {
            let _ = writeln!(out, "  admitted (body limit {body_limit} bytes; admin API subject to admin_api.allow)");
        }
    }
    let decision = edge.router.route(method, target.as_bytes());
    match decision.rule {
        Some(index) => {
            let rule = &edge.router.rules()[index];
            let _ = writeln!(out, "  rule #{index}: {} (methods {})", rule.pattern, rule.methods);
            let chain: Vec<&str> = rule.chain.iter().map(|g| g.name()).collect();
            let _ = writeln!(out, "  groups in order of preference: {}", chain.join(", "));
        }
        None => {
            let _ = writeln!(out, "  no rule matches: the main process serves it");
        }
    }
    let Some(pool) = edge.pools.get(decision.group) else {
        let _ = writeln!(out, "  -> main {}", edge.main.address);
        return out;
    };
    let source = KeySource { target: target.as_bytes(), authorization: header("authorization"), client_ip: None };
    let key = sticky::key(decision.sticky, &source);
    let how = match &key {
        Some(key) => format!("sticky by {}: key {:?}", decision.sticky, String::from_utf8_lossy(key.as_bytes())),
        None if decision.sticky == crate::synapse::table::Sticky::None => "round robin".to_string(),
        None => format!("sticky by {}, but the request carries no key: round robin", decision.sticky),
    };
    let _ = writeln!(out, "  group {} ({} workers), {how}", decision.group, pool.members.len());
    match pool.pick(key.as_ref().map(|k| k.as_bytes()), &[]) {
        Some(index) => {
            let _ = writeln!(out, "  -> {}", pool.members[index].upstream.address);
        }
        None => {
            let _ = writeln!(out, "  -> no worker available");
        }
    }
    let fallback = if decision.group.falls_back_to_main() {
        "main, if every worker of the group is down"
    } else {
        "none: 503 when every worker of the group is down"
    };
    let _ = writeln!(out, "  fallback: {fallback}");
    out
}
