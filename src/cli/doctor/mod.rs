//! `matrix-edge doctor`: the deployment as another homeserver and a client
//! see it, from outside, each failure with its fix.
//!
//! Server discovery follows the spec's order (IP literal, explicit port,
//! `/.well-known/matrix/server` with its certificate, SRV `_matrix-fed._tcp`
//! then `_matrix._tcp`, port 8448); then the federation endpoint, the
//! signing keys (self-signature verified), optionally a request signed with
//! Synapse's own key (proof that signatures survive every hop), and the
//! client side: `/.well-known/matrix/client` with CORS, `/versions`,
//! authenticated media asking for a token, MAS's
//! `auth_metadata` and the MatrixRTC foci it publishes.

use crate::federation::discover::{split_host_port, srv_lookup};
use crate::federation::fetch::{self, Client, Fetched};
use crate::federation::signing::{read_signing_key, verify_server_keys, x_matrix};
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    pub check: String,
    pub verdict: Verdict,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

pub struct Options {
    pub server_name: String,
    pub connect_to: Vec<fetch::ConnectTo>,
    pub ca: Option<PathBuf>,
    pub signing_key: Option<PathBuf>,
    /// DNS server for SRV lookups (`IP:port`); default: the system's.
    pub dns: Option<std::net::SocketAddr>,
}

struct Report {
    findings: Vec<Finding>,
    /// Hosts whose certificate was judged already (one line each).
    judged: Vec<String>,
}

impl Report {
    fn add(&mut self, check: impl Into<String>, verdict: Verdict, detail: impl Into<String>, fix: Option<&str>) {
        self.findings.push(Finding {
            check: check.into(),
            verdict,
            detail: detail.into(),
            fix: fix.map(str::to_string),
        });
    }
    fn ok(&mut self, check: impl Into<String>, detail: impl Into<String>) {
        self.add(check, Verdict::Ok, detail, None);
    }
    fn warn(&mut self, check: impl Into<String>, detail: impl Into<String>, fix: &str) {
        self.add(check, Verdict::Warn, detail, Some(fix));
    }
    fn fail(&mut self, check: impl Into<String>, detail: impl Into<String>, fix: &str) {
        self.add(check, Verdict::Fail, detail, Some(fix));
    }
}

/// `host`, `host:port`, `[v6]:port` or an IP literal.
fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Judges the certificate a host served: verified for the name, chain
/// complete and in order, not near its end.
fn judge_certificate(report: &mut Report, what: &str, fetched: &Fetched) {
    if report.judged.iter().any(|w| w == what) {
        return;
    }
    report.judged.push(what.to_string());
    let check = format!("certificate of {what}");
    if let Some(problem) = &fetched.certificate_problem {
        let fix = if problem.contains("local issuer") || problem.contains("unable to get issuer") {
            "serve the full chain (leaf, then intermediates: certbot's fullchain.pem, not cert.pem)"
        } else if problem.contains("expired") {
            "renew the certificate (with tls.acme the edge does it itself)"
        } else if problem.contains("mismatch") || problem.contains("hostname") {
            "get a certificate that names this host (a SAN for it), or point the name elsewhere"
        } else {
            "serve a certificate from a public CA (or pass --ca for a private one) that names this host"
        };
        report.fail(&check, format!("does not verify: {problem}"), fix);
        return;
    }
    let Some(leaf) = fetched.chain.first() else {
        report.fail(&check, "no certificate was sent", "check the TLS setup of this host");
        return;
    };
    let epoch = openssl::asn1::Asn1Time::from_unix(0);
    let expires = epoch
        .as_ref()
        .ok()
        .and_then(|epoch| epoch.diff(leaf.not_after()).ok())
        .map_or(0, |d| i64::from(d.days) * 86_400 + i64::from(d.secs));
    let days = (expires - unix_now()) / 86_400;
    if days < 14 {
        report.warn(&check, format!("valid, but expires in {days} days"), "renew it soon");
    } else {
        report.ok(&check, format!("valid for the name, chain complete, expires in {days} days"));
    }
}

