//! The private listener's pages: `/metrics`, the `/livez` and `/readyz`
//! probes, and the status page an admin opens in an incident:
//! `/status.json` and `/status` (HTML without scripts or external assets,
//! refreshing itself every 5 s). Read-only and without secrets: addresses,
//! states, counts, certificate names and dates.

use crate::edge::Edge;
use crate::observe::metrics::METRICS;
use crate::runtime::Runtime;
use crate::services::control::{pools, state_word};
use crate::sites::Action;
use crate::upstream::state::now_ms;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct PrivateApp {
    pub edge: Arc<ArcSwap<Edge>>,
    pub runtime: Arc<Runtime>,
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// A monotonic timestamp (ms) as Unix seconds.
fn wall_time(monotonic_ms: u64) -> i64 {
    let ago = now_ms().saturating_sub(monotonic_ms) as f64 / 1000.0;
    (unix_now() - ago) as i64
}

/// The certificate's issuer as its common name (else the whole name).
fn issuer(certificate: &crate::tls::CertifiedKey) -> String {
    let Some(leaf) = certificate.chain.first() else { return String::new() };
    let name = leaf.issuer_name();
    let common = name.entries_by_nid(openssl::nid::Nid::COMMONNAME).next().and_then(|e| e.data().to_string().ok());
    common.unwrap_or_else(|| name.entries().filter_map(|e| e.data().to_string().ok()).collect::<Vec<_>>().join(", "))
}

/// A counter family's values by label values joined with "/" ("refused/bad_signature").
fn counts_by_label(counter: &prometheus::IntCounterVec) -> serde_json::Map<String, Value> {
    use prometheus::core::Collector;
    let mut counts = serde_json::Map::new();
    for family in counter.collect() {
        for metric in family.get_metric() {
            let labels: Vec<&str> = metric.get_label().iter().map(|l| l.value()).filter(|v| !v.is_empty()).collect();
            counts.insert(labels.join("/"), json!(metric.get_counter().get_value() as u64));
        }
    }
    counts
}

/// How many origins the status page lists by their share of Synapse.
const BUSIEST_ORIGINS: usize = 10;

/// Each origin's share: the settings, and the origins using most of it.
fn per_origin(edge: &Edge, runtime: &Runtime) -> Value {
    let Some(settings) = &edge.policy.turns else { return Value::Null };
    let busiest: Vec<Value> = runtime
        .federation_turns
        .busiest(BUSIEST_ORIGINS)
        .into_iter()
        .map(|load| json!({ "origin": load.origin, "in_flight": load.in_flight, "queued": load.queued, "refused": load.refused }))
        .collect();
    json!({
        "max_in_flight": settings.max_in_flight,
        "total_in_flight": settings.total_in_flight,
        "queue": settings.queue,
        "queued": METRICS.federation.origin_queued.get(),
        "busiest": busiest,
    })
}

/// The federation gate: its mode, verdicts and key fetches since start,
/// and the latest refusals with the origin each claimed; each origin's share.
fn federation(edge: &Edge, runtime: &Runtime) -> Value {
    let Some(gate) = &edge.policy.federation_gate else {
        return json!({ "mode": "off", "per_origin": per_origin(edge, runtime) });
    };
    let refusals: Vec<Value> = runtime
        .federation_refusals
        .latest()
        .into_iter()
        .map(|r| json!({ "at": r.at, "origin": r.origin, "reason": r.reason, "detail": r.detail, "enforced": r.enforced }))
        .collect();
    json!({
        "mode": gate.mode.name(),
        "requests": counts_by_label(&METRICS.federation.requests),
        "key_fetches": counts_by_label(&METRICS.federation.key_fetches),
        "servers_with_keys": runtime.federation_keys.servers_known(),
        "latest_refusals": refusals,
        "per_origin": per_origin(edge, runtime),
    })
}

/// Every group and named upstream, with its members' states.
fn pool_views(edge: &Edge, now: u64) -> Vec<Value> {
    pools(edge)
        .map(|(kind, pool)| {
            let members: Vec<Value> = pool
                .members
                .iter()
                .enumerate()
                .map(|(index, member)| {
                    let state = &member.state;
                    let minute = state.last_minute.summary(unix_now() as u64);
                    let mut view = json!({
                        "address": member.label,
                        "state": state_word(pool, index, now),
                        "weight": member.weight,
                        "in_flight": state.in_flight(),
                        "long_polls": state.long_polls(),
                        "last_minute": {
                            "per_second": (minute.per_second * 100.0).round() / 100.0,
                            "errors": minute.errors,
                            "p99_ms": minute.p99_ms,
                        },
                    });
                    if let Some((since, why)) = state.last_out() {
                        view["last_out"] = json!({ "at": wall_time(since), "why": why });
                    }
                    if state.is_ejected(now) {
                        view["ejected_until"] = json!(wall_time(state.ejected_until()));
                    }
                    view
                })
                .collect();
            json!({
                "kind": kind,
                "name": pool.label,
                "balancing": pool.balancing.describe(),
                "queued": pool.shared.waiting(),
                "members": members,
            })
        })
        .collect()
}

/// Every certificate served, with where it came from and its next renewal.
fn certificate_views(edge: &Edge) -> Vec<Value> {
    let file_backed = &edge.tls.file_certificates;
    edge.tls
        .certificates
        .load()
        .certificates()
        .iter()
        .map(|certificate| {
            let from_file = file_backed.iter().any(|f| Arc::ptr_eq(f, certificate));
            let mut view = json!({
                "names": certificate.names,
                "issuer": issuer(certificate),
                "not_after": certificate.not_after_unix,
                "days_left": ((certificate.not_after_unix as f64 - unix_now()) / 86400.0 * 10.0).round() / 10.0,
                "source": if from_file { "file" } else { "acme" },
            });
            if !from_file {
                let next = certificate
                    .names
                    .first()
                    .map(|name| METRICS.operations.acme_next_renewal.with_label_values(&[name]).get())
                    .filter(|at| *at > 0);
                view["next_renewal"] = json!(next);
            }
            view
        })
        .collect()
}

/// Everything the page shows, as JSON.
pub fn snapshot(edge: &Edge, runtime: &Runtime) -> Value {
    let now = now_ms();
    let listeners: Vec<Value> = edge
        .ops
        .listeners
        .iter()
        .map(|l| {
            json!({
                "address": l.address.to_string(),
                "tls": l.tls,
                "roles": l.roles.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "proxy_protocol": l.proxy_protocol.is_some(),
            })
        })
        .collect();
    let sites: Vec<Value> = edge
        .sites
        .all()
        .iter()
        .map(|site| {
            let routes: Vec<Value> = site
                .routes
                .iter()
                .map(|route| {
                    let to = match &route.action {
                        Action::Upstream(id) => format!("upstream {}", edge.upstreams.get(*id).name),
                        Action::Redirect(redirect) => format!("redirect {} to {}", redirect.status, redirect.to),
                        Action::Static(_) => "static files".to_string(),
                    };
                    json!({ "match": route.matcher.to_string(), "to": to })
                })
                .collect();
            json!({ "hosts": site.hosts, "routes": routes })
        })
        .collect();
    let pool_views = pool_views(edge, now);
    let certificates = certificate_views(edge);
    let reload = runtime.last_reload();
    let rate_limited: serde_json::Map<String, Value> = crate::request::ratelimit::Class::ALL
        .iter()
        .zip(crate::request::ratelimit::RATE_LIMITED.iter())
        .map(|(class, counter)| (class.name().to_string(), json!(counter.get())))
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "server_name": edge.server_name,
        "now": unix_now() as i64,
        "readiness": format!("{:?}", runtime.probes.readiness()).to_lowercase(),
        "config": {
            "loaded_at": METRICS.operations.config_loaded_at.get(),
            "last_reload": reload.map(|r| json!({ "at": r.at, "result": if r.error.is_some() { "error" } else { "ok" }, "error": r.error })),
        },
        "listeners": listeners,
        "sites": sites,
        "main": { "address": edge.main.address.to_string(), "held": METRICS.traffic.held.get() },
        "pools": pool_views,
        "certificates": certificates,
        "requests_in_flight": METRICS.traffic.in_flight.get(),
        "rate_limited": rate_limited,
        "federation": federation(edge, runtime),
        "cluster": cluster(edge, runtime),
    })
}

