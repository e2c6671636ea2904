//! Entry points shared by the `cargo fuzz` targets in `fuzz/` and the test
//! that replays their corpus on stable Rust. Each one turns arbitrary bytes
//! into the inputs a peer controls and checks properties, not just "no panic".

use crate::config::{Role, Source};
use crate::request::admission::{admit, normalised_views, path_of, Admission, Limits, RequestFacts};
use crate::synapse::sticky::{self, KeySource};
use crate::synapse::table::{Group, Router, Sticky};
use once_cell::sync::Lazy;
use std::net::IpAddr;

static ROUTER: Lazy<Option<Router>> = Lazy::new(|| Router::new(Vec::new(), &Group::ALL).ok());
static LIMITS: Lazy<Limits> = Lazy::new(|| Limits::from_config(&crate::config::LimitsConfig::default()));

/// Sites for the router target: the Matrix site, an exact host, a wildcard,
/// and an allow-listed prefix (no files, no names to look up).
static SITES: Lazy<Option<crate::edge::Edge>> = Lazy::new(|| {
    let text = "server_name: example.com\nlisteners: [{ address: \"127.0.0.1:1\", serves: [client, sites] }]\nsynapse: { main: \"127.0.0.1:2\" }\nupstreams: { app: { address: \"127.0.0.1:3\" } }\nsites:\n  - hosts: [a.example.org, \"*.b.example.org\"]\n    routes:\n      - { prefix: /, upstream: app }\n      - { prefix: /admin/, upstream: app, allow: [10.0.0.0/8] }\n";
    let source = Source { file: "fuzz-sites.yaml".into(), text: text.into() };
    crate::edge::Edge::from_config(source.parse().ok()?, &source).ok()
});

/// A request from fuzz bytes: the first line is the method, the second the
/// target, the rest `Name: value` header lines. The first byte picks roles.
struct FuzzRequest<'a> {
    roles: Vec<Role>,
    method: &'a str,
    target: &'a [u8],
    headers: Vec<(&'a [u8], &'a [u8])>,
}

fn split_request(data: &[u8]) -> Option<FuzzRequest<'_>> {
    let (&selector, rest) = data.split_first()?;
    let mut lines = rest.split(|&b| b == b'\n');
    let method = std::str::from_utf8(lines.next()?).ok()?;
    let target = lines.next()?;
    let headers = lines
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            Some((&line[..colon], line[colon + 1..].trim_ascii()))
        })
        .collect();
    let roles = [Role::WellKnown, Role::Client, Role::Federation]
        .into_iter()
        .enumerate()
        .filter(|(bit, _)| selector & (1 << bit) != 0)
        .map(|(_, role)| role)
        .collect();
    Some(FuzzRequest { roles, method, target, headers })
}

fn header<'a>(request: &FuzzRequest<'a>, name: &str) -> Option<&'a [u8]> {
    request.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| *v)
}