/// Runs every check; the caller prints and sets the exit code.
pub fn run(options: &Options) -> Vec<Finding> {
    let mut report = Report { findings: Vec::new(), judged: Vec::new() };
    let client = match Client::new(options.connect_to.clone(), options.ca.as_deref()) {
        Ok(client) => client,
        Err(error) => {
            report.fail("options", error.to_string(), "fix the --ca file");
            return report.findings;
        }
    };
    let server_name = options.server_name.trim().to_ascii_lowercase();
    let (host, port) = split_host_port(&server_name);
    let literal = host.parse::<std::net::IpAddr>().is_ok();

    // 1. Where other homeservers send federation.
    let (target_host, target_port, tls_name) = federation_target(&mut report, &client, options, &host, port, literal);
    let federation = format!("{target_host}:{target_port}");
    // Discovery fell through to the default port: the usual cause is an
    // edge serving federation on 443 without saying so in its well-known.
    let unreachable_fix = if !literal && port.is_none() && target_host == host && target_port == 8448 {
        format!(
            "in the edge's config, publish `well_known.server: \"{host}:443\"` so other servers come to the listener serving `federation` on 443, or add a listener on 8448 with `serves: [federation]`"
        )
    } else {
        "make sure a listener serves `federation` on that port, and that m.server (or SRV) names the right host and port"
            .to_string()
    };

    // 2. The federation endpoint, its certificate and the server's keys.
    match client.get(&target_host, target_port, "/_matrix/federation/v1/version", &[]) {
        Err(error) => report.fail("federation endpoint", format!("{federation}: {error}"), &unreachable_fix),
        Ok(fetched) => {
            if tls_name == target_host {
                judge_certificate(&mut report, &federation, &fetched);
            }
            match (fetched.status, fetched.json()) {
                (200, Ok(body)) if body["server"].is_object() => report.ok(
                    "federation endpoint",
                    format!("{federation} answers /_matrix/federation/v1/version: {}", body["server"]),
                ),
                (status, _) => report.fail(
                    "federation endpoint",
                    format!("{federation} answered /_matrix/federation/v1/version with {status}"),
                    "the edge must forward /_matrix/federation/ to Synapse on this listener",
                ),
            }
        }
    }
    match client.get(&target_host, target_port, "/_matrix/key/v2/server", &[]) {
        Err(error) => report.fail("signing keys", error.to_string(), "forward /_matrix/key/ to Synapse"),
        Ok(fetched) => match fetched.json().and_then(|document| verify_server_keys(&document, &server_name)) {
            Ok(keys) => {
                let ids: Vec<&str> = keys.keys.iter().map(|(id, _)| id.as_str()).collect();
                report.ok(
                    "signing keys",
                    format!("/_matrix/key/v2/server is self-signed by {server_name} ({})", ids.join(", ")),
                )
            }
            Err(error) => report.fail(
                "signing keys",
                error.to_string(),
                "Synapse's server_name must equal the name other servers use, and its keys must come through unchanged",
            ),
        },
    }
    if let Some(path) = &options.signing_key {
        signed_request(&mut report, &client, &server_name, &target_host, target_port, path);
    }
    federation_gate(&mut report, &client, &server_name, &target_host, target_port);

    // 3. What clients see.
    client_side(&mut report, &client, &host);
    report.findings
}