/// The edges this one shares operator states with: Redis reachable or not,
/// the records applied here, those for members it does not have, those skipped.
fn cluster(edge: &Edge, runtime: &Runtime) -> Value {
    let Some(config) = &edge.ops.config.cluster else { return Value::Null };
    let view = runtime.shared_admin.view();
    let records = |records: &[(String, crate::upstream::shared_admin::Record)]| -> Vec<Value> {
        records
            .iter()
            .map(|(address, record)| json!({ "address": address, "state": record.state, "edge": record.edge, "at": record.at }))
            .collect()
    };
    json!({
        "name": crate::services::cluster::edge_name(config.name.as_deref()),
        "redis_reachable": view.reachable,
        "last_error": view.last_error,
        "records": records(&view.applied),
        "unknown_members": records(&view.unknown),
        "skipped": view.skipped,
        "edges": fleet_json(&view.fleet),
    })
}

/// The edges heard from, as the status page and `workers list` show them.
pub fn fleet_json(fleet: &[crate::upstream::shared_admin::FleetRow]) -> Vec<Value> {
    fleet
        .iter()
        .map(|row| {
            let beat = &row.beat;
            json!({
                "name": beat.name,
                "version": beat.version,
                "config": beat.config,
                "config_drift": row.drift,
                "listeners": beat.listeners,
                "started": beat.started,
                "last_reload": beat.reloaded,
                "reload_error": beat.reload_error,
                "heard_ms_ago": (SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64) - beat.at).max(0),
                "at": beat.at,
                "silent": row.silent,
                "members": beat.members,
                "held": beat.held,
            })
        })
        .collect()
}