/// Admission and routing: a forwarded request never reaches replication,
/// metrics or (unless allowed) admin paths in any reading of its path, and
/// the compiled route table agrees with the rule-by-rule scan.
pub fn router(data: &[u8]) {
    let Some(request) = split_request(data) else { return };
    let facts = RequestFacts {
        target: request.target,
        has_upgrade: header(&request, "upgrade").is_some(),
        admin_allowed: false,
        mas_api_allowed: false,
        is_options: request.method == "OPTIONS",
        content_length: header(&request, "content-length")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse().ok()),
        header_bytes: request.headers.iter().map(|(n, v)| (n.len() + v.len()) as u64).sum(),
        header_count: request.headers.len(),
    };
    if let Admission::Forward { body_limit } = admit(&request.roles, &facts, &LIMITS) {
        assert!(body_limit >= LIMITS.max_upload_size);
        for view in normalised_views(path_of(request.target)) {
            let lower = view.to_ascii_lowercase();
            for private in ["/_synapse/replication", "/_synapse/metrics", "/_synapse/admin", "/_synapse/mas/"] {
                assert!(!lower.starts_with(private), "forwarded {:?} as {view:?}", request.target);
            }
        }
    }
    // A request line the edge accepts has a token method and a target of visible ASCII only.
    let mut line = request.method.as_bytes().to_vec();
    line.push(b' ');
    line.extend_from_slice(request.target);
    line.extend_from_slice(b" HTTP/1.1");
    if crate::server::framing::check_request_line(&line).is_ok() {
        assert!(request.target.iter().all(|b| (0x21..=0x7e).contains(b)), "accepted {line:?}");
    }
    site_choice(&request);
    let Some(router) = ROUTER.as_ref() else { return };
    let compiled = router.route(request.method, request.target);
    assert_eq!(compiled, router.route_naive(request.method, request.target));
    let source = KeySource {
        target: request.target,
        authorization: header(&request, "authorization"),
        client_ip: Some(IpAddr::from([127, 0, 0, 1])),
    };
    let _ = sticky::key(compiled.sticky, &source);
}

/// The site and route a Host picks do not depend on its case or port, and
/// an allow-listed route refuses an outside client under every spelling.
fn site_choice(request: &FuzzRequest<'_>) {
    let Some(edge) = SITES.as_ref() else { return };
    let roles = [Role::Client, Role::Sites];
    let host = header(request, "host");
    let path = path_of(request.target);
    let (site, target) = edge.sites.target(&roles, host, path);
    if let Some(host) = host {
        let upper = host.to_ascii_uppercase();
        assert_eq!(edge.sites.pick(Some(&upper)), site, "case changed the site of {host:?}");
    }
    if let crate::sites::Target::Route(at, _) = target {
        let facts = crate::sites::RouteFacts {
            target: request.target,
            upgrade: None,
            client: Some(IpAddr::from([192, 0, 2, 1])),
            content_length: None,
        };
        let admitted = edge.sites.admit_route(at, &facts, &edge.policy.limits).is_ok();
        let admin = normalised_views(path).iter().any(|v| v.starts_with("/admin/"));
        assert!(!(admitted && admin), "{:?} reached the allow-listed route from outside", request.target);
    }
}

/// Sticky keys: any key is borrowed from the request bytes (never a rewritten
/// copy), and only an origin key falls back to the client address.
pub fn sticky_keys(data: &[u8]) {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let target = &data[..split];
    let authorization = data.get(split + 1..);
    let source = KeySource { target, authorization, client_ip: Some(IpAddr::from([10, 0, 0, 1])) };
    let inside = |outer: &[u8], inner: &[u8]| {
        let range = outer.as_ptr_range();
        range.start <= inner.as_ptr() && inner.as_ptr_range().end <= range.end
    };
    for sticky in [Sticky::None, Sticky::User, Sticky::Room, Sticky::Origin] {
        match sticky::key(sticky, &source) {
            Some(sticky::Key::Bytes(bytes)) => assert!(
                inside(target, bytes) || authorization.is_some_and(|a| inside(a, bytes)),
                "{sticky} key {bytes:?} not borrowed from the request"
            ),
            Some(sticky::Key::Ip(_)) => assert_eq!(sticky, Sticky::Origin, "only origin keys fall back to the address"),
            None => assert!(sticky != Sticky::Origin, "origin keys always exist"),
        }
    }
    if let Some(room) = sticky::room(target) {
        assert!(!room.contains(&b'/') && !room.contains(&b'?'));
    }
}