/// Step 1: where other homeservers send federation, as the spec's
/// discovery finds it: (host, port, name the certificate must carry).
fn federation_target(
    report: &mut Report,
    client: &Client,
    options: &Options,
    host: &str,
    port: Option<u16>,
    literal: bool,
) -> (String, u16, String) {
    let (host, server_name) = (host.to_string(), options.server_name.trim().to_ascii_lowercase());
    if literal || port.is_some() {
        report.ok("server name", format!("{server_name} names its address directly: no delegation is looked up"));
        (host.clone(), port.unwrap_or(8448), host.clone())
    } else {
        let delegated = well_known_server(report, client, &host);
        let (name, name_port) = match &delegated {
            Some(m_server) => split_host_port(m_server),
            None => (host.clone(), None),
        };
        if name.parse::<std::net::IpAddr>().is_ok() || name_port.is_some() {
            (name.clone(), name_port.unwrap_or(8448), name)
        } else if client.overridden(&name) {
            report.ok("SRV records", format!("not looked up: --connect-to redirects {name}"));
            (name.clone(), 8448, name)
        } else {
            let mut found = None;
            for service in ["_matrix-fed._tcp", "_matrix._tcp"] {
                match srv_lookup(&format!("{service}.{name}"), options.dns) {
                    Ok(Some(target)) => {
                        report.ok("SRV records", format!("{service}.{name} points at {}:{}", target.0, target.1));
                        found = Some(target);
                        break;
                    }
                    Ok(None) => {}
                    Err(error) => {
                        report.warn("SRV records", format!("{service}.{name}: {error}"), "check DNS for the name");
                    }
                }
            }
            match found {
                Some((target, target_port)) => (target, target_port, name),
                None => (name.clone(), 8448, name),
            }
        }
    }
}

fn well_known_server(report: &mut Report, client: &Client, host: &str) -> Option<String> {
    let check = ".well-known/matrix/server";
    let mut target = "/.well-known/matrix/server".to_string();
    let mut where_host = host.to_string();
    let mut where_port = 443;
    for _ in 0..5 {
        let fetched = match client.get(&where_host, where_port, &target, &[]) {
            Ok(fetched) => fetched,
            Err(error) => {
                report.warn(
                    check,
                    format!("not reachable ({error}); other servers fall back to SRV and port 8448"),
                    "serve it when Synapse is not on this host's port 8448",
                );
                return None;
            }
        };
        if (300..400).contains(&fetched.status) {
            let Some(location) = fetched.header("location") else { break };
            let Some(rest) = location.strip_prefix("https://") else {
                report.fail(
                    check,
                    format!("redirects to {location}, which is not https"),
                    "redirect to https or answer directly",
                );
                return None;
            };
            let (authority, path) = rest.split_once('/').map_or((rest, "/"), |(a, p)| (a, p));
            let (h, p) = split_host_port(authority);
            where_host = h;
            where_port = p.unwrap_or(443);
            target = format!("/{}", path.trim_start_matches('/'));
            continue;
        }
        if fetched.certificate_problem.is_some() {
            judge_certificate(report, &format!("{where_host}:{where_port} (for the well-known)"), &fetched);
            report.fail(
                check,
                "served over a certificate that does not verify: other servers ignore it",
                "fix the certificate for this host",
            );
            return None;
        }
        if fetched.status == 404 {
            report.warn(
                check,
                "not found: other servers use SRV records, then port 8448",
                "publish it (well_known.server) to delegate federation",
            );
            return None;
        }
        if fetched.status != 200 {
            report.fail(check, format!("answered {}", fetched.status), "answer 200 with {\"m.server\": \"host:port\"}");
            return None;
        }
        let m_server = match fetched.json() {
            Ok(body) => body["m.server"].as_str().map(str::to_string),
            Err(error) => {
                report.fail(
                    check,
                    format!("invalid: {error}"),
                    "serve {\"m.server\": \"host:port\"} as JSON (the edge's well_known.server does)",
                );
                return None;
            }
        };
        let Some(m_server) = m_server else {
            report.fail(check, "has no m.server string", "serve {\"m.server\": \"host:port\"}");
            return None;
        };
        if fetched.header("cache-control").is_none() {
            report.warn(check, "no Cache-Control: servers cache it for 24 hours by default", "set well_known.max_age");
        }
        report.ok(check, format!("delegates to {m_server}"));
        return Some(m_server);
    }
    report.fail(check, "too many redirects", "answer it directly");
    None
}