fn cluster_html(out: &mut String, cluster: &Value) {
    if cluster.is_null() {
        return;
    }
    let redis = match cluster["redis_reachable"].as_bool() {
        Some(true) => "reachable".to_string(),
        Some(false) => format!(
            "<span class=\"error\">unreachable</span> ({}): states last read are kept",
            text(&cluster["last_error"])
        ),
        None => "not asked yet".to_string(),
    };
    out.push_str(&format!("<h2>Cluster</h2><p>This edge: <b>{}</b>. Redis: {redis}.</p>", text(&cluster["name"])));
    let edges = cluster["edges"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !edges.is_empty() {
        out.push_str("<h3>Edges</h3><table><tr><th>edge</th><th>version</th><th>config</th><th>listeners</th><th>started</th><th>last reload</th><th>heard</th></tr>");
        for edge in edges {
            let config = if edge["config_drift"] == true {
                format!("<span class=\"error\">{} (differs from this edge's)</span>", text(&edge["config"]))
            } else {
                text(&edge["config"])
            };
            let reload = match (&edge["last_reload"], &edge["reload_error"]) {
                (Value::Null, _) => "-".to_string(),
                (at, Value::Null) => format!("{} ok", when(at)),
                (at, error) => format!("{} <span class=\"error\">failed: {}</span>", when(at), text(error)),
            };
            let heard = format!("{:.1} s ago", edge["heard_ms_ago"].as_f64().unwrap_or(0.0) / 1000.0);
            let heard = if edge["silent"] == true {
                format!("<span class=\"error\">{heard}: not heard from</span>")
            } else {
                heard
            };
            let listeners: Vec<String> =
                edge["listeners"].as_array().map(Vec::as_slice).unwrap_or_default().iter().map(text).collect();
            out.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{config}</td><td>{}</td><td>{}</td><td>{reload}</td><td>{heard}</td></tr>",
                text(&edge["name"]),
                text(&edge["version"]),
                listeners.join(", "),
                when(&edge["started"]),
            ));
        }
        out.push_str("</table>");
    }
    for (key, title) in [
        ("records", "Operator states shared"),
        ("unknown_members", "Records for members this edge does not have (ignored)"),
    ] {
        let rows = cluster[key].as_array().map(Vec::as_slice).unwrap_or_default();
        if rows.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "<h3>{title}</h3><table><tr><th>member</th><th>state</th><th>set on</th><th>when</th></tr>"
        ));
        for row in rows {
            out.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                text(&row["address"]),
                text(&row["state"]),
                text(&row["edge"]),
                when(&row["at"]),
            ));
        }
        out.push_str("</table>");
    }
    for skipped in cluster["skipped"].as_array().map(Vec::as_slice).unwrap_or_default() {
        out.push_str(&format!("<p class=\"error\">Skipped record: {}</p>", text(skipped)));
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => escape(s),
        Value::Null => "-".to_string(),
        other => escape(&other.to_string()),
    }
}

fn when(unix: &Value) -> String {
    match unix.as_i64() {
        Some(at) => escape(&httpdate::fmt_http_date(UNIX_EPOCH + std::time::Duration::from_secs(at.max(0) as u64))),
        None => "-".to_string(),
    }
}