/// The config loader: any text yields a config or a located error, and
/// rendering the error never fails. Configs naming certificate files stop
/// after parsing, so the fuzzer never reads arbitrary files.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let source = Source { file: "fuzz.yaml".into(), text: text.to_owned() };
    let config = match source.parse() {
        Ok(config) => config,
        Err(error) => {
            assert!(!error.to_string().is_empty());
            return;
        }
    };
    // Building the snapshot reads certificate files and static roots and
    // looks up upstream names: the fuzzer stays off the filesystem and DNS.
    let names_a_host = config
        .synapse
        .targets()
        .into_iter()
        .chain(config.upstreams.values().flat_map(|u| u.address.iter().chain(&u.members)))
        .any(|target| !target.is_literal());
    let static_roots =
        config.sites.iter().flat_map(|s| &s.routes).chain(&config.matrix_site.routes).any(|r| r.static_files.is_some());
    if !config.tls.certificates.is_empty() || config.tls.acme.is_some() || names_a_host || static_roots {
        return;
    }
    if let Err(error) = crate::edge::Edge::from_config(config, &source) {
        assert!(error.to_string().starts_with("fuzz.yaml"), "unlocated error: {error}");
    }
}

/// PROXY protocol headers as a load balancer (or an attacker on a listed
/// address) might send them: the reader never asks for a byte past the
/// header's end (what follows is TLS or HTTP and must not be swallowed),
/// never buffers more than the limits, and parsing never panics.
pub fn proxy_header(data: &[u8]) {
    use crate::server::proxy_protocol::{next_read, parse, Need};
    let mut header: Vec<u8> = Vec::new();
    loop {
        match next_read(&header) {
            Err(_) => break,
            Ok(Need::Complete) => {
                assert!(header.len() <= 16 + 2048, "a {} byte header was accepted", header.len());
                if header.starts_with(b"PROXY ") {
                    assert!(header.len() <= 107, "a {} byte v1 line was accepted", header.len());
                }
                let _ = parse(&header);
                break;
            }
            Ok(Need::More(count)) => {
                assert!(count > 0, "asked for nothing");
                let start = header.len();
                let Some(more) = data.get(start..start + count) else { break };
                header.extend_from_slice(more);
            }
        }
    }
    let _ = parse(data);
}

/// `Authorization: X-Matrix` values: a header that parses renders back
/// (every value quoted and escaped) to one that parses the same.
pub fn x_matrix(data: &[u8]) {
    use crate::federation::header::parse;
    let Ok(parsed) = parse(data) else { return };
    let quote = |value: &str| value.replace('\\', "\\\\").replace('"', "\\\"");
    let mut rendered = format!(
        "X-Matrix origin=\"{}\",key=\"{}\",sig=\"{}\"",
        quote(&parsed.origin),
        quote(&parsed.key),
        quote(&parsed.sig)
    );
    if let Some(destination) = &parsed.destination {
        rendered.push_str(&format!(",destination=\"{}\"", quote(destination)));
    }
    assert_eq!(parse(rendered.as_bytes()).as_ref(), Ok(&parsed), "{rendered}");
    assert!(crate::federation::header::is_server_name(&parsed.origin));
}

/// Canonical JSON: what the encoder writes reads back as the same value,
/// and encoding that again gives the same bytes.
pub fn canonical_json(data: &[u8]) {
    use crate::federation::canonical::encode;
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let Ok(encoded) = encode(&value) else { return };
    let again: serde_json::Value = match serde_json::from_slice(&encoded) {
        Ok(again) => again,
        Err(error) => panic!("the encoder wrote invalid JSON ({error}): {}", String::from_utf8_lossy(&encoded)),
    };
    assert_eq!(again, value);
    assert_eq!(encode(&again).ok().as_deref(), Some(encoded.as_slice()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_site_fixture_builds_and_known_inputs_hold() {
        assert!(SITES.is_some(), "the fuzz site fixture does not build");
        for input in [
            &b"\x03GET\n/admin/users\nhost: A.Example.org:443\n"[..],
            b"\x03GET\n/%61dmin/users\nhost: x.b.example.org\n",
            b"\x03POST\n//admin/x\nhost: a.example.org.\n",
            b"\x03GET\n/_synapse/mas/provision_user\nhost: example.com\n",
        ] {
            router(input);
        }
    }
}