/// One signed probe: which part of the target carries the percent-encoded
/// identifiers, and the target itself.
struct SignedProbe {
    part: TargetPart,
    target: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TargetPart {
    Path,
    Query,
}

impl TargetPart {
    fn name(self) -> &'static str {
        match self {
            TargetPart::Path => "path",
            TargetPart::Query => "query string",
        }
    }
}

/// Federation requests carry user, room and event IDs percent-encoded in
/// the path (`%40`, `%21`, `%24`, `%3A`) and sometimes in the query. A proxy
/// that decodes and re-encodes the path (nginx with a URI part in
/// `proxy_pass`) leaves the query alone, so each part gets its own probes.
/// Every answer but a refusal of the signature is a pass: the IDs do not
/// exist, and Synapse only looks them up after the signature verified.
fn signed_probes(server_name: &str) -> Vec<SignedProbe> {
    let path = |target: String| SignedProbe { part: TargetPart::Path, target };
    vec![
        path(format!("/_matrix/federation/v1/user/devices/%40doctor%3A{server_name}")),
        path("/_matrix/federation/v1/event/%24doctor-probe".to_string()),
        path(format!("/_matrix/federation/v1/state_ids/%21doctor%3A{server_name}")),
        SignedProbe {
            part: TargetPart::Query,
            target: format!(
                "/_matrix/federation/v1/query/profile?user_id=%40doctor%3A{server_name}&field=displayname&probe=a%2Fb"
            ),
        },
    ]
}

/// Synapse refuses a signature that does not cover what it received with
/// 401 (`M_UNAUTHORIZED`); a 403 may be an answer about the room itself.
fn signature_refused(status: u16, body: &[u8]) -> bool {
    let errcode = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|body| body["errcode"].as_str().map(str::to_string));
    status == 401 || errcode.as_deref() == Some("M_UNAUTHORIZED")
}

fn signed_request(
    report: &mut Report,
    client: &Client,
    server_name: &str,
    host: &str,
    port: u16,
    key: &std::path::Path,
) {
    let check = "signed federation request";
    let (key_id, key) = match read_signing_key(key) {
        Ok(key) => key,
        Err(error) => {
            report.fail(
                check,
                error.to_string(),
                "pass Synapse's signing key file (signing_key_path in homeserver.yaml)",
            );
            return;
        }
    };
    let mut refused: Vec<(TargetPart, String)> = Vec::new();
    let mut accepted = Vec::new();
    for probe in signed_probes(server_name) {
        let authorization = match x_matrix(server_name, server_name, "GET", &probe.target, None, &key_id, &key) {
            Ok(header) => header,
            Err(error) => {
                report.fail(check, error.to_string(), "check the signing key");
                return;
            }
        };
        match client.get(host, port, &probe.target, &[("Authorization", authorization)]) {
            Err(error) => {
                report.fail(check, format!("{}: {error}", probe.target), "the federation endpoint must be reachable");
                return;
            }
            Ok(fetched) if signature_refused(fetched.status, &fetched.body) => refused.push((
                probe.part,
                format!("{} ({}: {})", probe.target, fetched.status, String::from_utf8_lossy(&fetched.body).trim()),
            )),
            Ok(fetched) => accepted.push(fetched.status),
        }
    }
    if refused.is_empty() {
        report.ok(
            check,
            format!(
                "Synapse accepted {} signed requests with encoded IDs in the path and the query ({})",
                accepted.len(),
                accepted.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
            ),
        );
        return;
    }
    let mut parts: Vec<&str> = refused.iter().map(|(part, _)| part.name()).collect();
    parts.dedup();
    report.fail(
        check,
        format!(
            "Synapse refused requests signed with its own key: something on the way changed the request target's {} ({})",
            parts.join(" and "),
            refused.iter().map(|(_, what)| what.as_str()).collect::<Vec<_>>().join("; ")
        ),
        "forward the request target byte for byte (nginx: proxy_pass without a URI part, `proxy_pass http://127.0.0.1:8008;`; no normalising proxy in front)",
    );
}