/// One table per group and named upstream.
fn pools_html(out: &mut String, status: &Value) {
    out.push_str("<h2>Workers and upstreams</h2>");
    for pool in status["pools"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "<h3>{} {}</h3><p>{}; {} queued.</p><table><tr><th>address</th><th>state</th><th>in flight</th><th>long-polls</th><th>req/s (1 min)</th><th>errors (1 min)</th><th>p99 (1 min)</th><th>weight</th><th>last out of rotation</th></tr>",
            text(&pool["kind"]),
            text(&pool["name"]),
            text(&pool["balancing"]),
            text(&pool["queued"])
        ));
        for member in pool["members"].as_array().into_iter().flatten() {
            let state = member["state"].as_str().unwrap_or("");
            let out_line = match member.get("last_out") {
                Some(last) => format!("{} ({})", when(&last["at"]), text(&last["why"])),
                None => "never".to_string(),
            };
            let minute = &member["last_minute"];
            let p99 = minute["p99_ms"].as_u64().map_or("-".to_string(), |ms| format!("&le; {ms} ms"));
            let errors = if minute["errors"] == 0 { "" } else { " class=\"error\"" };
            out.push_str(&format!(
                "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td{errors}>{}</td><td>{p99}</td><td>{}</td><td>{out_line}</td></tr>",
                text(&member["address"]),
                escape(state),
                escape(&state.replace('_', " ")),
                text(&member["in_flight"]),
                text(&member["long_polls"]),
                text(&minute["per_second"]),
                text(&minute["errors"]),
                text(&member["weight"]),
            ));
        }
        out.push_str("</table>");
    }
}

/// The page: one table per section, states coloured by class.
pub fn html(status: &Value) -> String {
    let mut out = String::with_capacity(8192);
    out.push_str(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>matrix-edge status</title><style>\
         body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}\
         td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f3f3f3}\
         .up{color:#176d17}.down,.error{color:#b00;font-weight:bold}.ejected,.draining,.maintenance,.slow_start{color:#a65f00}\
         </style></head><body>",
    );
    out.push_str(&format!(
        "<h1>matrix-edge {} for {}</h1><p>Readiness: <b>{}</b>. Requests in flight: {}. Held for main: {}. Page generated {}; it refreshes every 5 s.</p>",
        text(&status["version"]),
        text(&status["server_name"]),
        text(&status["readiness"]),
        text(&status["requests_in_flight"]),
        text(&status["main"]["held"]),
        when(&status["now"]),
    ));
    let reload = &status["config"]["last_reload"];
    let reload_line = if reload.is_null() {
        "no reload since start".to_string()
    } else if reload["result"] == "error" {
        format!(
            "<span class=\"error\">failed</span> at {}: {} (the previous configuration is still serving)",
            when(&reload["at"]),
            text(&reload["error"])
        )
    } else {
        format!("ok at {}", when(&reload["at"]))
    };
    out.push_str(&format!(
        "<h2>Configuration</h2><p>Loaded {}. Last reload: {reload_line}.</p>",
        when(&status["config"]["loaded_at"])
    ));
    pools_html(&mut out, status);
    out.push_str(&format!("<p>Main process: {}.</p>", text(&status["main"]["address"])));
    out.push_str("<h2>Certificates</h2><table><tr><th>names</th><th>issuer</th><th>expires</th><th>days left</th><th>source</th><th>next renewal</th></tr>");
    for cert in status["certificates"].as_array().into_iter().flatten() {
        let names: Vec<String> = cert["names"].as_array().into_iter().flatten().map(text).collect();
        out.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            names.join(", "),
            text(&cert["issuer"]),
            when(&cert["not_after"]),
            text(&cert["days_left"]),
            text(&cert["source"]),
            when(&cert["next_renewal"]),
        ));
    }
    out.push_str(
        "</table><h2>Listeners</h2><table><tr><th>address</th><th>TLS</th><th>serves</th><th>PROXY protocol</th></tr>",
    );
    for listener in status["listeners"].as_array().into_iter().flatten() {
        let roles: Vec<String> = listener["roles"].as_array().into_iter().flatten().map(text).collect();
        out.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            text(&listener["address"]),
            text(&listener["tls"]),
            roles.join(", "),
            text(&listener["proxy_protocol"])
        ));
    }
    out.push_str("</table><h2>Sites</h2><table><tr><th>hosts</th><th>routes</th></tr>");
    for site in status["sites"].as_array().into_iter().flatten() {
        let hosts: Vec<String> = site["hosts"].as_array().into_iter().flatten().map(text).collect();
        let routes: Vec<String> = site["routes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| format!("{} &rarr; {}", text(&r["match"]), text(&r["to"])))
            .collect();
        out.push_str(&format!("<tr><td>{}</td><td>{}</td></tr>", hosts.join(", "), routes.join("<br>")));
    }
    out.push_str("</table><h2>Rate limits</h2><table><tr><th>class</th><th>refused since start</th></tr>");
    for (class, count) in status["rate_limited"].as_object().into_iter().flatten() {
        out.push_str(&format!("<tr><td>{}</td><td>{}</td></tr>", escape(class), text(count)));
    }
    out.push_str("</table>");
    federation_html(&mut out, &status["federation"]);
    cluster_html(&mut out, &status["cluster"]);
    out.push_str(
        "<p><a href=\"/status.json\">status.json</a> &middot; <a href=\"/metrics\">metrics</a></p></body></html>\n",
    );
    out
}

