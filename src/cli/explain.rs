//! `matrix-edge routes` and `matrix-edge route`: the routing table and one
//! request's path through it, in words.

use crate::config::Role;
use crate::edge::Edge;
use crate::request::admission::{admit, path_of, Admission, RequestFacts};
use crate::sites::{Action, RouteRef, Target, MATRIX_SITE};
use crate::synapse::sticky::{self, KeySource};
use crate::synapse::table::Group;
use std::fmt::Write;

/// Every rule in evaluation order with the group that serves it here.
pub fn routes_table(edge: &Edge) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Synapse's own routing, as of Synapse {}", crate::synapse::table::SYNAPSE_VERSION);
    let _ = writeln!(out, "{:>3}  {:<9} {:<88} {:<26} key", "#", "methods", "path", "group");
    for (index, rule) in edge.router.rules().iter().enumerate() {
        let group = edge.router.serving_group(rule);
        let chain: Vec<&str> = rule.chain.iter().map(|g| g.name()).collect();
        let serving = if !edge.router.applies(index) {
            format!("(skipped: no {})", chain[0])
        } else if group.name() == chain[0] {
            group.to_string()
        } else {
            format!("{group} (no {})", chain[0])
        };
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
    let named = edge.upstreams.all().iter().map(|upstream| ("upstream", &upstream.pool));
    let pools: Vec<_> = edge.pools.all().iter().map(|pool| ("group", pool)).chain(named).collect();
    if !pools.is_empty() {
        let _ = writeln!(out, "\n# Balancing (sticky keys keep their member while it is usable and has room)");
        for (kind, pool) in pools {
            let _ =
                writeln!(out, "{kind} {}: {} members; {}", pool.label, pool.members.len(), pool.balancing.describe());
        }
    }
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
        mas_api_allowed: true,
        is_options: method == "OPTIONS",
        content_length: header("content-length").and_then(|v| std::str::from_utf8(v).ok()?.parse().ok()),
        header_bytes: headers.iter().map(|(name, value)| (name.len() + value.len()) as u64).sum(),
        header_count: headers.len(),
    };
    let roles = [Role::WellKnown, Role::Client, Role::Federation, Role::Sites];
    let host = header("host");
    let (site, target_kind) = edge.sites.target(&roles, host, path_of(target.as_bytes()));
    let host_text = host.map_or("(none)".into(), |h| String::from_utf8_lossy(h).into_owned());
    match site {
        _ if edge.sites.single_site() => {
            let _ = writeln!(out, "  site: the Matrix site (no `sites` configured: it answers every host)");
        }
        Some(MATRIX_SITE) => {
            let _ = writeln!(out, "  site: the Matrix site (host {host_text})");
        }
        Some(index) => {
            let _ = writeln!(
                out,
                "  site: sites[{}] {} (host {host_text})",
                index - 1,
                edge.sites.site(index).hosts.join(", ")
            );
        }
        None => {}
    }
    let at = match target_kind {
        Target::Matrix => None,
        Target::UnknownHost => {
            let _ = writeln!(
                out,
                "  refused by the edge: 421, no site answers host {host_text} (give one with -H 'Host: ...')"
            );
            return out;
        }
        Target::NoRoute => {
            let _ = writeln!(out, "  refused by the edge: 404, the site has no route for this path");
            return out;
        }
        Target::Route(at, _) => Some(at),
        Target::AcmeChallenge(_) | Target::ToHttps => {
            let _ = writeln!(out, "  answered by the edge's plain-HTTP listener (ACME challenge or redirect to https)");
            return out;
        }
    };
    if let Some(at) = at {
        explain_site_route(&mut out, edge, at, target);
        return out;
    }
    match admit(&roles, &facts, &edge.policy.limits) {
        Admission::WellKnown(document) => {
            let _ = writeln!(out, "  answered by the edge: well-known document {document:?}");
            return out;
        }
        Admission::Reject(error) => {
            let _ = writeln!(out, "  refused by the edge: {error}");
            return out;
        }
        Admission::Preflight(kind) => {
            let _ = writeln!(out, "  answered by the edge: 204, a CORS preflight ({kind:?})");
            return out;
        }
        Admission::Forward { body_limit } => {
            let _ = writeln!(out, "  admitted (body limit {body_limit} bytes; admin API subject to admin_api.allow)");
        }
    }
    explain_synapse_route(&mut out, edge, method, target, header("authorization"));
    out
}

/// Which rule of Synapse's table, group, member and fallback a request meets.
fn explain_synapse_route(out: &mut String, edge: &Edge, method: &str, target: &str, authorization: Option<&[u8]>) {
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
        return;
    };
    let source = KeySource { target: target.as_bytes(), authorization, client_ip: None };
    let key = sticky::key(decision.sticky, &source);
    let how = match &key {
        Some(key) => format!("sticky by {}: key {:?}", decision.sticky, String::from_utf8_lossy(key.as_bytes())),
        None if decision.sticky == crate::synapse::table::Sticky::None => "no sticky key".to_string(),
        None => format!("sticky by {}, but the request carries no key", decision.sticky),
    };
    let _ = writeln!(out, "  group {} ({} workers), {how}", decision.group, pool.members.len());
    let _ = writeln!(out, "  balancing: {}", pool.balancing.describe());
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
        "none: waits for a worker up to synapse.hold, then 503"
    };
    let _ = writeln!(out, "  fallback: {fallback}");
}

fn explain_site_route(out: &mut String, edge: &Edge, at: RouteRef, target: &str) {
    let route = edge.sites.route(at);
    let _ = writeln!(out, "  route {}: {}", route.position, route.matcher);
    if let Some(allow) = &route.allow {
        let networks: Vec<String> = allow.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "  only from: {}", networks.join(", "));
    }
    match &route.action {
        Action::Upstream(id) => {
            let upstream = edge.upstreams.get(*id);
            let sent = route.rewritten_target(target.as_bytes());
            let sent = sent.as_deref().map_or(target.to_string(), |t| String::from_utf8_lossy(t).into_owned());
            let members: Vec<String> = upstream.pool.members.iter().map(|m| m.label.clone()).collect();
            let _ = writeln!(out, "  -> upstream {} [{}] as {sent}", upstream.name, members.join(", "));
            if let Some(idle) = route.websocket_idle {
                let _ = writeln!(out, "  WebSocket upgrades allowed, closed after {}s idle", idle.as_secs());
            }
        }
        Action::Redirect(redirect) => {
            let response = redirect.respond(target.as_bytes());
            let location = response.headers.iter().find(|(n, _)| *n == "Location").map_or("", |(_, v)| v.as_str());
            let _ = writeln!(out, "  answered by the edge: {} to {location}", redirect.status);
        }
        Action::Static(_) => {
            let _ = writeln!(out, "  answered by the edge: a static file");
        }
    }
}