/// Whether a federation gate refuses forged requests before Synapse: one
/// request with a made-up key and signature, which Synapse would refuse too
/// (the edge's refusals say they are its own).
fn federation_gate(report: &mut Report, client: &Client, server_name: &str, host: &str, port: u16) {
    let check = "federation gate";
    let target = format!("/_matrix/federation/v1/query/profile?user_id=%40doctor%3A{server_name}&field=displayname");
    let forged = format!(
        "X-Matrix origin=\"{server_name}\",destination=\"{server_name}\",key=\"ed25519:doctor_forged\",sig=\"{}\"",
        "A".repeat(86)
    );
    match client.get(host, port, &target, &[("Authorization", forged)]) {
        Err(error) => report.warn(check, format!("could not send a forged request: {error}"), "see the federation endpoint check"),
        Ok(fetched) if String::from_utf8_lossy(&fetched.body).contains(crate::request::errors::FEDERATION_REFUSAL_MARK) => report.ok(
            check,
            format!("enforcing: a request with a forged signature was refused at the door ({})", fetched.status),
        ),
        Ok(fetched) if signature_refused(fetched.status, &fetched.body) => report.ok(
            check,
            format!(
                "not enforcing: a forged request reached Synapse, which refused it ({}); with matrix-edge, \
                 federation.verify.mode: enforce once matrix_edge_federation_requests_total shows no real server refused",
                fetched.status
            ),
        ),
        Ok(fetched) => report.fail(
            check,
            format!("a request with a forged signature was answered {}, not refused", fetched.status),
            "something in front of Synapse answers federation requests without checking their signatures",
        ),
    }
}