/// The origins taking most of Synapse, by requests there, waiting, refused.
fn per_origin_html(out: &mut String, shares: &Value) {
    if shares.is_null() {
        out.push_str("<p>Federation origins are not given shares (<code>federation.per_origin</code> off).</p>");
        return;
    }
    out.push_str(&format!(
        "<h3>Busiest origins</h3><p>Each may have {} cost units at Synapse, all together {}; {} requests wait now.</p>",
        text(&shares["max_in_flight"]),
        if shares["total_in_flight"] == 0 { "unbounded".to_string() } else { text(&shares["total_in_flight"]) },
        text(&shares["queued"]),
    ));
    let busiest = shares["busiest"].as_array().map(Vec::as_slice).unwrap_or_default();
    if busiest.is_empty() {
        out.push_str("<p>No origin has a request at Synapse or waiting.</p>");
        return;
    }
    out.push_str("<table><tr><th>origin</th><th>at Synapse</th><th>waiting</th><th>refused</th></tr>");
    for load in busiest {
        let refused = if load["refused"] == 0 { "" } else { " class=\"error\"" };
        out.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td{refused}>{}</td></tr>",
            text(&load["origin"]),
            text(&load["in_flight"]),
            text(&load["queued"]),
            text(&load["refused"]),
        ));
    }
    out.push_str("</table>");
}

fn federation_html(out: &mut String, federation: &Value) {
    gate_html(out, federation);
    per_origin_html(out, &federation["per_origin"]);
}

fn gate_html(out: &mut String, federation: &Value) {
    out.push_str(&format!("<h2>Federation gate</h2><p>Mode: <b>{}</b>.", text(&federation["mode"])));
    if federation["mode"] == "off" {
        out.push_str(" Signatures are left to Synapse.</p>");
        return;
    }
    out.push_str(&format!(" Servers whose keys are at hand: {}.</p>", text(&federation["servers_with_keys"])));
    out.push_str("<table><tr><th>requests</th><th>since start</th></tr>");
    for (outcome, count) in federation["requests"].as_object().into_iter().flatten() {
        out.push_str(&format!("<tr><td>{}</td><td>{}</td></tr>", escape(outcome), text(count)));
    }
    for (result, count) in federation["key_fetches"].as_object().into_iter().flatten() {
        out.push_str(&format!("<tr><td>key fetches {}</td><td>{}</td></tr>", escape(result), text(count)));
    }
    out.push_str("</table>");
    let refusals = federation["latest_refusals"].as_array().map(Vec::as_slice).unwrap_or_default();
    if refusals.is_empty() {
        out.push_str("<p>Nothing refused since start.</p>");
        return;
    }
    out.push_str("<h3>Latest refusals</h3><table><tr><th>when</th><th>claimed origin</th><th>reason</th><th>detail</th><th>answered</th></tr>");
    for refusal in refusals {
        out.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td class=\"error\">{}</td><td>{}</td><td>{}</td></tr>",
            when(&refusal["at"]),
            text(&refusal["origin"]),
            text(&refusal["reason"]),
            text(&refusal["detail"]),
            if refusal["enforced"] == true { "401 at the door" } else { "forwarded (observe)" },
        ));
    }
    out.push_str("</table>");
}

#[async_trait]
impl ServeHttp for PrivateApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let (status, content_type, body) = match session.req_header().uri.path() {
            "/metrics" => (200, "text/plain; version=0.0.4", crate::observe::metrics::render()),
            // The process answers: it is alive, whatever its readiness.
            "/livez" => (200, "text/plain", b"alive\n".to_vec()),
            "/readyz" => {
                let (status, body) = self.runtime.probes.readiness().answer();
                (status, "text/plain", body.as_bytes().to_vec())
            }
            "/status.json" => {
                let mut body =
                    serde_json::to_vec_pretty(&snapshot(&self.edge.load(), &self.runtime)).unwrap_or_default();
                body.push(b'\n');
                (200, "application/json", body)
            }
            "/status" => {
                (200, "text/html; charset=utf-8", html(&snapshot(&self.edge.load(), &self.runtime)).into_bytes())
            }
            _ => (404, "text/plain", b"not found\n".to_vec()),
        };
        Response::builder()
            .status(status)
            .header("Content-Type", content_type)
            .header("Content-Length", body.len())
            .header("Cache-Control", "no-store")
            .body(body)
            .unwrap_or_default()
    }
}