fn client_side(report: &mut Report, client: &Client, host: &str) {
    let check = ".well-known/matrix/client";
    let fetched =
        match client.get(host, 443, "/.well-known/matrix/client", &[("Origin", "https://app.element.io".into())]) {
            Ok(fetched) => fetched,
            Err(error) => {
                report.warn(
                    check,
                    format!("not reachable: {error}"),
                    "publish it so clients find the homeserver from the user ID",
                );
                return;
            }
        };
    if fetched.status == 404 {
        report.warn(
            check,
            "not found: clients must be told the homeserver URL by hand",
            "publish it (well_known.client)",
        );
        return;
    }
    let cors = fetched.header("access-control-allow-origin") == Some("*");
    let body = match (fetched.status, fetched.json()) {
        (200, Ok(body)) => body,
        (200, Err(error)) => {
            report.fail(check, format!("invalid: {error}"), "serve valid JSON (the edge's well_known.client does)");
            return;
        }
        (status, _) => {
            report.fail(check, format!("answered {status}"), "answer 200 with the client document");
            return;
        }
    };
    if !cors {
        report.fail(
            check,
            "no Access-Control-Allow-Origin: * — web clients (Element Web) cannot read it",
            "add CORS headers (the edge sends them on every answer)",
        );
    }
    let Some(base_url) = body["m.homeserver"]["base_url"].as_str() else {
        report.fail(check, "no m.homeserver.base_url", "set well_known.client.homeserver");
        return;
    };
    if cors {
        report.ok(check, format!("m.homeserver is {base_url}, with CORS"));
    }
    match client.get(host, 443, "/.well-known/matrix/doctor-probe", &[("Origin", "https://app.element.io".into())]) {
        Ok(missing) if missing.header("access-control-allow-origin").is_none() => report.warn(
            "CORS on errors",
            format!(
                "a {} from the well-known path carries no CORS headers: web clients see only a network error",
                missing.status
            ),
            "send CORS headers on error answers too",
        ),
        _ => {}
    }
    let Some(rest) = base_url.strip_prefix("https://") else {
        report.fail("homeserver URL", format!("{base_url} is not https"), "use an https:// base_url");
        return;
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let (api_host, api_port) = split_host_port(authority);
    let api_port = api_port.unwrap_or(443);
    let prefix = format!("/{}", path.trim_end_matches('/'));
    let prefix = if prefix == "/" { String::new() } else { prefix };
    match client.get(
        &api_host,
        api_port,
        &format!("{prefix}/_matrix/client/versions"),
        &[("Origin", "https://app.element.io".into())],
    ) {
        Err(error) => report.fail(
            "client API",
            format!("{base_url}: {error}"),
            "the base_url must reach a listener serving `client`",
        ),
        Ok(fetched) => {
            judge_certificate(report, &format!("{api_host}:{api_port}"), &fetched);
            match (fetched.status, fetched.json()) {
                (200, Ok(body)) if body["versions"].is_array() => {
                    report.ok("client API", format!("{base_url} answers /versions"))
                }
                (status, _) => report.fail(
                    "client API",
                    format!("{base_url}/_matrix/client/versions answered {status}"),
                    "forward /_matrix/client/ to Synapse",
                ),
            }
            authenticated_media(report, client, &api_host, api_port, &prefix);
            auth_and_foci(report, client, &api_host, api_port, &prefix, &body);
        }
    }
}

/// Authenticated media (Synapse 1.107 and later; what clients use since
/// 2024): without a token `/_matrix/client/v1/media/config` is refused by
/// Synapse itself, 401 `M_MISSING_TOKEN`. A 404 means the path dies on the
/// way (a proxy or media worker that does not know it) and clients show no
/// images.
fn authenticated_media(report: &mut Report, client: &Client, host: &str, port: u16, prefix: &str) {
    const CHECK: &str = "authenticated media";
    const FIX: &str =
        "route /_matrix/client/v1/media/ to the media repository (a media worker or main) of Synapse 1.107 or later";
    let path = format!("{prefix}/_matrix/client/v1/media/config");
    match client.get(host, port, &path, &[]) {
        Err(error) => report.fail(CHECK, format!("{path}: {error}"), FIX),
        Ok(fetched) => {
            let errcode = fetched.json().ok().and_then(|body| body["errcode"].as_str().map(str::to_string));
            match (fetched.status, errcode.as_deref()) {
                (401, Some("M_MISSING_TOKEN")) => {
                    report.ok(CHECK, format!("{path} asks for an access token (401 M_MISSING_TOKEN)"))
                }
                (200, _) => report.warn(
                    CHECK,
                    format!("{path} answered 200 without an access token"),
                    "let Synapse answer it: media config is only for signed-in users",
                ),
                (status, errcode) => {
                    report.fail(CHECK, format!("{path} answered {status} {}", errcode.unwrap_or("(no errcode)")), FIX)
                }
            }
        }
    }
}

/// MAS: `auth_metadata`'s issuer must be https; MatrixRTC foci must answer.
fn auth_and_foci(
    report: &mut Report,
    client: &Client,
    host: &str,
    port: u16,
    prefix: &str,
    client_document: &serde_json::Value,
) {
    if let Ok(fetched) =
        client.get(host, port, &format!("{prefix}/_matrix/client/unstable/org.matrix.msc2965/auth_metadata"), &[])
    {
        if fetched.status == 200 {
            match fetched.json().map(|b| b["issuer"].as_str().map(str::to_string)) {
                Ok(Some(issuer)) if issuer.starts_with("https://") => {
                    report.ok("authentication (MAS)", format!("auth_metadata issuer is {issuer}"))
                }
                other => report.fail(
                    "authentication (MAS)",
                    format!("auth_metadata has no https issuer ({other:?})"),
                    "set MAS's http.public_base to its https URL",
                ),
            }
        }
    }
    let foci = client_document["org.matrix.msc4143.rtc_foci"].as_array().cloned().unwrap_or_default();
    for focus in foci {
        let Some(url) = focus["livekit_service_url"].as_str() else { continue };
        let Some(rest) = url.strip_prefix("https://") else {
            report.fail("MatrixRTC focus", format!("{url} is not https"), "publish an https livekit_service_url");
            continue;
        };
        let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        let (focus_host, focus_port) = split_host_port(authority);
        match client.get(&focus_host, focus_port.unwrap_or(443), &format!("/{path}"), &[]) {
            Ok(fetched) => report.ok("MatrixRTC focus", format!("{url} answers ({})", fetched.status)),
            Err(error) => {
                report.fail("MatrixRTC focus", format!("{url}: {error}"), "route the focus URL to lk-jwt-service")
            }
        }
    }
}

/// Text for a terminal: one line per check, fixes indented under failures.
pub fn render(server_name: &str, findings: &[Finding]) -> String {
    let mut out = format!("matrix-edge doctor: {server_name}\n");
    for finding in findings {
        let label = match finding.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        let _ = writeln!(out, "  {label} {}: {}", finding.check, finding.detail);
        if let (Some(fix), true) = (&finding.fix, finding.verdict != Verdict::Ok) {
            let _ = writeln!(out, "       fix: {fix}");
        }
    }
    let count = |v| findings.iter().filter(|f| f.verdict == v).count();
    let _ = writeln!(
        out,
        "{} ok, {} warnings, {} failures",
        count(Verdict::Ok),
        count(Verdict::Warn),
        count(Verdict::Fail)
    );
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn server_names_split_as_the_spec_reads_them() {
        assert_eq!(split_host_port("example.org"), ("example.org".into(), None));
        assert_eq!(split_host_port("example.org:8448"), ("example.org".into(), Some(8448)));
        assert_eq!(split_host_port("[2001:db8::1]:8448"), ("2001:db8::1".into(), Some(8448)));
        assert_eq!(split_host_port("2001:db8::1"), ("2001:db8::1".into(), None));
        assert_eq!(split_host_port("192.0.2.1"), ("192.0.2.1".into(), None));
    }

    #[test]
    fn signed_probes_carry_every_encoded_sigil_in_the_path_and_some_in_the_query() {
        let probes = signed_probes("example.org");
        let paths: String = probes
            .iter()
            .filter(|p| p.part == TargetPart::Path)
            .map(|p| p.target.split('?').next().unwrap_or_default().to_string())
            .collect();
        for encoded in ["%40", "%21", "%24", "%3A"] {
            assert!(paths.contains(encoded), "no path probe carries {encoded}");
        }
        let query = probes.iter().find(|p| p.part == TargetPart::Query).unwrap();
        let (path, query) = query.target.split_once('?').unwrap();
        assert!(!path.contains('%'), "the query probe must change only through its query");
        assert!(query.contains("%40") && query.contains("%2F"));
    }

    #[test]
    fn only_a_refused_signature_counts_as_refused() {
        assert!(signature_refused(401, br#"{"errcode":"M_UNAUTHORIZED","error":"Invalid signature"}"#));
        assert!(signature_refused(401, b"not json"));
        assert!(!signature_refused(403, br#"{"errcode":"M_FORBIDDEN","error":"Host not in room."}"#));
        assert!(!signature_refused(404, br#"{"errcode":"M_NOT_FOUND"}"#));
        assert!(!signature_refused(200, b"{}"));
    }

    #[test]
    fn rendering_shows_fixes_under_failures_only() {
        let findings = vec![
            Finding { check: "a".into(), verdict: Verdict::Ok, detail: "fine".into(), fix: None },
            Finding { check: "b".into(), verdict: Verdict::Fail, detail: "broken".into(), fix: Some("mend it".into()) },
        ];
        let text = render("example.org", &findings);
        assert!(text.contains("  ok   a: fine\n"));
        assert!(text.contains("  FAIL b: broken\n       fix: mend it\n"));
        assert!(text.ends_with("1 ok, 0 warnings, 1 failures\n"));
    }
}
